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
"""

from __future__ import annotations

import types
import warnings

import torch
from torch import nn

__all__ = ["exact_float64", "EXACT_EAGER"]

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
