"""The projected backward against a dense float64 model: rank-r weight gradient, exact input/bias gradients.

Each test runs the same data through a plain nn.Linear model and a wrapped copy. The dense copy gives the
full gradient G = gy^T x; the wrapped layer must deliver G D_r (right) or D_r^T G (left) in its carrier,
never a full weight gradient, and the top-r of the dense scores as its selection on a refresh step.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import lowrank_compile as lrc
from lowrank_compile.basis import random_orthonormal_matrix
from reference import column_scores, dct_basis, project, top_r

pytestmark = pytest.mark.usefixtures("one_thread")

RANK = 4
SHAPES = {"right": (40, 24), "left": (24, 40)}  # (out, in)
LEADING = {"2d": (6,), "3d": (2, 3), "4d": (1, 2, 3)}


def make_pair(side, bias, dtype=torch.float64, **kw):
    """A one-layer dense model and a wrapped copy with identical weights (lr=0, so steps leave them alone)."""
    out_f, in_f = SHAPES[side]
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(in_f, out_f, bias=bias)).to(dtype)
    wrapped = copy.deepcopy(dense)
    kw.setdefault("update_gap", 5)
    opt = lrc.wrap_model(wrapped, rank=RANK, lr=0.0, **kw)
    layer = wrapped[0]
    assert isinstance(layer, lrc.LowRankLinear) and layer.lowrank_spec.side == side
    return dense, wrapped, layer, opt


def backward(model, x, c):
    """loss = sum(tanh(y) * c): a generic output gradient. Returns the input gradient."""
    x = x.clone().requires_grad_(True)
    (torch.tanh(model(x)) * c).sum().backward()
    return x.grad


def batch(side, lead, seed, dtype=torch.float64):
    out_f, in_f = SHAPES[side]
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*lead, in_f, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(*lead, out_f, generator=g, dtype=torch.float64).to(dtype))


def check_step(dense, wrapped, layer, x, c, basis):
    """One backward on both models; asserts every gradient and returns (G, selection used)."""
    dense.zero_grad()
    gx_dense = backward(dense, x, c)
    gx = backward(wrapped, x, c)
    torch.testing.assert_close(gx, gx_dense, rtol=1e-12, atol=1e-14)
    lin = dense[0]
    if lin.bias is not None:
        torch.testing.assert_close(layer.bias.grad, lin.bias.grad, rtol=1e-12, atol=1e-14)
    assert layer.weight.grad is None and not layer.weight.requires_grad
    G = lin.weight.grad
    right = layer.lowrank_spec.right
    D_r = basis[:, layer.lowrank_idx]
    torch.testing.assert_close(layer.lowrank_grad.grad, project(G, D_r, right), rtol=1e-12, atol=1e-14)
    return G, layer.lowrank_idx.clone()


def next_step(opt, dense):
    opt.step()
    opt.zero_grad()
    dense.zero_grad()


@pytest.mark.parametrize("lead", LEADING)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("side", SHAPES)
def test_dct_projected_gradients_match_dense(side, bias, lead):
    """Refresh step: idx = top-r of the dense L1 scores, carrier = projected G; next step: same idx, new G."""
    dense, wrapped, layer, opt = make_pair(side, bias)
    right = side == "right"
    d = dct_basis(layer.basis_size)
    x, c = batch(side, LEADING[lead], 1)
    G, idx = check_step(dense, wrapped, layer, x, c, d)
    assert idx.dtype == torch.int64 and idx.shape == (RANK,)
    assert torch.equal(idx, top_r(column_scores(G, d, right, 1), RANK))
    assert layer.lowrank_grad.grad.shape == ((40, RANK) if right else (RANK, 40))
    next_step(opt, dense)
    x, c = batch(side, LEADING[lead], 2)
    _, idx2 = check_step(dense, wrapped, layer, x, c, d)  # step 2 of gap 5: no refresh
    assert torch.equal(idx2, idx)


@pytest.mark.parametrize("side", SHAPES)
def test_l2_norm_selection(side):
    """norm='l2' ranks basis columns by the L2 norm of the dense projected gradient."""
    dense, wrapped, layer, _ = make_pair(side, True, norm="l2")
    d = dct_basis(layer.basis_size)
    x, c = batch(side, (2, 3), 3)
    G, idx = check_step(dense, wrapped, layer, x, c, d)
    assert torch.equal(idx, top_r(column_scores(G, d, side == "right", 2), RANK))


@pytest.mark.parametrize("side", SHAPES)
def test_refresh_selects_again_on_schedule(side):
    """With update_gap=2, steps 1 and 2 re-select from their own gradient; step 3 keeps step 2's selection."""
    dense, wrapped, layer, opt = make_pair(side, True, update_gap=2)
    d = dct_basis(layer.basis_size)
    right = side == "right"
    for t in (1, 2, 3):
        x, c = batch(side, (2, 3), 10 + t)
        before = layer.lowrank_idx.clone()
        G, idx = check_step(dense, wrapped, layer, x, c, d)
        if t in (1, 2):
            assert torch.equal(idx, top_r(column_scores(G, d, right, 1), RANK))
        else:
            assert torch.equal(idx, before)
        next_step(opt, dense)


@pytest.mark.parametrize("side", SHAPES)
def test_random_basis_projected_gradients_match_dense(side):
    """basis='random': the same pipeline on the seeded random orthonormal basis."""
    dense, wrapped, layer, opt = make_pair(side, True, basis="random")
    q = random_orthonormal_matrix(layer.basis_size, torch.float64)
    x, c = batch(side, (2, 3), 4)
    G, idx = check_step(dense, wrapped, layer, x, c, q)
    assert torch.equal(idx, top_r(column_scores(G, q, side == "right", 1), RANK))
    next_step(opt, dense)
    x, c = batch(side, (2, 3), 5)
    _, idx2 = check_step(dense, wrapped, layer, x, c, q)
    assert torch.equal(idx2, idx)


@pytest.mark.parametrize("side", SHAPES)
def test_svd_basis_spans_top_singular_subspace(side):
    """basis='svd': the stored (n, r) basis P is orthonormal, P P^T is the top-r singular projector of G,
    the carrier is G P (right) / P^T G (left); a non-refresh step projects the new G on the same P."""
    dense, wrapped, layer, opt = make_pair(side, True, basis="svd", state_policy="keep")
    right = side == "right"
    x, c = batch(side, (2, 3), 6)
    dense.zero_grad()
    torch.testing.assert_close(backward(wrapped, x, c), backward(dense, x, c), rtol=1e-12, atol=1e-14)
    G = dense[0].weight.grad
    P = layer.selection()
    assert P.shape == (layer.basis_size, RANK) and P.dtype == torch.float64
    torch.testing.assert_close(P.t() @ P, torch.eye(RANK, dtype=torch.float64), rtol=0, atol=1e-12)
    u, s, vh = torch.linalg.svd(G, full_matrices=False)
    assert s[RANK - 1] > 1.01 * s[RANK]  # the top-r subspace is well defined
    v_r = vh[:RANK].t() if right else u[:, :RANK]
    torch.testing.assert_close(P @ P.t(), v_r @ v_r.t(), rtol=0, atol=1e-10)
    low = layer.lowrank_grad.grad
    torch.testing.assert_close(low, project(G, P, right), rtol=1e-12, atol=1e-13)
    gram = low @ low.t() if right else low.t() @ low  # invariant to the signs of the singular vectors
    ref = project(G, v_r, right)
    torch.testing.assert_close(gram, ref @ ref.t() if right else ref.t() @ ref, rtol=1e-10, atol=1e-12)
    P1 = P.clone()
    next_step(opt, dense)
    x, c = batch(side, (2, 3), 7)
    backward(wrapped, x, c)
    backward(dense, x, c)
    assert torch.equal(layer.selection(), P1)
    torch.testing.assert_close(layer.lowrank_grad.grad, project(dense[0].weight.grad, P1, right), rtol=1e-12,
                               atol=1e-14)


@pytest.mark.parametrize("side", SHAPES)
def test_float32_layer_close_to_float64_projection(side):
    """A float32 layer's carrier is close to the float64 projection of the float64 gradient on its idx."""
    dense, wrapped, layer, _ = make_pair(side, True, dtype=torch.float32)
    dense64 = copy.deepcopy(dense).double()
    x, c = batch(side, (2, 3), 8, dtype=torch.float32)
    gx = backward(wrapped, x, c)
    gx64 = backward(dense64, x.double(), c.double())
    torch.testing.assert_close(gx.double(), gx64, rtol=1e-4, atol=1e-5)
    assert layer.lowrank_grad.grad.dtype == torch.float32
    want = project(dense64[0].weight.grad, dct_basis(layer.basis_size)[:, layer.lowrank_idx], side == "right")
    torch.testing.assert_close(layer.lowrank_grad.grad.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("side", SHAPES)
def test_accumulated_micro_batches_on_ordinary_step(side):
    """Two backwards on a non-refresh step accumulate the projection of the summed dense gradient."""
    dense, wrapped, layer, opt = make_pair(side, True)
    d = dct_basis(layer.basis_size)
    backward(wrapped, *batch(side, (2, 3), 20))
    next_step(opt, dense)
    for seed in (21, 22):
        x, c = batch(side, (2, 3), seed)
        backward(wrapped, x, c)
        backward(dense, x, c)
    right = side == "right"
    torch.testing.assert_close(layer.lowrank_grad.grad, project(dense[0].weight.grad, d[:, layer.lowrank_idx], right),
                               rtol=1e-12, atol=1e-14)


def test_layer_stores_only_indices_and_state_dict_keeps_keys():
    """A wrapped layer holds r int64 indices and no basis columns; model.state_dict() has the dense keys."""
    dense, wrapped, layer, _ = make_pair("right", True)
    assert [(n, b.dtype, tuple(b.shape)) for n, b in layer.named_buffers()] == [("lowrank_idx", torch.int64, (RANK,))]
    assert set(wrapped.state_dict()) == set(dense.state_dict())


def test_no_grad_forward_is_plain_linear():
    """Under no_grad the wrapped layer computes the same output as the dense one."""
    dense, wrapped, layer, _ = make_pair("left", True)
    x, _ = batch("left", (2, 3), 9)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), dense(x), rtol=0, atol=0)


@pytest.mark.parametrize("side", SHAPES)
def test_accumulated_micro_batches_on_refresh_step(side):
    """Two backwards on a refresh step: the carrier is the summed dense gradient projected on the one
    selection the layer ends up holding (no mixing of gradients projected on different columns)."""
    dense, wrapped, layer, _ = make_pair(side, True)
    d = dct_basis(layer.basis_size)
    for seed in (23, 24):
        x, c = batch(side, (2, 3), seed)
        backward(wrapped, x, c)
        backward(dense, x, c)
    torch.testing.assert_close(layer.lowrank_grad.grad,
                               project(dense[0].weight.grad, d[:, layer.lowrank_idx], side == "right"),
                               rtol=1e-12, atol=1e-14)


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(24, 24)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


def test_layer_called_twice_on_refresh_step():
    """A layer applied twice in one forward gets the projection of its total dense gradient on its selection.

    The first of its two backward nodes to run selects the basis; the other projects onto that selection.
    """
    torch.manual_seed(0)
    dense = _Twice().double()
    wrapped = copy.deepcopy(dense)
    lrc.wrap_model(wrapped, rank=RANK, lr=0.0)
    x, c = batch("right", (2, 3), 25)
    backward(wrapped, x[..., :24], c[..., :24])
    backward(dense, x[..., :24], c[..., :24])
    torch.testing.assert_close(wrapped.lin.lowrank_grad.grad,
                               project(dense.lin.weight.grad, dct_basis(24)[:, wrapped.lin.lowrank_idx], True),
                               rtol=1e-12, atol=1e-14)


def test_carrier_costs_no_memory_outside_ddp_and_materialises_on_request():
    """A single process needs no carrier storage (stride 0); DDP / FSDP2 get a real tensor (same Parameter)."""
    dense, wrapped, layer, _ = make_pair("right", True)
    carrier = layer.lowrank_grad
    assert 0 in carrier.stride() and carrier.untyped_storage().nbytes() <= carrier.element_size()
    x, _ = batch("right", (2, 3), 9)
    wrapped(x).sum().backward()
    assert carrier.grad is not None and carrier.grad.is_contiguous() and carrier.grad.shape == carrier.shape
    wrapped.to(torch.float64)  # .to() keeps it free
    assert layer.lowrank_grad is carrier and 0 in carrier.stride() and carrier.dtype == torch.float64
    layer.materialize_carrier()
    assert layer.lowrank_grad is carrier and carrier.is_contiguous() and carrier.untyped_storage().nbytes() == \
        carrier.numel() * carrier.element_size()
    wrapped.to(torch.float32)
    assert carrier.is_contiguous()  # materialised carriers stay real after .to()


def test_score_dtype_float32_is_the_default_on_fp32_and_bf16_scores_keep_the_energy():
    """score_dtype=torch.float32 changes nothing on an fp32 model; bf16 score products pick columns that keep
    nearly all of the fp32 selection's gradient energy (they only rank; the rank-r gradient stays fp32)."""
    from lowrank_compile.basis import basis_matrix
    from lowrank_compile.selection import right_scores, select_top_r

    def run(**kw):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(96, 256), nn.GELU(), nn.Linear(256, 96))
        opt = lrc.wrap_model(model, rank=16, update_gap=1, **kw)
        gen = torch.Generator().manual_seed(3)
        for _ in range(3):
            model(torch.randn(64, 96, generator=gen)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        return model, opt

    default, _ = run()
    fp32, _ = run(score_dtype=torch.float32)
    for a, b in zip(default.state_dict().values(), fp32.state_dict().values()):
        assert torch.equal(a, b)
    bf16, opt = run(score_dtype=torch.bfloat16)
    assert all(torch.isfinite(p).all() for p in bf16.parameters())
    assert all(g.dtype == torch.float32 for g in opt.lowrank_grads()) or not opt.lowrank_grads()
    # energy of a fresh gradient kept by each selection, against the dense reference G
    torch.manual_seed(1)
    x, gy = torch.randn(128, 96), torch.randn(128, 256)
    G = gy.t() @ x  # (256, 96): right-projected, n = 96
    D = basis_matrix("dct", 96, torch.float32, torch.device("cpu"))
    xd = x @ D
    scores32 = right_scores(gy, xd, 1)
    scores16 = right_scores(gy.bfloat16(), xd.bfloat16(), 1)
    idx32, idx16 = select_top_r(scores32, 16), select_top_r(scores16, 16)
    energy = lambda idx: (G @ D[:, idx]).square().sum()  # noqa: E731
    assert energy(idx16) >= 0.98 * energy(idx32)
    with pytest.raises(ValueError, match="score_dtype"):
        lrc.wrap_model(nn.Sequential(nn.Linear(96, 256)), rank=16, score_dtype=torch.int32)


@pytest.mark.parametrize("right", [True, False])
def test_rank_r_grad_by_fft_projection_equals_dense_reference_float64(right):
    """At a size and rank where basis.use_fft_projection takes the FFT (n = 1024, r = 512), the ordinary step's
    rank-r gradient still equals the dense reference (full gradient, then projected) in float64."""
    from lowrank_compile.basis import basis_matrix, use_fft_projection
    from lowrank_compile.projection import rank_r_grad

    n, other, T, r = 1024, 48, 40, 512
    assert use_fft_projection(n, r)
    gen = torch.Generator().manual_seed(1)
    D = basis_matrix("dct", n, torch.float64, torch.device("cpu"))
    idx = torch.randperm(n, generator=gen)[:r]
    x2 = torch.randn(T, n if right else other, dtype=torch.float64, generator=gen)
    g2 = torch.randn(T, other if right else n, dtype=torch.float64, generator=gen)
    got = rank_r_grad(x2, g2, idx.clone(), D, right, "dct", 1, refresh=False)
    G = g2.t() @ x2  # (out, in): the full gradient, only in the test
    D_r = dct_basis(n)[:, idx]
    torch.testing.assert_close(got, G @ D_r if right else D_r.t() @ G, rtol=0, atol=1e-11)


# -- ordinary steps save x D_r instead of x (LowRankLinear.keeps_projected_input) -----------------------------------
def _conv1d(nf, nx):
    from transformers.pytorch_utils import Conv1D

    return Conv1D(nf, nx)


# name: (model maker, rank, wrap_model options, autocast bf16, leading dims)
KEEP_CASES = {
    "dct": (lambda: nn.Linear(24, 40), 4, {}, False, (2, 3)),
    "dct-fft": (lambda: nn.Linear(2048, 2048, bias=False), 480, {}, False, (6,)),  # basis.use_fft_projection
    "random": (lambda: nn.Linear(24, 40), 4, {"basis": "random"}, False, (2, 3)),
    "svd": (lambda: nn.Linear(24, 40), 4, {"basis": "svd", "state_policy": "keep"}, False, (2, 3)),
    "conv1d": (lambda: _conv1d(40, 24), 4, {}, False, (2, 3)),  # stored (in, out): left side projects x
    "autocast-bf16": (lambda: nn.Linear(24, 40), 4, {}, True, (2, 3)),
}


def _run_steps(case, steps, monkeypatch, ratio):
    """Train a one-layer model of `case` for `steps` steps (update_gap 3: steps 1 and 3 refresh) with
    PROJECTED_INPUT_MAX_RATIO = ratio; per step the carrier gradient, the input gradient and the shapes autograd
    saved in forward, then the final state."""
    from lowrank_compile import projection

    make, rank, kw, autocast, lead = KEEP_CASES[case]
    monkeypatch.setattr(projection, "PROJECTED_INPUT_MAX_RATIO", ratio)
    torch.manual_seed(0)
    model = nn.Sequential(make())
    opt = lrc.wrap_model(model, rank=rank, lr=1e-2, update_gap=3, **kw)
    layer = model[0]
    n_in = layer.weight.shape[0] if layer._lowrank_transposed else layer.weight.shape[1]
    gen = torch.Generator().manual_seed(5)
    out = []
    for _ in range(steps):
        x = torch.randn(*lead, n_in, generator=gen).requires_grad_(True)
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t), \
                torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            y = model(x)
        (torch.tanh(y.float()) * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        out.append((layer.lowrank_grad.grad.clone(), x.grad.clone(), shapes))
        opt.step()
        opt.zero_grad()
    return layer, out, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("case", KEEP_CASES)
def test_ordinary_step_saves_x_D_r_and_gradients_are_bit_identical(case, monkeypatch):
    """On ordinary steps a layer whose gradient projects its input saves x D_r (T, r) in forward instead of x; on
    refresh steps it saves x. Every gradient and the trained weights are bit for bit those of saving x (the same
    ops, in the same dtype), for each basis, the FFT projection, a transposed Conv1D weight and bf16 autocast."""
    layer, kept, state = _run_steps(case, 4, monkeypatch, 1 / 3)
    assert layer.keeps_projected_input
    _, plain, plain_state = _run_steps(case, 4, monkeypatch, 0.0)
    r, lead = layer.lowrank_spec.rank, KEEP_CASES[case][4]
    T, n = math.prod(lead), layer.basis_size
    for step, ((g, gx, shapes), (g0, gx0, shapes0)) in enumerate(zip(kept, plain), 1):
        assert torch.equal(g, g0) and torch.equal(gx, gx0), f"step {step}"
        x_shape = (*lead, n)
        assert x_shape in shapes0 and (T, r) not in shapes0
        if step in (1, 3):  # refresh: x itself
            assert shapes == shapes0
        else:
            assert (T, r) in shapes and x_shape not in shapes, (step, shapes)
    assert state.keys() == plain_state.keys() and all(torch.equal(state[k], plain_state[k]) for k in state)


def test_ordinary_step_by_fft_projection_matches_dense_float64():
    """A float64 layer at a size where x D_r goes through the FFT (n = 2048, r = 480), kept from forward: its ordinary
    step's rank-r gradient equals the dense float64 gradient projected onto its selection, and its input gradient
    the dense one. (The reference D is basis.dct_matrix, the closed form test_basis checks against METHOD.md's
    element-by-element definition, which takes too long to build at n = 2048.)"""
    from lowrank_compile.basis import dct_matrix, use_fft_projection

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(2048, 2048)).double()
    wrapped = copy.deepcopy(dense)
    opt = lrc.wrap_model(wrapped, rank=480, lr=0.0, update_gap=5)
    layer = wrapped[0]
    assert use_fft_projection(2048, 480) and layer.keeps_projected_input and layer.lowrank_spec.right
    gen = torch.Generator().manual_seed(2)
    for step in (1, 2):  # a refresh, then the ordinary step checked
        x = torch.randn(3, 5, 2048, dtype=torch.float64, generator=gen)
        c = torch.randn(3, 5, 2048, dtype=torch.float64, generator=gen)
        dense.zero_grad()
        gx_dense, gx = backward(dense, x, c), backward(wrapped, x, c)
        if step == 1:
            opt.step()
            opt.zero_grad()
    torch.testing.assert_close(gx, gx_dense, rtol=1e-12, atol=1e-13)
    want = dense[0].weight.grad @ dct_matrix(2048, torch.float64)[:, layer.lowrank_idx]
    torch.testing.assert_close(layer.lowrank_grad.grad, want, rtol=1e-10, atol=1e-11)


def test_left_and_wide_layers_keep_x():
    """A left-projected layer needs x itself ((gy D_r)^T x), and r > n / 3 keeps x too (siblings sharing x could
    otherwise hold more than x)."""
    _, _, left, _ = make_pair("left", True)
    assert not left.keeps_projected_input
    model = nn.Sequential(nn.Linear(24, 40))
    lrc.wrap_model(model, rank=9)
    assert model[0].lowrank_spec.right and not model[0].keeps_projected_input
    model = nn.Sequential(nn.Linear(24, 40))
    lrc.wrap_model(model, rank=8)
    assert model[0].keeps_projected_input
