"""Kernel launches of the optimizer's update, per projected layer, for an ordinary and a refresh step.

    python tools/launch_count.py                      # CPU, fp32 MLP blocks
    python tools/launch_count.py --device cuda        # CUDA, bf16
    python tools/launch_count.py --device cuda --sync-only   # only: does a step synchronise? (issue 16 item 5)

What is counted: everything the update of the weights runs, from the end of backward to the end of
``opt.step()`` — or, with ``fused=True``, inside the in-backward hooks — found through the torch.profiler
ranges the optimizer opens around each update ("lowrank_compile.update.lowrank" / ".plain") and one around
``opt.step()`` itself. The model is a stack of blocks, each an up projection (d -> 4d, right-projected) and a
down projection (4d -> d, left-projected), so every projected layer is a typical transformer MLP matrix.

- CUDA: kernel launches, i.e. the runtime calls cudaLaunchKernel / cuLaunchKernel / cudaLaunchKernelExC and
  cudaMemcpyAsync / cudaMemsetAsync, made on the CPU inside those ranges. A compiled graph counts every kernel
  it launches (its fused Triton kernels and the extern GEMMs alike).
- CPU: there are no launches; the table counts operator calls instead: top-level aten ops inside the ranges
  (an op called by another op counts once). Inductor's fused C++ kernels are not visible to torch.profiler,
  so a compiled graph shows only its extern calls (GEMMs) plus one "compiled region" call: the CPU column is
  an eager-dispatch count, comparable between eager configurations, and a lower bound for compiled ones.
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

LAUNCH_NAMES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaMemcpyAsync",
                "cudaMemsetAsync")
UPDATE_RANGES = ("lowrank_compile.update.lowrank", "lowrank_compile.update.plain")
STEP_RANGE = "launch_count.step"

CONFIGS = {
    "defaults": dict(),
    "gap 50 int8 fused": dict(update_gap=50, state_dtype="int8", fused=True),
    "gap 50 int8 fused, compile_step": dict(update_gap=50, state_dtype="int8", fused=True, compile_step=True),
    "gap 50 fp32 fused, compile_step": dict(update_gap=50, fused=True, compile_step=True),
    "accumulate 2": dict(accumulate=2),
    "int8 weights": dict(weight_dtype="int8"),
    "defaults, eager rounding": dict(compile_step=False),  # bf16 on CUDA: the stochastic rounding hashed eagerly
}
LAUNCH_CONFIGS = ("defaults", "gap 50 int8 fused", "gap 50 int8 fused, compile_step", "gap 50 fp32 fused, compile_step")
# what --sync-only checks (issue 16 item 5): every step path, compiled or not (CUDA runs bf16 weights, so the
# stochastically rounded write-back is in each)
SYNC_CONFIGS = ("defaults", "gap 50 int8 fused", "gap 50 int8 fused, compile_step", "accumulate 2", "int8 weights",
                "defaults, eager rounding")


def build(d: int, blocks: int, dtype: torch.dtype, device: str) -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(blocks):
        layers += [nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)]
    return nn.Sequential(*layers).to(device=device, dtype=dtype)


def count(prof, device: str) -> dict[str, int]:
    """Launches (CUDA) or top-level aten ops (CPU) inside the update ranges and the rest of opt.step()."""
    events = list(prof.events())
    ranges = {name: [e for e in events if e.name == name] for name in UPDATE_RANGES + (STEP_RANGE,)}

    def inside(e, spans):
        return any(s.thread == e.thread and s.time_range.start <= e.time_range.start
                   and e.time_range.end <= s.time_range.end for s in spans)

    if device == "cuda":
        items = [e for e in events if e.name in LAUNCH_NAMES]
    else:
        items = [e for e in events if e.name.startswith("aten::")
                 and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))]
        items += [e for e in events if "Compiled" in e.name and "Region" in e.name]
    out = {"lowrank": 0, "plain": 0, "other in step": 0}
    for e in items:
        if inside(e, ranges["lowrank_compile.update.lowrank"]):
            out["lowrank"] += 1
        elif inside(e, ranges["lowrank_compile.update.plain"]):
            out["plain"] += 1
        elif inside(e, ranges[STEP_RANGE]):
            out["other in step"] += 1
    return out


def measure(name: str, options: dict, args) -> dict:
    import lowrank_compile as lrc

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = build(args.d, args.blocks, dtype, args.device)
    opt = lrc.wrap_model(model, rank=args.rank, lr=1e-4, **options)
    layers = len(opt.layers)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(args.tokens, args.d, generator=gen).to(device=args.device, dtype=dtype)

    def step():
        for _ in range(opt.accumulate):
            model(x).float().square().mean().backward()
            with record_function(STEP_RANGE):
                opt.step()
        opt.zero_grad()

    gap = options.get("update_gap", 1)
    for _ in range(3):  # the first refresh, ordinary steps, compiling
        step()
    if gap > 1:  # compile the refresh-step variants too, then come back to an ordinary step
        opt.refresh_control.set_step(gap - 1)
        step()
        opt.refresh_control.set_step(gap)
        step()
    if args.device == "cuda":
        torch.cuda.synchronize()
    row = {"config": name, "projected layers": layers}
    row["host syncs"] = (sync_check if args.device == "cuda" else host_read_check)(step, opt, gap)
    if args.sync_only:
        return row
    for kind in ("ordinary", "refresh"):
        if kind == "refresh":
            opt.refresh_control.set_step(gap - 1 if gap > 1 else opt.global_step)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        with profile(activities=activities) as prof:
            step()
            if args.device == "cuda":
                torch.cuda.synchronize()
        c = count(prof, args.device)
        row[f"{kind}: per projected layer"] = c["lowrank"] / layers
        row[f"{kind}: plain params"] = c["plain"]
        row[f"{kind}: rest of step"] = c["other in step"]
    return row


def _checked_steps(step, opt, gap: int):
    """An ordinary step, then a refresh step, each with a new lr (as a schedule sets it): yields before each."""
    for target in (None, gap - 1 if gap > 1 else None):
        if target is not None:
            opt.refresh_control.set_step(target)
        for group in opt.param_groups:
            group["lr"] *= 0.5
        yield


def sync_check(step, opt, gap: int) -> str:
    """Run an ordinary and a refresh step (forward, backward, step; lr changed before each) under
    torch.cuda.set_sync_debug_mode("error"): "none", or the first synchronising call's message."""
    try:
        for _ in _checked_steps(step, opt, gap):
            torch.cuda.set_sync_debug_mode("error")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
    except RuntimeError as exc:
        return "sync: " + str(exc).splitlines()[0][:120].replace("|", "/")
    return "none"


def host_read_check(step, opt, gap: int) -> str:
    """CPU stand-in for sync_check: the same steps under torch.profiler, counting host reads of tensor values
    (aten::item / _local_scalar_dense / is_nonzero) outside dynamo's guards (which read 0-d CPU fp64 / int64 inputs
    on CPU only; see tests/test_compile.py): "none (CPU reads)", or the count and the first read's Python caller."""
    reads = []
    for _ in _checked_steps(step, opt, gap):
        with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
            step()
        reads += [e for e in prof.events() if e.name in ("aten::item", "aten::_local_scalar_dense", "aten::is_nonzero")
                  and not _in_dynamo_guard(e)]
    if not reads:
        return "none (CPU reads)"
    frames = [f for f in (reads[0].stack or []) if "lowrank_compile" in f]
    return f"{len(reads)} CPU reads, first at {frames[0] if frames else reads[0].name}".replace("|", "/")


def _in_dynamo_guard(event) -> bool:
    while event is not None:
        if event.name == "TorchDynamo Cache Lookup":
            return True
        event = event.cpu_parent
    return False


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--configs", nargs="*", choices=list(CONFIGS), default=None)
    ap.add_argument("--d", type=int, default=None, help="model width (default 256 CPU, 1024 CUDA)")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--rank", type=int, default=None, help="default d / 4")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="also write the table (markdown) here")
    ap.add_argument("--sync-only", action="store_true",
                    help="only the host-synchronisation check (CUDA: set_sync_debug_mode('error'); CPU: profiler "
                         "host reads), for the configurations of SYNC_CONFIGS unless --configs is given")
    args = ap.parse_args(argv)
    args.configs = args.configs or list(SYNC_CONFIGS if args.sync_only else LAUNCH_CONFIGS)
    torch.set_num_threads(args.threads)
    args.d = args.d or (1024 if args.device == "cuda" else 256)
    args.rank = args.rank or args.d // 4
    unit = "kernel launches" if args.device == "cuda" else "top-level aten ops (compiled CPU kernels not visible)"
    lines = [f"Update {unit} per step: {args.blocks} blocks of Linear({args.d}, {4 * args.d}) + "
             f"Linear({4 * args.d}, {args.d}), rank {args.rank}, {args.tokens} tokens, {args.device}, torch "
             f"{torch.__version__}", "",
             "| configuration | ordinary: per projected layer | ordinary: plain params | ordinary: rest of step "
             "| refresh: per projected layer | refresh: plain params | refresh: rest of step | host syncs (CUDA) / reads (CPU) |",
             "|---|---|---|---|---|---|---|---|"]
    if args.sync_only:
        lines[:] = [f"Host synchronisation of a training step (forward, backward, opt.step; ordinary and refresh "
                      f"step, lr changed before each): {args.device}, torch {torch.__version__}", "",
                      "| configuration | host syncs |", "|---|---|"]
    for name in args.configs:
        try:
            r = measure(name, CONFIGS[name], args)
            if args.sync_only:
                lines.append(f"| {name} | {r['host syncs']} |")
                print(lines[-1], file=sys.stderr, flush=True)
                continue
            lines.append(f"| {name} | {r['ordinary: per projected layer']:.1f} | {r['ordinary: plain params']} | "
                         f"{r['ordinary: rest of step']} | {r['refresh: per projected layer']:.1f} | "
                         f"{r['refresh: plain params']} | {r['refresh: rest of step']} | {r['host syncs']} |")
        except Exception as exc:  # report and go on: one configuration must not hide the others
            lines.append(f"| {name} | failed: {type(exc).__name__}: {str(exc)[:200]} |" + ("" if args.sync_only else
                                                                                          " | | | | | |"))
        print(lines[-1], file=sys.stderr, flush=True)
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
