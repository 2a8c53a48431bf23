"""Tests of funcprobe.adam: the AdamW step as a pure function and its decomposition (spec §4)."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from hypothesis import given, settings, HealthCheck
from hypothesis import strategies as st

from funcprobe.adam import (
    AdamHyper,
    AdamState,
    adamw_update,
    grad_clip_coef,
    scaled_update,
    update_decomposition,
)
# Reading optimizer.pt files is the loader's job (funcprobe.checkpoints); its tests share this file's fixtures.
from funcprobe.checkpoints import PARAM_NAMES_FILE, load_adam_state

PREFIX = "base_model.model.model.layers.{}.self_attn.{}_proj.lora_{}.default.weight"


def lora_name(layer: int, proj: str, ab: str) -> str:
    return PREFIX.format(layer, proj, ab)


def clone_dict(d):
    return {k: v.clone() for k, v in d.items()}


def assert_bit_identical(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        assert torch.equal(a[k], b[k]), k


def assert_close(a, b, dtype):
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    for k in a:
        scale = max(float(b[k].abs().max()) if b[k].numel() else 0.0, 1.0)
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=rtol * scale, msg=lambda m: f"{k}: {m}")


# ----------------------------------------------------------------------------------------------------------------
# Random problems
# ----------------------------------------------------------------------------------------------------------------


@st.composite
def problems(draw):
    """Random params / grads / warm state with 1–3 tensors in 1–2 param groups, and a clipping mode."""
    n = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    shapes = [tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2))) for _ in range(n)]
    steps = [draw(st.sampled_from([0, 1, 7])) for _ in range(n)]
    groups = [draw(st.integers(0, 1)) for _ in range(n)]
    wd = draw(st.sampled_from([0.0, 0.1]))
    lrs = (draw(st.sampled_from([1e-3, 0.05])), draw(st.sampled_from([1e-3, 2e-2])))
    beta1 = draw(st.sampled_from([0.9, 0.5]))
    beta2 = draw(st.sampled_from([0.999, 0.95]))
    eps = draw(st.sampled_from([1e-8, 1e-3]))
    clip = draw(st.sampled_from([None, "clips", "no_clip"]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    names = [lora_name(i // 2, "q" if i % 3 else "v", "AB"[i % 2]) for i in range(n)]
    params = {nm: torch.randn(s, generator=gen, dtype=dtype) for nm, s in zip(names, shapes)}
    grads = {nm: torch.randn(s, generator=gen, dtype=dtype) * 3 for nm, s in zip(names, shapes)}
    m = {nm: torch.randn(s, generator=gen, dtype=dtype) * 0.1 for nm, s in zip(names, shapes)}
    v = {nm: torch.rand(s, generator=gen, dtype=dtype) * 0.5 for nm, s in zip(names, shapes)}
    hypers = [AdamHyper(lr=lrs[0], beta1=beta1, beta2=beta2, eps=eps, weight_decay=wd),
              AdamHyper(lr=lrs[1], beta1=beta1, beta2=beta2, eps=eps, weight_decay=0.0)]
    state = AdamState(exp_avg=m, exp_avg_sq=v, step=dict(zip(names, steps)),
                      hyper={nm: hypers[gi] for nm, gi in zip(names, groups)})
    group_names = [[nm for nm, gi in zip(names, groups) if gi == k] for k in (0, 1)]
    total = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()])))
    max_norm = {None: None, "clips": 0.3 * total, "no_clip": 2.0 * total + 1.0}[clip]
    return params, grads, state, group_names, max_norm


def torch_adamw_step(params, grads, state, group_names, max_norm):
    """One real torch.optim.AdamW(foreach=False) step (with clip_grad_norm_) from ``state``."""
    ps = {n: torch.nn.Parameter(p.clone()) for n, p in params.items()}
    opt = torch.optim.AdamW([{"params": [ps[n] for n in g]} for g in group_names], lr=1.0, foreach=False,
                            fused=False)
    opt.load_state_dict(state.to_torch_state_dict(group_names))
    for n, p in ps.items():
        p.grad = grads[n].clone()
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(list(ps.values()), max_norm)
    opt.step()
    return ps, opt


# ----------------------------------------------------------------------------------------------------------------
# adamw_update == torch.optim.AdamW
# ----------------------------------------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_adamw_update_matches_torch(problem):
    params, grads, state, group_names, max_norm = problem
    before = (clone_dict(params), clone_dict(grads), clone_dict(state.exp_avg), clone_dict(state.exp_avg_sq))
    new_params, new_state = adamw_update(params, grads, state, max_grad_norm=max_norm)
    ps, opt = torch_adamw_step(params, grads, state, group_names, max_norm)
    dtype = next(iter(params.values())).dtype
    assert_close(new_params, {n: p.detach() for n, p in ps.items()}, dtype)
    assert_close(dict(new_state.exp_avg), {n: opt.state[p]["exp_avg"] for n, p in ps.items()}, dtype)
    assert_close(dict(new_state.exp_avg_sq), {n: opt.state[p]["exp_avg_sq"] for n, p in ps.items()}, dtype)
    for n, p in ps.items():
        assert new_state.step[n] == state.step[n] + 1 == int(opt.state[p]["step"].item())
        assert new_params[n].dtype == params[n].dtype
        assert new_state.hyper[n] == state.hyper[n]
    # inputs untouched
    assert_bit_identical(params, before[0])
    assert_bit_identical(grads, before[1])
    assert_bit_identical(dict(state.exp_avg), before[2])
    assert_bit_identical(dict(state.exp_avg_sq), before[3])


def test_adamw_update_is_bit_identical_to_torch_on_cpu():
    gen = torch.Generator().manual_seed(0)
    params = {lora_name(0, "q", "A"): torch.randn(4, 8, generator=gen),
              lora_name(0, "q", "B"): torch.randn(8, 4, generator=gen)}
    grads = {n: torch.randn(p.shape, generator=gen) for n, p in params.items()}
    state = AdamState(exp_avg={n: torch.randn(p.shape, generator=gen) for n, p in params.items()},
                      exp_avg_sq={n: torch.rand(p.shape, generator=gen) for n, p in params.items()},
                      step={n: 3 for n in params}, hyper={n: AdamHyper(lr=1e-3) for n in params})
    new_params, _ = adamw_update(params, grads, state, max_grad_norm=1.0)
    ps, _ = torch_adamw_step(params, grads, state, [list(params)], 1.0)
    for n in params:
        assert torch.equal(new_params[n], ps[n].detach())


def test_lr_override_and_with_lr():
    gen = torch.Generator().manual_seed(1)
    params = {"a": torch.randn(3, 2, generator=gen, dtype=torch.float64)}
    grads = {"a": torch.randn(3, 2, generator=gen, dtype=torch.float64)}
    state = AdamState.zeros(params, lr=1e-3, weight_decay=0.1)
    p1, s1 = adamw_update(params, grads, state, lr=0.05)
    p2, s2 = adamw_update(params, grads, state.with_lr(0.05))
    assert torch.equal(p1["a"], p2["a"])
    assert s1.hyper["a"].lr == 0.05 and state.hyper["a"].lr == 1e-3
    ps, _ = torch_adamw_step(params, grads, state.with_lr(0.05), [["a"]], None)
    assert torch.equal(p1["a"], ps["a"].detach())


def test_zeros_state_first_step_matches_torch_fresh_optimizer():
    gen = torch.Generator().manual_seed(2)
    params = {"x": torch.randn(5, generator=gen, dtype=torch.float64), "y": torch.randn(2, 2, generator=gen,
                                                                                         dtype=torch.float64)}
    grads = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in params.items()}
    ps = {n: torch.nn.Parameter(p.clone()) for n, p in params.items()}
    opt = torch.optim.AdamW(list(ps.values()), lr=0.01, weight_decay=0.02, foreach=False)
    for n, p in ps.items():
        p.grad = grads[n].clone()
    opt.step()
    new, st_ = adamw_update(params, grads, AdamState.zeros(params, lr=0.01, weight_decay=0.02))
    for n in params:
        assert torch.equal(new[n], ps[n].detach())
        assert st_.step[n] == 1


def test_grad_clip_coef_matches_clip_grad_norm():
    gen = torch.Generator().manual_seed(3)
    grads = {f"g{i}": torch.randn(i + 2, 3, generator=gen) for i in range(3)}
    ps = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads.values()]
    for p, g in zip(ps, grads.values()):
        p.grad = g.clone()
    total = torch.nn.utils.clip_grad_norm_(ps, 0.7)
    norm, coef = grad_clip_coef(grads, 0.7)
    assert torch.equal(norm, total)
    for p, g in zip(ps, grads.values()):
        assert torch.equal(p.grad, g * coef)
    _, coef_big = grad_clip_coef(grads, 1e6)
    assert float(coef_big) == 1.0
    with pytest.raises(ValueError, match="max_grad_norm"):
        grad_clip_coef(grads, 0.0)


def test_bad_keys_and_shapes_are_named():
    params = {"a": torch.zeros(2), "b": torch.zeros(3)}
    state = AdamState.zeros(params, lr=1e-3)
    with pytest.raises(ValueError) as e:
        adamw_update(params, {"a": torch.zeros(2), "c": torch.zeros(3)}, state)
    msg = str(e.value)
    assert "Missing" in msg and "'b'" in msg and "Extra" in msg and "'c'" in msg
    with pytest.raises(ValueError, match=r"keys of state.*Extra in state \(1\): \['b'\]"):
        adamw_update({"a": torch.zeros(2)}, {"a": torch.zeros(2)}, state)
    with pytest.raises(ValueError, match=r"grads\['b'\] has shape \(4,\)"):
        adamw_update(params, {"a": torch.zeros(2), "b": torch.zeros(4)}, state)
    with pytest.raises(ValueError, match="Extra.*'c'"):
        update_decomposition(params, {"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(1)}, state)
    with pytest.raises(ValueError, match="Missing.*'b'"):
        scaled_update(params, {"a": torch.zeros(2)}, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# The decomposition
# ----------------------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_decomposition_identity(problem):
    params, grads, state, _, max_norm = problem
    ybar = {n: -g for n, g in grads.items()}
    before = (clone_dict(params), clone_dict(ybar), clone_dict(state.exp_avg), clone_dict(state.exp_avg_sq))
    dec = update_decomposition(params, ybar, state, max_grad_norm=max_norm)
    new_params, new_state = adamw_update(params, grads, state, max_grad_norm=max_norm)
    dtype = next(iter(params.values())).dtype
    dtheta = dec.delta_theta()
    assert_close({n: params[n] + dtheta[n] for n in params}, new_params, dtype)
    # the new state is the same as adamw_update's
    for n in params:
        assert torch.equal(dec.new_state.exp_avg[n], new_state.exp_avg[n])
        assert torch.equal(dec.new_state.exp_avg_sq[n], new_state.exp_avg_sq[n])
        assert dec.new_state.step[n] == new_state.step[n]
    # the formulas of spec §4, term by term
    for n, p in params.items():
        h, t1 = state.hyper[n], state.step[n] + 1
        bc1, bc2 = 1 - h.beta1 ** t1, 1 - h.beta2 ** t1
        c = dec.clip_coef
        assert dec.eta_g_by_name[n] == pytest.approx(c * h.lr * (1 - h.beta1) / bc1, rel=1e-12)
        v1 = h.beta2 * state.exp_avg_sq[n] + (1 - h.beta2) * (c * ybar[n]) ** 2
        P = 1 / (v1.sqrt() / bc2 ** 0.5 + h.eps)
        assert_close({n: dec.preconditioner[n]}, {n: P}, dtype)
        ds = -(h.lr / bc1) * h.beta1 * state.exp_avg[n] * P - h.lr * h.weight_decay * p
        assert_close({n: dec.delta_state[n]}, {n: ds}, dtype)
    if max_norm is None:
        assert dec.clip_coef == 1.0 and dec.grad_norm is None
    else:
        assert dec.grad_norm is not None and 0 < dec.clip_coef <= 1.0
    # inputs untouched
    assert_bit_identical(params, before[0])
    assert_bit_identical(ybar, before[1])
    assert_bit_identical(dict(state.exp_avg), before[2])
    assert_bit_identical(dict(state.exp_avg_sq), before[3])


@pytest.mark.parametrize("max_norm", [None, 0.2, 1e3])
@pytest.mark.parametrize("wd", [0.0, 0.3])
def test_decomposition_and_lr_sweep_float64(max_norm, wd):
    gen = torch.Generator().manual_seed(4)
    dt = torch.float64
    params = {lora_name(0, "q", "A"): torch.randn(3, 5, generator=gen, dtype=dt),
              lora_name(0, "q", "B"): torch.randn(5, 3, generator=gen, dtype=dt)}
    ybar = {n: torch.randn(p.shape, generator=gen, dtype=dt) for n, p in params.items()}
    state = AdamState(exp_avg={n: 0.1 * torch.randn(p.shape, generator=gen, dtype=dt) for n, p in params.items()},
                      exp_avg_sq={n: torch.rand(p.shape, generator=gen, dtype=dt) for n, p in params.items()},
                      step={n: 5 for n in params}, hyper={n: AdamHyper(lr=1e-2, weight_decay=wd) for n in params})
    grads = {n: -y for n, y in ybar.items()}
    dec = update_decomposition(params, ybar, state, max_grad_norm=max_norm)
    ref, _ = adamw_update(params, grads, state, max_grad_norm=max_norm)
    d = dec.delta_theta()
    assert_close({n: params[n] + d[n] for n in params}, ref, dt)
    if max_norm == 0.2:
        assert dec.clip_coef < 1.0
        assert dec.eta_g == pytest.approx(dec.clip_coef * 1e-2 * 0.1 / (1 - 0.9 ** 6), rel=1e-14)
    elif max_norm == 1e3:
        assert dec.clip_coef == 1.0
    assert dec.lr == 1e-2
    before = clone_dict(d)
    for eta in (1e-3, 0.05, 0.3):
        swept = scaled_update(params, d, eta / dec.lr)
        at_eta, _ = adamw_update(params, grads, state, lr=eta, max_grad_norm=max_norm)
        assert_close(swept, at_eta, dt)
    assert_bit_identical(d, before)
    # scaled_update with factor 0 gives θ back; with 1, θ + Δθ
    assert_bit_identical(scaled_update(params, d, 0.0), params)
    js = dec.to_dict()
    assert js["eta_g"] == dec.eta_g and js["clip_coef"] == dec.clip_coef
    json.dumps(js)


def test_decomposition_per_group_learning_rates():
    params = {"a": torch.randn(3, dtype=torch.float64), "b": torch.randn(2, dtype=torch.float64)}
    ybar = {n: torch.randn_like(p) for n, p in params.items()}
    state = AdamState(exp_avg={n: torch.zeros_like(p) for n, p in params.items()},
                      exp_avg_sq={n: torch.zeros_like(p) for n, p in params.items()},
                      step={"a": 2, "b": 2}, hyper={"a": AdamHyper(lr=1e-2), "b": AdamHyper(lr=1e-3)})
    dec = update_decomposition(params, ybar, state)
    with pytest.raises(ValueError, match="eta_g differs"):
        _ = dec.eta_g
    with pytest.raises(ValueError, match="lr differs"):
        _ = dec.lr
    assert dec.to_dict()["eta_g"] is None
    ep = dec.eta_preconditioner()
    d = dec.delta_theta()
    for n in params:
        torch.testing.assert_close(d[n], ep[n] * ybar[n] + dec.delta_state[n], rtol=1e-14, atol=0)
    ref, _ = adamw_update(params, {n: -y for n, y in ybar.items()}, state)
    assert_close({n: params[n] + d[n] for n in params}, ref, torch.float64)
    # weight decay alone may differ between groups: η_g is still one number
    st2 = state.with_lr(1e-2)
    st2 = dataclasses.replace(st2, hyper={"a": AdamHyper(lr=1e-2, weight_decay=0.1), "b": AdamHyper(lr=1e-2,
                                                                                                   weight_decay=0.0)})
    assert isinstance(update_decomposition(params, ybar, st2).eta_g, float)


# ----------------------------------------------------------------------------------------------------------------
# State objects
# ----------------------------------------------------------------------------------------------------------------


def test_adam_hyper_validation():
    AdamHyper(lr=0.0, beta1=0.0, beta2=0.0, eps=1e-12, weight_decay=0.0)
    for kw in [dict(lr=-1.0), dict(lr=1e-3, beta1=1.0), dict(lr=1e-3, beta2=-0.1), dict(lr=1e-3, eps=0.0),
               dict(lr=1e-3, weight_decay=-0.1), dict(lr=float("nan"))]:
        with pytest.raises(ValueError):
            AdamHyper(**kw)
    h = AdamHyper(lr=torch.tensor(2e-3))
    assert isinstance(h.lr, float) and h.lr == pytest.approx(2e-3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        h.lr = 1.0  # type: ignore[misc]


def test_adam_state_is_immutable_and_validated():
    params = {"a": torch.zeros(2), "b": torch.zeros(3)}
    s = AdamState.zeros(params, lr=1e-3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.step = {}  # type: ignore[misc]
    with pytest.raises(TypeError):
        s.exp_avg["a"] = torch.ones(2)  # type: ignore[index]
    with pytest.raises(TypeError):
        s.step["a"] = 3  # type: ignore[index]
    src = {"a": torch.zeros(2)}
    s2 = AdamState(exp_avg=src, exp_avg_sq={"a": torch.zeros(2)}, step={"a": 0}, hyper={"a": AdamHyper(lr=1.0)})
    src["b"] = torch.zeros(1)
    assert list(s2.exp_avg) == ["a"]
    with pytest.raises(ValueError, match="step"):
        AdamState(exp_avg={"a": torch.zeros(2)}, exp_avg_sq={"a": torch.zeros(2)}, step={"a": -1},
                  hyper={"a": AdamHyper(lr=1.0)})
    with pytest.raises(ValueError, match="shape"):
        AdamState(exp_avg={"a": torch.zeros(2)}, exp_avg_sq={"a": torch.zeros(3)}, step={"a": 0},
                  hyper={"a": AdamHyper(lr=1.0)})
    with pytest.raises(ValueError, match="Missing"):
        AdamState(exp_avg={"a": torch.zeros(2)}, exp_avg_sq={}, step={"a": 0}, hyper={"a": AdamHyper(lr=1.0)})
    moved = s.to("cpu", dtype=torch.float64)
    assert moved.exp_avg["a"].dtype == torch.float64 and s.exp_avg["a"].dtype == torch.float32
    assert s.with_lr(0.5).hyper["b"].lr == 0.5 and s.hyper["b"].lr == 1e-3
    json.dumps(s.to_dict())


# ----------------------------------------------------------------------------------------------------------------
# Reading torch / HF Trainer optimizer states
# ----------------------------------------------------------------------------------------------------------------


def _names_model():
    """A PEFT-like trainable parameter list in named_parameters() order: LoRA weights interleaved with biases."""
    return [
        (lora_name(0, "q", "A"), (2, 6)),
        (lora_name(0, "q", "B"), (6, 2)),
        ("base_model.model.model.layers.0.self_attn.q_proj.bias", (6,)),
        (lora_name(0, "v", "A"), (2, 6)),
        (lora_name(0, "v", "B"), (6, 2)),
        ("base_model.model.model.layers.0.self_attn.v_proj.bias", (6,)),
        ("base_model.model.model.layers.0.input_layernorm.weight", (6,)),
    ]


def _trained_optimizer(groups_of_names, shapes, steps=3, skip=(), seed=0, **opt_kwargs):
    """Run a real AdamW a few steps; params in ``skip`` never get a gradient (no optimizer state)."""
    gen = torch.Generator().manual_seed(seed)
    ps = {n: torch.nn.Parameter(torch.randn(shapes[n], generator=gen, dtype=torch.float64))
          for g in groups_of_names for n in g}
    wds = [0.05, 0.0]
    opt = torch.optim.AdamW([{"params": [ps[n] for n in g], "weight_decay": wds[i % 2], "lr": 1e-2 * (i + 1)}
                             for i, g in enumerate(groups_of_names)], foreach=False, **opt_kwargs)
    for _ in range(steps):
        for n, p in ps.items():
            p.grad = None if n in skip else torch.randn(p.shape, generator=gen, dtype=torch.float64)
        opt.step()
    return ps, opt


def test_from_torch_round_trip_and_next_step():
    spec = _names_model()
    shapes = dict(spec)
    decay = [n for n, _ in spec if "bias" not in n and "layernorm" not in n]
    no_decay = [n for n, _ in spec if n not in decay]
    never = lora_name(0, "v", "B")
    ps, opt = _trained_optimizer([decay, no_decay], shapes, skip={never})
    params = {n: ps[n].detach().clone() for n, _ in spec}  # named_parameters() order
    state = AdamState.from_torch(opt.state_dict(), [decay, no_decay], params)
    assert list(state.names) == list(params)
    for n in params:
        if n == never:
            assert state.step[n] == 0 and not state.exp_avg[n].any() and not state.exp_avg_sq[n].any()
            continue
        s = opt.state[ps[n]]
        assert torch.equal(state.exp_avg[n], s["exp_avg"]) and torch.equal(state.exp_avg_sq[n], s["exp_avg_sq"])
        assert state.step[n] == 3
    assert state.hyper[decay[0]] == AdamHyper(lr=1e-2, weight_decay=0.05)
    assert state.hyper[no_decay[0]] == AdamHyper(lr=2e-2, weight_decay=0.0)
    # flat names in the optimizer's order give the same state
    flat = AdamState.from_torch(opt.state_dict(), decay + no_decay, params)
    for n in params:
        assert torch.equal(flat.exp_avg[n], state.exp_avg[n]) and flat.hyper[n] == state.hyper[n]
    # the next step: adamw_update from the loaded state == the optimizer's own next step
    gen = torch.Generator().manual_seed(9)
    grads = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in params.items()}
    new_params, new_state = adamw_update(params, grads, state, max_grad_norm=0.5)
    for n, p in ps.items():
        p.grad = grads[n].clone()
    torch.nn.utils.clip_grad_norm_([ps[n] for n in params], 0.5)
    opt.step()
    for n in params:
        assert torch.equal(new_params[n], ps[n].detach()), n
        assert torch.equal(new_state.exp_avg[n], opt.state[ps[n]]["exp_avg"])
        assert new_state.step[n] == int(opt.state[ps[n]]["step"])
    # to_torch_state_dict round trip
    again = AdamState.from_torch(state.to_torch_state_dict([decay, no_decay]), [decay, no_decay], params)
    for n in params:
        assert torch.equal(again.exp_avg_sq[n], state.exp_avg_sq[n]) and again.step[n] == state.step[n]


def test_from_torch_casts_to_param_dtype():
    names = [lora_name(0, "q", "A")]
    ps, opt = _trained_optimizer([names], {names[0]: (2, 3)})
    params32 = {names[0]: ps[names[0]].detach().float()}
    state = AdamState.from_torch(opt.state_dict(), names, params32)
    assert state.exp_avg[names[0]].dtype == torch.float32


def test_from_torch_errors():
    spec = _names_model()
    shapes = dict(spec)
    names = [n for n, _ in spec]
    ps, opt = _trained_optimizer([names], shapes)
    params = {n: ps[n].detach().clone() for n in names}
    sd = opt.state_dict()
    # shape mismatch: swap two names of different shapes
    swapped = list(names)
    swapped[0], swapped[2] = swapped[2], swapped[0]
    with pytest.raises(ValueError) as e:
        AdamState.from_torch(sd, swapped, params)
    assert "has shape" in str(e.value) and (names[0] in str(e.value) or names[2] in str(e.value))
    assert "param_names" in str(e.value)
    # count mismatch
    with pytest.raises(ValueError, match=r"holds 7 parameters .* but 6 names"):
        AdamState.from_torch(sd, names[:-1], params)
    with pytest.raises(ValueError, match="Extra in param_names"):
        AdamState.from_torch(sd, names, {n: params[n] for n in names[:-1]})
    with pytest.raises(ValueError, match="more than once"):
        AdamState.from_torch(sd, names[:-1] + names[:1], params)
    with pytest.raises(ValueError, match="parameter groups"):
        AdamState.from_torch(sd, [names[:3], names[3:]], params)
    # amsgrad / maximize
    ps2, opt2 = _trained_optimizer([names], shapes, amsgrad=True)
    with pytest.raises(ValueError, match="amsgrad"):
        AdamState.from_torch(opt2.state_dict(), names, params)
    ps3, opt3 = _trained_optimizer([names], shapes, maximize=True)
    with pytest.raises(ValueError, match="maximize"):
        AdamState.from_torch(opt3.state_dict(), names, params)
    # non-Adam: SGD with momentum, and a state without exp_avg_sq
    sgd = torch.optim.SGD(list(ps.values()), lr=0.1, momentum=0.9)
    for p in ps.values():
        p.grad = torch.ones_like(p)
    sgd.step()
    with pytest.raises(ValueError, match="not an Adam"):
        AdamState.from_torch(sgd.state_dict(), names, params)
    broken = opt.state_dict()
    del broken["state"][0]["exp_avg_sq"]
    with pytest.raises(ValueError, match=f"{names[0]}.*not Adam"):
        AdamState.from_torch(broken, names, params)
    # Adam with coupled L2 weight decay is not AdamW
    adam = torch.optim.Adam(list(ps.values()), lr=0.1, weight_decay=0.1)
    adam.step()
    with pytest.raises(ValueError, match="coupled"):
        AdamState.from_torch(adam.state_dict(), names, params)
    with pytest.raises(ValueError, match="not a torch optimizer state dict"):
        AdamState.from_torch({"foo": 1}, names, params)


def test_load_adam_state_flat_default(tmp_path):
    names = [lora_name(0, "q", "A"), lora_name(0, "q", "B"), lora_name(1, "q", "A")]
    shapes = {names[0]: (2, 4), names[1]: (4, 2), names[2]: (2, 4)}
    ps, opt = _trained_optimizer([names], shapes)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    params = {n: ps[n].detach().clone() for n in names}
    state = load_adam_state(tmp_path / "optimizer.pt", params)
    for n in names:
        assert torch.equal(state.exp_avg[n], opt.state[ps[n]]["exp_avg"])


def test_load_adam_state_param_names_json(tmp_path):
    spec = _names_model()
    shapes = dict(spec)
    # an optimizer whose order differs from the params dict order (same-shaped tensors swapped)
    g0 = [lora_name(0, "v", "A"), lora_name(0, "q", "A"), lora_name(0, "v", "B"), lora_name(0, "q", "B")]
    g1 = [n for n, _ in spec if n not in g0]
    ps, opt = _trained_optimizer([g0, g1], shapes)
    params = {n: ps[n].detach().clone() for n, _ in spec}
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    (tmp_path / PARAM_NAMES_FILE).write_text(json.dumps([g0, g1]))
    state = load_adam_state(tmp_path, params)  # a directory is accepted too
    for n in params:
        assert torch.equal(state.exp_avg[n], opt.state[ps[n]]["exp_avg"]), n
    assert state.hyper[g1[0]].weight_decay == 0.0 and state.hyper[g0[0]].weight_decay == 0.05
    # explicit param_names wins over the file
    explicit = load_adam_state(tmp_path / "optimizer.pt", params, param_names=g0 + g1)
    for n in params:
        assert torch.equal(explicit.exp_avg[n], state.exp_avg[n])
    # a flat list in the file works too
    (tmp_path / PARAM_NAMES_FILE).write_text(json.dumps(g0 + g1))
    flat = load_adam_state(tmp_path / "optimizer.pt", params)
    for n in params:
        assert torch.equal(flat.exp_avg[n], state.exp_avg[n])
    # a corrupt names file
    (tmp_path / PARAM_NAMES_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=PARAM_NAMES_FILE):
        load_adam_state(tmp_path / "optimizer.pt", params)


def test_load_adam_state_hf_trainer_layout(tmp_path):
    spec = _names_model()
    shapes = dict(spec)
    named = [n for n, _ in spec]
    # Trainer: group 0 = decayed params, group 1 = no-decay (bias / layernorm), each in named_parameters() order
    decay = [n for n in named if "bias" not in n and "layernorm" not in n]
    no_decay = [n for n in named if n not in decay]
    ps, opt = _trained_optimizer([decay, no_decay], shapes)
    ckpt = tmp_path / "checkpoint-3"
    ckpt.mkdir()
    torch.save(opt.state_dict(), ckpt / "optimizer.pt")
    params = {n: ps[n].detach().clone() for n in named}
    state = load_adam_state(ckpt / "optimizer.pt", params)
    for n in named:
        assert torch.equal(state.exp_avg[n], opt.state[ps[n]]["exp_avg"]), n
        assert state.step[n] == 3
    assert state.hyper[no_decay[0]].weight_decay == 0.0 and state.hyper[decay[0]].weight_decay == 0.05
    # LoRA-only Trainer run: every weight decayed, group 1 empty
    lora = [n for n in named if "lora" in n]
    ps2, opt2 = _trained_optimizer([lora, []], shapes)
    torch.save(opt2.state_dict(), ckpt / "optimizer.pt")
    state2 = load_adam_state(ckpt, {n: ps2[n].detach().clone() for n in lora})
    for n in lora:
        assert torch.equal(state2.exp_avg_sq[n], opt2.state[ps2[n]]["exp_avg_sq"])


def test_load_adam_state_uses_embedded_param_names(tmp_path):
    names = [lora_name(0, "q", "A"), lora_name(1, "q", "A")]
    gen = torch.Generator().manual_seed(5)
    ps = {n: torch.nn.Parameter(torch.randn(2, 3, generator=gen, dtype=torch.float64)) for n in names}
    opt = torch.optim.AdamW(list(ps.items()), lr=1e-2, foreach=False)  # named params → "param_names" in groups
    for p in ps.values():
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
    opt.step()
    sd = opt.state_dict()
    if "param_names" not in sd["param_groups"][0]:
        pytest.skip("this torch does not store param_names")
    torch.save(sd, tmp_path / "optimizer.pt")
    params = {n: ps[n].detach().clone() for n in reversed(names)}  # dict order differs from optimizer order
    state = load_adam_state(tmp_path / "optimizer.pt", params)
    for n in names:
        assert torch.equal(state.exp_avg[n], opt.state[ps[n]]["exp_avg"])


def test_load_adam_state_errors(tmp_path):
    names = [lora_name(0, "q", "A"), lora_name(0, "q", "B")]
    shapes = {names[0]: (2, 4), names[1]: (4, 3)}
    ps, opt = _trained_optimizer([names], shapes)
    params = {n: ps[n].detach().clone() for n in names}
    path = tmp_path / "optimizer.pt"
    # corrupt file
    path.write_bytes(os.urandom(64) + b"garbage")
    with pytest.raises(ValueError) as e:
        load_adam_state(path, params)
    assert str(path) in str(e.value) and "corrupt" in str(e.value)
    # not an optimizer state
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not a torch optimizer state dict"):
        load_adam_state(path, params)
    # missing file
    with pytest.raises(ValueError, match="does not exist"):
        load_adam_state(tmp_path / "nope" / "optimizer.pt", params)
    # shape mismatch (params of another adapter) names the tensor, the file and the fix
    torch.save(opt.state_dict(), path)
    other = {names[0]: torch.zeros(2, 4, dtype=torch.float64), names[1]: torch.zeros(4, 5, dtype=torch.float64)}
    with pytest.raises(ValueError) as e:
        load_adam_state(path, other)
    msg = str(e.value)
    assert names[1] in msg and str(path) in msg and "param_names" in msg
    # count mismatch
    with pytest.raises(ValueError) as e:
        load_adam_state(path, {names[0]: params[names[0]]})
    assert str(path) in str(e.value) and "param_names" in str(e.value)
    # amsgrad
    _, opt_ams = _trained_optimizer([names], shapes, amsgrad=True)
    torch.save(opt_ams.state_dict(), path)
    with pytest.raises(ValueError, match="amsgrad"):
        load_adam_state(path, params)
