"""The projected backward: a Linear whose backward emits its weight gradient already in rank-r form.

For a weight W (out, in) and tokens flattened to rows, the gradient is G = gy^T x. A wrapped layer never
forms G: its backward returns the exact input gradient gy W and, for the weight, the rank-r gradient
    right (out >= in): G_low = gy^T (x D_r)      (out, r)
    left  (out <  in): G_low = (gy D_r)^T x      (r, in)
where D_r holds the r selected columns of a fixed basis (arXiv:2505.17967). On a refresh step the columns
are re-selected from x and gy blockwise (see selection.py) and the new indices idx are written into the
layer's index buffer (``lowrank_idx``) in place, inside backward. Names follow METHOD.md: D the full (n, n)
basis, idx the r selected indices, D_r = D[:, idx]; norm_p is the order of the norm that ranks the columns.

What forward saves for backward: the weight (for the input gradient) and, for the weight gradient, x on a refresh
step (it scores all n columns of x D) but only x D_r (T, r) on an ordinary step of a layer whose gradient projects x
and whose r is small enough (LowRankLinear.keeps_projected_input, PROJECTED_INPUT_MAX_RATIO): x itself can then be
freed once nothing else holds it. A left-projected layer needs x itself, (gy D_r)^T x.

Autograd will not put an (out, r) gradient into W.grad, so each layer registers a carrier parameter,
``lowrank_grad``, of the rank-r shape: its ``.grad`` receives G_low, so ``clip_grad_norm_(model.parameters())``
clips the rank-r gradients; it is kept out of ``state_dict()``. Its own value is never read, so in a
single process it is a stride-0 view of one zero and costs no memory; DistributedDataParallel and FSDP2
need a real tensor to reduce and shard, so in a multi-process job (and in prepare_ddp / prepare_fsdp) it
is materialised (:meth:`LowRankLinear.materialize_carrier`). W itself is marked requires_grad=False while
wrapped, so W.grad stays None.

A transposed weight (transformers' Conv1D, GPT-2 family: W stored (in, out), y = x W + b) goes through the
same path: its stored gradient is x^T gy, so x and gy swap roles, and "out"/"in" above read as the stored
rows/columns. The sides, carriers, indices and back-projection are all in the stored layout.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import int8_weights
from .basis import basis_matrix, gather_columns, project_rows, transform_rows
from .selection import (left_scores, norm_order, right_scores, select_left, select_right, select_top_r,
                        sketch_matrix, sketched_left_scores, sketched_right_scores)

__all__ = ["LayerSpec", "RefreshControl", "LowRankLinear", "basis_dtype"]

CARRIER = "lowrank_grad"
INDEX = "lowrank_idx"
SVD_BASIS = "lowrank_basis"
# An ordinary step saves x D_r instead of x when r <= this fraction of the basis size n (keeps_projected_input).
# Layers that share one input (q/k/v, gate/up) each save their own x D_r while x is freed only if none keeps it,
# so the saving needs (siblings * r) < n; measured with tools/activation_peak.py (docs/bench/activation_peak/).
PROJECTED_INPUT_MAX_RATIO = 1 / 3
SCALE = "weight_scale"  # an int8 weight's block scales (weight_dtype="int8"; the weight parameter holds the codes)


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """What a wrapped layer projects: rank r, side, basis kind ("dct" | "random" | "svd") and norm."""

    rank: int
    side: str
    basis: str
    norm: str

    @property
    def right(self) -> bool:
        return self.side == "right"

    @property
    def norm_p(self) -> int:
        """The order of the norm that ranks basis columns: 1 for "l1", 2 for "l2"."""
        return norm_order(self.norm)


class RefreshControl:
    """Step counter shared by the wrapped layers of one model and their optimizer.

    Each layer reads its own plain-bool ``_lowrank_refresh`` in forward, so torch.compile keeps exactly two
    graphs (refresh and ordinary) and never recompiles between them. ``advance`` (the optimizer's step)
    sets every layer's flag for the coming step; a layer's flag drops back to False as soon as its refresh
    backward has delivered its gradient, so further micro-batches of the same step (gradient
    accumulation) reuse the basis selected from the first one. A recomputed forward under activation
    checkpointing runs before its layer's backward and so makes the same decision as the original one.
    """

    def __init__(self, update_gap: int, sketch_rows: int = 0, seed: int = 0, stagger: bool = False,
                 score_dtype: torch.dtype | None = None):
        self.update_gap = update_gap
        self.sketch_rows = sketch_rows  # 0: exact scores; k > 0: scores from a k-row random sketch
        self.seed = seed
        self.stagger = stagger  # True: layer i refreshes when (t + i) % update_gap == 0 (and at t == 1)
        self.score_dtype = score_dtype  # dtype of the refresh's score products; None: each layer's compute dtype
        self.step = 0  # completed optimizer steps
        self.layers: list["LowRankLinear"] = []
        self.hooks: list = []  # removable handles of the optimizer's in-backward updates (fused=True)
        # called as listener(layer, carrier) each time backward delivers a layer's rank-r gradient (the optimizer
        # uses it to show the carriers to torch.amp.GradScaler, see LowRankAdamW._expose_carrier)
        self.grad_listeners: list = []
        self.sketches: dict[tuple, Tensor] = {}  # (m, norm_p, device) -> (k, m) sketch, redrawn before each refresh
        # Multi-process training: an object whose right_scores / left_scores / summed_gradient agree on the
        # refresh across processes (lowrank_compile.distributed.RefreshReducer). None: this process's own.
        self.score_reducer = None

    def is_refresh_step(self, t: int, layer_index: int = 0) -> bool:
        """Whether step t (counting from 1) refreshes layer number layer_index (in wrap order): at t == 1, then
        when t % update_gap == 0 as the reference does, or with stagger when (t + layer_index) % update_gap == 0,
        so that the layers' refreshes spread over the steps instead of all landing on one."""
        offset = layer_index if self.stagger else 0
        return t == 1 or (t + offset) % self.update_gap == 0

    @property
    def refresh(self) -> bool:
        """Whether the coming step (global_step + 1) refreshes any layer."""
        t = self.step + 1
        return any(self.is_refresh_step(t, i) for i in range(len(self.layers) if self.stagger else 1))

    def set_step(self, step: int) -> None:
        self.step = step
        for i, layer in enumerate(self.layers):
            # a layer whose first gradient comes on an ordinary step selects its basis then, not at the next refresh
            layer._lowrank_refresh = self.is_refresh_step(step + 1, i) or not layer._lowrank_selected
            layer._lowrank_refreshed = False
        if self.refresh:
            for key, omega in self.sketches.items():
                omega.copy_(self._draw_sketch(*key))

    def sketch(self, m: int, norm_p: int, device: torch.device) -> Tensor:
        """The shared (k, m) sketch for the non-basis side m and norm order norm_p, the same on every process for a
        given step."""
        key = (m, norm_p, torch.device(device))
        omega = self.sketches.get(key)
        if omega is None:
            omega = self.sketches[key] = self._draw_sketch(*key)
        return omega

    def _draw_sketch(self, m: int, norm_p: int, device: torch.device) -> Tensor:
        seed = ((self.seed * 1_000_003 + self.step) * 65_537 + m * 3 + norm_p) % (1 << 63)  # any int seed
        return sketch_matrix(self.sketch_rows, m, norm_p, seed).to(device)

    def advance(self) -> None:
        self.set_step(self.step + 1)


def basis_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """Bases (D, and the svd D_r) are kept in fp32 (fp64 for fp64 weights); low-precision weights cast D_r."""
    return torch.float64 if weight_dtype == torch.float64 else torch.float32




def svd_basis(g: Tensor, r: int, right: bool) -> Tensor:
    """Top-r singular vectors of a full gradient g (GaLore): right (in, r) or left (out, r), fp32."""
    u, _, vh = torch.linalg.svd(g.float() if g.dtype != torch.float64 else g, full_matrices=False)
    return vh[:r].t() if right else u[:, :r]


def rank_r_grad(x2: Tensor, g2: Tensor, selection: Tensor, D: Tensor | None, right: bool, kind: str,
                norm_p: int, refresh: bool, omega: Tensor | None = None, reducer=None,
                score_dtype: torch.dtype | None = None) -> Tensor:
    """G_low of one layer from inputs x2 (T, in) and output gradients g2 (T, out), both of dtype cdt.

    In general: the projection of g2^T x2 (a transposed weight passes the two swapped).
    selection is the layer's selection buffer (LowRankLinear.selection()): for a fixed basis ("dct", "random")
    its int64 indices idx (r,) into D, the shared (n, n) basis; for "svd" the (n, r) basis D_r itself, and D is
    None. On a refresh step it is overwritten in place with the new selection. norm_p: the order of the norm
    that ranks the columns (1 or 2, selection.norm_order). omega: a (k, m) sketch of the non-basis side for
    estimated scores, or None for exact ones. reducer: None, or the RefreshControl's score_reducer, through
    which the processes of a data-parallel job agree on the refresh (lowrank_compile.distributed); the
    returned G_low is always this process's own (DDP averages it).
    """
    cdt = g2.dtype
    if kind == "svd":
        D_r = selection  # (n, r): the svd basis is stored whole, not as indices into a fixed D
        if refresh:
            g = g2.t() @ x2  # (out, in): the one mode that forms the full gradient, at refresh only
            new_D_r = svd_basis(g if reducer is None else reducer.summed_gradient(g), D_r.shape[1], right)
            D_r.copy_(new_D_r)
            new_D_r = new_D_r.to(cdt)
            return g @ new_D_r if right else new_D_r.t() @ g
    else:
        idx = selection  # (r,) int64: D_r = D[:, idx]
        if refresh:
            new_idx, g_low = _refresh(x2, g2, idx.shape[0], D, right, kind, norm_p, omega, reducer, score_dtype)
            # A gradient that is not finite, or all zero, ranks nothing: keep the previous selection (decided
            # on the device; the optimizer then skips a non-finite update, and a zero one is zero in any basis).
            size = torch.linalg.vector_norm(g_low, float("inf"))  # one pass: inf/NaN if any is, 0 iff all are
            keep = ~torch.isfinite(size) | (size == 0)
            idx.copy_(torch.where(keep, idx, new_idx))
            return g_low
    if right:  # x D_r, by FFT and a gather where basis.use_fft_projection says it is faster
        return g2.t() @ project_selected(x2, selection, D, kind)  # (out, T) @ (T, r) -> (out, r)
    return project_selected(g2, selection, D, kind).t() @ x2  # (r, T) @ (T, in) -> (r, in)


def project_selected(x2: Tensor, selection: Tensor, D: Tensor | None, kind: str) -> Tensor:
    """x2 D_r (T, r) for the rows x2 (T, n) and a layer's selection (idx into D, or the svd D_r itself): the product
    an ordinary step's rank-r gradient needs, the same ops whether formed in forward or in backward."""
    if kind == "svd":
        return x2 @ selection.to(x2.dtype)  # (T, n) @ (n, r)
    return project_rows(kind, x2, D, selection)  # by FFT and a gather where basis.use_fft_projection says


def _refresh(x2: Tensor, g2: Tensor, r: int, D: Tensor, right: bool, kind: str, norm_p: int, omega: Tensor | None,
             reducer, score_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """A refresh of a fixed-basis layer: the new indices (r,) and the rank-r gradient on them (see rank_r_grad).

    score_dtype: the dtype of the score products (None: the compute dtype). When it differs, the columns are
    ranked from operands cast to it and the rank-r gradient is then formed in the compute dtype.
    """
    cast = score_dtype is not None and score_dtype != g2.dtype
    if right:  # score from (gy, x D); the kept columns are those of x D
        ops = (g2, transform_rows(kind, x2, D))  # (T, out), (T, n)
        one_pass, exact, sketched = select_right, right_scores, sketched_right_scores
        reduced = reducer.right_scores if reducer is not None else None
    else:  # score from (gy D, x); the kept columns are those of gy D
        ops = (transform_rows(kind, g2, D), x2)  # (T, n), (T, in)
        one_pass, exact, sketched = select_left, left_scores, sketched_left_scores
        reduced = reducer.left_scores if reducer is not None else None
    if reducer is None and omega is None and not cast:  # exact, alone: select and project in one pass
        return one_pass(*ops, norm_p, r)
    scored = tuple(t.to(score_dtype) for t in ops) if cast else ops
    if reduced is not None:
        scores = reduced(*scored, norm_p, omega)
    elif omega is not None:
        scores = sketched(*scored, omega, norm_p)
    else:
        scores = exact(*scored, norm_p)
    new_idx = select_top_r(scores, r)
    a, b = ops
    if right:
        return new_idx, a.t() @ b.index_select(1, new_idx)  # (out, T) @ (T, r)
    return new_idx, a.index_select(1, new_idx).t() @ b  # (r, T) @ (T, in)


def swap_keeping_hooks(old: Tensor, new: Tensor) -> None:
    """torch.utils.swap_tensors(old, new) that keeps old's hooks working. The dicts of post-accumulate-grad and
    gradient hooks stay with the Python object, but their registration lives in the tensor it held, so a plain swap
    silently disconnects them (a fused optimizer's in-backward updates, a carrier's note_grad_ready): re-assigning
    each dict registers it on the new tensor."""
    torch.utils.swap_tensors(old, new)
    for attr in ("_post_accumulate_grad_hooks", "_backward_hooks"):
        hooks = getattr(old, attr)
        if hooks:
            setattr(old, attr, hooks)


def carrier_data(shape, dtype: torch.dtype, device, dense: bool) -> Tensor:
    """Zeros of `shape` for a carrier: a real tensor if `dense`, else a stride-0 view of one element (free)."""
    if dense:
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.zeros((), dtype=dtype, device=device).expand(shape)


def dense_linear(x: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool) -> Tensor:
    """y = x W^T + b for a weight stored (out, in); y = x W + b for a transposed one stored (in, out), as Conv1D."""
    if not transposed:
        return F.linear(x, weight, bias)
    x2 = x.reshape(-1, x.shape[-1])  # (T, in)
    y = x2 @ weight if bias is None else torch.addmm(bias, x2, weight)  # (T, in) @ (in, out): Conv1D's own op
    return y.view(*x.shape[:-1], weight.shape[1])


class _ProjectedLinearFn(torch.autograd.Function):
    """y = x W^T + b (x W + b if transposed); backward: exact grad of x and b, rank-r grad of W to the carrier.

    selection: the layer's selection buffer, idx for a fixed basis D or the (n, r) D_r for "svd" (rank_r_grad).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, carrier, selection, D, omega, right: bool, kind: str, norm_p: int,
                refresh: bool, transposed: bool, reducer=None, score_dtype=None, weight_scale=None,
                keep_projected: bool = False):
        # weight_scale: None, or an int8 weight's scales (weight holds its codes): W is dequantised here and again
        # in backward, one layer at a time; only the codes and scales are saved.
        # keep_projected (ordinary steps of a layer whose gradient projects x, see LowRankLinear.keeps_projected_input):
        # save x D_r (T, r) for backward instead of x (T, n): the same product backward would form, formed here.
        w = weight if weight_scale is None else int8_weights.dequantize(weight, weight_scale, carrier.dtype)
        y = dense_linear(x, w, bias, transposed)
        del w  # an int8 weight's dequantised copy: gone before x D_r is formed
        saved = x
        if keep_projected:
            with torch.autocast(x.device.type, enabled=False):  # backward's dtype and ops, so the same bits
                saved = project_selected(x.reshape(-1, x.shape[-1]).to(y.dtype), selection, D, kind)  # (T, r)
        if torch.compiler.is_compiling():
            ctx.save_for_backward(saved, weight, weight_scale, selection, D, omega)
            ctx.selection_version = None
        else:
            # Eager: keep the selection outside saved_tensors and remember its version. A layer called twice in one
            # forward has two backward nodes; on a refresh step the first to run rewrites the selection in place,
            # and the second must then project onto it instead of selecting again (one basis per layer per step).
            ctx.save_for_backward(saved, weight, weight_scale, D, omega)
            ctx.selection, ctx.selection_version = selection, selection._version
        ctx.reducer = reducer
        ctx.score_dtype = score_dtype
        ctx.meta = (right, kind, norm_p, refresh, transposed, carrier.dtype, None if bias is None else bias.dtype,
                    keep_projected, x.dtype)
        return y

    @staticmethod
    def backward(ctx, gy):
        right, kind, norm_p, refresh, transposed, carrier_dtype, bias_dtype, keep_projected, x_dtype = ctx.meta
        if ctx.selection_version is None:
            x, weight, weight_scale, selection, D, omega = ctx.saved_tensors
        else:
            x, weight, weight_scale, D, omega = ctx.saved_tensors
            selection = ctx.selection
            refresh = refresh and selection._version == ctx.selection_version
        cdt = gy.dtype
        g2 = gy.reshape(-1, gy.shape[-1])  # (T, out)
        grad_x = grad_bias = grad_low = None
        if ctx.needs_input_grad[0]:
            if weight_scale is None:
                w = weight.to(cdt)
                grad_x = gy @ (w.t() if transposed else w)
            else:  # from the codes, never forward's dequantised W (see int8_weights.dequantize_t)
                w_t = int8_weights.dequantize_t(weight, weight_scale, cdt)
                grad_x = gy @ (w_t if transposed else w_t.t())
            grad_x = grad_x.to(x_dtype)
        if bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = g2.sum(0).to(bias_dtype)
        if ctx.needs_input_grad[3]:
            if keep_projected:  # x holds x D_r (T, r): rank_r_grad's ordinary-step product, formed in forward
                grad_low = (x.t() @ g2 if transposed else g2.t() @ x).to(carrier_dtype)  # (r, out) or (out, r)
            else:
                x2 = x.reshape(-1, x.shape[-1]).to(cdt)  # (T, in)
                # the stored weight's gradient is row_factor^T col_factor: gy^T x, or x^T gy for a transposed weight
                row_factor, col_factor = (x2, g2) if transposed else (g2, x2)
                grad_low = rank_r_grad(col_factor, row_factor, selection, D, right, kind, norm_p, refresh, omega,
                                       ctx.reducer, ctx.score_dtype).to(carrier_dtype)
        return (grad_x, None, grad_bias, grad_low, None, None, None, None, None, None, None, None, None, None, None,
                None)


class LowRankLinear(nn.Linear):
    """An nn.Linear whose weight gradient is projected to rank r in backward. Made by wrap_model.

    Wrapping swaps the class of an existing nn.Linear in place, so the weight and bias keep their storage,
    their names in state_dict() and every hook the user registered. ``unwrap`` reverses it.
    """

    lowrank_spec: LayerSpec
    _lowrank_dense_class: type = nn.Linear  # the class unwrap restores
    _lowrank_transposed: bool = False  # True: weight stored (in, out), y = x W + b (transformers' Conv1D)

    @classmethod
    def wrap(cls, linear: nn.Linear, spec: LayerSpec, control: RefreshControl, dense_carrier: bool = False
             ) -> "LowRankLinear":
        out_f, in_f = linear.weight.shape
        r = spec.rank
        w = linear.weight
        n = in_f if spec.right else out_f
        # everything that can fail first, so a failure leaves the layer untouched
        if spec.basis == "svd":
            buffer_name, buffer = SVD_BASIS, torch.zeros(n, r, dtype=basis_dtype(w.dtype), device=w.device)
        else:
            buffer_name, buffer = INDEX, torch.arange(r, dtype=torch.int64, device=w.device)
            basis_matrix(spec.basis, n, basis_dtype(w.dtype), w.device)  # build the shared D now, not in a graph
            if control.sketch_rows:
                control.sketch(out_f if spec.right else in_f, spec.norm_p, w.device)
        carrier_shape = (out_f, r) if spec.right else (r, in_f)
        carrier = nn.Parameter(carrier_data(carrier_shape, w.dtype, w.device, dense_carrier))
        linear.__class__ = cls
        linear.lowrank_spec = spec
        linear._lowrank_control = control
        linear._lowrank_refresh = True  # nothing selected yet: the first backward selects
        linear._lowrank_refreshed = False
        linear._lowrank_selected = False
        linear._lowrank_dense_carrier = dense_carrier
        control.layers.append(linear)
        w.requires_grad_(False)
        linear.register_parameter(CARRIER, carrier)
        linear._lowrank_hook = carrier.register_post_accumulate_grad_hook(linear.note_grad_ready)
        linear.register_buffer(buffer_name, buffer, persistent=False)
        return linear

    def unwrap(self) -> nn.Linear:
        """Back to a plain nn.Linear with the trained weight (same storage; an int8 weight is dequantised into the
        dtype it had before wrapping, same Parameter object); drops the carrier and indices."""
        if self.is_int8:
            self.weight.data = self.dense_weight()
            del self._buffers[SCALE]
            self._non_persistent_buffers_set.discard(SCALE)
        self._lowrank_hook.remove()
        del self._parameters[CARRIER]
        self._buffers.pop(INDEX, None)
        self._buffers.pop(SVD_BASIS, None)
        self._lowrank_control.layers.remove(self)
        for attr in ("lowrank_spec", "_lowrank_control", "_lowrank_refresh", "_lowrank_refreshed", "_lowrank_selected",
                     "_lowrank_hook", "_lowrank_dense_carrier"):
            delattr(self, attr)
        self.weight.requires_grad_(True)
        self.__class__ = self._lowrank_dense_class
        return self

    # -- int8 weights (weight_dtype="int8", int8_weights.py) ----------------------------------------------------
    @property
    def is_int8(self) -> bool:
        """Whether the weight is stored as int8 codes (the weight parameter) and block scales (``weight_scale``)."""
        return SCALE in self._buffers

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the layer computes in: its weight's, or for an int8 weight the dtype it had (its carrier's)."""
        return self._parameters[CARRIER].dtype

    def dense_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The weight as a floating tensor of `dtype` (default: compute_dtype): dequantised for an int8 weight (a new
        tensor), else the weight itself (or a cast)."""
        dtype = dtype or self.compute_dtype
        if self.is_int8:
            return int8_weights.dequantize(self.weight, self.weight_scale, dtype)
        return self.weight.to(dtype)

    def store_int8_(self) -> None:
        """Store the weight as int8 codes and block scales from now on (same Parameter object: it holds the codes)."""
        if self.is_int8:
            return
        codes, scale = int8_weights.quantize(self.weight.detach())
        self.register_buffer(SCALE, scale, persistent=False)  # the weight's block scales, fp32 (rows, cols / block)
        self.weight.data = codes

    def load_weight_(self, value: Tensor) -> None:
        """Set the weight from `value`, in place: an Int8Tensor of this layer's blocks is copied bit for bit, any
        other floating tensor (or Int8Tensor) is encoded (int8) or copied (otherwise). The shape must be the
        weight's. For a layer on the meta device the storage is created on value's device instead."""
        if tuple(value.shape) != tuple(self.weight.shape):
            raise ValueError(f"weight of shape {tuple(value.shape)} for a layer whose weight is "
                             f"{tuple(self.weight.shape)}")
        if not self.is_int8:
            if int8_weights.is_int8_tensor(value):
                value = value.dequantize(self.weight.dtype)
            if self.weight.is_meta:
                swap_keeping_hooks(self.weight, nn.Parameter(value.to(self.weight.dtype, copy=True),
                                                                   requires_grad=False))
            else:
                self.weight.copy_(value)
            return
        if (int8_weights.is_int8_tensor(value) and list(value.block_size) == [1, int8_weights.block_size(value.shape[1])]
                and value.zero_point is None and tuple(value.scale.shape) == tuple(self.weight_scale.shape)):
            codes, scale = value.qdata, value.scale.float()
        else:
            if int8_weights.is_int8_tensor(value):
                value = value.dequantize(torch.float32)
            if not value.is_floating_point():
                raise ValueError(f"weight must be a floating tensor or an Int8Tensor, got {value.dtype}")
            codes, scale = int8_weights.quantize(value)
        if self.weight.is_meta:  # new storage; never the caller's own tensors
            copied = int8_weights.is_int8_tensor(value)
            swap_keeping_hooks(self.weight, nn.Parameter(codes.clone() if copied else codes, requires_grad=False))
            self._buffers[SCALE] = scale.clone() if copied else scale
        else:
            self.weight.copy_(codes)
            self.weight_scale.copy_(scale)

    def weight_to_meta_(self) -> None:
        """Put the weight (and an int8 weight's scales) back on the meta device, same Parameter object: what
        load_weights does to undo a partial load of a meta model."""
        meta = torch.empty(self.weight.shape, dtype=self.weight.dtype, device="meta")
        swap_keeping_hooks(self.weight, nn.Parameter(meta, requires_grad=False))
        if self.is_int8:
            self._buffers[SCALE] = torch.empty(self._buffers[SCALE].shape, device="meta")

    def materialize_own_(self, device) -> None:
        """Create on `device` the tensors of the layer's own that are still on the meta device (after wrapping a
        meta model and loading its weights): the carrier, the selection (idx = 0..r-1, or the svd basis zeros) and
        an int8 weight's scales. Parameters stay the same objects."""
        carrier = self._parameters[CARRIER]
        if carrier.is_meta:
            data = carrier_data(carrier.shape, carrier.dtype, device, self._lowrank_dense_carrier)
            swap_keeping_hooks(carrier, nn.Parameter(data))
        for name in (INDEX, SVD_BASIS, SCALE):
            buf = self._buffers.get(name)
            if buf is not None and buf.is_meta:
                if name == INDEX:
                    self._buffers[name] = torch.arange(buf.shape[0], dtype=buf.dtype, device=device)
                else:
                    self._buffers[name] = torch.zeros(buf.shape, dtype=buf.dtype, device=device)

    def materialize_carrier(self) -> None:
        """Give the carrier real storage (same Parameter object), as DDP and FSDP2 need; a no-op if it has it."""
        carrier = self._parameters[CARRIER]
        self._lowrank_dense_carrier = True
        if 0 in carrier.stride() and carrier.numel() > 1:
            carrier.data = carrier_data(carrier.shape, carrier.dtype, carrier.device, dense=True)

    def _apply(self, fn, recurse=True):
        # .to() / .half() of a stride-0 carrier would allocate it in full: keep it a free view instead
        super()._apply(fn, recurse)
        scale = self._buffers.get(SCALE)
        if scale is not None and scale.dtype != torch.float32:  # an int8 weight's scales stay fp32 under .half()
            self._buffers[SCALE] = scale.float()
        carrier = self._parameters.get(CARRIER)
        if carrier is not None and not self._lowrank_dense_carrier and 0 not in carrier.stride():
            carrier.data = carrier_data(carrier.shape, carrier.dtype, carrier.device, dense=False)
        return self

    def note_grad_ready(self, carrier: Tensor) -> None:
        """The carrier's post-accumulate-grad hook: backward has delivered this layer's rank-r gradient, so a
        pending refresh is done (runs eagerly, also under compile). A data-parallel wrapper that gives the layer
        another carrier tensor registers this on it too."""
        if self._lowrank_refresh:
            self._lowrank_refresh = False
            self._lowrank_refreshed = True
            self._lowrank_selected = True
        for listener in self._lowrank_control.grad_listeners:
            listener(self, carrier)

    @property
    def refresh_control(self) -> RefreshControl:
        """The step counter and refresh schedule this layer shares with its model's other layers and optimizer."""
        return self._lowrank_control

    @property
    def refreshed(self) -> bool:
        """Whether this step's refresh has re-selected the columns (the optimizer then moves the states)."""
        return self._lowrank_refreshed

    def restore_selection(self, selection: Tensor | None) -> None:
        """Set the selection from a loaded state (idx, or the svd basis D_r), or with None mark the layer as
        unselected: it then selects from its first gradient, whatever the step."""
        if selection is not None:
            self.selection().copy_(selection)
        self._lowrank_selected = selection is not None

    @property
    def basis_size(self) -> int:
        out_f, in_f = self.weight.shape
        return in_f if self.lowrank_spec.right else out_f

    @property
    def other_size(self) -> int:
        """The side that is not projected (out for right projection, in for left)."""
        out_f, in_f = self.weight.shape
        return out_f if self.lowrank_spec.right else in_f

    @property
    def keeps_projected_input(self) -> bool:
        """Whether an ordinary step saves x D_r (T, r) for backward instead of the input x (T, n): when the rank-r
        gradient projects x (right side; left for a transposed weight) and r <= PROJECTED_INPUT_MAX_RATIO * n.
        Refresh steps always save x (they score all n columns of x D)."""
        spec = self.lowrank_spec
        return spec.right != self._lowrank_transposed and spec.rank <= PROJECTED_INPUT_MAX_RATIO * self.basis_size

    def selection(self) -> Tensor:
        """The layer's current selection: its indices idx, int64 (r,), for dct/random; the (n, r) basis D_r for svd."""
        return getattr(self, SVD_BASIS) if self.lowrank_spec.basis == "svd" else getattr(self, INDEX)

    def columns(self, dtype: torch.dtype) -> Tensor:
        """D_r, the (n, r) selected basis columns, in `dtype`."""
        spec = self.lowrank_spec
        if spec.basis == "svd":
            return getattr(self, SVD_BASIS).to(dtype)
        D = basis_matrix(spec.basis, self.basis_size, basis_dtype(dtype), self.weight.device)
        return gather_columns(D, getattr(self, INDEX)).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        carrier = getattr(self, CARRIER)
        scale = self._buffers.get(SCALE)
        if not (torch.is_grad_enabled() and (carrier.requires_grad or x.requires_grad)):
            w = self.weight if scale is None else int8_weights.dequantize(self.weight, scale, carrier.dtype)
            return dense_linear(x, w, self.bias, self._lowrank_transposed)
        spec = self.lowrank_spec
        D = omega = None
        if spec.basis != "svd":
            D = basis_matrix(spec.basis, self.basis_size, basis_dtype(carrier.dtype), self.weight.device)
            if self._lowrank_control.sketch_rows:
                omega = self._lowrank_control.sketch(self.other_size, spec.norm_p, self.weight.device)
        refresh = self._lowrank_refresh
        reducer = self._lowrank_control.score_reducer if refresh else None  # only refreshes talk to other processes
        keep_projected = not refresh and carrier.requires_grad and self.keeps_projected_input
        return _ProjectedLinearFn.apply(x, self.weight, self.bias, carrier, self.selection(), D, omega,
                                        spec.right, spec.basis, spec.norm_p, refresh,
                                        self._lowrank_transposed, reducer, self._lowrank_control.score_dtype, scale,
                                        keep_projected)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + CARRIER, None)
        if self.is_int8:  # the original key, as torchao's Int8Tensor over the codes and scales (no copy)
            codes = self.weight if keep_vars else self.weight.detach()
            destination[prefix + "weight"] = int8_weights.as_int8_tensor(codes, self.weight_scale, self.compute_dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        own_weight = key in state_dict and (self.is_int8 or int8_weights.is_int8_tensor(state_dict[key]))
        if own_weight:  # an Int8Tensor (bit for bit) or a float tensor (encoded)
            value = state_dict[key]
            state_dict = {k: v for k, v in state_dict.items() if k.startswith(prefix) and k != key}
            if not isinstance(value, Tensor):
                error_msgs.append(f'While copying the parameter named "{key}", expected torch.Tensor or Tensor-like '
                                  f"object from checkpoint but received {type(value)}")
            else:
                try:
                    with torch.no_grad():
                        self.load_weight_(value)
                except ValueError as e:
                    error_msgs.append(f"size mismatch or wrong value for {key}: {e}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for name in (CARRIER, "weight") if own_weight else (CARRIER,):
            if prefix + name in missing_keys:
                missing_keys.remove(prefix + name)

    def extra_repr(self) -> str:
        s = self.lowrank_spec
        return f"{super().extra_repr()}, rank={s.rank}, side={s.side}, basis={s.basis}"
