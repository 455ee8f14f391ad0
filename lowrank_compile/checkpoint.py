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
step counters (see quant.py). The write is atomic (temporary file in the same directory, fsync, rename).
"""
from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import math
import os
import tempfile

import safetensors
import safetensors.torch
import torch
from torch import Tensor

from . import _torchao, quant

__all__ = ["save_optimizer", "load_optimizer", "CheckpointError", "FORMAT", "FORMAT_VERSION", "read_header",
           "index_dtype"]

FORMAT = "lowrank_compile.optim"
FORMAT_VERSION = 1
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header
# Param-group entries that define what the states mean: compared on load, never overwritten.
_STRUCTURAL_GROUP_KEYS = ("lowrank", "state_dtype", "state_policy")
_CONFIG_KEYS = ("basis", "norm", "state_policy")  # state_dtype and update_gap are compared on their own


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this optimizer: corrupt, truncated, or made for another one."""


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
    if opt.micro_step:
        raise RuntimeError("save_optimizer was called between the micro-batches of an accumulated step; save "
                           "after the step() that applies the update")
    tensors, meta = _flatten(opt)
    header = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
              "meta": json.dumps(meta, sort_keys=True, separators=(",", ":"))}
    header["checksum"] = _checksum(header, tensors)
    _write_atomic(tensors, header, os.fspath(path))


def index_dtype(basis_size: int) -> torch.dtype:
    """The smallest integer dtype holding indices 0 .. basis_size - 1."""
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if basis_size - 1 <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def _param_names(opt) -> list[str]:
    """One unique name per parameter, in param-group order: its fqn if wrap_model recorded it."""
    recorded = opt.param_names
    params = [p for g in opt.param_groups for p in g["params"]]
    names = [recorded.get(p, f"param.{i}") for i, p in enumerate(params)]
    if len(set(names)) != len(names):
        names = [f"param.{i}" for i in range(len(params))]
    return names


def _state_dtype(opt) -> str:
    return opt.config.state_dtype


def _expected_kind(p: Tensor, shape, state_dtype: str) -> str:
    if state_dtype == "fp32" and p.dtype == torch.float64:
        return "fp64"
    return quant.storage_kind(shape, state_dtype)


def _layer_entries(opt) -> list[dict]:
    """What this optimizer's checkpoint must describe: one entry per parameter, in param-group order."""
    names = iter(_param_names(opt))
    entries = []
    for gi, group in enumerate(opt.param_groups):
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
    entries = _layer_entries(opt)
    params = [p for g in opt.param_groups for p in g["params"]]
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
        "state_dtype": _state_dtype(opt),
        "config": {k: _json_value(v, f"config.{k}") for k, v in opt.config.saved_items().items()},
        "update_gap": opt.config.update_gap,
        "param_groups": [{k: _json_value(v, f"param_groups[{gi}][{k!r}]") for k, v in group.items() if k != "params"}
                         for gi, group in enumerate(opt.param_groups)],
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


def _tensor_bytes(t: Tensor):
    """A zero-copy view of a contiguous CPU tensor's bytes."""
    n = t.numel() * t.element_size()
    return (ctypes.c_ubyte * n).from_address(t.data_ptr()) if n else b""


def _checksum(header: dict[str, str], tensors: dict[str, Tensor]) -> str:
    """sha256 over the metadata (all but the checksum) and each tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in header.items() if k != "checksum"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(_tensor_bytes(t.contiguous()))
    return "sha256:" + h.hexdigest()


def _write_atomic(tensors: dict[str, Tensor], header: dict[str, str], path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        safetensors.torch.save_file(tensors, tmp, metadata=header)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; give the file the usual permissions
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


# -- reading and validating ------------------------------------------------------------------------------------
def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """The safetensors JSON header of `path` and the size of its data region; raises CheckpointError."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated: {size} bytes, not even a safetensors header length")
        n = int.from_bytes(head, "little")
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{path} is truncated or not a safetensors file: its header claims {n} bytes, "
                                  f"the file has {size - 8} after the length field")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: its safetensors header is not valid JSON ({e}); the file is corrupted") \
            from None
    return header, size - 8 - n


def _read_verified(path: str) -> tuple[dict, dict[str, Tensor]]:
    """Metadata and tensors (on CPU) of a checkpoint whose format, version, size and checksum check out."""
    header, data_size = read_header(path)
    metadata = header.get("__metadata__") or {}
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a lowrank_compile optimizer checkpoint (format "
                              f"{metadata.get('format')!r}, expected {FORMAT!r}); write one with save_optimizer")
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise CheckpointError(f"{path} has checkpoint format version {version!r}; this lowrank_compile reads "
                              f"version {FORMAT_VERSION} only")
    try:
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (TypeError, KeyError, IndexError, ValueError):
        raise CheckpointError(f"{path}: its safetensors header has malformed tensor entries; the file is "
                              "corrupted") from None
    expected = max(ends, default=0)
    if data_size < expected:
        raise CheckpointError(f"{path} is truncated: its tensor data is {data_size} bytes, the header says "
                              f"{expected}")
    if data_size > expected:
        raise CheckpointError(f"{path} has {data_size - expected} bytes after its last tensor; the file is "
                              "corrupted")
    try:
        tensors = safetensors.torch.load_file(path, device="cpu")
    except Exception as e:  # safetensors' own validation: dtypes, shapes vs offsets, overlaps
        raise CheckpointError(f"{path}: safetensors cannot read it ({e}); the file is corrupted") from None
    if "checksum" not in metadata:
        raise CheckpointError(f"{path} has no checksum in its metadata; the file is corrupted")
    actual = _checksum(metadata, tensors)
    if actual != metadata["checksum"]:
        raise CheckpointError(f"{path} fails its checksum ({actual[:19]}... computed, {metadata['checksum'][:19]}... "
                              "recorded): the file is corrupted")
    try:
        meta = json.loads(metadata["meta"])
    except (KeyError, ValueError):
        raise CheckpointError(f"{path}: its 'meta' metadata is missing or not JSON") from None
    return meta, tensors


def _compare(problems: list[str], what: str, saved, here) -> None:
    if saved != here:
        problems.append(f"{what}: checkpoint has {saved!r}, this optimizer {here!r}")


def _validate(opt, meta: dict, tensors: dict[str, Tensor]) -> None:
    """Raise CheckpointError listing every difference between the checkpoint and this optimizer."""
    problems: list[str] = []
    _compare(problems, "state_dtype", meta.get("state_dtype"), _state_dtype(opt))
    saved_config = meta.get("config") or {}
    for key in _CONFIG_KEYS:
        if key in saved_config:
            _compare(problems, key, saved_config[key], getattr(opt.config, key))
    _compare(problems, "update_gap", meta.get("update_gap"), opt.config.update_gap)
    saved_groups = meta.get("param_groups", [])
    if len(saved_groups) != len(opt.param_groups):
        problems.append(f"param groups: checkpoint has {len(saved_groups)}, this optimizer {len(opt.param_groups)}")
    else:
        for gi, (sg, group) in enumerate(zip(saved_groups, opt.param_groups)):
            for key in _STRUCTURAL_GROUP_KEYS:
                if key in sg or key in group:
                    _compare(problems, f"param_groups[{gi}][{key!r}]", sg.get(key), group.get(key))

    here = {e["name"]: e for e in _layer_entries(opt)}
    saved = {e["name"]: e for e in meta.get("layers", [])}
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

    expected: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {}
    for name, h in here.items():
        if not saved[name].get("has_state"):
            continue
        expected[f"{name}.step"] = ((), torch.float32)
        for key in ("exp_avg", "exp_avg_sq"):
            for part, spec in quant.part_specs(h["state_shape"], h["state_dtype"]).items():
                expected[f"{name}.{key}" + (f".{part}" if part else "")] = spec
        if h.get("projected"):
            if h["basis"] == "svd":
                expected[f"{name}.basis"] = ((h["basis_size"], h["rank"]), torch.float32)
            else:
                expected[f"{name}.indices"] = ((h["rank"],), index_dtype(h["basis_size"]))
    for k in sorted(set(expected) - set(tensors)):
        problems.append(f"tensor {k} is missing")
    for k in sorted(set(tensors) - set(expected)):
        problems.append(f"tensor {k} is not expected")
    for k in sorted(set(expected) & set(tensors)):
        shape, dtype = expected[k]
        t = tensors[k]
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            problems.append(f"tensor {k}: {tuple(t.shape)} {t.dtype}, expected {tuple(shape)} {dtype}")
        elif k.endswith(".indices"):
            n = here[k[:-len(".indices")]]["basis_size"]
            idx = t.to(torch.int64)
            if idx.numel() and (idx.min() < 0 or idx.max() >= n or idx.unique().numel() != idx.numel()):
                problems.append(f"tensor {k}: indices must be distinct and in [0, {n})")
        elif k.endswith(".step") and not (math.isfinite(t.item()) and t.item() >= 0):
            problems.append(f"tensor {k}: step {t.item()} is not a count")
    if problems:
        raise CheckpointError("checkpoint tensors are inconsistent:\n  " + "\n  ".join(problems))


def _short(names: list[str], k: int = 8) -> str:
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


# -- loading ---------------------------------------------------------------------------------------------------
def load_optimizer(opt, path: str | os.PathLike) -> None:
    """Load a file written by :func:`save_optimizer` into `opt`, made by wrap_model on the same model.

    Everything is checked before the optimizer is touched: format and version, truncation, the checksum,
    state_dtype and configuration, the list of parameters and each one's shape, side, rank and storage, and
    every tensor's shape and dtype. Any difference raises :class:`CheckpointError` naming it, and leaves
    `opt` as it was. Hyper-parameters (lr as a scheduler left it, betas, weight decay, the rounding seed)
    are restored from the file, as torch.optim's load_state_dict does. States go to each parameter's
    device, so a checkpoint saved on CPU loads on a GPU. Nothing is unpickled.

    Example::

        opt = lowrank_compile.wrap_model(model, rank=16, state_dtype="int8")
        lowrank_compile.load_optimizer(opt, "opt.safetensors")
    """
    path = os.fspath(path)
    meta, tensors = _read_verified(path)
    _validate(opt, meta, tensors)
    entries = {e["name"]: e for e in _layer_entries(opt)}
    names = _param_names(opt)
    params = [p for g in opt.param_groups for p in g["params"]]
    saved = {e["name"]: e for e in meta["layers"]}

    new_states = {}
    for name, p in zip(names, params):
        if not saved[name]["has_state"]:
            continue
        e = entries[name]
        state = {"step": tensors[f"{name}.step"].clone()}
        for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            parts = {part: tensors[f"{name}.{key}" + (f".{part}" if part else "")]
                     for part in quant.part_specs(e["state_shape"], e["state_dtype"])}
            state[key] = quant.state_from_parts(e["state_shape"], e["state_dtype"], parts, signed=signed,
                                                device=p.device)
        if e["projected"]:
            if e["basis"] == "svd":
                state["basis"] = tensors[f"{name}.basis"].to(p.device, copy=True)
            else:
                state["indices"] = tensors[f"{name}.indices"].to(device=p.device, dtype=torch.int64)
        new_states[p] = state
    hyper = [_restored_group_values(sg, group) for sg, group in zip(meta["param_groups"], opt.param_groups)]

    # Validated and built: from here on nothing can fail half-way.
    for p in params:
        opt.state.pop(p, None)
    for p, state in new_states.items():
        opt.state[p] = state
    for group, values in zip(opt.param_groups, hyper):
        for k, v in values.items():
            if isinstance(group.get(k), Tensor):
                group[k].fill_(v)
            else:
                group[k] = v
    opt.restore_after_load(int(meta["global_step"]))


def _restored_group_values(saved: dict, group: dict) -> dict:
    """The hyper-parameters of one saved group, in the types this group uses (betas a tuple, lr maybe a tensor)."""
    out = {}
    for k, v in saved.items():
        if k in _STRUCTURAL_GROUP_KEYS:
            continue
        if isinstance(v, dict) and set(v) == {"tensor"}:
            v = v["tensor"]
            if not isinstance(group.get(k), Tensor):
                v = torch.tensor(v)
        elif isinstance(v, list) and isinstance(group.get(k, ()), tuple):
            v = tuple(x["tensor"] if isinstance(x, dict) else x for x in v)
        out[k] = v
    return out
