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
"""
from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import math
import numbers
import os
import re
import socket
import stat
import tempfile
import time

import safetensors
import safetensors.torch
import torch
from torch import Tensor

from . import _torchao, quant
from .optimizer import LowRankAdamW

__all__ = ["save_optimizer", "load_optimizer", "CheckpointError", "FORMAT", "FORMAT_VERSION", "read_header",
           "index_dtype"]

FORMAT = "lowrank_compile.optim"
FORMAT_VERSION = 1
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header
# What one parameter can add to the header of a checkpoint that load_optimizer reads (its entry in the metadata,
# the names of its up to 6 tensors there and in the safetensors header, with their dtypes, shapes and offsets,
# JSON-escaped), as a fixed part and a part per character of its name; plus a fixed part for the rest (config,
# versions, checksum) and one per param group. Generous: real headers measure about 400 bytes plus 14 per name
# character a parameter.
_HEADER_BASE, _HEADER_PER_PARAM, _HEADER_PER_NAME_CHAR, _HEADER_PER_GROUP = 1 << 20, 2048, 32, 4096
_MAX_TENSORS_PER_PARAM = 6  # step, exp_avg and exp_avg_sq (codes and scale each), indices or basis
_MAX_NDIM = 16  # a tensor in a header with more dimensions is rejected (ours have at most 2)
# Param-group entries that define what the states mean: compared on load, never overwritten.
_STRUCTURAL_GROUP_KEYS = ("lowrank", "state_dtype", "state_policy")
_CONFIG_KEYS = ("basis", "norm", "state_policy")  # state_dtype and update_gap are compared on their own
# Param-group hyper-parameters that must be finite numbers (wrap_model's rules, in config.py, apply as well).
_FINITE_GROUP_KEYS = ("lr", "eps", "weight_decay", "scale")
# A temporary file nobody has written to for this long is abandoned, whoever wrote it (another host, or a pid
# since reused by another process); one whose writer (on this host) has exited is removed at once.
TEMP_MAX_AGE_S = 600
# safetensors' dtype names: bytes per element, and the names of the torch dtypes a checkpoint holds.
_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_ST_NAME = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32",
            torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
            torch.float64: "F64"}
if hasattr(torch, "float8_e4m3fn"):
    _ST_NAME[torch.float8_e4m3fn] = "F8_E4M3"


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
    _require_optimizer(opt, "save_optimizer")
    if opt.micro_step:
        raise RuntimeError("save_optimizer was called between the micro-batches of an accumulated step; save "
                           "after the step() that applies the update")
    tensors, meta = _flatten(opt)
    header = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
              "meta": json.dumps(meta, sort_keys=True, separators=(",", ":"))}
    header["checksum"] = _checksum(header, tensors)
    _write_atomic(tensors, header, os.fspath(path))


def _require_optimizer(opt, caller: str) -> None:
    """TypeError unless `opt` is a LowRankAdamW, saying what it is and what to pass instead."""
    if isinstance(opt, LowRankAdamW):
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


def _host_tag(host: str | None = None) -> str:
    """8 hex digits naming this host in temporary names (a pid means something only on its own host)."""
    return hashlib.sha256((socket.gethostname() if host is None else host).encode()).hexdigest()[:8]


def _temp_prefix(target_name: str, pid: int | None = None, host: str | None = None) -> str:
    """The start of a temporary file's name for the target file name `target_name`, written by `pid` on `host`
    (defaults: this process): ``.{target}.{host}-{pid}.``; mkstemp adds a random part and ``.tmp``."""
    return f".{target_name}.{_host_tag(host)}-{os.getpid() if pid is None else pid}."


def _pid_alive(pid: int) -> bool:
    if pid <= 0 or os.name != "posix":
        return pid > 0  # no cheap check off POSIX (os.kill would end the process): leave it to the age rule
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except (OverflowError, OSError):
        return False
    return True


def _remove_abandoned_temporaries(directory: str, target_name: str) -> list[str]:
    """Remove temporaries of earlier saves of `target_name` in `directory` that nobody will finish: written on
    this host by a process that is gone, or not modified for TEMP_MAX_AGE_S seconds. Only names this module
    gives its temporaries for this very target are considered; anything else, and a live writer's recent file,
    is left alone. Never raises: tidying must not fail a save. Returns the names removed."""
    pattern = re.compile(re.escape(f".{target_name}.") + r"(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]{1,10})\."
                         r"[A-Za-z0-9_]{1,64}\.tmp")
    here = _host_tag()
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is None:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                continue
            stale = now - st.st_mtime > TEMP_MAX_AGE_S
            dead = m["host"] == here and not _pid_alive(int(m["pid"]))
            if stale or dead:
                os.unlink(entry.path)
                removed.append(entry.name)
        except OSError:  # gone already (its writer renamed it, or another save removed it), or not ours to remove
            continue
    return removed


def _write_atomic(tensors: dict[str, Tensor], header: dict[str, str], path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    target_name = os.path.basename(path)
    _remove_abandoned_temporaries(directory, target_name)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(target_name), suffix=".tmp", dir=directory)
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
def read_header(path: str | os.PathLike, *, max_bytes: int = _MAX_HEADER,
                max_entries: int | None = None) -> tuple[dict, int]:
    """The safetensors JSON header of `path` and the size of its data region; raises CheckpointError.

    Reads the 8-byte length first and refuses a header longer than `max_bytes` (or than the file) before
    reading it; refuses more than `max_entries` tensor entries (None: any number) before building anything
    for them; and checks the structure: a JSON object whose ``__metadata__`` (if any) maps strings to strings
    and whose every other entry is an object with a string ``dtype``, a ``shape`` of ints >= 0 and two
    ``data_offsets`` ints 0 <= begin <= end that span the dtype's bytes for that shape. Tensor data is not read.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated: {size} bytes, not even a safetensors header length")
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            raise CheckpointError(f"{path} is truncated or not a safetensors file: its header claims {n} bytes, "
                                  f"the file has {size - 8} after the length field")
        if n > max_bytes:
            raise CheckpointError(f"{path}: its safetensors header claims {n} bytes, more than the {max_bytes} a "
                                  "checkpoint can need here; the file is corrupted, made for a much larger model, or "
                                  "not a lowrank_compile optimizer checkpoint")
        raw = f.read(n)
    if max_entries is not None:
        # every entry has a "data_offsets" key: a cheap upper-bound count before parsing (an escaped key that
        # hides from it is counted exactly below, the parse being bounded by max_bytes)
        claimed = raw.count(b'"data_offsets"')
        if claimed > max_entries:
            raise CheckpointError(f"{path}: its header declares {claimed} tensors, more than the {max_entries} a "
                                  "checkpoint of this optimizer can hold; the file is corrupted or made for a much "
                                  "larger model")
    try:
        header = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise CheckpointError(f"{path}: its safetensors header nests too deeply to be a checkpoint; the file is "
                              "corrupted") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: its safetensors header is not valid JSON ({e}); the file is corrupted") \
            from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: its safetensors header is not valid JSON (not a JSON object but a "
                              f"{type(header).__name__}); the file is corrupted")
    _check_header_structure(path, header, max_entries)
    return header, size - 8 - n


def _check_header_structure(path: str, header: dict, max_entries: int | None) -> None:
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: its safetensors header's __metadata__ is a {type(metadata).__name__}, not "
                              "an object of strings; the file is corrupted")
    bad = next((k for k, v in metadata.items() if not isinstance(v, str)), None)
    if bad is not None:
        raise CheckpointError(f"{path}: its safetensors __metadata__ entry {bad!r} is a "
                              f"{type(metadata[bad]).__name__}, not a string; the file is corrupted")
    count = len(header) - ("__metadata__" in header)
    if max_entries is not None and count > max_entries:
        raise CheckpointError(f"{path}: its header lists {count} tensors, more than the {max_entries} a checkpoint "
                              "of this optimizer can hold; the file is corrupted or made for a much larger model")
    for name, e in header.items():
        if name == "__metadata__":
            continue
        what = f"{path}: tensor entry {name[:200]!r} of its safetensors header"
        if not isinstance(e, dict):
            raise CheckpointError(f"{what} is a {type(e).__name__}, not an object; the file is corrupted")
        dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if not isinstance(dtype, str):
            raise CheckpointError(f"{what} has dtype {_brief(dtype)}, not a dtype name; the file is corrupted")
        if not (isinstance(shape, list) and len(shape) <= _MAX_NDIM
                and all(type(d) is int and d >= 0 for d in shape)):
            raise CheckpointError(f"{what} has shape {_brief(shape)}, not a list of at most {_MAX_NDIM} ints >= 0; "
                                  "the file is corrupted")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)
                and offsets[0] <= offsets[1]):
            raise CheckpointError(f"{what} has data_offsets {_brief(offsets)}, not two ints 0 <= begin <= end; the "
                                  "file is corrupted")
        if dtype in _ST_ITEMSIZE and offsets[1] - offsets[0] != math.prod(shape) * _ST_ITEMSIZE[dtype]:
            raise CheckpointError(f"{what}: {offsets[1] - offsets[0]} bytes of data for shape {shape} {dtype}; the "
                                  "file is corrupted")


def _brief(v, limit: int = 80) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[:limit] + "..."


def _read_checked_header(path: str, max_bytes: int = _MAX_HEADER,
                         max_entries: int | None = None) -> tuple[dict, dict, dict]:
    """Header, its metadata and the parsed 'meta' of a checkpoint whose header checks out (structure, format and
    version, the data region tiled exactly by the tensors), with no tensor data read."""
    header, data_size = read_header(path, max_bytes=max_bytes, max_entries=max_entries)
    metadata = header.get("__metadata__", {})
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a lowrank_compile optimizer checkpoint (format "
                              f"{metadata.get('format')!r}, expected {FORMAT!r}); write one with save_optimizer")
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise CheckpointError(f"{path} has checkpoint format version {version!r}; this lowrank_compile reads "
                              f"version {FORMAT_VERSION} only")
    spans = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
    end = 0
    for begin, stop in spans:
        if begin != end:
            raise CheckpointError(f"{path}: its tensors' data_offsets leave a gap or overlap at byte "
                                  f"{min(begin, end)}; the file is corrupted")
        end = stop
    if data_size < end:
        raise CheckpointError(f"{path} is truncated: its tensor data is {data_size} bytes, the header says {end}")
    if data_size > end:
        raise CheckpointError(f"{path} has {data_size - end} bytes after its last tensor; the file is corrupted")
    if "checksum" not in metadata:
        raise CheckpointError(f"{path} has no checksum in its metadata; the file is corrupted")
    try:
        meta = json.loads(metadata["meta"])
    except KeyError:
        raise CheckpointError(f"{path}: its 'meta' metadata is missing") from None
    except (ValueError, RecursionError):
        raise CheckpointError(f"{path}: its 'meta' metadata is not JSON") from None
    _check_meta_structure(path, meta)
    return header, metadata, meta


def _check_meta_structure(path: str, meta) -> None:
    """The shape of the 'meta' JSON that the checks against the optimizer read (they compare its values)."""
    def fail(what: str):
        raise CheckpointError(f"{path}: its 'meta' metadata is malformed: {what}; the file is corrupted")

    if not isinstance(meta, dict):
        fail(f"a {type(meta).__name__}, not an object")
    layers = meta.get("layers")
    if not isinstance(layers, list):
        fail(f"'layers' is {_brief(layers)}, not a list")
    names = set()
    for i, e in enumerate(layers):
        if not isinstance(e, dict):
            fail(f"layers[{i}] is a {type(e).__name__}, not an object")
        if not isinstance(e.get("name"), str):
            fail(f"layers[{i}] has name {_brief(e.get('name'))}, not a string")
        if not isinstance(e.get("has_state"), bool):
            fail(f"layers[{i}] ({e['name'][:200]!r}) has has_state {_brief(e.get('has_state'))}, not true or false")
        if e["name"] in names:
            fail(f"parameter {e['name'][:200]!r} is listed twice")
        names.add(e["name"])
    groups = meta.get("param_groups")
    if not (isinstance(groups, list) and all(isinstance(g, dict) for g in groups)):
        fail(f"'param_groups' is {_brief(groups)}, not a list of objects")
    if not isinstance(meta.get("config", {}), dict):
        fail(f"'config' is {_brief(meta.get('config'))}, not an object")


def _read_tensors(path: str, metadata: dict) -> dict[str, Tensor]:
    """The tensors (on CPU) of a checkpoint whose header checked out, verified against its checksum."""
    try:
        tensors = safetensors.torch.load_file(path, device="cpu")
    except Exception as e:  # safetensors' own validation: dtypes, shapes vs offsets, overlaps
        raise CheckpointError(f"{path}: safetensors cannot read it ({e}); the file is corrupted") from None
    actual = _checksum(metadata, tensors)
    if actual != metadata["checksum"]:
        raise CheckpointError(f"{path} fails its checksum ({actual[:19]}... computed, {metadata['checksum'][:19]}... "
                              "recorded): the file is corrupted")
    return tensors


def _read_verified(path: str) -> tuple[dict, dict[str, Tensor]]:
    """Metadata and tensors (on CPU) of a checkpoint whose format, version, size and checksum check out."""
    _, metadata, meta = _read_checked_header(path)
    return meta, _read_tensors(path, metadata)


def _compare(problems: list[str], what: str, saved, here) -> None:
    if saved != here:
        problems.append(f"{what}: checkpoint has {_brief(saved, 200)}, this optimizer {here!r}")


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


def _header_bounds(entries: list[dict], n_groups: int) -> tuple[int, int]:
    """The most header bytes and tensor entries read_header accepts for a checkpoint loaded into an optimizer
    with these parameters: twice what one of its own checkpoints can hold at most (6 tensors a parameter: step,
    2 moments of up to 2 parts, the selection), so that a checkpoint of a somewhat different model still gets
    the message naming what differs; the exact set of tensors is checked after that (_validate)."""
    max_bytes = _HEADER_BASE + _HEADER_PER_GROUP * n_groups + 2 * sum(
        _HEADER_PER_PARAM + _HEADER_PER_NAME_CHAR * len(e["name"]) for e in entries)
    return min(max_bytes, _MAX_HEADER), 2 * _MAX_TENSORS_PER_PARAM * len(entries) + 16


def _validate(opt, meta: dict, header: dict, entries: list[dict]) -> dict[str, _Spec]:
    """Raise CheckpointError listing every difference between the checkpoint's header and this optimizer;
    return the tensors it must hold. Reads no tensor data."""
    problems: list[str] = []
    _compare(problems, "state_dtype", meta.get("state_dtype"), _state_dtype(opt))
    saved_config = meta.get("config") or {}
    for key in _CONFIG_KEYS:
        if key in saved_config:
            _compare(problems, key, saved_config[key], getattr(opt.config, key))
    _compare(problems, "update_gap", meta.get("update_gap"), opt.config.update_gap)
    saved_groups = meta["param_groups"]
    if len(saved_groups) != len(opt.param_groups):
        problems.append(f"param groups: checkpoint has {len(saved_groups)}, this optimizer {len(opt.param_groups)}")
    else:
        for gi, (sg, group) in enumerate(zip(saved_groups, opt.param_groups)):
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


def _short(names: list[str], k: int = 8) -> str:
    return ", ".join(n[:200] for n in names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def _short_list(problems: list[str], k: int = 40) -> list[str]:
    return problems[:k] + ([f"... and {len(problems) - k} more"] if len(problems) > k else [])


def _check_global_step(meta: dict) -> int:
    step = meta.get("global_step")
    if type(step) is not int or step < 0:
        raise CheckpointError(f"checkpoint global_step is {_brief(step)}, not an int >= 0 (a count of completed "
                              "steps); the optimizer is unchanged")
    return step


def _check_values(tensors: dict[str, Tensor], expected: dict[str, _Spec], here: dict[str, dict]) -> None:
    """Raise CheckpointError naming every tensor whose values no optimizer could have written: a step count that is
    not a finite integer >= 0, a moment that is not finite, a negative second moment (or quantisation scale),
    indices that repeat or leave the basis."""
    problems: list[str] = []
    for k in sorted(expected):
        spec, t = expected[k], tensors[k]
        if spec.key == "step":
            v = t.item()
            if not (math.isfinite(v) and v >= 0 and v == math.floor(v)):
                problems.append(f"tensor {k}: step {v} is not a count (an integer >= 0)")
        elif spec.key == "indices":
            n = here[spec.param]["basis_size"]
            idx = t.to(torch.int64)
            if idx.numel() and (idx.min() < 0 or idx.max() >= n or idx.unique().numel() != idx.numel()):
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
    entries = _layer_entries(opt)
    here = {e["name"]: e for e in entries}
    max_bytes, max_entries = _header_bounds(entries, len(opt.param_groups))
    # 1. the header: everything that can be decided without reading tensor data
    header, metadata, meta = _read_checked_header(path, max_bytes, max_entries)
    expected = _validate(opt, meta, header, entries)
    hyper = _restored_groups(opt, meta["param_groups"])
    global_step = _check_global_step(meta)
    # 2. the data
    tensors = _read_tensors(path, metadata)
    _check_values(tensors, expected, here)
    # 3. what each parameter's state becomes; new tensors made here, so that applying it cannot fail half-way
    names = _param_names(opt)
    params = [p for g in opt.param_groups for p in g["params"]]
    saved = {e["name"]: e for e in meta["layers"]}
    plans = {p: _state_plan(opt.state.get(p), here[name], tensors, p.device)
             for name, p in zip(names, params) if saved[name]["has_state"]}

    # Validated and built: from here on nothing can fail half-way.
    for p in params:
        if p not in plans:
            opt.state.pop(p, None)
    for p, plan in plans.items():
        _apply_plan(opt.state, p, plan)
    for group, values in zip(opt.param_groups, hyper):
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


def _restored_groups(opt, saved_groups: list[dict]) -> list[dict]:
    """The hyper-parameters to restore into each param group, checked with wrap_model's rules; CheckpointError
    naming every group and key that breaks one."""
    fields = {f.name for f in dataclasses.fields(opt.config)}
    problems: list[str] = []
    out = []
    for gi, (saved, group) in enumerate(zip(saved_groups, opt.param_groups)):
        values = {}
        for k, raw in saved.items():
            if k in _STRUCTURAL_GROUP_KEYS:
                continue
            where = f"param_groups[{gi}][{k!r}]"
            if k == "params":
                problems.append(f"{where}: a checkpoint never holds the parameters of a group (restoring "
                                f"{_brief(raw)} would replace this optimizer's)")
                continue
            try:
                v = _restored_value(raw, group.get(k))
            except ValueError as e:
                problems.append(f"{where}: {e}")
                continue
            plain = _plain(v)
            if k in _FINITE_GROUP_KEYS and not _finite_number(plain):
                problems.append(f"{where}: {_brief(plain)} is not a finite number")
                continue
            if k == "betas" and not (isinstance(plain, tuple) and all(_finite_number(b) for b in plain)):
                problems.append(f"{where}: {_brief(plain)} is not two finite numbers")
                continue
            if k in fields:
                try:
                    dataclasses.replace(opt.config, **{k: plain})
                except (ValueError, TypeError) as e:
                    problems.append(f"{where}: {e}")
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
            raise ValueError(f"{_brief(v)} nests lists or objects; a checkpoint holds numbers, strings and flat "
                             "lists of them")
        items = [_tensor_number(x) if isinstance(x, dict) else x for x in v]
        return items if isinstance(current, list) else tuple(items)
    return v


def _tensor_number(v: dict):
    """The number of a tensor saved as {"tensor": number}."""
    x = v.get("tensor")
    if set(v) != {"tensor"} or not isinstance(x, numbers.Real) or isinstance(x, bool):
        raise ValueError(f"{_brief(v)} is not a value save_optimizer writes (a tensor is {{'tensor': number}})")
    return x
