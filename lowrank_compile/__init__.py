"""lowrank_compile: memory-efficient LLM training with SVD-free low-rank Adam (DCT-AdamW, arXiv:2505.17967).

``opt = lowrank_compile.wrap_model(model, rank=128, lr=1e-3)`` rewrites every eligible nn.Linear so its
backward emits the weight gradient already projected onto r columns of a fixed DCT basis, and returns an
optimizer that keeps Adam's states in that rank-r space; ``print(lowrank_compile.summary(opt))`` says what
was projected and at what cost. ``python -m lowrank_compile.demo`` shows it against torch AdamW.
"""
from . import _torchao  # noqa: F401  (first: torchao's import, quietly; registers its state subclasses as safe globals)
from .checkpoint import CheckpointError, load_optimizer, save_optimizer
from .compile import compile_blocks
from . import distributed  # lowrank_compile.distributed: prepare_ddp, prepare_fsdp, sync_refreshes
from .config import LowRankConfig
from .optimizer import LowRankAdamW
from .projection import LowRankLinear
from .summary import summary
from .weights_io import export_weights, load_weights
from .wrap import is_wrapped, unwrap_model, wrap_model

__all__ = ["wrap_model", "unwrap_model", "is_wrapped", "LowRankAdamW", "LowRankConfig", "LowRankLinear",
           "save_optimizer", "load_optimizer", "CheckpointError", "load_weights", "export_weights", "compile_blocks", "summary", "__version__"]
__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it)
