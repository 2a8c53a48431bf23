"""Worker for tests/test_distributed.py, launched by ``python -m torch.distributed.run`` (or plainly, world of 1).

    distributed_worker.py OUT_PATH [--fail-rank R]

Computes δH₁ (units "prompt" on B=5, blocks of 2 on B=6), the AdamW step, ΔH (every normalisation, and the
Rao-Blackwell estimator), a sampled batch (shards sampled with first_prompt_index and gathered) and ΔH by common
random numbers on it (the redraw sharded by prompt), all with the float64 tiny model; rank 0 saves them to OUT_PATH
with torch.save. With --fail-rank R, rank R raises before the
first collective.
"""

from __future__ import annotations

import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from funcprobe import Policy  # noqa: E402
from funcprobe.delta_h1 import delta_h1  # noqa: E402
from funcprobe.heldout import delta_h1_heldout  # noqa: E402
from funcprobe.distributed import COMM, init_from_env, record_failure, shutdown  # noqa: E402
from funcprobe.realised import crn_delta_h, snis_delta_h  # noqa: E402
from funcprobe.sampling import gather_sampled, sample_batch  # noqa: E402
from funcprobe.testing import char_tokenizer, random_batch, tiny_peft_model  # noqa: E402
from funcprobe.update import rl_update  # noqa: E402

from conftest import warm_state  # noqa: E402  (this script runs from tests/, so conftest is importable)

VOCAB = 64
PROMPTS = ["1+1=", "2*3=", "7-", "hello", "9", "ab"]




def compute(world) -> dict:
    model = tiny_peft_model("qwen2", dtype=torch.float64, seed=13, r=2, num_layers=1, hidden_size=16,
                            target_modules=("q_proj", "v_proj", "down_proj"))
    policy = Policy.from_peft(model, logsoftmax_dtype=torch.float64)
    params = policy.params
    adam = warm_state(params)
    out = {"world_size": world.size}
    for name, B, units, seq_chunk in (("prompt_B5", 5, "prompt", None), ("blocks_B6", 6, 3, 1)):
        batch = random_batch(B, 3, vocab_size=VOCAB, prompt_len=(2, 4), response_len=(1, 5), seed=5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[name] = delta_h1(params, batch, policy=policy, adam=adam, units=units, seq_chunk=seq_chunk,
                                 world=world).to_dict()
        out[name + "_bytes"] = COMM.snapshot()
        COMM.reset()
    batch = random_batch(5, 3, vocab_size=VOCAB, prompt_len=(2, 4), response_len=(1, 5), seed=5)
    new_params, _ = rl_update(params, batch, policy=policy, adam=adam, world=world)
    out["update"] = {n: t.clone() for n, t in new_params.items()}
    # ΔH is compared on the same (θ, θ⁺): the step of one process (every rank computes it; the distributed step
    # above agrees with it to ~1e-16 relative, the order of the float64 sums), made 30× larger so that the
    # importance weights differ.
    step, _ = rl_update(params, batch, policy=policy, adam=adam)
    big = {n: params[n] + 30.0 * (step[n] - params[n]) for n in params}
    for normalize in ("prompt", "global", "none"):
        out[f"snis_{normalize}"] = snis_delta_h(params, big, policy=policy, batch=batch, normalize=normalize,
                                                world=world).to_dict()
    out["snis_rb_global_tok"] = snis_delta_h(params, big, policy=policy, batch=batch, normalize="global",
                                             estimator="rao_blackwell", per_token=True, world=world).to_dict()
    # δĤ₁(E) along the same step (spec §9): each rank its shard of E's prompts, the D_n gathered, ĝ_E all-reduced.
    decomposition = delta_h1(params, batch, policy=policy, adam=adam).step
    evaluation = random_batch(5, 3, vocab_size=VOCAB, prompt_len=(2, 4), response_len=(1, 5), seed=8)
    heldout = delta_h1_heldout(params, decomposition, evaluation, policy=policy, entropy_gradient=True, world=world,
                               seq_chunk=6)
    out["heldout"] = {**heldout.to_dict(), "gradient": heldout.gradient}
    # Sampling: each rank samples its shard of prompts; the global batch is gathered.
    sampler = Policy.from_peft(tiny_peft_model("qwen2", seed=3, vocab_size=80, dtype=torch.float64),
                             logsoftmax_dtype=torch.float64)
    shard = world.shard(len(PROMPTS))
    sampled = None
    if len(shard):
        sampled = sample_batch(sampler, sampler.params, PROMPTS[shard.start:shard.stop], G=3,
                               reward_fn=lambda p, r, m: [[float(len(x)) for x in g] for g in r], max_new_tokens=6,
                               seed=11, tokenizer=char_tokenizer(), first_prompt_index=shard.start)
    sampled = gather_sampled(world, sampled)
    out["sampled"] = {"batch": sampled.batch, "responses": sampled.responses, "prompts": sampled.prompts,
                      "eos_count": sampled.eos_count}
    generator = torch.Generator().manual_seed(0)
    moved = {n: t + 0.05 * torch.randn(t.shape, generator=generator, dtype=t.dtype) for n, t in sampler.params.items()}
    out["crn"] = crn_delta_h(sampler.params, moved, policy=sampler, sample=sampled, world=world).to_dict()
    return out


def main() -> int:
    path = sys.argv[1]
    fail_rank = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[2] == "--fail-rank" else None
    world = init_from_env(timeout_s=float(os.environ.get("FUNCPROBE_DIST_TIMEOUT", "30")))
    try:
        if world.rank == fail_rank:
            raise RuntimeError("injected failure for the test")
        out = compute(world)
        if world.rank == 0:
            tmp = path + ".tmp"
            torch.save(out, tmp)
            os.replace(tmp, path)
    except Exception as error:
        record_failure(world, error)
        print(f"distributed_worker: rank {world.rank} error: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        shutdown(world)
    return 0


if __name__ == "__main__":
    code = main()
    # Skip the interpreter teardown (see funcprobe/__main__.py): gloo threads occasionally abort it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
