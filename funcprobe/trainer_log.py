"""A training run's ``log_history`` (``trainer_state.json``), read for what it says about the entropy: TRL's
``entropy`` and the ``entropy_change/*`` values of funcprobe's TRL callback (``funcprobe.trl``).

Which parameters a row describes (TRL 1.16 ``GRPOTrainer``, one generation per optimizer step): TRL computes
``entropy`` in step s's loss, on step s's own rollouts, drawn at θ_{s−1} — before step s — and logs it in row s
(nats per token: the masked mean over completion tokens of the entropy of logits/τ). So the row that describes the
parameters θ_N saved in ``checkpoint-N`` is row N + 1 (:meth:`TrainerLog.entropy_at`). The callback's row s holds the
change of step s − 1 measured on step s's rollouts; its ``first_step`` / ``last_step`` say which steps
(:meth:`TrainerLog.callback_rows`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoints import read_trainer_state

__all__ = ["CALLBACK_PREFIX", "TrainerLog"]

#: The prefix of the keys funcprobe's TRL callback logs (``funcprobe.trl.PREFIX``; not imported from there, which
#: needs transformers' Trainer classes, only to read a log).
CALLBACK_PREFIX = "entropy_change/"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _entropy_keys(row: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in row.items() if key == "entropy" or key.startswith(CALLBACK_PREFIX)}


@dataclass(frozen=True)
class TrainerLog:
    """``rows``: {step: the log's row(s) of that step, merged}; ``source``: the trainer_state.json read (None: the
    run has no log)."""

    rows: Mapping[int, dict] = field(default_factory=dict)
    source: str | None = None

    @classmethod
    def read(cls, folders: Sequence[Path]) -> "TrainerLog":
        """The log of the latest of ``folders`` (checkpoint folders in step order) whose trainer_state.json has a
        ``log_history``: the last checkpoint's holds the whole history."""
        for folder in reversed(list(folders)):
            state = read_trainer_state(folder)
            history = state.get("log_history") if isinstance(state, dict) else None
            if isinstance(history, list) and history:
                rows: dict[int, dict] = {}
                for row in history:
                    step = row.get("step") if isinstance(row, dict) else None
                    if _number(step):
                        rows.setdefault(int(step), {}).update(row)
                return cls(rows=rows, source=os.fspath(Path(folder) / "trainer_state.json"))
        return cls()

    def entropy_at(self, step: int) -> tuple[float | None, str | None]:
        """(TRL's entropy of the rollouts drawn at θ_step — row step + 1's —, None), or (None, why there is none)."""
        if not self.rows:
            return None, "no trainer_state.json with a log_history in the run's checkpoints"
        value = self.rows.get(step + 1, {}).get("entropy")
        if _number(value) and math.isfinite(value):
            return float(value), None
        return None, (f"the log has no entropy at step {step + 1}, the row whose rollouts were drawn at this "
                      "checkpoint's θ (the run's last step, logging_steps > 1, or a trainer that does not log it)")

    def logged(self, step: int) -> dict[str, Any]:
        """Row ``step`` as logged: its ``entropy`` and ``entropy_change/*`` values (with ``step``)."""
        return {"step": step, **_entropy_keys(self.rows.get(step, {}))}

    def callback_rows(self, start: int, end: int) -> list[dict]:
        """The callback's rows whose measured steps (``first_step`` … ``last_step``; step s − 1 for row s when they
        are not logged) lie within start < step ≤ end, each with its ``row``."""
        found = []
        for step in sorted(self.rows):
            row = self.rows[step]
            if CALLBACK_PREFIX + "realised" not in row:
                continue
            first = row.get(CALLBACK_PREFIX + "first_step", step - 1)
            last = row.get(CALLBACK_PREFIX + "last_step", step - 1)
            if _number(first) and _number(last) and start < first and last <= end:
                found.append({"row": step, **_entropy_keys(row)})
        return found

    def series(self) -> dict[str, Any]:
        """{"source": the file, key: [[step, value], …]} for ``entropy`` and every numeric ``entropy_change/*``."""
        series: dict[str, Any] = {"source": self.source}
        for step in sorted(self.rows):
            for key, value in _entropy_keys(self.rows[step]).items():
                if value is None or _number(value):
                    series.setdefault(key, []).append([step, value])
        return series
