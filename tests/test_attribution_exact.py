"""Attribution against exact enumeration (spec §5, §7, §8): over many batches, the mean sequence attribution of every
enumerable response equals that response's exact first-order contribution to the expected gradient term.

The exact contribution. Units = prompts (U = B), Dr. GRPO aggregation with fixed-length responses (L = T), advantages
A = R − mean_g R (``scale_rewards="none"``) and a fixed preconditioner P. Spec §8 with c = A/(B G T) gives the
sequence attribution

    a_{w,g} = −η_g/(B(B−1)) · A_{w,g}/(G T) · Σ_{u≠w} X_u·P·∇S_w(r_{w,g}).

The X_u (u ≠ w) are independent of prompt w's samples, E[X_u] = −∇H_u (spec §2), and E[A_{w,1} | r_{w,1} = r] =
(1 − 1/G)(R_w(r) − R̄_w) with R̄_w = Σ_r π_w(r) R_w(r). So the expectation of a response's per-batch total,
Σ_g 1{r_{w,g} = r} a_{w,g}, is

    C_w(r) = −η_g/(B(B−1)) · π_w(r) (1 − 1/G)(R_w(r) − R̄_w)/T · Σ_{u≠w} (−∇H_u)·P·∇S_w(r),

and Σ_{w,r} C_w(r) = −η_g/(B(B−1)) Σ_{u≠w} E[X_u]·P·E[Y_w] = E[grad_term] (spec §5).

P is held fixed by a large second moment v (≈ 1e6): the batch's own v' = β2 v + (1 − β2) g² moves P by ≲ 1e-9
relative, far below the Monte-Carlo error; the exact check of ``attribute`` against the lookup uses the batch's own P.

The Monte-Carlo side needs many batches per response, so the batches are evaluated by lookup in the exact Gram matrix
K[(u, r'), (w, r)] = ∇S_u(r')·(η_g P)·∇S_w(r) (every response's gradient by forward mode, one jvp per parameter);
``attribute`` itself is checked against the same lookup on sampled batches to 1e-10, which ties the two together.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from funcprobe import Objective, Policy
from funcprobe.adam import update_decomposition
from funcprobe.attribution import attribute
from funcprobe.enumeration import (exact_distribution, exact_entropy_grad, exact_expected_y, random_reward_table,
                                   sample_exact_batch)
from funcprobe.testing import tiny_peft_model

from conftest import warm_state

V, T, G = 6, 3, 4                          # 216 responses per prompt
PROMPTS = torch.tensor([[1, 3, 4], [2, 5, 0], [4, 4, 1]])
B = PROMPTS.shape[0]
SEQ_CHUNK = 1024                           # one forward for the whole enumeration batch
OBJECTIVE = Objective(loss_type="dr_grpo", scale_rewards="none")
N_BATCHES, N_CHUNK = 20_000, 2_000


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny tensors: threads only add overhead


def forward_mode():
    """SDPA's math backend (the CPU flash kernel has no forward-mode rule); silence torch's one-time jvp notices."""
    context = warnings.catch_warnings()
    context.__enter__()
    warnings.simplefilter("ignore", DeprecationWarning)
    return context, sdpa_kernel(SDPBackend.MATH)


@pytest.fixture(scope="module")
def study():
    # float64 SDPA (not eager: transformers' eager softmax rounds through float32); a sharpened head so that π is far
    # from uniform; LoRA on q and v only (112 parameters: the Gram matrix takes 112 jvps).
    model = tiny_peft_model("qwen2", vocab_size=V, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                            dtype=torch.float64, init_lora_weights=False, r=2, seed=7, attn_implementation="sdpa",
                            target_modules=("q_proj", "v_proj"))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(15.0)
    policy = Policy.from_peft(model, logsoftmax_dtype=torch.float64)
    params = policy.params
    dist = exact_distribution(policy, params, PROMPTS, T, seq_chunk=SEQ_CHUNK)
    rewards = random_reward_table(B, V, T, generator=torch.Generator().manual_seed(5))
    adam = warm_state(params, lr=0.01, weight_decay=0.1, step=4, seed=3)
    generator = torch.Generator().manual_seed(11)
    # v ≈ 1e6: P does not move with the batch's gradient (module docstring).
    adam = dataclasses.replace(adam, exp_avg_sq={
        name: 1e6 * (0.5 + torch.rand(v.shape, generator=generator, dtype=torch.float64))
        for name, v in adam.exp_avg_sq.items()})
    zero = {name: torch.zeros_like(t, dtype=torch.float64) for name, t in params.items()}
    fixed = update_decomposition(params, zero, adam)          # g = 0: v' = β2 v exactly
    eta_p = torch.cat([fixed.eta_preconditioner()[name].reshape(-1) for name in params])
    eta_g = float(fixed.eta_g)

    # J[(n, r), i] = ∂S_n(r)/∂θ_i, one jvp per parameter coordinate.
    batch = dist.batch()
    names = list(params)
    columns = []
    context, kernel = forward_mode()
    with kernel:
        def scores(p):
            return policy.sequence_logprobs(p, batch, seq_chunk=SEQ_CHUNK, with_grad=True)

        for name in names:
            for i in range(params[name].numel()):
                tangent = {n: torch.zeros_like(t) for n, t in params.items()}
                tangent[name].view(-1)[i] = 1.0
                columns.append(torch.func.jvp(scores, (params,), (tangent,))[1].reshape(-1))
    context.__exit__(None, None, None)
    J = torch.stack(columns, dim=1).to(torch.float64)                     # [B·R, D]
    K = ((J * eta_p) @ J.T).reshape(B, dist.num_responses, B, dist.num_responses)
    return dict(policy=policy, params=params, dist=dist, rewards=rewards, adam=adam, eta_p=eta_p, eta_g=eta_g,
                J=J.reshape(B, dist.num_responses, -1), K=K, names=names)


def exact_contribution(study, *, attenuation: float = 1.0 - 1.0 / G) -> torch.Tensor:
    """C_w(r) [B, R] of the module docstring (attenuation: the (1 − 1/G) factor; changed only to check power)."""
    dist, J, eta_p = study["dist"], study["J"], study["eta_p"]
    probs, S = dist.probs, dist.logprobs
    expected_x = (probs * S)[:, :, None].mul(J).sum(1)                   # E[X_u] = Σ_r π S ∇S = −∇H_u, [B, D]
    R = study["rewards"]
    centred = R - (probs * R).sum(1, keepdim=True)
    out = torch.zeros(B, dist.num_responses, dtype=torch.float64)
    for w in range(B):
        others = expected_x.sum(0) - expected_x[w]
        out[w] = (probs[w] * attenuation * centred[w] / T) * (J[w] @ (eta_p * others))
    return -out / (B * (B - 1))


def lookup_sequence_attribution(study, index: torch.Tensor, advantages: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """a_{w,g} [B, *, G] for batches given by response indices [B, *, G], from the Gram matrix K."""
    K = study["K"]
    loo = (S.sum(-1, keepdim=True) - S) / (G - 1)
    coef = (S - loo) / G                                                  # X_u = Σ_j coef_{u,j} ∇S_u(idx_{u,j})
    # dots[n, w, r] = Σ_{u≠w} X_u·ηP·∇S_w(r)
    dots = 0
    for u in range(B):
        rows = K[u][index[u]]                                             # [*, G, B, R]
        contribution = (coef[u][..., None, None] * rows).sum(-3)          # [*, B, R]
        mask = torch.ones(B, 1, dtype=torch.float64)
        mask[u] = 0.0
        dots = dots + contribution * mask
    picked = torch.stack([dots[..., w, :].gather(-1, index[w]) for w in range(B)])   # [B, *, G]
    return -advantages / (G * T) * picked / (B * (B - 1))


def test_attribute_equals_the_gram_lookup(study):
    """``attribute`` on sampled batches equals the lookup formula (and so the Monte-Carlo below tests the code)."""
    dist = study["dist"]
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        batch, index = sample_exact_batch(dist, G, rewards=study["rewards"], generator=generator)
        context, kernel = forward_mode()
        with kernel:
            result = attribute(study["params"], batch, policy=study["policy"], adam=study["adam"],
                               objective=OBJECTIVE, seq_chunk=SEQ_CHUNK)
        context.__exit__(None, None, None)
        # The batch's own ηP (v' includes this batch's g²); the lookup with it reproduces a to float64 rounding.
        own = torch.cat([result.step.eta_preconditioner()[n].reshape(-1) for n in study["names"]])
        J = study["J"].reshape(B * dist.num_responses, -1)
        own_study = dict(study, K=((J * own) @ J.T).reshape(B, dist.num_responses, B, dist.num_responses))
        expected = lookup_sequence_attribution(own_study, index, batch.advantages, batch.logprobs)
        scale = float(expected.abs().max())
        assert scale > 0
        assert float((result.sequence - expected).abs().max()) <= 1e-10 * scale
        assert result.eta_g == pytest.approx(study["eta_g"], rel=1e-15)
        # P with and without this batch's g² differ by far less than the Monte-Carlo error below.
        assert float(((own - study["eta_p"]) / study["eta_p"]).abs().max()) < 1e-8


def test_exact_contributions_sum_to_the_expected_gradient_term(study):
    """Σ_{w,r} C_w(r) = −η_g/(B(B−1)) Σ_{u≠w} E[X_u]·P·E[Y_w], with E[X_u] and E[Y_w] from funcprobe.enumeration."""
    policy, params, eta_p = study["policy"], study["params"], study["eta_p"]
    names = study["names"]
    expected_x = []
    for n in range(B):
        grad = exact_entropy_grad(policy, params, PROMPTS[n:n + 1], T, seq_chunk=SEQ_CHUNK)
        expected_x.append(-torch.cat([grad[name].reshape(-1) for name in names]))
    expected_y = []
    for n in range(B):
        y = exact_expected_y(policy, params, PROMPTS[n:n + 1], T, study["rewards"][n:n + 1], G, seq_chunk=SEQ_CHUNK)
        expected_y.append(torch.cat([y[name].reshape(-1) for name in names]))   # B = 1 here: E[Y_n] itself
    target = -sum(float(expected_x[u] @ (eta_p * expected_y[w])) for u in range(B) for w in range(B) if u != w)
    target /= B * (B - 1)
    total = float(exact_contribution(study).sum())
    assert total == pytest.approx(target, rel=1e-9)
    assert abs(target) > 0


def test_mean_sequence_attribution_matches_the_exact_contribution(study):
    """Over 20,000 batches (B = 3, G = 4), each response's mean per-batch attribution total is within Monte-Carlo
    error of C_w(r): |z| < 5 for every response seen ≥ 100 times, and Σ z² within 5 sd of its χ² mean."""
    dist, R = study["dist"], study["rewards"]
    num = dist.num_responses
    generator = torch.Generator().manual_seed(2026)
    total = torch.zeros(B, num, dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    counts = torch.zeros_like(total)
    for _ in range(N_BATCHES // N_CHUNK):
        index = torch.multinomial(dist.probs, N_CHUNK * G, replacement=True, generator=generator)
        index = index.reshape(B, N_CHUNK, G)
        S = dist.logprobs.gather(1, index.reshape(B, -1)).reshape(B, N_CHUNK, G)
        rewards = R.gather(1, index.reshape(B, -1)).reshape(B, N_CHUNK, G)
        advantages = rewards - rewards.mean(-1, keepdim=True)
        a = lookup_sequence_attribution(study, index, advantages, S)               # [B, N, G]
        per_batch = torch.zeros(B, N_CHUNK, num, dtype=torch.float64).scatter_add_(-1, index, a)
        total += per_batch.sum(1)
        total_sq += (per_batch ** 2).sum(1)
        counts += torch.zeros(B, num, dtype=torch.float64).scatter_add_(
            -1, index.reshape(B, -1), torch.ones(B, N_CHUNK * G, dtype=torch.float64))
    mean = total / N_BATCHES
    variance = (total_sq / N_BATCHES - mean ** 2) * N_BATCHES / (N_BATCHES - 1)
    se = torch.sqrt(variance.clamp_min(0) / N_BATCHES)
    seen = counts >= 100

    def z_scores(target):
        return ((mean - target) / se)[seen]

    exact = exact_contribution(study)
    z = z_scores(exact)
    df = int(seen.sum())
    assert df > 200, df
    assert float(z.abs().max()) < 5.0, float(z.abs().max())
    chi2 = float((z ** 2).sum())
    assert abs(chi2 - df) < 5 * math.sqrt(2 * df), (chi2, df)
    # The check has power: many responses' contributions stand well clear of their Monte-Carlo error, the total is
    # recovered, and a target without the (1 − 1/G) attenuation is rejected.
    assert int((exact[seen].abs() > 6 * se[seen]).sum()) >= 20
    assert float(mean.sum()) == pytest.approx(float(exact.sum()), rel=0.05)
    wrong = float((z_scores(exact_contribution(study, attenuation=1.0)) ** 2).sum())
    assert wrong - df > 10 * math.sqrt(2 * df), (wrong, df)
