"""The examples run end to end (in-process, at their --quick sizes) on a checkpoint of a tiny training run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import load_example

from funcprobe import CRNResult, DeltaH1Result, LRSweepResult, SNISResult





@pytest.fixture(scope="module")
def checkpoint_dir(tiny_run) -> Path:
    assert (Path(tiny_run["out"]) / "prompts.jsonl").is_file()
    return Path(tiny_run["checkpoints"][-1])


def _check_probe(results, methods=("snis",)) -> None:
    prediction, realised = results["delta_h1"], results["realised"]
    assert isinstance(prediction, DeltaH1Result) and set(realised) == set(methods)
    assert isinstance(realised["snis"], SNISResult) and not realised["snis"].in_sample
    if "crn" in methods:
        assert isinstance(realised["crn"], CRNResult)
    assert math.isfinite(prediction.deltaH1) and all(math.isfinite(r.deltaH) for r in realised.values())
    assert math.isclose(prediction.deltaH1, prediction.grad_term + prediction.state_term, rel_tol=1e-12)
    assert prediction.B == 4 and prediction.G == 4
    assert all(r.B == 4 and r.G == 4 for r in realised.values())


def test_probe_checkpoint(checkpoint_dir, capsys):
    results = load_example("probe_checkpoint").main([str(checkpoint_dir), "--quick"])
    _check_probe(results, methods=("crn", "snis"))
    assert results["eval_batch"] is not results["batch"]
    heldout, paired = results["heldout"], results["paired"]
    assert heldout.B == 4 and math.isfinite(heldout.deltaH1) and heldout.se > 0
    for method, pair in paired.items():   # ΔĤ − δĤ₁(E), paired prompt by prompt on the same E
        assert pair.difference == pytest.approx(results["realised"][method].deltaH - heldout.deltaH1, abs=1e-12)
    printed = capsys.readouterr().out
    assert "δH₁" in printed and "ΔH realised" in printed


def test_lr_sweep(checkpoint_dir, tmp_path, capsys):
    plot = tmp_path / "sweep.png"
    results = load_example("lr_sweep").main([str(checkpoint_dir), "--out", str(plot), "--quick"])
    sweep = results["lr_sweep"]
    assert isinstance(sweep, LRSweepResult) and len(sweep.rows) == 3 and sweep.prediction == "deltaH1_heldout"
    # the first-order line is (η/lr)·δĤ₁(E), each η paired with its realised change; the U-statistic beside it
    assert all(r.paired_difference is not None and r.paired_se > 0 for r in sweep.rows)
    assert [r.predicted for r in sweep.rows] == pytest.approx([f * sweep.heldout for f in (0.5, 1.0, 2.0)])
    assert all(r.predicted_ustatistic is not None for r in sweep.rows)
    assert [row.factor for row in sweep.rows] == pytest.approx([0.5, 1.0, 2.0])
    assert plot.is_file() and plot.stat().st_size > 0
    assert "ΔH(η) sweep" in capsys.readouterr().out


def test_attribution(checkpoint_dir, tmp_path, capsys):
    """The attribution example: Σ a = grad_term, the three interventions with a realised ΔĤ on E, the JSON and plot."""
    out = tmp_path / "attribution"
    results = load_example("attribution").main([str(checkpoint_dir), "--quick", "--out", str(out)])
    result = results["result"]
    assert float(result.token.sum()) == pytest.approx(result.grad_term, rel=1e-9)
    assert set(result.interventions) == {"clip_cov", "high_entropy", "positive_only"}
    assert result.realised_delta_h is not None and math.isfinite(result.realised_delta_h)
    assert all(row["realised_delta_h"] is not None and math.isfinite(row["realised_delta_h"])
               for row in result.interventions.values())
    assert results["evaluation"].batch.prompt_index.tolist() != results["update"].batch.prompt_index.tolist()
    saved = json.loads((out / "attribution.json").read_text())
    assert saved["attribution"]["grad_term"] == pytest.approx(result.grad_term, rel=1e-12)
    assert (out / "attribution.png").stat().st_size > 0
    assert (out / "attribution.html").read_text().startswith("<!DOCTYPE html>")
    printed = capsys.readouterr().out
    assert "push the entropy down most" in printed and "positive_only" in printed
    # the held-out footing: δĤ₁(E) with its own SE, paired with ΔĤ; every intervention with its diagnostics
    assert result.basis == "heldout" and result.se_deltaH1 > 0
    assert "δĤ₁(E) =" in printed and "paired ΔĤ − δĤ₁(E)" in printed and "δH₁ =" not in printed
    assert printed.count("ESS/G min") == 1 + len(result.interventions)


def test_custom_reward_on_a_checkpoint(checkpoint_dir, capsys):
    example = load_example("custom_reward")
    results = example.main([str(checkpoint_dir), "--quick"])
    _check_probe(results)
    rewards = results["batch"].rewards
    assert rewards.shape == (4, 4) and bool((rewards > 0).all())  # 1/(1 + length) is always positive
    assert "short answers" in capsys.readouterr().out


def test_custom_reward_function_prefers_short_answers():
    reward = load_example("custom_reward").short_answer_reward
    values = reward(["1+1=", "2+2="], [["2", "22", "the answer"], ["4", "", "5"]], {"answers": ["2", "4"]})
    assert values.shape == (2, 3)
    assert values[0, 0] > values[0, 1] > values[0, 2]          # right and short beats wrong, wrong and short first
    assert values[1, 0] > values[1, 1] > 0 and values[1, 2] == pytest.approx(0.5)
    assert torch.equal(reward(["x"], [["ab"]], {}), torch.tensor([[1 / 3]], dtype=torch.float64))


def test_custom_reward_on_the_demo_policy(capsys):
    results = load_example("custom_reward").main(["--quick"])
    _check_probe(results)
    assert "demo's tiny policy" in capsys.readouterr().out


def test_train_trl_checkpoint(trl_run):
    """A real GRPOTrainer run saved as the trainer saves it, with its GRPOConfig as JSON for --trainer-config (the
    probe of it end to end is tests/test_cli_trainer.py)."""
    import json

    from funcprobe import Objective
    from funcprobe.trainer_config import read_trainer_config, trainer_settings

    out = Path(trl_run["out"])
    for checkpoint in trl_run["checkpoints"]:
        names = {p.name for p in Path(checkpoint).iterdir()}
        assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "trainer_state.json",
                "training_args.bin", "chat_template.jinja"} <= names
    settings = trainer_settings(read_trainer_config(out / "trainer_config.json"), source="run")
    assert settings.objective == Objective(loss_type="grpo", beta=0.04, scale_rewards="group", max_grad_norm=1.0)
    assert (settings.G, settings.B, settings.max_new_tokens, settings.learning_rate) == (4, 4, 8, 1e-3)
    rows = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert len(rows) == 32 and all(isinstance(r["prompt"], list) and r["prompt"][0]["role"] == "user" for r in rows)
    state = torch.load(Path(trl_run["checkpoints"][-1]) / "optimizer.pt", weights_only=False)
    assert {g["lr"] for g in state["param_groups"]} == {1e-3}  # constant schedule: the next step is not zero


def test_trl_callback(tmp_path, capsys):
    """examples/trl_callback.py --quick: a real GRPOTrainer run (tiny Qwen2) with the callback, its per-step table,
    then the trajectory over its three checkpoints, with TRL's and the callback's logged values beside."""
    pytest.importorskip("trl", minversion="1.16")
    out = tmp_path / "run"
    results = load_example("trl_callback").main(["--quick", "--out", str(out)])
    rows = {row["step"]: row for row in results["log_history"] if "loss" in row}
    assert sorted(rows) == [1, 2, 3]
    for step in (2, 3):   # the change of step s − 1, measured on step s's rollouts
        for key in ("realised", "realised_se", "first_order", "first_order_se", "difference_se"):
            assert math.isfinite(rows[step][f"entropy_change/{key}"]), (step, key)
    for step in (1, 2, 3):
        assert rows[step]["entropy_change/entropy_per_token"] == pytest.approx(rows[step]["entropy"], rel=1e-5)
        assert rows[step]["entropy_change/step_match"] <= 1e-5
    printed = capsys.readouterr().out
    assert "realised ΔĤ" in printed and "step_match" in printed
    trajectory = results["trajectory"]
    assert [entry["step"] for entry in trajectory["checkpoints"]] == [1, 2, 3]
    assert len(trajectory["changes"]) == 2
    # The run folder's trainer_config.json read by default: the predicted steps are the run's (TRL's dapo loss).
    assert trajectory["settings"]["objective"]["loss_type"] == "dapo"
    assert all(entry["prediction"] is not None for entry in trajectory["checkpoints"])
    # TRL's entropy of the rollouts drawn at θ_N (row N + 1) beside checkpoint N; the last has none (no row 4).
    assert [entry["trl_entropy"] for entry in trajectory["checkpoints"]] == [rows[2]["entropy"], rows[3]["entropy"],
                                                                             None]
    assert trajectory["changes"][0]["trl_callback"][0]["entropy_change/realised"] == rows[3]["entropy_change/realised"]
    json.dumps(trajectory, allow_nan=False)
    assert json.loads((out / "trajectory.json").read_text()) == trajectory
    assert (out / "trajectory.png").stat().st_size > 0
