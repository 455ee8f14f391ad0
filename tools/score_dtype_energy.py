"""How much of the fp32 selection's gradient energy a selection scored in bf16 (or fp16) keeps, on real gradients.

    python tools/score_dtype_energy.py                 # the demo's LLaMA on the bundled corpus, after 30 AdamW steps

Trains the demo's small LLaMA (lowrank_compile.demo.llama) with torch AdamW for --warm steps on the bundled texts,
then takes one batch's dense weight gradient G of every nn.Linear (autograd, the obvious way) and, per layer,
selects r DCT columns twice, from the layer's own factors (x and the output gradient gy, captured by hooks) scored
in fp32 and with the products in --dtype (what ``wrap_model(score_dtype=...)`` does), and reports ||G D_r(dtype)||^2 / ||G D_r(fp32)||^2 (1.0: the same energy) and
the overlap of the two index sets. The side and rank follow wrap_model's rules (right when out >= in, rank --rank).
"""
from __future__ import annotations

import argparse
import statistics

import torch

from lowrank_compile import data
from lowrank_compile.basis import basis_matrix
from lowrank_compile.demo import llama
from lowrank_compile.selection import left_scores, right_scores, select_top_r


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    ap.add_argument("--rank", type=int, default=48)
    ap.add_argument("--warm", type=int, default=30, help="AdamW steps before the gradient is taken")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model = llama(seq=args.seq)
    train, _ = data.splits()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    stream = data.batches(train, args.batch, args.seq + 1, args.warm + 1, seed=0)
    factors: dict = {}  # Linear -> (x2 (T, in), gy2 (T, out)) of the last batch
    hooks = []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_hook(
                lambda m, a, out: factors.__setitem__(m, [a[0].detach().reshape(-1, a[0].shape[-1]), None])))
            hooks.append(m.register_full_backward_hook(
                lambda m, gin, gout: factors[m].__setitem__(1, gout[0].detach().reshape(-1, gout[0].shape[-1]))))
    for step, batch in enumerate(stream):
        ids = batch.long()
        model(input_ids=ids, labels=ids).loss.backward()
        if step < args.warm:
            opt.step()
            opt.zero_grad()
    for h in hooks:
        h.remove()
    rows = []
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or m.weight.grad is None or min(m.weight.shape) <= args.rank:
            continue
        G = m.weight.grad.double()  # (out, in), the dense gradient the obvious way
        x2, gy2 = factors[m]
        right = G.shape[0] >= G.shape[1]
        n = G.shape[1] if right else G.shape[0]
        D = basis_matrix("dct", n, torch.float32, torch.device("cpu"))
        if right:  # the library's cast path (projection._refresh): x D and gy in the score dtype, scored blockwise
            xd = x2 @ D
            s32, s16 = right_scores(gy2, xd, 1), right_scores(gy2.to(low), xd.to(low), 1)
        else:
            gd = gy2 @ D
            s32, s16 = left_scores(gd, x2, 1), left_scores(gd.to(low), x2.to(low), 1)
        i32, i16 = select_top_r(s32, args.rank), select_top_r(s16, args.rank)
        Dd = D.double()
        energy = lambda idx: ((G @ Dd[:, idx]) if right else (Dd[:, idx].t() @ G)).square().sum().item()  # noqa: E731
        rows.append((name, tuple(G.shape), energy(i16) / energy(i32),
                     len(set(i16.tolist()) & set(i32.tolist())) / args.rank))
    print(f"score products in {args.dtype} against fp32: demo LLaMA (hidden 192, 3 layers), bundled corpus, after "
          f"{args.warm} AdamW steps, batch {args.batch} x {args.seq}, rank {args.rank}, torch {torch.__version__}\n")
    print("| layer | shape | energy kept (x fp32 selection) | same indices |")
    print("|---|---|---|---|")
    for name, shape, e, same in rows:
        print(f"| {name} | {shape} | {e:.4f} | {same:.2f} |")
    print(f"\nmedian energy kept {statistics.median(r[2] for r in rows):.4f}, min {min(r[2] for r in rows):.4f}; "
          f"median overlap {statistics.median(r[3] for r in rows):.2f}")


if __name__ == "__main__":
    main()
