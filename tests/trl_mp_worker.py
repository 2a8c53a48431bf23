"""Worker for tests/test_trl_multiprocess.py: one rank of a real 2-process ``GRPOTrainer`` run (gloo, CPU) with
``EntropyChangeCallback``, launched with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

    trl_mp_worker.py OUT_PATH [--fail-rank R --fail-in {measure,step_begin}]

The tiny float64 setting of tests/test_trl_callback.py (``make_trainer``), with G = 4, 5 completions per device and
gradient_accumulation_steps = 2: each process's generation is 10 rows, so the completions of one of each
generation's 5 prompts are split across the two processes, and each optimizer step has two micro-batches per
process. After training, every rank's recorded rollouts are gathered and rank 0 recomputes, in this one process
(no world), the realised and first-order changes on the gathered batch; rank 0 saves its log_history, the
callback's history and error, the recomputation and every rank's callback error to OUT_PATH (torch.save).

``--fail-rank R --fail-in measure``: rank R's callback raises inside its measurement of step 2 (in on_step_end,
where the peers are in funcprobe's collectives); ``--fail-in step_begin``: in on_step_begin of step 2 (the peers
learn it at that step's on_step_end). Training must go on and finish on every rank.
"""

from __future__ import annotations

import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_trl_callback import Recorder, independent_batch, make_trainer, offline, train  # noqa: E402

from funcprobe import Policy  # noqa: E402
from funcprobe.trl import EntropyChangeCallback  # noqa: E402

STEPS = 3
CONFIG = dict(per_device_train_batch_size=5, gradient_accumulation_steps=2, steps=STEPS, ddp_timeout=120)


def _split_prompts(buffers, step: int) -> int:
    """How many prompts of step ``step`` have completions on more than one process."""
    where: dict[tuple, set] = {}
    for rank, rank_buffers in enumerate(buffers):
        for mb in rank_buffers[step]:
            for r in range(mb["prompt_ids"].shape[0]):
                where.setdefault(tuple(mb["prompt_ids"][r][mb["prompt_mask"][r].bool()].tolist()), set()).add(rank)
    return sum(len(ranks) > 1 for ranks in where.values())


def main() -> int:
    path = sys.argv[1]
    args = sys.argv[2:]
    fail_rank = int(args[args.index("--fail-rank") + 1]) if "--fail-rank" in args else None
    fail_in = args[args.index("--fail-in") + 1] if "--fail-in" in args else "measure"
    trainer = make_trainer(**CONFIG)
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    recorder = Recorder(trainer)
    trainer.add_callback(recorder.callback)
    cb = EntropyChangeCallback(trainer, keep_tensors=True)
    if rank == fail_rank:
        def broken(*a, **k):
            raise RuntimeError(f"injected failure on rank {rank}")

        if fail_in == "measure":
            cb._measure = broken
        else:
            snapshot = cb._snapshot
            cb._snapshot = lambda: broken() if trainer.state.global_step + 1 == 2 else snapshot()
    trainer.add_callback(cb)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(trainer)
    buffers = [None] * world
    dist.all_gather_object(buffers, recorder.buffers)
    errors = [None] * world
    dist.all_gather_object(errors, cb.error)
    steps = [None] * world
    dist.all_gather_object(steps, trainer.state.global_step)
    if rank == 0:
        out = {"world": world, "log_history": trainer.state.log_history, "errors": errors, "steps": steps,
               "step_match_reason": cb.step_match_reason,
               "history": [{k: v for k, v in r.items() if isinstance(v, (int, float, str))} for r in cb.history]}
        if fail_rank is None:
            was_training = trainer.model.training
            policy = Policy.from_peft(trainer.model, temperature=0.8)
            policy.module.eval()
            offline_values = {}
            for step in range(2, STEPS + 1):
                gathered = [mb for rank_buffers in buffers for mb in rank_buffers[step]]
                batch = independent_batch(gathered)
                theta_a, theta_b = recorder.theta[step - 1], recorder.theta[step]
                offline_values[step] = {"B": batch.B, "values": offline(policy, theta_a, theta_b, batch),
                                        "split": _split_prompts(buffers, step)}
            trainer.model.train(was_training)
            out["offline"] = offline_values
        tmp = path + ".tmp"
        torch.save(out, tmp)
        os.replace(tmp, path)
    dist.barrier()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip the interpreter teardown: gloo threads occasionally abort it
