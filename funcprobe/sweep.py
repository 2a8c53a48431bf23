"""The learning-rate sweep: ΔĤ(η) on the evaluation batch beside the first-order prediction (η/lr)·δĤ₁(E) (spec §4–§6,
§9).

Every term of the AdamW step Δθ is proportional to its learning rate (spec §4), so the step at another learning rate η
is θ(η) = θ + (η/lr)·Δθ (``adam.scaled_update``), and the first-order prediction scales the same way:
δĤ₁(E)(η) = (η/lr)·δĤ₁(E) (the held-out estimate of spec §9, on the same E: each η's realised change is paired with it
per prompt, ``heldout.paired_difference``); the U-statistic δH₁ is scaled beside it when given. The sweep evaluates the realised change ΔĤ(η) = Ĥ(θ(η)) − Ĥ(θ) on the evaluation batch E — by
importance sampling, by common random numbers, or both (``funcprobe.realised``) — at each η, and sets it beside
the prediction: where the two part, the step has left the first-order regime (or the importance weights have
degenerated, which the SNIS diagnostics say).

What is computed once for the whole sweep: the step Δθ (given: an ``UpdateDecomposition`` from ``update_direction``
or from δH₁'s own pass over the update batch, so Ȳ is not recomputed), S(θ) on E (and the entropies at θ), and the
CRN integrand on y at θ. Per η: S(θ(η)) on E (SNIS) and/or one redraw at θ(η) with the same uniforms and its entropy
pass (CRN).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from .adam import UpdateDecomposition, scaled_update
from .batch import RolloutBatch, as_rollout_batch, check_same_evaluation
from .formatting import fmt as _fmt
from .heldout import FIRST_ORDER_Z, HeldoutResult, paired_difference
from .policy import Policy
from .realised import (INTEGRANDS, CRNResult, SNISResult, check_snis_options, crn_delta_h, default_estimator,
                       default_normalize,
                       integrand_values, snis_delta_h, values_before)

__all__ = ["METHODS", "LRSweepRow", "LRSweepResult", "lr_sweep", "realised_changes"]

#: Realised-change estimators a sweep (and the command) can run: importance sampling, common random numbers, both.
METHODS = ("snis", "crn", "both")

ParamsDict = Mapping[str, Tensor]


def realised_changes(params: ParamsDict, update: ParamsDict, sample: Any, *, method: str, policy: Policy,
                     snis: Mapping[str, Any] | None = None, crn: Mapping[str, Any] | None = None,
                     timed: Callable[[str, Callable[[], Any]], Any] | None = None,
                     **options: Any) -> dict[str, SNISResult | CRNResult]:
    """The realised change ΔĤ from θ = ``params`` to θ⁺ = ``update`` on the evaluation sample E by ``method``
    ("snis", "crn" or "both"; spec §6): {"crn": CRNResult, "snis": SNISResult}, the methods run, in that order.

    The one place that turns a method name into estimator calls (the command, the demos, ``Probe.realised`` and
    ``lr_sweep`` all go through it; a new estimator of the realised change is added here). ``sample``: a
    ``SampledBatch`` (or ``Responses``), which CRN needs for its redraw, or a bare ``RolloutBatch`` for SNIS.
    ``options`` (seq_chunk, token_chunk, progress, world) go to every method; ``snis`` and ``crn`` are each method's
    own keyword arguments (e.g. ``crn={"prompt_chunk": 4}``, ``snis={"before": ...}``), and win over ``options``.
    ``timed(phase, fn)``: runs each method, e.g. to time it as ``realised_crn`` / ``realised_snis``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}.")
    timed = timed or (lambda phase, fn: fn())
    batch = as_rollout_batch(sample, "sample")
    out: dict[str, SNISResult | CRNResult] = {}
    if method in ("crn", "both"):
        out["crn"] = timed("realised_crn", lambda: crn_delta_h(params, update, policy=policy, sample=sample,
                                                               **{**options, **(crn or {})}))
    if method in ("snis", "both"):
        out["snis"] = timed("realised_snis", lambda: snis_delta_h(params, update, policy=policy, batch=batch,
                                                                  **{**options, **(snis or {})}))
    return out


@dataclass(frozen=True)
class LRSweepRow:
    """One learning rate of a sweep: the prediction and the realised change by each method run.

    ``predicted``/``predicted_se``: (η/lr)·δĤ₁(E) and its SE when the held-out estimate was given, else (η/lr)·δH₁;
    ``predicted_ustatistic``, ``predicted_plugin``: (η/lr)·δH₁ and (η/lr)·deltaH1_plugin (None without a U-statistic
    prediction). ``paired_difference``, ``paired_se``, ``paired_z``, ``first_order``: ΔĤ − (η/lr)·δĤ₁(E) on the same
    prompts with its paired SE and the verdict (spec §9), for the realised method shown first (SNIS when run, else CRN;
    None without the held-out estimate). ``snis_*``: ΔĤ, SE and the weight diagnostics of importance sampling (None
    when not run); ``crn_*``: ΔĤ, SE and the fraction of changed draws of common random numbers (None when not run).
    """

    eta: float
    factor: float
    predicted: float | None
    predicted_se: float | None
    predicted_plugin: float | None
    predicted_ustatistic: float | None = None
    paired_difference: float | None = None
    paired_se: float | None = None
    paired_z: float | None = None
    first_order: bool | None = None
    snis_deltaH: float | None = None
    snis_se: float | None = None
    ess_min_fraction: float | None = None
    khat: float | None = None
    khat_assessed: bool | None = None
    reliable: bool | None = None
    reason: str | None = None
    crn_deltaH: float | None = None
    crn_se: float | None = None
    changed_fraction: float | None = None
    crn_reliable: bool | None = None


@dataclass(frozen=True)
class LRSweepResult:
    """ΔĤ(η) for θ(η) = θ + (η/lr)·Δθ over a list of learning rates, beside δH₁(η) (spec §4–§6).

    Fields: ``lr`` the step's own learning rate (Δθ is the step at lr); ``rows`` one :class:`LRSweepRow` per η (in
    the order given); ``snis`` and ``crn`` the full results of each method per η (empty when not run); ``method``;
    ``H_before`` Ĥ(θ) on the evaluation batch; ``prediction`` "deltaH1_heldout" (the rows' ``predicted`` is
    (η/lr)·δĤ₁(E)), "deltaH1" (the U-statistic) or "none"; ``deltaH1``, ``deltaH1_se``, ``deltaH1_plugin`` the
    U-statistic at η = lr and ``heldout``, ``heldout_se`` the held-out estimate there (None when not given); the
    settings; ``B``, ``G`` of the evaluation batch; pass counts.
    """

    lr: float
    rows: tuple[LRSweepRow, ...]
    snis: tuple[SNISResult, ...]
    crn: tuple[CRNResult, ...]
    method: str
    H_before: float
    prediction: str
    deltaH1: float | None
    deltaH1_se: float | None
    deltaH1_plugin: float | None
    normalize: str
    estimator: str
    integrand: str
    per_token: bool
    B: int
    G: int
    forward_passes: int
    sampling_passes: int
    timings: dict[str, float] = field(default_factory=dict)
    heldout: float | None = None
    heldout_se: float | None = None

    def to_dict(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.__dataclass_fields__ if name not in ("rows", "snis", "crn")}
        data["rows"] = [asdict(row) for row in self.rows]
        data["snis"] = [result.to_dict() for result in self.snis]
        data["crn"] = [result.to_dict() for result in self.crn]
        data["timings"] = dict(self.timings)
        return data

    def __str__(self) -> str:
        what = {"deltaH1_heldout": "(η/lr)·δĤ₁(E)", "deltaH1": "(η/lr)·δH₁ (U-statistic)"}.get(self.prediction,
                                                                                               self.prediction)
        head = (f"ΔH(η) sweep on the evaluation batch — lr={_fmt(self.lr, '.4g')}, method={self.method}, "
                f"B={self.B}, G={self.G}, Ĥ(θ)={_fmt(self.H_before)}; prediction: {what}")
        columns = ["η", "η/lr", "predicted", "pred. SE"]
        paired = any(r.paired_difference is not None for r in self.rows)
        if paired:
            columns += ["ΔH − pred.", "paired SE"]
        if self.snis:
            columns += ["ΔH SNIS", "SE", "ESS/G min", "k̂", "reliable"]
        if self.crn:
            columns += ["ΔH CRN", "SE", "changed", "CRN reliable"]
        lines = [head, "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for r in self.rows:
            cells = [_fmt(r.eta, ".4g"), _fmt(r.factor, ".4g"), _fmt(r.predicted), _fmt(r.predicted_se, ".3g")]
            if paired:
                cells += [_fmt(r.paired_difference, ".4g"), _fmt(r.paired_se, ".3g")]
            if self.snis:
                cells += [_fmt(r.snis_deltaH), _fmt(r.snis_se, ".3g"), _fmt(r.ess_min_fraction, ".3f"),
                          _fmt(r.khat, ".3f") if r.khat_assessed else "n/a", "yes" if r.reliable else "NO"]
            if self.crn:
                cells += [_fmt(r.crn_deltaH), _fmt(r.crn_se, ".3g"), _fmt(r.changed_fraction, ".3f"),
                          "yes" if r.crn_reliable else "NO"]
            lines.append("| " + " | ".join(cells) + " |")
        beyond = [r for r in self.rows if r.first_order is False]
        if beyond:
            lines.append(f"beyond the first-order regime (|ΔH − pred.| ≥ {FIRST_ORDER_Z:g} paired SEs) at η = "
                         f"{', '.join(_fmt(r.eta, '.4g') for r in beyond)}")
        unreliable = [r for r in self.rows if r.reliable is False]
        if unreliable:
            lines.append(f"SNIS unreliable at η = {', '.join(_fmt(r.eta, '.4g') for r in unreliable)}: "
                         f"{unreliable[0].reason}")
        for row, result in zip(self.rows, self.crn):
            if not result.reliable:
                lines.append(f"CRN unreliable at η = {_fmt(row.eta, '.4g')}: {result.reason}")
        lines.append(f"{self.forward_passes} forward passes, {self.sampling_passes} sampling passes; "
                     + ", ".join(f"{k} {v:.3f}s" for k, v in self.timings.items()))
        return "\n".join(lines)


def _check_etas(etas: Any) -> list[float]:
    try:
        values = [float(eta) for eta in etas]
    except (TypeError, ValueError):
        raise ValueError(f"etas must be a sequence of learning rates; got {etas!r}.") from None
    if not values:
        raise ValueError("etas is empty; pass at least one learning rate, e.g. etas=[1e-5, 1e-4, 1e-3].")
    bad = [eta for eta in values if not (math.isfinite(eta) and eta >= 0)]
    if bad:
        raise ValueError(f"etas must be finite and ≥ 0; got {bad}.")
    return values


def step_learning_rate(step: UpdateDecomposition) -> float:
    """The one learning rate of the step, > 0 (ValueError naming the fix otherwise): the sweep scales Δθ by η/lr."""
    try:
        lr = step.lr
    except ValueError as error:
        raise ValueError(f"the sweep needs one learning rate shared by all tensors to scale the step by η/lr: "
                         f"{error}. Pass lr= to override every group's learning rate.") from None
    if not lr > 0:
        raise ValueError(f"the step's learning rate is {lr}: the step is zero and η/lr is undefined (the end of a "
                         "decaying schedule?). Pass the learning rate to sweep around with lr= (funcprobe probe --lr).")
    return lr


def lr_sweep(params: ParamsDict, sample: Any, *, policy: Policy, step: UpdateDecomposition, etas: Sequence[float],
             prediction: Any = None, heldout: Any = None, method: str = "snis", normalize: str | None = None,
             estimator: str | None = None,
             per_token: bool = False, clip: float | None = None, integrand: str = "rao_blackwell",
             seq_chunk: int | None = None, token_chunk: int | None = None, prompt_chunk: int = 8,
             progress: bool | None = False, world=None) -> LRSweepResult:
    """ΔĤ(η) on the evaluation sample for the step's direction at several learning rates η (spec §4–§6).

    Args:
        params: θ, at which ``sample`` was drawn.
        sample: the evaluation sample E (drawn independently of the update batch): a ``SampledBatch`` (or
            ``Responses``) — needed for ``method`` "crn"/"both", whose redraws repeat its draw — or a bare
            ``RolloutBatch`` for "snis".
        policy: the ``Policy``.
        step: the step's decomposition Δθ = η_g P⊙Ȳ + Δθ_state at its learning rate lr (``update_direction(params,
            update_batch, ...)``, or ``DeltaH1Result.step`` from δH₁'s own pass): θ(η) = θ + (η/lr)·Δθ.
        etas: the learning rates (≥ 0).
        prediction: δH₁ of the same step (a ``DeltaH1Result``, or anything with ``deltaH1``, ``se_deltaH1``,
            ``deltaH1_plugin`` and ``lr``): (η/lr)·δH₁ in ``predicted_ustatistic`` (and in ``predicted`` without
            ``heldout``). None: none.
        heldout: δĤ₁(E) of the same step on the same evaluation batch (``delta_h1_heldout``, a ``HeldoutResult``):
            predicted(η) = (η/lr)·δĤ₁(E), SE (η/lr)·SE, and each η's realised change paired with it per prompt; with
            ``per_token`` its per-token values (``delta_h1_heldout(..., per_token=True)``, else ValueError).
            Refused (ValueError naming both fingerprints) when it records another batch's fingerprint
            (``HeldoutResult.evaluation_fingerprint`` against ``sample``'s batch: token ids, masks, B, G, τ).
        method: "snis", "crn" or "both"; normalize, estimator, per_token, clip: the SNIS options (estimator None:
            ``realised.default_estimator``); integrand: CRN's.
        seq_chunk, token_chunk, prompt_chunk, progress, world: as for ``snis_delta_h`` and ``crn_delta_h``.

    Everything at θ (S, entropies, the CRN integrand) is computed once; per η one pass for SNIS (S, and for
    Rao-Blackwell the entropies from the same forward), one redraw and one entropy pass for CRN. Raises ValueError for a bad option, an empty
    or negative η list, a step with several learning rates or lr = 0, a prediction made at another lr, a ``heldout``
    of another evaluation batch, or a sample without its draw spec for CRN — all before any forward pass.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}.")
    normalize = default_normalize(normalize, per_token)
    estimator = default_estimator(normalize, estimator)
    clip = check_snis_options(normalize, estimator, per_token, clip)
    if integrand not in INTEGRANDS:
        raise ValueError(f"integrand must be one of {INTEGRANDS}; got {integrand!r}.")
    eta_values = _check_etas(etas)
    lr = step_learning_rate(step)
    run_snis, run_crn = method in ("snis", "both"), method in ("crn", "both")
    if run_crn and (getattr(sample, "spec", None) is None or isinstance(sample, RolloutBatch)):
        raise ValueError(f"lr_sweep(method={method!r}) needs the evaluation sample with its draw (a SampledBatch from "
                         "sample_batch, or Responses from draw_responses): common random numbers redraw it at each η "
                         f"with the same uniforms; got {type(sample).__name__}.")
    batch = as_rollout_batch(sample, "lr_sweep: sample")
    policy.check_params(params, "params")
    h1 = h1_se = h1_plugin = None
    if prediction is not None and not per_token:
        missing = [a for a in ("deltaH1", "se_deltaH1", "deltaH1_plugin") if not hasattr(prediction, a)]
        if missing:
            raise ValueError(f"prediction is a {type(prediction).__name__} without {missing}; pass the DeltaH1Result "
                             "of the same step.")
        other_lr = getattr(prediction, "lr", None)
        if isinstance(other_lr, (int, float)) and not math.isclose(other_lr, lr, rel_tol=1e-9):
            raise ValueError(f"the prediction was made for a step at lr={other_lr} but the sweep's step uses lr={lr}; "
                             "give both the same AdamState, lr and max_grad_norm.")
        h1, h1_se, h1_plugin = (float(prediction.deltaH1), float(prediction.se_deltaH1),
                                float(prediction.deltaH1_plugin))

    if heldout is not None:
        if not isinstance(heldout, HeldoutResult):
            raise TypeError(f"heldout must be the HeldoutResult of delta_h1_heldout on the same evaluation batch; got "
                            f"{type(heldout).__name__}.")
        if (heldout.B, heldout.G) != (batch.B, batch.G):
            raise ValueError(f"heldout was computed on a {heldout.B}×{heldout.G} batch, the sweep's evaluation batch "
                             f"is {batch.B}×{batch.G}: pass δĤ₁(E) of the same evaluation batch.")
        check_same_evaluation(heldout.evaluation_fingerprint, batch.fingerprint, "heldout (δĤ₁(E))",
                              "the sweep's evaluation sample", "pass heldout=delta_h1_heldout(params, step, sample, "
                              "...) of this sample, or sweep the sample heldout was computed on")
        if per_token and heldout.deltaH1_per_token is None:
            raise ValueError("lr_sweep(per_token=True) draws (η/lr)·δĤ₁(E) per token beside the per-token realised "
                             "change, but heldout holds δĤ₁(E) per response only: compute it with "
                             "delta_h1_heldout(..., per_token=True), or sweep with per_token=False.")

    heldout_value = None if heldout is None else (
        (heldout.deltaH1_per_token, heldout.se_per_token) if per_token else (heldout.deltaH1, heldout.se))
    started = time.perf_counter()
    chunks = dict(seq_chunk=seq_chunk, token_chunk=token_chunk, progress=progress)
    timings: dict[str, float] = {}
    forward_passes = 0
    before = crn_before = None
    if run_snis:
        start = time.perf_counter()
        before = values_before(params, batch, policy=policy, logprobs=True, entropies=estimator == "rao_blackwell",
                               chunks=chunks, world=world)
        timings["before_snis"] = time.perf_counter() - start
        forward_passes += 1  # S and, for Rao-Blackwell, the entropies: one pass (realised.passes._values)
    if run_crn:
        start = time.perf_counter()
        crn_before = integrand_values(policy, params, batch, integrand, world=world, **chunks)
        timings["before_crn"] = time.perf_counter() - start
        forward_passes += 1
    delta = step.delta_theta()

    rows, snis_results, crn_results = [], [], []
    for eta in eta_values:
        factor = eta / lr
        update = scaled_update(params, delta, factor)
        changes = realised_changes(
            params, update, sample, method=method, policy=policy, world=world, **chunks,
            snis=dict(normalize=normalize, per_token=per_token, estimator=estimator, clip=clip, before=before),
            crn=dict(integrand=integrand, before=crn_before, prompt_chunk=prompt_chunk))
        snis, crn = changes.get("snis"), changes.get("crn")
        snis_results += [snis] if snis is not None else []
        crn_results += [crn] if crn is not None else []
        for result in (snis, crn):
            if result is None:
                continue
            forward_passes += result.forward_passes
            for phase, seconds in result.timings.items():
                if phase != "total":
                    key = f"{result.method}_{phase}"
                    timings[key] = timings.get(key, 0.0) + seconds
        predicted = None if h1 is None else factor * h1
        predicted_se = None if h1_se is None else abs(factor) * h1_se
        pair = None
        if heldout is not None:  # in the realised change's unit: per response, or per token
            value, se = heldout_value
            predicted, predicted_se = factor * value, abs(factor) * se
            primary = snis if snis is not None else crn
            if bool(getattr(primary, "per_token", False)) == per_token:
                pair = paired_difference(primary, heldout, scale=factor)
        rows.append(LRSweepRow(
            eta=eta, factor=factor, predicted=predicted, predicted_se=predicted_se,
            predicted_plugin=None if h1_plugin is None else factor * h1_plugin,
            predicted_ustatistic=None if h1 is None else factor * h1,
            paired_difference=None if pair is None else pair.difference,
            paired_se=None if pair is None else pair.se, paired_z=None if pair is None else pair.z,
            first_order=None if pair is None else pair.first_order,
            snis_deltaH=None if snis is None else snis.deltaH, snis_se=None if snis is None else snis.se,
            ess_min_fraction=None if snis is None else snis.ess_min_fraction,
            khat=None if snis is None else snis.khat, khat_assessed=None if snis is None else snis.khat_assessed,
            reliable=None if snis is None else snis.reliable, reason=None if snis is None else snis.reason,
            crn_deltaH=None if crn is None else crn.deltaH, crn_se=None if crn is None else crn.se,
            changed_fraction=None if crn is None else crn.changed_fraction,
            crn_reliable=None if crn is None else crn.reliable))
    timings["total"] = time.perf_counter() - started
    H_before = snis_results[0].H_before if snis_results else crn_results[0].H_before
    return LRSweepResult(lr=lr, rows=tuple(rows), snis=tuple(snis_results), crn=tuple(crn_results), method=method,
                         H_before=H_before,
                         prediction="deltaH1_heldout" if heldout is not None else ("none" if h1 is None else "deltaH1"),
                         heldout=None if heldout is None else heldout_value[0],
                         heldout_se=None if heldout is None else heldout_value[1], deltaH1=h1,
                         deltaH1_se=h1_se, deltaH1_plugin=h1_plugin, normalize=normalize, estimator=estimator,
                         integrand=integrand, per_token=per_token, B=batch.B, G=batch.G,
                         forward_passes=forward_passes, sampling_passes=len(crn_results), timings=timings)
