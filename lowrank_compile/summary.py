"""``summary(opt)``: what wrap_model projected and at what cost, on one screen.

Like PEFT's ``print_trainable_parameters()``: which layers were projected and at which rank, the bytes of Adam's
states against torch AdamW's, which parameters got plain AdamW and why, and the parameter count with and
without the ``lowrank_grad`` carriers. wrap_model logs it at INFO and prints it with ``verbose=True``.

Example::

    opt = lowrank_compile.wrap_model(model, rank=64)
    print(lowrank_compile.summary(opt))
"""
from __future__ import annotations

import collections
import dataclasses
import fnmatch
import weakref

import torch
from torch import nn

from . import quant
from .config import resolve_rank
from .projection import CARRIER, LowRankLinear

__all__ = ["summary", "compiles_updates"]

# what wrap_model saw of the model, per optimizer (the optimizer keeps no reference to its model)
_SEEN: "weakref.WeakKeyDictionary[torch.optim.Optimizer, _Model]" = weakref.WeakKeyDictionary()


@dataclasses.dataclass(frozen=True)
class _Model:
    name: str
    own_params: int  # the model's parameters, carriers excluded
    carrier_params: int  # elements of the lowrank_grad carriers (stride-0 in one process)
    carriers_dense: bool
    frozen_params: int
    reasons: dict  # id(parameter) -> why it gets plain AdamW


def record(opt, model: nn.Module) -> None:
    """Note what summary(opt) needs from the model; called by wrap_model once the optimizer exists."""
    carriers = [m.lowrank_grad for m in model.modules() if isinstance(m, LowRankLinear)]
    carrier_ids = {id(c) for c in carriers}
    excluded = carrier_ids | {id(w) for w in opt.layers}  # projected weights: requires_grad=False while wrapped
    params = list(model.parameters())
    _SEEN[opt] = _Model(
        name=type(model).__name__,
        own_params=sum(p.numel() for p in params if id(p) not in carrier_ids),
        carrier_params=sum(c.numel() for c in carriers),
        carriers_dense=any(0 not in c.stride() for c in carriers if c.numel() > 1),
        frozen_params=sum(p.numel() for p in params if not p.requires_grad and id(p) not in excluded),
        reasons=_plain_reasons(model, opt),
    )


def _plain_reasons(model: nn.Module, opt) -> dict[int, str]:
    """Why each parameter that is not projected got plain AdamW, by id."""
    owners = collections.Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    read_directly = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    config = opt.config
    reasons: dict[int, str] = {}
    for fqn, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in reasons or name == CARRIER or not p.requires_grad:
                continue
            if p.ndim < 2:
                reasons[id(p)] = "vectors (biases, norms)"
            elif isinstance(module, nn.Embedding):
                reasons[id(p)] = "embeddings (not nn.Linear)"
            elif name != "weight" or not _is_linear(module):
                reasons[id(p)] = "not an nn.Linear weight"
            elif owners[id(p)] > 1:
                reasons[id(p)] = "shared with another module (tied weights)"
            elif id(module) in read_directly:
                reasons[id(p)] = "read directly by nn.MultiheadAttention"
            elif min(p.shape) <= resolve_rank(_layer_rank(config, fqn), min(p.shape)):
                reasons[id(p)] = "smaller side <= its rank"
            else:  # the one rule left (filter_fn is not called again: it may count its calls)
                reasons[id(p)] = "rejected by filter_fn"
    return reasons


def _layer_rank(config, fqn: str) -> int | float:
    return next((r for pattern, r in config.layer_rank if fnmatch.fnmatchcase(fqn, pattern)), config.rank)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _moment_bytes(shape, dtype: torch.dtype, state_dtype: str) -> int:
    """Bytes of Adam's two moments of `shape` stored as `state_dtype` (fp32 states of fp64 weights are fp64)."""
    kind = quant.storage_kind(shape, state_dtype)
    if kind == "fp32" and dtype == torch.float64:
        kind = "fp64"
    one = sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size()
              for s, d in quant.part_specs(shape, kind).values())
    return 2 * one


def compiles_updates(opt) -> bool:
    """Whether opt's first step compiles its state updates (compile_step=True, or torchao-quantised states)."""
    if opt.config.compile_step is not None:
        return opt.config.compile_step
    return any(quant.storage_kind(quant.state_shape(opt, p), g["state_dtype"]) in quant.QUANTIZED
               for g in opt.trained_groups for p in g["params"])


def _m(n: float) -> str:
    return f"{n / 1e6:.2f}M"


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def summary(opt) -> str:
    """A printable one-screen summary of an optimizer made by :func:`lowrank_compile.wrap_model`.

    Example::

        opt = lowrank_compile.wrap_model(model, rank=64)
        print(lowrank_compile.summary(opt))
    """
    from .optimizer import LowRankAdamW

    if not isinstance(opt, LowRankAdamW):
        inner = getattr(opt, "optimizer", None)  # accelerate / Trainer wrap the optimizer
        if isinstance(inner, LowRankAdamW):
            return summary(inner)
        raise TypeError(f"summary expects the optimizer made by lowrank_compile.wrap_model, got {type(opt).__name__}")
    config, names, layers = opt.config, opt.param_names, opt.layers
    seen = _SEEN.get(opt)
    ranks = collections.Counter(layer.lowrank_spec.rank for layer in layers.values())
    sides = collections.Counter(layer.basis_size for layer in layers.values())
    projected = sum(w.numel() for w in layers)
    ours = adamw = low_grads = full_grads = 0
    plain = collections.defaultdict(lambda: [0, 0, []])  # reason -> [tensors, elements, names]
    for group in opt.trained_groups:
        for p in group["params"]:
            shape = quant.state_shape(opt, p)
            dtype = layers[p].compute_dtype if p in layers else p.dtype  # an int8 weight computes in its old dtype
            size = dtype.itemsize
            ours += _moment_bytes(shape, dtype, group["state_dtype"])
            adamw += 2 * p.numel() * size
            if p in layers:
                low_grads += torch.Size(shape).numel() * size
                full_grads += p.numel() * size
                continue
            reason = seen.reasons.get(id(p), "not projected") if seen else "not projected"
            entry = plain[reason]
            entry[0] += 1
            entry[1] += p.numel()
            entry[2].append(names.get(p, "?"))
    rank_text = ", ".join(f"{r} ({n} layers)" if len(ranks) > 1 else str(r) for r, n in sorted(ranks.items()))
    lines = [f"lowrank_compile: DCT-AdamW (basis {config.basis!r}, update_gap {config.update_gap}, state_dtype "
             f"{config.state_dtype!r}" + (", fused" if config.fused else "") + ")"]
    side_text = f"{min(sides)}" if len(sides) == 1 else f"{min(sides)}-{max(sides)}"
    lines.append(f"  projected:    {len(layers)} Linear layers, {_m(projected)} weights, rank {rank_text} "
                 f"(smaller side {side_text})")
    plain_total = sum(e[1] for e in plain.values())
    lines.append(f"  plain AdamW:  {_m(plain_total)} parameters in {sum(e[0] for e in plain.values())} tensors")
    for reason, (count, numel, fqns) in sorted(plain.items(), key=lambda kv: -kv[1][1]):
        head = f"    {_m(numel):>8}  {reason}: "
        shown = fqns[:1] + [n for i, n in enumerate(fqns[1:], 1) if len(head + ", ".join(fqns[:i + 1])) <= 96]
        more = f", ... ({count - len(shown)} more)" if count > len(shown) else ""
        lines.append(head + ", ".join(shown) + more)
    lines.append(f"  Adam states:  {_mib(ours)}, torch AdamW {_mib(adamw)}: {ours / max(adamw, 1):.2f}x "
                 f"({adamw / max(ours, 1):.1f}x smaller)")
    lines.append(f"  weight grads: {_mib(low_grads)} rank-r for the projected layers, {_mib(full_grads)} full: "
                 f"{low_grads / max(full_grads, 1):.2f}x")
    int8 = [(w, layer) for w, layer in layers.items() if layer.is_int8]
    if int8:
        stored = sum(w.numel() + layer.weight_scale.numel() * 4 for w, layer in int8)
        dense = sum(w.numel() * layer.compute_dtype.itemsize for w, layer in int8)
        lines.append(f"  weights:      int8 in {len(int8)} projected layers: {_mib(stored)} with their scales, "
                     f"{_mib(dense)} in {str(int8[0][1].compute_dtype)[6:]}")
    if compiles_updates(opt):
        lines.append("  compile:      the state updates are torch.compile'd at the first step "
                     "(about 30 s the first time)")
    if seen is not None:
        dense = "real tensors here (multi-process)" if seen.carriers_dense else "no memory in one process"
        lines.append(f"  parameters:   {seen.name} has {seen.own_params:,}; model.parameters() (and "
                     f"num_parameters()) count {seen.own_params + seen.carrier_params:,}")
        lines.append(f"    the extra {seen.carrier_params:,} are the lowrank_grad carriers: bookkeeping, each holds its "
                     f"layer's rank-r .grad")
        lines.append(f"    ({dense}); they stay registered parameters because DDP, FSDP2 and")
        lines.append("    clip_grad_norm_(model.parameters()) need them")
        if seen.frozen_params:
            lines.append(f"    {seen.frozen_params:,} frozen parameters are left alone")
    return "\n".join(lines)
