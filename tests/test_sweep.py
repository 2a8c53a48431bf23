"""The learning-rate sweep on the evaluation batch (funcprobe.sweep) and its plot (funcprobe.report)."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import torch

from funcprobe import AdamState, Policy, crn_delta_h, delta_h1, sample_batch, snis_delta_h, update_direction
from funcprobe.adam import scaled_update
from funcprobe.report import plot_lr_sweep, to_jsonable
from funcprobe.sweep import LRSweepResult, lr_sweep
from funcprobe.testing import char_tokenizer, random_batch, tiny_peft_model

TOKENIZER = char_tokenizer()
LR = 1e-2


def lengths_reward(prompts, responses, meta):
    return [[float(len(text)) for text in group] for group in responses]


@pytest.fixture(scope="module")
def setting():
    """A float64 policy, an update batch U, its step Δθ at lr, and an evaluation sample E drawn at θ."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    policy = Policy.from_peft(tiny_peft_model("qwen2", vocab_size=len(TOKENIZER), hidden_size=16, num_layers=1,
                                              num_heads=2, num_kv_heads=1, dtype=torch.float64, seed=5))
    params = policy.params
    update_batch = random_batch(4, 4, vocab_size=len(TOKENIZER), seed=1)
    adam = AdamState.zeros(params, lr=LR)
    evaluation = sample_batch(policy, params, ["1+2=", "3*4=", "9-5=", "7"], G=4, reward_fn=lengths_reward,
                              max_new_tokens=5, seed=3, tokenizer=TOKENIZER)
    prediction = delta_h1(params, update_batch, policy=policy, adam=adam)
    yield SimpleNamespace(policy=policy, params=params, update_batch=update_batch, adam=adam, evaluation=evaluation,
                          prediction=prediction, step=prediction.step)
    torch.set_num_threads(threads)


def test_rows_equal_single_estimates_and_the_scaled_prediction(setting):
    s = setting
    etas = [0.0, LR / 10, LR]
    sweep = lr_sweep(s.params, s.evaluation, policy=s.policy, step=s.step, etas=etas, prediction=s.prediction,
                     method="both")
    assert isinstance(sweep, LRSweepResult) and sweep.lr == LR and sweep.method == "both"
    assert [row.factor for row in sweep.rows] == [0.0, 0.1, 1.0]
    assert sweep.rows[0].snis_deltaH == 0.0 and sweep.rows[0].crn_deltaH == 0.0   # θ(0) = θ: exactly zero
    assert sweep.rows[0].changed_fraction == 0.0
    update = scaled_update(s.params, s.step.delta_theta(), 1.0)
    at_lr_snis = snis_delta_h(s.params, update, policy=s.policy, batch=s.evaluation.batch)
    at_lr_crn = crn_delta_h(s.params, update, policy=s.policy, sample=s.evaluation)
    assert sweep.rows[2].snis_deltaH == at_lr_snis.deltaH and sweep.rows[2].crn_deltaH == at_lr_crn.deltaH
    assert sweep.rows[2].crn_se == at_lr_crn.se and sweep.rows[2].snis_se == at_lr_snis.se
    d = s.prediction.deltaH1
    assert [row.predicted for row in sweep.rows] == pytest.approx([0.0, 0.1 * d, d], rel=1e-14)
    assert [row.predicted_se for row in sweep.rows] == pytest.approx(
        [0.0, 0.1 * s.prediction.se_deltaH1, s.prediction.se_deltaH1], rel=1e-14)
    # At θ once: S and the entropies (SNIS with its default Rao-Blackwell integrand: one pass) and CRN's integrand;
    # per η: S⁺ and the entropies at θ(η) on E (one pass), and one redraw with its entropy pass.
    assert sweep.estimator == "rao_blackwell"
    assert sweep.forward_passes == 2 + 2 * len(etas) and sweep.sampling_passes == len(etas)
    data = json.loads(json.dumps(to_jsonable(sweep.to_dict()), allow_nan=False))
    assert len(data["snis"]) == len(data["crn"]) == 3
    text = str(sweep)
    assert "ΔH SNIS" in text and "ΔH CRN" in text and "changed" in text


def test_step_from_delta_h1_equals_update_direction(setting):
    s = setting
    direct = update_direction(s.params, s.update_batch, policy=s.policy, adam=s.adam)
    for name, value in direct.delta_theta().items():
        assert torch.allclose(value, s.step.delta_theta()[name], rtol=0, atol=1e-15)


def test_methods_and_refusals(setting):
    s = setting
    snis_only = lr_sweep(s.params, s.evaluation.batch, policy=s.policy, step=s.step, etas=[LR], method="snis")
    assert snis_only.crn == () and snis_only.rows[0].crn_deltaH is None and snis_only.prediction == "none"
    assert "ΔH CRN" not in str(snis_only)
    with pytest.raises(ValueError, match="needs the evaluation sample with its draw"):
        lr_sweep(s.params, s.evaluation.batch, policy=s.policy, step=s.step, etas=[LR], method="crn")
    with pytest.raises(ValueError, match="method must be one of"):
        lr_sweep(s.params, s.evaluation, policy=s.policy, step=s.step, etas=[LR], method="is")
    with pytest.raises(ValueError, match="etas is empty"):
        lr_sweep(s.params, s.evaluation, policy=s.policy, step=s.step, etas=[])
    with pytest.raises(ValueError, match="finite and ≥ 0"):
        lr_sweep(s.params, s.evaluation, policy=s.policy, step=s.step, etas=[-1e-3])
    stub = SimpleNamespace(deltaH1=0.0, se_deltaH1=0.0, deltaH1_plugin=0.0, lr=2 * LR)
    with pytest.raises(ValueError, match="prediction was made for a step at lr"):
        lr_sweep(s.params, s.evaluation, policy=s.policy, step=s.step, etas=[LR], prediction=stub)
    zero = update_direction(s.params, s.update_batch, policy=s.policy, adam=AdamState.zeros(s.params, lr=0.0))
    with pytest.raises(ValueError, match="learning rate is 0.0.*--lr"):
        lr_sweep(s.params, s.evaluation, policy=s.policy, step=zero, etas=[LR])


def test_plot_lr_sweep(setting, tmp_path, monkeypatch):
    s = setting
    sweep = lr_sweep(s.params, s.evaluation, policy=s.policy, step=s.step, etas=[LR / 10, LR],
                     prediction=s.prediction, method="both")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install matplotlib"):
            plot_lr_sweep(sweep, tmp_path / "sweep.png")
    else:
        path = plot_lr_sweep(sweep, tmp_path / "sweep.png")
        assert (tmp_path / "sweep.png").stat().st_size > 0 and path.endswith("sweep.png")
        monkeypatch.setitem(sys.modules, "matplotlib", None)
        with pytest.raises(ImportError, match="pip install matplotlib"):
            plot_lr_sweep(sweep, tmp_path / "again.png")
    with pytest.raises(ValueError, match="takes an LRSweepResult"):
        plot_lr_sweep(s.prediction, tmp_path / "x.png")
