"""Diagnostics of importance weights (spec §6): Kish ESS, PSIS k̂ and the reliability verdict.

Diagnostics, from the raw log-weights: their summary; Kish ESS = (Σw)²/Σw² per prompt (min, mean of ESS/G) and
global (ESS/(BG)); PSIS k̂ over all B·G log-weights with the threshold ``psis_threshold(B·G)``. ``reliable=False``
with a ``reason`` and the advice (use ``"crn"``, resample at θ⁺ or lower η) when the smallest per-prompt ESS/G is
below :data:`MIN_ESS_FRACTION` (0.5; for "global" also the global ESS), when k̂ exceeds the threshold or is NaN, or
when the estimate is not finite.

k̂ says whether a few weights dominate the estimate. It is *assessed* only with at least :data:`PSIS_MIN_SAMPLES`
(21) log-weights (below 21 a generalised-Pareto fit has fewer than 5 tail values) and only when some weight can
dominate: the largest weight exceeds :data:`KHAT_MIN_MAX_RATIO` (2) times the mean weight. At or below that ratio each
weight carries at most 2/N of the total and E[w²] ≤ max w · E[w] ≤ 2 E[w]² bounds the global Kish ESS/N below by
1/2 = MIN_ESS_FRACTION whatever the tail's shape; the shape k̂ then reports is the noise of a 7-value tail fit that
the fit's prior pulls towards 0.5 — above the threshold 1 − 1/log10 N for N < 100, so a small step would be flagged
at random (the old guard, a log-weight range above 0.05, flagged 20–30 % of batches of log w ~ N(0, 0.03²) and
N(0, 0.1²) at B 8 × G 4; ``bench/khat_rule.py``, bench/RESULTS.md). An unassessed k̂ is reported as such (and as
null in JSON).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..stats import psis_khat, psis_threshold
from ._common import _ADVICE, _as_matrix

__all__ = ["MIN_ESS_FRACTION", "PSIS_MIN_SAMPLES", "KHAT_MIN_MAX_RATIO", "KHAT_MIN_LOG_WEIGHT_RANGE",
           "WeightDiagnostics",
           "weight_diagnostics"]

#: A per-prompt Kish ESS below this fraction of G (or, for ``normalize="global"``, a global ESS below this fraction
#: of B·G) flags the estimate as unreliable: half the samples carry the estimate, the rest are nearly weightless.
MIN_ESS_FRACTION = 0.5

#: PSIS k̂ enters the reliability verdict only with at least this many log-weights: below 21, M = ceil(min(N/5,
#: 3·sqrt(N))) ≤ 4 tail values, too few for a generalised-Pareto fit (``psis_khat`` then returns inf).
PSIS_MIN_SAMPLES = 21

#: PSIS k̂ enters the verdict only when the largest weight is more than this many times the mean weight: at or below
#: it no weight can dominate (each carries ≤ 2/N of the total; the global Kish ESS/N ≥ 1/2 = MIN_ESS_FRACTION) and
#: k̂ measures the noise of a short tail fit. Chosen from the false-alarm and detection rates in bench/khat_rule.py.
KHAT_MIN_MAX_RATIO = 2.0

#: The retired guard (k̂ assessed when max log w − min log w > 0.05), kept for reference and bench/khat_rule.py: it
#: let k̂ flag 20–30 % of batches whose weights were within ±6 % … ±20 % of each other.
KHAT_MIN_LOG_WEIGHT_RANGE = 0.05


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
    # log(max w / mean w), from the log-weights (stable for any finite ones)
    log_max_over_mean = float(flat.max() - (torch.logsumexp(flat, dim=0) - math.log(N)))
    assessed = N >= PSIS_MIN_SAMPLES and log_max_over_mean > math.log(KHAT_MIN_MAX_RATIO)
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

