"""Train a tiny LoRA policy with a few GRPO steps and save HF-Trainer-style checkpoints that funcprobe can load.

This script plays the part of *your* training run: an ordinary ``torch.optim.AdamW`` on the PEFT module, the loss
through ordinary autograd, ``optimizer.step()`` in place — nothing of funcprobe's pure update. funcprobe is used only
to sample rollouts. It writes::

    OUT/base/                    the base model (save_pretrained, before LoRA wrapping) and its tokenizer
    OUT/checkpoint-N/            adapter_config.json + adapter_model.safetensors, optimizer.pt, scheduler.pt,
                                 trainer_state.json and the tokenizer files, as HF Trainer writes them
    OUT/prompts.jsonl            the arithmetic prompts trained on ({"prompt": ..., "answer": ...} lines)

Then ``funcprobe.checkpoints.load_checkpoint("OUT")`` (the latest checkpoint) or ``load_checkpoint("OUT/checkpoint-N")``
gives the policy and its AdamW state.

The optimizer is built the way HF Trainer builds it: two parameter groups, the decayed parameters (here every LoRA
tensor) and the non-decayed ones (here none), from plain parameters in ``named_parameters()`` order. A linear
learning-rate decay runs as Trainer's scheduler does, so ``optimizer.pt``'s group lr is the lr of the next step.

    python examples/train_tiny_checkpoint.py --out runs/tiny --quick
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from funcprobe.demo import arithmetic_prompts, demo_reward
from funcprobe.policy import Policy
from funcprobe.sampling import sample_batch
from funcprobe.testing import DEFAULT_TARGET_MODULES, char_tokenizer, tiny_causal_lm


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 8, or 2 with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a CI size: B=4 prompts × G=4 responses, 8 new tokens")
    parser.add_argument("--save-steps", type=int, default=None,
                        help="save a checkpoint every this many steps (default steps // 2; the last step always)")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    return parser


def naive_sequence_logprobs(model, batch) -> torch.Tensor:
    """S_{n,g}: one ordinary forward of the module, log_softmax, gather, masked sum; float32 [B, G], differentiable."""
    B, G, L = batch.input_ids.shape
    input_ids = batch.input_ids.reshape(B * G, L)
    attention_mask = batch.attention_mask.reshape(B * G, L).long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False).logits
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    token_logprobs = log_probs[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    mask = batch.response_mask.reshape(B * G, L)[:, 1:].to(token_logprobs.dtype)
    return (token_logprobs * mask).sum(-1).reshape(B, G)


def hf_param_groups(model, weight_decay: float) -> list[dict]:
    """HF Trainer's two groups: decayed trainable parameters, then the non-decayed ones (biases and norms)."""
    def no_decay(name: str) -> bool:
        lower = name.lower()
        return "bias" in lower or "norm" in lower

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if not no_decay(n)], "weight_decay": weight_decay},
            {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0}], \
        [[n for n, _ in named if not no_decay(n)], [n for n, _ in named if no_decay(n)]]


def main(argv: list[str] | None = None, *, echo=print) -> dict:
    """Train and save. Returns the run's objects for in-process use (tests): see the keys at the end."""
    from peft import LoraConfig, get_peft_model

    args = _parser().parse_args(argv)
    started = time.perf_counter()
    steps = args.steps if args.steps is not None else (2 if args.quick else 8)
    if steps < 1:
        raise SystemExit("--steps must be ≥ 1")
    B, G, max_new_tokens = (4, 4, 8) if args.quick else (8, 8, 12)
    save_steps = args.save_steps or max(steps // 2, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # The base model, saved before LoRA wrapping (get_peft_model changes the module's parameter names in place).
    tokenizer = char_tokenizer()
    base = tiny_causal_lm("qwen2", vocab_size=len(tokenizer), hidden_size=64, num_layers=2, seed=args.seed)
    base_dir = (out / "base").resolve()
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)

    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=list(DEFAULT_TARGET_MODULES),
                        lora_dropout=0.0, init_lora_weights=True)
    with torch.random.fork_rng():
        torch.manual_seed(args.seed + 1)
        peft_model = get_peft_model(base, config)
    peft_model.peft_config["default"].base_model_name_or_path = str(base_dir)
    peft_model.eval()  # no dropout; the LoRA tensors still require grad, the base stays frozen

    groups, group_names = hf_param_groups(peft_model, args.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: 1.0 - 0.5 * done / steps)

    policy = Policy.from_peft(peft_model)  # for sampling only; it never changes the module
    prompts, answers = arithmetic_prompts(steps * B, seed=args.seed)
    with open(out / "prompts.jsonl", "w", encoding="utf-8") as file:
        for prompt, answer in zip(prompts, answers):
            file.write(json.dumps({"prompt": prompt, "answer": answer}) + "\n")

    log_history, checkpoints, batches = [], [], []
    for step in range(1, steps + 1):
        # The module's LoRA tensors change at every optimizer step: sample from the current ones.
        params = {n: p.detach().clone() for n, p in peft_model.named_parameters() if n in policy.params}
        chunk = slice((step - 1) * B, step * B)
        sampled = sample_batch(policy, params, prompts[chunk], G=G, reward_fn=demo_reward,
                               max_new_tokens=max_new_tokens, seed=args.seed * 1000 + step, tokenizer=tokenizer,
                               meta={"answers": answers[chunk]})
        batch = sampled.batch
        batches.append(batch)

        # Dr. GRPO: loss = −mean_n mean_g (A_{n,g} / L_n) · S_{n,g}, by ordinary autograd on the module.
        logprobs = naive_sequence_logprobs(peft_model, batch)
        weights = (batch.advantages / batch.length_norm[:, None]).to(logprobs.dtype)
        loss = -(weights * logprobs).mean()
        lr = optimizer.param_groups[0]["lr"]
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()

        reward = float(batch.rewards.mean())
        log_history.append({"step": step, "loss": loss.item(), "reward": reward, "learning_rate": lr})
        echo(f"step {step}/{steps}: loss {loss.item():+.5f}, mean reward {reward:.3f}, lr {lr:.2e}")

        if step % save_steps == 0 or step == steps:
            folder = out / f"checkpoint-{step}"
            peft_model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            torch.save(optimizer.state_dict(), folder / "optimizer.pt")
            torch.save(scheduler.state_dict(), folder / "scheduler.pt")
            (folder / "trainer_state.json").write_text(json.dumps(
                {"global_step": step, "max_steps": steps, "log_history": log_history}, indent=2))
            checkpoints.append(folder)
            echo(f"saved {folder}")

    echo(f"done in {time.perf_counter() - started:.1f} s; load with "
         f"funcprobe.checkpoints.load_checkpoint({str(out)!r})")
    return {
        "out": out,
        "base_dir": base_dir,
        "checkpoints": checkpoints,               # in step order; the last is the final state
        "peft_model": peft_model,                 # the trained module (eval mode)
        "tokenizer": tokenizer,
        "optimizer_state_dict": copy.deepcopy(optimizer.state_dict()),  # = the last checkpoint's optimizer.pt
        "param_names": group_names,               # the optimizer's parameter names, one list per group
        "batches": batches,                       # the rollout batches trained on
        "log_history": log_history,
    }


if __name__ == "__main__":
    main(sys.argv[1:])
