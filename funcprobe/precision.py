"""Float64 all the way through: remove the float32 round-trips that transformers keeps inside a float64 model.

transformers' Llama/Qwen2 code upcasts to float32 at two places, whatever the model's dtype — meant for half
precision, where it is an upcast:

* RMSNorm: ``hidden_states.to(torch.float32)`` before the variance, then back;
* eager attention: ``softmax(..., dtype=torch.float32).to(query.dtype)``.

In a float64 model both are *down*casts. Reference computations then agree only to ~1e-7 relative: for example a
vjp and a jvp of the same map differentiate through different float32 roundings (the cause of a 2.4e-9 relative
disagreement between δH₁'s plug-in value and the directional derivative of the entropy surrogate), and
vjp(c·v) ≠ c·vjp(v). :func:`exact_float64` makes a float64 model compute both in float64:

* each RMSNorm's ``forward`` is rebound to weight · x / sqrt(mean(x²) + ε) in the input's dtype;
* a model on ``attn_implementation="eager"`` is switched to ``"funcprobe_eager_float64"``, the same eager attention
  with the softmax in the query's dtype (registered once in transformers' ``AttentionInterface``, with the eager
  mask). SDPA needs nothing: its math kernel keeps the input dtype.

``load_policy(..., dtype=torch.float64)`` and the float64 test models (``funcprobe.testing``) apply it to the
models they build; a module passed in by the user is never changed by funcprobe.

The other direction — a model in bfloat16 on a GPU — is a choice of speed over precision. :func:`check_precision`
compares the dtype's measured systematic error (:data:`DTYPE_RELATIVE_ERROR`, bench/precision.py) with the reported
standard errors and warns (:class:`PrecisionWarning`) when rounding, not sampling, could dominate; :func:`float32_head`
is the cheap partial fix measured there (the LM head in float32 above a bfloat16 decoder).
"""

from __future__ import annotations

import types
import warnings

import torch
from torch import nn

__all__ = ["exact_float64", "EXACT_EAGER", "PrecisionWarning", "DTYPE_RELATIVE_ERROR", "SE_FRACTION", "precision_key",
           "systematic_error", "check_precision", "float32_head"]

#: The attention implementation name of the float64-exact eager attention.
EXACT_EAGER = "funcprobe_eager_float64"


def _rms_norm_in_input_dtype(self, hidden_states):
    """RMSNorm computed in the input's dtype: weight · x / sqrt(mean(x²) + ε)."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _eager_attention_in_query_dtype(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' eager attention (Llama/Qwen2) with the softmax taken in the query's dtype."""
    from transformers.models.llama.modeling_llama import repeat_kv

    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.softmax(weights, dim=-1)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value_states).transpose(1, 2).contiguous()
    return output, weights


def _register_exact_eager() -> bool:
    """Register :data:`EXACT_EAGER` with transformers (idempotent); False where this transformers cannot."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask
    except ImportError:
        return False
    AttentionInterface.register(EXACT_EAGER, _eager_attention_in_query_dtype)
    AttentionMaskInterface.register(EXACT_EAGER, eager_mask)
    return True


def exact_float64(model: nn.Module) -> nn.Module:
    """Make a float64 model compute its RMSNorms and eager attention in float64 (see the module docstring).

    Changes ``model`` in place (its RMSNorm modules' ``forward`` and its config's attention implementation) and
    returns it. A model that is not float64 is returned unchanged. On a transformers too old to register attention
    functions (< 4.48) only the norms are changed, with a warning.
    """
    parameter = next(model.parameters(), None)
    if parameter is None or parameter.dtype != torch.float64:
        return model
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rms_norm_in_input_dtype, module)
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    eager = [c for c in configs.values() if getattr(c, "_attn_implementation", None) == "eager"]
    if eager:
        if _register_exact_eager():
            for config in eager:
                config._attn_implementation = EXACT_EAGER
        else:
            warnings.warn("this transformers cannot register attention functions: eager attention keeps its float32 "
                          "softmax in the float64 model (reference tests then agree to ~1e-7 only).", RuntimeWarning,
                          stacklevel=2)
    return model


# ------------------------------------------------------------------------------------ the dtype's systematic error
class PrecisionWarning(UserWarning):
    """The model's dtype could move an estimate by more than a set fraction of its reported standard error."""


#: Relative errors of δH₁'s two terms and of ΔĤ caused by the model's dtype, measured against a float64 model on the
#: same batches with the same optimizer state (SmolLM2-135M-Instruct + LoRA, B = 4, G = 4, 16 new tokens, E 8 × 4;
#: ``bench/precision.py``, bench/RESULTS.md "Precision on the real model"), the larger of two settings (a synthetic
#: small step and `make demo`'s trained checkpoint), rounded up. float32: ≤ 1.9e-5 on every term. bfloat16 base
#: (float32 adapters and optimizer state, as PEFT keeps them): gradient term 1.4–3.2 %, state term 0.4–20 %, ΔĤ 21–76 %
#: of its value — the bf16 decoder rounds the step's small effect on the hidden states, so ΔĤ in bf16 is not a
#: measurement at small steps. The float32 head does not help (0.9–2.9 %, 0.7–15 %, 25–91 %): the error is the
#: decoder's. Keys: the dtype of the base model, then "+float32 head" when the LM head runs in float32
#: (:func:`float32_head`).
DTYPE_RELATIVE_ERROR: dict[str, dict[str, float]] = {
    "float64": {"grad_term": 0.0, "state_term": 0.0, "deltaH": 0.0},
    "float32": {"grad_term": 1e-4, "state_term": 1e-4, "deltaH": 1e-4},
    "bfloat16": {"grad_term": 0.05, "state_term": 0.25, "deltaH": 1.0},
    "bfloat16+float32 head": {"grad_term": 0.05, "state_term": 0.25, "deltaH": 1.0},
}
# float16 has 3 more mantissa bits than bfloat16 but the same activations' range problems; it is not measured, so
# it gets bfloat16's (conservative) bounds.
DTYPE_RELATIVE_ERROR["float16"] = DTYPE_RELATIVE_ERROR["bfloat16"]
DTYPE_RELATIVE_ERROR["float16+float32 head"] = DTYPE_RELATIVE_ERROR["bfloat16+float32 head"]
#: Warn when the dtype's systematic error could exceed this fraction of the reported SE.
SE_FRACTION = 0.25


def precision_key(policy) -> str:
    """The :data:`DTYPE_RELATIVE_ERROR` key of a ``Policy``: its decoder's dtype, plus "+float32 head" when the LM head
    runs in float32 above a narrower decoder."""
    decoder = next((p.dtype for p in policy.decoder.parameters() if p.is_floating_point()), policy.dtype)
    name = str(decoder).removeprefix("torch.")
    if policy.dtype == torch.float32 and decoder in (torch.bfloat16, torch.float16):
        name += "+float32 head"
    return name


def systematic_error(key: str, *, grad_term: float, state_term: float, deltaH: float | None = None) -> dict:
    """Bounds on the dtype's systematic error of δH₁ (e_grad·|grad_term| + e_state·|state_term|) and of ΔĤ
    (e·|ΔĤ|), from :data:`DTYPE_RELATIVE_ERROR`; ``{"deltaH1": …, "deltaH": … or None, "relative": the row}``.
    An unknown key (a dtype not measured) gives None bounds."""
    row = DTYPE_RELATIVE_ERROR.get(key)
    if row is None:
        return {"deltaH1": None, "deltaH": None, "relative": None}
    bound = row["grad_term"] * abs(grad_term) + row["state_term"] * abs(state_term)
    realised = None if deltaH is None else row["deltaH"] * abs(deltaH)
    return {"deltaH1": bound, "deltaH": realised, "relative": dict(row)}


def check_precision(prediction, policy, realised=None, *, fraction: float = SE_FRACTION) -> dict:
    """Warn (:class:`PrecisionWarning`) when the policy's dtype could move δH₁ — or ΔĤ, given ``realised`` (an
    ``SNISResult``/``CRNResult``) — by more than ``fraction`` of its reported standard error.

    The bound is :func:`systematic_error`: measured relative errors of each term against float64 on a real model.
    Returns the bounds, the SEs and the message (None when there is nothing to warn about), for the results JSON.
    An SE that is 0 or not finite (fewer than 3 units, or every advantage 0) is not compared: there is no sampling
    error to set the rounding against.
    Large batches shrink the SEs (∝ 1/√B) but not the rounding, so the warning says when a bfloat16 run's
    precision, not its sample size, limits the estimate (README: "Precision: when to pay for float32 on a GPU").
    """
    import math

    key = precision_key(policy)
    deltaH = None if realised is None else getattr(realised, "deltaH", None)
    bounds = systematic_error(key, grad_term=prediction.grad_term, state_term=prediction.state_term, deltaH=deltaH)
    se_h1 = prediction.se_deltaH1 if math.isfinite(prediction.se_deltaH1) else prediction.se_grad_plugin
    se_h = None if realised is None else getattr(realised, "se", None)
    problems = []
    if bounds["deltaH1"] is not None and math.isfinite(se_h1) and se_h1 > 0 and bounds["deltaH1"] > fraction * se_h1:
        problems.append(f"δH₁ by up to {bounds['deltaH1']:.2g} ({bounds['deltaH1'] / se_h1:.2g} × its SE "
                        f"{se_h1:.2g})")
    if (bounds["deltaH"] is not None and se_h is not None and math.isfinite(se_h) and se_h > 0
            and bounds["deltaH"] > fraction * se_h):
        problems.append(f"ΔĤ by up to {bounds['deltaH']:.2g} ({bounds['deltaH'] / se_h:.2g} × its SE {se_h:.2g})")
    message = None
    if problems:
        row = bounds["relative"]
        message = (f"the model runs in {key}, whose rounding can move " + " and ".join(problems) +
                   f" — more than {fraction:g} of the SE, so the estimate's precision, not the batch size, limits it "
                   f"(measured against float64: gradient term ~{100 * row['grad_term']:.3g}%, state term "
                   f"~{100 * row['state_term']:.3g}%, ΔĤ ~{100 * row['deltaH']:.3g}%). Run in float32 (--dtype "
                   "float32) for a batch this large; README: 'Precision: when to pay for float32 on a GPU'.")
        warnings.warn(message, PrecisionWarning, stacklevel=2)
    return {"key": key, "bound_deltaH1": bounds["deltaH1"], "bound_deltaH": bounds["deltaH"], "se_deltaH1": se_h1,
            "se_deltaH": se_h, "fraction": fraction, "relative_error": bounds["relative"], "warning": message}


def float32_head(model: nn.Module) -> nn.Module:
    """Run the LM head of a bfloat16/float16 model in float32: the final norm's output is cast to float32 and the head
    gets its own float32 copy of its weight (untied from the embedding, which stays in the narrow dtype).

    The cheap precision fix measured in bench/RESULTS.md ("Precision on the real model"): the [V, H] head weight costs
    4·V·H bytes more (0.9 GB for a 151,936 × 1,536 head). Changes ``model`` in place (before wrapping it with PEFT)
    and returns it; a float32/float64 model is returned unchanged.
    """
    head = model.get_output_embeddings()
    if head is None or head.weight.dtype not in (torch.bfloat16, torch.float16):
        return model
    weight = nn.Parameter(head.weight.detach().to(torch.float32).clone(), requires_grad=False)
    head.weight = weight
    if head.bias is not None:
        head.bias = nn.Parameter(head.bias.detach().to(torch.float32).clone(), requires_grad=False)
    if hasattr(model.config, "tie_word_embeddings"):
        model.config.tie_word_embeddings = False
    norm = getattr(model.get_decoder(), "norm", None)
    if norm is None:
        raise ValueError(f"float32_head: {type(model).__name__}'s decoder has no final `norm` module to cast.")
    norm.register_forward_hook(lambda module, args, output: output.to(torch.float32))
    return model
