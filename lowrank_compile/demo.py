"""Demo: train a wide LLaMA on the bundled texts with torch AdamW and with lowrank_compile, side by side.

    python -m lowrank_compile.demo                       # about 2 minutes on 2 idle CPU cores, 4 on busy ones
    python -m lowrank_compile.demo --steps 60 --out /tmp/demo

The case this library is for: a wide model trained on short batches, where the weights' gradients and Adam's
states, not the activations, fill the memory (fine-tuning looks like this). A random-init transformers
LlamaForCausalLM (byte vocabulary, hidden 768, 3 layers, 21M parameters) is trained on the public-domain texts
shipped in ``lowrank_compile/data`` (nothing is downloaded) at batch 4 x 32, once with ``torch.optim.AdamW``
and once with ``lowrank_compile.wrap_model`` at its defaults and rank = hidden / 4, from the same init, on the
same batches, with the same schedule, each at its best learning rate (see ADAMW_LR).

Each optimizer trains in its own process, so each peak is its own; the processes run side by side with one
thread each (on fewer than 2 cores, one after the other). The table gives, as ratios to torch AdamW: the peak
resident memory above the built model (gradients, optimizer states, activations and temporaries, and whatever
the defaults compile), the bytes of optimizer state, the median step time and the held-out loss. Written to
--out: ``demo.png`` (needs matplotlib), ``results.json`` and ``optimizer.safetensors`` (the trained low-rank
optimizer, by lowrank_compile.save_optimizer; ``python -m lowrank_compile.inspect`` reads it).

Everything here is also a small library for tools/convergence.py: ``llama``, ``train`` and ``peak_rss``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import data
from .measure import peak_rss, reset_peak_rss, state_bytes  # the demo's measures; names kept here for tools

__all__ = ["llama", "train", "peak_rss", "reset_peak_rss", "main"]

# Each optimizer's best learning rate on the demo's model, of those tried (held-out loss after the demo's 200
# steps, 2026-11-27). torch AdamW: 2e-4 2.489, 3e-4 2.454, 5e-4 2.416, 1e-3 2.454, 2e-3 2.535, 3e-3 2.616.
# lowrank_compile: 5e-4 2.491, 1e-3 2.465, 1.5e-3 2.503, 2e-3 2.531 (a projected step is smaller than a full one).
ADAMW_LR = 5e-4
LOWRANK_LR = 1e-3

# Third-party log records that only say how torch and torchao were built (torchao's CUDA-only kernels on a CPU
# build, a deprecation inside torchao's import); the demo keeps them off its output. A library never does this
# to its user's process; the demo owns its worker processes.
_QUIET_LOGGERS = ("torch.utils._pytree", "torchao")


def llama(hidden: int = 192, layers: int = 3, heads: int = 4, intermediate: int | None = None,
          vocab: int = data.VOCAB_SIZE, seq: int = 256, seed: int = 0):
    """A random-init transformers LlamaForCausalLM (LLaMA shapes: intermediate = 8/3 hidden, rounded up to 8).

    The defaults are tools/convergence.py's and tools/score_dtype_energy.py's model; the demo's is wider."""
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
                                       "norm", "scale", "stagger") if spec.get(k) is not None}
        return lrc.wrap_model(model, rank=spec["rank"], lr=lr, **kwargs)
    raise ValueError(f"unknown optimizer {kind!r}; choose adamw, adamw8bit, galore or lowrank")


@torch.no_grad()
def evaluate(model, held_batches) -> float:
    model.eval()
    loss = statistics.fmean(model(input_ids=x, labels=x).loss.item() for x in held_batches)
    model.train()
    return loss


def train(spec: dict, progress: bool = True, checkpoint: str | None = None, progress_file: str | None = None) -> dict:
    """Train one model with one optimizer as `spec` says; return losses, step times, peak memory and state bytes.

    spec: model (kwargs of llama), optimizer, lr, rank and lowrank options (see make_optimizer), steps, batch,
    seq, eval_every, eval_batches, warmup, seed (model init) and data_seed (batch order). The peak is taken above
    the process once the model is built and has been evaluated once (the step-0 held-out loss), so one-off
    set-up of the libraries is not counted. progress_file: where to write the number of steps done (the demo
    reads it for its progress bar).
    """
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    train_data, held_data = data.splits()
    held = data.eval_batches(held_data, spec["batch"], spec["seq"], spec["eval_batches"])
    model = llama(seq=spec["seq"], seed=spec.get("seed", 0), **spec.get("model", {}))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    evals = [(0, evaluate(model, held))]
    base = reset_peak_rss()  # the process with the model built, the data loaded and one evaluation run
    opt = make_optimizer(model, spec)
    steps = spec["steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(steps, spec.get("warmup", max(1, steps // 10))))
    losses, times = [], []
    batches = data.batches(train_data, spec["batch"], spec["seq"], steps, seed=spec.get("data_seed", 0))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=spec.get("name", spec["optimizer"]), unit="step", file=sys.stderr)
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
        if progress_file and (step % 5 == 0 or step == steps):
            Path(progress_file).write_text(str(step))
    if bar is not None:
        bar.close()
    peak = peak_rss()
    summary = None
    if spec["optimizer"] == "lowrank":
        import lowrank_compile as lrc

        summary = lrc.summary(opt)
        if checkpoint:
            lrc.save_optimizer(opt, checkpoint)
    warm = times[min(len(times) - 1, 2):]  # the first steps pay one-off allocations
    return dict(name=spec.get("name", spec["optimizer"]), spec=spec, losses=losses, evals=evals,
                step_s=statistics.median(warm), weights_mib=weights / 2**20, peak_above_mib=(peak - base) / 2**20,
                state_mib=state_bytes(opt) / 2**20, final_eval=evals[-1][1], summary=summary)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class _Progress:
    """One bar over every run's steps: tqdm when installed (the examples extra), else a line every 10%."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.bar, self.enabled, self._said = total, 0, None, enabled, 0
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="training", unit="step", file=sys.stderr)
        except ImportError:
            pass

    def update(self, done: int, note: str) -> None:
        if not self.enabled or done <= self.done:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(note, refresh=False)
            self.bar.update(done - self.done)
        elif done * 10 // self.total > self._said:
            self._said = done * 10 // self.total
            print(f"training: {100 * done // self.total}% ({note})", file=sys.stderr, flush=True)
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_all(specs: list[dict], out: Path, jobs: int, threads: int, progress: bool = True,
            checkpoint: str | None = None) -> list[dict]:
    """train(spec) for each spec in a fresh Python process (so that its peak memory is its own), `jobs` at a time
    with `threads` torch threads each; the lowrank run saves its optimizer to `checkpoint`."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    bar = _Progress(sum(s["steps"] for s in specs), progress)
    waiting, running, results = list(enumerate(specs)), [], {}

    def files(i):
        stem = out / f".run{i}"
        return stem.with_suffix(".json"), stem.with_suffix(".progress"), stem.with_suffix(".log")

    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                i, spec = waiting.pop(0)
                result_file, progress_file, log_file = files(i)
                cmd = [sys.executable, "-m", "lowrank_compile.demo", "--_worker", json.dumps(dict(spec, threads=threads)),
                       "--_result", str(result_file), "--_progress", str(progress_file)]
                if checkpoint and spec["optimizer"] == "lowrank":
                    cmd += ["--_checkpoint", checkpoint]
                with open(log_file, "w") as log:
                    running.append((i, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)))
            time.sleep(0.5)
            done, notes = 0, []
            for i, spec in enumerate(specs):
                _, progress_file, _ = files(i)
                n = spec["steps"] if i in results else _read_int(progress_file)
                done += n
                notes.append(f"{spec['name']} {n}/{spec['steps']}")
            bar.update(done, ", ".join(notes))
            for i, proc in list(running):
                if proc.poll() is None:
                    continue
                running.remove((i, proc))
                result_file, progress_file, log_file = files(i)
                if proc.returncode != 0:
                    raise RuntimeError(f"the {specs[i]['name']} run failed (exit code {proc.returncode}); its output:\n"
                                       + log_file.read_text())
                results[i] = json.loads(result_file.read_text())
                for f in (result_file, progress_file, log_file):
                    f.unlink(missing_ok=True)
    finally:
        bar.close()
        for _, proc in running:
            proc.kill()
    return [results[i] for i in range(len(specs))]


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text() or 0)
    except (OSError, ValueError):
        return 0


def ratios(results: list[dict]) -> list[dict]:
    """Each run's peak memory, state bytes, step time and held-out loss as a ratio to the first run's (AdamW)."""
    ref = results[0]
    keys = {"peak": "peak_above_mib", "state": "state_mib", "step": "step_s", "loss": "final_eval"}
    return [{k: r[v] / ref[v] if ref[v] else float("nan") for k, v in keys.items()} for r in results]


def plot(results: list[dict], path: Path, title: str) -> bool:
    """Held-out loss curves, and every measure as a ratio to torch AdamW; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed, so no plot was written (pip install matplotlib, or "
              "pip install 'lowrank_compile[examples]')", file=sys.stderr)
        return False
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw=dict(width_ratios=[1, 1.25]))
    for i, r in enumerate(results):
        w = max(1, len(r["losses"]) // 25)  # trailing mean over w steps
        smooth = [statistics.fmean(r["losses"][max(0, j - w + 1):j + 1]) for j in range(len(r["losses"]))]
        ax.plot(range(1, len(smooth) + 1), smooth, color=f"C{i}", alpha=0.35, lw=1)
        steps, held = zip(*r["evals"])
        ax.plot(steps, held, "o-", color=f"C{i}", ms=3, label=f"{r['name']}: held-out {r['final_eval']:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / byte)")
    ax.set_ylim(top=min(4.0, ax.get_ylim()[1]))
    ax.legend(fontsize=8)
    ax.set_title("held-out loss (dots) and training loss (faint, smoothed)", fontsize=10)
    measures = [("peak", "peak memory\nabove the model"), ("state", "optimizer\nstate"), ("step", "step time"),
                ("loss", "held-out loss")]
    rel = ratios(results)
    width = 0.8 / len(results)
    for i, (r, q) in enumerate(zip(results, rel)):
        xs = [m + (i - (len(results) - 1) / 2) * width for m in range(len(measures))]
        bars = bx.bar(xs, [q[k] for k, _ in measures], width, color=f"C{i}", label=r["name"])
        for b, (k, _) in zip(bars, measures):
            bx.annotate(f"{q[k]:.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                        fontsize=8)
    bx.axhline(1.0, color="gray", lw=0.8, ls="--")
    bx.set_xticks(range(len(measures)), [label for _, label in measures], fontsize=9)
    bx.set_ylabel("x torch AdamW (lower is better)")
    bx.set_ylim(0, max(1.3, max(q[k] for q in rel for k, _ in measures) * 1.15))
    bx.legend(fontsize=8, loc="upper left")
    ref = results[0]
    bx.set_title(f"less memory (AdamW: {ref['peak_above_mib']:.0f} MiB above the model, "
                 f"{ref['state_mib']:.0f} MiB of state)", fontsize=10)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def table(results: list[dict]) -> str:
    """The demo's table (markdown): each measure, and its ratio to the first run's (torch AdamW)."""
    lines = ["| optimizer | peak memory above the model (MiB) | x AdamW | optimizer state (MiB) | x AdamW "
             "| step (ms) | x AdamW | held-out loss | x AdamW |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r, q in zip(results, ratios(results)):
        lines.append(f"| {r['name']} | {r['peak_above_mib']:.0f} | {q['peak']:.2f} | {r['state_mib']:.1f} | "
                     f"{q['state']:.2f} | {r['step_s'] * 1e3:.0f} | {q['step']:.2f} | {r['final_eval']:.3f} | "
                     f"{q['loss']:.3f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m lowrank_compile.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps per run (default 200)")
    ap.add_argument("--out", default="lowrank_demo", help="output folder (default ./lowrank_demo)")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--heads", type=int, default=0, help="attention heads (default hidden / 64)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--rank", type=int, default=0, help="low-rank r (default hidden / 4)")
    ap.add_argument("--update-gap", type=int, default=None, help="basis refresh interval (default: the library's)")
    ap.add_argument("--state-dtype", default=None, help="fp32 | bf16 | int8 | int4 | fp8 (default: the library's)")
    ap.add_argument("--fused", action="store_true", help="update each layer inside backward")
    ap.add_argument("--sketch-rows", type=int, default=None, help="refresh scores from a k-row sketch (e.g. 64)")
    ap.add_argument("--adamw8bit", action="store_true", help="add torchao's AdamW8bit as a third run (its first "
                    "torch.compile takes about a minute on CPU)")
    ap.add_argument("--adamw-lr", type=float, default=ADAMW_LR)
    ap.add_argument("--lowrank-lr", type=float, default=LOWRANK_LR)
    ap.add_argument("--eval-every", type=int, default=0, help="steps between held-out evaluations (default steps/10)")
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=0, help="runs at a time (default: one per CPU core, at most one per "
                    "optimizer)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (default: cores / jobs, so the "
                    "runs never ask for more threads than there are cores)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    ap.add_argument("--_result", help=argparse.SUPPRESS)
    ap.add_argument("--_progress", help=argparse.SUPPRESS)
    ap.add_argument("--_checkpoint", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


@contextlib.contextmanager
def _quiet_third_party():
    """Keep torch's and torchao's build notices (see _QUIET_LOGGERS) off the demo's output while it runs."""
    saved = [(lg, lg.level) for lg in map(logging.getLogger, _QUIET_LOGGERS)]
    for lg, _ in saved:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args._worker:  # one run, in its own process (run_all)
        with _quiet_third_party():
            result = train(json.loads(args._worker), progress=False, checkpoint=args._checkpoint,
                           progress_file=args._progress)
        Path(args._result).write_text(json.dumps(result))
        return [result]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rank = args.rank or args.hidden // 4
    heads = args.heads or max(1, args.hidden // 64)
    common = dict(model=dict(hidden=args.hidden, layers=args.layers, heads=heads), steps=args.steps,
                  batch=args.batch, seq=args.seq, eval_every=args.eval_every or max(1, args.steps // 10),
                  eval_batches=args.eval_batches, seed=0, data_seed=0)
    specs = [dict(common, name="torch AdamW", optimizer="adamw", lr=args.adamw_lr),
             dict(common, name="lowrank_compile", optimizer="lowrank", lr=args.lowrank_lr, rank=rank,
                  update_gap=args.update_gap, state_dtype=args.state_dtype, fused=args.fused or None,
                  sketch_rows=args.sketch_rows)]
    if args.adamw8bit:
        specs.append(dict(common, name="torchao AdamW8bit", optimizer="adamw8bit", lr=args.adamw_lr))
    cpus = _cpus()
    jobs = args.jobs or max(1, min(len(specs), cpus))
    threads = args.threads or max(1, cpus // jobs)
    title = (f"LLaMA hidden {args.hidden}, {args.layers} layers, byte vocab, batch {args.batch} x {args.seq}, rank "
             f"{rank}, {args.steps} steps; torch {torch.__version__}, {jobs} run(s) at a time x {threads} thread(s)")
    print(f"{title}\ntraining {len(specs)} optimizers on the bundled texts, each in its own process ...", flush=True)
    t0 = time.perf_counter()
    ckpt = out / "optimizer.safetensors"
    results = run_all(specs, out, jobs, threads, progress=not args.quiet, checkpoint=str(ckpt))
    wall = time.perf_counter() - t0
    lowrank = next(r for r in results if r["name"] == "lowrank_compile")
    print(f"\n{lowrank['summary']}\n\n{table(results)}\n")
    q = ratios(results)[1]
    print(f"lowrank_compile: {q['peak']:.2f}x torch AdamW's peak memory above the model, {q['state']:.2f}x its "
          f"optimizer state, {q['loss']:.3f}x its held-out loss, {q['step']:.2f}x its step time ({wall:.0f} s in all)")
    (out / "results.json").write_text(json.dumps(dict(title=title, wall_s=wall, results=results), indent=1))
    wrote = plot(results, out / "demo.png", title)
    if wrote:
        print(f"plot:       {out / 'demo.png'}")
    print(f"results:    {out / 'results.json'}")
    print(f"checkpoint: {ckpt}  (python -m lowrank_compile.inspect {ckpt})")
    return results


if __name__ == "__main__":
    main()
