"""Exact ground truth by enumeration: every response of a small, fixed-length policy (spec §7).

For a policy whose responses have a fixed length T over a vocabulary of V tokens, every prompt has exactly V^T
possible responses r, each with a sequence log-probability S_r(θ) (spec §1) and probability p_r = exp(S_r). With
V^T small (V = 6, T = 3 gives 216), the quantities the estimators target are finite sums over r:

    H_n(θ)       = −Σ_r p_r S_r                                          (sequence entropy of prompt n, spec §2)
    ∇H_n(θ)      = −Σ_r p_r (S_r + 1) ∇S_r  = −Σ_r p_r S_r ∇S_r          (Σ_r p_r ∇S_r = ∇Σ_r p_r = 0)
    E[X_n]       = −∇H_n(θ)                                              (spec §2)
    E[Y_n]       = (1 − 1/G) / L_n · Σ_r p_r R_r ∇S_r                    (spec §3, GRPO advantages A = R − mean_g R)

with H(θ) = (1/B) Σ_n H_n(θ) and Ȳ = (1/B) Σ_n Y_n. The E[Y_n] identity: with A_g = R_g − (1/G) Σ_j R_j and the G
responses i.i.d., E[R_j ∇S_g] = E[R_j] E[∇S_g] = 0 for j ≠ g, so E[A_g ∇S_g] = (1 − 1/G) E[R ∇S]. It holds for any
deterministic reward table R [B, V^T]; reward scaling by the group's std (``scale_rewards="group"``) has no such closed
form.

The realised entropy change of a step θ → θ⁺ (spec §6's target) is exact too:

    ΔH = exact_distribution(policy, θ⁺, prompts, T).mean_entropy
         − exact_distribution(policy, θ, prompts, T).mean_entropy

(per prompt: the difference of the ``.entropy`` tensors). ``sample_exact_batch`` draws rollout batches from the exact
π_θ (no decoding loop, no truncation), returning the drawn response indices so a test can look up exact per-response
quantities; means of estimators over many such batches must fall within a few Monte-Carlo standard errors of the
exact targets above.

Responses are indexed lexicographically: r = Σ_k t_k V^(T−1−k) (``all_responses``). The vocabulary enumerated is the
policy's whole vocabulary (``policy.vocab_size``), so the probabilities of a prompt sum to 1; pad and special tokens
are ordinary tokens here. Everything is float64; no function modifies its inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .batch import AdvantageRecipe, RolloutBatch
from .objective import SCALE_REWARDS, compute_advantages
from .policy import Policy

__all__ = ["MAX_RESPONSES", "all_responses", "enumeration_batch", "ExactDistribution", "exact_distribution",
           "exact_entropy_grad", "exact_expected_x", "exact_expected_y", "sample_exact_batch",
           "random_reward_table", "REALISED_ESTIMATORS", "RealisedReplicates",
           "realised_change_replicates"]

#: Ceiling on V^T: the enumeration batch holds B · V^T sequences.
MAX_RESPONSES = 1_000_000


ParamsDict = Mapping[str, Tensor]
Prompts = Tensor | Sequence[Sequence[int]]


# ---------------------------------------------------------------------------------------------------- enumeration
def _num_responses(vocab_size: int, length: int) -> int:
    for name, value in (("vocab_size", vocab_size), ("length", length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}.")
    count = vocab_size ** length
    if count > MAX_RESPONSES:
        raise ValueError(f"enumerating V^T = {vocab_size}^{length} = {count:,} responses per prompt exceeds "
                         f"MAX_RESPONSES = {MAX_RESPONSES:,}. Use a smaller vocabulary or response length.")
    return count


def all_responses(vocab_size: int, length: int) -> Tensor:
    """Every response of ``length`` tokens over ``vocab_size`` tokens, lexicographically: int64 [V^T, T].

    Row r holds the base-V digits of r, most significant first: r = Σ_k t_k V^(T−1−k).
    """
    count = _num_responses(vocab_size, length)
    index = torch.arange(count, dtype=torch.int64)
    powers = vocab_size ** torch.arange(length - 1, -1, -1, dtype=torch.int64)
    return (index[:, None] // powers[None, :]) % vocab_size


def _normalise_prompts(prompts: Prompts, vocab_size: int) -> tuple[tuple[int, ...], ...]:
    """Prompts as a tuple of non-empty token tuples, each id in [0, vocab_size)."""
    if isinstance(prompts, Tensor):
        if prompts.dim() != 2 or prompts.dtype.is_floating_point or prompts.dtype.is_complex \
                or prompts.dtype is torch.bool:
            raise ValueError(f"prompts must be an integer tensor [B, P] or a list of token lists; got a "
                             f"{prompts.dtype} tensor of shape {tuple(prompts.shape)}.")
        rows = prompts.detach().cpu().tolist()
    else:
        try:
            rows = [[int(token) for token in row] for row in prompts]
        except TypeError:
            raise ValueError(f"prompts must be an integer tensor [B, P] or a list of token lists; got "
                             f"{type(prompts).__name__}.") from None
    if not rows:
        raise ValueError("prompts is empty; pass at least one prompt.")
    for n, row in enumerate(rows):
        if not row:
            raise ValueError(f"prompt {n} is empty; every prompt needs at least one token (the first response "
                             "token is predicted from the last prompt token).")
        bad = [t for t in row if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {n} holds token ids {bad[:3]} outside [0, {vocab_size}); prompts must use the "
                             "policy's vocabulary.")
    return tuple(tuple(row) for row in rows)


def _prompt_matrix(prompts: tuple[tuple[int, ...], ...], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Left-padded prompt ids int64 [B, P] and their attention mask bool [B, P]."""
    width = max(len(row) for row in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.int64)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for n, row in enumerate(prompts):
        ids[n, width - len(row):] = torch.tensor(row, dtype=torch.int64)
        mask[n, width - len(row):] = True
    return ids, mask


def _build_batch(prompts: tuple[tuple[int, ...], ...], responses: Tensor, *, pad_token_id: int,
                 advantages: Tensor | None = None, logprobs: Tensor | None = None,
                 rewards: Tensor | None = None) -> RolloutBatch:
    """Prompt n followed by responses[n, g] (int64 [B, G, T]) for every g; response_mask on the T response tokens."""
    B, G, T = responses.shape
    prompt_ids, prompt_mask = _prompt_matrix(prompts, pad_token_id)
    P = prompt_ids.shape[1]
    input_ids = torch.cat([prompt_ids[:, None, :].expand(B, G, P), responses], dim=2)
    attention_mask = torch.cat([prompt_mask[:, None, :].expand(B, G, P), torch.ones(B, G, T, dtype=torch.bool)],
                               dim=2)
    response_mask = torch.cat([torch.zeros(B, G, P, dtype=torch.bool), torch.ones(B, G, T, dtype=torch.bool)], dim=2)
    if advantages is None:
        advantages = torch.zeros(B, G, dtype=torch.float64)
    return RolloutBatch(input_ids=input_ids.contiguous(), attention_mask=attention_mask.contiguous(),
                        response_mask=response_mask, advantages=advantages,
                        length_norm=torch.full((B,), float(T), dtype=torch.float64), logprobs=logprobs,
                        rewards=rewards, pad_token_id=pad_token_id)


def enumeration_batch(prompts: Prompts, length: int, vocab_size: int, *, pad_token_id: int = 0) -> RolloutBatch:
    """The batch of every response of every prompt: B prompts × G = V^T responses.

    Args:
        prompts: int64 [B, P] (equal-length prompts, no padding) or a list of B non-empty token lists (left-padded
            with ``pad_token_id`` to the longest).
        length: T, the response length. vocab_size: V.

    Returns:
        A RolloutBatch with input_ids [B, V^T, P + T]: sample g of prompt n is prompt n followed by
        ``all_responses(V, T)[g]``; response_mask on the T response tokens; advantages zero; length_norm = T.
    """
    rows = _normalise_prompts(prompts, vocab_size)
    responses = all_responses(vocab_size, length)
    if responses.shape[0] < 2:
        raise ValueError(f"V^T = {responses.shape[0]}: a batch needs G ≥ 2 responses per prompt; use vocab_size ≥ 2.")
    return _build_batch(rows, responses[None].expand(len(rows), -1, -1), pad_token_id=pad_token_id)


# ---------------------------------------------------------------------------------------------- the distribution
@dataclass(frozen=True, eq=False)
class ExactDistribution:
    """π_θ(· | prompt n) over all V^T responses of length T, for B prompts.

    Attributes:
        prompts: the B prompts, a tuple of token tuples (unpadded).
        length: T. vocab_size: V.
        logprobs: float64 [B, V^T], S_r(θ) of every response r (lexicographic order, ``all_responses``).
        pad_token_id: the id used to left-pad prompts of unequal length.
    """

    prompts: tuple[tuple[int, ...], ...]
    length: int
    vocab_size: int
    logprobs: Tensor
    pad_token_id: int = 0

    @property
    def B(self) -> int:
        return len(self.prompts)

    @property
    def num_responses(self) -> int:
        """V^T."""
        return int(self.logprobs.shape[1])

    @property
    def responses(self) -> Tensor:
        """int64 [V^T, T], the responses in the order of ``logprobs``' columns."""
        return all_responses(self.vocab_size, self.length)

    @property
    def probs(self) -> Tensor:
        """p_r = exp(S_r), float64 [B, V^T]; each row sums to 1."""
        return torch.exp(self.logprobs)

    @property
    def entropy(self) -> Tensor:
        """H_n(θ) = −Σ_r p_r S_r, float64 [B] (nats; sequence-level entropy, spec §2)."""
        return -(self.probs * self.logprobs).sum(dim=1)

    @property
    def mean_entropy(self) -> float:
        """H(θ) = (1/B) Σ_n H_n(θ)."""
        return float(self.entropy.mean())

    def batch(self) -> RolloutBatch:
        """The enumeration batch (``enumeration_batch``) of these prompts, with ``logprobs`` cached."""
        return enumeration_batch(self.prompts, self.length, self.vocab_size,
                                 pad_token_id=self.pad_token_id).replace(logprobs=self.logprobs)


def exact_distribution(policy: Policy, params: ParamsDict, prompts: Prompts, length: int, *, pad_token_id: int = 0,
                       seq_chunk: int | None = None, token_chunk: int | None = None) -> ExactDistribution:
    """S_r(θ) of every response of every prompt: ``policy.sequence_logprobs`` on the enumeration batch.

    V is the policy's whole vocabulary (``policy.vocab_size``), so each row of ``probs`` sums to 1.
    """
    batch = enumeration_batch(prompts, length, policy.vocab_size, pad_token_id=pad_token_id)
    logprobs = policy.sequence_logprobs(params, batch, seq_chunk=seq_chunk, token_chunk=token_chunk)
    return ExactDistribution(prompts=_normalise_prompts(prompts, policy.vocab_size), length=length,
                             vocab_size=policy.vocab_size, logprobs=logprobs.to(torch.float64),
                             pad_token_id=pad_token_id)


# -------------------------------------------------------------------------------------------------- exact gradients
def _weighted_grad(policy: Policy, params: ParamsDict, batch: RolloutBatch,
                   weight_fn: Callable[[Tensor, Tensor, Tensor], Tensor], *, seq_chunk: int | None,
                   token_chunk: int | None) -> dict[str, Tensor]:
    """∇_θ Σ_i c_i S_i(θ) with constant weights c_i = weight_fn(S_chunk, prompt_index, sample_index), in one pass.

    The weights may depend on S (e.g. p = exp(S)): each chunk's S is known from its forward before its vjp, so one
    forward per chunk suffices (``Policy.iter_logprob_vjps``); float64 accumulation on the CPU.
    """
    total = {name: torch.zeros(tensor.shape, dtype=torch.float64) for name, tensor in params.items()}
    for item in policy.iter_logprob_vjps(params, batch, seq_chunk=seq_chunk, token_chunk=token_chunk):
        chunk = item.chunk
        weights = weight_fn(item.logprobs.detach().cpu().to(torch.float64), chunk.prompt_index.cpu(),
                            chunk.sample_index.cpu())
        for name, grad in item.vjp(weights.to(policy.device)).items():
            total[name] += grad.to("cpu", torch.float64)
    return total


def exact_entropy_grad(policy: Policy, params: ParamsDict, prompts: Prompts, length: int, *, pad_token_id: int = 0,
                       seq_chunk: int | None = None, token_chunk: int | None = None) -> dict[str, Tensor]:
    """∇_θ H(θ), H(θ) = (1/B) Σ_n H_n(θ), exactly: float64 CPU tensors shaped like ``params``.

    ∇H = ∇ Σ_{n,r} c_{n,r} S_{n,r} with constant weights c_{n,r} = −p_{n,r} (S_{n,r} + 1) / B (p = exp(S)), since
    ∇(−p S) = −p (S + 1) ∇S. The "+1" term is Σ_r p_r ∇S_r = 0 in exact arithmetic; keeping it makes this the exact
    gradient of the computed H (no reliance on the probabilities summing to 1).
    """
    batch = enumeration_batch(prompts, length, policy.vocab_size, pad_token_id=pad_token_id)
    B = batch.B

    def weights(logprobs: Tensor, prompt_index: Tensor, sample_index: Tensor) -> Tensor:
        return -torch.exp(logprobs) * (logprobs + 1.0) / B

    return _weighted_grad(policy, params, batch, weights, seq_chunk=seq_chunk, token_chunk=token_chunk)


def exact_expected_x(policy: Policy, params: ParamsDict, prompts: Prompts, length: int, *, pad_token_id: int = 0,
                     seq_chunk: int | None = None, token_chunk: int | None = None) -> dict[str, Tensor]:
    """E[X̄] = (1/B) Σ_n E[X_n] = −∇H(θ) (spec §2): float64 CPU tensors shaped like ``params``."""
    grad = exact_entropy_grad(policy, params, prompts, length, pad_token_id=pad_token_id, seq_chunk=seq_chunk,
                              token_chunk=token_chunk)
    return {name: -value for name, value in grad.items()}


def _check_rewards(rewards: Tensor, B: int, count: int) -> Tensor:
    if not isinstance(rewards, Tensor):
        raise ValueError(f"rewards must be a float tensor [B, V^T] = [{B}, {count}]; got {type(rewards).__name__}.")
    if tuple(rewards.shape) != (B, count):
        raise ValueError(f"rewards must have shape [B, V^T] = [{B}, {count}] (one reward per prompt and response, "
                         f"lexicographic order); got {tuple(rewards.shape)}.")
    rewards = rewards.detach().to("cpu", torch.float64)
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf; every reward must be finite.")
    return rewards


def exact_expected_y(policy: Policy, params: ParamsDict, prompts: Prompts, length: int, rewards: Tensor, G: int, *,
                     pad_token_id: int = 0, seq_chunk: int | None = None,
                     token_chunk: int | None = None) -> dict[str, Tensor]:
    """E[Ȳ] for batches of G i.i.d. responses per prompt with GRPO advantages A = R − group mean and L_n = T.

    E[Y_n] = (1 − 1/G) / T · Σ_r p_r R_r ∇S_r and E[Ȳ] = (1/B) Σ_n E[Y_n] (spec §3; derivation in the module
    docstring), i.e. ∇ Σ_{n,r} c_{n,r} S_{n,r} with constant weights c_{n,r} = (1 − 1/G) p_{n,r} R_{n,r} / (B T).

    Args:
        rewards: float [B, V^T], the deterministic reward of every response (lexicographic order).
        G: responses per prompt of the batches whose mean Ȳ this is (G ≥ 2).

    Returns: float64 CPU tensors shaped like ``params``.
    """
    if isinstance(G, bool) or not isinstance(G, int) or G < 2:
        raise ValueError(f"G must be an integer ≥ 2 (GRPO advantages need a group); got {G!r}.")
    batch = enumeration_batch(prompts, length, policy.vocab_size, pad_token_id=pad_token_id)
    table = _check_rewards(rewards, batch.B, batch.G)
    scale = (1.0 - 1.0 / G) / (batch.B * length)

    def weights(logprobs: Tensor, prompt_index: Tensor, sample_index: Tensor) -> Tensor:
        return scale * torch.exp(logprobs) * table[prompt_index, sample_index]

    return _weighted_grad(policy, params, batch, weights, seq_chunk=seq_chunk, token_chunk=token_chunk)


# ------------------------------------------------------------------------------------------------------ sampling
def sample_exact_batch(dist: ExactDistribution, G: int, *, rewards: Tensor | None = None,
                       generator: torch.Generator | None = None,
                       scale_rewards: str = "none") -> tuple[RolloutBatch, Tensor]:
    """A rollout batch of G responses per prompt drawn i.i.d. from the exact π_θ, and the drawn response indices.

    Draws ``torch.multinomial(dist.probs, G, replacement=True, generator=generator)``: index int64 [B, G], response
    index[n, g] of prompt n is ``all_responses(V, T)[index[n, g]]``.

    The batch: input_ids [B, G, P + T] (prompts left-padded as in ``enumeration_batch``), response_mask on the T
    response tokens, ``logprobs`` = the exact S of the drawn responses (cached), ``rewards`` = the table's
    rewards[n, index[n, g]] (zeros when ``rewards`` is None), length_norm = T, and the advantages of
    ``objective.compute_advantages`` in float64 with ``scale_rewards``: "none" A = R − mean_g R (spec §3's default),
    "group" A = (R − mean_g R)/(std_g R + 1e-4) with the unbiased group std, "batch" likewise with the batch's std.

    Returns: (batch, index).
    """
    if isinstance(G, bool) or not isinstance(G, int) or G < 2:
        raise ValueError(f"G must be an integer ≥ 2 (the leave-one-out baseline needs it); got {G!r}.")
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}; got {scale_rewards!r}.")
    probs = dist.probs
    index = torch.multinomial(probs, G, replacement=True, generator=generator)
    if rewards is None:
        drawn_rewards = torch.zeros(dist.B, G, dtype=torch.float64)
    else:
        drawn_rewards = _check_rewards(rewards, dist.B, dist.num_responses).gather(1, index)
    advantages, _ = compute_advantages(drawn_rewards, scale_rewards=scale_rewards, dtype=torch.float64, warn=False)
    responses = dist.responses[index]  # [B, G, T]
    batch = _build_batch(dist.prompts, responses, pad_token_id=dist.pad_token_id, advantages=advantages,
                         logprobs=dist.logprobs.gather(1, index), rewards=drawn_rewards)
    return batch.replace(advantage_recipe=AdvantageRecipe.of(scale_rewards, None, 1)), index


def random_reward_table(B: int, vocab_size: int, length: int, *, generator: torch.Generator | None = None,
                        noise: float = 0.1) -> Tensor:
    """A deterministic (given the generator) reward table float64 [B, V^T].

    Prompt n gets a target token τ_n drawn uniformly from [0, V); response r earns
    R_{n,r} = 1[last token of r = τ_n] + noise · U_{n,r}, U ~ Uniform[0, 1) i.i.d.
    """
    count = _num_responses(vocab_size, length)
    if isinstance(B, bool) or not isinstance(B, int) or B < 1:
        raise ValueError(f"B must be a positive integer; got {B!r}.")
    if not math.isfinite(noise):
        raise ValueError(f"noise must be finite; got {noise!r}.")
    targets = torch.randint(0, vocab_size, (B,), generator=generator)
    last = all_responses(vocab_size, length)[:, -1]
    hits = (last[None, :] == targets[:, None]).to(torch.float64)
    return hits + noise * torch.rand(B, count, generator=generator, dtype=torch.float64)


# ------------------------------------------------------------------------------- realised change, replicated (§6)
#: The estimators :func:`realised_change_replicates` runs: (where, method, normalize, integrand).
REALISED_ESTIMATORS = {
    "in_sample_none": ("update", "snis", "none", "sequence"),
    "in_sample_prompt": ("update", "snis", "prompt", "sequence"),
    "in_sample_prompt_rb": ("update", "snis", "prompt", "rao_blackwell"),
    "eval_none": ("eval", "snis", "none", "sequence"),
    "eval_prompt": ("eval", "snis", "prompt", "sequence"),
    "eval_prompt_rb": ("eval", "snis", "prompt", "rao_blackwell"),
    "eval_crn": ("eval", "crn", None, "rao_blackwell"),
    "eval_crn_sequence": ("eval", "crn", None, "sequence"),
}


@dataclass(frozen=True, eq=False)
class RealisedReplicates:
    """Many independent replicates of "build a step on an update batch U, estimate its realised change":

    ``exact`` float64 [R]: the exact H(θ⁺(U_r)) − H(θ) of replicate r (mean over the pool); ``estimates[name]`` and
    ``ses[name]`` float64 [R]: each estimator's ΔĤ and reported SE (names and settings in
    :data:`REALISED_ESTIMATORS`: on U itself — in-sample — or on an evaluation batch E_r drawn independently);
    ``changed`` float64 [R]: CRN's fraction of draws with y⁺ ≠ y.
    """

    exact: Tensor
    estimates: dict[str, Tensor]
    ses: dict[str, Tensor]
    changed: Tensor

    def summary(self, name: str) -> dict[str, float]:
        """bias = mean(ΔĤ − ΔH), its z (bias over its Monte-Carlo SE), the spread sd(ΔĤ − ΔH), the calibration
        sqrt(mean SE²)/spread, and the bias relative to the mean exact change."""
        errors = self.estimates[name] - self.exact
        R = errors.numel()
        spread = float(errors.std())
        bias = float(errors.mean())
        return {"bias": bias, "z": bias / (spread / math.sqrt(R)), "spread": spread,
                "se_over_spread": float(self.ses[name].pow(2).mean().sqrt()) / spread,
                "bias_over_change": bias / float(self.exact.mean()), "replicates": R}


def realised_change_replicates(policy: Policy, params: ParamsDict, adam, prompts: Sequence[Sequence[int]],
                               length: int, rewards: Tensor, *, G: int, eval_B: int | None = None,
                               replicates: int, generator: torch.Generator,
                               estimators: Sequence[str] = tuple(REALISED_ESTIMATORS)) -> RealisedReplicates:
    """Replicate spec §6's measurement on an exactly enumerable policy (spec §7).

    Per replicate r: an update batch U_r of G responses to every pool prompt, drawn from the exact π_θ
    (:func:`sample_exact_batch`, GRPO advantages from the ``rewards`` table); θ⁺_r = ``rl_update(params, U_r,
    adam)``; the exact change H(θ⁺_r) − H(θ) over the pool; an evaluation batch E_r of ``eval_B`` (default: the pool
    size) prompts drawn uniformly with replacement from the pool and G responses each, drawn token by token by the
    library's sampler (``draw_responses``, seed r, no stop token: responses of exactly ``length`` tokens, as
    enumerated); and each estimator of :data:`REALISED_ESTIMATORS` in ``estimators``.
    """
    from .realised import crn_delta_h, snis_delta_h
    from .sampling import DrawSpec, draw_responses
    from .update import rl_update

    rows = _normalise_prompts(prompts, policy.vocab_size)
    eval_B = len(rows) if eval_B is None else eval_B
    unknown = [name for name in estimators if name not in REALISED_ESTIMATORS]
    if unknown:
        raise ValueError(f"unknown estimators {unknown}; choose from {sorted(REALISED_ESTIMATORS)}.")
    dist = exact_distribution(policy, params, rows, length)
    before = dist.mean_entropy
    exact, changed = [], []
    estimates = {name: [] for name in estimators}
    ses = {name: [] for name in estimators}
    for r in range(replicates):
        update_batch, _ = sample_exact_batch(dist, G, rewards=rewards, generator=generator)
        update, _ = rl_update(params, update_batch, policy=policy, adam=adam)
        exact.append(exact_distribution(policy, update, rows, length).mean_entropy - before)
        chosen = torch.randint(0, len(rows), (eval_B,), generator=generator).tolist()
        spec = DrawSpec(prompt_ids=tuple(rows[i] for i in chosen), G=G, max_new_tokens=length, seed=r,
                        first_prompt_index=0, stop_token_ids=(), pad_token_id=0, temperature=policy.temperature,
                        prompt_index=tuple(chosen))
        evaluation = draw_responses(policy, params, spec)
        for name in estimators:
            where, method, normalize, integrand = REALISED_ESTIMATORS[name]
            if method == "crn":
                result = crn_delta_h(params, update, policy=policy, sample=evaluation, integrand=integrand)
                if integrand == "rao_blackwell":
                    changed.append(result.changed_fraction)
            else:
                result = snis_delta_h(params, update, policy=policy, normalize=normalize, estimator=integrand,
                                      batch=update_batch if where == "update" else evaluation.batch,
                                      in_sample=where == "update")
            estimates[name].append(result.deltaH)
            ses[name].append(result.se)

    def as_tensor(values):
        return torch.tensor(values, dtype=torch.float64)

    return RealisedReplicates(exact=as_tensor(exact), estimates={k: as_tensor(v) for k, v in estimates.items()},
                              ses={k: as_tensor(v) for k, v in ses.items()}, changed=as_tensor(changed))
