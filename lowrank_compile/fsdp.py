"""FSDP2 (``fully_shard``) for a wrapped model: :func:`prepare_fsdp` and :func:`shard_placement`.

Every update stays local to a shard: right-projected layers shard rows, left-projected ones columns
(:func:`shard_placement`). After sharding, the optimizer's parameters are pointed at the local shards
before each updating step and the reduce-scattered gradients moved onto the tensors it reads, and back at
FSDP's sharded parameters after it, as torch.distributed.checkpoint expects (:class:`_FsdpGrads`); the refresh bookkeeping hook is put on FSDP's unsharded carrier, which is what
autograd sees. fused=True is refused: FSDP2 reduce-scatters after each unit's backward, outside the
in-backward hooks. :func:`release_layer` undoes what prepare_fsdp did to a layer, for ``unwrap_model``.
"""
from __future__ import annotations

import dataclasses
import weakref
from typing import Callable

import torch
from torch import nn

from .projection import CARRIER, LowRankLinear
from .refresh_sync import join_group

__all__ = ["shard_placement", "prepare_fsdp", "release_layer"]


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


# layer -> ids of the unsharded carriers that have its bookkeeping hook (kept here, not on the layer). Not a
# WeakSet of carriers: its membership test compares a carrier with itself by Tensor.__eq__, which raises.
_HOOKED: weakref.WeakKeyDictionary[LowRankLinear, set[int]] = weakref.WeakKeyDictionary()
# layer -> the handle of its _hook_unsharded_carrier forward pre-hook (release_layer removes it)
_PRE_HOOKS: weakref.WeakKeyDictionary[LowRankLinear, object] = weakref.WeakKeyDictionary()


def _hook_unsharded_carrier(layer: LowRankLinear, args) -> None:
    """Forward pre-hook, after FSDP's unshard: the refresh bookkeeping hook on the carrier autograd sees."""
    carrier = layer._parameters[CARRIER]
    hooked = _HOOKED.setdefault(layer, set())
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

    def _unwrapped(self) -> bool:
        return any(slot.layer is not None and not isinstance(slot.layer, LowRankLinear) for slot in self.slots)

    def before_step(self, opt, args, kwargs) -> None:
        if hasattr(opt, "grad_scale") or hasattr(opt, "found_inf"):  # torch.amp.GradScaler.step is calling
            raise RuntimeError(
                "torch.amp.GradScaler with prepare_fsdp (FSDP2) is not supported: the rank-r gradients live in "
                "sharded carriers whose infs each process would see only for its own shard. Train in bf16 (no "
                "scaler) under FSDP2, or use prepare_ddp with fp16 and a GradScaler.")
        if self._unwrapped():
            return  # unwrap_model ran: step() itself refuses
        self.after_step(opt, args, kwargs)
        if opt.micro_step + 1 < opt.accumulate:
            return  # this step() call only counts a micro-batch
        for slot in self.slots:
            sharded = slot.module._parameters[slot.name]
            local = sharded._local_tensor
            self.opt.rebind_param(slot.group["params"][slot.index], local)
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
        """Between steps the optimizer holds FSDP's sharded parameters (DTensors) again, as torch's
        get_state_dict / set_state_dict expect (they name states by the model's parameters); its states stay
        those of the local shards (dcp.py returns them as DTensors from state_dict())."""
        if self._unwrapped():
            return
        for slot in self.slots:
            if slot.layer is not None:
                slot.layer.__dict__.pop(CARRIER, None)
            self.opt.rebind_param(slot.group["params"][slot.index], slot.module._parameters[slot.name])


def _slots(model: nn.Module, opt) -> list[_FsdpSlot]:
    """Every optimizer parameter's module and name, found before sharding replaces the parameters."""
    owners = {}  # id(param) -> (module, name)
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), (module, name))
    slots = []
    for group in opt.trained_groups:
        for i, p in enumerate(group["params"]):
            module, name = owners[id(p)]
            slots.append(_FsdpSlot(group, i, module, name, opt.layer_of(p) if group["lowrank"] else None))
    return slots


def _refresh_group(mesh):
    """The process group whose processes must agree on refreshes: every process of the mesh. A 2-D (HSDP) mesh,
    replicate x shard, trains one model on all of its processes, so they all agree, not only a shard group."""
    if mesh is None:
        return None
    if mesh.ndim == 1:
        return mesh.get_group()
    import torch.distributed as dist
    if mesh.size() == dist.get_world_size():
        return None  # WORLD
    return dist.new_group(sorted(mesh.mesh.flatten().tolist()))  # every process calls prepare_fsdp


def prepare_fsdp(model: nn.Module, opt, *, units: list[nn.Module] | tuple = (), mesh=None,
                 refresh_sync: str | None = None, **fully_shard_kwargs) -> nn.Module:
    """Shard a wrapped model with FSDP2's ``fully_shard`` and point its optimizer at the local shards.

    Args:
        model: the model given to :func:`lowrank_compile.wrap_model` (wrapped, not yet sharded).
        opt: the optimizer wrap_model returned, before its first step. fused=True is refused.
        units: submodules to shard as their own FSDP units first (e.g. the transformer blocks); the root is
            sharded last, as fully_shard requires.
        mesh: the DeviceMesh (default: fully_shard's, all processes); a 2-D mesh (replicate, shard) is HSDP:
            the processes of the whole mesh agree on refreshes.
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
    int8 = [opt.param_names.get(w, "a projected weight") for w, layer in opt.layers.items() if layer.is_int8]
    if int8:  # before anything (carriers, reducers, fully_shard) touches the model
        raise NotImplementedError(
            f"{len(int8)} projected weight(s) ({', '.join(int8[:3])}{', ...' if len(int8) > 3 else ''}) are stored "
            "as int8 (weight_dtype='int8'), which FSDP2 cannot shard: their block scales would not follow the "
            "shards. Use weight_dtype=None with prepare_fsdp, or prepare_ddp (replicated int8 weights stay "
            "identical: their rounding is seeded). The model and optimizer are unchanged.")
    if any(opt.state.values()):
        raise RuntimeError("prepare_fsdp must run before the optimizer's first step (its states would stay "
                           "full-size); call it right after wrap_model")
    if "shard_placement_fn" in fully_shard_kwargs:
        raise ValueError("prepare_fsdp sets shard_placement_fn itself (lowrank_compile.distributed.shard_placement)")
    control = join_group(opt, refresh_sync, _refresh_group(mesh))
    slots = _slots(model, opt)

    kwargs = dict(fully_shard_kwargs, shard_placement_fn=shard_placement(model))
    if mesh is not None:
        kwargs["mesh"] = mesh
    for unit in units:
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)

    for layer in control.layers:
        _PRE_HOOKS[layer] = layer.register_forward_pre_hook(_hook_unsharded_carrier)
    grads = _FsdpGrads(opt, slots)
    grads.after_step(opt, (), {})  # the optimizer holds the sharded parameters from now on
    opt.register_step_pre_hook(grads.before_step)
    opt.register_step_post_hook(grads.after_step)
    return model


def release_layer(model: nn.Module, layer: LowRankLinear) -> None:
    """Undo prepare_fsdp for one projected layer of `model` before ``unwrap_model`` turns it back into nn.Linear:
    remove the carrier hook and take the carrier out of the FSDP2 unit that manages it, so FSDP no longer
    all-gathers it nor puts it back on the layer at each reshard. The weight stays an FSDP-managed sharded
    parameter; FSDP gives its unsharded parameter the sharded one's requires_grad at the next all-gather.

    FSDP2 has no public way to drop a parameter from a unit: this edits the unit's list of managed parameters
    (``FSDPParamGroup.fsdp_params``, torch 2.13), between steps, when every parameter is sharded; a torch whose
    FSDP2 lacks these names raises RuntimeError instead of leaving the carrier half-managed.
    """
    from torch.distributed.fsdp import FSDPModule

    handle = _PRE_HOOKS.pop(layer, None)
    if handle is not None:
        handle.remove()
    _HOOKED.pop(layer, None)
    for unit in model.modules():
        if not isinstance(unit, FSDPModule):
            continue
        groups = getattr(unit._get_fsdp_state(), "_fsdp_param_groups", None)
        if groups is None:
            raise RuntimeError("unwrap_model after prepare_fsdp: this torch's FSDP2 has no _fsdp_param_groups "
                               f"(written for torch 2.13, running {torch.__version__}), so the rank-r carriers "
                               "cannot be taken out of it. Load a DCP checkpoint into an unwrapped model instead "
                               "(docs/DISTRIBUTED.md, 'Checkpoints')")
        for group in groups:
            group.fsdp_params = [fp for fp in group.fsdp_params
                                 if not (fp._module_info.module is layer and fp._module_info.param_name == CARRIER)]
