"""Attribution of δH₁'s gradient term to the update batch's tokens (spec §8, built on §3–§5).

For units w = 1..U (single prompts, or M equal blocks of m = B/M prompts) with unit vectors X_w, Y_w
(``funcprobe.delta_h1.iter_unit_vectors``), ΣX = Σ_w X_w, and the step's decomposition Δθ = η_g P ⊙ Ȳ + Δθ_state:

    grad_term = −η_g/(U(U−1)) Σ_w (ΣX − X_w)·P·Y_w,      Y_w = (B/m) Σ_{n∈w} Σ_{g,k} c_{n,g,k} ∇ℓ_{n,g,k}

so with d_w = (η_g P) ⊙ (ΣX − X_w) (per-group learning rates: the per-tensor η_g,n P_n) the gradient term is a sum
over tokens,

    a_{n,g,k} = −(B/m) / (U(U−1)) · c_{n,g,k} · d_w·∇ℓ_{n,g,k}      (n in unit w),      Σ a = grad_term.

For prompt units m = 1 and B/m = B (spec §8's "B c"); for blocks B/m = U. d_w·∇ℓ for all tokens of a sequence
chunk at once is one forward-mode derivative of the per-token log-probs: memory of one forward, no per-token gradient
is ever formed. The state term −X̄·Δθ_state belongs to no token.

Passes: (1) the unit vectors (X_w kept, float64 CPU: U parameter-sized vectors) and ΣY → P, η_g, Δθ_state;
(2) one forward-mode pass per ``seq_chunk`` sequences of the batch, each row along its own unit's d_w
(``lora_grads.row_direction_jvp``: per-layer LoRA tangents), which also yields ℓ and the next-token entropies.
Adapters the taps do not cover (``lora_grads.unsupported_reason``) take one ``Policy.token_logprob_jvp`` per sequence
chunk of each unit instead. Cost on SmolLM2-135M: ≈ 2.6× a ``delta_h1`` (bench/RESULTS.md).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from .adam import AdamState, update_decomposition
from .batch import RolloutBatch, as_rollout_batch
from .delta_h1 import (_cpu64, _dot, _uniform_or_none, _zeros_like, delta_h1_terms, iter_unit_vectors, unit_partition,
                       unit_scalars)
from .lora_grads import row_direction_jvp, unsupported_reason
from .objective import Objective, resolve_objective
from .policy import ChunkLogprobs, Policy
from .progress import progress_bar
from .update import StepCotangent, step_cotangent

__all__ = ["AttributionResult", "attribute", "token_covariance", "pearson", "spearman", "average_ranks",
           "top_fraction", "jaccard", "proxy_summary", "intervention_mask", "masked_cotangent"]

ParamsDict = Mapping[str, Tensor]
DEFAULT_QUANTILES = (0.002, 0.02, 0.2)


def _nested(tensor: Tensor) -> list:
    return tensor.tolist()


# ------------------------------------------------------------------------------------------------ result
@dataclass(frozen=True)
class AttributionResult:
    """Token attributions of δH₁'s gradient term (spec §8) and the per-token proxies beside them.

    Tensors (float64, CPU; 0 off the response):
      * ``token`` a [B, G, L]; ``sequence`` [B, G] and ``prompt`` [B] its sums; Σ a = ``grad_term``;
      * ``logprobs`` ℓ [B, G, L]; ``covariance`` Cui et al.'s cov [B, G, L]; ``entropy`` H(π(·|t_<k)) [B, G, L];
      * ``cotangent`` the step's c [B, G, L] (spec §3).
    Scalars: ``grad_term``, ``state_term``, ``deltaH1`` = grad_term + state_term (nats per step), ``objective_gain``
    = Ȳ·Δθ, the step's first-order change of its own surrogate objective (the interventions' baseline);
    ``realised_delta_h`` ± ``realised_se``: the unchanged step's ΔĤ on the evaluation batch (None without one); ``eta_g``
    (None with per-group learning rates), ``n_units``, ``units``. ``summary``: correlations and top-q overlaps
    (:func:`proxy_summary`). ``interventions``: name → dict (see :func:`attribute`). ``step``: the decomposition of
    the original step (not in ``to_dict``).
    """

    token: Tensor
    sequence: Tensor
    prompt: Tensor
    grad_term: float
    state_term: float
    deltaH1: float
    eta_g: float | None
    n_units: int
    units: str
    B: int
    G: int
    logprobs: Tensor
    covariance: Tensor
    entropy: Tensor
    cotangent: Tensor
    response_mask: Tensor
    se_grad_term: float = math.nan
    se_deltaH1: float = math.nan
    objective_gain: float = math.nan
    realised_delta_h: float | None = None
    realised_se: float | None = None
    summary: dict = field(default_factory=dict)
    interventions: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    objective: dict = field(default_factory=dict)
    basis: str = "ustatistic"
    paired: dict | None = None
    heldout: Any = field(default=None, repr=False)
    step: Any = field(default=None, repr=False)

    def to_dict(self) -> dict:
        """Standard JSON types: per-token arrays as nested lists [B][G][L] (0 off the response)."""
        return {
            "grad_term": self.grad_term, "state_term": self.state_term, "deltaH1": self.deltaH1,
            "se_grad_term": _finite(self.se_grad_term), "se_deltaH1": _finite(self.se_deltaH1),
            "objective_gain": self.objective_gain, "realised_delta_h": self.realised_delta_h,
            "realised_se": self.realised_se, "eta_g": self.eta_g, "n_units": self.n_units, "units": self.units,
            "B": self.B, "G": self.G,
            "prompt": _nested(self.prompt), "sequence": _nested(self.sequence), "token": _nested(self.token),
            "logprobs": _nested(self.logprobs), "covariance": _nested(self.covariance),
            "entropy": _nested(self.entropy), "cotangent": _nested(self.cotangent),
            "response_mask": _nested(self.response_mask.to(torch.int64)),
            "summary": self.summary, "interventions": self.interventions, "timings": dict(self.timings),
            "objective": dict(self.objective), "basis": self.basis, "paired": self.paired,
            "delta_h1_heldout": None if self.heldout is None else self.heldout.to_dict(),
        }

    def __str__(self) -> str:
        def se(value):
            return "" if value is None or not math.isfinite(value) else f" ± {value:.2g}"

        if self.basis == "heldout":
            lines = [f"δĤ₁(E) = {self.deltaH1:.6g}{se(self.se_deltaH1)} nats/sequence = grad_term "
                     f"{self.grad_term:.6g}{se(self.se_grad_term)} + state_term {self.state_term:.6g} (∇H from the "
                     "evaluation batch, spec §9; per-prompt SEs over E)"]
        else:
            lines = [f"δH₁ = {self.deltaH1:.6g}{se(self.se_deltaH1)} nats/sequence = grad_term {self.grad_term:.6g}"
                     f"{se(self.se_grad_term)} + state_term {self.state_term:.6g} (U = {self.n_units}, units = "
                     f"{self.units}; jackknife SEs)"]
        if self.realised_delta_h is not None:
            diagnostics = describe_diagnostics(self.paired or {})
            lines.append(f"realised ΔĤ of this step on the evaluation batch = {self.realised_delta_h:.6g}"
                         f"{se(self.realised_se)}" + (f"  [{diagnostics}]" if diagnostics else ""))
        if self.paired is not None:
            lines.append(self.paired["verdict"])
        corr = self.summary.get("correlations", {})
        if corr:
            lines.append(f"a vs Cui et al.'s −η·cov: Pearson {corr['pearson_cov']:.3f}, Spearman "
                         f"{corr['spearman_cov']:.3f}; a vs next-token entropy: Pearson {corr['pearson_entropy']:.3f}, "
                         f"Spearman {corr['spearman_entropy']:.3f}  ({self.summary.get('tokens')} tokens)")
        if "down_total" in self.summary:
            lines.append(f"tokens pushing entropy down sum to {-self.summary['down_total']:.4g}, up to "
                         f"{self.summary['up_total']:.4g}")
            for q, row in self.summary.get("top_q", {}).items():
                lines.append(f"  top {float(q):.3g} ({row['k']} tokens): share of the downward push — by −a "
                             f"{row['share_down_a']:.3f}, by cov {row['share_down_cov']:.3f}, by entropy "
                             f"{row['share_down_entropy']:.3f}; Jaccard with a's top: cov {row['jaccard_cov']:.3f}, "
                             f"entropy {row['jaccard_entropy']:.3f}")
        if self.interventions:
            lines.append(f"interventions (objective gain of the unchanged step Ȳ·Δθ = {self.objective_gain:.4g}):")
            for name, row in self.interventions.items():
                realised = ("" if row.get("realised_delta_h") is None else
                            f", ΔĤ = {row['realised_delta_h']:.6g}{se(row.get('realised_se'))}")
                diagnostics = describe_diagnostics(row)
                label = "δĤ₁(E)" if self.basis == "heldout" else "δH₁"
                paired = ("" if row.get("paired_difference") is None else
                          f", ΔĤ − δĤ₁(E) = {row['paired_difference']:.4g}{se(row.get('paired_se'))}")
                lines.append(f"  {name}: {row['tokens_kept']:.0f}/{row['tokens']} tokens, {label} = "
                             f"{row['deltaH1']:.6g}{se(row.get('deltaH1_se'))}{realised}{paired}, objective gain = "
                             f"{row['objective_gain']:.4g}" + (f"  [{diagnostics}]" if diagnostics else ""))
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- core
def _chunk_item(chunk, values: Tensor) -> ChunkLogprobs:
    """A ChunkLogprobs view of a jvp's primal values (no vjp), so StepCotangent.for_chunk applies unchanged."""
    rows, cols = chunk.response_mask.nonzero(as_tuple=True)

    def no_vjp(_):
        raise RuntimeError("attribution chunks carry no vjp")

    return ChunkLogprobs(chunk=chunk, logprobs=torch.zeros(0), token_logprobs=values, token_rows=rows,
                         token_columns=cols + chunk.columns[0], token_vjp=no_vjp)


def _scatter(target: Tensor, chunk, item: ChunkLogprobs, values: Tensor) -> None:
    """Write a chunk's per-token values [T] into a unit-local [m, G, L] tensor."""
    m, G, L = target.shape
    flat = chunk.flat_index.cpu()[item.token_rows.cpu()]
    target.view(m * G, L)[flat, item.token_columns.cpu()] = values.to("cpu", torch.float64)


#: Tests set this to check the one-direction-per-forward path that adapters without per-layer taps take.
_force_unit_jvps = False


def _row_jvps(policy, params, batch, cotangent, partition, directions, scales, seq_chunk, token_chunk, progress):
    """a, ℓ, H, c [B, G, L] from ``seq_chunk``-sequence forwards over the whole batch, each row differentiated along
    its own unit's d_w (``lora_grads.row_direction_jvp``): one forward-mode pass per chunk, whatever the units."""
    B, G, L = batch.B, batch.G, batch.L
    unit_of_prompt = torch.empty(B, dtype=torch.long)
    for w, index in enumerate(partition):
        unit_of_prompt[torch.as_tensor(index, dtype=torch.long)] = w
    scale_of_unit = torch.tensor(scales, dtype=torch.float64)
    out = [torch.zeros(B, G, L, dtype=torch.float64) for _ in range(4)]
    chunks = list(batch.iter_sequence_chunks(seq_chunk))
    for chunk in progress_bar(chunks, total=len(chunks), desc="attribution jvps", enabled=progress):
        row_unit = unit_of_prompt[chunk.flat_index.cpu() // G]
        values, derivative, entropies = row_direction_jvp(policy, params, chunk, directions, row_unit,
                                                          token_chunk=token_chunk, entropies=True)
        item = _chunk_item(chunk, values.to("cpu", torch.float64))
        c = cotangent.for_chunk(item)
        scale = scale_of_unit[row_unit[item.token_rows.cpu()]]
        for target, value in zip(out, (scale * c * derivative.to("cpu", torch.float64), values, entropies, c)):
            _scatter(target, chunk, item, value)
    return tuple(out)


def _unit_jvps(policy, params, batch, cotangent, partition, directions, scales, seq_chunk, token_chunk, progress):
    """The same from one ``Policy.token_logprob_jvp`` per sequence chunk of each unit (any adapter)."""
    B, G, L = batch.B, batch.G, batch.L
    out = [torch.zeros(B, G, L, dtype=torch.float64) for _ in range(4)]
    for w, index in enumerate(progress_bar(partition, total=len(partition), desc="attribution jvps",
                                           enabled=progress)):
        m = len(index)
        unit_batch = batch.select_prompts(index)
        unit_cot = cotangent.select_prompts(index)
        local = [torch.zeros(m, G, L, dtype=torch.float64) for _ in range(4)]
        for chunk in unit_batch.iter_sequence_chunks(seq_chunk):
            values, derivative, entropies = policy.token_logprob_jvp(params, chunk, directions[w],
                                                                     token_chunk=token_chunk, entropies=True)
            item = _chunk_item(chunk, values.to("cpu", torch.float64))
            c = unit_cot.for_chunk(item)
            for target, value in zip(local, (scales[w] * c * derivative.to("cpu", torch.float64), values,
                                             entropies, c)):
                _scatter(target, chunk, item, value)
        for target, value in zip(out, local):
            target[index] = value
    return tuple(out)


@dataclass(frozen=True)
class _Pass1:
    x_units: list
    y_units: list
    sum_x: dict
    sum_y: dict


def _pass1(policy, params, batch, cotangent, partition, seq_chunk, token_chunk, progress) -> _Pass1:
    """X_w and Y_w kept for every unit, ΣX, ΣY (spec §5's pass 1: delta_h1's own unit-vector stream)."""
    sum_x, sum_y, kept, kept_y = _zeros_like(params), _zeros_like(params), [], []
    stream = iter_unit_vectors(policy, params, batch, cotangent, partition, range(len(partition)), seq_chunk=seq_chunk,
                               token_chunk=token_chunk)
    for x_unit, y_unit in progress_bar(stream, total=len(partition), desc="attribution pass 1", enabled=progress):
        for name in sum_x:
            sum_x[name] += x_unit[name]
            sum_y[name] += y_unit[name]
        kept.append(x_unit)
        kept_y.append(y_unit)
    return _Pass1(kept, kept_y, sum_x, sum_y)


def _y_units(policy, params, batch, cotangent, partition, seq_chunk, token_chunk) -> list[dict]:
    """Y_w = (B/m) Σ_{n∈w} Σ c∇ℓ for a (possibly masked) cotangent, one vjp per sequence chunk."""
    out = []
    for index in partition:
        unit_batch = batch.select_prompts(index)
        unit_cot = cotangent.select_prompts(index).scaled(batch.B / len(index))
        total = _zeros_like(params)
        for item in policy.iter_logprob_vjps(params, unit_batch, seq_chunk=seq_chunk, token_chunk=token_chunk):
            for name, grad in item.token_vjp(unit_cot.for_chunk(item)).items():
                total[name] += grad.to("cpu", torch.float64)
        out.append(total)
    return out


def _terms(x_units: list, y_units: list, sum_x: dict, sum_y: dict, decomposition):
    """δH₁'s terms and SEs (spec §5, ``delta_h1_terms``) from kept unit vectors, at ``decomposition``'s step."""
    eta_p, delta_state = _cpu64(decomposition.eta_preconditioner()), _cpu64(decomposition.delta_state)
    return delta_h1_terms(*unit_scalars(x_units, y_units, sum_x, sum_y, eta_p, delta_state), warn=False)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _require_something_to_attribute(batch: RolloutBatch, objective: Objective) -> None:
    """Every token's cotangent c is 0 when every advantage is 0 and there is no KL term (β = 0): the step's gradient
    term is 0 and every attribution would be exactly 0 (correlations NaN, interventions no-ops). Refuse that."""
    advantages = batch.token_advantages if getattr(batch, "token_advantages", None) is not None else batch.advantages
    if objective.beta == 0 and not bool((advantages != 0).any()):
        raise ValueError("nothing to attribute: every advantage of the update batch is 0 (each prompt's responses got "
                         "equal rewards) and β = 0, so the step's gradient term is 0 and every token's attribution "
                         "is exactly 0. Use a reward that tells the responses apart (--reward), more responses per "
                         "prompt (-G), or other prompts.")


def attribute(params: ParamsDict, batch: RolloutBatch, *, policy: Policy, adam: AdamState,
              objective: Objective | None = None, units: str | int = "prompt", lr: float | None = None,
              seq_chunk: int | None = None, token_chunk: int | None = None,
              quantiles: tuple[float, ...] = DEFAULT_QUANTILES, interventions: Mapping[str, Any] | None = None,
              evaluation: RolloutBatch | None = None, integrand: str = "rao_blackwell",
              progress: bool | None = False) -> AttributionResult:
    """Per-token attributions a [B, G, L] of the gradient term of the AdamW step on ``batch`` (spec §8, §9).

    With an evaluation batch E (``evaluation``, drawn independently of ``batch``; the default of ``funcprobe
    attribute``) the attribution is on spec §9's footing: one direction d = (η_g P) ⊙ ĝ_E for every token of the
    update batch, ĝ_E the held-out entropy gradient (``integrand`` as for ``delta_h1_heldout``),

        a_{n,g,k} = c_{n,g,k} · d·∇ℓ_{n,g,k},      Σ a = ĝ_E·(η_g P⊙Ȳ) = δĤ₁(E)'s gradient term,

    unbiased at any optimizer age; a token's attribution holds no entropy gradient of its own sample (E is
    independent of U). Each intervention's changed step is predicted on the same E (δĤ₁(E) along its Δθ′) and paired
    with its realised ΔĤ there (``paired_difference``, ``paired_se``), with the importance weights' diagnostics.
    Without ``evaluation`` the §8 U-statistic footing below is used (``basis`` "ustatistic").

    a_{n,g,k} = −(B/m)/(U(U−1)) · c_{n,g,k} · d_w·∇ℓ_{n,g,k},  d_w = (η_g P) ⊙ (ΣX − X_w),  n ∈ unit w of m prompts
    (module docstring); Σ a = ``delta_h1(...).grad_term`` to float64 rounding. Arguments as for ``delta_h1``
    (objective: the step's loss; units: "prompt" or M equal blocks; lr overrides the state's learning rate;
    seq_chunk sequences per forward, token_chunk rows per vocabulary chunk).

    quantiles: the top-q fractions for the proxy summaries (:func:`proxy_summary`).
    interventions: name → spec, each a token mask/weight on the step's cotangent c (spec §3, §8): "clip_cov"
    (drop the top-q tokens by covariance; q from ``("clip_cov", q)``, default 0.002), "high_entropy" (keep only the
    top-q by entropy; default q 0.2), "positive_only" (drop the tokens of negative-advantage sequences, A < 0;
    A = 0 tokens carry c = 0 anyway), or a float tensor [B, G, L] of weights (:func:`intervention_mask`). For each: the changed step (its own Ȳ', P', η_g', Δθ_state'), its δH₁
    (same X_u), the first-order objective gain Ȳ·Δθ' (Ȳ of the original objective), and with ``evaluation`` the
    realised ΔĤ on that batch (``snis_delta_h`` of the changed θ⁺). Each row: tokens_kept (Σ of the weights over the
    response), tokens, grad_term, state_term, deltaH1 (nats), objective_gain (first-order change of the original
    surrogate objective, Ȳ·Δθ'), realised_delta_h and realised_se (None without ``evaluation``). An all-ones mask
    reproduces the plain step; an all-zeros one gives grad_term 0 and δH₁ = the state term at P' (v' = β2 v).
    The forward-mode pass runs under ``Policy.forward_mode_attention`` (eager attention for the jvp), so a model
    loaded with SDPA or flash attention works as loaded.
    Pure: params, batch, policy and state are untouched. Raises ValueError for a bad units/chunk/intervention, and
    when there is nothing to attribute (every advantage 0 and β = 0: every attribution would be exactly 0).
    """
    from .delta_h1 import _require_policy

    batch = as_rollout_batch(batch, "attribute: batch")
    objective = resolve_objective(objective, batch, "attribute")
    _require_policy(policy, "attribute")
    policy.check_params(params)
    _require_something_to_attribute(batch, objective)
    if evaluation is not None:
        return _attribute_heldout(params, batch, policy=policy, adam=adam, objective=objective, lr=lr,
                                  seq_chunk=seq_chunk, token_chunk=token_chunk, quantiles=quantiles,
                                  interventions=interventions, evaluation=evaluation, integrand=integrand,
                                  progress=progress)
    batch.require_prompts(2, "attribution (a cross-prompt U-statistic)")
    partition = unit_partition(batch.B, units)
    seq_chunk, token_chunk = policy.chunk_sizes(seq_chunk, token_chunk)
    U, B, G, L = len(partition), batch.B, batch.G, batch.L
    timings: dict[str, float] = {}
    started = time.perf_counter()

    cotangent = step_cotangent(params, batch, policy=policy, objective=objective, seq_chunk=seq_chunk,
                               token_chunk=token_chunk)
    first = _pass1(policy, params, batch, cotangent, partition, seq_chunk, token_chunk, progress)
    timings["pass1_s"] = time.perf_counter() - started
    ybar = {name: value / U for name, value in first.sum_y.items()}
    decomposition = update_decomposition(params, ybar, adam, lr=lr, max_grad_norm=objective.max_grad_norm)
    eta_p = _cpu64(decomposition.eta_preconditioner())
    objective_gain = _dot(ybar, _cpu64(decomposition.delta_theta()))

    phase = time.perf_counter()
    directions = [{n: eta_p[n] * (first.sum_x[n] - first.x_units[w][n]) for n in eta_p} for w in range(U)]
    scales = [-(B / len(index)) / (U * (U - 1)) for index in partition]
    if unsupported_reason(policy) is None and not _force_unit_jvps:
        token, logprobs, entropy, c_tokens = _row_jvps(policy, params, batch, cotangent, partition, directions,
                                                       scales, seq_chunk, token_chunk, progress)
    else:
        token, logprobs, entropy, c_tokens = _unit_jvps(policy, params, batch, cotangent, partition, directions,
                                                        scales, seq_chunk, token_chunk, progress)
    timings["jvp_s"] = time.perf_counter() - phase

    response = batch.response_mask.to(torch.bool)
    grad_term = float(token.sum())
    terms = _terms(first.x_units, first.y_units, first.sum_x, first.sum_y, decomposition)
    state_term, se_grad_term, se_delta_h1 = terms.state_term, terms.scaled.se_jack, terms.se_deltaH1
    covariance = token_covariance(logprobs, objective.token_advantages(batch), response)
    summary = proxy_summary(token, covariance, entropy, response, eta=_uniform_or_none(decomposition, "eta_g"),
                            quantiles=quantiles)
    realised = before = None
    if evaluation is not None:
        # E's values at θ once, shared by the unchanged step and every intervention (one forward of E each).
        phase = time.perf_counter()
        before = _evaluation_before(params, evaluation, policy, seq_chunk, token_chunk)
        realised = _realised(params, decomposition, adam, lr, objective, policy, evaluation, before, seq_chunk,
                             token_chunk)
        timings["realised_s"] = time.perf_counter() - phase
    result_interventions = {}
    if interventions:
        phase = time.perf_counter()
        result_interventions = _run_interventions(
            interventions, params=params, batch=batch, policy=policy, adam=adam, objective=objective, lr=lr,
            partition=partition, cotangent=cotangent, x_units=first.x_units, sum_x=first.sum_x, ybar=ybar, covariance=covariance,
            entropy=entropy, response=response, evaluation=evaluation, before=before, seq_chunk=seq_chunk,
            token_chunk=token_chunk)
        timings["interventions_s"] = time.perf_counter() - phase
    timings["total_s"] = time.perf_counter() - started
    sequence = token.sum(-1)
    return AttributionResult(
        token=token, sequence=sequence, prompt=sequence.sum(-1), grad_term=grad_term, state_term=state_term,
        deltaH1=grad_term + state_term, se_grad_term=se_grad_term, se_deltaH1=se_delta_h1,
        objective_gain=objective_gain,
        realised_delta_h=None if realised is None else float(realised.deltaH),
        realised_se=None if realised is None else float(realised.se), eta_g=_uniform_or_none(decomposition, "eta_g"),
        n_units=U,
        units="prompt" if units == "prompt" else f"blocks:{units}", B=B, G=G, logprobs=logprobs,
        covariance=covariance, entropy=entropy, cotangent=c_tokens, response_mask=response, summary=summary,
        interventions=result_interventions, timings=timings, objective=objective.to_dict(), step=decomposition)


# ----------------------------------------------------------------------------------------------- proxies
def token_covariance(logprobs: Tensor, advantages: Tensor, response_mask: Tensor) -> Tensor:
    """Cui et al. 2025's per-token covariance proxy (spec §8), float64 [B, G, L], 0 off the response:

        cov_{n,g,k} = (ℓ_{n,g,k} − ℓ̄)(A_{n,g,k} − Ā),  ℓ̄, Ā the means over all response tokens of the batch.

    ``advantages`` [B, G] (broadcast over tokens) or [B, G, L]."""
    mask = response_mask.to(torch.bool)
    if mask.sum() == 0:
        raise ValueError("the batch has no response tokens; the covariance proxy is undefined.")
    logprobs = logprobs.to(torch.float64)
    advantages = advantages.to(torch.float64)
    if advantages.dim() == 2:
        advantages = advantages[..., None].expand_as(logprobs)
    l_mean = logprobs[mask].mean()
    a_mean = advantages[mask].mean()
    out = (logprobs - l_mean) * (advantages - a_mean)
    return torch.where(mask, out, torch.zeros_like(out))


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson correlation of two 1-D float tensors (float64); NaN when either is constant."""
    x, y = x.to(torch.float64), y.to(torch.float64)
    xc, yc = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((xc * xc).sum()) * float((yc * yc).sum()))
    return float((xc * yc).sum()) / denom if denom > 0 else math.nan


def average_ranks(x: Tensor) -> Tensor:
    """Ranks 1..n of a 1-D tensor, ties sharing their average rank (float64)."""
    x = x.to(torch.float64)
    n = x.numel()
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    ranks = torch.empty(n, dtype=torch.float64)
    start = 0
    while start < n:
        stop = start + 1
        while stop < n and sorted_x[stop] == sorted_x[start]:
            stop += 1
        ranks[order[start:stop]] = (start + 1 + stop) / 2.0  # mean of ranks start+1 .. stop
        start = stop
    return ranks


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman's rank correlation: Pearson of the average ranks (ties averaged)."""
    return pearson(average_ranks(x), average_ranks(y))


def top_fraction(scores: Tensor, q: float) -> Tensor:
    """Indices of the top ⌈q·n⌉ entries of a 1-D tensor (largest first; ties by position)."""
    if not 0 < q <= 1:
        raise ValueError(f"a top-q fraction must be in (0, 1]; got {q}.")
    k = max(1, math.ceil(q * scores.numel()))
    return torch.argsort(scores.to(torch.float64), descending=True, stable=True)[:k]


def jaccard(a: Tensor, b: Tensor) -> float:
    """|a ∩ b| / |a ∪ b| of two index sets."""
    sa, sb = set(a.tolist()), set(b.tolist())
    union = sa | sb
    return len(sa & sb) / len(union) if union else math.nan


def proxy_summary(attribution: Tensor, covariance: Tensor, entropy: Tensor, response_mask: Tensor, *,
                  eta: float | None, quantiles=DEFAULT_QUANTILES) -> dict:
    """Agreement of the exact attributions a with the proxies, over the batch's response tokens (spec §8).

    correlations: Pearson and Spearman of a with −η·cov (Cui et al.'s prediction; η = η_g, or 1 with per-group
    rates — a scale does not change a correlation, the sign does) and with the next-token entropy.
    top_q[q]: rankings "a" by −a (the tokens that push entropy down most first), "cov" by cov (Clip-Cov's order:
    largest predicted decrease −η·cov first), "entropy" by H (largest first); for each, the share of grad_term carried
    by its top ⌈q·T⌉ tokens (``share_*`` = Σ_top a / Σ a: unbounded when the tokens' pushes cancel, as they mostly
    do), the share of the downward push they carry (``share_down_*`` = Σ_top max(−a, 0) / Σ max(−a, 0), in [0, 1]:
    how much of what drives the entropy down a ranking's top set would catch), and the Jaccard overlap of the proxies'
    top sets with a's. Also ``down_total`` = Σ max(−a, 0) and ``up_total`` = Σ max(a, 0) (Σ a = up − down).
    """
    mask = response_mask.to(torch.bool)
    a = attribution[mask]
    cov = covariance[mask]
    pred = -(1.0 if eta is None else eta) * cov
    h = entropy[mask]
    total = float(a.sum())
    down = (-a).clamp_min(0)
    down_total = float(down.sum())
    summary: dict = {"tokens": int(a.numel()), "grad_term": total, "down_total": down_total,
                     "up_total": float(a.clamp_min(0).sum()), "correlations": {
        "pearson_cov": pearson(a, pred), "spearman_cov": spearman(a, pred),
        "pearson_entropy": pearson(a, h), "spearman_entropy": spearman(a, h)}, "top_q": {}}
    for q in quantiles:
        # Rankings, first = "drives entropy down most": −a, cov (Clip-Cov's order), and the next-token entropy.
        tops = {name: top_fraction(scores, q) for name, scores in (("a", -a), ("cov", cov), ("entropy", h))}
        summary["top_q"][str(q)] = {
            "k": int(tops["a"].numel()),
            "share_a": float(a[tops["a"]].sum()) / total if total else math.nan,
            "share_cov": float(a[tops["cov"]].sum()) / total if total else math.nan,
            "share_entropy": float(a[tops["entropy"]].sum()) / total if total else math.nan,
            "share_down_a": float(down[tops["a"]].sum()) / down_total if down_total else math.nan,
            "share_down_cov": float(down[tops["cov"]].sum()) / down_total if down_total else math.nan,
            "share_down_entropy": float(down[tops["entropy"]].sum()) / down_total if down_total else math.nan,
            "jaccard_cov": jaccard(tops["a"], tops["cov"]),
            "jaccard_entropy": jaccard(tops["a"], tops["entropy"]),
        }
    return summary


# ------------------------------------------------------------------------------------------ interventions
def intervention_mask(spec: Any, *, batch: RolloutBatch, covariance: Tensor, entropy: Tensor,
                      response: Tensor, name: str = "user") -> Tensor:
    """The token weights [B, G, L] (float64) of a named intervention (spec §8) or a user tensor.

    "clip_cov" / ("clip_cov", q): 0 on the top-⌈qT⌉ response tokens by covariance, else 1 (default q = 0.002);
    "high_entropy" / ("high_entropy", q): 1 only on the top-⌈qT⌉ by entropy (default q = 0.2);
    "positive_only": 0 on every token of a sequence with advantage A < 0 (per-token advantages: the token's);
    a tensor: weights [B, G, L] used as given (finite).
    """
    shape = tuple(batch.input_ids.shape)
    if isinstance(spec, Tensor):
        if tuple(spec.shape) != shape:
            raise ValueError(f"intervention {name!r}: a mask must have the batch's shape [B, G, L] = {list(shape)}; "
                             f"got {list(spec.shape)}.")
        weights = spec.to(torch.float64)
        if not torch.isfinite(weights).all():
            raise ValueError(f"intervention {name!r}: the mask holds NaN or inf; use finite token weights.")
        return weights
    kind, q = (spec, None) if isinstance(spec, str) else (tuple(spec) + (None,))[:2]
    flat_index = response.reshape(-1).nonzero().squeeze(1)
    weights = torch.ones(shape, dtype=torch.float64)
    if kind == "clip_cov":
        top = flat_index[top_fraction(covariance.reshape(-1)[flat_index], 0.002 if q is None else q)]
        weights.view(-1)[top] = 0.0
    elif kind == "high_entropy":
        top = flat_index[top_fraction(entropy.reshape(-1)[flat_index], 0.2 if q is None else q)]
        weights.zero_()
        weights.view(-1)[top] = 1.0
    elif kind == "positive_only":
        advantages = batch.token_advantages if batch.token_advantages is not None else batch.advantages[..., None]
        weights = torch.where(advantages.to(torch.float64).expand(shape) < 0, 0.0, 1.0).to(torch.float64)
    else:
        raise ValueError(f"intervention {name!r}: unknown kind {kind!r}; use 'clip_cov', 'high_entropy', "
                         "'positive_only' (optionally as (kind, q)) or a weight tensor [B, G, L].")
    return weights


def masked_cotangent(cotangent: StepCotangent, weights: Tensor) -> StepCotangent:
    """The cotangent ω ⊙ c: both the advantage part w·A and the KL weight β·w scaled by the token weights ω."""
    return replace(cotangent, linear=cotangent.linear * weights,
                   kl_weight=None if cotangent.kl_weight is None else cotangent.kl_weight * weights,
                   sequence_constant=False)


def _evaluation_before(params, evaluation, policy, seq_chunk, token_chunk):
    """S and the entropies at θ on E (snis_delta_h's defaults: Rao-Blackwell integrand), computed once."""
    from .realised import values_before

    return values_before(params, evaluation, policy=policy, logprobs=True, entropies=True,
                         chunks={"seq_chunk": seq_chunk, "token_chunk": token_chunk, "progress": False})


def _realised(params, decomposition, adam, lr, objective, policy, evaluation, before, seq_chunk, token_chunk):
    """ΔĤ on E (``snis_delta_h``, its defaults) of the step whose gradient is −Ȳ of ``decomposition``."""
    from .adam import adamw_update
    from .realised import snis_delta_h

    loss_grad = {n: -v for n, v in decomposition.ybar.items()}
    updated, _ = adamw_update(params, loss_grad, adam, lr=lr, max_grad_norm=objective.max_grad_norm)
    return snis_delta_h(params, updated, policy=policy, batch=evaluation, before=before, seq_chunk=seq_chunk,
                        token_chunk=token_chunk)


def _run_interventions(interventions, *, params, batch, policy, adam, objective, lr, partition, cotangent, x_units,
                       sum_x, ybar, covariance, entropy, response, evaluation, before, seq_chunk, token_chunk) -> dict:
    U = len(partition)
    out = {}
    for name, spec in interventions.items():
        weights = intervention_mask(spec, batch=batch, covariance=covariance, entropy=entropy, response=response,
                                    name=name)
        changed = masked_cotangent(cotangent, weights)
        y_units = _y_units(policy, params, batch, changed, partition, seq_chunk, token_chunk)
        ybar_changed = {n: sum(y[n] for y in y_units) / U for n in ybar}
        decomposition = update_decomposition(params, ybar_changed, adam, lr=lr,
                                             max_grad_norm=objective.max_grad_norm)
        terms = _terms(x_units, y_units, sum_x, {n: sum(y[n] for y in y_units) for n in ybar}, decomposition)
        grad_term, state_term = terms.grad_term, terms.state_term
        delta = _cpu64(decomposition.delta_theta())
        row = {"tokens_kept": float((weights * response).sum()), "tokens": int(response.sum()),
               "grad_term": grad_term, "state_term": state_term, "deltaH1": grad_term + state_term,
               "objective_gain": _dot(ybar, delta), "realised_delta_h": None, "realised_se": None}
        if evaluation is not None:
            realised = _realised(params, decomposition, adam, lr, objective, policy, evaluation, before, seq_chunk,
                                 token_chunk)
            row.update(_realised_diagnostics(realised))
        out[name] = row
    return out


# --------------------------------------------------------------------------------------- spec §9's footing
def _values_and_gradients(policy, params, batch, cotangents, seq_chunk, token_chunk, progress):
    """(ℓ [B, G, L], h [B, G, L], [Ȳ_j = Σ c_j∇ℓ for each cotangent]) from one forward per sequence chunk and one
    vjp per cotangent: the step gradients of spec §3 with U's log-probs and next-token entropies (float64 CPU)."""
    B, G, L = batch.B, batch.G, batch.L
    ell = torch.zeros(B, G, L, dtype=torch.float64)
    ent = torch.zeros(B, G, L, dtype=torch.float64)
    totals = [_zeros_like(params) for _ in cotangents]
    chunks = list(batch.iter_sequence_chunks(seq_chunk))
    for chunk in progress_bar(chunks, total=len(chunks), desc="attribution: the step", enabled=progress):
        (values, entropies), vjp_fn = torch.func.vjp(
            lambda p, c=chunk: policy._chunk_token_logprobs_entropies(p, c, token_chunk), dict(params))
        item = _chunk_item(chunk, values.detach().to("cpu", torch.float64))
        _scatter(ell, chunk, item, values.detach())
        _scatter(ent, chunk, item, entropies.detach())
        zero = torch.zeros_like(entropies)
        for total, cotangent in zip(totals, cotangents):
            grads = vjp_fn((cotangent.for_chunk(item).to(values.device), zero))[0]
            for name, grad in grads.items():
                total[name] += grad.to("cpu", torch.float64)
        del vjp_fn, values, entropies
    return ell, ent, totals


def _jvp_along(policy, params, batch, direction, seq_chunk, token_chunk, progress) -> Tensor:
    """d·∇ℓ [B, G, L] for every response token of ``batch`` along ONE direction d: one forward-mode pass per chunk
    (per-layer LoRA tangents when the adapter allows, else ``Policy.token_logprob_jvp``)."""
    B, G, L = batch.B, batch.G, batch.L
    out = torch.zeros(B, G, L, dtype=torch.float64)
    tap = unsupported_reason(policy) is None and not _force_unit_jvps
    chunks = list(batch.iter_sequence_chunks(seq_chunk))
    for chunk in progress_bar(chunks, total=len(chunks), desc="attribution jvps", enabled=progress):
        if tap:
            values, derivative, _ = row_direction_jvp(policy, params, chunk, [direction],
                                                      torch.zeros(chunk.num_sequences, dtype=torch.long),
                                                      token_chunk=token_chunk)
        else:
            values, derivative, _ = policy.token_logprob_jvp(params, chunk, direction, token_chunk=token_chunk)
        item = _chunk_item(chunk, values.to("cpu", torch.float64))
        _scatter(out, chunk, item, derivative)
    return out


def _realised_diagnostics(realised) -> dict:
    """A realised ΔĤ (``snis_delta_h``) with its importance weights' diagnostics, as every row carries them."""
    return {"realised_delta_h": float(realised.deltaH), "realised_se": float(realised.se),
            "realised_reliable": bool(realised.reliable), "realised_reason": realised.reason,
            "ess_min_fraction": float(realised.ess_min_fraction), "khat": _finite(realised.khat),
            "khat_threshold": _finite(realised.khat_threshold), "khat_assessed": bool(realised.khat_assessed)}


def _realised_row(realised, paired) -> dict:
    return {**_realised_diagnostics(realised),
            "paired_difference": paired.difference, "paired_se": _finite(paired.se), "paired_z": _finite(paired.z),
            "first_order": paired.first_order}


def describe_diagnostics(row: Mapping[str, Any]) -> str:
    """"ESS/G min 0.93, k̂ 0.21 (≤ 0.336), reliable" — or "… k̂ n/a …" — for a row with a realised ΔĤ; "" without."""
    if row.get("realised_reliable") is None:
        return ""
    khat = row.get("khat")
    if row.get("khat_assessed") and khat is not None:
        khat_text = f"k̂ {khat:.3f} (threshold {row.get('khat_threshold') or math.nan:.3f})"
    else:
        khat_text = "k̂ n/a (no weight can dominate)"
    verdict = "reliable" if row["realised_reliable"] else "UNRELIABLE"
    return f"ESS/G min {row.get('ess_min_fraction', math.nan):.3f}, {khat_text}, {verdict}"


def _attribute_heldout(params, batch, *, policy, adam, objective, lr, seq_chunk, token_chunk, quantiles,
                       interventions, evaluation, integrand, progress) -> AttributionResult:
    """``attribute`` on spec §9's footing (see its docstring): passes (1) U: ℓ, h and Ȳ (one forward, one vjp);
    (2) with interventions, U again for every changed Ȳ′ (one forward, one vjp each); (3) E: one forward and one
    backward for ĝ_E and D_n along every step's gradient and state parts at once; (4) U: one forward-mode pass along
    d = (η_g P) ⊙ ĝ_E; (5) E at θ once and at each θ⁺ for the realised changes."""
    from .heldout import heldout_pass, heldout_result, paired_difference, step_directions

    evaluation_batch = as_rollout_batch(evaluation, "attribute: evaluation (the evaluation batch E)")
    seq_chunk, token_chunk = policy.chunk_sizes(seq_chunk, token_chunk)
    B, G = batch.B, batch.G
    timings: dict[str, float] = {}
    started = time.perf_counter()
    cotangent = step_cotangent(params, batch, policy=policy, objective=objective, seq_chunk=seq_chunk,
                               token_chunk=token_chunk)
    logprobs, entropy, (ybar,) = _values_and_gradients(policy, params, batch, [cotangent], seq_chunk, token_chunk,
                                                       progress)
    response = batch.response_mask.to(torch.bool)
    covariance = token_covariance(logprobs, objective.token_advantages(batch), response)
    steps = {"": update_decomposition(params, ybar, adam, lr=lr, max_grad_norm=objective.max_grad_norm)}
    masks = {}
    if interventions:
        masks = {name: intervention_mask(spec, batch=batch, covariance=covariance, entropy=entropy,
                                         response=response, name=name) for name, spec in interventions.items()}
        changed = [masked_cotangent(cotangent, weights) for weights in masks.values()]
        _, _, ybars = _values_and_gradients(policy, params, batch, changed, seq_chunk, token_chunk, False)
        for name, changed_ybar in zip(masks, ybars):
            steps[name] = update_decomposition(params, changed_ybar, adam, lr=lr,
                                               max_grad_norm=objective.max_grad_norm)
    timings["step_s"] = time.perf_counter() - started

    phase = time.perf_counter()
    directions = [d for step in steps.values() for d in step_directions(step, params)[0]]
    measured = heldout_pass(params, directions, evaluation_batch, policy=policy, integrand=integrand,
                            seq_chunk=seq_chunk, token_chunk=token_chunk, entropy_gradient=True, progress=progress)
    heldout = {name: heldout_result(measured, (2 * i, 2 * i + 1), decomposed=True, integrand=integrand)
               for i, name in enumerate(steps)}
    timings["heldout_s"] = time.perf_counter() - phase

    phase = time.perf_counter()
    decomposition = steps[""]
    eta_p = _cpu64(decomposition.eta_preconditioner())
    direction = {n: eta_p[n] * measured.gradient[n] for n in eta_p}
    derivative = _jvp_along(policy, params, batch, direction, seq_chunk, token_chunk, progress)
    c_tokens = torch.zeros_like(derivative)
    for chunk in batch.iter_sequence_chunks(seq_chunk):
        item = _chunk_item(chunk, _gather_tokens(logprobs, chunk))
        _scatter(c_tokens, chunk, item, cotangent.for_chunk(item))
    token = c_tokens * derivative
    timings["jvp_s"] = time.perf_counter() - phase

    phase = time.perf_counter()
    before = _evaluation_before(params, evaluation_batch, policy, seq_chunk, token_chunk)
    rows = {}
    base_row = None
    for name, step in steps.items():
        realised = _realised(params, step, adam, lr, objective, policy, evaluation_batch, before, seq_chunk,
                             token_chunk)
        paired = paired_difference(realised, heldout[name])
        row = _realised_row(realised, paired)
        if name == "":
            base_row, base_paired = row, paired
            continue
        weights = masks[name]
        prediction = heldout[name]
        rows[name] = {"tokens_kept": float((weights * response).sum()), "tokens": int(response.sum()),
                      "grad_term": prediction.grad_term, "state_term": prediction.state_term,
                      "deltaH1": prediction.deltaH1, "deltaH1_se": _finite(prediction.se),
                      "objective_gain": _dot(ybar, _cpu64(step.delta_theta())), **row}
    timings["realised_s"] = time.perf_counter() - phase
    timings["total_s"] = time.perf_counter() - started
    base = heldout[""]
    summary = proxy_summary(token, covariance, entropy, response, eta=_uniform_or_none(decomposition, "eta_g"),
                            quantiles=quantiles)
    sequence = token.sum(-1)
    return AttributionResult(
        token=token, sequence=sequence, prompt=sequence.sum(-1), grad_term=float(token.sum()),
        state_term=base.state_term, deltaH1=float(token.sum()) + base.state_term, se_grad_term=base.se_grad,
        se_deltaH1=base.se, objective_gain=_dot(ybar, _cpu64(decomposition.delta_theta())),
        realised_delta_h=base_row["realised_delta_h"], realised_se=base_row["realised_se"],
        eta_g=_uniform_or_none(decomposition, "eta_g"), n_units=B, units="heldout", B=B, G=G, logprobs=logprobs,
        covariance=covariance, entropy=entropy, cotangent=c_tokens, response_mask=response, summary=summary,
        interventions=rows, timings=timings, objective=objective.to_dict(), basis="heldout",
        paired={**base_paired.to_dict(), **base_row}, heldout=base, step=decomposition)


def _gather_tokens(values: Tensor, chunk) -> Tensor:
    """A [B, G, L] tensor's entries at the chunk's response tokens, row-major: [T]."""
    B, G, L = values.shape
    rows, cols = chunk.response_mask.cpu().nonzero(as_tuple=True)
    return values.reshape(B * G, L)[chunk.flat_index.cpu()[rows], cols + chunk.columns[0]]
