"""Policy: S_{n,g} of spec §1 against the naive reference, invariances, gradients, purity and the LoRA-only guard."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from funcprobe import Policy, RolloutBatch, load_policy
from funcprobe.testing import random_batch, tiny_causal_lm, tiny_peft_model

from conftest import assert_same_state, module_state, naive_sequence_logprobs

VOCAB = 64
HYPOTHESIS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def relative_error(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def set_module_lora(peft_model, params):
    """Copy a params dict into a module's LoRA tensors (for the naive reference on a deep copy)."""
    named = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, tensor in params.items():
            named[name].copy_(tensor)


@pytest.fixture(scope="module")
def batch():
    return random_batch(3, 4, vocab_size=VOCAB, prompt_len=(2, 5), response_len=(1, 6), seed=11)


# ------------------------------------------------------------------------------------------ agreement with naive
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_sequence_logprobs_match_naive_full_log_softmax(arch, temperature, dtype, tolerance, batch):
    peft_model = tiny_peft_model(arch, dtype=dtype, seed=5)
    policy = Policy.from_peft(peft_model, temperature=temperature,
                              logsoftmax_dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    batch = batch.replace(temperature=temperature)
    ours = policy.sequence_logprobs(policy.params, batch, seq_chunk=5, token_chunk=3)
    with torch.no_grad():
        naive = naive_sequence_logprobs(peft_model, batch, temperature=temperature,
                                        logsoftmax_dtype=policy.logsoftmax_dtype)
    assert ours.dtype == torch.float64 and ours.shape == (batch.B, batch.G)
    assert relative_error(ours, naive) < tolerance


def test_log_softmax_dtype_follows_a_wider_model(qwen2_peft_f64, qwen2_peft_f32):
    """Default: float32 for float32/bfloat16 models, float64 for a float64 model (no float32 rounding left)."""
    assert Policy.from_peft(qwen2_peft_f64).logsoftmax_dtype == torch.float64
    assert Policy.from_peft(qwen2_peft_f32).logsoftmax_dtype == torch.float32
    bf16 = tiny_peft_model("qwen2", dtype=torch.bfloat16, seed=4)
    assert Policy.from_peft(bf16).logsoftmax_dtype == torch.float32
    assert Policy.from_peft(qwen2_peft_f64, logsoftmax_dtype=torch.float32).logsoftmax_dtype == torch.float32


def test_a_batch_drawn_at_another_temperature_is_refused(qwen2_peft_f64, batch):
    policy = Policy.from_peft(qwen2_peft_f64, temperature=0.7)
    with pytest.raises(ValueError, match=r"drawn at temperature τ=1 but this policy .* τ=0\.7.*temperature=1"):
        policy.sequence_logprobs(policy.params, batch)


def test_float64_log_softmax_option_on_a_float32_model(qwen2_peft_f32, batch):
    policy = Policy.from_peft(qwen2_peft_f32, logsoftmax_dtype=torch.float64)
    ours = policy.sequence_logprobs(policy.params, batch, token_chunk=4)
    with torch.no_grad():
        naive = naive_sequence_logprobs(qwen2_peft_f32, batch, logsoftmax_dtype=torch.float64)
    assert relative_error(ours, naive) < 1e-6


def test_logprobs_depend_on_params(qwen2_peft_f64, batch):
    """A different params dict gives different S, equal to the naive S of a module holding those params."""
    policy = Policy.from_peft(qwen2_peft_f64, logsoftmax_dtype=torch.float64)
    shifted = {name: tensor + 0.05 * torch.randn_like(tensor) for name, tensor in policy.params.items()}
    ours = policy.sequence_logprobs(shifted, batch)
    reference_model = copy.deepcopy(qwen2_peft_f64)
    set_module_lora(reference_model, shifted)
    with torch.no_grad():
        naive = naive_sequence_logprobs(reference_model, batch, logsoftmax_dtype=torch.float64)
    assert relative_error(ours, naive) < 1e-10
    assert (ours - policy.sequence_logprobs(policy.params, batch)).abs().max() > 1e-4


# --------------------------------------------------------------------------------------------------- invariances
@HYPOTHESIS
@given(seq_chunk=st.integers(1, 13), token_chunk=st.integers(1, 40))
def test_logprobs_invariant_to_chunk_sizes(qwen2_peft_f64, batch, seq_chunk, token_chunk):
    policy = Policy.from_peft(qwen2_peft_f64, logsoftmax_dtype=torch.float64)
    reference = policy.sequence_logprobs(policy.params, batch, seq_chunk=batch.num_sequences, token_chunk=1000)
    chunked = policy.sequence_logprobs(policy.params, batch, seq_chunk=seq_chunk, token_chunk=token_chunk)
    assert relative_error(chunked, reference) < 1e-12


@HYPOTHESIS
@given(padding_side=st.sampled_from(["left", "right"]), extra_padding=st.integers(0, 6), seed=st.integers(0, 50))
def test_logprobs_invariant_to_padding(qwen2_peft_f64, padding_side, extra_padding, seed):
    policy = Policy.from_peft(qwen2_peft_f64, logsoftmax_dtype=torch.float64)
    tight = random_batch(2, 3, vocab_size=VOCAB, seed=seed, padding_side="left")
    padded = random_batch(2, 3, vocab_size=VOCAB, seed=seed, padding_side=padding_side, extra_padding=extra_padding)
    assert torch.equal(tight.response_lengths, padded.response_lengths)
    a = policy.sequence_logprobs(policy.params, tight, seq_chunk=2)
    b = policy.sequence_logprobs(policy.params, padded, seq_chunk=4)
    assert relative_error(b, a) < 1e-10


@HYPOTHESIS
@given(permutation=st.permutations(range(4)))
def test_logprobs_equivariant_to_prompt_order(qwen2_peft_f64, permutation):
    policy = Policy.from_peft(qwen2_peft_f64, logsoftmax_dtype=torch.float64)
    batch = random_batch(4, 2, vocab_size=VOCAB, seed=7)
    reference = policy.sequence_logprobs(policy.params, batch, seq_chunk=3)
    order = torch.tensor(permutation)
    permuted = policy.sequence_logprobs(policy.params, batch.select_prompts(order), seq_chunk=3)
    assert relative_error(permuted, reference[order]) < 1e-12


# ------------------------------------------------------------------------------------------------------ gradients
def naive_weighted_grad(peft_model, params, batch, weights, **options):
    """∇ Σ c S by ordinary autograd through the full-vocabulary reference, on a deep copy of the module."""
    reference_model = copy.deepcopy(peft_model)
    set_module_lora(reference_model, params)
    named = dict(reference_model.named_parameters())
    for name in params:
        named[name].requires_grad_(True)
    loss = (naive_sequence_logprobs(reference_model, batch, **options) * weights).sum()
    grads = torch.autograd.grad(loss, [named[name] for name in params])
    return {name: grad.to(torch.float64) for name, grad in zip(params, grads)}


def max_grad_error(grads, reference):
    scale = max(float(g.abs().max()) for g in reference.values())
    return max(float((grads[n] - reference[n]).abs().max()) for n in reference) / scale


@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_grads_match_naive_autograd(qwen2_peft_f64, batch, temperature):
    policy = Policy.from_peft(qwen2_peft_f64, logsoftmax_dtype=torch.float64, temperature=temperature)
    batch = batch.replace(temperature=temperature)
    weights = torch.randn(batch.B, batch.G, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    reference = naive_weighted_grad(qwen2_peft_f64, policy.params, batch, weights, temperature=temperature,
                                    logsoftmax_dtype=torch.float64)
    assert max(float(g.abs().max()) for g in reference.values()) > 1e-3  # the test can fail: gradients are non-zero

    # torch.func.grad straight through sequence_logprobs(with_grad=True)
    def weighted_sum(params):
        return (policy.sequence_logprobs(params, batch, with_grad=True, seq_chunk=5, token_chunk=4) * weights).sum()

    func_grads = torch.func.grad(weighted_sum)(policy.params)
    assert max_grad_error(func_grads, reference) < 1e-10

    # chunked vjps accumulated on the CPU, two weight sets at once
    logprobs, (grads, grads_neg) = policy.logprob_grads(policy.params, batch, torch.stack([weights, -2 * weights]),
                                                        seq_chunk=3, token_chunk=2)
    assert max_grad_error(grads, reference) < 1e-10
    assert max_grad_error(grads_neg, {n: -2 * g for n, g in reference.items()}) < 1e-10
    assert torch.allclose(logprobs, policy.sequence_logprobs(policy.params, batch), rtol=0, atol=1e-12)


@HYPOTHESIS
@given(seq_chunk=st.integers(1, 12), token_chunk=st.integers(1, 30))
def test_grads_invariant_to_chunk_sizes(qwen2_peft_f64, batch, seq_chunk, token_chunk):
    policy = Policy.from_peft(qwen2_peft_f64, logsoftmax_dtype=torch.float64)
    weights = torch.linspace(-1, 1, batch.num_sequences, dtype=torch.float64).reshape(batch.B, batch.G)
    _, (reference,) = policy.logprob_grads(policy.params, batch, weights, seq_chunk=batch.num_sequences,
                                           token_chunk=1000)
    _, (chunked,) = policy.logprob_grads(policy.params, batch, weights, seq_chunk=seq_chunk, token_chunk=token_chunk)
    assert max_grad_error(chunked, reference) < 1e-11


def test_grads_with_embedding_lora_match_naive(batch):
    peft_model = tiny_peft_model("llama", dtype=torch.float64, target_modules=("embed_tokens", "q_proj"), seed=9)
    policy = Policy.from_peft(peft_model, logsoftmax_dtype=torch.float64)
    assert any("lora_embedding_A" in name for name in policy.params)
    weights = torch.randn(batch.B, batch.G, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    reference = naive_weighted_grad(peft_model, policy.params, batch, weights, logsoftmax_dtype=torch.float64)
    _, (grads,) = policy.logprob_grads(policy.params, batch, weights, seq_chunk=4, token_chunk=3)
    assert max_grad_error(grads, reference) < 1e-10


def test_token_entropies_match_full_softmax(qwen2_peft_f64, batch):
    policy = Policy.from_peft(qwen2_peft_f64, logsoftmax_dtype=torch.float64, temperature=0.9)
    batch = batch.replace(temperature=0.9)
    ours = policy.token_entropies(policy.params, batch, seq_chunk=5, token_chunk=3)
    B, G, L = batch.input_ids.shape
    attention_mask = batch.attention_mask.reshape(B * G, L).long()
    with torch.no_grad():
        logits = qwen2_peft_f64(input_ids=batch.input_ids.reshape(B * G, L), attention_mask=attention_mask,
                                position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0)).logits
    log_probs = torch.log_softmax(logits / 0.9, dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)[:, :-1]
    naive = (entropy * batch.response_mask.reshape(B * G, L)[:, 1:]).sum(-1).reshape(B, G)
    assert relative_error(ours, naive) < 1e-10


# --------------------------------------------------------------------------------------------------------- purity
def test_calls_leave_module_params_and_batch_bit_identical(qwen2_peft_f32, batch):
    policy = Policy.from_peft(qwen2_peft_f32)
    module_before = module_state(qwen2_peft_f32)
    params_before = {n: t.clone() for n, t in policy.params.items()}
    batch_before = {f: getattr(batch, f).clone() for f in ("input_ids", "attention_mask", "response_mask",
                                                             "advantages", "length_norm")}
    weights = torch.ones(batch.B, batch.G)
    policy.sequence_logprobs(policy.params, batch)
    torch.func.grad(lambda p: policy.sequence_logprobs(p, batch, with_grad=True).sum())(policy.params)
    policy.logprob_grads(policy.params, batch, weights)
    policy.token_entropies(policy.params, batch)
    assert_same_state(qwen2_peft_f32, module_before)
    for name, tensor in params_before.items():
        assert torch.equal(policy.params[name], tensor)
    for field, tensor in batch_before.items():
        assert torch.equal(getattr(batch, field), tensor), field
    assert all(p.grad is None for p in qwen2_peft_f32.parameters())


def test_params_are_detached_copies(qwen2_peft_f32):
    policy = Policy.from_peft(qwen2_peft_f32)
    named = dict(qwen2_peft_f32.named_parameters())
    assert set(policy.params) == {n for n in named if "lora_" in n}
    for name, tensor in policy.params.items():
        assert torch.equal(tensor, named[name]) and tensor.data_ptr() != named[name].data_ptr()
        assert not tensor.requires_grad


# ---------------------------------------------------------------------------------------------------------- guard
def test_guard_refuses_a_plain_model():
    with pytest.raises(ValueError, match="PeftModel"):
        Policy.from_peft(tiny_causal_lm("qwen2"))


def test_guard_refuses_a_trainable_base():
    peft_model = tiny_peft_model("qwen2")
    peft_model.get_base_model().model.norm.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="not LoRA-only.*norm.weight"):
        Policy.from_peft(peft_model)


def test_guard_refuses_modules_to_save():
    from peft import LoraConfig, get_peft_model
    model = tiny_causal_lm("qwen2")
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match="modules_to_save"):
        Policy.from_peft(peft_model)


def test_guard_refuses_lora_on_the_lm_head():
    peft_model = tiny_peft_model("qwen2", target_modules=("q_proj", "lm_head"))
    with pytest.raises(ValueError, match="LM head"):
        Policy.from_peft(peft_model)


def test_guard_refuses_merged_adapters():
    peft_model = tiny_peft_model("qwen2")
    peft_model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        Policy.from_peft(peft_model)


def test_guard_refuses_too_many_trainable_scalars():
    peft_model = tiny_peft_model("qwen2")
    with pytest.raises(ValueError, match="max_trainable_params"):
        Policy.from_peft(peft_model, max_trainable_params=10)


@pytest.mark.parametrize("options,match", [
    (dict(temperature=0.0), "temperature"),
    (dict(logsoftmax_dtype=torch.bfloat16), "logsoftmax_dtype"),
    (dict(seq_chunk=0), "seq_chunk"),
    (dict(token_chunk=-1), "token_chunk"),
])
def test_policy_options_are_validated(qwen2_peft_f32, options, match):
    with pytest.raises(ValueError, match=match):
        Policy.from_peft(qwen2_peft_f32, **options)


def test_bad_params_and_batches_are_refused(qwen2_peft_f32, batch):
    policy = Policy.from_peft(qwen2_peft_f32)
    missing = dict(list(policy.params.items())[1:])
    with pytest.raises(ValueError, match="missing"):
        policy.sequence_logprobs(missing, batch)
    extra = {**policy.params, "not.a.lora.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="extra"):
        policy.sequence_logprobs(extra, batch)
    name = next(iter(policy.params))
    with pytest.raises(ValueError, match="expects"):
        policy.sequence_logprobs({**policy.params, name: policy.params[name].double()}, batch)
    too_big = random_batch(2, 2, vocab_size=VOCAB + 10, seed=1)
    too_big = too_big.replace(input_ids=too_big.input_ids.clamp(max=VOCAB + 5))
    with pytest.raises(ValueError, match="vocabulary"):
        policy.sequence_logprobs(policy.params, too_big)
    with pytest.raises(ValueError, match="seq_chunk"):
        policy.sequence_logprobs(policy.params, batch, seq_chunk=0)
    with pytest.raises(ValueError, match=r"\[B, G\]"):
        policy.logprob_grads(policy.params, batch, torch.ones(batch.B + 1, batch.G))
    with pytest.raises(ValueError, match="RolloutBatch"):
        policy.sequence_logprobs(policy.params, {"input_ids": batch.input_ids})


def test_training_mode_is_refused(batch):
    peft_model = tiny_peft_model("qwen2")
    policy = Policy.from_peft(peft_model)
    peft_model.train()
    with pytest.raises(ValueError, match="training mode"):
        policy.sequence_logprobs(policy.params, batch)


# -------------------------------------------------------------------------------------------------------- loading
def save_base_and_adapter(tmp_path, seed=21):
    """Save a tiny base model and, separately, a LoRA adapter on it (as a training run would leave them)."""
    from peft import LoraConfig, get_peft_model
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    base = tiny_causal_lm("qwen2", seed=seed)
    base.save_pretrained(base_dir)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                init_lora_weights=False)).eval()
    peft_model.save_pretrained(adapter_dir)
    return peft_model, base_dir, adapter_dir


def test_load_policy_from_saved_base_and_adapter(tmp_path, batch):
    peft_model, base_dir, adapter_dir = save_base_and_adapter(tmp_path)
    in_memory = Policy.from_peft(peft_model)
    expected = in_memory.sequence_logprobs(in_memory.params, batch)

    loaded = load_policy(base_dir, adapter_dir)
    assert set(loaded.params) == set(in_memory.params)
    for name in loaded.params:
        assert torch.equal(loaded.params[name], in_memory.params[name])
    assert torch.allclose(loaded.sequence_logprobs(loaded.params, batch), expected, rtol=1e-6, atol=1e-6)
    assert all(not p.requires_grad for p in loaded.module.parameters())


def test_load_policy_from_an_adapter_dir_alone_reads_its_base(tmp_path, batch):
    peft_model, base_dir, adapter_dir = save_base_and_adapter(tmp_path)
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(base_dir)
    config_path.write_text(json.dumps(config))
    loaded = load_policy(adapter_dir)
    expected = Policy.from_peft(peft_model)
    assert torch.allclose(loaded.sequence_logprobs(loaded.params, batch),
                          expected.sequence_logprobs(expected.params, batch), rtol=1e-6, atol=1e-6)


def test_load_policy_errors_name_the_fix(tmp_path):
    _, base_dir, _ = save_base_and_adapter(tmp_path)
    with pytest.raises(ValueError, match="needs a LoRA adapter"):
        load_policy(base_dir)
    with pytest.raises(ValueError, match="adapter_config.json"):
        load_policy(base_dir, tmp_path / "nowhere")


def test_eager_attention_with_left_padding_gives_finite_equal_results():
    """Rows are left-aligned before the decoder, so no query row is fully masked (eager attention would give NaN
    there, and 0·NaN would carry it into real rows' gradients)."""
    batch = random_batch(3, 3, vocab_size=VOCAB, padding_side="left", extra_padding=3, seed=2)
    results = {}
    for attention in ("eager", "sdpa"):
        policy = Policy.from_peft(tiny_peft_model("qwen2", dtype=torch.float64, seed=8,
                                                  attn_implementation=attention), logsoftmax_dtype=torch.float64)
        logprobs, (grads,) = policy.logprob_grads(policy.params, batch, torch.ones(3, 3), seq_chunk=9)
        assert torch.isfinite(logprobs).all() and all(torch.isfinite(g).all() for g in grads.values())
        results[attention] = logprobs
    assert relative_error(results["eager"], results["sdpa"]) < 1e-6  # eager softmax runs in float32


def test_a_chunk_vjp_is_released_when_the_next_chunk_is_requested(qwen2_peft_f32, batch):
    """Only one chunk's graph is alive: holding an old item does not keep its graph (its vjp then refuses)."""
    policy = Policy.from_peft(qwen2_peft_f32)
    iterator = policy.iter_logprob_vjps(policy.params, batch, seq_chunk=4)
    first = next(iterator)
    first.vjp(torch.ones(first.chunk.num_sequences))
    next(iterator)
    with pytest.raises(RuntimeError, match="released"):
        first.vjp(torch.ones(first.chunk.num_sequences))
