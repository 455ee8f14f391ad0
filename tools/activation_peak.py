"""Activation memory of ordinary and refresh steps: saving x D_r instead of x (projection.keeps_projected_input).

    python tools/activation_peak.py [--layers 2 4] [--ranks 512 1024] [--ratios 0 0.3333 1] [--tokens 512]
                                    [--fused] [--weight-dtype int8] [--out docs/bench/activation_peak/llama1b_cpu.json]

A random-init transformers LlamaForCausalLM of LLaMA-1B's shape (hidden 2048, intermediate 5461, 32 heads, vocab
32000; fewer layers on CPU), fp32, batch 1 x --tokens, no activation checkpointing, wrapped with every Linear
projected (lm_head included) and update_gap 200: step 1 refreshes, step 2 is ordinary. For each rule
projection.PROJECTED_INPUT_MAX_RATIO = ratio (0: never keep x D_r, i.e. what the library did before; 1: every layer
whose gradient projects its input keeps x D_r on ordinary steps) it records, per step:

- peak_bytes: measure.peak_tensor_bytes of forward + backward (tensors allocated during them and alive at once; the
  weights, states and basis tables that exist before are not counted);
- saved_bytes: the distinct storages autograd holds for backward at the end of forward (saved_tensors_hooks), the
  model's parameters and buffers left out;
- layer slope: with two depths, (peak at the larger - peak at the smaller) / (layer difference), the per-decoder-
  layer cost, and the peak extrapolated to LLaMA-1B's 24 layers from it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

import lowrank_compile as lrc
from lowrank_compile import projection
from lowrank_compile.measure import peak_tensor_bytes

HIDDEN, INTER, HEADS, VOCAB, FULL_LAYERS = 2048, 5461, 32, 32000, 24


def build(layers: int, rank: int, weight_dtype: str | None, fused: bool):
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
                                   num_attention_heads=HEADS, num_key_value_heads=HEADS, vocab_size=VOCAB,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    kw = {"fused": fused} | ({} if weight_dtype is None else {"weight_dtype": weight_dtype})
    opt = lrc.wrap_model(model, rank=rank, update_gap=200, filter_fn=lambda m, fqn: True, **kw)
    return model, opt


def saved_bytes(fn, model) -> int:
    """Bytes of the distinct storages autograd saves for backward while fn() runs its forward, other than the model's
    own parameters and buffers (the activations)."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in own:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def measure(layers: int, rank: int, ratio: float, tokens: int, weight_dtype: str | None, fused: bool) -> dict:
    projection.PROJECTED_INPUT_MAX_RATIO = ratio
    model, opt = build(layers, rank, weight_dtype, fused)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (1, tokens), generator=g)
    row = {"layers": layers, "rank": rank, "ratio": ratio, "tokens": tokens, "weight_dtype": weight_dtype or "fp32",
           "fused": fused,
           "keeps_projected": sorted({type(m).__name__ + ":" + n.split(".")[-1] for n, m in model.named_modules()
                                      if isinstance(m, lrc.LowRankLinear) and m.keeps_projected_input})}
    for step, name in ((1, "refresh"), (2, "ordinary")):
        assert opt.refresh_control.refresh == (name == "refresh")
        saved = {}

        def fwd_bwd():
            loss, saved["bytes"] = saved_bytes(lambda: model(input_ids=ids, labels=ids).loss, model)
            loss.backward()

        t = time.perf_counter()
        row[f"{name}_peak_bytes"] = peak_tensor_bytes(fwd_bwd)
        row[f"{name}_seconds"] = round(time.perf_counter() - t, 2)
        row[f"{name}_saved_bytes"] = saved["bytes"]
        opt.step()
        opt.zero_grad(set_to_none=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--ranks", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.0, 1 / 3, 1.0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--weight-dtype", default=None, choices=[None, "int8"])
    ap.add_argument("--fused", action="store_true", help="wrap_model(fused=True): updates inside backward")
    ap.add_argument("--out", default="docs/bench/activation_peak/llama1b_cpu.json")
    ap.add_argument("--row", type=float, nargs=3, metavar=("LAYERS", "RANK", "RATIO"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    if args.row:  # one measurement, in this process (main runs each in a fresh one: nothing leaks between them)
        layers, rank, ratio = args.row
        print(json.dumps(measure(int(layers), int(rank), ratio, args.tokens, args.weight_dtype, args.fused)))
        return
    rows = []
    for rank in args.ranks:
        for ratio in args.ratios:
            for layers in args.layers:
                cmd = [sys.executable, __file__, "--row", str(layers), str(rank), repr(ratio), "--tokens",
                       str(args.tokens)] + (["--weight-dtype", args.weight_dtype] if args.weight_dtype else [])
                cmd += ["--fused"] if args.fused else []
                done = subprocess.run(cmd, check=True, capture_output=True, text=True)
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    summary = []
    for rank in args.ranks:
        for ratio in args.ratios:
            mine = sorted((r for r in rows if r["rank"] == rank and r["ratio"] == ratio), key=lambda r: r["layers"])
            entry = {"rank": rank, "ratio": ratio}
            for name in ("ordinary", "refresh"):
                for r in mine:
                    entry[f"{name}_peak_MiB_{r['layers']}L"] = round(r[f"{name}_peak_bytes"] / 2**20, 1)
                    entry[f"{name}_saved_MiB_{r['layers']}L"] = round(r[f"{name}_saved_bytes"] / 2**20, 1)
                if len(mine) >= 2:
                    lo, hi = mine[0], mine[-1]
                    slope = (hi[f"{name}_peak_bytes"] - lo[f"{name}_peak_bytes"]) / (hi["layers"] - lo["layers"])
                    entry[f"{name}_peak_MiB_per_layer"] = round(slope / 2**20, 2)
                    entry[f"{name}_peak_MiB_{FULL_LAYERS}L_extrapolated"] = round(
                        (hi[f"{name}_peak_bytes"] + slope * (FULL_LAYERS - hi["layers"])) / 2**20, 1)
            summary.append(entry)
    result = {"what": "peak tensor bytes of forward + backward (measure.peak_tensor_bytes), LLaMA-1B shape, CPU fp32, "
                      f"no checkpointing, fused={args.fused}, weight_dtype={args.weight_dtype}; "
                      "ratio = projection.PROJECTED_INPUT_MAX_RATIO (0: always save x, as before)",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "summary": summary, "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
