"""Timers: fn is called warmup times, then repeats times; each returns times in ms (CUDA events
on one stream, or a host clock for work on another stream)."""
from __future__ import annotations

import math
import time
from typing import Any, Callable


def _capped_repeats(estimate_ms: float | None, repeats: int, max_seconds: float | None,
                    min_repeats: int = 3) -> int:
    """Fewer repeats when repeats * one call would exceed max_seconds (never below min_repeats)."""
    if not max_seconds or not estimate_ms or estimate_ms <= 0:
        return repeats
    fit = int(max_seconds * 1e3 / estimate_ms)
    return max(min(repeats, min_repeats), min(repeats, fit))


def _capped_warmup(estimate_ms: float | None, warmup: int, max_seconds: float | None) -> int:
    """Fewer further warm-up calls when they would take more than a quarter of max_seconds."""
    if not max_seconds or not estimate_ms or estimate_ms <= 0:
        return warmup
    return min(warmup, int(0.25 * max_seconds * 1e3 / estimate_ms))


class CudaEventTimer:
    """CUDA events recorded on ``stream`` around each call; one host sync at the end."""
    name = "cuda-events"

    def __init__(self, stream):
        self.stream = stream

    def _elapsed(self, fn, n: int) -> list[float]:
        import cupy
        starts = [cupy.cuda.Event() for _ in range(n)]
        ends = [cupy.cuda.Event() for _ in range(n)]
        for start, end in zip(starts, ends):
            start.record(self.stream)
            fn()
            end.record(self.stream)
        ends[-1].synchronize()
        return [cupy.cuda.get_elapsed_time(s, e) for s, e in zip(starts, ends)]

    def __call__(self, fn, warmup: int, repeats: int, max_seconds: float | None = None) -> list[float]:
        estimate = None
        if warmup:  # the first warm-up call is timed to size the rest
            estimate = self._elapsed(fn, 1)[0]
            for _ in range(_capped_warmup(estimate, warmup - 1, max_seconds)):
                fn()
        self.stream.synchronize()
        return self._elapsed(fn, _capped_repeats(estimate, repeats, max_seconds))


class HostTimer:
    """Wall clock around each sample, synchronising before and after.

    ``sync(result)`` waits for a call's work (JAX: ``block_until_ready``); ``before()``
    drains earlier work. A sample is ``inner`` back-to-back calls (enough to last
    ``min_sample_ms``) so that launch overhead is amortised; its time is divided by ``inner``.
    """
    name = "host-clock"

    def __init__(self, sync: Callable[[Any], Any] = lambda out: out,
                 before: Callable[[], Any] = lambda: None,
                 clock: Callable[[], float] = time.perf_counter, min_sample_ms: float = 5.0):
        self.sync, self.before, self.clock, self.min_sample_ms = sync, before, clock, min_sample_ms
        self.inner = 1

    def _sample(self, fn, inner: int) -> float:
        t0 = self.clock()
        out = None
        for _ in range(inner):
            out = fn()
        self.sync(out)
        return (self.clock() - t0) * 1e3 / inner

    def __call__(self, fn, warmup: int, repeats: int, max_seconds: float | None = None) -> list[float]:
        self.before()
        estimate = None
        if warmup:  # the first warm-up call is timed to size the rest
            estimate = self._sample(fn, 1)
            for _ in range(_capped_warmup(estimate, warmup - 1, max_seconds)):
                self._sample(fn, 1)
        self.inner = 1
        if estimate and self.min_sample_ms > 0:
            self.inner = max(1, min(100, math.ceil(self.min_sample_ms / max(estimate, 1e-6))))
        n = _capped_repeats(estimate and estimate * self.inner, repeats, max_seconds)
        return [self._sample(fn, self.inner) for _ in range(n)]
