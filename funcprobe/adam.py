"""The AdamW step as a pure function, and its decomposition (spec §4, `shared/spec/ESTIMATORS.md`).

Params dicts map PEFT parameter names (``"base_model.model.….lora_A.default.weight"``) to the trainable (LoRA)
tensors only. Per trainable tensor the optimizer state holds m (``exp_avg``), v (``exp_avg_sq``) and t (steps
already taken); the hyper-parameters lr, β1, β2, ε and weight decay λ come from the checkpoint's parameter groups
unless overridden. For a gradient g (in funcprobe g = ∇ℒ = −Ȳ, spec §3), optionally clipped to a global L2 norm
first (g ← c·g, c = min(max_norm / (‖g‖ + 1e-6), 1), exactly as ``torch.nn.utils.clip_grad_norm_``)::

    t' = t + 1,  bc1 = 1 − β1^t',  bc2 = 1 − β2^t'
    m' = β1 m + (1 − β1) g,   v' = β2 v + (1 − β2) g²
    denom = sqrt(v') / sqrt(bc2) + ε
    θ⁺ = θ (1 − lr λ) − (lr / bc1) · m' / denom

``adamw_update`` evaluates this with the operations, operation order and dtype of
``torch.optim.AdamW(foreach=False, fused=False)`` (``torch.optim.adam._single_tensor_adam``), out of place, so it
agrees with one real optimizer step to float rounding (bit-for-bit on CPU in practice). Nothing here calls
``optimizer.step()``; no input is ever modified.

The update decomposes exactly (spec §4) as::

    Δθ = θ⁺ − θ = η_g · P ⊙ Ȳ + Δθ_state,
    P = 1 / denom,   η_g = c · lr (1 − β1) / bc1,   Δθ_state = −(lr / bc1) β1 m ⊙ P − lr λ θ

(P evaluated at this batch's v'; c is the clip coefficient, 1 without clipping). Every term of Δθ is ∝ lr, so the
update at another learning rate η is θ + (η / lr) Δθ (``scaled_update``).

Public API: ``AdamHyper``, ``AdamState`` (``zeros``, ``from_torch``, ``with_lr``, ``to``, ``to_torch_state_dict``),
``adamw_update``, ``grad_clip_coef``, ``UpdateDecomposition``, ``update_decomposition``, ``scaled_update``,
``optimizer_param_groups``. Reading ``optimizer.pt`` files is ``funcprobe.checkpoints.load_adam_state``'s job.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "AdamHyper",
    "AdamState",
    "check_adam_state",
    "adamw_update",
    "grad_clip_coef",
    "UpdateDecomposition",
    "update_decomposition",
    "scaled_update",
    "optimizer_param_groups",
    "normalise_param_names",
]

# ----------------------------------------------------------------------------------------------------------------
# Hyper-parameters and state
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdamHyper:
    """AdamW hyper-parameters of one parameter group (spec §4): lr ≥ 0, 0 ≤ β1, β2 < 1, ε > 0, weight decay λ ≥ 0.

    All are stored as Python floats (a tensor-valued lr/beta from a state dict is converted).
    """

    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01

    def __post_init__(self) -> None:
        for name in ("lr", "beta1", "beta2", "eps", "weight_decay"):
            raw = getattr(self, name)
            try:
                value = float(raw.item() if isinstance(raw, Tensor) else raw)
            except (TypeError, ValueError, RuntimeError):
                raise ValueError(f"AdamHyper.{name} must be a real number, got {raw!r}") from None
            if not math.isfinite(value):
                raise ValueError(f"AdamHyper.{name} must be finite, got {value!r}")
            object.__setattr__(self, name, value)
        if self.lr < 0:
            raise ValueError(f"AdamHyper.lr must be ≥ 0, got {self.lr!r}")
        for name in ("beta1", "beta2"):
            b = getattr(self, name)
            if not 0.0 <= b < 1.0:
                raise ValueError(f"AdamHyper.{name} must satisfy 0 ≤ {name} < 1, got {b!r}")
        if not self.eps > 0:
            raise ValueError(f"AdamHyper.eps must be > 0, got {self.eps!r}")
        if self.weight_decay < 0:
            raise ValueError(f"AdamHyper.weight_decay must be ≥ 0, got {self.weight_decay!r}")

    @property
    def betas(self) -> tuple[float, float]:
        return (self.beta1, self.beta2)

    def to_dict(self) -> dict[str, float]:
        return {"lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "eps": self.eps,
                "weight_decay": self.weight_decay}


def _freeze(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


def _key_diff_message(what: str, expected: Sequence[str], got: Sequence[str], exp_label: str, got_label: str) -> str:
    exp_set, got_set = set(expected), set(got)
    missing = [k for k in expected if k not in got_set]
    extra = [k for k in got if k not in exp_set]
    parts = [f"{what}: the keys of {got_label} do not match those of {exp_label}."]
    if missing:
        parts.append(f"Missing from {got_label} ({len(missing)}): {missing}.")
    if extra:
        parts.append(f"Extra in {got_label} ({len(extra)}): {extra}.")
    return " ".join(parts)


def _check_same_keys(what: str, reference: Mapping[str, Any], ref_label: str,
                     other: Mapping[str, Any], other_label: str) -> None:
    if set(reference) != set(other) or len(reference) != len(other):
        raise ValueError(_key_diff_message(what, list(reference), list(other), ref_label, other_label)
                         + f" Pass {other_label} keyed by exactly the trainable (LoRA) parameter names of {ref_label}.")


@dataclass(frozen=True, eq=False)
class AdamState:
    """Per-tensor AdamW state (spec §4), immutable: read-only mappings keyed by parameter name.

    Fields (all keyed by the same names, in the params' dict order):
      * ``exp_avg``    — m, a tensor of the parameter's shape (and dtype, once loaded against params);
      * ``exp_avg_sq`` — v ≥ 0, same shape;
      * ``step``       — t, the number of steps already taken (int ≥ 0); the next step uses t' = t + 1;
      * ``hyper``      — the ``AdamHyper`` of the tensor's parameter group (groups may differ in lr / weight decay).

    The tensors are never modified by funcprobe; methods return new states.
    """

    exp_avg: Mapping[str, Tensor]
    exp_avg_sq: Mapping[str, Tensor]
    step: Mapping[str, int]
    hyper: Mapping[str, AdamHyper]

    def __post_init__(self) -> None:
        names = list(self.exp_avg)
        for label in ("exp_avg_sq", "step", "hyper"):
            other = getattr(self, label)
            if set(other) != set(names) or len(other) != len(names):
                raise ValueError(_key_diff_message("AdamState", names, list(other), "exp_avg", label))
        steps: dict[str, int] = {}
        for n in names:
            m, v, t, h = self.exp_avg[n], self.exp_avg_sq[n], self.step[n], self.hyper[n]
            if not isinstance(m, Tensor) or not isinstance(v, Tensor):
                raise ValueError(f"AdamState: exp_avg and exp_avg_sq of {n!r} must be tensors")
            if m.shape != v.shape:
                raise ValueError(f"AdamState: exp_avg {tuple(m.shape)} and exp_avg_sq {tuple(v.shape)} of {n!r} "
                                 "differ in shape")
            if isinstance(t, Tensor):
                t = t.item()
            if isinstance(t, bool) or float(t) != int(t) or int(t) < 0:
                raise ValueError(f"AdamState: step of {n!r} must be an integer ≥ 0, got {t!r}")
            steps[n] = int(t)
            if not isinstance(h, AdamHyper):
                raise ValueError(f"AdamState: hyper of {n!r} must be an AdamHyper, got {type(h).__name__}")
        object.__setattr__(self, "exp_avg", _freeze(self.exp_avg))
        object.__setattr__(self, "exp_avg_sq", _freeze({n: self.exp_avg_sq[n] for n in names}))
        object.__setattr__(self, "step", _freeze(steps))
        object.__setattr__(self, "hyper", _freeze({n: self.hyper[n] for n in names}))

    # -- construction ------------------------------------------------------------------------------------------

    @classmethod
    def zeros(cls, params: Mapping[str, Tensor], *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
              eps: float = 1e-8, weight_decay: float = 0.01) -> "AdamState":
        """A fresh state (m = v = 0, t = 0 for every tensor) with one ``AdamHyper`` shared by all of ``params``."""
        hyper = AdamHyper(lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=weight_decay)
        return cls(
            exp_avg={n: torch.zeros_like(p) for n, p in params.items()},
            exp_avg_sq={n: torch.zeros_like(p) for n, p in params.items()},
            step={n: 0 for n in params},
            hyper={n: hyper for n in params},
        )

    @classmethod
    def from_torch(cls, optimizer_state_dict: Mapping[str, Any],
                   param_names: Sequence[str] | Sequence[Sequence[str]],
                   params: Mapping[str, Tensor], *, source: str = "optimizer_state_dict") -> "AdamState":
        """The state of a ``torch.optim.AdamW`` (or ``Adam`` without L2 weight decay) from ``optimizer.state_dict()``.

        ``optimizer_state_dict`` = ``{"state": {int: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups": [{"params":
        [int, …], "lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", …}, …]}``.

        ``param_names`` names the optimizer's parameters: either a flat list in the optimizer's parameter order (the
        concatenation of the groups' ``"params"`` lists), or a list of lists (the names of each group's parameters,
        in the group's order). The names must be exactly the keys of ``params``; ``params`` gives the shapes (checked)
        and the dtype/device the state tensors are cast to (as ``Optimizer.load_state_dict`` does). Parameters with no
        state yet (never stepped) get m = v = 0 and t = 0. The result is keyed in ``params``' order.

        Refused with a ``ValueError`` naming the tensor and the fix: a count mismatch, a shape mismatch, ``amsgrad``,
        ``maximize``, ``Adam`` with coupled (L2) weight decay, and a non-Adam state (no ``exp_avg_sq``).
        """
        state, groups = _split_state_dict(optimizer_state_dict, source)
        index_to_name = _index_to_name(groups, param_names, params, source)
        return _state_from_parts(state, groups, index_to_name, params, source)

    # -- copies ------------------------------------------------------------------------------------------------

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.exp_avg)

    def with_lr(self, lr: float) -> "AdamState":
        """A copy in which every tensor's learning rate is ``lr`` (the other hyper-parameters are kept)."""
        return replace(self, hyper={n: replace(h, lr=lr) for n, h in self.hyper.items()})

    def with_hyper(self, **overrides: float) -> "AdamState":
        """A copy with some ``AdamHyper`` fields (lr, beta1, beta2, eps, weight_decay) overridden for every tensor."""
        return replace(self, hyper={n: replace(h, **overrides) for n, h in self.hyper.items()})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "AdamState":
        """A copy with m and v moved to ``device`` (and cast to ``dtype`` if given)."""
        return replace(
            self,
            exp_avg={n: t.to(device=device, dtype=dtype) for n, t in self.exp_avg.items()},
            exp_avg_sq={n: t.to(device=device, dtype=dtype) for n, t in self.exp_avg_sq.items()},
        )

    def to_torch_state_dict(self, param_order: Sequence[str] | Sequence[Sequence[str]]) -> dict[str, Any]:
        """A ``torch.optim.AdamW`` state dict for this state (for ``optimizer.load_state_dict``).

        ``param_order``: a flat list of names (one parameter group; all tensors must then share one ``AdamHyper``),
        or a list of lists (one group per list; each group's tensors must share one ``AdamHyper``). It must cover
        every name exactly once. Every tensor gets a state entry (also those with t = 0); tensors are cloned, steps
        are float32 scalar tensors as in torch.
        """
        groups_names = _normalise_groups(param_order)
        flat = [n for g in groups_names for n in g]
        if sorted(flat) != sorted(self.names):
            raise ValueError(_key_diff_message("to_torch_state_dict", list(self.names), flat, "the state",
                                               "param_order"))
        state: dict[int, dict[str, Tensor]] = {}
        param_groups: list[dict[str, Any]] = []
        idx = 0
        for gi, names in enumerate(groups_names):
            hypers = {self.hyper[n] for n in names}
            if len(hypers) > 1:
                raise ValueError(f"to_torch_state_dict: group {gi} mixes hyper-parameters {sorted(map(str, hypers))};"
                                 " pass param_order as a list of lists grouping tensors with equal AdamHyper")
            h = next(iter(hypers)) if hypers else AdamHyper(lr=0.0)
            ids = []
            for n in names:
                state[idx] = {
                    "step": torch.tensor(float(self.step[n]), dtype=torch.float32),
                    "exp_avg": self.exp_avg[n].detach().clone(),
                    "exp_avg_sq": self.exp_avg_sq[n].detach().clone(),
                }
                ids.append(idx)
                idx += 1
            param_groups.append({
                "lr": h.lr, "betas": (h.beta1, h.beta2), "eps": h.eps, "weight_decay": h.weight_decay,
                "amsgrad": False, "maximize": False, "foreach": False, "capturable": False,
                "differentiable": False, "fused": None, "decoupled_weight_decay": True, "params": ids,
            })
        return {"state": state, "param_groups": param_groups}

    def to_dict(self) -> dict[str, Any]:
        """Scalars only: per-name step and hyper-parameters (JSON-ready)."""
        return {"step": dict(self.step), "hyper": {n: h.to_dict() for n, h in self.hyper.items()}}


# ----------------------------------------------------------------------------------------------------------------
# Reading torch / HF Trainer optimizer states
# ----------------------------------------------------------------------------------------------------------------


def _split_state_dict(sd: Any, source: str) -> tuple[Mapping[Any, Any], list[Mapping[str, Any]]]:
    if not isinstance(sd, Mapping) or "state" not in sd or "param_groups" not in sd:
        keys = list(sd)[:10] if isinstance(sd, Mapping) else type(sd).__name__
        raise ValueError(f"{source} is not a torch optimizer state dict (expected keys 'state' and 'param_groups', "
                         f"found {keys}); pass the result of optimizer.state_dict() or an HF Trainer optimizer.pt")
    state, groups = sd["state"], sd["param_groups"]
    if not isinstance(state, Mapping) or not isinstance(groups, Sequence):
        raise ValueError(f"{source}: 'state' must be a dict and 'param_groups' a list")
    for gi, g in enumerate(groups):
        if not isinstance(g, Mapping) or "params" not in g:
            raise ValueError(f"{source}: param_groups[{gi}] has no 'params' list")
    return state, list(groups)


def optimizer_param_groups(optimizer_state_dict: Any, source: str = "optimizer_state_dict") -> list[Mapping[str, Any]]:
    """The ``param_groups`` of a torch optimizer state dict, validated (ValueError naming ``source`` otherwise)."""
    return _split_state_dict(optimizer_state_dict, source)[1]


def normalise_param_names(names: Sequence[str] | Sequence[Sequence[str]]) -> list[list[str]]:
    """Parameter names as a list of groups: a flat list becomes one group; ValueError for anything else."""
    return _normalise_groups(names)


def _normalise_groups(names: Sequence[str] | Sequence[Sequence[str]]) -> list[list[str]]:
    if isinstance(names, str):
        raise ValueError("param names must be a list of names or a list of lists of names, not a string")
    names = list(names)
    if all(isinstance(n, str) for n in names):
        return [names]
    if all(isinstance(g, Sequence) and not isinstance(g, str) and all(isinstance(n, str) for n in g) for g in names):
        return [list(g) for g in names]
    raise ValueError("param names must be a flat list of strings or a list of lists of strings")


def _index_to_name(groups: list[Mapping[str, Any]], param_names: Sequence[str] | Sequence[Sequence[str]],
                   params: Mapping[str, Tensor], source: str) -> dict[Any, str]:
    """Map the optimizer's integer parameter ids to names; validate counts and coverage."""
    group_ids = [list(g["params"]) for g in groups]
    n_opt = sum(len(ids) for ids in group_ids)
    if isinstance(param_names, str):
        raise ValueError("param_names must be a list of names or a list of lists of names, not a string")
    as_groups = _normalise_groups(param_names)
    is_flat = len(list(param_names)) == 0 or all(isinstance(n, str) for n in param_names)
    if is_flat:
        flat_names = as_groups[0]
        if len(flat_names) != n_opt:
            raise ValueError(
                f"{source}: the optimizer holds {n_opt} parameters (groups of sizes {[len(i) for i in group_ids]}) "
                f"but {len(flat_names)} names were given. Pass param_names with one name per optimizer parameter, in "
                "the optimizer's order (e.g. the trainable named_parameters() the optimizer was built from)")
        flat_ids = [i for ids in group_ids for i in ids]
    else:
        if len(as_groups) != len(group_ids):
            raise ValueError(f"{source}: the optimizer has {len(group_ids)} parameter groups but param_names gives "
                             f"{len(as_groups)} lists; pass one list of names per parameter group")
        for gi, (names, ids) in enumerate(zip(as_groups, group_ids)):
            if len(names) != len(ids):
                raise ValueError(f"{source}: parameter group {gi} holds {len(ids)} parameters but param_names[{gi}] "
                                 f"lists {len(names)} names; pass the names of that group's parameters in order")
        flat_names = [n for g in as_groups for n in g]
        flat_ids = [i for ids in group_ids for i in ids]
    dups = sorted({n for n in flat_names if flat_names.count(n) > 1})
    if dups:
        raise ValueError(f"{source}: param_names lists these names more than once: {dups}")
    if len(flat_names) != len(params) or set(flat_names) != set(params):
        raise ValueError(
            f"{source}: the optimizer holds {n_opt} parameters and params holds {len(params)} tensors; "
            + _key_diff_message("names", list(params), flat_names, "params", "param_names")
            + " Pass params with exactly the trainable tensors the optimizer was built over, and param_names naming"
              " them in the optimizer's order")
    return dict(zip(flat_ids, flat_names))


def _hyper_from_group(g: Mapping[str, Any], gi: int, source: str) -> AdamHyper:
    missing = [k for k in ("lr", "betas", "eps", "weight_decay") if k not in g]
    if missing:
        raise ValueError(f"{source}: param_groups[{gi}] lacks {missing}; this is not an Adam/AdamW optimizer state. "
                         "funcprobe models one torch.optim.AdamW step: pass an AdamW state")
    if g.get("amsgrad", False):
        raise ValueError(f"{source}: param_groups[{gi}] has amsgrad=True, which funcprobe does not model (the AdamW step it models is "
                         "plain AdamW); use a checkpoint trained with amsgrad=False")
    if g.get("maximize", False):
        raise ValueError(f"{source}: param_groups[{gi}] has maximize=True, which funcprobe does not model; use a "
                         "checkpoint trained with maximize=False")
    wd = float(g["weight_decay"])
    if wd != 0 and g.get("decoupled_weight_decay", True) is False:
        raise ValueError(f"{source}: param_groups[{gi}] is torch.optim.Adam with L2 (coupled) weight decay "
                         f"{wd}, not AdamW's decoupled decay; use an AdamW checkpoint")
    b1, b2 = g["betas"]
    try:
        return AdamHyper(lr=g["lr"], beta1=b1, beta2=b2, eps=g["eps"], weight_decay=wd)
    except ValueError as e:
        raise ValueError(f"{source}: param_groups[{gi}]: {e}") from None


def _state_from_parts(state: Mapping[Any, Any], groups: list[Mapping[str, Any]], index_to_name: dict[Any, str],
                      params: Mapping[str, Tensor], source: str) -> AdamState:
    hyper_by_name: dict[str, AdamHyper] = {}
    for gi, g in enumerate(groups):
        h = _hyper_from_group(g, gi, source)
        for i in g["params"]:
            hyper_by_name[index_to_name[i]] = h
    unknown = [k for k in state if k not in index_to_name]
    if unknown:
        raise ValueError(f"{source}: 'state' has entries for parameter ids {unknown[:10]} that no param group lists;"
                         " the state dict is inconsistent (pass an unmodified optimizer.state_dict())")
    m: dict[str, Tensor] = {}
    v: dict[str, Tensor] = {}
    step: dict[str, int] = {}
    by_name = {index_to_name[k]: s for k, s in state.items()}
    for n, p in params.items():
        s = by_name.get(n)
        if s is None or len(s) == 0:
            m[n], v[n], step[n] = torch.zeros_like(p), torch.zeros_like(p), 0
            continue
        if not isinstance(s, Mapping) or "exp_avg" not in s or "exp_avg_sq" not in s or "step" not in s:
            keys = sorted(s) if isinstance(s, Mapping) else type(s).__name__
            raise ValueError(f"{source}: the state of {n!r} has keys {keys}, not Adam's ('step', 'exp_avg', "
                             "'exp_avg_sq'); funcprobe needs a torch.optim.AdamW state")
        if "max_exp_avg_sq" in s:
            raise ValueError(f"{source}: the state of {n!r} holds max_exp_avg_sq (amsgrad), which funcprobe does not "
                             "model; use a checkpoint trained with amsgrad=False")
        for key in ("exp_avg", "exp_avg_sq"):
            t = s[key]
            if not isinstance(t, Tensor):
                raise ValueError(f"{source}: {key} of {n!r} is a {type(t).__name__}, not a tensor")
            if t.shape != p.shape:
                raise ValueError(
                    f"{source}: {key} of {n!r} has shape {tuple(t.shape)} but the parameter has shape "
                    f"{tuple(p.shape)}. The optimizer's parameter order does not match the names given, or the "
                    "checkpoint belongs to another adapter: pass param_names in the optimizer's order (a list of "
                    f"lists, one per param group, or an optimizer_param_names.json next to optimizer.pt)")
        cast = dict(dtype=p.dtype, device=p.device) if p.is_floating_point() else dict(device=p.device)
        m[n] = s["exp_avg"].detach().to(**cast).clone()
        v[n] = s["exp_avg_sq"].detach().to(**cast).clone()
        t = s["step"]
        t = float(t.item()) if isinstance(t, Tensor) else float(t)
        if t != int(t) or t < 0:
            raise ValueError(f"{source}: step of {n!r} is {t}, not a non-negative integer")
        step[n] = int(t)
    return AdamState(exp_avg=m, exp_avg_sq=v, step=step, hyper={n: hyper_by_name[n] for n in params})


# ----------------------------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------------------------


def check_adam_state(adam: Any, where: str) -> AdamState:
    """``adam`` itself when it is an :class:`AdamState`; else a ValueError saying what to pass (an estimator given
    ``adam=None`` used to fail with AttributeError 'NoneType' object has no attribute 'exp_avg')."""
    if isinstance(adam, AdamState):
        return adam
    got = "None" if adam is None else type(adam).__name__
    hint = (" (a torch optimizer itself: convert its state_dict with AdamState.from_torch)"
            if hasattr(adam, "state_dict") else "")
    raise ValueError(f"{where}: adam must be a funcprobe.AdamState (the optimizer's moments and hyper-parameters); got "
                     f"{got}{hint}. Pass load_checkpoint(path).adam for a saved checkpoint, "
                     "AdamState.from_torch(optimizer.state_dict(), param_names, params) for a live torch AdamW, or "
                     "AdamState.zeros(params, lr=...) for a first step from a fresh optimizer.")


def _check_inputs(params: Mapping[str, Tensor], grads: Mapping[str, Tensor], state: AdamState,
                  grads_label: str, what: str) -> dict[str, Tensor]:
    check_adam_state(state, what)
    _check_same_keys(what, params, "params", grads, grads_label)
    _check_same_keys(what, params, "params", state.exp_avg, "state")
    out: dict[str, Tensor] = {}
    for n, p in params.items():
        g = grads[n]
        if g.shape != p.shape:
            raise ValueError(f"{grads_label}[{n!r}] has shape {tuple(g.shape)} but the parameter has shape "
                             f"{tuple(p.shape)}")
        if state.exp_avg[n].shape != p.shape:
            raise ValueError(f"state.exp_avg[{n!r}] has shape {tuple(state.exp_avg[n].shape)} but the parameter has "
                             f"shape {tuple(p.shape)}; the state belongs to another adapter")
        # torch requires .grad to match the parameter's dtype and device; cast so that the update runs in θ's dtype.
        out[n] = g.to(dtype=p.dtype, device=p.device) if (g.dtype != p.dtype or g.device != p.device) else g
    return out


def grad_clip_coef(grads: Mapping[str, Tensor], max_grad_norm: float) -> tuple[Tensor, Tensor]:
    """(total_norm, clip_coef) of ``torch.nn.utils.clip_grad_norm_(…, max_grad_norm)``, out of place.

    total_norm = ‖(‖g_1‖₂, …, ‖g_k‖₂)‖₂ over the tensors in ``grads``' dict order (the order
    ``clip_grad_norm_(model.parameters())`` visits them); clip_coef = min(max_norm / (total_norm + 1e-6), 1), both
    0-dim tensors computed by the same torch routines as ``clip_grad_norm_``. The clipped gradient is g · clip_coef.
    """
    max_grad_norm = float(max_grad_norm)
    if not max_grad_norm > 0 or not math.isfinite(max_grad_norm):
        raise ValueError(f"max_grad_norm must be a finite number > 0 (or None for no clipping), got {max_grad_norm}")
    tensors = list(grads.values())
    if hasattr(torch.nn.utils, "get_total_norm"):
        total_norm = torch.nn.utils.get_total_norm(tensors, 2.0)
    else:  # torch < 2.6: the same computation as clip_grad_norm_'s
        norms: list[Tensor] = []
        by_key: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for t in tensors:
            by_key.setdefault((t.device, t.dtype), []).append(t)
        for ts in by_key.values():
            norms.extend(torch._foreach_norm(ts, 2.0))
        total_norm = torch.linalg.vector_norm(torch.stack([x.to(tensors[0].device) for x in norms]), 2.0)
    clip_coef = max_grad_norm / (total_norm + 1e-6)
    return total_norm, torch.clamp(clip_coef, max=1.0)


def _clip(grads: dict[str, Tensor], max_grad_norm: float | None) -> tuple[dict[str, Tensor], Tensor | None,
                                                                         Tensor | None]:
    if max_grad_norm is None:
        return grads, None, None
    total_norm, coef = grad_clip_coef(grads, max_grad_norm)
    return {n: g * coef.to(g.device) for n, g in grads.items()}, total_norm, coef


def _step_scalars(h: AdamHyper, t: int, lr: float | None) -> tuple[float, int, float, float, float]:
    """(lr, t', bc1, bc2, step_size) exactly as ``_single_tensor_adam`` computes them (Python floats)."""
    lr_ = h.lr if lr is None else float(lr)
    t1 = t + 1
    bc1 = 1 - h.beta1 ** float(t1)
    bc2 = 1 - h.beta2 ** float(t1)
    return lr_, t1, bc1, bc2, lr_ / bc1


def _moments(state: AdamState, name: str, param: Tensor, grad: Tensor, bc2: float) -> tuple[Tensor, Tensor, Tensor]:
    """(m', v', denom) for one tensor, in θ's dtype and torch's operation order:
    m' = m.lerp(g, 1 − β1), v' = v·β2 + (1 − β2) g², denom = sqrt(v') / sqrt(bc2) + ε."""
    h = state.hyper[name]
    exp_avg = state.exp_avg[name].to(dtype=param.dtype, device=param.device).lerp(grad, 1 - h.beta1)
    exp_avg_sq = state.exp_avg_sq[name].to(dtype=param.dtype, device=param.device).mul(h.beta2).addcmul(
        grad, grad, value=1 - h.beta2)
    return exp_avg, exp_avg_sq, (exp_avg_sq.sqrt() / bc2 ** 0.5).add(h.eps)


def adamw_update(params: Mapping[str, Tensor], grads: Mapping[str, Tensor], state: AdamState, *,
                 lr: float | None = None, max_grad_norm: float | None = None) -> tuple[dict[str, Tensor], AdamState]:
    """One AdamW step as a pure function (spec §4): returns (θ⁺, new state); inputs are untouched.

    ``params``, ``grads`` and ``state`` must have exactly the same names (a ``ValueError`` lists the missing and
    extra ones) and shapes. ``grads`` is ∇ℒ (in funcprobe −Ȳ); it is cast to each parameter's dtype/device. If
    ``max_grad_norm`` is given, the gradients are first scaled by c = min(max_norm / (‖g‖₂ + 1e-6), 1), ‖g‖₂ the
    global norm over all tensors (``grad_clip_coef``, identical to ``torch.nn.utils.clip_grad_norm_``). ``lr``
    overrides every tensor's learning rate for this step (it is also stored in the returned state's hyper).

    Per tensor, in θ's dtype and in the order of ``torch.optim.adam._single_tensor_adam``::

        t' = t + 1;  θ ← θ · (1 − lr λ)  (only if λ ≠ 0);  m' = m.lerp(g, 1 − β1);  v' = v · β2 + (1 − β2) g ⊙ g
        denom = sqrt(v') / sqrt(bc2) + ε;  θ⁺ = θ − (lr / bc1) · m' / denom

    so θ⁺, m', v' equal one ``torch.optim.AdamW(foreach=False, fused=False)`` step to float rounding.
    """
    g_all = _check_inputs(params, grads, state, "grads", "adamw_update")
    g_all, _, _ = _clip(g_all, max_grad_norm)
    new_params: dict[str, Tensor] = {}
    m_new: dict[str, Tensor] = {}
    v_new: dict[str, Tensor] = {}
    steps: dict[str, int] = {}
    hyper: dict[str, AdamHyper] = {}
    for n, p in params.items():
        h = state.hyper[n]
        g = g_all[n]
        lr_, t1, _bc1, bc2, step_size = _step_scalars(h, state.step[n], lr)
        param = p
        if h.weight_decay != 0:
            param = param.mul(1 - lr_ * h.weight_decay)
        exp_avg, exp_avg_sq, denom = _moments(state, n, p, g, bc2)
        new_params[n] = param.addcdiv(exp_avg, denom, value=-step_size)
        m_new[n], v_new[n], steps[n] = exp_avg, exp_avg_sq, t1
        hyper[n] = h if lr is None else replace(h, lr=lr_)
    return new_params, AdamState(exp_avg=m_new, exp_avg_sq=v_new, step=steps, hyper=hyper)


# ----------------------------------------------------------------------------------------------------------------
# The decomposition
# ----------------------------------------------------------------------------------------------------------------


def _uniform(values: Mapping[str, float], what: str, alternative: str) -> float:
    distinct = set(values.values())
    if len(distinct) != 1:
        raise ValueError(f"{what} differs between tensors ({sorted(distinct)}): the parameter groups have different "
                         f"learning rates, β1 or step counts, so there is no single scalar; use {alternative}")
    return next(iter(distinct))


@dataclass(frozen=True, eq=False)
class UpdateDecomposition:
    """Δθ = θ⁺ − θ = η_g · P ⊙ Ȳ + Δθ_state (spec §4), for one AdamW step on the gradient g = −c·Ȳ.

    Fields (mappings keyed by parameter name, tensors of each parameter's shape and dtype):
      * ``preconditioner`` — P = 1 / denom, denom = sqrt(v') / sqrt(bc2) + ε, at this batch's v';
      * ``eta_g_by_name``  — η_g per tensor = c · lr (1 − β1) / bc1 (Python floats). The clip coefficient c is
        folded in: with clipping the gradient is −c·Ȳ, so m' = β1 m − (1 − β1) c Ȳ and
        θ⁺ − θ = [c · lr (1 − β1)/bc1] P ⊙ Ȳ + Δθ_state;
      * ``delta_state``    — Δθ_state = −(lr / bc1) β1 m ⊙ P − lr λ θ (the part that does not use this batch's Ȳ,
        except through P);
      * ``ybar``           — Ȳ as given (not copied; never modified);
      * ``clip_coef``      — c = min(max_norm / (‖Ȳ‖₂ + 1e-6), 1), or 1.0 without clipping;
      * ``grad_norm``      — ‖Ȳ‖₂ (global, before clipping), or None without clipping;
      * ``lr_by_name``     — the learning rate used per tensor;
      * ``new_state``      — the AdamState after the step (m', v', t'), identical to ``adamw_update``'s.

    Per-group hyper-parameters are supported: when all tensors share lr, β1 and the step count, ``eta_g`` (and
    ``lr``) is one float; otherwise ``eta_g`` raises and callers use ``eta_g_by_name`` or ``eta_preconditioner()``
    (η_g,n · P_n, so that η_g · X·P·Y becomes X·(ηP)·Y). Different weight decays do not affect η_g.
    """

    preconditioner: Mapping[str, Tensor]
    eta_g_by_name: Mapping[str, float]
    delta_state: Mapping[str, Tensor]
    ybar: Mapping[str, Tensor]
    clip_coef: float
    grad_norm: float | None
    lr_by_name: Mapping[str, float]
    new_state: AdamState = field(repr=False)

    def __post_init__(self) -> None:
        for name in ("preconditioner", "eta_g_by_name", "delta_state", "ybar", "lr_by_name"):
            object.__setattr__(self, name, _freeze(getattr(self, name)))

    @property
    def eta_g(self) -> float:
        """The scalar η_g = c · lr (1 − β1) / bc1, shared by all tensors; ValueError if it differs between them."""
        return _uniform(self.eta_g_by_name, "eta_g", "eta_g_by_name or eta_preconditioner()")

    @property
    def lr(self) -> float:
        """The learning rate shared by all tensors; ValueError if it differs between them."""
        return _uniform(self.lr_by_name, "lr", "lr_by_name")

    def eta_preconditioner(self) -> dict[str, Tensor]:
        """η_g,n · P_n per tensor (works with per-group learning rates)."""
        return {n: P * self.eta_g_by_name[n] for n, P in self.preconditioner.items()}

    def delta_theta(self) -> dict[str, Tensor]:
        """Δθ = η_g · P ⊙ Ȳ + Δθ_state per tensor; θ + Δθ equals ``adamw_update``'s θ⁺ to float rounding."""
        out = {}
        for n, P in self.preconditioner.items():
            y = self.ybar[n].to(dtype=P.dtype, device=P.device)
            out[n] = (P * y).mul(self.eta_g_by_name[n]).add(self.delta_state[n])
        return out

    def to_dict(self) -> dict[str, Any]:
        """The scalars (JSON-ready): eta_g (None if per-tensor), eta_g_by_name, lr, clip_coef, grad_norm."""
        try:
            eta = self.eta_g
        except ValueError:
            eta = None
        try:
            lr = self.lr
        except ValueError:
            lr = None
        return {"eta_g": eta, "eta_g_by_name": dict(self.eta_g_by_name), "lr": lr, "lr_by_name": dict(self.lr_by_name),
                "clip_coef": self.clip_coef, "grad_norm": self.grad_norm}


def update_decomposition(params: Mapping[str, Tensor], ybar: Mapping[str, Tensor], state: AdamState, *,
                         lr: float | None = None, max_grad_norm: float | None = None) -> UpdateDecomposition:
    """Decompose the AdamW step on g = −Ȳ (spec §3, §4): θ⁺ − θ = η_g · P ⊙ Ȳ + Δθ_state.

    ``ybar`` is Ȳ (the mean objective-side gradient; the loss gradient is −Ȳ), keyed and shaped like ``params``.
    ``lr`` and ``max_grad_norm`` mean what they mean in ``adamw_update``. With clipping, c = min(max_norm / (‖Ȳ‖₂ +
    1e-6), 1) is computed exactly as ``clip_grad_norm_`` would on −Ȳ, and (derivation) g = −c Ȳ gives
    m' = β1 m − (1 − β1) c Ȳ, v' = β2 v + (1 − β2) c² Ȳ², hence

        P = 1 / (sqrt(v') / sqrt(bc2) + ε),   η_g = c · lr (1 − β1) / bc1,
        Δθ_state = −(lr / bc1) β1 m ⊙ P − lr λ θ.

    Computed in θ's dtype; ``delta_theta()`` reproduces ``adamw_update(params, −Ȳ, …)`` to float rounding.
    """
    y_all = _check_inputs(params, ybar, state, "ybar", "update_decomposition")
    g_all = {n: y.neg() for n, y in y_all.items()}
    g_all, total_norm, coef = _clip(g_all, max_grad_norm)
    c = 1.0 if coef is None else float(coef.item())
    P: dict[str, Tensor] = {}
    eta: dict[str, float] = {}
    dstate: dict[str, Tensor] = {}
    lrs: dict[str, float] = {}
    m_new: dict[str, Tensor] = {}
    v_new: dict[str, Tensor] = {}
    steps: dict[str, int] = {}
    hyper: dict[str, AdamHyper] = {}
    for n, p in params.items():
        h = state.hyper[n]
        g = g_all[n]
        lr_, t1, bc1, bc2, step_size = _step_scalars(h, state.step[n], lr)
        m = state.exp_avg[n].to(dtype=p.dtype, device=p.device)
        exp_avg, exp_avg_sq, denom = _moments(state, n, p, g, bc2)
        Pn = denom.reciprocal()
        ds = (m * Pn).mul(-step_size * h.beta1)
        if h.weight_decay != 0:
            ds = ds.add(p, alpha=-lr_ * h.weight_decay)
        P[n], dstate[n], lrs[n] = Pn, ds, lr_
        eta[n] = c * step_size * (1 - h.beta1)
        m_new[n], v_new[n], steps[n] = exp_avg, exp_avg_sq, t1
        hyper[n] = h if lr is None else replace(h, lr=lr_)
    return UpdateDecomposition(
        preconditioner=P, eta_g_by_name=eta, delta_state=dstate, ybar=dict(ybar), clip_coef=c,
        grad_norm=None if total_norm is None else float(total_norm.item()), lr_by_name=lrs,
        new_state=AdamState(exp_avg=m_new, exp_avg_sq=v_new, step=steps, hyper=hyper),
    )


def scaled_update(params: Mapping[str, Tensor], delta_theta: Mapping[str, Tensor], factor: float) -> dict[str, Tensor]:
    """θ + factor · Δθ per tensor (new dict; inputs untouched).

    For a learning-rate sweep: every term of Δθ is ∝ lr (spec §4), so the AdamW update at learning rate η is
    ``scaled_update(params, decomposition.delta_theta(), η / lr)``.
    """
    _check_same_keys("scaled_update", params, "params", delta_theta, "delta_theta")
    out = {}
    for n, p in params.items():
        d = delta_theta[n]
        if d.shape != p.shape:
            raise ValueError(f"delta_theta[{n!r}] has shape {tuple(d.shape)} but the parameter has shape "
                             f"{tuple(p.shape)}")
        out[n] = p.add(d.to(dtype=p.dtype, device=p.device), alpha=float(factor))
    return out
