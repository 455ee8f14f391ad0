"""LowRankAdamW on a wrapped float64 model against the float64 reference (tests/reference.py) on a dense copy.

Every test feeds the same batches to a wrapped TinyMLP (up: right-projected, down: left-projected, a
LayerNorm, biases, and `small`, too small to project) and to an unwrapped copy stepped by the reference,
and compares all weights after every step.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

import lowrank_compile as lrc
from lowrank_compile.basis import random_orthonormal_matrix
from lowrank_compile.update import remap_states
from reference import ReferenceDCTAdamW, dct_basis, match_states

pytestmark = pytest.mark.usefixtures("one_thread")

RANK = 6
HP = dict(lr=2e-2, betas=(0.9, 0.99), eps=1e-8)


def no_decay_rule(model):
    """Trainer's rule, written independently: biases and LayerNorm parameters get no weight decay."""
    ids = {id(p) for n, p in model.named_parameters() if n.endswith("bias") or n.startswith("norm.")}
    return lambda p: id(p) not in ids


def assert_weights_match(model, dense, rtol=1e-10):
    a, b = model.state_dict(), dense.state_dict()
    assert set(a) == set(b)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=1e-13, msg=lambda m: f"{k}: {m}")


def train_step(model, opt, x, y, **fwd):
    F.mse_loss(model(x, **fwd), y).backward()
    opt.step()
    opt.zero_grad()


def assert_same_selection(model, opt, ref, dense):
    """The library's indices (layer buffer and optimizer state) equal the reference's after a step."""
    for name in ("up", "down"):
        want = torch.tensor(ref.state[getattr(dense, name).weight]["idx"])
        layer = getattr(model, name)
        assert torch.equal(layer.lowrank_idx, want), name
        assert torch.equal(opt.state[layer.weight]["indices"], want), name


def run_against_reference(tiny_mlp, batches, steps=7, decay_all=True, basis="dct", rank=RANK, fused=False, **kw):
    """Train a wrapped model and a reference side by side; returns (model, dense, opt, ref, selections)."""
    model = tiny_mlp()
    dense = copy.deepcopy(model)
    kw = {**HP, "update_gap": 3, **kw}
    opt = lrc.wrap_model(model, rank=rank, decay_all=decay_all, basis=basis, fused=fused, **kw)
    assert model.up.lowrank_spec.side == "right" and model.down.lowrank_spec.side == "left"
    assert not isinstance(model.small, lrc.LowRankLinear)
    ref_basis = {"dct": dct_basis, "random": lambda n: random_orthonormal_matrix(n, torch.float64)}.get(basis, basis)
    decay = (lambda p: True) if decay_all else no_decay_rule(dense)
    ref = ReferenceDCTAdamW(dense, rank, decay=decay, basis=ref_basis, **kw)
    selections = []
    for t, (x, y) in enumerate(batches(steps), start=1):
        train_step(model, opt, x, y)
        train_step(dense, ref, x, y)
        assert opt.global_step == t
        assert_weights_match(model, dense)
        if basis != "svd":
            assert_same_selection(model, opt, ref, dense)
            selections.append((model.up.lowrank_idx.tolist(), model.down.lowrank_idx.tolist()))
    return model, dense, opt, ref, selections


@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize("policy", ["match", "keep", "reset"])
def test_matches_reference(tiny_mlp, batches, policy, norm):
    """7 steps, refreshes at 1, 3, 6, weight decay on all params: weights equal the reference after each step."""
    _, _, _, _, sel = run_against_reference(tiny_mlp, batches, state_policy=policy, norm=norm, weight_decay=0.1)
    # the data must make refreshes change the selection, or the policies would not be exercised
    for layer in (0, 1):
        at = [sel[t - 1][layer] for t in (1, 2, 3, 5, 6)]
        assert at[0] == at[1] and at[2] == at[3]  # no change between refreshes
        assert at[1] != at[2] or at[3] != at[4]
        assert any(set(a) & set(b) and a != b for a, b in ((at[1], at[2]), (at[3], at[4])))


@pytest.mark.parametrize("policy", ["match", "keep"])
def test_fused_matches_reference(tiny_mlp, batches, policy):
    """fused=True (updates inside backward) follows the same reference, step for step."""
    run_against_reference(tiny_mlp, batches, fused=True, state_policy=policy, weight_decay=0.1)


def test_default_decay_skips_biases_and_norms_with_scale(tiny_mlp, batches):
    """Default decay (not biases, not LayerNorm) and scale=0.5 on the low-rank update only: matches."""
    model, _, opt, _, _ = run_against_reference(tiny_mlp, batches, decay_all=False, weight_decay=0.3, scale=0.5)
    decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays[id(model.up.bias)] == decays[id(model.norm.weight)] == 0
    assert decays[id(model.up.weight)] == decays[id(model.small.weight)] == 0.3


@pytest.mark.parametrize("scale", [0.25, 3.0])
def test_scale(tiny_mlp, batches, scale):
    """scale multiplies only the projected layers' update; the reference agrees for scale below and above 1."""
    run_against_reference(tiny_mlp, batches, steps=4, scale=scale, update_gap=2)


def test_update_gap_one_and_random_basis(tiny_mlp, batches):
    """Refresh every step (the paper's setting) on the seeded random basis: matches the reference."""
    run_against_reference(tiny_mlp, batches, steps=5, update_gap=1, basis="random", state_policy="match")


def test_svd_basis_matches_reference(tiny_mlp, batches):
    """basis='svd' (GaLore), policy reset, matches the reference's own SVD step for step.

    The update is invariant to the signs of the singular vectors as long as states restart at each refresh
    ("keep" would carry states across sign flips). Rank 3: `down` sees output gradients through the 3-wide
    `small` layer, so its gradient has rank 3 and a larger r would pick arbitrary null-space vectors.
    """
    model, _, opt, _, _ = run_against_reference(tiny_mlp, batches, steps=7, basis="svd", state_policy="reset",
                                                rank=3)
    assert opt.state[model.up.weight]["basis"].shape == (24, 3)


def test_policies_differ(tiny_mlp, batches):
    """The three policies give different weights on this data (so the tests above can tell them apart)."""
    finals = []
    for policy in ("match", "keep", "reset"):
        model, *_ = run_against_reference(tiny_mlp, batches, state_policy=policy)
        finals.append(torch.cat([p.detach().flatten() for p in model.state_dict().values()]))
    for i in range(3):
        for j in range(i):
            assert (finals[i] - finals[j]).abs().max() > 1e-6


@pytest.mark.parametrize("right", [True, False], ids=["right", "left"])
def test_remap_states_is_match(right):
    """remap_states moves the state of each kept index to that index's new slot and zeroes new indices."""
    old, new = [3, 1, 4, 7, 5], [5, 9, 3, 2, 4]
    shape = (8, 5) if right else (5, 8)
    states = [torch.randn(shape, dtype=torch.float64) for _ in range(2)]
    want = [match_states(s, old, new, right) for s in states]
    remap_states(states, torch.tensor(old), torch.tensor(new), dim=1 if right else 0)
    for s, w in zip(states, want):
        assert torch.equal(s, w)
    kept = [j for j, k in enumerate(new) if k in old]
    assert len(kept) == 3 and all(w.abs().sum() > 0 for w in want)


def test_state_shapes_are_rank_r(tiny_mlp, batches):
    """Projected layers hold (out, r) / (r, in) states and indices; other params full-shape states."""
    model, _, opt, _, _ = run_against_reference(tiny_mlp, batches, steps=2)
    st_up, st_down = opt.state[model.up.weight], opt.state[model.down.weight]
    for key in ("exp_avg", "exp_avg_sq"):
        assert st_up[key].shape == (40, RANK) and st_down[key].shape == (RANK, 40)
        assert st_up[key].dtype == torch.float64
        assert opt.state[model.small.weight][key].shape == model.small.weight.shape
        assert opt.state[model.norm.weight][key].shape == model.norm.weight.shape
    assert st_up["indices"].shape == (RANK,) and st_up["indices"].dtype == torch.int64
    assert model.up.weight.grad is None and model.down.weight.grad is None


def test_bias_correction_uses_each_params_own_step(tiny_mlp, batches):
    """Parameters that start receiving gradients late count their own steps for Adam's bias correction.

    `late_shift` (plain) joins at step 2, `late` (projected) at step 3 (a refresh step of update_gap 3).
    """
    model = tiny_mlp(late=True)
    dense = copy.deepcopy(model)
    opt = lrc.wrap_model(model, rank=RANK, update_gap=3, weight_decay=0.1, decay_all=True, **HP)
    ref = ReferenceDCTAdamW(dense, RANK, update_gap=3, weight_decay=0.1, **HP)
    assert isinstance(model.late, lrc.LowRankLinear)
    for t, (x, y) in enumerate(batches(6), start=1):
        fwd = dict(use_late=t >= 3, use_shift=t >= 2)
        train_step(model, opt, x, y, **fwd)
        train_step(dense, ref, x, y, **fwd)
        assert_weights_match(model, dense)
    assert opt.state[model.up.weight]["step"].item() == 6
    assert opt.state[model.late_shift]["step"].item() == 5
    assert opt.state[model.late.weight]["step"].item() == 4


@pytest.mark.parametrize("kind", ["step", "lambda"])
def test_lr_scheduler(tiny_mlp, batches, kind):
    """StepLR / LambdaLR on opt change the lr every group uses; the reference follows the same schedule."""
    model = tiny_mlp()
    dense = copy.deepcopy(model)
    opt = lrc.wrap_model(model, rank=RANK, update_gap=3, weight_decay=0.1, **HP)
    ref = ReferenceDCTAdamW(dense, RANK, update_gap=3, weight_decay=0.1, decay=no_decay_rule(dense), **HP)
    lr0 = HP["lr"]
    if kind == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.3)
        lr_at = lambda t: lr0 * 0.3 ** ((t - 1) // 2)  # noqa: E731 -- lr used by step t (t from 1)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0 / (1 + e))
        lr_at = lambda t: lr0 / t  # noqa: E731
    for t, (x, y) in enumerate(batches(6), start=1):
        assert all(g["lr"] == pytest.approx(lr_at(t), rel=1e-12) for g in opt.param_groups)
        ref.lr = lr_at(t)
        train_step(model, opt, x, y)
        train_step(dense, ref, x, y)
        sched.step()
        assert_weights_match(model, dense)


@pytest.mark.parametrize("policy", ["match", "keep"])
def test_state_dict_round_trip_continues_identically(tiny_mlp, batches, policy):
    """opt.state_dict() through torch.save / torch.load(weights_only=True) into a fresh wrapped copy: both
    continue bit-identically (a refresh included), and the indices come back as int64 in both places."""
    data = batches(9)
    kw = dict(rank=RANK, update_gap=3, weight_decay=0.1, state_policy=policy, **HP)
    model = tiny_mlp()
    opt = lrc.wrap_model(model, **kw)
    for x, y in data[:4]:
        train_step(model, opt, x, y)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    fresh = tiny_mlp(seed=123)
    fresh.load_state_dict(model.state_dict())
    opt2 = lrc.wrap_model(fresh, **kw)
    assert not torch.equal(fresh.up.lowrank_idx, model.up.lowrank_idx)  # loading must restore it
    opt2.load_state_dict(saved)
    assert opt2.global_step == opt.global_step == 4
    for name in ("up", "down"):
        a, b = getattr(model, name), getattr(fresh, name)
        assert b.lowrank_idx.dtype == torch.int64 and torch.equal(b.lowrank_idx, a.lowrank_idx)
        st = opt2.state[b.weight]
        assert st["indices"].dtype == torch.int64 and torch.equal(st["indices"], opt.state[a.weight]["indices"])
        assert st["exp_avg"].dtype == torch.float64
    for x, y in data[4:]:  # steps 5..9: refreshes at 6 and 9
        train_step(model, opt, x, y)
        train_step(fresh, opt2, x, y)
        for k, v in model.state_dict().items():
            assert torch.equal(fresh.state_dict()[k], v), k
