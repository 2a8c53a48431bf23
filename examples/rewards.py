"""Reward functions with TRL's signature, for ``GRPOTrainer`` and for ``funcprobe probe --reward``.

    funcprobe probe CHECKPOINT --reward examples/rewards.py:digit_fraction --reward examples/rewards.py:exact_answer

A TRL reward function takes the prompts and completions of a batch (one entry per completion: each prompt repeated
once per generation) and the dataset's other columns as keyword arguments, and returns one float (or None) per
completion. For conversational prompts each completion is ``[{"role": "assistant", "content": text}]``.
"""

from __future__ import annotations


def _text(completion) -> str:
    return completion[0]["content"] if isinstance(completion, list) else completion


def digit_fraction(prompts, completions, **kwargs) -> list[float]:
    """The fraction of the completion's characters that are digits: a shaping reward that separates the responses
    of even an untrained policy (so the advantages are not all zero)."""
    texts = [_text(c) for c in completions]
    return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in texts]


def exact_answer(prompts, completions, answer, **kwargs) -> list[float]:
    """1 when the completion's digits spell the ``answer`` column, else 0."""
    return [float("".join(ch for ch in _text(c) if ch.isdigit()) == str(a)) for c, a in zip(completions, answer)]
