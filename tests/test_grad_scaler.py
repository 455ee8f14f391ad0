"""torch.amp.GradScaler with a wrapped model: rank-r gradients are unscaled and inf-checked with the plain ones,
a skipped step changes nothing (weights, states, step counter, selections), in eager and accumulating modes;
fused=True is refused. Scales are powers of two, so in fp32 a scaled run is bit for bit an unscaled one."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowrank_compile as lrc


def _model(bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32, bias=bias), nn.GELU(), nn.Linear(32, 16, bias=bias))


def _batches(n: int, poison: set[int] = frozenset()):
    gen = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        x = torch.randn(8, 16, generator=gen)
        if i in poison:
            x = x * 1e30  # the scaled loss overflows to inf: every gradient is inf / NaN
        out.append(x)
    return out


def _loss(model, x):
    return model(x).square().mean()


def _snapshot(model, opt):
    return dict(weights={k: v.clone() for k, v in model.state_dict().items()},
                states=[{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
                        for g in opt.param_groups for p in g["params"]],
                step=opt.global_step, selections=[layer.selection().clone() for layer in opt.layers.values()])


def _assert_same(a, b):
    assert a["step"] == b["step"]
    for k in a["weights"]:
        assert torch.equal(a["weights"][k], b["weights"][k]), k
    assert len(a["states"]) == len(b["states"])
    for sa, sb in zip(a["states"], b["states"]):
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor) else sa[k] == sb[k]
    for x, y in zip(a["selections"], b["selections"]):
        assert torch.equal(x, y)


def _run(model, opt, batches, scaler=None, clip=None):
    for x in batches:
        loss = _loss(model, x)
        if scaler is None:
            loss.backward()
            if clip is not None:
                opt.clip_grad_norm_(clip)
            opt.step()
        else:
            scaler.scale(loss).backward()
            if clip is not None:
                scaler.unscale_(opt)
                opt.clip_grad_norm_(clip)
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()


@pytest.mark.parametrize("bias", [False, True], ids=["all-projected", "with-plain-params"])
@pytest.mark.parametrize("clip", [None, 0.05], ids=["no-unscale", "unscale-and-clip"])
def test_a_scaled_run_equals_the_unscaled_run(bias, clip):
    """Without overflow a GradScaler changes nothing: rank-r and plain gradients are unscaled exactly, whether
    by scaler.step or by an explicit scaler.unscale_ before clipping (which must then see unscaled values).
    With every trainable parameter projected (no bias) this used to fail with "No inf checks were recorded"."""
    batches = _batches(6)
    ref, scaled = _model(bias), _model(bias)
    opt_ref = lrc.wrap_model(ref, rank=4, lr=1e-2, update_gap=2)
    opt = lrc.wrap_model(scaled, rank=4, lr=1e-2, update_gap=2)
    _run(ref, opt_ref, batches, clip=clip)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, growth_interval=2)  # grows 3 times in 6 steps
    _run(scaled, opt, batches, scaler=scaler, clip=clip)
    assert scaler.get_scale() == 2.0 ** 19
    _assert_same(_snapshot(ref, opt_ref), _snapshot(scaled, opt))
    assert all(not g.get("carriers") for g in opt.param_groups)  # the carriers' group is gone after the step


def test_unscale_reaches_the_rank_r_gradients():
    model = _model()
    opt = lrc.wrap_model(model, rank=4, update_gap=1)
    x = _batches(1)[0]
    _loss(model, x).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.zero_grad()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    scaler.scale(_loss(model, x)).backward()
    scaler.unscale_(opt)
    assert any(g.get("carriers") for g in opt.param_groups)
    for n, p in model.named_parameters():
        if n in plain:
            assert torch.equal(p.grad, plain[n]), n  # carriers ("...lowrank_grad") included
    assert any(n.endswith("lowrank_grad") for n in plain)


def _inject_into_one_rank_r_gradient(opt):
    layer = next(iter(opt.layers.values()))
    layer.lowrank_grad.grad[0, 0] = float("inf")


@pytest.mark.parametrize("refresh", [False, True], ids=["ordinary-step", "refresh-step"])
def test_an_inf_only_in_a_rank_r_gradient_skips_the_step_and_changes_nothing(refresh):
    model = _model()
    opt = lrc.wrap_model(model, rank=4, lr=1e-2, update_gap=1 if refresh else 100)
    _run(model, opt, _batches(3))
    before = _snapshot(model, opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    gen = torch.Generator().manual_seed(5)
    scaler.scale(_loss(model, torch.randn(8, 16, generator=gen))).backward()
    _inject_into_one_rank_r_gradient(opt)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    _assert_same(before, _snapshot(model, opt))
    assert scaler.get_scale() == 2.0 ** 9  # the scaler saw the inf and backed off
    assert int(opt.nonfinite_skips) == 0  # the scaler owns infs: the guard stayed quiet


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("state_dtype", ["fp32", "int8"])
def test_a_skipped_step_is_as_if_the_bad_batch_never_came(accumulate, state_dtype):
    """update_gap=1: every step refreshes inside backward. A skipped step must undo its refresh, keep the step
    counter, and leave the run bit for bit on the course of a run that never saw the bad batch(es)."""
    clean = _batches(8 * accumulate)
    poisoned_at = 3 * accumulate  # the first micro-batch of the 4th step
    bad = clean[:poisoned_at] + [clean[poisoned_at] * 1e30] + clean[poisoned_at + 1:poisoned_at + accumulate]
    with_bad = bad + clean[poisoned_at:]
    kw = dict(rank=8 if state_dtype == "int8" else 4, lr=1e-2, update_gap=1, accumulate=accumulate,
              state_dtype=state_dtype)

    def model_for_quant():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)) if state_dtype == "int8" else _model()

    def data(xs):
        if state_dtype != "int8":
            return xs
        gen = torch.Generator().manual_seed(2)
        proj = torch.randn(16, 64, generator=gen)
        return [x @ proj for x in xs]

    ref = model_for_quant()
    opt_ref = lrc.wrap_model(ref, **kw)
    run = model_for_quant()
    opt = lrc.wrap_model(run, **kw)
    _run(ref, opt_ref, data(clean), scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=10 ** 6))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=10 ** 6)
    _run(run, opt, data(with_bad), scaler=scaler)
    # one backoff per micro-batch that saw the inf (it stays in the accumulated gradient until the step)
    assert scaler.get_scale() == 2.0 ** (8 - accumulate)
    assert opt.global_step == opt_ref.global_step == 8
    # the poisoned run used scale 2^7 after the bad batch, the clean one 2^8: powers of two, so still exact
    _assert_same(_snapshot(ref, opt_ref), _snapshot(run, opt))


def test_a_scale_change_inside_an_accumulated_step_skips_it_and_says_so(caplog):
    model = _model()
    opt = lrc.wrap_model(model, rank=4, lr=1e-2, update_gap=1, accumulate=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=3)  # grows after the 3rd micro-batch
    before = None
    for i, x in enumerate(_batches(6)):
        if i == 2:
            before = _snapshot(model, opt)
        scaler.scale(_loss(model, x)).backward()
        with caplog.at_level("WARNING", logger="lowrank_compile"):
            scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if i == 3:  # the 2nd step's micro-batches ran under 2^8 and 2^9: skipped, nothing changed
            _assert_same(before, _snapshot(model, opt))
    assert opt.scaler_skips == 1
    assert "changed its scale" in caplog.text
    assert opt.global_step == 2


def test_grad_scaler_with_fused_updates_is_refused():
    model = _model()
    opt = lrc.wrap_model(model, rank=4, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    scaler.scale(_loss(model, _batches(1)[0])).backward()
    with pytest.raises(RuntimeError, match="GradScaler with fused=True"):
        scaler.step(opt)


def test_skips_match_torch_adamw_under_the_same_scaler():
    """The same data through torch AdamW and through lowrank_compile, each with its own GradScaler: the same
    steps are skipped, the scales follow the same course, and on the first step the plain parameters' unscaled
    gradients agree bit for bit."""
    batches = _batches(6, poison={2, 4})
    ref_model = _model()
    wrapped = copy.deepcopy(ref_model)
    torch_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-2)
    opt = lrc.wrap_model(wrapped, rank=4, lr=1e-2, update_gap=2)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=2) for _ in range(2)]
    scales = ([], [])
    for i, x in enumerate(batches):
        for k, (m, o) in enumerate([(ref_model, torch_opt), (wrapped, opt)]):
            scalers[k].scale(_loss(m, x)).backward()
            scalers[k].unscale_(o)
            if i == 0:
                grads = {n.replace("lowrank_grad", ""): p.grad.clone() for n, p in m.named_parameters()
                         if p.grad is not None and "weight" not in n}
                if k == 0:
                    first = grads
                else:
                    assert first.keys() <= grads.keys() and all(torch.equal(first[n], grads[n]) for n in first)
            scalers[k].step(o)
            scalers[k].update()
            scales[k].append(scalers[k].get_scale())
            o.zero_grad()
    assert scales[0] == scales[1]
    assert opt.global_step == 4  # two of six steps skipped


def test_the_carriers_group_never_reaches_a_checkpoint(tmp_path):
    """Between a backward and its step the carriers' bookkeeping group is in param_groups; saving there (either
    way) writes only the trained groups, and the file loads into an optimizer that has no such group."""
    model = _model()
    opt = lrc.wrap_model(model, rank=4, update_gap=2)
    _run(model, opt, _batches(2))
    _loss(model, _batches(3)[2]).backward()
    assert any(g.get("carriers") for g in opt.param_groups)
    assert len(opt.trained_groups) == len(opt.param_groups) - 1
    sd = opt.state_dict()
    assert len(sd["param_groups"]) == len(opt.trained_groups)
    lrc.save_optimizer(opt, tmp_path / "mid.safetensors")
    assert any(g.get("carriers") for g in opt.param_groups)  # still shown: a scaler may come next
    opt.step()
    opt.zero_grad()
    other = _model()
    opt2 = lrc.wrap_model(other, rank=4, update_gap=2)
    lrc.load_optimizer(opt2, tmp_path / "mid.safetensors")
    opt2.load_state_dict(sd)
    assert opt2.global_step == 2
