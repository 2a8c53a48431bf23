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

Reward functions written for TRL (``f(prompts, completions, completion_ids, **kwargs) -> [B·G]``) are loaded with
:func:`load_reward_function` ("module:function", "file.py:function", or a built-in name) and called as TRL calls them
by :class:`TRLRewards` (``funcprobe.trl_rewards``, re-exported here), which has funcprobe's signature and returns
[B, G, F]. Prompt pools with columns and chat messages: ``funcprobe.prompts``.
"""

from __future__ import annotations

import os

from .prompts import load_prompt_pool
from .scoring import (REWARDS, RewardFn, answer_match, check_rewards, last_number, make_tag_format, parse_number,
                      tag_format)
from .trl_rewards import (BUILTIN_TRL_REWARDS, RewardFunctionError, TRLRewards, load_reward_function,
                          reward_function_name, trainer_state_from_checkpoint)

__all__ = ["RewardFn", "answer_match", "tag_format", "make_tag_format", "parse_number", "last_number",
           "check_rewards", "load_prompts_jsonl", "REWARDS", "TRLRewards", "RewardFunctionError",
           "load_reward_function", "reward_function_name", "BUILTIN_TRL_REWARDS", "trainer_state_from_checkpoint"]


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
