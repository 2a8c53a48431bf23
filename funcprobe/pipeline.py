"""The probe pipeline: a :class:`~funcprobe.probe_config.ProbeConfig` in, the results out — no argv, no files
written, the config never changed.

    loaded = load_and_sample(config)        # checkpoint → policy, θ, AdamW state; U sampled (or read); E sampled
    measured = measure(loaded.params, loaded.batch, loaded.evaluation, policy=..., adam=..., step=config.step,
                       estimate=config.estimate, chunks=loaded.chunks)
    run = run_probe(config)                 # both, the printed report, and the results dict (``run.results``)

:func:`measure` runs one stage after another, one function each: :func:`predict` (δH₁ on U, spec §5, with the step's
Ȳ), :func:`take_step` (θ⁺ of that AdamW step, spec §4), ``sweep.realised_changes`` (ΔĤ on E, spec §6), the
precision check, :func:`in_sample_change` (the biased diagnostic on U) and :func:`sweep_changes` (ΔĤ(η) beside
(η/lr)·δH₁). A new estimator is a new stage there and a new field of :class:`Measurements`.

Under torchrun (``world`` from ``funcprobe.distributed.init_from_env``): every rank loads the checkpoint, samples its
contiguous shard of each batch's prompts (``first_prompt_index`` = the shard's start, so the batches do not depend on
the number of ranks), the shards are gathered so that every rank holds both batches, and δH₁, ΔH and the sweep are
computed sharded (issue 6). Only rank 0 prints.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .formatting import fmt
from .probe_config import (BatchConfig, ComputeConfig, EstimateConfig, OutputConfig, ProbeConfig, StepConfig,
                           derive_seed, draw_eval_prompts, select_prompts, settle_sizes)
from .sweep import realised_changes

__all__ = ["ProbeConfig", "BatchConfig", "StepConfig", "EstimateConfig", "ComputeConfig", "OutputConfig",
           "Chunking", "BatchShape", "Loaded", "Interrupted", "Measurements", "ProbeRun", "load_and_sample", "measure", "predict",
           "open_checkpoint", "sample_prompts", "reward_functions", "choose_prompts", "plan_chunks",
           "check_learning_rate", "first_order_change", "noting",
           "take_step", "in_sample_change", "sweep_changes", "run_probe", "probe_results", "config_section",
           "settle_sizes", "derive_seed", "select_prompts", "draw_eval_prompts"]

log = logging.getLogger(__name__)

Timed = Callable[[str, Callable[[], Any]], Any]


def _untimed(phase: str, fn: Callable[[], Any]) -> Any:
    return fn()


def timer(timings: dict[str, float], *, log_phases: bool = False) -> Timed:
    """``timed(phase, fn)``: fn(), its wall time recorded as ``timings[phase]`` (and the phase logged at INFO)."""
    def timed(phase, fn):
        if log_phases:
            log.info("%s …", phase)
        start = time.perf_counter()
        value = fn()
        timings[phase] = time.perf_counter() - start
        return value

    return timed


def noting(echo, fn):
    """fn(), with the library's warnings (e.g. "the jackknife needs 3 units") printed once as notes, not as Python
    warnings with source lines."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = fn()
    for message in dict.fromkeys(str(w.message) for w in caught
                                 if issubclass(w.category, (RuntimeWarning, UserWarning))
                                 and "is_gradient_checkpointing" not in str(w.message)):
        echo(f"note: {message}")
    return value


def _silent(*args, **kwargs) -> None:
    return None


# ------------------------------------------------------------------------------------------------ loading, sampling
@dataclass(frozen=True)
class Chunking:
    """How the passes are cut: sequences per forward and response rows per vocabulary chunk (None: the policy's),
    prompts per sampling call, whether δH₁ stores its unit vectors (the memory plan's when there is a budget), and
    δH₁'s own sequences per forward when it differs (None: ``seq_chunk``)."""

    seq_chunk: int | None = None
    token_chunk: int | None = None
    prompt_chunk: int = 8
    store_unit_vectors: str | bool = "auto"
    delta_h1_seq_chunk: int | None = None


@dataclass(frozen=True)
class BatchShape:
    """The batches' sizes as run: the config's, or U's read from the rollouts file (E follows it unless given)."""

    B: int
    G: int
    eval_B: int
    eval_G: int


@dataclass(frozen=True)
class Loaded:
    """What :func:`load_and_sample` settled: the checkpoint and its policy, θ and AdamW state, the prompt choice
    (``chosen``: path, pool, indices, eval_indices), the rollouts records (None: U was sampled), U (``sampled``, from
    ``source``) and E (``evaluation``), the memory plan, the chunking, the batches' shape, and every setting's source
    (the config's, with the learning rate's and the rollouts file's added)."""

    checkpoint: Any
    policy: Any
    adam: Any
    params: Mapping[str, Any]
    chosen: dict
    records: list | None
    sampled: Any
    source: str
    evaluation: Any
    memory_plan: dict | None
    chunks: Chunking
    shape: BatchShape
    sources: dict[str, str]

    #: Saves U as a rollouts file (``save_update_rollouts``) and returns the path; None when U came from --rollouts.
    keep_rollouts: Callable[[], Path] | None = None

    @property
    def batch(self):
        return self.sampled.batch

    def interrupted(self) -> "Interrupted":
        """The :class:`Interrupted` to raise on Ctrl-C once U is sampled: U saved where the failed-reward rescue
        saves it (``keep_rollouts``), and the message says how to rerun without sampling it again."""
        return Interrupted.keeping(self.keep_rollouts)


class Interrupted(KeyboardInterrupt):
    """A Ctrl-C during a run (a KeyboardInterrupt still): ``message`` says what was kept, e.g. the sampled update batch
    saved as a rollouts file (the failed-reward workflow's rescue) and the ``--rollouts`` rerun."""

    def __init__(self, message: str = ""):
        super().__init__(message)
        self.message = message

    @classmethod
    def keeping(cls, keep: Callable[[], Path] | None) -> "Interrupted":
        if keep is None:
            return cls()
        try:
            path = keep()
        except Exception as error:  # noqa: BLE001 - an interrupt must end the run; say the batch is lost
            return cls(f"the sampled update batch could not be saved ({error})")
        if path is None:
            return cls()
        return cls(f"the sampled update batch is saved in {path}: rerun with --rollouts {path} to skip sampling it "
                   "again")


def save_update_rollouts(path, sampled, chosen: dict, config: ProbeConfig, rewards, tokenizer) -> Path:
    """Write the sampled update batch U (``sampled``, the pool's ``chosen["indices"]``) as a rollouts JSONL — the
    prompts, columns and completions as TRL passes them to the reward functions, their token ids and rewards — that
    ``--rollouts`` reads back into the same batch."""
    from .rollouts_file import save_rollouts
    from .trl_rewards import TRLRewards

    prompt_ids, completion_ids = sampled.batch.token_lists()
    view = TRLRewards.for_pool(rewards, chosen["pool"], chosen["indices"], weights=config.step.objective.reward_weights,
                               chat_template=config.batch.chat_template, tokenizer=tokenizer, prompt_ids=prompt_ids)
    save_rollouts(path, view.prompts, view.completions(sampled.responses, completion_ids), completion_ids,
                  rewards=sampled.raw_rewards, prompt_ids=prompt_ids, columns=view.columns)
    return Path(path)


def batch_shape(config: ProbeConfig, records) -> tuple[BatchShape, dict[str, str]]:
    """The shape and sources: the config's; with --rollouts the file holds the update batch, so its prompts are B and
    its completions per prompt G (an explicit -B, or a -G from a flag or the trainer config, must agree); E follows
    them unless --eval-B/-G say otherwise."""
    b, sources = config.batch, dict(config.sources)
    if records is None:
        return BatchShape(b.B, b.G, b.eval_B, b.eval_G), sources
    B, G = len(records), records[0].G
    if sources.get("B") == "flag" and b.B != B:
        raise ValueError(f"{b.rollouts}: holds B={B} prompts but -B is {b.B}; leave -B out (the file decides) "
                         "or pass a file with that many lines.")
    if sources.get("G") != "funcprobe default" and G != b.G:
        raise ValueError(f"{b.rollouts}: holds G={G} completions per prompt but the step's G is {b.G} "
                         f"({sources.get('G')}); they must agree.")
    if sources.get("G") == "funcprobe default":
        sources["G"] = f"rollouts file {b.rollouts}"
    if sources.get("B") != "flag":
        sources["B"] = f"rollouts file {b.rollouts}"
    eval_B = b.eval_B if sources.get("eval_B") == "flag" else B
    eval_G = b.eval_G if sources.get("eval_G") == "flag" else G
    return BatchShape(B, G, eval_B, eval_G), sources


def choose_prompts(path, config: ProbeConfig, shape: BatchShape) -> dict:
    """Read the prompt pool (plain or conversational JSONL with columns); pick the update batch's B prompts
    (``select_prompts``, seeded by --seed; none with --rollouts) and the evaluation batch's prompts
    (``draw_eval_prompts``, seeded by --eval-seed)."""
    from .prompts import load_prompt_pool

    b = config.batch
    pool = load_prompt_pool(path)
    indices = []
    if b.rollouts is None:
        try:
            indices = select_prompts(len(pool), shape.B, seed=b.seed, replace=b.replace)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
    eval_indices = draw_eval_prompts(len(pool), shape.eval_B, seed=b.eval_seed)
    return {"path": path, "pool": pool, "indices": indices, "eval_indices": eval_indices}


def reward_functions(config: ProbeConfig) -> list:
    """The --reward functions (TRL's signature), loaded before the model so that a bad spec fails fast."""
    from .trl_rewards import load_reward_function

    functions = [load_reward_function(spec) for spec in (config.batch.rewards or ["answer"])]
    weights = config.step.objective.reward_weights
    if weights is not None and len(weights) != len(functions):
        raise ValueError(f"{len(weights)} reward weights (--reward-weights or the trainer config's reward_weights) for "
                         f"{len(functions)} reward functions (--reward); pass one weight per function.")
    return functions


def check_learning_rate(adam, config: ProbeConfig, where) -> None:
    """Before any sampling: a zero next-step learning rate (the end of a decaying schedule) makes the step zero."""
    rates = sorted({h.lr for h in adam.hyper.values()})
    lr = config.step.lr
    if lr is None and all(rate == 0 for rate in rates):
        raise ValueError(f"the learning rate of the next step stored in {where} is 0 (the end of a decaying "
                         "schedule?): that step is zero, so δH₁ = ΔH = 0 and there is nothing to measure. Pass --lr to "
                         "probe the step at another learning rate, e.g. --lr 1e-5.")
    if config.estimate.etas is not None and lr is None and len(rates) > 1:
        raise ValueError(f"the optimizer's parameter groups have different learning rates {rates}; the sweep scales "
                         "one learning rate. Pass --lr to use one for every group, or drop --eta-sweep.")


def _chat_template_kwargs(config: ProbeConfig):
    settings = config.step.trainer_settings
    return settings.chat_template_kwargs if settings is not None else None


def _stop_tokens(config: ProbeConfig) -> list[int] | None:
    return None if config.batch.stop_token is None else list(config.batch.stop_token)


def sample_prompts(world, policy, params, pool, indices, *, seed, G, config: ProbeConfig, tokenizer, rewards,
                   trainer_state, prompt_chunk, progress, rescue):
    """Sample the pool's prompts ``indices`` (this rank's contiguous shard, gathered on every rank), rendered as the
    trainer renders them (--chat-template) and scored by the --reward functions with TRL's call."""
    from .objective import ZeroVarianceWarning
    from .prompts import render_prompts
    from .sampling import gather_sampled, rescore, sample_batch
    from .trl_rewards import RewardFunctionError, TRLRewards

    b, objective = config.batch, config.step.objective
    shard = world.shard(len(indices))
    mine = None
    if len(shard):
        rows = indices[shard.start:shard.stop]
        chosen = pool.select(rows)
        ids = render_prompts(chosen, tokenizer, chat_template=b.chat_template,
                             chat_template_kwargs=_chat_template_kwargs(config))
        reward_fn = TRLRewards.for_pool(rewards, pool, rows, weights=objective.reward_weights,
                                        chat_template=b.chat_template, tokenizer=tokenizer, prompt_ids=ids,
                                        trainer_state=trainer_state)
        try:
            with warnings.catch_warnings():  # equal-reward groups: reported by the caller, once, for the whole batch
                warnings.simplefilter("ignore", ZeroVarianceWarning)
                mine = sample_batch(policy, params, ids, G=G, reward_fn=reward_fn,
                                    scale_rewards=objective.scale_rewards, reward_weights=objective.reward_weights,
                                    max_new_tokens=b.max_new_tokens, seed=seed, tokenizer=tokenizer, top_p=b.top_p,
                                    stop_token_ids=_stop_tokens(config), first_prompt_index=shard.start,
                                    prompt_index=rows, prompt_chunk=prompt_chunk, progress=progress)
        except RewardFunctionError as error:
            error.save_rollouts(rescue)
            raise error.with_note(f"The sampled prompts and completions are saved in {rescue}: after fixing the "
                                  f"function, rerun with --rollouts {rescue} to score them without sampling "
                                  "again.") from None
    # Advantages over the gathered batch (batch-scaled ones need every shard's rewards); equal-reward groups are
    # reported by the caller, once.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ZeroVarianceWarning)
        return rescore(gather_sampled(world, mine), scale_rewards=objective.scale_rewards,
                       reward_weights=objective.reward_weights, warn=False)


def rollouts_sample(records, config: ProbeConfig, tokenizer, policy, rewards):
    """The update batch from the trainer's logged rollouts (--rollouts): the file's rewards, or the --reward
    functions' when given."""
    from .objective import ZeroVarianceWarning
    from .rollouts import rollout_rewards, rollouts_batch
    from .sampling import SampledBatch, collect_stop_ids
    from .trl_rewards import RewardFunctionError

    b, objective = config.batch, config.step.objective
    reward_fn = rollout_rewards(records, rewards, objective.reward_weights, chat_template=b.chat_template,
                                tokenizer=tokenizer) if b.rewards else None
    try:
        with warnings.catch_warnings():  # equal-reward groups: reported by the caller from advantage_info
            warnings.simplefilter("ignore", ZeroVarianceWarning)
            batch, info = rollouts_batch(records, tokenizer, max_new_tokens=b.max_new_tokens,
                                         chat_template=b.chat_template, scale_rewards=objective.scale_rewards,
                                         reward_weights=objective.reward_weights, temperature=policy.temperature,
                                         stop_token_ids=collect_stop_ids(tokenizer, policy, _stop_tokens(config)),
                                         reward_fn=reward_fn, chat_template_kwargs=_chat_template_kwargs(config),
                                         vocab_size=policy.vocab_size)
    except RewardFunctionError as error:
        raise error.with_note(f"{b.rollouts} is unchanged: after fixing the function, rerun with the same "
                              "--rollouts.") from None
    return SampledBatch(batch=batch, prompts=info["prompts"], responses=info["responses"],
                        eos_count=info["eos_count"], timings={"notes": info["notes"]},
                        advantage_info=info["advantage_info"], raw_rewards=info["raw_rewards"])


def open_checkpoint(config: ProbeConfig, *, progress: bool | None = None, timed: Timed = _untimed,
                    policy_extra: dict | None = None, require_optimizer: bool = True):
    """``checkpoints.load_checkpoint`` of ``config.checkpoint`` (with its base and optimizer) as the config asks: the
    compute dtype and device, τ, the chunk sizes and the log-softmax dtype; transformers' own bars only with
    ``progress``. ``require_optimizer=False``: a checkpoint without optimizer state loads too (``adam`` None)."""
    import torch

    from .checkpoints import load_checkpoint
    from .progress import library_bars

    c = config.compute
    policy_options = {name: value for name, value in (("seq_chunk", c.seq_chunk), ("token_chunk", c.token_chunk),
                                                      ("temperature", config.batch.temperature)) if value is not None}
    if c.logsoftmax_dtype is not None:
        policy_options["logsoftmax_dtype"] = getattr(torch, c.logsoftmax_dtype)
    with library_bars(enabled=sys.stderr.isatty() if progress is None else progress):
        return timed("load", lambda: load_checkpoint(config.checkpoint, base=config.base, optimizer=config.optimizer,
                                                     dtype=getattr(torch, c.dtype), **(policy_extra or {}),
                                                     device=c.device, require_optimizer=require_optimizer,
                                                     **policy_options))


def _describe_checkpoint(checkpoint, config: ProbeConfig, echo) -> None:
    step = config.step
    echo(f"checkpoint: {checkpoint.adapter_dir} (layout {checkpoint.layout}, step {checkpoint.step}, base "
         f"{checkpoint.base})")
    echo(f"policy: {checkpoint.policy}")
    echo(f"the step: AdamW at lr {fmt(step.lr, '.4g') if step.lr is not None else 'from the optimizer state'}; "
         f"{step.objective.describe()}")
    unread = Path(checkpoint.adapter_dir) / "training_args.bin"
    if step.trainer_settings is None and unread.is_file():
        echo(f"note: {unread} (the run's settings) was not read: it is a pickle, and loading a pickle runs code from "
             "the file. The step probed is funcprobe's default unless flags say otherwise; pass --trust-training-args "
             "to read it, or --trainer-config FILE with the run's GRPOConfig fields.")


def plan_chunks(config: ProbeConfig, policy, tokenizer, chosen: dict, shape: BatchShape,
                echo) -> tuple[Chunking, dict | None]:
    """The chunking: the flags', or with --memory-budget the memory plan's (explicit chunk flags win)."""
    c = config.compute
    if c.memory_budget_bytes is None:
        return Chunking(seq_chunk=c.seq_chunk, token_chunk=c.token_chunk), None
    from .memory import plan_for_policy
    from .prompts import render_prompts

    rendered = render_prompts(chosen["pool"].select(chosen["indices"] + chosen["eval_indices"]), tokenizer,
                              chat_template=config.batch.chat_template)
    prompt_len = max(len(ids) for ids in rendered)
    plan = plan_for_policy(policy, (shape.B, shape.G, max(prompt_len, 1), config.batch.max_new_tokens),
                           budget_bytes=c.memory_budget_bytes, units=config.step.units)
    chunks = Chunking(seq_chunk=plan.seq_chunk if c.seq_chunk is None else c.seq_chunk,
                      token_chunk=plan.token_chunk if c.token_chunk is None else c.token_chunk,
                      prompt_chunk=plan.prompt_chunk, store_unit_vectors=plan.store_unit_vectors)
    echo(f"memory plan: seq_chunk={chunks.seq_chunk}, token_chunk={chunks.token_chunk}, prompt_chunk="
         f"{chunks.prompt_chunk}, unit vectors {'stored' if chunks.store_unit_vectors else 'recomputed'}; predicted "
         f"peak {plan.peak_bytes / 2 ** 30:.2f} GiB ({plan.peak_phase}) of {plan.budget_bytes / 2 ** 30:.2f} GiB")
    return chunks, plan.to_dict()


def _pool(config: ProbeConfig, checkpoint, chosen: dict | None, shape: BatchShape) -> dict:
    if chosen is None:
        if checkpoint.prompts_path is None:
            raise ValueError(f"no prompts: pass --prompts FILE.jsonl (there is no prompts.jsonl in "
                             f"{checkpoint.adapter_dir} or the folder above).")
        chosen = choose_prompts(checkpoint.prompts_path, config, shape)
    if checkpoint.tokenizer is None:
        raise ValueError(f"the checkpoint {checkpoint.adapter_dir} has no tokenizer (tokenizer.json / "
                         "tokenizer_config.json in the checkpoint or its base); save the tokenizer with the "
                         "checkpoint.")
    return chosen


def load_and_sample(config: ProbeConfig, *, progress: bool | None = None, echo=print, world=None,
                    timed: Timed = _untimed, policy_extra: dict | None = None) -> Loaded:
    """Shared by ``probe`` and ``attribute``: load the checkpoint, choose the prompts, plan memory, sample (or read)
    the update batch and sample the evaluation batch. ``policy_extra``: more ``load_checkpoint`` options (e.g. the
    attention implementation)."""
    from .distributed import SINGLE
    from .trl_rewards import trainer_state_from_checkpoint

    world = SINGLE if world is None else world
    b = config.batch
    # The prompts, the rollouts and the reward functions first when given, so that a bad file, -B or reward spec
    # fails before the model is loaded.
    records = None
    if b.rollouts is not None:
        from .rollouts import load_rollouts

        records = load_rollouts(b.rollouts)
    shape, sources = batch_shape(config, records)
    chosen = choose_prompts(b.prompts, config, shape) if b.prompts is not None else None
    rewards = reward_functions(config)
    checkpoint = open_checkpoint(config, progress=progress, timed=timed, policy_extra=policy_extra)
    policy, adam = checkpoint.policy, checkpoint.adam
    params = policy.params
    check_learning_rate(adam, config, checkpoint.optimizer_path)
    sources["lr"] = "flag" if config.step.lr is not None else f"optimizer state ({checkpoint.optimizer_path})"
    _describe_checkpoint(checkpoint, config, echo)
    chosen = _pool(config, checkpoint, chosen, shape)
    if records is None:  # the columns the reward functions need, on every prompt of U and E: before any sampling
        from .trl_rewards import TRLRewards

        rows = list(dict.fromkeys([*chosen["indices"], *chosen["eval_indices"]]))
        TRLRewards.for_pool(rewards, chosen["pool"], rows,
                            weights=config.step.objective.reward_weights, chat_template=b.chat_template)
    chunks, memory_plan = plan_chunks(config, policy, checkpoint.tokenizer, chosen, shape, echo)

    out = config.output.out
    rescue = Path(out).with_suffix(".failed-rollouts.jsonl") if out else Path("funcprobe-failed-rollouts.jsonl")
    sampling = dict(config=config, tokenizer=checkpoint.tokenizer, rewards=rewards, prompt_chunk=chunks.prompt_chunk,
                    trainer_state=trainer_state_from_checkpoint(checkpoint.adapter_dir), progress=progress,
                    rescue=rescue)
    pool = chosen["pool"]
    if records is None:
        sampled = timed("sample", lambda: sample_prompts(world, policy, params, pool, chosen["indices"], seed=b.seed,
                                                         G=shape.G, **sampling))
        source = f"sampled from {chosen['path']}"
    else:
        sampled = timed("rollouts", lambda: rollouts_sample(records, config, checkpoint.tokenizer, policy, rewards))
        source = f"logged rollouts {b.rollouts}"
    batch = sampled.batch
    if sampled.advantage_info.nothing_scored:
        raise ValueError(f"the update batch ({source}): {sampled.advantage_info.message()} There is no step to "
                         "probe.")
    echo(f"update batch: B={batch.B} prompts × G={batch.G} responses, {source}; mean reward "
         f"{fmt(float(batch.rewards.mean()), '.4g')}; {sampled.eos_count}/{batch.num_sequences} ended with a stop "
         "token")
    note = sampled.advantage_info.message(beta=config.step.objective.beta)
    if note:
        echo(f"note: {note}")
    keep = None
    if records is None and world.is_main:  # a Ctrl-C from here on keeps U, as a failed reward function keeps it
        def keep():
            return save_update_rollouts(rescue, sampled, chosen, config, rewards, checkpoint.tokenizer)
    try:
        evaluation = timed("sample_eval", lambda: sample_prompts(world, policy, params, pool, chosen["eval_indices"],
                                                                 seed=b.eval_seed, G=shape.eval_G, **sampling))
    except KeyboardInterrupt:
        raise Interrupted.keeping(keep) from None
    echo(f"evaluation batch: B={evaluation.batch.B} prompts × G={evaluation.batch.G} responses, drawn independently "
         f"(seed {b.eval_seed})")
    return Loaded(checkpoint=checkpoint, policy=policy, adam=adam, params=params, chosen=chosen, records=records,
                  sampled=sampled, source=source, evaluation=evaluation, memory_plan=memory_plan, chunks=chunks,
                  shape=shape, sources=sources, keep_rollouts=keep)


# ------------------------------------------------------------------------------------------------------ the stages
@dataclass(frozen=True)
class Measurements:
    """The stages' results: δH₁ (``prediction``, a ``DeltaH1Result`` with the step), the realised change on E by each
    method run ({"crn": …, "snis": …}), the precision check, the in-sample diagnostic and the sweep (None when not
    asked for)."""

    prediction: Any
    realised: dict[str, Any]
    precision: dict
    in_sample: Any = None
    sweep: Any = None
    heldout: Any = None
    paired: dict[str, Any] = field(default_factory=dict)

    def report(self, *, details: bool = False) -> str:
        """The printed tables (``report.format_report``)."""
        from .report import format_report

        return format_report(self.prediction, self.realised, self.sweep, in_sample=self.in_sample,
                             heldout=self.heldout, paired=self.paired, details=details)


def _pass_options(chunks: Chunking, progress, world) -> dict[str, Any]:
    return dict(seq_chunk=chunks.seq_chunk, token_chunk=chunks.token_chunk, progress=progress, world=world)


def predict(params, batch, *, policy, adam, step: StepConfig = StepConfig(), chunks: Chunking = Chunking(),
            progress: bool | None = False, world=None, echo=print):
    """δH₁ of the AdamW step on the update batch (spec §5), with the step's Ȳ (``.step``); the library's warnings
    printed as notes."""
    from .delta_h1 import delta_h1

    seq_chunk = chunks.seq_chunk if chunks.delta_h1_seq_chunk is None else chunks.delta_h1_seq_chunk
    return noting(echo, lambda: delta_h1(
        params, batch, policy=policy, adam=adam, units=step.units, store_unit_vectors=chunks.store_unit_vectors,
        world=world, lr=step.lr, objective=step.objective, seq_chunk=seq_chunk, token_chunk=chunks.token_chunk,
        progress=progress))


def first_order_change(params, evaluation, prediction, *, policy, estimate: EstimateConfig = EstimateConfig(),
                       chunks: Chunking = Chunking(), progress=False, world=None):
    """δĤ₁(E): the first-order change of THIS step (δH₁'s Ȳ, P and state term) with ∇H from the evaluation batch
    (spec §9, ``heldout.delta_h1_heldout``) — the headline, unbiased at any optimizer age."""
    from .heldout import delta_h1_heldout

    return delta_h1_heldout(params, prediction.step, evaluation, policy=policy, integrand=estimate.integrand,
                            **_pass_options(chunks, progress, world))


def paired_changes(realised: dict, heldout) -> dict:
    """{method: ΔĤ − δĤ₁(E) with its paired SE and verdict} for each per-sequence realised estimate (spec §9)."""
    from .heldout import paired_difference

    return {method: paired_difference(result, heldout) for method, result in realised.items()
            if not getattr(result, "per_token", False)}


def take_step(params, adam, prediction, step: StepConfig = StepConfig()):
    """θ⁺ of the AdamW step (spec §4) from δH₁'s own Ȳ: no second gradient pass over the update batch."""
    from .update import apply_step

    new_params, _ = apply_step(params, adam, prediction.step, lr=step.lr, objective=step.objective)
    return new_params


def check_precision_of(prediction, policy, realised: dict, echo) -> dict:
    """The dtype's systematic error against the SEs: a note when rounding, not sampling, could dominate (bf16 on big
    batches; README "Precision: when to pay for float32 on a GPU")."""
    from .precision import check_precision

    primary = realised.get("snis") or realised.get("crn")
    return noting(echo, lambda: check_precision(prediction, policy, primary))


def in_sample_change(params, new_params, batch, *, policy, chunks: Chunking = Chunking(), progress=False,
                     world=None):
    """SNIS on the update batch itself: the biased diagnostic (it carries the same-sample term δH₁ removes)."""
    from .realised import snis_delta_h

    return snis_delta_h(params, new_params, policy=policy, batch=batch, in_sample=True,
                        **_pass_options(chunks, progress, world))


def sweep_changes(params, evaluation, prediction, *, policy, estimate: EstimateConfig,
                  chunks: Chunking = Chunking(), progress=False, world=None, heldout=None):
    """ΔĤ(η) on E at ``estimate.etas`` beside (η/lr)·δĤ₁(E) (and (η/lr)·δH₁), paired per η, by the same method(s)
    (``sweep.lr_sweep``)."""
    from .sweep import lr_sweep

    return lr_sweep(params, evaluation, policy=policy, step=prediction.step, etas=list(estimate.etas),
                    prediction=prediction, heldout=heldout, method=estimate.realised,
                    prompt_chunk=chunks.prompt_chunk, **_pass_options(chunks, progress, world))


def measure(params, batch, evaluation, *, policy, adam, step: StepConfig = StepConfig(),
            estimate: EstimateConfig = EstimateConfig(), chunks: Chunking = Chunking(),
            progress: bool | None = False, world=None, echo=print, timed: Timed = _untimed) -> Measurements:
    """δH₁ on the update batch U, the step, and what ``estimate`` asks for on the evaluation sample E (a
    ``SampledBatch`` drawn independently of U, spec §6) — each stage one function, timed as its phase."""
    prediction = timed("delta_h1", lambda: predict(params, batch, policy=policy, adam=adam, step=step, chunks=chunks,
                                                   progress=progress, world=world, echo=echo))
    new_params = timed("update", lambda: take_step(params, adam, prediction, step))
    heldout = timed("delta_h1_heldout", lambda: first_order_change(
        params, evaluation, prediction, policy=policy, estimate=estimate, chunks=chunks, progress=progress,
        world=world))
    realised = realised_changes(params, new_params, evaluation, method=estimate.realised, policy=policy,
                                crn={"prompt_chunk": chunks.prompt_chunk}, timed=timed,
                                **_pass_options(chunks, progress, world))
    paired = paired_changes(realised, heldout)
    precision = check_precision_of(prediction, policy, realised, echo)
    in_sample = None
    if estimate.in_sample:
        in_sample = timed("in_sample", lambda: in_sample_change(params, new_params, batch, policy=policy,
                                                                chunks=chunks, progress=progress, world=world))
    sweep = None
    if estimate.etas is not None:
        sweep = timed("lr_sweep", lambda: sweep_changes(params, evaluation, prediction, policy=policy,
                                                        estimate=estimate, chunks=chunks, progress=progress,
                                                        world=world, heldout=heldout))
    return Measurements(prediction=prediction, realised=realised, precision=precision, in_sample=in_sample,
                        sweep=sweep, heldout=heldout, paired=paired)


# ------------------------------------------------------------------------------------------------------ the run
@dataclass(frozen=True)
class ProbeRun:
    """:func:`run_probe`'s result: ``results`` (the dict the command writes as JSON), ``loaded`` and ``measurements``
    (the objects, e.g. ``measurements.sweep`` for ``report.plot_lr_sweep``)."""

    results: dict[str, Any]
    loaded: Loaded
    measurements: Measurements


def run_probe(config: ProbeConfig, *, progress: bool | None = None, echo=print, world=None) -> ProbeRun:
    """The ``probe`` command's work: load, sample U and E, δH₁ on U, the step, ΔH on E, the sweep on E; print the
    report; return the results (writing them is the caller's: ``report.write_probe_outputs``).

    Under torchrun every rank runs it (sharded, see the module docstring); only rank 0 prints.
    """
    from .distributed import SINGLE
    from .report import reset_peak_memory

    world = SINGLE if world is None else world
    if not world.is_main:
        echo, progress = _silent, False
    started = time.perf_counter()
    timings: dict[str, float] = {}
    timed = timer(timings, log_phases=True)
    reset_peak_memory(config.compute.device)
    loaded = load_and_sample(config, progress=progress, echo=echo, world=world, timed=timed)
    try:
        measured = measure(loaded.params, loaded.batch, loaded.evaluation, policy=loaded.policy, adam=loaded.adam,
                           step=config.step, estimate=config.estimate, chunks=loaded.chunks, progress=progress,
                           world=world, echo=echo, timed=timed)
    except KeyboardInterrupt:
        raise loaded.interrupted() from None
    echo("\n" + measured.report(details=config.output.verbose))
    timings["total"] = time.perf_counter() - started
    return ProbeRun(results=probe_results(config, loaded, measured, timings=timings, world=world), loaded=loaded,
                    measurements=measured)


# ------------------------------------------------------------------------------------------------------ results
def config_section(config: ProbeConfig, loaded: Loaded) -> dict[str, Any]:
    """The results' ``config``: the options as given (``config.record``, else :meth:`ProbeConfig.to_dict`), with the
    values resolved from them and by loading."""
    given = dict(config.record) if config.record is not None else config.to_dict()
    b = config.batch
    resolved = {"B": loaded.shape.B, "G": loaded.shape.G, "max_new_tokens": b.max_new_tokens,
                "temperature": b.temperature, "eval_B": loaded.shape.eval_B, "eval_G": loaded.shape.eval_G,
                "eval_seed": b.eval_seed, "device": config.compute.device,
                "trainer_settings": config.step.trainer_settings, "sources": loaded.sources}
    return {**given, **resolved}


def _batch_section(sampled, chosen: dict, indices: list[int] | None, seed: int | None, *, source: str) -> dict:
    batch = sampled.batch
    pool = chosen["pool"]
    prompt_ids, completion_ids = batch.token_lists()
    return {"source": source, "prompts_file": chosen["path"], "pool_size": len(pool), "prompt_indices": indices,
            "seed": seed, "prompts": sampled.prompts, "prompt_ids": prompt_ids, "completion_ids": completion_ids,
            "columns": None if indices is None else pool.select(indices).columns,
            "responses": sampled.responses, "rewards": batch.rewards, "raw_rewards": sampled.raw_rewards,
            "advantages": batch.advantages, "mean_reward": float(batch.rewards.mean()),
            "eos_count": sampled.eos_count, "truncated_count": sampled.truncated_count,
            "zero_variance_groups": list(sampled.advantage_info.zero_variance_groups),
            "unscorable": sampled.advantage_info.unscorable,
            "stop_token_ids": None if sampled.spec is None else list(sampled.spec.stop_token_ids),
            "timings": sampled.timings}


def _checkpoint_section(checkpoint) -> dict[str, Any]:
    return {"path": checkpoint.path, "layout": checkpoint.layout, "step": checkpoint.step, "base": checkpoint.base,
            "adapter_dir": checkpoint.adapter_dir, "optimizer_path": checkpoint.optimizer_path,
            "prompts_path": checkpoint.prompts_path}


def _policy_section(policy, adam) -> dict[str, Any]:
    return {"num_params": policy.num_params, "dtype": policy.dtype, "device": policy.device,
            "temperature": policy.temperature, "logsoftmax_dtype": policy.logsoftmax_dtype,
            "adam_steps": sorted(set(adam.step.values()))}


def _settings_section(config: ProbeConfig, loaded: Loaded) -> dict[str, Any]:
    settings = config.step.trainer_settings
    return {"sources": loaded.sources, "G": loaded.shape.G, "B": loaded.shape.B,
            "max_new_tokens": config.batch.max_new_tokens, "temperature": loaded.policy.temperature,
            "chat_template": config.batch.chat_template, "rewards": list(config.batch.rewards or ["answer"]),
            "trainer_config": None if settings is None else settings.to_dict()}


def probe_results(config: ProbeConfig, loaded: Loaded, measured: Measurements, *, timings: dict[str, float],
                  world) -> dict[str, Any]:
    """The results dict of a probe run (the command's JSON)."""
    from .distributed import COMM
    from .report import peak_memory, summary, versions

    b, m, chosen = config.batch, measured, loaded.chosen
    section = config_section(config, loaded)
    section.pop("etas", None)
    section.update(etas=None if config.estimate.etas is None else list(config.estimate.etas),
                   units_parsed=config.step.units)
    sampled_indices = None if loaded.records is not None else chosen["indices"]
    return {
        "command": "probe", "config": section, "versions": versions(), "seed": b.seed, "eval_seed": b.eval_seed,
        "checkpoint": _checkpoint_section(loaded.checkpoint),
        "policy": _policy_section(loaded.policy, loaded.adam),
        "batch": _batch_section(loaded.sampled, chosen, sampled_indices,
                                None if loaded.records is not None else b.seed, source=loaded.source),
        "eval_batch": _batch_section(loaded.evaluation, chosen, chosen["eval_indices"], b.eval_seed,
                                     source=f"sampled from {chosen['path']}"),
        "settings": _settings_section(config, loaded),
        "summary": summary(m.prediction, m.realised, m.in_sample, m.heldout, m.paired),
        "delta_h1_heldout": None if m.heldout is None else m.heldout.to_dict(),
        "paired": {method: pair.to_dict() for method, pair in m.paired.items()},
        "delta_h1": {**m.prediction.to_dict(), "what": (
            "the seed's cross-prompt U-statistic on the update batch: the first-order change expected over "
            "update batches, unbiased only once the optimizer state no longer depends on the batch (spec §5, §9)")},
        "step": m.prediction.step.to_dict(),
        "objective": config.step.objective.to_dict(),
        "realised": {method: result.to_dict() for method, result in m.realised.items()},
        "precision": m.precision,
        "in_sample": None if m.in_sample is None else m.in_sample.to_dict(),
        "lr_sweep": None if m.sweep is None else m.sweep.to_dict(),
        "timings": timings,
        "peak_memory": peak_memory(config.compute.device),
        "memory_plan": loaded.memory_plan,
        "distributed": {"world_size": world.size, "backend": world.backend, "rank": world.rank,
                        "per_rank_note": "timings, peak memory and δH₁'s pass counts are rank 0's own",
                        "comm_rank0": COMM.snapshot()},
    }

