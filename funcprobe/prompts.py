"""The prompt pool and its rendering into token ids, exactly as TRL 1.16's ``GRPOTrainer`` tokenises prompts.

A pool file is JSONL, one prompt per line, in TRL's two dataset forms::

    {"prompt": "What is 2+3?", "answer": "5"}                                     # plain text ("standard")
    {"prompt": [{"role": "user", "content": "What is 2+3?"}], "answer": "5"}      # conversational

Every other key of a line is a *column* (``"answer"``, ``"solution"``, …): :class:`PromptPool` keeps them as
``pool.columns[name]``, one entry per line (None where a line lacks the key, as a ``datasets.Dataset`` does), and the
TRL-style reward functions receive them as keyword arguments (``funcprobe.trl_rewards``). All lines must use one form
(a TRL dataset's ``prompt`` column has one type; TRL decides a batch's form from its first prompt).

Rendering (:func:`render_prompts`), as ``GRPOTrainer._tokenize_prompts`` does it (checked against it in the tests):

* conversational: ``tokenizer.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
  return_dict=True)["input_ids"]`` — transformers tokenises the rendered text with ``add_special_tokens=False``, so a
  BOS appears only where the template writes one;
* plain text: ``tokenizer(text=texts)["input_ids"]`` — the tokenizer's default ``add_special_tokens=True`` (a BOS for
  Llama-style tokenizers, none for Qwen's). No truncation (TRL 1.16 has no ``max_prompt_length``).

``chat_template`` chooses: ``"auto"`` (by the prompts' form, as TRL), ``"on"`` (plain text is wrapped as
``[{"role": "user", "content": text}]`` and templated; the reward functions then see the wrapped, conversational
prompts), ``"off"`` (plain text as is; conversational prompts are refused).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PromptPool", "CHAT_TEMPLATE_MODES", "is_conversational", "load_prompt_pool", "trl_prompts",
           "render_prompts", "prompt_text"]

#: The values of ``chat_template``.
CHAT_TEMPLATE_MODES = ("auto", "on", "off")

_SHAPE = ('Each line must be one object like {"prompt": "...", "answer": "..."} or '
          '{"prompt": [{"role": "user", "content": "..."}], "answer": "..."}.')


def is_conversational(prompt: Any) -> bool:
    """TRL's test (``trl.data_utils.is_conversational``): a non-empty list whose first item is a dict with "role"."""
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict) and "role" in prompt[0]


@dataclass(frozen=True)
class PromptPool:
    """P prompts and their extra columns.

    Attributes:
        prompts: P prompts, each a non-empty string or a non-empty list of ``{"role", "content"}`` messages; all of one
            form.
        columns: ``name -> list of P values`` (None where a line lacked the key), in first-seen order.
        path: the file it was read from, or None.
        line_numbers: the 1-based line of each prompt in ``path`` (for messages), or None.
    """

    prompts: list[Any]
    columns: dict[str, list[Any]] = field(default_factory=dict)
    path: str | None = None
    line_numbers: list[int] | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def conversational(self) -> bool:
        """Whether the prompts are message lists (TRL's conversational form)."""
        return bool(self.prompts) and is_conversational(self.prompts[0])

    def where(self, index: int) -> str:
        """``"FILE, line N"`` for prompt ``index`` (or ``"prompt i"`` for a pool not read from a file)."""
        if self.path is None or self.line_numbers is None:
            return f"prompt {index}"
        return f"{self.path}, line {self.line_numbers[index]}"

    def select(self, indices: Sequence[int]) -> PromptPool:
        """The pool of ``prompts[i] for i in indices`` (repeats allowed), with the same columns."""
        indices = [int(i) for i in indices]
        return PromptPool(prompts=[self.prompts[i] for i in indices],
                          columns={name: [values[i] for i in indices] for name, values in self.columns.items()},
                          path=self.path,
                          line_numbers=None if self.line_numbers is None else [self.line_numbers[i] for i in indices])

    def answers(self) -> list[str | None]:
        """The ``"answer"`` column as strings (numbers via ``str``; None where absent), for the built-in rewards'
        ``meta={"answers": ...}``."""
        return [None if a is None else a if isinstance(a, str) else str(a)
                for a in self.columns.get("answer", [None] * len(self))]


# ------------------------------------------------------------------------------------------------------ loading
def _check_messages(messages: list, where: str) -> None:
    if not messages:
        raise ValueError(f'{where}: "prompt" is an empty list of messages. Give at least one message, e.g. '
                         '[{"role": "user", "content": "..."}], or a plain string.')
    for position, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            found = sorted(message) if isinstance(message, dict) else type(message).__name__
            raise ValueError(f'{where}: message {position} of "prompt" must be an object with "role" and "content" '
                             f'(found {found}). Write messages as {{"role": "user", "content": "..."}}.')
        if not isinstance(message["role"], str) or not message["role"]:
            raise ValueError(f'{where}: message {position} has role {message["role"]!r}; a role must be a non-empty '
                             'string such as "system", "user" or "assistant".')
        content = message["content"]
        if not isinstance(content, (str, list)):
            raise ValueError(f'{where}: message {position} has content of type {type(content).__name__}; content must '
                             'be a string (or a list of content parts, for templates that take them).')


def check_prompt(prompt: Any, where: str) -> None:
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError(f'{where}: "prompt" is empty. Every prompt needs text (a response is predicted from it); '
                             "remove the line or fill it in.")
        return
    if isinstance(prompt, list):
        _check_messages(prompt, where)
        return
    raise ValueError(f'{where}: "prompt" must be a string or a list of {{"role", "content"}} messages, found '
                     f"{type(prompt).__name__}. {_SHAPE}")


def iter_jsonl(path: str, shape_hint: str) -> Iterator[tuple[int, str, Any]]:
    """(1-based line number, "FILE, line N", parsed value) for each non-blank line of a JSONL file.

    Raises ValueError naming the file and line for invalid JSON, followed by ``shape_hint`` (the expected form).
    """
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: invalid JSON ({error.msg} at column {error.colno}). {shape_hint}") from None
            yield number, where, value


def load_prompt_pool(path: str | os.PathLike) -> PromptPool:
    """Read a JSONL prompt pool (see the module docstring); blank lines are skipped.

    Raises:
        ValueError: naming the file, the 1-based line and the fix, for invalid JSON, a line that is not an object, a
            missing or empty prompt, a malformed message, or a line whose prompt form (plain/conversational) differs
            from the first line's; and for a file with no prompts.
    """
    path = os.fspath(path)
    prompts: list[Any] = []
    rows: list[dict] = []
    lines: list[int] = []
    for number, where, record in iter_jsonl(path, _SHAPE):
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, found {type(record).__name__}. {_SHAPE}")
        if "prompt" not in record:
            raise ValueError(f'{where}: missing "prompt" (keys found: {sorted(record)}). {_SHAPE}')
        prompt = record.pop("prompt")
        check_prompt(prompt, where)
        if prompts and is_conversational(prompt) != is_conversational(prompts[0]):
            forms = ("conversational (a list of messages)", "plain text")
            this, first = (forms[0], forms[1]) if is_conversational(prompt) else (forms[1], forms[0])
            raise ValueError(f"{where}: the prompt is {this} but the first prompt (line {lines[0]}) is {first}; "
                             "a pool holds one form, as a TRL dataset does. Convert every line to one form.")
        prompts.append(prompt)
        rows.append(record)
        lines.append(number)
    if not prompts:
        raise ValueError(f"{path}: holds no prompts (empty file or blank lines only). {_SHAPE}")
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    columns = {name: [row.get(name) for row in rows] for name in names}
    return PromptPool(prompts=prompts, columns=columns, path=path, line_numbers=lines)


# ------------------------------------------------------------------------------------------------------ rendering
def trl_prompts(prompts: PromptPool | Sequence[Any], chat_template: str = "auto") -> tuple[list[Any], bool]:
    """(the prompts as TRL's dataset would hold them, whether they are conversational) under ``chat_template``.

    ``"on"`` wraps plain strings as ``[{"role": "user", "content": text}]``; ``"off"`` refuses conversational
    prompts. Raises ValueError for an unknown mode, an empty list or a mix of forms.
    """
    if chat_template not in CHAT_TEMPLATE_MODES:
        raise ValueError(f"chat_template must be one of {CHAT_TEMPLATE_MODES}; got {chat_template!r}.")
    items = list(prompts.prompts if isinstance(prompts, PromptPool) else prompts)
    if not items:
        raise ValueError("prompts is empty; pass at least one prompt.")
    forms = {is_conversational(p) for p in items}
    if len(forms) > 1:
        raise ValueError("prompts mix plain strings and message lists; TRL decides the form of a batch from its first "
                         "prompt. Use one form for all prompts.")
    bad = [i for i, p in enumerate(items) if not (isinstance(p, str) or is_conversational(p))]
    if bad:
        raise ValueError(f"prompts[{bad[0]}] is {type(items[bad[0]]).__name__}; a prompt is a string or a list of "
                         '{"role", "content"} messages.')
    conversational = forms == {True}
    if conversational and chat_template == "off":
        raise ValueError("the prompts are conversational (lists of messages) but the chat template is off: "
                         "conversational prompts can only be rendered with the chat template. Use --chat-template "
                         "auto (or on), or give plain-text prompts.")
    if not conversational and chat_template == "on":
        return [[{"role": "user", "content": p}] for p in items], True
    return items, conversational


def _require_template(tokenizer: Any) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the prompts are conversational (or --chat-template on) but the tokenizer has no "
                         "chat_template: use a tokenizer that has one (an instruct/chat checkpoint), or set the "
                         "template the trainer rendered with (tokenizer.chat_template = ..., saved by "
                         "save_pretrained as chat_template.jinja beside tokenizer_config.json), or give plain-text "
                         "prompts with --chat-template off.")


def _id_rows(encoded: Any, count: int, what: str) -> list[list[int]]:
    """``input_ids`` of a tokenizer/template call (BatchEncoding, dict, tensor or lists) as ``count`` int lists."""
    if isinstance(encoded, Mapping) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    rows = list(encoded)
    if count == 1 and rows and not isinstance(rows[0], (list, tuple)) and not hasattr(rows[0], "tolist"):
        rows = [rows]
    if len(rows) != count:
        raise ValueError(f"{what} returned {len(rows)} token rows for {count} prompts.")
    return [[int(t) for t in (row.tolist() if hasattr(row, "tolist") else row)] for row in rows]


def render_prompts(prompts: PromptPool | Sequence[Any], tokenizer: Any, *, chat_template: str = "auto",
                   chat_template_kwargs: Mapping[str, Any] | None = None) -> list[list[int]]:
    """The prompts' token ids [P][len_p], as TRL's ``GRPOTrainer`` tokenises them (see the module docstring).

    Args:
        prompts: a :class:`PromptPool` or a list of prompts (strings, or message lists), all of one form.
        tokenizer: a transformers tokenizer.
        chat_template: "auto", "on" or "off" (:func:`trl_prompts`).
        chat_template_kwargs: extra keyword arguments for ``apply_chat_template`` (TRL's
            ``GRPOConfig.chat_template_kwargs``, e.g. ``{"enable_thinking": False}``).

    Raises:
        ValueError: conversational prompts with a tokenizer that has no chat template, conversational prompts with
            ``chat_template="off"``, a mix of forms, or a prompt that renders to no tokens.
    """
    items, conversational = trl_prompts(prompts, chat_template)
    if conversational:
        _require_template(tokenizer)
        encoded = tokenizer.apply_chat_template(items, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                **dict(chat_template_kwargs or {}))
        rows = _id_rows(encoded, len(items), "tokenizer.apply_chat_template")
    else:
        rows = _id_rows(tokenizer(text=items), len(items), "the tokenizer")
    for index, row in enumerate(rows):
        if not row:
            where = prompts.where(index) if isinstance(prompts, PromptPool) else f"prompts[{index}]"
            raise ValueError(f"{where}: the prompt renders to no tokens; every prompt needs at least one token (a "
                             "response token is predicted from the position before it).")
    return rows


def prompt_text(prompt: Any, tokenizer: Any, *, chat_template: str = "auto",
                chat_template_kwargs: Mapping[str, Any] | None = None) -> str:
    """One prompt as text, for display and for funcprobe-signature rewards: the chat template's rendering (with the
    generation prompt) for a conversational prompt (or any prompt with ``chat_template="on"``), the string itself
    otherwise. Special tokens the tokenizer adds itself (a BOS) are not shown."""
    (item,), conversational = trl_prompts([prompt], chat_template)
    if not conversational:
        return item
    _require_template(tokenizer)
    text = tokenizer.apply_chat_template(item, add_generation_prompt=True, tokenize=False,
                                         **dict(chat_template_kwargs or {}))
    return text if isinstance(text, str) else str(text)
