"""Ĥ(θ) itself on a batch drawn from π_θ (spec §2, §6): −(1/(BG)) Σ S, Rao-Blackwell or per token, with its SE.

S is the teacher-forced one (spec §6), as for the estimators of the change. (The module is not called ``entropy``
so that it does not shadow the function :func:`entropy` that the package re-exports.)
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..batch import RolloutBatch
from ..formatting import fmt as _fmt
from ..policy import Policy
from ._common import (ParamsDict, _check_batch, _check_values, _chunks, _Clock, _prompt_ratio, _require_policy, _se,
                      _tuple)
from .importance import check_snis_options

__all__ = ["EntropyResult", "entropy"]


@dataclass(frozen=True)
class EntropyResult:
    """Ĥ(θ) = −(1/(BG)) Σ S (or the Rao-Blackwell / per-token version) with SE = sd_n(Ĥ_n)/sqrt(B) (spec §2, §6)."""

    H: float
    se: float
    H_per_prompt: tuple[float, ...]
    estimator: str
    per_token: bool
    B: int
    G: int
    forward_passes: int
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["H_per_prompt"] = list(self.H_per_prompt)
        return data

    def __str__(self) -> str:
        unit = "nats/token" if self.per_token else "nats/sequence"
        return (f"Ĥ(θ) = {_fmt(self.H)} ± {_fmt(self.se, '.3g')} {unit} (estimator={self.estimator}, B={self.B}, "
                f"G={self.G}, {self.forward_passes} forward passes)")



def entropy(params: ParamsDict, batch: RolloutBatch, *, policy: Policy, estimator: str = "sequence",
            per_token: bool = False, seq_chunk: int | None = None, token_chunk: int | None = None,
            progress: bool | None = False) -> EntropyResult:
    """Ĥ(θ) on a batch drawn from π_θ: −(1/(BG)) Σ S (spec §2), or Rao-Blackwell, or per token; SE over prompts.

    Per prompt Ĥ_n = (1/G) Σ_g f_{n,g} (f = −S, or Σ_k H(π_θ(·|t_<k)) for ``estimator="rao_blackwell"``), or
    Σ_g f / Σ_g T with ``per_token``; Ĥ = mean_n Ĥ_n, SE = sd_n(Ĥ_n)/sqrt(B) (NaN for B < 2). S is always the
    teacher-forced one (spec §6); the batch's recorded log-probabilities are not used.
    """
    check_snis_options("prompt", estimator, per_token, None)
    batch = _check_batch(batch, "entropy")
    _require_policy(policy, "entropy", "S(θ) or the next-token entropies")
    policy.check_params(params, "params")
    clock = _Clock()
    started = time.perf_counter()
    chunks = _chunks(seq_chunk, token_chunk, progress)
    if estimator == "rao_blackwell":
        values = clock.run("entropies", lambda: policy.token_entropies(params, batch, **chunks))
    else:
        values = -clock.run("logprobs", lambda: policy.sequence_logprobs(params, batch, **chunks))
    _check_values("the integrand (−S or the summed entropies)", values)
    ones = torch.ones_like(values)
    lengths = None
    if per_token:
        lengths = batch.response_lengths.to("cpu", torch.float64)
        empty = lengths.sum(dim=1) <= 0
        if bool(empty.any()):
            raise ValueError(f"per_token=True: prompt(s) {empty.nonzero().flatten().tolist()} have no response "
                             "tokens; their entropy per token is undefined. Use per_token=False.")
    per_prompt = _prompt_ratio(ones, values, lengths)
    timings = dict(clock.timings)
    timings["total"] = time.perf_counter() - started
    return EntropyResult(H=float(per_prompt.mean()), se=_se(per_prompt), H_per_prompt=_tuple(per_prompt),
                         estimator=estimator, per_token=per_token, B=batch.B, G=batch.G,
                         forward_passes=clock.forward_passes, timings=timings)
