"""Speed on the real model (issue 12): funcprobe's sampler, δH₁ and ΔĤ as ratios to the plain work they replace.

    python bench/real_model.py                 # SmolLM2-135M-Instruct, float32 (a few minutes on 2 cores)
    python bench/real_model.py --profile       # also the top entries of a torch profile of each funcprobe call
    python bench/real_model.py --quick         # a smoke run on a tiny random Llama (seconds after the imports)

Everything runs in ONE process on the same model, batch and optimizer state; every measured call is first run once
untimed (warm-up), then ``--repeats`` times in round-robin order (method 1, method 2, …, method 1, …), and the median
wall time is reported. The ratios are same-process, so load from other processes slows both sides of a ratio.

Model (full run): ``funcprobe.models.smollm2_135m()`` (SmolLM2-135M-Instruct: 30 layers, hidden 576, vocabulary
49,152, tied embeddings) in float32 with transformers' default (SDPA) attention; LoRA r = 8 (α = 16) on q, k, v, o
with PEFT's A initialisation and B ~ N(0, 0.02²) (seeded), so that every LoRA gradient is non-zero while the model
stays the real chat model. AdamW state: warm (t = 9, m ~ 1e-3·N(0,1), v ~ 1e-6·U(0.5,1.5)), lr 1e-5, weight decay
0.01. Prompts: arithmetic questions ("What is a+b? …") rendered with the model's chat template.

Measured (each a ratio of two calls in this process):

(a) sampling: ``funcprobe.sampling.sample_batch`` (token-id prompts, B·G responses, ``max_new_tokens``, τ = 1,
    the demo's reward) / transformers ``generate`` (``do_sample=True, top_k=0, top_p=1.0, temperature=1.0``, the same
    prompts left-padded, ``num_return_sequences=G``, the same stop ids and budget). B = 4, G = 4, 24 new tokens.
(b) δH₁: ``delta_h1(params, batch, policy=…, adam=…)`` (defaults: units = prompts, stored unit vectors) / one plain
    training step's gradient work on the same batch: the PEFT model called on all B·G sequences at once
    (``logits_to_keep`` = the response span, as TRL does), log-softmax, gather, the Dr. GRPO loss, ``.backward()``.
    At B = 4, G = 4, 24 new tokens (sampled with stop ids) and at a long-response shape, B = 3, G = 8, 256 new tokens
    (drawn with no stop id, so every response has 256 tokens; random rewards).
(c) ΔĤ: ``snis_delta_h(θ, θ⁺, batch=E)`` (defaults: per-prompt SNIS, Rao-Blackwell integrand) with the values at θ
    given (``before=``, as a sweep passes them) / one plain no-grad forward of E (the PEFT model at B·G sequences,
    ``logits_to_keep`` = the response span). θ⁺ = ``apply_step`` of δH₁'s step. Also without ``before=`` (both θ
    and θ⁺ evaluated: two forwards by necessity).

(d) δĤ₁(E): ``delta_h1_heldout(θ, step, E)`` (spec §9, Rao-Blackwell integrand, reverse mode with SDPA attention)
    along δH₁'s step / one plain training step's gradient work on E (as in (b), on E's B·G sequences). Also the
    sequence integrand, for its SE.

The script checks that δH₁ agrees between its chunkings and exits 1 if not.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if "PYTHONPATH" not in os.environ and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import funcprobe  # noqa: E402
from funcprobe import AdamState, Policy, delta_h1, testing  # noqa: E402
from funcprobe.realised import snis_delta_h, values_before  # noqa: E402
from funcprobe.sampling import DrawSpec, collect_stop_ids, draw_responses, sample_batch  # noqa: E402
from funcprobe.update import apply_step  # noqa: E402

LR, WEIGHT_DECAY, STEP = 1e-5, 0.01, 9
SHORT = dict(B=4, G=4, new=24)
LONG = dict(B=3, G=8, new=256)
QUICK_SHORT = dict(B=3, G=2, new=6)
QUICK_LONG = dict(B=3, G=4, new=16)
TARGETS = {"sampling": 1.0, "delta_h1": 2.0, "delta_h1_long": 2.0, "snis": 1.15, "heldout": 1.0}


# ----------------------------------------------------------------------------------------------------- setup
def warm_adam_state(params: dict, *, seed: int = 0) -> AdamState:
    """AdamW state with m ~ 1e-3 N(0, 1), v ~ 1e-6 U(0.5, 1.5), t = STEP (loaded like a real optimizer's)."""
    return testing.warm_adam_state(params, lr=LR, weight_decay=WEIGHT_DECAY, step=STEP, seed=seed)


def arithmetic(count: int, seed: int) -> tuple[list[str], list[str]]:
    import random

    rng = random.Random(seed)
    pairs = [(rng.randrange(50), rng.randrange(50)) for _ in range(count)]
    return ([f"What is {a}+{b}? Answer with the number only." for a, b in pairs], [str(a + b) for a, b in pairs])


def build(quick: bool, attn: str, seed: int = 0):
    """(peft model, policy, tokenizer, adam state, description)."""
    from peft import LoraConfig, get_peft_model

    if quick:
        from funcprobe.testing import char_tokenizer, tiny_causal_lm

        tokenizer = char_tokenizer()
        base = tiny_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=32, num_layers=2, num_heads=4,
                              num_kv_heads=2, attn_implementation=attn, seed=seed)
        description = "tiny random Llama (hidden 32, 2 layers, char vocabulary)"
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from funcprobe.models import smollm2_135m

        folder = smollm2_135m()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attn)
        description = "SmolLM2-135M-Instruct (30 layers, hidden 576, vocabulary 49,152, tied)"
    for parameter in base.parameters():
        parameter.requires_grad_(False)
    config = LoraConfig(r=4 if quick else 8, lora_alpha=8 if quick else 16, lora_dropout=0.0,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.copy_(0.02 * torch.randn(parameter.shape, generator=generator))
    model.eval()
    policy = Policy.from_peft(model)
    return model, policy, tokenizer, warm_adam_state(policy.params, seed=seed), description


def prompt_ids(tokenizer, quick: bool, count: int, seed: int) -> tuple[list[list[int]], list[str]]:
    from funcprobe.prompts import render_prompts

    texts, answers = arithmetic(count, seed)
    if quick:
        texts = [t.split("?")[0].replace("What is ", "") + "=" for t in texts]
        return [list(tokenizer(t)["input_ids"]) for t in texts], answers
    return render_prompts([[{"role": "user", "content": t}] for t in texts], tokenizer), answers


def reward(prompts, responses, meta):
    """The demo's reward: the exact answer plus 0.5 × the fraction of digit characters (varies within a group)."""
    from funcprobe.demo import demo_reward

    return demo_reward(prompts, responses, meta)


def random_advantages(batch, seed: int):
    generator = torch.Generator().manual_seed(seed)
    rewards = torch.rand((batch.B, batch.G), generator=generator, dtype=torch.float64)
    return batch.replace(rewards=rewards, advantages=rewards - rewards.mean(dim=1, keepdim=True))


# ----------------------------------------------------------------------------------------------- the plain work
def _flat(batch):
    B, G, L = batch.input_ids.shape
    ids = batch.input_ids.reshape(B * G, L)
    mask = batch.attention_mask.reshape(B * G, L).to(torch.long)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    response = batch.response_mask.reshape(B * G, L)
    first = int(response.any(dim=0).nonzero()[0])  # the sampler's layout: every response starts at column P
    return ids, mask, positions, response, L - first + 1


def plain_step(model, batch, micro: int | None = None) -> float:
    """One training step's gradient work: forward of the B·G sequences (logits of the response span only, as TRL's
    ``logits_to_keep``), log-softmax, gather, Dr. GRPO loss −Σ A·ℓ/(B·G·L_max), ``.backward()``; returns the loss.
    ``micro``: sequences per forward/backward, gradients accumulated (a trainer's gradient accumulation; None: all
    at once)."""
    ids, mask, positions, response, keep = _flat(batch)
    advantages = batch.advantages.reshape(-1, 1)
    micro = ids.shape[0] if micro is None else micro
    model.zero_grad(set_to_none=True)
    total = 0.0
    for start in range(0, ids.shape[0], micro):
        rows = slice(start, start + micro)
        logits = model(input_ids=ids[rows], attention_mask=mask[rows], position_ids=positions[rows],
                       logits_to_keep=keep).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[rows, -keep + 1:, None]).squeeze(-1)
        weights = advantages[rows].to(logp.dtype) * response[rows, -keep + 1:].to(logp.dtype)
        loss = -(weights * logp).sum() / (batch.num_sequences * float(batch.length_norm[0]))
        loss.backward()
        total += float(loss.detach())
        del logits, logp, loss
    model.zero_grad(set_to_none=True)
    return total


@torch.no_grad()
def plain_forward(model, batch) -> None:
    """One plain no-grad forward of the batch (logits of the response span)."""
    ids, mask, positions, _, keep = _flat(batch)
    model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep)


def hf_generate(model, prompts: list[list[int]], *, G: int, new: int, stops: tuple[int, ...], pad: int, seed: int):
    """transformers' sampler on the same prompts (left-padded), B·G sequences, no truncation; returns the number of
    generated tokens (up to and including the stop token)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, row in enumerate(prompts):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    torch.manual_seed(seed)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                         max_new_tokens=new, min_new_tokens=0, num_return_sequences=G, pad_token_id=pad,
                         eos_token_id=list(stops))
    generated = out[:, width:]
    is_stop = torch.isin(generated, torch.tensor(stops))
    ended = is_stop.cumsum(dim=1)
    return int(((ended == 0) | (is_stop & (ended == 1))).sum())


# ------------------------------------------------------------------------------------------------------ timing
def round_robin(methods: dict, repeats: int, log, warm_up: bool = True) -> dict[str, list[float]]:
    """Each method once untimed (``warm_up``), then ``repeats`` rounds in which every method runs once:
    {name: [seconds]}."""
    for name, fn in (methods.items() if warm_up else ()):
        start = time.perf_counter()
        fn()
        log(f"  warm-up {name}: {time.perf_counter() - start:.2f} s")
    times = {name: [] for name in methods}
    for round_index in range(repeats):
        for name, fn in methods.items():
            gc.collect()
            start, cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append((time.perf_counter() - start, time.process_time() - cpu))
        log(f"  round {round_index + 1}: " + ", ".join(f"{n} {t[-1][0]:.2f}s (CPU {t[-1][1]:.2f}s)"
                                                      for n, t in times.items()))
    return times


def profile_top(fn, label: str, rows: int, log) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60)
    log(f"\nprofile of {label} (top {rows} by self CPU time):\n{table}")
    return table


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


# -------------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model (smoke test)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3; --quick 2)")
    parser.add_argument("--long-repeats", type=int, default=None,
                        help="timed rounds at the long shape (default 2; no warm-up there: the short shapes ran the "
                        "same code first)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine more threads than free cores make "
                        "OpenMP spin and wall times erratic)")
    parser.add_argument("--only", default="sampling,delta_h1,long,snis,heldout",
                        help="comma-separated parts: sampling, delta_h1, long, snis, heldout")
    parser.add_argument("--attn", default="sdpa", help="attn_implementation (default sdpa)")
    parser.add_argument("--profile", action="store_true", help="print a torch profile of each funcprobe call")
    parser.add_argument("--json", default=None, help="write the raw numbers here")
    parser.add_argument("--long-batch", default=None,
                        help="cache of the long-response batch (a RolloutBatch file): loaded when it exists, else drawn "
                        "and saved there (the draw takes minutes on 2 cores and is the same for any funcprobe version)")
    parser.add_argument("--long-micro", type=int, default=None,
                        help="sequences per forward/backward of the plain step at the long shape, gradients accumulated "
                        "(default G, one prompt: the memory of all B·G long sequences at once is ~15 GB)")
    args = parser.parse_args(argv)
    quick = args.quick
    repeats = args.repeats or (2 if quick else 3)
    long_repeats = args.long_repeats or 2
    torch.set_num_threads(args.threads)
    parts = set(args.only.split(","))
    short, long_shape = (QUICK_SHORT, QUICK_LONG) if quick else (SHORT, LONG)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    started = time.perf_counter()
    log(f"funcprobe from {Path(funcprobe.__file__).parent}; load average {load_average()}")

    model, policy, tokenizer, adam, description = build(quick, args.attn)
    params = policy.params
    stops = collect_stop_ids(tokenizer, policy)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    prompts, answers = prompt_ids(tokenizer, quick, short["B"], seed=0)
    eval_prompts, eval_answers = prompt_ids(tokenizer, quick, short["B"], seed=1)
    sample = lambda ids, ans, seed: sample_batch(  # noqa: E731
        policy, params, ids, G=short["G"], reward_fn=reward, max_new_tokens=short["new"], seed=seed,
        tokenizer=tokenizer, meta={"answers": ans})
    results: dict = {"model": description, "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "funcprobe": str(Path(funcprobe.__file__).parent), "quick": quick, "repeats": repeats,
                     "load_average_start": load_average(), "rows": {}, "profiles": {}}
    rows = results["rows"]
    failures = []

    def record(key, label, times_fp, times_ref, shape, extra=""):
        fp, ref = statistics.median(t for t, _ in times_fp), statistics.median(t for t, _ in times_ref)
        fp_cpu, ref_cpu = statistics.median(c for _, c in times_fp), statistics.median(c for _, c in times_ref)
        rows[key] = dict(label=label, shape=shape, funcprobe_s=fp, reference_s=ref, ratio=fp / ref,
                         funcprobe_cpu_s=fp_cpu, reference_cpu_s=ref_cpu, cpu_ratio=fp_cpu / ref_cpu,
                         funcprobe_all=times_fp, reference_all=times_ref, target=TARGETS.get(key), extra=extra)
        log(f"{label}: {fp:.3f} s / {ref:.3f} s = {fp / ref:.3f}× wall, {fp_cpu / ref_cpu:.3f}× CPU "
            f"(target ≤ {TARGETS.get(key)}) {extra}")

    # (a) sampling
    if "sampling" in parts:
        log(f"(a) sampling, B={short['B']} G={short['G']} new={short['new']}")
        counter = {"fp": 0, "hf": 0}
        tokens = {"fp": [], "hf": []}

        def fp_sample():
            counter["fp"] += 1
            drawn = sample(prompts, answers, 100 + counter["fp"])
            tokens["fp"].append(int(drawn.batch.response_lengths.sum()))

        def hf_sample():
            counter["hf"] += 1
            tokens["hf"].append(hf_generate(model, prompts, G=short["G"], new=short["new"], stops=stops, pad=pad,
                                            seed=100 + counter["hf"]))

        times = round_robin({"sample_batch": fp_sample, "generate": hf_sample}, repeats, log)
        record("sampling", "sampling: sample_batch / generate", times["sample_batch"], times["generate"],
               f"B={short['B']}, G={short['G']}, {short['new']} new tokens",
               f"generated tokens per call (median): funcprobe {statistics.median(tokens['fp'])}, generate "
               f"{statistics.median(tokens['hf'])} (of {short['B'] * short['G'] * short['new']})")
        if args.profile:
            results["profiles"]["sampling"] = profile_top(fp_sample, "sample_batch", 15, log)
            results["profiles"]["generate"] = profile_top(hf_sample, "generate", 15, log)

    # (b) δH₁ at the short shape
    if "delta_h1" in parts or "snis" in parts or "heldout" in parts:
        batch = sample(prompts, answers, 0).batch
        log(f"(b) δH₁, B={short['B']} G={short['G']} new={short['new']}: batch L={batch.L}, "
            f"{int(batch.response_lengths.sum())} response tokens")
        outcome = {}

        def fp_delta():
            outcome["default"] = delta_h1(params, batch, policy=policy, adam=adam)

        def fp_delta_whole():
            outcome["whole"] = delta_h1(params, batch, policy=policy, adam=adam, seq_chunk=batch.num_sequences)

        if "delta_h1" in parts:
            times = round_robin({"delta_h1": fp_delta, f"delta_h1 seq_chunk={batch.num_sequences}": fp_delta_whole,
                                 "plain step": lambda: plain_step(model, batch)}, repeats, log)
            record("delta_h1", "δH₁ / plain fwd+bwd", times["delta_h1"], times["plain step"],
                   f"B={batch.B}, G={batch.G}, {short['new']} new tokens (L={batch.L})",
                   f"passes {outcome['default'].forward_passes} F / {outcome['default'].backward_passes} B")
            record("delta_h1_whole", f"δH₁ (seq_chunk={batch.num_sequences}) / plain fwd+bwd",
                   times[f"delta_h1 seq_chunk={batch.num_sequences}"], times["plain step"],
                   f"B={batch.B}, G={batch.G}, {short['new']} new tokens (L={batch.L})",
                   f"passes {outcome['whole'].forward_passes} F / {outcome['whole'].backward_passes} B")
            a, b = outcome["default"], outcome["whole"]
            scale = max(abs(a.grad_term), abs(a.state_term), 1e-30)
            agree = abs(a.deltaH1 - b.deltaH1) / scale
            rows["delta_h1"]["agreement"] = agree
            log(f"  δH₁ {a.deltaH1:.6e} (SE {a.se_deltaH1:.2e}) vs seq_chunk={batch.num_sequences} "
                f"{b.deltaH1:.6e}: difference {agree:.1e} of the terms")
            if not agree < 1e-3:
                failures.append(f"δH₁ differs between chunkings by {agree:.1e}")
            if args.profile:
                results["profiles"]["delta_h1"] = profile_top(fp_delta, "delta_h1", 15, log)
                results["profiles"]["plain_step"] = profile_top(lambda: plain_step(model, batch), "plain step", 15,
                                                                log)
        else:
            fp_delta()

    # (c) ΔĤ by SNIS on an independent evaluation batch E
    if "snis" in parts:
        evaluation = sample(eval_prompts, eval_answers, 1).batch
        new_params, _ = apply_step(params, adam, outcome["default"].step)
        before = values_before(params, evaluation, policy=policy, logprobs=True, entropies=True,
                               chunks=dict(seq_chunk=None, token_chunk=None, progress=False))
        out = {}
        times = round_robin({
            "snis (before given)": lambda: out.__setitem__("cached", snis_delta_h(
                params, new_params, policy=policy, batch=evaluation, before=before)),
            "snis": lambda: out.__setitem__("full", snis_delta_h(params, new_params, policy=policy,
                                                                 batch=evaluation)),
            "plain forward": lambda: plain_forward(model, evaluation)}, repeats, log)
        record("snis", "ΔĤ SNIS (before given) / plain no-grad forward", times["snis (before given)"],
               times["plain forward"], f"E: B={evaluation.B}, G={evaluation.G}, {short['new']} new tokens",
               f"passes {out['cached'].forward_passes}; ΔĤ {out['cached'].deltaH:.4e}")
        record("snis_full", "ΔĤ SNIS (θ and θ⁺) / plain no-grad forward", times["snis"], times["plain forward"],
               f"E: B={evaluation.B}, G={evaluation.G}, {short['new']} new tokens",
               f"passes {out['full'].forward_passes}")
        if abs(out["cached"].deltaH - out["full"].deltaH) > 1e-9 * max(abs(out["full"].deltaH), 1e-12):
            failures.append("snis with and without before= differ")
        if args.profile:
            results["profiles"]["snis"] = profile_top(lambda: snis_delta_h(
                params, new_params, policy=policy, batch=evaluation, before=before), "snis (before given)", 15, log)
            results["profiles"]["plain_forward"] = profile_top(lambda: plain_forward(model, evaluation),
                                                               "plain forward", 15, log)

    # (d) δĤ₁(E): the held-out first-order change along the step, against one plain training step on E
    if "heldout" in parts:
        from funcprobe.heldout import delta_h1_heldout

        if "snis" not in parts:
            evaluation = sample(eval_prompts, eval_answers, 1).batch
        step = outcome["default"].step
        got = {}
        times = round_robin({
            "heldout": lambda: got.__setitem__("rb", delta_h1_heldout(params, step, evaluation, policy=policy)),
            "heldout sequence": lambda: got.__setitem__("seq", delta_h1_heldout(
                params, step, evaluation, policy=policy, integrand="sequence")),
            "plain step": lambda: plain_step(model, evaluation)}, repeats, log)
        record("heldout", "δĤ₁(E) / plain fwd+bwd of E", times["heldout"], times["plain step"],
               f"E: B={evaluation.B}, G={evaluation.G}, {short['new']} new tokens (L={evaluation.L})",
               f"passes {got['rb'].forward_passes} F / {got['rb'].backward_passes} B; δĤ₁(E) "
               f"{got['rb'].deltaH1:.4e} ± {got['rb'].se:.2e}, sequence integrand {got['seq'].deltaH1:.4e} ± "
               f"{got['seq'].se:.2e}")
        if args.profile:
            results["profiles"]["heldout"] = profile_top(lambda: delta_h1_heldout(params, step, evaluation,
                                                                                  policy=policy), "heldout", 15, log)

    # (b') δH₁ at the long-response shape
    if "long" in parts:
        long_prompts, _ = prompt_ids(tokenizer, quick, long_shape["B"], seed=2)
        spec = DrawSpec(prompt_ids=tuple(tuple(p) for p in long_prompts), G=long_shape["G"],
                        max_new_tokens=long_shape["new"], seed=3, first_prompt_index=0, stop_token_ids=(),
                        pad_token_id=pad, temperature=policy.temperature)
        start = time.perf_counter()
        from funcprobe.rollouts_file import load_batch, save_batch

        cache = None if args.long_batch is None else Path(args.long_batch)
        if cache is not None and cache.exists():
            long_batch = load_batch(cache)
            how = f"loaded from {cache}"
        else:
            long_batch = random_advantages(draw_responses(policy, params, spec).batch, seed=4)
            how = f"drawn in {time.perf_counter() - start:.1f} s"
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                save_batch(long_batch, cache)
        micro = args.long_micro or long_batch.G
        log(f"(b') δH₁, B={long_shape['B']} G={long_shape['G']} new={long_shape['new']}: {how}, L={long_batch.L}")
        outcome_long = {}
        times = round_robin({"delta_h1": lambda: outcome_long.__setitem__("r", delta_h1(
            params, long_batch, policy=policy, adam=adam)),
            "plain step": lambda: plain_step(model, long_batch, micro=micro)},
            long_repeats, log, warm_up="delta_h1" not in parts)
        record("delta_h1_long", "δH₁ / plain fwd+bwd (long responses)", times["delta_h1"], times["plain step"],
               f"B={long_batch.B}, G={long_batch.G}, {long_shape['new']} new tokens (L={long_batch.L}); plain step "
               f"in micro-batches of {micro} sequences",
               f"passes {outcome_long['r'].forward_passes} F / {outcome_long['r'].backward_passes} B")
        if args.profile:
            results["profiles"]["delta_h1_long"] = profile_top(
                lambda: delta_h1(params, long_batch, policy=policy, adam=adam), "delta_h1 (long)", 15, log)

    results["load_average_end"] = load_average()
    results["total_s"] = time.perf_counter() - started
    print(f"\n{description}, float32, {args.attn} attention; torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads), {platform.python_version()}; median of {repeats} rounds ({long_repeats} at the long shape), "
          f"round-robin; load average {results['load_average_start']} at start, {results['load_average_end']} at "
          f"end; total {results['total_s']:.0f} s")
    print("| measurement | shape | funcprobe median s | reference median s | ratio (wall) | ratio (CPU) | target | "
          "notes |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for key, row in rows.items():
        target = "–" if row["target"] is None else f"≤ {row['target']:.2f}"
        verdict = "" if row["target"] is None else (" PASS" if row["ratio"] <= row["target"] else " MISS")
        print(f"| {row['label']} | {row['shape']} | {row['funcprobe_s']:.3f} | {row['reference_s']:.3f} | "
              f"{row['ratio']:.2f}× | {row['cpu_ratio']:.2f}× | {target}{verdict} | {row['extra']} |")
    for failure in failures:
        print(f"FAIL: {failure}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
