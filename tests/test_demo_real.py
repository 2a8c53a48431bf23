"""The real-model demo's parts that do not need the real model (issue 12): its reward, the trainer config the probe
reads, the training loss (which must be the objective the probe then assumes), and the probe command it runs."""

from __future__ import annotations

import pytest
import torch

from funcprobe.demo_real import (RealDemoConfig, TrainedRun, _dapo_loss_pieces, arithmetic_pool, arithmetic_reward,
                                 probe_argv, trainer_config)


def test_arithmetic_reward_is_graded():
    completions = ["57", "57.", "The answer is 57", "58", "The answer is 60", "no idea", ""]
    rewards = arithmetic_reward(["p"] * len(completions), completions, ["57"] * len(completions))
    assert rewards[0] == pytest.approx(1.0) and rewards[1] == pytest.approx(1.0)   # the bare answer
    assert rewards[2] == pytest.approx(0.8)                                        # right, with words
    assert rewards[3] == pytest.approx(0.2 + 0.3 + 0.2)                            # off by one, bare
    assert rewards[4] == pytest.approx(0.2 + 0.6 / 4)                              # off by three, with words
    assert rewards[5] == rewards[6] == 0.0                                         # no number
    conversational = [[{"role": "assistant", "content": "57"}]]
    assert arithmetic_reward([[]], conversational, ["57"]) == [pytest.approx(1.0)]
    assert len(set(rewards)) == 5  # graded: responses of a group rarely tie


def test_prompt_pool_is_conversational_with_answers():
    rows = arithmetic_pool(5, seed=1, max_operand=10)
    assert rows == arithmetic_pool(5, seed=1, max_operand=10)
    for row in rows:
        system, user = row["prompt"]
        assert system["role"] == "system" and user["role"] == "user"
        a, b = (int(v) for v in user["content"].removeprefix("What is ").removesuffix("?").split(" + "))
        assert row["answer"] == str(a + b)


def test_trainer_config_is_read_as_the_trained_objective():
    from funcprobe.trainer_config import trainer_settings

    config = RealDemoConfig()
    settings = trainer_settings(trainer_config(config), source="demo")
    objective = settings.objective
    assert (objective.loss_type, objective.scale_rewards, objective.beta) == ("dapo", "group", 0.0)
    assert objective.max_grad_norm == config.max_grad_norm
    assert (settings.G, settings.max_new_tokens, settings.B) == (config.G, config.max_new_tokens, config.train_B)


def test_training_loss_is_the_objective_the_probe_assumes():
    """−∇ of the demo's dapo loss (ordinary autograd on the module, one prompt at a time, logits_to_keep) equals
    funcprobe's Ȳ for Objective(loss_type="dapo") on the same sampled batch."""
    from funcprobe import Objective, Policy, policy_gradient, sample_batch
    from funcprobe.testing import char_tokenizer, tiny_peft_model

    tokenizer = char_tokenizer()
    model = tiny_peft_model("qwen2", vocab_size=len(tokenizer), dtype=torch.float64, seed=5)
    policy = Policy.from_peft(model)
    prompts = ["1+2=", "13+4=", "5+60="]  # different lengths: left padding inside the batch
    sampled = sample_batch(policy, policy.params, prompts, G=3, max_new_tokens=5, seed=0, tokenizer=tokenizer,
                           scale_rewards="group",
                           reward_fn=lambda p, r, m: [[float(len(t)) + 0.1 * g for g, t in enumerate(group)]
                                                      for group in r])
    batch = sampled.batch
    _, ybar = policy_gradient(policy.params, batch, policy=policy,
                              objective=Objective(loss_type="dapo", scale_rewards="group"))

    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in policy.params.items():
            named[name].copy_(value)
    leaves = [named[name] for name in policy.params]
    for leaf in leaves:
        leaf.grad = None
    denominator = float(batch.response_mask.sum())
    for _, loss in _dapo_loss_pieces(model, batch, denominator=denominator):
        loss.backward()
    for name, leaf in zip(policy.params, leaves):
        torch.testing.assert_close(-leaf.grad, ybar[name].to(leaf.dtype), rtol=1e-9, atol=1e-12)
    assert any(float(leaf.grad.abs().max()) > 0 for leaf in leaves)


def test_probe_command_parses(tmp_path):
    from funcprobe.cli import parse_args

    config = RealDemoConfig()
    run = TrainedRun(out=tmp_path, checkpoint=tmp_path / "checkpoint-3", prompts=tmp_path / "prompts.jsonl",
                     trainer_config=tmp_path / "trainer_config.json", log_history=[], lora_A_norm=1.0,
                     lora_B_norm=1.0, seconds=0.0)
    args = parse_args(probe_argv(config, run, tmp_path / "out"))
    assert args.command == "probe" and args.B == config.B and args.eval_B == config.eval_B
    assert args.reward == ["funcprobe.demo_real:arithmetic_reward"]
    assert [float(eta) for eta in args.eta_sweep.split(",")] == pytest.approx(
        [factor * config.lr for factor in config.eta_factors])
    assert parse_args(["demo"]).quick is False and parse_args(["demo", "--quick"]).quick is True


def test_probe_config_is_the_printed_command_line(tmp_path):
    """The demo probes with pipeline.run_probe on probe_config(...), not through the command line; the command it
    prints must resolve to the same config (the record of the options as typed aside)."""
    import dataclasses
    import json

    from funcprobe.cli import parse_args, probe_config_from_args
    from funcprobe.demo_real import probe_config

    config = RealDemoConfig()
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "trainer_config.json").write_text(json.dumps(trainer_config(config)))
    run = TrainedRun(out=tmp_path, checkpoint=tmp_path / "checkpoint-3", prompts=tmp_path / "prompts.jsonl",
                     trainer_config=tmp_path / "trainer_config.json", log_history=[], lora_A_norm=1.0,
                     lora_B_norm=1.0, seconds=0.0)
    for plot in (True, False):
        from_cli = probe_config_from_args(parse_args(probe_argv(config, run, tmp_path / "out", plot=plot)))
        assert from_cli.record is not None
        assert dataclasses.replace(from_cli, record=None) == probe_config(config, run, tmp_path / "out", plot=plot)
