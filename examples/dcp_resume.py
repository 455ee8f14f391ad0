"""Save and resume a wrapped model with torch.distributed.checkpoint (DCP), under torchrun, DDP or FSDP2.

    torchrun --nproc_per_node 2 examples/dcp_resume.py --ckpt /tmp/ckpt           # trains 12 steps, saves at 6
    torchrun --nproc_per_node 2 examples/dcp_resume.py --ckpt /tmp/ckpt --resume  # loads step 6, trains to 12
    torchrun --nproc_per_node 2 examples/dcp_resume.py --ckpt /tmp/f --fsdp       # the same with FSDP2 ...
    torchrun --nproc_per_node 4 examples/dcp_resume.py --ckpt /tmp/f --fsdp --resume  # ... resumed on 4 processes
    torchrun --nproc_per_node 1 examples/dcp_resume.py --ckpt /tmp/g --backend nccl --device cuda  # one GPU, NCCL

The checkpoint code is torch's own, unchanged (get_state_dict / dcp.save, dcp.load / set_state_dict): the optimizer
that wrap_model returns makes it work (lowrank_compile/dcp.py). The resumed run prints the losses the uninterrupted
run printed after the save, bit for bit with the same number of processes and engine (a DDP checkpoint written by 2
processes also loads into 1 or 4, and an FSDP2 one is resharded; the losses then agree to rounding: measured on CPU,
2 -> 4 FSDP2 processes printed the same 6 losses to 6 digits). Step t's global batch is drawn from a generator
seeded by t, so a resumed run sees what the uninterrupted one saw, however many processes share it.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import lowrank_compile as lrc
from lowrank_compile import distributed as lrd


class MLP(nn.Module):
    def __init__(self, width: int = 64, depth: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
                                    for _ in range(depth))
        self.head = nn.Linear(width, width)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def batch(step: int, rank: int, world: int, rows: int = 16, width: int = 64):
    """Step `step`'s global batch (the same however many processes), this process's share of it."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(rows, width, generator=g)
    return x.chunk(world)[rank], torch.sin(3 * x).chunk(world)[rank]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="checkpoint directory")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--save-at", type=int, default=6)
    ap.add_argument("--resume", action="store_true", help="load --ckpt first, then train up to --steps")
    ap.add_argument("--fsdp", action="store_true", help="FSDP2 fully_shard instead of DDP")
    ap.add_argument("--backend", default="gloo", help="gloo (CPU) or nccl (with --device cuda)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: each process on the GPU of its LOCAL_RANK")
    args = ap.parse_args()

    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    model = MLP().to(device)
    # exact refreshes (the default in a multi-process job): the selections do not depend on the number of processes,
    # so a resharded resume follows the same run (with "cheap" they would: a sum of per-process scores)
    opt = lrc.wrap_model(model, rank=16, lr=3e-3, update_gap=4)
    if args.fsdp:
        net = lrd.prepare_fsdp(model, opt, units=list(model.blocks))
    else:
        net = lrd.prepare_ddp(model, opt)

    if args.resume:
        model_sd, optim_sd = get_state_dict(net, opt)
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=args.ckpt)
        set_state_dict(net, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
        if rank == 0:
            print(f"resumed from {args.ckpt} at step {opt.global_step} on {world} process(es)")

    for step in range(opt.global_step + 1, args.steps + 1):
        x, y = (t.to(device) for t in batch(step, rank, world))
        loss = F.mse_loss(net(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        if rank == 0:
            print(f"step {step:3d}  loss {total.item() / world:.6f}")
        if step == args.save_at and not args.resume:
            model_sd, optim_sd = get_state_dict(net, opt)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=args.ckpt)
            if rank == 0:
                print(f"saved step {step} to {args.ckpt}")
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
