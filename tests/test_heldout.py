"""δĤ₁(E), spec §9: against a naive float64 autograd reference, linearity, zero step, invariances, the routes.

The reference is written independently of funcprobe.heldout: one ordinary forward of the whole PEFT module with full
[N, L, V] logits, the entropy-to-go and its leave-one-out baseline by explicit loops over draws and positions, the
surrogate F = (1/B) Σ_n (1/G) Σ_{g,k} m [h + sg(R − b) ℓ] and its gradient by torch.autograd, dotted with Δ.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from funcprobe import AdamState, Policy
from funcprobe.adam import update_decomposition
from funcprobe.heldout import delta_h1_heldout, heldout_cotangents, paired_difference
from funcprobe.testing import random_batch, tiny_peft_model

pytestmark = pytest.mark.usefixtures("one_thread")

V = 23


def _policy(attn="sdpa", tied=False, dtype=torch.float64, seed=0, **options):
    model = tiny_peft_model("qwen2", vocab_size=V, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, r=2,
                            dtype=dtype, seed=seed, attn_implementation=attn, tie_word_embeddings=tied)
    return Policy.from_peft(model, logsoftmax_dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                            **options)


@pytest.fixture(scope="module")
def policy():
    return _policy()


def _batch(B=3, G=4, seed=0, padding_side="right", **options):
    return random_batch(B, G, vocab_size=V, seed=seed, padding_side=padding_side, **options)


def _direction(params, seed=1, scale=1e-2):
    generator = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.dtype)
            for n, t in params.items()}


def naive_token_values(peft_model, batch, temperature=1.0):
    """ℓ and h [B, G, L] at every position predicting token k (0 where not a response token), full logits."""
    B, G, L = batch.input_ids.shape
    ids = batch.input_ids.reshape(B * G, L)
    mask = batch.attention_mask.reshape(B * G, L).long()
    # left-align as funcprobe does (eager float64 attention gives NaN on fully masked rows): shift each row
    out_l = torch.zeros(B * G, L, dtype=torch.float64)
    out_h = torch.zeros(B * G, L, dtype=torch.float64)
    ell_rows, h_rows = [], []
    for i in range(B * G):
        real = mask[i].nonzero().squeeze(1)
        first, last = int(real[0]), int(real[-1]) + 1
        row_ids = ids[i, first:last][None]
        logits = peft_model(input_ids=row_ids, attention_mask=torch.ones_like(row_ids),
                            position_ids=torch.arange(row_ids.shape[1])[None], use_cache=False).logits[0]
        logp = torch.log_softmax(logits.to(torch.float64) / temperature, -1)
        ent = -(logp.exp() * logp).sum(-1)
        picked = logp[:-1].gather(1, row_ids[0, 1:, None]).squeeze(1)
        response = batch.response_mask.reshape(B * G, L)[i, first + 1:last].to(torch.float64)
        ell_rows.append((i, first + 1, last, picked * response))
        h_rows.append((i, first + 1, last, ent[:-1] * response))
    ell = [torch.zeros(L, dtype=torch.float64) for _ in range(B * G)]
    hh = [torch.zeros(L, dtype=torch.float64) for _ in range(B * G)]
    for (i, a, b, v), (_, _, _, e) in zip(ell_rows, h_rows):
        ell[i] = torch.cat([torch.zeros(a, dtype=torch.float64), v, torch.zeros(L - b, dtype=torch.float64)])
        hh[i] = torch.cat([torch.zeros(a, dtype=torch.float64), e, torch.zeros(L - b, dtype=torch.float64)])
    del out_l, out_h
    return torch.stack(ell).reshape(B, G, L), torch.stack(hh).reshape(B, G, L)


def naive_cotangents(ell, h, response_mask, integrand):
    """R_k, b_k by loops (spec §9), or the sequence form; cotangents on ℓ and h."""
    B, G, L = ell.shape
    cot_l = torch.zeros(B, G, L, dtype=torch.float64)
    cot_h = torch.zeros(B, G, L, dtype=torch.float64)
    for n in range(B):
        if integrand == "sequence":
            S = [float((ell[n, g] * response_mask[n, g]).sum()) for g in range(G)]
            for g in range(G):
                loo = (sum(S) - S[g]) / (G - 1)
                cot_l[n, g] = -(S[g] - loo) / G * response_mask[n, g].to(torch.float64)
            continue
        positions = [response_mask[n, g].nonzero().squeeze(1).tolist() for g in range(G)]
        togo = []
        for g in range(G):
            values = [float(h[n, g, c]) for c in positions[g]]
            togo.append([sum(values[k + 1:]) for k in range(len(values))])
        for g in range(G):
            for k, column in enumerate(positions[g]):
                others = [togo[j][k] if k < len(togo[j]) else 0.0 for j in range(G) if j != g]
                cot_l[n, g, column] = (togo[g][k] - sum(others) / (G - 1)) / G
                cot_h[n, g, column] = 1.0 / G
    return cot_l, cot_h


def naive_heldout(policy, params, delta, batch, integrand="rao_blackwell"):
    """Per-prompt D_n = ∂F_n·Δ by autograd through a naive full-logits forward."""
    model = policy.module
    named = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in params.items():
            named[n].copy_(t)
        ell0, h0 = naive_token_values(model, batch, policy.temperature)
    cot_l, cot_h = naive_cotangents(ell0, h0, batch.response_mask, integrand)
    per_prompt = []
    leaves = [named[n] for n in params]
    for n in range(batch.B):
        for leaf in leaves:
            leaf.requires_grad_(True)
        ell, h = naive_token_values(model, batch.select_prompts([n]), policy.temperature)
        F = (ell[0] * cot_l[n]).sum() + (h[0] * cot_h[n]).sum()
        grads = torch.autograd.grad(F, leaves)
        for leaf in leaves:
            leaf.requires_grad_(False)
        per_prompt.append(sum(float((g.to(torch.float64) * delta[name].to(torch.float64)).sum())
                              for g, name in zip(grads, params)))
    with torch.no_grad():
        for n, t in policy.params.items():
            named[n].copy_(t)
    return torch.tensor(per_prompt, dtype=torch.float64)


@pytest.mark.parametrize("integrand", ["rao_blackwell", "sequence"])
def test_equals_the_naive_float64_reference(policy, integrand):
    params = _direction(policy.params, seed=5, scale=0.3)
    params = {n: policy.params[n] + params[n] for n in params}   # away from init: non-trivial ℓ, h, gradients
    batch = _batch(B=3, G=4, seed=2)
    delta = _direction(params, seed=3)
    result = delta_h1_heldout(params, delta, batch, policy=policy, integrand=integrand, seq_chunk=8)
    reference = naive_heldout(policy, params, delta, batch, integrand)
    assert abs(reference).max() > 1e-6                             # the test can fail
    torch.testing.assert_close(torch.tensor(result.per_prompt, dtype=torch.float64), reference, rtol=1e-10,
                               atol=1e-12)
    assert math.isclose(result.deltaH1, float(reference.mean()), rel_tol=1e-10, abs_tol=1e-13)
    assert math.isclose(result.se, float(reference.std()) / math.sqrt(3), rel_tol=1e-9)


def test_cotangents_match_the_loops():
    generator = torch.Generator().manual_seed(0)
    batch = _batch(B=4, G=3, seed=7)
    ell = -torch.rand(batch.input_ids.shape, generator=generator, dtype=torch.float64)
    h = torch.rand(batch.input_ids.shape, generator=generator, dtype=torch.float64)
    for integrand in ("rao_blackwell", "sequence"):
        got = heldout_cotangents(ell, h, batch.response_mask, integrand)
        want = naive_cotangents(ell, h, batch.response_mask, integrand)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_linear_in_the_step_zero_step_is_exactly_zero_and_decomposition_adds_up(policy):
    params = policy.params
    batch = _batch(B=3, G=3, seed=4)
    a, b = _direction(params, seed=1), _direction(params, seed=2)
    ra = delta_h1_heldout(params, a, batch, policy=policy)
    rb = delta_h1_heldout(params, b, batch, policy=policy)
    combo = {n: 2.0 * a[n] - 3.0 * b[n] for n in params}
    rc = delta_h1_heldout(params, combo, batch, policy=policy)
    assert math.isclose(rc.deltaH1, 2 * ra.deltaH1 - 3 * rb.deltaH1, rel_tol=1e-9, abs_tol=1e-14)
    zero = delta_h1_heldout(params, {n: torch.zeros_like(t) for n, t in params.items()}, batch, policy=policy)
    assert zero.deltaH1 == 0.0 and all(v == 0.0 for v in zero.per_prompt)
    # An AdamW step given as its decomposition: grad + state terms = the total along delta_theta().
    state = AdamState.zeros(params, lr=1e-2, weight_decay=0.1)
    ybar = _direction(params, seed=9, scale=1.0)
    warm = update_decomposition(params, ybar, state).new_state
    decomposition = update_decomposition(params, _direction(params, seed=8, scale=1.0), warm)
    split = delta_h1_heldout(params, decomposition, batch, policy=policy)
    whole = delta_h1_heldout(params, decomposition.delta_theta(), batch, policy=policy)
    assert split.state_term != 0.0 and split.grad_term != 0.0
    assert math.isclose(split.grad_term + split.state_term, whole.deltaH1, rel_tol=1e-9)
    assert math.isclose(split.deltaH1, whole.deltaH1, rel_tol=1e-9)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seq_chunk=st.sampled_from([1, 2, 3, 5, 8, 12]), token_chunk=st.sampled_from([1, 3, 64]),
       left=st.booleans(), seed=st.integers(0, 10 ** 6))
def test_invariant_to_chunks_padding_and_prompt_order(policy, seq_chunk, token_chunk, left, seed):
    batch = _batch(B=3, G=3, seed=seed % 97)
    delta = _direction(policy.params, seed=seed)
    reference = delta_h1_heldout(policy.params, delta, batch, policy=policy, seq_chunk=9, token_chunk=64)
    padded = _batch(B=3, G=3, seed=seed % 97, padding_side="left" if left else "right", extra_padding=2)
    got = delta_h1_heldout(policy.params, delta, padded, policy=policy, seq_chunk=seq_chunk,
                           token_chunk=token_chunk)
    torch.testing.assert_close(torch.tensor(got.per_prompt), torch.tensor(reference.per_prompt), rtol=1e-9,
                               atol=1e-13)
    order = [2, 0, 1]
    permuted = delta_h1_heldout(policy.params, delta, batch.select_prompts(order), policy=policy,
                                seq_chunk=seq_chunk, token_chunk=token_chunk)
    torch.testing.assert_close(torch.tensor(permuted.per_prompt), torch.tensor(reference.per_prompt)[order],
                               rtol=1e-9, atol=1e-13)


def test_the_untapped_route_and_the_entropy_gradient_agree_with_the_taps(policy):
    batch = _batch(B=3, G=3, seed=11)
    delta = _direction(policy.params, seed=4)
    tapped = delta_h1_heldout(policy.params, delta, batch, policy=policy, entropy_gradient=True)
    policy._tap_reason = "forced off for this test"
    try:
        plain = delta_h1_heldout(policy.params, delta, batch, policy=policy, entropy_gradient=True)
    finally:
        policy._tap_reason = None
    assert plain.route != tapped.route
    torch.testing.assert_close(torch.tensor(plain.per_prompt), torch.tensor(tapped.per_prompt), rtol=1e-9,
                               atol=1e-14)
    # ĝ_E·Δ is δĤ₁(E): the returned gradient is the one the estimate is the directional derivative of.
    along = sum(float((tapped.gradient[n] * delta[n].to(torch.float64)).sum()) for n in delta)
    assert math.isclose(along, tapped.deltaH1, rel_tol=1e-9)
    for n in delta:
        torch.testing.assert_close(plain.gradient[n], tapped.gradient[n], rtol=1e-9, atol=1e-14)


def test_runs_on_sdpa_in_float32_and_reports_the_entropy(policy):
    """The user's model as loaded (SDPA attention, float32): finite, and the entropy is the no-grad one."""
    sdpa = _policy(attn="sdpa", dtype=torch.float32)
    batch = _batch(B=2, G=3, seed=3)
    result = delta_h1_heldout(sdpa.params, _direction(sdpa.params), batch, policy=sdpa)
    assert math.isfinite(result.deltaH1) and result.route.endswith("taps")
    _, E = sdpa.sequence_logprobs_and_entropies(sdpa.params, batch)
    assert math.isclose(result.entropy, float(E.mean()), rel_tol=1e-6)
    assert math.isclose(result.entropy_per_token, float(E.sum() / batch.response_mask.sum()), rel_tol=1e-6)


def test_bad_inputs_are_refused_with_the_fix(policy):
    batch = _batch(B=2, G=3, seed=1)
    params = policy.params
    with pytest.raises(TypeError, match="delta must be the step"):
        delta_h1_heldout(params, 0.1, batch, policy=policy)
    with pytest.raises(ValueError, match="missing"):
        delta_h1_heldout(params, {}, batch, policy=policy)
    with pytest.raises(ValueError, match="integrand"):
        delta_h1_heldout(params, _direction(params), batch, policy=policy, integrand="rb")
    with pytest.raises(TypeError, match="RolloutBatch"):
        delta_h1_heldout(params, _direction(params), [1, 2], policy=policy)
    nan = {n: torch.full_like(t, math.nan) for n, t in params.items()}
    with pytest.raises(ValueError, match="NaN"):
        delta_h1_heldout(params, nan, batch, policy=policy)
    with pytest.raises(ValueError, match="G ≥ 2"):
        delta_h1_heldout(params, _direction(params), _batch(B=2, G=1, seed=1), policy=policy)


def test_paired_difference_is_the_paired_mean_and_se(policy):
    from funcprobe import snis_delta_h

    batch = _batch(B=4, G=3, seed=6)
    delta = _direction(policy.params, seed=2, scale=3e-2)
    new = {n: policy.params[n] + delta[n] for n in delta}
    realised = snis_delta_h(policy.params, new, policy=policy, batch=batch)
    heldout = delta_h1_heldout(policy.params, delta, batch, policy=policy)
    paired = paired_difference(realised, heldout)
    diff = (torch.tensor(realised.deltaH_per_prompt, dtype=torch.float64)
            - torch.tensor(heldout.per_prompt, dtype=torch.float64))
    assert math.isclose(paired.difference, float(diff.mean()), rel_tol=1e-12)
    assert math.isclose(paired.se, float(diff.std()) / 2, rel_tol=1e-12)
    half = paired_difference(realised, heldout, scale=0.5)
    assert math.isclose(half.predicted, 0.5 * heldout.deltaH1)
    with pytest.raises(ValueError, match="same evaluation batch"):
        paired_difference(realised, delta_h1_heldout(policy.params, delta, _batch(B=3, G=3), policy=policy))


def test_an_unreliable_realised_change_gets_no_first_order_verdict(policy):
    """A flagged ΔĤ may sit on the first-order line or off it by luck: paired_difference gives no verdict (None),
    names the reason, and keeps the numbers; the same realised values marked reliable do get one."""
    import dataclasses

    from funcprobe import snis_delta_h

    batch = _batch(B=4, G=3, seed=6)
    delta = _direction(policy.params, seed=2, scale=3e-2)
    new = {n: policy.params[n] + delta[n] for n in delta}
    realised = snis_delta_h(policy.params, new, policy=policy, batch=batch)
    heldout = delta_h1_heldout(policy.params, delta, batch, policy=policy)
    trusted = paired_difference(dataclasses.replace(realised, reliable=True), heldout)
    assert trusted.first_order in (True, False) and "regime" in trusted.verdict
    flagged = paired_difference(dataclasses.replace(realised, reliable=False, reason="ESS/G 0.1 < 0.5"), heldout)
    assert flagged.first_order is None and not flagged.realised_reliable
    assert "unreliable (ESS/G 0.1 < 0.5)" in flagged.verdict and "regime" not in flagged.verdict
    assert flagged.difference == trusted.difference and flagged.se == trusted.se


# ------------------------------------------------------------------------------------------------ per token
def naive_per_token_cotangents(ell, h, response_mask, integrand):
    """The two columns of the per-token first-order change, by loops: (cotangents of D_n, cotangents of D^len_n,
    r̂_n, T̄_n). D^len's cotangent on ℓ is (N_k − b^N_k)/G for Rao-Blackwell (N_k the tokens after k, b^N its mean over
    the other draws at position k) and (T_g − T̄_{−g})/G for the sequence integrand; 0 on h."""
    B, G, L = ell.shape
    cot_l, cot_h = naive_cotangents(ell, h, response_mask, integrand)
    len_l = torch.zeros(B, G, L, dtype=torch.float64)
    ratio, mean_length = [], []
    for n in range(B):
        positions = [response_mask[n, g].nonzero().squeeze(1).tolist() for g in range(G)]
        lengths = [len(p) for p in positions]
        if integrand == "sequence":
            F = [-float((ell[n, g] * response_mask[n, g]).sum()) for g in range(G)]
        else:
            F = [sum(float(h[n, g, c]) for c in positions[g]) for g in range(G)]
        ratio.append(sum(F) / sum(lengths))
        mean_length.append(sum(lengths) / G)
        for g in range(G):
            for k, column in enumerate(positions[g]):
                if integrand == "sequence":
                    others = [lengths[j] for j in range(G) if j != g]
                    len_l[n, g, column] = (lengths[g] - sum(others) / (G - 1)) / G
                else:
                    after = lambda j: max(lengths[j] - k - 1, 0)  # noqa: E731 - tokens of draw j after position k
                    others = [after(j) for j in range(G) if j != g]
                    len_l[n, g, column] = (after(g) - sum(others) / (G - 1)) / G
    return (cot_l, cot_h), (len_l, torch.zeros_like(len_l)), ratio, mean_length


def naive_directional(policy, params, delta, batch, cot_l, cot_h):
    """Per prompt ∂/∂Δ of Σ (cot_l ℓ + cot_h h) by autograd through the naive full-logits forward: [B]."""
    model = policy.module
    named = dict(model.named_parameters())
    leaves = [named[n] for n in params]
    out = []
    try:
        with torch.no_grad():
            for n, t in params.items():
                named[n].copy_(t)
        for n in range(batch.B):
            for leaf in leaves:
                leaf.requires_grad_(True)
            ell, h = naive_token_values(model, batch.select_prompts([n]), policy.temperature)
            grads = torch.autograd.grad((ell[0] * cot_l[n]).sum() + (h[0] * cot_h[n]).sum(), leaves)
            for leaf in leaves:
                leaf.requires_grad_(False)
            out.append(sum(float((g.to(torch.float64) * delta[name].to(torch.float64)).sum())
                           for g, name in zip(grads, params)))
    finally:
        with torch.no_grad():
            for n, t in policy.params.items():
                named[n].copy_(t)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("integrand", ["rao_blackwell", "sequence"])
def test_per_token_equals_the_naive_float64_reference(policy, integrand):
    """D^tok_n = (D_n − r̂_n D^len_n)/T̄_n, each piece by loops and autograd through full logits, equals
    delta_h1_heldout(per_token=True)'s per-prompt values (1e-10), whole prompts per forward and a prompt split
    over forwards (seq_chunk < G) alike, and on the untapped route; the per-sequence values are unchanged."""
    params = _direction(policy.params, seed=5, scale=0.3)
    params = {n: policy.params[n] + params[n] for n in params}
    batch = _batch(B=3, G=4, seed=2)                                 # ragged responses of 1–6 tokens
    delta = _direction(params, seed=3)
    model = policy.module
    named = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in params.items():
            named[n].copy_(t)
        ell, h = naive_token_values(model, batch, policy.temperature)
        for n, t in policy.params.items():
            named[n].copy_(t)
    (cot_l, cot_h), (len_l, len_h), ratio, mean_length = naive_per_token_cotangents(ell, h, batch.response_mask,
                                                                                    integrand)
    D = naive_directional(policy, params, delta, batch, cot_l, cot_h)
    D_len = naive_directional(policy, params, delta, batch, len_l, len_h)
    ratio, mean_length = torch.tensor(ratio, dtype=torch.float64), torch.tensor(mean_length, dtype=torch.float64)
    reference = (D - ratio * D_len) / mean_length
    assert abs(D_len).max() > 1e-6 and abs(reference - D / mean_length).max() > 1e-6  # r̂ D^len matters
    for seq_chunk in (8, 3):
        result = delta_h1_heldout(params, delta, batch, policy=policy, integrand=integrand, seq_chunk=seq_chunk,
                                  per_token=True)
        torch.testing.assert_close(torch.tensor(result.per_prompt_per_token, dtype=torch.float64), reference,
                                   rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(torch.tensor(result.per_prompt, dtype=torch.float64), D, rtol=1e-10, atol=1e-12)
        assert math.isclose(result.deltaH1_per_token, float(reference.mean()), rel_tol=1e-10, abs_tol=1e-13)
        assert math.isclose(result.se_per_token, float(reference.std()) / math.sqrt(3), rel_tol=1e-9)
    policy._tap_reason = "forced off for this test"
    try:
        plain = delta_h1_heldout(params, delta, batch, policy=policy, integrand=integrand, per_token=True)
    finally:
        policy._tap_reason = None
    torch.testing.assert_close(torch.tensor(plain.per_prompt_per_token, dtype=torch.float64), reference, rtol=1e-10,
                               atol=1e-12)


def test_per_token_cotangents_are_the_surrogate_with_h_minus_the_ratio():
    """heldout_cotangents(per_token=True) = [cotangents of D − r̂·(cotangents of D^len)]/T̄, by loops (1e-12); with
    equal response lengths D^tok = D/T (D^len = 0); a prompt without response tokens is refused."""
    generator = torch.Generator().manual_seed(0)
    batch = _batch(B=4, G=3, seed=7)
    ell = -torch.rand(batch.input_ids.shape, generator=generator, dtype=torch.float64)
    h = torch.rand(batch.input_ids.shape, generator=generator, dtype=torch.float64)
    for integrand in ("rao_blackwell", "sequence"):
        got = heldout_cotangents(ell, h, batch.response_mask, integrand, per_token=True)
        (cot_l, cot_h), (len_l, _), ratio, mean_length = naive_per_token_cotangents(ell, h, batch.response_mask,
                                                                                    integrand)
        r = torch.tensor(ratio, dtype=torch.float64)[:, None, None]
        t = torch.tensor(mean_length, dtype=torch.float64)[:, None, None]
        torch.testing.assert_close(got[0], (cot_l - r * len_l) / t, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got[1], cot_h / t, rtol=1e-12, atol=1e-14)
    equal = _batch(B=2, G=3, seed=1, response_len=(4, 4))
    ell = -torch.rand(equal.input_ids.shape, generator=generator, dtype=torch.float64)
    plain = heldout_cotangents(ell, ell.neg(), equal.response_mask)
    tok = heldout_cotangents(ell, ell.neg(), equal.response_mask, per_token=True)
    for a, b in zip(plain, tok):
        torch.testing.assert_close(b, a / 4, rtol=1e-12, atol=1e-15)
    empty = equal.response_mask.clone()
    empty[1] = 0
    with pytest.raises(ValueError, match="no response tokens"):
        heldout_cotangents(ell, ell, empty, per_token=True)


def test_per_token_paired_difference(policy):
    """A per-token realised change pairs with the per-token first-order values (and is refused without them)."""
    from funcprobe import snis_delta_h

    batch = _batch(B=4, G=3, seed=6)
    delta = _direction(policy.params, seed=2, scale=3e-2)
    new = {n: policy.params[n] + delta[n] for n in delta}
    realised = snis_delta_h(policy.params, new, policy=policy, batch=batch, per_token=True, estimator="rao_blackwell")
    heldout = delta_h1_heldout(policy.params, delta, batch, policy=policy, per_token=True)
    paired = paired_difference(realised, heldout)
    diff = (torch.tensor(realised.deltaH_per_prompt, dtype=torch.float64)
            - torch.tensor(heldout.per_prompt_per_token, dtype=torch.float64))
    assert paired.per_token and math.isclose(paired.difference, float(diff.mean()), rel_tol=1e-12)
    assert math.isclose(paired.se, float(diff.std()) / 2, rel_tol=1e-12)
    assert math.isclose(paired.predicted, heldout.deltaH1_per_token)
    with pytest.raises(ValueError, match="per_token=True"):
        paired_difference(realised, delta_h1_heldout(policy.params, delta, batch, policy=policy))
