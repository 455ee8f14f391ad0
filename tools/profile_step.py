"""Where one training step's time goes: torch.profiler's table of the top operators, per configuration.

    python tools/profile_step.py --device cuda --model 1B --batch 4x1024 --rank 512 \\
        --configs "torch AdamW fused" "lowrank gap 50 int8 fused"

Builds the model and optimizer as tools/bench.py does (same configuration names), runs --warmup steps,
then profiles one ordinary step and prints the operators by self device time (CPU time on CPU).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

if __package__:  # python -m tools.profile_step
    from . import bench
else:  # python tools/profile_step.py: Python puts the script's folder, tools/, first on sys.path
    import bench


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--model", default="ref78m", choices=list(bench.MODELS))
    ap.add_argument("--configs", nargs="+", required=True)
    ap.add_argument("--batch", type=bench.parse_bt, default=(4, 256))
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--dtype", default=None, choices=("fp32", "bf16"))
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--timed", type=int, default=5, help="ordinary steps timed before the profile (median)")
    args = ap.parse_args(argv)
    dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    cuda = args.device == "cuda"
    for name in args.configs:
        spec = dict(bench.CONFIGS[name], name=name, model=args.model, device=args.device, dtype=dtype,
                    batch=args.batch[0], seq=args.batch[1], rank=args.rank)
        bench.preload(spec["kind"])
        model = bench.build(spec)
        opt = bench.make_optimizer(model, spec)
        step = bench.make_train_step(model, opt, spec, bench.batch_ids(spec))

        for _ in range(args.warmup):
            step()
        if getattr(opt, "refresh_control", None) is not None and opt.refresh_control.refresh:
            step()  # profile an ordinary step
        times = []
        for _ in range(args.timed):
            if getattr(opt, "refresh_control", None) is not None and opt.refresh_control.refresh:
                step()
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        import lowrank_compile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            step()
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(f"\n### {name} ({args.model}, batch {args.batch[0]}x{args.batch[1]}, rank {args.rank}; "
              f"lowrank_compile from {lowrank_compile.__file__})")
        if times:
            print(f"ordinary step, median of {len(times)}: {statistics.median(times):.4f} s")
        table = prof.key_averages()
        print(table.table(sort_by=key, row_limit=args.rows, max_name_column_width=60))
        if cuda:  # launch-bound steps show up on the host side
            print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
        del model, opt
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
