"""ΔH — the realised entropy change of a step, on an evaluation batch (spec §6, ``shared/spec/ESTIMATORS.md``).

Target: ΔH = H(θ⁺) − H(θ), θ⁺ the step built from the update batch U, H the mean sequence entropy over the prompt
distribution. It is estimated on an **evaluation batch E** drawn independently of U (other prompt draws from the same
pool, fresh responses from π_θ). On U itself the importance weights are inflated exactly where the step moved: the
in-sample estimate carries the same-sample term that δH₁'s U-statistic removes (to first order it is the plug-in
−X̄·Δθ), several times the effect itself on an exactly enumerable policy. ``snis_delta_h(..., in_sample=True)``
labels such a number as the biased diagnostic it is.

**One S path.** S(θ) and S(θ⁺) are computed by the same teacher-forced code (``Policy.sequence_logprobs``: same
chunks, dtype and τ), so a zero step gives exactly ΔĤ = 0 in every dtype. The log-probabilities a sampler recorded
(``batch.logprobs``: KV cache, another precision or engine) are never an input: :func:`check_recorded_logprobs`
reports their largest difference from the teacher-forced S and warns (:class:`LogprobMismatchWarning`) above
``RECORDED_LOGPROB_TOLERANCE``·√layers·eps(dtype)·(T + |S|) per sequence — rounding of two paths in the model's dtype
grows with the number of tokens, the size of S and (as a random walk) the depth of the model; a larger gap means the two paths do not compute the same π (another
template, tokenizer, τ or model).

Two estimators of H(θ⁺) − H(θ) on E (N = B·G sequences):

* **Importance sampling** (:func:`snis_delta_h`), log w = S⁺ − S in float64:

      Ĥ_n(θ)  = −(1/G) Σ_g S_{n,g}
      Ĥ_n(θ⁺) = −Σ_g w̃_{n,g} S⁺_{n,g},   w̃_{n,g} = exp(log w_{n,g} − logsumexp_j log w_{n,j})
      ΔĤ      = (1/B) Σ_n [Ĥ_n(θ⁺) − Ĥ_n(θ)],   SE = sd_n(ΔĤ_n) / sqrt(B)

  Forward passes only. The options of spec §6, all in :func:`importance_weighted_delta_h` (a pure function of S, S⁺):

  * ``normalize="prompt"`` (default): per-prompt self-normalised. Consistent; its bias is O(1/G).
  * ``normalize="global"``: one normalisation over all B·G samples, Ĥ(θ⁺) = Σ_i w̃_i f⁺_i with w̃ summing to 1 over
    the batch (the seed's choice). For the SE, ΔĤ is a difference of two ratio estimators R = Σ_n a_n / Σ_n b_n
    (a_n = Σ_g u_{n,g} f⁺_{n,g}, b_n = Σ_g u_{n,g}); its per-prompt contributions are the delta-method pseudo-values
    R + (a_n − R b_n) / b̄, which average exactly to ΔĤ.
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

  Diagnostics, from the raw log-weights: their summary; Kish ESS = (Σw)²/Σw² per prompt (min, mean of ESS/G) and
  global (ESS/(BG)); PSIS k̂ over all B·G log-weights with the threshold ``psis_threshold(B·G)``. ``reliable=False``
  with a ``reason`` and the advice (use ``"crn"``, resample at θ⁺ or lower η) when the smallest per-prompt ESS/G is
  below :data:`MIN_ESS_FRACTION` (0.5; for "global" also the global ESS), when k̂ exceeds the threshold or is NaN, or
  when the estimate is not finite. k̂ is *assessed* only with at least :data:`PSIS_MIN_SAMPLES` (21) log-weights
  whose range exceeds :data:`KHAT_MIN_LOG_WEIGHT_RANGE` (0.05): below 21 a generalised-Pareto fit has fewer than 5
  tail values; with a range ≤ 0.05 every weight is within a factor 1.05 of every other, no sample can dominate, and
  the shape k̂ reports is noise that the fit's prior pulls towards 0.5 — above the threshold 1 − 1/log10 N for
  N < 100, so a tiny step would always be flagged. An unassessed k̂ is reported as such (and as null in JSON).

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

Public API: :func:`snis_delta_h` → :class:`SNISResult`; :func:`crn_delta_h` → :class:`CRNResult`; :func:`entropy`
→ :class:`EntropyResult`; the pure parts :func:`importance_weighted_delta_h` → :class:`WeightedEstimate`,
:func:`weight_diagnostics` → :class:`WeightDiagnostics` and :func:`check_recorded_logprobs` → :class:`LogprobCheck`.
Nothing here modifies its inputs; there is no optimizer step and no undo.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from .batch import RolloutBatch
from .formatting import fmt as _fmt
from .policy import Policy
from .sampling import redraw
from .stats import mean_and_se, psis_khat, psis_threshold

__all__ = [
    "MIN_ESS_FRACTION",
    "PSIS_MIN_SAMPLES",
    "KHAT_MIN_LOG_WEIGHT_RANGE",
    "RECORDED_LOGPROB_TOLERANCE",
    "NORMALIZATIONS",
    "ESTIMATORS",
    "INTEGRANDS",
    "CRN_MIN_CHANGED",
    "CRN_MAX_TOP_SHARE",
    "WeightedEstimate",
    "importance_weighted_delta_h",
    "WeightDiagnostics",
    "weight_diagnostics",
    "LogprobCheck",
    "LogprobMismatchWarning",
    "check_recorded_logprobs",
    "check_snis_options",
    "default_estimator",
    "Before",
    "values_before",
    "integrand_values",
    "sharded_pass",
    "SNISResult",
    "snis_delta_h",
    "CRNResult",
    "crn_delta_h",
    "EntropyResult",
    "entropy",
]

#: A per-prompt Kish ESS below this fraction of G (or, for ``normalize="global"``, a global ESS below this fraction
#: of B·G) flags the estimate as unreliable: half the samples carry the estimate, the rest are nearly weightless.
MIN_ESS_FRACTION = 0.5

#: PSIS k̂ enters the reliability verdict only with at least this many log-weights: below 21, M = ceil(min(N/5,
#: 3·sqrt(N))) ≤ 4 tail values, too few for a generalised-Pareto fit (``psis_khat`` then returns inf).
PSIS_MIN_SAMPLES = 21

#: PSIS k̂ enters the verdict only when the log-weights span more than this (max − min): below it every weight is
#: within a factor e^0.05 ≈ 1.05 of every other (no sample can dominate) and k̂ measures the noise of a tiny tail.
KHAT_MIN_LOG_WEIGHT_RANGE = 0.05

#: The recorded-vs-teacher-forced check warns when |S_recorded − S| > this · √layers · eps(model dtype) · (T + |S|)
#: for a sequence of T tokens: two paths that each round at the model's precision differ by a few eps per operation
#: on every token, accumulated over the decoder's layers like a random walk. Measured, float32 KV cache against
#: teacher forcing: 0.1–0.5 of the bound on the 1–2-layer test models; up to 8.7·eps·(T + |S|), i.e. 0.2 of the
#: bound, on SmolLM2-135M (30 layers; `make demo`'s batches). A different π (template, τ, tokenisation, model) moves
#: S by tenths of a nat per token, far above it.
RECORDED_LOGPROB_TOLERANCE = 8.0

NORMALIZATIONS = ("prompt", "global", "none")
ESTIMATORS = ("sequence", "rao_blackwell")
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

_ADVICE = ("Use the common-random-numbers estimator (--realised crn, crn_delta_h), which needs no weights, resample "
           "the batch at θ⁺, or lower η.")

ParamsDict = Mapping[str, Tensor]


# ------------------------------------------------------------------------------------------------------ validation
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
                         "(per-prompt self-normalised, the default), 'global' or 'none' (ordinary IS).")
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


def _as_matrix(name: str, value: Any, shape: tuple[int, ...] | None = None) -> Tensor:
    if not isinstance(value, Tensor):
        try:
            value = torch.as_tensor(value, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{name} must be a float tensor [B, G]; got {type(value).__name__}.") from None
    value = value.detach().to("cpu", torch.float64)
    if value.dim() != 2 or value.shape[1] < 1 or value.shape[0] < 1:
        raise ValueError(f"{name} must be a float tensor [B, G] with B, G ≥ 1; got shape {tuple(value.shape)}.")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(value.shape)}; it must match logp_before's {tuple(shape)}.")
    return value


def _sequence_list(bad: Tensor, limit: int = 5) -> str:
    where = [tuple(int(i) for i in row) for row in bad.nonzero().tolist()]
    shown = ", ".join(f"({n}, {g})" for n, g in where[:limit])
    more = f" and {len(where) - limit} more" if len(where) > limit else ""
    return f"{len(where)} sequence(s) (prompt n, sample g): {shown}{more}"


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


def _check_values(name: str, values: Tensor) -> None:
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        raise ValueError(f"{name} is not finite for {_sequence_list(bad)}. The entropies come from the same forward "
                         "as the log-probabilities: check the params/update for NaN or inf values.")


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


def _prompt_ratio(u: Tensor, values: Tensor, lengths: Tensor | None) -> Tensor:
    """Σ_g u f / Σ_g u (or / Σ_g u T) per prompt: [B]."""
    numerator = (u * values).sum(dim=1)
    denominator = u.sum(dim=1) if lengths is None else (u * lengths).sum(dim=1)
    return numerator / denominator


def _global_ratio(u: Tensor, values: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor]:
    """R = Σ_n a_n / Σ_n b_n and its delta-method pseudo-values R + (a_n − R b_n)/b̄ (mean exactly R): (R, [B])."""
    a = (u * values).sum(dim=1)
    b = u.sum(dim=1) if lengths is None else (u * lengths).sum(dim=1)
    ratio = a.sum() / b.sum()
    return ratio, ratio + (a - ratio * b) / b.mean()


def _se(per_prompt: Tensor) -> float:
    if per_prompt.shape[0] < 2:
        return math.nan
    return float(mean_and_se(per_prompt)[1])


def importance_weighted_delta_h(logp_before: Tensor, logp_after: Tensor, *, normalize: str = "prompt",
                                per_token: bool = False, lengths: Tensor | None = None,
                                values_before: Tensor | None = None, values_after: Tensor | None = None,
                                clip: float | None = None) -> WeightedEstimate:
    """ΔĤ of spec §6 from the sequence log-probabilities before (S) and after (S⁺) the step: a pure function.

    Args:
        logp_before, logp_after: S and S⁺, float [B, G] (any float dtype; computed in float64).
        normalize: "prompt" (default), "global" or "none" — see the module docstring.
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


# ------------------------------------------------------------------------------------------------- diagnostics
@dataclass(frozen=True, eq=False)
class WeightDiagnostics:
    """Spec §6's diagnostics of raw log-weights [B, G]; see :func:`weight_diagnostics`."""

    log_weight_min: float
    log_weight_max: float
    log_weight_mean: float
    log_weight_sd: float
    log_mean_weight_min: float
    log_mean_weight_max: float
    ess_per_prompt: Tensor
    ess_min_fraction: float
    ess_mean_fraction: float
    ess_global_fraction: float
    khat: float
    khat_threshold: float
    khat_assessed: bool
    reliable: bool
    reason: str


def _kish_fraction(log_w: Tensor, dim: int | None) -> Tensor:
    """Kish ESS / N from log-weights, as (Σu)²/(N Σu²) with u = exp(log w − max) ∈ (0, 1]: stable for any finite
    log-weights, exactly 1 for equal ones (the same number as ``stats.kish_ess`` / N up to rounding)."""
    if dim is None:
        log_w = log_w.reshape(1, -1)
    u = torch.exp(log_w - log_w.max(dim=1, keepdim=True).values)
    ess = u.sum(dim=1) ** 2 / (u * u).sum(dim=1)
    fraction = ess / log_w.shape[1]
    return fraction[0] if dim is None else fraction


def weight_diagnostics(log_weights: Tensor, *, normalize: str = "prompt",
                       min_ess_fraction: float = MIN_ESS_FRACTION) -> WeightDiagnostics:
    """Log-weight summary, Kish ESS fractions, PSIS k̂ and the reliability verdict (spec §6; module docstring).

    ``log_weights`` [B, G] are the raw (unclipped) log w = S⁺ − S. ``log_mean_weight_*`` is the range over prompts
    of log((1/G) Σ_g w_{n,g}), which estimates log E_θ[w] = 0: far from 0 means the sample misses where θ⁺ puts its
    mass (the ordinary-IS estimator, ``normalize="none"``, is then off by that factor; the ESS cannot see it).
    """
    lw = _as_matrix("log_weights", log_weights)
    B, G = lw.shape
    flat = lw.reshape(-1)
    N = flat.shape[0]
    ess_prompt = _kish_fraction(lw, dim=1)
    ess_global = float(_kish_fraction(flat, dim=None))
    log_mean_w = torch.logsumexp(lw, dim=1) - math.log(G)
    khat = psis_khat(flat)
    threshold = psis_threshold(N)
    assessed = N >= PSIS_MIN_SAMPLES and float(flat.max() - flat.min()) > KHAT_MIN_LOG_WEIGHT_RANGE
    reasons = []
    ess_min = float(ess_prompt.min())
    if ess_min < min_ess_fraction:
        worst = int(ess_prompt.argmin())
        reasons.append(f"low effective sample size: the smallest per-prompt ESS/G is {ess_min:.3f} (prompt {worst}) "
                       f"< {min_ess_fraction}")
    if normalize == "global" and ess_global < min_ess_fraction:
        reasons.append(f"low global effective sample size: ESS/(BG) = {ess_global:.3f} < {min_ess_fraction}")
    if math.isnan(khat):
        reasons.append("PSIS k̂ is undefined (NaN)")
    elif assessed and khat > threshold:
        reasons.append(f"heavy-tailed weights: PSIS k̂ = {khat:.3f} > {threshold:.3f} (threshold for N={N})")
    sd = float(flat.std()) if N > 1 else 0.0
    return WeightDiagnostics(
        log_weight_min=float(flat.min()), log_weight_max=float(flat.max()), log_weight_mean=float(flat.mean()),
        log_weight_sd=sd, log_mean_weight_min=float(log_mean_w.min()), log_mean_weight_max=float(log_mean_w.max()),
        ess_per_prompt=ess_prompt, ess_min_fraction=ess_min, ess_mean_fraction=float(ess_prompt.mean()),
        ess_global_fraction=ess_global, khat=float(khat), khat_threshold=float(threshold), khat_assessed=assessed,
        reliable=not reasons, reason="; ".join(reasons) + (f". {_ADVICE}" if reasons else ""))


# ---------------------------------------------------------------------------------------- the recorded-S check
class LogprobMismatchWarning(UserWarning):
    """The log-probabilities recorded while sampling differ from the teacher-forced ones by more than rounding."""


@dataclass(frozen=True)
class LogprobCheck:
    """The sampler's recorded S against the teacher-forced S on the same tokens (spec §6): a check only.

    ``max_abs_diff``: the largest |S_recorded − S| (nats; None when the batch records none); ``worst``: its
    (prompt n, sample g); ``threshold``: the bound there, RECORDED_LOGPROB_TOLERANCE · eps(dtype) · (T + |S|);
    ``exceeded``: how many sequences are above their bound; ``ok``: none is; ``dtype``: the model's dtype.
    """

    max_abs_diff: float | None
    worst: tuple[int, int] | None
    threshold: float | None
    exceeded: int
    ok: bool
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_recorded_logprobs(batch: RolloutBatch, S: Tensor, *, dtype: torch.dtype, layers: int = 1,
                            warn: bool = True) -> LogprobCheck:
    """Compare ``batch.logprobs`` (recorded while sampling) with the teacher-forced ``S`` [B, G] (spec §6).

    Per sequence the bound is ``RECORDED_LOGPROB_TOLERANCE`` · √``layers`` · eps(``dtype``) · (T + |S|): the two paths
    round at the model's precision a few times per token (T) and layer, and relative to the size of S. Above it (any sequence), a
    :class:`LogprobMismatchWarning` names the worst sequence: the sampler and the teacher-forced path did not compute
    the same π (a different model, template, τ or tokenisation) — the estimates use the teacher-forced S regardless.
    """
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise ValueError(f"layers must be a positive integer (the model's decoder layers); got {layers!r}.")
    name = str(dtype).replace("torch.", "")
    if batch.logprobs is None:
        return LogprobCheck(None, None, None, 0, True, name)
    recorded = batch.logprobs.to("cpu", torch.float64)
    S = S.to("cpu", torch.float64)
    difference = (recorded - S).abs()
    scale = RECORDED_LOGPROB_TOLERANCE * math.sqrt(layers) * torch.finfo(dtype).eps
    bound = scale * (batch.response_lengths.to(torch.float64) + S.abs())
    worst = tuple(int(i) for i in divmod(int(difference.argmax()), batch.G))
    over = difference > bound
    check = LogprobCheck(max_abs_diff=float(difference.max()), worst=worst, threshold=float(bound[worst]),
                         exceeded=int(over.sum()), ok=not bool(over.any()), dtype=name)
    if warn and not check.ok:
        warnings.warn(
            f"the log-probabilities recorded while sampling differ from the teacher-forced ones by up to "
            f"{check.max_abs_diff:.3g} nats (sequence {worst}; bound {check.threshold:.3g} for {name} rounding; "
            f"{check.exceeded} of {batch.num_sequences} sequences above their bound): the sampler did not compute the "
            "same π as the estimators (another model, chat template, τ or tokenisation?). The estimates use the "
            "teacher-forced S only.", LogprobMismatchWarning, stacklevel=3)
    return check


# ------------------------------------------------------------------------------------------------------ results
def _tuple(tensor: Tensor) -> tuple[float, ...]:
    return tuple(float(x) for x in tensor.tolist())


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
            k̂ entered the verdict (B·G ≥ 21 and a log-weight range above KHAT_MIN_LOG_WEIGHT_RANGE).
        reliable, reason: the verdict; ``reason`` says why not, with the advice.
        clip, clipped_fraction: the clip level (None: no clipping) and the fraction of sequences with |log w| > clip.
        normalize, estimator, per_token: the settings. B, G: the batch's shape.
        in_sample: True when the caller says the batch is the one that built the step — a biased diagnostic, never
            the realised change (spec §6).
        recorded_logprobs: the check of the batch's recorded S against the teacher-forced S (:class:`LogprobCheck`).
        timings: seconds per phase. forward_passes: passes over the batch (each a chunked forward of B·G sequences).
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
            notes["khat"] = ("not assessed: fewer than 21 log-weights or a log-weight range ≤ 0.05 (no sample can "
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
                else "not assessed (B·G < 21 or log w range ≤ 0.05)")
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


@dataclass(frozen=True)
class EntropyResult:
    """Ĥ(θ) = −(1/(BG)) Σ S (or the Rao-Blackwell / per-token version) with SE = sd_n(Ĥ_n)/sqrt(B) (spec §2, §6)."""

    H: float
    se: float
    H_per_prompt: tuple[float, ...]
    estimator: str
    per_token: bool
    B: int
    G: int
    forward_passes: int
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["H_per_prompt"] = list(self.H_per_prompt)
        return data

    def __str__(self) -> str:
        unit = "nats/token" if self.per_token else "nats/sequence"
        return (f"Ĥ(θ) = {_fmt(self.H)} ± {_fmt(self.se, '.3g')} {unit} (estimator={self.estimator}, B={self.B}, "
                f"G={self.G}, {self.forward_passes} forward passes)")


# --------------------------------------------------------------------------------------------------- the runners
class _Clock:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self.forward_passes = 0

    def run(self, phase: str, fn: Callable[[], Any], passes: int = 1) -> Any:
        start = time.perf_counter()
        out = fn()
        self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - start
        self.forward_passes += passes
        return out


def _check_batch(batch: Any, fn: str) -> None:
    if not isinstance(batch, RolloutBatch):
        raise ValueError(f"{fn}: batch must be a funcprobe.RolloutBatch; got {type(batch).__name__}. Build one with "
                         "RolloutBatch(...) or RolloutBatch.load(path).")


def _require_policy(policy: Any, fn: str, needs: str) -> None:
    if policy is None:
        raise ValueError(f"{fn} needs policy= to compute {needs} on its one teacher-forced path. Pass "
                         "policy=funcprobe.Policy(...) (or load_policy(base, adapter)).")
    if not isinstance(policy, Policy):
        raise ValueError(f"{fn}: policy must be a funcprobe.Policy; got {type(policy).__name__}.")


def sharded_pass(world, batch: RolloutBatch) -> Callable[[Callable[..., Tensor]], Tensor]:
    """run(fn) with fn(shard=...) → [B, G]: the whole batch in one process; distributed, each rank forwards its
    contiguous range of the batch's own sequence chunks (``shard=(rank, world)``: the same chunks, hence the same
    float64 values, as one process) and the disjoint [B, G] pieces are summed over ranks (x + 0 is exact)."""
    if world is None or not world.distributed:
        return lambda fn: fn()
    from .distributed import all_reduce_sum_

    def run(fn: Callable[..., Tensor]) -> Tensor:
        local = fn(shard=(world.rank, world.size)).to("cpu", torch.float64).contiguous()
        all_reduce_sum_(world, {"values": local}, "ΔH all_reduce of per-sequence values")
        return local

    return run


@dataclass(frozen=True)
class Before:
    """What an estimator needs at θ on a batch, computed once (a sweep reuses it for every η): S, the summed
    next-token entropies E (or None) and the recorded-S check."""

    S: Tensor | None
    E: Tensor | None
    check: LogprobCheck | None


def values_before(params: ParamsDict, batch: RolloutBatch, *, policy: Policy, logprobs: bool, entropies: bool,
                  chunks: Mapping[str, Any], world=None, clock: _Clock | None = None) -> Before:
    """S(θ) (teacher-forced, checked against the recorded S) and/or the entropies at θ on ``batch``."""
    clock = _Clock() if clock is None else clock
    S = E = check = None
    if logprobs or entropies:
        S, E = _values(policy, params, batch, logprobs=logprobs, entropies=entropies, chunks=chunks, world=world,
                       clock=clock, phase="before")
    if logprobs:
        check = check_recorded_logprobs(batch, S, dtype=policy.dtype, layers=policy.num_layers)
    return Before(S, E, check)


def _values(policy: Policy, params: ParamsDict, batch: RolloutBatch, *, logprobs: bool, entropies: bool,
            chunks: Mapping[str, Any], world, clock: _Clock, phase: str) -> tuple[Tensor | None, Tensor | None]:
    """(S, E) at θ = params on the batch, each only when asked for: one forward pass over the batch either way (both
    from the same hidden states and vocabulary projection; bit for bit what the separate passes give)."""
    sharded = sharded_pass(world, batch)
    if logprobs and entropies:
        both = clock.run(f"values_{phase}", lambda: sharded(
            lambda **k: torch.stack(policy.sequence_logprobs_and_entropies(params, batch, **chunks, **k))))
        return both[0], both[1]
    if logprobs:
        return clock.run(f"logprobs_{phase}", lambda: sharded(
            lambda **k: policy.sequence_logprobs(params, batch, **chunks, **k))), None
    return None, clock.run(f"entropies_{phase}", lambda: sharded(
        lambda **k: policy.token_entropies(params, batch, **chunks, **k)))


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
        forward_passes=clock.forward_passes, in_sample=in_sample, recorded_logprobs=before.check, timings=timings)


def _chunks(seq_chunk, token_chunk, progress) -> dict[str, Any]:
    return dict(seq_chunk=seq_chunk, token_chunk=token_chunk, progress=progress)


def snis_delta_h(params: ParamsDict, update: ParamsDict, *, policy: Policy | None = None, batch: RolloutBatch,
                 normalize: str = "prompt", per_token: bool = False, estimator: str | None = None,
                 clip: float | None = None, in_sample: bool = False, before: "Before | None" = None,
                 seq_chunk: int | None = None, token_chunk: int | None = None, progress: bool | None = False,
                 world=None) -> SNISResult:
    """ΔĤ = Ĥ(θ⁺) − Ĥ(θ) by importance sampling on a batch drawn from π_θ (spec §6).

    Args:
        params: θ, the policy's LoRA params dict (the batch was drawn from π_θ).
        update: θ⁺, a params dict with exactly the policy's names, shapes, dtypes and device (e.g. ``rl_update``'s).
        policy: the ``Policy`` (required: S(θ) and S(θ⁺) both come from its teacher-forced path).
        batch: the evaluation batch E, drawn independently of the batch that built the step (spec §6); its
            recorded ``logprobs`` are only checked (``recorded_logprobs`` in the result), never used.
        normalize: "prompt" (default) | "global" | "none"; per_token: entropy per response token;
        estimator: "sequence" | "rao_blackwell" | None (default: Rao-Blackwell for "prompt"/"global", −S for
            "none"; :func:`default_estimator`); clip: clip |log w| at this level (biased; reported) — all as in
            the module docstring.
        in_sample: say that ``batch`` is the update batch itself: the result is then labelled a biased diagnostic.
        before: S(θ) (and for Rao-Blackwell the entropies at θ) on this batch from :func:`values_before`, when
            several updates are compared on one batch (a sweep); computed here when None.
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
    estimator = default_estimator(normalize, estimator)
    clip = check_snis_options(normalize, estimator, per_token, clip)
    _check_batch(batch, "snis_delta_h")
    _require_policy(policy, "snis_delta_h", "S(θ) and S(θ⁺)")
    policy.check_params(params, "params")
    policy.check_params(update, "update")
    if before is not None and (before.S is None or (estimator == "rao_blackwell" and before.E is None)):
        raise ValueError("before= lacks what this estimator needs at θ: compute it with values_before(params, batch, "
                         "logprobs=True, entropies=(estimator == 'rao_blackwell'), ...).")
    return _snis(params, update, policy=policy, batch=batch, normalize=normalize, per_token=per_token,
                 estimator=estimator, clip=clip, chunks=_chunks(seq_chunk, token_chunk, progress), before=before,
                 in_sample=in_sample, world=world)


def _check_sample(sample: Any, fn: str) -> None:
    if getattr(sample, "spec", None) is None or not isinstance(getattr(sample, "batch", None), RolloutBatch):
        raise ValueError(f"{fn} needs the evaluation sample with its draw: pass the SampledBatch of sample_batch (or "
                         "the Responses of draw_responses), whose .spec lets the draw be repeated at θ⁺ with the same "
                         f"uniforms; got {type(sample).__name__}"
                         + (" without a spec" if hasattr(sample, "batch") else "") + ".")


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
    for name, values in (("the integrand at θ", before), ("the integrand at θ⁺", after)):
        _check_values(name, values)
    difference = (after - before).to(torch.float64)
    per_prompt = difference.mean(dim=1)
    changed = _changed(batch, after_batch)
    count = int(changed.sum())
    reliable, reason, top_share = _crn_verdict(difference, changed_count=count, num_sequences=batch.num_sequences)
    clock.timings["estimate"] = time.perf_counter() - start
    timings = dict(clock.timings)
    timings["total"] = time.perf_counter() - started
    return CRNResult(deltaH=float(per_prompt.mean()), se=_se(per_prompt), H_before=float(before.mean()),
                     H_after=float(after.mean()), deltaH_per_prompt=_tuple(per_prompt),
                     H_before_per_prompt=_tuple(before.mean(dim=1)), H_after_per_prompt=_tuple(after.mean(dim=1)),
                     changed_fraction=float(changed.mean()), changed_count=count,
                     changed_per_prompt=_tuple(changed.mean(dim=1)), top_share=top_share, reliable=reliable,
                     reason=reason,
                     integrand=integrand, B=batch.B, G=batch.G, forward_passes=clock.forward_passes,
                     sampling_passes=1, timings=timings)


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


def crn_delta_h(params: ParamsDict, update: ParamsDict, *, policy: Policy | None = None, sample: Any,
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
            sweep); computed here when None.
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


def entropy(params: ParamsDict, batch: RolloutBatch, *, policy: Policy | None = None, estimator: str = "sequence",
            per_token: bool = False, seq_chunk: int | None = None, token_chunk: int | None = None,
            progress: bool | None = False) -> EntropyResult:
    """Ĥ(θ) on a batch drawn from π_θ: −(1/(BG)) Σ S (spec §2), or Rao-Blackwell, or per token; SE over prompts.

    Per prompt Ĥ_n = (1/G) Σ_g f_{n,g} (f = −S, or Σ_k H(π_θ(·|t_<k)) for ``estimator="rao_blackwell"``), or
    Σ_g f / Σ_g T with ``per_token``; Ĥ = mean_n Ĥ_n, SE = sd_n(Ĥ_n)/sqrt(B) (NaN for B < 2). S is always the
    teacher-forced one (spec §6); the batch's recorded log-probabilities are not used.
    """
    check_snis_options("prompt", estimator, per_token, None)
    _check_batch(batch, "entropy")
    _require_policy(policy, "entropy", "S(θ) or the next-token entropies")
    policy.check_params(params, "params")
    clock = _Clock()
    started = time.perf_counter()
    chunks = _chunks(seq_chunk, token_chunk, progress)
    if estimator == "rao_blackwell":
        values = clock.run("entropies", lambda: policy.token_entropies(params, batch, **chunks))
    else:
        values = -clock.run("logprobs", lambda: policy.sequence_logprobs(params, batch, **chunks))
    _check_values("the integrand (−S or the summed entropies)", values)
    ones = torch.ones_like(values)
    lengths = None
    if per_token:
        lengths = batch.response_lengths.to("cpu", torch.float64)
        empty = lengths.sum(dim=1) <= 0
        if bool(empty.any()):
            raise ValueError(f"per_token=True: prompt(s) {empty.nonzero().flatten().tolist()} have no response "
                             "tokens; their entropy per token is undefined. Use per_token=False.")
    per_prompt = _prompt_ratio(ones, values, lengths)
    timings = dict(clock.timings)
    timings["total"] = time.perf_counter() - started
    return EntropyResult(H=float(per_prompt.mean()), se=_se(per_prompt), H_per_prompt=_tuple(per_prompt),
                         estimator=estimator, per_token=per_token, B=batch.B, G=batch.G,
                         forward_passes=clock.forward_passes, timings=timings)
