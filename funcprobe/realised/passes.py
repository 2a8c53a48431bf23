"""The teacher-forced passes over a batch (spec §6, "one S path"): S and the summed next-token entropies at θ or θ⁺,
sharded by sequence chunk across ranks, and :class:`Before`, what an estimator needs at θ, computed once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..batch import RolloutBatch
from ..policy import Policy
from ._common import ParamsDict, _Clock
from .recorded import LogprobCheck, check_recorded_logprobs

__all__ = ["sharded_pass", "Before", "values_before"]


def sharded_pass(world, batch: RolloutBatch) -> Callable[[Callable[..., Tensor]], Tensor]:
    """run(fn) with fn(shard=...) → [B, G]: the whole batch in one process; distributed, each rank forwards its
    contiguous range of the batch's own sequence chunks (``shard=(rank, world)``: the same chunks, hence the same
    float64 values, as one process) and the disjoint [B, G] pieces are summed over ranks (x + 0 is exact)."""
    if world is None or not world.distributed:
        return lambda fn: fn()
    from ..distributed import all_reduce_sum_

    def run(fn: Callable[..., Tensor]) -> Tensor:
        local = fn(shard=(world.rank, world.size)).to("cpu", torch.float64).contiguous()
        all_reduce_sum_(world, {"values": local}, "ΔH all_reduce of per-sequence values")
        return local

    return run



@dataclass(frozen=True)
class Before:
    """What an estimator needs at θ on a batch, computed once (a sweep reuses it for every η): S, the summed
    next-token entropies E (or None) and the recorded-S check; ``evaluation_fingerprint``: the batch's
    ``fingerprint`` (``snis_delta_h(before=...)`` refuses values of another batch; None: unknown, not checked)."""

    S: Tensor | None
    E: Tensor | None
    check: LogprobCheck | None
    evaluation_fingerprint: str | None = None



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
    return Before(S, E, check, evaluation_fingerprint=batch.fingerprint)



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

