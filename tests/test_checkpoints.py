"""load_checkpoint on checkpoints written by a real training loop (examples/train_tiny_checkpoint.py)."""

from __future__ import annotations

import copy
import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch

from funcprobe import AdamState, rl_update
from funcprobe.checkpoints import Checkpoint, _checkpoint_dirs, load_checkpoint
from funcprobe.testing import random_batch

from conftest import load_example, naive_sequence_logprobs

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture(scope="module")
def run(tiny_run):
    """The shared quick training run (2 steps, a checkpoint after each); tests copy before they modify."""
    return tiny_run


@pytest.fixture(scope="module")
def loaded(run) -> Checkpoint:
    return load_checkpoint(run["checkpoints"][-1])


def _lora(module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}


def _assert_adam_equals_torch(adam: AdamState, state_dict: dict, param_names: list[list[str]]) -> None:
    """The AdamState equals a torch AdamW state dict, tensor for tensor and hyper-parameter for hyper-parameter."""
    seen = []
    for group, names in zip(state_dict["param_groups"], param_names):
        assert len(group["params"]) == len(names)
        for index, name in zip(group["params"], names):
            entry = state_dict["state"][index]
            assert torch.equal(adam.exp_avg[name], entry["exp_avg"]), name
            assert torch.equal(adam.exp_avg_sq[name], entry["exp_avg_sq"]), name
            assert adam.step[name] == int(entry["step"])
            hyper = adam.hyper[name]
            assert hyper.lr == group["lr"]
            assert hyper.betas == tuple(group["betas"])
            assert hyper.eps == group["eps"]
            assert hyper.weight_decay == group["weight_decay"]
            seen.append(name)
    assert sorted(seen) == sorted(adam.names)


def _copy_checkpoint(source: Path, target: Path, *, skip=()) -> Path:
    shutil.copytree(source, target, ignore=lambda _d, names: [n for n in names if n in skip])
    return target


# ------------------------------------------------------------------------------------------------ layout (a)
def test_hf_trainer_checkpoint_restores_the_live_optimizer(run, loaded):
    final = run["checkpoints"][-1]
    assert loaded.layout == "hf_trainer"
    assert loaded.path == final and loaded.adapter_dir == final
    assert loaded.optimizer_path == final / "optimizer.pt"
    assert loaded.step == 2 and loaded.trainer_state["global_step"] == 2
    assert len(loaded.trainer_state["log_history"]) == 2
    assert Path(loaded.base) == run["base_dir"]
    assert loaded.prompts_path == run["out"] / "prompts.jsonl"
    assert loaded.tokenizer is not None and len(loaded.tokenizer) == len(run["tokenizer"])

    live = run["optimizer_state_dict"]
    _assert_adam_equals_torch(loaded.adam, live, run["param_names"])
    reference = AdamState.from_torch(live, run["param_names"], loaded.params)
    for name in reference.names:
        assert torch.equal(loaded.adam.exp_avg[name], reference.exp_avg[name])
        assert torch.equal(loaded.adam.exp_avg_sq[name], reference.exp_avg_sq[name])
        assert loaded.adam.step[name] == reference.step[name] == 2
        assert loaded.adam.hyper[name] == reference.hyper[name]
    # The scheduler already moved the group's lr on: the stored lr is the one of step 3 (5e-3 · (1 − 0.5 · 2/2)).
    assert all(h.lr == pytest.approx(2.5e-3) for h in loaded.adam.hyper.values())


def test_policy_params_and_logprobs_match_the_trained_module(run, loaded):
    trained = _lora(run["peft_model"])
    assert list(loaded.params) == list(trained)
    for name, tensor in trained.items():
        assert torch.equal(loaded.params[name], tensor), name
    assert any(bool(t.abs().sum() > 0) for n, t in trained.items() if ".lora_B." in n), "B is still zero"

    batch = random_batch(2, 3, vocab_size=loaded.policy.vocab_size, seed=5)
    with torch.no_grad():
        naive = naive_sequence_logprobs(run["peft_model"], batch)
    torch.testing.assert_close(loaded.policy.sequence_logprobs(loaded.params, batch), naive, rtol=1e-5, atol=1e-4)
    trained_on = run["batches"][-1]
    with torch.no_grad():
        naive = naive_sequence_logprobs(run["peft_model"], trained_on)
    torch.testing.assert_close(loaded.policy.sequence_logprobs(loaded.params, trained_on), naive,
                               rtol=1e-5, atol=1e-4)


def test_loaded_state_predicts_the_next_real_optimizer_step(run, loaded):
    """rl_update from the checkpoint equals the training loop's own next AdamW step (at the scheduler's next lr)."""
    example = load_example("train_tiny_checkpoint")
    module = copy.deepcopy(run["peft_model"])
    groups, names = example.hf_param_groups(module, weight_decay=0.01)
    optimizer = torch.optim.AdamW(groups, lr=1.0)
    optimizer.load_state_dict(copy.deepcopy(run["optimizer_state_dict"]))  # load_state_dict shares tensors
    batch = run["batches"][0]  # any batch of the right vocabulary
    logprobs = example.naive_sequence_logprobs(module, batch)
    (-((batch.advantages / batch.length_norm[:, None]).float() * logprobs).mean()).backward()
    optimizer.step()

    new_params, new_state = rl_update(loaded.params, batch, policy=loaded.policy, adam=loaded.adam)
    for name, tensor in _lora(module).items():
        torch.testing.assert_close(new_params[name], tensor, rtol=1e-4, atol=2e-6)
    assert set(new_state.step.values()) == {3}


# ----------------------------------------------------------------------------------------------- run folder
def test_run_folder_picks_the_latest_checkpoint(run, loaded, caplog):
    with caplog.at_level(logging.INFO, logger="funcprobe.checkpoints"):
        checkpoint = load_checkpoint(run["out"])
    assert checkpoint.path == run["out"]
    assert checkpoint.adapter_dir == run["checkpoints"][-1] and checkpoint.step == 2
    assert "checkpoint-2" in caplog.text and "latest" in caplog.text
    for name in loaded.params:
        assert torch.equal(checkpoint.params[name], loaded.params[name])
        assert torch.equal(checkpoint.adam.exp_avg[name], loaded.adam.exp_avg[name])


def test_output_dir_with_final_adapter_but_no_optimizer_uses_latest_checkpoint(run, tmp_path, caplog):
    """HF Trainer's output_dir: trainer.save_model() put an adapter at the root, without optimizer state."""
    for name in ADAPTER_FILES:
        shutil.copy(run["checkpoints"][-1] / name, tmp_path / name)
    _copy_checkpoint(run["checkpoints"][0], tmp_path / "checkpoint-1")
    with caplog.at_level(logging.WARNING, logger="funcprobe.checkpoints"):
        checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.adapter_dir == tmp_path / "checkpoint-1" and checkpoint.step == 1
    assert "no optimizer.pt" in caplog.text and "optimizer=PATH" in caplog.text


def test_checkpoint_folders_sort_numerically(tmp_path):
    for name in ("checkpoint-9", "checkpoint-10", "checkpoint-x", "other"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-11").write_text("a file, not a folder")
    assert [n for n, _ in _checkpoint_dirs(tmp_path)] == [9, 10]


def test_earlier_checkpoint_loads_its_own_state(run):
    first = load_checkpoint(run["checkpoints"][0])
    assert first.step == 1 and set(first.adam.step.values()) == {1}
    saved = torch.load(run["checkpoints"][0] / "optimizer.pt", weights_only=True)
    _assert_adam_equals_torch(first.adam, saved, run["param_names"])


# ------------------------------------------------------------------------------------------- layouts (b), (c)
def test_adapter_in_model_dir_with_param_names_file(run, loaded, tmp_path):
    """Layout (b); the optimizer here has one group in reversed order, so only the names file can name it."""
    final = run["checkpoints"][-1]
    (tmp_path / "model").mkdir()
    for name in ADAPTER_FILES:
        shutil.copy(final / name, tmp_path / "model" / name)
    live = run["optimizer_state_dict"]
    flat_names = [n for names in run["param_names"] for n in names]
    flat_ids = [i for group in live["param_groups"] for i in group["params"]]
    order = list(reversed(range(len(flat_ids))))
    group = {k: v for k, v in live["param_groups"][0].items() if k != "params"}
    reordered = {"state": {new: live["state"][flat_ids[old]] for new, old in enumerate(order)},
                 "param_groups": [dict(group, params=list(range(len(order))))]}
    torch.save(reordered, tmp_path / "optimizer.pt")
    (tmp_path / "optimizer_param_names.json").write_text(json.dumps([flat_names[old] for old in order]))

    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.layout == "adapter_in_model_dir" and checkpoint.adapter_dir == tmp_path / "model"
    assert checkpoint.step is None and checkpoint.trainer_state is None
    assert checkpoint.tokenizer is not None  # from the base folder
    _assert_adam_equals_torch(checkpoint.adam, live, run["param_names"])


def test_bare_adapter_with_optimizer_argument(run, tmp_path):
    final = run["checkpoints"][-1]
    (tmp_path / "adapter").mkdir()
    for name in ADAPTER_FILES:
        shutil.copy(final / name, tmp_path / "adapter" / name)
    shutil.copy(final / "optimizer.pt", tmp_path / "state.pt")
    checkpoint = load_checkpoint(tmp_path / "adapter", optimizer=tmp_path / "state.pt")
    assert checkpoint.layout == "bare_adapter" and checkpoint.optimizer_path == tmp_path / "state.pt"
    assert checkpoint.prompts_path is None and checkpoint.step is None
    _assert_adam_equals_torch(checkpoint.adam, run["optimizer_state_dict"], run["param_names"])


def test_relative_base_path_resolves_against_the_adapter_dir(run, tmp_path):
    checkpoint_dir = _copy_checkpoint(run["checkpoints"][-1], tmp_path / "ckpt")
    (tmp_path / "base").symlink_to(run["base_dir"], target_is_directory=True)
    config_path = checkpoint_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "../base"
    config_path.write_text(json.dumps(config))
    checkpoint = load_checkpoint(checkpoint_dir)
    assert Path(checkpoint.base) == run["base_dir"]


# ------------------------------------------------------------------------------------------------------ errors
def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_folder_without_adapter(tmp_path):
    (tmp_path / "optimizer.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no LoRA adapter found .*adapter_config\.json.*model.*checkpoint-N"):
        load_checkpoint(tmp_path)


def test_no_optimizer_says_pass_optimizer(run, tmp_path):
    checkpoint_dir = _copy_checkpoint(run["checkpoints"][-1], tmp_path / "ckpt", skip=("optimizer.pt",))
    with pytest.raises(FileNotFoundError, match=r"no optimizer\.pt in .*ckpt.*optimizer=PATH"):
        load_checkpoint(checkpoint_dir)
    with pytest.raises(FileNotFoundError, match=r"optimizer=PATH"):
        load_checkpoint(checkpoint_dir, optimizer=tmp_path / "missing.pt")


def test_corrupt_optimizer_names_the_file(run, tmp_path):
    checkpoint_dir = _copy_checkpoint(run["checkpoints"][-1], tmp_path / "ckpt")
    (checkpoint_dir / "optimizer.pt").write_bytes(b"\x00garbage, not a torch file" * 10)
    with pytest.raises(ValueError, match=re.escape(str(checkpoint_dir / "optimizer.pt")) + ".*corrupt"):
        load_checkpoint(checkpoint_dir)


def test_base_not_found_says_pass_base(run, tmp_path):
    checkpoint_dir = _copy_checkpoint(run["checkpoints"][-1], tmp_path / "ckpt")
    config_path = checkpoint_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(tmp_path / "no-such-base")
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"no-such-base.*adapter_config\.json.*base=PATH"):
        load_checkpoint(checkpoint_dir)
    with pytest.raises(ValueError, match=r"not-a-cached/model.*base=PATH"):
        load_checkpoint(checkpoint_dir, base="not-a-cached/model", local_files_only=True)
    # base= overrides the broken config
    assert load_checkpoint(checkpoint_dir, base=run["base_dir"]).step == 2


def test_optimizer_of_another_adapter_rank(run, loaded, tmp_path):
    checkpoint_dir = _copy_checkpoint(run["checkpoints"][-1], tmp_path / "ckpt")
    rank2 = {}
    for name, tensor in loaded.params.items():
        shape = (2, tensor.shape[1]) if ".lora_A." in name else (tensor.shape[0], 2)
        rank2[name] = torch.zeros(shape)
    other = AdamState.zeros(rank2, lr=1e-3)
    state = other.to_torch_state_dict(list(rank2))
    torch.save(state, checkpoint_dir / "optimizer.pt")
    with pytest.raises(ValueError, match=re.escape(str(checkpoint_dir / "optimizer.pt")) + r".*'base_model\..*lora_"):
        load_checkpoint(checkpoint_dir)

    state["param_groups"][0]["params"] = state["param_groups"][0]["params"][:-2]
    state["state"] = {i: state["state"][i] for i in state["param_groups"][0]["params"]}
    torch.save(state, checkpoint_dir / "optimizer.pt")
    with pytest.raises(ValueError, match=re.escape(str(checkpoint_dir / "optimizer.pt")) + r".*26 parameters.*28"):
        load_checkpoint(checkpoint_dir)


def test_optimizer_in_another_order_names_file_and_tensor(run, tmp_path):
    """Same shapes overall but in another parameter order (no names file): caught per tensor after loading."""
    checkpoint_dir = _copy_checkpoint(run["checkpoints"][-1], tmp_path / "ckpt")
    live = copy.deepcopy(run["optimizer_state_dict"])
    ids = live["param_groups"][0]["params"]
    live["state"] = {i: live["state"][j] for i, j in zip(ids, reversed(ids))}
    torch.save(live, checkpoint_dir / "optimizer.pt")
    with pytest.raises(ValueError, match=re.escape(str(checkpoint_dir / "optimizer.pt"))
                       + r".*of 'base_model\..*lora_.*optimizer=PATH"):
        load_checkpoint(checkpoint_dir)
