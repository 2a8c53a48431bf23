"""Exact ground truth by enumeration (spec §7): every response of a tiny fixed-length policy, checked against
brute force, torch.func.grad and Monte-Carlo means of the real estimators."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from funcprobe import Policy
from funcprobe.enumeration import (ExactDistribution, all_responses, enumeration_batch, exact_distribution,
                                   exact_entropy_grad, exact_expected_x, exact_expected_y, random_reward_table,
                                   sample_exact_batch)
from funcprobe.testing import tiny_peft_model
from funcprobe.update import policy_gradient

from conftest import assert_same_state, module_state, naive_sequence_logprobs

V, T = 6, 3                      # 216 responses per prompt
PROMPTS = torch.tensor([[1, 3, 4], [2, 5, 0]])
SEQ_CHUNK = 512                  # one forward for the whole enumeration batch


def dot(a, b):
    return sum(float((a[name].to(torch.float64) * b[name].to(torch.float64)).sum()) for name in a)


def max_relative_error(a, b):
    scale = max(float(t.abs().max()) for t in b.values())
    return max(float((a[name] - b[name]).abs().max()) for name in b) / scale


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny tensors: threads only add overhead


@pytest.fixture(scope="module")
def policy():
    # SDPA, not eager: transformers' eager attention takes its softmax in float32 even for a float64 model, which
    # leaves ~1e-7 relative rounding in S and its gradient (Σ_r p_r ∇S_r = 0 then fails beyond float64 rounding).
    model = tiny_peft_model("qwen2", vocab_size=V, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                            dtype=torch.float64, init_lora_weights=False, r=2, seed=7, attn_implementation="sdpa")
    with torch.no_grad():
        # A random 16-wide head (std 0.02) makes π nearly uniform, where every gradient is tiny; sharpen it.
        model.get_output_embeddings().weight.mul_(15.0)
    return Policy.from_peft(model, logsoftmax_dtype=torch.float64)


@pytest.fixture(scope="module")
def dist(policy):
    return exact_distribution(policy, policy.params, PROMPTS, T, seq_chunk=SEQ_CHUNK)


@pytest.fixture(scope="module")
def rewards():
    return random_reward_table(PROMPTS.shape[0], V, T, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def score_projection(policy, dist):
    """u and D[n, r] = u·∇S_{n,r} for every response, for a fixed random unit direction u: one forward-mode
    ``torch.func.jvp`` over the enumeration batch (SDPA's math backend: the CPU flash kernel has no forward AD)."""
    generator = torch.Generator().manual_seed(99)
    direction = {name: torch.randn(t.shape, generator=generator, dtype=torch.float64)
                 for name, t in policy.params.items()}
    norm = math.sqrt(dot(direction, direction))
    direction = {name: t / norm for name, t in direction.items()}
    batch = dist.batch()
    with sdpa_kernel(SDPBackend.MATH), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch scripts its jvp decompositions on first use
        _, scores = torch.func.jvp(lambda p: policy.sequence_logprobs(p, batch, seq_chunk=SEQ_CHUNK, with_grad=True),
                                   (dict(policy.params),), (direction,))
    return direction, scores.detach()


# ------------------------------------------------------------------------------------------------- enumeration
def test_all_responses_is_lexicographic():
    responses = all_responses(V, T)
    assert responses.dtype == torch.int64 and responses.shape == (V ** T, T)
    assert responses.tolist() == [list(r) for r in itertools.product(range(V), repeat=T)]
    assert all_responses(3, 1).tolist() == [[0], [1], [2]]
    with pytest.raises(ValueError, match="MAX_RESPONSES"):
        all_responses(1000, 3)
    with pytest.raises(ValueError, match="length"):
        all_responses(V, 0)


def test_enumeration_batch_layout_and_left_padding():
    prompts = [[1, 3, 4], [5]]
    batch = enumeration_batch(prompts, T, V, pad_token_id=0)
    assert (batch.B, batch.G, batch.L) == (2, V ** T, 3 + T)
    responses = all_responses(V, T)
    assert torch.equal(batch.input_ids[:, :, 3:], responses[None].expand(2, -1, -1))
    assert torch.equal(batch.input_ids[0, :, :3], torch.tensor([1, 3, 4]).expand(V ** T, 3))
    assert torch.equal(batch.input_ids[1, :, :3], torch.tensor([0, 0, 5]).expand(V ** T, 3))
    assert batch.attention_mask[1, :, :2].sum() == 0 and batch.attention_mask[1, :, 2:].all()
    assert torch.equal(batch.response_mask.sum(-1), torch.full((2, V ** T), T))
    assert not batch.response_mask[..., :3].any()
    assert torch.equal(batch.advantages, torch.zeros(2, V ** T, dtype=torch.float64))
    assert torch.equal(batch.length_norm, torch.full((2,), float(T), dtype=torch.float64))
    assert prompts == [[1, 3, 4], [5]]
    tensor_prompts = PROMPTS.clone()
    enumeration_batch(tensor_prompts, T, V)
    assert torch.equal(tensor_prompts, PROMPTS)


@pytest.mark.parametrize("prompts,match", [([[1, 2], []], "empty"), ([[1, 9]], "outside"),
                                           (torch.zeros(2, 3), "integer tensor")])
def test_enumeration_batch_rejects_bad_prompts(prompts, match):
    with pytest.raises(ValueError, match=match):
        enumeration_batch(prompts, T, V)


# ------------------------------------------------------------------------------------------------- distribution
def test_exact_distribution_matches_brute_force_and_the_entropy_chain_rule(policy, dist):
    assert isinstance(dist, ExactDistribution)
    assert dist.logprobs.dtype == torch.float64 and dist.logprobs.shape == (2, V ** T)
    assert (dist.probs.sum(dim=1) - 1).abs().max() < 1e-9
    batch = enumeration_batch(PROMPTS, T, V)
    # Brute force: one ordinary forward of the whole module, full logits and log_softmax.
    with torch.no_grad():
        naive = naive_sequence_logprobs(policy.module, batch, logsoftmax_dtype=torch.float64)
    assert (dist.logprobs - naive).abs().max() < 1e-10
    assert (dist.entropy + (naive.exp() * naive).sum(1)).abs().max() < 1e-10
    # Chain rule of entropy: H_n = E_r[Σ_k H(π(·|p_n, r_<k))], the summed next-token entropies averaged over r.
    token_entropy = policy.token_entropies(policy.params, batch, seq_chunk=SEQ_CHUNK)
    assert (dist.entropy - (dist.probs * token_entropy).sum(1)).abs().max() < 1e-10
    assert dist.entropy.shape == (2,) and dist.mean_entropy == pytest.approx(float(dist.entropy.mean()), abs=0)
    # Far from uniform, so the gradients below are not vanishingly small.
    assert float(dist.entropy.max()) < T * math.log(V) - 0.5
    # Chunking changes nothing.
    chunked = exact_distribution(policy, policy.params, PROMPTS, T, seq_chunk=37, token_chunk=5)
    assert (chunked.logprobs - dist.logprobs).abs().max() < 1e-12


def test_ragged_prompts_are_padding_invariant(policy):
    together = exact_distribution(policy, policy.params, [[1, 3, 4], [5]], T, seq_chunk=SEQ_CHUNK)
    alone = exact_distribution(policy, policy.params, [[5]], T, seq_chunk=SEQ_CHUNK)
    assert together.prompts == ((1, 3, 4), (5,))
    assert (together.logprobs[1] - alone.logprobs[0]).abs().max() < 1e-10


# ------------------------------------------------------------------------------------------------- gradients
def test_exact_entropy_grad_equals_func_grad_of_exact_entropy(policy, dist):
    module_before = module_state(policy.module)
    params_before = {n: t.clone() for n, t in policy.params.items()}
    batch = enumeration_batch(PROMPTS, T, V)

    def entropy(params):
        S = policy.sequence_logprobs(params, batch, seq_chunk=SEQ_CHUNK, with_grad=True)
        return -(S.exp() * S).sum(dim=1).mean()

    reference = torch.func.grad(entropy)(dict(policy.params))
    grad = exact_entropy_grad(policy, policy.params, PROMPTS, T, seq_chunk=SEQ_CHUNK)
    assert set(grad) == set(policy.params)
    assert all(g.dtype == torch.float64 and g.shape == policy.params[n].shape for n, g in grad.items())
    assert max_relative_error(grad, reference) < 1e-10
    assert math.sqrt(dot(grad, grad)) > 1.0
    # The −Σ p S ∇S form (Σ_r p_r ∇S_r = 0) agrees; so does another chunking.
    _, (plain,) = policy.logprob_grads(policy.params, batch, -dist.probs * dist.logprobs / batch.B,
                                       seq_chunk=SEQ_CHUNK)
    assert max_relative_error(plain, reference) < 1e-10
    chunked = exact_entropy_grad(policy, policy.params, PROMPTS, T, seq_chunk=50)
    assert max_relative_error(chunked, reference) < 1e-12
    expected_x = exact_expected_x(policy, policy.params, PROMPTS, T, seq_chunk=SEQ_CHUNK)
    assert max_relative_error(expected_x, {n: -g for n, g in grad.items()}) == 0
    assert_same_state(policy.module, module_before)
    assert all(torch.equal(policy.params[n], t) for n, t in params_before.items())


def test_policy_gradient_is_the_score_lookup(policy, dist, rewards, score_projection):
    """Ȳ·u of a sampled batch, from policy_gradient, equals Σ c_{n,g} D[n, index] from the enumeration."""
    direction, D = score_projection
    batch, index = sample_exact_batch(dist, 4, rewards=rewards, generator=torch.Generator().manual_seed(1))
    _, ybar = policy_gradient(policy.params, batch, policy=policy)
    lookup = float((batch.advantages / (batch.B * batch.G * T) * D.gather(1, index)).sum())
    assert dot(ybar, direction) == pytest.approx(lookup, rel=1e-10)


def test_exact_expected_y_against_policy_gradient_monte_carlo(policy, dist, rewards, score_projection):
    """Mean of Ȳ·u over 200 batches (B=2, G=4) drawn from the exact π_θ, by funcprobe.update.policy_gradient."""
    direction, _ = score_projection
    G = 4
    target = dot(exact_expected_y(policy, policy.params, PROMPTS, T, rewards, G, seq_chunk=SEQ_CHUNK), direction)
    generator = torch.Generator().manual_seed(2024)
    values = []
    for _ in range(200):
        batch, _ = sample_exact_batch(dist, G, rewards=rewards, generator=generator)
        values.append(dot(policy_gradient(policy.params, batch, policy=policy)[1], direction))
    values = torch.tensor(values, dtype=torch.float64)
    mean, se = float(values.mean()), float(values.std() / math.sqrt(len(values)))
    assert abs(mean - target) < 4 * se, (mean, se, target)
    assert abs(target) > 2 * se  # the check has some power


@pytest.mark.parametrize("G", [2, 4])
def test_exact_expected_x_and_y_against_many_batches(policy, dist, rewards, score_projection, G):
    """Mean of X̄·u and Ȳ·u (spec §2, §3) over 20,000 batches, via the exact per-response scores u·∇S_r."""
    direction, D = score_projection
    N, B = 20_000, dist.B
    generator = torch.Generator().manual_seed(G)
    index = torch.multinomial(dist.probs, N * G, replacement=True, generator=generator)   # [B, N·G]

    def draw(table):
        return table.gather(1, index).reshape(B, N, G)

    scores, S, R = draw(D), draw(dist.logprobs), draw(rewards)
    advantages = R - R.mean(-1, keepdim=True)
    y = (advantages / T * scores).mean(-1).mean(0)                                         # Ȳ·u per batch
    loo = (S.sum(-1, keepdim=True) - S) / (G - 1)
    x = ((S - loo) * scores).mean(-1).mean(0)                                              # X̄·u per batch

    target_y = dot(exact_expected_y(policy, policy.params, PROMPTS, T, rewards, G, seq_chunk=SEQ_CHUNK), direction)
    target_x = dot(exact_expected_x(policy, policy.params, PROMPTS, T, seq_chunk=SEQ_CHUNK), direction)
    for values, target in ((y, target_y), (x, target_x)):
        mean, se = float(values.mean()), float(values.std() / math.sqrt(N))
        assert abs(mean - target) < 4 * se, (mean, se, target)
        assert abs(target) > 10 * se
    # Power: without the (1 − 1/G) factor the target would be rejected.
    se_y = float(y.std() / math.sqrt(N))
    assert abs(float(y.mean()) - target_y / (1 - 1 / G)) > 4 * se_y


def test_exact_expected_y_validates_inputs(policy, rewards):
    with pytest.raises(ValueError, match="shape"):
        exact_expected_y(policy, policy.params, PROMPTS, T, rewards[:, :10], 4)
    with pytest.raises(ValueError, match="G must"):
        exact_expected_y(policy, policy.params, PROMPTS, T, rewards, 1)


# ------------------------------------------------------------------------------------------------- sampling
def test_sample_exact_batch_fields_and_cached_logprobs(policy, dist, rewards):
    logprobs_before, rewards_before = dist.logprobs.clone(), rewards.clone()
    batch, index = sample_exact_batch(dist, 8, rewards=rewards, generator=torch.Generator().manual_seed(3))
    assert index.shape == (2, 8) and index.dtype == torch.int64
    assert (batch.B, batch.G, batch.L) == (2, 8, 3 + T)
    assert torch.equal(batch.input_ids[:, :, 3:], all_responses(V, T)[index])
    assert torch.equal(batch.input_ids[:, :, :3], PROMPTS[:, None, :].expand(2, 8, 3))
    assert torch.equal(batch.response_lengths, torch.full((2, 8), T))
    assert torch.equal(batch.rewards, rewards.gather(1, index))
    assert torch.allclose(batch.advantages, batch.rewards - batch.rewards.mean(1, keepdim=True), rtol=0, atol=1e-15)
    assert torch.equal(batch.length_norm, torch.full((2,), float(T), dtype=torch.float64))
    recomputed = policy.sequence_logprobs(policy.params, batch)
    assert (batch.logprobs - recomputed).abs().max() < 1e-10
    # Reproducible given the generator; inputs untouched.
    again, again_index = sample_exact_batch(dist, 8, rewards=rewards, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again_index, index) and torch.equal(again.input_ids, batch.input_ids)
    assert torch.equal(dist.logprobs, logprobs_before) and torch.equal(rewards, rewards_before)
    # Group-std advantages; no rewards → zeros.
    std_batch, _ = sample_exact_batch(dist, 8, rewards=rewards, generator=torch.Generator().manual_seed(3),
                                      scale_rewards="group")
    centred = batch.rewards - batch.rewards.mean(1, keepdim=True)
    diff = (std_batch.advantages - centred / (batch.rewards.std(1, keepdim=True) + 1e-4)).abs().max()
    assert diff < 1e-14, float(diff)
    plain, _ = sample_exact_batch(dist, 3, generator=torch.Generator().manual_seed(0))
    assert not plain.advantages.any() and not plain.rewards.any()
    with pytest.raises(ValueError, match="scale_rewards"):
        sample_exact_batch(dist, 4, scale_rewards="rloo")
    with pytest.raises(ValueError, match="G must"):
        sample_exact_batch(dist, 1)


def test_sample_exact_batch_draws_from_the_exact_distribution(dist):
    N = 20_000
    _, index = sample_exact_batch(dist, N, generator=torch.Generator().manual_seed(7))
    for n in range(dist.B):
        counts = torch.bincount(index[n], minlength=dist.num_responses).to(torch.float64)
        expected = N * dist.probs[n]
        # Pearson χ² with the responses of expected count < 5 pooled into one cell.
        small = expected < 5
        observed_cells = torch.cat([counts[~small], counts[small].sum()[None]])
        expected_cells = torch.cat([expected[~small], expected[small].sum()[None]])
        chi2 = float(((observed_cells - expected_cells) ** 2 / expected_cells).sum())
        df = len(observed_cells) - 1
        assert chi2 < df + 5 * math.sqrt(2 * df), (chi2, df)
        # And no well-populated response is off by more than 4.5 sd.
        z = (counts - expected) / torch.sqrt(expected * (1 - dist.probs[n]))
        assert float(z[~small].abs().max()) < 4.5


def test_random_reward_table_is_deterministic():
    table = random_reward_table(3, V, T, generator=torch.Generator().manual_seed(0))
    again = random_reward_table(3, V, T, generator=torch.Generator().manual_seed(0))
    assert table.dtype == torch.float64 and table.shape == (3, V ** T) and torch.equal(table, again)
    # Per prompt: one last-token value earns ≈ 1, the others ≈ 0 (plus noise in [0, 0.1)).
    hits = table > 0.5
    last = all_responses(V, T)[:, -1]
    for n in range(3):
        assert len(set(last[hits[n]].tolist())) == 1 and int(hits[n].sum()) == V ** (T - 1)


def test_exact_entropy_change_of_a_step(policy, dist):
    """H(θ⁺) − H(θ) is the difference of two exact distributions' entropies (module docstring)."""
    grad = exact_entropy_grad(policy, policy.params, PROMPTS, T, seq_chunk=SEQ_CHUNK)
    step = 1e-8
    after = {n: t + step * grad[n] for n, t in policy.params.items()}   # a small ascent step on H
    change = exact_distribution(policy, after, PROMPTS, T, seq_chunk=SEQ_CHUNK).mean_entropy - dist.mean_entropy
    assert change == pytest.approx(step * dot(grad, grad), rel=1e-3)
