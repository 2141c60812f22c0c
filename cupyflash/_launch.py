"""The one launch layer: the only module that builds kernel arguments and calls RawKernels.

Every scalar is cast explicitly to its C type (CuPy would pass a Python int as 64-bit),
parameters travel as one struct by value (bytes packed in the layout of numpy structured
dtypes that mirror the C++ structs in kernels_cu/params.cuh), and dynamic shared memory above
the 48 KB default is requested only after checking the device's opt-in limit.
"""
from __future__ import annotations

import ctypes
import functools
import struct

import numpy as np
import cupy
from cupy.cuda import driver

from . import _tma
from ._compile import NVRTC_OPTIONS, nvrtc_arch
from ._config import DecodeSet, KernelSet
from ._sources import kernel_source

_TENSOR_REF = np.dtype({"names": ["ptr", "stride_b", "stride_s", "stride_h"],
                        "formats": [np.uint64, np.int64, np.int64, np.int64]}, align=True)
_COMMON = [("batch", np.int32), ("heads", np.int32), ("seqlen_q", np.int32), ("seqlen_k", np.int32),
           ("head_dim", np.int32)]
#: UserParams: the aux arrays of mask_mod and bias_mod (MAX_AUX pointers, AUX_AXES extents each)
MAX_AUX, AUX_AXES = 4, 4
USER_PARAMS = np.dtype([*((f"aux{a}", np.uint64) for a in range(MAX_AUX)),
                        *((f"extent{a}_{x}", np.int32) for a in range(MAX_AUX) for x in range(AUX_AXES))], align=True)
VARIANT_PARAMS = np.dtype([("alibi", np.uint64), ("sinks", np.uint64), ("dsinks", np.uint64), ("alibi_stride_b", np.int64),
                           ("group_mul", np.uint32), ("group", np.int32), ("window_left", np.int32),
                           ("window_right", np.int32), ("softcap_in", np.float32), ("softcap_out", np.float32),
                           ("inv_scale", np.float32), ("new_k", np.int32), ("cu_seqlens_q", np.uint64),
                           ("cu_seqlens_k", np.uint64), ("seqused_k", np.uint64), ("user", USER_PARAMS),
                           ("seed", np.uint64), ("drop_threshold", np.uint32), ("drop_scale", np.float32)], align=True)
FWD_PARAMS = np.dtype([("q", _TENSOR_REF), ("k", _TENSOR_REF), ("v", _TENSOR_REF), ("o", _TENSOR_REF),
                       ("lse", np.uint64), *_COMMON, ("scale_log2", np.float32), ("var", VARIANT_PARAMS)], align=True)
BWD_PARAMS = np.dtype([("q", _TENSOR_REF), ("k", _TENSOR_REF), ("v", _TENSOR_REF), ("o", _TENSOR_REF),
                       ("dout", _TENSOR_REF), ("dq", _TENSOR_REF), ("dk", _TENSOR_REF), ("dv", _TENSOR_REF),
                       ("lse", np.uint64), ("dsum", np.uint64), ("dq_accum", np.uint64), *_COMMON,
                       ("scale", np.float32), ("scale_log2", np.float32), ("var", VARIANT_PARAMS)], align=True)

APPEND_PARAMS = np.dtype([("k_new", _TENSOR_REF), ("v_new", _TENSOR_REF), ("k_cache", _TENSOR_REF),
                          ("v_cache", _TENSOR_REF), ("cache_seqlens", np.uint64), ("page_table", np.uint64),
                          ("page_table_stride", np.int64), ("new_tokens", np.int32),
                          ("capacity", np.int32), ("page_size", np.int32), ("num_pages", np.int32),
                          ("head_dim", np.int32), ("pad_", np.int32)], align=True)

DECODE_PARAMS = np.dtype([("fwd", FWD_PARAMS), ("page_table", np.uint64), ("o_partial", np.uint64),
                          ("lse_partial", np.uint64), ("page_table_stride", np.int64), ("page_shift", np.int32),
                          ("num_pages", np.int32), ("num_splits", np.int32), ("pad_", np.int32)], align=True)

# DecodeParams and the TMA tensor maps of the K and V caches
DECODE_MAPS = np.dtype({"names": ["dec", "k", "v"], "formats": [DECODE_PARAMS] + [f"V{_tma.DESC_BYTES}"] * 2,
                        "offsets": [0, 448, 576], "itemsize": 704})

# FwdParams and the TMA tensor maps of q, k, v (TmaDesc: 128 bytes, 64-byte aligned)
FWD_SM90_PARAMS = np.dtype({"names": ["fwd", "q", "k", "v"], "formats": [FWD_PARAMS] + [f"V{_tma.DESC_BYTES}"] * 3,
                            "offsets": [0, 384, 512, 640], "itemsize": 768})

# BwdParams and the tensor maps of q, k, v, dout
BWD_SM90_PARAMS = np.dtype({"names": ["bwd", "q", "k", "v", "dout"], "formats": [BWD_PARAMS] + [f"V{_tma.DESC_BYTES}"] * 4,
                            "offsets": [0, 512, 640, 768, 896], "itemsize": 1024})

# sizeof() of the C++ structs, static_assert-ed in kernels_cu/params.cuh
assert ((_TENSOR_REF.itemsize, VARIANT_PARAMS.itemsize, FWD_PARAMS.itemsize, BWD_PARAMS.itemsize,
         FWD_SM90_PARAMS.itemsize, BWD_SM90_PARAMS.itemsize, APPEND_PARAMS.itemsize, DECODE_PARAMS.itemsize,
         DECODE_MAPS.itemsize, USER_PARAMS.itemsize) == (32, 200, 360, 512, 768, 1024, 176, 408, 704, 96))

DEFAULT_SMEM = 48 * 1024
MAX_GRID_YZ = 65535


def tensor_ref(x: cupy.ndarray) -> tuple:
    """(pointer, batch, seqlen, heads strides in elements) of a (B, S, H, D) array."""
    sb, ss, sh, _ = (s // x.itemsize for s in x.strides)
    return (np.uint64(x.data.ptr), np.int64(sb), np.int64(ss), np.int64(sh))


def tensor_map(x: cupy.ndarray, rows: int) -> bytes:
    """The TMA tensor map of a (B, S, H, D) array for boxes of ``rows`` x 64 (see _tma)."""
    return _tma.tensor_map(x.data.ptr, x.dtype, x.shape, x.strides, rows)


def pack_sm90(dtype: np.dtype, fields: dict, tiles: dict) -> np.ndarray:
    """A Hopper kernel's parameters: its pass's struct (``fields``, the first member of
    ``dtype``), then the TMA tensor map of each ``name: (array, box rows)`` in ``tiles``."""
    inner = dtype.names[0]
    maps = {name: tensor_map(x, rows) for name, (x, rows) in tiles.items()}
    return pack(dtype, **{inner: tuple(fields[n] for n in dtype[inner].names)}, **maps)


def pack(dtype: np.dtype, **fields) -> np.ndarray:
    """The struct's bytes as a one-element array of an opaque itemsize-byte type: CuPy passes
    it to the kernel by value. Every field must be given; a nested struct as a tuple of its
    fields, a tensor map as its bytes. Built with ``struct`` from the dtype's layout (padding
    zero): assigning a tuple into the nested structured array cost 20 us here and far more on
    the lent GPU's host for the Hopper structs (host_path, session 6). Opaque because CuPy reads
    the argument's __array_interface__, which costs ~65 us per launch for the nested structured
    type (numpy describes every field) and ~3 us for raw bytes."""
    if fields.keys() != set(dtype.names):
        raise TypeError(f"kernel parameters: missing {sorted(set(dtype.names) - fields.keys())}, "
                        f"unknown {sorted(fields.keys() - set(dtype.names))}")
    packer, _, opaque, nested = _layout(dtype)
    values = []
    for name, sub in zip(dtype.names, nested):
        if sub is None:
            values.append(fields[name])
        else:
            values.extend(_flatten(sub, fields[name]))
    return np.frombuffer(bytearray(packer.pack(*values)), dtype=opaque)


_STRUCT_CODES = {("u", 8): "Q", ("i", 8): "q", ("u", 4): "I", ("i", 4): "i", ("f", 4): "f", ("f", 8): "d"}


@functools.lru_cache(maxsize=None)
def _layout(dtype: np.dtype) -> tuple:
    """(struct.Struct with ``dtype``'s layout, its format, the opaque itemsize-byte type, per field
    the nested struct's dtype or None): little-endian, explicit padding, a nested struct inline, a
    void field as bytes. Fields must be declared in offset order (as the C++ structs are)."""
    offsets = [dtype.fields[n][1] for n in dtype.names]
    assert offsets == sorted(offsets), f"{dtype}: fields out of offset order"
    parts, pos = [], 0
    for name in dtype.names:
        sub, off = dtype.fields[name][:2]
        parts.append(f"{off - pos}x" if off > pos else "")
        if sub.names:
            parts.append(_layout(sub)[1])
        elif sub.kind == "V":
            parts.append(f"{sub.itemsize}s")
        else:
            parts.append(_STRUCT_CODES[(sub.kind, sub.itemsize)])
        pos = off + sub.itemsize
    fmt = "".join(parts) + (f"{dtype.itemsize - pos}x" if dtype.itemsize > pos else "")
    packer = struct.Struct("<" + fmt)
    assert packer.size == dtype.itemsize, (fmt, dtype)
    nested = tuple(dtype[n] if dtype[n].names else None for n in dtype.names)
    return packer, fmt, np.dtype((np.void, dtype.itemsize)), nested


def _flatten(dtype: np.dtype, value: tuple) -> tuple:
    """A nested struct's field values (a tuple in declaration order), flattened to scalars."""
    nested = _layout(dtype)[3]
    if not any(nested):
        return value
    out = []
    for v, sub in zip(value, nested):
        if sub is None:
            out.append(v)
        else:
            out.extend(_flatten(sub, v))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _module(names: tuple, cc: int, user: str = "") -> cupy.RawModule:
    # One module per set of instantiations, architecture and user expressions (``user``: their
    # source, before the kernels'); CuPy compiles it lazily and caches it on disk. sm_90 builds
    # for sm_90a (wgmma); CuPy's own -arch=sm_90 keeps the suffix.
    options = (*NVRTC_OPTIONS, f"-arch={nvrtc_arch(cc)}") if cc == 90 else NVRTC_OPTIONS
    return cupy.RawModule(code=user + kernel_source(), options=options, name_expressions=list(names))


def _device_module(ks: KernelSet | DecodeSet) -> cupy.RawModule:
    return _module(ks.name_expressions(), int(cupy.cuda.Device().compute_capability), getattr(ks, "user", ""))


@functools.lru_cache(maxsize=None)
def _smem_optin(device_id: int) -> int:
    return int(cupy.cuda.runtime.getDeviceProperties(device_id)["sharedMemPerBlockOptin"])


def _kernel(ks: KernelSet | DecodeSet, name: str, smem: int):
    return _device_kernel(ks.name_expressions(), name, smem, cupy.cuda.Device().id, getattr(ks, "user", ""))


@functools.lru_cache(maxsize=None)
def _device_kernel(names: tuple, name: str, smem: int, dev: int, user: str = ""):
    # Cached per device: the lookup and the shared-memory attribute are set once, not per launch
    # (host time of short calls). Errors are not cached: a call that raises raises every time.
    limit = _smem_optin(dev)
    if smem > limit:
        raise ValueError(
            f"{name} needs {smem} bytes of shared memory per block but GPU {dev} allows {limit}; "
            f"use a smaller head_dim or a GPU with more shared memory (sm_80 and newer have >= 99 KB)")
    try:
        fn = _module(names, int(cupy.cuda.Device(dev).compute_capability), user).get_function(name)
    except cupy.cuda.compiler.CompileException as e:
        if not user:
            raise
        raise ValueError(f"mask_mod / bias_mod did not compile:\n{user}NVRTC: {e}") from None
    if smem > DEFAULT_SMEM:
        fn.max_dynamic_shared_size_bytes = smem
    return fn


def kernel_resources(ks: KernelSet | DecodeSet, name: str) -> tuple[int, int]:
    """(local-memory bytes per thread, registers) of a compiled kernel: local > 0 means spills."""
    fn = _device_module(ks).get_function(name)
    return int(fn.local_size_bytes), int(fn.num_regs)


def _check_grid(grid: tuple) -> tuple:
    if grid[1] > MAX_GRID_YZ or grid[2] > MAX_GRID_YZ:
        raise ValueError(f"heads ({grid[1]}) and batch ({grid[2]}) must each be at most {MAX_GRID_YZ}")
    return tuple(int(g) for g in grid)


class ParamTemplate:
    """A kernel's parameter struct laid out once, with the fields that change from call to call
    left as slots: the data pointers (``pointers``, dotted paths of uint64 fields) and the TMA
    tensor maps (``maps``, paths of 128-byte fields). ``fill`` copies the template's bytes and
    writes those slots in place (a pointer is one 64-bit word of the struct); everything else in
    the struct (shapes, strides, scales) is fixed by the layouts the template was made for."""
    __slots__ = ("values", "pointer_slots", "map_slots", "_bytes", "_pointer_words", "_map_offsets", "_buffer_type")

    def __init__(self, dtype: np.dtype, fields: dict, pointers: tuple = (), maps: tuple = ()):
        packer, _, _, nested = _layout(dtype)
        values = []
        for name, sub in zip(dtype.names, nested):
            values.extend(_flatten(sub, fields[name]) if sub is not None else (fields[name],))
        self.values = values  # as packed: the slots' first pointers and maps included
        self.pointer_slots = tuple(_flat_index(dtype, p) for p in pointers)
        self.map_slots = tuple(_flat_index(dtype, p) for p in maps)
        self._bytes = packer.pack(*values)
        offsets = tuple(_field_offset(dtype, p) for p in pointers)
        assert all(o % 8 == 0 for o in offsets), "pointer fields are 8-byte aligned in the C++ structs"
        self._pointer_words = tuple(o // 8 for o in offsets)
        self._map_offsets = tuple(_field_offset(dtype, p) for p in maps)
        self._buffer_type = ctypes.c_char * packer.size
        assert bytes(self.fill(tuple(values[i] for i in self.pointer_slots),
                               tuple(values[i] for i in self.map_slots))) == pack(dtype, **fields).tobytes()

    def fill(self, pointers: tuple, maps: tuple = ()) -> "FilledParams":
        """The struct's bytes with these pointers and maps (in the order of the paths), ready for
        ``PreparedLaunch``."""
        buf = bytearray(self._bytes)
        words = memoryview(buf).cast("Q")
        for w, ptr in zip(self._pointer_words, pointers):
            words[w] = ptr
        words.release()
        for off, m in zip(self._map_offsets, maps):
            buf[off:off + _tma.DESC_BYTES] = m  # a map of another size would change the struct's: from_buffer refuses
        return FilledParams(self._buffer_type.from_buffer(buf))


class FilledParams:
    """A packed parameter struct and cuLaunchKernel's argument array (one pointer, to the struct),
    made once: a plan that launches with the same pointers again reuses both, read-only (the
    driver copies the bytes at each launch)."""
    __slots__ = ("buffer", "_args", "args")

    def __init__(self, buffer):
        self.buffer = buffer
        self._args = (ctypes.c_void_p * 1)(ctypes.addressof(buffer))
        self.args = ctypes.addressof(self._args)  # what cuLaunchKernel's kernelParams receives

    def __bytes__(self) -> bytes:
        return bytes(self.buffer)


def _flat_index(dtype: np.dtype, path: str) -> int:
    """Where a field given as a dotted path ("fwd.q.ptr") stands among the struct's values as
    ``pack`` flattens them (nested structs inline, in declaration order)."""
    head, _, rest = path.partition(".")
    index = 0
    for name in dtype.names:
        sub = dtype[name]
        if name == head:
            return index + (_flat_index(sub, rest) if rest else 0)
        index += _flat_count(sub)
    raise KeyError(path)


def _field_offset(dtype: np.dtype, path: str) -> int:
    """The byte offset of a field given as a dotted path ("fwd.q.ptr") in the struct."""
    offset = 0
    for name in path.split("."):
        dtype, at = dtype.fields[name][:2]
        offset += at
    return offset


def _flat_count(dtype: np.dtype) -> int:
    return sum(_flat_count(dtype[n]) for n in dtype.names) if dtype.names else 1


class PreparedLaunch:
    """One kernel of a KernelSet ready to launch on the current device: its CUfunction (compiled
    and loaded at construction, with the shared-memory limit raised), grid, block and dynamic
    shared memory. A call launches it on a stream with a filled ParamTemplate through the
    driver's cuLaunchKernel: no per-call argument conversion (CuPy's RawKernel call reads each
    argument's array interface)."""
    __slots__ = ("name", "function", "grid", "threads", "smem")

    def __init__(self, ks: KernelSet | DecodeSet, name: str, grid: tuple, threads: int, smem: int):
        self.name = name
        self.grid = _check_grid(grid)
        self.threads = int(threads)
        self.smem = int(smem)
        self.function = _kernel(ks, name, self.smem).kernel.ptr

    def __call__(self, stream_ptr: int, params: FilledParams) -> None:
        # cuLaunchKernel copies the argument bytes before it returns: params may go right after
        gx, gy, gz = self.grid
        driver.launchKernel(self.function, gx, gy, gz, self.threads, 1, 1, self.smem, stream_ptr, params.args, 0)
