"""Reward functions written for TRL, called exactly as TRL 1.16's ``GRPOTrainer._calculate_rewards`` calls them.

A TRL reward function scores B·G completions in one call (GT = ``trl/trainer/grpo_trainer.py`` of TRL 1.16)::

    f(prompts=[B·G raw prompts], completions=[B·G], completion_ids=[B·G token-id lists],
      trainer_state=..., log_extra=..., log_metric=..., **columns) -> [B·G floats or None]

* ``prompts``: the dataset's prompts (strings, or message lists), each repeated G times (GT:1626).
* ``completions``: ``batch_decode(completion_ids, skip_special_tokens=True)`` — plain strings for plain prompts,
  ``[{"role": "assistant", "content": text}]`` for conversational ones (GT:2228-2247; transformers ≥ 5 tokenizers with
  a ``response_template``/``response_schema`` use TRL's ``parse_response`` instead, as here when TRL is installed).
* ``completion_ids``: the sampled ids, unpadded, ending with the stop token when one was produced (GT:1880-1888).
* every dataset column except ``prompt``, ``completion`` and ``completion_ids``, one entry per completion (GT:1584);
  ``trainer_state`` (TRL: ``self.state``), ``log_extra(column, values)`` and ``log_metric(name, value)`` (GT:1588-1595).
* None → NaN ("not scored", GT:1630); a wrong length is a ValueError (GT:1631). Async functions are awaited.

:class:`TRLRewards` wraps F such functions as a funcprobe reward (``reward_fn(prompts, responses, meta)``) returning
float64 [B, G, F]; ``objective.compute_advantages`` then sums them with the weights by ``nansum`` as TRL does
(``sample_batch(..., reward_weights=rewards.weights)``).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import importlib
import importlib.util
import inspect
import math
import os
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .prompts import PromptPool, is_conversational, trl_prompts
from .rewards import answer_match, tag_format
from .rollouts_file import save_rollouts

__all__ = ["TRLRewards", "RewardFunctionError", "load_reward_function", "reward_function_name", "BUILTIN_TRL_REWARDS",
           "trainer_state_from_checkpoint", "completion_text"]

#: Column names TRL does not pass to reward functions (GT:1584).
_DROPPED_COLUMNS = ("prompt", "completion", "completion_ids")
#: Keyword arguments TRL itself sets; a dataset column of the same name is overwritten by them, as in TRL.
_TRAINER_KWARGS = ("trainer_state", "log_extra", "log_metric")
_SPEC_FORMS = ('"module.sub:function" (an importable module), "path/to/file.py:function", or a built-in name '
               '("answer", "tag")')


def reward_function_name(function: Any) -> str:
    """TRL's name for a reward function (``trl.trainer.utils.get_callable_name``): partials unwrapped, then
    ``__name__``, else the class name."""
    while isinstance(function, functools.partial):
        function = function.func
    return getattr(function, "__name__", type(function).__name__)


def completion_text(completion: Any) -> str:
    """A completion's text: the string itself, or the joined string contents of a message list."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(m.get("content") or "" for m in completion
                       if isinstance(m, dict) and isinstance(m.get("content"), (str, type(None))))
    raise ValueError(f"a completion must be a string or a list of messages; got {type(completion).__name__}.")


# ------------------------------------------------------------------------------------------------- built-ins
def _builtin(name: str, scorer: Callable) -> Callable:
    def reward(completions: list, answer: list | None = None, **kwargs: Any) -> list[float]:
        if answer is None:
            raise ValueError(f"the built-in reward {name!r} needs an 'answer' column in the prompt pool (the gold "
                             'answer of each prompt, e.g. {"prompt": "...", "answer": "42"}).')
        answers = [a if a is None or isinstance(a, str) else str(a) for a in answer]
        rows = scorer([""] * len(completions), [[completion_text(c)] for c in completions], {"answers": answers})
        return [row[0] for row in rows]

    reward.__name__ = reward.__qualname__ = scorer.__name__
    # Checked when the rewards are built (TRLRewards), before anything is sampled.
    reward.required_columns = ("answer",)
    reward.__doc__ = f"TRL-signature wrapper of funcprobe.rewards.{scorer.__name__} (reads the 'answer' column)."
    return reward


#: The built-in rewards with TRL's signature, by short name.
BUILTIN_TRL_REWARDS: dict[str, Callable] = {"answer": _builtin("answer", answer_match),
                                            "tag": _builtin("tag", tag_format)}


# ------------------------------------------------------------------------------------------------- loading
def _load_file(path: str, spec: str) -> Any:
    if not os.path.isfile(path):
        raise ValueError(f"reward {spec!r}: file {path!r} not found (relative paths are from the current directory "
                         f"{os.getcwd()!r}). Forms: {_SPEC_FORMS}.")
    path = os.path.abspath(path)
    digest = hashlib.blake2b(path.encode(), digest_size=6).hexdigest()
    name = f"_funcprobe_reward_{digest}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    # During execution only: in sys.modules (dataclasses and typing look the module up there) and with its folder on
    # sys.path (so that it can import its sibling modules, as a script run from there could).
    folder = os.path.dirname(path)
    sys.modules[name] = module
    sys.path.insert(0, folder)
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__.tb_next)).rstrip()
        raise ValueError(f"reward {spec!r}: running {path!r} failed:\n{text}") from None
    finally:
        sys.modules.pop(name, None)
        try:
            sys.path.remove(folder)
        except ValueError:
            pass
    return module


def _load_module(module_name: str, spec: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"reward {spec!r}: module {module_name!r} cannot be imported ({type(error).__name__}: "
                         f"{error}). Put it on the Python path (e.g. PYTHONPATH=. when it is in the current "
                         "directory), install its dependencies, or give its file: path/to/file.py:function.") from None
    except Exception as error:
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__)).rstrip()
        raise ValueError(f"reward {spec!r}: importing module {module_name!r} failed:\n{text}") from None


def load_reward_function(spec: str) -> Callable:
    """A TRL-signature reward function from ``spec``: ``"module.sub:function"``, ``"path/to/file.py:function"``
    (executed without staying in ``sys.modules``; the attribute may be dotted, ``Class.method``), or a built-in name
    ("answer", "tag": funcprobe's rewards with TRL's signature, reading the ``answer`` column).

    Raises:
        ValueError: a malformed spec, a file that does not exist, a module that cannot be imported (with the
            ImportError's text), a missing attribute, or something that is not a function (a class, a
            ``torch.nn.Module`` reward model, a non-callable).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"reward: expected {_SPEC_FORMS}; got {spec!r}.")
    spec = spec.strip()
    if spec in BUILTIN_TRL_REWARDS:
        return BUILTIN_TRL_REWARDS[spec]
    if ":" not in spec:
        raise ValueError(f"reward {spec!r}: not a built-in ({sorted(BUILTIN_TRL_REWARDS)}) and names no function; "
                         f"write {_SPEC_FORMS}.")
    source, _, attribute = spec.rpartition(":")
    if not source or not attribute:
        raise ValueError(f"reward {spec!r}: expected {_SPEC_FORMS}.")
    is_file = source.endswith(".py") or "/" in source or os.sep in source
    module = _load_file(source, spec) if is_file else _load_module(source, spec)
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            raise ValueError(f"reward {spec!r}: {source!r} has no {attribute!r} (its callables: {public[:20]}).")
        target = getattr(target, part)
    if inspect.isclass(target):
        raise ValueError(f"reward {spec!r}: {attribute!r} is a class; name a function (or a callable instance).")
    if isinstance(target, torch.nn.Module):
        raise ValueError(f"reward {spec!r}: {attribute!r} is a torch.nn.Module (a reward model); funcprobe calls "
                         "reward functions only. Wrap the model in a function returning one float per completion.")
    if not callable(target):
        raise ValueError(f"reward {spec!r}: {attribute!r} is a {type(target).__name__}, not callable.")
    return target


def trainer_state_from_checkpoint(checkpoint: str | os.PathLike | None = None) -> Any:
    """The ``transformers.TrainerState`` a reward function sees as ``trainer_state``: the checkpoint's
    ``trainer_state.json`` (``global_step``, ``epoch``, …) when the folder has one, else a fresh state (step 0)."""
    from transformers import TrainerState

    if checkpoint is not None:
        path = os.path.join(os.fspath(checkpoint), "trainer_state.json")
        if os.path.isfile(path):
            return TrainerState.load_from_json(path)
    return TrainerState()


# ------------------------------------------------------------------------------------------------- errors
#: The note a RewardFunctionError ends with in the library (the command line says where it saved the batch instead).
KEPT_NOTE = ("The sampled completions are kept on this error: error.save_rollouts(PATH) writes them; after fixing the "
             "function, score them with --rollouts PATH.")


class RewardFunctionError(ValueError):
    """A reward function raised, or returned something other than one finite number (or None) per completion. The
    message (``description``, then ``note``) names the function, the prompt that triggers it and shows the function's
    own traceback (``traceback_text``; empty for a bad return value). The sampled batch is kept: ``prompts`` [B] (as
    TRL passes them), ``completions`` [B][G], ``completion_ids`` [B][G], ``prompt_ids`` [B] or None, ``columns``
    {name: [B]}; :meth:`save_rollouts` writes them as a rollouts file to score again (``--rollouts``) after fixing
    the function."""

    def __init__(self, description: str, *, function_name: str, prompt_number: int | None, traceback_text: str,
                 prompts: list, completions: list, completion_ids: list, prompt_ids: list | None,
                 columns: dict[str, list], note: str = KEPT_NOTE):
        super().__init__(f"{description}\n\n{note}" if note else description)
        self.description = description
        self.note = note
        self.function_name = function_name
        self.prompt_number = prompt_number
        self.traceback_text = traceback_text
        self.prompts = prompts
        self.completions = completions
        self.completion_ids = completion_ids
        self.prompt_ids = prompt_ids
        self.columns = columns

    @property
    def headline(self) -> str:
        """The description's first line (what the function did), without the prompt, completions and traceback."""
        return self.description.splitlines()[0] if self.description else self.function_name

    def with_note(self, note: str) -> "RewardFunctionError":
        """The same error with ``note`` in place of the library's (e.g. where the command line saved the batch)."""
        return RewardFunctionError(self.description, function_name=self.function_name,
                                   prompt_number=self.prompt_number, traceback_text=self.traceback_text,
                                   prompts=self.prompts, completions=self.completions,
                                   completion_ids=self.completion_ids, prompt_ids=self.prompt_ids,
                                   columns=self.columns, note=note)

    def save_rollouts(self, path: str | os.PathLike) -> None:
        """Write the sampled prompts and completions (with their token ids, no rewards) to a rollouts JSONL."""
        save_rollouts(path, self.prompts, self.completions, self.completion_ids, prompt_ids=self.prompt_ids,
                      columns=self.columns)


def _user_traceback(error: BaseException) -> tuple[str, bool]:
    """(the error's traceback without this module's and asyncio's frames, whether any frame is left)."""
    here = os.path.abspath(__file__)
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if os.path.abspath(f.filename) != here and f"{os.sep}asyncio{os.sep}" not in f.filename]
    lines = ["Traceback (most recent call last):\n", *traceback.format_list(frames),
             *traceback.format_exception_only(type(error), error)]
    return "".join(lines).rstrip(), bool(frames)


def _short(value: Any, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


# ------------------------------------------------------------------------------------------------- the wrapper
class TRLRewards:
    """F TRL-signature reward functions as one funcprobe reward ``(prompts, responses, meta) -> float64 [B, G, F]``.

    Args:
        functions: F ≥ 1 callables with TRL's signature (:func:`load_reward_function`).
        weights: F reward weights (TRL's ``reward_weights``; None: 1 each). Not applied here: pass
            ``reward_weights=self.weights`` to ``sample_batch``/``compute_advantages``, which sum by ``nansum``.
        prompts: the B prompts as TRL's dataset holds them (strings or message lists; ``prompts.trl_prompts``).
        columns: ``{name: B values}``, the pool's extra columns of these prompts (``prompt``, ``completion`` and
            ``completion_ids`` are dropped, as TRL does); each is repeated G times per call.
        conversational: whether completions are passed as ``[{"role": "assistant", "content": text}]`` (default:
            the prompts' form).
        tokenizer: when given, completions are decoded from the sampled ids exactly as TRL decodes them
            (``skip_special_tokens=True``, stop token included in the ids); else the sampler's response texts are used.
        prompt_ids: the B rendered prompts' token ids (kept on errors, and TRL's ``parse_response`` prefix), or None.
        prompt_labels: B labels used in messages (e.g. "pool.jsonl, line 7"), or None ("prompt n").
        trainer_state: passed as ``trainer_state`` (default: :func:`trainer_state_from_checkpoint()`, a fresh state).

    Calling it needs ``meta["response_ids"]`` [B][G] (``sample_batch`` passes it). ``logged_extra`` and
    ``logged_metrics`` collect what the functions log through ``log_extra``/``log_metric``.

    Raises (on call): :class:`RewardFunctionError` (a ValueError) when a function raises, returns a wrong length, a
    non-number or an infinite reward (naming the function, and the prompt for the latter two); it keeps the batch.
    """

    def __init__(self, functions: Sequence[Callable] | Callable, weights: Sequence[float] | None = None, *,
                 prompts: Sequence[Any], columns: Mapping[str, Sequence[Any]] | None = None,
                 conversational: bool | None = None, tokenizer: Any = None,
                 prompt_ids: Sequence[Sequence[int]] | None = None, prompt_labels: Sequence[str] | None = None,
                 trainer_state: Any = None):
        functions = [functions] if callable(functions) else list(functions)
        if not functions:
            raise ValueError("TRLRewards needs at least one reward function.")
        for function in functions:
            if not callable(function):
                raise ValueError(f"reward function {function!r} is not callable.")
        self.functions = functions
        self.names = [reward_function_name(f) for f in functions]
        if weights is not None:
            weights = tuple(float(w) for w in weights)
            if len(weights) != len(functions):
                raise ValueError(f"reward weights: {len(weights)} weights for {len(functions)} reward functions "
                                 f"({self.names}); pass one weight per function (TRL's reward_weights).")
            if not all(math.isfinite(w) for w in weights):
                raise ValueError(f"reward weights must be finite; got {weights}.")
        self.weights = weights
        self.prompts = list(prompts)
        B = len(self.prompts)
        if B == 0:
            raise ValueError("TRLRewards needs at least one prompt.")
        self.conversational = is_conversational(self.prompts[0]) if conversational is None else bool(conversational)
        self.columns: dict[str, list] = {}
        for name, values in (columns or {}).items():
            if name in _DROPPED_COLUMNS:
                continue
            if name in ("prompts", "completions"):
                raise ValueError(f"the prompt pool has a column {name!r}, which collides with the reward functions' "
                                 f"{name!r} argument (TRL would fail with a TypeError). Rename the column.")
            values = list(values)
            if len(values) != B:
                raise ValueError(f"column {name!r} has {len(values)} values for {B} prompts; pass one per prompt.")
            self.columns[name] = values
        for function, name in zip(functions, self.names):
            # A function may declare the pool columns it reads (``required_columns``; the built-ins do): a missing
            # one is knowable now, before anything is sampled.
            missing = [c for c in getattr(function, "required_columns", ()) if c not in self.columns]
            if missing:
                have = ", ".join(repr(c) for c in self.columns) or "none besides the prompt"
                raise ValueError(f"reward function {name!r} needs the column{'s' if len(missing) > 1 else ''} "
                                 f"{', '.join(repr(c) for c in missing)} in the prompt pool (e.g. "
                                 '{"prompt": "...", "answer": "42"} per line), but the pool has ' + f"{have}. Add "
                                 "it to every line, or choose a reward that does not need it.")
            labels = list(prompt_labels) if prompt_labels is not None else [f"prompt {n}" for n in range(B)]
            for column in getattr(function, "required_columns", ()):
                lacking = [labels[n] for n, value in enumerate(self.columns[column]) if value is None]
                if lacking:  # the pool has the column, but not on every line: the data's fault, knowable now
                    shown = "; ".join(lacking[:3]) + ("; …" if len(lacking) > 3 else "")
                    lines = "that line" if len(lacking) == 1 else "those lines"
                    raise ValueError(f"reward function {name!r} needs the column {column!r} on every prompt, but "
                                     f"{len(lacking)} lack it: {shown}. Add {column!r} to {lines}, or choose a "
                                     "reward that does not need it.")
        self.prompt_ids = None if prompt_ids is None else [list(map(int, row)) for row in prompt_ids]
        if self.prompt_ids is not None and len(self.prompt_ids) != B:
            raise ValueError(f"prompt_ids has {len(self.prompt_ids)} rows for {B} prompts.")
        self.prompt_labels = list(prompt_labels) if prompt_labels is not None else [f"prompt {n}" for n in range(B)]
        self.tokenizer = tokenizer
        self.trainer_state = trainer_state_from_checkpoint() if trainer_state is None else trainer_state
        self.logged_extra: dict[str, list] = {}
        self.logged_metrics: dict[str, list[float]] = {}
        self.__name__ = self.__qualname__ = "+".join(self.names)

    @classmethod
    def for_pool(cls, functions: Sequence[Callable] | Callable, pool: PromptPool, rows: Sequence[int] | None = None,
                 *, weights: Sequence[float] | None = None, chat_template: str = "auto", **options: Any) -> TRLRewards:
        """The rewards of the pool's prompts ``rows`` (default: all), as TRL sees them under ``chat_template``; the
        other keyword arguments as for the constructor (``tokenizer``, ``prompt_ids``, ``trainer_state``)."""
        chosen = pool if rows is None else pool.select(rows)
        prompts, conversational = trl_prompts(chosen, chat_template)
        options.setdefault("prompt_labels", [chosen.where(i) for i in range(len(chosen))])
        return cls(functions, weights, prompts=prompts, columns=chosen.columns, conversational=conversational,
                   **options)

    @property
    def F(self) -> int:
        return len(self.functions)

    # ------------------------------------------------------------------------------------------------ calling
    def _log_extra(self, column: str, values: list) -> None:
        self.logged_extra.setdefault(column, []).extend(values)

    def _log_metric(self, name: str, value: float) -> None:
        self.logged_metrics.setdefault(name, []).append(value)

    def completions(self, responses: Sequence[Sequence[str]], response_ids: Sequence[Sequence[Sequence[int]]]
                    ) -> list[list[Any]]:
        """[B][G] completions as TRL passes them: decoded from the ids when a tokenizer was given, else the texts;
        wrapped as one assistant message for conversational prompts."""
        if self.tokenizer is None:
            texts = [[str(t) for t in group] for group in responses]
            if not self.conversational:
                return texts
            return [[[{"role": "assistant", "content": t}] for t in group] for group in texts]
        parse = self._parser() if self.conversational else None
        out = []
        for n, group in enumerate(response_ids):
            if parse is not None:
                prefix = None if self.prompt_ids is None else self.prompt_ids[n]
                out.append([[parse(self.tokenizer, list(ids), prefix=prefix)] for ids in group])
                continue
            texts = self.tokenizer.batch_decode([list(ids) for ids in group], skip_special_tokens=True)
            out.append([[{"role": "assistant", "content": t}] for t in texts] if self.conversational else texts)
        return out

    def _parser(self) -> Callable | None:
        """TRL's ``parse_response`` when TRL would use it (transformers ≥ 5 and a tokenizer with a response template
        or schema, GT:2230-2242), else None. Without TRL installed, ``tokenizer.parse_response`` with TRL's fallback."""
        tok = self.tokenizer
        if getattr(tok, "response_template", None) is None and getattr(tok, "response_schema", None) is None:
            return None
        import transformers

        if int(transformers.__version__.split(".")[0]) < 5:
            return None
        try:
            from trl.chat_template_utils import parse_response
            return parse_response
        except ImportError:
            def parse_response(tokenizer, ids, prefix=None):
                try:
                    parsed = tokenizer.parse_response(ids)
                    if parsed is None:
                        raise ValueError("parse_response returned None")
                    if not parsed.get("content"):
                        parsed["content"] = ""
                    return parsed
                except (ValueError, TypeError):
                    return {"role": "assistant", "content": tokenizer.decode(ids, skip_special_tokens=True)}
            return parse_response

    def __call__(self, prompts: Sequence[str], responses: Sequence[Sequence[str]],
                 meta: Mapping[str, Any] | None = None) -> Tensor:
        """funcprobe's reward signature: float64 [B, G, F] (NaN where a function returned None)."""
        B = len(responses)
        if B != len(self.prompts):
            raise ValueError(f"TRLRewards was built for {len(self.prompts)} prompts but is called with {B}; build one "
                             "per batch (TRLRewards.for_pool(functions, pool, rows)).")
        response_ids = None if meta is None else meta.get("response_ids")
        if response_ids is None:
            raise ValueError("TRLRewards needs meta['response_ids'] (the sampled ids, stop token included, [B][G]): "
                             "TRL passes completion_ids. sample_batch passes them.")
        return self.score(self.completions(responses, response_ids), response_ids)

    def score(self, completions: Sequence[Sequence[Any]], completion_ids: Sequence[Sequence[Sequence[int]]]
              ) -> Tensor:
        """Call every function once on the B·G completions ([B][G] completions as TRL passes them, and their ids);
        float64 [B, G, F]."""
        B = len(self.prompts)
        G = len(completions[0]) if completions else 0
        if len(completions) != B or any(len(group) != G for group in completions) or len(completion_ids) != B \
                or any(len(group) != G for group in completion_ids):
            raise ValueError(f"completions and completion_ids must both be [B][G] with B = {B} prompts and one G.")
        flat_completions = [c for group in completions for c in group]
        flat_ids = [list(map(int, ids)) for group in completion_ids for ids in group]
        kwargs = {"prompts": [p for p in self.prompts for _ in range(G)], "completions": flat_completions,
                  "completion_ids": flat_ids}
        columns = {name: [v for v in values for _ in range(G)] for name, values in self.columns.items()}
        trainer = {"trainer_state": self.trainer_state, "log_extra": self._log_extra, "log_metric": self._log_metric}
        kwargs.update(columns)
        kwargs.update(trainer)
        out = torch.empty((B * G, self.F), dtype=torch.float64)
        for index, function in enumerate(self.functions):
            try:
                output = _invoke(function, kwargs)
            except Exception as error:
                raise self._diagnose(index, error, kwargs, B, G, completions, completion_ids) from error
            try:
                out[:, index] = self._check_output(index, output, B, G)
            except ValueError as error:
                raise RewardFunctionError(str(error), traceback_text="", prompt_number=None,
                                          **self._kept(index, completions, completion_ids)) from None
        return out.view(B, G, self.F)

    def _kept(self, index: int, completions: Sequence, completion_ids: Sequence) -> dict[str, Any]:
        """The batch a RewardFunctionError keeps (to save and score again once the function is fixed)."""
        return dict(prompts=self.prompts, completions=[list(g) for g in completions],
                    completion_ids=[[list(map(int, ids)) for ids in g] for g in completion_ids],
                    prompt_ids=self.prompt_ids, columns=self.columns, function_name=self.names[index])

    def _check_output(self, index: int, output: Any, B: int, G: int) -> Tensor:
        name = self.names[index]
        try:
            values = list(output)
        except TypeError:
            raise ValueError(f"reward function {name!r} returned {type(output).__name__}; it must return a list of "
                             f"{B * G} floats (one per completion; None for a completion it does not score).") from None
        if len(values) != B * G:
            raise ValueError(f"The reward function {name!r} returned {len(values)} rewards, but {B * G} were expected "
                             f"(one per prompt-completion pair: B={B} prompts × G={G}). Make sure the reward function "
                             "returns exactly one reward per completion.")
        numbers, nan = [], []
        for flat, value in enumerate(values):
            if value is None:
                numbers.append(math.nan)
                continue
            if isinstance(value, (str, bytes)):
                # float("1.0") would read it; TRL's torch.tensor(rewards, dtype=float32) fails on a string, so the
                # trainer could never have stepped on it.
                raise ValueError(f"reward function {name!r} returned the string {_short(value, 80)} for completion "
                                 f"{flat % G} of {self.prompt_labels[flat // G]}; rewards must be numbers (or None), "
                                 "and TRL's GRPOTrainer fails on strings too. Return float(...) from the function.")
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"reward function {name!r} returned {_short(value, 80)} for completion {flat % G} of "
                                 f"{self.prompt_labels[flat // G]}; each reward must be a number or None.") from None
            if math.isinf(number):
                raise ValueError(f"reward function {name!r} returned {number} for completion {flat % G} of "
                                 f"{self.prompt_labels[flat // G]} ({_short(self.prompts[flat // G], 120)}); rewards "
                                 "must be finite (None marks a completion it does not score).")
            if math.isnan(number):
                nan.append(flat)
            numbers.append(number)
        if nan:
            # Not "returned None": NaN is the function's own value (0/0, a NaN from a model), not its "not scored".
            first = nan[0]
            raise ValueError(f"reward function {name!r} returned NaN for {len(nan)} of the {B * G} completions, the "
                             f"first for completion {first % G} of {self.prompt_labels[first // G]} "
                             f"({_short(self.prompts[first // G], 120)}); rewards must be finite numbers (return None "
                             "for a completion the function does not score).")
        # TRL stores rewards as float32 (GT:1633); compute_advantages works in float32 too.
        return torch.tensor(numbers, dtype=torch.float32).to(torch.float64)

    def _diagnose(self, index: int, error: Exception, kwargs: dict, B: int, G: int, completions: Sequence,
                  completion_ids: Sequence) -> RewardFunctionError:
        name = self.names[index]
        function = self.functions[index]
        text, has_frames = _user_traceback(error)
        keep = self._kept(index, completions, completion_ids)
        if isinstance(error, TypeError) and not has_frames:
            passed = ", ".join(kwargs)
            message = (f"reward function {name!r} cannot be called as TRL calls it: {error}. TRL passes the keyword "
                       f"arguments {passed} (every column of the prompt pool, besides prompt); write it as "
                       f"def {name}(prompts, completions, **kwargs).")
            return RewardFunctionError(message, prompt_number=None, traceback_text=text, **keep)
        found = None
        for n in range(B):
            part = {key: (value[n * G:(n + 1) * G] if isinstance(value, list) else value)
                    for key, value in kwargs.items()}
            try:
                _invoke(function, part)
            except Exception as single:
                found = (n, single)
                break
        if not has_frames:
            text = ""
        if found is None:
            message = (f"reward function {name!r} raised {type(error).__name__}: {error} when called on the batch of "
                       f"{B} prompts × {G} completions, but on no single prompt's group alone."
                       + (f"\n\n{text}" if text else ""))
            return RewardFunctionError(message, prompt_number=None, traceback_text=text, **keep)
        n, single = found
        single_text, single_frames = _user_traceback(single)
        if not single_frames:  # raised by funcprobe's own wrapper, not by the user's code: no traceback to show
            single_text = ""
        message = (f"reward function {name!r} raised {type(single).__name__}: {single}\n"
                   f"on {self.prompt_labels[n]} (batch row {n}): prompt {_short(self.prompts[n])}\n"
                   f"completions: {_short([completion_text(c) for c in completions[n]])}"
                   + (f"\n\n{single_text}" if single_text else ""))
        return RewardFunctionError(message, prompt_number=n, traceback_text=single_text, **keep)


def _invoke(function: Callable, kwargs: Mapping[str, Any]) -> Any:
    """``function(**kwargs)``; an awaitable result (an async reward function) is run to completion."""
    result = function(**kwargs)
    if inspect.isawaitable(result):
        async def wait():
            return await result
        result = asyncio.run(wait())
    return result
