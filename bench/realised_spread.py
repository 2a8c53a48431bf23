"""Spread of the realised change on the evaluation batch: importance sampling vs common random numbers, by η/lr.

    python bench/realised_spread.py                  # the demo's policy, 6 evaluation batches (≈ 6 min, 2 cores)
    python bench/realised_spread.py --quick          # the quick demo's sizes, 3 evaluation batches (≈ 20 s)
    python bench/realised_spread.py --json out.json

The policy, the optimizer state and the update batch are the demo's (``funcprobe.demo``: a tiny Qwen2 policy warmed by
a few real AdamW RL steps, B = 32 prompts × G = 8 responses of up to 16 tokens, lr 2e-3). δH₁ and the step Δθ come
from the update batch; then ``--evals`` evaluation batches E_k (B = 32 × G = 8, other prompts and seeds each) are
drawn at θ, and on every E_k the realised change of θ(η) = θ + (η/lr)·Δθ is estimated at η/lr ∈ {0.25, 1, 4, 16} by

* SNIS, per-prompt self-normalised, sequence integrand (−S) and Rao-Blackwell integrand;
* SNIS "none" (ordinary importance sampling), sequence integrand;
* CRN, Rao-Blackwell integrand (the default) and −S.

Reported per method and η/lr: the mean over the E_k of ΔĤ and of its reported SE, and the spread (sd over E_k) of
ΔĤ — the same E and seeds for every method. Also the wall time of the evaluation side (sampling E, CRN and SNIS at
η = lr) against the update side (sampling U, δH₁, the step) in the same process.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

FACTORS = (0.25, 1.0, 4.0, 16.0)
METHODS = {
    "snis_prompt": dict(method="snis", normalize="prompt", estimator="sequence"),
    "snis_prompt_rb": dict(method="snis", normalize="prompt", estimator="rao_blackwell"),
    "snis_none": dict(method="snis", normalize="none", estimator="sequence"),
    "crn_rb": dict(method="crn", integrand="rao_blackwell"),
    "crn_sequence": dict(method="crn", integrand="sequence"),
}


def warmed_demo(quick: bool):
    """The demo's policy after its warm-up steps: (config, policy, params, adam, sample)."""
    from funcprobe.demo import DemoConfig, warmed_policy

    config = DemoConfig.quick() if quick else DemoConfig()
    warmed = warmed_policy(config, progress=False, echo=lambda *args: None)
    return config, warmed.policy, warmed.params, warmed.adam, warmed.sample


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--evals", type=int, default=None, help="evaluation batches (default 6; quick 3)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    evals = args.evals or (3 if args.quick else 6)

    from funcprobe import crn_delta_h, delta_h1, snis_delta_h
    from funcprobe.adam import scaled_update
    from funcprobe.demo import arithmetic_prompts
    from funcprobe.update import apply_step

    config, policy, params, adam, sample = warmed_demo(args.quick)
    clock = {}
    start = time.perf_counter()
    prompts, answers = arithmetic_prompts(config.B, seed=config.seed)
    update_batch = sample(params, prompts, seed=10_000 + config.seed, meta={"answers": answers}).batch
    clock["sample_update_batch"] = time.perf_counter() - start
    start = time.perf_counter()
    prediction = delta_h1(params, update_batch, policy=policy, adam=adam, seq_chunk=1)
    clock["delta_h1"] = time.perf_counter() - start
    start = time.perf_counter()
    new_params, _ = apply_step(params, adam, prediction.step)
    clock["update"] = time.perf_counter() - start
    delta = prediction.step.delta_theta()
    print(f"δH₁ = {prediction.deltaH1:.5g} ± {prediction.se_deltaH1:.3g} (update batch B={update_batch.B}, "
          f"G={update_batch.G}, lr {config.lr})")

    values = {(name, f): [] for name in METHODS for f in FACTORS}
    ses = {(name, f): [] for name in METHODS for f in FACTORS}
    changed = {f: [] for f in FACTORS}
    eval_clock = {"sample_eval": [], "crn_at_lr": [], "snis_at_lr": []}
    for k in range(evals):
        eval_prompts, eval_answers = arithmetic_prompts(config.eval_B, seed=50_000 + 7 * k)
        start = time.perf_counter()
        evaluation = sample(params, eval_prompts, G=config.eval_G, seed=20_000 + k, meta={"answers": eval_answers})
        eval_clock["sample_eval"].append(time.perf_counter() - start)
        for factor in FACTORS:
            update = new_params if factor == 1.0 else scaled_update(params, delta, factor)
            for name, options in METHODS.items():
                options = dict(options)
                method = options.pop("method")
                start = time.perf_counter()
                if method == "crn":
                    result = crn_delta_h(params, update, policy=policy, sample=evaluation, **options)
                    if options["integrand"] == "rao_blackwell":
                        changed[factor].append(result.changed_fraction)
                else:
                    result = snis_delta_h(params, update, policy=policy, batch=evaluation.batch, **options)
                seconds = time.perf_counter() - start
                if factor == 1.0 and name in ("crn_rb", "snis_prompt"):
                    eval_clock["crn_at_lr" if method == "crn" else "snis_at_lr"].append(seconds)
                values[(name, factor)].append(result.deltaH)
                ses[(name, factor)].append(result.se)
        print(f"evaluation batch {k + 1}/{evals} done")

    rows = []
    for factor in FACTORS:
        for name in METHODS:
            v, s = values[(name, factor)], ses[(name, factor)]
            rows.append(dict(factor=factor, method=name, mean=statistics.fmean(v), mean_se=statistics.fmean(s),
                             spread=statistics.stdev(v) if len(v) > 1 else math.nan,
                             predicted=factor * prediction.deltaH1))
    print(f"\n{evals} evaluation batches (B={config.eval_B}, G={config.eval_G}); prediction (η/lr)·δH₁ with δH₁ = "
          f"{prediction.deltaH1:.4g} ± {prediction.se_deltaH1:.3g}\n")
    print("| η/lr | method | mean ΔĤ | mean reported SE | spread over E | CRN draws changed |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        moved = statistics.fmean(changed[row["factor"]]) if row["method"].startswith("crn") else None
        print(f"| {row['factor']:g} | {row['method']} | {row['mean']:.4g} | {row['mean_se']:.3g} | "
              f"{row['spread']:.3g} | {'' if moved is None else format(moved, '.3f')} |")
    update_side = clock["sample_update_batch"] + clock["delta_h1"] + clock["update"]
    eval_side = {name: statistics.median(times) for name, times in eval_clock.items()}
    print(f"\nwall time, update side (sample U {clock['sample_update_batch']:.2f} s + δH₁ {clock['delta_h1']:.2f} s + "
          f"step {clock['update']:.3f} s) = {update_side:.2f} s; evaluation side: sample E "
          f"{eval_side['sample_eval']:.2f} s, CRN at η = lr {eval_side['crn_at_lr']:.2f} s, SNIS at η = lr "
          f"{eval_side['snis_at_lr']:.2f} s → E with CRN = {(eval_side['sample_eval'] + eval_side['crn_at_lr']) / update_side:.2f}× "
          f"the update side, with SNIS {(eval_side['sample_eval'] + eval_side['snis_at_lr']) / update_side:.2f}×")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows=rows, clock=clock, eval_clock=eval_clock,
                                                   deltaH1=prediction.deltaH1, se_deltaH1=prediction.se_deltaH1,
                                                   changed={str(k): v for k, v in changed.items()}), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
