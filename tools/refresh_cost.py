"""Refresh cost: one basis refresh per layer and per model, DCT (matmul / FFT) vs an SVD of the same gradient.

    python tools/refresh_cost.py [--sizes 512 1024 2048 4096] [--tokens 1024] [--json docs/refresh_cost.json]

For each weight shape (the square attention projections n x n and the LLaMA MLP shapes of the GaLore
configurations, up to 7B's 11008 x 4096) and a random fp32 gradient G of that shape, times:

- svd: ``torch.linalg.svd(G, full_matrices=False)``, what GaLore runs at every refresh;
- dct matmul: the scores of every DCT column from G, ``|G @ D|`` summed over rows, and the top-r
  (the reference code's refresh: one (m, n) @ (n, n) product; rows of length n = the smaller side);
- dct fft: the same scores with ``G @ D`` computed by FFT (lowrank_compile.basis.dct_rows_fft);
- in backward, exact / sketch 64: the whole weight-gradient work of a refresh step inside the projected
  backward (projection.rank_r_grad, the library's own code path), from the layer's inputs x (T, n) and output
  gradients gy (T, m), without forming G: x D (FFT where basis.use_fft says), then either the one-pass exact selection
  (selection.select_right: blockwise scores |gy^T (x D)| merged into the best r, the rank-r gradient falling
  out) or the 64-row sketched scores, top-r and the rank-r gradient. T = --tokens.
- ordinary step: the same layer's rank-r gradient gy^T (x D_r) on a step that does not refresh. A refresh
  step runs one of the in-backward columns instead, so "refresh adds" (in backward - ordinary step) is what
  a refresh costs on top of the step; GaLore's refresh adds its SVD (it forms G at every step anyway).

Times are the minimum of --repeats runs (the minimum is the least disturbed by other processes on a shared
machine); SVDs slower than 5 s run once. Per model: the sum over every projected layer of LLaMA 60M ... 7B
(hidden / intermediate / layers of the GaLore configurations), from the per-shape times. r = n / 4.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from lowrank_compile.basis import basis_matrix, dct_matrix, dct_rows_fft
from lowrank_compile.projection import rank_r_grad
from lowrank_compile.selection import select_top_r, sketch_matrix

# name: (hidden, intermediate, layers); vocab 32000, as in GaLore's configs (and LLaMA-7B).
MODELS = {"60M": (512, 1376, 8), "130M": (768, 2048, 12), "350M": (1024, 2736, 24), "1B": (2048, 5461, 24),
          "7B": (4096, 11008, 32)}


def model_shapes(hidden: int, inter: int, layers: int) -> list[tuple[tuple[int, int], int]]:
    """(larger side, smaller side) of every projected weight, with its count (q, k, v, o; gate, up, down)."""
    return [((hidden, hidden), 4 * layers), ((max(inter, hidden), min(inter, hidden)), 3 * layers)]


DEVICE = "cpu"


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: first-call allocations, DCT table build
    best = float("inf")
    for _ in range(repeats):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t)
    return best


def measure(m: int, n: int, tokens: int, repeats: int, svd: bool) -> dict:
    """Times (seconds) of one refresh of an (m, n) weight, m >= n, right projection (basis of size n)."""
    gen = torch.Generator().manual_seed(m * 7 + n)
    g = torch.randn(m, n, generator=gen).to(DEVICE)
    r = n // 4
    d = dct_matrix(n).to(DEVICE)
    x = torch.randn(tokens, n, generator=gen).to(DEVICE)
    gy = torch.randn(tokens, m, generator=gen).to(DEVICE)
    omega = sketch_matrix(64, m, 1, seed=0).to(DEVICE)
    row = dict(shape=f"{m}x{n}", m=m, n=n, rank=r, tokens=tokens)
    row["dct_matmul_s"] = timed(lambda: select_top_r((g @ d).abs().sum(0), r), repeats)
    row["dct_fft_s"] = timed(lambda: select_top_r(dct_rows_fft(g).abs().sum(0), r), repeats)
    table = basis_matrix("dct", n, torch.float32, torch.device(DEVICE))
    idx = torch.arange(r, device=DEVICE)  # the layer's index buffer; a refresh rewrites it in place
    row["backward_exact_s"] = timed(lambda: rank_r_grad(x, gy, idx, table, True, "dct", 1, True), repeats)
    row["backward_sketch64_s"] = timed(lambda: rank_r_grad(x, gy, idx, table, True, "dct", 1, True, omega), repeats)
    row["ordinary_s"] = timed(lambda: rank_r_grad(x, gy, idx, table, True, "dct", 1, False), repeats)
    row["full_grad_s"] = timed(lambda: gy.t() @ x, repeats)  # for scale: the weight gradient AdamW forms each step
    if svd:
        _sync()
        t = time.perf_counter()
        torch.linalg.svd(g, full_matrices=False)
        _sync()
        first = time.perf_counter() - t
        row["svd_s"] = first if first > 5 else min(first, timed(lambda: torch.linalg.svd(g, full_matrices=False),
                                                               max(1, repeats - 1)))
    print(f"  {row['shape']}: " + ", ".join(f"{k[:-2]} {v * 1e3:.1f} ms" for k, v in row.items() if k.endswith("_s")),
          file=sys.stderr, flush=True)
    return row


def fmt(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.1f} s"


def pct(part: float, whole: float | None) -> str:
    return f"{100 * part / whole:.2f}%" if whole else "-"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[512, 1024, 2048, 4096], help="square n x n layers")
    ap.add_argument("--models", nargs="*", default=list(MODELS), help=f"per-model totals for {', '.join(MODELS)}")
    ap.add_argument("--tokens", type=int, default=1024, help="T for the in-backward refresh (batch x seq)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-svd", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = {(n, n) for n in args.sizes}
    for name in args.models:
        for shape, _ in model_shapes(*MODELS[name]):
            shapes.add(shape)
    rows = {}
    for m, n in sorted(shapes, key=lambda s: s[0] * s[1]):
        rows[(m, n)] = measure(m, n, args.tokens, args.repeats, not args.no_svd)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} CPU threads"
    head = (f"torch {torch.__version__}, {where}, fp32, rank r = n / 4, "
            f"in-backward refresh from T = {args.tokens} tokens\n")
    lines = [head, "| layer (m x n) | SVD | DCT scores, matmul | DCT scores, FFT | FFT / SVD | in backward, exact | "
             "in backward, sketch 64 | ordinary step | full weight gradient gy^T x |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (m, n), r in rows.items():
        svd = r.get("svd_s")
        lines.append(f"| {m} x {n} | {fmt(svd) if svd else '-'} | {fmt(r['dct_matmul_s'])} | {fmt(r['dct_fft_s'])} | "
                     f"{pct(r['dct_fft_s'], svd)} | {fmt(r['backward_exact_s'])} | "
                     f"{fmt(r['backward_sketch64_s'])} | {fmt(r['ordinary_s'])} | {fmt(r['full_grad_s'])} |")
    lines += ["", "Per model (sum over every projected layer: q, k, v, o, gate, up, down in each block):", "",
              "| model | layers | SVD | DCT matmul | DCT FFT | best DCT / SVD | in backward, exact | "
              "in backward, sketch 64 | ordinary step | refresh adds, exact / SVD | refresh adds, sketch 64 / SVD |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    totals = {}
    for name in args.models:
        parts = model_shapes(*MODELS[name])
        tot = {k: sum(rows[s][k] * c for s, c in parts) for k in ("dct_matmul_s", "dct_fft_s", "backward_exact_s",
                                                                    "backward_sketch64_s", "ordinary_s")}
        if not args.no_svd:
            tot["svd_s"] = sum(rows[s]["svd_s"] * c for s, c in parts)
        totals[name] = tot
        best = min(tot["dct_matmul_s"], tot["dct_fft_s"])
        svd = tot.get("svd_s")
        lines.append(f"| LLaMA {name} | {sum(c for _, c in parts)} | {fmt(svd) if svd else '-'} | "
                     f"{fmt(tot['dct_matmul_s'])} | {fmt(tot['dct_fft_s'])} | "
                     f"{pct(best, svd)} | {fmt(tot['backward_exact_s'])} | "
                     f"{fmt(tot['backward_sketch64_s'])} | {fmt(tot['ordinary_s'])} | "
                     f"{pct(tot['backward_exact_s'] - tot['ordinary_s'], svd)} | "
                     f"{pct(tot['backward_sketch64_s'] - tot['ordinary_s'], svd)} |")
    text = "\n".join(lines)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), torch=torch.__version__, threads=torch.get_num_threads(),
                           rows=list(rows.values()), models=totals, table=text), f, indent=1)


if __name__ == "__main__":
    main()
