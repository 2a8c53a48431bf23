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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["summary", "summary_table", "format_report", "versions", "peak_memory", "reset_peak_memory",
           "to_jsonable", "write_json"]


# ------------------------------------------------------------------------------------------------------ the summary
def summary(prediction, realised=None) -> dict[str, Any]:
    """The numbers of the summary table: δH₁ (a ``DeltaH1Result``) and ΔH (an ``SNISResult``, optional).

    Keys: ``B``, ``G``, ``lr``, ``units``, ``n_units``; ``deltaH1``, ``se_deltaH1``, ``grad_term``,
    ``se_grad_term``, ``state_term``, ``deltaH1_plugin``; and with ΔH: ``H_before``, ``H_after``, ``deltaH``,
    ``se_deltaH``, ``difference`` = ΔH − δH₁, ``ratio`` = ΔH / δH₁ (NaN when δH₁ = 0), the importance-weight
    diagnostics (``ess_min_fraction``, ``ess_global_fraction``, ``khat``, ``khat_threshold``, ``khat_assessed``)
    and the verdict ``reliable`` / ``reason``.
    """
    data: dict[str, Any] = {
        "B": prediction.B, "G": prediction.G, "lr": prediction.lr, "eta_g": prediction.eta_g,
        "units": prediction.units, "n_units": prediction.n_units,
        "deltaH1": prediction.deltaH1, "se_deltaH1": prediction.se_deltaH1,
        "grad_term": prediction.grad_term, "se_grad_term": prediction.se_grad_jack,
        "state_term": prediction.state_term, "deltaH1_plugin": prediction.deltaH1_plugin,
    }
    if realised is not None:
        difference = realised.deltaH - prediction.deltaH1
        data.update({
            "normalize": realised.normalize, "estimator": realised.estimator, "per_token": realised.per_token,
            "H_before": realised.H_before, "H_after": realised.H_after,
            "deltaH": realised.deltaH, "se_deltaH": realised.se,
            "difference": difference,
            "ratio": realised.deltaH / prediction.deltaH1 if prediction.deltaH1 != 0 else math.nan,
            "ess_min_fraction": realised.ess_min_fraction, "ess_global_fraction": realised.ess_global_fraction,
            "khat": realised.khat, "khat_threshold": realised.khat_threshold,
            "khat_assessed": realised.khat_assessed, "reliable": realised.reliable, "reason": realised.reason,
        })
    return data


def _num(value: Any, spec: str = ".6g") -> str:
    if value is None:
        return "—"
    return format(value, spec)


def _label(text: str, width: int = 34) -> str:
    """``text`` left-justified to ``width`` columns, not counting combining marks (the hat of k̂, the bar of X̄)."""
    shown = sum(not unicodedata.combining(ch) for ch in text)
    return text + " " * max(width - shown, 0)


def summary_table(prediction, realised=None, *, title: str | None = None) -> str:
    """A readable table of the predicted (δH₁) and realised (ΔH) entropy change of the step, with SEs.

    ``prediction``: a ``DeltaH1Result``; ``realised``: an ``SNISResult`` of the same step on the same batch (or
    None). Entropies are in nats per sequence (per token for a per-token ΔH).
    """
    s = summary(prediction, realised)
    unit = "nats/token" if s.get("per_token") else "nats/sequence"
    head = title or "entropy change of one AdamW step"
    lines = [f"{head} — B={s['B']} prompts × G={s['G']} responses, lr={_num(s['lr'], '.4g')}, "
             f"units={s['units']} (U={s['n_units']}), {unit}",
             f"{_label('quantity')}{'value':>14}{'SE':>12}",
             f"{_label('δH₁ predicted (first order)')}{s['deltaH1']:>14.6g}{s['se_deltaH1']:>12.4g}",
             f"{_label('  gradient term −η_g·U_cross')}{s['grad_term']:>14.6g}{s['se_grad_term']:>12.4g}",
             f"{_label('  optimizer-state term')}{s['state_term']:>14.6g}",
             f"{_label('  plug-in −X̄·Δθ (biased)')}{s['deltaH1_plugin']:>14.6g}"]
    if realised is not None:
        realised_label = f"ΔH realised (IS, {s['normalize']})"
        lines += [f"{_label('H(θ)')}{s['H_before']:>14.6g}",
                  f"{_label('H(θ⁺)')}{s['H_after']:>14.6g}",
                  f"{_label(realised_label)}{s['deltaH']:>14.6g}{s['se_deltaH']:>12.4g}",
                  f"{_label('ΔH − δH₁')}{s['difference']:>14.6g}",
                  f"{_label('ΔH / δH₁')}{s['ratio']:>14.4g}"]
        khat = f"k̂ {s['khat']:.3f} (threshold {s['khat_threshold']:.3f}" + \
            ("" if s["khat_assessed"] else ", not assessed") + ")"
        lines.append(f"weights: ESS/G min {s['ess_min_fraction']:.3f}, ESS/(BG) {s['ess_global_fraction']:.3f}, "
                     f"{khat}; reliable: " + ("yes" if s["reliable"] else f"NO — {s['reason']}"))
    return "\n".join(lines)


def format_report(prediction, realised=None, sweep=None, *, details: bool = False) -> str:
    """The summary table, then (``details``) the full δH₁ and ΔH tables, then the learning-rate sweep's table."""
    parts = []
    if details:
        parts.append(str(prediction))
        if realised is not None:
            parts.append(str(realised))
    parts.append(summary_table(prediction, realised))
    if sweep is not None:
        parts.append(str(sweep))
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------------------------- run information
def versions() -> dict[str, str]:
    """Versions of funcprobe, torch, transformers, peft and Python (a package that is missing reads "absent")."""
    from . import __version__

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
    """Plain JSON types for results: ``to_dict()`` objects, dataclasses, tensors, dtypes, devices, paths, tuples.

    Non-finite floats stay as they are (``json.dumps`` writes NaN / Infinity), as in the rest of funcprobe.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
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
        return value.item()
    return str(value)


def write_json(path: str | os.PathLike, results: Mapping[str, Any]) -> Path:
    """Write ``results`` as indented JSON to ``path`` (parent folders created); returns the path.

    The file is written next to its destination and renamed into place, so an interrupted run never leaves a
    truncated results file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(to_jsonable(results), indent=2)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text + "\n", encoding="utf-8")
    os.replace(partial, path)
    return path
