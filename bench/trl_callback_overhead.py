"""The TRL callback's overhead as a fraction of a training step, and where its time goes (issue 18).

    python bench/trl_callback_overhead.py [--steps 4] [-B 8] [--json out.json]

One process, two ``GRPOTrainer`` runs of ``examples/trl_callback.py``'s setting (SmolLM2-135M-Instruct + LoRA r=8,
B prompts × G=4 completions of ≤ 16 tokens, TRL's defaults, the same seed, no checkpoints): first without the
callback (the reference), then with ``EntropyChangeCallback(trainer)``. A timing callback records the wall time of
every optimizer step, ``on_step_begin`` → ``on_step_end`` of the step's last callback (so the callback's own work is
inside the with-callback steps). The callback's parts are timed by wrapping the functions it calls (funcprobe's
``reverse_importance_change``, ``delta_h1_heldout``, ``Policy.token_entropies``, the gradient of ``step_match`` and
the AdamW step of ``update_match``); "other" is the rest of ``overhead_s`` (snapshots of θ and of the optimizer
state, the conversion of TRL's batch). The first step is excluded from the ratio (warm-up; it also has no
measurement to make).

Output: the per-step times of both runs, overhead = (with − without) / without over steps 2…, the callback's mean
``overhead_s`` per step over the same steps, its breakdown, and whether the two runs trained identically (losses).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "examples"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def _timing_callback(times: list[float]):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.started)

    return StepTimer()


def _wrap(owner, name: str, label: str, parts: dict[str, float]):
    original = getattr(owner, name)

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            parts[label] += time.perf_counter() - started

    setattr(owner, name, timed)
    return original


def run(*, steps: int, B: int, callback: bool, parts: dict[str, float]) -> dict:
    import tempfile

    import trl_callback as example

    from funcprobe.trl import EntropyChangeCallback

    out = Path(tempfile.mkdtemp(prefix="funcprobe_overhead_"))
    trainer = example.make_trainer(out, steps=steps, B=B, save=False)
    times: list[float] = []
    cb = None
    if callback:
        cb = EntropyChangeCallback(trainer)
        trainer.add_callback(cb)
    trainer.add_callback(_timing_callback(times))     # last: its on_step_end runs after funcprobe's
    example.train(trainer)
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    overhead = [r["overhead_s"] for r in cb.history] if cb is not None else []
    return {"step_s": times, "losses": losses, "overhead_s": overhead,
            "error": cb.error.splitlines()[0] if cb is not None and cb.error else None}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("-B", type=int, default=8)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    import funcprobe.trl as fp_trl
    from funcprobe import update as fp_update
    from funcprobe import adam as fp_adam
    from funcprobe.policy import Policy

    parts: dict[str, float] = defaultdict(float)
    _wrap(fp_trl, "reverse_importance_change", "realised (two no-grad forwards)", parts)
    _wrap(fp_trl, "delta_h1_heldout", "first order δĤ₁(E) (forward + backward)", parts)
    _wrap(Policy, "token_entropies", "entropy_per_token (a forward, when not shared)", parts)
    _wrap(fp_update, "policy_gradient", "step_match (funcprobe's gradient)", parts)
    _wrap(fp_adam, "adamw_update", "update_match (AdamW step)", parts)

    without = run(steps=args.steps, B=args.B, callback=False, parts=defaultdict(float))
    parts.clear()
    with_cb = run(steps=args.steps, B=args.B, callback=True, parts=parts)
    later = slice(1, None)
    base = statistics.mean(without["step_s"][later])
    probed = statistics.mean(with_cb["step_s"][later])
    callback_s = statistics.mean(with_cb["overhead_s"][later]) if len(with_cb["overhead_s"]) > 1 else float("nan")
    # the parts over all steps; scale to the steps 2… share by the overhead_s totals
    total = sum(with_cb["overhead_s"])
    share = {k: v / total for k, v in parts.items()} if total else {}
    share["other (snapshots, conversion)"] = max(0.0, 1.0 - sum(share.values()))
    result = {
        "steps": args.steps, "B": args.B, "G": 4,
        "step_s_without": without["step_s"], "step_s_with": with_cb["step_s"],
        "mean_step_s_without": base, "mean_step_s_with": probed,
        "overhead_fraction": (probed - base) / base,
        "callback_s_per_step": callback_s, "callback_fraction": callback_s / base,
        "breakdown_share": share,
        "same_losses": without["losses"] == with_cb["losses"],
        "losses_without": without["losses"], "losses_with": with_cb["losses"],
        "callback_error": with_cb["error"],
    }
    print(f"steps 2…{args.steps}: {base:.1f} s per step without the callback, {probed:.1f} s with it: overhead "
          f"{100 * result['overhead_fraction']:.0f} % (the callback's own overhead_s: {callback_s:.1f} s per step, "
          f"{100 * result['callback_fraction']:.0f} %)")
    for label, value in sorted(share.items(), key=lambda kv: -kv[1]):
        print(f"  {100 * value:5.1f} %  {label}")
    print(f"same losses with and without the callback: {result['same_losses']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
