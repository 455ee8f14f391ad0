"""The checkpoint file as a container: one safetensors file, read and written safely, knowing no optimizer.

- writing: the checksum (sha256 over the metadata and every tensor's name, dtype, shape and bytes), the atomic
  write (temporary file in the same directory, fsync, rename) and the removal of temporaries that earlier saves
  of the same target left behind (named ``.{target}.{host}-{pid}.{random}.tmp``: a dead writer's at once,
  anyone's after :data:`TEMP_MAX_AGE_S` seconds without a write);
- reading: the header, bounded before it is read (its length, its entry count) and checked for structure before
  anything is built from it, so that a hostile file is rejected cheaply; then format and version, the tiling of
  the data region and the shape of the 'meta' JSON; then the tensors, verified against the checksum.

What a checkpoint must hold for a given optimizer is checkpoint_check.py's job; checkpoint.py is the front door.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import re
import socket
import stat
import tempfile
import time

import safetensors.torch
from torch import Tensor

__all__ = ["CheckpointError", "FORMAT", "FORMAT_VERSION", "MAX_HEADER", "TEMP_MAX_AGE_S", "brief", "checksum",
           "write_atomic", "read_header", "read_checked_header", "read_tensors", "read_verified"]

FORMAT = "lowrank_compile.optim"
FORMAT_VERSION = 1
MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header
_MAX_NDIM = 16  # a tensor in a header with more dimensions is rejected (ours have at most 2)
# A temporary file nobody has written to for this long is abandoned, whoever wrote it (another host, or a pid
# since reused by another process); one whose writer (on this host) has exited is removed at once.
TEMP_MAX_AGE_S = 600
# safetensors' dtype names: bytes per element.
_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this optimizer: corrupt, truncated, or made for another one."""

    __module__ = "lowrank_compile.checkpoint"  # its public home (tracebacks and pickles name it there)


def brief(v, limit: int = 80) -> str:
    """repr(v), cut to `limit` characters (a file's values go into messages)."""
    text = repr(v)
    return text if len(text) <= limit else text[:limit] + "..."


# -- writing ---------------------------------------------------------------------------------------------------
def _tensor_bytes(t: Tensor):
    """A zero-copy view of a contiguous CPU tensor's bytes."""
    n = t.numel() * t.element_size()
    return (ctypes.c_ubyte * n).from_address(t.data_ptr()) if n else b""


def checksum(header: dict[str, str], tensors: dict[str, Tensor]) -> str:
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


def write_atomic(tensors: dict[str, Tensor], header: dict[str, str], path: str) -> None:
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


# -- reading ---------------------------------------------------------------------------------------------------
def read_header(path: str | os.PathLike, *, max_bytes: int = MAX_HEADER,
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
            raise CheckpointError(f"{what} has dtype {brief(dtype)}, not a dtype name; the file is corrupted")
        if not (isinstance(shape, list) and len(shape) <= _MAX_NDIM
                and all(type(d) is int and d >= 0 for d in shape)):
            raise CheckpointError(f"{what} has shape {brief(shape)}, not a list of at most {_MAX_NDIM} ints >= 0; "
                                  "the file is corrupted")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)
                and offsets[0] <= offsets[1]):
            raise CheckpointError(f"{what} has data_offsets {brief(offsets)}, not two ints 0 <= begin <= end; the "
                                  "file is corrupted")
        if dtype in _ST_ITEMSIZE and offsets[1] - offsets[0] != math.prod(shape) * _ST_ITEMSIZE[dtype]:
            raise CheckpointError(f"{what}: {offsets[1] - offsets[0]} bytes of data for shape {shape} {dtype}; the "
                                  "file is corrupted")


def read_checked_header(path: str, max_bytes: int = MAX_HEADER,
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
        fail(f"'layers' is {brief(layers)}, not a list")
    names = set()
    for i, e in enumerate(layers):
        if not isinstance(e, dict):
            fail(f"layers[{i}] is a {type(e).__name__}, not an object")
        if not isinstance(e.get("name"), str):
            fail(f"layers[{i}] has name {brief(e.get('name'))}, not a string")
        if not isinstance(e.get("has_state"), bool):
            fail(f"layers[{i}] ({e['name'][:200]!r}) has has_state {brief(e.get('has_state'))}, not true or false")
        if e["name"] in names:
            fail(f"parameter {e['name'][:200]!r} is listed twice")
        names.add(e["name"])
    groups = meta.get("param_groups")
    if not (isinstance(groups, list) and all(isinstance(g, dict) for g in groups)):
        fail(f"'param_groups' is {brief(groups)}, not a list of objects")
    if not isinstance(meta.get("config", {}), dict):
        fail(f"'config' is {brief(meta.get('config'))}, not an object")


def read_tensors(path: str, metadata: dict) -> dict[str, Tensor]:
    """The tensors (on CPU) of a checkpoint whose header checked out, verified against its checksum."""
    try:
        tensors = safetensors.torch.load_file(path, device="cpu")
    except Exception as e:  # safetensors' own validation: dtypes, shapes vs offsets, overlaps
        raise CheckpointError(f"{path}: safetensors cannot read it ({e}); the file is corrupted") from None
    actual = checksum(metadata, tensors)
    if actual != metadata["checksum"]:
        raise CheckpointError(f"{path} fails its checksum ({actual[:19]}... computed, {metadata['checksum'][:19]}... "
                              "recorded): the file is corrupted")
    return tensors


def read_verified(path: str) -> tuple[dict, dict[str, Tensor]]:
    """Metadata and tensors (on CPU) of a checkpoint whose format, version, size and checksum check out."""
    _, metadata, meta = read_checked_header(path)
    return meta, read_tensors(path, metadata)
