"""Smoke test of the memory benchmark: `bench/memory_logprobs.py --quick` runs, exits 0 and prints its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_memory_benchmark_quick():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "memory_logprobs.py"), "--quick"],
                          capture_output=True, text=True, cwd=str(ROOT), timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "| method | g | seq_chunk | token_chunk | peak RSS MB | peak above baseline MB |" in out
    rows = [line for line in out.splitlines() if line.startswith(("| naive |", "| funcprobe |"))]
    assert [row.split("|")[1:3] for row in rows] == [[" naive ", " 8 "], [" funcprobe ", " 4 "],
                                                    [" funcprobe ", " 8 "], [" funcprobe ", " 16 "]]
    assert "gradients agree" in out and "PASS" in out.split("gradients agree")[1].splitlines()[0]
