"""save_optimizer / load_optimizer: a LowRankAdamW as one safetensors file, validated before it is loaded.

The file holds flat tensors and string metadata only (no pickle), so reading it executes nothing:

- per parameter ``{name}.step`` (the fp32 step count torch keeps), ``{name}.exp_avg`` and
  ``{name}.exp_avg_sq`` (plain states), or their torchao parts ``{name}.exp_avg.codes`` / ``.scale``
  (quantised states; the code maps are library constants), and for a projected layer its selected
  ``{name}.indices`` in the smallest integer dtype that holds the basis size (or ``{name}.basis``, the
  (n, r) fp32 basis of basis="svd"). ``name`` is the parameter's fqn in the wrapped model.
- metadata: ``format``, ``format_version``, ``meta`` (JSON: global step, state_dtype, configuration,
  every param group's hyper-parameters, and the per-parameter list with shape, side, rank, basis size and
  storage kind) and ``checksum``, a sha256 over the metadata and every tensor's name, dtype, shape and bytes.

Stochastic rounding needs no saved generator: its bits follow from the seed (a param-group value) and the
step counters (see quant.py). The write is atomic (temporary file in the same directory, fsync, rename); the
temporary is named ``.{target}.{host}-{pid}.{random}.tmp``, so a later save of the same target removes one
whose writer died (a killed process) or that has not been written to for :data:`TEMP_MAX_AGE_S` seconds.

Loading decides in stages, and changes nothing until every stage has passed:

1. the header, before any tensor data is read: its length (bounded by what this optimizer's checkpoint can
   need), its JSON structure, its entry count, the tiling of the data region, format and version, the metadata
   against the optimizer (configuration, parameters, shapes, storage, every tensor's name, dtype and shape),
   the hyper-parameters with wrap_model's rules, the global step;
2. the data: the checksum, then the values (finite moments, a non-negative second moment, integer step counts,
   distinct in-range indices);
3. then everything is applied at once, copied into the existing state tensors where their shape and storage
   match (their addresses stay, e.g. for CUDA graphs).

This module is the front door: saving (flattening the optimizer's states) and loading (running the stages in
order, then applying). The safetensors container (bounded header reading, structural checks, checksum, atomic
write, stale temporaries) is checkpoint_file.py; what a checkpoint of a given optimizer must hold, and the
checks of stages 1 and 2 against it, are checkpoint_check.py.
"""
from __future__ import annotations

import json
import os

import safetensors
import torch
from torch import Tensor

from . import _torchao, quant
from .checkpoint_check import (check_global_step, check_header, check_values, header_bounds, index_dtype,
                               layer_entries, param_names, restored_groups)
from .checkpoint_file import TEMP_MAX_AGE_S  # noqa: F401  (named in the docstring above)
from .checkpoint_file import (FORMAT, FORMAT_VERSION, CheckpointError, checksum, read_checked_header, read_header,
                              read_tensors, read_verified, write_atomic)
from .checkpoint_file import _host_tag, _temp_prefix  # noqa: F401  (the tests name temporaries with these)
from .optimizer import LowRankAdamW

__all__ = ["save_optimizer", "load_optimizer", "CheckpointError", "FORMAT", "FORMAT_VERSION", "read_header",
           "index_dtype"]

# Names from before the split, still importable from here: inspect.py reads a file with _read_verified, and the
# tests forge a checksum with _checksum.
_checksum, _read_verified = checksum, read_verified


# -- saving ---------------------------------------------------------------------------------------------------
def save_optimizer(opt, path: str | os.PathLike) -> None:
    """Write the complete state of a LowRankAdamW (made by wrap_model) to one safetensors file at `path`.

    Holds everything a resume needs: Adam states (quantised codes and scales as stored), step counters,
    selected indices, hyper-parameters of every param group (lr as a scheduler left it) and the global step.
    The file is replaced atomically: a crash mid-save leaves the previous file intact.

    Example::

        lowrank_compile.save_optimizer(opt, "opt.safetensors")
        safetensors.torch.save_file(model.state_dict(), "model.safetensors")
    """
    _require_optimizer(opt, "save_optimizer")
    if opt.micro_step:
        raise RuntimeError("save_optimizer was called between the micro-batches of an accumulated step; save "
                           "after the step() that applies the update")
    tensors, meta = _flatten(opt)
    header = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
              "meta": json.dumps(meta, sort_keys=True, separators=(",", ":"))}
    header["checksum"] = checksum(header, tensors)
    write_atomic(tensors, header, os.fspath(path))


def _require_optimizer(opt, caller: str) -> None:
    """TypeError unless `opt` is a LowRankAdamW, saying what it is and what to pass instead; RuntimeError for one
    whose states are sharded (FSDP2), which one process's file cannot hold."""
    if isinstance(opt, LowRankAdamW):
        if any(hasattr(p, "device_mesh") for g in opt.trained_groups for p in g["params"]):
            raise RuntimeError(
                f"{caller}: this optimizer's model is sharded by FSDP2, so each process holds only its shards of "
                "the states; one safetensors file of one process cannot hold them. Save and load sharded "
                "checkpoints with torch.distributed.checkpoint: get_state_dict(model, opt) + dcp.save, and dcp.load "
                "+ set_state_dict (docs/DISTRIBUTED.md, 'Checkpoints'); a DCP checkpoint also loads into one process")
        return
    cls = type(opt)
    got = f"{cls.__module__}.{cls.__qualname__}"
    if isinstance(opt, torch.nn.Module):
        hint = ("; that is a model: pass the optimizer that lowrank_compile.wrap_model(model, ...) returned for it")
    elif isinstance(getattr(opt, "optimizer", None), LowRankAdamW):
        hint = ("; it wraps one (as accelerate's AcceleratedOptimizer does): pass its .optimizer, or "
                "lowrank_compile.hf.lowrank_optimizer(opt)")
    elif isinstance(opt, torch.optim.Optimizer):
        hint = ("; a torch optimizer's checkpoint is torch.save(opt.state_dict()); this file format is for the "
                "optimizer that lowrank_compile.wrap_model returns")
    else:
        hint = ""
    raise TypeError(f"{caller} expects the optimizer returned by lowrank_compile.wrap_model (a "
                    f"lowrank_compile.LowRankAdamW), got {got}{hint}")


def _json_value(v, what: str):
    if isinstance(v, Tensor):
        if v.numel() != 1:
            raise TypeError(f"cannot save {what}: a tensor of shape {tuple(v.shape)}")
        return {"tensor": v.item()}
    if isinstance(v, (tuple, list)):
        return [_json_value(x, what) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"cannot save {what} = {v!r} ({type(v).__name__}) in a checkpoint; only numbers, strings "
                    "and tuples of them are supported")


def _flatten(opt) -> tuple[dict[str, Tensor], dict]:
    entries = layer_entries(opt)
    params = [p for g in opt.trained_groups for p in g["params"]]
    tensors: dict[str, Tensor] = {}
    for entry, p in zip(entries, params):
        state = opt.state.get(p) or {}
        entry["has_state"] = bool(state)
        if state:
            own = _state_tensors(entry, state)
            entry["tensors"] = sorted(own)
            tensors.update(own)
    meta = {
        "format_version": FORMAT_VERSION,
        "global_step": opt.global_step,
        "state_dtype": opt.config.state_dtype,
        "config": {k: _json_value(v, f"config.{k}") for k, v in opt.config.saved_items().items()},
        "update_gap": opt.config.update_gap,
        "param_groups": [{k: _json_value(v, f"param_groups[{gi}][{k!r}]") for k, v in group.items() if k != "params"}
                         for gi, group in enumerate(opt.trained_groups)],
        "layers": entries,
        "versions": {"torch": torch.__version__, "torchao": _torchao.torchao_version,
                     "safetensors": safetensors.__version__},
    }
    return tensors, meta


def _state_tensors(entry: dict, state: dict) -> dict[str, Tensor]:
    """The CPU tensors that store one parameter's state, by their names in the file."""
    name = entry["name"]
    unknown = set(state) - {"step", "exp_avg", "exp_avg_sq", "indices", "basis"}
    if unknown:
        raise RuntimeError(f"cannot save {name}: unknown optimizer state {sorted(unknown)}")
    kinds = (quant.kind_of(state["exp_avg"]), quant.kind_of(state["exp_avg_sq"]))
    if kinds != (entry["state_dtype"],) * 2:
        raise RuntimeError(f"{name}: its states are stored as {kinds}, not {entry['state_dtype']} as its group's "
                           "state_dtype says")
    out = {f"{name}.step": state["step"].detach().to("cpu", torch.float32).reshape(())}
    for key in ("exp_avg", "exp_avg_sq"):
        for part, t in quant.state_parts(state[key]).items():
            out[f"{name}.{key}" + (f".{part}" if part else "")] = t.detach().cpu()
    if "indices" in state:
        out[f"{name}.indices"] = state["indices"].detach().cpu().to(index_dtype(entry["basis_size"]))
    if "basis" in state:
        out[f"{name}.basis"] = state["basis"].detach().cpu()
    return {k: t.contiguous() for k, t in out.items()}


# -- loading ---------------------------------------------------------------------------------------------------
def load_optimizer(opt, path: str | os.PathLike) -> None:
    """Load a file written by :func:`save_optimizer` into `opt`, made by wrap_model on the same model.

    Everything is checked before the optimizer is touched: format and version, truncation, the checksum,
    state_dtype and configuration, the list of parameters and each one's shape, side, rank and storage, and
    every tensor's shape and dtype; the restored hyper-parameters with wrap_model's rules, the global step, and
    the states' values (finite moments, a second moment >= 0, integer step counts, distinct in-range indices).
    Any difference raises :class:`CheckpointError` naming it, and leaves `opt` (and its model's layers)
    bitwise as they were. Hyper-parameters (lr as a scheduler left it, betas, weight decay, the rounding seed)
    are restored from the file, as torch.optim's load_state_dict does. States are copied into the existing
    state tensors where their shape and storage match (new ones are made on each parameter's device
    otherwise), so a checkpoint saved on CPU loads on a GPU. Nothing is unpickled.

    Raises TypeError if `opt` is not the optimizer wrap_model returns, and RuntimeError between the
    micro-batches of an accumulated step (as save_optimizer does).

    Example::

        opt = lowrank_compile.wrap_model(model, rank=16, state_dtype="int8")
        lowrank_compile.load_optimizer(opt, "opt.safetensors")
    """
    _require_optimizer(opt, "load_optimizer")
    if opt.micro_step:
        raise RuntimeError(f"load_optimizer was called between the micro-batches of an accumulated step "
                           f"({opt.micro_step} of accumulate={opt.accumulate} taken); load before the first "
                           "micro-batch or after the step() that applies the update")
    path = os.fspath(path)
    entries = layer_entries(opt)
    here = {e["name"]: e for e in entries}
    max_bytes, max_entries = header_bounds(entries, len(opt.trained_groups))
    # 1. the header: everything that can be decided without reading tensor data
    header, metadata, meta = read_checked_header(path, max_bytes, max_entries)
    expected = check_header(opt, meta, header, entries)
    hyper = restored_groups(opt, meta["param_groups"])
    global_step = check_global_step(meta)
    # 2. the data
    tensors = read_tensors(path, metadata)
    check_values(tensors, expected, here)
    # 3. what each parameter's state becomes; new tensors made here, so that applying it cannot fail half-way
    names = param_names(opt)
    params = [p for g in opt.trained_groups for p in g["params"]]
    saved = {e["name"]: e for e in meta["layers"]}
    plans = {p: _state_plan(opt.state.get(p), here[name], tensors, p.device)
             for name, p in zip(names, params) if saved[name]["has_state"]}

    # Validated and built: from here on nothing can fail half-way.
    for p in params:
        if p not in plans:
            opt.state.pop(p, None)
    for p, plan in plans.items():
        _apply_plan(opt.state, p, plan)
    for group, values in zip(opt.trained_groups, hyper):
        for k, v in values.items():
            if isinstance(group.get(k), Tensor):
                group[k].fill_(v.item() if isinstance(v, Tensor) else v)
            else:
                group[k] = v
    opt.restore_after_load(global_step)


def _state_plan(current: dict | None, e: dict, tensors: dict[str, Tensor], device) -> dict:
    """What one parameter's state becomes: per key, ("copy", [(dst, src), ...]) into a current tensor of the same
    shape and storage, or ("new", tensor)."""
    current = current or {}
    name = e["name"]
    plan = {}
    step = tensors[f"{name}.step"]
    old = current.get("step")
    if isinstance(old, Tensor) and old.shape == step.shape and old.dtype == step.dtype:
        plan["step"] = ("copy", [(old, step)])
    else:
        plan["step"] = ("new", step.clone())
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        specs = quant.part_specs(e["state_shape"], e["state_dtype"])
        parts = {part: tensors[f"{name}.{key}" + (f".{part}" if part else "")] for part in specs}
        old = current.get(key)
        pairs = _matching_parts(old, e, parts, signed)
        if pairs is not None:
            plan[key] = ("copy", pairs)
        else:
            plan[key] = ("new", quant.state_from_parts(e["state_shape"], e["state_dtype"], parts, signed=signed,
                                                       device=device))
    if e["projected"]:
        key = "basis" if e["basis"] == "svd" else "indices"
        src = tensors[f"{name}.{key}"]
        dtype = torch.float32 if key == "basis" else torch.int64
        old = current.get(key)
        if isinstance(old, Tensor) and old.shape == src.shape and old.dtype == dtype:
            plan[key] = ("copy", [(old, src)])
        else:
            plan[key] = ("new", src.to(device=device, dtype=dtype, copy=True))
    return plan


def _matching_parts(old, e: dict, parts: dict[str, Tensor], signed: bool):
    """[(current part, loaded part)] if the current state `old` has the storage the checkpoint describes, else None."""
    if not isinstance(old, Tensor) or tuple(old.shape) != tuple(e["state_shape"]):
        return None
    try:
        if quant.kind_of(old) != e["state_dtype"]:
            return None
    except TypeError:
        return None
    if getattr(old, "signed", signed) != signed:  # torchao's int8 / int4 code maps differ by sign
        return None
    current = quant.state_parts(old)
    if current.keys() != parts.keys():
        return None
    pairs = []
    for part, src in parts.items():
        dst = current[part]
        if dst.shape != src.shape or dst.dtype != src.dtype:
            return None
        pairs.append((dst, src))
    return pairs


def _apply_plan(states, p: Tensor, plan: dict) -> None:
    state = states[p]  # opt.state is a defaultdict: a parameter without state gets an empty dict here
    for key in [k for k in state if k not in plan]:
        del state[key]
    for key, (how, value) in plan.items():
        if how == "copy":
            for dst, src in value:
                dst.copy_(src)
        else:
            state[key] = value

