"""What the objective costs δH₁: per-token cotangents against the per-sequence path, and β > 0 (the KL reference).

    python bench/speed_objective.py                 # configurations a and b of speed_delta_h1.py, 3 repeats
    python bench/speed_objective.py --quick         # a smoke run: tiny model, one repeat, a few seconds
    python bench/speed_objective.py --configs b --repeats 5 --json out.json

Everything runs in ONE process on the same model, batch and AdamW state as ``bench/speed_delta_h1.py`` (its
``build``: random Qwen2, LoRA r = 16, float32; B = 4 prompts × G = 4 responses of 64–128 tokens), with
``delta_h1(..., units="prompt", store_unit_vectors=True, seq_chunk=SC)`` for SC ∈ {1, G}. Methods:

* ``per-sequence``: Dr. GRPO, no KL (``Objective()``). Its cotangent c = A/(N·L) is constant along each sequence,
  so at SC = 1 δH₁ takes its per-sequence path: one backward per sequence gives ∇S, which serves X and Y alike
  (``StepCotangent.per_sequence``, ``delta_h1._per_sequence_prompt``). At SC = G there is no such path: one forward
  and two vjps per prompt (X's per-sequence cotangent, Y's per-token one).
* ``per-token``: the same objective and numbers, with the per-token path forced by giving the same advantages per
  token (``batch.token_advantages`` = A broadcast over the response): at SC = 1 one forward and two vjps per sequence.
  At SC = G the path is the same as per-sequence's; the row measures what the per-token gather costs.
* ``β=0.04``: Dr. GRPO with the KL term (bias-corrected κ = ℓ − ℓ_ref): one extra no-grad forward of the batch with
  the adapter disabled (``timings["reference_s"]``), and the per-token path (κ varies along a sequence).

Ratios are of median wall times against ``per-sequence`` at the same SC, so the SC = 1 ratios are the cost of
per-token cotangents where the per-sequence path applies and the β rows the cost of the KL term. The β = 0 methods
must give the same δH₁ (to ``--rtol`` on the scale of the terms it is summed from; the script exits 1 otherwise).

Timing: one untimed warm-up of every method, then ``--repeats`` round-robin repeats; threads min(2, cores), 1 with
``--quick``. Medians of wall time and of the process's CPU time (all threads): on a shared machine the CPU time is
the steadier of the two, since waiting for a core does not count.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from speed_delta_h1 import CONFIGS, build, parse_bench_args  # noqa: E402 (also puts the repo on sys.path)

from funcprobe import Objective, delta_h1  # noqa: E402

RTOL = 1e-5
BETA = 0.04


def methods_for(G: int) -> list[tuple[str, int]]:
    return [(name, sc) for sc in (1, G) for name in ("per-sequence", "per-token", f"β={BETA:g}")]


def run(policy, batch, adam, method: str, seq_chunk: int) -> dict:
    """One δH₁ evaluation; wall and process CPU time."""
    objective = Objective(beta=BETA) if method.startswith("β") else Objective()
    if method == "per-token":
        batch = batch.replace(token_advantages=batch.advantages[:, :, None] * batch.response_mask)
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    result = delta_h1(policy.params, batch, policy=policy, adam=adam, objective=objective, units="prompt",
                      seq_chunk=seq_chunk, store_unit_vectors=True)
    return dict(wall_s=time.perf_counter() - wall, cpu_s=time.process_time() - cpu, deltaH1=result.deltaH1,
                U_cross=result.U_cross, grad_term=result.grad_term, state_term=result.state_term,
                eta_g=result.eta_g, forward_passes=result.forward_passes, backward_passes=result.backward_passes,
                reference_s=result.timings.get("reference_s", 0.0))


def benchmark(key: str, batch_shape: dict, repeats: int, warmup: bool, log) -> dict:
    config = CONFIGS[key]
    policy, batch, adam = build(config, batch_shape)
    methods = methods_for(batch.G)
    log(f"[{config['label']}] {policy.num_params:,} LoRA scalars, L = {batch.L}, "
        f"{int(batch.response_mask.sum())} response tokens")

    def once(method, seq_chunk):
        out = run(policy, batch, adam, method, seq_chunk)
        log(f"  {method:12s} seq_chunk={seq_chunk}: {out['wall_s']:.2f} s wall (reference forward "
            f"{out['reference_s']:.2f} s), load {os.getloadavg()[0]:.2f}")
        return out

    first = {m: once(*m) for m in methods}
    timed = {key: {m: ([] if warmup else [first[m][key]]) for m in methods}
             for key in ("wall_s", "cpu_s", "reference_s")}
    for _ in range(repeats - (0 if warmup else 1)):
        for m in methods:
            out = once(*m)
            for measure, values in timed.items():
                values[m].append(out[measure])
    walls, cpus = timed["wall_s"], timed["cpu_s"]
    base = first[("per-sequence", 1)]
    # δH₁ = −η_g U_cross + state term: its float32 error is on the scale of the terms it is computed from.
    scale = abs(base["grad_term"]) + abs(base["state_term"])
    rows = []
    for m in methods:
        out = first[m]
        median, cpu = statistics.median(walls[m]), statistics.median(cpus[m])
        base_m = ("per-sequence", m[1])
        rows.append(dict(config=key, label=config["label"], method=m[0], seq_chunk=m[1], median_s=median,
                         walls_s=walls[m], ratio=median / statistics.median(walls[base_m]), median_cpu_s=cpu,
                         cpus_s=cpus[m], cpu_ratio=cpu / statistics.median(cpus[base_m]),
                         reference_s=statistics.median(timed["reference_s"][m]), forward_passes=out["forward_passes"],
                         backward_passes=out["backward_passes"], deltaH1=out["deltaH1"],
                         scaled_diff=abs(out["deltaH1"] - base["deltaH1"]) / scale))
    return dict(config=key, label=config["label"], lora_scalars=policy.num_params, batch=dict(batch_shape, L=batch.L),
                response_tokens=int(batch.response_mask.sum()), rows=rows)


def report(results: list[dict], rtol: float) -> tuple[str, bool]:
    lines = ["| config | method | seq_chunk | median wall s | × per-sequence (same seq_chunk) | median CPU s | "
             "CPU × per-sequence | reference forward s | forward passes | backward passes | deltaH1 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    agree = True
    worst = 0.0
    for result in results:
        for row in result["rows"]:
            lines.append(f"| {row['config']} | {row['method']} | {row['seq_chunk']} | {row['median_s']:.3f} | "
                         f"{row['ratio']:.2f}× | {row['median_cpu_s']:.3f} | {row['cpu_ratio']:.2f}× | "
                         f"{row['reference_s']:.3f} | {row['forward_passes']} | "
                         f"{row['backward_passes']} | {row['deltaH1']:.8e} |")
            if not row["method"].startswith("β"):
                worst = max(worst, row["scaled_diff"])
    agree = worst <= rtol
    lines.append("")
    lines.append(f"- β = 0 methods give the same δH₁ (difference on the scale of |grad term| + |state term|, "
                 f"tolerance {rtol:g}): worst {worst:.1e}: {'PASS' if agree else 'FAIL'}")
    for result in results:
        rows = {(r["method"], r["seq_chunk"]): r for r in result["rows"]}
        G = result["batch"]["G"]
        kl1, klG = rows[(f"β={BETA:g}", 1)], rows[(f"β={BETA:g}", G)]
        lines.append(f"- {result['label']} (wall / CPU): per-token cotangents cost "
                     f"{rows[('per-token', 1)]['ratio']:.2f}× / {rows[('per-token', 1)]['cpu_ratio']:.2f}× the "
                     f"per-sequence path at seq_chunk=1 and {rows[('per-token', G)]['ratio']:.2f}× / "
                     f"{rows[('per-token', G)]['cpu_ratio']:.2f}× at seq_chunk={G}; β > 0 costs {kl1['ratio']:.2f}× / "
                     f"{kl1['cpu_ratio']:.2f}× (seq_chunk=1) and {klG['ratio']:.2f}× / {klG['cpu_ratio']:.2f}× "
                     f"(seq_chunk={G}), of which "
                     f"the reference forward is {kl1['reference_s']:.2f} s / {klG['reference_s']:.2f} s "
                     f"({result['lora_scalars']:,} LoRA scalars, {result['response_tokens']} response tokens)")
    return "\n".join(lines), agree


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rtol", type=float, default=RTOL, help="tolerance of the equality check")
    args, keys, repeats, batch_shape = parse_bench_args(parser, argv)

    def log(message):
        print(message, file=sys.stderr, flush=True)

    load = os.getloadavg()[0]
    started = time.perf_counter()
    results = [benchmark(k, batch_shape, repeats, warmup=not args.quick, log=log) for k in keys]
    text, agree = report(results, args.rtol)
    print(text)
    print(f"- load average (1 min) at start {load:.2f}, at end {os.getloadavg()[0]:.2f}; torch "
          f"{torch.__version__}, {torch.get_num_threads()} thread(s); total {time.perf_counter() - started:.0f} s; "
          f"{repeats} timed repeat(s) per method{'' if args.quick else ' after one warm-up'}")
    if args.json:
        args.json.write_text(json.dumps(dict(load_at_start=load, torch=torch.__version__,
                                             threads=torch.get_num_threads(), results=results), indent=1) + "\n")
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
