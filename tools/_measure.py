"""Shared measuring helpers for the benchmarks in tools/: peak live tensor bytes and state sizes."""
from __future__ import annotations

import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile


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


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved_medians(fns: dict, repeats: int, warmup: int = 2) -> dict:
    """Median seconds per call of each fn, the calls taking turns (one of each per round) after `warmup` calls
    of each, so that drifting load on a shared machine hits every fn alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}
