"""fp16 autocast with torch.amp.GradScaler: lowrank_compile against torch AdamW on the same data and scaler settings.

    python tools/amp_check.py --device cuda

A small MLP (fp32 weights, fp16 autocast) is trained twice from one initialisation, once with torch AdamW and
once wrapped (rank 16, update_gap 2), each with its own GradScaler (init_scale 2^16, growth_interval 4), on the
same batches, two of which overflow on purpose. Prints, per step, each scaler's scale and whether each optimizer
stepped, and checks: the same steps were skipped, the scales followed the same course, the wrapped loss went down.
"""
from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

import lowrank_compile as lrc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    dev = args.device
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256)).to(dev)
    wrapped = copy.deepcopy(ref)
    target = nn.Linear(256, 256).to(dev).requires_grad_(False)
    opts = [torch.optim.AdamW(ref.parameters(), lr=3e-3), lrc.wrap_model(wrapped, rank=16, lr=3e-3, update_gap=2)]
    scalers = [torch.amp.GradScaler(dev, init_scale=2.0 ** 16, growth_interval=4) for _ in opts]
    gen = torch.Generator(device=dev).manual_seed(1)
    losses, rows = ([], []), []
    for step in range(args.steps):
        x = torch.randn(64, 256, device=dev, generator=gen)
        y = target(x)
        if step in (5, 17):
            x = x * 6e4  # fp16 overflow in the forward: the scaled gradients are inf / NaN
        row = [step]
        for k, (model, opt, scaler) in enumerate(zip((ref, wrapped), opts, scalers)):
            before = opt.global_step if k == 1 else None
            with torch.autocast(dev, dtype=torch.float16):
                loss = (model(x) - y).float().square().mean()
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scale = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            losses[k].append(loss.item())
            row += [scale, scaler.get_scale() < scale if k == 0 else opt.global_step == before]
        rows.append(row)
    print("| step | AdamW scale | AdamW skipped | lowrank scale | lowrank skipped |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(v) for v in r) + " |")
    same_skips = all(r[2] == r[4] for r in rows)
    same_scales = all(r[1] == r[3] for r in rows)
    first, last = sum(losses[1][:5]) / 5, sum(v for v in losses[1][-5:]) / 5
    print(f"device {dev} ({torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}); torch {torch.__version__}")
    print(f"same steps skipped: {same_skips}; same scales: {same_scales}; skipped: "
          f"{sum(r[4] for r in rows)} of {len(rows)}; wrapped loss {first:.4f} -> {last:.4f}; "
          f"AdamW loss {sum(losses[0][:5]) / 5:.4f} -> {sum(losses[0][-5:]) / 5:.4f}")
    ok = same_skips and same_scales and last < first
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
