"""The seed's acceptance configurations on a GPU (issue 12): measured peak memory against funcprobe's memory planner,
and δH₁'s wall time against one plain training step. Run it with ``bash bench/gpu.sh``.

On CUDA (the real run): Qwen2.5-1.5B shapes (transformers ``Qwen2Config``: vocabulary 151,936, hidden 1,536, 28 layers,
12 query / 2 key-value heads, intermediate 8,960, tied embeddings) with RANDOM weights (no download), bfloat16, LoRA
r = 64 (α = 128) on q, k, v, o, gate, up, down (float32 adapters, as PEFT keeps them), prompts of 128 random tokens,
and the seed's configurations: B ∈ {16, 32} × G ∈ {4, 8} with 100 new tokens, and B = 16, G = 8 with 512 new tokens
(random weights almost never emit the stop token, so every response has the full length: the worst case). Each
configuration runs in a fresh process:

1. ``funcprobe.memory.plan_for_policy`` chooses seq_chunk, token_chunk, prompt_chunk and the store mode for a 40 GB
   budget (the seed's card; ``--budget``) and predicts each phase's peak;
2. each phase runs with those settings, ``torch.cuda.reset_peak_memory_stats`` before and
   ``torch.cuda.max_memory_allocated`` after: sampling (``sample_batch``), δH₁ (``delta_h1``), δĤ₁(E)
   (``delta_h1_heldout`` along δH₁'s step, with the model's SDPA attention; no planner phase yet), the realised change
   (``snis_delta_h`` — on the update batch itself here, which has the evaluation batch's shape; memory and time do
   not depend on which batch it is), and the plain step;
3. the plain step is what a trainer does for the same batch: the PEFT module's forward (``logits_to_keep``: the
   response positions only), a float32 log-softmax, the Dr. GRPO loss and ``backward()``, in micro-batches of
   seq_chunk sequences; δH₁ / plain step is the ratio of their wall times (the plain step timed after one warm-up).

"predicted" is the planner's phase total minus its CUDA context reserve and fragmentation headroom (what
``max_memory_allocated`` counts); "planner total" adds them back (what must fit on the card).

Without CUDA it runs a smoke test at reduced shapes on the CPU (a 2-layer model, B ≤ 3, a few tokens; peaks are the
process's RSS high-water mark, where the planner predicts memory above the imports baseline, so the CPU numbers
check the plumbing, not the planner), in-process, in seconds; tests/test_gpu_bench_smoke.py runs it.

    bash bench/gpu.sh                 # CUDA: all configurations, table appended to bench/RESULTS.md
    bash bench/gpu.sh --only 16x4x100 # one configuration (BxGxTOKENS)
    bash bench/gpu.sh --out FILE      # also write the table to FILE; --no-append: do not touch RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GIB = 2 ** 30
#: Qwen2.5-1.5B's shapes (its config.json), for a randomly initialised model.
QWEN25_15B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                  rms_norm_eps=1e-6, tie_word_embeddings=True)
SMOKE_MODEL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, rope_theta=1e4, rms_norm_eps=1e-6,
                   tie_word_embeddings=True)
#: (B, G, new tokens): the seed's acceptance grid, and the long-response configuration.
CUDA_CONFIGS = ((16, 4, 100), (16, 8, 100), (32, 4, 100), (32, 8, 100), (16, 8, 512))
SMOKE_CONFIGS = ((3, 2, 4),)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class _IdTokenizer:
    """What the sampler needs from a tokenizer when prompts are token ids: stop and pad ids, and a decode."""

    eos_token_id = 0
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids)


def _random_rewards(seed: int):
    import torch

    def reward(prompts, responses, meta):
        generator = torch.Generator().manual_seed(seed)
        return torch.rand(len(responses), len(responses[0]), generator=generator, dtype=torch.float64)

    return reward


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _phase(device, tracker, fn):
    """(result, seconds, peak bytes) of fn() with a fresh peak count."""
    _sync(device)
    tracker.reset()
    start = time.perf_counter()
    value = fn()
    _sync(device)
    return value, time.perf_counter() - start, tracker.read()


def plain_step(model, batch, seq_chunk: int, device) -> float:
    """One plain training step's gradient work on the batch (Dr. GRPO loss −Σ A·S/(N·L)): micro-batches of seq_chunk
    sequences, each a module forward with logits for the response positions only, a float32 log-softmax, gather and
    ``backward()``; returns the loss (gradients are accumulated in the LoRA tensors' ``.grad`` and then dropped)."""
    import torch

    B, G, L = batch.input_ids.shape
    ids = batch.input_ids.reshape(B * G, L)
    mask = batch.attention_mask.reshape(B * G, L)
    response = batch.response_mask.reshape(B * G, L)
    weights = (batch.advantages / batch.length_norm[:, None]).reshape(-1) / (B * G)
    start = int(response.any(dim=0).nonzero()[0])
    total = 0.0
    for first in range(0, B * G, seq_chunk):
        rows = slice(first, first + seq_chunk)
        chunk_ids = ids[rows].to(device)
        chunk_mask = mask[rows].long().to(device)
        positions = (chunk_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=chunk_ids, attention_mask=chunk_mask, position_ids=positions, use_cache=False,
                       logits_to_keep=L - start + 1).logits[:, :-1]
        logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, chunk_ids[:, start:, None]).squeeze(-1)
        sequence = (logprobs * response[rows, start:].to(device)).sum(-1)
        loss = -(weights[rows].to(device, torch.float32) * sequence).sum()
        loss.backward()
        total += float(loss.detach())
        del logits, logprobs, loss
    for parameter in model.parameters():
        parameter.grad = None
    return total


def run_config(B: int, G: int, new_tokens: int, *, smoke: bool, budget_bytes: int | None, seed: int = 0) -> dict:
    """Build the model, plan, and measure every phase for one configuration (see the module docstring)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    from funcprobe import AdamState, Policy, apply_step, delta_h1, sample_batch, snis_delta_h
    from funcprobe.memory import PeakTracker, plan_for_policy

    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    dtype = torch.bfloat16
    shapes = SMOKE_MODEL if smoke else QWEN25_15B
    prompt_len = 8 if smoke else 128
    rank = 4 if smoke else 64
    torch.manual_seed(seed)
    started = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**shapes), dtype=dtype)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS),
                                                  lora_dropout=0.0))
    with torch.no_grad():  # a trained-looking adapter: lora_B ≠ 0, so every LoRA tensor has a gradient
        for name, parameter in peft_model.named_parameters():
            if ".lora_B." in name:
                parameter.normal_(0.0, 1e-3)
    peft_model.eval()
    build_s = time.perf_counter() - started
    if budget_bytes is None and device.type == "cuda":
        budget_bytes = 40 * 10 ** 9  # the seed's card
    policy = Policy(peft_model)
    plan = plan_for_policy(policy, (B, G, prompt_len, new_tokens), budget_bytes=budget_bytes)
    policy = Policy(peft_model, seq_chunk=plan.seq_chunk, token_chunk=plan.token_chunk)
    params = policy.params
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, shapes["vocab_size"], (B, prompt_len), generator=generator).tolist()
    adam = AdamState.zeros(params, lr=1e-5, weight_decay=0.0)
    tracker = PeakTracker(device)
    result = {"B": B, "G": G, "new_tokens": new_tokens, "prompt_len": prompt_len, "device": str(device),
              "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                              else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"),
              "dtype": "bfloat16", "lora_r": rank, "lora_scalars": policy.num_params, "peak_kind": tracker.kind,
              "budget_bytes": plan.budget_bytes, "seq_chunk": plan.seq_chunk, "token_chunk": plan.token_chunk,
              "prompt_chunk": plan.prompt_chunk, "store_unit_vectors": plan.store_unit_vectors,
              "build_s": build_s, "measured": {}, "seconds": {}, "status": "ok"}
    result["planner_total"] = {p.name: p.device_bytes for p in plan.phases}
    result["predicted"] = {p.name: sum(v for k, v in p.device.items() if k not in ("cuda_context",
                                                                                  "cuda_fragmentation"))
                           for p in plan.phases}
    measured, seconds = result["measured"], result["seconds"]
    if device.type == "cpu":
        # The CPU smoke's peaks are the process's high-water mark; the planner predicts memory above the imports
        # baseline, which this process (with its earlier configurations) is far above: the ratio is not meaningful.
        result["note"] = "CPU smoke: RSS high-water marks of the whole process (plumbing only, not a planner check)"
    try:
        sampled, seconds["sampling"], measured["sampling"] = _phase(device, tracker, lambda: sample_batch(
            policy, params, prompts, G=G, reward_fn=_random_rewards(seed), max_new_tokens=new_tokens, seed=seed,
            tokenizer=_IdTokenizer(), prompt_chunk=plan.prompt_chunk))
        batch = sampled.batch
        result["mean_response_tokens"] = float(batch.response_lengths.float().mean())
        _phase(device, tracker, lambda: plain_step(peft_model, batch, plan.seq_chunk, device))  # warm-up
        _, seconds["plain_step"], measured["plain_step"] = _phase(
            device, tracker, lambda: plain_step(peft_model, batch, plan.seq_chunk, device))
        prediction, seconds["delta_h1"], measured["delta_h1"] = _phase(device, tracker, lambda: delta_h1(
            params, batch, policy=policy, adam=adam, store_unit_vectors=plan.store_unit_vectors))
        # δĤ₁(E) (spec §9) along the step, reverse mode with the model's own (SDPA) attention — on the update batch
        # here, which has the evaluation batch's shape (time and memory do not depend on which batch it is).
        from funcprobe.heldout import delta_h1_heldout

        heldout, seconds["heldout"], measured["heldout"] = _phase(device, tracker, lambda: delta_h1_heldout(
            params, prediction.step, batch, policy=policy))
        result["deltaH1_heldout"] = heldout.deltaH1
        result["ratio_heldout_to_plain_step"] = seconds["heldout"] / seconds["plain_step"]
        new_params, _ = apply_step(params, adam, prediction.step)
        _, seconds["delta_h"], measured["delta_h"] = _phase(device, tracker, lambda: snis_delta_h(
            params, new_params, policy=policy, batch=batch, in_sample=True))
        result["deltaH1"] = prediction.deltaH1
        result["ratio_delta_h1_to_plain_step"] = seconds["delta_h1"] / seconds["plain_step"]
    except torch.cuda.OutOfMemoryError as error:  # recorded, not raised: the table says which phase
        result["status"] = f"CUDA out of memory after {list(measured)}: {str(error).splitlines()[0]}"
    return result


# ------------------------------------------------------------------------------------------------- the report
def _gib(value) -> str:
    return "–" if value is None else f"{value / GIB:.2f}"


def table(results: list[dict]) -> str:
    smoke = results and results[0]["device"] == "cpu"
    unit = "GiB, process RSS high-water mark (CPU smoke)" if smoke else "GiB, torch.cuda.max_memory_allocated"
    lines = [f"| B | G | new tokens | seq_chunk / token_chunk / prompt_chunk / store | phase | predicted | measured "
             f"({unit}) | measured / predicted | planner total | wall s |",
             "|---:|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    names = {"sampling": "sampling", "delta_h1": "delta_h1_pass1", "heldout": None, "delta_h": "delta_h",
             "plain_step": None}
    for r in results:
        settings = f"{r['seq_chunk']} / {r['token_chunk']} / {r['prompt_chunk']} / {'stored' if r['store_unit_vectors'] else 'recomputed'}"
        for phase, planned in names.items():
            predicted = None
            if planned is not None:
                predicted = r["predicted"][planned]
                if phase == "delta_h1":  # the larger of the two passes
                    predicted = max(r["predicted"]["delta_h1_pass1"], r["predicted"]["delta_h1_pass2"])
            measured = r["measured"].get(phase)
            ratio = "–" if predicted is None or measured is None else f"{measured / predicted:.2f}"
            total = "–" if planned is None else _gib(max(r["planner_total"][planned], r["planner_total"].get(
                "delta_h1_pass2", 0) if phase == "delta_h1" else 0))
            wall = r["seconds"].get(phase)
            lines.append(f"| {r['B']} | {r['G']} | {r['new_tokens']} | {settings} | {phase.replace('_', ' ')} | "
                         f"{_gib(predicted)} | {_gib(measured)} | {ratio} | {total} | "
                         f"{'–' if wall is None else f'{wall:.2f}'} |")
    lines.append("")
    for r in results:
        ratio = r.get("ratio_delta_h1_to_plain_step")
        lines.append(f"- B={r['B']}, G={r['G']}, {r['new_tokens']} new tokens: "
                     + (f"δH₁ / plain step = {ratio:.2f} ({r['seconds']['delta_h1']:.1f} s / "
                        f"{r['seconds']['plain_step']:.2f} s); δĤ₁(E) / plain step = "
                        f"{r['ratio_heldout_to_plain_step']:.2f}; mean response {r['mean_response_tokens']:.0f} tokens; "
                        f"budget {r['budget_bytes'] / 1e9:.0f} GB"
                        if ratio is not None else r["status"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="one configuration BxGxTOKENS, e.g. 16x8x512")
    parser.add_argument("--budget", default=None, help="memory budget for the planner (default 40GB on CUDA)")
    parser.add_argument("--smoke", action="store_true", help="the CPU smoke run even where CUDA is available")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    parser.add_argument("--no-append", action="store_true", help="do not append to bench/RESULTS.md")
    parser.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"), help=argparse.SUPPRESS)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import warnings

    import torch

    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
    warnings.filterwarnings("ignore", message="the jackknife")

    from funcprobe.memory import parse_memory_size

    budget = parse_memory_size(args.budget) if args.budget else None
    if args.worker is not None:  # one configuration in this fresh process; JSON on the last stdout line
        B, G, T = (int(v) for v in args.worker.split("x"))
        print(json.dumps(run_config(B, G, T, smoke=False, budget_bytes=budget)))
        return 0
    smoke = args.smoke or not torch.cuda.is_available()
    configs = SMOKE_CONFIGS if smoke else CUDA_CONFIGS
    if args.only:
        configs = [tuple(int(v) for v in args.only.split("x"))]
    results = []
    started = time.perf_counter()
    for B, G, T in configs:
        print(f"B={B} G={G} new tokens={T} …", flush=True)
        if smoke:
            results.append(run_config(B, G, T, smoke=True, budget_bytes=budget))
            continue
        done = subprocess.run([sys.executable, __file__, "--worker", f"{B}x{G}x{T}"]
                              + (["--budget", args.budget] if args.budget else []),
                              capture_output=True, text=True, cwd=str(ROOT))
        if done.returncode != 0 or not done.stdout.strip():
            results_line = {"B": B, "G": G, "new_tokens": T, "status": f"worker failed ({done.returncode}): "
                            + " ".join(done.stderr.strip().splitlines()[-3:])[:400]}
            print(results_line["status"], file=sys.stderr)
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    text = table([r for r in results if "measured" in r])
    command = "bash bench/gpu.sh" + ("" if argv is None else " " + " ".join(argv)).rstrip()
    device = results[0]["device_name"] if results else "?"
    header = (f"`{command}` on {device} ({'CPU smoke, reduced shapes' if smoke else 'CUDA'}), torch "
              f"{torch.__version__}, {time.strftime('%Y-%m-%d')}, {time.perf_counter() - started:.0f} s\n\n")
    print("\n" + header + text)
    if args.out:
        Path(args.out).write_text(header + text + "\n")
    if not smoke and not args.no_append:
        with open(args.results, "a", encoding="utf-8") as file:
            file.write("\n### GPU run (bench/gpu.sh)\n\n" + header + text + "\n")
        print(f"appended to {args.results}")
    return 0 if all(r.get("status") == "ok" for r in results) and len(results) == len(configs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
