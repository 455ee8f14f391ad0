"""Write README.md's measured tables from their result files, so that they cannot go stale.

    python tools/readme_numbers.py           # rewrite the blocks in README.md
    python tools/readme_numbers.py --check   # exit 1 if README.md differs from its result files (a test runs this)

Each block sits between ``<!-- numbers: NAME -->`` and ``<!-- /numbers -->``; NAME picks the maker below and
its result file:

- ``demo``: docs/demo_results.json, the results.json of ``python -m lowrank_compile.demo`` (copy a new run's
  ``lowrank_demo/results.json`` and ``demo.png`` to docs/demo_results.json and docs/demo.png).
- ``summary``: the same file's ``lrc.summary`` of the demo's lowrank_compile run.
- ``bench``: docs/bench/cpu_headline/bench_cpu_ref78m.json (tools/bench.py: memory in one run, step time in
  an interleaved one, merged).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DEMO = "docs/demo_results.json"
BENCH = "docs/bench/cpu_headline/bench_cpu_ref78m.json"

# README row label -> tools/bench.py configuration name
BENCH_ROWS = [
    ("torch AdamW (foreach)", "torch AdamW foreach"),
    ("torchao AdamW8bit", "torchao AdamW8bit"),
    ("GaLore (galore-torch, gap 200)", "GaLore r, gap 200"),
    ("**lowrank_compile**, defaults (exact refresh every step)", "lowrank gap 1 fp32"),
    ("**lowrank_compile**, `sketch_rows=64, fused=True`", "lowrank gap 1 sketch64 fp32 fused"),
    ("**lowrank_compile**, `update_gap=50, fused=True`", "lowrank gap 50 fp32 fused"),
    ("**lowrank_compile**, `state_dtype=\"int8\", fused=True, update_gap=50`", "lowrank gap 50 int8 fused"),
    ("floor (no weight gradients, no optimizer)", "floor"),
]


def demo_block() -> str:
    from lowrank_compile.demo import ratios, table

    results = json.loads((REPO / DEMO).read_text())
    runs = results["results"]
    q = ratios(runs)[[r["name"] for r in runs].index("lowrank_compile")]
    return (f"{table(runs)}\n\n"
            f"{results['title']}; from `{DEMO}`. lowrank_compile: **{q['peak']:.2f}x** torch AdamW's peak memory "
            f"above the model, **{q['state']:.2f}x** its optimizer state, {q['loss']:.3f}x its held-out loss, "
            f"{q['step']:.2f}x its step time.")


def summary_block() -> str:
    runs = json.loads((REPO / DEMO).read_text())["results"]
    return "```\n" + next(r["summary"] for r in runs if r["name"] == "lowrank_compile") + "\n```"


def bench_block() -> str:
    rows = json.loads((REPO / BENCH).read_text())["rows"]
    memory = {r["name"]: r for r in rows if r["mode"] == "memory"}
    time = {r["name"]: r for r in rows if r["mode"] == "time"}
    ref_mem, ref_state = memory["torch AdamW foreach"]["peak_above_weights_mib"], memory["torch AdamW foreach"]["state_mib"]
    ref_time = time["torch AdamW foreach"]["amortized_s"]
    lines = ["| optimizer | memory (MiB) | x AdamW | optimizer state x AdamW | step (s) | x AdamW |",
             "|---|---|---|---|---|---|"]
    for label, name in BENCH_ROWS:
        m, t = memory.get(name), time.get(name)
        mem = f"{m['peak_above_weights_mib']:.0f} | {m['peak_above_weights_mib'] / ref_mem:.2f} | " \
              f"{m['state_mib'] / ref_state:.2f}" if m else "- | - | -"
        step = f"{t['amortized_s']:.2f} | {t['amortized_s'] / ref_time:.2f}" if t else "- | -"
        lines.append(f"| {label} | {mem} | {step} |")
    return "\n".join(lines) + f"\n\nFrom `{BENCH}`."


MAKERS = {"demo": demo_block, "summary": summary_block, "bench": bench_block}
BLOCK = re.compile(r"(<!-- numbers: (\w+) -->\n)(.*?)(<!-- /numbers -->)", re.S)


def render(text: str) -> str:
    """README text with every numbers block remade from its result file."""
    def remake(m: re.Match) -> str:
        name = m.group(2)
        if name not in MAKERS:
            raise SystemExit(f"README.md: unknown numbers block {name!r}; known: {', '.join(MAKERS)}")
        return f"{m.group(1)}{MAKERS[name]()}\n{m.group(4)}"
    return BLOCK.sub(remake, text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if README.md is not what its result files give")
    args = ap.parse_args(argv)
    text = README.read_text()
    new = render(text)
    if args.check:
        if new != text:
            print("README.md's numbers differ from their result files; run python tools/readme_numbers.py",
                  file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
