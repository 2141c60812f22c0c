"""Benchmark machinery: cupyflash beside the peers a user would otherwise pick.

Shared by the ``cupyflash bench`` / ``check`` commands and ``bench/run_peers.py``:

- the problem (:class:`Case`) and the FLOP convention (:func:`attention_flops`);
- the variants a case asks for (:class:`Variant`: grouped-query attention, sliding window,
  softcap, ALiBi, sinks), passed to cupyflash, the reference and the peers that can do them
  (the others are skipped with the reason);
- the implementations: ``cupyflash`` and the peers ``naive`` (materialised attention in
  CuPy), ``torch-flash`` / ``torch-cudnn`` (PyTorch SDPA backends), ``jax-cudnn``
  (``jax.nn.dot_product_attention``) and ``fa4`` (FlashAttention-4, ``flash_attn.cute``).
  PyTorch, JAX and FA4 are imported only inside the peer that needs them, and only when
  that peer is asked for;
- timing (CUDA events on one stream; a host clock for JAX, which runs on its own stream),
  peak extra device memory, and the correctness gate that refuses to time a wrong result;
- the result schema and its JSON / CSV / table / plot writers.

Everything above the device layer runs on NumPy arrays too (:func:`cpu_device`, with an
injectable clock), so the machinery is tested on the CPU.
"""
from __future__ import annotations

import contextlib
import csv
import datetime
import functools
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ._dtypes import BFLOAT16, FLOAT16, FLOAT32, FLOAT64, dtype_name

# ---------------------------------------------------------------------------------------
# The problem and the FLOP convention

MODES = ("fwd", "bwd", "fwd+bwd")
#: FLOPs of each mode as a multiple of the forward pass (flash-attn's convention)
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
FLOP_CONVENTION = ("FLOPs = 4*B*H*Sq*Sk*D forward, x2.5 backward, x3.5 fwd+bwd, "
                   "halved when causal; with a sliding window Sq*Sk is the number of visible "
                   "(query, key) pairs")
#: default sizes (flash-attn benchmark convention): batch*seqlen tokens, heads*head_dim
DEFAULT_TOKENS = 16384
DEFAULT_HIDDEN = 2048
DEFAULT_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)

DTYPES = {"bfloat16": BFLOAT16, "float16": FLOAT16, "float32": FLOAT32, "float64": FLOAT64}


def attention_flops(batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int,
                    causal: bool = False, mode: str = "fwd", window_size=(-1, -1)) -> float:
    """FLOPs of one attention call: 4*B*H*Sq*Sk*D forward (two matmuls), x2.5 backward,
    x3.5 forward+backward, halved when causal. With a sliding window, Sq*Sk becomes the
    number of visible (query, key) pairs (causal folded in as right = 0)."""
    per_pair = 4.0 * batch * heads * head_dim * MODE_FLOP_FACTOR[mode]
    if tuple(window_size) == (-1, -1):
        return per_pair * seqlen_q * seqlen_k / (2 if causal else 1)
    return per_pair * visible_pairs(seqlen_q, seqlen_k, causal, window_size)


def visible_pairs(seqlen_q: int, seqlen_k: int, causal: bool, window_size) -> int:
    """How many (query, key) pairs the mask lets through: row i sees keys
    i + o - left .. i + o + right, o = seqlen_k - seqlen_q (bottom-right aligned; -1 unbounded)."""
    left, right = window_size
    right = 0 if causal else right
    diag = np.arange(seqlen_q) + (seqlen_k - seqlen_q)
    first = np.maximum(diag - left, 0) if left >= 0 else np.zeros_like(diag)
    last = np.minimum(diag + right, seqlen_k - 1) if right >= 0 else np.full_like(diag, seqlen_k - 1)
    return int(np.maximum(last - first + 1, 0).sum())


def alibi_slopes(heads: int) -> np.ndarray:
    """The standard geometric ALiBi slopes 2^(-8 (h + 1) / H), float32 (H,)."""
    return (2.0 ** (-8.0 * (np.arange(heads) + 1) / heads)).astype(np.float32)


VARIANTS = ("gqa", "window", "softcap", "alibi", "sinks")


@dataclass(frozen=True)
class Variant:
    """The attention variants a case asks for beyond plain (causal) attention."""
    kv_heads: int | None = None        # grouped-query attention; None: as many as the query heads
    window: tuple[int, int] = (-1, -1)  # sliding window (left, right), -1 unbounded
    softcap: float = 0.0               # 0: off
    alibi: bool = False                # ALiBi with alibi_slopes(heads)
    sinks: bool = False                # random float32 sink logits, one per query head

    def features(self, heads: int) -> tuple[str, ...]:
        """The VARIANTS in use with ``heads`` query heads."""
        used = (self.kv_heads not in (None, heads), tuple(self.window) != (-1, -1), self.softcap > 0,
                self.alibi, self.sinks)
        return tuple(name for name, on in zip(VARIANTS, used) if on)

    def describe(self, heads: int) -> str:
        """'' for plain attention, else e.g. 'kv_heads=2 window=8,0 softcap=5 alibi sinks'."""
        text = {"gqa": f"kv_heads={self.kv_heads}", "window": "window={},{}".format(*self.window),
                "softcap": f"softcap={self.softcap:g}", "alibi": "alibi", "sinks": "sinks"}
        return " ".join(text[f] for f in self.features(heads))


def default_shape(seqlen: int, head_dim: int, tokens: int = DEFAULT_TOKENS,
                  hidden: int = DEFAULT_HIDDEN) -> tuple[int, int]:
    """(batch, heads) with batch*seqlen = tokens and heads*head_dim = hidden (at least 1 each)."""
    return max(1, tokens // seqlen), max(1, hidden // head_dim)


@dataclass(frozen=True)
class Case:
    """One configuration to run: sizes in cupyflash's (batch, seqlen, heads, head_dim) layout."""
    batch: int
    heads: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    dtype: str
    causal: bool
    mode: str
    variant: Variant = Variant()

    @property
    def flops(self) -> float:
        return attention_flops(self.batch, self.heads, self.seqlen_q, self.seqlen_k,
                               self.head_dim, self.causal, self.mode, self.variant.window)

    @property
    def heads_kv(self) -> int:
        return self.variant.kv_heads or self.heads

    @property
    def features(self) -> tuple[str, ...]:
        return self.variant.features(self.heads)

    @property
    def variant_text(self) -> str:
        return self.variant.describe(self.heads)

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    def label(self) -> str:
        seq = (f"{self.seqlen_q}" if self.seqlen_q == self.seqlen_k
               else f"{self.seqlen_q}x{self.seqlen_k}")
        return " ".join(filter(None, [f"{self.mode} {self.dtype} B={self.batch} H={self.heads} S={seq} "
                                      f"D={self.head_dim}{' causal' if self.causal else ''}", self.variant_text]))


def make_cases(seqlens: Sequence[int], head_dims: Sequence[int], dtypes: Sequence[str],
               causals: Sequence[bool], modes: Sequence[str], *, batch: int | None = None,
               heads: int | None = None, seqlen_k: int | None = None,
               variant: Variant = Variant()) -> list[Case]:
    """The sweep, seqlen innermost. batch/heads default to :func:`default_shape`; every case
    gets ``variant``."""
    cases = []
    for dtype in dtypes:
        for mode in modes:
            for head_dim in head_dims:
                for causal in causals:
                    for s in seqlens:
                        b, h = default_shape(s, head_dim)
                        cases.append(Case(batch or b, heads or h, s, seqlen_k or s, head_dim,
                                          dtype, bool(causal), mode, variant))
    return cases


def parse_int_list(text: str) -> list[int]:
    """Parse "1024", "512,1024", "512:16384" (doubling) or "512:4096:512" (step).

    Raises ValueError with the rule on anything else, on non-positive values and on
    empty ranges.
    """
    values: list[int] = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            raise ValueError(f"empty item in {text!r}")
        fields = part.split(":")
        try:
            nums = [int(f) for f in fields]
        except ValueError:
            raise ValueError(f"{part!r} is not N, START:STOP (doubling) or START:STOP:STEP") from None
        if len(nums) > 3:
            raise ValueError(f"{part!r} has more than three fields; use START:STOP or START:STOP:STEP")
        if any(n <= 0 for n in nums):
            raise ValueError(f"{part!r}: values must be positive integers")
        if len(nums) == 1:
            values.append(nums[0])
            continue
        start, stop = nums[0], nums[1]
        if stop < start:
            raise ValueError(f"{part!r}: STOP must be >= START")
        if len(nums) == 2:
            n = start
            while n <= stop:
                values.append(n)
                n *= 2
        else:
            values.extend(range(start, stop + 1, nums[2]))
    return sorted(set(values))


# ---------------------------------------------------------------------------------------
# The result schema

RESULT_FIELDS = ("impl", "mode", "dtype", "batch", "heads", "seqlen_q", "seqlen_k", "head_dim",
                 "causal", "variant", "ms_median", "ms_min", "ms_max", "tflops", "peak_extra_mb",
                 "repeats", "timer", "status", "note")
STATUSES = ("ok", "skipped", "failed", "oom")
SCHEMA = "cupyflash-bench/2"  # /1 had no "variant" (its rows read as plain attention)
DOCUMENT_FIELDS = ("schema", "gpu", "versions", "date", "command", "settings", "results")


@dataclass
class Result:
    """One row: one implementation on one case. Times in milliseconds; None when not timed."""
    impl: str
    mode: str
    dtype: str
    batch: int
    heads: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    causal: bool
    variant: str = ""  # Variant.describe: '' for plain attention
    ms_median: float | None = None
    ms_min: float | None = None
    ms_max: float | None = None
    tflops: float | None = None
    peak_extra_mb: float | None = None
    repeats: int = 0
    timer: str = ""
    status: str = "ok"
    note: str = ""

    @classmethod
    def of(cls, case: Case, impl: str, status: str, note: str = "", **kw) -> "Result":
        return cls(impl, case.mode, case.dtype, case.batch, case.heads, case.seqlen_q,
                   case.seqlen_k, case.head_dim, case.causal, case.variant_text, status=status,
                   note=note, **kw)

    @classmethod
    def timed(cls, case: Case, impl: str, times_ms: Sequence[float], timer: str,
              peak_bytes: int | None, note: str = "") -> "Result":
        med = statistics.median(times_ms)
        return cls.of(case, impl, "ok", note, ms_median=med, ms_min=min(times_ms),
                      ms_max=max(times_ms), tflops=case.flops / (med * 1e-3) / 1e12,
                      peak_extra_mb=None if peak_bytes is None else peak_bytes / 2**20,
                      repeats=len(times_ms), timer=timer)

    @property
    def case_key(self) -> tuple:
        return (self.mode, self.dtype, self.batch, self.heads, self.seqlen_q, self.seqlen_k,
                self.head_dim, self.causal, self.variant)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------
# Timers: fn is called warmup times, then repeats times; each returns times in ms.

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


# ---------------------------------------------------------------------------------------
# Errors we turn into rows rather than tracebacks

class Unsupported(Exception):
    """This implementation cannot run this case (the row is 'skipped' with the reason)."""


def is_out_of_memory(exc: BaseException) -> bool:
    """CuPy's and PyTorch's OutOfMemoryError, NumPy's MemoryError, XLA's RESOURCE_EXHAUSTED."""
    if isinstance(exc, MemoryError):
        return True
    if any(cls.__name__ == "OutOfMemoryError" for cls in type(exc).__mro__):
        return True
    text = str(exc)
    return ("out of memory" in text.lower() or "RESOURCE_EXHAUSTED" in text
            or "cudaErrorMemoryAllocation" in text)


def short_error(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()
    msg = f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
    return msg if len(msg) <= limit else msg[:limit - 3] + "..."


# ---------------------------------------------------------------------------------------
# Devices: where a benchmark runs (CUDA device + one stream, or the CPU with numpy)

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


# ---------------------------------------------------------------------------------------
# The correctness gate: cupyflash against the float64 reference, bounded by naive attention

#: an absolute floor, times max(1, max|ref|), for dtypes where the 2x-naive bound is ~0
ATOL_FLOOR = {"float64": 1e-12, "float32": 1e-5, "float16": 0.0, "bfloat16": 0.0}


@dataclass
class Check:
    """One tensor's check: max |actual - reference| against its bound."""
    tensor: str
    max_err: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.max_err <= self.bound

    def text(self) -> str:
        return f"{self.tensor} max err {self.max_err:.2e} {'<=' if self.ok else '>'} bound {self.bound:.2e}"


def _max_err(xp, actual, ref) -> float:
    """max |actual - ref| in float64; equal infinities count 0, NaN counts inf."""
    a = actual.astype(np.float64)
    with np.errstate(invalid="ignore"):  # inf - inf where both are -inf (masked lse)
        diff = xp.abs(a - ref)
    diff = xp.where(a == ref, 0.0, diff)
    diff = xp.where(xp.isnan(diff), xp.inf, diff)
    return float(diff.max()) if diff.size else 0.0


def _rounding_atol(xp, ref, dtype) -> float:
    """flash-attn's atol: twice the rounding error of the dtype at the reference's values + 0.3."""
    finite = xp.isfinite(ref)
    r = xp.where(finite, ref, 0.0)
    shifted = r + 0.3
    if np.dtype(dtype).itemsize < 4:  # to 16 bits by way of float32, the conversion every backend has
        shifted = shifted.astype(np.float32)
    err = xp.abs(shifted.astype(dtype).astype(np.float64) - 0.3 - r)
    return 2.0 * float(err.max()) if err.size else 0.0


def _amax(xp, ref) -> float:
    r = xp.abs(xp.where(xp.isfinite(ref), ref, 0.0))
    return float(r.max()) if r.size else 0.0


#: largest score matrix (seqlen_q x seqlen_k, one head) the float64 reference materialises:
#: 2 GiB in float64; 16384 x 16384 fits, longer problems check their last query rows only
MAX_REFERENCE_SCORES = 2**28


def _slices(batch: int, heads: int, heads_kv: int, max_batch: int | None, max_heads: int | None):
    """(batch, query heads, their kv head) index triples to check one by one: the first
    ``max_batch`` batch elements (together when that is all of them), and the first kv heads,
    each with its group of query heads, up to ``max_heads`` query heads (at least one group).
    Everything at once when both are None."""
    if max_batch is None and max_heads is None:
        yield slice(None), slice(None), slice(None)
        return
    group = heads // heads_kv
    nb = batch if max_batch is None else min(max_batch, batch)
    nkv = heads_kv if max_heads is None else min(heads_kv, max(1, max_heads // group))
    for b in [slice(None)] if nb == batch else [slice(b, b + 1) for b in range(nb)]:
        for g in range(nkv):
            yield b, slice(g * group, (g + 1) * group), slice(g, g + 1)


def _query_rows(seqlen_q: int, seqlen_k: int, heads: int = 1) -> slice:
    """The query rows to check: all, or the last ones when the score matrix of ``heads``
    heads is too large.

    Taking the *last* rows keeps the bottom-right alignment of the causal mask, the window
    and ALiBi (row i of the slice is row seqlen_q - m + i of the problem, and
    seqlen_k - m + i == i + seqlen_k - seqlen_q). out, lse and dq of a row depend only on
    that row's q and dout, so they stay exact.
    """
    m = max(1, MAX_REFERENCE_SCORES // max(seqlen_k * heads, 1))
    return slice(None) if seqlen_q <= m else slice(seqlen_q - m, None)


OUTPUT_NAMES = ("out", "lse", "dq", "dk", "dv", "dsinks")
GRAD_NAMES = ("dq", "dk", "dv", "dsinks")  # dsinks only with sinks


def _sliced_variants(variants: dict, b: slice, heads: slice) -> dict:
    """The variants' arguments for the batch elements ``b`` and query heads ``heads``."""
    kw = dict(variants)
    if "sinks" in kw:
        kw["sinks"] = kw["sinks"][heads]
    if "alibi_slopes" in kw:
        slopes = kw["alibi_slopes"]
        kw["alibi_slopes"] = slopes[heads] if slopes.ndim == 1 else slopes[b, heads]
    return kw


def check_outputs(outputs: dict, inputs: Inputs, causal: bool, xp, *,
                  max_batch: int | None = 1, max_heads: int | None = 2) -> list[Check]:
    """Check ``outputs`` (any of out, lse, dq, dk, dv, dsinks, full size) against the reference.

    The reference is :mod:`cupyflash.reference` in float64, with the inputs' variants, on
    the first ``max_batch`` batch elements and ``max_heads`` query heads, one kv head and its
    group of query heads at a time (None: everything at once); beyond MAX_REFERENCE_SCORES
    scores per slice only the last query rows are checked, and dk, dv, dsinks (which need
    every row) are left out, as is dsinks when not every batch element is checked. Each
    tensor's bound is ``2 * (error of naive attention in the input precision) + flash-attn's
    rounding atol + ATOL_FLOOR[dtype] * max(1, max|ref|)``.
    """
    from . import reference

    dtype = inputs.q.dtype
    batch, heads, heads_kv = inputs.q.shape[0], inputs.q.shape[2], inputs.k.shape[2]
    rows = _query_rows(inputs.q.shape[1], inputs.k.shape[1], heads // heads_kv)
    every_row = rows == slice(None)
    every_batch = max_batch is None or max_batch >= batch
    names = [n for n in OUTPUT_NAMES if n in outputs
             and (every_row or n not in ("dk", "dv", "dsinks")) and (every_batch or n != "dsinks")]
    err = dict.fromkeys(names, 0.0)
    naive_err = dict.fromkeys(names, 0.0)
    atol = dict.fromkeys(names, 0.0)
    amax = dict.fromkeys(names, 0.0)
    for b, hq, hkv in _slices(batch, heads, heads_kv, max_batch, max_heads):
        q, do = (x[b, rows, hq] for x in (inputs.q, inputs.dout))
        k, v = (x[b, :, hkv] for x in (inputs.k, inputs.v))
        kw = dict(causal=causal, softmax_scale=inputs.scale, **_sliced_variants(inputs.variants, b, hq))
        ref, naive = {}, {}
        if "out" in names or "lse" in names:
            ref["out"], ref["lse"] = reference.attention(q, k, v, upcast=True, **kw)
            naive["out"], naive["lse"] = reference.attention(q, k, v, upcast=False, **kw)
        if set(GRAD_NAMES) & set(names):
            ref.update(zip(GRAD_NAMES, reference.attention_backward(do, q, k, v, upcast=True, **kw)))
            naive.update(zip(GRAD_NAMES, reference.attention_backward(do, q, k, v, upcast=False, **kw)))
        for n in names:
            if n == "lse":  # (batch, heads, seqlen_q)
                actual = outputs[n][b, hq, rows]
            elif n == "dsinks":  # (heads,)
                actual = outputs[n][hq]
            else:
                actual = outputs[n][b, rows, hq] if n in ("out", "dq") else outputs[n][b, :, hkv]
            err[n] = max(err[n], _max_err(xp, actual, ref[n]))
            naive_err[n] = max(naive_err[n], _max_err(xp, naive[n], ref[n]))
            atol[n] = max(atol[n], _rounding_atol(xp, ref[n], actual.dtype))
            amax[n] = max(amax[n], _amax(xp, ref[n]))
        del ref, naive
    floor = ATOL_FLOOR[dtype_name(dtype)]
    return [Check(n, err[n], 2 * naive_err[n] + atol[n] + floor * max(1.0, amax[n])) for n in names]


# ---------------------------------------------------------------------------------------
# Implementations

@dataclass
class Prepared:
    """An implementation ready to run one case.

    run: the call that is timed (bwd: the backward only; the forward ran in prepare).
    outputs: full-size results for the correctness gate (cupyflash only).
    peak_bytes: measures one call's peak extra device memory (None: not measurable).
    context: entered around every call (streams, backend selection).
    """
    run: Callable[[], Any]
    timer: Any
    peak_bytes: Callable[[], int | None]
    outputs: Callable[[], dict] | None = None
    context: Callable[[], Any] = contextlib.nullcontext
    note: str = ""


class Impl:
    """Base class: a named attention implementation."""
    name = ""
    gated = False  # checked against the reference before timing
    variants: tuple[str, ...] = ()  # the VARIANTS it can do

    def unavailable(self, device: Device) -> str | None:
        """Why this implementation cannot run on this device, or None."""
        return None

    def refuse_variants(self, case: Case) -> None:
        """Raise Unsupported naming the case's variants this implementation cannot do."""
        if missing := [f for f in case.features if f not in self.variants]:
            raise Unsupported(f"{self.name} cannot do {', '.join(missing)}")

    def prepare(self, case: Case, inputs: Inputs, device: Device) -> Prepared:
        raise NotImplementedError


class CupyflashImpl(Impl):
    """cupyflash itself, on the device's arrays (cupy, or numpy on the CPU); with
    ``deterministic``, its bitwise-reproducible backward pass."""
    gated = True
    variants = VARIANTS

    def __init__(self, deterministic: bool = False):
        self.deterministic = deterministic
        self.name = "cupyflash-deterministic" if deterministic else "cupyflash"

    def prepare(self, case, inputs, device):
        from . import api  # looked up at call time, so tests can patch api's functions
        q, k, v, do = inputs.q, inputs.k, inputs.v, inputs.dout
        kw = dict(causal=case.causal, **inputs.variants)
        det = self.deterministic

        def forward():
            return api.flash_attention(q, k, v, return_lse=True, **kw)

        def backward(out, lse):
            return api.flash_attention_backward(do, q, k, v, out, lse, deterministic=det, **kw)

        if case.mode == "fwd":
            run = lambda: api.flash_attention(q, k, v, **kw)  # noqa: E731
            outputs = lambda: dict(zip(("out", "lse"), forward()))  # noqa: E731
        elif case.mode == "bwd":
            out, lse = forward()
            run = lambda: backward(out, lse)  # noqa: E731
            outputs = lambda: dict(zip(GRAD_NAMES, run()))  # noqa: E731
        else:
            def run():
                return backward(*forward())

            def outputs():
                out, lse = forward()
                return dict(zip(OUTPUT_NAMES, (out, lse, *backward(out, lse))))
        return Prepared(run, device.timer(), lambda: device.measure_peak(run), outputs)


def _matmul(xp, a, b, dtype):
    """a @ b rounded to ``dtype``, accumulating in float32 (cuBLAS does; elsewhere emulated)."""
    if xp is not np and dtype != BFLOAT16:
        return xp.matmul(a, b)
    if xp is not np and _cupy_bf16_matmul():
        try:
            return xp.matmul(a, b)
        except (TypeError, ValueError):  # e.g. a batched or strided bf16 layout cuBLAS is not asked for
            pass
    return xp.matmul(a.astype(np.float32), b.astype(np.float32)).astype(dtype)


@functools.lru_cache(maxsize=None)
def _cupy_bf16_matmul() -> bool:
    """Whether this CuPy multiplies bfloat16 matrices itself (else: float32 then round)."""
    import cupy
    try:
        a = cupy.ones((16, 16), dtype=BFLOAT16)
        return float((a @ a)[0, 0].astype(np.float32)) == 16.0
    except Exception:
        return False


def _kv_per_query_head(xp, X, heads: int):
    """(batch, heads_kv, seqlen, dim) -> (batch, heads, ...): grouped-query attention, materialised."""
    return X if X.shape[1] == heads else xp.repeat(X, heads // X.shape[1], axis=1)


def naive_forward(xp, q, k, v, causal: bool, scale: float, window_size=(-1, -1)):
    """Materialised attention in the input precision: S = QK^T (rounded to dtype), softmax
    in float32, P rounded to dtype, O = PV. Returns out (q's layout and dtype) and P
    (batch, heads, seqlen_q, seqlen_k) in dtype, which the backward pass reuses. k, v may
    have fewer heads (grouped-query attention: repeated); the mask is causal and/or a window."""
    from .reference import _allowed

    dtype, heads = q.dtype, q.shape[2]
    Q, K, V = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    K, V = _kv_per_query_head(xp, K, heads), _kv_per_query_head(xp, V, heads)
    S = _matmul(xp, Q, K.transpose(0, 1, 3, 2), dtype).astype(np.float32)
    S *= scale
    if causal or tuple(window_size) != (-1, -1):
        visible, _ = _allowed(xp, q.shape[1], k.shape[1], causal, window_size)
        S += xp.where(visible, 0.0, -xp.inf).astype(np.float32)
    m = S.max(axis=-1, keepdims=True)
    S -= xp.where(m == -xp.inf, 0.0, m)  # fully masked row: exp(-inf) = 0, not NaN
    xp.exp(S, out=S)
    l = S.sum(axis=-1, keepdims=True)
    S /= xp.where(l == 0, 1.0, l)
    P = S.astype(dtype)
    del S
    O = _matmul(xp, P, V, dtype)
    return O.transpose(0, 2, 1, 3), P


def naive_backward(xp, dout, q, k, v, out, P, scale: float):
    """Gradients of :func:`naive_forward` from its saved P: dV = P^T dO, dP = dO V^T,
    dS = P (dP - rowsum(dO O)), dQ = scale dS K, dK = scale dS^T Q; with fewer kv heads,
    dK and dV sum over each kv head's query heads."""
    dtype, heads, heads_kv = q.dtype, q.shape[2], k.shape[2]
    Q, K, V, O, dO = (x.transpose(0, 2, 1, 3) for x in (q, k, v, out, dout))
    K, V = _kv_per_query_head(xp, K, heads), _kv_per_query_head(xp, V, heads)
    dV = _matmul(xp, P.transpose(0, 1, 3, 2), dO, dtype)
    dS = _matmul(xp, dO, V.transpose(0, 1, 3, 2), dtype).astype(np.float32)
    dS -= (dO.astype(np.float32) * O.astype(np.float32)).sum(axis=-1, keepdims=True)
    dS *= P.astype(np.float32)
    dS *= scale
    dS = dS.astype(dtype)
    dQ = _matmul(xp, dS, K, dtype)
    dK = _matmul(xp, dS.transpose(0, 1, 3, 2), Q, dtype)
    if heads_kv != heads:
        dK, dV = (g.reshape(g.shape[0], heads_kv, heads // heads_kv, *g.shape[2:]).astype(np.float32)
                  .sum(axis=2).astype(dtype) for g in (dK, dV))
    return tuple(g.transpose(0, 2, 1, 3) for g in (dQ, dK, dV))


class NaiveImpl(Impl):
    """Materialised attention with the array module's matmuls: what you write without a kernel."""
    name = "naive"
    variants = ("gqa", "window")

    def prepare(self, case, inputs, device):
        xp, s = device.xp, inputs.scale
        q, k, v, do = inputs.q, inputs.k, inputs.v, inputs.dout
        fwd = functools.partial(naive_forward, window_size=case.variant.window)
        note = ""
        if device.on_gpu and case.np_dtype == BFLOAT16 and not _cupy_bf16_matmul():
            note = "bf16 matmuls in float32 (CuPy has no bf16 matmul)"
        if case.mode == "fwd":
            run = lambda: fwd(xp, q, k, v, case.causal, s)[0]  # noqa: E731
        elif case.mode == "bwd":
            out, P = fwd(xp, q, k, v, case.causal, s)
            run = lambda: naive_backward(xp, do, q, k, v, out, P, s)  # noqa: E731
        else:
            def run():
                out, P = fwd(xp, q, k, v, case.causal, s)
                return naive_backward(xp, do, q, k, v, out, P, s)
        return Prepared(run, device.timer(), lambda: device.measure_peak(run), note=note)


def _needs_gpu(device: Device) -> str | None:
    return None if device.on_gpu else "needs a CUDA device"


def _same_alignment(case: Case, who: str) -> None:
    if (case.causal or "window" in case.features) and case.seqlen_q != case.seqlen_k:
        mask = "sliding window" if "window" in case.features else "causal mask"
        raise Unsupported(f"{who}'s {mask} is top-left aligned; cupyflash's is bottom-right "
                          "(they differ when seqlen_q != seqlen_k)")


class TorchImpl(Impl):
    """Base of the PyTorch peers: zero-copy DLPack tensors of the benchmark's cupy arrays,
    run on its cupy stream (``torch.cuda.ExternalStream``); backward by ``torch.autograd.grad``.
    A subclass says what else it needs (:meth:`missing`) and how it attends (:meth:`bind`)."""

    def unavailable(self, device):
        if (reason := _needs_gpu(device)):
            return reason
        try:
            torch = importlib.import_module("torch")
        except Exception as e:
            return f"PyTorch is not importable ({short_error(e)})"
        if not torch.cuda.is_available():
            return "PyTorch sees no CUDA device (a CPU-only build?)"
        return self.missing(torch)

    def missing(self, torch) -> str | None:
        """What else this peer lacks on top of a CUDA PyTorch (a module, a backend), or None."""
        return None

    def contexts(self, case: Case) -> list:
        """Context managers entered around every call, besides the device and stream."""
        return []

    def bind(self, case: Case, inputs: Inputs, qkv: list, dout):
        """(attn, leaves, dout, note): ``attn()`` runs this peer on the (B, S, H, D) tensors
        ``qkv`` and returns its output; gradients are taken of ``leaves`` with ``dout``
        (its layout matching the output's)."""
        raise NotImplementedError

    def prepare(self, case, inputs, device):
        import torch

        t_stream = torch.cuda.ExternalStream(device.stream.ptr, device=torch.device("cuda", device.id))

        def context():
            stack = contextlib.ExitStack()
            stack.enter_context(torch.cuda.device(device.id))
            stack.enter_context(torch.cuda.stream(t_stream))
            for c in self.contexts(case):
                stack.enter_context(c)
            if case.mode == "fwd":
                stack.enter_context(torch.no_grad())
            return stack

        with context():
            qkv = [torch.from_dlpack(x).requires_grad_(case.mode != "fwd") for x in (inputs.q, inputs.k, inputs.v)]
            attn, leaves, do, note = self.bind(case, inputs, qkv, torch.from_dlpack(inputs.dout))
            if case.mode == "fwd":
                run = attn
            elif case.mode == "bwd":
                out = attn()
                run = lambda: torch.autograd.grad(out, leaves, do, retain_graph=True)  # noqa: E731
            else:
                run = lambda: torch.autograd.grad(attn(), leaves, do)  # noqa: E731

        def peak_bytes():
            t_stream.synchronize()
            torch.cuda.reset_peak_memory_stats(device.id)
            before = torch.cuda.memory_allocated(device.id)
            out = run()
            t_stream.synchronize()
            peak = torch.cuda.max_memory_allocated(device.id) - before
            del out
            return peak

        return Prepared(run, device.timer(), peak_bytes, context=context, note=note)


class TorchSDPAImpl(TorchImpl):
    """``torch.nn.functional.scaled_dot_product_attention`` pinned to one SDPA backend, on
    (B, H, S, D) views of the inputs; grouped-query attention with ``enable_gqa=True``."""
    variants = ("gqa",)

    def __init__(self, name: str, backend: str):
        self.name, self.backend = name, backend

    def missing(self, torch):
        try:
            attention = importlib.import_module("torch.nn.attention")
        except Exception as e:
            return f"PyTorch is not importable ({short_error(e)})"
        if not hasattr(attention.SDPBackend, self.backend):
            return f"this PyTorch ({torch.__version__}) has no SDPBackend.{self.backend}"
        return None

    def contexts(self, case):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return [sdpa_kernel(getattr(SDPBackend, self.backend))]

    def bind(self, case, inputs, qkv, dout):
        _same_alignment(case, "PyTorch SDPA")
        import torch.nn.functional as F

        kw = dict(is_causal=case.causal, scale=inputs.scale)
        if "gqa" in case.features:
            kw["enable_gqa"] = True

        def attn():
            return F.scaled_dot_product_attention(*views, **kw)

        views, note = [t.transpose(1, 2) for t in qkv], "(B,H,S,D) views, zero-copy"
        try:
            attn()
        except RuntimeError as e:
            if is_out_of_memory(e):
                raise
            # some backends want (B,H,S,D)-contiguous tensors: copy once, outside the timing
            qkv = [t.detach().transpose(1, 2).contiguous().requires_grad_(case.mode != "fwd") for t in qkv]
            views, note = qkv, "inputs copied to (B,H,S,D)-contiguous"
            attn()  # raises the backend's reason if it still cannot run
        return attn, qkv, dout.transpose(1, 2), note


@contextlib.contextmanager
def _bare_argv():
    """sys.argv as the program name alone: CuTe DSL (FA4) parses the command line on every
    compile for its ``-diagnostic`` flag, and ``-d 128`` reads as ``-diagnostic 128`` (exit 2)."""
    argv = sys.argv
    sys.argv = argv[:1]
    try:
        yield
    finally:
        sys.argv = argv


class FA4Impl(TorchImpl):
    """FlashAttention-4: ``flash_attn.cute.flash_attn_func`` (the flash-attn-4 wheel, CuTe DSL
    kernels) on the inputs' own (B, S, H, D) layout. Masks are bottom-right aligned like
    cupyflash's; grouped-query attention, windows, softcap and sinks (``learnable_sink``) are
    native; no ALiBi. float16 and bfloat16 only."""
    name = "fa4"
    variants = ("gqa", "window", "softcap", "sinks")

    def missing(self, torch):
        try:
            importlib.import_module("flash_attn.cute")
        except Exception as e:
            return f"FlashAttention-4 is not importable ({short_error(e)}); install flash-attn-4"
        return None

    def contexts(self, case):
        return [_bare_argv()]

    def bind(self, case, inputs, qkv, dout):
        if case.dtype not in ("float16", "bfloat16"):
            raise Unsupported("FlashAttention-4 takes float16 and bfloat16 only")
        import torch
        from flash_attn.cute import flash_attn_func

        left, right = case.variant.window
        kw = dict(softmax_scale=inputs.scale, causal=case.causal, softcap=case.variant.softcap,
                  window_size=(None if left < 0 else left, None if right < 0 else right))
        leaves = list(qkv)
        if "sinks" in inputs.variants:
            kw["learnable_sink"] = torch.from_dlpack(inputs.variants["sinks"]).requires_grad_(case.mode != "fwd")
            leaves.append(kw["learnable_sink"])

        def attn():
            return flash_attn_func(*qkv, **kw)[0]  # (out, lse)

        attn()  # compiles this configuration outside the timing; raises if FA4 cannot run it
        return attn, leaves, dout, "(B,S,H,D) tensors, zero-copy"


class JaxCudnnImpl(Impl):
    """``jax.nn.dot_product_attention(..., implementation='cudnn')``, jitted.

    JAX takes the cupy arrays zero-copy through DLPack (same (B, S, H, D) layout) but runs on
    its own stream, so it is timed with the host clock around ``block_until_ready``.
    Grouped-query attention is native; of windows, cuDNN takes only causal ones (right = 0).
    """
    name = "jax-cudnn"
    variants = ("gqa", "window")

    def unavailable(self, device):
        if (reason := _needs_gpu(device)):
            return reason
        # before JAX starts: do not let it grab 75% of the device for itself
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        try:
            jax = importlib.import_module("jax")
            importlib.import_module("jax.numpy")
        except Exception as e:
            return f"JAX is not importable ({short_error(e)})"
        try:
            gpus = _jax_gpus(jax)
        except Exception as e:
            return f"JAX has no GPU backend ({short_error(e)}); install jax[cuda12] or jax[cuda13]"
        if device.id is not None and device.id >= len(gpus):
            return f"JAX sees {len(gpus)} GPU(s), not device {device.id}"
        if not hasattr(jax.nn, "dot_product_attention"):
            return f"this JAX ({jax.__version__}) has no jax.nn.dot_product_attention"
        return None

    def prepare(self, case, inputs, device):
        _same_alignment(case, "jax.nn.dot_product_attention")
        causal, window = case.causal, {}
        if "window" in case.features:
            left, right = case.variant.window
            if not (causal or right == 0):
                raise Unsupported("jax-cudnn: cuDNN takes a sliding window only with right = 0 (causal)")
            causal, window = True, {"local_window_size": (left, 0)} if left >= 0 else {}
        import jax
        import jax.numpy as jnp

        gpu = _jax_gpus(jax)[device.id or 0]
        device.synchronize()
        note = "host clock (JAX runs on its own stream)"
        try:
            q, k, v, do = (jnp.from_dlpack(x) for x in (inputs.q, inputs.k, inputs.v, inputs.dout))
        except Exception:
            import cupy
            q, k, v, do = (jax.device_put(cupy.asnumpy(x), gpu)
                           for x in (inputs.q, inputs.k, inputs.v, inputs.dout))
            note += "; inputs copied through the host"
        attn = functools.partial(jax.nn.dot_product_attention, scale=inputs.scale,
                                 is_causal=causal, implementation="cudnn", **window)
        if case.mode == "fwd":
            f = jax.jit(attn)
            run = lambda: f(q, k, v)  # noqa: E731
        elif case.mode == "bwd":
            fwd, bwd = _jax_fwd_and_bwd(jax, attn)
            _, residuals = fwd(q, k, v)  # the forward runs once, outside the timing
            run = lambda: bwd(residuals, do)  # noqa: E731
        else:
            g = jax.jit(lambda q, k, v, do: jax.vjp(attn, q, k, v)[1](do))
            run = lambda: g(q, k, v, do)  # noqa: E731
        jax.block_until_ready(run())  # compile now; raises here if cuDNN cannot run the case
        timer = HostTimer(sync=jax.block_until_ready, before=device.synchronize)
        return Prepared(run, timer, lambda: None, note=note)


def _jax_gpus(jax) -> list:
    try:
        return jax.devices("cuda")
    except RuntimeError:
        return jax.devices("gpu")


def _jax_fwd_and_bwd(jax, f):
    """jitted fwd(q, k, v) -> (out, residuals) and bwd(residuals, dout) -> (dq, dk, dv)."""
    if hasattr(jax, "fwd_and_bwd"):  # JAX >= 0.7
        return jax.fwd_and_bwd(f, argnums=(0, 1, 2))
    # what fwd_and_bwd does: the vjp closure is a pytree (tree_util.Partial) of residuals
    return jax.jit(lambda q, k, v: jax.vjp(f, q, k, v)), jax.jit(lambda vjp, do: vjp(do))


def implementations() -> dict[str, Impl]:
    """Every implementation by name; cupyflash first."""
    impls = [CupyflashImpl(), CupyflashImpl(deterministic=True), NaiveImpl(), TorchSDPAImpl("torch-flash", "FLASH_ATTENTION"),
             TorchSDPAImpl("torch-cudnn", "CUDNN_ATTENTION"), JaxCudnnImpl(), FA4Impl()]
    return {i.name: i for i in impls}


PEERS = ("naive", "torch-flash", "torch-cudnn", "jax-cudnn", "fa4")


# ---------------------------------------------------------------------------------------
# The runner

def _run_one(impl: Impl, case: Case, inputs: Inputs, device: Device, *, warmup: int,
             repeats: int, max_seconds: float | None, gate: bool) -> Result:
    prepared = None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                impl.refuse_variants(case)
                prepared = impl.prepare(case, inputs, device)
                with prepared.context():
                    if impl.gated and gate:
                        checks = check_outputs(prepared.outputs(), inputs, case.causal, device.xp)
                        bad = [c for c in checks if not c.ok]
                        if bad:
                            return Result.of(case, impl.name, "failed", "wrong result, not timed: "
                                             + "; ".join(c.text() for c in bad))
                    peak = prepared.peak_bytes()  # one untimed call: the first warm-up
                    times = prepared.timer(prepared.run, max(warmup - 1, 0), repeats, max_seconds)
            except Exception as e:
                if caught and not is_out_of_memory(e):  # e.g. PyTorch's reasons for "No available kernel"
                    reasons = "; ".join(dict.fromkeys(str(w.message).strip().splitlines()[0] for w in caught))
                    e.args = (f"{e} [{reasons}]",)
                raise
        note = prepared.note
        if len(times) < repeats:
            note = "; ".join(filter(None, [note, f"{len(times)} of {repeats} repeats (time cap)"]))
        return Result.timed(case, impl.name, times, prepared.timer.name, peak, note)
    except Unsupported as e:
        return Result.of(case, impl.name, "skipped", str(e))
    except Exception as e:
        if is_out_of_memory(e):
            return Result.of(case, impl.name, "oom", f"out of memory: {short_error(e)}")
        if isinstance(e, (ValueError, TypeError)):  # cupyflash's input checks, a peer's refusal
            return Result.of(case, impl.name, "skipped", f"not supported: {short_error(e, 400)}")
        status = "failed" if impl.gated else "skipped"
        return Result.of(case, impl.name, status, f"error: {short_error(e, 400)}")
    finally:
        del prepared
        device.free_memory()


def run_benchmark(cases: Sequence[Case], impls: Sequence[Impl], device: Device, *,
                  warmup: int = 5, repeats: int = 20, max_seconds: float | None = None,
                  seed: int = 0, gate: bool = True,
                  on_result: Callable[[Result], Any] | None = None) -> list[Result]:
    """Run every implementation on every case, in the same process, inputs and stream.

    Each case draws fresh inputs (seed + its index). cupyflash is checked against the
    reference first and not timed if wrong (status 'failed'). Peers that cannot run are
    'skipped' with the reason; out-of-memory rows are 'oom'. ``on_result`` is called after
    each row (progress bars).
    """
    results: list[Result] = []

    def emit(r: Result):
        results.append(r)
        if on_result:
            on_result(r)

    with device.activate():
        reasons = {impl.name: impl.unavailable(device) for impl in impls}
        for n, case in enumerate(cases):
            try:
                inputs = device.random_inputs(case, seed + n)
            except Exception as e:
                if not is_out_of_memory(e):
                    raise
                inputs = None
                device.free_memory()
                for impl in impls:
                    emit(Result.of(case, impl.name, "oom", f"out of memory allocating the inputs: {short_error(e)}"))
                continue
            for impl in impls:
                if reasons[impl.name]:
                    emit(Result.of(case, impl.name, "skipped", reasons[impl.name]))
                else:
                    emit(_run_one(impl, case, inputs, device, warmup=warmup, repeats=repeats,
                                  max_seconds=max_seconds, gate=gate))
            del inputs
            device.free_memory()
    return results


# ---------------------------------------------------------------------------------------
# System description: the GPU, the versions, the kernel cache

def _cuda_version_text(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}" if v else "none"


def gpu_info(device_id: int = 0) -> dict:
    """Name, compute capability, multiprocessors, shared memory per block (opt-in), memory."""
    import cupy
    p = cupy.cuda.runtime.getDeviceProperties(device_id)
    name = p["name"].decode() if isinstance(p["name"], bytes) else str(p["name"])
    with cupy.cuda.Device(device_id):
        free, total = cupy.cuda.runtime.memGetInfo()
    return {"device_id": device_id, "name": name, "cc": f"{p['major']}.{p['minor']}",
            "sm_count": int(p["multiProcessorCount"]),
            "shared_mem_per_block_optin": int(p.get("sharedMemPerBlockOptin", 0)),
            "memory_bytes": int(total), "memory_free_bytes": int(free),
            "memory_gib": round(total / 2**30, 1)}


def _try(fn, default=None):
    try:
        return fn()
    except Exception:
        return default


def _dist_version(name: str) -> str | None:
    from importlib import metadata
    return _try(lambda: metadata.version(name))


def versions(peers: Iterable[str] = ()) -> dict:
    """cupyflash, CuPy, CUDA runtime / driver / NVRTC, NumPy, Python; torch/jax for those peers."""
    from . import __version__
    out: dict[str, Any] = {"cupyflash": __version__, "numpy": np.__version__,
                           "python": platform.python_version()}
    try:
        import cupy
        out["cupy"] = cupy.__version__
        out["cuda_runtime"] = _try(lambda: _cuda_version_text(cupy.cuda.runtime.runtimeGetVersion()))
        out["driver"] = _try(lambda: _cuda_version_text(cupy.cuda.runtime.driverGetVersion()))
        out["nvrtc"] = _try(lambda: ".".join(map(str, cupy.cuda.nvrtc.getVersion())))
    except Exception as e:
        out["cupy"] = f"not importable ({short_error(e)})"
    peers = set(peers)
    if peers & {"torch-flash", "torch-cudnn", "fa4"}:
        out["torch"] = _dist_version("torch")
        torch = sys.modules.get("torch")
        if torch is not None:
            out["torch_cuda"] = torch.version.cuda
            out["torch_cudnn"] = _try(lambda: torch.backends.cudnn.version())
    if "jax-cudnn" in peers:
        out["jax"] = _dist_version("jax")
        out["jaxlib"] = _dist_version("jaxlib")
    if "fa4" in peers:
        out["flash_attn_4"] = _dist_version("flash-attn-4")
    return out


def cache_info() -> dict:
    """CuPy's kernel cache directory (CUPY_CACHE_DIR or ~/.cupy/kernel_cache) and its size."""
    path = Path(os.environ.get("CUPY_CACHE_DIR") or Path.home() / ".cupy" / "kernel_cache")
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
    return {"dir": str(path), "exists": path.is_dir(), "files": len(files),
            "bytes": sum(_try(lambda p=p: p.stat().st_size, 0) for p in files)}


# ---------------------------------------------------------------------------------------
# Writers: JSON document, CSV rows, terminal tables, plot

def results_document(results: Sequence[Result], *, command: Sequence[str], gpu: dict | None,
                     versions: dict, settings: dict | None = None, date: str | None = None) -> dict:
    """The JSON document: where, what with, when, how invoked, and every row."""
    return {"schema": SCHEMA, "gpu": gpu, "versions": versions,
            "date": date or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": list(command),
            "settings": {"flops": FLOP_CONVENTION, **(settings or {})},
            "results": [r.to_dict() for r in results]}


def upgrade_document(doc: dict) -> dict:
    """A cupyflash-bench/1 document in this schema: its rows gain variant '' (plain attention)."""
    if doc.get("schema") == "cupyflash-bench/1":
        doc = {**doc, "schema": SCHEMA, "results": [
            {k: row.get(k, "") for k in RESULT_FIELDS} if set(row) == set(RESULT_FIELDS) - {"variant"} else row
            for row in doc.get("results", [])]}
    return doc


def validate_document(doc: dict) -> None:
    """Raise ValueError naming the first thing that does not follow the schema."""
    missing = [k for k in DOCUMENT_FIELDS if k not in doc]
    if missing:
        raise ValueError(f"document lacks {missing}")
    for i, row in enumerate(doc["results"]):
        if tuple(row) != RESULT_FIELDS:
            raise ValueError(f"results[{i}] has fields {tuple(row)}, expected {RESULT_FIELDS}")
        if row["status"] not in STATUSES:
            raise ValueError(f"results[{i}] has status {row['status']!r}, not one of {STATUSES}")
        if row["status"] == "ok" and not (row["ms_median"] and row["tflops"]):
            raise ValueError(f"results[{i}] is ok but has no time")


def write_json(path: str | Path, doc: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")


def load_results(path: str | Path) -> tuple[dict, list[Result]]:
    doc = upgrade_document(json.loads(Path(path).read_text()))
    validate_document(doc)
    return doc, [Result(**row) for row in doc["results"]]


def write_csv(path: str | Path, results: Sequence[Result]) -> None:
    """One row per result, the header fixed to RESULT_FIELDS; None is an empty cell."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RESULT_FIELDS)
        w.writeheader()
        for r in results:
            w.writerow({k: ("" if v is None else v) for k, v in r.to_dict().items()})


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _fmt_tflops(x: float | None) -> str:
    """One decimal from 10 TFLOP/s up, three significant digits below."""
    return "-" if x is None else format(x, ".1f" if x >= 10 else ".3g")


def format_grid(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _baseline(results: Sequence[Result]) -> dict:
    return {r.case_key: r for r in results if r.impl == "cupyflash" and r.status == "ok"}


def speedup(flash: Result | None, peer: Result) -> float | None:
    """cupyflash's speed-up over a peer: peer time / cupyflash time (None if either missing)."""
    if flash is None or peer.status != "ok" or not flash.ms_median or not peer.ms_median:
        return None
    return peer.ms_median / flash.ms_median


def format_table(results: Sequence[Result]) -> str:
    """One line per (case, implementation): times, TFLOP/s, memory, cupyflash's speed-up."""
    base = _baseline(results)
    variants = _has_variants(results)
    header = ["mode", "dtype", "B", "H", "Sq", "Sk", "D", "causal", *["variant"] * variants, "impl",
              "median ms", "min ms", "max ms", "TFLOP/s", "peak MB", "cupyflash speed-up", "status / note"]
    rows, last = [], None
    for r in results:
        case_cells = [r.mode, r.dtype, str(r.batch), str(r.heads), str(r.seqlen_q),
                      str(r.seqlen_k), str(r.head_dim), "yes" if r.causal else "no",
                      *[r.variant or "-"] * variants]
        if r.case_key == last:
            case_cells = [""] * len(case_cells)
        last = r.case_key
        x = None if r.impl == "cupyflash" else speedup(base.get(r.case_key), r)
        status = r.note if r.status == "ok" else ": ".join(filter(None, [r.status, r.note]))
        rows.append(case_cells + [r.impl, _fmt(r.ms_median, ".3f"), _fmt(r.ms_min, ".3f"),
                                  _fmt(r.ms_max, ".3f"), _fmt_tflops(r.tflops),
                                  _fmt(r.peak_extra_mb, ".1f"), "-" if x is None else f"{x:.2f}x",
                                  status])
    return format_grid(header, rows)


def _has_variants(results: Sequence[Result]) -> bool:
    """Whether any row is more than plain attention (tables then show a variant column)."""
    return any(r.variant for r in results)


def format_comparison(results: Sequence[Result]) -> str:
    """One line per case: cupyflash's TFLOP/s, then each peer's with cupyflash's ratio to it."""
    impls = list(dict.fromkeys(r.impl for r in results))
    peers = [i for i in impls if i != "cupyflash"]
    by_case: dict[tuple, dict[str, Result]] = {}
    for r in results:
        by_case.setdefault(r.case_key, {})[r.impl] = r
    variants = _has_variants(results)
    header = ["mode", "dtype", "D", "causal", *["variant"] * variants, "Sq", "cupyflash TF/s"]
    header += [f"{p} TF/s (x)" for p in peers]
    rows = []
    for key, row in by_case.items():
        mode, dtype, _, _, sq, _, d, causal, variant = key
        flash = row.get("cupyflash")
        cells = [mode, dtype, str(d), "yes" if causal else "no", *[variant or "-"] * variants, str(sq),
                 _fmt_tflops(flash.tflops) if flash and flash.status == "ok" else (flash.status if flash else "-")]
        for p in peers:
            r = row.get(p)
            if r is None or r.status != "ok":
                cells.append(r.status if r else "-")
                continue
            x = speedup(flash, r)
            cells.append(_fmt_tflops(r.tflops) + (f" ({x:.2f}x)" if x else ""))
        rows.append(cells)
    return format_grid(header, rows)


class PlotUnavailable(RuntimeError):
    """matplotlib is missing."""


PLOT_HINT = "plotting needs matplotlib: pip install 'cupyflash[plot]' (or pip install matplotlib)"


def require_matplotlib() -> None:
    """Raise PlotUnavailable with the install hint when matplotlib cannot be imported."""
    try:
        importlib.import_module("matplotlib")
    except Exception as e:
        raise PlotUnavailable(f"{PLOT_HINT} ({short_error(e)})") from None


def plot_results(results: Sequence[Result], path: str | Path, *, title: str = "") -> None:
    """TFLOP/s against seqlen, one panel per (dtype, head_dim, causal, mode, variant), one line per
    implementation."""
    require_matplotlib()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.status == "ok"]
    panels = sorted({(r.dtype, r.head_dim, r.causal, MODES.index(r.mode), r.variant) for r in ok})
    if not panels:
        raise ValueError("no successful results to plot")
    impls = list(dict.fromkeys(r.impl for r in results))
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    for ax, (dtype, d, causal, m, variant) in zip(axes.flat, panels):
        for impl in impls:
            pts = sorted((r.seqlen_q, r.tflops) for r in ok if r.impl == impl and
                         (r.dtype, r.head_dim, r.causal, r.mode, r.variant) == (dtype, d, causal, MODES[m], variant))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl,
                        linewidth=2.5 if impl == "cupyflash" else 1.2)
        ax.set_xscale("log", base=2)
        seqlens = sorted({r.seqlen_q for r in ok})
        ax.set_xticks(seqlens, [f"{s // 1024}k" if s >= 1024 and s % 1024 == 0 else str(s) for s in seqlens])
        ax.minorticks_off()
        ax.set_title(f"{MODES[m]}, {dtype}, head_dim {d}{', causal' if causal else ''}"
                     f"{', ' + variant if variant else ''}", fontsize=9)
        ax.set_xlabel("seqlen")
        ax.set_ylabel("TFLOP/s")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    fig.suptitle(title or "cupyflash vs peers", fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
