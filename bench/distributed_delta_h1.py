"""Distributed δH₁ (issue 6): bytes communicated per δH₁ vs B and the LoRA size, and wall time 1 vs 2 processes.

    python bench/distributed_delta_h1.py            # the full run (a few minutes on 2 cores)
    python bench/distributed_delta_h1.py --quick    # a smoke run (tiny sizes, seconds)
    python bench/distributed_delta_h1.py --json out.json

Each configuration runs in fresh processes launched here with torchrun's environment (RANK, WORLD_SIZE,
MASTER_ADDR=127.0.0.1, a free port; gloo on the CPU), every process with a timeout. Each process builds the same
random float32 Qwen2 + LoRA (``funcprobe.testing.tiny_peft_model``), the same random batch (B prompts × G) and the
same warm AdamW state, then times ``delta_h1(..., world=world)`` (units="prompt", seq_chunk=G) after a barrier.

Bytes: ``funcprobe.distributed.COMM`` counts the payload each rank hands to the collectives during one δH₁:
an all_reduce of ΣX and ΣY (2 · n_lora float64) and one all_gather of the 8 per-unit scalars of the rank's shard,
padded to the largest shard (8 · ceil(U/W) float64). Formula per rank: 16·n_lora + 64·ceil(U/W) bytes; over all W
ranks W times that (gloo's ring all_reduce moves about 2(W−1)/W of the payload per rank on the wire).
Nothing per-unit is sent beyond the 8 scalars; the LoRA-sized part does not depend on B.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _worker(config: dict) -> dict:
    import warnings

    import torch

    torch.set_num_threads(int(config["threads"]))
    from funcprobe import AdamState, Policy
    from funcprobe.delta_h1 import delta_h1
    from funcprobe.distributed import COMM, barrier, init_from_env, shutdown
    from funcprobe.testing import random_batch, tiny_peft_model

    world = init_from_env(timeout_s=120)
    try:
        model = tiny_peft_model("qwen2", r=config["r"], hidden_size=config["hidden"], num_layers=config["layers"],
                                vocab_size=config["vocab"], seed=0)
        policy = Policy.from_peft(model)
        params = policy.params
        n_lora = sum(t.numel() for t in params.values())
        adam = AdamState.zeros(params, lr=1e-3, weight_decay=0.0)
        batch = random_batch(config["B"], config["G"], vocab_size=config["vocab"], prompt_len=(8, 16),
                             response_len=(config["T"], config["T"]), seed=1)
        times = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(config["repeats"]):
                barrier(world)
                COMM.reset()
                start = time.perf_counter()
                result = delta_h1(params, batch, policy=policy, adam=adam, seq_chunk=config["G"], world=world)
                barrier(world)
                times.append(time.perf_counter() - start)
        return {"rank": world.rank, "world": world.size, "n_lora": n_lora, "wall_s": min(times), "walls": times,
                "comm": COMM.snapshot(), "deltaH1": result.deltaH1, "U_cross": result.U_cross}
    finally:
        shutdown(world)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(config: dict, world: int, threads: int, timeout: float = 600) -> dict:
    """Launch ``world`` processes (1: no process group) and return rank 0's report (+ every rank's bytes)."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
        env.update(OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
        if world > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        payload = json.dumps({**config, "threads": threads})
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", payload], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            for other in procs:
                if other.poll() is None:
                    other.kill()
            raise RuntimeError(f"worker failed:\n{err[-3000:]}")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    head = dict(reports[0])
    head["bytes_per_rank"] = [r["comm"]["bytes_sent"] for r in reports]
    return head


def formula_bytes(n_lora: int, U: int, world: int) -> int:
    return 16 * n_lora + 64 * -(-U // world)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--skip-bytes", action="store_true", help="only the wall-time comparison")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(_worker(json.loads(args.worker))), flush=True)
        sys.stderr.flush()
        os._exit(0)  # skip the interpreter teardown (see funcprobe/__main__.py)
    cores = os.cpu_count()
    base = dict(hidden=32, layers=1, vocab=64, G=2, T=2, repeats=1) if args.quick else \
        dict(hidden=64, layers=2, vocab=256, G=4, T=16, repeats=1)
    Bs = [4, 8] if args.quick else [4, 16, 64]
    rs = [2, 4] if args.quick else [4, 16, 64]
    rows = []
    print(f"bytes per δH₁, 2 processes (gloo, CPU; {cores} cores)")
    print("| B | LoRA r | LoRA scalars | bytes/rank measured | formula 16·n + 64·ceil(B/2) | bytes, both ranks |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in ([] if args.skip_bytes else rs):
        for B in Bs:
            if not args.quick and r != rs[1] and B != Bs[1]:
                continue  # a cross: B varies at the middle r, r varies at the middle B
            rep = run({**base, "B": B, "r": r}, world=2, threads=1)
            expected = formula_bytes(rep["n_lora"], B, 2)
            assert max(rep["bytes_per_rank"]) == expected, (rep["bytes_per_rank"], expected)
            rows.append({"B": B, "r": r, "n_lora": rep["n_lora"], "bytes_per_rank": rep["bytes_per_rank"],
                         "formula": expected})
            print(f"| {B} | {r} | {rep['n_lora']:,} | {max(rep['bytes_per_rank']):,} | {expected:,} | "
                  f"{sum(rep['bytes_per_rank']):,} |")
    timing_config = {**base, "B": 8 if args.quick else 16, "r": rs[1], "repeats": 1 if args.quick else 3,
                     "T": base["T"] if args.quick else 64, "hidden": base["hidden"] if args.quick else 256}
    print(f"\nwall time of one δH₁ (min of {timing_config['repeats']}), B={timing_config['B']}, G={timing_config['G']}, "
          f"T={timing_config['T']}, hidden={timing_config['hidden']}, r={timing_config['r']}; {cores} CPU cores")
    timing = {}
    for label, world, threads in (("1 process × 1 thread", 1, 1), ("1 process × 2 threads", 1, 2),
                                  ("2 processes × 1 thread", 2, 1)):
        rep = run(timing_config, world=world, threads=threads)
        timing[label] = rep
        print(f"- {label}: {rep['wall_s']:.3f} s (deltaH1 {rep['deltaH1']:.9g})")
    one, two = timing["1 process × 1 thread"]["wall_s"], timing["2 processes × 1 thread"]["wall_s"]
    one2 = timing["1 process × 2 threads"]["wall_s"]
    print(f"- ratio 1 process (1 thread) / 2 processes: {one / two:.2f}×; 1 process (2 threads) / 2 processes: "
          f"{one2 / two:.2f}×")
    if args.json:
        Path(args.json).write_text(json.dumps({"bytes": rows, "timing": timing, "cores": cores}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
