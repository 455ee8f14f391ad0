"""Data-parallel training with lowrank_compile on PyTorch's own engines (DDP, FSDP2), launched with torchrun.

    torchrun --nproc_per_node 2 examples/ddp.py                       # DDP, exact refreshes, vs DDP + AdamW
    torchrun --nproc_per_node 2 examples/ddp.py --refresh-sync cheap  # agree on summed per-process scores
    torchrun --nproc_per_node 2 examples/ddp.py --fused               # updates run in DDP's comm hook
    torchrun --nproc_per_node 2 examples/ddp.py --fsdp                # FSDP2 fully_shard per decoder block
    torchrun --nproc_per_node 2 examples/ddp.py --compare             # what exact / cheap / local would select

CPU and the gloo backend by default (``--backend nccl`` on GPUs, one process per GPU). The model is a
random-init 2-block LLaMA (transformers) with a byte-level vocabulary; the training text is the installed
source of torch.optim, read byte by byte, and every process draws its own batches from it. Each run
prints the loss (averaged over processes) and what was communicated per step: the bytes DDP all-reduced
(counted by a communication hook on its buckets) plus what the refreshes all-reduced; the baseline is the
same model under DDP with torch.optim.AdamW, trained on the same batches.

--compare trains with exact refreshes at every step and, at each one, also computes (from the full
gradients, formed for the measurement only) which columns the cheap mode and a process's own gradient would
have chosen: their overlap with the exact choice and the share of the global gradient's energy each keeps.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

import lowrank_compile as lrc  # first: it imports torchao quietly
from lowrank_compile import distributed as lrd
from lowrank_compile.basis import basis_matrix
from lowrank_compile.projection import LowRankLinear
from lowrank_compile.selection import norm_order, select_top_r

SEQ = 64


def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # the same init on every process (DDP would broadcast rank 0's anyway)
    return LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                        max_position_embeddings=SEQ, bos_token_id=0, eos_token_id=0))


def corpus() -> torch.Tensor:
    """torch.optim's installed source, byte by byte: text that does not change while you edit this repository."""
    package = Path(torch.optim.__file__).parent
    return torch.tensor(list(b"".join(p.read_bytes() for p in sorted(package.glob("*.py")))), dtype=torch.long)


def batches(text: torch.Tensor, steps: int, batch: int, rank: int, seed: int = 0):
    """This process's batches: random windows from its own generator (seeded by seed and rank), so data differ."""
    g = torch.Generator().manual_seed(1000 * seed + 1000 + rank)
    for _ in range(steps):
        starts = torch.randint(0, len(text) - SEQ, (batch,), generator=g)
        yield torch.stack([text[s:s + SEQ] for s in starts])


def mean_over_processes(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def train(args, kind: str, text: torch.Tensor, rank: int) -> dict:
    """kind: "adamw" (DDP + torch AdamW) or "lowrank" (DDP or FSDP2 + wrap_model)."""
    model = tiny_llama()
    counter = lrd.CommCounter()
    reducer = None
    if kind == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
        net = torch.nn.parallel.DistributedDataParallel(model)
        net.register_comm_hook(counter, lrd.counting_allreduce_hook)
    else:
        opt = lrc.wrap_model(model, rank=args.rank, lr=args.lr, update_gap=args.update_gap, fused=args.fused,
                             sketch_rows=args.sketch_rows)
        if args.fsdp:
            net = lrd.prepare_fsdp(model, opt, units=list(model.model.layers), refresh_sync=args.refresh_sync)
        else:
            net = lrd.prepare_ddp(model, opt, refresh_sync=args.refresh_sync, comm_hook=lrd.counting_allreduce_hook,
                                  comm_hook_state=counter)
        reducer = opt.refresh_control.score_reducer
    probe = SelectionProbe(model, args) if args.compare and kind == "lowrank" else None
    losses, start = [], time.perf_counter()
    for step, ids in enumerate(batches(text, args.steps, args.batch, rank, args.seed), start=1):
        if probe:
            probe.arm(opt.refresh_control.refresh)
        loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        if probe:
            probe.measure()
        opt.step()
        opt.zero_grad()
        losses.append(mean_over_processes(loss.item()))
        if rank == 0 and (step % args.log_every == 0 or step == args.steps):
            print(f"  {kind:7s} step {step:4d}  loss {losses[-1]:.4f}", flush=True)
    seconds = time.perf_counter() - start
    if args.fsdp and kind == "lowrank":  # no bucket hook under FSDP2: the payload its reduce-scatters carry
        grads = [p for p in model.parameters() if p.requires_grad]
        counter.bytes = args.steps * sum(p.numel() * p.element_size() for p in grads)
    return dict(loss=sum(losses[-10:]) / len(losses[-10:]), seconds=seconds,
                grad_bytes=counter.bytes / args.steps, refresh_bytes=(reducer.bytes if reducer else 0) / args.steps,
                probe=probe.summary() if probe else None)


class SelectionProbe:
    """At refresh steps, records x and gy of every projected layer and compares the three selection modes."""

    def __init__(self, model, args):
        self.layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
        self.p = norm_order("l1")
        self.active = False
        self.seen: dict[str, list] = {}
        self.rows = {"cheap": [], "local": [], "exact": [], "top-r by l2": []}
        self.agree = []  # the fp64 exact selection here == the one training made (in the model's dtype)
        for name, layer in self.layers:
            layer.register_forward_hook(self._forward_hook(name))

    def _forward_hook(self, name):
        def hook(layer, args, out):
            if self.active:
                x = args[0].detach()
                out.register_hook(lambda gy: self.seen.__setitem__(name, (x, gy.detach())))
        return hook

    def arm(self, refresh: bool) -> None:
        self.active = refresh
        self.seen.clear()

    @torch.no_grad()
    def measure(self) -> None:
        if not self.active:
            return
        for name, layer in self.layers:
            x, gy = self.seen[name]
            g = gy.reshape(-1, gy.shape[-1]).t().double() @ x.reshape(-1, x.shape[-1]).double()  # (out, in)
            right = layer.lowrank_spec.right
            d = basis_matrix("dct", layer.basis_size, torch.float64, g.device)
            s_local = g @ d if right else d.t() @ g  # columns (right) / rows (left) are basis directions
            dim = 0 if right else 1
            s_global = s_local.clone()
            dist.all_reduce(s_global)
            local_scores = torch.linalg.vector_norm(s_local, ord=self.p, dim=dim)
            cheap_scores = local_scores.clone()
            dist.all_reduce(cheap_scores)
            energy = s_global.square().sum(dim)  # per basis direction; sums to ||G||_F^2
            r = layer.lowrank_spec.rank
            exact = select_top_r(torch.linalg.vector_norm(s_global, ord=self.p, dim=dim), r)
            self.agree.append(torch.equal(torch.sort(exact).values, torch.sort(layer.selection()).values))
            picks = {"exact": exact, "cheap": select_top_r(cheap_scores, r), "local": select_top_r(local_scores, r),
                     "top-r by l2": select_top_r(energy, r)}
            exact_set = set(exact.tolist())
            for mode, idx in picks.items():
                overlap = len(exact_set & set(idx.tolist())) / r
                self.rows[mode].append((overlap, (energy[idx].sum() / energy.sum()).item()))

    def summary(self) -> dict:
        out = {mode: (sum(o for o, _ in rows) / len(rows), sum(e for _, e in rows) / len(rows), len(rows))
               for mode, rows in self.rows.items()}
        out["agree"] = sum(self.agree) / len(self.agree)
        return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4, help="sequences per process and step")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--update-gap", type=int, default=10)
    ap.add_argument("--refresh-sync", choices=["exact", "cheap", "local"], default=None,
                    help="default: what wrap_model chose (exact)")
    ap.add_argument("--sketch-rows", type=int, default=0)
    ap.add_argument("--fused", action="store_true")
    ap.add_argument("--fsdp", action="store_true", help="FSDP2 fully_shard instead of DDP")
    ap.add_argument("--compare", action="store_true", help="compare exact / cheap / local selections")
    ap.add_argument("--no-baseline", action="store_true", help="skip the DDP + AdamW run")
    ap.add_argument("--seed", type=int, default=0, help="selects the data streams")
    ap.add_argument("--backend", default="gloo")
    ap.add_argument("--log-every", type=int, default=20)
    args = ap.parse_args()
    if args.compare and args.fsdp:
        ap.error("--compare measures DDP runs (it forms each process's full gradient); drop --fsdp")
    if args.compare:
        args.update_gap = 1
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    text = corpus()
    if rank == 0:
        engine = "FSDP2" if args.fsdp else "DDP"
        print(f"{world} processes ({args.backend}), {engine}, rank {args.rank}, update_gap {args.update_gap}, "
              f"refresh_sync {args.refresh_sync or lrd.DEFAULT_REFRESH_SYNC}, fused {args.fused}", flush=True)
    runs = {"lowrank": train(args, "lowrank", text, rank)}
    if not args.no_baseline and not args.compare:
        runs["adamw"] = train(args, "adamw", text, rank)
    if rank == 0:
        print("\n| optimizer | loss (last 10) | gradient reduction B/step | refresh all-reduce B/step | total B/step |"
              " s/step |\n|---|---|---|---|---|---|")
        for kind, r in runs.items():
            total = r["grad_bytes"] + r["refresh_bytes"]
            print(f"| {kind} | {r['loss']:.4f} | {r['grad_bytes']:,.0f} | {r['refresh_bytes']:,.0f} | {total:,.0f} | "
                  f"{r['seconds'] / args.steps:.3f} |")
        if args.fsdp:
            print("(FSDP2: the lowrank row's gradient bytes are the payload of its reduce-scatters, computed from "
                  "the parameters that have gradients; FSDP also all-gathers every weight in full for forward and "
                  "backward)")
        if "adamw" in runs:
            lr_, ad = runs["lowrank"], runs["adamw"]
            print(f"\ncommunication ratio lowrank / AdamW: gradients {lr_['grad_bytes'] / ad['grad_bytes']:.3f}, "
                  f"with refreshes {(lr_['grad_bytes'] + lr_['refresh_bytes']) / ad['grad_bytes']:.3f}")
        probe = runs["lowrank"]["probe"]
        if probe:
            print("\n| selection | overlap with exact | share of global gradient energy kept | layer refreshes |"
                  "\n|---|---|---|---|")
            agree = probe.pop("agree")
            for mode, (overlap, energy, n) in probe.items():
                print(f"| {mode} | {overlap:.3f} | {energy:.3f} | {n} |")
            print(f"\n(the fp64 exact selection above equals the one training made in {agree:.1%} of layer refreshes)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
