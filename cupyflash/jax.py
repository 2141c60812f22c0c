"""cupyflash as JAX functions: usable under ``jax.jit``, ``jax.grad`` and ``jax.vmap``.

    from cupyflash.jax import flash_attention
    out = jax.jit(lambda q, k, v: flash_attention(q, k, v, causal=True))(q, k, v)

How: ``jax.experimental.buffer_callback`` calls a Python function while XLA runs the
computation, handing it XLA's device buffers (inputs and the outputs to fill) and XLA's CUDA
stream. The callback wraps each buffer as a cupy array on its own pointer (no copy), and runs
cupyflash's forward or backward on that stream with every output preallocated by XLA: the
workspace of the backward is two more outputs of the call, so CuPy allocates nothing and the
host never waits for the GPU. The gradient is a ``jax.custom_vjp`` whose forward saves
(q, k, v, out, lse) and whose backward is cupyflash's. Under ``jax.vmap`` the callback gets
the mapped axes in front ("broadcast_all") and folds them into the batch axis.

Arguments are checked when the function is traced, with the messages of the array API
(shapes, dtypes, head_dim, flags): a ValueError or TypeError naming the argument. The
layout is flash-attn's, (batch, seqlen, heads, head_dim). GPU arrays only (CUDA JAX).
"""
from __future__ import annotations

import functools
import math

try:
    import jax
    import jax.numpy as jnp
    from jax.experimental.buffer_callback import buffer_callback
except ImportError as e:  # JAX is an optional extra
    raise ImportError("cupyflash.jax needs JAX with CUDA support, which is not installed: "
                      "pip install 'cupyflash[jax]' (or jax[cuda13] / jax[cuda12] yourself)") from e

import numpy as np

from . import _checks, api, varlen

__all__ = ["flash_attention", "flash_attention_varlen"]


# ---- trace time: the checks --------------------------------------------------------------

def _check(q, k, v, causal, softmax_scale, window_size, softcap, alibi_slopes, sinks):
    """The array API's checks on the traced shapes and dtypes: (causal, scale, window, softcap)."""
    named = {"q": q, "k": k, "v": v}
    for name, x in {**named, "alibi_slopes": alibi_slopes, "sinks": sinks}.items():
        if x is not None and (not hasattr(x, "shape") or not hasattr(x, "dtype")):
            raise TypeError(f"{name} must be a JAX array, got {type(x).__name__}")
    _checks.check_dtype({n: _Spec(x) for n, x in named.items()}, on_gpu=True)
    shape = _checks.check_qkv_shapes(*(_Spec(x) for x in (q, k, v)))
    causal = _checks.check_bool("causal", causal)
    spec = lambda x: None if x is None else _Spec(x)  # noqa: E731
    var = _checks.check_variants(shape, q.dtype, None, causal, window_size, softcap, spec(alibi_slopes), spec(sinks))
    return causal, _checks.check_scale(softmax_scale, shape.head_dim), var.window, var.softcap


class _Spec:
    """shape, ndim and dtype of a traced value, as _checks reads them."""

    def __init__(self, x):
        self.shape, self.dtype = tuple(x.shape), np.dtype(x.dtype)
        self.ndim = len(self.shape)


# ---- run time: the callbacks on XLA's buffers ----------------------------------------------

def _as_cupy(buf, folded_shape):
    """An XLA buffer as a cupy array on its own memory (no copy), its leading (vmapped and
    batch) axes folded into one: ``folded_shape``."""
    import cupy
    try:
        ptr = buf.__cuda_array_interface__["data"][0]
    except (AttributeError, TypeError, ValueError):  # a dtype the interface cannot name: DLPack
        return cupy.from_dlpack(buf).reshape(folded_shape)
    dtype = np.dtype(buf.dtype)
    nbytes = math.prod(buf.shape) * dtype.itemsize
    mem = cupy.cuda.UnownedMemory(ptr, nbytes, buf)
    return cupy.ndarray(folded_shape, dtype, memptr=cupy.cuda.MemoryPointer(mem, 0))


def _fold(shape, trailing: int) -> tuple:
    """(prod(leading axes), *the last ``trailing`` axes)."""
    return (math.prod(shape[:-trailing]),) + tuple(shape[-trailing:])


class _XlaStream:
    """XLA's stream pointer, as the CUDA stream protocol hands a stream over."""

    def __init__(self, ptr: int):
        self.ptr = ptr

    def __cuda_stream__(self):
        return (0, self.ptr)


def _on_xla_stream(ctx):
    import cupy
    if not ctx.stream:
        raise RuntimeError("cupyflash.jax runs on CUDA devices only; these arrays are not on a GPU")
    return cupy.cuda.Stream.from_external(_XlaStream(ctx.stream))


# variants: the static (window, softcap, with ALiBi, with sinks), causal folded into the window

def _variant_kwargs(variants, extras) -> dict:
    """The array API's keywords: the window (causal folded in), the softcap and, from the
    callback's extra buffers in this order, the ALiBi slopes ((batch, heads): the callback folds
    vmapped axes into the batch) and the sinks."""
    window, softcap, alibi, sinks = variants
    kw = dict(window_size=window, softcap=softcap)
    extras = list(extras)
    if alibi:
        buf = extras.pop(0)
        kw["alibi_slopes"] = _as_cupy(buf, _fold(buf.shape, 1))
    if sinks:
        buf = extras.pop(0)
        kw["sinks"] = _as_cupy(buf, tuple(buf.shape))
    return kw


def _forward_callback(variants, scale, ctx, outs, q, k, v, *extras):
    o_buf, lse_buf = outs
    with _on_xla_stream(ctx):
        qkv = [_as_cupy(b, _fold(b.shape, 3)) for b in (q, k, v)]
        api.flash_attention(*qkv, **_variant_kwargs(variants, extras), softmax_scale=scale,
                            out=_as_cupy(o_buf, _fold(o_buf.shape, 3)), lse=_as_cupy(lse_buf, _fold(lse_buf.shape, 2)))


def _backward_callback(variants, scale, ctx, outs, dout, q, k, v, o, lse, *extras):
    dq, dk, dv, ws_d, ws_acc, *dsinks = outs
    with _on_xla_stream(ctx):
        ins = [_as_cupy(b, _fold(b.shape, 3)) for b in (dout, q, k, v, o)]
        grads = {n: _as_cupy(b, _fold(b.shape, 3)) for n, b in (("dq", dq), ("dk", dk), ("dv", dv))}
        if dsinks:
            grads["dsinks"] = _as_cupy(dsinks[0], tuple(dsinks[0].shape))
        workspace = (_as_cupy(ws_d, _fold(ws_d.shape, 2)), _as_cupy(ws_acc, _fold(ws_acc.shape, 3)))
        api.flash_attention_backward(*ins, _as_cupy(lse, _fold(lse.shape, 2)), **_variant_kwargs(variants, extras),
                                     softmax_scale=scale, workspace=workspace, **grads)


def _vmap_method(variants) -> str:
    """Mapped axes fold into the batch ("broadcast_all"), except with sinks: they are one logit
    per head, so a vmapped call runs once per mapped element ("sequential")."""
    return "sequential" if variants[3] else "broadcast_all"


def _extras(alibi, sinks) -> tuple:
    return tuple(x for x in (alibi, sinks) if x is not None)


def _forward_call(q, k, v, alibi, sinks, variants, scale):
    B, Sq, H, D = q.shape
    shapes = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, H, Sq), jnp.float32))
    return buffer_callback(functools.partial(_forward_callback, variants, scale), shapes,
                           vmap_method=_vmap_method(variants))(q, k, v, *_extras(alibi, sinks))


def _backward_call(dout, q, k, v, o, lse, alibi, sinks, variants, scale):
    B, Sq, H, D = q.shape
    shapes = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
              jax.ShapeDtypeStruct(v.shape, v.dtype),
              jax.ShapeDtypeStruct((B, H, Sq), jnp.float32),      # workspace: D = rowsum(dO * O)
              jax.ShapeDtypeStruct((B, H, Sq, D), jnp.float32))   # workspace: the fp32 dQ accumulator
    if sinks is not None:
        shapes += (jax.ShapeDtypeStruct((H,), jnp.float32),)     # dsinks
    grads = buffer_callback(functools.partial(_backward_callback, variants, scale), shapes,
                            vmap_method=_vmap_method(variants))(dout, q, k, v, o, lse, *_extras(alibi, sinks))
    return (*grads[:3], grads[5] if sinks is not None else None)


# ---- the differentiable function ---------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q, k, v, alibi, sinks, variants, scale):
    return _forward_call(q, k, v, alibi, sinks, variants, scale)


def _attention_fwd(q, k, v, alibi, sinks, variants, scale):
    out, lse = _forward_call(q, k, v, alibi, sinks, variants, scale)
    return (out, lse), (q, k, v, alibi, sinks, out, lse)


def _attention_bwd(variants, scale, residuals, cotangents):
    q, k, v, alibi, sinks, out, lse = residuals
    dout, _ = cotangents  # lse is returned but not differentiated: its cotangent is ignored
    dq, dk, dv, dsinks = _backward_call(dout.astype(q.dtype), q, k, v, out, lse, alibi, sinks, variants, scale)
    return dq, dk, dv, None if alibi is None else jnp.zeros_like(alibi), dsinks  # the slopes get no gradient


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention(q, k, v, *, causal: bool = False, softmax_scale: float | None = None,
                    window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi_slopes=None, sinks=None,
                    return_lse: bool = False):
    """:func:`cupyflash.flash_attention` as a JAX function (jit, grad, vmap).

    Parameters
    ----------
    q : jax.Array, shape (batch, seqlen_q, heads, head_dim), on a CUDA device
    k, v : jax.Array, shape (batch, seqlen_k, heads_kv, head_dim)
        float16, bfloat16 or float32, one dtype; head_dim a multiple of 8 up to 256; heads_kv
        divides heads (grouped-query attention).
    causal, softmax_scale, window_size, softcap : as in :func:`cupyflash.flash_attention`
        (static: a new value traces anew).
    alibi_slopes : jax.Array, optional
        float32 (heads,) or (batch, heads), as in :func:`cupyflash.flash_attention`; traced (new
        values do not retrace); no gradient (its cotangent is zero).
    sinks : jax.Array, optional
        float32 (heads,), traced; differentiable: ``jax.grad`` reaches it through dsinks. Under
        ``jax.vmap`` a call with sinks runs once per mapped element (one sink logit per head).
    return_lse : bool
        Also return the float32 (batch, heads, seqlen_q) log-sum-exp (not differentiable:
        its cotangent is ignored).

    Returns
    -------
    out, or (out, lse)
    """
    causal, scale, window, softcap = _check(q, k, v, causal, softmax_scale, window_size, softcap, alibi_slopes, sinks)
    return_lse = _checks.check_bool("return_lse", return_lse)
    if alibi_slopes is not None:  # per (batch, head), so that vmapped axes fold into the batch with it
        alibi_slopes = jnp.broadcast_to(alibi_slopes, (q.shape[0], q.shape[2]))
    variants = (window, softcap, alibi_slopes is not None, sinks is not None)
    out, lse = _attention(q, k, v, alibi_slopes, sinks, variants, scale)
    return (out, lse) if return_lse else out


# ---- packed sequences (varlen) ----------------------------------------------------------------

def _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
                  window_size, softcap, alibi_slopes, sinks):
    """The array API's checks on traced shapes: (causal, scale, window, softcap, batch)."""
    named = {"q": q, "k": k, "v": v, "cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k}
    for name, x in {**named, "alibi_slopes": alibi_slopes, "sinks": sinks}.items():
        if x is not None and (not hasattr(x, "shape") or not hasattr(x, "dtype")):
            raise TypeError(f"{name} must be a JAX array, got {type(x).__name__}")
    _checks.check_dtype({n: _Spec(named[n]) for n in ("q", "k", "v")}, on_gpu=True)
    shape = _checks.check_varlen_qkv(*(_Spec(x) for x in (q, k, v)), strides=False)
    _checks.check_offsets(_Spec(cu_seqlens_q), _Spec(cu_seqlens_k), None)
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if m is None:
            raise ValueError(f"{name} must be given under JAX (the offsets are traced values; the grid needs the "
                             "longest sequence as a static int)")
        _checks._check_max_seqlen(name, m)
    causal = _checks.check_bool("causal", causal)
    batch = cu_seqlens_q.shape[0] - 1
    spec = lambda x: None if x is None else _Spec(x)  # noqa: E731
    var = _checks.check_variants(_checks.AttentionShape(batch, *(getattr(shape, f) for f in
                                 ("seqlen_q", "seqlen_k", "heads", "head_dim", "heads_kv"))),
                                 q.dtype, None, causal, window_size, softcap, spec(alibi_slopes), spec(sinks))
    return causal, _checks.check_scale(softmax_scale, shape.head_dim), var.window, var.softcap, batch


def _varlen_forward_callback(static, ctx, outs, q, k, v, cu_q, cu_k, *extras):
    variants, scale, max_q, max_k = static
    o_buf, lse_buf = outs
    with _on_xla_stream(ctx):
        arrays = [_as_cupy(b, tuple(b.shape)) for b in (q, k, v, cu_q, cu_k)]
        varlen.flash_attention_varlen(*arrays, max_seqlen_q=max_q, max_seqlen_k=max_k, softmax_scale=scale,
                                      **_variant_kwargs(variants, extras), out=_as_cupy(o_buf, tuple(o_buf.shape)),
                                      lse=_as_cupy(lse_buf, tuple(lse_buf.shape)))


def _varlen_backward_callback(static, ctx, outs, dout, q, k, v, o, lse, cu_q, cu_k, *extras):
    variants, scale, max_q, max_k = static
    dq, dk, dv, ws_d, ws_acc, *dsinks = outs
    with _on_xla_stream(ctx):
        ins = [_as_cupy(b, tuple(b.shape)) for b in (dout, q, k, v, o, lse, cu_q, cu_k)]
        grads = {n: _as_cupy(b, tuple(b.shape)) for n, b in (("dq", dq), ("dk", dk), ("dv", dv))}
        if dsinks:
            grads["dsinks"] = _as_cupy(dsinks[0], tuple(dsinks[0].shape))
        workspace = tuple(_as_cupy(b, tuple(b.shape)) for b in (ws_d, ws_acc))
        varlen.flash_attention_varlen_backward(*ins, max_seqlen_q=max_q, max_seqlen_k=max_k, softmax_scale=scale,
                                               **_variant_kwargs(variants, extras), workspace=workspace, **grads)


def _varlen_forward_call(q, k, v, cu_q, cu_k, alibi, sinks, static):
    total_q, H, _ = q.shape
    shapes = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((H, total_q), jnp.float32))
    return buffer_callback(functools.partial(_varlen_forward_callback, static), shapes,
                           vmap_method="sequential")(q, k, v, cu_q, cu_k, *_extras(alibi, sinks))


def _varlen_backward_call(dout, q, k, v, o, lse, cu_q, cu_k, alibi, sinks, static):
    total_q, H, D = q.shape
    shapes = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
              jax.ShapeDtypeStruct(v.shape, v.dtype),
              jax.ShapeDtypeStruct((H, total_q), jnp.float32),       # workspace: D = rowsum(dO * O)
              jax.ShapeDtypeStruct((H, total_q, D), jnp.float32))    # workspace: the fp32 dQ accumulator
    if sinks is not None:
        shapes += (jax.ShapeDtypeStruct((H,), jnp.float32),)        # dsinks
    grads = buffer_callback(functools.partial(_varlen_backward_callback, static), shapes,
                            vmap_method="sequential")(dout, q, k, v, o, lse, cu_q, cu_k, *_extras(alibi, sinks))
    return (*grads[:3], grads[5] if sinks is not None else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _varlen_attention(q, k, v, cu_q, cu_k, alibi, sinks, static):
    return _varlen_forward_call(q, k, v, cu_q, cu_k, alibi, sinks, static)


def _varlen_attention_fwd(q, k, v, cu_q, cu_k, alibi, sinks, static):
    out, lse = _varlen_forward_call(q, k, v, cu_q, cu_k, alibi, sinks, static)
    return (out, lse), (q, k, v, cu_q, cu_k, alibi, sinks, out, lse)


def _varlen_attention_bwd(static, residuals, cotangents):
    q, k, v, cu_q, cu_k, alibi, sinks, out, lse = residuals
    dout, _ = cotangents  # lse is returned but not differentiated
    dq, dk, dv, dsinks = _varlen_backward_call(dout.astype(q.dtype), q, k, v, out, lse, cu_q, cu_k, alibi, sinks,
                                               static)
    int_zero = lambda x: np.zeros(x.shape, jax.dtypes.float0)  # noqa: E731  (integer inputs: float0 cotangents)
    return (dq, dk, dv, int_zero(cu_q), int_zero(cu_k), None if alibi is None else jnp.zeros_like(alibi), dsinks)


_varlen_attention.defvjp(_varlen_attention_fwd, _varlen_attention_bwd)


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q: int, max_seqlen_k: int,
                           causal: bool = False, softmax_scale: float | None = None,
                           window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi_slopes=None,
                           sinks=None, return_lse: bool = False):
    """:func:`cupyflash.flash_attention_varlen` as a JAX function (jit, grad; vmap runs it once per
    mapped element).

    Parameters
    ----------
    q : jax.Array, shape (total_q, heads, head_dim); k, v : (total_k, heads_kv, head_dim)
    cu_seqlens_q, cu_seqlens_k : int32 jax.Array, shape (batch + 1,)
        Traced: new offsets do not retrace. They are trusted (never read to the host): see
        :func:`cupyflash.flash_attention_varlen`.
    max_seqlen_q, max_seqlen_k : int
        Required and static: the longest sequence of each, which sizes the kernels' grid.
    causal, softmax_scale, window_size, softcap, alibi_slopes, sinks, return_lse
        As in :func:`cupyflash.jax.flash_attention`; lse is (heads, total_q).
    """
    causal, scale, window, softcap, batch = _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                          max_seqlen_k, causal, softmax_scale, window_size, softcap,
                                                          alibi_slopes, sinks)
    return_lse = _checks.check_bool("return_lse", return_lse)
    if alibi_slopes is not None:
        alibi_slopes = jnp.broadcast_to(alibi_slopes, (batch, q.shape[1]))
    static = ((window, softcap, alibi_slopes is not None, sinks is not None), scale, int(max_seqlen_q),
              int(max_seqlen_k))
    out, lse = _varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, sinks, static)
    return (out, lse) if return_lse else out
