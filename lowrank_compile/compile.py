"""compile_blocks: torch.compile a wrapped model one block at a time.

One whole-model compiled backward produces every gradient before any gradient hook runs, so updates
inside backward (fused=True) would no longer free gradients early. Compiling each repeated block (each
decoder layer) as its own region keeps the hooks between regions: a block's gradients are consumed as
soon as its backward graph finishes.
"""
from __future__ import annotations

from torch import nn

from .projection import LowRankLinear

__all__ = ["compile_blocks"]


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
