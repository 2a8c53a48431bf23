"""Peak memory of ONE gradient evaluation of Σ_i S_i (sequence log-probs): the naive seed way vs funcprobe.

    python bench/memory_logprobs.py            # the full benchmark (Qwen2.5 vocabulary; the naive run needs ~12 GB)
    python bench/memory_logprobs.py --quick    # a smoke run with a small vocabulary (a few seconds)

Model: a randomly initialised Qwen2 (``funcprobe.testing.tiny_peft_model``): hidden 256, 2 layers, 4 attention heads,
2 key/value heads, intermediate 1024, vocabulary 151,936 (Qwen2.5's), untied embeddings, float32; LoRA r=16 on
q,k,v,o,gate,up,down with ``init_lora_weights=False`` (random non-zero A and B). Batch: B=1 prompt × G=g responses,
prompt 100 tokens + response 512 tokens (L = 612), all 512 response tokens of every sequence counted.

Methods (each configuration runs in a FRESH subprocess, ``python bench/memory_logprobs.py --worker JSON``):

* ``naive``: the stateful seed way. The module's LoRA parameters require grad; one ordinary forward of all g
  sequences gives full [g, L, V] logits; ``log_softmax`` over the full vocabulary, gather, masked sum, ``.backward()``.
* ``funcprobe``: ``policy.logprob_grads(policy.params, batch, torch.ones(B, G), seq_chunk=SC, token_chunk=TC)``.

Memory. After setup (imports, model, policy, batch, ``gc.collect()``) the worker reads its current RSS (the
*baseline*), then resets the kernel's RSS high-water mark (``echo 5 > /proc/self/clear_refs``, which also resets
``getrusage(RUSAGE_SELF).ru_maxrss``) and runs the one gradient evaluation. "peak RSS" is the process's RSS
high-water mark during the evaluation (``ru_maxrss`` after the reset; the absolute figure, baseline included);
"above baseline" is that minus the baseline. A 2 ms RSS sampling thread runs as well; its maximum is a lower bound
of the high-water mark and is used alone where ``clear_refs`` is not writable. The setup peak (``ru_maxrss`` before
the reset) is reported in the JSON lines.

Correctness guard: every worker prints its total gradient norm and a fixed random projection of the gradient
(and Σ S); the naive and funcprobe runs at the same g must agree to a relative 1e-4 (float32), so the benchmark
cannot compare different computations. A mismatch makes the script exit 1.

Allocator. With glibc's default (dynamic) mmap threshold, freed blocks of 128 KiB–32 MiB (decoder activations)
stay in the heap, so the RSS of a long loop creeps up for a few chunks before it plateaus.
``--malloc-mmap-threshold 131072`` runs the workers with ``MALLOC_MMAP_THRESHOLD_`` fixed, which returns them to
the OS; the default run measures what a user gets.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: Full benchmark: Qwen2 at hidden 256 with Qwen2.5's vocabulary.
FULL_MODEL = dict(vocab_size=151_936, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                  intermediate_size=1024, r=16, max_position_embeddings=1024)
FULL_BATCH = dict(prompt=100, response=512)
#: Smoke run: same shapes of computation, small vocabulary and sequences.
QUICK_MODEL = dict(vocab_size=1024, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   intermediate_size=64, r=4, max_position_embeddings=128)
QUICK_BATCH = dict(prompt=8, response=24)

SEQ_CHUNK = 2
TOKEN_CHUNK = 256
GRAD_RTOL = 1e-4
TARGET_RATIO = 8.0
TARGET_GROWTH = 0.05
MB = 2 ** 20


# ------------------------------------------------------------------------------------------------------ memory
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: fall back to the lifetime peak
        return maxrss_bytes()


def maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux ≥ 4.0); True when it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    hwm = _status_kb("VmHWM")
    return hwm is not None and hwm * 1024 <= current_rss_bytes() + 64 * MB


class RssSampler:
    """Samples the RSS every ``interval`` seconds in a daemon thread; ``peak`` is the largest sample."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak = current_rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_bytes())


# ------------------------------------------------------------------------------------------------------ worker
def _flat_grad_stats(grads: dict, names) -> tuple[float, float]:
    """(‖g‖₂, ⟨g, u⟩) with u a fixed N(0, 1) vector (seeded per parameter name order), both in float64."""
    import torch

    generator = torch.Generator().manual_seed(1234)
    norm_sq, projection = 0.0, 0.0
    for name in names:
        grad = grads[name].detach().to("cpu", torch.float64).reshape(-1)
        direction = torch.randn(grad.numel(), generator=generator, dtype=torch.float64)
        norm_sq += float(grad.dot(grad))
        projection += float(grad.dot(direction))
    return norm_sq ** 0.5, projection


def _naive_grads(policy, batch):
    """The stateful seed way: module params with requires_grad, full [g, L, V] logits, full log_softmax."""
    import torch

    module = policy.module
    named = dict(module.named_parameters())
    lora = [named[name] for name in policy.param_names]
    for parameter in module.parameters():
        parameter.requires_grad_(False)
        parameter.grad = None
    for parameter in lora:
        parameter.requires_grad_(True)
    B, G, L = batch.input_ids.shape
    input_ids = batch.input_ids.reshape(B * G, L)
    attention_mask = batch.attention_mask.reshape(B * G, L).long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = module(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=False).logits  # [g, L, V]
    log_probs = torch.log_softmax(logits.to(torch.float32), dim=-1)
    token_logprobs = log_probs[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    mask = batch.response_mask.reshape(B * G, L)[:, 1:].to(token_logprobs.dtype)
    sequence_logprobs = (token_logprobs * mask).sum(-1)
    total = sequence_logprobs.sum()
    total.backward()
    grads = {name: named[name].grad for name in policy.param_names}
    return float(sequence_logprobs.detach().double().sum()), grads


def _funcprobe_grads(policy, batch, seq_chunk: int, token_chunk: int):
    import torch

    weights = torch.ones(batch.B, batch.G, dtype=torch.float64)
    logprobs, (grads,) = policy.logprob_grads(policy.params, batch, weights, seq_chunk=seq_chunk,
                                              token_chunk=token_chunk)
    return float(logprobs.sum()), grads


def run_config(config: dict, policy_cache: dict | None = None) -> dict:
    """Build (or reuse) the model and batch, take the baseline, run one gradient evaluation, measure."""
    import torch

    from funcprobe import Policy
    from funcprobe.testing import random_batch, tiny_peft_model

    model_options = dict(config["model"])
    r = model_options.pop("r")
    key = json.dumps(config["model"], sort_keys=True)
    if policy_cache is not None and key in policy_cache:
        policy = policy_cache[key]
    else:
        peft_model = tiny_peft_model("qwen2", r=r, lora_alpha=2 * r, init_lora_weights=False, seed=0,
                                     dtype=torch.float32, tie_word_embeddings=False, **model_options)
        policy = Policy.from_peft(peft_model)
        if policy_cache is not None:
            policy_cache[key] = policy
    g = int(config["g"])
    prompt, response = config["batch"]["prompt"], config["batch"]["response"]
    batch = random_batch(1, g, vocab_size=model_options["vocab_size"], prompt_len=(prompt, prompt),
                         response_len=(response, response), seed=0)
    gc.collect()
    setup_peak = maxrss_bytes()
    baseline = current_rss_bytes()
    reset_ok = reset_peak_rss()
    start = time.perf_counter()
    with RssSampler() as sampler:
        if config["method"] == "naive":
            logprob_sum, grads = _naive_grads(policy, batch)
        elif config["method"] == "funcprobe":
            logprob_sum, grads = _funcprobe_grads(policy, batch, config["seq_chunk"], config["token_chunk"])
        else:
            raise ValueError(f"unknown method {config['method']!r}")
    wall = time.perf_counter() - start
    peak = max(sampler.peak, maxrss_bytes()) if reset_ok else sampler.peak
    grad_norm, grad_projection = _flat_grad_stats(grads, policy.param_names)
    if config["method"] == "naive":  # leave the shared module as it was (quick mode reuses it)
        for parameter in policy.module.parameters():
            parameter.grad = None
            parameter.requires_grad_(False)
    del grads
    gc.collect()
    return dict(config, L=batch.L, response_tokens=int(batch.response_mask.sum()), baseline_mb=baseline / MB,
                peak_mb=peak / MB, above_mb=(peak - baseline) / MB, sampled_peak_mb=sampler.peak / MB,
                setup_peak_mb=setup_peak / MB, peak_method="VmHWM reset (clear_refs)" if reset_ok else "sampled",
                wall_s=wall, grad_norm=grad_norm, grad_projection=grad_projection, logprob_sum=logprob_sum,
                num_lora_params=policy.num_params, threads=torch.get_num_threads(), torch=torch.__version__,
                source=source_digest(), malloc_mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_"))


def source_digest() -> str:
    """Short sha256 of the measured code (funcprobe's policy.py, logprobs.py, batch.py), so a table names it."""
    import hashlib

    digest = hashlib.sha256()
    for path in [ROOT / "funcprobe" / name for name in ("batch.py", "logprobs.py", "policy.py")]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def worker(payload: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    configs = json.loads(payload)
    configs = configs if isinstance(configs, list) else [configs]
    cache: dict = {}
    for config in configs:
        print(json.dumps(run_config(config, cache)), flush=True)


# ------------------------------------------------------------------------------------------------------ driver
def plan(quick: bool, seq_chunk: int, token_chunk: int) -> list[dict]:
    model, batch = (QUICK_MODEL, QUICK_BATCH) if quick else (FULL_MODEL, FULL_BATCH)
    configs = [dict(method="naive", g=8, seq_chunk=None, token_chunk=None)]
    configs += [dict(method="funcprobe", g=g, seq_chunk=seq_chunk, token_chunk=token_chunk) for g in (4, 8, 16)]
    return [dict(c, model=model, batch=batch) for c in configs]


def run_workers(configs: list[dict], *, one_process: bool, threads: int,
                mmap_threshold: int | None = None) -> list[dict]:
    """One fresh subprocess per configuration (or, for --quick, one subprocess for all), one at a time."""
    env = dict(os.environ)
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    groups = [configs] if one_process else [[c] for c in configs]
    results = []
    for group in groups:
        payload = json.dumps(group if one_process else group[0])
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", payload,
                               "--threads", str(threads)], capture_output=True, text=True, cwd=str(ROOT),
                              env=env)
        if done.returncode != 0:
            sys.stderr.write(done.stderr)
            raise SystemExit(f"worker failed (exit {done.returncode}) for {payload}")
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if len(lines) != len(group):
            sys.stderr.write(done.stdout + done.stderr)
            raise SystemExit(f"worker printed {len(lines)} JSON lines, expected {len(group)}")
        for line in lines:
            result = json.loads(line)
            results.append(result)
            print(f"  done: {result['method']} g={result['g']}: peak {result['peak_mb']:.0f} MB "
                  f"(+{result['above_mb']:.0f} MB), {result['wall_s']:.1f} s", file=sys.stderr, flush=True)
    return results


def _fmt(value, spec):
    return "–" if value is None else format(value, spec)


def report(results: list[dict], quick: bool) -> tuple[str, bool, bool]:
    """The markdown table and target lines; returns (text, gradients_agree, targets_met)."""
    lines = ["| method | g | seq_chunk | token_chunk | peak RSS MB | peak above baseline MB | baseline MB | wall s "
             "| grad norm |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['method']} | {r['g']} | {_fmt(r['seq_chunk'], 'd')} | {_fmt(r['token_chunk'], 'd')} | "
                     f"{r['peak_mb']:.0f} | {r['above_mb']:.0f} | {r['baseline_mb']:.0f} | {r['wall_s']:.1f} | "
                     f"{r['grad_norm']:.8e} |")
    by = {(r["method"], r["g"]): r for r in results}
    naive, fp4, fp8, fp16 = by[("naive", 8)], by[("funcprobe", 4)], by[("funcprobe", 8)], by[("funcprobe", 16)]
    lines.append("")

    def rel(a, b):
        return abs(a - b) / max(abs(b), 1e-300)

    norm_err = rel(fp8["grad_norm"], naive["grad_norm"])
    proj_err = rel(fp8["grad_projection"], naive["grad_projection"])
    s_err = rel(fp8["logprob_sum"], naive["logprob_sum"])
    agree = max(norm_err, proj_err) <= GRAD_RTOL
    lines.append(f"- gradients agree (g=8, naive vs funcprobe): ‖∇‖ rel. diff {norm_err:.1e}, random projection "
                 f"rel. diff {proj_err:.1e}, Σ S rel. diff {s_err:.1e} (tolerance {GRAD_RTOL:g}): "
                 f"{'PASS' if agree else 'FAIL'}")
    note = " (quick run: small vocabulary, numbers not meaningful)" if quick else ""
    ratio_abs = naive["peak_mb"] / fp8["peak_mb"]
    ratio_above = naive["above_mb"] / max(fp8["above_mb"], 1e-9)
    growth_abs = fp16["peak_mb"] / fp4["peak_mb"] - 1
    growth_above = fp16["above_mb"] / max(fp4["above_mb"], 1e-9) - 1
    met_ratio_abs, met_ratio_above = ratio_abs >= TARGET_RATIO, ratio_above >= TARGET_RATIO
    met_growth_abs, met_growth_above = growth_abs <= TARGET_GROWTH, growth_above <= TARGET_GROWTH
    verdict = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    lines.append(f"- naive / funcprobe peak at g=8, absolute peak RSS: {ratio_abs:.1f}× "
                 f"(target ≥ {TARGET_RATIO:g}×): {verdict(met_ratio_abs)}{note}")
    lines.append(f"- naive / funcprobe peak at g=8, peak above baseline: {ratio_above:.1f}× "
                 f"(target ≥ {TARGET_RATIO:g}×): {verdict(met_ratio_above)}{note}")
    lines.append(f"- funcprobe peak growth g=4 → g=16, absolute peak RSS: {100 * growth_abs:+.1f}% "
                 f"(target ≤ +{100 * TARGET_GROWTH:g}%): {verdict(met_growth_abs)}{note}")
    lines.append(f"- funcprobe peak growth g=4 → g=16, peak above baseline: {100 * growth_above:+.1f}% "
                 f"(target ≤ +{100 * TARGET_GROWTH:g}%): {verdict(met_growth_above)}{note}")
    methods = {r["peak_method"] for r in results}
    threshold = results[0]["malloc_mmap_threshold"]
    allocator = ("glibc defaults (dynamic mmap threshold)" if threshold is None
                 else f"MALLOC_MMAP_THRESHOLD_={threshold} (fixed mmap threshold)")
    lines.append(f"- allocator: {allocator}; measured code (funcprobe/{{batch,logprobs,policy}}.py) sha256[:12] "
                 f"{', '.join(sorted({r['source'] for r in results}))}")
    lines.append(f"- peak measured by: {', '.join(sorted(methods))}; torch {results[0]['torch']}, "
                 f"{results[0]['threads']} threads, {results[0]['num_lora_params']:,} LoRA scalars, "
                 f"L = {results[0]['L']}, {results[0]['response_tokens'] // results[0]['g']} response tokens per "
                 "sequence")
    met = met_ratio_abs and met_ratio_above and met_growth_abs and met_growth_above
    return "\n".join(lines), agree, met


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small vocabulary smoke run, all configurations in "
                                                              "one subprocess")
    parser.add_argument("--seq-chunk", type=int, default=SEQ_CHUNK)
    parser.add_argument("--token-chunk", type=int, default=TOKEN_CHUNK)
    parser.add_argument("--threads", type=int, help="torch threads per worker (default: min(2, cores); 1 for "
                                                     "--quick, which must stay fast on a busy machine)")
    parser.add_argument("--malloc-mmap-threshold", type=int, metavar="BYTES",
                        help="run the workers with MALLOC_MMAP_THRESHOLD_=BYTES (glibc: a fixed threshold, so freed "
                             "blocks above it go back to the OS instead of staying in the heap)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--strict", action="store_true", help="exit 2 when a memory target is not met")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(args.worker, args.threads or 1)
        return 0
    if args.threads is None:
        args.threads = 1 if args.quick else max(1, min(2, os.cpu_count() or 1))
    configs = plan(args.quick, args.seq_chunk, args.token_chunk)
    results = run_workers(configs, one_process=args.quick, threads=args.threads,
                          mmap_threshold=args.malloc_mmap_threshold)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    text, agree, met = report(results, args.quick)
    print(text)
    if not agree:
        return 1
    return 2 if (args.strict and not met and not args.quick) else 0


if __name__ == "__main__":
    raise SystemExit(main())
