"""The rollout batch: B prompts × G responses, validated once, never modified.

Spec §0 (``shared/spec/ESTIMATORS.md``) is the contract for :class:`RolloutBatch`:

* ``input_ids``       int64 [B, G, L]  prompt tokens, then response tokens, padded with ``pad_token_id`` on either side
* ``attention_mask``  bool  [B, G, L]  True on every real token (prompt and response)
* ``response_mask``   bool  [B, G, L]  True exactly on the response tokens whose log-probability counts
* ``advantages``      float64 [B, G]   A_{n,g}
* ``length_norm``     float64 [B]      L_n > 0, the per-prompt normaliser of the policy-gradient loss
* ``logprobs``        float64 [B, G]   S_{n,g}(θ) cached at sampling time, or None (computed when needed)
* ``rewards``         float64 [B, G]   for reporting only, or None
* ``token_advantages`` float64 [B, G, L] per-token advantages (PPO/GAE-style), used instead of ``advantages`` where
                                       given, or None
* ``prompt_index``    int64 [B]        which prompt of the pool each row is, or None (for drawing an independent
                                       evaluation batch from the same pool, spec §6)
* ``temperature``     float > 0        the τ the responses were drawn at; every log-probability of this batch uses
                                       it, and a policy with another τ refuses the batch

:meth:`RolloutBatch.from_token_lists` builds a batch from token ids (prompts [B], completions [B][G]) in the one layout
every funcprobe batch built that way has (the sampler's, merged shards', a rollouts file's, the TRL callback's): the
prompt right-aligned at column P (the longest prompt), the completion from P, padding on both ends.

Construction validates everything the estimators rely on and raises :class:`ValueError` naming the field, what was
found and how to fix it. Every method returns a new object; nothing here writes into a tensor it was given. A batch may
share storage with the tensors it was built from (no defensive copies: batches can be large); funcprobe never writes
to them, and callers must not either.

Batches normally live on the CPU and are moved to the compute device chunk by chunk:
:meth:`RolloutBatch.iter_prompt_chunks` (whole prompts, for per-prompt quantities) and
:meth:`RolloutBatch.iter_sequence_chunks` (the B·G sequences flattened, with all-padding columns trimmed).

:func:`batch_fingerprint` (``RolloutBatch.fingerprint``, computed once per batch) names the samples of a batch: every
result funcprobe computes on an evaluation batch E records it (``evaluation_fingerprint``), and the functions that
pair two such results per prompt refuse two different E's of the same shape.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["FORMAT_VERSION", "AdvantageRecipe", "RolloutBatch", "SequenceChunk", "NotABatchError", "as_rollout_batch",
           "batch_fingerprint", "FINGERPRINT_LENGTH"]

#: Written into every saved batch (safetensors metadata and JSON: ``funcprobe.rollouts_file``) and checked on load.
FORMAT_VERSION = "funcprobe.batch/2"
#: The format before the sampling temperature was recorded: read only when the caller states τ (``temperature=``).
_FORMAT_V1 = "funcprobe.batch/1"

_FORMAT_KEY = "format"
_PAD_KEY = "pad_token_id"
_REQUIRED_TENSORS = ("input_ids", "attention_mask", "response_mask", "advantages", "length_norm")
_OPTIONAL_TENSORS = ("logprobs", "rewards")
#: Optional per-prompt integer tensors [B].
_OPTIONAL_INDEX = ("prompt_index",)
#: Optional per-token tensors [B, G, L].
_OPTIONAL_TOKEN = ("token_advantages",)
_TEMPERATURE_KEY = "temperature"
_RECIPE_KEY = "advantage_recipe"
_MASKS = ("attention_mask", "response_mask")
_TENSOR_FIELDS = _REQUIRED_TENSORS + _OPTIONAL_TENSORS + _OPTIONAL_INDEX + _OPTIONAL_TOKEN
_DICT_KEYS = frozenset((_FORMAT_KEY, _PAD_KEY, _TEMPERATURE_KEY, _RECIPE_KEY) + _TENSOR_FIELDS)


@dataclasses.dataclass(frozen=True)
class AdvantageRecipe:
    """How a batch's advantages were made from its rewards: the reward scaling (``"group"``, ``"batch"`` or
    ``"none"``, TRL's ``scale_rewards``) and the weights of the F reward functions (always F numbers: 1 each when the
    caller gave none). Recorded by the sampler and the rollouts loader; ``None`` on a batch whose advantages came from
    elsewhere (built by hand), where nothing can be checked.

    An estimator that takes an ``Objective`` refuses a batch whose recipe contradicts the objective's
    ``scale_rewards`` / ``reward_weights`` (``Objective.check_batch``): the step would use other advantages than the
    ones in the batch."""

    scale_rewards: str
    reward_weights: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"advantage_recipe: scale_rewards {self.scale_rewards!r} is not one of 'group', "
                             "'batch', 'none'.")
        try:
            weights = tuple(float(w) for w in self.reward_weights)
        except (TypeError, ValueError):
            raise ValueError(f"advantage_recipe: reward_weights {self.reward_weights!r} must be numbers.") from None
        if not weights:
            raise ValueError("advantage_recipe: reward_weights is empty (one weight per reward function).")
        object.__setattr__(self, "reward_weights", weights)

    @classmethod
    def of(cls, scale_rewards: str, reward_weights: Any, num_functions: int) -> "AdvantageRecipe":
        """The recipe of ``compute_advantages(rewards [B, G, F], scale_rewards=…, weights=reward_weights)``."""
        weights = (1.0,) * int(num_functions) if reward_weights is None else tuple(reward_weights)
        return cls(scale_rewards=scale_rewards, reward_weights=weights)

    @classmethod
    def for_rewards(cls, rewards: Tensor, scale_rewards: str, reward_weights: Any) -> "AdvantageRecipe":
        """The recipe of ``compute_advantages(rewards, …)`` for rewards [B, G] (one function) or [B, G, F]."""
        return cls.of(scale_rewards, reward_weights, int(rewards.shape[-1]) if rewards.dim() == 3 else 1)

    def describe(self) -> str:
        weights = "" if all(w == 1.0 for w in self.reward_weights) else \
            f", reward_weights={list(self.reward_weights)}"
        return f"scale_rewards={self.scale_rewards!r}{weights}"

    def to_dict(self) -> dict[str, Any]:
        return {"scale_rewards": self.scale_rewards, "reward_weights": list(self.reward_weights)}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "AdvantageRecipe | None":
        if data is None:
            return None
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except ValueError:
                raise ValueError(f"{where}: its advantage_recipe {data!r} is not JSON. Re-save the batch.") from None
        if not isinstance(data, Mapping) or set(data) != {"scale_rewards", "reward_weights"}:
            raise ValueError(f"{where}: its advantage_recipe {data!r} is not a mapping with 'scale_rewards' and "
                             "'reward_weights'. Re-save the batch.")
        return cls(scale_rewards=data["scale_rewards"], reward_weights=tuple(data["reward_weights"]))


class NotABatchError(TypeError, ValueError):
    """A public function was given something that is not a rollout batch (both a TypeError and a ValueError)."""


def as_rollout_batch(value: Any, what: str) -> "RolloutBatch":
    """The ``RolloutBatch`` a public function was given as ``what``: the batch itself, or the object that holds it as
    ``.batch`` (the ``SampledBatch`` of ``sample_batch``, the ``Responses`` of ``draw_responses``). Anything else is
    refused with one message, the same from every function."""
    if isinstance(value, RolloutBatch):
        return value
    inner = getattr(value, "batch", None)
    if isinstance(inner, RolloutBatch):
        return inner
    raise NotABatchError(f"{what} must be a funcprobe.RolloutBatch or the SampledBatch that sample_batch returns (its "
                     f"batch is used); got {type(value).__name__}. Build one with sample_batch(...), "
                     "RolloutBatch(...) or funcprobe.rollouts_file.load_batch(path).")


# --------------------------------------------------------------------------------------------------------------------
# validation helpers: each raises ValueError("<field>: <what was found>. <how to fix>")


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype is not torch.bool


def _first_index(bad: Tensor) -> tuple[int, ...]:
    """Index of the first True entry of ``bad`` (row-major), as a tuple of ints."""
    return tuple(int(i) for i in bad.nonzero()[0].tolist())


def _require_tensor(name: str, value: Any) -> None:
    if not isinstance(value, Tensor):
        raise ValueError(
            f"{name}: expected a torch.Tensor, found {type(value).__name__}. "
            f"Wrap it with torch.tensor(...) or build the batch with RolloutBatch.from_dict."
        )


def _require_shape(name: str, tensor: Tensor, expected: tuple[int, ...], symbols: str, fix: str) -> None:
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{name}: expected shape {symbols} = {expected}, found {tuple(tensor.shape)}. {fix}")


def _require_finite(name: str, tensor: Tensor, fix: str) -> None:
    bad = ~torch.isfinite(tensor)
    if bool(bad.any()):
        where = _first_index(bad)
        raise ValueError(
            f"{name}: must be finite, found {tensor[where].item()} at index {where} "
            f"({int(bad.sum())} non-finite entries). {fix}"
        )


def _check_real_dtype(name: str, tensor: Tensor, *, allow_integer: bool) -> None:
    dtype = tensor.dtype
    if dtype.is_floating_point or (allow_integer and _is_integer_dtype(dtype)):
        return
    allowed = "a floating or integer dtype" if allow_integer else "a floating dtype (stored as float64)"
    raise ValueError(f"{name}: expected {allowed}, found dtype {dtype}. Convert it with .to(torch.float64).")


def _check_mask_values(name: str, mask: Tensor) -> None:
    if mask.dtype is torch.bool:
        return
    bad = (mask != 0) & (mask != 1)
    if bool(bad.any()):
        where = _first_index(bad)
        raise ValueError(
            f"{name}: must hold only 0 and 1, found {mask[where].item()} at index {where}. "
            f"Build masks as bool or 0/1 integer tensors (e.g. (ids != pad_token_id))."
        )


def _recorded_temperature(recorded: Any, found_format: str, stated: float | None, where: str) -> float:
    """The τ a saved batch was drawn at: its recorded value, checked against ``stated`` when both exist; for the
    older format (no τ recorded) ``stated`` is required."""
    if recorded is None:
        if stated is None:
            raise ValueError(
                f"{where}: records no sampling temperature (format {found_format!r}, written before τ was recorded). "
                f"The estimators must use the τ the responses were drawn at: pass it, e.g. load_batch(path, "
                f"temperature=1.0) or RolloutBatch.from_dict(data, temperature=1.0), or re-save the batch with this "
                f"funcprobe."
            )
        return float(stated)
    try:
        value = float(recorded)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: its temperature {recorded!r} is not a number. Re-save the batch.") from None
    if stated is not None and float(stated) != value:
        raise ValueError(
            f"{where}: was drawn at temperature τ={value:g}, but temperature={stated!r} was passed. Leave it out to "
            f"use the recorded τ."
        )
    return value


def _as_chunk_size(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ValueError(f"{name}: must be an integer ≥ 1, found {value!r}. Pass a positive chunk size.")
    return int(value)


# --------------------------------------------------------------------------------------------------------------------
# the checks of RolloutBatch.__post_init__, in the order it runs them: scalars, tensor types and dtypes, dimensions
# and shapes, one device, then each field's values. ``_check_*`` raise; ``_valid_*`` raise or return the stored value
# (a new tensor, or the same one when nothing changes: nothing given is written to; detach(): a batch is data, and a
# graph hanging off advantages or logprobs would leak into every estimate).


def _valid_pad_token_id(pad: Any) -> int:
    if isinstance(pad, bool) or not isinstance(pad, numbers.Integral) or int(pad) < 0:
        raise ValueError(
            f"pad_token_id: expected an integer ≥ 0, found {pad!r}. Pass the tokenizer's pad_token_id "
            f"(or its eos_token_id when it has none)."
        )
    return int(pad)


def _valid_temperature(given: Any) -> float:
    temperature = given.item() if isinstance(given, Tensor) else given
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not (math.isfinite(float(temperature)) and float(temperature) > 0):
        raise ValueError(
            f"temperature: expected a finite number > 0 (the τ the responses were drawn at), found "
            f"{given!r}. Pass the sampler's temperature (1.0 for plain sampling)."
        )
    return float(temperature)


def _valid_recipe(recipe: Any) -> AdvantageRecipe | None:
    if isinstance(recipe, Mapping):
        recipe = AdvantageRecipe.from_dict(recipe, "advantage_recipe")
    if recipe is not None and not isinstance(recipe, AdvantageRecipe):
        raise ValueError(f"advantage_recipe: expected a funcprobe.batch.AdvantageRecipe or None, found "
                         f"{type(recipe).__name__}. Leave it None when the advantages' making is unknown.")
    return recipe


def _check_tensor_types(given: Mapping[str, Any]) -> None:
    """Every required field is a tensor and every optional one a tensor or None, each of a dtype its field allows
    (token_advantages and prompt_index: checked with their values)."""
    for name in _TENSOR_FIELDS:
        if name in _REQUIRED_TENSORS or given[name] is not None:
            _require_tensor(name, given[name])
    if not _is_integer_dtype(given["input_ids"].dtype):
        raise ValueError(
            f"input_ids: expected an integer dtype (stored as int64), found dtype {given['input_ids'].dtype}. "
            f"Pass token ids, e.g. tokenizer(..., return_tensors='pt')['input_ids']."
        )
    for name in _MASKS:
        dtype = given[name].dtype
        if dtype is not torch.bool and not _is_integer_dtype(dtype):
            raise ValueError(
                f"{name}: expected a bool or 0/1 integer dtype, found dtype {dtype}. "
                f"Convert it with (mask != 0) after checking it holds only 0 and 1."
            )
    for name in ("advantages", "length_norm", "rewards"):
        if given[name] is not None:
            _check_real_dtype(name, given[name], allow_integer=True)
    if given["logprobs"] is not None:
        _check_real_dtype("logprobs", given["logprobs"], allow_integer=False)


def _check_dimensions(input_ids: Tensor) -> tuple[int, int, int]:
    """(B, G, L) of input_ids, with B ≥ 1, G ≥ 2 and L ≥ 2."""
    if input_ids.dim() != 3:
        raise ValueError(
            f"input_ids: expected 3 dimensions [B, G, L], found shape {tuple(input_ids.shape)}. "
            f"Reshape flat [B*G, L] sequences with .view(B, G, L) (the G responses of a prompt adjacent)."
        )
    B, G, L = input_ids.shape
    if B < 1:
        raise ValueError(f"input_ids: found B={B} prompts (shape {tuple(input_ids.shape)}). A batch needs B ≥ 1.")
    if G < 2:
        raise ValueError(
            f"input_ids: found G={G} response per prompt (shape {tuple(input_ids.shape)}); the leave-one-out "
            f"baseline needs G ≥ 2. Sample at least 2 responses per prompt."
        )
    if L < 2:
        raise ValueError(
            f"input_ids: found L={L} column (shape {tuple(input_ids.shape)}); a sequence needs a prompt token and "
            f"a response token (L ≥ 2)."
        )
    return B, G, L


def _check_shapes(present: Mapping[str, Tensor], B: int, G: int, L: int) -> None:
    """The masks [B, G, L], advantages and the optional per-response fields [B, G], length_norm [B]."""
    for name in _MASKS:
        _require_shape(name, present[name], (B, G, L), "[B, G, L]", "It must have the shape of input_ids.")
    _require_shape("advantages", present["advantages"], (B, G), "[B, G]", "Pass one advantage per response.")
    _require_shape("length_norm", present["length_norm"], (B,), "[B]", "Pass one normaliser per prompt.")
    for name in _OPTIONAL_TENSORS:
        if name in present:
            _require_shape(name, present[name], (B, G), "[B, G]", "Pass one value per response, or None.")


def _check_one_device(present: Mapping[str, Tensor]) -> None:
    device = present["input_ids"].device
    for name, tensor in present.items():
        if tensor.device != device:
            raise ValueError(
                f"{name}: is on device {tensor.device} but input_ids is on {device}; all tensors of a batch must "
                f"be on one device. Move it with .to({str(device)!r}) (RolloutBatch.to moves a whole batch)."
            )


def _valid_input_ids(input_ids: Tensor, pad: int) -> Tensor:
    input_ids = input_ids.detach().to(torch.int64)
    if bool((input_ids < 0).any()):
        where = _first_index(input_ids < 0)
        raise ValueError(
            f"input_ids: token ids must be ≥ 0, found {input_ids[where].item()} at index {where}. "
            f"Replace placeholder ids (e.g. -100 labels) with pad_token_id={pad}."
        )
    return input_ids


def _valid_masks(attention_mask: Tensor, response_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(attention_mask, response_mask) as bool: 0/1 values, the response inside the real tokens, never at column 0,
    and every response token right after a real token."""
    _check_mask_values("attention_mask", attention_mask)
    _check_mask_values("response_mask", response_mask)
    attention_mask = attention_mask.detach().to(torch.bool)
    response_mask = response_mask.detach().to(torch.bool)
    outside = response_mask & ~attention_mask
    if bool(outside.any()):
        raise ValueError(
            f"response_mask: is 1 at index {_first_index(outside)} where attention_mask is 0 "
            f"({int(outside.sum())} such entries); the response must be made of real tokens. "
            f"Build it as response_mask & attention_mask, with padding excluded."
        )
    at_start = response_mask[..., 0]
    if bool(at_start.any()):
        where = _first_index(at_start) + (0,)
        raise ValueError(
            f"response_mask: is 1 at position 0 (index {where}); position 0 has no context to be predicted "
            f"from. Put at least one prompt token before the response and set response_mask there to 0."
        )
    # S reads the log-probability of token k from the logits at column k−1, so that column must be a real token;
    # a pad there (a gap between prompt and response, or a response with no prompt) would give garbage silently.
    after_pad = response_mask[..., 1:] & ~attention_mask[..., :-1]
    if bool(after_pad.any()):
        n, g, k = _first_index(after_pad)
        raise ValueError(
            f"response_mask: is 1 at index {(n, g, k + 1)} but the previous column (k={k}) is padding "
            f"(attention_mask 0); a response token is predicted from the previous position, which must be a real "
            f"token. Pad only at the ends of a sequence (left or right), never between prompt and response."
        )
    return attention_mask, response_mask


def _valid_advantages(advantages: Tensor) -> Tensor:
    advantages = advantages.detach().to(torch.float64)
    _require_finite("advantages", advantages, "Check the advantage computation (e.g. dividing by a zero group std).")
    return advantages


def _valid_length_norm(length_norm: Tensor) -> Tensor:
    length_norm = length_norm.detach().to(torch.float64)
    _require_finite("length_norm", length_norm, "Use the generation budget max_new_tokens (Dr. GRPO).")
    if bool((length_norm <= 0).any()):
        where = _first_index(length_norm <= 0)
        raise ValueError(
            f"length_norm: must be > 0, found {length_norm[where].item()} at index {where}. "
            f"Use the generation budget max_new_tokens (Dr. GRPO) or another positive normaliser."
        )
    return length_norm


def _valid_logprobs(logprobs: Tensor | None) -> Tensor | None:
    if logprobs is None:
        return None
    logprobs = logprobs.detach().to(torch.float64)
    _require_finite("logprobs", logprobs, "Recompute them, or pass logprobs=None to have them computed.")
    # A sum of log-probabilities is ≤ 0; allow float rounding (a near-certain token can give z_y − lse(z) of a few
    # ulps above 0) but catch negative log-likelihoods stored by mistake.
    positive = logprobs > 1e-4
    if bool(positive.any()):
        where = _first_index(positive)
        raise ValueError(
            f"logprobs: sequence log-probabilities must be ≤ 0, found {logprobs[where].item()} at index "
            f"{where}. These look like negative log-likelihoods: pass S = Σ log π (negate them), or None."
        )
    return logprobs


def _valid_rewards(rewards: Tensor | None) -> Tensor | None:
    if rewards is None:
        return None
    rewards = rewards.detach().to(torch.float64)
    _require_finite("rewards", rewards, "Fix the reward function, or pass rewards=None.")
    return rewards


def _valid_token_advantages(token_advantages: Tensor | None, shape: tuple[int, int, int]) -> Tensor | None:
    if token_advantages is None:
        return None
    _check_real_dtype("token_advantages", token_advantages, allow_integer=True)
    _require_shape("token_advantages", token_advantages, shape, "[B, G, L]",
                   "Pass one advantage per token (the shape of input_ids), or None.")
    token_advantages = token_advantages.detach().to(torch.float64)
    _require_finite("token_advantages", token_advantages, "Check the per-token advantage computation.")
    return token_advantages


def _valid_prompt_index(prompt_index: Tensor | None, B: int) -> Tensor | None:
    if prompt_index is None:
        return None
    if not _is_integer_dtype(prompt_index.dtype):
        raise ValueError(
            f"prompt_index: expected integer pool indices, found dtype {prompt_index.dtype}. Pass the "
            f"positions of the prompts in their pool as an int64 tensor, or None."
        )
    _require_shape("prompt_index", prompt_index, (B,), "[B]", "Pass one pool index per prompt, or None.")
    prompt_index = prompt_index.detach().to(torch.int64)
    if bool((prompt_index < 0).any()):
        where = _first_index(prompt_index < 0)
        raise ValueError(f"prompt_index: pool indices must be ≥ 0, found {prompt_index[where].item()} at "
                         f"index {where}. Pass positions in the prompt pool, or None.")
    return prompt_index


# --------------------------------------------------------------------------------------------------------------------
# RolloutBatch.from_token_lists's arguments


def _token_row(ids: Any, what: str) -> Tensor:
    """int64 [n]: one prompt's or completion's token ids (a sequence of ints or a 1-D integer tensor)."""
    try:
        row = torch.as_tensor(ids)
    except (TypeError, ValueError, RuntimeError, OverflowError) as error:
        raise ValueError(f"{what}: expected a sequence of token ids, found {type(ids).__name__} ({error}).") from None
    if row.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    if row.dim() != 1 or not _is_integer_dtype(row.dtype):
        raise ValueError(f"{what}: expected a flat sequence of integer token ids, found dtype {row.dtype} and shape "
                         f"{tuple(row.shape)}.")
    return row.to(torch.int64)


def _per_token(name: str, values: Any, rows: list[list[Tensor]], dtype: torch.dtype) -> list[list[Tensor]] | None:
    """``values`` [B][G][|completion|] as tensors of ``dtype``, each as long as its completion in ``rows``; or None."""
    if values is None:
        return None
    if len(values) != len(rows) or any(len(values[n]) != len(group) for n, group in enumerate(rows)):
        raise ValueError(f"{name}: expected [B][G] = [{len(rows)}][{len(rows[0])}] sequences, one per completion.")
    out = []
    for n, group in enumerate(rows):
        out.append([])
        for g, ids in enumerate(group):
            value = torch.as_tensor(values[n][g], dtype=dtype)
            if tuple(value.shape) != (len(ids),):
                raise ValueError(f"{name}[{n}][{g}]: has shape {tuple(value.shape)}, but its completion has "
                                 f"{len(ids)} tokens; pass one value per completion token.")
            out[-1].append(value)
    return out


def _as_tensor(name: str, value: Any, dtype: torch.dtype | None) -> Any:
    """A tensor given as a nested sequence, as a tensor (``dtype``, or the one torch infers); a tensor or None as is."""
    if value is None or isinstance(value, Tensor):
        return value
    try:
        return torch.as_tensor(value, dtype=dtype)
    except (TypeError, ValueError, RuntimeError, OverflowError) as error:
        raise ValueError(f"{name}: could not be read as a rectangular numeric array ({error}).") from None


# --------------------------------------------------------------------------------------------------------------------
# the fingerprint of a batch's samples

#: Hex digits of :func:`batch_fingerprint` (64 bits of SHA-256: two different batches share one by chance with
#: probability 2⁻⁶⁴).
FINGERPRINT_LENGTH = 16
_FINGERPRINT_TAG = b"funcprobe.batch-fingerprint/1"


def batch_fingerprint(batch: "RolloutBatch") -> str:
    """A short stable name of the samples of ``batch``: the first ``FINGERPRINT_LENGTH`` hex digits of SHA-256 over

    * the shape B, G (prompts, responses per prompt) and the temperature τ the responses were drawn at;
    * for each of the B·G sequences, in row-major order (prompt n, response g): its real tokens (``attention_mask``
      True) in order and, for each, whether it is a response token (``response_mask``) — the prompt, the response and
      where one ends and the other begins.

    Two batches have the same fingerprint exactly when they hold the same prompts and responses, in the same order,
    drawn at the same τ: what every log-probability and entropy of the batch reads (padding is invisible to the model:
    position ids come from the attention mask). So it is NOT changed by the padding layout (L, left or right padding,
    ``pad_token_id``) — a batch, its copy through ``funcprobe.rollouts_file`` (``save_batch``/``load_batch``, JSON) and
    its copy through ``token_lists()``/``from_token_lists(...)`` share it — nor by what scores the samples
    (``advantages``, ``token_advantages``, ``rewards``, ``length_norm``, ``logprobs``, ``advantage_recipe``,
    ``prompt_index``): the realised change and the first-order change on an evaluation batch do not read them. One
    changed token, one token moved between prompt and response, another τ, another order of prompts: another
    fingerprint. The same on every device and machine (little-endian bytes of the CPU tensors).

    ``RolloutBatch.fingerprint`` caches it on the batch (computed on first use; the batch is immutable)."""
    flat_attention = batch.attention_mask.reshape(batch.num_sequences, batch.L).to("cpu")
    tokens = batch.input_ids.reshape(batch.num_sequences, batch.L).to("cpu")[flat_attention]       # row-major
    response = batch.response_mask.reshape(batch.num_sequences, batch.L).to("cpu")[flat_attention]
    counts = flat_attention.sum(dim=1, dtype=torch.int64)                                          # delimits rows
    digest = hashlib.sha256(_FINGERPRINT_TAG)
    digest.update(f"B={batch.B};G={batch.G};temperature={float(batch.temperature).hex()};".encode())
    digest.update(counts.numpy().astype("<i8").tobytes())
    digest.update(tokens.numpy().astype("<i8").tobytes())
    digest.update(response.numpy().astype("u1").tobytes())
    return digest.hexdigest()[:FINGERPRINT_LENGTH]


def check_same_evaluation(first: str | None, second: str | None, what_first: str, what_second: str, fix: str) -> None:
    """Raise ``ValueError`` when two results that are about to be paired per prompt were computed on different
    evaluation batches (both fingerprints known and different); None on either side (a result built by hand, or by
    an older funcprobe) is not checked. The message names both fingerprints and ``fix``."""
    if first is None or second is None or first == second:
        return
    raise ValueError(f"{what_first} was computed on the evaluation batch with fingerprint {first} and {what_second} "
                     f"on the one with fingerprint {second}: other samples, so pairing them prompt by prompt would give "
                     f"a wrong number. Compute both on the same evaluation batch: {fix}.")


# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class SequenceChunk:
    """A chunk of at most ``seq_chunk`` of a batch's B·G sequences, columns trimmed to where it has real tokens.

    Sequences are numbered row-major, flat index f = n·G + g. All tensors are on the batch's device; the token tensors
    may share storage with the batch and must not be written to.

    Attributes:
        flat_index:     int64 [c], consecutive flat indices f of the chunk's sequences.
        prompt_index:   int64 [c], n = f // G.
        sample_index:   int64 [c], g = f % G.
        input_ids:      int64 [c, L'], the rows' columns ``lo:hi`` of the batch's input_ids.
        attention_mask: bool  [c, L'], same columns.
        response_mask:  bool  [c, L'], same columns.
        columns:        (lo, hi): the smallest column range of the batch holding every real token of these rows,
                        widened to at least 2 columns; L' = hi − lo. Columns outside it are padding in every row, and
                        with position ids derived from the attention mask, dropping them changes no log-probability.
    """

    flat_index: Tensor
    prompt_index: Tensor
    sample_index: Tensor
    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    columns: tuple[int, int]

    @property
    def num_sequences(self) -> int:
        """c, the number of sequences in the chunk."""
        return int(self.flat_index.shape[0])

    def to(self, device: torch.device | str) -> SequenceChunk:
        """A new chunk with every tensor on ``device`` (``columns`` unchanged)."""
        moved = {
            field.name: getattr(self, field.name).to(device)
            for field in dataclasses.fields(self)
            if field.name != "columns"
        }
        return SequenceChunk(columns=self.columns, **moved)

    def __repr__(self) -> str:
        first = int(self.flat_index[0]) if self.num_sequences else None
        return (
            f"SequenceChunk(sequences={self.num_sequences}, first_flat_index={first}, columns={self.columns}, "
            f"device={self.input_ids.device})"
        )


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class RolloutBatch:
    """B prompts × G responses per prompt, as spec §0 defines them; validated on construction.

    Args:
        input_ids:      integer [B, G, L], token ids ≥ 0 (stored as int64): prompt then response, padded with
                        ``pad_token_id`` on the left and/or right.
        attention_mask: bool or 0/1 integer [B, G, L] (stored as bool): 1 on every real token.
        response_mask:  bool or 0/1 integer [B, G, L] (stored as bool): 1 on the response tokens whose
                        log-probability counts. Must lie inside ``attention_mask`` and every response token's previous
                        column must be a real token (its log-probability is read from the logits there); in particular
                        column 0 is never a response token.
        advantages:     real [B, G] (stored as float64), finite.
        length_norm:    real [B] (stored as float64), finite and > 0.
        logprobs:       floating [B, G] (stored as float64), finite and ≤ 0, or None.
        rewards:        real [B, G] (stored as float64), finite, or None.
        pad_token_id:   int ≥ 0.
        token_advantages: real [B, G, L] (stored as float64), finite, or None: per-token advantages, used by the
                        objective instead of ``advantages`` (spec §3).
        prompt_index:   integer [B] (stored as int64), ≥ 0: the position of each row's prompt in the prompt pool it
                        was drawn from, or None. Lets an evaluation batch be drawn from the same pool (spec §6).
        temperature:    float > 0 (default 1): the τ the responses were drawn at (spec §0). Every log-probability
                        and entropy of the batch is taken at this τ; a ``Policy`` with another τ refuses the batch.
        advantage_recipe: :class:`AdvantageRecipe` (how ``advantages`` were made: reward scaling and weights), or
                        None when unknown. :meth:`replace` with new ``advantages`` and no recipe drops it.

    Requires B ≥ 1, G ≥ 2 (the leave-one-out baseline needs it) and L ≥ 2; estimators that need more prompts call
    :meth:`require_prompts`. All tensors must be on one device. Validation raises ``ValueError`` whose message starts
    with the offending field's name.
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    advantages: Tensor
    length_norm: Tensor
    logprobs: Tensor | None = None
    rewards: Tensor | None = None
    pad_token_id: int = 0
    prompt_index: Tensor | None = None
    temperature: float = 1.0
    token_advantages: Tensor | None = None
    advantage_recipe: AdvantageRecipe | None = None

    # ---------------------------------------------------------------------------------------------------- validation

    def __post_init__(self) -> None:
        pad = _valid_pad_token_id(self.pad_token_id)
        temperature = _valid_temperature(self.temperature)
        recipe = _valid_recipe(self.advantage_recipe)
        given = self._tensors()
        _check_tensor_types(given)
        present = {name: tensor for name, tensor in given.items() if tensor is not None}
        B, G, L = _check_dimensions(self.input_ids)
        _check_shapes(present, B, G, L)
        _check_one_device(present)
        input_ids = _valid_input_ids(self.input_ids, pad)
        attention_mask, response_mask = _valid_masks(self.attention_mask, self.response_mask)
        valid = dict(input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask,
                     advantages=_valid_advantages(self.advantages), length_norm=_valid_length_norm(self.length_norm),
                     logprobs=_valid_logprobs(self.logprobs), rewards=_valid_rewards(self.rewards),
                     token_advantages=_valid_token_advantages(self.token_advantages, (B, G, L)),
                     prompt_index=_valid_prompt_index(self.prompt_index, B),
                     pad_token_id=pad, temperature=temperature, advantage_recipe=recipe)
        for name, value in valid.items():
            object.__setattr__(self, name, value)

    def require_prompts(self, minimum: int, purpose: str) -> None:
        """Raise ``ValueError`` unless the batch has B ≥ ``minimum`` prompts.

        ``purpose`` names what needs them and why, e.g. ``"δH₁ (a cross-prompt U-statistic)"`` (spec §5: B ≥ 2) or
        ``"the jackknife standard error"`` (B ≥ 3); it starts the message.
        """
        if self.B < minimum:
            raise ValueError(
                f"{purpose} needs at least {minimum} prompts (B ≥ {minimum}); this batch has B={self.B}. "
                f"Sample more prompts."
            )

    # ---------------------------------------------------------------------------------------------- from token lists

    @classmethod
    def from_token_lists(cls, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[Sequence[int]]], *,
                         advantages: Any, pad_token_id: int, temperature: float, length_norm: float | Tensor,
                         completion_masks: Sequence[Sequence[Sequence[bool]]] | None = None,
                         token_advantages: Sequence[Sequence[Sequence[float]]] | None = None,
                         logprobs: Any = None, rewards: Any = None, prompt_index: Any = None,
                         advantage_recipe: AdvantageRecipe | None = None) -> RolloutBatch:
        """The batch of B prompts with G completions each, laid out as every batch funcprobe builds from token ids
        (the sampler, merged shards, a rollouts file, the TRL callback)::

            columns  0 … P−|p|−1   P−|p| … P−1   P … P+|c|−1   P+|c| … P+T−1
            tokens   pad           prompt p      completion c  pad

        P is the longest prompt and T the longest completion (at least 1), L = P + T: each of prompt n's G rows holds
        the prompt right-aligned at column P (left-padded) and its completion from column P (right-padded). The
        attention mask is True on the prompt and on the completion, the response mask on the completion; both are
        ``completion_masks`` on the completion when given.

        Args:
            prompts: B token-id sequences (lists or 1-D integer tensors), the rendered prompts.
            completions: [B][G] token-id sequences (the stop token included when one was produced), one G for all.
            advantages: float [B, G] (a tensor or nested sequence), A_{n,g}.
            pad_token_id: the id of every column outside the prompt and the completion.
            temperature: the τ the completions were drawn at.
            length_norm: L_n, one number for every prompt (the generation budget, Dr. GRPO) or a [B] tensor.
            completion_masks: [B][G] bool sequences as long as their completions, or None (all True): which
                completion tokens are real and count (False: padding inside the completion, e.g. TRL's).
            token_advantages: [B][G] float sequences as long as their completions, or None: per-token advantages on
                the completion's columns (0 on every other column).
            logprobs, rewards: float [B, G] or None; prompt_index: [B] pool indices or None; advantage_recipe: as
                for the constructor.

        Returns:
            The validated batch: input_ids int64 [B, G, L]; attention_mask, response_mask bool [B, G, L];
            advantages float64 [B, G]; length_norm float64 [B]; token_advantages float64 [B, G, L] or None.

        Raises:
            ValueError: naming the argument, for lists of the wrong lengths (no prompt, completions that are not B
                groups of one G, a mask or token advantages not as long as its completion) or ids that are not
                integers; then whatever the constructor refuses (G < 2, a prompt-less row, …).
        """
        pad = _valid_pad_token_id(pad_token_id)
        prompt_rows = [_token_row(ids, f"prompts[{n}]") for n, ids in enumerate(prompts)]
        B = len(prompt_rows)
        if B == 0:
            raise ValueError("prompts: is empty; a batch needs at least one prompt.")
        if len(completions) != B:
            raise ValueError(f"completions: found {len(completions)} groups for B={B} prompts; pass one group of G "
                             "completions per prompt.")
        G = len(completions[0])
        rows = []
        for n, group in enumerate(completions):
            if len(group) != G:
                raise ValueError(f"completions[{n}]: has {len(group)} completions but completions[0] has G={G}; "
                                 "every prompt has the same number of completions.")
            rows.append([_token_row(ids, f"completions[{n}][{g}]") for g, ids in enumerate(group)])
        masks = _per_token("completion_masks", completion_masks, rows, torch.bool)
        token_values = _per_token("token_advantages", token_advantages, rows, torch.float64)
        P = max(len(row) for row in prompt_rows)
        T = max(1, max(len(ids) for group in rows for ids in group))
        input_ids = torch.full((B, G, P + T), pad, dtype=torch.int64)
        attention_mask = torch.zeros((B, G, P + T), dtype=torch.bool)
        response_mask = torch.zeros((B, G, P + T), dtype=torch.bool)
        token_tensor = None if token_values is None else torch.zeros((B, G, P + T), dtype=torch.float64)
        for n, prompt in enumerate(prompt_rows):
            input_ids[n, :, P - len(prompt):P] = prompt
            attention_mask[n, :, P - len(prompt):P] = True
            for g, ids in enumerate(rows[n]):
                end = P + len(ids)
                input_ids[n, g, P:end] = ids
                attention_mask[n, g, P:end] = True if masks is None else masks[n][g]
                response_mask[n, g, P:end] = True if masks is None else masks[n][g]
                if token_tensor is not None:
                    token_tensor[n, g, P:end] = token_values[n][g]
        if isinstance(length_norm, numbers.Real) and not isinstance(length_norm, bool):
            length_norm = torch.full((B,), float(length_norm), dtype=torch.float64)
        return cls(input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask,
                   advantages=_as_tensor("advantages", advantages, torch.float64), length_norm=length_norm,
                   logprobs=_as_tensor("logprobs", logprobs, torch.float64),
                   rewards=_as_tensor("rewards", rewards, torch.float64),
                   prompt_index=_as_tensor("prompt_index", prompt_index, None), token_advantages=token_tensor,
                   pad_token_id=pad, temperature=temperature, advantage_recipe=advantage_recipe)

    def token_lists(self) -> tuple[list[list[int]], list[list[list[int]]]]:
        """(prompts [B], completions [B][G]) token ids read back from the masks: a prompt is the real tokens of
        response 0 before its first response token, a completion its response tokens. The inverse of
        :meth:`from_token_lists` without ``completion_masks`` (e.g. for ``save_rollouts`` of a sampled batch)."""
        prompts, completions = [], []
        for n in range(self.B):
            ids, real, response = self.input_ids[n], self.attention_mask[n], self.response_mask[n]
            first = int(response[0].to(torch.uint8).argmax())
            prompts.append(ids[0, :first][real[0, :first]].tolist())
            completions.append([ids[g][response[g]].tolist() for g in range(self.G)])
        return prompts, completions

    # ---------------------------------------------------------------------------------------------------- shape

    @property
    def B(self) -> int:
        """Number of prompts."""
        return int(self.input_ids.shape[0])

    @property
    def G(self) -> int:
        """Number of responses per prompt."""
        return int(self.input_ids.shape[1])

    @property
    def L(self) -> int:
        """Number of token columns (padded sequence length)."""
        return int(self.input_ids.shape[2])

    @property
    def num_sequences(self) -> int:
        """B·G, the number of sequences."""
        return self.B * self.G

    @property
    def device(self) -> torch.device:
        """The device every tensor of the batch is on."""
        return self.input_ids.device

    @property
    def response_lengths(self) -> Tensor:
        """int64 [B, G]: the number of response tokens of each sequence (T_i of spec §6)."""
        return self.response_mask.sum(dim=-1, dtype=torch.int64)

    @functools.cached_property
    def fingerprint(self) -> str:
        """:func:`batch_fingerprint` of this batch (its samples: token ids, masks, B, G and τ; not its scores),
        computed on first use and kept (the batch never changes; a derived batch computes its own)."""
        return batch_fingerprint(self)

    def __repr__(self) -> str:
        return (
            f"RolloutBatch(B={self.B}, G={self.G}, L={self.L}, device={self.device}, "
            f"logprobs={'cached' if self.logprobs is not None else 'not cached'}, "
            f"rewards={'present' if self.rewards is not None else 'absent'}, τ={self.temperature:g}, "
            f"pad_token_id={self.pad_token_id})"
        )

    # ------------------------------------------------------------------------------------------------ derived batches

    def _tensors(self) -> dict[str, Tensor | None]:
        return {name: getattr(self, name) for name in _TENSOR_FIELDS}

    def _map_tensors(self, fn) -> RolloutBatch:
        """A new batch with ``fn`` applied to every present tensor (the leading dim of each is the prompt)."""
        mapped = {name: (None if t is None else fn(t)) for name, t in self._tensors().items()}
        return RolloutBatch(pad_token_id=self.pad_token_id, temperature=self.temperature,
                            advantage_recipe=self.advantage_recipe, **mapped)

    def to(self, device: torch.device | str) -> RolloutBatch:
        """A new batch with every tensor on ``device``."""
        return self._map_tensors(lambda t: t.to(device))

    def replace(self, **changes: Any) -> RolloutBatch:
        """A new batch with some fields replaced (``dataclasses.replace``); the result is validated.

        New ``advantages`` (or ``token_advantages``) without an ``advantage_recipe`` drop the recorded recipe: it
        described the old ones."""
        if ("advantages" in changes or "token_advantages" in changes) and "advantage_recipe" not in changes:
            changes["advantage_recipe"] = None
        return dataclasses.replace(self, **changes)

    def select_prompts(self, index: Any) -> RolloutBatch:
        """A new batch of the prompts ``index`` (in that order), with all G responses of each.

        Args:
            index: 1-D prompt indices in [0, B) (list, range or integer tensor); repeats are allowed (a bootstrap
                resample), an empty index is not.

        Returns:
            A batch with B' = len(index) prompts; its tensors are copies.
        """
        if isinstance(index, Tensor):
            if index.dtype is torch.bool:
                raise ValueError(
                    "index: found a boolean mask; select_prompts takes prompt indices. "
                    "Pass mask.nonzero().flatten()."
                )
            prompt_index = index.detach().to("cpu")
        else:
            try:
                prompt_index = torch.as_tensor(list(index), dtype=torch.int64)
            except (TypeError, ValueError, RuntimeError, OverflowError) as error:
                raise ValueError(
                    f"index: expected a sequence of prompt indices, found {type(index).__name__} ({error}). "
                    f"Pass a list of ints or an int64 tensor."
                ) from None
        if not _is_integer_dtype(prompt_index.dtype) or prompt_index.dim() != 1:
            raise ValueError(
                f"index: expected 1-D integer prompt indices, found dtype {prompt_index.dtype} and shape "
                f"{tuple(prompt_index.shape)}. Pass a list of ints or a 1-D int64 tensor."
            )
        if prompt_index.numel() == 0:
            raise ValueError("index: is empty; a batch needs at least one prompt. Select at least one prompt.")
        prompt_index = prompt_index.to(torch.int64)
        bad = (prompt_index < 0) | (prompt_index >= self.B)
        if bool(bad.any()):
            position = _first_index(bad)[0]
            raise ValueError(
                f"index: prompt index {int(prompt_index[position])} at position {position} is out of range for "
                f"B={self.B}. Indices must lie in [0, {self.B}) (negative indices are not accepted)."
            )
        prompt_index = prompt_index.to(self.device)
        return self._map_tensors(lambda t: t.index_select(0, prompt_index))

    def iter_prompt_chunks(self, prompt_chunk: int) -> Iterator[tuple[Tensor, RolloutBatch]]:
        """Split the batch into consecutive runs of at most ``prompt_chunk`` whole prompts.

        Yields:
            ``(prompt_index, sub_batch)``: prompt_index int64 [b] (b ≤ prompt_chunk, on the batch's device), the
            prompts' indices in this batch, consecutive and in order; sub_batch the batch of those prompts (its
            tensors are views of this batch's). Concatenating the sub-batches along dim 0 gives back this batch.
        """
        prompt_chunk = _as_chunk_size("prompt_chunk", prompt_chunk)

        def chunks() -> Iterator[tuple[Tensor, RolloutBatch]]:
            for start in range(0, self.B, prompt_chunk):
                stop = min(start + prompt_chunk, self.B)
                prompt_index = torch.arange(start, stop, dtype=torch.int64, device=self.device)
                yield prompt_index, self._map_tensors(lambda t: t[start:stop])

        return chunks()

    def iter_sequence_chunks(self, seq_chunk: int) -> Iterator[SequenceChunk]:
        """Split the B·G sequences, flattened row-major (f = n·G + g), into consecutive chunks of ≤ ``seq_chunk``.

        Each chunk's token tensors keep only the columns [lo, hi) spanning its rows' real tokens (at least 2), so a
        chunk of short left-padded sequences does not pay for columns that are padding in all of its rows.

        Yields:
            :class:`SequenceChunk` objects covering flat indices 0..B·G−1 once each, in order.
        """
        seq_chunk = _as_chunk_size("seq_chunk", seq_chunk)
        L = self.L
        flat_ids = self.input_ids.reshape(-1, L)
        flat_attention = self.attention_mask.reshape(-1, L)
        flat_response = self.response_mask.reshape(-1, L)
        # First and last real column of every row, computed once (one device sync instead of one per chunk).
        has_tokens = flat_attention.any(dim=1)
        first_real = flat_attention.to(torch.uint8).argmax(dim=1)
        last_real = (L - 1) - flat_attention.flip(dims=(1,)).to(torch.uint8).argmax(dim=1)
        has_tokens, first_real, last_real = has_tokens.tolist(), first_real.tolist(), last_real.tolist()

        def chunks() -> Iterator[SequenceChunk]:
            for start in range(0, self.num_sequences, seq_chunk):
                stop = min(start + seq_chunk, self.num_sequences)
                rows = [r for r in range(start, stop) if has_tokens[r]]
                if rows:
                    lo = min(first_real[r] for r in rows)
                    hi = max(last_real[r] for r in rows) + 1
                else:
                    lo, hi = 0, 0
                # A single column cannot hold a prediction (position 0 has no context); keep two.
                if hi - lo < 2:
                    hi = min(L, lo + 2)
                    lo = hi - 2
                flat_index = torch.arange(start, stop, dtype=torch.int64, device=self.device)
                yield SequenceChunk(
                    flat_index=flat_index,
                    prompt_index=flat_index // self.G,
                    sample_index=flat_index % self.G,
                    input_ids=flat_ids[start:stop, lo:hi].contiguous(),
                    attention_mask=flat_attention[start:stop, lo:hi].contiguous(),
                    response_mask=flat_response[start:stop, lo:hi].contiguous(),
                    columns=(lo, hi),
                )

        return chunks()

    # --------------------------------------------------------------------------------------------------- the dict form

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: nested lists of ints/floats (masks as 0/1), absent optional fields as None.

        float64 values survive a JSON round trip exactly (Python writes the shortest repr that reads back the same).
        """
        out: dict[str, Any] = {_FORMAT_KEY: FORMAT_VERSION, _PAD_KEY: self.pad_token_id,
                               _TEMPERATURE_KEY: self.temperature,
                               _RECIPE_KEY: None if self.advantage_recipe is None else self.advantage_recipe.to_dict()}
        for name, tensor in self._tensors().items():
            if tensor is not None and name in _MASKS:
                tensor = tensor.to(torch.uint8)
            out[name] = None if tensor is None else tensor.detach().to("cpu").tolist()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, temperature: float | None = None) -> RolloutBatch:
        """Build a validated batch from a dict shaped like :meth:`to_dict`'s (``format`` may be absent).

        The τ is the dict's ``temperature`` (default 1 when the dict has no ``format`` either: a hand-made dict);
        ``temperature`` is needed for dicts of the older format ``funcprobe.batch/1``, as for
        ``funcprobe.rollouts_file.load_batch``.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"data: expected a mapping like RolloutBatch.to_dict()'s, found {type(data).__name__}.")
        found_format = data.get(_FORMAT_KEY, FORMAT_VERSION)
        if found_format not in (FORMAT_VERSION, _FORMAT_V1):
            raise ValueError(
                f"{_FORMAT_KEY}: found {found_format!r}; this funcprobe reads {FORMAT_VERSION!r}. "
                f"Use the funcprobe version that wrote it."
            )
        stated = data.get(_TEMPERATURE_KEY)
        if stated is None and _FORMAT_KEY not in data:
            stated = 1.0 if temperature is None else temperature
        recorded = _recorded_temperature(stated, found_format, temperature, "data")
        unknown = sorted(set(data) - _DICT_KEYS)
        if unknown:
            raise ValueError(f"data: unknown keys {unknown}; expected a subset of {sorted(_DICT_KEYS)}.")
        missing = [name for name in _REQUIRED_TENSORS if data.get(name) is None]
        if missing:
            raise ValueError(
                f"{missing[0]}: is missing (all missing: {missing}). Every batch needs {list(_REQUIRED_TENSORS)}."
            )
        fields: dict[str, Any] = {}
        for name in _TENSOR_FIELDS:
            value = data.get(name)
            if value is None:
                continue
            # Token ids, masks and pool indices keep their parsed integer dtype (validation rejects floats); the rest
            # is float64.
            dtype = None if name in ("input_ids",) + _MASKS + _OPTIONAL_INDEX else torch.float64
            try:
                fields[name] = torch.as_tensor(value, dtype=dtype)
            except (TypeError, ValueError, RuntimeError, OverflowError) as error:
                raise ValueError(
                    f"{name}: could not be read as a rectangular numeric array ({error}). "
                    f"Every row must have the same length."
                ) from None
        recipe = AdvantageRecipe.from_dict(data.get(_RECIPE_KEY), "data")
        return cls(pad_token_id=data.get(_PAD_KEY, 0), temperature=recorded, advantage_recipe=recipe, **fields)
