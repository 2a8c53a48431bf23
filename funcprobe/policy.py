"""The functional policy: a frozen causal LM whose only free tensors are its LoRA adapters.

Spec §1 (`shared/spec/ESTIMATORS.md`). ``Policy`` holds a PEFT model and never changes its tensors. Every
computation takes an explicit params dict θ (LoRA tensors only, keyed by their PEFT names) and runs the decoder with
``torch.func.functional_call``; the LM head is applied separately, ``token_chunk`` response rows at a time
(``funcprobe.logprobs``), so no [g, L, V] logits tensor is ever built.

Gradients of Σ_i c_i S_i(θ) are taken one sequence chunk at a time with ``torch.func.vjp`` (a G-chunked loss closure
per chunk), and accumulated on the CPU in float64, so only one chunk's autograd graph is ever alive and no
parameter-sized buffer stays on the accelerator.

By construction the failures of the seed's OOM runbook cannot happen here: full-model gradients are impossible
(the guard refuses a policy whose trainable set is not LoRA-only), logits are never held as [G, L, V], and
accumulators live on the CPU.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .batch import RolloutBatch, SequenceChunk
from .logprobs import token_entropies, token_logprobs, token_logprobs_and_entropies, token_logprobs_with_entropies
from .progress import progress_bar

__all__ = ["Policy", "load_policy", "load_base_model", "ChunkLogprobs", "LORA_NAME_MARKERS", "DEFAULT_MAX_TRAINABLE"]

#: Substrings that mark a PEFT parameter as part of a LoRA adapter (plain LoRA, embedding LoRA, DoRA).
LORA_NAME_MARKERS = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.", ".lora_magnitude_vector.")

#: Default ceiling on the number of trainable (LoRA) scalars: a LoRA r=64 adapter on every linear layer of a 7B model
#: is ~160M; a count far above that almost always means a full model slipped through.
DEFAULT_MAX_TRAINABLE = 500_000_000

ParamsDict = Mapping[str, Tensor]


@dataclass(frozen=True)
class ChunkLogprobs:
    """One sequence chunk's forward: S per sequence, ℓ per response token, and the vjp of θ ↦ ℓ.

    Attributes:
        chunk: the :class:`SequenceChunk`.
        logprobs: S float64 [c] (detached), the chunk's sequence log-probabilities.
        token_logprobs: ℓ float64 [T] (detached), one per response token of the chunk, row-major.
        token_rows: int64 [T], the chunk row of each token; token_columns: int64 [T], its column in the batch.
        token_vjp: ``token_vjp(cotangent [T]) -> grads dict`` (device, param dtype): ∇_θ Σ_t c_t ℓ_t(θ).
    """

    chunk: SequenceChunk
    logprobs: Tensor
    token_logprobs: Tensor
    token_rows: Tensor
    token_columns: Tensor
    token_vjp: Callable[[Tensor], dict[str, Tensor]]

    def vjp(self, cotangent: Tensor) -> dict[str, Tensor]:
        """∇_θ Σ_i c_i S_i(θ) for a per-sequence cotangent c [c] (each sequence's c applies to each of its tokens)."""
        return self.token_vjp(cotangent.to(self.token_rows.device)[self.token_rows])

    def gather(self, values: Tensor) -> Tensor:
        """The chunk's tokens' entries of a batch-shaped [B, G, L] tensor (CPU), in ``token_logprobs``' order: [T]."""
        B, G, L = values.shape
        flat = self.chunk.flat_index.cpu()[self.token_rows.cpu()]
        return values.reshape(B * G, L)[flat, self.token_columns.cpu()]


class Policy:
    """A frozen causal LM with LoRA adapters, evaluated functionally over LoRA-only params dicts.

    Build it with ``Policy.from_peft(peft_model)`` or ``load_policy(base, adapter)``. The module is put in eval mode
    (dropout off, so closures are deterministic) and is never modified again by funcprobe.

    Attributes:
        module: the PEFT model.
        params: the LoRA tensors (detached copies), ``dict[str, Tensor]`` keyed by PEFT parameter names.
        temperature: τ of spec §0; every log-probability and entropy uses softmax(z / τ). A batch drawn at another τ
            (``RolloutBatch.temperature``) is refused.
        logsoftmax_dtype: float32 or float64, the dtype of the log-softmax (spec §1). Default (None): the wider of
            float32 and the model's dtype, so a float64 model is not rounded to float32 at the vocabulary projection.
        seq_chunk, token_chunk: default sequences per decoder forward and response rows per vocabulary chunk.
    """

    def __init__(self, module: nn.Module, *, temperature: float = 1.0,
                 logsoftmax_dtype: torch.dtype | None = None, seq_chunk: int = 8, token_chunk: int = 512,
                 max_trainable_params: int = DEFAULT_MAX_TRAINABLE):
        if not (temperature > 0):
            raise ValueError(f"temperature must be > 0; got {temperature}.")
        if logsoftmax_dtype is not None and logsoftmax_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"logsoftmax_dtype must be torch.float32 or torch.float64; got {logsoftmax_dtype}. "
                             "Lower precision drowns small entropy changes in rounding.")
        _check_positive("seq_chunk", seq_chunk)
        _check_positive("token_chunk", token_chunk)
        self.module = module
        self.temperature = float(temperature)
        self.seq_chunk = int(seq_chunk)
        self.token_chunk = int(token_chunk)
        lora_names = _check_lora_only(module, max_trainable_params)
        module.eval()

        base = module.get_base_model()
        decoder = base.get_decoder()
        self._lm_head = base.get_output_embeddings()
        if logsoftmax_dtype is None:
            logsoftmax_dtype = torch.promote_types(torch.float32, self._lm_head.weight.dtype)
        self.logsoftmax_dtype = logsoftmax_dtype
        module_names = {id(m): name for name, m in module.named_modules()}
        self._decoder = decoder
        self._decoder_prefix = module_names[id(decoder)] + "."
        lm_head_prefix = module_names[id(self._lm_head)] + "."
        on_head = [n for n in lora_names if n.startswith(lm_head_prefix)]
        if on_head:
            raise ValueError(
                f"LoRA on the LM head is not supported: found {len(on_head)} LoRA tensors under '{lm_head_prefix}' "
                f"(e.g. {on_head[0]}). funcprobe projects to the vocabulary in frozen chunks. Re-create the "
                "adapter without 'lm_head' in target_modules.")
        outside = [n for n in lora_names if not n.startswith(self._decoder_prefix)]
        if outside:
            raise ValueError(f"LoRA tensors outside the decoder ('{self._decoder_prefix}…') are not supported: "
                             f"{outside[:3]}. Target only decoder modules.")
        named = dict(module.named_parameters())
        self._param_names = tuple(lora_names)
        self.params: dict[str, Tensor] = {n: named[n].detach().clone() for n in lora_names}
        self._param_meta = {n: (t.shape, t.dtype, t.device) for n, t in self.params.items()}

    # ----------------------------------------------------------------------------------------------- constructors
    @classmethod
    def from_peft(cls, peft_model: nn.Module, **options) -> "Policy":
        """Wrap an in-memory ``peft.PeftModel``. Options as for ``Policy(...)``."""
        return cls(peft_model, **options)

    # ------------------------------------------------------------------------------------------------- properties
    @property
    def param_names(self) -> tuple[str, ...]:
        return self._param_names

    @property
    def decoder(self) -> nn.Module:
        """The decoder stack (the model without its LM head), called by ``functional_call`` with decoder-relative
        parameter names (:meth:`decoder_params`)."""
        return self._decoder

    @property
    def lm_head(self) -> nn.Module:
        """The frozen LM head (its ``weight`` [V, H] and optional ``bias``)."""
        return self._lm_head

    def decoder_params(self, params: ParamsDict) -> dict[str, Tensor]:
        """``params`` keyed relative to :attr:`decoder` (the prefix of the PEFT names stripped)."""
        return {name[len(self._decoder_prefix):]: tensor for name, tensor in params.items()}

    @property
    def device(self) -> torch.device:
        return self._lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self._lm_head.weight.dtype

    @property
    def vocab_size(self) -> int:
        return int(self._lm_head.weight.shape[0])

    @property
    def num_layers(self) -> int:
        """Decoder layers (the base config's ``num_hidden_layers``; 1 when the config does not say)."""
        config = getattr(self.module.get_base_model(), "config", None)
        layers = getattr(config, "num_hidden_layers", None) or getattr(getattr(config, "text_config", None),
                                                                       "num_hidden_layers", None)
        return int(layers) if layers else 1

    @property
    def num_params(self) -> int:
        """Number of trainable (LoRA) scalars."""
        return sum(t.numel() for t in self.params.values())

    def __repr__(self) -> str:
        return (f"Policy({type(self.module.get_base_model()).__name__}, {len(self._param_names)} LoRA tensors, "
                f"{self.num_params:,} scalars, τ={self.temperature}, {self.dtype}, {self.device})")

    # ----------------------------------------------------------------------------------------------- validation
    def check_params(self, params: ParamsDict, what: str = "params") -> None:
        """Raise ValueError unless ``params`` has exactly this policy's LoRA names, shapes, dtypes and device."""
        missing = [n for n in self._param_names if n not in params]
        extra = [n for n in params if n not in self._param_meta]
        if missing or extra:
            raise ValueError(f"{what} must hold exactly this policy's {len(self._param_names)} LoRA tensors; "
                             f"missing {missing[:3]}{'…' if len(missing) > 3 else ''} ({len(missing)}), "
                             f"extra {extra[:3]}{'…' if len(extra) > 3 else ''} ({len(extra)}). "
                             "Start from policy.params.")
        for name, (shape, dtype, device) in self._param_meta.items():
            tensor = params[name]
            if tensor.shape != shape or tensor.dtype != dtype or tensor.device != device:
                raise ValueError(f"{what}['{name}'] is {tuple(tensor.shape)} {tensor.dtype} on {tensor.device}; "
                                 f"the policy expects {tuple(shape)} {dtype} on {device}.")

    def chunk_sizes(self, seq_chunk: int | None = None, token_chunk: int | None = None) -> tuple[int, int]:
        """(seq_chunk, token_chunk): the sizes given, or the policy's own where None. Raises ValueError for one that
        is not a positive integer."""
        seq_chunk = self.seq_chunk if seq_chunk is None else seq_chunk
        token_chunk = self.token_chunk if token_chunk is None else token_chunk
        _check_positive("seq_chunk", seq_chunk)
        _check_positive("token_chunk", token_chunk)
        return seq_chunk, token_chunk

    def _check_token_ids(self, batch: RolloutBatch) -> None:
        """Raise ValueError when the batch holds a token id outside the model's vocabulary (made for another model),
        before anything is run on it."""
        if batch.input_ids.numel() and int(batch.input_ids.max()) >= self.vocab_size:
            raise ValueError(f"batch.input_ids holds token id {int(batch.input_ids.max())} but the model's "
                             f"vocabulary has {self.vocab_size} entries: the batch was made with another model's "
                             "tokenizer; use a batch sampled (or logged) with this model.")

    def _check_batch(self, batch: RolloutBatch) -> None:
        if not isinstance(batch, RolloutBatch):
            raise ValueError(f"batch must be a funcprobe.RolloutBatch; got {type(batch).__name__}.")
        self._check_token_ids(batch)
        if batch.temperature != self.temperature:
            raise ValueError(f"the batch was drawn at temperature τ={batch.temperature:g} but this policy computes "
                             f"log-probabilities and entropies at τ={self.temperature:g}; every estimate must use the "
                             f"τ the responses were drawn at. Build the policy with temperature="
                             f"{batch.temperature:g} (funcprobe probe --temperature {batch.temperature:g}), or draw "
                             f"the batch at τ={self.temperature:g}.")
        if self.module.training:
            raise ValueError("the policy's module was put back in training mode (dropout on), which makes "
                             "log-probabilities random. Call policy.module.eval().")

    @contextlib.contextmanager
    def forward_mode_attention(self) -> Iterator[None]:
        """Attention with a forward-mode AD rule for the duration of the block: eager attention, the same function
        as SDPA and flash attention (softmax(QKᵀ/√d + mask) V), which have no forward-mode rule (CPU SDPA, flash).

        The model's attention implementation is switched with transformers' ``set_attn_implementation`` (or its
        config field on versions without it) and restored on exit, whatever happens inside; a model already on eager
        attention is left alone. Raises ValueError, naming the fix, for a model whose attention cannot be switched.
        """
        from .precision import EXACT_EAGER, _register_exact_eager

        base = self.module.get_base_model()
        config = getattr(base, "config", None)
        current = getattr(config, "_attn_implementation", None)
        if current in (None, "eager", EXACT_EAGER):
            yield
            return
        # A float64 model keeps float64 softmax in its eager attention (funcprobe.precision.exact_float64).
        target = EXACT_EAGER if self.dtype == torch.float64 and _register_exact_eager() else "eager"
        setter = getattr(base, "set_attn_implementation", None)
        configs = {id(m.config): m.config for m in base.modules()
                   if getattr(getattr(m, "config", None), "_attn_implementation", None) is not None}
        saved = [(c, c._attn_implementation) for c in configs.values()]
        try:
            if setter is not None and target == "eager":
                setter(target)
            else:
                for c, _ in saved:
                    c._attn_implementation = target
            if getattr(config, "_attn_implementation", None) != target:
                raise ValueError(
                    f"this model's attention ({current}) has no forward-mode derivative and could not be switched to "
                    "eager attention for the forward-mode pass. Load the model with attn_implementation='eager' "
                    "(load_checkpoint(..., attn_implementation='eager')).")
            yield
        finally:
            if setter is not None and getattr(config, "_attn_implementation", None) != current:
                setter(current)
            for c, value in saved:
                c._attn_implementation = value

    # ------------------------------------------------------------------------------------------------ internals
    def _final_hidden(self, params: ParamsDict, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Final hidden states [c, L', H] of the decoder at θ = params, via ``torch.func.functional_call``.

        Position ids come from the attention mask (cumsum − 1), so S is invariant to the side and amount of padding.
        """
        mask = attention_mask.to(torch.long)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        decoder_params = self.decoder_params(params)
        # tie_weights=False: LoRA tensors are never tied (and the tie check walks every module on every call).
        out = torch.func.functional_call(
            self._decoder, decoder_params, args=(),
            kwargs=dict(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False),
            tie_weights=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def _response_rows(self, params: ParamsDict, chunk: SequenceChunk) -> tuple[Tensor, Tensor, Tensor]:
        """(hidden [T, H] predicting each response token, targets [T], row index [T]) for one chunk on device."""
        device = self.device
        input_ids, attention_mask, response_mask = _left_align(
            chunk.input_ids.to(device), chunk.attention_mask.to(device), chunk.response_mask.to(device))
        hidden = self._final_hidden(params, input_ids, attention_mask)
        rows, cols = response_mask.nonzero(as_tuple=True)
        # Token t_k is predicted from the hidden state at k − 1 (response_mask is never 1 at column 0).
        return hidden[rows, cols - 1], input_ids[rows, cols], rows

    def _chunk_token_logprobs(self, params: ParamsDict, chunk: SequenceChunk, token_chunk: int) -> Tensor:
        """ℓ_t = log π_θ(t_k | t_<k) for the chunk's response tokens, row-major: float64 [T] (spec §1)."""
        hidden, targets, _ = self._response_rows(params, chunk)
        head = self._lm_head
        return token_logprobs(hidden, head.weight, head.bias, targets, temperature=self.temperature,
                              token_chunk=token_chunk, logsoftmax_dtype=self.logsoftmax_dtype)

    def _chunk_token_logprobs_entropies(self, params: ParamsDict, chunk: SequenceChunk,
                                        token_chunk: int) -> tuple[Tensor, Tensor]:
        """(ℓ_t, h_t): log-probabilities and next-token entropies H(π_θ(· | t_<k)) of the chunk's response tokens,
        row-major, float64 [T] each, both differentiable in θ (spec §9; one vocabulary projection per row chunk)."""
        hidden, targets, _ = self._response_rows(params, chunk)
        head = self._lm_head
        return token_logprobs_with_entropies(hidden, head.weight, head.bias, targets, temperature=self.temperature,
                                             token_chunk=token_chunk, logsoftmax_dtype=self.logsoftmax_dtype)

    def _chunk_logprobs(self, params: ParamsDict, chunk: SequenceChunk, token_chunk: int) -> Tensor:
        """S_i = Σ_k response_mask[i, k] log π_θ(t_k | t_<k) for the chunk's c sequences: float64 [c] (spec §1)."""
        per_token = self._chunk_token_logprobs(params, chunk, token_chunk)
        return _sum_rows(per_token, chunk)

    def _chunks(self, batch: RolloutBatch, seq_chunk: int | None, progress: bool | None,
                desc: str, shard: tuple[int, int] | None = None) -> Iterator[SequenceChunk]:
        seq_chunk = self.seq_chunk if seq_chunk is None else seq_chunk
        _check_positive("seq_chunk", seq_chunk)
        chunks = batch.iter_sequence_chunks(seq_chunk)
        total = -(-batch.num_sequences // seq_chunk)
        if shard is not None:  # a contiguous range of the batch's own chunks (issue 6): same chunks, same numbers
            import itertools

            from .distributed import shard_prompts

            mine = shard_prompts(total, *shard)
            chunks, total = itertools.islice(chunks, mine.start, mine.stop), len(mine)
        return progress_bar(chunks, total=total, desc=desc, enabled=progress)

    # ------------------------------------------------------------------------------------------------ public API
    def sequence_logprobs(self, params: ParamsDict, batch: RolloutBatch, *, seq_chunk: int | None = None,
                          token_chunk: int | None = None, with_grad: bool = False,
                          progress: bool | None = False, shard: tuple[int, int] | None = None) -> Tensor:
        """S_{n,g}(θ) of spec §1 for every sequence of the batch: float64 [B, G].

        With ``with_grad=False`` (default) the forwards run under ``torch.no_grad`` and the result is on the CPU.
        With ``with_grad=True`` the result stays on the policy's device and is differentiable in ``params`` (for
        use inside ``torch.func.grad``); the graph of the whole batch is then alive at once — for gradients of
        weighted sums over many sequences prefer ``logprob_grads``, which keeps one chunk's graph at a time.

        ``shard=(rank, world)``: only that rank's contiguous range of the batch's sequence chunks (the others are 0);
        the chunks are those of the whole batch, so a sum over ranks reproduces the single-process values exactly.
        """
        self.check_params(params)
        self._check_batch(batch)
        token_chunk = self.token_chunk if token_chunk is None else token_chunk
        _check_positive("token_chunk", token_chunk)
        pieces, indices = [], []
        with torch.set_grad_enabled(with_grad):
            for chunk in self._chunks(batch, seq_chunk, progress, "log-probs", shard):
                values = self._chunk_logprobs(params, chunk, token_chunk)
                pieces.append(values if with_grad else values.cpu())
                indices.append(chunk.flat_index)
        if not pieces:
            return torch.zeros((batch.B, batch.G), dtype=torch.float64)
        flat = torch.cat(pieces)
        order = torch.cat(indices).to(flat.device)
        # A scatter by flat index: correct in any chunk order, and zero for sequences outside this rank's shard.
        result = torch.zeros(batch.num_sequences, dtype=flat.dtype, device=flat.device).index_add(0, order, flat)
        return result.reshape(batch.B, batch.G)

    def token_logprobs(self, params: ParamsDict, batch: RolloutBatch, *, seq_chunk: int | None = None,
                       token_chunk: int | None = None, progress: bool | None = False,
                       prompts: Any = None) -> Tensor:
        """ℓ_{n,g,k} = log π_θ(t_k | t_<k) on every response token, 0 elsewhere: float64 [B, G, L] on the CPU (no
        gradient). ``prompts``: compute only these prompt rows (others stay 0), e.g. a rank's shard."""
        self.check_params(params)
        self._check_batch(batch)
        token_chunk = self.token_chunk if token_chunk is None else token_chunk
        _check_positive("token_chunk", token_chunk)
        out = torch.zeros(batch.B, batch.G, batch.L, dtype=torch.float64)
        rows_of = None if prompts is None else torch.as_tensor(list(prompts), dtype=torch.int64)
        target = batch if rows_of is None else batch.select_prompts(rows_of)
        part = torch.zeros(target.num_sequences, target.L, dtype=torch.float64)
        with torch.no_grad():
            for chunk in self._chunks(target, seq_chunk, progress, "token log-probs"):
                values = self._chunk_token_logprobs(params, chunk, token_chunk).cpu()
                rows, cols = chunk.response_mask.cpu().nonzero(as_tuple=True)
                part[chunk.flat_index.cpu()[rows], cols + chunk.columns[0]] = values
        part = part.reshape(target.B, target.G, target.L)
        if rows_of is None:
            return part
        out[rows_of] = part
        return out

    def reference_params(self, params: ParamsDict) -> dict[str, Tensor]:
        """θ_ref: the adapter disabled — every ``lora_B`` (and ``lora_embedding_B``) zero, so each LoRA layer's output
        is its base layer's (spec §3: the KL reference of a LoRA policy is its base model). Refused for DoRA, where a
        zero B does not give the base weights."""
        self.check_params(params)
        dora = [n for n in params if ".lora_magnitude_vector." in n]
        if dora:
            raise ValueError(f"the KL reference (the adapter disabled) cannot be formed by zeroing lora_B for a DoRA "
                             f"adapter ({len(dora)} magnitude vectors, e.g. {dora[0]}). Probe with beta=0, or use a "
                             "plain LoRA adapter.")
        return {n: (torch.zeros_like(t) if (".lora_B." in n or ".lora_embedding_B." in n) else t)
                for n, t in params.items()}

    def iter_logprob_vjps(self, params: ParamsDict, batch: RolloutBatch, *, seq_chunk: int | None = None,
                          token_chunk: int | None = None, progress: bool | None = False) -> Iterator[ChunkLogprobs]:
        """For each sequence chunk: S(θ) on it and the vjp of θ ↦ S_chunk(θ), built by one forward.

        The vjp may be called once per cotangent (spec §3: X and Y are vjps of the same map with two cotangents).
        Only the current chunk's graph is alive: an item's vjp is released when the next chunk is requested (calling
        it afterwards raises), so a loop variable holding the previous item does not keep its graph alive.
        """
        self.check_params(params)
        self._check_batch(batch)
        token_chunk = self.token_chunk if token_chunk is None else token_chunk
        _check_positive("token_chunk", token_chunk)
        params = dict(params)
        for chunk in self._chunks(batch, seq_chunk, progress, "gradients"):
            token_values, vjp_fn = torch.func.vjp(lambda p, c=chunk: self._chunk_token_logprobs(p, c, token_chunk),
                                                  params)
            rows, cols = chunk.response_mask.nonzero(as_tuple=True)
            # The item reaches the graph only through this box, which is emptied when the consumer asks for the
            # next chunk: the graph is freed before the next forward even if the consumer still holds the item.
            holder = [vjp_fn]
            del vjp_fn
            values = token_values.detach()
            yield ChunkLogprobs(chunk=chunk, logprobs=_sum_rows(values, chunk), token_logprobs=values,
                                token_rows=rows, token_columns=cols + chunk.columns[0],
                                token_vjp=lambda cotangent, box=holder, device=values.device: _call_vjp(
                                    box, cotangent.to(device)))
            holder.clear()
            del token_values, values

    def token_logprob_jvp(self, params: ParamsDict, chunk: SequenceChunk, tangent: ParamsDict, *,
                          token_chunk: int | None = None,
                          entropies: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
        """Forward-mode derivative of the chunk's per-token log-probs along a direction d in parameter space.

        Returns (ℓ [T], d·∇ℓ [T], H [T] or None), float64 on the policy's device, row-major over the chunk's response
        tokens (``response_mask.nonzero()`` order, as ``ChunkLogprobs.token_logprobs``). One ``torch.func.jvp`` of
        the chunk's forward: memory of one forward, no per-token gradient is formed (the vocabulary projection's
        jvp rule is dh·D). ``tangent`` is keyed and shaped like ``params`` (cast to their dtype and device).
        ``entropies=True`` adds the full next-token entropies H(π_θ(·|t_<k)) from the same hidden states.
        Runs under :meth:`forward_mode_attention` (eager attention for the jvp: SDPA and flash have no forward-mode
        rule), so it works on a model loaded the ordinary way.
        """
        self.check_params(params)
        token_chunk = self.token_chunk if token_chunk is None else token_chunk
        _check_positive("token_chunk", token_chunk)
        params = dict(params)
        tangent = {n: tangent[n].to(dtype=p.dtype, device=p.device) for n, p in params.items()}
        head = self._lm_head

        def forward(p):
            hidden, targets, _ = self._response_rows(p, chunk)
            values = token_logprobs(hidden, head.weight, head.bias, targets, temperature=self.temperature,
                                    token_chunk=token_chunk, logsoftmax_dtype=self.logsoftmax_dtype)
            return values, hidden.detach()

        with self.forward_mode_attention():
            values, derivative, hidden = torch.func.jvp(forward, (params,), (tangent,), has_aux=True)
        entropy = None
        if entropies:
            entropy = token_entropies(hidden, head.weight, head.bias, temperature=self.temperature,
                                      token_chunk=token_chunk, logsoftmax_dtype=self.logsoftmax_dtype)
        return values.detach(), derivative.detach(), entropy

    def logprob_grads(self, params: ParamsDict, batch: RolloutBatch, weights: Tensor, *,
                      seq_chunk: int | None = None, token_chunk: int | None = None,
                      progress: bool | None = False) -> tuple[Tensor, list[dict[str, Tensor]]]:
        """∇_θ Σ_{n,g} c^(j)_{n,g} S_{n,g}(θ) for each weight set j, plus S itself.

        weights: float [B, G] or [J, B, G] (the weights are constants: no gradient flows through them).
        Returns (S float64 [B, G] on the CPU, [grads_j for j in J]) with each grads_j a dict of float64 CPU tensors
        shaped like ``params``. One forward and J vjps per sequence chunk; accumulation on the CPU in float64.
        """
        weights = torch.as_tensor(weights, dtype=torch.float64)
        single = weights.dim() == 2
        weights = weights[None] if single else weights
        if weights.dim() != 3 or tuple(weights.shape[1:]) != (batch.B, batch.G):
            raise ValueError(f"weights must be [B, G] = [{batch.B}, {batch.G}] or [J, B, G]; "
                             f"got {tuple(weights.shape)}.")
        if not torch.isfinite(weights).all():
            raise ValueError("weights contain NaN or inf; every weight c_{n,g} must be finite.")
        flat_weights = weights.reshape(weights.shape[0], -1)
        totals = [{n: torch.zeros(t.shape, dtype=torch.float64) for n, t in params.items()}
                  for _ in range(weights.shape[0])]
        logprobs = torch.zeros(batch.num_sequences, dtype=torch.float64)
        for item in self.iter_logprob_vjps(params, batch, seq_chunk=seq_chunk, token_chunk=token_chunk,
                                           progress=progress):
            logprobs[item.chunk.flat_index] = item.logprobs.cpu()
            for total, chunk_weights in zip(totals, flat_weights):
                grads = item.vjp(chunk_weights[item.chunk.flat_index].to(self.device))
                for name, grad in grads.items():
                    total[name] += grad.to("cpu", torch.float64)
        return logprobs.reshape(batch.B, batch.G), totals

    @torch.no_grad()
    def token_entropies(self, params: ParamsDict, batch: RolloutBatch, *, seq_chunk: int | None = None,
                        token_chunk: int | None = None, progress: bool | None = False,
                        shard: tuple[int, int] | None = None) -> Tensor:
        """Σ_k response_mask[n,g,k] · H(π_θ(· | t_<k)), the summed full next-token entropies: float64 [B, G].

        The Rao-Blackwellised entropy of spec §6, in the same vocabulary chunks as the log-probs. ``shard`` as for
        :meth:`sequence_logprobs` (the other ranks' sequences are 0). One code path with
        :meth:`sequence_logprobs_and_entropies` (whose log-probs cost one gather more).
        """
        return self.sequence_logprobs_and_entropies(params, batch, seq_chunk=seq_chunk, token_chunk=token_chunk,
                                                    progress=progress, shard=shard)[1]


    @torch.no_grad()
    def sequence_logprobs_and_entropies(self, params: ParamsDict, batch: RolloutBatch, *,
                                        seq_chunk: int | None = None, token_chunk: int | None = None,
                                        progress: bool | None = False,
                                        shard: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
        """(S, E): the sequence log-probabilities of :meth:`sequence_logprobs` and the summed next-token entropies of
        :meth:`token_entropies`, float64 [B, G] each on the CPU, from ONE decoder forward per sequence chunk and one
        vocabulary projection per token chunk — what the Rao-Blackwell SNIS estimator needs at one θ (spec §6).
        Equal bit for bit to the two separate calls (same chunks, same arithmetic). ``shard`` as for
        :meth:`sequence_logprobs`."""
        self.check_params(params)
        self._check_batch(batch)
        token_chunk = self.token_chunk if token_chunk is None else token_chunk
        _check_positive("token_chunk", token_chunk)
        head = self._lm_head
        S = torch.zeros(batch.num_sequences, dtype=torch.float64)
        E = torch.zeros(batch.num_sequences, dtype=torch.float64)
        for chunk in self._chunks(batch, seq_chunk, progress, "log-probs and entropies", shard):
            hidden, targets, rows = self._response_rows(params, chunk)
            logprobs, entropies = token_logprobs_and_entropies(
                hidden, head.weight, head.bias, targets, temperature=self.temperature, token_chunk=token_chunk,
                logsoftmax_dtype=self.logsoftmax_dtype)
            zeros = torch.zeros(chunk.input_ids.shape[0], dtype=torch.float64, device=logprobs.device)
            S[chunk.flat_index] = zeros.index_add(0, rows, logprobs).cpu()
            E[chunk.flat_index] = zeros.index_add(0, rows, entropies).cpu()
        return S.reshape(batch.B, batch.G), E.reshape(batch.B, batch.G)


def _left_align(input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Shift every row left so that it starts with its first real token, then drop all-padding trailing columns.

    Position ids come from the attention mask, so S is unchanged; but no query row is then fully masked (a leading
    pad query attends to nothing), which makes eager attention produce NaN that 0·NaN carries into real rows.
    """
    length = input_ids.shape[1]
    first_real = attention_mask.to(torch.long).argmax(dim=1)
    columns = torch.arange(length, device=input_ids.device)[None, :] + first_real[:, None]
    inside = columns < length
    columns = columns.clamp(max=length - 1)
    attention = attention_mask.gather(1, columns) & inside
    aligned = (input_ids.gather(1, columns).masked_fill(~attention, 0), attention,
               response_mask.gather(1, columns) & inside)
    width = max(int(attention.any(dim=0).nonzero().max()) + 1, 2) if attention.any() else length
    return tuple(t[:, :width] for t in aligned)


# ---------------------------------------------------------------------------------------------------- loading
def load_policy(base: str | os.PathLike | nn.Module, adapter: str | os.PathLike | None = None, *,
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                local_files_only: bool | None = None, attn_implementation: str | None = None,
                **options) -> Policy:
    """Load a base causal LM and a PEFT LoRA adapter directory into a ``Policy``.

    base: a hub id, a local model directory, or an already built ``transformers`` model. adapter: a directory with
    ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``.bin``). If ``adapter`` is None and ``base`` is
    itself an adapter directory, its ``base_model_name_or_path`` names the base. Offline: pass a local path, or set
    ``HF_HUB_OFFLINE=1`` / ``local_files_only=True``. Remaining options go to ``Policy(...)``. With
    ``dtype=torch.float64`` a model loaded here computes its norms and eager softmax in float64 too
    (``funcprobe.precision.exact_float64``).
    """
    from peft import PeftModel

    if adapter is None and not isinstance(base, nn.Module) and _is_adapter_dir(base):
        adapter = base
        base = _adapter_base_name(Path(base))
    if adapter is None:
        raise ValueError("load_policy needs a LoRA adapter: funcprobe differentiates LoRA tensors only and refuses "
                         "a bare base model. Pass adapter='path/to/adapter' (a folder with adapter_config.json).")
    adapter = Path(adapter)
    if not _is_adapter_dir(adapter):
        raise ValueError(f"'{adapter}' is not a PEFT adapter directory (no adapter_config.json there). Pass the "
                         "folder that holds adapter_config.json and adapter_model.safetensors.")
    if isinstance(base, nn.Module):
        model = base
    else:
        if local_files_only is None:
            local_files_only = Path(base).is_dir() or os.environ.get("HF_HUB_OFFLINE") == "1"
        model = load_base_model(str(base), dtype=dtype, local_files_only=local_files_only,
                                attn_implementation=attn_implementation)
    model = model.to(device=device, dtype=dtype)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    return Policy(peft_model.to(device), **options)


def load_base_model(name: str, *, dtype: torch.dtype, local_files_only: bool,
                    attn_implementation: str | None = None) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(name)`` in ``dtype``; a float64 model computes its norms and eager
    softmax in float64 too (transformers rounds them through float32 even there; ``funcprobe.precision``)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict = dict(local_files_only=local_files_only)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = _from_pretrained(AutoModelForCausalLM, name, dtype, kwargs)
    if dtype == torch.float64:
        from .precision import exact_float64

        exact_float64(model.to(dtype=dtype))
    return model


def _from_pretrained(auto_class, name: str, dtype: torch.dtype, kwargs: dict) -> nn.Module:
    """``from_pretrained`` across transformers versions (``dtype=`` since 4.56, ``torch_dtype=`` before)."""
    try:
        return auto_class.from_pretrained(name, dtype=dtype, **kwargs)
    except TypeError:
        return auto_class.from_pretrained(name, torch_dtype=dtype, **kwargs)


def _is_adapter_dir(path) -> bool:
    return Path(path).is_dir() and (Path(path) / "adapter_config.json").is_file()


def _adapter_base_name(adapter: Path) -> str:
    config = json.loads((adapter / "adapter_config.json").read_text())
    name = config.get("base_model_name_or_path")
    if not name:
        raise ValueError(f"{adapter / 'adapter_config.json'} names no base_model_name_or_path; pass the base "
                         "model explicitly: load_policy(base, adapter).")
    return name


# ---------------------------------------------------------------------------------------------------- the guard
def _check_lora_only(module: nn.Module, max_trainable_params: int) -> list[str]:
    """Names of the active adapter's LoRA tensors; raises ValueError unless the policy is LoRA-only.

    Refused: a non-PEFT module, a merged or disabled adapter, several active adapters, any non-LoRA parameter that
    requires grad (a trainable base, ``modules_to_save``), no LoRA tensors at all, or more LoRA scalars than
    ``max_trainable_params``.
    """
    if not (hasattr(module, "peft_config") and hasattr(module, "get_base_model")):
        raise ValueError(f"expected a peft.PeftModel with a LoRA adapter; got {type(module).__name__}. Wrap the "
                         "model with peft.get_peft_model(model, LoraConfig(...)) or load it with "
                         "funcprobe.load_policy(base, adapter).")
    adapter = module.active_adapter
    if not isinstance(adapter, str):
        raise ValueError(f"several adapters are active ({adapter}); activate exactly one with "
                         "model.set_adapter(name).")
    config = module.peft_config[adapter]
    if getattr(config, "peft_type", None) is not None and str(getattr(config.peft_type, "value", config.peft_type)) \
            != "LORA":
        raise ValueError(f"adapter '{adapter}' is {config.peft_type}, not LoRA; funcprobe supports LoRA adapters.")
    if getattr(config, "modules_to_save", None):
        raise ValueError(f"adapter '{adapter}' trains full copies of {config.modules_to_save} (modules_to_save): "
                         "the trainable set is not LoRA-only. Re-create the adapter without modules_to_save.")
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, sub in module.named_modules():
        if not isinstance(sub, BaseTunerLayer):
            continue
        if sub.merged:
            raise ValueError(f"the LoRA weights of '{name}' are merged into the base weights; funcprobe needs them "
                             "separate. Load the adapter without merge_and_unload()/merge_adapter().")
        if sub.disable_adapters:
            raise ValueError(f"the adapters of '{name}' are disabled; enable them (leave the "
                             "disable_adapter() context) before building the policy.")
    lora_names, non_lora_trainable = [], []
    for name, parameter in module.named_parameters():
        is_lora = any(marker in name for marker in LORA_NAME_MARKERS)
        if is_lora and f".{adapter}." in name + ".":
            lora_names.append(name)
        elif parameter.requires_grad:
            non_lora_trainable.append((name, parameter.numel()))
    if non_lora_trainable:
        count = sum(n for _, n in non_lora_trainable)
        raise ValueError(
            f"the trainable set is not LoRA-only: {len(non_lora_trainable)} non-LoRA tensors ({count:,} scalars) "
            f"require grad, e.g. {[n for n, _ in non_lora_trainable[:3]]}. funcprobe differentiates LoRA tensors "
            "only (full-model gradients are what ran the seed probe out of memory). Freeze the base "
            "(p.requires_grad_(False) for non-LoRA parameters), drop modules_to_save, or use "
            "funcprobe.load_policy(base, adapter).")
    if not lora_names:
        raise ValueError(f"no LoRA tensors found for adapter '{adapter}'. Attach a LoRA adapter with "
                         "peft.get_peft_model or PeftModel.from_pretrained.")
    total = sum(p.numel() for n, p in module.named_parameters() if n in set(lora_names))
    if total > max_trainable_params:
        raise ValueError(f"the LoRA adapter has {total:,} scalars, above max_trainable_params="
                         f"{max_trainable_params:,}. If this is intended, raise the limit: "
                         f"Policy(..., max_trainable_params={total}).")
    return lora_names


# ---------------------------------------------------------------------------------------------------- helpers
def _call_vjp(box: list, cotangent: Tensor) -> dict[str, Tensor]:
    """The chunk's vjp at a per-token cotangent [T]."""
    if not box:
        raise RuntimeError("this chunk's vjp was released when the next chunk was requested; call it inside the "
                           "loop body.")
    return box[0](cotangent.to(torch.float64))[0]


def _sum_rows(per_token: Tensor, chunk: SequenceChunk) -> Tensor:
    """Per-sequence sums [c] of a chunk's per-token values [T] (row-major over its response tokens)."""
    rows = chunk.response_mask.nonzero(as_tuple=True)[0].to(per_token.device)
    zeros = torch.zeros(chunk.input_ids.shape[0], dtype=per_token.dtype, device=per_token.device)
    return zeros.index_add(0, rows, per_token)


def _check_positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}.")
