"""The files rollouts are kept in: the rollouts JSONL (``save_rollouts`` writes it, ``funcprobe.rollouts.load_rollouts``
reads it back; its docstring gives the format) and a :class:`~funcprobe.batch.RolloutBatch`'s own files, safetensors
(``save_batch`` / ``load_batch``) or JSON (``save_batch_json`` / ``load_batch_json``, the batch's ``to_dict`` form).

A module of its own, below ``funcprobe.trl_rewards`` (whose ``RewardFunctionError.save_rollouts`` writes a rollouts
file) and above ``funcprobe.batch``, which holds the batch's fields and validation but touches no file;
``funcprobe.rollouts`` re-exports ``save_rollouts``."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .batch import (_FORMAT_KEY, _FORMAT_V1, _MASKS, _PAD_KEY, _RECIPE_KEY, _REQUIRED_TENSORS, _TEMPERATURE_KEY,
                    _TENSOR_FIELDS, FORMAT_VERSION, AdvantageRecipe, RolloutBatch, _recorded_temperature)

__all__ = ["ROLLOUT_KEYS", "save_rollouts", "save_batch", "load_batch", "save_batch_json", "load_batch_json"]

#: The keys of a rollouts line that are not columns.
ROLLOUT_KEYS = ("prompt", "completions", "rewards", "prompt_ids", "completion_ids", "finished")


def _json_reward(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_json_reward(v) for v in value]
    value = float(value)
    return None if math.isnan(value) else value


def save_rollouts(path: str | os.PathLike, prompts: Sequence[Any], completions: Sequence[Sequence[Any]],
                  completion_ids: Sequence[Sequence[Sequence[int]]] | None = None, *,
                  rewards: Tensor | Sequence | None = None, prompt_ids: Sequence[Sequence[int]] | None = None,
                  finished: Sequence[Sequence[bool]] | None = None,
                  columns: Mapping[str, Sequence[Any]] | None = None) -> None:
    """Write B prompts with their G completions as a rollouts JSONL that :func:`load_rollouts` reads back.

    Args:
        prompts: B prompts (strings or message lists); completions: [B][G] strings or message lists;
        completion_ids: [B][G] token ids (stop token included) or None; rewards: [B, G] or [B, G, F] (NaN → null) or
        None; prompt_ids: [B] id lists or None; finished: [B][G] booleans or None; columns: {name: [B values]}.
    """
    B = len(prompts)
    if len(completions) != B:
        raise ValueError(f"save_rollouts: {len(completions)} completion groups for {B} prompts.")
    if rewards is not None:
        rewards = rewards.tolist() if isinstance(rewards, Tensor) else [list(r) for r in rewards]
    columns = dict(columns or {})
    clash = sorted(set(columns) & set(ROLLOUT_KEYS))
    if clash:
        raise ValueError(f"save_rollouts: columns {clash} collide with the format's own keys {ROLLOUT_KEYS}.")
    optional = {"rewards": rewards, "prompt_ids": prompt_ids, "completion_ids": completion_ids, "finished": finished}
    for name, values in list(optional.items()) + list(columns.items()):
        if values is not None and len(values) != B:
            raise ValueError(f"save_rollouts: {name} has {len(values)} entries for {B} prompts.")
    with open(path, "w", encoding="utf-8") as file:
        for n in range(B):
            line: dict[str, Any] = {"prompt": prompts[n], "completions": list(completions[n])}
            if rewards is not None:
                line["rewards"] = _json_reward(rewards[n])
            if prompt_ids is not None:
                line["prompt_ids"] = [int(t) for t in prompt_ids[n]]
            if completion_ids is not None:
                line["completion_ids"] = [[int(t) for t in ids] for ids in completion_ids[n]]
            if finished is not None:
                line["finished"] = [bool(f) for f in finished[n]]
            for name, values in columns.items():
                line[name] = values[n]
            file.write(json.dumps(line, ensure_ascii=False, allow_nan=False) + "\n")


# ------------------------------------------------------------------------------------------------ a batch's own files
def save_batch(batch: RolloutBatch, path: str | os.PathLike) -> None:
    """Write ``batch`` to a safetensors file (masks as uint8; the optional tensors only when present).

    The metadata holds ``format`` = :data:`funcprobe.batch.FORMAT_VERSION`, ``pad_token_id``, ``temperature``
    (written with ``repr``, so it reads back exactly) and the ``advantage_recipe`` when known.
    """
    from safetensors.torch import save_file

    if os.fspath(path).lower().endswith(".json"):
        raise ValueError(f"{os.fspath(path)}: save_batch writes safetensors, not JSON; use save_batch_json(batch, "
                         "path) for a JSON file, or a .safetensors name.")
    tensors = {}
    for name in _TENSOR_FIELDS:
        tensor = getattr(batch, name)
        if tensor is None:
            continue
        if name in _MASKS:
            tensor = tensor.to(torch.uint8)
        # clone(): safetensors refuses tensors sharing storage (e.g. rewards passed as a view of advantages).
        tensors[name] = tensor.detach().to("cpu").contiguous().clone()
    metadata = {_FORMAT_KEY: FORMAT_VERSION, _PAD_KEY: str(batch.pad_token_id),
                _TEMPERATURE_KEY: repr(batch.temperature)}
    if batch.advantage_recipe is not None:
        metadata[_RECIPE_KEY] = json.dumps(batch.advantage_recipe.to_dict())
    save_file(tensors, os.fspath(path), metadata=metadata)


def load_batch(path: str | os.PathLike, device: torch.device | str = "cpu", *,
               temperature: float | None = None) -> RolloutBatch:
    """Read a batch written by :func:`save_batch`, validate it and put it on ``device``.

    ``temperature``: needed only for files of the older format ``funcprobe.batch/1``, which did not record the τ the
    responses were drawn at (the estimators must not guess it); for current files it must match the recorded τ if
    given.

    Raises:
        ValueError: naming the file: not safetensors, not a funcprobe batch (no ``format``), another format, missing
            or unknown tensors, no τ; then whatever :class:`RolloutBatch` refuses in its contents.
    """
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    how = "Save batches with funcprobe.rollouts_file.save_batch(batch, path)."
    try:
        with safe_open(path, framework="pt", device="cpu") as file:
            metadata = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}
    except SafetensorError as error:
        raise ValueError(f"{path}: is not a funcprobe batch: not a readable safetensors file ({error}). {how}")
    found_format = metadata.get(_FORMAT_KEY)
    if found_format is None:
        raise ValueError(
            f"{path}: is not a funcprobe batch: its metadata has no {_FORMAT_KEY!r} entry (metadata "
            f"{metadata}, tensors {sorted(tensors)}). {how}"
        )
    if found_format not in (FORMAT_VERSION, _FORMAT_V1):
        raise ValueError(
            f"{path}: has format {found_format!r}; this funcprobe reads {FORMAT_VERSION!r}. "
            f"Use the funcprobe version that wrote it, or re-save the batch."
        )
    missing = [name for name in _REQUIRED_TENSORS if name not in tensors]
    unknown = sorted(set(tensors) - set(_TENSOR_FIELDS))
    if missing or unknown:
        raise ValueError(
            f"{path}: is a damaged funcprobe batch: missing tensors {missing}, unknown tensors {unknown}. {how}"
        )
    if found_format == FORMAT_VERSION and _TEMPERATURE_KEY not in metadata:
        raise ValueError(f"{path}: is a damaged funcprobe batch: its metadata has no {_TEMPERATURE_KEY!r} "
                         f"(the τ the responses were drawn at). {how}")
    recorded = _recorded_temperature(metadata.get(_TEMPERATURE_KEY), found_format, temperature, path)
    try:
        pad_token_id = int(metadata[_PAD_KEY])
    except (KeyError, ValueError):
        raise ValueError(
            f"{path}: is a damaged funcprobe batch: metadata {_PAD_KEY!r} is {metadata.get(_PAD_KEY)!r}, "
            f"expected an integer. {how}"
        ) from None
    recipe = AdvantageRecipe.from_dict(metadata.get(_RECIPE_KEY), path)
    return RolloutBatch(pad_token_id=pad_token_id, temperature=recorded, advantage_recipe=recipe,
                        **tensors).to(device)


def save_batch_json(batch: RolloutBatch, path: str | os.PathLike) -> None:
    """Write ``batch.to_dict()`` as JSON (float64 values read back exactly)."""
    with open(path, "w", encoding="utf-8") as file:
        json.dump(batch.to_dict(), file, allow_nan=False)


def load_batch_json(path: str | os.PathLike) -> RolloutBatch:
    """Read a batch written by :func:`save_batch_json` (validated, by ``RolloutBatch.from_dict``)."""
    with open(path, encoding="utf-8") as file:
        try:
            data = json.load(file)
        except json.JSONDecodeError as error:
            raise ValueError(f"{os.fspath(path)}: is not a funcprobe batch: not valid JSON ({error}).") from None
    return RolloutBatch.from_dict(data)
