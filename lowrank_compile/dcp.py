"""Sharded checkpoints with torch.distributed.checkpoint (DCP): what makes torch's own functions work unchanged.

A user's DCP code saves and resumes a wrapped model as any other::

    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    ...
    model_sd, optim_sd = get_state_dict(model, opt)      # a fresh job: same wrapping, any number of processes
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)

torch.distributed.checkpoint.state_dict calls step(), state_dict() and load_state_dict() on the optimizer and reads
its param_groups and the parameters' requires_grad. Four things would go wrong with a LowRankAdamW; the optimizer
calls the functions below so that they do not:

1. get_state_dict keeps only "state" and "param_groups" of ``opt.state_dict()``: the global step (and whether the
   selections are per process) also rides in every param group (:func:`export_state_dict`).
2. On a fresh optimizer ``_init_optim_state`` calls ``step()`` with lr 0 to create states: recognised
   (:func:`is_state_init_step`), that call only creates zero states; the step counter, the micro-batch count, the
   refresh schedule and the sketches do not move.
3. A projected weight is ``requires_grad=False`` while wrapped (autograd hands its rank-r gradient to the carrier),
   so set_state_dict leaves its states out of what it passes to ``load_state_dict``: the loader takes them from the
   state dict set_state_dict was given (:func:`import_state_dict`). ``StateDictOptions(ignore_frozen_params=True)``
   would drop the trained weights themselves: it is refused with an error (:func:`refuse_dropping_weights`).
4. Under FSDP2 the optimizer keeps the states of local shards: ``state_dict()`` returns them as DTensors placed as
   their parameter (a projected layer's rank-r states as its carrier, whose shape and sharding they share), so DCP
   reshards them onto any number of processes; ``load_state_dict`` takes the local shards back. Quantised moments
   under FSDP2 are refused (their blocks follow the shards); DDP and one process save them as they are. Selections
   and step counts are plain tensors, the same on every process (DCP stores one copy).

Recognising torch's callers (2, 3) reads the frames of torch.distributed.checkpoint.state_dict's functions by name
(torch 2.13); tests/test_dcp.py checks every path.
"""
from __future__ import annotations

import sys

from torch import Tensor

from . import quant
from .projection import CARRIER

__all__ = ["is_state_init_step", "local_state_shape", "export_state_dict", "import_state_dict",
           "refuse_dropping_weights", "prepare_layer_for_dcp", "release_layer", "GROUP_KEYS"]

_TORCH_DSD = "torch.distributed.checkpoint.state_dict"
# What export_state_dict adds to every param group (import_state_dict removes it again):
# the global step, and the number of processes whose selections differ (refresh_sync="local"; 0: shared by all)
GLOBAL_STEP, PER_PROCESS = "global_step", "selections_per_process"
GROUP_KEYS = (GLOBAL_STEP, PER_PROCESS)


def _torch_caller(name: str, depth: int = 12) -> dict | None:
    """The local variables of torch.distributed.checkpoint.state_dict's function `name` if it is among our callers."""
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return None
        if frame.f_code.co_name == name and frame.f_globals.get("__name__") == _TORCH_DSD:
            return frame.f_locals
        frame = frame.f_back
    return None


def _dtensor_type():
    import torch.distributed as dist
    if not dist.is_available():
        return None
    from torch.distributed.tensor import DTensor
    return DTensor


def _is_dtensor(t) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if _is_dtensor(t) else t


def _world_size() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _placed_like(opt, p: Tensor) -> Tensor:
    """The tensor whose shape and sharding p's states share: p, or for a projected weight its carrier."""
    layer = opt.layers.get(p)
    return layer.lowrank_grad if layer is not None else p


def local_state_shape(opt, p: Tensor) -> tuple[int, ...]:
    """The shape of p's Adam moments on this process (under FSDP2: of the local shard)."""
    return tuple(_local(_placed_like(opt, p)).shape)


def is_state_init_step(opt) -> bool:
    """Whether this step() call is torch's ``_init_optim_state`` on an optimizer without states (all lr 0)."""
    if any(opt.state.values()) or any(float(g["lr"]) != 0.0 for g in opt.trained_groups):
        return False
    return _torch_caller("_init_optim_state") is not None


def _per_process(opt) -> int:
    """The number of processes with their own selections (refresh_sync="local" in a multi-process job), else 0."""
    world = _world_size()
    return world if world > 1 and opt.refresh_control.score_reducer is None and opt.layers else 0


def export_state_dict(opt, sd: dict) -> dict:
    """What ``opt.state_dict()`` returns: torch's dict plus the global step at the top and in every group, and
    under FSDP2 the moments as DTensors (see the module docstring). The tensors are the optimizer's own."""
    step, per_process = opt.global_step, _per_process(opt)
    sd[GLOBAL_STEP] = step
    for g in sd["param_groups"]:
        g[GLOBAL_STEP] = step
        g[PER_PROCESS] = per_process
    params = [p for g in opt.trained_groups for p in g["params"]]
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    for i, p in zip(ids, params):
        state = sd["state"].get(i)
        like = _placed_like(opt, p)
        if not state or not _is_dtensor(like):
            continue
        state = sd["state"][i] = dict(state)  # the optimizer's own state dict stays as it is
        for key in ("exp_avg", "exp_avg_sq"):
            s = state[key]
            if quant.is_quantized(s):
                # its blocks (one scale per 256 values of this process's flattened shard) follow the sharding; sent
                # by value and quantised again, a block whose largest value is negative comes back with another
                # scale (torchao's signed map ends at -0.993), so a resume would not be exact
                raise NotImplementedError(
                    f"{opt.param_names.get(p, 'a parameter')}: quantised Adam states (state_dtype "
                    f"{opt.trained_groups[0]['state_dtype']!r}) under FSDP2 cannot be saved with "
                    "torch.distributed.checkpoint yet: their quantisation blocks follow each process's shard. Use "
                    "state_dtype 'fp32' or 'bf16' with FSDP2, or DDP (which saves quantised states exactly)")
            state[key] = _dtensor_type().from_local(s, like.device_mesh, like.placements, run_check=False,
                                                    shape=like.shape, stride=like.stride())
    return sd


def _group_step(groups: list[dict]) -> int | None:
    steps = {g[GLOBAL_STEP] for g in groups if isinstance(g, dict) and GLOBAL_STEP in g}
    if len(steps) > 1:
        raise ValueError(f"the param groups of this state_dict disagree on the global step: {sorted(steps)}")
    return steps.pop() if steps else None


def _recover_dropped(opt, sd: dict) -> None:
    """Called from torch's set_state_dict: put back what it left out of `sd` (in place) from the state dict it was
    given: the states of projected weights (requires_grad=False while wrapped), and with a flattened state dict
    (StateDictOptions(flatten_optimizer_state_dict=True)) the group keys of export_state_dict. With
    full_state_dict=True the given moments are whole tensors: this process takes its shards of them (under
    broadcast_from_rank0 only process 0 has them, and sends the projected layers' states to the others)."""
    caller = _torch_caller("_load_optim_state_dict")
    if caller is None:
        return
    given, info = caller.get("state_dict"), caller.get("info")
    if not isinstance(given, dict) or info is None:
        return
    full, bcast = getattr(info, "full_state_dict", False), getattr(info, "broadcast_from_rank0", False)
    flat = "state" not in given
    recovered = {}
    for saved, group in zip(sd["param_groups"], opt.trained_groups):
        for fqn, p in zip(saved["params"], group["params"]):
            for key in GROUP_KEYS if flat else ():  # torch's unflattening keeps only the keys the live groups have
                if key not in saved and f"param_groups.{fqn}.{key}" in given:
                    saved[key] = given[f"param_groups.{fqn}.{key}"]
            if p not in opt.layers or (fqn in sd["state"] and not (full or bcast)):
                continue
            if flat:
                prefix = f"state.{fqn}."
                recovered[fqn] = {k[len(prefix):]: v for k, v in given.items() if k.startswith(prefix)}
            else:
                recovered[fqn] = given.get("state", {}).get(fqn)
    if bcast:
        import torch.distributed as dist
        box = [recovered if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        recovered = box[0]
    params = {fqn: p for saved, group in zip(sd["param_groups"], opt.trained_groups)
              for fqn, p in zip(saved["params"], group["params"])}
    for fqn, state in recovered.items():
        if state:
            like = _placed_like(opt, params[fqn])
            sd["state"][fqn] = {k: _shard_of(v, like) if k in ("exp_avg", "exp_avg_sq") and (full or bcast) else v
                                for k, v in state.items()}


def _shard_of(full: Tensor, like: Tensor) -> Tensor:
    """This process's shard of a whole tensor, placed as `like` (a DTensor), without communication."""
    if not _is_dtensor(like) or _is_dtensor(full):
        return full
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None).to_local()


def import_state_dict(opt, sd: dict) -> dict:
    """What ``load_state_dict`` loads: `sd` with the global step at the top (from the groups if only they have it),
    the group keys of export_state_dict removed, under torch's set_state_dict the projected weights' states put
    back, and DTensor moments as this process's local shards. Raises ValueError for a checkpoint whose selections
    were per process (refresh_sync="local") on another number of processes. `sd` itself is not changed."""
    if not isinstance(sd, dict) or not isinstance(sd.get("param_groups"), list) or not isinstance(
            sd.get("state"), dict):
        return sd  # check_state_dict names what is wrong
    sd = dict(sd, state=dict(sd["state"]), param_groups=[dict(g) if isinstance(g, dict) else g
                                                            for g in sd["param_groups"]])
    if len(sd["param_groups"]) == len(opt.trained_groups):
        _recover_dropped(opt, sd)
    groups = [g for g in sd["param_groups"] if isinstance(g, dict)]
    step = _group_step(groups)
    if GLOBAL_STEP not in sd and step is not None:
        sd[GLOBAL_STEP] = step
    per_process = {g.get(PER_PROCESS, 0) for g in groups}
    saved_world = max(per_process) if per_process else 0
    if saved_world and saved_world != _world_size():
        raise ValueError(
            f"this checkpoint was saved by {saved_world} processes with refresh_sync='local': every process selected "
            f"its own basis columns, so there is no one selection to place onto {_world_size()} process(es). Load it "
            f"with {saved_world} processes, or train with refresh_sync='exact' or 'cheap' (the selections are then "
            "the same on every process and the checkpoint loads onto any number)")
    for g in groups:
        for key in GROUP_KEYS:
            g.pop(key, None)
    for i, state in list(sd["state"].items()):
        if isinstance(state, dict) and any(_is_dtensor(v) for v in state.values()):
            sd["state"][i] = {k: _local(v) for k, v in state.items()}
    return sd


def prepare_layer_for_dcp(layer) -> None:
    """Called for every projected layer at wrapping. torch's DCP functions list a model's state by its parameters
    and persistent buffers, skipping the names in ``_non_persistent_buffers_set`` (for parameters too): the carrier
    goes there, so they expect the keys ``model.state_dict()`` has (no carriers; under DDP a carrier would
    otherwise be a missing key). And a state-dict hook refuses ignore_frozen_params=True
    (:func:`refuse_dropping_weights`). ``unwrap_model`` undoes both."""
    layer._non_persistent_buffers_set.add(CARRIER)
    layer._lowrank_dcp_hook = layer._register_state_dict_hook(refuse_dropping_weights)


def release_layer(layer) -> None:
    """Undo :func:`prepare_layer_for_dcp` (unwrap_model)."""
    layer._non_persistent_buffers_set.discard(CARRIER)
    handle = layer.__dict__.pop("_lowrank_dcp_hook", None)
    if handle is not None:
        handle.remove()


def refuse_dropping_weights(module, state_dict, prefix, local_metadata) -> None:
    """A state-dict hook of every projected layer: refuse get_state_dict(..., StateDictOptions(
    ignore_frozen_params=True)), which would drop the layer's trained weight (frozen only while wrapped)."""
    caller = _torch_caller("_get_model_state_dict", depth=40)
    info = caller.get("info") if caller is not None else None
    if info is not None and getattr(info, "ignore_frozen_params", False) and hasattr(module, "lowrank_spec"):
        raise ValueError(
            f"StateDictOptions(ignore_frozen_params=True) would leave out {prefix}weight: lowrank_compile marks a "
            "projected weight requires_grad=False only so that autograd hands its rank-r gradient to the optimizer, "
            "which trains it. Use ignore_frozen_params=False (the default), or drop the truly frozen parameters "
            "from the returned state dict by name")
