"""Refresh agreement: the processes of a data-parallel job select the same basis columns at every refresh.

On a refresh step each layer ranks its basis columns by the norm of the projected gradient and keeps the top r
as its indices idx (METHOD.md section 3). Inside backward a process only sees its own micro-batch, so left
alone every process would pick its own columns and the replicas would drift apart. A :class:`RefreshReducer`
installed on the model's RefreshControl (``control.score_reducer``; projection.rank_r_grad calls it on refresh
steps only) makes every process agree. It scores with selection.py's pieces (the block rule, the score rows,
the sketches) and adds only the communication:

- ``"exact"``: the similarity S = G D (right) or D^T G (left) of the *global* gradient, summed over
  processes one (out, block) / (block, in) slice at a time (all-reduce each slice, then take its column
  norms), so no full gradient is ever held. The scores, hence the selection, are those a single process
  would compute on the concatenated global batch. Cost per refresh: one all-reduce of out * n (right) or
  n * in (left) numbers per layer, i.e. a full gradient's worth, in blocks; with ``sketch_rows=k`` the
  sketched product (k, n) is what is summed (it is linear in G), so only k * n numbers.
- ``"cheap"``: every process computes its own column scores and the n scores are summed (one all-reduce
  of n floats per layer). The sum of per-process norms is not the norm of the summed gradient: columns
  where the processes' gradients disagree score higher than they should.

All-reduced values are bit-identical on every process (a sum of two is commutative; ring and tree
all-reduces compute each element once and broadcast it), and the top-r is computed from them by the same
kernel everywhere, so every process selects the same indices. Random state is the same by construction:
the random basis and the sketches are seeded from (seed, size, step) alone, and the choice between FFT
and matmul is a fixed rule on the size (basis.use_fft), never a timing.

Also here: :func:`join_group`, the set-up that prepare_ddp and prepare_fsdp share.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from .config import REFRESH_SYNC_MODES
from .projection import RefreshControl
from .selection import (SCORE_BLOCK, block_size_for, left_score_rows, left_scores, left_sketch, p_norms,
                        right_score_rows, right_scores, right_sketch, sketch_norms)

__all__ = ["REFRESH_SYNC_MODES", "DEFAULT_REFRESH_SYNC", "RefreshReducer", "sync_refreshes", "control_of",
           "join_group"]

# "exact" by default: it keeps DDP's contract that N processes train the model one process would train on
# the concatenated batch (tests/test_distributed.py: same selections, weights equal to 1e-16 in fp64), and on
# a small LLaMA its selections kept more of the global gradient's energy than "cheap" (0.769 vs 0.756 with 2
# processes, 0.773 vs 0.745 with 4; docs/DISTRIBUTED.md). Its price, a full gradient's worth of all-reduce
# per refresh (k * n with sketch_rows=k), is paid once per update_gap steps: at update_gap 10 the
# total traffic was 0.45 of DDP with AdamW's (0.34 with "cheap"). Refreshing every step without a sketch,
# exact costs more than AdamW's traffic; use "cheap" or sketch_rows there.
DEFAULT_REFRESH_SYNC = "exact"


def _float_for_reduce(s: Tensor) -> Tensor:
    """Scores and similarities are summed in fp32 (fp64 stays fp64): a bf16 sum over processes loses ranks."""
    return s if s.dtype in (torch.float32, torch.float64) else s.float()


class RefreshReducer:
    """Makes every process of a group select the same basis columns at a refresh.

    Installed as ``RefreshControl.score_reducer`` (see :func:`sync_refreshes`); projection.rank_r_grad calls
    :meth:`right_scores` / :meth:`left_scores` (fixed bases) or :meth:`summed_gradient` (basis="svd") on
    refresh steps, from inside the layer's backward. Every process must run the same layers' refreshes in
    the same order, which data-parallel training does.

    Args:
        mode: "exact" (default): scores of the summed similarity, reduced blockwise; "cheap": the sum of
            every process's own scores (n floats per layer).
        group: the data-parallel process group (default: WORLD).
        block: basis columns per all-reduced slice in "exact" mode (bounds the live slice to (out, block)).

    ``bytes`` and ``calls`` count what it has all-reduced (payload bytes, before any algorithm's factor).
    """

    def __init__(self, mode: str = DEFAULT_REFRESH_SYNC, group: dist.ProcessGroup | None = None,
                 block: int = SCORE_BLOCK):
        if mode not in ("exact", "cheap"):
            raise ValueError(f"RefreshReducer mode must be 'exact' or 'cheap', got {mode!r}")
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"block must be an int >= 1, got {block!r}")
        self.mode = mode
        self.group = group
        self.block = block
        self.bytes = 0
        self.calls = 0

    def __repr__(self) -> str:
        return f"RefreshReducer(mode={self.mode!r}, block={self.block})"

    def _all_reduce(self, t: Tensor, async_op: bool = False):
        """Sum t over the group in place; without an initialised process group t already is the sum (of one)."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        if torch.compiler.is_compiling():  # traced: a blocking collective (dynamo has no async_op), not counted
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
            return None
        self.bytes += t.numel() * t.element_size()
        self.calls += 1
        return dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group, async_op=async_op)

    def _summed(self, s: Tensor) -> Tensor:
        s = _float_for_reduce(s).contiguous()
        self._all_reduce(s)
        return s

    def _blockwise(self, n: int, rows_of: Callable[[slice], Tensor], norm_p: int) -> Tensor:
        """Row norms of the summed similarity (one row per basis index), one all-reduced block at a time.

        The all-reduce of block i overlaps the product of block i + 1, so at most two blocks are alive; a
        block is at most half the basis (selection.block_size_for), so no block is the whole gradient.
        """
        parts, pending = [], None
        block = block_size_for(n, self.block)
        for start in range(0, n, block):
            s = _float_for_reduce(rows_of(slice(start, start + block))).contiguous()
            work = self._all_reduce(s, async_op=True)
            if pending is not None:
                parts.append(self._finish(*pending, norm_p))
            pending = (work, s)
        parts.append(self._finish(*pending, norm_p))
        return torch.cat(parts)

    @staticmethod
    def _finish(work, s: Tensor, norm_p: int) -> Tensor:
        if work is not None:
            work.wait()
        return p_norms(s, norm_p, dim=1)

    def right_scores(self, gy: Tensor, xd: Tensor, norm_p: int, omega: Tensor | None) -> Tensor:
        """Agreed scores of the n basis columns, right projection. gy: (T, out); xd: (T, n) = x D; omega: (k, out).

        norm_p: the order of the norm columns are ranked by (1 or 2, selection.norm_order).
        """
        if omega is not None:
            s = right_sketch(gy, xd, omega)  # (k, n)
            if self.mode == "exact":  # linear in G: the summed sketch is the global batch's sketch
                return sketch_norms(self._summed(s), norm_p, dim=0)
            return self._summed(sketch_norms(s, norm_p, dim=0))
        if self.mode == "exact":
            return self._blockwise(xd.shape[1], right_score_rows(gy, xd), norm_p)  # (b, out) slices of (G D)^T
        return self._summed(right_scores(gy, xd, norm_p, self.block))

    def left_scores(self, gd: Tensor, x: Tensor, norm_p: int, omega: Tensor | None) -> Tensor:
        """Agreed scores of the n basis columns, left projection. gd: (T, n) = gy D; x: (T, in); omega: (k, in)."""
        if omega is not None:
            s = left_sketch(gd, x, omega)  # (n, k)
            if self.mode == "exact":
                return sketch_norms(self._summed(s), norm_p, dim=1)
            return self._summed(sketch_norms(s, norm_p, dim=1))
        if self.mode == "exact":
            return self._blockwise(gd.shape[1], left_score_rows(gd, x), norm_p)  # (b, in) slices of D^T G
        return self._summed(left_scores(gd, x, norm_p, self.block))

    def summed_gradient(self, g: Tensor) -> Tensor:
        """basis="svd": the full gradient summed over processes (a new tensor), whose SVD every process takes.

        Both modes do this: an SVD has no per-column scores to add up. It costs one full-gradient all-reduce
        per refresh, which DDP with AdamW pays every step.
        """
        total = _float_for_reduce(g).clone()
        self._all_reduce(total)
        return total


def control_of(opt_or_control) -> RefreshControl:
    """The RefreshControl of a wrap_model optimizer (or the control itself); TypeError for anything else."""
    if isinstance(opt_or_control, RefreshControl):
        return opt_or_control
    control = getattr(opt_or_control, "refresh_control", None)
    if not isinstance(control, RefreshControl):
        raise TypeError(f"expected the optimizer returned by lowrank_compile.wrap_model (or its RefreshControl), "
                        f"got {type(opt_or_control).__name__}")
    return control


def sync_refreshes(opt, mode: str = DEFAULT_REFRESH_SYNC, group: dist.ProcessGroup | None = None,
                   block: int = SCORE_BLOCK) -> RefreshReducer | None:
    """Make every process of `group` select the same columns at each refresh of `opt`'s layers.

    Args:
        opt: the optimizer returned by :func:`lowrank_compile.wrap_model` (or its RefreshControl).
        mode: "exact" (default), "cheap" (see :class:`RefreshReducer`), or "local": remove any reducer, so
            each process selects from its own gradient (only right when processes train separate models).
        group: the data-parallel process group (default: WORLD), the one DDP reduces gradients over.

    Returns the installed reducer (its ``bytes`` counts what refreshes communicated), or None for "local".
    Call it on every process, before the first backward.

    Example::

        opt = lowrank_compile.wrap_model(model, rank=64)
        lowrank_compile.distributed.sync_refreshes(opt, "cheap")
    """
    control = control_of(opt)
    if mode not in REFRESH_SYNC_MODES:
        raise ValueError(f"refresh sync mode must be one of {REFRESH_SYNC_MODES}, got {mode!r}")
    control.score_reducer = None if mode == "local" else RefreshReducer(mode, group, block)
    return control.score_reducer


def join_group(opt, refresh_sync: str | None, group: dist.ProcessGroup | None) -> RefreshControl:
    """The set-up prepare_ddp and prepare_fsdp share: refreshes agree over the engine's group, carriers are real.

    refresh_sync: a mode installs that reducer on `group`; None keeps the reducer wrap_model installed (moved
    to `group` when one is given), or installs the default if it installed none. Every carrier gets real
    storage: DDP cannot be built over a stride-0 parameter, and FSDP2 shards the carriers. Returns the control.
    """
    control = control_of(opt)
    if refresh_sync is not None:
        sync_refreshes(opt, refresh_sync, group)
    elif control.score_reducer is None:
        sync_refreshes(opt, DEFAULT_REFRESH_SYNC, group)
    elif group is not None:
        control.score_reducer.group = group
    for layer in control.layers:
        layer.materialize_carrier()
    return control
