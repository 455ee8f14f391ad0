#!/usr/bin/env bash
# GPU check of issue 20 (int8 base weights): LLaMA-7B, batch 1 x 512, activation checkpointing, rank 512, int4
# states, fused updates, lm_head projected, the library's default update_gap; int8 weights against bf16 weights,
# each in its own process (tools/llama7b_memory.py --device cuda): torch.cuda.max_memory_allocated of each step
# and its breakdown (weights, states, basis tables, activations, transients), and the step time. Target: int8
# weights <= 10 GiB. About 3-4 minutes on one H100 / H200 (most of it the first step's compiles; the second
# process reuses the first one's inductor cache).
#
# How to run (device tool `run`, carry [".whl"], timeout_s 420), this command line:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/torchao-*.whl && export PYTHONPATH=/tmp/site; bash tools/gpu_int8_weights.sh
# The GPU machine has Python 3.12, torch 2.11, transformers and safetensors but no torchao: its wheel must be in
# .whl/ (gitignored), downloaded here once:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl torchao==0.18.0
# (the script installs it itself if torchao is missing and the wheel is there). lowrank_compile is not installed
# there: the repository root goes first on PYTHONPATH.
#
# Output: $OUT (the device tool's folder; else out/gpu_int8_weights/ here): cuda_7B_int8.json/.md,
# cuda_7B_bf16.json/.md, gpu_int8_weights.md (both in one table) and gpu_int8_weights.log. Back here, copy them
# into docs/bench/int8_weights/.
# Options (environment): PYTHON (python3), GPU_INT8_TIMEOUT (seconds per process, default 170),
# GPU_INT8_STEPS (measured steps per process, default 4; the first compiles), GPU_INT8_WEIGHTS ("int8 bf16"),
# GPU_INT8_FUSED (1: updates inside backward, the configuration of the target; 0: --no-fused, for a library whose
# load_weights into a meta-built wrapped model loses the fused hooks: the tool refuses to report a run whose
# steps made no optimizer state). bf16 weights are materialised by the tool's own loader and then wrapped
# (--loader fallback: the same memory, since bf16 weights are held whole anyway); int8 weights need
# lowrank_compile.load_weights (the model is wrapped on the meta device first). Local smoke test of the script:
#   GPU_INT8_DEVICE=cpu GPU_INT8_ARGS="--tiny --layers 1 --state-dtype fp32 --threads 1 --rank 32 --batch 1x64" \
#     OUT=/tmp/g bash tools/gpu_int8_weights.sh
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
DEST="${OUT:-$ROOT/out/gpu_int8_weights}"
TIMEOUT="${GPU_INT8_TIMEOUT:-170}"
STEPS="${GPU_INT8_STEPS:-4}"
FUSED="${GPU_INT8_FUSED:-1}"
DEVICE="${GPU_INT8_DEVICE:-cuda}"   # cpu: a local smoke test of this script, with GPU_INT8_ARGS="--tiny ..."
read -r -a ARGS <<<"${GPU_INT8_ARGS:-}"
WEIGHTS="${GPU_INT8_WEIGHTS:-int8 bf16}"
mkdir -p "$DEST"
LOG="$DEST/gpu_int8_weights.log"
: >"$LOG"
say() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" | tee -a "$LOG"; }

cd "$ROOT"
if ! "$PY" -c "import torchao" 2>/dev/null; then
    if compgen -G "$ROOT/.whl/torchao-*.whl" >/dev/null; then
        say "torchao missing: installing it from .whl/ into /tmp/site"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "$ROOT"/.whl/torchao-*.whl >>"$LOG" 2>&1 || { say "pip install of the torchao wheel failed"; exit 2; }
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        say "torchao is not importable and there is no .whl/torchao-*.whl (see the header)"; exit 2
    fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor_int8_weights}"  # shared by both processes
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import torch, transformers, torchao, lowrank_compile as lrc
print("torch", torch.__version__, "transformers", transformers.__version__, "torchao", torchao.__version__,
      "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None,
      "load_weights", hasattr(lrc, "load_weights"), "lowrank_compile", lrc.__file__)
EOF
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv 2>&1 | tee -a "$LOG" || true

failed=0
jsons=()
for w in $WEIGHTS; do
    out="$DEST/cuda_7B_$w.json"
    extra=()
    [[ $w == bf16 ]] && extra+=(--loader fallback)
    [[ $FUSED == 0 ]] && extra+=(--no-fused)
    say "7B, $w weights: python tools/llama7b_memory.py --device $DEVICE --weight-dtype $w --batch 1x512 --rank 512" \
        "--state-dtype int4 --steps $STEPS ${extra[*]} ${ARGS[*]} --out $out"
    t0=$(date +%s)
    timeout -k 10 "$TIMEOUT" "$PY" tools/llama7b_memory.py --device "$DEVICE" --weight-dtype "$w" --batch 1x512 \
        --rank 512 --state-dtype int4 --steps "$STEPS" "${extra[@]}" "${ARGS[@]}" --out "$out" >>"$LOG" 2>&1
    rc=$?
    say "  exit $rc after $(( $(date +%s) - t0 )) s"
    if [[ $rc -eq 0 && -s $out ]]; then
        jsons+=("$out")
        grep -E '^(built|step|profiled|\{)' "$LOG" | tail -n $((STEPS + 3)) || true
    else
        failed=$((failed + 1))
        tail -n 25 "$LOG"
    fi
done
if ((${#jsons[@]})); then
    "$PY" tools/llama7b_memory.py --render "${jsons[@]}" --md "$DEST/gpu_int8_weights.md" | tee -a "$LOG"
fi
((failed == 0)) || { say "$failed configuration(s) failed: see $LOG"; exit 3; }
say "done: $DEST"
