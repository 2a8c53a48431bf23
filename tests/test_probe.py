"""Probe binds policy, optimizer state and batch; its calls equal the free functions."""

from __future__ import annotations

import math

import pytest
import torch

from funcprobe import AdamState, Policy, Probe, delta_h1, rl_update
from funcprobe.snis import snis_delta_h
from funcprobe.testing import random_batch, tiny_peft_model


@pytest.fixture(scope="module")
def setup():
    policy = Policy.from_peft(tiny_peft_model("llama", dtype=torch.float64, hidden_size=16, num_layers=1, r=2),
                              logsoftmax_dtype=torch.float64)
    batch = random_batch(4, 3, vocab_size=64, seed=3)
    adam = AdamState.zeros(policy.params, lr=0.05)
    return policy, batch, adam


def test_probe_calls_equal_the_free_functions(setup):
    policy, batch, adam = setup
    probe = Probe(policy, adam, batch=batch, seq_chunk=2)
    params = policy.params
    expected = delta_h1(params, batch, policy=policy, adam=adam, seq_chunk=2)
    assert math.isclose(probe.delta_h1(params).deltaH1, expected.deltaH1, rel_tol=1e-12)
    new_params, _ = probe.update(params)
    reference, _ = rl_update(params, batch, policy=policy, adam=adam)
    assert all(torch.allclose(new_params[n], reference[n], rtol=0, atol=1e-14) for n in params)
    realised = probe.snis_delta_h(params, new_params)
    assert realised.deltaH == snis_delta_h(params, new_params, policy=policy, batch=batch).deltaH
    assert realised.deltaH != 0


def test_probe_is_immutable_and_needs_a_batch(setup):
    policy, batch, adam = setup
    unbound = Probe(policy, adam)
    with pytest.raises(ValueError, match="no batch"):
        unbound.delta_h1(policy.params)
    bound = unbound.with_batch(batch)
    assert bound.batch is batch and unbound.batch is None
    with pytest.raises(Exception):
        bound.lr = 1.0
