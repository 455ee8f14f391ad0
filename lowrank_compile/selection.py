"""Choosing the r basis columns a layer keeps: blockwise column scores and a reproducible top-r.

For a layer with gradient G = gy^T x (tokens flattened), right projection scores column k of the basis
by ||G d_k||_p over rows, left projection by ||d_k^T G||_p over columns (arXiv:2505.17967). Both are
computed from the transformed operand (x D or gy D) in blocks of basis columns, so at most one
(out, block) or (block, in) slice of the projected gradient exists at a time — never the full gradient.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SCORE_BLOCK", "right_scores", "left_scores", "select_top_r", "norm_order"]

# Basis columns per block of the score computation. 256 was as fast as the unblocked product on a
# 2-core CPU (64 was slower); the block bounds the live slice to (out, 256) or (256, in).
SCORE_BLOCK = 256


def norm_order(norm: str) -> int:
    if norm == "l1":
        return 1
    if norm == "l2":
        return 2
    raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")


def right_scores(gy: Tensor, xd: Tensor, p: int, block: int = SCORE_BLOCK) -> Tensor:
    """Scores of the n basis columns for right projection: ||gy^T xd[:, k]||_p, blockwise.

    gy: (T, out) output gradients; xd: (T, n) = x @ D. Returns (n,) in float32 (float64 for float64 input).
    """
    n = xd.shape[1]
    parts = []
    for start in range(0, n, block):
        s = gy.t() @ xd[:, start:start + block]  # (out, T) @ (T, b) -> (out, b): G D for b columns
        parts.append(torch.linalg.vector_norm(s.float() if s.dtype != torch.float64 else s, ord=p, dim=0))
    return torch.cat(parts)


def left_scores(gd: Tensor, x: Tensor, p: int, block: int = SCORE_BLOCK) -> Tensor:
    """Scores of the n basis columns for left projection: ||gd[:, k]^T x||_p, blockwise.

    gd: (T, n) = gy @ D; x: (T, in) inputs. Returns (n,).
    """
    n = gd.shape[1]
    parts = []
    for start in range(0, n, block):
        s = gd[:, start:start + block].t() @ x  # (b, T) @ (T, in) -> (b, in): D^T G for b rows
        parts.append(torch.linalg.vector_norm(s.float() if s.dtype != torch.float64 else s, ord=p, dim=1))
    return torch.cat(parts)


def select_top_r(scores: Tensor, r: int) -> Tensor:
    """Indices of the r largest scores, in descending order of score (int64).

    The order is fixed (sorted) so that slot k of a "keep" state always holds the k-th best column.
    """
    return torch.topk(scores, r, largest=True, sorted=True).indices
