"""Train a LLaMA-7B without ever holding it: peak memory of real steps with int8 (or bf16) base weights (issue 20).

    python tools/llama7b_memory.py --layers 2                      # a quick check: 2 of the 32 blocks
    python tools/llama7b_memory.py --out docs/bench/int8_weights/cpu_7B_int8.json   # the full 7B, CPU, int8
    python tools/llama7b_memory.py --device cuda --batch 1x512 --weight-dtype bf16 --out cuda_7B_bf16.json
    python tools/llama7b_memory.py --render docs/bench/int8_weights/*.json --md docs/bench/int8_weights/llama7b_memory.md

What it does, in one process:
 1. Imports torch, transformers, lowrank_compile (and torch's inductor and torchao.optim, which the quantised-
    state updates compile with) and records the process's RSS: the runtime.
 2. Builds a transformers LlamaForCausalLM in LLaMA-7B's shape (hidden 4096, intermediate 11008, 32 layers,
    32 heads, vocab 32000, untied lm_head; --layers N keeps N blocks, --tiny a small shape for smoke tests) on
    the meta device, in bf16, with activation checkpointing (gradient_checkpointing_enable, non-reentrant).
 3. Wraps it: lowrank_compile.wrap_model(rank --rank (128), the library's default update_gap unless
    --update-gap, state_dtype --state-dtype (int4), fused=True, every nn.Linear projected including lm_head
    (as tools/bench.py's "lm_head projected" configurations), weight_dtype="int8" with --weight-dtype int8).
 4. Materialises every layer directly in its training storage: lowrank_compile.load_weights(model,
    RandomInit(...), device=...) where RandomInit is a Mapping[str, Tensor] that makes each tensor on access
    (normal(0, 0.02) for matrices, ones for norms, bf16), so the process holds at most one tensor at full
    precision beside the model's own storage. Where the library has no load_weights yet (or --loader fallback)
    the tool does the same itself for bf16 weights (Module.to_empty per module, then a copy per tensor).
    Non-persistent buffers that no state dict holds (the rotary inv_freq) are made by rebuilding the rotary
    module on the device; the wrapped layers' index buffers (before the first refresh) are reset to 0..r-1.
 5. Runs --steps real training steps (forward, backward with the updates inside it, opt.step, zero_grad) on a
    fixed random batch (--batch, 1x128 on CPU, 1x512 on CUDA), each one's peak measured on its own: CPU the
    process's peak RSS (VmHWM, reset before the step), CUDA torch.cuda.max_memory_allocated (reset before the
    step). Whether a step refreshes comes from the optimizer's refresh_control (step 1 always does; with
    update_gap 1, the library's default, every step does). Then, unless --no-profile, one more step runs
    under torch.profiler's memory events: the bytes its forward leaves alive for backward (activations) and
    the peak above that in forward, backward and the update (transients: max(forward's peak, activations +
    backward's peak above them) - activations).
 6. Breakdown of the peak step: runtime + weights (int8 codes, their scales, bf16 rest, buffers) + optimizer
    states (lowrank_compile.measure.state_bytes) + basis tables (the shared fp32 DCT matrices) + activations
    + transients (from the profiled step) + other (what peak RSS holds beyond those: allocator slack, code and
    caches of torch.compile, ...). On CUDA the same split of max_memory_allocated (no runtime, no other).

Targets (issue 20): CPU, int8 weights, batch 1 x 128: peak RSS <= 10.5 GiB; CUDA, int8 weights, batch
1 x 512: max_memory_allocated <= 10 GiB. A full 7B step takes minutes on a 2-core CPU (--threads, default 2).
Never run the bf16 and int8 7B measurements at the same time on a 24 GiB machine.

Writes --out (JSON) and the same stem .md; --render merges several JSON outputs into one table (--md).
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # threads before torch is imported (OpenMP reads the variable once)
    _t = next((sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a == "--threads"), None)
    _t = _t or next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--threads=")), None)
    os.environ.setdefault("OMP_NUM_THREADS", _t or "2")

import argparse
import collections.abc
import json
import platform
import statistics
import time
import zlib
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# name -> (hidden, intermediate, layers, heads, vocab)
SHAPES = {"7B": (4096, 11008, 32, 32, 32000), "tiny": (256, 688, 2, 4, 1000)}
GIB = 2**30
MIB = 2**20
TARGETS = {"cpu": dict(weight_dtype="int8", batch=(1, 128), limit_gib=10.5, what="peak RSS"),
           "cuda": dict(weight_dtype="int8", batch=(1, 512), limit_gib=10.0, what="max_memory_allocated")}


def malloc_info() -> dict | None:
    """glibc's heap accounting (mallinfo2), MiB: arena (heap bytes from sbrk), free (free bytes kept inside the
    heap arenas: memory the process freed but still holds, part of RSS where touched), mmapped (live mmap'd
    blocks). None where glibc is not the allocator."""
    try:
        import ctypes

        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]

        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        m = libc.mallinfo2()
        return dict(arena_mib=m.arena / MIB, free_in_heap_mib=m.fordblks / MIB, mmapped_mib=m.hblkhd / MIB)
    except Exception:
        return None


def set_malloc(mode: str) -> None:
    """glibc heap policy. "default": as is. "mmap": mallopt(M_MMAP_THRESHOLD, 1 MiB), which also stops glibc from
    raising the threshold as large blocks are freed, so every block of 1 MiB or more is its own mapping and goes
    back to the OS when freed (same as the environment variable MALLOC_MMAP_THRESHOLD_=1048576). "trim": call
    malloc_trim(0) after loading and after each step. Measured (4 of 7B's blocks, int8 weights, loaded):
    default leaves ~75 MiB per block freed-but-resident in the heap (load-time temporaries between the kept int8
    codes), "mmap" or "trim" none."""
    if mode == "mmap":
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def trim_heap(mode: str) -> None:
    if mode == "trim":
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def current_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


# -- the model ---------------------------------------------------------------------------------------------------
def llama_config(shape: str, layers: int | None, seq: int):
    from transformers import LlamaConfig

    hidden, inter, n_layers, heads, vocab = SHAPES[shape]
    return LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers or n_layers,
                       num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                       max_position_embeddings=max(2048, seq), tie_word_embeddings=False, use_cache=False)


def build_meta(config):
    """LlamaForCausalLM on the meta device, bf16, with activation checkpointing: no storage at all."""
    from transformers import LlamaForCausalLM

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


class RandomInit(collections.abc.Mapping):
    """A state dict that does not exist: each tensor is made when it is read (and forgotten by this object).

    keys and shapes: those of the model's state_dict (taken from the meta model). Matrices normal(0, std),
    1-D weights (norms) ones, all in `dtype` on `device`, each from its own generator seeded by the key, so a
    key reads the same tensor every time and in any order.
    """

    def __init__(self, shapes: dict[str, tuple[torch.Size, torch.dtype]], device="cpu", dtype=torch.bfloat16,
                 std: float = 0.02, seed: int = 0):
        self.shapes, self.device, self.dtype, self.std, self.seed = dict(shapes), torch.device(device), dtype, std, seed
        self.reads = 0
        self.largest_read = 0

    def __getitem__(self, key: str) -> torch.Tensor:
        shape, dtype = self.shapes[key]
        dtype = self.dtype if dtype.is_floating_point else dtype
        self.reads += 1
        if len(shape) < 2:
            t = torch.ones(shape, dtype=dtype, device=self.device)
        else:
            gen = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + zlib.crc32(key.encode()))
            t = torch.randn(shape, dtype=dtype, device=self.device, generator=gen).mul_(self.std)
        self.largest_read = max(self.largest_read, t.numel() * t.element_size())
        return t

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def state_shapes(model) -> dict[str, tuple[torch.Size, torch.dtype]]:
    return {k: (v.shape, v.dtype) for k, v in model.state_dict(keep_vars=True).items()}


def rebuild_rotary(model, config, device) -> None:
    """The rotary embedding's inv_freq buffers are non-persistent (in no state dict): build the module anew."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    with torch.device(device):
        model.model.rotary_emb = LlamaRotaryEmbedding(config)


@torch.no_grad()
def fallback_materialize(model, source, device) -> None:
    """What load_weights does, for bf16 weights of a model not yet wrapped, where the library has none: module by
    module, storage on `device` (Module.to_empty, without recursing), then each tensor read from `source` and
    copied in. (Parameters made on the meta device cannot take new storage in place, `p.data = t` fails there,
    so Module.to_empty makes new Parameter objects: an optimizer or hooks made before would keep the old ones.
    Hence: materialise, then wrap.)"""
    for prefix, module in model.named_modules():
        own = list(module._parameters.values()) + list(module._buffers.values())
        if not any(t is not None and t.is_meta for t in own):
            continue
        module.to_empty(device=device, recurse=False)
        pre = prefix + "." if prefix else ""
        for name, p in module.named_parameters(recurse=False):
            if pre + name in source:
                p.copy_(source[pre + name])
        for name, b in module.named_buffers(recurse=False):
            if pre + name in source:
                b.copy_(source[pre + name])


def has_api(name: str) -> bool:
    import lowrank_compile as lrc

    return hasattr(lrc, name)


def loader_of(args) -> str:
    if args.loader != "auto":
        return args.loader
    return "api" if has_api("load_weights") else "fallback"


def materialize(model, config, device, args) -> dict:
    """Give every parameter and buffer of the meta model its storage on `device`; returns how. "api": the model is
    already wrapped and lowrank_compile.load_weights fills it; "fallback": the model is not wrapped yet (bf16)."""
    import lowrank_compile as lrc

    source = RandomInit(args._shapes, device=args.init_device or device)
    t = time.perf_counter()
    loader = loader_of(args)
    rebuild_rotary(model, config, device)  # in no state dict: made here, before load_weights (strict) is called
    if loader == "api":
        lrc.load_weights(model, source, device=device, strict=True)
    else:
        if args.weight_dtype == "int8":
            raise SystemExit("--weight-dtype int8 needs lowrank_compile.load_weights (the fallback loader "
                             "materialises bf16 weights only)")
        fallback_materialize(model, source, device)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"still on the meta device after loading: {left[:8]}{' ...' if len(left) > 8 else ''}")
    return dict(loader=loader, seconds=time.perf_counter() - t, reads=source.reads,
                largest_read_mib=source.largest_read / MIB)


# -- what is stored ------------------------------------------------------------------------------------------------
def inner_tensors(t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(name, plain tensor) parts of t: itself, or a tensor subclass's flattened inner tensors (recursively)."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None or type(t) in (torch.Tensor, torch.nn.Parameter):
        return [("", t)]
    out = []
    for name in flatten()[0]:
        out += [(f"{name}.{n}" if n else name, x) for n, x in inner_tensors(getattr(t, name))]
    return out


def weight_breakdown(model) -> dict:
    """Bytes of parameters and buffers by how they are stored: int8 codes, their scales (and other inner tensors
    of a quantised weight), bf16 / fp32 plain tensors, buffers. Distinct storages counted once; stride-0 views
    (the carriers) by their real storage."""
    seen: dict[int, int] = {}
    cats: dict[str, int] = collections.Counter()
    quant_layers = 0

    def add(cat: str, x: torch.Tensor) -> None:
        st = x.untyped_storage()
        if st.data_ptr() in seen or st.nbytes() == 0:
            return
        seen[st.data_ptr()] = st.nbytes()
        cats[cat] += st.nbytes()

    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            parts = inner_tensors(p)
            if len(parts) > 1 or p.dtype == torch.int8 or parts[0][1].dtype == torch.int8:
                quant_layers += 1
                for n, x in parts:
                    add("int8 codes" if x.dtype == torch.int8 else f"int8 scales etc. ({x.dtype})".replace("torch.", ""),
                        x)
            else:
                kind = "lowrank carriers (stride 0)" if pname == "lowrank_grad" else f"{str(p.dtype)[6:]} parameters"
                add(kind, p)
        for bname, b in module.named_buffers(recurse=False):
            parts = inner_tensors(b)
            if b.dtype == torch.int8 or len(parts) > 1:  # a library that keeps codes / scales as buffers
                quant_layers += 1
                for n, x in parts:
                    add("int8 codes" if x.dtype == torch.int8 else f"int8 scales etc. ({x.dtype})".replace("torch.", ""),
                        x)
            elif bname == "weight_scale":  # lowrank_compile's int8 weights: the codes' block scales
                add(f"int8 scales ({str(b.dtype)[6:]})", b)
            else:
                add("buffers", b)
    return dict(by_kind_mib={k: v / MIB for k, v in sorted(cats.items())}, total_bytes=sum(cats.values()),
                quantised_tensors=quant_layers)


def basis_bytes(model) -> int:
    """The shared fp32 basis tables (D) the wrapped layers use, once each."""
    from lowrank_compile.basis import basis_matrix
    from lowrank_compile.projection import LowRankLinear, basis_dtype

    tables = {}
    for m in model.modules():
        if isinstance(m, LowRankLinear) and m.lowrank_spec.basis != "svd":
            D = basis_matrix(m.lowrank_spec.basis, m.basis_size, basis_dtype(torch.bfloat16), m.weight.device)
            tables[D.untyped_storage().data_ptr()] = D.untyped_storage().nbytes()
    return sum(tables.values())


def profiled_step(step_fn_parts, device: str) -> dict:
    """One step under torch.profiler's memory events: bytes its forward leaves alive (activations, the loss and
    whatever autograd keeps), and the peak above that in backward + update (transients)."""
    from torch.profiler import ProfilerActivity, profile

    forward, backward_and_step = step_fn_parts
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])

    def trace(fn):
        with profile(activities=acts, profile_memory=True) as prof:
            out = fn()
        events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
                         and (device != "cuda" or e.device_type() == torch.autograd.DeviceType.CUDA)),
                        key=lambda e: e.start_ns())
        live = peak = 0
        for e in events:
            live += e.nbytes()
            peak = max(peak, live)
        return out, live, peak, len(events)

    loss, fwd_net, fwd_peak, n1 = trace(forward)
    _, bwd_net, bwd_peak, n2 = trace(lambda: backward_and_step(loss))
    del loss
    return dict(activations_bytes=fwd_net, forward_peak_bytes=fwd_peak, backward_peak_above_activations_bytes=bwd_peak,
                backward_net_bytes=bwd_net, memory_events=n1 + n2)


# -- the run -------------------------------------------------------------------------------------------------------
def run(args) -> dict:
    torch.set_num_threads(args.threads)
    if not args.device == "cuda":
        set_malloc(args.malloc)
    cuda = args.device == "cuda"
    import transformers  # noqa: F401

    import lowrank_compile as lrc
    import importlib

    importlib.import_module("torch._inductor.compile_fx")  # the quantised-state updates compile: import it first
    importlib.import_module("torchao.optim")
    from lowrank_compile.measure import peak_rss, reset_peak_rss, state_bytes

    runtime = current_rss()
    b, s = args.batch
    config = llama_config(args.shape, args.layers, s)
    t0 = time.perf_counter()
    model = build_meta(config)
    args._shapes = state_shapes(model)
    n_params = sum(p.numel() for p in model.parameters())
    wrap_kwargs = dict(rank=args.rank, lr=args.lr, state_dtype=args.state_dtype, fused=args.fused)
    if args.update_gap:
        wrap_kwargs["update_gap"] = args.update_gap
    if args.weight_dtype == "int8":
        wrap_kwargs["weight_dtype"] = "int8"
    loader = loader_of(args)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
    if loader == "api":  # wrap on the meta device, then load into the training storage
        opt = lrc.wrap_model(model, **wrap_kwargs)  # filter_fn None: every nn.Linear, lm_head included
        how = materialize(model, config, args.device, args)
    else:  # bf16 without the library's loader: materialise, then wrap
        how = materialize(model, config, args.device, args)
        opt = lrc.wrap_model(model, **wrap_kwargs)
    projected = sorted(n for n, m in model.named_modules() if isinstance(m, lrc.LowRankLinear))
    if cuda:
        torch.cuda.synchronize()
        load_peak = torch.cuda.max_memory_allocated()
        after_load = torch.cuda.memory_allocated()
    else:
        load_peak = peak_rss()
        after_load = current_rss()
    trim_heap(args.malloc)
    weights = weight_breakdown(model)
    heap_after_load = malloc_info()
    build_s = time.perf_counter() - t0
    print(f"built and loaded in {build_s:.0f} s ({how['loader']}): weights {weights['total_bytes'] / GIB:.2f} GiB, "
          f"{'allocated' if cuda else 'RSS'} {after_load / GIB:.2f} GiB (load peak {load_peak / GIB:.2f} GiB)",
          file=sys.stderr, flush=True)

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (b, s), generator=gen).to(args.device)
    control = opt.refresh_control

    def forward():
        return model(input_ids=ids, labels=ids).loss

    def backward_and_step(loss):
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    steps = []
    for i in range(1, args.steps + 1):
        refresh = control.refresh
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
        else:
            start = reset_peak_rss()
        t = time.perf_counter()
        loss = forward()
        value = loss.item()
        backward_and_step(loss)
        del loss
        dt = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated() if cuda else peak_rss()
        trim_heap(args.malloc)
        end = torch.cuda.memory_allocated() if cuda else current_rss()
        steps.append(dict(step=i, refresh=refresh, loss=value, seconds=dt, peak_bytes=peak, start_bytes=start,
                          end_bytes=end, heap_after=malloc_info()))
        if args.out:  # a long run killed later still leaves its finished steps
            Path(args.out).with_suffix(".partial.json").write_text(json.dumps(dict(
                argv=sys.argv[1:], runtime_bytes=runtime, after_load_bytes=after_load, load_peak_bytes=load_peak,
                weights=weights, heap_after_load=heap_after_load, steps=steps), indent=1))
        if i == 1 and not opt.state:  # a measurement without the updates would look good and mean nothing
            raise RuntimeError("no optimizer state after a training step: the updates did not run (fused=True after "
                               "load_weights into a meta model loses the in-backward hooks in some library versions; "
                               "try --no-fused, or --loader fallback for bf16 weights)")
        print(f"step {i} ({'refresh' if refresh else 'ordinary'}): {dt:.1f} s, loss {value:.4f}, peak "
              f"{peak / GIB:.3f} GiB", file=sys.stderr, flush=True)
    states = state_bytes(opt)
    tables = basis_bytes(model)
    prof = None
    if args.profile:
        refresh = control.refresh
        prof = profiled_step((forward, backward_and_step), args.device)
        prof["refresh"] = refresh
        print(f"profiled step ({'refresh' if refresh else 'ordinary'}): activations "
              f"{prof['activations_bytes'] / MIB:.0f} MiB, transients {prof['backward_peak_above_activations_bytes'] / MIB:.0f} MiB",
              file=sys.stderr, flush=True)

    peak_step = max(steps, key=lambda r: r["peak_bytes"])
    peak = peak_step["peak_bytes"]
    breakdown = {"runtime": 0 if cuda else runtime, "weights": weights["total_bytes"], "optimizer states": states,
                 "basis tables": tables}
    if prof:
        breakdown["activations"] = prof["activations_bytes"]
        # the larger of forward's own peak and backward's above what forward left: the step's dynamic peak
        breakdown["transients"] = max(prof["forward_peak_bytes"], prof["activations_bytes"]
                                      + prof["backward_peak_above_activations_bytes"]) - prof["activations_bytes"]
    breakdown["other"] = peak - sum(breakdown.values())
    target = TARGETS[args.device]
    meets = None
    if (args.weight_dtype, tuple(args.batch), args.shape, args.layers) == (target["weight_dtype"], target["batch"],
                                                                            "7B", None):
        meets = peak <= target["limit_gib"] * GIB
    ordinary = [r["seconds"] for r in steps[1:] if not r["refresh"]]
    refreshes = [r["seconds"] for r in steps[1:] if r["refresh"]]
    return dict(
        tool="tools/llama7b_memory.py", argv=sys.argv[1:], date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        device=args.device, device_name=torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
        threads=torch.get_num_threads(), lowrank_compile_file=lrc.__file__,
        shape=args.shape, hidden=config.hidden_size, intermediate=config.intermediate_size,
        layers=config.num_hidden_layers, heads=config.num_attention_heads, vocab=config.vocab_size, params=n_params,
        weight_dtype=args.weight_dtype, state_dtype=args.state_dtype, rank=args.rank, malloc=args.malloc,
        update_gap=opt.config.update_gap, fused=args.fused, lm_head_projected="lm_head" in projected,
        projected_layers=len(projected), checkpointing=True, batch=list(args.batch), materialize=how,
        measure="torch.cuda.max_memory_allocated" if cuda else "peak RSS (VmHWM)",
        runtime_bytes=runtime, after_load_bytes=after_load, load_peak_bytes=load_peak, weights=weights,
        heap_after_load=heap_after_load,
        state_bytes=states, basis_table_bytes=tables, steps=steps, profiled_step=prof,
        peak_bytes=peak, peak_gib=peak / GIB, peak_step=peak_step["step"],
        breakdown_mib={k: v / MIB for k, v in breakdown.items()},
        step_s=dict(first=steps[0]["seconds"], ordinary_median=statistics.median(ordinary) if ordinary else None,
                    refresh_median=statistics.median(refreshes) if refreshes else None),
        target=dict(target, met=meets) if meets is not None else None)


# -- tables --------------------------------------------------------------------------------------------------------
def table(results: list[dict]) -> str:
    cols = ["runtime", "weights", "optimizer states", "basis tables", "activations", "transients", "other"]
    lines = ["| device | model | weights | states | rank | gap | batch | peak (GiB) | " + " | ".join(
        f"{c} (MiB)" for c in cols) + " | step 1 (s) | later steps (s) | target |",
             "|" + "---|" * (12 + len(cols))]
    for r in results:
        bd = r["breakdown_mib"]
        later = [f"{x['seconds']:.1f}{'' if x['refresh'] else ' (ord.)'}" for x in r["steps"][1:]]
        tgt = r.get("target")
        tgt_s = "-" if not tgt else (f"<= {tgt['limit_gib']} GiB: **{'met' if tgt['met'] else 'missed'}**")
        model = f"{r['shape']}" + (f" ({r['layers']} layers)" if r["layers"] != SHAPES[r["shape"]][2] else "")
        model += "" if r.get("fused", True) else ", not fused"
        model += "" if r.get("malloc", "default") == "default" else f", malloc {r['malloc']}"
        lines.append(f"| {r['device']} | {model} | {r['weight_dtype']} | {r['state_dtype']} | {r['rank']} | "
                     f"{r['update_gap']} | {r['batch'][0]}x{r['batch'][1]} | **{r['peak_gib']:.2f}** | " +
                     " | ".join(f"{bd[c]:.0f}" if c in bd else "-" for c in cols) +
                     f" | {r['steps'][0]['seconds']:.1f} | {', '.join(later) or '-'} | {tgt_s} |")
    return "\n".join(lines)


def describe(results: list[dict]) -> str:
    out = []
    for r in results:
        w = ", ".join(f"{k} {v:.0f}" for k, v in r["weights"]["by_kind_mib"].items())
        out.append(f"- {r['device']} {r['shape']} {r['weight_dtype']} weights ({r['measure']}; {r['device_name']}, "
                   f"torch {r['torch']}, {r['threads']} threads; loaded by {r['materialize']['loader']} in "
                   f"{r['materialize']['seconds']:.0f} s): weights MiB: {w}; load peak "
                   f"{r['load_peak_bytes'] / GIB:.2f} GiB; peak at step {r['peak_step']}; steps "
                   + ", ".join(f"{x['step']} {'refresh' if x['refresh'] else 'ordinary'} {x['peak_bytes'] / GIB:.2f} GiB "
                               f"{x['seconds']:.1f} s" for x in r["steps"]) + f"; `python tools/llama7b_memory.py "
                   + " ".join(r["argv"]) + "`")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--weight-dtype", default="int8", choices=("int8", "bf16"))
    ap.add_argument("--state-dtype", default="int4", choices=("int4", "int8", "fp32"),
                    help="int4 (default) or int8; fp32 only for smoke tests (no compiled state update)")
    ap.add_argument("--rank", type=int, default=0, help="default 128 on CPU, 512 on CUDA")
    ap.add_argument("--update-gap", type=int, default=0, help="default: the library's")
    ap.add_argument("--batch", default=None, help="batch x seq (default 1x128 on CPU, 1x512 on CUDA)")
    ap.add_argument("--layers", type=int, default=None, help="keep N of the 32 blocks (for quick checks)")
    ap.add_argument("--tiny", action="store_true", help="hidden 256, 2 layers, vocab 1000: a smoke test")
    ap.add_argument("--steps", type=int, default=2, help="measured steps (the first refreshes)")
    ap.add_argument("--no-profile", dest="profile", action="store_false",
                    help="skip the extra profiled step (activations / transients split)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--no-fused", dest="fused", action="store_false",
                    help="updates in opt.step() instead of inside backward (gradients then persist until the step)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--loader", default="auto", choices=("auto", "api", "fallback"),
                    help="api: lowrank_compile.load_weights; fallback: this tool's (bf16 only); auto: api if present")
    ap.add_argument("--malloc", default="default", choices=("default", "mmap", "trim"),
                    help="CPU: glibc heap policy (see set_malloc): mmap = 1 MiB mmap threshold, trim = malloc_trim "
                         "after loading and after each step")
    ap.add_argument("--init-device", default=None, help="where RandomInit makes tensors (default: --device)")
    ap.add_argument("--out", default=None, help="JSON path (an .md with the same stem is written beside it)")
    ap.add_argument("--render", nargs="*", help="run nothing: merge these JSON outputs into one table (--md)")
    ap.add_argument("--md", default=None, help="with --render: where the table goes (default: print only)")
    args = ap.parse_args(argv)
    if args.render:
        results = [json.loads(Path(p).read_text()) for p in args.render]
        text = table(results) + "\n\n" + describe(results) + "\n"
        print(text)
        if args.md:
            Path(args.md).write_text(text)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    args.shape = "tiny" if args.tiny else "7B"
    args.rank = args.rank or (32 if args.tiny else 128 if args.device == "cpu" else 512)
    args.batch = tuple(int(v) for v in (args.batch or ("1x128" if args.device == "cpu" else "1x512")).lower().split("x"))
    result = run(args)
    bd = result["breakdown_mib"]
    print(json.dumps(dict(peak_gib=round(result["peak_gib"], 3), breakdown_mib={k: round(v) for k, v in bd.items()},
                          target=result["target"])))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        out.with_suffix(".md").write_text(table([result]) + "\n\n" + describe([result]) + "\n")
        out.with_suffix(".partial.json").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
