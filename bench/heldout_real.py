"""δĤ₁(E) on `make demo`'s checkpoint with the command's own U and E (issue 17): the SEs of the U-statistic, the held-out
estimate with each integrand, the realised change and the paired difference, over several seeds; and, at a small step,
which realised estimator the held-out prediction agrees with.

    python bench/heldout_real.py                        # seeds 0, 1, 2 (needs runs/demo from `make demo`)
    python bench/heldout_real.py --seeds 0 --run runs/demo/run

For each seed s: the probe's own loading and sampling (``pipeline.load_and_sample`` on the demo's ``ProbeConfig`` with
--seed s: U = 8 prompts × 4, E = 16 × 4 drawn independently), then on that U and E
  * δH₁ (spec §5, the U-statistic on U) ± its jackknife SE, and the step Δθ from its Ȳ;
  * δĤ₁(E) (spec §9) along Δθ with the Rao-Blackwell and with the sequence integrand, ± SE;
  * the realised ΔĤ of the step on E (per-prompt SNIS, Rao-Blackwell: the probe's default) ± SE, and the paired
    ΔĤ − δĤ₁(E) ± its paired SE;
  * at η/lr = 1/16 (where the weights are near 1 and ΔH is first order): ΔĤ − (1/16)·δĤ₁(E) for per-prompt
    self-normalised IS (the default) and for ordinary IS (``normalize="none"``, unbiased for any step), paired. A
    difference that is linear in η at small η is a first-order disagreement: self-normalisation's O(Δ/G) bias; and
    ordinary IS with a leave-one-out control variate (``normalize="loo"``: unbiased, as smooth as SNIS), also at lr.
Prints a markdown table (and --json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo/run", help="make demo's training run folder")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import torch

    from funcprobe.adam import scaled_update
    from funcprobe.delta_h1 import delta_h1
    from funcprobe.demo_real import RealDemoConfig, TrainedRun, probe_config
    from funcprobe.heldout import delta_h1_heldout, paired_difference
    from funcprobe.pipeline import load_and_sample
    from funcprobe.probe_config import derive_seed
    from funcprobe.realised import snis_delta_h
    from funcprobe.update import apply_step

    run_dir = Path(args.run)
    checkpoints = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if not checkpoints:
        raise SystemExit(f"no checkpoint-N under {run_dir}: run `make demo` first")
    run = TrainedRun(checkpoint=checkpoints[-1], trainer_config=run_dir / "trainer_config.json",
                     **{f.name: None for f in dataclasses.fields(TrainedRun)
                        if f.name not in ("checkpoint", "trainer_config")})
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        config = probe_config(RealDemoConfig(seed=seed), run, "/tmp/heldout_real", plot=False)
        config = dataclasses.replace(config, batch=dataclasses.replace(
            config.batch, seed=seed, eval_seed=derive_seed(seed, "evaluation")))
        started = time.perf_counter()
        loaded = load_and_sample(config, progress=False, echo=lambda *a, **k: None)
        policy, params, adam = loaded.policy, loaded.params, loaded.adam
        E = loaded.evaluation.batch
        prediction = delta_h1(params, loaded.batch, policy=policy, adam=adam, objective=config.step.objective)
        step = prediction.step
        rb = delta_h1_heldout(params, step, E, policy=policy)
        seq = delta_h1_heldout(params, step, E, policy=policy, integrand="sequence")
        new_params, _ = apply_step(params, adam, step, objective=config.step.objective)
        realised = snis_delta_h(params, new_params, policy=policy, batch=E)
        paired = paired_difference(realised, rb)
        small = scaled_update(params, step.delta_theta(), 1 / 16)
        small_snis = snis_delta_h(params, small, policy=policy, batch=E)
        small_is = snis_delta_h(params, small, policy=policy, batch=E, normalize="none")
        small_loo = snis_delta_h(params, small, policy=policy, batch=E, normalize="loo")
        loo = snis_delta_h(params, new_params, policy=policy, batch=E, normalize="loo")
        row = dict(seed=seed, t=int(min(adam.step.values())), U=f"{loaded.batch.B}×{loaded.batch.G}",
                   E=f"{E.B}×{E.G}", ustat=prediction.deltaH1, ustat_se=prediction.se_deltaH1,
                   seq=seq.deltaH1, seq_se=seq.se, rb=rb.deltaH1, rb_se=rb.se, realised=realised.deltaH,
                   realised_se=realised.se, paired=paired.difference, paired_se=paired.se, paired_z=paired.z,
                   small_snis=paired_difference(small_snis, rb, scale=1 / 16).to_dict(),
                   small_is=paired_difference(small_is, rb, scale=1 / 16).to_dict(),
                   small_loo=paired_difference(small_loo, rb, scale=1 / 16).to_dict(),
                   loo=loo.deltaH, loo_se=loo.se, loo_paired=paired_difference(loo, rb).to_dict(),
                   seconds=time.perf_counter() - started)
        rows.append(row)
        print(f"seed {seed}: {json.dumps(row)}", file=sys.stderr, flush=True)
    print("| seed | U-statistic δH₁ ± SE | δĤ₁(E) sequence ± SE | δĤ₁(E) Rao-Blackwell ± SE | realised ΔĤ ± SE | "
          "ΔĤ − δĤ₁(E) ± paired SE (z) | at η/lr = 1/16: SNIS − pred. ± SE (z) | ordinary IS − pred. ± SE (z) | "
          "LOO-control-variate IS − pred. ± SE (z) | at lr: LOO-CV ΔĤ ± SE, − δĤ₁(E) ± paired SE (z) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        s, o = r["small_snis"], r["small_is"]
        print(f"| {r['seed']} | {r['ustat']:.3f} ± {r['ustat_se']:.3f} | {r['seq']:.3f} ± {r['seq_se']:.3f} | "
              f"{r['rb']:.3f} ± {r['rb_se']:.3f} | {r['realised']:.3f} ± {r['realised_se']:.3f} | "
              f"{r['paired']:.3f} ± {r['paired_se']:.3f} ({r['paired_z']:+.1f}) | "
              f"{s['difference']:.4f} ± {s['se']:.4f} ({s['z']:+.1f}) | {o['difference']:.4f} ± {o['se']:.4f} "
              f"({o['z']:+.1f}) | {r['small_loo']['difference']:.4f} ± {r['small_loo']['se']:.4f} "
              f"({r['small_loo']['z']:+.1f}) | {r['loo']:.3f} ± {r['loo_se']:.3f}, {r['loo_paired']['difference']:.3f} ± "
              f"{r['loo_paired']['se']:.3f} ({r['loo_paired']['z']:+.1f}) |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
