"""Step time and peak memory of one LLaMA training step: lowrank_compile vs torch AdamW, torchao, GaLore.

    python tools/bench.py                                   # CPU: the 78M reference model, memory and time
    python tools/bench.py --models 60M --modes memory       # a GaLore configuration, memory only
    python tools/bench.py --device cuda --models 1B --dtype bf16 --batch 4x1024 --time-batch 4x1024
    python tools/bench.py --device cuda --models 7B --modes memory --batch 1x512 --checkpointing --rank 512 \\
        --configs floor "lowrank gap 200 int8 fused"

Models: random-init transformers LlamaForCausalLM in the shapes of the GaLore configurations (hidden /
intermediate / layers / heads, vocab 32000): 60M 512/1376/8/8, 130M 768/2048/12/12, 350M 1024/2736/24/16,
1B 2048/5461/24/32, 7B 4096/11008/32/32; and "ref78m", 1024/2736/6/16 with vocab 1000 (78M parameters), the
model behind the reference numbers; "demo192", 192/512/3/4 with the byte vocabulary (256), the small LLaMA of the
CPU speed target (issue 16); "tiny", 128/344/2/4 with vocab 1000, for smoke tests
(tools/gpu_suite.sh --quick). Optimizers (see CONFIGS): the floor (forward + activation
backward, every weight frozen: no weight gradient, no optimizer), torch AdamW (foreach; fused), torchao
AdamW8bit, the GaLore peer (galore-torch, SVD, rank --rank, update_proj_gap 200, scale 0.25; an optional
extra: skipped when not installed) and lowrank_compile at rank --rank (update_gap 1 / 50 / 200, fp32 / int8
states, fused (in-backward) or not, eager or torch.compile'd per block with --compile).

Every configuration runs in its own process. Memory (--modes memory, at --batch): on CPU, the process's
peak resident memory (VmHWM, reset once the model is built) above its resident memory with the model
built, i.e. everything but the weights: gradients, optimizer states, activations, temporaries, allocator
slack; on CUDA, torch.cuda.max_memory_allocated above the weights. Then one more step runs under
torch.profiler's memory view and the table gives its peak split by category. Time (--modes time, at
--time-batch): the median wall time of ordinary steps and of refresh steps (lowrank_compile's step counter
is moved so that the next step refreshes), and the time per step averaged over a refresh cycle,
((gap - 1) ordinary + 1 refresh) / gap. Ratios are to torch AdamW (foreach on CPU, fused on CUDA) measured
in the same run. Writes <out>/bench_<device>_<model>.json, .md and .png.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

try:
    from lowrank_compile.measure import peak_rss, reset_peak_rss, state_bytes, timed
except ModuleNotFoundError as e:
    # gpu_suite.sh runs this file against an older tree too (its "main" side, first on PYTHONPATH); one from
    # before lowrank_compile/measure.py is measured with this tree's measure.py (torch and the standard library
    # only), loaded from its file. Remove once no compared tree predates measure.py.
    if e.name != "lowrank_compile.measure":
        raise
    import importlib.util

    _spec = importlib.util.spec_from_file_location("_bench_measure", HERE.parent / "lowrank_compile" / "measure.py")
    _measure = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_measure)
    peak_rss, reset_peak_rss, state_bytes, timed = (_measure.peak_rss, _measure.reset_peak_rss,
                                                    _measure.state_bytes, _measure.timed)

# name: (hidden, intermediate, layers, heads, vocab)
MODELS = {"tiny": (128, 344, 2, 4, 1000), "demo192": (192, 512, 3, 4, 256), "ref78m": (1024, 2736, 6, 16, 1000), "60M": (512, 1376, 8, 8, 32000),
          "130M": (768, 2048, 12, 12, 32000), "350M": (1024, 2736, 24, 16, 32000), "1B": (2048, 5461, 24, 32, 32000),
          "7B": (4096, 11008, 32, 32, 32000)}


def lowrank(gap: int, dtype: str = "fp32", fused: bool = False, sketch: int = 0, compiled: bool = False,
            head: bool = False, stochastic: bool = True, compile_step: bool | None = None, stagger: bool = False) -> dict:
    return dict(kind="lowrank", update_gap=gap, state_dtype=dtype, fused=fused, sketch_rows=sketch, compiled=compiled,
                project_head=head, stochastic_round=stochastic, compile_step=compile_step, stagger=stagger)


CONFIGS = {
    "floor": dict(kind="floor"),
    "torch AdamW foreach": dict(kind="adamw", foreach=True),
    "torch AdamW fused": dict(kind="adamw", fused=True),
    "torchao AdamW8bit": dict(kind="adamw8bit"),
    "GaLore r, gap 200": dict(kind="galore", update_gap=200),
    "lowrank gap 200 fp32": lowrank(200),
    "lowrank gap 200 int8": lowrank(200, "int8"),
    "lowrank gap 200 int8 fused": lowrank(200, "int8", True),
    "lowrank gap 200 int8 fused, lm_head projected": lowrank(200, "int8", True, head=True),
    "lowrank gap 200 int4 fused, lm_head projected": lowrank(200, "int4", True, head=True),
    "lowrank gap 50 fp32": lowrank(50),
    "lowrank gap 50 fp32 fused": lowrank(50, "fp32", True),
    "lowrank gap 50 int8 fused": lowrank(50, "int8", True),
    "lowrank gap 50 int8 fused, bf16 round to nearest": lowrank(50, "int8", True, stochastic=False),
    "lowrank gap 1 fp32": lowrank(1),
    "lowrank gap 1 int8 fused": lowrank(1, "int8", True),
    "lowrank gap 1 sketch64 fp32": lowrank(1, "fp32", False, 64),
    "lowrank gap 1 sketch32 fp32": lowrank(1, "fp32", False, 32),
    "lowrank gap 4 stagger fp32": lowrank(4, stagger=True),
    "lowrank gap 8 stagger fp32": lowrank(8, stagger=True),
    "lowrank gap 1 sketch64 fp32 fused": lowrank(1, "fp32", True, 64),
    "lowrank gap 1 sketch64 int8 fused": lowrank(1, "int8", True, 64),
    "lowrank gap 50 int8 fused, compile_step": lowrank(50, "int8", True, compile_step=True),
    "lowrank gap 50 fp32 fused, compile_step": lowrank(50, "fp32", True, compile_step=True),
    "lowrank gap 1 fp32, compile_step": lowrank(1, "fp32", False, compile_step=True),
    "lowrank gap 50 int8 fused, compiled": lowrank(50, "int8", True, compiled=True),
    "lowrank gap 200 int8 fused, compiled": lowrank(200, "int8", True, compiled=True),
    "lowrank gap 1 int8 fused, compiled": lowrank(1, "int8", True, compiled=True),
    "lowrank gap 1 sketch64 int8 fused, compiled": lowrank(1, "int8", True, 64, compiled=True),
}
COMPILED = {k for k, v in CONFIGS.items() if v.get("compiled")}


# -- measuring inside one process ------------------------------------------------------------------------------
def build(spec: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, vocab = MODELS[spec["model"]]
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                      max_position_embeddings=max(2048, spec["seq"]), tie_word_embeddings=False, use_cache=False)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build directly in the weight dtype: no fp32 copy of a 7B model
    try:
        with torch.device(spec["device"]):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    if spec.get("checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def make_optimizer(model, spec: dict):
    kind = spec["kind"]
    if kind == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        return None
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=spec.get("foreach"), fused=spec.get("fused"))
    if kind == "adamw8bit":
        from lowrank_compile import _torchao  # noqa: F401  (quiet torchao import)
        from torchao.optim import AdamW8bit

        return AdamW8bit(model.parameters(), lr=1e-4)
    if kind == "galore":
        GaLoreAdamW = galore_adamw()
        big = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n and "lm_head" not in n]
        ids = {id(p) for p in big}
        groups = [dict(params=[p for p in model.parameters() if id(p) not in ids]),
                  dict(params=big, rank=spec["rank"], update_proj_gap=spec["update_gap"], scale=0.25, proj_type="std")]
        return GaLoreAdamW(groups, lr=1e-4)
    if kind == "lowrank":
        import lowrank_compile as lrc

        head = spec.get("project_head", False)
        opt = lrc.wrap_model(model, rank=spec["rank"], lr=1e-4, update_gap=spec["update_gap"],
                             state_dtype=spec["state_dtype"], fused=spec["fused"], sketch_rows=spec["sketch_rows"],
                             filter_fn=lambda m, fqn: head or "lm_head" not in fqn,
                             stochastic_round=spec.get("stochastic_round", True),
                             **({"compile_step": spec["compile_step"]} if spec.get("compile_step") is not None else {}),
                             **({"stagger": True} if spec.get("stagger") else {}))
        if not hasattr(opt, "refresh_control"):  # a tree from before the public name (gpu_suite.sh's main side)
            opt.refresh_control = opt._control
        if spec.get("compiled"):
            lrc.compile_blocks(model)
        return opt
    raise ValueError(f"unknown kind {kind!r}")


def preload(kind: str) -> None:
    import transformers  # noqa: F401

    if kind in ("lowrank", "adamw8bit"):
        import lowrank_compile  # noqa: F401  (imports torchao quietly)
        import torch._inductor.compile_fx  # noqa: F401  (both compile their quantised-state updates)
        import torchao.optim  # noqa: F401
    if kind == "galore":
        galore_adamw()


def make_train_step(model, opt, spec: dict, ids):
    """One training step of `spec`'s configuration (forward, backward, optimizer step) as a function."""
    floor = spec["kind"] == "floor"
    cuda = spec["device"] == "cuda"

    def train_step():
        if floor:  # activations' backward only: the embedding output is the one leaf that wants a gradient
            emb = model.get_input_embeddings()(ids).detach().requires_grad_()
            loss = model(inputs_embeds=emb, labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    return train_step


def batch_ids(spec: dict) -> torch.Tensor:
    """The one fixed batch of token ids every step of `spec`'s configuration trains on."""
    vocab = MODELS[spec["model"]][4]
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (spec["batch"], spec["seq"]), generator=gen).to(spec["device"])


def refresh_gap(spec: dict) -> int:
    """lowrank_compile's update_gap for a lowrank configuration, 0 for the others (nothing refreshes). A staggered
    schedule counts as 1: some layer refreshes at every step, so consecutive steps are timed as they come."""
    if spec["kind"] != "lowrank":
        return 0
    return 1 if spec.get("stagger") else spec.get("update_gap", 0)


def step_times(ordinary: list[float], refresh: list[float], gap: int) -> dict:
    """Medians of ordinary and refresh steps, and the time per step averaged over a refresh cycle."""
    out = dict(ordinary_s=statistics.median(ordinary))
    if gap > 1:
        out["refresh_s"] = statistics.median(refresh)
        out["amortized_s"] = ((gap - 1) * out["ordinary_s"] + out["refresh_s"]) / gap
    else:
        out["refresh_s"] = out["ordinary_s"] if gap == 1 else None
        out["amortized_s"] = out["ordinary_s"]
    return out


def interleaved_worker(specs: list[dict]) -> list[dict]:
    """Time several configurations in one process, one step of each in turn, round after round.

    On a shared machine the load of other jobs drifts over seconds to minutes; alternating single steps lets
    that drift fall on every configuration alike, so the ratios are fairer than those of separate processes
    run one after another. Refresh steps are timed the same way, after the ordinary ones.
    """
    if specs[0].get("threads"):
        torch.set_num_threads(specs[0]["threads"])
    for spec in specs:
        preload(spec["kind"])
    first = specs[0]
    ids = batch_ids(first)
    runs = []
    for spec in specs:
        model = build(spec)
        opt = make_optimizer(model, spec)
        runs.append(dict(spec=spec, opt=opt, gap=refresh_gap(spec), step=make_train_step(model, opt, spec, ids)))
    for run in runs:  # warm-up, and one untimed refresh with states present (first-time work)
        for _ in range(run["spec"]["warmup"]):
            run["step"]()
        if run["gap"] > 1:
            run["opt"].refresh_control.set_step(run["gap"] - 1)
            run["step"]()
    ordinary = {id(run): [] for run in runs}
    for _ in range(first["steps"]):
        for run in runs:
            ordinary[id(run)].append(timed(run["step"]))
    refresh = {id(run): [] for run in runs}
    for k in range(1, first["refresh_steps"] + 1):
        for run in runs:
            if run["gap"] > 1:
                run["opt"].refresh_control.set_step((k + 1) * run["gap"] - 1)  # the next step refreshes
                refresh[id(run)].append(timed(run["step"]))
    return [dict(name=run["spec"]["name"], spec=run["spec"], mode="time", interleaved=True, steps_s=ordinary[id(run)],
                 **step_times(ordinary[id(run)], refresh[id(run)], run["gap"])) for run in runs]


def worker(spec: dict) -> dict:
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    cuda = spec["device"] == "cuda"
    preload(spec["kind"])  # imports grow RSS: never inside the measured window
    model = build(spec)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = batch_ids(spec)
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = reset_peak_rss()
    opt = make_optimizer(model, spec)
    train_step = make_train_step(model, opt, spec, ids)
    timed_step = functools.partial(timed, train_step)

    result = dict(name=spec["name"], spec=spec, weights_mib=weights / 2**20,
                  lowrank_compile_file=sys.modules["lowrank_compile"].__file__,  # which tree this process imported
                  device_name=torch.cuda.get_device_name() if cuda else None)
    gap = refresh_gap(spec)
    if spec["mode"] in ("memory", "both"):
        for _ in range(spec["mem_steps"]):  # step 1 refreshes (every kind selects its basis on its first step)
            train_step()
        peak = (torch.cuda.max_memory_allocated() if cuda else peak_rss()) - base
        result["peak_above_weights_mib"] = peak / 2**20
        if cuda:
            result["peak_total_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["state_mib"] = state_bytes(opt) / 2**20 if hasattr(opt, "state") else 0.0
        if spec.get("profile"):
            result["breakdown_mib"] = profile_breakdown(train_step, spec["device"])
    if spec["mode"] in ("time", "both"):
        warm = [timed_step() for _ in range(spec["warmup"])]
        ordinary = [timed_step() for _ in range(spec["steps"])]
        result["first_steps_s"] = warm
        refresh = []
        if gap > 1:  # move the step counter so that each next step is a refresh (benchmark only)
            control = opt.refresh_control
            control.set_step(gap - 1)
            timed_step()  # one untimed refresh with states present: first-time work (compiling the remap)
            for k in range(1, spec["refresh_steps"] + 1):
                control.set_step((k + 1) * gap - 1)
                refresh.append(timed_step())
        result.update(step_times(ordinary, refresh, gap))
    return result


def profile_breakdown(step, device: str) -> dict[str, float]:
    """Peak of one step under torch.profiler's memory view, split by category (MiB), at the moment of peak."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX, MemoryProfileTimeline

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts, profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"  # the timeline compares full device names
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(device)
    if not sizes:
        return {}
    totals = [sum(s) for s in sizes]
    at_peak = sizes[totals.index(max(totals))]
    names = {i + 1: (c.name.lower() if c is not None else "unknown") for c, i in _CATEGORY_TO_INDEX.items()}
    out = {names[i]: at_peak[i] / 2**20 for i in names}
    out["total"] = max(totals) / 2**20
    return out


# -- driver ----------------------------------------------------------------------------------------------------
def run_spec(spec: dict) -> dict:
    return _run_worker("--_worker", spec, spec)


def run_interleaved(specs: list[dict]) -> list[dict]:
    r = _run_worker("--_worker_many", specs, specs[0])
    if isinstance(r, dict):  # the process failed: every configuration gets its error
        return [dict(name=spec["name"], spec=spec, error=r["error"]) for spec in specs]
    return r


def _run_worker(flag: str, payload, spec: dict):
    cmd = [sys.executable, str(Path(__file__).resolve()), flag, json.dumps(payload)]
    env = dict(os.environ)
    timeout = spec.get("timeout") or 3600
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:  # the worker is killed; the row says so and the other configurations go on
        return dict(name=spec["name"], spec=spec, error=f"timed out after {timeout} s")
    lines = [l for l in proc.stdout.splitlines() if l.startswith(("{", "["))]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return dict(name=spec["name"], spec=spec, error=" / ".join(tail))
    return json.loads(lines[-1])


def parse_bt(s: str) -> tuple[int, int]:
    b, t = s.lower().split("x")
    return int(b), int(t)


@functools.cache
def galore_adamw():
    """galore-torch's GaLoreAdamW. Its package __init__ also imports the 8-bit variant, hence bitsandbytes; where
    bitsandbytes is missing, load the AdamW module alone (it needs only torch and transformers)."""
    try:
        from galore_torch import GaLoreAdamW

        return GaLoreAdamW
    except ImportError:
        import importlib
        import importlib.util

        # the failed import can leave galore_torch's submodules (adafactor, adamw) behind: start clean
        for name in [m for m in sys.modules if m == "galore_torch" or m.startswith("galore_torch.")]:
            del sys.modules[name]
        found = importlib.util.find_spec("galore_torch")
        if found is None or not found.submodule_search_locations:
            raise
        # The package as a module made from its real spec, its __init__ (the 8-bit import) never run. A bare
        # types.ModuleType has __spec__ None, and transformers' is_galore_torch_available() then fails in
        # importlib.util.find_spec("galore_torch") with "ValueError: galore_torch.__spec__ is None".
        sys.modules["galore_torch"] = importlib.util.module_from_spec(found)
        return importlib.import_module("galore_torch.adamw").AdamW


def galore_available() -> bool:
    try:
        galore_adamw()
    except Exception:
        return False
    return True


def fmt_ratio(v, ref) -> str:
    return f"{v / ref:.2f}" if v is not None and ref else "-"


def tables(model: str, by_mode: dict[str, dict[str, dict]], args) -> str:
    """Markdown tables: by_mode = {"memory" | "time": {configuration name: result}}."""
    ref_name = "torch AdamW fused" if args.device == "cuda" else "torch AdamW foreach"
    mem, tim = by_mode.get("memory", {}), by_mode.get("time", {})
    hidden, inter, layers, heads, vocab = MODELS[model]
    out = [f"LLaMA {model}: hidden {hidden}, intermediate {inter}, {layers} layers, {heads} heads, vocab {vocab}; "
           f"{args.dtype} weights on {args.device}; rank {args.rank}; lm_head and embeddings on plain AdamW"
           f"{'; activation checkpointing' if args.checkpointing else ''}; torch {torch.__version__}\n"]
    if mem:
        ref = mem.get(ref_name, {}).get("peak_above_weights_mib")
        floor = mem.get("floor", {}).get("peak_above_weights_mib")
        b, s = args.batch
        what = "max_memory_allocated" if args.device == "cuda" else "peak RSS"
        cats = ("optimizer_state", "gradient", "activation", "temporary", "autograd_detail")
        floor_total = mem.get("floor", {}).get("peak_total_mib")
        ref_total = mem.get(ref_name, {}).get("peak_total_mib")
        out += [f"Memory at batch {b} x {s} ({what} above the weights, each configuration in its own process"
                f"{'; total = max_memory_allocated with the weights' if args.device == 'cuda' else ''}):\n",
                "| configuration | above weights (MiB) | x AdamW | x floor | total peak (MiB) | total x AdamW | total "
                "x floor | optimizer state (MiB) | profiler peak (MiB): " + " / ".join(cats) + " |",
                "|---|---|---|---|---|---|---|---|---|"]
        for name, r in mem.items():
            if "error" in r:
                out.append(f"| {name} | failed: {r['error'][:150]} | | | | | | | |")
                continue
            v = r["peak_above_weights_mib"]
            total = r.get("peak_total_mib")
            bd = r.get("breakdown_mib") or {}
            split = " / ".join(f"{bd.get(c, 0):.0f}" for c in cats) if bd else "-"
            prof = f"{bd['total']:.0f}: {split}" if bd else "-"
            out.append(f"| {name} | {v:.0f} | {fmt_ratio(v, ref)} | {fmt_ratio(v, floor)} | "
                       f"{f'{total:.0f}' if total else '-'} | {fmt_ratio(total, ref_total)} | "
                       f"{fmt_ratio(total, floor_total)} | {r['state_mib']:.0f} | {prof} |")
        out.append("")
    if tim:
        ref = tim.get(ref_name, {}).get("amortized_s")
        b, s = args.time_batch
        how = "; all configurations in one process, one step of each in turn" if args.interleave else ""
        out += [f"Step time at batch {b} x {s} (median; refresh steps timed separately{how}):\n",
                "| configuration | ordinary step (s) | refresh step (s) | per step over a refresh cycle (s) | "
                "x AdamW |", "|---|---|---|---|---|"]
        for name, r in tim.items():
            if "error" in r:
                out.append(f"| {name} | failed: {r['error'][:150]} | | | |")
                continue
            ref_s = r.get("refresh_s")
            out.append(f"| {name} | {r['ordinary_s']:.3f} | {f'{ref_s:.3f}' if ref_s else '-'} | "
                       f"{r['amortized_s']:.3f} | {fmt_ratio(r['amortized_s'], ref)} |")
    return "\n".join(out)


def plot(path: Path, model: str, rows: dict[str, dict], args) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart", file=sys.stderr)
        return
    mem = {k: r["peak_above_weights_mib"] for k, r in rows.get("memory", {}).items() if "error" not in r}
    tim = {k: r["amortized_s"] for k, r in rows.get("time", {}).items() if "error" not in r}
    panels = [(d, lbl) for d, lbl in ((mem, f"memory above weights (MiB), batch {args.batch[0]}x{args.batch[1]}"),
                                      (tim, f"s / step over a refresh cycle, batch {args.time_batch[0]}x"
                                            f"{args.time_batch[1]}")) if d]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 0.35 * max(map(len, (p[0] for p in panels)))
                                                      + 1.5), squeeze=False)
    for ax, (d, label) in zip(axes[0], panels):
        names = list(d)
        colors = ["0.5" if n == "floor" else "C1" if n.startswith("lowrank") else "C0" for n in names]
        ax.barh(range(len(names)), list(d.values()), color=colors)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(label, fontsize=9)
        for i, v in enumerate(d.values()):
            ax.annotate(f"{v:.0f}" if v >= 10 else f"{v:.2f}", (v, i), va="center", fontsize=7)
    fig.suptitle(f"LLaMA {model}, {args.device}, {args.dtype}, torch {torch.__version__}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(args) -> None:
    by_mode: dict[str, dict[str, dict]] = {}
    for path in args.render:
        payload = json.loads(Path(path).read_text())
        saved = payload["args"]
        for key in ("device", "dtype", "rank", "checkpointing"):
            setattr(args, key, saved[key])
        for r in payload["rows"]:
            by_mode.setdefault(r["mode"], {})[r["name"]] = r
            if r["mode"] == "memory":
                args.batch = tuple(saved["batch"])
            else:
                args.time_batch = tuple(saved["time_batch"])
    model = next(iter(next(iter(by_mode.values())).values()))["spec"]["model"]
    order = {name: i for i, name in enumerate(CONFIGS)}
    by_mode = {m: dict(sorted(d.items(), key=lambda kv: order.get(kv[0], 99))) for m, d in by_mode.items()}
    text = tables(model, by_mode, args)
    print(text)
    stem = Path(args.out) / f"bench_{args.device}_{model}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(text + "\n")
    rows = [r for d in by_mode.values() for r in d.values()]
    stem.with_suffix(".json").write_text(json.dumps(dict(merged_from=args.render, torch=torch.__version__,
                                                         rows=rows), indent=1))
    plot(stem.with_suffix(".png"), model, by_mode, args)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--models", nargs="*", default=["ref78m"], help=f"any of {', '.join(MODELS)}")
    ap.add_argument("--modes", nargs="*", default=["memory", "time"], choices=("memory", "time"))
    ap.add_argument("--configs", nargs="*", help="configuration names (default: all; compiled ones need --compile)")
    ap.add_argument("--compile", action="store_true", help="add the torch.compile'd configurations")
    ap.add_argument("--batch", type=parse_bt, default=(2, 128), help="batch x seq for memory (default 2x128)")
    ap.add_argument("--time-batch", type=parse_bt, default=(4, 256), help="batch x seq for time (default 4x256)")
    ap.add_argument("--dtype", default=None, choices=("fp32", "bf16"), help="weights (default fp32 CPU, bf16 CUDA)")
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing (transformers)")
    ap.add_argument("--mem-steps", type=int, default=3, help="steps of the memory run")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed ordinary steps")
    ap.add_argument("--refresh-steps", type=int, default=2, help="timed refresh steps (update_gap > 1)")
    ap.add_argument("--rounds", type=int, default=1, help="time: run every configuration this many times, "
                    "interleaved, and keep each one's fastest round (the least disturbed on a shared machine)")
    ap.add_argument("--no-profile", action="store_true", help="skip the torch.profiler breakdown")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--timeout", type=int, default=3600, help="seconds one configuration's process may run before "
                    "it is killed and recorded as failed")
    ap.add_argument("--out", default=str(HERE.parent / "docs" / "bench"))
    ap.add_argument("--render", nargs="*", help="run nothing: merge these JSON outputs of earlier runs (one "
                    "model; later files win) and write the tables and chart")
    ap.add_argument("--interleave", action="store_true", help="time: all configurations in one process, one "
                    "step of each in turn (--steps rounds), so a shared machine's drifting load hits all alike")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    ap.add_argument("--_worker_many", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._worker:
        print(json.dumps(worker(json.loads(args._worker))), flush=True)
        return
    if args._worker_many:
        print(json.dumps(interleaved_worker(json.loads(args._worker_many))), flush=True)
        return
    if args.render:
        render(args)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    names = args.configs or [n for n in CONFIGS if args.compile or n not in COMPILED]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configurations {unknown}; choose from {list(CONFIGS)}")
    if not galore_available() and "GaLore r, gap 200" in names:
        print("galore-torch is not installed (pip install galore-torch bitsandbytes): skipping GaLore", file=sys.stderr)
        names.remove("GaLore r, gap 200")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for model in args.models:
        rows = {}
        tries: dict[str, list[dict]] = {}
        # On CUDA, with one batch for both, one process per configuration measures memory, then time (the
        # peak is read before the timed steps): half the model builds.
        together = args.device == "cuda" and set(args.modes) == {"memory", "time"} and args.batch == args.time_batch
        for mode in (["both"] if together else args.modes):
            b, s = args.batch if mode != "time" else args.time_batch
            rounds = args.rounds if mode != "memory" else 1
            for rnd in range(rounds):  # time: configurations interleaved, round after round
                specs = [dict(CONFIGS[name], name=name, model=model, mode=mode, device=args.device,
                              dtype=args.dtype, batch=b, seq=s, rank=args.rank, checkpointing=args.checkpointing,
                              threads=args.threads, steps=args.steps, mem_steps=args.mem_steps,
                              warmup=args.warmup, refresh_steps=args.refresh_steps, timeout=args.timeout,
                              profile=not args.no_profile and rnd == 0) for name in names]
                t = time.perf_counter()
                many = run_interleaved(specs) if args.interleave and mode == "time" else None
                for i, (name, spec) in enumerate(zip(names, specs)):
                    r = many[i] if many is not None else run_spec(spec)
                    with open(out / f"bench_{args.device}_{model}.partial.jsonl", "a") as f:  # survives a kill
                        f.write(json.dumps(r) + "\n")
                    for m in (["memory", "time"] if mode == "both" else [mode]):
                        if m == "memory" and rnd > 0:
                            continue
                        rm = dict(r, mode=m)
                        brief = rm.get("error") or (f"{rm['peak_above_weights_mib']:.0f} MiB" if m == "memory"
                                                    else f"{rm['amortized_s']:.3f} s/step")
                        print(f"  {model} {m:6s} round {rnd + 1} {name}: {brief} ({time.perf_counter() - t:.0f} s)",
                              file=sys.stderr, flush=True)
                        tries.setdefault(f"{name}|{m}", []).append(rm)
        for key, results in tries.items():
            ok = [r for r in results if "error" not in r]
            if not ok:
                rows[key] = results[-1]
                continue
            best = min(ok, key=lambda r: r.get("amortized_s", 0.0) if r["mode"] == "time" else 0.0)
            if best["mode"] == "time":
                best["rounds_s"] = [r["amortized_s"] for r in ok]
            rows[key] = best
        by_mode: dict[str, dict[str, dict]] = {}
        for r in rows.values():
            by_mode.setdefault(r["mode"], {})[r["name"]] = r
        text = tables(model, by_mode, args)
        print("\n" + text)
        stem = out / f"bench_{args.device}_{model}"
        stem.with_suffix(".md").write_text(text + "\n")
        payload = dict(args={k: v for k, v in vars(args).items() if not k.startswith("_")}, torch=torch.__version__,
                       threads=args.threads or torch.get_num_threads(), rows=list(rows.values()))
        stem.with_suffix(".json").write_text(json.dumps(payload, indent=1))
        plot(stem.with_suffix(".png"), model, by_mode, args)

if __name__ == "__main__":
    main()
