"""Reporting: the summary table that sets δH₁ beside ΔH, the versions block, peak memory, and the JSON writer.

Shared by the ``funcprobe probe`` command and the demo. Everything a table shows is also in :func:`summary`'s dict,
which the JSON carries (``"summary"``), so every number a user sees is in the results file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import resource
import unicodedata
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from .formatting import fmt

__all__ = ["summary", "summary_table", "format_report", "plot_lr_sweep", "versions", "peak_memory",
           "reset_peak_memory", "to_jsonable", "write_json", "write_probe_outputs", "check_output_paths",
           "check_not_an_input", "save_outputs", "OutputError"]


# ------------------------------------------------------------------------------------------------------ the summary
def _realised_map(realised) -> dict[str, Any]:
    """{method: result} from a dict of results, one result, or None; the primary first: importance sampling (the
    default, the lower spread for the small steps of real runs) unless its diagnostics flag it and common random
    numbers' do not."""
    if realised is None:
        return {}
    if not isinstance(realised, Mapping):
        realised = {getattr(realised, "method", "snis"): realised}
    order = ["snis", "crn"]
    snis, crn = realised.get("snis"), realised.get("crn")
    if snis is not None and crn is not None and not snis.reliable and crn.reliable:
        order = ["crn", "snis"]
    return {name: realised[name] for name in order if realised.get(name) is not None}


def summary(prediction, realised=None, in_sample=None, heldout=None, paired=None) -> dict[str, Any]:
    """The numbers of the summary table: δH₁ (a ``DeltaH1Result``) beside the realised ΔH on the evaluation batch.

    ``realised``: an ``SNISResult`` or ``CRNResult``, or a dict {"snis": …, "crn": …} (either may be absent);
    ``in_sample``: an in-sample ``SNISResult`` on the update batch (a biased diagnostic), or None.

    Keys: ``B``, ``G`` (the update batch), ``lr``, ``eta_g``, ``units``, ``n_units``; ``deltaH1``, ``se_deltaH1``,
    ``grad_term``, ``se_grad_term``, ``state_term``, ``deltaH1_plugin`` — all of the U-statistic on U, the change
    expected over update batches (``deltaH1_is`` says so in words); with a realised change: ``realised_method``
    (SNIS when both ran, unless only SNIS is flagged unreliable), ``eval_B``, ``eval_G``, ``H_before``, ``H_after``, ``deltaH``, ``se_deltaH`` (of that
    method), ``difference`` = ΔH − the
    first-order value named by ``difference_against``, unpaired (``paired_difference`` is the paired one), ``ratio`` =
    ΔH / that value (None when it is 0, with ``ratio_note``); per method
    ``crn_deltaH``, ``crn_se``, ``crn_changed_fraction``, ``crn_reliable``, ``crn_reason`` and ``snis_deltaH``, ``snis_se``, ``normalize``,
    ``estimator``, the weight diagnostics (``ess_min_fraction``, ``ess_global_fraction``, ``khat``,
    ``khat_threshold``, ``khat_assessed``) and the verdict ``reliable`` / ``reason``; with ``in_sample``:
    ``in_sample_deltaH``, ``in_sample_se`` and ``in_sample_note``.

    ``heldout``: δĤ₁(E) of the step on the evaluation batch (a ``HeldoutResult``, spec §9) — the headline: keys
    ``heldout``, ``heldout_se``, ``heldout_grad_term`` (± ``heldout_se_grad``), ``heldout_state_term``
    (± ``heldout_se_state``), ``heldout_integrand``, ``entropy_eval`` (Ĥ(θ) on E, Rao-Blackwell) and
    ``entropy_per_token``; then ``difference`` and ``ratio`` are against it. ``paired``: {method: PairedDifference},
    ``paired_difference``, ``paired_se``, ``paired_z``, ``first_order`` and ``verdict`` of the method shown first.
    ``young_state_note``: set when the optimizer state is young (t < ``YOUNG_STATE_STEPS``), where the U-statistic
    δH₁ is not an estimate of this step.
    """
    data: dict[str, Any] = {
        "B": prediction.B, "G": prediction.G, "lr": prediction.lr, "eta_g": prediction.eta_g,
        "units": prediction.units, "n_units": prediction.n_units,
        "deltaH1": prediction.deltaH1, "se_deltaH1": prediction.se_deltaH1,
        "grad_term": prediction.grad_term, "se_grad_term": prediction.se_grad_jack,
        "state_term": prediction.state_term, "deltaH1_plugin": prediction.deltaH1_plugin,
        "deltaH1_is": "the U-statistic on the update batch: the first-order change expected over update batches "
                      "(spec §5); this step's first-order change is 'heldout' (δĤ₁(E))",
    }
    steps = _adam_steps(prediction)
    if steps is not None and steps < YOUNG_STATE_STEPS:
        data["young_state_note"] = (
            f"the optimizer state is young (t = {steps} steps): the U-statistic δH₁ estimates the change expected "
            "over batches only once P no longer depends on the batch, and is biased here; δĤ₁(E) is this step's")
    reference = prediction.deltaH1
    if heldout is not None:
        reference = heldout.deltaH1
        data.update({"heldout": heldout.deltaH1, "heldout_se": heldout.se, "heldout_grad_term": heldout.grad_term,
                     "heldout_se_grad": heldout.se_grad, "heldout_state_term": heldout.state_term,
                     "heldout_se_state": heldout.se_state, "heldout_integrand": heldout.integrand,
                     "entropy_eval": heldout.entropy, "entropy_eval_se": heldout.entropy_se,
                     "entropy_per_token": heldout.entropy_per_token})
    methods = _realised_map(realised)
    if methods:
        method, primary = next(iter(methods.items()))
        data.update({"realised_method": method, "eval_B": primary.B, "eval_G": primary.G,
                     "H_before": primary.H_before, "H_after": primary.H_after, "deltaH": primary.deltaH,
                     "se_deltaH": primary.se, "difference": primary.deltaH - reference,
                     "difference_against": "heldout" if heldout is not None else "deltaH1",
                     "ratio": primary.deltaH / reference if reference != 0 else None})
        if reference == 0:
            data["ratio_note"] = "the prediction is exactly 0 (a zero step, or no gradient and no state term): no ratio"
        pair = (paired or {}).get(method)
        if pair is not None:
            data.update({"paired_difference": pair.difference, "paired_se": pair.se, "paired_z": pair.z,
                         "first_order": pair.first_order, "verdict": pair.verdict})
    if "crn" in methods:
        crn = methods["crn"]
        data.update({"crn_deltaH": crn.deltaH, "crn_se": crn.se, "crn_changed_fraction": crn.changed_fraction,
                     "crn_reliable": crn.reliable, "crn_reason": crn.reason})
    if "snis" in methods:
        snis = methods["snis"]
        data.update({
            "snis_deltaH": snis.deltaH, "snis_se": snis.se, "normalize": snis.normalize,
            "estimator": snis.estimator, "per_token": snis.per_token,
            "ess_min_fraction": snis.ess_min_fraction, "ess_global_fraction": snis.ess_global_fraction,
            "khat": snis.khat, "khat_threshold": snis.khat_threshold, "khat_assessed": snis.khat_assessed,
            "reliable": snis.reliable, "reason": snis.reason,
        })
    if in_sample is not None:
        data.update({"in_sample_deltaH": in_sample.deltaH, "in_sample_se": in_sample.se,
                     "in_sample_note": "SNIS on the update batch itself: biased by the same-sample term; "
                                       "a diagnostic, not the realised change"})
    return data


#: Below this many AdamW steps the batch's own gradient is a large part of v′ (about 1/t of it, β₂ = 0.999) and the
#: U-statistic δH₁ is measurably biased (exact enumeration: 26× off at t = 0, −55 % at t = 3, within 3 % at t = 30;
#: docs/estimators.md): the report says so.
YOUNG_STATE_STEPS = 30


def _adam_steps(prediction) -> int | None:
    step = getattr(prediction, "step", None)
    state = getattr(step, "new_state", None)
    counts = getattr(state, "step", None)
    if not counts:
        return None
    return int(min(counts.values())) - 1   # steps taken before this one


def _label(text: str, width: int = 40) -> str:
    """``text`` left-justified to ``width`` columns, not counting combining marks (the hat of k̂, the bar of X̄)."""
    shown = sum(not unicodedata.combining(ch) for ch in text)
    return text + " " * max(width - shown, 0)


def _row(label: str, value, se=None) -> str:
    return f"{_label(label)}{fmt(value, '>14.6g')}{'' if se is None else fmt(se, '>12.4g')}"


def summary_table(prediction, realised=None, in_sample=None, *, heldout=None, paired=None,
                  title: str | None = None) -> str:
    """A readable table of the first-order (δĤ₁(E), and the U-statistic δH₁) and realised (ΔH) entropy change of
    the step, with SEs and the paired verdict.

    ``prediction``: a ``DeltaH1Result``; ``realised``: the realised change of the same step on the evaluation
    batch (as for :func:`summary`); ``in_sample``: the biased in-sample diagnostic, or None; ``heldout``, ``paired``:
    as for :func:`summary`. Nats per sequence (per token for a per-token SNIS estimate).
    """
    s = summary(prediction, realised, in_sample, heldout, paired)
    unit = "nats/token" if s.get("per_token") else "nats/sequence"
    head = title or "entropy change of one AdamW step"
    lines = [f"{head} — update batch B={s['B']} prompts × G={s['G']} responses, lr={fmt(s['lr'], '.4g')}, "
             f"units={s['units']} (U={s['n_units']}), {unit}",
             f"{_label('quantity')}{'value':>14}{'SE':>12}"]
    if "heldout" in s:
        lines += [_row("δĤ₁(E) first-order change of this step", s["heldout"], s["heldout_se"]),
                  _row("  gradient term", s["heldout_grad_term"], s["heldout_se_grad"]),
                  _row("  optimizer-state term", s["heldout_state_term"], s["heldout_se_state"])]
    lines += [_row("δH₁ U-statistic (expected over batches)" if "heldout" in s else "δH₁ predicted (first order)",
                   s["deltaH1"], s["se_deltaH1"]),
              _row("  gradient term −η_g·U_cross", s["grad_term"], s["se_grad_term"]),
              _row("  optimizer-state term", s["state_term"]),
              _row("  plug-in −X̄·Δθ (biased)", s["deltaH1_plugin"])]
    if "realised_method" in s:
        lines += [f"realised on the evaluation batch (B={s['eval_B']} × G={s['eval_G']}, drawn independently of "
                  "the update batch):",
                  _row(f"H(θ) ({'CRN' if s['realised_method'] == 'crn' else 'SNIS'})", s["H_before"]),
                  _row(f"H(θ⁺) ({'CRN' if s['realised_method'] == 'crn' else 'SNIS'})", s["H_after"])]
        rows = {"crn": lambda: _row("ΔH realised, common random numbers", s["crn_deltaH"], s["crn_se"]),
                "snis": lambda: _row("ΔH realised, importance sampling", s["snis_deltaH"], s["snis_se"])}
        for method in _realised_map(realised):
            lines.append(rows[method]())
        method = "CRN" if s["realised_method"] == "crn" else "SNIS"
        name = "δĤ₁(E)" if "heldout" in s else "δH₁"
        if "paired_difference" in s:
            lines.append(_row(f"ΔH − {name} ({method}, paired per prompt)", s["paired_difference"], s["paired_se"]))
        else:
            lines.append(_row(f"ΔH − {name} ({method})", s["difference"]))
        lines.append(_row(f"ΔH / {name} ({method})", s["ratio"]))
        if "verdict" in s:
            lines.append(s["verdict"])
        if "crn_deltaH" in s:
            lines.append(f"CRN: {fmt(100 * s['crn_changed_fraction'], '.1f')}% of the draws changed (y⁺ ≠ y); "
                         "reliable: " + ("yes" if s["crn_reliable"] else f"NO — {s['crn_reason']}"))
        if "snis_deltaH" in s:
            khat = (f"k̂ {fmt(s['khat'], '.3f')} (threshold {fmt(s['khat_threshold'], '.3f')})" if s["khat_assessed"]
                    else "k̂ not assessed (B·G < 21, or no weight above 2× the mean: none can dominate)")
            integrand = "Rao-Blackwell" if s["estimator"] == "rao_blackwell" else "−S"
            from .realised import NORMALIZATION_LABELS

            label = NORMALIZATION_LABELS.get(s["normalize"], s["normalize"])
            lines.append(f"importance sampling ({label}, {integrand}): ESS/G min {fmt(s['ess_min_fraction'], '.3f')}, ESS/(BG) "
                         f"{fmt(s['ess_global_fraction'], '.3f')}, {khat}; reliable: "
                         + ("yes" if s["reliable"] else f"NO — {s['reason']}"))
    if "in_sample_deltaH" in s:
        lines.append(_row("in-sample ΔH on the update batch (BIASED)", s["in_sample_deltaH"], s["in_sample_se"]))
    if "young_state_note" in s:
        lines.append(f"note: {s['young_state_note']}")
    return "\n".join(lines)


def format_report(prediction, realised=None, sweep=None, *, in_sample=None, heldout=None, paired=None,
                  details: bool = False) -> str:
    """The summary table, then (``details``) the full δĤ₁(E), δH₁ and ΔH tables, then the learning-rate sweep's."""
    parts = []
    if details:
        if heldout is not None:
            parts.append(str(heldout))
        parts.append(str(prediction))
        parts.extend(str(result) for result in _realised_map(realised).values())
        if in_sample is not None:
            parts.append(str(in_sample))
    parts.append(summary_table(prediction, realised, in_sample, heldout=heldout, paired=paired))
    if sweep is not None:
        parts.append(str(sweep))
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------------------------- run information
def versions() -> dict[str, str]:
    """Versions of funcprobe, torch, transformers, peft and Python (a package that is missing reads "absent")."""
    from ._version import __version__

    found = {"funcprobe": __version__, "torch": torch.__version__}
    for name in ("transformers", "peft"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            found[name] = "absent"
    found["python"] = platform.python_version()
    return found


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a fresh CUDA peak-memory count on ``device`` (nothing to do on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device | str) -> dict[str, Any]:
    """``{"bytes", "kind"}``: the CUDA peak allocation since :func:`reset_peak_memory` on a CUDA device, else the
    process's peak resident set size."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return {"bytes": int(torch.cuda.max_memory_allocated(device)), "kind": "cuda_max_allocated"}
    return {"bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "kind": "process_max_rss"}


# ----------------------------------------------------------------------------------------------------------- JSON
def to_jsonable(value: Any) -> Any:
    """Standard JSON types for results: ``to_dict()`` objects, dataclasses, tensors, dtypes, devices, paths, tuples.

    Non-finite floats (NaN, ±inf) become null: standard JSON has no such numbers (strict parsers — JavaScript's,
    Go's, jq — reject ``NaN``). Each result's ``notes`` says why a value is null where it matters (an SE that needs
    more prompts, a k̂ that was not assessed).
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(item) for item in value]
    if hasattr(value, "to_dict") and callable(value.to_dict):
        return to_jsonable(value.to_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.detach().cpu().tolist())
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and callable(value.item):  # NumPy scalars
        return to_jsonable(value.item())
    return str(value)


def write_json(path: str | os.PathLike, results: Mapping[str, Any]) -> Path:
    """Write ``results`` as indented JSON to ``path`` (parent folders created); returns the path.

    The file is written next to its destination and renamed into place, so an interrupted run never leaves a
    truncated results file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(to_jsonable(results), indent=2, allow_nan=False)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text + "\n", encoding="utf-8")
    os.replace(partial, path)
    return path


# ------------------------------------------------------------------------------------------- output paths, safely
class OutputError(ValueError):
    """An output could not be written at the end of a run; the message says where the results were saved instead."""


def _nearest_existing(path: Path) -> Path:
    folder = path.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_output_path(flag: str, path: Any, *, example: str = "results.json") -> None:
    """Refuse, before any work, an output path that cannot be written: an existing directory, a path under a file, a
    place where no file can be created (read-only, no permission). Creates nothing (a probe file is made and removed
    in the nearest existing folder)."""
    import tempfile

    text = os.fspath(path)
    if not text.strip():
        raise ValueError(f"{flag} is empty; name a file, e.g. {flag} {example}.")
    target = Path(text)
    if target.is_dir():
        raise ValueError(f"{flag} {text}: is an existing directory; name a file in it, e.g. {flag} "
                         f"{target / example}.")
    folder = _nearest_existing(target)
    if not folder.is_dir():
        raise ValueError(f"{flag} {text}: '{folder}' is a file, so nothing can be written under it; name a file in "
                         f"a folder, e.g. {flag} {folder.parent / example}.")
    if target.exists() and not os.access(target, os.W_OK):
        raise ValueError(f"{flag} {text}: the file exists and is not writable; choose another name or fix its "
                         "permissions.")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ValueError(f"{flag} {text}: nothing can be written in '{folder}' ({error.strerror or error}); choose "
                         "a writable place.") from None


def check_output_folder(flag: str, path: Any) -> None:
    """Refuse, before any work, an output folder that is a file, lies under a file, or cannot be written in."""
    import tempfile

    target = Path(os.fspath(path))
    if target.exists() and not target.is_dir():
        raise ValueError(f"{flag} {path}: is a file; it must be a folder (created when missing).")
    folder = target if target.is_dir() else _nearest_existing(target)
    if not folder.is_dir():
        raise ValueError(f"{flag} {path}: '{folder}' is a file, so no folder can be made under it.")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ValueError(f"{flag} {path}: nothing can be written in '{folder}' ({error.strerror or error}); choose "
                         "a writable place.") from None


def _resolved(path: Any) -> Path:
    return Path(os.path.expanduser(os.fspath(path))).absolute().resolve()


def check_not_an_input(flag: str, path: Any, inputs: Iterable[tuple[str, Any]] = (),
                       input_folders: Iterable[tuple[str, Any]] = (), *, example: str = "results.json") -> None:
    """Refuse an output path that is one of the run's input files (``inputs``: (what, path) pairs, e.g. ("the
    --prompts file", "p.jsonl"); a None path is skipped) or lies inside one of its input folders (``input_folders``:
    the checkpoint, the base model):
    the results would overwrite the input. Paths are compared resolved (symlinks followed) and, for files that exist,
    by identity (hard links)."""
    target = _resolved(path)
    for what, source in inputs:
        if source is None:
            continue
        same = target == _resolved(source)
        if not same and target.exists() and Path(os.fspath(source)).exists():
            try:
                same = os.path.samefile(target, os.fspath(source))
            except OSError:
                same = False
        if same:
            raise ValueError(f"{flag} {os.fspath(path)}: is {what} ('{os.fspath(source)}'), an input of this run; the "
                             f"results would overwrite it. Name another file, e.g. {flag} {example}.")
    for what, folder in input_folders:
        if folder is None:
            continue
        resolved = _resolved(folder)
        if target == resolved or resolved in target.parents:
            raise ValueError(f"{flag} {os.fspath(path)}: lies inside {what} '{os.fspath(folder)}', an input of this "
                             f"run; writing there would change it. Write outside it, e.g. {flag} {example}.")


def check_output_paths(paths: Mapping[str, Any], examples: Mapping[str, str] | None = None, *,
                       inputs: Iterable[tuple[str, Any]] = (), input_folders: Iterable[tuple[str, Any]] = ()) -> None:
    """:func:`check_output_path` for every ``{flag: path}`` given (None: not asked for), no two naming one file, and
    none naming an input of the run (:func:`check_not_an_input`)."""
    inputs, input_folders = list(inputs), list(input_folders)
    seen: dict[Path, str] = {}
    for flag, path in paths.items():
        if path is None:
            continue
        example = (examples or {}).get(flag, "results.json")
        check_output_path(flag, path, example=example)
        check_not_an_input(flag, path, inputs, input_folders, example=example)
        resolved = _resolved(path)
        if resolved in seen:
            raise ValueError(f"{seen[resolved]} and {flag} both name '{path}'; the second would overwrite the first. "
                             "Give each output its own file.")
        seen[resolved] = flag


def _fallback_json(results: Mapping[str, Any]) -> Path | None:
    """Save ``results`` where it can be: the current folder, else the system's temporary folder."""
    import tempfile
    import time

    name = f"funcprobe-results-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"
    for folder in (Path.cwd(), Path(tempfile.gettempdir())):
        try:
            return write_json(folder / name, results)
        except OSError:
            continue
    return None


def save_outputs(results: Mapping[str, Any], *, out=None, writers=(), echo=print) -> None:
    """Write the results JSON to ``out``, then each ``(flag, path, write)`` of ``writers`` (``write()`` returns the
    path written), echoing each path. The results are never lost: when a write fails (the paths were checked before
    the run, but a disk can fill or a folder vanish), the JSON is saved in the current folder (else the temporary
    one) when ``out`` did not take it, and :class:`OutputError` (a user error: one line, exit 2) says what failed and
    where the results are. An unexpected error of a writer (a bug) is re-raised after the results are saved."""
    failures: list[str] = []
    saved = None
    if out is not None:
        try:
            saved = write_json(out, results)
            echo(f"\nwrote {saved}")
        except OSError as error:
            failures.append(f"--out {out} ({error.strerror or error})")
    for flag, path, write in writers:
        if path is None:
            continue
        try:
            echo(f"wrote {write()}")
        except OSError as error:
            failures.append(f"{flag} {path} ({error.strerror or error})")
        except Exception:
            if saved is None:
                saved = _fallback_json(results)
                if saved is not None:
                    import sys
                    print(f"funcprobe: the results were saved in {saved} before this error.", file=sys.stderr)
            raise
    if failures:
        if saved is None:
            saved = _fallback_json(results)
        where = (f"the results are in {saved}" if saved is not None else
                 "the results could not be saved anywhere (the current and the temporary folder are not writable)")
        raise OutputError(f"could not write {'; '.join(failures)}; {where}.")


def write_probe_outputs(results: Mapping[str, Any], sweep=None, *, out=None, plot=None, echo=print) -> None:
    """Write a probe run's results JSON to ``out`` and the sweep's plot (:func:`plot_lr_sweep`) to ``plot`` (each
    when not None), echoing each path written; a failed write keeps the results (:func:`save_outputs`)."""
    def draw_plot():
        Path(plot).parent.mkdir(parents=True, exist_ok=True)
        return plot_lr_sweep(sweep, plot)

    save_outputs(results, out=out, writers=[("--plot", plot, draw_plot)], echo=echo)


# ----------------------------------------------------------------------------------------------------------- plots
def plot_lr_sweep(result, path: str | os.PathLike, *, z: float = 1.96) -> str:
    """Plot ΔĤ(η) on the evaluation batch (each method run, ±z·SE error bars) against η (log x-axis), with the
    first-order prediction (η/lr)·δĤ₁(E) and its ±z·SE band (the U-statistic's (η/lr)·δH₁ dashed beside it; without
    the held-out estimate the U-statistic's is the line); save to ``path`` and return it.

    SNIS points flagged unreliable are drawn hollow. Needs matplotlib (``pip install matplotlib``, or the
    ``funcprobe[plot]`` extra).
    """
    from .sweep import LRSweepResult

    if not isinstance(result, LRSweepResult):
        raise ValueError(f"plot_lr_sweep takes an LRSweepResult (from lr_sweep); got {type(result).__name__}.")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plot_lr_sweep needs matplotlib, which funcprobe does not install by default: "
                          "pip install matplotlib") from error
    rows = sorted((r for r in result.rows if r.eta > 0), key=lambda r: r.eta)
    fig, ax = plt.subplots(figsize=(6.6, 4.6))
    heldout = result.heldout is not None
    value, value_se = (result.heldout, result.heldout_se) if heldout else (result.deltaH1, result.deltaH1_se)
    if rows and value is not None:
        # The prediction is linear in η: drawn on a dense grid, so that it is a line on the log axis too.
        low, high = min(r.eta for r in rows), max(r.eta for r in rows)
        grid = [low * (high / low) ** (i / 99) for i in range(100)] if high > low else [low]
        y = [eta / result.lr * value for eta in grid]
        ax.plot(grid, y, "-", color="C1", label="first order (η/lr)·δĤ₁(E)" if heldout else "prediction (η/lr)·δH₁")
        if heldout and result.deltaH1 is not None:
            ax.plot(grid, [eta / result.lr * result.deltaH1 for eta in grid], "--", color="0.55", lw=1,
                    label="U-statistic (η/lr)·δH₁ (expected over batches)")
        if value_se is not None and math.isfinite(value_se):
            half = [z * eta / result.lr * value_se for eta in grid]
            ax.fill_between(grid, [v - h for v, h in zip(y, half)], [v + h for v, h in zip(y, half)], color="C1",
                            alpha=0.18, label=f"prediction ±{z:g} SE")
    offset = 1.04 if result.crn and result.snis else 1.0  # side by side when both are drawn
    if result.crn:
        ax.errorbar([r.eta / offset for r in rows], [r.crn_deltaH for r in rows],
                    yerr=[z * r.crn_se if r.crn_se is not None and math.isfinite(r.crn_se) else 0 for r in rows],
                    fmt="s", color="C0", capsize=3, label="ΔĤ realised, common random numbers")
    if result.snis:
        for reliable, style in ((True, dict(fmt="o", color="C2")), (False, dict(fmt="o", color="C2", mfc="none"))):
            chosen = [r for r in rows if bool(r.reliable) == reliable]
            if chosen:
                ax.errorbar([r.eta * offset for r in chosen], [r.snis_deltaH for r in chosen],
                            yerr=[z * r.snis_se if math.isfinite(r.snis_se) else 0 for r in chosen], capsize=3,
                            label=f"ΔĤ realised, importance sampling ({_normalization_label(result.normalize)})"
                                  + ("" if reliable else ", unreliable"), **style)
    ax.axhline(0.0, color="0.6", lw=0.8)
    ax.axvline(result.lr, color="0.75", lw=0.8, ls=":")
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels on a short log axis overlap
    ax.set_xlabel("learning rate η (dotted: the step's lr)")
    ax.set_ylabel("ΔH (nats/token)" if result.per_token else "ΔH (nats/sequence)")
    ax.set_title(f"entropy change of one step: predicted vs realised (evaluation batch B={result.B}, G={result.G})",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return os.fspath(path)


def _normalization_label(normalize: str) -> str:
    from .realised import NORMALIZATION_LABELS

    return NORMALIZATION_LABELS.get(normalize, normalize)


def _symlog_if_heavy(axis_set, values) -> None:
    """Symmetric-log scale when |values| is heavy-tailed (max > 50 × the median of the non-zero |v|)."""
    magnitudes = sorted(abs(v) for v in values if v != 0 and math.isfinite(v))
    if not magnitudes:
        return
    median = magnitudes[len(magnitudes) // 2]
    if magnitudes[-1] > 50 * median:
        axis_set("symlog", linthresh=median)


def _readable_ticks(axis) -> None:
    """Tick labels that cannot run into each other: on a linear axis at most 6 ticks with a shared scientific factor
    (×10⁻⁴ at the axis end, an offset when the values sit far from 0) instead of "-0.00020-0.00015…"; on a
    symmetric-log axis decade ticks labelled ±10ⁿ, at most 7 of them."""
    from matplotlib import ticker

    if axis.get_scale() == "linear":
        formatter = ticker.ScalarFormatter(useMathText=True, useOffset=True)
        formatter.set_powerlimits((-2, 3))
        axis.set_major_locator(ticker.MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
        axis.set_major_formatter(formatter)
    elif axis.get_scale() == "symlog":
        transform = axis.get_transform()
        axis.set_major_locator(ticker.SymmetricalLogLocator(transform=transform, subs=[1.0]))
        axis.set_major_formatter(ticker.LogFormatterSciNotation(base=10, labelOnlyBase=True,
                                                                linthresh=transform.linthresh))
        axis.set_minor_formatter(ticker.NullFormatter())


def _thin_ticks(axis, limit: int) -> None:
    """Keep every k-th major tick so that at most ``limit`` remain (after the axis limits are known). On a
    symmetric-log axis, ticks inside the linear region other than 0 (|t| < linthresh, where decades are squeezed
    together next to 0: "10⁻³" on top of "0") are dropped first."""
    from matplotlib import ticker

    low, high = axis.get_view_interval()
    ticks = [t for t in axis.get_majorticklocs() if low <= t <= high]
    if axis.get_scale() == "symlog":
        linthresh = axis.get_transform().linthresh
        inside = [t for t in ticks if t != 0 and abs(t) < linthresh * (1 - 1e-9)]
        if inside:
            ticks = [t for t in ticks if t not in inside]
            axis.set_major_locator(ticker.FixedLocator(ticks))
    if len(ticks) > limit:
        step = -(-len(ticks) // limit)
        keep = [t for i, t in enumerate(ticks) if (i - ticks.index(min(ticks, key=abs))) % step == 0]
        axis.set_major_locator(ticker.FixedLocator(keep))


def plot_attribution(results: Mapping[str, Any], path: str | os.PathLike) -> str:
    """Two scatter panels over the update batch's response tokens (spec §8): the attribution a against Cui et al.'s
    covariance proxy −η·cov (η = η_g, or 1 with per-group learning rates, as ``proxy_summary``), and a against the
    next-token entropy; Pearson/Spearman (from the results' summary) in the titles. Axes of heavy-tailed values are
    symmetric-log. ``results``: ``funcprobe attribute``'s dict (or its "attribution" entry). Saves to ``path``,
    returns it. Needs matplotlib."""
    attribution = results.get("attribution", results)
    if not isinstance(attribution, Mapping) or "token" not in attribution:
        raise ValueError("plot_attribution takes the results of `funcprobe attribute` (or their 'attribution' "
                         "entry, AttributionResult.to_dict()).")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plot_attribution needs matplotlib, which funcprobe does not install by default: "
                          "pip install matplotlib") from error
    eta = 1.0 if attribution.get("eta_g") is None else float(attribution["eta_g"])
    a, pred, entropy = [], [], []
    for p_tok, p_mask, p_cov, p_h in zip(attribution["token"], attribution["response_mask"],
                                         attribution["covariance"], attribution["entropy"]):
        for s_tok, s_mask, s_cov, s_h in zip(p_tok, p_mask, p_cov, p_h):
            for value, m, c, h in zip(s_tok, s_mask, s_cov, s_h):
                if m:
                    a.append(value)
                    pred.append(-eta * c)
                    entropy.append(h)
    corr = (attribution.get("summary") or {}).get("correlations", {})
    eta_label = "η" if attribution.get("eta_g") is not None else "1"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    panels = ((axes[0], pred, f"covariance proxy −{eta_label}·cov (Cui et al.)", "cov"),
              (axes[1], entropy, "next-token entropy H (nats)", "entropy"))
    for ax, x, label, key in panels:
        ax.scatter(x, a, s=9, alpha=0.55, color="C0", edgecolors="none")
        ax.axhline(0.0, color="0.6", lw=0.8)
        if key == "cov":
            ax.axvline(0.0, color="0.6", lw=0.8)
            _symlog_if_heavy(ax.set_xscale, x)
        _symlog_if_heavy(ax.set_yscale, a)
        for axis in (ax.xaxis, ax.yaxis):
            _readable_ticks(axis)
        ax.set_xlabel(label)
        ax.set_ylabel("attribution a (nats/sequence)")
        ax.set_title(f"a vs {'−η·cov' if key == 'cov' else 'entropy'}: Pearson {fmt(corr.get(f'pearson_{key}'), '.3g')}, "
                     f"Spearman {fmt(corr.get(f'spearman_{key}'), '.3g')}", fontsize=10)
        ax.grid(alpha=0.25)
    name = "δĤ₁(E)" if attribution.get("basis") == "heldout" else "δH₁ (U-statistic)"
    fig.suptitle(f"which tokens drive {name} = {fmt(attribution.get('deltaH1'), '.4g')} "
                 f"(grad_term {fmt(attribution.get('grad_term'), '.4g')}; {len(a)} response tokens)", fontsize=11)
    for ax in axes:
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() == "symlog":
                _thin_ticks(axis, 7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.fspath(path)
