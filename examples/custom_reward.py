"""Probe with your own reward function: here one that rewards short answers.

    python examples/custom_reward.py [CHECKPOINT] [--quick]

A reward function scores the G responses of each of B prompts::

    reward_fn(prompts: list[str], responses: list[list[str]], meta: Mapping) -> float [B, G]

(a tensor, an array or nested lists; ``meta`` is whatever was passed to ``sample_batch(..., meta=...)``). The rewards
become GRPO advantages (reward − group mean), which set the direction of the AdamW step whose entropy change is
probed. Without CHECKPOINT the example runs on the demo's tiny Qwen2 policy, built locally and warmed by two RL steps
so that its optimizer state is a real one.
"""

from __future__ import annotations

import argparse

import torch

from funcprobe import Probe
from funcprobe.report import summary_table
from funcprobe.rewards import last_number, parse_number
from funcprobe.sampling import sample_batch


def short_answer_reward(prompts, responses, meta):
    """1 / (1 + characters) for every response — shorter is better — plus 1 when its last number is the gold
    answer (``meta["answers"][n]``, when given)."""
    answers = meta.get("answers") or [None] * len(prompts)
    rewards = []
    for answer, group in zip(answers, responses):
        gold = parse_number(answer) if answer is not None else None
        rewards.append([1.0 / (1.0 + len(text.strip())) + (1.0 if gold is not None and last_number(text) == gold
                                                             else 0.0) for text in group])
    return torch.tensor(rewards, dtype=torch.float64)


def demo_policy(quick: bool, seed: int = 0):
    """(policy, params, adam, tokenizer, prompts, answers): the demo's tiny policy after a few warm-up RL steps
    towards short answers (``funcprobe.demo.warmed_policy`` with this example's reward)."""
    import dataclasses

    from funcprobe.demo import DemoConfig, arithmetic_prompts, warmed_policy

    config = dataclasses.replace(DemoConfig.quick() if quick else DemoConfig(), seed=seed)
    warmed = warmed_policy(config, reward_fn=short_answer_reward, progress=False, echo=lambda *args: None)
    prompts, answers = arithmetic_prompts(2 * config.B, seed=seed)  # an update and an evaluation batch's worth
    return warmed.policy, warmed.params, warmed.adam, warmed.tokenizer, prompts, answers


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", help="a checkpoint folder (default: the demo's tiny policy)")
    parser.add_argument("--prompts", help="prompts JSONL (default: the checkpoint's prompts.jsonl)")
    parser.add_argument("--quick", action="store_true", help="a tiny batch (B=4, G=4, 6 new tokens)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    B, G, max_new_tokens = (4, 4, 6) if args.quick else (8, 8, 32)

    if args.checkpoint is None:
        policy, params, adam, tokenizer, prompts, answers = demo_policy(args.quick, args.seed)
        print(f"no checkpoint given: the demo's tiny policy, {policy}")
    else:
        from funcprobe.checkpoints import load_checkpoint
        from funcprobe.rewards import load_prompts_jsonl

        checkpoint = load_checkpoint(args.checkpoint)
        policy, adam, tokenizer = checkpoint.policy, checkpoint.adam, checkpoint.tokenizer
        params = policy.params
        prompts, answers = load_prompts_jsonl(args.prompts or checkpoint.prompts_path)
        print(f"loaded {checkpoint.path} ({checkpoint.layout}, step {checkpoint.step}): {policy}")

    def draw(texts, gold, seed):
        return sample_batch(policy, params, texts, G=G, reward_fn=short_answer_reward,
                            max_new_tokens=max_new_tokens, seed=seed, tokenizer=tokenizer, meta={"answers": gold})

    sampled = draw(prompts[:B], answers[:B], args.seed)
    batch = sampled.batch
    print(f"mean reward {float(batch.rewards.mean()):.4f}; e.g. {sampled.prompts[0]!r} → "
          f"{sampled.responses[0][:2]} with rewards {[round(r, 3) for r in batch.rewards[0, :2].tolist()]}")

    probe = Probe(policy, adam, batch=batch)
    prediction = probe.delta_h1(params)
    new_params, _ = probe.update(params, prediction)
    # The realised change on an evaluation batch: other prompts of the pool, another seed.
    evaluation = draw(prompts[B:2 * B] or prompts[:B], answers[B:2 * B] or answers[:B], args.seed + 1)
    realised = probe.realised(params, new_params, evaluation)
    print()
    print(summary_table(prediction, realised, title="entropy change of a step towards short answers"))
    return {"delta_h1": prediction, "realised": realised, "batch": batch}


if __name__ == "__main__":
    main()
