"""The ``funcprobe`` command. The only module that knows about argv, output files and progress-bar enablement."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="funcprobe", description="Predicted (δH₁) and realised (ΔH) entropy "
                                     "change of one AdamW step on a LoRA policy.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the whole probe on a built-in tiny Qwen2 policy (CPU, ~1 min)")
    demo.add_argument("--quick", action="store_true", default=os.environ.get("FUNCPROBE_DEMO_QUICK") == "1",
                      help="a reduced size for CI (also FUNCPROBE_DEMO_QUICK=1)")
    demo.add_argument("--out", default="runs/demo", help="folder for results.json and sweep.png (default %(default)s)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-plot", action="store_true", help="do not write sweep.png")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    progress = False if args.quiet else None  # None: bars only when stderr is a terminal
    try:
        if args.command == "demo":
            from .demo import DemoConfig, run_demo

            config = DemoConfig.quick() if args.quick else DemoConfig()
            run_demo(dataclasses.replace(config, seed=args.seed), out_dir=args.out, plot=not args.no_plot,
                     progress=progress)
        return 0
    except (ValueError, FileNotFoundError) as error:
        print(f"funcprobe: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
