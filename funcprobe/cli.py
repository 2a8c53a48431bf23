"""The ``funcprobe`` command. The only module that knows about argv, output files and progress-bar enablement.

    funcprobe demo                                a short real GRPO run on SmolLM2-135M-Instruct + LoRA, then
                                                  the probe of its checkpoint (~5 min on 2 CPU cores)
    funcprobe demo --quick                        the whole probe on a built-in tiny random Qwen2 policy (seconds)
    funcprobe probe CHECKPOINT [options]          δH₁ and ΔH of the next AdamW step of a LoRA training checkpoint
    funcprobe attribute CHECKPOINT [options]      which tokens drive δH₁; proxies and token-selection interventions

Bad inputs (a missing checkpoint, a corrupt optimizer.pt, a bad prompts line, …) end with one line on stderr and exit
status 2; argparse's own usage errors also exit 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import os
import random
import sys
import time
import types
import warnings
from pathlib import Path

from .formatting import fmt
from .objective import LOSS_TYPES, SCALE_REWARDS

__all__ = ["main", "parse_args", "select_prompts", "draw_eval_prompts", "derive_seed", "parse_etas", "parse_units",
           "parse_interventions", "parse_quantiles"]

log = logging.getLogger("funcprobe.cli")

#: Errors that mean "bad input" (one line on stderr, exit status 2); anything else keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, ImportError, KeyError)

DTYPES = ("float32", "bfloat16", "float64")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="funcprobe", description="Predicted (δH₁) and realised (ΔH) entropy "
                                     "change of one AdamW step on a LoRA policy.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a few real GRPO steps on SmolLM2-135M-Instruct + LoRA, save the "
                               "checkpoint and probe it (CPU, ~5 min); --quick: a tiny random model (seconds)")
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
    return parser


def _add_attribute_parser(commands) -> None:
    attribute = _add_probe_parser(
        commands, "attribute", help="which tokens of the update batch drive δH₁, and what token-selection "
        "interventions would do (spec §8)",
        description="Load a checkpoint and sample the update and evaluation batches exactly as `probe` does, then "
                    "attribute δH₁'s gradient term to the update batch's tokens, compare it with the covariance proxy "
                    "(Cui et al. 2025) and the next-token entropy, and report each intervention's δH₁, realised ΔH on "
                    "the evaluation batch, and first-order objective gain. The model is loaded with eager attention "
                    "(forward-mode AD needs it).")
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
        help="δH₁ and ΔH of the next AdamW step of a LoRA checkpoint",
        description="Load a LoRA training checkpoint (policy + AdamW state), sample an update batch of B prompts × G "
                    "responses from it, and report the predicted (δH₁) entropy change of the AdamW step on that batch "
                    "beside the realised change (ΔH), measured on an evaluation batch drawn independently of it.")
    only_probe = name == "probe"
    probe = commands.add_parser(name, **parser_text)
    probe.add_argument("checkpoint", help="an HF Trainer checkpoint-N/ folder, a run folder holding checkpoint-N/ "
                       "(the latest is taken), a folder with model/ + optimizer.pt, or a bare adapter (with "
                       "--optimizer)")
    data = probe.add_argument_group("batch")
    data.add_argument("--prompts", help="JSONL, one prompt per line: {\"prompt\": \"text\", ...} or TRL's "
                      "conversational {\"prompt\": [{\"role\": ..., \"content\": ...}], ...}; other keys are dataset "
                      "columns passed to the reward (default: the checkpoint's prompts.jsonl, in its folder or the "
                      "folder above)")
    data.add_argument("--chat-template", default="auto", choices=("auto", "on", "off"),
                      help="render prompts with the tokenizer's chat template and add_generation_prompt, as TRL does: "
                      "auto (conversational prompts only), on (plain text too, as one user message), off (default "
                      "%(default)s)")
    data.add_argument("--rollouts", default=None, metavar="FILE.jsonl",
                      help="build the update batch from the trainer's logged rollouts (one prompt per line with its "
                      "completions and rewards) instead of sampling it; the evaluation batch is still sampled")
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
    if only_probe:
        evaluation.add_argument("--in-sample", action="store_true",
                            help="also report importance sampling on the update batch itself: a biased diagnostic "
                            "(it carries the same-sample term δH₁ removes), labelled as such")
    step = probe.add_argument_group("step (the trainer's own settings: --trainer-config; flags win over it)")
    step.add_argument("--trainer-config", default=None, metavar="FILE",
                      help="a JSON or YAML file of the run's TRL GRPOConfig fields (loss_type, beta, scale_rewards, "
                      "num_generations, max_completion_length, temperature, max_grad_norm, …); missing fields take "
                      "TRL's defaults")
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
    step.add_argument("--units", default="prompt", help="δH₁ units: 'prompt' (U = B) or an integer M (M blocks of "
                      "prompts) (default %(default)s)")
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
    compute.add_argument("--optimizer", default=None, help="the optimizer.pt, when it is not in the checkpoint "
                         "folder")
    output = probe.add_argument_group("output")
    output.add_argument("--out", default=None, help="write the results as JSON here")
    if only_probe:
        output.add_argument("--plot", default=None, help="write the learning-rate sweep's plot here (needs "
                        "--eta-sweep and matplotlib)")
    output.add_argument("--quiet", action="store_true", help="no progress bars (also off when stderr is not a "
                        "terminal)")
    output.add_argument("-v", "--verbose", action="store_true", help="log each stage, and print the full δH₁ "
                        "and ΔH tables")
    output.add_argument("--dist-timeout", type=float, default=300.0, help="under torchrun: seconds a collective "
                        "may wait before the run fails (a rank that died or hangs) (default %(default)s)")
    if not only_probe:
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


def select_prompts(pool_size: int, B: int, *, seed: int, replace: bool = False) -> list[int]:
    """Indices of the B prompts to probe, reproducible from ``seed``.

    Without ``replace``: the first B indices of ``range(pool_size)`` after ``random.Random(seed).shuffle`` (B must
    not exceed ``pool_size``). With ``replace``: ``random.Random(seed).choices(range(pool_size), k=B)``.
    """
    rng = random.Random(seed)
    if replace:
        return rng.choices(range(pool_size), k=B)
    if B > pool_size:
        raise ValueError(f"-B {B} asks for more prompts than the {pool_size} available; pass --replace to draw "
                         "prompts with replacement, or lower -B.")
    order = list(range(pool_size))
    rng.shuffle(order)
    return order[:B]


def _trainer_config(args: argparse.Namespace):
    """The run's settings (``TrainerSettings``) from --trainer-config, or the checkpoint's training_args.bin with
    --trust-training-args; None when neither is given."""
    from .trainer_config import read_trainer_config, read_training_args, trainer_settings

    if args.trainer_config is not None:
        return trainer_settings(read_trainer_config(args.trainer_config), source=args.trainer_config)
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
        return trainer_settings(config, source=where)
    raise ValueError(f"--trust-training-args: there is no training_args.bin in {folder} or its checkpoint-N folders; "
                     "pass --trainer-config FILE instead.")


def _resolve_settings(args: argparse.Namespace) -> None:
    """Settle B, G, the budget, τ and the objective: a flag, else the run's config (--trainer-config), else
    funcprobe's defaults; ``args.sources`` records where each came from."""
    settings = _trainer_config(args)
    args.trainer_settings = settings
    sources = {} if settings is None else dict(settings.sources)
    for name, default in (("B", 16), ("G", 8), ("max_new_tokens", 100), ("temperature", None)):
        if getattr(args, name) is not None:
            sources[name] = "flag"
            continue
        from_config = None if settings is None else getattr(settings, name)
        if from_config is not None:
            setattr(args, name, from_config)
        else:
            setattr(args, name, default)
            sources[name] = "funcprobe default"
    args.objective = _objective_from_args(args, None if settings is None else settings.objective, sources)
    args.sources = sources


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


def derive_seed(seed: int, purpose: str) -> int:
    """A seed for ``purpose`` derived from ``seed`` by hashing (independent of it, reproducible from it)."""
    import hashlib

    digest = hashlib.blake2b(f"funcprobe.{purpose}:{int(seed)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2 ** 31 - 1)


def draw_eval_prompts(pool_size: int, B: int, *, seed: int) -> list[int]:
    """Indices of the evaluation batch's B prompts: ``random.Random(seed).choices(range(pool_size), k=B)`` — i.i.d.
    uniform draws from the pool, with replacement (spec §6: independent of the update batch's prompts, and the i.i.d.
    draws the SE over prompts assumes)."""
    if pool_size < 1:
        raise ValueError("the prompt pool is empty.")
    return random.Random(seed).choices(range(pool_size), k=B)


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


def _check_probe_args(args: argparse.Namespace) -> None:
    """Cheap checks before anything is loaded."""
    from .sampling import _TRUNCATION_REASON

    if args.top_p < 1.0:
        raise ValueError(f"--top-p {args.top_p} is refused: {_TRUNCATION_REASON}. Leave --top-p at 1.")
    if not args.top_p == 1.0:
        raise ValueError(f"--top-p must be 1 (no truncation); got {args.top_p}.")
    _resolve_settings(args)
    if args.B < 2:
        raise ValueError(f"-B must be ≥ 2 (δH₁ is a cross-prompt U-statistic); got {args.B}.")
    if args.G < 2:
        raise ValueError(f"-G must be ≥ 2 (the leave-one-out baseline needs two responses); got {args.G}.")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be ≥ 1; got {args.max_new_tokens}.")
    for name, follows in (("eval_B", "B"), ("eval_G", "G")):
        args.sources[name] = "flag" if getattr(args, name) is not None else f"as {follows}"
        if getattr(args, name) is None:
            setattr(args, name, getattr(args, follows))
    if args.eval_B < 2:
        raise ValueError(f"--eval-B must be ≥ 2 (the SE of ΔH is over evaluation prompts); got {args.eval_B}.")
    if args.eval_G < 2:
        raise ValueError(f"--eval-G must be ≥ 2; got {args.eval_G}.")
    if args.eval_seed is None:
        args.eval_seed = derive_seed(args.seed, "evaluation")
    elif args.eval_seed == args.seed:
        raise ValueError(f"--eval-seed {args.eval_seed} equals --seed: the evaluation batch would repeat the update "
                         "batch's random draws. Choose another --eval-seed, or leave it out (it is derived from --seed).")
    for flag, value in (("--stop-token", args.stop_token or []),):
        if any(v < 0 for v in value):
            raise ValueError(f"{flag} takes token ids ≥ 0; got {value}.")
    for flag, value in (("--seq-chunk", args.seq_chunk), ("--token-chunk", args.token_chunk)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be ≥ 1; got {value}.")
    for flag, value in (("--lr", args.lr), ("--temperature", args.temperature)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag} must be finite and > 0; got {value}.")
    args.etas = parse_etas(args.eta_sweep) if args.eta_sweep is not None else None
    from .memory import parse_memory_size

    try:
        args.memory_budget_bytes = (parse_memory_size(args.memory_budget) if args.memory_budget is not None
                                    else None)
    except ValueError as error:
        raise ValueError(f"--memory-budget: {error}") from None
    bare = args.memory_budget is not None and str(args.memory_budget).strip().replace(".", "", 1).isdigit()
    if bare and args.memory_budget_bytes < 2 ** 20:
        raise ValueError(f"--memory-budget {args.memory_budget} is {args.memory_budget_bytes} bytes, too small for any "
                         f"model; a number without a unit is bytes — write e.g. {args.memory_budget}GB or "
                         f"{args.memory_budget}GiB.")
    _check_plot_format(getattr(args, "plot", None))
    args.units_value = parse_units(args.units)
    if getattr(args, "command", "probe") == "probe" and args.plot is not None and args.etas is None:
        raise ValueError("--plot draws the learning-rate sweep: pass --eta-sweep too, e.g. --eta-sweep "
                         "1e-6,3e-6,1e-5.")
    if not Path(args.checkpoint).exists():
        raise FileNotFoundError(f"checkpoint {args.checkpoint!r} does not exist.")
    if args.prompts is not None and not Path(args.prompts).is_file():
        raise FileNotFoundError(f"prompts file {args.prompts!r} does not exist.")
    if args.rollouts is not None and not Path(args.rollouts).is_file():
        raise FileNotFoundError(f"rollouts file {args.rollouts!r} does not exist.")
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


# ------------------------------------------------------------------------------------------------------ the probe
def _choose_prompts(path, args: argparse.Namespace) -> dict:
    """Read the prompt pool (plain or conversational JSONL with columns); pick the update batch's B prompts
    (``select_prompts``, seeded by --seed; none with --rollouts) and the evaluation batch's prompts
    (``draw_eval_prompts``, seeded by --eval-seed)."""
    from .prompts import load_prompt_pool

    pool = load_prompt_pool(path)
    indices = []
    if args.rollouts is None:
        try:
            indices = select_prompts(len(pool), args.B, seed=args.seed, replace=args.replace)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
    eval_indices = draw_eval_prompts(len(pool), args.eval_B, seed=args.eval_seed)
    return {"path": path, "pool": pool, "indices": indices, "eval_indices": eval_indices}


def _reward_functions(args: argparse.Namespace) -> list:
    """The --reward functions (TRL's signature), loaded before the model so that a bad spec fails fast."""
    from .trl_rewards import load_reward_function

    functions = [load_reward_function(spec) for spec in (args.reward or ["answer"])]
    weights = args.objective.reward_weights
    if weights is not None and len(weights) != len(functions):
        raise ValueError(f"{len(weights)} reward weights (--reward-weights or the trainer config's reward_weights) for "
                         f"{len(functions)} reward functions (--reward); pass one weight per function.")
    return functions


def _check_learning_rate(adam, args: argparse.Namespace, where) -> None:
    """Before any sampling: a zero next-step learning rate (the end of a decaying schedule) makes the step zero."""
    rates = sorted({h.lr for h in adam.hyper.values()})
    if args.lr is None and all(rate == 0 for rate in rates):
        raise ValueError(f"the learning rate of the next step stored in {where} is 0 (the end of a decaying "
                         "schedule?): that step is zero, so δH₁ = ΔH = 0 and there is nothing to measure. Pass --lr to "
                         "probe the step at another learning rate, e.g. --lr 1e-5.")
    if args.etas is not None and args.lr is None and len(rates) > 1:
        raise ValueError(f"the optimizer's parameter groups have different learning rates {rates}; the sweep scales "
                         "one learning rate. Pass --lr to use one for every group, or drop --eta-sweep.")


def _sample(world, policy, params, pool, indices, *, seed, G, args, tokenizer, rewards, trainer_state, prompt_chunk,
            progress, rescue):
    """Sample the pool's prompts ``indices`` (this rank's contiguous shard, gathered on every rank), rendered as the
    trainer renders them (--chat-template) and scored by the --reward functions with TRL's call."""
    from .objective import ZeroVarianceWarning
    from .prompts import render_prompts
    from .sampling import gather_sampled, rescore, sample_batch
    from .trl_rewards import RewardFunctionError, TRLRewards

    kwargs = args.trainer_settings.chat_template_kwargs if args.trainer_settings is not None else None
    shard = world.shard(len(indices))
    mine = None
    if len(shard):
        rows = indices[shard.start:shard.stop]
        chosen = pool.select(rows)
        ids = render_prompts(chosen, tokenizer, chat_template=args.chat_template, chat_template_kwargs=kwargs)
        reward_fn = TRLRewards.for_pool(rewards, pool, rows, weights=args.objective.reward_weights,
                                        chat_template=args.chat_template, tokenizer=tokenizer, prompt_ids=ids,
                                        trainer_state=trainer_state)
        try:
            with warnings.catch_warnings():  # equal-reward groups: reported by the caller, once, for the whole batch
                warnings.simplefilter("ignore", ZeroVarianceWarning)
                mine = sample_batch(policy, params, ids, G=G, reward_fn=reward_fn,
                                    scale_rewards=args.objective.scale_rewards,
                                    reward_weights=args.objective.reward_weights, max_new_tokens=args.max_new_tokens,
                                    seed=seed, tokenizer=tokenizer, top_p=args.top_p, stop_token_ids=args.stop_token,
                                    first_prompt_index=shard.start, prompt_index=rows, prompt_chunk=prompt_chunk,
                                    progress=progress)
        except RewardFunctionError as error:
            error.save_rollouts(rescue)
            raise error.with_note(f"The sampled prompts and completions are saved in {rescue}: after fixing the "
                                  f"function, rerun with --rollouts {rescue} to score them without sampling "
                                  "again.") from None
    # Advantages over the gathered batch (batch-scaled ones need every shard's rewards); equal-reward groups are
    # reported by the caller, once.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ZeroVarianceWarning)
        return rescore(gather_sampled(world, mine), scale_rewards=args.objective.scale_rewards,
                       reward_weights=args.objective.reward_weights, warn=False)


def _rollouts_shape(records, args: argparse.Namespace) -> None:
    """With --rollouts the file holds the update batch: its prompts are B and its completions per prompt G (an
    explicit -B, or a -G from a flag or the trainer config, must agree); E follows them unless --eval-B/-G say
    otherwise."""
    B, G = len(records), records[0].G
    if args.sources.get("B") == "flag" and args.B != B:
        raise ValueError(f"{args.rollouts}: holds B={B} prompts but -B is {args.B}; leave -B out (the file decides) "
                         "or pass a file with that many lines.")
    if args.sources.get("G") == "funcprobe default":
        args.G = G
        args.sources["G"] = f"rollouts file {args.rollouts}"
    elif G != args.G:
        raise ValueError(f"{args.rollouts}: holds G={G} completions per prompt but the step's G is {args.G} "
                         f"({args.sources.get('G')}); they must agree.")
    if args.sources.get("B") != "flag":
        args.B = B
        args.sources["B"] = f"rollouts file {args.rollouts}"
    for name, follows in (("eval_B", "B"), ("eval_G", "G")):
        if args.sources[name] != "flag":
            setattr(args, name, getattr(args, follows))


def _rollouts_sample(records, args: argparse.Namespace, tokenizer, policy, rewards):
    """The update batch from the trainer's logged rollouts (--rollouts): the file's rewards, or the --reward
    functions' when given."""
    from .rollouts import rollout_rewards, rollouts_batch
    from .sampling import SampledBatch, collect_stop_ids

    from .objective import ZeroVarianceWarning
    from .trl_rewards import RewardFunctionError

    kwargs = args.trainer_settings.chat_template_kwargs if args.trainer_settings is not None else None
    reward_fn = rollout_rewards(records, rewards, args.objective.reward_weights, chat_template=args.chat_template,
                                tokenizer=tokenizer) if args.reward else None
    try:
        with warnings.catch_warnings():  # equal-reward groups: reported by the caller from advantage_info
            warnings.simplefilter("ignore", ZeroVarianceWarning)
            batch, info = rollouts_batch(records, tokenizer, max_new_tokens=args.max_new_tokens,
                                         chat_template=args.chat_template, scale_rewards=args.objective.scale_rewards,
                                         reward_weights=args.objective.reward_weights, temperature=policy.temperature,
                                         stop_token_ids=collect_stop_ids(tokenizer, policy, args.stop_token),
                                         reward_fn=reward_fn, chat_template_kwargs=kwargs)
    except RewardFunctionError as error:
        raise error.with_note(f"{args.rollouts} is unchanged: after fixing the function, rerun with the same "
                              "--rollouts.") from None
    return SampledBatch(batch=batch, prompts=info["prompts"], responses=info["responses"],
                        eos_count=info["eos_count"], timings={"notes": info["notes"]},
                        advantage_info=info["advantage_info"], raw_rewards=info["raw_rewards"])


def _noting(echo, fn):
    """fn(), with the library's warnings (e.g. "the jackknife needs 3 units") printed once as notes, not as Python
    warnings with source lines."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = fn()
    for message in dict.fromkeys(str(w.message) for w in caught
                                 if issubclass(w.category, (RuntimeWarning, UserWarning))
                                 and "is_gradient_checkpointing" not in str(w.message)):
        echo(f"note: {message}")
    return value


def _batch_section(sampled, chosen: dict, indices: list[int] | None, seed: int | None, *, source: str) -> dict:
    from .rollouts import batch_tokens

    batch = sampled.batch
    pool = chosen["pool"]
    prompt_ids, completion_ids = batch_tokens(batch)
    return {"source": source, "prompts_file": chosen["path"], "pool_size": len(pool), "prompt_indices": indices,
            "seed": seed, "prompts": sampled.prompts, "prompt_ids": prompt_ids, "completion_ids": completion_ids,
            "columns": None if indices is None else pool.select(indices).columns,
            "responses": sampled.responses, "rewards": batch.rewards, "raw_rewards": sampled.raw_rewards,
            "advantages": batch.advantages, "mean_reward": float(batch.rewards.mean()),
            "eos_count": sampled.eos_count, "truncated_count": sampled.truncated_count,
            "zero_variance_groups": list(sampled.advantage_info.zero_variance_groups),
            "unscorable": sampled.advantage_info.unscorable,
            "stop_token_ids": None if sampled.spec is None else list(sampled.spec.stop_token_ids),
            "timings": sampled.timings}


def _load_and_sample(args: argparse.Namespace, *, progress: bool | None, echo, world, timed,
                     policy_extra: dict | None = None) -> types.SimpleNamespace:
    """Shared by ``probe`` and ``attribute``: load the checkpoint, choose the prompts, plan memory, sample (or read)
    the update batch and sample the evaluation batch. ``policy_extra``: more ``load_checkpoint`` options (e.g. the
    attention implementation)."""
    import torch

    from .checkpoints import load_checkpoint

    # The prompts, the rollouts and the reward functions first when given, so that a bad file, -B or reward spec
    # fails before the model is loaded.
    records = None
    if args.rollouts is not None:
        from .rollouts import load_rollouts

        records = load_rollouts(args.rollouts)
        _rollouts_shape(records, args)
    chosen = _choose_prompts(args.prompts, args) if args.prompts is not None else None
    rewards = _reward_functions(args)
    policy_options = {name: value for name, value in (("seq_chunk", args.seq_chunk),
                                                      ("token_chunk", args.token_chunk),
                                                      ("temperature", args.temperature)) if value is not None}
    if args.logsoftmax_dtype is not None:
        policy_options["logsoftmax_dtype"] = getattr(torch, args.logsoftmax_dtype)
    with _library_bars(enabled=sys.stderr.isatty() if progress is None else progress):
        checkpoint = timed("load", lambda: load_checkpoint(args.checkpoint, base=args.base, optimizer=args.optimizer,
                                                           dtype=getattr(torch, args.dtype), **(policy_extra or {}),
                                                           device=args.device, **policy_options))
    policy, adam = checkpoint.policy, checkpoint.adam
    params = policy.params
    _check_learning_rate(adam, args, checkpoint.optimizer_path)
    args.sources["lr"] = "flag" if args.lr is not None else f"optimizer state ({checkpoint.optimizer_path})"
    echo(f"checkpoint: {checkpoint.adapter_dir} (layout {checkpoint.layout}, step {checkpoint.step}, base "
         f"{checkpoint.base})")
    echo(f"policy: {policy}")
    echo(f"the step: AdamW at lr {fmt(args.lr, '.4g') if args.lr is not None else 'from the optimizer state'}; "
         f"{args.objective.describe()}")
    unread = Path(checkpoint.adapter_dir) / "training_args.bin"
    if args.trainer_settings is None and unread.is_file():
        echo(f"note: {unread} (the run's settings) was not read: it is a pickle, and loading a pickle runs code from "
             "the file. The step probed is funcprobe's default unless flags say otherwise; pass --trust-training-args "
             "to read it, or --trainer-config FILE with the run's GRPOConfig fields.")
    if chosen is None:
        if checkpoint.prompts_path is None:
            raise ValueError(f"no prompts: pass --prompts FILE.jsonl (there is no prompts.jsonl in "
                             f"{checkpoint.adapter_dir} or the folder above).")
        chosen = _choose_prompts(checkpoint.prompts_path, args)
    if checkpoint.tokenizer is None:
        raise ValueError(f"the checkpoint {checkpoint.adapter_dir} has no tokenizer (tokenizer.json / "
                         "tokenizer_config.json in the checkpoint or its base); save the tokenizer with the "
                         "checkpoint.")
    pool = chosen["pool"]

    memory_plan, store, prompt_chunk = None, "auto", 8
    seq_chunk, token_chunk = args.seq_chunk, args.token_chunk
    if args.memory_budget_bytes is not None:
        from .memory import plan_for_policy

        from .prompts import render_prompts

        rendered = render_prompts(pool.select(chosen["indices"] + chosen["eval_indices"]), checkpoint.tokenizer,
                                  chat_template=args.chat_template)
        prompt_len = max(len(ids) for ids in rendered)
        plan = plan_for_policy(policy, (args.B, args.G, max(prompt_len, 1), args.max_new_tokens),
                               budget_bytes=args.memory_budget_bytes, units=args.units_value)
        memory_plan, store, prompt_chunk = plan.to_dict(), plan.store_unit_vectors, plan.prompt_chunk
        seq_chunk = plan.seq_chunk if seq_chunk is None else seq_chunk
        token_chunk = plan.token_chunk if token_chunk is None else token_chunk
        echo(f"memory plan: seq_chunk={seq_chunk}, token_chunk={token_chunk}, prompt_chunk="
             f"{prompt_chunk}, unit vectors {'stored' if store else 'recomputed'}; predicted peak "
             f"{plan.peak_bytes / 2 ** 30:.2f} GiB ({plan.peak_phase}) of {plan.budget_bytes / 2 ** 30:.2f} GiB")

    from .trl_rewards import trainer_state_from_checkpoint

    rescue = Path(args.out).with_suffix(".failed-rollouts.jsonl") if args.out else Path("funcprobe-failed-rollouts.jsonl")
    sampling = dict(args=args, tokenizer=checkpoint.tokenizer, rewards=rewards, prompt_chunk=prompt_chunk,
                    trainer_state=trainer_state_from_checkpoint(checkpoint.adapter_dir), progress=progress,
                    rescue=rescue)
    if records is None:
        sampled = timed("sample", lambda: _sample(world, policy, params, pool, chosen["indices"], seed=args.seed,
                                                  G=args.G, **sampling))
        source = f"sampled from {chosen['path']}"
    else:
        sampled = timed("rollouts", lambda: _rollouts_sample(records, args, checkpoint.tokenizer, policy, rewards))
        source = f"logged rollouts {args.rollouts}"
    batch = sampled.batch
    echo(f"update batch: B={batch.B} prompts × G={batch.G} responses, {source}; mean reward "
         f"{fmt(float(batch.rewards.mean()), '.4g')}; {sampled.eos_count}/{batch.num_sequences} ended with a stop "
         "token")
    if sampled.advantage_info.message():
        echo(f"note: {sampled.advantage_info.message()}")
    evaluation = timed("sample_eval", lambda: _sample(world, policy, params, pool, chosen["eval_indices"],
                                                      seed=args.eval_seed, G=args.eval_G, **sampling))
    echo(f"evaluation batch: B={evaluation.batch.B} prompts × G={evaluation.batch.G} responses, drawn independently "
         f"(seed {args.eval_seed})")

    return types.SimpleNamespace(checkpoint=checkpoint, policy=policy, adam=adam, params=params, chosen=chosen,
                                 records=records, sampled=sampled, source=source, batch=batch, evaluation=evaluation,
                                 memory_plan=memory_plan, store=store, prompt_chunk=prompt_chunk,
                                 seq_chunk=seq_chunk, token_chunk=token_chunk)


def run_probe(args: argparse.Namespace, *, progress: bool | None, echo=print, world=None) -> dict:
    """The ``probe`` command: load, sample U and E, δH₁ on U, the step, ΔH on E, the sweep on E; print the report;
    write JSON and the plot.

    Under torchrun (``world`` from ``funcprobe.distributed.init_from_env``): every rank loads the checkpoint, samples
    its contiguous shard of each batch's prompts (``first_prompt_index`` = the shard's start, so the batches do not
    depend on the number of ranks), the shards are gathered so that every rank holds both batches, and δH₁, ΔH and
    the sweep are computed sharded (issue 6). Only rank 0 prints and writes the JSON and the plot, at the very end
    (the JSON atomically).
    """
    from .delta_h1 import delta_h1
    from .distributed import COMM, SINGLE
    from .report import format_report, peak_memory, plot_lr_sweep, reset_peak_memory, summary, versions, write_json
    from .realised import crn_delta_h, snis_delta_h
    from .sweep import lr_sweep
    from .update import apply_step

    _check_probe_args(args)
    world = SINGLE if world is None else world
    if not world.is_main:
        echo, progress = (lambda *a, **k: None), False
    started = time.perf_counter()
    timings: dict[str, float] = {}
    reset_peak_memory(args.device)

    def timed(phase, fn):
        log.info("%s …", phase)
        start = time.perf_counter()
        value = fn()
        timings[phase] = time.perf_counter() - start
        return value

    loaded = _load_and_sample(args, progress=progress, echo=echo, world=world, timed=timed)
    checkpoint, policy, adam, params = loaded.checkpoint, loaded.policy, loaded.adam, loaded.params
    chosen, records, sampled, source = loaded.chosen, loaded.records, loaded.sampled, loaded.source
    batch, evaluation, memory_plan, store = loaded.batch, loaded.evaluation, loaded.memory_plan, loaded.store
    prompt_chunk, seq_chunk, token_chunk = loaded.prompt_chunk, loaded.seq_chunk, loaded.token_chunk

    chunks = dict(seq_chunk=seq_chunk, token_chunk=token_chunk, progress=progress)
    step = dict(lr=args.lr, objective=args.objective)
    prediction = timed("delta_h1", lambda: _noting(echo, lambda: delta_h1(
        params, batch, policy=policy, adam=adam, units=args.units_value, store_unit_vectors=store, world=world,
        **step, **chunks)))
    # The step from δH₁'s own Ȳ: no second gradient pass over the update batch.
    new_params, _ = timed("update", lambda: apply_step(params, adam, prediction.step, **step))
    realised = {}
    if args.realised in ("crn", "both"):
        realised["crn"] = timed("realised_crn", lambda: crn_delta_h(params, new_params, policy=policy,
                                                                    sample=evaluation, prompt_chunk=prompt_chunk,
                                                                    world=world, **chunks))
    if args.realised in ("snis", "both"):
        realised["snis"] = timed("realised_snis", lambda: snis_delta_h(params, new_params, policy=policy,
                                                                       batch=evaluation.batch, world=world, **chunks))
    # The dtype's systematic error against the SEs: a note when rounding, not sampling, could dominate (bf16 on big
    # batches; README "Precision: when to pay for float32 on a GPU").
    from .precision import check_precision

    primary = realised.get("snis") or realised.get("crn")
    precision = _noting(echo, lambda: check_precision(prediction, policy, primary))
    in_sample = None
    if args.in_sample:
        in_sample = timed("in_sample", lambda: snis_delta_h(params, new_params, policy=policy, batch=batch,
                                                            in_sample=True, world=world, **chunks))
    sweep = None
    if args.etas is not None:
        sweep = timed("lr_sweep", lambda: lr_sweep(params, evaluation, policy=policy, step=prediction.step,
                                                   etas=args.etas, prediction=prediction, method=args.realised,
                                                   prompt_chunk=prompt_chunk, world=world, **chunks))
    echo("\n" + format_report(prediction, realised, sweep, in_sample=in_sample, details=args.verbose))
    timings["total"] = time.perf_counter() - started

    config = {name: value for name, value in vars(args).items()
              if name not in ("etas", "units_value", "memory_budget_bytes", "objective")}
    config.update(etas=args.etas, units_parsed=args.units_value)
    results = {
        "command": "probe",
        "config": config,
        "versions": versions(),
        "seed": args.seed,
        "eval_seed": args.eval_seed,
        "checkpoint": {"path": checkpoint.path, "layout": checkpoint.layout, "step": checkpoint.step,
                       "base": checkpoint.base, "adapter_dir": checkpoint.adapter_dir,
                       "optimizer_path": checkpoint.optimizer_path, "prompts_path": checkpoint.prompts_path},
        "policy": {"num_params": policy.num_params, "dtype": policy.dtype, "device": policy.device,
                   "temperature": policy.temperature, "logsoftmax_dtype": policy.logsoftmax_dtype,
                   "adam_steps": sorted(set(adam.step.values()))},
        "batch": _batch_section(sampled, chosen, None if records is not None else chosen["indices"],
                                None if records is not None else args.seed, source=source),
        "eval_batch": _batch_section(evaluation, chosen, chosen["eval_indices"], args.eval_seed,
                                     source=f"sampled from {chosen['path']}"),
        "settings": {"sources": args.sources, "G": args.G, "B": args.B, "max_new_tokens": args.max_new_tokens,
                     "temperature": policy.temperature, "chat_template": args.chat_template,
                     "rewards": args.reward or ["answer"],
                     "trainer_config": None if args.trainer_settings is None else args.trainer_settings.to_dict()},
        "summary": summary(prediction, realised, in_sample),
        "delta_h1": prediction.to_dict(),
        "step": prediction.step.to_dict(),
        "objective": args.objective.to_dict(),
        "realised": {method: result.to_dict() for method, result in realised.items()},
        "precision": precision,
        "in_sample": None if in_sample is None else in_sample.to_dict(),
        "lr_sweep": None if sweep is None else sweep.to_dict(),
        "timings": timings,
        "peak_memory": peak_memory(args.device),
        "memory_plan": memory_plan,
        "distributed": {"world_size": world.size, "backend": world.backend, "rank": world.rank,
                        "per_rank_note": "timings, peak memory and δH₁'s pass counts are rank 0's own",
                        "comm_rank0": COMM.snapshot()},
    }
    if not world.is_main:
        return results
    if args.out is not None:
        echo(f"\nwrote {write_json(args.out, results)}")
    if args.plot is not None:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        echo(f"wrote {plot_lr_sweep(sweep, args.plot)}")
    return results


def run_attribute(args: argparse.Namespace, *, progress: bool | None, echo=print) -> dict:
    """The ``attribute`` command: ``probe``'s loading and batches, then ``funcprobe.attribute`` with the
    interventions; prints the summary and writes ``--out`` JSON."""
    from .attribution import attribute
    from .attribution_page import batch_text
    from .report import to_jsonable, versions, write_json

    _check_probe_args(args)
    interventions = parse_interventions(args.intervention or DEFAULT_INTERVENTIONS)
    quantiles = parse_quantiles(args.quantiles)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def timed(phase, fn):
        start = time.perf_counter()
        value = fn()
        timings[phase] = time.perf_counter() - start
        return value

    from .distributed import SINGLE

    loaded = _load_and_sample(args, progress=progress, echo=echo, world=SINGLE, timed=timed,
                              policy_extra={"attn_implementation": "eager"})
    batch = loaded.batch
    result = timed("attribute", lambda: attribute(
        loaded.params, batch, policy=loaded.policy, adam=loaded.adam, objective=args.objective,
        units=args.units_value, lr=args.lr, seq_chunk=loaded.seq_chunk, token_chunk=loaded.token_chunk,
        quantiles=quantiles, interventions=interventions, evaluation=loaded.evaluation.batch, progress=progress))
    echo("\n" + str(result))
    timings["total"] = time.perf_counter() - started
    config = {name: value for name, value in vars(args).items()
              if name not in ("etas", "units_value", "memory_budget_bytes", "objective")}
    results = {
        "command": "attribute", "config": config, "versions": versions(), "seed": args.seed,
        "eval_seed": args.eval_seed,
        "checkpoint": {"path": loaded.checkpoint.path, "step": loaded.checkpoint.step,
                       "base": loaded.checkpoint.base},
        "objective": args.objective.to_dict(), "attribution": result.to_dict(),
        **batch_text(batch, loaded.checkpoint.tokenizer), "objective_gain": result.objective_gain,
        "timings": timings,
    }
    if args.out is not None:
        echo(f"\nwrote {write_json(args.out, results)}")
    if args.html is not None:
        from .attribution_page import render_attribution_html

        page = Path(args.html)
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text(render_attribution_html(to_jsonable(results)), encoding="utf-8")
        echo(f"wrote {page}")
    if args.plot is not None:
        from .report import plot_attribution

        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        echo(f"wrote {plot_attribution(results, args.plot)}")
    return results


@contextlib.contextmanager
def _library_bars(enabled: bool):
    """transformers' and huggingface_hub's own progress bars (weight loading, downloads) on or off, restored after."""
    if enabled:
        yield
        return
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    transformers_was_on = hf_logging.is_progress_bar_enabled()
    hub_was_on = not hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    hub_utils.disable_progress_bars()
    try:
        yield
    finally:
        if transformers_was_on:
            hf_logging.enable_progress_bar()
        if hub_was_on:
            hub_utils.enable_progress_bars()


# ----------------------------------------------------------------------------------------------------- entry point
def _one_line(error: BaseException) -> str:
    if isinstance(error, KeyError) and len(error.args) == 1:
        text = str(error.args[0])
    else:
        text = str(error) or type(error).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    progress = False if args.quiet else None  # None: bars only when stderr is a terminal
    world = None
    if args.command == "probe" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .distributed import init_from_env

        world = init_from_env(timeout_s=args.dist_timeout, device=args.device)
        if args.device.startswith("cuda"):
            args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        if not world.is_main:
            logging.getLogger().setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # A transformers deprecation that PEFT triggers on every model load; nothing a user can act on.
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                    category=FutureWarning)
            if args.command == "demo" and args.quick:
                from .demo import DemoConfig, run_demo

                run_demo(dataclasses.replace(DemoConfig.quick(), seed=args.seed), out_dir=args.out,
                         plot=not args.no_plot, progress=progress)
            elif args.command == "demo":
                from .demo_real import RealDemoConfig, run_real_demo

                run_real_demo(RealDemoConfig(seed=args.seed), out_dir=args.out, plot=not args.no_plot,
                              progress=progress)
            elif args.command == "probe":
                run_probe(args, progress=progress, world=world)
            elif args.command == "attribute":
                run_attribute(args, progress=progress)
        return 0
    except USER_ERRORS as error:
        _record(world, error)
        line = _one_line(error)
        if getattr(error, "traceback_text", None):  # the user's reward function raised: its own traceback matters
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
