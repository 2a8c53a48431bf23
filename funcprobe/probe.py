"""``Probe``: a policy, its optimizer state, the update batch and the probe's options bound together.

    probe = Probe(policy, adam, batch=update_batch)             # U: the batch the step is built from
    prediction = probe.delta_h1(params)                          # δH₁ (spec §5), with the step's Ȳ
    first_order = probe.delta_h1_heldout(params, prediction, eval_sample)  # δĤ₁(E): this step's (spec §9)
    new_params, _ = probe.update(params, prediction)             # θ⁺ of that AdamW step (spec §4), no second pass
    realised = probe.realised(params, new_params, eval_sample)   # ΔH on an independent evaluation batch (spec §6)
    paired = paired_difference(realised["snis"], first_order)    # ΔĤ − δĤ₁(E), paired per prompt

The realised change is measured on an evaluation sample E drawn independently of U (``sample_batch`` with another
seed and independent prompt draws); on U itself it would carry the same-sample bias that δH₁'s U-statistic
removes, so the methods that estimate it refuse the bound update batch — ``in_sample_delta_h`` computes that number
on purpose, labelled as the biased diagnostic it is.

A Probe is an immutable value: ``with_batch`` and ``replace`` return new ones; every method is a pure function of
its arguments and the bound values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .adam import AdamState
from .batch import RolloutBatch, as_rollout_batch
from .delta_h1 import DeltaH1Result, delta_h1
from .heldout import HeldoutResult, delta_h1_heldout
from .objective import Objective
from .policy import Policy
from .realised import CRNResult, SNISResult, crn_delta_h, snis_delta_h
from .sweep import METHODS, LRSweepResult, lr_sweep, realised_changes
from .update import apply_step, rl_update, update_direction

__all__ = ["Probe"]


@dataclass(frozen=True)
class Probe:
    """Bound policy, optimizer state, update batch, the step's objective and options for δH₁, the step and ΔH."""

    policy: Policy
    adam: AdamState
    batch: RolloutBatch | None = None
    objective: Objective = Objective()
    units: str | int = "prompt"
    lr: float | None = None
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
            raise ValueError("no update batch: pass one (probe.delta_h1(params, batch)) or bind it with "
                             "Probe(..., batch=batch) / probe.with_batch(batch).")
        return as_rollout_batch(batch, "the update batch")

    def _chunks(self) -> dict[str, Any]:
        return dict(seq_chunk=self.seq_chunk, token_chunk=self.token_chunk, progress=self.progress)

    def _evaluation(self, sample: Any, what: str) -> None:
        if sample is None:
            raise ValueError(f"{what} needs the evaluation sample E: draw it with sample_batch(policy, params, "
                             "prompts, seed=<another seed>, ...) from prompts drawn independently of the update batch's "
                             "(spec §6).")
        batch = as_rollout_batch(sample, f"{what}: the evaluation sample")
        if self.batch is not None and _same_samples(batch, as_rollout_batch(self.batch, "the update batch")):
            quantity = ("the held-out first-order change takes ∇H from an evaluation batch drawn independently of "
                        "the samples that built the step (spec §9): on those samples ∇H·Δθ carries the same-sample "
                        "term the U-statistic δH₁ removes. Draw an evaluation batch with another seed."
                        if what == "delta_h1_heldout" else
                        "the realised change must be measured on an evaluation batch drawn independently of the "
                        "samples that built the step — on those samples the estimate carries the same-sample bias. "
                        "Draw an evaluation batch with another seed, or call probe.in_sample_delta_h(...) for the "
                        "labelled diagnostic.")
            raise ValueError(f"{what} was given the update batch itself (the same responses): {quantity}")

    def delta_h1(self, params: Mapping[str, Tensor], batch: RolloutBatch | None = None, **options) -> DeltaH1Result:
        """δH₁ of one AdamW step on the update batch (spec §5); ``options`` override the bound ones."""
        settings = dict(objective=self.objective, units=self.units, lr=self.lr,
                        store_unit_vectors=self.store_unit_vectors, memory_budget=self.memory_budget,
                        **self._chunks())
        settings.update(options)
        return delta_h1(params, self._batch(batch), policy=self.policy, adam=self.adam, **settings)

    def delta_h1_heldout(self, params: Mapping[str, Tensor], step: Any, eval_sample: Any,
                         **options) -> HeldoutResult:
        """δĤ₁(E): the first-order change of the step with ∇H from the evaluation sample (spec §9,
        ``funcprobe.delta_h1_heldout``). ``step``: a ``DeltaH1Result`` (its step), an ``UpdateDecomposition`` or any
        Δθ dict (e.g. θ_{t+1} − θ_t of a real run)."""
        self._evaluation(eval_sample, "delta_h1_heldout")
        delta = step.step if isinstance(step, DeltaH1Result) else step
        chunks = {k: v for k, v in self._chunks().items()}
        return delta_h1_heldout(params, delta, eval_sample, policy=self.policy, **{**chunks, **options})

    def update(self, params: Mapping[str, Tensor], prediction: DeltaH1Result | None = None,
               batch: RolloutBatch | None = None):
        """(θ⁺, state after the step): the AdamW step on the update batch's RL loss that δH₁ predicts.

        With ``prediction`` (δH₁ of this probe) its Ȳ is reused (no gradient pass); else Ȳ is computed here.
        """
        if prediction is not None and prediction.step is not None:
            return apply_step(params, self.adam, prediction.step, objective=self.objective, lr=self.lr)
        return rl_update(params, self._batch(batch), policy=self.policy, adam=self.adam, objective=self.objective,
                         lr=self.lr, **self._chunks())

    def snis_delta_h(self, params: Mapping[str, Tensor], update: Mapping[str, Tensor], eval_sample: Any,
                     **options) -> SNISResult:
        """ΔH from θ = params to θ⁺ = update by importance sampling on the evaluation sample (spec §6)."""
        self._evaluation(eval_sample, "snis_delta_h")
        batch = as_rollout_batch(eval_sample, "snis_delta_h: the evaluation sample")
        return snis_delta_h(params, update, policy=self.policy, batch=batch, **{**self._chunks(), **options})

    def crn_delta_h(self, params: Mapping[str, Tensor], update: Mapping[str, Tensor], eval_sample: Any,
                    **options) -> CRNResult:
        """ΔH from θ to θ⁺ by common random numbers on the evaluation sample (a SampledBatch; spec §6)."""
        self._evaluation(eval_sample, "crn_delta_h")
        return crn_delta_h(params, update, policy=self.policy, sample=eval_sample, **{**self._chunks(), **options})

    def realised(self, params: Mapping[str, Tensor], update: Mapping[str, Tensor], eval_sample: Any, *,
                 method: str = "snis", **options) -> dict[str, SNISResult | CRNResult]:
        """The realised change on the evaluation sample by ``method`` ("snis", "crn" or "both"): {method: result};
        ``options`` may hold ``snis={...}`` and ``crn={...}``, each method's keyword arguments."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}; got {method!r}.")
        self._evaluation(eval_sample, "crn_delta_h" if method in ("crn", "both") else "snis_delta_h")
        return realised_changes(params, update, eval_sample, method=method, policy=self.policy,
                                snis=options.get("snis"), crn=options.get("crn"), **self._chunks())

    def in_sample_delta_h(self, params: Mapping[str, Tensor], update: Mapping[str, Tensor], **options) -> SNISResult:
        """SNIS on the update batch itself: a *biased diagnostic* (labelled ``in_sample``), never the realised
        change — it shows how much the same-sample term would have added (spec §6)."""
        return snis_delta_h(params, update, policy=self.policy, batch=self._batch(None), in_sample=True,
                            **{**self._chunks(), **options})

    def lr_sweep(self, params: Mapping[str, Tensor], eval_sample: Any, etas: Sequence[float], *,
                 prediction: DeltaH1Result | None = None, method: str = "snis", **options) -> LRSweepResult:
        """ΔĤ(η) on the evaluation sample beside (η/lr)·δH₁ (``funcprobe.sweep.lr_sweep``); the step's Δθ comes from
        ``prediction.step`` when given, else from one gradient pass over the update batch."""
        self._evaluation(eval_sample, "lr_sweep")
        if prediction is not None and prediction.step is not None:
            step = prediction.step
        else:
            step = update_direction(params, self._batch(None), policy=self.policy, adam=self.adam,
                                    objective=self.objective, lr=self.lr, **self._chunks())
        return lr_sweep(params, eval_sample, policy=self.policy, step=step, etas=etas, prediction=prediction,
                        method=method, **{**self._chunks(), **options})


def _same_samples(a: RolloutBatch, b: RolloutBatch) -> bool:
    """The same object, or the same samples (``RolloutBatch.fingerprint``: a saved and reloaded, re-drawn or
    re-padded copy)."""
    return a is b or a.fingerprint == b.fingerprint
