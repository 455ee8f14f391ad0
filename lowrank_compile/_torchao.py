"""A quiet import of torchao's optimizer-state subclasses.

On a CPU build, ``import torchao`` logs "Failed to load ... _C_mxfp8 / _C_cutlass_90a" for its CUDA-only
extensions and torch's pytree logs a register_constant deprecation warning (torch 2.13, torchao 0.18).
That is noise to a user of lowrank_compile, so it is captured here, only around this import, and replayed
at debug level on this module's logger. Real failures are not hidden: an ImportError is kept, with the
captured output attached, and raised by :func:`require` when a quantised ``state_dtype`` is asked for;
any other exception propagates at once, with the captured output added as a note.

Importing the subclasses also registers them with ``torch.serialization.add_safe_globals`` (torchao does
that at import), so ``torch.load(..., weights_only=True)`` reads an ``opt.state_dict()`` holding quantised
states in any process that has imported lowrank_compile.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings

__all__ = ["OptimState8bit", "OptimState4bit", "OptimStateFp8", "import_error", "require", "torchao_version"]

logger = logging.getLogger(__name__)

# Loggers whose records during torchao's import are noise: torchao's own (its children propagate to it) and
# the torch pytree logger that warns about torchao's register_constant calls.
_NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _captured():
    """Collect log records of the noisy loggers, warnings and Python-level prints; yield a list of lines."""
    lines: list[str] = []
    handler = _Capture()
    saved = []
    for name in _NOISY_LOGGERS:
        lg = logging.getLogger(name)
        saved.append((lg, lg.propagate, lg.handlers[:]))
        lg.handlers = [handler]
        lg.propagate = False
    out, err = io.StringIO(), io.StringIO()
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            warnings.simplefilter("always")
            yield lines
    finally:
        for lg, propagate, handlers in saved:
            lg.handlers = handlers
            lg.propagate = propagate
        lines.extend(f"{r.name}: {r.getMessage()}" for r in handler.records)
        lines.extend(f"{w.category.__name__}: {w.message}" for w in caught)
        lines.extend(s for s in (out.getvalue() + err.getvalue()).splitlines() if s.strip())


OptimState8bit = OptimState4bit = OptimStateFp8 = None
torchao_version: str | None = None
import_error: ImportError | None = None

_failure: BaseException | None = None
with _captured() as _lines:
    try:
        import torchao
        from torchao.optim.subclass_4bit import OptimState4bit
        from torchao.optim.subclass_8bit import OptimState8bit
        from torchao.optim.subclass_fp8 import OptimStateFp8

        torchao_version = getattr(torchao, "__version__", "unknown")
    except ImportError as e:  # kept and raised by require(): fp32/bf16 states do not need torchao
        import_error = e
    except Exception as e:  # a broken install: raised below, once the captured output is known
        _failure = e
if _failure is not None:
    if hasattr(_failure, "add_note"):
        _failure.add_note("output captured while importing torchao:\n" + "\n".join(_lines))
    raise _failure
for _line in _lines:
    logger.debug("torchao import: %s", _line)
_captured_lines = tuple(_lines)
del _lines


def require(what: str) -> None:
    """Raise a RuntimeError naming `what` if torchao's optimizer-state subclasses could not be imported."""
    if import_error is None:
        return
    captured = "\n".join(_captured_lines)
    raise RuntimeError(f"{what} needs torchao's optimizer-state subclasses (torchao.optim), whose import failed: "
                       f"{import_error!r}. Install a torchao matching torch (pip install torchao), or use "
                       f"state_dtype='fp32' or 'bf16'." + (f"\nOutput of the failed import:\n{captured}"
                                                            if captured else "")) from import_error
