"""How this project measures memory and time: each method once, used by the demo, the tests and tools/.

Memory, four methods, each answering a different question:

- ``peak_rss()`` / ``reset_peak_rss()``: the process's peak resident memory (Linux VmHWM, its mark lowered
  through /proc/self/clear_refs). Everything the process holds counts: tensors, allocator slack, libraries.
  The demo, tools/convergence.py, tools/bench.py on CPU. (On CUDA tools/bench.py reads
  ``torch.cuda.max_memory_allocated``.)
- ``peak_tensor_bytes(fn)``: the peak bytes of torch tensors alive at once while ``fn()`` runs, from
  torch.profiler's memory events; torch.compile keeps running. tools/bench_compile.py.
- ``AllocationTracker``: every new tensor storage, op by op (a TorchDispatchMode), with live and peak bytes;
  eager only (a dispatch mode makes dynamo skip frames). tests/test_memory.py.
- ``state_bytes(opt)``: the bytes of the tensors an optimizer keeps between steps. tools/.

Time: ``timed(fn)`` (seconds of one call), ``median_time(fn, repeats)``, and ``interleaved_medians(fns,
repeats)``, which lets several functions take turns so that a shared machine's drifting load hits them alike.

Only torch and the standard library are imported here.
"""
from __future__ import annotations

import dataclasses
import gc
import resource
import statistics
import sys
import time
import weakref

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["peak_rss", "reset_peak_rss", "peak_tensor_bytes", "Allocation", "AllocationTracker", "state_bytes",
           "storage_bytes", "persistent_bytes",
           "timed", "median_time", "interleaved_medians"]


# -- memory ----------------------------------------------------------------------------------------------------

def peak_rss() -> int:
    """The process's peak resident memory in bytes: since the last reset_peak_rss() on Linux, else ever."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def reset_peak_rss() -> int:
    """Lower the peak-RSS mark to the current RSS (Linux: /proc/self/clear_refs) and return it, in bytes."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return peak_rss()


def peak_tensor_bytes(fn) -> int:
    """Peak bytes of tensors allocated and alive at once while fn() runs, above what existed before.

    Read from torch.profiler's memory events (every allocation and free of torch's allocator), which, unlike
    a TorchDispatchMode tracker, leaves torch.compile running.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@dataclasses.dataclass
class Allocation:
    op: str
    shape: tuple[int, ...]
    numel: int
    nbytes: int
    phase: str


class AllocationTracker(TorchDispatchMode):
    """Records every new tensor allocation and keeps live / peak bytes of the storages it saw allocated.

    An op's output whose storage is not one of its inputs' storages is a new allocation (views and in-place
    results are not). Its storage's bytes count as live until the storage is freed (a weakref callback on the
    storage), which gives the live and peak bytes of all tensors on CPU, where torch keeps no allocator
    statistics. ``peak`` is over the phases other than "forward" (``enter_phase``), so that activations saved
    for backward count and forward's own transients do not; what existed before the tracker is not counted.
    Eager only: a dispatch mode makes dynamo skip frames.
    """

    def __init__(self):
        super().__init__()
        self.allocations: list[Allocation] = []
        self.phase = "forward"
        self.live = 0
        self.peak = 0  # of live bytes, over phases other than "forward"
        self._alive: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in inputs or ptr in self._alive:  # a view or an in-place result: nothing new
                continue
            nbytes = storage.nbytes()
            self.allocations.append(Allocation(str(func), tuple(t.shape), t.numel(), nbytes, self.phase))
            if ptr == 0:  # empty tensor
                continue
            self._alive[ptr] = weakref.ref(storage, self._on_free(ptr, nbytes))
            self.live += nbytes
            if self.phase != "forward":
                self.peak = max(self.peak, self.live)
        return out

    def _on_free(self, ptr: int, nbytes: int):
        def free(_ref):
            self.live -= nbytes
            self._alive.pop(ptr, None)
        return free

    def enter_phase(self, phase: str) -> None:
        self.phase = phase
        self.peak = max(self.peak, self.live)


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (non-tensors, such as None gradients, skipped)."""
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def persistent_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """What lives across steps: parameters, buffers, gradients, optimizer states and lowrank_compile's shared basis
    tables (the starting point an AllocationTracker's peak adds to)."""
    from .basis import basis_matrix
    from .projection import LowRankLinear, basis_dtype

    tensors = list(model.parameters()) + list(model.buffers()) + [p.grad for p in model.parameters()]
    for state in opt.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    for m in model.modules():
        if isinstance(m, LowRankLinear) and m.lowrank_spec.basis != "svd":
            tensors.append(basis_matrix(m.lowrank_spec.basis, m.basis_size, basis_dtype(m.weight.dtype),
                                        m.weight.device))
    return storage_bytes(tensors)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps between steps (its state), quantised codes included."""
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                inner = getattr(v, "__tensor_flatten__", None)
                if inner is not None and type(v) is not torch.Tensor:
                    names, _ = v.__tensor_flatten__()
                    total += sum(getattr(v, n).numel() * getattr(v, n).element_size() for n in names)
                else:
                    total += v.numel() * v.element_size()
    return total


# -- time ------------------------------------------------------------------------------------------------------

def timed(fn) -> float:
    """Seconds one call of fn() takes (wall clock)."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def median_time(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls of fn()."""
    return statistics.median([timed(fn) for _ in range(repeats)])


def interleaved_medians(fns: dict, repeats: int, warmup: int = 2) -> dict:
    """Median seconds per call of each fn, the calls taking turns (one of each per round) after `warmup` calls
    of each, so that drifting load on a shared machine hits every fn alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}
