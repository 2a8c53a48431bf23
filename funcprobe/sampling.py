"""Sampling a rollout batch from π_θ, functionally: θ is a params dict, the module is never touched.

Spec §0 (``shared/spec/ESTIMATORS.md``). :func:`sample_batch` draws G responses for each of B prompts from
π_θ(t_k | t_<k) = softmax(z_k / τ)[t_k] with θ = ``params`` (LoRA tensors only) and the policy's τ, scores them with a
reward function, and returns a validated :class:`~funcprobe.batch.RolloutBatch` on the CPU with S_{n,g}(θ) cached.

How it runs:

* The decoder is evaluated with ``torch.func.functional_call(policy._decoder, params, ...)`` under
  ``torch.no_grad()`` — the same call, LM head and chunked vocabulary projection that ``Policy.sequence_logprobs``
  uses — so the recorded S matches teacher-forced S to float rounding, and the module's tensors are never written.
* KV cache: the first call returns a transformers ``DynamicCache`` (``use_cache=True``), which later calls pass back
  (``cache=`` in transformers ≥ 5, ``past_key_values=`` before); one new token per row per step, with the attention
  mask grown by one column and position ids continuing from the mask (as ``Policy`` derives them). The cache only
  holds activations computed inside ``functional_call``, so it works unchanged with a params dict. Each prompt is
  prefilled once and its cache repeated G times (``Cache.batch_repeat_interleave``); rows that hit EOS are dropped
  from the cache (``Cache.batch_select_indices``). ``kv_cache=False`` recomputes the whole prefix at every step
  (slower, same result); it is also used, with a warning, if the model returns no cache.
* Sampling is exact, with no truncation: the next token is found by inverting the CDF of softmax(z/τ) (float64
  cumulative sum) at a uniform draw. ``top_p < 1`` or ``top_k > 0`` is refused (a truncated sampler does not draw
  from π_θ and would silently bias every estimator).
* Randomness: prompt n (its index within the call, plus ``first_prompt_index``) has its own ``torch.Generator``
  seeded from (seed, n) (:func:`prompt_generator`); at every decoding step it draws G uniforms, one per response,
  whether or not the response has already ended. The batch therefore does not depend on ``prompt_chunk`` or on which
  prompts share a forward, and shards of a prompt list sampled by different processes (with ``first_prompt_index``
  set to each shard's offset) reproduce the single-process batch. The global RNG is never used.
* Responses stop at EOS (included in the response and in ``response_mask``) or after ``max_new_tokens`` tokens.

Batch layout: ``input_ids[n, g]`` = [pad … pad, prompt, response, pad … pad], the prompt right-aligned at column
P = the longest prompt, the response starting at column P.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import numbers
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .batch import RolloutBatch
from .logprobs import _chunk_logits
from .policy import Policy, _progress
from .rewards import REWARDS, RewardFn, check_rewards

__all__ = ["SampledBatch", "sample_batch", "compute_advantages", "prompt_generator", "ADVANTAGES", "GRPO_STD_EPS"]

#: Advantage schemes: "grpo" A = R − mean_g R (Dr. GRPO); "grpo_std" A = (R − mean_g R) / (std_g R + GRPO_STD_EPS).
ADVANTAGES = ("grpo", "grpo_std")
#: Added to the group standard deviation by advantage="grpo_std" (a group with equal rewards gets A = 0).
GRPO_STD_EPS = 1e-6

_TRUNCATION_REASON = ("a truncated sampler (top-p / top-k) does not draw from π_θ, so the batch would not be a sample "
                      "of the policy whose entropy is being estimated, and it would silently bias every estimator "
                      "(S, X, Y, δH₁ and the importance weights of ΔH all assume t ∼ π_θ; spec §0)")


@dataclass(frozen=True, eq=False)
class SampledBatch:
    """The result of :func:`sample_batch`.

    Attributes:
        batch: the RolloutBatch (CPU) with ``logprobs`` = S(θ) recorded while sampling and ``rewards``.
        prompts: the B prompt texts (decoded from the ids when token ids were given).
        responses: ``responses[n][g]``, the decoded response text (EOS, padding and special tokens removed).
        eos_count: how many of the B·G responses ended with EOS (the others hit ``max_new_tokens``).
        timings: seconds and counts: ``prefill_s``, ``decode_s``, ``reward_s``, ``total_s``, ``generated_tokens``,
            ``tokens_per_s`` (generated tokens over prefill + decode time), ``forward_calls``.
    """

    batch: RolloutBatch
    prompts: list[str]
    responses: list[list[str]]
    eos_count: int
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def truncated_count(self) -> int:
        """How many responses were cut at ``max_new_tokens`` without EOS."""
        return self.batch.num_sequences - self.eos_count


def prompt_generator(seed: int, prompt_index: int) -> torch.Generator:
    """The CPU generator of prompt ``prompt_index`` under ``seed``: seeded by a hash of the pair (independent
    streams for nearby seeds and indices)."""
    digest = hashlib.blake2b(f"funcprobe.sample_batch:{int(seed)}:{int(prompt_index)}".encode(),
                             digest_size=8).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") >> 1)


def compute_advantages(rewards: Tensor, advantage: str = "grpo") -> Tensor:
    """GRPO advantages from rewards [B, G], float64.

    "grpo": A = R − (1/G) Σ_j R_j (Dr. GRPO, spec §3's default). "grpo_std": A = (R − mean) / (std + 1e-6), with the
    sample standard deviation (correction 1, as TRL's GRPOTrainer computes it).
    """
    if advantage not in ADVANTAGES:
        raise ValueError(f"advantage must be one of {ADVANTAGES}; got {advantage!r}.")
    rewards = torch.as_tensor(rewards, dtype=torch.float64)
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if advantage == "grpo":
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + GRPO_STD_EPS)


# ---------------------------------------------------------------------------------------------------- validation
def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}; got {value!r}.")
    return int(value)


def _check_sampler(policy: Policy, temperature: Any, top_p: Any, top_k: Any) -> None:
    if top_p is not None and float(top_p) != 1.0:
        raise ValueError(f"top_p={top_p} is refused: {_TRUNCATION_REASON}. Sample with top_p=1.0 and top_k=0.")
    if top_k is not None and int(top_k) != 0:
        raise ValueError(f"top_k={top_k} is refused: {_TRUNCATION_REASON}. Sample with top_p=1.0 and top_k=0.")
    if temperature is not None and float(temperature) != policy.temperature:
        raise ValueError(
            f"temperature={temperature} differs from the policy's τ={policy.temperature}. The batch must be drawn "
            "from the π_θ = softmax(z/τ) whose log-probabilities and entropies the estimators compute with the "
            f"policy's τ. Build the policy with that temperature, e.g. Policy.from_peft(model, "
            f"temperature={temperature}) or load_policy(..., temperature={temperature}), or leave temperature=None.")


def _length_norms(length_norm: Any, max_new_tokens: int, B: int) -> Tensor:
    if isinstance(length_norm, str):
        if length_norm != "max_new_tokens":
            raise ValueError(f"length_norm must be 'max_new_tokens' (Dr. GRPO: L_n = the generation budget) or a "
                             f"positive number; got {length_norm!r}.")
        value = float(max_new_tokens)
    elif isinstance(length_norm, numbers.Real) and not isinstance(length_norm, bool):
        value = float(length_norm)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"length_norm must be > 0 and finite; got {length_norm!r}.")
    else:
        raise ValueError(f"length_norm must be 'max_new_tokens' or a positive number; got {length_norm!r}.")
    return torch.full((B,), value, dtype=torch.float64)


def _prompt_ids(prompts: Any, tokenizer: Any, vocab_size: int) -> tuple[list[list[int]], list[str]]:
    """(token ids, texts) of the prompts, given as texts or as token ids."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        found = "an empty list" if isinstance(prompts, Sequence) and not prompts else type(prompts).__name__
        raise ValueError("prompts must be a non-empty list of strings (tokenised with the tokenizer) or of token-id "
                         f"lists; got {found}.")
    if all(isinstance(p, str) for p in prompts):
        texts = list(prompts)
        ids = [list(map(int, tokenizer(text)["input_ids"])) for text in texts]
    elif all(isinstance(p, (Sequence, Tensor)) and not isinstance(p, str) for p in prompts):
        ids = []
        for index, prompt in enumerate(prompts):
            row = prompt.tolist() if isinstance(prompt, Tensor) else list(prompt)
            if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in row):
                raise ValueError(f"prompts[{index}] must be a list of integer token ids; got {row[:8]}.")
            ids.append([int(t) for t in row])
        texts = [tokenizer.decode(row, skip_special_tokens=True) for row in ids]
    else:
        raise ValueError("prompts must be all strings or all token-id lists; got a mix "
                         f"({sorted({type(p).__name__ for p in prompts})}).")
    for index, row in enumerate(ids):
        if not row:
            raise ValueError(f"prompts[{index}] tokenises to no tokens; every prompt needs at least one token "
                             "(a response token is predicted from the position before it).")
        bad = [t for t in row if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompts[{index}] holds token id {bad[0]} outside the model's vocabulary "
                             f"[0, {vocab_size}). Was it tokenised with another tokenizer?")
    return ids, texts


def _eos_ids(eos_token_id: Any, tokenizer: Any) -> list[int]:
    if eos_token_id is None:
        eos_token_id = getattr(tokenizer, "eos_token_id", None)
    if eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id; pass eos_token_id=... (an id or a list of ids) so that "
                         "responses can stop.")
    ids = [eos_token_id] if isinstance(eos_token_id, numbers.Integral) else list(eos_token_id)
    if not ids or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"eos_token_id must be an integer or a non-empty list of integers; got {eos_token_id!r}.")
    return [int(i) for i in ids]


# ---------------------------------------------------------------------------------------------------- decoding
class _Decoder:
    """The policy's decoder at θ = params, called functionally; knows how to pass a KV cache."""

    def __init__(self, policy: Policy, params: Mapping[str, Tensor]):
        self.policy = policy
        prefix = policy._decoder_prefix
        self.params = {name[len(prefix):]: tensor for name, tensor in params.items()}
        signature = inspect.signature(policy._decoder.forward)
        self.cache_kwarg = "cache" if "cache" in signature.parameters else "past_key_values"
        self.calls = 0

    def new_cache(self) -> Any:
        """An empty ``DynamicCache`` for the decoder (passed in explicitly: transformers 4.x returns a legacy tuple
        when it creates the cache itself), or None to let the model make its own."""
        try:
            from transformers import DynamicCache
        except ImportError:
            return None
        try:
            return DynamicCache(config=self.policy._decoder.config)
        except TypeError:
            return DynamicCache()

    def __call__(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, *, cache: Any = None,
                 use_cache: bool) -> tuple[Tensor, Any]:
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=use_cache)
        if cache is not None:
            kwargs[self.cache_kwarg] = cache
        out = torch.func.functional_call(self.policy._decoder, self.params, args=(), kwargs=kwargs)
        self.calls += 1
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        new_cache = None
        if use_cache:
            new_cache = getattr(out, "cache", None)
            if new_cache is None:
                new_cache = getattr(out, "past_key_values", None)
        return hidden[:, -1], new_cache


def _left_padded(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def _positions(mask: Tensor) -> Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _draw(policy: Policy, hidden: Tensor, uniforms: Tensor) -> tuple[Tensor, Tensor]:
    """Sample one token per row from softmax(z/τ) by inverting its CDF at ``uniforms``; (tokens, log π) on device.

    z is formed exactly as ``Policy.sequence_logprobs`` forms it (``_chunk_logits``: the model-dtype matmul, upcast to
    the policy's log-softmax dtype, then / τ), in row chunks of ``policy.token_chunk``.
    """
    head = policy._lm_head
    inv_temperature = 1.0 / policy.temperature
    tokens, logprobs = [], []
    for start in range(0, hidden.shape[0], policy.token_chunk):
        stop = start + policy.token_chunk
        logits = _chunk_logits(hidden[start:stop], head.weight, head.bias, inv_temperature, policy.logsoftmax_dtype)
        if not bool(torch.isfinite(logits).all()):
            raise FloatingPointError(
                "non-finite logits while sampling: the model produced NaN/inf hidden states at θ = params (a "
                "diverged update, or an attention implementation that gives NaN on left-padded prompts: try "
                "prompt_chunk=1, which needs no padding).")
        log_normaliser = torch.logsumexp(logits, dim=1)
        cdf = torch.exp(logits - log_normaliser[:, None]).to(torch.float64).cumsum(dim=1)
        targets = uniforms[start:stop].to(cdf.device) * cdf[:, -1]
        # right=True: the first v with cdf[v] > u·total, which always has p_v > 0.
        chosen = torch.searchsorted(cdf, targets[:, None], right=True).squeeze(1).clamp(max=logits.shape[1] - 1)
        picked = logits.gather(1, chosen[:, None]).squeeze(1)
        tokens.append(chosen)
        logprobs.append((picked - log_normaliser).to(torch.float64))
    return torch.cat(tokens), torch.cat(logprobs)


@dataclass
class _ChunkResult:
    tokens: Tensor     # int64 [R, T] on the CPU, pad after the end
    lengths: Tensor    # int64 [R]
    hit_eos: Tensor    # bool [R]
    logprobs: Tensor   # float64 [R]


def _sample_chunk(policy: Policy, decoder: _Decoder, prompt_ids: list[list[int]], generators: list[torch.Generator],
                  G: int, max_new_tokens: int, eos_ids: Tensor, pad_id: int, kv_cache: bool,
                  timings: dict[str, float]) -> tuple[_ChunkResult, bool]:
    """Sample G responses for each prompt of the chunk; rows are prompt-major (row = i·G + g)."""
    device = policy.device
    rows = len(prompt_ids) * G
    t0 = time.perf_counter()
    ids, mask = _left_padded(prompt_ids, pad_id, device)
    cache = None
    if kv_cache:
        # Prefill each distinct prompt once, then repeat its cache for its G responses.
        hidden, cache = decoder(ids, mask, _positions(mask), cache=decoder.new_cache(), use_cache=True)
        if cache is None:
            warnings.warn("the model returned no KV cache; sampling recomputes the whole prefix at every step "
                          "(correct, slower).", RuntimeWarning, stacklevel=3)
            kv_cache = False
        elif hasattr(cache, "batch_repeat_interleave"):
            cache.batch_repeat_interleave(G)
            hidden = hidden.repeat_interleave(G, dim=0)
        else:
            cache = None
    ids, mask = ids.repeat_interleave(G, dim=0), mask.repeat_interleave(G, dim=0)
    if not kv_cache:
        hidden, _ = decoder(ids, mask, _positions(mask), use_cache=False)
    elif cache is None:  # a cache that cannot be repeated: prefill every row
        hidden, cache = decoder(ids, mask, _positions(mask), cache=decoder.new_cache(), use_cache=True)
    # Ended rows leave the forward (their cache rows dropped) unless the cache cannot drop rows; then they ride
    # along on padding with a 0 attention-mask column.
    droppable = not kv_cache or hasattr(cache, "batch_select_indices")
    t1 = time.perf_counter()

    tokens = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long)
    lengths = torch.zeros(rows, dtype=torch.long)
    hit_eos = torch.zeros(rows, dtype=torch.bool)
    logprobs = torch.zeros(rows, dtype=torch.float64)
    active = torch.arange(rows)                # forward row i is output row active[i]
    alive = torch.ones(rows, dtype=torch.bool)  # forward rows still generating
    steps = 0
    for step in range(max_new_tokens):
        # Every prompt draws G uniforms per step, used or not: its stream does not depend on the other prompts.
        uniforms = torch.cat([torch.rand(G, generator=g, dtype=torch.float64) for g in generators])
        chosen, step_logprobs = _draw(policy, hidden, uniforms[active])
        chosen_cpu, step_cpu = chosen.cpu(), step_logprobs.cpu()
        out_rows = active[alive]
        tokens[out_rows, step] = chosen_cpu[alive]
        logprobs[out_rows] += step_cpu[alive]
        lengths[out_rows] += 1
        ended = alive & torch.isin(chosen_cpu, eos_ids)
        hit_eos[active[ended]] = True
        alive = alive & ~ended
        steps = step + 1
        if step == max_new_tokens - 1 or not bool(alive.any()):
            break
        if droppable and bool(ended.any()):
            keep = alive.nonzero().squeeze(1)
            keep_device = keep.to(device)
            if kv_cache:
                cache.batch_select_indices(keep_device)
            else:
                ids = ids[keep_device]
            active, alive = active[keep], alive[keep]
            chosen, mask = chosen[keep_device], mask[keep_device]
        alive_device = alive.to(device)
        next_tokens = torch.where(alive_device, chosen, torch.full_like(chosen, pad_id))[:, None]
        mask = torch.cat([mask, alive_device.to(mask.dtype)[:, None]], dim=1)
        if kv_cache:
            position = (mask.sum(dim=1, keepdim=True) - 1).clamp(min=0)
            hidden, cache = decoder(next_tokens, mask, position, cache=cache, use_cache=True)
        else:
            ids = torch.cat([ids, next_tokens], dim=1)
            hidden, _ = decoder(ids, mask, _positions(mask), use_cache=False)
    t2 = time.perf_counter()
    timings["prefill_s"] += t1 - t0
    timings["decode_s"] += t2 - t1
    return _ChunkResult(tokens[:, :steps], lengths, hit_eos, logprobs), kv_cache


# ---------------------------------------------------------------------------------------------------- public API
def sample_batch(policy: Policy, params: Mapping[str, Tensor], prompts: Sequence[str] | Sequence[Sequence[int]], *,
                 G: int, reward_fn: RewardFn | str, max_new_tokens: int, seed: int, tokenizer: Any,
                 temperature: float | None = None, length_norm: str | float = "max_new_tokens",
                 advantage: str = "grpo", top_p: float = 1.0, top_k: int = 0, prompt_chunk: int = 8,
                 meta: Mapping[str, Any] | None = None, eos_token_id: int | Sequence[int] | None = None,
                 first_prompt_index: int = 0, kv_cache: bool = True,
                 progress: bool | None = False) -> SampledBatch:
    """Sample G responses per prompt from π_θ (θ = ``params``), score them, and build the rollout batch.

    Args:
        policy: the functional policy; its module is never modified and its τ is the sampling temperature.
        params: θ, a LoRA params dict (``policy.params`` or an updated copy), checked with ``policy.check_params``.
        prompts: B prompt strings (tokenised with ``tokenizer``, special tokens as the tokenizer adds them by
            default) or B lists of token ids.
        G: responses per prompt (≥ 2, for the leave-one-out baseline).
        reward_fn: ``reward_fn(prompts, responses, meta) -> float [B, G]`` (see ``funcprobe.rewards``), or a name in
            ``funcprobe.rewards.REWARDS`` ("answer", "tag").
        max_new_tokens: the generation budget; a response without EOS is cut there.
        seed: the sampling seed; prompt n draws from ``prompt_generator(seed, first_prompt_index + n)``.
        tokenizer: decodes responses (and prompt ids); gives EOS and pad ids.
        temperature: must be None or equal ``policy.temperature`` (refused otherwise).
        length_norm: "max_new_tokens" (Dr. GRPO: L_n = max_new_tokens) or a positive number, used for every prompt.
        advantage: "grpo" (A = R − group mean) or "grpo_std" (divided by the group's sample std + 1e-6).
        top_p, top_k: must stay 1.0 and 0 (truncated sampling is refused, spec §0).
        prompt_chunk: prompts decoded together (prompt_chunk·G rows per forward); does not change the batch.
        meta: passed to the reward function (``{}`` when None), e.g. ``{"answers": [...]}``.
        eos_token_id: stop token id(s); default the tokenizer's ``eos_token_id``.
        first_prompt_index: the global index of ``prompts[0]``, for sharding a prompt list across processes.
        kv_cache: decode with a KV cache (default) or recompute the prefix at every step.
        progress: a progress bar over prompt chunks (None: only when stderr is a terminal).

    Returns:
        SampledBatch: the batch (CPU; logprobs = S(θ) in float64, rewards, advantages, length_norm), the prompt and
        response texts, the number of responses that ended with EOS, and timings.
    """
    started = time.perf_counter()
    _check_sampler(policy, temperature, top_p, top_k)
    G = _check_int("G", G, 2)
    max_new_tokens = _check_int("max_new_tokens", max_new_tokens, 1)
    prompt_chunk = _check_int("prompt_chunk", prompt_chunk, 1)
    first_prompt_index = _check_int("first_prompt_index", first_prompt_index, 0)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer; got {seed!r}.")
    if advantage not in ADVANTAGES:
        raise ValueError(f"advantage must be one of {ADVANTAGES} ('grpo': A = R − group mean; 'grpo_std': divided "
                         f"by the group std + {GRPO_STD_EPS}); got {advantage!r}.")
    if isinstance(reward_fn, str):
        if reward_fn not in REWARDS:
            raise ValueError(f"unknown reward {reward_fn!r}; built-ins are {sorted(REWARDS)}, or pass a callable "
                             "reward_fn(prompts, responses, meta) -> [B, G].")
        reward_fn = REWARDS[reward_fn]
    if not callable(reward_fn):
        raise ValueError(f"reward_fn must be callable as reward_fn(prompts, responses, meta) -> [B, G]; got "
                         f"{type(reward_fn).__name__}.")
    if tokenizer is None:
        raise ValueError("sample_batch needs the tokenizer (to tokenise prompts and decode responses).")
    policy.check_params(params)
    if policy.module.training:
        raise ValueError("the policy's module is in training mode (dropout on), so sampling would not draw from "
                         "π_θ. Call policy.module.eval().")
    prompt_ids, prompt_texts = _prompt_ids(prompts, tokenizer, policy.vocab_size)
    B = len(prompt_ids)
    norms = _length_norms(length_norm, max_new_tokens, B)
    eos_list = _eos_ids(eos_token_id, tokenizer)
    eos_ids = torch.tensor(eos_list, dtype=torch.long)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = eos_list[0] if pad_id is None else int(pad_id)

    timings = {"prefill_s": 0.0, "decode_s": 0.0}
    decoder = _Decoder(policy, params)
    results: list[_ChunkResult] = []
    starts = range(0, B, prompt_chunk)
    with torch.no_grad():
        for start in _progress(starts, total=len(starts), desc="sampling", enabled=progress):
            stop = min(start + prompt_chunk, B)
            generators = [prompt_generator(seed, first_prompt_index + n) for n in range(start, stop)]
            result, kv_cache = _sample_chunk(policy, decoder, prompt_ids[start:stop], generators, G, max_new_tokens,
                                             eos_ids, pad_id, kv_cache, timings)
            results.append(result)

    # Assemble [B, G, P + T]: prompts right-aligned at column P, responses from column P.
    P = max(len(row) for row in prompt_ids)
    lengths = torch.cat([r.lengths for r in results]).reshape(B, G)
    T = int(lengths.max())
    input_ids = torch.full((B, G, P + T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, G, P + T), dtype=torch.bool)
    response_mask = torch.zeros((B, G, P + T), dtype=torch.bool)
    for n, row in enumerate(prompt_ids):
        input_ids[n, :, P - len(row):P] = torch.tensor(row, dtype=torch.long)
        attention_mask[n, :, P - len(row):P] = True
    flat_tokens = torch.full((B * G, T), pad_id, dtype=torch.long)
    offset = 0
    for r in results:
        width = min(r.tokens.shape[1], T)
        flat_tokens[offset:offset + r.tokens.shape[0], :width] = r.tokens[:, :width]
        offset += r.tokens.shape[0]
    response_tokens = flat_tokens.reshape(B, G, T)
    in_response = torch.arange(T)[None, None, :] < lengths[:, :, None]
    input_ids[:, :, P:] = torch.where(in_response, response_tokens, torch.full_like(response_tokens, pad_id))
    attention_mask[:, :, P:] = in_response
    response_mask[:, :, P:] = in_response
    logprobs = torch.cat([r.logprobs for r in results]).reshape(B, G)
    hit_eos = torch.cat([r.hit_eos for r in results]).reshape(B, G)

    responses = []
    for n in range(B):
        group = []
        for g in range(G):
            count = int(lengths[n, g]) - int(hit_eos[n, g])
            group.append(tokenizer.decode(response_tokens[n, g, :count].tolist(), skip_special_tokens=True))
        responses.append(group)

    reward_started = time.perf_counter()
    raw = reward_fn(list(prompt_texts), [list(group) for group in responses], {} if meta is None else meta)
    rewards = check_rewards(raw, B, G, reward_fn)
    timings["reward_s"] = time.perf_counter() - reward_started
    advantages = compute_advantages(rewards, advantage)
    batch = RolloutBatch(input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask,
                         advantages=advantages, length_norm=norms, logprobs=logprobs, rewards=rewards,
                         pad_token_id=pad_id)
    generated = int(lengths.sum())
    timings["total_s"] = time.perf_counter() - started
    timings["generated_tokens"] = float(generated)
    timings["tokens_per_s"] = generated / max(timings["prefill_s"] + timings["decode_s"], 1e-12)
    timings["forward_calls"] = float(decoder.calls)
    timings["kv_cache"] = float(kv_cache)
    return SampledBatch(batch=batch, prompts=list(prompt_texts), responses=responses,
                        eos_count=int(hit_eos.sum()), timings=timings)
