"""Issue 12's fast paths: per-unit LoRA gradients from one batched backward, S and the entropies from one forward,
and the probe command's single gradient pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import importlib
from funcprobe import AdamState, Objective, Policy, delta_h1
from funcprobe.lora_grads import TappedChunk, tapped_forward, unsupported_reason
from funcprobe.testing import random_batch, tiny_peft_model

VOCAB = 48
delta_h1_module = importlib.import_module("funcprobe.delta_h1")  # the package exports the function under that name


def _policy(arch: str, attn: str = "sdpa", targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"),
            **options) -> Policy:
    model = tiny_peft_model(arch, dtype=torch.float64, seed=7, r=3, num_layers=2, hidden_size=16, vocab_size=VOCAB,
                            target_modules=targets, attn_implementation=attn, **options)
    return Policy.from_peft(model, logsoftmax_dtype=torch.float64)


def _flat(grads: dict) -> torch.Tensor:
    return torch.cat([t.reshape(-1).to(torch.float64) for t in grads.values()])


@pytest.mark.parametrize("arch,attn,padding_side", [("qwen2", "sdpa", "left"), ("llama", "eager", "right"),
                                                    ("llama", "sdpa", "left")])
def test_tapped_backward_equals_one_vjp_per_combination(arch, attn, padding_side):
    """Σ_i M[j,i] ∇Σ_{t∈i} c_t ℓ_t from one tapped backward equals the vjp with cotangent c_t·M[j, row(t)] (float64)."""
    policy = _policy(arch, attn)
    batch = random_batch(3, 3, vocab_size=VOCAB, prompt_len=(2, 5), response_len=(1, 6), padding_side=padding_side,
                         extra_padding=2, seed=11)
    generator = torch.Generator().manual_seed(0)
    checked = 0
    for item in policy.iter_logprob_vjps(policy.params, batch, seq_chunk=batch.num_sequences, token_chunk=5):
        chunk = item.chunk
        tapped = tapped_forward(policy, policy.params, chunk, token_chunk=7)
        assert isinstance(tapped, TappedChunk)
        assert torch.equal(tapped.token_rows, item.token_rows)
        assert torch.equal(tapped.token_columns, item.token_columns)
        assert torch.allclose(tapped.token_logprobs, item.token_logprobs, rtol=1e-12, atol=1e-12)
        assert torch.allclose(tapped.logprobs, item.logprobs, rtol=1e-12, atol=1e-12)
        cotangent = torch.randn(item.token_logprobs.shape[0], generator=generator, dtype=torch.float64)
        combine = torch.randn(4, chunk.num_sequences, generator=generator, dtype=torch.float64)
        first = tapped.backward(cotangent, combine[:2], retain_graph=True)  # two backwards of one forward
        second = tapped.backward(cotangent, combine[2:])
        for j, result in enumerate(first + second):
            assert list(result) == list(policy.params)
            assert all(result[n].shape == policy.params[n].shape and result[n].dtype == torch.float64
                       for n in result)
            expected = _flat(item.token_vjp(cotangent * combine[j][item.token_rows]))
            got = _flat(result)
            assert float(expected.abs().max()) > 0
            assert float((got - expected).abs().max()) <= 1e-10 * float(expected.abs().max()), j
            checked += 1
    assert checked == 4


def test_unsupported_adapters_are_named():
    assert unsupported_reason(_policy("qwen2")) is None
    from peft import LoraConfig, get_peft_model

    from funcprobe.testing import tiny_causal_lm

    base = tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=16, num_layers=1, dtype=torch.float64)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], use_dora=True,
                                            init_lora_weights=False)).eval()
    reason = unsupported_reason(Policy.from_peft(model))
    assert reason is not None and "variant" in reason
    with pytest.raises(ValueError, match="per-layer LoRA gradients do not apply"):
        policy = Policy.from_peft(model)
        batch = random_batch(2, 2, vocab_size=VOCAB, seed=1)
        tapped_forward(policy, policy.params, next(batch.iter_sequence_chunks(4)), token_chunk=4)


@pytest.fixture(scope="module")
def setup():
    policy = _policy("qwen2")
    batch = random_batch(6, 3, vocab_size=VOCAB, prompt_len=(2, 4), response_len=(1, 5), seed=5)
    generator = torch.Generator().manual_seed(3)
    names = list(policy.params)
    state = {i: {"step": torch.tensor(4.0), "exp_avg": 1e-2 * torch.randn(policy.params[n].shape, generator=generator,
                                                                          dtype=torch.float64),
                 "exp_avg_sq": 1e-4 * (0.5 + torch.rand(policy.params[n].shape, generator=generator,
                                                         dtype=torch.float64))} for i, n in enumerate(names)}
    adam = AdamState.from_torch({"state": state, "param_groups": [
        {"params": list(range(len(names))), "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01,
         "amsgrad": False, "maximize": False}]}, names, policy.params)
    return policy, batch, adam


FIELDS = ("deltaH1", "grad_term", "state_term", "U_cross", "se_plugin", "se_deltaH1", "diag_sum", "bars_dot")


@pytest.mark.parametrize("objective", [Objective(), Objective(beta=0.1, loss_type="grpo")],
                         ids=["dr_grpo", "grpo_kl"])
@pytest.mark.parametrize("units", ["prompt", 3])
def test_batched_units_equal_one_vjp_per_vector(setup, monkeypatch, objective, units):
    """The tapped path (several units per forward, prompts split across chunks included) gives the numbers of the
    vjp path (one forward per unit, one vjp per vector) to float64 rounding, at every seq_chunk."""
    policy, batch, adam = setup
    with monkeypatch.context() as patch:
        patch.setattr(delta_h1_module, "unsupported_reason", lambda policy: "forced off for the reference")
        reference = delta_h1(policy.params, batch, policy=policy, adam=adam, objective=objective, units=units,
                             seq_chunk=3, token_chunk=4)
        assert reference.backward_passes == 2 * batch.B
    for seq_chunk in (1, 2, 3, 4, 7, 18):
        for store in (True, False):
            result = delta_h1(policy.params, batch, policy=policy, adam=adam, objective=objective, units=units,
                              seq_chunk=seq_chunk, token_chunk=4, store_unit_vectors=store)
            for name in FIELDS:
                expected, got = getattr(reference, name), getattr(result, name)
                assert got == pytest.approx(expected, rel=1e-10, abs=1e-14), (seq_chunk, store, name)
            chunks = -(-batch.num_sequences // seq_chunk) * (1 if store else 2)
            assert result.forward_passes == chunks + (
                -(-batch.num_sequences // seq_chunk) if objective.needs_reference else 0)
            assert result.backward_passes == chunks * (2 if objective.needs_reference else 1)


def test_unit_vectors_agree_between_paths(setup, monkeypatch):
    from funcprobe.delta_h1 import unit_vectors
    from funcprobe.update import step_cotangent

    policy, batch, _ = setup
    unit = batch.select_prompts([1, 3])
    cotangent = step_cotangent(policy.params, unit, policy=policy, objective=Objective()).scaled(batch.B / 2)
    fast = unit_vectors(policy, policy.params, unit, cotangent, seq_chunk=4, token_chunk=3)
    with monkeypatch.context() as patch:
        patch.setattr(delta_h1_module, "unsupported_reason", lambda policy: "forced off")
        slow = unit_vectors(policy, policy.params, unit, cotangent, seq_chunk=4, token_chunk=3)
    for a, b in zip(fast, slow):
        assert float((_flat(a) - _flat(b)).abs().max()) <= 1e-10 * float(_flat(b).abs().max())


def test_logprobs_and_entropies_in_one_pass_equal_the_separate_passes(setup):
    policy, batch, _ = setup
    S, E = policy.sequence_logprobs_and_entropies(policy.params, batch, seq_chunk=4, token_chunk=5)
    assert torch.equal(S, policy.sequence_logprobs(policy.params, batch, seq_chunk=4, token_chunk=5))
    assert torch.equal(E, policy.token_entropies(policy.params, batch, seq_chunk=4, token_chunk=5))
    float32 = Policy.from_peft(tiny_peft_model("qwen2", seed=2, vocab_size=VOCAB, hidden_size=16))
    S, E = float32.sequence_logprobs_and_entropies(float32.params, batch, seq_chunk=3, token_chunk=2)
    assert torch.equal(S, float32.sequence_logprobs(float32.params, batch, seq_chunk=3, token_chunk=2))
    assert torch.equal(E, float32.token_entropies(float32.params, batch, seq_chunk=3, token_chunk=2))


def test_probe_command_computes_the_step_gradient_once(tiny_run, tmp_path, monkeypatch):
    """``funcprobe probe`` with the realised change and a sweep: the update batch's only gradient is δH₁'s pass-1
    backward (its Ȳ gives the update, δĤ₁(E)'s step and the sweep's step); the only other backward is δĤ₁(E)'s, one
    per chunk of the evaluation batch; no other vjp, autograd.grad or .backward() runs."""
    from funcprobe.cli import main

    counts = {"autograd.grad": 0, "func.vjp": 0, "Tensor.backward": 0, "tapped chunks": 0}
    original_grad, original_vjp, original_backward = torch.autograd.grad, torch.func.vjp, torch.Tensor.backward
    original_tapped_backward = TappedChunk.backward

    def counting(key, fn):
        def wrapped(*args, **kwargs):
            counts[key] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(torch.autograd, "grad", counting("autograd.grad", original_grad))
    monkeypatch.setattr(torch.func, "vjp", counting("func.vjp", original_vjp))
    monkeypatch.setattr(torch.Tensor, "backward", counting("Tensor.backward", original_backward))
    monkeypatch.setattr(TappedChunk, "backward", counting("tapped chunks", original_tapped_backward))
    checkpoint = max(Path(tiny_run["out"]).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    out = tmp_path / "results.json"
    assert main(["probe", str(checkpoint), "-B", "4", "-G", "4", "--max-new-tokens", "6", "--quiet", "--seq-chunk",
                 "8", "--realised", "both", "--eta-sweep", "1e-3,2e-3", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    delta = results["delta_h1"]
    assert delta["stored_unit_vectors"] and delta["n_units"] == 4
    # 16 sequences in chunks of 8: two forwards, one backward each (Dr. GRPO: one cotangent serves X and Y).
    assert (delta["forward_passes"], delta["backward_passes"]) == (2, 2)
    heldout = results["delta_h1_heldout"]
    assert (heldout["forward_passes"], heldout["backward_passes"]) == (2, 2)   # E: 4 prompts × 4, 2 per chunk
    assert counts == {"autograd.grad": 2 + 2, "func.vjp": 0, "Tensor.backward": 0, "tapped chunks": 2}
    assert results["lr_sweep"] is not None and len(results["lr_sweep"]["rows"]) == 2
