"""Print what an optimizer checkpoint holds: ``python -m lowrank_compile.inspect opt.safetensors [--verify]``.

One row per parameter (shape, projected side, rank, state shape and storage, bytes in the file), then the total
against what torch.optim.AdamW would store for the same parameters (exp_avg and exp_avg_sq in each
parameter's dtype, plus a 4-byte step). Reads only the safetensors header, unless --verify asks for the
full check that load_optimizer runs first (size, checksum).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from .checkpoint import CheckpointError, FORMAT, _read_verified, read_header

_DTYPE_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def summarize(path: str) -> tuple[list[dict], dict]:
    """Per-parameter rows and totals of a checkpoint, from its header alone."""
    header, _ = read_header(path)
    metadata = header.get("__metadata__") or {}
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a lowrank_compile optimizer checkpoint (format "
                              f"{metadata.get('format')!r})")
    meta = json.loads(metadata["meta"])
    sizes = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
    rows = []
    for e in meta["layers"]:
        numel = math.prod(e["shape"])
        rows.append({
            "name": e["name"], "shape": "x".join(map(str, e["shape"])) or "()",
            "side": e.get("side", "-") if e["projected"] else "full",
            "rank": str(e.get("rank", "-")),
            "state_shape": "x".join(map(str, e["state_shape"])) or "()",
            "state": (e["state_dtype"] + (" (fallback)" if e.get("fallback") else "")) if e["has_state"] else "none",
            "bytes": sum(sizes.get(k, 0) for k in e.get("tensors", [])),
            "adamw": 2 * numel * _DTYPE_BYTES.get(e["dtype"], 4) + 4,
        })
    totals = {"tensors": sum(sizes.values()), "file": os.path.getsize(path),
              "adamw": sum(row["adamw"] for row in rows), "global_step": meta["global_step"],
              "state_dtype": meta["state_dtype"]}
    return rows, totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowrank_compile.inspect", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a file written by lowrank_compile.save_optimizer")
    parser.add_argument("--verify", action="store_true", help="also check the file's size and checksum")
    args = parser.parse_args(argv)
    try:
        if args.verify:
            _read_verified(args.path)
        rows, totals = summarize(args.path)
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    fields = [("name", "parameter"), ("shape", "shape"), ("side", "side"), ("rank", "rank"),
              ("state_shape", "state shape"), ("state", "state dtype"),
              ("bytes", "bytes")]
    cells = [[str(row[k]) for k, _ in fields] for row in rows]
    widths = [max(len(title), *(len(c[i]) for c in cells)) if cells else len(title) for i, (_, title) in
              enumerate(fields)]
    line = "  ".join(title.ljust(w) for (_, title), w in zip(fields, widths))
    print(line)
    print("-" * len(line))
    for c in cells:
        print("  ".join(v.rjust(w) if i == len(c) - 1 else v.ljust(w) for i, (v, w) in enumerate(zip(c, widths))))
    print("-" * len(line))
    ratio = totals["adamw"] / max(totals["tensors"], 1)
    print(f"total: {totals['tensors']} bytes of state ({_fmt_bytes(totals['tensors'])}; file "
          f"{_fmt_bytes(totals['file'])}), {len(rows)} parameters, state_dtype {totals['state_dtype']}, "
          f"step {totals['global_step']}")
    print(f"torch AdamW would store {totals['adamw']} bytes ({_fmt_bytes(totals['adamw'])}): {ratio:.1f}x this")
    if args.verify:
        print("checksum: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
