"""δH₁ at a young AdamW state, against exact enumeration: is the gradient term still unbiased when P is built from
the batch's own gradient? (closing note of issues 12–13; spec §4–§5).

    python bench/young_adam_bias.py [--batches 3000]

Setting: tests/test_delta_h1_statistics.py's enumerable policy (V = 5, T = 3, a pool of 3 prompts, B = 16 prompt
slots × G = 4, Dr. GRPO advantages), its per-response gradient table and lookup (checked there to reproduce
``delta_h1`` exactly). For each batch: X_n, Y_n by lookup; the AdamW step from a state with t steps taken and
second moment v = v₀ (m = 0, weight decay 0), so P = 1/(sqrt(v′/bc2) + ε) with v′ = β₂v + (1 − β₂)Ȳ²; the
gradient term δ = −η_g U_cross(P) (what ``delta_h1`` reports) against the exact first-order change of THAT step,
∇H·Δθ_grad = −E[X]·(η_g P ⊙ Ȳ) (E[X] = −∇H exact). Reported: mean δ − mean truth over the batches, in Monte-Carlo
SEs and relative to the truth, for t = 0 (the first step: v₀ = 0, sign-like) and for t = 3, 30, 300 with v₀ = the
mean of Ȳ² over batches (a state that has seen gradients of this size). Beside it a candidate fix: each X_u against
the step the other U − 1 units would make, −(1/U) Σ_u X_u·(η_g P₋ᵤ ⊙ Ȳ₋ᵤ) with P₋ᵤ from v′ of Ȳ₋ᵤ (for a fixed P this
is exactly the U-statistic).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _statistics_module():
    sys.path.insert(0, str(ROOT / "tests"))
    spec = importlib.util.spec_from_file_location("delta_h1_statistics", ROOT / "tests" / "test_delta_h1_statistics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=0.01)
    args = parser.parse_args(argv)
    stats = _statistics_module()
    setup = getattr(stats.setup, "__wrapped__", None) or stats.setup.__pytest_wrapped__.obj
    setup = setup()
    from funcprobe.enumeration import exact_expected_x

    params = setup["params"]
    expected_x = exact_expected_x(setup["policy"], params, stats.PROMPTS, stats.T)
    ex = torch.cat([expected_x[n].reshape(-1) for n in params])
    prompt, response = stats.draw(setup, torch.Generator().manual_seed(7), args.batches)
    X, Y = stats.lookup_unit_vectors(setup, prompt, response)          # [N, B, D]
    ybar = Y.mean(1)
    beta1, beta2, eps, lr = 0.9, 0.999, 1e-8, args.lr
    v_scale = (ybar ** 2).mean(0)                                     # a state that has seen gradients this size
    rows = []
    for t, v0 in ((0, torch.zeros_like(v_scale)), (3, v_scale), (30, v_scale), (300, v_scale)):
        step = t + 1
        bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
        eta_g = lr * (1 - beta1) / bc1
        # v after t steps of gradients of this size: (1 − β2^t)·v0 (bias-free EMA of v0)
        v = (1 - beta2 ** t) * v0
        v_new = beta2 * v + (1 - beta2) * ybar ** 2                    # [N, D]
        P = 1 / ((v_new / bc2).sqrt() + eps)
        sum_x, sum_y = X.sum(1), Y.sum(1)
        U = X.shape[1]
        diag = (X * P[:, None] * Y).sum((1, 2))
        u_cross = ((sum_x * P * sum_y).sum(-1) - diag) / (U * (U - 1))
        delta = -eta_g * u_cross
        truth = (-ex * (eta_g * P * ybar)).sum(-1)                     # ∇H·Δθ_grad of this batch's step, ∇H = −E[X]
        # Leave-one-unit-out step: X_u against the step the other U − 1 units would make (their own Ȳ and v′).
        ybar_loo = (sum_y[:, None, :] - Y) / (U - 1)                   # [N, U, D]
        v_loo = beta2 * v + (1 - beta2) * ybar_loo ** 2
        P_loo = 1 / ((v_loo / bc2).sqrt() + eps)
        loo = -eta_g * (X * P_loo * ybar_loo).sum(-1).mean(1)
        diff = delta - truth
        diff_loo = loo - truth
        n = len(diff)
        share = float(((1 - beta2) * ybar ** 2 / v_new.clamp_min(1e-300)).mean())
        rows.append(dict(t=t, batch_share_of_v=share, mean_delta=float(delta.mean()), mean_truth=float(truth.mean()),
                         bias=float(diff.mean()), bias_se=float(diff.std() / math.sqrt(n)),
                         relative=float(diff.mean() / truth.mean()), loo_bias=float(diff_loo.mean()),
                         loo_se=float(diff_loo.std() / math.sqrt(n)), loo_relative=float(diff_loo.mean() / truth.mean())))
    print("| AdamW steps taken t | batch's share of v′ | mean δH₁ grad term | mean exact ∇H·Δθ_grad | bias | bias / MC SE "
          "| bias / truth | leave-one-unit-out step: bias / MC SE | bias / truth |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['t']} | {r['batch_share_of_v']:.3f} | {r['mean_delta']:.4g} | {r['mean_truth']:.4g} | "
              f"{r['bias']:.3g} | {r['bias'] / r['bias_se']:+.1f} | {r['relative']:+.2f} | "
              f"{r['loo_bias'] / r['loo_se']:+.1f} | {r['loo_relative']:+.3f} |")
    return {"rows": rows}


if __name__ == "__main__":
    main()
