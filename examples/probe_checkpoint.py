"""Probe a LoRA training checkpoint through the library API: δĤ₁(E), δH₁ and ΔH of its next AdamW step.

    python examples/probe_checkpoint.py runs/tiny/checkpoint-4 [--prompts prompts.jsonl] [--quick]

What ``funcprobe probe`` does, written out: load the checkpoint (policy + AdamW state + tokenizer), sample an update
batch U of B prompts × G responses from the policy, bind a ``Probe`` and call ``delta_h1`` (the prediction) and
``update`` (the same AdamW step as a pure function → θ⁺); then draw an evaluation batch E — other prompts, another
seed — and on it the headline first-order change δĤ₁(E) (``delta_h1_heldout``: ∇H from E, unbiased for this step at
any optimizer age), the realised change (``realised``: common random numbers and importance sampling), and their
paired difference prompt by prompt (``paired_difference``). δH₁ on U (the cross-prompt U-statistic) estimates the
change expected over batches; a young optimizer state biases it for this step. The realised change is never
measured on U: its samples built the step, and their importance weights would carry the same-sample bias.
"""

from __future__ import annotations

import argparse

import random

from funcprobe import Probe, paired_difference
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
    pool, pool_answers = load_prompts_jsonl(prompts_path)

    def draw(indices, seed):
        return sample_batch(policy, params, [pool[i] for i in indices], G=G, reward_fn="answer",
                            max_new_tokens=max_new_tokens, seed=seed, tokenizer=checkpoint.tokenizer,
                            meta={"answers": [pool_answers[i] for i in indices]}, prompt_index=indices)

    update_prompts = list(range(min(B, len(pool))))
    sampled = draw(update_prompts, args.seed)
    print(f"update batch: B={sampled.batch.B} × G={sampled.batch.G}; e.g. {sampled.prompts[0]!r} → "
          f"{sampled.responses[0][:2]}")

    # 3. The probe: the prediction and the step, both from the update batch.
    probe = Probe(policy, adam, batch=sampled.batch)
    prediction = probe.delta_h1(params)
    new_params, _ = probe.update(params, prediction)          # θ⁺ from δH₁'s own Ȳ: no second gradient pass

    # 4. The realised change on an evaluation batch drawn independently: prompts drawn from the pool with
    #    replacement, responses with another seed.
    eval_prompts = random.Random(args.seed + 1).choices(range(len(pool)), k=B)
    evaluation = draw(eval_prompts, args.seed + 1)
    realised = probe.realised(params, new_params, evaluation, method="both")
    #    The headline first-order change: the same step (δH₁'s), with ∇H from E (spec §9), paired with ΔĤ on E.
    heldout = probe.delta_h1_heldout(params, prediction, evaluation)
    paired = {method: paired_difference(result, heldout) for method, result in realised.items()}

    print()
    print(heldout)
    print(prediction)
    for result in realised.values():
        print()
        print(result)
    print()
    print(summary_table(prediction, realised, heldout=heldout, paired=paired))
    return {"delta_h1": prediction, "heldout": heldout, "paired": paired, "realised": realised,
            "batch": sampled.batch, "eval_batch": evaluation.batch}


if __name__ == "__main__":
    main()
