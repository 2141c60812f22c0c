"""cupyflash between Numba CUDA kernels, on one stream and without a copy.

    python examples/numba_interop.py      # prints the error against a float64 reference; exit 1 if off

1. A Numba kernel applies rotary position embeddings to q and k in place (float32).
2. ``cupyflash.flash_attention`` takes the Numba device arrays zero-copy through
   ``__cuda_array_interface__`` and returns a cupy array.
3. A Numba kernel reads that cupy array (cupy arrays expose the same interface) and writes
   each output row's L2 norm into a cupy buffer.

Ordering: everything runs on one CuPy stream; Numba launches on it through
``numba.cuda.external_stream(stream.ptr)``. The arrays Numba receives are wrapped with
``numba.cuda.as_cuda_array(x, sync=False)``: the interface names the producer's stream
(version 3 of the protocol) and by default the consumer synchronises with it, a host wait
that one shared stream makes unnecessary. Numba arrays that are not bound to a stream (the
default) carry no stream, so CuPy takes them without waiting.
"""
from __future__ import annotations

import math
import os
import sys

import numpy as np
import cupy
from numba import cuda

try:
    import cupyflash
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import cupyflash
from cupyflash import reference

ROPE_BASE = 10000.0
THREADS = 128


@cuda.jit
def rope_inplace(x, base):
    """Rotate the pairs (x[..., i], x[..., i + D/2]) of row (b, s, h) by s * base^(-2i/D)."""
    t = cuda.grid(1)
    B, S, H, D = x.shape
    half = D // 2
    if t >= B * S * H * half:
        return
    i = t % half
    r = t // half
    h = r % H
    r //= H
    s = r % S
    b = r // S
    theta = s * math.pow(base, -2.0 * i / D)
    c, sn = math.cos(theta), math.sin(theta)
    x0, x1 = x[b, s, h, i], x[b, s, h, i + half]
    x[b, s, h, i] = x0 * c - x1 * sn
    x[b, s, h, i + half] = x0 * sn + x1 * c


@cuda.jit
def row_norms(o, norms):
    """norms[b, s, h] = ||o[b, s, h, :]||."""
    t = cuda.grid(1)
    B, S, H, D = o.shape
    if t >= B * S * H:
        return
    h = t % H
    r = t // H
    s = r % S
    b = r // S
    acc = 0.0
    for d in range(D):
        acc += o[b, s, h, d] * o[b, s, h, d]
    norms[b, s, h] = math.sqrt(acc)


def rope_reference(x: np.ndarray, base: float = ROPE_BASE) -> np.ndarray:
    B, S, H, D = x.shape
    half = D // 2
    theta = np.arange(S)[:, None] * base ** (-2.0 * np.arange(half) / D)  # (S, half)
    c, s = np.cos(theta)[None, :, None, :], np.sin(theta)[None, :, None, :]
    x = x.astype(np.float64)
    x0, x1 = x[..., :half], x[..., half:]
    return np.concatenate([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)


def _blocks(n: int) -> int:
    return (n + THREADS - 1) // THREADS


def run(B: int = 2, S: int = 1024, H: int = 4, D: int = 64, causal: bool = True, seed: int = 0) -> dict:
    """The pipeline above; its result against numpy + the float64 reference attention."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((B, S, H, D)).astype(np.float32) for _ in range(3))
    stream = cupy.cuda.Stream(non_blocking=True)
    nb_stream = cuda.external_stream(stream.ptr)
    q_nb, k_nb, v_nb = (cuda.to_device(x) for x in (q, k, v))  # synchronous copies, no stream bound
    with stream:
        rope_inplace[_blocks(B * S * H * D // 2), THREADS, nb_stream](q_nb, ROPE_BASE)
        rope_inplace[_blocks(B * S * H * D // 2), THREADS, nb_stream](k_nb, ROPE_BASE)
        out = cupyflash.flash_attention(q_nb, k_nb, v_nb, causal=causal)  # zero-copy, on `stream`
        norms = cupy.empty((B, S, H), dtype=np.float32)
        row_norms[_blocks(B * S * H), THREADS, nb_stream](cuda.as_cuda_array(out, sync=False),
                                                          cuda.as_cuda_array(norms, sync=False))
    stream.synchronize()
    zero_copy = cupy.asarray(q_nb).data.ptr == q_nb.__cuda_array_interface__["data"][0]
    ref_out, _ = reference.attention(rope_reference(q), rope_reference(k), v.astype(np.float64),
                                     causal=causal, upcast=True)
    ref_norms = np.sqrt((ref_out ** 2).sum(axis=-1))
    err = float(np.abs(cupy.asnumpy(norms).astype(np.float64) - ref_norms).max())
    err_out = float(np.abs(cupy.asnumpy(out).astype(np.float64) - ref_out).max())
    tol = 1e-4 * max(1.0, float(np.abs(ref_norms).max()))
    return {"shape": [B, S, H, D], "causal": causal, "zero_copy": bool(zero_copy), "err_norms": err,
            "err_out": err_out, "tol": tol, "ok": bool(zero_copy and err <= tol and err_out <= tol)}


def main() -> int:
    result = run()
    print(result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
