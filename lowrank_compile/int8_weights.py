"""int8 weight storage (``weight_dtype="int8"``): block-wise symmetric int8 codes and fp32 scales, and the
stochastically rounded write-back of an update into them.

A projected layer's weight W (rows, cols), as stored, becomes ``codes`` int8 (rows, cols) and ``scale`` fp32
(rows, cols / B): W ~= codes * scale, one scale per block of B consecutive elements of a row (along the input
dim of an nn.Linear; along the stored rows of a transposed Conv1D). Codes lie in [-127, 127] (symmetric, no
-128, no zero point). Encoding and decoding are torchao's primitives (choose_qparams_affine / quantize_affine /
dequantize_affine, block_size (1, B)); ``state_dict()`` shows the weight as torchao's ``Int8Tensor`` over the
same codes and scales (:func:`as_int8_tensor`).

Block size, B = 128 (:data:`BLOCK`), measured (1024 x 4096, weights * 0.02, torchao round trip, relative RMS
error; fp32 scale overhead in parentheses): Gaussian B=32 5.4e-3 (12.5%), 64 5.9e-3 (6.2%), 128 6.5e-3 (3.1%),
256 7.0e-3 (1.6%), per row 8.7e-3; Student-t(4) 7.3e-3, 8.9e-3, 1.08e-2, 1.30e-2, 2.6e-2; Student-t(3)
8.5e-3, 1.09e-2, 1.38e-2, 1.74e-2, 4.3e-2. 128 keeps heavy-tailed weights near 1% for 3% of extra memory
(0.2 GB at 7B); halving it buys ~20% less error for twice the overhead. A row length that is not a multiple
of 128 uses gcd(cols, 128) (:func:`block_size`).

Write-back (:func:`write_rows_`): new = dequant(W) * decay + delta in fp32, per row chunk, then re-encoded with
stochastic rounding: code = floor(q + u), u uniform in [0, 1) from quant.py's counter hash of (seed, parameter
index, step) and each element's flat index, so E[code * scale] = new (unbiased), the bits are the same on
every process and after a resume, and no host synchronisation is needed. A block keeps its scale unless its
range changed enough: re-choosing scales at every step would re-round every element of every block at every
step, a random walk of one code step per element and step, even where the update is far below a code step.
The rule, on the block's new absmax a and scale s:
  - grow when a > 127 s (the codes cannot represent it);
  - shrink when a < 63 s (the block uses under half its range: a bit of precision lost);
  - otherwise keep s, and round q = code + (new - old) / s (the change is computed from the update, not by
    re-dividing the reconstructed weight, so a zero update gives q = code exactly and leaves codes and scales
    bit for bit).
A re-scaled block gets s = a / 120 (6% headroom, so a block that grows slowly is not re-scaled at every
step) and q = new / s. Since stochastic rounding gives floor(q) >= 63 for q >= 63, every block keeps a code
of magnitude >= 63 after a write-back, so a zero update never triggers a shrink either.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import quant

__all__ = ["BLOCK", "QMAX", "block_size", "scale_shape", "quantize", "dequantize", "dequantize_t", "empty_storage",
           "write_rows_", "as_int8_tensor", "is_int8_tensor"]

BLOCK = 128  # elements per scale, along each stored row (see the measurement above)
QMAX = 127  # codes in [-QMAX, QMAX]
_SHRINK_CODE = 63.0  # re-scale when the block's absmax falls below this many steps of its scale
_RESCALE_CODE = 120.0  # a re-scaled block's absmax lands at this code (headroom against re-scaling every step)
_EPS = torch.finfo(torch.float32).tiny  # smallest scale (an all-zero block)


def block_size(cols: int) -> int:
    """Elements per scale for rows of `cols` elements: BLOCK, or gcd(cols, BLOCK) when BLOCK does not divide it."""
    return math.gcd(cols, BLOCK)


def scale_shape(shape) -> tuple[int, int]:
    rows, cols = shape
    return rows, cols // block_size(cols)


def _qparams(w: Tensor) -> tuple[Tensor, Tensor]:
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine

    return choose_qparams_affine(w, MappingType.SYMMETRIC, (1, block_size(w.shape[1])), torch.int8, -QMAX, QMAX,
                                 eps=_EPS, scale_dtype=torch.float32, keepdim=True)


def quantize(w: Tensor, max_elems: int = 1 << 22) -> tuple[Tensor, Tensor]:
    """(codes, scale) of a 2-D floating weight, rounded to nearest (torchao), in row chunks of about max_elems
    elements so that the fp32 temporaries stay small."""
    from torchao.quantization.quant_primitives import quantize_affine

    if w.ndim != 2 or not w.is_floating_point():
        raise ValueError(f"int8 weights are 2-D floating tensors, got {w.dtype} of shape {tuple(w.shape)}")
    codes, scale = empty_storage(w.shape, w.device)
    if w.is_meta:
        return codes, scale
    rows = max(1, max_elems // max(1, w.shape[1]))
    block = (1, block_size(w.shape[1]))
    for start in range(0, w.shape[0], rows):
        chunk = w[start:start + rows]
        s, z = _qparams(chunk)
        codes[start:start + rows] = quantize_affine(chunk, block, s, z, torch.int8, -QMAX, QMAX)
        scale[start:start + rows] = s
    return codes, scale


def empty_storage(shape, device) -> tuple[Tensor, Tensor]:
    """Uninitialised (codes, scale) for a weight of `shape` on `device` (meta: allocates nothing)."""
    return (torch.empty(tuple(shape), dtype=torch.int8, device=device),
            torch.empty(scale_shape(shape), dtype=torch.float32, device=device))


def dequantize(codes: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """codes * scale per block, in `dtype` (torchao's dequantize_affine; fp32 products, then cast)."""
    from torchao.quantization.quant_primitives import dequantize_affine

    out = torch.float32 if dtype == torch.float64 else dtype
    w = dequantize_affine(codes, (1, block_size(codes.shape[1])), scale, None, torch.int8, -QMAX, QMAX,
                          output_dtype=out)
    return w if out == dtype else w.to(dtype)


def dequantize_t(codes: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """dequantize(codes, scale, dtype).t(), (cols, rows), with the same bits, formed from the transposed codes.

    Backward's dequantisation. torch.compile runs CSE over the joint forward-backward graph: a backward that
    repeated forward's dequantize(codes, scale) would be merged with it, and the partitioner then saved the
    full-precision weight of every layer for backward (measured: 4 bytes per weight element held from forward to
    backward instead of none). Starting from codes.t(), these ops are not forward's, and backward dequantises
    from the codes it saved.
    """
    from torchao.quantization.quant_primitives import dequantize_affine

    out = torch.float32 if dtype == torch.float64 else dtype
    w = dequantize_affine(codes.t(), (block_size(codes.shape[1]), 1), scale.t(), None, torch.int8, -QMAX, QMAX,
                          output_dtype=out)
    return w if out == dtype else w.to(dtype)


def write_rows_(codes: Tensor, scale: Tensor, delta: Tensor, decay, key: Tensor | None, offset: int) -> None:
    """codes, scale <- encode(dequant(codes, scale) * decay + delta), in place, for a chunk of whole rows.

    delta: the update of these rows (fp32, same shape as codes); decay: None or the factor 1 - lr wd (number or
    0-d tensor); key: a 0-d int64 counter key (quant.counter_key) for stochastic rounding, or None to round to
    nearest; offset: the flat index of codes[0, 0] in the whole weight (the noise does not depend on chunking).
    See the module docstring for the re-scaling rule.
    """
    rows, cols = codes.shape
    nb = cols // block_size(cols)
    old = dequantize(codes, scale)  # (rows, cols) fp32
    change = delta.float()
    if decay is not None:
        change = change.add_(old * (decay - 1))  # decay in fp32 as part of the change: W (d - 1) + delta
    new = old + change
    s = scale.unsqueeze(-1)  # (rows, nb, 1)
    absmax = new.view(rows, nb, -1).abs().amax(-1, keepdim=True)  # (rows, nb, 1)
    rescale = (absmax > QMAX * s) | (absmax < _SHRINK_CODE * s)
    s_new = torch.where(rescale, (absmax / _RESCALE_CODE).clamp_(min=_EPS), s)
    q = torch.where(rescale, new.view(rows, nb, -1) / s_new,
                    codes.view(rows, nb, -1).float() + change.view(rows, nb, -1) / s)
    if key is None:
        u = 0.5
    else:
        u = quant.counter_uniform(key, offset, q.shape, q.device)
    codes.copy_(torch.floor(q + u).clamp_(-QMAX, QMAX).view(rows, cols).to(torch.int8))
    scale.copy_(s_new.squeeze(-1))


def as_int8_tensor(codes: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """torchao's Int8Tensor over these codes and scales (no copy), appearing as `dtype`: what state_dict() holds
    for an int8 weight. ``.dequantize()`` gives the weight; torch.load(weights_only=True) accepts it once torchao
    is imported (it registers the class as a safe global)."""
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor

    return Int8Tensor(codes, scale, [1, block_size(codes.shape[1])], dtype)


def is_int8_tensor(t) -> bool:
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor

    return isinstance(t, Int8Tensor)
