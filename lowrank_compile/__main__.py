"""``python -m lowrank_compile``: the version, and where to start."""
from __future__ import annotations

import sys

from . import __version__

_TEXT = f"""lowrank_compile {__version__}: DCT-AdamW, low-rank Adam states and rank-r weight gradients for torch models

  python -m lowrank_compile.demo                      train a wide LLaMA on the bundled texts with torch AdamW
                                                      and with lowrank_compile: memory, state, speed, loss
  python -m lowrank_compile.inspect opt.safetensors   what an optimizer checkpoint holds, against AdamW

  import lowrank_compile as lrc
  opt = lrc.wrap_model(model, rank=128, lr=1e-3)       then train as usual; print(lrc.summary(opt))
"""


def main() -> int:
    sys.stdout.write(_TEXT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
