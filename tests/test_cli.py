"""The command line: the demo runs end to end and writes JSON whose numbers are the library's."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from funcprobe.cli import main


def test_demo_quick_writes_consistent_json(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--no-plot", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "δH₁" in printed and "ΔH" in printed
    results = json.loads((tmp_path / "results.json").read_text(), parse_constant=_refuse)
    delta, realised, sweep = results["delta_h1"], results["realised"], results["lr_sweep"]
    assert math.isclose(delta["deltaH1"], delta["grad_term"] + delta["state_term"], rel_tol=1e-12)
    assert delta["n_units"] == results["config"]["B"] and delta["backward_passes"] > 0
    at_lr = [row for row in sweep["rows"] if math.isclose(row["eta"], results["config"]["lr"])]
    # float32 model: θ + 1·Δθ and the AdamW step's θ⁺ differ in rounding, so ΔĤ agrees to ~1e-5, not bit for bit
    assert at_lr and math.isclose(at_lr[0]["snis_deltaH"], realised["snis"]["deltaH"], rel_tol=1e-3)
    # CRN's ΔĤ here is ~2e-5, a difference of summed entropies of ~25 nats in float32: 1e-6 absolute is the rounding.
    assert math.isclose(at_lr[0]["crn_deltaH"], realised["crn"]["deltaH"], rel_tol=1e-3, abs_tol=1e-6)
    # The sweep's line is the held-out first-order change of the step (spec §9); the U-statistic's beside it.
    heldout = results["delta_h1_heldout"]
    assert math.isclose(at_lr[0]["predicted"], heldout["deltaH1"], rel_tol=1e-12)
    assert math.isclose(at_lr[0]["predicted_ustatistic"], delta["deltaH1"], rel_tol=1e-12)
    assert math.isclose(heldout["deltaH1"], heldout["grad_term"] + heldout["state_term"], rel_tol=1e-9)
    assert math.isclose(at_lr[0]["paired_difference"], results["paired"]["snis"]["difference"], rel_tol=1e-3,
                        abs_tol=1e-6)
    assert results["eval_batch"]["prompts"] != results["batch"]["prompts"]
    assert results["in_sample"]["in_sample"] is True
    assert results["versions"]["torch"]


def _refuse(constant):
    raise ValueError(f"non-standard JSON constant {constant}")


def test_module_entry_point_reports_bad_arguments():
    completed = subprocess.run([sys.executable, "-m", "funcprobe", "nonsense"], capture_output=True, text=True)
    assert completed.returncode == 2 and "invalid choice" in completed.stderr
