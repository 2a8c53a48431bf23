"""sample_batch: exact sampling from π_θ with a functional KV-cached decoder (spec §0)."""

from __future__ import annotations

import math

import pytest
import torch

from funcprobe import Policy
from funcprobe.rewards import answer_match
from funcprobe.objective import compute_advantages
from funcprobe.sampling import SampledBatch, prompt_generator, sample_batch
from funcprobe.testing import char_tokenizer, tiny_peft_model

from conftest import assert_same_state, module_state

TOKENIZER = char_tokenizer()
VOCAB = len(TOKENIZER)  # 80
PROMPTS = ["1+1=", "22*3=?", "7", "(5-2)*4="]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Decoding is many tiny forwards; on a shared 2-core machine a second intra-op thread only adds contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def lengths_reward(prompts, responses, meta):
    return [[float(len(text)) for text in group] for group in responses]


def draw(policy, params=None, prompts=PROMPTS, **options):
    options = {"G": 3, "reward_fn": lengths_reward, "max_new_tokens": 8, "seed": 0, "tokenizer": TOKENIZER,
               **options}
    return sample_batch(policy, policy.params if params is None else params, prompts, **options)


@pytest.fixture(scope="module")
def policy32():
    return Policy.from_peft(tiny_peft_model("qwen2", vocab_size=VOCAB, seed=7), temperature=0.8)


def assert_same_batch(a: SampledBatch, b: SampledBatch, *, exact_logprobs: bool = True):
    for name in ("input_ids", "attention_mask", "response_mask", "advantages", "length_norm", "rewards"):
        assert torch.equal(getattr(a.batch, name), getattr(b.batch, name)), name
    if exact_logprobs:
        assert torch.equal(a.batch.logprobs, b.batch.logprobs)
    else:
        torch.testing.assert_close(a.batch.logprobs, b.batch.logprobs, rtol=1e-6, atol=2e-5)
    assert a.responses == b.responses and a.prompts == b.prompts and a.eos_count == b.eos_count


# -------------------------------------------------------------------------------------- S recorded while sampling
@pytest.mark.parametrize("arch,dtype,tolerance", [("qwen2", torch.float32, 2e-5), ("llama", torch.float32, 2e-5),
                                                  ("qwen2", torch.float64, 1e-9)])
def test_recorded_logprobs_equal_teacher_forced(arch, dtype, tolerance):
    policy = Policy.from_peft(tiny_peft_model(arch, vocab_size=VOCAB, dtype=dtype, seed=2), temperature=0.7,
                              logsoftmax_dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    sampled = draw(policy, max_new_tokens=10, prompt_chunk=3)
    batch = sampled.batch
    assert batch.device.type == "cpu" and batch.logprobs.dtype == torch.float64
    teacher_forced = policy.sequence_logprobs(policy.params, batch)
    assert float((batch.logprobs - teacher_forced).abs().max()) < tolerance
    # The KV cache changes nothing but the cost.
    recomputed = draw(policy, max_new_tokens=10, prompt_chunk=3, kv_cache=False)
    assert torch.equal(recomputed.batch.input_ids, batch.input_ids)
    assert float((recomputed.batch.logprobs - teacher_forced).abs().max()) < tolerance
    assert sampled.timings["kv_cache"] == 1.0 and recomputed.timings["kv_cache"] == 0.0


def test_functional_params_are_used_and_module_untouched(policy32):
    before, params_before = module_state(policy32.module), {n: t.clone() for n, t in policy32.params.items()}
    generator = torch.Generator().manual_seed(0)
    shifted = {name: tensor + 0.5 * torch.randn(tensor.shape, generator=generator)
               for name, tensor in policy32.params.items()}
    base = draw(policy32)
    moved = draw(policy32, shifted)
    assert not torch.equal(base.batch.input_ids, moved.batch.input_ids)
    # S recorded at θ' is S(θ') of the tokens drawn, not S(θ).
    at_shifted = policy32.sequence_logprobs(shifted, moved.batch)
    assert float((moved.batch.logprobs - at_shifted).abs().max()) < 2e-5
    assert float((moved.batch.logprobs - policy32.sequence_logprobs(policy32.params, moved.batch)).abs().max()) > 1e-2
    assert_same_state(policy32.module, before)
    assert all(torch.equal(policy32.params[n], t) for n, t in params_before.items())
    assert not policy32.module.training


# ---------------------------------------------------------------------------------------------- reproducibility
def test_seed_reproducible_and_independent_of_prompt_chunk(policy32):
    rng_before = torch.get_rng_state()
    first = draw(policy32, prompt_chunk=8)
    assert torch.equal(torch.get_rng_state(), rng_before), "the global RNG must not be used"
    assert_same_batch(first, draw(policy32, prompt_chunk=8))
    # Another chunking pads prompts differently (float rounding only): same tokens, S equal to rounding.
    assert_same_batch(first, draw(policy32, prompt_chunk=1), exact_logprobs=False)
    assert_same_batch(first, draw(policy32, prompt_chunk=3), exact_logprobs=False)
    other = draw(policy32, seed=1)
    assert not torch.equal(other.batch.input_ids, first.batch.input_ids)


def test_token_id_prompts_and_sharding(policy32):
    full = draw(policy32)
    ids = [TOKENIZER(text)["input_ids"] for text in PROMPTS]
    assert_same_batch(full, draw(policy32, prompts=ids))
    # A shard sampled with its global offset reproduces its rows of the full batch.
    shard = draw(policy32, prompts=PROMPTS[2:], first_prompt_index=2)
    assert shard.responses == full.responses[2:]
    torch.testing.assert_close(shard.batch.logprobs, full.batch.logprobs[2:], rtol=1e-6, atol=2e-5)
    assert isinstance(prompt_generator(0, 2), torch.Generator)


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("option", [{"top_p": 0.9}, {"top_k": 5}])
def test_truncated_sampling_refused_with_reason(policy32, option):
    with pytest.raises(ValueError, match="does not draw from π_θ.*bias every estimator"):
        draw(policy32, **option)


def test_temperature_must_be_the_policys(policy32):
    with pytest.raises(ValueError, match="Build the policy with that temperature"):
        draw(policy32, temperature=1.0)
    draw(policy32, temperature=0.8, max_new_tokens=1)  # the policy's τ is accepted


def test_bad_arguments_refused(policy32):
    with pytest.raises(ValueError, match="G must be"):
        draw(policy32, G=1)
    with pytest.raises(ValueError, match="length_norm"):
        draw(policy32, length_norm="tokens")
    with pytest.raises(ValueError, match="scale_rewards"):
        draw(policy32, scale_rewards="rloo")
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        draw(policy32, prompts=[[5, VOCAB]])
    with pytest.raises(ValueError, match="missing"):
        draw(policy32, params={})


# ---------------------------------------------------------------------------------------------- EOS
def test_eos_ends_responses_and_later_tokens_are_padding():
    # A 6-token vocabulary: EOS (id 2) is drawn about one step in six, so some responses end and some run out.
    policy = Policy.from_peft(tiny_peft_model("qwen2", vocab_size=6, seed=3))
    prompts = [[4, 5, 4], [5], [1, 4]]
    sampled = draw(policy, prompts=prompts, G=6, max_new_tokens=6, prompt_chunk=2)
    batch = sampled.batch
    P = max(map(len, prompts))
    eos_seen = 0
    for n in range(batch.B):
        for g in range(batch.G):
            response = batch.response_mask[n, g]
            assert not response[:P].any()
            length = int(response.sum())
            assert response[P:P + length].all() and not response[P + length:].any()  # contiguous from column P
            tokens = batch.input_ids[n, g, P:P + length].tolist()
            ended = 2 in tokens
            if ended:
                assert tokens.index(2) == length - 1  # EOS is the last response token, counted in the mask
                eos_seen += 1
            else:
                assert length == 6  # ran out of budget
            assert not batch.attention_mask[n, g, P + length:].any()
            assert (batch.input_ids[n, g, P + length:] == TOKENIZER.pad_token_id).all()
            kept = tokens[:-1] if ended else tokens
            assert sampled.responses[n][g] == TOKENIZER.decode(kept, skip_special_tokens=True)
    assert sampled.eos_count == eos_seen and 0 < eos_seen < batch.B * batch.G
    assert sampled.truncated_count == batch.B * batch.G - eos_seen
    # Dropping ended rows from the KV cache changes nothing.
    recomputed = draw(policy, prompts=prompts, G=6, max_new_tokens=6, prompt_chunk=2, kv_cache=False)
    assert torch.equal(recomputed.batch.input_ids, batch.input_ids)
    assert float((policy.sequence_logprobs(policy.params, batch) - batch.logprobs).abs().max()) < 2e-5


# ---------------------------------------------------------------------------------------------- distribution
def test_one_token_frequencies_match_softmax():
    peft_model = tiny_peft_model("qwen2", vocab_size=8, seed=5)
    with torch.no_grad():
        peft_model.get_base_model().lm_head.weight.mul_(5.0)  # spread the next-token distribution
    policy = Policy.from_peft(peft_model, temperature=0.7)
    prompts, N = [[4, 5], [6]], 2000
    sampled = draw(policy, prompts=prompts, G=N, max_new_tokens=1, prompt_chunk=2)
    batch = sampled.batch
    for n, prompt in enumerate(prompts):
        with torch.no_grad():
            logits = peft_model(input_ids=torch.tensor([prompt])).logits[0, -1]
        probs = torch.softmax(logits.double() / 0.7, dim=0)
        assert float(probs.max()) < 0.9  # a non-trivial distribution
        tokens = batch.input_ids[n, :, -1]
        frequencies = torch.bincount(tokens, minlength=8).double() / N
        sd = (probs * (1 - probs) / N).sqrt()
        assert ((frequencies - probs).abs() <= 4 * sd + 1e-12).all(), (frequencies, probs)
        torch.testing.assert_close(batch.logprobs[n], probs.log()[tokens], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- rewards, advantages
def test_rewards_advantages_and_length_norm(policy32):
    sampled = draw(policy32, max_new_tokens=6)
    batch = sampled.batch
    expected = torch.tensor([[float(len(t)) for t in group] for group in sampled.responses], dtype=torch.float64)
    assert torch.equal(batch.rewards, expected)
    # Advantages are computed as TRL computes them, in float32.
    torch.testing.assert_close(batch.advantages, expected - expected.mean(1, keepdim=True), rtol=1e-6, atol=1e-6)
    assert torch.equal(batch.length_norm, torch.full((len(PROMPTS),), 6.0, dtype=torch.float64))
    scaled = draw(policy32, max_new_tokens=6, scale_rewards="group", length_norm=2.5)
    centred = expected - expected.mean(1, keepdim=True)
    torch.testing.assert_close(scaled.batch.advantages, centred / (expected.std(1, keepdim=True) + 1e-4), rtol=1e-6,
                               atol=1e-6)
    assert torch.equal(scaled.batch.length_norm, torch.full((len(PROMPTS),), 2.5, dtype=torch.float64))
    flat, info = compute_advantages(torch.ones(2, 3), scale_rewards="group", warn=False)
    assert torch.equal(flat, torch.zeros(2, 3, dtype=torch.float64)) and info.all_groups_zero_variance
    assert set(sampled.timings) >= {"prefill_s", "decode_s", "reward_s", "total_s", "tokens_per_s"}


def test_reward_function_output_validated(policy32):
    def wrong_shape(prompts, responses, meta):
        return [[0.0] * 2 for _ in responses]

    def not_finite(prompts, responses, meta):
        return torch.full((len(responses), len(responses[0])), math.nan)

    with pytest.raises(ValueError, match="wrong_shape.*shape"):
        draw(policy32, reward_fn=wrong_shape, max_new_tokens=1)
    with pytest.raises(ValueError, match="not_finite.*non-finite"):
        draw(policy32, reward_fn=not_finite, max_new_tokens=1)
    # Built-ins by name, with meta passed through.
    sampled = draw(policy32, reward_fn="answer", meta={"answers": ["2", "66", "7", "12"]}, max_new_tokens=2)
    assert torch.equal(sampled.batch.rewards,
                       torch.tensor(answer_match(sampled.prompts, sampled.responses, {"answers": ["2", "66", "7",
                                                                                                  "12"]}),
                                    dtype=torch.float64))


# ---------------------------------------------------------------------------------------------- mask-safe layout
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("kv_cache", [True, False])
def test_prompts_of_different_lengths_decode_together_with_eager_attention(dtype, tolerance, kv_cache):
    """No forward sees a leading pad: with left-padded prompts, eager attention in float64 gave NaN on the fully
    masked pad rows, which reached the real rows ("non-finite logits while sampling")."""
    policy = Policy.from_peft(tiny_peft_model("llama", vocab_size=VOCAB, dtype=dtype, seed=2,
                                              attn_implementation="eager"))
    sampled = draw(policy, prompts=["1+1=", "22*3=?", "7"], max_new_tokens=6, prompt_chunk=3, kv_cache=kv_cache)
    teacher_forced = policy.sequence_logprobs(policy.params, sampled.batch)
    assert float((sampled.batch.logprobs - teacher_forced).abs().max()) < tolerance
    # The same draw one prompt at a time (no padding at all): the same tokens.
    alone = draw(policy, prompts=["1+1=", "22*3=?", "7"], max_new_tokens=6, prompt_chunk=1, kv_cache=kv_cache)
    assert torch.equal(alone.batch.input_ids, sampled.batch.input_ids)


# ---------------------------------------------------------------------------------------------- stop tokens
def test_stop_ids_are_the_union_of_tokenizer_generation_config_and_extra():
    from funcprobe.sampling import collect_stop_ids

    model = tiny_peft_model("qwen2", vocab_size=6, seed=3)
    model.get_base_model().generation_config.eos_token_id = [2, 5]
    policy = Policy.from_peft(model)
    assert collect_stop_ids(TOKENIZER, policy) == (2, 5)
    assert collect_stop_ids(TOKENIZER, policy, extra=[4, 5]) == (2, 4, 5)
    assert collect_stop_ids(TOKENIZER, None, extra=3) == (2, 3)
    with pytest.raises(ValueError, match="no stop token.*--stop-token"):
        collect_stop_ids(None, None)
    # Responses end at the first of any stop id, which is kept as their last token.
    prompts = [[4, 1], [1], [3, 4]]
    sampled = draw(policy, prompts=prompts, G=8, max_new_tokens=8)
    batch, P = sampled.batch, 2
    ended = {2: 0, 5: 0}
    for n in range(batch.B):
        for g in range(batch.G):
            length = int(batch.response_mask[n, g].sum())
            tokens = batch.input_ids[n, g, P:P + length].tolist()
            stops = [i for i, t in enumerate(tokens) if t in (2, 5)]
            if stops:
                assert stops == [length - 1]
                ended[tokens[-1]] += 1
            else:
                assert length == 8
    assert ended[2] > 0 and ended[5] > 0 and sampled.eos_count == ended[2] + ended[5]
    assert sampled.spec.stop_token_ids == (2, 5)
    more = draw(policy, prompts=prompts, G=8, max_new_tokens=8, stop_token_ids=[4])
    assert more.spec.stop_token_ids == (2, 4, 5)
    assert int(more.batch.response_lengths.sum()) < int(sampled.batch.response_lengths.sum())


# ---------------------------------------------------------------------------------------------- common random numbers
def test_redraw_reproduces_the_draw_and_shares_its_uniforms(policy32):
    """redraw at θ gives the batch back bit for bit; at θ⁺ near θ most responses are unchanged, and where one
    changes, it first differs at a position whose token the step moved across the shared uniform."""
    from funcprobe.sampling import redraw

    sampled = draw(policy32, prompts=PROMPTS, G=4, max_new_tokens=8, prompt_index=[7, 3, 3, 0])
    again = redraw(policy32, policy32.params, sampled.spec)
    for name in ("input_ids", "attention_mask", "response_mask", "logprobs", "prompt_index"):
        assert torch.equal(getattr(again.batch, name), getattr(sampled.batch, name)), name
    assert again.batch.temperature == sampled.batch.temperature == 0.8
    assert sampled.batch.prompt_index.tolist() == [7, 3, 3, 0]
    generator = torch.Generator().manual_seed(1)
    for scale, low, high in ((1e-4, 0.9, 1.0), (0.3, 0.0, 0.9)):
        moved = {n: t + scale * torch.randn(t.shape, generator=generator) for n, t in policy32.params.items()}
        other = redraw(policy32, moved, sampled.spec)
        same = (other.batch.input_ids == sampled.batch.input_ids).all(dim=-1).double().mean()
        assert low <= float(same) <= high, (scale, float(same))
    with pytest.raises(ValueError, match="prompt_index has 2 entries for 4 prompts"):
        draw(policy32, prompt_index=[0, 1])


# ------------------------------------------------------------------------------------------------ distributed shards
def test_merge_batches_lays_shards_out_as_one_batch_and_keeps_every_field():
    """Shards of different widths merge into the batch the sampler would have built from all the prompts at once,
    token_advantages included (they were dropped before)."""
    from funcprobe.batch import AdvantageRecipe, RolloutBatch
    from funcprobe.sampling import merge_batches

    prompts = [[5, 6, 7], [8], [9, 9]]
    completions = [[[1, 2], [3]], [[4, 4, 4, 4], [1]], [[2], [3, 3]]]
    token_advantages = [[[0.5 * k for k in range(len(ids))] for ids in group] for group in completions]
    recipe = AdvantageRecipe("group", (1.0,))

    def build(rows):
        return RolloutBatch.from_token_lists(
            [prompts[n] for n in rows], [completions[n] for n in rows],
            advantages=torch.tensor([[n, -n] for n in rows], dtype=torch.float64), pad_token_id=0, temperature=0.9,
            length_norm=torch.tensor([4.0 + n for n in rows]), logprobs=-torch.ones(len(rows), 2),
            rewards=torch.ones(len(rows), 2), prompt_index=list(rows),
            token_advantages=[token_advantages[n] for n in rows], advantage_recipe=recipe)

    merged, whole = merge_batches([build([0]), build([1, 2])]), build([0, 1, 2])
    assert merged.L == 3 + 4 and merged.advantage_recipe == recipe and merged.temperature == 0.9
    for name in ("input_ids", "attention_mask", "response_mask", "advantages", "length_norm", "logprobs", "rewards",
                 "prompt_index", "token_advantages"):
        assert torch.equal(getattr(merged, name), getattr(whole, name)), name
