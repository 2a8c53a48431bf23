"""The dtype's systematic error against the reported SEs (issue 12): funcprobe.precision.check_precision warns when
rounding could move δH₁ or ΔĤ by more than a quarter of their SE, and `funcprobe probe` shows it as a note."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from funcprobe import Policy
from funcprobe.precision import (DTYPE_RELATIVE_ERROR, PrecisionWarning, check_precision, float32_head,
                                 precision_key, systematic_error)
from funcprobe.testing import tiny_causal_lm, tiny_peft_model


def _prediction(grad_term, state_term, se):
    return SimpleNamespace(grad_term=grad_term, state_term=state_term, se_deltaH1=se, se_grad_plugin=se)


@pytest.fixture(scope="module")
def bf16_policy():
    return Policy.from_peft(tiny_peft_model("qwen2", dtype=torch.bfloat16, seed=1))


def test_bound_is_the_measured_relative_error_of_each_term():
    row = DTYPE_RELATIVE_ERROR["bfloat16"]
    bounds = systematic_error("bfloat16", grad_term=-2.0, state_term=1.0, deltaH=-3.0)
    assert bounds["deltaH1"] == pytest.approx(2.0 * row["grad_term"] + 1.0 * row["state_term"])
    assert bounds["deltaH"] == pytest.approx(3.0 * row["deltaH"])
    assert systematic_error("float64", grad_term=1.0, state_term=1.0)["deltaH1"] == 0.0
    assert systematic_error("int8", grad_term=1.0, state_term=1.0)["deltaH1"] is None


def test_warns_when_rounding_exceeds_a_quarter_of_the_se(bf16_policy):
    assert precision_key(bf16_policy) == "bfloat16"
    bound = systematic_error("bfloat16", grad_term=1e-3, state_term=2e-4)["deltaH1"]
    with pytest.warns(PrecisionWarning, match="bfloat16.*float32"):
        record = check_precision(_prediction(1e-3, 2e-4, se=3.9 * bound), bf16_policy)
    assert record["warning"] is not None and record["bound_deltaH1"] == pytest.approx(bound)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        assert check_precision(_prediction(1e-3, 2e-4, se=4.1 * bound), bf16_policy)["warning"] is None
    realised = SimpleNamespace(deltaH=1e-3, se=1e-6)  # a tiny SE on ΔĤ: the realised side warns on its own
    with pytest.warns(PrecisionWarning, match="ΔĤ by up to"):
        check_precision(_prediction(1e-3, 2e-4, se=1.0), bf16_policy, realised)


def test_a_zero_or_missing_se_is_not_compared(bf16_policy):
    """Every advantage 0 (SE exactly 0) or B < 3 (jackknife NaN): no ratio to a zero SE, no warning, no crash."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        for se in (0.0, float("nan")):
            record = check_precision(_prediction(0.0, 2e-4, se=se), bf16_policy, SimpleNamespace(deltaH=1e-3, se=se))
            assert record["warning"] is None and record["bound_deltaH1"] > 0


def test_float32_policy_does_not_warn_at_ordinary_ses():
    policy = Policy.from_peft(tiny_peft_model("qwen2", dtype=torch.float32, seed=2))
    assert precision_key(policy) == "float32"
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        assert check_precision(_prediction(1e-3, 2e-4, se=1e-5), policy)["warning"] is None


def test_float32_head_keeps_the_decoder_narrow_and_the_head_wide():
    from peft import LoraConfig, get_peft_model

    model = float32_head(tiny_causal_lm("qwen2", dtype=torch.bfloat16, seed=3))
    assert model.get_output_embeddings().weight.dtype == torch.float32
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    policy = Policy.from_peft(peft_model)
    assert precision_key(policy) == "bfloat16+float32 head" and policy.logsoftmax_dtype == torch.float32
    hidden = policy._final_hidden(policy.params, torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.bool))
    assert hidden.dtype == torch.float32
    # a float32 model is left alone
    plain = tiny_causal_lm("qwen2", dtype=torch.float32, seed=3)
    assert float32_head(plain) is plain and plain.get_output_embeddings().weight.dtype == torch.float32


def test_probe_command_prints_the_precision_note(tiny_run, tmp_path, capsys, monkeypatch):
    from funcprobe import precision
    from funcprobe.cli import main

    checkpoint = max(Path(tiny_run["out"]).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    monkeypatch.setitem(precision.DTYPE_RELATIVE_ERROR, "float32",
                        {"grad_term": 10.0, "state_term": 10.0, "deltaH": 10.0})  # pretend float32 were coarse
    out = tmp_path / "results.json"
    assert main(["probe", str(checkpoint), "-B", "3", "-G", "4", "--max-new-tokens", "6", "--quiet",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "note: the model runs in float32, whose rounding can move δH₁" in printed
    record = json.loads(out.read_text())["precision"]
    assert record["key"] == "float32" and record["warning"].startswith("the model runs in float32")
