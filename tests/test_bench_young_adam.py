"""bench/young_adam_bias.py at a small size: the spec's gradient term is badly biased at the first AdamW step and the
leave-one-unit-out step is not (exact enumeration; deterministic seeds)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_young_adam_bias_bench():
    spec = importlib.util.spec_from_file_location("young_adam_bias", ROOT / "bench" / "young_adam_bias.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = {row["t"]: row for row in module.main(["--batches", "400"])["rows"]}
    assert set(rows) == {0, 3, 30, 300}
    first = rows[0]
    assert first["batch_share_of_v"] == 1.0
    assert first["mean_delta"] * first["mean_truth"] < 0 and abs(first["bias"]) > 4 * first["bias_se"]
    for row in rows.values():
        assert abs(row["loo_relative"]) < 0.05 and abs(row["loo_bias"]) < 4 * row["loo_se"], row
