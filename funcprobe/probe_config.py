"""What one probe run is asked to do, fully resolved: :class:`ProbeConfig` and its parts.

The command line builds one from argv (``cli.probe_config_from_args``: the trainer config read, every default settled,
every flag checked); the real-model demo builds one in code. ``funcprobe.pipeline`` runs it and never changes it:
what loading settles (the learning rate's source, B and G read from a rollouts file) comes back in its return values.

Also here, because both the command line and the demo resolve with them: the seeds of the prompt draws
(:func:`derive_seed`, :func:`select_prompts`, :func:`draw_eval_prompts`) and :func:`settle_sizes` (B, G, the
generation budget and τ: a flag, else the run's trainer config, else funcprobe's defaults).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .objective import Objective
from .trainer_config import TrainerSettings

__all__ = ["ProbeConfig", "BatchConfig", "StepConfig", "EstimateConfig", "ComputeConfig", "OutputConfig",
           "settle_sizes", "derive_seed", "select_prompts", "draw_eval_prompts", "SIZE_DEFAULTS"]

#: funcprobe's own defaults of the sizes, when neither a flag nor the trainer config gives them.
SIZE_DEFAULTS = (("B", 16), ("G", 8), ("max_new_tokens", 100), ("temperature", None))


@dataclass(frozen=True)
class BatchConfig:
    """The update batch U and the evaluation batch E (spec §6: E drawn independently of U).

    U: ``B`` prompts of the pool ``prompts`` (None: the checkpoint's prompts.jsonl) chosen by ``seed`` (``replace``:
    with replacement), ``G`` responses each of at most ``max_new_tokens`` tokens at temperature ``temperature`` (None:
    the policy's, 1), or read from the trainer's logged ``rollouts`` file. E: ``eval_B`` prompts drawn i.i.d. from
    the pool × ``eval_G`` responses, seeded by ``eval_seed`` (≠ ``seed``). ``rewards``: the reward specs (None: the
    built-in "answer", or the rollouts file's own rewards); ``chat_template``: auto|on|off; ``stop_token``: extra
    stop ids; ``top_p`` must be 1.
    """

    B: int
    G: int
    eval_B: int
    eval_G: int
    seed: int
    eval_seed: int
    max_new_tokens: int = 100
    prompts: str | None = None
    rollouts: str | None = None
    rewards: tuple[str, ...] | None = None
    chat_template: str = "auto"
    temperature: float | None = None
    replace: bool = False
    top_p: float = 1.0
    stop_token: tuple[int, ...] | None = None


@dataclass(frozen=True)
class StepConfig:
    """The AdamW step probed (spec §4): its loss (``objective``), learning rate (None: the optimizer state's), the
    δH₁ units ("prompt" or M blocks), and the trainer settings they were read from (None: flags and defaults only)."""

    objective: Objective = Objective()
    lr: float | None = None
    units: str | int = "prompt"
    trainer_settings: TrainerSettings | None = None


@dataclass(frozen=True)
class EstimateConfig:
    """What is measured on the evaluation batch E: the first-order change of the step δĤ₁(E) with ``integrand``
    ("rao_blackwell" or "sequence", spec §9), the realised change by ``realised`` ("snis", "crn" or "both"), the
    biased in-sample diagnostic on U (``in_sample``), and the learning-rate sweep at ``etas`` (None: no sweep)."""

    realised: str = "snis"
    in_sample: bool = False
    etas: tuple[float, ...] | None = None
    integrand: str = "rao_blackwell"


@dataclass(frozen=True)
class ComputeConfig:
    """Where and how: device, model dtype ("float32", "bfloat16", "float64"), the log-softmax dtype (None: the
    policy's choice), the chunk sizes (None: the policy's, or the memory plan's), the memory budget in bytes."""

    device: str = "cpu"
    dtype: str = "float32"
    logsoftmax_dtype: str | None = None
    seq_chunk: int | None = None
    token_chunk: int | None = None
    memory_budget_bytes: int | None = None


@dataclass(frozen=True)
class OutputConfig:
    """Where the caller writes the results JSON (``out``) and the sweep's plot (``plot``); ``verbose``: the full
    tables. ``out`` also names the file a failing reward function's batch is saved to."""

    out: str | None = None
    plot: str | None = None
    verbose: bool = False


@dataclass(frozen=True)
class ProbeConfig:
    """One probe run: the checkpoint (with ``base``/``optimizer`` when it does not name them) and its parts.

    ``sources``: where each resolved setting came from ("flag", the trainer config's file, "funcprobe default", …).
    ``record``: the options as the caller gave them (the command line's, for the results' ``config`` section), or
    None for a config built in code (the section is then :meth:`to_dict`).
    """

    checkpoint: str
    batch: BatchConfig
    step: StepConfig = StepConfig()
    estimate: EstimateConfig = EstimateConfig()
    compute: ComputeConfig = ComputeConfig()
    output: OutputConfig = OutputConfig()
    base: str | None = None
    optimizer: str | None = None
    sources: Mapping[str, str] = field(default_factory=dict)
    record: Mapping[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The settings flat, by the command line's names where there is one (``etas``, ``units_parsed``)."""
        flat: dict[str, Any] = {"command": "probe", "checkpoint": self.checkpoint}
        for part in (self.batch, self.step, self.estimate, self.compute, self.output):
            flat.update({f.name: getattr(part, f.name) for f in fields(part)})
        flat.update(reward=None if self.batch.rewards is None else list(self.batch.rewards), base=self.base,
                    optimizer=self.optimizer, objective=asdict(self.step.objective), units_parsed=self.step.units)
        del flat["rewards"]
        return flat


def settle_sizes(settings: TrainerSettings | None, **flags: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """B, G, max_new_tokens and temperature: the flag (when not None), else the run's config (``settings``), else
    :data:`SIZE_DEFAULTS`; and the sources — the trainer config's own, with "flag" or "funcprobe default" where those
    decided."""
    sources = {} if settings is None else dict(settings.sources)
    values = {}
    for name, default in SIZE_DEFAULTS:
        if flags.get(name) is not None:
            values[name], sources[name] = flags[name], "flag"
            continue
        from_config = None if settings is None else getattr(settings, name)
        values[name] = from_config if from_config is not None else default
        if from_config is None:
            sources[name] = "funcprobe default"
    return values, sources


def derive_seed(seed: int, purpose: str) -> int:
    """A seed for ``purpose`` derived from ``seed`` by hashing (independent of it, reproducible from it)."""
    digest = hashlib.blake2b(f"funcprobe.{purpose}:{int(seed)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2 ** 31 - 1)


def select_prompts(pool_size: int, B: int, *, seed: int, replace: bool = False) -> list[int]:
    """Indices of the B prompts to probe, reproducible from ``seed``.

    Without ``replace``: the first B indices of ``range(pool_size)`` after ``random.Random(seed).shuffle`` (B must
    not exceed ``pool_size``). With ``replace``: ``random.Random(seed).choices(range(pool_size), k=B)``.
    """
    rng = random.Random(seed)
    if replace:
        return rng.choices(range(pool_size), k=B)
    if B > pool_size:
        raise ValueError(f"-B {B} asks for more prompts than the {pool_size} available; pass --replace to draw "
                         "prompts with replacement, or lower -B.")
    order = list(range(pool_size))
    rng.shuffle(order)
    return order[:B]


def draw_eval_prompts(pool_size: int, B: int, *, seed: int) -> list[int]:
    """Indices of the evaluation batch's B prompts: ``random.Random(seed).choices(range(pool_size), k=B)`` — i.i.d.
    uniform draws from the pool, with replacement (spec §6: independent of the update batch's prompts, and the i.i.d.
    draws the SE over prompts assumes)."""
    if pool_size < 1:
        raise ValueError("the prompt pool is empty.")
    return random.Random(seed).choices(range(pool_size), k=B)
