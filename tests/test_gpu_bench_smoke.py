"""Smoke test of `bash bench/gpu.sh` (issue 12): without CUDA it runs the acceptance pipeline at reduced shapes on
the CPU — planner, sampling, plain step, δH₁, the step and ΔĤ — prints its table and appends nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_smoke_on_the_cpu(tmp_path):
    results = ROOT / "bench" / "RESULTS.md"
    before = results.read_bytes()
    table = tmp_path / "table.md"
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--smoke", "--out", str(table)],
                          capture_output=True, text=True, cwd=str(ROOT), timeout=300,
                          env={**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stdout + done.stderr
    text = table.read_text()
    assert "CPU smoke, reduced shapes" in text
    phases = [line.split("|")[5].strip() for line in text.splitlines() if line.startswith("| 3 | 2 | 4 |")]
    assert phases == ["sampling", "delta h1", "heldout", "delta h", "plain step"]
    assert "δH₁ / plain step = " in text
    assert results.read_bytes() == before  # a smoke run never appends to RESULTS.md
