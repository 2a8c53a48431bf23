"""bench/heldout_exact.py at a small size: it runs, δĤ₁(E) is unbiased with a calibrated SE, and the same D_n on
the update batch itself is not (exact enumeration; deterministic seeds)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_heldout_exact_bench():
    spec = importlib.util.spec_from_file_location("heldout_exact_bench", ROOT / "bench" / "heldout_exact.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--batches", "300", "--paired-batches", "20"])
    assert set(out["ages"]) == {0, 3, 30} and set(out["paired"]) == {0, 3, 30}
    for age in out["ages"].values():
        rows = {r["name"]: r for r in age["rows"]}
        held = rows["δĤ₁(E), rao-blackwell"]
        assert abs(held["z"]) < 3.5 and 0.75 < held["calibration"] < 1.33, held
        assert rows["Rao-Blackwell D_n on U itself"]["z"] < -3.5           # not held out: the same-sample term
        assert age["rb_over_sequence"] < 0.5
