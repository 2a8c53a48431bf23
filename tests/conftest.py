"""Shared fixtures: tiny models built offline from real transformers configs, and naive references."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from funcprobe.testing import tiny_peft_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tests run tiny models: one thread avoids the thread-pool overhead that dominates tiny ops (and contention when
# the 2 cores are shared).
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny tensors, restored after (a bench smoke test run in-process earlier may
    have set more): ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def naive_sequence_logprobs(peft_model, batch, *, temperature=1.0, logsoftmax_dtype=torch.float32):
    """S_{n,g} the slow, obvious way (spec §1): one ordinary forward of the whole module over all B·G sequences,
    full [N, L, V] logits, full log_softmax, gather, masked sum. Differentiable through the module's own
    parameters; returns float64 [B, G]."""
    B, G, L = batch.input_ids.shape
    input_ids = batch.input_ids.reshape(B * G, L)
    attention_mask = batch.attention_mask.reshape(B * G, L).long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = peft_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=False).logits
    log_probs = torch.log_softmax(logits.to(logsoftmax_dtype) / temperature, dim=-1)
    token_logprobs = log_probs[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    mask = batch.response_mask.reshape(B * G, L)[:, 1:].to(token_logprobs.dtype)
    return (token_logprobs * mask).sum(-1).to(torch.float64).reshape(B, G)


def warm_state(params, *, lr=0.01, weight_decay=0.1, step=4, seed=0):
    """An AdamW state as if a few steps had been taken (non-zero m and v, float64), via AdamState.from_torch."""
    from funcprobe.testing import warm_adam_state

    return warm_adam_state(params, lr=lr, weight_decay=weight_decay, step=step, seed=seed, v_floor=0.0,
                           dtype=torch.float64)


def module_state(module):
    """Clones of every parameter and buffer of a module, for purity checks."""
    return {name: tensor.detach().clone() for name, tensor in
            list(module.named_parameters()) + list(module.named_buffers())}


def assert_same_state(module, before):
    after = module_state(module)
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), f"{name} changed"


@pytest.fixture(scope="session")
def qwen2_peft_f64():
    return tiny_peft_model("qwen2", dtype=torch.float64, seed=3)


@pytest.fixture(scope="session")
def qwen2_peft_f32():
    return tiny_peft_model("qwen2", dtype=torch.float32, seed=4)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    """Import examples/NAME.py as a module (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One quick training run by examples/train_tiny_checkpoint.py (OUT/base, OUT/checkpoint-1, OUT/checkpoint-2,
    OUT/prompts.jsonl), shared by the checkpoint, CLI and example tests; main()'s result dict."""
    out = tmp_path_factory.mktemp("tiny_run")
    result = load_example("train_tiny_checkpoint").main(["--out", str(out), "--quick", "--seed", "3"],
                                                        echo=lambda *args: None)
    assert [Path(p).name for p in result["checkpoints"]] == ["checkpoint-1", "checkpoint-2"]
    return result


@pytest.fixture(scope="session")
def trl_run(tmp_path_factory):
    """A real TRL GRPOTrainer run by examples/train_trl_checkpoint.py (two steps: OUT/base, OUT/checkpoint-1,
    OUT/checkpoint-2, OUT/prompts.jsonl with conversational prompts, OUT/trainer_config.json), shared by the CLI and
    example tests; main()'s result dict. Skipped without trl ≥ 1.16."""
    pytest.importorskip("trl", minversion="1.16")
    pytest.importorskip("datasets")
    out = tmp_path_factory.mktemp("trl_run")
    result = load_example("train_trl_checkpoint").main(["--out", str(out)], echo=lambda *args: None)
    assert [Path(p).name for p in result["checkpoints"]] == ["checkpoint-1", "checkpoint-2"]
    return result


def cli_fails(capsys, argv: list[str], *expected: str) -> str:
    """Run ``funcprobe`` in-process; it must exit 2 with one line on stderr, no traceback, holding every ``expected``
    fragment. Returns the line."""
    from funcprobe.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"funcprobe {argv[0]}: error: ") and "Traceback" not in err
    for fragment in expected:
        assert fragment in lines[0], lines[0]
    return lines[0]
