"""The public attention functions: check once, then dispatch on the array type."""
from __future__ import annotations

from . import _checks
from ._dtypes import lse_dtype


def _backend(on_gpu: bool):
    if on_gpu:
        from . import _cuda_backend as backend
    else:
        from . import _numpy_backend as backend
    return backend


def flash_attention(q, k, v, *, causal=False, softmax_scale=None, return_lse=False,
                    out=None, lse=None):
    """Exact attention ``softmax(q @ k^T * softmax_scale) @ v``, computed tile by tile.

    Parameters
    ----------
    q : array, shape (batch, seqlen_q, heads, head_dim)
    k, v : arrays, shape (batch, seqlen_k, heads, head_dim)
        cupy arrays run the CUDA kernels on their device; numpy arrays run the NumPy
        implementation of the same blocked algorithm. Objects with ``__dlpack__`` or
        ``__cuda_array_interface__`` (JAX, Numba) are taken zero-copy as cupy arrays.
        dtype float16, bfloat16 or float32 (float64 too on the CPU); head_dim a multiple
        of 8 up to 256; any strides with the last dimension contiguous.
    causal : bool
        Query i attends to keys j <= i + seqlen_k - seqlen_q (bottom-right aligned, as in
        flash-attn). A query that sees no key gets out = 0 and lse = -inf.
    softmax_scale : float, optional
        Defaults to 1 / sqrt(head_dim).
    return_lse : bool
        Also return the log-sum-exp of each row of the scaled scores, float32
        (batch, heads, seqlen_q), which the backward pass needs.
    out, lse : arrays, optional
        Preallocated outputs to write into (shape, dtype and device checked). With both
        given, the GPU path allocates nothing and never synchronises with the host, so it
        can be captured in a CUDA graph.

    Returns
    -------
    out, or (out, lse) when ``return_lse`` is true.
    """
    q = _checks.as_array(q, "q")
    k = _checks.as_array(k, "k")
    v = _checks.as_array(v, "v")
    dev = _checks.check_same_backend({"q": q, "k": k, "v": v})
    on_gpu = dev != "cpu"
    dtype = _checks.check_dtype({"q": q, "k": k, "v": v}, on_gpu)
    shape = _checks.check_qkv(q, k, v)
    causal = _checks.check_bool("causal", causal)
    scale = _checks.check_scale(softmax_scale, shape.head_dim)
    return_lse = _checks.check_bool("return_lse", return_lse)
    if out is not None:
        out = _checks.check_output_buffer("out", out, q.shape, dtype, dev)
    if lse is not None:
        lse = _checks.check_output_buffer(
            "lse", lse, (shape.batch, shape.heads, shape.seqlen_q), lse_dtype(dtype), dev)
    o, l = _backend(on_gpu).forward(q, k, v, causal=causal, scale=scale, out=out, lse=lse)
    return (o, l) if return_lse else o


def flash_attention_backward(dout, q, k, v, out, lse, *, causal=False, softmax_scale=None,
                             dq=None, dk=None, dv=None):
    """Gradients of :func:`flash_attention` with respect to q, k and v.

    Recomputes the attention tile by tile from ``lse`` (returned by
    ``flash_attention(..., return_lse=True)``); nothing of size seqlen_q x seqlen_k is
    stored. ``dout`` and ``out`` have q's shape and dtype; ``lse`` is (batch, heads,
    seqlen_q) float32. ``causal`` and ``softmax_scale`` must be those of the forward call.
    ``dq``, ``dk``, ``dv`` are optional preallocated outputs.

    Returns
    -------
    (dq, dk, dv), each with the shape and dtype of q, k, v.
    """
    names = ("dout", "q", "k", "v", "out", "lse")
    arrays = {n: _checks.as_array(a, n) for n, a in zip(names, (dout, q, k, v, out, lse))}
    dev = _checks.check_same_backend(arrays)
    on_gpu = dev != "cpu"
    dtype = _checks.check_dtype({n: arrays[n] for n in ("q", "k", "v", "dout", "out")}, on_gpu)
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    shape = _checks.check_qkv(q, k, v)
    _checks.check_like("dout", arrays["dout"], q.shape, dtype, "the gradient of out, shaped like q")
    _checks.check_like("out", arrays["out"], q.shape, dtype, "the forward output, shaped like q")
    _checks.check_like("lse", arrays["lse"], (shape.batch, shape.heads, shape.seqlen_q),
                       lse_dtype(dtype), "the forward log-sum-exp")
    causal = _checks.check_bool("causal", causal)
    scale = _checks.check_scale(softmax_scale, shape.head_dim)
    grads = {}
    for name, buf, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        grads[name] = None if buf is None else _checks.check_output_buffer(name, buf, like.shape, dtype, dev)
    return _backend(on_gpu).backward(arrays["dout"], q, k, v, arrays["out"], arrays["lse"],
                                     causal=causal, scale=scale, **grads)
