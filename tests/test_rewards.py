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
