"""Small, offline building blocks for tests, examples, benchmarks and the demo.

Everything here is built locally from real ``transformers`` configs (Qwen2 and Llama architectures) with random
weights, and a character-level tokenizer made with the ``tokenizers`` library — no model hub is touched.
"""

from __future__ import annotations

import string

import torch
from torch import nn

from .batch import RolloutBatch
from .precision import exact_float64

__all__ = ["tiny_config", "tiny_causal_lm", "tiny_peft_model", "tiny_policy", "char_tokenizer", "random_batch",
           "warm_adam_state", "DEFAULT_TARGET_MODULES"]

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_config(arch: str = "qwen2", *, vocab_size: int = 64, hidden_size: int = 32, num_layers: int = 2,
                num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int | None = None,
                max_position_embeddings: int = 256, tie_word_embeddings: bool = False):
    """A real ``transformers`` config of the given architecture ("qwen2" or "llama"), scaled down."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                  intermediate_size=intermediate_size or 2 * hidden_size,
                  max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, attention_dropout=0.0)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "llama":
        return LlamaConfig(**common)
    raise ValueError(f"arch must be 'qwen2' or 'llama'; got {arch!r}.")


def tiny_causal_lm(arch: str = "qwen2", *, seed: int = 0, dtype: torch.dtype = torch.float32,
                   attn_implementation: str = "sdpa", **config_options) -> nn.Module:
    """A randomly initialised causal LM (seeded) of the given architecture, in eval mode."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, **config_options)
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model = model.to(dtype).eval()
    # A float64 model computes in float64 throughout (transformers rounds RMSNorm and the eager softmax through
    # float32 even there; funcprobe.precision): float64 reference tests (1e-10) need the whole model exact.
    return exact_float64(model)


def tiny_peft_model(arch: str = "qwen2", *, r: int = 4, lora_alpha: int = 8,
                    target_modules=DEFAULT_TARGET_MODULES, init_lora_weights: bool = False, seed: int = 0,
                    dtype: torch.dtype = torch.float32, lora_dropout: float = 0.0, **model_options) -> nn.Module:
    """A tiny causal LM wrapped in a PEFT LoRA adapter.

    ``init_lora_weights=False`` (the default here) gives random non-zero A and B: with PEFT's default init B = 0,
    so the gradients of A vanish and gradient tests could not fail.
    """
    from peft import LoraConfig, get_peft_model

    model = tiny_causal_lm(arch, seed=seed, dtype=dtype, **model_options)
    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(target_modules), lora_dropout=lora_dropout,
                        init_lora_weights=init_lora_weights)
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        peft_model = get_peft_model(model, config)
    return peft_model.to(dtype).eval()


def tiny_policy(arch: str = "qwen2", *, policy_options: dict | None = None, **model_options):
    """``Policy.from_peft(tiny_peft_model(...))``."""
    from .policy import Policy

    return Policy.from_peft(tiny_peft_model(arch, **model_options), **(policy_options or {}))


def char_tokenizer(extra_chars: str = ""):
    """A character-level ``PreTrainedTokenizerFast`` built locally: ids 0..3 are <pad>, <bos>, <eos>, <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    chars = sorted(set(string.digits + string.ascii_letters + " +-*/=?.,:<>()" + extra_chars))
    vocab = {token: index for index, token in enumerate(specials + chars)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>", padding_side="left")


def random_batch(B: int, G: int, *, vocab_size: int, prompt_len: tuple[int, int] = (2, 6),
                 response_len: tuple[int, int] = (1, 6), padding_side: str = "left", extra_padding: int = 0,
                 pad_token_id: int = 0, seed: int = 0, with_rewards: bool = True) -> RolloutBatch:
    """A valid RolloutBatch of random tokens with ragged prompt and response lengths.

    Each prompt n has a length in ``prompt_len`` (inclusive range) shared by its G responses; each response has its
    own length in ``response_len``. Sequences are packed to the left or right with ``extra_padding`` more columns of
    padding than needed. Advantages are GRPO's (reward − group mean) of random rewards; ``length_norm`` is the
    response budget.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right'; got {padding_side!r}.")
    generator = torch.Generator().manual_seed(seed)
    low_token = 1 if pad_token_id == 0 else 0

    def draw(bounds, size=()):
        return torch.randint(bounds[0], bounds[1] + 1, size, generator=generator)

    prompt_lengths = draw(prompt_len, (B,))
    response_lengths = draw(response_len, (B, G))
    L = int((prompt_lengths[:, None] + response_lengths).max()) + extra_padding
    input_ids = torch.full((B, G, L), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, G, L), dtype=torch.long)
    response_mask = torch.zeros((B, G, L), dtype=torch.long)
    for n in range(B):
        prompt = torch.randint(low_token, vocab_size, (int(prompt_lengths[n]),), generator=generator)
        for g in range(G):
            response = torch.randint(low_token, vocab_size, (int(response_lengths[n, g]),), generator=generator)
            tokens = torch.cat([prompt, response])
            start = L - len(tokens) if padding_side == "left" else 0
            input_ids[n, g, start:start + len(tokens)] = tokens
            attention_mask[n, g, start:start + len(tokens)] = 1
            response_mask[n, g, start + len(prompt):start + len(tokens)] = 1
    rewards = torch.rand((B, G), generator=generator, dtype=torch.float64)
    advantages = rewards - rewards.mean(dim=1, keepdim=True)
    return RolloutBatch(input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask,
                        advantages=advantages, length_norm=torch.full((B,), float(response_len[1]),
                                                                      dtype=torch.float64),
                        rewards=rewards if with_rewards else None, pad_token_id=pad_token_id)


def warm_adam_state(params, *, lr: float = 1e-5, weight_decay: float = 0.01, step: int = 9, seed: int = 0,
                    v_floor: float = 0.5, dtype: torch.dtype = torch.float32):
    """An AdamW state as if ``step`` steps had been taken, loaded through ``AdamState.from_torch`` as a real
    optimizer's: per tensor (in ``params`` order, from one seeded generator) m ~ 1e-3·N(0, 1), v ~ 1e-6·U(v_floor,
    1 + v_floor), in ``dtype``; one parameter group (lr, betas (0.9, 0.999), ε 1e-8, weight_decay)."""
    from .adam import AdamState

    generator = torch.Generator().manual_seed(seed)
    names = list(params)
    state = {i: {"step": torch.tensor(float(step)),
                 "exp_avg": 1e-3 * torch.randn(params[n].shape, generator=generator, dtype=dtype),
                 "exp_avg_sq": 1e-6 * (v_floor + torch.rand(params[n].shape, generator=generator, dtype=dtype))}
             for i, n in enumerate(names)}
    groups = [{"params": list(range(len(names))), "lr": lr, "betas": (0.9, 0.999), "eps": 1e-8,
               "weight_decay": weight_decay, "amsgrad": False, "maximize": False}]
    return AdamState.from_torch({"state": state, "param_groups": groups}, names, params)
