"""δH₁'s U-statistic against exact enumeration (spec §5, §7): unbiasedness and the jackknife SE.

Per-response gradients ∇S_r of every one of the V^T responses of each pool prompt are computed once; a sampled
batch's unit vectors are then sums of looked-up rows, so thousands of batches cost milliseconds. The lookup is
first checked to reproduce the real ``delta_h1`` on sampled batches exactly, so the statistics below are the
statistics of ``delta_h1`` itself.
"""

from __future__ import annotations

import math

import pytest
import torch

from funcprobe import AdamState, Policy, RolloutBatch, delta_h1
from funcprobe.delta_h1 import ustatistic_summary
from funcprobe.enumeration import exact_distribution, exact_expected_x, exact_expected_y, random_reward_table
from funcprobe.testing import tiny_peft_model

V, T, POOL, B, G = 5, 3, 3, 16, 4
PROMPTS = [[1, 2], [3, 1], [4, 4]]


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    model = tiny_peft_model("qwen2", vocab_size=V, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, r=2,
                            dtype=torch.float64, seed=3)
    with torch.no_grad():  # a peaked head, so entropies and gradients are far from the uniform policy's
        model.get_output_embeddings().weight.mul_(8.0)
    policy = Policy.from_peft(model, logsoftmax_dtype=torch.float64)
    params = policy.params
    dist = exact_distribution(policy, params, PROMPTS, T)
    # Rewards that favour likely responses: the step then lowers entropy, so E[X]·P·E[Y] is far from 0 and the
    # test can resolve it (random rewards make the two gradients nearly orthogonal).
    rewards = dist.logprobs + random_reward_table(POOL, V, T, generator=torch.Generator().manual_seed(0))
    enumeration = dist.batch()
    jacobian = torch.zeros(POOL * V ** T, sum(p.numel() for p in params.values()), dtype=torch.float64)
    for item in policy.iter_logprob_vjps(params, enumeration, seq_chunk=1):
        grads = item.vjp(torch.ones(1, dtype=torch.float64))
        jacobian[int(item.chunk.flat_index[0])] = torch.cat([grads[n].reshape(-1) for n in params])
    return dict(policy=policy, params=params, dist=dist, rewards=rewards, enumeration=enumeration,
                jacobian=jacobian.reshape(POOL, V ** T, -1))


def draw(setup, generator, count):
    """count batches: prompt slots i.i.d. uniform over the pool, G responses i.i.d. from exact π_θ."""
    prompt = torch.randint(0, POOL, (count, B), generator=generator)
    probs = setup["dist"].probs[prompt].reshape(count * B, -1)
    response = torch.multinomial(probs, G, replacement=True, generator=generator).reshape(count, B, G)
    return prompt, response


def lookup_unit_vectors(setup, prompt, response):
    """X_n, Y_n [count, B, D] of spec §2–§3 from the looked-up per-response gradients."""
    logprobs = setup["dist"].logprobs[prompt[..., None], response]
    rewards = setup["rewards"][prompt[..., None], response]
    advantages = rewards - rewards.mean(-1, keepdim=True)
    grads = setup["jacobian"][prompt[..., None], response]                     # [count, B, G, D]
    centred = logprobs - (logprobs.sum(-1, keepdim=True) - logprobs) / (G - 1)
    X = (centred[..., None] * grads).mean(-2)
    Y = (advantages[..., None] / T * grads).mean(-2)
    return X, Y


def lookup_ustatistic(X, Y, P):
    """U_cross and its jackknife SE per batch, through the same algebra delta_h1 uses."""
    sum_x, sum_y = X.sum(1), Y.sum(1)
    values, se_jack = [], []
    for b in range(X.shape[0]):
        summary = ustatistic_summary(float(sum_x[b] @ (P * sum_y[b])), (X[b] * P * Y[b]).sum(-1),
                                     X[b] @ (P * sum_y[b]), Y[b] @ (P * sum_x[b]))
        values.append(summary.value)
        se_jack.append(summary.se_jack)
    return torch.tensor(values, dtype=torch.float64), torch.tensor(se_jack, dtype=torch.float64)


def test_lookup_reproduces_delta_h1(setup):
    """On sampled batches the lookup's X_n, Y_n and U_cross equal delta_h1's run on the same tokens."""
    policy, params = setup["policy"], setup["params"]
    prompt, response = draw(setup, torch.Generator().manual_seed(1), 2)
    state = AdamState.zeros(params, lr=0.05, weight_decay=0.0)
    X, Y = lookup_unit_vectors(setup, prompt, response)
    enumeration = setup["enumeration"]
    for b in range(2):
        flat = (prompt[b, :, None] * V ** T + response[b]).reshape(-1)
        take = lambda t: t.reshape(POOL * V ** T, -1)[flat].reshape(B, G, -1)  # noqa: E731
        rewards = setup["rewards"][prompt[b, :, None], response[b]]
        batch = RolloutBatch(input_ids=take(enumeration.input_ids), attention_mask=take(enumeration.attention_mask),
                             response_mask=take(enumeration.response_mask),
                             advantages=rewards - rewards.mean(1, keepdim=True),
                             length_norm=torch.full((B,), float(T), dtype=torch.float64), rewards=rewards)
        result = delta_h1(params, batch, policy=policy, adam=state, seq_chunk=G)
        ybar = Y[b].mean(0)
        # the step's P from the same Ȳ, spec §4 with m = v = 0 at step 1: v' = (1 − β2) Ȳ², bc2 = 1 − β2
        P = 1 / ((0.001 * ybar ** 2).sqrt() / math.sqrt(0.001) + 1e-8)
        value, se_jack = lookup_ustatistic(X[b:b + 1], Y[b:b + 1], P)
        assert math.isclose(result.U_cross, float(value[0]), rel_tol=1e-9)
        assert math.isclose(result.se_jack, float(se_jack[0]), rel_tol=1e-9)


def test_u_cross_is_unbiased_and_the_jackknife_se_matches_the_spread(setup):
    """Mean of U_cross over 3000 batches within 3 MC SEs of E[X]·P·E[Y] (exact); jackknife SE ≈ spread (25%)."""
    policy, params = setup["policy"], setup["params"]
    P = 0.5 + torch.rand(setup["jacobian"].shape[-1], generator=torch.Generator().manual_seed(2),
                         dtype=torch.float64)
    expected_x = exact_expected_x(policy, params, PROMPTS, T)       # mean over the pool of E[X_p] = −∇H_p
    expected_y = exact_expected_y(policy, params, PROMPTS, T, setup["rewards"], G)
    flat = lambda d: torch.cat([d[n].reshape(-1) for n in params])  # noqa: E731
    target = float(flat(expected_x) @ (P * flat(expected_y)))

    prompt, response = draw(setup, torch.Generator().manual_seed(3), 3000)
    X, Y = lookup_unit_vectors(setup, prompt, response)
    values, se_jack = lookup_ustatistic(X, Y, P)
    mc_se = float(values.std() / math.sqrt(len(values)))
    assert abs(target) > 5 * mc_se                                      # the target is resolvable: the test can fail
    assert abs(float(values.mean()) - target) < 3 * mc_se
    # The V-statistic X̄·P·Ȳ, which keeps the same-prompt products, is biased by Σ_n X_n·P·Y_n / B²: detectable here.
    v_statistic = ((X.mean(1) * P * Y.mean(1)).sum(-1))
    assert abs(float(v_statistic.mean()) - target) > 3 * float(v_statistic.std() / math.sqrt(len(values)))
    spread = float(values.std())
    reported = math.sqrt(float((se_jack ** 2).mean()))
    assert abs(reported / spread - 1) < 0.25, (reported, spread)
