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

import contextlib
import functools
import logging
import types
from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor

from . import amp, dcp, int8_weights, quant
from .config import LowRankConfig
from .projection import LowRankLinear, RefreshControl
from .state_check import check_state_dict
from .compile import compiled
from .update import (UPDATE_CHUNK_ELEMS, SkipCounter, adamw_, adamw_chunked_, clip_tensor_norm_, lowrank_adamw_,
                     match_slots, moments_direction, remap_states)

__all__ = ["LowRankAdamW"]

logger = logging.getLogger("lowrank_compile")


class LowRankAdamW(torch.optim.Optimizer):
    """One optimizer for a wrapped model: low-rank Adam for projected weights, AdamW for the rest.

    Made by :func:`lowrank_compile.wrap_model` from a :class:`LowRankConfig`; see wrap_model for the options.
    Param groups carry a ``"lowrank"`` flag; groups with it hold projected weights, whose gradients are read
    from their layer's ``lowrank_grad`` carrier. ``state_dict()`` adds the global step counter.

    Other modules (checkpoints, data-parallel wrappers) talk to it through its public interface only:
    ``config``, ``refresh_control``, ``layers`` / ``layer_of``, ``param_names``, ``fused``, ``accumulate``,
    ``micro_step``, ``global_step``, :meth:`update_now`, :meth:`rebind_param` and :meth:`restore_after_load`.
    """

    # torch.amp.GradScaler.step always calls step() of an optimizer with this flag, handing it the scale and the
    # inf flag (attributes grad_scale, found_inf); step() skips, unscales and refuses itself (see amp.py)
    _step_supports_amp_scaling = True

    def __init__(self, param_groups: list[dict], layers: Mapping[Tensor, LowRankLinear], control: RefreshControl,
                 config: LowRankConfig, param_names: Mapping[Tensor, str] | None = None):
        defaults = dict(lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay,
                        scale=config.scale, state_policy=config.state_policy, state_dtype=config.state_dtype,
                        lowrank=False, stochastic_round=config.stochastic_round, seed=config.seed)
        self._config = config
        self._layers = dict(layers)
        self._control = control
        self._names = dict(param_names or {})
        self._micro_steps = 0
        self._fused_counts: dict[Tensor, int] = {}
        self._pending_match: dict[Tensor, tuple[Tensor, Tensor, int]] = {}  # set by a refresh, used by its update
        self._compile_step = bool(config.compile_step)
        # torchao-quantised states are updated by a compiled function unless compile_step=False: eager, their
        # codecs run a dozen full-size int64 passes per state and step (torchao compiles its own step too)
        self._compile_quantized = config.compile_step is not False
        super().__init__(param_groups, defaults)
        self._index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        self._group_of: dict[Tensor, dict] = {}
        self._group_pos: dict[int, int] = {}
        self._lrs: dict[tuple[int, torch.device], list] = {}  # (group position, device) -> [lr value, 0-d tensor]
        self._skips = SkipCounter()  # updates skipped for non-finite gradients
        self._scaler_cycle = amp.ScalerCycle()  # what torch.amp.GradScaler said during this step (amp.py)
        self._scaler_owns_infs = False  # True while a GradScaler-checked update runs: the guard stays quiet
        self._scaler_skips = 0  # see scaler_skips
        self._carriers: dict | None = None  # the carriers' bookkeeping param group while it is shown (amp.py)
        self._carrier_ids: set[int] = set()
        self._index_groups()
        # graphs a compiled update may need: one per shape, times refresh / ordinary variants and row chunks
        shapes = {(tuple(p.shape), p.dtype) for g in self.param_groups for p in g["params"]}
        if self._compile_step:
            for fn in (lowrank_adamw_, adamw_, adamw_chunked_):
                compiled(fn).allow(3 * len(shapes) + 8)
        if self._compile_quantized and any(g["state_dtype"] in quant.QUANTIZED for g in self.param_groups):
            compiled(moments_direction).allow(3 * len(shapes) + 8)
        if self._compile_quantized:  # eager bf16 write-backs round through it: one graph per row chunk shape
            compiled(quant.round_to_bf16).allow(sum(2 + p.numel() // UPDATE_CHUNK_ELEMS for p in
                                                    {p.shape: p for g in self.param_groups for p in g["params"]
                                                     if p.dtype == torch.bfloat16}.values()) + 8)
        if self._compile_quantized:  # int8 weights' write-backs: full and last row chunk, with or without decay
            compiled(int8_weights.write_rows_).allow(4 * len({p.shape for g in self.param_groups for p in g["params"]
                                                              if p.dtype == torch.int8}) + 8)
        if config.fused:
            self._register_fused_hooks()
        else:
            control.grad_listeners.append(self._expose_carrier)

    # -- the public interface ------------------------------------------------------------------------
    @property
    def config(self) -> LowRankConfig:
        """The options this optimizer (and its model's wrapping) was made with."""
        return self._config

    @property
    def refresh_control(self) -> RefreshControl:
        """The step counter and refresh schedule shared with the wrapped layers."""
        return self._control

    @property
    def layers(self) -> Mapping[Tensor, LowRankLinear]:
        """Projected weight -> its LowRankLinear, read-only."""
        return types.MappingProxyType(self._layers)

    def layer_of(self, p: Tensor) -> LowRankLinear:
        return self._layers[p]

    @property
    def param_names(self) -> Mapping[Tensor, str]:
        """Parameter -> its fqn in the wrapped model (checkpoints name states by it), read-only."""
        return types.MappingProxyType(self._names)

    @property
    def trained_groups(self) -> list[dict]:
        """The param groups this optimizer trains: param_groups without the carriers' bookkeeping group that
        GradScaler support shows between a backward and its step (amp.py). Checkpoints and wrappers use these."""
        return [g for g in self.param_groups if not g.get("carriers")]

    @property
    def fused(self) -> bool:
        """Whether updates run inside backward (config.fused)."""
        return self._config.fused

    @property
    def accumulate(self) -> int:
        """Micro-batches per optimizer step (config.accumulate)."""
        return self._config.accumulate

    @property
    def micro_step(self) -> int:
        """Micro-batches of the current accumulated step already counted by step(): 0 .. accumulate - 1.

        0 between steps; the coming step() call updates when ``micro_step == accumulate - 1``.
        """
        return self._micro_steps

    @property
    def global_step(self) -> int:
        """Completed optimizer steps; the next step is global_step + 1."""
        return self._control.step

    @property
    def nonfinite_skips(self) -> Tensor:
        """How many parameter updates were skipped because their gradient (rank-r for a projected weight) held
        an inf or NaN: a 0-d int64 tensor, the total over parameters and steps. Such a parameter keeps its weight,
        Adam states and selection for that step (its step count still advances); the check runs on the device,
        so it never synchronises. Reading the value is a natural synchronisation; a warning is logged then (and
        by state_dict) when the count has grown."""
        return self._skips.total()

    @property
    def scaler_skips(self) -> int:
        """Optimizer steps skipped under torch.amp.GradScaler because the scale changed within an accumulated step
        (``accumulate > 1``: the scaler's growth between micro-batches); steps with infs are the scaler's own
        skips and are not counted here."""
        return self._scaler_skips

    def _skips_on(self, device: torch.device) -> Tensor | None:
        return None if self._scaler_owns_infs else self._skips.on(device)

    @torch.no_grad()
    def update_now(self, params: Iterable[Tensor]) -> None:
        """Update these parameters from their present gradients, now (e.g. from a DDP communication hook once
        their bucket is reduced). Projected weights read their layer's rank-r gradient."""
        by_group: dict[int, tuple[dict, list[Tensor]]] = {}
        for p in params:
            group = self._group_of[p]
            by_group.setdefault(id(group), (group, []))[1].append(p)
        for group, ps in by_group.values():
            self._update(group, ps)

    def rebind_param(self, old: Tensor, new: Tensor) -> None:
        """Replace parameter `old` by the tensor `new` (FSDP2 swapping in a local shard): its param-group slot,
        states, layer and name follow."""
        if old is new:
            return
        layer = self._layers.get(old)
        if layer is not None and layer.is_int8:
            raise NotImplementedError(
                f"{self._names.get(old, 'a projected weight')} is stored as int8 (weight_dtype='int8'), which FSDP2 "
                "cannot shard: its block scales would not follow the shards. Use weight_dtype=None with "
                "prepare_fsdp, or prepare_ddp (replicated int8 weights stay identical: their rounding is seeded)")
        group = self._group_of.pop(old)
        params = group["params"]
        params[next(i for i, q in enumerate(params) if q is old)] = new
        self._group_of[new] = group
        if old in self.state:
            self.state[new] = self.state.pop(old)
        if old in self._layers:
            self._layers[new] = self._layers.pop(old)
        if old in self._names:
            self._names[new] = self._names.pop(old)
        self._index[new] = self._index.pop(old)

    def restore_after_load(self, global_step: int) -> None:
        """After states were loaded: each projected layer takes the selection saved in its state, and a layer
        without saved state counts as unselected (it selects from its first gradient); then the step counter.
        The one rule for every loader (load_state_dict, load_optimizer)."""
        for p, layer in self._layers.items():
            state = self.state.get(p)
            layer.restore_selection(state[self._selection_key(layer)] if state else None)
        self._control.set_step(int(global_step))

    # -- bookkeeping -------------------------------------------------------------------------------
    def _index_groups(self) -> None:
        """param -> its group dict (load_state_dict replaces the group dicts: re-run after it)."""
        self._group_of = {p: g for g in self.param_groups for p in g["params"]}
        self._group_pos = {id(g): i for i, g in enumerate(self.param_groups)}

    def _register_fused_hooks(self) -> None:
        """fused=True: update each parameter inside backward as soon as its gradient is complete."""
        for group in self.param_groups:
            for p in group["params"]:
                target = self._layers[p].lowrank_grad if group["lowrank"] else p
                handle = target.register_post_accumulate_grad_hook(functools.partial(self._fused_hook, param=p))
                self._control.hooks.append(handle)

    @torch.no_grad()
    def _fused_hook(self, grad_holder: Tensor, *, param: Tensor) -> None:
        count = self._fused_counts.get(param, 0) + 1
        if count < self.accumulate:
            self._fused_counts[param] = count
            return
        self._fused_counts[param] = 0
        self._update(self._group_of[param], [param])
        grad_holder.grad = None

    @staticmethod
    def _selection_key(layer: LowRankLinear) -> str:
        return "basis" if layer.lowrank_spec.basis == "svd" else "indices"

    def _check_wrapped(self) -> None:
        for layer in self._layers.values():
            if not isinstance(layer, LowRankLinear) or layer.refresh_control is not self._control:
                raise RuntimeError(
                    "this optimizer's model was unwrapped (lowrank_compile.unwrap_model) or wrapped again; "
                    "it can no longer step. Call lowrank_compile.wrap_model(model, ...) for a fresh optimizer."
                )

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear plain and rank-r gradients; a no-op between the micro-batches of one accumulated step."""
        if self._micro_steps != 0:
            return
        self._hide_carriers()
        self._scaler_cycle.reset()
        super().zero_grad(set_to_none=set_to_none)
        for layer in self._layers.values():
            carrier = layer.lowrank_grad
            if carrier.grad is not None:
                if set_to_none:
                    carrier.grad = None
                else:
                    carrier.grad.zero_()

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                        foreach: bool | None = None) -> Tensor:
        """Clip the global norm over every gradient this optimizer updates from, plain and rank-r, as
        ``torch.nn.utils.clip_grad_norm_`` does; returns the total norm before clipping.

        With ``fused=True`` each gradient is consumed inside backward, so no set of gradients exists at once to
        clip: this raises; use ``clip_per_tensor`` there.
        """
        if self.fused:
            raise RuntimeError("clip_grad_norm_ with fused=True: each gradient is used and freed inside backward, "
                               "so there is nothing left to clip afterwards (torch.nn.utils.clip_grad_norm_ would "
                               "return 0 and clip nothing); wrap with clip_per_tensor=max_norm to clip each "
                               "gradient just before its update, or use fused=False")
        return torch.nn.utils.clip_grad_norm_(self._grad_holders(), max_norm, norm_type=norm_type,
                                              error_if_nonfinite=error_if_nonfinite, foreach=foreach)

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
        if self._init_states_for_dcp():
            return None
        scaler = amp.scaler_inputs(self)  # torch.amp.GradScaler.step is calling: see amp.py
        if scaler is not None and self.fused:
            raise RuntimeError(amp.FUSED_ERROR)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_wrapped()
        self._micro_steps += 1
        if scaler is not None:
            self._scaler_cycle.note(*scaler)
        if self._micro_steps < self.accumulate:
            return loss
        self._micro_steps = 0
        if self._scaler_cycle.active and self._scaler_skip():
            return loss
        try:
            if not self.fused:
                for group in self.trained_groups:
                    self._update(group, group["params"])
        finally:
            self._scaler_owns_infs = False
            self._hide_carriers()
        self._control.advance()
        return loss

    def _scaler_skip(self) -> bool:
        """The updating step() under a GradScaler: skip it (True) on inf or a scale changed within the step,
        leaving weights, states, step counter and selections as they were; else unscale the gradients (unless
        the scaler's unscale_ did) and let the update run without the non-finite guard."""
        cycle = self._scaler_cycle
        inf, changed = cycle.verdict()
        scale = cycle.last_scale
        cycle.reset()
        if inf or changed:
            if changed and not inf:
                self._scaler_skips += 1
                logger.warning("lowrank_compile: step skipped: the GradScaler changed its scale between the "
                               "micro-batches of one accumulated step (%d such steps so far); the gradient summed "
                               "under two scales cannot be unscaled", self._scaler_skips)
            self._undo_refresh()
            self._hide_carriers()
            return True
        if scale is not None:
            amp.unscale_([h.grad for h in self._grad_holders() if h.grad is not None], scale)
        self._scaler_owns_infs = True
        return False

    def _grad_holders(self) -> list[Tensor]:
        """The tensors whose .grad this optimizer updates from: each plain parameter, and each projected weight's
        carrier (its .grad is the rank-r gradient)."""
        return [self._layers[p].lowrank_grad if g["lowrank"] else p for g in self.trained_groups for p in g["params"]]

    def _undo_refresh(self) -> None:
        """A skipped step keeps the selections: layers refreshed in its backward go back to the selection their
        states hold (or to unselected), and the step's refresh is armed again for the retry."""
        for p, layer in self._layers.items():
            if layer.refreshed:
                state = self.state.get(p)
                layer.restore_selection(state[self._selection_key(layer)] if state else None)
        self._control.set_step(self._control.step)

    def _expose_carrier(self, layer: LowRankLinear, carrier: Tensor) -> None:
        """Listener on each layer's gradient delivery: show the carrier in param_groups until the step that
        consumes its gradient, so torch.amp.GradScaler unscales and checks it (amp.py)."""
        if id(carrier) in self._carrier_ids:
            return
        if self._carriers is None:
            self._carriers = amp.carrier_group(self.param_groups[0])
            self.param_groups.append(self._carriers)
        self._carriers["params"].append(carrier)
        self._carrier_ids.add(id(carrier))

    @contextlib.contextmanager
    def _carriers_hidden(self):
        """param_groups without the carriers' bookkeeping group for a while (state_dict never holds it)."""
        group, ids = self._carriers, set(self._carrier_ids)
        self._hide_carriers()
        try:
            yield
        finally:
            if group is not None:
                self._carriers, self._carrier_ids = group, ids
                self.param_groups.append(group)

    def _hide_carriers(self) -> None:
        if self._carriers is not None:
            index = next(i for i, g in enumerate(self.param_groups) if g is self._carriers)
            del self.param_groups[index]
        self._carriers = None
        self._carrier_ids.clear()

    def _grad(self, p: Tensor, group: dict) -> Tensor | None:
        return self._layers[p].lowrank_grad.grad if group["lowrank"] else p.grad

    def _update(self, group: dict, params: list[Tensor]) -> None:
        """Update the params of one group that have a gradient: same-shape batches, then the rest one by one.

        Runs under a torch.profiler range named "lowrank_compile.update.lowrank" or "...update.plain", so
        profiles (tools/launch_count.py) can tell the update's kernels apart, inside backward too (fused=True).
        """
        with torch.profiler.record_function("lowrank_compile.update." + ("lowrank" if group["lowrank"] else "plain")):
            self._update_group(group, params)

    def _update_group(self, group: dict, params: list[Tensor]) -> None:
        batches: dict[tuple, list[Tensor]] = {}
        singles = []
        clip = self._config.clip_per_tensor
        for p in params:
            grad = self._grad(p, group)
            if grad is None:
                continue
            if clip is not None:
                clip_tensor_norm_(grad, clip)
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
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)  # on the device, as CUDA graphs need
            state["exp_avg"] = self._new_state(grad.shape, group, p)
            state["exp_avg_sq"] = self._new_state(grad.shape, group, p, signed=False)
            if group["lowrank"]:
                layer = self._layers[p]
                state[self._selection_key(layer)] = layer.selection().clone()
        elif group["lowrank"] and self._layers[p].refreshed:
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

    def _hyper(self, group: dict, device: torch.device) -> dict:
        """The group's hyper-parameters for an update function, lr as a 0-d tensor on `device` (see _lr)."""
        beta1, beta2 = group["betas"]
        return dict(lr=self._lr(group, device), weight_decay=group["weight_decay"], beta1=beta1, beta2=beta2,
                    eps=group["eps"])

    def _lr(self, group: dict, device: torch.device) -> Tensor:
        """The group's lr as a 0-d tensor on `device`, one per group and device, refilled in place only when the
        group's lr changes (a schedule): no new tensor per step, so no host-to-device copy (a synchronisation), no
        recompile and no captured constant; a CUDA graph replays with the current lr. fp64 (fp32 where the device
        has none), so eager results equal those of a Python-float lr. A tensor lr is copied in every call."""
        key = (self._group_pos.get(id(group), -1), device)
        entry = self._lrs.get(key)
        lr = group["lr"]
        if entry is None:
            dtype = torch.float32 if device.type == "mps" else torch.float64
            entry = self._lrs[key] = [None, torch.zeros((), dtype=dtype, device=device)]
        if isinstance(lr, Tensor):
            entry[1].copy_(lr.detach())
        elif entry[0] != lr:
            entry[1].fill_(lr)
            entry[0] = lr
        return entry[1]

    def _update_batch(self, group: dict, params: list[Tensor]) -> None:
        """fp32/fp64 weights with plain states, one call (one compiled graph with compile_step) per shape group."""
        states = [self.state[p] for p in params]
        moments = ([s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [s["step"] for s in states])
        if group["lowrank"]:
            layers = [self._layers[p] for p in params]
            fn = compiled(lowrank_adamw_) if self._compile_step else lowrank_adamw_
            fn(params, [layer.lowrank_grad.grad for layer in layers], *moments[:2],
               [layer.columns(params[0].dtype) for layer in layers], moments[2], scale=group["scale"],
               right=layers[0].lowrank_spec.right, skips=self._skips_on(params[0].device),
               **self._hyper(group, params[0].device))
        else:
            fn = compiled(adamw_) if self._compile_step else adamw_
            fn(params, [p.grad for p in params], *moments, skips=self._skips_on(params[0].device),
               **self._hyper(group, params[0].device))

    def _new_state(self, shape: torch.Size, group: dict, like: Tensor, signed: bool = True) -> Tensor:
        """A zero Adam moment of `shape` in the group's state_dtype ("fp32" means fp64 next to fp64 weights).

        Quantised kinds are torchao subclasses (see quant.py); shapes too small or not a multiple of the
        block size stay fp32. signed: False for the second moment (torchao's unsigned code map).
        """
        if group["state_dtype"] == "fp32" and like.dtype == torch.float64:
            return torch.zeros(shape, dtype=torch.float64, device=like.device)
        return quant.new_state(shape, group["state_dtype"], signed=signed, device=like.device)

    def _step_lowrank(self, p: Tensor, group: dict) -> None:
        """One projected layer whose states are ready (low-precision weights or quantised states).

        With compile_step=True the whole update (decode, moments, back-projection in the weight's dtype, decay,
        stochastic rounding, encode) is one compiled graph per layer shape; otherwise only the state update of
        quantised states is compiled (unless compile_step=False).
        """
        layer = self._layers[p]
        state = self.state[p]
        whole = self._compile_step
        direction = moments_direction if whole else self._state_fn(moments_direction, state["exp_avg"])
        fn = compiled(lowrank_adamw_) if whole else functools.partial(lowrank_adamw_, direction=direction)
        cdt = torch.float64 if p.dtype == torch.float64 else torch.float32
        fn([p], [layer.lowrank_grad.grad], [state["exp_avg"]], [state["exp_avg_sq"]], [layer.columns(cdt)],
           [state["step"]], scale=group["scale"], right=layer.lowrank_spec.right, skips=self._skips_on(p.device),
           rounding=[self._rounding(p, group)], match=[self._pending_match.pop(p, None)],
           product_dtype=p.dtype if whole and p.dtype == torch.bfloat16 else None,
           scales=[layer.weight_scale] if layer.is_int8 else None, **self._hyper(group, p.device),
           **({} if whole else dict(rounder=self._rounder(), writer=self._writer())))

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
        state[self._selection_key(layer)].copy_(layer.selection())

    def _step_plain(self, p: Tensor, group: dict) -> None:
        """One plain parameter whose states are ready (low-precision weights or quantised states), in row
        chunks (update.adamw_chunked_): one compiled graph per shape with compile_step=True."""
        state = self.state[p]
        whole = self._compile_step
        h = self._hyper(group, p.device)
        fn = compiled(adamw_chunked_) if whole else adamw_chunked_
        fn(p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"], h["lr"], h["weight_decay"], h["beta1"],
           h["beta2"], h["eps"], self._rounding(p, group), skips=self._skips_on(p.device),
           **({} if whole else dict(fn=self._state_fn(moments_direction, state["exp_avg"]), rounder=self._rounder())))

    def _state_fn(self, fn: Callable, state: Tensor) -> Callable:
        """fn, compiled when it works on torchao-quantised states (unless compile_step=False)."""
        if self._compile_quantized and quant.is_quantized(state):
            return compiled(fn)
        return fn

    def _rounding(self, p: Tensor, group: dict) -> Tensor | None:
        """The counter base (quant.counter_base, on p's device) of a bf16 or int8 weight's stochastic rounding, or
        None (to nearest). The update hashes its bits from it and the step counter, eager or compiled alike, with
        no host read: the same bits on every process and after a resume."""
        if p.dtype not in (torch.bfloat16, torch.int8) or not group.get("stochastic_round", True):
            return None
        return quant.counter_base(int(group.get("seed", 0)), self._index[p], p.device)

    def _rounder(self) -> Callable:
        """What an eager update rounds bf16 write-backs with: quant.round_to_bf16, compiled (its counter hash is a
        couple of dozen full-size int64 passes eagerly, one fused kernel compiled) unless compile_step=False."""
        return compiled(quant.round_to_bf16) if self._compile_quantized else quant.round_to_bf16

    def _writer(self) -> Callable:
        """What an eager update writes int8 weight chunks with: int8_weights.write_rows_, compiled (its counter hash
        and re-encoding are ~30 full-size passes eagerly: 0.6 s against 0.01 s compiled for a 1024 x 4096 chunk on
        2 CPU threads) unless compile_step=False."""
        return compiled(int8_weights.write_rows_) if self._compile_quantized else int8_weights.write_rows_

    # -- state_dict --------------------------------------------------------------------------------
    def _init_states_for_dcp(self) -> bool:
        """Whether this step() is torch.distributed.checkpoint's state initialisation (an lr-0 step on a fresh
        optimizer, dcp.is_state_init_step); if so, create every parameter's states (zero moments, step 0, the
        layer's current selection) and nothing else: no update, and neither the step counter nor the micro-batch
        count moves, so the refresh schedule and the sketches continue as if the call never happened."""
        if not dcp.is_state_init_step(self):
            return False
        for group in self.trained_groups:
            for p in group["params"]:
                self._prepare_state(p, group, torch.empty(dcp.local_state_shape(self, p), device="meta"))
        return True

    def state_dict(self) -> dict:
        self._skips.total()  # logs a warning if the count grew (a save synchronises anyway)
        with self._carriers_hidden():
            return dcp.export_state_dict(self, super().state_dict())  # the global step, also in every group for torch's DCP (dcp.py)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load what :meth:`state_dict` returned, after checking all of it against this optimizer: the same
        groups and parameters, hyper-parameters that wrap_model would accept, and for every parameter states of
        the shape and storage this optimizer keeps, finite, with a whole step count and valid indices. Any
        difference raises ValueError naming it, with this optimizer unchanged."""
        if self._micro_steps:
            raise RuntimeError("load_state_dict was called between the micro-batches of an accumulated step; load "
                               "before the first micro-batch or after the step() that applies the update")
        self._hide_carriers()
        state_dict = dcp.import_state_dict(self, state_dict)  # what torch's DCP functions leave out (dcp.py)
        check_state_dict(self, state_dict)
        state_dict = dict(state_dict)
        global_step = state_dict.pop("global_step")
        existing = {p: dict(s) for p, s in self.state.items()}
        super().load_state_dict(state_dict)
        self._index_groups()
        # torch.optim.Optimizer.load_state_dict casts every state tensor but "step" to its parameter's dtype,
        # calling Optimizer._process_value_according_to_param_policy by class name (an override is never
        # used): int64 indices would come back as floats, fp32 states next to bf16 weights as bf16. Put the
        # saved tensors back in their own dtype (ids map to params in order, as torch does).
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(i, {}).items():
                if isinstance(value, Tensor):  # the step too: it lives on the parameter's device
                    self.state[p][key] = value.to(device=p.device, copy=True)
        _keep_addresses(self.state, existing)
        self.restore_after_load(int(global_step))


def _keep_addresses(state, existing: dict) -> None:
    """Copy loaded state tensors into the ones they replace where those match (type, shape, dtype, device), so
    state tensors keep their addresses across a load (what captured CUDA graphs and compiled steps rely on). A
    torchao state's copy_ writes its codes and scales in place."""
    for p, old_state in existing.items():
        new_state = state.get(p, {})
        for key, old in old_state.items():
            new = new_state.get(key)
            if (isinstance(old, Tensor) and isinstance(new, Tensor) and type(old) is type(new)
                    and old.shape == new.shape and old.dtype == new.dtype and old.device == new.device):
                old.copy_(new)
                new_state[key] = old
