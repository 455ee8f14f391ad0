"""Checks of a state dict (LowRankAdamW.state_dict()) against the optimizer about to load it.

load_state_dict calls :func:`check_state_dict` before it changes anything, so a state dict of another model, rank,
state dtype or basis, with hyper-parameters wrap_model would refuse, or with non-finite states, raises ValueError
naming the difference and leaves the optimizer as it was. The rules for hyper-parameters are LowRankConfig's.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from . import quant
from .dcp import local_state_shape

__all__ = ["check_state_dict", "is_step_count", "valid_indices", "hyper_problem"]


def is_step_count(v: float) -> bool:
    """Whether v is a value a step counter can hold: a finite whole number >= 0."""
    return math.isfinite(v) and v >= 0 and float(v).is_integer()


def valid_indices(idx: Tensor, n: int) -> bool:
    """Whether integer tensor idx holds distinct indices in [0, n) (a selection of basis columns)."""
    return idx.numel() == 0 or (int(idx.min()) >= 0 and int(idx.max()) < n and idx.unique().numel() == idx.numel())


def hyper_problem(config, key: str, value) -> str | None:
    """What is wrong with `value` for the option `key` by wrap_model's own rules (LowRankConfig), or None."""
    try:
        dataclasses.replace(config, **{key: value})
    except (ValueError, TypeError) as exc:
        return str(exc)
    return None


def check_state_dict(opt, sd) -> None:
    """Raise ValueError naming the first way `sd` does not fit this optimizer (see load_state_dict)."""
    if not isinstance(sd, dict) or not {"state", "param_groups"} <= set(sd):
        raise ValueError(f"expected a dict from LowRankAdamW.state_dict() with 'state' and 'param_groups', got "
                         f"{type(sd).__name__}")
    step = sd.get("global_step")
    if step is None:
        raise ValueError("this state_dict has no 'global_step': it was not saved from a LowRankAdamW")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"global_step must be an int >= 0, got {step!r}")
    groups = sd["param_groups"]
    if len(groups) != len(opt.trained_groups):
        raise ValueError(f"the state_dict has {len(groups)} param groups, this optimizer {len(opt.trained_groups)}")
    states = sd["state"]
    for gi, (saved, group) in enumerate(zip(groups, opt.trained_groups)):
        if len(saved.get("params", ())) != len(group["params"]):
            raise ValueError(f"param group {gi}: the state_dict has {len(saved.get('params', ()))} parameters, "
                             f"this optimizer {len(group['params'])}")
        for key in ("lowrank", "state_dtype", "state_policy"):
            if saved.get(key) != group.get(key):
                raise ValueError(f"param group {gi}: {key} is {saved.get(key)!r} in the state_dict, "
                                 f"{group.get(key)!r} here")
        values = dict(lr=saved.get("lr"), betas=tuple(saved.get("betas", ())), eps=saved.get("eps"),
                      weight_decay=saved.get("weight_decay"), scale=saved.get("scale", 1.0), seed=saved.get("seed", 0),
                      stochastic_round=saved.get("stochastic_round", True))
        for key, value in values.items():
            problem = hyper_problem(opt.config, key, value)
            if problem:
                raise ValueError(f"param group {gi}: {problem}")
        for i, p in zip(saved["params"], group["params"]):
            if i in states:
                _check_param_state(opt, states[i], p, group, f"param group {gi}, parameter {i}")

def _check_param_state(opt, state: dict, p: Tensor, group: dict, where: str) -> None:
    layer = opt.layers.get(p) if group["lowrank"] else None
    shape = local_state_shape(opt, p)  # this process's: under FSDP2 a local shard's
    kind = "fp64" if group["state_dtype"] == "fp32" and p.dtype == torch.float64 else \
        quant.storage_kind(shape, group["state_dtype"])
    step = state.get("step")
    if not isinstance(step, Tensor) or step.numel() != 1 or not is_step_count(step.item()):
        raise ValueError(f"{where}: step must be a whole count >= 0, got {step!r}")
    for key in ("exp_avg", "exp_avg_sq"):
        s = state.get(key)
        if not isinstance(s, Tensor) or tuple(s.shape) != shape or quant.kind_of(s) != kind:
            got = "missing" if not isinstance(s, Tensor) else f"{tuple(s.shape)} {quant.kind_of(s)}"
            raise ValueError(f"{where}: {key} must be a {shape} {kind} state, got {got}")
        values = quant.dequantize(s)
        if not torch.isfinite(values).all() or (key == "exp_avg_sq" and (values < 0).any()):
            raise ValueError(f"{where}: {key} holds non-finite{' or negative' if key == 'exp_avg_sq' else ''} values")
    if layer is not None:
        key = "basis" if layer.lowrank_spec.basis == "svd" else "indices"
        sel = state.get(key)
        n, r = layer.basis_size, layer.lowrank_spec.rank
        if key == "indices":
            if not (isinstance(sel, Tensor) and tuple(sel.shape) == (r,) and not sel.is_floating_point()
                    and valid_indices(sel, n)):
                raise ValueError(f"{where}: indices must be {r} distinct integers in [0, {n}), got {sel!r}")
        elif not (isinstance(sel, Tensor) and tuple(sel.shape) == (n, r) and torch.isfinite(sel).all()):
            raise ValueError(f"{where}: basis must be a finite ({n}, {r}) tensor")
