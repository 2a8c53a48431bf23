"""``Probe``: a policy, its optimizer state and the probe's options bound together.

    probe = Probe(policy, adam, batch=batch)
    prediction = probe.delta_h1(params)                  # δH₁ (spec §5)
    new_params, _ = probe.update(params)                 # θ⁺ of the same AdamW step (spec §4)
    realised = probe.snis_delta_h(params, new_params)    # ΔH by importance sampling (spec §6)

A Probe is an immutable value: ``with_batch`` and ``replace`` return new ones; every method is a pure function of
its arguments and the bound values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from .adam import AdamState
from .batch import RolloutBatch
from .delta_h1 import DeltaH1Result, delta_h1
from .policy import Policy
from .update import rl_update

__all__ = ["Probe"]


@dataclass(frozen=True)
class Probe:
    """Bound policy, optimizer state, optional evaluation batch and options for δH₁ and ΔH."""

    policy: Policy
    adam: AdamState
    batch: RolloutBatch | None = None
    units: str | int = "prompt"
    lr: float | None = None
    max_grad_norm: float | None = None
    seq_chunk: int | None = None
    token_chunk: int | None = None
    store_unit_vectors: str | bool = "auto"
    memory_budget: int | str | None = None
    progress: bool | None = False

    def with_batch(self, batch: RolloutBatch) -> "Probe":
        return dataclasses.replace(self, batch=batch)

    def replace(self, **changes) -> "Probe":
        return dataclasses.replace(self, **changes)

    def _batch(self, batch: RolloutBatch | None) -> RolloutBatch:
        batch = self.batch if batch is None else batch
        if batch is None:
            raise ValueError("no batch: pass one (probe.delta_h1(params, batch)) or bind it with "
                             "Probe(..., batch=batch) / probe.with_batch(batch).")
        return batch

    def delta_h1(self, params: Mapping[str, Tensor], batch: RolloutBatch | None = None, **options) -> DeltaH1Result:
        """δH₁ of one AdamW step on the batch (spec §5); ``options`` override the bound ones."""
        settings = dict(units=self.units, lr=self.lr, max_grad_norm=self.max_grad_norm, seq_chunk=self.seq_chunk,
                        token_chunk=self.token_chunk, store_unit_vectors=self.store_unit_vectors,
                        memory_budget=self.memory_budget, progress=self.progress)
        settings.update(options)
        return delta_h1(params, self._batch(batch), policy=self.policy, adam=self.adam, **settings)

    def update(self, params: Mapping[str, Tensor], batch: RolloutBatch | None = None):
        """(θ⁺, state after the step): the AdamW step on the batch's RL loss that δH₁ predicts."""
        return rl_update(params, self._batch(batch), policy=self.policy, adam=self.adam, lr=self.lr,
                         max_grad_norm=self.max_grad_norm, seq_chunk=self.seq_chunk, token_chunk=self.token_chunk,
                         progress=self.progress)

    def snis_delta_h(self, params: Mapping[str, Tensor], update: Mapping[str, Tensor],
                     batch: RolloutBatch | None = None, **options):
        """ΔH from θ = params to θ⁺ = update on the bound batch, by importance sampling (spec §6)."""
        from .snis import snis_delta_h

        settings = dict(seq_chunk=self.seq_chunk, token_chunk=self.token_chunk, progress=self.progress)
        settings.update(options)
        return snis_delta_h(params, update, policy=self.policy, batch=self._batch(batch), **settings)
