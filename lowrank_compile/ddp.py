"""DistributedDataParallel for a wrapped model: :func:`prepare_ddp`, fused updates per bucket, comm counting.

:func:`prepare_ddp` builds the DDP module, keeps the layers' index buffers and int8 scales out of DDP's
per-step buffer broadcast, and with ``fused=True`` moves the in-backward updates into a DDP communication hook, so each
bucket's parameters are updated as soon as that bucket's all-reduce has finished. The in-backward hooks
alone would update from un-reduced gradients, so until prepare_ddp takes them over a fused optimizer in a
multi-process job runs :func:`refuse_unreduced_updates`' guard instead (wrap_model installs it).
:class:`CommCounter` with :func:`counting_allreduce_hook` counts what DDP all-reduces.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .projection import INDEX, SCALE, SVD_BASIS, LowRankLinear
from .refresh_sync import join_group

__all__ = ["prepare_ddp", "CommCounter", "counting_allreduce_hook", "refuse_unreduced_updates"]


def _hook_targets(opt) -> list[tuple[Tensor, Tensor]]:
    """(tensor that receives the gradient, optimizer param) for every param of a LowRankAdamW."""
    return [(opt.layer_of(p).lowrank_grad if group["lowrank"] else p, p)
            for group in opt.trained_groups for p in group["params"]]


def _remove_update_hooks(opt) -> None:
    """Remove the fused optimizer's in-backward updates (or the guard that replaced them)."""
    control = opt.refresh_control
    for handle in control.hooks:
        handle.remove()
    control.hooks.clear()


_FUSED_ERROR = (
    "fused=True in a multi-process job: the in-backward update would use this process's gradient before "
    "DistributedDataParallel has reduced it. Build the DDP module with "
    "lowrank_compile.distributed.prepare_ddp(model, opt), which runs each update after its bucket's "
    "all-reduce, or wrap with fused=False (FSDP2 supports fused=False only)."
)


def _refuse_unreduced_update(_grad_holder: Tensor) -> None:
    raise RuntimeError(_FUSED_ERROR)


def refuse_unreduced_updates(opt) -> None:
    """Replace a fused optimizer's in-backward updates by a guard that raises until prepare_ddp takes over."""
    _remove_update_hooks(opt)
    opt.refresh_control.hooks[:] = [target.register_post_accumulate_grad_hook(_refuse_unreduced_update)
                                    for target, _ in _hook_targets(opt)]


def _own_buffers(model: nn.Module) -> dict[str, Tensor]:
    """fqn -> buffer of the projected layers' own buffers, identical on every process by construction: the index
    buffers (or svd bases), changed only by refreshes the processes agree on, and an int8 weight's block scales,
    changed only by the seeded write-back."""
    return {f"{fqn}.{name}" if fqn else name: buf for fqn, m in model.named_modules() if isinstance(m, LowRankLinear)
            for name, buf in m.named_buffers(recurse=False) if name in (INDEX, SVD_BASIS, SCALE)}


def _sync_scales(model: nn.Module, group, ddp_kwargs: dict) -> None:
    """Broadcast the int8 block scales from the group's first process once, as DistributedDataParallel does at
    construction for the codes (parameters) it syncs: ignored buffers are left out of that sync too."""
    scales = [buf for name, buf in _own_buffers(model).items() if name.rsplit(".", 1)[-1] == SCALE]
    if scales and ddp_kwargs.get("init_sync", True) and dist.get_world_size(group) > 1:
        for scale in scales:
            dist.broadcast(scale, group=group, group_src=0)


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


def _clear_stale_grads(module, args, *, opt) -> None:
    """fused DDP: gradients of the last step stay in DDP's buckets until the next step's first forward."""
    if torch.is_grad_enabled() and opt.micro_step == 0:
        opt.zero_grad(set_to_none=True)


def prepare_ddp(model: nn.Module, opt, *, refresh_sync: str | None = None, comm_hook: Callable | None = None,
                comm_hook_state: object = None, **ddp_kwargs) -> nn.parallel.DistributedDataParallel:
    """Wrap `model` (already wrapped by :func:`lowrank_compile.wrap_model`) in DistributedDataParallel.

    - The layers' index buffers and int8 block scales (identical on every process by construction) are kept out
      of DDP's buffer broadcast, which would otherwise send them before every forward (the scales are broadcast
      once here instead, as DDP does at construction for the int8 codes). Other buffers are broadcast as usual.
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

    group = ddp_kwargs.get("process_group")
    join_group(opt, refresh_sync, group)
    _sync_scales(model, group, ddp_kwargs)
    ignored = list(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    ignored += [name for name in _own_buffers(model) if name not in ignored]
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
    _remove_update_hooks(opt)  # the in-backward updates (or wrap_model's guard): replaced by the comm hook
    state = _FusedState(opt, comm_hook, comm_hook_state)
    for target, p in _hook_targets(opt):
        state.owners[target] = p
    ddp.register_comm_hook(state, _fused_update_hook)
    ddp.register_forward_pre_hook(functools.partial(_clear_stale_grads, opt=opt))
    return ddp


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
