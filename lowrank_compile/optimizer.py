r"""LowRankAdamW: Adam with its states in each projected layer's rank-r space, AdamW for the rest.

For a projected weight W with rank-r gradient a = G_low (from the layer's backward) and step t:

.. math::
    m &\leftarrow \beta_1 m + (1-\beta_1) a, \qquad v \leftarrow \beta_2 v + (1-\beta_2) a^2 \\
    u &= \frac{m / (1-\beta_1^t)}{\sqrt{v / (1-\beta_2^t)} + \epsilon} \\
    W &\leftarrow W (1 - \eta\lambda) - \eta\, s\, \mathrm{back}(u), \quad
    \mathrm{back}(u) = u D_r^\top \text{ (right) or } D_r u \text{ (left)}

(arXiv:2505.17967, METHOD.md section 4). When a refresh changes the selected columns, the states follow
the ``state_policy``: "match" moves the state of every kept index to that index's new slot and zeroes
new ones; "keep" leaves states in their slots; "reset" zeroes them. Every other parameter gets plain
AdamW with the same hyper-parameters. The class gathers; the functions below compute.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch
from torch import Tensor

from . import quant
from .config import STATE_POLICIES
from .projection import LowRankLinear, RefreshControl
from .update import adamw_, compiled, lowrank_adamw_, match_slots, matched, moments_direction

__all__ = ["LowRankAdamW", "remap_states"]

# Rows of a low-precision weight updated per chunk: bounds the fp32 temporary of the back-projection.
_UPDATE_CHUNK_ELEMS = 1 << 22


def remap_states(states: list[Tensor], old_idx: Tensor, new_idx: Tensor, dim: int) -> None:
    """Policy "match": move each kept index's state slice to its new slot, zero slices of new indices.

    old_idx, new_idx: (r,) int64. dim: the rank dimension of the states (1 right, 0 left). In place.
    """
    src, kept = match_slots(old_idx, new_idx)
    for s in states:
        s.copy_(matched(quant.dequantize(s), src, kept, dim))


def _row_chunks(tensors: tuple[Tensor, ...], max_elems: int, block: int = 1):
    """Slices of tensors with the same rows along dim 0, each about max_elems elements of the first, holding
    whole blocks of `block` elements (torchao's states slice only on their 256-element block boundaries)."""
    first = tensors[0]
    if first.ndim == 0 or first.numel() <= max_elems:
        yield tensors
        return
    row = first.numel() // first.shape[0]
    align = block // math.gcd(row, block)  # rows per chunk: a multiple of this keeps chunks block-aligned
    rows = max(align, (max_elems // row) // align * align)
    for start in range(0, first.shape[0], rows):
        yield tuple(t[start:start + rows] for t in tensors)


def _apply_back_projection(w: Tensor, u: Tensor, d_r: Tensor, right: bool, alpha: float, decay: float = 1.0,
                           generator: torch.Generator | None = None) -> None:
    """W = decay * W + alpha * back(u), in fp32, written into W without a full-size temporary for fp32.

    Low-precision weights are computed in fp32 row chunks and rounded once when written back: bf16 weights
    stochastically when a generator is given (quant.round_to_bf16), to nearest otherwise.
    """
    if w.dtype in (torch.float32, torch.float64):
        if decay != 1.0:
            w.mul_(decay)
        u = u.to(w.dtype)
        d_r = d_r.to(w.dtype)
        if right:
            w.addmm_(u, d_r.t(), alpha=alpha)  # (out, r) @ (r, in)
        else:
            w.addmm_(d_r, u, alpha=alpha)  # (out, r) @ (r, in)
        return
    for w_rows, factor in _row_chunks((w, u if right else d_r), _UPDATE_CHUNK_ELEMS):
        delta = factor @ d_r.t() if right else factor @ u
        new = w_rows.float().mul_(decay).add_(delta, alpha=alpha)  # decay in fp32: rounded alone, it is lost
        w_rows.copy_(quant.round_to_bf16(new, generator) if w.dtype == torch.bfloat16 else new.to(w.dtype))


def clip_tensor_norm_(grad: Tensor, max_norm: float) -> None:
    """Scale one gradient in place so its 2-norm is at most max_norm (torch's clip_grad_norm_ rule)."""
    norm = torch.linalg.vector_norm(grad.float())
    grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0).to(grad.dtype))


def _allow_recompiles(graphs: int) -> None:
    """Raise dynamo's per-function recompile limit so a compiled step with many shape groups stays compiled."""
    import torch._dynamo

    need = graphs + 8
    if torch._dynamo.config.recompile_limit < need:
        torch._dynamo.config.recompile_limit = need


class LowRankAdamW(torch.optim.Optimizer):
    """One optimizer for a wrapped model: low-rank Adam for projected weights, AdamW for the rest.

    Made by :func:`lowrank_compile.wrap_model`; see its docstring for the arguments. Param groups carry a
    ``"lowrank"`` flag; groups with it hold projected weights, whose gradients are read from their
    layer's ``lowrank_grad`` carrier. ``state_dict()`` adds the global step counter.
    """

    def __init__(self, param_groups: list[dict], layers: dict[Tensor, LowRankLinear], control: RefreshControl, *,
                 lr: float, betas: tuple[float, float], eps: float, weight_decay: float, scale: float,
                 state_policy: str, state_dtype: str, fused: bool = False, accumulate: int = 1,
                 compile_step: bool | None = None, stochastic_round: bool = True, seed: int = 0,
                 clip_per_tensor: float | None = None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, scale=scale,
                        state_policy=state_policy, state_dtype=state_dtype, lowrank=False,
                        stochastic_round=stochastic_round, seed=seed)
        self._layers = layers
        self._control = control
        self._fused = fused
        self._accumulate = accumulate
        self._micro_steps = 0
        self._fused_counts: dict[Tensor, int] = {}
        self._pending_match: dict[Tensor, tuple[Tensor, Tensor, int]] = {}  # set by a refresh, used by its update
        self._clip_per_tensor = clip_per_tensor
        self._compile_step = bool(compile_step)
        # torchao-quantised states are updated by a compiled function unless compile_step=False: eager, their
        # codecs run a dozen full-size int64 passes per state and step (torchao compiles its own step too)
        self._compile_quantized = compile_step is not False
        super().__init__(param_groups, defaults)
        if compile_step:
            _allow_recompiles(len(param_groups) + len({(tuple(p.shape), p.dtype) for p in layers}))
        if self._compile_quantized and any(g["state_dtype"] in quant.QUANTIZED for g in self.param_groups):
            shapes = {tuple(layers[p].lowrank_grad.shape) if g["lowrank"] else (tuple(p.shape), p.dtype)
                      for g in self.param_groups for p in g["params"]}
            _allow_recompiles(3 * len(shapes))  # each shape, and up to two row-chunk shapes of a large one
        if fused:
            self._register_fused_hooks()

    def _register_fused_hooks(self) -> None:
        """fused=True: update each parameter inside backward as soon as its gradient is complete."""
        for group in self.param_groups:
            for p in group["params"]:
                target = self._layers[p].lowrank_grad if group["lowrank"] else p
                handle = target.register_post_accumulate_grad_hook(
                    functools.partial(self._fused_hook, param=p, group=group))
                self._control.hooks.append(handle)

    @torch.no_grad()
    def _fused_hook(self, grad_holder: Tensor, *, param: Tensor, group: dict) -> None:
        count = self._fused_counts.get(param, 0) + 1
        if count < self._accumulate:
            self._fused_counts[param] = count
            return
        self._fused_counts[param] = 0
        self._update(group, [param])
        grad_holder.grad = None

    # -- bookkeeping -------------------------------------------------------------------------------
    @property
    def global_step(self) -> int:
        """Completed optimizer steps; the next step is global_step + 1."""
        return self._control.step

    def layer_of(self, p: Tensor) -> LowRankLinear:
        return self._layers[p]

    def _check_wrapped(self) -> None:
        for layer in self._layers.values():
            if not isinstance(layer, LowRankLinear) or layer._lowrank_control is not self._control:
                raise RuntimeError(
                    "this optimizer's model was unwrapped (lowrank_compile.unwrap_model) or wrapped again; "
                    "it can no longer step. Call lowrank_compile.wrap_model(model, ...) for a fresh optimizer."
                )

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear plain and rank-r gradients; a no-op between the micro-batches of one accumulated step."""
        if self._micro_steps != 0:
            return
        super().zero_grad(set_to_none=set_to_none)
        for layer in self._layers.values():
            carrier = layer._parameters.get("lowrank_grad")
            if carrier is not None and carrier.grad is not None:
                if set_to_none:
                    carrier.grad = None
                else:
                    carrier.grad.zero_()

    def lowrank_grads(self) -> list[Tensor]:
        """The rank-r gradients present now (the carriers' .grad), one per projected layer that has one."""
        return [g for g in (layer.lowrank_grad.grad for layer in self._layers.values()) if g is not None]

    # -- the step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """Apply one update to every parameter that has a gradient, then advance the step counter.

        With ``accumulate=k`` only every k-th call updates (the others return at once), so a loop that calls
        backward / step / zero_grad per micro-batch needs no change. With ``fused=True`` the updates already
        ran inside backward and step only advances the counter.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_wrapped()
        self._micro_steps += 1
        if self._micro_steps < self._accumulate:
            return loss
        self._micro_steps = 0
        if not self._fused:
            for group in self.param_groups:
                self._update(group, group["params"])
        self._control.advance()
        return loss

    def _grad(self, p: Tensor, group: dict) -> Tensor | None:
        return self._layers[p].lowrank_grad.grad if group["lowrank"] else p.grad

    def _update(self, group: dict, params: list[Tensor]) -> None:
        """Update the params of one group that have a gradient: same-shape batches, then the rest one by one."""
        batches: dict[tuple, list[Tensor]] = {}
        singles = []
        for p in params:
            grad = self._grad(p, group)
            if grad is None:
                continue
            if self._clip_per_tensor is not None:
                clip_tensor_norm_(grad, self._clip_per_tensor)
            self._prepare_state(p, group, grad)
            key = self._batch_key(p, group)
            if key is None:
                singles.append(p)
            else:
                batches.setdefault(key, []).append(p)
        for batch in batches.values():
            self._update_batch(group, batch)
        for p in singles:
            if group["lowrank"]:
                self._step_lowrank(p, group)
            else:
                self._step_plain(p, group)

    def _prepare_state(self, p: Tensor, group: dict, grad: Tensor) -> None:
        """Create the states on first use; after a refresh, bring a layer's states into its new basis."""
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = self._new_state(grad.shape, group, p)
            state["exp_avg_sq"] = self._new_state(grad.shape, group, p, signed=False)
            if group["lowrank"]:
                layer = self._layers[p]
                state["indices" if layer.lowrank_spec.basis != "svd" else "basis"] = layer.selection().clone()
        elif group["lowrank"] and self._layers[p]._lowrank_refreshed:
            self._follow_refresh(p, state, self._layers[p], group["state_policy"])

    def _batch_key(self, p: Tensor, group: dict) -> tuple | None:
        """Params with equal keys are updated by one call of a list function; None: update alone."""
        state = self.state[p]
        m = state["exp_avg"]
        if p.dtype not in (torch.float32, torch.float64) or type(m) is not torch.Tensor:
            return None
        if group["lowrank"]:
            spec = self._layers[p].lowrank_spec
            return (tuple(p.shape), p.dtype, m.dtype, spec.right, spec.basis)
        return (tuple(p.shape), p.dtype, m.dtype)

    def _update_batch(self, group: dict, params: list[Tensor]) -> None:
        beta1, beta2 = group["betas"]
        states = [self.state[p] for p in params]
        lr = torch.tensor(group["lr"], dtype=torch.float64)
        common = dict(lr=lr, weight_decay=group["weight_decay"], beta1=beta1, beta2=beta2, eps=group["eps"])
        moments = ([s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [s["step"] for s in states])
        if group["lowrank"]:
            layers = [self._layers[p] for p in params]
            fn = compiled(lowrank_adamw_) if self._compile_step else lowrank_adamw_
            fn(params, [layer.lowrank_grad.grad for layer in layers], *moments[:2],
               [layer.columns(params[0].dtype) for layer in layers], moments[2], scale=group["scale"],
               right=layers[0].lowrank_spec.right, **common)
        else:
            fn = compiled(adamw_) if self._compile_step else adamw_
            fn(params, [p.grad for p in params], *moments, **common)

    def _new_state(self, shape: torch.Size, group: dict, like: Tensor, signed: bool = True) -> Tensor:
        """A zero Adam moment of `shape` in the group's state_dtype ("fp32" means fp64 next to fp64 weights).

        Quantised kinds are torchao subclasses (see quant.py); shapes too small or not a multiple of the
        block size stay fp32. signed: False for the second moment (torchao's unsigned code map).
        """
        if group["state_dtype"] == "fp32" and like.dtype == torch.float64:
            return torch.zeros(shape, dtype=torch.float64, device=like.device)
        return quant.new_state(shape, group["state_dtype"], signed=signed, device=like.device)

    def _step_lowrank(self, p: Tensor, group: dict) -> None:
        """One projected layer whose states are ready (low-precision weights or quantised states)."""
        layer = self._layers[p]
        grad = layer.lowrank_grad.grad
        spec = layer.lowrank_spec
        state = self.state[p]
        state["step"] += 1
        beta1, beta2 = group["betas"]
        u = self._state_fn(moments_direction, state["exp_avg"])(grad, state["exp_avg"], state["exp_avg_sq"], state["step"], beta1, beta2,
                                              group["eps"], self._pending_match.pop(p, None))
        lr = group["lr"]
        _apply_back_projection(p, u, layer.columns(torch.float32 if p.dtype != torch.float64 else torch.float64),
                               spec.right, -lr * group["scale"], decay=1 - lr * group["weight_decay"],
                               generator=self._rounding_generator(p, group, state))

    def _follow_refresh(self, p: Tensor, state: dict, layer: LowRankLinear, policy: str) -> None:
        """Bring the states of one layer into its newly selected basis (METHOD.md section 4).

        "match" on quantised states is left to the update that follows (_step_lowrank), which moves the decoded
        states before the Adam step: one decode and one encode per step instead of two.
        """
        moments = [state["exp_avg"], state["exp_avg_sq"]]
        if policy == "reset":
            for s in moments:
                quant.zero_(s)
        elif policy == "match":
            dim = 1 if layer.lowrank_spec.right else 0
            if quant.is_quantized(moments[0]):
                self._pending_match[p] = (*match_slots(state["indices"], layer.selection()), dim)
            else:
                remap_states(moments, state["indices"], layer.selection(), dim)
        elif policy != "keep":
            raise ValueError(f"unknown state_policy {policy!r}; use one of {STATE_POLICIES}")
        key = "basis" if layer.lowrank_spec.basis == "svd" else "indices"
        state[key].copy_(layer.selection())

    def _step_plain(self, p: Tensor, group: dict) -> None:
        """One plain parameter whose states are ready (low-precision weights or quantised states).

        A large parameter (an embedding, an lm_head) is updated in row chunks, so its fp32 temporaries
        (dequantised moments, the direction, the fp32 weight) never exist at full size.
        """
        state = self.state[p]
        state["step"] += 1
        beta1, beta2 = group["betas"]
        lr, wd = group["lr"], group["weight_decay"]
        generator = None if p.dtype in (torch.float32, torch.float64) else self._rounding_generator(p, group, state)
        tensors = (p, p.grad, state["exp_avg"], state["exp_avg_sq"])
        for w, g, m, v in _row_chunks(tensors, _UPDATE_CHUNK_ELEMS, block=max(quant.BLOCK_SIZE.values())):
            u = self._state_fn(moments_direction, m)(g, m, v, state["step"], beta1, beta2, group["eps"])
            if w.dtype in (torch.float32, torch.float64):
                if wd != 0:
                    w.mul_(1 - lr * wd)
                w.add_(u.to(w.dtype), alpha=-lr)
            else:  # decay and update in fp32, rounded once (stochastically for bf16 unless switched off)
                new = w.float().mul_(1 - lr * wd).sub_(u, alpha=lr)
                w.copy_(quant.round_to_bf16(new, generator) if w.dtype == torch.bfloat16 else new.to(w.dtype))

    def _state_fn(self, fn: Callable, state: Tensor) -> Callable:
        """fn, compiled when it works on torchao-quantised states (unless compile_step=False)."""
        if self._compile_quantized and quant.is_quantized(state):
            return compiled(fn)
        return fn

    def _rounding_generator(self, p: Tensor, group: dict, state: dict) -> torch.Generator | None:
        """The generator for stochastically rounding bf16 weight p at this step, or None (round to nearest).

        Seeded from (group["seed"], p's position among the optimizer's params, state["step"]), so the bits are
        the same on every rank and repeat exactly after a resume (see quant.py).
        """
        if p.dtype != torch.bfloat16 or not group.get("stochastic_round", True):
            return None
        index = getattr(self, "_param_index", None)
        if index is None or p not in index:
            index = self._param_index = {q: i for i, q in enumerate(q for g in self.param_groups for q in g["params"])}
        key = quant.rounding_key(int(group.get("seed", 0)), index[p], int(state["step"].item()))
        return quant.rounding_generator(key, p.device)

    # -- state_dict --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["global_step"] = self._control.step
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        global_step = state_dict.pop("global_step", None)
        if global_step is None:
            raise ValueError("this state_dict has no 'global_step': it was not saved from a LowRankAdamW")
        super().load_state_dict(state_dict)
        # torch.optim.Optimizer.load_state_dict casts every state tensor but "step" to its parameter's dtype,
        # calling Optimizer._process_value_according_to_param_policy by class name (an override is never
        # used): int64 indices would come back as floats, fp32 states next to bf16 weights as bf16. Put the
        # saved tensors back in their own dtype (ids map to params in order, as torch does).
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(i, {}).items():
                if isinstance(value, Tensor) and key != "step":
                    self.state[p][key] = value.to(device=p.device, copy=True)
        for p, layer in self._layers.items():
            state = self.state.get(p)
            if state:
                key = "basis" if layer.lowrank_spec.basis == "svd" else "indices"
                layer.selection().copy_(state[key])
                layer._lowrank_selected = True
        self._control.set_step(int(global_step))
