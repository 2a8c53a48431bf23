"""ΔH by common random numbers on the evaluation sample (spec §6).

* **Common random numbers** (:func:`crn_delta_h`): y ∼ π_θ (the evaluation batch) and y⁺ ∼ π_θ⁺ are drawn from the
  same uniforms, prompt by prompt, draw by draw and position by position (``sampling.redraw``), and the
  Rao-Blackwell entropies R_θ(y) = Σ_k H(π_θ(· | y_<k)) along the two paths are differenced:

      ΔĤ = (1/N) Σ_i [R_θ⁺(y⁺_i) − R_θ(y_i)],    SE = sd_n(mean_g[R⁺ − R]) / sqrt(B)

  Each term is an unbiased Monte-Carlo estimate of a sequence entropy (the chain rule: H_seq = Σ_k E[H_k]), so the
  difference is unbiased at any step size and needs no weights: it stays valid where importance weights degenerate.
  The shared uniforms make R⁺ and R strongly correlated: a draw that does not change (y⁺ = y) contributes only the
  smooth change of the entropies along a fixed path. The integrand matters: with −S instead of R, a draw that
  changes contributes a difference of two unrelated surprisals (``integrand="sequence"``, for comparison only).
  Costs a sampling pass at θ⁺ and two entropy passes (one at θ, shared by a sweep). ``changed_fraction`` reports the
  fraction of draws with y⁺ ≠ y.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..batch import RolloutBatch, as_rollout_batch
from ..formatting import fmt as _fmt
from ..policy import Policy
from ..sampling import redraw
from ._common import ParamsDict, _check_values, _chunks, _Clock, _require_policy, _se, _tuple
from .passes import sharded_pass

__all__ = ["INTEGRANDS", "CRN_MIN_CHANGED", "CRN_MAX_TOP_SHARE", "CRNResult", "integrand_values", "crn_delta_h",
           "crn_from_draws"]

#: CRN integrands: the Rao-Blackwell entropies along the path (default), or −S (for comparison: far noisier).
INTEGRANDS = ("rao_blackwell", "sequence")

#: CRN's SE is trusted only when at least this many draws changed (y⁺ ≠ y), or none moved at all. The difference
#: R⁺(y⁺) − R(y) is a mixture: small smooth changes along paths that did not change, and rare large jumps (two
#: unrelated paths after a switch) that carry the path-distribution part of ΔH. With few jumps, that part and its
#: variance rest on a handful of values, and the SE over prompts can understate the error many times (seen on the
#: demo policy: an SE of 2e-5 from 1 changed draw in 24, against a spread of 9e-3 with 50 in 1536).
CRN_MIN_CHANGED = 10

#: CRN's SE is not trusted when one draw carries more than this share of the sum of squared deviations of the draws'
#: differences: a path switch at the stop token (a response that becomes much longer or shorter) contributes a
#: difference of several nats beside hundreds of near-zero ones, and a mean over such heavy-tailed draws has an SE
#: that the sample cannot estimate (seen on the demo policy: two prompts at 1.6 and 6.5 nats among thirty near 0).
CRN_MAX_TOP_SHARE = 0.5


@dataclass(frozen=True)
class CRNResult:
    """ΔĤ of one step by common random numbers (spec §6). JSON-ready through ``to_dict()``.

    Fields:
        deltaH, se: ΔĤ = mean_i [f⁺(y⁺_i) − f(y_i)] and SE = sd_n(ΔĤ_n)/sqrt(B) (NaN for B < 2).
        H_before, H_after: the mean integrand on y at θ and on y⁺ at θ⁺ (nats per sequence): Ĥ(θ), Ĥ(θ⁺).
        deltaH_per_prompt, H_before_per_prompt, H_after_per_prompt: per-prompt means [B].
        changed_fraction: the fraction of the B·G draws with y⁺ ≠ y; changed_count: their number;
            changed_per_prompt: per prompt [B].
        top_share: the largest share of Σ_i (d_i − d̄)² that one draw's difference d_i carries.
        reliable, reason: False when fewer than CRN_MIN_CHANGED draws changed (unless none moved at all: the jump
            part of the estimate would rest on a handful of values), or when one draw carries more than
            CRN_MAX_TOP_SHARE of the variance (a heavy tail the SE cannot see).
        integrand: "rao_blackwell" (R = Σ_k H(π(·|y_<k)), default) or "sequence" (−S).
        B, G, forward_passes (entropy or log-prob passes), sampling_passes (1: the draw at θ⁺), timings.
        evaluation_fingerprint: the fingerprint (``funcprobe.batch.batch_fingerprint``) of the draw y at θ, the
            evaluation batch E. CRN's ΔĤ_n pairs f_θ⁺(y⁺) − f_θ(y) prompt by prompt, and δĤ₁(E) is computed on the
            same y (the sample's ``.batch``): y is what "the same E" means. The prompts and the uniforms (the
            ``DrawSpec``: prompts and seed) would not do — the same spec drawn at another θ is another sample — and
            y⁺ is no batch of its own but a function of E's prompts, uniforms and θ⁺. ``paired_difference`` and
            ``lr_sweep`` refuse a δĤ₁(E) of another batch. None when unknown (built by hand: nothing is checked).
    """

    deltaH: float
    se: float
    H_before: float
    H_after: float
    deltaH_per_prompt: tuple[float, ...]
    H_before_per_prompt: tuple[float, ...]
    H_after_per_prompt: tuple[float, ...]
    changed_fraction: float
    changed_count: int
    changed_per_prompt: tuple[float, ...]
    top_share: float
    reliable: bool
    reason: str
    integrand: str
    B: int
    G: int
    forward_passes: int
    sampling_passes: int
    timings: dict[str, float] = field(default_factory=dict)
    method: str = "crn"
    evaluation_fingerprint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("deltaH_per_prompt", "H_before_per_prompt", "H_after_per_prompt", "changed_per_prompt"):
            data[name] = list(data[name])
        data["notes"] = {"se": "a standard error over prompts needs B ≥ 2"} if not math.isfinite(self.se) else {}
        return data

    def __str__(self) -> str:
        return "\n".join([
            f"ΔH by common random numbers on the evaluation batch — integrand {self.integrand}, nats/sequence, "
            f"B={self.B}, G={self.G}",
            f"{'quantity':<26}{'value':>14}{'SE':>12}",
            f"{'H(θ)':<26}{_fmt(self.H_before):>14}",
            f"{'H(θ⁺)':<26}{_fmt(self.H_after):>14}",
            f"{'ΔH':<26}{_fmt(self.deltaH):>14}{_fmt(self.se, '.4g'):>12}",
            f"{'draws changed (y⁺ ≠ y)':<26}{self.changed_fraction:>14.3f}   ({self.changed_count} of "
            f"{self.B * self.G})",
            "reliable: yes" if self.reliable else f"reliable: NO — {self.reason}",
            f"{self.forward_passes} forward passes, {self.sampling_passes} sampling pass; "
            + ", ".join(f"{k} {v:.3f}s" for k, v in self.timings.items())])



def _check_sample(sample: Any, fn: str) -> None:
    """CRN redraws the sample: it needs the object holding the draw (``.spec``), not only its RolloutBatch. Anything
    that is not even a batch gets ``as_rollout_batch``'s message, as from every other function."""
    as_rollout_batch(sample, f"{fn}: sample")
    if getattr(sample, "spec", None) is None:
        raise ValueError(f"{fn} needs the evaluation sample with its draw: pass the SampledBatch of sample_batch (or "
                         "the Responses of draw_responses) itself, not its .batch — its .spec lets the draw be "
                         f"repeated at θ⁺ with the same uniforms; got {type(sample).__name__}"
                         + (" without a spec" if not isinstance(sample, RolloutBatch) else "") + ".")



def integrand_values(policy: Policy, params: ParamsDict, batch: RolloutBatch, integrand: str = "rao_blackwell", *,
                     seq_chunk: int | None = None, token_chunk: int | None = None, progress: bool | None = False,
                     world=None) -> Tensor:
    """CRN's integrand on every sequence of ``batch`` at θ = ``params``: float64 [B, G] — the summed next-token
    entropies R (``"rao_blackwell"``) or −S (``"sequence"``), teacher-forced (sharded by sequence chunk with
    ``world``)."""
    chunks = _chunks(seq_chunk, token_chunk, progress)
    sharded = sharded_pass(world, batch)
    if integrand == "rao_blackwell":
        return sharded(lambda **k: policy.token_entropies(params, batch, **chunks, **k))
    return -sharded(lambda **k: policy.sequence_logprobs(params, batch, **chunks, **k))



def _crn(params: ParamsDict, update: ParamsDict, *, policy: Policy, sample: Any, integrand: str,
         chunks: Mapping[str, Any], before: Tensor | None = None, prompt_chunk: int = 8, world=None) -> CRNResult:
    """crn_delta_h after validation; ``before`` (the integrand on y at θ, [B, G]) may be given."""
    clock = _Clock()
    started = time.perf_counter()
    batch = sample.batch
    if before is None:
        before = clock.run("integrand_before",
                           lambda: integrand_values(policy, params, batch, integrand, world=world, **chunks))
    progress = chunks.get("progress")
    drawn = clock.run("redraw", lambda: redraw(policy, update, sample.spec, world=world, prompt_chunk=prompt_chunk,
                                               progress=progress), passes=0)
    after_batch = drawn.batch
    after = clock.run("integrand_after",
                      lambda: integrand_values(policy, update, after_batch, integrand, world=world, **chunks))
    start = time.perf_counter()
    result = crn_from_draws(batch, after_batch, before, after, integrand=integrand)
    clock.timings["estimate"] = time.perf_counter() - start
    timings = dict(clock.timings)
    timings["total"] = time.perf_counter() - started
    return dataclasses.replace(result, forward_passes=clock.forward_passes, sampling_passes=1, timings=timings)


def crn_from_draws(batch: RolloutBatch, after_batch: RolloutBatch, before: Tensor, after: Tensor, *,
                   integrand: str = "rao_blackwell") -> CRNResult:
    """The CRN estimate (spec §6) from two draws that share their uniforms, already made: ``batch`` y ∼ π_θ and
    ``after_batch`` y⁺ ∼ π_θ⁺ (the same ``DrawSpec``: ``redraw``, or ``sample_batch`` at θ⁺ with the same prompts
    and seed), with the integrand on each at its own θ, ``before`` f_θ(y) and ``after`` f_θ⁺(y⁺), float [B, G].

    ΔĤ = mean_n ΔĤ_n, ΔĤ_n = (1/G) Σ_g [f_θ⁺(y⁺) − f_θ(y)], SE = sd_n(ΔĤ_n)/√B; the changed draws and the
    reliability verdict as :func:`crn_delta_h` (which calls this). Pure; no pass is run (``forward_passes`` and
    ``sampling_passes`` 0). The result records ``batch.fingerprint`` (the draw at θ: E) as its
    ``evaluation_fingerprint``. Raises ValueError for non-finite values or shapes other than the batches' [B, G].
    """
    if integrand not in INTEGRANDS:
        raise ValueError(f"integrand must be one of {INTEGRANDS}; got {integrand!r}.")
    shape = (batch.B, batch.G)
    for name, values in (("before", before), ("after", after)):
        if tuple(values.shape) != shape or (after_batch.B, after_batch.G) != shape:
            raise ValueError(f"crn_from_draws: {name} has shape {tuple(values.shape)} and the batches are "
                             f"{shape} and {(after_batch.B, after_batch.G)}; all four must be the same [B, G].")
    for name, values in (("the integrand at θ", before), ("the integrand at θ⁺", after)):
        _check_values(name, values)
    before, after = before.to("cpu", torch.float64), after.to("cpu", torch.float64)
    difference = after - before
    per_prompt = difference.mean(dim=1)
    changed = _changed(batch, after_batch)
    count = int(changed.sum())
    reliable, reason, top_share = _crn_verdict(difference, changed_count=count, num_sequences=batch.num_sequences)
    return CRNResult(deltaH=float(per_prompt.mean()), se=_se(per_prompt), H_before=float(before.mean()),
                     H_after=float(after.mean()), deltaH_per_prompt=_tuple(per_prompt),
                     H_before_per_prompt=_tuple(before.mean(dim=1)), H_after_per_prompt=_tuple(after.mean(dim=1)),
                     changed_fraction=float(changed.mean()), changed_count=count,
                     changed_per_prompt=_tuple(changed.mean(dim=1)), top_share=top_share, reliable=reliable,
                     reason=reason, integrand=integrand, B=batch.B, G=batch.G, forward_passes=0, sampling_passes=0,
                     evaluation_fingerprint=batch.fingerprint)



def _crn_verdict(difference: Tensor, *, changed_count: int, num_sequences: int) -> tuple[bool, str, float]:
    """(reliable, reason, top share) of CRN's per-draw differences [B, G]: see CRN_MIN_CHANGED, CRN_MAX_TOP_SHARE."""
    deviations = (difference - difference.mean()).reshape(-1) ** 2
    total = float(deviations.sum())
    top_share = float(deviations.max()) / total if total > 0 else 0.0
    reasons = []
    if changed_count < CRN_MIN_CHANGED and not bool((difference == 0).all()):
        reasons.append(f"only {changed_count} of {num_sequences} draws changed (y⁺ ≠ y; fewer than {CRN_MIN_CHANGED}): "
                       "the part of ΔH that comes from the step moving the path distribution rests on those few "
                       "draws, and the SE over prompts can understate the error many times")
    if top_share > CRN_MAX_TOP_SHARE:
        reasons.append(f"one draw carries {top_share:.0%} of the variance of the differences (a path switch, e.g. "
                       "at the stop token): the SE cannot see such a heavy tail")
    if not reasons:
        return True, "", top_share
    return False, ("; ".join(reasons) + ". Use more evaluation draws (eval_B/eval_G; --eval-B, --eval-G), importance "
                   "sampling (--realised snis), whose weights see every draw, or a larger η."), top_share



def _changed(batch: RolloutBatch, other: RolloutBatch) -> Tensor:
    """float64 [B, G]: 1 where the response of ``other`` differs from ``batch``'s (the tokens of each response,
    compared from its first column, whatever the padding)."""
    def responses(b: RolloutBatch) -> list[list[list[int]]]:
        ids, mask = b.input_ids, b.response_mask
        return [[ids[n, g][mask[n, g]].tolist() for g in range(b.G)] for n in range(b.B)]

    left, right = responses(batch), responses(other)
    return torch.tensor([[float(a != b) for a, b in zip(rows_a, rows_b)] for rows_a, rows_b in zip(left, right)],
                        dtype=torch.float64)



def crn_delta_h(params: ParamsDict, update: ParamsDict, *, policy: Policy, sample: Any,
                integrand: str = "rao_blackwell", before: Tensor | None = None, seq_chunk: int | None = None,
                token_chunk: int | None = None, prompt_chunk: int = 8, progress: bool | None = False,
                world=None) -> CRNResult:
    """ΔĤ = Ĥ(θ⁺) − Ĥ(θ) by common random numbers on an evaluation sample drawn at θ (spec §6).

    Args:
        params: θ, at which ``sample`` was drawn. update: θ⁺ (names, shapes, dtypes as the policy's).
        policy: the ``Policy``.
        sample: the evaluation sample E: a ``SampledBatch`` from ``sample_batch`` (or ``Responses`` from
            ``draw_responses``) with its ``spec``; y⁺ is ``redraw(policy, update, sample.spec)``: the same uniforms.
        integrand: "rao_blackwell" (R = Σ_k H(π(·|y_<k)), default) or "sequence" (−S, for comparison only).
        before: the integrand on y at θ (:func:`integrand_values`), when several updates share the sample (a
            sweep); computed here when None. A bare tensor records no batch: it must be this sample's (only its
            shape is checked).
        seq_chunk, token_chunk, prompt_chunk, progress: as for the passes they configure.
        world: a ``funcprobe.distributed.World``: the redraw is sharded by prompt (the same streams) and the entropy
            passes by sequence chunk, so every field equals the single-process result.

    ΔĤ = mean_i [f_θ⁺(y⁺_i) − f_θ(y_i)], SE from the per-prompt means; ``changed_fraction`` = fraction of draws
    with y⁺ ≠ y. Unbiased at any step size (each term is an unbiased entropy estimate); exactly 0 when ``update``
    equals ``params`` (the redraw reproduces y, and both integrands come from one path).

    Raises ValueError for a bad integrand, a sample without its draw spec, params/update that do not fit the policy,
    or non-finite entropies.
    """
    if integrand not in INTEGRANDS:
        raise ValueError(f"integrand must be one of {INTEGRANDS}; got {integrand!r}. Use 'rao_blackwell' (the summed "
                         "next-token entropies along the path).")
    _check_sample(sample, "crn_delta_h")
    _require_policy(policy, "crn_delta_h", "the entropies along y and y⁺")
    policy.check_params(params, "params")
    policy.check_params(update, "update")
    if before is not None and tuple(before.shape) != (sample.batch.B, sample.batch.G):
        raise ValueError(f"before= has shape {tuple(before.shape)}; it must be the integrand [B, G] = "
                         f"[{sample.batch.B}, {sample.batch.G}] of this sample (integrand_values).")
    return _crn(params, update, policy=policy, sample=sample, integrand=integrand,
                chunks=_chunks(seq_chunk, token_chunk, progress), before=before, prompt_chunk=prompt_chunk,
                world=world)

