"""Model weights in and out without the model at full precision: ``load_weights`` (fill a wrapped model, built on
the meta device or not, one tensor at a time; int8 layers encode as they load) and ``export_weights`` (a
standard HF-style sharded safetensors folder, written a few tensors at a time)."""
from __future__ import annotations

import json
import os
from typing import Mapping

import torch
from torch import Tensor, nn

from . import int8_weights
from .projection import CARRIER, LowRankLinear, swap_keeping_hooks

__all__ = ["load_weights", "export_weights"]

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


# -- sources ------------------------------------------------------------------------------------------------------
class _FileSource:
    """Tensors of one safetensors file, or of a folder (model.safetensors, or shards listed by its index), read
    one at a time (memory-mapped)."""

    def __init__(self, path: str):
        from safetensors import safe_open

        if os.path.isdir(path):
            index = os.path.join(path, _INDEX)
            if os.path.isfile(index):
                with open(index) as f:
                    weight_map = json.load(f).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise ValueError(f"{index} has no 'weight_map' mapping tensor names to shard files")
                files = {k: os.path.join(path, v) for k, v in weight_map.items()}
            elif os.path.isfile(os.path.join(path, _SINGLE)):
                files = None
                path = os.path.join(path, _SINGLE)
            else:
                raise FileNotFoundError(f"{path} holds neither {_SINGLE} nor {_INDEX}")
        elif os.path.isfile(path):
            files = None
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
        self._handles: dict[str, object] = {}
        if files is None:
            self._handles[path] = safe_open(path, "pt", device="cpu")
            files = {k: path for k in self._handles[path].keys()}
        for f in set(files.values()):
            if f not in self._handles:
                if not os.path.isfile(f):
                    raise FileNotFoundError(f"shard {f} named by the index is missing")
                self._handles[f] = safe_open(f, "pt", device="cpu")
        self._files = files

    def keys(self):
        return self._files.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self._files[key]].get_slice(key).get_shape())

    def get(self, key: str) -> Tensor:
        return self._handles[self._files[key]].get_tensor(key)


class _MappingSource:
    """Any Mapping[str, Tensor], read key by key (a value may be created on access); shapes are known only then."""

    def __init__(self, mapping: Mapping):
        self._mapping = mapping

    def keys(self):
        return self._mapping.keys()

    def shape(self, key: str):
        return None

    def get(self, key: str) -> Tensor:
        value = self._mapping[key]
        if not isinstance(value, Tensor):
            raise TypeError(f"load_weights: source[{key!r}] is a {type(value).__name__}, not a tensor")
        return value


def _source(source):
    if isinstance(source, (str, os.PathLike)):
        return _FileSource(os.fspath(source))
    if isinstance(source, Mapping):
        return _MappingSource(source)
    raise TypeError(f"load_weights: source must be a path (a .safetensors file, or a folder holding {_SINGLE} or "
                    f"{_INDEX}) or a Mapping[str, Tensor], got {type(source).__name__}")


# -- targets ------------------------------------------------------------------------------------------------------
def _targets(model: nn.Module):
    """(slots, own): slots maps each state_dict key to (module, name, is_param); keys of one shared tensor (tied
    weights) are grouped by the tensor's id in `groups`. `own` lists the meta tensors no key fills (non-persistent
    buffers, lowrank_compile's own tensors are excluded: materialize_own_ makes them)."""
    slots, groups, unnamed = {}, {}, []
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = prefix + "." if prefix else ""
        own = isinstance(module, LowRankLinear)
        for name, p in module._parameters.items():
            if p is None or (own and name == CARRIER):
                continue
            slots[dot + name] = (module, name, True)
            groups.setdefault(id(p), []).append(dot + name)
        for name, b in module._buffers.items():
            if b is None:
                continue
            if name in module._non_persistent_buffers_set:
                if b.is_meta and not own:
                    unnamed.append(dot + name)
                continue
            slots[dot + name] = (module, name, False)
            groups.setdefault(id(b), []).append(dot + name)
    return slots, groups, sorted(set(unnamed))


def _expected_shape(module: nn.Module, name: str, is_param: bool) -> tuple[int, ...]:
    return tuple((module._parameters if is_param else module._buffers)[name].shape)


def _assign(module: nn.Module, name: str, is_param: bool, value: Tensor, device: torch.device) -> None:
    """Put `value` into module.name: in place for a materialised tensor; new storage on `device` (same Parameter
    object, by torch.utils.swap_tensors) for a meta one; an int8 (or any wrapped) layer's weight through its layer."""
    if is_param and name == "weight" and isinstance(module, LowRankLinear):
        module.load_weight_(value.to(device))
        return
    table = module._parameters if is_param else module._buffers
    old = table[name]
    if old.is_meta:
        data = value.to(device=device, dtype=old.dtype, copy=True)
        if is_param:
            swap_keeping_hooks(old, nn.Parameter(data, requires_grad=old.requires_grad))
        else:
            table[name] = data
    else:
        old.copy_(value)


def _to_meta(module: nn.Module, name: str, is_param: bool, shape, dtype) -> None:
    """Roll back one loaded tensor of a meta model: back onto the meta device (same Parameter object)."""
    if is_param and name == "weight" and isinstance(module, LowRankLinear):
        module.weight_to_meta_()
        return
    table = module._parameters if is_param else module._buffers
    old = table[name]
    meta = torch.empty(shape, dtype=dtype, device="meta")
    if is_param:
        swap_keeping_hooks(old, nn.Parameter(meta, requires_grad=old.requires_grad))
    else:
        table[name] = meta


@torch.no_grad()
def load_weights(model: nn.Module, source, *, device: torch.device | str = "cpu", strict: bool = True) -> nn.Module:
    """Fill `model` (wrapped or not; built on the meta device or materialised) from `source`, one tensor at a time.

    Args:
        model: typically built under ``torch.device("meta")`` and wrapped by wrap_model (nothing allocated); each
            parameter and persistent buffer is created on `device` as its key is read (the same Parameter
            objects, so the optimizer needs no rebinding), and an int8 layer encodes its weight as it loads, so
            the peak holds one tensor at full precision. A materialised model is copied into in place.
        source: a .safetensors file; a folder holding model.safetensors or a HF sharded index
            (model.safetensors.index.json); or any Mapping[str, Tensor], read lazily key by key (its values may
            be created on access). Keys are the model's state_dict keys; tied weights need one of their keys.
        device: where meta tensors are created.
        strict: True: missing or unexpected keys, and meta tensors no key fills (non-persistent buffers such as
            rotary ``inv_freq``: materialise them first), are errors. False: those are skipped.

    Everything that can be checked first is, before anything changes: keys, meta leftovers, and (files) every
    shape. A Mapping's shapes are known only when read: a wrong one puts a meta model's loaded tensors back on
    the meta device, and for a materialised model every value is read once to check its shape before copying.
    Raises KeyError (keys), ValueError (shapes, leftovers), TypeError (source). Returns the model.
    """
    device = torch.device(device)
    src = _source(source)
    slots, groups, leftover = _targets(model)
    keys = list(src.keys())
    present = set(keys)
    unexpected = [k for k in keys if k not in slots]
    missing = [ks[0] for ks in groups.values() if not any(k in present for k in ks)]
    if strict and (missing or unexpected):
        raise KeyError("load_weights: the source does not match the model: "
                       + (f"missing {_brief(missing)}" if missing else "")
                       + ("; " if missing and unexpected else "")
                       + (f"unexpected {_brief(unexpected)}" if unexpected else "")
                       + " (strict=False loads the keys both have)")
    leftover += [ks[0] for ks in groups.values() if not any(k in present for k in ks)
                 and _table_tensor(slots[ks[0]]).is_meta]
    if strict and leftover:
        raise ValueError(f"load_weights: {_brief(sorted(set(leftover)))} would stay on the meta device (no key in the "
                         "source fills them, e.g. non-persistent buffers such as rotary inv_freq): materialise them "
                         "before calling load_weights, or pass strict=False")
    plan = []  # (key, module, name, is_param, shape, dtype), one key per shared tensor
    for ks in groups.values():
        key = next((k for k in ks if k in present), None)
        if key is not None:
            module, name, is_param = slots[key]
            t = _table_tensor(slots[key])
            plan.append((key, module, name, is_param, tuple(t.shape), t.dtype, t.is_meta))
    bad = [(k, src.shape(k), shape) for k, *_r, shape, _d, _m in plan if src.shape(k) not in (None, shape)]
    if bad:
        raise ValueError("load_weights: shapes differ (source vs model): "
                         + ", ".join(f"{k} {s} vs {e}" for k, s, e in bad[:8]) + (" ..." if len(bad) > 8 else ""))
    if isinstance(src, _MappingSource) and not all(m for *_r, m in plan):  # materialised targets: check first
        _check_shapes(src, plan)
    done = []
    try:
        for key, module, name, is_param, shape, dtype, was_meta in plan:
            value = src.get(key)
            if tuple(value.shape) != shape:
                raise ValueError(f"load_weights: {key} has shape {tuple(value.shape)} in the source, {shape} in the "
                                 "model")
            _assign(module, name, is_param, value, device)
            done.append((module, name, is_param, shape, dtype, was_meta))
            del value
    except BaseException:
        for module, name, is_param, shape, dtype, was_meta in done:
            if was_meta:
                _to_meta(module, name, is_param, shape, dtype)
        raise
    for module in model.modules():
        if isinstance(module, LowRankLinear):
            module.materialize_own_(module.weight.device if not module.weight.is_meta else device)
    _return_freed_heap()
    return model


def _return_freed_heap() -> None:
    """Give the C heap's freed pages back to the system (glibc's malloc_trim; elsewhere nothing). Loading frees a
    full-precision temporary after every tensor, between the kept int8 codes; glibc keeps such freed pages
    resident: 2.4-2.6 GiB after loading a 7B (tools/llama7b_memory.py, ~75 MiB per block), 0.03 GiB trimmed."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to trim
        pass


def _table_tensor(slot) -> Tensor:
    module, name, is_param = slot
    return (module._parameters if is_param else module._buffers)[name]


def _check_shapes(src: _MappingSource, plan) -> None:
    bad = []
    for key, *_r, shape, _d, _m in plan:
        got = tuple(src.get(key).shape)
        if got != shape:
            bad.append(f"{key} {got} vs {shape}")
    if bad:
        raise ValueError("load_weights: shapes differ (source vs model): " + ", ".join(bad[:8]))


def _brief(names: list[str], k: int = 8) -> str:
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


# -- export -------------------------------------------------------------------------------------------------------
@torch.no_grad()
def export_weights(model: nn.Module, path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16, *,
                   max_shard_bytes: int = 1 << 28) -> list[str]:
    """Write the model's weights as a standard HF-style safetensors folder: shards
    ``model-0000k-of-0000n.safetensors`` of at most max_shard_bytes (or one tensor, if larger) and
    ``model.safetensors.index.json``, the original state_dict keys, floating tensors in `dtype` (int8 weights
    dequantised), and ``config.json`` when the model has a transformers ``config``. Only one shard's tensors are
    converted at a time, so the peak is about max(max_shard_bytes, the largest tensor), never the model; a
    tensor shared under several keys (tied embeddings) is written once, under its first key, as
    save_pretrained does. Works on wrapped and plain models. Returns the files written.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    sd = model.state_dict()  # references (int8 layers: Int8Tensor views of their codes), no copies
    entries, seen = [], set()
    for key, t in sd.items():
        base = t.qdata if int8_weights.is_int8_tensor(t) else t
        ident = (base.untyped_storage().data_ptr(), base.storage_offset(), tuple(base.shape)) if base.numel() else None
        if ident is not None and ident in seen:
            continue
        seen.add(ident)
        out_dtype = dtype if t.is_floating_point() else t.dtype
        entries.append((key, t, t.numel() * torch.empty((), dtype=out_dtype).element_size(), out_dtype))
    shards, size = [[]], 0
    for e in entries:
        if shards[-1] and size + e[2] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e[2]
    from safetensors.torch import save_file

    n, weight_map, written = len(shards), {}, []
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for key, t, _b, out_dtype in shard:
            value = t.dequantize(out_dtype) if int8_weights.is_int8_tensor(t) else t.detach().to(out_dtype)
            tensors[key] = value.to("cpu").contiguous()
            weight_map[key] = name
        save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
        written.append(name)
        del tensors
    with open(os.path.join(path, _INDEX), "w") as f:
        json.dump({"metadata": {"total_size": sum(e[2] for e in entries)}, "weight_map": weight_map}, f, indent=2)
    written.append(_INDEX)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_file"):
        import copy

        config = copy.deepcopy(config)
        setattr(config, "dtype" if hasattr(config, "dtype") else "torch_dtype", dtype)
        config.to_json_file(os.path.join(path, "config.json"))
        written.append("config.json")
    return written
