"""Everything torch.compile: the compiled update functions, dynamo's recompile limit, compile_blocks.

- :func:`compiled` gives the one compiled version of an update function (update.py): fullgraph, static
  shapes, one graph per call signature (shape group, refresh or ordinary step). Its recompile limit is raised
  to what the optimizers that use it need, only for the duration of its own calls, and put back after.
- :func:`compile_blocks` compiles a wrapped model one block at a time. One whole-model compiled backward
  produces every gradient before any gradient hook runs, so updates inside backward (fused=True) would no
  longer free gradients early; compiling each repeated block (each decoder layer) as its own region keeps the
  hooks between regions: a block's gradients are consumed as soon as its backward graph finishes.

Every ``torch.compiler.is_compiling()`` branch in the package, and why it exists:

- projection.py, ``_ProjectedLinearFn.forward``: eager keeps the index buffer idx out of saved_tensors and
  remembers its version, so a layer called twice in one forward selects once per step; traced, version
  counters are not visible, so idx is saved as a tensor (a compiled block calls each layer once).
- basis.py, ``_fft_plan``: eager caches the FFT plan's index and twiddle tensors in a dict; traced, the plan is
  built inline (a few small ops), so no graph reads tensors from a global cache.
- basis.py, ``dct_rows_fft``: the CPU transform runs in row chunks only eagerly (a Python loop that keeps each
  chunk in cache); traced, inductor fuses the passes itself and a loop would only unroll.
- refresh_sync.py, ``RefreshReducer._all_reduce``: traced, the all-reduce is a blocking collective (dynamo
  has no async_op) and the byte counter, a Python int, is not updated.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from .projection import LowRankLinear

__all__ = ["compile_blocks", "compiled", "CompiledUpdate"]

# dynamo's own default per-function recompile limit; a compiled update asks for more only when it needs it
_DYNAMO_DEFAULT_LIMIT = 8


class CompiledUpdate:
    """An update function compiled once (fullgraph, static shapes), called with dynamo's per-function recompile
    limit raised to the number of graphs it may need and restored afterwards, so the raise is scoped to this
    function's calls instead of set for the whole process."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self._compiled = torch.compile(fn, fullgraph=True, dynamic=False)
        self.graphs = _DYNAMO_DEFAULT_LIMIT

    def allow(self, graphs: int) -> None:
        """Let this function keep up to `graphs` compiled graphs (one per shape group and step kind)."""
        self.graphs = max(self.graphs, graphs)

    def __call__(self, *args, **kwargs):
        import torch._dynamo

        config = torch._dynamo.config
        old = config.recompile_limit
        if old >= self.graphs:
            return self._compiled(*args, **kwargs)
        config.recompile_limit = self.graphs
        try:
            return self._compiled(*args, **kwargs)
        finally:
            config.recompile_limit = old


@functools.cache
def compiled(fn: Callable) -> CompiledUpdate:
    """The one compiled version of update function `fn`, shared by every optimizer in the process."""
    return CompiledUpdate(fn)


def compile_blocks(model: nn.Module, **compile_kwargs) -> list[str]:
    """Compile, in place, every block that holds wrapped layers; returns the blocks' names.

    Blocks are the entries of the model's nn.ModuleLists (decoder layers of transformers models, or any
    user stack) that contain a LowRankLinear; a model with no such list has each LowRankLinear's direct
    parent compiled instead. compile_kwargs go to ``nn.Module.compile`` (default fullgraph=True).

    Example::

        opt = lowrank_compile.wrap_model(model, rank=64, fused=True)
        lowrank_compile.compile_blocks(model)
    """
    compile_kwargs.setdefault("fullgraph", True)
    blocks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            blocks += [(f"{name}.{i}", child) for i, child in enumerate(module) if _holds_wrapped(child)]
    if not blocks:
        parents = {}
        for name, module in model.named_modules():
            for child_name, child in module.named_children():
                if isinstance(child, LowRankLinear):
                    parents[id(module)] = (name, module)
        blocks = list(parents.values())
    if not blocks:
        raise ValueError("compile_blocks found no wrapped layer: call lowrank_compile.wrap_model(model) first")
    for _, block in blocks:
        block.compile(**compile_kwargs)
    return [name for name, _ in blocks]


def _holds_wrapped(module: nn.Module) -> bool:
    return any(isinstance(m, LowRankLinear) for m in module.modules())
