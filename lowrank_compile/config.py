"""LowRankConfig: every option of wrap_model in one validated dataclass."""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Callable, Mapping

import torch

__all__ = ["LowRankConfig", "BASES", "NORMS", "STATE_POLICIES", "STATE_DTYPES", "WEIGHT_DTYPES", "REFRESH_SYNC_MODES",
           "DEFAULT_UPDATE_GAP", "check_rank", "resolve_rank"]

BASES = ("dct", "svd", "random")
NORMS = ("l1", "l2")
STATE_POLICIES = ("match", "keep", "reset")
STATE_DTYPES = ("fp32", "bf16", "int8", "int4", "fp8")  # "int8" | "int4" | "fp8": torchao subclasses (quant.py)
# How projected layers' weights are stored: None keeps the model's own dtype; "int8": block-wise int8 codes and
# fp32 scales (int8_weights.py)
WEIGHT_DTYPES = (None, "int8")
# dtypes the refresh's score products may run in (score_dtype); torch.float32 ranks as the reference does
SCORE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# How the processes of a data-parallel job agree on a refresh (lowrank_compile.distributed); "auto" picks.
REFRESH_SYNC_MODES = ("exact", "cheap", "local")

# Refresh every step, as the paper does. Measured (docs/BENCHMARKS.md, tools/convergence.py: LLaMA hidden 128 on
# the bundled corpus, rank 32, each at its best lr), held-out loss: gap 1 2.275, gap 10 2.334, gap 50 2.385,
# gap 200 2.367 (AdamW 2.246): only gap 1 stays within 3% of AdamW. Its cost (tools/bench.py, 78M LLaMA, batch
# 4 x 256, CPU): 0.95-1.06x AdamW's step with exact scores since the one-pass refresh (1.24x before).
DEFAULT_UPDATE_GAP = 1
# "match" is what the reference's rotate_subspace=True intends: states follow their basis columns. Measured at
# gap 1 (same setup as above): match 2.275, reset 2.360, keep 2.430.
DEFAULT_STATE_POLICY = "match"


@dataclasses.dataclass(frozen=True)
class LowRankConfig:
    """Every option of :func:`lowrank_compile.wrap_model` (see there for what each means), defined, defaulted and
    validated here once. wrap_model builds one and hands it to the optimizer (``opt.config``); checkpoints record
    it. Adding an option is a field here, its check in __post_init__, and the code that uses it."""

    rank: int | float = 128
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    update_gap: int = DEFAULT_UPDATE_GAP
    basis: str = "dct"
    norm: str = "l1"
    state_policy: str = DEFAULT_STATE_POLICY
    state_dtype: str = "fp32"
    filter_fn: Callable | None = dataclasses.field(default=None, compare=False, metadata={"saved": False})
    fused: bool = False
    scale: float = 1.0
    layer_rank: tuple[tuple[str, int | float], ...] = ()
    decay_all: bool = False
    accumulate: int = 1
    compile_step: bool | None = None
    sketch_rows: int = 0
    seed: int = 0
    clip_per_tensor: float | None = None
    stochastic_round: bool = True
    refresh_sync: str = "auto"
    stagger: bool = False
    score_dtype: torch.dtype | None = dataclasses.field(default=None, metadata={"saved": False})
    weight_dtype: str | None = None

    def __post_init__(self):
        # normalise the forms wrap_model accepts: a betas list, a layer_rank mapping
        if isinstance(self.layer_rank, Mapping):
            object.__setattr__(self, "layer_rank", tuple(self.layer_rank.items()))
        elif self.layer_rank is None:
            object.__setattr__(self, "layer_rank", ())
        if isinstance(self.betas, list):
            object.__setattr__(self, "betas", tuple(self.betas))
        check_rank(self.rank, "rank")
        for pattern, r in self.layer_rank:
            check_rank(r, f"layer_rank[{pattern!r}]")
        _check_int("update_gap", self.update_gap, 1, "use 1 to refresh the basis every step")
        _check_int("accumulate", self.accumulate, 1, "micro-batches per step")
        _check_int("sketch_rows", self.sketch_rows, 0, "0: exact scores")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        _check_choice("basis", self.basis, BASES)
        _check_choice("norm", self.norm, NORMS)
        _check_choice("state_policy", self.state_policy, STATE_POLICIES)
        _check_choice("state_dtype", self.state_dtype, STATE_DTYPES)
        if self.refresh_sync != "auto" and self.refresh_sync not in REFRESH_SYNC_MODES:
            raise ValueError(f"refresh_sync must be 'auto' or one of {REFRESH_SYNC_MODES}, got {self.refresh_sync!r}; "
                             "'auto' agrees on refreshes whenever torch.distributed runs more than one process")
        if self.basis == "svd" and self.state_policy == "match":
            raise ValueError("state_policy='match' has no meaning for basis='svd' (its singular vectors are not "
                             "shared between refreshes); use 'keep' or 'reset'")
        if self.sketch_rows and self.basis == "svd":
            raise ValueError("sketch_rows applies to basis='dct' or 'random'; basis='svd' takes an SVD of the full "
                             "gradient")
        for name in ("lr", "eps", "weight_decay"):
            value = getattr(self, name)
            if not (_is_number(value) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (isinstance(self.betas, tuple) and len(self.betas) == 2
                and all(_is_number(b) and 0 <= b < 1 for b in self.betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        for name in ("stochastic_round", "fused", "decay_all", "stagger"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.compile_step not in (None, True, False):
            raise ValueError(f"compile_step must be None, True or False, got {self.compile_step!r}")
        if not (_is_number(self.scale) and math.isfinite(self.scale)):
            raise ValueError(f"scale must be a finite number, got {self.scale!r}")
        if self.clip_per_tensor is not None and not (
                _is_number(self.clip_per_tensor) and math.isfinite(self.clip_per_tensor) and self.clip_per_tensor > 0):
            raise ValueError(f"clip_per_tensor must be a finite number > 0 or None, got {self.clip_per_tensor!r}")
        if self.score_dtype not in (None,) + SCORE_DTYPES:
            raise ValueError(f"score_dtype must be None (each layer's compute dtype) or one of {SCORE_DTYPES}, got "
                             f"{self.score_dtype!r}")
        if self.weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"weight_dtype must be None (the model's own dtype) or 'int8' (block-wise int8 codes for "
                             f"the projected layers' weights), got {self.weight_dtype!r}")
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise ValueError(f"filter_fn must be a callable (module, fqn) -> bool or None, got {self.filter_fn!r}")

    def saved_items(self) -> dict:
        """The options a checkpoint records (everything but callables such as filter_fn)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("saved", True)}


def check_rank(rank, what: str) -> None:
    if isinstance(rank, bool):
        raise ValueError(f"{what} must be an int >= 1 or a float in (0, 1], got {rank!r}")
    if isinstance(rank, numbers.Integral):
        if rank < 1:
            raise ValueError(f"{what} must be >= 1, got {rank}; pass an int rank such as 128, or a fraction such "
                             "as 0.25 of each layer's smaller side")
        return
    if isinstance(rank, numbers.Real):
        if not 0 < rank <= 1:
            raise ValueError(f"{what} as a fraction must lie in (0, 1], got {rank!r}; pass an int for an absolute rank")
        return
    raise ValueError(f"{what} must be an int >= 1 or a float in (0, 1], got {rank!r}")


def resolve_rank(rank: int | float, basis_size: int) -> int:
    """The integer rank r for a layer whose projected (smaller) side is basis_size."""
    if isinstance(rank, numbers.Integral):
        return int(rank)
    return max(1, round(rank * basis_size))


def _check_choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(map(repr, allowed))}")


def _is_number(value) -> bool:
    """A real number that is not a bool (True is an int to Python, never a learning rate to a user)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_int(name: str, value, low: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r} ({hint})")
