"""Smoke test of the ΔĤ speed benchmark: `bench/speed_snis.py --quick` runs, exits 0 and prints its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_speed_snis_benchmark_quick():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "speed_snis.py"), "--quick"],
                          capture_output=True, text=True, cwd=str(ROOT), timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "| method | forward passes | median s | min s | × floor |" in out
    methods = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")][1:]
    assert methods[0].startswith("floor: sequence_logprobs") and methods[1] == "snis_delta_h (S(θ) given: before=)"
    assert any(m.startswith("seed: stateful IS step") for m in methods)
    assert "snis_delta_h (S(θ) given) / floor =" in out
    assert "S agree with the seed's" in out and "PASS" in out.split("S agree with the seed's")[1].splitlines()[0]
    # ~5 s of imports and a few seconds of work; generous for a shared 2-core machine.
