"""Gradients of many groups of sequences from one batched backward: per-layer outer products of a LoRA policy.

Spec §2–§3 need, for every unit u, two LoRA-sized vectors X_u and Y_u, each a weighted sum of per-sequence (or
per-token) gradients. A vjp gives one weighted sum per backward; this module gives any number of them from one.

For a plain LoRA layer (PEFT ``lora.Linear``: no DoRA or other variant, no LoRA bias)

    y = W x + s · B a,      a = A x  [r],      b = B a  [out]  (b before the scaling s),

and a scalar F of the layer's outputs at every position t, with g_t = ∂F/∂b_t (so ∂F/∂a_t = Bᵀ g_t):

    ∂F/∂B = Σ_t g_t ⊗ a_t,        ∂F/∂A = Σ_t (Bᵀ g_t) ⊗ x_t.

The sequences of one forward do not interact (each row attends to itself only), so for F = Σ_i F_i with F_i a
function of sequence i alone, the rows of g at sequence i are ∂F_i/∂b: the per-sequence gradients ∇F_i are the
per-row sums above, and every combination Σ_i M[j, i] ∇F_i is M @ (per-row sums). One forward and one backward of a
chunk of sequences (``F = Σ_t c_t ℓ_t`` with ℓ the response tokens' log-probabilities) therefore give the X and Y
of every unit in the chunk, where a vjp per unit and per vector would need 2·(units) backwards.

How it runs: forward hooks on every LoRA ``lora_A``/``lora_B`` linear keep x, a and B of each call and put a tensor
hook on b; the backward is ``torch.autograd.grad`` of the chunk's Σ c_t ℓ_t with respect to the B tensors (made
leaves that require grad for the forward, so autograd records the graph; the frozen base needs no gradient), and each
b hook turns its g into the per-row sums (two batched matmuls, float in the model's dtype, as a backward computes
a weight gradient) and contracts them with M in float64. The results go to the CPU layer by layer (float64), so
nothing parameter-sized stays on the accelerator. The extra work is r·(in + out) multiply-adds per token and LoRA
layer, ~1% of the decoder's backward at r = 8 on SmolLM2-135M.

Exactly equal, up to rounding, to the vjp of ``Policy.iter_logprob_vjps`` with cotangent c_t·M[j, row(t)] for each j:
both compute ∂/∂A and ∂/∂B of the same function (tests/test_delta_h1.py checks float64 agreement to 1e-10).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .batch import SequenceChunk

__all__ = ["unsupported_reason", "TappedChunk", "tapped_forward", "row_direction_jvp"]


@dataclass(frozen=True)
class _Layer:
    parent: nn.Module
    lora_A: nn.Module
    lora_B: nn.Module
    name_A: str
    name_B: str


def _layers(policy) -> tuple[list[_Layer], str | None]:
    """The policy's LoRA layers as (A, B) pairs, or the reason they cannot be tapped."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # pragma: no cover - peft is a dependency
        return [], "peft's lora.Linear is not importable"
    module = policy.module
    adapter = module.active_adapter
    names = set(policy.param_names)
    layers = []
    for name in policy.param_names:
        suffix_A = f".lora_A.{adapter}.weight"
        if name.endswith(suffix_A):
            prefix = name[: -len(suffix_A)]
            name_B = f"{prefix}.lora_B.{adapter}.weight"
            if name_B not in names:
                return [], f"{name} has no lora_B partner"
            parent = module.get_submodule(prefix)
            if type(parent) is not LoraLinear:
                return [], f"{prefix} is a {type(parent).__name__}, not a plain LoRA Linear"
            if adapter in getattr(parent, "lora_variant", {}) or getattr(parent, "use_dora", {}).get(adapter, False):
                return [], f"{prefix} uses a LoRA variant (e.g. DoRA)"
            lora_A, lora_B = parent.lora_A[adapter], parent.lora_B[adapter]
            if type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear or lora_A.bias is not None \
                    or lora_B.bias is not None:
                return [], f"{prefix}'s lora_A/lora_B are not bias-free nn.Linear layers"
            layers.append(_Layer(parent, lora_A, lora_B, name, name_B))
        elif not name.endswith(f".lora_B.{adapter}.weight"):
            return [], f"{name} is not a lora_A/lora_B weight"
    if 2 * len(layers) != len(names):
        return [], "the LoRA tensors do not pair up as lora_A/lora_B"
    return layers, None


def unsupported_reason(policy) -> str | None:
    """None when every LoRA tensor of the policy belongs to a plain LoRA Linear (so :func:`tapped_forward` applies),
    else why not (DoRA, embedding LoRA, LoRA bias, …: callers then take one vjp per vector)."""
    cached = getattr(policy, "_tap_reason", False)
    if cached is False:
        cached = _layers(policy)[1]
        try:
            policy._tap_reason = cached
        except AttributeError:  # pragma: no cover
            pass
    return cached


class _LoraHooks:
    """Forward hooks on every LoRA layer: lora_A's input x is kept for lora_B's hook (:meth:`_on_B`, per subclass)."""

    def __init__(self, layers: list[_Layer]):
        self.layers = layers
        self._x: dict[int, Tensor] = {}

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        handles = []
        try:
            for index, layer in enumerate(self.layers):
                handles.append(layer.lora_A.register_forward_hook(self._on_A(index)))
                handles.append(layer.lora_B.register_forward_hook(self._on_B(index)))
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._x.clear()

    def _on_A(self, index: int):
        def hook(module, inputs, output):
            self._x[index] = inputs[0]
        return hook

    def _on_B(self, index: int):  # pragma: no cover - abstract
        raise NotImplementedError


class _Taps(_LoraHooks):
    """Forward hooks that record each LoRA call and hook its b; ``combine`` and ``out`` are set per backward."""

    def __init__(self, layers: list[_Layer], rows: int):
        super().__init__(layers)
        self.rows = rows
        self.combine: Tensor | None = None
        self.out: dict[str, Tensor] = {}
        # Directional mode: per layer index, {name: [J, numel] float64 on the device}; ``dots`` [rows, J] accumulates
        # each row's gradient dotted with every direction, so no parameter-sized vector per row leaves the layer.
        self.directions: dict[str, Tensor] | None = None
        self.dots: Tensor | None = None

    def _on_B(self, index: int):
        def hook(module, inputs, output):
            x = self._x.pop(index, None)
            if x is None or not output.requires_grad:
                raise RuntimeError(f"LoRA layer {self.layers[index].name_B}: lora_B ran without its lora_A input or "
                                   "outside the recorded graph; the per-layer taps cannot follow this model.")
            a, weight_B = inputs[0], module.weight
            output.register_hook(lambda grad: self._on_grad(index, x, a, weight_B, grad))
        return hook

    def _on_grad(self, index: int, x: Tensor, a: Tensor, weight_B: Tensor, grad: Tensor) -> None:
        rows = self.rows
        if grad.dim() != 3 or grad.shape[0] != rows or x.dim() != 3 or x.shape[:2] != grad.shape[:2]:
            raise RuntimeError(f"LoRA layer {self.layers[index].name_B}: expected [rows={rows}, positions, features] "
                               f"inputs, got x {tuple(x.shape)} and ∂/∂b {tuple(grad.shape)}; the per-layer taps "
                               "need each sequence on its own row.")
        layer = self.layers[index]
        grad = grad.to(a.dtype)
        grad_a = grad @ weight_B.detach()                        # [rows, T, r] = Bᵀ g per position
        per_row_B = torch.bmm(grad.transpose(1, 2), a.detach())  # [rows, out, r]
        per_row_A = torch.bmm(grad_a.transpose(1, 2), x.detach())  # [rows, r, in]
        for name, per_row in ((layer.name_B, per_row_B), (layer.name_A, per_row_A)):
            if self.directions is not None:
                row_dots = per_row.reshape(rows, -1).to(torch.float64) @ self.directions[name].T   # [rows, J]
                self.dots = row_dots if self.dots is None else self.dots + row_dots
            if self.combine is None or not self.combine.shape[0]:
                continue
            combined = self.combine @ per_row.reshape(rows, -1).to(torch.float64)
            combined = combined.to("cpu").reshape(self.combine.shape[0], *per_row.shape[1:])
            previous = self.out.get(name)
            self.out[name] = combined if previous is None else previous + combined


@dataclass
class TappedChunk:
    """One chunk's forward with taps: ℓ on its response tokens and a backward that returns per-group gradients.

    Attributes:
        chunk: the :class:`SequenceChunk`.
        token_logprobs: ℓ float64 [T] (detached), row-major over the chunk's response tokens.
        token_rows: int64 [T], each token's row in the chunk; token_columns: int64 [T], its column in the batch.
        logprobs: S float64 [c] (detached), the per-sequence sums.
    """

    chunk: SequenceChunk
    token_logprobs: Tensor
    token_rows: Tensor
    token_columns: Tensor
    logprobs: Tensor
    _values: Tensor
    _leaves: list[Tensor]
    _taps: _Taps
    _param_shapes: dict[str, torch.Size]
    token_entropies: Tensor | None = None
    _entropy_values: Tensor | None = None

    def gather(self, values: Tensor) -> Tensor:
        """The chunk's tokens' entries of a batch-shaped [B, G, L] tensor (CPU), in ``token_logprobs``' order: [T]."""
        B, G, L = values.shape
        flat = self.chunk.flat_index.cpu()[self.token_rows.cpu()]
        return values.reshape(B * G, L)[flat, self.token_columns.cpu()]

    def backward(self, cotangent: Tensor, combine: Tensor, *, retain_graph: bool = False) -> list[dict[str, Tensor]]:
        """[ Σ_i combine[j, i] ∇_θ Σ_{t ∈ row i} cotangent_t ℓ_t  for j in J ]: J float64 CPU dicts shaped like θ.

        cotangent: float [T] per response token; combine: float [J, c] over the chunk's rows.
        """
        combine = self._combine(combine)
        out, _ = self._backward(cotangent, None, combine, None, retain_graph)
        return self._unflatten(out, combine.shape[0])

    def backward_dots(self, cotangent: Tensor, directions: Sequence[Mapping[str, Tensor]], *,
                      entropy_cotangent: Tensor | None = None, combine: Tensor | None = None,
                      retain_graph: bool = False) -> tuple[Tensor, list[dict[str, Tensor]]]:
        """One backward of F = Σ_t (cotangent_t ℓ_t + entropy_cotangent_t h_t) (h: the next-token entropies, which
        needs ``tapped_forward(..., entropies=True)``), returning

            dots [c, J] float64 CPU:  dots[i, j] = ∇_θ F_i · directions[j]   (F_i: row i's part of F),

        i.e. the directional derivative of every row's F along every direction (spec §9's D_n, summed over a prompt's
        rows), with no parameter-sized vector per row: each layer's per-row gradient is contracted with the directions
        as it is formed. ``combine`` [K, c] (optional) also returns the K combined gradients as ``backward`` does.
        """
        if entropy_cotangent is not None and self._entropy_values is None:
            raise ValueError("entropy_cotangent needs the entropies' graph: tapped_forward(..., entropies=True).")
        combine = self._combine(torch.zeros(0, self.chunk.input_ids.shape[0]) if combine is None else combine)
        device = self._values.device
        flat = {name: torch.stack([d[name].reshape(-1).to(device, torch.float64) for d in directions])
                for name in self._param_shapes}
        out, dots = self._backward(cotangent, entropy_cotangent, combine, flat, retain_graph)
        if dots is None:
            dots = torch.zeros(self.chunk.input_ids.shape[0], len(directions), dtype=torch.float64)
        return dots.to("cpu"), self._unflatten(out, combine.shape[0])

    def _combine(self, combine) -> Tensor:
        rows = self.chunk.input_ids.shape[0]
        combine = torch.as_tensor(combine, dtype=torch.float64)
        if combine.dim() != 2 or combine.shape[1] != rows:
            raise ValueError(f"combine must be [J, {rows}]; got {tuple(combine.shape)}.")
        return combine

    def _backward(self, cotangent, entropy_cotangent, combine, directions, retain_graph):
        taps = self._taps
        taps.combine, taps.out = combine.to(self._values.device), {}
        taps.directions, taps.dots = directions, None
        outputs = [self._values]
        grad_outputs = [cotangent.to(self._values.device, self._values.dtype)]
        if entropy_cotangent is not None:
            outputs.append(self._entropy_values)
            grad_outputs.append(entropy_cotangent.to(self._values.device, self._values.dtype))
        try:
            if self._values.numel():
                torch.autograd.grad(outputs, self._leaves, grad_outputs=grad_outputs, retain_graph=retain_graph,
                                    allow_unused=True)
            return taps.out, taps.dots
        finally:
            taps.combine, taps.out, taps.directions, taps.dots = None, {}, None, None

    def _unflatten(self, out: dict[str, Tensor], J: int) -> list[dict[str, Tensor]]:
        return [{name: (out[name][j] if name in out else torch.zeros(shape, dtype=torch.float64))
                 for name, shape in self._param_shapes.items()} for j in range(J)]


def tapped_forward(policy, params: Mapping[str, Tensor], chunk: SequenceChunk, token_chunk: int, *,
                   entropies: bool = False) -> TappedChunk:
    """The forward of one sequence chunk at θ = ``params`` with the LoRA taps on (see the module docstring).

    ``entropies=True`` also keeps the next-token entropies h_t, differentiable (``TappedChunk.token_entropies``;
    ``backward_dots(..., entropy_cotangent=...)``), from the same vocabulary projection (spec §9).
    Raises ValueError when the policy's adapter cannot be tapped (:func:`unsupported_reason`).
    """
    layers, reason = _layers(policy)
    if reason is not None:
        raise ValueError(f"per-layer LoRA gradients do not apply to this adapter: {reason}.")
    leaves = {}
    for name, tensor in params.items():
        leaves[name] = tensor.detach().requires_grad_(True) if ".lora_B." in name else tensor.detach()
    taps = _Taps(layers, chunk.input_ids.shape[0])
    entropy_values = None
    with torch.enable_grad(), taps.recording():
        if entropies:
            values, entropy_values = policy._chunk_token_logprobs_entropies(leaves, chunk, token_chunk)
        else:
            values = policy._chunk_token_logprobs(leaves, chunk, token_chunk)
    rows, cols = chunk.response_mask.nonzero(as_tuple=True)
    detached = values.detach()
    sums = torch.zeros(chunk.input_ids.shape[0], dtype=detached.dtype, device=detached.device)
    sums = sums.index_add(0, rows.to(detached.device), detached)
    return TappedChunk(chunk=chunk, token_logprobs=detached, token_rows=rows, token_columns=cols + chunk.columns[0],
                       logprobs=sums, _values=values, _leaves=[leaves[layer.name_B] for layer in layers], _taps=taps,
                       _param_shapes={name: tensor.shape for name, tensor in params.items()},
                       token_entropies=None if entropy_values is None else entropy_values.detach(),
                       _entropy_values=entropy_values)


# ------------------------------------------------------------------------------------- forward mode, per row
class _TangentTaps(_LoraHooks):
    """Forward hooks that add ε·(dB a + B dA x) to every LoRA layer's b, with (dA, dB) the direction of each row."""

    def __init__(self, layers: list[_Layer], row_A: list[Tensor], row_B: list[Tensor], epsilon: Tensor):
        super().__init__(layers)
        self.row_A, self.row_B, self.epsilon = row_A, row_B, epsilon

    def _on_B(self, index: int):
        def hook(module, inputs, output):
            x = self._x.pop(index, None)
            if x is None or x.dim() != 3 or x.shape[0] != self.row_A[index].shape[0]:
                raise RuntimeError(f"LoRA layer {self.layers[index].name_B}: expected lora_A's input as [rows, "
                                   "positions, features] just before lora_B; the per-row tangents cannot follow this "
                                   "model.")
            a = inputs[0]
            d_a = torch.bmm(x, self.row_A[index].transpose(1, 2))               # [rows, T, r] = dA x
            tangent = torch.bmm(a, self.row_B[index].transpose(1, 2)) + d_a @ module.weight.T
            return output + self.epsilon * tangent
        return hook


def row_direction_jvp(policy, params: Mapping[str, Tensor], chunk: SequenceChunk,
                      directions: list[Mapping[str, Tensor]], row_direction: Tensor, *, token_chunk: int,
                      entropies: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """Forward-mode derivatives of the chunk's per-token log-probs, each row along ITS OWN direction in LoRA space.

    Row i of the chunk is differentiated along ``directions[row_direction[i]]`` (dicts keyed and shaped like
    ``params``). For a plain LoRA layer b = B A x, the first-order change of b under (A + ε dA, B + ε dB) is
    ε (dB A x + B dA x); adding ε times that term, with each row's own (dA, dB), to every layer's b and taking one
    ``torch.func.jvp`` in the scalar ε at ε = 0 gives d_{row}·∇ℓ for every token of every row from ONE forward of the
    chunk — where :meth:`Policy.token_logprob_jvp` needs one forward per direction. The rows do not interact (each
    sequence attends to itself), so row i's derivative is exactly its direction's (the terms ε·O(ε) vanish at 0).

    Returns (ℓ [T], d·∇ℓ [T], H [T] or None) as ``Policy.token_logprob_jvp``: float64, row-major over the chunk's
    response tokens. Runs under ``Policy.forward_mode_attention`` (eager attention for the jvp: SDPA and flash have
    no forward-mode rule). Raises ValueError when the adapter cannot be tapped (:func:`unsupported_reason`).
    """
    from .logprobs import token_entropies, token_logprobs

    layers, reason = _layers(policy)
    if reason is not None:
        raise ValueError(f"per-row LoRA tangents do not apply to this adapter: {reason}.")
    rows = int(chunk.input_ids.shape[0])
    row_direction = torch.as_tensor(row_direction, dtype=torch.long)
    if tuple(row_direction.shape) != (rows,):
        raise ValueError(f"row_direction must hold one direction index per row of the chunk ({rows}); got shape "
                         f"{tuple(row_direction.shape)}.")
    device = policy.device
    index = row_direction.to(device)
    row_A, row_B = [], []
    for layer in layers:
        for name, out in ((layer.name_A, row_A), (layer.name_B, row_B)):
            reference = params[name]
            stacked = torch.stack([d[name].to(dtype=reference.dtype, device=device) for d in directions])
            out.append(stacked.index_select(0, index))
    head = policy.lm_head
    dtype = head.weight.dtype

    def forward(epsilon):
        taps = _TangentTaps(layers, row_A, row_B, epsilon)
        with taps.recording():
            hidden, targets, _ = policy._response_rows(params, chunk)
        values = token_logprobs(hidden, head.weight, head.bias, targets, temperature=policy.temperature,
                                token_chunk=token_chunk, logsoftmax_dtype=policy.logsoftmax_dtype)
        return values, hidden.detach()

    zero = torch.zeros((), dtype=dtype, device=device)
    with policy.forward_mode_attention():
        values, derivative, hidden = torch.func.jvp(forward, (zero,), (torch.ones_like(zero),), has_aux=True)
    entropy = None
    if entropies:
        entropy = token_entropies(hidden, head.weight, head.bias, temperature=policy.temperature,
                                  token_chunk=token_chunk, logsoftmax_dtype=policy.logsoftmax_dtype)
    return values.detach(), derivative.detach(), entropy
