"""The RL objective as a value: the loss a trainer minimises, as per-token cotangents (spec §3).

At the on-policy point where a step starts (θ_old = θ: every importance ratio ρ = 1, no PPO clip active), every
policy-gradient loss of the field — TRL's ``GRPOTrainer`` loss types, verl's ``loss_agg_mode``s, OpenRLHF's — has a
gradient of the form

    ∇ℒ = −Σ_{n,g,k} c_{n,g,k} ∇ℓ_{n,g,k},      c_{n,g,k} = w_{n,g,k} · (a·A_{n,g,k} − β κ_{n,g,k}),

ℓ the per-token log-probabilities of the response tokens (mask m), A the advantages (per sequence, broadcast over its
tokens, or per token), w the loss's token weights, a = 1 except for CISPO, and κ the derivative of the KL penalty.
So Ȳ = −∇ℒ = Σ c∇ℓ is one chunked vjp with a per-token cotangent (``Policy``), and δH₁'s Y_n = B Σ_{g,k} c∇ℓ.

Token weights w (N = B·G completions, T_{n,g} = Σ_k m their lengths, L = the generation budget ``length_norm``), as
TRL 1.16 aggregates (``GRPOTrainer._compute_loss``; verified against its gradient in tests/test_trl.py):

| loss_type | w_{n,g,k} | TRL |
| --- | --- | --- |
| ``dr_grpo`` | m / (N L) | Σ(l m) / (N · max_completion_length) — Dr. GRPO, funcprobe's default |
| ``grpo``, ``sapo`` | m / (N T_{n,g}) | mean over each sequence's tokens, then over sequences (SAPO's gate has slope 1 at ρ = 1) |
| ``bnpo``, ``dapo``, ``vespo`` | m / Σ T | mean over all response tokens of the batch (VESPO's φ(1) = 1) |
| ``cispo`` | min(1, ε_high) · m / Σ T | the loss is −sg[min(ρ, ε_high)]·A·ℓ: at ρ = 1 the weight min(1, ε_high) (TRL's default ε_high = 0.2) |
| ``luspo`` | m / N | sum over tokens, mean over sequences |

``bnpo`` and ``dapo`` normalise by the batch's total token count: Y_n then depends weakly on the other prompts'
lengths, which funcprobe treats as a constant of the batch (its effect on the U-statistic is O(1/B)). The batch is
the trainer's whole generation batch; TRL's bnpo with gradient accumulation or several processes normalises by a
random micro-batch's count instead, which no per-(n,g) weight expresses — refused where a trainer config says so.

KL to a reference (β > 0; per token k3 = exp(ℓ_ref − ℓ) − (ℓ_ref − ℓ) − 1). TRL multiplies k3 by ρ = exp(ℓ − ℓ_old)
by default (``use_bias_correction_kl=True``): value unchanged at ρ = 1, but gradient

    κ = ∂/∂ℓ [k3 · ρ] = (1 − e^{ℓ_ref − ℓ}) + k3 = ℓ − ℓ_ref          (bias-corrected, TRL's default; verl "k3+")
    κ = ∂k3/∂ℓ = 1 − e^{ℓ_ref − ℓ}                                     (``use_bias_correction_kl=False``; verl "low_var_kl")

(spec §3 states the second; the first is what TRL's default step does, and a prediction of another step is wrong.)
The reference is the base model: the LoRA adapter disabled, which for LoRA equals every ``lora_B`` set to zero —
one no-grad forward of the batch, only when β > 0. DoRA adapters are refused with β > 0 (zero B does not give the
base there).

Advantages (:func:`compute_advantages`), exactly as TRL computes them, in float32: rewards summed over reward
functions with weights (NaN-aware; a completion every function scored None gets A = 0), A = R − mean_group(R), then
divided by (std + 1e-4) — the group's std (``scale_rewards="group"``, TRL's default), the whole batch's
(``"batch"``), or not at all (``"none"``, Dr. GRPO); std is the unbiased (Bessel) NaN-aware standard deviation.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor

from .batch import RolloutBatch

__all__ = ["Objective", "resolve_objective", "LOSS_TYPES", "SCALE_REWARDS", "AdvantageInfo", "compute_advantages", "nanstd",
           "ZeroVarianceWarning", "REWARD_STD_EPS"]

#: The loss types an Objective expresses exactly at ρ = 1 (TRL 1.16's names).
LOSS_TYPES = ("dr_grpo", "grpo", "bnpo", "dapo", "sapo", "cispo", "vespo", "luspo")
#: Reward scaling of the advantages (TRL's ``scale_rewards``).
SCALE_REWARDS = ("group", "batch", "none")
#: ε added to the reward standard deviation (TRL's ``std + 1e-4``).
REWARD_STD_EPS = 1e-4
#: TRL's ``importance_sampling_level`` values: "token" (default) and "sequence" (GSPO).
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


class ZeroVarianceWarning(UserWarning):
    """Groups whose rewards are all equal: their advantages are 0 and they contribute nothing to the step."""


@dataclass(frozen=True)
class Objective:
    """The RL loss of the step being probed (spec §3): its token weights, KL term, clipping and reward scaling.

    Fields:
        loss_type: one of :data:`LOSS_TYPES` (default ``"dr_grpo"``; TRL's default is ``"dapo"``).
        beta: the KL coefficient β ≥ 0 (TRL's default 0).
        use_bias_correction_kl: κ = ℓ − ℓ_ref (True, TRL's default) or κ = 1 − exp(ℓ_ref − ℓ) (False).
        max_grad_norm: clip the gradient to this global L2 norm before the AdamW step, or None (HF/TRL default 1.0).
        scale_rewards: "group", "batch" or "none" (default "none": Dr. GRPO; TRL's default "group").
        epsilon_high: CISPO's ε_high (its gradient at ρ = 1 carries min(1, ε_high); TRL's default ε_high = ε = 0.2).
        importance_sampling_level: "token" or "sequence" (GSPO: the same policy gradient at ρ = 1; refused with
            β > 0 and bias correction, whose KL gradient is then not a per-token κ).
        reward_weights: weights of several reward functions (None: all 1), used by :meth:`advantages`.

    Construction validates every field (ValueError naming it and the fix). ``Objective.trl()`` gives TRL 1.16's
    defaults (dapo, group scaling, β = 0, bias-corrected KL, max_grad_norm 1.0).
    """

    loss_type: str = "dr_grpo"
    beta: float = 0.0
    use_bias_correction_kl: bool = True
    max_grad_norm: float | None = None
    scale_rewards: str = "none"
    epsilon_high: float = 0.2
    importance_sampling_level: str = "token"
    reward_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type {self.loss_type!r} is not supported; choose one of {LOSS_TYPES} (TRL's "
                             "names). Each is expressed exactly at the on-policy point; other losses (entropy "
                             "bonuses, auxiliary losses) are not of the per-token form funcprobe differentiates.")
        beta = _real("beta", self.beta)
        if beta < 0:
            raise ValueError(f"beta must be ≥ 0 (the KL coefficient); got {self.beta!r}.")
        object.__setattr__(self, "beta", beta)
        if not isinstance(self.use_bias_correction_kl, bool):
            raise ValueError(f"use_bias_correction_kl must be True or False; got {self.use_bias_correction_kl!r}.")
        if self.max_grad_norm is not None:
            norm = _real("max_grad_norm", self.max_grad_norm)
            if not norm > 0:
                raise ValueError(f"max_grad_norm must be > 0 or None (no clipping); got {self.max_grad_norm!r}. "
                                 "(A trainer's max_grad_norm ≤ 0 means no clipping: pass None.)")
            object.__setattr__(self, "max_grad_norm", norm)
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}; got {self.scale_rewards!r} ('group': "
                             "divide by the group's reward std, as TRL does by default; 'batch': by the batch's; "
                             "'none': Dr. GRPO).")
        epsilon_high = _real("epsilon_high", self.epsilon_high)
        if not epsilon_high > 0:
            raise ValueError(f"epsilon_high must be > 0; got {self.epsilon_high!r}.")
        object.__setattr__(self, "epsilon_high", epsilon_high)
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}; got "
                             f"{self.importance_sampling_level!r}.")
        if self.importance_sampling_level == "sequence" and beta > 0 and self.use_bias_correction_kl:
            raise ValueError("importance_sampling_level='sequence' (GSPO) with beta > 0 and the bias-corrected KL is "
                             "refused: TRL multiplies each token's k3 by the sequence-level ratio, whose gradient "
                             "couples every token of a sequence, so the KL term is not a per-token κ. Set "
                             "use_bias_correction_kl=False or beta=0, or probe with importance_sampling_level='token'.")
        if self.reward_weights is not None:
            weights = tuple(_real("reward_weights", w) for w in self.reward_weights)
            if not weights:
                raise ValueError("reward_weights is empty; pass one weight per reward function, or None.")
            object.__setattr__(self, "reward_weights", weights)

    # ------------------------------------------------------------------------------------------------ presets
    @classmethod
    def trl(cls, **overrides: Any) -> "Objective":
        """TRL 1.16 ``GRPOConfig``'s defaults: dapo, scale_rewards="group", β = 0, bias-corrected KL, clipping at 1.0."""
        return cls(**{"loss_type": "dapo", "scale_rewards": "group", "beta": 0.0, "use_bias_correction_kl": True,
                      "max_grad_norm": 1.0, **overrides})

    def replace(self, **changes: Any) -> "Objective":
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["reward_weights"] = None if self.reward_weights is None else list(self.reward_weights)
        return data

    def describe(self) -> str:
        """One line for people: the loss, its weights, KL, clipping and reward scaling."""
        kl = "no KL" if self.beta == 0 else (f"KL β={self.beta:g} to the base model, κ = "
                                             + ("ℓ − ℓ_ref (bias-corrected)" if self.use_bias_correction_kl
                                                else "1 − exp(ℓ_ref − ℓ)"))
        clip = "no clipping" if self.max_grad_norm is None else f"clip ‖g‖ ≤ {self.max_grad_norm:g}"
        return (f"loss_type={self.loss_type} (w = {_WEIGHT_TEXT[self.loss_type]}), scale_rewards="
                f"{self.scale_rewards}, {kl}, {clip}")

    # --------------------------------------------------------------------------------------------- the batch
    def check_batch(self, batch: RolloutBatch, where: str = "the step") -> None:
        """Refuse a batch whose advantages were made otherwise than this objective makes them.

        A batch from ``sample_batch`` or the rollouts loader records how its advantages were made
        (``batch.advantage_recipe``: reward scaling and weights); the estimators use the batch's advantages as they
        are, so an objective stating another ``scale_rewards`` or ``reward_weights`` would describe a step the
        trainer never took. Batches without a recipe (built by hand) are not checked."""
        recipe = getattr(batch, "advantage_recipe", None)
        if recipe is None:
            return
        problems, fix = [], []  # fix: the objective.replace(...) arguments that make it the batch's, field by field
        if recipe.scale_rewards != self.scale_rewards:
            problems.append(f"scale_rewards: the batch's advantages were made with scale_rewards="
                            f"{recipe.scale_rewards!r}, the objective says {self.scale_rewards!r}")
            fix.append(f"scale_rewards={recipe.scale_rewards!r}")
        weights = "None" if all(w == 1.0 for w in recipe.reward_weights) else str(list(recipe.reward_weights))
        if self.reward_weights is not None and tuple(self.reward_weights) != tuple(recipe.reward_weights):
            problems.append(f"reward_weights: the batch's advantages were made with {list(recipe.reward_weights)}, "
                            f"the objective says {list(self.reward_weights)}")
            fix.append(f"reward_weights={weights}")
        elif self.reward_weights is None and any(w != 1.0 for w in recipe.reward_weights):
            problems.append(f"reward_weights: the batch's advantages were made with {list(recipe.reward_weights)}, "
                            "the objective says none (1 each)")
            fix.append(f"reward_weights={weights}")
        if problems:
            raise ValueError(
                f"{where}: the batch does not match the objective — " + "; ".join(problems) + ". The estimators use "
                "the batch's advantages as they are, so this would predict a step the trainer never took. Sample "
                f"the batch as the trainer scores it (sample_batch(..., scale_rewards={self.scale_rewards!r}"
                + ("" if self.reward_weights is None else f", reward_weights={list(self.reward_weights)}")
                + ") or rescore(sampled, scale_rewards=..., reward_weights=...)), or pass the objective the batch was "
                f"made for (objective.replace({', '.join(fix)}))."
            )

    def for_batch(self, batch: RolloutBatch) -> "Objective":
        """This objective with the batch's recorded reward scaling and weights (for a default objective)."""
        recipe = getattr(batch, "advantage_recipe", None)
        if recipe is None:
            return self
        weights = None if all(w == 1.0 for w in recipe.reward_weights) else tuple(recipe.reward_weights)
        return self.replace(scale_rewards=recipe.scale_rewards, reward_weights=weights)

    # --------------------------------------------------------------------------------------------- the weights
    def token_weights(self, batch: RolloutBatch) -> Tensor:
        """w_{n,g,k} (times CISPO's factor a), float64 [B, G, L]: 0 off the response (see the module docstring)."""
        mask = batch.response_mask.to(torch.float64)
        B, G = batch.B, batch.G
        N = B * G
        lengths = mask.sum(dim=-1, keepdim=True)
        if self.loss_type == "dr_grpo":
            return mask / (N * batch.length_norm[:, None, None])
        if self.loss_type in ("grpo", "sapo"):
            return mask / (N * lengths.clamp(min=1.0))
        if self.loss_type == "luspo":
            return mask / N
        total = max(float(mask.sum()), 1.0)
        scale = min(1.0, self.epsilon_high) if self.loss_type == "cispo" else 1.0
        return mask * (scale / total)

    def token_advantages(self, batch: RolloutBatch) -> Tensor:
        """A per token, float64 [B, G, L]: ``batch.token_advantages`` when given, else the sequence's A."""
        if batch.token_advantages is not None:
            return batch.token_advantages
        return batch.advantages[:, :, None].expand(batch.B, batch.G, batch.L)

    @property
    def needs_reference(self) -> bool:
        """Whether the cotangent needs the reference log-probabilities (β > 0)."""
        return self.beta > 0

    def kl_derivative(self, logprobs: Tensor, reference: Tensor) -> Tensor:
        """κ per token from ℓ and ℓ_ref (any shape, float64): ℓ − ℓ_ref, or 1 − exp(ℓ_ref − ℓ) without the bias
        correction."""
        if self.use_bias_correction_kl:
            return logprobs - reference
        return 1.0 - torch.exp(reference - logprobs)

    def cotangent(self, weights: Tensor, advantages: Tensor, logprobs: Tensor | None = None,
                  reference: Tensor | None = None) -> Tensor:
        """c = w · (A − β κ(ℓ, ℓ_ref)) elementwise (float64; any common shape). ``logprobs``/``reference`` are needed
        only with β > 0."""
        if self.beta == 0:
            return weights * advantages
        if logprobs is None or reference is None:
            raise ValueError("the KL term (beta > 0) needs the token log-probabilities at θ and of the reference.")
        return weights * (advantages - self.beta * self.kl_derivative(logprobs, reference))

    # --------------------------------------------------------------------------------------------- advantages
    def advantages(self, rewards: Tensor, *, warn: bool = True) -> tuple[Tensor, "AdvantageInfo"]:
        """(A float64 [B, G], info) from rewards [B, G] or per reward function [B, G, F]: :func:`compute_advantages`
        with this objective's ``scale_rewards`` and ``reward_weights``."""
        return compute_advantages(rewards, scale_rewards=self.scale_rewards, weights=self.reward_weights, warn=warn)


def resolve_objective(objective: "Objective | None", batch: RolloutBatch, where: str) -> "Objective":
    """The objective an estimator uses on ``batch``: None → the default (Dr. GRPO) with the reward scaling and weights
    the batch records (the batch's advantages are what they are); a given one must agree with the batch's recipe
    (:meth:`Objective.check_batch`, raising ValueError naming both)."""
    if objective is None:
        return Objective().for_batch(batch)
    if not isinstance(objective, Objective):
        raise ValueError(f"{where}: objective must be a funcprobe.Objective (e.g. Objective.trl()) or None; got "
                         f"{type(objective).__name__}.")
    objective.check_batch(batch, where)
    return objective


_WEIGHT_TEXT = {"dr_grpo": "m/(N·L)", "grpo": "m/(N·T)", "sapo": "m/(N·T)", "bnpo": "m/ΣT", "dapo": "m/ΣT",
                "vespo": "m/ΣT", "cispo": "min(1, ε_high)·m/ΣT", "luspo": "m/N"}


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number; got {value!r}.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number; got {value!r}.") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite; got {value!r}.")
    return number


# ------------------------------------------------------------------------------------------------------ advantages
def nanstd(values: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """The NaN-aware unbiased standard deviation, with TRL's operations (``trl.trainer.utils.nanstd``): NaN where
    fewer than 2 values are present."""
    mean = torch.nanmean(values, dim=dim, keepdim=True)
    variance = torch.nanmean((values - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(values), dim=dim, keepdim=True).to(values.dtype)
    correction = count / (count - 1)  # in the values' dtype (TRL's int/int division gives float32: equal for float32)
    correction = torch.where(count > 1, correction, torch.full_like(correction, float("nan")))
    std = torch.sqrt(variance * correction)
    if keepdim:
        return std
    return std.squeeze() if dim is None else std.squeeze(dim)


@dataclass(frozen=True)
class AdvantageInfo:
    """How the advantages came out: ``rewards`` the combined reward [B, G] (float64; NaN where unscorable);
    ``zero_variance_groups`` the prompts whose rewards are all equal (A = 0 up to float32 rounding: they add nothing
    to the step); ``unscorable`` how many completions every reward function scored None (A = 0)."""

    rewards: Tensor
    zero_variance_groups: tuple[int, ...]
    unscorable: int

    @property
    def all_groups_zero_variance(self) -> bool:
        return len(self.zero_variance_groups) == int(self.rewards.shape[0])

    @property
    def nothing_scored(self) -> bool:
        """Every reward function returned None for every completion: there are no rewards at all."""
        return self.unscorable == int(self.rewards.numel())

    def message(self, beta: float | None = None) -> str:
        """A note for people, or "" when every group varies. ``beta``: the step's KL coefficient, when known — with
        β > 0 zero advantages leave the KL term's gradient, so the step is not the optimizer-state term alone."""
        B = int(self.rewards.shape[0])
        count = len(self.zero_variance_groups)
        if self.nothing_scored:
            return (f"nothing was scored: every reward function returned None for all {self.unscorable} completions "
                    "(TRL's 'not scored'), so there are no rewards and every advantage is 0. Check the reward "
                    "functions (a column they need, the answers they compare with).")
        unscored = (f" ({self.unscorable} completions were scored by no function: None everywhere, A = 0)"
                    if self.unscorable else "")
        if count == 0:
            return unscored.strip(" ()").capitalize() + "." if unscored else ""
        if count == B:
            if beta is not None and beta > 0:
                rest = (f"so the reward contributes nothing to the step: its gradient term is the KL penalty's alone "
                        f"(β = {beta:g}) and δH₁ is that and the optimizer-state term (momentum and weight decay).")
            elif beta is None:
                rest = ("so the reward contributes nothing to the step: δH₁ is the KL penalty's term (when β > 0) and "
                        "the optimizer-state term (momentum and weight decay).")
            else:
                rest = ("so the gradient term of the step is exactly 0 and δH₁ is the optimizer-state term alone "
                        "(momentum and weight decay).")
            return (f"every one of the {B} prompts got equal rewards for all its responses{unscored}: every advantage "
                    f"is 0, {rest} Use more responses per prompt (-G), other prompts, or a reward that separates the "
                    "responses.")
        shown = ", ".join(map(str, self.zero_variance_groups[:8])) + ("…" if count > 8 else "")
        return (f"{count} of {B} prompts (rows {shown}) got equal rewards for all their responses{unscored}: their "
                "advantages are 0 and their rewards contribute nothing to the step's gradient.")


def compute_advantages(rewards: Tensor, *, scale_rewards: str = "none", weights: Sequence[float] | None = None,
                       eps: float = REWARD_STD_EPS, dtype: torch.dtype = torch.float32,
                       warn: bool = True) -> tuple[Tensor, AdvantageInfo]:
    """Group-relative advantages as TRL 1.16's ``GRPOTrainer`` computes them ("sum_then_normalize"), in ``dtype``.

    rewards: [B, G] or, for several reward functions, [B, G, F] (NaN = a function returned None). With F functions:
    R = nansum_f(weights_f · r_f), and R = NaN where every function returned None. Then, per prompt n,

        A = R − nanmean_g(R),      divided by (std + eps) unless scale_rewards == "none",

    std the NaN-aware unbiased standard deviation of the group ("group") or of all B·G rewards ("batch");
    finally NaN → 0. Computed with TRL's operations in float32 (its rounding included: G equal non-dyadic rewards can
    give |A| ≈ 1e-4 rather than 0, as in TRL); returned as float64.

    Returns (A float64 [B, G], :class:`AdvantageInfo`). Warns (:class:`ZeroVarianceWarning`, with counts) when groups
    have equal rewards. Raises ValueError for a bad shape, scale or weights.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}; got {scale_rewards!r}.")
    values = torch.as_tensor(rewards)
    if values.dim() == 2:
        values = values[..., None]
    if values.dim() != 3 or values.shape[1] < 2:
        raise ValueError(f"rewards must be [B, G] or [B, G, F] with G ≥ 2; got shape {tuple(values.shape)}.")
    B, G, F = values.shape
    values = values.to(dtype)
    if weights is None:
        weights_t = torch.ones(F, dtype=dtype)
    else:
        weights_t = torch.as_tensor(list(weights), dtype=dtype)
        if weights_t.shape != (F,):
            raise ValueError(f"reward weights: {len(weights_t)} weights for {F} reward functions; pass one each.")
    flat = values.reshape(B * G, F)
    unscorable = torch.isnan(flat).all(dim=1)
    combined = (flat * weights_t[None, :]).nansum(dim=1)
    combined[unscorable] = float("nan")
    grouped = combined.view(B, G)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(G, dim=0)
    group_std = nanstd(grouped, dim=1).repeat_interleave(G, dim=0)
    std = nanstd(combined).expand_as(combined) if scale_rewards == "batch" else group_std
    advantages = combined - mean
    if scale_rewards != "none":
        advantages = advantages / (std + eps)
    advantages = torch.nan_to_num(advantages, nan=0.0).view(B, G).to(torch.float64)
    zero = torch.isclose(group_std, torch.zeros_like(group_std)).view(B, G)[:, 0] | torch.isnan(group_std).view(B, G)[:, 0]
    info = AdvantageInfo(rewards=grouped.to(torch.float64), zero_variance_groups=tuple(zero.nonzero().flatten().tolist()),
                         unscorable=int(unscorable.sum()))
    if warn and info.zero_variance_groups:
        warnings.warn(info.message(), ZeroVarianceWarning, stacklevel=2)
    return advantages, info
