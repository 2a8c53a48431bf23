"""Which tokens drive the entropy change of a run's next step, and what token-selection fixes would do.

    make demo                                   # trains runs/demo/run/checkpoint-3 (SmolLM2-135M-Instruct + LoRA)
    python examples/attribution.py runs/demo/run --out runs/attribution

What ``funcprobe attribute`` does, written out with the library API (spec §8 in funcprobe's docs/estimators.md):

1. load the checkpoint (policy as the trainer loads it; funcprobe switches to eager attention only for its
   forward-mode passes) and its AdamW state, and the run's trainer config (``trainer_config.json`` beside the checkpoints: the step's loss_type, scale_rewards, β,
   G, max_new_tokens);
2. sample the update batch U and an independent evaluation batch E from the checkpoint's own policy, render the
   prompts with the chat template and score them with the run's reward (TRL's reward-function signature);
3. ``attribute(..., evaluation=E)``: the held-out first-order change δĤ₁(E) (∇H from E, spec §9) of the step, its
   gradient term split over U's tokens (Σ a = grad_term exactly), next to Cui et al.'s covariance proxy and the
   next-token entropy, and three interventions on the step (Clip-Cov-like, keep the high-entropy 20%, positive
   advantages only), each with its δĤ₁(E), its realised ΔĤ on E paired with it (ESS, k̂, reliability) and its
   first-order objective gain;
4. print what a researcher reads first — δĤ₁(E) ± SE beside the realised ΔĤ and their paired difference, the
   correlations, the tokens that push the entropy down most, and the intervention table ("entropy kept per unit of
   objective given up") — and write the JSON, the HTML page (tokens coloured by attribution) and the scatter plot.

Run on the tiny test checkpoint with ``--quick`` (the test suite does).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from funcprobe import attribute
from funcprobe.attribution import describe_diagnostics
from funcprobe.attribution_page import batch_text, render_attribution_html
from funcprobe.checkpoints import load_checkpoint
from funcprobe.objective import Objective
from funcprobe.prompts import load_prompt_pool, render_prompts
from funcprobe.report import plot_attribution, to_jsonable
from funcprobe.sampling import sample_batch
from funcprobe.trainer_config import read_trainer_config, trainer_settings
from funcprobe.trl_rewards import TRLRewards, load_reward_function

DEMO_REWARD = "funcprobe.demo_real:arithmetic_reward"
INTERVENTIONS = {"clip_cov": ("clip_cov", 0.02), "high_entropy": ("high_entropy", 0.2),
                 "positive_only": "positive_only"}


def main(argv: list[str] | None = None, echo=print) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default="runs/demo/run",
                        help="a checkpoint folder or a run folder holding checkpoint-N/ (default: make demo's run)")
    parser.add_argument("--trainer-config", default=None,
                        help="the run's GRPOConfig fields (default: trainer_config.json in the run folder, if any)")
    parser.add_argument("--reward", default=None,
                        help=f"reward function, module:function or a built-in (default: {DEMO_REWARD}, the demo's "
                        "graded arithmetic reward)")
    parser.add_argument("-B", type=int, default=8, help="prompts in the update batch (default 8)")
    parser.add_argument("--eval-B", type=int, default=16, help="prompts in the evaluation batch (default 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=None,
                        help="the step's learning rate (default: the optimizer state's, i.e. the trainer's next step)")
    parser.add_argument("--out", default=None, help="a folder for attribution.json and attribution.png")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (B=4, G=4, 6 new tokens)")
    args = parser.parse_args(argv)

    run = Path(args.run)
    if not run.exists():
        parser.error(f"{run} does not exist: run `make demo` first (it trains runs/demo/run), or pass a checkpoint "
                     "folder.")

    # 1. The checkpoint and the step its trainer takes.
    checkpoint = load_checkpoint(run)
    policy, adam, tokenizer = checkpoint.policy, checkpoint.adam, checkpoint.tokenizer
    params = policy.params
    config_path = Path(args.trainer_config) if args.trainer_config else run / "trainer_config.json"
    if config_path.is_file():
        settings = trainer_settings(read_trainer_config(config_path), source=str(config_path))
        objective, G, max_new_tokens = settings.objective, settings.G, settings.max_new_tokens
        echo(f"trainer config {config_path}: loss_type={objective.loss_type}, scale_rewards={objective.scale_rewards}, "
             f"beta={objective.beta}, G={G}, max_new_tokens={max_new_tokens}")
    else:
        objective, G, max_new_tokens = Objective(), 4, 6 if args.quick else 24
        echo(f"no trainer config at {config_path}: Dr. GRPO defaults ({objective.loss_type}, G={G})")
    B, eval_B = (4, 4) if args.quick else (args.B, args.eval_B)
    if args.quick:
        G, max_new_tokens = 4, 6
    reward = load_reward_function(args.reward or DEMO_REWARD)
    echo(f"loaded {checkpoint.path} (step {checkpoint.step})")

    # 2. U and E: other prompts, another seed.
    pool = load_prompt_pool(checkpoint.prompts_path)
    if len(pool) < B + eval_B:
        raise SystemExit(f"the pool {pool.path} has {len(pool)} prompts; U and E need {B + eval_B} (lower -B/--eval-B).")

    def draw(rows, seed):
        ids = render_prompts(pool.select(rows), tokenizer)
        rewards = TRLRewards.for_pool([reward], pool, rows, tokenizer=tokenizer, prompt_ids=ids)
        return sample_batch(policy, params, ids, G=G, reward_fn=rewards, scale_rewards=objective.scale_rewards,
                            max_new_tokens=max_new_tokens, seed=seed, tokenizer=tokenizer, prompt_index=rows)

    update = draw(list(range(B)), args.seed)
    evaluation = draw(list(range(B, B + eval_B)), args.seed + 1)
    echo(f"U: {B} prompts × {G} responses (mean reward {float(update.batch.rewards.mean()):.3f}); "
         f"E: {eval_B} × {G}")

    # 3. The attribution, its proxies and the interventions.
    result = attribute(params, update.batch, policy=policy, adam=adam, objective=objective, lr=args.lr,
                       interventions=INTERVENTIONS, evaluation=evaluation.batch)
    # 4. What to read: the held-out first-order change (its SEs over E's prompts), the realised change on the same E,
    #    and their difference paired prompt by prompt.
    paired = result.paired
    echo(f"\nδĤ₁(E) = {result.deltaH1:.4g} ± {result.se_deltaH1:.2g} nats per response = grad_term "
         f"{result.grad_term:.4g} ± {result.se_grad_term:.2g} + state_term {result.state_term:.4g}; realised on E: "
         f"ΔĤ = {result.realised_delta_h:.4g} ± {result.realised_se:.2g}; paired ΔĤ − δĤ₁(E) = "
         f"{paired['paired_difference']:.3g} ± {paired['paired_se']:.2g} ({describe_diagnostics(paired)})")
    correlations = result.summary["correlations"]
    echo(f"corr(a, −η·cov): Pearson {correlations['pearson_cov']:.3f}, Spearman {correlations['spearman_cov']:.3f}; "
         f"corr(a, entropy): Pearson {correlations['pearson_entropy']:.3f}, Spearman "
         f"{correlations['spearman_entropy']:.3f}")
    echo("\ntokens that push the entropy down most (a < 0):")
    response = result.response_mask
    values = result.token.masked_fill(~response, math.inf)
    for flat in values.reshape(-1).argsort()[:5].tolist():
        n, g, k = divmod(flat // values.shape[2], values.shape[1]) + (flat % values.shape[2],)
        ids = update.batch.input_ids[n, g]
        before = tokenizer.decode(ids[max(0, k - 6):k].tolist())
        echo(f"  a = {float(result.token[n, g, k]) + 0.0:.3g}  prompt {n}, response {g}: …{before!r} → "
             f"{tokenizer.decode([int(ids[k])])!r} (A = {float(update.batch.advantages[n, g]):.2f}, "
             f"H = {float(result.entropy[n, g, k]):.2f} nats, cov = {float(result.covariance[n, g, k]):.3g})")
    echo("\nintervention      tokens kept   δĤ₁(E)       ΔĤ on E (± SE)          objective gain   kept/given up: "
         "predicted, realised")
    unchanged = f"{result.realised_delta_h:+.4g} ± {result.realised_se:.2g}"
    echo(f"{'(unchanged)':<17} {int(response.sum()):>11}   {result.deltaH1:<+11.4g}  {unchanged:<23} "
         f"{result.objective_gain:<+16.4g}")
    for name, row in result.interventions.items():
        given_up = result.objective_gain - row["objective_gain"]
        kept = row["deltaH1"] - result.deltaH1
        ratio = kept / given_up if given_up else math.nan
        realised_ratio = ((row["realised_delta_h"] - result.realised_delta_h) / given_up
                          if given_up and row["realised_delta_h"] is not None else math.nan)
        realised = ("–" if row["realised_delta_h"] is None
                    else f"{row['realised_delta_h']:+.4g} ± {row['realised_se']:.2g}")
        echo(f"{name:<17} {row['tokens_kept']:>11.0f}   {row['deltaH1']:<+11.4g}  {realised:<23} "
             f"{row['objective_gain']:<+16.4g} {ratio:.3g}, {realised_ratio:.3g}  ({describe_diagnostics(row)})")

    results = to_jsonable({"checkpoint": {"path": str(checkpoint.path), "step": checkpoint.step},
                           "objective": objective.to_dict(), "attribution": result.to_dict(),
                           "objective_gain": result.objective_gain, **batch_text(update.batch, tokenizer)})
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "attribution.json").write_text(json.dumps(results), encoding="utf-8")
        (out / "attribution.html").write_text(render_attribution_html(results), encoding="utf-8")
        echo(f"\nwrote {out / 'attribution.json'}, {out / 'attribution.html'} and "
             f"{plot_attribution(results, out / 'attribution.png')}")
    return {"result": result, "update": update, "evaluation": evaluation}


if __name__ == "__main__":
    main()
