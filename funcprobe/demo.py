"""The built-in demo: the whole probe on a tiny Qwen2 policy created locally, with a real optimizer state.

1. A small Qwen2-architecture model and a character tokenizer are built locally (random weights, no hub).
2. A LoRA adapter is warmed by a few real AdamW RL steps (sample → GRPO advantages → ``rl_update``) on a synthetic
   arithmetic task, so the optimizer state (m, v, step) is what a training run would leave.
3. On a fresh batch sampled from the warmed policy: δH₁ (spec §5), the step θ⁺, ΔH by importance sampling
   (spec §6), and a learning-rate sweep comparing ΔĤ(η) with δH₁(η) = (η/lr)·δH₁.

Everything runs on the CPU in about a minute; ``quick=True`` shrinks it for CI.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .adam import AdamState
from .delta_h1 import delta_h1
from .policy import Policy
from .report import format_report, summary, versions, write_json
from .rewards import answer_match
from .sampling import sample_batch
from .snis import lr_sweep, plot_lr_sweep, snis_delta_h
from .testing import char_tokenizer, tiny_peft_model
from .update import rl_update

__all__ = ["DemoConfig", "arithmetic_prompts", "demo_reward", "run_demo"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo. ``quick()`` is the CI size."""

    hidden_size: int = 64
    num_layers: int = 2
    lora_r: int = 8
    warm_steps: int = 4
    warm_prompts: int = 8
    B: int = 32
    G: int = 8
    max_new_tokens: int = 16
    lr: float = 2e-3
    eta_factors: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    seed: int = 0

    @classmethod
    def quick(cls) -> "DemoConfig":
        return cls(hidden_size=32, num_layers=1, lora_r=4, warm_steps=2, warm_prompts=4, B=6, G=4,
                   max_new_tokens=6, eta_factors=(0.5, 1.0, 2.0))


def arithmetic_prompts(count: int, seed: int) -> tuple[list[str], list[str]]:
    """``count`` prompts "a+b=" (a, b < 50) with their answers, reproducible from ``seed``."""
    rng = random.Random(seed)
    pairs = [(rng.randrange(50), rng.randrange(50)) for _ in range(count)]
    return [f"{a}+{b}=" for a, b in pairs], [str(a + b) for a, b in pairs]


def demo_reward(prompts, responses, meta):
    """1 for the exact answer (``answer_match``) plus 0.5 × the fraction of digit characters in the response.

    The shaping term gives a random tiny model rewards that vary within a group, so advantages are non-zero.
    """
    exact = torch.as_tensor(answer_match(prompts, responses, meta), dtype=torch.float64)
    digits = torch.tensor([[sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in group]
                           for group in responses], dtype=torch.float64)
    return exact + 0.5 * digits


def run_demo(config: DemoConfig = DemoConfig(), *, out_dir: str | Path | None = "runs/demo",
             plot: bool = True, progress: bool | None = None, echo=print) -> dict:
    """Run the demo; print the tables; write ``results.json`` (and ``sweep.png``) into ``out_dir``."""
    started = time.perf_counter()
    tokenizer = char_tokenizer()
    model = tiny_peft_model("qwen2", vocab_size=len(tokenizer), hidden_size=config.hidden_size,
                            num_layers=config.num_layers, r=config.lora_r, lora_alpha=2 * config.lora_r,
                            init_lora_weights=True, seed=config.seed)
    policy = Policy.from_peft(model, seq_chunk=8, token_chunk=256)
    params = policy.params
    adam = AdamState.zeros(params, lr=config.lr, weight_decay=0.0)
    echo(f"policy: {policy}")

    sample = functools.partial(sample_batch, policy, G=config.G, reward_fn=demo_reward,
                               max_new_tokens=config.max_new_tokens, tokenizer=tokenizer, progress=progress)
    for step in range(config.warm_steps):
        prompts, answers = arithmetic_prompts(config.warm_prompts, seed=1000 + step)
        sampled = sample(params, prompts, seed=step, meta={"answers": answers})
        params, adam = rl_update(params, sampled.batch, policy=policy, adam=adam)
        echo(f"warm-up step {step + 1}/{config.warm_steps}: mean reward "
             f"{float(sampled.batch.rewards.mean()):.3f}")

    prompts, answers = arithmetic_prompts(config.B, seed=config.seed)
    sampled = sample(params, prompts, seed=10_000 + config.seed, meta={"answers": answers})
    batch = sampled.batch
    echo(f"probe batch: B={batch.B} prompts × G={batch.G} responses, e.g. {prompts[0]!r} → "
         f"{sampled.responses[0][:3]}")

    prediction = delta_h1(params, batch, policy=policy, adam=adam, seq_chunk=1, progress=progress)
    new_params, _ = rl_update(params, batch, policy=policy, adam=adam)
    realised = snis_delta_h(params, new_params, policy=policy, batch=batch)
    etas = [factor * config.lr for factor in config.eta_factors]
    sweep = lr_sweep(params, batch, policy=policy, adam=adam, etas=etas,
                     delta_h1_fn=lambda p, b: prediction, progress=progress)
    echo("\n" + format_report(prediction, realised, sweep, details=True))

    results = {"config": config.__dict__ | {"eta_factors": list(config.eta_factors)},
               "versions": versions(), "summary": summary(prediction, realised), "delta_h1": prediction.to_dict(),
               "snis": realised.to_dict(), "lr_sweep": sweep.to_dict(), "wall_s": time.perf_counter() - started}
    if out_dir is not None:
        out_dir = Path(out_dir)
        write_json(out_dir / "results.json", results)
        echo(f"\nwrote {out_dir / 'results.json'}")
        if plot:
            try:
                echo(f"wrote {plot_lr_sweep(sweep, str(out_dir / 'sweep.png'))}")
            except ImportError as error:
                echo(f"(no plot: {error})")
    echo(f"demo finished in {time.perf_counter() - started:.1f} s")
    return results

