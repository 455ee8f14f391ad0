"""Quickstart: train a tiny LLaMA-style language model on CPU with lowrank_compile, then with torch AdamW.

    python examples/quickstart.py            # about half a minute on 2 CPU cores
    python examples/quickstart.py --steps 40 # shorter

The model (2 decoder blocks, width 256, byte-level vocabulary) is defined below and starts from a fixed
random init; the training text is this file's own source, read byte by byte, so nothing is downloaded.
Both optimizers see the same init, the same batches and the same learning rate. The table at the end
gives each one's final loss, the peak tensor memory of backward + step (every live tensor: weights,
gradients, optimizer states, activations and temporaries, tracked op by op in eager mode) and the
median step time.
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import lowrank_compile as lrc
from lowrank_compile.measure import AllocationTracker, persistent_bytes, state_bytes

VOCAB = 256  # bytes


# -- a tiny LLaMA: RMSNorm, rotary attention, SwiGLU MLP ------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps) * self.weight


def rotary(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, cos, sin):
        b, t, d = x.shape
        q, k, v = (proj(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))  # (b, heads, t, head_dim)
        y = F.scaled_dot_product_attention(rotary(q, cos, sin), rotary(k, cos, sin), v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.attn_norm = RMSNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp_norm = RMSNorm(dim)
        self.mlp = MLP(dim, hidden)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class TinyLlama(nn.Module):
    def __init__(self, dim: int = 256, depth: int = 2, heads: int = 4, hidden: int = 688, max_len: int = 128):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, hidden) for _ in range(depth))
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, VOCAB, bias=False)
        head_dim = dim // heads
        freqs = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = torch.outer(torch.arange(max_len).float(), freqs)  # (max_len, head_dim / 2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, ids, targets):
        t = ids.shape[1]
        cos, sin = self.cos[:t], self.sin[:t]
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h, cos, sin)
        logits = self.lm_head(self.norm(h))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


# -- data: this file's bytes -------------------------------------------------------------------------------------

def batches(steps: int, batch: int, seq: int, seed: int = 0):
    data = torch.frombuffer(bytearray(Path(__file__).read_bytes()), dtype=torch.uint8).long()
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        window = torch.stack([data[s:s + seq + 1] for s in starts.tolist()])
        out.append((window[:, :-1], window[:, 1:]))
    return out


# -- training ----------------------------------------------------------------------------------------------------

def train(name: str, model: nn.Module, opt: torch.optim.Optimizer, data, log_every: int, tracked: int = 2) -> dict:
    """Train on `data`. The first `tracked` steps measure the peak tensor bytes of backward + step (slowly,
    op by op); the other steps are timed."""
    losses, times, peak = [], [], 0
    for step, (ids, targets) in enumerate(data, start=1):
        if step <= tracked:
            base = persistent_bytes(model, opt)
            with AllocationTracker() as tracker:
                loss = model(ids, targets)
                tracker.enter_phase("backward")  # activations saved by forward are live from here on
                loss.backward()
                opt.step()
            peak = max(peak, base + tracker.peak)
            opt.zero_grad(set_to_none=True)
        else:
            t0 = time.perf_counter()
            loss = model(ids, targets)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if step == 1 or step % log_every == 0 or step == len(data):
            print(f"  {name:<16} step {step:4d}  loss {losses[-1]:.4f}", flush=True)
    return dict(name=name, first=losses[0], final=statistics.fmean(losses[-10:]), peak=peak,
                states=state_bytes(opt), step_time=statistics.median(times) if times else float("nan"),
                finite=all(math.isfinite(v) for v in losses))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()

    torch.manual_seed(0)
    base = TinyLlama()
    data = batches(args.steps, args.batch, args.seq)
    print(f"TinyLlama: {sum(p.numel() for p in base.parameters()) / 1e6:.2f}M parameters, {args.batch}x{args.seq} "
          f"tokens per step, {args.steps} steps, lr {args.lr}, {torch.get_num_threads()} threads")
    log_every = max(1, args.steps // 8)

    model = copy.deepcopy(base)
    opt = lrc.wrap_model(model, rank=args.rank, lr=args.lr, verbose=True)  # rewrites the nn.Linear layers in place
    ours = train("lowrank_compile", model, opt, data, log_every)

    model = copy.deepcopy(base)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    adamw = train("torch AdamW", model, opt, data, log_every)

    print()
    print("| optimizer | final loss (mean of last 10 steps) | peak tensor memory of backward+step "
          "| optimizer states | step time (median) |")
    print("|---|---|---|---|---|")
    for row, label in ((ours, "lowrank_compile"), (adamw, "torch.optim.AdamW")):
        print(f"| {label} | {row['final']:.4f} | {row['peak'] / 2**20:.2f} MiB | {row['states'] / 2**20:.2f} MiB "
              f"| {row['step_time'] * 1e3:.1f} ms |")
    print(f"\nlowrank_compile: loss {ours['first']:.4f} -> {ours['final']:.4f}; peak memory "
          f"{ours['peak'] / adamw['peak']:.2f}x torch AdamW's, step time {ours['step_time'] / adamw['step_time']:.2f}x")
    if not (ours["finite"] and adamw["finite"]):
        raise SystemExit("a loss was not finite")


if __name__ == "__main__":
    main()
