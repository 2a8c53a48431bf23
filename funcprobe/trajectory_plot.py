"""The trajectory's plot: :func:`plot_trajectory` (a ``Trajectory``, or its JSON read back, → a PNG).

Two panels over the training step N (shared x axis):

1. the entropy per token on the evaluation set, Ĥ_tok(θ_N) ± 1.96 SE (a band), on the same axis as TRL's logged
   ``entropy`` (also per token). TRL's row s is drawn at x = s − 1: its rollouts were drawn at θ_{s−1}, before step
   s, so at that x it is an entropy of the same parameters (on the trainer's prompts and draws, not E's);
2. the change per optimizer step, nats per response (spec §6 and §9's unit): the paired change between consecutive
   checkpoints (common random numbers; hollow where its verdict says few draws changed) and the first-order change
   along the step really taken, both divided by the steps between the checkpoints; the importance-sampling check
   where its weights are reliable; each checkpoint's prediction δĤ₁(E) of its next step (one step, at x = N + ½); and
   the TRL callback's realised change on the trainer's rollouts. Error bars ±1.96 SE.

The entropy per response (and every number drawn) is in the JSON; the plot is for reading the run at a glance.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

__all__ = ["plot_trajectory"]

#: Normal quantile of the drawn bands and bars: ±1.96 SE, a 95 % interval.
Z = 1.96


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _errorbar(ax, xs, ys, ses, *, scale, **style) -> None:
    """Points with ±Z·SE bars, skipping missing values; ``scale`` divides each (the steps between checkpoints)."""
    points = [(x, y / s, (Z * e / s) if _finite(e) else 0.0) for x, y, e, s in zip(xs, ys, ses, scale) if _finite(y)]
    if points:
        x, y, e = zip(*points)
        ax.errorbar(x, y, yerr=e, **{"capsize": 3, "ms": 6, "lw": 0, "elinewidth": 1.2, **style})


def plot_trajectory(result: Any, path: str | os.PathLike) -> str:
    """Draw the trajectory (module docstring) and save it to ``path``; returns the path.

    ``result``: a :class:`~funcprobe.trajectory.Trajectory` or its ``to_dict()`` (e.g. the command's results JSON
    read back). Needs matplotlib (``pip install matplotlib``); raises ImportError without it, ValueError for
    something that is not a trajectory.
    """
    data = result.to_dict() if hasattr(result, "to_dict") else result
    if not isinstance(data, Mapping) or data.get("command") != "trajectory" or not data.get("checkpoints"):
        raise ValueError("plot_trajectory takes the result of funcprobe.trajectory (or its to_dict(), the JSON "
                         "that `funcprobe trajectory --out` writes).")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError as error:
        raise ImportError("plot_trajectory needs matplotlib, which funcprobe does not install by default: "
                          "pip install matplotlib") from error
    points, changes = data["checkpoints"], data.get("changes") or []
    steps = [p["step"] for p in points]
    gaps = [b - a for a, b in zip(steps, steps[1:])] or [1]
    offset = 0.09 * min(gaps)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9.5, 8.5), sharex=True,
                                      gridspec_kw={"height_ratios": [1.0, 1.2]})
    ev = data["evaluation"]

    _entropy_panel(top, steps, [p["entropy_per_token"] for p in points],
                   [p["entropy_per_token_se"] for p in points], color="C0",
                   label=f"Ĥ per token on the evaluation set (B={ev['B']}×G={ev['G']}, the same draws at each "
                         f"checkpoint), ±{Z} SE")
    trl = (data.get("trl_history") or {}).get("entropy") or []
    trl = [(s - 1, v) for s, v in trl if _finite(v)]
    if trl:
        top.plot([x for x, _ in trl], [v for _, v in trl], "-", color="C1", lw=1.3, marker=".", ms=6,
                 label="TRL's logged entropy on its own rollouts: row s at x = s−1 (they were drawn at θₛ₋₁)")
    top.set_ylabel("entropy (nats/token)")
    top.set_title("entropy per token (masked mean over completion tokens of the entropy of logits/τ)", fontsize=10)

    _change_panel(bottom, points, changes, data, offset)
    bottom.set_xlabel("training step N (checkpoint-N)")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=12))
    for ax in (top, bottom):
        ax.grid(alpha=0.25)
        ax.yaxis.set_major_locator(MaxNLocator(nbins=6))
    top.legend(fontsize=7.5, loc="best", framealpha=0.85)
    fig.suptitle(f"entropy along the run {os.path.basename(os.path.normpath(data.get('run_dir', '')))} — "
                 f"{len(points)} checkpoints, the same evaluation draws at each (seed {ev['seed']})", fontsize=11)
    fig.tight_layout()
    # Below the last panel, after the layout (which would squeeze the axes around it): the change panel's points sit
    # near 0, where a legend inside would cover them.
    bottom.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.0, -0.16), ncol=1, frameon=False)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return os.fspath(path)


def _entropy_panel(ax, steps, values, ses, *, color, label) -> None:
    shown = [(s, v, e if _finite(e) else 0.0) for s, v, e in zip(steps, values, ses) if _finite(v)]
    if not shown:
        return
    x, y, e = zip(*shown)
    ax.plot(x, y, "-o", color=color, ms=4, lw=1.5, label=label)
    ax.fill_between(x, [v - Z * h for v, h in zip(y, e)], [v + Z * h for v, h in zip(y, e)], color=color, alpha=0.2,
                    lw=0)


def _change_panel(ax, points, changes, data, offset) -> None:
    """Panel 2: per optimizer step, nats per response (module docstring)."""
    mids = [(c["from_step"] + c["to_step"]) / 2 for c in changes]
    per = [max(c["steps"], 1) for c in changes]
    for reliable, face in ((True, None), (False, "none")):
        chosen = [i for i, c in enumerate(changes) if bool(c["realised"]["reliable"]) == reliable]
        if chosen:
            _errorbar(ax, [mids[i] - offset for i in chosen], [changes[i]["realised"]["deltaH"] for i in chosen],
                      [changes[i]["realised"]["se"] for i in chosen], scale=[per[i] for i in chosen], fmt="s",
                      color="C0", mfc=face,
                      label="ΔĤ between checkpoints (paired, common random numbers), ÷ steps"
                            + ("" if reliable else "; hollow: few draws changed, SE may be low"))
    _errorbar(ax, mids, [c["first_order"]["deltaH1"] for c in changes], [c["first_order"]["se"] for c in changes],
              scale=per, fmt="D", color="C3", label="first order ∇Ĥ·(θₖ₊₁ − θₖ): the step really taken, ÷ steps")
    _errorbar(ax, [m + offset for m in mids], [c["importance"]["deltaH"] for c in changes],
              [c["importance"]["se"] for c in changes], scale=per, fmt="o", color="C2", ms=4,
              label="importance-sampling check, ÷ steps (where its weights are reliable)")
    predicted = [(p["step"] + 0.5, p["prediction"]["deltaH1"], p["prediction"]["se"]) for p in points
                 if p.get("prediction")]
    if predicted:
        x, y, e = zip(*predicted)
        _errorbar(ax, [v + 2 * offset for v in x], y, e, scale=[1] * len(x), fmt="^", color="C1",
                  label="predicted next step δĤ₁(E) from checkpoint-N's optimizer state (one step, at N + ½)")
    trl = [(row["row"], row) for c in changes for row in c.get("trl_callback") or []]
    rows = [((r.get("entropy_change/first_step", s - 1) - 1 + r.get("entropy_change/last_step", s - 1)) / 2,
             r.get("entropy_change/realised"), r.get("entropy_change/realised_se"),
             r.get("entropy_change/last_step", s - 1) - r.get("entropy_change/first_step", s - 1) + 1)
            for s, r in trl]
    if rows:
        _errorbar(ax, [x - 2 * offset for x, *_ in rows], [y for _, y, _, _ in rows], [e for _, _, e, _ in rows],
                  scale=[max(n, 1) for *_, n in rows], fmt="x", color="C4",
                  label="TRL callback's realised change (the trainer's rollouts), ÷ steps")
    ax.axhline(0.0, color="0.5", lw=0.8)
    ax.set_ylabel("change per step (nats/response)")
    ax.set_title("the change per optimizer step beside its first-order values", fontsize=10)
