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

import math
from typing import Callable

import torch
from torch import Tensor

from .config import STATE_POLICIES
from .projection import LowRankLinear, RefreshControl

__all__ = ["LowRankAdamW", "adam_direction", "remap_states"]

_STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Rows of a low-precision weight updated per chunk: bounds the fp32 temporary of the back-projection.
_UPDATE_CHUNK_ELEMS = 1 << 22


def adam_direction(grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int, beta1: float, beta2: float,
                   eps: float) -> Tensor:
    """Update the moments in place and return Adam's bias-corrected direction u (fp32).

    Written as the reference does, m / (sqrt(v) + eps sqrt(bc2)) scaled by sqrt(bc2) / bc1, which is
    algebraically (m / bc1) / (sqrt(v / bc2) + eps).
    """
    g = grad.float()
    m = exp_avg.float()
    v = exp_avg_sq.float()
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if m is not exp_avg:  # low-precision or quantised states: write back
        exp_avg.copy_(m)
        exp_avg_sq.copy_(v)
    bc1 = 1 - beta1 ** step
    sqrt_bc2 = math.sqrt(1 - beta2 ** step)
    return (m / (v.sqrt() + eps * sqrt_bc2)).mul_(sqrt_bc2 / bc1)


def remap_states(states: list[Tensor], old_idx: Tensor, new_idx: Tensor, dim: int) -> None:
    """Policy "match": move each kept index's state slice to its new slot, zero slices of new indices.

    old_idx, new_idx: (r,) int64. dim: the rank dimension of the states (1 right, 0 left). In place.
    """
    same = new_idx[:, None] == old_idx[None, :]  # (r_new, r_old): a 0/1 matching, since D is orthonormal
    src = same.to(torch.int8).argmax(dim=1)
    kept = same.any(dim=1)
    for s in states:
        moved = s.index_select(dim, src)
        shape = [1, 1]
        shape[dim] = -1
        s.copy_(moved * kept.view(shape).to(moved.dtype))


def _apply_back_projection(w: Tensor, u: Tensor, d_r: Tensor, right: bool, alpha: float) -> None:
    """W += alpha * back(u), computed in fp32 and written into W without a full-size temporary for fp32."""
    if w.dtype in (torch.float32, torch.float64):
        u = u.to(w.dtype)
        d_r = d_r.to(w.dtype)
        if right:
            w.addmm_(u, d_r.t(), alpha=alpha)  # (out, r) @ (r, in)
        else:
            w.addmm_(d_r, u, alpha=alpha)  # (out, r) @ (r, in)
        return
    # Low-precision weights: fp32 in row chunks, rounded once when written back.
    out_f, in_f = w.shape
    rows = max(1, _UPDATE_CHUNK_ELEMS // in_f)
    for start in range(0, out_f, rows):
        sl = slice(start, start + rows)
        delta = u[sl] @ d_r.t() if right else d_r[sl] @ u
        w[sl] = (w[sl].float() + alpha * delta).to(w.dtype)


class LowRankAdamW(torch.optim.Optimizer):
    """One optimizer for a wrapped model: low-rank Adam for projected weights, AdamW for the rest.

    Made by :func:`lowrank_compile.wrap_model`; see its docstring for the arguments. Param groups carry a
    ``"lowrank"`` flag; groups with it hold projected weights, whose gradients are read from their
    layer's ``lowrank_grad`` carrier. ``state_dict()`` adds the global step counter.
    """

    def __init__(self, param_groups: list[dict], layers: dict[Tensor, LowRankLinear], control: RefreshControl, *,
                 lr: float, betas: tuple[float, float], eps: float, weight_decay: float, scale: float,
                 state_policy: str, state_dtype: str):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, scale=scale,
                        state_policy=state_policy, state_dtype=state_dtype, lowrank=False)
        self._layers = layers
        self._control = control
        super().__init__(param_groups, defaults)

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
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_wrapped()
        refreshed = self._control.refresh
        for group in self.param_groups:
            for p in group["params"]:
                if group["lowrank"]:
                    self._step_lowrank(p, group, refreshed)
                else:
                    self._step_plain(p, group)
        self._control.advance()
        return loss

    def _new_state(self, shape: torch.Size, group: dict, device: torch.device) -> Tensor:
        """A zero Adam moment of `shape` in the group's state_dtype."""
        return torch.zeros(shape, dtype=_STATE_DTYPES[group["state_dtype"]], device=device)

    def _step_lowrank(self, p: Tensor, group: dict, refreshed: bool) -> None:
        layer = self._layers[p]
        grad = layer.lowrank_grad.grad
        if grad is None:
            return
        spec = layer.lowrank_spec
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = self._new_state(grad.shape, group, grad.device)
            state["exp_avg_sq"] = self._new_state(grad.shape, group, grad.device)
            state["indices" if spec.basis != "svd" else "basis"] = layer.selection().clone()
        elif refreshed:
            self._follow_refresh(state, layer, group["state_policy"])
        state["step"] += 1
        beta1, beta2 = group["betas"]
        u = adam_direction(grad, state["exp_avg"], state["exp_avg_sq"], int(state["step"].item()), beta1, beta2,
                           group["eps"])
        lr = group["lr"]
        if group["weight_decay"] != 0:
            p.mul_(1 - lr * group["weight_decay"])
        _apply_back_projection(p, u, layer.columns(torch.float32 if p.dtype != torch.float64 else torch.float64),
                               spec.right, -lr * group["scale"])

    def _follow_refresh(self, state: dict, layer: LowRankLinear, policy: str) -> None:
        """Bring the states of one layer into its newly selected basis (METHOD.md section 4)."""
        moments = [state["exp_avg"], state["exp_avg_sq"]]
        if policy == "reset":
            for s in moments:
                s.zero_()
        elif policy == "match":
            remap_states(moments, state["indices"], layer.selection(), dim=1 if layer.lowrank_spec.right else 0)
        elif policy != "keep":
            raise ValueError(f"unknown state_policy {policy!r}; use one of {STATE_POLICIES}")
        key = "basis" if layer.lowrank_spec.basis == "svd" else "indices"
        state[key].copy_(layer.selection())

    def _step_plain(self, p: Tensor, group: dict) -> None:
        if p.grad is None:
            return
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = self._new_state(p.shape, group, p.device)
            state["exp_avg_sq"] = self._new_state(p.shape, group, p.device)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        u = adam_direction(p.grad, state["exp_avg"], state["exp_avg_sq"], int(state["step"].item()), beta1, beta2,
                           group["eps"])
        lr = group["lr"]
        if group["weight_decay"] != 0:
            p.mul_(1 - lr * group["weight_decay"])
        if p.dtype in (torch.float32, torch.float64):
            p.add_(u.to(p.dtype), alpha=-lr)
        else:
            p.copy_((p.float() - lr * u).to(p.dtype))

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
        self._control.set_step(int(global_step))
        for p, layer in self._layers.items():
            state = self.state.get(p)
            if state:
                key = "basis" if layer.lowrank_spec.basis == "svd" else "indices"
                layer.selection().copy_(state[key])

    @staticmethod
    def _process_value_according_to_param_policy(param, value, param_id, param_groups, key=None):
        # torch.optim casts floating states to the parameter's dtype; ours keep their own dtype
        # (fp32 states next to bf16 weights, int64 indices).
        if key == "step":
            return value
        return value.to(device=param.device)
