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
   reshards them onto any number of processes; ``load_state_dict`` takes the local shards back. A quantised moment
   is the DTensor of this process's torchao state itself, so DCP writes its codes and scales, never re-quantised
   values: a resume on the same number of processes is bit-exact. Resharding goes through torchao's own row
   slicing: exact for row-sharded states (right-projected layers, plain parameters) when every old and new shard
   boundary is a quantisation-block boundary; column-sharded ones (left-projected layers) load only onto the
   number of processes that wrote them. Selections and step counts are plain tensors, the same on every process
   (DCP stores one copy).

Recognising torch's callers: the lr-0 step (2) by what it does (:func:`is_state_init_step`); set_state_dict's given
state dict (3) and get_state_dict's options only reach us through the frames of torch's functions, read by name
(:func:`_torch_caller`, torch 2.13), which raises a clear error on a torch whose functions differ.
"""
from __future__ import annotations

import functools
import sys

from torch import Tensor

from .projection import CARRIER

__all__ = ["is_state_init_step", "local_state_shape", "export_state_dict", "import_state_dict",
           "refuse_dropping_weights", "prepare_layer_for_dcp", "release_layer", "GROUP_KEYS"]

_TORCH_DSD = "torch.distributed.checkpoint.state_dict"
# What export_state_dict adds to every param group (import_state_dict removes it again):
# the global step, and the number of processes whose selections differ (refresh_sync="local"; 0: shared by all)
GLOBAL_STEP, PER_PROCESS = "global_step", "selections_per_process"
GROUP_KEYS = (GLOBAL_STEP, PER_PROCESS)


# The functions of torch.distributed.checkpoint.state_dict whose locals _torch_caller reads, with the names it reads
_TORCH_LOCALS = {"_load_optim_state_dict": ("state_dict", "info"), "_get_model_state_dict": ("info",)}


@functools.cache
def _check_torch_internals() -> None:
    """Raise RuntimeError if torch.distributed.checkpoint.state_dict lacks the functions (and their local names)
    that _torch_caller looks for: a torch that renamed them would otherwise make those look-ups find nothing, and a
    resume would silently leave the projected layers' states out."""
    import importlib
    import inspect

    module = importlib.import_module(_TORCH_DSD)
    for name, local_names in _TORCH_LOCALS.items():
        code = getattr(inspect.unwrap(getattr(module, name, None) or (lambda: None)), "__code__", None)
        if code is None or code.co_name != name or not set(local_names) <= set(code.co_varnames):
            import torch
            raise RuntimeError(
                f"lowrank_compile's support for torch.distributed.checkpoint was written for torch 2.13, whose "
                f"{_TORCH_DSD}.{name} has the locals {local_names}; torch {torch.__version__} does not, so "
                "get_state_dict / set_state_dict cannot be served correctly. Use lowrank_compile.save_optimizer / "
                "load_optimizer (one process, DDP), or a torch version lowrank_compile supports")


def _torch_caller(name: str, depth: int = 12) -> dict | None:
    """The local variables of torch.distributed.checkpoint.state_dict's function `name` if it is among our callers.

    Frame inspection, because what these callers know (set_state_dict's given state dict before torch filters it,
    get_state_dict's StateDictOptions) reaches the optimizer and the model's state-dict hooks by no other way.
    :func:`_check_torch_internals` makes a torch that changed these functions an error, not a silent miss."""
    _check_torch_internals()
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
    """Whether this step() call is torch's ``_init_optim_state``, recognised by what it does, not by who calls: on an
    optimizer that has never stepped (no state, step counter and micro-batch count 0) every lr is 0 and every
    parameter that requires grad holds a gradient of zeros (torch sets them with zeros_like; a projected weight's
    carrier gets none, as no backward ran). A user's step matching all of this would not change any weight either;
    it is taken as the same request: create the states, count nothing."""
    if any(opt.state.values()) or opt.global_step or opt.micro_step:
        return False
    if any(float(g["lr"]) != 0.0 for g in opt.trained_groups):
        return False
    grads = [p.grad for g in opt.param_groups for p in g["params"] if p.requires_grad]
    return all(g is not None and not _local(g).any() for g in grads)


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
            state[key] = _dtensor_type().from_local(state[key], like.device_mesh, like.placements, run_check=False,
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


def _refuse_dropped_projected_states(opt, sd: dict) -> None:
    """Raise ValueError for a state dict of a trained optimizer that holds states for plain parameters but for no
    projected weight: what torch's set_state_dict passes on when _recover_dropped did not recognise it (a trained
    LowRankAdamW has states for every projected layer that ever had a gradient). Loading it would silently restart
    every layer's selection and moments."""
    if not isinstance(sd.get(GLOBAL_STEP), int) or sd[GLOBAL_STEP] == 0:
        return
    has = {True: False, False: False}
    for saved, group in zip(sd["param_groups"], opt.trained_groups):
        if not isinstance(saved, dict):
            return
        for i, p in zip(saved.get("params", ()), group["params"]):
            if sd["state"].get(i):
                has[p in opt.layers] = True
    if has[False] and not has[True] and opt.layers:
        raise ValueError(
            "this optimizer state dict has states for the plain parameters but none for the projected weights, as "
            "torch's set_state_dict passes it on (a projected weight is requires_grad=False while wrapped); "
            "lowrank_compile did not find the state dict set_state_dict was given, so it cannot put them back. Call "
            "opt.load_state_dict with the whole state dict, or use the torch version lowrank_compile supports")


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
    _refuse_dropped_projected_states(opt, sd)
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
