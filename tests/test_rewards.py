"""Reward built-ins, reward validation and the JSONL prompt loader."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
import torch

from funcprobe.rewards import (REWARDS, RewardFn, answer_match, check_rewards, last_number, load_prompts_jsonl,
                               make_tag_format, parse_number, tag_format)


@pytest.mark.parametrize("text,expected", [
    ("The answer is 42.", "42"),
    ("so x = -3", "-3"),
    ("total: 1,234 apples", "1234"),
    ("costs $2.50", "2.5"),
    ("1,2,3", "3"),
    ("from 3-4", "4"),
    ("\u22127 degrees", "-7"),
    ("first 10 then 0.25", "0.25"),
    ("(-2)", "-2"),
    ("no digits here", None),
])
def test_last_number(text, expected):
    assert last_number(text) == (None if expected is None else Decimal(expected))


def test_parse_number_of_gold_answers():
    assert parse_number(72) == Decimal(72) and parse_number(2.5) == Decimal("2.50")
    assert parse_number("#### 1,000") == Decimal(1000)
    assert parse_number(True) is None and parse_number(float("nan")) is None and parse_number([1]) is None


def test_answer_match():
    responses = [["It is 2.50", "2.5", "2.51", "nothing"], ["1,234", "1234.0", "-1234", "12 34"]]
    rewards = answer_match(["p0", "p1"], responses, {"answers": ["2.5", 1234]})
    assert rewards == [[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]
    assert answer_match(["p"], [["-3"]], {"answers": ["-3"]}) == [[1.0]]


def test_answer_match_needs_answers():
    with pytest.raises(ValueError, match="meta=.*answers"):
        answer_match(["p"], [["1"]], {})
    with pytest.raises(ValueError, match="2 entries for 1 prompts"):
        answer_match(["p"], [["1"]], {"answers": ["1", "2"]})
    with pytest.raises(ValueError, match="prompt 0.*holds no number"):
        answer_match(["p"], [["1"]], {"answers": ["unknown"]})


def test_tag_format():
    responses = [[
        "think... <answer>18</answer>",         # right
        "<answer> 18. </answer> done",          # right (spaces and a trailing period)
        "<answer>$1,8</answer>",                # well-formed, wrong
        "<answer>17</answer>",                  # well-formed, wrong
        "<answer>18 or 19</answer>",            # well-formed, not a single number: wrong
        "<answer>18</answer><answer>18</answer>",  # two blocks: malformed
        "</answer>18<answer>",                  # wrong order
        "<answer>  </answer>",                  # empty
        "18",                                   # no block
    ]]
    assert tag_format(["p"], responses, {"answers": ["18"]}) == [[1.0, 1.0, 0.1, 0.1, 0.1, 0.0, 0.0, 0.0, 0.0]]
    custom = make_tag_format(correct=2.0, format_only=0.5)
    assert custom(["p"], [["<answer>18</answer>", "<answer>x</answer>", "x"]], {"answers": [18]}) == [[2.0, 0.5, 0.0]]
    # A non-numeric gold answer is compared as a string.
    assert tag_format(["p"], [["<answer> Paris </answer>", "<answer>Rome</answer>"]],
                      {"answers": ["Paris"]}) == [[1.0, 0.1]]


def test_registry_and_protocol():
    assert REWARDS["answer"] is answer_match and REWARDS["tag"] is tag_format
    assert all(isinstance(fn, RewardFn) for fn in REWARDS.values())


def test_check_rewards():
    def my_reward(prompts, responses, meta):
        return None

    out = check_rewards([[1, 0], [0.5, 2]], 2, 2, my_reward)
    assert out.dtype == torch.float64 and out.shape == (2, 2)
    with pytest.raises(ValueError, match="my_reward.*shape \\(2, 3\\)"):
        check_rewards(torch.zeros(2, 3), 2, 2, my_reward)
    with pytest.raises(ValueError, match="my_reward.*rectangular"):
        check_rewards([[1, 0], [1]], 2, 2, my_reward)
    with pytest.raises(ValueError, match="my_reward.*non-finite.*\\[1, 0\\]"):
        check_rewards([[1, 0], [float("inf"), 0]], 2, 2, my_reward)


def write(tmp_path, lines):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_prompts_jsonl(tmp_path):
    path = write(tmp_path, [json.dumps({"prompt": "1+1=", "answer": "2"}), "",
                            json.dumps({"prompt": "2*3=", "answer": 6}), json.dumps({"prompt": "hi"})])
    prompts, answers = load_prompts_jsonl(path)
    assert prompts == ["1+1=", "2*3=", "hi"] and answers == ["2", "6", None]


@pytest.mark.parametrize("bad_line,message", [
    ("{not json", "line 2: invalid JSON"),
    (json.dumps({"question": "x"}), 'line 2: missing "prompt"'),
    (json.dumps({"prompt": 3}), 'line 2: "prompt" must be a string'),
    (json.dumps(["prompt"]), "line 2: expected a JSON object"),
    (json.dumps({"prompt": "x", "answer": [1]}), 'line 2: "answer" must be'),
])
def test_load_prompts_jsonl_errors_name_the_line(tmp_path, bad_line, message):
    path = write(tmp_path, [json.dumps({"prompt": "ok", "answer": "1"}), bad_line])
    with pytest.raises(ValueError, match=message):
        load_prompts_jsonl(path)


def test_load_prompts_jsonl_empty(tmp_path):
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts_jsonl(write(tmp_path, ["", "  "]))


# ------------------------------------------------------------------------------------------------ TRL-signature rewards
import math
import sys
import types

from funcprobe.objective import compute_advantages
from funcprobe.trl_rewards import RewardFunctionError, TRLRewards, load_reward_function
from funcprobe.testing import char_tokenizer

USER_REWARDS = '''
def length_reward(prompts, completions, completion_ids, **kwargs):
    return [float(len(ids)) for ids in completion_ids]


def picky(prompts, completions, answer, **kwargs):
    return [helper(c, a) for c, a in zip(completions, answer)]


def helper(completion, answer):
    if answer == "boom":
        raise KeyError("no such answer: " + answer)
    return 1.0


not_a_function = 3
'''


def write_module(tmp_path, name="user_rewards"):
    path = tmp_path / f"{name}.py"
    path.write_text(USER_REWARDS, encoding="utf-8")
    return path


def test_load_reward_function_from_file_and_module(tmp_path, monkeypatch):
    path = write_module(tmp_path)
    before = set(sys.modules)
    fn = load_reward_function(f"{path}:length_reward")
    assert fn.__name__ == "length_reward" and fn([""], ["x"], [[1, 2]]) == [2.0]
    assert set(sys.modules) == before and str(tmp_path) not in sys.path   # nothing left behind
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward_function("user_rewards:picky").__name__ == "picky"
    assert load_reward_function("answer").__name__ == "answer_match"
    assert load_reward_function("tag")(completions=[[{"role": "assistant", "content": "<answer>4</answer>"}]],
                                       answer=[4]) == [1.0]


@pytest.mark.parametrize("spec,message", [
    ("missing_dir/none.py:f", "file 'missing_dir/none.py' not found"),
    ("no_such_module_xyz:f", "module 'no_such_module_xyz' cannot be imported \\(ModuleNotFoundError: No module"),
    ("{path}:nope", "has no 'nope'.*length_reward"),
    ("{path}:not_a_function", "is a int, not callable"),
    ("{path}:", "expected"),
    ("whatever", "not a built-in.*module.sub:function"),
])
def test_load_reward_function_errors(tmp_path, spec, message):
    with pytest.raises(ValueError, match=message):
        load_reward_function(spec.format(path=write_module(tmp_path)))


def recorder(calls, values=None, name="rec"):
    def fn(prompts, completions, completion_ids, **kwargs):
        calls.append(dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs))
        return values if values is not None else [float(len(c if isinstance(c, str) else c[0]["content"]))
                                                   for c in completions]

    fn.__name__ = name
    return fn


def test_trl_call_kwargs_and_columns():
    calls = []
    rewards = TRLRewards([recorder(calls)], prompts=["p0", "p1"], columns={"answer": ["1", 2], "prompt": ["x", "y"],
                                                                          "completion_ids": [0, 0]})
    out = rewards(["p0", "p1"], [["a", "bb"], ["ccc", ""]], {"response_ids": [[[5], [6, 7]], [[8, 8, 8], [2]]]})
    assert out.shape == (2, 2, 1) and out[..., 0].tolist() == [[1.0, 2.0], [3.0, 0.0]]
    call = calls[0]
    assert set(call) == {"prompts", "completions", "completion_ids", "answer", "trainer_state", "log_extra",
                         "log_metric"}                   # "prompt"/"completion_ids" columns are dropped, as TRL
    assert call["prompts"] == ["p0", "p0", "p1", "p1"] and call["answer"] == ["1", "1", 2, 2]
    assert call["completions"] == ["a", "bb", "ccc", ""] and call["completion_ids"] == [[5], [6, 7], [8, 8, 8], [2]]
    assert call["trainer_state"].global_step == 0
    call["log_extra"]("ids", [1, 2, 3, 4])
    call["log_metric"]("m", 0.5)
    assert rewards.logged_extra == {"ids": [1, 2, 3, 4]} and rewards.logged_metrics == {"m": [0.5]}


def test_conversational_completions_decoded_from_ids_as_trl():
    tok = char_tokenizer()
    eos = tok.eos_token_id
    calls = []
    prompts = [[{"role": "user", "content": "hi"}]]
    rewards = TRLRewards(recorder(calls), prompts=prompts, tokenizer=tok)
    ids = [[tok("ab", add_special_tokens=False)["input_ids"] + [eos], tok("c", add_special_tokens=False)["input_ids"]]]
    rewards(["ignored"], [["stale", "texts"]], {"response_ids": ids})
    assert calls[0]["completions"] == [[{"role": "assistant", "content": "ab"}], [{"role": "assistant", "content": "c"}]]
    assert calls[0]["completion_ids"][0][-1] == eos and calls[0]["prompts"] == prompts * 2


def test_weights_and_none_as_trl():
    values = [1.0, None, 3.0, None]
    rewards = TRLRewards([recorder([], values, "a"), recorder([], [0.5, 0.5, None, None], "b")], weights=[2.0, 1.0],
                         prompts=["p", "q"])
    raw = rewards(["p", "q"], [["x", "y"], ["z", "w"]], {"response_ids": [[[1], [1]], [[1], [1]]]})
    assert raw.shape == (2, 2, 2) and math.isnan(raw[0, 1, 0]) and math.isnan(raw[1, 1, 1])
    advantages, info = compute_advantages(raw, weights=rewards.weights, warn=False)
    # nansum: 2·1 + 0.5, 0 + 0.5, 2·3 + 0 (None), every function None → NaN → A = 0
    assert info.rewards[0].tolist() == [2.5, 0.5] and info.rewards[1, 0] == 6.0 and math.isnan(info.rewards[1, 1])
    assert advantages[0].tolist() == [1.0, -1.0] and advantages[1].tolist() == [0.0, 0.0] and info.unscorable == 1
    with pytest.raises(ValueError, match="1 weights for 2 reward functions"):
        TRLRewards([recorder([]), recorder([])], weights=[1.0], prompts=["p"])


def test_trainer_state_and_async_functions():
    def step_reward(prompts, completions, trainer_state, **kwargs):
        return [float(trainer_state.global_step)] * len(prompts)

    async def async_reward(prompts, completions, **kwargs):
        return [2.0] * len(prompts)

    state = types.SimpleNamespace(global_step=7)
    rewards = TRLRewards([step_reward, async_reward], prompts=["p"], trainer_state=state)
    out = rewards(["p"], [["x", "y"]], {"response_ids": [[[1], [1]]]})
    assert out[0].tolist() == [[7.0, 2.0], [7.0, 2.0]] and rewards.names == ["step_reward", "async_reward"]


def test_wrong_length_and_bad_values():
    meta = {"response_ids": [[[1], [1]]]}
    with pytest.raises(ValueError, match="'short' returned 1 rewards, but 2 were expected"):
        TRLRewards(recorder([], [1.0], "short"), prompts=["p"])(["p"], [["x", "y"]], meta)
    with pytest.raises(ValueError, match="'inf' returned inf for completion 1 of prompt 0"):
        TRLRewards(recorder([], [1.0, math.inf], "inf"), prompts=["p"])(["p"], [["x", "y"]], meta)
    with pytest.raises(ValueError, match="'text' returned the string 'a' for completion 0"):
        TRLRewards(recorder([], ["a", 1.0], "text"), prompts=["p"])(["p"], [["x", "y"]], meta)
    with pytest.raises(ValueError, match="returned NoneType; it must return a list of 2 floats"):
        TRLRewards(lambda **k: None, prompts=["p"])(["p"], [["x", "y"]], meta)
    with pytest.raises(ValueError, match="built for 1 prompts but is called with 2"):
        TRLRewards(recorder([]), prompts=["p"])(["p", "q"], [["x", "y"], ["x", "y"]], meta)
    with pytest.raises(ValueError, match="meta\\['response_ids'\\]"):
        TRLRewards(recorder([]), prompts=["p"])(["p"], [["x", "y"]], {})
    with pytest.raises(ValueError, match="column 'completions'.*Rename"):
        TRLRewards(recorder([]), prompts=["p"], columns={"completions": [1]})


def test_raising_function_names_itself_its_traceback_and_the_prompt(tmp_path):
    picky = load_reward_function(f"{write_module(tmp_path)}:picky")
    rewards = TRLRewards(picky, prompts=["fine", "trouble", "boom too"], columns={"answer": ["1", "boom", "boom"]},
                         prompt_labels=["pool.jsonl, line 1", "pool.jsonl, line 2", "pool.jsonl, line 3"])
    responses = [["a", "b"], ["c", "d"], ["e", "f"]]
    ids = [[[1], [2]], [[3], [4]], [[5], [6]]]
    with pytest.raises(RewardFunctionError) as caught:
        rewards(["fine", "trouble", "boom too"], responses, {"response_ids": ids})
    error = caught.value
    text = str(error)
    assert "reward function 'picky' raised KeyError" in text and "pool.jsonl, line 2 (batch row 1)" in text
    assert "'trouble'" in text and "in helper" in text and 'raise KeyError("no such answer: " + answer)' in text
    assert "trl_rewards.py" not in error.traceback_text and error.prompt_number == 1
    assert "save_rollouts" in text
    assert error.prompts == ["fine", "trouble", "boom too"] and error.completions == responses
    assert error.completion_ids == ids and error.columns == {"answer": ["1", "boom", "boom"]}


def test_signature_mismatch_is_explained():
    def old_style(prompts, completions):
        return [1.0] * len(prompts)

    with pytest.raises(RewardFunctionError, match="cannot be called as TRL calls it.*\\*\\*kwargs"):
        TRLRewards(old_style, prompts=["p"])(["p"], [["x", "y"]], {"response_ids": [[[1], [1]]]})


@pytest.mark.filterwarnings("ignore::funcprobe.objective.ZeroVarianceWarning")
def test_trl_rewards_in_sample_batch():
    from funcprobe.sampling import sample_batch
    from funcprobe.testing import tiny_policy

    tok = char_tokenizer()
    policy = tiny_policy(vocab_size=len(tok))
    rewards = TRLRewards([recorder([], name="len"), load_reward_function("answer")], weights=[1.0, 2.0],
                         prompts=["1+1=", "2+2="], columns={"answer": ["2", "4"]}, tokenizer=tok)
    sampled = sample_batch(policy, policy.params, ["1+1=", "2+2="], G=2, reward_fn=rewards, max_new_tokens=3, seed=0,
                           tokenizer=tok, reward_weights=rewards.weights)
    assert sampled.raw_rewards.shape == (2, 2, 2)
    lengths = torch.tensor([[len(t) for t in group] for group in sampled.responses], dtype=torch.float64)
    assert torch.equal(sampled.raw_rewards[..., 0], lengths)


def test_reward_call_matches_trl_calculate_rewards():
    """TRL's own GRPOTrainer._calculate_rewards (on a stand-in trainer) passes the same keyword arguments and gives
    the same rewards per function."""
    pytest.importorskip("trl")
    from trl.trainer.grpo_trainer import GRPOTrainer

    ours, theirs = [], []
    values = [1.0, None, 2.5, 0.0]
    B, G = 2, 2
    prompts = [[{"role": "user", "content": "p0"}], [{"role": "user", "content": "p1"}]]
    columns = {"answer": ["1", 2], "solution": [None, "s"]}
    completions = [[[{"role": "assistant", "content": t}] for t in group] for group in (["a", "b"], ["c", "d"])]
    ids = [[[5, 2], [6]], [[7], [8, 2]]]
    state = types.SimpleNamespace(global_step=3)
    trainer = types.SimpleNamespace(
        accelerator=types.SimpleNamespace(device="cpu", is_main_process=True), args=types.SimpleNamespace(report_to=[]),
        reward_funcs=[recorder(theirs, values, "f"), recorder([], [0.5] * 4, "g")], reward_processing_classes=[None, None],
        reward_func_names=["f", "g"], state=state, _log_completion_extra=lambda *a: None, _log_metric=lambda *a: None,
        environments=None)
    inputs = [{"prompt": prompts[n], **{k: v[n] for k, v in columns.items()}} for n in range(B) for _ in range(G)]
    flat_completions = [c for group in completions for c in group]
    flat_prompts = [p for p in prompts for _ in range(G)]
    expected = GRPOTrainer._calculate_rewards(trainer, inputs, flat_prompts, flat_completions,
                                              [i for group in ids for i in group])
    rewards = TRLRewards([recorder(ours, values, "f"), recorder([], [0.5] * 4, "g")], prompts=prompts, columns=columns,
                         trainer_state=state)
    got = rewards.score(completions, ids)
    assert torch.allclose(got.view(B * G, 2), expected.to(torch.float64), equal_nan=True)
    strip = lambda call: {k: v for k, v in call.items() if k not in ("log_extra", "log_metric")}  # noqa: E731
    assert strip(ours[0]) == strip(theirs[0]) and set(ours[0]) == set(theirs[0])
