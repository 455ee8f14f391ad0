"""Eager vs compiled, fused vs not: step time and peak tensor memory of one training step on CPU.

A small random-init LLaMA (transformers) is trained for a few steps in each configuration, side by side in
one run, next to torch.optim.AdamW (foreach, and with a compiled step). Reported per configuration:
median step time (forward + backward + step, after warm-up, over refresh and ordinary steps alike), the
optimizer's persistent state, and the peak of tensors alive at once during a step above what persisted
before it (torch.profiler memory events; this leaves torch.compile on). Ratios are to eager torch AdamW.

    python tools/bench_compile.py [--hidden 256 --layers 4 --batch 4 --seq 128 --rank 64 --steps 6]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys

import torch

import lowrank_compile as lrc
from lowrank_compile.measure import median_time, peak_tensor_bytes, state_bytes


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate or int(args.hidden * 2.6875),
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                      vocab_size=args.vocab, max_position_embeddings=args.seq)
    return LlamaForCausalLM(cfg)


def configurations(args):
    gap = args.gap
    lr_kw = dict(rank=args.rank, lr=1e-3, update_gap=gap)
    return {
        "torch AdamW (foreach)": dict(kind="adamw"),
        "torch AdamW, compiled step": dict(kind="adamw", compile_step=True),
        "torch AdamW, compiled model+step": dict(kind="adamw", compile_step=True, compile_model="whole"),
        "lowrank eager": dict(kind="lowrank", wrap=lr_kw),
        "lowrank eager fused": dict(kind="lowrank", wrap=dict(lr_kw, fused=True)),
        "lowrank eager, sketch 64": dict(kind="lowrank", wrap=dict(lr_kw, sketch_rows=64)),
        "lowrank compiled model": dict(kind="lowrank", wrap=lr_kw, compile_model="whole"),
        "lowrank compiled model+step": dict(kind="lowrank", wrap=dict(lr_kw, compile_step=True),
                                            compile_model="whole"),
        "lowrank compiled model, fused": dict(kind="lowrank", wrap=dict(lr_kw, fused=True), compile_model="whole"),
        "lowrank compiled blocks, fused": dict(kind="lowrank", wrap=dict(lr_kw, fused=True),
                                               compile_model="blocks"),
    }


def run(name, spec, base, batch, args):
    model = copy.deepcopy(base)
    if spec["kind"] == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
        step = torch.compile(opt.step) if spec.get("compile_step") else opt.step
    else:
        opt = lrc.wrap_model(model, **spec["wrap"])
        step = opt.step
    forward = model
    if spec.get("compile_model") == "whole":
        forward = torch.compile(model, fullgraph=True)
    elif spec.get("compile_model") == "blocks":
        lrc.compile_blocks(model)

    def train_step():
        loss = forward(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        step()
        opt.zero_grad(set_to_none=True)

    def refreshing() -> bool:
        return spec["kind"] == "lowrank" and opt.refresh_control.refresh

    for _ in range(args.warmup):  # compiles both the refresh and the ordinary graphs
        train_step()
    peak = peak_tensor_bytes(train_step)
    times = {True: [], False: []}
    for _ in range(args.steps):
        kind = refreshing()
        times[kind].append(median_time(train_step, 1))
    everything = times[True] + times[False]
    return dict(config=name, step_s=statistics.median(everything),
                refresh_s=statistics.median(times[True]) if times[True] else None,
                ordinary_s=statistics.median(times[False]) if times[False] else None,
                state_mib=state_bytes(opt) / 2**20, peak_step_mib=peak / 2**20)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=0)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--gap", type=int, default=2, help="update_gap (2: steps alternate refresh / ordinary)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--only", nargs="*", help="run only configurations whose name contains one of these")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    base = build(args)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    rows = []
    for name, spec in configurations(args).items():
        if args.only and not any(o in name for o in args.only):
            continue
        rows.append(run(name, spec, base, batch, args))
        print(f"  measured {name}", file=sys.stderr, flush=True)
    ref = rows[0]
    print(f"\nLLaMA hidden {args.hidden}, {args.layers} layers, batch {args.batch}x{args.seq}, rank {args.rank}, "
          f"update_gap {args.gap}; torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| configuration | step (s) | x AdamW | refresh step x AdamW | ordinary step x AdamW | state (MiB) | "
          "peak in step (MiB) | state+peak x AdamW |")
    print("|---|---|---|---|---|---|---|---|")

    def ratio(v):
        return "-" if v is None else f"{v / ref['step_s']:.2f}"

    for r in rows:
        total = (r["state_mib"] + r["peak_step_mib"]) / (ref["state_mib"] + ref["peak_step_mib"])
        print(f"| {r['config']} | {r['step_s']:.3f} | {r['step_s'] / ref['step_s']:.2f} | {ratio(r['refresh_s'])} | "
              f"{ratio(r['ordinary_s'])} | {r['state_mib']:.1f} | {r['peak_step_mib']:.1f} | {total:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
