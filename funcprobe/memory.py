"""A peak-memory model of funcprobe's phases, and chunk sizes chosen from a memory budget (issue 7, planner core).

``plan_memory(model_config, lora_config, batch_shape, dtype=..., budget_bytes=..., device=...)`` predicts, from shapes
alone, the peak memory of

* ``sampling``: weights + the KV cache of ``prompt_chunk·G`` rows at full length + one vocabulary row block
  ([rows, V] logits in the model dtype, in the log-softmax dtype, the float64 CDF) + the prefill's transient;
* ``delta_h1_pass1`` / ``delta_h1_pass2``: weights + the activations autograd saves for the backward of ONE sequence
  chunk (``seq_chunk`` sequences of ``prompt_len + max_new_tokens`` tokens) + one [token_chunk, V] block in the
  log-softmax dtype (plus its model-dtype copies) + the score directions [T, H] + the vjp's LoRA-sized gradients;
  float64 accumulators on the CPU; the 2U stored unit vectors (float64, CPU) when ``store_unit_vectors``;
* ``delta_h`` (ΔH): a no-grad forward of one chunk + two [token_chunk, V] float blocks (log-sum-exp / entropy).

What "peak" means: on CUDA, device memory allocated by torch (``torch.cuda.max_memory_allocated``) plus a fixed
CUDA-context reserve; host-side components (CPU accumulators, stored unit vectors) are listed separately and
checked against ``host_budget_bytes``. On the CPU everything shares one pool and the prediction is the process's
resident memory ABOVE THE IMPORTS BASELINE (Python + torch + transformers + peft imported, nothing built): the model
weights are included, the interpreter and libraries are not.

The activation constant. For a Qwen2/Llama decoder layer with LoRA on q,k,v,o,gate,up,down, autograd keeps (per
token, in elements; base weights are frozen so the base linears save nothing of their own):

* each RMSNorm (2 per layer): its float32 input and normalised value, the model-dtype output fed to the LoRA A
  projections — ``3H`` each (the float32 pair costs 4 bytes whatever the model dtype);
* attention: q after rotary (H), k and v after rotary, repeated to the query heads (``repeat_kv``, used by
  transformers' SDPA path whenever an attention mask is passed: 2H), the SDPA output and its transposed copy fed to
  o_proj (2H), the log-sum-exp (heads);
* MLP: SiLU's input (I), its output and up_proj's output for the product (2I), the product fed to down_proj (I);
* LoRA: the A-projection output of each adapted module (r each; 7r for all linear layers).

That is ``2H + 5·(heads·head_dim) + 4I + n_lora·r`` model-dtype elements plus ``4H + heads`` float32 elements per
token per layer (Qwen2.5-1.5B, bf16, r=64: 47,040 + 6,156 elements = 116 KiB per token per layer), times
``ACTIVATION_FACTOR``.

Calibration (bench/memory_plan.py, bench/RESULTS.md "Memory planning"): on the CPU grid, solving measured =
prediction with the saved activations scaled by f gives f = 0.89–0.94 on the three gradient configurations where the
activations are ≥ 60% of the predicted peak (H = 128, 256 and 512; L = 512 and 1024; 2 and 4 layers); where they
are a smaller share, f is confounded with the constant terms. The count is therefore a slight upper bound (it
counts the float32 RMSNorm pair and the transposed attention output, which are sometimes views or freed), and
``ACTIVATION_FACTOR`` is kept at 1.0: the planner errs by 0–10% on the safe side where activations dominate.
Not calibrated on a GPU (no GPU was lent): CUDA SDPA kernels (flash / memory-efficient) save the same q, k, v,
output and log-sum-exp, so the count carries over, and ``CUDA_FRAGMENTATION`` + ``CUDA_CONTEXT_BYTES`` cover the
caching allocator and the context; check them with ``max_memory_allocated`` when a GPU is available.

Phases whose transients never coexist take the larger of them, not the sum: in a gradient chunk the [token_chunk, V]
block is freed before the backward's transient appears; in a no-grad forward the decoder's per-layer transient is
gone before the projection starts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

__all__ = ["MemoryPlan", "PhaseMemory", "ModelShapes", "model_shapes", "phase_memory", "plan_memory",
           "ACTIVATION_FACTOR", "TOKEN_CHUNKS", "predict_phases",
           "parse_memory_size", "plan_for_policy", "PeakTracker", "default_budget_bytes"]

#: Multiplier on the derived per-token-per-layer activation count, calibrated against CPU measurements
#: (bench/memory_plan.py; see bench/RESULTS.md, "Memory planning").
ACTIVATION_FACTOR = 1.0
#: Multiplier on the no-grad forward's transient (activations of ~one layer alive at a time).
FORWARD_TRANSIENT_LAYERS = 1.2
#: token_chunk candidates: powers of two from 64 to 4096.
TOKEN_CHUNKS = tuple(2 ** k for k in range(6, 13))
#: On CUDA: the context and cuBLAS workspaces, outside ``max_memory_allocated`` but on the card.
CUDA_CONTEXT_BYTES = 768 * 2 ** 20
#: On CUDA: headroom for the caching allocator's fragmentation, as a share of the allocated peak.
CUDA_FRAGMENTATION = 0.10
#: On the CPU: glibc keeps freed blocks below the mmap threshold (128 KiB with MALLOC_MMAP_THRESHOLD_=131072) in its
#: fragmented heap; measured 2–9 MB on the CPU grid (largest for seq_chunk 1, whose small per-layer tensors all
#: live in the heap), so a constant covers it.
CPU_HEAP_SLACK_BYTES = 6 * 2 ** 20
#: Share of MemAvailable used when no budget is given on the CPU.
CPU_SAFE_SHARE = 0.5
GIB = 2 ** 30
ADAM_KEY = "adam_state + step decomposition"

_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ------------------------------------------------------------------------------------------------------ shapes
@dataclass(frozen=True)
class ModelShapes:
    """The shapes the planner needs, read from a transformers config and a peft LoraConfig."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    qkv_bias: bool
    lora_r: int
    lora_modules: tuple[str, ...]   # adapted linear layers of each decoder layer
    lora_scalars: int               # LoRA scalars of the whole model

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def weight_scalars(self) -> int:
        H, kv, I = self.hidden, self.kv_dim, self.intermediate
        per_layer = (H * self.heads * self.head_dim + 2 * H * kv + self.heads * self.head_dim * H + 3 * H * I + 2 * H)
        if self.qkv_bias:
            per_layer += self.heads * self.head_dim + 2 * kv
        embeddings = self.vocab * H * (1 if self.tied else 2)
        return self.layers * per_layer + embeddings + H


def _linear_shapes(config) -> dict[str, tuple[int, int]]:
    H, I = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or H // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    return {"q_proj": (H, heads * head_dim), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (heads * head_dim, H),
            "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}


def model_shapes(model_config, lora_config) -> ModelShapes:
    """Shapes of a Qwen2/Llama-style config and the LoRA scalar count implied by ``lora_config`` (r, targets)."""
    heads = model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    targets = lora_config.target_modules
    if isinstance(targets, str):
        if targets == "all-linear":
            modules = _LINEAR_NAMES
        else:  # a regular expression on module names
            import re
            modules = tuple(name for name in _LINEAR_NAMES if re.search(targets, f"layers.0.x.{name}"))
    else:
        modules = tuple(name for name in _LINEAR_NAMES if any(name == t or name.endswith(t) or t.endswith(name)
                                                              for t in targets))
    if not modules:
        raise ValueError(f"lora_config.target_modules={targets!r} names none of the decoder's linear layers "
                         f"{_LINEAR_NAMES}; funcprobe needs LoRA on decoder linears.")
    r = int(lora_config.r)
    shapes = _linear_shapes(model_config)
    rank_pattern = getattr(lora_config, "rank_pattern", None) or {}
    if rank_pattern:
        raise ValueError("lora_config.rank_pattern is not supported by the planner (one r for every module).")
    per_layer = sum(r * (shapes[name][0] + shapes[name][1]) for name in modules)
    layers = model_config.num_hidden_layers
    arch = getattr(model_config, "model_type", "")
    qkv_bias = bool(getattr(model_config, "attention_bias", arch == "qwen2"))
    return ModelShapes(vocab=model_config.vocab_size, hidden=model_config.hidden_size, layers=layers, heads=heads,
                       kv_heads=getattr(model_config, "num_key_value_heads", None) or heads, head_dim=head_dim,
                       intermediate=model_config.intermediate_size,
                       tied=bool(getattr(model_config, "tie_word_embeddings", False)), qkv_bias=qkv_bias,
                       lora_r=r, lora_modules=modules, lora_scalars=per_layer * layers)


def activation_elements(shapes: ModelShapes) -> tuple[float, float]:
    """(model-dtype elements, float32 elements) saved per token per decoder layer for the backward (module doc)."""
    H, I = shapes.hidden, shapes.intermediate
    q = shapes.heads * shapes.head_dim
    model_dtype = 2 * H + 3 * q + 2 * q + 4 * I + len(shapes.lora_modules) * shapes.lora_r
    float32 = 4 * H + shapes.heads
    return model_dtype, float32


# ------------------------------------------------------------------------------------------------------ phases
@dataclass(frozen=True)
class PhaseMemory:
    """One phase's named components (bytes); ``device`` ones count against the budget, ``host`` ones are on the CPU."""

    name: str
    device: dict[str, int]
    host: dict[str, int] = field(default_factory=dict)

    @property
    def device_bytes(self) -> int:
        return sum(self.device.values())

    @property
    def host_bytes(self) -> int:
        return sum(self.host.values())

    def to_dict(self) -> dict:
        return dict(name=self.name, device=dict(self.device), host=dict(self.host), device_bytes=self.device_bytes,
                    host_bytes=self.host_bytes)


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def phase_memory(shapes: ModelShapes, phase: str, *, dtype: torch.dtype, seq_len: int, response_len: int,
                 seq_chunk: int = 1, token_chunk: int = 256, logsoftmax_dtype: torch.dtype = torch.float32,
                 device: str = "cpu", accumulators: int = 0, stored_vectors: int = 0,
                 prompt_chunk_rows: int = 1, prompt_len: int | None = None, prefill_rows: int = 1,
                 adam_state: bool = False) -> PhaseMemory:
    """Components of one phase for ``seq_chunk`` sequences of ``seq_len`` tokens (``response_len`` scored each).

    phase: "grad" (one forward + vjps of a chunk, δH₁), "forward" (no-grad S or entropies, ΔH) or "sampling"
    (``prompt_chunk_rows`` rows decoded together up to ``seq_len`` tokens). ``accumulators`` / ``stored_vectors``:
    float64 LoRA-sized vectors held on the CPU. ``adam_state``: the AdamW moments and the step's decomposition
    (P, ηP, Δθ_state before they are copied to the CPU), 5 LoRA-sized float32 tensors on the params' device.
    """
    cuda = str(device).startswith("cuda")
    b, b32, lsm = _size(dtype), 4, _size(logsoftmax_dtype)
    H, V, layers = shapes.hidden, shapes.vocab, shapes.layers
    lora = shapes.lora_scalars
    device_parts = {"weights": shapes.weight_scalars * b,
                    "lora_tensors (module + policy copy)": 2 * lora * b}
    host_parts = {}
    # The model-dtype logits, their upcast and (grad path) the down-cast probabilities for the W contraction.
    extra_block = 0 if dtype == logsoftmax_dtype else b
    if phase == "grad":
        tokens = seq_chunk * seq_len
        rows = seq_chunk * response_len
        block_rows = min(token_chunk, rows)
        model_elements, float_elements = activation_elements(shapes)
        per_token = (model_elements * b + float_elements * b32) * layers * ACTIVATION_FACTOR
        device_parts["saved_activations"] = int(per_token * tokens)
        # embeddings output, final norm (3H incl. float32), final hidden, the gathered response rows
        device_parts["decoder_io"] = int(tokens * H * (3 * b + 2 * b32) + rows * H * b)
        device_parts["attention_mask"] = seq_chunk * seq_len * seq_len
        # The projection runs after the decoder forward and is released before the backward starts, so the
        # [token_chunk, V] block (+ the score directions being formed) and the backward's transient (the gradients
        # of one layer's widest activations, float32) are never alive together: the phase takes the larger.
        direction = max(_size(torch.promote_types(dtype, logsoftmax_dtype)), b)
        device_parts["score_directions"] = rows * H * direction
        device_parts["vjp_grads"] = lora * b
        vocab_block = block_rows * V * (lsm + 2 * extra_block)
        backward = tokens * (4 * H + 4 * shapes.intermediate) * b32
        if vocab_block >= backward:
            device_parts["vocab_block (> backward transient)"] = vocab_block
        else:
            device_parts["backward_transient (> vocab block)"] = backward
    elif phase == "forward":
        tokens = seq_chunk * seq_len
        rows = seq_chunk * response_len
        block_rows = min(token_chunk, rows)
        # No graph: one layer's activations are alive at a time, and they are gone before the vocabulary
        # projection starts, so the phase takes the larger of the two.
        transient = int(tokens * FORWARD_TRANSIENT_LAYERS * (4 * H + 3 * shapes.intermediate) * b32)
        vocab_block = block_rows * V * (2 * lsm + extra_block)
        device_parts["decoder_io"] = tokens * H * 2 * b + rows * H * b
        device_parts["attention_mask"] = seq_chunk * seq_len * seq_len
        if vocab_block >= transient:
            device_parts["vocab_block (> forward transient)"] = vocab_block
        else:
            device_parts["forward_transient (> vocab block)"] = transient
    elif phase == "sampling":
        rows = prompt_chunk_rows
        prompt_len = seq_len if prompt_len is None else prompt_len
        kv = 2 * layers * shapes.kv_dim * seq_len * rows * b
        device_parts["kv_cache"] = kv
        # torch.cat grows one layer's k and v per step: one layer's copy is transient
        device_parts["kv_cache_growth"] = kv // max(layers, 1)
        # each prompt is prefilled once (then its cache is repeated G times): prefill_rows prompts of prompt_len
        prefill = int(prefill_rows * prompt_len * FORWARD_TRANSIENT_LAYERS * (4 * H + 3 * shapes.intermediate) * b32)
        # the draw: [rows, V] logits (model dtype, upcast), exp, and the float64 CDF with its cumulative sum
        block_rows = min(token_chunk, rows)
        vocab_block = block_rows * V * (b + 2 * lsm + 16)
        if vocab_block >= prefill:
            device_parts["vocab_block (> prefill transient)"] = vocab_block
        else:
            device_parts["prefill_transient (> vocab block)"] = prefill
    else:
        raise ValueError(f"phase must be 'grad', 'forward' or 'sampling'; got {phase!r}.")
    if adam_state:
        device_parts[ADAM_KEY] = 5 * lora * 4
    if accumulators:
        host_parts["float64_accumulators"] = accumulators * lora * 8
    if stored_vectors:
        host_parts["stored_unit_vectors"] = stored_vectors * lora * 8
    if cuda:
        allocated = sum(device_parts.values())
        device_parts["cuda_fragmentation"] = int(CUDA_FRAGMENTATION * allocated)
        device_parts["cuda_context"] = CUDA_CONTEXT_BYTES
    else:  # one pool: host components count against the same budget
        device_parts["cpu_heap_slack"] = CPU_HEAP_SLACK_BYTES
        device_parts.update(host_parts)
        host_parts = {}
    return PhaseMemory(phase, {k: int(v) for k, v in device_parts.items()}, {k: int(v) for k, v in host_parts.items()})


# -------------------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class MemoryPlan:
    """Chunk sizes and store mode chosen for a budget, with the per-phase prediction behind the choice.

    ``peak_bytes``: the largest phase total in the budgeted pool (CUDA device memory incl. context reserve, or the
    CPU process's memory above the imports baseline); ``host_peak_bytes``: CPU-side bytes on CUDA (0 on the CPU).
    """

    device: str
    dtype: str
    batch_shape: tuple[int, int, int, int]
    units: int
    seq_chunk: int
    token_chunk: int
    prompt_chunk: int
    store_unit_vectors: bool
    budget_bytes: int
    host_budget_bytes: int
    peak_bytes: int
    host_peak_bytes: int
    peak_phase: str
    fits: bool
    phases: tuple[PhaseMemory, ...]
    lora_scalars: int
    weight_bytes: int
    peak_kind: str

    def phase(self, name: str) -> PhaseMemory:
        return next(p for p in self.phases if p.name == name)

    def to_dict(self) -> dict:
        return dict(device=self.device, dtype=self.dtype, batch_shape=list(self.batch_shape), units=self.units,
                    seq_chunk=self.seq_chunk, token_chunk=self.token_chunk, prompt_chunk=self.prompt_chunk,
                    store_unit_vectors=self.store_unit_vectors, budget_bytes=self.budget_bytes,
                    host_budget_bytes=self.host_budget_bytes, peak_bytes=self.peak_bytes,
                    host_peak_bytes=self.host_peak_bytes, peak_phase=self.peak_phase, fits=self.fits,
                    lora_scalars=self.lora_scalars, weight_bytes=self.weight_bytes, peak_kind=self.peak_kind,
                    phases=[p.to_dict() for p in self.phases])

    def __str__(self) -> str:
        B, G, P, T = self.batch_shape
        lines = [f"memory plan on {self.device} ({self.dtype}), B={B} G={G} prompt={P} new={T}: seq_chunk="
                 f"{self.seq_chunk}, token_chunk={self.token_chunk}, prompt_chunk={self.prompt_chunk}, unit vectors "
                 f"{'stored' if self.store_unit_vectors else 'recomputed'}",
                 f"predicted peak {_gb(self.peak_bytes)} ({self.peak_phase}; {self.peak_kind}) of budget "
                 f"{_gb(self.budget_bytes)}: {'fits' if self.fits else 'DOES NOT FIT'}"
                 + (f"; host {_gb(self.host_peak_bytes)} of {_gb(self.host_budget_bytes)}"
                    if self.device.startswith("cuda") else "")]
        for phase in self.phases:
            lines.append(f"  {phase.name}: {_gb(phase.device_bytes)}" +
                         (f" (+ host {_gb(phase.host_bytes)})" if phase.host else ""))
            for name, value in sorted(phase.device.items(), key=lambda kv: -kv[1]):
                lines.append(f"    {name:<38}{_gb(value):>12}")
            for name, value in phase.host.items():
                lines.append(f"    host: {name:<32}{_gb(value):>12}")
        return "\n".join(lines)


def _gb(value: int) -> str:
    return f"{value / GIB:.2f} GiB" if value >= 2 ** 28 else f"{value / 2 ** 20:.1f} MiB"


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else a conservative 4 GiB."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * GIB


def default_budget_bytes(device) -> int:
    """CUDA: the card's free memory (``torch.cuda.mem_get_info``); CPU: ``CPU_SAFE_SHARE`` of MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return int(CPU_SAFE_SHARE * available_memory_bytes())


def _seq_chunk_candidates(G: int, prompts_per_unit: int) -> list[int]:
    """Sequences per forward δH₁ can use: 1, powers of two below G, then whole prompts (k·G, k ≤ unit size)."""
    below = sorted({1} | {2 ** k for k in range(1, 16) if 2 ** k < G})
    return below + [G * k for k in range(1, prompts_per_unit + 1)]


def plan_memory(model_config, lora_config, batch_shape, *, dtype: torch.dtype = torch.bfloat16,
                budget_bytes: int | None = None, device="cuda", store: str | bool = "auto",
                units: str | int = "prompt", logsoftmax_dtype: torch.dtype = torch.float32,
                host_budget_bytes: int | None = None) -> MemoryPlan:
    """Predict the peak memory of sampling, δH₁ (both passes) and ΔH; pick seq_chunk, token_chunk and store mode.

    batch_shape: (B, G, prompt_len, max_new_tokens). budget_bytes: device memory on CUDA, process memory above the
    imports baseline on the CPU (None: ``default_budget_bytes(device)``). host_budget_bytes: CPU memory for the
    accumulators and stored unit vectors when the device is CUDA (None: half of MemAvailable).
    The choice walks a fixed chain of settings whose memory never decreases — token_chunk 64 → 512 at seq_chunk 1,
    then seq_chunk up to one unit's sequences, then storing the unit vectors, then token_chunk up to 4096 — and
    takes the last one that fits (with sampling at prompt_chunk 1), so seq_chunk, token_chunk and the store mode
    are non-decreasing in the budget; then prompt_chunk (prompts decoded together while sampling) is the largest
    of 8, 4, 2, 1 (≤ B) that still fits. On CUDA the stored unit vectors are host memory: with store="auto" they
    are kept whenever the host budget holds them, whatever the device budget. Raises ValueError (naming
    what needs how much) when even seq_chunk=1, token_chunk=64 with recomputed unit vectors does not fit.
    """
    B, G, prompt_len, new_tokens = (int(v) for v in batch_shape)
    if min(B, G, prompt_len, new_tokens) < 1:
        raise ValueError(f"batch_shape must be four positive ints (B, G, prompt_len, max_new_tokens); got "
                         f"{batch_shape}.")
    device = str(torch.device(device))
    cuda = device.startswith("cuda")
    if budget_bytes is None:
        budget_bytes = default_budget_bytes(device)
    if host_budget_bytes is None:
        host_budget_bytes = int(CPU_SAFE_SHARE * available_memory_bytes()) if cuda else budget_bytes
    if units == "prompt":
        U, prompts_per_unit = B, 1
    else:
        U, prompts_per_unit = int(units), B // int(units)
    if store not in ("auto", True, False):
        raise ValueError(f"store must be 'auto', True or False; got {store!r}.")
    shapes = model_shapes(model_config, lora_config)
    seq_len = prompt_len + new_tokens
    common = dict(dtype=dtype, seq_len=seq_len, response_len=new_tokens, logsoftmax_dtype=logsoftmax_dtype,
                  device=device)

    def phases_for(seq_chunk: int, token_chunk: int, stored: bool, prompt_chunk: int) -> tuple[PhaseMemory, ...]:
        return _phases(shapes, B, G, prompt_len, new_tokens, U, seq_chunk, token_chunk, stored, common,
                       prompt_chunk)

    def evaluate(seq_chunk: int, token_chunk: int, stored: bool, prompt_chunk: int = 1):
        phases = phases_for(seq_chunk, token_chunk, stored, prompt_chunk)
        peak_phase = max(phases, key=lambda p: p.device_bytes)
        host_peak = max(p.host_bytes for p in phases)
        fits = peak_phase.device_bytes <= budget_bytes and host_peak <= host_budget_bytes
        return phases, peak_phase, host_peak, fits

    seq_chunks = _seq_chunk_candidates(G, prompts_per_unit)
    max_rows = seq_chunks[-1] * new_tokens
    useful = [t for t in TOKEN_CHUNKS if t < 2 * max_rows] or [TOKEN_CHUNKS[0]]
    # On CUDA the stored vectors live on the host and never cost device memory: the store mode is decided after
    # the chunk sizes, against the host budget alone. On the CPU it competes with the chunks for the one pool.
    if store == "auto":
        stores = [False] if cuda else [False, True]
    else:
        stores = [bool(store)]
    chain = []  # non-decreasing memory along the chain
    for t in [t for t in useful if t <= 512]:
        chain.append((seq_chunks[0], t, stores[0]))
    t_mid = chain[-1][1]
    chain += [(s, t_mid, stores[0]) for s in seq_chunks[1:]]
    if len(stores) > 1:
        chain.append((seq_chunks[-1], t_mid, stores[1]))
    chain += [(seq_chunks[-1], t, stores[-1]) for t in useful if t > t_mid]

    chosen = None
    for setting in chain:
        result = evaluate(*setting)
        if not result[3]:
            break
        chosen = (setting, result)
    if chosen is None:
        phases, peak_phase, host_peak, _ = evaluate(*chain[0])
        top = sorted(peak_phase.device.items(), key=lambda kv: -kv[1])[:4]
        what = ", ".join(f"{name} {_gb(value)}" for name, value in top)
        raise ValueError(
            f"even the smallest setting (seq_chunk={chain[0][0]}, token_chunk={chain[0][1]}, prompt_chunk=1, "
            f"unit vectors {'stored' if chain[0][2] else 'recomputed'}) needs {_gb(peak_phase.device_bytes)} in "
            f"{peak_phase.name} (largest: {what})"
            + (f" and {_gb(host_peak)} of host memory" if cuda else "")
            + f", above the budget of {_gb(budget_bytes)}"
            + (f" / host budget {_gb(host_budget_bytes)}" if cuda else "")
            + ". Raise the budget, shorten the sequences, or use a smaller dtype/model.")
    (seq_chunk, token_chunk, stored), (phases, peak_phase, host_peak, fits) = chosen
    if cuda and store == "auto":
        result = evaluate(seq_chunk, token_chunk, True)
        if result[3]:
            stored, (phases, peak_phase, host_peak, fits) = True, result
    # Sampling: the most prompts decoded together (up to sample_batch's default 8) that still fit.
    prompt_chunk = 1
    for candidate in (8, 4, 2):
        if candidate <= B:
            result = evaluate(seq_chunk, token_chunk, stored, candidate)
            if result[3]:
                prompt_chunk = candidate
                phases, peak_phase, host_peak, fits = result
                break
    return MemoryPlan(device=device, dtype=str(dtype).replace("torch.", ""), batch_shape=(B, G, prompt_len,
                                                                                        new_tokens),
                      units=U, seq_chunk=seq_chunk, token_chunk=token_chunk,
                      prompt_chunk=prompt_chunk, store_unit_vectors=stored,
                      budget_bytes=int(budget_bytes), host_budget_bytes=int(host_budget_bytes),
                      peak_bytes=peak_phase.device_bytes, host_peak_bytes=host_peak if cuda else 0,
                      peak_phase=peak_phase.name, fits=fits, phases=phases, lora_scalars=shapes.lora_scalars,
                      weight_bytes=shapes.weight_scalars * _size(dtype),
                      peak_kind=("CUDA max_memory_allocated + context reserve" if cuda
                                 else "process memory above the imports baseline"))

def _phases(shapes: ModelShapes, B: int, G: int, prompt_len: int, new_tokens: int, U: int, seq_chunk: int,
            token_chunk: int, stored: bool, common: dict, prompt_chunk: int = 1) -> tuple[PhaseMemory, ...]:
    """(sampling, δH₁ pass 1, δH₁ pass 2, ΔH) for one setting; ``seq_chunk`` as delta_h1 takes it."""
    rows = seq_chunk if seq_chunk < G else (seq_chunk // G) * G
    # pass 1: ΣX, ΣY, the unit's X_u, Y_u (+2 per-sequence sums at seq_chunk 1), the vjp's float64 copy (1)
    pass1_acc = 4 + 1 + (2 if seq_chunk == 1 else 0)
    # pass 2: ΣX, ΣY, P, ηP, Δθ_state, 4 weighted sums, X_u, Y_u (recomputed) and one _weighted temporary
    pass2_acc = 12 + (0 if stored else (2 if seq_chunk == 1 else 0) + 1)
    stored_vectors = 2 * U if stored else 0
    prompt_chunk = max(1, min(prompt_chunk, B))
    grad1 = phase_memory(shapes, "grad", seq_chunk=rows, token_chunk=token_chunk, accumulators=pass1_acc,
                         stored_vectors=stored_vectors, adam_state=True, **common)
    if stored:
        pass2 = phase_memory(shapes, "forward", seq_chunk=0, token_chunk=token_chunk, accumulators=pass2_acc,
                             stored_vectors=stored_vectors, adam_state=True, **common)
        pass2 = PhaseMemory("delta_h1_pass2", _drop_zero(pass2.device), pass2.host)
    else:
        pass2 = phase_memory(shapes, "grad", seq_chunk=rows, token_chunk=token_chunk, accumulators=pass2_acc,
                             adam_state=True, **common)
        pass2 = PhaseMemory("delta_h1_pass2", pass2.device, pass2.host)
    sampling = phase_memory(shapes, "sampling", prompt_chunk_rows=prompt_chunk * G, token_chunk=token_chunk,
                            prompt_len=prompt_len, prefill_rows=prompt_chunk, **common)
    return (sampling,
            PhaseMemory("delta_h1_pass1", grad1.device, grad1.host),
            pass2,
            PhaseMemory("delta_h", **_parts(phase_memory(shapes, "forward", seq_chunk=rows,
                                                         token_chunk=token_chunk, **common))))



def predict_phases(model_config, lora_config, batch_shape, *, seq_chunk: int, token_chunk: int,
                   store: bool, dtype: torch.dtype = torch.bfloat16, device="cuda", units: str | int = "prompt",
                   logsoftmax_dtype: torch.dtype = torch.float32, prompt_chunk: int = 8) -> tuple[PhaseMemory, ...]:
    """The four phases' components for a GIVEN setting (no choice, no budget): what a run with these chunks needs."""
    B, G, prompt_len, new_tokens = (int(v) for v in batch_shape)
    U = B if units == "prompt" else int(units)
    common = dict(dtype=dtype, seq_len=prompt_len + new_tokens, response_len=new_tokens,
                  logsoftmax_dtype=logsoftmax_dtype, device=str(torch.device(device)))
    return _phases(model_shapes(model_config, lora_config), B, G, prompt_len, new_tokens, U, seq_chunk,
                   token_chunk, bool(store), common, prompt_chunk)


def _parts(phase: PhaseMemory) -> dict:
    return dict(device=phase.device, host=phase.host)


def _drop_zero(parts: dict) -> dict:
    """The stored-vector pass 2 does no forward: keep only the persistent parts."""
    keep = ("weights", "lora_tensors (module + policy copy)", ADAM_KEY, "cpu_heap_slack", "float64_accumulators",
            "stored_unit_vectors",
            "cuda_context", "cuda_fragmentation")
    return {k: v for k, v in parts.items() if k in keep}


# ------------------------------------------------------------------------------------------- integration helpers
_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40, "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30}


def parse_memory_size(text: str | int | float) -> int:
    """Bytes from '40GB' (40·10⁹), '16GiB' or '16G' (16·2³⁰), '512MB', '1.5e9' or an int; for --memory-budget."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        import re

        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"cannot read a memory size from {text!r}; write e.g. 40GB (10⁹ bytes), 16GiB (2³⁰ "
                             "bytes), 512MB or a number of bytes.")
        value, unit = float(match.group(1)), match.group(2).lower()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"a memory budget must be positive; got {text!r}.")
    return size


def plan_for_policy(policy, batch_shape, *, budget_bytes: int | None = None, store: str | bool = "auto",
                    units: str | int = "prompt", host_budget_bytes: int | None = None) -> MemoryPlan:
    """``plan_memory`` with the model config, LoRA config, dtype, device and log-softmax dtype read from a Policy."""
    module = policy.module
    model_config = module.get_base_model().config
    lora_config = module.peft_config[module.active_adapter]
    return plan_memory(model_config, lora_config, batch_shape, dtype=policy.dtype, budget_bytes=budget_bytes,
                       device=policy.device, store=store, units=units, logsoftmax_dtype=policy.logsoftmax_dtype,
                       host_budget_bytes=host_budget_bytes)


class PeakTracker:
    """Peak memory since the last ``reset()``: CUDA ``max_memory_allocated`` or the process's VmHWM on the CPU.

    ``lap()`` returns the peak since the previous reset and resets again, for per-chunk peaks. On the CPU the reset
    writes ``/proc/self/clear_refs`` (Linux), which resets the whole process's high-water mark; elsewhere, or when
    that fails, the current RSS is returned (kind ``"rss_now"``). VmHWM rather than ``ru_maxrss``: after a fork and
    exec, ``ru_maxrss`` starts at the parent's high-water mark.
    """

    def __init__(self, device):
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.kind = "cuda_max_allocated"
        else:
            self.kind = "cpu_vmhwm" if self._clear_refs() else "rss_now"

    @staticmethod
    def _clear_refs() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _status_bytes(field_name: str) -> int | None:
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith(field_name + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def reset(self) -> None:
        if self.kind == "cuda_max_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "cpu_vmhwm":
            self._clear_refs()

    def read(self) -> int:
        if self.kind == "cuda_max_allocated":
            return int(torch.cuda.max_memory_allocated(self.device))
        value = self._status_bytes("VmHWM" if self.kind == "cpu_vmhwm" else "VmRSS")
        return int(value or 0)

    def lap(self) -> int:
        peak = self.read()
        self.reset()
        return peak
