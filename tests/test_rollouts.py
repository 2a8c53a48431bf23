"""Logged rollouts: the JSONL format, its round trip, and the RolloutBatch built from it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from funcprobe.objective import compute_advantages
from funcprobe.trl_rewards import RewardFunctionError, TRLRewards, load_reward_function
from funcprobe.rollouts import load_rollouts, rollout_rewards, rollouts_batch, save_rollouts
from funcprobe.testing import char_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::funcprobe.objective.ZeroVarianceWarning")


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def write(tmp_path, records):
    path = tmp_path / "rollouts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_round_trip_with_ids(tmp_path, tok):
    eos = tok.eos_token_id
    prompts = ["1+1=", "2+2="]
    completions = [["2", "3"], ["4", "44"]]
    completion_ids = [[ids(tok, "2") + [eos], ids(tok, "3")], [ids(tok, "4") + [eos], ids(tok, "44") + [eos]]]
    rewards = torch.tensor([[[1.0, math.nan], [0.0, 0.5]], [[1.0, 0.5], [0.0, 0.5]]])
    prompt_ids = [ids(tok, p) for p in prompts]
    path = tmp_path / "r.jsonl"
    save_rollouts(path, prompts, completions, completion_ids, rewards=rewards, prompt_ids=prompt_ids,
                  finished=[[True, False], [True, True]], columns={"answer": ["2", 4]})
    records = load_rollouts(path)
    assert [r.prompt for r in records] == prompts and records[1].columns == {"answer": 4}
    assert records[0].rewards[0][0] == 1.0 and math.isnan(records[0].rewards[0][1])
    batch, info = rollouts_batch(records, tok, max_new_tokens=4, scale_rewards="group", reward_weights=[1.0, 2.0],
                                 temperature=0.7)
    assert batch.B == 2 and batch.G == 2 and batch.temperature == 0.7 and batch.length_norm.tolist() == [4.0, 4.0]
    expected, _ = compute_advantages(rewards.double(), scale_rewards="group", weights=[1.0, 2.0], warn=False)
    assert torch.equal(batch.advantages, expected) and info["retokenised_completions"] == 0
    assert info["eos_count"] == 3 and info["responses"] == completions
    got_prompts, got_completions = batch.token_lists()
    assert got_prompts == prompt_ids and got_completions == completion_ids
    # the batch written back and read again gives the same batch
    save_rollouts(tmp_path / "again.jsonl", prompts, completions, got_completions, prompt_ids=got_prompts,
                  rewards=info["raw_rewards"], columns={"answer": ["2", 4]})
    again, _ = rollouts_batch(load_rollouts(tmp_path / "again.jsonl"), tok, max_new_tokens=4, scale_rewards="group",
                              reward_weights=[1.0, 2.0], temperature=0.7)
    assert torch.equal(again.input_ids, batch.input_ids) and torch.equal(again.advantages, batch.advantages)


def test_layout(tmp_path, tok):
    records = load_rollouts(write(tmp_path, [
        {"prompt": "ab", "completions": ["c", "dd"], "rewards": [1, 0], "finished": [False, False]},
        {"prompt": "abc", "completions": ["e", "f"], "rewards": [0, 1], "finished": [False, False]}]))
    batch, info = rollouts_batch(records, tok, max_new_tokens=5, pad_token_id=0)
    assert batch.L == 3 + 2 and info["retokenised_prompts"] == 2
    assert batch.input_ids[0, 1].tolist() == [0] + ids(tok, "ab") + ids(tok, "dd")
    assert batch.response_mask[0, 0].tolist() == [False, False, False, True, False]
    assert batch.attention_mask[0, 0].tolist() == [False, True, True, True, False]


def test_eos_rule_for_text_completions(tmp_path, tok):
    eos = tok.eos_token_id
    line = {"prompt": "ab", "completions": ["c", "dddd"], "rewards": [1, 0]}
    records = load_rollouts(write(tmp_path, [line]))
    _, info = rollouts_batch(records, tok, max_new_tokens=4)          # "c" is shorter than the budget: it ended
    assert info["completion_ids"][0] == [ids(tok, "c") + [eos], ids(tok, "dddd")] and info["eos_appended"] == 1
    _, info = rollouts_batch(records, tok, max_new_tokens=4, missing_finished="never")
    assert info["completion_ids"][0] == [ids(tok, "c"), ids(tok, "dddd")] and info["eos_appended"] == 0
    records = load_rollouts(write(tmp_path, [{**line, "finished": [False, True]}]))
    _, info = rollouts_batch(records, tok, max_new_tokens=8)
    assert info["completion_ids"][0] == [ids(tok, "c"), ids(tok, "dddd") + [eos]]
    assert any("re-tokenised" in note for note in info["notes"])
    _, info = rollouts_batch(records, tok, max_new_tokens=2)
    assert info["over_budget"] == 1


def test_conversational_rollouts_rendered_with_the_template(tmp_path):
    tok = char_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    records = load_rollouts(write(tmp_path, [{
        "prompt": [{"role": "user", "content": "ab"}],
        "completions": [[{"role": "assistant", "content": "x"}], [{"role": "assistant", "content": "y"}]],
        "rewards": [1.0, 0.0]}]))
    _, info = rollouts_batch(records, tok, max_new_tokens=3)
    assert info["prompt_ids"][0] == ids(tok, "<user>ab<assistant>") and info["responses"] == [["x", "y"]]
    assert info["prompts"] == ["<user>ab<assistant>"]


@pytest.mark.parametrize("line,message", [
    ("{oops", "line 2: invalid JSON"),
    ({"completions": ["a", "b"]}, 'line 2: missing "prompt"'),
    ({"prompt": "p"}, 'line 2: missing "completions"'),
    ({"prompt": "p", "completions": ["a"]}, "line 2: .*G ≥ 2"),
    ({"prompt": "p", "completions": ["a", "b", "c"]}, "line 2: has G=3 .*line 1 has G=2"),
    ({"prompt": "p", "completions": ["a", 3]}, "line 2: completion 1 must be a string or one message"),
    ({"prompt": "p", "completions": ["a", "b"], "rewards": [1]}, 'line 2: "rewards" must hold one entry'),
    ({"prompt": "p", "completions": ["a", "b"], "rewards": [1, "x"]}, "line 2: rewards\\[1\\] must be a finite"),
    ({"prompt": "p", "completions": ["a", "b"], "rewards": [[1, 2], [1, 2]]}, "line 2: has 2 reward\\(s\\)"),
    ({"prompt": "p", "completions": ["a", "b"], "completion_ids": [[1], []]}, 'line 2: "completion_ids"\\[1\\]'),
    ({"prompt": "p", "completions": ["a", "b"], "prompt_ids": [-1]}, 'line 2: "prompt_ids" must be'),
    ({"prompt": "p", "completions": ["a", "b"], "finished": [1, 0]}, 'line 2: "finished" must be 2 booleans'),
    ({"prompt": [{"role": "user", "content": "p"}], "completions": ["a", "b"]}, "line 2: its prompt form"),
])
def test_bad_lines(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    first = json.dumps({"prompt": "ok", "completions": ["a", "b"], "rewards": [1, 0]})
    path.write_text(first + "\n" + (line if isinstance(line, str) else json.dumps(line)) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message) as caught:
        load_rollouts(path)
    assert str(path) in str(caught.value)


def test_batch_errors(tmp_path, tok):
    eos = tok.eos_token_id
    base = {"prompt": "ab", "completions": ["c", "d"]}
    cases = [
        ({**base, "rewards": [1, 0], "completion_ids": [[5, eos, 6], [7]]}, {}, "stop id .* at position 1"),
        ({**base, "rewards": [1, 0], "completion_ids": [[5, 5, 5], [7]]}, {}, "3 tokens, more than max_new_tokens=2"),
        ({**base, "rewards": [1, 0], "completion_ids": [[5], [7]], "finished": [True, False]}, {},
         "finished\\[0\\] is True but completion_ids\\[0\\] does not end"),
        (base, {}, 'line 1: has no "rewards".*reward functions'),
    ]
    for line, options, message in cases:
        with pytest.raises(ValueError, match=message):
            rollouts_batch(load_rollouts(write(tmp_path, [line])), tok, max_new_tokens=2, **options)


def test_rescoring_with_trl_rewards(tmp_path, tok):
    """The path after a failing reward function: save the completions, fix the function, score them from the file."""
    def broken(prompts, completions, answer, **kwargs):
        return [1.0 if c == a else 0.0 for c, a in zip(completions, answer)] if "3" not in answer else 1 / 0

    eos = tok.eos_token_id
    prompts = ["1+1=", "1+2="]
    completions = [["2", "3"], ["3", "4"]]
    completion_ids = [[ids(tok, c) + [eos] for c in group] for group in completions]
    rewards = TRLRewards(broken, prompts=prompts, columns={"answer": ["2", "3"]}, tokenizer=tok,
                         prompt_ids=[ids(tok, p) for p in prompts])
    with pytest.raises(RewardFunctionError, match="ZeroDivisionError") as caught:
        rewards(prompts, completions, {"response_ids": completion_ids})
    path = tmp_path / "kept.jsonl"
    caught.value.save_rollouts(path)
    records = load_rollouts(path)

    def fixed(prompts, completions, answer, **kwargs):
        return [1.0 if c == a else 0.0 for c, a in zip(completions, answer)]

    scorer = rollout_rewards(records, [fixed, load_reward_function("answer")], [1.0, 0.5], tokenizer=tok)
    batch, info = rollouts_batch(records, tok, max_new_tokens=3, reward_fn=scorer, reward_weights=scorer.weights)
    assert info["raw_rewards"].tolist() == [[[1.0, 1.0], [0.0, 0.0]], [[1.0, 1.0], [0.0, 0.0]]]
    assert batch.rewards.tolist() == [[1.5, 0.0], [1.5, 0.0]] and batch.advantages.tolist() == [[0.75, -0.75]] * 2
    assert info["completion_ids"] == completion_ids
