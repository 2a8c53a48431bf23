"""δH₁: the first-order predicted entropy change of one AdamW step, as a cross-prompt U-statistic (spec §2–§5).

For units u = 1..U (single prompts, or M equal blocks of prompts) with unit vectors X_u, Y_u (means over the unit's
prompts of X_n and Y_n, spec §2–§3), ΣX = Σ_u X_u, ΣY = Σ_u Y_u, and the step's decomposition
Δθ = η_g P ⊙ Ȳ + Δθ_state (spec §4):

    U_cross    = [ΣX·P·ΣY − Σ_u X_u·P·Y_u] / (U(U−1))
    grad_term  = −η_g · U_cross,     state_term = −X̄·Δθ_state,     deltaH1 = grad_term + state_term
    r_u        = [X_u·P·(ΣY − Y_u) + Y_u·P·(ΣX − X_u)] / (2(U−1))
    ζ̂₁        = (1/(U−1)) Σ_u (r_u − U_cross)²,      se_plugin = sqrt(4 ζ̂₁ / U)
    U_(−u)     = (U·U_cross − 2 r_u) / (U − 2),       se_jack = sqrt((U−1)/U · Σ_u (U_(−u) − mean)²)

How the vectors are formed (all accumulators on the CPU in float64, nothing parameter-sized left on the device):

* X_u and Y_u are gradients of the same map θ ↦ ℓ with cotangents (S − S̄_loo)/G and c = w·(A − βκ) (divided by the
  number of prompts in the unit). For a plain LoRA adapter (``funcprobe.lora_grads``) the units' sequences are cut
  into chunks of ``seq_chunk`` (several units per forward; a prompt may span chunks) and each chunk takes ONE forward
  and ONE backward: forward hooks on the LoRA layers keep each layer's inputs, and the backward's per-position output
  gradients give every sequence's gradient as per-row sums of outer products, which are weighted into every unit's X
  and Y of the chunk (two backwards when c is not constant along a sequence, e.g. with a KL term). A prompt split
  across chunks gets X_n = (1/(G−1)) Σ_g (S_g − S̄) ∇S_g, accumulated with a shift for accuracy. Other adapters
  (DoRA, embedding LoRA, …) take one forward per chunk of a unit and one vjp per cotangent (with ``seq_chunk == 1``,
  one backward per sequence serving both).
* P depends on this batch's v' and hence on Ȳ, which is known only after every unit has been seen: pass 1
  accumulates ΣX, ΣY (and keeps the unit vectors when they fit the memory budget); pass 2, only when they were not
  kept, recomputes each unit's vectors to form the per-unit scalars X_u·P·Y_u, X_u·P·ΣY, Y_u·P·ΣX and X_u·Δθ_state.
  Both modes give the same numbers.

With per-group learning rates (η_g differing between tensors) the gradient term uses X·(η P)·Y, which is what the
step does; U_cross and the seed convention are then reported with the plain P.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from .adam import AdamState, UpdateDecomposition, check_adam_state, update_decomposition
from .objective import Objective, resolve_objective
from .batch import RolloutBatch, as_rollout_batch
from .formatting import fmt
from .lora_grads import tapped_forward, unsupported_reason
from .memory import PeakTracker, available_memory_bytes, parse_memory_size, plan_for_policy
from .policy import Policy
from .progress import progress_bar
from .update import StepCotangent, step_cotangent

__all__ = ["DeltaH1Result", "delta_h1", "unit_partition", "ustatistic_summary"]

ParamsDict = Mapping[str, Tensor]


# ------------------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class DeltaH1Result:
    """Every number of spec §5 for one batch, plus how it was computed. JSON-ready through ``to_dict()``.

    ``step`` is the decomposition Δθ = η_g P⊙Ȳ + Δθ_state of the step whose effect is predicted, with Ȳ = ΣY/U from
    this very pass (not in ``to_dict``): ``rl_step(params, result.step)`` gives θ⁺ and a sweep scales Δθ, with no
    second gradient pass over the batch.

    Standard errors: ``se_plugin`` and ``se_jack`` are of U_cross; ``se_grad_plugin`` and ``se_grad_jack`` of the
    gradient term (η_g times those); ``se_deltaH1`` is the jackknife of the whole estimate (each delete-one value
    combines −η_g U_(−u) with the state term recomputed from X̄_(−u)). ``zeta1_jack`` = U·se_jack²/4, the ζ₁ that the
    jackknife variance implies (Var U_cross ≈ 4ζ₁/U), for comparison with ``zeta1_plugin``.

    What it estimates: the first-order change expected over update batches, E_U[∇H·Δθ(U)] — and only once the
    optimizer state no longer depends on the batch. While AdamW is young the batch's own Ȳ² is a large part of v′
    (about 1/t of it), P depends on the samples the X_u come from, and the cross-unit pairing no longer removes the
    same-sample terms: on an enumerable policy the gradient term was off by 26× the step's first-order change at
    t = 0 and missed 55 % of it at t = 3 (bench/heldout_exact.py; asserted in tests/test_heldout_exact.py). The first-order change of THIS step, unbiased at any optimizer age,
    is ``funcprobe.delta_h1_heldout`` on an evaluation batch (spec §9), the probe's headline.
    """

    deltaH1: float
    grad_term: float
    state_term: float
    deltaH1_plugin: float
    seed_deltaH1: float
    U_cross: float
    bars_dot: float
    diag_sum: float
    eta_g: float | None
    lr: float | None
    clip_coef: float
    n_units: int
    units: str
    row_means: tuple[float, ...]
    zeta1_plugin: float
    se_plugin: float
    zeta1_jack: float
    se_jack: float
    se_grad_plugin: float
    se_grad_jack: float
    se_deltaH1: float
    B: int
    G: int
    stored_unit_vectors: bool
    seq_chunk: int
    token_chunk: int
    forward_passes: int
    backward_passes: int
    sequences_forwarded: int
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory_bytes: int | None = None
    peak_memory_kind: str = ""
    chunk_peak_bytes: tuple[int, ...] = ()
    memory_plan: dict | None = None
    objective: dict | None = None
    step: UpdateDecomposition | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        """A JSON-ready dict of every field; ``notes`` explains values that standard JSON writes as null (the
        results writer turns NaN into null): jackknife SEs need U ≥ 3 units, η_g and the seed convention a learning
        rate shared by every tensor."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "step"}
        data["row_means"] = list(self.row_means)
        data["chunk_peak_bytes"] = list(self.chunk_peak_bytes)
        data["timings"] = dict(self.timings)
        data["memory_plan"] = None if self.memory_plan is None else dict(self.memory_plan)
        data["objective"] = None if self.objective is None else dict(self.objective)
        notes = {}
        if not math.isfinite(self.se_jack):
            notes["se_jack"] = notes["se_deltaH1"] = notes["se_grad_jack"] = (
                f"the jackknife needs at least 3 units; this batch has U={self.n_units}")
        if self.eta_g is None:
            notes["eta_g"] = "per-group learning rates: the gradient term uses X·(ηP)·Y, and η_g is not one number"
        if not math.isfinite(self.seed_deltaH1):
            notes["seed_deltaH1"] = "−lr·U_cross needs one learning rate shared by every tensor"
        data["notes"] = notes
        return data

    def __str__(self) -> str:
        rows = [
            ("deltaH1", self.deltaH1, self.se_deltaH1),
            ("  grad_term", self.grad_term, self.se_grad_jack),
            ("  state_term", self.state_term, None),
            ("deltaH1_plugin", self.deltaH1_plugin, None),
            ("seed_deltaH1 (−lr·U)", self.seed_deltaH1, None),
            ("U_cross", self.U_cross, self.se_jack),
            ("bars_dot X̄·P·Ȳ", self.bars_dot, None),
            ("diag_sum", self.diag_sum, None),
        ]
        lines = [f"δH₁ over {self.n_units} units ({self.units}), B={self.B}, G={self.G}, "
                 f"η_g={_fmt(self.eta_g)}, lr={_fmt(self.lr)}, "
                 + (f"gradient clipped ×{fmt(self.clip_coef, '.3g')}" if self.clip_coef < 1 else "not clipped"),
                 f"{'quantity':<24}{'value':>14}{'jackknife SE':>16}"]
        for name, value, se in rows:
            lines.append(f"{name:<24}{fmt(value, '>14.6g')}{'' if se is None else fmt(se, '>16.4g')}")
        lines.append(f"se_plugin(U)={fmt(self.se_plugin, '.4g')}  ζ̂₁ plug-in={fmt(self.zeta1_plugin, '.4g')}  "
                     f"jackknife={fmt(self.zeta1_jack, '.4g')}")
        lines.append(f"passes: {self.forward_passes} forward, {self.backward_passes} backward; unit vectors "
                     f"{'stored' if self.stored_unit_vectors else 'recomputed'}; "
                     + ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items()))
        return "\n".join(lines)


def _fmt(value) -> str:
    return "per-group" if value is None else fmt(value, ".4g")


# ---------------------------------------------------------------------------------------------------- statistics
def unit_partition(B: int, units: str | int) -> list[Tensor]:
    """Prompt indices of each unit: ``"prompt"`` → B single prompts; an int M → M equal consecutive blocks.

    Blocks must be equal (B divisible by M) so that ΣY/U is the batch's Ȳ and ΣX/U its X̄ exactly.
    """
    if units == "prompt":
        return [torch.tensor([n]) for n in range(B)]
    if isinstance(units, bool) or not isinstance(units, int):
        raise ValueError(f"units must be 'prompt' or a number of blocks M (int); got {units!r}.")
    if units < 2 or units > B:
        raise ValueError(f"units=M must satisfy 2 ≤ M ≤ B = {B} (a U-statistic needs at least 2 units); got {units}.")
    if B % units:
        raise ValueError(f"block mode needs equal blocks: B = {B} is not divisible by M = {units}. Choose M among "
                         f"{[m for m in range(2, B + 1) if B % m == 0]}, or units='prompt'.")
    size = B // units
    return [torch.arange(u * size, (u + 1) * size) for u in range(units)]


@dataclass(frozen=True)
class UStatistic:
    """U_cross of spec §5 with its row means, ζ̂₁, plug-in and jackknife SEs and delete-one values."""

    value: float
    row_means: Tensor
    zeta1_plugin: float
    se_plugin: float
    leave_one_out: Tensor
    se_jack: float


def ustatistic_summary(total: float, diag: Tensor, x_dot_sum_y: Tensor, y_dot_sum_x: Tensor, *,
                       warn: bool = True) -> UStatistic:
    """The cross-unit U-statistic from per-unit bilinear forms (spec §5), float64.

    total = ΣX·P·ΣY; diag[u] = X_u·P·Y_u; x_dot_sum_y[u] = X_u·P·ΣY; y_dot_sum_x[u] = Y_u·P·ΣX (all [U]).
    Below 3 units the jackknife is NaN (with a RuntimeWarning unless ``warn=False``).
    """
    U = diag.numel()
    value = (total - float(diag.sum())) / (U * (U - 1))
    row_means = (x_dot_sum_y - diag + y_dot_sum_x - diag) / (2 * (U - 1))
    zeta1 = float(((row_means - value) ** 2).sum()) / (U - 1)
    se_plugin = math.sqrt(4 * zeta1 / U)
    if U >= 3:
        leave_one_out = (U * value - 2 * row_means) / (U - 2)
        se_jack = _jackknife(leave_one_out)
    else:
        if warn:
            warnings.warn("jackknife standard errors need at least 3 units; reporting NaN. Use more prompts.",
                          RuntimeWarning, stacklevel=3)
        leave_one_out = torch.full((U,), math.nan, dtype=torch.float64)
        se_jack = math.nan
    return UStatistic(value, row_means, zeta1, se_plugin, leave_one_out, se_jack)


@dataclass(frozen=True)
class DeltaH1Terms:
    """δH₁'s terms from the per-unit scalars (spec §5): the ηP-weighted U-statistic ``scaled``, grad_term = −U_cross,
    state_term = −X̄·Δθ_state and the jackknife SE of δH₁ (each delete-one value −U_(−u) − X̄_(−u)·Δθ_state)."""

    scaled: UStatistic
    grad_term: float
    state_term: float
    se_deltaH1: float


def delta_h1_terms(weighted_total: float, weighted: Tensor, state_dots: Tensor, *, warn: bool = True) -> DeltaH1Terms:
    """``weighted_total`` = ΣX·(ηP)·ΣY; ``weighted`` [3, U] = X_u·(ηP)·Y_u, X_u·(ηP)·ΣY, Y_u·(ηP)·ΣX;
    ``state_dots`` [U] = X_u·Δθ_state. NaN SEs below 3 units (warning unless ``warn=False``)."""
    U = state_dots.numel()
    scaled = ustatistic_summary(weighted_total, *weighted, warn=warn)
    state_leave_one_out = -(state_dots.sum() - state_dots) / (U - 1)
    se = _jackknife(-scaled.leave_one_out + state_leave_one_out) if U >= 3 else math.nan
    return DeltaH1Terms(scaled, -scaled.value, -float(state_dots.sum()) / U, se)


def unit_scalars(x_units, y_units, sum_x, sum_y, eta_preconditioner, delta_state) -> tuple[float, Tensor, Tensor]:
    """The per-unit scalars :func:`delta_h1_terms` takes, from kept unit vectors (float64 CPU dicts)."""
    U = len(x_units)
    weighted_sum_x, weighted_sum_y = _weighted(eta_preconditioner, sum_x), _weighted(eta_preconditioner, sum_y)
    weighted = torch.zeros(3, U, dtype=torch.float64)
    state_dots = torch.zeros(U, dtype=torch.float64)
    for u, (x_unit, y_unit) in enumerate(zip(x_units, y_units)):
        weighted[0, u] = _dot(x_unit, _weighted(eta_preconditioner, y_unit))
        weighted[1, u] = _dot(x_unit, weighted_sum_y)
        weighted[2, u] = _dot(y_unit, weighted_sum_x)
        state_dots[u] = _dot(x_unit, delta_state)
    return _dot(sum_x, weighted_sum_y), weighted, state_dots


def _jackknife(values: Tensor) -> float:
    """sqrt((U−1)/U · Σ_u (v_u − mean v)²)."""
    U = values.numel()
    return math.sqrt((U - 1) / U * float(((values - values.mean()) ** 2).sum()))


# ----------------------------------------------------------------------------------------------- vector algebra
def _zeros_like(params: ParamsDict) -> dict[str, Tensor]:
    return {name: torch.zeros(tensor.shape, dtype=torch.float64) for name, tensor in params.items()}


def _add_(total: dict[str, Tensor], grads: Mapping[str, Tensor], scale: float = 1.0) -> None:
    for name, grad in grads.items():
        total[name].add_(grad.to("cpu", torch.float64), alpha=scale)


def _dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    return float(sum(torch.dot(a[name].reshape(-1), b[name].reshape(-1)) for name in a))


def _weighted(weight: Mapping[str, Tensor], vector: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {name: weight[name] * vector[name] for name in vector}


def _cpu64(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {name: tensor.detach().to("cpu", torch.float64) for name, tensor in tensors.items()}


# -------------------------------------------------------------------------------------------- per-unit vectors
@dataclass
class _Counts:
    forward_passes: int = 0
    backward_passes: int = 0
    sequences_forwarded: int = 0


def unit_vectors(policy: Policy, params: ParamsDict, unit_batch: RolloutBatch, cotangent: StepCotangent, *,
                 seq_chunk: int, token_chunk: int,
                 counts: _Counts | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(X_u, Y_u) for the unit made of ``unit_batch``'s m prompts: means over them of X_n and Y_n (spec §2–§3).

    X_n = (1/G) Σ_g (S_g − S̄_{−g}) ∇S_g; Y_n = B Σ_{g,k} c_{n,g,k} ∇ℓ_{n,g,k} with the step's per-token cotangent
    ``cotangent`` (already restricted to the unit's prompts and scaled by B/m, so Y_u = Σ c∇ℓ over the unit).
    float64 CPU dicts shaped like params.
    """
    counts = _Counts() if counts is None else counts
    m, G = unit_batch.B, unit_batch.G
    if _can_tap(policy):
        ((_, x_total, y_total),) = _tapped_units(policy, params, unit_batch, [(0, list(range(m)))], cotangent,
                                                 seq_chunk=seq_chunk, token_chunk=token_chunk, counts=counts)
        return x_total, y_total
    x_total, y_total = _zeros_like(params), _zeros_like(params)
    y_sequence = cotangent.per_sequence()
    if seq_chunk == 1 and y_sequence is not None:
        for n in range(m):
            _per_sequence_prompt(policy, params, unit_batch.select_prompts([n]), y_sequence[n], 1.0 / m,
                                 token_chunk, counts, x_total, y_total)
        return x_total, y_total
    prompts_per_chunk = max(seq_chunk, 1) // G
    if prompts_per_chunk >= 1:
        for prompt_index, chunk_batch in unit_batch.iter_prompt_chunks(prompts_per_chunk):
            chunk_cotangent = cotangent.select_prompts(prompt_index)
            for item in policy.iter_logprob_vjps(params, chunk_batch, seq_chunk=chunk_batch.num_sequences,
                                                 token_chunk=token_chunk):
                counts.forward_passes += 1
                counts.sequences_forwarded += chunk_batch.num_sequences
                logprobs = item.logprobs.cpu().reshape(chunk_batch.B, G)
                x_cotangent = _leave_one_out_centred(logprobs) / (G * m)
                _add_(x_total, item.vjp(x_cotangent.reshape(-1)))
                _add_(y_total, item.token_vjp(chunk_cotangent.for_chunk(item)))
                counts.backward_passes += 2
        return x_total, y_total
    # seq_chunk < G: a prompt's sequences span several chunks, so its S̄_{−g} comes from a no-grad forward first.
    for n in range(m):
        prompt_batch = unit_batch.select_prompts([n])
        prompt_cotangent = cotangent.select_prompts([n])
        logprobs = policy.sequence_logprobs(params, prompt_batch, seq_chunk=seq_chunk, token_chunk=token_chunk)
        counts.forward_passes += -(-G // seq_chunk)
        counts.sequences_forwarded += G
        x_cotangent = (_leave_one_out_centred(logprobs) / (G * m)).reshape(-1)
        for item in policy.iter_logprob_vjps(params, prompt_batch, seq_chunk=seq_chunk, token_chunk=token_chunk):
            counts.forward_passes += 1
            counts.sequences_forwarded += item.chunk.num_sequences
            index = item.chunk.flat_index.cpu()
            _add_(x_total, item.vjp(x_cotangent[index]))
            _add_(y_total, item.token_vjp(prompt_cotangent.for_chunk(item)))
            counts.backward_passes += 2
    return x_total, y_total


def iter_unit_vectors(policy: Policy, params: ParamsDict, batch: RolloutBatch, cotangent: StepCotangent,
                      partition: Sequence[Tensor], units: Sequence[int], *, seq_chunk: int, token_chunk: int,
                      counts: _Counts | None = None) -> Iterator[tuple[dict[str, Tensor], dict[str, Tensor]]]:
    """(X_u, Y_u) of ``units`` (indices into ``partition``, equal units) in order, with Y_u = (B/m) Σ c∇ℓ over the
    unit (spec §3): batched forwards with per-layer taps when the adapter allows (several units per forward, one
    backward per chunk), else :func:`unit_vectors` one unit at a time."""
    counts = _Counts() if counts is None else counts
    if _can_tap(policy):
        scaled = cotangent.scaled(batch.B / len(partition[0]))
        for _, x_unit, y_unit in _tapped_units(policy, params, batch,
                                               [(unit, partition[unit].tolist()) for unit in units], scaled,
                                               seq_chunk=seq_chunk, token_chunk=token_chunk, counts=counts):
            yield x_unit, y_unit
    else:
        for unit in units:
            index = partition[unit]
            yield unit_vectors(policy, params, batch.select_prompts(index),
                               cotangent.select_prompts(index).scaled(batch.B / len(index)), seq_chunk=seq_chunk,
                               token_chunk=token_chunk, counts=counts)


def _per_sequence_prompt(policy: Policy, params: ParamsDict, prompt_batch: RolloutBatch, y_weights: Tensor,
                         unit_scale: float, token_chunk: int, counts: _Counts, x_total: dict[str, Tensor],
                         y_total: dict[str, Tensor]) -> None:
    """Add one prompt's X_n·unit_scale and Y_n (pre-scaled weights) with one backward per sequence.

    X_n = (1/(G−1)) Σ_g (S_g − S̄) ∇S_g, since S_g − S̄_{−g} = G (S_g − S̄)/(G−1). S̄ is known only after the last
    sequence, so Σ_g (S_g − S_ref) ∇S_g and Σ_g ∇S_g are accumulated (S_ref = S of the first sequence, a shift that
    keeps the float64 sums free of the cancellation that |S| ≫ |S − S̄| would cause) and combined at the end.
    """
    G = prompt_batch.G
    shifted_sum, grad_sum = _zeros_like(params), _zeros_like(params)
    logprobs, reference = [], None
    for item in policy.iter_logprob_vjps(params, prompt_batch, seq_chunk=1, token_chunk=token_chunk):
        counts.forward_passes += 1
        counts.sequences_forwarded += 1
        value = float(item.logprobs[0])
        reference = value if reference is None else reference
        logprobs.append(value)
        grad = _cpu64(item.vjp(torch.ones(1, dtype=torch.float64, device=policy.device)))
        counts.backward_passes += 1
        _add_(shifted_sum, grad, value - reference)
        _add_(grad_sum, grad)
        _add_(y_total, grad, float(y_weights[int(item.chunk.sample_index[0])]))
    mean_shift = sum(logprobs) / G - reference
    for name in x_total:
        x_total[name].add_((shifted_sum[name] - mean_shift * grad_sum[name]) * (unit_scale / (G - 1)))


def _can_tap(policy: Policy) -> bool:
    """Whether the per-layer LoRA taps (``funcprobe.lora_grads``) apply: a plain LoRA adapter on Linear layers."""
    return unsupported_reason(policy) is None


class _PromptState:
    """X of a prompt whose G sequences span several chunks: Σ_g (S_g − S_ref)∇S_g and Σ_g ∇S_g (S_ref = S of its first
    sequence, a shift that keeps the float64 sums free of the cancellation |S| ≫ |S − S̄| would cause)."""

    def __init__(self, params: ParamsDict, reference: float):
        self.reference = reference
        self.logprobs: list[float] = []
        self.shifted, self.plain = _zeros_like(params), _zeros_like(params)


def _tapped_units(policy: Policy, params: ParamsDict, batch: RolloutBatch, units: Sequence[tuple[object, Sequence[int]]],
                  cotangent: StepCotangent, *, seq_chunk: int, token_chunk: int,
                  counts: _Counts) -> Iterator[tuple[object, dict[str, Tensor], dict[str, Tensor]]]:
    """(key, X_u, Y_u) for each unit ``(key, prompt indices of batch)``, in order, from batched forwards.

    The units' prompts are concatenated and their sequences cut into chunks of ``seq_chunk`` (a chunk may hold several
    units, a unit may span several chunks). Each chunk costs one forward and one backward (two with a per-token Y
    cotangent, e.g. a KL term): the backward's per-layer LoRA taps (``funcprobe.lora_grads``) separate every unit's X
    and Y in the chunk. ``cotangent`` is the batch's, already scaled so that Y_u = Σ c∇ℓ over the unit's tokens; X_u =
    (1/m_u) Σ_n X_n with X_n = (1/G) Σ_g (S_g − S̄_{−g}) ∇S_g (spec §2). A prompt whole in a chunk gets the weights
    (S_g − S̄_{−g})/(G m_u) directly; one split across chunks is combined at its end from shifted sums (X_n =
    (1/(G−1)) Σ_g (S_g − S̄) ∇S_g). float64 CPU dicts shaped like params.
    """
    G = batch.G
    order = [int(n) for _, prompts in units for n in prompts]
    unit_of = [u for u, (_, prompts) in enumerate(units) for _ in prompts]
    remaining = [len(prompts) for _, prompts in units]
    x_acc: dict[int, dict[str, Tensor]] = {}
    y_acc: dict[int, dict[str, Tensor]] = {}
    split: dict[int, _PromptState] = {}
    sub = batch.select_prompts(order)
    sub_cotangent = cotangent.select_prompts(order)
    y_sequence = sub_cotangent.per_sequence()
    y_rows = None if y_sequence is None else y_sequence.reshape(-1)
    next_unit = 0
    for chunk in sub.iter_sequence_chunks(seq_chunk):
        tapped = tapped_forward(policy, params, chunk, token_chunk)
        counts.forward_passes += 1
        counts.sequences_forwarded += chunk.num_sequences
        rows = chunk.num_sequences
        flat = chunk.flat_index.cpu()
        prompt_of_row = (flat // G).tolist()
        S = tapped.logprobs.to("cpu", torch.float64)
        # One combination row per target: X of each unit (whole prompts), Y of each unit, and for each prompt split
        # across chunks its shifted and plain sums.
        targets: list[tuple[str, int]] = []
        weights: list[Tensor] = []
        index: dict[tuple[str, int], int] = {}

        def target(kind: str, key: int) -> Tensor:
            if (kind, key) not in index:
                index[(kind, key)] = len(targets)
                targets.append((kind, key))
                weights.append(torch.zeros(rows, dtype=torch.float64))
            return weights[index[(kind, key)]]

        finished_prompts = []
        for p in dict.fromkeys(prompt_of_row):
            members = [i for i, q in enumerate(prompt_of_row) if q == p]
            u = unit_of[p]
            scale = 1.0 / (G * len(units[u][1]))
            if len(members) == G and p not in split:
                values = S[members]
                target("x", u)[members] = (values - (values.sum() - values) / (G - 1)) * scale
                finished_prompts.append(p)
            else:
                state = split.setdefault(p, _PromptState(params, float(S[members[0]])))
                target("shifted", p)[members] = S[members] - state.reference
                target("plain", p)[members] = 1.0
                state.logprobs.extend(float(S[i]) for i in members)
                if len(state.logprobs) == G:
                    finished_prompts.append(p)
            if y_rows is not None:
                target("y", u)[members] = y_rows[flat[members]]
        second = y_rows is None
        ones = torch.ones(tapped.token_logprobs.shape[0], dtype=torch.float64)
        results = tapped.backward(ones, torch.stack(weights), retain_graph=second)
        counts.backward_passes += 1
        for (kind, key), grads in zip(targets, results):
            if kind == "x":
                _add_(x_acc.setdefault(key, _zeros_like(params)), grads)
            elif kind == "y":
                _add_(y_acc.setdefault(key, _zeros_like(params)), grads)
            else:
                _add_(getattr(split[key], kind), grads)
        if second:  # a per-token cotangent (KL term, token advantages): Y by a second backward of the same forward
            chunk_units = list(dict.fromkeys(unit_of[p] for p in prompt_of_row))
            membership = torch.tensor([[1.0 if unit_of[p] == u else 0.0 for p in prompt_of_row]
                                       for u in chunk_units], dtype=torch.float64)
            y_results = tapped.backward(sub_cotangent.for_chunk(tapped), membership)
            counts.backward_passes += 1
            for u, grads in zip(chunk_units, y_results):
                _add_(y_acc.setdefault(u, _zeros_like(params)), grads)
        del tapped, results
        for p in finished_prompts:
            u = unit_of[p]
            state = split.pop(p, None)
            if state is not None:
                mean_shift = sum(state.logprobs) / G - state.reference
                x_unit = x_acc.setdefault(u, _zeros_like(params))
                factor = 1.0 / ((G - 1) * len(units[u][1]))
                for name in x_unit:
                    x_unit[name].add_((state.shifted[name] - mean_shift * state.plain[name]) * factor)
            remaining[u] -= 1
        while next_unit < len(units) and remaining[next_unit] == 0:
            yield (units[next_unit][0], x_acc.pop(next_unit, None) or _zeros_like(params),
                   y_acc.pop(next_unit, None) or _zeros_like(params))
            next_unit += 1


def _leave_one_out_centred(logprobs: Tensor) -> Tensor:
    """S_{n,g} − S̄_{n,−g} for float64 [k, G]."""
    G = logprobs.shape[1]
    leave_one_out_mean = (logprobs.sum(1, keepdim=True) - logprobs) / (G - 1)
    return logprobs - leave_one_out_mean


# ------------------------------------------------------------------------------------------------------ δH₁
def delta_h1(params: ParamsDict, batch: RolloutBatch, *, policy: Policy, adam: AdamState,
             objective: Objective | None = None, units: str | int = "prompt", lr: float | None = None,
             seq_chunk: int | None = None, token_chunk: int | None = None,
             store_unit_vectors: str | bool = "auto", memory_budget_bytes: int | None = None,
             memory_budget: int | str | None = None, progress: bool | None = False,
             world=None) -> DeltaH1Result:
    """δH₁ of spec §5 for one AdamW step on ``batch`` from θ = ``params`` with optimizer state ``adam``.

    objective: the step's loss (``funcprobe.Objective``: loss type, KL term, gradient clipping; default Dr. GRPO, no
    KL, no clipping): Y_n = B Σ_{g,k} c∇ℓ with its per-token cotangent c = w·(A − βκ) (spec §3).
    units: "prompt" (exact mode, U = B) or M (block mode, M equal blocks of consecutive prompts).
    lr: overrides the state's learning rate, as for ``adamw_update``.
    seq_chunk: sequences per forward (default the policy's); with a plain LoRA adapter one backward per forward gives
    X and Y of every unit in it, so larger chunks mean fewer, larger passes (memory grows with the chunk).
    store_unit_vectors: keep the 2U unit vectors (float64, CPU) between the passes — "auto" does when they fit in
    ``memory_budget_bytes`` (default: a quarter of the available RAM) — or recompute them in a second pass.
    memory_budget: bytes, or a size like "2GB" / "16GiB" (``parse_memory_size``). When given, the chunk sizes left
    at None and ``store_unit_vectors="auto"`` are taken from ``plan_for_policy`` for this batch's shape (B, G, the
    longest prompt, the longest response); a budget that even the smallest setting exceeds raises the planner's
    ValueError before any work is done. The plan is returned as ``memory_plan``.
    Memory: ``chunk_peak_bytes`` holds the peak (``PeakTracker``: CUDA ``max_memory_allocated``, or the process's
    VmHWM on the CPU) of each unit's vectors in pass 1, then in pass 2 when they are recomputed;
    ``peak_memory_bytes`` is their maximum together with the peak of the rest of the call (the step, pass 2 on
    stored vectors), ``peak_memory_kind`` the tracker's kind.
    Pure: params, batch, policy and state are untouched.

    world: a ``funcprobe.distributed.World`` (issue 6). Every rank passes the whole batch and computes only its
    contiguous shard of units (``shard_prompts(U, rank, size)``; a block never straddles ranks); ΣX, ΣY are
    all-reduced in float64, P, η_g and Δθ_state come from the global Ȳ (identical on every rank), and the 7 per-unit
    scalars are computed locally against the global sums and all-gathered (U·7 float64 — no unit vector is sent).
    Every estimate field then equals the single-process one up to float64 rounding of the sums; ``timings``,
    ``peak_memory_*``, ``chunk_peak_bytes`` and the pass counts (``forward_passes``, ``backward_passes``,
    ``sequences_forwarded``) are this rank's own. ``store_unit_vectors="auto"`` budgets for this rank's units.
    """
    from .distributed import SINGLE, all_reduce_sum_, gather_rows, shard_counts

    world = SINGLE if world is None else world
    batch = as_rollout_batch(batch, "delta_h1: batch")
    adam = check_adam_state(adam, "delta_h1")
    objective = resolve_objective(objective, batch, "delta_h1")
    _require_policy(policy, "delta_h1")
    started = time.perf_counter()
    policy.check_params(params)
    batch.require_prompts(2, "δH₁ (a cross-prompt U-statistic)")
    partition = unit_partition(batch.B, units)
    memory_plan = None
    if memory_budget is not None:
        plan = plan_for_policy(policy, _batch_shape(batch), budget_bytes=parse_memory_size(memory_budget),
                               units=units)
        memory_plan = plan.to_dict()
        seq_chunk = plan.seq_chunk if seq_chunk is None else seq_chunk
        token_chunk = plan.token_chunk if token_chunk is None else token_chunk
        if store_unit_vectors == "auto":
            store_unit_vectors = plan.store_unit_vectors
    seq_chunk = policy.seq_chunk if seq_chunk is None else seq_chunk
    token_chunk = policy.token_chunk if token_chunk is None else token_chunk
    for name, value in (("seq_chunk", seq_chunk), ("token_chunk", token_chunk)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}.")
    missing = [name for name in params if name not in adam.exp_avg]
    if missing or len(adam.exp_avg) != len(params):
        raise ValueError(f"the optimizer state does not match the params: it lacks {missing[:3]} and holds "
                         f"{len(adam.exp_avg)} tensors for {len(params)} params. Load the state saved with this "
                         "adapter (load_adam_state(path, policy.params)).")
    U = len(partition)
    unit_counts = shard_counts(U, world.size)
    my_units = world.shard(U)
    store = _decide_store(store_unit_vectors, len(my_units), params, memory_budget_bytes)
    counts = _Counts()
    tracker = PeakTracker(policy.device)
    tracker.reset()
    laps: list[int] = []  # peak memory of each unit's vectors (pass 1, then pass 2 when recomputed)
    timings = {}

    # The step's per-token cotangent for this rank's prompts (with β > 0: one no-grad reference forward of them).
    my_prompts = [int(n) for unit in my_units for n in partition[unit]]
    phase = time.perf_counter()
    cotangent = step_cotangent(params, batch, policy=policy, objective=objective,
                               prompts=my_prompts if world.distributed else None, seq_chunk=seq_chunk,
                               token_chunk=token_chunk)
    if objective.needs_reference:
        timings["reference_s"] = time.perf_counter() - phase
        counts.forward_passes += -(-len(my_prompts) * batch.G // seq_chunk)

    def unit_stream():
        return iter_unit_vectors(policy, params, batch, cotangent, partition, my_units, seq_chunk=seq_chunk,
                                 token_chunk=token_chunk, counts=counts)

    # Pass 1: ΣX, ΣY (and the unit vectors when kept).
    sum_x, sum_y, kept = _zeros_like(params), _zeros_like(params), []
    for x_unit, y_unit in progress_bar(unit_stream(), total=len(my_units), desc="δH₁ pass 1", enabled=progress):
        _add_(sum_x, x_unit)
        _add_(sum_y, y_unit)
        laps.append(tracker.lap())
        if store:
            kept.append((x_unit, y_unit))
    all_reduce_sum_(world, {**{("x", n): t for n, t in sum_x.items()}, **{("y", n): t for n, t in sum_y.items()}},
                    "δH₁ all_reduce of ΣX, ΣY")
    timings["pass1_s"] = time.perf_counter() - started

    # The step: Ȳ = ΣY/U (equal units), P at this batch's v', η_g, Δθ_state.
    ybar = {name: value / U for name, value in sum_y.items()}
    decomposition = update_decomposition(params, ybar, adam, lr=lr, max_grad_norm=objective.max_grad_norm)
    preconditioner = _cpu64(decomposition.preconditioner)
    eta_preconditioner = _cpu64(decomposition.eta_preconditioner())
    delta_state = _cpu64(decomposition.delta_state)
    weights = {"plain": preconditioner, "eta": eta_preconditioner}
    weighted_sum_x = {key: _weighted(w, sum_x) for key, w in weights.items()}
    weighted_sum_y = {key: _weighted(w, sum_y) for key, w in weights.items()}

    # Pass 2: per-unit scalars, from the kept vectors or recomputed ones.
    phase = time.perf_counter()
    local = len(my_units)
    scalars = {key: torch.zeros(3, local, dtype=torch.float64) for key in weights}
    state_dots = torch.zeros(local, dtype=torch.float64)

    def recomputed():
        for vectors in unit_stream():
            laps.append(tracker.lap())
            yield vectors

    source = kept if store else recomputed()
    for unit, (x_unit, y_unit) in enumerate(progress_bar(source, total=local, desc="δH₁ pass 2",
                                                       enabled=progress and not store)):
        for key, weight in weights.items():
            scalars[key][0, unit] = _dot(x_unit, _weighted(weight, y_unit))
            scalars[key][1, unit] = _dot(x_unit, weighted_sum_y[key])
            scalars[key][2, unit] = _dot(y_unit, weighted_sum_x[key])
        state_dots[unit] = _dot(x_unit, delta_state)
    if world.distributed:  # the 7 per-unit scalars of every rank, in global unit order: [U, 7]
        rows = torch.cat([scalars["plain"].T, scalars["eta"].T, state_dots[:, None]], dim=1)
        rows = gather_rows(world, rows, unit_counts, "δH₁ all_gather of the per-unit scalars")
        scalars = {"plain": rows[:, 0:3].T.contiguous(), "eta": rows[:, 3:6].T.contiguous()}
        state_dots = rows[:, 6].contiguous()
    timings["pass2_s"] = time.perf_counter() - phase

    plain = ustatistic_summary(_dot(sum_x, weighted_sum_y["plain"]), *scalars["plain"])
    terms = delta_h1_terms(_dot(sum_x, weighted_sum_y["eta"]), scalars["eta"], state_dots)
    grad_term, state_term, se_delta = terms.grad_term, terms.state_term, terms.se_deltaH1
    delta = grad_term + state_term
    bars_dot = _dot(sum_x, weighted_sum_y["plain"]) / U ** 2
    plugin_grad = -_dot(sum_x, weighted_sum_y["eta"]) / U ** 2
    eta_g, lr_used = _uniform_or_none(decomposition, "eta_g"), _uniform_or_none(decomposition, "lr")
    se_scale = abs(eta_g) if eta_g is not None else math.nan
    peak = max(laps + [tracker.read()])
    timings["total_s"] = time.perf_counter() - started
    return DeltaH1Result(
        deltaH1=delta, grad_term=grad_term, state_term=state_term, deltaH1_plugin=plugin_grad + state_term,
        seed_deltaH1=-(lr_used if lr_used is not None else math.nan) * plain.value, U_cross=plain.value,
        bars_dot=bars_dot, diag_sum=float(scalars["plain"][0].sum()), eta_g=eta_g, lr=lr_used,
        clip_coef=decomposition.clip_coef, n_units=U, units="prompt" if units == "prompt" else f"blocks:{units}",
        row_means=tuple(float(r) for r in plain.row_means), zeta1_plugin=plain.zeta1_plugin,
        se_plugin=plain.se_plugin, zeta1_jack=U * plain.se_jack ** 2 / 4, se_jack=plain.se_jack,
        se_grad_plugin=se_scale * plain.se_plugin, se_grad_jack=se_scale * plain.se_jack, se_deltaH1=se_delta,
        B=batch.B, G=batch.G, stored_unit_vectors=store, seq_chunk=seq_chunk, token_chunk=token_chunk,
        forward_passes=counts.forward_passes, backward_passes=counts.backward_passes,
        sequences_forwarded=counts.sequences_forwarded, timings=timings, peak_memory_bytes=peak,
        peak_memory_kind=tracker.kind, chunk_peak_bytes=tuple(laps), memory_plan=memory_plan,
        objective=objective.to_dict(), step=decomposition)


def _require_policy(policy, what: str) -> None:
    if not isinstance(policy, Policy):
        raise ValueError(f"{what} needs policy=funcprobe.Policy(...) (load_policy(base, adapter) or "
                         f"load_checkpoint(path).policy); got {type(policy).__name__}.")


def _batch_shape(batch: RolloutBatch) -> tuple[int, int, int, int]:
    """(B, G, longest prompt, longest response) from the batch's masks, for the memory planner."""
    response = batch.response_mask.to(torch.bool)
    prompt = batch.attention_mask.to(torch.bool) & ~response
    return (batch.B, batch.G, max(1, int(prompt.sum(-1).max())), max(1, int(response.sum(-1).max())))


def _uniform_or_none(decomposition, attribute: str) -> float | None:
    try:
        return float(getattr(decomposition, attribute))
    except ValueError:
        return None


def _decide_store(store_unit_vectors: str | bool, U: int, params: ParamsDict, budget: int | None) -> bool:
    if store_unit_vectors in (True, False):
        return bool(store_unit_vectors)
    if store_unit_vectors != "auto":
        raise ValueError(f"store_unit_vectors must be 'auto', True or False; got {store_unit_vectors!r}.")
    needed = 2 * U * sum(t.numel() for t in params.values()) * 8
    if budget is None:
        budget = available_memory_bytes() // 4
    return needed <= budget
