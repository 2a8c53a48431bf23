"""Precision on the real model (issue 12): δH₁ (its gradient and state terms) and ΔĤ with the model in float64, in
float32 and in the GPU configuration (bfloat16 base, float32 LoRA adapters and optimizer state, as PEFT keeps them by
default), on the same batches with the same optimizer state; plus the cheap fix (the LM head in float32 above the
bfloat16 decoder, ``funcprobe.precision.float32_head``).

    python bench/precision.py --checkpoint runs/demo/run/checkpoint-3      # the demo's trained adapter and AdamW state
    python bench/precision.py                                             # a synthetic adapter and state
    python bench/precision.py --quick                                     # a smoke run (tests): 2 layers, tiny batch

What is fixed across dtypes: the base model's weights (SmolLM2-135M-Instruct, float32 from the GGUF, cast), the
adapter's tensors, the AdamW state (m, v, t, lr), the update batch U (B prompts × G responses, sampled once from the
float32 policy), and the evaluation batch E. What each configuration computes itself, as a user running in that
dtype would: δH₁ on U (its own Ȳ, hence its own step θ⁺) and ΔĤ = Ĥ(θ⁺) − Ĥ(θ) on E by importance sampling.
Differences are relative to float64 (|x − x₆₄| / |x₆₄|); "/SE" divides the absolute difference by float64's SE.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

CONFIGS = ("float64", "float32", "bfloat16", "bfloat16+float32 head")
QUANTITIES = ("deltaH1", "grad_term", "state_term", "deltaH")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="a trained checkpoint (adapter + optimizer.pt), e.g. the "
                        "demo's runs/demo/run/checkpoint-3 (default: a synthetic adapter and AdamW state)")
    parser.add_argument("-B", type=int, default=4)
    parser.add_argument("-G", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--eval-B", type=int, default=8)
    parser.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers (default all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke size: 1 layer, B=3, G=3, 3 new tokens, E 2×3")
    parser.add_argument("--json", default=None, help="write the numbers as JSON here")
    parser.add_argument("--markdown", default=None, help="write the result table (markdown) here")
    return parser


def _synthetic_adapter(folder: Path, model_dir: Path, out: Path, *, layers: int | None, seed: int) -> Path:
    """A LoRA r=8 adapter on all linear layers with small random lora_B (a trained-looking adapter), saved."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    extra = {} if layers is None else {"num_hidden_layers": layers}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **extra)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if ".lora_B." in name:
                parameter.copy_(3e-3 * torch.randn(parameter.shape, generator=generator))
    peft_model.peft_config["default"].base_model_name_or_path = str(model_dir)
    peft_model.save_pretrained(out)
    return out


def _synthetic_state(params: dict, *, seed: int, lr: float = 5e-4):
    """An AdamW state as after a few steps: m ~ 1e-3·N(0,1), v ~ 1e-6·U(0,1), t = 3 (float64 master copy)."""
    from funcprobe.testing import warm_adam_state

    return warm_adam_state(params, lr=lr, weight_decay=0.0, step=3, seed=seed, v_floor=0.0, dtype=torch.float64)


def build_policy(config: str, model_dir: Path, adapter_dir: Path, *, layers: int | None):
    """The policy of one configuration: base in its dtype, adapter as PEFT loads it (float32 adapters on a bfloat16
    base: ``autocast_adapter_dtype``), float64 computed exactly (``exact_float64``)."""
    from peft import PeftModel

    from funcprobe import Policy
    from funcprobe.policy import load_base_model
    from funcprobe.precision import float32_head

    dtype = {"float64": torch.float64, "float32": torch.float32}.get(config, torch.bfloat16)
    extra = {} if layers is None else {"num_hidden_layers": layers}
    if extra:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **extra)
        if dtype == torch.float64:
            from funcprobe.precision import exact_float64

            exact_float64(model)
    else:
        model = load_base_model(str(model_dir), dtype=dtype, local_files_only=True)
    if config.endswith("float32 head"):
        float32_head(model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    return Policy(peft_model, seq_chunk=4)


def state_for(adam, params: dict):
    """The same AdamW state with m, v in each parameter's dtype (as ``Optimizer.load_state_dict`` casts them)."""
    from dataclasses import replace

    return replace(adam, exp_avg={n: adam.exp_avg[n].to(params[n].dtype) for n in params},
                   exp_avg_sq={n: adam.exp_avg_sq[n].to(params[n].dtype) for n in params})


def measure(config: str, model_dir: Path, adapter_dir: Path, adam64, batch, evaluation, *, layers) -> dict:
    from funcprobe import apply_step, delta_h1, snis_delta_h
    from funcprobe.precision import precision_key

    started = time.perf_counter()
    policy = build_policy(config, model_dir, adapter_dir, layers=layers)
    params = policy.params
    adam = state_for(adam64, params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the recorded-S check: the batch was drawn by the float32 policy
        prediction = delta_h1(params, batch, policy=policy, adam=adam)
        new_params, _ = apply_step(params, adam, prediction.step)
        realised = snis_delta_h(params, new_params, policy=policy, batch=evaluation)
    return {"config": config, "key": precision_key(policy), "base_dtype": str(next(policy.decoder.parameters()).dtype),
            "head_dtype": str(policy.dtype), "lora_dtype": str(next(iter(params.values())).dtype),
            "state_dtype": str(next(iter(adam.exp_avg.values())).dtype),
            "deltaH1": prediction.deltaH1, "grad_term": prediction.grad_term, "state_term": prediction.state_term,
            "se_deltaH1": prediction.se_deltaH1, "deltaH": realised.deltaH, "se_deltaH": realised.se,
            "H_before": realised.H_before, "seconds": time.perf_counter() - started}


def table(rows: list[dict]) -> str:
    reference = rows[0]
    lines = ["| configuration (base / LoRA / AdamW state / head) | δH₁ | grad term | state term | ΔĤ (SNIS on E) | "
             "rel. diff δH₁ | grad | state | ΔĤ | δH₁ diff / SE | ΔĤ diff / SE |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        def rel(key):
            return abs(row[key] - reference[key]) / abs(reference[key]) if reference[key] else math.nan

        def per_se(key, se_key):
            return abs(row[key] - reference[key]) / reference[se_key] if reference[se_key] else math.nan
        dtypes = " / ".join(d.removeprefix("torch.") for d in (row["base_dtype"], row["lora_dtype"], row["state_dtype"],
                                                               row["head_dtype"]))
        lines.append(f"| {row['config']} ({dtypes}) | {row['deltaH1']:.6g} | {row['grad_term']:.6g} | "
                     f"{row['state_term']:.6g} | {row['deltaH']:.6g} | {rel('deltaH1'):.2e} | {rel('grad_term'):.2e} | "
                     f"{rel('state_term'):.2e} | {rel('deltaH'):.2e} | "
                     f"{per_se('deltaH1', 'se_deltaH1'):.3f} | {per_se('deltaH', 'se_deltaH'):.3f} |")
    lines.append(f"\nfloat64: δH₁ = {reference['deltaH1']:.6g} ± {reference['se_deltaH1']:.3g} (SE), ΔĤ = "
                 f"{reference['deltaH']:.6g} ± {reference['se_deltaH']:.3g}, Ĥ(θ) on E = {reference['H_before']:.4g} "
                 "nats/sequence.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    if args.quick:
        args.B, args.G, args.max_new_tokens, args.eval_B, args.layers = 3, 3, 3, 2, 1
    torch.manual_seed(args.seed)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # a truncated model (--layers) reports every unused tensor of the file
    from funcprobe import load_adam_state, sample_batch
    from funcprobe.demo_real import arithmetic_pool, arithmetic_reward
    from funcprobe.models import smollm2_135m
    from funcprobe.prompts import PromptPool, render_prompts
    from funcprobe.trl_rewards import TRLRewards

    started = time.perf_counter()
    model_dir = smollm2_135m(progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint is not None:  # an HF-Trainer-style checkpoint-N/ folder: adapter + optimizer.pt
            adapter_dir, adam64 = Path(args.checkpoint), "optimizer.pt"
            source = f"the trained adapter and AdamW state of `{args.checkpoint}`"
        else:
            adapter_dir = _synthetic_adapter(Path(tmp), model_dir, Path(tmp) / "adapter", layers=args.layers,
                                             seed=args.seed)
            adam64 = None
            source = "a synthetic adapter (PEFT init, lora_B ~ 3e-3·N(0,1)) and AdamW state (t = 3)"
        sampler = build_policy("float32", model_dir, adapter_dir, layers=args.layers)
        if adam64 is None:
            adam64 = _synthetic_state({n: t.to(torch.float64) for n, t in sampler.params.items()}, seed=args.seed)
        else:
            adam64 = load_adam_state(adapter_dir / adam64, {n: t.to(torch.float64) for n, t in sampler.params.items()})
        rows = arithmetic_pool(args.B + args.eval_B, seed=args.seed + 7)
        pool = PromptPool(prompts=[r["prompt"] for r in rows], columns={"answer": [r["answer"] for r in rows]})

        def draw(indices, seed, G):
            ids = render_prompts(pool.select(indices), sampler_tokenizer)
            reward = TRLRewards.for_pool([arithmetic_reward], pool, indices, tokenizer=sampler_tokenizer,
                                         prompt_ids=ids)
            return sample_batch(sampler, sampler.params, ids, G=G, reward_fn=reward, scale_rewards="group",
                                max_new_tokens=args.max_new_tokens, seed=seed, tokenizer=sampler_tokenizer).batch

        from transformers import AutoTokenizer

        sampler_tokenizer = AutoTokenizer.from_pretrained(model_dir)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            batch = draw(list(range(args.B)), args.seed + 1, args.G)
            evaluation = draw(list(range(args.B, args.B + args.eval_B)), args.seed + 2, args.G)
        del sampler
        results = []
        for config in CONFIGS:
            row = measure(config, model_dir, adapter_dir, adam64, batch, evaluation, layers=args.layers)
            results.append(row)
            print(f"{config}: δH₁ {row['deltaH1']:.6g} (grad {row['grad_term']:.6g}, state {row['state_term']:.6g}), "
                  f"ΔĤ {row['deltaH']:.6g} ± {row['se_deltaH']:.3g} [{row['seconds']:.0f} s]", flush=True)
    text = table(results)
    command = "python bench/precision.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"`{command.strip()}` — SmolLM2-135M-Instruct"
              f"{'' if args.layers is None else f' (first {args.layers} layers)'}, {source}; update batch "
              f"B={args.B} × G={args.G}, {args.max_new_tokens} new tokens; evaluation batch {args.eval_B} × {args.G}; "
              f"torch {torch.__version__}, CPU; {time.perf_counter() - started:.0f} s.\n\n")
    print("\n" + header + text)
    out = {"command": command, "args": vars(args), "rows": results, "table": text}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(header + text + "\n")
    return out


if __name__ == "__main__":
    main()
