"""funcprobe's step is TRL's step: ``GRPOTrainer`` (trl ≥ 1.16) against ``policy_gradient`` / ``rl_update``.

TRL's own code computes one real optimizer step on fixed completions: ``trainer.train()`` with ``max_steps=1``, and
only generation replaced (``tests/trl_harness.py``). That covers reward calls, advantages, reference log-probs, the
loss per ``loss_type``, backward, clipping at ``max_grad_norm=1.0`` and the fused AdamW step. funcprobe gets the same
prompt and completion ids, the same Python reward function and the Objective built from the trainer's GRPOConfig.
Then, for loss_type ∈ {grpo, bnpo, dr_grpo, dapo} × scale_rewards ∈ {group, batch, none} × β ∈ {0, 0.04}:

(a) advantages: ``compute_advantages`` equals TRL's bit for bit when the rows are in TRL's order. In canonical order
    they agree to 1e-6 relative: the sampler shuffles the prompts, which changes the float32 summation order of the
    "batch" std (1 ulp).
(b) gradient: TRL's LoRA gradient equals funcprobe's −Ȳ to 1e-6 relative to its largest entry.
(c) update: funcprobe's clip + AdamW applied to TRL's gradient gives TRL's θ⁺ (fused AdamW) to 1e-6 relative per
    entry; measured bit for bit. The end-to-end ``rl_update`` gives TRL's θ⁺ up to what (b)'s residual allows. The
    first AdamW step Δ = −lr·ĝ/(|ĝ| + ε) is ill-conditioned where |ĝ| ≈ ε, so the bound is elementwise: plain
    max |ΔΔθ| / max |Δθ| reaches 1e-4 on the rare entries with |ĝ| ~ 1e-7. The new m (which carries the clipping), v
    and step equal TRL's optimizer state.

Precision. The matrix runs on a float64 base model, so TRL's loss runs in float64 except its fused LM-head log-prob
kernel, which works in float32. funcprobe runs entirely in float64 there, and the residual (~2e-7) is that kernel's
rounding. On a float32 model (``test_float32_model``), both TRL's and funcprobe's gradients are about 1e-6 from
the float64 value. That is the float32 rounding floor, so there they are compared at 5e-6. The data is realistic
in layout: B = 3 prompts of unequal lengths (left padding), G = 4 completions each of unequal lengths, some ending
with EOS and some truncated at max_completion_length, and τ = 0.7 for grpo and dapo.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

pytest.importorskip("trl", minversion="1.16")
pytest.importorskip("datasets")

from funcprobe import (AdamState, Objective, Policy, RolloutBatch, compute_advantages,  # noqa: E402
                       policy_gradient, rl_update)
from funcprobe.adam import adamw_update, grad_clip_coef  # noqa: E402
from funcprobe.testing import DEFAULT_TARGET_MODULES, char_tokenizer, tiny_causal_lm  # noqa: E402

from trl_harness import TRLStepHarness, call_reward, grpo_config, objective_for_config  # noqa: E402

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALES = ("group", "batch", "none")
BETAS = (0.0, 0.04)
TEMPERATURE = {"grpo": 0.7, "dapo": 0.7, "bnpo": 1.0, "dr_grpo": 1.0}
L = 6  # max_completion_length
VOCAB = 96
TOL = 1e-6

TOKENIZER = char_tokenizer()
EOS = TOKENIZER.eos_token_id
PROMPTS = ["ab", "cdef", "g"]
# Ending in EOS, or truncated at exactly L tokens without one.
COMPLETION_TEXTS = [["xyz<", "qwerty", "a<", "mno<"],
                    ["pp<", "zzzzzz", "abcde<", "k<"],
                    ["12<", "3<", "456789", "0000<"]]


def _ids(text: str) -> list[int]:
    body = text[:-1] if text.endswith("<") else text
    ids = TOKENIZER(body, add_special_tokens=False)["input_ids"]
    return ids + [EOS] if text.endswith("<") else ids


COMPLETIONS = [[_ids(t) for t in row] for row in COMPLETION_TEXTS]


def reward_fn(prompts, completions, completion_ids, **kwargs):
    """A TRL reward function: length, 'z's and vowels (non-dyadic values, unequal within every group)."""
    return [0.3 * len(c) + 0.7 * c.count("z") + 0.1 * sum(ch in "aeiou" for ch in c) for c in completions]


def _lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=list(DEFAULT_TARGET_MODULES), lora_dropout=0.0,
                      init_lora_weights=False)  # random B: the policy differs from the base model (KL ≠ 0)


@functools.lru_cache(maxsize=None)
def harness(loss_type: str, beta: float, dtype: torch.dtype = torch.float64) -> TRLStepHarness:
    """One trainer per (loss_type, β, dtype), shared by its three reward scalings. TRL's defaults otherwise
    (learning rate 1e-6, max_grad_norm 1.0, fused AdamW, bias-corrected KL)."""
    return TRLStepHarness(lambda: tiny_causal_lm("qwen2", vocab_size=VOCAB, seed=0, dtype=dtype), TOKENIZER,
                          PROMPTS, COMPLETIONS, reward_fn, peft_config=_lora_config(), loss_type=loss_type,
                          beta=beta, temperature=TEMPERATURE[loss_type], max_completion_length=L)


@functools.lru_cache(maxsize=None)
def policy_of(h: TRLStepHarness) -> Policy:
    return Policy.from_peft(h.model, temperature=h.args.temperature)


# ------------------------------------------------------------------------------------------------ funcprobe's side
def rollout_batch(prompt_ids, completion_ids, advantages, *, temperature, rewards=None) -> RolloutBatch:
    """[B, G, P + C]: each prompt left-padded to P, then its completion right-padded to C."""
    B, G = len(prompt_ids), len(completion_ids[0])
    P = max(map(len, prompt_ids))
    C = max(len(c) for row in completion_ids for c in row)
    pad = TOKENIZER.pad_token_id
    input_ids = torch.full((B, G, P + C), pad, dtype=torch.long)
    attention = torch.zeros((B, G, P + C), dtype=torch.long)
    response = torch.zeros_like(attention)
    for n, prompt in enumerate(prompt_ids):
        for g, completion in enumerate(completion_ids[n]):
            input_ids[n, g, P - len(prompt):P] = torch.tensor(prompt)
            input_ids[n, g, P:P + len(completion)] = torch.tensor(completion)
            attention[n, g, P - len(prompt):P + len(completion)] = 1
            response[n, g, P:P + len(completion)] = 1
    return RolloutBatch(input_ids=input_ids, attention_mask=attention, response_mask=response,
                        advantages=advantages, length_norm=torch.full((B,), float(L), dtype=torch.float64),
                        rewards=rewards, pad_token_id=pad, temperature=temperature)


def funcprobe_rewards(step) -> torch.Tensor:
    texts = [TOKENIZER.batch_decode(row, skip_special_tokens=True) for row in step.completion_ids]
    return torch.tensor(call_reward(reward_fn, PROMPTS, texts, step.completion_ids), dtype=torch.float64)


def fresh_adam(step) -> AdamState:
    """funcprobe's state for TRL's fresh optimizer: its parameter groups' hyper-parameters, m = v = 0, t = 0."""
    groups = {"state": {}, "param_groups": step.optimizer_state["param_groups"]}
    return AdamState.from_torch(groups, step.param_names, step.params_before)


# -------------------------------------------------------------------------------------------------- comparisons
def rel_max(a: dict, b: dict) -> float:
    """max |a − b| / max |b| over all LoRA entries."""
    num = max(float((a[n].double() - b[n].double()).abs().max()) for n in b)
    return num / max(float(b[n].double().abs().max()) for n in b)


def rel_l2(a: dict, b: dict) -> float:
    num = sum(float(((a[n].double() - b[n].double()) ** 2).sum()) for n in b)
    return math.sqrt(num / sum(float((b[n].double() ** 2).sum()) for n in b))


def ulp(x: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(x.abs(), torch.full_like(x, math.inf)) - x.abs()


def check_first_adam_step(theta, after_a, after_b, grad_a, grad_b, *, lr, eps, max_grad_norm) -> None:
    """θ⁺_a = θ⁺_b up to the effect of grad_a ≠ grad_b, for a first AdamW step from m = v = 0 with no weight decay.

    There Δ = −lr·f(ĝ), with f(x) = x/(|x| + ε) and ĝ the clipped gradient. Its slope ε/(|x| + ε)² is 1/ε at
    0 and ~0 for |x| ≫ ε. So elementwise |Δ_a − Δ_b| ≤ lr·ε·|ĝ_a − ĝ_b| / (m + ε)², where m = min(|ĝ_a|, |ĝ_b|)
    when their signs agree and 0 when they do not. Rounding adds 1e-6 |Δ| and an ulp of θ⁺.
    """
    _, coef_a = grad_clip_coef(grad_a, max_grad_norm)
    _, coef_b = grad_clip_coef(grad_b, max_grad_norm)
    for name, t in theta.items():
        ga, gb = grad_a[name].double() * float(coef_a), grad_b[name].double() * float(coef_b)
        low = torch.where(ga * gb > 0, torch.minimum(ga.abs(), gb.abs()), torch.zeros_like(ga))
        bound = lr * eps * (ga - gb).abs() / (low + eps) ** 2
        delta_a, delta_b = (after_a[name] - t).double(), (after_b[name] - t).double()
        slack = TOL * delta_b.abs() + ulp(after_b[name]).double()
        excess = (delta_a - delta_b).abs() - bound - slack
        assert float(excess.max()) <= 0, (name, float(excess.max()), float(lr))


def compare(step, objective: Objective, policy: Policy, *, grad_tol: float = TOL) -> dict[str, float]:
    """Check (a), (b) and (c) for one TRL step; returns the measured relative differences."""
    B, G = len(PROMPTS), len(COMPLETIONS[0])
    # Inputs: TRL tokenised the prompts and kept the completions as funcprobe will see them.
    assert step.prompt_ids == [TOKENIZER(p)["input_ids"] for p in PROMPTS]
    assert step.completion_ids == COMPLETIONS
    assert step.num_items_in_batch == sum(len(c) for row in COMPLETIONS for c in row)

    # (a) rewards and advantages
    rewards = funcprobe_rewards(step)
    assert torch.equal(rewards.float(), step.rewards[..., 0])
    A, _ = compute_advantages(rewards, scale_rewards=objective.scale_rewards, warn=False)
    prompt_order = [n for n, g in step.trl_order[::G]]
    assert step.trl_order == [(n, g) for n in prompt_order for g in range(G)]  # TRL's groups: G rows in a row
    A_trl_order, _ = compute_advantages(rewards[prompt_order], scale_rewards=objective.scale_rewards, warn=False)
    assert torch.equal(A_trl_order.float(), step.advantages[prompt_order])  # bit for bit, TRL's row order
    adv_rel = float((A - step.advantages.double()).abs().max() / step.advantages.abs().max())
    assert adv_rel <= TOL

    # (b) the gradient: TRL's ∇ℒ vs funcprobe's −Ȳ
    batch = rollout_batch(step.prompt_ids, step.completion_ids, A, temperature=policy.temperature, rewards=rewards)
    _, ybar = policy_gradient(step.params_before, batch, policy=policy, objective=objective)
    grad = {name: -value for name, value in ybar.items()}
    grad_rel = rel_max(grad, step.grad)
    assert grad_rel <= grad_tol

    # (c) the optimizer step
    adam = fresh_adam(step)
    h = next(iter(adam.hyper.values()))
    assert h.weight_decay == 0 and all(t == 0 for t in adam.step.values())
    alone, _ = adamw_update(step.params_before, step.grad, adam, lr=step.lr, max_grad_norm=objective.max_grad_norm)
    delta_trl = {n: step.params_after[n] - step.params_before[n] for n in step.params_before}
    optimizer_rel = rel_max({n: alone[n] - step.params_before[n] for n in alone}, delta_trl)
    check_first_adam_step(step.params_before, alone, step.params_after, step.grad, step.grad, lr=step.lr,
                          eps=h.eps, max_grad_norm=objective.max_grad_norm)
    after, state = rl_update(step.params_before, batch, policy=policy, adam=adam, objective=objective, lr=step.lr)
    check_first_adam_step(step.params_before, after, step.params_after, grad, step.grad, lr=step.lr, eps=h.eps,
                          max_grad_norm=objective.max_grad_norm)
    trl_state = AdamState.from_torch(step.optimizer_state, step.param_names, step.params_before)
    assert dict(state.step) == dict(trl_state.step) == {n: 1 for n in step.param_names}
    assert rel_max(dict(state.exp_avg), dict(trl_state.exp_avg)) <= grad_tol
    assert rel_max(dict(state.exp_avg_sq), dict(trl_state.exp_avg_sq)) <= 2 * grad_tol
    delta_fp = {n: after[n] - step.params_before[n] for n in after}
    return {"adv": adv_rel, "grad": grad_rel, "grad_l2": rel_l2(grad, step.grad), "optimizer": optimizer_rel,
            "update": rel_max(delta_fp, delta_trl), "update_l2": rel_l2(delta_fp, delta_trl)}


def _report(label: str, metrics: dict[str, float]) -> None:
    print(f"\n{label}: " + "  ".join(f"{k} {v:.1e}" for k, v in metrics.items()))


# ------------------------------------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("scale_rewards", SCALES)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_step_matches_trl(loss_type, beta, scale_rewards):
    h = harness(loss_type, beta)
    step = h.step(scale_rewards=scale_rewards)
    objective = objective_for_config(h.args)
    assert objective == Objective(loss_type=loss_type, beta=beta, scale_rewards=scale_rewards, max_grad_norm=1.0,
                                  use_bias_correction_kl=True)
    assert (step.ref_per_token_logps is not None) == (beta > 0)
    metrics = compare(step, objective, policy_of(h))
    _report(f"{loss_type} β={beta} {scale_rewards} τ={TEMPERATURE[loss_type]}", metrics)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_float32_model(loss_type):
    """TRL's realistic dtype: a float32 model (bf16=False). Both gradients are ~1e-6 from the float64 value
    (float32 rounding), so they agree to 5e-6; funcprobe's float32 gradient is also checked against its float64
    one on the same weights."""
    h = harness(loss_type, 0.04, torch.float32)
    step = h.step(scale_rewards="group")
    objective = objective_for_config(h.args)
    metrics = compare(step, objective, policy_of(h), grad_tol=5e-6)
    # funcprobe in float64 on the same weights (the float64 matrix's model has the same base weights).
    policy64 = policy_of(harness(loss_type, 0.04))
    batch = rollout_batch(step.prompt_ids, step.completion_ids, step.advantages.double(),
                          temperature=policy64.temperature)
    _, ybar = policy_gradient({n: t.double() for n, t in step.params_before.items()}, batch, policy=policy64,
                              objective=objective)
    exact = {name: -value for name, value in ybar.items()}
    metrics["trl32_vs_f64"] = rel_max(step.grad, exact)
    assert metrics["trl32_vs_f64"] <= 5e-6
    _report(f"float32 {loss_type} β=0.04 group", metrics)


def test_the_comparison_is_sharp():
    """Negative controls on one TRL step (dr_grpo, β = 0.04). A wrong loss type, the KL without the bias
    correction, no KL, or the wrong τ each miss TRL's gradient by far more than the tolerance."""
    h = harness("dr_grpo", 0.04)
    step = h.step(scale_rewards="group")
    right = objective_for_config(h.args)
    A = step.advantages.double()

    def gradient(objective, policy):
        batch = rollout_batch(step.prompt_ids, step.completion_ids, A, temperature=policy.temperature)
        _, ybar = policy_gradient(step.params_before, batch, policy=policy, objective=objective)
        return rel_max({n: -v for n, v in ybar.items()}, step.grad)

    assert gradient(right, policy_of(h)) <= TOL
    assert gradient(right.replace(loss_type="grpo"), policy_of(h)) > 1e-2
    assert gradient(right.replace(use_bias_correction_kl=False), policy_of(h)) > 1e-4  # measured 4e-4
    assert gradient(right.replace(beta=0.0), policy_of(h)) > 1e-3  # measured 3e-3
    assert gradient(right, Policy.from_peft(h.model, temperature=0.7)) > 1e-2


def test_repeated_steps_are_independent():
    """The harness restores θ and drops the optimizer: the same step twice is the same step. TRL shuffles the
    batch's rows before the loss, so the float32 log-prob kernel sums in another order: equal to rounding."""
    h = harness("dapo", 0.0)
    first, second = h.step(scale_rewards="group"), h.step(scale_rewards="group")
    assert torch.equal(first.advantages, second.advantages)
    assert rel_max(first.grad, second.grad) <= TOL
    for name in first.params_before:
        assert torch.equal(first.params_before[name], second.params_before[name])
    check_first_adam_step(first.params_before, first.params_after, second.params_after, first.grad, second.grad,
                          lr=first.lr, eps=1e-8, max_grad_norm=1.0)


# ---------------------------------------------------------------------------------------------------- refusals
def small_config(**settings):
    return grpo_config(output_dir="unused", use_cpu=True, bf16=False, report_to="none", num_generations=2,
                       per_device_train_batch_size=2, **settings)


def test_objective_refuses_what_it_cannot_match():
    with pytest.raises(ValueError, match="importance_sampling_level"):
        Objective(importance_sampling_level="sequence", beta=0.04)
    Objective(importance_sampling_level="sequence", beta=0.04, use_bias_correction_kl=False)  # per-token κ: fine
    Objective(importance_sampling_level="sequence", beta=0.0)
    with pytest.raises(ValueError, match="loss_type"):
        Objective(loss_type="ppo_clip")
    with pytest.raises(ValueError, match="scale_rewards"):
        Objective(scale_rewards=True)


@pytest.mark.parametrize("setting, value", [
    ("entropy_coef", 0.01), ("top_entropy_quantile", 0.2), ("mask_truncated_completions", True),
    ("num_iterations", 2), ("steps_per_generation", 2), ("delta", 0.5),
    ("multi_objective_aggregation", "normalize_then_sum"),
])
def test_unmatched_grpo_settings_are_refused_by_name(setting, value):
    args = small_config(**{setting: value})
    with pytest.raises(ValueError, match=setting):
        objective_for_config(args)


def test_bnpo_with_gradient_accumulation_is_refused():
    args = small_config(loss_type="bnpo", gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        objective_for_config(args)
    args.loss_type = "dapo"
    assert objective_for_config(args).loss_type == "dapo"


def test_gspo_with_kl_is_refused_from_the_config():
    with pytest.raises(ValueError, match="importance_sampling_level"):
        objective_for_config(small_config(importance_sampling_level="sequence", beta=0.04))
    assert objective_for_config(small_config()) == Objective.trl()  # TRL's defaults are funcprobe's TRL preset
