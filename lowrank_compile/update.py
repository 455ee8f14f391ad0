"""The AdamW updates as pure functions over lists of same-shape tensors, compiled once per shape group.

The optimizer gathers the layers of one shape (and kind) into lists and calls one of these functions;
torch.compile turns each call signature into one graph with every element-wise op fused, so a 24-block
model runs a handful of graphs per step instead of hundreds of small kernels. lr and the step counts
are tensors on the parameters' device, so schedules and the passing of steps never recompile, and nothing
on the step path reads a tensor value on the host (no synchronisation: CUDA-graph ready), eager or compiled.
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import torch
from torch import Tensor

from . import int8_weights, quant

logger = logging.getLogger(__name__)

__all__ = ["match_slots", "matched", "moments_direction", "adam_ratio_bound", "row_chunks", "write_back_",
           "back_project_", "lowrank_adamw_", "adamw_", "adamw_chunked_", "remap_states", "clip_tensor_norm_",
           "UPDATE_CHUNK_ELEMS", "chunk_offset", "SkipCounter", "guard_list"]


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
                      match: tuple[Tensor, Tensor, int] | None = None,
                      guard: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """Update the moments m, v in place (after step has been advanced); return Adam's bias-corrected direction.

    Computed in fp32 (fp64 for fp64 states) whatever the states' storage: bf16 and torchao-quantised states are
    read into fp32 and written back. Written as the reference does, m / (sqrt(v) + eps sqrt(bc2)) scaled by
    sqrt(bc2) / bc1, which is algebraically (m / bc1) / (sqrt(v / bc2) + eps).
    match: (src, kept, dim) from match_slots, to move the states to a refreshed selection first, in the same
    pass: quantised states are then decoded and encoded once per step, not twice.
    guard: None, or (ok, beta1 where ok else 1, beta2 where ok else 1) from guard_list: where ok is False, m and v
    keep their values and the direction is 0, decided on the device without a host synchronisation; where True,
    the result is bit for bit the unguarded one.
    """
    cdt = torch.float64 if m.dtype == torch.float64 else torch.float32
    g = g.to(cdt)
    mf = quant.dequantize(m, cdt)
    vf = quant.dequantize(v, cdt)
    if match is not None:
        mf, vf = matched(mf, *match), matched(vf, *match)
    if guard is not None:  # not finite: decay factors 1 and a zero gradient keep m and v as they are
        ok, beta1_, beta2_ = guard
        g = torch.where(ok, g, 0.0)
    else:
        beta1_, beta2_ = beta1, beta2
    mf.mul_(beta1_).add_(g, alpha=1 - beta1)
    vf.mul_(beta2_).addcmul_(g, g, value=1 - beta2)
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
    if guard is not None:
        u.mul_(guard[0])  # 0 where skipped (u is finite there: it comes from the kept moments)
    return u


def guard_list(grads: list[Tensor], skips: Tensor | None, beta1: float, beta2: float, like: Tensor) -> list:
    """Non-finite guards for a list of gradients, in a few batched ops with no host read: per gradient
    (ok, beta1 where ok else 1, beta2 where ok else 1), ok a 0-d bool tensor, the factors in the compute dtype of
    states like `like` (see moments_direction); each non-finite gradient is counted into `skips` (a 0-d int64
    tensor). All None when skips is None (no guard). Non-finite is judged by the max-norm: inf or NaN exactly when
    an element is."""
    if skips is None:
        return [None] * len(grads)
    # few launches (one projected layer per call when fused): one norm kernel, one count, one select of the factors
    if any(g.numel() == 0 for g in grads):  # an empty shard (FSDP2 with more processes than rows): finite
        norms = torch.stack([torch.linalg.vector_norm(g.float(), float("inf")) if g.numel() else
                             torch.zeros((), device=g.device) for g in grads])
    elif len(grads) == 1:
        norms = torch.linalg.vector_norm(grads[0], float("inf")).unsqueeze(0)
    else:
        norms = torch.stack(torch._foreach_norm(grads, float("inf")))
    oks = torch.isfinite(norms)
    bad = ~oks
    skips.add_((bad.sum() if len(grads) > 1 else bad[0]).to(skips.device))
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    betas = torch.full((2,), beta2, dtype=dtype, device=oks.device)  # filled on the device: torch.tensor([...])
    betas[0].fill_(beta1)  # would copy from the host, which synchronises (measured on CUDA)
    factors = torch.where(oks.unsqueeze(1), betas, 1.0)
    return list(zip(oks.unbind(), factors[:, 0].unbind(), factors[:, 1].unbind()))


class SkipCounter:
    """Counts the parameter updates skipped for a non-finite gradient: one 0-d int64 tensor per device, added to
    on the device (guard_list), read on the host only when asked (total), with a warning when it has grown."""

    def __init__(self):
        self._counts: dict[torch.device, Tensor] = {}
        self._reported = 0

    def on(self, device: torch.device) -> Tensor:
        counter = self._counts.get(device)
        if counter is None:
            counter = self._counts[device] = torch.zeros((), dtype=torch.int64, device=device)
        return counter

    def total(self) -> Tensor:
        total = sum((t.to("cpu") for t in self._counts.values()), torch.zeros((), dtype=torch.int64))
        if int(total) > self._reported:
            logger.warning("lowrank_compile: %d parameter update(s) skipped for a non-finite gradient (%d in all); "
                           "their weights and states were kept", int(total) - self._reported, int(total))
            self._reported = int(total)
        return total


def guarded_decay(decay, guard: tuple | None, dtype: torch.dtype, device):
    """The weight-decay factor, 1 where the update is skipped (guard_list's ok False); a 0-d tensor then, else as
    given."""
    if guard is None or decay is None:
        return decay
    ok = guard[0]
    if isinstance(decay, Tensor):  # lr as a tensor (compiled updates): never read its value on the host
        return torch.where(ok, decay.to(device=device, dtype=dtype), 1.0)
    return torch.where(ok, torch.full((), decay, dtype=dtype, device=device), 1.0)


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


# Rows of a low-precision weight updated per chunk: bounds the fp32 temporaries of a write-back.
UPDATE_CHUNK_ELEMS = 1 << 22


def row_chunks(tensors: tuple[Tensor, ...], max_elems: int, block: int = 1):
    """(start, slices): slices of `tensors` with the same rows along dim 0, each about max_elems elements of the
    first and holding whole blocks of `block` elements (torchao's states slice only on their block boundaries);
    start is the first row of the chunk."""
    first = tensors[0]
    if first.ndim == 0 or first.numel() <= max_elems:
        yield 0, tensors
        return
    row = first.numel() // first.shape[0]
    align = block // math.gcd(row, block)  # rows per chunk: a multiple of this keeps chunks block-aligned
    rows = max(align, (max_elems // row) // align * align)
    for start in range(0, first.shape[0], rows):
        yield start, tuple(t[start:start + rows] for t in tensors)


def chunk_offset(offset: int, like: Tensor) -> Tensor:
    """A row chunk's flat offset as a 0-d int64 tensor on `like`'s device (a fill, no host-to-device copy), as every
    write-back passes it: the compiled rounding kernels an eager update calls would compile one graph per chunk
    for a Python int. The bits are those of the int offset."""
    return torch.full((), offset, dtype=torch.int64, device=like.device)


def write_back_(w: Tensor, new: Tensor, rounding: Tensor | None, offset: int, rounder: Callable | None = None) -> None:
    """w <- new (fp32), rounded once into w's dtype; bf16 stochastically when `rounding` (a counter key, see
    quant.round_to_bf16) is given, to nearest otherwise. offset: the flat index of new[0]. rounder: the function
    that rounds (default quant.round_to_bf16; the optimizer passes a compiled one to eager updates)."""
    if w.dtype == torch.bfloat16 and rounding is not None:
        w.copy_((rounder or quant.round_to_bf16)(new, rounding, chunk_offset(offset, w)))
    else:
        w.copy_(new.to(w.dtype))


def _rounding(base: Tensor | None, step: Tensor) -> Tensor | None:
    """This step's counter key from a parameter's counter base (quant.counter_base), or None (to nearest):
    tensor ops, so the step is never read on the host."""
    return None if base is None else quant.counter_key(base, step)


def back_project_(w: Tensor, u: Tensor, D_r: Tensor, right: bool, decay=None, rounding=None,
                  max_elems: int | None = None, product_dtype: torch.dtype | None = None,
                  scale: Tensor | None = None, rounder: Callable | None = None,
                  writer: Callable | None = None) -> None:
    """W <- decay W + back(u), back(u) = u D_r^T (right) or D_r u (left): decay and back-projection, in one place.

    u is the step already scaled (-lr scale times Adam's direction). decay: None (no decay) or the factor
    1 - lr wd, a number or 0-d tensor. fp32/fp64 W is updated in place with one GEMM and no full-size
    temporary. A low-precision W is computed in fp32 row chunks of at most max_elems elements (default
    UPDATE_CHUNK_ELEMS) and rounded once per element (see write_back_). product_dtype: the dtype of the back-projection GEMM of a low-precision W (default
    fp32; bf16 runs it on tensor cores, used inside compiled graphs, where its result feeds the fused update).
    scale: an int8 weight's block scales (w then holds its codes): each fp32 row chunk is written back by
    int8_weights.write_rows_ (stochastically rounded when `rounding` is a counter key, re-scaling only blocks
    whose range changed enough). rounder: see write_back_. writer: the function that writes an int8 chunk (default
    int8_weights.write_rows_; the optimizer passes a compiled one to eager updates).
    """
    if scale is not None:
        u, D_r = u.float(), D_r.float()
        row = w.shape[1]
        for start, (w_rows, s_rows, factor) in row_chunks((w, scale, u if right else D_r),
                                                          max_elems or UPDATE_CHUNK_ELEMS):
            delta = factor @ D_r.t() if right else factor @ u  # (rows, r) @ (r, in): this chunk's update
            (writer or int8_weights.write_rows_)(w_rows, s_rows, delta, decay, rounding, chunk_offset(start * row, w))
        return
    if w.dtype in (torch.float32, torch.float64):
        if decay is not None:
            w.mul_(decay)
        u, D_r = u.to(w.dtype), D_r.to(w.dtype)
        if right:
            w.addmm_(u, D_r.t())  # (out, r) @ (r, in)
        else:
            w.addmm_(D_r, u)  # (out, r) @ (r, in)
        return
    pdt = product_dtype or torch.float32
    u, D_r = u.to(pdt), D_r.to(pdt)
    row = w.shape[1]
    for start, (w_rows, factor) in row_chunks((w, u if right else D_r), max_elems or UPDATE_CHUNK_ELEMS):
        delta = factor @ D_r.t() if right else factor @ u
        new = w_rows.float()
        if decay is not None:
            new = new.mul_(decay)  # decay in fp32: rounded alone, it is lost
        write_back_(w_rows, new.add_(delta.float()), rounding, start * row, rounder)


def lowrank_adamw_(weights: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                   D_rs: list[Tensor], steps: list[Tensor], lr: Tensor, weight_decay: float, beta1: float,
                   beta2: float, eps: float, scale: float, right: bool, rounding: list | None = None,
                   match: list[tuple | None] | None = None, product_dtype: torch.dtype | None = None,
                   direction: Callable = None, skips: Tensor | None = None,
                   scales: list[Tensor] | None = None, rounder: Callable | None = None,
                   writer: Callable | None = None) -> None:
    """Low-rank AdamW, in place: W (1 - lr wd) - lr scale back(u), for lists of same-shape projected layers.

    grads/exp_avgs/exp_avg_sqs: rank-r (out, r) if right else (r, in); D_rs: each layer's D_r, (n, r) in fp32 (fp64 for fp64
    weights); steps: 0-d tensors; lr: a 0-d tensor (a float also works). Works for any weight dtype and state storage
    (see back_project_ and moments_direction). rounding: per weight, None (to nearest) or a quant.counter_base tensor.
    match: per weight, None or (src, kept, dim) to move its states to a refreshed selection first.
    product_dtype: see back_project_. direction: the moments function (default moments_direction; the optimizer
    passes a compiled one for quantised states when the rest runs eagerly). skips: None, or a 0-d int64 counter:
    a layer whose gradient is not finite then keeps its weight and states (its step count still advances) and
    is counted there. scales: per weight, None or an int8 weight's block scales (its codes are in weights; see
    back_project_); rounding is then a quant.counter_base tensor or None (to nearest). rounder, writer: see
    write_back_ and back_project_.
    """
    direction = direction or moments_direction
    guards = guard_list(grads, skips, beta1, beta2, exp_avgs[0])
    for i, (w, g, m, v, D_r, step) in enumerate(zip(weights, grads, exp_avgs, exp_avg_sqs, D_rs, steps)):
        step.add_(1)
        u = direction(g, m, v, step, beta1, beta2, eps, None if match is None else match[i], guards[i])
        decay = None if weight_decay == 0 else 1 - lr * weight_decay
        decay = guarded_decay(decay, guards[i], w.dtype if w.dtype == torch.float64 else torch.float32, w.device)
        back_project_(w, u.mul_(-lr * scale), D_r, right, decay, None if rounding is None else _rounding(rounding[i], step),
                      product_dtype=product_dtype, scale=None if scales is None else scales[i], rounder=rounder,
                      writer=writer)


def adamw_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
           steps: list[Tensor], lr: Tensor, weight_decay: float, beta1: float, beta2: float, eps: float,
           rounding: list | None = None, skips: Tensor | None = None) -> None:
    """Plain AdamW, in place. fp32/fp64 parameters directly; low-precision ones in fp32, rounded once (rounding,
    skips: as in lowrank_adamw_)."""
    guards = guard_list(grads, skips, beta1, beta2, exp_avgs[0])
    for i, (p, g, m, v, step) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, steps)):
        step.add_(1)
        u = moments_direction(g, m, v, step, beta1, beta2, eps, None, guards[i])
        wide = p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32
        decay = None if weight_decay == 0 else guarded_decay(1 - lr * weight_decay, guards[i], wide, p.device)
        if p.dtype in (torch.float32, torch.float64):
            if decay is not None:
                p.mul_(decay)
            p.sub_(u.mul_(lr).to(p.dtype))
        else:  # decay and update in fp32, rounded once (stochastically for bf16 when keyed)
            new = p.float() if decay is None else p.float().mul_(decay)
            write_back_(p, new.sub_(u.mul_(lr)), None if rounding is None else _rounding(rounding[i], step), 0)


def adamw_chunked_(p: Tensor, g: Tensor, m: Tensor, v: Tensor, step: Tensor, lr, weight_decay: float, beta1: float,
                   beta2: float, eps: float, rounding=None, fn=None, max_elems: int | None = None,
                   skips: Tensor | None = None, rounder: Callable | None = None) -> None:
    """Plain AdamW on one large parameter (an embedding, an lm_head) in block-aligned row chunks, so its fp32
    temporaries never exist at full size. fn: the per-chunk function (moments_direction, possibly compiled).
    skips, rounder: as in lowrank_adamw_ (the whole gradient is checked before the first chunk). lr: a 0-d tensor or
    a float; it never reaches an op's Python-number argument (alpha=), which would read a tensor on the host."""
    fn = fn or moments_direction
    step.add_(1)
    rounding = _rounding(rounding, step)
    guard = guard_list([g], skips, beta1, beta2, m)[0]  # the whole gradient, before the first chunk
    wide = p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32
    decay = None if weight_decay == 0 else guarded_decay(1 - lr * weight_decay, guard, wide, p.device)
    row = p.numel() // max(1, p.shape[0]) if p.ndim else 1
    chunks = row_chunks((p, g, m, v), max_elems or UPDATE_CHUNK_ELEMS, block=max(quant.BLOCK_SIZE.values()))
    for start, (w, gc, mc, vc) in chunks:
        u = fn(gc, mc, vc, step, beta1, beta2, eps, None, guard)
        if w.dtype in (torch.float32, torch.float64):
            if decay is not None:
                w.mul_(decay)
            w.sub_(u.mul_(lr).to(w.dtype))
        else:
            new = w.float() if decay is None else w.float().mul_(decay)
            write_back_(w, new.sub_(u.mul_(lr)), rounding, start * row, rounder)


def remap_states(states: list[Tensor], old_idx: Tensor, new_idx: Tensor, dim: int) -> None:
    """Policy "match": move each kept index's state slice to its new slot, zero slices of new indices.

    old_idx, new_idx: (r,) int64. dim: the rank dimension of the states (1 right, 0 left). In place.
    """
    src, kept = match_slots(old_idx, new_idx)
    for s in states:
        s.copy_(matched(quant.dequantize(s), src, kept, dim))


def clip_tensor_norm_(grad: Tensor, max_norm: float) -> None:
    """Scale one gradient in place so its 2-norm is at most max_norm (torch's clip_grad_norm_ rule)."""
    norm = torch.linalg.vector_norm(grad.float())
    grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0).to(grad.dtype))
