"""Probe binds policy, optimizer state and the update batch; its calls equal the free functions, and it refuses to
measure the realised change on the update batch (spec §6)."""

from __future__ import annotations

import math

import pytest
import torch

from funcprobe import (AdamState, Policy, Probe, RolloutBatch, crn_delta_h, delta_h1, rl_update, sample_batch,
                       snis_delta_h)
from funcprobe.testing import char_tokenizer, random_batch, tiny_peft_model

TOKENIZER = char_tokenizer()


def lengths_reward(prompts, responses, meta):
    return [[float(len(text)) for text in group] for group in responses]


@pytest.fixture(scope="module")
def setup():
    policy = Policy.from_peft(tiny_peft_model("llama", vocab_size=len(TOKENIZER), dtype=torch.float64,
                                              hidden_size=16, num_layers=1, r=2))
    batch = random_batch(4, 3, vocab_size=len(TOKENIZER), seed=3)
    adam = AdamState.zeros(policy.params, lr=0.05)
    evaluation = sample_batch(policy, policy.params, ["1+1=", "22*3=", "7"], G=3, reward_fn=lengths_reward,
                              max_new_tokens=5, seed=9, tokenizer=TOKENIZER)
    return policy, batch, adam, evaluation


def test_probe_calls_equal_the_free_functions(setup):
    policy, batch, adam, evaluation = setup
    probe = Probe(policy, adam, batch=batch, seq_chunk=2)
    params = policy.params
    expected = delta_h1(params, batch, policy=policy, adam=adam, seq_chunk=2)
    prediction = probe.delta_h1(params)
    assert math.isclose(prediction.deltaH1, expected.deltaH1, rel_tol=1e-12)
    reference, _ = rl_update(params, batch, policy=policy, adam=adam)
    # The step from δH₁'s own Ȳ, and from a fresh gradient pass: the same θ⁺ to float64 rounding of Ȳ's sums.
    for new_params in (probe.update(params, prediction)[0], probe.update(params)[0]):
        assert all(torch.allclose(new_params[n], reference[n], rtol=0, atol=1e-14) for n in params)
    new_params = probe.update(params, prediction)[0]
    realised = probe.realised(params, new_params, evaluation, method="both")
    assert realised["snis"].deltaH == snis_delta_h(params, new_params, policy=policy, batch=evaluation.batch).deltaH
    assert realised["crn"].deltaH == crn_delta_h(params, new_params, policy=policy, sample=evaluation).deltaH
    assert realised["snis"].deltaH != 0 and not realised["snis"].in_sample
    diagnostic = probe.in_sample_delta_h(params, new_params)
    assert diagnostic.in_sample and "IN-SAMPLE" in str(diagnostic) and "in_sample" in diagnostic.to_dict()["notes"]
    sweep = probe.lr_sweep(params, evaluation, [0.025, 0.05], prediction=prediction, method="both")
    assert sweep.rows[1].snis_deltaH == pytest.approx(realised["snis"].deltaH, rel=1e-9)
    assert sweep.rows[1].crn_deltaH == pytest.approx(realised["crn"].deltaH, rel=1e-9)


def test_probe_refuses_the_update_batch_as_evaluation_batch(setup):
    policy, batch, adam, evaluation = setup
    probe = Probe(policy, adam, batch=batch)
    with pytest.raises(ValueError, match="given the update batch itself.*in_sample_delta_h"):
        probe.snis_delta_h(policy.params, policy.params, batch)
    copy = RolloutBatch.from_dict(batch.to_dict())  # a saved and reloaded copy is the same samples
    with pytest.raises(ValueError, match="given the update batch itself"):
        probe.realised(policy.params, policy.params, copy)
    with pytest.raises(ValueError, match="needs the evaluation sample"):
        probe.realised(policy.params, policy.params, None)
    with pytest.raises(ValueError, match="method must be one of"):
        probe.realised(policy.params, policy.params, evaluation, method="is")


def test_probe_is_immutable_and_needs_a_batch(setup):
    policy, batch, adam, _ = setup
    unbound = Probe(policy, adam)
    with pytest.raises(ValueError, match="no update batch"):
        unbound.delta_h1(policy.params)
    bound = unbound.with_batch(batch)
    assert bound.batch is batch and unbound.batch is None
    with pytest.raises(Exception):
        bound.lr = 1.0



def test_probe_takes_the_update_batch_as_its_sample_too(setup):
    """Probe(batch=<the SampledBatch>) — the object sample_batch returns, not its .batch — works for every method
    (the evaluation methods once crashed comparing it with E), and still refuses that sample as E."""
    policy, _, adam, evaluation = setup
    update = sample_batch(policy, policy.params, ["3+4=", "5*5=", "8-1=", "9"], G=3, reward_fn=lengths_reward,
                          max_new_tokens=5, seed=2, tokenizer=TOKENIZER)
    params = policy.params
    probe = Probe(policy, adam, batch=update)
    prediction = probe.delta_h1(params)
    assert prediction.deltaH1 == Probe(policy, adam, batch=update.batch).delta_h1(params).deltaH1
    new_params = probe.update(params, prediction)[0]
    assert math.isfinite(probe.realised(params, new_params, evaluation, method="snis")["snis"].deltaH)
    assert math.isfinite(probe.delta_h1_heldout(params, prediction, evaluation).deltaH1)
    for given in (update, update.batch):
        with pytest.raises(ValueError, match="given the update batch itself"):
            probe.realised(params, new_params, given, method="snis")
