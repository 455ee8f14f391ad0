"""The orthonormal bases: DCT-II matrix, its FFT path, the seeded random basis, and the shared cache."""
from __future__ import annotations

import pytest
import torch

from lowrank_compile import basis as B
from reference import dct_basis

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = [1, 2, 3, 7, 16, 33]
FFT_SIZES = [1, 2, 5, 16, 33, 257, 384, B.FFT_MIN_SIZE - 1, B.FFT_MIN_SIZE, B.FFT_MIN_SIZE + 1, 2 * B.FFT_MIN_SIZE]


def eye(n):
    return torch.eye(n, dtype=torch.float64)


@pytest.mark.parametrize("n", SIZES + [B.FFT_MIN_SIZE + 1])
def test_dct_matrix_is_orthonormal(n):
    """D^T D = I (and D D^T = I) in float64, odd sizes and n = 1 included."""
    d = B.dct_matrix(n, torch.float64)
    assert d.shape == (n, n) and d.dtype == torch.float64
    torch.testing.assert_close(d.t() @ d, eye(n), rtol=0, atol=1e-13)
    torch.testing.assert_close(d @ d.t(), eye(n), rtol=0, atol=1e-13)


@pytest.mark.parametrize("n", SIZES)
def test_dct_matrix_equals_method_formula(n):
    """Column k of dct_matrix(n) is s_k sqrt(2/n) cos(pi k (2j+1) / 2n), written out element by element."""
    torch.testing.assert_close(B.dct_matrix(n, torch.float64), dct_basis(n), rtol=0, atol=1e-14)


def test_dct_matrix_float32_is_rounded_float64():
    """The float32 basis is the float64 basis rounded once, not recomputed in float32."""
    assert torch.equal(B.dct_matrix(33, torch.float32), B.dct_matrix(33, torch.float64).float())


@pytest.mark.parametrize("n", FFT_SIZES)
def test_dct_rows_fft_equals_matmul_float64(n):
    """The FFT (Makhoul) transform of rows equals x @ D in float64, N-D leading dims included."""
    x = torch.randn(2, 3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    got = B.dct_rows_fft(x)
    assert got.shape == x.shape and got.dtype == torch.float64
    torch.testing.assert_close(got, x @ B.dct_matrix(n, torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", FFT_SIZES)
def test_dct_rows_fft_equals_matmul_float32(n):
    """Same in float32 at float32 tolerance; the result stays float32."""
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(n))
    got = B.dct_rows_fft(x)
    assert got.dtype == torch.float32
    exact = x.double() @ B.dct_matrix(n, torch.float64)
    torch.testing.assert_close(got.double(), exact, rtol=0, atol=1e-4 * exact.abs().max().item())


def test_dct_rows_fft_compiles_whole_and_matches_eager():
    """Under torch.compile (fullgraph: no break) the FFT transform equals the eager one; the eager plan cache is
    not read inside the graph, and an empty batch of rows works."""
    fn = torch.compile(B.dct_rows_fft, fullgraph=True, dynamic=False)
    for n in (B.FFT_MIN_SIZE, B.FFT_MIN_SIZE + 1):
        x = torch.randn(4, 3, n, generator=torch.Generator().manual_seed(n))
        torch.testing.assert_close(fn(x), B.dct_rows_fft(x), rtol=1e-5, atol=1e-5)
    assert B.dct_rows_fft(torch.zeros(0, 9)).shape == (0, 9)


@pytest.mark.parametrize("n", [5, 384, B.FFT_MIN_SIZE + 1])
def test_dct_rows_fft_in_row_chunks_changes_no_bit(n, monkeypatch):
    """On CPU large inputs go through in row chunks (FFT_CHUNK_ELEMS); each row is transformed alone, so the
    result is bit-identical to one whole pass and still equals x @ D."""
    x = torch.randn(23, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    whole = B.dct_rows_fft(x)
    monkeypatch.setattr(B, "FFT_CHUNK_ELEMS", 4 * n)  # chunks of 4 rows, the last one of 3
    chunked = B.dct_rows_fft(x)
    assert torch.equal(chunked, whole)
    torch.testing.assert_close(chunked, x @ B.dct_matrix(n, torch.float64), rtol=0, atol=1e-12)
    monkeypatch.setattr(B, "FFT_CHUNK_ELEMS", 1)  # fewer elements than a row: one row per chunk
    assert torch.equal(B.dct_rows_fft(x[:3]), whole[:3])


def test_dct_rows_fft_is_differentiable_whole_and_in_chunks(monkeypatch):
    """Autograd goes through the transform (a double backward through a projected layer would need it)."""
    x = torch.randn(5, 9, dtype=torch.float64, requires_grad=True, generator=torch.Generator().manual_seed(0))
    assert torch.autograd.gradcheck(B.dct_rows_fft, (x,))
    monkeypatch.setattr(B, "FFT_CHUNK_ELEMS", 18)
    assert torch.autograd.gradcheck(B.dct_rows_fft, (x,))


def test_use_fft_rule():
    """FFT from FFT_MIN_SIZE for every size; below it only for smooth sizes (all prime factors <= 13) from
    SMOOTH_FFT_MIN_SIZE, where tools/fft_threshold.py measured the FFT faster; primes there stay on matmul."""
    assert B.SMOOTH_FFT_MIN_SIZE < B.FFT_MIN_SIZE
    smooth = [B.SMOOTH_FFT_MIN_SIZE, 320, 352, 384, 416, 448, 480]
    rough = [251, 257, 263, 2 * 127, 17 * 19, B.FFT_MIN_SIZE - 3]  # a prime factor > 13
    assert all(B.use_fft(n) for n in smooth + [B.FFT_MIN_SIZE, B.FFT_MIN_SIZE + 1, 521, 2 * B.FFT_MIN_SIZE])
    assert not any(B.use_fft(n) for n in rough + [1, 2, 64, 128, 192, B.SMOOTH_FFT_MIN_SIZE - 1])


@pytest.mark.parametrize("n", [7, 128, 257, 384, B.FFT_MIN_SIZE - 1, B.FFT_MIN_SIZE, B.FFT_MIN_SIZE + 3])
def test_dct_rows_and_transform_rows_equal_matmul(n):
    """dct_rows and transform_rows("dct") pick matmul or FFT by size and both equal x @ D (4-D input)."""
    x = torch.randn(2, 2, 3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    want = x @ B.dct_matrix(n, torch.float64)
    torch.testing.assert_close(B.dct_rows(x), want, rtol=0, atol=1e-12)
    D = B.basis_matrix("dct", n, torch.float64, torch.device("cpu"))
    torch.testing.assert_close(B.transform_rows("dct", x, D), want, rtol=0, atol=1e-12)


def test_dct_rows_is_reproducible():
    """The same input gives bit-identical output on repeated calls (no run-time choice of algorithm)."""
    x = torch.randn(64, B.FFT_MIN_SIZE, generator=torch.Generator().manual_seed(0))
    assert torch.equal(B.dct_rows(x), B.dct_rows(x.clone()))


@pytest.mark.parametrize("n", [1, 2, 9, 24])
def test_random_orthonormal_matrix_is_orthonormal_and_seeded(n):
    """The random basis is orthonormal, and identical across calls and cache misses (seeded by n)."""
    q = B.random_orthonormal_matrix(n, torch.float64)
    torch.testing.assert_close(q.t() @ q, eye(n), rtol=0, atol=1e-13)
    B.random_orthonormal_matrix.cache_clear()
    assert torch.equal(B.random_orthonormal_matrix(n, torch.float64), q)
    if n > 1:
        assert not torch.allclose(q, B.dct_matrix(n, torch.float64))
    torch.testing.assert_close(B.random_orthonormal_matrix(n, torch.float32), q.float(), rtol=0, atol=0)


def test_random_transform_rows_is_matmul():
    """transform_rows("random") is x @ Q with the random basis D = Q."""
    n = 12
    D = B.basis_matrix("random", n, torch.float64, torch.device("cpu"))
    x = torch.randn(3, 4, n, dtype=torch.float64)
    torch.testing.assert_close(B.transform_rows("random", x, D), x @ B.random_orthonormal_matrix(n, torch.float64))


def test_basis_matrix_is_shared_per_key():
    """basis_matrix returns the very same tensor for the same (kind, n, dtype, device), distinct ones otherwise."""
    cpu = torch.device("cpu")
    a = B.basis_matrix("dct", 24, torch.float64, cpu)
    assert B.basis_matrix("dct", 24, torch.float64, "cpu") is a
    assert B.basis_matrix("dct", 24, torch.float32, cpu) is not a
    assert B.basis_matrix("dct", 25, torch.float64, cpu).shape == (25, 25)
    q = B.basis_matrix("random", 24, torch.float64, cpu)
    assert q is not a and B.basis_matrix("random", 24, torch.float64, cpu) is q
    torch.testing.assert_close(a, dct_basis(24), rtol=0, atol=1e-14)
    with pytest.raises(ValueError):
        B.basis_matrix("svd", 24, torch.float64, cpu)



@pytest.mark.parametrize("kind", ["dct", "random"])
def test_gather_columns_equals_indexing_the_basis(kind):
    """gather_columns(D, idx) is exactly D[:, idx] (any order, repeats allowed), and is column-major."""
    D = B.basis_matrix(kind, 40, torch.float64, torch.device("cpu"))
    assert D.stride() == (1, 40)  # stored column-major: a gathered column is contiguous memory
    idx = torch.tensor([7, 0, 39, 7, 12])
    got = B.gather_columns(D, idx)
    assert got.shape == (40, 5) and got.stride() == (1, 40)
    assert torch.equal(got, D[:, idx])


@pytest.mark.parametrize("n", [1, 2, 3, 8, 15, 64, 192, 1024])
def test_idct_rows_fft_inverts_the_dct_float64(n):
    D = dct_basis(n)
    X = torch.randn(5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(B.idct_rows_fft(X), X @ D.t(), rtol=0, atol=1e-12)
    torch.testing.assert_close(B.idct_rows_fft(B.dct_rows_fft(X)), X, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [3, 64, 1024])
def test_fft_projections_equal_the_gathered_matmul_float64(n):
    gen = torch.Generator().manual_seed(n)
    D = dct_basis(n)
    idx = torch.randperm(n, generator=gen)[: max(1, n // 3)]
    x = torch.randn(7, n, dtype=torch.float64, generator=gen)
    u = torch.randn(6, idx.numel(), dtype=torch.float64, generator=gen)
    torch.testing.assert_close(B.project_rows_fft(x, idx), x @ D[:, idx], rtol=0, atol=1e-12)
    torch.testing.assert_close(B.back_project_rows_fft(u, idx, n), u @ D[:, idx].t(), rtol=0, atol=1e-12)


def test_use_fft_projection_rule_and_project_rows_dispatch(monkeypatch):
    # the FFT only where the rank is large next to log2(n), and only for sizes the DCT itself goes by FFT
    assert not B.use_fft_projection(1024, 256) and B.use_fft_projection(1024, 512)
    assert B.use_fft_projection(4096, 512) and not B.use_fft_projection(192, 96)
    assert not B.use_fft_projection(509, 500)  # a prime size: no fast FFT at all
    D = B.basis_matrix("dct", 1024, torch.float32, torch.device("cpu"))
    x = torch.randn(16, 1024, generator=torch.Generator().manual_seed(0))
    calls = []
    real = B.project_rows_fft
    monkeypatch.setattr(B, "project_rows_fft", lambda *a: calls.append(1) or real(*a))
    for r in (256, 512):
        idx = torch.randperm(1024, generator=torch.Generator().manual_seed(r))[:r]
        torch.testing.assert_close(B.project_rows("dct", x, D, idx), x @ D[:, idx], rtol=1e-4, atol=1e-4)
    assert len(calls) == 1  # r = 512 only
    idx = torch.arange(512)
    R = B.basis_matrix("random", 1024, torch.float32, torch.device("cpu"))
    torch.testing.assert_close(B.project_rows("random", x, R, idx), x @ R[:, idx])
    assert len(calls) == 1  # a random basis never goes by FFT
