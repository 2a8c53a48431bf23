"""Profile of attribution's forward-mode pass on the real model (bench/RESULTS.md, "Attribution on the real model"):
one chunk of 4 sequences; a no-grad forward, δH₁'s tapped forward + backward, and the two jvp routes; min of 3.

    python bench/attribution_profile.py
"""
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.simplefilter("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(2)
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from funcprobe import Policy
from funcprobe.models import smollm2_135m
from funcprobe.testing import random_batch
from funcprobe.lora_grads import row_direction_jvp, tapped_forward
folder = smollm2_135m()
model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32)
pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj","k_proj","v_proj","o_proj"], init_lora_weights=True))
g=torch.Generator().manual_seed(0)
with torch.no_grad():
    for n,p in pm.named_parameters():
        if ".lora_B." in n: p.copy_(0.02*torch.randn(p.shape, generator=g))
policy = Policy.from_peft(pm, logsoftmax_dtype=torch.float64)
params = policy.params
batch = random_batch(2, 4, vocab_size=49152, prompt_len=(30, 40), response_len=(20, 24), seed=0)
chunk = next(iter(batch.iter_sequence_chunks(4)))
d = {n: 1e-3*torch.randn_like(t) for n, t in params.items()}
def t(f, k=3):
    f(); ts=[]
    for _ in range(k):
        s=time.perf_counter(); f(); ts.append(time.perf_counter()-s)
    return min(ts)
with torch.no_grad():
    fwd = t(lambda: policy._chunk_token_logprobs(params, chunk, 512))
print("no-grad forward", fwd)
print("token_logprob_jvp", t(lambda: policy.token_logprob_jvp(params, chunk, d, token_chunk=512)))
print("token_logprob_jvp+H", t(lambda: policy.token_logprob_jvp(params, chunk, d, token_chunk=512, entropies=True)))
print("row_direction_jvp", t(lambda: row_direction_jvp(policy, params, chunk, [d], torch.zeros(4, dtype=torch.long), token_chunk=512)))
def fb():
    tc = tapped_forward(policy, params, chunk, 512)
    tc.backward(torch.ones(tc.token_logprobs.shape[0], dtype=torch.float64), torch.ones(1, 4, dtype=torch.float64))
print("tapped fwd+bwd", t(fb))
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU]) as prof:
    row_direction_jvp(policy, params, chunk, [d], torch.zeros(4, dtype=torch.long), token_chunk=512)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
