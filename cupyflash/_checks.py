"""Every check on user input, in one place.

Each public function validates its arguments here once, at the boundary, and raises
TypeError (wrong kind of object) or ValueError (right kind, wrong value) with a message
that names the argument and the rule. Nothing below this layer re-checks user input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ._dtypes import SUPPORTED_GPU_DTYPES, SUPPORTED_CPU_DTYPES, dtype_name

MAX_HEAD_DIM = 256
HEAD_DIM_MULTIPLE = 8
SUPPORTED_HEAD_DIMS_TEXT = f"multiples of {HEAD_DIM_MULTIPLE} from {HEAD_DIM_MULTIPLE} to {MAX_HEAD_DIM}"


def _cupy():
    try:
        import cupy
    except Exception:  # not installed, or CUDA libraries missing
        return None
    return cupy


def is_cupy_array(x) -> bool:
    cp = _cupy()
    return cp is not None and isinstance(x, cp.ndarray)


# DLPack device types (dlpack.h DLDeviceType)
_KDL_CPU, _KDL_CUDA, _KDL_CUDA_HOST, _KDL_CUDA_MANAGED = 1, 2, 3, 13


def _require_cupy(name: str):
    cp = _cupy()
    if cp is None:
        raise TypeError(f"{name} is a CUDA array but CuPy is not installed; "
                        "install cupyflash[cuda13] or cupyflash[cuda12]")
    return cp


def _dlpack_device(x, name: str):
    """(device_type, device_id) of a DLPack producer, or None if x is not one."""
    if not (hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__")):
        return None
    try:
        device_type, device_id = x.__dlpack_device__()
    except (BufferError, TypeError, ValueError) as e:
        raise TypeError(f"{name}.__dlpack_device__() failed: {type(e).__name__}: {e}") from e
    return int(device_type), int(device_id)


def _from_dlpack(from_dlpack, x, name: str):
    try:
        return from_dlpack(x)
    except (BufferError, TypeError, ValueError) as e:
        raise TypeError(f"{name} could not be taken zero-copy through DLPack "
                        f"({type(e).__name__}: {e})") from e


def _has_cuda_array_interface(x) -> bool:
    try:
        return getattr(x, "__cuda_array_interface__", None) is not None
    except Exception:  # a property that refuses (e.g. an unsupported dtype) is no interface
        return False


def as_array(x, name: str):
    """Return x as a numpy or cupy array, zero-copy.

    numpy and cupy arrays pass through. Other objects, in this order:

    1. ``__dlpack__`` with ``__dlpack_device__`` on a CUDA device (JAX, PyTorch, cupy-like
       libraries): ``cupy.from_dlpack``. DLPack carries bfloat16, and CuPy hands the producer
       its current stream, so the producer orders its pending writes before CuPy's work
       without a host synchronisation. On the CPU: ``numpy.from_dlpack``.
    2. ``__cuda_array_interface__`` (Numba device arrays): ``cupy.asarray``, a view. When the
       interface names a stream, CuPy synchronises with it (the protocol's v3 rule).

    Anything else is a TypeError naming the argument.
    """
    if isinstance(x, np.ndarray) or is_cupy_array(x):
        return x
    dl_device = _dlpack_device(x, name)
    if dl_device is not None and dl_device[0] in (_KDL_CPU, _KDL_CUDA_HOST):
        return _from_dlpack(np.from_dlpack, x, name)
    if dl_device is not None and dl_device[0] in (_KDL_CUDA, _KDL_CUDA_MANAGED):
        return _from_dlpack(_require_cupy(name).from_dlpack, x, name)
    if _has_cuda_array_interface(x):
        return _require_cupy(name).asarray(x)
    if dl_device is not None:
        raise TypeError(f"{name} lives on DLPack device type {dl_device[0]}; cupyflash takes "
                        "CPU (numpy) and CUDA (cupy) arrays")
    raise TypeError(f"{name} must be a numpy or cupy array (or expose __dlpack__ / "
                    f"__cuda_array_interface__), got {type(x).__name__}")


def _device_of(x):
    return x.device.id if is_cupy_array(x) else "cpu"


def _device_text(dev) -> str:
    return "the CPU (numpy)" if dev == "cpu" else f"GPU {dev} (cupy)"


def check_same_backend(named: dict) -> str | int:
    """All arrays on one device: 'cpu' or a CUDA device id."""
    items = list(named.items())
    first_name, first = items[0]
    dev = _device_of(first)
    for name, x in items[1:]:
        if _device_of(x) != dev:
            raise ValueError(f"{name} is on {_device_text(_device_of(x))} but {first_name} is on "
                             f"{_device_text(dev)}: all arrays must be on the same device")
    return dev


def check_dtype(named: dict, on_gpu: bool):
    supported = SUPPORTED_GPU_DTYPES if on_gpu else SUPPORTED_CPU_DTYPES
    items = list(named.items())
    first_name, first = items[0]
    if first.dtype not in supported:
        raise ValueError(f"{first_name} has dtype {dtype_name(first.dtype)}; supported on "
                         f"{'the GPU' if on_gpu else 'the CPU'}: "
                         f"{', '.join(dtype_name(d) for d in supported)}")
    for name, x in items[1:]:
        if x.dtype != first.dtype:
            raise ValueError(f"{name} has dtype {dtype_name(x.dtype)} but {first_name} has "
                             f"{dtype_name(first.dtype)}: all inputs must have the same dtype")
    return first.dtype


def check_scale(softmax_scale, head_dim: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, (bool, np.bool_)) or not isinstance(softmax_scale, (int, float, np.integer, np.floating)):
        raise TypeError(f"softmax_scale must be a real number or None, got {type(softmax_scale).__name__}")
    s = float(softmax_scale)
    if not math.isfinite(s) or s <= 0.0:
        raise ValueError(f"softmax_scale must be finite and > 0, got {softmax_scale!r}")
    return s


def check_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def _check_last_dim_contiguous(name: str, x):
    if x.size == 0:
        return  # empty arrays carry arbitrary strides and are never read
    if x.ndim and x.shape[-1] > 1 and x.strides[-1] != x.itemsize:
        raise ValueError(f"{name} must be contiguous in its last dimension (head_dim); got strides "
                         f"{x.strides} bytes for shape {x.shape}: pass {name}.copy() or an array "
                         "whose last axis has stride 1")
    for axis, st in enumerate(x.strides):
        if st % x.itemsize:
            raise ValueError(f"{name} has a stride of {st} bytes on axis {axis}, not a multiple of "
                             f"its item size {x.itemsize}")


@dataclass(frozen=True)
class AttentionShape:
    """The problem size, (batch, seqlen, heads, head_dim) layout as in flash-attn."""
    batch: int
    seqlen_q: int
    seqlen_k: int
    heads: int
    head_dim: int
    heads_kv: int = -1  # -1: as many as heads

    def __post_init__(self):
        if self.heads_kv == -1:
            object.__setattr__(self, "heads_kv", self.heads)


def check_qkv(q, k, v) -> AttentionShape:
    shape = check_qkv_shapes(q, k, v)
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_last_dim_contiguous(name, x)
    return shape


def check_qkv_shapes(q, k, v) -> AttentionShape:
    """The shape rules alone (no strides: traced JAX values have none)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must have 4 dimensions (batch, seqlen, heads, head_dim), "
                             f"got shape {tuple(x.shape)}")
    B, Sq, H, D = q.shape
    for name, x in (("k", k), ("v", v)):
        b, _, _, d = x.shape
        if (b, d) != (B, D):
            raise ValueError(f"{name} has shape {tuple(x.shape)} but q has {tuple(q.shape)}: batch and "
                             "head_dim must match (layout is batch, seqlen, heads, head_dim)")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same seqlen, got {k.shape[1]} and {v.shape[1]}")
    _check_heads_and_dim(H, k.shape[2], v.shape[2], D)
    return AttentionShape(B, Sq, k.shape[1], H, D, k.shape[2])


def _check_heads_and_dim(H: int, H_kv: int, H_v: int, D: int):
    """k and v have the same heads, which divide q's (grouped-query attention); head_dim is supported."""
    if H_v != H_kv:
        raise ValueError(f"v has {H_v} heads but k has {H_kv}: k and v must have the same heads")
    if H != H_kv and (H_kv == 0 or H % H_kv):
        raise ValueError(f"q has {H} heads but k and v have {H_kv}: the query heads must be a multiple of the "
                         "key/value heads (grouped-query attention: query head h reads kv head h // (H_q // H_kv))")
    if D % HEAD_DIM_MULTIPLE or not (0 < D <= MAX_HEAD_DIM):
        raise ValueError(f"head_dim {D} is not supported; supported head_dim: {SUPPORTED_HEAD_DIMS_TEXT}")


# ---- packed sequences (varlen) ----

@dataclass(frozen=True)
class Packing:
    """Packed sequences: sequence b holds query rows cu_q[b] .. cu_q[b + 1] and key rows
    cu_k[b] .. cu_k[b + 1] of (total, heads, head_dim) arrays. ``cu_q``, ``cu_k``: the validated
    int32 offset arrays (on the inputs' device); ``max_q``, ``max_k``: the longest sequence of each."""
    cu_q: object
    cu_k: object
    batch: int
    max_q: int
    max_k: int


def check_varlen_qkv(q, k, v, strides: bool = True) -> AttentionShape:
    """(total_q, H, D) queries, (total_k, H_kv, D) keys and values -> the shape of their one packed
    batch (batch 1, seqlen = the totals). ``strides``: False for traced JAX values, which have none."""
    for name, x, rows in (("q", q, "total_q"), ("k", k, "total_k"), ("v", v, "total_k")):
        if x.ndim != 3:
            raise ValueError(f"{name} must have 3 dimensions ({rows}, heads, head_dim): the sequences packed "
                             f"one after another, got shape {tuple(x.shape)}")
    total_q, H, D = q.shape
    for name, x in (("k", k), ("v", v)):
        if x.shape[2] != D:
            raise ValueError(f"{name} has shape {tuple(x.shape)} but q has {tuple(q.shape)}: head_dim must match "
                             "(layout is total, heads, head_dim)")
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"k and v must have the same number of rows (total_k), got {k.shape[0]} and {v.shape[0]}")
    _check_heads_and_dim(H, k.shape[1], v.shape[1], D)
    for name, x in (("q", q), ("k", k), ("v", v)) if strides else ():
        _check_last_dim_contiguous(name, x)
    return AttentionShape(1, total_q, k.shape[0], H, D, k.shape[1])


def _int32_on(name: str, x, device):
    """An int32 index array (offsets, lengths, a page table) on the inputs' device (device None:
    a traced value's shape and dtype alone, as cupyflash.jax checks them)."""
    if device is not None:
        x = as_array(x, name)
        if _device_of(x) != device:
            raise ValueError(f"{name} is on {_device_text(_device_of(x))} but the inputs are on "
                             f"{_device_text(device)}: it must live beside the arrays it indexes")
    if x.dtype != np.int32:
        raise ValueError(f"{name} must have dtype int32, got {dtype_name(x.dtype)}")
    return x


def check_offsets(cu_seqlens_q, cu_seqlens_k, device) -> tuple:
    """cu_seqlens_q, cu_seqlens_k: int32, 1-D, batch + 1 >= 2 entries each, on ``device``."""
    out = []
    for name, x in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        x = _int32_on(name, x, device)
        if x.ndim != 1 or x.shape[0] < 2:
            raise ValueError(f"{name} must be 1-D with batch + 1 >= 2 entries (offsets of the sequences' first "
                             f"rows, then the total), got shape {tuple(x.shape)}")
        out.append(x)
    if out[0].shape != out[1].shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both have batch + 1 entries, got "
                         f"{out[0].shape[0]} and {out[1].shape[0]}")
    return tuple(out)


def _check_max_seqlen(name: str, value):
    if value is None:
        return None
    value = _check_int(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_cu_values(name: str, values: np.ndarray, total: int, rows: str) -> int:
    """Host copies of the offsets: 0 first, non-decreasing, ``total`` last. Returns the longest
    sequence; a bad value is a ValueError naming its index."""
    if values[0] != 0:
        raise ValueError(f"{name}[0] must be 0 (the first sequence starts at row 0), got {int(values[0])}")
    steps = np.diff(values.astype(np.int64))
    bad = np.flatnonzero(steps < 0)
    if bad.size:
        i = int(bad[0]) + 1
        raise ValueError(f"{name}[{i}] = {int(values[i])} is less than {name}[{i - 1}] = {int(values[i - 1])}: "
                         "the offsets must be non-decreasing (a sequence cannot have negative length)")
    if values[-1] != total:
        raise ValueError(f"{name}[{values.shape[0] - 1}] = {int(values[-1])} must equal {rows} = {total}, the rows "
                         "of the packed arrays (every row belongs to one sequence)")
    return int(steps.max(initial=0))


def check_packing(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, shape: AttentionShape, device) -> Packing:
    """The offsets and longest lengths of a packed call. The NumPy path always reads and checks
    the offsets. The GPU path reads them (a host synchronisation) only to compute a max_seqlen
    that was not given; given both, it trusts the offsets (documented)."""
    cu_q, cu_k = check_offsets(cu_seqlens_q, cu_seqlens_k, device)
    max_q = _check_max_seqlen("max_seqlen_q", max_seqlen_q)
    max_k = _check_max_seqlen("max_seqlen_k", max_seqlen_k)
    on_gpu = device != "cpu"
    if on_gpu:  # the kernels read them as dense int32 arrays
        cu_q, cu_k = (c if c.flags.c_contiguous else c.copy() for c in (cu_q, cu_k))
    if on_gpu and (max_q is None or max_k is None) and capturing(device):
        raise ValueError("max_seqlen_q and max_seqlen_k must be given while CuPy's current stream captures a CUDA "
                         "graph: without them the offsets are read to the host, which cannot happen in a capture")
    if not on_gpu or max_q is None or max_k is None:  # one host read for both
        longest = [check_cu_values(f"cu_seqlens_{n}", c.get() if on_gpu else c, total, f"total_{n}")
                   for n, c, total in (("q", cu_q, shape.seqlen_q), ("k", cu_k, shape.seqlen_k))]
        for n, given, most in zip("qk", (max_q, max_k), longest):
            if given is not None and given < most:
                raise ValueError(f"max_seqlen_{n} = {given} is less than the longest sequence, {most} rows")
        max_q, max_k = (most if given is None else given for given, most in zip((max_q, max_k), longest))
    return Packing(cu_q, cu_k, cu_q.shape[0] - 1, max_q, max_k)


def check_like(name: str, x, shape: tuple, dtype, what: str):
    """An array the caller passed in that must have a given shape and dtype (same device checked elsewhere)."""
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} ({what}), got {tuple(x.shape)}")
    if x.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype_name(dtype)} ({what}), got {dtype_name(x.dtype)}")
    _check_last_dim_contiguous(name, x)


def _check_writable(name: str, x, what: str):
    """x can be written in place: not read-only, no two elements at one address."""
    if isinstance(x, np.ndarray) and not x.flags.writeable:
        raise ValueError(f"{name} is read-only: it receives {what}")
    for axis, (n, st) in enumerate(zip(x.shape, x.strides)):
        if n > 1 and st == 0:
            raise ValueError(f"{name} has stride 0 on axis {axis} (a broadcast view): its elements "
                             f"overlap, so it cannot receive {what}")


def check_output_buffer(name: str, x, shape: tuple, dtype, like_device, *, c_contiguous: bool = False):
    """A preallocated output: right shape, dtype, device, writable, last dim contiguous, no two
    elements at one address; C-contiguous too where the kernels write it as a flat block (lse)."""
    x = as_array(x, name)
    if _device_of(x) != like_device:
        raise ValueError(f"{name} is on {_device_text(_device_of(x))} but the inputs are on "
                         f"{_device_text(like_device)}")
    check_like(name, x, shape, dtype, "the output it receives")
    _check_writable(name, x, "an output")
    if c_contiguous and not x.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (it is written as one dense {tuple(shape)} "
                         f"block), got strides {x.strides}")
    return x


def check_workspace(workspace, shape: AttentionShape, device, packed: bool = False):
    """The (D, dQ accumulator) pair from backward_workspace, for this problem and device (packed:
    for (total_q, heads, head_dim) queries, without the batch axis)."""
    if not (isinstance(workspace, tuple) and len(workspace) == 2):
        raise TypeError("workspace must be the pair returned by cupyflash.backward_workspace(q)")
    want = ((shape.batch, shape.heads, shape.seqlen_q),
            (shape.batch, shape.heads, shape.seqlen_q, shape.head_dim))
    if packed:
        want = tuple(w[1:] for w in want)
    for name, x, w in zip(("workspace[0]", "workspace[1]"), workspace, want):
        if not is_cupy_array(x) or x.dtype != np.float32 or tuple(x.shape) != w or not x.flags.c_contiguous:
            raise ValueError(f"{name} must be a C-contiguous float32 cupy array of shape {w}: "
                             "use cupyflash.backward_workspace(q)")
        if x.device.id != device:
            raise ValueError(f"{name} is on GPU {x.device.id} but the inputs are on GPU {device}")
    return workspace


def check_kvcache_workspace(workspace, device):
    """Split-KV's scratch from kvcache_workspace: a 1-D C-contiguous float32 cupy array on the
    inputs' device (whether it is large enough depends on the call's splits: checked where they are known)."""
    if not is_cupy_array(workspace) or workspace.dtype != np.float32 or workspace.ndim != 1 \
            or not workspace.flags.c_contiguous:
        raise ValueError("workspace must be the 1-D float32 cupy array returned by cupyflash.kvcache_workspace")
    if workspace.device.id != device:
        raise ValueError(f"workspace is on GPU {workspace.device.id} but the inputs are on GPU {device}")
    return workspace


def capturing(device: int) -> bool:
    """Does CuPy's current stream on ``device`` capture a CUDA graph? (The legacy default stream cannot.)"""
    stream = _cupy().cuda.get_current_stream(device)
    return stream.ptr != 0 and stream.is_capturing()


def check_graph_capture(device: int, needed: dict, in_place: dict, dense: dict):
    """While CuPy's current stream on ``device`` captures a CUDA graph nothing may be allocated
    (a buffer freed after the call would be reused while the graph still writes it): every
    output and the workspace must be given (``needed``), the arrays in ``in_place`` must be
    usable by the kernels without an aligned copy, and those in ``dense`` C-contiguous."""
    if not capturing(device):
        return
    missing = [n for n, x in needed.items() if x is None]
    if missing:
        raise ValueError(f"CuPy's current stream is capturing a CUDA graph, so nothing may be "
                         f"allocated: pass {', '.join(n + '=' for n in missing)} (preallocated "
                         "outside the capture; the workspace from cupyflash.backward_workspace or "
                         "cupyflash.kvcache_workspace)")
    from ._cuda_backend import _aligned
    for n, x in in_place.items():
        if not _aligned(x):
            raise ValueError(f"{n} would be copied to an aligned buffer (its data pointer or "
                             "batch/seqlen/heads strides are not multiples of 16 bytes), which "
                             "cannot happen during CUDA-graph capture: pass an aligned array")
    for n, x in dense.items():
        if not x.flags.c_contiguous:
            raise ValueError(f"{n} would be copied to a C-contiguous buffer, which cannot happen "
                             "during CUDA-graph capture: pass a C-contiguous array")


def _check_int(name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def _check_per_head(name: str, x, shapes: tuple, input_dtype, device, rule: str):
    """A float32 per-head array (float64 too for float64 inputs) of one of ``shapes``, on ``device``
    (device None: a traced value's shape and dtype alone, as cupyflash.jax checks them)."""
    if device is not None:
        x = as_array(x, name)
        if _device_of(x) != device:
            raise ValueError(f"{name} is on {_device_text(_device_of(x))} but the inputs are on {_device_text(device)}")
    allowed = (np.dtype(np.float32),) + ((np.dtype(np.float64),) if np.dtype(input_dtype) == np.float64 else ())
    if x.dtype not in allowed:
        raise ValueError(f"{name} must have dtype {' or '.join(dtype_name(d) for d in allowed)}, got {dtype_name(x.dtype)}")
    if tuple(x.shape) not in shapes:
        raise ValueError(f"{name} must have shape {' or '.join(str(s) for s in shapes)} ({rule}), got {tuple(x.shape)}")
    return x


def check_variants(shape: AttentionShape, dtype, device, causal: bool, window_size, softcap, alibi_slopes, sinks):
    """window_size, softcap, alibi_slopes, sinks (issue 14's variants) -> a Variants."""
    from ._variants import UNBOUNDED, Variants
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size must be a pair (left, right) of ints, got {window_size!r}")
    left, right = (_check_int(f"window_size[{n}]", w) for n, w in enumerate(window_size))
    for n, w in enumerate((left, right)):
        if w < UNBOUNDED:
            raise ValueError(f"window_size[{n}] must be >= -1 (-1: unbounded), got {w}")
    if isinstance(softcap, (bool, np.bool_)) or not isinstance(softcap, (int, float, np.integer, np.floating)):
        raise TypeError(f"softcap must be a real number, got {type(softcap).__name__}")
    if not math.isfinite(float(softcap)) or softcap < 0:
        raise ValueError(f"softcap must be finite and >= 0 (0: no softcap), got {softcap!r}")
    H, B = shape.heads, shape.batch
    if alibi_slopes is not None:
        alibi_slopes = _check_per_head("alibi_slopes", alibi_slopes, ((H,), (B, H)), dtype, device,
                                       "one slope per query head, or per batch and query head")
    if sinks is not None:
        sinks = _check_per_head("sinks", sinks, ((H,),), dtype, device, "one sink logit per query head")
    return Variants.of(causal, (left, right), float(softcap), alibi_slopes, sinks)


def check_user_terms(variants, shape: AttentionShape, dtype, device, mask_mod, bias_mod, aux, bias, mask,
                     block_mask=None, dropout_p=0.0, seed=None):
    """mask_mod, bias_mod (C++ expression strings, cupyflash._expr), their aux arrays, the dense
    bias and mask tensors (broadcastable to (B, H_q, Sq, Sk)), a block mask and dropout -> the
    Variants with them."""
    from dataclasses import replace
    from . import _expr
    dropout_p, seed = check_dropout(dropout_p, seed)
    if (mask_mod is None and bias_mod is None and aux is None and bias is None and mask is None and block_mask is None
            and dropout_p == 0):
        return variants
    if block_mask is not None:
        from .blockmask import BlockMask
        if not isinstance(block_mask, BlockMask):
            raise TypeError(f"block_mask must be a cupyflash.BlockMask (from cupyflash.block_mask), got "
                            f"{type(block_mask).__name__}")
        want = (shape.batch, shape.heads, shape.seqlen_q, shape.seqlen_k)
        if tuple(block_mask.shape) != want:
            raise ValueError(f"block_mask was made for (batch, heads, seqlen_q, seqlen_k) = {tuple(block_mask.shape)} "
                             f"but the call is {want}")
    aux_arrays = _check_aux(aux, device)
    kinds = {n: _expr.array_kind(a) for n, a in aux_arrays}
    exprs = {}
    for what, text in (("mask_mod", mask_mod), ("bias_mod", bias_mod)):
        if text is None:
            continue
        e = _expr.parse(what, text)
        unknown = sorted(e.names - set(_expr.INDEX_NAMES) - kinds.keys())
        if unknown:
            raise ValueError(f"{what} reads {', '.join(map(repr, unknown))}, which is neither an index "
                             f"({', '.join(_expr.INDEX_NAMES)}) nor an aux array ({', '.join(kinds) or 'none given'})")
        kind = _expr.kind_of(e, kinds)
        if what == "mask_mod" and kind == "float":
            raise ValueError(f"mask_mod must be a bool (or int) expression, got a float one: {text!r}")
        exprs[what] = e
    if device != "cpu":
        _check_aux_for_kernels(exprs.values(), dict(aux_arrays))
    full = (shape.batch, shape.heads, shape.seqlen_q, shape.seqlen_k)
    tensors = {}
    for name, t, want in (("bias", bias, "float"), ("mask", mask, "bool")):
        if t is None:
            continue
        t = as_array(t, name)
        if _device_of(t) != device:
            raise ValueError(f"{name} is on {_device_text(_device_of(t))} but the inputs are on {_device_text(device)}")
        if t.ndim > 4 or any(n not in (1, f) for n, f in zip(t.shape[::-1], full[::-1])):
            raise ValueError(f"{name} must broadcast to (batch, heads, seqlen_q, seqlen_k) = {full}: each axis that "
                             f"size or 1 (leading axes may be left out), got shape {tuple(t.shape)}")
        if want == "bool" and t.dtype != np.bool_:
            raise ValueError(f"mask must have dtype bool (True: keep the key), got {dtype_name(t.dtype)}")
        if want == "float" and t.dtype.kind != "f":
            raise ValueError(f"bias must be a float array, got {dtype_name(t.dtype)}")
        tensors[name] = t.reshape((1,) * (4 - t.ndim) + tuple(t.shape))
    out = replace(variants, mask_mod=exprs.get("mask_mod"), bias_mod=exprs.get("bias_mod"), aux=aux_arrays,
                  bias=tensors.get("bias"), mask=tensors.get("mask"), block_mask=block_mask, dropout_p=dropout_p,
                  seed=seed)
    if device != "cpu":
        check_kernel_arrays(out)
    return out


def check_kernel_arrays(variants, dbias: bool = False) -> None:
    """The arrays a GPU call's masks and biases read (and, with ``dbias``, the dbias accumulator the
    backward writes) fit the kernels' MAX_AUX slots (UserParams)."""
    from ._launch import MAX_AUX
    from ._sources import user_terms
    read = len(user_terms(variants)[1])
    if read + dbias > MAX_AUX:
        raise ValueError(f"the call's masks and biases read {read} arrays on the GPU (aux arrays that mask_mod and "
                         f"bias_mod read, bias, mask, a block mask's blocks and its aux)"
                         f"{', and return_dbias=True writes one more' if dbias else ''}; the kernels take at most "
                         f"{MAX_AUX}")


def check_dropout(dropout_p, seed) -> tuple[float, int]:
    """dropout_p in [0, 1) and, with dropout, a seed in [0, 2^64) -> (p, seed) (seed 0 without dropout)."""
    if isinstance(dropout_p, (bool, np.bool_)) or not isinstance(dropout_p, (int, float, np.integer, np.floating)):
        raise TypeError(f"dropout_p must be a real number, got {type(dropout_p).__name__}")
    if not 0 <= float(dropout_p) < 1:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if dropout_p == 0:
        return 0.0, 0
    if seed is None:
        raise ValueError("dropout_p > 0 needs seed= (an int): the backward pass regenerates the mask from it, and "
                         "the same seed gives the same result")
    seed = _check_int("seed", seed)
    if not 0 <= seed < 2 ** 64:
        raise ValueError(f"seed must be in [0, 2^64), got {seed}")
    return float(dropout_p), seed


def check_dbias(variants, bias, dbias, return_dbias, dtype, device, full: tuple, deterministic: bool = False):
    """The buffer, shaped like the caller's ``bias``, for d loss / d bias (allocated here when not
    given), or None without return_dbias (``full``: (batch, heads, seqlen_q, seqlen_k)). On the GPU
    the kernels add into a float32 accumulator of
    the bias's 4-D shape (an atomic per logit where the bias broadcasts): that sum's order is not
    fixed, so deterministic=True takes only a bias without broadcast axes."""
    return_dbias = check_bool("return_dbias", return_dbias)
    if not return_dbias:
        if dbias is not None:
            raise ValueError("dbias receives the gradient of bias: pass it with return_dbias=True")
        return None
    if variants.bias is None:
        raise ValueError("return_dbias=True needs the bias tensor the forward call added (bias=)")
    shape = tuple(as_array(bias, "bias").shape)
    want = np.dtype(np.float64 if np.dtype(dtype) == np.float64 else np.float32)
    if device != "cpu":
        if capturing(device):
            raise ValueError("return_dbias=True allocates and zeroes its float32 accumulator, which cannot happen "
                             "while CuPy's current stream captures a CUDA graph")
        check_kernel_arrays(variants, dbias=True)
        if deterministic and tuple(variants.bias.shape) != tuple(full):
            raise ValueError(f"return_dbias=True with deterministic=True needs a bias of the full (batch, heads, "
                             f"seqlen_q, seqlen_k) shape: bias {shape} broadcasts, and the GPU sums dbias over its "
                             f"broadcast axes with atomics, in no fixed order")
    if dbias is None:
        if device == "cpu":
            return np.empty(shape, want)
        import cupy
        with cupy.cuda.Device(device):
            return cupy.empty(shape, want)
    return check_output_buffer("dbias", dbias, shape, want, device)


def _check_aux(aux, device) -> tuple:
    """aux: a dict of identifier -> array (int, float or bool) on the inputs' device."""
    from . import _expr
    if aux is None:
        return ()
    if not isinstance(aux, dict):
        raise TypeError(f"aux must be a dict of name -> array, got {type(aux).__name__}")
    out = []
    for name, a in aux.items():
        if not isinstance(name, str) or not name.isidentifier() or name in _expr.INDEX_NAMES \
                or name in _expr.FUNCTIONS or name in ("true", "false"):
            raise ValueError(f"aux name {name!r} must be an identifier other than {', '.join(_expr.INDEX_NAMES)}, "
                             "a function's or true/false")
        a = as_array(a, f"aux[{name!r}]")
        if _device_of(a) != device:
            raise ValueError(f"aux[{name!r}] is on {_device_text(_device_of(a))} but the inputs are on "
                             f"{_device_text(device)}")
        if a.ndim == 0 or a.dtype.kind not in "biuf" or a.dtype.itemsize > 8:
            raise ValueError(f"aux[{name!r}] must be an array of at least one axis of ints, floats or bools, got "
                             f"{dtype_name(a.dtype)} of shape {tuple(a.shape)}")
        out.append((name, a))
    return tuple(out)


def _check_aux_for_kernels(exprs, aux: dict) -> None:
    """The aux arrays that the GPU's expressions read: at most MAX_AUX of at most AUX_AXES axes each
    (the kernels' UserParams), of a dtype the kernels read, each axis below 2^31."""
    from . import _expr
    from ._launch import AUX_AXES, MAX_AUX
    read = [n for n in aux if any(n in e.names for e in exprs)]
    if len(read) > MAX_AUX:
        raise ValueError(f"mask_mod and bias_mod read {len(read)} aux arrays ({', '.join(read)}); the GPU kernels take "
                         f"at most {MAX_AUX}")
    for n in read:
        a = aux[n]
        if a.ndim > AUX_AXES or a.dtype.str not in _expr.CPP_TYPES or max(a.shape) >= 2 ** 31:
            raise ValueError(f"aux[{n!r}] on the GPU must have at most {AUX_AXES} axes, each below 2^31, and a bool, "
                             f"int or float dtype of 1-8 bytes; got {dtype_name(a.dtype)} of shape {tuple(a.shape)}")


# ---- attention against a KV cache ----

@dataclass(frozen=True)
class CacheLayout:
    """A validated KV cache: dense (B, S_max, H_kv, D) or paged (num_pages, page_size, H_kv, D)
    with a page table (B, pages per sequence); ``capacity``: the positions one sequence can hold."""
    page_table: object
    capacity: int
    new_tokens: int  # S_new, the tokens appended by this call


def check_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, page_table, device):
    """Shapes, dtypes, devices and layouts of a KV-cache call (q and the caches already arrays on
    one device with one dtype) -> (AttentionShape of q against a full cache, CacheLayout,
    cache_seqlens, k, v)."""
    if q.ndim != 4:
        raise ValueError(f"q must have 4 dimensions (batch, seqlen_q, heads, head_dim), got shape {tuple(q.shape)}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.ndim != 4:
            raise ValueError(f"{name} must have 4 dimensions ((batch, seqlen_max, heads_kv, head_dim), or "
                             f"(num_pages, page_size, heads_kv, head_dim) with a page_table), got shape {tuple(c.shape)}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    B, Sq, H, D = q.shape
    _, rows, H_kv, D_kv = k_cache.shape
    if D_kv != D:
        raise ValueError(f"k_cache has head_dim {D_kv} but q has {D}: head_dim must match")
    _check_heads_and_dim(H, H_kv, H_kv, D)
    if page_table is None:
        if k_cache.shape[0] != B:
            raise ValueError(f"k_cache has {k_cache.shape[0]} sequences but q has batch {B} (a dense cache is "
                             "(batch, seqlen_max, heads_kv, head_dim); pass page_table= for a paged one)")
        capacity = rows
    else:
        if rows < 16 or rows & (rows - 1):
            raise ValueError(f"a paged cache's page_size (k_cache.shape[1]) must be a power of two >= 16, got {rows}")
        page_table = _int32_on("page_table", page_table, device)
        if page_table.ndim != 2 or page_table.shape[0] != B:
            raise ValueError(f"page_table must have shape (batch, pages_per_sequence) = ({B}, n), got "
                             f"{tuple(page_table.shape)}")
        if page_table.shape[1] > 1 and page_table.strides[1] != page_table.itemsize:
            raise ValueError("page_table's rows must be contiguous (the kernels read a sequence's pages as one row)")
        capacity = page_table.shape[1] * rows
    if cache_seqlens is not None:
        cache_seqlens = _int32_on("cache_seqlens", cache_seqlens, device)
        if tuple(cache_seqlens.shape) != (B,):
            raise ValueError(f"cache_seqlens must have shape {(B,)} (the tokens already in each sequence's cache), "
                             f"got {tuple(cache_seqlens.shape)}")
        if B > 1 and cache_seqlens.strides[0] != cache_seqlens.itemsize:
            raise ValueError("cache_seqlens must be contiguous (the kernels read it as one int32 row)")
    if (k is None) != (v is None):
        raise ValueError("k and v are the new tokens' keys and values: pass both or neither")
    new_tokens = 0
    if k is not None:
        k, v = as_array(k, "k"), as_array(v, "v")
        for name, x in (("k", k), ("v", v)):
            if _device_of(x) != device:
                raise ValueError(f"{name} is on {_device_text(_device_of(x))} but the inputs are on {_device_text(device)}")
            if x.ndim != 4 or (x.shape[0], x.shape[2], x.shape[3]) != (B, H_kv, D) or x.shape[1] != k.shape[1]:
                raise ValueError(f"{name} must have shape (batch, seqlen_new, heads_kv, head_dim) = ({B}, S_new, {H_kv}, "
                                 f"{D}) like the other new tokens, got {tuple(x.shape)}")
            if x.dtype != q.dtype:
                raise ValueError(f"{name} must have q's dtype {dtype_name(q.dtype)}, got {dtype_name(x.dtype)}")
            _check_last_dim_contiguous(name, x)
        new_tokens = k.shape[1]
        if cache_seqlens is None:
            raise ValueError("appending k and v needs cache_seqlens (where each sequence's new tokens go); without it "
                             "every cache is taken as full")
        if new_tokens > capacity:
            raise ValueError(f"k holds {new_tokens} new tokens per sequence but the cache holds at most {capacity}")
        for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
            _check_writable(name, c, "the new tokens")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_last_dim_contiguous(name, c)
    shape = AttentionShape(B, Sq, capacity, H, D, H_kv)
    return shape, CacheLayout(page_table, capacity, new_tokens), cache_seqlens, k, v


def check_cache_values(lengths: np.ndarray, layout: CacheLayout, num_pages: int):
    """Host copies of cache_seqlens (and the page table): every sequence's tokens, the new ones
    included, fit its cache, and every page it uses exists. A bad value names its index."""
    for b, n in enumerate(lengths.tolist()):
        if n < 0:
            raise ValueError(f"cache_seqlens[{b}] = {n} is negative")
        if n + layout.new_tokens > layout.capacity:
            raise ValueError(f"cache_seqlens[{b}] = {n} plus {layout.new_tokens} new tokens exceeds the cache's "
                             f"{layout.capacity} positions")
    if layout.page_table is not None:
        page_size = layout.capacity // layout.page_table.shape[1]
        for b, n in enumerate(lengths.tolist()):
            used = layout.page_table[b, :-(-(n + layout.new_tokens) // page_size)]
            bad = np.flatnonzero((used < 0) | (used >= num_pages))
            if bad.size:
                p = int(bad[0])
                raise ValueError(f"page_table[{b}, {p}] = {int(used[p])} is not a page of the cache (0 .. {num_pages - 1})")


def check_num_splits(num_splits) -> int:
    num_splits = _check_int("num_splits", num_splits)
    if num_splits < 0:
        raise ValueError(f"num_splits must be >= 0 (0: chosen by cupyflash), got {num_splits}")
    return num_splits
