"""The log-probabilities a sampler recorded against the teacher-forced S (spec §6): a check only, never an input.

The estimators take S(θ) and S(θ⁺) from one teacher-forced path (the package docstring, "One S path");
:func:`check_recorded_logprobs` reports how far ``batch.logprobs`` is from it and warns
(:class:`LogprobMismatchWarning`) above the rounding bound.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from ..batch import RolloutBatch

__all__ = ["RECORDED_LOGPROB_TOLERANCE", "LogprobMismatchWarning", "LogprobCheck", "check_recorded_logprobs"]

#: The recorded-vs-teacher-forced check warns when |S_recorded − S| > this · √layers · eps(model dtype) · (T + |S|)
#: for a sequence of T tokens: two paths that each round at the model's precision differ by a few eps per operation
#: on every token, accumulated over the decoder's layers like a random walk. Measured, float32 KV cache against
#: teacher forcing: 0.1–0.5 of the bound on the 1–2-layer test models; up to 8.7·eps·(T + |S|), i.e. 0.2 of the
#: bound, on SmolLM2-135M (30 layers; `make demo`'s batches). A different π (template, τ, tokenisation, model) moves
#: S by tenths of a nat per token, far above it.
RECORDED_LOGPROB_TOLERANCE = 8.0


class LogprobMismatchWarning(UserWarning):
    """The log-probabilities recorded while sampling differ from the teacher-forced ones by more than rounding."""


@dataclass(frozen=True)
class LogprobCheck:
    """The sampler's recorded S against the teacher-forced S on the same tokens (spec §6): a check only.

    ``max_abs_diff``: the largest |S_recorded − S| (nats; None when the batch records none); ``worst``: its
    (prompt n, sample g); ``threshold``: the bound there, RECORDED_LOGPROB_TOLERANCE · eps(dtype) · (T + |S|);
    ``exceeded``: how many sequences are above their bound; ``ok``: none is; ``dtype``: the model's dtype.
    """

    max_abs_diff: float | None
    worst: tuple[int, int] | None
    threshold: float | None
    exceeded: int
    ok: bool
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)



def check_recorded_logprobs(batch: RolloutBatch, S: Tensor, *, dtype: torch.dtype, layers: int = 1,
                            warn: bool = True) -> LogprobCheck:
    """Compare ``batch.logprobs`` (recorded while sampling) with the teacher-forced ``S`` [B, G] (spec §6).

    Per sequence the bound is ``RECORDED_LOGPROB_TOLERANCE`` · √``layers`` · eps(``dtype``) · (T + |S|): the two paths
    round at the model's precision a few times per token (T) and layer, and relative to the size of S. Above it (any sequence), a
    :class:`LogprobMismatchWarning` names the worst sequence: the sampler and the teacher-forced path did not compute
    the same π (a different model, template, τ or tokenisation) — the estimates use the teacher-forced S regardless.
    """
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise ValueError(f"layers must be a positive integer (the model's decoder layers); got {layers!r}.")
    name = str(dtype).replace("torch.", "")
    if batch.logprobs is None:
        return LogprobCheck(None, None, None, 0, True, name)
    recorded = batch.logprobs.to("cpu", torch.float64)
    S = S.to("cpu", torch.float64)
    difference = (recorded - S).abs()
    scale = RECORDED_LOGPROB_TOLERANCE * math.sqrt(layers) * torch.finfo(dtype).eps
    bound = scale * (batch.response_lengths.to(torch.float64) + S.abs())
    worst = tuple(int(i) for i in divmod(int(difference.argmax()), batch.G))
    over = difference > bound
    check = LogprobCheck(max_abs_diff=float(difference.max()), worst=worst, threshold=float(bound[worst]),
                         exceeded=int(over.sum()), ok=not bool(over.any()), dtype=name)
    if warn and not check.ok:
        warnings.warn(
            f"the log-probabilities recorded while sampling differ from the teacher-forced ones by up to "
            f"{check.max_abs_diff:.3g} nats (sequence {worst}; bound {check.threshold:.3g} for {name} rounding; "
            f"{check.exceeded} of {batch.num_sequences} sequences above their bound): the sampler did not compute the "
            "same π as the estimators (another model, chat template, τ or tokenisation?). The estimates use the "
            "teacher-forced S only.", LogprobMismatchWarning, stacklevel=3)
    return check

