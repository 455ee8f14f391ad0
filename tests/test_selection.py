"""Blockwise column scores and the top-r choice, against the full projected gradient formed directly."""
from __future__ import annotations

import pytest
import torch

from lowrank_compile import selection as S
from reference import column_scores, dct_basis, top_r

pytestmark = pytest.mark.usefixtures("one_thread")

T, OUT, IN = 6, 11, 17


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, IN, generator=g, dtype=torch.float64),  # x
            torch.randn(T, OUT, generator=g, dtype=torch.float64))  # gy


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("block", [1, 5, 17, S.SCORE_BLOCK])
def test_right_scores_equal_column_norms_of_GD(p, block):
    """right_scores(gy, x D) = ||G d_k||_p over rows for every k, whatever the block size (last block partial)."""
    x, gy = data()
    d = dct_basis(IN)
    got = S.right_scores(gy, x @ d, p, block=block)
    assert got.shape == (IN,) and got.dtype == torch.float64
    torch.testing.assert_close(got, column_scores(gy.t() @ x, d, right=True, p=p), rtol=1e-12, atol=0)


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("block", [1, 4, 11, S.SCORE_BLOCK])
def test_left_scores_equal_row_norms_of_DtG(p, block):
    """left_scores(gy D, x) = ||d_k^T G||_p over columns for every k, whatever the block size."""
    x, gy = data(1)
    d = dct_basis(OUT)
    got = S.left_scores(gy @ d, x, p, block=block)
    assert got.shape == (OUT,) and got.dtype == torch.float64
    torch.testing.assert_close(got, column_scores(gy.t() @ x, d, right=False, p=p), rtol=1e-12, atol=0)


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("r,block", [(1, 1), (3, 1), (3, 5), (5, 2), (8, 256), (9, 3), (16, 4), (17, 4)])
def test_streaming_selection_equals_scores_then_top_r(p, r, block):
    """select_right / select_left pick exactly select_top_r of all scores, best first, and return the rank-r
    gradient of those columns, equal to projecting the full gradient formed directly (float64). Large r
    (r + block >= n) takes the two-pass path, so no merge ever holds the whole gradient."""
    x, gy = data(3)
    d_in, d_out = dct_basis(IN), dct_basis(OUT)
    g = gy.t() @ x  # (OUT, IN): the full gradient, formed only here
    idx, g_low = S.select_right(gy, x @ d_in, p, r, block=block)
    assert torch.equal(idx, top_r(column_scores(g, d_in, right=True, p=p), r))
    torch.testing.assert_close(g_low, g @ d_in[:, idx], rtol=1e-12, atol=1e-12)
    r = min(r, OUT)
    idx, g_low = S.select_left(gy @ d_out, x, p, r, block=block)
    assert torch.equal(idx, top_r(column_scores(g, d_out, right=False, p=p), r))
    torch.testing.assert_close(g_low, d_out[:, idx].t() @ g, rtol=1e-12, atol=1e-12)


def test_scores_of_float32_inputs_are_float32():
    """Low-precision inputs give float32 scores close to the float64 ones."""
    x, gy = data(2)
    d = dct_basis(IN)
    got = S.right_scores(gy.bfloat16(), (x @ d).bfloat16(), 1, block=4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), column_scores(gy.t() @ x, d, True, 1), rtol=5e-2, atol=0)


def test_l1_and_l2_rank_differently():
    """The norm matters: on a gradient built to disagree, L1 and L2 pick different top columns."""
    # column 0 of G D: one large entry (L2 wins); column 1: many medium entries (L1 wins)
    s = torch.zeros(9, 2, dtype=torch.float64)
    s[0, 0] = 5.0
    s[:, 1] = 1.2
    d = torch.eye(2, dtype=torch.float64)
    x = d  # x D = I: two tokens, one per basis column
    gy = s.t()  # (T=2, out=9): G = gy^T x = s
    assert S.select_top_r(S.right_scores(gy, x @ d, 1), 1).item() == 1
    assert S.select_top_r(S.right_scores(gy, x @ d, 2), 1).item() == 0


@pytest.mark.parametrize("r", [1, 3, 8, 20])
def test_select_top_r_is_sorted_descending(r):
    """select_top_r returns the r best indices as int64, best first, equal to a stable descending argsort."""
    scores = torch.rand(20, dtype=torch.float64, generator=torch.Generator().manual_seed(r))
    idx = S.select_top_r(scores, r)
    assert idx.dtype == torch.int64 and idx.shape == (r,)
    assert torch.equal(idx, top_r(scores, r))
    assert bool((scores[idx][:-1] >= scores[idx][1:]).all())
    rest = scores[torch.ones(20, dtype=torch.bool).index_fill_(0, idx, False)]
    assert rest.numel() == 20 - r and bool((rest < scores[idx].min()).all())


def test_norm_order():
    """'l1' -> 1, 'l2' -> 2, anything else is an error."""
    assert S.norm_order("l1") == 1 and S.norm_order("l2") == 2
    with pytest.raises(ValueError):
        S.norm_order("linf")


@pytest.mark.parametrize("r", [1, 8, 20, 31])
def test_streaming_selection_never_holds_the_whole_gradient(r):
    """Whatever r, no tensor made by select_right / select_left is as large as the full (out, n) gradient."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.numel = max(self.numel, t.numel())
            return out

    g = torch.Generator().manual_seed(r)
    n, m, tokens = 32, 40, 16
    xd, gy = torch.randn(tokens, n, generator=g), torch.randn(tokens, m, generator=g)
    for fn, a, b in ((S.select_right, gy, xd), (S.select_left, xd, gy)):
        with Largest() as mode:
            fn(a, b, 1, r, block=4)
        assert mode.numel < m * n, (fn.__name__, mode.numel)
