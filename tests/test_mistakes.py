"""A researcher's mistakes (issue 19), one test per kind: each is refused (or told the truth) as a mechanism, not as
the one case the issue found."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from funcprobe import (Objective, Policy, attribute, crn_delta_h, delta_h1, delta_h1_heldout,
                       entropy, lr_sweep, policy_gradient, rl_update, sample_batch, snis_delta_h, update_direction)
from funcprobe.testing import char_tokenizer, tiny_peft_model, warm_adam_state

TOKENIZER = char_tokenizer()
VOCAB = len(TOKENIZER)
PROMPTS = ["1+1=", "22*3=?", "7", "(5-2)*4="]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def lengths_reward(prompts, responses, meta):
    return [[float(len(text)) for text in group] for group in responses]


@pytest.fixture(scope="module")
def policy():
    return Policy.from_peft(tiny_peft_model("qwen2", vocab_size=VOCAB, seed=7))


@pytest.fixture(scope="module")
def sampled(policy):
    return sample_batch(policy, policy.params, PROMPTS, G=3, reward_fn=lengths_reward, max_new_tokens=6, seed=0,
                        tokenizer=TOKENIZER)


@pytest.fixture(scope="module")
def adam(policy):
    return warm_adam_state(policy.params, step=3)


# ------------------------------------------------------------------------------- kind 1: batch ↔ step mismatches
def test_kind1_every_estimator_refuses_a_batch_made_for_another_objective(policy, sampled, adam, tmp_path):
    batch = sampled.batch
    assert batch.advantage_recipe is not None and batch.advantage_recipe.scale_rewards == "none"
    group = Objective(scale_rewards="group")
    calls = {
        "delta_h1": lambda: delta_h1(policy.params, batch, policy=policy, adam=adam, objective=group),
        "attribute": lambda: attribute(policy.params, batch, policy=policy, adam=adam, objective=group),
        "policy_gradient": lambda: policy_gradient(policy.params, batch, policy=policy, objective=group),
        "rl_update": lambda: rl_update(policy.params, batch, policy=policy, adam=adam, objective=group),
        "update_direction": lambda: update_direction(policy.params, batch, policy=policy, adam=adam,
                                                     objective=group),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError) as error:
            call()
        message = str(error.value)
        assert name in message and "scale_rewards='none'" in message and "'group'" in message, message
        assert "sample_batch(..., scale_rewards='group')" in message, message
    # reward weights are part of the recipe too
    with pytest.raises(ValueError, match=r"reward_weights: the batch's advantages were made with \[1.0\]"):
        policy_gradient(policy.params, batch, policy=policy, objective=Objective(reward_weights=(2.0,)))
    # the recipe survives saving (safetensors and JSON) and selecting prompts; new advantages drop it
    from funcprobe.rollouts_file import load_batch, load_batch_json, save_batch, save_batch_json

    save_batch(batch, tmp_path / "b.safetensors")
    save_batch_json(batch, tmp_path / "b.json")
    for loaded in (load_batch(tmp_path / "b.safetensors"), load_batch_json(tmp_path / "b.json"),
                   batch.select_prompts([0, 1])):
        assert loaded.advantage_recipe == batch.advantage_recipe
    assert batch.replace(advantages=batch.advantages * 2).advantage_recipe is None
    # agreeing objectives, no objective (adopts the recipe) and user-built batches (no recipe) pass
    policy_gradient(policy.params, batch, policy=policy, objective=Objective(scale_rewards="none"))
    grouped = sample_batch(policy, policy.params, PROMPTS, G=3, reward_fn=lengths_reward, max_new_tokens=6, seed=0,
                           tokenizer=TOKENIZER, scale_rewards="group")
    policy_gradient(policy.params, grouped, policy=policy)
    policy_gradient(policy.params, grouped.batch.replace(advantage_recipe=None), policy=policy, objective=Objective())


def test_kind1_optimizer_of_another_step_and_non_adamw_optim_are_refused(tiny_run, tmp_path):
    from funcprobe.checkpoints import load_checkpoint
    from funcprobe.trainer_config import trainer_settings

    out = Path(tiny_run["out"])
    second = tmp_path / "checkpoint-2"
    shutil.copytree(out / "checkpoint-2", second)
    shutil.copy(out / "checkpoint-1" / "optimizer.pt", second / "optimizer.pt")
    base = out / "base"
    with pytest.raises(ValueError, match=r"after 1 step, but the checkpoint .* is at global_step 2.*--optimizer PATH"):
        load_checkpoint(second, base=base)
    with pytest.raises(ValueError, match=r"after 1 step.*global_step 2"):
        load_checkpoint(out / "checkpoint-2", base=base, optimizer=out / "checkpoint-1" / "optimizer.pt")
    assert load_checkpoint(out / "checkpoint-2", base=base).step == 2
    for optim in ("adafactor", "adamw_bnb_8bit", "lion_32bit", "sgd", "paged_adamw_8bit", "OptimizerNames.ADAFACTOR"):
        with pytest.raises(ValueError, match=r"optim='[a-z_0-9]+': funcprobe models torch's AdamW step"):
            trainer_settings({"optim": optim}, source="cfg.json")
    for optim in ("adamw_torch", "adamw_torch_fused", "OptimizerNames.ADAMW_TORCH"):
        trainer_settings({"optim": optim}, source="cfg.json")


# ------------------------------------------------------------------------- kind 4: no false "unreliable" from k̂
def test_kind4_khat_judges_only_weights_that_can_dominate(policy, sampled, adam):
    from funcprobe.realised import weight_diagnostics

    generator = torch.Generator().manual_seed(0)
    # null and tiny steps: weights within a few percent of each other are never "heavy-tailed"
    for sigma in (0.0, 0.01, 0.03, 0.1):
        flagged = sum(not weight_diagnostics(sigma * torch.randn(8, 4, generator=generator,
                                                                 dtype=torch.float64)).reliable for _ in range(200))
        assert flagged == 0, (sigma, flagged)
    # the case: log w within [−0.038, 0.063], ESS/G ≈ 1
    calm = torch.linspace(-0.038, 0.063, 32, dtype=torch.float64)[torch.randperm(32, generator=generator)]
    assert weight_diagnostics(calm.view(8, 4)).reliable
    # truly heavy tails are still caught, by k̂
    caught = 0
    for _ in range(200):
        u = torch.rand(8, 4, generator=generator, dtype=torch.float64)
        diag = weight_diagnostics(-torch.log(u))  # Pareto(α = 1) weights: k = 1
        caught += (not diag.reliable)
    assert caught >= 170, caught
    # `funcprobe attribute`'s interventions carry the same diagnostics and print them
    evaluation = sample_batch(policy, policy.params, ["3+4=", "9-1=", "2*2=", "8"], G=3, reward_fn=lengths_reward,
                              max_new_tokens=6, seed=5, tokenizer=TOKENIZER)
    result = attribute(policy.params, sampled.batch, policy=policy, adam=adam,
                       interventions={"positive_only": "positive_only"}, evaluation=evaluation.batch)
    row = result.interventions["positive_only"]
    for key in ("realised_reliable", "ess_min_fraction", "khat", "khat_assessed", "khat_threshold"):
        assert key in row, key
    text = str(result)
    line = next(line for line in text.splitlines() if line.strip().startswith("positive_only:"))
    assert "ESS/G min" in line and "k̂" in line and ("reliable" in line or "UNRELIABLE" in line), line
    assert "ESS/G min" in next(line for line in text.splitlines() if line.startswith("realised ΔĤ"))


# --------------------------------------------------------------- kind 3: the library's inputs, one helper, both forms
def test_kind3_every_public_function_takes_the_batch_or_its_sample(policy, sampled, adam):
    import inspect

    from funcprobe.batch import as_rollout_batch

    batch = sampled.batch
    assert as_rollout_batch(sampled, "x") is batch and as_rollout_batch(batch, "x") is batch
    params = policy.params
    new_params, _ = rl_update(params, batch, policy=policy, adam=adam)
    step = update_direction(params, batch, policy=policy, adam=adam)
    same = {
        "delta_h1": lambda b: delta_h1(params, b, policy=policy, adam=adam).deltaH1,
        "attribute": lambda b: attribute(params, b, policy=policy, adam=adam).grad_term,
        "policy_gradient": lambda b: float(policy_gradient(params, b, policy=policy)[0].sum()),
        "rl_update": lambda b: float(sum(t.sum() for t in rl_update(params, b, policy=policy, adam=adam)[0].values())),
        "snis_delta_h": lambda b: snis_delta_h(params, new_params, policy=policy, batch=b).deltaH,
        "entropy": lambda b: entropy(params, b, policy=policy).H,
        "delta_h1_heldout": lambda b: delta_h1_heldout(params, step, b, policy=policy).deltaH1,
        "lr_sweep": lambda b: lr_sweep(params, b, policy=policy, step=step, etas=[0.0, step.lr_by_name[
            next(iter(step.lr_by_name))]]).rows[-1].snis_deltaH,
    }
    for name, fn in same.items():
        assert fn(sampled) == fn(batch), name
    junk = {"input_ids": None}
    refusals = {
        "delta_h1": lambda: delta_h1(params, junk, policy=policy, adam=adam),
        "attribute": lambda: attribute(params, junk, policy=policy, adam=adam),
        "policy_gradient": lambda: policy_gradient(params, junk, policy=policy),
        "snis_delta_h": lambda: snis_delta_h(params, new_params, policy=policy, batch=junk),
        "entropy": lambda: entropy(params, junk, policy=policy),
        "delta_h1_heldout": lambda: delta_h1_heldout(params, step, junk, policy=policy),
        "lr_sweep": lambda: lr_sweep(params, junk, policy=policy, step=step, etas=[0.0]),
        "crn_delta_h": lambda: crn_delta_h(params, new_params, policy=policy, sample=junk),
    }
    for name, fn in refusals.items():
        with pytest.raises(ValueError, match=r"must be a funcprobe.RolloutBatch or the SampledBatch that "
                                             r"sample_batch returns.*got dict"):
            fn()
    # CRN repeats the draw: it needs the sample itself, and says so when given its batch
    with pytest.raises(ValueError, match=r"not its \.batch"):
        crn_delta_h(params, new_params, policy=policy, sample=batch)
    # policy is required where it is required
    for fn in (snis_delta_h, crn_delta_h, entropy, delta_h1, attribute, delta_h1_heldout, policy_gradient,
               rl_update, update_direction, lr_sweep):
        parameter = inspect.signature(fn).parameters["policy"]
        assert parameter.default is inspect.Parameter.empty and "None" not in str(parameter.annotation), fn


# ------------------------------------------------------------------ kind 2: outputs checked before the work, never lost
@pytest.mark.parametrize("command", ["probe", "attribute"])
def test_kind2_outputs_are_checked_before_loading_and_never_lost(command, tiny_run, tmp_path, capsys, monkeypatch):
    import funcprobe.checkpoints as checkpoints
    from conftest import cli_fails
    from funcprobe.cli import main

    checkpoint = str(Path(tiny_run["out"]) / "checkpoint-2")
    small = ["-B", "4", "-G", "4", "--max-new-tokens", "4", "--quiet"]
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    an_existing_dir = tmp_path / "results"
    an_existing_dir.mkdir()
    flags = ["--out"] + (["--html", "--plot"] if command == "attribute" else [])

    def no_loading(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the outputs were checked")

    with monkeypatch.context() as patch:
        patch.setattr(checkpoints, "load_checkpoint", no_loading)
        import funcprobe.pipeline as pipeline
        patch.setattr(pipeline, "load_checkpoint", no_loading, raising=False)
        for flag in flags:
            name = {"--out": "r.json", "--html": "p.html", "--plot": "p.png"}[flag]
            cli_fails(capsys, [command, checkpoint, *small, flag, str(an_existing_dir)], flag,
                      "is an existing directory")
            cli_fails(capsys, [command, checkpoint, *small, flag, str(a_file / name)], flag, "is a file")
            cli_fails(capsys, [command, checkpoint, *small, flag, f"/proc/funcprobe-{name}"], flag,
                      "nothing can be written")
        if command == "attribute":
            cli_fails(capsys, [command, checkpoint, *small, "--out", str(tmp_path / "x.json"), "--html",
                               str(tmp_path / "x.json")], "both name")

    # a write that still fails at the end: the results are saved where the message says, exit 2
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "late" / "r.json"
    import funcprobe.report as report
    real = report.write_json

    def disk_full(path, results):
        if Path(path) == out:
            raise OSError(28, "No space left on device")
        return real(path, results)

    monkeypatch.setattr(report, "write_json", disk_full)
    reward = tmp_path / "length_reward.py"  # rewards that differ, so that attribute has something to attribute
    reward.write_text("def length(prompts, completions, **kwargs):\n    return [float(len(c)) for c in completions]\n")
    assert main([command, checkpoint, *small, "--reward", f"{reward}:length", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "the results are in" in err[0], err
    saved = Path(err[0].split("the results are in ")[1].rstrip("."))
    assert saved.parent == tmp_path and json.loads(saved.read_text())["command"] == command


@pytest.mark.parametrize("command", ["probe", "attribute", "trajectory"])
def test_kind2_outputs_never_overwrite_an_input(command, tiny_run, tmp_path, capsys, monkeypatch):
    """--out/--html/--plot naming an input (the prompts, trainer-config, rollouts, optimizer or reward file, anything
    in the checkpoint or base folder; also through a symlink) is refused before loading (review BAD row 47)."""
    import funcprobe.checkpoints as checkpoints
    import funcprobe.pipeline as pipeline
    from conftest import cli_fails

    run = tmp_path / "run"  # a copy: a failing test must not damage the shared tiny run
    shutil.copytree(tiny_run["out"], run)
    checkpoint = run / "checkpoint-2"
    prompts = tmp_path / "p.jsonl"
    shutil.copy(run / "prompts.jsonl", prompts)
    config = tmp_path / "tc.json"
    config.write_text(json.dumps({"num_generations": 4}))
    reward = tmp_path / "r.py"
    reward.write_text("def length(prompts, completions, **kwargs):\n    return [float(len(c)) for c in completions]\n")
    link = tmp_path / "link.json"
    link.symlink_to(prompts)
    target = str(run if command == "trajectory" else checkpoint)
    argv = [command, target, "-B", "4", "-G", "4", "--max-new-tokens", "4", "--quiet", "--prompts", str(prompts),
            "--trainer-config", str(config), "--reward", f"{reward}:length"]
    before = {p: p.read_bytes() for p in [prompts, config, reward, *run.rglob("*")] if p.is_file()}

    def no_loading(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the outputs were checked")

    monkeypatch.setattr(checkpoints, "load_checkpoint", no_loading)
    monkeypatch.setattr(pipeline, "load_checkpoint", no_loading, raising=False)
    flags = {"probe": ["--out"], "attribute": ["--out", "--html", "--plot"], "trajectory": ["--out", "--plot"]}[command]
    cases = [(prompts, "the --prompts file"), (config, "the --trainer-config file"), (reward, "--reward"),
             (link, "the --prompts file"), (checkpoint / "trainer_state.json", "inside"),
             (run / "checkpoint-1" / "adapter_config.json", "inside" if command == "trajectory" else "the checkpoint"),
             (Path(tiny_run["out"]) / "base" / "config.json", "the base model's folder"),  # the adapter's, absolute
             (run / "prompts.jsonl", "prompts")]
    for flag in flags:
        for path, fragment in cases:
            if command != "trajectory" and path.parent.name == "checkpoint-1":
                continue  # another checkpoint of the run: not this command's input
            cli_fails(capsys, [*argv, flag, str(path)], flag, fragment, "input of this run")
    if command != "trajectory":
        rollouts = tmp_path / "roll.jsonl"
        rollouts.write_text("{}\n")
        optimizer = tmp_path / "optimizer.pt"
        shutil.copy(checkpoint / "optimizer.pt", optimizer)
        cli_fails(capsys, [*argv, "--rollouts", str(rollouts), "--out", str(rollouts)], "the --rollouts file")
        cli_fails(capsys, [*argv, "--optimizer", str(optimizer), "--out", str(optimizer)], "the --optimizer file")
    assert {p: p.read_bytes() for p in before} == before
    # a new file beside the checkpoints, or a results file written there before, is not an input
    from funcprobe.cli import _run_inputs, parse_args
    from funcprobe.report import check_output_paths

    (run / "results.json").write_text("{}")
    check_output_paths({"--out": run / "results.json", "--plot": run / "new.png"},
                       **_run_inputs(parse_args([command, str(run), *argv[2:]])))


# ---------------------------------------------------------------- kind 5: messages that say nothing untrue, or more
REWARD_FILE = '''
def constant(prompts, completions, **kwargs):
    return [1.0] * len(completions)


def as_text(prompts, completions, **kwargs):
    return ["1.0"] * len(completions)


def unscored(prompts, completions, **kwargs):
    return [None] * len(completions)
'''


def test_kind5_messages_are_true_and_say_enough(tiny_run, tmp_path, capsys, monkeypatch):
    from conftest import cli_fails
    from funcprobe.cli import main
    from funcprobe.objective import compute_advantages

    monkeypatch.chdir(tmp_path)  # a failed probe without --out rescues its rollouts into the working directory
    out = Path(tiny_run["out"])
    checkpoint = str(out / "checkpoint-2")
    small = ["-B", "2", "-G", "2", "--max-new-tokens", "3", "--quiet"]
    rewards = tmp_path / "my_rewards.py"
    rewards.write_text(REWARD_FILE)
    # equal rewards with β > 0: the KL term still moves the step — never "the gradient term is exactly 0"
    _, info = compute_advantages(torch.ones(3, 4), warn=False)
    assert "exactly 0" in info.message(beta=0.0)
    assert "exactly 0" not in info.message(beta=0.1) and "KL" in info.message(beta=0.1)
    assert "exactly 0" not in info.message()
    assert main(["probe", checkpoint, *small, "--reward", f"{rewards}:constant", "--beta", "0.1"]) == 0
    printed = capsys.readouterr().out
    assert "every advantage is 0" in printed and "exactly 0" not in printed and "KL penalty" in printed
    # a reward function returning strings is refused, as TRL refuses it
    cli_fails(capsys, ["probe", checkpoint, *small, "--reward", f"{rewards}:as_text"], "returned the string '1.0'",
              "TRL")
    # None for everything: "nothing was scored", not "equal rewards"
    line = cli_fails(capsys, ["probe", checkpoint, *small, "--reward", f"{rewards}:unscored"], "nothing was scored")
    assert "equal rewards" not in line
    # a missing column: refused before sampling, and no mention of a traceback that is not shown
    rescued = set(tmp_path.glob("*failed-rollouts*"))  # the failures above scored rollouts: they were kept
    pool = tmp_path / "no_answers.jsonl"
    pool.write_text("".join(json.dumps({"prompt": f"{n}+1="}) + "\n" for n in range(8)))
    line = cli_fails(capsys, ["probe", checkpoint, *small, "--prompts", str(pool), "--reward", "answer"],
                     "needs the column 'answer'")
    assert "traceback" not in line and set(tmp_path.glob("*failed-rollouts*")) == rescued
    # a missing optimizer.pt: the command line's flag, not the library's argument
    bare = tmp_path / "adapter"
    shutil.copytree(out / "checkpoint-2", bare, ignore=shutil.ignore_patterns("optimizer.pt", "trainer_state.json"))
    line = cli_fails(capsys, ["probe", str(bare), *small, "--base", str(out / "base")], "--optimizer PATH")
    # a hub id as the base model with no network: a fast, clear failure (no minute of retries)
    import time

    import funcprobe.checkpoints as checkpoints
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(checkpoints, "_offline", lambda: False)
    monkeypatch.setenv("HF_ENDPOINT", "http://funcprobe-no-such-host.invalid")
    started = time.perf_counter()
    cli_fails(capsys, ["probe", checkpoint, *small, "--base", "someorg/not-a-cached-model"],
              "not in the local Hugging Face cache", "cannot be reached", "--base PATH")
    assert time.perf_counter() - started < 15
    monkeypatch.setattr(checkpoints, "_offline", lambda: True)  # HF_HUB_OFFLINE=1
    cli_fails(capsys, ["probe", checkpoint, *small, "--base", "someorg/not-a-cached-model"], "offline")


def test_kind5_negative_numbers_in_any_form_reach_the_value_checks(tiny_run, capsys):
    """-1e-3, -inf or a comma list starting with one is a value, not an unknown option (argparse's own matcher knows
    only -1 and -0.5: "expected one argument", review WEAK 18), on every subcommand."""
    from conftest import cli_fails
    from funcprobe.cli import parse_args

    checkpoint = str(Path(tiny_run["out"]) / "checkpoint-2")
    for command in ("probe", "attribute", "trajectory"):
        args = parse_args([command, checkpoint, "--lr", "-1e-3", "--beta", "-1E+1", "--temperature", "-inf"])
        assert (args.lr, args.beta, args.temperature) == (-1e-3, -10.0, -float("inf"))
    assert parse_args(["probe", checkpoint, "--eta-sweep", "-1e-3,1e-3"]).eta_sweep == "-1e-3,1e-3"
    small = ["-B", "2", "-G", "2", "--max-new-tokens", "2", "--quiet"]
    cli_fails(capsys, ["probe", checkpoint, *small, "--lr", "-1e-3"], "--lr must be finite and > 0; got -0.001")
    cli_fails(capsys, ["attribute", checkpoint, *small, "--beta", "-1e-1"], "beta must be ≥ 0")
    cli_fails(capsys, ["probe", checkpoint, *small, "--eta-sweep", "-1e-3,1e-3"], "--eta-sweep", "> 0")
    with pytest.raises(SystemExit):  # options are still options
        parse_args(["probe", checkpoint, "--lr", "-B"])


@pytest.mark.parametrize("command", ["probe", "attribute"])
def test_kind5_units_that_cannot_partition_b_are_refused_before_loading(command, tiny_run, capsys, monkeypatch):
    """--units 5 with -B 4 was refused only after both batches were sampled (review WEAK 19)."""
    import funcprobe.checkpoints as checkpoints
    import funcprobe.pipeline as pipeline
    from conftest import cli_fails

    def no_loading(*args, **kwargs):
        raise AssertionError("loaded before --units was checked")

    monkeypatch.setattr(checkpoints, "load_checkpoint", no_loading)
    monkeypatch.setattr(pipeline, "load_checkpoint", no_loading, raising=False)
    argv = [command, str(Path(tiny_run["out"]) / "checkpoint-2"), "-B", "4", "-G", "2", "--quiet"]
    cli_fails(capsys, [*argv, "--units", "5"], "--units 5: units=M must satisfy 2 ≤ M ≤ B = 4")
    cli_fails(capsys, [*argv, "--units", "3"], "--units 3: block mode needs equal blocks", "[2, 4]")


def test_kind5_ctrl_c_ends_with_one_line_and_keeps_the_sampled_batch(tiny_run, tmp_path, capsys, monkeypatch):
    """A KeyboardInterrupt mid-run: one line "interrupted", exit 130, no traceback; once U is sampled it is saved as
    the failed-reward rescue saves it, and --rollouts of that file rebuilds the same batch (review WEAK 22)."""
    import funcprobe.attribution as attribution
    import sys

    import funcprobe.pipeline as pipeline
    from funcprobe.cli import main

    trajectory = sys.modules["funcprobe.trajectory"]  # the package's name `trajectory` is the function
    monkeypatch.chdir(tmp_path)
    checkpoint = str(Path(tiny_run["out"]) / "checkpoint-2")
    reward = tmp_path / "r.py"
    reward.write_text("def length(prompts, completions, **kwargs):\n    return [float(len(c)) for c in completions]\n")
    argv = [checkpoint, "-B", "2", "-G", "2", "--max-new-tokens", "3", "--quiet", "--reward", f"{reward}:length"]
    seen = []

    def interrupt(*args, **kwargs):
        seen.append(args[1] if len(args) > 1 else None)
        raise KeyboardInterrupt

    def one_line(command, *fragments):
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"funcprobe {command}: interrupted"), err
        for fragment in fragments:
            assert fragment in err[0], err[0]
        return err[0]

    with monkeypatch.context() as patch:  # during U's sampling: nothing to keep
        patch.setattr(pipeline, "sample_prompts", interrupt)
        assert main(["probe", *argv]) == 130
        assert "saved" not in one_line("probe") and not list(tmp_path.glob("*rollouts*"))
    with monkeypatch.context() as patch:  # after U is sampled: kept, beside --out
        patch.setattr(pipeline, "measure", interrupt)
        assert main(["probe", *argv, "--out", str(tmp_path / "keep.json")]) == 130
        rescue = tmp_path / "keep.failed-rollouts.jsonl"
        one_line("probe", f"saved in {rescue}", f"--rollouts {rescue}")
        assert main(["probe", *argv, "--rollouts", str(rescue)]) == 130
        one_line("probe")
        first, again = seen[-2], seen[-1]
        for name in ("input_ids", "attention_mask", "response_mask", "rewards", "advantages"):
            assert torch.equal(getattr(first, name), getattr(again, name)), name
    with monkeypatch.context() as patch:
        patch.setattr(attribution, "attribute", interrupt)
        assert main(["attribute", *argv]) == 130
        one_line("attribute", "saved in funcprobe-failed-rollouts.jsonl")
        patch.setattr(trajectory, "trajectory", interrupt)
        assert main(["trajectory", str(Path(tiny_run["out"])), *argv[1:]]) == 130
        one_line("trajectory")


def test_kind5_library_mistakes_get_the_fix_not_a_bare_error(policy, sampled, adam):
    """The reward-weights mismatch suggests the weights' fix (review WEAK 11); a TRL-signature reward_fn is refused
    before sampling with how to wrap it (WEAK 27); adam=None names what to pass, in every estimator (WEAK 28)."""
    from funcprobe.update import apply_step

    batch = sampled.batch
    with pytest.raises(ValueError) as error:
        policy_gradient(policy.params, batch, policy=policy, objective=Objective(reward_weights=(1.0, 0.5)))
    assert "objective.replace(reward_weights=None)" in str(error.value), error.value
    with pytest.raises(ValueError, match=r"objective.replace\(scale_rewards='none', reward_weights=None\)"):
        delta_h1(policy.params, batch, policy=policy, adam=adam,
                 objective=Objective(scale_rewards="group", reward_weights=(2.0,)))
    # TRL's signature, with or without a column argument, is refused before anything is sampled
    for trl_reward in (lambda prompts, completions, **kw: [1.0] * len(completions),
                       lambda prompts, completions, answer, **kw: [1.0] * len(completions)):
        with pytest.raises(TypeError, match=r"reward_fn\(prompts, responses, meta\).*TRL's reward signature.*"
                                            r"TRLRewards\(\[f\], prompts=prompts"):
            sample_batch(policy, policy.params, PROMPTS, G=2, reward_fn=trl_reward, max_new_tokens=2, seed=0,
                         tokenizer=TOKENIZER)
    # adam=None
    step = update_direction(policy.params, batch, policy=policy, adam=adam)
    calls = {"delta_h1": lambda: delta_h1(policy.params, batch, policy=policy, adam=None),
             "rl_update": lambda: rl_update(policy.params, batch, policy=policy, adam=None),
             "update_direction": lambda: update_direction(policy.params, batch, policy=policy, adam=None),
             "apply_step": lambda: apply_step(policy.params, None, step),
             "update_decomposition": lambda: attribute(policy.params, batch, policy=policy, adam=None)}
    for name, call in calls.items():
        with pytest.raises(ValueError, match=rf"{name}: adam must be a funcprobe.AdamState .*got None.*"
                                             r"load_checkpoint\(path\).adam.*AdamState.from_torch.*AdamState.zeros"):
            call()


NAN_REWARD = "def nan(prompts, completions, **kwargs):\n    return [float('nan')] * len(completions)\n"


def test_kind5_reward_data_mistakes_are_named_for_what_they_are(tiny_run, tmp_path, capsys, monkeypatch):
    """NaN rewards are "NaN", not "returned None" (review WEAK 16); a prompts line lacking the column a built-in reward
    needs is refused before sampling, as the data's fault (WEAK 17)."""
    import funcprobe.pipeline as pipeline
    from conftest import cli_fails

    monkeypatch.chdir(tmp_path)
    checkpoint = str(Path(tiny_run["out"]) / "checkpoint-2")
    small = ["-B", "2", "-G", "2", "--max-new-tokens", "3", "--quiet"]
    rewards = tmp_path / "nan_reward.py"
    rewards.write_text(NAN_REWARD)
    line = cli_fails(capsys, ["probe", checkpoint, *small, "--reward", f"{rewards}:nan"],
                     "returned NaN for 4 of the 4 completions", "the first for completion 0 of",
                     "rewards must be finite numbers", "--rollouts")
    assert "None" not in line.split("(return None")[0], line
    pool = tmp_path / "one_lacks.jsonl"
    pool.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n" + json.dumps({"prompt": "2+2="}) + "\n")

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before the prompts' columns were checked")

    monkeypatch.setattr(pipeline, "sample_prompts", no_sampling)
    line = cli_fails(capsys, ["probe", checkpoint, *small, "--prompts", str(pool)],
                     "needs the column 'answer' on every prompt, but 1 lack it", "one_lacks.jsonl, line 2",
                     "Add 'answer' to that line")
    assert "traceback" not in line and "function" not in line.split("Add")[1], line


def test_kind5_a_g_that_overrides_the_trainer_config_is_noted(tiny_run, tmp_path, capsys, monkeypatch):
    """-G against the config's num_generations: a note on stderr, before loading (review WEAK 20, first half)."""
    import funcprobe.checkpoints as checkpoints
    import funcprobe.pipeline as pipeline
    from funcprobe.cli import main

    def no_loading(*args, **kwargs):
        raise RuntimeError("stop after the checks")

    monkeypatch.setattr(checkpoints, "load_checkpoint", no_loading)
    monkeypatch.setattr(pipeline, "load_checkpoint", no_loading, raising=False)
    config = tmp_path / "tc.json"
    config.write_text(json.dumps({"num_generations": 8}))
    argv = ["probe", str(Path(tiny_run["out"]) / "checkpoint-2"), "--trainer-config", str(config), "--quiet"]
    for G, noted in (("4", True), ("8", False)):
        with pytest.raises(RuntimeError, match="stop after the checks"):
            main([*argv, "-G", G])
        err = capsys.readouterr().err
        assert ("note: -G 4 overrides num_generations=8" in err) == noted, err


# ------------------------------------------------------- kind 7: a rollouts file that does not belong to this checkpoint
def _rollouts(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_rollouts(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_kind7_rollouts_of_another_model_or_with_texts_not_their_ids_are_refused(policy, sampled, adam, tiny_run,
                                                                                  tmp_path, capsys, monkeypatch):
    from conftest import cli_fails
    from funcprobe.cli import main
    from funcprobe.rollouts import load_rollouts, rollouts_batch, save_rollouts

    # the library: what funcprobe's sampler writes passes; ids beyond the vocabulary, texts that are not the ids
    # (another tokenizer's ids, or texts shuffled) are refused, naming the line and the completion
    prompt_ids, completion_ids = sampled.batch.token_lists()
    good = tmp_path / "good.jsonl"
    save_rollouts(good, PROMPTS, sampled.responses, completion_ids, prompt_ids=prompt_ids,
                  rewards=sampled.raw_rewards)
    batch, _ = rollouts_batch(load_rollouts(good), TOKENIZER, max_new_tokens=6, vocab_size=policy.vocab_size)
    assert torch.equal(batch.input_ids, sampled.batch.input_ids)
    lines = _rollouts(good)
    big = [dict(line) for line in lines]
    big[1] = {**big[1], "completion_ids": [[VOCAB + 3] + ids[1:] for ids in big[1]["completion_ids"]]}
    with pytest.raises(ValueError, match=rf"line 2: completion_ids\[0\] holds token id {VOCAB + 3}, outside this "
                                         rf"model's vocabulary of {VOCAB}"):
        rollouts_batch(load_rollouts(_write_rollouts(tmp_path / "big.jsonl", big)), TOKENIZER, max_new_tokens=6,
                       vocab_size=policy.vocab_size)
    other = [dict(line) for line in lines]  # "another tokenizer": the same texts, other ids
    other[0] = {**other[0], "completion_ids": [[(t + 1) % 40 + 3 for t in ids[:-1]] + ids[-1:]
                                               for ids in other[0]["completion_ids"]]}
    with pytest.raises(ValueError, match=r"line 1: completion 0 is .* but its completion_ids decode to .* another "
                                         r"model or tokenizer"):
        rollouts_batch(load_rollouts(_write_rollouts(tmp_path / "other.jsonl", other)), TOKENIZER, max_new_tokens=6)
    prompts = [dict(line) for line in lines]  # prompt ids of another prompt
    prompts[2] = {**prompts[2], "prompt_ids": lines[0]["prompt_ids"]}
    with pytest.raises(ValueError, match=r"line 3: prompt_ids decode to '1\+1=' .* does not hold the prompt '7'"):
        rollouts_batch(load_rollouts(_write_rollouts(tmp_path / "prompts.jsonl", prompts)), TOKENIZER,
                       max_new_tokens=6)
    # a batch of ids beyond the vocabulary reaching the estimators directly: a ValueError, not an IndexError
    ids = sampled.batch.input_ids.clone()
    ids[0, 0, -1] = VOCAB + 3
    for call in (lambda b: delta_h1(policy.params, b, policy=policy, adam=adam),
                 lambda b: attribute(policy.params, b, policy=policy, adam=adam)):
        with pytest.raises(ValueError, match=rf"token id {VOCAB + 3} but the model's vocabulary has {VOCAB}"):
            call(sampled.batch.replace(input_ids=ids))

    # the command line: a file funcprobe wrote for this checkpoint (a failing reward's rescue) is read back; the same
    # file broken each way is refused, in one line, before anything is sampled
    monkeypatch.chdir(tmp_path)
    checkpoint = str(Path(tiny_run["out"]) / "checkpoint-2")
    small = ["--max-new-tokens", "4", "--quiet"]
    rewards = tmp_path / "my_rewards.py"
    rewards.write_text(REWARD_FILE + "\n\ndef length(prompts, completions, **kwargs):\n"
                       "    return [float(len(c)) for c in completions]\n")
    cli_fails(capsys, ["probe", checkpoint, "-B", "2", "-G", "2", *small, "--reward", f"{rewards}:as_text",
                       "--out", str(tmp_path / "r.json")], "returned the string")
    rescued = tmp_path / "r.failed-rollouts.jsonl"
    lines = _rollouts(rescued)
    assert all("completion_ids" in line and "prompt_ids" in line for line in lines)
    assert main(["probe", checkpoint, "--rollouts", str(rescued), *small, "--reward", f"{rewards}:length"]) == 0
    capsys.readouterr()
    import funcprobe.pipeline as pipeline

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before the rollouts file was checked")

    monkeypatch.setattr(pipeline, "sample_prompts", no_sampling)
    swapped = [dict(line) for line in lines]
    swapped[0] = {**swapped[0], "completions": swapped[0]["completions"][::-1]}
    if swapped[0]["completions"] == lines[0]["completions"]:
        swapped[0]["completions"] = [text + "x" for text in swapped[0]["completions"]]
    big = [dict(line) for line in lines]
    big[1] = {**big[1], "completion_ids": [[500] + ids[1:] for ids in big[1]["completion_ids"]]}
    for name, broken, expected in (("swapped", swapped, "line 1: completion"),
                                   ("big", big, "line 2: completion_ids[0] holds token id 500")):
        path = str(_write_rollouts(tmp_path / f"{name}.jsonl", broken))
        cli_fails(capsys, ["probe", checkpoint, "--rollouts", path, *small, "--reward", f"{rewards}:length"],
                  expected, "Probe the checkpoint the rollouts were logged from")


# ------------------------------------------------ kind 8: a base model, or an optimizer state, of another run or step
def _adapter_naming(source: Path, target: Path, base: str) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "adapter_config.json").read_text())
    (target / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": base}))
    return target


def test_kind8_a_base_or_optimizer_of_another_run_is_refused_before_loading(tiny_run, tmp_path, capsys):
    from conftest import cli_fails
    from safetensors.torch import load_file, save_file

    from funcprobe.checkpoints import load_checkpoint

    out = Path(tiny_run["out"])
    checkpoint, base = out / "checkpoint-2", out / "base"
    assert Path(json.loads((checkpoint / "adapter_config.json").read_text())["base_model_name_or_path"]) == base
    # another base of the same shapes (the LoRA attaches): other weights, or another vocabulary in config.json
    other = tmp_path / "other_base"
    shutil.copytree(base, other)
    weights = load_file(other / "model.safetensors")
    save_file({name: t + 0.01 for name, t in weights.items()}, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"the base model '{other}' .* is not the one the adapter in .* was trained "
                                         rf"on: its adapter_config.json names '{base}', which exists and differs "
                                         r"\(tensor '.*' has other values\)\. Leave base= \(--base\) out"):
        load_checkpoint(checkpoint, base=other)
    vocab = tmp_path / "vocab_base"
    shutil.copytree(base, vocab)
    config = json.loads((vocab / "config.json").read_text())
    (vocab / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 1}))
    small = ["-B", "2", "-G", "2", "--max-new-tokens", "3", "--quiet"]
    cli_fails(capsys, ["probe", str(checkpoint), *small, "--base", str(vocab)],
              f"vocab_size {config['vocab_size'] + 1} vs {config['vocab_size']}", "Leave base= (--base) out")
    # the same base elsewhere (a copy, or saved in another dtype) is accepted; a named base that is not here (moved,
    # a hub id) is not compared: users move base models
    same = tmp_path / "same_base"
    shutil.copytree(base, same)
    save_file({name: t.to(torch.bfloat16) for name, t in load_file(base / "model.safetensors").items()},
              same / "model.safetensors", metadata={"format": "pt"})
    assert load_checkpoint(checkpoint, base=same).step == 2
    moved = _adapter_naming(checkpoint, tmp_path / "moved" / "checkpoint-2", str(tmp_path / "gone"))
    assert load_checkpoint(moved, base=other).step == 2
    # a base of another shape: the first mismatching tensor and its shapes, and the flag
    from funcprobe.testing import tiny_peft_model

    wide = tmp_path / "wide_base"
    tiny_peft_model("qwen2", vocab_size=config["vocab_size"], hidden_size=96).get_base_model().save_pretrained(wide)
    capsys.readouterr()  # the loads' and the save's progress bars
    line = cli_fails(capsys, ["probe", str(moved), *small, "--base", str(wide)], "size mismatch for ",
                     "lora_A", "torch.Size", "--base PATH")
    assert "PeftModel:." not in line
    # a base given as its config.json, a full model given as the checkpoint: what each is, and what to pass
    cli_fails(capsys, ["probe", str(checkpoint), *small, "--base", str(base / "config.json")],
              "is a file, not a model folder", f"--base {base}")
    cli_fails(capsys, ["probe", str(base), *small], "is a full model", "not a LoRA adapter", "adapter_config.json")
    # without trainer_state.json, the folder name checkpoint-N (HF Trainer's) is the step the optimizer must be at
    nostate = tmp_path / "nostate" / "checkpoint-2"
    shutil.copytree(checkpoint, nostate, ignore=shutil.ignore_patterns("trainer_state.json"))
    assert load_checkpoint(nostate, base=base).adam is not None
    shutil.copy(out / "checkpoint-1" / "optimizer.pt", nostate / "optimizer.pt")
    with pytest.raises(ValueError, match=r"after 1 step, but the checkpoint .* is at global_step 2 \(its folder name "
                                         r"checkpoint-2, HF Trainer's checkpoint-\{global_step\}; no "
                                         r"trainer_state.json\).*--optimizer PATH"):
        load_checkpoint(nostate, base=base)


# ------------------------------------------------------------------------- kind 6: a plot whose ticks can be read
@pytest.mark.parametrize("scale", [1e-4, 1e-7, 3.0])
def test_kind6_attribution_plot_tick_labels_never_overlap(scale, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import random

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from funcprobe.report import plot_attribution

    figures = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    rng = random.Random(0)
    B, G, L = 4, 4, 6

    def values(spread, heavy=False):
        return [[[rng.gauss(0, spread) * (10 ** rng.uniform(0, 4) if heavy else 1) for _ in range(L)]
                 for _ in range(G)] for _ in range(B)]

    def near_zero(spread):  # most values just above a decade (the median, symlog's linthresh), a tail far out
        return [[[rng.choice((-1, 1)) * spread * (rng.uniform(1.5, 3) if rng.random() < 0.6 else
                                                   10 ** rng.uniform(0.5, 2.3)) for _ in range(L)]
                 for _ in range(G)] for _ in range(B)]

    cases = [(values(0.3 * scale), values(scale)), (values(0.3 * scale, True), values(scale, True)),
             (near_zero(1e-3 * scale), near_zero(scale))]
    for index, (token, covariance) in enumerate(cases):
        results = {"attribution": {
            "token": token, "covariance": covariance,
            "entropy": [[[rng.uniform(0.5, 3) for _ in range(L)] for _ in range(G)] for _ in range(B)],
            "response_mask": [[[1] * L for _ in range(G)] for _ in range(B)], "eta_g": 1.7, "deltaH1": -1e-3,
            "grad_term": -1e-3, "summary": {}}}
        plot_attribution(results, tmp_path / f"a{index}.png")
    assert len(figures) == 3
    for fig in figures:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes:
            for axis in (ax.xaxis, ax.yaxis):
                boxes = [label.get_window_extent(renderer) for label in axis.get_ticklabels()
                         if label.get_visible() and label.get_text()]
                assert len(boxes) >= 2
                for i, first in enumerate(boxes):
                    for second in boxes[i + 1:]:
                        assert not first.overlaps(second), [label.get_text() for label in axis.get_ticklabels()]
        real_close(fig)


def test_bench_khat_rule_runs_and_agrees_with_the_library():
    """bench/khat_rule.py (the numbers in bench/RESULTS.md) at a smoke size; it asserts that its 'ratio' rule is
    ``weight_diagnostics``'s verdict on every batch."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("khat_rule", Path(__file__).resolve().parents[1] / "bench" /
                                                  "khat_rule.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--batches", "20", "--enumeration-batches", "2"])
    rows = out["rows"]
    for sigma in ("0.0", "0.01", "0.03", "0.1"):
        assert rows[f"normal σ={sigma}"]["ratio_flagged"] == 0.0
    assert rows["student ν=1"]["ratio_flagged"] >= 0.9
