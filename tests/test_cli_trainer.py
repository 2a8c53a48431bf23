"""``funcprobe probe`` takes the step the trainer takes: its config (--trainer-config, training_args.bin), its chat
template, its reward functions (--reward, --reward-weights) and its logged rollouts (--rollouts) — on the checkpoints
of a real TRL ``GRPOTrainer`` run (``examples/train_trl_checkpoint.py``, shared fixture ``trl_run``).

Every bad input ends with one line on stderr (naming the problem and the fix) and exit status 2, without a traceback
of funcprobe's own; a reward function that raises shows its own traceback above that line.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import EXAMPLES, cli_fails
from funcprobe.checkpoints import load_checkpoint
from funcprobe.cli import main
from funcprobe.prompts import load_prompt_pool
from funcprobe.rollouts import load_rollouts, save_rollouts
from funcprobe.trainer_config import read_training_args

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["-B", "2", "-G", "2", "--max-new-tokens", "3", "--quiet"]
REWARDS = str(EXAMPLES / "rewards.py")

# A reward module for the module:function form: it reads the dataset's "answer" column (a keyword argument, as TRL
# passes the extra columns) and fails on demand, through a helper, so that the traceback has the user's frames.
USER_MODULE = '''
def answer_length(prompts, completions, answer, **kwargs):
    return [float(len(str(a))) for a in answer]


def _check(text):
    raise RuntimeError("cannot parse " + repr(text))


def fragile(prompts, completions, **kwargs):
    return [_check(c[0]["content"]) for c in completions]


def one_short(prompts, completions, **kwargs):
    return [0.0] * (len(completions) - 1)
'''


@pytest.fixture(scope="module")
def run(trl_run) -> Path:
    return Path(trl_run["out"])


@pytest.fixture(scope="module")
def checkpoint(run) -> Path:
    return run / "checkpoint-2"


@pytest.fixture(scope="module")
def run_config(run) -> dict:
    return json.loads((run / "trainer_config.json").read_text())


@pytest.fixture()
def user_module(tmp_path, monkeypatch) -> str:
    """The name of an importable module holding USER_MODULE's reward functions."""
    (tmp_path / "fp_user_rewards.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("fp_user_rewards", None)
    return "fp_user_rewards"


def probe(argv: list[str], out: Path, capsys=None) -> dict:
    """Run ``funcprobe probe`` in-process; it must succeed. Its JSON results."""
    assert main(["probe", *argv, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def tokenizer_of(checkpoint: Path):
    """The checkpoint's tokenizer, as funcprobe loads it (the files in the checkpoint folder)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint)


def template_ids(tokenizer, messages) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def no_funcprobe_frames(stderr: str) -> None:
    """Any traceback on stderr is the user's: no frame in funcprobe's own files."""
    frames = re.findall(r'File "([^"]+)"', stderr)
    assert not [f for f in frames if f"{os.sep}funcprobe{os.sep}" in f], stderr


# ------------------------------------------------------------------------------------------ the run end to end
def test_real_grpo_run_probes_end_to_end(run, checkpoint, run_config, tmp_path):
    """The documented command on a real GRPOTrainer checkpoint, as a user runs it: the run's config, its
    conversational prompts and its rewards as module:function. The step is the run's (loss, KL, scaling, clipping,
    G, budget, B), and the optimizer state maps onto the adapter's tensors."""
    out = tmp_path / "results.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(EXAMPLES), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "funcprobe", "probe", str(checkpoint), "--trainer-config",
                           str(run / "trainer_config.json"), "--prompts", str(run / "prompts.jsonl"),
                           "--reward", "rewards:digit_fraction", "--reward", "rewards:exact_answer", "--quiet",
                           "--out", str(out)], capture_output=True, text=True, env=env, cwd=str(tmp_path),
                          timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    results = json.loads(out.read_text())
    objective = results["objective"]
    for name in ("loss_type", "beta", "scale_rewards", "max_grad_norm", "use_bias_correction_kl"):
        assert objective[name] == run_config[name], name
    assert objective["loss_type"] == "grpo" and objective["beta"] == 0.04 and objective["scale_rewards"] == "group"
    assert results["delta_h1"]["objective"] == objective
    settings = results["settings"]
    assert (settings["G"], settings["B"], settings["max_new_tokens"]) == (run_config["num_generations"], 4,
                                                                          run_config["max_completion_length"])
    config_path = str(run / "trainer_config.json")
    assert {settings["sources"][k] for k in ("loss_type", "beta", "scale_rewards", "max_grad_norm", "G",
                                              "max_new_tokens", "temperature", "B")} == {config_path}
    assert settings["sources"]["lr"].startswith("optimizer state")
    assert settings["rewards"] == ["rewards:digit_fraction", "rewards:exact_answer"]
    assert len(results["batch"]["responses"]) == 4 and all(len(g) == 4 for g in results["batch"]["responses"])
    assert math.isfinite(results["delta_h1"]["deltaH1"]) and math.isfinite(results["summary"]["deltaH"])
    assert results["checkpoint"]["step"] == 2 and results["policy"]["adam_steps"] == [2]
    assert results["delta_h1"]["lr"] == pytest.approx(run_config["learning_rate"])  # constant schedule
    assert "prompt" in done.stdout and "loss_type=grpo" in done.stdout

    # The optimizer state maps: checkpoint-2's adapter is checkpoint-1's plus the AdamW step that checkpoint-2's
    # state (m, v after step 2, clipping included) gives — tensor by tensor (weight decay 0, constant lr).
    before, after = load_checkpoint(run / "checkpoint-1"), load_checkpoint(checkpoint)
    state = after.adam

    def predicted(exp_avg):
        moved = {}
        for name, theta in before.policy.params.items():
            h, t = state.hyper[name], state.step[name]
            assert t == 2 and h.weight_decay == 0
            m_hat = exp_avg[name].double() / (1 - h.beta1 ** t)
            v_hat = state.exp_avg_sq[name].double() / (1 - h.beta2 ** t)
            moved[name] = theta.double() - h.lr * m_hat / (v_hat.sqrt() + h.eps)
        return moved

    def worst(moved):
        step = max(float((after.policy.params[n].double() - before.policy.params[n].double()).abs().max())
                   for n in moved)
        return max(float((after.policy.params[n].double() - moved[n]).abs().max()) for n in moved) / step

    assert worst(predicted(dict(state.exp_avg))) <= 1e-4
    # Negative control: the moments of two same-shaped tensors swapped.
    names = [n for n in state.exp_avg if "lora_A" in n]
    a, b = names[0], next(n for n in names[1:] if state.exp_avg[n].shape == state.exp_avg[names[0]].shape)
    swapped = dict(state.exp_avg, **{a: state.exp_avg[b], b: state.exp_avg[a]})
    assert worst(predicted(swapped)) > 0.1


# ------------------------------------------------------------------------------------------ --trainer-config
def test_yaml_trainer_config_sets_the_step_and_flags_win(checkpoint, run, tmp_path):
    config = tmp_path / "grpo.yaml"
    config.write_text("num_generations: 3\nmax_completion_length: 4\ntemperature: 0.8\nloss_type: bnpo\n"
                      "beta: 0.1\nuse_bias_correction_kl: false\nscale_rewards: batch\nmax_grad_norm: 0.5\n"
                      "learning_rate: 2.0e-5\nper_device_train_batch_size: 6\nreport_to: none\n")
    results = probe([str(checkpoint), "--trainer-config", str(config), "--prompts", str(run / "prompts.jsonl"),
                     "--reward", f"{REWARDS}:digit_fraction", "--loss-type", "luspo", "--beta", "0.02", "--quiet"],
                    tmp_path / "r.json")
    objective = results["objective"]
    assert objective["loss_type"] == "luspo" and objective["beta"] == 0.02  # the flags
    assert objective["scale_rewards"] == "batch" and objective["max_grad_norm"] == 0.5  # the file
    assert objective["use_bias_correction_kl"] is False
    settings = results["settings"]
    assert (settings["G"], settings["B"], settings["max_new_tokens"], settings["temperature"]) == (3, 2, 4, 0.8)
    sources = settings["sources"]
    assert sources["loss_type"] == sources["beta"] == "flag"
    assert {sources[k] for k in ("scale_rewards", "max_grad_norm", "use_bias_correction_kl", "G", "B",
                                 "max_new_tokens", "temperature", "learning_rate")} == {str(config)}
    assert sources["reward_weights"] == "TRL default" and sources["lr"].startswith("optimizer state")
    # The config's learning rate is recorded; the step's is the optimizer state's (a scheduler has set it).
    assert settings["trainer_config"]["learning_rate"] == 2e-5 and results["delta_h1"]["lr"] == pytest.approx(1e-3)
    assert results["policy"]["temperature"] == 0.8
    assert [len(g) for g in results["batch"]["responses"]] == [3, 3]
    assert max(len(c) for group in results["batch"]["completion_ids"] for c in group) <= 4
    assert results["delta_h1"]["objective"] == objective


def test_json_trainer_config_with_trl_defaults(checkpoint, run, tmp_path):
    """Missing fields take TRL's defaults (not funcprobe's); TRL's boolean scale_rewards and max_grad_norm 0 (no
    clipping) are understood; an explicit --max-grad-norm and -G win."""
    config = tmp_path / "grpo.json"
    config.write_text(json.dumps({"num_generations": 3, "max_completion_length": 3, "scale_rewards": False,
                                  "max_grad_norm": 0, "per_device_train_batch_size": 6}))
    results = probe([str(checkpoint), "--trainer-config", str(config), "--prompts", str(run / "prompts.jsonl"),
                     "--reward", f"{REWARDS}:digit_fraction", "-G", "2", "--quiet"], tmp_path / "r.json")
    objective = results["objective"]
    assert objective["loss_type"] == "dapo" and objective["beta"] == 0.0  # TRL's defaults
    assert objective["scale_rewards"] == "none" and objective["max_grad_norm"] is None
    sources = results["settings"]["sources"]
    assert sources["loss_type"] == sources["beta"] == "TRL default" and sources["scale_rewards"] == str(config)
    assert sources["G"] == "flag" and results["settings"]["G"] == 2 and sources["B"] == str(config)
    assert results["step"]["grad_norm"] is None and results["delta_h1"]["clip_coef"] == 1.0

    results = probe([str(checkpoint), "--trainer-config", str(config), "--prompts", str(run / "prompts.jsonl"),
                     "--reward", f"{REWARDS}:digit_fraction", "--max-grad-norm", "2", *SMALL], tmp_path / "r2.json")
    assert results["objective"]["max_grad_norm"] == 2.0 and results["settings"]["sources"]["max_grad_norm"] == "flag"


@pytest.mark.parametrize("text, fragments", [
    ("num_iterations: 2\n", ["num_iterations=2", "off-policy", "set num_iterations=1"]),
    ("top_p: 0.9\n", ["top_p=0.9", "does not draw from π_θ", "top_p=1"]),
    ("top_k: 50\n", ["top_k=50", "top_k=0"]),
    ("entropy_coef: 0.01\n", ["entropy_coef", "entropy bonus"]),
    ("steps_per_generation: 4\n", ["steps_per_generation=4", "off-policy"]),
    ("loss_type: bnpo\ngradient_accumulation_steps: 2\n", ["loss_type='bnpo'", "micro-batch", "use 'dapo'"]),
    ("use_vllm: true\n", ["use_vllm", "vLLM sampler's log-probability ratio", "vllm_importance_sampling_correction=false"]),
    ("mask_truncated_completions: true\n", ["mask_truncated_completions"]),
    ("loss_type: ppo\n", ["loss_type 'ppo' is not supported", "choose one of"]),
    ("- loss_type\n- grpo\n", ["holds a list", "mapping of GRPOConfig fields"]),
    ("loss_type: [grpo\n", ["is not valid YAML"]),
])
def test_refused_trainer_settings(checkpoint, tmp_path, capsys, text, fragments):
    config = tmp_path / "grpo.yaml"
    config.write_text(text)
    cli_fails(capsys, ["probe", str(checkpoint), "--trainer-config", str(config), *SMALL], str(config), *fragments)


def test_both_refusals_are_named_at_once(checkpoint, tmp_path, capsys):
    config = tmp_path / "grpo.yaml"
    config.write_text("num_iterations: 2\ntop_p: 0.9\n")
    cli_fails(capsys, ["probe", str(checkpoint), "--trainer-config", str(config), *SMALL], "num_iterations=2",
              "top_p=0.9")


def test_missing_trainer_config(checkpoint, tmp_path, capsys):
    cli_fails(capsys, ["probe", str(checkpoint), "--trainer-config", str(tmp_path / "nope.json"), *SMALL],
              "does not exist", "GRPOConfig")


@pytest.mark.parametrize("flag, value, fragments", [
    ("--loss-type", "ppo", ["--loss-type 'ppo'", "choose one of dr_grpo, grpo, bnpo, dapo"]),
    ("--scale-rewards", "std", ["--scale-rewards 'std'", "group, batch, none"]),
    ("--reward-weights", "1,x", ["--reward-weights", "1,0.5"]),
])
def test_bad_step_flags(checkpoint, capsys, flag, value, fragments):
    cli_fails(capsys, ["probe", str(checkpoint), flag, value, *SMALL], *fragments)


# ------------------------------------------------------------------------------------------ training_args.bin
def test_training_args_bin_only_with_trust(checkpoint, run, run_config, tmp_path, capsys):
    """training_args.bin is a pickle: not read unasked (a note says so and why), read with --trust-training-args."""
    with pytest.raises(ValueError, match="loading a pickle runs code from the file.*--trust-training-args"):
        read_training_args(checkpoint, trust=False)
    argv = [str(checkpoint), "--prompts", str(run / "prompts.jsonl"), "--reward", f"{REWARDS}:digit_fraction",
            *SMALL]
    plain = probe(argv, tmp_path / "plain.json")
    printed = capsys.readouterr().out
    assert "training_args.bin" in printed and "pickle" in printed and "--trust-training-args" in printed
    assert plain["objective"]["loss_type"] == "dr_grpo" and plain["settings"]["trainer_config"] is None

    trusted = probe([*argv, "--trust-training-args"], tmp_path / "trusted.json")
    assert "was not read" not in capsys.readouterr().out
    objective = trusted["objective"]
    for name in ("loss_type", "beta", "scale_rewards", "max_grad_norm"):
        assert objective[name] == run_config[name], name
    assert trusted["settings"]["sources"]["loss_type"] == str(checkpoint / "training_args.bin")
    assert trusted["settings"]["sources"]["G"] == "flag"


def test_trust_without_training_args(run, tmp_path, capsys):
    bare = tmp_path / "checkpoint-2"
    shutil.copytree(run / "checkpoint-2", bare)
    (bare / "training_args.bin").unlink()
    cli_fails(capsys, ["probe", str(bare), "--trust-training-args", *SMALL], "no training_args.bin",
              "--trainer-config")


# ------------------------------------------------------------------------------------------ chat templates
def test_conversational_prompts_use_the_chat_template(checkpoint, run, tmp_path):
    """TRL's conversational prompts are rendered with the tokenizer's template and add_generation_prompt=True;
    --chat-template on wraps plain prompts as one user message."""
    tokenizer = tokenizer_of(checkpoint)
    pool = load_prompt_pool(run / "prompts.jsonl")
    results = probe([str(checkpoint), "--prompts", str(run / "prompts.jsonl"), "--reward",
                     f"{REWARDS}:digit_fraction", *SMALL], tmp_path / "r.json")
    for section in ("batch", "eval_batch"):
        expected = [template_ids(tokenizer, pool.prompts[i]) for i in results[section]["prompt_indices"]]
        assert results[section]["prompt_ids"] == expected
        assert tokenizer.decode(expected[0]).startswith("<user>") and tokenizer.decode(expected[0]).endswith(
            "<assistant>")

    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"prompt": p[0]["content"], "answer": a}) + "\n"
                             for p, a in zip(pool.prompts, pool.columns["answer"])))
    as_text = probe([str(checkpoint), "--prompts", str(plain), "--reward", f"{REWARDS}:digit_fraction", *SMALL],
                    tmp_path / "text.json")
    as_chat = probe([str(checkpoint), "--prompts", str(plain), "--reward", f"{REWARDS}:digit_fraction",
                     "--chat-template", "on", *SMALL], tmp_path / "chat.json")
    indices = as_text["batch"]["prompt_indices"]
    assert as_text["batch"]["prompt_ids"] == [tokenizer(pool.prompts[i][0]["content"])["input_ids"]
                                              for i in indices]
    assert as_chat["batch"]["prompt_ids"] == [template_ids(tokenizer, pool.prompts[i]) for i in indices]


def test_conversational_prompts_without_a_template(run, tmp_path, capsys):
    bare = tmp_path / "checkpoint-2"
    shutil.copytree(run / "checkpoint-2", bare)
    (bare / "chat_template.jinja").unlink()
    settings = json.loads((bare / "tokenizer_config.json").read_text())
    settings.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(settings))
    assert tokenizer_of(bare).chat_template is None
    cli_fails(capsys, ["probe", str(bare), "--prompts", str(run / "prompts.jsonl"), *SMALL],
              "conversational", "no chat_template", "tokenizer.chat_template", "--chat-template off")
    cli_fails(capsys, ["probe", str(bare), "--prompts", str(run / "prompts.jsonl"), "--chat-template", "off",
                       *SMALL], "conversational", "chat template is off", "plain-text prompts")


# ------------------------------------------------------------------------------------------ reward functions
def test_rewards_from_a_file_and_a_module_summed_with_weights(checkpoint, run, tmp_path, user_module):
    """TRL's signature, the dataset's columns as keyword arguments, and TRL's weighted sum."""
    results = probe([str(checkpoint), "--prompts", str(run / "prompts.jsonl"),
                     "--reward", f"{REWARDS}:digit_fraction", "--reward", f"{user_module}:answer_length",
                     "--reward-weights", "0.5,2", "--scale-rewards", "group", *SMALL], tmp_path / "r.json")
    pool = load_prompt_pool(run / "prompts.jsonl")
    batch = results["batch"]
    raw = torch.tensor(batch["raw_rewards"], dtype=torch.float64)
    assert raw.shape == (2, 2, 2)
    for n, index in enumerate(batch["prompt_indices"]):
        assert raw[n, :, 1].tolist() == [float(len(pool.columns["answer"][index]))] * 2  # the "answer" column
        for g, text in enumerate(batch["responses"][n]):
            assert raw[n, g, 0] == pytest.approx(sum(ch.isdigit() for ch in text) / max(len(text), 1), abs=1e-7)
    combined = torch.tensor(batch["rewards"], dtype=torch.float64)
    assert torch.allclose(combined, 0.5 * raw[..., 0] + 2.0 * raw[..., 1], rtol=1e-6, atol=1e-7)  # float32, as TRL
    assert results["objective"]["reward_weights"] == [0.5, 2.0]
    assert results["settings"]["sources"]["reward_weights"] == "flag"
    centred = combined - combined.mean(dim=1, keepdim=True)
    expected = centred / (combined.std(dim=1, keepdim=True) + 1e-4)
    assert torch.allclose(torch.tensor(batch["advantages"], dtype=torch.float64), expected, atol=1e-5)


def test_reward_weights_must_match_the_rewards(checkpoint, capsys):
    cli_fails(capsys, ["probe", str(checkpoint), "--reward", f"{REWARDS}:digit_fraction", "--reward-weights",
                       "1,2", *SMALL], "2 reward weights", "1 reward functions", "one weight per function")


def test_bad_reward_specs(checkpoint, tmp_path, capsys):
    cli_fails(capsys, ["probe", str(checkpoint), "--reward", str(tmp_path / "missing.py") + ":f", *SMALL],
              "not found", "module.sub:function")
    cli_fails(capsys, ["probe", str(checkpoint), "--reward", f"{REWARDS}:no_such_function", *SMALL],
              "no_such_function")


def test_a_reward_that_raises_keeps_the_batch(checkpoint, run, tmp_path, capsys, user_module):
    """The user's traceback and the prompt, one last line with the fix, and the sampled batch saved: rerunning on
    it with --rollouts and a working reward scores exactly those completions."""
    out = tmp_path / "results.json"
    prompts = str(run / "prompts.jsonl")
    assert main(["probe", str(checkpoint), "--prompts", prompts, "--reward", f"{user_module}:fragile", *SMALL,
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    rescue = tmp_path / "results.failed-rollouts.jsonl"
    assert "reward function 'fragile' raised RuntimeError: cannot parse" in err
    assert "prompt [{'role': 'user', 'content':" in err and f"{os.sep}fp_user_rewards.py" in err
    assert "in _check" in err and 'raise RuntimeError("cannot parse " + repr(text))' in err
    no_funcprobe_frames(err)
    last = err.strip().splitlines()[-1]
    assert last.startswith("funcprobe probe: error: reward function 'fragile' raised RuntimeError")
    assert f"--rollouts {rescue}" in last and "traceback above is the function's own" in last
    assert err.count(f"--rollouts {rescue}") == 2 and "save_rollouts(PATH)" not in err  # the library's note: replaced
    assert not out.exists()

    records = load_rollouts(rescue)
    assert len(records) == 2 and all(r.G == 2 and r.completion_ids and r.prompt_ids for r in records)
    assert all(r.rewards is None and "answer" in r.columns for r in records)
    again = probe([str(checkpoint), "--prompts", prompts, "--rollouts", str(rescue), "--reward",
                   f"{REWARDS}:digit_fraction", "--quiet"], tmp_path / "again.json")
    assert again["batch"]["completion_ids"] == [r.completion_ids for r in records]
    assert again["batch"]["prompt_ids"] == [r.prompt_ids for r in records]

    # The same function on the logged rollouts: the file is unchanged, and the error says so.
    assert main(["probe", str(checkpoint), "--prompts", prompts, "--rollouts", str(rescue), "--reward",
                 f"{user_module}:fragile", "--quiet"]) == 2
    err = capsys.readouterr().err
    no_funcprobe_frames(err)
    assert err.strip().splitlines()[-1].endswith(f"{rescue} is unchanged: after fixing the function, rerun with the "
                                                 "same --rollouts.")


def test_a_reward_of_the_wrong_length(checkpoint, run, tmp_path, capsys, user_module):
    cli_fails(capsys, ["probe", str(checkpoint), "--prompts", str(run / "prompts.jsonl"), "--reward",
                       f"{user_module}:one_short", *SMALL, "--out", str(tmp_path / "r.json")],
              "'one_short' returned 3 rewards, but 4 were expected", "one reward per completion",
              f"--rollouts {tmp_path / 'r.failed-rollouts.jsonl'}")
    assert len(load_rollouts(tmp_path / "r.failed-rollouts.jsonl")) == 2


# ------------------------------------------------------------------------------------------ logged rollouts
def _logged(checkpoint, run, path: Path) -> tuple[list, list]:
    """A rollouts file as a trainer callback logs it: 3 conversational prompts × 3 completions with ids and
    rewards, and the answer column."""
    tokenizer = tokenizer_of(checkpoint)
    pool = load_prompt_pool(run / "prompts.jsonl")
    eos = tokenizer.eos_token_id
    texts = [["12", "7", "abcdefgh"], ["3", "45", "x"], ["9", "99", "0"]]
    completion_ids = [[tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in group] for group in texts]
    completion_ids[0][2] = completion_ids[0][2][:-1]  # cut at the budget (the text is its ids' decoding, as logged)
    rewards = [[1.0, 0.0, 0.5], [0.0, 1.0, 0.25], [1.0, 1.0, 0.0]]
    save_rollouts(path, pool.prompts[:3], [[[{"role": "assistant", "content": t}] for t in g] for g in texts],
                  completion_ids, rewards=rewards, columns={"answer": pool.columns["answer"][:3]})
    return completion_ids, rewards


def test_logged_rollouts_are_the_update_batch(checkpoint, run, tmp_path):
    """--rollouts: the update batch is exactly the file's (ids, rewards; G from the file); E is sampled fresh."""
    path = tmp_path / "rollouts.jsonl"
    completion_ids, rewards = _logged(checkpoint, run, path)
    results = probe([str(checkpoint), "--prompts", str(run / "prompts.jsonl"), "--rollouts", str(path),
                     "--max-new-tokens", "8", "--scale-rewards", "none", "--eval-B", "2", "--quiet"],
                    tmp_path / "r.json")
    batch = results["batch"]
    assert batch["source"] == f"logged rollouts {path}" and batch["prompt_indices"] is None
    assert batch["completion_ids"] == completion_ids and batch["rewards"] == rewards
    for row, expected in zip(batch["advantages"], rewards):  # computed in float32, as TRL does
        assert row == pytest.approx([r - sum(expected) / 3 for r in expected], abs=1e-7)
    settings = results["settings"]
    assert (settings["B"], settings["G"], results["delta_h1"]["B"]) == (3, 3, 3)
    assert settings["sources"]["G"] == settings["sources"]["B"] == f"rollouts file {path}"
    evaluation = results["eval_batch"]
    assert evaluation["source"].startswith("sampled from") and len(evaluation["responses"]) == 2  # --eval-B
    assert all(len(g) == 3 for g in evaluation["responses"])  # G (here the file's) for E too
    assert evaluation["completion_ids"] != completion_ids[:2]


def test_rollouts_disagreeing_with_g(checkpoint, run, tmp_path, capsys):
    path = tmp_path / "rollouts.jsonl"
    _logged(checkpoint, run, path)
    cli_fails(capsys, ["probe", str(checkpoint), "--prompts", str(run / "prompts.jsonl"), "--rollouts", str(path),
                       "-G", "4", "--quiet"], "G=3", "G is 4 (flag)", "must agree")
    cli_fails(capsys, ["probe", str(checkpoint), "--prompts", str(run / "prompts.jsonl"), "--rollouts", str(path),
                       "-B", "2", "--quiet"], "B=3 prompts but -B is 2", "leave -B out")


def test_rollouts_file_with_a_bad_line(checkpoint, run, tmp_path, capsys):
    path = tmp_path / "rollouts.jsonl"
    good = json.dumps({"prompt": "1+1=", "completions": ["2", "3"], "rewards": [1.0, 0.0]})
    path.write_text(good + "\n" + good + "\n" + '{"prompt": "2+2=", "completions": ["4"' + "\n")
    cli_fails(capsys, ["probe", str(checkpoint), "--rollouts", str(path), *SMALL], f"{path}, line 3",
              "invalid JSON", '"completions": [G ≥ 2')
    path.write_text(good + "\n" + json.dumps({"prompt": "2+2=", "completions": ["4", "5"], "rewards": [1.0]}) + "\n")
    cli_fails(capsys, ["probe", str(checkpoint), "--rollouts", str(path), *SMALL], "line 2",
              '"rewards" must hold one entry per completion')
