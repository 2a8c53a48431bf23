"""The run's own settings: a TRL ``GRPOConfig`` (JSON or YAML, or the checkpoint's ``training_args.bin``) → the step.

The probe must predict the step the researcher's trainer takes. ``--trainer-config FILE`` reads the fields of a TRL
1.16 ``GRPOConfig`` that decide that step; fields missing from the file take TRL's defaults (its ``loss_type`` is
"dapo", ``scale_rewards`` "group", ``max_grad_norm`` 1.0 — not funcprobe's own defaults), and explicit command-line
flags win over both. :func:`trainer_settings` returns the :class:`TrainerSettings` with the source of every value.

Read: learning_rate (recorded; the step's learning rate is the optimizer state's, which a scheduler has already set
for the next step), loss_type, beta, use_bias_correction_kl, scale_rewards (True → "group", False → "none"),
reward_weights, epsilon / epsilon_high (CISPO), importance_sampling_level, max_grad_norm (≤ 0: no clipping),
num_generations → G, max_completion_length → the generation budget, temperature, top_p / top_k / min_p (truncated
sampling is refused), per_device_train_batch_size × gradient_accumulation_steps × num_processes / num_generations →
the prompts of one optimizer step (B), chat_template_kwargs.

Refused by name, each with the reason, because no per-token cotangent at the on-policy point reproduces them:
``num_iterations > 1`` and ``steps_per_generation ≠ gradient_accumulation_steps`` (later steps on a generation are
off-policy), ``entropy_coef ≠ 0`` / ``use_adaptive_entropy`` (an entropy bonus), ``delta < 1`` (clamps ρ = 1),
``top_entropy_quantile < 1`` and ``mask_truncated_completions`` (not modelled yet), ``use_vllm`` with its
importance-sampling correction (needs the vLLM sampler's log-probabilities), ``multi_objective_aggregation =
"normalize_then_sum"`` (not modelled), ``optim`` other than torch's AdamW (``ADAMW_OPTIMS``; Adafactor, 8-bit AdamW,
Lion, SGD, … take another step), ``loss_type = "bnpo"`` with gradient accumulation or several processes (it
normalises by a random micro-batch's token count). Unknown fields are ignored (the file may hold every
``GRPOConfig`` field).

``training_args.bin`` is a pickle: loading it runs code from the file. It is read only when the caller says so
(``--trust-training-args``), and it needs the trainer's classes (``trl``) to be importable.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .objective import Objective

__all__ = ["TrainerSettings", "read_trainer_config", "read_training_args", "trainer_settings", "unsupported_settings",
           "TRL_DEFAULTS"]

#: TRL 1.16 ``GRPOConfig`` defaults of the fields that decide the step (where the file is silent).
TRL_DEFAULTS: dict[str, Any] = {
    "learning_rate": 1e-6, "loss_type": "dapo", "beta": 0.0, "use_bias_correction_kl": True,
    "scale_rewards": "group", "reward_weights": None, "epsilon": 0.2, "epsilon_high": None,
    "importance_sampling_level": "token", "max_grad_norm": 1.0, "num_generations": 8,
    "max_completion_length": 512, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": None,
    "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "num_iterations": 1,
    "steps_per_generation": None, "entropy_coef": 0.0, "use_adaptive_entropy": False, "delta": None,
    "top_entropy_quantile": 1.0, "mask_truncated_completions": False, "use_vllm": False,
    "vllm_importance_sampling_correction": True, "multi_objective_aggregation": "sum_then_normalize",
    "chat_template_kwargs": None, "optim": "adamw_torch",
}

#: ``TrainingArguments.optim`` values whose step is torch's AdamW (decoupled weight decay, bias correction, ε outside
#: the square root, float32 moments saved as ``exp_avg``/``exp_avg_sq``): the step funcprobe models. Every other
#: optimizer (Adafactor, 8-bit / paged / quantised AdamW, Lion, SGD, AdEMAMix, GaLore, schedule-free, …) takes
#: another step and is refused by name.
ADAMW_OPTIMS = ("adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adamw_apex_fused",
                "adamw_hf")


def _optim_name(value: Any) -> str:
    """``optim`` as written by ``TrainingArguments.to_dict`` ("adamw_torch") or as an enum's text
    ("OptimizerNames.ADAMW_TORCH")."""
    text = str(getattr(value, "value", value)).strip()
    if text.startswith("OptimizerNames."):
        text = text[len("OptimizerNames."):]
    return text.lower()


@dataclass(frozen=True)
class TrainerSettings:
    """What the run's config says about the step, and where each value came from.

    ``objective`` the step's loss; ``G``, ``max_new_tokens``, ``temperature``, ``B`` (prompts per optimizer step,
    None when it cannot be derived), ``learning_rate`` (the config's initial lr: recorded, not used for the step),
    ``chat_template_kwargs``; ``sources`` maps each to "FILE" (the config), "TRL default" or, after the command line
    has applied its flags, "flag". ``unsupported``: None, or — only when read with ``check=False`` — the message
    naming the settings funcprobe cannot reproduce (then ``objective`` is not the run's step: no prediction of it
    may be made, but the sizes and τ still describe the run's sampling).
    """

    objective: Objective
    G: int
    max_new_tokens: int
    temperature: float
    B: int | None
    learning_rate: float | None
    chat_template_kwargs: dict | None
    sources: dict[str, str] = field(default_factory=dict)
    unsupported: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"objective": self.objective.to_dict(), "G": self.G, "max_new_tokens": self.max_new_tokens,
                "temperature": self.temperature, "B": self.B, "learning_rate": self.learning_rate,
                "chat_template_kwargs": self.chat_template_kwargs, "sources": dict(self.sources),
                "unsupported": self.unsupported}


def read_trainer_config(path: str | os.PathLike) -> dict[str, Any]:
    """The fields of a JSON (``.json``) or YAML (``.yaml``/``.yml``, or anything else that parses as YAML) file: a
    mapping. ValueError naming the file and the fix for anything else."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise ValueError(f"trainer config {str(path)!r} {what}; pass the JSON or YAML file of the run's "
                         "GRPOConfig fields (e.g. GRPOConfig(...).to_dict() saved as JSON).")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as error:  # noqa: BLE001 - JSON or YAML syntax: the same advice
        raise ValueError(f"{path}: is not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'} "
                         f"({type(error).__name__}: {' '.join(str(error).split())[:200]}).") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: holds a {type(data).__name__}; a trainer config is a mapping of GRPOConfig "
                         "fields, e.g. {\"loss_type\": \"dapo\", \"beta\": 0.04}.")
    return dict(data)


def read_training_args(checkpoint: str | os.PathLike, *, trust: bool) -> dict[str, Any] | None:
    """The fields of ``training_args.bin`` in the checkpoint folder (or None when there is none).

    It is a pickle — loading it runs code stored in the file — so it is read only with ``trust=True``; without,
    a ValueError says how to opt in or pass ``--trainer-config`` instead.
    """
    folder = Path(checkpoint)
    path = folder / "training_args.bin" if folder.is_dir() else folder
    if not path.is_file():
        return None
    if not trust:
        raise ValueError(f"{path} holds the run's settings as a pickle, and loading a pickle runs code from the file; "
                         "funcprobe does not do that unasked. Pass --trust-training-args if you trust the checkpoint, "
                         "or --trainer-config FILE with the run's GRPOConfig fields as JSON or YAML.")
    import torch

    try:
        args = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - the pickle may need classes that are not installed
        raise ValueError(f"{path}: could not be unpickled ({type(error).__name__}: {str(error)[:200]}); it needs the "
                         "trainer's classes (pip install trl). Or pass --trainer-config FILE instead.") from None
    if hasattr(args, "to_dict"):
        return dict(args.to_dict())
    if isinstance(args, Mapping):
        return dict(args)
    return {k: v for k, v in vars(args).items() if not k.startswith("_")}


def unsupported_settings(config: Mapping[str, Any], where: str) -> str | None:
    """The message naming every setting of ``config`` funcprobe cannot reproduce exactly (module docstring), or None
    when there is none."""
    def get(name):
        return config.get(name, TRL_DEFAULTS.get(name))

    problems = []
    optim = get("optim")
    if optim is not None and _optim_name(optim) not in ADAMW_OPTIMS:
        problems.append(f"optim={_optim_name(optim)!r}: funcprobe models torch's AdamW step (one of "
                        f"{', '.join(ADAMW_OPTIMS)}); this optimizer takes another step, so no prediction of it would "
                        "be right (probe a run trained with optim='adamw_torch')")
    if int(get("num_iterations") or 1) > 1:
        problems.append(f"num_iterations={get('num_iterations')}: the steps after the first on a generation start "
                        "off-policy (ρ ≠ 1), where the per-token form of the loss gradient does not hold; funcprobe "
                        "predicts the first step (set num_iterations=1 to probe it)")
    spg, ga = get("steps_per_generation"), int(get("gradient_accumulation_steps") or 1)
    if spg is not None and int(spg) != ga:
        problems.append(f"steps_per_generation={spg} ≠ gradient_accumulation_steps={ga}: one generation feeds "
                        "several optimizer steps, the later ones off-policy (set them equal to probe the first)")
    if float(get("entropy_coef") or 0.0) != 0.0 or bool(get("use_adaptive_entropy")):
        problems.append("entropy_coef / use_adaptive_entropy: an entropy bonus is not a per-token policy-gradient "
                        "cotangent (set entropy_coef=0 to probe the step without it)")
    if get("delta") is not None and float(get("delta")) < 1:
        problems.append(f"delta={get('delta')} < 1: two-sided clipping clamps ρ = 1 itself and zeroes the gradient "
                        "(remove delta, or set it ≥ 1)")
    if float(get("top_entropy_quantile") if get("top_entropy_quantile") is not None else 1.0) < 1:
        problems.append(f"top_entropy_quantile={get('top_entropy_quantile')}: the entropy mask of the policy term is "
                        "not modelled yet (set it to 1.0 to probe the unmasked step)")
    if bool(get("mask_truncated_completions")):
        problems.append("mask_truncated_completions=True is not modelled yet (set it to false to probe the step "
                        "with truncated completions kept)")
    if bool(get("use_vllm")) and bool(get("vllm_importance_sampling_correction")):
        problems.append("use_vllm with vllm_importance_sampling_correction: the step weights each token by the vLLM "
                        "sampler's log-probability ratio, which funcprobe's own sampler does not have (set "
                        "vllm_importance_sampling_correction=false to probe the step without it)")
    if get("multi_objective_aggregation") not in (None, "sum_then_normalize"):
        problems.append(f"multi_objective_aggregation={get('multi_objective_aggregation')!r} is not modelled "
                        "(set 'sum_then_normalize', TRL's default, to probe that step)")
    processes = int(config.get("num_processes", config.get("world_size", 1)) or 1)
    if get("loss_type") == "bnpo" and (ga > 1 or processes > 1):
        problems.append(f"loss_type='bnpo' with gradient_accumulation_steps={ga} or {processes} processes normalises "
                        "by a random micro-batch's token count, which no per-sequence weight reproduces (use 'dapo')")
    for name in ("top_p", "top_k", "min_p"):
        value = get(name)
        truncated = value is not None and ((name == "top_p" and float(value) < 1) or
                                           (name == "top_k" and int(value) > 0) or (name == "min_p" and float(value) > 0))
        if truncated:
            problems.append(f"{name}={value}: a truncated sampler does not draw from π_θ, and every estimator assumes "
                            "it does (probe with top_p=1, top_k=0 even if the run truncated)")
    if not problems:
        return None
    return (f"{where}: settings funcprobe cannot reproduce exactly: " + "; ".join(problems) + ". Edit these fields "
            "in a copy of the file to probe the nearest step funcprobe can take exactly.")


def trainer_settings(config: Mapping[str, Any], *, source: str, check: bool = True) -> TrainerSettings:
    """The step's settings from a GRPOConfig mapping (TRL's defaults for missing fields); see the module docstring.

    Raises ValueError naming each refused setting and why (with ``check=False`` that message is kept in
    ``unsupported`` instead: a trajectory still measures such a run's entropy), or a field with a bad value.
    """
    unsupported = unsupported_settings(config, source)
    if check and unsupported is not None:
        raise ValueError(unsupported)
    sources: dict[str, str] = {}

    def take(name: str, key: str | None = None):
        key = key or name
        if name in config and config[name] is not None:
            sources[key] = source
            return config[name]
        sources[key] = "TRL default"
        return TRL_DEFAULTS[name]

    scale = take("scale_rewards")
    if isinstance(scale, bool):
        scale = "group" if scale else "none"
    max_norm = take("max_grad_norm")
    max_norm = None if max_norm is None or not math.isfinite(float(max_norm)) or float(max_norm) <= 0 \
        else float(max_norm)
    epsilon = float(take("epsilon"))
    epsilon_high = take("epsilon_high")
    weights = take("reward_weights")
    try:
        objective = Objective(loss_type=take("loss_type"), beta=float(take("beta")),
                              use_bias_correction_kl=bool(take("use_bias_correction_kl")), max_grad_norm=max_norm,
                              scale_rewards=scale, epsilon_high=float(epsilon if epsilon_high is None else epsilon_high),
                              importance_sampling_level=take("importance_sampling_level"),
                              reward_weights=None if weights is None else tuple(float(w) for w in weights))
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None
    G = int(take("num_generations", "G"))
    per_device = int(take("per_device_train_batch_size"))
    accumulation = int(take("gradient_accumulation_steps"))
    processes = int(config.get("num_processes", config.get("world_size", 1)) or 1)
    completions = per_device * accumulation * processes
    B = completions // G if completions % G == 0 and completions >= 2 * G else None
    sources["B"] = sources["per_device_train_batch_size"] if B is not None else "not derivable"
    return TrainerSettings(objective=objective, G=G, max_new_tokens=int(take("max_completion_length",
                                                                             "max_new_tokens")),
                           temperature=float(take("temperature")), B=B,
                           learning_rate=float(take("learning_rate")),
                           chat_template_kwargs=take("chat_template_kwargs"), sources=sources,
                           unsupported=unsupported)
