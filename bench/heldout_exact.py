"""δĤ₁(E) against exact enumeration, the table for the closing note (spec §7, §9; tests/test_heldout_exact.py).

    python bench/heldout_exact.py [--batches 2000] [--paired-batches 2000] [--vocab 6]

Setting: tests/test_heldout_exact.py's enumerable policy (V = 6, T = 3, a pool of 3 prompts, float64, a peaked head)
and its lookups, which that test ties to the real code (``rl_update``, ``delta_h1_heldout``, ``delta_h1``,
``snis_delta_h``, ``paired_difference``) to 1e-9. Per batch: an update batch U (6 prompt slots × 8 draws from the
exact π_θ, Dr. GRPO advantages), its AdamW step at age t (lr 1e-2, β = (0.9, 0.999), ε = 1e-8, m = 0, wd 0,
v = (1 − β₂^t)·v₀, v₀ the mean Ȳ² of pilot batches; t = 0: v = 0) and an independent evaluation batch E (6 × 8). The
truth is the exact first-order change of that step, ∇H·Δθ (∇H exact, H the pool mean of sequence entropies).

Rows per t: δĤ₁(E) with the Rao-Blackwell and the sequence integrand; for comparison δH₁'s gradient term
−η_g U_cross(P) (spec §5, on U itself), the retired deltaH1_loo's leave-one-unit-out step (on U) and the Rao-Blackwell D_n
evaluated on U itself instead of E (what independence buys). Columns: bias = mean(estimate − truth) in units of
|mean truth|, its z (over the Monte-Carlo SE), the spread sd(estimate − truth) and, where the estimator reports an
SE, calibration = spread / rms(SE) (1 = the SE is right).

The paired rows (the same U and E): ΔĤ − δĤ₁(E) (SNIS per prompt with the Rao-Blackwell integrand, paired per prompt
with D_n) minus its exact counterpart ΔH − ∇H·Δθ (ΔH = H(θ⁺) − H(θ) exactly), in units of |mean counterpart|; beside
it ΔĤ alone against ΔH, and the leading-order bias of per-prompt self-normalisation, −(1/G_E)·E[(∇S·Δθ)(R − E R)]
(R = Σ_k h_k), evaluated exactly from the tables. The paired rows need one enumeration forward at each θ⁺.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _exact_module():
    sys.path.insert(0, str(ROOT / "tests"))
    spec = importlib.util.spec_from_file_location("heldout_exact", ROOT / "tests" / "test_heldout_exact.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(name, errors, scale, ses=None):
    n = errors.numel()
    spread = float(errors.std())
    bias = float(errors.mean())
    return dict(name=name, bias=bias, relative=bias / scale, z=bias / (spread / math.sqrt(n)), spread=spread,
                calibration=None if ses is None else spread / float(ses.pow(2).mean().sqrt()), batches=n)


def _snis_first_order_bias(hx, data, delta):
    """−(1/G_E) Σ_p (1/POOL) Σ_r p_r s_r (R_r − E_p R), s = ∇S·Δθ: per batch [N]."""
    p = data["S"].exp()
    s = torch.einsum("prd,nd->npr", data["grad_S"], delta)
    R = data["ent"].sum(-1)
    centred = R - (p * R).sum(-1, keepdim=True)
    return -(p * s * centred).sum(-1).mean(-1) / hx.G_E


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--paired-batches", type=int, default=2000)
    parser.add_argument("--vocab", type=int, default=6, help="V (the test uses 6; 5 shows a smaller RB gain)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(1)
    hx = _exact_module()
    hx.V, hx.NR = args.vocab, args.vocab ** hx.T
    data = hx.build_setup()
    prompt, response = hx.draw(data, torch.Generator().manual_seed(100), 400, hx.B, hx.G)
    data["v0"] = (hx.update_vectors(data, prompt, response)["ybar"] ** 2).mean(0)
    ages, paired_rows = {}, {}
    for t in hx.AGES:
        b = hx.step_batches(data, t, args.batches, seed=7000 + t)
        truth = b["truth"]
        scale = abs(float(truth.mean()))
        rows = []
        for integrand in ("rao_blackwell", "sequence"):
            r = b["heldout"][integrand]
            rows.append(_row(f"δĤ₁(E), {integrand.replace('_', '-')}", r["value"] - truth, scale, r["se"]))
        ustat = hx.u_statistic(b["X"], b["Y"], b["P"], b["eta_g"])
        rows.append(_row("δH₁ grad term −η_g U_cross (on U)", ustat - truth, scale))
        loo = hx.leave_one_unit_out(b["X"], b["Y"], t, data, b["eta_g"])
        rows.append(_row("leave-one-unit-out step (on U; the retired deltaH1_loo)", loo - truth, scale))
        own = hx.heldout_lookup(data, b["delta"], b["u_prompt"], b["u_response"])["rao_blackwell"]
        rows.append(_row("Rao-Blackwell D_n on U itself", own["value"] - truth, scale, own["se"]))
        ages[t] = dict(mean_truth=float(truth.mean()), eta_g=b["eta_g"], rows=rows,
                       rb_over_sequence=rows[0]["spread"] / rows[1]["spread"])
        if args.paired_batches:
            k = min(args.paired_batches, args.batches)
            S_plus, ent_plus, entropy = hx.exact_after(data, b["delta"][:k])
            exact_change = entropy - data["dist"].mean_entropy
            counterpart = exact_change - truth[:k]
            realised = hx.realised_lookup(data, S_plus, ent_plus, b["e_prompt"][:k], b["e_response"][:k])
            paired = realised - b["heldout"]["rao_blackwell"]["per_prompt"][:k]
            se = paired.std(1) / math.sqrt(hx.B_E)
            predicted = float(_snis_first_order_bias(hx, data, b["delta"][:k]).mean())
            c_scale = abs(float(counterpart.mean()))
            pair = _row("ΔĤ − δĤ₁(E) vs ΔH − ∇H·Δθ", paired.mean(1) - counterpart, c_scale, se)
            alone = _row("ΔĤ vs ΔH", realised.mean(1) - exact_change, abs(float(exact_change.mean())),
                         realised.std(1) / math.sqrt(hx.B_E))
            mc = pair["spread"] / math.sqrt(k)
            paired_rows[t] = dict(mean_exact_change=float(exact_change.mean()), mean_truth=float(truth[:k].mean()),
                                  mean_counterpart=float(counterpart.mean()),
                                  counterpart_z=float(counterpart.mean()) / mc, predicted_snis_bias=predicted,
                                  rows=[pair, alone])

    print(f"V = {hx.V}, T = {hx.T}, pool {hx.POOL}; U {hx.B}×{hx.G}, E {hx.B_E}×{hx.G_E}; lr {hx.LR}; "
          f"{args.batches} batches per t")
    print("| t | estimator | mean truth ∇H·Δθ | bias / |truth| | z | spread | spread / rms SE |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for t, age in ages.items():
        for r in age["rows"]:
            cal = "" if r["calibration"] is None else f"{r['calibration']:.3f}"
            print(f"| {t} | {r['name']} | {age['mean_truth']:.4g} | {r['relative']:+.4f} | {r['z']:+.2f} | "
                  f"{r['spread']:.4g} | {cal} |")
    print()
    print("| t | Rao-Blackwell spread / sequence spread |\n|---:|---:|")
    for t, age in ages.items():
        print(f"| {t} | {age['rb_over_sequence']:.3f} |")
    if paired_rows:
        print()
        print(f"Paired difference ({min(args.paired_batches, args.batches)} batches per t): bias in units of |mean "
              "exact counterpart| (resp. |mean ΔH|)")
        print("| t | mean ΔH | mean ∇H·Δθ | mean ΔH − ∇H·Δθ (in MC SEs) | row | bias / |target| | z | spread | "
              "spread / rms SE | SNIS 1st-order bias (in MC SEs) |")
        print("|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
        for t, pr in paired_rows.items():
            for r in pr["rows"]:
                in_se = pr["predicted_snis_bias"] * math.sqrt(r["batches"]) / r["spread"]
                print(f"| {t} | {pr['mean_exact_change']:.4g} | {pr['mean_truth']:.4g} | "
                      f"{pr['mean_counterpart']:.4g} ({pr['counterpart_z']:+.1f}) | {r['name']} | "
                      f"{r['relative']:+.4f} | {r['z']:+.2f} | {r['spread']:.4g} | {r['calibration']:.3f} | "
                      f"{pr['predicted_snis_bias']:+.3g} ({in_se:+.2f}) |")
    total = time.perf_counter() - started
    print(f"\ntotal {total:.0f} s, torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    return {"ages": ages, "paired": paired_rows, "seconds": total}


if __name__ == "__main__":
    main()
