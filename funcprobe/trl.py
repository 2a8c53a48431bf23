"""The entropy change of every step of a running TRL ``GRPOTrainer``: :class:`EntropyChangeCallback` (issue 18).

Usage — three lines in a TRL script (a LoRA adapter, ``peft_config=``, is required: funcprobe's policy is the
base model plus its LoRA tensors)::

    from funcprobe.trl import EntropyChangeCallback

    trainer = GRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(..., logging_steps=1), peft_config=lora)
    trainer.add_callback(EntropyChangeCallback(trainer))          # every=1: every optimizer step
    trainer.train()                                               # entropy_change/* in trainer.state.log_history

Nothing is generated. In a GRPO run the next generation's rollouts are drawn at θ_{t+1}, after step t and
independently of it, so they are an evaluation batch E for step t (spec §6, §9). Notation: optimizer step s (the
``global_step`` after it, 1, 2, …) takes θ_{s−1} to θ_s on rollouts drawn at θ_{s−1}; H(θ) = E_p E_{y∼π_θ(·|p)}
[−log π_θ(y|p)] is the mean entropy of a response (nats per response), H_tok the entropy per response token (nats
per token, TRL's ``entropy`` unit). On E, drawn at θ_b (B prompts × G completions, TRL's own):

* ``realised`` = Ĥ(θ_b) − Ĥ(θ_a), the realised change, by importance sampling *back* from θ_b to θ_a: log w_{n,g} =
  S_{θ_a} − S_{θ_b} (S the completion's log-probability at the trainer's temperature), Rao-Blackwell integrand
  F = Σ_k h_k (h_k the full next-token entropy along the sampled prefix), ordinary importance weights with a
  leave-one-out control variate (unbiased at any step size): ΔĤ_n = F̄_b − [F̄_a + (1/(G−1)) Σ_g (w_{n,g} − 1)
  (F_{a,g} − F̄_a)] (F̄ the mean over the prompt's G draws), realised = mean_n ΔĤ_n, ``realised_se`` =
  sd_n(ΔĤ_n)/√B. Diagnostics of the weights: ``ess_min`` / ``ess_mean`` (Kish ESS/G per prompt, min and mean),
  ``khat`` (PSIS k̂ over all B·G log-weights; NaN where it is not assessed), ``reliable`` (1/0,
  ``funcprobe.realised.weight_diagnostics``' verdict). ``realised_per_token`` (± ``realised_per_token_se``): the same
  per token, each prompt's F̄_b/T̄ minus its self-normalised Σ_g w̃ F_a / Σ_g w̃ T (per-prompt ratios, averaged
  over prompts; O(1/G) ratio bias).
* ``first_order`` = δĤ₁(E) = ∇Ĥ(θ_b)·(θ_b − θ_a) of spec §9 along the step really taken (``delta_h1_heldout``,
  Rao-Blackwell integrand by default), ± ``first_order_se``; ``difference`` = realised − first_order with the
  paired SE ``difference_se`` = sd_n(ΔĤ_n − D_n)/√B (``paired_difference``): how far the step is from its
  first-order regime. ``first_order_per_token`` (± ``first_order_per_token_se``) = mean_n D^tok_n, the first-order
  change of each prompt's entropy per token, and ``difference_per_token`` (± ``difference_per_token_se``) =
  mean_n (ΔĤ^tok_n − D^tok_n), the same comparison per token (``per_token=True``, the default).
* ``entropy`` = Ĥ(θ_b) on E (Rao-Blackwell, nats per response).

Cost per measured step: one held-out pass at θ_b (a forward and, per chunk, one backward — two with ``per_token``)
whose forward also gives θ_b's S and F, and one no-grad forward at θ_a (``measure_step_change``). Both forwards use
the held-out pass's chunks and arithmetic, so θ_a = θ_b gives exactly 0.

For each probed step s, on step s's own rollouts at θ_{s−1}:

* ``entropy_per_token``: TRL's ``entropy`` definition — per micro-batch, Σ m h / Σ m over its completion tokens (h
  the next-token entropy of logits/temperature, m the completion mask), then the mean over the step's micro-batches
  (TRL appends one value per ``training_step`` and averages them at logging time). Nats per token.
* ``step_match`` = ‖clip(∇ℒ_funcprobe) − g_trainer‖ / ‖g_trainer‖: funcprobe's gradient of this step's batch under the
  trainer's settings (``Objective`` from ``trainer.args`` through ``funcprobe.trainer_config.trainer_settings``; the
  trainer's own advantages), clipped at ``max_grad_norm`` as ``clip_grad_norm_`` does, against the trainer's clipped
  gradient at ``on_pre_optimizer_step``. NaN (null in the log) where funcprobe cannot model the step
  (num_iterations > 1, an entropy bonus, …); the reason is in ``callback.step_match_reason``, warned once, and
  written beside it into ``log_history`` as ``entropy_change/step_match_reason``. The measurement itself needs only
  Δθ and is unaffected.
* ``update_match`` = ‖Δθ_funcprobe − Δθ_trainer‖ / ‖Δθ_trainer‖: funcprobe's pure AdamW step (``adamw_update``) from
  the optimizer state before the step and the trainer's clipped gradient, against θ_s − θ_{s−1}. NaN with
  ``callback.update_match_reason`` for an optimizer funcprobe does not model.
* ``overhead_s``: wall seconds the callback spent during step s (snapshots, conversions and all of the above).

**Which row holds what.** Everything is appended to TRL's own metrics before the step's log, so it lands in the
row of ``log_history`` (and wandb / tensorboard) whose ``step`` is s: ``entropy_per_token``, ``step_match``,
``update_match`` (at the steps ``match_every`` selects) and ``overhead_s`` describe step s itself; ``realised*``,
``first_order*``, ``difference*``, ``ess_*``, ``khat``, ``reliable`` and ``entropy`` describe the change of steps
``first_step`` … ``last_step``
(normally the single step s − 1), measured on step s's rollouts (drawn at θ_{s−1} = θ_b, θ_a = θ before
``first_step``). So a row's entropy_change values are all computed on that row's rollouts. ``realised_per_token`` in
row s and TRL's ``entropy`` row s minus row s − 1 both estimate the change of the entropy per token, with two
differences: funcprobe's is paired on one sample (TRL's rows are two independent samples, so their difference has
the spread of two entropies, not of a change), and it weights prompts equally (the mean of per-prompt ratios) where
TRL pools the tokens of a micro-batch; the two targets coincide when the prompts' mean response lengths do. The last
step of a run is never measured (no later rollouts). With ``logging_steps`` > 1 a row holds TRL's average over its
window, as for TRL's own metrics; :attr:`EntropyChangeCallback.history` keeps every step's values (and their reasons).

**Generations that serve several steps** (``num_iterations`` > 1, ``steps_per_generation`` >
``gradient_accumulation_steps``): rollouts reused by a later step predate it. A measurement waits for the first
generation drawn after the probed step (a new ``trainer._buffered_inputs`` list) and uses all of it; it then measures
the change from θ before the probed step to θ where that generation was drawn, and ``first_step`` / ``last_step``
say which steps that spans. At most one measurement is pending at a time.

TRL facts relied on (trl 1.16, ``trl/trainer/grpo_trainer.py``): ``_prepare_inputs`` stores a new list in
``_buffered_inputs`` for each generation and hands out ``_buffered_inputs[_step % steps_per_generation]`` per
micro-batch (keys ``prompt_ids``, ``prompt_mask``, ``completion_ids``, ``completion_mask``, ``advantages``); the
``entropy`` metric is ``global_masked_mean`` of the fused LM head's entropies, one value per ``training_step``;
``GRPOTrainer.log`` averages ``_metrics["train"]`` over the logging window (NaN ignored, None when none is left) and
clears it. Several processes: ``RepeatSampler`` + accelerate give each process a contiguous slice of the
generation's rows; ``_generate_and_score_completions`` gathers the rewards, computes the advantages on all of them
and keeps the process's slice; ``shuffle_sequence_dict`` / ``split_tensor_dict`` then act per process; the
``entropy`` metric's ``global_masked_mean`` reduces (sum, count) over the processes per ``training_step``.
Transformers' loop: ``on_step_begin`` → micro-batches (``on_substep_end`` after each but the last) → clipping →
``on_pre_optimizer_step`` (clipped gradients in place) → ``optimizer.step()`` → scheduler → ``zero_grad`` →
``global_step += 1`` → ``on_step_end`` → the step's log.

The callback never changes the training: it reads parameters, gradients and the optimizer state and copies them to
the CPU, computes with ``torch.func.functional_call`` on its own tensors (no ``.grad`` is written), switches the
model to eval mode only while it computes and restores its mode, and draws no random numbers. A failure inside it
is warned about once (``warnings`` and the ``funcprobe.trl`` logger), switches the callback off for the rest of the
run (``callback.error`` keeps it), and never stops training.

**Several processes** (``accelerate launch`` / ``torchrun``, DDP; ``num_processes`` from ``trainer.accelerator``,
the collectives on the trainer's own default process group, gloo or NCCL). Each process holds its shard of the
step's rows in ``_buffered_inputs`` (TRL's sampler hands each process a contiguous slice of the generation, so a
prompt's G completions may sit on two processes; the advantages are computed on the gathered rewards and sliced by
``process_index``), and the LoRA tensors, the clipped gradient (DDP's all-reduced mean) and the optimizer state are
the same on every rank. At every ``on_step_end`` every rank ``all_gather_object``s CPU copies of its micro-batches
(and of the new generation where it is not this step's), so every rank builds the same batch, process-major then
grouped by prompt; :func:`merge_process_rows` pairs process p's i-th micro-batch with the others' i-th, the group
TRL's ``global_masked_mean`` reduces for its ``entropy`` (Σ m h and Σ m summed over processes, then divided; then
the mean over the step's micro-batches). The work is sharded as the torchrun path shards it: each rank takes its
contiguous shard of prompts for the held-out pass at θ_b and the forward at θ_a (``measure_step_change(world=)``:
D_n, D^tok_n, S and F gathered) and for the step's RL gradient (its part with the whole batch's weights and TRL's
advantages, summed over ranks, against the DDP gradient). So every rank ends with the one-process numbers for the
gathered batch, at about 1/P of the compute each plus one gather of token ids, a few per-prompt rows and one
LoRA-sized all-reduce per step. Only the main process writes to TRL's metrics (``log_history`` and the reporters are
the main process's); ``history`` is kept on every rank. Failures switch every rank off together: the callback's
world is *checked* (``funcprobe.distributed.failure_flag``, an all-reduce of one int per rank, precedes each of its
collectives), and a rank whose own code fails raises the flag once — at once inside ``on_step_end`` /
``on_train_begin``, else at the next ``on_step_end`` (meanwhile its peers are in the trainer's collectives) — so the
peers' next flag meets it, they switch off with a ``PeerFailure`` naming that rank and its error, and no rank waits in
a collective the others left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
import traceback
import types
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .batch import RolloutBatch
from .distributed import SINGLE, DistributedError, World
from .heldout import paired_difference
from .policy import Policy
from .realised import importance_weighted_delta_h, sharded_pass, weight_diagnostics

__all__ = ["EntropyChangeCallback", "rollout_batch_from_trl", "TRLRollouts", "reverse_importance_change",
           "ReverseChange", "measure_step_change", "StepChange", "trl_entropy_per_token", "merge_process_rows",
           "PREFIX"]

logger = logging.getLogger("funcprobe.trl")

#: The prefix of every key the callback logs.
PREFIX = "entropy_change/"

try:  # the callback is a real TrainerCallback when transformers is installed (it always is next to TRL)
    from transformers import TrainerCallback as _CallbackBase
except ImportError:  # pragma: no cover - funcprobe itself does not need transformers' Trainer
    _CallbackBase = object


# ---------------------------------------------------------------------------------------------- TRL's batch → ours
@dataclass(frozen=True)
class TRLRollouts:
    """TRL micro-batches as one :class:`RolloutBatch`, grouped by prompt, and where each TRL row went.

    ``batch``: [B, G, P + C], each prompt left-padded to P, then its completion (TRL's ids and mask) right-padded to
    C. ``rows``: for micro-batch i, a list of the (n, g) of each of its rows. ``lengths`` float64 [B, G]: completion
    tokens (Σ completion_mask).
    """

    batch: RolloutBatch
    rows: tuple[tuple[tuple[int, int], ...], ...]
    lengths: Tensor


def rollout_batch_from_trl(micro_batches: Sequence[Mapping[str, Any]], *, G: int, pad_token_id: int,
                           temperature: float, length_norm: float) -> TRLRollouts:
    """A :class:`RolloutBatch` of TRL ``GRPOTrainer`` micro-batches (``_buffered_inputs`` entries).

    Rows are grouped by their prompt's token ids, in order of first appearance (TRL shuffles the rows of a
    generation). A prompt seen k·G times (the same prompt drawn k times) gives k groups of G, in order. Advantages
    are TRL's (float32, stored as float64); ``length_norm`` is the generation budget (``max_completion_length``).

    Raises ValueError for a prompt whose number of rows is not a multiple of G (its group is split across steps or
    processes), for per-token advantages, and for ``tool_mask`` (tool-call tokens masked out of the loss).
    """
    entries: dict[tuple[int, ...], list[tuple[list[int], list[int], float, int, int]]] = {}
    for i, mb in enumerate(micro_batches):
        if "tool_mask" in mb and mb["tool_mask"] is not None:
            raise ValueError("the rollouts carry a tool_mask (tool-call tokens out of the loss); not modelled yet")
        prompt_ids, prompt_mask = mb["prompt_ids"].detach().cpu(), mb["prompt_mask"].detach().cpu().bool()
        completion_ids = mb["completion_ids"].detach().cpu()
        completion_mask = mb["completion_mask"].detach().cpu().bool()
        advantages = mb["advantages"].detach().cpu()
        if advantages.dim() != 1:
            raise ValueError(f"per-token advantages (shape {tuple(advantages.shape)}) are not modelled yet")
        for r in range(prompt_ids.shape[0]):
            prompt = prompt_ids[r][prompt_mask[r]].tolist()
            entries.setdefault(tuple(prompt), []).append(
                (completion_ids[r].tolist(), completion_mask[r].tolist(), float(advantages[r]), i, r))
    groups = []
    for prompt, rows in entries.items():
        if len(rows) % G:
            raise ValueError(f"a prompt has {len(rows)} completions in these rollouts, not a multiple of "
                             f"G={G}: its group is split (several processes, or steps_per_generation > "
                             "gradient_accumulation_steps without the whole generation)")
        groups.extend((list(prompt), rows[k:k + G]) for k in range(0, len(rows), G))
    where = {(i, r): (n, g) for n, (_, rows) in enumerate(groups) for g, (*_, i, r) in enumerate(rows)}
    batch = RolloutBatch.from_token_lists(
        [prompt for prompt, _ in groups], [[row[0] for row in rows] for _, rows in groups],
        completion_masks=[[row[1] for row in rows] for _, rows in groups],
        advantages=torch.tensor([[row[2] for row in rows] for _, rows in groups], dtype=torch.float64),
        pad_token_id=int(pad_token_id), temperature=float(temperature), length_norm=float(length_norm))
    rows_of = tuple(tuple(where[(i, r)] for r in range(mb["prompt_ids"].shape[0]))
                    for i, mb in enumerate(micro_batches))
    return TRLRollouts(batch=batch, rows=rows_of, lengths=batch.response_lengths.to(torch.float64))


def trl_entropy_per_token(token_entropy_sums: Tensor, rollouts: TRLRollouts) -> float:
    """TRL's ``entropy`` metric of one optimizer step from funcprobe's summed next-token entropies Σ_k m h [B, G]:
    per micro-batch Σ m h / Σ m (``global_masked_mean``: with several processes, ``rollouts.rows[i]`` holds the rows
    of every process's i-th micro-batch, see :func:`merge_process_rows`), then the mean over the micro-batches (TRL
    appends one value per ``training_step``; ``GRPOTrainer.log`` averages them). Nats per token."""
    values = []
    for rows in rollouts.rows:
        index = torch.tensor(rows, dtype=torch.long)
        total = float(token_entropy_sums[index[:, 0], index[:, 1]].sum())
        count = float(rollouts.lengths[index[:, 0], index[:, 1]].sum())
        values.append(total / max(count, 1.0))
    return sum(values) / len(values)


def merge_process_rows(rollouts: TRLRollouts, processes: int) -> TRLRollouts:
    """The rollouts of :func:`rollout_batch_from_trl` on every process's micro-batches (process-major: process 0's M
    micro-batches, then process 1's, …) with ``rows[i]`` the rows of micro-batch i of every process together: TRL's
    ``global_masked_mean`` sums each ``training_step``'s Σ m h and Σ m over the processes before it divides."""
    count = len(rollouts.rows)
    if processes <= 1:
        return rollouts
    if count % processes:
        raise ValueError(f"{count} micro-batches do not split evenly over {processes} processes")
    per = count // processes
    rows = tuple(tuple(row for r in range(processes) for row in rollouts.rows[r * per + i]) for i in range(per))
    return dataclasses.replace(rollouts, rows=rows)


# ------------------------------------------------------------------------------------- the realised change, reversed
@dataclass(frozen=True)
class ReverseChange:
    """H(θ_b) − H(θ_a) by importance sampling from samples drawn at θ_b (see the module docstring). Nats per
    response, except the ``*_per_token`` fields (nats per token).

    ``deltaH``, ``se``, ``deltaH_per_prompt`` (ΔĤ_n [B]); ``per_token``, ``per_token_se``, ``per_token_per_prompt``
    (ΔĤ^tok_n [B], each prompt's change of Σ_g w̃ F / Σ_g w̃ T); ``H_after`` = Ĥ(θ_b) (Rao-Blackwell mean on E),
    ``H_before`` = Ĥ(θ_a) (weighted); ``diagnostics``: the :class:`~funcprobe.realised.WeightDiagnostics` of
    log w = S_{θ_a} − S_{θ_b}; ``B``, ``G``; ``token_entropy_sums_after``: F = Σ_k m h at θ_b [B, G];
    ``evaluation_fingerprint``: the fingerprint of E, the batch drawn at θ_b (``funcprobe.batch.batch_fingerprint``:
    token ids, masks, B, G, τ), or None when unknown — :meth:`pairing` carries it, so ``paired_difference`` refuses
    a δĤ₁(E) of another batch.
    """

    deltaH: float
    se: float
    deltaH_per_prompt: tuple[float, ...]
    per_token: float
    per_token_se: float
    H_before: float
    H_after: float
    diagnostics: Any
    B: int
    G: int
    token_entropy_sums_after: Tensor = field(repr=False, compare=False)
    per_token_per_prompt: tuple[float, ...] = ()
    evaluation_fingerprint: str | None = None

    @property
    def reliable(self) -> bool:
        return bool(self.diagnostics.reliable)

    def pairing(self, per_token: bool = False) -> Any:
        """This result in the shape ``funcprobe.heldout.paired_difference`` reads: per sequence, or per token
        (against ``delta_h1_heldout(..., per_token=True)``), with E's ``evaluation_fingerprint`` (checked there)."""
        return types.SimpleNamespace(deltaH_per_prompt=self.per_token_per_prompt if per_token else
                                     self.deltaH_per_prompt, deltaH=self.per_token if per_token else self.deltaH,
                                     B=self.B, G=self.G, per_token=bool(per_token), reliable=self.reliable,
                                     reason=self.diagnostics.reason, method="reverse importance sampling",
                                     evaluation_fingerprint=self.evaluation_fingerprint)


def reverse_importance_change(params_before: Mapping[str, Tensor], params_after: Mapping[str, Tensor],
                              batch: RolloutBatch, *, policy: Policy, seq_chunk: int | None = None,
                              token_chunk: int | None = None, world: World | None = None,
                              values_after: tuple[Tensor, Tensor] | None = None) -> ReverseChange:
    """ΔĤ = Ĥ(θ_b) − Ĥ(θ_a) on ``batch`` drawn from π at ``params_after`` = θ_b, by importance sampling back to
    ``params_before`` = θ_a (Rao-Blackwell integrand; two no-grad forwards): per sequence by ordinary importance
    sampling with a leave-one-out control variate (``normalize="loo"``, unbiased at any step size), per token by the
    per-prompt self-normalised ratio (``normalize="prompt"``).

    It is ``funcprobe.realised.importance_weighted_delta_h`` with the roles of θ and θ⁺ exchanged (the samples'
    θ is θ_b), negated: log w = S_{θ_a} − S_{θ_b}, ΔĤ_n = f̄_b − [f̄_a + (1/(G−1)) Σ_g w_g (f_a,g − f̄_a)]. Per-prompt
    values, SE and the weight diagnostics carry over unchanged (the SE of −X is that of X).

    Both sides' (S, F = Σ_k m h) come from ``funcprobe.heldout.heldout_sequence_values`` — the chunks and arithmetic
    of the held-out pass — so θ_a = θ_b gives exactly 0. ``values_after``: θ_b's (S, F) [B, G] already computed by
    that path (``heldout_pass(..., sequence_values=True)``, as the callback does): then only θ_a's forward runs.
    ``world`` (``funcprobe.distributed``): every rank passes the whole batch and forwards its shard of prompts; the
    rows are gathered, so every rank gets the one-process result.
    """
    from .heldout import heldout_sequence_values

    chunks = dict(seq_chunk=seq_chunk, token_chunk=token_chunk, world=world)
    if values_after is None:
        S_b, E_b = heldout_sequence_values(params_after, batch, policy=policy, **chunks)
    else:
        S_b, E_b = (v.to("cpu", torch.float64) for v in values_after)
        if S_b.shape != (batch.B, batch.G) or E_b.shape != (batch.B, batch.G):
            raise ValueError(f"values_after must be θ_b's (S, F), each [B, G] = [{batch.B}, {batch.G}]; got "
                             f"{tuple(S_b.shape)} and {tuple(E_b.shape)}.")
    S_a, E_a = heldout_sequence_values(params_before, batch, policy=policy, **chunks)
    # importance_weighted_delta_h(S, S⁺) estimates H(θ⁺) − H(θ) from samples at θ: here θ = θ_b, θ⁺ = θ_a.
    back = importance_weighted_delta_h(S_b, S_a, normalize="loo", values_before=E_b, values_after=E_a)
    lengths = batch.response_lengths.to("cpu", torch.float64)
    back_tok = importance_weighted_delta_h(S_b, S_a, normalize="prompt", per_token=True, lengths=lengths,
                                           values_before=E_b, values_after=E_a)
    diagnostics = weight_diagnostics(back.log_weights, normalize="prompt")
    return ReverseChange(deltaH=-back.deltaH, se=back.se,
                         deltaH_per_prompt=tuple(float(-x) for x in back.deltaH_per_prompt),
                         per_token=-back_tok.deltaH, per_token_se=back_tok.se, H_before=back.H_after,
                         H_after=back.H_before, diagnostics=diagnostics, B=batch.B, G=batch.G,
                         token_entropy_sums_after=E_b,
                         per_token_per_prompt=tuple(float(-x) for x in back_tok.deltaH_per_prompt),
                         evaluation_fingerprint=batch.fingerprint)


@dataclass(frozen=True)
class StepChange:
    """One step's change θ_a → θ_b measured on a batch E drawn at θ_b: the realised change (``realised``, a
    :class:`ReverseChange`), the first-order change along the step taken (``first_order``, a
    ``funcprobe.heldout.HeldoutResult`` at θ_b with Δθ = θ_b − θ_a), and their paired differences per response
    (``paired``) and per token (``paired_per_token``, None without ``per_token``). ``seconds``: wall time."""

    realised: ReverseChange
    first_order: Any
    paired: Any
    paired_per_token: Any
    seconds: float


def measure_step_change(params_before: Mapping[str, Tensor], params_after: Mapping[str, Tensor],
                        batch: RolloutBatch, *, policy: Policy, integrand: str = "rao_blackwell",
                        per_token: bool = True, seq_chunk: int | None = None, token_chunk: int | None = None,
                        world: World | None = None) -> StepChange:
    """The callback's measurement of the step θ_a = ``params_before`` → θ_b = ``params_after`` on ``batch`` (E,
    drawn at θ_b independently of the step), from one held-out pass at θ_b and one no-grad forward at θ_a.

    * first order: δĤ₁(E) = mean_n D_n(θ_b − θ_a) at θ_b (spec §9, ``funcprobe.heldout``), per response and, with
      ``per_token``, per token (D^tok_n; a second backward of the same forward);
    * realised: :func:`reverse_importance_change`, θ_b's (S, F) taken from that same forward
      (``heldout_pass(..., sequence_values=True)``), so the realised change costs one forward, not two;
    * paired: ``funcprobe.heldout.paired_difference`` prompt by prompt, in both units.

    Δθ is formed in float64 from the two dicts. Equal, to rounding, to ``reverse_importance_change`` and
    ``delta_h1_heldout`` called separately (tests/test_trl_callback.py checks 1e-9 in float64). Raises as they do.
    """
    from .heldout import heldout_pass, heldout_result, step_directions

    started = time.perf_counter()
    delta = {n: params_after[n].detach().to("cpu", torch.float64) - params_before[n].detach().to("cpu", torch.float64)
             for n in params_after}
    directions, _ = step_directions(delta, params_after)
    passed = heldout_pass(params_after, directions, batch, policy=policy, integrand=integrand, seq_chunk=seq_chunk,
                          token_chunk=token_chunk, world=world, per_token=per_token, sequence_values=True)
    first = heldout_result(passed, [0], decomposed=False, integrand=integrand)
    values = passed.sequence_values
    change = reverse_importance_change(params_before, params_after, batch, policy=policy, seq_chunk=seq_chunk,
                                       token_chunk=token_chunk, world=world,
                                       values_after=(values[..., 0], values[..., 1]))
    paired = paired_difference(change.pairing(), first)
    paired_tok = paired_difference(change.pairing(per_token=True), first) if per_token else None
    return StepChange(realised=change, first_order=first, paired=paired, paired_per_token=paired_tok,
                      seconds=time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------------- the callback
@dataclass
class _Pending:
    """A probed step waiting for the first generation drawn after it."""

    theta: dict[str, Tensor]     # θ before ``first_step`` (CPU)
    first_step: int


def _rel_l2(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    num = sum(float(((a[n].double() - b[n].double()) ** 2).sum()) for n in b)
    den = sum(float((b[n].double() ** 2).sum()) for n in b)
    return math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)


class EntropyChangeCallback(_CallbackBase):
    """A ``transformers.TrainerCallback`` for TRL's ``GRPOTrainer``: each probed step's entropy change, its
    first-order part, the paired difference and whether the trainer's step is funcprobe's (module docstring).

    Args:
        trainer: the ``GRPOTrainer`` (its model must be a PEFT LoRA model).
        every: probe optimizer steps 1, 1 + every, 1 + 2·every, … (1: every step).
        match_every: compute ``step_match`` and ``update_match`` (funcprobe's gradient of the batch: about a third
            of the callback's cost) at every ``match_every``-th probed step only, starting with the first (1: at
            every probed step). They check the trainer's settings, which do not change during a run; the
            measurement itself needs only Δθ. Rows of the other steps have no step_match / update_match entry.
        integrand: δĤ₁(E)'s integrand, "rao_blackwell" (default) or "sequence".
        per_token: also the first-order change per token and its paired difference with ``realised_per_token``
            (``first_order_per_token``, ``difference_per_token`` and their SEs; a second backward of the held-out
            pass's forward, about 1.4× that pass).
        keep_tensors: also keep, in :attr:`history`, θ_a, θ_b (CPU LoRA dicts) and the evaluation batch of each
            measurement, and each probed step's own batch (for offline checks; memory grows with the run).
        seq_chunk, token_chunk: funcprobe's chunk sizes (default the policy's: 8 sequences, 512 rows).

    Attributes:
        history: one dict per step the callback did something at: ``step`` and the values it logged for it (floats,
            NaN where null) plus ``step_match_reason`` / ``update_match_reason`` where null.
        step_match_reason, update_match_reason: why that value is null, or None.
        error: the first failure's traceback (the callback is off from then on), or None.

    Raises (when made, before any training): TypeError when ``trainer`` is not TRL's GRPOTrainer, ValueError when its
    model has no LoRA adapter (pass ``peft_config=`` to the trainer) or for a bad ``every`` / ``match_every`` /
    ``integrand``. Failures during training are never raised (see ``error``).
    """

    def __init__(self, trainer: Any, every: int = 1, integrand: str = "rao_blackwell", *, keep_tensors: bool = False,
                 seq_chunk: int | None = None, token_chunk: int | None = None, match_every: int = 1,
                 per_token: bool = True):
        for name, value, what in (("every", every, "probe every k-th optimizer step"),
                                  ("match_every", match_every, "check the trainer's step at every k-th probed step")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer ({what}); got {value!r}.")
        from .heldout import INTEGRANDS

        if integrand not in INTEGRANDS:
            raise ValueError(f"integrand must be one of {INTEGRANDS}; got {integrand!r}.")
        _check_trainer(trainer)
        self.trainer = trainer
        self.every = every
        self.match_every = match_every
        self.per_token = bool(per_token)
        self.integrand = integrand
        self.keep_tensors = bool(keep_tensors)
        self.chunks = dict(seq_chunk=seq_chunk, token_chunk=token_chunk)
        self.history: list[dict[str, Any]] = []
        self.step_match_reason: str | None = None
        self.update_match_reason: str | None = None
        self.error: str | None = None
        self._policy: Policy | None = None
        self._objective = None
        self._pending: _Pending | None = None
        self._last_buffer: Any = None      # the generation (list object) the previous step used; held for identity
        self._reliable_reason: str | None = None
        self._world: World = SINGLE          # several processes: the process group's, checked (on_train_begin)
        self._owe_flag = False                # failed outside on_step_end: tell the peers at the next on_step_end
        self._reset_step()

    # ------------------------------------------------------------------------------------------------ plumbing
    def _reset_step(self) -> None:
        self._micro: list[tuple[Any, int]] = []
        self._theta_begin: dict[str, Tensor] | None = None
        self._clipped: dict[str, Tensor] | None = None
        self._optimizer_state: dict[str, Any] | None = None
        self._elapsed = 0.0

    @property
    def active(self) -> bool:
        return self.error is None

    @property
    def distributed(self) -> bool:
        return self._world.distributed

    @property
    def model(self):
        return _unwrapped_model(self.trainer)

    @contextlib.contextmanager
    def _guard(self, what: str, synced: bool = False):
        """Time the block; a failure is warned about once and switches the callback off (training goes on).

        Several processes: every rank switches off together. A rank whose own code failed (not a collective, not a
        peer's failure) tells the others through ``funcprobe.distributed.failure_flag``: at once in a ``synced``
        block (on_train_begin, on_step_end, where the peers are in funcprobe's collectives or its closing flag),
        else at the start of the next on_step_end (the peers may be in the trainer's own collectives meanwhile)."""
        started = time.perf_counter()
        try:
            yield
        except Exception as error:  # noqa: BLE001 - nothing in here may stop the training run
            if self.distributed and not isinstance(error, DistributedError):
                self._owe_flag = True
                from .distributed import record_failure

                record_failure(self._world, RuntimeError(f"funcprobe callback, {what}: {type(error).__name__}: "
                                                         f"{error}"))
                if synced:
                    self._pay_flag(what)
            self.error = f"{what}: {type(error).__name__}: {error}\n{traceback.format_exc()}"
            message = (f"funcprobe EntropyChangeCallback failed in {what} ({type(error).__name__}: {error}); it is "
                       "off for the rest of this run, training continues. callback.error has the traceback.")
            logger.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            self._pending = None
            self._last_buffer = None
            self._reset_step()
        finally:
            self._elapsed += time.perf_counter() - started

    def _pay_flag(self, what: str) -> None:
        """This rank's one ``failure_flag(world, True)`` after its own failure (see :meth:`_guard`)."""
        if not self._owe_flag:
            return
        self._owe_flag = False
        from .distributed import failure_flag

        try:
            failure_flag(self._world, True, f"funcprobe callback, {what}")
        except Exception as error:  # noqa: BLE001 - the process group itself is broken; nothing more to tell
            logger.warning("funcprobe EntropyChangeCallback could not tell the other ranks that it failed: %s", error)

    @contextlib.contextmanager
    def _eval_mode(self):
        """The model in eval mode, without transformers' ``make_inputs_require_grads`` hooks (gradient
        checkpointing, TRL's default, installs them; ``requires_grad_`` inside ``torch.func.vjp`` is an error), for
        the duration of the block; mode and hooks are restored exactly (same dict, same order)."""
        model = self.model
        was_training = model.training
        suspended = []
        for module in model.modules():
            hooks = module._forward_hooks
            found = [k for k, hook in hooks.items() if getattr(hook, "__name__", "") == "make_inputs_require_grads"]
            if found:
                suspended.append((hooks, dict(hooks)))
                for k in found:
                    del hooks[k]
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)
            for hooks, saved in suspended:
                hooks.clear()
                hooks.update(saved)

    def _probed(self, step: int) -> bool:
        return (step - 1) % self.every == 0

    def _matched(self, step: int) -> bool:
        """Whether step_match / update_match are computed at ``step`` (a probed step; see ``match_every``)."""
        return self._probed(step) and ((step - 1) // self.every) % self.match_every == 0

    def _snapshot(self) -> dict[str, Tensor]:
        named = dict(self.model.named_parameters())
        return {n: named[n].detach().to("cpu", copy=True) for n in self._policy.param_names}

    def _on_device(self, theta: Mapping[str, Tensor]) -> dict[str, Tensor]:
        device = self._policy.device
        return {n: t.to(device) for n, t in theta.items()}

    def _current_micro_batch(self) -> None:
        trainer = self.trainer
        buffer = trainer._buffered_inputs
        index = (trainer._step - 1) % trainer.args.steps_per_generation
        self._micro.append((buffer, index))

    # --------------------------------------------------------------------------------------------- the events
    def on_train_begin(self, args, state, control, **kwargs):
        if not self.active:
            return
        accelerator = getattr(self.trainer, "accelerator", None)
        processes = int(getattr(accelerator, "num_processes", 1) or 1)
        with self._guard("on_train_begin"):  # the same on every rank: no rank has a world yet if it fails
            if processes > 1:
                from .distributed import world_of_process_group

                world = world_of_process_group(checked=True)
                if world.size != processes:
                    raise RuntimeError(f"accelerate runs {processes} processes but torch.distributed's default "
                                       f"process group has {world.size}: the rollouts cannot be gathered")
                self._world = world
        if not self.active:
            return
        with self._guard("on_train_begin", synced=True):
            with self._eval_mode():
                self._policy = Policy.from_peft(self.model, temperature=float(args.temperature))
            self._objective, self.step_match_reason = _trainer_objective(args, processes)
            if self.distributed:
                from .distributed import failure_flag

                failure_flag(self._world, False, "the end of funcprobe's on_train_begin")
            if self.step_match_reason is not None:
                logger.warning("funcprobe EntropyChangeCallback: step_match is null for this run: %s",
                               self.step_match_reason)
        self._elapsed = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if not self.active or self._policy is None:
            return
        self._reset_step()
        with self._guard("on_step_begin"):
            self._theta_begin = self._snapshot()

    def on_substep_end(self, args, state, control, **kwargs):
        if not self.active or self._theta_begin is None:
            return
        with self._guard("on_substep_end"):
            self._current_micro_batch()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self.active or self._theta_begin is None:
            return
        with self._guard("on_pre_optimizer_step"):
            self._current_micro_batch()
            if self._matched(state.global_step + 1):
                named = dict(self.model.named_parameters())
                self._clipped = {n: (named[n].grad.detach().to("cpu", copy=True) if named[n].grad is not None
                                     else torch.zeros_like(self._theta_begin[n])) for n in self._policy.param_names}
                self._optimizer_state = _optimizer_snapshot(self.trainer.optimizer, self.model,
                                                            self._policy.param_names)

    def on_step_end(self, args, state, control, **kwargs):
        if self._owe_flag:  # this rank failed since the last on_step_end: its peers learn it here, all switch off
            self._pay_flag("on_step_end")
            return
        if not self.active or self._theta_begin is None:
            return
        step = state.global_step
        record: dict[str, Any] = {"step": step}
        with self._guard("on_step_end", synced=True):
            with self._eval_mode():
                self._step_end(args, step, record)
            if self.distributed:  # every rank got here without failing, or all switch off together
                from .distributed import failure_flag

                failure_flag(self._world, False, "the end of funcprobe's on_step_end")
        if not self.active:
            return
        record["overhead_s"] = self._elapsed
        self._emit(record)
        self._reset_step()

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Write the reasons for null values beside them in ``log_history`` (strings cannot go through TRL's
        averaged metrics)."""
        if not state.log_history:
            return
        row = state.log_history[-1]
        for name in ("step_match", "update_match"):
            key = PREFIX + name
            if key in row and row[key] is None:
                reason = getattr(self, f"{name}_reason") or "not computed"
                row[PREFIX + name + "_reason"] = reason
        reliable = row.get(PREFIX + "reliable")
        if reliable is not None and reliable < 1 and self._reliable_reason:
            row[PREFIX + "reliable_reason"] = self._reliable_reason

    # ------------------------------------------------------------------------------------------- the step's work
    def _step_end(self, args, step: int, record: dict[str, Any]) -> None:
        policy = self._policy
        trainer = self.trainer
        G = int(args.num_generations)
        convert = dict(G=G, pad_token_id=_pad_id(trainer), temperature=float(args.temperature),
                       length_norm=float(args.max_completion_length))
        buffers_before = self._last_buffer
        fresh = [buffer for buffer, _ in self._micro if buffer is not buffers_before]
        new_generation = fresh[0] if fresh else None
        self._last_buffer = self._micro[-1][0]
        probed = self._probed(step)
        measure = new_generation is not None and self._pending is not None
        whole = [buffer[index] for buffer, index in self._micro]     # this step's micro-batches, in order
        # the evaluation batch is the whole new generation: this step's micro-batches when it serves one step
        same = measure and len(new_generation) == len(whole) and all(
            any(mb is entry for mb in whole) for entry in new_generation)
        generation = list(new_generation) if measure and not same else []
        if self.distributed:  # every process's rollouts, on every rank (each holds its shard of the prompts' rows)
            whole, generation = self._gather_rollouts(step, (probed, measure, same), whole, generation)
        if not (probed or measure):
            return
        own = merge_process_rows(rollout_batch_from_trl(whole, **convert), self._world.size)
        theta_b = self._theta_begin
        own_sums = None
        if measure:
            evaluation = own if same else rollout_batch_from_trl(generation, **convert)
            change = self._measure(self._pending, theta_b, evaluation.batch, step - 1, record)
            if same:
                own_sums = change.token_entropy_sums_after
            self._pending = None
        if probed:
            if own_sums is None:
                theta_dev = self._on_device(theta_b)
                own_sums = sharded_pass(self._world, own.batch)(
                    lambda **k: policy.token_entropies(theta_dev, own.batch, **self.chunks, **k))
            record["entropy_per_token"] = trl_entropy_per_token(own_sums, own)
            if self._matched(step):
                record["step_match"] = self._step_match(theta_b, own.batch, record)
                record["update_match"] = self._update_match(theta_b, record)
            if self.keep_tensors:
                record["own_batch"] = own
                record["theta_before"] = theta_b
            if self._pending is None:
                self._pending = _Pending(theta=theta_b, first_step=step)

    def _gather_rollouts(self, step: int, decision: tuple[bool, bool, bool], whole: list, generation: list
                         ) -> tuple[list, list]:
        """Every process's micro-batches of this step and of the evaluation generation, process-major (the same
        lists on every rank), from one ``all_gather_object`` of CPU copies; every rank takes part at every step,
        and all must have decided the same (probed, measured, evaluation = this step's rollouts)."""
        from .distributed import all_gather_objects

        wanted = decision[0] or decision[1]
        mine = {"decision": decision, "whole": [_portable(mb) for mb in whole] if wanted else [],
                "generation": [_portable(mb) for mb in generation]}
        pieces = all_gather_objects(self._world, mine, f"funcprobe callback: all_gather of step {step}'s rollouts")
        decisions = {piece["decision"] for piece in pieces}
        if len(decisions) > 1:  # the same error on every rank (they all hold the same pieces)
            raise RuntimeError(f"the processes disagree on what step {step} does (probed, measured, evaluation = "
                               f"this step's rollouts): {sorted(decisions)}")
        return ([mb for piece in pieces for mb in piece["whole"]],
                [mb for piece in pieces for mb in piece["generation"]])

    def _measure(self, pending: _Pending, theta_b: dict[str, Tensor], batch: RolloutBatch, last_step: int,
                 record: dict[str, Any]) -> ReverseChange:
        theta_a = pending.theta
        measured = measure_step_change(self._on_device(theta_a), self._on_device(theta_b), batch, policy=self._policy,
                                       integrand=self.integrand, per_token=self.per_token, **self.chunks,
                                       world=self._world)
        change, first, paired = measured.realised, measured.first_order, measured.paired
        diag = change.diagnostics
        record.update({
            "first_step": float(pending.first_step), "last_step": float(last_step),
            "realised": change.deltaH, "realised_se": change.se,
            "realised_per_token": change.per_token, "realised_per_token_se": change.per_token_se,
            "first_order": first.deltaH1, "first_order_se": first.se,
            "difference": paired.difference, "difference_se": paired.se,
        })
        if measured.paired_per_token is not None:
            record.update({
                "first_order_per_token": first.deltaH1_per_token, "first_order_per_token_se": first.se_per_token,
                "difference_per_token": measured.paired_per_token.difference,
                "difference_per_token_se": measured.paired_per_token.se,
            })
        record.update({
            "entropy": change.H_after,
            "ess_min": diag.ess_min_fraction, "ess_mean": diag.ess_mean_fraction,
            "khat": diag.khat if diag.khat_assessed else math.nan,
            "reliable": 1.0 if change.reliable else 0.0,
        })
        if not change.reliable:
            record["reliable_reason"] = self._reliable_reason = diag.reason
        if self.keep_tensors:
            record["theta_a"], record["theta_b"], record["evaluation_batch"] = theta_a, theta_b, batch
        return change

    def _step_match(self, theta: dict[str, Tensor], batch: RolloutBatch, record: dict[str, Any]) -> float:
        if self._objective is None or self._clipped is None:
            record["step_match_reason"] = self.step_match_reason or "the clipped gradient was not captured"
            return math.nan
        from .adam import grad_clip_coef
        from .update import policy_gradient, shard_policy_gradient

        refused = None
        try:  # several processes: this rank's prompts (the whole batch's weights), then summed over the ranks
            if self.distributed:
                _, ybar = shard_policy_gradient(self._on_device(theta), batch, list(self._world.shard(batch.B)),
                                                policy=self._policy, objective=self._objective, **self.chunks)
            else:
                _, ybar = policy_gradient(self._on_device(theta), batch, policy=self._policy,
                                          objective=self._objective, **self.chunks)
        except ValueError as error:  # a setting the Objective holds but the policy refuses (e.g. DoRA with β > 0)
            refused = f"funcprobe's gradient of this batch: {error}"
        if self.distributed:  # all ranks learn whether any refused, then all or none sum their parts
            from .distributed import all_gather_objects, all_reduce_sum_

            refusals = all_gather_objects(self._world, refused, "funcprobe callback: all_gather of step_match refusals")
            refused = refused or (refusals[0] if refusals else None)
            if refused is None:
                all_reduce_sum_(self._world, ybar, "funcprobe callback: all_reduce of the RL gradient")
        if refused is not None:
            self.step_match_reason = refused
            record["step_match_reason"] = self.step_match_reason
            return math.nan
        grad = {n: -y for n, y in ybar.items()}
        if self._objective.max_grad_norm is not None:
            _, coef = grad_clip_coef(grad, self._objective.max_grad_norm)
            grad = {n: g * float(coef) for n, g in grad.items()}
        return _rel_l2(grad, self._clipped)

    def _update_match(self, theta: dict[str, Tensor], record: dict[str, Any]) -> float:
        state = self._optimizer_state
        if isinstance(state, str) or state is None:
            self.update_match_reason = state or "the optimizer state was not captured"
            record["update_match_reason"] = self.update_match_reason
            return math.nan
        from .adam import AdamState, adamw_update

        try:
            adam = AdamState.from_torch(state["state_dict"], state["names"], theta)
        except ValueError as error:
            self.update_match_reason = f"funcprobe's AdamW cannot read this optimizer's state: {error}"
            record["update_match_reason"] = self.update_match_reason
            return math.nan
        after, _ = adamw_update(theta, self._clipped, adam)
        named = dict(self.model.named_parameters())
        taken = {n: named[n].detach().to("cpu", torch.float64) - theta[n].double() for n in theta}
        return _rel_l2({n: after[n].double() - theta[n].double() for n in theta}, taken)

    # --------------------------------------------------------------------------------------------------- logging
    def _emit(self, record: dict[str, Any]) -> None:
        """Append the step's values to TRL's metrics, which ``GRPOTrainer.log`` writes into this step's row."""
        self.history.append(record)
        if not self._world.is_main:  # the values are the same on every rank; TRL logs the main process's
            return
        metrics = getattr(self.trainer, "_metrics", None)
        if metrics is None or "train" not in metrics:
            return
        for key, value in record.items():
            if key == "step" or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            value = float(value)
            metrics["train"][PREFIX + key].append(value if math.isfinite(value) else math.nan)


def _unwrapped_model(trainer: Any):
    """The trainer's model without accelerate's wrappers (DDP, …)."""
    accelerator = getattr(trainer, "accelerator", None)
    return accelerator.unwrap_model(trainer.model) if accelerator is not None else trainer.model


def _check_trainer(trainer: Any) -> None:
    """Refuse, when the callback is made, a trainer it cannot measure (rather than a warning once training runs):
    not a TRL GRPOTrainer (no ``_buffered_inputs``, the rollouts it reads), or a model without a LoRA adapter."""
    if not hasattr(trainer, "_buffered_inputs") or not hasattr(trainer, "args"):
        raise TypeError(f"EntropyChangeCallback(trainer) needs TRL's GRPOTrainer (it reads the step's rollouts from "
                        f"trainer._buffered_inputs); got {type(trainer).__name__}. Pass the trainer itself: "
                        "EntropyChangeCallback(trainer).")
    model = _unwrapped_model(trainer)
    if not hasattr(model, "peft_config"):
        raise ValueError(f"EntropyChangeCallback needs a LoRA policy, but the trainer's model is a "
                         f"{type(model).__name__} without a PEFT adapter: funcprobe's policy is the base model plus "
                         "its LoRA tensors. Give the trainer one: GRPOTrainer(..., peft_config=LoraConfig(r=..., "
                         "target_modules=[...])).")


def _trainer_objective(args, processes: int = 1) -> tuple[Any, str | None]:
    """(the Objective of the trainer's step, None) or (None, why funcprobe cannot model it)."""
    from .trainer_config import trainer_settings

    try:
        settings = trainer_settings({**args.to_dict(), "num_processes": int(processes)}, source="trainer.args")
    except ValueError as error:
        return None, str(error)
    return settings.objective, None


def _optimizer_snapshot(optimizer, model, names: Sequence[str]) -> dict[str, Any] | str:
    """The optimizer's state before its step, on the CPU, with the names of its parameters; or why not."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if type(inner).__name__ not in ("AdamW", "Adam"):
        return f"the optimizer is {type(inner).__name__}; funcprobe models AdamW only"
    by_id = {id(p): n for n, p in model.named_parameters()}
    order = [by_id.get(id(p)) for group in inner.param_groups for p in group["params"]]
    if any(n is None for n in order) or set(order) != set(names):
        return "the optimizer's parameters are not exactly the LoRA tensors"
    state_dict = inner.state_dict()
    copied = {"state": {k: {key: (v.detach().to("cpu", copy=True) if isinstance(v, Tensor) else v)
                            for key, v in entry.items()} for k, entry in state_dict["state"].items()},
              "param_groups": [dict(g) for g in state_dict["param_groups"]]}
    return {"state_dict": copied, "names": order}


def _portable(micro_batch: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of a TRL micro-batch that :func:`rollout_batch_from_trl` reads, as CPU tensors (to pickle)."""
    keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages", "tool_mask")
    return {k: (micro_batch[k].detach().to("cpu") if isinstance(micro_batch[k], Tensor) else micro_batch[k])
            for k in keys if k in micro_batch}


def _pad_id(trainer) -> int:
    tokenizer = getattr(trainer, "processing_class", None)
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(trainer, "pad_token_id", None)
    return int(pad if pad is not None else 0)
