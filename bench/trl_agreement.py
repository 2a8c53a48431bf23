"""funcprobe's step against TRL's ``GRPOTrainer`` step: the table of relative differences behind tests/test_trl.py.

    python bench/trl_agreement.py                  # 24 float64 settings + 4 float32 ones (about a minute)
    python bench/trl_agreement.py --json out.json

For loss_type ∈ {grpo, bnpo, dr_grpo, dapo} × scale_rewards ∈ {group, batch, none} × β ∈ {0, 0.04}, TRL 1.16's own
``trainer.train()`` takes one optimizer step on injected completions (tests/trl_harness.py: only generation is
replaced), and tests/test_trl.py's ``compare`` checks funcprobe against it, returning:

* ``adv``: max |A_funcprobe − A_TRL| / max |A_TRL| (advantages, canonical row order);
* ``grad``: max |∇ℒ_funcprobe − ∇ℒ_TRL| / max |∇ℒ_TRL| over every LoRA entry (funcprobe's −Ȳ; TRL's gradient before
  clipping); ``grad_l2``: the same as a ratio of L2 norms;
* ``optimizer``: funcprobe's clip + AdamW applied to TRL's gradient against TRL's θ⁺ − θ (max-relative);
* ``update`` / ``update_l2``: funcprobe's ``rl_update`` end to end against TRL's θ⁺ − θ.

The same comparison on a float32 model (TRL's realistic dtype; β = 0.04, group scaling) adds ``trl32_vs_f64``: TRL's
float32 gradient against funcprobe's float64 one on the same weights. Every row also passes the test's assertions
(1e-6 on float64, 5e-6 on float32, and the elementwise AdamW bound for the update); a row that does not is marked.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402

import test_trl as t  # noqa: E402  (the test module: its harness, data and comparison)

COLUMNS = ("adv", "grad", "grad_l2", "optimizer", "update", "update_l2")


def measure(loss_type: str, beta: float, scale_rewards: str, dtype: torch.dtype) -> dict:
    """One TRL step and its comparison; the test's float32 extra for a float32 model."""
    h = t.harness(loss_type, beta, dtype)
    step = h.step(scale_rewards=scale_rewards)
    objective = t.objective_for_config(h.args)
    tol = t.TOL if dtype == torch.float64 else 5e-6
    row = dict(loss_type=loss_type, scale_rewards=scale_rewards, beta=beta, tau=t.TEMPERATURE[loss_type],
               dtype=str(dtype).replace("torch.", ""))
    try:
        row.update(t.compare(step, objective, t.policy_of(h), grad_tol=tol), passed=True)
    except AssertionError as error:
        row.update(passed=False, error=str(error)[:300])
        return row
    if dtype == torch.float32:
        policy64 = t.policy_of(t.harness(loss_type, beta))
        batch = t.rollout_batch(step.prompt_ids, step.completion_ids, step.advantages.double(),
                                temperature=policy64.temperature)
        _, ybar = t.policy_gradient({n: p.double() for n, p in step.params_before.items()}, batch, policy=policy64,
                                    objective=objective)
        row["trl32_vs_f64"] = t.rel_max(step.grad, {n: -v for n, v in ybar.items()})
    return row


def table(rows: list[dict]) -> str:
    head = "| dtype | loss_type | scale_rewards | β | τ | " + " | ".join(COLUMNS) + " | TRL f32 vs f64 | passes |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        values = " | ".join(f"{r[c]:.1e}" if c in r else "–" for c in COLUMNS)
        extra = f"{r['trl32_vs_f64']:.1e}" if "trl32_vs_f64" in r else "–"
        lines.append(f"| {r['dtype']} | {r['loss_type']} | {r['scale_rewards']} | {r['beta']:g} | {r['tau']:g} | "
                     f"{values} | {extra} | {'yes' if r['passed'] else 'NO: ' + r['error']} |")
    worst = {c: max(r[c] for r in rows if c in r and r["dtype"] == "float64") for c in COLUMNS}
    lines.append("")
    lines.append("- worst over the 24 float64 settings: " + ", ".join(f"{c} {v:.1e}" for c, v in worst.items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    import trl

    started = time.perf_counter()
    rows = [measure(loss, beta, scale, torch.float64) for loss in t.LOSS_TYPES for beta in t.BETAS
            for scale in t.SCALES]
    rows += [measure(loss, 0.04, "group", torch.float32) for loss in t.LOSS_TYPES]
    print(table(rows))
    print(f"- trl {trl.__version__}, torch {torch.__version__}; {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
