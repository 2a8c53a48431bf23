"""A real TRL ``GRPOTrainer`` run at tiny size, saved as the trainer saves it: something to probe with the run's own
settings.

    python examples/train_trl_checkpoint.py --out runs/trl [--quick]
    funcprobe probe runs/trl/checkpoint-2 --trainer-config runs/trl/trainer_config.json \\
        --reward examples/rewards.py:digit_fraction --reward examples/rewards.py:exact_answer -B 4 -G 4

Writes:
    OUT/base/                   a tiny Qwen2 model (random weights) and its character tokenizer, with a chat template
    OUT/prompts.jsonl           conversational prompts (TRL's format) with an "answer" column
    OUT/checkpoint-N/           what GRPOTrainer saves: the LoRA adapter, optimizer.pt, scheduler.pt,
                                trainer_state.json, training_args.bin, the tokenizer
    OUT/trainer_config.json     the run's GRPOConfig fields (GRPOConfig.to_dict(), JSON-ready) for --trainer-config

The run: loss_type "grpo", β = 0.04 (a KL to the base model), scale_rewards "group", 4 prompts × 4 generations per
step, 8 new tokens, lr 1e-3 (a constant schedule: a linear one reaches 0 at the last step, and the last checkpoint's
next step would be zero), two reward functions (``examples/rewards.py``), on the CPU in float32 (bf16 off).
Needs ``trl`` (``pip install trl``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import warnings
from pathlib import Path

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def prompts(count: int, seed: int) -> list[dict]:
    """Conversational arithmetic prompts with their answers."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randrange(10), rng.randrange(10)
        rows.append({"prompt": [{"role": "user", "content": f"{a}+{b}="}], "answer": str(a + b)})
    return rows


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        return str(value)


def main(argv: list[str] | None = None, echo=print) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/trl")
    parser.add_argument("--quick", action="store_true", help="one step instead of two")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from funcprobe.testing import DEFAULT_TARGET_MODULES, char_tokenizer, tiny_causal_lm

    import importlib.util

    spec = importlib.util.spec_from_file_location("example_rewards", Path(__file__).with_name("rewards.py"))
    rewards = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rewards)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = char_tokenizer("_")
    tokenizer.chat_template = CHAT_TEMPLATE
    base_dir = (out / "base").resolve()
    tiny_causal_lm("qwen2", vocab_size=len(tokenizer), hidden_size=64, num_layers=2, seed=args.seed).save_pretrained(
        base_dir)
    tokenizer.save_pretrained(base_dir)
    rows = prompts(32, args.seed)
    with open(out / "prompts.jsonl", "w", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(row) + "\n")

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    steps = 1 if args.quick else 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        config = GRPOConfig(output_dir=str(out), per_device_train_batch_size=16, num_generations=4,
                            max_completion_length=8, learning_rate=1e-3, lr_scheduler_type="constant", beta=0.04,
                            loss_type="grpo",
                            scale_rewards="group", max_steps=steps, save_steps=1, save_strategy="steps",
                            logging_steps=1, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
                            report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=args.seed)
    trainer = GRPOTrainer(model=model, reward_funcs=[rewards.digit_fraction, rewards.exact_answer], args=config,
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                          peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=list(DEFAULT_TARGET_MODULES),
                                                 lora_dropout=0.0))
    trainer.train()
    (out / "trainer_config.json").write_text(json.dumps({k: _jsonable(v) for k, v in config.to_dict().items()},
                                                        indent=1))
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    echo(f"trained {steps} GRPO step(s); checkpoints: {[c.name for c in checkpoints]}; trainer config "
         f"{out / 'trainer_config.json'}")
    return {"out": out, "checkpoints": checkpoints, "base_dir": base_dir, "config": config.to_dict()}


if __name__ == "__main__":
    main()
