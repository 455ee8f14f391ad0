"""Choosing the r basis columns a layer keeps: blockwise column scores and a reproducible top-r.

For a layer with gradient G = gy^T x (tokens flattened), right projection scores column k of the basis D
by ||G d_k||_p over rows, left projection by ||d_k^T G||_p over columns (arXiv:2505.17967), where p, the norm
order, is 1 ("l1", the default) or 2 ("l2") and is called ``norm_p`` throughout the package. Both are
computed from the transformed operand (x D or gy D) in blocks of basis columns, so at most one
(out, block) or (block, in) slice of the projected gradient exists at a time — never the full gradient.
select_right / select_left keep the best r columns of the blocks seen so far, so the exact refresh gets its
indices idx and the rank-r gradient on D_r = D[:, idx] without a second product. The pieces (the block rule, the
rows a score is the norm of, the sketches) are public: lowrank_compile.refresh_sync scores with them across
processes.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

__all__ = ["SCORE_BLOCK", "REFRESH_BUDGET", "merge_block_for", "p_norms", "right_scores", "left_scores", "select_top_r", "select_right", "select_left",
           "norm_order", "block_size_for", "right_score_rows", "left_score_rows", "sketch_matrix", "right_sketch",
           "left_sketch", "sketch_norms", "sketched_right_scores", "sketched_left_scores"]

# Basis columns per block of the score computation. 256 was as fast as the unblocked product on a
# 2-core CPU (64 was slower); the block bounds the live slice to (256, out) or (256, in).
SCORE_BLOCK = 256
# The refresh budget: the largest block of the projected gradient a refresh holds at once, as a fraction of the
# layer's full gradient (out x in). Below 1, so "the full weight gradient never exists" holds on refresh steps
# too. Every blockwise scorer caps its blocks with it (block_size_for, merge_block_for). 0.75 keeps the one-pass
# selection at two blocks where r <= n/4 (the r kept rows and a block of 2r); at 0.5 the 78M reference's
# 1024-column layers at r = 256 needed four blocks and their exact refresh took 1.6-1.8x as long (CPU, 2 threads).
REFRESH_BUDGET = 0.75


def norm_order(norm: str) -> int:
    """norm_p, the order p of the p-norm that ranks basis columns, from the norm's name ("l1" or "l2")."""
    if norm == "l1":
        return 1
    if norm == "l2":
        return 2
    raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")


def right_scores(gy: Tensor, xd: Tensor, norm_p: int, block: int = SCORE_BLOCK) -> Tensor:
    """Scores of the n basis columns for right projection: ||gy^T xd[:, k]||_p with p = norm_p, blockwise.

    gy: (T, out) output gradients; xd: (T, n) = x @ D. Returns (n,) in float32 (float64 for float64 input).
    """
    return _block_scores(right_score_rows(gy, xd), xd.shape[1], norm_p, block)


def left_scores(gd: Tensor, x: Tensor, norm_p: int, block: int = SCORE_BLOCK) -> Tensor:
    """Scores of the n basis columns for left projection: ||gd[:, k]^T x||_p with p = norm_p, blockwise.

    gd: (T, n) = gy @ D; x: (T, in) inputs. Returns (n,).
    """
    return _block_scores(left_score_rows(gd, x), gd.shape[1], norm_p, block)


def right_score_rows(gy: Tensor, xd: Tensor) -> Callable[[slice | Tensor], Tensor]:
    """Rows k of (G D)^T for basis indices k (a slice or index tensor): (xd[:, k])^T gy, (b, out).

    A basis column's right score is the p-norm of its row; a function of k, so that callers form one block
    of rows at a time (the scorers here, and lowrank_compile.refresh_sync, which sums each block over
    processes before taking its norms).
    """
    return lambda k: xd[:, k].t() @ gy


def left_score_rows(gd: Tensor, x: Tensor) -> Callable[[slice | Tensor], Tensor]:
    """Rows k of D^T G for basis indices k: (gd[:, k])^T x, (b, in). A column's left score is its row's p-norm."""
    return lambda k: gd[:, k].t() @ x


def _block_scores(rows_of, n: int, norm_p: int, block: int) -> Tensor:
    """p-norms of the n rows of rows_of(...), formed `block` rows at a time (never the whole gradient)."""
    block = block_size_for(n, block)
    return torch.cat([p_norms(rows_of(slice(start, start + block)), norm_p, dim=1) for start in range(0, n, block)])


def p_norms(s: Tensor, norm_p: int, dim: int) -> Tensor:
    """p-norms (p = norm_p, 1 or 2) of s along dim, accumulated in fp32 (fp64 for fp64 s).

    Written as abs/square then sum: torch.linalg.vector_norm along the strided dim 0 of a row-major matrix was
    6x slower than this on a 2-core CPU (13 ms against 2 ms for a (2736, 1024) block, torch 2.13).
    """
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    if norm_p == 1:
        return s.abs().sum(dim, dtype=acc)
    return s.square().sum(dim, dtype=acc).sqrt()


def block_size_for(n: int, block: int) -> int:
    """Basis columns per scored block out of n: at most `block`, and at most REFRESH_BUDGET of n (rounded up).

    So no block is the whole gradient; every blockwise scorer, the cross-process one included, uses this rule.
    """
    return max(1, min(block, math.ceil(n * REFRESH_BUDGET)))


def merge_block_for(n: int, r: int, block: int, device: torch.device) -> int:
    """Basis columns per block of the one-pass exact selection, so that the r kept rows and one block stay within
    the refresh budget. On a GPU the whole budget (the fewest, largest
    GEMMs: its refresh is launch-bound); on a CPU max(block, 2r), where larger blocks measured no faster
    (tools/fft_projection.py's machine: 4096 x 4096 at r = 512, blocks of 1024 and 2048 within noise) and each
    merge keeps r of r + block rows (2r was fastest)."""
    within_budget = max(1, math.ceil(n * REFRESH_BUDGET) - r)  # a merge holds the kept r rows and one block
    return min(n if device.type == "cuda" else max(block, 2 * r), within_budget)


def select_right(gy: Tensor, xd: Tensor, norm_p: int, r: int, block: int = SCORE_BLOCK) -> tuple[Tensor, Tensor]:
    """Exact right selection and its rank-r gradient in one blockwise pass: (idx (r,), gy^T xd[:, idx] (out, r)).

    The same columns as select_top_r(right_scores(gy, xd, norm_p), r), without computing the selected ones twice:
    each block of G D is scored and merged into the best r columns kept so far, so at most the kept r and
    one block of columns exist at a time. Blocks are formed transposed, (b, out), so merges gather rows.
    """
    idx, kept = _select_streaming(right_score_rows(gy, xd), xd.shape[1], norm_p, r, block, xd.device)
    return idx, kept.t().contiguous()


def select_left(gd: Tensor, x: Tensor, norm_p: int, r: int, block: int = SCORE_BLOCK) -> tuple[Tensor, Tensor]:
    """Exact left selection and its rank-r gradient in one blockwise pass: (idx (r,), gd[:, idx]^T x (r, in))."""
    return _select_streaming(left_score_rows(gd, x), gd.shape[1], norm_p, r, block, gd.device)


def _select_streaming(rows_of, n: int, norm_p: int, r: int, block: int, device: torch.device
                      ) -> tuple[Tensor, Tensor]:
    """Blockwise top-r of the rows of rows_of(slice) (one row per basis index) by their p-norms.

    For distinct scores the result equals select_top_r on all n scores: the top r of a union is the top r of
    the top r of its parts. Ties at the r-th score may keep a different one of the tied rows.
    """
    merge_block = merge_block_for(n, r, block, device)
    if r + merge_block >= n or merge_block < r:  # merges would not fit the budget (or hold the whole gradient):
        # score in blocks, then form the r rows
        idx = select_top_r(_block_scores(rows_of, n, norm_p, block), r)
        return idx, rows_of(idx)
    block = merge_block
    kept = kept_scores = kept_idx = None
    for start in range(0, n, block):
        part = rows_of(slice(start, start + block))  # (b, other side)
        scores = p_norms(part, norm_p, dim=1)
        idx = torch.arange(start, start + scores.shape[0], device=scores.device)
        if kept is not None:
            part = torch.cat([kept, part])
            scores = torch.cat([kept_scores, scores])
            idx = torch.cat([kept_idx, idx])
        if scores.shape[0] > r:
            best = torch.topk(scores, r, largest=True, sorted=False).indices
            part, scores, idx = part.index_select(0, best), scores[best], idx[best]
        kept, kept_scores, kept_idx = part, scores, idx
    order = torch.sort(kept_scores, descending=True, stable=True).indices
    return kept_idx[order], kept.index_select(0, order)


def select_top_r(scores: Tensor, r: int) -> Tensor:
    """Indices of the r largest scores, in descending order of score (int64).

    The order is fixed (sorted) so that slot k of a "keep" state always holds the k-th best column.
    """
    return torch.topk(scores, r, largest=True, sorted=True).indices


def sketch_matrix(k: int, m: int, norm_p: int, seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """A (k, m) random sketch for estimating p-norms: Cauchy entries for norm_p=1, standard Gaussian for norm_p=2.

    Drawn on CPU from a generator seeded by `seed` alone, so every process draws the same matrix.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if norm_p == 1:
        u = torch.rand(k, m, generator=gen, dtype=torch.float64)
        omega = torch.tan(torch.pi * (u - 0.5))  # standard Cauchy: 1-stable
    else:
        omega = torch.randn(k, m, generator=gen, dtype=torch.float64)
    return omega.to(dtype)


def right_sketch(gy: Tensor, xd: Tensor, omega: Tensor) -> Tensor:
    """The k-row sketch of the right similarity G D: (gy Ω^T)^T (x D), (k, n); its column j estimates column j.

    gy: (T, out); xd: (T, n); omega: (k, out). Costs T k (out + n) instead of T out n. Linear in G, so the sum
    of the processes' sketches is the sketch of the global gradient.
    """
    gs = gy @ omega.to(gy.dtype).t()  # (T, k)
    return gs.t() @ xd  # (k, n)


def left_sketch(gd: Tensor, x: Tensor, omega: Tensor) -> Tensor:
    """The k-column sketch of the left similarity D^T G: (gy D)^T (x Ω^T), (n, k); its row j estimates row j.

    gd: (T, n); x: (T, in); omega: (k, in).
    """
    xs = x @ omega.to(x.dtype).t()  # (T, k)
    return gd.t() @ xs  # (n, k)


def sketch_norms(s: Tensor, norm_p: int, dim: int) -> Tensor:
    """Estimate p-norms from k sketched projections along `dim` (dim 0 of a right sketch, dim 1 of a left one).

    norm_p=1: each entry is Cauchy with scale ||.||_1, and the median of |standard Cauchy| is 1 (Indyk, 2006).
    norm_p=2: each entry is Gaussian with variance ||.||_2^2.
    """
    s = s.float() if s.dtype != torch.float64 else s
    if norm_p == 1:
        return s.abs().median(dim=dim).values
    return s.square().mean(dim=dim).sqrt()


def sketched_right_scores(gy: Tensor, xd: Tensor, omega: Tensor, norm_p: int) -> Tensor:
    """Estimated right-projection scores from a k-row sketch of the output gradient: (gy Ω^T)^T (x D).

    gy: (T, out); xd: (T, n); omega: (k, out). Costs T k (out + n) instead of T out n.
    """
    return sketch_norms(right_sketch(gy, xd, omega), norm_p, dim=0)  # (k, n) -> (n,)


def sketched_left_scores(gd: Tensor, x: Tensor, omega: Tensor, norm_p: int) -> Tensor:
    """Estimated left-projection scores from a k-column sketch of the input: (gy D)^T (x Ω^T).

    gd: (T, n); x: (T, in); omega: (k, in).
    """
    return sketch_norms(left_sketch(gd, x, omega), norm_p, dim=1)  # (n, k) -> (n,)
