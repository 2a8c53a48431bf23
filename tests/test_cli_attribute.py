"""``funcprobe attribute``: the command's JSON holds the library's attribution of the same batch, and bad inputs end
with one line and exit 2."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import pytest
import torch

from funcprobe.checkpoints import load_checkpoint
from funcprobe.cli import main, parse_interventions, parse_quantiles
from funcprobe.delta_h1 import delta_h1
from funcprobe.rewards import load_prompts_jsonl
from funcprobe.sampling import sample_batch

SMALL = ["-B", "4", "-G", "3", "--max-new-tokens", "5", "--quiet"]


@pytest.fixture(scope="module")
def checkpoint_dir(tiny_run) -> Path:
    return max(Path(tiny_run["out"]).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_attribute_json_matches_delta_h1(checkpoint_dir, tmp_path, capsys):
    out = tmp_path / "attribution.json"
    reward = tmp_path / "length_reward.py"
    reward.write_text("def length(prompts, completions, **kwargs):\n"
                      "    return [float(len(c)) for c in completions]\n")
    assert main(["attribute", str(checkpoint_dir), *SMALL, "--reward", f"{reward}:length",
                 "--intervention", "clip_cov:0.1",
                 "--intervention", "positive_only", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "grad_term" in printed and "clip_cov:0.1" in printed
    results = _strict_json(out.read_text())
    attribution = results["attribution"]
    tokens = [v for prompt in attribution["token"] for seq in prompt for v in seq]
    assert math.isclose(sum(tokens), attribution["grad_term"], rel_tol=1e-9, abs_tol=1e-300)
    assert math.isclose(attribution["deltaH1"], attribution["grad_term"] + attribution["state_term"], rel_tol=1e-12)
    assert set(attribution["interventions"]) == {"clip_cov:0.1", "positive_only"}
    assert all(row["realised_delta_h"] is not None for row in attribution["interventions"].values())

    # The library on the same batch: the command loads the checkpoint with eager attention and samples as probe does.
    checkpoint = load_checkpoint(checkpoint_dir, attn_implementation="eager")
    policy, adam, params = checkpoint.policy, checkpoint.adam, checkpoint.policy.params
    pool, answers = load_prompts_jsonl(checkpoint.prompts_path)
    order = list(range(len(pool)))
    random.Random(0).shuffle(order)
    chosen = order[:4]
    batch = sample_batch(policy, params, [pool[i] for i in chosen], G=3, reward_fn="answer", max_new_tokens=5,
                         seed=0, tokenizer=checkpoint.tokenizer, meta={"answers": [answers[i] for i in chosen]},
                         prompt_index=chosen).batch
    assert results["input_ids"] == batch.input_ids.tolist()
    # Same responses (sampling does not depend on the reward); the command's rewards give its advantages.
    batch = dataclasses.replace(batch, advantages=torch.tensor(results["advantages"], dtype=torch.float64))
    assert attribution["grad_term"] != 0
    # The command attributes on spec §9's footing: Σ a (one forward-mode pass over U along ηP⊙ĝ_E) is the held-out
    # gradient term (reverse mode over E), and the step is the library's step on the same U.
    assert attribution["basis"] == "heldout"
    heldout = attribution["delta_h1_heldout"]
    assert math.isclose(attribution["grad_term"], heldout["grad_term"], rel_tol=1e-5)
    assert attribution["state_term"] == heldout["state_term"]
    assert attribution["paired"]["verdict"].startswith("the step is")
    reference = delta_h1(params, batch, policy=policy, adam=adam)
    step = reference.step.delta_theta()
    gain = sum(float((reference.step.ybar[n].double() * step[n].double()).sum()) for n in step)
    assert math.isclose(attribution["objective_gain"], gain, rel_tol=1e-6)
    texts = results["token_text"]
    assert len(texts) == 4 and all(len(seq) == batch.L for prompt in texts for seq in prompt)


@pytest.mark.parametrize("spec, message", [("nope", "kind must be"), ("clip_cov:2", "(0, 1]"),
                                           ("positive_only:0.1", "no fraction"), ("high_entropy:x", "number")])
def test_bad_intervention(checkpoint_dir, capsys, spec, message):
    assert main(["attribute", str(checkpoint_dir), *SMALL, "--intervention", spec]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("funcprobe attribute: error: ") and message in err[0]


def test_parsers():
    assert parse_interventions(["clip_cov", "clip_cov:0.02", "positive_only"]) == {
        "clip_cov": "clip_cov", "clip_cov:0.02": ("clip_cov", 0.02), "positive_only": "positive_only"}
    assert parse_quantiles("0.002,0.2") == (0.002, 0.2)
    with pytest.raises(ValueError, match="quantiles"):
        parse_quantiles("0,1")
