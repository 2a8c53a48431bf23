"""``funcprobe.trl.EntropyChangeCallback`` on a real TRL ``GRPOTrainer`` (issue 18).

Real runs: ``trainer.train()`` on a tiny float64 Qwen2 with a LoRA adapter, real sampling (TRL's own generation with
the model's ``generate``), 8 prompts × G = 4 per step, 4 optimizer steps, ``logging_steps=1``. The supported setting
is loss_type="grpo", β = 0.04, scale_rewards="group", max_grad_norm=0.1 (so clipping is active: the gradient norms
are ~0.3–0.5), τ = 0.8, lr 3e-3. A recorder callback, independent of funcprobe's, keeps θ at every
``on_step_begin`` and every step's ``_buffered_inputs``; the offline recomputation builds its own batch from them
and computes the reverse importance-sampling estimate from its formula (funcprobe's teacher-forced S and entropies
only) and δĤ₁(E) with ``delta_h1_heldout``.

Precision: funcprobe runs entirely in float64 here, so the logged realised and first-order values equal the offline
recomputation to 1e-9 relative (measured 2e-12). TRL's own numbers (its ``entropy`` metric, its loss and
gradient) pass through its float32 fused LM-head kernel: ``entropy_per_token`` matches TRL's ``entropy`` to ~1e-8
(asserted 1e-5) and ``step_match`` is ~3e-7 (asserted 1e-5).
"""

from __future__ import annotations

import functools
import math
import os
import sys
import tempfile
import warnings

import pytest
import torch

pytest.importorskip("trl", minversion="1.16")
pytest.importorskip("datasets")

from funcprobe import Policy  # noqa: E402
from funcprobe.heldout import delta_h1_heldout  # noqa: E402
from funcprobe.testing import DEFAULT_TARGET_MODULES, char_tokenizer, tiny_causal_lm  # noqa: E402
from funcprobe.trl import PREFIX, EntropyChangeCallback  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from trl_harness import grpo_config  # noqa: E402

TOKENIZER = char_tokenizer()
PROMPTS = ["ab", "cdef", "g", "hij", "kl", "mnop", "q", "rs", "tu", "vwx", "yz", "AB", "CD", "EFG", "H", "IJ",
           "KLM", "NO", "P", "QRS", "TU", "V", "WX", "YZ0", "12", "345", "6", "78", "9a", "bcd", "ef", "gh"]
G = 4
STEPS = 4
SUPPORTED = dict(loss_type="grpo", beta=0.04, scale_rewards="group", max_grad_norm=0.1)


def reward_fn(prompts, completions, **kwargs):
    return [0.3 * len(c) + 0.7 * c.count("z") + 0.1 * sum(ch in "aeiou" for ch in c) for c in completions]


class Recorder:
    """Independent of funcprobe: θ at every on_step_begin, every step's buffered rollouts at on_step_end."""

    def __init__(self, trainer):
        from transformers import TrainerCallback

        self.theta, self.buffers = {}, {}
        names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
        recorder = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                named = dict(trainer.model.named_parameters())
                recorder.theta[state.global_step + 1] = {n: named[n].detach().clone() for n in names}

            def on_step_end(self, args, state, control, **kwargs):
                recorder.buffers[state.global_step] = [{k: (v.clone() if torch.is_tensor(v) else v)
                                                        for k, v in mb.items()} for mb in trainer._buffered_inputs]

        self.callback = _Callback()


def make_trainer(steps=STEPS, seed=0, **config):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOTrainer

    settings = dict(output_dir=tempfile.mkdtemp(prefix="funcprobe_cb_"), use_cpu=True, bf16=False, report_to="none",
                    max_steps=steps, logging_steps=1, save_strategy="no", disable_tqdm=True, num_generations=G,
                    per_device_train_batch_size=8 * G, gradient_checkpointing=False, max_completion_length=8,
                    learning_rate=3e-3, temperature=0.8, seed=seed, dataloader_num_workers=0)
    settings.update(SUPPORTED)
    settings.update(config)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=list(DEFAULT_TARGET_MODULES), lora_dropout=0.0,
                      init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GRPOTrainer(model=tiny_causal_lm("qwen2", vocab_size=96, dtype=torch.float64), reward_funcs=reward_fn,
                           args=grpo_config(**settings), train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
                           processing_class=TOKENIZER, peft_config=lora)


def train(trainer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        trainer.train()
    return trainer


@functools.lru_cache(maxsize=None)
def run(callback: bool = True, **config):
    """(trainer, callback or None, recorder) after a run; cached per setting."""
    trainer = make_trainer(**config)
    recorder = Recorder(trainer)
    trainer.add_callback(recorder.callback)
    cb = None
    if callback:
        cb = EntropyChangeCallback(trainer, keep_tensors=True)
        trainer.add_callback(cb)
    return train(trainer), cb, recorder


def rows(trainer):
    """The per-step rows of log_history (not the final train summary), by step."""
    return {h["step"]: h for h in trainer.state.log_history if "loss" in h}


def lora(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------- an offline recomputation
def independent_batch(buffer):
    """The rollouts of one generation as a RolloutBatch, built here from TRL's tensors (grouped by prompt)."""
    from funcprobe import RolloutBatch

    groups = {}
    for mb in buffer:
        for r in range(mb["prompt_ids"].shape[0]):
            prompt = tuple(mb["prompt_ids"][r][mb["prompt_mask"][r].bool()].tolist())
            groups.setdefault(prompt, []).append((mb["completion_ids"][r], mb["completion_mask"][r]))
    assert all(len(v) == G for v in groups.values())
    P = max(map(len, groups))
    C = max(c.shape[0] for v in groups.values() for c, _ in v)
    B = len(groups)
    ids = torch.zeros((B, G, P + C), dtype=torch.long)
    attention = torch.zeros((B, G, P + C), dtype=torch.long)
    response = torch.zeros_like(attention)
    for n, (prompt, items) in enumerate(groups.items()):
        for g, (c, m) in enumerate(items):
            ids[n, g, P - len(prompt):P] = torch.tensor(prompt)
            attention[n, g, P - len(prompt):P] = 1
            ids[n, g, P:P + len(c)] = c
            attention[n, g, P:P + len(m)] = m
            response[n, g, P:P + len(m)] = m
    return RolloutBatch(input_ids=ids, attention_mask=attention, response_mask=response,
                        advantages=torch.zeros(B, G, dtype=torch.float64),
                        length_norm=torch.full((B,), 8.0, dtype=torch.float64), pad_token_id=TOKENIZER.pad_token_id,
                        temperature=0.8)


def offline(policy, theta_a, theta_b, batch):
    """The change θ_a → θ_b on a batch drawn at θ_b, by name: the reverse importance-sampling estimate written out
    from its formulas (ordinary IS with a leave-one-out control variate per response; per token, each prompt's
    F̄_b/T̄ minus its self-normalised Σ w F_a / Σ w T) on funcprobe's teacher-forced S and entropies, δĤ₁(E) by
    ``delta_h1_heldout`` (per response and per token), and both paired differences with their SEs."""
    S_b, E_b = policy.sequence_logprobs_and_entropies(theta_b, batch)
    S_a, E_a = policy.sequence_logprobs_and_entropies(theta_a, batch)
    weights = torch.exp(S_a - S_b)                        # w = π_a / π_b
    G = weights.shape[1]
    others = (E_a.sum(1, keepdim=True) - E_a) / (G - 1)   # c_g: the other draws' mean
    H_a = (weights * (E_a - others) + others).mean(1)     # Ĥ_n(θ_a), unbiased
    per_prompt = E_b.mean(1) - H_a                        # Ĥ_n(θ_b) − Ĥ_n(θ_a)
    T = batch.response_lengths.to(torch.float64)
    per_token = E_b.sum(1) / T.sum(1) - (weights * E_a).sum(1) / (weights * T).sum(1)
    B = per_prompt.numel()
    first = delta_h1_heldout(theta_b, {n: theta_b[n] - theta_a[n] for n in theta_b}, batch, policy=policy,
                             per_token=True)

    def mean_se(x):
        return float(x.mean()), float(x.std()) / math.sqrt(B)

    D = torch.tensor(first.per_prompt, dtype=torch.float64)
    D_tok = torch.tensor(first.per_prompt_per_token, dtype=torch.float64)
    values = {"first_order": first.deltaH1, "first_order_se": first.se,
              "first_order_per_token": first.deltaH1_per_token, "first_order_per_token_se": first.se_per_token}
    for name, x in (("realised", per_prompt), ("realised_per_token", per_token), ("difference", per_prompt - D),
                    ("difference_per_token", per_token - D_tok)):
        values[name], values[name + "_se"] = mean_se(x)
    return values


def close(a, b, rel):
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-300)


# ------------------------------------------------------------------------------------------------------ the tests
def test_every_step_is_logged_and_finite():
    trainer, cb, _ = run()
    assert cb.error is None
    by_step = rows(trainer)
    assert sorted(by_step) == list(range(1, STEPS + 1))
    measured = ("realised", "realised_se", "realised_per_token", "realised_per_token_se", "first_order",
                "first_order_se", "difference", "difference_se", "first_order_per_token", "first_order_per_token_se",
                "difference_per_token", "difference_per_token_se", "entropy", "ess_min", "ess_mean", "reliable")
    own = ("entropy_per_token", "step_match", "update_match", "overhead_s")
    for step, row in by_step.items():
        for name in own:  # every probed step (every=1: all), about the step itself
            assert math.isfinite(row[PREFIX + name]), (step, name, row.get(PREFIX + name))
        if step == 1:  # nothing before step 1 to measure
            assert PREFIX + "realised" not in row
            continue
        # the change of step s − 1, measured on step s's rollouts
        assert row[PREFIX + "first_step"] == row[PREFIX + "last_step"] == step - 1
        for name in measured:
            assert math.isfinite(row[PREFIX + name]), (step, name, row.get(PREFIX + name))
        assert row[PREFIX + "realised_se"] > 0 and row[PREFIX + "first_order_se"] > 0
        khat = row[PREFIX + "khat"]  # null when not assessed (log-weight range ≤ 0.05); else finite
        assert khat is None or math.isfinite(khat)
    # each value once: the history has one record per step, and the final summary row carries none
    assert [r["step"] for r in cb.history] == list(range(1, STEPS + 1))
    assert not any(k.startswith(PREFIX) for k in trainer.state.log_history[-1])


def test_entropy_per_token_is_trls_entropy():
    trainer, _, _ = run()
    worst = 0.0
    for step, row in rows(trainer).items():
        ours, trl = row[PREFIX + "entropy_per_token"], row["entropy"]
        worst = max(worst, abs(ours - trl) / abs(trl))
    print(f"\nentropy_per_token vs TRL's entropy: max relative difference {worst:.1e}")
    assert worst <= 1e-5


def test_the_trainers_step_is_funcprobes():
    trainer, cb, _ = run()
    assert cb.step_match_reason is None and cb.update_match_reason is None
    # clipping was active: funcprobe's clip must match TRL's for step_match to be small
    assert all(row["grad_norm"] > SUPPORTED["max_grad_norm"] for row in rows(trainer).values())
    step_match = [row[PREFIX + "step_match"] for row in rows(trainer).values()]
    update_match = [row[PREFIX + "update_match"] for row in rows(trainer).values()]
    print(f"\nstep_match {[f'{x:.1e}' for x in step_match]}  update_match {[f'{x:.1e}' for x in update_match]}")
    assert max(step_match) <= 1e-5
    assert max(update_match) <= 1e-6


def test_logged_change_equals_an_offline_recomputation():
    trainer, cb, recorder = run()
    was_training = trainer.model.training
    policy = Policy.from_peft(trainer.model, temperature=0.8)  # puts the model in eval mode
    trainer.model.train(was_training)
    policy.module.eval()
    worst = 0.0
    for step, row in rows(trainer).items():
        if step == 1:
            continue
        theta_a, theta_b = recorder.theta[step - 1], recorder.theta[step]   # before step s − 1, after it
        batch = independent_batch(recorder.buffers[step])                   # step s's rollouts, drawn at θ_b
        want = offline(policy, theta_a, theta_b, batch)
        assert len(want) == 12
        for name, value in want.items():  # per response and per token, each with its SE
            got = row[PREFIX + name]
            # a difference of two near-equal changes: relative to the changes it is the difference of
            scale = abs(value)
            if name.startswith("difference"):
                unit = name.removeprefix("difference")
                scale = max(scale, abs(want["realised" + unit]), abs(want["first_order" + unit]))
            assert abs(got - value) <= 1e-9 * scale, (step, name, got, value)
            worst = max(worst, abs(got - value) / scale)
        # sharp: the same rollouts with the wrong pair of parameters (the step after) are far off
        if step + 1 in recorder.theta:
            wrong = offline(policy, theta_b, recorder.theta[step + 1], batch)
            assert not close(wrong["realised"], want["realised"], 1e-3)
            assert not close(wrong["first_order_per_token"], want["first_order_per_token"], 1e-3)
    trainer.model.train(was_training)
    print(f"\nlogged vs offline (float64): max relative difference {worst:.1e}")


def test_training_is_unchanged_by_the_callback():
    with_cb, _, _ = run()
    without, _, _ = run(callback=False)
    a, b = rows(with_cb), rows(without)
    for step in a:
        for key in ("loss", "grad_norm", "entropy", "reward", "kl"):
            assert a[step][key] == b[step][key], (step, key)
    pa, pb = lora(with_cb), lora(without)
    assert all(torch.equal(pa[n], pb[n]) for n in pb)
    assert with_cb.model.training == without.model.training


def test_unsupported_setting_gives_null_step_match_with_a_reason():
    """num_iterations = 2: each generation serves two steps. step_match is null with the reason; the change is
    measured on the next generation and spans the two steps since the probed one."""
    trainer, cb, _ = run(num_iterations=2)
    assert cb.error is None
    assert "num_iterations" in cb.step_match_reason
    by_step = rows(trainer)
    for step, row in by_step.items():
        assert row[PREFIX + "step_match"] is None
        assert "num_iterations" in row[PREFIX + "step_match_reason"]
        assert math.isfinite(row[PREFIX + "entropy_per_token"])
        assert abs(row[PREFIX + "entropy_per_token"] - row["entropy"]) <= 1e-5 * row["entropy"]
    measured = {s: r for s, r in by_step.items() if PREFIX + "realised" in r}
    assert list(measured) == [3]  # generations at steps 1 and 3 (drawn at θ_0 and θ_2)
    row = measured[3]
    assert (row[PREFIX + "first_step"], row[PREFIX + "last_step"]) == (1, 2)
    assert all(math.isfinite(row[PREFIX + k]) for k in ("realised", "realised_se", "first_order", "first_order_se",
                                                         "difference_se"))


def test_every_probes_every_kth_step():
    trainer = make_trainer()
    cb = EntropyChangeCallback(trainer, every=2)
    trainer.add_callback(cb)
    by_step = rows(train(trainer))
    assert [s for s, r in by_step.items() if PREFIX + "entropy_per_token" in r] == [1, 3]
    assert [s for s, r in by_step.items() if PREFIX + "realised" in r] == [2, 4]
    assert all(by_step[s][PREFIX + "last_step"] == s - 1 for s in (2, 4))


def test_match_every_checks_the_step_at_every_kth_probed_step():
    """match_every=2: step_match and update_match at steps 1 and 3 only (the others' rows have no entry); the
    measurement is the full run's at every step, and per_token=False drops only the per-token first order."""
    trainer = make_trainer()
    cb = EntropyChangeCallback(trainer, match_every=2, per_token=False)
    trainer.add_callback(cb)
    by_step = rows(train(trainer))
    assert cb.error is None
    assert [s for s, r in by_step.items() if PREFIX + "step_match" in r] == [1, 3]
    assert [s for s, r in by_step.items() if PREFIX + "update_match" in r] == [1, 3]
    assert all(by_step[s][PREFIX + "step_match"] <= 1e-5 for s in (1, 3))
    reference = rows(run()[0])
    for step in (2, 3, 4):
        for name in ("realised", "realised_per_token", "first_order", "difference", "difference_se"):
            assert by_step[step][PREFIX + name] == reference[step][PREFIX + name], (step, name)
        assert PREFIX + "first_order_per_token" not in by_step[step]
    with pytest.raises(ValueError, match="match_every must be a positive integer"):
        EntropyChangeCallback(trainer, match_every=0)


def test_a_trainer_it_cannot_measure_is_refused_when_the_callback_is_made():
    """No LoRA adapter (GRPOTrainer without peft_config), or not a GRPOTrainer at all: refused at once with the fix,
    not a warning once training has started (when the run would go on with nothing logged)."""
    from datasets import Dataset
    from trl import GRPOTrainer

    settings = dict(output_dir=tempfile.mkdtemp(prefix="funcprobe_cb_"), use_cpu=True, bf16=False, report_to="none",
                    max_steps=1, logging_steps=1, save_strategy="no", disable_tqdm=True, num_generations=G,
                    per_device_train_batch_size=2 * G, gradient_checkpointing=False, max_completion_length=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = GRPOTrainer(model=tiny_causal_lm("qwen2", vocab_size=96, dtype=torch.float64), reward_funcs=reward_fn,
                            args=grpo_config(**settings), train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
                            processing_class=TOKENIZER)
    with pytest.raises(ValueError, match="without a PEFT adapter.*peft_config=LoraConfig"):
        EntropyChangeCallback(plain)
    with pytest.raises(TypeError, match="needs TRL's GRPOTrainer"):
        EntropyChangeCallback(plain.model)


def test_a_step_of_zero_changes_nothing_exactly():
    """measure_step_change(θ, θ): the realised change is exactly 0 per response and per token, as is the first
    order — θ_b's values come from the held-out pass's forward and θ_a's from a separate no-grad forward, so this
    holds only if the two are the same arithmetic (float32 model, SDPA, chunks splitting prompts)."""
    from funcprobe.testing import random_batch, tiny_policy
    from funcprobe.trl import measure_step_change

    policy = tiny_policy("qwen2", dtype=torch.float32)
    theta = dict(policy.params)
    batch = random_batch(5, 4, vocab_size=64, seed=3, response_len=(1, 12))
    for seq_chunk in (8, 3):  # whole prompts per forward; a prompt's draws over two forwards
        measured = measure_step_change(theta, {n: t.clone() for n, t in theta.items()}, batch, policy=policy,
                                       seq_chunk=seq_chunk)
        assert measured.realised.deltaH == 0.0 and measured.realised.per_token == 0.0
        assert all(x == 0.0 for x in measured.realised.deltaH_per_prompt + measured.realised.per_token_per_prompt)
        assert measured.first_order.deltaH1 == 0.0 and measured.paired.difference == 0.0
        assert measured.paired_per_token.difference == 0.0
        for recorded in (measured.first_order, measured.realised, measured.paired, measured.paired_per_token):
            assert recorded.evaluation_fingerprint == batch.fingerprint


def test_a_failure_is_logged_once_and_training_goes_on():
    trainer = make_trainer(steps=3)
    cb = EntropyChangeCallback(trainer)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    cb._measure = broken
    trainer.add_callback(cb)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(trainer)
    ours = [w for w in caught if "EntropyChangeCallback failed" in str(w.message)]
    assert len(ours) == 1 and "boom" in str(ours[0].message)
    assert "boom" in cb.error
    by_step = rows(trainer)
    assert sorted(by_step) == [1, 2, 3]
    assert PREFIX + "entropy_per_token" in by_step[1]          # before the failure
    assert not any(k.startswith(PREFIX) for k in by_step[3])   # off after it
    baseline, _, _ = run(callback=False, steps=3)
    assert all(by_step[s]["loss"] == rows(baseline)[s]["loss"] for s in by_step)


def test_gradient_accumulation_and_checkpointing():
    """gradient_accumulation_steps = 2 (the micro-batches of one optimizer step are taken together) with TRL's
    default gradient checkpointing (its input-grad hooks are suspended while the callback computes): the same
    rollouts as the one-micro-batch run, so the same measurements; TRL's entropy (a mean of two micro-batch means)
    and the step still match, and the training is unchanged by the callback."""
    config = dict(gradient_accumulation_steps=2, per_device_train_batch_size=4 * G, gradient_checkpointing=True)
    trainer, cb, _ = run(**config)
    assert cb.error is None
    reference = rows(run()[0])
    by_step = rows(trainer)
    for step, row in by_step.items():
        assert abs(row[PREFIX + "entropy_per_token"] - row["entropy"]) <= 1e-5 * row["entropy"]
        assert row[PREFIX + "step_match"] <= 1e-5
        if step > 1:
            for name in ("realised", "first_order", "difference_se"):
                assert close(row[PREFIX + name], reference[step][PREFIX + name], 1e-6), (step, name)
    without = rows(run(callback=False, **config)[0])
    assert all(by_step[s]["loss"] == without[s]["loss"] and by_step[s]["grad_norm"] == without[s]["grad_norm"]
               for s in by_step)
    assert all(torch.equal(a, b) for a, b in zip(lora(trainer).values(), lora(run(callback=False, **config)[0])
                                                 .values()))


def test_rollout_batch_from_trl_groups_rows_by_prompt():
    """TRL's shuffled rows regrouped by prompt; a prompt drawn twice gives two groups; a split group is refused."""
    from funcprobe.trl import rollout_batch_from_trl, trl_entropy_per_token

    def micro(prompts, completions, advantages):
        P = max(map(len, prompts))
        C = max(map(len, completions))
        return {"prompt_ids": torch.tensor([[0] * (P - len(p)) + p for p in prompts]),
                "prompt_mask": torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts]),
                "completion_ids": torch.tensor([c + [0] * (C - len(c)) for c in completions]),
                "completion_mask": torch.tensor([[1] * len(c) + [0] * (C - len(c)) for c in completions]),
                "advantages": torch.tensor(advantages, dtype=torch.float32)}

    a, b = [5, 6], [7]
    first = micro([a, b, a, a], [[9, 2], [10], [11, 12, 2], [13]], [0.5, -1.0, 0.25, 1.0])
    second = micro([b, a, a, a], [[14, 2], [15], [16], [17, 18]], [1.0, 2.0, 3.0, 4.0])
    out = rollout_batch_from_trl([first, second], G=2, pad_token_id=0, temperature=0.7, length_norm=8)
    batch = out.batch
    assert (batch.B, batch.G, batch.temperature) == (4, 2, 0.7)  # a: 6 rows → 3 groups of 2; b: 1 group
    # each TRL row is where the map says, with its prompt, completion and advantage
    for mb, rows_of in zip((first, second), out.rows):
        for r, (n, g) in enumerate(rows_of):
            ids, response = batch.input_ids[n, g], batch.response_mask[n, g]
            prompt = mb["prompt_ids"][r][mb["prompt_mask"][r].bool()].tolist()
            completion = mb["completion_ids"][r][mb["completion_mask"][r].bool()].tolist()
            assert ids[response].tolist() == completion
            start = int(response.nonzero()[0])
            assert ids[start - len(prompt):start].tolist() == prompt
            assert batch.attention_mask[n, g].sum() == len(prompt) + len(completion)
            assert batch.advantages[n, g] == float(mb["advantages"][r])
    assert sorted(out.rows[0] + out.rows[1]) == [(n, g) for n in range(4) for g in range(2)]
    # TRL's entropy metric: the mean over micro-batches of each one's token-weighted mean
    sums = torch.arange(8, dtype=torch.float64).reshape(4, 2) + 1
    def mean_of(mb_rows):
        return sum(float(sums[n, g]) for n, g in mb_rows) / sum(float(out.lengths[n, g]) for n, g in mb_rows)
    expected = (mean_of(out.rows[0]) + mean_of(out.rows[1])) / 2
    assert trl_entropy_per_token(sums, out) == pytest.approx(expected, rel=1e-15)
    with pytest.raises(ValueError, match="not a multiple of G=2"):
        rollout_batch_from_trl([first], G=2, pad_token_id=0, temperature=0.7, length_norm=8)
