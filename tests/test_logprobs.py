"""The chunked vocabulary projection (spec §1) against full log_softmax: values, vjp, jvp, entropies."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from funcprobe.logprobs import naive_token_logprobs, token_entropies, token_logprobs


def problem(T=9, H=6, V=13, seed=0, bias=True, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=generator, dtype=dtype)
    weight = torch.randn(V, H, generator=generator, dtype=dtype)
    bias_vector = torch.randn(V, generator=generator, dtype=dtype) if bias else None
    targets = torch.randint(0, V, (T,), generator=generator)
    return hidden, weight, bias_vector, targets


@settings(max_examples=40, deadline=None)
@given(T=st.integers(0, 12), token_chunk=st.integers(1, 15), temperature=st.sampled_from([1.0, 0.6, 1.7]),
       bias=st.booleans(), seed=st.integers(0, 1000))
def test_values_and_vjp_match_full_log_softmax(T, token_chunk, temperature, bias, seed):
    hidden, weight, bias_vector, targets = problem(T=T, seed=seed, bias=bias)
    options = dict(temperature=temperature, logsoftmax_dtype=torch.float64)

    def chunked(h):
        return token_logprobs(h, weight, bias_vector, targets, token_chunk=token_chunk, **options)

    def naive(h):
        return naive_token_logprobs(h, weight, bias_vector, targets, **options)

    assert torch.allclose(chunked(hidden), naive(hidden), rtol=0, atol=1e-12)
    cotangent = torch.randn(T, dtype=torch.float64)
    ours = torch.func.vjp(chunked, hidden)[1](cotangent)[0]
    reference = torch.func.vjp(naive, hidden)[1](cotangent)[0]
    assert torch.allclose(ours, reference, rtol=0, atol=1e-12)
    tangent = torch.randn_like(hidden)
    assert torch.allclose(torch.func.jvp(chunked, (hidden,), (tangent,))[1],
                          torch.func.jvp(naive, (hidden,), (tangent,))[1], rtol=0, atol=1e-12)


def test_gradcheck_and_plain_autograd():
    hidden, weight, bias_vector, targets = problem()
    function = lambda h: token_logprobs(h, weight, bias_vector, targets, temperature=0.8, token_chunk=4,
                                        logsoftmax_dtype=torch.float64)
    assert torch.autograd.gradcheck(function, (hidden.clone().requires_grad_(),))
    leaf = hidden.clone().requires_grad_()
    function(leaf).sum().backward()
    reference = torch.func.grad(lambda h: naive_token_logprobs(
        h, weight, bias_vector, targets, temperature=0.8, logsoftmax_dtype=torch.float64).sum())(hidden)
    assert torch.allclose(leaf.grad, reference, rtol=0, atol=1e-12)


def test_float32_compute_close_to_float64():
    hidden, weight, bias_vector, targets = problem(dtype=torch.float32)
    ours = token_logprobs(hidden, weight, bias_vector, targets, token_chunk=5)
    exact = naive_token_logprobs(hidden.double(), weight.double(), bias_vector.double(), targets,
                                 logsoftmax_dtype=torch.float64)
    assert ours.dtype == torch.float64
    assert torch.allclose(ours, exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("token_chunk", [1, 4, 100])
def test_entropies_match_full_softmax(token_chunk):
    hidden, weight, bias_vector, _ = problem()
    ours = token_entropies(hidden, weight, bias_vector, temperature=1.3, token_chunk=token_chunk,
                           logsoftmax_dtype=torch.float64)
    log_probs = torch.log_softmax((hidden @ weight.T + bias_vector) / 1.3, dim=-1)
    assert torch.allclose(ours, -(log_probs.exp() * log_probs).sum(-1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=0.0), "temperature"),
    (dict(token_chunk=0), "token_chunk"),
    (dict(logsoftmax_dtype=torch.bfloat16), "logsoftmax_dtype"),
])
def test_bad_arguments_are_refused(kwargs, match):
    hidden, weight, bias_vector, targets = problem()
    with pytest.raises(ValueError, match=match):
        token_logprobs(hidden, weight, bias_vector, targets, **kwargs)


def test_shape_mismatch_is_refused():
    hidden, weight, bias_vector, targets = problem()
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(hidden, weight, bias_vector, targets[:-1])
    with pytest.raises(ValueError, match=r"\[V, H\]"):
        token_logprobs(hidden, weight[:, :-1], bias_vector, targets)


def test_no_grad_path_equals_the_autograd_path():
    hidden, weight, bias_vector, targets = problem(T=11)
    options = dict(temperature=0.9, token_chunk=4, logsoftmax_dtype=torch.float64)
    with torch.no_grad():
        fast = token_logprobs(hidden, weight, bias_vector, targets, **options)
    assert torch.allclose(fast, token_logprobs(hidden, weight, bias_vector, targets, **options), rtol=0, atol=1e-13)
