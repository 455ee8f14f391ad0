"""The best step-time ratio lowrank_compile can reach against torch AdamW, from the model's own layer shapes.

    python tools/step_budget.py [--model ref78m] [--batch 4x256] [--rank 256] [--rounds 5]

Both optimizers run the same forward and activation backward (tools/bench.py's "floor"); they differ only in
the weight side of a step. For one transformer block of the model (q, k, v, o, gate, up, down, on random
data of the step's T = batch x seq tokens), this times, interleaved in one process:

- AdamW's weight side: the dense weight gradients gy^T x and torch.optim.AdamW's foreach update of them;
- lowrank_compile's weight side on an ordinary (non-refresh) step: the rank-r gradients
  (projection.rank_r_grad) and the low-rank AdamW update with its back-projection (update.lowrank_adamw_);

multiplies by the number of blocks, and times the floor step of the whole model (bench.py's). Each piece is the
median over --rounds. The printed bound (floor + lowrank side) / (floor + AdamW side) is what a lowrank step
would cost with no overhead beyond these kernels; the embeddings and lm_head (plain AdamW in both) are left out.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from lowrank_compile.basis import basis_matrix, gather_columns
from lowrank_compile.measure import timed
from lowrank_compile.projection import rank_r_grad
from lowrank_compile.update import lowrank_adamw_

if __package__:  # python -m tools.step_budget
    from . import bench
else:  # python tools/step_budget.py: Python puts the script's folder, tools/, first on sys.path
    import bench


def block_shapes(hidden: int, inter: int) -> list[tuple[int, int]]:
    """(out, in) of the projected weights of one LLaMA block: q, k, v, o, gate, up, down."""
    return [(hidden, hidden)] * 4 + [(inter, hidden)] * 2 + [(hidden, inter)]


class WeightSide:
    """Random weights, inputs and output gradients of one block, with both optimizers' weight-side steps."""

    def __init__(self, shapes: list[tuple[int, int]], tokens: int, rank: int):
        gen = torch.Generator().manual_seed(0)
        self.layers = []
        for out, inp in shapes:
            right = out >= inp
            n = inp if right else out
            low = (out, rank) if right else (rank, inp)  # the rank-r gradient's and states' shape
            table = basis_matrix("dct", n, torch.float32, torch.device("cpu"))
            idx = torch.randperm(n, generator=gen)[:rank]
            self.layers.append(dict(
                x=torch.randn(tokens, inp, generator=gen), gy=torch.randn(tokens, out, generator=gen) * 1e-3,
                w=torch.randn(out, inp, generator=gen) * 0.02, right=right, table=table, idx=idx,
                d_r=gather_columns(table, idx), step=torch.tensor(0.0),
                m=torch.zeros(low), v=torch.zeros(low)))
        self.dense = [torch.nn.Parameter(layer["w"].clone()) for layer in self.layers]
        self.adamw = torch.optim.AdamW(self.dense, lr=1e-6, foreach=True)
        self.lr = torch.tensor(1e-6, dtype=torch.float64)

    def adamw_side(self) -> None:
        for p, layer in zip(self.dense, self.layers):
            p.grad = layer["gy"].t() @ layer["x"]
        self.adamw.step()
        self.adamw.zero_grad(set_to_none=True)

    def lowrank_side(self) -> None:
        groups: dict[tuple, list[tuple[dict, torch.Tensor]]] = {}
        for layer in self.layers:
            g_low = rank_r_grad(layer["x"], layer["gy"], layer["idx"], layer["table"], layer["right"], "dct", 1,
                                False)
            groups.setdefault((tuple(layer["w"].shape), layer["right"]), []).append((layer, g_low))
        for (_, right), items in groups.items():  # one call per shape group, as the optimizer batches them
            ls = [layer for layer, _ in items]
            lowrank_adamw_([ly["w"] for ly in ls], [g for _, g in items], [ly["m"] for ly in ls],
                           [ly["v"] for ly in ls], [ly["d_r"] for ly in ls], [ly["step"] for ly in ls], self.lr,
                           0.0, 0.9, 0.999, 1e-8, 1.0, right)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ref78m", choices=[k for k in bench.MODELS if k not in ("1B", "7B")])
    ap.add_argument("--batch", type=bench.parse_bt, default=(4, 256))
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    hidden, inter, n_layers, _, _ = bench.MODELS[args.model]
    tokens = args.batch[0] * args.batch[1]
    spec = dict(bench.CONFIGS["floor"], name="floor", model=args.model, device="cpu", dtype="fp32",
                batch=args.batch[0], seq=args.batch[1], rank=args.rank)
    bench.preload("floor")
    model = bench.build(spec)
    floor_step = bench.make_train_step(model, bench.make_optimizer(model, spec), spec, bench.batch_ids(spec))
    side = WeightSide(block_shapes(hidden, inter), tokens, args.rank)
    for fn in (floor_step, side.adamw_side, side.lowrank_side):  # warm-up
        fn()
    times = {"floor": [], "adamw": [], "lowrank": []}
    for _ in range(args.rounds):
        times["floor"].append(timed(floor_step))
        times["adamw"].append(timed(side.adamw_side) * n_layers)
        times["lowrank"].append(timed(side.lowrank_side) * n_layers)
    floor, adamw, low = (statistics.median(times[k]) for k in ("floor", "adamw", "lowrank"))
    print(f"LLaMA {args.model} ({n_layers} blocks), batch {args.batch[0]} x {args.batch[1]} (T = {tokens}), rank "
          f"{args.rank}, fp32, {torch.get_num_threads()} threads, torch {torch.__version__}; medians of "
          f"{args.rounds} interleaved rounds\n")
    print("| piece | s/step |\n|---|---|")
    print(f"| floor (forward + activation backward) | {floor:.3f} |")
    print(f"| AdamW weight side (dense gradients + foreach AdamW) | {adamw:.3f} |")
    print(f"| lowrank weight side, ordinary step (rank-r gradients + low-rank AdamW + back-projection) | {low:.3f} |")
    print(f"\nlowrank / AdamW weight side: {low / adamw:.2f}x; floor / (floor + AdamW side): "
          f"{floor / (floor + adamw):.2f}x")
    print(f"bound on the ordinary-step ratio, (floor + lowrank side) / (floor + AdamW side): "
          f"**{(floor + low) / (floor + adamw):.2f}x**")


if __name__ == "__main__":
    main()
