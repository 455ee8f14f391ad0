"""How Adam's states are stored, and how low-precision weights are written back.

State storage (``state_dtype``), for the rank-r states of projected layers and the full states of plain
AdamW parameters alike:

- "fp32", "bf16": plain tensors.
- "int8", "int4", "fp8": torchao's optimizer-state tensor subclasses, block-wise quantised:
  OptimState8bit (8-bit dynamic-tree codes, arXiv:2110.02861; block 256), OptimState4bit (4-bit codes,
  arXiv:2309.01507; block 128; the second moment uses a linear map without zero) and OptimStateFp8
  (float8_e4m3fn codes; block 256). Each block of the flattened state has one fp32 scale, its absmax.
  As torchao and bitsandbytes do, a tensor with fewer than 4096 elements, or a number of elements that
  is not a multiple of the block size, stays fp32: see :func:`storage_kind` and :func:`fallback_reason`.

The update math is always fp32: :func:`dequantize` gives the fp32 value of any state, and ``state.copy_(x)``
requantises (torchao implements copy_ for its subclasses).

Weights in bf16 are written back with stochastic rounding (:func:`round_to_bf16`): each element is rounded
up or down with probabilities that make the rounding unbiased, so updates far below a bf16 ulp still move
the weight on average. Its random bits come from a key mixed from (seed, parameter index, step) — never from
torch's global RNG — so they are the same on every rank and a resumed run repeats them exactly: the seed is a
param-group value and the step is in the checkpoint, so no generator state needs saving. The key is derived
from the step counter with tensor ops (:func:`counter_key`) and each element's bits are a hash of the key and
the element's index, so nothing is read on the host (no synchronisation; CUDA-graph safe) and eager and
compiled updates round bit for bit alike. Eagerly the hash is a couple of dozen int64 passes; the optimizer
therefore runs :func:`round_to_bf16` through torch.compile (one fused kernel) unless ``compile_step=False``.
"""
from __future__ import annotations

import functools
import logging
import math

import torch
from torch import Tensor

from . import _torchao

__all__ = ["STATE_KINDS", "BLOCK_SIZE", "MIN_QUANT_NUMEL", "storage_kind", "fallback_reason", "check_available",
           "new_state", "kind_of", "is_quantized", "dequantize", "zero_", "state_parts", "part_specs",
           "state_from_parts", "state_nbytes", "rounding_key", "counter_base", "counter_key", "counter_uniform",
           "round_to_bf16"]

logger = logging.getLogger(__name__)

STATE_KINDS = ("fp32", "bf16", "int8", "int4", "fp8")
QUANTIZED = ("int8", "int4", "fp8")
# torchao's defaults (torchao/optim/adam.py: Adam8bit/AdamFp8 block_size=256, Adam4bit block_size=128).
BLOCK_SIZE = {"int8": 256, "int4": 128, "fp8": 256}
# torchao/optim/adam.py _new_buffer: "follow bitsandbytes, only quantize tensors >= 4096 values".
MIN_QUANT_NUMEL = 4096

_PLAIN_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# What plain states can be stored as: "fp64" is what state_dtype="fp32" gives fp64 weights.
_STORED_PLAIN = {**_PLAIN_DTYPES, "fp64": torch.float64}


def fallback_reason(shape, state_dtype: str) -> str | None:
    """Why a state of `shape` cannot be stored as `state_dtype` (and stays fp32), or None if it can."""
    if state_dtype not in QUANTIZED:
        return None
    numel = math.prod(shape)
    block = BLOCK_SIZE[state_dtype]
    if numel < MIN_QUANT_NUMEL:
        return f"{numel} elements < {MIN_QUANT_NUMEL}"
    if numel % block:
        return f"{numel} elements not a multiple of the block size {block}"
    return None


def storage_kind(shape, state_dtype: str) -> str:
    """The kind a state of `shape` is actually stored as under `state_dtype`: itself, or "fp32" (fallback)."""
    if state_dtype not in STATE_KINDS:
        raise ValueError(f"unknown state_dtype {state_dtype!r}; choose one of {STATE_KINDS}")
    return "fp32" if fallback_reason(shape, state_dtype) else state_dtype


def _subclass(kind: str):
    return {"int8": _torchao.OptimState8bit, "int4": _torchao.OptimState4bit, "fp8": _torchao.OptimStateFp8}[kind]


def _zeros_quantized(kind: str, shape, signed: bool, device) -> Tensor:
    cls = _subclass(kind)
    if kind == "fp8":  # e4m3 codes carry their own sign: one kind for both moments
        return cls.zeros(tuple(shape), BLOCK_SIZE[kind], device=device, dtype=torch.float32)
    return cls.zeros(tuple(shape), signed, BLOCK_SIZE[kind], device=device, dtype=torch.float32)


def check_available(state_dtype: str, device: torch.device | str = "cpu") -> None:
    """Raise a RuntimeError if `state_dtype` cannot run here (torchao missing, or the device lacks the op)."""
    if state_dtype in _PLAIN_DTYPES:
        return
    if state_dtype not in QUANTIZED:
        raise ValueError(f"unknown state_dtype {state_dtype!r}; choose one of {STATE_KINDS}")
    _torchao.require(f"state_dtype={state_dtype!r}")
    if state_dtype == "fp8" and not hasattr(torch, "float8_e4m3fn"):
        raise RuntimeError(f"state_dtype='fp8' needs torch.float8_e4m3fn, which torch {torch.__version__} lacks; "
                           "use 'int8'")
    try:  # one block through the real ops: quantise, dequantise
        s = _zeros_quantized(state_dtype, (MIN_QUANT_NUMEL,), True, device)
        s.copy_(torch.linspace(-1, 1, MIN_QUANT_NUMEL, device=device))
        s.dequantize()
    except Exception as e:
        raise RuntimeError(f"state_dtype={state_dtype!r} cannot run on device {device!s} with torch "
                           f"{torch.__version__} / torchao {_torchao.torchao_version}: {e}; use 'fp32' or "
                           "'bf16'") from e


def new_state(shape, state_dtype: str, *, signed: bool, device: torch.device | str) -> Tensor:
    """A zero Adam moment of `shape` stored as `state_dtype` (fp32 where the shape does not fit the blocks).

    signed: True for the first moment, False for the second (torchao uses an unsigned code map for it).
    The result has the appearance dtype fp32 whatever its storage.
    """
    kind = storage_kind(shape, state_dtype)
    if kind in _PLAIN_DTYPES:
        return torch.zeros(tuple(shape), dtype=_PLAIN_DTYPES[kind], device=device)
    return _zeros_quantized(kind, shape, signed, device)


def is_quantized(t: Tensor) -> bool:
    return _torchao.OptimState8bit is not None and isinstance(
        t, (_torchao.OptimState8bit, _torchao.OptimState4bit, _torchao.OptimStateFp8))


def kind_of(t: Tensor) -> str:
    """The storage kind of a state tensor: "fp32", "bf16", "int8", "int4", "fp8" (or "fp64")."""
    if is_quantized(t):
        if isinstance(t, _torchao.OptimState8bit):
            return "int8"
        if isinstance(t, _torchao.OptimState4bit):
            return "int4"
        return "fp8"
    kinds = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float64: "fp64"}
    if t.dtype not in kinds:
        raise TypeError(f"not an Adam state: a {t.dtype} tensor")
    return kinds[t.dtype]


def dequantize(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """The value of a state as a plain tensor of `dtype` (None: fp32 for quantised states, else t's own).

    A new tensor for a quantised state or a dtype change; t itself for a plain state already in `dtype`
    (so ``m is not t`` tells the caller to write back with ``t.copy_(m)``).
    """
    if is_quantized(t):
        return t.dequantize(dtype or torch.float32)
    return t if dtype is None else t.to(dtype)


def zero_(t: Tensor) -> Tensor:
    """Set a state to zero in place (a quantised state: every block's scale to 0, so it dequantises to 0)."""
    if is_quantized(t):
        t.codes.zero_()
        t.scale.zero_()
    else:
        t.zero_()
    return t


def state_parts(t: Tensor) -> dict[str, Tensor]:
    """The plain tensors that store a state: {"": t} for a plain one, {"codes", "scale"} for a quantised one.

    torchao's code maps (qmap) are constants of the library and are not part of the stored state.
    """
    if is_quantized(t):
        return {"codes": t.codes, "scale": t.scale}
    return {"": t}


def part_specs(shape, kind: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of each part of a state of `shape` stored as `kind` (what state_parts returns)."""
    shape = tuple(shape)
    numel = math.prod(shape)
    if kind in _STORED_PLAIN:
        return {"": (shape, _STORED_PLAIN[kind])}
    scale = ((numel // BLOCK_SIZE[kind],), torch.float32)
    if kind == "int8":
        return {"codes": (shape, torch.uint8), "scale": scale}
    if kind == "int4":
        return {"codes": ((numel // 2,), torch.uint8), "scale": scale}  # two codes per byte
    if kind == "fp8":
        return {"codes": (shape, torch.float8_e4m3fn), "scale": scale}
    raise ValueError(f"unknown state kind {kind!r}; choose one of {STATE_KINDS}")


def state_from_parts(shape, kind: str, parts: dict[str, Tensor], *, signed: bool, device) -> Tensor:
    """Rebuild a state exactly (same bits) from the tensors :func:`state_parts` gave."""
    if kind in _STORED_PLAIN:
        return parts[""].to(device=device, dtype=_STORED_PLAIN[kind], copy=True)
    out = _zeros_quantized(kind, shape, signed, device)
    out.codes.copy_(parts["codes"])
    out.scale.copy_(parts["scale"])
    return out


def state_nbytes(t: Tensor) -> int:
    """Bytes a state occupies (codes and scales for a quantised one; the shared code map not counted)."""
    return sum(p.numel() * p.element_size() for p in state_parts(t).values())


# -- stochastic rounding ------------------------------------------------------------------------------------
_M64 = 0xFFFFFFFFFFFFFFFF
_M32 = 0xFFFFFFFF


def _splitmix64(x: int) -> int:
    """One step of SplitMix64 (Steele, Lea, Flood 2014): a 64-bit mixing function on Python ints."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def rounding_key(seed: int, index: int, step: int) -> int:
    """The 64-bit key of one write-back: parameter number `index` of the optimizer at step `step`."""
    return _splitmix64(_splitmix64(_splitmix64(seed & _M64) ^ index) ^ step)


def round_to_bf16(x: Tensor, key: Tensor | None = None, offset: int | Tensor = 0) -> Tensor:
    """fp32 -> bf16: to nearest when `key` is None, else stochastically.

    Stochastic rounding adds 16 random bits below bf16's last bit and truncates: it rounds away from zero
    with probability (dropped bits) / 2^16, so E[result] = x (as torchao's _fp32_to_bf16_sr does). The bits are
    a counter-based hash of the 0-d int64 key (:func:`counter_key`) and offset + each element's flat index: no
    generator and no host read, the same bits eager and compiled (where the hash fuses into the write-back). A
    write-back done in row chunks passes each chunk's flat offset, so its bits do not depend on the chunking.
    """
    if key is None:
        return x.to(torch.bfloat16)
    x = x.float().contiguous()
    noise = (_counter_bits(key, offset, x.shape, x.device) >> 16).to(torch.int32)
    return ((x.view(torch.int32) + noise) & -65536).view(torch.float32).to(torch.bfloat16)  # -65536: 0xFFFF0000


def _counter_bits(key: Tensor, offset: int | Tensor, shape, device) -> Tensor:
    """32 random bits (int64 in [0, 2^32)) for each element of a tensor of `shape`: a hash of the 0-d int64 key
    (counter_key) and the element's flat index offset + i. Pure tensor ops: traceable, no host read. offset: an
    int, or a 0-d int64 tensor (what compiled callers pass, so that each row chunk does not compile a graph)."""
    if isinstance(offset, Tensor):
        counter = (torch.arange(math.prod(shape), dtype=torch.int64, device=device) + offset).view(shape)
    else:
        counter = torch.arange(offset, offset + math.prod(shape), dtype=torch.int64, device=device).view(shape)
    return _hash32(_hash32(counter ^ key) ^ _hash32(key ^ 0x5BD1E995))


def counter_uniform(key: Tensor, offset: int | Tensor, shape, device) -> Tensor:
    """Uniform fp32 noise in [0, 1) (24-bit resolution) from the same counter hash as :func:`round_to_bf16`, for
    the stochastic rounding of int8 weights (int8_weights.py): element i of the result is keyed by offset + i."""
    return (_counter_bits(key, offset, tuple(shape), device) >> 8).to(torch.float32) * (1.0 / (1 << 24))


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32), without int64 overflow: c is split in 16-bit halves."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _hash32(x: Tensor) -> Tensor:
    """A 32-bit integer mixing function (Wellons' "lowbias32") on int64 tensors, on their low 32 bits."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


@functools.lru_cache(maxsize=None)
def counter_base(seed: int, index: int, device: torch.device | str = "cpu") -> Tensor:
    """The per-parameter part of a counter-based rounding key: a 0-d int64 tensor on `device` from (seed, index),
    cached (treat it as read-only). On the parameter's device, so a captured CUDA graph reads it, not a constant."""
    return torch.full((), rounding_key(seed, index, 0) & _M32, dtype=torch.int64, device=device)


def counter_key(base: Tensor, step: Tensor) -> Tensor:
    """The 0-d int64 key of one write-back from :func:`counter_base` and the (already advanced) step counter, a
    tensor: computed with tensor ops, so the step is never read on the host."""
    return _hash32(_hash32(step.to(torch.int64)) ^ base)


def state_shape(opt, p: Tensor) -> tuple[int, ...]:
    """The shape of p's Adam moments in a LowRankAdamW: rank-r for a projected weight, p's own otherwise."""
    layer = opt.layers.get(p)
    return tuple(layer.lowrank_grad.shape) if layer is not None else tuple(p.shape)


def log_storage(opt) -> None:
    """Log how a LowRankAdamW stores its states: under a quantised state_dtype, which ones stay fp32 and why."""
    names = opt.param_names
    total, fallbacks, state_dtypes = 0, [], set()
    for group in opt.trained_groups:
        if group["state_dtype"] not in QUANTIZED:
            continue
        state_dtypes.add(group["state_dtype"])
        for p in group["params"]:
            total += 1
            reason = fallback_reason(state_shape(opt, p), group["state_dtype"])
            if reason:
                fallbacks.append(f"{names.get(p, tuple(p.shape))} ({reason})")
    if total:
        logger.info("state_dtype %s: %d of %d parameters' states quantised; fp32 for the rest, too small or not a "
                    "multiple of the block size as in torchao and bitsandbytes%s", "/".join(sorted(state_dtypes)),
                    total - len(fallbacks), total, (": " + ", ".join(fallbacks)) if fallbacks else "")
