"""Smoke test of the objective benchmark: `bench/speed_objective.py --quick` runs, exits 0, prints its table with
the paths it claims (pass counts), and the β = 0 methods agree."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_objective_benchmark_quick():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "speed_objective.py"), "--quick"],
                          capture_output=True, text=True, cwd=str(ROOT), timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert ("| config | method | seq_chunk | median wall s | × per-sequence (same seq_chunk) | median CPU s | "
            "CPU × per-sequence |") in out
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in out.splitlines()
            if line.startswith("| quick |")]
    # B = G = 4, counted per sequence chunk: the per-sequence path takes one forward and one backward (X and Y of its
    # units from one vjp), the per-token path one forward and two vjps, the KL term one more (no-grad) forward.
    assert [(r[1], r[2], int(r[8]), int(r[9])) for r in rows] == [
        ("per-sequence", "1", 16, 16), ("per-token", "1", 16, 32), ("β=0.04", "1", 32, 32),
        ("per-sequence", "4", 4, 4), ("per-token", "4", 4, 8), ("β=0.04", "4", 8, 8)]
    assert [(r[4], r[6]) for r in rows if r[1] == "per-sequence"] == [("1.00×", "1.00×")] * 2
    assert all(float(r[7]) > 0 for r in rows if r[1].startswith("β")) and all(
        float(r[7]) == 0 for r in rows if not r[1].startswith("β"))
    deltas = {(r[1], r[2]): float(r[10]) for r in rows}
    assert deltas[("β=0.04", "1")] != deltas[("per-sequence", "1")]  # the KL term changes the step
    agree = re.search(r"β = 0 methods give the same δH₁ .*: (PASS|FAIL)$", out, re.MULTILINE)
    assert agree is not None and agree.group(1) == "PASS", out
