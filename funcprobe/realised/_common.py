"""Shared helpers of the realised-change estimators (spec §6): input checks, per-prompt ratios and SEs, the phase
clock and the advice the reliability verdicts give.

Nothing here knows an estimator; every other module of ``funcprobe.realised`` builds on it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..batch import RolloutBatch, as_rollout_batch
from ..policy import Policy
from ..stats import mean_and_se

_ADVICE = ("Use the common-random-numbers estimator (--realised crn, crn_delta_h), which needs no weights, resample "
           "the batch at θ⁺, or lower η.")

ParamsDict = Mapping[str, Tensor]


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



def _check_values(name: str, values: Tensor) -> None:
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        raise ValueError(f"{name} is not finite for {_sequence_list(bad)}. The entropies come from the same forward "
                         "as the log-probabilities: check the params/update for NaN or inf values.")


def _prompt_ratio(u: Tensor, values: Tensor, lengths: Tensor | None) -> Tensor:
    """Σ_g u f / Σ_g u (or / Σ_g u T) per prompt: [B]."""
    numerator = (u * values).sum(dim=1)
    denominator = u.sum(dim=1) if lengths is None else (u * lengths).sum(dim=1)
    return numerator / denominator



def _se(per_prompt: Tensor) -> float:
    if per_prompt.shape[0] < 2:
        return math.nan
    return float(mean_and_se(per_prompt)[1])



def _tuple(tensor: Tensor) -> tuple[float, ...]:
    return tuple(float(x) for x in tensor.tolist())



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



def _check_batch(batch: Any, fn: str) -> RolloutBatch:
    """The batch (a RolloutBatch, or the SampledBatch holding it; ``batch.as_rollout_batch``)."""
    return as_rollout_batch(batch, f"{fn}: batch")



def _require_policy(policy: Any, fn: str, needs: str) -> None:
    if policy is None:
        raise ValueError(f"{fn} needs policy= to compute {needs} on its one teacher-forced path. Pass "
                         "policy=funcprobe.Policy(...) (or load_policy(base, adapter)).")
    if not isinstance(policy, Policy):
        raise ValueError(f"{fn}: policy must be a funcprobe.Policy; got {type(policy).__name__}.")



def _chunks(seq_chunk, token_chunk, progress) -> dict[str, Any]:
    return dict(seq_chunk=seq_chunk, token_chunk=token_chunk, progress=progress)

