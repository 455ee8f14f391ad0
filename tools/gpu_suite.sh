#!/usr/bin/env bash
# GPU suite (issue 16 item 7): LLaMA-1B, bf16, batch 4 x 1024, rank 512, on one GPU, in about 5 minutes.
#
# Measures, each configuration in its own process (tools/bench.py), peak memory (torch.cuda.max_memory_allocated,
# with and above the weights, and the optimizer's state) and step time (median ordinary step, median refresh
# step, refresh cost = refresh step - ordinary step):
#   once, from the working tree:   floor, torch AdamW fused, torchao AdamW8bit, GaLore (rank 512, gap 200)
#   twice, main and change:        lowrank gap 1 fp32 (the defaults), lowrank gap 50 int8 fused
# "change" is this working tree's lowrank_compile/; "main" is the committed tree of a ref exported beside it into
# .gpu_base/ (gitignored) by --prepare, since the GPU machine has no git. Both use this tree's tools/bench.py, so
# only the package differs; the import is decided by PYTHONPATH (the package is not installed there): main's
# processes run with .gpu_base first, the change's with the repository root first, any PYTHONPATH already set
# (/tmp/site below) kept after them. Each worker records lowrank_compile.__file__ and the table checks it.
# Then checks that no step path synchronises the host (tools/launch_count.py --sync-only: set_sync_debug_mode("error")
# around an ordinary and a refresh step of each; a small model) into suite_<UTC stamp>_syncs.md.
# Writes one table, docs/bench/gpu/suite_<UTC stamp>.md, with .json (every raw result) and .log beside it, prints
# the table at the end and, where $OUT is set, copies the three files there (after each stage too, so a run cut
# short still brings back what it measured).
#
# How to run
#   1. Here (with git), once the change is in the working tree (committed or not):
#        bash tools/gpu_suite.sh --prepare            # exports main (or origin/main) into .gpu_base/
#        bash tools/gpu_suite.sh --prepare <REF>      # or any commit; when the change is already on main, the
#                                                     # commit before it (e.g. --prepare HEAD~2)
#      and have the wheels the GPU machine lacks in .whl/ (gitignored): torchao 0.18.0 and galore-torch 1.0:
#        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#          --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
#          torchao==0.18.0 galore-torch==1.0
#      (bitsandbytes is not needed: tools/bench.py loads galore-torch's AdamW without it).
#   2. On the GPU machine (device tool `run`, carry [".whl", ".gpu_base"], timeout_s 540), this command line:
#        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site; bash tools/gpu_suite.sh
#   3. Back here: copy the files it left in $OUT (suite_<stamp>.md/.json/.log) into docs/bench/gpu/.
#
# Options
#   --prepare [REF]   export REF (default: main, else origin/main) into .gpu_base/ and stop; needs git
#   --quick           the same pipeline on the "tiny" model (128 hidden, 2 layers), batch 2 x 64, rank 32: a smoke
#                     test; writes under out/gpu_suite/ (gitignored) unless --out is given
#   --device D        cuda (default) or cpu; also GPU_SUITE_DEVICE=cpu. CPU is for --quick checks only
#   --out DIR         where the table goes (default docs/bench/gpu, or out/gpu_suite with --quick)
#   --timeout S       seconds one configuration's process may take before it is killed and reported as failed
#                     (default 180 on cuda, 900 on cpu); GPU_SUITE_TIMEOUT too
#   Environment: PYTHON (default python3), GPU_SUITE_THREADS (CPU threads per process, default 1 on cpu).
# A configuration that fails (or times out) is a "failed: ..." row and the suite goes on; the exit status is then
# 3, after everything is written (4: the table itself could not be written). Local smoke test: bash tools/gpu_suite.sh --prepare && GPU_SUITE_DEVICE=cpu
# bash tools/gpu_suite.sh --quick
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BASE="$ROOT/.gpu_base"
PY="${PYTHON:-python3}"
DEVICE="${GPU_SUITE_DEVICE:-cuda}"
TIMEOUT="${GPU_SUITE_TIMEOUT:-}"
OUTDIR="${GPU_SUITE_OUT:-}"
QUICK=0
PREPARE=0
REF=""

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_suite: $*" >&2; exit 2; }

while (($#)); do
    case "$1" in
        --prepare) PREPARE=1
            if (($# > 1)) && [[ $2 != --* ]]; then REF=$2; shift; fi ;;
        --quick) QUICK=1 ;;
        --device) (($# > 1)) || die "--device needs a value"; DEVICE=$2; shift ;;
        --device=*) DEVICE=${1#*=} ;;
        --out) (($# > 1)) || die "--out needs a value"; OUTDIR=$2; shift ;;
        --out=*) OUTDIR=${1#*=} ;;
        --timeout) (($# > 1)) || die "--timeout needs a value"; TIMEOUT=$2; shift ;;
        --timeout=*) TIMEOUT=${1#*=} ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
done
[[ $DEVICE == cuda || $DEVICE == cpu ]] || die "--device must be cuda or cpu, not '$DEVICE'"

# -- prepare (here, with git) -------------------------------------------------------------------------------------
prepare() {
    command -v git >/dev/null || die "--prepare needs git (run it where the repository is, not on the GPU machine)"
    cd "$ROOT"
    if [[ -z $REF ]]; then
        local r
        for r in main origin/main; do
            if git rev-parse -q --verify "$r^{commit}" >/dev/null; then REF=$r; break; fi
        done
        [[ -n $REF ]] || die "neither main nor origin/main exists: name the ref, --prepare REF"
    fi
    local sha
    sha=$(git rev-parse -q --verify "$REF^{commit}") || die "unknown ref '$REF'"
    rm -rf "$BASE"
    mkdir -p "$BASE"
    git archive "$sha" | tar -x -C "$BASE"
    {
        echo "ref: $REF"
        echo "commit: $sha"
        echo "subject: $(git log -1 --format=%s "$sha")"
        echo "committed: $(git log -1 --format=%cI "$sha")"
        echo "exported: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "working tree HEAD at export: $(git rev-parse HEAD)"
    } >"$BASE/GPU_BASE.txt"
    git check-ignore -q "$BASE" || echo "warning: .gpu_base/ is not gitignored" >&2
    echo "exported $REF ($sha) into .gpu_base/: $(du -sh "$BASE" | cut -f1)"
    cat "$BASE/GPU_BASE.txt"
    if diff -rq -x __pycache__ "$BASE/lowrank_compile" "$ROOT/lowrank_compile" >/dev/null; then
        echo "warning: lowrank_compile/ of $REF is the same as the working tree's: main and change rows will" \
             "measure the same code (name the commit before the change: --prepare REF)" >&2
    else
        echo "lowrank_compile/ files that differ from the working tree:"
        diff -rq -x __pycache__ "$BASE/lowrank_compile" "$ROOT/lowrank_compile" | sed "s|$ROOT/||g; s|^|  |" || true
    fi
    local w missing=0
    for w in torchao galore_torch; do
        if ! compgen -G "$ROOT/.whl/$w-*.whl" >/dev/null; then
            echo "warning: no $w wheel in .whl/ (see the header of tools/gpu_suite.sh)" >&2
            missing=1
        fi
    done
    ((missing)) || echo ".whl/: $(du -sh "$ROOT/.whl" | cut -f1) ($(cd "$ROOT/.whl" && ls -- *.whl | tr '\n' ' '))"
    echo "then, on the GPU machine (carry .whl and .gpu_base):"
    echo "  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site" \
         ".whl/*.whl && export PYTHONPATH=/tmp/site; bash tools/gpu_suite.sh"
}

if ((PREPARE)); then
    prepare
    exit 0
fi

# -- the suite --------------------------------------------------------------------------------------------------
STAMP=$(date -u +%Y%m%d-%H%M%S)
if ((QUICK)); then
    MODEL=tiny BATCH=2x64 RANK=32 NAME="suite_quick_${DEVICE}_$STAMP"
    OUTDIR=${OUTDIR:-$ROOT/out/gpu_suite}
else
    MODEL=1B BATCH=4x1024 RANK=512 NAME="suite_$STAMP"
    OUTDIR=${OUTDIR:-$ROOT/docs/bench/gpu}
fi
if [[ $DEVICE == cuda ]]; then
    DTYPE=bf16 THREADS=${GPU_SUITE_THREADS:-0} TIMEOUT=${TIMEOUT:-180}
else
    DTYPE=fp32 THREADS=${GPU_SUITE_THREADS:-1} TIMEOUT=${TIMEOUT:-900}
fi
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
WORK="$ROOT/out/gpu_suite/work_$STAMP"  # bench.py's own outputs, one folder per tree
mkdir -p "$WORK"
LOG="$WORK/suite.log"
: >"$LOG"

SHARED_CONFIGS=("floor" "torch AdamW fused" "torchao AdamW8bit" "GaLore r, gap 200")
LOWRANK_CONFIGS=("lowrank gap 1 fp32" "lowrank gap 50 int8 fused")
# the change alone: options main does not have
CHANGE_ONLY_CONFIGS=("lowrank gap 50 int8 fused, compile_step")  # compiles for about 2 minutes on an H200
COMMON=(--device "$DEVICE" --models "$MODEL" --dtype "$DTYPE" --batch "$BATCH" --time-batch "$BATCH"
        --rank "$RANK" --no-profile --warmup 2 --steps 5 --refresh-steps 2 --rounds 1 --threads "$THREADS"
        --timeout "$TIMEOUT")
CHANGE_PP="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
BASE_PP="$BASE${PYTHONPATH:+:$PYTHONPATH}"

stamp() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" | tee -a "$LOG"; }
stamp_lines() { local line; while IFS= read -r line; do printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$line"; done; }

# which lowrank_compile a python with this PYTHONPATH finds (from /, so that no current directory is on the path)
finds() {
    (cd / && PYTHONPATH="$1" "$PY" -c 'import importlib.util as u; s = u.find_spec("lowrank_compile")
print(s.origin if s else "NOT FOUND")' 2>&1 | tail -1)
}

# merge the per-tree results into the one table; $1 = 1 for the final pass (prints the table). Never fatal: a
# failure here is logged and returned, and the measuring goes on
merge() {
    local rc=0
    SUITE_WORK="$WORK" SUITE_ROOT="$ROOT" SUITE_BASE="$BASE" SUITE_DEVICE="$DEVICE" SUITE_MODEL="$MODEL" \
    SUITE_DTYPE="$DTYPE" SUITE_BATCH="$BATCH" SUITE_RANK="$RANK" SUITE_MD="$OUTDIR/$NAME.md" \
    SUITE_JSON="$OUTDIR/$NAME.json" SUITE_FINAL="$1" SUITE_STARTED="$STAMP" SUITE_THREADS="$THREADS" \
    SUITE_SHARED="$(printf '%s\n' "${SHARED_CONFIGS[@]}")" SUITE_LOWRANK="$(printf '%s\n' "${LOWRANK_CONFIGS[@]}")" \
    SUITE_CHANGE_ONLY="$(printf '%s\n' "${CHANGE_ONLY_CONFIGS[@]}")" \
    "$PY" -I - <<'PYEOF' || rc=$?
import hashlib, json, os, time
from pathlib import Path

E = os.environ
work, root, base = Path(E["SUITE_WORK"]), Path(E["SUITE_ROOT"]), Path(E["SUITE_BASE"])
device, model, final = E["SUITE_DEVICE"], E["SUITE_MODEL"], E["SUITE_FINAL"] == "1"
shared, lowrank = E["SUITE_SHARED"].splitlines(), E["SUITE_LOWRANK"].splitlines()
REF = "torch AdamW fused"
change_only = E.get("SUITE_CHANGE_ONLY", "").splitlines()
plan = [(c, "shared", c) for c in shared] + [(f"{t}: {c}", t, c) for c in lowrank for t in ("main", "change")] + \
    [(f"change: {c}", "change", c) for c in change_only if c]


def load(tree):
    """{configuration: merged worker results} from bench.py's partial.jsonl (written as each process ends)."""
    out = {}
    path = work / tree / f"bench_{device}_{model}.partial.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                d = out.setdefault(r["name"], {})
                if "error" in r:
                    d.setdefault("errors", []).append(r["error"])
                d.update({k: v for k, v in r.items() if k != "error"})
    return out


def tree_files(top):
    pkg = top / "lowrank_compile"
    if not pkg.is_dir():
        return {}
    return {str(p.relative_to(pkg)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(pkg.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


def digest(files):
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:12] if files else "-"


results = {t: load(t) for t in ("shared", "main", "change")}
state = {}
for t in ("shared", "main", "change"):
    d = work / t
    state[t] = ("done", (d / "done").read_text().strip()) if (d / "done").exists() else \
        ("skipped", (d / "skipped").read_text().strip()) if (d / "skipped").exists() else \
        ("running", "") if d.exists() else ("pending", "")
galore_skipped = any("skipping GaLore" in p.read_text() for p in work.glob("shared/bench.stderr"))


def expected_tree_ok(tree, file):
    f = Path(file).resolve()
    in_base = base.resolve() in f.parents
    return in_base if tree == "main" else (root.resolve() in f.parents and not in_base)


rows, failures = [], 0
for label, tree, config in plan:
    r = results[tree].get(config)
    row = dict(label=label, tree=tree, config=config)
    if r is None:
        st, info = state[tree]
        if config == "GaLore r, gap 200" and galore_skipped:
            row["status"] = "skipped: galore-torch is not importable here (.whl/ carried and installed?)"
        elif st == "skipped":
            row["status"] = f"not run: {info}"
        elif st == "done":
            row["status"] = f"no result: bench.py exited {info} (see the log)"
        else:
            row["status"] = st
        failures += st in ("done", "skipped") or row["status"].startswith("skipped")
    elif r.get("errors"):
        row["status"] = "failed: " + r["errors"][-1].replace("|", "/").replace("\n", " / ")[-300:]
        failures += 1
    elif not expected_tree_ok(tree, r.get("lowrank_compile_file", "")):
        row["status"] = f"WRONG TREE: imported lowrank_compile from {r.get('lowrank_compile_file')}"
        failures += 1
    else:
        row["status"] = "ok"
    row["result"] = r
    rows.append(row)


def val(row, key):
    r = row["result"]
    return r.get(key) if r is not None and row["status"] == "ok" else None


ref = next((row for row in rows if row["config"] == REF), None)
ref_total = val(ref, "peak_total_mib") if ref else None
ref_above = val(ref, "peak_above_weights_mib") if ref else None
ref_ord = val(ref, "ordinary_s") if ref else None


def f0(v):
    return f"{v:.0f}" if v is not None else "-"


def f3(v):
    return f"{v:.3f}" if v is not None else "-"


def ratio(v, r):
    return f"{v / r:.2f}" if v is not None and r else "-"


cuda = device == "cuda"
for row in rows:
    total, above = val(row, "peak_total_mib"), val(row, "peak_above_weights_mib")
    o, rf = val(row, "ordinary_s"), val(row, "refresh_s")
    gap = (row["result"] or {}).get("spec", {}).get("update_gap", 0) if row["config"].startswith("lowrank") else 0
    row.update(total_mib=total, above_weights_mib=above, state_mib=val(row, "state_mib"), ordinary_s=o,
               refresh_s=rf if gap > 1 else None, amortized_s=val(row, "amortized_s"), update_gap=gap,
               refresh_cost_s=(rf - o) if gap > 1 and rf is not None and o is not None else None,
               x_adamw_memory=(total / ref_total if total and ref_total else None) if cuda else
               (above / ref_above if above and ref_above else None),
               x_adamw_step=o / ref_ord if o is not None and ref_ord else None)

first = next((row["result"] for row in rows if row["result"] and row["status"] == "ok"), None) or {}
torch_v = next((json.loads(p.read_text()).get("torch") for p in sorted(work.glob(f"*/bench_{device}_{model}.json"))),
               None)
gpu = first.get("device_name") or ("CPU" if not cuda else "?")
base_info = dict(l.split(": ", 1) for l in (base / "GPU_BASE.txt").read_text().splitlines() if ": " in l) \
    if (base / "GPU_BASE.txt").exists() else {}
fm, fc = tree_files(base), tree_files(root)
differ = sorted(k for k in fm.keys() | fc.keys() if fm.get(k) != fc.get(k))
spec = first.get("spec", {})
pending = [row["label"] for row in rows if row["status"] in ("pending", "running")]
b, s = E["SUITE_BATCH"].split("x")

md = [f"# GPU suite: lowrank_compile, main and change, LLaMA {model} ({E['SUITE_STARTED']} UTC)", "",
      f"- {gpu}; torch {torch_v or '?'}; {E['SUITE_DTYPE']} weights; batch {b} x {s}; rank {E['SUITE_RANK']}; "
      "lm_head and embeddings on plain AdamW; each configuration in its own process (tools/bench.py: "
      f"{spec.get('mem_steps', 3)} memory steps, then {spec.get('warmup', 2)} warm-up, {spec.get('steps', 5)} timed "
      f"ordinary, one untimed and {spec.get('refresh_steps', 2)} timed refresh steps)"
      + ("" if cuda else f"; CPU, {E['SUITE_THREADS']} thread(s), memory and time in separate processes"),
      (f"- main: {base_info.get('ref', '?')} {base_info.get('commit', '?')[:12]} \"{base_info.get('subject', '')}\" "
       f"({base_info.get('committed', '?')}), exported into .gpu_base/; lowrank_compile/ digest {digest(fm)}"
       if fm else "- main: no .gpu_base/lowrank_compile (tools/gpu_suite.sh --prepare was not run or not carried)"),
      f"- change: the working tree; lowrank_compile/ digest {digest(fc)}; files that differ from main: "
      + ((", ".join(differ) if differ else "NONE (main and change are the same code)") if fm else "-"),
      "- each row's worker reported the lowrank_compile it imported; main rows from .gpu_base/, the others from the "
      "working tree (checked: a row that imported the wrong one says WRONG TREE)",
      ("- status: complete" if not pending else f"- status: PARTIAL, not measured yet: {', '.join(pending)}")
      + (f"; {failures} configuration(s) failed or missing" if failures else ""), "",
      "| configuration | total peak (MiB) | above weights (MiB) | x AdamW memory | optimizer state (MiB) | "
      "ordinary step (s) | refresh step (s) | refresh cost (s) | per step over a refresh cycle (s) | "
      "x fused AdamW step time |",
      "|---|---|---|---|---|---|---|---|---|---|"]
for row in rows:
    if row["status"] != "ok":
        md.append(f"| {row['label']} | {row['status']} | | | | | | | | |")
        continue
    cost = f3(row["refresh_cost_s"]) if row["update_gap"] > 1 else "every step" if row["update_gap"] == 1 else "-"
    md.append(f"| {row['label']} | {f0(row['total_mib'])} | {f0(row['above_weights_mib'])} | "
              f"{ratio(row['x_adamw_memory'], 1)} | {f0(row['state_mib'])} | {f3(row['ordinary_s'])} | "
              f"{f3(row['refresh_s'])} | {cost} | {f3(row['amortized_s'])} | {ratio(row['x_adamw_step'], 1)} |")
mem_what = "total peak" if cuda else "peak above the weights (no total on CPU)"
md += ["", f"Memory: {'torch.cuda.max_memory_allocated' if cuda else 'peak RSS (VmHWM)'}; total = with the weights, "
       f"above weights = total minus the weights; x AdamW memory = {mem_what} / torch AdamW fused's. Step times: "
       "medians; refresh step = a step that refreshes the basis (lowrank_compile's step counter moved so that it "
       "does); refresh cost = refresh step - ordinary step; per step over a refresh cycle = ((gap - 1) ordinary + "
       "refresh) / gap (update_gap 1 refreshes every step); x fused AdamW step time = ordinary step / torch AdamW "
       "fused's ordinary step. GaLore's SVD refresh (every 200 steps) is not timed apart.", ""]

cmp = []
for c in lowrank:
    m = next(r for r in rows if r["label"] == f"main: {c}")
    ch = next(r for r in rows if r["label"] == f"change: {c}")
    if m["status"] != "ok" or ch["status"] != "ok":
        continue
    mk = "total_mib" if cuda else "above_weights_mib"
    dm = ch[mk] - m[mk] if ch[mk] is not None and m[mk] is not None else None
    rc = (f"{f3(m['refresh_cost_s'])} -> {f3(ch['refresh_cost_s'])}" if m["update_gap"] > 1 else "every step")
    delta = f" ({round(dm):+d})" if dm is not None else ""
    cmp.append(f"| {c} | {f0(m[mk])} -> {f0(ch[mk])}{delta} | {f3(m['ordinary_s'])} -> {f3(ch['ordinary_s'])} "
               f"| {ratio(ch['ordinary_s'], m['ordinary_s'])} | {rc} | {f3(m['amortized_s'])} -> "
               f"{f3(ch['amortized_s'])} | {ratio(ch['amortized_s'], m['amortized_s'])} |")
if cmp:
    md += [f"Change against main ({'total peak' if cuda else 'peak above the weights'}):", "",
           "| configuration | memory, main -> change (MiB) | ordinary step, main -> change (s) | change / main | "
           "refresh cost, main -> change (s) | per step over a cycle, main -> change (s) | change / main |",
           "|---|---|---|---|---|---|---|", *cmp, ""]
text = "\n".join(md)
Path(E["SUITE_MD"]).write_text(text + "\n")
payload = dict(started_utc=E["SUITE_STARTED"], written_utc=time.strftime("%Y%m%d-%H%M%S", time.gmtime()),
               complete=not pending, failures=failures, device=device, device_name=gpu, torch=torch_v, model=model,
               dtype=E["SUITE_DTYPE"], batch=E["SUITE_BATCH"], rank=int(E["SUITE_RANK"]), main=base_info,
               main_digest=digest(fm), change_digest=digest(fc), files_differing=differ if fm else None, rows=rows)
Path(E["SUITE_JSON"]).write_text(json.dumps(payload, indent=1) + "\n")
if final:
    print(text)
(work / "failures").write_text(f"{failures}\n")
PYEOF
    ((rc == 0)) || stamp "warning: the table step failed (exit $rc)"
    cp -f "$LOG" "$OUTDIR/$NAME.log" || true
    if [[ -n ${OUT:-} ]]; then
        mkdir -p "$OUT"
        cp -f "$OUTDIR/$NAME.md" "$OUTDIR/$NAME.json" "$OUTDIR/$NAME.log" "$OUT/" 2>/dev/null || true
    fi
    return "$rc"
}

# one bench.py process tree: $1 tree (shared | main | change), $2 PYTHONPATH, then the configurations
run_bench() {
    local tree=$1 pp=$2 dir="$WORK/$1" rc t0=$SECONDS
    shift 2
    mkdir -p "$dir"
    stamp "== $tree: $(printf '"%s" ' "$@")"
    stamp "   PYTHONPATH=$pp -> $(finds "$pp")"
    set +e
    PYTHONPATH="$pp" PYTHONUNBUFFERED=1 "$PY" "$ROOT/tools/bench.py" "${COMMON[@]}" --out "$dir" --configs "$@" \
        2>&1 >"$dir/bench.stdout" | tee "$dir/bench.stderr" | stamp_lines | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    set -e
    echo "$rc" >"$dir/done"
    stamp "   $tree: bench.py exited $rc after $((SECONDS - t0)) s"
    merge 0 || true
}

stamp "gpu_suite: $MODEL on $DEVICE ($DTYPE, batch $BATCH, rank $RANK); table -> $OUTDIR/$NAME.md"
stamp "python: $("$PY" -c 'import sys; print(sys.version.split()[0], sys.executable)'); PYTHONPATH=${PYTHONPATH:-}"
if [[ $DEVICE == cuda ]] && command -v nvidia-smi >/dev/null; then
    stamp "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"
fi
if [[ -f $BASE/GPU_BASE.txt ]]; then
    stamp "main: $(tr '\n' ';' <"$BASE/GPU_BASE.txt")"
else
    stamp "WARNING: no .gpu_base/ (run 'bash tools/gpu_suite.sh --prepare' where git is, and carry .gpu_base):" \
          "the main rows are skipped"
fi

run_bench shared "$CHANGE_PP" "${SHARED_CONFIGS[@]}"
if [[ -d $BASE/lowrank_compile ]]; then
    run_bench main "$BASE_PP" "${LOWRANK_CONFIGS[@]}"
else
    mkdir -p "$WORK/main"
    echo "no .gpu_base/lowrank_compile (tools/gpu_suite.sh --prepare was not run or not carried)" >"$WORK/main/skipped"
fi
run_bench change "$CHANGE_PP" "${LOWRANK_CONFIGS[@]}" "${CHANGE_ONLY_CONFIGS[@]}"

# issue 16 item 5: no host synchronisation on the step path (torch.cuda.set_sync_debug_mode("error") around an
# ordinary and a refresh step of every step path; tools/launch_count.py --sync-only), a small model, not fatal
SYNC_MD="$OUTDIR/${NAME}_syncs.md"
stamp "sync check -> $SYNC_MD"
if PYTHONPATH="$CHANGE_PP" timeout "${TIMEOUT:-300}" "$PY" "$ROOT/tools/launch_count.py" --device "$DEVICE" --sync-only \
        --d 256 --blocks 2 --tokens 256 --out "$SYNC_MD" 2>&1 | stamp_lines >>"$LOG"; then
    cat "$SYNC_MD" | tee -a "$LOG"
    if grep -q "sync:\|failed:\|CPU reads," "$SYNC_MD"; then
        stamp "sync check: a step path synchronises or failed (see $SYNC_MD)"
        echo 1 >>"$WORK/sync_failed"
    fi
else
    stamp "sync check failed or timed out"
    echo 1 >>"$WORK/sync_failed"
fi
[[ -n ${OUT:-} && -f $SYNC_MD ]] && cp "$SYNC_MD" "$OUT/" || true

stamp "gpu_suite: done in $SECONDS s; table: $OUTDIR/$NAME.md${OUT:+ (copied into \$OUT)}"
echo
merge 1 || exit 4
if [[ -f $WORK/sync_failed ]]; then
    echo "gpu_suite: the host-synchronisation check failed: see $SYNC_MD and $OUTDIR/$NAME.log" >&2
    exit 3
fi
failures=$(cat "$WORK/failures" 2>/dev/null || echo 0)
if ((failures)); then
    echo "gpu_suite: $failures configuration(s) failed or missing: see the table and $OUTDIR/$NAME.log" >&2
    exit 3
fi
