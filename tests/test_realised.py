"""ΔH on an evaluation batch (spec §6): funcprobe.realised — importance sampling, its pure parts and diagnostics.

Tiny float64 models (hidden 16, 1 layer, log-softmax in float64), run single-threaded: at this size one thread is
several times faster than two, and the module restores the thread count afterwards.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel

from funcprobe.adam import AdamState, scaled_update
from funcprobe.policy import Policy
from funcprobe.realised import (ESTIMATORS, MIN_ESS_FRACTION, NORMALIZATIONS, EntropyResult, LogprobMismatchWarning,
                                SNISResult, check_recorded_logprobs, entropy, importance_weighted_delta_h, snis_delta_h,
                                weight_diagnostics)
from funcprobe.stats import kish_ess, psis_threshold
from funcprobe.testing import random_batch, tiny_peft_model
from funcprobe.update import rl_update, update_direction

VOCAB = 32
MODEL = dict(vocab_size=VOCAB, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, dtype=torch.float64)
ALL_OPTIONS = [(n, e, p) for n in NORMALIZATIONS for e in ESTIMATORS for p in (False, True)
               if not (n == "loo" and p)]   # "loo" is per sequence only


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def _policy(seed: int = 5) -> Policy:
    return Policy.from_peft(tiny_peft_model("qwen2", seed=seed, **MODEL), logsoftmax_dtype=torch.float64)


@functools.lru_cache(maxsize=None)
def _setting():
    """(policy, θ, batch, θ⁺, lr): θ⁺ one AdamW step (lr 1e-2) on the batch's RL loss."""
    policy = _policy()
    params = policy.params
    batch = random_batch(3, 4, vocab_size=VOCAB, seed=1)
    lr = 1e-2
    update, _ = rl_update(params, batch, policy=policy, adam=AdamState.zeros(params, lr=lr))
    return policy, params, batch, update, lr


# --------------------------------------------------------------------------------------------- naive reference
def naive_delta_h(S, S_plus, normalize, per_token=False, lengths=None, f=None, f_plus=None, clip=None):
    """Spec §6 the slow, obvious way: Python loops over prompts, unshifted exp of the log-weights."""
    B, G = S.shape
    S, S_plus = S.tolist(), S_plus.tolist()
    f = [[-x for x in row] for row in S] if f is None else f.tolist()
    f_plus = [[-x for x in row] for row in S_plus] if f_plus is None else f_plus.tolist()
    T = lengths.tolist() if per_token else [[1.0] * G for _ in range(B)]
    lw = [[S_plus[n][g] - S[n][g] for g in range(G)] for n in range(B)]
    if clip is not None:
        lw = [[max(-clip, min(clip, x)) for x in row] for row in lw]
    w = [[math.exp(x) for x in row] for row in lw]
    if normalize == "global":
        def ratio(weights, values):
            a = [sum(weights[n][g] * values[n][g] for g in range(G)) for n in range(B)]
            b = [sum(weights[n][g] * T[n][g] for g in range(G)) for n in range(B)]
            R = sum(a) / sum(b)
            b_mean = sum(b) / B
            return R, [R + (a[n] - R * b[n]) / b_mean for n in range(B)]
        after, after_n = ratio(w, f_plus)
        before, before_n = ratio([[1.0] * G for _ in range(B)], f)
        deltas = [after_n[n] - before_n[n] for n in range(B)]
        delta = after - before
    else:
        deltas, after_list, before_list = [], [], []
        for n in range(B):
            if per_token:
                after = sum(w[n][g] * f_plus[n][g] for g in range(G)) / sum(w[n][g] * T[n][g] for g in range(G))
                before = sum(f[n]) / sum(T[n])
            elif normalize == "prompt":
                after = sum(w[n][g] * f_plus[n][g] for g in range(G)) / sum(w[n])
                before = sum(f[n]) / G
            elif normalize == "loo":   # (1/G) Σ_g [w_g (f⁺_g − c_g) + c_g], c_g the other draws' mean
                others = [(sum(f_plus[n]) - f_plus[n][g]) / (G - 1) for g in range(G)]
                after = sum(w[n][g] * (f_plus[n][g] - others[g]) + others[g] for g in range(G)) / G
                before = sum(f[n]) / G
            else:
                after = sum(w[n][g] * f_plus[n][g] for g in range(G)) / G
                before = sum(f[n]) / G
            deltas.append(after - before)
            after_list.append(after)
            before_list.append(before)
        delta = sum(deltas) / B
        after, before = sum(after_list) / B, sum(before_list) / B
    mean = sum(deltas) / B
    se = math.sqrt(sum((d - mean) ** 2 for d in deltas) / (B - 1)) / math.sqrt(B)
    return dict(deltaH=delta, se=se, deltas=deltas, H_after=after, H_before=before)


def _synthetic(B=5, G=6, seed=0, scale=0.7):
    g = torch.Generator().manual_seed(seed)
    S = -(1.0 + 10.0 * torch.rand(B, G, generator=g, dtype=torch.float64))
    S_plus = S + scale * torch.randn(B, G, generator=g, dtype=torch.float64)
    T = torch.randint(1, 7, (B, G), generator=g).to(torch.float64)
    f = 3.0 + torch.rand(B, G, generator=g, dtype=torch.float64)
    f_plus = f + 0.3 * torch.randn(B, G, generator=g, dtype=torch.float64)
    return S, S_plus, T, f, f_plus


# --------------------------------------------------------------------------------------------------- identity
@pytest.mark.parametrize("cached", [False, True])
def test_identity_update_gives_exactly_zero_and_full_ess(cached):
    policy, params, batch, _, _ = _setting()
    if cached:
        batch = batch.replace(logprobs=policy.sequence_logprobs(params, batch))
    same = {name: tensor.clone() for name, tensor in params.items()}
    for normalize, estimator, per_token in ALL_OPTIONS:
        result = snis_delta_h(params, same, policy=policy, batch=batch, normalize=normalize, estimator=estimator,
                              per_token=per_token)
        label = (normalize, estimator, per_token)
        assert result.deltaH == 0.0, label
        assert all(d == 0.0 for d in result.deltaH_per_prompt), label
        assert result.se == 0.0, label
        assert result.H_after == result.H_before, label
        assert result.ess_per_prompt == (1.0,) * batch.B, label
        assert result.ess_min_fraction == result.ess_mean_fraction == result.ess_global_fraction == 1.0, label
        assert result.log_weight_min == result.log_weight_max == 0.0, label
        assert result.reliable and result.reason == "", label
        # One S path: S(θ) is always recomputed teacher-forced; a recorded S is only checked. One pass per θ: the
        # Rao-Blackwell entropies come from the same forward as S.
        assert result.forward_passes == 2, label
        assert result.recorded_logprobs.ok and (result.recorded_logprobs.max_abs_diff == 0.0) == cached, label


# -------------------------------------------------------------------------------------------- naive reference
@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("rao_blackwell", [False, True])
@pytest.mark.parametrize("clip", [None, 0.4])
def test_pure_estimator_matches_naive_reference(normalize, per_token, rao_blackwell, clip):
    S, S_plus, T, f, f_plus = _synthetic()
    if normalize == "loo" and per_token:
        with pytest.raises(ValueError, match="per sequence"):
            importance_weighted_delta_h(S, S_plus, normalize=normalize, per_token=True, lengths=T, clip=clip)
        return
    kwargs = dict(f=f, f_plus=f_plus) if rao_blackwell else {}
    expected = naive_delta_h(S, S_plus, normalize, per_token, T, clip=clip, **kwargs)
    got = importance_weighted_delta_h(
        S, S_plus, normalize=normalize, per_token=per_token, lengths=T if per_token else None, clip=clip,
        values_before=f if rao_blackwell else None, values_after=f_plus if rao_blackwell else None)
    approx = functools.partial(pytest.approx, rel=1e-12, abs=1e-12)
    assert got.deltaH == approx(expected["deltaH"])
    assert got.se == approx(expected["se"])
    assert got.H_after == approx(expected["H_after"])
    assert got.H_before == approx(expected["H_before"])
    assert got.deltaH_per_prompt.tolist() == approx(expected["deltas"])
    assert float(got.deltaH_per_prompt.mean()) == approx(got.deltaH)
    lw = S_plus - S
    assert torch.equal(got.log_weights, lw)
    assert got.clipped_fraction == (0.0 if clip is None else float((lw.abs() > clip).double().mean()))


def test_default_integrand_is_rao_blackwell_for_self_normalised_estimators():
    """The default estimator: Rao-Blackwell with "prompt"/"global" normalisation, −S with ordinary IS ("none")."""
    policy, params, batch, update, _ = _setting()
    for normalize, expected in (("prompt", "rao_blackwell"), ("global", "rao_blackwell"), ("none", "sequence")):
        result = snis_delta_h(params, update, policy=policy, batch=batch, normalize=normalize)
        assert result.estimator == expected
        explicit = snis_delta_h(params, update, policy=policy, batch=batch, normalize=normalize, estimator=expected)
        assert result.deltaH == explicit.deltaH


def test_per_token_none_equals_prompt():
    S, S_plus, T, _, _ = _synthetic(seed=3)
    a = importance_weighted_delta_h(S, S_plus, normalize="none", per_token=True, lengths=T)
    b = importance_weighted_delta_h(S, S_plus, normalize="prompt", per_token=True, lengths=T)
    assert a.deltaH == pytest.approx(b.deltaH, rel=1e-14) and a.se == pytest.approx(b.se, rel=1e-12)


@pytest.mark.parametrize("normalize,estimator,per_token", ALL_OPTIONS)
def test_snis_delta_h_is_the_pure_estimator_on_the_policy_values(normalize, estimator, per_token):
    policy, params, batch, update, _ = _setting()
    result = snis_delta_h(params, update, policy=policy, batch=batch, normalize=normalize, estimator=estimator,
                          per_token=per_token)
    assert isinstance(result, SNISResult)
    assert (result.normalize, result.estimator, result.per_token, result.B, result.G) == (
        normalize, estimator, per_token, batch.B, batch.G)
    S, S_plus = policy.sequence_logprobs(params, batch), policy.sequence_logprobs(update, batch)
    rb = estimator == "rao_blackwell"
    expected = naive_delta_h(S, S_plus, normalize, per_token, batch.response_lengths.double(),
                             f=policy.token_entropies(params, batch) if rb else None,
                             f_plus=policy.token_entropies(update, batch) if rb else None)
    assert result.deltaH == pytest.approx(expected["deltaH"], rel=1e-12, abs=1e-12)
    assert result.se == pytest.approx(expected["se"], rel=1e-12, abs=1e-12)
    assert list(result.deltaH_per_prompt) == pytest.approx(expected["deltas"], rel=1e-12, abs=1e-12)
    lw = S_plus - S
    assert torch.tensor(result.log_weights, dtype=torch.float64).equal(lw)
    assert result.ess_per_prompt == pytest.approx((kish_ess(lw) / batch.G).tolist(), rel=1e-12)
    assert result.ess_global_fraction == pytest.approx(float(kish_ess(lw.flatten())) / lw.numel(), rel=1e-12)
    assert result.khat_threshold == psis_threshold(batch.num_sequences)
    assert result.log_weight_sd == pytest.approx(float(lw.flatten().std()), rel=1e-12)
    # JSON-ready and printable
    data = json.loads(json.dumps(result.to_dict()))
    assert data["deltaH"] == result.deltaH and len(data["log_weights"]) == batch.B
    text = str(result)
    assert "ΔH" in text and "ESS" in text and "k̂" in text


def test_recorded_logprobs_are_checked_never_used():
    """Spec §6, one S path: a recorded S that differs from the teacher-forced one changes nothing in the estimate; the
    difference is reported, and above the dtype's rounding bound it warns."""
    policy, params, batch, update, _ = _setting()
    S = policy.sequence_logprobs(params, batch)
    fresh = snis_delta_h(params, update, policy=policy, batch=batch)
    assert fresh.recorded_logprobs.max_abs_diff is None and fresh.recorded_logprobs.ok
    with pytest.warns(LogprobMismatchWarning, match=r"differ from the teacher-forced ones by up to 0\.25"):
        shifted = snis_delta_h(params, update, policy=policy, batch=batch.replace(logprobs=S - 0.25))
    assert shifted.deltaH == fresh.deltaH and shifted.log_weights == fresh.log_weights
    check = shifted.recorded_logprobs
    assert check.max_abs_diff == pytest.approx(0.25, rel=1e-12) and not check.ok
    assert check.exceeded == batch.num_sequences and check.dtype == "float64"
    # The bound: RECORDED_LOGPROB_TOLERANCE · eps · (T + |S|), per sequence; rounding-sized gaps pass silently.
    T = batch.response_lengths.double()
    bound = 8.0 * torch.finfo(torch.float32).eps * (T + S.abs())
    near = check_recorded_logprobs(batch.replace(logprobs=S - 0.5 * bound), S, dtype=torch.float32)
    far = check_recorded_logprobs(batch.replace(logprobs=S - 2.0 * bound), S, dtype=torch.float32, warn=False)
    assert near.ok and not far.ok and far.exceeded == batch.num_sequences
    # A deeper model rounds more: the bound grows as √layers (4 layers: twice the 1-layer bound).
    deep = check_recorded_logprobs(batch.replace(logprobs=S - 1.5 * bound), S, dtype=torch.float32, layers=4)
    assert deep.ok and deep.threshold == pytest.approx(2 * float(bound[deep.worst]), rel=1e-12)
    assert policy.num_layers == policy.module.get_base_model().config.num_hidden_layers
    with pytest.raises(ValueError, match="layers must be a positive integer"):
        check_recorded_logprobs(batch, S, dtype=torch.float32, layers=0)
    assert json.loads(json.dumps(shifted.to_dict()))["recorded_logprobs"]["ok"] is False


def test_a_batch_drawn_at_another_temperature_is_refused():
    """A batch records its τ (spec §0); a policy with another τ refuses it, naming both."""
    policy, params, batch, update, _ = _setting()
    with pytest.raises(ValueError, match=r"drawn at temperature τ=0\.6 but this policy .* τ=1"):
        snis_delta_h(params, update, policy=policy, batch=batch.replace(temperature=0.6))


# ------------------------------------------------------------------------------------ invariances (hypothesis)
@functools.lru_cache(maxsize=None)
def _reference_log_weights():
    policy, params, _, update, _ = _setting()
    batch = random_batch(3, 4, vocab_size=VOCAB, seed=11)
    result = snis_delta_h(params, update, policy=policy, batch=batch)
    return torch.tensor(result.log_weights, dtype=torch.float64), result.deltaH


@settings(max_examples=12, deadline=None)
@given(seq_chunk=st.integers(1, 13), token_chunk=st.integers(1, 40), padding_side=st.sampled_from(["left", "right"]),
       extra_padding=st.integers(0, 3))
def test_log_weights_invariant_to_chunks_and_padding(seq_chunk, token_chunk, padding_side, extra_padding):
    policy, params, _, update, _ = _setting()
    reference, reference_delta = _reference_log_weights()
    batch = random_batch(3, 4, vocab_size=VOCAB, seed=11, padding_side=padding_side, extra_padding=extra_padding)
    result = snis_delta_h(params, update, policy=policy, batch=batch, seq_chunk=seq_chunk, token_chunk=token_chunk)
    assert torch.allclose(torch.tensor(result.log_weights, dtype=torch.float64), reference, rtol=0, atol=1e-10)
    assert result.deltaH == pytest.approx(reference_delta, rel=1e-9, abs=1e-11)


@settings(max_examples=25, deadline=None)
@given(signs=st.lists(st.sampled_from([-1.0, 1.0]), min_size=12, max_size=12), seed=st.integers(0, 1000),
       normalize=st.sampled_from(["prompt", "global"]), per_token=st.booleans())
def test_no_overflow_with_log_weights_of_plus_minus_1000(signs, seed, normalize, per_token):
    g = torch.Generator().manual_seed(seed)
    S = -(1.0 + torch.rand(3, 4, generator=g, dtype=torch.float64))
    noise = 0.01 * torch.randn(3, 4, generator=g, dtype=torch.float64)
    lw = 1000.0 * torch.tensor(signs, dtype=torch.float64).reshape(3, 4) + noise
    T = torch.randint(1, 5, (3, 4), generator=g).double()
    f, f_plus = 2.0 + torch.rand(3, 4, generator=g, dtype=torch.float64), 2.0 + torch.rand(3, 4, generator=g,
                                                                                               dtype=torch.float64)
    common = dict(normalize=normalize, per_token=per_token, lengths=T, values_before=f, values_after=f_plus)
    got = importance_weighted_delta_h(S, S + lw, **common)
    assert math.isfinite(got.deltaH) and math.isfinite(got.se) and math.isfinite(got.H_after)
    assert torch.isfinite(got.weights).all()
    # Only the relative log-weights matter (per prompt for "prompt", over the batch for "global"): subtracting the
    # maximum (what a careful hand computation would do) gives the same estimate.
    shift = lw.max(dim=1, keepdim=True).values if normalize == "prompt" else lw.max()
    ref = importance_weighted_delta_h(S, S + (lw - shift), **common)
    assert got.deltaH == pytest.approx(ref.deltaH, rel=1e-12, abs=1e-12)
    diag = weight_diagnostics(lw, normalize=normalize)
    for value in (diag.ess_min_fraction, diag.ess_mean_fraction, diag.ess_global_fraction, diag.log_weight_sd):
        assert math.isfinite(value)
    assert 1 / 4 - 1e-12 <= diag.ess_min_fraction <= 1.0 + 1e-12
    assert not math.isnan(diag.khat)


def test_extreme_log_weights_put_all_mass_on_the_largest():
    S = torch.full((2, 3), -2.0, dtype=torch.float64)
    lw = torch.tensor([[1000.0, -1000.0, -1000.0], [-1000.0, -1000.0, -999.0]], dtype=torch.float64)
    f_plus = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
    got = importance_weighted_delta_h(S, S + lw, values_before=-S, values_after=f_plus)
    assert got.H_after_per_prompt[0] == 1.0
    e = math.exp(-1.0)
    assert float(got.H_after_per_prompt[1]) == pytest.approx((4 * e + 5 * e + 6) / (2 * e + 1), rel=1e-14)
    # Ordinary IS: weights e^-1000 underflow to exactly 0 (the true value, 1e-434, is below float64), e^+1000 would
    # be beyond float64: the estimate is +inf, never NaN, and snis_delta_h flags it.
    low = importance_weighted_delta_h(S, S - 1000.0, normalize="none")
    assert low.H_after == 0.0 and math.isfinite(low.deltaH)
    high = importance_weighted_delta_h(S, S + 1000.0, normalize="none", values_before=-S, values_after=-S)
    assert high.H_after == math.inf and not math.isnan(high.deltaH)


# ----------------------------------------------------------------------------------------------- linearisation
@pytest.mark.parametrize("normalize", ["none", "prompt"])
def test_delta_h_over_eta_converges_to_the_jvp_derivative(normalize):
    policy, params, batch, _, lr = _setting()
    delta = update_direction(params, batch, policy=policy, adam=AdamState.zeros(params, lr=lr)).delta_theta()
    tangent = {name: value / lr for name, value in delta.items()}
    # Forward-mode AD is not implemented for PyTorch's CPU flash attention; the math kernel is (float64 throughout).
    with sdpa_kernel(SDPBackend.MATH):
        S, dS = torch.func.jvp(lambda p: policy.sequence_logprobs(p, batch, with_grad=True), (dict(params),),
                               (tangent,))
    S, dS = S.detach(), dS.detach()
    if normalize == "none":   # d/dη (1/BG) Σ w (−S⁺) at η = 0 = −(1/BG) Σ (S + 1) ∇S·Δθ/lr
        derivative = float(-((S + 1.0) * dS).mean())
    else:                     # d/dη Σ_g w̃ (−S⁺): w̃_g' = (S'_g − mean S')/G
        centred = S - S.mean(dim=1, keepdim=True)
        derivative = float((-(centred * dS).mean(dim=1) - dS.mean(dim=1)).mean())
    errors = []
    for factor in (1e-4, 1e-5):
        eta = factor * lr
        result = snis_delta_h(params, scaled_update(params, delta, factor), policy=policy, batch=batch,
                              normalize=normalize, estimator="sequence")
        errors.append(abs(result.deltaH / eta - derivative) / abs(derivative))
    assert abs(derivative) > 1.0
    assert errors[0] < 1e-2 and errors[1] < 2e-3
    assert 5.0 < errors[0] / errors[1] < 20.0, errors  # O(η): ten times smaller η, ten times smaller error


# -------------------------------------------------------------------------------------------------- bad inputs
def test_update_with_missing_extra_or_mismatched_tensors_is_refused():
    policy, params, batch, update, _ = _setting()
    name = next(iter(update))
    missing = {k: v for k, v in update.items() if k != name}
    with pytest.raises(ValueError, match=r"update must hold exactly .* missing \[.*lora"):
        snis_delta_h(params, missing, policy=policy, batch=batch)
    extra = dict(update, **{"base_model.model.extra.weight": torch.zeros(2, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"update must hold exactly .*extra \['base_model.model.extra.weight'\]"):
        snis_delta_h(params, extra, policy=policy, batch=batch)
    shape = dict(update, **{name: torch.zeros(update[name].shape[0] + 1, update[name].shape[1],
                                              dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"update\['.*'\] is \(\d+, \d+\) torch.float64 .* the policy expects"):
        snis_delta_h(params, shape, policy=policy, batch=batch)
    dtype = dict(update, **{name: update[name].float()})
    with pytest.raises(ValueError, match=r"update\['.*'\] is .* torch.float32"):
        snis_delta_h(params, dtype, policy=policy, batch=batch)
    with pytest.raises(ValueError, match=r"params must hold exactly"):
        snis_delta_h(missing, update, policy=policy, batch=batch)


def test_missing_policy_is_a_clear_error():
    policy, params, batch, update, _ = _setting()
    with pytest.raises(TypeError, match=r"required keyword-only argument: 'policy'"):
        snis_delta_h(params, update, batch=batch)
    with pytest.raises(ValueError, match=r"needs policy=.*S\(θ\) and S\(θ⁺\).*teacher-forced"):
        snis_delta_h(params, update, batch=batch, policy=None)
    cached = batch.replace(logprobs=policy.sequence_logprobs(params, batch))
    with pytest.raises(ValueError, match=r"entropy needs policy="):
        entropy(params, cached, policy=None)
    with pytest.raises(ValueError, match=r"batch must be a funcprobe.RolloutBatch or the SampledBatch"):
        snis_delta_h(params, update, policy=policy, batch={"input_ids": None})


def test_nan_log_weights_name_the_sequences():
    policy, params, batch, update, _ = _setting()
    name = next(iter(update))
    broken = dict(update, **{name: torch.full_like(update[name], math.nan)})
    with pytest.raises(ValueError, match=r"log-weights .* are NaN for 12 sequence\(s\) .*\(0, 0\), \(0, 1\)"):
        snis_delta_h(params, broken, policy=policy, batch=batch)
    S, S_plus, *_ = _synthetic()
    S_plus[1, 2] = math.nan
    with pytest.raises(ValueError, match=r"NaN for 1 sequence\(s\) \(prompt n, sample g\): \(1, 2\)"):
        importance_weighted_delta_h(S, S_plus)


@pytest.mark.parametrize("kwargs,match", [
    (dict(normalize="batch"), "normalize must be one of"),
    (dict(estimator="rb"), "estimator must be one of"),
    (dict(per_token="yes"), "per_token must be True or False"),
    (dict(clip=0.0), "clip must be a positive number"),
    (dict(clip=-1.0), "clip must be a positive number"),
    (dict(clip="big"), "clip must be a positive number"),
])
def test_bad_options(kwargs, match):
    policy, params, batch, update, _ = _setting()
    with pytest.raises(ValueError, match=match):
        snis_delta_h(params, update, policy=policy, batch=batch, **kwargs)


def test_clipping_is_reported_and_unclipped_diagnostics_kept():
    policy, params, batch, _, lr = _setting()
    delta = update_direction(params, batch, policy=policy, adam=AdamState.zeros(params, lr=lr)).delta_theta()
    big = scaled_update(params, delta, 30.0)
    raw = snis_delta_h(params, big, policy=policy, batch=batch)
    clip = 0.5 * max(abs(raw.log_weight_min), abs(raw.log_weight_max))
    clipped = snis_delta_h(params, big, policy=policy, batch=batch, clip=clip)
    lw = torch.tensor(raw.log_weights, dtype=torch.float64)
    assert clipped.clipped_fraction == float((lw.abs() > clip).double().mean()) > 0
    assert clipped.log_weights == raw.log_weights and clipped.ess_min_fraction == raw.ess_min_fraction
    assert clipped.deltaH != raw.deltaH and "clipping biases" in str(clipped)


def test_unreliable_flag_and_reason():
    # A policy whose LM head is scaled ×20 (far from uniform), and a large change of its LoRA tensors.
    model = tiny_peft_model("qwen2", seed=5, **MODEL)
    with torch.no_grad():
        model.get_base_model().get_output_embeddings().weight.mul_(20.0)
    policy = Policy.from_peft(model, logsoftmax_dtype=torch.float64)
    batch = random_batch(4, 8, vocab_size=VOCAB, seed=1)
    update = {name: 3.0 * value for name, value in policy.params.items()}
    result = snis_delta_h(policy.params, update, policy=policy, batch=batch)
    assert result.ess_min_fraction < MIN_ESS_FRACTION
    assert result.khat_assessed and result.khat > result.khat_threshold == psis_threshold(32)
    assert not result.reliable
    assert "effective sample size" in result.reason and "PSIS k̂" in result.reason
    assert "common-random-numbers" in result.reason and "resample the batch at θ⁺" in result.reason
    assert "lower η" in result.reason
    assert "reliable: NO" in str(result)
    glob = snis_delta_h(policy.params, update, policy=policy, batch=batch, normalize="global")
    assert "global effective sample size" in glob.reason
    # Tiny steps: the log-weights' range is below KHAT_MIN_LOG_WEIGHT_RANGE and k̂ stays out of the verdict.
    tiny = {name: value * (1 + 1e-6) for name, value in policy.params.items()}
    calm = snis_delta_h(policy.params, tiny, policy=policy, batch=batch)
    assert calm.reliable and not calm.khat_assessed
    # Fewer than 21 log-weights: no generalised-Pareto fit (k̂ = inf), not assessed; the ESS still is.
    small = weight_diagnostics(torch.tensor([[0.0, -3.0, -3.0, -3.0], [0.0, 0.1, 0.2, 0.3]], dtype=torch.float64))
    assert small.khat == math.inf and not small.khat_assessed
    assert not small.reliable and "prompt 0" in small.reason


# ------------------------------------------------------------------------------------------------------ entropy
def test_entropy_sequence_rb_and_per_token():
    policy, params, batch, _, _ = _setting()
    S = policy.sequence_logprobs(params, batch)
    # A recorded S is not used (one S path): the result is the teacher-forced one.
    plain = entropy(params, batch.replace(logprobs=S - 1.0), policy=policy)
    assert isinstance(plain, EntropyResult) and plain.forward_passes == 1
    assert plain.H == pytest.approx(float(-S.mean()), rel=1e-14)
    per_prompt = -S.mean(dim=1)
    assert plain.se == pytest.approx(float(per_prompt.std() / math.sqrt(batch.B)), rel=1e-12)
    E = policy.token_entropies(params, batch)
    rb = entropy(params, batch, policy=policy, estimator="rao_blackwell")
    assert rb.H == pytest.approx(float(E.mean()), rel=1e-14) and rb.forward_passes == 1
    T = batch.response_lengths.double()
    tok = entropy(params, batch, policy=policy, per_token=True)
    assert tok.H == pytest.approx(float((-S.sum(1) / T.sum(1)).mean()), rel=1e-14)
    json.dumps(tok.to_dict())
    assert "Ĥ(θ)" in str(tok)


# ------------------------------------------------------------------------------ exact enumeration (spec §7)
V, T_LEN, B_EXACT, G_EXACT = 6, 3, 4, 8
N_BATCHES = 1000
PROMPTS = [[1, 2], [3, 4], [5, 0], [2, 2]]


@pytest.fixture(scope="module")
def exact_setting():
    """θ, θ⁺ = one AdamW step (lr 0.05) on a batch drawn from the exact π_θ, and many batches' estimates.

    The model's LM head is scaled ×5 so that π_θ is far from uniform (a random tiny model is nearly uniform, and its
    entropy barely moves). In this regime E_θ[w²] ≤ 1.5 for every prompt (asserted): the self-normalised
    estimators' O(1/G) bias is then of the order of the Monte-Carlo error, and its first-order term is computed
    exactly below.

    The statistics use the exact S, S⁺ and summed next-token entropies of the drawn responses, looked up from the
    enumeration (so that 1000 batches take a second); that these lookups are exactly what ``snis_delta_h`` computes on
    the sampled batch is checked on the first batches.
    """
    enumeration = pytest.importorskip("funcprobe.enumeration")
    model = tiny_peft_model("qwen2", vocab_size=V, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                            dtype=torch.float64, seed=11)
    with torch.no_grad():
        model.get_base_model().get_output_embeddings().weight.mul_(5.0)
    policy = Policy.from_peft(model, logsoftmax_dtype=torch.float64, seq_chunk=256)
    params = policy.params
    dist = enumeration.exact_distribution(policy, params, PROMPTS, T_LEN)
    generator = torch.Generator().manual_seed(3)
    rewards = enumeration.random_reward_table(B_EXACT, V, T_LEN, generator=generator)
    step_batch, _ = enumeration.sample_exact_batch(dist, G_EXACT, rewards=rewards, generator=generator)
    update, _ = rl_update(params, step_batch, policy=policy, adam=AdamState.zeros(params, lr=0.05))
    dist_plus = enumeration.exact_distribution(policy, update, PROMPTS, T_LEN)
    everything = enumeration.enumeration_batch(PROMPTS, T_LEN, V)
    E, E_plus = policy.token_entropies(params, everything), policy.token_entropies(update, everything)

    p, S_all, S_plus_all = dist.probs, dist.logprobs, dist_plus.logprobs
    w = torch.exp(S_plus_all - S_all)
    second_moment = (p * w * w).sum(dim=1)
    H_plus_n = dist_plus.entropy
    # First-order (delta-method) bias of the self-normalised estimators, exact from the enumeration:
    # E[Σ w f / Σ w] − μ ≈ −(1/G) E_θ[w² (f − μ)] per prompt; one ratio over B·G for "global".
    bias = {}
    for name, f_plus in (("sequence", -S_plus_all), ("rao_blackwell", E_plus)):
        bias[("prompt", name)] = float((-(p * w * w * (f_plus - H_plus_n[:, None])).sum(1) / G_EXACT).mean())
        bias[("global", name)] = float((-(p * w * w * (f_plus - H_plus_n.mean())).sum(1)).mean()
                                       / (B_EXACT * G_EXACT))
        bias[("none", name)] = 0.0
        bias[("loo", name)] = 0.0   # ordinary IS with a control variate independent of each draw: unbiased

    variants = [(n, e) for n in NORMALIZATIONS for e in ESTIMATORS]
    estimates = {v: [] for v in variants}
    plumbing = []
    for i in range(N_BATCHES):
        batch, index = enumeration.sample_exact_batch(dist, G_EXACT, generator=generator)
        S, S_plus = S_all.gather(1, index), S_plus_all.gather(1, index)
        for normalize, estimator in variants:
            rb = estimator == "rao_blackwell"
            result = importance_weighted_delta_h(
                S, S_plus, normalize=normalize, values_before=E.gather(1, index) if rb else None,
                values_after=E_plus.gather(1, index) if rb else None)
            estimates[(normalize, estimator)].append(result)
            if i < 2:
                real = snis_delta_h(params, update, policy=policy, batch=batch, normalize=normalize,
                                    estimator=estimator)
                plumbing.append((real, result))
    return SimpleNamespace(policy=policy, params=params, dist=dist, exact_n=dist_plus.entropy - dist.entropy,
                           second_moment=second_moment, bias=bias, estimates=estimates, plumbing=plumbing,
                           generator=generator, enumeration=enumeration)


def _summary(results):
    values = torch.tensor([r.deltaH for r in results], dtype=torch.float64)
    se2 = torch.tensor([r.se ** 2 for r in results], dtype=torch.float64)
    per_prompt = torch.stack([r.deltaH_per_prompt for r in results])
    return values, se2, per_prompt


def test_exact_regime_is_as_designed(exact_setting):
    assert float(exact_setting.second_moment.max()) < 1.5
    assert float(exact_setting.exact_n.mean().abs()) > 0.03


def test_snis_delta_h_on_sampled_batches_equals_the_lookup(exact_setting):
    for real, lookup in exact_setting.plumbing:
        assert real.deltaH == pytest.approx(lookup.deltaH, rel=1e-10, abs=1e-12)
        assert real.se == pytest.approx(lookup.se, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_mean_over_batches_matches_exact_delta_h(exact_setting, normalize, estimator):
    """Mean of ΔĤ over 1000 batches vs the exact H(θ⁺) − H(θ).

    "none" (ordinary IS) is unbiased: within 3 Monte-Carlo SEs of the exact value. The self-normalised estimators
    ("prompt", "global") have an O(1/G) bias, here about 0.5–3 MC SEs: they must fall within 3 MC SEs of the exact
    value plus their first-order bias −(1/G)·E_θ[w²(f − μ)] (computed exactly from the enumeration), with half that
    bias again allowed for the O(1/G²) remainder. So the test also checks that the bias is the one the theory gives.
    """
    values, _, _ = _summary(exact_setting.estimates[(normalize, estimator)])
    exact = float(exact_setting.exact_n.mean())
    mc_se = float(values.std()) / math.sqrt(N_BATCHES)
    bias = exact_setting.bias[(normalize, estimator)]
    deviation = float(values.mean()) - (exact + bias)
    assert abs(deviation) <= 3 * mc_se + 0.5 * abs(bias), (float(values.mean()), exact, mc_se, bias)
    if normalize == "prompt":   # the change is detectable with these sizes
        assert abs(exact) > 5 * mc_se


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_reported_se_matches_the_spread_across_batches(exact_setting, normalize, estimator):
    """E[SE²] = Var(ΔĤ) + Σ_n (μ_n − μ̄)² / (B(B − 1)) when the B prompts are held fixed across batches (sd_n treats
    the prompts as a random sample, so the spread of their means μ_n = E[ΔĤ_n] enters it; μ_n is estimated from the
    batches). Within 25%."""
    values, se2, per_prompt = _summary(exact_setting.estimates[(normalize, estimator)])
    mu = per_prompt.mean(dim=0)
    spread = float(((mu - mu.mean()) ** 2).sum()) / (B_EXACT * (B_EXACT - 1))
    ratio = (float(se2.mean()) - spread) / float(values.var())
    assert 0.75 < ratio < 1.25, ratio


def test_rao_blackwell_has_lower_variance(exact_setting):
    for normalize in ("prompt", "global"):
        sequence = _summary(exact_setting.estimates[(normalize, "sequence")])[0].var()
        rb = _summary(exact_setting.estimates[(normalize, "rao_blackwell")])[0].var()
        assert rb < 0.1 * sequence, (normalize, float(rb), float(sequence))


def test_entropy_matches_exact_entropy(exact_setting):
    s = exact_setting
    exact = float(s.dist.entropy.mean())
    for estimator, count in (("sequence", 400), ("rao_blackwell", 100)):
        values, se2 = [], []
        for _ in range(count):
            batch, _ = s.enumeration.sample_exact_batch(s.dist, G_EXACT, generator=s.generator)
            result = entropy(s.params, batch, policy=s.policy, estimator=estimator)
            values.append(result.H)
            se2.append(result.se ** 2)
        values = torch.tensor(values, dtype=torch.float64)
        mc_se = float(values.std()) / math.sqrt(count)
        assert abs(float(values.mean()) - exact) <= 3 * mc_se, (estimator, float(values.mean()), exact, mc_se)


# ------------------------------------------------------------------------ the leave-one-out control variate ("loo")
def test_loo_is_ordinary_is_with_a_leave_one_out_control_variate():
    """normalize="loo": Ĥ_n(θ⁺) = (1/G) Σ_g [w_g (f⁺_g − c_g) + c_g], c_g the mean of the other draws' f⁺ (written out
    by hand); a zero step gives exactly 0; per-token estimates are refused (a ratio)."""
    from funcprobe.realised import importance_weighted_delta_h

    generator = torch.Generator().manual_seed(3)
    S = -4 - torch.rand(5, 4, generator=generator, dtype=torch.float64)
    S_plus = S + 0.2 * torch.randn(5, 4, generator=generator, dtype=torch.float64)
    f = 3 + torch.rand(5, 4, generator=generator, dtype=torch.float64)
    f_plus = f + 0.05 * torch.randn(5, 4, generator=generator, dtype=torch.float64)
    result = importance_weighted_delta_h(S, S_plus, normalize="loo", values_before=f, values_after=f_plus)
    w = (S_plus - S).exp()
    G = 4
    expected = []
    for n in range(5):
        others = [(f_plus[n].sum() - f_plus[n, g]) / (G - 1) for g in range(G)]
        after = sum(w[n, g] * (f_plus[n, g] - others[g]) + others[g] for g in range(G)) / G
        expected.append(float(after - f[n].mean()))
    torch.testing.assert_close(result.deltaH_per_prompt, torch.tensor(expected, dtype=torch.float64), rtol=1e-12,
                               atol=1e-14)
    assert result.deltaH != importance_weighted_delta_h(S, S_plus, values_before=f, values_after=f_plus).deltaH
    zero = importance_weighted_delta_h(S, S, normalize="loo", values_before=f, values_after=f)
    assert zero.deltaH == 0.0 and bool((zero.deltaH_per_prompt == 0).all())
    with pytest.raises(ValueError, match="per_token"):
        importance_weighted_delta_h(S, S_plus, normalize="loo", per_token=True, lengths=torch.ones(5, 4))
    with pytest.raises(ValueError, match="overflows"):
        importance_weighted_delta_h(S, S + 800.0, normalize="loo")
