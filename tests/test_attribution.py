"""Token attribution of δH₁'s gradient term (spec §8): Σ a = grad_term, a naive per-token reference, the proxies and
their summaries, and the interventions."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from funcprobe import Objective, Policy, delta_h1, rl_update, snis_delta_h
from funcprobe.adam import update_decomposition
from funcprobe.heldout import delta_h1_heldout, paired_difference
from funcprobe.attribution import (attribute, average_ranks, jaccard, pearson, proxy_summary, spearman,
                                   token_covariance, top_fraction)
from funcprobe.testing import random_batch, tiny_peft_model

from conftest import warm_state

VOCAB = 64
HYPOTHESIS = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
TARGETS = ("q_proj", "v_proj", "down_proj")


def _model(tied: bool):
    return tiny_peft_model("qwen2", dtype=torch.float64, seed=21, r=2, num_layers=1, hidden_size=16,
                           target_modules=TARGETS, attn_implementation="eager", tie_word_embeddings=tied)


@pytest.fixture(scope="module")
def models():
    return {tied: _model(tied) for tied in (False, True)}


@pytest.fixture(scope="module")
def policies(models):
    return {tied: Policy.from_peft(model, logsoftmax_dtype=torch.float64) for tied, model in models.items()}


@pytest.fixture(scope="module")
def batch():
    return random_batch(6, 3, vocab_size=VOCAB, prompt_len=(2, 4), response_len=(1, 5), seed=5)


# -------------------------------------------------------------------------------------------- naive reference
def naive_token_grads(peft_model, params, batch):
    """ℓ per position [B, G, L] and ∇ℓ_{n,g,k} (flat float64) for every response token, by ordinary autograd through
    full logits, one backward per token."""
    model = copy.deepcopy(peft_model)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in params.items():
            named[name].copy_(tensor)
    leaves = [named[name].requires_grad_(True) for name in params]
    B, G, L = batch.input_ids.shape
    ids = batch.input_ids.reshape(B * G, L)
    attention = batch.attention_mask.reshape(B * G, L).long()
    logits = model(input_ids=ids, attention_mask=attention, position_ids=(attention.cumsum(-1) - 1).clamp(min=0),
                   use_cache=False).logits
    logp = torch.log_softmax(logits.double(), dim=-1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    logp = logp.reshape(B, G, L - 1)
    grads, values = {}, torch.zeros(B, G, L, dtype=torch.float64)
    for n, g, k in itertools.product(range(B), range(G), range(1, L)):
        if batch.response_mask[n, g, k]:
            parts = torch.autograd.grad(logp[n, g, k - 1], leaves, retain_graph=True)
            grads[n, g, k] = torch.cat([p.reshape(-1) for p in parts]).double()
            values[n, g, k] = logp[n, g, k - 1].detach()
    return values, grads


def naive_attribution(peft_model, params, batch, adam, units):
    """a_{n,g,k} = −(B/m)/(U(U−1)) c ∇ℓ·(ηP ⊙ (ΣX − X_w)) written out by hand (Dr. GRPO: c = A/(B G L_n))."""
    B, G, L = batch.input_ids.shape
    values, grads = naive_token_grads(peft_model, params, batch)
    dim = next(iter(grads.values())).numel()
    S = values.sum(-1)
    c = batch.advantages[..., None].double() / (B * G * batch.length_norm[:, None, None].double())
    c = c * batch.response_mask
    zero = torch.zeros(dim, dtype=torch.float64)
    grad_S = {(n, g): sum((grads[n, g, k] for k in range(L) if (n, g, k) in grads), zero)
              for n in range(B) for g in range(G)}
    X = [sum(((S[n, g] - (S[n].sum() - S[n, g]) / (G - 1)) * grad_S[n, g] for g in range(G)), zero) / G
         for n in range(B)]
    Y = [B * sum((c[n, g, k] * grads[n, g, k] for g in range(G) for k in range(L) if (n, g, k) in grads), zero)
         for n in range(B)]
    groups = [[n] for n in range(B)] if units == "prompt" else [list(range(u * B // units, (u + 1) * B // units))
                                                                 for u in range(units)]
    U = len(groups)
    X_u = [sum((X[n] for n in grp), zero) / len(grp) for grp in groups]
    Y_u = [sum((Y[n] for n in grp), zero) / len(grp) for grp in groups]
    ybar = sum(Y_u, zero) / U
    shapes = [(name, t.shape) for name, t in params.items()]
    split = dict(zip([s[0] for s in shapes], torch.split(ybar, [math.prod(s[1]) for s in shapes])))
    ybar_dict = {name: split[name].reshape(shape) for name, shape in shapes}
    decomposition = update_decomposition(params, ybar_dict, adam)
    eta_p = torch.cat([decomposition.eta_preconditioner()[name].reshape(-1) for name, _ in shapes]).double()
    sum_x = sum(X_u, zero)
    a = torch.zeros(B, G, L, dtype=torch.float64)
    for w, grp in enumerate(groups):
        d = eta_p * (sum_x - X_u[w])
        for n, g, k in itertools.product(grp, range(G), range(L)):
            if (n, g, k) in grads:
                a[n, g, k] = -(B / len(grp)) / (U * (U - 1)) * c[n, g, k] * torch.dot(d, grads[n, g, k])
    return a, values


# ----------------------------------------------------------------------------------------------- Σ a = grad_term
@pytest.mark.filterwarnings("ignore:jackknife standard errors need at least 3 units")
@pytest.mark.parametrize("units", ["prompt", 3, 2])
def test_sum_equals_delta_h1_grad_term(policies, batch, units):
    policy = policies[False]
    adam = warm_state(policy.params)
    result = attribute(policy.params, batch, policy=policy, adam=adam, units=units)
    reference = delta_h1(policy.params, batch, policy=policy, adam=adam, units=units)
    assert result.grad_term == pytest.approx(reference.grad_term, rel=1e-10, abs=0)
    assert float(result.token.sum()) == pytest.approx(reference.grad_term, rel=1e-10, abs=0)
    assert result.state_term == pytest.approx(reference.state_term, rel=1e-10, abs=0)
    assert result.deltaH1 == pytest.approx(reference.deltaH1, rel=1e-10, abs=0)
    if result.n_units >= 3:  # the jackknife SEs, as delta_h1 reports them
        assert result.se_grad_term == pytest.approx(reference.se_grad_jack, rel=1e-9, abs=0)
        assert result.se_deltaH1 == pytest.approx(reference.se_deltaH1, rel=1e-9, abs=0)
    else:
        assert math.isnan(result.se_grad_term) and math.isnan(result.se_deltaH1)
    assert torch.allclose(result.sequence, result.token.sum(-1), rtol=0, atol=0)
    assert torch.allclose(result.prompt, result.sequence.sum(-1), rtol=0, atol=0)
    assert (result.token[~batch.response_mask.bool()] == 0).all()


@pytest.mark.parametrize("objective", [Objective(loss_type="grpo"), Objective(loss_type="bnpo", beta=0.1),
                                       Objective(max_grad_norm=1e-3)], ids=["grpo", "bnpo-kl", "clipped"])
def test_sum_equals_grad_term_for_other_objectives(policies, batch, objective):
    policy = policies[True]
    adam = warm_state(policy.params, step=2, seed=1)
    result = attribute(policy.params, batch, policy=policy, adam=adam, objective=objective, units="prompt")
    reference = delta_h1(policy.params, batch, policy=policy, adam=adam, objective=objective, units="prompt")
    assert result.grad_term == pytest.approx(reference.grad_term, rel=1e-10, abs=0)
    assert result.state_term == pytest.approx(reference.state_term, rel=1e-10, abs=0)


# ------------------------------------------------------------------------------------------ per-token reference
@HYPOTHESIS
@given(tied=st.booleans(), side=st.sampled_from(["left", "right"]), seq_chunk=st.sampled_from([1, 2, 3, 5]),
       token_chunk=st.sampled_from([1, 3, 64]), units=st.sampled_from(["prompt", 2]), seed=st.integers(0, 50))
def test_tokens_match_naive_reference(models, policies, tied, side, seq_chunk, token_chunk, units, seed):
    policy = policies[tied]
    batch = random_batch(4, 3, vocab_size=VOCAB, prompt_len=(1, 3), response_len=(1, 4), padding_side=side,
                         extra_padding=seed % 2, seed=seed)
    adam = warm_state(policy.params, seed=seed)
    result = attribute(policy.params, batch, policy=policy, adam=adam, units=units, seq_chunk=seq_chunk,
                       token_chunk=token_chunk)
    expected, logprobs = naive_attribution(models[tied], policy.params, batch, adam, units)
    scale = float(expected.abs().max())
    assert scale > 0
    assert torch.allclose(result.token, expected, rtol=0, atol=1e-10 * scale)
    assert torch.allclose(result.logprobs, logprobs, rtol=0, atol=1e-10)


@pytest.mark.parametrize("units", ["prompt", 2])
def test_one_direction_per_forward_path_agrees(policies, batch, units, monkeypatch):
    """Adapters without per-layer taps take one jvp per unit chunk (``Policy.token_logprob_jvp``); plain LoRA takes
    one forward per chunk with per-row directions (``lora_grads.row_direction_jvp``): the same a, ℓ, H and c."""
    import importlib

    module = importlib.import_module("funcprobe.attribution")
    policy = policies[True]
    adam = warm_state(policy.params, seed=3)
    rows = attribute(policy.params, batch, policy=policy, adam=adam, units=units, seq_chunk=5)
    monkeypatch.setattr(module, "_force_unit_jvps", True)
    units_path = attribute(policy.params, batch, policy=policy, adam=adam, units=units, seq_chunk=5)
    scale = float(rows.token.abs().max())
    assert torch.allclose(rows.token, units_path.token, rtol=0, atol=1e-12 * scale)
    for name in ("logprobs", "entropy", "cotangent"):
        assert torch.allclose(getattr(rows, name), getattr(units_path, name), rtol=0, atol=1e-12), name


def test_row_direction_jvp_is_each_rows_own_direction(policies, batch):
    """A chunk whose rows carry different directions: each row's d·∇ℓ equals token_logprob_jvp along its own."""
    from funcprobe.lora_grads import row_direction_jvp

    policy = policies[False]
    generator = torch.Generator().manual_seed(4)
    directions = [{n: torch.randn(t.shape, generator=generator, dtype=torch.float64) for n, t in policy.params.items()}
                  for _ in range(3)]
    chunk = next(iter(batch.iter_sequence_chunks(7)))
    row_direction = torch.tensor([0, 2, 1, 1, 0, 2, 0])
    values, derivative, _ = row_direction_jvp(policy, policy.params, chunk, directions, row_direction, token_chunk=4)
    rows = chunk.response_mask.nonzero(as_tuple=True)[0]
    for k, direction in enumerate(directions):
        expected_values, expected, _ = policy.token_logprob_jvp(policy.params, chunk, direction, token_chunk=4)
        mine = row_direction[rows] == k
        assert mine.any()
        assert torch.allclose(derivative[mine], expected[mine], rtol=0, atol=1e-10 * float(expected.abs().max()))
        assert torch.allclose(values, expected_values, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="one direction index per row"):
        row_direction_jvp(policy, policy.params, chunk, directions, row_direction[:3], token_chunk=4)


def test_entropy_matches_full_softmax(models, policies, batch):
    policy, model = policies[False], models[False]
    result = attribute(policy.params, batch, policy=policy, adam=warm_state(policy.params))
    B, G, L = batch.input_ids.shape
    ids = batch.input_ids.reshape(B * G, L)
    attention = batch.attention_mask.reshape(B * G, L).long()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention,
                       position_ids=(attention.cumsum(-1) - 1).clamp(min=0), use_cache=False).logits.double()
    logp = torch.log_softmax(logits, -1)
    H = -(logp.exp() * logp).sum(-1)[:, :-1].reshape(B, G, L - 1)
    expected = torch.zeros(B, G, L, dtype=torch.float64)
    expected[..., 1:] = H * batch.response_mask[..., 1:]
    assert torch.allclose(result.entropy, expected, rtol=0, atol=1e-12)
    # Policy.token_entropies (per sequence) is the sum of the per-token values.
    per_sequence = policy.token_entropies(policy.params, batch)
    assert torch.allclose(result.entropy.sum(-1), per_sequence, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------------ proxies
def test_covariance_against_hand_formula():
    logprobs = torch.tensor([[[0.0, -1.0, -2.0], [0.0, -0.5, 0.0]]], dtype=torch.float64)
    mask = torch.tensor([[[0, 1, 1], [0, 1, 0]]], dtype=torch.bool)
    advantages = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    cov = token_covariance(logprobs, advantages, mask)
    l_mean, a_mean = (-1.0 - 2.0 - 0.5) / 3, (1.0 + 1.0 - 2.0) / 3
    expected = torch.zeros_like(logprobs)
    expected[0, 0, 1] = (-1.0 - l_mean) * (1.0 - a_mean)
    expected[0, 0, 2] = (-2.0 - l_mean) * (1.0 - a_mean)
    expected[0, 1, 1] = (-0.5 - l_mean) * (-2.0 - a_mean)
    assert torch.allclose(cov, expected, rtol=0, atol=1e-15)


def test_average_ranks_and_spearman_by_hand():
    x = torch.tensor([10.0, 20.0, 20.0, 5.0, 20.0])
    assert average_ranks(x).tolist() == [2.0, 4.0, 4.0, 1.0, 4.0]
    y = torch.tensor([1.0, 3.0, 2.0, 0.0, 4.0])  # ranks 2, 4, 3, 1, 5
    rx, ry = [2.0, 4.0, 4.0, 1.0, 4.0], [2.0, 4.0, 3.0, 1.0, 5.0]
    mx, my = sum(rx) / 5, sum(ry) / 5
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    assert spearman(x, y) == pytest.approx(num / den, abs=1e-15)
    # a monotone transform leaves Spearman at 1 while Pearson drops below 1
    z = torch.tensor([0.1, 0.5, 0.2, 3.0, 9.0])
    assert spearman(z, z.exp()) == pytest.approx(1.0, abs=1e-15)
    assert pearson(z, z.exp()) < 0.99
    assert pearson(z, 2 * z + 1) == pytest.approx(1.0, abs=1e-15)
    assert math.isnan(pearson(z, torch.ones(5)))


def test_top_fraction_and_jaccard():
    scores = torch.tensor([0.3, 0.9, 0.1, 0.7, 0.5])
    assert top_fraction(scores, 0.4).tolist() == [1, 3]
    assert top_fraction(scores, 0.001).tolist() == [1]  # at least one token
    assert jaccard(torch.tensor([1, 3]), torch.tensor([3, 4, 0])) == pytest.approx(1 / 4)
    with pytest.raises(ValueError, match="top-q"):
        top_fraction(scores, 0.0)


def test_proxy_summary_by_hand():
    a = torch.tensor([[[0.0, -3.0, 1.0, 0.5], [0.0, -1.0, 2.0, 0.0]]], dtype=torch.float64)
    mask = torch.tensor([[[0, 1, 1, 1], [0, 1, 1, 0]]], dtype=torch.bool)
    cov = torch.tensor([[[0.0, 2.0, -1.0, 0.0], [0.0, 3.0, 0.5, 0.0]]], dtype=torch.float64)
    ent = torch.tensor([[[0.0, 0.1, 0.2, 0.3], [0.0, 0.4, 0.5, 0.0]]], dtype=torch.float64)
    summary = proxy_summary(a, cov, ent, mask, eta=2.0, quantiles=(0.4,))
    flat_a = torch.tensor([-3.0, 1.0, 0.5, -1.0, 2.0])
    flat_cov = torch.tensor([2.0, -1.0, 0.0, 3.0, 0.5])
    assert summary["correlations"]["pearson_cov"] == pytest.approx(pearson(flat_a, -2.0 * flat_cov), abs=1e-15)
    top = summary["top_q"]["0.4"]
    assert top["k"] == 2
    total = float(flat_a.sum())  # -0.5
    assert top["share_a"] == pytest.approx((-3.0 - 1.0) / total)  # most negative a: indices 0, 3
    assert top["share_cov"] == pytest.approx((-1.0 - 3.0) / total)  # largest cov: indices 3, 0
    assert top["jaccard_cov"] == 1.0
    assert top["share_entropy"] == pytest.approx((2.0 - 1.0) / total)  # largest entropy: indices 4, 3
    assert top["jaccard_entropy"] == pytest.approx(1 / 3)
    # The downward push Σ max(−a, 0) = 4 (tokens −3 and −1); up 3.5; shares of the push in [0, 1].
    assert summary["down_total"] == 4.0 and summary["up_total"] == 3.5
    assert top["share_down_a"] == 1.0 and top["share_down_cov"] == 1.0
    assert top["share_down_entropy"] == pytest.approx(1.0 / 4.0)   # entropy's top two: a = 2 (no push down), −1


# ------------------------------------------------------------------------------------------------ interventions
def test_interventions_all_ones_and_all_zeros(policies, batch):
    policy = policies[False]
    adam = warm_state(policy.params)
    evaluation = random_batch(4, 3, vocab_size=VOCAB, prompt_len=(2, 4), response_len=(1, 5), seed=99)
    shape = batch.input_ids.shape
    result = attribute(policy.params, batch, policy=policy, adam=adam, evaluation=evaluation,
                       interventions={"ones": torch.ones(shape), "zeros": torch.zeros(shape)})
    plain = delta_h1(policy.params, batch, policy=policy, adam=adam)
    updated, _ = rl_update(policy.params, batch, policy=policy, adam=adam)
    realised = snis_delta_h(policy.params, updated, policy=policy, batch=evaluation)
    # With E the attribution is on spec §9's footing: the prediction is δĤ₁(E) along the step taken.
    heldout = delta_h1_heldout(policy.params, plain.step, evaluation, policy=policy)
    ones, zeros = result.interventions["ones"], result.interventions["zeros"]
    assert result.basis == "heldout"
    assert ones["grad_term"] == pytest.approx(heldout.grad_term, rel=1e-10, abs=0)
    assert ones["deltaH1"] == pytest.approx(heldout.deltaH1, rel=1e-10, abs=0)
    assert result.deltaH1 == pytest.approx(heldout.deltaH1, rel=1e-10, abs=0)
    assert ones["realised_delta_h"] == pytest.approx(realised.deltaH, rel=1e-9, abs=0)
    paired = paired_difference(realised, heldout)
    assert ones["paired_difference"] == pytest.approx(paired.difference, rel=1e-9, abs=1e-15)
    assert ones["paired_se"] == pytest.approx(paired.se, rel=1e-9, abs=0)
    assert result.heldout.evaluation_fingerprint == evaluation.fingerprint == paired.evaluation_fingerprint
    assert result.paired["evaluation_fingerprint"] == evaluation.fingerprint
    assert ones["realised_reliable"] == realised.reliable
    assert ones["ess_min_fraction"] == pytest.approx(realised.ess_min_fraction, rel=1e-12)
    # The unchanged step's own realised ΔĤ (E's values at θ shared with the interventions).
    assert result.realised_delta_h == pytest.approx(realised.deltaH, rel=1e-9, abs=0)
    assert result.realised_se == pytest.approx(realised.se, rel=1e-9, abs=0)
    assert ones["objective_gain"] > 0  # Ȳ·Δθ of the plain step: η_g Ȳ·P·Ȳ dominates here
    assert result.objective_gain == pytest.approx(ones["objective_gain"], rel=1e-10, abs=0)
    by_hand = sum(float((plain.step.ybar[n].double() * (updated[n].double() - policy.params[n].double())).sum())
                  for n in updated)
    assert result.objective_gain == pytest.approx(by_hand, rel=1e-9, abs=0)
    assert zeros["grad_term"] == 0.0
    assert zeros["tokens_kept"] == 0.0
    # with no gradient the step is the state part alone: δH₁ = −X̄·Δθ_state at the P of v' = β2 v
    assert zeros["deltaH1"] == zeros["state_term"] != 0.0


def test_named_interventions_masks(policies, batch):
    policy = policies[False]
    adam = warm_state(policy.params)
    result = attribute(policy.params, batch, policy=policy, adam=adam,
                       interventions={"clip": ("clip_cov", 0.1), "he": ("high_entropy", 0.2),
                                      "pos": "positive_only"})
    tokens = int(batch.response_mask.sum())
    assert result.interventions["clip"]["tokens_kept"] == tokens - math.ceil(0.1 * tokens)
    assert result.interventions["he"]["tokens_kept"] == math.ceil(0.2 * tokens)
    kept_positive = float((batch.response_mask * (batch.advantages >= 0)[..., None]).sum())
    assert result.interventions["pos"]["tokens_kept"] == kept_positive
    # positive_only equals the user mask that zeroes the negative-advantage sequences
    mask = (batch.advantages >= 0)[..., None].expand(batch.input_ids.shape).double()
    user = attribute(policy.params, batch, policy=policy, adam=adam, interventions={"user": mask})
    assert user.interventions["user"]["deltaH1"] == pytest.approx(result.interventions["pos"]["deltaH1"],
                                                                  rel=1e-12)


def test_bad_inputs(policies, batch):
    policy = policies[False]
    adam = warm_state(policy.params)
    with pytest.raises(ValueError, match="shape"):
        attribute(policy.params, batch, policy=policy, adam=adam, interventions={"m": torch.ones(2, 2)})
    with pytest.raises(ValueError, match="unknown kind"):
        attribute(policy.params, batch, policy=policy, adam=adam, interventions={"m": "nope"})
    with pytest.raises(ValueError, match="divisible"):
        attribute(policy.params, batch, policy=policy, adam=adam, units=4)
    with pytest.raises(ValueError, match="seq_chunk"):
        attribute(policy.params, batch, policy=policy, adam=adam, seq_chunk=0)


def test_nothing_to_attribute_is_refused_and_a_kl_term_is_something(policies, batch):
    """Every advantage 0 and β = 0: every c = 0, so every attribution would be exactly 0 (NaN correlations, no-op
    interventions): refused before any pass, on both footings. With β > 0 the KL term moves the step: attributed."""
    import dataclasses

    policy = policies[False]
    adam = warm_state(policy.params)
    flat = dataclasses.replace(batch, advantages=torch.zeros_like(batch.advantages), advantage_recipe=None)
    for evaluation in (None, batch):
        with pytest.raises(ValueError, match="nothing to attribute: every advantage .* is 0"):
            attribute(policy.params, flat, policy=policy, adam=adam, evaluation=evaluation)
    kl = attribute(policy.params, flat, policy=policy, adam=adam, objective=Objective(beta=0.1))
    assert any(value != 0 for prompt in kl.to_dict()["token"] for row in prompt for value in row)


def test_to_dict_is_json_and_inputs_untouched(policies, batch):
    import json

    policy = policies[False]
    adam = warm_state(policy.params)
    before = {n: t.clone() for n, t in policy.params.items()}
    ids = batch.input_ids.clone()
    result = attribute(policy.params, batch, policy=policy, adam=adam, interventions={"pos": "positive_only"})
    text = json.dumps(result.to_dict())
    back = json.loads(text)
    assert back["grad_term"] == result.grad_term
    assert len(back["token"]) == batch.B and len(back["token"][0][0]) == batch.L
    assert all(torch.equal(policy.params[n], t) for n, t in before.items())
    assert torch.equal(batch.input_ids, ids)
    assert "grad_term" in str(result)


@pytest.mark.filterwarnings("ignore")
def test_per_group_learning_rates(policies, batch):
    """Two parameter groups with different lr: d_w = (ηP) ⊙ (ΣX − X_w) per tensor, Σ a still equals grad_term."""
    from funcprobe import AdamState

    policy = policies[False]
    names = list(policy.params)
    generator = torch.Generator().manual_seed(3)
    state = {i: {"step": torch.tensor(3.0),
                 "exp_avg": 1e-3 * torch.randn(policy.params[n].shape, generator=generator, dtype=torch.float64),
                 "exp_avg_sq": 1e-6 * torch.rand(policy.params[n].shape, generator=generator, dtype=torch.float64)}
             for i, n in enumerate(names)}
    half = len(names) // 2
    groups = [{"params": list(range(half)), "lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1,
               "amsgrad": False, "maximize": False},
              {"params": list(range(half, len(names))), "lr": 0.003, "betas": (0.9, 0.999), "eps": 1e-8,
               "weight_decay": 0.0, "amsgrad": False, "maximize": False}]
    adam = AdamState.from_torch({"state": state, "param_groups": groups}, [names[:half], names[half:]],
                                policy.params)
    result = attribute(policy.params, batch, policy=policy, adam=adam)
    reference = delta_h1(policy.params, batch, policy=policy, adam=adam)
    assert result.eta_g is None
    assert result.grad_term == pytest.approx(reference.grad_term, rel=1e-10, abs=0)
    assert result.state_term == pytest.approx(reference.state_term, rel=1e-10, abs=0)
    assert math.isfinite(result.summary["correlations"]["pearson_cov"])


# ------------------------------------------------------------------------------------- spec §9's footing
@pytest.fixture(scope="module")
def sdpa_policy():
    model = tiny_peft_model("qwen2", dtype=torch.float64, seed=21, r=2, num_layers=1, hidden_size=16,
                            target_modules=TARGETS, attn_implementation="sdpa")
    return Policy.from_peft(model, logsoftmax_dtype=torch.float64)


@pytest.mark.parametrize("objective", [Objective(), Objective(loss_type="grpo", beta=0.04, max_grad_norm=1e-3),
                                       Objective(loss_type="dapo", scale_rewards="none")])
def test_heldout_footing_sums_to_the_heldout_gradient_term_on_sdpa(sdpa_policy, batch, objective):
    """Σ a = δĤ₁(E)'s gradient term (1e-10), on a model loaded with SDPA attention (the forward-mode pass switches to
    eager for its duration and back)."""
    policy = sdpa_policy
    adam = warm_state(policy.params)
    evaluation = random_batch(4, 3, vocab_size=VOCAB, prompt_len=(2, 4), response_len=(1, 5), seed=98)
    result = attribute(policy.params, batch, policy=policy, adam=adam, objective=objective, evaluation=evaluation)
    heldout = delta_h1_heldout(policy.params, result.step, evaluation, policy=policy)
    assert abs(heldout.grad_term) > 1e-9
    assert result.grad_term == pytest.approx(heldout.grad_term, rel=1e-10, abs=0)
    assert result.deltaH1 == pytest.approx(heldout.deltaH1, rel=1e-10, abs=0)
    assert result.se_grad_term == pytest.approx(heldout.se_grad, rel=1e-10)
    assert policy.module.get_base_model().config._attn_implementation == "sdpa"
    # what a reader sees: δĤ₁(E) everywhere on this footing, each intervention with its paired difference
    shape = batch.response_mask.shape
    masked = attribute(policy.params, batch, policy=policy, adam=adam, objective=objective, evaluation=evaluation,
                       interventions={"ones": torch.ones(shape)})
    text = str(masked)
    assert text.startswith("δĤ₁(E) = ") and "δH₁ =" not in text
    line = next(x for x in text.splitlines() if x.strip().startswith("ones:"))
    assert "δĤ₁(E) = " in line and "ΔĤ − δĤ₁(E) = " in line and "ESS/G min" in line


def test_heldout_footing_per_token_equals_the_naive_reference(models, policies, batch):
    """a_{n,g,k} = c_{n,g,k} ∇ℓ_{n,g,k}·(ηP ⊙ ĝ_E) with ∇ℓ by plain autograd, one backward per token (1e-10)."""
    policy = policies[False]
    adam = warm_state(policy.params)
    evaluation = random_batch(3, 3, vocab_size=VOCAB, prompt_len=(2, 4), response_len=(1, 5), seed=97)
    result = attribute(policy.params, batch, policy=policy, adam=adam, evaluation=evaluation)
    heldout = delta_h1_heldout(policy.params, result.step, evaluation, policy=policy, entropy_gradient=True)
    eta_p = result.step.eta_preconditioner()
    d = torch.cat([(eta_p[n].double() * heldout.gradient[n]).reshape(-1) for n in policy.params])
    _, grads = naive_token_grads(models[False], policy.params, batch)
    B, G, L = batch.input_ids.shape
    c = batch.advantages[..., None].double() / (B * G * batch.length_norm[:, None, None].double())
    expected = torch.zeros(B, G, L, dtype=torch.float64)
    for (n, g, k), grad in grads.items():
        expected[n, g, k] = c[n, g, 0] * torch.dot(d, grad)
    assert expected.abs().max() > 1e-12
    torch.testing.assert_close(result.token, expected, rtol=1e-10, atol=1e-16)
