"""ΔH — the realised entropy change of a step, by importance sampling (spec §6, ``shared/spec/ESTIMATORS.md``).

Given θ, an update θ⁺ (a params dict, e.g. from ``rl_update``) and a batch drawn from π_θ, the entropy after the step
is estimated on the *same* tokens by reweighting them with w = π_θ⁺ / π_θ:

    S_i = S(θ),  S⁺_i = S(θ⁺)  (same tokens, masks and τ),      log w_i = S⁺_i − S_i   (float64)

    Ĥ_n(θ)  = −(1/G) Σ_g S_{n,g}
    Ĥ_n(θ⁺) = −Σ_g w̃_{n,g} S⁺_{n,g},   w̃_{n,g} = exp(log w_{n,g} − logsumexp_j log w_{n,j})
    ΔĤ      = (1/B) Σ_n [Ĥ_n(θ⁺) − Ĥ_n(θ)],   SE = sd_n(ΔĤ_n) / sqrt(B)

Only forward passes are needed (no gradients): S(θ⁺) — and S(θ) when the batch has no cached ``logprobs`` — through
``Policy.sequence_logprobs``, chunked over sequences and vocabulary rows like everything else; the Rao-Blackwell
estimator adds ``Policy.token_entropies`` at θ and θ⁺. Nothing is modified: there is no optimizer step and no undo.

The options of spec §6, all in :func:`importance_weighted_delta_h` (a pure function of S, S⁺, which the tests
exercise directly):

* ``normalize="prompt"`` (default): the per-prompt self-normalised estimator above. Consistent; its bias is O(1/G).
* ``normalize="global"``: one normalisation over all B·G samples, Ĥ(θ⁺) = Σ_i w̃_i f⁺_i with w̃ summing to 1 over
  the batch (the seed's choice; it reweights prompts against each other). For the SE, ΔĤ is a difference of two
  ratio estimators R = Σ_n a_n / Σ_n b_n (a_n = Σ_g u_{n,g} f⁺_{n,g}, b_n = Σ_g u_{n,g}, u = w up to one global
  constant factor, which cancels). Its per-prompt contributions are the delta-method (influence-function)
  pseudo-values R + (a_n − R b_n) / b̄; ΔĤ_n is the difference of those of Ĥ(θ⁺) and Ĥ(θ). They average exactly to
  ΔĤ, and sd_n(ΔĤ_n)/sqrt(B) is the usual linearised (delta-method) standard error of a ratio estimator.
* ``normalize="none"``: ordinary importance sampling, Ĥ_n(θ⁺) = −(1/G) Σ_g w_{n,g} S⁺_{n,g}; unbiased since
  E_θ[w] = 1 per prompt, but its variance grows with the scale of the weights, not only their spread. The weights
  are applied as exp(m_n)·exp(log w − m_n), m_n = max_g log w_{n,g}, so no intermediate overflows; the estimate
  itself is ±inf only when it is beyond float64 (log-weights near +709 and above), and is then flagged unreliable.
* ``per_token=True``: Ĥ_tok = Σ_i w̃_i f⁺_i / Σ_i w̃_i T_i (T_i the response length), per prompt for "prompt" (and
  for "none": in the ratio the weights' normaliser cancels, so "none" gives exactly the "prompt" numbers), over
  the whole batch for "global" (one ratio, SE by the same delta method). Ĥ_tok(θ) is the same ratio with w̃ ≡ 1.
  For "prompt"/"none" the batch value is the mean over prompts of the per-prompt entropy rates.
* ``estimator="rao_blackwell"``: f⁺_i = Σ_k H(π_θ⁺(·|t_<k)) (the full next-token entropies along the sampled prefix)
  instead of −S⁺_i, and likewise f_i at θ: the same expectation, lower variance for the self-normalised
  estimators ("prompt", "global"; by far, in the tests). Not for ``normalize="none"``: there the weights' own
  variance multiplies the integrand's size (Var(w f⁺) ≈ Var(w)·E[f⁺]² when f⁺ hardly varies), and −S⁺, which is
  negatively correlated with w, partly cancels it where the smooth RB integrand cannot — in the enumeration tests
  RB "none" has the *larger* variance. The weights are unchanged. Default ``estimator="sequence"``: f⁺ = −S⁺, f = −S.
* ``clip=c``: log-weights with |log w| > c are clipped to ±c before weighting. Clipping **biases** the estimate
  (towards the entropy at θ for large steps); it trades bias for variance and the clipped fraction is reported so
  that the trade is visible. The diagnostics below are always of the raw (unclipped) log-weights.

Diagnostics (spec §6), all from the raw log-weights: the log-weight summary (min, max, mean, sd); Kish ESS =
(Σw)²/Σw² per prompt (min and mean of ESS/G) and over all B·G raw weights (ESS/(BG)); PSIS k̂ over all B·G
log-weights with its threshold ``psis_threshold(B·G)``. The estimate is flagged ``reliable=False`` with a ``reason``
and the advice to resample at θ⁺ or lower η when

* the smallest per-prompt ESS/G is below :data:`MIN_ESS_FRACTION` (0.5), or, for ``normalize="global"``, the global
  ESS/(BG) is;
* k̂ exceeds the threshold, or k̂ is NaN. k̂ is *assessed* only with at least :data:`PSIS_MIN_SAMPLES` (21)
  log-weights whose range max − min exceeds :data:`KHAT_MIN_LOG_WEIGHT_RANGE` (0.05). Below 21 a generalised-Pareto
  fit has fewer than 5 tail values (``psis_khat`` returns inf, "no fit possible"). With a log-weight range ≤ 0.05
  every weight is within a factor e^0.05 ≈ 1.05 of every other, so no sample can dominate whatever the "tail shape"
  — and the shape k̂ reports for such weights is noise: for small N the fit's tail has only M = ceil(min(N/5,
  3·sqrt(N))) values and the estimator's prior pulls k̂ towards 0.5, above the threshold 1 − 1/log10 N for N < 100
  (0.34 at N = 32), so a tiny step would always be flagged. (Above the range, small batches — B·G < 100 — are
  still flagged often for the same reason; that is the spec's rule, kept.) The k̂ value is reported either way, with
  ``khat_assessed`` saying whether it entered the verdict;
* the estimate is not finite (ordinary IS with astronomically large weights).

Public API: :func:`snis_delta_h` → :class:`SNISResult`; :func:`entropy` → :class:`EntropyResult`; :func:`lr_sweep`
→ :class:`LRSweepResult` (and :func:`plot_lr_sweep`); the pure parts :func:`importance_weighted_delta_h` →
:class:`WeightedEstimate` and :func:`weight_diagnostics` → :class:`WeightDiagnostics`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from .adam import AdamState, scaled_update
from .batch import RolloutBatch
from .policy import Policy
from .stats import mean_and_se, psis_khat, psis_threshold
from .update import update_direction

__all__ = [
    "MIN_ESS_FRACTION",
    "PSIS_MIN_SAMPLES",
    "KHAT_MIN_LOG_WEIGHT_RANGE",
    "NORMALIZATIONS",
    "ESTIMATORS",
    "WeightedEstimate",
    "importance_weighted_delta_h",
    "WeightDiagnostics",
    "weight_diagnostics",
    "SNISResult",
    "snis_delta_h",
    "EntropyResult",
    "entropy",
    "LRSweepRow",
    "LRSweepResult",
    "lr_sweep",
    "plot_lr_sweep",
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

NORMALIZATIONS = ("prompt", "global", "none")
ESTIMATORS = ("sequence", "rao_blackwell")

_ADVICE = "Resample the batch at θ⁺ (draw fresh responses from the updated policy) or lower η."

ParamsDict = Mapping[str, Tensor]


# ------------------------------------------------------------------------------------------------------ validation
def _check_options(normalize: str, estimator: str, per_token: bool, clip: float | None) -> float | None:
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS} (spec §6); got {normalize!r}. Use 'prompt' "
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
            "diverged step), a token of probability 0 under θ⁺, or a corrupt cached batch.logprobs causes this. "
            "Check the update for non-finite values (all(torch.isfinite(t).all() for t in update.values())), lower "
            "η, or recompute the batch's logprobs.")
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
    clip = _check_options(normalize, "sequence", per_token, clip)
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


# ------------------------------------------------------------------------------------------------------ results
def _fmt(value: float | None, spec: str = ".6g") -> str:
    if value is None:
        return "—"
    return format(value, spec)


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
        reliable, reason: the verdict; ``reason`` says why not, with the advice to resample at θ⁺ or lower η.
        clip, clipped_fraction: the clip level (None: no clipping) and the fraction of sequences with |log w| > clip.
        normalize, estimator, per_token: the settings. B, G: the batch's shape.
        timings: seconds per phase. forward_passes: passes over the batch (each a chunked forward of B·G sequences).

    Non-finite floats stay as they are (``json.dumps`` writes NaN / Infinity), as in the rest of funcprobe.
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
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain Python (lists for the per-prompt values and log-weights)."""
        data = asdict(self)
        for name in ("deltaH_per_prompt", "H_before_per_prompt", "H_after_per_prompt", "ess_per_prompt"):
            data[name] = list(data[name])
        data["log_weights"] = [list(row) for row in self.log_weights]
        data["timings"] = dict(self.timings)
        return data

    def __str__(self) -> str:
        unit = "nats/token" if self.per_token else "nats/sequence"
        khat_note = "" if self.khat_assessed else " (not assessed: B·G < 21 or log w range ≤ 0.05)"
        lines = [
            f"ΔH by importance sampling — normalize={self.normalize}, estimator={self.estimator}, {unit}, "
            f"B={self.B}, G={self.G}",
            f"{'quantity':<26}{'value':>14}{'SE':>12}",
            f"{'H(θ)':<26}{self.H_before:>14.6g}",
            f"{'H(θ⁺)':<26}{self.H_after:>14.6g}",
            f"{'ΔH':<26}{self.deltaH:>14.6g}{self.se:>12.4g}",
            f"{'log w min / max':<26}{self.log_weight_min:>14.4g}{self.log_weight_max:>12.4g}",
            f"{'log w mean / sd':<26}{self.log_weight_mean:>14.4g}{self.log_weight_sd:>12.4g}",
            f"{'ESS/G per prompt min/mean':<26}{self.ess_min_fraction:>14.3f}{self.ess_mean_fraction:>12.3f}",
            f"{'ESS/(BG) global':<26}{self.ess_global_fraction:>14.3f}",
            f"{'PSIS k̂ / threshold':<26}{self.khat:>14.3f}{self.khat_threshold:>12.3f}{khat_note}",
        ]
        if self.clip is not None:
            lines.append(f"{'clipped (|log w| > ' + format(self.clip, 'g') + ')':<26}{self.clipped_fraction:>14.3f}"
                         "   (clipping biases ΔH)")
        lines.append("reliable: yes" if self.reliable else f"reliable: NO — {self.reason}")
        lines.append(f"{self.forward_passes} forward passes; "
                     + ", ".join(f"{k} {v:.3f}s" for k, v in self.timings.items()))
        return "\n".join(lines)


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
        return (f"Ĥ(θ) = {self.H:.6g} ± {self.se:.3g} {unit} (estimator={self.estimator}, B={self.B}, G={self.G}, "
                f"{self.forward_passes} forward passes)")


def _tuple(tensor: Tensor) -> tuple[float, ...]:
    return tuple(float(x) for x in tensor.tolist())


# --------------------------------------------------------------------------------------------------- the runners
class _Clock:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self.forward_passes = 0

    def run(self, phase: str, fn: Callable[[], Tensor], passes: int = 1) -> Tensor:
        start = time.perf_counter()
        out = fn()
        self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - start
        self.forward_passes += passes
        return out


def _check_batch(batch: Any, fn: str) -> None:
    if not isinstance(batch, RolloutBatch):
        raise ValueError(f"{fn}: batch must be a funcprobe.RolloutBatch; got {type(batch).__name__}. Build one with "
                         "RolloutBatch(...) or RolloutBatch.load(path).")


def _require_policy(policy: Any, batch: RolloutBatch, fn: str, needs: str) -> None:
    if policy is None:
        cached = ("" if batch.logprobs is not None else
                  " and S(θ): the batch has no cached logprobs (batch.logprobs is None)")
        raise ValueError(f"{fn} needs policy= to compute {needs}{cached}. Pass policy=funcprobe.Policy(...) (or "
                         "load_policy(base, adapter)); a batch sampled with logprobs recorded saves the S(θ) pass.")
    if not isinstance(policy, Policy):
        raise ValueError(f"{fn}: policy must be a funcprobe.Policy; got {type(policy).__name__}.")


def _snis(params: ParamsDict, update: ParamsDict, *, policy: Policy, batch: RolloutBatch, normalize: str,
          per_token: bool, estimator: str, clip: float | None, seq_chunk: int | None, token_chunk: int | None,
          progress: bool | None, S: Tensor | None = None, E: Tensor | None = None,
          clock: _Clock | None = None, world=None) -> SNISResult:
    """snis_delta_h after validation; S (and, for RB, E) at θ may be given (an lr sweep computes them once).

    With a distributed ``world`` each rank forwards only its range of sequence chunks and the [B, G] matrices (S,
    S⁺, and the entropies) are combined over ranks, so the estimate below runs on identical inputs on every rank.
    """
    clock = _Clock() if clock is None else clock
    started = time.perf_counter()
    chunks = dict(seq_chunk=seq_chunk, token_chunk=token_chunk, progress=progress)
    sharded = _sharded_pass(world, batch)
    if S is None:
        if batch.logprobs is not None:
            S = batch.logprobs.to("cpu", torch.float64)
        else:
            S = clock.run("logprobs_before",
                          lambda: sharded(lambda **k: policy.sequence_logprobs(params, batch, **chunks, **k)))
    S_plus = clock.run("logprobs_after",
                       lambda: sharded(lambda **k: policy.sequence_logprobs(update, batch, **chunks, **k)))
    values_before = values_after = None
    if estimator == "rao_blackwell":
        if E is None:
            E = clock.run("entropies_before",
                          lambda: sharded(lambda **k: policy.token_entropies(params, batch, **chunks, **k)))
        values_before = E
        values_after = clock.run("entropies_after",
                                 lambda: sharded(lambda **k: policy.token_entropies(update, batch, **chunks, **k)))
    start = time.perf_counter()
    estimate = importance_weighted_delta_h(
        S, S_plus, normalize=normalize, per_token=per_token,
        lengths=batch.response_lengths.to("cpu", torch.float64) if per_token else None,
        values_before=values_before, values_after=values_after, clip=clip)
    diag = weight_diagnostics(estimate.log_weights, normalize=normalize)
    reliable, reason = diag.reliable, diag.reason
    if not (math.isfinite(estimate.deltaH) and math.isfinite(estimate.H_after)):
        extra = ("the estimate is not finite: ordinary importance weights (normalize='none') beyond float64 "
                 f"(max log w = {diag.log_weight_max:.4g}). Use normalize='prompt'. {_ADVICE}")
        reliable, reason = False, (reason + " Also: " + extra) if reason else extra
    clock.timings["estimate"] = clock.timings.get("estimate", 0.0) + time.perf_counter() - start
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
        forward_passes=clock.forward_passes, timings=timings)


def _sharded_pass(world, batch: RolloutBatch) -> Callable[[Callable[..., Tensor]], Tensor]:
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


def snis_delta_h(params: ParamsDict, update: ParamsDict, *, policy: Policy | None = None,
                 batch: RolloutBatch, normalize: str = "prompt", per_token: bool = False,
                 estimator: str = "sequence", clip: float | None = None, seq_chunk: int | None = None,
                 token_chunk: int | None = None, progress: bool | None = False, world=None) -> SNISResult:
    """ΔĤ = Ĥ(θ⁺) − Ĥ(θ) by importance sampling on a batch drawn from π_θ (spec §6).

    Args:
        params: θ, the policy's LoRA params dict (the batch was sampled from π_θ).
        update: θ⁺, a params dict with exactly the policy's names, shapes, dtypes and device (e.g. ``rl_update``'s).
        policy: the ``Policy`` (required: S(θ⁺) needs forwards).
        batch: the rollout batch; its cached ``logprobs`` are used as S(θ) when present (one forward pass fewer).
        normalize: "prompt" (default) | "global" | "none"; per_token: entropy per response token;
        estimator: "sequence" | "rao_blackwell"; clip: clip |log w| at this level (biased; reported) — all as in
            the module docstring.
        seq_chunk, token_chunk: sequences per decoder forward and response rows per vocabulary chunk (default the
            policy's); progress: a progress bar per pass.

    Forward passes only (no gradients): S(θ⁺) (1), S(θ) if not cached (1), and for Rao-Blackwell the entropies at
    θ and θ⁺ (2). Nothing is modified.

    world: a ``funcprobe.distributed.World`` (issue 6): every rank passes the whole batch and forwards a contiguous
    range of its sequence chunks (sharded by sequence index, so that each chunk — and therefore each S and S⁺ — is
    exactly the one a single process computes: a per-prompt shard would re-chunk the sequences and change S in
    the last bits, which the cancellation in log w = S⁺ − S and in ΔĤ = Ĥ⁺ − Ĥ amplifies to ~1e-11 relative). The
    [B, G] per-sequence values (B·G float64 per pass) are summed over ranks with disjoint supports, which is exact;
    every field then equals the single-process result (``timings`` are this rank's).

    Raises ValueError (naming the problem and the fix) for: a bad option, an update (or params) whose names, shapes
    or dtypes differ from the policy's, a missing policy, and NaN/inf log-weights (naming the sequences).
    """
    clip = _check_options(normalize, estimator, per_token, clip)
    _check_batch(batch, "snis_delta_h")
    _require_policy(policy, batch, "snis_delta_h", "S(θ⁺)")
    policy.check_params(params, "params")
    policy.check_params(update, "update")
    return _snis(params, update, policy=policy, batch=batch, normalize=normalize, per_token=per_token,
                 estimator=estimator, clip=clip, seq_chunk=seq_chunk, token_chunk=token_chunk, progress=progress,
                 world=world)


def entropy(params: ParamsDict, batch: RolloutBatch, *, policy: Policy | None = None, estimator: str = "sequence",
            per_token: bool = False, seq_chunk: int | None = None, token_chunk: int | None = None,
            progress: bool | None = False) -> EntropyResult:
    """Ĥ(θ) on a batch drawn from π_θ: −(1/(BG)) Σ S (spec §2), or Rao-Blackwell, or per token; SE over prompts.

    Per prompt Ĥ_n = (1/G) Σ_g f_{n,g} (f = −S, or Σ_k H(π_θ(·|t_<k)) for ``estimator="rao_blackwell"``), or
    Σ_g f / Σ_g T with ``per_token``; Ĥ = mean_n Ĥ_n, SE = sd_n(Ĥ_n)/sqrt(B) (NaN for B < 2). The sequence
    estimator uses the batch's cached ``logprobs`` when present, and then needs no policy.
    """
    _check_options("prompt", estimator, per_token, None)
    _check_batch(batch, "entropy")
    clock = _Clock()
    started = time.perf_counter()
    chunks = dict(seq_chunk=seq_chunk, token_chunk=token_chunk, progress=progress)
    if estimator == "sequence" and batch.logprobs is not None:
        if policy is not None:
            policy.check_params(params, "params")
        values = -batch.logprobs.to("cpu", torch.float64)
    else:
        if policy is None:
            needs = ("the next-token entropies (estimator='rao_blackwell')" if estimator == "rao_blackwell" else
                     "S(θ): the batch has no cached logprobs (batch.logprobs is None)")
            raise ValueError(f"entropy needs policy= to compute {needs}. Pass policy=funcprobe.Policy(...), or a "
                             "batch with logprobs cached at sampling time (estimator='sequence').")
        _require_policy(policy, batch, "entropy", "")
        policy.check_params(params, "params")
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


# ------------------------------------------------------------------------------------------------------ lr sweep
@dataclass(frozen=True)
class LRSweepRow:
    """One learning rate of a sweep: ΔĤ(η) with its SE and diagnostics, and the first-order prediction.

    ``predicted``/``predicted_se``: (η/lr)·δH₁ and (η/lr)·SE(δH₁) (or the plug-in product with a separate update
    batch; see :func:`lr_sweep`); ``predicted_plugin``: (η/lr)·deltaH1_plugin. None where not available.
    """

    eta: float
    factor: float
    deltaH: float
    se: float
    H_after: float
    ess_min_fraction: float
    ess_mean_fraction: float
    ess_global_fraction: float
    khat: float
    khat_threshold: float
    reliable: bool
    reason: str
    predicted: float | None
    predicted_se: float | None
    predicted_plugin: float | None


@dataclass(frozen=True)
class LRSweepResult:
    """ΔĤ(η) for θ(η) = θ + (η/lr)·Δθ over a list of learning rates, beside δH₁(η) (spec §4–§6).

    Fields: ``lr`` the step's own learning rate (Δθ is the step at lr); ``rows`` one :class:`LRSweepRow` per η (in
    the order given); ``results`` the full :class:`SNISResult` of each; ``H_before`` Ĥ(θ); ``prediction`` what the
    predicted columns hold ("deltaH1": the U-statistic δH₁ of the same batch scaled by η/lr; "plugin": −X̄·Δθ with X̄
    from the evaluation batch and Δθ from the separate update batch; "none"); ``deltaH1``, ``deltaH1_se``,
    ``deltaH1_plugin`` the prediction at η = lr; ``same_batch`` whether the step was made on the evaluation batch.
    """

    lr: float
    rows: tuple[LRSweepRow, ...]
    results: tuple[SNISResult, ...]
    H_before: float
    prediction: str
    deltaH1: float | None
    deltaH1_se: float | None
    deltaH1_plugin: float | None
    same_batch: bool
    normalize: str
    estimator: str
    per_token: bool
    B: int
    G: int
    forward_passes: int
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.__dataclass_fields__ if name not in ("rows", "results")}
        data["rows"] = [asdict(row) for row in self.rows]
        data["results"] = [result.to_dict() for result in self.results]
        data["timings"] = dict(self.timings)
        return data

    def __str__(self) -> str:
        head = (f"ΔH(η) sweep — lr={self.lr:.4g}, normalize={self.normalize}, estimator={self.estimator}, "
                f"{'per token' if self.per_token else 'per sequence'}, B={self.B}, G={self.G}, Ĥ(θ)="
                f"{self.H_before:.6g}; prediction: {self.prediction}")
        lines = [head,
                 "| η | η/lr | ΔH | SE | predicted | pred. SE | ESS/G min | ESS/G mean | ESS/(BG) | k̂ | reliable |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(
                f"| {r.eta:.4g} | {r.factor:.4g} | {r.deltaH:.6g} | {r.se:.3g} | {_fmt(r.predicted)} | "
                f"{_fmt(r.predicted_se, '.3g')} | {r.ess_min_fraction:.3f} | {r.ess_mean_fraction:.3f} | "
                f"{r.ess_global_fraction:.3f} | {r.khat:.3f} | {'yes' if r.reliable else 'NO'} |")
        unreliable = [r for r in self.rows if not r.reliable]
        if unreliable:
            lines.append(f"unreliable at η = {', '.join(format(r.eta, '.4g') for r in unreliable)}: "
                         f"{unreliable[0].reason}")
        lines.append(f"{self.forward_passes} forward passes; "
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


def _leave_one_out_centred(S: Tensor) -> Tensor:
    """S_{n,g} − S̄_{n,−g} (spec §2)."""
    G = S.shape[1]
    loo = (S.sum(dim=1, keepdim=True) - S) / (G - 1)
    return S - loo


def _plugin_prediction(policy: Policy, params: ParamsDict, batch: RolloutBatch, S: Tensor, delta: ParamsDict,
                       seq_chunk: int | None, token_chunk: int | None,
                       progress: bool | None) -> tuple[float, float]:
    """−X̄·Δθ with X̄ from ``batch`` (spec §2) and its SE over prompts: one forward and ~B + #chunks vjps.

    X_n·Δθ = ∇[(1/G) Σ_g c_{n,g} S_{n,g}]·Δθ with the constant cotangent c = S − S̄_{−g} (S at θ, given); per sequence
    chunk, one vjp per prompt present in it, each dotted with Δθ at once (reverse mode: forward-mode AD is not
    implemented for every attention kernel, e.g. PyTorch's CPU flash SDPA).
    """
    G = batch.G
    cotangent = (_leave_one_out_centred(S.to("cpu", torch.float64)) / G).reshape(-1)
    direction = {name: delta[name].to("cpu", torch.float64) for name in params}
    x_dot = torch.zeros(batch.B, dtype=torch.float64)
    for item in policy.iter_logprob_vjps(params, batch, seq_chunk=seq_chunk, token_chunk=token_chunk,
                                         progress=progress):
        flat = item.chunk.flat_index.cpu()
        prompts = flat // G
        for n in torch.unique(prompts).tolist():
            chunk_cotangent = torch.where(prompts == n, cotangent[flat], torch.zeros(()))
            grads = item.vjp(chunk_cotangent.to(policy.device))
            x_dot[n] += sum(float((grad.to("cpu", torch.float64) * direction[name]).sum())
                            for name, grad in grads.items())
    per_prompt = -x_dot
    return float(per_prompt.mean()), _se(per_prompt)


def lr_sweep(params: ParamsDict, batch: RolloutBatch, *, policy: Policy, adam: AdamState, etas: Sequence[float],
             update_batch: RolloutBatch | None = None, lr: float | None = None, max_grad_norm: float | None = None,
             delta_h1_fn: Callable[[ParamsDict, RolloutBatch], Any] | None = None, normalize: str = "prompt",
             per_token: bool = False, estimator: str = "sequence", clip: float | None = None,
             seq_chunk: int | None = None, token_chunk: int | None = None,
             progress: bool | None = False, world=None) -> LRSweepResult:
    """ΔĤ(η) for the step's direction at several learning rates η, with the first-order prediction beside it.

    One ``update_direction`` on ``update_batch`` (default: the evaluation ``batch``) gives Δθ at the step's learning
    rate lr (``lr`` overrides the state's; all tensors must share one lr); then θ(η) = ``scaled_update(params, Δθ,
    η/lr)`` (spec §4: every term of Δθ is ∝ lr) and ΔĤ(η) = ``snis_delta_h(params, θ(η), batch=batch, …)``. S(θ)
    (and the entropies at θ for Rao-Blackwell) are computed once for the whole sweep.

    Prediction (of the sequence-level entropy change; None with ``per_token=True``, which estimates another
    quantity):

    * same batch: ``delta_h1_fn(params, batch)`` (e.g. ``functools.partial(funcprobe.delta_h1.delta_h1,
      policy=policy, adam=adam)``, making the same step: same state, lr and clipping) must return an object with
      ``deltaH1``, ``se_deltaH1`` and ``deltaH1_plugin``; predicted(η) = (η/lr)·deltaH1 with SE (η/lr)·se_deltaH1.
      Without ``delta_h1_fn`` there is no prediction.
    * separate ``update_batch``: the plug-in product −X̄·Δθ, X̄ from the evaluation batch (spec §2) and Δθ from the
      update batch, computed here by one forward-mode pass along Δθ. The two batches are independent, so
      E[X̄·Δθ | Δθ] = −∇H·Δθ: there are no same-prompt products X_n·P·Y_n to remove and no U-statistic correction is
      needed. Its SE is sd_n(−X_n·Δθ)/sqrt(B) over the evaluation prompts, conditional on Δθ (as ΔĤ's is). It
      costs one forward and about B vjps over the evaluation batch. ``delta_h1_fn`` is not used then.

    world: a ``funcprobe.distributed.World`` (issue 6): the step's gradient and every ΔĤ(η) are computed sharded
    (see ``snis_delta_h``); the separate-update-batch plug-in prediction is not distributed (refused).
    """
    clip = _check_options(normalize, estimator, per_token, clip)
    _check_batch(batch, "lr_sweep")
    _require_policy(policy, batch, "lr_sweep", "the step and S(θ(η))")
    if update_batch is not None:
        _check_batch(update_batch, "lr_sweep (update_batch)")
    eta_values = _check_etas(etas)
    policy.check_params(params, "params")
    same_batch = update_batch is None or update_batch is batch
    clock = _Clock()
    started = time.perf_counter()
    chunks = dict(seq_chunk=seq_chunk, token_chunk=token_chunk, progress=progress)
    distributed = world is not None and world.distributed
    if distributed and not same_batch:
        raise ValueError("lr_sweep with a separate update_batch (the plug-in prediction) is not distributed; run it "
                         "in one process, or sweep on the same batch.")
    decomposition = clock.run("update_direction", lambda: update_direction(
        params, batch if same_batch else update_batch, policy=policy, adam=adam, lr=lr,
        max_grad_norm=max_grad_norm, world=world, **chunks))
    try:
        lr_ref = decomposition.lr
    except ValueError as error:
        raise ValueError(f"lr_sweep needs one learning rate shared by all tensors to scale the step by η/lr: "
                         f"{error}. Pass lr= to override every group's learning rate.") from None
    if not lr_ref > 0:
        raise ValueError(f"lr_sweep: the step's learning rate is {lr_ref}; η/lr is undefined. Pass lr > 0.")
    delta = decomposition.delta_theta()

    sharded = _sharded_pass(world, batch)
    S = batch.logprobs.to("cpu", torch.float64) if batch.logprobs is not None else \
        clock.run("logprobs_before", lambda: sharded(lambda **k: policy.sequence_logprobs(params, batch, **chunks, **k)))
    E = clock.run("entropies_before", lambda: sharded(lambda **k: policy.token_entropies(params, batch, **chunks, **k))) \
        if estimator == "rao_blackwell" else None

    prediction, h1, h1_se, h1_plugin = "none", None, None, None
    if not per_token:
        if same_batch and delta_h1_fn is not None:
            start = time.perf_counter()
            result = delta_h1_fn(params, batch)
            clock.timings["delta_h1"] = time.perf_counter() - start
            missing = [a for a in ("deltaH1", "se_deltaH1", "deltaH1_plugin") if not hasattr(result, a)]
            if missing:
                raise ValueError(f"delta_h1_fn returned a {type(result).__name__} without {missing}; it must return "
                                 "an object with deltaH1, se_deltaH1 and deltaH1_plugin (a DeltaH1Result).")
            other_lr = getattr(result, "lr", None)
            if isinstance(other_lr, (int, float)) and not math.isclose(other_lr, lr_ref, rel_tol=1e-9):
                raise ValueError(f"delta_h1_fn made its step at lr={other_lr} but the sweep's step uses lr={lr_ref}; "
                                 "give both the same AdamState, lr and max_grad_norm.")
            prediction = "deltaH1"
            h1, h1_se, h1_plugin = float(result.deltaH1), float(result.se_deltaH1), float(result.deltaH1_plugin)
        elif not same_batch:
            h1, h1_se = clock.run("plugin_prediction", lambda: _plugin_prediction(
                policy, params, batch, S, delta, seq_chunk, token_chunk, progress))
            prediction, h1_plugin = "plugin", h1

    rows, results = [], []
    for eta in eta_values:
        factor = eta / lr_ref
        update = scaled_update(params, delta, factor)
        result = _snis(params, update, policy=policy, batch=batch, normalize=normalize, per_token=per_token,
                       estimator=estimator, clip=clip, S=S, E=E, world=world, **chunks)
        for phase, seconds in result.timings.items():
            if phase != "total":
                clock.timings[phase] = clock.timings.get(phase, 0.0) + seconds
        clock.forward_passes += result.forward_passes
        results.append(result)
        rows.append(LRSweepRow(
            eta=eta, factor=factor, deltaH=result.deltaH, se=result.se, H_after=result.H_after,
            ess_min_fraction=result.ess_min_fraction, ess_mean_fraction=result.ess_mean_fraction,
            ess_global_fraction=result.ess_global_fraction, khat=result.khat, khat_threshold=result.khat_threshold,
            reliable=result.reliable, reason=result.reason,
            predicted=None if h1 is None else factor * h1,
            predicted_se=None if h1_se is None else abs(factor) * h1_se,
            predicted_plugin=None if h1_plugin is None else factor * h1_plugin))
    timings = dict(clock.timings)
    timings["total"] = time.perf_counter() - started
    H_before = results[0].H_before
    return LRSweepResult(lr=lr_ref, rows=tuple(rows), results=tuple(results), H_before=H_before,
                         prediction=prediction, deltaH1=h1, deltaH1_se=h1_se, deltaH1_plugin=h1_plugin,
                         same_batch=same_batch, normalize=normalize, estimator=estimator, per_token=per_token,
                         B=batch.B, G=batch.G, forward_passes=clock.forward_passes, timings=timings)


def plot_lr_sweep(result: LRSweepResult, path: str, *, z: float = 1.96) -> str:
    """Plot ΔĤ(η) with ±z·SE error bars against η (log x-axis), and the prediction with its band; save to ``path``.

    Unreliable points are drawn hollow. Needs matplotlib (not a funcprobe dependency). Returns ``path``.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plot_lr_sweep needs matplotlib, which funcprobe does not install: "
                          "pip install matplotlib") from error
    if not isinstance(result, LRSweepResult):
        raise ValueError(f"plot_lr_sweep takes an LRSweepResult (from lr_sweep); got {type(result).__name__}.")
    rows = sorted(result.rows, key=lambda r: r.eta)
    positive = [r for r in rows if r.eta > 0]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for reliable, style in ((True, dict(fmt="o", color="C0")), (False, dict(fmt="o", color="C0", mfc="none"))):
        chosen = [r for r in positive if r.reliable == reliable]
        if chosen:
            ax.errorbar([r.eta for r in chosen], [r.deltaH for r in chosen], yerr=[z * r.se for r in chosen],
                        capsize=3, label=f"ΔĤ (IS, {result.normalize})" + ("" if reliable else ", unreliable"),
                        **style)
    predicted = [r for r in positive if r.predicted is not None]
    if predicted:
        x = [r.eta for r in predicted]
        y = [r.predicted for r in predicted]
        ax.plot(x, y, "-", color="C1", label=f"prediction ({result.prediction})")
        if all(r.predicted_se is not None and math.isfinite(r.predicted_se) for r in predicted):
            ax.fill_between(x, [v - z * r.predicted_se for v, r in zip(y, predicted)],
                            [v + z * r.predicted_se for v, r in zip(y, predicted)], color="C1", alpha=0.2)
    ax.axhline(0.0, color="0.6", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate η")
    ax.set_ylabel("ΔH (nats/token)" if result.per_token else "ΔH (nats/sequence)")
    ax.set_title(f"entropy change of one step (lr = {result.lr:.3g})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
