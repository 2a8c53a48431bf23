"""``EntropyChangeCallback`` under two processes: a real ``GRPOTrainer`` run with DDP (gloo, CPU, loopback only).

Each run is two subprocesses of ``tests/trl_mp_worker.py`` with torchrun's environment (transformers' Trainer
initialises the process group; accelerate wraps the model in DDP). G = 4, 5 completions per device, two
micro-batches per process and step: every generation has a prompt whose completions are split across the processes
(asserted). Three runs, launched together: the callback on both ranks; rank 1 failing inside its measurement of
step 2; rank 1 failing in on_step_begin of step 2. Float64 model, so funcprobe's values equal a one-process
recomputation on the gathered rollouts to ~1e-14 (asserted 1e-9); TRL's ``entropy`` and gradient go through its
float32 LM-head kernel (entropy_per_token ~5e-8 from TRL's entropy, asserted 1e-5; step_match ~2e-7, asserted 1e-5).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ports import ATTEMPTS, free_port, lost_the_port

pytest.importorskip("trl", minversion="1.16")
pytest.importorskip("datasets")

from funcprobe.trl import PREFIX  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "trl_mp_worker.py"
STEPS = 3
RUNS = {"ok": (), "fail_measure": ("--fail-rank", "1", "--fail-in", "measure"),
        "fail_step_begin": ("--fail-rank", "1", "--fail-in", "step_begin")}


def _launch(out: Path, extra: tuple[str, ...], world: int = 2) -> list[subprocess.Popen]:
    port = free_port()
    base = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    pythonpath = os.pathsep.join(p for p in (str(ROOT), base.get("PYTHONPATH")) if p)
    procs = []
    for rank in range(world):
        env = dict(base, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
                   PYTHONPATH=pythonpath, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(out), *extra], env=env, cwd=ROOT,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    return procs


def _wait(procs: list[subprocess.Popen], deadline: float) -> list[tuple[int, str]]:
    results = []
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1.0))
            results.append((proc.returncode, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trl_mp")
    launched = {name: _launch(folder / f"{name}.pt", extra) for name, extra in RUNS.items()}
    deadline = time.monotonic() + 240.0  # a hang (a rank left waiting in a collective) fails here, not forever
    finished = {name: _wait(procs, deadline) for name, procs in launched.items()}
    for _ in range(ATTEMPTS - 1):  # a run whose port was taken meanwhile: again, on another port
        clashed = [name for name, results in finished.items() if lost_the_port(results)]
        if not clashed:
            break
        relaunched = {name: _launch(folder / f"{name}.pt", RUNS[name]) for name in clashed}
        finished.update({name: _wait(procs, time.monotonic() + 240.0) for name, procs in relaunched.items()})
    for name, results in finished.items():
        for rank, (code, err) in enumerate(results):
            assert code == 0, f"run {name}, rank {rank} failed (rc {code}):\n{err[-3000:]}"
    return {name: torch.load(folder / f"{name}.pt", weights_only=False) for name in RUNS}


def _rows(out):
    return {h["step"]: h for h in out["log_history"] if "loss" in h}


def test_every_step_is_measured_and_finite(outputs):
    out = outputs["ok"]
    assert out["world"] == 2 and out["steps"] == [STEPS, STEPS] and out["errors"] == [None, None]
    assert out["step_match_reason"] is None
    assert all(v["split"] >= 1 for v in out["offline"].values())  # a prompt's completions on both processes
    rows = _rows(out)
    assert sorted(rows) == list(range(1, STEPS + 1))
    for step, row in rows.items():
        for name in ("entropy_per_token", "step_match", "update_match", "overhead_s"):
            assert math.isfinite(row[PREFIX + name]), (step, name)
        if step == 1:
            assert PREFIX + "realised" not in row
            continue
        assert row[PREFIX + "first_step"] == row[PREFIX + "last_step"] == step - 1
        for name in ("realised", "realised_se", "realised_per_token", "first_order", "first_order_se", "difference",
                     "difference_se", "first_order_per_token", "first_order_per_token_se", "difference_per_token",
                     "difference_per_token_se", "entropy", "ess_min", "ess_mean", "reliable"):
            assert math.isfinite(row[PREFIX + name]), (step, name)


def test_entropy_per_token_is_trls_entropy_across_processes(outputs):
    rows = _rows(outputs["ok"])
    worst = max(abs(r[PREFIX + "entropy_per_token"] - r["entropy"]) / abs(r["entropy"]) for r in rows.values())
    print(f"\nentropy_per_token vs TRL's entropy (2 processes): max relative difference {worst:.1e}")
    assert worst <= 1e-5


def test_step_match_against_the_all_reduced_gradient(outputs):
    rows = _rows(outputs["ok"])
    assert all(r["grad_norm"] > 0.1 for r in rows.values())  # clipping active (max_grad_norm 0.1)
    step_match = [r[PREFIX + "step_match"] for r in rows.values()]
    update_match = [r[PREFIX + "update_match"] for r in rows.values()]
    print(f"\nstep_match {[f'{x:.1e}' for x in step_match]}  update_match {[f'{x:.1e}' for x in update_match]}")
    assert max(step_match) <= 1e-5 and max(update_match) <= 1e-6


def test_values_equal_a_one_process_recomputation_on_the_gathered_rollouts(outputs):
    out = outputs["ok"]
    rows = _rows(out)
    worst = 0.0
    for step, want in out["offline"].items():
        assert want["B"] == 5
        values = want["values"]
        assert len(values) == 12  # per response and per token: realised, first order, difference, with SEs
        for name, b in values.items():
            a = rows[step][PREFIX + name]
            scale = max(abs(a), abs(b))
            if name.startswith("difference"):  # relative to the two changes it is the difference of
                unit = name.removeprefix("difference")
                scale = max(scale, abs(values["realised" + unit]), abs(values["first_order" + unit]))
            assert abs(a - b) <= 1e-9 * scale, (step, name, a, b)
            worst = max(worst, abs(a - b) / scale)
    print(f"\nlogged (2 processes) vs one-process recomputation: max relative difference {worst:.1e}")


@pytest.mark.parametrize("run, where", [("fail_measure", "on_step_end"), ("fail_step_begin", "on_step_begin")])
def test_a_failure_on_one_rank_switches_every_rank_off_and_training_goes_on(outputs, run, where):
    out = outputs[run]
    assert out["steps"] == [STEPS, STEPS]                      # both ranks finished training (no hang)
    failed, peer = out["errors"][1], out["errors"][0]
    assert failed.startswith(where) and "injected failure on rank 1" in failed
    assert "PeerFailure" in peer and "rank(s) [1] failed" in peer and "injected failure" in peer
    rows = _rows(out)
    assert PREFIX + "entropy_per_token" in rows[1]              # step 1, before the failure
    assert not any(k.startswith(PREFIX) for s in (2, 3) for k in rows[s])
    # the training itself is the one of the run whose callback never failed
    ok = _rows(outputs["ok"])
    assert all(rows[s][k] == ok[s][k] for s in rows for k in ("loss", "grad_norm", "entropy"))
