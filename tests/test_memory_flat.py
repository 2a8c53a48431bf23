"""Per-chunk peak memory of δH₁ (issue 7): flat over a long run, and chunk sizes planned from a memory budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from funcprobe import AdamState, Policy, delta_h1
from funcprobe.memory import plan_for_policy
from funcprobe.probe import Probe
from funcprobe.testing import random_batch, tiny_peft_model

ROOT = Path(__file__).resolve().parents[1]

FLAT_SCRIPT = """
import json, torch
torch.set_num_threads(1)
from funcprobe import AdamState, Policy, delta_h1
from funcprobe.testing import random_batch, tiny_peft_model
policy = Policy.from_peft(tiny_peft_model("qwen2", vocab_size=256, hidden_size=32, num_layers=1, r=4, seed=1))
params = policy.params
batch = random_batch(50, 2, vocab_size=256, prompt_len=(3, 6), response_len=(2, 5), seed=2)
adam = AdamState.zeros(params, lr=1e-3)
result = delta_h1(params, batch, policy=policy, adam=adam, seq_chunk=2, token_chunk=64, store_unit_vectors=False)
print(json.dumps({"laps": list(result.chunk_peak_bytes), "kind": result.peak_memory_kind,
                  "peak": result.peak_memory_bytes}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="per-chunk CPU peaks need Linux /proc")
def test_chunk_peaks_stay_flat_over_50_prompts():
    """50 prompts, one unit each, in a fresh process with ``MALLOC_MMAP_THRESHOLD_=131072``: no growth (leak).

    The first two units are skipped as warm-up (first-call allocations, lazily imported code); the mean of the
    next 10 pass-1 chunk peaks and the mean of the last 10 (pass 2, recomputing) must agree within 2%.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", FLAT_SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout.strip().splitlines()[-1])
    laps = data["laps"]
    assert data["kind"] == "cpu_vmhwm"
    assert len(laps) == 100  # 50 units in pass 1, 50 recomputed in pass 2
    assert data["peak"] >= max(laps) and min(laps) > 0
    first = sum(laps[2:12]) / 10
    last = sum(laps[-10:]) / 10
    assert abs(last - first) <= 0.02 * first, (first, last, laps)


@pytest.fixture(scope="module")
def setup():
    policy = Policy.from_peft(tiny_peft_model("qwen2", vocab_size=64, hidden_size=16, num_layers=1, r=2, seed=3))
    batch = random_batch(4, 3, vocab_size=64, prompt_len=(2, 4), response_len=(1, 5), seed=4)
    return policy, batch, AdamState.zeros(policy.params, lr=1e-3)


def test_memory_budget_fills_chunks_from_the_plan(setup):
    policy, batch, adam = setup
    result = delta_h1(policy.params, batch, policy=policy, adam=adam, memory_budget="2GB")
    plan = plan_for_policy(policy, (4, 3, 4, 5), budget_bytes=2 * 10 ** 9)
    assert result.memory_plan == plan.to_dict()
    assert (result.seq_chunk, result.token_chunk, result.stored_unit_vectors) == (
        plan.seq_chunk, plan.token_chunk, plan.store_unit_vectors)
    assert result.to_dict()["memory_plan"]["budget_bytes"] == 2 * 10 ** 9
    assert isinstance(result.to_dict()["chunk_peak_bytes"], list) and len(result.chunk_peak_bytes) >= 4
    reference = delta_h1(policy.params, batch, policy=policy, adam=adam, seq_chunk=plan.seq_chunk,
                         token_chunk=plan.token_chunk)
    assert result.deltaH1 == pytest.approx(reference.deltaH1, rel=1e-9, abs=1e-12)
    assert reference.memory_plan is None


def test_explicit_chunks_win_over_the_plan(setup):
    policy, batch, adam = setup
    result = delta_h1(policy.params, batch, policy=policy, adam=adam, memory_budget=2 * 10 ** 9, seq_chunk=1,
                      store_unit_vectors=False)
    assert result.seq_chunk == 1 and not result.stored_unit_vectors
    assert result.token_chunk == result.memory_plan["token_chunk"]


def test_a_budget_that_cannot_fit_is_refused(setup):
    policy, batch, adam = setup
    with pytest.raises(ValueError, match="above the budget"):
        delta_h1(policy.params, batch, policy=policy, adam=adam, memory_budget="1KB")


def test_probe_passes_the_budget(setup):
    policy, batch, adam = setup
    probe = Probe(policy, adam, batch=batch, memory_budget="2GB")
    assert probe.delta_h1(policy.params).memory_plan is not None
    with pytest.raises(ValueError, match="above the budget"):
        probe.replace(memory_budget="1KB").delta_h1(policy.params)
