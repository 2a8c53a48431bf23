"""Wall time of ΔĤ by importance sampling (``funcprobe.realised.snis_delta_h``) against the floor and the seed's way.

    python bench/speed_snis.py                 # full: Qwen2 hidden 256, 2 layers, vocabulary 32,000 (≈ 1–2 min, 2 cores)
    python bench/speed_snis.py --vocab 32000 151936   # also at Qwen2.5's vocabulary
    python bench/speed_snis.py --quick         # a smoke run with a tiny model (a few seconds after the imports)

Model: a randomly initialised Qwen2 (``funcprobe.testing.tiny_peft_model``): hidden 256, 2 layers, 4 attention heads,
2 key/value heads, intermediate 1024, untied embeddings, float32, SDPA attention; LoRA r=16 on q,k,v,o,gate,up,down
(random non-zero A and B). Policy defaults: log-softmax in float32, seq_chunk 8, token_chunk 512. Batch: B=4 prompts ×
G=4 responses, prompt 32 + response 128 tokens, random token ids. θ⁺ = ``rl_update`` (AdamW, lr 1e-5, fresh state).

Methods, all in one process on the same model and batch, each run ``--repeats`` times (median reported, after one
untimed warm-up of every method):

* ``floor``: ``policy.sequence_logprobs(θ⁺, batch)`` — the cheapest forward that yields S(θ⁺) with funcprobe's
  chunked projection. snis_delta_h with S(θ) already computed (``before=``, as the learning-rate sweep passes it:
  S(θ) once for every η) needs exactly this one pass; the target is ≤ 1.15× of it.
* ``snis_delta_h (S(θ) given: before=)``: that estimator (−S integrand, per-prompt normalisation): the pass
  above + weights, ESS, PSIS k̂, the recorded-S check, result object.
* ``snis_delta_h``: S(θ) and S(θ⁺), both on the one teacher-forced path (spec §6): two passes.
* ``HF forward, full logits``: ``peft_model(input_ids, attention_mask, position_ids).logits`` under ``no_grad`` — the
  [B·G, L, V] logits of a plain forward (does not yet yield S); for reference.
* ``HF forward + full log_softmax → S``: the same plus a full-vocabulary ``log_softmax``, gather and masked sum.
* ``decoder + chunked gather, no score direction``: the decoder forward and a chunked ``logsumexp``/gather only —
  what a no-grad S could cost. funcprobe's ``sequence_logprobs`` shares its forward with the gradient path
  (``ChunkedTokenLogprob``), which also contracts each chunk's softmax with the LM head (the score direction D, for a
  later vjp); under ``no_grad`` that second [rows, V] × [V, H] product is not needed. Informational.
* ``seed: stateful IS step``: the seed's importance sampler — S(θ) by a full-logits forward, the in-place
  ``torch.optim.AdamW`` step on the module's LoRA tensors (``.grad`` set to the same precomputed RL gradient: the step
  is given, as for snis_delta_h, so no backward is timed), S(θ⁺) by a full-logits forward, then the undo: the LoRA
  tensors restored from a CPU snapshot and the gradients cleared. The snapshot is taken inside the timed region.

Correctness guard: the seed's S(θ) and S(θ⁺) must equal funcprobe's (cached S(θ); ``sequence_logprobs(θ⁺)`` with
θ⁺ from ``rl_update``) to a relative 1e-4 (float32), and the two ΔĤ must agree; otherwise the script exits 1.
"""

from __future__ import annotations

import argparse
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
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FULL_MODEL = dict(hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=1024, r=16,
                  max_position_embeddings=1024)
FULL_BATCH = dict(B=4, G=4, prompt=32, response=128)
QUICK_MODEL = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64, r=4,
                   max_position_embeddings=128)
QUICK_BATCH = dict(B=2, G=2, prompt=4, response=8)
QUICK_VOCAB = 512
LR = 1e-5
TARGET_RATIO = 1.15
S_RTOL = 1e-4


def _median_time(fn, repeats: int) -> tuple[float, float, list[float]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), times


def _hf_logprobs(module, batch, *, full_logprobs: bool):
    """S the naive way: one forward of all B·G sequences, full logits (and log_softmax, gather, masked sum)."""
    import torch

    B, G, L = batch.input_ids.shape
    ids = batch.input_ids.reshape(B * G, L)
    mask = batch.attention_mask.reshape(B * G, L).long()
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = module(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
    if not full_logprobs:
        return logits
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    picked = logprobs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    response = batch.response_mask.reshape(B * G, L)[:, 1:].to(picked.dtype)
    return (picked * response).sum(-1).double().reshape(B, G)


def _decoder_gather(policy, params, batch, token_chunk: int):
    """The decoder forward and a chunked logsumexp/gather only (no score direction): a no-grad S at its cheapest."""
    import torch

    head = policy.lm_head
    out = torch.zeros(batch.num_sequences, dtype=torch.float64)
    for chunk in batch.iter_sequence_chunks(policy.seq_chunk):
        hidden, targets, rows = policy._response_rows(params, chunk)
        pieces = []
        for start in range(0, hidden.shape[0], token_chunk):
            logits = (hidden[start:start + token_chunk] @ head.weight.T).float()
            picked = logits.gather(1, targets[start:start + token_chunk, None]).squeeze(1)
            pieces.append((picked - torch.logsumexp(logits, dim=1)).double())
        per_token = torch.cat(pieces)
        out[chunk.flat_index] = torch.zeros(chunk.input_ids.shape[0], dtype=torch.float64).index_add(0, rows,
                                                                                                      per_token)
    return out.reshape(batch.B, batch.G)


def run(vocab: int, *, quick: bool, repeats: int) -> dict:
    import torch

    from funcprobe.adam import AdamState
    from funcprobe.policy import Policy
    from funcprobe.realised import importance_weighted_delta_h, snis_delta_h, values_before
    from funcprobe.testing import random_batch, tiny_peft_model
    from funcprobe.update import policy_gradient, rl_update

    model_options = QUICK_MODEL if quick else FULL_MODEL
    shape = QUICK_BATCH if quick else FULL_BATCH
    module = tiny_peft_model("qwen2", vocab_size=vocab, dtype=torch.float32, seed=0, **model_options)
    policy = Policy.from_peft(module)
    params = policy.params
    batch = random_batch(shape["B"], shape["G"], vocab_size=vocab, prompt_len=(shape["prompt"], shape["prompt"]),
                         response_len=(shape["response"], shape["response"]), seed=0)
    logprobs_before = policy.sequence_logprobs(params, batch)
    cached = batch.replace(logprobs=logprobs_before)
    before = values_before(params, cached, policy=policy, logprobs=True, entropies=False, chunks={})
    adam = AdamState.zeros(params, lr=LR)
    update, _ = rl_update(params, batch, policy=policy, adam=adam)
    _, ybar = policy_gradient(params, batch, policy=policy)
    loss_grad = {name: (-value).to(torch.float32) for name, value in ybar.items()}

    # The seed's stateful sampler on the module itself.
    named = dict(module.named_parameters())
    lora = {name: named[name] for name in policy.param_names}
    for name, tensor in lora.items():  # the module must hold θ (it does: policy.params are copies of it)
        assert torch.equal(tensor.detach(), params[name])
    optimizer = torch.optim.AdamW(list(lora.values()), lr=LR, foreach=False)
    seed_out = {}

    def seed_step():
        with torch.no_grad():
            S_before = _hf_logprobs(module, batch, full_logprobs=True)
        snapshot = {name: tensor.detach().to("cpu", copy=True) for name, tensor in lora.items()}
        for name, tensor in lora.items():
            tensor.grad = loss_grad[name].clone()
        optimizer.step()
        with torch.no_grad():
            S_after = _hf_logprobs(module, batch, full_logprobs=True)
        with torch.no_grad():
            for name, tensor in lora.items():
                tensor.copy_(snapshot[name])
        optimizer.zero_grad(set_to_none=True)
        optimizer.state.clear()  # the seed reset its optimizer state with the parameters
        seed_out["before"], seed_out["after"] = S_before, S_after
        return importance_weighted_delta_h(S_before, S_after)

    methods = [
        ("floor: sequence_logprobs(θ⁺)", 1, lambda: policy.sequence_logprobs(update, batch)),
        ("snis_delta_h (S(θ) given: before=)", 1,
         lambda: snis_delta_h(params, update, policy=policy, batch=cached, before=before, estimator="sequence")),
        ("snis_delta_h", 2, lambda: snis_delta_h(params, update, policy=policy, batch=cached, estimator="sequence")),
        ("HF forward, full logits", 1, lambda: _no_grad(lambda: _hf_logprobs(module, batch, full_logprobs=False))),
        ("HF forward + full log_softmax → S", 1,
         lambda: _no_grad(lambda: _hf_logprobs(module, batch, full_logprobs=True))),
        ("decoder + chunked gather, no score direction", 1,
         lambda: _no_grad(lambda: _decoder_gather(policy, update, batch, policy.token_chunk))),
        ("seed: stateful IS step (2 full-logits forwards, AdamW step, undo)", 2, seed_step),
    ]
    for _, _, fn in methods:  # warm-up
        fn()
    rows = []
    for name, passes, fn in methods:
        median, best, times = _median_time(fn, repeats)
        rows.append(dict(method=name, passes=passes, median_s=median, min_s=best, times_s=times))
    floor = rows[0]["median_s"]
    for row in rows:
        row["ratio_to_floor"] = row["median_s"] / floor

    # Correctness guard.
    ours = snis_delta_h(params, update, policy=policy, batch=cached, before=before, estimator="sequence")
    theirs = seed_step()
    S_after = policy.sequence_logprobs(update, batch)
    err_before = float(((seed_out["before"] - logprobs_before).abs() / logprobs_before.abs()).max())
    err_after = float(((seed_out["after"] - S_after).abs() / S_after.abs()).max())
    for name, tensor in lora.items():
        assert torch.equal(tensor.detach(), params[name]), f"the seed's undo did not restore {name}"
    agree = err_before < S_RTOL and err_after < S_RTOL
    return dict(vocab=vocab, model=model_options, batch=shape, repeats=repeats, rows=rows,
                guard=dict(rel_err_S_before=err_before, rel_err_S_after=err_after, agree=agree,
                           deltaH_funcprobe=ours.deltaH, deltaH_seed=theirs.deltaH),
                snis_over_floor=rows[1]["ratio_to_floor"],
                seed_over_snis=rows[-1]["median_s"] / rows[1]["median_s"],
                seed_over_snis_uncached=rows[-1]["median_s"] / rows[2]["median_s"])


def _no_grad(fn):
    import torch

    with torch.no_grad():
        return fn()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--vocab", type=int, nargs="+", default=None, help="vocabulary sizes (default 32000)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per method (default 3; quick 2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default 2; quick 1: tiny ops only lose to thread hand-offs)")
    parser.add_argument("--json", type=str, default=None, help="write the results as JSON to this path")
    args = parser.parse_args(argv)

    import torch

    args.threads = args.threads or (1 if args.quick else 2)
    torch.set_num_threads(args.threads)
    vocabs = args.vocab or ([QUICK_VOCAB] if args.quick else [32_000])
    repeats = args.repeats or (2 if args.quick else 3)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"# snis_delta_h speed — torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPU cores, "
          f"{args.threads} threads, load average at start {load}")
    results, ok = [], True
    for vocab in vocabs:
        result = run(vocab, quick=args.quick, repeats=repeats)
        results.append(result)
        shape, model = result["batch"], result["model"]
        print(f"\nvocab {vocab:,}, hidden {model['hidden_size']}, {model['num_layers']} layers, LoRA r={model['r']}; "
              f"B={shape['B']}, G={shape['G']}, prompt {shape['prompt']} + response {shape['response']} tokens; "
              f"median of {repeats}\n")
        print("| method | forward passes | median s | min s | × floor |")
        print("|---|---|---|---|---|")
        for row in result["rows"]:
            print(f"| {row['method']} | {row['passes']} | {row['median_s']:.3f} | {row['min_s']:.3f} | "
                  f"{row['ratio_to_floor']:.2f} |")
        ratio = result["snis_over_floor"]
        verdict = "PASS" if ratio <= TARGET_RATIO else "MISS"
        guard = result["guard"]
        print(f"\nsnis_delta_h (S(θ) given) / floor = {ratio:.3f} (target ≤ {TARGET_RATIO}): {verdict}")
        print(f"seed stateful step / snis_delta_h (S(θ) given) = {result['seed_over_snis']:.2f}×; "
              f"/ snis_delta_h (the same 2 passes) = {result['seed_over_snis_uncached']:.2f}×")
        print(f"S agree with the seed's (rel. err. before {guard['rel_err_S_before']:.1e}, after "
              f"{guard['rel_err_S_after']:.1e}, tol {S_RTOL}): {'PASS' if guard['agree'] else 'FAIL'}; "
              f"ΔĤ funcprobe {guard['deltaH_funcprobe']:.6g}, seed {guard['deltaH_seed']:.6g}")
        ok = ok and guard["agree"]
    if args.json:
        with open(args.json, "w") as file:
            json.dump(dict(torch=torch.__version__, threads=args.threads, load=load, results=results), file,
                      indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
