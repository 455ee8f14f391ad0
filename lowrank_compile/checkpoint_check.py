"""What a checkpoint of a LowRankAdamW must hold, and whether a given one does (checks, no changes).

- describing the optimizer: one entry per parameter (:func:`layer_entries`: name, group, shape, projection,
  state shape and storage), the tensors its checkpoint holds (their names, shapes and dtypes, indices in
  :func:`index_dtype`), and the header bounds that a checkpoint loaded into it can need (:func:`header_bounds`);
- checking a checkpoint's header against it (:func:`check_header`: state_dtype, configuration, param groups'
  structure, the parameter list, every tensor's name, dtype and shape), its hyper-parameters with wrap_model's
  rules (:func:`restored_groups`), its global step, and its values (:func:`check_values`: finite moments, a
  non-negative second moment, integer step counts, distinct in-range indices).

Every check raises CheckpointError naming every problem it finds. The optimizer is read through its public
interface only; the file itself is checkpoint_file.py's job.
"""
from __future__ import annotations

import dataclasses
import math
import numbers

import torch
from torch import Tensor

from . import quant
from .checkpoint_file import MAX_HEADER, CheckpointError, brief
from .state_check import hyper_problem, is_step_count, valid_indices

__all__ = ["index_dtype", "param_names", "layer_entries", "header_bounds", "check_header", "check_global_step",
           "check_values", "restored_groups"]

# What one parameter can add to the header of a checkpoint that load_optimizer reads (its entry in the metadata,
# the names of its up to 6 tensors there and in the safetensors header, with their dtypes, shapes and offsets,
# JSON-escaped), as a fixed part and a part per character of its name; plus a fixed part for the rest (config,
# versions, checksum) and one per param group. Generous: real headers measure about 400 bytes plus 14 per name
# character a parameter.
_HEADER_BASE, _HEADER_PER_PARAM, _HEADER_PER_NAME_CHAR, _HEADER_PER_GROUP = 1 << 20, 2048, 32, 4096
_MAX_TENSORS_PER_PARAM = 6  # step, exp_avg and exp_avg_sq (codes and scale each), indices or basis
# Param-group entries that define what the states mean: compared on load, never overwritten.
_STRUCTURAL_GROUP_KEYS = ("lowrank", "state_dtype", "state_policy")
_CONFIG_KEYS = ("basis", "norm", "state_policy")  # state_dtype and update_gap are compared on their own
# Param-group hyper-parameters that must be finite numbers (wrap_model's rules, in config.py, apply as well).
_FINITE_GROUP_KEYS = ("lr", "eps", "weight_decay", "scale")
# The names safetensors gives the torch dtypes a checkpoint holds.
_ST_NAME = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32",
            torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
            torch.float64: "F64"}
if hasattr(torch, "float8_e4m3fn"):
    _ST_NAME[torch.float8_e4m3fn] = "F8_E4M3"


# -- what this optimizer's checkpoint holds --------------------------------------------------------------------
def index_dtype(basis_size: int) -> torch.dtype:
    """The smallest integer dtype holding indices 0 .. basis_size - 1."""
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if basis_size - 1 <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def param_names(opt) -> list[str]:
    """One unique name per parameter, in param-group order: its fqn if wrap_model recorded it."""
    recorded = opt.param_names
    params = [p for g in opt.trained_groups for p in g["params"]]
    names = [recorded.get(p, f"param.{i}") for i, p in enumerate(params)]
    if len(set(names)) != len(names):
        names = [f"param.{i}" for i in range(len(params))]
    return names


def _expected_kind(p: Tensor, shape, state_dtype: str) -> str:
    if state_dtype == "fp32" and p.dtype == torch.float64:
        return "fp64"
    return quant.storage_kind(shape, state_dtype)


def layer_entries(opt) -> list[dict]:
    """What this optimizer's checkpoint must describe: one entry per parameter, in param-group order."""
    names = iter(param_names(opt))
    entries = []
    for gi, group in enumerate(opt.trained_groups):
        for p in group["params"]:
            layer = opt.layers.get(p) if group["lowrank"] else None
            shape = quant.state_shape(opt, p)
            entry = {"name": next(names), "group": gi, "shape": list(p.shape), "dtype": str(p.dtype)[6:],
                     "projected": layer is not None, "state_shape": list(shape),
                     "state_dtype": _expected_kind(p, shape, group["state_dtype"]),
                     "fallback": quant.fallback_reason(shape, group["state_dtype"])}
            if layer is not None:
                spec = layer.lowrank_spec
                entry.update(side=spec.side, rank=spec.rank, basis=spec.basis, basis_size=layer.basis_size)
            entries.append(entry)
    return entries


# -- the header against the optimizer --------------------------------------------------------------------------
def _compare(problems: list[str], what: str, saved, here) -> None:
    if saved != here:
        problems.append(f"{what}: checkpoint has {brief(saved, 200)}, this optimizer {here!r}")


@dataclasses.dataclass(frozen=True)
class _Spec:
    """One tensor a checkpoint must hold: its shape and dtype, the parameter it belongs to, which state (step,
    exp_avg, exp_avg_sq, indices, basis) and which part of it ("" for a plain state, "codes" or "scale")."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    param: str
    key: str
    part: str = ""


def _expected_tensors(here: dict[str, dict], with_state) -> dict[str, _Spec]:
    """The tensors of a checkpoint of this optimizer in which the parameters named in `with_state` have state."""
    expected: dict[str, _Spec] = {}
    for name in with_state:
        h = here[name]
        expected[f"{name}.step"] = _Spec((), torch.float32, name, "step")
        for key in ("exp_avg", "exp_avg_sq"):
            for part, (shape, dtype) in quant.part_specs(h["state_shape"], h["state_dtype"]).items():
                expected[f"{name}.{key}" + (f".{part}" if part else "")] = _Spec(tuple(shape), dtype, name, key, part)
        if h.get("projected"):
            if h["basis"] == "svd":
                expected[f"{name}.basis"] = _Spec((h["basis_size"], h["rank"]), torch.float32, name, "basis")
            else:
                expected[f"{name}.indices"] = _Spec((h["rank"],), index_dtype(h["basis_size"]), name, "indices")
    return expected


def header_bounds(entries: list[dict], n_groups: int) -> tuple[int, int]:
    """The most header bytes and tensor entries read_header accepts for a checkpoint loaded into an optimizer
    with these parameters: twice what one of its own checkpoints can hold at most (6 tensors a parameter: step,
    2 moments of up to 2 parts, the selection), so that a checkpoint of a somewhat different model still gets
    the message naming what differs; the exact set of tensors is checked after that (check_header)."""
    max_bytes = _HEADER_BASE + _HEADER_PER_GROUP * n_groups + 2 * sum(
        _HEADER_PER_PARAM + _HEADER_PER_NAME_CHAR * len(e["name"]) for e in entries)
    return min(max_bytes, MAX_HEADER), 2 * _MAX_TENSORS_PER_PARAM * len(entries) + 16


def check_header(opt, meta: dict, header: dict, entries: list[dict]) -> dict[str, _Spec]:
    """Raise CheckpointError listing every difference between the checkpoint's header and this optimizer;
    return the tensors it must hold. Reads no tensor data."""
    problems: list[str] = []
    _compare(problems, "state_dtype", meta.get("state_dtype"), opt.config.state_dtype)
    saved_config = meta.get("config") or {}
    for key in _CONFIG_KEYS:
        if key in saved_config:
            _compare(problems, key, saved_config[key], getattr(opt.config, key))
    _compare(problems, "update_gap", meta.get("update_gap"), opt.config.update_gap)
    saved_groups = meta["param_groups"]
    if len(saved_groups) != len(opt.trained_groups):
        problems.append(f"param groups: checkpoint has {len(saved_groups)}, this optimizer {len(opt.trained_groups)}")
    else:
        for gi, (sg, group) in enumerate(zip(saved_groups, opt.trained_groups)):
            for key in _STRUCTURAL_GROUP_KEYS:
                if key in sg or key in group:
                    _compare(problems, f"param_groups[{gi}][{key!r}]", sg.get(key), group.get(key))

    here = {e["name"]: e for e in entries}
    saved = {e["name"]: e for e in meta["layers"]}
    missing = [n for n in here if n not in saved]
    extra = [n for n in saved if n not in here]
    if missing:
        problems.append(f"missing from the checkpoint: {_short(missing)}")
    if extra:
        problems.append(f"in the checkpoint but not in this optimizer: {_short(extra)}")
    for name in (n for n in here if n in saved):
        s, h = saved[name], here[name]
        for key in ("group", "shape", "projected", "side", "rank", "basis", "basis_size", "state_shape",
                    "state_dtype"):
            _compare(problems, f"{name} {key}", s.get(key), h.get(key))
    if problems:
        raise CheckpointError("checkpoint does not match this optimizer:\n  " + "\n  ".join(problems))

    expected = _expected_tensors(here, [n for n in here if saved[n]["has_state"]])
    listed = {k: v for k, v in header.items() if k != "__metadata__"}
    for k in sorted(set(expected) - set(listed)):
        problems.append(f"tensor {k} is missing")
    for k in sorted(set(listed) - set(expected)):
        problems.append(f"tensor {k[:200]} is not expected")
    for k in sorted(set(expected) & set(listed)):
        spec, entry = expected[k], listed[k]
        if tuple(entry["shape"]) != spec.shape or entry["dtype"] != _ST_NAME.get(spec.dtype):
            problems.append(f"tensor {k}: {tuple(entry['shape'])} {entry['dtype']}, expected {spec.shape} "
                            f"{spec.dtype}")
    if problems:
        raise CheckpointError("checkpoint tensors are inconsistent:\n  " + "\n  ".join(_short_list(problems)))
    return expected


# -- the global step and the values ----------------------------------------------------------------------------
def _short(names: list[str], k: int = 8) -> str:
    return ", ".join(n[:200] for n in names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def _short_list(problems: list[str], k: int = 40) -> list[str]:
    return problems[:k] + ([f"... and {len(problems) - k} more"] if len(problems) > k else [])


def check_global_step(meta: dict) -> int:
    step = meta.get("global_step")
    if type(step) is not int or step < 0:
        raise CheckpointError(f"checkpoint global_step is {brief(step)}, not an int >= 0 (a count of completed "
                              "steps); the optimizer is unchanged")
    return step


def check_values(tensors: dict[str, Tensor], expected: dict[str, _Spec], here: dict[str, dict]) -> None:
    """Raise CheckpointError naming every tensor whose values no optimizer could have written: a step count that is
    not a finite integer >= 0, a moment that is not finite, a negative second moment (or quantisation scale),
    indices that repeat or leave the basis."""
    problems: list[str] = []
    for k in sorted(expected):
        spec, t = expected[k], tensors[k]
        if spec.key == "step":
            v = t.item()
            if not is_step_count(v):
                problems.append(f"tensor {k}: step {v} is not a count (an integer >= 0)")
        elif spec.key == "indices":
            n = here[spec.param]["basis_size"]
            if not valid_indices(t.to(torch.int64), n):
                problems.append(f"tensor {k}: indices must be distinct and in [0, {n})")
        elif spec.key in ("exp_avg", "exp_avg_sq", "basis"):
            if spec.part == "codes" and not t.is_floating_point():
                continue  # int8 / int4 codes: every code maps to a finite value of the right sign
            values = t.float() if t.dtype not in (torch.float32, torch.float64) else t
            if not bool(torch.isfinite(values).all()):
                problems.append(f"tensor {k}: holds NaN or infinite values")
            elif (spec.key == "exp_avg_sq" or spec.part == "scale") and bool((values < 0).any()):
                what = "a quantisation scale (a block's absmax)" if spec.part == "scale" else "Adam's second moment"
                problems.append(f"tensor {k}: negative values in {what}")
    if problems:
        raise CheckpointError("checkpoint holds values no optimizer writes (the optimizer is unchanged):\n  "
                              + "\n  ".join(_short_list(problems)))


# -- hyper-parameters ------------------------------------------------------------------------------------------
def restored_groups(opt, saved_groups: list[dict]) -> list[dict]:
    """The hyper-parameters to restore into each param group, checked with wrap_model's rules; CheckpointError
    naming every group and key that breaks one."""
    fields = {f.name for f in dataclasses.fields(opt.config)}
    problems: list[str] = []
    out = []
    for gi, (saved, group) in enumerate(zip(saved_groups, opt.trained_groups)):
        values = {}
        for k, raw in saved.items():
            if k in _STRUCTURAL_GROUP_KEYS:
                continue
            where = f"param_groups[{gi}][{k!r}]"
            if k == "params":
                problems.append(f"{where}: a checkpoint never holds the parameters of a group (restoring "
                                f"{brief(raw)} would replace this optimizer's)")
                continue
            try:
                v = _restored_value(raw, group.get(k))
            except ValueError as e:
                problems.append(f"{where}: {e}")
                continue
            plain = _plain(v)
            if k in _FINITE_GROUP_KEYS and not _finite_number(plain):
                problems.append(f"{where}: {brief(plain)} is not a finite number")
                continue
            if k == "betas" and not (isinstance(plain, tuple) and all(_finite_number(b) for b in plain)):
                problems.append(f"{where}: {brief(plain)} is not two finite numbers")
                continue
            problem = hyper_problem(opt.config, k, plain) if k in fields else None
            if problem:
                problems.append(f"{where}: {problem}")
                continue
            values[k] = v
        out.append(values)
    if problems:
        raise CheckpointError("checkpoint hyper-parameters break wrap_model's rules (the optimizer is unchanged):\n  "
                              + "\n  ".join(_short_list(problems)))
    return out


def _finite_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _plain(v):
    """A restored value with tensors as Python numbers (what the config rules check)."""
    if isinstance(v, Tensor):
        return v.item()
    if isinstance(v, tuple):
        return tuple(_plain(x) for x in v)
    return v


def _restored_value(v, current):
    """One saved group value in the type this group uses (betas a tuple, lr maybe a tensor); ValueError for a
    value save_optimizer never writes (only numbers, strings, None, tensors as {"tensor": number}, and flat
    lists of them)."""
    if isinstance(v, dict):
        number = _tensor_number(v)
        return number if isinstance(current, Tensor) else torch.tensor(number)
    if isinstance(v, list):
        if any(isinstance(x, list) or (isinstance(x, dict) and set(x) != {"tensor"}) for x in v):
            raise ValueError(f"{brief(v)} nests lists or objects; a checkpoint holds numbers, strings and flat "
                             "lists of them")
        items = [_tensor_number(x) if isinstance(x, dict) else x for x in v]
        return items if isinstance(current, list) else tuple(items)
    return v


def _tensor_number(v: dict):
    """The number of a tensor saved as {"tensor": number}."""
    x = v.get("tensor")
    if set(v) != {"tensor"} or not isinstance(x, numbers.Real) or isinstance(x, bool):
        raise ValueError(f"{brief(v)} is not a value save_optimizer writes (a tensor is {{'tensor': number}})")
    return x
