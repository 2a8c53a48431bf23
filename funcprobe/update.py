"""The RL step on a batch: the policy gradient Ȳ of spec §3 and the pure AdamW update of spec §4 applied to it.

For the objective's per-token cotangent c = w·(A − βκ) (``funcprobe.objective``),

    ∇ℒ = −Ȳ,      Ȳ = Σ_{n,g,k} c_{n,g,k} ∇ℓ_{n,g,k}(θ),

taken one sequence chunk at a time by the policy's chunked vjps (accumulated on the CPU in float64); the step is
``adamw_update`` (with the objective's gradient clipping), which returns new dicts. There is no ``optimizer.step()``
and nothing to undo. With β > 0 the reference log-probabilities ℓ_ref (the adapter disabled) come from one no-grad
forward of the batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .adam import AdamState, UpdateDecomposition, adamw_update, check_adam_state, update_decomposition
from .batch import RolloutBatch, as_rollout_batch
from .objective import Objective, resolve_objective
from .policy import ChunkLogprobs, Policy

__all__ = ["StepCotangent", "step_cotangent", "policy_gradient", "shard_policy_gradient", "rl_update",
           "update_direction", "apply_step"]


@dataclass(frozen=True)
class StepCotangent:
    """The per-token cotangent c = w·(A − βκ) of one batch's step (spec §3), ready to apply chunk by chunk.

    ``linear`` = w·A [B, G, L] and, with β > 0, ``kl_weight`` = β·w [B, G, L] and ``reference`` = ℓ_ref [B, G, L]
    (float64, CPU, 0 off the response); ``objective`` gives κ; ``sequence_constant``: c is the same on every token of
    a sequence (no KL term, per-sequence advantages). :meth:`for_chunk` evaluates c on a chunk's tokens from the
    chunk's own ℓ (known after its forward, before its vjp).
    """

    objective: Objective
    linear: Tensor
    kl_weight: Tensor | None = None
    reference: Tensor | None = None
    sequence_constant: bool = True

    def for_chunk(self, item: ChunkLogprobs) -> Tensor:
        """c on the chunk's response tokens, float64 [T] (CPU), in ``item.token_logprobs``' order."""
        c = item.gather(self.linear)
        if self.kl_weight is None:
            return c
        logprobs = item.token_logprobs.to("cpu", torch.float64)
        kappa = self.objective.kl_derivative(logprobs, item.gather(self.reference))
        return c - item.gather(self.kl_weight) * kappa

    def per_sequence(self) -> Tensor | None:
        """c per sequence [B, G] when it is constant along every sequence's tokens (no KL term, per-sequence
        advantages): then ∇ Σ c∇ℓ = ∇ Σ_i c_i S_i, and one backward per sequence serves X and Y. Else None."""
        if not self.sequence_constant:
            return None
        first = self.linear.ne(0).to(torch.int64).argmax(dim=-1, keepdim=True)
        return self.linear.gather(-1, first).squeeze(-1)

    def select_prompts(self, index: Sequence[int] | Tensor) -> "StepCotangent":
        index = torch.as_tensor(index, dtype=torch.int64)
        pick = (lambda t: None if t is None else t.index_select(0, index))
        return replace(self, linear=pick(self.linear), kl_weight=pick(self.kl_weight), reference=pick(self.reference))

    def scaled(self, factor: float) -> "StepCotangent":
        return replace(self, linear=self.linear * factor,
                       kl_weight=None if self.kl_weight is None else self.kl_weight * factor)


def step_cotangent(params: Mapping[str, Tensor], batch: RolloutBatch, *, policy: Policy, objective: Objective,
                   prompts: Sequence[int] | None = None, seq_chunk: int | None = None, token_chunk: int | None = None,
                   progress: bool | None = False) -> StepCotangent:
    """The cotangent of the step on ``batch`` from θ = ``params`` (spec §3): weights and advantages for the whole
    batch; with β > 0 the reference log-probabilities (``policy.reference_params``), for ``prompts`` only when given
    (a rank's shard)."""
    if not isinstance(objective, Objective):
        raise ValueError(f"objective must be a funcprobe.Objective; got {type(objective).__name__}.")
    objective.check_batch(batch)
    policy._check_token_ids(batch)  # delta_h1 and attribute forward through taps, not through the policy's checks
    weights = objective.token_weights(batch)
    advantages = objective.token_advantages(batch)
    linear = weights * advantages
    if not objective.needs_reference:
        return StepCotangent(objective, linear, sequence_constant=batch.token_advantages is None)
    reference = policy.token_logprobs(policy.reference_params(params), batch, seq_chunk=seq_chunk,
                                      token_chunk=token_chunk, progress=progress, prompts=prompts)
    return StepCotangent(objective, linear, kl_weight=objective.beta * weights, reference=reference,
                         sequence_constant=False)


def _objective(objective: Objective | None) -> Objective:
    return Objective() if objective is None else objective


def policy_gradient(params: Mapping[str, Tensor], batch: RolloutBatch, *, policy: Policy,
                    objective: Objective | None = None, seq_chunk: int | None = None, token_chunk: int | None = None,
                    progress: bool | None = False, world=None) -> tuple[Tensor, dict[str, Tensor]]:
    """(S float64 [B, G], Ȳ) with Ȳ = Σ c∇ℓ = −∇ℒ the negative gradient of the batch's RL loss (float64, CPU).

    With a distributed ``world`` (issue 6) every rank passes the whole batch, differentiates its shard of prompts
    with the global weights, and Ȳ is all-reduced (one LoRA-sized float64 vector); S is all-gathered.
    """
    distributed = world is not None and world.distributed
    batch = as_rollout_batch(batch, "policy_gradient: batch")
    mine = list(world.shard(batch.B)) if distributed else None
    logprobs, ybar = shard_policy_gradient(params, batch, mine, policy=policy, objective=objective,
                                           seq_chunk=seq_chunk, token_chunk=token_chunk, progress=progress)
    if not distributed:
        return logprobs, ybar
    from .distributed import all_reduce_sum_, gather_rows, shard_counts

    all_reduce_sum_(world, ybar, "all_reduce of the RL gradient")
    logprobs = gather_rows(world, logprobs, shard_counts(batch.B, world.size), "all_gather of S")
    return logprobs, ybar


def shard_policy_gradient(params: Mapping[str, Tensor], batch: RolloutBatch, prompts: Sequence[int] | None, *,
                          policy: Policy, objective: Objective | None = None, seq_chunk: int | None = None,
                          token_chunk: int | None = None,
                          progress: bool | None = False) -> tuple[Tensor, dict[str, Tensor]]:
    """The part of :func:`policy_gradient` that the prompts ``prompts`` of ``batch`` contribute, with the whole
    batch's weights (its normalisers, advantages and batch statistics), and their S [len(prompts), G]; None: every
    prompt. No collective: summing the parts of disjoint shards that cover the batch gives its Ȳ."""
    batch = as_rollout_batch(batch, "policy_gradient: batch")
    objective = resolve_objective(objective, batch, "policy_gradient")
    if not isinstance(policy, Policy):
        raise ValueError(f"the step needs policy=funcprobe.Policy(...) (load_policy(base, adapter) or "
                         f"load_checkpoint(path).policy); got {type(policy).__name__}.")
    sharded = prompts is not None
    mine = list(prompts) if sharded else list(range(batch.B))
    chunks = dict(seq_chunk=seq_chunk, token_chunk=token_chunk, progress=progress)
    ybar = {name: torch.zeros(t.shape, dtype=torch.float64) for name, t in params.items()}
    logprobs = torch.zeros((len(mine), batch.G), dtype=torch.float64)
    if mine:
        cotangent = step_cotangent(params, batch, policy=policy, objective=objective,
                                   prompts=mine if sharded else None, **chunks).select_prompts(mine)
        part = batch.select_prompts(mine) if sharded else batch
        flat = logprobs.reshape(-1)
        for item in policy.iter_logprob_vjps(params, part, **chunks):
            flat[item.chunk.flat_index.cpu()] = item.logprobs.cpu()
            for name, grad in item.token_vjp(cotangent.for_chunk(item)).items():
                ybar[name] += grad.to("cpu", torch.float64)
    return logprobs, ybar


def rl_update(params: Mapping[str, Tensor], batch: RolloutBatch, *, policy: Policy, adam: AdamState,
              objective: Objective | None = None, lr: float | None = None, seq_chunk: int | None = None,
              token_chunk: int | None = None, progress: bool | None = False,
              world=None) -> tuple[dict[str, Tensor], AdamState]:
    """One AdamW step on the batch's RL loss: (θ⁺, state after the step). Pure: inputs are untouched.

    Equals what ``loss.backward(); clip_grad_norm_(…, objective.max_grad_norm); optimizer.step()`` does to the LoRA
    tensors of a module in eval mode for the objective's loss (``Objective``: loss type, KL, clipping), computed
    without touching the module. ``lr`` overrides the state's learning rate.
    """
    batch = as_rollout_batch(batch, "rl_update: batch")
    adam = check_adam_state(adam, "rl_update")
    objective = resolve_objective(objective, batch, "rl_update")
    _, ybar = policy_gradient(params, batch, policy=policy, objective=objective, seq_chunk=seq_chunk,
                              token_chunk=token_chunk, progress=progress, world=world)
    loss_grad = {name: -value for name, value in ybar.items()}
    return adamw_update(params, loss_grad, adam, lr=lr, max_grad_norm=objective.max_grad_norm)


def update_direction(params: Mapping[str, Tensor], batch: RolloutBatch, *, policy: Policy, adam: AdamState,
                     objective: Objective | None = None, lr: float | None = None, seq_chunk: int | None = None,
                     token_chunk: int | None = None, progress: bool | None = False,
                     world=None) -> UpdateDecomposition:
    """The decomposition θ⁺ − θ = η_g · P ⊙ Ȳ + Δθ_state of this batch's step (spec §4), as δH₁ uses it."""
    batch = as_rollout_batch(batch, "update_direction: batch")
    adam = check_adam_state(adam, "update_direction")
    objective = resolve_objective(objective, batch, "update_direction")
    _, ybar = policy_gradient(params, batch, policy=policy, objective=objective, seq_chunk=seq_chunk,
                              token_chunk=token_chunk, progress=progress, world=world)
    return update_decomposition(params, ybar, adam, lr=lr, max_grad_norm=objective.max_grad_norm)


def apply_step(params: Mapping[str, Tensor], adam: AdamState, step: UpdateDecomposition, *,
               objective: Objective | None = None, lr: float | None = None) -> tuple[dict[str, Tensor], AdamState]:
    """(θ⁺, state after the step) from a step's decomposition — its Ȳ — with no gradient pass: ``adamw_update(params,
    −step.ybar, adam, lr=lr, max_grad_norm=objective.max_grad_norm)``.

    ``step`` is ``DeltaH1Result.step`` (δH₁ forms Ȳ = ΣY/U in its own pass) or ``update_direction(...)``; ``lr`` and
    the objective's clipping must be those the step was decomposed with (checked: the learning rates and whether it
    clips must agree). Equals ``rl_update`` on the same batch to float64 rounding of Ȳ's summation order.
    """
    adam = check_adam_state(adam, "apply_step")
    objective = _objective(objective)
    loss_grad = {name: -value for name, value in step.ybar.items()}
    new_params, new_state = adamw_update(params, loss_grad, adam, lr=lr, max_grad_norm=objective.max_grad_norm)
    used = {name: h.lr for name, h in new_state.hyper.items()}
    if used != dict(step.lr_by_name) or (objective.max_grad_norm is None) != (step.grad_norm is None):
        raise ValueError(f"apply_step: the step was decomposed with learning rates "
                         f"{sorted(set(step.lr_by_name.values()))} and "
                         f"{'no clipping' if step.grad_norm is None else 'clipping'}, but lr={lr} and "
                         f"max_grad_norm={objective.max_grad_norm} were passed; pass the same lr and objective as to "
                         "δH₁.")
    return new_params, new_state
