"""The entropy along a training run: every ``checkpoint-N/`` of a run folder measured on one evaluation set, the
first-order prediction of each checkpoint's next step, and the change between consecutive checkpoints (issue 18).

    run = trajectory("runs/grpo", reward=["examples/rewards.py:exact_answer"],
                     trainer_config="runs/grpo/trainer_config.json", B=8, G=8)
    run.to_dict()                                 # standard JSON: no NaN (null, with the reason beside it)
    plot_trajectory(run, "trajectory.png")        # funcprobe.trajectory_plot, re-exported here

**One evaluation set for the whole run** (spec §6). E is B_E prompts drawn once from the pool
(``probe_config.draw_eval_prompts``, seeded by ``eval_seed``) × G_E responses, sampled at each checkpoint's θ_k from
the same per-prompt uniform streams (``sampling.prompt_generator(eval_seed, n)``). The draws at θ_k and θ_{k+1} are
therefore common random numbers: a response that the step does not change is drawn again token for token, and the
change between checkpoints is a paired, per-prompt difference (``realised.crn_from_draws``). Identical checkpoints
give exactly ΔĤ = 0 with SE 0.

Per checkpoint k (R_{n,g} = Σ_j m_j h_j the Rao-Blackwell integrand of spec §6 — the full next-token entropies h at
τ along the sampled response — and T_{n,g} the response length):

    Ĥ(θ_k)      = (1/B_E) Σ_n H_n,   H_n = (1/G_E) Σ_g R_{n,g},   SE = sd_n(H_n)/√B_E              nats per response
    Ĥ_tok(θ_k)  = Σ_{n,g} R / Σ_{n,g} T    (TRL's ``entropy`` definition: the masked mean over completion tokens of
                  the next-token entropy of logits/τ), SE = sd_n(p_n)/√B_E by the delta method over prompts, with the
                  pseudo-values p_n = r + (a_n − r b_n)/b̄ (a_n = Σ_g R, b_n = Σ_g T, r = Ĥ_tok; mean_n p_n = r)
                                                                                                   nats per token
    δĤ₁(E)      = spec §9 along funcprobe's predicted AdamW step from the checkpoint's optimizer state and an update
                  batch U_k sampled at θ_k — the headline ``funcprobe probe`` reports for that checkpoint
                  (``pipeline.predict``, then the held-out pass); null with the reason where the checkpoint has no
                  usable optimizer state or the trainer's settings cannot be reproduced          nats per response

Between consecutive checkpoints k → k+1 (``steps`` = N_{k+1} − N_k optimizer steps), all on the evaluation prompts:

    ΔĤ          = (1/B_E) Σ_n [H_n(θ_{k+1}) − H_n(θ_k)],   SE = sd_n(·)/√B_E         (CRN, spec §6; per response)
    ΔĤ_tok      = Ĥ_tok(θ_{k+1}) − Ĥ_tok(θ_k),   SE = sd_n(p_n(θ_{k+1}) − p_n(θ_k))/√B_E              (per token)
    first order = ∇Ĥ(θ_k)·(θ_{k+1} − θ_k), spec §9 on E_k (drawn at θ_k) along the step really taken
    paired      = ΔĤ − first order, SE = sd_n(ΔĤ_n − D_n)/√B_E (``heldout.paired_difference``): how far the run's
                  step is from its first-order regime
    importance  = ΔĤ by importance sampling on E_k (log w = S_{θ_{k+1}} − S_{θ_k}, spec §6), a check beside the CRN
                  value; its value is null (with the reason) where the weights' ESS / k̂ make it unreliable

Beside them, what the trainer logged (the last checkpoint's ``trainer_state.json`` holds the whole ``log_history``):
TRL's ``entropy`` and funcprobe's TRL callback's ``entropy_change/*`` values. **Units and parameters differ**: TRL's
row s is the per-token entropy of step s's own rollouts, drawn at θ_{s−1} (before step s), so the TRL number set beside
checkpoint N is row N + 1's (``trl_entropy``: the same θ_N, other prompts and draws); row N itself is kept as
``trl_logged``. The callback's row s holds the change of step s − 1 on step s's rollouts (its ``first_step`` /
``last_step``), so it is listed under the change that contains those steps (``funcprobe.trainer_log``).

Pure over its inputs: the run folder is only read; one policy is loaded (the latest checkpoint's adapter on its base)
and every checkpoint's θ is read onto it (``checkpoints.adapter_params``). Memory holds two checkpoints' θ at a time.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoints import RunCheckpoint, checkpoint_dirs, read_run_checkpoint
from .distributed import SINGLE
from .formatting import fmt
from .heldout import HeldoutResult, PairedDifference, heldout_pass, heldout_result, paired_difference, step_directions
from .pipeline import (BatchShape, Chunking, check_learning_rate, choose_prompts, open_checkpoint, plan_chunks,
                       predict, reward_functions, sample_prompts, timer)
from .probe_config import BatchConfig, ComputeConfig, EstimateConfig, ProbeConfig, StepConfig, derive_seed, settle_sizes
from .progress import progress_bar
from .realised import CRNResult, SNISResult, crn_from_draws, snis_delta_h, values_before
from .report import to_jsonable, versions
from .trainer_config import read_trainer_config, trainer_settings
from .trainer_log import CALLBACK_PREFIX, TrainerLog
from .trajectory_plot import plot_trajectory

__all__ = ["trajectory", "trajectory_config", "Trajectory", "CheckpointEntropy", "EntropyChange", "run_checkpoints",
           "run_trainer_config", "per_token_entropy", "plot_trajectory", "CALLBACK_PREFIX"]

#: The file a run folder's trainer config is read from when none is given (``examples/trl_callback.py`` and
#: ``examples/train_trl_checkpoint.py`` write the GRPOConfig's fields there).
TRAINER_CONFIG_FILE = "trainer_config.json"

#: What each unit of the results means, written into the JSON so that a reader of the file needs no other page.
UNITS = {
    "entropy": "nats per response: (1/B_E) Σ_n (1/G_E) Σ_g Σ_k h_k, the Rao-Blackwell integrand (full next-token "
               "entropies h at τ along each sampled response), on the evaluation set",
    "entropy_per_token": "nats per token: Σ h / Σ T over all the evaluation set's response tokens (TRL's `entropy` "
                         "definition), SE by the delta method over prompts",
    "trl_entropy": "TRL's logged `entropy` (nats per token) of the row whose rollouts were drawn at this "
                   "checkpoint's θ_N (row N + 1): the trainer's own prompts and draws, not the evaluation set",
    "changes": "nats per response (per token where named), paired per evaluation prompt between the two "
               "checkpoints' draws, which share their random numbers",
}


# ------------------------------------------------------------------------------------------------------ results
@dataclass(frozen=True)
class CheckpointEntropy:
    """One checkpoint on the evaluation set (module docstring for the formulas).

    step: N of ``checkpoint-N``; path; global_step: its trainer state's (None without one). entropy, entropy_se,
    entropy_per_prompt [B_E]: Ĥ (nats per response). entropy_per_token, entropy_per_token_se,
    entropy_per_token_pseudo [B_E]: Ĥ_tok (nats per token) and its delta-method pseudo-values. tokens: Σ T;
    mean_length: Σ T / (B_E G_E). eval_mean_reward, eval_eos_count: of the evaluation draws. eval_prompt_indices,
    eval_seed: the draw (identical at every checkpoint). prediction: δĤ₁(E) of the predicted next step
    (``HeldoutResult``) or None, with ``prediction_reason``; lr: the next step's learning rate (the optimizer
    state's, or --lr); adam_step: the optimizer state's t; update_batch: the update batch U's summary (or None).
    trl_entropy: TRL's logged entropy at this θ (row N + 1) or None with ``trl_entropy_reason``; trl_logged: row N's
    ``entropy`` and ``entropy_change/*`` values as logged. timings: seconds per phase.
    """

    step: int
    path: str
    global_step: int | None
    entropy: float
    entropy_se: float
    entropy_per_prompt: tuple[float, ...]
    entropy_per_token: float
    entropy_per_token_se: float
    entropy_per_token_pseudo: tuple[float, ...]
    tokens: int
    mean_length: float
    eval_mean_reward: float
    eval_eos_count: int
    eval_prompt_indices: tuple[int, ...]
    eval_seed: int
    prediction: HeldoutResult | None
    prediction_reason: str | None
    lr: float | None
    adam_step: int | None
    update_batch: dict | None
    trl_entropy: float | None
    trl_entropy_reason: str | None
    trl_logged: dict
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["prediction"] = None if self.prediction is None else self.prediction.to_dict()
        return to_jsonable(data)


@dataclass(frozen=True)
class EntropyChange:
    """The change from checkpoint ``from_step`` to ``to_step`` (``steps`` optimizer steps), on the evaluation set.

    realised: ΔĤ by common random numbers between the two checkpoints' draws (``CRNResult``: per-prompt values,
    changed draws, reliability verdict). realised_per_token, realised_per_token_se, realised_per_token_per_prompt:
    ΔĤ_tok and its paired pseudo-value differences. first_order: ∇Ĥ(θ_from)·(θ_to − θ_from) on E drawn at θ_from
    (``HeldoutResult``); paired: realised − first_order (``PairedDifference``). importance: the importance-sampling
    check (``SNISResult``); importance_reason: why its value is withheld (None: it is reliable). step_norm: ‖θ_to −
    θ_from‖₂. trl_callback: the callback's rows that measured steps inside this change.
    """

    from_step: int
    to_step: int
    steps: int
    realised: CRNResult
    realised_per_token: float
    realised_per_token_se: float
    realised_per_token_per_prompt: tuple[float, ...]
    first_order: HeldoutResult
    paired: PairedDifference
    importance: SNISResult
    importance_reason: str | None
    step_norm: float
    trl_callback: tuple[dict, ...] = ()

    def importance_summary(self) -> dict[str, Any]:
        """The check in a few numbers: ΔĤ and SE (null with ``reason`` when unreliable), ESS, k̂, the verdict."""
        s, ok = self.importance, self.importance_reason is None
        return {"deltaH": s.deltaH if ok else None, "se": s.se if ok else None, "reliable": s.reliable,
                "reason": self.importance_reason, "ess_min_fraction": s.ess_min_fraction,
                "ess_mean_fraction": s.ess_mean_fraction, "ess_global_fraction": s.ess_global_fraction,
                "khat": s.khat, "khat_threshold": s.khat_threshold, "khat_assessed": s.khat_assessed,
                "log_weight_max": s.log_weight_max, "normalize": s.normalize, "estimator": s.estimator,
                "deltaH_per_prompt": list(s.deltaH_per_prompt) if ok else None}

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data.update(realised=self.realised.to_dict(), first_order=self.first_order.to_dict(),
                    paired=self.paired.to_dict(), importance=self.importance_summary(),
                    trl_callback=list(self.trl_callback))
        return to_jsonable(data)


@dataclass(frozen=True)
class Trajectory:
    """:func:`trajectory`'s result: one :class:`CheckpointEntropy` per checkpoint (ascending N), one
    :class:`EntropyChange` per consecutive pair, the evaluation set and the update batches' settings, the trainer's
    logged series (``trl_history``: {key: [[step, value], …]} for ``entropy`` and ``entropy_change/*``), the notes and
    the timings. ``to_dict()`` is standard JSON (the command's results file)."""

    run_dir: str
    checkpoints: tuple[CheckpointEntropy, ...]
    changes: tuple[EntropyChange, ...]
    evaluation: dict
    update: dict
    settings: dict
    trl_history: dict
    config: dict
    notes: tuple[str, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable({
            "command": "trajectory", "run_dir": self.run_dir, "versions": versions(), "units": UNITS,
            "config": self.config, "evaluation": self.evaluation, "update": self.update, "settings": self.settings,
            "checkpoints": [entry.to_dict() for entry in self.checkpoints],
            "changes": [change.to_dict() for change in self.changes],
            "trl_history": self.trl_history, "notes": list(self.notes), "timings": self.timings})

    def __str__(self) -> str:
        return format_trajectory(self)


# ------------------------------------------------------------------------------------------------------ the run
def run_checkpoints(run_dir: str | os.PathLike) -> tuple[list[tuple[int, Path]], list[str]]:
    """The run folder's ``checkpoint-N/`` folders that hold an adapter, ascending in N, and a note for each one left
    out (no adapter_config.json: an incomplete save). Raises FileNotFoundError / ValueError for a path that is not
    a run folder, or one without any checkpoint."""
    folder = Path(run_dir)
    if not folder.exists():
        raise FileNotFoundError(f"run folder {str(run_dir)!r} does not exist.")
    if not folder.is_dir():
        raise ValueError(f"{run_dir}: is a file; pass the training run's output folder (the one holding "
                         "checkpoint-N/ folders).")
    found = checkpoint_dirs(folder)
    usable = [(n, path) for n, path in found if (path / "adapter_config.json").is_file()]
    notes = [f"{path.name} holds no adapter_config.json (an incomplete save?): left out" for n, path in found
             if (n, path) not in usable]
    if not usable:
        what = "its checkpoint-N folders hold no adapter" if found else "it holds no checkpoint-N/ folder"
        hint = (" For a single checkpoint use `funcprobe probe`." if (folder / "adapter_config.json").is_file() else "")
        raise ValueError(f"{run_dir}: {what}; pass the output folder of a training run that saved LoRA checkpoints "
                         f"(save_strategy='steps').{hint}")
    return usable, notes


def run_trainer_config(run_dir: str | os.PathLike) -> Path | None:
    """``RUN_DIR/trainer_config.json`` when the run folder holds one (the trainer config a trajectory reads when none
    is given), else None."""
    candidate = Path(run_dir) / TRAINER_CONFIG_FILE
    return candidate if candidate.is_file() else None


def trajectory_config(run_dir: str | os.PathLike, *, reward: Sequence[str] | str | None = None,
                      trainer_config: str | os.PathLike | None = None, B: int | None = None, G: int | None = None,
                      eval_B: int | None = None, eval_G: int | None = None, seed: int = 0,
                      max_new_tokens: int | None = None, prompts: str | None = None, device: str = "cpu",
                      dtype: str = "float32") -> ProbeConfig:
    """The :class:`~funcprobe.probe_config.ProbeConfig` of a trajectory built in code (the command line builds it
    from argv, with every flag ``probe`` has): the run's trainer config read without refusing settings funcprobe
    cannot reproduce (they are kept in ``trainer_settings.unsupported``: no prediction, the entropy still measured),
    sizes by flag > trainer config > funcprobe's defaults, E's size as U's unless given, ``eval_seed`` derived from
    ``seed``. Raises ValueError for sizes below 2 (G, B_E, G_E: the baselines and SEs need two) or a bad config."""
    settings = None
    if trainer_config is not None:
        settings = trainer_settings(read_trainer_config(trainer_config), source=os.fspath(trainer_config),
                                    check=False)
    sizes, sources = settle_sizes(settings, B=B, G=G, max_new_tokens=max_new_tokens, temperature=None)
    eval_B = sizes["B"] if eval_B is None else eval_B
    eval_G = sizes["G"] if eval_G is None else eval_G
    for name, value in (("B", sizes["B"]), ("G", sizes["G"]), ("eval_B", eval_B), ("eval_G", eval_G)):
        if value < 2:
            raise ValueError(f"{name} must be ≥ 2 (the leave-one-out baselines and the SEs over prompts need two); "
                             f"got {value}.")
    rewards = (reward,) if isinstance(reward, str) else (None if reward is None else tuple(reward))
    return ProbeConfig(
        checkpoint=os.fspath(run_dir), sources=sources,
        batch=BatchConfig(B=sizes["B"], G=sizes["G"], eval_B=eval_B, eval_G=eval_G, seed=seed,
                          eval_seed=derive_seed(seed, "evaluation"), max_new_tokens=sizes["max_new_tokens"],
                          temperature=sizes["temperature"], prompts=prompts, rewards=rewards),
        step=StepConfig(objective=settings.objective if settings is not None else StepConfig().objective,
                        trainer_settings=settings),
        estimate=EstimateConfig(), compute=ComputeConfig(device=device, dtype=dtype))


@dataclass(frozen=True)
class _Run:
    """What every checkpoint's measurement shares: the loaded policy, the prompts, the chunking, the rewards."""

    config: ProbeConfig
    policy: Any
    tokenizer: Any
    chosen: dict
    shape: BatchShape
    chunks: Chunking
    rewards: list
    refused: str | None
    rescue: Path
    progress: bool | None
    echo: Any

    def sample(self, params, indices, *, seed: int, G: int, folder: Path):
        """The pipeline's sampling (the trainer's rendering, the --reward functions), at θ = ``params``."""
        from .trl_rewards import trainer_state_from_checkpoint

        return sample_prompts(SINGLE, self.policy, params, self.chosen["pool"], indices, seed=seed, G=G,
                              config=self.config, tokenizer=self.tokenizer, rewards=self.rewards,
                              trainer_state=trainer_state_from_checkpoint(folder),
                              prompt_chunk=self.chunks.prompt_chunk, progress=self.progress, rescue=self.rescue)

    @property
    def passes(self) -> dict[str, Any]:
        return dict(seq_chunk=self.chunks.seq_chunk, token_chunk=self.chunks.token_chunk, progress=self.progress)


@dataclass(frozen=True)
class _Measured:
    """One checkpoint's numbers and what the next change needs of it: E's draw and R, T on it."""

    entry: CheckpointEntropy
    evaluation: Any
    values: Tensor
    lengths: Tensor
    first_order: HeldoutResult | None
    importance: SNISResult | None
    step_norm: float | None


def trajectory(run_dir: str | os.PathLike, *, config: ProbeConfig | None = None,
               reward: Sequence[str] | str | None = None, trainer_config: str | os.PathLike | None = None,
               B: int | None = None, G: int | None = None, eval_B: int | None = None, eval_G: int | None = None,
               seed: int = 0, max_new_tokens: int | None = None, prompts: str | os.PathLike | None = None,
               progress: bool | None = False, echo=print) -> Trajectory:
    """The entropy along a training run: every checkpoint of ``run_dir`` on one evaluation set, each next step's
    predicted first-order change, and the paired change between consecutive checkpoints (module docstring; spec §6
    for the realised change, §9 for the first order).

    Args:
        run_dir: a training run's output folder holding ``checkpoint-N/`` folders (PEFT adapter; ``optimizer.pt``
            and ``trainer_state.json`` where the trainer saved them).
        config: the whole configuration (``cli`` builds it from the command line; its ``checkpoint`` is not read,
            ``run_dir`` is); None: :func:`trajectory_config` of the keywords below, which are ignored otherwise.
        reward: the reward function specs (TRL's signature; "module:function", "path.py:function", or a built-in),
            used to score the update batches (and the evaluation draws, for their mean reward); default "answer".
        trainer_config: the run's GRPOConfig fields (JSON/YAML): the step's loss, G, the budget, τ (default:
            ``RUN_DIR/trainer_config.json`` when the run folder holds one, :func:`run_trainer_config`; else none:
            funcprobe's defaults, which may not be the run's — a note says so).
        B, G: the update batch of each prediction (default: the trainer config's, else 16 × 8). eval_B, eval_G: the
            evaluation set (default: B, G). seed: seeds U's prompts and draws; E's seed is derived from it.
        max_new_tokens: the generation budget (default: the trainer config's, else 100).
        prompts: the prompt pool, JSONL (default: the prompts.jsonl in the latest checkpoint or the run folder).
        progress: tqdm bars (None: when stderr is a terminal). echo: where the progress lines go.

    Returns a :class:`Trajectory`; nats per response unless named per token.

    How (per checkpoint): one sampling pass for E and one no-grad pass for S and R on it; with an optimizer state an
    update batch U and ``pipeline.predict`` (δH₁'s pass, whose Ȳ and P make the step, as ``probe``); then ONE
    held-out pass (``heldout.heldout_pass``, what ``delta_h1_heldout`` runs) along the predicted step's two parts and
    the step really taken at once — the same numbers as separate ``delta_h1_heldout`` calls; and one forward at
    θ_{k+1} on E_k for the importance check. The change between checkpoints needs no pass of its own.

    Raises FileNotFoundError / ValueError for a run folder without checkpoints, checkpoints of different adapters,
    a bad prompts file or reward spec, or a base model that cannot be loaded. A checkpoint without a usable optimizer
    state, or trainer settings funcprobe cannot reproduce, is not an error: its prediction is null with the reason.
    """
    started = time.perf_counter()
    if config is None and trainer_config is None:
        trainer_config = run_trainer_config(run_dir)
    config = config if config is not None else trajectory_config(
        run_dir, reward=reward, trainer_config=trainer_config, B=B, G=G, eval_B=eval_B, eval_G=eval_G, seed=seed,
        max_new_tokens=max_new_tokens, prompts=None if prompts is None else os.fspath(prompts))
    folders, notes = run_checkpoints(run_dir)
    run = _open(config, folders, progress=progress, echo=echo)
    log = TrainerLog.read([path for _, path in folders])
    echo(f"run: {run_dir}: {len(folders)} checkpoint(s) (steps {', '.join(str(n) for n, _ in folders)}); policy "
         f"{run.policy}")
    settings = config.step.trainer_settings
    if settings is None:
        notes.append("no trainer config (none given, no trainer_config.json in the run folder): the predicted steps "
                     "use funcprobe's default loss and sizes, which may not be the run's; pass trainer_config= "
                     "(--trainer-config FILE)")
    else:
        files = sorted({v for v in settings.sources.values() if v not in ("TRL default", "flag", "not derivable")})
        echo(f"trainer config: {', '.join(files) or 'TRL defaults'}")
    steps = (f"none — {run.refused}" if run.refused else
             f"AdamW from each checkpoint's optimizer state; {config.step.objective.describe()}")
    echo(f"predicted next steps: {steps}")
    b = config.batch
    echo(f"evaluation set: B={run.shape.eval_B} prompts × G={run.shape.eval_G} responses, the same prompts and "
         f"sampling seed ({b.eval_seed}) at every checkpoint")
    entries: list[CheckpointEntropy] = []
    changes: list[EntropyChange] = []
    previous: _Measured | None = None
    first = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        current = read_run_checkpoint(folders[0][1], run.policy, step=folders[0][0])
        for index in progress_bar(range(len(folders)), total=len(folders), desc="checkpoints", enabled=progress):
            following = (read_run_checkpoint(folders[index + 1][1], run.policy, step=folders[index + 1][0])
                         if index + 1 < len(folders) else None)
            measured = _measure(run, current, following, log)
            first = measured.evaluation if first is None else first
            entries.append(measured.entry)
            echo(_progress_line(measured.entry))
            if previous is not None:
                changes.append(_change(previous, measured, log))
            previous, current = measured, following
    notes += list(dict.fromkeys(str(w.message) for w in caught
                                if issubclass(w.category, (RuntimeWarning, UserWarning))
                                and "is_gradient_checkpointing" not in str(w.message)))
    for note in notes:
        echo(f"note: {note}")
    return Trajectory(
        run_dir=os.fspath(run_dir), checkpoints=tuple(entries), changes=tuple(changes),
        evaluation=_evaluation_section(run, first), update=_update_section(run), settings=_settings_section(run),
        trl_history=log.series(), config=_config_section(config),
        notes=tuple(notes), timings={"total": time.perf_counter() - started})


def _open(config: ProbeConfig, folders, *, progress, echo) -> _Run:
    """Load the policy once (the latest checkpoint's adapter on its base), choose the prompts, plan the chunks."""
    shape = BatchShape(config.batch.B, config.batch.G, config.batch.eval_B, config.batch.eval_G)
    chosen = choose_prompts(config.batch.prompts, config, shape) if config.batch.prompts is not None else None
    rewards = reward_functions(config)  # before the model: a bad spec fails fast
    latest = dataclasses.replace(config, checkpoint=os.fspath(folders[-1][1]), optimizer=None)
    loaded = open_checkpoint(latest, progress=progress, require_optimizer=False)
    if chosen is None:
        if loaded.prompts_path is None:
            raise ValueError(f"no prompts: pass --prompts FILE.jsonl (there is no prompts.jsonl in "
                             f"{folders[-1][1]} or the run folder).")
        chosen = choose_prompts(loaded.prompts_path, config, shape)
    if loaded.tokenizer is None:
        raise ValueError(f"the checkpoint {folders[-1][1]} has no tokenizer (tokenizer.json / tokenizer_config.json "
                         "in the checkpoint or its base); save the tokenizer with the checkpoint.")
    chunks, _ = plan_chunks(config, loaded.policy, loaded.tokenizer, chosen, shape, echo)
    settings = config.step.trainer_settings
    out = config.output.out
    rescue = Path(out).with_suffix(".failed-rollouts.jsonl") if out else Path("funcprobe-failed-rollouts.jsonl")
    return _Run(config=config, policy=loaded.policy, tokenizer=loaded.tokenizer, chosen=chosen, shape=shape,
                chunks=chunks, rewards=rewards, refused=None if settings is None else settings.unsupported,
                rescue=rescue, progress=progress, echo=echo)


# ------------------------------------------------------------------------------------------- one checkpoint
def _mean_se(values: Tensor) -> tuple[float, float]:
    """The mean of per-prompt values and sd/√n (n ≥ 2 by the config's checks; 0 for identical values)."""
    n = values.numel()
    return float(values.mean()), (float(values.std(unbiased=True)) / math.sqrt(n) if n >= 2 else math.nan)


def per_token_entropy(values: Tensor, lengths: Tensor) -> tuple[float, float, Tensor]:
    """Ĥ_tok = Σ R / Σ T over a [B, G] batch (TRL's definition), its delta-method SE over prompts and the
    pseudo-values p_n = r + (a_n − r b_n)/b̄, a_n = Σ_g R, b_n = Σ_g T (float64 [B]; their mean is r)."""
    a, b = values.sum(dim=1), lengths.sum(dim=1)
    ratio = a.sum() / b.sum()
    pseudo = ratio + (a - ratio * b) / b.mean()
    return float(ratio), _mean_se(pseudo)[1], pseudo


def _predict(run: _Run, state: RunCheckpoint) -> tuple[Any, dict | None, str | None]:
    """(δH₁'s result with the step, U's summary, None) — or (None, …, the reason there is no prediction)."""
    if run.refused:
        return None, None, run.refused
    if state.adam is None:
        return None, None, state.optimizer_reason
    try:
        check_learning_rate(state.adam, run.config, state.optimizer_path)
    except ValueError as error:
        return None, None, str(error)
    b = run.config.batch
    update = run.sample(state.params, run.chosen["indices"], seed=b.seed, G=run.shape.G, folder=state.folder)
    info = update.advantage_info
    summary = {"mean_reward": float(update.batch.rewards.mean()), "eos_count": update.eos_count,
               "zero_variance_groups": list(info.zero_variance_groups),
               "note": info.message(beta=run.config.step.objective.beta) or None}
    if info.nothing_scored:
        return None, summary, f"the update batch: {info.message()} There is no step to predict."
    prediction = predict(state.params, update.batch, policy=run.policy, adam=state.adam, step=run.config.step,
                         chunks=run.chunks, progress=run.progress, echo=run.echo)
    return prediction, summary, None


def _real_step(params: Mapping[str, Tensor], following: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """θ_{k+1} − θ_k in float64 on the CPU (the difference of two float32 tensors, exactly representable)."""
    return {n: following[n].detach().to("cpu", torch.float64) - params[n].detach().to("cpu", torch.float64)
            for n in params}


def _measure(run: _Run, state: RunCheckpoint, following: RunCheckpoint | None, log: TrainerLog) -> _Measured:
    """Checkpoint k: E drawn at θ_k, R and S on it; the predicted next step and (when there is a next checkpoint) the
    step really taken, both along one held-out pass on E (spec §9); the importance-sampling check to θ_{k+1}."""
    timings: dict[str, float] = {}
    timed = timer(timings)
    b, integrand = run.config.batch, run.config.estimate.integrand
    evaluation = timed("sample_eval", lambda: run.sample(state.params, run.chosen["eval_indices"], seed=b.eval_seed,
                                                         G=run.shape.eval_G, folder=state.folder))
    batch = evaluation.batch
    before = timed("entropy", lambda: values_before(state.params, batch, policy=run.policy, logprobs=True,
                                                    entropies=True, chunks=run.passes))
    values, lengths = before.E.to(torch.float64), batch.response_lengths.to(torch.float64)
    entropy, entropy_se = _mean_se(values.mean(dim=1))
    per_token, per_token_se, pseudo = per_token_entropy(values, lengths)

    prediction, update, reason = timed("predict", lambda: _predict(run, state))
    directions, columns = [], {}
    decomposed = False
    if prediction is not None:  # [η_g P⊙Ȳ, Δθ_state]: the probe's decomposition (spec §4), gradient and state terms
        predicted, decomposed = step_directions(prediction.step, state.params)
        columns["predicted"] = list(range(len(predicted)))
        directions += predicted
    real = None
    if following is not None:
        real = _real_step(state.params, following.params)
        columns["real"] = [len(directions)]
        directions.append(real)
    heldout = first_order = importance = None
    if directions:
        passed = timed("delta_h1_heldout", lambda: heldout_pass(state.params, directions, batch, policy=run.policy,
                                                                integrand=integrand, **run.passes))
        if prediction is not None:
            heldout = heldout_result(passed, columns["predicted"], decomposed=decomposed, integrand=integrand)
        if real is not None:
            first_order = heldout_result(passed, columns["real"], decomposed=False, integrand=integrand)
    if following is not None:
        importance = timed("importance", lambda: snis_delta_h(state.params, following.params, policy=run.policy,
                                                              batch=batch, before=before, **run.passes))
    trl_entropy, trl_reason = log.entropy_at(state.step)
    entry = CheckpointEntropy(
        step=state.step, path=os.fspath(state.folder), global_step=state.global_step, entropy=entropy,
        entropy_se=entropy_se, entropy_per_prompt=tuple(float(x) for x in values.mean(dim=1)),
        entropy_per_token=per_token, entropy_per_token_se=per_token_se,
        entropy_per_token_pseudo=tuple(float(x) for x in pseudo), tokens=int(lengths.sum()),
        mean_length=float(lengths.mean()), eval_mean_reward=float(batch.rewards.mean()),
        eval_eos_count=evaluation.eos_count, eval_prompt_indices=tuple(int(i) for i in batch.prompt_index),
        eval_seed=evaluation.spec.seed, prediction=heldout, prediction_reason=reason,
        lr=None if prediction is None else _step_lr(state, run.config), adam_step=_adam_step(state),
        update_batch=update, trl_entropy=trl_entropy, trl_entropy_reason=trl_reason,
        trl_logged=log.logged(state.step), timings=timings)
    norm = None if real is None else math.sqrt(sum(float((t * t).sum()) for t in real.values()))
    return _Measured(entry=entry, evaluation=evaluation, values=values, lengths=lengths, first_order=first_order,
                     importance=importance, step_norm=norm)


def _step_lr(state: RunCheckpoint, config: ProbeConfig) -> float | None:
    if config.step.lr is not None:
        return config.step.lr
    rates = sorted({h.lr for h in state.adam.hyper.values()})
    return rates[0] if len(rates) == 1 else None


def _adam_step(state: RunCheckpoint) -> int | None:
    if state.adam is None:
        return None
    steps = sorted(set(state.adam.step.values()))
    return steps[0] if len(steps) == 1 else None


def _change(before: _Measured, after: _Measured, log: TrainerLog) -> EntropyChange:
    """k → k+1 from the two checkpoints' draws (common random numbers) and k's held-out pass along the real step."""
    if before.evaluation.spec != after.evaluation.spec:
        raise RuntimeError("the evaluation draws of two checkpoints differ in their prompts or seeds; the paired "
                           "change needs one draw specification (a funcprobe bug: please report it).")
    realised = crn_from_draws(before.evaluation.batch, after.evaluation.batch, before.values, after.values,
                              integrand="rao_blackwell")
    _, _, pseudo_before = per_token_entropy(before.values, before.lengths)
    _, _, pseudo_after = per_token_entropy(after.values, after.lengths)
    pseudo = pseudo_after - pseudo_before
    importance = before.importance
    reason = None if importance.reliable else f"importance weights unreliable: {importance.reason}"
    start, end = before.entry.step, after.entry.step
    return EntropyChange(
        from_step=start, to_step=end, steps=end - start, realised=realised,
        realised_per_token=after.entry.entropy_per_token - before.entry.entropy_per_token,
        realised_per_token_se=_mean_se(pseudo)[1], realised_per_token_per_prompt=tuple(float(x) for x in pseudo),
        first_order=before.first_order, paired=paired_difference(realised, before.first_order),
        importance=importance, importance_reason=reason, step_norm=before.step_norm,
        trl_callback=tuple(log.callback_rows(start, end)))


# ------------------------------------------------------------------------------------------------- sections
def _evaluation_section(run: _Run, first) -> dict[str, Any]:
    chosen, b = run.chosen, run.config.batch
    return {"prompts_file": chosen["path"], "pool_size": len(chosen["pool"]),
            "prompt_indices": list(chosen["eval_indices"]), "prompts": list(first.prompts), "seed": b.eval_seed,
            "B": run.shape.eval_B, "G": run.shape.eval_G, "max_new_tokens": b.max_new_tokens,
            "temperature": run.policy.temperature,
            "what": "the same prompts and the same per-prompt random streams at every checkpoint: the draws at two "
                    "checkpoints are common random numbers, so their difference is paired per prompt"}


def _update_section(run: _Run) -> dict[str, Any]:
    b = run.config.batch
    return {"prompt_indices": list(run.chosen["indices"]), "seed": b.seed, "B": run.shape.B, "G": run.shape.G,
            "what": "the update batch U_k sampled at each checkpoint with these prompts and seed: it builds the "
                    "predicted AdamW step whose δĤ₁(E) is each checkpoint's prediction"}


def _settings_section(run: _Run) -> dict[str, Any]:
    config, settings = run.config, run.config.step.trainer_settings
    return {"objective": config.step.objective.to_dict(), "lr": config.step.lr, "integrand": config.estimate.integrand,
            "rewards": list(config.batch.rewards or ["answer"]), "chat_template": config.batch.chat_template,
            "trainer_config": None if settings is None else settings.to_dict(), "sources": dict(config.sources),
            "prediction_unsupported": run.refused, "chunks": dataclasses.asdict(run.chunks)}


def _config_section(config: ProbeConfig) -> dict[str, Any]:
    given = dict(config.record) if config.record is not None else config.to_dict()
    given["command"] = "trajectory"
    return given


# ---------------------------------------------------------------------------------------------------- printing
def _progress_line(entry: CheckpointEntropy) -> str:
    predicted = (f"δĤ₁(E) of the next step {fmt(entry.prediction.deltaH1, '.4g')} ± {fmt(entry.prediction.se, '.3g')}"
                 if entry.prediction is not None else "no prediction")
    return (f"checkpoint-{entry.step}: Ĥ = {fmt(entry.entropy, '.5g')} ± {fmt(entry.entropy_se, '.3g')} nats/response"
            f" ({fmt(entry.entropy_per_token, '.4g')} nats/token); {predicted}")


def format_trajectory(result: Trajectory) -> str:
    """The printed tables: the entropy at each checkpoint beside TRL's, and the change between checkpoints beside
    its first-order values."""
    ev = result.evaluation
    lines = [f"entropy along the run — evaluation set B={ev['B']} × G={ev['G']} (seed {ev['seed']}), the same "
             "prompts and random streams at every checkpoint",
             f"{'step':>6}{'Ĥ nats/resp':>14}{'SE':>9}{'Ĥ nats/tok':>13}{'SE':>9}{'TRL entropy':>13}"
             f"{'δĤ₁(E) next':>14}{'SE':>9}"]
    for e in result.checkpoints:
        prediction = e.prediction
        lines.append(f"{e.step:>6}{fmt(e.entropy, '>14.5g')}{fmt(e.entropy_se, '>9.3g')}"
                     f"{fmt(e.entropy_per_token, '>13.5g')}{fmt(e.entropy_per_token_se, '>9.3g')}"
                     f"{fmt(e.trl_entropy, '>13.5g')}"
                     f"{fmt(None if prediction is None else prediction.deltaH1, '>14.4g')}"
                     f"{fmt(None if prediction is None else prediction.se, '>9.3g')}")
    lines.append("TRL entropy: the trainer's logged per-token entropy of the rollouts drawn at that θ (its row N + 1), "
                 "on its own prompts")
    without = sorted({e.prediction_reason for e in result.checkpoints if e.prediction_reason})
    for reason in without:
        steps = ", ".join(str(e.step) for e in result.checkpoints if e.prediction_reason == reason)
        lines.append(f"no prediction at step {steps}: {reason}")
    if result.changes:
        lines += ["", "change between checkpoints, nats per response, paired per evaluation prompt",
                  f"{'steps':>9}{'ΔĤ (CRN)':>12}{'SE':>9}{'∇Ĥ·Δθ':>12}{'SE':>9}{'ΔĤ − ∇Ĥ·Δθ':>13}{'SE':>9}"
                  f"{'IS check':>11}{'SE':>9}"]
        for c in result.changes:
            s = c.importance_summary()
            mark = "" if c.realised.reliable else "  (CRN: few draws changed)"
            lines.append(f"{f'{c.from_step}→{c.to_step}':>9}{fmt(c.realised.deltaH, '>12.4g')}"
                         f"{fmt(c.realised.se, '>9.3g')}{fmt(c.first_order.deltaH1, '>12.4g')}"
                         f"{fmt(c.first_order.se, '>9.3g')}{fmt(c.paired.difference, '>13.4g')}"
                         f"{fmt(c.paired.se, '>9.3g')}{fmt(s['deltaH'], '>11.4g')}{fmt(s['se'], '>9.3g')}{mark}")
        lines.append("∇Ĥ·Δθ: the first-order change along the step really taken (θ_to − θ_from, spec §9); IS check: "
                     "importance sampling from θ_from's draws, — where its weights are unreliable")
    return "\n".join(lines)
