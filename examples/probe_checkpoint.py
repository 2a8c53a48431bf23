"""Probe a LoRA training checkpoint through the library API: δH₁ and ΔH of its next AdamW step.

    python examples/probe_checkpoint.py runs/tiny/checkpoint-4 [--prompts prompts.jsonl] [--quick]

What ``funcprobe probe`` does, written out: load the checkpoint (policy + AdamW state + tokenizer), sample B prompts
× G responses from the policy, bind a ``Probe`` and call ``delta_h1`` (the prediction), ``update`` (the same AdamW
step as a pure function → θ⁺) and ``snis_delta_h`` (the realised change, by importance sampling).
"""

from __future__ import annotations

import argparse

from funcprobe import Probe
from funcprobe.checkpoints import load_checkpoint
from funcprobe.report import summary_table
from funcprobe.rewards import load_prompts_jsonl
from funcprobe.sampling import sample_batch


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint folder (e.g. runs/tiny/checkpoint-4)")
    parser.add_argument("--prompts", help="prompts JSONL (default: the checkpoint's prompts.jsonl)")
    parser.add_argument("--quick", action="store_true", help="a tiny batch (B=4, G=4, 6 new tokens)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    B, G, max_new_tokens = (4, 4, 6) if args.quick else (8, 8, 64)

    # 1. The checkpoint: a Policy (frozen model, LoRA params dict) and the AdamW state the trainer saved.
    checkpoint = load_checkpoint(args.checkpoint)
    policy, adam = checkpoint.policy, checkpoint.adam
    params = policy.params
    print(f"loaded {checkpoint.path} ({checkpoint.layout}, step {checkpoint.step}): {policy}")

    # 2. A batch of B prompts × G responses sampled from π_θ, scored by the built-in "answer" reward.
    prompts_path = args.prompts or checkpoint.prompts_path
    if prompts_path is None:
        raise SystemExit("no prompts: pass --prompts FILE.jsonl")
    prompts, answers = load_prompts_jsonl(prompts_path)
    prompts, answers = prompts[:B], answers[:B]
    sampled = sample_batch(policy, params, prompts, G=G, reward_fn="answer", max_new_tokens=max_new_tokens,
                           seed=args.seed, tokenizer=checkpoint.tokenizer, meta={"answers": answers})
    print(f"sampled B={sampled.batch.B} × G={sampled.batch.G}; e.g. {sampled.prompts[0]!r} → "
          f"{sampled.responses[0][:2]}")

    # 3. The probe: prediction, the step, and the realised change on the same batch.
    probe = Probe(policy, adam, batch=sampled.batch)
    prediction = probe.delta_h1(params)
    new_params, _ = probe.update(params)
    realised = probe.snis_delta_h(params, new_params)

    print()
    print(prediction)
    print()
    print(realised)
    print()
    print(summary_table(prediction, realised))
    return {"delta_h1": prediction, "snis": realised, "batch": sampled.batch}


if __name__ == "__main__":
    main()
