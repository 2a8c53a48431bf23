"""Tests for funcprobe.stats (spec §5 standard errors, §6 importance-sampling diagnostics)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from funcprobe.stats import (
    jackknife_se,
    kish_ess,
    mean_and_se,
    psis_khat,
    psis_threshold,
    self_normalized_weights,
)

# ---------------------------------------------------------------------------------------------------------------------
# Seeded heavy-tailed log-weights. Built only from ``Generator.random`` (uniforms, whose stream NumPy keeps stable)
# through explicit inverse-CDF / Box–Muller transforms, so the inputs do not depend on NumPy's distribution code.
# ---------------------------------------------------------------------------------------------------------------------


def _normals(rng: np.random.Generator, n: int) -> np.ndarray:
    u1 = 1.0 - rng.random(n)
    u2 = rng.random(n)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def make_log_weights(kind: str, param: float, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "pareto":  # log of a Pareto(α = param) draw: Exponential(rate α); GPD tail shape k = 1/α
        return -np.log(1.0 - rng.random(n)) / param
    if kind == "lognormal":  # log of a lognormal(0, σ = param) draw (σ = 400 exercises the log(tiny) cutoff floor)
        return param * _normals(rng, n)
    if kind == "student_t":  # log |t_ν|, ν = param (integer): tail shape k = 1/ν
        z0 = _normals(rng, n)
        chi2 = sum(_normals(rng, n) ** 2 for _ in range(int(param)))
        return np.log(np.abs(z0 / np.sqrt(chi2 / param)))
    if kind == "ties":  # normals rounded down to a grid of 1/param: ties straddle the PSIS cutoff
        return np.floor(param * _normals(rng, n)) / param
    raise ValueError(kind)


# (kind, param, N, seed, sum of the log-weights (a check that the inputs are reproduced), reference k̂).
# Reference k̂: arviz 0.23.4, ``float(arviz.psislw(log_weights, reff=1.0)[1])`` on these float64 arrays.
PSIS_REFERENCE = [
    ("pareto", 0.8, 100, 1, 124.48223951653038, 0.9861112835435326),
    ("pareto", 0.8, 1000, 2, 1259.1654493262802, 1.195557314795808),
    ("pareto", 0.8, 4000, 3, 4974.266037632969, 1.1176871673175461),
    ("pareto", 1.5, 100, 4, 73.24162865481114, 0.05397474590669234),
    ("pareto", 1.5, 1000, 5, 660.424827137616, 0.8807002246424159),
    ("pareto", 1.5, 4000, 6, 2626.579534668997, 0.5264113840810514),
    ("pareto", 3.0, 100, 7, 31.91134500392997, 0.43979098632413055),
    ("pareto", 3.0, 1000, 8, 307.34516570749906, 0.3912029768934822),
    ("pareto", 3.0, 4000, 9, 1316.479327058778, 0.3123552602813479),
    ("lognormal", 1.0, 100, 10, 3.591061237073638, 0.1417110102232984),
    ("lognormal", 1.0, 1000, 11, -14.252940109317091, 0.35273043191814213),
    ("lognormal", 1.0, 4000, 12, 32.680773461261964, 0.28878131742420843),
    ("lognormal", 3.0, 100, 13, -39.11714124772602, 1.1606757343188743),
    ("lognormal", 3.0, 1000, 14, 70.8727353680324, 0.9396237318675363),
    ("lognormal", 3.0, 4000, 15, 419.35715627621437, 0.9911503189746392),
    ("lognormal", 400.0, 100, 16, 434.4866416005866, 96.50586468042721),
    ("lognormal", 400.0, 1000, 17, -2947.657801741511, 120.45288653818824),
    ("lognormal", 400.0, 4000, 18, 17088.463107826166, 107.02042938679045),
    ("student_t", 1, 100, 19, 14.793214348127158, 1.2606091987268766),
    ("student_t", 1, 1000, 20, 14.413466904203084, 0.8778655286869671),
    ("student_t", 1, 4000, 21, 114.4664677526979, 1.0903630132717574),
    ("student_t", 3, 100, 22, -30.575199411026507, 0.1914305803222352),
    ("student_t", 3, 1000, 23, -465.20908988464595, 0.296464356569798),
    ("student_t", 3, 4000, 24, -1867.72198900076, 0.22544212631435115),
    ("ties", 2.0, 100, 25, -34.5, 0.013958437053110803),
    ("ties", 2.0, 1000, 26, -230.5, 0.02103313851597044),
    ("ties", 2.0, 4000, 27, -1039.0, 0.033833423651569834),
]


def _case_id(case) -> str:
    kind, param, n, seed = case[:4]
    return f"{kind}{param}-N{n}-s{seed}"


# ---------------------------------------------------------------------------------------------------------------------
# Kish ESS and self-normalised weights
# ---------------------------------------------------------------------------------------------------------------------


def test_ess_matches_naive_formula():
    lw = torch.randn(7, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2.0
    w = lw.exp()
    naive = w.sum(-1) ** 2 / (w * w).sum(-1)
    ess = kish_ess(lw)
    assert ess.dtype == torch.float64 and ess.shape == (7,)
    torch.testing.assert_close(ess, naive, rtol=1e-12, atol=0.0)
    # another dim
    torch.testing.assert_close(kish_ess(lw.T, dim=0), naive, rtol=1e-12, atol=0.0)


def test_ess_equal_weights_is_n():
    for n in (1, 2, 17, 1000):
        for c in (0.0, -1000.0, 1000.0):
            assert kish_ess(torch.full((n,), c)).item() == pytest.approx(n, rel=1e-12)


def test_ess_finite_for_extreme_log_weights():
    lw = torch.tensor([1000.0, -1000.0, 999.0, 0.0, 1000.0], dtype=torch.float64)
    ess = kish_ess(lw)
    assert torch.isfinite(ess)
    # dominated by the three weights near e^1000: e^0 + e^-1 + e^0 relative
    w = torch.tensor([1.0, math.exp(-1.0), 1.0], dtype=torch.float64)
    assert ess.item() == pytest.approx((w.sum() ** 2 / (w * w).sum()).item(), rel=1e-12)
    assert torch.isfinite(kish_ess(torch.tensor([-1000.0, -1001.0])))


def test_ess_float32_input_is_upcast():
    lw32 = torch.randn(100, generator=torch.Generator().manual_seed(1))
    ess = kish_ess(lw32)
    assert ess.dtype == torch.float64
    torch.testing.assert_close(ess, kish_ess(lw32.double()), rtol=0, atol=0)


@settings(max_examples=50, deadline=None)
@given(
    lw=st.lists(st.floats(-30.0, 30.0, allow_nan=False), min_size=1, max_size=40),
    c=st.floats(-1000.0, 1000.0, allow_nan=False),
)
def test_ess_invariant_to_constant_shift(lw, c):
    t = torch.tensor(lw, dtype=torch.float64)
    ess = kish_ess(t)
    assert 1.0 - 1e-9 <= ess.item() <= len(lw) * (1 + 1e-9)
    # rounding of t + c is ~|c|·2^-52 per entry; the ESS moves by at most a few times that, relatively
    assert kish_ess(t + c).item() == pytest.approx(ess.item(), rel=1e-10)


def test_self_normalized_weights():
    lw = torch.randn(3, 20, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 3.0
    w = self_normalized_weights(lw)
    naive = lw.exp() / lw.exp().sum(-1, keepdim=True)
    torch.testing.assert_close(w, naive, rtol=1e-13, atol=0.0)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, dtype=torch.float64), rtol=1e-14, atol=1e-14)
    # no overflow; shift invariance
    big = self_normalized_weights(lw + 1000.0)
    assert torch.isfinite(big).all()
    torch.testing.assert_close(big, w, rtol=1e-10, atol=1e-300)
    torch.testing.assert_close(self_normalized_weights(lw.T, dim=0), w.T, rtol=1e-15, atol=0.0)
    # consistency with the ESS: ESS = 1 / Σ w̃²
    torch.testing.assert_close(kish_ess(lw), 1.0 / (w * w).sum(-1), rtol=1e-12, atol=0.0)


# ---------------------------------------------------------------------------------------------------------------------
# PSIS k̂
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", PSIS_REFERENCE, ids=_case_id)
def test_psis_khat_matches_embedded_reference(case):
    kind, param, n, seed, lw_sum, k_ref = case
    lw = make_log_weights(kind, param, n, seed)
    assert lw.shape == (n,)
    assert float(lw.sum()) == pytest.approx(lw_sum, rel=1e-12, abs=1e-9), "input generator no longer reproduces"
    k = psis_khat(torch.from_numpy(lw))
    assert isinstance(k, float)
    assert k == pytest.approx(k_ref, rel=1e-6, abs=1e-6)
    # numpy input works too
    assert psis_khat(lw) == k


def _arviz_khat(az, lw: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(np.asarray(az.psislw(np.array(lw, dtype=np.float64), reff=1.0)[1]))


@pytest.fixture(scope="module")
def az():
    """arviz, the reference PSIS: a test dependency (the ``test`` extra), so a missing one fails here, never skips."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import arviz
    assert hasattr(arviz, "psislw"), (f"arviz {arviz.__version__} has no psislw (the 0.x API this reference uses); "
                                      "install the test extra: pip install -e '.[test]' (arviz>=0.23,<1)")
    return arviz


def test_psis_khat_matches_live_arviz(az):
    rng = np.random.default_rng(12345)
    inputs = [make_log_weights(*c[:4]) for c in PSIS_REFERENCE[::3]]
    for n in (21, 22, 50, 333, 2500):
        inputs.append(rng.standard_normal(n) * rng.uniform(0.5, 4.0))
        inputs.append(rng.standard_t(2, n))
    inputs.append(np.r_[rng.standard_normal(60), np.full(40, -np.inf)])  # zero weights among the rest
    inputs.append(np.zeros(100))  # all equal → inf
    inputs.append(rng.standard_normal(20))  # N < 21 → inf
    for lw in inputs:
        ref = _arviz_khat(az, lw)
        got = psis_khat(lw)
        if math.isinf(ref):
            assert got == ref
        else:
            assert got == pytest.approx(ref, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("c", [-1000.0, -3.7, 2.5, 1000.0])
def test_psis_khat_invariant_to_weight_scaling(c):
    for kind, param, n, seed in [("pareto", 1.5, 1000, 5), ("lognormal", 3.0, 4000, 15), ("student_t", 1, 100, 19)]:
        lw = torch.from_numpy(make_log_weights(kind, param, n, seed))
        assert psis_khat(lw + c) == pytest.approx(psis_khat(lw), rel=1e-8, abs=1e-8)


def test_psis_khat_float32_input():
    lw = torch.from_numpy(make_log_weights("lognormal", 1.0, 1000, 11)).float()
    assert psis_khat(lw) == psis_khat(lw.double())


@pytest.mark.parametrize("k_true", [0.3, 0.5, 0.8])
def test_psis_khat_recovers_known_pareto_tail(k_true):
    # Weights ~ Pareto(α = 1/k): exceedances over any threshold are exactly generalised Pareto with shape k.
    # N = 20 000 gives a tail of M = 425 (sd of k̂ ≈ 0.05–0.07); the mean of 16 seeds has sd ≈ 0.015, so a
    # tolerance of 0.06 is about 4 sd (the seeded values are within 0.015 of k).
    ks = [psis_khat(make_log_weights("pareto", 1.0 / k_true, 20_000, 1000 + s)) for s in range(16)]
    assert np.mean(ks) == pytest.approx(k_true, abs=0.06)


def test_psis_khat_degenerate_cases():
    assert psis_khat(torch.zeros(100)) == math.inf  # all weights equal: empty tail
    assert psis_khat(torch.full((100,), -1000.0)) == math.inf
    assert psis_khat(torch.randn(20, generator=torch.Generator().manual_seed(0))) == math.inf  # N < 21: M ≤ 4
    assert psis_khat(torch.tensor([0.3])) == math.inf
    assert math.isfinite(psis_khat(torch.randn(21, generator=torch.Generator().manual_seed(0))))
    assert math.isnan(psis_khat(torch.tensor([0.0, float("nan")] * 50)))
    assert math.isnan(psis_khat(torch.tensor([0.0, float("inf")] * 50)))
    assert math.isnan(psis_khat(torch.full((50,), -math.inf)))
    with pytest.raises(ValueError):
        psis_khat(torch.zeros(0))
    with pytest.raises(ValueError):
        psis_khat(torch.zeros(4, 30))


def test_psis_khat_does_not_modify_input():
    lw = torch.from_numpy(make_log_weights("pareto", 1.5, 1000, 5))
    before = lw.clone()
    psis_khat(lw)
    assert torch.equal(lw, before)


def test_psis_threshold():
    assert psis_threshold(100) == pytest.approx(0.5)
    assert psis_threshold(1000) == pytest.approx(2.0 / 3.0)
    assert psis_threshold(4000) == 0.7
    assert psis_threshold(10) == pytest.approx(0.0)
    assert psis_threshold(1) == -math.inf
    with pytest.raises(ValueError):
        psis_threshold(0)


# ---------------------------------------------------------------------------------------------------------------------
# Standard errors
# ---------------------------------------------------------------------------------------------------------------------


def test_jackknife_se_hand_computation():
    # v = (1, 2, 4): mean 7/3, Σ(v − mean)² = 14/3, se = sqrt(2/3 · 14/3) = sqrt(28)/3
    se = jackknife_se(torch.tensor([1.0, 2.0, 4.0]))
    assert se.dtype == torch.float64
    assert se.item() == pytest.approx(math.sqrt(28.0) / 3.0, rel=1e-15)
    # two values: sqrt(1/2 · ((a−b)/2)² · 2) = |a − b| / 2
    assert jackknife_se([3.0, 7.0]).item() == pytest.approx(2.0, rel=1e-15)
    # batched along dim
    v = torch.tensor([[1.0, 2.0, 4.0], [3.0, 3.0, 3.0]])
    torch.testing.assert_close(jackknife_se(v), torch.tensor([math.sqrt(28.0) / 3.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(jackknife_se(v.T, dim=0), jackknife_se(v))


def test_jackknife_of_the_mean_is_the_classical_se():
    x = torch.randn(25, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    loo = (x.sum() - x) / (len(x) - 1)  # delete-one means
    _, se = mean_and_se(x)
    assert jackknife_se(loo).item() == pytest.approx(se.item(), rel=1e-12)


@pytest.mark.parametrize("values", [[2.5], []])
def test_jackknife_se_too_few_units(values):
    with pytest.warns(RuntimeWarning, match="at least 2"):
        se = jackknife_se(torch.tensor(values, dtype=torch.float64))
    assert se.shape == () and math.isnan(se.item())
    with pytest.warns(RuntimeWarning):
        se = jackknife_se(torch.ones(4, 1))
    assert se.shape == (4,) and torch.isnan(se).all()


def test_mean_and_se():
    x = [1.0, 2.0, 4.0, 7.0]
    mean, se = mean_and_se(x)
    assert mean.item() == pytest.approx(3.5)
    # sample sd (ddof=1): Σ(x − 3.5)² = 6.25 + 2.25 + 0.25 + 12.25 = 21, sd = sqrt(7), se = sqrt(7)/2
    assert se.item() == pytest.approx(math.sqrt(7.0) / 2.0, rel=1e-15)
    xs = torch.randn(3, 30, generator=torch.Generator().manual_seed(4)).float()
    m, s = mean_and_se(xs)
    assert m.dtype == s.dtype == torch.float64 and m.shape == s.shape == (3,)
    torch.testing.assert_close(s, xs.double().std(dim=-1, correction=1) / math.sqrt(30))
    torch.testing.assert_close(m, xs.double().mean(-1))


def test_mean_and_se_too_few_values():
    with pytest.warns(RuntimeWarning, match="at least 2"):
        mean, se = mean_and_se([5.0])
    assert mean.item() == 5.0 and math.isnan(se.item())
    with pytest.warns(RuntimeWarning):
        mean, se = mean_and_se(torch.zeros(0, dtype=torch.float64))
    assert math.isnan(mean.item()) and math.isnan(se.item())
