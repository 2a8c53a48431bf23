"""Issue 19: a result computed on an evaluation batch E records E's fingerprint, and every site that pairs two results
per prompt (or draws one's line against the other's) refuses two different E's of the same shape.

The refusal tests use only the public estimators, so on a funcprobe without fingerprints they fail by not raising.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from funcprobe import AdamState, Policy, delta_h1, sample_batch, snis_delta_h
from funcprobe.heldout import delta_h1_heldout, paired_difference
from funcprobe.realised import crn_from_draws, values_before
from funcprobe.sweep import lr_sweep
from funcprobe.testing import char_tokenizer, random_batch, tiny_peft_model

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENIZER = char_tokenizer()
V = len(TOKENIZER)


@pytest.fixture(scope="module")
def policy():
    model = tiny_peft_model("qwen2", vocab_size=V, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, r=2,
                            dtype=torch.float64, seed=5)
    return Policy.from_peft(model, logsoftmax_dtype=torch.float64)


def _batch(seed, B=3, G=3, **options):
    return random_batch(B, G, vocab_size=V, seed=seed, padding_side="right", **options)


def _direction(params, seed=2, scale=3e-2):
    generator = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.dtype)
            for n, t in params.items()}


@pytest.fixture(scope="module")
def step(policy):
    """Δθ and θ⁺ = θ + Δθ."""
    delta = _direction(policy.params)
    return delta, {n: policy.params[n] + delta[n] for n in delta}


@pytest.fixture(scope="module")
def two_evaluations(policy, step):
    """Two evaluation batches of the same shape 3×3 (different draws) and δĤ₁ of the step on each."""
    delta, _ = step
    first, second = _batch(seed=6), _batch(seed=7)
    assert (first.B, first.G) == (second.B, second.G)
    return (first, second,
            delta_h1_heldout(policy.params, delta, first, policy=policy, per_token=True),
            delta_h1_heldout(policy.params, delta, second, policy=policy, per_token=True))


def _refused(error, *fingerprints):
    message = str(error.value)
    assert "same evaluation batch" in message, message
    for fingerprint in fingerprints:
        assert fingerprint in message, message


# ------------------------------------------------------------------------------------------------ the fingerprint
def test_fingerprint_is_short_stable_and_cached():
    from funcprobe.batch import batch_fingerprint

    batch = _batch(seed=1)
    fingerprint = batch_fingerprint(batch)
    assert isinstance(fingerprint, str) and len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    assert batch.fingerprint == fingerprint and batch.fingerprint is batch.fingerprint     # computed once
    assert batch_fingerprint(_batch(seed=1)) == fingerprint                                # a rebuilt copy
    assert batch_fingerprint(batch.to("cpu")) == fingerprint
    assert _batch(seed=2).fingerprint != fingerprint


def test_fingerprint_survives_the_batch_files(tmp_path):
    from funcprobe.rollouts_file import load_batch, load_batch_json, save_batch, save_batch_json

    batch = _batch(seed=3, extra_padding=2)
    save_batch(batch, tmp_path / "batch.safetensors")
    save_batch_json(batch, tmp_path / "batch.json")
    assert load_batch(tmp_path / "batch.safetensors").fingerprint == batch.fingerprint
    assert load_batch_json(tmp_path / "batch.json").fingerprint == batch.fingerprint


def test_fingerprint_survives_token_lists_and_ignores_the_padding_layout():
    from funcprobe import RolloutBatch

    # A left-padded batch with extra padding columns: from_token_lists lays the same samples out differently (prompt
    # right-aligned at P, completion from P), yet they are the same samples.
    batch = random_batch(3, 4, vocab_size=V, seed=4, padding_side="left", extra_padding=3)
    prompts, completions = batch.token_lists()
    rebuilt = RolloutBatch.from_token_lists(prompts, completions, advantages=batch.advantages,
                                            pad_token_id=batch.pad_token_id, temperature=batch.temperature,
                                            length_norm=batch.length_norm)
    assert rebuilt.L != batch.L and rebuilt.fingerprint == batch.fingerprint
    again = RolloutBatch.from_token_lists(*rebuilt.token_lists(), advantages=torch.zeros(3, 4), pad_token_id=0,
                                          temperature=batch.temperature, length_norm=1.0)
    assert again.fingerprint == batch.fingerprint


def test_fingerprint_changes_with_the_samples_not_with_their_scores():
    batch = _batch(seed=5)
    fingerprint = batch.fingerprint
    # One response token changed.
    n, g, k = (int(i) for i in batch.response_mask.nonzero()[0])
    ids = batch.input_ids.clone()
    ids[n, g, k] = (ids[n, g, k] + 1) % V or 1
    assert batch.replace(input_ids=ids).fingerprint != fingerprint
    # One prompt token changed.
    p = int(batch.attention_mask[0, 0].nonzero()[0])
    ids = batch.input_ids.clone()
    ids[0, 0, p] = (ids[0, 0, p] + 1) % V or 1
    assert batch.replace(input_ids=ids).fingerprint != fingerprint
    # The same tokens, one prompt token counted as a response token instead (the split moves).
    response = batch.response_mask.clone()
    first = int(response[0, 0].to(torch.uint8).argmax())
    response[0, 0, first - 1] = True
    assert batch.replace(response_mask=response).fingerprint != fingerprint
    assert batch.replace(temperature=0.7).fingerprint != fingerprint
    assert batch.select_prompts([1, 0, 2]).fingerprint != fingerprint
    # What the realised change and δĤ₁(E) of E do not read: scores, normalisers, the pool index, padding ids.
    assert batch.replace(advantages=torch.ones(batch.B, batch.G), rewards=None, length_norm=torch.ones(batch.B),
                         prompt_index=torch.arange(batch.B)).fingerprint == fingerprint
    padded = batch.input_ids.masked_fill(~batch.attention_mask, 5)
    assert batch.replace(input_ids=padded, pad_token_id=5).fingerprint == fingerprint


# ---------------------------------------------------------------------------------------- results record it
def test_every_result_on_e_records_its_fingerprint(policy, step, two_evaluations):
    from funcprobe.trl import reverse_importance_change

    _, update = step
    first, _, heldout, _ = two_evaluations
    snis = snis_delta_h(policy.params, update, policy=policy, batch=first)
    reverse = reverse_importance_change(policy.params, update, first, policy=policy)
    assert heldout.evaluation_fingerprint == snis.evaluation_fingerprint == first.fingerprint
    assert reverse.evaluation_fingerprint == first.fingerprint
    assert reverse.pairing().evaluation_fingerprint == first.fingerprint
    assert reverse.pairing(per_token=True).evaluation_fingerprint == first.fingerprint
    for result in (heldout, snis):
        assert json.loads(json.dumps(result.to_dict(), default=str))["evaluation_fingerprint"] == first.fingerprint


def test_crn_records_the_theta_side_draw():
    """CRN pairs f_θ⁺(y⁺) − f_θ(y) per prompt: y, the draw at θ, is E (δĤ₁(E) reads the same y); y⁺ is a function of
    E's prompts, uniforms and θ⁺, not a batch of its own."""
    batch, after = _batch(seed=8), _batch(seed=9)
    values = torch.rand(batch.B, batch.G, dtype=torch.float64)
    result = crn_from_draws(batch, after, values, values + 0.1)
    assert result.evaluation_fingerprint == batch.fingerprint != after.fingerprint
    assert result.to_dict()["evaluation_fingerprint"] == batch.fingerprint


# ------------------------------------------------------------------------------------------------ the refusals
def test_paired_difference_refuses_another_evaluation_batch(policy, step, two_evaluations):
    _, update = step
    first, second, heldout_first, heldout_second = two_evaluations
    realised = snis_delta_h(policy.params, update, policy=policy, batch=first)
    with pytest.raises(ValueError) as error:
        paired_difference(realised, heldout_second)
    _refused(error, first.fingerprint, second.fingerprint)
    paired = paired_difference(realised, heldout_first)
    assert math.isfinite(paired.difference)
    per_token = snis_delta_h(policy.params, update, policy=policy, batch=first, per_token=True)
    with pytest.raises(ValueError, match="same evaluation batch"):
        paired_difference(per_token, heldout_second)
    assert math.isfinite(paired_difference(per_token, heldout_first).difference)


def test_paired_difference_refuses_crn_of_another_evaluation_batch(policy, two_evaluations):
    first, second, heldout_first, heldout_second = two_evaluations
    values = torch.rand(first.B, first.G, dtype=torch.float64)
    crn = crn_from_draws(first, first, values, values + 0.01)
    with pytest.raises(ValueError) as error:
        paired_difference(crn, heldout_second)
    _refused(error, first.fingerprint, second.fingerprint)
    assert math.isfinite(paired_difference(crn, heldout_first).difference)


def test_the_callbacks_pairing_refuses_another_evaluation_batch(policy, step, two_evaluations):
    from funcprobe.trl import reverse_importance_change

    _, update = step
    first, second, heldout_first, heldout_second = two_evaluations
    change = reverse_importance_change(policy.params, update, first, policy=policy)
    for per_token in (False, True):
        with pytest.raises(ValueError) as error:
            paired_difference(change.pairing(per_token=per_token), heldout_second)
        _refused(error, first.fingerprint, second.fingerprint)
        assert math.isfinite(paired_difference(change.pairing(per_token=per_token), heldout_first).difference)


def test_results_of_unknown_evaluation_batch_are_paired_unchecked(policy, step, two_evaluations):
    """Hand-built results (no fingerprint) are paired as before: None on either side skips the check."""
    _, update = step
    first, _, _, heldout_second = two_evaluations
    realised = snis_delta_h(policy.params, update, policy=policy, batch=first)
    unknown = dataclasses.replace(realised, evaluation_fingerprint=None)
    assert math.isfinite(paired_difference(unknown, heldout_second).difference)
    assert math.isfinite(paired_difference(realised, dataclasses.replace(
        heldout_second, evaluation_fingerprint=None)).difference)


def test_snis_refuses_values_at_theta_from_another_batch(policy, step, two_evaluations):
    """``before=`` (S and the entropies at θ, computed once for a sweep) of another batch would be weighted against
    S(θ⁺) of this one."""
    _, update = step
    first, second, _, _ = two_evaluations
    before = values_before(policy.params, second, policy=policy, logprobs=True, entropies=True,
                           chunks=dict(seq_chunk=None, token_chunk=None, progress=False))
    with pytest.raises(ValueError) as error:
        snis_delta_h(policy.params, update, policy=policy, batch=first, before=before)
    _refused(error, first.fingerprint, second.fingerprint)
    own = values_before(policy.params, first, policy=policy, logprobs=True, entropies=True,
                        chunks=dict(seq_chunk=None, token_chunk=None, progress=False))
    assert snis_delta_h(policy.params, update, policy=policy, batch=first, before=own).deltaH == \
        snis_delta_h(policy.params, update, policy=policy, batch=first).deltaH


@pytest.fixture(scope="module")
def sweep_setting(policy):
    """An update batch's step at lr, and two evaluation samples of the same shape drawn at θ (seeds 3 and 4)."""
    lr = 1e-2
    prediction = delta_h1(policy.params, random_batch(4, 4, vocab_size=V, seed=1), policy=policy,
                          adam=AdamState.zeros(policy.params, lr=lr))
    prompts = ["1+2=", "3*4=", "9-5="]
    samples = [sample_batch(policy, policy.params, prompts, G=3, max_new_tokens=4, seed=seed, tokenizer=TOKENIZER,
                            reward_fn=lambda p, r, m: [[float(len(t)) for t in group] for group in r])
               for seed in (3, 4)]
    heldouts = [delta_h1_heldout(policy.params, prediction.step, s, policy=policy) for s in samples]
    return prediction, samples, heldouts, lr


@pytest.mark.parametrize("method", ["snis", "crn"])
def test_lr_sweep_refuses_heldout_of_another_evaluation_batch(policy, sweep_setting, method):
    prediction, (first, second), (heldout_first, heldout_second), lr = sweep_setting
    with pytest.raises(ValueError) as error:
        lr_sweep(policy.params, first, policy=policy, step=prediction.step, etas=[lr], heldout=heldout_second,
                 method=method)
    assert first.batch.fingerprint != second.batch.fingerprint
    _refused(error, first.batch.fingerprint, second.batch.fingerprint)
    sweep = lr_sweep(policy.params, first, policy=policy, step=prediction.step, etas=[lr], heldout=heldout_first,
                     method=method)
    assert sweep.rows[0].paired_difference is not None
    result = (sweep.snis or sweep.crn)[0]
    assert result.evaluation_fingerprint == first.batch.fingerprint


def test_crn_delta_h_records_the_samples_it_pairs(policy, step, sweep_setting):
    from funcprobe import crn_delta_h

    _, update = step
    _, (first, second), (heldout_first, heldout_second), _ = sweep_setting
    crn = crn_delta_h(policy.params, update, policy=policy, sample=first)
    assert crn.evaluation_fingerprint == first.batch.fingerprint
    with pytest.raises(ValueError, match="same evaluation batch"):
        paired_difference(crn, heldout_second)
    assert math.isfinite(paired_difference(crn, heldout_first).difference)


def test_lr_sweep_per_token_draws_the_per_token_first_order(policy, sweep_setting):
    """lr_sweep(per_token=True, heldout=...): the prediction line and the pairing are per token (δĤ₁(E)'s per-token
    values), and a δĤ₁(E) computed per response only is refused, before any pass, rather than drawn in the wrong
    unit beside a per-token realised change."""
    prediction, (first, _), (heldout_first, _), lr = sweep_setting
    with pytest.raises(ValueError, match="per_token=True.*per response only"):
        lr_sweep(policy.params, first, policy=policy, step=prediction.step, etas=[lr], heldout=heldout_first,
                 per_token=True)
    per_token = delta_h1_heldout(policy.params, prediction.step, first, policy=policy, per_token=True)
    sweep = lr_sweep(policy.params, first, policy=policy, step=prediction.step, etas=[lr / 2, lr],
                     heldout=per_token, per_token=True)
    for row in sweep.rows:
        assert row.predicted == pytest.approx(row.factor * per_token.deltaH1_per_token, rel=1e-12)
        assert row.predicted_se == pytest.approx(row.factor * per_token.se_per_token, rel=1e-12)
        assert row.paired_difference == pytest.approx(
            paired_difference(sweep.snis[sweep.rows.index(row)], per_token, scale=row.factor).difference, rel=1e-12)
    assert sweep.heldout == per_token.deltaH1_per_token
    assert per_token.deltaH1_per_token != pytest.approx(per_token.deltaH1)  # the two units differ here


def test_probe_refuses_a_repadded_copy_of_the_update_batch_as_e(policy):
    """Probe's "the update batch itself" check compares samples (fingerprints), not padded tensors: a copy laid
    out with other padding is still the update batch."""
    from funcprobe import AdamState, Probe, RolloutBatch

    update = random_batch(3, 4, vocab_size=V, seed=4, padding_side="left", extra_padding=3)
    copy = RolloutBatch.from_token_lists(*update.token_lists(), advantages=update.advantages,
                                         pad_token_id=update.pad_token_id, temperature=update.temperature,
                                         length_norm=update.length_norm)
    assert copy.L != update.L
    probe = Probe(policy, AdamState.zeros(policy.params, lr=1e-2), batch=update)
    with pytest.raises(ValueError, match="given the update batch itself"):
        probe.snis_delta_h(policy.params, policy.params, copy)
