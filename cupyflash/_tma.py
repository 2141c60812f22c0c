"""TMA tensor maps (the driver's CUtensorMap) for the Hopper kernels, encoded with
``cuTensorMapEncodeTiled`` from the CUDA driver library through ctypes: CuPy 14 has no binding
for it, and the driver is already loaded by CuPy.

A (B, S, H, D) tensor is described as dimensions (D, H, S, B), innermost first, and copied in
boxes of 64 head_dim columns x ``rows`` sequence positions of one head, written to shared memory
in the 128-byte swizzle (kernels_cu/hopper.cuh, ``tma_load_tile``). Positions outside the
tensor (rows past the sequence, columns past head_dim) arrive as zeros.
"""
from __future__ import annotations

import ctypes
import functools
import sys

import numpy as np

from ._dtypes import BFLOAT16, FLOAT16

# CUtensorMapDataType, CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill (cuda.h)
_DATA_TYPE = {np.dtype(FLOAT16): 6, np.dtype(BFLOAT16): 9}
_INTERLEAVE_NONE = 0
_SWIZZLE_128B = 3
_L2_PROMOTION_256B = 3
_OOB_FILL_ZEROS = 0
BOX_COLS = 64       # one 128-byte swizzled line of 16-bit elements
DESC_BYTES = 128    # sizeof(CUtensorMap)
_STRIDE_ALIGN = 16  # global strides and the base address: multiples of 16 bytes


@functools.lru_cache(maxsize=1)
def _encode_fn():
    name = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    fn = ctypes.CDLL(name).cuTensorMapEncodeTiled
    fn.restype = ctypes.c_int
    u32p, u64p = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p, u32p, u32p,
                   ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return fn


def encodable(ptr: int, shape: tuple, strides: tuple) -> bool:
    """Whether TMA can read a (B, S, H, D) tensor in place: a 16-byte-aligned base and positive
    (batch, seqlen, heads) byte strides that are multiples of 16 wherever the axis has more than
    one element (head_dim is contiguous, checked at the boundary)."""
    return ptr % _STRIDE_ALIGN == 0 and all(
        n == 1 or (s > 0 and s % _STRIDE_ALIGN == 0) for n, s in zip(shape[:3], strides[:3]))


@functools.lru_cache(maxsize=512)
def _encode(ptr: int, dtype: np.dtype, shape: tuple, strides: tuple, rows: int) -> bytes:
    """cuTensorMapEncodeTiled's 128-byte map of the (B, S, H, D) tensor at ``ptr`` (cached: a map
    depends on nothing but these arguments)."""
    B, S, H, D = shape
    sb, ss, sh = (s if n > 1 else _STRIDE_ALIGN for n, s in zip((B, S, H), strides[:3]))  # unused strides
    dims = (ctypes.c_uint64 * 4)(D, H, S, B)
    byte_strides = (ctypes.c_uint64 * 3)(sh, ss, sb)
    box = (ctypes.c_uint32 * 4)(BOX_COLS, 1, rows, 1)
    element_strides = (ctypes.c_uint32 * 4)(1, 1, 1, 1)
    raw = ctypes.create_string_buffer(DESC_BYTES + 64)
    desc = ctypes.addressof(raw) + (-ctypes.addressof(raw)) % 64  # the driver wants 64-byte alignment
    err = _encode_fn()(desc, _DATA_TYPE[np.dtype(dtype)], 4, ptr, dims, byte_strides, box, element_strides,
                       _INTERLEAVE_NONE, _SWIZZLE_128B, _L2_PROMOTION_256B, _OOB_FILL_ZEROS)
    if err != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed (CUresult {err}) for shape {shape}, byte strides "
                           f"{strides}, box {rows} x {BOX_COLS}: please report this as a cupyflash bug")
    return ctypes.string_at(desc, DESC_BYTES)


# addresses aligned to 16 bytes only, to 4 KB and to 256 MB (the encoder reads no memory): the
# rest of the map must not depend on the address's alignment either
_PROBES = ((1 << 24) + 16, 3 << 12, 3 << 28)


@functools.lru_cache(maxsize=512)
def _map_after_address(dtype: np.dtype, shape: tuple, strides: tuple, rows: int) -> bytes | None:
    """The bytes of this layout's map after its first 8, when the driver writes the global address
    there, little-endian, and nothing else depends on it: checked by encoding three addresses (a
    call with new pointers then writes 8 bytes instead of calling the driver, about 1.5 us each).
    None when the check fails: every map is encoded."""
    try:
        maps = [_encode(a, dtype, shape, strides, rows) for a in _PROBES]
    except RuntimeError:
        return None
    if any(m[8:] != maps[0][8:] or m[:8] != a.to_bytes(8, "little") for m, a in zip(maps, _PROBES)):
        return None
    return maps[0][8:]


def tensor_map(ptr: int, dtype: np.dtype, shape: tuple, strides: tuple, rows: int) -> bytes:
    """The 128-byte tensor map of the (B, S, H, D) tensor at ``ptr`` (byte ``strides``), for
    boxes of ``rows`` x 64: the layout's map with ``ptr`` written in, or the driver's encoding."""
    rest = _map_after_address(dtype, shape, strides, rows)
    if rest is None:
        return _encode(ptr, dtype, shape, strides, rows)
    return ptr.to_bytes(8, "little") + rest
