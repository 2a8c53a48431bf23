"""Why the realised change needs its own samples: in-sample vs evaluation-batch estimators against the exact ΔH.

    python bench/realised_exact.py                          # 2000 replicates per setting (≈ 4 min per setting, 2 cores)
    python bench/realised_exact.py --replicates 300 --quick # one setting, a few hundred replicates
    python bench/realised_exact.py --json out.json

An exactly enumerable policy (spec §7): a Qwen2-architecture model with vocabulary V = 6, hidden 16, 1 layer, its LM
head scaled (default ×5, so that π_θ is far from uniform), float64 throughout; responses of T = 3 tokens (216 per
prompt); a pool of 6 prompts; a reward table (``random_reward_table``). Each replicate draws an update batch U of
G = 8 responses per pool prompt from the exact π_θ, takes a real AdamW step ``rl_update`` on it, computes the exact
H(θ⁺) − H(θ) by enumeration, and estimates it

* in-sample, on U itself (SNIS "none", "prompt", and "prompt" with the Rao-Blackwell integrand), and
* on an evaluation batch E drawn independently (6 prompts with replacement from the pool, 8 responses each, from the
  library's sampler): SNIS "none"/"prompt"/"prompt"+RB, and common random numbers with the Rao-Blackwell integrand
  (the default) and with −S.

Reported per estimator: bias = mean(ΔĤ − ΔH) and its z, the spread sd(ΔĤ − ΔH), the calibration sqrt(mean SE²) /
spread, and bias / mean ΔH. The settings vary the Adam state (fresh: the first step is sign-like; warm: m, v of a
few earlier steps) and the learning rate.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

SETTINGS = [("fresh", 0.01), ("warm", 0.002), ("warm", 0.01)]


def run(state: str, lr: float, replicates: int, head_scale: float, seed: int) -> dict:
    from conftest import warm_state

    from funcprobe import AdamState, Policy
    from funcprobe.enumeration import REALISED_ESTIMATORS, random_reward_table, realised_change_replicates
    from funcprobe.testing import tiny_peft_model

    model = tiny_peft_model("qwen2", vocab_size=6, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                            dtype=torch.float64, seed=11)
    with torch.no_grad():
        model.get_base_model().get_output_embeddings().weight.mul_(head_scale)
    policy = Policy.from_peft(model, seq_chunk=256)
    params = policy.params
    adam = warm_state(params, lr=lr, weight_decay=0.0) if state == "warm" else AdamState.zeros(params, lr=lr)
    pool = [[1, 2], [3, 4], [5, 0], [2, 2], [4, 1], [0, 3]]
    generator = torch.Generator().manual_seed(seed)
    rewards = random_reward_table(len(pool), 6, 3, generator=generator)
    started = time.perf_counter()
    study = realised_change_replicates(policy, params, adam, pool, 3, rewards, G=8, replicates=replicates,
                                       generator=generator)
    return {"state": state, "lr": lr, "head_scale": head_scale, "replicates": replicates,
            "seconds": time.perf_counter() - started, "mean_exact_deltaH": float(study.exact.mean()),
            "crn_changed_fraction": float(study.changed.mean()),
            "estimators": {name: study.summary(name) for name in REALISED_ESTIMATORS}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicates", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="only the first setting")
    parser.add_argument("--head-scale", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = []
    for state, lr in SETTINGS[:1] if args.quick else SETTINGS:
        result = run(state, lr, args.replicates, args.head_scale, args.seed)
        results.append(result)
        print(f"\n{state} Adam state, lr {lr}, head ×{args.head_scale:g}: {result['replicates']} replicates in "
              f"{result['seconds']:.0f} s; mean exact ΔH {result['mean_exact_deltaH']:.4g}; CRN changed "
              f"{result['crn_changed_fraction']:.3f}")
        print("| estimator | bias | z | spread | SE/spread | bias/ΔH |\n|---|---|---|---|---|---|")
        for name, s in result["estimators"].items():
            print(f"| {name} | {s['bias']:+.3g} | {s['z']:+.2f} | {s['spread']:.3g} | {s['se_over_spread']:.3f} | "
                  f"{s['bias_over_change']:+.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
