"""Data-parallel training of a wrapped model on PyTorch's own engines: DDP and FSDP2 (``fully_shard``).

What travels between processes
-------------------------------
A projected layer's weight is frozen (requires_grad=False) while wrapped; its rank-r gradient lives in the
``lowrank_grad`` carrier parameter. DistributedDataParallel reduces exactly the registered parameters that
require grad, so for a projected (out, in) layer it all-reduces an (out, r) or (r, in) tensor, not an
(out, in) one. Nothing here changes that: it is why the low-rank method needs no process-group scheme of
its own.

Consistent refreshes
--------------------
On a refresh step each layer ranks its basis columns by the norm of the projected gradient and keeps the
top r (METHOD.md section 3). Inside backward a process only sees its own micro-batch, so left alone every
process would pick its own columns and the replicas would drift apart. A :class:`RefreshReducer` installed
on the model's RefreshControl (``control.score_reducer``; projection.rank_r_grad calls it on refresh
steps only) makes every process agree:

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

DDP
---
``wrap_model`` installs the default reducer by itself when torch.distributed is initialised with more
than one process (``refresh_sync="auto"``). :func:`prepare_ddp` builds the DistributedDataParallel module,
keeps the layers' index buffers out of DDP's per-step buffer broadcast, and with ``fused=True`` moves the
in-backward updates into a DDP communication hook, so each bucket's parameters are updated as soon as
that bucket's all-reduce has finished (the in-backward hooks alone would update from un-reduced
gradients, so a fused optimizer in a multi-process job refuses to run without it).

FSDP2
-----
:func:`prepare_fsdp` applies ``fully_shard`` so that every update stays local to a shard (right-projected
layers shard rows, left-projected ones columns: :func:`shard_placement`) and points the optimizer at the
local shards. See docs/DISTRIBUTED.md for what is measured and what is not supported.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .config import REFRESH_SYNC_MODES
from .projection import CARRIER, INDEX, SVD_BASIS, LowRankLinear, RefreshControl
from .selection import (SCORE_BLOCK, _block_for, _left_rows, _right_rows, _sketch_norm, left_scores, p_norms,
                        right_scores)

__all__ = ["REFRESH_SYNC_MODES", "DEFAULT_REFRESH_SYNC", "RefreshReducer", "sync_refreshes", "prepare_ddp",
           "CommCounter", "counting_allreduce_hook", "shard_placement", "prepare_fsdp", "is_multiprocess"]

logger = logging.getLogger(__name__)

# "exact" by default: it keeps DDP's contract that N processes train the model one process would train on
# the concatenated batch (tests/test_distributed.py: same selections, weights equal to 1e-16 in fp64), and on
# a small LLaMA its selections kept more of the global gradient's energy than "cheap" (0.769 vs 0.756 with 2
# processes, 0.773 vs 0.745 with 4; docs/DISTRIBUTED.md). Its price, a full gradient's worth of all-reduce
# per refresh (k * n with sketch_rows=k), is paid once per update_gap steps: at update_gap 10 the
# total traffic was 0.45 of DDP with AdamW's (0.34 with "cheap"). Refreshing every step without a sketch,
# exact costs more than AdamW's traffic; use "cheap" or sketch_rows there.
DEFAULT_REFRESH_SYNC = "exact"


def is_multiprocess(group: dist.ProcessGroup | None = None) -> bool:
    """True when torch.distributed is initialised and the group (default: WORLD) has more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


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

    def _summed_scores(self, scores: Tensor) -> Tensor:
        scores = _float_for_reduce(scores).contiguous()
        self._all_reduce(scores)
        return scores

    def _blockwise(self, n: int, rows_of: Callable[[slice], Tensor], p: int) -> Tensor:
        """Row norms of the summed similarity (one row per basis index), one all-reduced block at a time.

        The all-reduce of block i overlaps the product of block i + 1, so at most two blocks are alive; a
        block is at most half the basis (selection's rule), so no block is the whole gradient.
        """
        parts, pending = [], None
        block = _block_for(n, self.block)
        for start in range(0, n, block):
            s = _float_for_reduce(rows_of(slice(start, start + block))).contiguous()
            work = self._all_reduce(s, async_op=True)
            if pending is not None:
                parts.append(self._finish(*pending, p))
            pending = (work, s)
        parts.append(self._finish(*pending, p))
        return torch.cat(parts)

    @staticmethod
    def _finish(work, s: Tensor, p: int) -> Tensor:
        if work is not None:
            work.wait()
        return p_norms(s, p, dim=1)

    def right_scores(self, gy: Tensor, xd: Tensor, p: int, omega: Tensor | None) -> Tensor:
        """Agreed scores of the n basis columns, right projection. gy: (T, out); xd: (T, n) = x D; omega: (k, out)."""
        if omega is not None:
            s = (gy @ omega.to(gy.dtype).t()).t() @ xd  # (k, T) @ (T, n) -> (k, n): the sketch of G D
            if self.mode == "exact":  # linear in G: the summed sketch is the global batch's sketch
                return _sketch_norm(self._summed_scores(s), p, dim=0)
            return self._summed_scores(_sketch_norm(s, p, dim=0))
        if self.mode == "exact":
            return self._blockwise(xd.shape[1], _right_rows(gy, xd), p)  # (b, out) slices of (G D)^T
        return self._summed_scores(right_scores(gy, xd, p, self.block))

    def left_scores(self, gd: Tensor, x: Tensor, p: int, omega: Tensor | None) -> Tensor:
        """Agreed scores of the n basis columns, left projection. gd: (T, n) = gy D; x: (T, in); omega: (k, in)."""
        if omega is not None:
            s = gd.t() @ (x @ omega.to(x.dtype).t())  # (n, T) @ (T, k) -> (n, k): the sketch of D^T G
            if self.mode == "exact":
                return _sketch_norm(self._summed_scores(s), p, dim=1)
            return self._summed_scores(_sketch_norm(s, p, dim=1))
        if self.mode == "exact":
            return self._blockwise(gd.shape[1], _left_rows(gd, x), p)  # (b, in) slices of D^T G
        return self._summed_scores(left_scores(gd, x, p, self.block))

    def summed_gradient(self, g: Tensor) -> Tensor:
        """basis="svd": the full gradient summed over processes (a new tensor), whose SVD every process takes.

        Both modes do this: an SVD has no per-column scores to add up. It costs one full-gradient all-reduce
        per refresh, which DDP with AdamW pays every step.
        """
        total = _float_for_reduce(g).clone()
        self._all_reduce(total)
        return total


def _control_of(opt_or_control) -> RefreshControl:
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
    control = _control_of(opt)
    if mode not in REFRESH_SYNC_MODES:
        raise ValueError(f"refresh sync mode must be one of {REFRESH_SYNC_MODES}, got {mode!r}")
    control.score_reducer = None if mode == "local" else RefreshReducer(mode, group, block)
    return control.score_reducer


def _hook_targets(opt) -> list[tuple[Tensor, dict, Tensor]]:
    """(tensor that receives the gradient, param group, optimizer param) for every param of a LowRankAdamW."""
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            out.append((opt.layer_of(p).lowrank_grad if group["lowrank"] else p, group, p))
    return out


_FUSED_ERROR = (
    "fused=True in a multi-process job: the in-backward update would use this process's gradient before "
    "DistributedDataParallel has reduced it. Build the DDP module with "
    "lowrank_compile.distributed.prepare_ddp(model, opt), which runs each update after its bucket's "
    "all-reduce, or wrap with fused=False (FSDP2 supports fused=False only)."
)


def _refuse_unreduced_update(_grad_holder: Tensor) -> None:
    raise RuntimeError(_FUSED_ERROR)


def attach(opt, refresh_sync: str = "auto") -> None:
    """Called by wrap_model: set up a freshly made optimizer for the process group it runs in, if any.

    "auto": when torch.distributed is initialised with more than one process, install the default
    reducer. Any mode but "local" in a multi-process job also replaces the in-backward updates of a fused
    optimizer by a guard that raises until :func:`prepare_ddp` takes them over.
    """
    mode = DEFAULT_REFRESH_SYNC if refresh_sync == "auto" else refresh_sync
    multi = is_multiprocess()
    if refresh_sync != "auto" or multi:
        sync_refreshes(opt, mode)
    if multi:
        logger.info("lowrank_compile: %d processes; refreshes select columns %s", dist.get_world_size(),
                    "independently per process" if mode == "local" else f"from agreed scores ({mode!r})")
    if multi and mode != "local" and opt.fused:
        control = opt.refresh_control
        for handle in control.hooks:
            handle.remove()
        control.hooks[:] = [target.register_post_accumulate_grad_hook(_refuse_unreduced_update)
                            for target, _, _ in _hook_targets(opt)]


# -- DDP ------------------------------------------------------------------------------------------------------
def _lowrank_buffer_names(model: nn.Module) -> list[str]:
    return [f"{fqn}.{name}" if fqn else name for fqn, m in model.named_modules() if isinstance(m, LowRankLinear)
            for name in (INDEX, SVD_BASIS) if name in m._buffers]


@dataclasses.dataclass
class _FusedState:
    opt: object
    hook: Callable
    hook_state: object
    owners: dict = dataclasses.field(default_factory=dict)  # DDP param -> optimizer param


def _fused_update_hook(state: _FusedState, bucket):  # no annotations: DDP checks them as objects
    """Reduce a bucket with the wrapped hook, then update its parameters from the reduced gradients.

    The update runs when the last micro-batch of an accumulated step is reduced (``opt`` counts the
    micro-batches through its step() calls), whether or not the earlier ones ran under ``no_sync``.
    """
    fut = state.hook(state.hook_state, bucket)

    def update(fut: torch.futures.Future) -> Tensor:
        result = fut.value()
        result = result[0] if isinstance(result, (list, tuple)) else result
        buffer = bucket.buffer()
        if result.data_ptr() != buffer.data_ptr():
            buffer.copy_(result)
        opt = state.opt
        if opt.micro_step != opt.accumulate - 1:
            return buffer
        params = []
        for grad, param in zip(bucket.gradients(), bucket.parameters()):
            if param.grad is None or param.grad.data_ptr() != grad.data_ptr():
                param.grad = grad  # the reduced gradient (a view of the bucket)
            params.append(state.owners[param])
        with torch.no_grad():  # runs on the communication thread: grad mode is per thread
            opt.update_now(params)
        return buffer

    return fut.then(update)


def prepare_ddp(model: nn.Module, opt, *, refresh_sync: str | None = None, comm_hook: Callable | None = None,
                comm_hook_state: object = None, **ddp_kwargs) -> nn.parallel.DistributedDataParallel:
    """Wrap `model` (already wrapped by :func:`lowrank_compile.wrap_model`) in DistributedDataParallel.

    - The layers' index buffers (identical on every process by construction) are kept out of DDP's buffer
      broadcast, which would otherwise send them before every forward.
    - refresh_sync: "exact", "cheap" or "local" installs that reducer on DDP's process group; None (default)
      keeps what wrap_model installed, or installs the default ("exact") if it installed none.
    - fused=True: the optimizer's in-backward updates move into a communication hook that runs each
      bucket's updates once its all-reduce is done (gradient_as_bucket_view defaults to True, so the reduced
      gradients are the bucket's own memory). With ``accumulate=k``, call step() per micro-batch as usual;
      the k-th backward updates, whether the first k-1 ran under ``ddp.no_sync()`` (which saves their
      all-reduces) or not. Gradients are cleared at the next step's first forward.
    - comm_hook, comm_hook_state: a DDP communication hook to use instead of the default all-reduce (with
      fused=True it runs first and the update follows it); e.g. :func:`counting_allreduce_hook`.

    Other keyword arguments go to DistributedDataParallel. Call it on every process after wrap_model.

    Example::

        opt = lowrank_compile.wrap_model(model, rank=64, fused=True)
        ddp = lowrank_compile.distributed.prepare_ddp(model, opt)
        ddp(batch).loss.backward(); opt.step()
    """
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    control = _control_of(opt)
    group = ddp_kwargs.get("process_group")
    if refresh_sync is not None:
        sync_refreshes(opt, refresh_sync, group)
    elif control.score_reducer is None:
        sync_refreshes(opt, DEFAULT_REFRESH_SYNC, group)
    elif group is not None:
        control.score_reducer.group = group
    for layer in control.layers:
        layer.materialize_carrier()  # DDP cannot be built over a stride-0 parameter
    ignored = list(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    ignored += [name for name in _lowrank_buffer_names(model) if name not in ignored]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    fused = opt.fused
    if fused:
        if ddp_kwargs.get("gradient_as_bucket_view") is False:
            raise ValueError("prepare_ddp with fused=True updates from the reduced buckets; leave "
                             "gradient_as_bucket_view at True")
        ddp_kwargs["gradient_as_bucket_view"] = True
    ddp = nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
    if comm_hook is None:
        comm_hook, comm_hook_state = allreduce_hook, group
    if not fused:
        if comm_hook is not allreduce_hook or comm_hook_state is not None:
            ddp.register_comm_hook(comm_hook_state, comm_hook)
        return ddp
    for handle in control.hooks:  # the in-backward updates (or wrap_model's guard): replaced by the hook
        handle.remove()
    control.hooks.clear()
    state = _FusedState(opt, comm_hook, comm_hook_state)
    for target, _, p in _hook_targets(opt):
        state.owners[target] = p
    ddp.register_comm_hook(state, _fused_update_hook)
    ddp.register_forward_pre_hook(functools.partial(_clear_stale_grads, opt=opt))
    return ddp


def _clear_stale_grads(module, args, *, opt) -> None:
    """fused DDP: gradients of the last step stay in DDP's buckets until the next step's first forward."""
    if torch.is_grad_enabled() and opt.micro_step == 0:
        opt.zero_grad(set_to_none=True)


@dataclasses.dataclass
class CommCounter:
    """State of :func:`counting_allreduce_hook`: what DDP all-reduced, in payload bytes."""

    process_group: dist.ProcessGroup | None = None
    bytes: int = 0
    buckets: list[int] = dataclasses.field(default_factory=list)  # numel of every bucket reduced, in order

    def reset(self) -> None:
        self.bytes = 0
        self.buckets.clear()


def counting_allreduce_hook(counter: CommCounter, bucket):  # no annotations: DDP checks them as objects
    """DDP's default all-reduce (average), counting each bucket's size into `counter`.

    Example::

        counter = CommCounter()
        ddp.register_comm_hook(counter, counting_allreduce_hook)
    """
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    buffer = bucket.buffer()
    counter.bytes += buffer.numel() * buffer.element_size()
    counter.buckets.append(buffer.numel())
    return allreduce_hook(counter.process_group, bucket)


# -- FSDP2 ----------------------------------------------------------------------------------------------------
def shard_placement(model: nn.Module) -> Callable[[nn.Parameter], object]:
    """A ``shard_placement_fn`` for ``fully_shard`` that keeps every low-rank update local to its shard.

    A right-projected layer's update u D_r^T (u: (out, r)) is row-local, so its weight and carrier keep
    FSDP's default row sharding (Shard(0)); a left-projected layer's D_r u (u: (r, in)) is column-local, so
    its weight and carrier are sharded by columns (Shard(1)). Other parameters: the default.
    """
    from torch.distributed.tensor import Shard

    by_columns = set()
    for m in model.modules():
        if isinstance(m, LowRankLinear) and not m.lowrank_spec.right:
            by_columns.update((id(m.weight), id(m._parameters[CARRIER])))

    def place(param: nn.Parameter):
        return Shard(1) if id(param) in by_columns else None

    return place


@dataclasses.dataclass
class _FsdpSlot:
    """Where one optimizer parameter lives after fully_shard: module and name of its sharded parameter."""

    group: dict
    index: int  # position in group["params"]
    module: nn.Module
    name: str
    layer: LowRankLinear | None  # projected weight: its layer (the gradient is the carrier's)


def _hook_unsharded_carrier(layer: LowRankLinear, args) -> None:
    """Forward pre-hook, after FSDP's unshard: the refresh bookkeeping hook on the carrier autograd sees."""
    carrier = layer._parameters[CARRIER]
    hooked = layer.__dict__.setdefault("_lowrank_fsdp_hooked", set())
    if id(carrier) not in hooked:
        hooked.add(id(carrier))
        carrier.register_post_accumulate_grad_hook(layer.note_grad_ready)


class _FsdpGrads:
    """Before an updating step, hand the optimizer its parameters and gradients as local shards.

    The optimizer's params become the local shard tensors of FSDP's sharded parameters (re-resolved every
    step: FSDP may replace a local tensor, e.g. when it pads at lazy init, and states then follow); each
    sharded gradient's local shard moves onto the tensor the optimizer reads (the param for plain ones, a
    stand-in carrier for projected ones), leaving FSDP's gradient None so the next backward starts afresh.
    """

    def __init__(self, opt, slots: list[_FsdpSlot]):
        self.opt = opt
        self.slots = slots
        self.standins: dict[LowRankLinear, Tensor] = {}

    def before_step(self, opt, args, kwargs) -> None:
        self.after_step(opt, args, kwargs)
        if opt.micro_step + 1 < opt.accumulate:
            return  # this step() call only counts a micro-batch
        for slot in self.slots:
            sharded = slot.module._parameters[slot.name]
            local = sharded._local_tensor
            self._rebind(slot, local)
            source = slot.layer._parameters[CARRIER] if slot.layer is not None else sharded
            grad = None if source.grad is None else source.grad._local_tensor
            source.grad = None
            if slot.layer is None:
                local.grad = grad
            else:
                standin = source._local_tensor.detach()
                standin.grad = grad
                slot.layer.__dict__[CARRIER] = standin  # shadows the registered (sharded) carrier for the step

    def after_step(self, opt, args, kwargs) -> None:
        for slot in self.slots:
            if slot.layer is not None:
                slot.layer.__dict__.pop(CARRIER, None)

    def _rebind(self, slot: _FsdpSlot, local: Tensor) -> None:
        self.opt.rebind_param(slot.group["params"][slot.index], local)


def prepare_fsdp(model: nn.Module, opt, *, units: list[nn.Module] | tuple = (), mesh=None,
                 refresh_sync: str | None = None, **fully_shard_kwargs) -> nn.Module:
    """Shard a wrapped model with FSDP2's ``fully_shard`` and point its optimizer at the local shards.

    Args:
        model: the model given to :func:`lowrank_compile.wrap_model` (wrapped, not yet sharded).
        opt: the optimizer wrap_model returned, before its first step. fused=True is refused.
        units: submodules to shard as their own FSDP units first (e.g. the transformer blocks); the root is
            sharded last, as fully_shard requires.
        mesh: the DeviceMesh (default: fully_shard's, all processes).
        refresh_sync: as in :func:`prepare_ddp` (None keeps wrap_model's reducer, or installs "exact").
        fully_shard_kwargs: passed to every fully_shard call (reshard_after_forward, mp_policy, ...).
            shard_placement_fn is set to :func:`shard_placement` (rows or columns, so updates stay local).

    Returns the model (now an FSDPModule). What is reduce-scattered for a projected layer is its rank-r
    gradient; FSDP still all-gathers every weight in full for forward and backward.

    Example::

        opt = lowrank_compile.wrap_model(model, rank=64)
        lowrank_compile.distributed.prepare_fsdp(model, opt, units=list(model.layers))
        model(batch).loss.backward(); opt.step(); opt.zero_grad()
    """
    from torch.distributed.fsdp import fully_shard

    if opt.fused:
        raise ValueError("fused=True is not supported with FSDP2: its gradients are reduce-scattered after each "
                         "unit's backward, outside the in-backward hooks. Wrap with fused=False (or use DDP "
                         "through lowrank_compile.distributed.prepare_ddp, which supports fused=True).")
    if any(opt.state.values()):
        raise RuntimeError("prepare_fsdp must run before the optimizer's first step (its states would stay "
                           "full-size); call it right after wrap_model")
    if "shard_placement_fn" in fully_shard_kwargs:
        raise ValueError("prepare_fsdp sets shard_placement_fn itself (lowrank_compile.distributed.shard_placement)")
    group = mesh.get_group() if mesh is not None else None
    if refresh_sync is not None:
        sync_refreshes(opt, refresh_sync, group)
    elif opt.refresh_control.score_reducer is None:
        sync_refreshes(opt, DEFAULT_REFRESH_SYNC, group)
    elif group is not None:
        opt.refresh_control.score_reducer.group = group

    for layer in opt.refresh_control.layers:
        layer.materialize_carrier()  # FSDP2 shards the carriers: they need real storage
    owners = {}  # id(param) -> (module, name), found before sharding replaces the parameters
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), (module, name))
    slots = []
    for group_ in opt.param_groups:
        for i, p in enumerate(group_["params"]):
            module, name = owners[id(p)]
            slots.append(_FsdpSlot(group_, i, module, name, opt.layer_of(p) if group_["lowrank"] else None))

    placement = shard_placement(model)
    kwargs = dict(fully_shard_kwargs, shard_placement_fn=placement)
    if mesh is not None:
        kwargs["mesh"] = mesh
    for unit in units:
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)

    for layer in opt.refresh_control.layers:
        layer.register_forward_pre_hook(_hook_unsharded_carrier)
    grads = _FsdpGrads(opt, slots)
    opt.register_step_pre_hook(grads.before_step)
    opt.register_step_post_hook(grads.after_step)
    return model
