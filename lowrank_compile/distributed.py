"""Data-parallel training of a wrapped model on PyTorch's own engines: DDP and FSDP2 (``fully_shard``).

This module is the public front door; the three jobs live in their own modules:

- ``refresh_sync.py``: the processes agree on every refresh's columns (:class:`RefreshReducer`,
  :func:`sync_refreshes`), and the set-up both engines share.
- ``ddp.py``: :func:`prepare_ddp` (fused updates in a communication hook), :class:`CommCounter`,
  :func:`counting_allreduce_hook`.
- ``fsdp.py``: :func:`prepare_fsdp`, :func:`shard_placement`.

Here: :func:`attach`, which wrap_model calls to set a new optimizer up for the process group it runs in, and
:func:`is_multiprocess`.

What travels between processes
-------------------------------
A projected layer's weight is frozen (requires_grad=False) while wrapped; its rank-r gradient lives in the
``lowrank_grad`` carrier parameter. DistributedDataParallel reduces exactly the registered parameters that
require grad, so for a projected (out, in) layer it all-reduces an (out, r) or (r, in) tensor, not an
(out, in) one. Nothing here changes that: it is why the low-rank method needs no process-group scheme of
its own. What is added is agreement on refreshes: inside backward each process sees only its own
micro-batch, so a :class:`RefreshReducer` makes every process select the same basis columns ("exact": from
the global gradient's scores, summed blockwise; "cheap": the sum of every process's own scores).

``wrap_model`` installs the default reducer by itself when torch.distributed is initialised with more
than one process (``refresh_sync="auto"``). See docs/DISTRIBUTED.md for what is measured and what is not
supported.
"""
from __future__ import annotations

import logging

import torch.distributed as dist

from .dcp import prepare_layer_for_dcp
from .ddp import CommCounter, counting_allreduce_hook, prepare_ddp, refuse_unreduced_updates
from .fsdp import prepare_fsdp, shard_placement
from .refresh_sync import DEFAULT_REFRESH_SYNC, REFRESH_SYNC_MODES, RefreshReducer, sync_refreshes

__all__ = ["REFRESH_SYNC_MODES", "DEFAULT_REFRESH_SYNC", "RefreshReducer", "sync_refreshes", "prepare_ddp",
           "CommCounter", "counting_allreduce_hook", "shard_placement", "prepare_fsdp", "is_multiprocess"]

logger = logging.getLogger(__name__)


def is_multiprocess(group: dist.ProcessGroup | None = None) -> bool:
    """True when torch.distributed is initialised and the group (default: WORLD) has more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def attach(opt, refresh_sync: str = "auto") -> None:
    """Called by wrap_model: set up a freshly made optimizer for the process group it runs in, if any, and for
    torch.distributed.checkpoint (see dcp.py).

    "auto": when torch.distributed is initialised with more than one process, install the default
    reducer. Any mode but "local" in a multi-process job also replaces the in-backward updates of a fused
    optimizer by a guard that raises until :func:`prepare_ddp` takes them over.
    """
    for layer in opt.refresh_control.layers:
        prepare_layer_for_dcp(layer)
    mode = DEFAULT_REFRESH_SYNC if refresh_sync == "auto" else refresh_sync
    multi = is_multiprocess()
    if refresh_sync != "auto" or multi:
        sync_refreshes(opt, mode)
    if multi:
        logger.info("lowrank_compile: %d processes; refreshes select columns %s", dist.get_world_size(),
                    "independently per process" if mode == "local" else f"from agreed scores ({mode!r})")
    if multi and mode != "local" and opt.fused:
        refuse_unreduced_updates(opt)
