"""LowRankConfig: every option of wrap_model in one validated dataclass."""
from __future__ import annotations

import dataclasses
import numbers

__all__ = ["LowRankConfig", "BASES", "NORMS", "STATE_POLICIES", "STATE_DTYPES", "DEFAULT_UPDATE_GAP"]

BASES = ("dct", "svd", "random")
NORMS = ("l1", "l2")
STATE_POLICIES = ("match", "keep", "reset")
STATE_DTYPES = ("fp32", "bf16", "int8", "int4", "fp8")
IMPLEMENTED_STATE_DTYPES = STATE_DTYPES  # "int8" | "int4" | "fp8": torchao subclasses (quant.py)

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
    """Options of :func:`lowrank_compile.wrap_model` (see there); validated on construction."""

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
    fused: bool = False
    scale: float = 1.0
    layer_rank: tuple[tuple[str, int | float], ...] = ()
    decay_all: bool = False
    stochastic_round: bool = True

    def __post_init__(self):
        check_rank(self.rank, "rank")
        for pattern, r in self.layer_rank:
            check_rank(r, f"layer_rank[{pattern!r}]")
        if isinstance(self.update_gap, bool) or not isinstance(self.update_gap, numbers.Integral) or self.update_gap < 1:
            raise ValueError(f"update_gap must be an int >= 1, got {self.update_gap!r}; use 1 to refresh the basis "
                             "every step")
        _check_choice("basis", self.basis, BASES)
        _check_choice("norm", self.norm, NORMS)
        _check_choice("state_policy", self.state_policy, STATE_POLICIES)
        _check_choice("state_dtype", self.state_dtype, STATE_DTYPES)
        if self.state_dtype not in IMPLEMENTED_STATE_DTYPES:
            raise NotImplementedError(f"state_dtype={self.state_dtype!r} (torchao-quantised states) is not available "
                                      f"yet; use one of {IMPLEMENTED_STATE_DTYPES}")
        if self.basis == "svd" and self.state_policy == "match":
            raise ValueError("state_policy='match' has no meaning for basis='svd' (its singular vectors are not "
                             "shared between refreshes); use 'keep' or 'reset'")
        if not (isinstance(self.lr, numbers.Real) and self.lr >= 0):
            raise ValueError(f"lr must be a number >= 0, got {self.lr!r}")
        if not (isinstance(self.eps, numbers.Real) and self.eps >= 0):
            raise ValueError(f"eps must be a number >= 0, got {self.eps!r}")
        if not (isinstance(self.weight_decay, numbers.Real) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if len(self.betas) != 2 or not all(isinstance(b, numbers.Real) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if not isinstance(self.stochastic_round, bool):
            raise ValueError(f"stochastic_round must be True or False, got {self.stochastic_round!r}")
        if not isinstance(self.scale, numbers.Real):
            raise ValueError(f"scale must be a number, got {self.scale!r}")


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
