"""When does PSIS k̂ enter the reliability verdict? False alarms on tiny steps against detection of heavy tails.

    python bench/khat_rule.py                    # 200 batches per setting, B 8 × G 4 (≈ 1 min on 2 cores)
    python bench/khat_rule.py --batches 1000 --json out.json

k̂ is a generalised-Pareto fit to the largest weights; it is there to say when a few weights dominate the estimate.
With B·G = 32 log-weights the tail has M = 7 values and the fit's prior pulls k̂ towards 0.5, above the threshold
1 − 1/log10(32) = 0.336: on weights that are all within a few percent of each other it reports noise as a heavy tail.

Rules compared (each also needs N ≥ PSIS_MIN_SAMPLES = 21; ESS and non-finite checks are the same for all):

* ``range``: the old rule — k̂ assessed when max log w − min log w > 0.05.
* ``ratio``: the new rule — k̂ assessed when the largest weight exceeds KHAT_MIN_MAX_RATIO = 2 times the mean weight.
  Below that no weight can dominate: each carries at most 2/N of the total, and E[w²] ≤ max·E[w] ≤ 2·E[w]² gives a
  global Kish ESS/N ≥ 1/2 = MIN_ESS_FRACTION, whatever the tail's shape.

Settings, log w [B, G]:

* null steps: log w ~ N(0, σ²), σ ∈ {0, 0.01, 0.03, 0.1} (0 is an exact zero step) — every flag is a false alarm;
* heavy tails: log w = s·t_ν (Student-t, ν = 1, 2 and scale 1) and w ~ Pareto(α) (k = 1/α ∈ {0.7, 1.0}) —
  every batch truly has a dominating tail and should be flagged;
* the exact-enumeration policy (``bench/realised_exact.py``'s, V = 6, T = 3, head ×5): log w = S(θ⁺) − S(θ) of a
  real AdamW step on an update batch, evaluated on an independent batch of 8 prompts × 4 from the exact π_θ, at lr
  0.002 (a small step) and 0.3 / 1.0 (large steps).

Reported: the fraction flagged unreliable by the whole verdict (``weight_diagnostics``) and by k̂ alone.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from funcprobe.realised import diagnostics  # noqa: E402
from funcprobe.stats import psis_khat, psis_threshold  # noqa: E402

B, G = 8, 4


def verdicts(log_w: torch.Tensor) -> dict[str, tuple[bool, bool]]:
    """rule → (flagged by the verdict, flagged by k̂) for one [B, G] batch."""
    flat = log_w.reshape(-1)
    N = flat.numel()
    khat, threshold = psis_khat(flat), psis_threshold(N)
    ess_prompt = diagnostics._kish_fraction(log_w, dim=1)
    other = bool(ess_prompt.min() < diagnostics.MIN_ESS_FRACTION) or math.isnan(khat)
    log_ratio = float(flat.max() - (torch.logsumexp(flat, 0) - math.log(N)))
    assessed = {"range": N >= 21 and float(flat.max() - flat.min()) > 0.05,
                "ratio": N >= 21 and log_ratio > math.log(diagnostics.KHAT_MIN_MAX_RATIO)}
    out = {}
    for rule, on in assessed.items():
        by_khat = on and khat > threshold
        out[rule] = (other or by_khat, by_khat)
    library = diagnostics.weight_diagnostics(log_w)
    assert library.reliable == (not out["ratio"][0]), "the bench's 'ratio' rule must be the library's"
    return out


def synthetic(name: str, batches: int, generator: torch.Generator):
    for _ in range(batches):
        if name.startswith("normal"):
            sigma = float(name.split("=")[1])
            yield sigma * torch.randn(B, G, generator=generator, dtype=torch.float64)
        elif name.startswith("student"):
            df = float(name.split("=")[1])
            z = torch.randn(B, G, generator=generator, dtype=torch.float64)
            chi = torch.distributions.Chi2(torch.tensor(df, dtype=torch.float64)).sample((B, G))
            yield z / torch.sqrt(chi / df)
        elif name.startswith("pareto"):
            alpha = float(name.split("=")[1])
            u = torch.rand(B, G, generator=generator, dtype=torch.float64)
            yield -torch.log(u) / alpha  # log of Pareto(α) weights: w = u^(−1/α)
        else:
            raise ValueError(name)


def enumeration_log_weights(lr: float, batches: int, seed: int):
    """log w on independent evaluation batches from the exact π_θ, for real AdamW steps at ``lr``."""
    from conftest import warm_state

    from funcprobe import Policy
    from funcprobe.enumeration import exact_distribution, random_reward_table, sample_exact_batch
    from funcprobe.testing import tiny_peft_model
    from funcprobe.update import rl_update

    torch.manual_seed(seed)
    model = tiny_peft_model("qwen2", vocab_size=6, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                            dtype=torch.float64, seed=11)
    with torch.no_grad():
        model.get_base_model().get_output_embeddings().weight.mul_(5.0)
    policy = Policy.from_peft(model, seq_chunk=256)
    params = policy.params
    prompts = [[1, 2], [3, 4], [5, 0], [2, 2], [4, 1], [0, 3], [1, 5], [3, 0]]
    dist = exact_distribution(policy, params, prompts, 3)
    generator = torch.Generator().manual_seed(seed)
    rewards = random_reward_table(len(prompts), 6, 3, generator=generator)
    adam = warm_state(params, lr=lr, weight_decay=0.0)
    for _ in range(batches):
        update_batch, _ = sample_exact_batch(dist, 8, rewards=rewards, generator=generator)
        new_params, _ = rl_update(params, update_batch, policy=policy, adam=adam)
        evaluation, _ = sample_exact_batch(dist, G, rewards=rewards, generator=generator)
        before = policy.sequence_logprobs(params, evaluation)
        after = policy.sequence_logprobs(new_params, evaluation)
        yield after - before


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--enumeration-batches", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(args.seed)
    settings = [f"normal σ={s}" for s in (0.0, 0.01, 0.03, 0.1)] + \
               ["student ν=1", "student ν=2", "pareto α=1.43", "pareto α=1.0"]
    sources = {name: (lambda name=name: synthetic(name.replace("σ", "").replace("ν", "").replace("α", "")
                                                  .replace(" ", ""), args.batches, generator)) for name in settings}
    for lr in (0.002, 0.3, 1.0):
        sources[f"enumeration lr={lr}"] = (lambda lr=lr: enumeration_log_weights(lr, args.enumeration_batches,
                                                                                   args.seed))
    rows = {}
    started = time.perf_counter()
    for name, source in sources.items():
        counts = {rule: [0, 0] for rule in ("range", "ratio")}
        n = 0
        ratios = []
        for log_w in source():
            n += 1
            flat = log_w.reshape(-1)
            ratios.append(float(torch.exp(flat.max() - (torch.logsumexp(flat, 0) - math.log(flat.numel())))))
            for rule, (flagged, by_khat) in verdicts(log_w).items():
                counts[rule][0] += flagged
                counts[rule][1] += by_khat
        ratios.sort()
        rows[name] = {"batches": n, "median_max_over_mean": ratios[n // 2],
                      **{f"{rule}_{kind}": counts[rule][i] / n for rule in counts
                         for i, kind in enumerate(("flagged", "khat"))}}
        row = rows[name]
        print(f"{name:22s} n={n:4d}  max w/mean w (median) {row['median_max_over_mean']:8.3f}   "
              f"old rule flagged {row['range_flagged']:.3f} (k̂ {row['range_khat']:.3f})   "
              f"new rule flagged {row['ratio_flagged']:.3f} (k̂ {row['ratio_khat']:.3f})", flush=True)
    out = {"B": B, "G": G, "threshold": psis_threshold(B * G), "max_ratio": diagnostics.KHAT_MIN_MAX_RATIO,
           "rows": rows, "seconds": time.perf_counter() - started}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
