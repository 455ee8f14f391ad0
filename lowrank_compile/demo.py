"""Demo: pre-train a small LLaMA on the bundled corpus with lowrank_compile and with torch AdamW, side by side.

    python -m lowrank_compile.demo                       # about 1.5 minutes on 2 CPU cores
    python -m lowrank_compile.demo --steps 60 --out /tmp/demo

A random-init transformers LlamaForCausalLM (byte-level vocabulary, hidden 192, 3 layers by default) is
trained on the public-domain texts shipped in ``lowrank_compile/data`` (nothing is downloaded), once with
``torch.optim.AdamW`` and once with ``lowrank_compile.wrap_model`` at rank = hidden / 4, from the same init,
on the same batches, with the same schedule. Each optimizer runs in its own process, so its peak memory is
its own: the table gives the process's peak resident memory above what it held once the model was built
(weights, gradients, optimizer states, activations and temporaries all count), the median step time and the
held-out loss. Written to --out: ``demo.png`` (loss curves and memory; needs matplotlib), ``results.json``
and ``optimizer.safetensors`` (lowrank_compile.save_optimizer of the trained low-rank optimizer).

Everything here is also a small library for tools/convergence.py: ``llama``, ``train`` and ``peak_rss``.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import data
from .measure import peak_rss, reset_peak_rss  # the demo's memory measure; names kept here for tools and docs

__all__ = ["llama", "train", "peak_rss", "reset_peak_rss", "main"]

# The two optimizers' learning rates, each the best of a sweep on a similar small LLaMA (docs/BENCHMARKS.md,
# tools/convergence.py): a projected Adam step is smaller than a full one, so the low-rank run wants a larger lr.
ADAMW_LR = 2e-3
LOWRANK_LR = 4e-3


def llama(hidden: int = 192, layers: int = 3, heads: int = 4, intermediate: int | None = None,
          vocab: int = data.VOCAB_SIZE, seq: int = 256, seed: int = 0):
    """A random-init transformers LlamaForCausalLM (LLaMA shapes: intermediate = 8/3 hidden, rounded up to 8)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if intermediate is None:
        intermediate = -(-(8 * hidden // 3) // 8) * 8
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                         max_position_embeddings=seq, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def schedule(steps: int, warmup: int):
    """lr multiplier: linear warm-up, then cosine decay to 10%."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def make_optimizer(model, spec: dict):
    """spec["optimizer"]: "adamw" (torch, foreach), "adamw8bit" (torchao), "galore" (galore-torch) or "lowrank"."""
    kind = spec["optimizer"]
    lr = spec["lr"]
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, foreach=True)
    if kind == "adamw8bit":
        from . import _torchao  # noqa: F401  (torchao's import, quietly)
        from torchao.optim import AdamW8bit

        return AdamW8bit(model.parameters(), lr=lr, weight_decay=0.0)
    if kind == "galore":
        from galore_torch import GaLoreAdamW  # optional: pip install galore-torch

        big = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n and min(p.shape) > spec["rank"]]
        ids = {id(p) for p in big}
        rest = [p for p in model.parameters() if id(p) not in ids]
        groups = [dict(params=rest), dict(params=big, rank=spec["rank"], update_proj_gap=spec.get("update_gap", 200),
                                          scale=spec.get("galore_scale", 0.25), proj_type="std")]
        return GaLoreAdamW(groups, lr=lr, weight_decay=0.0)
    if kind == "lowrank":
        import lowrank_compile as lrc

        kwargs = {k: spec[k] for k in ("update_gap", "state_policy", "state_dtype", "basis", "fused", "sketch_rows",
                                       "norm", "scale") if spec.get(k) is not None}
        return lrc.wrap_model(model, rank=spec["rank"], lr=lr, **kwargs)
    raise ValueError(f"unknown optimizer {kind!r}; choose adamw, adamw8bit, galore or lowrank")


@torch.no_grad()
def evaluate(model, held_batches) -> float:
    model.eval()
    loss = statistics.fmean(model(input_ids=x, labels=x).loss.item() for x in held_batches)
    model.train()
    return loss


def train(spec: dict, progress: bool = True, checkpoint: str | None = None) -> dict:
    """Train one model with one optimizer as `spec` says; return losses, step times and peak memory.

    spec: model (kwargs of llama), optimizer, lr, rank and lowrank options (see make_optimizer), steps, batch,
    seq, eval_every, eval_batches, warmup, seed (model init) and data_seed (batch order).
    """
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    train_data, held_data = data.splits()
    held = data.eval_batches(held_data, spec["batch"], spec["seq"], spec["eval_batches"])
    model = llama(seq=spec["seq"], seed=spec.get("seed", 0), **spec.get("model", {}))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    base = reset_peak_rss()  # the process with the model built and the data loaded
    opt = make_optimizer(model, spec)
    steps = spec["steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(steps, spec.get("warmup", max(1, steps // 10))))
    losses, evals, times = [], [], []
    batches = data.batches(train_data, spec["batch"], spec["seq"], steps, seed=spec.get("data_seed", 0))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=spec.get("name", spec["optimizer"]), unit="step", file=sys.stderr)
    evals.append((0, evaluate(model, held)))
    for step, x in enumerate(batches, 1):
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
        if step % spec["eval_every"] == 0 or step == steps:
            evals.append((step, evaluate(model, held)))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", held=f"{evals[-1][1]:.3f}")
    if bar is not None:
        bar.close()
    if checkpoint:
        import lowrank_compile as lrc

        lrc.save_optimizer(opt, checkpoint)
    warm = times[min(len(times) - 1, 2):]  # the first steps pay one-off allocations
    return dict(name=spec.get("name", spec["optimizer"]), spec=spec, losses=losses, evals=evals,
                step_s=statistics.median(warm), weights_mib=weights / 2**20,
                peak_above_mib=(peak_rss() - base) / 2**20, final_eval=evals[-1][1])


def run_in_process(spec: dict, out: Path, checkpoint: str | None = None, progress: bool = True) -> dict:
    """train(spec) in a fresh Python process, so that its peak memory is its own."""
    out.mkdir(parents=True, exist_ok=True)
    result_file = out / f".{spec['name'].replace(' ', '_')}.json"
    cmd = [sys.executable, "-m", "lowrank_compile.demo", "--_worker", json.dumps(spec), "--_result", str(result_file)]
    if checkpoint:
        cmd += ["--_checkpoint", checkpoint]
    if not progress:
        cmd.append("--quiet")
    subprocess.run(cmd, check=True)
    result = json.loads(result_file.read_text())
    result_file.unlink()
    return result


def plot(results: list[dict], path: Path, title: str) -> bool:
    """Loss curves (train, smoothed, and held-out) and peak memory; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed, so no plot was written (pip install matplotlib, or "
              "pip install 'lowrank_compile[examples]')", file=sys.stderr)
        return False
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw=dict(width_ratios=[2, 1]))
    for i, r in enumerate(results):
        color = f"C{i}"
        w = max(1, len(r["losses"]) // 25)  # trailing mean over w steps
        smooth = [statistics.fmean(r["losses"][max(0, i - w + 1):i + 1]) for i in range(len(r["losses"]))]
        ax.plot(range(1, len(smooth) + 1), smooth, color=color, alpha=0.5, lw=1, label=f"{r['name']} (train)")
        steps, held = zip(*r["evals"])
        ax.plot(steps, held, "o-", color=color, ms=3, label=f"{r['name']} (held-out)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / byte)")
    ax.set_ylim(top=min(6.0, ax.get_ylim()[1]))
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    names = [r["name"] for r in results]
    mem = [r["peak_above_mib"] for r in results]
    bars = bx.bar(range(len(names)), mem, color=[f"C{i}" for i in range(len(names))])
    for b, r in zip(bars, results):
        bx.annotate(f"{r['peak_above_mib']:.0f} MiB\n{r['step_s'] * 1e3:.0f} ms/step", (b.get_x() + b.get_width() / 2,
                    b.get_height()), ha="center", va="bottom", fontsize=8)
    bx.set_xticks(range(len(names)), names, fontsize=8)
    bx.set_ylabel("peak RSS above the built model (MiB)")
    bx.set_ylim(top=max(mem) * 1.3 if mem and max(mem) > 0 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def table(results: list[dict]) -> str:
    ref = results[0]
    lines = ["| optimizer | peak memory above model (MiB) | x AdamW | step time (ms) | x AdamW | held-out loss |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['peak_above_mib']:.1f} | {r['peak_above_mib'] / max(ref['peak_above_mib'], 1e-9):.2f} "
                     f"| {r['step_s'] * 1e3:.0f} | {r['step_s'] / ref['step_s']:.2f} | {r['final_eval']:.3f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m lowrank_compile.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default 300; about 1.5 min)")
    ap.add_argument("--out", default="lowrank_demo", help="output folder (default ./lowrank_demo)")
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=0, help="low-rank r (default hidden / 4)")
    ap.add_argument("--update-gap", type=int, default=None, help="basis refresh interval (default: the library's)")
    ap.add_argument("--state-dtype", default=None, help="fp32 | bf16 | int8 | int4 | fp8 (default: the library's)")
    ap.add_argument("--fused", action="store_true", help="update each layer inside backward")
    ap.add_argument("--sketch-rows", type=int, default=None, help="refresh scores from a k-row sketch (e.g. 64)")
    ap.add_argument("--adamw-lr", type=float, default=ADAMW_LR)
    ap.add_argument("--lowrank-lr", type=float, default=LOWRANK_LR)
    ap.add_argument("--eval-every", type=int, default=0, help="steps between held-out evaluations (default steps/10)")
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    ap.add_argument("--_result", help=argparse.SUPPRESS)
    ap.add_argument("--_checkpoint", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args._worker:  # one run, in its own process (run_in_process)
        result = train(json.loads(args._worker), progress=not args.quiet, checkpoint=args._checkpoint)
        Path(args._result).write_text(json.dumps(result))
        return [result]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rank = args.rank or args.hidden // 4
    common = dict(model=dict(hidden=args.hidden, layers=args.layers, heads=args.heads), steps=args.steps,
                  batch=args.batch, seq=args.seq, eval_every=args.eval_every or max(1, args.steps // 10),
                  eval_batches=args.eval_batches, threads=args.threads, seed=0, data_seed=0)
    specs = [dict(common, name="torch AdamW", optimizer="adamw", lr=args.adamw_lr),
             dict(common, name="lowrank_compile", optimizer="lowrank", lr=args.lowrank_lr, rank=rank,
                  update_gap=args.update_gap, state_dtype=args.state_dtype, fused=args.fused or None,
                  sketch_rows=args.sketch_rows)]
    results = []
    for spec in specs:
        ckpt = str(out / "optimizer.safetensors") if spec["optimizer"] == "lowrank" else None
        results.append(run_in_process(spec, out, checkpoint=ckpt, progress=not args.quiet))
    title = (f"LLaMA hidden {args.hidden}, {args.layers} layers, byte vocab, batch {args.batch}x{args.seq}, "
             f"rank {rank}; torch {torch.__version__}")
    print(f"\n{title}, {args.steps} steps on the bundled corpus\n")
    print(table(results))
    (out / "results.json").write_text(json.dumps(dict(title=title, results=results), indent=1))
    wrote = plot(results, out / "demo.png", title)
    print(f"\nwrote {out / 'results.json'}, {out / 'optimizer.safetensors'}" + (f", {out / 'demo.png'}" if wrote else ""))
    return results


if __name__ == "__main__":
    main()
