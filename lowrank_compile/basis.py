"""Orthonormal bases for the projection: the DCT-II (default) and a seeded random one.

A basis of size n is an (n, n) matrix D with D^T D = I; column k is the k-th basis vector. Bases are
built once per (kind, n, dtype, device) and shared by every layer of that size. ``x @ D`` — the
transform of each row of x — is what a refresh needs; for the DCT it is computed by FFT for the sizes where
measurement found it faster (use_fft: a fixed rule on n, never a timing at run time, so results are reproducible
bit for bit).
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

__all__ = ["dct_matrix", "random_orthonormal_matrix", "use_fft", "dct_rows", "dct_rows_fft", "basis_matrix",
           "gather_columns", "transform_rows", "idct_rows_fft", "project_rows_fft", "back_project_rows_fft",
           "use_fft_projection", "project_rows"]

# Rows of x @ D by FFT (Makhoul) instead of matmul: from SMOOTH_FFT_MIN_SIZE on for sizes whose prime factors are
# all in _SMOOTH_PRIMES (what MKL's FFT has fast radix kernels for), from FFT_MIN_SIZE on for every size. Measured
# with tools/fft_threshold.py (2-core CPU, fp32, torch 2.13, T = 512-4096 rows): FFT / matmul 0.8-1.7 at n=192,
# 0.53-0.63 at 256, 0.43-0.47 at 384, 0.27-0.40 at 512; but 1.0-2.1 at the primes 251 and 257, 0.56-0.92 at 509. Inside
# a whole exact refresh (projection.rank_r_grad, T = 1024) the FFT gained 7-23 % from n = 256 on and nothing at 192.
FFT_MIN_SIZE = 512
SMOOTH_FFT_MIN_SIZE = 256
_SMOOTH_PRIMES = (2, 3, 5, 7, 11, 13)
# Row chunks of the CPU FFT transform: 2^20 elements (4 MiB of fp32 input) per chunk. At 2048 x 2048 and
# 4096 x 4096 chunks of 2^18-2^20 elements halved the time against one whole pass; 2^16 lost some of it.
FFT_CHUNK_ELEMS = 1 << 20
# x @ D_r (rank r of n) by the DCT of every row and a gather, where r >= FFT_PROJECTION_RANK_PER_LOG2 * log2(n) and
# use_fft(n): the FFT's cost grows with log n, the matmul's with r. Measured with tools/fft_projection.py (2-core CPU,
# fp32, T = 1024; docs/bench/fft_projection/): FFT / matmul 1.22 at n=1024 r=256, 0.89 at r=384, 0.75 at r=512;
# 1.03 at n=2048 r=512, 0.68 at r=768; 0.51 at n=4096 r=1024. The back-projection u @ D_r^T by scatter and inverse
# FFT won only from r = n/2 at n >= 2048 (0.67) and needs a full-width temporary, so it stays a matmul.
FFT_PROJECTION_RANK_PER_LOG2 = 40

RANDOM_BASIS_SEED = 0


@functools.lru_cache(maxsize=32)
def dct_matrix(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
    """Orthonormal DCT-II basis of size n: column k is s_k sqrt(2/n) cos(pi k (2j+1) / 2n).

    Built in float64 and cast, so every dtype rounds the same exact values. Cached by (n, dtype, device);
    treat the result as read-only.
    """
    if n < 1:
        raise ValueError(f"DCT size must be >= 1, got {n}")
    j = torch.arange(n, dtype=torch.float64)
    D = torch.cos(math.pi * j[None, :] * (2 * j[:, None] + 1) / (2 * n)) * math.sqrt(2.0 / n)  # (n, n): [j, k]
    D[:, 0] *= math.sqrt(0.5)
    return D.to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=32)
def random_orthonormal_matrix(
    n: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", seed: int = RANDOM_BASIS_SEED
) -> Tensor:
    """A fixed random orthonormal basis of size n (QR of a seeded Gaussian matrix, in float64 on CPU).

    The generator is seeded from (seed, n) alone, so every process and device gets the same basis.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + n)
    q, upper = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(upper))[None, :]  # unique QR: positive diagonal of R
    return q.to(dtype=dtype, device=device)


_FFT_PLANS: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}


def _fft_plan(n: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(perm, twiddle, take) of the size-n DCT by FFT (built in float64).

    perm: the Makhoul reordering as gather indices. twiddle: i exp(-i pi k / 2n) for k <= n/2, with the
    orthonormal scales folded in; the factor i puts X_k in the imaginary part and X_{n-k} in the real part, so
    no negation pass is needed. take: where each X_j sits in the interleaved (re, im) view of the half spectrum.
    Cached in eager mode; under torch.compile built inline (a few small ops), so no graph reads a global cache.
    """
    key = (n, dtype, torch.device(device))
    compiling = torch.compiler.is_compiling()
    plan = None if compiling else _FFT_PLANS.get(key)
    if plan is None:
        perm = torch.cat([torch.arange(0, n, 2, device=device), torch.arange(1, n, 2, device=device).flip(0)])
        k = torch.arange(n // 2 + 1, dtype=torch.float64, device=device)
        twiddle = torch.polar(torch.full_like(k, math.sqrt(2.0 / n)), k * (-math.pi / (2 * n)) + math.pi / 2)
        twiddle[0] *= math.sqrt(0.5)
        j = torch.arange(n, device=device)
        take = torch.where(j <= n // 2, 2 * j + 1, 2 * (n - j))  # Im(i Z_j) = X_j; Re(i Z_k) = X_{n-k}
        plan = (perm, twiddle.to(torch.complex128 if dtype == torch.float64 else torch.complex64), take)
        if not compiling:
            _FFT_PLANS[key] = plan
    return plan


def dct_rows_fft(x: Tensor) -> Tensor:
    """Orthonormal DCT-II of every row of x by one real FFT of length n (Makhoul, 1980); equals x @ dct_matrix(n).

    With v the even samples followed by the odd ones reversed, V = rfft(v) and Z_k = V_k exp(-i pi k / 2n),
    X_k = Re Z_k for k <= n/2 and X_{n-k} = -Im Z_k: the half spectrum gives every coefficient. Four passes: the
    reordering gather, the FFT, the twiddle product and one gather of the coefficients out of i Z (20-25 %
    faster than copying real and flipped, negated imaginary parts separately). On CPU, inputs above
    FFT_CHUNK_ELEMS go through in row chunks, so the passes work in cache (2x faster at 2048 x 2048 and up); every
    row is transformed alone, so chunking does not change a bit.
    """
    n = x.shape[-1]
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    perm, twiddle, take = _fft_plan(n, compute, x.device)
    x2 = x.reshape(-1, n).to(compute)
    rows = x2.shape[0]
    if rows == 0:  # MKL's FFT rejects an empty batch
        return x.clone()
    chunk = rows
    if x2.device.type == "cpu" and not torch.compiler.is_compiling():
        chunk = max(1, FFT_CHUNK_ELEMS // n)
    if chunk >= rows:
        out = _dct_rows_fft_2d(x2, perm, twiddle, take)
    else:
        out = torch.empty_like(x2)
        for start in range(0, rows, chunk):  # the copy of a chunk's result runs in cache
            out[start:start + chunk] = _dct_rows_fft_2d(x2[start:start + chunk], perm, twiddle, take)
    return out.view(x.shape).to(x.dtype)


def _dct_rows_fft_2d(x2: Tensor, perm: Tensor, twiddle: Tensor, take: Tensor) -> Tensor:
    rows, n = x2.shape
    v = torch.gather(x2, 1, perm.expand(rows, n))
    iz = torch.fft.rfft(v, dim=-1).mul_(twiddle)
    return torch.gather(torch.view_as_real(iz).view(rows, -1), 1, take.expand(rows, n))


def use_fft(n: int) -> bool:
    """Whether the size-n DCT of rows goes through the FFT: a fixed rule on n alone, never a run-time timing."""
    if n >= FFT_MIN_SIZE:
        return True
    if n < SMOOTH_FFT_MIN_SIZE:
        return False
    for prime in _SMOOTH_PRIMES:
        while n % prime == 0:
            n //= prime
    return n == 1


def dct_rows(x: Tensor) -> Tensor:
    """x @ D for the orthonormal DCT-II D of size x.shape[-1]: by FFT where use_fft(n), else matmul."""
    n = x.shape[-1]
    if use_fft(n):
        return dct_rows_fft(x)
    return x @ dct_matrix(n, x.dtype, x.device)


_SHARED: dict[tuple, Tensor] = {}


def basis_matrix(kind: str, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """D, the (n, n) basis of a fixed-basis kind ("dct" or "random"), one shared tensor per key.

    A plain dict rather than lru_cache: torch.compile traces a dict lookup into a guarded graph input,
    whereas it would trace through lru_cache and rebuild the matrix inside the graph. Stored column-major
    (a transposed view of D^T) so that gather_columns copies contiguous memory.
    """
    key = (kind, n, dtype, torch.device(device))
    D = _SHARED.get(key)
    if D is None:
        if kind == "dct":
            D = dct_matrix(n, dtype, device)
        elif kind == "random":
            D = random_orthonormal_matrix(n, dtype, device)
        else:
            raise ValueError(f"basis {kind!r} has no fixed matrix; fixed bases are 'dct' and 'random'")
        D = _SHARED[key] = D.t().contiguous().t()
    return D


def gather_columns(D: Tensor, idx: Tensor) -> Tensor:
    """D_r = D[:, idx], (n, r), as a column-major view: for a basis_matrix D it reads whole columns.

    On a 2-core CPU (n = 1024, r = 256) this gather took 0.12 ms against 0.65 ms for index_select(1, idx) of a
    row-major D, and x @ D_r ran 1.5x faster with the column-major result.
    """
    return D.t().index_select(0, idx).t()


def transform_rows(kind: str, x: Tensor, D: Tensor) -> Tensor:
    """x @ D for the fixed basis `kind` whose (n, n) matrix is D: all basis coordinates of every row.

    The DCT of large rows goes through the FFT and never reads D.
    """
    if kind == "dct" and use_fft(x.shape[-1]):
        return dct_rows_fft(x)
    return x @ D.to(x.dtype)


_IDCT_PLANS: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}


def _idct_plan(n: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(mirror, twiddle, unperm) of the size-n inverse DCT by FFT (built in float64; see idct_rows_fft).

    mirror: for k <= n/2, the column n - k (column n, which does not exist, reads the zero appended at n).
    twiddle: exp(i pi k / 2n) with the orthonormal scales undone and irfft's 1/n folded out. unperm: where
    x_j sits in the Makhoul order v (the inverse of _fft_plan's perm).
    """
    key = (n, dtype, torch.device(device))
    compiling = torch.compiler.is_compiling()
    plan = None if compiling else _IDCT_PLANS.get(key)
    if plan is None:
        k = torch.arange(n // 2 + 1, dtype=torch.float64, device=device)
        mirror = (n - k).long()
        scale = torch.full_like(k, math.sqrt(n / 2.0))
        scale[0] = math.sqrt(float(n))
        twiddle = torch.polar(scale, k * (math.pi / (2 * n)))
        j = torch.arange(n, device=device)
        unperm = torch.where(j % 2 == 0, j // 2, n - 1 - j // 2)
        plan = (mirror, twiddle.to(torch.complex128 if dtype == torch.float64 else torch.complex64), unperm)
        if not compiling:
            _IDCT_PLANS[key] = plan
    return plan


def idct_rows_fft(X: Tensor) -> Tensor:
    """The inverse of dct_rows_fft: X @ dct_matrix(n).T for every row of X, by one inverse real FFT of length n.

    With C the unnormalised coefficients, the Makhoul sequence's spectrum is V_k = exp(i pi k / 2n) (C_k - i C_{n-k})
    (C_n = 0) for k <= n/2, and v = irfft(V) holds x in the order (x_0, x_2, ..., x_3, x_1).
    """
    n = X.shape[-1]
    compute = torch.float64 if X.dtype == torch.float64 else torch.float32
    mirror, twiddle, unperm = _idct_plan(n, compute, X.device)
    X2 = X.reshape(-1, n).to(compute)
    rows = X2.shape[0]
    if rows == 0:
        return X.clone()
    padded = torch.cat([X2, X2.new_zeros(rows, 1)], dim=1)  # column n reads as C_n = 0
    W = torch.complex(X2[:, : n // 2 + 1], -padded.index_select(1, mirror))
    v = torch.fft.irfft(W.mul_(twiddle), n=n, dim=-1)
    return v.index_select(1, unperm).view(X.shape).to(X.dtype)


def project_rows_fft(x: Tensor, idx: Tensor) -> Tensor:
    """x @ D_r with D_r = dct_matrix(n)[:, idx]: the DCT of every row, then a gather of the r kept coefficients.

    O(n log n) per row whatever r is, against O(n r) for the matmul (use_fft_projection says where each wins).
    """
    return dct_rows_fft(x).index_select(-1, idx)


def back_project_rows_fft(u: Tensor, idx: Tensor, n: int) -> Tensor:
    """u @ D_r^T with D_r = dct_matrix(n)[:, idx]: u's r columns scattered into the n basis slots, then the
    inverse DCT of every row. O(n log n) per row whatever r is; its result has n columns (a full-width temporary
    of u's rows: callers pass row chunks when that matters)."""
    full = u.new_zeros(*u.shape[:-1], n)
    full.index_copy_(-1, idx, u)
    return idct_rows_fft(full)


def use_fft_projection(n: int, r: int) -> bool:
    """Whether x @ D_r (a DCT basis of size n, r columns kept) goes through project_rows_fft: a fixed rule on
    (n, r) alone, from measurement (FFT_PROJECTION_RANK_PER_LOG2), never a run-time timing."""
    return use_fft(n) and r >= FFT_PROJECTION_RANK_PER_LOG2 * math.log2(n)


def project_rows(kind: str, x: Tensor, D: Tensor, idx: Tensor) -> Tensor:
    """x @ D_r, D_r = D[:, idx] for the fixed basis `kind` whose (n, n) matrix is D: by FFT and a gather where
    use_fft_projection says it is faster (the DCT only), else by matmul with the gathered columns."""
    n, r = D.shape[0], idx.shape[0]
    if kind == "dct" and use_fft_projection(n, r):
        return project_rows_fft(x, idx)
    return x @ gather_columns(D, idx).to(x.dtype)
