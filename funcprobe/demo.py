"""The built-in demo: the whole probe on a tiny Qwen2 policy created locally, with a real optimizer state.

1. A small Qwen2-architecture model and a character tokenizer are built locally (random weights, no hub).
2. A LoRA adapter is warmed by a few real AdamW RL steps (sample → GRPO advantages → ``rl_update``) on a synthetic
   arithmetic task, so the optimizer state (m, v, step) is what a training run would leave.
3. On a fresh update batch U sampled from the warmed policy: δH₁ (spec §5) and the step θ⁺ it predicts; on an
   evaluation batch E drawn independently (other prompts, another seed): the realised ΔH by common random numbers
   and by importance sampling (spec §6), and a learning-rate sweep comparing ΔĤ(η) on E with δH₁(η) = (η/lr)·δH₁.

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
from .pipeline import Chunking, EstimateConfig, measure
from .policy import Policy
from .report import plot_lr_sweep, summary, versions, write_json
from .rewards import answer_match
from .sampling import sample_batch
from .testing import char_tokenizer, tiny_peft_model
from .update import rl_update

__all__ = ["DemoConfig", "WarmedPolicy", "arithmetic_prompts", "demo_reward", "warmed_policy", "run_demo"]

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
    eval_B: int = 32
    eval_G: int = 8
    max_new_tokens: int = 16
    lr: float = 2e-3
    eta_factors: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    seed: int = 0

    @classmethod
    def quick(cls) -> "DemoConfig":
        return cls(hidden_size=32, num_layers=1, lora_r=4, warm_steps=2, warm_prompts=4, B=6, G=4, eval_B=6,
                   eval_G=4, max_new_tokens=6, eta_factors=(0.5, 1.0, 2.0))


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


@dataclass(frozen=True)
class WarmedPolicy:
    """The demo's policy after its warm-up: the policy, θ, the AdamW state, the tokenizer and ``sample(params,
    prompts, seed=, meta=, G=)`` (``sample_batch`` bound to the policy, the reward and the generation budget)."""

    policy: Policy
    params: dict
    adam: AdamState
    tokenizer: object
    sample: functools.partial


def warmed_policy(config: DemoConfig = DemoConfig(), *, reward_fn=demo_reward, progress: bool | None = None,
                  echo=print) -> WarmedPolicy:
    """The demo's tiny Qwen2 policy (random weights, LoRA from PEFT's default init) after ``config.warm_steps`` real
    AdamW RL steps on arithmetic prompts scored by ``reward_fn``: a non-trivial adapter and optimizer state."""
    tokenizer = char_tokenizer()
    model = tiny_peft_model("qwen2", vocab_size=len(tokenizer), hidden_size=config.hidden_size,
                            num_layers=config.num_layers, r=config.lora_r, lora_alpha=2 * config.lora_r,
                            init_lora_weights=True, seed=config.seed)
    policy = Policy.from_peft(model, seq_chunk=8, token_chunk=256)
    params = policy.params
    adam = AdamState.zeros(params, lr=config.lr, weight_decay=0.0)
    echo(f"policy: {policy}")
    sample = functools.partial(sample_batch, policy, G=config.G, reward_fn=reward_fn,
                               max_new_tokens=config.max_new_tokens, tokenizer=tokenizer, progress=progress)
    for step in range(config.warm_steps):
        prompts, answers = arithmetic_prompts(config.warm_prompts, seed=1000 + step)
        sampled = sample(params, prompts, seed=step, meta={"answers": answers})
        params, adam = rl_update(params, sampled.batch, policy=policy, adam=adam)
        echo(f"warm-up step {step + 1}/{config.warm_steps}: mean reward "
             f"{float(sampled.batch.rewards.mean()):.3f}")
    return WarmedPolicy(policy, params, adam, tokenizer, sample)


def run_demo(config: DemoConfig = DemoConfig(), *, out_dir: str | Path | None = "runs/demo",
             plot: bool = True, progress: bool | None = None, echo=print) -> dict:
    """Run the demo; print the tables; write ``results.json`` (and ``sweep.png``) into ``out_dir``."""
    started = time.perf_counter()
    warmed = warmed_policy(config, progress=progress, echo=echo)
    policy, params, adam, sample = warmed.policy, warmed.params, warmed.adam, warmed.sample

    prompts, answers = arithmetic_prompts(config.B, seed=config.seed)
    sampled = sample(params, prompts, seed=10_000 + config.seed, meta={"answers": answers})
    batch = sampled.batch
    echo(f"update batch: B={batch.B} prompts × G={batch.G} responses, e.g. {prompts[0]!r} → "
         f"{sampled.responses[0][:3]}")
    # The realised change is measured on an evaluation batch drawn independently of the update batch (spec §6).
    eval_prompts, eval_answers = arithmetic_prompts(config.eval_B, seed=50_000 + config.seed)
    evaluation = sample(params, eval_prompts, G=config.eval_G, seed=20_000 + config.seed,
                        meta={"answers": eval_answers})
    echo(f"evaluation batch: B={evaluation.batch.B} prompts × G={evaluation.batch.G} responses (independent draws)")

    etas = tuple(factor * config.lr for factor in config.eta_factors)
    measured = measure(params, batch, evaluation, policy=policy, adam=adam,
                       estimate=EstimateConfig(realised="both", in_sample=True, etas=etas),
                       chunks=Chunking(delta_h1_seq_chunk=1), progress=progress, echo=echo)
    prediction, realised, in_sample, sweep = (measured.prediction, measured.realised, measured.in_sample,
                                              measured.sweep)
    echo("\n" + measured.report(details=True))

    results = {"config": config.__dict__ | {"eta_factors": list(config.eta_factors)},
               "versions": versions(),
               "summary": summary(prediction, realised, in_sample, measured.heldout, measured.paired),
               "batch": {"prompts": sampled.prompts, "responses": sampled.responses, "rewards": batch.rewards},
               "eval_batch": {"prompts": evaluation.prompts, "responses": evaluation.responses,
                              "rewards": evaluation.batch.rewards},
               "delta_h1_heldout": measured.heldout.to_dict(),
               "paired": {k: v.to_dict() for k, v in measured.paired.items()},
               "delta_h1": prediction.to_dict(), "realised": {k: v.to_dict() for k, v in realised.items()},
               "in_sample": in_sample.to_dict(), "lr_sweep": sweep.to_dict(),
               "wall_s": time.perf_counter() - started}
    if out_dir is not None:
        out_dir = Path(out_dir)
        write_json(out_dir / "results.json", results)
        echo(f"\nwrote {out_dir / 'results.json'}")
        if plot:
            try:
                echo(f"wrote {plot_lr_sweep(sweep, out_dir / 'sweep.png')}")
            except ImportError as error:
                echo(f"(no plot: {error})")
    echo(f"demo finished in {time.perf_counter() - started:.1f} s")
    return results

