"""``funcprobe probe``: the command's JSON holds the library's numbers, and bad inputs end with one line and exit 2."""

from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_fails as _fails
from funcprobe.checkpoints import load_checkpoint
from funcprobe.cli import derive_seed, draw_eval_prompts, main, select_prompts
from funcprobe.delta_h1 import delta_h1
from funcprobe.heldout import delta_h1_heldout, paired_difference
from funcprobe.realised import crn_delta_h, snis_delta_h
from funcprobe.rewards import load_prompts_jsonl
from funcprobe.sampling import sample_batch
from funcprobe.update import rl_update

SMALL = ["-B", "4", "-G", "4", "--max-new-tokens", "6", "--quiet"]




@pytest.fixture(scope="module")
def run_dir(tiny_run) -> Path:
    """The shared tiny training run: OUT/base, OUT/checkpoint-1, OUT/checkpoint-2, OUT/prompts.jsonl."""
    return Path(tiny_run["out"])


@pytest.fixture(scope="module")
def checkpoint_dir(run_dir) -> Path:
    return max(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def _strict_json(text: str):
    """Parse as standard JSON: NaN, Infinity and -Infinity are refused (as JavaScript's, Go's or jq's parsers do)."""
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_probe_json_matches_the_library(checkpoint_dir, tmp_path, capsys):
    out, plot = tmp_path / "results.json", tmp_path / "sweep.png"
    etas = [1e-3, 2.5e-3, 1e-2]
    argv = ["probe", str(checkpoint_dir), *SMALL, "--eval-B", "5", "--eval-G", "3", "--realised", "both",
            "--in-sample", "--eta-sweep", ",".join(map(str, etas)), "--out", str(out), "--plot", str(plot)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "δĤ₁(E) first-order change of this step" in printed and "δH₁ U-statistic" in printed
    assert "ΔH realised, common random numbers" in printed and "first-order regime" in printed
    assert "ΔH realised, importance sampling" in printed and "(BIASED)" in printed and "ΔH(η) sweep" in printed
    assert "-0 " not in printed and " nan" not in printed.lower()
    assert plot.is_file() and plot.stat().st_size > 0
    results = _strict_json(out.read_text())

    # The library, step by step, with the same seeds and the same prompt selections.
    checkpoint = load_checkpoint(checkpoint_dir)
    policy, adam, params = checkpoint.policy, checkpoint.adam, checkpoint.policy.params
    pool, answers = load_prompts_jsonl(checkpoint.prompts_path)
    order = list(range(len(pool)))
    random.Random(0).shuffle(order)
    chosen = order[:4]
    eval_seed = derive_seed(0, "evaluation")
    eval_chosen = draw_eval_prompts(len(pool), 5, seed=eval_seed)
    assert eval_seed != 0 and eval_chosen == random.Random(eval_seed).choices(range(len(pool)), k=5)

    def draw(indices, seed, G):
        return sample_batch(policy, params, [pool[i] for i in indices], G=G, reward_fn="answer", max_new_tokens=6,
                            seed=seed, tokenizer=checkpoint.tokenizer, meta={"answers": [answers[i] for i in indices]},
                            prompt_index=indices)

    sampled, evaluation = draw(chosen, 0, 4), draw(eval_chosen, eval_seed, 3)
    prediction = delta_h1(params, sampled.batch, policy=policy, adam=adam)
    new_params, _ = rl_update(params, sampled.batch, policy=policy, adam=adam)
    crn = crn_delta_h(params, new_params, policy=policy, sample=evaluation)
    snis = snis_delta_h(params, new_params, policy=policy, batch=evaluation.batch)
    in_sample = snis_delta_h(params, new_params, policy=policy, batch=sampled.batch)

    assert results["batch"]["prompt_indices"] == chosen and results["eval_batch"]["prompt_indices"] == eval_chosen
    assert results["batch"]["responses"] == sampled.responses
    assert results["eval_batch"]["responses"] == evaluation.responses and results["eval_seed"] == eval_seed
    assert results["eval_batch"]["rewards"] == evaluation.batch.rewards.tolist()
    assert math.isclose(results["delta_h1"]["deltaH1"], prediction.deltaH1, rel_tol=1e-12, abs_tol=1e-300)
    assert math.isclose(results["delta_h1"]["se_deltaH1"], prediction.se_deltaH1, rel_tol=1e-12)
    # The headline: δĤ₁(E) along that step on the evaluation batch (spec §9), paired with the realised change.
    heldout = delta_h1_heldout(params, prediction.step, evaluation.batch, policy=policy)
    assert math.isclose(results["delta_h1_heldout"]["deltaH1"], heldout.deltaH1, rel_tol=1e-9)
    assert math.isclose(results["delta_h1_heldout"]["se"], heldout.se, rel_tol=1e-9)
    assert math.isclose(results["summary"]["heldout"], heldout.deltaH1, rel_tol=1e-9)
    # The command's θ⁺ comes from δH₁'s own Ȳ (no second gradient pass); rl_update's differs by Ȳ's summation order.
    for name, result in (("crn", crn), ("snis", snis)):
        assert math.isclose(results["realised"][name]["deltaH"], result.deltaH, rel_tol=1e-9), name
        assert math.isclose(results["realised"][name]["se"], result.se, rel_tol=1e-9), name
    assert math.isclose(results["summary"]["deltaH"], snis.deltaH, rel_tol=1e-9)
    paired = paired_difference(snis, heldout)
    assert math.isclose(results["paired"]["snis"]["difference"], paired.difference, rel_tol=1e-9, abs_tol=1e-15)
    assert math.isclose(results["paired"]["snis"]["se"], paired.se, rel_tol=1e-9)
    assert results["summary"]["verdict"] == results["paired"]["snis"]["verdict"]
    assert results["summary"]["realised_method"] == "snis" and results["realised"]["crn"]["B"] == 5
    assert results["realised"]["snis"]["estimator"] == "rao_blackwell"
    assert math.isclose(results["in_sample"]["deltaH"], in_sample.deltaH, rel_tol=1e-9)
    assert results["in_sample"]["in_sample"] is True and "biased" in results["in_sample"]["notes"]["in_sample"]
    assert "biased" in results["summary"]["in_sample_note"]

    sweep = results["lr_sweep"]
    assert [row["eta"] for row in sweep["rows"]] == etas and sweep["B"] == 5 and sweep["method"] == "both"
    assert sweep["prediction"] == "deltaH1_heldout"
    for row in sweep["rows"]:
        assert math.isclose(row["predicted"], row["eta"] / sweep["lr"] * heldout.deltaH1, rel_tol=1e-9)
        assert math.isclose(row["predicted_ustatistic"], row["eta"] / sweep["lr"] * prediction.deltaH1, rel_tol=1e-9)
        assert row["paired_se"] is not None and row["first_order"] in (True, False)

    assert results["seed"] == 0 and results["config"]["B"] == 4 and results["config"]["eta_sweep"]
    assert set(results["versions"]) >= {"funcprobe", "torch", "transformers", "peft", "python"}
    assert results["checkpoint"]["layout"] == "hf_trainer"
    assert results["checkpoint"]["step"] == checkpoint.step
    assert results["checkpoint"]["path"] == str(checkpoint_dir)
    assert results["checkpoint"]["base"] == checkpoint.base
    assert {"load", "sample", "sample_eval", "delta_h1", "update", "realised_crn", "realised_snis", "in_sample",
            "lr_sweep", "total"} <= set(results["timings"])
    assert results["peak_memory"]["bytes"] > 0


def test_the_step_gradient_is_computed_once(checkpoint_dir, tmp_path, monkeypatch):
    """δH₁, the update and the sweep share δH₁'s Ȳ: one delta_h1 call, no other gradient of the RL loss, and no
    gradient pass at all outside delta_h1 (vjps and tapped forwards counted where they are made)."""
    import importlib

    from funcprobe.policy import Policy

    # The modules (funcprobe's package namespace exports functions of the same names).
    delta_h1_module, lora_grads, update_module = (importlib.import_module(f"funcprobe.{name}")
                                                  for name in ("delta_h1", "lora_grads", "update"))

    calls = {"delta_h1": 0, "policy_gradient": 0, "vjp_outside": 0, "tapped_outside": 0}
    inside = {"depth": 0}
    real_delta_h1, real_gradient = delta_h1_module.delta_h1, update_module.policy_gradient
    real_vjps, real_tapped = Policy.iter_logprob_vjps, lora_grads.tapped_forward

    def counted_delta_h1(*args, **kwargs):
        calls["delta_h1"] += 1
        inside["depth"] += 1
        try:
            return real_delta_h1(*args, **kwargs)
        finally:
            inside["depth"] -= 1

    def counted_gradient(*args, **kwargs):
        calls["policy_gradient"] += 1
        return real_gradient(*args, **kwargs)

    def counted_vjps(self, *args, **kwargs):
        calls["vjp_outside"] += inside["depth"] == 0
        return real_vjps(self, *args, **kwargs)

    def counted_tapped(*args, **kwargs):
        calls["tapped_outside"] += inside["depth"] == 0
        return real_tapped(*args, **kwargs)

    monkeypatch.setattr(delta_h1_module, "delta_h1", counted_delta_h1)
    monkeypatch.setattr(update_module, "policy_gradient", counted_gradient)
    monkeypatch.setattr(Policy, "iter_logprob_vjps", counted_vjps)
    monkeypatch.setattr(lora_grads, "tapped_forward", counted_tapped)
    if hasattr(delta_h1_module, "tapped_forward"):
        monkeypatch.setattr(delta_h1_module, "tapped_forward", counted_tapped)
    argv = ["probe", str(checkpoint_dir), *SMALL, "--eval-B", "3", "--eval-G", "3", "--realised", "both",
            "--eta-sweep", "1e-3,1e-2", "--out", str(tmp_path / "results.json")]
    assert main(argv) == 0
    assert calls == {"delta_h1": 1, "policy_gradient": 0, "vjp_outside": 0, "tapped_outside": 0}, calls


def test_zero_learning_rate_is_caught_before_sampling(checkpoint_dir, tmp_path, capsys):
    """The end of a decaying schedule stores lr = 0 for the next step: refused before any sampling, naming --lr."""
    import torch

    folder = tmp_path / "checkpoint-9"
    shutil.copytree(checkpoint_dir, folder)
    state = torch.load(folder / "optimizer.pt", weights_only=False)
    for group in state["param_groups"]:
        group["lr"] = 0.0
    torch.save(state, folder / "optimizer.pt")
    prompts = checkpoint_dir.parent / "prompts.jsonl"
    line = _fails(capsys, ["probe", str(folder), "--prompts", str(prompts), *SMALL], "learning rate", "is 0",
                  "--lr")
    assert "sample" not in line.lower() or "schedule" in line
    out = tmp_path / "r.json"
    assert main(["probe", str(folder), "--prompts", str(prompts), *SMALL, "--lr", "1e-3", "--out", str(out)]) == 0
    assert _strict_json(out.read_text())["delta_h1"]["lr"] == 1e-3


def test_eval_seed_equal_to_seed_is_refused(checkpoint_dir, capsys):
    _fails(capsys, ["probe", str(checkpoint_dir), *SMALL, "--eval-seed", "0"], "--eval-seed 0 equals --seed")


def test_probe_finds_the_run_folders_prompts(run_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["probe", str(run_dir), "-B", "3", "-G", "2", "--max-new-tokens", "2", "--quiet",
                 "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert Path(results["batch"]["prompts_file"]) == run_dir / "prompts.jsonl"
    pool, _ = load_prompts_jsonl(run_dir / "prompts.jsonl")
    assert all(prompt in pool for prompt in results["batch"]["prompts"])
    assert results["config"]["prompts"] is None and results["lr_sweep"] is None


def test_missing_checkpoint_subprocess(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "funcprobe", "probe", str(tmp_path / "missing_dir")],
                               capture_output=True, text=True)
    assert completed.returncode == 2
    assert len(completed.stderr.strip().splitlines()) == 1, completed.stderr
    assert "does not exist" in completed.stderr and "Traceback" not in completed.stderr


def test_corrupt_optimizer(checkpoint_dir, tmp_path, capsys):
    broken = tmp_path / "checkpoint-2"
    shutil.copytree(checkpoint_dir, broken)
    (broken / "optimizer.pt").write_bytes(b"not a torch file")
    _fails(capsys, ["probe", str(broken), *SMALL], "optimizer.pt", "corrupt")


def test_prompts_file_with_a_bad_line(checkpoint_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "1+1=", "answer": "2"}\n\n{"prompt": "2+2=", "answer": 4\n')
    _fails(capsys, ["probe", str(checkpoint_dir), "--prompts", str(prompts), *SMALL], "line 3", "invalid JSON")


def test_more_prompts_than_the_pool(checkpoint_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": i + 1}) + "\n" for i in range(3)))
    _fails(capsys, ["probe", str(checkpoint_dir), "--prompts", str(prompts), *SMALL], "-B 4", "3", "--replace")


def test_top_p_is_refused(checkpoint_dir, capsys):
    _fails(capsys, ["probe", str(checkpoint_dir), *SMALL, "--top-p", "0.9"], "--top-p 0.9", "π_θ", "bias every estimator")


@pytest.mark.parametrize("sweep, message", [("1e-3,abc", "'abc' is not a number"), ("1e-3,-1e-3", "> 0"),
                                            ("1e-3,,1e-2", "comma-separated")])
def test_bad_eta_sweep(checkpoint_dir, capsys, sweep, message):
    _fails(capsys, ["probe", str(checkpoint_dir), *SMALL, "--eta-sweep", sweep], "--eta-sweep", message)


def test_no_prompts_anywhere(tmp_path, checkpoint_dir, capsys):
    alone = tmp_path / "alone" / "checkpoint-2"
    shutil.copytree(checkpoint_dir, alone)
    _fails(capsys, ["probe", str(alone), *SMALL], "no prompts", "--prompts")


def test_select_prompts():
    assert sorted(select_prompts(5, 5, seed=1)) == list(range(5))
    assert select_prompts(8, 3, seed=7) == select_prompts(8, 3, seed=7)
    drawn = select_prompts(2, 6, seed=0, replace=True)
    assert len(drawn) == 6 and set(drawn) <= {0, 1}
    with pytest.raises(ValueError, match="--replace"):
        select_prompts(2, 3, seed=0)


def test_memory_budget_plans_the_chunks(checkpoint_dir, tmp_path, capsys):
    out = tmp_path / "planned.json"
    assert main(["probe", str(checkpoint_dir), *SMALL, "--memory-budget", "8GB", "--out", str(out)]) == 0
    assert "memory plan: seq_chunk=" in capsys.readouterr().out
    results = json.loads(out.read_text())
    plan = results["memory_plan"]
    assert plan["budget_bytes"] == 8 * 10 ** 9 and plan["fits"] and plan["batch_shape"][:2] == [4, 4]
    assert plan["batch_shape"][3] == 6
    delta = results["delta_h1"]
    assert (delta["seq_chunk"], delta["token_chunk"], delta["stored_unit_vectors"]) == (
        plan["seq_chunk"], plan["token_chunk"], plan["store_unit_vectors"])
    assert results["config"]["memory_budget"] == "8GB" and results["config"]["seq_chunk"] is None
    assert delta["chunk_peak_bytes"] and delta["peak_memory_bytes"] >= max(delta["chunk_peak_bytes"])


def test_explicit_chunks_win_over_the_memory_budget(checkpoint_dir, tmp_path, capsys):
    out = tmp_path / "explicit.json"
    assert main(["probe", str(checkpoint_dir), *SMALL, "--memory-budget", "8GB", "--seq-chunk", "1",
                 "--token-chunk", "32", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert (results["delta_h1"]["seq_chunk"], results["delta_h1"]["token_chunk"]) == (1, 32)
    assert results["memory_plan"] is not None


def test_memory_budget_too_small(checkpoint_dir, capsys):
    _fails(capsys, ["probe", str(checkpoint_dir), *SMALL, "--memory-budget", "1KB"], "above the budget")


def test_bad_memory_budget(checkpoint_dir, capsys):
    _fails(capsys, ["probe", str(checkpoint_dir), *SMALL, "--memory-budget", "lots"], "--memory-budget")
    # A bare number is bytes: 12 cannot be meant, and is refused before loading (not after, as "0.0 MiB").
    _fails(capsys, ["probe", str(checkpoint_dir), *SMALL, "--memory-budget", "12"], "12 bytes", "12GB")


@pytest.mark.parametrize("plot", ["sweep.svgx", "sweep"])
def test_plot_format_is_checked_before_the_run(checkpoint_dir, tmp_path, capsys, plot):
    """The plot is drawn last: a file type matplotlib cannot write must not cost a whole run first."""
    _fails(capsys, ["probe", str(checkpoint_dir), *SMALL, "--eta-sweep", "1e-3", "--plot", str(tmp_path / plot)],
           "matplotlib cannot write", ".png")


def test_no_memory_plan_without_a_budget(checkpoint_dir, tmp_path, capsys):
    out = tmp_path / "plain.json"
    assert main(["probe", str(checkpoint_dir), "-B", "3", "-G", "2", "--max-new-tokens", "2", "--quiet",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["memory_plan"] is None
