"""Memory planning (issue 7): funcprobe.memory's predicted peaks against measured ones, and the acceptance plans.

    python bench/memory_plan.py             # (a) CPU grid, predicted vs measured, then (b) acceptance-config plans
    python bench/memory_plan.py --quick     # a small grid (the one tests/test_memory_plan.py uses)
    python bench/memory_plan.py --plans     # (b) only (no measurement)

(a) Every configuration runs in a FRESH subprocess (``--worker JSON``) with ``MALLOC_MMAP_THRESHOLD_=131072`` (glibc:
freed blocks above 128 KiB go back to the OS instead of staying in the heap, whose retention otherwise inflates the
RSS of a chunk loop — bench/RESULTS.md, "Memory of sequence log-prob gradients") and one torch thread. The worker

1. imports torch, transformers, peft and funcprobe, builds a throw-away 1-layer model and runs one gradient
   evaluation on it (so lazy imports and first-call allocations are in the baseline), frees it, and reads its RSS:
   the *imports baseline*;
2. builds the random Qwen2 model of the configuration (``funcprobe.testing.tiny_peft_model``, float32, LoRA on all
   linear layers, untied embeddings), its ``Policy`` and a batch of 1 prompt × g responses, then resets the kernel's
   RSS high-water mark (``/proc/self/clear_refs``);
3. runs ONE evaluation: ``grad`` = ``policy.logprob_grads(params, batch, ones, seq_chunk, token_chunk)`` (the δH₁
   unit: one forward and one vjp per chunk, float64 accumulation on the CPU) or ``forward`` = the no-grad
   ``policy.sequence_logprobs`` (ΔH's forward).

measured = (RSS high-water mark during 3) − imports baseline, which is what ``plan_memory`` predicts on the CPU
(weights included, interpreter and libraries not). predicted = ``funcprobe.memory.phase_memory`` for the same shapes
("grad" with one float64 accumulator set, or "forward").
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

MMAP_THRESHOLD = 131072
MB = 2 ** 20
GIB = 2 ** 30

#: The full CPU grid: (vocab, hidden, layers, g, prompt, response, seq_chunk, token_chunk, phase).
FULL_GRID = [
    (32000, 256, 2, 4, 64, 192, 2, 256, "grad"),
    (32000, 256, 2, 4, 64, 192, 4, 256, "grad"),
    (32000, 256, 4, 4, 64, 192, 2, 256, "grad"),
    (32000, 512, 2, 2, 64, 448, 1, 512, "grad"),
    (65536, 256, 2, 4, 32, 224, 2, 1024, "grad"),
    (151936, 256, 2, 4, 100, 412, 2, 256, "grad"),
    (8192, 128, 2, 8, 64, 448, 8, 128, "grad"),
    (4096, 256, 4, 8, 64, 448, 8, 64, "grad"),
    (4096, 512, 2, 4, 64, 960, 4, 64, "grad"),
    (4096, 256, 4, 8, 64, 448, 8, 64, "forward"),
    (32000, 256, 2, 4, 64, 192, 4, 256, "forward"),
    (151936, 256, 2, 4, 100, 412, 4, 512, "forward"),
]
#: The quick grid (tests): small enough that each worker takes a few seconds.
QUICK_GRID = [
    (16384, 128, 1, 2, 32, 96, 2, 256, "grad"),
    (32000, 64, 2, 2, 32, 224, 2, 512, "grad"),
    (8192, 256, 2, 2, 32, 96, 1, 128, "grad"),
    (4096, 256, 2, 4, 32, 224, 4, 64, "grad"),
    (32000, 128, 1, 4, 32, 96, 4, 256, "forward"),
]
KEYS = ("vocab", "hidden", "layers", "g", "prompt", "response", "seq_chunk", "token_chunk", "phase")


#: Whole delta_h1 calls (B = 3 prompts, fresh AdamW state): (…, store).
DELTA_H1_GRID = [
    (16384, 128, 2, 4, 32, 96, 4, 256, "delta_h1", True),
    (16384, 128, 2, 4, 32, 96, 1, 128, "delta_h1", False),
    (32000, 256, 2, 4, 64, 192, 2, 256, "delta_h1", False),
]


def grid_configs(grid) -> list[dict]:
    configs = []
    for row in grid:
        config = dict(zip(KEYS, row))
        if config["phase"] == "delta_h1":
            config.update(B=3, store=bool(row[len(KEYS)]))
        configs.append(config)
    return configs


def model_options(config: dict) -> dict:
    hidden = config["hidden"]
    heads = max(2, hidden // 64)
    return dict(vocab_size=config["vocab"], hidden_size=hidden, num_layers=config["layers"], num_heads=heads,
                num_kv_heads=max(1, heads // 2), intermediate_size=4 * hidden,
                max_position_embeddings=max(256, config["prompt"] + config["response"]))


def lora_rank(config: dict) -> int:
    return 8


# ------------------------------------------------------------------------------------------------------ predict
def predict(config: dict) -> dict:
    """The planner's prediction (bytes, CPU pool) for one measured configuration, with its components."""
    import torch
    from peft import LoraConfig

    from funcprobe.memory import model_shapes, phase_memory
    from funcprobe.testing import DEFAULT_TARGET_MODULES, tiny_config

    options = model_options(config)
    model_config = tiny_config("qwen2", **options)
    shapes = model_shapes(model_config, LoraConfig(r=lora_rank(config), target_modules=list(DEFAULT_TARGET_MODULES)))
    seq_len = config["prompt"] + config["response"]
    if config["phase"] == "delta_h1":  # the whole δH₁ call: the larger of its passes (+ the no-grad S pass)
        from funcprobe.memory import predict_phases

        phases = predict_phases(model_config, LoraConfig(r=lora_rank(config),
                                                         target_modules=list(DEFAULT_TARGET_MODULES)),
                                (config["B"], config["g"], config["prompt"], config["response"]),
                                seq_chunk=config["seq_chunk"], token_chunk=config["token_chunk"],
                                store=config.get("store", False), dtype=torch.float32, device="cpu")
        names = ["delta_h1_pass1", "delta_h1_pass2"] + (["delta_h"] if 1 < config["seq_chunk"] < config["g"] else [])
        parts = dict(max((p for p in phases if p.name in names), key=lambda p: p.device_bytes).device)
        parts["batch"] = 3 * config["B"] * config["g"] * seq_len * 8
        return dict(predicted=sum(parts.values()), parts=parts)
    phase = phase_memory(shapes, config["phase"], dtype=torch.float32, seq_len=seq_len,
                         response_len=config["response"], seq_chunk=min(config["seq_chunk"], config["g"]),
                         token_chunk=config["token_chunk"], device="cpu",
                         accumulators=1 if config["phase"] == "grad" else 0)
    parts = dict(phase.device)
    # the batch (input_ids, masks: int64 [1, g, L] each) and the float64 S
    parts["batch"] = 3 * config["g"] * seq_len * 8
    return dict(predicted=sum(parts.values()), parts=parts)


# ------------------------------------------------------------------------------------------------------ measure
def measure(config: dict) -> dict:
    """Run in a fresh process: imports baseline, build, reset the high-water mark, one evaluation, peak."""
    import torch

    from funcprobe import Policy
    from funcprobe.testing import random_batch, tiny_peft_model
    from memory_logprobs import RssSampler, _status_kb, current_rss_bytes, reset_peak_rss

    def high_water_bytes() -> int:
        # VmHWM, not ru_maxrss: after exec, getrusage's ru_maxrss starts at the PARENT's RSS high-water mark (the
        # kernel carries it over from the forked copy), so under a large parent (pytest after many tests) it reads
        # the parent's size. VmHWM is this mm's own mark, and clear_refs resets it.
        hwm = _status_kb("VmHWM")
        return 0 if hwm is None else hwm * 1024

    def evaluate(policy, batch, phase, seq_chunk, token_chunk):
        if phase == "delta_h1":
            from funcprobe import AdamState, delta_h1

            adam = AdamState.zeros(policy.params, lr=1e-3)
            return delta_h1(policy.params, batch, policy=policy, adam=adam, seq_chunk=seq_chunk,
                            token_chunk=token_chunk, store_unit_vectors=bool(config.get("store", False)))
        if phase == "grad":
            weights = torch.ones(batch.B, batch.G, dtype=torch.float64)
            return policy.logprob_grads(policy.params, batch, weights, seq_chunk=seq_chunk, token_chunk=token_chunk)
        return policy.sequence_logprobs(policy.params, batch, seq_chunk=seq_chunk, token_chunk=token_chunk)

    # 1. imports baseline, after a throw-away evaluation (lazy imports, first-call allocations)
    warm = Policy.from_peft(tiny_peft_model("qwen2", vocab_size=64, hidden_size=16, num_layers=1, num_heads=2,
                                            num_kv_heads=1, r=2))
    warm_batch = random_batch(3, 2, vocab_size=64, prompt_len=(4, 4), response_len=(4, 4), seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for phase, seq_chunk in (("grad", 2), ("forward", 2), ("delta_h1", 1), ("delta_h1", 2)):
            evaluate(warm, warm_batch, phase, seq_chunk, 4)
    del warm, warm_batch
    gc.collect()
    imports_baseline = current_rss_bytes()
    # 2. the model, policy and batch of the configuration
    peft_model = tiny_peft_model("qwen2", r=lora_rank(config), lora_alpha=2 * lora_rank(config),
                                 init_lora_weights=False, seed=0, dtype=torch.float32, tie_word_embeddings=False,
                                 **model_options(config))
    policy = Policy.from_peft(peft_model)
    del peft_model
    batch = random_batch(config.get("B", 1), config["g"], vocab_size=config["vocab"],
                         prompt_len=(config["prompt"],) * 2,
                         response_len=(config["response"],) * 2, seed=0)
    gc.collect()
    setup = current_rss_bytes()
    reset_ok = reset_peak_rss()
    # 3. one evaluation
    start = time.perf_counter()
    with warnings.catch_warnings(), RssSampler() as sampler:
        warnings.simplefilter("ignore")
        out = evaluate(policy, batch, config["phase"], config["seq_chunk"], config["token_chunk"])
    wall = time.perf_counter() - start
    del out
    peak = max(sampler.peak, high_water_bytes()) if reset_ok else sampler.peak
    return dict(config, imports_baseline=imports_baseline, setup=setup, peak=peak, measured=peak - imports_baseline,
                wall_s=wall, peak_method="VmHWM reset (clear_refs)" if reset_ok else "sampled",
                malloc_mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_"), torch=torch.__version__)


def run_measurements(configs: list[dict], *, timeout: float = 300) -> list[dict]:
    """Each configuration in a fresh subprocess (MALLOC_MMAP_THRESHOLD_ fixed, one thread); adds the prediction."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), OMP_NUM_THREADS="1")
    results = []
    for config in configs:
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(config)],
                              capture_output=True, text=True, cwd=str(ROOT), env=env, timeout=timeout)
        if done.returncode != 0:
            sys.stderr.write(done.stdout + done.stderr)
            raise RuntimeError(f"memory worker failed (exit {done.returncode}) for {config}")
        line = [x for x in done.stdout.splitlines() if x.startswith("{")][-1]
        result = json.loads(line)
        prediction = predict(config)
        result.update(prediction)
        result["rel_error"] = (result["predicted"] - result["measured"]) / result["measured"]
        results.append(result)
        print(f"  {config}: measured {result['measured'] / MB:.0f} MB, predicted {result['predicted'] / MB:.0f} MB "
              f"({100 * result['rel_error']:+.1f}%), {result['wall_s']:.1f} s", file=sys.stderr, flush=True)
    return results


def grid_table(results: list[dict]) -> str:
    lines = ["| evaluation | V | H | layers | g | L (prompt+resp) | seq_chunk | token_chunk | weights MB | measured MB "
             "| predicted MB | rel. error |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        phase = r["phase"] if r["phase"] != "delta_h1" else (f"delta_h1 (B={r['B']}, "
                                                              f"{'stored' if r['store'] else 'recomputed'})")
        lines.append(f"| {phase} | {r['vocab']} | {r['hidden']} | {r['layers']} | {r['g']} | "
                     f"{r['prompt'] + r['response']} ({r['prompt']}+{r['response']}) | {r['seq_chunk']} | "
                     f"{r['token_chunk']} | {r['parts']['weights'] / MB:.0f} | {r['measured'] / MB:.0f} | "
                     f"{r['predicted'] / MB:.0f} | {100 * r['rel_error']:+.1f}% |")
    worst = max(abs(r["rel_error"]) for r in results)
    lines.append("")
    lines.append(f"- max |relative error| {100 * worst:.1f}% over {len(results)} configurations (target ≤ 25%)")
    lines.append(f"- allocator: MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}; peak by "
                 f"{', '.join(sorted({r['peak_method'] for r in results}))}; torch {results[0]['torch']}, 1 thread")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ plans
def qwen25_15b_config():
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=151_936, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2, intermediate_size=8960, tie_word_embeddings=True)


ACCEPTANCE_PROMPT_LEN = 256
HOST_BUDGET = 64 * GIB


def acceptance_plans() -> tuple[str, bool]:
    import torch
    from peft import LoraConfig

    from funcprobe.memory import plan_memory
    from funcprobe.testing import DEFAULT_TARGET_MODULES

    model_config = qwen25_15b_config()
    lora = LoraConfig(r=64, target_modules=list(DEFAULT_TARGET_MODULES))
    rows = [(B, G, 100, gb) for gb in (40, 16) for B in (16, 32) for G in (4, 8)] + [(32, 8, 512, 40), (16, 8, 512,
                                                                                                       40)]
    lines = ["| GPU budget | B | G | new tokens | seq_chunk | token_chunk | prompt_chunk | unit vectors | "
             "sampling GiB | δH₁ pass 1 GiB | δH₁ pass 2 GiB | ΔH GiB | peak GiB | host GiB | fits |",
             "|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    all_ok = True
    details = []
    for B, G, new, gb in rows:
        try:
            plan = plan_memory(model_config, lora, (B, G, ACCEPTANCE_PROMPT_LEN, new), dtype=torch.bfloat16,
                               budget_bytes=gb * 10 ** 9, device="cuda", host_budget_bytes=HOST_BUDGET)
        except ValueError as error:
            lines.append(f"| {gb} GB | {B} | {G} | {new} | – | – | – | – | – | – | – | – | – | – "
                         f"| NO: {error} |")
            all_ok = False
            continue
        phase = {p.name: p.device_bytes / GIB for p in plan.phases}
        lines.append(f"| {gb} GB | {B} | {G} | {new} | {plan.seq_chunk} | {plan.token_chunk} | {plan.prompt_chunk} | "
                     f"{'stored' if plan.store_unit_vectors else 'recomputed'} | {phase['sampling']:.2f} | "
                     f"{phase['delta_h1_pass1']:.2f} | {phase['delta_h1_pass2']:.2f} | {phase['delta_h']:.2f} | "
                     f"{plan.peak_bytes / GIB:.2f} | {plan.host_peak_bytes / GIB:.1f} | "
                     f"{'yes' if plan.fits else 'NO'} |")
        all_ok &= plan.fits
        if (B, G, new, gb) in ((32, 8, 100, 16), (32, 8, 512, 40)):
            details.append(str(plan))
    lines.append("")
    lines.append(f"- model: Qwen2.5-1.5B shapes (V 151,936, H 1536, 28 layers, 12 heads, 2 kv heads, I 8960, tied), "
                 f"LoRA r=64 on q,k,v,o,gate,up,down ({plan.lora_scalars:,} scalars), bf16, float32 log-softmax; "
                 f"prompt length {ACCEPTANCE_PROMPT_LEN} (assumed), units = prompts; GB = 10⁹ bytes; host budget "
                 f"{HOST_BUDGET / GIB:.0f} GiB for the CPU accumulators and stored unit vectors")
    lines.append(f"- every configuration fits its budget: {'PASS' if all_ok else 'FAIL'}")
    return "\n".join(lines) + "\n\n```\n" + "\n\n".join(details) + "\n```", all_ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the small grid of tests/test_memory_plan.py")
    parser.add_argument("--plans", action="store_true", help="acceptance plans only, no measurement")
    parser.add_argument("--json", type=Path, help="also write the raw measurements here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        import torch

        torch.set_num_threads(1)
        print(json.dumps(measure(json.loads(args.worker))), flush=True)
        return 0
    ok = True
    if not args.plans:
        results = run_measurements(grid_configs(QUICK_GRID if args.quick else FULL_GRID + DELTA_H1_GRID))
        if args.json:
            args.json.write_text(json.dumps(results, indent=1) + "\n")
        print(grid_table(results))
        print()
        ok &= max(abs(r["rel_error"]) for r in results) <= 0.25
    text, plans_ok = acceptance_plans()
    print(text)
    return 0 if ok and plans_ok else 2


if __name__ == "__main__":
    raise SystemExit(main())
