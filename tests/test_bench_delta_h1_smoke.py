"""Smoke test of the δH₁ speed benchmark: `bench/speed_delta_h1.py --quick` runs, exits 0, prints its table, and the
reference (the seed's stateful algorithm) and every funcprobe run agree on U_cross and deltaH1."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_speed_benchmark_quick():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "speed_delta_h1.py"), "--quick"],
                          capture_output=True, text=True, cwd=str(ROOT), timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "| config | method | mode | seq_chunk | median wall s | forward passes | backward passes |" in out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| quick |")]
    assert [(r[1].strip(), r[2].strip(), r[3].strip()) for r in rows] == [
        ("reference", "seed (recompute)", "–"), ("funcprobe", "stored", "1"), ("funcprobe", "stored", "4"),
        ("funcprobe", "recompute", "1"), ("funcprobe", "recompute", "4")]
    # pass counts: reference 3B forwards (of G sequences) and 4B backwards; funcprobe one forward and one backward per
    # sequence chunk (the per-layer LoRA taps give X and Y of the chunk's units from one backward), B = G = 4
    assert [(int(r[5]), int(r[6])) for r in rows] == [(12, 16), (16, 16), (4, 4), (32, 32), (8, 8)]
    # every run reports the same U_cross and deltaH1 (to float32 accuracy; the script's own check, on the scale of
    # the terms they are computed from, is tighter), and the script says so
    u_cross = [float(r[-2]) for r in rows]
    delta = [float(r[-1]) for r in rows]
    assert max(abs(u - u_cross[0]) for u in u_cross) <= 5e-5 * abs(u_cross[0])
    assert max(abs(d - delta[0]) for d in delta) <= 5e-5 * abs(delta[0])
    agree = re.search(r"results agree .*: (PASS|FAIL)$", out, re.MULTILINE)
    assert agree is not None and agree.group(1) == "PASS", out
    assert len(re.findall(r"funcprobe (stored|recompute) \(headline seq_chunk=\d+\) vs reference", out)) == 2
