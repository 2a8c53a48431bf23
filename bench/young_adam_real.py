"""δH₁ and deltaH1_loo against the realised first-order slope on `make demo`'s checkpoint (a young AdamW state, t = 3).

    make demo && python bench/young_adam_real.py [--batches 5]

For several update batches U (8 prompts × 4 of the demo's pool, consecutive prompt rows, seeds 1, 2, …) the step the
trainer would take on U (dapo, group-scaled advantages, clipping, from the checkpoint's AdamW state), its δH₁ ± SE and
deltaH1_loo, and the realised ΔĤ of the same step scaled to η = lr/16 on one common evaluation batch E (the pool's
prompts 32–63 × 4, seed 999; SNIS, reliable at that η), times 16: the first-order slope the two predictions estimate.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo/run")
    parser.add_argument("--batches", type=int, default=5)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    from funcprobe import delta_h1, snis_delta_h
    from funcprobe.checkpoints import load_checkpoint
    from funcprobe.prompts import load_prompt_pool, render_prompts
    from funcprobe.sampling import sample_batch
    from funcprobe.trainer_config import read_trainer_config, trainer_settings
    from funcprobe.trl_rewards import TRLRewards, load_reward_function

    run = Path(args.run)
    checkpoint = load_checkpoint(run)
    policy, adam, tokenizer = checkpoint.policy, checkpoint.adam, checkpoint.tokenizer
    params = policy.params
    objective = trainer_settings(read_trainer_config(run / "trainer_config.json"), source=str(run)).objective
    pool = load_prompt_pool(checkpoint.prompts_path)
    reward = load_reward_function("funcprobe.demo_real:arithmetic_reward")

    def draw(rows, seed):
        ids = render_prompts(pool.select(rows), tokenizer)
        rewards = TRLRewards.for_pool([reward], pool, rows, tokenizer=tokenizer, prompt_ids=ids)
        return sample_batch(policy, params, ids, G=4, reward_fn=rewards, scale_rewards=objective.scale_rewards,
                            max_new_tokens=16, seed=seed, tokenizer=tokenizer, prompt_index=rows).batch

    evaluation = draw(list(range(32, 64)), 999)
    rows = []
    print("| U (seed) | δH₁ ± SE | deltaH1_loo | 16 × ΔĤ at lr/16 ± SE | SNIS reliable |")
    print("|---:|---:|---:|---:|---|")
    for seed in range(1, args.batches + 1):
        start = 8 * (seed - 1) % 32
        batch = draw(list(range(start, start + 8)), seed)
        result = delta_h1(params, batch, policy=policy, adam=adam, objective=objective)
        delta = result.step.delta_theta()
        theta = {n: params[n] + delta[n].to(params[n].dtype) / 16 for n in params}
        realised = snis_delta_h(params, theta, policy=policy, batch=evaluation)
        rows.append(dict(seed=seed, deltaH1=result.deltaH1, se=result.se_deltaH1, loo=result.deltaH1_loo,
                         slope=16 * realised.deltaH, slope_se=16 * realised.se, reliable=realised.reliable))
        print(f"| {seed} | {result.deltaH1:.3f} ± {result.se_deltaH1:.2f} | {result.deltaH1_loo:.3f} | "
              f"{16 * realised.deltaH:.3f} ± {16 * realised.se:.2f} | {realised.reliable} |", flush=True)
    n = len(rows)
    for key, label in (("deltaH1", "δH₁"), ("loo", "deltaH1_loo")):
        diffs = torch.tensor([r[key] - r["slope"] for r in rows], dtype=torch.float64)
        se = float(diffs.std() / n ** 0.5) if n > 1 else float("nan")
        print(f"- {label} − realised slope: mean {float(diffs.mean()):+.3f} ± {se:.3f} (SE over the {n} batches)")
    return rows


if __name__ == "__main__":
    main()
