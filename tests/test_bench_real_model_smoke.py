"""Smoke test of the real-model speed benchmark: `bench/real_model.py --quick` (a tiny random Llama in place of
SmolLM2) runs every measurement, exits 0, prints its table, and the fast paths take the passes they should."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_real_model_benchmark_quick(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "real_model.py"), "--quick", "--json",
                           str(tmp_path / "quick.json")], capture_output=True, text=True, cwd=str(ROOT), timeout=600,
                          env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "| measurement | shape | funcprobe median s | reference median s | ratio (wall) | ratio (CPU) |" in out
    rows = {line.split("|")[1].strip(): line.split("|")[1:-1] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| measurement")}
    assert list(rows) == ["sampling: sample_batch / generate", "δH₁ / plain fwd+bwd",
                          "δH₁ (seq_chunk=6) / plain fwd+bwd", "ΔĤ SNIS (before given) / plain no-grad forward",
                          "ΔĤ SNIS (θ and θ⁺) / plain no-grad forward", "δĤ₁(E) / plain fwd+bwd of E",
                          "δH₁ / plain fwd+bwd (long responses)"]
    for label, cells in rows.items():
        ratio = float(cells[4].strip().rstrip("×"))
        assert ratio > 0, label
    # the batched δH₁: one forward and one backward per chunk of ≤ 8 sequences (6 short, 12 long sequences)
    assert "passes 1 F / 1 B" in rows["δH₁ / plain fwd+bwd"][-1]
    assert "passes 2 F / 2 B" in rows["δH₁ / plain fwd+bwd (long responses)"][-1]
    # ΔĤ: S and the entropies at θ⁺ from one pass; two with θ
    assert "passes 1;" in rows["ΔĤ SNIS (before given) / plain no-grad forward"][-1]
    assert "passes 2" in rows["ΔĤ SNIS (θ and θ⁺) / plain no-grad forward"][-1]
    assert "FAIL" not in out
    assert re.search(r"generated tokens per call \(median\): funcprobe \d", out)
    assert (tmp_path / "quick.json").is_file()
