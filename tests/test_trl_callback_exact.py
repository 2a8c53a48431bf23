"""The callback's two estimators against exact enumeration (issue 18): the change of each step measured on the NEXT
step's rollouts, drawn at θ_{t+1}.

The enumerable policy of tests/test_heldout_exact.py (V = 4 here, T = 3, a pool of 3 prompts, float64, a peaked
head). A plain AdamW loop stands in for the trainer: at each step an update batch U (6 prompt slots uniform over the
pool × G = 8 draws from the exact π_θt, rewards favouring likely responses) gives θ_{t+1} by ``rl_update``
(lr 1e-2, so the first steps are sign-like and large). Then, on evaluation batches E drawn at θ_{t+1} (6 slots
uniform over the pool × 8, independent of U), exactly as the callback computes them:

* ``reverse_importance_change(θ_t, θ_{t+1}, E)`` against the exact H(θ_{t+1}) − H(θ_t) (pool means of the exact
  sequence entropies);
* ``delta_h1_heldout(θ_{t+1}, θ_{t+1} − θ_t, E)`` against the exact ∇H(θ_{t+1})·Δθ_t.

Over STEPS × DRAWS = 300 measurements: the pooled z = Σ(estimate − exact)/√Σ SE² is below 3.5 in absolute value
(unbiased), and ±2 SE covers the exact value in 85–96 % of them — P(|t₅| < 2) = 0.90 with six slots; measured
91.7 % (realised) and 90.7 % (first order), pooled z +0.10 and −0.25 — so the SEs are calibrated (a coverage rather than
the sd of z, which a few measurements with a near-zero SE — all slots one prompt, a collapsed policy — dominate).
"""

from __future__ import annotations

import math

import pytest
import torch

from funcprobe import AdamState, Policy
from funcprobe.enumeration import ExactDistribution, exact_distribution, exact_entropy_grad, random_reward_table
from funcprobe.enumeration import sample_exact_batch
from funcprobe.heldout import delta_h1_heldout
from funcprobe.objective import Objective
from funcprobe.testing import tiny_peft_model
from funcprobe.trl import reverse_importance_change
from funcprobe.update import rl_update

pytestmark = pytest.mark.usefixtures("one_thread")

V, T = 4, 3
PROMPTS = [[1, 2], [3, 1], [2, 2]]
SLOTS, G = 6, 8
STEPS, DRAWS = 30, 10
LR = 1e-2
Z = 3.5


def slots_of(dist: ExactDistribution, slots: torch.Tensor) -> ExactDistribution:
    return ExactDistribution(prompts=tuple(dist.prompts[i] for i in slots.tolist()), length=dist.length,
                             vocab_size=dist.vocab_size, logprobs=dist.logprobs[slots], pad_token_id=dist.pad_token_id)


@pytest.fixture(scope="module")
def measurements():
    model = tiny_peft_model("qwen2", vocab_size=V, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, r=2,
                            dtype=torch.float64, seed=3)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    policy = Policy.from_peft(model, logsoftmax_dtype=torch.float64)
    theta = dict(policy.params)
    adam = AdamState.zeros(theta, lr=LR)
    objective = Objective(loss_type="dr_grpo", scale_rewards="none", max_grad_norm=None)
    generator = torch.Generator().manual_seed(0)
    dist = exact_distribution(policy, theta, PROMPTS, T)
    rewards = dist.logprobs + random_reward_table(len(PROMPTS), V, T, generator=torch.Generator().manual_seed(1))
    out = {"realised": [], "first": []}
    for _ in range(STEPS):
        slots = torch.randint(0, len(PROMPTS), (SLOTS,), generator=generator)
        update, _ = sample_exact_batch(slots_of(dist, slots), G, rewards=rewards[slots], generator=generator)
        after, adam = rl_update(theta, update, policy=policy, adam=adam, objective=objective)
        dist_after = exact_distribution(policy, after, PROMPTS, T)
        exact_change = dist_after.mean_entropy - dist.mean_entropy
        grad = exact_entropy_grad(policy, after, PROMPTS, T)
        delta = {n: after[n] - theta[n] for n in theta}
        exact_first = float(sum((grad[n].double() * delta[n].double()).sum() for n in theta))
        for _ in range(DRAWS):
            slots = torch.randint(0, len(PROMPTS), (SLOTS,), generator=generator)
            evaluation, _ = sample_exact_batch(slots_of(dist_after, slots), G, generator=generator)
            change = reverse_importance_change(theta, after, evaluation, policy=policy)
            first = delta_h1_heldout(after, delta, evaluation, policy=policy)
            out["realised"].append((change.deltaH, change.se, exact_change))
            out["first"].append((first.deltaH1, first.se, exact_first))
        theta, dist = after, dist_after
    return out


def pooled(rows):
    est, se, exact = (torch.tensor(c, dtype=torch.float64) for c in zip(*rows))
    z_pooled = float((est - exact).sum() / torch.sqrt((se ** 2).sum()))
    z = (est - exact) / se
    return z_pooled, float((z.abs() < 2).to(torch.float64).mean()), float((exact.abs()).mean()), float(se.mean())


@pytest.mark.parametrize("which", ["realised", "first"])
def test_unbiased_and_calibrated_on_the_next_rollouts(measurements, which):
    z_pooled, covered, size, se = pooled(measurements[which])
    print(f"\n{which}: pooled z {z_pooled:+.2f}, |z| < 2 for {covered:.1%}, mean |exact| {size:.3g}, mean SE {se:.3g} "
          f"over {len(measurements[which])} measurements")
    assert abs(z_pooled) < Z
    assert 0.85 < covered < 0.96  # P(|t₅| < 2) = 0.90: six slots give the SE five degrees of freedom
    assert size > se / 3  # the changes are not all buried in noise
