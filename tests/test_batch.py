"""Tests of funcprobe.batch.RolloutBatch (spec ESTIMATORS.md §0): validation, purity, chunking, persistence."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from funcprobe.batch import FORMAT_VERSION, RolloutBatch, SequenceChunk
from funcprobe.rollouts_file import load_batch, load_batch_json, save_batch, save_batch_json

TENSOR_FIELDS = ("input_ids", "attention_mask", "response_mask", "advantages", "length_norm", "logprobs", "rewards")


# --------------------------------------------------------------------------------------------------------------------
# helpers


def _make_batch_inputs(
    B: int,
    G: int,
    L: int,
    *,
    prompt_len: int | None = None,
    seed: int = 0,
    padding_side: str = "left",
    vocab_size: int = 50,
    pad_token_id: int = 0,
    empty_row_prob: float = 0.0,
    mask_dtype: torch.dtype = torch.int64,
    with_logprobs: bool = True,
    with_rewards: bool = True,
) -> dict:
    """Constructor kwargs of a random valid batch.

    Each prompt n has a prompt of ``prompt_len`` (or random length ≥ 1) tokens shared by its G responses; each response
    has a random length ≥ 0 that fits in L. ``padding_side``: 'left', 'right', or 'random' (real tokens at a random
    offset, so padding on both ends). With ``empty_row_prob`` > 0 some sequences are all padding.
    """
    gen = torch.Generator().manual_seed(seed)

    def randint(low: int, high: int) -> int:  # inclusive bounds
        return int(torch.randint(low, high + 1, (), generator=gen))

    input_ids = torch.full((B, G, L), pad_token_id, dtype=torch.int64)
    attention = torch.zeros((B, G, L), dtype=torch.bool)
    response = torch.zeros((B, G, L), dtype=torch.bool)
    for n in range(B):
        p = prompt_len if prompt_len is not None else randint(1, L - 1)
        prompt = torch.randint(0, vocab_size, (p,), generator=gen)
        for g in range(G):
            if empty_row_prob and float(torch.rand((), generator=gen)) < empty_row_prob:
                continue
            r = randint(0, L - p)
            real = p + r
            offset = {"left": L - real, "right": 0, "random": randint(0, L - real)}[padding_side]
            input_ids[n, g, offset : offset + p] = prompt
            input_ids[n, g, offset + p : offset + real] = torch.randint(0, vocab_size, (r,), generator=gen)
            attention[n, g, offset : offset + real] = True
            response[n, g, offset + p : offset + real] = True
    rewards = torch.randn((B, G), generator=gen, dtype=torch.float64)
    lengths = response.sum(-1).to(torch.float64)
    return dict(
        input_ids=input_ids,
        attention_mask=attention.to(mask_dtype),
        response_mask=response.to(mask_dtype),
        advantages=rewards - rewards.mean(dim=1, keepdim=True),
        length_norm=torch.full((B,), float(L), dtype=torch.float64),
        logprobs=-lengths * torch.rand((B, G), generator=gen, dtype=torch.float64) if with_logprobs else None,
        rewards=rewards if with_rewards else None,
        pad_token_id=pad_token_id,
    )


def _base_inputs() -> dict:
    """A hand-built valid batch, B=2, G=3, L=6: left-padded rows [pad pad p p r r]; row (0,0) has a 3-token prompt."""
    gen = torch.Generator().manual_seed(1)
    attention = torch.zeros((2, 3, 6), dtype=torch.int64)
    attention[..., 2:] = 1
    attention[0, 0, 1] = 1
    response = torch.zeros((2, 3, 6), dtype=torch.int64)
    response[..., 4:] = 1
    return dict(
        input_ids=torch.randint(1, 50, (2, 3, 6), generator=gen) * attention,
        attention_mask=attention,
        response_mask=response,
        advantages=torch.randn((2, 3), generator=gen, dtype=torch.float64),
        length_norm=torch.tensor([4.0, 4.0], dtype=torch.float64),
        logprobs=-torch.rand((2, 3), generator=gen, dtype=torch.float64),
        rewards=torch.randn((2, 3), generator=gen, dtype=torch.float64),
        pad_token_id=0,
    )


def _bit_equal(a, b) -> bool:
    """Same dtype, shape, device and bytes (stricter than ==: distinguishes -0.0 from 0.0), or both None."""
    if a is None or b is None:
        return a is None and b is None
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    if a.device.type == "meta":  # no data to compare
        return True
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _snapshot(values: dict) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in values.items()}


def _fields(batch: RolloutBatch) -> dict:
    return {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}


def _assert_unchanged(current: dict, before: dict) -> None:
    assert current.keys() == before.keys()
    for name, value in before.items():
        if isinstance(value, torch.Tensor) or value is None:
            assert _bit_equal(current[name], value), name
        else:
            assert current[name] == value, name


def _assert_same_batch(a: RolloutBatch, b: RolloutBatch) -> None:
    _assert_unchanged(_fields(a), _fields(b))


# --------------------------------------------------------------------------------------------------------------------
# validation: one case per violation; the message must start with the field's name and say what was found


def _put(name, value):
    def mutate(kw):
        kw[name] = value

    return mutate


def _set(name, value_fn):
    def mutate(kw):
        kw[name] = value_fn(kw[name])

    return mutate


def _set_entry(name, index, value):
    def mutate(kw):
        tensor = kw[name].clone()
        tensor[index] = value
        kw[name] = tensor

    return mutate


def _all_bgl(fn):
    def mutate(kw):
        for name in ("input_ids", "attention_mask", "response_mask"):
            kw[name] = fn(kw[name])

    return mutate


def _all_fields(fn):
    def mutate(kw):
        for name in TENSOR_FIELDS:
            kw[name] = fn(kw[name])

    return mutate


def _response_after_gap(kw):
    # row (1, 0) is [pad pad p p r r]; make column 3 padding, so the response token at column 4 follows a pad
    kw["attention_mask"] = kw["attention_mask"].clone()
    kw["attention_mask"][1, 0, 3] = 0
    kw["response_mask"] = kw["response_mask"].clone()
    kw["response_mask"][1, 0, 3] = 0


def _response_at_position_0(kw):
    kw["attention_mask"] = kw["attention_mask"].clone()
    kw["attention_mask"][1, 2, :] = 1
    kw["response_mask"] = kw["response_mask"].clone()
    kw["response_mask"][1, 2, 0] = 1


def _response_without_prompt(kw):
    kw["response_mask"] = kw["response_mask"].clone()
    kw["response_mask"][1, 1, 2:] = 1


VALIDATION_CASES = {
    "input_ids_not_tensor": (
        _set("input_ids", lambda t: t.tolist()),
        r"^input_ids: expected a torch\.Tensor, found list",
    ),
    "advantages_not_tensor": (_set("advantages", lambda t: t.tolist()), r"^advantages: expected a torch\.Tensor"),
    "attention_mask_none": (_set("attention_mask", lambda t: None), r"^attention_mask: expected a torch\.Tensor"),
    "input_ids_float": (_set("input_ids", lambda t: t.float()), r"^input_ids: expected an integer dtype.*float32"),
    "input_ids_bool": (_set("input_ids", lambda t: t.bool()), r"^input_ids: expected an integer dtype.*bool"),
    "input_ids_2d": (_set("input_ids", lambda t: t.reshape(6, 6)), r"^input_ids: expected 3 dimensions.*\(6, 6\)"),
    "attention_mask_shape": (
        _set("attention_mask", lambda t: t[..., :-1]),
        r"^attention_mask: expected shape \[B, G, L\] = \(2, 3, 6\), found \(2, 3, 5\)",
    ),
    "response_mask_shape": (
        _set("response_mask", lambda t: t[:1]),
        r"^response_mask: expected shape \[B, G, L\] = \(2, 3, 6\), found \(1, 3, 6\)",
    ),
    "advantages_shape": (
        _set("advantages", lambda t: t[:, :2]),
        r"^advantages: expected shape \[B, G\] = \(2, 3\), found \(2, 2\)",
    ),
    "advantages_transposed": (_set("advantages", lambda t: t.T), r"^advantages: expected shape .* found \(3, 2\)"),
    "length_norm_shape": (
        _set("length_norm", lambda t: t[None]),
        r"^length_norm: expected shape \[B\] = \(2,\), found \(1, 2\)",
    ),
    "logprobs_shape": (_set("logprobs", lambda t: t.flatten()), r"^logprobs: expected shape \[B, G\].*found \(6,\)"),
    "rewards_shape": (_set("rewards", lambda t: t[:1]), r"^rewards: expected shape \[B, G\].*found \(1, 3\)"),
    "attention_mask_value_2": (
        _set_entry("attention_mask", (1, 2, 3), 2),
        r"^attention_mask: must hold only 0 and 1, found 2 at index \(1, 2, 3\)",
    ),
    "response_mask_value_minus_1": (
        _set_entry("response_mask", (0, 1, 5), -1),
        r"^response_mask: must hold only 0 and 1, found -1 at index \(0, 1, 5\)",
    ),
    "attention_mask_float": (
        _set("attention_mask", lambda t: t.float()),
        r"^attention_mask: expected a bool or 0/1 integer dtype, found dtype torch\.float32",
    ),
    "response_outside_attention": (
        _set_entry("response_mask", (1, 1, 1), 1),
        r"^response_mask: is 1 at index \(1, 1, 1\) where attention_mask is 0",
    ),
    "response_at_position_0": (_response_at_position_0, r"^response_mask: is 1 at position 0 \(index \(1, 2, 0\)\)"),
    "response_after_gap": (
        _response_after_gap,
        r"^response_mask: is 1 at index \(1, 0, 4\) but the previous column \(k=3\) is padding",
    ),
    "response_without_prompt": (
        _response_without_prompt,
        r"^response_mask: is 1 at index \(1, 1, 2\) but the previous column \(k=1\) is padding",
    ),
    "advantages_nan": (
        _set_entry("advantages", (0, 1), float("nan")),
        r"^advantages: must be finite, found nan at index \(0, 1\)",
    ),
    "advantages_inf": (
        _set_entry("advantages", (1, 2), float("-inf")),
        r"^advantages: must be finite, found -inf at index \(1, 2\)",
    ),
    "length_norm_inf": (
        _set_entry("length_norm", 1, float("inf")),
        r"^length_norm: must be finite, found inf at index \(1,\)",
    ),
    "length_norm_nan": (_set_entry("length_norm", 0, float("nan")), r"^length_norm: must be finite, found nan"),
    "length_norm_zero": (_set_entry("length_norm", 1, 0.0), r"^length_norm: must be > 0, found 0\.0 at index \(1,\)"),
    "length_norm_negative": (
        _set_entry("length_norm", 0, -3.0),
        r"^length_norm: must be > 0, found -3\.0 at index \(0,\)",
    ),
    "logprobs_nan": (_set_entry("logprobs", (1, 0), float("nan")), r"^logprobs: must be finite, found nan at"),
    "logprobs_positive": (
        _set_entry("logprobs", (0, 2), 2.5),
        r"^logprobs: .*must be ≤ 0, found 2\.5 at index \(0, 2\)",
    ),
    "logprobs_integer": (_set("logprobs", lambda t: t.to(torch.int64)), r"^logprobs: expected a floating dtype"),
    "rewards_inf": (_set_entry("rewards", (0, 0), float("inf")), r"^rewards: must be finite, found inf"),
    "rewards_complex": (_set("rewards", lambda t: t.to(torch.complex128)), r"^rewards: expected a floating or integer"),
    "G_is_1": (_all_fields(lambda t: t if t.dim() == 1 else t[:, :1]), r"^input_ids: found G=1 response per prompt"),
    "B_is_0": (_all_fields(lambda t: t[:0]), r"^input_ids: found B=0 prompts"),
    "L_is_1": (_all_bgl(lambda t: t[..., -1:]), r"^input_ids: found L=1 column"),
    "negative_token_id": (
        _set_entry("input_ids", (1, 2, 3), -5),
        r"^input_ids: token ids must be ≥ 0, found -5 at index \(1, 2, 3\)",
    ),
    "mixed_devices": (
        _set("logprobs", lambda t: t.to("meta")),
        r"^logprobs: is on device meta but input_ids is on cpu",
    ),
    "pad_token_id_negative": (_set("pad_token_id", lambda v: -1), r"^pad_token_id: expected an integer ≥ 0, found -1"),
    "pad_token_id_float": (_set("pad_token_id", lambda v: 1.5), r"^pad_token_id: expected an integer ≥ 0, found 1\.5"),
    "pad_token_id_bool": (_set("pad_token_id", lambda v: True), r"^pad_token_id: expected an integer ≥ 0, found True"),
    "temperature_zero": (_put("temperature", 0.0), r"^temperature: expected a finite number > 0"),
    "temperature_inf": (_put("temperature", float("inf")), r"^temperature: expected a finite number > 0"),
    "temperature_str": (_put("temperature", "1"), r"^temperature: expected a finite number > 0"),
    "prompt_index_float": (_put("prompt_index", torch.zeros(3)), r"^prompt_index: expected integer pool"),
    "prompt_index_shape": (_put("prompt_index", torch.zeros(3, dtype=torch.int64)),
                           r"^prompt_index: expected shape \[B\]"),
    "prompt_index_negative": (_put("prompt_index", torch.tensor([0, -1])),
                              r"^prompt_index: pool indices must be ≥ 0, found -1"),
}


@pytest.mark.parametrize("case", sorted(VALIDATION_CASES))
def test_validation_rejects(case):
    mutate, pattern = VALIDATION_CASES[case]
    kwargs = _base_inputs()
    RolloutBatch(**kwargs)  # the base is valid, so the mutation alone causes the error
    mutate(kwargs)
    before = _snapshot(kwargs)
    with pytest.raises(ValueError, match=pattern):
        RolloutBatch(**kwargs)
    _assert_unchanged(kwargs, before)


def test_validation_messages_say_how_to_fix():
    for case, (mutate, _) in VALIDATION_CASES.items():
        kwargs = _base_inputs()
        mutate(kwargs)
        with pytest.raises(ValueError) as info:
            RolloutBatch(**kwargs)
        message = str(info.value)
        # "<field>: <what was found>. <the fix>." — the fix is a sentence after the finding
        assert message.count(". ") >= 1 or message.count("; ") >= 1, (case, message)
        assert len(message) > 60, (case, message)


def test_replace_validates():
    batch = RolloutBatch(**_base_inputs())
    with pytest.raises(ValueError, match=r"^length_norm: must be > 0"):
        batch.replace(length_norm=torch.tensor([1.0, -1.0], dtype=torch.float64))


def test_conversions_store_canonical_dtypes_without_touching_inputs():
    kwargs = _base_inputs()
    kwargs.update(
        input_ids=kwargs["input_ids"].to(torch.int32),
        attention_mask=kwargs["attention_mask"].to(torch.uint8),
        response_mask=kwargs["response_mask"].to(torch.int64),
        advantages=kwargs["advantages"].to(torch.float32),
        length_norm=torch.tensor([4, 4]),
        logprobs=kwargs["logprobs"].to(torch.float32),
        rewards=kwargs["rewards"].to(torch.float16),
    )
    before = _snapshot(kwargs)
    batch = RolloutBatch(**kwargs)
    _assert_unchanged(kwargs, before)
    assert batch.input_ids.dtype == torch.int64
    assert batch.attention_mask.dtype == torch.bool and batch.response_mask.dtype == torch.bool
    for name in ("advantages", "length_norm", "logprobs", "rewards"):
        assert getattr(batch, name).dtype == torch.float64, name
    assert torch.equal(batch.input_ids, before["input_ids"].to(torch.int64))
    assert torch.equal(batch.attention_mask, before["attention_mask"] == 1)
    assert torch.equal(batch.advantages, before["advantages"].to(torch.float64))


def test_optional_fields_may_be_none_and_gradients_are_detached():
    kwargs = _base_inputs()
    kwargs.update(logprobs=None, rewards=None, advantages=kwargs["advantages"].clone().requires_grad_(True))
    batch = RolloutBatch(**kwargs)
    assert batch.logprobs is None and batch.rewards is None
    assert not batch.advantages.requires_grad


def test_properties():
    kwargs = _base_inputs()
    batch = RolloutBatch(**kwargs)
    assert (batch.B, batch.G, batch.L, batch.num_sequences) == (2, 3, 6, 6)
    assert batch.device == torch.device("cpu")
    assert batch.response_lengths.dtype == torch.int64
    assert torch.equal(batch.response_lengths, torch.full((2, 3), 2, dtype=torch.int64))
    text = repr(batch)
    assert "B=2, G=3, L=6" in text and "logprobs=cached" in text and "tensor(" not in text
    assert "logprobs=not cached" in repr(batch.replace(logprobs=None))


def test_batch_is_frozen():
    batch = RolloutBatch(**_base_inputs())
    with pytest.raises(dataclasses.FrozenInstanceError):
        batch.advantages = torch.zeros(2, 3, dtype=torch.float64)


def test_require_prompts():
    kwargs = _base_inputs()
    two = RolloutBatch(**kwargs)
    two.require_prompts(2, "δH₁ (a cross-prompt U-statistic)")
    with pytest.raises(ValueError, match=r"^the jackknife needs at least 3 prompts \(B ≥ 3\); this batch has B=2\. "):
        two.require_prompts(3, "the jackknife")
    one = two.select_prompts([1])
    with pytest.raises(ValueError, match=r"^δH₁ \(a cross-prompt U-statistic\) needs at least 2 prompts.*B=1.*Sample"):
        one.require_prompts(2, "δH₁ (a cross-prompt U-statistic)")


# --------------------------------------------------------------------------------------------------------------------
# from_token_lists: the one layout of a batch built from token ids


def test_from_token_lists_layout_and_its_inverse():
    """Prompts right-aligned at P (the longest prompt), completions from P, pad elsewhere; token_lists reads back."""
    prompts = [[5, 6], [7]]
    completions = [[[1, 2], [3]], [[4], [8, 9, 10]]]
    batch = RolloutBatch.from_token_lists(prompts, completions, advantages=[[1.0, -1.0], [0.5, -0.5]], pad_token_id=0,
                                          temperature=0.7, length_norm=4, prompt_index=(3, 1))
    assert (batch.B, batch.G, batch.L, batch.temperature) == (2, 2, 2 + 3, 0.7)
    assert batch.input_ids.tolist() == [[[5, 6, 1, 2, 0], [5, 6, 3, 0, 0]], [[0, 7, 4, 0, 0], [0, 7, 8, 9, 10]]]
    assert batch.attention_mask.tolist() == (batch.input_ids != 0).tolist()
    assert batch.response_mask[1, 1].tolist() == [False, False, True, True, True]
    assert batch.length_norm.tolist() == [4.0, 4.0] and batch.advantages.dtype == torch.float64
    assert batch.prompt_index.tolist() == [3, 1] and batch.token_advantages is None and batch.logprobs is None
    assert batch.token_lists() == (prompts, completions)


def test_from_token_lists_masks_and_token_advantages_follow_the_completion():
    """completion_masks set both masks on the completion's columns; token_advantages sit on them, 0 elsewhere."""
    batch = RolloutBatch.from_token_lists(
        [[5]], [[[1, 2, 9], [3, 9, 9]]], advantages=torch.zeros(1, 2), pad_token_id=9, temperature=1.0,
        length_norm=torch.tensor([3.0]), completion_masks=[[[1, 1, 0], [True, False, False]]],
        token_advantages=[[[0.5, 0.25, 7.0], [1.0, 2.0, 3.0]]])
    assert batch.input_ids.tolist() == [[[5, 1, 2, 9], [5, 3, 9, 9]]]
    assert batch.attention_mask.tolist() == [[[True, True, True, False], [True, True, False, False]]]
    assert batch.response_mask.tolist() == [[[False, True, True, False], [False, True, False, False]]]
    assert batch.token_advantages.tolist() == [[[0.0, 0.5, 0.25, 7.0], [0.0, 1.0, 2.0, 3.0]]]


@pytest.mark.parametrize("prompts, completions, extra, pattern", [
    ([], [], {}, r"^prompts: is empty"),
    ([[1]], [[[2], [3]], [[4], [5]]], {}, r"^completions: found 2 groups for B=1 prompts"),
    ([[1], [2]], [[[2], [3]], [[4]]], {}, r"^completions\[1\]: has 1 completions but completions\[0\] has G=2"),
    ([[1.5]], [[[2], [3]]], {}, r"^prompts\[0\]: expected a flat sequence of integer token ids, found dtype"),
    ([[1]], [[[2], [[3]]]], {}, r"^completions\[0\]\[1\]: expected a flat sequence of integer token ids"),
    ([[1]], [[[2], [3]]], {"completion_masks": [[[1], [1, 1]]]}, r"^completion_masks\[0\]\[1\]: has shape \(2,\)"),
    ([[1]], [[[2], [3]]], {"token_advantages": [[[1.0]]]}, r"^token_advantages: expected \[B\]\[G\] = \[1\]\[2\]"),
    ([[1]], [[[2], [3]]], {"pad_token_id": -1}, r"^pad_token_id: expected an integer ≥ 0"),
    ([[1]], [[[2]]], {}, r"^input_ids: found G=1 response per prompt"),
    ([[]], [[[2, 3], [4]]], {}, r"^response_mask: is 1 at position 0"),
])
def test_from_token_lists_rejects(prompts, completions, extra, pattern):
    options = {"advantages": torch.zeros(max(len(prompts), 1), 2), "pad_token_id": 0, "temperature": 1.0,
               "length_norm": 4.0, **extra}
    with pytest.raises(ValueError, match=pattern):
        RolloutBatch.from_token_lists(prompts, completions, **options)


# --------------------------------------------------------------------------------------------------------------------
# purity: nothing given to a batch, and nothing in it, changes under any method


def _exercise_every_method(batch: RolloutBatch, tmp_path) -> None:
    repr(batch)
    batch.response_lengths
    batch.require_prompts(1, "test")
    batch.to("cpu")
    batch.select_prompts([1, 0, 1])
    batch.replace(advantages=torch.zeros(batch.B, batch.G, dtype=torch.float64))
    for _, sub_batch in batch.iter_prompt_chunks(1):
        sub_batch.to("cpu")
    for chunk in batch.iter_sequence_chunks(4):
        chunk.to("cpu")
    save_batch(batch, tmp_path / "b.safetensors")
    load_batch(tmp_path / "b.safetensors")
    save_batch_json(batch, tmp_path / "b.json")
    load_batch_json(tmp_path / "b.json")
    RolloutBatch.from_dict(batch.to_dict())


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.uint8])
@pytest.mark.parametrize("float_dtype", [torch.float64, torch.float32])
def test_methods_never_modify_inputs_or_batch(tmp_path, mask_dtype, float_dtype):
    kwargs = _make_batch_inputs(3, 4, 9, seed=3, padding_side="random", mask_dtype=mask_dtype)
    for name in ("advantages", "logprobs", "rewards"):
        kwargs[name] = kwargs[name].to(float_dtype)
    inputs_before = _snapshot(kwargs)
    batch = RolloutBatch(**kwargs)
    batch_before = _snapshot(_fields(batch))
    _exercise_every_method(batch, tmp_path)
    _assert_unchanged(kwargs, inputs_before)
    _assert_unchanged(_fields(batch), batch_before)


# --------------------------------------------------------------------------------------------------------------------
# persistence


@pytest.mark.parametrize("with_optionals", [True, False])
def test_safetensors_round_trip(tmp_path, with_optionals):
    kwargs = _make_batch_inputs(
        3, 2, 7, seed=5, pad_token_id=7, with_logprobs=with_optionals, with_rewards=with_optionals
    )
    batch = RolloutBatch(**kwargs)
    save_batch(batch, tmp_path / "batch.safetensors")
    loaded = load_batch(tmp_path / "batch.safetensors")
    _assert_same_batch(loaded, batch)
    assert loaded.pad_token_id == 7
    assert (loaded.logprobs is None) == (not with_optionals) and (loaded.rewards is None) == (not with_optionals)


@pytest.mark.parametrize("with_optionals", [True, False])
def test_json_round_trip(tmp_path, with_optionals):
    kwargs = _make_batch_inputs(
        2, 3, 8, seed=6, pad_token_id=11, with_logprobs=with_optionals, with_rewards=with_optionals
    )
    # values whose decimal form is long: the round trip must still be exact
    kwargs["advantages"] = kwargs["advantages"] / 3.0 + 1e-17
    batch = RolloutBatch(**kwargs)
    data = batch.to_dict()
    assert data["format"] == FORMAT_VERSION and data["pad_token_id"] == 11
    assert isinstance(data["input_ids"], list) and isinstance(data["attention_mask"][0][0][0], int)
    if not with_optionals:
        assert data["logprobs"] is None and data["rewards"] is None
    _assert_same_batch(RolloutBatch.from_dict(json.loads(json.dumps(data))), batch)
    save_batch_json(batch, tmp_path / "batch.json")
    _assert_same_batch(load_batch_json(tmp_path / "batch.json"), batch)


@pytest.mark.parametrize("save", ["safetensors", "json"])
def test_temperature_and_prompt_index_round_trip(tmp_path, save):
    """τ and the pool indices survive both formats exactly, and select_prompts carries them."""
    kwargs = _make_batch_inputs(3, 2, 7, seed=5)
    batch = RolloutBatch(**kwargs, temperature=0.7, prompt_index=torch.tensor([4, 0, 4]))
    if save == "json":
        save_batch_json(batch, tmp_path / "b.json")
        loaded = load_batch_json(tmp_path / "b.json")
    else:
        save_batch(batch, tmp_path / "b.safetensors")
        loaded = load_batch(tmp_path / "b.safetensors")
    _assert_same_batch(loaded, batch)
    assert loaded.temperature == 0.7 and loaded.prompt_index.dtype == torch.int64
    picked = batch.select_prompts([2, 1])
    assert picked.temperature == 0.7 and picked.prompt_index.tolist() == [4, 0]
    assert "τ=0.7" in repr(batch)


def test_old_format_needs_the_temperature_stated(tmp_path):
    """A funcprobe.batch/1 file recorded no τ: loading it without temperature= is refused (never guessed)."""
    from safetensors.torch import save_file

    batch = RolloutBatch(**_make_batch_inputs(2, 2, 6, seed=2))
    tensors = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask.to(torch.uint8),
               "response_mask": batch.response_mask.to(torch.uint8), "advantages": batch.advantages,
               "length_norm": batch.length_norm}
    path = tmp_path / "old.safetensors"
    save_file(tensors, str(path), metadata={"format": "funcprobe.batch/1", "pad_token_id": "0"})
    with pytest.raises(ValueError, match=r"records no sampling temperature.*temperature=1\.0"):
        load_batch(path)
    assert load_batch(path, temperature=0.6).temperature == 0.6
    current = tmp_path / "new.safetensors"
    save_batch(batch.replace(temperature=0.6), current)
    with pytest.raises(ValueError, match=r"drawn at temperature τ=0\.6, but temperature=1\.0 was passed"):
        load_batch(current, temperature=1.0)
    old_dict = {**batch.to_dict(), "format": "funcprobe.batch/1"}
    del old_dict["temperature"]
    with pytest.raises(ValueError, match="records no sampling temperature"):
        RolloutBatch.from_dict(old_dict)


def test_load_rejects_a_safetensors_file_that_is_not_a_batch(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ValueError, match=r"is not a funcprobe batch: its metadata has no 'format' entry"):
        load_batch(path)


def test_load_rejects_a_file_that_is_not_safetensors(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"this is not a safetensors file")
    with pytest.raises(ValueError, match=r"is not a funcprobe batch: not a readable safetensors file"):
        load_batch(path)


def test_load_rejects_other_format_versions_and_damaged_files(tmp_path):
    batch = RolloutBatch(**_base_inputs())
    tensors = {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask.to(torch.uint8),
        "response_mask": batch.response_mask.to(torch.uint8),
        "advantages": batch.advantages,
        "length_norm": batch.length_norm,
    }
    newer = tmp_path / "newer.safetensors"
    save_file(tensors, str(newer), metadata={"format": "funcprobe.batch/99", "pad_token_id": "0"})
    with pytest.raises(ValueError, match=r"has format 'funcprobe\.batch/99'"):
        load_batch(newer)
    damaged = tmp_path / "damaged.safetensors"
    del tensors["advantages"]
    save_file(tensors, str(damaged), metadata={"format": FORMAT_VERSION, "pad_token_id": "0", "temperature": "1.0"})
    with pytest.raises(ValueError, match=r"damaged funcprobe batch: missing tensors \['advantages'\]"):
        load_batch(damaged)


def test_load_validates_contents(tmp_path):
    batch = RolloutBatch(**_base_inputs())
    tensors = {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask.to(torch.uint8),
        "response_mask": batch.response_mask.to(torch.uint8),
        "advantages": batch.advantages,
        "length_norm": -batch.length_norm,
    }
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata={"format": FORMAT_VERSION, "pad_token_id": "0", "temperature": "1.0"})
    with pytest.raises(ValueError, match=r"^length_norm: must be > 0"):
        load_batch(path)


def test_from_dict_errors(tmp_path):
    data = RolloutBatch(**_base_inputs()).to_dict()
    with pytest.raises(ValueError, match=r"unknown keys \['advantage'\]"):
        RolloutBatch.from_dict({**data, "advantage": data["advantages"]})
    with pytest.raises(ValueError, match=r"^advantages: is missing"):
        RolloutBatch.from_dict({k: v for k, v in data.items() if k != "advantages"})
    with pytest.raises(ValueError, match=r"^format: found 'funcprobe\.batch/0'"):
        RolloutBatch.from_dict({**data, "format": "funcprobe.batch/0"})
    ragged = json.loads(json.dumps(data))
    ragged["input_ids"][0][0] = ragged["input_ids"][0][0][:-1]
    with pytest.raises(ValueError, match=r"^input_ids: could not be read as a rectangular numeric array"):
        RolloutBatch.from_dict(ragged)
    path = tmp_path / "junk.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"is not a funcprobe batch: not valid JSON"):
        load_batch_json(path)


# --------------------------------------------------------------------------------------------------------------------
# argument validation of the derived-batch methods


@pytest.mark.parametrize(
    "index, pattern",
    [
        ([2], r"^index: prompt index 2 at position 0 is out of range for B=2"),
        ([0, -1], r"^index: prompt index -1 at position 1 is out of range"),
        ([], r"^index: is empty"),
        (torch.tensor([True, False]), r"^index: found a boolean mask"),
        (torch.tensor([[0, 1]]), r"^index: expected 1-D integer prompt indices"),
        (torch.tensor([0.0, 1.0]), r"^index: expected 1-D integer prompt indices"),
        (1, r"^index: expected a sequence of prompt indices"),
    ],
)
def test_select_prompts_rejects_bad_index(index, pattern):
    with pytest.raises(ValueError, match=pattern):
        RolloutBatch(**_base_inputs()).select_prompts(index)


@pytest.mark.parametrize("size", [0, -1, 1.5, True, None])
def test_chunk_sizes_are_validated_eagerly(size):
    batch = RolloutBatch(**_base_inputs())
    with pytest.raises(ValueError, match=r"^seq_chunk: must be an integer ≥ 1"):
        batch.iter_sequence_chunks(size)  # raises before iteration starts
    with pytest.raises(ValueError, match=r"^prompt_chunk: must be an integer ≥ 1"):
        batch.iter_prompt_chunks(size)


def test_sequence_chunks_trim_padding_columns():
    # 2 prompts × 2 responses, L=8; prompt 0 is short and left-padded, prompt 1 fills the row
    attention = torch.zeros((2, 2, 8), dtype=torch.bool)
    attention[0, :, 5:] = True
    attention[1, :, :] = True
    response = attention.clone()
    response[0, :, :6] = False
    response[1, :, :4] = False
    batch = RolloutBatch(
        input_ids=attention.to(torch.int64) * 3,
        attention_mask=attention,
        response_mask=response,
        advantages=torch.zeros(2, 2, dtype=torch.float64),
        length_norm=torch.ones(2, dtype=torch.float64),
    )
    chunks = list(batch.iter_sequence_chunks(2))
    assert [c.columns for c in chunks] == [(5, 8), (0, 8)]
    assert chunks[0].input_ids.shape == (2, 3)
    assert isinstance(chunks[0], SequenceChunk) and chunks[0].num_sequences == 2
    assert "columns=(5, 8)" in repr(chunks[0])


# --------------------------------------------------------------------------------------------------------------------
# properties over random batches


@st.composite
def _random_batches(draw):
    B = draw(st.integers(1, 4))
    G = draw(st.integers(2, 4))
    L = draw(st.integers(2, 10))
    kwargs = _make_batch_inputs(
        B,
        G,
        L,
        seed=draw(st.integers(0, 2**31 - 1)),
        padding_side=draw(st.sampled_from(["left", "right", "random"])),
        empty_row_prob=draw(st.sampled_from([0.0, 0.3])),
        mask_dtype=draw(st.sampled_from([torch.bool, torch.int64])),
        with_logprobs=draw(st.booleans()),
    )
    return kwargs


@settings(max_examples=50, deadline=None)
@given(kwargs=_random_batches(), data=st.data())
def test_sequence_chunks_cover_in_order_and_trim_exactly(kwargs, data):
    batch = RolloutBatch(**kwargs)
    before = _snapshot(_fields(batch))
    B, G, L = batch.B, batch.G, batch.L
    seq_chunk = data.draw(st.integers(1, B * G + 2), label="seq_chunk")
    chunks = list(batch.iter_sequence_chunks(seq_chunk))

    assert torch.equal(torch.cat([c.flat_index for c in chunks]), torch.arange(B * G))
    assert all(c.num_sequences == seq_chunk for c in chunks[:-1]) and 1 <= chunks[-1].num_sequences <= seq_chunk
    for chunk in chunks:
        assert torch.equal(chunk.prompt_index * G + chunk.sample_index, chunk.flat_index)
        assert bool((chunk.sample_index < G).all() and (chunk.sample_index >= 0).all())
        # rows fetched by (n, g), independently of the flattening the implementation uses
        n, g = chunk.prompt_index, chunk.sample_index
        ids, attention, response = batch.input_ids[n, g], batch.attention_mask[n, g], batch.response_mask[n, g]
        lo, hi = chunk.columns
        assert 0 <= lo and lo + 2 <= hi <= L
        assert _bit_equal(chunk.input_ids, ids[:, lo:hi])
        assert _bit_equal(chunk.attention_mask, attention[:, lo:hi])
        assert _bit_equal(chunk.response_mask, response[:, lo:hi])
        # everything real lies inside the range ...
        for mask in (attention, response):
            assert not bool(mask[:, :lo].any()) and not bool(mask[:, hi:].any())
        # ... and the range is no wider than needed (at least 2 columns)
        real_columns = attention.any(dim=0).nonzero().flatten()
        span = int(real_columns[-1] - real_columns[0]) + 1 if real_columns.numel() else 0
        assert hi - lo == max(2, span)
    _assert_unchanged(_fields(batch), before)


@settings(max_examples=50, deadline=None)
@given(kwargs=_random_batches(), data=st.data())
def test_prompt_chunks_concatenate_back_to_the_batch(kwargs, data):
    batch = RolloutBatch(**kwargs)
    before = _snapshot(_fields(batch))
    prompt_chunk = data.draw(st.integers(1, batch.B + 1), label="prompt_chunk")
    pieces = list(batch.iter_prompt_chunks(prompt_chunk))

    assert torch.equal(torch.cat([index for index, _ in pieces]), torch.arange(batch.B))
    assert all(sub.B == prompt_chunk for _, sub in pieces[:-1]) and 1 <= pieces[-1][1].B <= prompt_chunk
    for index, sub in pieces:
        assert sub.B == index.numel() and sub.pad_token_id == batch.pad_token_id
    for name in TENSOR_FIELDS:
        parts = [getattr(sub, name) for _, sub in pieces]
        if getattr(batch, name) is None:
            assert all(p is None for p in parts)
        else:
            assert _bit_equal(torch.cat(parts), getattr(batch, name)), name
    _assert_unchanged(_fields(batch), before)


@settings(max_examples=50, deadline=None)
@given(kwargs=_random_batches(), data=st.data())
def test_select_prompts_permutation_and_inverse_is_identity(kwargs, data):
    batch = RolloutBatch(**kwargs)
    before = _snapshot(_fields(batch))
    perm = data.draw(st.permutations(range(batch.B)), label="perm")
    permuted = batch.select_prompts(perm)
    for name in TENSOR_FIELDS:
        value = getattr(batch, name)
        assert _bit_equal(getattr(permuted, name), None if value is None else value[torch.tensor(perm)]), name
    inverse = torch.argsort(torch.tensor(perm))
    _assert_same_batch(permuted.select_prompts(inverse), batch)
    _assert_unchanged(_fields(batch), before)
