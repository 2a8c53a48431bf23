"""Logged rollouts (a JSONL of prompts with their G completions) as a :class:`~funcprobe.batch.RolloutBatch`.

One line per prompt, the form a trainer callback would log::

    {"prompt": "2+3=" | [{"role": "user", "content": "2+3="}],
     "completions": ["5<eos-stripped text>", ...] | [[{"role": "assistant", "content": "5"}], ...],   # G ≥ 2
     "rewards": [1.0, 0.0, ...] | [[1.0, null], [0.0, 0.5], ...],     # optional: one float, or F floats, per completion
     "prompt_ids": [...],                                              # optional: the rendered prompt's token ids
     "completion_ids": [[...], ...],                                   # optional: G id lists, stop token included
     "finished": [true, false, ...],                                   # optional: whether each ended with its EOS
     "answer": "5", ...}                                               # any other key: a column for reward functions

Token ids are preferred when present. TRL's own completion logs (``log_completions``, a parquet of prompt/completion
text) hold no ids, and their text was decoded with ``skip_special_tokens=True``: re-tokenising loses the sampled
tokenisation (a text may have several) and the stop token. So, for a completion without ids:

* its text is tokenised with ``tokenizer(text, add_special_tokens=False)`` (special tokens in the text stay specials);
* the tokenizer's EOS (else the first stop id) is appended when ``finished`` says it ended with one; when the line has
  no ``finished``, ``missing_finished="budget"`` (default) appends it when the re-tokenised completion is shorter than
  ``max_new_tokens`` (TRL's generation stops only at an EOS or at the budget), ``"never"`` treats every completion as
  cut at the budget. ``info`` counts how many completions were re-tokenised and how many EOS were appended.

A prompt without ``prompt_ids`` is rendered with :func:`funcprobe.prompts.render_prompts` (TRL's tokenisation).
Rewards come from the file, or from a reward function (``reward_fn``, e.g. :func:`rollout_rewards` of TRL-style
functions), which re-scores the completions: how a batch saved after a failing reward function is scored.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .batch import AdvantageRecipe, RolloutBatch
from .objective import compute_advantages
from .prompts import check_prompt, is_conversational, iter_jsonl, prompt_text, render_prompts, trl_prompts
from .rewards import check_rewards
from .rollouts_file import ROLLOUT_KEYS, save_rollouts
from .trl_rewards import TRLRewards

__all__ = ["RolloutRecord", "load_rollouts", "save_rollouts", "rollouts_batch", "rollout_rewards",
           "check_rollouts_tokens", "ROLLOUT_KEYS"]

_FORMAT = ('Each line is {"prompt": str or messages, "completions": [G ≥ 2 strings or message lists], "rewards": '
           '[G floats] or [G lists of F floats] (optional), "prompt_ids": [ints] (optional), "completion_ids": '
           '[G lists of ints] (optional), "finished": [G booleans] (optional), other keys: columns}.')


@dataclass(frozen=True)
class RolloutRecord:
    """One line of a rollouts file (validated): ``rewards`` [G] or [G][F] floats (NaN for null) or None;
    ``prompt_ids`` [len] or None; ``completion_ids`` [G][len] or None; ``finished`` [G] or None; ``columns`` the
    other keys; ``where`` "FILE, line N"."""

    prompt: Any
    completions: list[Any]
    rewards: list[Any] | None = None
    prompt_ids: list[int] | None = None
    completion_ids: list[list[int]] | None = None
    finished: list[bool] | None = None
    columns: dict[str, Any] = field(default_factory=dict)
    where: str = "record"

    @property
    def G(self) -> int:
        return len(self.completions)


def _text(completion: Any, where: str, g: int) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and len(completion) == 1 and isinstance(completion[0], dict) \
            and isinstance(completion[0].get("content"), str):
        return completion[0]["content"]
    raise ValueError(f"{where}: completion {g} must be a string or one message "
                     f'[{{"role": "assistant", "content": "..."}}], found {json.dumps(completion)[:120]}. {_FORMAT}')


def _int_list(value: Any, what: str, where: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(
            isinstance(t, numbers.Integral) and not isinstance(t, bool) and t >= 0 for t in value):
        raise ValueError(f"{where}: {what} must be a non-empty list of token ids (integers ≥ 0), found "
                         f"{json.dumps(value)[:120]}. {_FORMAT}")
    return [int(t) for t in value]


def _reward(value: Any, what: str, where: str) -> float:
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isinf(float(value)):
        raise ValueError(f"{where}: {what} must be a finite number or null, found {value!r}. {_FORMAT}")
    return float(value)


def _record(data: Any, where: str) -> RolloutRecord:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, found {type(data).__name__}. {_FORMAT}")
    for key in ("prompt", "completions"):
        if key not in data:
            raise ValueError(f'{where}: missing "{key}" (keys found: {sorted(data)}). {_FORMAT}')
    check_prompt(data["prompt"], where)
    completions = data["completions"]
    if not isinstance(completions, list) or len(completions) < 2:
        raise ValueError(f'{where}: "completions" must be a list of G ≥ 2 completions (the leave-one-out baseline '
                         f"needs 2), found {json.dumps(completions)[:120]}. {_FORMAT}")
    G = len(completions)
    for g, completion in enumerate(completions):
        _text(completion, where, g)
    rewards = data.get("rewards")
    if rewards is not None:
        if not isinstance(rewards, list) or len(rewards) != G:
            raise ValueError(f'{where}: "rewards" must hold one entry per completion ({G}), found '
                             f"{json.dumps(rewards)[:120]}. {_FORMAT}")
        if any(isinstance(r, list) for r in rewards):
            if not all(isinstance(r, list) and r and len(r) == len(rewards[0]) for r in rewards):
                raise ValueError(f'{where}: "rewards" per function must be G lists of the same length F ≥ 1. {_FORMAT}')
            rewards = [[_reward(v, f"rewards[{g}][{f}]", where) for f, v in enumerate(r)]
                       for g, r in enumerate(rewards)]
        else:
            rewards = [_reward(v, f"rewards[{g}]", where) for g, v in enumerate(rewards)]
    prompt_ids = data.get("prompt_ids")
    if prompt_ids is not None:
        prompt_ids = _int_list(prompt_ids, '"prompt_ids"', where)
    completion_ids = data.get("completion_ids")
    if completion_ids is not None:
        if not isinstance(completion_ids, list) or len(completion_ids) != G:
            raise ValueError(f'{where}: "completion_ids" must hold {G} id lists (one per completion). {_FORMAT}')
        completion_ids = [_int_list(ids, f'"completion_ids"[{g}]', where) for g, ids in enumerate(completion_ids)]
    finished = data.get("finished")
    if finished is not None and (not isinstance(finished, list) or len(finished) != G
                                 or not all(isinstance(f, bool) for f in finished)):
        raise ValueError(f'{where}: "finished" must be {G} booleans (whether each completion ended with its EOS). '
                         f"{_FORMAT}")
    columns = {key: value for key, value in data.items() if key not in ROLLOUT_KEYS}
    return RolloutRecord(prompt=data["prompt"], completions=list(completions), rewards=rewards, prompt_ids=prompt_ids,
                         completion_ids=completion_ids, finished=finished, columns=columns, where=where)


def load_rollouts(path: str | os.PathLike) -> list[RolloutRecord]:
    """Read a rollouts JSONL (module docstring); blank lines are skipped.

    Raises:
        ValueError: naming the file, the 1-based line and the fix: invalid JSON, a missing or malformed field, a G
            (or a number F of per-function rewards, or a prompt form) that differs from the first line's, no lines.
    """
    path = os.fspath(path)
    records: list[RolloutRecord] = []
    for _, where, data in iter_jsonl(path, _FORMAT):
        record = _record(data, where)
        if records:
            first = records[0]
            if record.G != first.G:
                raise ValueError(f"{where}: has G={record.G} completions but {first.where} has G={first.G}; every "
                                 "prompt of a batch has the same number of completions. Drop or complete the line.")
            if _width(record) != _width(first) and None not in (_width(record), _width(first)):
                raise ValueError(f"{where}: has {_width(record)} reward(s) per completion but {first.where} has "
                                 f"{_width(first)}; every line needs the same reward functions.")
            if is_conversational(record.prompt) != is_conversational(first.prompt):
                raise ValueError(f"{where}: its prompt form (plain/conversational) differs from {first.where}'s; "
                                 "a batch has one form.")
        records.append(record)
    if not records:
        raise ValueError(f"{path}: holds no rollouts (empty file or blank lines only). {_FORMAT}")
    return records


def _width(record: RolloutRecord) -> int | None:
    """F (1 for the [G] form), or None without rewards."""
    if record.rewards is None:
        return None
    return len(record.rewards[0]) if isinstance(record.rewards[0], list) else 1


def rollout_rewards(records: Sequence[RolloutRecord], functions: Sequence[Callable] | Callable,
                    weights: Sequence[float] | None = None, *, chat_template: str = "auto", **options: Any):
    """A :class:`~funcprobe.trl_rewards.TRLRewards` over the records' prompts and columns (as TRL sees them under
    ``chat_template``), to pass as ``rollouts_batch(..., reward_fn=...)``; ``options`` as for ``TRLRewards``."""
    prompts, conversational = trl_prompts([r.prompt for r in records], chat_template)
    names: dict[str, None] = {}
    for record in records:
        names.update(dict.fromkeys(record.columns))
    columns = {name: [r.columns.get(name) for r in records] for name in names}
    options.setdefault("prompt_labels", [r.where for r in records])
    return TRLRewards(functions, weights, prompts=prompts, columns=columns, conversational=conversational, **options)


def _stop_ids(tokenizer: Any, stop_token_ids: Any) -> tuple[list[int], int | None]:
    stops = [stop_token_ids] if isinstance(stop_token_ids, numbers.Integral) else list(stop_token_ids or [])
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and eos not in stops:
        stops.insert(0, int(eos))
    return [int(s) for s in stops], (int(eos) if eos is not None else (stops[0] if stops else None))


def _decodings(tokenizer: Any, ids: list[int], stops: Sequence[int]) -> list[str]:
    """The texts a writer may have stored for ``ids``: decoded with ``skip_special_tokens=True`` (TRL's
    ``batch_decode``, funcprobe's sampler), or without skipping; with the final stop token, or without it (the sampler
    decodes the response before its stop)."""
    forms = [ids] + ([ids[:-1]] if ids and ids[-1] in stops else [])
    return [tokenizer.decode(form, skip_special_tokens=skip) for form in forms for skip in (True, False)]


def check_rollouts_tokens(records: Sequence[RolloutRecord], tokenizer: Any, *, vocab_size: int | None = None,
                          stop_token_ids: int | Sequence[int] | None = None) -> None:
    """Refuse a rollouts file that does not belong to this checkpoint, before anything is run on it.

    * every ``prompt_ids`` / ``completion_ids`` entry must be below ``vocab_size`` (the model's vocabulary; None: not
      checked);
    * each completion's stored text must be what its ``completion_ids`` decode to under ``tokenizer``, as the writers
      decode them (``skip_special_tokens=True`` — TRL's ``batch_decode``, funcprobe's sampler and
      ``save_rollouts`` — or without skipping, the stop token kept or not; surrounding whitespace aside). Tokenizers
      with a response parser (TRL's ``parse_response``) store the parsed content: it must appear in the decoded text;
    * a prompt with ``prompt_ids``: its text (each user message's content) must appear in the decoded ids.

    Raises:
        ValueError: naming the first mismatching line and completion, what the ids decode to and the fix.
    """
    stops, _ = _stop_ids(tokenizer, stop_token_ids)
    parsed = getattr(tokenizer, "response_template", None) is not None \
        or getattr(tokenizer, "response_schema", None) is not None
    made = ("the file was made with another model or tokenizer than this checkpoint's, or its texts and ids were "
            "mixed up")
    for record in records:
        lists = ([("prompt_ids", record.prompt_ids)] if record.prompt_ids is not None else []) + \
            [(f"completion_ids[{g}]", ids) for g, ids in enumerate(record.completion_ids or [])]
        if vocab_size is not None:
            for what, ids in lists:
                big = [t for t in ids if t >= vocab_size]
                if big:
                    raise ValueError(f"{record.where}: {what} holds token id {big[0]}, outside this model's vocabulary "
                                     f"of {vocab_size} ids: {made}. Probe the checkpoint the rollouts were logged "
                                     "from, or drop the ids so that the texts are re-tokenised.")
        if record.prompt_ids is not None:
            if is_conversational(record.prompt):
                texts = [m.get("content") for m in record.prompt if m.get("role") == "user"]
            else:
                texts = [record.prompt]
            decoded = tokenizer.decode(record.prompt_ids, skip_special_tokens=False)
            for text in texts:
                if isinstance(text, str) and text.strip() not in decoded:
                    raise ValueError(f"{record.where}: prompt_ids decode to {decoded[:80]!r} under this checkpoint's "
                                     f"tokenizer, which does not hold the prompt {text[:80]!r}: {made}. Probe the "
                                     "checkpoint the rollouts were logged from, or drop \"prompt_ids\" so that the "
                                     "prompt is rendered again.")
        for g, ids in enumerate(record.completion_ids or []):
            text = _text(record.completions[g], record.where, g)
            decodings = _decodings(tokenizer, ids, stops)
            if any(text == d or text.strip() == d.strip() or (parsed and text.strip() in d) for d in decodings):
                continue
            raise ValueError(f"{record.where}: completion {g} is {text[:80]!r} but its completion_ids decode to "
                             f"{decodings[0][:80]!r} under this checkpoint's tokenizer: {made}, and the rewards would "
                             "score text that is not the tokens differentiated. Probe the checkpoint the rollouts "
                             "were logged from, or fix the file (each text must be its ids decoded with "
                             "skip_special_tokens=True).")


def rollouts_batch(records: Sequence[RolloutRecord], tokenizer: Any, *, max_new_tokens: int,
                   chat_template: str = "auto", scale_rewards: str = "none",
                   reward_weights: Sequence[float] | None = None, temperature: float = 1.0,
                   stop_token_ids: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                   reward_fn: Callable | None = None, missing_finished: str = "budget",
                   chat_template_kwargs: Mapping[str, Any] | None = None,
                   vocab_size: int | None = None) -> tuple[RolloutBatch, dict[str, Any]]:
    """The records as a validated RolloutBatch [B, G, P + T] in :meth:`RolloutBatch.from_token_lists`'s layout
    (prompt right-aligned at column P, completion from P, right-padded), and an info dict.

    Args:
        records: from :func:`load_rollouts` (one G).
        tokenizer: renders prompts without ``prompt_ids``, tokenises completions without ids, decodes for display.
        max_new_tokens: the generation budget: ``length_norm`` (Dr. GRPO's L) and the EOS rule for text completions.
        chat_template, chat_template_kwargs: as for :func:`funcprobe.prompts.render_prompts`.
        scale_rewards, reward_weights: as for ``objective.compute_advantages``.
        temperature: the τ the completions were sampled at (recorded in the batch).
        stop_token_ids: ids that end a completion, besides the tokenizer's EOS (a stop id may only end an id list).
        pad_token_id: the padding id (default: the tokenizer's pad, else its EOS).
        reward_fn: a funcprobe reward ``(prompts, responses, meta) -> [B, G] | [B, G, F]`` that scores the completions
            instead of the file's rewards (``meta``: ``response_ids`` and the ``answers`` column); None: the file's.
        missing_finished: "budget" or "never" — the EOS rule for text completions without ``finished`` (module doc).
        vocab_size: the model's vocabulary (``policy.vocab_size``): ids at or above it are refused; None: unchecked.
        Before any reward is computed, :func:`check_rollouts_tokens` refuses ids that are not this model's (beyond
        ``vocab_size``) or not this tokenizer's (texts that are not what the ids decode to).

    Returns:
        (batch, info): info holds ``prompts`` (texts), ``responses`` [B][G] texts, ``raw_rewards`` [B, G] or
        [B, G, F], ``advantage_info``, ``retokenised_prompts``, ``retokenised_completions``, ``eos_appended``,
        ``eos_count`` (completions ending with a stop id), ``over_budget`` (re-tokenised completions longer than
        max_new_tokens, kept as they are), ``notes``.

    Raises:
        ValueError: naming the record's file and line: ids outside ``vocab_size`` or not this tokenizer's, no rewards
            and no ``reward_fn``, ids with a stop id before the end, ids longer than ``max_new_tokens``, ``finished``
            contradicting the ids; a bad argument.
    """
    if not records:
        raise ValueError("rollouts_batch: no records.")
    if missing_finished not in ("budget", "never"):
        raise ValueError(f"missing_finished must be 'budget' or 'never'; got {missing_finished!r}.")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer ≥ 1 (the trainer's max_completion_length); got "
                         f"{max_new_tokens!r}.")
    G = records[0].G
    for record in records:
        if record.G != G:
            raise ValueError(f"{record.where}: has G={record.G} completions, {records[0].where} has G={G}.")
    stops, eos = _stop_ids(tokenizer, stop_token_ids)
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None)
        pad_token_id = eos if pad_token_id is None else pad_token_id
    if pad_token_id is None:
        raise ValueError("rollouts_batch: no pad_token_id (the tokenizer has neither a pad nor an EOS); pass one.")
    info: dict[str, Any] = {"retokenised_prompts": 0, "retokenised_completions": 0, "eos_appended": 0,
                            "over_budget": 0, "notes": []}

    # prompts: given ids, else TRL's rendering
    missing = [n for n, r in enumerate(records) if r.prompt_ids is None]
    prompt_ids: list[list[int]] = [list(r.prompt_ids) if r.prompt_ids is not None else [] for r in records]
    if missing:
        rendered = render_prompts([records[n].prompt for n in missing], tokenizer, chat_template=chat_template,
                                  chat_template_kwargs=chat_template_kwargs)
        for n, ids in zip(missing, rendered):
            prompt_ids[n] = ids
        info["retokenised_prompts"] = len(missing)

    # completions: given ids (checked), else the text re-tokenised with the EOS rule
    completion_ids: list[list[list[int]]] = []
    for record in records:
        group = []
        for g, completion in enumerate(record.completions):
            if record.completion_ids is not None:
                ids = record.completion_ids[g]
                early = [k for k, t in enumerate(ids[:-1]) if t in stops]
                if early:
                    raise ValueError(f"{record.where}: completion_ids[{g}] holds the stop id {ids[early[0]]} at "
                                     f"position {early[0]} before its end; a completion ends at its first stop token "
                                     "(TRL keeps tokens up to it). Cut the ids there.")
                if len(ids) > max_new_tokens:
                    raise ValueError(f"{record.where}: completion_ids[{g}] has {len(ids)} tokens, more than "
                                     f"max_new_tokens={max_new_tokens}. Pass the trainer's max_completion_length.")
                if record.finished is not None and record.finished[g] != (ids[-1] in stops):
                    raise ValueError(f"{record.where}: finished[{g}] is {record.finished[g]} but completion_ids[{g}] "
                                     f"{'does not end' if record.finished[g] else 'ends'} with a stop id {stops}.")
                group.append(list(ids))
                continue
            text = _text(completion, record.where, g)
            ids = [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
            info["retokenised_completions"] += 1
            if record.finished is not None:
                ended = record.finished[g]
            else:
                ended = missing_finished == "budget" and len(ids) < max_new_tokens
            if ended and (not ids or ids[-1] not in stops):
                if eos is None:
                    raise ValueError(f"{record.where}: completion {g} ended with an EOS, but the tokenizer has no "
                                     "eos_token_id and no stop_token_ids were given; pass stop_token_ids.")
                ids.append(eos)
                info["eos_appended"] += 1
            if not ids:
                raise ValueError(f"{record.where}: completion {g} is empty and did not finish: it has no token. "
                                 'Mark it "finished": true (its only token was the EOS) or drop the line.')
            if len(ids) > max_new_tokens:
                info["over_budget"] += 1
            group.append(ids)
        completion_ids.append(group)
    # the ids' shape is sound: now whether they are this model's, and the texts theirs (before any reward or forward)
    check_rollouts_tokens(records, tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
    if info["over_budget"]:
        info["notes"].append(f"{info['over_budget']} re-tokenised completions are longer than max_new_tokens="
                             f"{max_new_tokens}: the budget is too small, or re-tokenising did not give the sampled "
                             "tokens (pass completion_ids).")
    if info["retokenised_completions"]:
        rule = "as 'finished' says" if all(r.finished is not None for r in records) else \
            f"by the rule missing_finished={missing_finished!r} where 'finished' is absent"
        info["notes"].append(f"{info['retokenised_completions']} completions were re-tokenised from text (no "
                             f"completion_ids); {info['eos_appended']} EOS appended, {rule}.")

    B = len(records)
    prompt_texts = []
    for n, record in enumerate(records):
        try:
            prompt_texts.append(prompt_text(record.prompt, tokenizer, chat_template=chat_template,
                                            chat_template_kwargs=chat_template_kwargs))
        except ValueError:  # given ids, no chat template to show them with
            prompt_texts.append(tokenizer.decode(prompt_ids[n], skip_special_tokens=False))
    responses = [[_text(c, r.where, g) for g, c in enumerate(r.completions)] for r in records]

    # rewards
    if reward_fn is not None:
        answers = [r.columns.get("answer") for r in records]
        meta = {"response_ids": completion_ids,
                "answers": [None if a is None or isinstance(a, str) else str(a) for a in answers]}
        raw = check_rewards(reward_fn(list(prompt_texts), [list(g) for g in responses], meta), B, G, reward_fn)
    else:
        lacking = [r for r in records if r.rewards is None]
        if lacking:
            raise ValueError(f"{lacking[0].where}: has no \"rewards\" ({len(lacking)} of {B} lines lack them) and no "
                             "reward function was given. Add rewards to every line, or score the completions with "
                             "reward functions (--reward ...).")
        widths = {_width(r) for r in records}
        if len(widths) > 1:
            raise ValueError(f"the records have different numbers of rewards per completion {sorted(widths)}.")
        raw = torch.tensor([r.rewards for r in records], dtype=torch.float64)
    advantages, advantage_info = compute_advantages(raw, scale_rewards=scale_rewards, weights=reward_weights)

    batch = RolloutBatch.from_token_lists(
        prompt_ids, completion_ids, advantages=advantages, pad_token_id=int(pad_token_id),
        temperature=float(temperature), length_norm=float(max_new_tokens),
        rewards=torch.nan_to_num(advantage_info.rewards, nan=0.0),
        advantage_recipe=AdvantageRecipe.for_rewards(raw, scale_rewards, reward_weights))
    info.update(prompts=prompt_texts, responses=responses, raw_rewards=raw, advantage_info=advantage_info,
                prompt_ids=prompt_ids, completion_ids=completion_ids,
                eos_count=sum(ids[-1] in stops for group in completion_ids for ids in group))
    return batch, info
