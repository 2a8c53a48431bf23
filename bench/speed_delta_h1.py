"""Wall time of one full δH₁ evaluation (spec §2–§5): funcprobe's ``delta_h1`` vs a re-implementation of the seed.

    python bench/speed_delta_h1.py                 # the full benchmark (two Qwen2 configurations, 3 repeats)
    python bench/speed_delta_h1.py --quick         # a smoke run: tiny model, one repeat, a few seconds
    python bench/speed_delta_h1.py --configs b --repeats 5 --json out.json

Everything runs in ONE process, on the same model, the same batch, the same AdamW state, in float32:

* ``funcprobe``: ``delta_h1(policy.params, batch, policy=…, adam=…, units="prompt", seq_chunk=SC,
  store_unit_vectors=MODE)`` with its standard errors, for MODE ∈ {stored (True), recompute (False)} and
  SC ∈ {1, G}. The headline of a mode is its faster SC.
* ``reference``: the seed's stateful algorithm, written out here: a deep copy of the PEFT model whose LoRA tensors
  ``requires_grad``; every forward is an ordinary module call over one prompt's G sequences producing full
  [G, L, V] logits and a full-vocabulary ``log_softmax``;
    - X pass: per prompt, forward, loss = Σ_g sg[S_g − S̄_{−g}]/G · S_g / B, ``.backward()`` accumulating into
      ``param.grad``; after the last prompt the grads are copied into an X̄ buffer (float32, CPU) and zeroed;
    - Y pass: per prompt, forward again, ``torch.autograd.grad`` of Σ_g A_g/(G L_n) · S_g / B into a Ȳ buffer;
    - the AdamW algebra of spec §4 by hand (P, η_g, Δθ_state at this batch's v');
    - diagonal pass: per prompt, forward again and two ``torch.autograd.grad`` calls (retain_graph) for X_n and
      Y_n, giving X_n·P·Y_n, X_n·P·ΣY, Y_n·P·ΣX and X_n·Δθ_state;
    - the U-statistic, row means, plug-in and jackknife algebra of spec §5 by hand (float64 scalars).
  Passes: 3B forwards (each over G sequences), 4B backwards (B ``.backward()`` + 3B ``autograd.grad``).

Correctness guard: the reference's U_cross and deltaH1 must equal every funcprobe run's to ``--rtol`` (default
1e-5), or the script exits 1 — the benchmark compares equal computations. The difference is measured relative to
the magnitude of the terms the quantity is computed from: U_cross = [ΣX·P·ΣY − Σ_u X_u·P·Y_u] / (U(U−1)) is a
difference of two nearly equal float32-accurate numbers (in configuration a they are ~80× larger than U_cross), so
no float32 method gets U_cross to 1e-5 of itself there; the plain relative differences and the cancellation factor
are printed beside it. Unless ``--no-float64-check``, an untimed funcprobe run on a float64 copy of the model gives
the exact value, and every method's error from it is printed.

Timing: after one untimed warm-up of every method (whose numbers are the ones checked), the methods are timed in
round-robin order ``--repeats`` times (so background load drifts hit all of them alike); the table reports the
median wall time (and, for reference, the median CPU time of the process, all threads). Threads: min(2, cores), 1 with
``--quick``. Passes: funcprobe's ``forward_passes``/``backward_passes`` (a "forward" is one sequence chunk:
1 sequence at SC=1, G sequences at SC=G); the reference's are counted by hand as it runs. "sequences forwarded"
puts both on one scale.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from funcprobe import AdamState, Policy, delta_h1, testing  # noqa: E402
from funcprobe.testing import random_batch, tiny_peft_model  # noqa: E402

#: Model configurations (Qwen2, LoRA on q,k,v,o,gate,up,down, random non-zero A and B, float32, untied head).
CONFIGS = {
    "a": dict(label="a: vocab-dominated", vocab_size=151_936, hidden_size=256, num_layers=2, num_heads=4,
              num_kv_heads=2, intermediate_size=1024, r=16),
    "b": dict(label="b: decoder-dominated", vocab_size=4_096, hidden_size=512, num_layers=8, num_heads=8,
              num_kv_heads=2, intermediate_size=1536, r=16),
    "quick": dict(label="quick", vocab_size=512, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  intermediate_size=64, r=4),
}
#: Batch: B prompts × G responses; prompt and response lengths drawn uniformly from these inclusive ranges.
FULL_BATCH = dict(B=4, G=4, prompt_len=(24, 40), response_len=(64, 128))
QUICK_BATCH = dict(B=4, G=4, prompt_len=(6, 10), response_len=(8, 16))
#: AdamW: a warm state (as after `STEP` steps) so that P is well conditioned and Δθ_state is non-trivial.
LR, WEIGHT_DECAY, STEP = 1e-5, 0.01, 9
TARGET_STORED, TARGET_RECOMPUTE = 2.5, 1.3
RTOL = 1e-5


# --------------------------------------------------------------------------------------------------- setup
def build(config: dict, batch_shape: dict, seed: int = 0):
    """(policy, batch, adam state) for one configuration."""
    options = {k: v for k, v in config.items() if k != "label"}
    r = options.pop("r")
    max_len = batch_shape["prompt_len"][1] + batch_shape["response_len"][1]
    peft_model = tiny_peft_model("qwen2", r=r, lora_alpha=2 * r, init_lora_weights=False, seed=seed,
                                 dtype=torch.float32, tie_word_embeddings=False,
                                 max_position_embeddings=max(256, max_len), **options)
    policy = Policy.from_peft(peft_model)
    batch = random_batch(batch_shape["B"], batch_shape["G"], vocab_size=config["vocab_size"],
                         prompt_len=batch_shape["prompt_len"], response_len=batch_shape["response_len"], seed=seed)
    return policy, batch, warm_adam_state(policy.params, seed=seed)


def warm_adam_state(params: dict, *, seed: int = 0) -> AdamState:
    """AdamW state with m ~ 1e-3 N(0, 1), v ~ 1e-6 U(0.5, 1.5), t = STEP (loaded like a real optimizer's)."""
    return testing.warm_adam_state(params, lr=LR, weight_decay=WEIGHT_DECAY, step=STEP, seed=seed)


# ------------------------------------------------------------------------------------------- the reference
class SeedReference:
    """The seed's stateful δH₁: module parameters with requires_grad, full [G, L, V] logits, three passes."""

    def __init__(self, policy: Policy, adam: AdamState):
        self.model = copy.deepcopy(policy.module).eval()
        self.names = list(policy.param_names)
        named = dict(self.model.named_parameters())
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        with torch.no_grad():
            for name in self.names:
                named[name].copy_(policy.params[name])
        self.leaves = [named[name].requires_grad_(True) for name in self.names]
        self.adam = adam

    def _sequence_logprobs(self, batch, n: int) -> torch.Tensor:
        """S_{n,g} for prompt n's G sequences: one module forward, full logits, full log_softmax (float64 [G])."""
        input_ids = batch.input_ids[n]
        attention_mask = batch.attention_mask[n].long()
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False).logits  # [G, L, V]
        log_probs = torch.log_softmax(logits.to(torch.float32), dim=-1)
        token_logprobs = log_probs[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        mask = batch.response_mask[n][:, 1:]
        return (token_logprobs.to(torch.float64) * mask).sum(-1)

    @staticmethod
    def _x_weights(logprobs: torch.Tensor) -> torch.Tensor:
        G = logprobs.shape[0]
        leave_one_out = (logprobs.sum() - logprobs) / (G - 1)
        return (logprobs - leave_one_out) / G

    def run(self, batch) -> dict:
        B, G = batch.B, batch.G
        y_weights = batch.advantages.to(torch.float64) / (G * batch.length_norm[:, None].to(torch.float64))
        forwards = backwards = 0
        timings = {}
        started = time.perf_counter()
        for leaf in self.leaves:
            leaf.grad = None

        # X pass: .backward() accumulates B·X̄ / B into param.grad; copy into the X̄ buffer.
        logprobs_all = torch.zeros(B, G, dtype=torch.float64)
        for n in range(B):
            logprobs = self._sequence_logprobs(batch, n)
            forwards += 1
            logprobs_all[n] = logprobs.detach()
            loss = (self._x_weights(logprobs.detach()) * logprobs).sum() / B
            loss.backward()
            backwards += 1
        x_bar = [leaf.grad.detach().clone() for leaf in self.leaves]
        for leaf in self.leaves:
            leaf.grad = None
        timings["x_pass_s"] = time.perf_counter() - started

        # Y pass: autograd.grad of the RL surrogate, accumulated into the Ȳ buffer.
        phase = time.perf_counter()
        y_bar = [torch.zeros_like(leaf) for leaf in self.leaves]
        for n in range(B):
            logprobs = self._sequence_logprobs(batch, n)
            forwards += 1
            grads = torch.autograd.grad((y_weights[n] * logprobs).sum() / B, self.leaves)
            backwards += 1
            for total, grad in zip(y_bar, grads):
                total.add_(grad)
        timings["y_pass_s"] = time.perf_counter() - phase

        # The AdamW step of spec §4 on g = −Ȳ, by hand (float64).
        phase = time.perf_counter()
        preconditioner, delta_state, eta_g = [], [], None
        for name, leaf, ybar in zip(self.names, self.leaves, y_bar):
            hyper = self.adam.hyper[name]
            t = self.adam.step[name] + 1
            bc1, bc2 = 1 - hyper.beta1 ** t, 1 - hyper.beta2 ** t
            g = -ybar.to(torch.float64)
            m = self.adam.exp_avg[name].to(torch.float64)
            v = hyper.beta2 * self.adam.exp_avg_sq[name].to(torch.float64) + (1 - hyper.beta2) * g * g
            P = 1 / (v.sqrt() / math.sqrt(bc2) + hyper.eps)
            preconditioner.append(P)
            delta_state.append(-(hyper.lr / bc1) * hyper.beta1 * m * P
                               - hyper.lr * hyper.weight_decay * leaf.detach().to(torch.float64))
            eta_g = hyper.lr * (1 - hyper.beta1) / bc1
            lr = hyper.lr
        sum_x = [B * x.to(torch.float64) for x in x_bar]
        sum_y = [B * y.to(torch.float64) for y in y_bar]

        def dot(a, b, weight=None):
            if weight is None:
                return float(sum(torch.dot(p.reshape(-1), q.reshape(-1)) for p, q in zip(a, b)))
            return float(sum(torch.dot(p.reshape(-1), (w * q).reshape(-1)) for p, q, w in zip(a, b, weight)))

        # Diagonal pass: per prompt, forward again and two autograd.grad calls for X_n and Y_n.
        diag = torch.zeros(B, dtype=torch.float64)
        x_dot_sum_y = torch.zeros(B, dtype=torch.float64)
        y_dot_sum_x = torch.zeros(B, dtype=torch.float64)
        state_dots = torch.zeros(B, dtype=torch.float64)
        for n in range(B):
            logprobs = self._sequence_logprobs(batch, n)
            forwards += 1
            x_n = torch.autograd.grad((self._x_weights(logprobs.detach()) * logprobs).sum(), self.leaves,
                                      retain_graph=True)
            y_n = torch.autograd.grad((y_weights[n] * logprobs).sum(), self.leaves)
            backwards += 2
            x_n = [x.to(torch.float64) for x in x_n]
            y_n = [y.to(torch.float64) for y in y_n]
            diag[n] = dot(x_n, y_n, preconditioner)
            x_dot_sum_y[n] = dot(x_n, sum_y, preconditioner)
            y_dot_sum_x[n] = dot(y_n, sum_x, preconditioner)
            state_dots[n] = dot(x_n, delta_state)
        timings["diag_pass_s"] = time.perf_counter() - phase

        # U-statistic, row means, plug-in and jackknife SEs (spec §5), written out.
        U = B
        total = dot(sum_x, sum_y, preconditioner)
        u_cross = (total - float(diag.sum())) / (U * (U - 1))
        row_means = (x_dot_sum_y - diag + y_dot_sum_x - diag) / (2 * (U - 1))
        zeta1 = float(((row_means - u_cross) ** 2).sum()) / (U - 1)
        u_loo = (U * u_cross - 2 * row_means) / (U - 2)
        state_term = -float(state_dots.sum()) / U
        delta_loo = -eta_g * u_loo - (state_dots.sum() - state_dots) / (U - 1)

        def jackknife(values):
            return math.sqrt((U - 1) / U * float(((values - values.mean()) ** 2).sum()))

        timings["total_s"] = time.perf_counter() - started
        return dict(U_cross=u_cross, deltaH1=-eta_g * u_cross + state_term, grad_term=-eta_g * u_cross,
                    state_term=state_term, se_plugin=math.sqrt(4 * zeta1 / U), se_jack=jackknife(u_loo),
                    se_deltaH1=jackknife(delta_loo), seed_deltaH1=-lr * u_cross, logprobs=logprobs_all,
                    total_xpy=total, diag_sum=float(diag.sum()), eta_g=eta_g, n_units=U,
                    forward_passes=forwards, backward_passes=backwards, sequences_forwarded=forwards * G,
                    timings=timings)


# ------------------------------------------------------------------------------------------------ running
def run_funcprobe(policy, batch, adam, *, store: bool, seq_chunk: int) -> dict:
    start, cpu = time.perf_counter(), time.process_time()
    result = delta_h1(policy.params, batch, policy=policy, adam=adam, units="prompt", seq_chunk=seq_chunk,
                      store_unit_vectors=store)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return dict(U_cross=result.U_cross, deltaH1=result.deltaH1, grad_term=result.grad_term,
                state_term=result.state_term, se_plugin=result.se_plugin, se_jack=result.se_jack,
                se_deltaH1=result.se_deltaH1, seed_deltaH1=result.seed_deltaH1,
                total_xpy=result.bars_dot * result.n_units ** 2, diag_sum=result.diag_sum, eta_g=result.eta_g,
                n_units=result.n_units, forward_passes=result.forward_passes, backward_passes=result.backward_passes,
                sequences_forwarded=result.sequences_forwarded, token_chunk=result.token_chunk,
                timings=dict(result.timings), wall_s=wall, cpu_s=cpu)


def run_reference(reference: SeedReference, batch) -> dict:
    start, cpu = time.perf_counter(), time.process_time()
    out = reference.run(batch)
    out["wall_s"], out["cpu_s"] = time.perf_counter() - start, time.process_time() - cpu
    out.pop("logprobs")
    return out


def methods_for(G: int) -> list[tuple[str, str, int | None]]:
    """(method, mode, seq_chunk) in the order they are timed."""
    out = [("reference", "seed (recompute)", None)]
    for mode in ("stored", "recompute"):
        for seq_chunk in (1, G):
            out.append(("funcprobe", mode, seq_chunk))
    return out


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def cancellation_scales(out: dict) -> tuple[float, float]:
    """The magnitudes U_cross and deltaH1 are computed from: (|ΣX·P·ΣY| + |Σ_u X_u·P·Y_u|) / (U(U−1)), and
    |η_g| times that plus |state_term|.

    U_cross is a difference of two nearly equal numbers (ΣX·P·ΣY and the diagonal sum, each known to float32
    accuracy); its relative error is that of its inputs times their ratio to it, whatever the method. Comparing
    on the scale of the inputs tests what float32 can deliver; the plain relative difference is reported too.
    """
    U = out["n_units"]
    scale_u = (abs(out["total_xpy"]) + abs(out["diag_sum"])) / (U * (U - 1))
    return max(scale_u, abs(out["U_cross"])), max(abs(out["eta_g"]) * scale_u + abs(out["state_term"]),
                                                   abs(out["deltaH1"]))


def benchmark(key: str, config: dict, batch_shape: dict, repeats: int, warmup: bool, float64_check: bool,
              log) -> dict:
    gc.collect()
    policy, batch, adam = build(config, batch_shape)
    reference = SeedReference(policy, adam)
    methods = methods_for(batch.G)
    log(f"[{config['label']}] {policy.num_params:,} LoRA scalars, L = {batch.L}, "
        f"{int(batch.response_mask.sum())} response tokens")

    def once(method, mode, seq_chunk):
        gc.collect()
        if method == "reference":
            out = run_reference(reference, batch)
        else:
            out = run_funcprobe(policy, batch, adam, store=mode == "stored", seq_chunk=seq_chunk)
        log(f"  {method:9s} {mode:17s} seq_chunk={seq_chunk}: {out['wall_s']:.2f} s wall, {out['cpu_s']:.2f} s CPU, "
            f"load {os.getloadavg()[0]:.2f}")
        return out

    first = {m: once(*m) for m in methods}  # warm-up (also the correctness check)
    walls = {m: [] for m in methods}
    cpus = {m: [] for m in methods}
    if not warmup:  # quick mode: the first run is the timed one
        for m in methods:
            walls[m].append(first[m]["wall_s"])
            cpus[m].append(first[m]["cpu_s"])
    for _ in range(repeats - (0 if warmup else 1)):
        for m in methods:
            out = once(*m)
            walls[m].append(out["wall_s"])
            cpus[m].append(out["cpu_s"])

    # reference S vs funcprobe S (same tokens, same model)
    funcprobe_logprobs = policy.sequence_logprobs(policy.params, batch)
    with torch.no_grad():
        reference_logprobs = torch.stack([reference._sequence_logprobs(batch, n) for n in range(batch.B)])
    max_logprob_diff = float((funcprobe_logprobs - reference_logprobs).abs().max())

    truth = float64_truth(policy, batch, adam, log) if float64_check else None
    rows = []
    ref = first[methods[0]]
    scale_u, scale_d = cancellation_scales(ref)
    ref_median = statistics.median(walls[methods[0]])
    for m in methods:
        out = first[m]
        median = statistics.median(walls[m])
        rows.append(dict(config=key, label=config["label"], method=m[0], mode=m[1], seq_chunk=m[2],
                         median_s=median, walls_s=walls[m], speedup=ref_median / median,
                         median_cpu_s=statistics.median(cpus[m]), cpus_s=cpus[m],
                         forward_passes=out["forward_passes"], backward_passes=out["backward_passes"],
                         sequences_forwarded=out["sequences_forwarded"], U_cross=out["U_cross"],
                         deltaH1=out["deltaH1"], se_jack=out["se_jack"], se_deltaH1=out["se_deltaH1"],
                         rel_U_cross=rel(out["U_cross"], ref["U_cross"]),
                         rel_deltaH1=rel(out["deltaH1"], ref["deltaH1"]),
                         scaled_U_cross=abs(out["U_cross"] - ref["U_cross"]) / scale_u,
                         scaled_deltaH1=abs(out["deltaH1"] - ref["deltaH1"]) / scale_d,
                         truth_rel_U_cross=None if truth is None else rel(out["U_cross"], truth.U_cross),
                         truth_rel_deltaH1=None if truth is None else rel(out["deltaH1"], truth.deltaH1),
                         rel_se_deltaH1=rel(out["se_deltaH1"], ref["se_deltaH1"]),
                         token_chunk=out.get("token_chunk"), phase_timings=out["timings"]))
    return dict(config=key, label=config["label"], model=config, batch=dict(batch_shape, L=batch.L),
                lora_scalars=policy.num_params, response_tokens=int(batch.response_mask.sum()),
                max_logprob_diff=max_logprob_diff, cancellation_U_cross=scale_u / abs(ref["U_cross"]),
                cancellation_deltaH1=scale_d / abs(ref["deltaH1"]),
                float64=None if truth is None else dict(U_cross=truth.U_cross, deltaH1=truth.deltaH1), rows=rows)


def float64_truth(policy: Policy, batch, adam: AdamState, log):
    """funcprobe's δH₁ on a float64 copy of the model (RMSNorm in float64 too, float64 log-softmax): the yardstick
    that shows how far each float32 method is from the exact value. Untimed."""
    from funcprobe.precision import exact_float64

    model = copy.deepcopy(policy.module).double()
    exact_float64(model)
    policy64 = Policy.from_peft(model, logsoftmax_dtype=torch.float64)
    start = time.perf_counter()
    result = delta_h1(policy64.params, batch, policy=policy64, adam=adam.to(dtype=torch.float64), units="prompt",
                      seq_chunk=batch.G, store_unit_vectors=True)
    log(f"  float64 check (funcprobe, untimed): {time.perf_counter() - start:.2f} s")
    del model, policy64
    gc.collect()
    return result


# ------------------------------------------------------------------------------------------------- report
def _sci(value: float) -> str:
    return f"{value:.8e}"


def report(results: list[dict], quick: bool, rtol: float) -> tuple[str, bool, bool]:
    lines = ["| config | method | mode | seq_chunk | median wall s | forward passes | backward passes "
             "| sequences forwarded | speed-up vs reference | median CPU s | U_cross | deltaH1 |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for res in results:
        for row in res["rows"]:
            chunk = "–" if row["seq_chunk"] is None else str(row["seq_chunk"])
            lines.append(f"| {row['label']} | {row['method']} | {row['mode']} | {chunk} | {row['median_s']:.2f} | "
                         f"{row['forward_passes']} | {row['backward_passes']} | {row['sequences_forwarded']} | "
                         f"{row['speedup']:.2f}× | {row['median_cpu_s']:.2f} | {_sci(row['U_cross'])} | "
                         f"{_sci(row['deltaH1'])} |")
    lines.append("")
    verdict = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    note = " (quick run: tiny model, timings not meaningful)" if quick else ""
    agree_all, met_all = True, True
    for res in results:
        fp = [row for row in res["rows"] if row["method"] == "funcprobe"]
        worst_u = max(row["rel_U_cross"] for row in fp)
        worst_d = max(row["rel_deltaH1"] for row in fp)
        worst_se = max(row["rel_se_deltaH1"] for row in fp)
        scaled_u = max(row["scaled_U_cross"] for row in fp)
        scaled_d = max(row["scaled_deltaH1"] for row in fp)
        agree = scaled_u <= rtol and scaled_d <= rtol
        agree_all &= agree
        lines.append(f"- [{res['label']}] results agree (reference vs every funcprobe run): max |diff| / magnitude "
                     f"of the terms it is computed from: U_cross {scaled_u:.1e}, deltaH1 {scaled_d:.1e} (tolerance "
                     f"{rtol:g}); plain rel. diff U_cross {worst_u:.1e}, deltaH1 {worst_d:.1e}, se_deltaH1 "
                     f"{worst_se:.1e} (cancellation factors: U_cross {res['cancellation_U_cross']:.0f}, deltaH1 "
                     f"{res['cancellation_deltaH1']:.0f}); max |ΔS| {res['max_logprob_diff']:.1e}: {verdict(agree)}")
        if res["float64"] is not None:
            ref = res["rows"][0]
            lines.append(f"- [{res['label']}] float64 check (funcprobe on a float64 copy of the model): rel. error "
                         f"of U_cross / deltaH1: reference {ref['truth_rel_U_cross']:.1e} / "
                         f"{ref['truth_rel_deltaH1']:.1e}; funcprobe worst "
                         f"{max(row['truth_rel_U_cross'] for row in fp):.1e} / "
                         f"{max(row['truth_rel_deltaH1'] for row in fp):.1e}")
        for mode, target in (("stored", TARGET_STORED), ("recompute", TARGET_RECOMPUTE)):
            best = min((row for row in fp if row["mode"] == mode), key=lambda row: row["median_s"])
            met = best["speedup"] >= target
            met_all &= met
            others = ", ".join(f"seq_chunk={row['seq_chunk']} {row['speedup']:.2f}×" for row in fp
                               if row["mode"] == mode)
            lines.append(f"- [{res['label']}] funcprobe {mode} (headline seq_chunk={best['seq_chunk']}) vs "
                         f"reference: {best['speedup']:.2f}× (target ≥ {target:g}×; {others}): "
                         f"{verdict(met)}{note}")
    first = results[0]
    lines.append(f"- torch {torch.__version__}, {torch.get_num_threads()} threads, float32; B={first['batch']['B']},"
                 f" G={first['batch']['G']}, prompt {first['batch']['prompt_len']} and response "
                 f"{first['batch']['response_len']} tokens (uniform, inclusive); funcprobe token_chunk "
                 f"{first['rows'][1]['token_chunk']}")
    return "\n".join(lines), agree_all, met_all


def parse_bench_args(parser: argparse.ArgumentParser, argv=None):
    """Add the options the δH₁ benchmarks share (--quick, --configs, --repeats, --threads, --json), parse ``argv`` and
    set torch's threads: (args, configuration keys, timed repeats, batch shape)."""
    parser.add_argument("--quick", action="store_true", help="tiny model, one repeat, no warm-up (smoke run)")
    parser.add_argument("--configs", default="a,b", help="comma-separated configurations among a, b (default a,b)")
    parser.add_argument("--repeats", type=int, help="timed repeats per method (default 3; 1 with --quick)")
    parser.add_argument("--threads", type=int, help="torch threads (default min(2, cores); 1 with --quick, which "
                                                     "must stay fast on a busy machine)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or (1 if args.quick else max(1, min(2, os.cpu_count() or 1))))
    repeats = args.repeats or (1 if args.quick else 3)
    keys = ["quick"] if args.quick else [k.strip() for k in args.configs.split(",") if k.strip()]
    unknown = [k for k in keys if k not in CONFIGS or k == "quick"] if not args.quick else []
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; choose among a, b")
    return args, keys, repeats, (QUICK_BATCH if args.quick else FULL_BATCH)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rtol", type=float, default=RTOL, help="relative tolerance of the equality check")
    parser.add_argument("--no-float64-check", action="store_true", help="skip the untimed float64 yardstick run "
                                                                        "(always skipped with --quick)")
    parser.add_argument("--strict", action="store_true", help="exit 2 when a speed target is not met")
    args, keys, repeats, batch_shape = parse_bench_args(parser, argv)

    def log(message):
        print(message, file=sys.stderr, flush=True)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    log(f"load average (1 min) at start: {load:.2f}")
    started = time.perf_counter()
    results = [benchmark(k, CONFIGS[k], batch_shape, repeats, warmup=not args.quick,
                         float64_check=not (args.quick or args.no_float64_check), log=log) for k in keys]
    text, agree, met = report(results, args.quick, args.rtol)
    print(text)
    print(f"- load average (1 min) at start {load:.2f}, at end {os.getloadavg()[0]:.2f}; total "
          f"{time.perf_counter() - started:.0f} s; {repeats} timed repeat(s) per method"
          f"{'' if args.quick else ' after one warm-up'}")
    if args.json:
        args.json.write_text(json.dumps(dict(load_at_start=load, torch=torch.__version__,
                                             threads=torch.get_num_threads(), results=results), indent=1) + "\n")
    if not agree:
        return 1
    return 2 if (args.strict and not met and not args.quick) else 0


if __name__ == "__main__":
    raise SystemExit(main())
