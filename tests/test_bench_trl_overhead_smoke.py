"""Smoke test of ``bench/trl_callback_overhead.py --quick``: a tiny TRL run without the callback and with it at two
``match_every`` settings; the training is the same in all three (the callback changes nothing), the callback ran
without error, its parts were timed (the held-out pass and the forward at θ_a, at every measured step), and
``match_every=2`` computed funcprobe's gradient less often than ``match_every=1``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl", minversion="1.16")

ROOT = Path(__file__).resolve().parents[1]


def test_trl_overhead_benchmark_quick(tmp_path):
    out = tmp_path / "overhead.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "trl_callback_overhead.py"), "--quick", "--steps", "3",
                           "-B", "4", "--configs", "match_every=1", "match_every=2,per_token=False", "--json",
                           str(out)],
                          capture_output=True, text=True, cwd=str(tmp_path), timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert len(result["step_s_without"]) == 3
    runs = result["runs"]
    assert sorted(runs) == ["match_every=1", "match_every=2,per_token=False"]
    for run in runs.values():
        assert run["callback_error"] is None and run["same_losses"]
        share = run["breakdown_share"]
        assert share["held-out pass at θ_b (a forward, a backward per unit; gives θ_b's S, F)"] > 0
        assert share["realised: the no-grad forward at θ_a"] > 0
    gradient = "step_match (funcprobe's gradient)"
    assert runs["match_every=1"]["breakdown_share"][gradient] > 0
    assert runs["match_every=1"]["calls"][gradient] == 3 and runs["match_every=2,per_token=False"]["calls"][gradient] == 2
    assert all(run["calls"]["realised: the no-grad forward at θ_a"] == 2 for run in runs.values())  # steps 1, 2
    assert "overhead" in done.stdout and "same losses with and without the callback: True" in done.stdout
