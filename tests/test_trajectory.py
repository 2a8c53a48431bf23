"""``funcprobe trajectory``: every checkpoint of a run on one evaluation set — the same prompts and random streams at
each, so that the change between checkpoints is paired (exactly 0 between identical ones) — each next step's δĤ₁(E)
as ``probe`` reports it, the first order along the step really taken, and TRL's log beside them.

The run: the shared tiny training run (``tiny_run``: checkpoint-1, checkpoint-2) copied, with checkpoint-3 an exact
copy of checkpoint-2 saved without optimizer.pt (``save_only_model``), an incomplete checkpoint-5, and a TRL-style
``log_history`` (``entropy`` and the callback's ``entropy_change/*``) in the last trainer_state.json. And a real TRL
run (``examples/trl_callback.py --quick``: GRPOTrainer with funcprobe's callback, three checkpoints, the run folder's
trainer_config.json read by default), its log read beside, a copy without one optimizer.pt and with a repeated
checkpoint, and the command on it.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import cli_fails
from funcprobe.checkpoints import adapter_params, load_checkpoint
from funcprobe.cli import main
from funcprobe.heldout import delta_h1_heldout
from funcprobe.probe_config import derive_seed, draw_eval_prompts
from funcprobe.realised import snis_delta_h
from funcprobe.rewards import load_prompts_jsonl
from funcprobe.sampling import sample_batch
from funcprobe.trajectory import CALLBACK_PREFIX, Trajectory, trajectory
from funcprobe.trajectory_plot import plot_trajectory

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = dict(B=4, G=4, eval_B=4, eval_G=3, max_new_tokens=6)
FLAGS = ["-B", "4", "-G", "4", "--eval-B", "4", "--eval-G", "3", "--max-new-tokens", "6", "--quiet"]
LOG = [  # TRL's rows: row s's entropy is of step s's rollouts (drawn at θ_{s-1}); the callback's row s measures s − 1
    {"step": 1, "entropy": 4.1, "loss": 0.0},
    {"step": 2, "entropy": 4.2, CALLBACK_PREFIX + "realised": 0.01, CALLBACK_PREFIX + "realised_se": 0.002,
     CALLBACK_PREFIX + "first_step": 1.0, CALLBACK_PREFIX + "last_step": 1.0},
    {"step": 3, "entropy": 4.3, CALLBACK_PREFIX + "realised": -0.02, CALLBACK_PREFIX + "realised_se": 0.004,
     CALLBACK_PREFIX + "first_step": 2.0, CALLBACK_PREFIX + "last_step": 2.0},
    {"step": 3, "train_runtime": 1.0},
]


def _strict(text: str):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def run_dir(tiny_run, tmp_path_factory) -> Path:
    source = Path(tiny_run["out"])
    run = tmp_path_factory.mktemp("trajectory_run")
    for name in ("checkpoint-1", "checkpoint-2"):
        shutil.copytree(source / name, run / name)
    shutil.copytree(source / "checkpoint-2", run / "checkpoint-3")
    (run / "checkpoint-3" / "optimizer.pt").unlink()
    state = json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())
    state.update(global_step=3, log_history=LOG)
    (run / "checkpoint-3" / "trainer_state.json").write_text(json.dumps(state))
    (run / "checkpoint-5").mkdir()  # an incomplete save: left out, with a note
    shutil.copy(source / "prompts.jsonl", run / "prompts.jsonl")
    return run


@pytest.fixture(scope="module")
def result(run_dir) -> Trajectory:
    return trajectory(run_dir, **SIZES, echo=lambda *args: None)


def test_one_entry_per_checkpoint_and_one_change_per_pair(result, run_dir):
    assert [e.step for e in result.checkpoints] == [1, 2, 3]
    assert [(c.from_step, c.to_step, c.steps) for c in result.changes] == [(1, 2, 1), (2, 3, 1)]
    assert [Path(e.path).name for e in result.checkpoints] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert any("checkpoint-5" in note for note in result.notes)
    assert any("no trainer config" in note for note in result.notes)   # the tiny run saved none: said, not hidden
    for entry in result.checkpoints:
        assert entry.entropy > 0 and entry.entropy_se > 0 and entry.entropy_per_token > 0
        assert len(entry.entropy_per_prompt) == 4 and entry.tokens > 0
        assert math.isclose(entry.entropy, sum(entry.entropy_per_prompt) / 4, rel_tol=1e-12)


def test_every_checkpoint_is_measured_on_the_same_draws(result):
    eval_seed = derive_seed(0, "evaluation")
    pool_size = result.evaluation["pool_size"]
    expected = draw_eval_prompts(pool_size, 4, seed=eval_seed)
    assert result.evaluation["prompt_indices"] == expected and result.evaluation["seed"] == eval_seed
    for entry in result.checkpoints:
        assert list(entry.eval_prompt_indices) == expected and entry.eval_seed == eval_seed


def test_identical_checkpoints_change_by_exactly_zero(result):
    """checkpoint-3 is checkpoint-2 again: the same draws (common random numbers), the same entropies, and every
    change between them exactly 0 with SE 0 — the pairing is exact."""
    two, three = result.checkpoints[1], result.checkpoints[2]
    assert two.entropy_per_prompt == three.entropy_per_prompt and two.entropy_per_token == three.entropy_per_token
    change = result.changes[1]
    assert change.realised.deltaH == 0.0 and change.realised.se == 0.0
    assert set(change.realised.deltaH_per_prompt) == {0.0} and change.realised.changed_count == 0
    assert change.realised_per_token == 0.0 and change.realised_per_token_se == 0.0
    assert change.first_order.deltaH1 == 0.0 and change.first_order.se == 0.0 and change.step_norm == 0.0
    assert change.importance.deltaH == 0.0 and change.paired.difference == 0.0


def test_the_paired_change_is_the_difference_of_the_per_prompt_entropies(result):
    one, two = result.checkpoints[:2]
    change = result.changes[0]
    differences = [b - a for a, b in zip(one.entropy_per_prompt, two.entropy_per_prompt)]
    for value, expected in zip(change.realised.deltaH_per_prompt, differences):
        assert math.isclose(value, expected, rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(change.realised.deltaH, two.entropy - one.entropy, rel_tol=1e-9, abs_tol=1e-12)
    sd = torch.tensor(differences, dtype=torch.float64).std(unbiased=True).item()
    assert math.isclose(change.realised.se, sd / 2, rel_tol=1e-9)  # sd_n / √B, B = 4
    assert change.realised_per_token == two.entropy_per_token - one.entropy_per_token
    pseudo = [b - a for a, b in zip(one.entropy_per_token_pseudo, two.entropy_per_token_pseudo)]
    assert list(change.realised_per_token_per_prompt) == pytest.approx(pseudo, abs=1e-12)
    assert change.step_norm > 0 and change.realised.H_before == pytest.approx(one.entropy, rel=1e-12)


@pytest.mark.filterwarnings("ignore:every one of the")  # the tiny run's rewards tie: the step is its state term
def test_the_first_order_along_the_real_step_and_the_check_are_the_librarys(result, run_dir):
    """∇Ĥ(θ₁)·(θ₂ − θ₁) is ``delta_h1_heldout`` on the evaluation batch drawn at θ₁, and the importance check is
    ``snis_delta_h`` from those draws to θ₂ — drawn here independently with the trajectory's seeds."""
    checkpoint = load_checkpoint(run_dir / "checkpoint-1")
    policy, params = checkpoint.policy, checkpoint.policy.params
    following = adapter_params(run_dir / "checkpoint-2", policy)
    pool, answers = load_prompts_jsonl(run_dir / "prompts.jsonl")
    indices = result.evaluation["prompt_indices"]
    evaluation = sample_batch(policy, params, [pool[i] for i in indices], G=3, reward_fn="answer", max_new_tokens=6,
                              seed=result.evaluation["seed"], tokenizer=checkpoint.tokenizer,
                              meta={"answers": [answers[i] for i in indices]}, prompt_index=indices)
    step = {n: following[n].double() - params[n].double() for n in params}
    heldout = delta_h1_heldout(params, step, evaluation.batch, policy=policy)
    change = result.changes[0]
    assert math.isclose(change.first_order.deltaH1, heldout.deltaH1, rel_tol=1e-9)
    assert math.isclose(change.first_order.se, heldout.se, rel_tol=1e-9)
    check = snis_delta_h(params, following, policy=policy, batch=evaluation.batch)
    assert math.isclose(change.importance.deltaH, check.deltaH, rel_tol=1e-9, abs_tol=1e-15)
    assert change.importance_summary()["ess_min_fraction"] == check.ess_min_fraction
    assert math.isclose(change.paired.difference, change.realised.deltaH - heldout.deltaH1, rel_tol=1e-9)
    # Every result on E names E (issue 19): the same draws, redrawn here, have the same fingerprint.
    for recorded in (change.first_order, change.realised, change.importance, change.paired, heldout, check):
        assert recorded.evaluation_fingerprint == evaluation.batch.fingerprint


def test_the_prediction_is_the_probe_headline(result, run_dir, tmp_path):
    """Each checkpoint's δĤ₁(E) is the number `funcprobe probe` reports for that checkpoint with the same sizes."""
    out = tmp_path / "probe.json"
    assert main(["probe", str(run_dir / "checkpoint-1"), *FLAGS, "--out", str(out)]) == 0
    probed = _strict(out.read_text())["delta_h1_heldout"]
    prediction = result.checkpoints[0].prediction
    assert math.isclose(prediction.deltaH1, probed["deltaH1"], rel_tol=1e-9)
    assert math.isclose(prediction.se, probed["se"], rel_tol=1e-9)
    assert math.isclose(prediction.grad_term + prediction.state_term, prediction.deltaH1, rel_tol=1e-9)
    assert result.checkpoints[0].adam_step == 1 and result.checkpoints[1].adam_step == 2
    assert result.checkpoints[0].lr > 0 and result.checkpoints[0].update_batch["eos_count"] >= 0


def test_a_checkpoint_without_optimizer_state_keeps_its_entropy(result):
    entry = result.checkpoints[2]
    assert entry.prediction is None and "optimizer.pt" in entry.prediction_reason
    assert entry.adam_step is None and entry.lr is None and math.isfinite(entry.entropy)
    data = entry.to_dict()
    assert data["prediction"] is None and "optimizer.pt" in data["prediction_reason"]
    assert result.checkpoints[0].prediction is not None and result.checkpoints[0].prediction_reason is None


def test_the_trainers_log_is_read_beside(result):
    one, two, three = result.checkpoints
    # TRL's row N + 1 was drawn at θ_N: the value set beside checkpoint N; row N itself is kept as logged.
    assert (one.trl_entropy, two.trl_entropy, three.trl_entropy) == (4.2, 4.3, None)
    assert "step 4" in three.trl_entropy_reason
    assert one.trl_logged == {"step": 1, "entropy": 4.1}
    assert two.trl_logged[CALLBACK_PREFIX + "realised"] == 0.01
    assert result.trl_history["entropy"] == [[1, 4.1], [2, 4.2], [3, 4.3]]
    assert result.trl_history["source"].endswith("checkpoint-3/trainer_state.json")
    # The callback's row 3 measured step 2 (first_step = last_step = 2): the change 1 → 2.
    assert [row["row"] for row in result.changes[0].trl_callback] == [3]
    assert result.changes[0].trl_callback[0][CALLBACK_PREFIX + "realised"] == -0.02
    assert result.changes[1].trl_callback == ()


def test_the_json_is_standard_and_says_its_units(result):
    data = result.to_dict()
    text = json.dumps(data, allow_nan=False)
    back = _strict(text)
    assert back["command"] == "trajectory" and len(back["checkpoints"]) == 3 and len(back["changes"]) == 2
    assert set(back["units"]) >= {"entropy", "entropy_per_token", "trl_entropy", "changes"}
    change = back["changes"][0]
    assert set(change["importance"]) >= {"deltaH", "se", "reliable", "reason", "ess_min_fraction", "khat"}
    assert change["realised"]["method"] == "crn" and change["first_order"]["deltaH1"] is not None
    assert back["checkpoints"][0]["prediction"]["deltaH1"] == result.checkpoints[0].prediction.deltaH1


def test_the_plot_is_written(result, tmp_path):
    path = plot_trajectory(result, tmp_path / "trajectory.png")
    assert Path(path).is_file() and Path(path).stat().st_size > 10_000
    with pytest.raises(ValueError, match="trajectory"):
        plot_trajectory({"command": "probe"}, tmp_path / "other.png")


def test_the_command_writes_the_librarys_numbers(result, run_dir, tmp_path, capsys):
    out, plot = tmp_path / "results.json", tmp_path / "trajectory.png"
    assert main(["trajectory", str(run_dir), *FLAGS, "--out", str(out), "--plot", str(plot)]) == 0
    printed = capsys.readouterr().out
    assert "entropy along the run" in printed and "change between checkpoints" in printed
    assert "no prediction at step 3" in printed and " nan" not in printed.lower()
    assert plot.is_file() and plot.stat().st_size > 10_000
    data = _strict(out.read_text())
    assert [e["entropy"] for e in data["checkpoints"]] == [e.entropy for e in result.checkpoints]
    assert data["changes"][0]["realised"]["deltaH"] == result.changes[0].realised.deltaH
    assert data["config"]["command"] == "trajectory" and data["config"]["eval_G"] == 3


def test_bad_inputs_end_with_one_line_and_exit_2(run_dir, tmp_path, capsys):
    cli_fails(capsys, ["trajectory", str(tmp_path / "missing"), "--quiet"], "run folder", "does not exist")
    cli_fails(capsys, ["trajectory", str(run_dir / "checkpoint-1"), "--quiet"], "no checkpoint-N/",
              "funcprobe probe")
    # Output paths are checked before any work.
    cli_fails(capsys, ["trajectory", str(run_dir), "--out", str(tmp_path), "--quiet"], "--out", "directory")
    cli_fails(capsys, ["trajectory", str(run_dir), "--plot", str(tmp_path / "x.nope"), "--quiet"], "--plot")


def test_trainer_settings_funcprobe_cannot_reproduce_give_null_predictions(run_dir, tmp_path, capsys):
    """A run trained with another optimizer: no step is predicted, the entropies and changes are still measured."""
    config = tmp_path / "trainer_config.json"
    config.write_text(json.dumps({"optim": "adafactor", "loss_type": "dr_grpo", "scale_rewards": "none",
                                  "num_generations": 2, "max_completion_length": 4,
                                  "per_device_train_batch_size": 4}))
    out = tmp_path / "results.json"
    assert main(["trajectory", str(run_dir), "--trainer-config", str(config), "--quiet", "--out", str(out)]) == 0
    data = _strict(out.read_text())
    assert [e["prediction"] for e in data["checkpoints"]] == [None, None, None]
    assert all("optim='adafactor'" in e["prediction_reason"] for e in data["checkpoints"])
    assert "optim='adafactor'" in data["settings"]["prediction_unsupported"]
    assert data["evaluation"]["G"] == 2 and data["evaluation"]["max_new_tokens"] == 4
    assert all(e["entropy"] > 0 for e in data["checkpoints"]) and data["changes"][1]["realised"]["deltaH"] == 0.0
    # The probe still refuses such settings.
    cli_fails(capsys, ["probe", str(run_dir / "checkpoint-2"), "--trainer-config", str(config), "--quiet"],
              "optim='adafactor'")


def test_the_callback_prefix_is_the_callbacks():
    from funcprobe.trl import PREFIX

    assert CALLBACK_PREFIX == PREFIX


# ------------------------------------------------------------------------- a real TRL run (examples/trl_callback.py)
REAL_REWARD = "funcprobe.demo_real:arithmetic_reward"


@pytest.fixture(scope="module")
def trl_callback_run(tmp_path_factory) -> Path:
    """examples/trl_callback.py --quick: a real GRPOTrainer run (tiny Qwen2, LoRA) with funcprobe's callback —
    checkpoint-1…3 with optimizer.pt and trainer_state.json, OUT/trainer_config.json, OUT/prompts.jsonl."""
    pytest.importorskip("trl", minversion="1.16")
    from conftest import load_example

    out = tmp_path_factory.mktemp("trl_callback_run")
    load_example("trl_callback").main(["--quick", "--no-trajectory", "--out", str(out)], echo=lambda *args: None)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    return out


@pytest.fixture(scope="module")
def real(trl_callback_run) -> Trajectory:
    """Its trajectory with the run folder's trainer_config.json read by default (no trainer_config= given)."""
    return trajectory(trl_callback_run, reward=REAL_REWARD, B=4, G=4, seed=0, progress=False, echo=lambda *a: None)


def _log(run: Path) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for row in json.loads((run / "log_history.json").read_text()):
        rows.setdefault(row["step"], {}).update(row)
    return rows


def test_a_real_run_reads_its_trainer_config_by_default(real, trl_callback_run):
    settings = real.settings["trainer_config"]
    assert settings is not None and str(trl_callback_run / "trainer_config.json") in settings["sources"].values()
    assert real.settings["objective"]["loss_type"] == "dapo"   # TRL's default, not funcprobe's (Dr. GRPO)
    assert real.evaluation["max_new_tokens"] == 8                # the run's max_completion_length
    assert [e.step for e in real.checkpoints] == [1, 2, 3] and len(real.changes) == 2
    assert all(e.prediction is not None and e.prediction_reason is None for e in real.checkpoints)
    assert all(math.isfinite(c.first_order.deltaH1) and math.isfinite(c.realised.deltaH) for c in real.changes)
    assert not any("no trainer config" in note for note in real.notes)


def test_a_real_runs_logged_values_are_read_beside(real, trl_callback_run):
    """TRL's ``entropy`` of row N + 1 (rollouts drawn at θ_N) beside checkpoint N, row N as logged, and the
    callback's row 3 (the change of step 2: θ₁ → θ₂) under the change 1 → 2."""
    log = _log(trl_callback_run)
    one, two, three = real.checkpoints
    assert (one.trl_entropy, two.trl_entropy, three.trl_entropy) == (log[2]["entropy"], log[3]["entropy"], None)
    for entry in real.checkpoints:
        assert entry.trl_logged["entropy"] == log[entry.step]["entropy"]
        assert entry.trl_logged[CALLBACK_PREFIX + "entropy_per_token"] == log[entry.step][
            CALLBACK_PREFIX + "entropy_per_token"]
    assert real.trl_history["entropy"] == [[s, log[s]["entropy"]] for s in (1, 2, 3)]
    (row,) = real.changes[0].trl_callback
    assert row["row"] == 3 and row[CALLBACK_PREFIX + "realised"] == log[3][CALLBACK_PREFIX + "realised"]
    assert row[CALLBACK_PREFIX + "first_order_se"] == log[3][CALLBACK_PREFIX + "first_order_se"]
    assert real.changes[1].trl_callback == ()   # step 3's change would be measured on step 4's rollouts
    # The same unit as TRL's (nats per token, the masked mean of the entropy of logits/τ), at the same θ on other
    # prompts: within a few SEs on this near-uniform tiny model — per response it would be ~8× larger.
    for entry in (one, two):
        assert abs(entry.entropy_per_token - entry.trl_entropy) < 10 * entry.entropy_per_token_se
        assert entry.entropy > 5 * entry.entropy_per_token


def test_a_real_checkpoint_without_optimizer_state_and_a_repeated_one(real, trl_callback_run, tmp_path):
    """The same run with checkpoint-2 saved without optimizer.pt and a checkpoint-4 identical to checkpoint-3:
    checkpoint-2's entropy is the same number (E does not depend on the optimizer state) with a null prediction and
    its reason, and 3 → 4 changes by exactly 0 ± 0 (the same draws at both)."""
    run = tmp_path / "run"
    shutil.copytree(trl_callback_run, run, ignore=shutil.ignore_patterns("base"))
    (run / "checkpoint-2" / "optimizer.pt").unlink()
    shutil.copytree(run / "checkpoint-3", run / "checkpoint-4")
    again = trajectory(run, reward=REAL_REWARD, B=4, G=4, seed=0, progress=False, echo=lambda *a: None)
    assert [e.step for e in again.checkpoints] == [1, 2, 3, 4]
    two = again.checkpoints[1]
    assert two.prediction is None and "optimizer.pt" in two.prediction_reason and two.lr is None
    assert two.entropy_per_prompt == real.checkpoints[1].entropy_per_prompt
    assert two.entropy_per_token == real.checkpoints[1].entropy_per_token
    assert again.checkpoints[0].prediction.deltaH1 == real.checkpoints[0].prediction.deltaH1
    assert again.changes[0].realised.deltaH == real.changes[0].realised.deltaH
    last = again.changes[2]
    assert (last.realised.deltaH, last.realised.se, last.realised_per_token, last.realised_per_token_se) == (0, 0, 0, 0)
    assert last.first_order.deltaH1 == 0.0 and last.step_norm == 0.0
    data = _strict(json.dumps(again.to_dict(), allow_nan=False))
    assert data["checkpoints"][1]["prediction"] is None and "optimizer.pt" in data["checkpoints"][1]["prediction_reason"]


def test_the_command_on_a_real_run(real, trl_callback_run, tmp_path, capsys):
    out, plot = tmp_path / "results.json", tmp_path / "trajectory.png"
    assert main(["trajectory", str(trl_callback_run), "--reward", REAL_REWARD, "-B", "4", "-G", "4", "--seed", "0",
                 "--quiet", "--out", str(out), "--plot", str(plot)]) == 0
    data = _strict(out.read_text())
    assert [e["entropy"] for e in data["checkpoints"]] == [e.entropy for e in real.checkpoints]
    assert [e["prediction"]["deltaH1"] for e in data["checkpoints"]] == [e.prediction.deltaH1 for e in
                                                                         real.checkpoints]
    assert data["settings"]["trainer_config"] is not None and plot.stat().st_size > 10_000
    assert "entropy along the run" in capsys.readouterr().out
