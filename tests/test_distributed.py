"""Issue 6: the probe on several processes (gloo, CPU, loopback only) equals the probe in one process.

Workers are plain subprocesses with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, a free
MASTER_PORT) running ``tests/distributed_worker.py``; the CLI test goes through ``python -m torch.distributed.run``.
Every subprocess has a timeout. Float64 tiny model throughout.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ports import ATTEMPTS, free_port, lost_the_port

from funcprobe.distributed import gather_rows, shard_counts, shard_prompts, SINGLE

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed_worker.py"
REL = 1e-12
#: Per-rank bookkeeping, documented as not equal across world sizes.
PER_RANK = {"timings", "peak_memory_bytes", "peak_memory_kind", "chunk_peak_bytes", "forward_passes",
            "backward_passes", "sequences_forwarded", "stored_unit_vectors"}


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    return env


def _launch(world: int, out: Path, *extra: str, timeout_s: float = 20.0) -> list[subprocess.Popen]:
    """Start ``world`` worker processes (world 1: a plain process, no process group)."""
    if world == 1:
        return [subprocess.Popen([sys.executable, str(WORKER), str(out), *extra], env=_env(), cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    port = free_port()
    procs = []
    for rank in range(world):
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), FUNCPROBE_DIST_TIMEOUT=str(timeout_s))
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(out), *extra], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _wait(procs: list[subprocess.Popen], timeout: float = 300.0) -> list[tuple[int, str]]:
    deadline = time.monotonic() + timeout
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
    """The worker's results for 1, 2 and 3 processes (launched together)."""
    folder = tmp_path_factory.mktemp("dist")
    launched = {n: _launch(n, folder / f"w{n}.pt") for n in (1, 2, 3)}
    finished = {n: _wait(procs) for n, procs in launched.items()}
    for _ in range(ATTEMPTS - 1):  # a world whose port was taken meanwhile: again, on another port
        clashed = [n for n, results in finished.items() if lost_the_port(results)]
        if not clashed:
            break
        finished.update({n: _wait(_launch(n, folder / f"w{n}.pt")) for n in clashed})
    for n, results in finished.items():
        for rank, (code, err) in enumerate(results):
            assert code == 0, f"world {n} rank {rank} failed:\n{err[-3000:]}"
    loaded = {n: torch.load(folder / f"w{n}.pt", weights_only=False) for n in (1, 2, 3)}
    assert loaded[1]["world_size"] == 1 and loaded[2]["world_size"] == 2 and loaded[3]["world_size"] == 3
    return loaded


def _compare(got, want, path: str = "") -> None:
    if isinstance(want, dict):
        assert set(got) == set(want), path
        for key in want:
            if key in PER_RANK or key.endswith("_bytes"):
                continue
            _compare(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), path
        for i, (a, b) in enumerate(zip(got, want)):
            _compare(a, b, f"{path}[{i}]")
    elif isinstance(want, torch.Tensor):
        assert got.shape == want.shape and got.dtype == want.dtype, path
        if want.dtype.is_floating_point:
            torch.testing.assert_close(got, want, rtol=REL, atol=0, msg=path)
        else:
            assert torch.equal(got, want), path
    elif isinstance(want, float):
        if math.isnan(want):
            assert math.isnan(got), path
        else:
            assert got == pytest.approx(want, rel=REL, abs=0), path
    elif hasattr(want, "input_ids"):  # a RolloutBatch
        for name in ("input_ids", "attention_mask", "response_mask", "advantages", "length_norm", "logprobs",
                     "rewards"):
            _compare(getattr(got, name), getattr(want, name), f"{path}.{name}")
        assert got.pad_token_id == want.pad_token_id
    else:
        assert got == want, (path, got, want)


# --------------------------------------------------------------------------------------------------- pure helpers
def test_shards_cover_the_prompts_in_order():
    for B in range(0, 12):
        for world in range(1, 5):
            shards = [shard_prompts(B, r, world) for r in range(world)]
            assert [i for s in shards for i in s] == list(range(B))
            assert [len(s) for s in shards] == shard_counts(B, world)
            assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_single_process_world_is_a_no_op():
    rows = torch.arange(6.0).reshape(3, 2)
    assert gather_rows(SINGLE, rows, [3]) is rows
    assert SINGLE.shard(5) == range(5)


# ------------------------------------------------------------------------------------------------ 2 and 3 ranks
@pytest.mark.parametrize("world", [2, 3])
def test_heldout_equals_single_process(outputs, world):
    """δĤ₁(E) of spec §9 on 2 and 3 ranks (B_E = 5 prompts, shards of unequal size) = 1 process to 1e-9."""
    got, want = outputs[world]["heldout"], outputs[1]["heldout"]
    assert want["deltaH1"] != 0 and want["grad_term"] != 0
    for key in ("deltaH1", "se", "grad_term", "state_term", "se_grad", "se_state", "entropy", "entropy_per_token"):
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=0), key
    for key in ("per_prompt", "per_prompt_grad", "per_prompt_state"):
        torch.testing.assert_close(torch.tensor(got[key], dtype=torch.float64),
                                   torch.tensor(want[key], dtype=torch.float64), rtol=1e-9, atol=0)
    for name, tensor in want["gradient"].items():
        torch.testing.assert_close(got["gradient"][name], tensor, rtol=1e-9, atol=1e-18)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("key", ["prompt_B5", "blocks_B6"])
def test_delta_h1_equals_single_process(outputs, world, key):
    """B=5 prompt units (not divisible by 2 or 3) and B=6 in 3 blocks of 2 (2 ranks: 2+1 blocks)."""
    _compare(outputs[world][key], outputs[1][key], key)
    assert outputs[world][key]["n_units"] == outputs[1][key]["n_units"]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("key", ["snis_prompt", "snis_global", "snis_none", "snis_rb_global_tok", "update", "crn"])
def test_delta_h_and_step_equal_single_process(outputs, world, key):
    _compare(outputs[world][key], outputs[1][key], key)
    if key == "crn":  # the redraw at θ⁺ changed some draws, so the comparison covers the redraw's sharding
        assert 0 < outputs[1][key]["changed_fraction"] < 1


@pytest.mark.parametrize("world", [2, 3])
def test_same_seed_same_global_batch(outputs, world):
    _compare(outputs[world]["sampled"], outputs[1]["sampled"], "sampled")


def test_delta_h1_communication_is_two_sums_and_the_unit_scalars(outputs):
    """Bytes sent per rank per δH₁: ΣX and ΣY (2·8·n_params) + 7 float64 per unit of the largest shard."""
    for world in (2, 3):
        for key, U in (("prompt_B5", 5), ("blocks_B6", 3)):
            sent = outputs[world][key + "_bytes"]
            n_params = sent["by_op"]["all_reduce"] // 16
            assert sent["by_op"]["all_gather"] == 8 * 7 * max(shard_counts(U, world))
            assert sent["calls"] == 2
    assert outputs[1]["prompt_B5_bytes"]["bytes_sent"] == 0
    assert n_params > 0


# ------------------------------------------------------------------------------------------------------ failures
@pytest.mark.parametrize("world,fail_rank", [(2, 1), (3, 0)])
def test_a_failing_rank_ends_every_rank_with_an_error_naming_it(tmp_path, world, fail_rank):
    started = time.monotonic()
    results = _wait(_launch(world, tmp_path / "never.pt", "--fail-rank", str(fail_rank), timeout_s=20.0),
                    timeout=280.0)
    elapsed = time.monotonic() - started
    # no hang: far below the 300 s default collective timeout, with room for slow process start-up under load
    assert elapsed < 240, f"took {elapsed:.0f}s"
    assert not (tmp_path / "never.pt").exists()
    for rank, (code, err) in enumerate(results):
        assert code != 0, f"rank {rank} exited 0"
        if rank == fail_rank:
            assert f"rank {rank} error: injected failure" in err
        else:
            assert f"rank {rank}/{world}:" in err and f"rank {fail_rank}" in err.split(f"rank {rank}/{world}:")[1], \
                err[-2000:]


# ----------------------------------------------------------------------------------------------------------- CLI
def test_torchrun_probe_equals_one_process(tiny_run, tmp_path):
    """``torchrun --nproc_per_node=2 -m funcprobe probe`` writes (on rank 0 only) the single process's numbers."""
    checkpoint = max(Path(tiny_run["out"]).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    argv = ["probe", str(checkpoint), "-B", "5", "-G", "3", "--max-new-tokens", "5", "--quiet", "--dtype",
            "float64", "--eta-sweep", "1e-3,1e-2", "--dist-timeout", "30", "--realised", "both", "--in-sample"]
    one = subprocess.run([sys.executable, "-m", "funcprobe", *argv, "--out", str(tmp_path / "one.json")],
                         env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(free_port()), "-m", "funcprobe", *argv,
                          "--out", str(tmp_path / "two.json")],
                         env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1 and two.stdout.count("checkpoint:") == 1  # rank 1 is quiet
    a, b = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    assert b["distributed"]["world_size"] == 2 and a["distributed"]["world_size"] == 1
    for section in ("batch", "eval_batch", "delta_h1", "step", "realised", "in_sample", "lr_sweep", "summary"):
        _compare_json(b[section], a[section], section)
    assert a["realised"]["crn"]["deltaH"] != 0 and a["realised"]["snis"]["deltaH"] != 0


def _compare_json(got, want, path):
    if isinstance(want, dict):
        for key in want:
            # recorded_logprobs: the check of the sampler's own S (a diagnostic of its rounding, which depends on
            # which prompts were decoded together) — the estimates never use it.
            if key in PER_RANK or key in ("timings", "forward_passes", "recorded_logprobs"):
                continue
            _compare_json(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (a, b) in enumerate(zip(got, want)):
            _compare_json(a, b, f"{path}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-10, abs=1e-300), path
    else:
        assert got == want, path


def test_ports_are_never_handed_out_twice_and_a_taken_port_is_recognised():
    """The launch helpers' two guards against EADDRINUSE (tests/ports.py): no port twice in one process, and a world
    whose rank 0 could not listen is told apart from a real failure (so it is launched again, not reported)."""
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    taken = "torch.distributed.DistNetworkError: The server socket has failed to listen ... EADDRINUSE ..."
    assert lost_the_port([(0, ""), (1, taken)]) and not lost_the_port([(0, ""), (1, "AssertionError: boom")])
    assert not lost_the_port([(0, taken)])  # a rank that succeeded despite the text is not a clash
