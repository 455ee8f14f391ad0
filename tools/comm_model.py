"""Communication per optimizer step of data-parallel training: DDP / FSDP2 with AdamW vs lowrank_compile.

    python tools/comm_model.py [--dtype-bytes 2] [--update-gap 1 200] [--sketch-rows 64]

A model of what each process sends per step, from shapes alone (nothing is run): LLaMA-shaped models at 1B
(Llama-3.2-1B), 7B (Llama-2-7B) and 70B (Llama-2-70B), every attention and MLP projection projected at rank
r = hidden / 8, embeddings, lm_head and norms on plain AdamW (lm_head is projected too when its smaller side
allows; here it is kept plain, as it is tied in the 1B model). It prints markdown tables for docs/DISTRIBUTED.md.

Per projected layer of shape (out, in), n = min(out, in) basis columns, m = max(out, in):
- gradient all-reduce (DDP) or reduce-scatter (FSDP2): r * m numbers (the carrier), instead of out * in;
- exact refresh: out * in numbers (the similarity G D, blockwise, ceil(n / 256) collectives), or k * n with
  sketch_rows=k; once per update_gap steps;
- cheap refresh: n numbers (the column scores), one collective, once per update_gap steps.
Bytes on the wire per process: a ring all-reduce of S bytes sends 2 (N-1)/N S, a reduce-scatter or
all-gather (N-1)/N S. FSDP2 also all-gathers every weight twice per step (forward, and backward after
resharding), with AdamW or not. Gradients and scores are in `--dtype-bytes` (2: bf16 gradients; the refresh
scores are reduced in fp32, 4 bytes).
"""
from __future__ import annotations

import argparse
import dataclasses
import math

SCORE_BLOCK = 256  # lowrank_compile.selection.SCORE_BLOCK: basis columns per all-reduced block of an exact refresh


@dataclasses.dataclass(frozen=True)
class Model:
    name: str
    hidden: int
    layers: int
    intermediate: int
    kv: int  # width of the k and v projections (kv heads x head dim)
    vocab: int

    @property
    def rank(self) -> int:
        return self.hidden // 8

    def projected(self) -> list[tuple[int, int]]:
        """(out, in) of the projected layers of one decoder block."""
        h, f, kv = self.hidden, self.intermediate, self.kv
        return [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)]  # q k v o gate up down

    def plain_numel(self) -> int:
        return 2 * self.vocab * self.hidden + (2 * self.layers + 1) * self.hidden  # embed, lm_head, norms


MODELS = [Model("1B", 2048, 16, 8192, 512, 128256), Model("7B", 4096, 32, 11008, 4096, 32000),
          Model("70B", 8192, 80, 28672, 1024, 32000)]


def layer_numbers(out: int, inp: int, r: int, sketch_rows: int = 0) -> dict:
    """Numbers (elements) one projected layer communicates: gradient, exact refresh, cheap refresh."""
    n, m = min(out, inp), max(out, inp)
    return dict(full=out * inp, lowrank=r * m, exact=sketch_rows * n if sketch_rows else out * inp, cheap=n,
                exact_calls=1 if sketch_rows else math.ceil(n / min(SCORE_BLOCK, max(1, n // 2))))


def per_step(model: Model, world: int, gap: int, dtype_bytes: int, sketch_rows: int = 0) -> dict:
    """Bytes each process sends per step, by engine and method (refreshes amortised over update_gap steps)."""
    ar = 2 * (world - 1) / world  # ring all-reduce factor
    rs = (world - 1) / world  # reduce-scatter / all-gather factor
    layers = [layer_numbers(o, i, model.rank, sketch_rows) for o, i in model.projected()] * model.layers
    full = sum(x["full"] for x in layers)
    low = sum(x["lowrank"] for x in layers)
    exact = sum(x["exact"] for x in layers) / gap
    cheap = sum(x["cheap"] for x in layers) / gap
    plain = model.plain_numel()
    params = full + plain
    return dict(
        params=params,
        ddp_adamw=ar * params * dtype_bytes,
        ddp_exact=ar * ((low + plain) * dtype_bytes + exact * 4),
        ddp_cheap=ar * ((low + plain) * dtype_bytes + cheap * 4),
        fsdp_adamw=rs * params * dtype_bytes * 3,  # 2 all-gathers + 1 reduce-scatter
        fsdp_exact=rs * (2 * params + low + plain) * dtype_bytes + ar * exact * 4,
        fsdp_cheap=rs * (2 * params + low + plain) * dtype_bytes + ar * cheap * 4,
        refresh_calls=sum(x["exact_calls"] for x in layers),
    )


def gb(x: float) -> str:
    return f"{x / 1e9:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype-bytes", type=int, default=2)
    ap.add_argument("--update-gap", type=int, nargs="+", default=[1, 200])
    ap.add_argument("--sketch-rows", type=int, default=64)
    ap.add_argument("--worlds", type=int, nargs="+", default=[8, 64, 1024])
    args = ap.parse_args()

    print("### Per layer (numbers communicated per step, before the collective's factor)\n")
    print("| model | layer (out x in) | r | AdamW gradient | rank-r gradient | exact refresh | "
          f"exact, sketch {args.sketch_rows} | cheap refresh | exact: collectives per refresh |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model in MODELS:
        for (o, i), name in zip(model.projected(), ("q", "k", "v", "o", "gate", "up", "down")):
            if name in ("v", "up"):
                continue  # same shapes as k and gate
            x = layer_numbers(o, i, model.rank)
            s = layer_numbers(o, i, model.rank, args.sketch_rows)
            print(f"| {model.name} | {name} {o} x {i} | {model.rank} | {x['full']:,} | {x['lowrank']:,} | "
                  f"{x['exact']:,} | {s['exact']:,} | {x['cheap']:,} | {x['exact_calls']} |")

    for gap in args.update_gap:
        print(f"\n### Per model and step, update_gap {gap}: GB sent per process ({args.dtype_bytes}-byte gradients, "
              "fp32 scores)\n")
        print("| model | processes | DDP + AdamW | DDP, exact | DDP, cheap | DDP, exact + sketch | FSDP2 + AdamW | "
              "FSDP2, exact | FSDP2, cheap |")
        print("|---|---|---|---|---|---|---|---|---|")
        for model in MODELS:
            for world in args.worlds:
                c = per_step(model, world, gap, args.dtype_bytes)
                s = per_step(model, world, gap, args.dtype_bytes, args.sketch_rows)
                print(f"| {model.name} ({c['params'] / 1e9:.2f}B) | {world} | {gb(c['ddp_adamw'])} | "
                      f"{gb(c['ddp_exact'])} | {gb(c['ddp_cheap'])} | {gb(s['ddp_exact'])} | {gb(c['fsdp_adamw'])} | "
                      f"{gb(c['fsdp_exact'])} | {gb(c['fsdp_cheap'])} |")
    print("\nCollectives per exact refresh of the whole model (blockwise all-reduces, no sketch): "
          + ", ".join(f"{m.name}: {per_step(m, 8, 1, 2)['refresh_calls']:,}" for m in MODELS))


if __name__ == "__main__":
    main()
