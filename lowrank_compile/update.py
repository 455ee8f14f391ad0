"""The AdamW updates as pure functions over lists of same-shape tensors, compiled once per shape group.

The optimizer gathers the layers of one shape (and kind) into lists and calls one of these functions;
torch.compile turns each call signature into one graph with every element-wise op fused, so a 24-block
model runs a handful of graphs per step instead of hundreds of small kernels. lr and the step counts
are tensors, so schedules and the passing of steps never recompile.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import quant

__all__ = ["match_slots", "matched", "moments_direction", "lowrank_adamw_", "adamw_", "compiled"]


def match_slots(old_idx: Tensor, new_idx: Tensor) -> tuple[Tensor, Tensor]:
    """Policy "match": for each new slot, the old slot holding the same basis index (src) and whether one does.

    old_idx, new_idx: (r,) int64. (new_idx[:, None] == old_idx[None, :]) is a 0/1 matching, since D is orthonormal.
    """
    same = new_idx[:, None] == old_idx[None, :]
    return same.to(torch.int8).argmax(dim=1), same.any(dim=1)


def matched(s: Tensor, src: Tensor, kept: Tensor, dim: int) -> Tensor:
    """State values s (plain tensor) moved to the new slots along the rank dim: kept slots from src, new ones 0."""
    shape = [1, 1]
    shape[dim] = -1
    return s.index_select(dim, src) * kept.view(shape).to(s.dtype)


def moments_direction(g: Tensor, m: Tensor, v: Tensor, step: Tensor, beta1: float, beta2: float, eps: float,
                      match: tuple[Tensor, Tensor, int] | None = None) -> Tensor:
    """Update the moments m, v in place (after step has been advanced); return Adam's bias-corrected direction.

    Computed in fp32 (fp64 for fp64 states) whatever the states' storage: bf16 and torchao-quantised states are
    read into fp32 and written back. Written as the reference does, m / (sqrt(v) + eps sqrt(bc2)) scaled by
    sqrt(bc2) / bc1, which is algebraically (m / bc1) / (sqrt(v / bc2) + eps).
    match: (src, kept, dim) from match_slots, to move the states to a refreshed selection first, in the same
    pass: quantised states are then decoded and encoded once per step, not twice.
    """
    cdt = torch.float64 if m.dtype == torch.float64 else torch.float32
    g = g.to(cdt)
    mf = quant.dequantize(m, cdt)
    vf = quant.dequantize(v, cdt)
    if match is not None:
        mf, vf = matched(mf, *match), matched(vf, *match)
    mf.mul_(beta1).add_(g, alpha=1 - beta1)
    vf.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if mf is not m:  # low-precision or quantised storage: write back
        m.copy_(mf)
        v.copy_(vf)
    step = step.to(cdt)
    bc1 = 1 - beta1 ** step
    sqrt_bc2 = (1 - beta2 ** step).sqrt()
    # One buffer for the denominator and then the direction: the same operations in the same order as
    # mf / (sqrt(vf) + eps sqrt_bc2) * (sqrt_bc2 / bc1), without three full-size temporaries.
    u = vf.sqrt().add_(eps * sqrt_bc2)
    torch.div(mf, u, out=u)
    u.mul_(sqrt_bc2 / bc1)
    if quant.is_quantized(m):
        bound = adam_ratio_bound(step, beta1, beta2) * 1.05  # slack for the fp32 rounding of the bound itself
        u.clamp_(-bound, bound)
    return u


def adam_ratio_bound(step: Tensor, beta1: float, beta2: float) -> Tensor:
    """An upper bound of |m_hat / sqrt(v_hat)| at step t for any gradients (Cauchy-Schwarz on the two sums).

    Exact Adam never reaches it, whenever its states last started from zero. Quantised states can: m and v
    are rounded independently, and a small v in a block with a large absmax (a slot freshly zeroed by a
    refresh, next to slots with long histories) rounds to 0 while m does not, which would make m / eps a
    step of ~1e5. Clamping to the bound changes nothing that exact arithmetic could produce.
    """
    ratio = beta1 * beta1 / beta2
    s = step if ratio == 1 else (1 - ratio ** step) / (1 - ratio)  # sum of ratio^k, k < t
    return (1 - beta1) / (1 - beta1 ** step) * (s * (1 - beta2 ** step) / (1 - beta2)).sqrt()


def lowrank_adamw_(weights: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                   cols: list[Tensor], steps: list[Tensor], lr: Tensor, weight_decay: float, beta1: float,
                   beta2: float, eps: float, scale: float, right: bool) -> None:
    """Low-rank AdamW on fp32/fp64 weights W, in place: W (1 - lr wd) - lr scale back(u).

    grads/exp_avgs/exp_avg_sqs: rank-r (out, r) if right else (r, in); cols: D_r, (n, r); steps: 0-d tensors.
    """
    for w, g, m, v, d_r, step in zip(weights, grads, exp_avgs, exp_avg_sqs, cols, steps):
        step.add_(1)
        u = moments_direction(g, m, v, step, beta1, beta2, eps).mul_(-lr * scale).to(w.dtype)
        d_r = d_r.to(w.dtype)
        if weight_decay != 0:
            w.mul_(1 - lr * weight_decay)
        if right:
            w.addmm_(u, d_r.t())  # (out, r) @ (r, in)
        else:
            w.addmm_(d_r, u)  # (out, r) @ (r, in)


def adamw_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
           steps: list[Tensor], lr: Tensor, weight_decay: float, beta1: float, beta2: float, eps: float) -> None:
    """Plain AdamW on fp32/fp64 parameters, in place."""
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        step.add_(1)
        u = moments_direction(g, m, v, step, beta1, beta2, eps)
        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay)
        p.sub_(u.mul_(lr).to(p.dtype))


@functools.cache
def compiled(fn):
    """fn compiled with static shapes; one graph per call signature (shape group)."""
    return torch.compile(fn, fullgraph=True, dynamic=False)
