"""Where the rank-independent DCT projections win: x D_r and u D_r^T by FFT against the matmul.

    python tools/fft_projection.py [--sizes 192 256 512 1024 2048 4096] [--ranks 0.125 0.25 0.5] \
        [--rows 512 2048] [--repeats 9] [--threads 2] [--out docs/bench/fft_projection.json]

The forward projection of a right-projected layer's rank-r gradient is x D_r, (T, n) @ (n, r): 2 T n r flops by
matmul, or the DCT of every row of x by one real FFT (O(T n log n), whatever r is) followed by a gather of the r
kept coefficients (basis.project_rows_fft). The back-projection of the update is u D_r^T, (m, r) @ (r, n): by
matmul, or u's columns scattered into the n basis slots and every row inverse-transformed (basis.
back_project_rows_fft). For each n, r (a fraction of n) and row count (T tokens, or m = n weight rows for the
back-projection) this times both ways on the same fp32 inputs, taking turns (measure.interleaved_medians), and
prints the ratios FFT / matmul, so the size rule the library applies (basis.use_fft_projection) is read off a
table, never timed at run time.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lowrank_compile.basis import back_project_rows_fft, dct_matrix, gather_columns, project_rows_fft
from lowrank_compile.measure import interleaved_medians


def measure(n: int, r: int, rows: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(n * 7 + r * 3 + rows)
    D = dct_matrix(n).t().contiguous().t()  # column-major, as basis.basis_matrix stores it
    idx = torch.randperm(n, generator=gen)[:r].sort().values
    D_r = gather_columns(D, idx)
    x = torch.randn(rows, n, generator=gen)
    u = torch.randn(rows, r, generator=gen)
    med = interleaved_medians({
        "fwd_matmul": lambda: x @ D_r, "fwd_fft": lambda: project_rows_fft(x, idx),
        "back_matmul": lambda: u @ D_r.t(), "back_fft": lambda: back_project_rows_fft(u, idx, n),
    }, repeats)
    return {"n": n, "r": r, "rows": rows, **{k: v * 1e3 for k, v in med.items()},
            "fwd_ratio": med["fwd_fft"] / med["fwd_matmul"], "back_ratio": med["back_fft"] / med["back_matmul"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[192, 256, 512, 1024, 2048, 4096])
    ap.add_argument("--ranks", type=float, nargs="*", default=[0.125, 0.25, 0.5])
    ap.add_argument("--rows", type=int, nargs="*", default=[512, 2048])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, fp32, medians of {args.repeats} "
          "interleaved calls (ms)\n")
    print("| n | r | rows | x D_r matmul | x D_r FFT | FFT / matmul | u D_r^T matmul | u D_r^T FFT | FFT / matmul |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = []
    for n in args.sizes:
        for frac in args.ranks:
            r = max(1, round(frac * n))
            for rows in args.rows:
                res = measure(n, r, rows, args.repeats)
                results.append(res)
                print(f"| {n} | {r} | {rows} | {res['fwd_matmul']:.3f} | {res['fwd_fft']:.3f} | "
                      f"{res['fwd_ratio']:.2f} | {res['back_matmul']:.3f} | {res['back_fft']:.3f} | "
                      f"{res['back_ratio']:.2f} |", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                        "repeats": args.repeats, "results": results}, indent=1))


if __name__ == "__main__":
    main()
