"""torch.amp.GradScaler with LowRankAdamW: rank-r gradients unscaled and checked like the plain ones, and a
skipped step that changes nothing.

GradScaler reaches an optimizer's gradients through ``param_groups`` only (``unscale_`` and its inf check walk
every group's ``params`` and read their ``.grad``). A projected layer's gradient is the ``.grad`` of its
``lowrank_grad`` carrier, which is not an optimizer parameter. So LowRankAdamW shows the scaler the carriers:
from the backward that delivers a rank-r gradient to the step (or zero_grad) that consumes it, ``param_groups``
ends with one bookkeeping group holding the carriers (:func:`carrier_group`, marked ``"carriers": True``; never
in ``state_dict``, never updated). ``scaler.unscale_(opt)`` then unscales them and finds their infs, and
``scaler.update()`` backs off when only a rank-r gradient overflowed.

LowRankAdamW sets ``_step_supports_amp_scaling``, so ``scaler.step(opt)`` always calls ``opt.step()``, with the
attributes ``grad_scale`` (the scale, or None when ``unscale_`` already ran) and ``found_inf``. step() then:

- with ``fused=True`` refuses: updates ran inside backward, before any inf check existed (under FSDP2,
  fsdp.py's step pre-hook refuses a scaler too: each process would see the infs of its own shard only);
- counts a micro-batch (``accumulate=k``) and notes what the scaler said (:class:`ScalerCycle`): any inf in the
  cycle, and whether the scale changed inside it (the scaler's growth between two micro-batches would leave a
  gradient summed under two scales, which no single unscale can fix);
- on the updating call reads that verdict once on the host (as GradScaler itself does with ``.item()``): on
  inf (or a changed scale) the step is skipped: weights, states, step counter and selections stay as they
  were (a refresh made in this step's backward is undone); otherwise the gradients are unscaled (unless
  ``unscale_`` did it) with the scaler's own kernel, and the update runs without the non-finite guard, since
  the scaler owns infs.
"""
from __future__ import annotations

import logging
from collections import defaultdict

import torch
from torch import Tensor

logger = logging.getLogger("lowrank_compile")

__all__ = ["scaler_inputs", "ScalerCycle", "unscale_", "carrier_group", "FUSED_ERROR"]

FUSED_ERROR = (
    "torch.amp.GradScaler with fused=True: the updates run inside backward, before the scaler can check the "
    "gradients for infs or unscale them, so a scaled or overflowed gradient would already be applied. Use "
    "fused=False with a GradScaler, or train in bf16 (no scaler needed).")


def scaler_inputs(opt) -> tuple[Tensor | None, Tensor] | None:
    """(grad_scale, found_inf) when torch.amp.GradScaler.step is calling opt.step(), else None."""
    if not (hasattr(opt, "grad_scale") or hasattr(opt, "found_inf")):
        return None
    found = getattr(opt, "found_inf", None)
    scale = getattr(opt, "grad_scale", None)
    if not isinstance(found, Tensor):  # no gradient at all was checked: the scaler sums an empty list to 0
        found = torch.zeros((), dtype=torch.float32, device=scale.device if isinstance(scale, Tensor) else "cpu")
    return (scale if isinstance(scale, Tensor) else None), found


class ScalerCycle:
    """What the scaler said over one optimizer step's micro-batches: infs, and the scales it handed over."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.found: Tensor | None = None  # sum of found_inf over the cycle (device)
        self.first_scale: Tensor | None = None
        self.scale_changed: Tensor | None = None  # 1.0 once a later micro-batch came with another scale (device)
        self.last_scale: Tensor | None = None  # the updating call's grad_scale: None when unscale_ already ran

    @property
    def active(self) -> bool:
        return self.found is not None

    def note(self, grad_scale: Tensor | None, found_inf: Tensor) -> None:
        found = found_inf.detach().float()
        self.found = found.clone() if self.found is None else self.found.add_(found.to(self.found.device))
        self.last_scale = grad_scale
        if grad_scale is None:
            return
        if self.first_scale is None:
            self.first_scale = grad_scale.detach().clone()
            self.scale_changed = torch.zeros((), dtype=torch.float32, device=grad_scale.device)
        else:
            self.scale_changed.add_((grad_scale != self.first_scale).float())

    def verdict(self) -> tuple[bool, bool]:
        """(inf found, scale changed within the cycle), read with one host synchronisation."""
        changed = self.scale_changed if self.scale_changed is not None else torch.zeros_like(self.found)
        inf, moved = torch.stack([self.found, changed.to(self.found.device)]).tolist()
        return bool(inf), bool(moved)


def unscale_(grads: list[Tensor], scale: Tensor) -> None:
    """Divide gradients by the scaler's scale in place, with the kernel GradScaler.unscale_ uses (the reciprocal
    taken in fp64), so plain gradients come out bit for bit as the scaler's own unscale would leave them."""
    inv_scale = scale.double().reciprocal().float()
    by_device: dict[tuple, list[Tensor]] = defaultdict(list)
    for g in grads:
        by_device[(g.device, g.dtype)].append(g)
    for (device, _), group in by_device.items():
        found = torch.zeros((), dtype=torch.float32, device=device)  # already checked by the scaler
        torch._amp_foreach_non_finite_check_and_unscale_(group, found, inv_scale.to(device))


def carrier_group(template: dict) -> dict:
    """An empty bookkeeping param group for the carriers, with the hyper-parameters of `template` (so code that
    reads a group's lr or betas finds them) and ``"carriers": True``."""
    group = {k: v for k, v in template.items() if k != "params"}
    group.update(params=[], lowrank=False, carriers=True)
    return group
