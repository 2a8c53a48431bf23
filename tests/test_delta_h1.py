"""δH₁ (spec §2–§5) against a naive reference, identities, invariances and bad inputs."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from funcprobe import AdamState, Objective, Policy, delta_h1, rl_update, update_direction
from funcprobe.testing import random_batch, tiny_peft_model

from conftest import naive_sequence_logprobs, warm_state

VOCAB = 64
HYPOTHESIS = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def peft_model():
    return tiny_peft_model("qwen2", dtype=torch.float64, seed=13, r=2, num_layers=1, hidden_size=16,
                           target_modules=("q_proj", "v_proj", "down_proj"))


@pytest.fixture(scope="module")
def policy(peft_model):
    return Policy.from_peft(peft_model, logsoftmax_dtype=torch.float64)


@pytest.fixture(scope="module")
def batch():
    return random_batch(6, 3, vocab_size=VOCAB, prompt_len=(2, 4), response_len=(1, 5), seed=5)




# -------------------------------------------------------------------------------------------- naive reference
def model_with_params(peft_model, params):
    """A deep copy of ``peft_model`` holding ``params``, and its LoRA tensors as autograd leaves (in params' order)."""
    model = copy.deepcopy(peft_model)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in params.items():
            named[name].copy_(tensor)
    return model, [named[name].requires_grad_(True) for name in params]


def naive_per_sequence_grads(peft_model, params, batch):
    """∇S_{n,g} for every sequence by ordinary autograd through full logits: {(n, g): flat float64 vector}."""
    model, leaves = model_with_params(peft_model, params)
    logprobs = naive_sequence_logprobs(model, batch, logsoftmax_dtype=torch.float64)
    grads = {}
    for n, g in itertools.product(range(batch.B), range(batch.G)):
        parts = torch.autograd.grad(logprobs[n, g], leaves, retain_graph=True)
        grads[n, g] = torch.cat([p.reshape(-1) for p in parts]).to(torch.float64)
    return logprobs.detach(), grads


def naive_token_weights(batch, loss_type, epsilon_high=0.2):
    """w_{n,g} per sequence for each loss type, written out from TRL's aggregation (spec §3), as a [B][G] list."""
    B, G = batch.B, batch.G
    T = batch.response_mask.sum(-1).double()
    N, total = B * G, float(T.sum())
    table = {"dr_grpo": lambda n, g: 1 / (N * float(batch.length_norm[n])),
             "grpo": lambda n, g: 1 / (N * float(T[n, g])), "sapo": lambda n, g: 1 / (N * float(T[n, g])),
             "bnpo": lambda n, g: 1 / total, "dapo": lambda n, g: 1 / total, "vespo": lambda n, g: 1 / total,
             "cispo": lambda n, g: min(1.0, epsilon_high) / total, "luspo": lambda n, g: 1 / N}
    return [[table[loss_type](n, g) for g in range(G)] for n in range(B)]


def naive_token_logprobs(model, batch):
    """ℓ per position [B·G, L − 1] (the log-probability of token k + 1) by a full forward, and the response mask."""
    B, G, L = batch.input_ids.shape
    input_ids = batch.input_ids.reshape(B * G, L)
    attention_mask = batch.attention_mask.reshape(B * G, L).long()
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0), use_cache=False).logits
    logp = torch.log_softmax(logits.double(), dim=-1)[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return logp, batch.response_mask.reshape(B * G, L)[:, 1:].double()


def naive_Y(peft_model, params, batch, objective):
    """Y_n = B Σ_{g,k} c_{n,g,k} ∇ℓ_{n,g,k} (spec §3) by autograd, with c = w·(A − βκ) built by hand; the KL
    reference from the module with its adapter disabled (PEFT's own switch, not funcprobe's zeroed lora_B)."""
    model, leaves = model_with_params(peft_model, params)
    B, G, L = batch.input_ids.shape
    logp, mask = naive_token_logprobs(model, batch)
    w = torch.tensor(naive_token_weights(batch, objective.loss_type, objective.epsilon_high),
                     dtype=torch.float64).reshape(B * G, 1)
    A = (batch.advantages.reshape(B * G, 1) if batch.token_advantages is None
         else batch.token_advantages.reshape(B * G, L)[:, 1:])  # A of the token each position predicts
    c = w * A * mask
    if objective.beta > 0:
        with torch.no_grad(), model.disable_adapter():
            ref, _ = naive_token_logprobs(model, batch)
        ell = logp.detach()
        kappa = (ell - ref) if objective.use_bias_correction_kl else (1 - torch.exp(ref - ell))
        c = c - w * mask * objective.beta * kappa
    Y = []
    for n in range(B):
        rows = slice(n * G, (n + 1) * G)
        parts = torch.autograd.grad((c[rows] * logp[rows]).sum(), leaves, retain_graph=True)
        Y.append(B * torch.cat([p.reshape(-1) for p in parts]).to(torch.float64))
    return Y


def naive_delta_h1(peft_model, params, batch, state, units, objective=None):
    """Spec §2–§5 written the slow, obvious way: explicit X_n, Y_n, explicit AdamW algebra, explicit pair loops.
    Without ``objective``: Dr. GRPO, Y_n = (1/G) Σ_g (A/L) ∇S (spec v1); with one, Y_n from :func:`naive_Y`."""
    B, G = batch.B, batch.G
    logprobs, grads = naive_per_sequence_grads(peft_model, params, batch)
    X, Y = [], []
    for n in range(B):
        x = sum((logprobs[n, g] - (logprobs[n].sum() - logprobs[n, g]) / (G - 1)) * grads[n, g] for g in range(G)) / G
        y = sum(batch.advantages[n, g] / batch.length_norm[n] * grads[n, g] for g in range(G)) / G
        X.append(x)
        Y.append(y)
    if objective is not None:
        Y = naive_Y(peft_model, params, batch, objective)
    blocks = [[n] for n in range(B)] if units == "prompt" else [list(range(u * B // units, (u + 1) * B // units))
                                                                  for u in range(units)]
    Xu = [sum(X[n] for n in block) / len(block) for block in blocks]
    Yu = [sum(Y[n] for n in block) / len(block) for block in blocks]
    U = len(blocks)
    ybar = sum(Y) / B
    # the AdamW step of spec §4 on g = −Ȳ, by hand
    names = list(params)
    theta = torch.cat([params[n].reshape(-1) for n in names])
    m = torch.cat([state.exp_avg[n].reshape(-1) for n in names])
    v = torch.cat([state.exp_avg_sq[n].reshape(-1) for n in names])
    hyper = state.hyper[names[0]]
    t = state.step[names[0]] + 1
    bc1, bc2 = 1 - hyper.beta1 ** t, 1 - hyper.beta2 ** t
    g = -ybar
    max_norm = None if objective is None else objective.max_grad_norm
    if max_norm is not None:  # clip_grad_norm_: c = min(max_norm / (‖g‖ + 1e-6), 1), folded into η_g
        g = g * min(max_norm / (float(g.norm()) + 1e-6), 1.0)
    clip = 1.0 if max_norm is None else min(max_norm / (float(ybar.norm()) + 1e-6), 1.0)
    v_new = hyper.beta2 * v + (1 - hyper.beta2) * g * g
    P = 1 / (v_new.sqrt() / math.sqrt(bc2) + hyper.eps)
    eta_g = clip * hyper.lr * (1 - hyper.beta1) / bc1
    delta_state = -(hyper.lr / bc1) * hyper.beta1 * m * P - hyper.lr * hyper.weight_decay * theta

    def u_cross(indices):
        pairs = [(u, w) for u in indices for w in indices if u != w]
        return sum(float(Xu[u] @ (P * Yu[w])) for u, w in pairs) / len(pairs)

    def delta(indices):
        xbar = sum(Xu[u] for u in indices) / len(indices)
        return -eta_g * u_cross(indices) - float(xbar @ delta_state)

    everyone = list(range(U))
    value = u_cross(everyone)
    leave_one_out = [u_cross([w for w in everyone if w != u]) for u in everyone] if U >= 3 else None
    delta_loo = [delta([w for w in everyone if w != u]) for u in everyone] if U >= 3 else None

    def jackknife(values):
        mean = sum(values) / len(values)
        return math.sqrt((len(values) - 1) / len(values) * sum((v_ - mean) ** 2 for v_ in values))

    xbar = sum(Xu) / U
    row_means = [(sum(float(Xu[u] @ (P * Yu[w])) + float(Yu[u] @ (P * Xu[w])) for w in everyone if w != u))
                 / (2 * (U - 1)) for u in everyone]
    zeta1 = sum((r - value) ** 2 for r in row_means) / (U - 1)
    return dict(
        U_cross=value, grad_term=-eta_g * value, state_term=-float(xbar @ delta_state), deltaH1=delta(everyone),
        deltaH1_plugin=-float(xbar @ (eta_g * P * ybar + delta_state)), bars_dot=float(xbar @ (P * ybar)),
        diag_sum=sum(float(Xu[u] @ (P * Yu[u])) for u in everyone), eta_g=eta_g,
        seed_deltaH1=-hyper.lr * value, row_means=row_means, zeta1_plugin=zeta1, se_plugin=math.sqrt(4 * zeta1 / U),
        se_jack=jackknife(leave_one_out) if leave_one_out else math.nan,
        se_deltaH1=jackknife(delta_loo) if delta_loo else math.nan)


def assert_matches_naive(result, reference, tolerance=1e-10):
    # Spreads can be exactly 0 in exact arithmetic (with U = 2 both row means equal U_cross): compare them on the
    # scale of the quantity they spread.
    absolute = {"zeta1_plugin": tolerance * reference["U_cross"] ** 2,
                "se_plugin": tolerance * abs(reference["U_cross"])}
    for key, expected in reference.items():
        got = getattr(result, key)
        if key == "row_means":
            scale = max(abs(r) for r in expected)
            assert max(abs(a - b) for a, b in zip(got, expected)) <= tolerance * scale, key
        elif math.isnan(expected):
            assert math.isnan(got), key
        else:
            assert math.isclose(got, expected, rel_tol=tolerance, abs_tol=absolute.get(key, 1e-300)), (
                key, got, expected)


@pytest.mark.parametrize("units", ["prompt", 3, 2])
@pytest.mark.parametrize("seq_chunk", [1, 2, 6])
def test_delta_h1_equals_naive_reference(peft_model, policy, batch, units, seq_chunk):
    state = warm_state(policy.params)
    if units == 2:  # U = 2: no jackknife, NaN with a warning
        with pytest.warns(RuntimeWarning, match="3 units"):
            result = delta_h1(policy.params, batch, policy=policy, adam=state, units=units, seq_chunk=seq_chunk,
                              token_chunk=3)
    else:
        result = delta_h1(policy.params, batch, policy=policy, adam=state, units=units, seq_chunk=seq_chunk,
                          token_chunk=3)
    reference = naive_delta_h1(peft_model, policy.params, batch, state, units)
    assert abs(reference["U_cross"]) > 1e-8 and abs(reference["state_term"]) > 1e-12  # can fail
    assert_matches_naive(result, reference)
    assert result.n_units == (batch.B if units == "prompt" else units)


OBJECTIVES = [Objective(loss_type=t) for t in ("grpo", "bnpo", "dapo", "luspo", "cispo", "sapo", "vespo")] + [
    Objective(loss_type="dr_grpo", beta=0.3),
    Objective(loss_type="grpo", beta=0.3, use_bias_correction_kl=False),
    Objective(loss_type="dapo", beta=0.04, max_grad_norm=1e-3, scale_rewards="group"),
]


@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: f"{o.loss_type}-beta{o.beta:g}-"
                         f"{'k2' if o.use_bias_correction_kl else 'k3'}-clip{o.max_grad_norm}")
@pytest.mark.parametrize("seq_chunk", [1, 6])
def test_delta_h1_per_loss_type_equals_naive_reference(peft_model, policy, batch, objective, seq_chunk):
    """Per-token cotangents (spec §3) for every loss type, the KL term in both forms and clipping, against autograd
    per token with the loss's weights written out by hand, and the reference from PEFT's disable_adapter."""
    state = warm_state(policy.params)
    result = delta_h1(policy.params, batch, policy=policy, adam=state, objective=objective, seq_chunk=seq_chunk,
                      token_chunk=3)
    reference = naive_delta_h1(peft_model, policy.params, batch, state, "prompt", objective)
    assert abs(reference["U_cross"]) > 1e-8  # can fail
    assert_matches_naive(result, reference)
    assert result.objective == objective.to_dict()
    # The step from δH₁'s own Ȳ is rl_update's.
    step, _ = rl_update(policy.params, batch, policy=policy, adam=state, objective=objective)
    for name, delta in result.step.delta_theta().items():
        assert torch.allclose(policy.params[name] + delta, step[name], rtol=0, atol=1e-15)


def with_token_advantages(batch, seed=0):
    """The batch with per-token advantages: each sequence's A times a random factor per token (0 off the response)."""
    generator = torch.Generator().manual_seed(seed)
    factor = 0.5 + torch.rand(batch.input_ids.shape, generator=generator, dtype=torch.float64)
    return batch.replace(token_advantages=batch.advantages[:, :, None] * factor * batch.response_mask)


@pytest.mark.parametrize("objective", [Objective(loss_type="grpo"), Objective(loss_type="dapo", beta=0.3)],
                         ids=["grpo", "dapo-beta0.3"])
@pytest.mark.parametrize("seq_chunk", [1, 6])
def test_per_token_advantages_equal_naive_reference(peft_model, policy, batch, objective, seq_chunk):
    """Per-token advantages (PPO/GAE-style) flow through the same cotangent: δH₁ against autograd with A per token."""
    state = warm_state(policy.params)
    tokens = with_token_advantages(batch)
    result = delta_h1(policy.params, tokens, policy=policy, adam=state, objective=objective, seq_chunk=seq_chunk,
                      token_chunk=3)
    reference = naive_delta_h1(peft_model, policy.params, tokens, state, "prompt", objective)
    assert_matches_naive(result, reference)
    sequence_level = delta_h1(policy.params, batch, policy=policy, adam=state, objective=objective)
    assert not math.isclose(result.U_cross, sequence_level.U_cross, rel_tol=1e-3)  # the per-token A matters


@pytest.mark.parametrize("objective", [Objective(), Objective(loss_type="grpo", scale_rewards="group",
                                                              max_grad_norm=1e-3)], ids=["dr_grpo", "grpo-clip"])
def test_per_sequence_path_equals_per_token_path(policy, batch, objective):
    """Without a KL term the cotangent is constant along each sequence, and at seq_chunk=1 δH₁ takes one backward per
    sequence for X and Y together; the general per-token path (forced by giving the same A per token) takes two.
    Same numbers."""
    state = warm_state(policy.params)
    fast = delta_h1(policy.params, batch, policy=policy, adam=state, objective=objective, seq_chunk=1, token_chunk=3)
    forced = batch.replace(token_advantages=batch.advantages[:, :, None] * batch.response_mask)
    general = delta_h1(policy.params, forced, policy=policy, adam=state, objective=objective, seq_chunk=1,
                       token_chunk=3)
    sequences = batch.B * batch.G
    assert (fast.backward_passes, general.backward_passes) == (sequences, 2 * sequences)  # the paths taken
    for key in ("deltaH1", "U_cross", "state_term", "grad_term", "se_deltaH1", "se_plugin", "diag_sum"):
        assert math.isclose(getattr(fast, key), getattr(general, key), rel_tol=1e-10, abs_tol=1e-300), key


def test_kl_reference_is_the_adapter_disabled(peft_model, policy, batch):
    """Zeroing every lora_B gives exactly the base model's log-probabilities (PEFT's disable_adapter)."""
    ours = policy.token_logprobs(policy.reference_params(policy.params), batch)
    with torch.no_grad(), peft_model.disable_adapter():
        theirs, mask = naive_token_logprobs(peft_model, batch)
    B, G, L = batch.input_ids.shape
    assert torch.allclose(ours.reshape(B * G, L)[:, 1:] * mask, theirs * mask, rtol=0, atol=1e-12)
    assert not torch.allclose(policy.token_logprobs(policy.params, batch), ours)  # the adapter matters


def test_plugin_is_the_directional_derivative_of_the_entropy_surrogate(batch):
    """deltaH1_plugin = −X̄·Δθ, the jvp along Δθ of h(θ) = −(1/B) Σ_n (1/G) Σ_g sg[S − S̄_loo] S(θ).

    The two sides are reverse-mode (δH₁'s vjps) and forward-mode (jvp) derivatives of the same float64 computation,
    so they agree to rounding: by the standard bound for a float64 sum of products, |a − b| ≤ γ_n Σ_i |c_i d_i|
    with d_i = ∇S_i·Δθ, c_i the surrogate's weights and γ_n = n·u/(1 − n·u), u = 2⁻⁵³, for a computation n
    operations deep; n = 10⁴ bounds this 1-layer, 16-wide model generously. (Before funcprobe.precision, the model's
    eager softmax rounded through float32 and the sides differed by 2.4e-9 relative.)
    """
    # eager attention: torch.func.jvp has no forward-mode rule for the CPU SDPA kernels
    policy = Policy.from_peft(tiny_peft_model("qwen2", dtype=torch.float64, seed=13, r=2, num_layers=1,
                                              hidden_size=16, attn_implementation="eager"),
                              logsoftmax_dtype=torch.float64)
    state = warm_state(policy.params)
    result = delta_h1(policy.params, batch, policy=policy, adam=state, seq_chunk=4)
    delta_theta = update_direction(policy.params, batch, policy=policy, adam=state).delta_theta()
    logprobs = policy.sequence_logprobs(policy.params, batch)
    weights = -(logprobs - (logprobs.sum(1, keepdim=True) - logprobs) / (batch.G - 1)) / (batch.B * batch.G)

    def surrogate(params):
        return (weights * policy.sequence_logprobs(params, batch, with_grad=True)).sum()

    _, derivative = torch.func.jvp(surrogate, (policy.params,), (delta_theta,))
    _, per_sequence = torch.func.jvp(lambda p: policy.sequence_logprobs(p, batch, with_grad=True),
                                     (policy.params,), (delta_theta,))
    n, u = 10_000, 2.0 ** -53
    bound = n * u / (1 - n * u) * float((weights * per_sequence).abs().sum())
    assert abs(result.deltaH1_plugin - float(derivative)) <= bound, (result.deltaH1_plugin, float(derivative), bound)


def test_decomposition_reproduces_rl_update(policy, batch):
    """θ + η_g P⊙Ȳ + Δθ_state == rl_update's θ⁺ (spec §4), with weight decay and clipping."""
    state = warm_state(policy.params)
    for max_grad_norm in (None, 1e-4):
        objective = Objective(max_grad_norm=max_grad_norm)
        new_params, _ = rl_update(policy.params, batch, policy=policy, adam=state, objective=objective)
        decomposition = update_direction(policy.params, batch, policy=policy, adam=state, objective=objective)
        for name, delta in decomposition.delta_theta().items():
            assert torch.allclose(policy.params[name] + delta, new_params[name], rtol=0, atol=1e-15)
        if max_grad_norm is not None:
            assert decomposition.clip_coef < 1


def test_rl_update_equals_torch_adamw_on_the_module(peft_model, policy, batch):
    """One torch.optim.AdamW step on the module's LoRA tensors through the naive loss gives rl_update's θ⁺."""
    state = AdamState.zeros(policy.params, lr=0.01, weight_decay=0.05)
    new_params, new_state = rl_update(policy.params, batch, policy=policy, adam=state)
    model = copy.deepcopy(peft_model)
    named = dict(model.named_parameters())
    leaves = [named[name].requires_grad_(True) for name in policy.params]
    optimizer = torch.optim.AdamW(leaves, lr=0.01, weight_decay=0.05, foreach=False)
    loss = -(batch.advantages / batch.length_norm[:, None]
             * naive_sequence_logprobs(model, batch, logsoftmax_dtype=torch.float64)).mean()
    loss.backward()
    optimizer.step()
    for name in policy.params:
        assert torch.allclose(named[name].detach(), new_params[name], rtol=0, atol=1e-14), name
        assert not torch.equal(new_params[name], policy.params[name])


@HYPOTHESIS
@given(seq_chunk=st.integers(1, 7), token_chunk=st.integers(1, 9), store=st.booleans(),
       permutation=st.permutations(range(6)))
def test_delta_h1_invariances(policy, batch, seq_chunk, token_chunk, store, permutation):
    """Invariant to seq_chunk, token_chunk, store vs recompute and prompt order (units = single prompts)."""
    state = warm_state(policy.params)
    reference = delta_h1(policy.params, batch, policy=policy, adam=state, seq_chunk=6, token_chunk=100,
                         store_unit_vectors=True)
    permuted = batch.select_prompts(torch.tensor(permutation))
    result = delta_h1(policy.params, permuted, policy=policy, adam=state, seq_chunk=seq_chunk,
                      token_chunk=token_chunk, store_unit_vectors=store)
    for key in ("deltaH1", "grad_term", "state_term", "deltaH1_plugin", "U_cross", "bars_dot", "diag_sum",
                "zeta1_plugin", "se_plugin", "se_jack", "se_deltaH1"):
        assert math.isclose(getattr(result, key), getattr(reference, key), rel_tol=1e-9, abs_tol=1e-300), key
    assert sorted(result.row_means) == pytest.approx(sorted(reference.row_means), rel=1e-9)
    assert result.stored_unit_vectors is store


def test_blocks_of_one_prompt_equal_exact_mode(policy, batch):
    state = warm_state(policy.params)
    exact = delta_h1(policy.params, batch, policy=policy, adam=state, units="prompt")
    blocks = delta_h1(policy.params, batch, policy=policy, adam=state, units=batch.B)
    for key in ("deltaH1", "U_cross", "se_jack", "se_deltaH1", "se_plugin"):
        assert math.isclose(getattr(exact, key), getattr(blocks, key), rel_tol=1e-12), key


def test_result_serialises_and_prints(policy, batch):
    import json
    result = delta_h1(policy.params, batch, policy=policy, adam=warm_state(policy.params))
    data = json.loads(json.dumps(result.to_dict()))
    assert data["deltaH1"] == result.deltaH1 and len(data["row_means"]) == batch.B
    assert data["backward_passes"] > 0 and data["forward_passes"] > 0
    assert "deltaH1" in str(result) and "jackknife" in str(result)
    with pytest.raises(Exception):
        result.deltaH1 = 0.0  # frozen


def test_inputs_untouched(policy, batch):
    state = warm_state(policy.params)
    before = {n: t.clone() for n, t in policy.params.items()}
    m_before = {n: t.clone() for n, t in state.exp_avg.items()}
    ids = batch.input_ids.clone()
    delta_h1(policy.params, batch, policy=policy, adam=state, store_unit_vectors=False)
    assert all(torch.equal(policy.params[n], t) for n, t in before.items())
    assert all(torch.equal(state.exp_avg[n], t) for n, t in m_before.items())
    assert torch.equal(batch.input_ids, ids)


# --------------------------------------------------------------------------------------------------- bad inputs
def test_bad_inputs(policy, batch):
    state = warm_state(policy.params)
    with pytest.raises(ValueError, match="at least 2 prompts"):
        delta_h1(policy.params, batch.select_prompts([0]), policy=policy, adam=state)
    with pytest.raises(ValueError, match="divisible"):
        delta_h1(policy.params, batch, policy=policy, adam=state, units=4)
    with pytest.raises(ValueError, match="units"):
        delta_h1(policy.params, batch, policy=policy, adam=state, units="blocks")
    other = AdamState.zeros({"other.weight": torch.zeros(2)}, lr=0.1)
    with pytest.raises(ValueError, match="optimizer state"):
        delta_h1(policy.params, batch, policy=policy, adam=other)
    with pytest.raises(ValueError, match="store_unit_vectors"):
        delta_h1(policy.params, batch, policy=policy, adam=state, store_unit_vectors="sometimes")
    with pytest.raises(ValueError, match="advantages"):
        batch.replace(advantages=batch.advantages.clone().fill_(float("nan")))
    with pytest.raises(ValueError, match="G=1"):
        batch.replace(**{f: getattr(batch, f)[:, :1] for f in ("input_ids", "attention_mask", "response_mask",
                                                               "advantages", "rewards")})


def test_two_prompts_give_nan_jackknife_with_a_warning(policy, batch):
    with pytest.warns(RuntimeWarning, match="3 units"):
        result = delta_h1(policy.params, batch.select_prompts([0, 1]), policy=policy,
                          adam=warm_state(policy.params))
    assert math.isnan(result.se_jack) and math.isnan(result.se_deltaH1)
    assert math.isfinite(result.deltaH1) and math.isfinite(result.se_plugin)


INVARIANCE_OBJECTIVES = [Objective(loss_type="dapo", beta=0.3),
                         Objective(loss_type="grpo", beta=0.04, scale_rewards="group", max_grad_norm=1e-3),
                         Objective(loss_type="bnpo", beta=0.3, use_bias_correction_kl=False),
                         Objective(loss_type="luspo")]


@HYPOTHESIS
@given(seq_chunk=st.integers(1, 8), token_chunk=st.integers(1, 12), padding_side=st.sampled_from(["left", "right"]),
       extra_padding=st.integers(0, 3), objective=st.sampled_from(INVARIANCE_OBJECTIVES))
def test_per_token_delta_h1_invariant_to_chunks_and_padding(policy, seq_chunk, token_chunk, padding_side,
                                                            extra_padding, objective):
    """With a per-token cotangent (the loss types' weights, the KL term in both forms, clipping), δH₁ does not
    depend on chunking or padding."""
    state = warm_state(policy.params)
    reference_batch = random_batch(5, 3, vocab_size=VOCAB, prompt_len=(2, 4), response_len=(1, 5), seed=8)
    reference = _invariance_reference(policy, state, objective, reference_batch)
    batch = random_batch(5, 3, vocab_size=VOCAB, prompt_len=(2, 4), response_len=(1, 5), seed=8,
                         padding_side=padding_side, extra_padding=extra_padding)
    result = delta_h1(policy.params, batch, policy=policy, adam=state, objective=objective, seq_chunk=seq_chunk,
                      token_chunk=token_chunk)
    for key in ("deltaH1", "U_cross", "state_term", "se_deltaH1"):
        assert math.isclose(getattr(result, key), reference[key], rel_tol=1e-9, abs_tol=1e-14), key


_REFERENCE: dict = {}


def _invariance_reference(policy, state, objective, batch) -> dict:
    """δH₁ on the unpadded batch at the default chunks, once per objective."""
    if objective not in _REFERENCE:
        result = delta_h1(policy.params, batch, policy=policy, adam=state, objective=objective)
        _REFERENCE[objective] = {key: getattr(result, key) for key in ("deltaH1", "U_cross", "state_term",
                                                                       "se_deltaH1")}
    return _REFERENCE[objective]
