"""The quality rule of the defaults (issue 16 item 6), from a convergence sweep's runs file.

    python tools/paired_quality.py docs/convergence_defaults/convergence_lm_runs.jsonl --baseline "dct gap 1 match"

Each configuration is taken at its best learning rate (seed 0's held-out loss, as tools/convergence.py picks it)
and compared seed by seed (same init and batch order) with the baseline at its own best learning rate. A
configuration passes when the mean paired difference is <= +0.01 nats and no seed is worse by more than 0.03.
Prints a markdown table; --json writes the numbers too.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict


def best_runs(path: str) -> dict[str, dict[int, float]]:
    """name -> {seed: final held-out loss} at the lr where seed 0 did best."""
    runs = [json.loads(line) for line in open(path)]
    by = defaultdict(lambda: defaultdict(dict))  # name -> lr -> seed -> loss
    for r in runs:
        if "error" in r or "final_eval" not in r:
            continue
        spec = r["spec"]
        by[r["name"]][spec["lr"]][spec["seed"]] = r["final_eval"]
    out = {}
    for name, lrs in by.items():
        seeded = {lr: s for lr, s in lrs.items() if 0 in s}
        lr = min(seeded, key=lambda k: seeded[k][0])
        out[name] = dict(lr=lr, seeds=dict(sorted(seeded[lr].items())))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs")
    ap.add_argument("--baseline", default="dct gap 1 match")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    best = best_runs(args.runs)
    base = best[args.baseline]
    rows, out = [], {}
    for name, b in best.items():
        common = sorted(set(b["seeds"]) & set(base["seeds"]))
        diffs = [b["seeds"][s] - base["seeds"][s] for s in common]
        mean = statistics.fmean(diffs) if diffs else float("nan")
        worst = max(diffs) if diffs else float("nan")
        passes = len(common) >= 3 and mean <= 0.01 and worst <= 0.03
        out[name] = dict(lr=b["lr"], seeds=b["seeds"], paired=diffs, mean_diff=mean, worst_diff=worst, passes=passes)
        losses = ", ".join(f"{b['seeds'][s]:.3f}" for s in common)
        rows.append(f"| {name} | {b['lr']:g} | {losses} | {mean:+.4f} | {worst:+.4f} | "
                    f"{'yes' if passes else 'no'} |")
    print(f"Paired against '{args.baseline}' (held-out loss per seed, at each configuration's best lr)\n")
    print("| configuration | best lr | held-out loss, seeds 0, 1, 2 | mean paired diff | worst seed diff | passes |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
