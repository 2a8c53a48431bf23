"""Writing the rollouts JSONL (``save_rollouts``), the file ``funcprobe.rollouts`` reads back (``load_rollouts``;
its docstring gives the format). A module of its own, below ``funcprobe.trl_rewards``, whose
``RewardFunctionError.save_rollouts`` writes one; ``funcprobe.rollouts`` re-exports it."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

__all__ = ["ROLLOUT_KEYS", "save_rollouts"]

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
