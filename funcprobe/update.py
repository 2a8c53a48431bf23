"""The RL step on a batch: the policy gradient Ȳ of spec §3 and the pure AdamW update of spec §4 applied to it.

ℒ(θ) = −(1/B) Σ_n (1/G) Σ_g (A_{n,g} / L_n) S_{n,g}(θ),   ∇ℒ = −Ȳ,   Ȳ = ∇_θ Σ_{n,g} c_{n,g} S_{n,g}(θ),
c_{n,g} = A_{n,g} / (B · G · L_n).

Ȳ is taken one sequence chunk at a time by ``Policy.logprob_grads`` (G-chunked ``torch.func.vjp`` closures,
accumulated on the CPU in float64); the step is ``adamw_update``, which returns new dicts. There is no
``optimizer.step()`` and nothing to undo.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .adam import AdamState, UpdateDecomposition, adamw_update, update_decomposition
from .batch import RolloutBatch
from .policy import Policy

__all__ = ["objective_weights", "policy_gradient", "rl_update", "update_direction", "apply_step"]


def objective_weights(batch: RolloutBatch) -> Tensor:
    """c_{n,g} = A_{n,g} / (B · G · L_n), float64 [B, G]: Ȳ = ∇ Σ c·S (spec §3)."""
    return batch.advantages / (batch.B * batch.G * batch.length_norm[:, None])


def policy_gradient(params: Mapping[str, Tensor], batch: RolloutBatch, *, policy: Policy,
                    seq_chunk: int | None = None, token_chunk: int | None = None,
                    progress: bool | None = False, world=None) -> tuple[Tensor, dict[str, Tensor]]:
    """(S float64 [B, G], Ȳ) with Ȳ = (1/B) Σ_n Y_n the negative gradient of the batch's RL loss (float64, CPU).

    With a distributed ``world`` (issue 6) every rank passes the whole batch, differentiates its shard of prompts
    with the global weights, and Ȳ is all-reduced (one LoRA-sized float64 vector); S is all-gathered.
    """
    if world is None or not world.distributed:
        logprobs, (ybar,) = policy.logprob_grads(params, batch, objective_weights(batch), seq_chunk=seq_chunk,
                                                 token_chunk=token_chunk, progress=progress)
        return logprobs, ybar
    from .distributed import all_reduce_sum_, gather_rows, shard_counts

    mine = list(world.shard(batch.B))
    weights = objective_weights(batch)
    if mine:
        logprobs, (ybar,) = policy.logprob_grads(params, batch.select_prompts(mine), weights[mine],
                                                 seq_chunk=seq_chunk, token_chunk=token_chunk, progress=progress)
        ybar = {name: value.to("cpu", torch.float64) for name, value in ybar.items()}
        logprobs = logprobs.to("cpu", torch.float64)
    else:
        ybar = {name: torch.zeros(t.shape, dtype=torch.float64) for name, t in params.items()}
        logprobs = torch.zeros((0, batch.G), dtype=torch.float64)
    all_reduce_sum_(world, ybar, "all_reduce of the RL gradient")
    logprobs = gather_rows(world, logprobs, shard_counts(batch.B, world.size), "all_gather of S")
    return logprobs, ybar


def rl_update(params: Mapping[str, Tensor], batch: RolloutBatch, *, policy: Policy, adam: AdamState,
              lr: float | None = None, max_grad_norm: float | None = None, seq_chunk: int | None = None,
              token_chunk: int | None = None, progress: bool | None = False,
              world=None) -> tuple[dict[str, Tensor], AdamState]:
    """One AdamW step on the batch's RL loss: (θ⁺, state after the step). Pure: inputs are untouched.

    Equals what ``loss.backward(); clip_grad_norm_(…, max_grad_norm); optimizer.step()`` would do to the LoRA
    tensors of a module in eval mode, computed without touching the module.
    """
    _, ybar = policy_gradient(params, batch, policy=policy, seq_chunk=seq_chunk, token_chunk=token_chunk,
                              progress=progress, world=world)
    loss_grad = {name: -value for name, value in ybar.items()}
    return adamw_update(params, loss_grad, adam, lr=lr, max_grad_norm=max_grad_norm)


def update_direction(params: Mapping[str, Tensor], batch: RolloutBatch, *, policy: Policy, adam: AdamState,
                     lr: float | None = None, max_grad_norm: float | None = None, seq_chunk: int | None = None,
                     token_chunk: int | None = None, progress: bool | None = False,
                     world=None) -> UpdateDecomposition:
    """The decomposition θ⁺ − θ = η_g · P ⊙ Ȳ + Δθ_state of this batch's step (spec §4), as δH₁ uses it."""
    _, ybar = policy_gradient(params, batch, policy=policy, seq_chunk=seq_chunk, token_chunk=token_chunk,
                              progress=progress, world=world)
    return update_decomposition(params, ybar, adam, lr=lr, max_grad_norm=max_grad_norm)


def apply_step(params: Mapping[str, Tensor], adam: AdamState, step: UpdateDecomposition, *, lr: float | None = None,
               max_grad_norm: float | None = None) -> tuple[dict[str, Tensor], AdamState]:
    """(θ⁺, state after the step) from a step's decomposition — its Ȳ — with no gradient pass: ``adamw_update(params,
    −step.ybar, adam, lr=lr, max_grad_norm=max_grad_norm)``.

    ``step`` is ``DeltaH1Result.step`` (δH₁ forms Ȳ = ΣY/U in its own pass) or ``update_direction(...)``; ``lr`` and
    ``max_grad_norm`` must be those the step was decomposed with (checked: the learning rates and the clip
    coefficient must agree). Equals ``rl_update`` on the same batch to float64 rounding of Ȳ's summation order.
    """
    loss_grad = {name: -value for name, value in step.ybar.items()}
    new_params, new_state = adamw_update(params, loss_grad, adam, lr=lr, max_grad_norm=max_grad_norm)
    used = {name: h.lr for name, h in new_state.hyper.items()}
    if used != dict(step.lr_by_name) or (max_grad_norm is None) != (step.grad_norm is None):
        raise ValueError(f"apply_step: the step was decomposed with learning rates {sorted(set(step.lr_by_name.values()))} "
                         f"and {'no clipping' if step.grad_norm is None else 'clipping'}, but lr={lr}, "
                         f"max_grad_norm={max_grad_norm} were passed; pass the same lr and max_grad_norm as to δH₁.")
    return new_params, new_state
