"""δĤ₁(E): the first-order entropy change of THIS step, from an evaluation batch independent of it (spec §9).

The step's batch U builds Δθ; the evaluation batch E (B_E prompts × G draws from π_θ, independent of U) estimates the
entropy gradient, and the two meet in one directional derivative. Per response token k of draw g of prompt n (response
mask m; ℓ and h at the temperature τ of the batch):

    ℓ_{n,g,k} = log π_θ(y_k | p_n, y_<k),         h_{n,g,k} = H(π_θ(· | p_n, y_<k))       (next-token entropy)
    R_{n,g,k} = Σ_{j>k} m_{n,g,j} h_{n,g,j}                                                  (entropy still to come)
    b_{n,g,k} = (1/(G−1)) Σ_{g′≠g} R_{n,g′,k}                     (the other draws at the same response position k)
    D_n(Δ)    = (1/G) Σ_g Σ_k m_{n,g,k} [ ∂h_{n,g,k}·Δ + (R_{n,g,k} − b_{n,g,k}) ∂ℓ_{n,g,k}·Δ ]
    δĤ₁(E)    = (1/B_E) Σ_n D_n(Δθ),      SE = sd_n(D_n) / √B_E

Unbiased for ∇H·Δθ whatever Δθ is (any optimizer state, clipping, optimizer, or the step a trainer really took):
H_n = E[Σ_k h_k] by the chain rule of entropy, so ∇H_n = E[Σ_k ∇h_k + Σ_k R_k ∇ℓ_k] (a token's score multiplies only
the entropy after it), b uses other draws only (E[b ∇ℓ_k] = 0), and E is independent of Δθ. This Rao-Blackwell
integrand is the default; ``integrand="sequence"`` is §2's form D_n = −(1/G) Σ_g (S_g − S̄_{−g}) ∂S_g·Δ, the same
expectation with more variance (2–3× the spread on the exact-enumeration policy).

D_n is linear in Δ. With Δθ = η_g P ⊙ Ȳ + Δθ_state (an ``UpdateDecomposition``, spec §4) the gradient term D(η_g P⊙Ȳ)
and the state term D(Δθ_state) are reported per prompt too, with their SEs.

**Per token** (``per_token=True``; nats per token, the unit of TRL's ``entropy`` metric). The target for prompt n is
∇r_n·Δ with r_n = E[F]/E[T] its entropy per token (F = Σ_k m h_k, T = Σ_k m the response length):
∇r_n·Δ = (∇E[F]·Δ − r_n ∇E[T]·Δ)/E[T]. The chain rule with h_k replaced by 1 gives ∇E[T] = E[Σ_k N_k ∇ℓ_k]
(N_k = Σ_{j>k} m_j, the tokens after k), estimated without bias by D^len_n(Δ) = (1/G) Σ_{g,k} m (N_k − b^N_k) ∂ℓ_k·Δ
(b^N the leave-one-out mean over the other draws, as b). With r̂_n = Σ_g F_g / Σ_g T_g and T̄_n = (1/G) Σ_g T_g,

    D^tok_n = (D_n − r̂_n D^len_n) / T̄_n,      δĤ₁^tok(E) = (1/B_E) Σ_n D^tok_n,   SE = sd_n(D^tok_n)/√B_E,

which is the surrogate above with every h_k replaced by h_k − r̂_n (R_k − r̂_n N_k after token k), divided by T̄_n
(``heldout_cotangents(..., per_token=True)``; the sequence integrand likewise with T_g − T̄_{−g}). r̂_n and T̄_n come
from the same G draws, so D^tok_n is a ratio estimator, like the per-token realised change (per-prompt SNIS): E[D^tok_n]
= ∇r_n·Δ + O(1/G), exactly unbiased only when every response has the same length (then D^len = 0, D^tok = D/T). On the
exact-enumeration policy with EOS the bias is −1.9 %, −1.2 %, −0.85 % of the target at G = 2, 3, 4 (G·bias constant:
the 1/G law), about 1 % of one batch's SE at G = 8 (tests/test_heldout_per_token_exact.py). Cost: the per-token
cotangents differ from D's, so each chunk takes a second backward of the same forward (``retain_graph``; no second
forward): measured 1.4× the per-response pass on the tests' float64 model and 1.5× on a 4-layer, 256-wide float32
qwen2 (V = 4096, 8 × 8 responses of 16–64 tokens), CPU.

How it is computed — reverse mode, so it runs with any attention (SDPA, flash, eager): D_n(Δ) = ∇F_n·Δ with the
surrogate F_n = (1/G) Σ_{g,k} m [h_k + sg[R_k − b_k] ℓ_k]. One forward of a chunk of whole prompts gives ℓ and h (the
chunked vocabulary projection keeps each row's ∂ℓ/∂hidden and ∂h/∂hidden, ``ChunkedTokenLogprobEntropy``), the
cotangents R − b and 1 follow from those values, and one backward with per-layer LoRA taps
(``lora_grads.TappedChunk.backward_dots``) contracts every row's gradient with Δ as it is formed — nothing
parameter-sized per sequence, memory O(chunk). A prompt with more draws than ``seq_chunk`` gets its values from a
no-grad forward first. Adapters the taps cannot follow (DoRA, …) take one vjp per prompt of a chunk instead.
The same backward can return ĝ_E = ∇_θ (1/B_E) Σ_n F_n, the held-out entropy gradient that attribution uses (§9).

The paired comparison with the realised change on the same E (:func:`paired_difference`):
ΔĤ − δĤ₁(E) = (1/B_E) Σ_n (ΔĤ_n − D_n), SE = sd_n(ΔĤ_n − D_n)/√B_E — how far the step is from its first-order regime.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from .adam import UpdateDecomposition
from .delta_h1 import _dot
from .batch import RolloutBatch, SequenceChunk, as_rollout_batch, check_same_evaluation
from .formatting import fmt
from .lora_grads import tapped_forward, unsupported_reason
from .policy import Policy
from .progress import progress_bar

__all__ = ["INTEGRANDS", "FIRST_ORDER_Z", "HeldoutResult", "delta_h1_heldout", "PairedDifference",
           "paired_difference", "heldout_cotangents", "HeldoutPass", "heldout_pass", "heldout_result",
           "step_directions", "heldout_sequence_values"]

ParamsDict = Mapping[str, Tensor]

#: The integrands of the held-out entropy gradient: spec §9's Rao-Blackwell (entropy-to-go) form and §2's sequence form.
INTEGRANDS = ("rao_blackwell", "sequence")

#: |ΔĤ − δĤ₁(E)| below this many paired SEs reads "in its first-order regime". 3 rather than 2 because a probe
#: tests several step sizes (the sweep) and the verdict should not cry wolf once in twenty.
FIRST_ORDER_Z = 3.0


# ------------------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class HeldoutResult:
    """δĤ₁(E) of spec §9 and how it was computed. JSON-ready through ``to_dict()``; nats per response.

    Fields:
        deltaH1, se: δĤ₁(E) = mean_n D_n and sd_n(D_n)/√B_E (NaN for B_E < 2).
        per_prompt: D_n [B_E], in E's prompt order.
        grad_term, se_grad, per_prompt_grad; state_term, se_state, per_prompt_state: D(η_g P⊙Ȳ) and D(Δθ_state) when
            the step was given as an ``UpdateDecomposition`` (else None); grad_term + state_term = deltaH1.
        integrand: "rao_blackwell" or "sequence".
        entropy, entropy_se: the Rao-Blackwell entropy Ĥ(θ) = mean_n (1/G) Σ_{g,k} m h (nats per response) on E, from
            the same forward; entropy_per_token: Σ m h / Σ m (nats per token, TRL's ``entropy`` on these samples).
        B, G: E's shape. route: how the gradient was formed. forward_passes, backward_passes; timings (seconds).
        gradient: ĝ_E (float64 CPU dict shaped like θ) when asked for (``entropy_gradient=True``); not in to_dict.
        deltaH1_per_token, se_per_token, per_prompt_per_token: with ``per_token=True`` (else None), the first-order
            change of the entropy per token (nats per token, TRL's ``entropy`` unit): mean_n D^tok_n, sd_n/√B_E, and
            D^tok_n [B_E] (module docstring; a ratio estimator, biased at O(1/G)).
        evaluation_fingerprint: ``E.fingerprint`` (``funcprobe.batch.batch_fingerprint``: E's token ids, masks, B, G
            and τ), so that :func:`paired_difference` and ``lr_sweep`` can refuse a realised change of another E;
            None when unknown (a result built by hand: then nothing is checked).
    """

    deltaH1: float
    se: float
    per_prompt: tuple[float, ...]
    integrand: str
    grad_term: float | None
    se_grad: float | None
    per_prompt_grad: tuple[float, ...] | None
    state_term: float | None
    se_state: float | None
    per_prompt_state: tuple[float, ...] | None
    entropy: float
    entropy_se: float
    entropy_per_token: float
    B: int
    G: int
    route: str
    forward_passes: int
    backward_passes: int
    timings: dict[str, float] = field(default_factory=dict)
    gradient: dict[str, Tensor] | None = field(default=None, repr=False, compare=False)
    deltaH1_per_token: float | None = None
    se_per_token: float | None = None
    per_prompt_per_token: tuple[float, ...] | None = None
    evaluation_fingerprint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "gradient"}
        for name in ("per_prompt", "per_prompt_grad", "per_prompt_state", "per_prompt_per_token"):
            data[name] = None if data[name] is None else list(data[name])
        data["timings"] = dict(self.timings)
        notes = {"what": "the first-order entropy change ∇H·Δθ of this step, with ∇H estimated on the evaluation "
                         "batch E (independent of the step): unbiased at any optimizer age (spec §9)"}
        if not math.isfinite(self.se):
            notes["se"] = f"a standard error over prompts needs B_E ≥ 2; E has B_E={self.B}"
        if self.grad_term is None:
            notes["grad_term"] = "the step was given as a plain Δθ, not as an AdamW decomposition"
        if self.deltaH1_per_token is not None:
            notes["deltaH1_per_token"] = ("the first-order change of the entropy per token (nats per token): "
                                          "mean_n (D_n − r̂_n D^len_n)/T̄_n, a ratio estimator with an O(1/G) bias")
        data["notes"] = notes
        return data

    def __str__(self) -> str:
        lines = [f"δĤ₁(E): first-order change of this step, ∇H from the evaluation batch ({self.integrand} "
                 f"integrand), B_E={self.B}, G={self.G}",
                 f"{'quantity':<24}{'value':>14}{'SE':>12}",
                 f"{'δĤ₁(E)':<24}{fmt(self.deltaH1, '>14.6g')}{fmt(self.se, '>12.4g')}"]
        if self.grad_term is not None:
            lines.append(f"{'  gradient term':<24}{fmt(self.grad_term, '>14.6g')}{fmt(self.se_grad, '>12.4g')}")
            lines.append(f"{'  state term':<24}{fmt(self.state_term, '>14.6g')}{fmt(self.se_state, '>12.4g')}")
        if self.deltaH1_per_token is not None:
            lines.append(f"{'δĤ₁(E) per token':<24}{fmt(self.deltaH1_per_token, '>14.6g')}"
                         f"{fmt(self.se_per_token, '>12.4g')}   (nats/token)")
        lines.append(f"{'Ĥ(θ) on E':<24}{fmt(self.entropy, '>14.6g')}{fmt(self.entropy_se, '>12.4g')}"
                     f"   ({fmt(self.entropy_per_token, '.4g')} nats/token)")
        lines.append(f"{self.forward_passes} forward, {self.backward_passes} backward ({self.route}); "
                     + ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items()))
        return "\n".join(lines)


def _mean_se(values: Tensor) -> tuple[float, float]:
    n = values.numel()
    mean = float(values.mean()) if n else math.nan
    se = float(values.std(unbiased=True)) / math.sqrt(n) if n >= 2 else math.nan
    return mean, se


# ---------------------------------------------------------------------------------------------------- cotangents
def heldout_cotangents(token_logprobs: Tensor, token_entropies: Tensor, response_mask: Tensor,
                       integrand: str = "rao_blackwell", *, per_token: bool = False) -> tuple[Tensor, Tensor]:
    """The cotangents (on ℓ, on h) of spec §9's surrogate F_n for one prompt group: float64 [m, G, L] each.

    token_logprobs, token_entropies: ℓ and h at every response token, any value elsewhere, [m, G, L];
    response_mask: {0,1} [m, G, L]. Rao-Blackwell: on ℓ (R − b)/G, on h 1/G, with R the masked entropy after each
    token and b its mean over the other G − 1 draws at the same response position (R = 0 past a response's end).
    Sequence: on ℓ −(S_g − S̄_{−g})/G, on h 0. Zero off the response tokens. Raises ValueError for G < 2.

    ``per_token=True``: the cotangents of the per-token surrogate, whose directional derivative is D^tok_n (the
    first-order change of the entropy per token, module docstring): the same form with every per-token value v_k
    (h_k, or −ℓ_k for the sequence integrand) replaced by v_k − r̂_n, r̂_n = Σ_g F_g / Σ_g T_g the prompt's entropy
    per token on these draws, and divided by T̄_n = (1/G) Σ_g T_g. Rao-Blackwell: on ℓ ((R − r̂N) − (b − r̂b^N))/(G T̄)
    with N_k the number of response tokens after k and b^N its leave-one-out mean; on h 1/(G T̄). Sequence: on ℓ
    −[(S_g − S̄_{−g}) + r̂ (T_g − T̄_{−g})]/(G T̄), on h 0. Raises ValueError for a prompt with no response token.
    """
    if integrand not in INTEGRANDS:
        raise ValueError(f"integrand must be one of {INTEGRANDS}; got {integrand!r}.")
    mask = response_mask.to(torch.float64)
    m, G, L = mask.shape
    if G < 2:
        raise ValueError(f"the held-out entropy gradient's baseline needs G ≥ 2 draws per prompt; got G={G}.")
    lengths = mask.sum(-1)                                                      # T_g [m, G]
    total = lengths.sum(-1, keepdim=True)                                       # Σ_g T_g [m, 1]
    if per_token and bool((total <= 0).any()):
        empty = (total.squeeze(-1) <= 0).nonzero().flatten().tolist()
        raise ValueError(f"per_token=True: prompt(s) {empty} of this group have no response tokens (Σ_g T = 0), so "
                         "their entropy per token is undefined.")
    ell = token_logprobs.to(torch.float64) * mask
    if integrand == "sequence":
        S = ell.sum(-1)
        centred = S - (S.sum(-1, keepdim=True) - S) / (G - 1)
        if not per_token:
            return -(centred / G)[..., None] * mask, torch.zeros_like(mask)
        ratio = -S.sum(-1, keepdim=True) / total                               # r̂_n with F = −S
        centred_T = lengths - (total - lengths) / (G - 1)
        return -((centred + ratio * centred_T) / total)[..., None] * mask, torch.zeros_like(mask)
    h = token_entropies.to(torch.float64) * mask
    # Positions: the k-th response token of each draw (responses are contiguous runs of the mask).
    position = (response_mask.to(torch.long).cumsum(-1) - 1).clamp(min=0)
    length = int(lengths.max()) if mask.numel() else 0

    def centred_to_come(values: Tensor) -> Tensor:
        """Σ_{j>k} v_j minus its mean over the other draws at position k, at every token: [m, G, L]."""
        by_position = torch.zeros(m, G, max(length, 1), dtype=torch.float64)
        by_position.scatter_add_(2, position, values)
        to_come = by_position.sum(-1, keepdim=True) - by_position.cumsum(-1)  # R_k = Σ_{j>k} v_j
        baseline = (to_come.sum(1, keepdim=True) - to_come) / (G - 1)
        return (to_come - baseline).gather(2, position)

    if not per_token:
        return centred_to_come(h) * mask / G, mask / G
    ratio = h.sum((1, 2))[:, None, None] / total[..., None]                     # r̂_n [m, 1, 1]
    # v_k − r̂ on every token: (R − r̂N) − (b − r̂ b^N) in one pass (the map v ↦ centred_to_come(v) is linear).
    scale = total[..., None]                                                    # G T̄_n = Σ_g T_g
    return centred_to_come(h - ratio * mask) * mask / scale, mask / scale


# ----------------------------------------------------------------------------------------------------- estimator
def _directions(delta: Any, params: ParamsDict) -> tuple[list[dict[str, Tensor]], bool]:
    """[Δθ] for a plain step, [η_g P⊙Ȳ, Δθ_state] for an ``UpdateDecomposition``: float64 CPU dicts."""
    if isinstance(delta, UpdateDecomposition):
        eta_p = delta.eta_preconditioner()
        grad = {n: (eta_p[n].to(torch.float64) * delta.ybar[n].to(torch.float64)).cpu() for n in params}
        state = {n: delta.delta_state[n].detach().to("cpu", torch.float64) for n in params}
        return [grad, state], True
    if not isinstance(delta, Mapping):
        raise TypeError(f"delta must be the step Δθ as a dict shaped like params (e.g. θ_{{t+1}} − θ_t, or "
                        f"decomposition.delta_theta()) or an UpdateDecomposition; got {type(delta).__name__}.")
    missing = [n for n in params if n not in delta]
    extra = [n for n in delta if n not in params]
    if missing or extra:
        raise ValueError(f"delta must hold exactly the policy's {len(params)} LoRA tensors; missing {missing[:3]} "
                         f"({len(missing)}), extra {extra[:3]} ({len(extra)}). Build it from policy.params, e.g. "
                         "{n: new[n] - old[n] for n in old}.")
    out = {}
    for name, tensor in params.items():
        step = torch.as_tensor(delta[name])
        if tuple(step.shape) != tuple(tensor.shape):
            raise ValueError(f"delta['{name}'] has shape {tuple(step.shape)}; the parameter has "
                             f"{tuple(tensor.shape)}.")
        step = step.detach().to("cpu", torch.float64)
        if not torch.isfinite(step).all():
            raise ValueError(f"delta['{name}'] holds NaN or inf; the step must be finite.")
        out[name] = step
    return [out], False


@dataclass
class _Counts:
    forward_passes: int = 0
    backward_passes: int = 0


def _group_values(policy, params, group: RolloutBatch, seq_chunk: int, token_chunk: int,
                  counts: _Counts) -> tuple[Tensor, Tensor]:
    """ℓ and h at every response token of a prompt group, no grad: float64 [m, G, L] each (0 elsewhere)."""
    ell = torch.zeros(group.num_sequences, group.L, dtype=torch.float64)
    ent = torch.zeros_like(ell)
    with torch.no_grad():
        for chunk in group.iter_sequence_chunks(seq_chunk):
            values, entropies = policy._chunk_token_logprobs_entropies(params, chunk, token_chunk)
            counts.forward_passes += 1
            _scatter(chunk, values, ell)
            _scatter(chunk, entropies, ent)
    return ell.reshape(group.B, group.G, group.L), ent.reshape(group.B, group.G, group.L)


def _scatter(chunk: SequenceChunk, values: Tensor, target: Tensor) -> None:
    rows, cols = chunk.response_mask.cpu().nonzero(as_tuple=True)
    target[chunk.flat_index.cpu()[rows], cols + chunk.columns[0]] = values.detach().to("cpu", torch.float64)


def _gather(chunk: SequenceChunk, values: Tensor) -> Tensor:
    """The chunk's response tokens' entries of a [m·G, L] tensor, row-major: [T]."""
    rows, cols = chunk.response_mask.cpu().nonzero(as_tuple=True)
    return values[chunk.flat_index.cpu()[rows], cols + chunk.columns[0]]


def _group_dots(policy, params, group: RolloutBatch, integrand: str, directions, want_gradient: bool, *,
                seq_chunk: int, token_chunk: int, counts: _Counts, tap: bool, per_token: bool = False):
    """(D [m, J] per prompt and direction, Σ_rows ∇F_row (dict) or None, h [m, G, L], D^tok [m, J] or None,
    ℓ [m, G, L]) for one group of prompts. ``per_token``: D^tok from a second backward of the same forward (its own
    cotangents)."""
    G, m = group.G, group.B
    dots = torch.zeros(m, len(directions), dtype=torch.float64)
    dots_tok = torch.zeros(m, len(directions), dtype=torch.float64) if per_token else None
    gradient = None
    single = group.num_sequences <= seq_chunk
    entropies_tokens = logprobs_tokens = None
    cot_l = cot_h = tok_l = tok_h = None

    def cotangents(ell, ent):
        nonlocal cot_l, cot_h, tok_l, tok_h
        cot_l, cot_h = heldout_cotangents(ell, ent, group.response_mask, integrand)
        if per_token:
            tok_l, tok_h = heldout_cotangents(ell, ent, group.response_mask, integrand, per_token=True)

    if not single:  # a prompt's draws span chunks: its cotangents need every draw's values first
        ell, ent = _group_values(policy, params, group, seq_chunk, token_chunk, counts)
        cotangents(ell, ent)
        entropies_tokens, logprobs_tokens = ent, ell
    for chunk in group.iter_sequence_chunks(seq_chunk):
        prompt_of_row = (chunk.flat_index.cpu() // G)
        if tap:
            tapped = tapped_forward(policy, params, chunk, token_chunk, entropies=True)
            values, entropies = tapped.token_logprobs, tapped.token_entropies
        else:
            values_and_entropies, vjp_fn = torch.func.vjp(
                lambda p, c=chunk: policy._chunk_token_logprobs_entropies(p, c, token_chunk), dict(params))
            values, entropies = (v.detach() for v in values_and_entropies)
        counts.forward_passes += 1
        if single:
            ell = torch.zeros(group.num_sequences, group.L, dtype=torch.float64)
            ent = torch.zeros_like(ell)
            _scatter(chunk, values, ell)
            _scatter(chunk, entropies, ent)
            ell, ent = ell.reshape(m, G, group.L), ent.reshape(m, G, group.L)
            cotangents(ell, ent)
            entropies_tokens, logprobs_tokens = ent, ell
        token_cot_l = _gather(chunk, cot_l.reshape(-1, group.L))
        token_cot_h = _gather(chunk, cot_h.reshape(-1, group.L))
        if per_token:
            token_tok_l = _gather(chunk, tok_l.reshape(-1, group.L))
            token_tok_h = _gather(chunk, tok_h.reshape(-1, group.L))
        rows = chunk.num_sequences
        if tap:
            combine = torch.ones(1 if want_gradient else 0, rows, dtype=torch.float64)
            row_dots, combined = tapped.backward_dots(token_cot_l, directions, entropy_cotangent=token_cot_h,
                                                      combine=combine, retain_graph=per_token)
            counts.backward_passes += 1
            dots.index_add_(0, prompt_of_row, row_dots)
            if want_gradient:
                gradient = _accumulate(gradient, combined[0])
            if per_token:  # the same graph, the per-token surrogate's cotangents: a second backward, no forward
                row_dots, _ = tapped.backward_dots(token_tok_l, directions, entropy_cotangent=token_tok_h)
                counts.backward_passes += 1
                dots_tok.index_add_(0, prompt_of_row, row_dots)
            del tapped
        else:
            token_rows = chunk.response_mask.cpu().nonzero(as_tuple=True)[0]
            for p in prompt_of_row.unique().tolist():
                keep = (prompt_of_row[token_rows] == p).to(torch.float64)
                grads = vjp_fn((token_cot_l * keep, token_cot_h * keep))[0]
                counts.backward_passes += 1
                grads = {n: g.detach().to("cpu", torch.float64) for n, g in grads.items()}
                dots[p] += torch.tensor([_dot(grads, d) for d in directions], dtype=torch.float64)
                if want_gradient:
                    gradient = _accumulate(gradient, grads)
                if per_token:
                    grads = vjp_fn((token_tok_l * keep, token_tok_h * keep))[0]
                    counts.backward_passes += 1
                    grads = {n: g.detach().to("cpu", torch.float64) for n, g in grads.items()}
                    dots_tok[p] += torch.tensor([_dot(grads, d) for d in directions], dtype=torch.float64)
            del vjp_fn
    return dots, gradient, entropies_tokens, dots_tok, logprobs_tokens


def _accumulate(total: dict[str, Tensor] | None, grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
    if total is None:
        return {n: g.to("cpu", torch.float64).clone() for n, g in grads.items()}
    for n, g in grads.items():
        total[n] += g.to("cpu", torch.float64)
    return total


@dataclass(frozen=True)
class HeldoutPass:
    """One pass of spec §9's surrogate over E along J directions: what :func:`delta_h1_heldout` and attribution read.

    dots [B_E, J] float64: D_n along each direction; entropy_rows [B_E, 2]: (1/G) Σ_{g,k} m h and Σ m per prompt;
    gradient: ĝ_E (or None); route, forward_passes, backward_passes; B, G; dots_per_token [B_E, J]: D^tok_n, the
    first-order change of the entropy per token, when asked for (``per_token=True``), else None;
    sequence_values [B_E, G, 2]: per response (S, F) = (Σ_k m ℓ_k, Σ_k m h_k) at θ from the pass's own forward,
    when asked for (``sequence_values=True``), else None — the same numbers, bit for bit, as
    :func:`heldout_sequence_values` at that θ (same chunks, same arithmetic), so an importance-sampling change
    between θ and another θ′ can reuse this forward and pay only θ′'s; evaluation_fingerprint: E's
    (``RolloutBatch.fingerprint``), which :func:`heldout_result` passes on.
    """

    dots: Tensor
    entropy_rows: Tensor
    gradient: dict[str, Tensor] | None
    route: str
    forward_passes: int
    backward_passes: int
    B: int
    G: int
    dots_per_token: Tensor | None = None
    sequence_values: Tensor | None = None
    evaluation_fingerprint: str | None = None


def _prompt_groups(batch: RolloutBatch, world, seq_chunk: int) -> list[list[int]]:
    """This rank's prompts of E in the groups one held-out forward takes (whole prompts, ≤ seq_chunk sequences
    where G allows): the one grouping :func:`heldout_pass` and :func:`heldout_sequence_values` share."""
    mine = world.shard(batch.B)
    per_group = max(1, seq_chunk // batch.G)
    return [list(mine[i:i + per_group]) for i in range(0, len(mine), per_group)]


def _response_sums(token_values: Tensor, mask: Tensor) -> Tensor:
    """Σ_k m v over the response tokens of [m, G, L] values: [m, G] float64."""
    return (token_values * mask).sum(2)


def heldout_sequence_values(params: ParamsDict, eval_batch: Any, *, policy: Policy, seq_chunk: int | None = None,
                    token_chunk: int | None = None, world=None) -> tuple[Tensor, Tensor]:
    """(S, F) at θ = ``params`` on E: S_{n,g} = Σ_k m ℓ_k (the response's log-probability at the batch's temperature)
    and F_{n,g} = Σ_k m h_k (its summed next-token entropies), float64 [B_E, G] each on the CPU; no grad.

    Computed by the chunks and arithmetic of :func:`heldout_pass` (``sequence_values=True``), so the two agree bit
    for bit at equal θ: an importance-sampling change θ → θ′ built from one of each is exactly 0 at θ′ = θ, with no
    rounding difference between two code paths to swamp a small step (spec §6). ``world``: every rank passes the
    whole E and forwards its contiguous shard of prompts; the rows are gathered, so every rank gets the whole [B_E, G].
    Raises as :func:`heldout_pass`.
    """
    from .distributed import SINGLE, gather_rows, shard_counts

    world = SINGLE if world is None else world
    batch, seq_chunk, token_chunk = _prepare(params, eval_batch, policy, seq_chunk, token_chunk,
                                             "heldout_sequence_values")
    counts = _Counts()
    local = []
    for prompts in _prompt_groups(batch, world, seq_chunk):
        group = batch.select_prompts(prompts)
        ell, ent = _group_values(policy, params, group, seq_chunk, token_chunk, counts)
        mask = group.response_mask.to(torch.float64)
        local.append(torch.cat([_response_sums(ell, mask), _response_sums(ent, mask)], dim=1))
    G = batch.G
    mine = torch.cat(local) if local else torch.zeros(0, 2 * G, dtype=torch.float64)
    rows = gather_rows(world, mine, shard_counts(batch.B, world.size), "all_gather of the sequence values on E")
    return rows[:, :G].contiguous(), rows[:, G:].contiguous()


def _prepare(params: ParamsDict, eval_batch: Any, policy: Policy, seq_chunk: int | None, token_chunk: int | None,
             what: str) -> tuple[RolloutBatch, int, int]:
    """The checks every pass over E starts with: (E as a RolloutBatch, seq_chunk, token_chunk)."""
    if not isinstance(policy, Policy):
        raise TypeError(f"{what} needs policy=funcprobe.Policy(...) (load_checkpoint(path).policy); "
                        f"got {type(policy).__name__}.")
    batch = as_rollout_batch(eval_batch, "eval_batch (the evaluation batch E)")
    policy.check_params(params)
    policy._check_batch(batch)
    return (batch, *policy.chunk_sizes(seq_chunk, token_chunk))


def heldout_pass(params: ParamsDict, directions: Sequence[Mapping[str, Tensor]], eval_batch: Any, *, policy: Policy,
                 integrand: str = "rao_blackwell", seq_chunk: int | None = None, token_chunk: int | None = None,
                 entropy_gradient: bool = False, progress: bool | None = False, world=None,
                 per_token: bool = False, sequence_values: bool = False) -> HeldoutPass:
    """D_n(d_j) of spec §9 for every prompt n of E and every direction d_j (float64 CPU dicts shaped like θ), from
    one forward and one backward per chunk of whole prompts (module docstring); ĝ_E with ``entropy_gradient``;
    D^tok_n(d_j) too with ``per_token`` (a second backward per chunk); each response's (S, F) from the same forward
    with ``sequence_values`` (``HeldoutPass.sequence_values``). Arguments and errors as :func:`delta_h1_heldout`."""
    from .distributed import SINGLE, all_reduce_sum_, gather_rows, shard_counts

    world = SINGLE if world is None else world
    if integrand not in INTEGRANDS:
        raise ValueError(f"integrand must be one of {INTEGRANDS}; got {integrand!r}.")
    batch, seq_chunk, token_chunk = _prepare(params, eval_batch, policy, seq_chunk, token_chunk,
                                             "the held-out estimate")
    if batch.G < 2:
        raise ValueError(f"the held-out entropy gradient's baseline needs G ≥ 2 draws per prompt of E; got "
                         f"G={batch.G}. Draw more responses per evaluation prompt (--eval-G).")
    tap = unsupported_reason(policy) is None
    counts = _Counts()
    G = batch.G
    groups = _prompt_groups(batch, world, seq_chunk)
    rows_here = sum(len(prompts) for prompts in groups)
    local_dots = torch.zeros(rows_here, len(directions), dtype=torch.float64)
    local_entropy = torch.zeros(rows_here, 2, dtype=torch.float64)      # Σ_{g,k} m h / G and Σ m (tokens)
    local_tok = torch.zeros(rows_here, len(directions) if per_token else 0, dtype=torch.float64)
    local_seq = torch.zeros(rows_here, 2 * G if sequence_values else 0, dtype=torch.float64)   # S [G], F [G]
    gradient = None
    offset = 0
    for prompts in progress_bar(groups, total=len(groups), desc="δĤ₁(E)", enabled=progress):
        group = batch.select_prompts(prompts)
        dots, grads, entropies, dots_tok, logprobs = _group_dots(
            policy, params, group, integrand, directions, entropy_gradient, seq_chunk=seq_chunk,
            token_chunk=token_chunk, counts=counts, tap=tap, per_token=per_token)
        mask = group.response_mask.to(torch.float64)
        here = slice(offset, offset + len(prompts))
        local_dots[here] = dots
        if per_token:
            local_tok[here] = dots_tok
        if sequence_values:
            local_seq[here] = torch.cat([_response_sums(logprobs, mask), _response_sums(entropies, mask)], dim=1)
        local_entropy[here, 0] = (entropies * mask).sum((1, 2)) / G
        local_entropy[here, 1] = mask.sum((1, 2))
        offset += len(prompts)
        if entropy_gradient and grads is not None:
            gradient = _accumulate(gradient, grads)
    rows = gather_rows(world, torch.cat([local_dots, local_entropy, local_tok, local_seq], dim=1),
                       shard_counts(batch.B, world.size), "δĤ₁(E) all_gather of the per-prompt values")
    if entropy_gradient:
        gradient = gradient if gradient is not None else {n: torch.zeros(t.shape, dtype=torch.float64)
                                                          for n, t in params.items()}
        all_reduce_sum_(world, gradient, "δĤ₁(E) all_reduce of ĝ_E")
        gradient = {n: g / batch.B for n, g in gradient.items()}
    route = "reverse mode, per-layer LoRA taps" if tap else "reverse mode, one vjp per prompt"
    J = len(directions)
    return HeldoutPass(dots=rows[:, :J], entropy_rows=rows[:, J:J + 2], gradient=gradient,
                       route=route, forward_passes=counts.forward_passes, backward_passes=counts.backward_passes,
                       B=batch.B, G=G, dots_per_token=rows[:, J + 2:2 * J + 2] if per_token else None,
                       sequence_values=(rows[:, rows.shape[1] - 2 * G:].reshape(batch.B, 2, G).transpose(1, 2)
                                        .contiguous() if sequence_values else None),
                       evaluation_fingerprint=batch.fingerprint)


def heldout_result(result: HeldoutPass, columns: Sequence[int], *, decomposed: bool, integrand: str,
                   timings: dict[str, float] | None = None,
                   evaluation_fingerprint: str | None = None) -> HeldoutResult:
    """The :class:`HeldoutResult` of the step whose directions are ``columns`` of ``result.dots``: one column (a
    plain Δθ) or two (its gradient and state parts, ``decomposed``). ``evaluation_fingerprint``: the fingerprint of
    the batch the pass ran on; default the one the pass recorded (``HeldoutPass.evaluation_fingerprint``)."""
    dots = result.dots[:, list(columns)]
    per_prompt = dots.sum(1)
    value, se = _mean_se(per_prompt)
    terms: dict[str, Any] = dict(grad_term=None, se_grad=None, per_prompt_grad=None, state_term=None, se_state=None,
                                 per_prompt_state=None)
    if decomposed:
        for index, name in ((0, "grad"), (1, "state")):
            mean, term_se = _mean_se(dots[:, index])
            terms[f"{name}_term"], terms[f"se_{name}"] = mean, term_se
            terms[f"per_prompt_{name}"] = tuple(float(x) for x in dots[:, index])
    entropy, entropy_se = _mean_se(result.entropy_rows[:, 0])
    tokens = float(result.entropy_rows[:, 1].sum())
    per_token = float((result.entropy_rows[:, 0] * result.G).sum()) / tokens if tokens else math.nan
    if result.dots_per_token is not None:
        tok = result.dots_per_token[:, list(columns)].sum(1)
        terms["deltaH1_per_token"], terms["se_per_token"] = _mean_se(tok)
        terms["per_prompt_per_token"] = tuple(float(x) for x in tok)
    return HeldoutResult(
        deltaH1=value, se=se, per_prompt=tuple(float(x) for x in per_prompt), integrand=integrand, **terms,
        entropy=entropy, entropy_se=entropy_se, entropy_per_token=per_token, B=result.B, G=result.G,
        route=result.route, forward_passes=result.forward_passes, backward_passes=result.backward_passes,
        timings=dict(timings or {}), gradient=result.gradient,
        evaluation_fingerprint=evaluation_fingerprint or result.evaluation_fingerprint)


def step_directions(delta: Any, params: ParamsDict) -> tuple[list[dict[str, Tensor]], bool]:
    """The directions of a step for :func:`heldout_pass`: [Δθ] for a dict shaped like params, [η_g P⊙Ȳ, Δθ_state]
    for an ``UpdateDecomposition`` (then ``True``). Raises TypeError / ValueError for a wrong or non-finite step."""
    return _directions(delta, params)


def delta_h1_heldout(params: ParamsDict, delta: Mapping[str, Tensor] | UpdateDecomposition, eval_batch: Any, *,
                     policy: Policy, integrand: str = "rao_blackwell", seq_chunk: int | None = None,
                     token_chunk: int | None = None, entropy_gradient: bool = False, progress: bool | None = False,
                     world=None, per_token: bool = False) -> HeldoutResult:
    """δĤ₁(E) = (1/B_E) Σ_n D_n(Δθ) of spec §9 at θ = ``params`` along the step ``delta``, on the evaluation batch.

    params: θ (the policy's LoRA tensors). delta: the step Δθ — any dict shaped like params (funcprobe's AdamW step
    ``decomposition.delta_theta()``, or θ_{t+1} − θ_t of a real run) — or an ``UpdateDecomposition`` (then the
    gradient and state terms are reported too). eval_batch: E, a ``RolloutBatch`` (or the ``SampledBatch`` holding
    it) of responses drawn from π_θ independently of the samples that built the step; G ≥ 2 draws per prompt.
    integrand: "rao_blackwell" (default) or "sequence" (spec §2's form, for comparison).
    seq_chunk: sequences per forward (default the policy's; whole prompts per forward when G ≤ seq_chunk, else a
    prompt's values from a no-grad forward first). entropy_gradient: also return ĝ_E (``result.gradient``).
    per_token: also the first-order change of the entropy per token (``deltaH1_per_token``, ``se_per_token``,
    ``per_prompt_per_token``; module docstring), from a second backward of each chunk's forward.
    world: a ``funcprobe.distributed.World``: every rank passes the whole E and computes its contiguous shard of
    prompts; the D_n are gathered (and ĝ_E all-reduced), so every estimate equals the single-process one.
    Units: nats per response. Memory O(chunk): no parameter-sized tensor per sequence.
    Pure: nothing passed in is modified.

    Raises TypeError for a wrong kind of input (delta, eval_batch, policy), ValueError for a mismatched or
    non-finite step, an unknown integrand, G < 2, or a batch the policy refuses (another temperature or tokenizer).
    """
    started = time.perf_counter()
    if not isinstance(policy, Policy):
        raise TypeError(f"delta_h1_heldout needs policy=funcprobe.Policy(...) (load_checkpoint(path).policy); got "
                        f"{type(policy).__name__}.")
    policy.check_params(params)
    directions, decomposed = _directions(delta, params)
    result = heldout_pass(params, directions, eval_batch, policy=policy, integrand=integrand, seq_chunk=seq_chunk,
                          token_chunk=token_chunk, entropy_gradient=entropy_gradient, progress=progress,
                          world=world, per_token=per_token)
    return heldout_result(result, range(len(directions)), decomposed=decomposed, integrand=integrand,
                          timings={"total_s": time.perf_counter() - started})


# ------------------------------------------------------------------------------------------- paired with ΔĤ
@dataclass(frozen=True)
class PairedDifference:
    """ΔĤ − δĤ₁(E) on the same evaluation prompts and draws (spec §9), nats per response (per token when both are
    per token: ``per_token``). JSON via ``to_dict()``.

    difference = (1/B_E) Σ_n (ΔĤ_n − D_n); se = sd_n(ΔĤ_n − D_n)/√B_E; z = difference/se; first_order: |z| <
    ``FIRST_ORDER_Z`` (the step is in its first-order regime), None when there is no verdict (B_E < 2, or the realised
    estimate is unreliable); verdict: the plain sentence. realised, predicted: the
    two means beside it; scale: η/lr when the prediction was scaled to another step size (the sweep); method: the
    realised estimator; realised_reliable: its own verdict (an unreliable ΔĤ makes the comparison unreliable too).
    evaluation_fingerprint: the fingerprint of the evaluation batch both were computed on (None when neither
    recorded one).
    """

    difference: float
    se: float
    z: float
    first_order: bool | None
    verdict: str
    realised: float
    predicted: float
    scale: float
    method: str
    realised_reliable: bool
    per_token: bool = False
    evaluation_fingerprint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def paired_difference(realised: Any, heldout: HeldoutResult, *, scale: float = 1.0,
                      threshold: float = FIRST_ORDER_Z) -> PairedDifference:
    """ΔĤ − scale·δĤ₁(E) with the paired SE sd_n(ΔĤ_n − scale·D_n)/√B_E (spec §9).

    realised: an ``SNISResult`` or ``CRNResult`` (per-prompt ``deltaH_per_prompt``) on the SAME evaluation batch as
    ``heldout``. Per sequence, or per token (``realised.per_token``) against ``heldout``'s per-token values
    (``delta_h1_heldout(..., per_token=True)``): then ΔĤ^tok_n − D^tok_n, nats per token. Raises ValueError when the
    two do not share E's shape or units, or when both record the fingerprint of their evaluation batch
    (``evaluation_fingerprint``, ``funcprobe.batch.batch_fingerprint``: E's token ids, masks, B, G and τ) and the
    two differ — two batches of one shape with other samples, whose per-prompt difference means nothing; the
    message names both fingerprints. A result without one (None: built by hand) is paired unchecked.
    """
    per_prompt = getattr(realised, "deltaH_per_prompt", None)
    if per_prompt is None or not isinstance(heldout, HeldoutResult):
        raise TypeError("paired_difference needs a realised result (snis_delta_h / crn_delta_h) and a HeldoutResult "
                        "(delta_h1_heldout) on the same evaluation batch.")
    per_token = bool(getattr(realised, "per_token", False))
    if per_token and heldout.per_prompt_per_token is None:
        raise ValueError("the realised change is per token but δĤ₁(E) is per response: compute δĤ₁(E) per token too "
                         "(delta_h1_heldout(..., per_token=True)), or ΔĤ per sequence (per_token=False), to pair them.")
    if (realised.B, realised.G) != (heldout.B, heldout.G):
        raise ValueError(f"the realised change was measured on a {realised.B}×{realised.G} batch and δĤ₁(E) on a "
                         f"{heldout.B}×{heldout.G} one: pair estimates of the same evaluation batch.")
    realised_fingerprint = getattr(realised, "evaluation_fingerprint", None)
    check_same_evaluation(realised_fingerprint, heldout.evaluation_fingerprint,
                          f"the realised change ({getattr(realised, 'method', type(realised).__name__)})", "δĤ₁(E)",
                          "pass the batch (or SampledBatch) the realised change was measured on to delta_h1_heldout, "
                          "or measure the realised change on the batch δĤ₁(E) was computed on")
    first = heldout.per_prompt_per_token if per_token else heldout.per_prompt
    diff = torch.tensor([float(x) for x in per_prompt], dtype=torch.float64) - scale * torch.tensor(
        first, dtype=torch.float64)
    difference, se = _mean_se(diff)
    z = difference / se if se > 0 else (0.0 if difference == 0 else math.nan)
    reliable = bool(getattr(realised, "reliable", True))
    gap = f"ΔĤ − δĤ₁(E) = {fmt(difference, '.4g')} ± {fmt(se, '.3g')} (z = {z:+.1f})"
    if not math.isfinite(z):
        first_order, verdict = None, "no verdict: the paired SE needs B_E ≥ 2 prompts"
    elif not reliable:
        # An unreliable ΔĤ (heavy-tailed weights, too few effective draws) can sit on the line or off it by luck:
        # neither verdict is earned.
        reason = getattr(realised, "reason", "") or "its diagnostics flag it"
        first_order, verdict = None, (f"no verdict: the realised estimate is unreliable ({reason}); {gap} is "
                                      "not evidence either way")
    else:
        first_order = abs(z) < threshold
        verdict = (f"the step is in its first-order regime: {gap}" if first_order else
                   f"the step is beyond its first-order regime: {gap}; the realised change departs from ∇H·Δθ")
    return PairedDifference(difference=difference, se=se, z=z, first_order=first_order, verdict=verdict,
                            realised=float(realised.deltaH),
                            predicted=scale * (heldout.deltaH1_per_token if per_token else heldout.deltaH1),
                            scale=float(scale),
                            method=getattr(realised, "method", type(realised).__name__), realised_reliable=reliable,
                            per_token=per_token,
                            evaluation_fingerprint=realised_fingerprint or heldout.evaluation_fingerprint)
