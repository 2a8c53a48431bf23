"""The chunked vocabulary projection: token log-probabilities and entropies without [g, L, V] tensors.

Spec §1 (`shared/spec/ESTIMATORS.md`): for a response token t_k predicted from the final hidden state h_{k-1},

    log π_θ(t_k | t_<k) = z[t_k] − logsumexp(z),      z = (W h_{k-1} + b) / τ,

where W [V, H] (and the optional bias b [V]) is the frozen LM head and τ the sampling temperature.

The logits of all response positions together would be a [T, V] tensor (T response tokens, V up to 151,936); with
gradients, autograd would keep it and its log-softmax alive until the backward. Here the projection is applied to
``token_chunk`` rows at a time, so the largest temporary is [token_chunk, V] in both directions:

* the forward keeps the T log-probabilities and, per row, the score direction

      D_t = ∂ log π(t_k) / ∂ h = (W[t_k] − Σ_v p_v W[v]) / τ = ((onehot(t_k) − p) @ W) / τ,

  contracted from each chunk's softmax while that chunk is in memory ([T, H], the size of the hidden states);
* the backward (``ChunkedTokenLogprob.backward``) is then grad_h = cotangent · D in plain tensor ops, so it runs
  under ``torch.func.grad`` / ``torch.func.vjp`` (activation checkpointing does not: its saved-tensor hooks are
  unsupported there), and a second vjp of the same forward costs no vocabulary work;
* the forward-mode rule (``ChunkedTokenLogprob.jvp``) is dh · D, so ``torch.func.jvp`` through S works too.

The LM head is frozen: no gradient is returned for W or b (LoRA on the LM head is refused by ``Policy``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ChunkedTokenLogprob", "ChunkedTokenLogprobEntropy", "token_logprobs_with_entropies", "chunk_logits", "token_logprobs", "token_entropies", "token_logprobs_and_entropies",
           "naive_token_logprobs"]


def chunk_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, inv_temperature: float,
                  logsoftmax_dtype: torch.dtype) -> Tensor:
    """z = (hidden @ weight.T + bias) / τ for one row chunk: [c, H] × [V, H] → [c, V] in ``logsoftmax_dtype``.

    The matmul runs in the model's dtype (the dtype a GPU user computes in); the result is upcast before dividing
    by τ and before the log-softmax so that the normaliser is taken in at least float32 (spec §1).
    """
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logits = logits.to(logsoftmax_dtype)
    if inv_temperature != 1.0:
        logits = logits * inv_temperature
    return logits


class ChunkedTokenLogprob(torch.autograd.Function):
    """log π(target | hidden) for T rows, projected to the vocabulary ``token_chunk`` rows at a time.

    Inputs: hidden [T, H] (differentiable), weight [V, H] and bias [V] | None (frozen), targets int64 [T],
    inv_temperature = 1/τ, token_chunk ≥ 1, logsoftmax_dtype (float32 or float64).
    Outputs: log-probabilities float64 [T], and the score directions D [T, H] (non-differentiable) with

        D_t = ∂ log π(t_k | h) / ∂ h = (W[t_k] − Σ_v p_v W[v]) / τ.

    D is formed chunk by chunk in the forward (the chunk's softmax contracted with W) and saved, so the backward is
    a row scaling, grad_h = cotangent[:, None] · D, with no vocabulary work at all: several vjps of one forward
    (X and Y of spec §3) pay for the [token_chunk, V] projection once. D has the shape of the hidden states it
    replaces in the saved tensors, so memory is unchanged: O(token_chunk × V) transient, O(T × H) saved.
    First-order only: D is saved as a constant, so the rule does not support differentiating the backward again.
    """

    @staticmethod
    def forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, inv_temperature: float,
                token_chunk: int, logsoftmax_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        direction_dtype = torch.promote_types(hidden.dtype, logsoftmax_dtype)
        logprob_pieces, direction_pieces = [], []
        for start in range(0, hidden.shape[0], token_chunk):
            stop = start + token_chunk
            row_targets = targets[start:stop]
            # One [c, V] block alive at a time: the softmax is formed in place in the logits' storage.
            logits = chunk_logits(hidden[start:stop], weight, bias, inv_temperature, logsoftmax_dtype)
            picked = logits.gather(1, row_targets[:, None]).squeeze(1)
            maxima = logits.amax(dim=1, keepdim=True)
            probs = logits.sub_(maxima).exp_()
            totals = probs.sum(dim=1, keepdim=True)
            logprob_pieces.append((picked - (maxima + totals.log()).squeeze(1)).to(torch.float64))
            probs.div_(totals)
            expected_row = (probs.to(weight.dtype) @ weight).to(direction_dtype)
            del logits, probs
            direction = (weight[row_targets].to(direction_dtype) - expected_row) * inv_temperature
            direction_pieces.append(direction)
        return (_concat_rows(logprob_pieces, hidden, torch.float64),
                _concat_rows(direction_pieces, hidden, direction_dtype, hidden.shape[1]))

    @staticmethod
    def setup_context(ctx, inputs, output):
        hidden = inputs[0]
        _, direction = output
        ctx.mark_non_differentiable(direction)
        ctx.save_for_backward(direction)
        ctx.save_for_forward(direction)
        ctx.hidden_dtype = hidden.dtype

    @staticmethod
    def backward(ctx, grad_logprob: Tensor, grad_direction: Tensor | None):
        grad_hidden = None
        if ctx.needs_input_grad[0]:
            (direction,) = ctx.saved_tensors
            grad_hidden = (grad_logprob[:, None].to(direction.dtype) * direction).to(ctx.hidden_dtype)
        return grad_hidden, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, hidden_tangent, *_):
        # The LM head is frozen by contract (Policy refuses LoRA on it), so weight/bias tangents, which torch.func
        # may pass as zero tensors, are not part of the rule.
        (direction,) = ctx.saved_tensors
        if hidden_tangent is None:
            logprob_tangent = torch.zeros(direction.shape[0], dtype=torch.float64, device=direction.device)
        else:
            logprob_tangent = (hidden_tangent.to(direction.dtype) * direction).sum(1).to(torch.float64)
        return logprob_tangent, None


class ChunkedTokenLogprobEntropy(torch.autograd.Function):
    """(log π(target | hidden), H(π(· | hidden))) for T rows, both differentiable in ``hidden``: spec §9's ℓ and h.

    Inputs as :class:`ChunkedTokenLogprob`. Outputs: log-probabilities float64 [T], next-token entropies float64 [T],
    and the two row directions (non-differentiable) [T, H]:

        D_t = ∂ℓ_t / ∂h_t = (W[t_k] − Σ_v p_v W[v]) / τ,
        E_t = ∂H_t / ∂h_t = −(1/τ) Σ_v p_v (log p_v + H_t) W[v]        (dH/dz_v = −p_v (log p_v + H), z = W h / τ).

    Both are contracted from each chunk's softmax while it is in memory, so the backward is
    grad_h = g_ℓ · D + g_H · E and the forward-mode rule (dℓ, dH) = (dh·D, dh·E): no vocabulary work after the
    forward, under ``torch.func`` too. Two [token_chunk, V] blocks alive in the forward; O(T × H) saved per direction.
    H is computed as in ``_chunked_values`` (log Σe − Σ e(z − m)/Σe), so it equals the no-grad entropies bit for bit.
    """

    @staticmethod
    def forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, inv_temperature: float,
                token_chunk: int, logsoftmax_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        direction_dtype = torch.promote_types(hidden.dtype, logsoftmax_dtype)
        logprob_pieces, entropy_pieces, score_pieces, entropy_direction_pieces = [], [], [], []
        for start in range(0, hidden.shape[0], token_chunk):
            stop = start + token_chunk
            row_targets = targets[start:stop]
            shifted = chunk_logits(hidden[start:stop], weight, bias, inv_temperature, logsoftmax_dtype)
            maxima = shifted.amax(dim=1, keepdim=True)
            picked = shifted.gather(1, row_targets[:, None])
            shifted.sub_(maxima)
            probs = shifted.exp()
            totals = probs.sum(dim=1, keepdim=True)
            log_totals = totals.log()
            logprob_pieces.append((picked - (maxima + log_totals)).squeeze(1).to(torch.float64))
            entropy = log_totals - (probs * shifted).sum(dim=1, keepdim=True) / totals
            entropy_pieces.append(entropy.squeeze(1).to(torch.float64))
            probs.div_(totals)
            expected_row = (probs.to(weight.dtype) @ weight).to(direction_dtype)
            score_pieces.append((weight[row_targets].to(direction_dtype) - expected_row) * inv_temperature)
            # p ⊙ (log p + H), in the logits' storage: log p = (z − m) − log Σe.
            weighted = shifted.sub_(log_totals - entropy).mul_(probs)
            del probs
            entropy_direction_pieces.append(-(weighted.to(weight.dtype) @ weight).to(direction_dtype)
                                            * inv_temperature)
            del shifted, weighted
        width = hidden.shape[1]
        return (_concat_rows(logprob_pieces, hidden, torch.float64),
                _concat_rows(entropy_pieces, hidden, torch.float64),
                _concat_rows(score_pieces, hidden, direction_dtype, width),
                _concat_rows(entropy_direction_pieces, hidden, direction_dtype, width))

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, _, score, entropy_direction = output
        ctx.mark_non_differentiable(score, entropy_direction)
        ctx.save_for_backward(score, entropy_direction)
        ctx.save_for_forward(score, entropy_direction)
        ctx.hidden_dtype = inputs[0].dtype

    @staticmethod
    def backward(ctx, grad_logprob: Tensor, grad_entropy: Tensor, *_):
        grad_hidden = None
        if ctx.needs_input_grad[0]:
            score, entropy_direction = ctx.saved_tensors
            grad_hidden = (grad_logprob[:, None].to(score.dtype) * score
                           + grad_entropy[:, None].to(score.dtype) * entropy_direction).to(ctx.hidden_dtype)
        return grad_hidden, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, hidden_tangent, *_):
        score, entropy_direction = ctx.saved_tensors
        if hidden_tangent is None:
            zero = torch.zeros(score.shape[0], dtype=torch.float64, device=score.device)
            return zero, zero.clone(), None, None
        tangent = hidden_tangent.to(score.dtype)
        return ((tangent * score).sum(1).to(torch.float64), (tangent * entropy_direction).sum(1).to(torch.float64),
                None, None)


def token_logprobs_with_entropies(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, *,
                                  temperature: float = 1.0, token_chunk: int = 256,
                                  logsoftmax_dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """(ℓ, H) per row, float64 [T] each, both differentiable in ``hidden`` (reverse and forward mode): the per-token
    log-probabilities and next-token entropies of spec §9's held-out entropy gradient. Memory O(token_chunk × V)
    transient; under ``torch.no_grad`` it is :func:`token_logprobs_and_entropies`."""
    _check_projection_args(hidden, weight, targets, temperature, token_chunk, logsoftmax_dtype)
    if not torch.is_grad_enabled():
        return _chunked_values(hidden, weight, bias, targets, 1.0 / temperature, int(token_chunk), logsoftmax_dtype,
                               entropies=True)
    logprobs, entropies, _, _ = ChunkedTokenLogprobEntropy.apply(hidden, weight, bias, targets, 1.0 / temperature,
                                                                 int(token_chunk), logsoftmax_dtype)
    return logprobs, entropies


def token_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, *,
                   temperature: float = 1.0, token_chunk: int = 256,
                   logsoftmax_dtype: torch.dtype = torch.float32) -> Tensor:
    """log π(targets[i] | hidden[i]) for each row, float64 [T]; differentiable in ``hidden`` only.

    hidden [T, H] final hidden states (after the model's final norm), weight [V, H], bias [V] or None,
    targets int64 [T]. Memory O(token_chunk × V) forward and backward.
    """
    _check_projection_args(hidden, weight, targets, temperature, token_chunk, logsoftmax_dtype)
    if not torch.is_grad_enabled():
        # No gradient will be asked for: skip the score directions (a second [c, V] × [V, H] product per chunk).
        return _logprobs_without_directions(hidden, weight, bias, targets, 1.0 / temperature, int(token_chunk),
                                            logsoftmax_dtype)
    logprobs, _ = ChunkedTokenLogprob.apply(hidden, weight, bias, targets, 1.0 / temperature, int(token_chunk),
                                            logsoftmax_dtype)
    return logprobs


def _logprobs_without_directions(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                                 inv_temperature: float, token_chunk: int, logsoftmax_dtype: torch.dtype) -> Tensor:
    """z[y] − logsumexp(z) per row, chunk by chunk, for the no-grad path: float64 [T]."""
    logprobs, _ = _chunked_values(hidden, weight, bias, targets, inv_temperature, token_chunk, logsoftmax_dtype,
                                  entropies=False)
    return logprobs


def _chunked_values(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor | None,
                    inv_temperature: float, token_chunk: int, logsoftmax_dtype: torch.dtype,
                    entropies: bool) -> tuple[Tensor | None, Tensor | None]:
    """(log π(target) [T] or None when ``targets`` is None, entropy H [T] or None): float64, one [c, V] projection per
    row chunk for both (no grad).

    The arithmetic is the same whether one or both are asked for (and is that of ``ChunkedTokenLogprob.forward``):
    with m = max z and e = exp(z − m) formed in place, log π(t) = z[t] − (m + log Σe) and
    H = log Σe − Σ e·(z − m) / Σe — so S from a fused pass equals S from a log-prob pass bit for bit.
    """
    logprob_pieces, entropy_pieces = [], []
    for start in range(0, hidden.shape[0], token_chunk):
        stop = start + token_chunk
        shifted = chunk_logits(hidden[start:stop], weight, bias, inv_temperature, logsoftmax_dtype)
        maxima = shifted.amax(dim=1, keepdim=True)
        picked = None if targets is None else shifted.gather(1, targets[start:stop, None])
        shifted.sub_(maxima)
        unnormalised = shifted.exp()
        totals = unnormalised.sum(dim=1, keepdim=True)
        log_totals = totals.log()
        if picked is not None:
            logprob_pieces.append((picked - (maxima + log_totals)).squeeze(1).to(torch.float64))
        if entropies:
            weighted = unnormalised.mul_(shifted).sum(dim=1, keepdim=True)
            entropy_pieces.append((log_totals - weighted / totals).squeeze(1).to(torch.float64))
        del shifted, unnormalised
    return (None if targets is None else _concat_rows(logprob_pieces, hidden, torch.float64),
            _concat_rows(entropy_pieces, hidden, torch.float64) if entropies else None)


@torch.no_grad()
def token_entropies(hidden: Tensor, weight: Tensor, bias: Tensor | None, *, temperature: float = 1.0,
                    token_chunk: int = 256, logsoftmax_dtype: torch.dtype = torch.float32) -> Tensor:
    """Full next-token entropy H(π(· | hidden[i])) = logsumexp(z) − Σ_v p_v z_v for each row, float64 [T].

    Used by the Rao-Blackwell estimator (spec §6). Forward only, in the same row chunks as ``token_logprobs``.
    In place: H = log Σ e^{z−m} − Σ e^{z−m}(z−m) / Σ e^{z−m}, with two [c, V] blocks alive.
    """
    _check_projection_args(hidden, weight, None, temperature, token_chunk, logsoftmax_dtype)
    _, entropies = _chunked_values(hidden, weight, bias, None, 1.0 / temperature, int(token_chunk),
                                   logsoftmax_dtype, entropies=True)
    return entropies


@torch.no_grad()
def token_logprobs_and_entropies(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, *,
                                 temperature: float = 1.0, token_chunk: int = 256,
                                 logsoftmax_dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """(log π(targets[i] | hidden[i]), H(π(· | hidden[i]))) per row, float64 [T] each, from one vocabulary projection
    per row chunk (no grad): what the Rao-Blackwell SNIS estimator needs at one θ (spec §6). Each equals the separate
    ``token_logprobs`` (no-grad) and ``token_entropies`` bit for bit."""
    _check_projection_args(hidden, weight, targets, temperature, token_chunk, logsoftmax_dtype)
    return _chunked_values(hidden, weight, bias, targets, 1.0 / temperature, int(token_chunk), logsoftmax_dtype,
                           entropies=True)


def naive_token_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, *,
                         temperature: float = 1.0, logsoftmax_dtype: torch.dtype = torch.float32) -> Tensor:
    """Reference: full log_softmax over the full [T, V] logits, then gather. For tests and benchmarks only."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    log_probs = torch.log_softmax(logits.to(logsoftmax_dtype) / temperature, dim=-1)
    return log_probs.gather(-1, targets[..., None]).squeeze(-1).to(torch.float64)


def _concat_rows(pieces: list[Tensor], like: Tensor, dtype: torch.dtype, *trailing: int) -> Tensor:
    """Concatenate per-chunk results; an empty list (T = 0 response tokens) gives an empty [0, *trailing]."""
    if not pieces:
        return torch.zeros((0, *trailing), dtype=dtype, device=like.device)
    return torch.cat(pieces)


def _check_projection_args(hidden: Tensor, weight: Tensor, targets: Tensor | None, temperature: float,
                           token_chunk: int, logsoftmax_dtype: torch.dtype) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [T, H] and weight [V, H]; got hidden {tuple(hidden.shape)} and weight "
                         f"{tuple(weight.shape)}.")
    if targets is not None and targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [T] = [{hidden.shape[0]}]; got {tuple(targets.shape)}.")
    if not (temperature > 0):
        raise ValueError(f"temperature must be > 0; got {temperature}.")
    if int(token_chunk) < 1:
        raise ValueError(f"token_chunk must be a positive integer; got {token_chunk}.")
    if logsoftmax_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"logsoftmax_dtype must be torch.float32 or torch.float64; got {logsoftmax_dtype}. "
                         "Lower precision drowns small entropy changes in rounding.")
