"""Load a training checkpoint (LoRA adapter + AdamW state) into a ``Policy`` and an ``AdamState`` in one call.

``load_checkpoint(path)`` recognises three layouts:

* ``"hf_trainer"`` — an HF Trainer ``checkpoint-N/`` folder: ``adapter_config.json`` and
  ``adapter_model.safetensors`` (or ``.bin``) directly in it, ``optimizer.pt``, ``trainer_state.json``; the
  Trainer's ``scheduler.pt``, ``rng_state.pth``, ``training_args.bin`` … may be there and are ignored. A run folder
  holding ``checkpoint-N/`` subfolders is accepted too: the highest N is used (and logged, with a warning when
  there are several) — also when the run folder itself holds the final adapter of ``trainer.save_model()`` but no
  optimizer state (pass ``optimizer=`` to use that adapter instead).
* ``"adapter_in_model_dir"`` — a folder with the PEFT adapter in ``model/`` and ``optimizer.pt`` (plus an optional
  ``optimizer_param_names.json`` naming the optimizer's parameters) beside it.
* ``"bare_adapter"`` — an adapter folder alone; the optimizer state is given separately with ``optimizer=PATH (--optimizer PATH)``.

The base model is ``adapter_config.json``'s ``base_model_name_or_path`` (a hub id or a local path; a relative path is
tried against the adapter folder first, then the working directory), unless ``base=`` overrides it.

The hyper-parameters (lr, betas, eps, weight decay) come from the optimizer's parameter groups (``AdamState.hyper``).
About the learning rate: a scheduler (HF Trainer's default linear/cosine schedule) rewrites each group's ``lr`` after
every ``optimizer.step()``, so the ``lr`` stored in a checkpoint's ``optimizer.pt`` is already the learning rate of
the NEXT step — the step funcprobe predicts — not the one of the step that produced the checkpoint. That is what
``AdamState`` holds; override it with ``checkpoint.adam.with_lr(lr)`` if needed. ``scheduler.pt`` is not read.

The checkpoints of one run are compared on one loaded policy: :func:`checkpoint_dirs` lists a run folder's
``checkpoint-N/`` folders, :func:`adapter_params` reads another checkpoint's θ as a params dict of the loaded policy
(its module untouched), and :func:`read_run_checkpoint` adds that checkpoint's AdamW and trainer state (a missing
optimizer state is reported, not raised: ``load_checkpoint(..., require_optimizer=False)`` likewise).

Every problem is a ``ValueError`` (``FileNotFoundError`` for a missing path) whose message names the file and what to
pass (an unreadable ``trainer_state.json`` is only logged: it is metadata). Cheap checks (paths, base model location, optimizer file readable and matching the adapter's tensor count and
shapes) run before the base model is loaded, so a mismatch does not cost a large model load.
"""

from __future__ import annotations

import contextlib
import json
import math
import logging
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .adam import AdamState, normalise_param_names, optimizer_param_groups
from .policy import LORA_NAME_MARKERS, Policy, load_base_model, load_policy

__all__ = ["Checkpoint", "load_checkpoint", "load_adam_state", "LAYOUTS", "PARAM_NAMES_FILE", "checkpoint_dirs",
           "adapter_params", "RunCheckpoint", "read_run_checkpoint", "read_trainer_state"]

log = logging.getLogger(__name__)

#: The layouts ``load_checkpoint`` recognises (``Checkpoint.layout``).
LAYOUTS = ("hf_trainer", "adapter_in_model_dir", "bare_adapter")

_ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
#: HF Trainer writes optimizer.pt; accelerate's save_state writes optimizer.bin (the same torch.save'd state dict).
_OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")
_TRAINER_STATE = "trainer_state.json"
_PROMPTS_FILE = "prompts.jsonl"
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    """A loaded training checkpoint.

    Attributes:
        policy: the base model with the checkpoint's LoRA adapter (``policy.params`` are the adapter's tensors).
        adam: the AdamW state of those tensors; its lr is the lr of the next step (see the module docstring). None
            only when loaded with ``require_optimizer=False`` from a folder without an optimizer state.
        path: the folder given to ``load_checkpoint``.
        layout: "hf_trainer", "adapter_in_model_dir" or "bare_adapter".
        adapter_dir: the folder the adapter was read from (for a run folder: the chosen ``checkpoint-N``).
        optimizer_path: the optimizer state file read (None together with ``adam``).
        base: the base model id or path actually used.
        step: ``trainer_state.json``'s ``global_step``, or None when there is no trainer state.
        prompts_path: a ``prompts.jsonl`` in the checkpoint folder or its parent (the training prompts), or None.
        tokenizer: the tokenizer found in the adapter folder, the checkpoint folder or the base model, or None.
        trainer_state: the parsed ``trainer_state.json``, or None.
    """

    policy: Policy
    adam: AdamState | None
    path: Path
    layout: str
    adapter_dir: Path
    optimizer_path: Path | None
    base: str
    step: int | None
    prompts_path: Path | None
    tokenizer: Any | None
    trainer_state: dict | None

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """``policy.params``: the LoRA tensors θ at the checkpoint."""
        return self.policy.params

    def __repr__(self) -> str:
        step = "" if self.step is None else f", step={self.step}"
        return (f"Checkpoint({str(self.path)!r}, layout={self.layout!r}{step}, base={self.base!r}, "
                f"{self.policy!r})")


def load_checkpoint(path: str | os.PathLike, *, base: str | os.PathLike | nn.Module | None = None,
                    optimizer: str | os.PathLike | None = None, dtype: torch.dtype | str = torch.float32,
                    device: str | torch.device = "cpu", local_files_only: bool | None = None,
                    require_optimizer: bool = True, **policy_options) -> Checkpoint:
    """Load a checkpoint folder: base model + LoRA adapter as a ``Policy``, and the optimizer's ``AdamState``.

    Args:
        path: an HF Trainer ``checkpoint-N/`` folder, a run folder holding ``checkpoint-N/`` subfolders (the highest N
            is used), a folder with the adapter in ``model/`` and ``optimizer.pt`` beside it, or an adapter folder
            (then pass ``optimizer=``).
        base: the base model (hub id, local folder or a built ``transformers`` model), overriding the adapter
            config's ``base_model_name_or_path``.
        optimizer: the optimizer state file (or a folder holding ``optimizer.pt``), overriding the layout's default.
            An ``optimizer_param_names.json`` next to it names the optimizer's parameters (see ``load_adam_state``).
        dtype, device: of the policy (the optimizer state is cast to each parameter's dtype and device, as
            ``Optimizer.load_state_dict`` does). ``dtype`` may be a name such as "bfloat16".
        local_files_only: do not reach the hub for the base model or tokenizer (default: True for a local base, or
            when ``HF_HUB_OFFLINE=1``).
        require_optimizer: False: a checkpoint without an optimizer state (``save_only_model=True``) loads too,
            with ``adam`` and ``optimizer_path`` None (the policy alone: its entropy can be measured, its next step
            not predicted).
        policy_options: ``attn_implementation`` for the base model, and ``Policy`` options (temperature,
            logsoftmax_dtype, seq_chunk, token_chunk, …).

    Returns:
        A frozen :class:`Checkpoint`.

    Raises:
        FileNotFoundError: the folder, or the optimizer file, does not exist.
        ValueError: no adapter found; the base model cannot be found; the optimizer file is corrupt or holds the
            state of other tensors than the adapter's — each message names the file and what to pass.
    """
    dtype = _parse_dtype(dtype)
    given = Path(path)
    if not given.exists():
        raise FileNotFoundError(f"checkpoint folder '{given}' does not exist; pass the folder of a training "
                                "checkpoint (e.g. runs/x/checkpoint-200) or an adapter folder.")
    if not given.is_dir():
        raise ValueError(f"'{given}' is a file, not a checkpoint folder; pass the folder that holds "
                         f"{_ADAPTER_CONFIG} (and optimizer.pt), or an adapter folder with optimizer=PATH (--optimizer PATH).")

    folder, layout, adapter_dir = _find_adapter(given, optimizer is not None)
    optimizer_path = _find_optimizer(folder, layout, adapter_dir, optimizer,
                                     required=require_optimizer or optimizer is not None)
    _check_adapter_weights(adapter_dir)

    base_ref, base_label = _resolve_base(base, adapter_dir)
    if base is not None and isinstance(base_ref, Path):
        _check_same_base(base_ref, base_label, adapter_dir)
    if local_files_only is None:
        local_files_only = isinstance(base_ref, Path) or _offline()
    if isinstance(base_ref, str):
        _check_hub_base(base_ref, base_label, local_files_only)

    trainer_state = _read_trainer_state(folder, adapter_dir)
    if optimizer_path is not None:
        optimizer_steps = _precheck_optimizer(optimizer_path, adapter_dir)
        _check_step_counts(optimizer_steps, trainer_state, optimizer_path, folder)

    attn_implementation = policy_options.pop("attn_implementation", None)
    if isinstance(base_ref, nn.Module):
        model = base_ref
        base_name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
    else:
        base_name = str(base_ref)
        try:
            model = load_base_model(base_name, dtype=dtype, local_files_only=local_files_only,
                                    attn_implementation=attn_implementation)
        except (OSError, ValueError) as error:
            raise ValueError(f"could not load the base model '{base_name}' ({base_label}): {_first_line(error)}. "
                             "Pass base=PATH (funcprobe probe --base PATH): a local model folder or a hub id you can download.") from None
    try:
        policy = load_policy(model, adapter_dir, dtype=dtype, device=device, **policy_options)
    except RuntimeError as error:  # PEFT's load_state_dict: size mismatch between the adapter and the base
        if base is not None:
            named = _named_base(adapter_dir)
            fix = (f"the base given ({base_label}) is not the one the adapter was trained on"
                   + (f" ({_ADAPTER_CONFIG} names '{named}')" if named else "")
                   + ": pass the base it was trained on with base=PATH (--base PATH)")
        else:
            fix = ("is this the base the adapter was trained on? If not, pass the right one with base=PATH "
                   "(--base PATH)")
        raise ValueError(f"could not attach the adapter in '{adapter_dir}' to the base model '{base_name}': "
                         f"{_state_dict_error(error)}; {fix}.") from None

    try:
        adam = None if optimizer_path is None else load_adam_state(optimizer_path, policy.params)
    except ValueError as error:
        message = str(error)
        if str(optimizer_path) not in message:
            message = f"{optimizer_path}: {message}"
        raise ValueError(f"{message} (checkpoint '{folder}'; pass optimizer=PATH (--optimizer PATH) with the optimizer state saved "
                         "together with this adapter)") from None

    step = trainer_state.get("global_step") if trainer_state else None
    step = int(step) if isinstance(step, (int, float)) and not isinstance(step, bool) else None
    tokenizer = _load_tokenizer(adapter_dir, folder, base_ref, local_files_only)
    prompts_path = _find_prompts(folder)
    return Checkpoint(policy=policy, adam=adam, path=given, layout=layout, adapter_dir=adapter_dir,
                      optimizer_path=optimizer_path, base=base_name, step=step, prompts_path=prompts_path,
                      tokenizer=tokenizer, trainer_state=trainer_state)


# ------------------------------------------------------------------------------------------------- optimizer.pt
#: Name of the optional file next to ``optimizer.pt`` that lists the optimizer's parameter names (JSON: a list of
#: lists of names, one list per parameter group, or a flat list in the optimizer's parameter order).
PARAM_NAMES_FILE = "optimizer_param_names.json"

# HF Trainer's rule for parameters that get no weight decay (``Trainer.get_decay_parameter_names``: these patterns
# on the lower-cased full name, plus anything inside an ``nn.LayerNorm``, which a name alone cannot tell).
_HF_NO_DECAY_PATTERNS = tuple(
    re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
)



def _hf_split(groups: list[Mapping[str, Any]], params: Mapping[str, Tensor]) -> list[list[str]] | None:
    """HF Trainer layout: group 0 = decayed params, group 1 = non-decayed (λ = 0), each in named_parameters() order.

    Returns the two name lists if the name rule of ``Trainer.get_decay_parameter_names`` reproduces the group sizes,
    else None.
    """
    if len(groups) != 2 or float(groups[1].get("weight_decay", -1.0)) != 0.0:
        return None
    no_decay = [n for n in params if any(p.search(n.lower()) for p in _HF_NO_DECAY_PATTERNS)]
    decay = [n for n in params if n not in set(no_decay)]
    if len(groups[0]["params"]) == len(decay) and len(groups[1]["params"]) == len(no_decay):
        return [decay, no_decay]
    return None


def load_adam_state(path: str | os.PathLike, params: Mapping[str, Tensor], *,
                    param_names: Sequence[str] | Sequence[Sequence[str]] | None = None) -> AdamState:
    """Load an ``AdamState`` from an ``optimizer.pt`` (or a checkpoint directory holding one).

    The file is read with ``torch.load(path, map_location="cpu", weights_only=True)``; it may be a plain
    ``optimizer.state_dict()`` or an HF Trainer ``checkpoint-N/optimizer.pt`` (the same dict). The state tensors are
    then cast to each parameter's dtype and device (as ``Optimizer.load_state_dict`` does).

    The optimizer stores integer parameter ids, not names. They are named by, in this order of precedence:

    1. ``param_names`` if given (a flat list in the optimizer's order, or a list of lists, one per param group);
    2. the ``"param_names"`` that torch ≥ 2.5 stores in each param group when the optimizer was built from
       ``named_parameters()``, if they are exactly the keys of ``params``;
    3. ``optimizer_param_names.json`` next to ``optimizer.pt`` (a JSON flat list or list of lists of names);
    4. the HF Trainer layout — two groups, the second with weight_decay 0 — when Trainer's name rule for
       non-decayed parameters (names containing "bias", "layernorm", "rmsnorm", "norm" …) reproduces the group
       sizes: group 0 = decayed names, group 1 = the others, each in ``params``' dict order;
    5. otherwise the optimizer's parameter ids are assumed to enumerate the names of ``params`` in dict order, i.e.
       ``params`` is in the order of the trainable ``model.named_parameters()`` the optimizer was built from (true
       for an HF Trainer on a LoRA model, where every LoRA weight is decayed and group 1 is empty).

    Shapes are always checked, so a wrong order between tensors of different shapes is caught; an order mismatch
    between same-shaped tensors is not detectable, which is why (1)–(3) exist. Corrupt or mismatched files raise a
    ``ValueError`` naming the file and what to pass.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "optimizer.pt")
    if not os.path.isfile(path):
        raise ValueError(f"optimizer state file {path!r} does not exist; pass the path of an optimizer.pt (or of "
                         "the checkpoint directory holding it)")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to unpickle means the same thing to the user
        raise ValueError(f"could not load {path!r} with torch.load(weights_only=True): the file is corrupt or is not "
                         f"an optimizer state dict ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                         "Pass the optimizer.pt written by optimizer.state_dict() / HF Trainer") from None
    source = repr(path)
    groups = optimizer_param_groups(sd, source)

    if param_names is None:
        embedded = [g.get("param_names") for g in groups]
        if all(isinstance(e, (list, tuple)) for e in embedded) and groups:
            flat = [n for e in embedded for n in e]
            if len(flat) == len(params) and set(flat) == set(params):
                param_names = [list(e) for e in embedded]
    if param_names is None:
        names_file = os.path.join(os.path.dirname(path), PARAM_NAMES_FILE)
        if os.path.isfile(names_file):
            try:
                with open(names_file, encoding="utf-8") as f:
                    param_names = json.load(f)
                normalise_param_names(param_names)
            except (OSError, ValueError) as e:
                raise ValueError(f"{names_file!r} is not a JSON list (or list of lists) of parameter names ({e}); "
                                 "fix or delete it, or pass param_names explicitly") from None
            source = f"{source} (names from {names_file!r})"
    if param_names is None:
        param_names = _hf_split(groups, params)
    if param_names is None:
        param_names = list(params)
    try:
        return AdamState.from_torch(sd, param_names, params, source=source)
    except ValueError as e:
        if "names" not in str(e) and "parameters" not in str(e):
            raise
        raise ValueError(f"{e}. (To name the optimizer's parameters pass param_names=[[group 0 names], [group 1 "
                         f"names], …] or write {PARAM_NAMES_FILE} next to optimizer.pt.)") from None


# ------------------------------------------------------------------------------------------------------- layout
def _is_adapter(folder: Path) -> bool:
    return (folder / _ADAPTER_CONFIG).is_file()


def _has_optimizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _OPTIMIZER_FILES)


def checkpoint_dirs(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """The ``checkpoint-N`` subfolders of ``folder`` as (N, path), ascending in N (numeric: 10 after 9)."""
    folder = Path(folder)
    found = []
    for child in folder.iterdir():
        match = _CHECKPOINT_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


_checkpoint_dirs = checkpoint_dirs


def _find_adapter(given: Path, optimizer_given: bool) -> tuple[Path, str, Path]:
    """(checkpoint folder, layout, adapter folder) for the folder given."""
    checkpoints = _checkpoint_dirs(given)
    if _is_adapter(given) and not (checkpoints and not optimizer_given and not _has_optimizer(given)):
        layout = "hf_trainer" if _has_optimizer(given) or (given / _TRAINER_STATE).is_file() else "bare_adapter"
        return given, layout, given
    if _is_adapter(given / "model"):
        return given, "adapter_in_model_dir", given / "model"
    if checkpoints:
        _, chosen = checkpoints[-1]
        if _is_adapter(given):
            # An HF Trainer output_dir: trainer.save_model() put the final adapter here without optimizer state.
            log.warning("'%s' holds an adapter but no optimizer.pt; using its latest checkpoint, %s, which has both. "
                        "Pass optimizer=PATH (--optimizer PATH) to use the adapter in '%s' itself.", given, chosen.name, given)
        elif len(checkpoints) > 1:
            log.warning("'%s' holds %d checkpoints (%s and %s); using the latest, %s. Pass a checkpoint-N folder "
                        "to choose another.", given, len(checkpoints), ", ".join(p.name for _, p in checkpoints[:-1]),
                        chosen.name, chosen.name)
        else:
            log.info("using %s, the only checkpoint in '%s'", chosen.name, given)
        if not _is_adapter(chosen):
            raise ValueError(f"the latest checkpoint '{chosen}' holds no {_ADAPTER_CONFIG} (an incomplete save?); "
                             "pass an earlier checkpoint-N folder explicitly.")
        layout = "hf_trainer" if _has_optimizer(chosen) or (chosen / _TRAINER_STATE).is_file() else "bare_adapter"
        return chosen, layout, chosen
    if (given / "config.json").is_file() and _model_weight_files(given):
        raise ValueError(f"'{given}' is a full model (config.json and {_model_weight_files(given)[0].name}, no "
                         f"{_ADAPTER_CONFIG}): a full fine-tune or a base model, not a LoRA adapter. funcprobe "
                         "probes LoRA training: pass the checkpoint folder of a LoRA run (peft's LoraConfig, e.g. "
                         "GRPOTrainer(..., peft_config=LoraConfig(...))), which holds adapter_config.json.")
    raise ValueError(
        f"no LoRA adapter found in '{given}': looked for {given / _ADAPTER_CONFIG} (an HF Trainer checkpoint-N "
        f"folder or a bare adapter), {given / 'model' / _ADAPTER_CONFIG} (adapter in model/ with optimizer.pt "
        f"beside it) and checkpoint-N/ subfolders (a run folder). Pass the folder that holds {_ADAPTER_CONFIG}.")


def _find_optimizer(folder: Path, layout: str, adapter_dir: Path, optimizer, *, required: bool = True) -> Path | None:
    if optimizer is not None:
        given = Path(optimizer)
        if given.is_dir():
            files = [given / name for name in _OPTIMIZER_FILES if (given / name).is_file()]
            if not files:
                raise FileNotFoundError(f"optimizer='{given}' is a folder without optimizer.pt; pass the optimizer "
                                        "state file itself (optimizer=PATH/optimizer.pt (--optimizer PATH/optimizer.pt)).")
            return files[0]
        if not given.is_file():
            raise FileNotFoundError(f"optimizer file '{given}' does not exist; pass optimizer=PATH (--optimizer PATH) to the "
                                    "optimizer.pt saved with this adapter.")
        return given
    for name in _OPTIMIZER_FILES:
        if (folder / name).is_file():
            return folder / name
    if not required:
        return None
    where = f"'{folder}'" if layout != "adapter_in_model_dir" else f"'{folder}' (beside model/)"
    raise FileNotFoundError(f"no optimizer.pt in {where}: found the adapter in '{adapter_dir}' but no AdamW state. "
                            "Pass optimizer=PATH (--optimizer PATH) (the optimizer.pt saved with this adapter, e.g. by HF Trainer's "
                            "save_only_model=False).")


def _check_adapter_weights(adapter_dir: Path) -> None:
    if not any((adapter_dir / name).is_file() for name in _ADAPTER_WEIGHTS):
        raise ValueError(f"'{adapter_dir}' has {_ADAPTER_CONFIG} but no adapter weights (looked for "
                         f"{' and '.join(_ADAPTER_WEIGHTS)}); the checkpoint is incomplete. Pass a complete "
                         "checkpoint folder.")


# --------------------------------------------------------------------------------------------------------- base
def _looks_like_path(name: str) -> bool:
    """True unless ``name`` has the form of a hub id (``name`` or ``org/name``)."""
    if os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name:
        return True
    return re.fullmatch(r"[\w][\w.\-]*(/[\w][\w.\-]*)?", name) is None


def _base_candidates(name: str, adapter_dir: Path) -> list[Path]:
    """Where a base named ``name`` may be on disk: the path itself when absolute, else relative to the adapter's
    folder first, then to the working directory (``~`` expanded)."""
    expanded = os.path.expanduser(name)
    return [Path(expanded)] if os.path.isabs(expanded) else [adapter_dir / expanded, Path(expanded)]


def _resolve_base(base, adapter_dir: Path) -> tuple[Path | str | nn.Module, str]:
    """(a local Path, a hub id, or a module; a label saying where it came from)."""
    if isinstance(base, nn.Module):
        return base, "base="
    if base is not None:
        name, label = os.fspath(base), f"base={os.fspath(base)!r}"
    else:
        config_path = adapter_dir / _ADAPTER_CONFIG
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ValueError(f"{config_path} is not valid JSON ({_first_line(error)}); fix it or pass a complete "
                             "adapter folder.") from None
        name = config.get("base_model_name_or_path") if isinstance(config, dict) else None
        if not name:
            raise ValueError(f"{config_path} names no base_model_name_or_path; pass base=PATH (--base PATH; the base model the "
                             "adapter was trained on).")
        label = f"base_model_name_or_path in {config_path}"
    candidates = _base_candidates(name, adapter_dir)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve(), label
    files = [c for c in candidates if c.is_file()]
    if files:
        folder = files[0].parent
        raise ValueError(f"the base model '{name}' ({label}) is a file, not a model folder; pass the folder that "
                         f"holds it: base='{folder}' (--base {folder}).")
    if _looks_like_path(name):
        looked = " or ".join(f"'{c}'" for c in candidates)
        raise ValueError(f"the base model '{name}' ({label}) was not found: no folder {looked}. Pass base=PATH (--base PATH) "
                         "(the local folder of the base model the adapter was trained on).")
    return name, label


_MODEL_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                  "pytorch_model.bin.index.json")
#: The config.json fields that make two base models different architectures (same LoRA shapes or not).
_BASE_CONFIG_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                       "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")


def _model_weight_files(folder: Path) -> list[Path]:
    """A full model's weight files in ``folder`` (not an adapter's)."""
    found = [folder / name for name in _MODEL_WEIGHTS if (folder / name).is_file()]
    return found or sorted(p for p in folder.glob("model-*-of-*.safetensors") if p.is_file())


def _named_base(adapter_dir: Path) -> str | None:
    """The adapter config's base_model_name_or_path, or None when unreadable."""
    try:
        config = json.loads((adapter_dir / _ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    return name if isinstance(name, str) and name else None


def _named_base_folder(adapter_dir: Path) -> Path | None:
    """The adapter config's base as a local folder when it is one that exists (None: a hub id, a moved folder)."""
    name = _named_base(adapter_dir)
    if name is None:
        return None
    for candidate in _base_candidates(name, adapter_dir):
        if candidate.is_dir():
            return candidate.resolve()
    return None


def _safetensors_index(folder: Path) -> dict[str, Path]:
    """{tensor name: file} over the folder's model safetensors files (the adapter's excluded)."""
    from safetensors import safe_open

    index = {}
    for file in sorted(folder.glob("*.safetensors")):
        if file.name.startswith("adapter_model"):
            continue
        with safe_open(str(file), framework="pt") as handle:
            index.update(dict.fromkeys(handle.keys(), file))
    return index


def _base_difference(given: Path, named: Path) -> str | None:
    """How the two base folders differ (config.json's architecture fields, then the weights: names, shapes, and the
    first rows of every tensor — cheap), or None when no difference was found (or they cannot be compared)."""
    configs = []
    for folder in (given, named):
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        configs.append(config if isinstance(config, dict) else {})
    for field in _BASE_CONFIG_FIELDS:
        if configs[0].get(field) != configs[1].get(field):
            return f"config.json {field} {configs[0].get(field)!r} vs {configs[1].get(field)!r}"
    try:
        from safetensors import safe_open

        mine, theirs = _safetensors_index(given), _safetensors_index(named)
        with contextlib.ExitStack() as stack:
            handles = {file: stack.enter_context(safe_open(str(file), framework="pt"))
                       for file in {*mine.values(), *theirs.values()}}
            for key in (key for key in mine if key in theirs):
                a, b = handles[mine[key]], handles[theirs[key]]
                sa, sb = a.get_slice(key), b.get_slice(key)
                shape_a, shape_b = tuple(sa.get_shape()), tuple(sb.get_shape())
                if shape_a != shape_b:
                    return f"tensor '{key}' has shape {shape_a} vs {shape_b}"
                if not shape_a:
                    x, y = a.get_tensor(key), b.get_tensor(key)
                else:
                    x, y = sa[:min(shape_a[0], 2)], sb[:min(shape_b[0], 2)]
                if x.dtype == y.dtype:
                    same = torch.equal(x, y)
                else:  # the same model saved in another dtype: equal to the coarser one's rounding
                    same = torch.allclose(x.double(), y.double(), rtol=2 ** -7, atol=1e-6)
                if not same:
                    return f"tensor '{key}' has other values"
    except Exception:  # noqa: BLE001 - unreadable weights: nothing to say, loading reports them
        return None
    return None


def _check_same_base(base_ref: Path, label: str, adapter_dir: Path) -> None:
    """A base given (``base=``) where the adapter config names a local base folder that exists and differs: the
    adapter would be attached to a model it was not trained on — silently wrong numbers when the LoRA shapes agree.
    A named base that is not a local folder (a hub id, a moved folder) is not compared: users move base models."""
    named = _named_base_folder(adapter_dir)
    if named is None or named == base_ref.resolve():
        return
    difference = _base_difference(base_ref, named)
    if difference is None:
        return
    raise ValueError(f"the base model '{base_ref}' ({label}) is not the one the adapter in '{adapter_dir}' was "
                     f"trained on: its {_ADAPTER_CONFIG} names '{named}', which exists and differs ({difference}). "
                     f"Leave base= (--base) out to use '{named}', or, if the adapter was trained on '{base_ref}', "
                     f"set base_model_name_or_path in {adapter_dir / _ADAPTER_CONFIG} to it.")


def _state_dict_error(error: BaseException) -> str:
    """torch's load_state_dict error cut to its first problem (its first line is only "Error(s) in loading
    state_dict for PeftModel:")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        detail = lines[1].rstrip(".")
        return detail if len(detail) <= 300 else detail[:299] + "…"
    return _first_line(error)


def _offline() -> bool:
    truthy = ("1", "true", "yes", "on")
    if any(os.environ.get(k, "").strip().lower() in truthy for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants
        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # noqa: BLE001 - a missing/old huggingface_hub just means "not known to be offline"
        return False


def _hub_unreachable(timeout_s: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached from here (a failed name lookup or connection, within
    ``timeout_s``), or None when it can — or when a proxy is configured (then only a real request can tell)."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as error:
        return f"{endpoint} cannot be reached ({error.strerror or error})"


def _check_hub_base(name: str, label: str, local_files_only: bool) -> None:
    """A hub id that is not in the local cache, while offline or with no network: say so at once, before trying to
    load (``from_pretrained`` would otherwise spend most of a minute in retries before the same conclusion)."""
    try:
        from huggingface_hub import try_to_load_from_cache
        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 - an invalid id etc.: let from_pretrained report it
        return
    if isinstance(cached, str):
        return
    if not local_files_only:
        reason = _hub_unreachable()
        if reason is not None:
            raise ValueError(f"the base model '{name}' ({label}) is not in the local Hugging Face cache and {reason}. "
                             "Pass base=PATH (--base PATH: a local model folder), or download it where there is a "
                             "network first.")
        return
    if not isinstance(cached, str):
        raise ValueError(f"the base model '{name}' ({label}) is not in the local Hugging Face cache and loading is "
                         "offline (local_files_only / HF_HUB_OFFLINE=1). Pass base=PATH (--base PATH: a local model folder), or "
                         "download it first.")


# ---------------------------------------------------------------------------------------------------- optimizer
def _adapter_lora_shapes(adapter_dir: Path) -> dict[str, tuple[int, ...]] | None:
    """Names (as saved) and shapes of the LoRA tensors in adapter_model.safetensors; None without safetensors."""
    file = adapter_dir / "adapter_model.safetensors"
    if not file.is_file():
        return None
    try:
        from safetensors import safe_open

        shapes = {}
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if any(marker.rstrip(".") in key for marker in LORA_NAME_MARKERS):
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
        return shapes
    except Exception as error:  # noqa: BLE001
        raise ValueError(f"could not read '{file}' ({_first_line(error)}); the adapter file is corrupt. Pass a "
                         "complete checkpoint folder.") from None


def _torch_load(path: Path) -> Any:
    """torch.load(weights_only) memory-mapped when possible (cheap: tensor data is not read)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - a legacy (non-zip) file cannot be mmapped: read it plainly
        return torch.load(path, map_location="cpu", weights_only=True)


def _optimizer_steps(state_dict: Mapping[str, Any]) -> set[int]:
    """The distinct Adam step counts t of the state's entries (one per parameter; all equal after a normal run)."""
    steps = set()
    for entry in state_dict.get("state", {}).values():
        value = entry.get("step") if isinstance(entry, dict) else None
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value)):
            steps.add(int(round(float(value))))
    return steps


def _check_step_counts(optimizer_steps: set[int], trainer_state: Mapping[str, Any] | None, optimizer_path: Path,
                       folder: Path) -> None:
    """The optimizer state must be the one saved with this checkpoint: its Adam step count t equals the trainer
    state's ``global_step`` (HF Trainer steps the optimizer once per global step). Another checkpoint's optimizer.pt
    gives another t — and other moments — so δH₁ would be of a step this checkpoint never takes."""
    global_step = trainer_state.get("global_step") if isinstance(trainer_state, dict) else None
    source = _TRAINER_STATE
    if isinstance(global_step, bool) or not isinstance(global_step, (int, float)):
        # No trainer state: HF Trainer names its checkpoint folders checkpoint-{global_step}.
        match = _CHECKPOINT_DIR.match(folder.name)
        global_step = int(match.group(1)) if match else None
        source = f"its folder name {folder.name}, HF Trainer's checkpoint-{{global_step}}; no {_TRAINER_STATE}"
    if global_step is None or not optimizer_steps:
        return
    global_step = int(global_step)
    if optimizer_steps == {global_step}:
        return
    found = ", ".join(str(t) for t in sorted(optimizer_steps))
    raise ValueError(f"'{optimizer_path}' is the optimizer state after {found} step{'s' if found != '1' else ''}, "
                     f"but the checkpoint '{folder}' is at global_step {global_step} ({source}): the "
                     "optimizer state belongs to another checkpoint. Pass optimizer=PATH (--optimizer PATH) to the "
                     f"optimizer.pt saved with this checkpoint (e.g. checkpoint-{global_step}/optimizer.pt).")


def _precheck_optimizer(optimizer_path: Path, adapter_dir: Path) -> set[int]:
    """Before the base model is loaded: the optimizer file loads, and its state matches the adapter's tensors.

    The count and the multiset of shapes are compared (order-independent, so never stricter than
    ``load_adam_state``, which later checks names and per-tensor shapes). Returns the state's step counts
    (:func:`_optimizer_steps`).
    """
    try:
        state_dict = _torch_load(optimizer_path)
    except Exception as error:  # noqa: BLE001 - any failure to unpickle means the same thing to the user
        raise ValueError(f"could not load '{optimizer_path}' with torch.load(weights_only=True): the file is corrupt "
                         f"or not an optimizer state dict ({type(error).__name__}: {_first_sentence(error)}). Pass "
                         "optimizer=PATH (--optimizer PATH) to the optimizer.pt written by optimizer.state_dict() / HF Trainer.") from None
    if not (isinstance(state_dict, dict) and isinstance(state_dict.get("state"), dict)
            and isinstance(state_dict.get("param_groups"), (list, tuple))):
        found = list(state_dict)[:8] if isinstance(state_dict, dict) else type(state_dict).__name__
        raise ValueError(f"'{optimizer_path}' is not a torch optimizer state dict (expected keys 'state' and "
                         f"'param_groups', found {found}). Pass optimizer=PATH (--optimizer PATH) to the optimizer.pt of this run.")
    steps = _optimizer_steps(state_dict)
    lora = _adapter_lora_shapes(adapter_dir)
    if not lora:
        return steps
    groups = state_dict["param_groups"]
    if not all(isinstance(g, dict) and isinstance(g.get("params"), (list, tuple)) for g in groups):
        return steps  # malformed groups: load_adam_state reports them precisely
    count = sum(len(g["params"]) for g in groups)
    if count != len(lora):
        raise ValueError(f"'{optimizer_path}' holds optimizer state for {count} parameters but the adapter in "
                         f"'{adapter_dir}' has {len(lora)} LoRA tensors: the optimizer state belongs to other "
                         "tensors. Pass optimizer=PATH (--optimizer PATH) to the optimizer.pt saved with this adapter.")
    state_shapes = Counter()
    for entry in state_dict["state"].values():
        exp_avg = entry.get("exp_avg") if isinstance(entry, dict) else None
        if isinstance(exp_avg, torch.Tensor):
            state_shapes[tuple(exp_avg.shape)] += 1
    if sum(state_shapes.values()) != len(lora):
        return steps  # some parameters without state (never stepped), or a non-Adam state: leave it to load_adam_state
    missing = Counter(lora.values()) - state_shapes
    if missing:
        shape = next(iter(missing))
        name = next(n for n, s in lora.items() if s == shape)
        unexpected = next(iter(state_shapes - Counter(lora.values())), None)
        raise ValueError(f"'{optimizer_path}' holds optimizer state for other tensors than the adapter in "
                         f"'{adapter_dir}': the adapter's '{name}' has shape {shape} but no exp_avg in the optimizer "
                         f"has that shape (the optimizer has e.g. {unexpected}; another adapter rank or target "
                         "modules?). Pass optimizer=PATH (--optimizer PATH) to the optimizer.pt saved with this adapter.")
    return steps


# ----------------------------------------------------------------------------------------------- side files
def _read_trainer_state(folder: Path, adapter_dir: Path) -> dict | None:
    for candidate in dict.fromkeys([folder / _TRAINER_STATE, adapter_dir / _TRAINER_STATE]):
        if candidate.is_file():
            try:
                state = json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                log.warning("ignoring '%s': not valid JSON (%s)", candidate, _first_line(error))
                return None
            return state if isinstance(state, dict) else None
    return None


def _find_prompts(folder: Path) -> Path | None:
    for candidate in (folder / _PROMPTS_FILE, folder.parent / _PROMPTS_FILE):
        if candidate.is_file():
            return candidate
    return None


def _load_tokenizer(adapter_dir: Path, folder: Path, base_ref, local_files_only: bool) -> Any | None:
    from transformers import AutoTokenizer

    candidates: list[tuple[str, bool]] = []
    for directory in dict.fromkeys([adapter_dir, folder]):
        if any((directory / name).is_file() for name in _TOKENIZER_FILES):
            candidates.append((str(directory), True))
    if isinstance(base_ref, Path):
        if any((base_ref / name).is_file() for name in _TOKENIZER_FILES):
            candidates.append((str(base_ref), True))
    elif isinstance(base_ref, str):
        candidates.append((base_ref, local_files_only))
    for name, local in candidates:
        try:
            return AutoTokenizer.from_pretrained(name, local_files_only=local)
        except Exception as error:  # noqa: BLE001 - a tokenizer is optional: try the next place
            log.info("no tokenizer from '%s' (%s)", name, _first_line(error))
    return None


# --------------------------------------------------------------------------------- the checkpoints of one run
#: adapter_config.json fields that decide the function an adapter computes: checkpoints compared on one loaded
#: policy must agree on them (another base, rank, scaling or target set is another model, not another θ).
_ADAPTER_FUNCTION_FIELDS = ("base_model_name_or_path", "peft_type", "r", "lora_alpha", "use_rslora", "use_dora",
                            "target_modules", "rank_pattern", "alpha_pattern", "layers_to_transform", "bias",
                            "modules_to_save")


def _saved_key(name: str, adapter: str) -> str:
    """The key PEFT saves a model parameter under: the adapter name removed (PEFT's
    ``_remove_adapter_name_from_state_dict_key``: "….lora_A.default.weight" → "….lora_A.weight",
    "….lora_embedding_A.default" → "….lora_embedding_A")."""
    if name.endswith(f".{adapter}"):
        return name[:-len(adapter) - 1]
    head, _, suffix = name.rpartition(".")
    head = re.sub(re.escape(f".{adapter}") + r"$", "", head)
    return f"{head}.{suffix}"


def _comparable(field: str, value: Any) -> Any:
    if field == "target_modules" and isinstance(value, (list, tuple, set, frozenset)):
        return sorted(value)
    return value


def _check_same_adapter(adapter_dir: Path, policy: Policy, adapter: str) -> None:
    config_path = adapter_dir / _ADAPTER_CONFIG
    try:
        saved = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{config_path} is not valid JSON ({_first_line(error)}); fix it or drop that "
                         "checkpoint.") from None
    loaded = getattr(policy.module, "peft_config", {}).get(adapter)
    if loaded is None or not isinstance(saved, dict):
        return
    loaded = loaded.to_dict()
    for name in _ADAPTER_FUNCTION_FIELDS:
        if name in saved and name in loaded and _comparable(name, saved[name]) != _comparable(name, loaded[name]):
            raise ValueError(f"{config_path} has {name}={saved[name]!r} but the adapter loaded for this run has "
                             f"{loaded[name]!r}: the checkpoints are of different adapters, not of one training run. "
                             "Compare checkpoints of one run (one LoRA configuration).")


def _adapter_weights(adapter_dir: Path) -> dict[str, Tensor]:
    safetensors_file = adapter_dir / "adapter_model.safetensors"
    try:
        if safetensors_file.is_file():
            from safetensors.torch import load_file

            return load_file(str(safetensors_file), device="cpu")
        return torch.load(adapter_dir / "adapter_model.bin", map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure to read the weights means the same thing
        raise ValueError(f"could not read the adapter weights in '{adapter_dir}' ({_first_line(error)}); the file is "
                         "corrupt or incomplete. Drop that checkpoint or save it again.") from None


def adapter_params(adapter_dir: str | os.PathLike, policy: Policy) -> dict[str, Tensor]:
    """θ of the adapter saved in ``adapter_dir``, as a params dict of ``policy``: keyed by the policy's PEFT names,
    with its shapes, dtype and device. The policy and its module are not touched — this is how the checkpoints of
    one run are compared on one loaded base model (``funcprobe.trajectory``).

    Raises ValueError when the folder holds no (readable) adapter weights, its adapter_config.json differs from the
    policy's adapter in a field that changes the function (rank, alpha, targets, …), or its tensors are not exactly
    the policy's LoRA tensors (names or shapes).
    """
    adapter_dir = Path(adapter_dir)
    if not _is_adapter(adapter_dir):
        raise ValueError(f"'{adapter_dir}' holds no {_ADAPTER_CONFIG}: not an adapter checkpoint. Pass a "
                         "checkpoint-N folder saved with the adapter.")
    _check_adapter_weights(adapter_dir)
    adapter = getattr(policy.module, "active_adapter", "default")
    adapter = adapter if isinstance(adapter, str) else "default"
    _check_same_adapter(adapter_dir, policy, adapter)
    weights = _adapter_weights(adapter_dir)
    params: dict[str, Tensor] = {}
    for name, current in policy.params.items():
        key = _saved_key(name, adapter)
        if key not in weights:
            raise ValueError(f"'{adapter_dir}' holds no tensor '{key}' (the policy's '{name}'): the adapter was saved "
                             "with other target modules or another PEFT layout. Compare checkpoints of one run.")
        tensor = weights.pop(key)
        if tuple(tensor.shape) != tuple(current.shape):
            raise ValueError(f"'{adapter_dir}': '{key}' has shape {tuple(tensor.shape)} but the policy's has "
                             f"{tuple(current.shape)} (another LoRA rank?). Compare checkpoints of one run.")
        params[name] = tensor.to(device=current.device, dtype=current.dtype)
    extra = [key for key in weights if any(marker.rstrip(".") in key for marker in LORA_NAME_MARKERS)]
    if extra:
        raise ValueError(f"'{adapter_dir}' holds {len(extra)} LoRA tensors the policy does not have (e.g. "
                         f"'{extra[0]}'): another adapter layout. Compare checkpoints of one run.")
    return params


@dataclass(frozen=True)
class RunCheckpoint:
    """One ``checkpoint-N`` of a run, read against an already loaded policy (:func:`read_run_checkpoint`).

    Attributes:
        step: N of the folder name. folder: the folder. params: θ_N (:func:`adapter_params`).
        adam: the AdamW state saved with it, or None — then ``optimizer_reason`` says why (no optimizer.pt, or one
            that does not load or belongs to another step); optimizer_path: the file found, or None.
        trainer_state: the parsed trainer_state.json, or None; global_step: its ``global_step``, or None.
    """

    step: int
    folder: Path
    params: dict[str, Tensor]
    adam: AdamState | None
    optimizer_path: Path | None
    optimizer_reason: str | None
    trainer_state: dict | None
    global_step: int | None


def read_trainer_state(folder: str | os.PathLike) -> dict | None:
    """The parsed ``trainer_state.json`` of a checkpoint folder (``global_step``, ``log_history``, …), or None when
    there is none or it is not valid JSON (logged: it is metadata)."""
    folder = Path(folder)
    return _read_trainer_state(folder, folder)


def read_run_checkpoint(folder: str | os.PathLike, policy: Policy, *, step: int) -> RunCheckpoint:
    """θ, the AdamW state and the trainer state of one checkpoint folder, against ``policy`` (loaded once for the
    whole run). A missing or unusable optimizer state is not an error here: ``adam`` is None with the reason (the
    policy's entropy can still be measured). Raises ValueError for an adapter that does not fit the policy."""
    folder = Path(folder)
    params = adapter_params(folder, policy)
    trainer_state = read_trainer_state(folder)
    global_step = trainer_state.get("global_step") if trainer_state else None
    global_step = int(global_step) if isinstance(global_step, (int, float)) and not isinstance(global_step, bool) \
        else None
    path = next((folder / name for name in _OPTIMIZER_FILES if (folder / name).is_file()), None)
    adam, reason = None, None
    if path is None:
        reason = (f"no optimizer.pt in '{folder}' (saved with save_only_model=True?): without the AdamW state the "
                  "next step cannot be predicted")
    else:
        try:
            _check_step_counts(_precheck_optimizer(path, folder), trainer_state, path, folder)
            adam = load_adam_state(path, params)
        except ValueError as error:
            reason = str(error)
    return RunCheckpoint(step=int(step), folder=folder, params=params, adam=adam, optimizer_path=path,
                         optimizer_reason=reason, trainer_state=trainer_state, global_step=global_step)


# ------------------------------------------------------------------------------------------------------ helpers
def _parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype.removeprefix("torch."), None), torch.dtype):
        return getattr(torch, dtype.removeprefix("torch."))
    raise ValueError(f"dtype must be a torch.dtype or a name like 'float32' / 'bfloat16'; got {dtype!r}.")


def _first_sentence(error: BaseException, limit: int = 160) -> str:
    text = _first_line(error)
    sentence = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    return sentence if len(sentence) <= limit else sentence[:limit - 1] + "…"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
