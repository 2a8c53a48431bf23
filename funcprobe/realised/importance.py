"""ΔH by importance sampling on the evaluation batch (spec §6).

* **Importance sampling** (:func:`snis_delta_h`), log w = S⁺ − S in float64:

      Ĥ_n(θ)  = −(1/G) Σ_g S_{n,g}
      Ĥ_n(θ⁺) = −Σ_g w̃_{n,g} S⁺_{n,g},   w̃_{n,g} = exp(log w_{n,g} − logsumexp_j log w_{n,j})
      ΔĤ      = (1/B) Σ_n [Ĥ_n(θ⁺) − Ĥ_n(θ)],   SE = sd_n(ΔĤ_n) / sqrt(B)

  Forward passes only. The options of spec §6, all in :func:`importance_weighted_delta_h` (a pure function of S, S⁺):

  * ``normalize="prompt"``: per-prompt self-normalised (the default of the pure function, and of ``snis_delta_h``
    per token). Consistent, bounded (a convex combination), but biased at first order in the step (below).
  * ``normalize="global"``: one normalisation over all B·G samples, Ĥ(θ⁺) = Σ_i w̃_i f⁺_i with w̃ summing to 1 over
    the batch (the seed's choice). For the SE, ΔĤ is a difference of two ratio estimators R = Σ_n a_n / Σ_n b_n
    (a_n = Σ_g u_{n,g} f⁺_{n,g}, b_n = Σ_g u_{n,g}); its per-prompt contributions are the delta-method pseudo-values
    R + (a_n − R b_n) / b̄, which average exactly to ΔĤ.
  * ``normalize="loo"`` (``snis_delta_h``'s default per sequence): ordinary importance sampling with a leave-one-out
    control variate, per prompt,

        Ĥ_n(θ⁺) = (1/G) Σ_g [ w_g (f⁺_g − c_g) + c_g ],   c_g = (1/(G−1)) Σ_{j≠g} f⁺_j
                = f̄⁺_n + (1/(G−1)) Σ_g w_g (f⁺_g − f̄⁺_n),

    unbiased at any step size (E_θ[w_g] = 1 and c_g is independent of draw g, so E[w_g c_g] = E[c_g]) and as smooth
    as "prompt" (the same deviations f⁺_g − f̄⁺ are weighted; "prompt" divides their weighted sum by Σ_j w_j where
    this divides by G − 1). "prompt"'s self-normalisation is biased at first order in the step: its derivative
    along Δθ is (1 − 1/G)·E[(∇S·Δθ)(f − E f)] + E[∇f·Δθ] against the true ∇H·Δθ, a shortfall of 1/G of the score
    part (25 % at G = 4) that a paired comparison with δĤ₁(E) resolves (bench/RESULTS.md). Not with ``per_token``.
  * ``normalize="none"``: ordinary importance sampling, Ĥ_n(θ⁺) = −(1/G) Σ_g w_{n,g} S⁺_{n,g}; unbiased since
    E_θ[w] = 1 per prompt, but its variance grows with the scale of the weights. Weights are applied as
    exp(m_n)·exp(log w − m_n), m_n = max_g log w_{n,g}, so no intermediate overflows.
  * ``per_token=True``: Ĥ_tok = Σ_i w̃_i f⁺_i / Σ_i w̃_i T_i (T_i the response length), per prompt for "prompt" (and
    "none": the normaliser cancels in the ratio, so "none" gives exactly the "prompt" numbers), over the batch for
    "global".
  * ``estimator="rao_blackwell"``: f⁺_i = Σ_k H(π_θ⁺(·|t_<k)) (the full next-token entropies along the sampled prefix)
    instead of −S⁺_i, and likewise f_i at θ: the same expectation, lower variance for the self-normalised estimators.
    Not for ``normalize="none"``: there the weights' own variance multiplies the integrand's size (Var(w f⁺) ≈
    Var(w)·E[f⁺]²), and −S⁺, negatively correlated with w, partly cancels it where the smooth RB integrand cannot.
  * ``clip=c``: log-weights with |log w| > c are clipped to ±c. Clipping **biases** the estimate; the clipped fraction
    is reported. The diagnostics are always of the raw log-weights.

Diagnostics, from the raw log-weights: :mod:`funcprobe.realised.diagnostics`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..batch import RolloutBatch, check_same_evaluation
from ..formatting import fmt as _fmt
from ..policy import Policy
from ._common import (_ADVICE, ParamsDict, _as_matrix, _check_batch, _check_values, _chunks, _Clock, _prompt_ratio,
                      _require_policy, _se, _sequence_list, _tuple)
from .diagnostics import weight_diagnostics
from .passes import Before, _values, values_before
from .recorded import LogprobCheck

__all__ = ["NORMALIZATIONS", "NORMALIZATION_LABELS", "ESTIMATORS", "default_normalize", "default_estimator", "check_snis_options", "WeightedEstimate",
           "importance_weighted_delta_h", "SNISResult", "snis_delta_h"]

NORMALIZATIONS = ("prompt", "global", "none", "loo")
ESTIMATORS = ("sequence", "rao_blackwell")


# ------------------------------------------------------------------------------------------------------ validation
#: How each normalisation is named in tables and plots.
NORMALIZATION_LABELS = {"loo": "leave-one-out control variate", "prompt": "per-prompt self-normalised",
                        "global": "globally self-normalised", "none": "ordinary"}


def default_normalize(normalize: str | None, per_token: bool = False) -> str:
    """The normalisation when none is asked for: "loo" (unbiased at any step, module docstring) for the entropy per
    sequence, "prompt" for the entropy per token (a ratio, which "loo" does not estimate)."""
    if normalize is not None:
        return normalize
    return "prompt" if per_token else "loo"


def default_estimator(normalize: str, estimator: str | None) -> str:
    """The integrand when none is asked for: Rao-Blackwell for the self-normalised estimators (lower variance, and in
    the exact-enumeration study of bench/RESULTS.md no measurable O(1/G) bias, where −S carried −0.59× the change at
    G = 8), −S for ordinary IS ("none"), where the smooth integrand raises the variance."""
    if estimator is not None:
        return estimator
    return "sequence" if normalize == "none" else "rao_blackwell"



def check_snis_options(normalize: str, estimator: str, per_token: bool, clip: float | None) -> float | None:
    """Validate the importance-sampling options (spec §6); returns ``clip`` as a float or None."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS} ; got {normalize!r}. Use 'prompt' "
                         "(per-prompt self-normalised), 'global', 'none' (ordinary IS) or 'loo' (ordinary IS with a "
                         "leave-one-out control variate: unbiased, as smooth as 'prompt'; the default per sequence).")
    if normalize == "loo" and per_token:
        raise ValueError("normalize='loo' estimates the entropy per sequence; per-token entropy is a ratio "
                         "(Σ w f / Σ w T): use normalize='prompt' with per_token=True.")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}; got {estimator!r}. Use 'sequence' (−S) or "
                         "'rao_blackwell' (summed next-token entropies).")
    if not isinstance(per_token, bool):
        raise ValueError(f"per_token must be True or False; got {per_token!r}.")
    if clip is None:
        return None
    try:
        value = float(clip)
    except (TypeError, ValueError):
        raise ValueError(f"clip must be a positive number (a bound on |log w|) or None; got {clip!r}.") from None
    if not value > 0 or math.isnan(value):
        raise ValueError(f"clip must be a positive number (a bound on |log w|) or None; got {clip!r}. Pass e.g. "
                         "clip=5.0, or None for no clipping.")
    return value


def _check_log_weights(S: Tensor, S_plus: Tensor) -> Tensor:
    """log w = S⁺ − S, float64; ValueError naming the sequences where it is NaN or infinite."""
    log_w = S_plus - S
    bad = ~torch.isfinite(log_w)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0].tolist())
        kind = "NaN" if bool(torch.isnan(log_w).any()) else "infinite"
        raise ValueError(
            f"the log-weights log w = S(θ⁺) − S(θ) are {kind} for {_sequence_list(bad)}; e.g. at {first}: "
            f"S(θ) = {float(S[first])}, S(θ⁺) = {float(S_plus[first])}. A NaN or inf in the update's tensors (a "
            "diverged step) or a token of probability 0 under θ⁺ causes this. Check the update for non-finite "
            "values (all(torch.isfinite(t).all() for t in update.values())), or lower η.")
    return log_w



# ------------------------------------------------------------------------------------------ the pure estimator
@dataclass(frozen=True, eq=False)
class WeightedEstimate:
    """The numbers of spec §6 computed from S, S⁺ (and the entropies): see :func:`importance_weighted_delta_h`.

    Tensors are float64 on the CPU: ``*_per_prompt`` [B] (for ``normalize="global"`` the delta-method
    pseudo-values, which average exactly to the batch values), ``log_weights`` [B, G] the raw log w = S⁺ − S,
    ``weights`` [B, G] the weights applied (self-normalised per prompt or over the batch, or the raw w for "none",
    which is +inf where log w is beyond float64's exp range),
    after clipping.
    """

    deltaH: float
    se: float
    H_before: float
    H_after: float
    deltaH_per_prompt: Tensor
    H_before_per_prompt: Tensor
    H_after_per_prompt: Tensor
    log_weights: Tensor
    weights: Tensor
    clipped_fraction: float
    normalize: str
    per_token: bool



def _global_ratio(u: Tensor, values: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor]:
    """R = Σ_n a_n / Σ_n b_n and its delta-method pseudo-values R + (a_n − R b_n)/b̄ (mean exactly R): (R, [B])."""
    a = (u * values).sum(dim=1)
    b = u.sum(dim=1) if lengths is None else (u * lengths).sum(dim=1)
    ratio = a.sum() / b.sum()
    return ratio, ratio + (a - ratio * b) / b.mean()



def importance_weighted_delta_h(logp_before: Tensor, logp_after: Tensor, *, normalize: str = "prompt",
                                per_token: bool = False, lengths: Tensor | None = None,
                                values_before: Tensor | None = None, values_after: Tensor | None = None,
                                clip: float | None = None) -> WeightedEstimate:
    """ΔĤ of spec §6 from the sequence log-probabilities before (S) and after (S⁺) the step: a pure function.

    Args:
        logp_before, logp_after: S and S⁺, float [B, G] (any float dtype; computed in float64).
        normalize: "prompt" (default), "global", "none" or "loo" — see the module docstring.
        per_token: divide by the weighted response lengths (``lengths`` [B, G], required then, Σ_g T > 0 per prompt).
        values_before, values_after: the integrands f, f⁺ [B, G]; default −S and −S⁺ (the sequence estimator). The
            Rao-Blackwell estimator passes the summed next-token entropies at θ and θ⁺.
        clip: clip log w to [−clip, clip] (biased; see the module docstring), or None.

    All weighting is log-sum-exp stable (log-weights of ±1000 are fine): weights are formed as exp(log w − max),
    the max taken per prompt ("prompt", "none") or over the batch ("global"). With S⁺ = S the result is exactly 0.

    Raises ValueError for mismatched shapes, non-finite log-weights or values (naming the sequences), and
    per-token estimates with a prompt whose responses have no tokens.
    """
    clip = check_snis_options(normalize, "sequence", per_token, clip)
    S = _as_matrix("logp_before", logp_before)
    S_plus = _as_matrix("logp_after", logp_after, S.shape)
    raw = _check_log_weights(S, S_plus)
    f = -S if values_before is None else _as_matrix("values_before", values_before, S.shape)
    f_plus = -S_plus if values_after is None else _as_matrix("values_after", values_after, S.shape)
    _check_values("values_before", f)
    _check_values("values_after", f_plus)
    T = None
    if per_token:
        if lengths is None:
            raise ValueError("per_token=True needs the response lengths: pass lengths=batch.response_lengths.")
        T = _as_matrix("lengths", lengths, S.shape)
        empty = T.sum(dim=1) <= 0
        if bool(empty.any()):
            raise ValueError(f"per_token=True: prompt(s) {empty.nonzero().flatten().tolist()} have no response "
                             "tokens at all (Σ_g T = 0), so their entropy per token is undefined. Drop those "
                             "prompts (batch.select_prompts) or use per_token=False.")
    if clip is None:
        log_w, clipped = raw, 0.0
    else:
        log_w = raw.clamp(-clip, clip)
        clipped = float((raw.abs() > clip).to(torch.float64).mean())
    ones = torch.ones_like(log_w)
    B, G = S.shape

    if normalize == "global":
        u = torch.exp(log_w - log_w.max())
        H_after, after_n = _global_ratio(u, f_plus, T)
        H_before, before_n = _global_ratio(ones, f, T)
        weights = u / u.sum()
        deltaH = float(H_after - H_before)
        H_after, H_before = float(H_after), float(H_before)
    else:
        m = log_w.max(dim=1, keepdim=True).values
        u = torch.exp(log_w - m)
        if normalize == "prompt" or per_token:
            # For "none" with per_token the ratio Σ w f / Σ w T does not depend on the weights' scale: the same
            # numbers as "prompt".
            after_n = _prompt_ratio(u, f_plus, T)
            before_n = _prompt_ratio(ones, f, T)
            weights = u / u.sum(dim=1, keepdim=True) if normalize == "prompt" else torch.exp(log_w)
        elif normalize == "loo":
            # f̄⁺ + (1/(G−1)) Σ_g (w_g − 1)(f⁺_g − f̄⁺): the same number as Σ_g w_g (f⁺_g − f̄⁺)/(G−1) (the deviations
            # sum to 0), with w − 1 = expm1(log w) exact near w = 1, so S⁺ = S gives exactly 0.
            if bool((log_w > 700).any()):
                raise ValueError("normalize='loo': a log-weight above 700 overflows the unnormalised weight; the step "
                                 "is far outside importance sampling's reach. Use crn_delta_h (no weights), a "
                                 "smaller η, or normalize='prompt'.")
            mean_after = f_plus.mean(dim=1)
            after_n = mean_after + (torch.expm1(log_w) * (f_plus - mean_after[:, None])).sum(dim=1) / (G - 1)
            before_n = f.mean(dim=1)
            weights = torch.exp(log_w)
        else:  # ordinary IS: (1/G) Σ_g w f⁺ = exp(m) · (1/G) Σ_g exp(log w − m) f⁺
            inner = (u * f_plus).sum(dim=1) / G
            scale = torch.exp(m.squeeze(1))
            after_n = torch.where(inner == 0, torch.zeros_like(inner), scale * inner)
            before_n = (ones * f).sum(dim=1) / G
            weights = torch.exp(log_w)
        H_after, H_before = float(after_n.mean()), float(before_n.mean())
        deltaH = None
    delta_n = after_n - before_n
    if deltaH is None:
        deltaH = float(delta_n.mean())
    return WeightedEstimate(deltaH=deltaH, se=_se(delta_n), H_before=H_before, H_after=H_after,
                            deltaH_per_prompt=delta_n, H_before_per_prompt=before_n, H_after_per_prompt=after_n,
                            log_weights=raw, weights=weights, clipped_fraction=clipped, normalize=normalize,
                            per_token=per_token)



# ------------------------------------------------------------------------------------------------------ results
@dataclass(frozen=True)
class SNISResult:
    """ΔĤ of one step by importance sampling, with its diagnostics (spec §6). JSON-ready through ``to_dict()``.

    Fields:
        deltaH, se: ΔĤ and SE = sd_n(ΔĤ_n)/sqrt(B) (NaN for B < 2).
        H_before, H_after: Ĥ(θ) and Ĥ(θ⁺) (nats per sequence, or per token with ``per_token``).
        deltaH_per_prompt, H_before_per_prompt, H_after_per_prompt: per-prompt values (for "global" the
            delta-method pseudo-values; see the module docstring).
        log_weights: the raw log w = S⁺ − S, [B][G].
        log_weight_min/max/mean/sd: their summary; log_mean_weight_min/max: range over prompts of log mean_g w.
        ess_per_prompt: Kish ESS/G of each prompt; ess_min_fraction, ess_mean_fraction: their min and mean;
            ess_global_fraction: Kish ESS/(BG) over all B·G raw weights.
        khat, khat_threshold, khat_assessed: PSIS k̂ over all B·G log-weights, ``psis_threshold(B·G)``, and whether
            k̂ entered the verdict (B·G ≥ 21 and max w > KHAT_MIN_MAX_RATIO · mean w: some weight can dominate).
        reliable, reason: the verdict; ``reason`` says why not, with the advice.
        clip, clipped_fraction: the clip level (None: no clipping) and the fraction of sequences with |log w| > clip.
        normalize, estimator, per_token: the settings. B, G: the batch's shape.
        in_sample: True when the caller says the batch is the one that built the step — a biased diagnostic, never
            the realised change (spec §6).
        recorded_logprobs: the check of the batch's recorded S against the teacher-forced S (:class:`LogprobCheck`).
        timings: seconds per phase. forward_passes: passes over the batch (each a chunked forward of B·G sequences).
        evaluation_fingerprint: ``batch.fingerprint`` of the batch the weights were computed on (its token ids,
            masks, B, G and τ; ``funcprobe.batch.batch_fingerprint``): ``paired_difference`` and ``lr_sweep`` refuse
            to pair this ΔĤ with a δĤ₁(E) of another batch. None when unknown (built by hand: nothing is checked).
    """

    deltaH: float
    se: float
    H_before: float
    H_after: float
    deltaH_per_prompt: tuple[float, ...]
    H_before_per_prompt: tuple[float, ...]
    H_after_per_prompt: tuple[float, ...]
    log_weights: tuple[tuple[float, ...], ...]
    log_weight_min: float
    log_weight_max: float
    log_weight_mean: float
    log_weight_sd: float
    log_mean_weight_min: float
    log_mean_weight_max: float
    ess_per_prompt: tuple[float, ...]
    ess_min_fraction: float
    ess_mean_fraction: float
    ess_global_fraction: float
    khat: float
    khat_threshold: float
    khat_assessed: bool
    reliable: bool
    reason: str
    clip: float | None
    clipped_fraction: float
    normalize: str
    estimator: str
    per_token: bool
    B: int
    G: int
    forward_passes: int
    in_sample: bool = False
    recorded_logprobs: LogprobCheck | None = None
    timings: dict[str, float] = field(default_factory=dict)
    method: str = "snis"
    evaluation_fingerprint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain Python (lists for the per-prompt values and log-weights); notes explain the values
        that standard JSON writes as null (an SE with B < 2, an unassessed or infinite k̂)."""
        data = asdict(self)
        for name in ("deltaH_per_prompt", "H_before_per_prompt", "H_after_per_prompt", "ess_per_prompt"):
            data[name] = list(data[name])
        data["log_weights"] = [list(row) for row in self.log_weights]
        data["timings"] = dict(self.timings)
        data["recorded_logprobs"] = None if self.recorded_logprobs is None else self.recorded_logprobs.to_dict()
        notes = {}
        if not math.isfinite(self.se):
            notes["se"] = "a standard error over prompts needs B ≥ 2"
        if not self.khat_assessed:
            notes["khat"] = ("not assessed: fewer than 21 log-weights, or no weight above 2× the mean weight (no sample can "
                             "dominate); the value is shown for information only")
        if self.in_sample:
            notes["in_sample"] = ("estimated on the samples that built the step: biased by the same-sample term "
                                  "(docs/estimators.md); a diagnostic, not the realised change")
        data["notes"] = notes
        return data

    def __str__(self) -> str:
        unit = "nats/token" if self.per_token else "nats/sequence"
        where = "IN-SAMPLE (the update batch; biased diagnostic)" if self.in_sample else "evaluation batch"
        khat = (f"{_fmt(self.khat, '.3f')}{'':>2}threshold {_fmt(self.khat_threshold, '.3f')}" if self.khat_assessed
                else "not assessed (B·G < 21, or max w ≤ 2·mean w)")
        lines = [
            f"ΔH by importance sampling on the {where} — normalize={self.normalize}, estimator={self.estimator}, "
            f"{unit}, B={self.B}, G={self.G}",
            f"{'quantity':<26}{'value':>14}{'SE':>12}",
            f"{'H(θ)':<26}{_fmt(self.H_before):>14}",
            f"{'H(θ⁺)':<26}{_fmt(self.H_after):>14}",
            f"{'ΔH':<26}{_fmt(self.deltaH):>14}{_fmt(self.se, '.4g'):>12}",
            f"{'log w min / max':<26}{_fmt(self.log_weight_min, '.4g'):>14}{_fmt(self.log_weight_max, '.4g'):>12}",
            f"{'log w mean / sd':<26}{_fmt(self.log_weight_mean, '.4g'):>14}{_fmt(self.log_weight_sd, '.4g'):>12}",
            f"{'ESS/G per prompt min/mean':<26}{self.ess_min_fraction:>14.3f}{self.ess_mean_fraction:>12.3f}",
            f"{'ESS/(BG) global':<26}{self.ess_global_fraction:>14.3f}",
            f"{'PSIS k̂':<27}{khat}",
        ]
        if self.clip is not None:
            lines.append(f"{'clipped (|log w| > ' + format(self.clip, 'g') + ')':<26}{self.clipped_fraction:>14.3f}"
                         "   (clipping biases ΔH)")
        if self.recorded_logprobs is not None and self.recorded_logprobs.max_abs_diff is not None:
            check = self.recorded_logprobs
            lines.append(f"{'recorded S vs teacher-forced':<26}{_fmt(check.max_abs_diff, '.3g'):>14}"
                         f"   (bound {_fmt(check.threshold, '.3g')}: {'ok' if check.ok else 'MISMATCH'})")
        lines.append("reliable: yes" if self.reliable else f"reliable: NO — {self.reason}")
        lines.append(f"{self.forward_passes} forward passes; "
                     + ", ".join(f"{k} {v:.3f}s" for k, v in self.timings.items()))
        return "\n".join(lines)



# --------------------------------------------------------------------------------------------------- the runners
def _snis(params: ParamsDict, update: ParamsDict, *, policy: Policy, batch: RolloutBatch, normalize: str,
          per_token: bool, estimator: str, clip: float | None, chunks: Mapping[str, Any], before: Before | None = None,
          in_sample: bool = False, world=None) -> SNISResult:
    """snis_delta_h after validation; ``before`` (S and, for RB, E at θ) may be given (a sweep computes it once)."""
    clock = _Clock()
    started = time.perf_counter()
    rb = estimator == "rao_blackwell"
    if before is None:
        before = values_before(params, batch, policy=policy, logprobs=True, entropies=rb, chunks=chunks, world=world,
                               clock=clock)
    S_plus, after_values = _values(policy, update, batch, logprobs=True, entropies=rb, chunks=chunks, world=world,
                                   clock=clock, phase="after")
    start = time.perf_counter()
    estimate = importance_weighted_delta_h(
        before.S, S_plus, normalize=normalize, per_token=per_token,
        lengths=batch.response_lengths.to("cpu", torch.float64) if per_token else None,
        values_before=before.E if rb else None, values_after=after_values, clip=clip)
    diag = weight_diagnostics(estimate.log_weights, normalize=normalize)
    reliable, reason = diag.reliable, diag.reason
    if not (math.isfinite(estimate.deltaH) and math.isfinite(estimate.H_after)):
        extra = ("the estimate is not finite: ordinary importance weights (normalize='none') beyond float64 "
                 f"(max log w = {diag.log_weight_max:.4g}). Use normalize='prompt'. {_ADVICE}")
        reliable, reason = False, (reason + " Also: " + extra) if reason else extra
    clock.timings["estimate"] = time.perf_counter() - start
    timings = dict(clock.timings)
    timings["total"] = time.perf_counter() - started
    return SNISResult(
        deltaH=estimate.deltaH, se=estimate.se, H_before=estimate.H_before, H_after=estimate.H_after,
        deltaH_per_prompt=_tuple(estimate.deltaH_per_prompt),
        H_before_per_prompt=_tuple(estimate.H_before_per_prompt),
        H_after_per_prompt=_tuple(estimate.H_after_per_prompt),
        log_weights=tuple(tuple(float(x) for x in row) for row in estimate.log_weights.tolist()),
        log_weight_min=diag.log_weight_min, log_weight_max=diag.log_weight_max,
        log_weight_mean=diag.log_weight_mean, log_weight_sd=diag.log_weight_sd,
        log_mean_weight_min=diag.log_mean_weight_min, log_mean_weight_max=diag.log_mean_weight_max,
        ess_per_prompt=_tuple(diag.ess_per_prompt), ess_min_fraction=diag.ess_min_fraction,
        ess_mean_fraction=diag.ess_mean_fraction, ess_global_fraction=diag.ess_global_fraction,
        khat=diag.khat, khat_threshold=diag.khat_threshold, khat_assessed=diag.khat_assessed,
        reliable=reliable, reason=reason, clip=clip, clipped_fraction=estimate.clipped_fraction,
        normalize=normalize, estimator=estimator, per_token=per_token, B=batch.B, G=batch.G,
        forward_passes=clock.forward_passes, in_sample=in_sample, recorded_logprobs=before.check, timings=timings,
        evaluation_fingerprint=batch.fingerprint)



def snis_delta_h(params: ParamsDict, update: ParamsDict, *, policy: Policy, batch: RolloutBatch,
                 normalize: str | None = None, per_token: bool = False, estimator: str | None = None,
                 clip: float | None = None, in_sample: bool = False, before: "Before | None" = None,
                 seq_chunk: int | None = None, token_chunk: int | None = None, progress: bool | None = False,
                 world=None) -> SNISResult:
    """ΔĤ = Ĥ(θ⁺) − Ĥ(θ) by importance sampling on a batch drawn from π_θ (spec §6).

    Args:
        params: θ, the policy's LoRA params dict (the batch was drawn from π_θ).
        update: θ⁺, a params dict with exactly the policy's names, shapes, dtypes and device (e.g. ``rl_update``'s).
        policy: the ``Policy`` (required: S(θ) and S(θ⁺) both come from its teacher-forced path).
        batch: the evaluation batch E (a ``RolloutBatch`` or the ``SampledBatch`` holding it), drawn independently of the batch that built the step (spec §6); its
            recorded ``logprobs`` are only checked (``recorded_logprobs`` in the result), never used.
        normalize: "loo" | "prompt" | "global" | "none" | None (default: "loo", unbiased at any step size; "prompt"
            with ``per_token``; :func:`default_normalize`); per_token: entropy per response token;
        estimator: "sequence" | "rao_blackwell" | None (default: Rao-Blackwell, −S for "none";
            :func:`default_estimator`); clip: clip |log w| at this level (biased; reported) — all as in the module
            docstring.
        in_sample: say that ``batch`` is the update batch itself: the result is then labelled a biased diagnostic.
        before: S(θ) (and for Rao-Blackwell the entropies at θ) on this batch from :func:`values_before`, when
            several updates are compared on one batch (a sweep); computed here when None. Refused (ValueError naming
            both fingerprints) when it records another batch's fingerprint (``Before.evaluation_fingerprint``).
        seq_chunk, token_chunk: sequences per decoder forward and response rows per vocabulary chunk (default the
            policy's); progress: a progress bar per pass.
        world: a ``funcprobe.distributed.World``: every rank passes the whole batch and forwards a contiguous range
            of its sequence chunks (the same chunks as one process, so S and S⁺ are bit-identical); the [B, G]
            values are summed over ranks with disjoint supports, and every field equals the single-process result.

    Forward passes only (no gradients): S(θ) and S(θ⁺), and for Rao-Blackwell the entropies at θ and θ⁺ — one pass
    over the batch per θ either way (the entropies come from the same forward and vocabulary projection as S;
    ``Policy.sequence_logprobs_and_entropies``), so one pass in all when ``before`` is given. With
    ``update`` equal to ``params`` the result is exactly 0 (one path). Nothing is modified.

    Raises ValueError (naming the problem and the fix) for: a bad option, an update (or params) whose names, shapes
    or dtypes differ from the policy's, a missing policy, a batch drawn at another τ, and NaN/inf log-weights
    (naming the sequences).
    """
    normalize = default_normalize(normalize, per_token)
    estimator = default_estimator(normalize, estimator)
    clip = check_snis_options(normalize, estimator, per_token, clip)
    batch = _check_batch(batch, "snis_delta_h")
    _require_policy(policy, "snis_delta_h", "S(θ) and S(θ⁺)")
    policy.check_params(params, "params")
    policy.check_params(update, "update")
    if before is not None and (before.S is None or (estimator == "rao_blackwell" and before.E is None)):
        raise ValueError("before= lacks what this estimator needs at θ: compute it with values_before(params, batch, "
                         "logprobs=True, entropies=(estimator == 'rao_blackwell'), ...).")
    if before is not None:
        check_same_evaluation(before.evaluation_fingerprint, batch.fingerprint, "before= (the values at θ)",
                              "snis_delta_h's batch", "compute before= with values_before(params, batch, ...) on "
                              "this batch")
    return _snis(params, update, policy=policy, batch=batch, normalize=normalize, per_token=per_token,
                 estimator=estimator, clip=clip, chunks=_chunks(seq_chunk, token_chunk, progress), before=before,
                 in_sample=in_sample, world=world)

