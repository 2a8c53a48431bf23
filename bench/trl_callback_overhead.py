"""The TRL callback's overhead as a fraction of a training step, and where its time goes (issue 18).

    python bench/trl_callback_overhead.py [--steps 4] [-B 8] [--configs match_every=1 ...] [--quick] [--json out.json]

One process, ``GRPOTrainer`` runs of ``examples/trl_callback.py``'s setting (SmolLM2-135M-Instruct + LoRA r=8,
B prompts × G=4 completions of ≤ 16 tokens, TRL's defaults, the same seed, no checkpoints): first without the
callback (the reference), then with ``EntropyChangeCallback(trainer, **config)`` for each ``--configs`` entry (comma-separated
``name=value`` keyword arguments; default: ``match_every=1`` — the callback's defaults —, ``match_every=4`` and
``per_token=False``). A timing callback records the wall time of
every optimizer step, ``on_step_begin`` → ``on_step_end`` of the step's last callback (so the callback's own work is
inside the with-callback steps). The callback's parts are timed by wrapping the functions it calls (funcprobe's
``heldout_pass`` — the held-out pass at θ_b, whose forward also gives θ_b's S and F —, ``heldout_sequence_values``
— the no-grad forward at θ_a —, ``Policy.token_entropies``, the gradient of ``step_match`` and the AdamW step of
``update_match``); "other" is the rest of ``overhead_s`` (snapshots of θ and of the optimizer
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
            parts["calls: " + label] += 1

    setattr(owner, name, timed)
    return original


def run(*, steps: int, B: int, callback: bool, parts: dict[str, float], config: dict | None = None,
        quick: bool = False) -> dict:
    import tempfile

    import trl_callback as example

    from funcprobe.trl import EntropyChangeCallback

    out = Path(tempfile.mkdtemp(prefix="funcprobe_overhead_"))
    sizes = dict(max_new_tokens=8, tiny=True, lr=3e-3) if quick else {}
    trainer = example.make_trainer(out, steps=steps, B=B, save=False, **sizes)
    times: list[float] = []
    cb = None
    if callback:
        cb = EntropyChangeCallback(trainer, **(config or {}))
        trainer.add_callback(cb)
    trainer.add_callback(_timing_callback(times))     # last: its on_step_end runs after funcprobe's
    example.train(trainer)
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    overhead = [r["overhead_s"] for r in cb.history] if cb is not None else []
    return {"step_s": times, "losses": losses, "overhead_s": overhead,
            "error": cb.error.splitlines()[0] if cb is not None and cb.error else None}


def _config(text: str) -> dict:
    """``"match_every=4,per_token=False"`` → {"match_every": 4, "per_token": False}."""
    config = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        config[key.strip()] = {"True": True, "False": False}.get(value.strip(), None)
        if config[key.strip()] is None:
            config[key.strip()] = int(value)
    return config


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("-B", type=int, default=8)
    parser.add_argument("--configs", nargs="+", default=["match_every=1", "match_every=4", "per_token=False"],
                        help="callback keyword arguments per run, e.g. match_every=4,per_token=False")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny random Qwen2 instead of SmolLM2 (seconds; for the smoke test, not a measurement)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    from funcprobe import heldout as fp_heldout
    from funcprobe import update as fp_update
    from funcprobe import adam as fp_adam
    from funcprobe.policy import Policy

    parts: dict[str, float] = defaultdict(float)
    _wrap(fp_heldout, "heldout_pass", "held-out pass at θ_b (a forward, a backward per unit; gives θ_b's S, F)", parts)
    _wrap(fp_heldout, "heldout_sequence_values", "realised: the no-grad forward at θ_a", parts)
    _wrap(Policy, "token_entropies", "entropy_per_token (a forward, when not shared)", parts)
    _wrap(fp_update, "policy_gradient", "step_match (funcprobe's gradient)", parts)
    _wrap(fp_adam, "adamw_update", "update_match (AdamW step)", parts)

    without = run(steps=args.steps, B=args.B, callback=False, parts=defaultdict(float), quick=args.quick)
    later = slice(1, None)
    base = statistics.mean(without["step_s"][later])
    result = {"steps": args.steps, "B": args.B, "G": 4, "step_s_without": without["step_s"],
              "mean_step_s_without": base, "losses_without": without["losses"], "runs": {}}
    print(f"steps 2…{args.steps}: {base:.1f} s per step without the callback")
    for name in args.configs:
        parts.clear()
        with_cb = run(steps=args.steps, B=args.B, callback=True, parts=parts, config=_config(name),
                      quick=args.quick)
        probed = statistics.mean(with_cb["step_s"][later])
        callback_s = statistics.mean(with_cb["overhead_s"][later]) if len(with_cb["overhead_s"]) > 1 else float("nan")
        total = sum(with_cb["overhead_s"])  # the parts over all steps, as shares of the callback's total
        share = {k: v / total for k, v in parts.items() if not k.startswith("calls: ")} if total else {}
        share["other (snapshots, conversion)"] = max(0.0, 1.0 - sum(share.values()))
        calls = {k.removeprefix("calls: "): int(v) for k, v in parts.items() if k.startswith("calls: ")}
        result["runs"][name] = {
            "step_s_with": with_cb["step_s"], "mean_step_s_with": probed,
            "overhead_fraction": (probed - base) / base,
            "callback_s_per_step": callback_s, "callback_fraction": callback_s / base,
            "breakdown_share": share, "calls": calls, "same_losses": without["losses"] == with_cb["losses"],
            "losses_with": with_cb["losses"], "callback_error": with_cb["error"]}
        print(f"{name}: {probed:.1f} s per step with the callback: overhead "
              f"{100 * (probed - base) / base:.0f} % (the callback's own overhead_s: {callback_s:.1f} s per step, "
              f"{100 * callback_s / base:.0f} %)")
        for label, value in sorted(share.items(), key=lambda kv: -kv[1]):
            print(f"  {100 * value:5.1f} %  {label}")
        print(f"  same losses with and without the callback: {without['losses'] == with_cb['losses']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
