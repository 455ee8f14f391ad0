"""Shared fixtures: a small float64 MLP with every kind of parameter, and fixed random batches."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn


class TinyMLP(nn.Module):
    """up: 24 -> 40 (out >= in: right projection); down: 40 -> 24 (out < in: left); small: 24 -> 3 (plain).

    With `late` set, a second right-projected layer and a free vector join the forward only when asked to,
    so that parameters start stepping at different global steps.
    """

    def __init__(self, late: bool = False):
        super().__init__()
        self.up = nn.Linear(24, 40)
        self.norm = nn.LayerNorm(40)
        self.down = nn.Linear(40, 24, bias=False)
        self.small = nn.Linear(24, 3)
        if late:
            self.late = nn.Linear(24, 40, bias=False)
            self.late_shift = nn.Parameter(torch.randn(24) * 0.1)

    def forward(self, x, use_late: bool = False, use_shift: bool = False):
        h = self.up(x)
        if use_late:
            h = h + self.late(x)
        h = self.down(F.gelu(self.norm(h)))
        if use_shift:
            h = h + self.late_shift
        return self.small(h)


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread (tiny shapes: threads only add overhead, worse on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_mlp():
    """Factory: a seeded float64 TinyMLP (same weights for the same arguments)."""

    def make(late: bool = False, seed: int = 0) -> TinyMLP:
        torch.manual_seed(seed)
        return TinyMLP(late).double()

    return make


@pytest.fixture
def batches():
    """Factory: n fixed (x, target) pairs of 2 x 3 tokens for TinyMLP, float64."""

    def make(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed)
        return [(torch.randn(2, 3, 24, generator=g, dtype=torch.float64),
                 torch.randn(2, 3, 3, generator=g, dtype=torch.float64)) for _ in range(n)]

    return make
