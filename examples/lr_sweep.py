"""Learning-rate sweep on a checkpoint: the realised ΔĤ(η) on an evaluation batch beside (η/lr)·δĤ₁(E), plotted.

    python examples/lr_sweep.py runs/tiny/checkpoint-4 --out sweep.png [--quick]

The step's direction Δθ comes from the update batch, once, at the optimizer's learning rate lr (``delta_h1``, which
also gives the U-statistic δH₁, the change expected over batches); θ(η) = θ + (η/lr)·Δθ (every term of the AdamW
step is proportional to lr). The first-order line is (η/lr)·δĤ₁(E), ∇H taken from the evaluation batch
(``delta_h1_heldout``: unbiased for this step at any optimizer age), each η paired with its realised change; the
U-statistic's line is drawn dashed beside it. Each ΔĤ(η) is measured on an evaluation
batch drawn independently of the update batch, by common random numbers and by importance sampling. Where the curves
part, the first-order prediction stops describing the step; where the importance weights degenerate, the SNIS points
are hollow (common random numbers need no weights).
"""

from __future__ import annotations

import argparse
import random

from funcprobe import delta_h1, delta_h1_heldout, lr_sweep
from funcprobe.checkpoints import load_checkpoint
from funcprobe.report import plot_lr_sweep
from funcprobe.rewards import load_prompts_jsonl
from funcprobe.sampling import sample_batch


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint folder (e.g. runs/tiny/checkpoint-4)")
    parser.add_argument("--out", default="sweep.png", help="the plot (default %(default)s)")
    parser.add_argument("--prompts", help="prompts JSONL (default: the checkpoint's prompts.jsonl)")
    parser.add_argument("--factors", default="0.1,0.3,1,3,10", help="η/lr values (default %(default)s)")
    parser.add_argument("--lr", type=float, default=None, help="the step's learning rate (default: the optimizer "
                        "state's, which a decayed schedule may have brought to 0)")
    parser.add_argument("--quick", action="store_true", help="a tiny batch (B=4, G=4, 6 new tokens, 3 η)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    B, G, max_new_tokens = (4, 4, 6) if args.quick else (8, 8, 64)
    factors = [0.5, 1.0, 2.0] if args.quick else [float(f) for f in args.factors.split(",")]

    checkpoint = load_checkpoint(args.checkpoint)
    policy, adam = checkpoint.policy, checkpoint.adam
    params = policy.params
    pool, answers = load_prompts_jsonl(args.prompts or checkpoint.prompts_path)

    def draw(indices, seed):
        return sample_batch(policy, params, [pool[i] for i in indices], G=G, reward_fn="answer",
                            max_new_tokens=max_new_tokens, seed=seed, tokenizer=checkpoint.tokenizer,
                            meta={"answers": [answers[i] for i in indices]}, prompt_index=indices)

    update = draw(list(range(min(B, len(pool)))), args.seed)
    evaluation = draw(random.Random(args.seed + 1).choices(range(len(pool)), k=B), args.seed + 1)

    # The step's learning rate: --lr, else the optimizer's (one shared by every tensor, as lr_sweep requires).
    lr = args.lr if args.lr is not None else next(iter(adam.hyper.values())).lr
    if not lr > 0:
        raise SystemExit(f"the optimizer state's learning rate is {lr} (a finished schedule?); pass --lr")
    prediction = delta_h1(params, update.batch, policy=policy, adam=adam, lr=lr)
    heldout = delta_h1_heldout(params, prediction.step, evaluation, policy=policy)
    sweep = lr_sweep(params, evaluation, policy=policy, step=prediction.step, etas=[f * lr for f in factors],
                     prediction=prediction, heldout=heldout, method="both")
    print(sweep)
    print(f"wrote {plot_lr_sweep(sweep, args.out)}")
    return {"lr_sweep": sweep, "plot": args.out}


if __name__ == "__main__":
    main()
