"""Where the DCT by FFT overtakes the DCT by matmul: the measurement behind basis.FFT_MIN_SIZE.

    python tools/fft_threshold.py [--sizes 128 192 256 320 384 448 512 768] [--rows 512 1024 4096] [--repeats 25]

For each basis size n and row count T (the tokens of a refresh step), times ``x @ D`` (D the cached
dct_matrix) and ``basis.dct_rows_fft(x)`` on the same random fp32 (T, n) x, the two calls alternating so that
both see the same load on a shared machine, and prints the medians, their ratio, and the smallest n from which
the FFT is faster at every T measured. The library never times at run time: the threshold is a constant,
chosen from this table, so results are reproducible bit for bit.
"""
from __future__ import annotations

import argparse

import torch

from lowrank_compile.basis import FFT_MIN_SIZE, SMOOTH_FFT_MIN_SIZE, dct_matrix, dct_rows_fft, use_fft
from lowrank_compile.measure import interleaved_medians


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[128, 192, 256, 320, 384, 448, 512, 768])
    ap.add_argument("--rows", type=int, nargs="*", default=[512, 1024, 4096])
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, fp32, medians of {args.repeats} "
          f"interleaved calls. The library's rule (basis.use_fft): FFT from n = {SMOOTH_FFT_MIN_SIZE} for sizes whose "
          f"prime factors are all <= 13, from n = {FFT_MIN_SIZE} for every size\n")
    print("| n | T | matmul (ms) | FFT (ms) | FFT / matmul | the library uses |")
    print("|---|---|---|---|---|---|")
    fft_wins = {}
    for n in args.sizes:
        d = dct_matrix(n)
        wins = True
        for rows in args.rows:
            x = torch.randn(rows, n, generator=torch.Generator().manual_seed(n * 31 + rows))
            med = interleaved_medians({"matmul": lambda: x @ d, "fft": lambda: dct_rows_fft(x)}, args.repeats)
            ratio = med["fft"] / med["matmul"]
            wins = wins and ratio < 1
            print(f"| {n} | {rows} | {med['matmul'] * 1e3:.3f} | {med['fft'] * 1e3:.3f} | {ratio:.2f} | "
                  f"{'FFT' if use_fft(n) else 'matmul'} |", flush=True)
        fft_wins[n] = wins
    from_n = next((n for n in args.sizes if all(fft_wins[m] for m in args.sizes if m >= n)), None)
    print(f"\nFFT faster at every T from n = {from_n} on" if from_n else "\nthe FFT never wins at every T here")


if __name__ == "__main__":
    main()
