"""Nothing silent, nothing half-done: wrapping is all or nothing, bad options and state dicts are refused with the
optimizer unchanged, and clipping that cannot work says so."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import lowrank_compile as lrc
from lowrank_compile import optimizer as optimizer_module
from lowrank_compile.projection import LowRankLinear


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))


def _train(model, opt, steps=3, d=16):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        model(torch.randn(8, d, generator=gen)).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _snapshot(model, opt):
    """Everything a failed call must leave as it was, cloned."""
    return dict(weights={k: v.clone() for k, v in model.state_dict().items()},
                states={i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
                        for i, p in enumerate(p for g in opt.param_groups for p in g["params"])},
                groups=[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
                step=opt.global_step, selections=[layer.selection().clone() for layer in opt.layers.values()])


def _assert_same(a, b):
    assert a["step"] == b["step"] and a["groups"] == b["groups"]
    for k in a["weights"]:
        assert torch.equal(a["weights"][k], b["weights"][k]), k
    for i in a["states"]:
        assert a["states"][i].keys() == b["states"][i].keys()
        for k, v in a["states"][i].items():
            assert torch.equal(v, b["states"][i][k]) if isinstance(v, torch.Tensor) else v == b["states"][i][k]
    for x, y in zip(a["selections"], b["selections"]):
        assert torch.equal(x, y)


# -- wrap_model is all or nothing --------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["optimizer", "log_storage"])
def test_a_failing_wrap_leaves_the_model_as_it_was(monkeypatch, where):
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if where == "optimizer":
        monkeypatch.setattr(optimizer_module.LowRankAdamW, "__init__",
                            lambda *a, **k: (_ for _ in ()).throw(RuntimeError("injected")))
    else:
        monkeypatch.setattr(lrc.quant, "log_storage", lambda opt: (_ for _ in ()).throw(RuntimeError("injected")))
    with pytest.raises(RuntimeError, match="injected"):
        lrc.wrap_model(model, rank=4, fused=True)
    monkeypatch.undo()
    assert not lrc.is_wrapped(model)
    assert all(type(m) in (nn.Sequential, nn.Linear, nn.GELU) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    opt = lrc.wrap_model(model, rank=4)  # and it can be wrapped afterwards
    _train(model, opt, 1)


@pytest.mark.parametrize("option, value", [("lr", math.nan), ("lr", math.inf), ("weight_decay", math.inf),
                                           ("scale", math.nan), ("eps", -1.0), ("fused", "no"), ("decay_all", 1),
                                           ("stochastic_round", "yes"), ("lr", True), ("clip_per_tensor", math.inf)])
def test_non_finite_numbers_and_non_bool_flags_are_refused(option, value):
    model = _mlp()
    with pytest.raises(ValueError, match=option):
        lrc.wrap_model(model, rank=4, **{option: value})
    assert not lrc.is_wrapped(model)


# -- load_state_dict checks everything first ---------------------------------------------------------------------
def _trained(**kw):
    model = _mlp()
    opt = lrc.wrap_model(model, rank=4, **kw)
    _train(model, opt)
    return model, opt


def _corrupt(sd, how):
    sd = copy.deepcopy(sd)
    lowrank_id = sd["param_groups"][0]["params"][0]
    if how == "lr string":
        sd["param_groups"][0]["lr"] = "0.1"
    elif how == "negative lr":
        sd["param_groups"][1]["lr"] = -1.0
    elif how == "betas 1.5":
        sd["param_groups"][0]["betas"] = (1.5, 0.999)
    elif how == "empty params":
        sd["param_groups"][0]["params"] = []
    elif how == "other state_dtype":
        sd["param_groups"][0]["state_dtype"] = "bf16"
    elif how == "negative exp_avg_sq":
        sd["state"][lowrank_id]["exp_avg_sq"][0, 0] = -1.0
    elif how == "nan exp_avg":
        sd["state"][lowrank_id]["exp_avg"][0, 0] = math.nan
    elif how == "fractional step":
        sd["state"][lowrank_id]["step"] = torch.tensor(2.5)
    elif how == "repeated indices":
        sd["state"][lowrank_id]["indices"][1] = sd["state"][lowrank_id]["indices"][0]
    elif how == "index out of range":
        sd["state"][lowrank_id]["indices"][0] = 10_000
    elif how == "bad global_step":
        sd["global_step"] = -3
    elif how == "no global_step":
        del sd["global_step"]
        for g in sd["param_groups"]:  # it also rides in every group, for torch.distributed.checkpoint (dcp.py)
            del g["global_step"]
    else:
        raise AssertionError(how)
    return sd


@pytest.mark.parametrize("how", ["lr string", "negative lr", "betas 1.5", "empty params", "other state_dtype",
                                 "negative exp_avg_sq", "nan exp_avg", "fractional step", "repeated indices",
                                 "index out of range", "bad global_step", "no global_step"])
def test_load_state_dict_refuses_a_bad_state_dict_and_changes_nothing(how):
    model, opt = _trained()
    sd = _corrupt(opt.state_dict(), how)
    _train(model, opt, 1)  # the optimizer has moved on since: a half-applied load would show
    before = _snapshot(model, opt)
    with pytest.raises(ValueError):
        opt.load_state_dict(sd)
    _assert_same(before, _snapshot(model, opt))


def test_load_state_dict_refuses_another_rank_and_changes_nothing():
    _, other = _trained()
    model = _mlp()
    opt = lrc.wrap_model(model, rank=6)
    _train(model, opt)
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match="exp_avg|indices"):
        opt.load_state_dict(other.state_dict())
    _assert_same(before, _snapshot(model, opt))


def test_load_state_dict_refuses_mid_accumulation():
    model = _mlp()
    opt = lrc.wrap_model(model, rank=4, accumulate=2)
    _train(model, opt, 4)  # two whole steps
    assert opt.micro_step == 0
    sd = opt.state_dict()
    model(torch.randn(8, 16)).square().mean().backward()
    opt.step()  # the first of two micro-batches
    assert opt.micro_step == 1
    with pytest.raises(RuntimeError, match="micro-batches"):
        opt.load_state_dict(sd)


def test_a_good_state_dict_still_loads_and_resumes_exactly():
    model, opt = _trained()
    sd = copy.deepcopy(opt.state_dict())
    weights = copy.deepcopy(model.state_dict())
    _train(model, opt, 2)
    after = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(weights)
    opt.load_state_dict(sd)
    _train(model, opt, 2)
    assert all(torch.equal(v, after[k]) for k, v in model.state_dict().items())


# -- clipping that cannot work says so ----------------------------------------------------------------------------
def test_clip_grad_norm_clips_plain_and_rank_r_gradients_like_torch():
    model, opt = _trained()
    model(torch.randn(8, 16)).square().mean().backward()
    reference = copy.deepcopy([p.grad for p in model.parameters() if p.grad is not None])
    holders = [torch.zeros_like(g).requires_grad_() for g in reference]
    for h, g in zip(holders, reference):
        h.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(holders, 1e-3)
    total = opt.clip_grad_norm_(1e-3)
    assert torch.allclose(total, torch.linalg.vector_norm(torch.stack([g.norm() for g in reference])))
    got = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(got) == len(holders)
    for g, h in zip(got, holders):
        assert torch.allclose(g, h.grad)
    assert total > 1e-3  # the clip did something


def test_clip_grad_norm_refuses_fused():
    model, opt = _trained(fused=True)
    model(torch.randn(8, 16)).square().mean().backward()
    with pytest.raises(RuntimeError, match="clip_per_tensor"):
        opt.clip_grad_norm_(1.0)


def test_wrapped_layers_stay_wrapped_after_a_refused_load():
    model, opt = _trained()
    sd = _corrupt(opt.state_dict(), "negative lr")
    with pytest.raises(ValueError):
        opt.load_state_dict(sd)
    assert all(isinstance(layer, LowRankLinear) for layer in opt.layers.values())


# -- non-finite gradients -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("state_dtype", ["fp32", "int8"])
@pytest.mark.parametrize("target", ["left-projected", "right-projected", "plain"])
def test_a_non_finite_gradient_skips_that_parameter_only_and_is_counted(state_dtype, target, caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))  # up: right, down: left
    opt = lrc.wrap_model(model, rank=8, state_dtype=state_dtype, weight_decay=0.1, update_gap=1000)
    _train(model, opt, 2, d=64)
    model(torch.randn(8, 64)).square().mean().backward()
    up, down = model[0], model[2]
    holder = {"left-projected": down.lowrank_grad, "right-projected": up.lowrank_grad, "plain": up.bias}[target]
    param = {"left-projected": down.weight, "right-projected": up.weight, "plain": up.bias}[target]
    holder.grad.view(-1)[3] = math.nan if target != "plain" else math.inf  # one element
    kept = {k: lrc.quant.dequantize(v).clone() for k, v in opt.state[param].items() if k != "step"}
    before = {n: p.clone() for n, p in model.named_parameters() if "lowrank_grad" not in n}
    opt.step()
    for n, p in model.named_parameters():
        if "lowrank_grad" in n:
            continue
        assert torch.isfinite(p).all(), n
        if p is param:
            assert torch.equal(p, before[n]), n  # kept, weight decay included
        else:
            assert not torch.equal(p, before[n]), n  # the others trained
    for k, v in kept.items():
        assert torch.equal(lrc.quant.dequantize(opt.state[param][k]), v), k
    with caplog.at_level("WARNING"):
        assert opt.nonfinite_skips.item() == 1
    assert "non-finite" in caplog.text
    opt.zero_grad()
    _train(model, opt, 2, d=64)  # and training goes on, finite
    assert opt.nonfinite_skips.item() == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_guard_changes_nothing_for_finite_gradients():
    """Two identical runs, one through the guarded update and one with the guard switched off by hand: equal."""
    from lowrank_compile import update

    runs = []
    for guard in (True, False):
        model = _mlp()
        opt = lrc.wrap_model(model, rank=4, weight_decay=0.1)
        if not guard:
            opt._skips_on = lambda device: None  # every update function then runs unguarded
        _train(model, opt, 4)
        runs.append({k: v.clone() for k, v in model.state_dict().items()})
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert update.guard_list([torch.ones(3)], None, 0.9, 0.999, torch.ones(3)) == [None]  # no counter, no guard


@pytest.mark.parametrize("seed", [2**31 - 1, 1_764_000_000, 2**70, -5])
def test_any_int_seed_works_with_sketched_refreshes(seed):
    model = _mlp()
    opt = lrc.wrap_model(model, rank=4, sketch_rows=8, seed=seed)
    _train(model, opt, 2)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_failure_inside_one_layer_wrap_leaves_every_layer_as_it_was(monkeypatch):
    from lowrank_compile import projection

    calls = []
    real = projection.basis_matrix

    def failing(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise RuntimeError("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(projection, "basis_matrix", failing)
    model = _mlp()
    keys = set(model.state_dict())
    with pytest.raises(RuntimeError, match="injected"):
        lrc.wrap_model(model, rank=4)
    assert not lrc.is_wrapped(model) and set(model.state_dict()) == keys
    assert all(p.requires_grad for p in model.parameters())
    assert not any(name.endswith("lowrank_grad") for name, _ in model.named_parameters())


@pytest.mark.parametrize("kind", ["zero", "nan"])
def test_a_refresh_from_a_zero_or_non_finite_gradient_keeps_the_selection(kind):
    model = _mlp()
    opt = lrc.wrap_model(model, rank=4, update_gap=1)
    _train(model, opt, 2)
    selections = [layer.selection().clone() for layer in opt.layers.values()]
    weights = {n: p.clone() for n, p in model.named_parameters()}
    x = torch.randn(8, 16)
    if kind == "nan":
        x[0, 0] = math.nan
    loss = model(x).square().mean() * (0.0 if kind == "zero" else 1.0)
    loss.backward()
    opt.step()
    opt.zero_grad()
    for layer, before in zip(opt.layers.values(), selections):
        assert torch.equal(layer.selection(), before)
    for n, p in model.named_parameters():
        if kind == "nan" and "lowrank_grad" not in n:
            assert torch.equal(p, weights[n]), n  # every gradient was NaN: nothing moved
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_advice_for_a_rank_too_large_can_be_followed():
    import re

    model = _mlp()  # smaller sides 16 and 16
    with pytest.raises(ValueError, match="at most 15") as err:
        lrc.wrap_model(model, rank=16)
    advised = int(re.search(r"at most (\d+)", str(err.value)).group(1))
    assert not lrc.is_wrapped(model)
    opt = lrc.wrap_model(model, rank=advised)
    assert len(opt.layers) == 2
    with pytest.raises(ValueError, match="side of 1"):
        lrc.wrap_model(nn.Sequential(nn.Linear(1, 8), nn.Linear(8, 1)), rank=1)


@pytest.mark.parametrize("state_dtype", ["fp32", "int8"])
def test_load_state_dict_copies_into_the_existing_state_tensors(state_dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    opt = lrc.wrap_model(model, rank=32, state_dtype=state_dtype)  # (128, 32) states: int8 for real
    _train(model, opt, 2, d=64)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)  # torchao's states have no deepcopy; a round trip as users save them
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    _train(model, opt, 1, d=64)
    before = {(i, k): v for i, p in enumerate(p for g in opt.param_groups for p in g["params"])
              for k, v in opt.state[p].items()}
    opt.load_state_dict(saved)
    params = [p for g in opt.param_groups for p in g["params"]]
    for (i, k), old in before.items():
        assert opt.state[params[i]][k] is old, (i, k)  # the same tensor object, now holding the loaded values
        assert torch.equal(lrc.quant.dequantize(old), lrc.quant.dequantize(saved["state"][i][k]).to(old.dtype))
    if state_dtype == "int8":
        assert lrc.quant.is_quantized(opt.state[model[0].weight]["exp_avg"])
