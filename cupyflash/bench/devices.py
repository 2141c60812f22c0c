"""Devices: where a benchmark runs (a CUDA device and one stream, or the CPU with NumPy), and the
inputs of a case drawn there."""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .problem import Case, Variant, alibi_slopes
from .errors import short_error
from .timing import CudaEventTimer, HostTimer


@dataclass
class Inputs:
    """Fresh standard-normal q, k, v and the output gradient dout (never zeros), and the
    variants' keyword arguments for cupyflash and the reference (window_size, softcap,
    alibi_slopes, sinks: only those the case uses)."""
    q: Any
    k: Any
    v: Any
    dout: Any
    scale: float
    variants: dict = field(default_factory=dict)


def variant_kwargs(variant: Variant, heads: int, xp, draw) -> dict:
    """The keyword arguments of ``variant`` (arrays in ``xp``); sinks come from ``draw``."""
    kw: dict[str, Any] = {}
    if tuple(variant.window) != (-1, -1):
        kw["window_size"] = tuple(variant.window)
    if variant.softcap > 0:
        kw["softcap"] = float(variant.softcap)
    if variant.alibi:
        kw["alibi_slopes"] = xp.asarray(alibi_slopes(heads))
    if variant.sinks:
        kw["sinks"] = draw((heads,), dtype=np.float32)
    return kw


class Device:
    """The array module, the stream and the helpers every implementation shares."""

    def __init__(self, xp, *, device_id: int | None = None, stream=None,
                 clock: Callable[[], float] = time.perf_counter):
        self.xp, self.id, self.stream, self.clock = xp, device_id, stream, clock

    @property
    def on_gpu(self) -> bool:
        return self.stream is not None

    @contextlib.contextmanager
    def activate(self):
        """Make this device and its stream current (no-op on the CPU)."""
        if not self.on_gpu:
            yield
            return
        import cupy
        with cupy.cuda.Device(self.id), self.stream:
            yield

    def synchronize(self) -> None:
        if self.on_gpu:
            self.stream.synchronize()

    def timer(self):
        if self.on_gpu:
            return CudaEventTimer(self.stream)
        return HostTimer(clock=self.clock, min_sample_ms=0.0)

    def random_inputs(self, case: Case, seed: int) -> Inputs:
        xp = self.xp
        if self.on_gpu:
            draw = xp.random.RandomState(seed).standard_normal
        else:
            draw = np.random.default_rng(seed).standard_normal
        dtype = case.np_dtype
        q_shape = (case.batch, case.seqlen_q, case.heads, case.head_dim)
        kv_shape = (case.batch, case.seqlen_k, case.heads_kv, case.head_dim)
        arrays = [draw(shape, dtype=np.float32).astype(dtype)
                  for shape in (q_shape, kv_shape, kv_shape, q_shape)]
        return Inputs(*arrays, scale=1.0 / math.sqrt(case.head_dim),
                      variants=variant_kwargs(case.variant, case.heads, xp, draw))

    def measure_peak(self, fn) -> int | None:
        """Bytes allocated from CuPy's pool by one call of fn, at its peak (None on the CPU)."""
        if not self.on_gpu:
            return None
        self.synchronize()
        hook = peak_memory_hook()
        with hook:
            out = fn()
            self.synchronize()
            del out
        return hook.peak

    def free_memory(self) -> None:
        """Give cached blocks back (CuPy's pools, PyTorch's cache) between implementations."""
        if not self.on_gpu:
            return
        self.synchronize()
        import cupy
        cupy.get_default_memory_pool().free_all_blocks()
        cupy.get_default_pinned_memory_pool().free_all_blocks()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            torch.cuda.empty_cache()


def peak_memory_hook():
    """A ``cupy.cuda.MemoryHook`` that tracks the peak of bytes allocated while it is active.

    Only blocks allocated inside the ``with`` count; freeing an older block does not lower
    the running total.
    """
    import cupy

    class PeakMemoryHook(cupy.cuda.MemoryHook):
        name = "cupyflash_bench_peak"

        def __init__(self):
            self.live: dict[int, int] = {}
            self.current = 0
            self.peak = 0

        def malloc_postprocess(self, **kw):
            size = int(kw["mem_size"])
            self.live[int(kw["mem_ptr"])] = size
            self.current += size
            self.peak = max(self.peak, self.current)

        def free_postprocess(self, **kw):
            self.current -= self.live.pop(int(kw["mem_ptr"]), 0)

    return PeakMemoryHook()


def cuda_unavailable_reason() -> str | None:
    """None when CuPy sees a CUDA device, otherwise why not (in words)."""
    try:
        import cupy
    except Exception as e:  # not installed, or its CUDA libraries are missing
        return f"CuPy is not importable ({short_error(e)}); install cupyflash[cuda13] or cupyflash[cuda12]"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return f"CuPy finds no usable CUDA device ({short_error(e)})"
    return None if n > 0 else "CuPy finds no CUDA device (device count is 0)"


def cuda_device(device_id: int = 0) -> Device:
    """The given GPU with a fresh non-blocking stream that every implementation runs on."""
    import cupy
    with cupy.cuda.Device(device_id):
        stream = cupy.cuda.Stream(non_blocking=True)
    return Device(cupy, device_id=device_id, stream=stream)


def cpu_device(clock: Callable[[], float] = time.perf_counter) -> Device:
    """The CPU with NumPy arrays and a host clock (tests pass a fake clock)."""
    return Device(np, clock=clock)
