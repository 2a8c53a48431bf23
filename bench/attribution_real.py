"""Token attribution on the real SmolLM2-135M-Instruct (spec §8 on §9's footing): wall time against the probe's
prediction, correlations with the proxies, and the intervention table.

    python bench/attribution_real.py                    # U 8×4, E 16×4, 24 new tokens, 3 timing repeats
    python bench/attribution_real.py --B 4 --G 4 --repeats 1 --json out.json

Setup (everything offline, CPU): the model from ``funcprobe.models.smollm2_135m()`` loaded as a user loads it (SDPA
attention; the forward-mode pass switches to eager for its duration) in float32 with a float64 log-softmax; a LoRA adapter r=8 on q/k/v/o whose B matrices are
set to 0.02·N(0,1) (seeded: PEFT's B = 0 would make the entropy gradient of A vanish); a fresh AdamW state
(t = 0, lr 1e-5, weight decay 0). Prompts: "a+b=" arithmetic through the chat template; reward 1 for the exact
answer + 0.5 × the fraction of digit characters (``funcprobe.demo.demo_reward``), Dr. GRPO advantages. Update batch
U (``--B`` prompts) seed 0, evaluation batch E (``--eval-B`` other prompts, twice U's by default as in ``make demo``)
seed 1.

Timing: the probe's prediction — ``delta_h1`` on U (the U-statistic and the step's Ȳ, stored unit vectors) then
``delta_h1_heldout`` on E along that step — against ``attribute(U, evaluation=E)`` without interventions (its own Ȳ,
ĝ_E, the forward-mode pass over U and the realised ΔĤ of the step on E), alternating ``--repeats`` times after a
warm-up; medians (target attribute / prediction ≤ 1.5). Then one ``attribute`` with the interventions gives the
table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--B", type=int, default=8)
    parser.add_argument("--G", type=int, default=4)
    parser.add_argument("--eval-B", type=int, default=None, help="prompts of E (default 2·B)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from funcprobe import AdamState, Policy, attribute, delta_h1
    from funcprobe.heldout import delta_h1_heldout
    from funcprobe.demo import arithmetic_prompts, demo_reward
    from funcprobe.models import smollm2_135m
    from funcprobe.sampling import sample_batch

    folder = smollm2_135m()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                          "o_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in peft_model.named_parameters():
            if ".lora_B." in name:
                tensor.copy_(0.02 * torch.randn(tensor.shape, generator=generator))
    policy = Policy.from_peft(peft_model, logsoftmax_dtype=torch.float64, seq_chunk=args.G)
    params = policy.params
    adam = AdamState.zeros(params, lr=1e-5, weight_decay=0.0)

    def batch_of(seed, count):
        prompts, answers = arithmetic_prompts(count, seed=100 + seed)
        chat = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                              add_generation_prompt=True) for p in prompts]
        return sample_batch(policy, params, chat, G=args.G, reward_fn=demo_reward, max_new_tokens=args.max_new_tokens,
                            seed=seed, tokenizer=tokenizer, meta={"answers": answers}).batch

    started = time.perf_counter()
    batch, evaluation = batch_of(0, args.B), batch_of(1, args.eval_B or 2 * args.B)
    sampling_s = time.perf_counter() - started
    print(f"sampled in {sampling_s:.1f} s", file=sys.stderr, flush=True)
    def predict():
        prediction = delta_h1(params, batch, policy=policy, adam=adam, store_unit_vectors=True)
        return prediction, delta_h1_heldout(params, prediction.step, evaluation, policy=policy)

    predict()  # warm-up
    attribute(params, batch, policy=policy, adam=adam, evaluation=evaluation)
    times = {"prediction": [], "attribute": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        reference, heldout = predict()
        times["prediction"].append(time.perf_counter() - start)
        start = time.perf_counter()
        result = attribute(params, batch, policy=policy, adam=adam, evaluation=evaluation)
        times["attribute"].append(time.perf_counter() - start)
        print(f"prediction {times['prediction'][-1]:.1f} s, attribute {times['attribute'][-1]:.1f} s "
              f"({ {k: round(v, 1) for k, v in result.timings.items()} })", file=sys.stderr, flush=True)
    medians = {k: statistics.median(v) for k, v in times.items()}
    full = attribute(params, batch, policy=policy, adam=adam, evaluation=evaluation,
                     interventions={"plain": torch.ones(batch.input_ids.shape), "clip_cov_0.2%": ("clip_cov", 0.002),
                                    "clip_cov_2%": ("clip_cov", 0.02), "high_entropy_20%": ("high_entropy", 0.2),
                                    "positive_only": "positive_only"})
    out = {
        "B": batch.B, "G": batch.G, "tokens": int(batch.response_mask.sum()), "sampling_s": sampling_s,
        "eval_B": evaluation.B, "prediction_s": medians["prediction"], "attribute_s": medians["attribute"],
        "ratio": medians["attribute"] / medians["prediction"], "times": times,
        "attribute_timings": result.timings,
        "grad_term": result.grad_term, "heldout_grad_term": heldout.grad_term,
        "sum_rel_diff": abs(result.grad_term - heldout.grad_term) / abs(heldout.grad_term),
        "ustatistic_deltaH1": reference.deltaH1, "heldout_deltaH1": heldout.deltaH1, "heldout_se": heldout.se,
        "realised": result.realised_delta_h, "realised_se": result.realised_se, "paired": result.paired,
        "deltaH1": full.deltaH1, "state_term": full.state_term,
        "summary": full.summary, "interventions": full.interventions,
    }
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
