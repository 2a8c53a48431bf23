"""Small pure statistics: standard errors, Kish ESS, PSIS k̂.

Spec §5 and §6 (``shared/spec/ESTIMATORS.md``). Every function here is a pure function of its inputs: no global
state, no in-place modification of an argument. Inputs may be tensors (any floating dtype: float32 is upcast),
numpy arrays or sequences; every computation runs in float64 and tensor results are float64.

* §5 standard errors: :func:`jackknife_se` (the delete-one jackknife of a U-statistic or of the whole δH₁
  estimate) and :func:`mean_and_se` (the mean and sd/√n, used for ΔĤ's SE in §6).
* §6 importance-sampling diagnostics: :func:`kish_ess`, :func:`self_normalized_weights`, :func:`psis_khat` and
  :func:`psis_threshold`.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

__all__ = [
    "kish_ess",
    "self_normalized_weights",
    "psis_khat",
    "psis_threshold",
    "jackknife_se",
    "mean_and_se",
]

_F64 = torch.float64
_EPS = torch.finfo(_F64).eps
# log of the smallest positive normal float64: the floor of the PSIS tail cutoff, as in the reference code.
_LOG_TINY = math.log(torch.finfo(_F64).tiny)


def _as_f64(x) -> Tensor:
    """A float64 tensor view/copy of ``x`` (never modified in place by the callers)."""
    if isinstance(x, Tensor):
        return x.detach().to(_F64)
    return torch.as_tensor(x, dtype=_F64)


# ---------------------------------------------------------------------------------------------------------------------
# §6: importance-sampling diagnostics
# ---------------------------------------------------------------------------------------------------------------------


def kish_ess(log_weights, dim: int = -1) -> Tensor:
    """Kish effective sample size (Σw)² / Σw² along ``dim``, from log-weights (spec §6, "Diagnostics").

    Computed as ``exp(2·logsumexp(lw) − logsumexp(2·lw))``, so it neither overflows nor underflows for log-weights
    of any finite size (±1000 included) and is exactly invariant to adding a constant to the log-weights (up to
    rounding). The result lies in [1, N] for N finite weights; ``-inf`` entries are zero weights and count as
    absent. If every weight along ``dim`` is zero (all ``-inf``) the ESS is NaN; a NaN or ``+inf`` log-weight also
    gives NaN. Returns a float64 tensor with ``dim`` reduced.
    """
    lw = _as_f64(log_weights)
    return torch.exp(2.0 * torch.logsumexp(lw, dim=dim) - torch.logsumexp(2.0 * lw, dim=dim))


def self_normalized_weights(log_weights, dim: int = -1) -> Tensor:
    """Self-normalised weights w̃ = exp(lw − logsumexp(lw)) along ``dim`` (spec §6; they sum to 1 along ``dim``).

    Stable for log-weights of any finite size. Float64 tensor of the input's shape.
    """
    lw = _as_f64(log_weights)
    return torch.exp(lw - torch.logsumexp(lw, dim=dim, keepdim=True))


def psis_threshold(n: int) -> float:
    """The PSIS reliability threshold for a sample of size ``n``: min(1 − 1/log10 n, 0.7) (spec §6).

    k̂ above it flags the importance-sampling estimate as unreliable (Vehtari et al., 2024, §3). For n = 1 the
    formula's limit, ``-inf``, is returned (every k̂ is flagged); n < 1 raises ``ValueError``.
    """
    n = int(n)
    if n < 1:
        raise ValueError(f"psis_threshold needs a sample size n >= 1, got {n}")
    if n == 1:
        return -math.inf
    return min(1.0 - 1.0 / math.log10(n), 0.7)


def _gpdfit_k(ary: Tensor) -> float:
    """Zhang & Stephens (2009) empirical-Bayes estimate of the generalised-Pareto shape k, with the weakly
    informative prior of Vehtari et al.: k ← (n·k + 10·0.5) / (n + 10).

    ``ary`` is the 1-D float64 tensor of *sorted ascending*, positive exceedances. A line-for-line port of arviz
    (0.x) ``arviz.stats.stats._gpdfit`` (itself a port of the ``loo`` R package's ``gpdfit``), so that the two agree
    to float64 rounding; only k is returned (σ is not needed here).
    """
    prior_bs = 3
    prior_k = 10
    n = ary.shape[0]
    m_est = 30 + int(n**0.5)

    b_ary = 1.0 - torch.sqrt(m_est / (torch.arange(1, m_est + 1, dtype=_F64) - 0.5))
    b_ary = b_ary / (prior_bs * ary[int(n / 4 + 0.5) - 1])
    b_ary = b_ary + 1.0 / ary[-1]

    k_ary = torch.log1p(-b_ary[:, None] * ary).mean(dim=1)
    len_scale = n * (torch.log(-(b_ary / k_ary)) - k_ary - 1.0)
    weights = 1.0 / torch.exp(len_scale - len_scale[:, None]).sum(dim=1)

    # remove negligible weights, then normalise
    real = weights >= 10 * _EPS
    if not bool(real.all()):
        weights = weights[real]
        b_ary = b_ary[real]
    weights = weights / weights.sum()

    b_post = torch.sum(b_ary * weights)
    k_post = torch.log1p(-b_post * ary).mean()
    k_post = (n * k_post + prior_k * 0.5) / (n + prior_k)
    return float(k_post)


def psis_khat(log_weights) -> float:
    """PSIS k̂: the generalised-Pareto shape estimate of the weights' right tail (spec §6, "Diagnostics").

    Vehtari, Simpson, Gelman, Yao & Gabry, "Pareto smoothed importance sampling" (JMLR 25(72), 2024). For N
    log-weights (a 1-D input; the k̂ of one prompt's G samples or of all B·G):

    1. shift the log-weights so the largest is 0 (k̂ is invariant to scaling the weights);
    2. M = ceil(min(N/5, 3·sqrt(N))) (relative efficiency 1: the samples are independent);
    3. the cutoff is the (M+1)-th largest log-weight, floored at log(smallest normal float64) ≈ −708.4; the tail is
       the log-weights strictly above it (M of them, fewer when there are ties at the cutoff);
    4. fit a generalised Pareto distribution to the exceedances exp(tail) − exp(cutoff) with the Zhang & Stephens
       (2009) empirical-Bayes estimator and apply the prior k̂ ← (M·k̂ + 10·0.5)/(M + 10), M the tail length.

    This reproduces the k̂ ("pareto_shape") of arviz 0.x ``az.psislw(log_weights, reff=1)`` to float64 rounding
    (the ``loo`` R package differs only when ties straddle the cutoff: it keeps the top M by position).

    Degenerate cases, returned as the reference does, and all flagged as unreliable by any threshold:

    * a tail of fewer than 5 values — in particular N < 21 (M ≤ 4), or all weights equal (the tail is empty) —
      gives ``inf``, the reference's "no fit possible" value;
    * a NaN or ``+inf`` log-weight, or all log-weights ``-inf`` (all weights zero), gives ``nan`` (k̂ undefined;
      the reference would produce NaN or fail). ``-inf`` entries among finite ones are zero weights and are fine.

    Raises ``ValueError`` for an input that is not 1-D or is empty. Returns a Python float.
    """
    lw = _as_f64(log_weights)
    if lw.ndim != 1:
        raise ValueError(f"psis_khat expects a 1-D tensor of log-weights, got shape {tuple(lw.shape)}")
    n = lw.shape[0]
    if n == 0:
        raise ValueError("psis_khat needs at least one log-weight")
    if bool(torch.isnan(lw).any()) or bool(torch.isposinf(lw).any()):
        return math.nan
    max_lw = lw.max()
    if bool(torch.isneginf(max_lw)):
        return math.nan

    x = lw - max_lw
    m = int(math.ceil(min(n / 5.0, 3 * n**0.5)))
    if m + 1 > n:  # only for n = 1 (m = 1): nothing to fit
        return math.inf
    x_sorted = torch.sort(x).values
    xcutoff = max(float(x_sorted[n - m - 1]), _LOG_TINY)
    x_tail = x_sorted[x_sorted > xcutoff]
    if x_tail.shape[0] <= 4:
        return math.inf
    exceedances = torch.exp(x_tail) - math.exp(xcutoff)
    return _gpdfit_k(exceedances)


# ---------------------------------------------------------------------------------------------------------------------
# §5 (and §6's SE): standard errors
# ---------------------------------------------------------------------------------------------------------------------


def jackknife_se(leave_one_out_values, dim: int = -1) -> Tensor:
    """Delete-one jackknife standard error from the U leave-one-out values v_u along ``dim`` (spec §5):

        se_jack = sqrt( (U − 1)/U · Σ_u (v_u − mean_u v)² ).

    Used for se_jack(U_cross) with v_u = U_(−u) and for the SE of the whole δH₁ estimate. The formula needs
    U ≥ 2 values; for U < 2 the result is NaN and a ``RuntimeWarning`` says so. (The §5 delete-one values of the
    U-statistic themselves, U_(−u) = (U·U_cross − 2 r_u)/(U − 2), exist only for U ≥ 3 units: that is the caller's
    requirement, not this function's.) NaN values propagate. Returns a float64 tensor with ``dim`` reduced.
    """
    v = _as_f64(leave_one_out_values)
    u = v.shape[dim] if v.ndim > 0 else 1
    if u < 2:
        warnings.warn(
            f"jackknife_se needs at least 2 leave-one-out values (3 units for the U-statistic's), got {u}; "
            "returning NaN",
            RuntimeWarning,
            stacklevel=2,
        )
        shape = list(v.shape)
        if v.ndim > 0:
            del shape[dim]
        return torch.full(shape, math.nan, dtype=_F64)
    dev = v - v.mean(dim=dim, keepdim=True)
    return torch.sqrt((u - 1) / u * (dev * dev).sum(dim=dim))


def mean_and_se(values, dim: int = -1) -> tuple[Tensor, Tensor]:
    """The mean of n values along ``dim`` and its standard error sd/√n, sd the sample sd (ddof = 1).

    Spec §6: SE(ΔĤ) = sd_n(ΔĤ_n)/√B. For n < 2 the SE is NaN and a ``RuntimeWarning`` says that at least 2 values
    are needed (the mean is still returned for n = 1; it is NaN for n = 0). NaN values propagate. Returns two
    float64 tensors with ``dim`` reduced.
    """
    v = _as_f64(values)
    if v.ndim == 0:
        v = v.reshape(1)
        dim = 0
    n = v.shape[dim]
    if n == 0:
        shape = list(v.shape)
        del shape[dim]
        mean = torch.full(shape, math.nan, dtype=_F64)
    else:
        mean = v.mean(dim=dim)
    if n < 2:
        warnings.warn(
            f"mean_and_se needs at least 2 values for a standard error, got {n}; returning NaN for the SE",
            RuntimeWarning,
            stacklevel=2,
        )
        return mean, torch.full_like(mean, math.nan)
    dev = v - v.mean(dim=dim, keepdim=True)
    sd = torch.sqrt((dev * dev).sum(dim=dim) / (n - 1))
    return mean, sd / math.sqrt(n)
