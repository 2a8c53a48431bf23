"""The ``funcprobe`` command. The only module that knows about argv, output files and progress-bar enablement: it
turns argv into a ``ProbeConfig`` (:func:`probe_config_from_args`), runs ``funcprobe.pipeline``, prints and writes.

    funcprobe demo                                a short real GRPO run on SmolLM2-135M-Instruct + LoRA, then
                                                  the probe of its checkpoint (minutes on 2 CPU cores)
    funcprobe demo --quick                        the whole probe on a built-in tiny random Qwen2 policy (seconds)
    funcprobe probe CHECKPOINT [options]          δĤ₁(E), δH₁ and ΔH of the next AdamW step of a LoRA checkpoint
    funcprobe attribute CHECKPOINT [options]      which tokens drive δĤ₁(E); proxies and token-selection interventions
    funcprobe trajectory RUN_DIR [options]        the entropy at every checkpoint of a run on one evaluation set,
                                                  each next step's δĤ₁(E), the paired change between checkpoints

Bad inputs (a missing checkpoint, a corrupt optimizer.pt, a bad prompts line, …) end with one line on stderr and exit
status 2; argparse's own usage errors also exit 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import sys
import time
import warnings
from pathlib import Path

from .objective import LOSS_TYPES, SCALE_REWARDS
from .probe_config import (BatchConfig, ComputeConfig, EstimateConfig, OutputConfig, ProbeConfig, StepConfig,
                           derive_seed, draw_eval_prompts, select_prompts, settle_sizes)

__all__ = ["main", "parse_args", "probe_config_from_args", "select_prompts", "draw_eval_prompts", "derive_seed",
           "parse_etas", "parse_units", "parse_interventions", "parse_quantiles"]

#: Errors that mean "bad input" (one line on stderr, exit status 2); anything else keeps its traceback.
#: OSError: a user's file or folder that cannot be read or written (permissions, a folder for a file, a full disk).
USER_ERRORS = (ValueError, OSError, ImportError, KeyError)

DTYPES = ("float32", "bfloat16", "float64")


#: A number as float() reads it, without its sign: 1, 1.5, .5, 1e-3, inf, nan.
_UNSIGNED = r"(?:(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?|inf(?:inity)?|nan)"


class _Parser(argparse.ArgumentParser):
    """argparse's parser, but a value that starts with '-' and is a number in any form Python's float() reads —
    scientific notation (-1e-3), -inf, a comma list (--eta-sweep -1e-3,1e-3) — is taken as a value, not as an
    unknown option: argparse's own negative-number matcher knows only -1 and -0.5, so ``--lr -1e-3`` got "expected one
    argument" instead of the check's "--lr must be finite and > 0". No option of funcprobe looks like a number, so
    nothing else changes. Subparsers are made with the parser's own class (add_subparsers' default), so they get it
    too."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(rf"^-{_UNSIGNED}(?:,[+-]?{_UNSIGNED})*$",
                                                  re.IGNORECASE)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="funcprobe", description="First-order (δĤ₁(E), and the U-statistic "
                                     "δH₁) and realised (ΔH) entropy change of one AdamW step on a LoRA policy.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a few real GRPO steps on SmolLM2-135M-Instruct + LoRA, save the "
                               "checkpoint and probe it (CPU, minutes); --quick: a tiny random model (seconds)")
    demo.add_argument("--quick", action="store_true", default=os.environ.get("FUNCPROBE_DEMO_QUICK") == "1",
                      help="the tiny demo instead: a built-in random Qwen2 policy at a CI size, no model files (also "
                      "FUNCPROBE_DEMO_QUICK=1)")
    demo.add_argument("--out", default="runs/demo", help="folder for the training run (run/), results.json and "
                      "sweep.png (default %(default)s)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-plot", action="store_true", help="do not write sweep.png")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_probe_parser(commands)
    _add_attribute_parser(commands)
    _add_probe_parser(
        commands, "trajectory", help="the entropy at every checkpoint of a training run on one evaluation set, the "
        "predicted change of each next step and the paired change between checkpoints (spec §6, §9)",
        description="For a training run's output folder holding checkpoint-N/ folders: sample one evaluation set "
                    "(the same prompts and random streams at every checkpoint, so that checkpoints are compared "
                    "paired), report each checkpoint's entropy (nats per response and per token) with its SE, the "
                    "first-order change δĤ₁(E) of the AdamW step its optimizer state predicts (as `probe` does), "
                    "and between consecutive checkpoints the paired change, the first-order change along the step "
                    "really taken and an importance-sampling check — beside the entropy TRL logged.")
    return parser


def _add_attribute_parser(commands) -> None:
    attribute = _add_probe_parser(
        commands, "attribute", help="which tokens of the update batch drive δĤ₁(E), and what token-selection "
        "interventions would do (spec §8)",
        description="Load a checkpoint and sample the update and evaluation batches exactly as `probe` does, then "
                    "attribute the held-out first-order change δĤ₁(E)'s gradient term (∇H from the evaluation batch) "
                    "to the update batch's tokens, compare it with the covariance proxy (Cui et al. 2025) and the "
                    "next-token entropy, and report each intervention's δĤ₁(E), realised ΔH on the evaluation batch "
                    "(paired with it, with ESS, k̂ and reliability), and first-order objective gain. The model is "
                    "loaded as the trainer loads it; forward-mode passes switch to eager attention for their "
                    "duration.")
    group = attribute.add_argument_group("attribution")
    group.add_argument("--intervention", action="append", default=None, metavar="SPEC",
                       help="repeatable: clip_cov[:q] (drop the top-q tokens by covariance), high_entropy[:q] (keep "
                       "only the top-q by entropy), positive_only (drop negative-advantage sequences) (default: "
                       "clip_cov:0.002, clip_cov:0.02, high_entropy:0.2, positive_only)")
    group.add_argument("--quantiles", default="0.002,0.02,0.2", metavar="Q,Q,...",
                       help="top-q fractions of the ranking summaries (default %(default)s)")
    group.add_argument("--html", default=None, metavar="PAGE.html",
                       help="write a self-contained page: the summary, the interventions and every response token "
                       "coloured by its attribution")
    group.add_argument("--plot", default=None, metavar="PLOT.png",
                       help="write the scatter of each token's attribution against the covariance proxy and the "
                       "next-token entropy (needs matplotlib)")


DEFAULT_INTERVENTIONS = ("clip_cov:0.002", "clip_cov:0.02", "high_entropy:0.2", "positive_only")


def parse_interventions(specs) -> dict:
    """{"clip_cov:0.02": ("clip_cov", 0.02), "positive_only": "positive_only", ...} from --intervention values."""
    out = {}
    for spec in specs:
        kind, _, q = spec.partition(":")
        if kind not in ("clip_cov", "high_entropy", "positive_only"):
            raise ValueError(f"--intervention {spec!r}: the kind must be clip_cov, high_entropy or positive_only.")
        if kind == "positive_only":
            if q:
                raise ValueError(f"--intervention {spec!r}: positive_only takes no fraction.")
            out[spec] = kind
            continue
        try:
            value = float(q) if q else None
        except ValueError:
            raise ValueError(f"--intervention {spec!r}: the fraction after ':' must be a number in (0, 1].") from None
        if value is not None and not 0 < value <= 1:
            raise ValueError(f"--intervention {spec!r}: the fraction must be in (0, 1]; got {value}.")
        out[spec] = kind if value is None else (kind, value)
    return out


def parse_quantiles(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--quantiles must be comma-separated numbers in (0, 1], e.g. 0.002,0.02,0.2; "
                         f"got {text!r}.") from None
    if not values or any(not 0 < q <= 1 for q in values):
        raise ValueError(f"--quantiles must be numbers in (0, 1]; got {text!r}.")
    return values


def _add_probe_parser(commands, name: str = "probe", **parser_text) -> argparse.ArgumentParser:
    """The ``probe`` subcommand's parser; ``name="attribute"`` reuses its loading, batch, step and compute options
    (the probe-only ones — the realised estimator, --in-sample, --eta-sweep, --plot — are left out)."""
    parser_text = parser_text or dict(
        help="δĤ₁(E), δH₁ and ΔH of the next AdamW step of a LoRA checkpoint",
        description="Load a LoRA training checkpoint (policy + AdamW state), sample an update batch of B prompts × G "
                    "responses from it, and report the first-order entropy change of the AdamW step on that batch — "
                    "δĤ₁(E), with ∇H from an evaluation batch drawn independently of it, and the U-statistic δH₁ "
                    "on the update batch — beside the realised change (ΔH) measured on the evaluation batch.")
    only_probe = name == "probe"
    run = name == "trajectory"
    probe = commands.add_parser(name, **parser_text)
    if run:
        probe.add_argument("checkpoint", metavar="RUN_DIR", help="a training run's output folder holding "
                           "checkpoint-N/ folders (the PEFT adapter; optimizer.pt and trainer_state.json where the "
                           "trainer saved them)")
    else:
        probe.add_argument("checkpoint", help="an HF Trainer checkpoint-N/ folder, a run folder holding "
                           "checkpoint-N/ (the latest is taken), a folder with model/ + optimizer.pt, or a bare "
                           "adapter (with --optimizer)")
    data = probe.add_argument_group("batch")
    data.add_argument("--prompts", help="JSONL, one prompt per line: {\"prompt\": \"text\", ...} or TRL's "
                      "conversational {\"prompt\": [{\"role\": ..., \"content\": ...}], ...}; other keys are dataset "
                      "columns passed to the reward (default: the checkpoint's prompts.jsonl, in its folder or the "
                      "folder above)")
    data.add_argument("--chat-template", default="auto", choices=("auto", "on", "off"),
                      help="render prompts with the tokenizer's chat template and add_generation_prompt, as TRL does: "
                      "auto (conversational prompts only), on (plain text too, as one user message), off (default "
                      "%(default)s)")
    if not run:
        data.add_argument("--rollouts", default=None, metavar="FILE.jsonl",
                          help="build the update batch from the trainer's logged rollouts (one prompt per line with "
                          "its completions and rewards) instead of sampling it; the evaluation batch is still sampled")
    data.add_argument("-B", "--prompts-per-batch", dest="B", type=int, default=None,
                      help="prompts in the update batch (default: the trainer config's prompts per step, else 16)")
    data.add_argument("-G", "--group-size", dest="G", type=int, default=None,
                      help="responses per prompt (default: the trainer config's num_generations, else 8)")
    data.add_argument("--max-new-tokens", type=int, default=None, help="generation budget (default: the trainer "
                      "config's max_completion_length, else 100)")
    data.add_argument("--reward", action="append", default=None, metavar="SPEC",
                      help="a reward function, repeatable: a built-in ('answer': the last number equals the answer "
                      "column; 'tag': the <answer>…</answer> format reward), 'module:function' or "
                      "'path/to/file.py:function' with TRL's signature f(prompts, completions, **kwargs) -> list of "
                      "floats (default answer)")
    data.add_argument("--reward-weights", default=None, metavar="W,W,...",
                      help="weights of the --reward functions, summed as TRL sums them (default: the trainer "
                      "config's reward_weights, else 1 each)")
    data.add_argument("--seed", type=int, default=0, help="seeds the prompt choice and the sampling "
                      "(default %(default)s)")
    data.add_argument("--replace", action="store_true", help="draw the B prompts with replacement (needed when B "
                      "exceeds the number of prompts)")
    data.add_argument("--temperature", type=float, default=None, help="sampling temperature τ; the policy's "
                      "log-probabilities and entropies use the same τ (default 1)")
    data.add_argument("--top-p", type=float, default=1.0, help="must stay 1: truncated sampling is refused "
                      "(docs/estimators.md)")
    data.add_argument("--stop-token", type=int, action="append", default=None, metavar="ID",
                      help="another token id that ends a response (repeatable); always added: the tokenizer's EOS and "
                      "the model's generation_config eos ids")
    evaluation = probe.add_argument_group("realised change (on an evaluation batch drawn independently of the "
                                          "update batch)")
    evaluation.add_argument("--eval-B", dest="eval_B", type=int, default=None,
                            help="prompts in the evaluation batch, drawn from the pool with replacement, "
                            "independently of the update batch's (default: -B)")
    evaluation.add_argument("--eval-G", dest="eval_G", type=int, default=None,
                            help="responses per evaluation prompt (default: -G)")
    evaluation.add_argument("--eval-seed", type=int, default=None,
                            help="seeds the evaluation prompts and responses (default: derived from --seed; must "
                            "differ from --seed)")
    if only_probe:
        evaluation.add_argument("--realised", choices=("snis", "crn", "both"), default="snis",
                            help="estimator of the realised change: importance sampling with the Rao-Blackwell "
                            "integrand (snis), common random numbers (crn), or both; the README says why snis is the "
                            "default and when to use crn (default %(default)s)")
    evaluation.add_argument("--integrand", choices=("rao_blackwell", "sequence"), default="rao_blackwell",
                            help="integrand of δĤ₁(E), the first-order change with ∇H from the evaluation batch: the "
                            "entropy still to come after each token (rao_blackwell, lower variance) or the sequence "
                            "log-probability (sequence) (default %(default)s)")
    if only_probe:
        evaluation.add_argument("--in-sample", action="store_true",
                            help="also report importance sampling on the update batch itself: a biased diagnostic "
                            "(it carries the same-sample term δH₁ removes), labelled as such")
    step = probe.add_argument_group("step (the trainer's own settings: --trainer-config; flags win over it)")
    step.add_argument("--trainer-config", default=None, metavar="FILE",
                      help="a JSON or YAML file of the run's TRL GRPOConfig fields (loss_type, beta, scale_rewards, "
                      "num_generations, max_completion_length, temperature, max_grad_norm, …); missing fields take "
                      "TRL's defaults" + (" (default: RUN_DIR/trainer_config.json when the run folder holds one)"
                                          if run else ""))
    step.add_argument("--trust-training-args", action="store_true",
                      help="read the checkpoint's training_args.bin (a pickle: loading it runs code from the file)")
    step.add_argument("--lr", type=float, default=None, help="learning rate of the step (default: the optimizer "
                      "state's)")
    step.add_argument("--max-grad-norm", type=float, default=None, help="clip the gradient's global norm as the "
                      "trainer did (default: the trainer config's, which is 1.0 when the file does not say, as in HF and "
                      "TRL; without a config no clipping; 0 or less: none)")
    step.add_argument("--loss-type", default=None, metavar="{" + ",".join(LOSS_TYPES) + "}",
                      help="the trainer's loss aggregation, by TRL's names (default: the trainer config's, else dr_grpo; TRL's "
                      "default is dapo)")
    step.add_argument("--beta", type=float, default=None, help="the KL coefficient β to the base model (default: the trainer "
                      "config's, else 0)")
    step.add_argument("--no-kl-bias-correction", dest="kl_bias_correction", action="store_false", default=None,
                      help="the plain k3 KL gradient κ = 1 − exp(ℓ_ref − ℓ), as TRL with use_bias_correction_kl=False "
                      "or verl's low_var_kl (default: TRL's bias-corrected κ = ℓ − ℓ_ref)")
    step.add_argument("--scale-rewards", default=None, metavar="{" + ",".join(SCALE_REWARDS) + "}",
                      help="advantages: rewards minus the group mean, divided by the group's std + 1e-4 ('group', "
                      "TRL's default), the batch's ('batch'), or not ('none', Dr. GRPO) (default: the trainer config's, else "
                      "none)")
    step.add_argument("--epsilon-high", type=float, default=None, help="CISPO's ε_high (default 0.2, TRL's)")
    if not run:
        step.add_argument("--units", default="prompt", help="δH₁ units: 'prompt' (U = B) or an integer M (M blocks "
                          "of prompts) (default %(default)s)")
    if only_probe:
        step.add_argument("--eta-sweep", default=None, metavar="ETA,ETA,...",
                      help="also estimate ΔH(η) at these learning rates, e.g. 1e-6,3e-6,1e-5")
    compute = probe.add_argument_group("compute")
    compute.add_argument("--device", default="cpu", help="cpu or cuda (or cuda:N) (default %(default)s)")
    compute.add_argument("--dtype", default="float32", choices=DTYPES, help="model dtype (default %(default)s)")
    compute.add_argument("--logsoftmax-dtype", default=None, choices=("float32", "float64"),
                         help="dtype of the log-softmax over the vocabulary (default: float32, or float64 for a "
                         "float64 model)")
    compute.add_argument("--seq-chunk", type=int, default=None, help="sequences per forward (default 8)")
    compute.add_argument("--token-chunk", type=int, default=None, help="response rows per vocabulary chunk "
                         "(default 512)")
    compute.add_argument("--memory-budget", default=None, metavar="SIZE",
                         help="memory the probe may use, e.g. 40GB, 16GiB, 512MB (device memory on CUDA, process "
                         "memory above the imports on the CPU): chunk sizes and the store mode are planned to fit it, "
                         "or the run is refused before sampling; explicit --seq-chunk/--token-chunk win")
    compute.add_argument("--base", default=None, help="base model (hub id or folder) when the checkpoint does not "
                         "name a usable one")
    if not run:
        compute.add_argument("--optimizer", default=None, help="the optimizer.pt, when it is not in the checkpoint "
                             "folder")
    output = probe.add_argument_group("output")
    output.add_argument("--out", default=None, help="write the results as JSON here")
    if only_probe:
        output.add_argument("--plot", default=None, help="write the learning-rate sweep's plot here (needs "
                        "--eta-sweep and matplotlib)")
    if run:
        output.add_argument("--plot", default=None, metavar="PLOT.png", help="write the trajectory's plot here: "
                            "the entropy over steps beside TRL's logged entropy, and the change per step beside its "
                            "first-order values (needs matplotlib)")
    output.add_argument("--quiet", action="store_true", help="no progress bars (also off when stderr is not a "
                        "terminal)")
    output.add_argument("-v", "--verbose", action="store_true", help="log each stage, and print the full δH₁ "
                        "and ΔH tables")
    if not run:
        output.add_argument("--dist-timeout", type=float, default=300.0, help="under torchrun: seconds a "
                            "collective may wait before the run fails (a rank that died or hangs) (default "
                            "%(default)s)")
    if run:
        probe.set_defaults(realised="snis", in_sample=False, eta_sweep=None, rollouts=None, units="prompt",
                           optimizer=None, dist_timeout=300.0)
    elif not only_probe:
        probe.set_defaults(realised="snis", in_sample=False, eta_sweep=None, plot=None)
    return probe


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line parsed as ``main`` parses it (e.g. ``parse_args(["probe", CHECKPOINT, "-B", "8"])`` for
    :func:`run_probe`)."""
    return _parser().parse_args(argv)


# ------------------------------------------------------------------------------------------------ argument checks
def parse_etas(text: str) -> list[float]:
    """``"1e-6,3e-6,1e-5"`` → [1e-6, 3e-6, 1e-5]; ValueError unless every entry is a finite number > 0."""
    parts = [part.strip() for part in str(text).split(",")]
    if not parts or any(not part for part in parts):
        raise ValueError(f"--eta-sweep must be a comma-separated list of learning rates like 1e-6,3e-6,1e-5; "
                         f"got {text!r}.")
    values = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"--eta-sweep: {part!r} is not a number; pass learning rates like "
                             "1e-6,3e-6,1e-5.") from None
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"--eta-sweep: every learning rate must be finite and > 0; got {part!r}.")
        values.append(value)
    return values


def parse_units(text: str) -> str | int:
    """``"prompt"`` or an integer M ≥ 2 (the number of prompt blocks)."""
    if text == "prompt":
        return "prompt"
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"--units must be 'prompt' or an integer number of blocks M ≥ 2; got {text!r}.") from None
    if value < 2:
        raise ValueError(f"--units M must be ≥ 2 (δH₁ is a cross-unit U-statistic); got {value}.")
    return value


def _trainer_config(args: argparse.Namespace):
    """The run's settings (``TrainerSettings``) from --trainer-config, or the checkpoint's training_args.bin with
    --trust-training-args; None when neither is given."""
    from .trainer_config import read_trainer_config, read_training_args, trainer_settings

    # A trajectory still measures the entropy of a run whose step funcprobe cannot reproduce (the refusal is kept in
    # the settings' ``unsupported``: no predictions); the probe refuses it.
    check = getattr(args, "command", "probe") != "trajectory"
    if args.trainer_config is not None:
        return trainer_settings(read_trainer_config(args.trainer_config), source=args.trainer_config, check=check)
    if not args.trust_training_args:
        return None
    folder = Path(args.checkpoint)
    candidates = sorted((p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                        key=lambda p: int(p.name.split("-")[-1]), reverse=True) + [folder]
    for candidate in candidates:
        config = read_training_args(candidate, trust=True)
        if config is None:
            continue
        where = str(candidate / "training_args.bin")
        if "num_generations" not in config:
            raise ValueError(f"{where} holds the arguments of a trainer other than TRL's GRPOTrainer (no "
                             "num_generations field), so it does not say how the step's loss was formed; pass the "
                             "step's settings as flags (--loss-type, --beta, --scale-rewards, --max-grad-norm, -G) or "
                             "--trainer-config FILE.")
        return trainer_settings(config, source=where, check=check)
    raise ValueError(f"--trust-training-args: there is no training_args.bin in {folder} or its checkpoint-N folders; "
                     "pass --trainer-config FILE instead.")


def _settle(args: argparse.Namespace) -> tuple[dict, dict, object, object]:
    """Settle B, G, the budget, τ and the objective: a flag, else the run's config (--trainer-config), else
    funcprobe's defaults. Returns (sizes, sources: where each came from, the trainer settings, the objective)."""
    settings = _trainer_config(args)
    sizes, sources = settle_sizes(settings, B=args.B, G=args.G, max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature)
    objective = _objective_from_args(args, None if settings is None else settings.objective, sources)
    return sizes, sources, settings, objective


def _objective_from_args(args: argparse.Namespace, base=None, sources: dict | None = None):
    """The step's Objective: ``base`` (the run's config) or funcprobe's defaults (Dr. GRPO, no KL, no clipping,
    rewards not scaled), with every flag given applied over it."""
    from .objective import Objective

    sources = {} if sources is None else sources
    settings = {}
    if args.loss_type is not None and args.loss_type not in LOSS_TYPES:
        raise ValueError(f"--loss-type {args.loss_type!r} is not a loss funcprobe models; choose one of "
                         f"{', '.join(LOSS_TYPES)} (TRL's names; the README's \"Matching your trainer\" gives verl's and "
                         "OpenRLHF's equivalents).")
    if args.scale_rewards is not None and args.scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"--scale-rewards {args.scale_rewards!r} is not one of {', '.join(SCALE_REWARDS)} (group: "
                         "divide by the group's reward std, TRL's default; batch: by the batch's; none: Dr. GRPO).")
    if args.loss_type is not None:
        settings["loss_type"] = args.loss_type
    if args.beta is not None:
        settings["beta"] = args.beta
    if args.kl_bias_correction is not None:
        settings["use_bias_correction_kl"] = args.kl_bias_correction
    if args.max_grad_norm is not None:
        if not math.isfinite(args.max_grad_norm):
            raise ValueError(f"--max-grad-norm must be finite; got {args.max_grad_norm}.")
        settings["max_grad_norm"] = args.max_grad_norm if args.max_grad_norm > 0 else None
    if args.scale_rewards is not None:
        settings["scale_rewards"] = args.scale_rewards
    if args.epsilon_high is not None:
        settings["epsilon_high"] = args.epsilon_high
    if args.reward_weights is not None:
        try:
            settings["reward_weights"] = tuple(float(w) for w in args.reward_weights.split(","))
        except ValueError:
            raise ValueError(f"--reward-weights must be numbers separated by commas, e.g. 1,0.5; got "
                             f"{args.reward_weights!r}.") from None
    for name in settings:
        sources[name] = "flag"
    try:
        return (Objective() if base is None else base).replace(**settings)
    except ValueError as error:
        raise ValueError(f"the step's objective: {error}") from None


def _check_plot_format(path) -> None:
    """Refuse a --plot file type matplotlib cannot write, before anything runs (the plot is drawn last)."""
    if path is None:
        return
    suffix = Path(path).suffix.lstrip(".").lower()
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        return  # reported when the plot is drawn, with the install command
    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix not in formats:
        kind = f".{suffix} files" if suffix else "a file without an extension"
        known = ", ".join("." + f for f in sorted(formats))
        raise ValueError(f"--plot {path}: matplotlib cannot write {kind}; use one of {known} (e.g. sweep.png).")


def _check_sizes(sizes: dict, eval_B: int, eval_G: int) -> None:
    if sizes["B"] < 2:
        raise ValueError(f"-B must be ≥ 2 (δH₁ is a cross-prompt U-statistic); got {sizes['B']}.")
    if sizes["G"] < 2:
        raise ValueError(f"-G must be ≥ 2 (the leave-one-out baseline needs two responses); got {sizes['G']}.")
    if sizes["max_new_tokens"] < 1:
        raise ValueError(f"--max-new-tokens must be ≥ 1; got {sizes['max_new_tokens']}.")
    if eval_B < 2:
        raise ValueError(f"--eval-B must be ≥ 2 (the SE of ΔH is over evaluation prompts); got {eval_B}.")
    if eval_G < 2:
        raise ValueError(f"--eval-G must be ≥ 2; got {eval_G}.")


def _eval_seed(args: argparse.Namespace) -> int:
    if args.eval_seed is None:
        return derive_seed(args.seed, "evaluation")
    if args.eval_seed == args.seed:
        raise ValueError(f"--eval-seed {args.eval_seed} equals --seed: the evaluation batch would repeat the update "
                         "batch's random draws. Choose another --eval-seed, or leave it out (it is derived from --seed).")
    return args.eval_seed


def _check_numbers(args: argparse.Namespace, temperature) -> None:
    for flag, value in (("--stop-token", args.stop_token or []),):
        if any(v < 0 for v in value):
            raise ValueError(f"{flag} takes token ids ≥ 0; got {value}.")
    for flag, value in (("--seq-chunk", args.seq_chunk), ("--token-chunk", args.token_chunk)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be ≥ 1; got {value}.")
    for flag, value in (("--lr", args.lr), ("--temperature", temperature)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag} must be finite and > 0; got {value}.")


def _memory_budget(args: argparse.Namespace) -> int | None:
    from .memory import parse_memory_size

    try:
        budget = parse_memory_size(args.memory_budget) if args.memory_budget is not None else None
    except ValueError as error:
        raise ValueError(f"--memory-budget: {error}") from None
    bare = args.memory_budget is not None and str(args.memory_budget).strip().replace(".", "", 1).isdigit()
    if bare and budget < 2 ** 20:
        raise ValueError(f"--memory-budget {args.memory_budget} is {budget} bytes, too small for any "
                         f"model; a number without a unit is bytes — write e.g. {args.memory_budget}GB or "
                         f"{args.memory_budget}GiB.")
    return budget


def _check_paths_and_device(args: argparse.Namespace) -> None:
    if not Path(args.checkpoint).exists():
        what = "run folder" if getattr(args, "command", "probe") == "trajectory" else "checkpoint"
        raise FileNotFoundError(f"{what} {args.checkpoint!r} does not exist.")
    for flag, path, what in (("--prompts", args.prompts, "prompts file"), ("--rollouts", args.rollouts, "rollouts file")):
        if path is None or Path(path).is_file():
            continue
        if Path(path).is_dir():
            raise ValueError(f"{flag} {path}: is a folder; pass the {what} itself (a JSONL file).")
        raise FileNotFoundError(f"{what} {path!r} does not exist.")
    import torch

    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device must be cpu, cuda or cuda:N; got {args.device!r}.") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or cuda:N; got {args.device!r}.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device. Install a "
                         "CUDA build of torch first (see the README), or use --device cpu.")


#: Files a run folder (one holding checkpoint-N/) may hold that funcprobe reads: never to be overwritten by an output.
_RUN_FOLDER_INPUTS = ("prompts.jsonl", "trainer_config.json", "adapter_config.json", "adapter_model.safetensors",
                      "adapter_model.bin", "optimizer.pt", "trainer_state.json", "training_args.bin")


def _run_inputs(args: argparse.Namespace) -> dict:
    """The files and folders this run reads (``check_output_paths``'s ``inputs`` and ``input_folders``), found
    cheaply, so that no output overwrites them: the --prompts, --trainer-config, --rollouts, --optimizer and reward
    files, the checkpoint folder (for a run folder: its checkpoint-N/ and model/ folders and the files funcprobe reads
    beside them), the default prompts pool, and the base model's folder (--base, or each adapter_config.json's local
    base_model_name_or_path)."""
    files = [("the --prompts file", args.prompts), ("the --trainer-config file", args.trainer_config),
             ("the --rollouts file", getattr(args, "rollouts", None)),
             ("the --optimizer file", getattr(args, "optimizer", None))]
    for spec in args.reward or ():
        source = spec.rpartition(":")[0]
        if source.endswith(".py") or "/" in source or os.sep in source:
            files.append((f"the file of --reward {spec}", source))
    given = Path(args.checkpoint)
    checkpoints = [p for p in given.glob("checkpoint-*") if p.is_dir()] if given.is_dir() else []
    if checkpoints:  # a run folder: its checkpoints, and what funcprobe reads beside them
        folders = [("a checkpoint folder of the run", folder) for folder in [*checkpoints, given / "model"]]
        files += [("a file of the run folder that funcprobe reads", given / name) for name in _RUN_FOLDER_INPUTS]
    else:
        folders = [("the checkpoint folder", given)]
    files += [("the checkpoint's prompts pool", folder / "prompts.jsonl") for folder in (given, given.parent)]
    bases = [args.base] if args.base is not None else []
    for adapter in [given, given / "model", *checkpoints] if args.base is None else ():
        try:
            name = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8")).get(
                "base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(name, str) and name:
            expanded = os.path.expanduser(name)
            bases += [expanded] if os.path.isabs(expanded) else [adapter / expanded, expanded]
    folders += [("the base model's folder", base) for base in bases if Path(base).is_dir()]
    return {"inputs": files, "input_folders": folders}


def probe_config_from_args(args: argparse.Namespace) -> ProbeConfig:
    """The ``probe`` (or ``attribute``) command line as a :class:`~funcprobe.probe_config.ProbeConfig`: the trainer
    config read, every default settled (``sources`` records where each came from), every option checked — cheap
    checks only, before anything is loaded; ``args`` is not changed."""
    from .sampling import _TRUNCATION_REASON

    if args.top_p < 1.0:
        raise ValueError(f"--top-p {args.top_p} is refused: {_TRUNCATION_REASON}. Leave --top-p at 1.")
    if not args.top_p == 1.0:
        raise ValueError(f"--top-p must be 1 (no truncation); got {args.top_p}.")
    sizes, sources, settings, objective = _settle(args)
    if settings is not None and args.G is not None and args.G != settings.G:
        # A note, not a refusal: flags win over the config by design (a cheaper probe), and the step keeps the
        # trainer's loss and optimizer state; but each group's baseline (and std) comes from G responses, not the
        # trainer's number, so the update batch is drawn differently from the trainer's.
        print(f"funcprobe {getattr(args, 'command', 'probe')}: note: -G {args.G} overrides num_generations="
              f"{settings.G} of {settings.sources.get('G', 'the trainer config')}: each prompt's advantages come from "
              f"{args.G} responses, not the trainer's {settings.G}.", file=sys.stderr)
    eval_sizes = {}
    for name, follows in (("eval_B", "B"), ("eval_G", "G")):
        sources[name] = "flag" if getattr(args, name) is not None else f"as {follows}"
        eval_sizes[name] = getattr(args, name) if getattr(args, name) is not None else sizes[follows]
    _check_sizes(sizes, **eval_sizes)
    eval_seed = _eval_seed(args)
    _check_numbers(args, sizes["temperature"])
    etas = tuple(parse_etas(args.eta_sweep)) if args.eta_sweep is not None else None
    memory_budget_bytes = _memory_budget(args)
    from .report import check_output_paths

    check_output_paths({"--out": args.out, "--html": getattr(args, "html", None), "--plot": getattr(args, "plot", None)},
                       examples={"--html": "attribution.html", "--plot": "plot.png"}, **_run_inputs(args))
    _check_plot_format(getattr(args, "plot", None))
    units = parse_units(args.units)
    if args.rollouts is None:  # B is known from the flags (a rollouts file's B is known once it is read)
        from .delta_h1 import unit_partition

        try:
            unit_partition(sizes["B"], units)  # M ≤ B and B divisible by M: before anything is sampled
        except ValueError as error:
            raise ValueError(f"--units {args.units}: {error}") from None
    if getattr(args, "command", "probe") == "probe" and args.plot is not None and etas is None:
        raise ValueError("--plot draws the learning-rate sweep: pass --eta-sweep too, e.g. --eta-sweep "
                         "1e-6,3e-6,1e-5.")
    _check_paths_and_device(args)
    return ProbeConfig(
        checkpoint=args.checkpoint, base=args.base, optimizer=args.optimizer, sources=sources, record=dict(vars(args)),
        batch=BatchConfig(B=sizes["B"], G=sizes["G"], **eval_sizes, seed=args.seed, eval_seed=eval_seed,
                          max_new_tokens=sizes["max_new_tokens"], temperature=sizes["temperature"],
                          prompts=args.prompts, rollouts=args.rollouts,
                          rewards=None if args.reward is None else tuple(args.reward),
                          chat_template=args.chat_template, replace=args.replace, top_p=args.top_p,
                          stop_token=None if args.stop_token is None else tuple(args.stop_token)),
        step=StepConfig(objective=objective, lr=args.lr, units=units, trainer_settings=settings),
        estimate=EstimateConfig(realised=getattr(args, "realised", "snis"), in_sample=getattr(args, "in_sample", False),
                                etas=etas, integrand=args.integrand),
        compute=ComputeConfig(device=args.device, dtype=args.dtype, logsoftmax_dtype=args.logsoftmax_dtype,
                              seq_chunk=args.seq_chunk, token_chunk=args.token_chunk,
                              memory_budget_bytes=memory_budget_bytes),
        output=OutputConfig(out=args.out, plot=args.plot, verbose=args.verbose))


# ------------------------------------------------------------------------------------------------------ the probe
def run_probe_command(args: argparse.Namespace, *, progress: bool | None, echo=print, world=None) -> dict:
    """The ``probe`` command: the config from ``args``, ``pipeline.run_probe`` (which prints the report), then the
    JSON and the plot — written by rank 0 only under torchrun, at the very end (the JSON atomically)."""
    from .pipeline import run_probe
    from .report import write_probe_outputs

    config = probe_config_from_args(args)
    run = run_probe(config, progress=progress, echo=echo, world=world)
    if world is None or world.is_main:
        write_probe_outputs(run.results, run.measurements.sweep, out=config.output.out, plot=config.output.plot,
                            echo=echo)
    return run.results


def run_attribute(args: argparse.Namespace, *, progress: bool | None, echo=print) -> dict:
    """The ``attribute`` command: ``probe``'s loading and batches (``pipeline.load_and_sample``), then
    ``funcprobe.attribute`` with the interventions; prints the summary and writes ``--out`` JSON (and the page and
    the plot)."""
    from .attribution import attribute
    from .attribution_page import batch_text
    from .pipeline import config_section, load_and_sample, timer
    from .report import versions

    config = probe_config_from_args(args)
    interventions = parse_interventions(args.intervention or DEFAULT_INTERVENTIONS)
    quantiles = parse_quantiles(args.quantiles)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    timed = timer(timings)
    # The model as the user loads it (SDPA by default): the attribution's forward-mode pass switches to eager
    # attention for its own duration (Policy.forward_mode_attention); everything else runs on the model's attention.
    loaded = load_and_sample(config, progress=progress, echo=echo, timed=timed)
    batch, step = loaded.batch, config.step
    try:
        result = timed("attribute", lambda: attribute(
            loaded.params, batch, policy=loaded.policy, adam=loaded.adam, objective=step.objective, units=step.units,
            lr=step.lr, seq_chunk=loaded.chunks.seq_chunk, token_chunk=loaded.chunks.token_chunk, quantiles=quantiles,
            interventions=interventions, evaluation=loaded.evaluation.batch, integrand=config.estimate.integrand,
            progress=progress))
    except KeyboardInterrupt:
        raise loaded.interrupted() from None
    echo("\n" + str(result))
    timings["total"] = time.perf_counter() - started
    results = {
        "command": "attribute", "config": config_section(config, loaded), "versions": versions(),
        "seed": config.batch.seed, "eval_seed": config.batch.eval_seed,
        "checkpoint": {"path": loaded.checkpoint.path, "step": loaded.checkpoint.step,
                       "base": loaded.checkpoint.base},
        "objective": step.objective.to_dict(), "attribution": result.to_dict(),
        **batch_text(batch, loaded.checkpoint.tokenizer), "objective_gain": result.objective_gain,
        "timings": timings,
    }
    _write_attribution_outputs(results, args, echo)
    return results


def run_trajectory_command(args: argparse.Namespace, *, progress: bool | None, echo=print) -> dict:
    """The ``trajectory`` command: the config from ``args`` (output paths and cheap checks first, as ``probe``),
    ``trajectory.trajectory`` over the run folder (with RUN_DIR/trainer_config.json when no --trainer-config is given,
    as the library), the tables printed, then ``--out`` (the JSON) and ``--plot``."""
    from .report import save_outputs
    from .trajectory import run_trainer_config, trajectory

    found = run_trainer_config(args.checkpoint)
    if args.trainer_config is None and not args.trust_training_args and found is not None:
        args = argparse.Namespace(**{**vars(args), "trainer_config": os.fspath(found)})  # the run's own, as the library
    config = probe_config_from_args(args)
    result = trajectory(config.checkpoint, config=config, progress=progress, echo=echo)
    echo("\n" + str(result))
    results = result.to_dict()

    def plot():
        from .trajectory_plot import plot_trajectory

        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        return plot_trajectory(results, args.plot)

    save_outputs(results, out=args.out, writers=[("--plot", args.plot, plot)], echo=echo)
    return results


def _write_attribution_outputs(results: dict, args: argparse.Namespace, echo) -> None:
    """--out (the JSON), --html (the page) and --plot (the scatter), each when given; a failed write keeps the
    results (``report.save_outputs``)."""
    from .report import save_outputs, to_jsonable

    def page():
        from .attribution_page import render_attribution_html

        path = Path(args.html)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_attribution_html(to_jsonable(results)), encoding="utf-8")
        return path

    def plot():
        from .report import plot_attribution

        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        return plot_attribution(results, args.plot)

    save_outputs(results, out=args.out, writers=[("--html", args.html, page), ("--plot", args.plot, plot)], echo=echo)


# ----------------------------------------------------------------------------------------------------- entry point
def _one_line(error: BaseException) -> str:
    if isinstance(error, KeyError) and len(error.args) == 1:
        text = str(error.args[0])
    else:
        text = str(error) or type(error).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    """The command line; a Ctrl-C (KeyboardInterrupt) anywhere ends it with one line, "interrupted" and what was kept
    (``pipeline.Interrupted``: the sampled update batch, saved for --rollouts), and exit status 130, as a shell
    reports SIGINT."""
    given = sys.argv[1:] if argv is None else argv
    try:
        return _main(argv)
    except KeyboardInterrupt as error:
        command = f" {given[0]}" if given and given[0] in ("demo", "probe", "attribute", "trajectory") else ""
        kept = getattr(error, "message", "")
        print(f"funcprobe{command}: interrupted" + (f"; {kept}." if kept else "."), file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    progress = False if args.quiet else None  # None: bars only when stderr is a terminal
    world = None
    if args.command == "probe" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .distributed import init_from_env

        world = init_from_env(timeout_s=args.dist_timeout, device=args.device)
        if args.device.startswith("cuda"):  # each rank its own GPU
            args = argparse.Namespace(**{**vars(args), "device": f"cuda:{os.environ.get('LOCAL_RANK', '0')}"})
        if not world.is_main:
            logging.getLogger().setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # A transformers deprecation that PEFT triggers on every model load; nothing a user can act on.
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                    category=FutureWarning)
            if args.command == "demo":
                from .report import check_output_folder

                check_output_folder("--out", args.out)
            if args.command == "demo" and args.quick:
                from .demo import DemoConfig, run_demo

                run_demo(dataclasses.replace(DemoConfig.quick(), seed=args.seed), out_dir=args.out,
                         plot=not args.no_plot, progress=progress)
            elif args.command == "demo":
                from .demo_real import RealDemoConfig, run_real_demo

                run_real_demo(RealDemoConfig(seed=args.seed), out_dir=args.out, plot=not args.no_plot,
                              progress=progress)
            elif args.command == "probe":
                run_probe_command(args, progress=progress, world=world)
            elif args.command == "attribute":
                run_attribute(args, progress=progress)
            elif args.command == "trajectory":
                run_trajectory_command(args, progress=progress)
        return 0
    except USER_ERRORS as error:
        _record(world, error)
        line = _one_line(error)
        shown = getattr(error, "traceback_text", None)
        # the user's reward function raised: its own traceback matters — said only when it is printed
        if shown and "File " in shown and shown in str(error):
            print(str(error), file=sys.stderr)
            line = f"{error.headline} (the traceback above is the function's own). {_one_line(error.note)}"
        print(f"funcprobe {args.command}: error: {_rank(world)}{line}", file=sys.stderr)
        return 2
    except Exception as error:
        if world is None:
            raise
        from .distributed import DistributedError

        _record(world, error)
        if isinstance(error, DistributedError):
            print(f"funcprobe {args.command}: error: {_one_line(error)}", file=sys.stderr)
        else:
            import traceback

            traceback.print_exc()
            print(f"funcprobe {args.command}: error: {_rank(world)}{type(error).__name__}: {_one_line(error)}",
                  file=sys.stderr)
        return 1
    finally:
        if world is not None:
            from .distributed import shutdown

            shutdown(world)


def _rank(world) -> str:
    return "" if world is None or not world.distributed else f"rank {world.rank}/{world.size}: "


def _record(world, error: BaseException) -> None:
    if world is not None and world.distributed:
        from .distributed import DistributedError, record_failure

        if not isinstance(error, DistributedError):  # only the rank where it started names itself
            record_failure(world, error)


if __name__ == "__main__":
    raise SystemExit(main())
