"""The per-token first-order change (``delta_h1_heldout(..., per_token=True)``) against exact enumeration.

The target is the first-order change of the entropy per token, the unit of TRL's ``entropy`` metric: with
r_p(θ) = E_p[F]/E_p[T] (F = Σ_k h_k the summed next-token entropies of a response, T its length) for prompt p of the
pool, and E's prompts uniform over the pool, target = (1/|pool|) Σ_p ∇r_p·d along a fixed direction d.

The per-token unit only differs from the per-response one when responses have different lengths, so the enumerable
policy of tests/test_heldout_exact.py (float64, 1 layer, a peaked head) is given an EOS: V = 4, responses of at most
T = 3 tokens that end at their first EOS (token 3). Its 1 + 3 + 36 = 40 distinct responses per prompt (of 1, 2 and 3
tokens) have probabilities summing to 1; they form the enumeration batch, right-padded after EOS. Per response u the
tables hold m_k, h_k, ∂ℓ_k·d and ∂h_k·d (one jvp of the enumeration forward along d); a batch is then a lookup, first
tied to the real ``delta_h1_heldout(..., per_token=True)`` on sampled batches (1e-9).

The target is computed by forward-mode autodiff of θ ↦ mean_p Σ_u p_u F_u / Σ_u p_u T_u through the same forward,
independently of the score-function algebra, and equals the tables' (∇E[F]·d − r ∇E[T]·d)/E[T] (1e-10).

The estimator D^tok_n = (D_n − r̂_n D^len_n)/T̄_n plugs in r̂_n = Σ_g F_g/Σ_g T_g and T̄_n from the same G draws: a ratio
estimator, biased at O(1/G), while D_n and D^len_n themselves are exactly unbiased. For G = 2, 3, 4 its exact
expectation is a finite sum over the multisets of G of a prompt's 40 responses. Measured, bias/target at G = 2, 3, 4:
direction "random" −1.9 %, −1.2 %, −0.85 % (G·bias/target −0.037, −0.035, −0.034: the 1/G law, so ≈ −0.4 % at G = 8);
direction "ascent" (∇ of the per-token entropy itself) −0.32 %, −0.15 %, −0.10 %. At G = 8 that is about 1 % of one
batch's SE (B_E = 6) and 0.6 (random) and 0.1 (ascent) Monte-Carlo SEs of the 4000-batch test below, which finds
z = −0.18 and −0.33 with the SE calibrated (spread/rms SE 1.02, 1.00). The per-response target along the same
directions is −11.2 and −4.0 nats per response, against +1.18 and +1.08 nats per token: both directions shorten the
responses (∇E[T]·d < 0), which lowers the entropy of a response while raising the entropy per token, so the two units
can disagree in sign.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from funcprobe import Policy, RolloutBatch
from funcprobe.heldout import delta_h1_heldout
from funcprobe.testing import tiny_peft_model

pytestmark = pytest.mark.usefixtures("one_thread")

V, T, EOS = 4, 3, 3
PROMPTS = [[1, 2], [3, 1], [2, 2]]
POOL = len(PROMPTS)
B_E = 6
Z = 3.5


def responses() -> list[tuple[int, ...]]:
    """Every response of at most T tokens that ends at its first EOS (or has T tokens): 40 for V = 4, T = 3."""
    out = []
    for length in range(1, T + 1):
        for tokens in itertools.product(range(V), repeat=length):
            if EOS in tokens[:-1] or (length < T and tokens[-1] != EOS):
                continue
            out.append(tokens)
    return out


def enumeration(responses_: list[tuple[int, ...]]) -> RolloutBatch:
    """Prompt p (left-padded) followed by every response (right-padded with pad 0 after its end): [POOL, U, P + T]."""
    P = max(map(len, PROMPTS))
    U = len(responses_)
    ids = torch.zeros(POOL, U, P + T, dtype=torch.long)
    attention = torch.zeros(POOL, U, P + T, dtype=torch.long)
    response = torch.zeros_like(attention)
    for p, prompt in enumerate(PROMPTS):
        for u, tokens in enumerate(responses_):
            ids[p, u, P - len(prompt):P] = torch.tensor(prompt)
            attention[p, u, P - len(prompt):P + len(tokens)] = 1
            ids[p, u, P:P + len(tokens)] = torch.tensor(tokens)
            response[p, u, P:P + len(tokens)] = 1
    return RolloutBatch(input_ids=ids, attention_mask=attention, response_mask=response,
                        advantages=torch.zeros(POOL, U, dtype=torch.float64),
                        length_norm=torch.full((POOL,), float(T), dtype=torch.float64), pad_token_id=0)


def per_position(batch: RolloutBatch, flat: torch.Tensor) -> torch.Tensor:
    """Row-major response-token values [n_tokens] of a whole-batch chunk → [POOL, U, T] (0 past a response's end)."""
    out = torch.zeros(batch.B * batch.G, T, dtype=torch.float64)
    mask = batch.response_mask.reshape(batch.B * batch.G, -1).bool()
    rows, _ = mask.nonzero(as_tuple=True)
    position = (mask.long().cumsum(-1) - 1)[mask]
    out[rows, position] = flat.to(torch.float64)
    return out.reshape(batch.B, batch.G, T)


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    model = tiny_peft_model("qwen2", vocab_size=V, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, r=2,
                            dtype=torch.float64, seed=3, attn_implementation="eager")  # eager: the jvps below
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    policy = Policy.from_peft(model, logsoftmax_dtype=torch.float64)
    params = dict(policy.params)
    batch = enumeration(responses())
    chunk = next(iter(batch.iter_sequence_chunks(batch.num_sequences)))
    assert torch.equal(chunk.flat_index.cpu(), torch.arange(batch.num_sequences))

    def values(q):
        return policy._chunk_token_logprobs_entropies(q, chunk, policy.token_chunk)

    def per_token_entropy(q):
        ell, h = (per_position(batch, v) for v in values(q))
        prob = ell.sum(-1).exp()
        mask = batch.response_mask.sum(-1).to(torch.float64)
        return ((prob * h.sum(-1)).sum(-1) / (prob * mask).sum(-1)).mean()

    generator = torch.Generator().manual_seed(7)
    random = {n: torch.randn(t.shape, generator=generator, dtype=torch.float64) for n, t in params.items()}
    ascent = torch.func.grad(per_token_entropy)(params)              # steepest ascent of the per-token entropy
    directions = {"random": random, "ascent": {n: g.detach() for n, g in ascent.items()}}
    data = dict(policy=policy, params=params, batch=batch, directions=directions, tables={})
    with torch.no_grad():
        ell, h = (per_position(batch, v) for v in values(params))
    lengths = batch.response_mask.sum(-1).to(torch.float64)
    mask = (torch.arange(T)[None, None] < lengths[..., None]).to(torch.float64)
    data.update(ell=ell, h=h, mask=mask, lengths=lengths, prob=ell.sum(-1).exp())
    for name, d in directions.items():
        _, (d_ell, d_h) = torch.func.jvp(values, (params,), (d,))
        _, target = torch.func.jvp(per_token_entropy, (params,), (d,))
        data["tables"][name] = dict(d_ell=per_position(batch, d_ell.detach()), d_h=per_position(batch, d_h.detach()),
                                    target=float(target))
    return data


def estimator(h, mask, d_ell, d_h):
    """Per prompt slot: (D^tok, D, D^len) from the draws' tables [..., G, T] (spec §9 and the per-token change)."""
    G = h.shape[-2]
    hm = h * mask
    to_come = hm.sum(-1, keepdim=True) - hm.cumsum(-1)                       # R_k
    after = mask.sum(-1, keepdim=True) - mask.cumsum(-1)                     # N_k
    b = (to_come.sum(-2, keepdim=True) - to_come) / (G - 1)
    b_len = (after.sum(-2, keepdim=True) - after) / (G - 1)
    D = ((d_h + (to_come - b) * d_ell) * mask).sum((-1, -2)) / G
    D_len = ((after - b_len) * d_ell * mask).sum((-1, -2)) / G
    total = mask.sum((-1, -2))
    ratio = hm.sum((-1, -2)) / total
    return (D - ratio * D_len) / (total / G), D, D_len


def exact_parts(data, name):
    """Per pool prompt: E[F], E[T], ∇E[F]·d, ∇E[T]·d from the tables (the score-function forms)."""
    tables, prob, mask = data["tables"][name], data["prob"], data["mask"]
    F = (data["h"] * mask).sum(-1)
    dS = (tables["d_ell"] * mask).sum(-1)
    dF = (tables["d_h"] * mask).sum(-1)
    return ((prob * F).sum(-1), (prob * data["lengths"]).sum(-1), (prob * (dF + F * dS)).sum(-1),
            (prob * data["lengths"] * dS).sum(-1))


def gather(data, name, prompt, response):
    """The tables of drawn (prompt [...], response [..., G]) pairs: h, mask, ∂ℓ·d, ∂h·d [..., G, T]."""
    p = prompt[..., None]
    tables = data["tables"][name]
    return (data["h"][p, response], data["mask"][p, response], tables["d_ell"][p, response],
            tables["d_h"][p, response])


def draw(data, generator, count, G):
    prompt = torch.randint(0, POOL, (count, B_E), generator=generator)
    probs = data["prob"][prompt].reshape(count * B_E, -1)
    response = torch.multinomial(probs, G, replacement=True, generator=generator).reshape(count, B_E, G)
    return prompt, response


# ------------------------------------------------------------------------------------------------------- ties
def test_enumeration_and_target(setup):
    """The 40 responses' probabilities sum to 1 per prompt, lengths vary (the per-token unit matters), and the
    autodiff target equals (∇E[F]·d − r ∇E[T]·d)/E[T] from the tables (1e-10)."""
    assert setup["prob"].shape[1] == 40
    torch.testing.assert_close(setup["prob"].sum(-1), torch.ones(POOL, dtype=torch.float64), rtol=0, atol=1e-12)
    mean_length = (setup["prob"] * setup["lengths"]).sum(-1)
    assert (mean_length > 1.5).all() and (mean_length < 2.9).all()
    for name in setup["directions"]:
        EF, ET, dEF, dET = exact_parts(setup, name)
        ratio = EF / ET
        from_tables = float(((dEF - ratio * dET) / ET).mean())
        assert math.isclose(from_tables, setup["tables"][name]["target"], rel_tol=1e-10)
        assert abs(from_tables) > 1e-3


def test_lookup_is_delta_h1_heldout_per_token(setup):
    """On sampled batches the lookup's D^tok_n and D_n equal delta_h1_heldout(per_token=True)'s (1e-9)."""
    generator = torch.Generator().manual_seed(3)
    batch = setup["batch"]
    for name, d in setup["directions"].items():
        prompt, response = draw(setup, generator, 2, 4)
        tok, D, _ = estimator(*gather(setup, name, prompt, response))
        for b in range(2):
            rows = (prompt[b, :, None] * batch.G + response[b]).reshape(-1)
            take = lambda t: t.reshape(batch.B * batch.G, -1)[rows].reshape(B_E, 4, -1)  # noqa: E731
            E = RolloutBatch(input_ids=take(batch.input_ids), attention_mask=take(batch.attention_mask),
                             response_mask=take(batch.response_mask),
                             advantages=torch.zeros(B_E, 4, dtype=torch.float64),
                             length_norm=torch.full((B_E,), float(T), dtype=torch.float64), pad_token_id=0)
            result = delta_h1_heldout(setup["params"], d, E, policy=setup["policy"], per_token=True)
            torch.testing.assert_close(torch.tensor(result.per_prompt_per_token, dtype=torch.float64), tok[b],
                                       rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(torch.tensor(result.per_prompt, dtype=torch.float64), D[b], rtol=1e-9,
                                       atol=1e-12)


# ------------------------------------------------------------------------------------------------- statistics
def exact_expectations(data, name, G):
    """E[D^tok], E[D], E[D^len] per pool prompt over G i.i.d. draws, as exact sums: the estimator is symmetric in
    the draws, so over the C(40 + G − 1, G) multisets of responses, each with its multinomial probability."""
    U = data["prob"].shape[1]
    multisets = torch.tensor(list(itertools.combinations_with_replacement(range(U), G)), dtype=torch.long)
    counts = torch.stack([(multisets == u).sum(-1) for u in range(U)], dim=-1)
    log_orderings = math.lgamma(G + 1) - torch.lgamma(counts.to(torch.float64) + 1).sum(-1)
    out = torch.zeros(3, POOL, dtype=torch.float64)
    for p in range(POOL):
        weight = torch.exp(log_orderings + data["prob"][p].log()[multisets].sum(-1))
        prompt = torch.full((multisets.shape[0],), p, dtype=torch.long)
        for i, value in enumerate(estimator(*gather(data, name, prompt, multisets))):
            out[i, p] = (weight * value).sum()
    return out


@pytest.mark.parametrize("name", ["random", "ascent"])
def test_per_token_bias_is_a_ratio_bias_of_order_one_over_G(setup, name):
    """Exact expectations over all draws of G = 2, 3, 4 responses: D_n and D^len_n are exactly unbiased for
    ∇E[F]·d and ∇E[T]·d (1e-10); D^tok_n's bias, the plug-in ratio's, shrinks with G and stays below 5 %/G of the
    target (measured G·bias/target: random −0.037, −0.035, −0.034 — the 1/G law; ascent −0.007, −0.005, −0.004)."""
    EF, ET, dEF, dET = exact_parts(setup, name)
    per_prompt_target = (dEF - EF / ET * dET) / ET
    target = float(per_prompt_target.mean())
    biases = []
    for G in (2, 3, 4):
        expected = exact_expectations(setup, name, G)
        torch.testing.assert_close(expected[1], dEF, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(expected[2], dET, rtol=1e-10, atol=1e-13)
        bias = float(expected[0].mean()) - target
        biases.append(bias)
        print(f"\n{name} G={G}: bias/target {bias / target:+.4f}, G·bias/target {G * bias / target:+.4f}")
        assert abs(G * bias / target) < 0.05
    assert abs(biases[0]) > abs(biases[1]) > abs(biases[2]) > 0


@pytest.mark.parametrize("name", ["random", "ascent"])
def test_per_token_is_unbiased_within_its_se_over_many_batches(setup, name):
    """G = 8, 4000 batches of B_E = 6 prompt slots (uniform over the pool): mean of D^tok − target within 3.5 MC SEs,
    and sd over batches / rms(reported SE) in 0.75–1.33; the per-response D likewise against its exact target."""
    generator = torch.Generator().manual_seed(11 if name == "random" else 12)
    count, G = 4000, 8
    prompt, response = draw(setup, generator, count, G)
    tok, D, _ = estimator(*gather(setup, name, prompt, response))
    EF, ET, dEF, dET = exact_parts(setup, name)
    for values, target in ((tok, setup["tables"][name]["target"]), (D, float(dEF.mean()))):
        estimate, se = values.mean(1), values.std(1) / math.sqrt(B_E)
        errors = estimate - target
        mc = float(errors.std()) / math.sqrt(count)
        z = float(errors.mean()) / mc
        calibration = float(errors.std()) / float(se.pow(2).mean().sqrt())
        print(f"\n{name}: target {target:+.5f}, mean error {float(errors.mean()):+.2e} ± {mc:.2e} (z {z:+.2f}), "
              f"calibration {calibration:.3f}")
        assert abs(target) > 5 * mc
        assert abs(z) < Z
        assert 0.75 < calibration < 1.33
