"""Run one real TRL ``GRPOTrainer`` optimizer step on fixed, injected completions, and record what TRL computed.

Only generation is replaced. The trainer's model gets a ``generate`` that returns the given completions, laid out
the way ``transformers``' ``generate`` does: the left-padded prompts, then the completion tokens, then
``pad_token_id`` after an EOS. Everything downstream is TRL's own code, run by ``trainer.train()``
(``max_steps=1``):

* prompt tokenisation and left padding, and the EOS cut (``_generate_single_turn``);
* reward calls and advantages (``_generate_and_score_completions``: ``scale_rewards``, ``num_items_in_batch``);
* reference log-probabilities (the adapter disabled, at generation time) when β > 0;
* the loss and its backward (``_compute_loss``, per ``loss_type``);
* gradient clipping (``max_grad_norm``) and the AdamW step (TRL's default optimizer), then the LR scheduler.

Hooks only record:

* the output of ``_generate_and_score_completions`` (advantages, masks, ``num_items_in_batch``) and of
  ``_calculate_rewards`` (the rewards);
* the gradient after ``training_step`` (the loss gradient before clipping);
* the gradient at ``on_pre_optimizer_step`` (after clipping).

:class:`TRLStepHarness` builds one trainer and can take its one step several times. Before each step it restores the
LoRA parameters and drops the optimizer. Between steps only ``scale_rewards`` may change: it is read at advantage
time only, so one trainer serves every reward scaling.

Results are in canonical order: prompt n of ``prompts``, completion g of ``completions[n]``. TRL's sampler
shuffles the prompts, so its rows are mapped back by their prompt token ids, which must therefore be distinct.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

__all__ = ["TRLStep", "TRLStepHarness", "trl_grpo_step", "call_reward", "grpo_config", "objective_for_config",
           "STEP_DEFAULTS"]

#: GRPOConfig settings the harness always uses. They make TRL's step exactly the one funcprobe models: a forward in
#: the model's own dtype (no bf16 autocast, no checkpointing), one generation batch = one optimizer step (no
#: gradient accumulation), and no saving. The step's log goes to TRLStep.log.
STEP_DEFAULTS: dict[str, Any] = dict(
    use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, report_to="none", max_steps=1,
    logging_steps=1, save_strategy="no", gradient_accumulation_steps=1, disable_tqdm=True, dataloader_num_workers=0,
)


@dataclass
class TRLStep:
    """What TRL computed for one step, in canonical [B, G] order (prompt n, completion g).

    ``prompt_ids``: the prompts as TRL tokenised them. ``completion_ids``: the completions as TRL kept them (cut after
    the first EOS). ``rewards`` [B, G, F]: TRL's float32 reward of each reward function. ``advantages`` [B, G]: TRL's
    advantages. ``num_items_in_batch``: TRL's loss-token count. ``grad``: the loss gradient before clipping.
    ``clipped_grad``: the gradient the optimizer used. ``params_before`` / ``params_after``: the LoRA tensors before
    and after ``optimizer.step()``. ``optimizer_state``: ``optimizer.state_dict()`` after the step, with
    ``param_names`` its parameter order. ``lr``: the step's learning rate (the scheduler's initial lr).
    ``completion_mask`` [B, G, C] and ``ref_per_token_logps`` [B, G, C] (or None) are TRL's, right-padded to C.
    ``trl_order``: the (n, g) of each row of TRL's generation batch, in TRL's order. Its sampler shuffles the
    prompts, and float32 batch statistics such as ``scale_rewards="batch"``'s std depend on that order.
    All gradient and parameter dicts are keyed by PEFT names; the tensors are detached clones.
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[list[int]]]
    rewards: Tensor
    advantages: Tensor
    num_items_in_batch: int
    completion_mask: Tensor
    ref_per_token_logps: Tensor | None
    grad: dict[str, Tensor]
    clipped_grad: dict[str, Tensor]
    params_before: dict[str, Tensor]
    params_after: dict[str, Tensor]
    optimizer_state: dict[str, Any]
    param_names: list[str]
    lr: float
    trl_order: list[tuple[int, int]]
    log: dict[str, float] = field(default_factory=dict)


def call_reward(reward_fn: Callable, prompts: Sequence[Any], completion_texts: Sequence[Sequence[str]],
                completion_ids: Sequence[Sequence[Sequence[int]]]) -> list[list[float]]:
    """Call a TRL-style reward function (keyword arguments ``prompts``, ``completions``, ``completion_ids``) on
    [B][G] completions, as TRL does: the prompts are repeated G times. Returns [B][G] rewards."""
    flat_prompts = [p for p, row in zip(prompts, completion_texts) for _ in row]
    flat_texts = [t for row in completion_texts for t in row]
    flat_ids = [list(c) for row in completion_ids for c in row]
    values = reward_fn(prompts=flat_prompts, completions=flat_texts, completion_ids=flat_ids)
    out, k = [], 0
    for row in completion_texts:
        out.append([float("nan") if v is None else float(v) for v in values[k:k + len(row)]])
        k += len(row)
    return out


def grpo_config(**settings):
    """``GRPOConfig(**settings)``, without transformers 5's FutureWarning about TRL's ``gradient_checkpointing``."""
    from trl import GRPOConfig

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`gradient_checkpointing` is deprecated", FutureWarning)
        return GRPOConfig(**settings)


def objective_for_config(args) -> "funcprobe.Objective":  # noqa: F821
    """The ``funcprobe.Objective`` of a ``GRPOConfig``'s first optimizer step (one process), through funcprobe's own
    reader of a run's settings (``funcprobe.trainer_config.trainer_settings``, what ``--trainer-config`` uses): a
    ValueError names each setting funcprobe cannot match exactly."""
    from funcprobe.trainer_config import trainer_settings

    return trainer_settings(args.to_dict(), source="GRPOConfig").objective


class TRLStepHarness:
    """One ``GRPOTrainer`` with a LoRA adapter whose generation returns fixed completions. :meth:`step` runs TRL's
    one optimizer step.

    Args:
        model_factory: () -> a fresh base causal LM (float32 or float64, no dropout), e.g.
            ``lambda: tiny_causal_lm(vocab_size=96)``.
        tokenizer: the processing class. Its ``pad_token_id`` pads, and its ``eos_token_id`` ends completions.
        prompts: B distinct prompt strings (the dataset's ``prompt`` column; TRL tokenises them).
        completions: [B][G] completion token-id lists. Each either ends with an EOS id or is exactly
            ``max_completion_length`` long (truncated). None may contain an EOS before its end.
        reward_funcs: a TRL reward function or a list of them.
        peft_config: a ``peft.LoraConfig`` (a fresh adapter: TRL's KL reference is then the base model).
        seed: seeds the adapter's initialisation.
        **config: GRPOConfig overrides (``loss_type``, ``beta``, ``scale_rewards``, ``temperature``,
            ``max_completion_length``, ``learning_rate``, …). ``num_generations`` and
            ``per_device_train_batch_size`` are set from the completions. :data:`STEP_DEFAULTS` are applied first.
    """

    def __init__(self, model_factory: Callable[[], torch.nn.Module], tokenizer, prompts: Sequence[str],
                 completions: Sequence[Sequence[Sequence[int]]], reward_funcs, *, peft_config, seed: int = 0,
                 **config):
        from datasets import Dataset
        from trl import GRPOTrainer

        B = len(prompts)
        G = len(completions[0])
        if len(completions) != B or any(len(row) != G for row in completions):
            raise ValueError("completions must be [B][G]: G completions for each of the B prompts")
        self.prompts = list(prompts)
        self.completions = [[list(map(int, c)) for c in row] for row in completions]
        self.tokenizer = tokenizer
        self.B, self.G = B, G
        self._tmp = tempfile.TemporaryDirectory(prefix="funcprobe_trl_")
        settings = {**STEP_DEFAULTS, "output_dir": self._tmp.name, "num_generations": G,
                    "per_device_train_batch_size": B * G, "seed": seed, **config}
        self.args = grpo_config(**settings)
        self._check_completions()
        with warnings.catch_warnings(), torch.random.fork_rng():
            warnings.simplefilter("ignore")
            torch.manual_seed(seed)
            self.trainer = GRPOTrainer(model=model_factory(), reward_funcs=reward_funcs, args=self.args,
                                       train_dataset=Dataset.from_dict({"prompt": self.prompts}),
                                       processing_class=tokenizer, peft_config=peft_config)
        trainer = self.trainer
        self.model = trainer.model
        self._check_no_dropout()
        self.param_names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.initial_params = self._lora_params()
        self._install_hooks()

    # ------------------------------------------------------------------------------------------------ the hooks
    def _check_completions(self) -> None:
        L = self.args.max_completion_length
        eos = self.tokenizer.eos_token_id
        for n, row in enumerate(self.completions):
            for g, c in enumerate(row):
                if not c or len(c) > L:
                    raise ValueError(f"completion ({n}, {g}) has {len(c)} tokens; it needs 1..{L}")
                if eos in c[:-1]:
                    raise ValueError(f"completion ({n}, {g}) has an EOS before its end")
                if c[-1] != eos and len(c) != L:
                    raise ValueError(f"completion ({n}, {g}) neither ends with EOS nor has {L} tokens (truncated)")

    def _check_no_dropout(self) -> None:
        """TRL computes the loss in train mode, and funcprobe in eval mode: they agree only without dropout."""
        active = [name for name, module in self.model.named_modules()
                  if isinstance(module, torch.nn.Dropout) and module.p > 0]
        attention = getattr(self.model.config, "attention_dropout", 0.0) or 0.0
        if active or attention > 0:
            raise ValueError(f"dropout is active ({active[:3]}, attention_dropout={attention}); TRL's train-mode "
                             "loss would be random. Use lora_dropout=0 and a model without dropout.")

    def _lora_params(self) -> dict[str, Tensor]:
        named = dict(self.model.named_parameters())
        return {n: named[n].detach().clone() for n in self.param_names}

    def _install_hooks(self) -> None:
        trainer, harness = self.trainer, self
        pad = self.tokenizer.pad_token_id
        record = self._record = {}

        def fixed_generate(input_ids=None, attention_mask=None, generation_config=None, **kwargs):
            """``generate`` for the injected completions: [prompts | completions, pad after EOS] as HF returns it."""
            budget = generation_config.max_new_tokens if generation_config is not None else None
            if budget != harness.args.max_completion_length:
                raise AssertionError(f"TRL asked for max_new_tokens={budget}, expected max_completion_length")
            handed = {}
            rows = []
            order = []
            for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
                key = tuple(t for t, m in zip(ids, mask) if m)
                n = harness._prompt_index[key]
                g = handed.get(n, 0)
                handed[n] = g + 1
                order.append((n, g))
                rows.append(harness.completions[n][g])
            width = max(len(c) for c in rows)
            tail = torch.tensor([c + [pad] * (width - len(c)) for c in rows], dtype=input_ids.dtype)
            record["order"] = order
            return torch.cat([input_ids, tail.to(input_ids.device)], dim=1)

        self.model.generate = fixed_generate
        original_score = trainer._generate_and_score_completions

        def score(inputs):
            output = original_score(inputs)
            record["batch"] = {k: (v.detach().clone() if isinstance(v, Tensor) else v) for k, v in output.items()}
            return output

        trainer._generate_and_score_completions = score
        original_rewards = trainer._calculate_rewards

        def calculate_rewards(*args, **kwargs):
            rewards_per_func = original_rewards(*args, **kwargs)
            record["rewards_per_func"] = rewards_per_func.detach().clone()
            return rewards_per_func

        trainer._calculate_rewards = calculate_rewards
        original_training_step = trainer.training_step

        def training_step(model, inputs, num_items_in_batch=None):
            loss = original_training_step(model, inputs, num_items_in_batch)
            record["grad"] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            return loss

        trainer.training_step = training_step
        from transformers import TrainerCallback

        class _Record(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                record["clipped_grad"] = {n: p.grad.detach().clone() for n, p in harness.model.named_parameters()
                                          if p.requires_grad}

        trainer.add_callback(_Record())
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)  # the step's log is kept in TRLStep.log instead of printed
        trainer.remove_callback(ProgressCallback)
        # The prompts as TRL tokenises them (plain strings: the tokenizer's default call).
        prompt_ids = self.tokenizer(text=self.prompts)["input_ids"]
        self._prompt_index = {tuple(ids): n for n, ids in enumerate(prompt_ids)}
        if len(self._prompt_index) != self.B:
            raise ValueError("the prompts must tokenise to distinct token ids (rows are matched by them)")
        self.prompt_ids = [list(ids) for ids in prompt_ids]

    # ------------------------------------------------------------------------------------------------- the step
    def step(self, **changes) -> TRLStep:
        """Restore the initial LoRA parameters, drop the optimizer, and run ``trainer.train()`` for its one step.

        ``changes`` may set ``scale_rewards`` only.
        """
        unknown = set(changes) - {"scale_rewards"}
        if unknown:
            raise ValueError(f"only scale_rewards may change between steps of one trainer; got {sorted(unknown)}")
        trainer = self.trainer
        if "scale_rewards" in changes:
            self.args.scale_rewards = trainer.scale_rewards = changes["scale_rewards"]
        with torch.no_grad():
            named = dict(self.model.named_parameters())
            for n, value in self.initial_params.items():
                named[n].copy_(value)
        trainer.optimizer = None
        trainer.lr_scheduler = None
        self._record.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
        self.model.eval()  # TRL leaves train mode on; funcprobe's Policy on this module needs eval mode
        record = self._record
        params_after = self._lora_params()
        batch = record["batch"]
        B, G = self.B, self.G
        canonical = [n * G + g for n, g in record["order"]]  # TRL row i is canonical row canonical[i]

        def reorder(rows: Tensor) -> Tensor:
            out = torch.empty_like(rows)
            out[canonical] = rows
            return out.reshape(B, G, *rows.shape[1:])

        ref = batch.get("ref_per_token_logps")
        mask = reorder(batch["completion_mask"])
        ids = reorder(batch["completion_ids"])
        kept = [[ids[n, g][mask[n, g].bool()].tolist() for g in range(G)] for n in range(B)]
        group = trainer.optimizer.param_groups[0]
        history = trainer.state.log_history[0] if trainer.state.log_history else {}
        return TRLStep(prompt_ids=self.prompt_ids, completion_ids=kept, rewards=reorder(record["rewards_per_func"]),
                       advantages=reorder(batch["advantages"]), num_items_in_batch=int(batch["num_items_in_batch"]),
                       completion_mask=mask, ref_per_token_logps=None if ref is None else reorder(ref),
                       grad=record["grad"], clipped_grad=record["clipped_grad"],
                       params_before={n: t.clone() for n, t in self.initial_params.items()},
                       params_after=params_after, optimizer_state=trainer.optimizer.state_dict(),
                       param_names=self._optimizer_names(), lr=float(group.get("initial_lr", group["lr"])),
                       trl_order=list(record["order"]),
                       log=dict(history))

    def _optimizer_names(self) -> list[str]:
        by_id = {id(p): n for n, p in self.model.named_parameters()}
        return [by_id[id(p)] for group in self.trainer.optimizer.param_groups for p in group["params"]]


def trl_grpo_step(model_factory, tokenizer, prompts, completions, reward_funcs, *, peft_config, **config) -> TRLStep:
    """One TRL GRPO step on fixed completions: ``TRLStepHarness(...).step()``."""
    return TRLStepHarness(model_factory, tokenizer, prompts, completions, reward_funcs, peft_config=peft_config,
                          **config).step()
