"""Sampling a rollout batch from π_θ, functionally: θ is a params dict, the module is never touched.

Spec §0 and §6 (``shared/spec/ESTIMATORS.md``). :func:`sample_batch` draws G responses for each of B prompts from
π_θ(t_k | t_<k) = softmax(z_k / τ)[t_k] with θ = ``params`` and the policy's τ, scores them with a reward function,
and returns a validated :class:`~funcprobe.batch.RolloutBatch` on the CPU. :func:`draw_responses` is the token-level
part (no tokenizer, no reward); :func:`redraw` repeats a draw at other parameters with the same random numbers —
the common random numbers of spec §6.

How it runs:

* The decoder is evaluated with ``torch.func.functional_call(policy.decoder, params, ...)`` under
  ``torch.no_grad()`` — the same call, LM head and logits (``chunk_logits``) that ``Policy.sequence_logprobs`` uses
  — so the module's tensors are never written. The log-probabilities recorded while sampling (``batch.logprobs``)
  are a *check* only: the estimators recompute S on their one teacher-forced path (spec §6).
* Mask-safe layout: no forward ever sees a leading pad. Prompts decoded together are *right*-padded (every row starts
  with a real token at column 0; the gap after a short prompt is masked, and position ids come from the mask), so no
  query row is fully masked — with left padding, eager attention gives NaN on such rows (in float64 it did), and
  0·NaN then reaches the real rows through the attention values. The teacher-forced path left-aligns its rows the same
  way (``Policy``).
* KV cache: the prompts are prefilled once (``use_cache=True`` into a ``DynamicCache`` passed in), and each prompt's
  cache is repeated G times (``Cache.batch_repeat_interleave``); one new token per row per step; rows that stop are
  dropped from the cache (``Cache.batch_select_indices``). ``kv_cache=False`` recomputes the whole prefix at every
  step (slower, the same tokens); it is also used, with a warning, if the model returns no cache.
* Sampling is exact, with no truncation: the next token is found by inverting the CDF of softmax(z/τ) (float64
  cumulative sum) at a uniform draw. ``top_p < 1`` or ``top_k > 0`` is refused (a truncated sampler does not draw
  from π_θ and would silently bias every estimator).
* Randomness: prompt row n has its own ``torch.Generator`` seeded from (seed, ``first_prompt_index`` + n)
  (:func:`prompt_generator`); at every decoding step it draws G uniforms u[k, g], one per response, whether or not the
  response has already stopped. The draw of response g at position k is therefore a fixed function of the prompt,
  the tokens before it and u[k, g]: the batch does not depend on ``prompt_chunk``, on which prompts share a forward,
  or on the number of processes sampling shards of the prompt list; and :func:`redraw` at θ⁺ draws y⁺ with exactly
  the uniforms that drew y at θ (common random numbers). The global RNG is never used.
* Stop tokens: a response ends at the first stop token (included in the response and in ``response_mask``) or after
  ``max_new_tokens`` tokens. The stop set is the union of the tokenizer's ``eos_token_id``, every id in the model's
  ``generation_config.eos_token_id`` (an int or a list: chat models list their turn-end ids there) and any
  ``stop_token_ids`` given (:func:`collect_stop_ids`).

Batch layout: ``input_ids[n, g]`` = [pad … pad, prompt, response, pad … pad], the prompt right-aligned at column
P = the longest prompt, the response starting at column P.
"""

from __future__ import annotations

import dataclasses
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

from .batch import AdvantageRecipe, RolloutBatch
from .logprobs import chunk_logits
from .policy import Policy
from .progress import progress_bar
from .objective import SCALE_REWARDS, AdvantageInfo, compute_advantages
from .rewards import REWARDS, RewardFn, check_rewards

__all__ = ["SampledBatch", "DrawSpec", "Responses", "sample_batch", "rescore", "draw_responses", "redraw", "collect_stop_ids",
           "prompt_generator", "merge_batches", "gather_sampled"]

_TRUNCATION_REASON = ("a truncated sampler (top-p / top-k) does not draw from π_θ, so the batch would not be a sample "
                      "of the policy whose entropy is being estimated, and it would silently bias every estimator "
                      "(S, X, Y, δH₁ and the importance weights of ΔH all assume t ∼ π_θ)")


# ------------------------------------------------------------------------------------------------------ the draw
@dataclass(frozen=True)
class DrawSpec:
    """Everything that fixes a draw of responses except θ: with it, :func:`redraw` repeats the draw at other params
    with the same uniforms (spec §6, common random numbers).

    Attributes:
        prompt_ids: the B prompts' token ids (unpadded).
        G: responses per prompt. max_new_tokens: the generation budget.
        seed, first_prompt_index: prompt row n draws from ``prompt_generator(seed, first_prompt_index + n)``.
        stop_token_ids: the ids that end a response (may be empty: fixed-length responses).
        pad_token_id: the id written at padding positions.
        temperature: τ of the draw (the policy's).
        prompt_index: each row's position in the prompt pool it was chosen from (recorded in the batch), or None.
    """

    prompt_ids: tuple[tuple[int, ...], ...]
    G: int
    max_new_tokens: int
    seed: int
    first_prompt_index: int
    stop_token_ids: tuple[int, ...]
    pad_token_id: int
    temperature: float
    prompt_index: tuple[int, ...] | None = None

    @property
    def B(self) -> int:
        return len(self.prompt_ids)

    def shard(self, rows: range) -> "DrawSpec":
        """The draw of prompt rows ``rows`` only (contiguous): the same streams, so the same responses."""
        return dataclasses.replace(
            self, prompt_ids=self.prompt_ids[rows.start:rows.stop],
            first_prompt_index=self.first_prompt_index + rows.start,
            prompt_index=None if self.prompt_index is None else self.prompt_index[rows.start:rows.stop])

    def to_dict(self) -> dict[str, Any]:
        return {"G": self.G, "max_new_tokens": self.max_new_tokens, "seed": self.seed,
                "first_prompt_index": self.first_prompt_index, "stop_token_ids": list(self.stop_token_ids),
                "pad_token_id": self.pad_token_id, "temperature": self.temperature,
                "prompt_index": None if self.prompt_index is None else list(self.prompt_index),
                "prompt_lengths": [len(row) for row in self.prompt_ids]}


@dataclass(frozen=True, eq=False)
class Responses:
    """The result of :func:`draw_responses`: a batch with zero advantages (rewards are the caller's business).

    Attributes:
        batch: RolloutBatch (CPU) with ``logprobs`` = S recorded while sampling, ``temperature`` and
            ``prompt_index`` from the spec, ``advantages`` 0 and ``length_norm`` = max_new_tokens.
        hit_stop: bool [B, G], whether the response ended with a stop token.
        spec: the :class:`DrawSpec` it was drawn with.
        timings: ``prefill_s``, ``decode_s``, ``forward_calls``, ``kv_cache``.
    """

    batch: RolloutBatch
    hit_stop: Tensor
    spec: DrawSpec
    timings: dict[str, float] = field(default_factory=dict)

    def response_tokens(self, *, with_stop: bool = False) -> list[list[list[int]]]:
        """``[n][g]``: the response's token ids, without the final stop token (with it: ``with_stop=True``)."""
        _, completions = self.batch.token_lists()
        if with_stop:
            return completions
        return [[ids[:len(ids) - int(self.hit_stop[n, g])] for g, ids in enumerate(group)]
                for n, group in enumerate(completions)]


@dataclass(frozen=True, eq=False)
class SampledBatch:
    """The result of :func:`sample_batch`.

    Attributes:
        batch: the RolloutBatch (CPU) with ``logprobs`` = S(θ) recorded while sampling (a check only, spec §6),
            ``rewards``, advantages, ``temperature`` and ``prompt_index``.
        prompts: the B prompt texts (decoded from the ids when token ids were given).
        responses: ``responses[n][g]``, the decoded response text (stop token, padding and special tokens removed).
        eos_count: how many of the B·G responses ended with a stop token (the others hit ``max_new_tokens``).
        timings: seconds and counts: ``prefill_s``, ``decode_s``, ``reward_s``, ``total_s``, ``generated_tokens``,
            ``tokens_per_s`` (generated tokens over prefill + decode time), ``forward_calls``.
        spec: the :class:`DrawSpec` of the draw (for :func:`redraw`), or None.
        advantage_info: how the advantages came out (``objective.AdvantageInfo``: groups with equal rewards,
            unscorable completions), or None.
        raw_rewards: the reward function's output, float64 [B, G] or [B, G, F] (NaN: not scored), or None — what
            :func:`rescore` recomputes the advantages from (e.g. batch-scaled ones after gathering shards).
    """

    batch: RolloutBatch
    prompts: list[str]
    responses: list[list[str]]
    eos_count: int
    timings: dict[str, float] = field(default_factory=dict)
    spec: DrawSpec | None = None
    advantage_info: AdvantageInfo | None = None
    raw_rewards: Tensor | None = None

    @property
    def truncated_count(self) -> int:
        """How many responses were cut at ``max_new_tokens`` without a stop token."""
        return self.batch.num_sequences - self.eos_count


def prompt_generator(seed: int, prompt_index: int) -> torch.Generator:
    """The CPU generator of prompt row ``prompt_index`` under ``seed``: seeded by a hash of the pair (independent
    streams for nearby seeds and indices)."""
    digest = hashlib.blake2b(f"funcprobe.sample_batch:{int(seed)}:{int(prompt_index)}".encode(),
                             digest_size=8).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") >> 1)


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
        ids = [_token_row(prompt, f"prompts[{index}]") for index, prompt in enumerate(prompts)]
        texts = [tokenizer.decode(row, skip_special_tokens=True) for row in ids]
    else:
        raise ValueError("prompts must be all strings or all token-id lists; got a mix "
                         f"({sorted({type(p).__name__ for p in prompts})}).")
    _check_prompt_ids(ids, vocab_size)
    return ids, texts


def _token_row(prompt: Any, what: str) -> list[int]:
    row = prompt.tolist() if isinstance(prompt, Tensor) else list(prompt)
    if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in row):
        raise ValueError(f"{what} must be a list of integer token ids; got {row[:8]}.")
    return [int(t) for t in row]


def _check_prompt_ids(ids: Sequence[Sequence[int]], vocab_size: int) -> None:
    for index, row in enumerate(ids):
        if not row:
            raise ValueError(f"prompts[{index}] tokenises to no tokens; every prompt needs at least one token "
                             "(a response token is predicted from the position before it).")
        bad = [t for t in row if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompts[{index}] holds token id {bad[0]} outside the model's vocabulary "
                             f"[0, {vocab_size}). Was it tokenised with another tokenizer?")


def _ids(value: Any, what: str) -> list[int]:
    """An int or a sequence of ints (None: none) as a list."""
    if value is None:
        return []
    values = [value] if isinstance(value, numbers.Integral) else list(value)
    if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) and i >= 0 for i in values):
        raise ValueError(f"{what} must be a token id or a list of token ids (integers ≥ 0); got {value!r}.")
    return [int(i) for i in values]


def collect_stop_ids(tokenizer: Any = None, policy: Policy | None = None, extra: Any = None) -> tuple[int, ...]:
    """The ids that end a response: the union of the tokenizer's ``eos_token_id``, every id of the model's
    ``generation_config.eos_token_id`` (an int or a list — chat checkpoints list their turn-end ids there, and
    ``generate`` stops at each of them) and ``extra`` (an id or a list), sorted. Raises ValueError when the union is
    empty: responses could never stop; pass ``extra``."""
    stops = set(_ids(getattr(tokenizer, "eos_token_id", None), "the tokenizer's eos_token_id"))
    if policy is not None:
        config = getattr(policy.module.get_base_model(), "generation_config", None)
        stops.update(_ids(getattr(config, "eos_token_id", None), "generation_config.eos_token_id"))
    stops.update(_ids(extra, "stop_token_ids"))
    if policy is not None:
        outside = sorted(i for i in stops if i >= policy.vocab_size)
        if outside:
            raise ValueError(f"stop token id(s) {outside} are outside the model's vocabulary [0, {policy.vocab_size}); "
                             "pass ids of the model's tokenizer (--stop-token ID).")
    if not stops:
        raise ValueError("no stop token: the tokenizer has no eos_token_id and the model's generation_config names "
                         "none; pass stop_token_ids=... (funcprobe probe --stop-token ID) so that responses can end.")
    return tuple(sorted(stops))


# ---------------------------------------------------------------------------------------------------- decoding
class _Decoder:
    """The policy's decoder at θ = params, called functionally; knows how to pass a KV cache."""

    def __init__(self, policy: Policy, params: Mapping[str, Tensor]):
        self.policy = policy
        self.params = policy.decoder_params(params)
        signature = inspect.signature(policy.decoder.forward)
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
            return DynamicCache(config=self.policy.decoder.config)
        except TypeError:
            return DynamicCache()

    def __call__(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, *, cache: Any = None,
                 use_cache: bool) -> tuple[Tensor, Any]:
        """(final hidden states [rows, columns, H], the cache or None)."""
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=use_cache)
        if cache is not None:
            kwargs[self.cache_kwarg] = cache
        # tie_weights=False: the LoRA tensors are never tied, and the tie check walks every module at every step.
        out = torch.func.functional_call(self.policy.decoder, self.params, args=(), kwargs=kwargs, tie_weights=False)
        self.calls += 1
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        new_cache = None
        if use_cache:
            new_cache = getattr(out, "cache", None)
            if new_cache is None:
                new_cache = getattr(out, "past_key_values", None)
        return hidden, new_cache


def _right_padded(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Prompts packed to the left (every row starts with a real token), padded on the right: ids and mask [b, P]."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return ids.to(device), mask.to(device)


def _positions(mask: Tensor) -> Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _draw(policy: Policy, hidden: Tensor, uniforms: Tensor) -> tuple[Tensor, Tensor]:
    """Sample one token per row from softmax(z/τ) by inverting its CDF at ``uniforms``; (tokens, log π) on device.

    z is formed exactly as ``Policy.sequence_logprobs`` forms it (``chunk_logits``: the model-dtype matmul, upcast to
    the policy's log-softmax dtype, then / τ), in row chunks of ``policy.token_chunk``.
    """
    head = policy.lm_head
    inv_temperature = 1.0 / policy.temperature
    tokens, logprobs = [], []
    for start in range(0, hidden.shape[0], policy.token_chunk):
        stop = start + policy.token_chunk
        logits = chunk_logits(hidden[start:stop], head.weight, head.bias, inv_temperature, policy.logsoftmax_dtype)
        log_normaliser = torch.logsumexp(logits, dim=1)
        # A NaN or +inf logit makes its row's normaliser NaN/inf (so does a row of -inf): one check per row, not per
        # logit. A single -inf logit is a probability 0 and is fine.
        if not bool(torch.isfinite(log_normaliser).all()):
            raise FloatingPointError(
                "non-finite logits while sampling: the model produced NaN/inf hidden states at θ = params (a "
                "diverged update, e.g. too large a learning rate, or NaN in the params). Check "
                "all(torch.isfinite(t).all() for t in params.values()).")
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
    hit_stop: Tensor   # bool [R]
    logprobs: Tensor   # float64 [R]


def _sample_chunk(policy: Policy, decoder: _Decoder, prompt_ids: Sequence[Sequence[int]],
                  generators: list[torch.Generator], G: int, max_new_tokens: int, stop_ids: Tensor, pad_id: int,
                  kv_cache: bool, timings: dict[str, float]) -> tuple[_ChunkResult, bool]:
    """Sample G responses for each prompt of the chunk; rows are prompt-major (row = i·G + g)."""
    device = policy.device
    rows = len(prompt_ids) * G
    t0 = time.perf_counter()
    ids, mask = _right_padded(prompt_ids, pad_id, device)
    last = mask.sum(dim=1) - 1  # each prompt's last real column: its hidden state predicts the first token
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
            hidden = hidden[torch.arange(len(prompt_ids), device=device), last].repeat_interleave(G, dim=0)
        else:
            cache = None
    ids, mask = ids.repeat_interleave(G, dim=0), mask.repeat_interleave(G, dim=0)
    last = last.repeat_interleave(G, dim=0)
    if not kv_cache or cache is None:
        # No cache, or one that cannot be repeated: a forward over every row.
        hidden, cache = decoder(ids, mask, _positions(mask), cache=decoder.new_cache() if kv_cache else None,
                                use_cache=kv_cache)
        hidden = hidden[torch.arange(rows, device=device), last]
    # Stopped rows leave the forward (their cache rows dropped) unless the cache cannot drop rows; then they ride
    # along on padding with a 0 attention-mask column (a trailing pad attends to the real tokens before it).
    droppable = not kv_cache or hasattr(cache, "batch_select_indices")
    t1 = time.perf_counter()

    tokens = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long)
    lengths = torch.zeros(rows, dtype=torch.long)
    hit_stop = torch.zeros(rows, dtype=torch.bool)
    logprobs = torch.zeros(rows, dtype=torch.float64)
    active = torch.arange(rows)                # forward row i is output row active[i]
    alive = torch.ones(rows, dtype=torch.bool)  # forward rows still generating
    steps = 0
    for step in range(max_new_tokens):
        # Every prompt draws G uniforms per step, used or not: its stream does not depend on the other prompts,
        # and the uniform of (draw g, position k) is the same at any θ (common random numbers).
        uniforms = torch.cat([torch.rand(G, generator=g, dtype=torch.float64) for g in generators])
        chosen, step_logprobs = _draw(policy, hidden, uniforms[active])
        chosen_cpu, step_cpu = chosen.cpu(), step_logprobs.cpu()
        out_rows = active[alive]
        tokens[out_rows, step] = chosen_cpu[alive]
        logprobs[out_rows] += step_cpu[alive]
        lengths[out_rows] += 1
        ended = alive & torch.isin(chosen_cpu, stop_ids)
        hit_stop[active[ended]] = True
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
        hidden = hidden[:, -1]
    t2 = time.perf_counter()
    timings["prefill_s"] += t1 - t0
    timings["decode_s"] += t2 - t1
    return _ChunkResult(tokens[:, :steps], lengths, hit_stop, logprobs), kv_cache


def _assemble(spec: DrawSpec, results: Sequence[_ChunkResult]) -> tuple[RolloutBatch, Tensor]:
    """(batch, hit_stop [B, G]): the draw in :meth:`RolloutBatch.from_token_lists`'s layout (prompts right-aligned at
    column P, responses from P)."""
    B, G = spec.B, spec.G
    responses = [row[:length] for r in results for row, length in zip(r.tokens, r.lengths.tolist())]
    batch = RolloutBatch.from_token_lists(
        spec.prompt_ids, [responses[n * G:(n + 1) * G] for n in range(B)],
        advantages=torch.zeros(B, G, dtype=torch.float64), pad_token_id=spec.pad_token_id,
        temperature=spec.temperature, length_norm=spec.max_new_tokens,
        logprobs=torch.cat([r.logprobs for r in results]).reshape(B, G), prompt_index=spec.prompt_index)
    return batch, torch.cat([r.hit_stop for r in results]).reshape(B, G)


def draw_responses(policy: Policy, params: Mapping[str, Tensor], spec: DrawSpec, *, prompt_chunk: int = 8,
                   kv_cache: bool = True, progress: bool | None = False) -> Responses:
    """Draw G responses for each prompt of ``spec`` from π_θ (θ = ``params``): the token-level sampler.

    Args:
        policy: the functional policy (its τ must be ``spec.temperature``); its module is never modified.
        params: θ, checked with ``policy.check_params``.
        spec: the prompts' token ids, G, budget, seed and stream offset, stop and pad ids (:class:`DrawSpec`).
        prompt_chunk: prompts decoded together (prompt_chunk·G rows per forward); does not change the draw.
        kv_cache: decode with a KV cache (default) or recompute the prefix at every step (same tokens).
        progress: a progress bar over prompt chunks (None: only when stderr is a terminal).

    Returns a :class:`Responses` whose batch has zero advantages and ``length_norm`` = max_new_tokens.
    Raises ValueError for a bad spec or params, FloatingPointError for non-finite logits.
    """
    policy.check_params(params)
    if policy.module.training:
        raise ValueError("the policy's module is in training mode (dropout on), so sampling would not draw from "
                         "π_θ. Call policy.module.eval().")
    if spec.temperature != policy.temperature:
        raise ValueError(f"the draw is at τ={spec.temperature:g} but the policy samples at τ={policy.temperature:g}; "
                         "build the policy with the draw's temperature.")
    _check_int("G", spec.G, 2)
    _check_int("max_new_tokens", spec.max_new_tokens, 1)
    prompt_chunk = _check_int("prompt_chunk", prompt_chunk, 1)
    _check_prompt_ids(spec.prompt_ids, policy.vocab_size)
    stops = torch.tensor(spec.stop_token_ids, dtype=torch.long)
    timings = {"prefill_s": 0.0, "decode_s": 0.0}
    decoder = _Decoder(policy, params)
    results: list[_ChunkResult] = []
    starts = range(0, spec.B, prompt_chunk)
    with torch.no_grad():
        for start in progress_bar(starts, total=len(starts), desc="sampling", enabled=progress):
            stop = min(start + prompt_chunk, spec.B)
            generators = [prompt_generator(spec.seed, spec.first_prompt_index + n) for n in range(start, stop)]
            result, kv_cache = _sample_chunk(policy, decoder, spec.prompt_ids[start:stop], generators, spec.G,
                                             spec.max_new_tokens, stops, spec.pad_token_id, kv_cache, timings)
            results.append(result)
    batch, hit_stop = _assemble(spec, results)
    timings["forward_calls"] = float(decoder.calls)
    timings["kv_cache"] = float(kv_cache)
    return Responses(batch=batch, hit_stop=hit_stop, spec=spec, timings=timings)


def redraw(policy: Policy, params: Mapping[str, Tensor], spec: DrawSpec, *, world=None, prompt_chunk: int = 8,
           kv_cache: bool = True, progress: bool | None = False) -> Responses:
    """The draw of ``spec`` repeated at θ = ``params`` with the same uniforms: common random numbers (spec §6).

    Response g of prompt n takes the token at position k from the same uniform u[k, g] as the original draw, by
    inverse CDF of π_θ(· | its own prefix): at θ = the original params it reproduces the original batch exactly; at
    θ⁺ the responses differ only where the step moved the CDF across a uniform.

    world: a ``funcprobe.distributed.World``: each rank redraws its contiguous shard of the prompts (the same
    streams), and the shards are gathered so that every rank holds the whole batch.
    """
    if world is None or not world.distributed:
        return draw_responses(policy, params, spec, prompt_chunk=prompt_chunk, kv_cache=kv_cache, progress=progress)
    rows = world.shard(spec.B)
    mine = draw_responses(policy, params, spec.shard(rows), prompt_chunk=prompt_chunk, kv_cache=kv_cache,
                          progress=progress) if len(rows) else None
    return _gather_responses(world, mine, spec)


# ---------------------------------------------------------------------------------------------------- public API
def _check_reward_signature(reward_fn) -> None:
    """Before sampling: a reward_fn that cannot be called as reward_fn(prompts, responses, meta) — a TRL reward
    function f(prompts, completions, **kwargs), most often — is refused with the way to wrap it (it used to fail with
    a bare TypeError after the sampling)."""
    import inspect

    try:
        signature = inspect.signature(reward_fn)
    except (TypeError, ValueError):  # a builtin or C callable: nothing to check
        return
    try:
        signature.bind([], [], {})
        trl_like = "completions" in signature.parameters
    except TypeError:
        trl_like = True
    if trl_like:
        name = getattr(reward_fn, "__name__", type(reward_fn).__name__)
        raise TypeError(f"sample_batch calls reward_fn(prompts, responses, meta) (the B prompt texts, responses[n][g] "
                        f"texts, and a dict with 'response_ids') and expects [B, G] rewards, but {name}{signature} "
                        "cannot be called so — TRL's reward signature f(prompts, completions, **kwargs)? Wrap a TRL "
                        "reward function: reward_fn=funcprobe.trl_rewards.TRLRewards([f], prompts=prompts, "
                        "columns={...}) (or TRLRewards.for_pool([f], pool)), with reward_weights=that.weights.")


def sample_batch(policy: Policy, params: Mapping[str, Tensor], prompts: Sequence[str] | Sequence[Sequence[int]], *,
                 G: int, reward_fn: RewardFn | str, max_new_tokens: int, seed: int, tokenizer: Any,
                 temperature: float | None = None, length_norm: str | float = "max_new_tokens",
                 scale_rewards: str = "none", reward_weights: Sequence[float] | None = None, top_p: float = 1.0,
                 top_k: int = 0, prompt_chunk: int = 8,
                 meta: Mapping[str, Any] | None = None, stop_token_ids: int | Sequence[int] | None = None,
                 first_prompt_index: int = 0, prompt_index: Sequence[int] | None = None, kv_cache: bool = True,
                 progress: bool | None = False) -> SampledBatch:
    """Sample G responses per prompt from π_θ (θ = ``params``), score them, and build the rollout batch.

    Args:
        policy: the functional policy; its module is never modified and its τ is the sampling temperature.
        params: θ, a LoRA params dict (``policy.params`` or an updated copy), checked with ``policy.check_params``.
        prompts: B prompt strings (tokenised with ``tokenizer``, special tokens as the tokenizer adds them by
            default) or B lists of token ids.
        G: responses per prompt (≥ 2, for the leave-one-out baseline).
        reward_fn: ``reward_fn(prompts, responses, meta) -> float [B, G]``, or [B, G, F] for F reward functions (NaN
            where a function scored nothing), or a name in ``funcprobe.rewards.REWARDS`` ("answer", "tag"). ``meta``
            is the caller's dict plus ``"response_ids"`` (each response's token ids, stop token included).
        max_new_tokens: the generation budget; a response without a stop token is cut there.
        seed: the sampling seed; prompt row n draws from ``prompt_generator(seed, first_prompt_index + n)``.
        tokenizer: decodes responses (and prompt ids); gives EOS and pad ids.
        temperature: must be None or equal ``policy.temperature`` (refused otherwise).
        length_norm: "max_new_tokens" (Dr. GRPO: L_n = max_new_tokens) or a positive number, used for every prompt.
        scale_rewards: the advantages' scaling, as the trainer does it (``objective.compute_advantages``, TRL's
            operations): "none" (A = R − group mean, Dr. GRPO; the default), "group" (divided by the group's std + 1e-4,
            TRL's default) or "batch"; reward_weights: the weights of F reward functions (None: 1 each).
        top_p, top_k: must stay 1.0 and 0 (truncated sampling is refused, spec §0).
        prompt_chunk: prompts decoded together (prompt_chunk·G rows per forward); does not change the batch.
        meta: passed to the reward function (``{}`` when None), e.g. ``{"answers": [...]}``.
        stop_token_ids: more ids that end a response, added to the tokenizer's EOS and the model's
            ``generation_config.eos_token_id`` (:func:`collect_stop_ids`).
        first_prompt_index: the global row of ``prompts[0]``, for sharding a prompt list across processes.
        prompt_index: the position of each prompt in its pool (recorded in ``batch.prompt_index``), or None.
        kv_cache: decode with a KV cache (default) or recompute the prefix at every step.
        progress: a progress bar over prompt chunks (None: only when stderr is a terminal).

    Returns:
        SampledBatch: the batch (CPU; logprobs = S(θ) recorded while sampling, a check only; rewards, advantages,
        length_norm, temperature, prompt_index), the prompt and response texts, the number of responses that
        ended with a stop token, timings, and the :class:`DrawSpec` (for :func:`redraw`).
    """
    started = time.perf_counter()
    _check_sampler(policy, temperature, top_p, top_k)
    G = _check_int("G", G, 2)
    max_new_tokens = _check_int("max_new_tokens", max_new_tokens, 1)
    first_prompt_index = _check_int("first_prompt_index", first_prompt_index, 0)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer; got {seed!r}.")
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS} ('none': A = R − group mean, Dr. GRPO; "
                         "'group': divided by the group's reward std + 1e-4, as TRL; 'batch': by the batch's); got "
                         f"{scale_rewards!r}.")
    if isinstance(reward_fn, str):
        if reward_fn not in REWARDS:
            raise ValueError(f"unknown reward {reward_fn!r}; built-ins are {sorted(REWARDS)}, or pass a callable "
                             "reward_fn(prompts, responses, meta) -> [B, G].")
        reward_fn = REWARDS[reward_fn]
    if not callable(reward_fn):
        raise ValueError(f"reward_fn must be callable as reward_fn(prompts, responses, meta) -> [B, G]; got "
                         f"{type(reward_fn).__name__}.")
    _check_reward_signature(reward_fn)
    if tokenizer is None:
        raise ValueError("sample_batch needs the tokenizer (to tokenise prompts and decode responses).")
    policy.check_params(params)
    prompt_ids, prompt_texts = _prompt_ids(prompts, tokenizer, policy.vocab_size)
    B = len(prompt_ids)
    if prompt_index is not None:
        prompt_index = tuple(_ids(prompt_index, "prompt_index"))
        if len(prompt_index) != B:
            raise ValueError(f"prompt_index has {len(prompt_index)} entries for {B} prompts; pass one pool index per "
                             "prompt.")
    norms = _length_norms(length_norm, max_new_tokens, B)
    stops = collect_stop_ids(tokenizer, policy, stop_token_ids)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = stops[0] if pad_id is None else int(pad_id)
    spec = DrawSpec(prompt_ids=tuple(tuple(row) for row in prompt_ids), G=G, max_new_tokens=max_new_tokens,
                    seed=int(seed), first_prompt_index=first_prompt_index, stop_token_ids=stops, pad_token_id=pad_id,
                    temperature=policy.temperature, prompt_index=prompt_index)
    drawn = draw_responses(policy, params, spec, prompt_chunk=prompt_chunk, kv_cache=kv_cache, progress=progress)
    tokens = drawn.response_tokens()
    responses = [[tokenizer.decode(ids, skip_special_tokens=True) for ids in group] for group in tokens]

    timings = {"prefill_s": drawn.timings["prefill_s"], "decode_s": drawn.timings["decode_s"]}
    reward_started = time.perf_counter()
    response_ids = drawn.response_tokens(with_stop=True)
    raw = reward_fn(list(prompt_texts), [list(group) for group in responses],
                    {**({} if meta is None else dict(meta)), "response_ids": response_ids})
    rewards = check_rewards(raw, B, G, reward_fn)
    timings["reward_s"] = time.perf_counter() - reward_started
    advantages, info = compute_advantages(rewards, scale_rewards=scale_rewards, weights=reward_weights)
    batch = drawn.batch.replace(advantages=advantages, length_norm=norms,
                                rewards=torch.nan_to_num(info.rewards, nan=0.0),
                                advantage_recipe=AdvantageRecipe.for_rewards(rewards, scale_rewards, reward_weights))
    generated = int(batch.response_lengths.sum())
    timings["total_s"] = time.perf_counter() - started
    timings["generated_tokens"] = float(generated)
    timings["tokens_per_s"] = generated / max(timings["prefill_s"] + timings["decode_s"], 1e-12)
    timings["forward_calls"] = drawn.timings["forward_calls"]
    timings["kv_cache"] = drawn.timings["kv_cache"]
    return SampledBatch(batch=batch, prompts=list(prompt_texts), responses=responses,
                        eos_count=int(drawn.hit_stop.sum()), timings=timings, spec=spec, advantage_info=info,
                        raw_rewards=rewards)


def rescore(sampled: SampledBatch, *, scale_rewards: str, reward_weights: Sequence[float] | None = None,
            warn: bool = True) -> SampledBatch:
    """The same sample with its advantages recomputed from ``raw_rewards`` (``objective.compute_advantages``): after
    the shards of a batch were sampled on several processes, batch-scaled advantages need the whole batch's std."""
    if sampled.raw_rewards is None:
        raise ValueError("rescore needs the sample's raw rewards (sample_batch records them in raw_rewards).")
    advantages, info = compute_advantages(sampled.raw_rewards, scale_rewards=scale_rewards, weights=reward_weights,
                                          warn=warn)
    recipe = AdvantageRecipe.for_rewards(sampled.raw_rewards, scale_rewards, reward_weights)
    batch = sampled.batch.replace(advantages=advantages, rewards=torch.nan_to_num(info.rewards, nan=0.0),
                                  advantage_recipe=recipe)
    return dataclasses.replace(sampled, batch=batch, advantage_info=info)


# ------------------------------------------------------------------------------------------------ distributed
def merge_batches(batches: Sequence[RolloutBatch]) -> RolloutBatch:
    """Concatenate sampled shards (each in :meth:`RolloutBatch.from_token_lists`'s layout: prompt right-aligned at
    column P_s, response from P_s) into the single-process batch: their token lists laid out again, P = max P_s and T
    the longest response; every field carried over (``token_advantages`` on the response tokens)."""
    prompts, completions = [], []
    for batch in batches:
        shard_prompts, shard_completions = batch.token_lists()
        prompts += shard_prompts
        completions += shard_completions

    def cat(name):
        values = [getattr(b, name) for b in batches]
        return None if any(v is None for v in values) else torch.cat(values)

    token_advantages = None
    if all(b.token_advantages is not None for b in batches):
        token_advantages = [[b.token_advantages[n, g][b.response_mask[n, g]] for g in range(b.G)]
                            for b in batches for n in range(b.B)]
    recipes = {batch.advantage_recipe for batch in batches}
    return RolloutBatch.from_token_lists(
        prompts, completions, advantages=cat("advantages"), pad_token_id=batches[0].pad_token_id,
        temperature=batches[0].temperature, length_norm=cat("length_norm"), logprobs=cat("logprobs"),
        rewards=cat("rewards"), prompt_index=cat("prompt_index"), token_advantages=token_advantages,
        advantage_recipe=recipes.pop() if len(recipes) == 1 else None)


def _gather_responses(world, mine: Responses | None, spec: DrawSpec) -> Responses:
    payload = None if mine is None else (mine.batch.to("cpu"), mine.hit_stop, mine.timings)
    from .distributed import all_gather_objects

    pieces = all_gather_objects(world, payload, "all_gather of the redrawn shards")
    timings = {key: max(p[2].get(key, 0.0) for p in pieces) for key in pieces[0][2]}
    return Responses(batch=merge_batches([p[0] for p in pieces]), hit_stop=torch.cat([p[1] for p in pieces]),
                     spec=spec, timings=timings)


def gather_sampled(world, sampled: SampledBatch | None) -> SampledBatch:
    """This rank's ``SampledBatch`` (its shard, sampled with ``first_prompt_index`` = the shard's start) → the global
    ``SampledBatch`` on every rank, in prompt order (tokens are all-gathered as pickled objects; counted). The
    merged draw spec covers every prompt (stream offset of the first shard), so :func:`redraw` of it reproduces the
    global batch."""
    if world is None or not world.distributed:
        return sampled
    mine = None if sampled is None else (sampled.batch.to("cpu"), sampled.prompts, sampled.responses,
                                         sampled.eos_count, sampled.timings, sampled.spec, sampled.raw_rewards)
    from .distributed import all_gather_objects

    pieces = all_gather_objects(world, mine, "all_gather of the sampled shards")
    timings = {key: max(p[4].get(key, 0.0) for p in pieces) for key in pieces[0][4]}
    specs = [p[5] for p in pieces]
    spec = None
    if all(s is not None for s in specs):
        indices = [s.prompt_index for s in specs]
        spec = dataclasses.replace(
            specs[0], prompt_ids=tuple(row for s in specs for row in s.prompt_ids),
            prompt_index=None if any(i is None for i in indices) else tuple(i for part in indices for i in part))
    raw = [p[6] for p in pieces]
    return SampledBatch(batch=merge_batches([p[0] for p in pieces]), prompts=[t for p in pieces for t in p[1]],
                        responses=[r for p in pieces for r in p[2]], eos_count=sum(p[3] for p in pieces),
                        timings=timings, spec=spec,
                        raw_rewards=None if any(r is None for r in raw) else torch.cat(raw))
