"""Timing and peak memory of a function, on CPU or GPU, for the labs' speed and memory plots.

Timings take the fastest of several runs after a warm-up (the least disturbed by other work on a
shared machine) and synchronise CUDA so that queued kernels are counted.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch


def _sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str | torch.device = "cpu", repeats: int = 3, warmup: int = 1) -> float:
    """Seconds for one call of ``fn``: the minimum over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


_MALLOC_TUNED = False


def _tune_malloc() -> None:
    """glibc keeps freed blocks of up to 32 MiB for reuse once it has seen such blocks, so later
    allocations no longer show in resident memory. A fixed mmap threshold (64 KiB) turns that off."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def peak_memory(fn: Callable[[], Any], device: str | torch.device = "cpu") -> int | None:
    """Extra bytes ``fn`` needs at its peak, beyond what was allocated before it ran.

    CUDA: PyTorch's own peak counter (exact). CPU: the process's resident memory sampled every
    half millisecond on Linux (large tensors are mapped and unmapped, so they show); ``None`` where
    that cannot be read (macOS, Windows).
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    _tune_malloc()
    base = _rss_bytes()
    if base is None:
        fn()
        return None
    peak = [base]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes() or 0)
            time.sleep(0.0005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        fn()
    finally:
        stop.set()
        watcher.join()
    return max(peak[0], _rss_bytes() or 0) - base
