"""A plain float64 re-implementation of METHOD.md, written the obvious way, for the tests to compare against.

It runs on an ordinary (unwrapped) model after an ordinary ``loss.backward()``: every Linear weight has its
full gradient G = gy^T x in ``.grad``, and this module projects it explicitly. Nothing here is fast; every
step is the formula in METHOD.md written out, with no blocking, no FFT, no in-place tricks.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn


@functools.lru_cache(maxsize=None)
def dct_basis(n: int) -> Tensor:
    """METHOD.md section 1, element by element: D[j, k] = s_k sqrt(2/n) cos(pi k (2j + 1) / (2n))."""
    d = torch.empty(n, n, dtype=torch.float64)
    for j in range(n):
        for k in range(n):
            s = math.sqrt(0.5) if k == 0 else 1.0
            d[j, k] = s * math.sqrt(2.0 / n) * math.cos(math.pi * k * (2 * j + 1) / (2 * n))
    return d


def column_scores(g: Tensor, d: Tensor, right: bool, p: int) -> Tensor:
    """Scores of every basis column: ||G d_k||_p over rows (right) or ||d_k^T G||_p over columns (left)."""
    if right:
        return torch.linalg.vector_norm(g @ d, ord=p, dim=0)
    return torch.linalg.vector_norm(d.t() @ g, ord=p, dim=1)


def top_r(scores: Tensor, r: int) -> Tensor:
    """Indices of the r largest scores, best first."""
    return torch.argsort(scores, descending=True, stable=True)[:r]


def project(g: Tensor, d_r: Tensor, right: bool) -> Tensor:
    return g @ d_r if right else d_r.t() @ g


def back(u: Tensor, d_r: Tensor, right: bool) -> Tensor:
    return u @ d_r.t() if right else d_r @ u


def match_states(state: Tensor, old_idx: list[int], new_idx: list[int], right: bool) -> Tensor:
    """Policy "match": slot j of the result holds the old state of index new_idx[j] if it was selected, else 0."""
    out = torch.zeros_like(state)
    for j, k in enumerate(new_idx):
        if k in old_idx:
            i = old_idx.index(k)
            if right:
                out[:, j] = state[:, i]
            else:
                out[j, :] = state[i, :]
    return out


class ReferenceDCTAdamW:
    """DCT-AdamW of METHOD.md on a plain model: low-rank Adam for Linear weights whose smaller side > rank.

    decay(p) says whether parameter p gets weight decay. Each parameter keeps its own step count for the
    bias correction; the refresh schedule follows the global step t (t == 1 or t % update_gap == 0). A
    projected weight also selects on its own first step, like the reference code's lazily built projector.
    `basis` maps a basis size n to its (n, n) matrix (default: the DCT of METHOD.md), or is "svd": then each
    refresh keeps the top-r singular vectors of G (right: of its rows, left: of its columns) as D_r.
    """

    def __init__(self, model: nn.Module, rank: int, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, update_gap: int = 1, norm: str = "l1", state_policy: str = "match",
                 scale: float = 1.0, decay=lambda p: True, basis=dct_basis):
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
        self.update_gap, self.p, self.policy, self.scale = update_gap, {"l1": 1, "l2": 2}[norm], state_policy, scale
        self.decay = decay
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.projected = {}  # weight -> (right, r, D)
        for m in model.modules():
            if type(m) is nn.Linear and min(m.weight.shape) > rank:
                out_f, in_f = m.weight.shape
                right = out_f >= in_f
                n = in_f if right else out_f
                self.projected[m.weight] = (right, rank, None if basis == "svd" else basis(n))
        self.t = 0
        self.state: dict[Tensor, dict] = {}

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        refresh = self.t == 1 or self.t % self.update_gap == 0
        b1, b2 = self.betas
        for w in self.params:
            if w.grad is None:
                continue
            g = w.grad.to(torch.float64)
            st = self.state.setdefault(w, {"step": 0})
            if w in self.projected:
                right, r, d = self.projected[w]
                if d is None:  # svd
                    if refresh or "d_r" not in st:
                        u_, _, vh = torch.linalg.svd(g, full_matrices=False)
                        if "d_r" in st:
                            self._follow(st, None, None, right)
                        st["d_r"] = vh[:r].t() if right else u_[:, :r]
                    d_r = st["d_r"]
                else:
                    if refresh or "idx" not in st:
                        new = top_r(column_scores(g, d, right, self.p), r).tolist()
                        if "idx" in st:
                            self._follow(st, st["idx"], new, right)
                        st["idx"] = new
                    d_r = d[:, st["idx"]]
                a = project(g, d_r, right)
            else:
                a = g
            if "m" not in st:
                st["m"] = torch.zeros_like(a)
                st["v"] = torch.zeros_like(a)
            st["step"] += 1
            k = st["step"]
            st["m"] = b1 * st["m"] + (1 - b1) * a
            st["v"] = b2 * st["v"] + (1 - b2) * a * a
            u = (st["m"] / (1 - b1 ** k)) / (torch.sqrt(st["v"] / (1 - b2 ** k)) + self.eps)
            new_w = w.to(torch.float64)
            if self.decay(w):
                new_w = new_w * (1 - self.lr * self.wd)
            if w in self.projected:
                new_w = new_w - self.lr * self.scale * back(u, d_r, right)
            else:
                new_w = new_w - self.lr * u
            w.copy_(new_w)

    def _follow(self, st: dict, old: list[int], new: list[int], right: bool) -> None:
        if self.policy == "reset":
            st["m"].zero_()
            st["v"].zero_()
        elif self.policy == "match":
            st["m"] = match_states(st["m"], old, new, right)
            st["v"] = match_states(st["v"], old, new, right)
        elif self.policy != "keep":
            raise ValueError(self.policy)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
