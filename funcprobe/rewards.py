"""Reward functions for sampled rollouts, and a JSONL prompt loader.

A reward function scores the G responses of each of B prompts (:class:`RewardFn`)::

    reward_fn(prompts: list[str], responses: list[list[str]], meta: Mapping) -> float [B, G]

``responses[n][g]`` is the decoded text of response g to ``prompts[n]`` (EOS and padding removed). The result may be
a tensor, a NumPy array or a nested list; :func:`check_rewards` validates it (shape [B, G], finite) and names the
function in its error. ``meta`` carries whatever the caller passed to ``sample_batch(..., meta=...)``; the built-ins
read ``meta["answers"][n]``, the gold answer of prompt n (``load_prompts_jsonl`` returns them).

Built-ins (``REWARDS`` maps their short names):

* ``answer_match`` ("answer"): 1.0 if the last number in the response equals the gold answer, else 0.0.
* ``tag_format`` ("tag"): the ``<answer>…</answer>`` reward of GSM8K-style RL runs (TinyZero's scheme): 1.0 for exactly
  one well-formed answer block holding the gold answer, 0.1 for a well-formed block holding a wrong answer, 0.0
  otherwise. Other weights: ``make_tag_format(correct=..., format_only=...)``.

Numbers are compared as exact decimals after parsing (``parse_number``): signs, thousands separators and trailing
zeros are handled ("-3", "1,234" == "1234", "2.50" == "2.5", "$1,000" == "1000"); fractions and scientific
notation are not numbers here.

Reward functions written for TRL (``f(prompts, completions, completion_ids, **kwargs) -> [B·G]``) live in
``funcprobe.trl_rewards``: loaded with ``load_reward_function`` ("module:function", "file.py:function", or a built-in
name) and called as TRL calls them by ``TRLRewards``, which has funcprobe's signature and returns [B, G, F]. Prompt
pools with columns and chat messages: ``funcprobe.prompts``.

The leaf of the reward modules: it imports no funcprobe module but ``funcprobe.prompts`` (a leaf too), and
``funcprobe.trl_rewards``, ``funcprobe.rollouts`` and the sampler build on it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from .prompts import load_prompt_pool

__all__ = ["RewardFn", "answer_match", "tag_format", "make_tag_format", "parse_number", "last_number",
           "check_rewards", "load_prompts_jsonl", "REWARDS"]


@runtime_checkable
class RewardFn(Protocol):
    """``(prompts [B], responses [B][G], meta) -> rewards [B, G]`` (tensor, array or nested list of floats)."""

    def __call__(self, prompts: list[str], responses: list[list[str]],
                 meta: Mapping[str, Any]) -> Tensor | Sequence[Sequence[float]]: ...


# ----------------------------------------------------------------------------------------------------- numbers
# A number: an optional sign (not glued to a preceding word, digit or bracket, so "3-4" reads as 3 and 4), an integer
# part with optional comma thousands separators ("1,234"; "1,2,3" is three numbers), an optional fraction; or a bare
# fraction ".5". A number never starts inside another one.
_NUMBER = re.compile(r"""
    (?:(?<![\w)\]])[-+])?
    (?:
        (?<![\d.])(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?
      | (?<![\d.])\.\d+
    )
""", re.VERBOSE)
_MINUS_SIGNS = str.maketrans({"\u2212": "-", "\u2013": "-", "\u2014": "-"})


def _numbers(text: str) -> list[str]:
    return _NUMBER.findall(text.translate(_MINUS_SIGNS))


def _to_decimal(token: str) -> Decimal:
    return Decimal(token.replace(",", ""))


def last_number(text: str) -> Decimal | None:
    """The last number in ``text`` as a Decimal, or None when it holds none."""
    found = _numbers(text)
    return _to_decimal(found[-1]) if found else None


def parse_number(value: Any) -> Decimal | None:
    """A gold answer as a Decimal: an int/float/Decimal as is, a string by its last number; None when unparseable."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, Decimal)):
        return Decimal(value)
    if isinstance(value, float):
        return Decimal(repr(value)) if value == value and abs(value) != float("inf") else None
    if isinstance(value, str):
        return last_number(value)
    return None


def _gold_answers(meta: Mapping[str, Any] | None, count: int, who: str) -> list[Any]:
    answers = None if meta is None else meta.get("answers")
    if answers is None:
        raise ValueError(f"{who} needs the gold answers: pass meta={{'answers': [...]}} with one answer per prompt "
                         "(load_prompts_jsonl returns them).")
    if len(answers) != count:
        raise ValueError(f"{who}: meta['answers'] has {len(answers)} entries for {count} prompts; pass one gold "
                         "answer per prompt, in prompt order.")
    return list(answers)


def _gold_number(answer: Any, index: int, who: str) -> Decimal:
    number = parse_number(answer)
    if number is None:
        raise ValueError(f"{who}: the gold answer of prompt {index} ({answer!r}) holds no number. Numeric rewards "
                         "need numeric answers (e.g. GSM8K's final '#### 72' value).")
    return number


# ----------------------------------------------------------------------------------------------------- built-ins
def answer_match(prompts: list[str], responses: list[list[str]], meta: Mapping[str, Any]) -> list[list[float]]:
    """1.0 where the last number in the response equals ``meta["answers"][n]`` exactly (as decimals), else 0.0.

    A response without any number scores 0.0.
    """
    answers = _gold_answers(meta, len(responses), "answer_match")
    rewards = []
    for index, (answer, group) in enumerate(zip(answers, responses)):
        gold = _gold_number(answer, index, "answer_match")
        rewards.append([1.0 if last_number(text) == gold else 0.0 for text in group])
    return rewards


_OPEN, _CLOSE = "<answer>", "</answer>"


def _tagged_answer(text: str) -> str | None:
    """The content of the response's single well-formed ``<answer>…</answer>`` block, or None.

    Well-formed: exactly one ``<answer>`` and one ``</answer>``, in that order, with non-blank content.
    """
    if text.count(_OPEN) != 1 or text.count(_CLOSE) != 1:
        return None
    start = text.index(_OPEN) + len(_OPEN)
    stop = text.index(_CLOSE)
    if stop < start:
        return None
    content = text[start:stop].strip()
    return content or None


def _content_matches(content: str, gold: Any) -> bool:
    """A tagged answer is right when it is one number equal to the gold number (a leading '$', a trailing '.' or
    '%' allowed); for a non-numeric gold answer, when the stripped strings are equal."""
    gold_number = parse_number(gold)
    if gold_number is None:
        return content == str(gold).strip()
    bare = content.removeprefix("$").rstrip(".%").strip()
    found = _numbers(bare)
    return len(found) == 1 and found[0] == bare and _to_decimal(found[0]) == gold_number


def make_tag_format(correct: float = 1.0, format_only: float = 0.1) -> Callable[..., list[list[float]]]:
    """A ``<answer>X</answer>`` reward: ``correct`` if exactly one well-formed block holds the gold answer,
    ``format_only`` if the block is well-formed but its answer is wrong, 0.0 if there is no well-formed block."""

    def tag_format(prompts: list[str], responses: list[list[str]], meta: Mapping[str, Any]) -> list[list[float]]:
        answers = _gold_answers(meta, len(responses), "tag_format")
        rewards = []
        for answer, group in zip(answers, responses):
            row = []
            for text in group:
                content = _tagged_answer(text)
                row.append(0.0 if content is None else correct if _content_matches(content, answer) else format_only)
            rewards.append(row)
        return rewards

    tag_format.__doc__ = (f"<answer>…</answer> reward: {correct} right answer in one well-formed block, "
                          f"{format_only} well-formed but wrong, 0.0 otherwise.")
    return tag_format


#: The default tag reward (TinyZero's GSM8K scheme): 1.0 correct, 0.1 well-formed but wrong, 0.0 malformed/missing.
tag_format = make_tag_format()

REWARDS: dict[str, RewardFn] = {"answer": answer_match, "tag": tag_format}


# ----------------------------------------------------------------------------------------------------- validation
def _name(reward_fn: Any) -> str:
    return getattr(reward_fn, "__qualname__", None) or getattr(reward_fn, "__name__", None) or repr(reward_fn)


def _first_text(values: Any) -> Any:
    """The first str/bytes in a nested list/tuple, or None."""
    if isinstance(values, (str, bytes)):
        return values
    if isinstance(values, (list, tuple)):
        for value in values:
            found = _first_text(value)
            if found is not None:
                return found
    return None


def _holds_text(values: Any) -> bool:
    return _first_text(values) is not None


def check_rewards(values: Any, B: int, G: int, reward_fn: Any = None) -> Tensor:
    """A reward function's output as float64 [B, G] — or [B, G, F] for F reward functions, where NaN marks a
    completion a function did not score (TRL's None) — on the CPU; ValueError naming the function otherwise
    (a wrong shape; an infinite reward; NaN in the [B, G] form)."""
    who = f"reward function {_name(reward_fn)!r}" if reward_fn is not None else "rewards"
    if isinstance(values, Tensor):
        tensor = values.detach().to("cpu", torch.float64)
    elif _holds_text(values):
        raise ValueError(f"{who} returned text ({_first_text(values)!r}) where rewards must be numbers; return "
                         "float(...) values, [B, G] = [{B}, {G}] (TRL's GRPOTrainer fails on strings too).".replace(
                             "{B}", str(B)).replace("{G}", str(G)))
    else:
        try:
            tensor = torch.as_tensor(values, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError, OverflowError) as error:
            raise ValueError(f"{who} returned {type(values).__name__} that is not a rectangular array of numbers "
                             f"({error}); it must return float [B, G] = [{B}, {G}], one reward per response.") from None
    if tuple(tensor.shape[:2]) != (B, G) or tensor.dim() not in (2, 3) or (tensor.dim() == 3 and tensor.shape[2] < 1):
        raise ValueError(f"{who} returned shape {tuple(tensor.shape)}; it must return float [B, G] = [{B}, {G}] "
                         "(responses[n][g] -> rewards[n][g]), or [B, G, F] for F reward functions.")
    bad = torch.isinf(tensor) if tensor.dim() == 3 else ~torch.isfinite(tensor)
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{who} returned a non-finite reward {tensor[where].item()} at {list(where)} "
                         f"({int(bad.sum())} non-finite); every reward must be finite.")
    return tensor


# ----------------------------------------------------------------------------------------------------- loading
def load_prompts_jsonl(path: str | os.PathLike) -> tuple[list[str], list[str | None]]:
    """Read plain-text ``{"prompt": str, "answer": str | number (optional)}`` lines: (prompts, answers).

    A thin wrapper of :func:`funcprobe.prompts.load_prompt_pool` (which also reads conversational prompts and every
    column). Blank lines are skipped; numeric answers are returned as strings (``str(72)`` = "72"), a missing answer
    as None. A bad line raises ValueError naming the file and its 1-based line number.
    """
    pool = load_prompt_pool(path)
    if pool.conversational:
        raise ValueError(f'{pool.where(0)}: "prompt" must be a string here, found a list of messages. Conversational '
                         "prompts need the chat template: read them with funcprobe.prompts.load_prompt_pool and "
                         "render them with render_prompts.")
    for index, answer in enumerate(pool.columns.get("answer", [])):
        if isinstance(answer, bool) or not (answer is None or isinstance(answer, (str, int, float))):
            raise ValueError(f'{pool.where(index)}: "answer" must be a string or a number, found '
                             f"{type(answer).__name__}.")
    return list(pool.prompts), pool.answers()
