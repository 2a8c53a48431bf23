"""ΔH by common random numbers (spec §6, funcprobe.realised.crn_delta_h), and the zero step on one S path."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from funcprobe import Policy, crn_delta_h, redraw, sample_batch, snis_delta_h
from funcprobe.batch import RolloutBatch
from funcprobe.realised import LogprobMismatchWarning, integrand_values
from funcprobe.report import to_jsonable
from funcprobe.testing import char_tokenizer, tiny_peft_model

TOKENIZER = char_tokenizer()
PROMPTS = ["1+1=", "22*3=?", "7", "(5-2)*4="]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def zero_reward(prompts, responses, meta):
    return [[0.0] * len(group) for group in responses]


def _sample(policy, params=None, **options):
    options = {"G": 4, "reward_fn": zero_reward, "max_new_tokens": 10, "seed": 0, "tokenizer": TOKENIZER, **options}
    return sample_batch(policy, policy.params if params is None else params, PROMPTS, **options)


@pytest.fixture(scope="module")
def policy64():
    return Policy.from_peft(tiny_peft_model("qwen2", vocab_size=len(TOKENIZER), dtype=torch.float64, seed=4,
                                            hidden_size=16, num_layers=1))


def _moved(params, scale, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {n: t + scale * torch.randn(t.shape, generator=generator, dtype=t.dtype) for n, t in params.items()}


# ---------------------------------------------------------------------------------------------- the zero step
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_step_gives_exactly_zero_on_a_kv_cache_batch(dtype):
    """θ⁺ = θ: ΔĤ == 0 exactly, by every importance-sampling variant and by CRN, on a batch sampled with the KV
    cache — in bfloat16 too, where the sampler's recorded S differs from the teacher-forced S by far more than the
    entropy changes of small steps (the recorded S is only checked, spec §6)."""
    policy = Policy.from_peft(tiny_peft_model("qwen2", vocab_size=len(TOKENIZER), dtype=dtype, seed=4,
                                              hidden_size=32, num_layers=2))
    sampled = _sample(policy, max_new_tokens=12)
    assert sampled.timings["kv_cache"] == 1.0
    same = {name: tensor.clone() for name, tensor in policy.params.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", LogprobMismatchWarning)  # rounding-sized gaps must not warn
        for normalize in ("prompt", "global", "none"):
            for estimator in ("sequence", "rao_blackwell"):
                result = snis_delta_h(policy.params, same, policy=policy, batch=sampled.batch, normalize=normalize,
                                      estimator=estimator)
                assert result.deltaH == 0.0 and result.H_after == result.H_before, (normalize, estimator)
        crn = crn_delta_h(policy.params, same, policy=policy, sample=sampled)
    assert crn.deltaH == 0.0 and crn.se == 0.0 and crn.changed_fraction == 0.0 and crn.H_after == crn.H_before
    assert crn.reliable  # nothing moved: exact, not "too few changed draws"
    gap = result.recorded_logprobs.max_abs_diff
    assert result.recorded_logprobs.ok and gap > 0  # the sampler's path does round differently
    if dtype == torch.bfloat16:
        assert gap > 1e-4


# ---------------------------------------------------------------------------------------------- the estimator
def test_crn_is_the_mean_difference_of_entropies_along_the_two_paths(policy64):
    """Against a naive reference: y⁺ redrawn with the same uniforms, each sequence's summed next-token entropies
    computed one sequence at a time, differences averaged per prompt and over prompts, SE over prompts."""
    params = policy64.params
    sampled = _sample(policy64)
    update = _moved(params, 0.05)
    result = crn_delta_h(params, update, policy=policy64, sample=sampled)
    after = redraw(policy64, update, sampled.spec).batch

    def one_by_one(p, batch: RolloutBatch):
        return torch.tensor([[float(policy64.token_entropies(p, batch.select_prompts([n])).reshape(-1)[g])
                              for g in range(batch.G)] for n in range(batch.B)], dtype=torch.float64)

    difference = one_by_one(update, after) - one_by_one(params, sampled.batch)
    per_prompt = difference.mean(dim=1)
    assert result.deltaH == pytest.approx(float(per_prompt.mean()), rel=1e-12, abs=1e-14)
    assert result.se == pytest.approx(float(per_prompt.std() / math.sqrt(len(PROMPTS))), rel=1e-10)
    assert list(result.deltaH_per_prompt) == pytest.approx(per_prompt.tolist(), rel=1e-12, abs=1e-14)
    changed = [[float(not torch.equal(after.input_ids[n, g][after.response_mask[n, g]],
                                      sampled.batch.input_ids[n, g][sampled.batch.response_mask[n, g]]))
                for g in range(4)] for n in range(len(PROMPTS))]
    assert result.changed_fraction == pytest.approx(sum(map(sum, changed)) / 16)
    assert 0 < result.changed_fraction < 1
    # The −S integrand (for comparison): the mean of −S⁺(y⁺) + S(y).
    plain = crn_delta_h(params, update, policy=policy64, sample=sampled, integrand="sequence")
    expected = (-policy64.sequence_logprobs(update, after) + policy64.sequence_logprobs(params, sampled.batch)).mean()
    assert plain.deltaH == pytest.approx(float(expected), rel=1e-12) and plain.integrand == "sequence"
    # A precomputed integrand at θ (as a sweep passes it) changes nothing.
    before = integrand_values(policy64, params, sampled.batch)
    assert crn_delta_h(params, update, policy=policy64, sample=sampled, before=before).deltaH == result.deltaH
    data = json.loads(json.dumps(to_jsonable(result.to_dict()), allow_nan=False))
    assert data["method"] == "crn" and len(data["changed_per_prompt"]) == len(PROMPTS)
    assert "common random numbers" in str(result) and "draws changed" in str(result)


def test_redraws_change_more_as_the_step_grows_and_few_changes_are_flagged(policy64):
    """With fewer than CRN_MIN_CHANGED changed draws the jump part of ΔH rests on a handful of values: flagged."""
    from funcprobe.realised import CRN_MAX_TOP_SHARE, CRN_MIN_CHANGED

    params = policy64.params
    sampled = _sample(policy64, G=8)
    results = [crn_delta_h(params, _moved(params, scale), policy=policy64, sample=sampled)
               for scale in (1e-4, 0.05, 1.0)]
    fractions = [r.changed_fraction for r in results]
    assert fractions[0] <= fractions[1] <= fractions[2] and fractions[0] < 0.2 and fractions[2] > 0.5
    for result in results:
        assert result.changed_count == round(result.changed_fraction * 32)
        assert 0 <= result.top_share <= 1
        assert result.reliable == (result.changed_count >= CRN_MIN_CHANGED and result.top_share <= CRN_MAX_TOP_SHARE)
    assert not results[0].reliable and "draws changed" in results[0].reason and "reliable: NO" in str(results[0])


def test_a_heavy_tailed_difference_is_flagged():
    """One draw carrying most of the variance of the differences (a path switch) flags the SE as unreliable."""
    from funcprobe.realised.crn import CRN_MAX_TOP_SHARE, _crn_verdict

    calm = torch.full((4, 8), 0.01, dtype=torch.float64) + 1e-3 * torch.arange(32, dtype=torch.float64).reshape(4, 8)
    assert _crn_verdict(calm, changed_count=20, num_sequences=32)[0]
    spiked = calm.clone()
    spiked[2, 5] = 6.5
    reliable, reason, share = _crn_verdict(spiked, changed_count=20, num_sequences=32)
    assert not reliable and share > CRN_MAX_TOP_SHARE and "heavy tail" in reason


def test_refusals(policy64):
    params = policy64.params
    sampled = _sample(policy64)
    with pytest.raises(ValueError, match="needs the evaluation sample with its draw"):
        crn_delta_h(params, params, policy=policy64, sample=sampled.batch)
    with pytest.raises(ValueError, match="integrand must be one of"):
        crn_delta_h(params, params, policy=policy64, sample=sampled, integrand="entropy")
    with pytest.raises(ValueError, match=r"before= has shape \(2, 2\)"):
        crn_delta_h(params, params, policy=policy64, sample=sampled, before=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="needs policy="):
        crn_delta_h(params, params, sample=sampled, policy=None)
    with pytest.raises(ValueError, match=r"update must hold exactly"):
        crn_delta_h(params, {}, policy=policy64, sample=sampled)
