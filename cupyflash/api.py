"""The public attention functions: check once, then dispatch on the array type."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from . import _checks, _plans
from ._dtypes import lse_dtype
from ._variants import NO_WINDOW

if TYPE_CHECKING:  # for type checkers only: cupyflash imports cupy lazily
    import cupy
    import numpy

    from .blockmask import BlockMask

#: What cupyflash returns: numpy arrays for CPU inputs, cupy arrays for GPU inputs.
Array = Union["numpy.ndarray", "cupy.ndarray"]
#: What cupyflash takes: numpy or cupy arrays, or any object exposing ``__dlpack__`` (JAX,
#: PyTorch) or ``__cuda_array_interface__`` (Numba), taken zero-copy.
ArrayInput = Any


def _gpu_backend():
    from . import _cuda_backend
    return _cuda_backend


def _cpu_backend():
    from . import _numpy_backend
    return _numpy_backend


def flash_attention(q: ArrayInput, k: ArrayInput, v: ArrayInput, *, causal: bool = False,
                    softmax_scale: float | None = None, window_size: tuple[int, int] = NO_WINDOW,
                    softcap: float = 0.0, alibi_slopes: ArrayInput | None = None, sinks: ArrayInput | None = None,
                    return_lse: bool = False, out: ArrayInput | None = None,
                    lse: ArrayInput | None = None, mask_mod: str | None = None, bias_mod: str | None = None,
                    aux: dict | None = None, bias: ArrayInput | None = None,
                    mask: ArrayInput | None = None, block_mask: BlockMask | None = None,
                    dropout_p: float = 0.0, seed: int | None = None) -> Array | tuple[Array, Array]:
    """Exact attention ``softmax(q @ k^T * softmax_scale) @ v``, computed tile by tile.

    Parameters
    ----------
    q : array, shape (batch, seqlen_q, heads, head_dim)
    k, v : arrays, shape (batch, seqlen_k, heads_kv, head_dim)
        heads_kv divides heads (grouped-query and multi-query attention): query head h reads
        kv head h // (heads // heads_kv); k and v are never repeated in memory.
        cupy arrays run the CUDA kernels on their own device, on CuPy's current stream for
        that device; numpy arrays run the NumPy implementation of the same blocked algorithm.
        Objects with ``__dlpack__`` (JAX, PyTorch) or ``__cuda_array_interface__`` (Numba)
        are taken zero-copy as cupy arrays (numpy arrays when DLPack says they live on the
        CPU). dtype float16, bfloat16 or float32 (float64 too on the CPU); head_dim a
        multiple of 8 up to 256; any strides with the last dimension contiguous. All on one
        device.
    causal : bool
        Query i attends to keys j <= i + seqlen_k - seqlen_q (bottom-right aligned, as in
        flash-attn). A query that sees no key gets out = 0 and lse = -inf.
    softmax_scale : float, optional
        Defaults to 1 / sqrt(head_dim).
    window_size : (int, int)
        (left, right): query i sees keys j with i + o - left <= j <= i + o + right, where
        o = seqlen_k - seqlen_q; -1 means unbounded on that side; causal sets right = 0.
    softcap : float
        When > 0 each scaled score s becomes softcap * tanh(s / softcap).
    alibi_slopes : array, optional
        float32 (heads,) or (batch, heads): adds -slope * |i + o - j| to each logit, after the softcap.
    sinks : array, optional
        float32 (heads,): each row's softmax denominator gains exp(sinks[h]); lse includes it.
        Every variant composes with the others and runs on every path (the CUDA kernels
        compile each combination a call uses, at first use).
    mask_mod, bias_mod : str, optional
        Masks and biases nobody ships as a flag (FlexAttention's mask_mod and score_mod): C++
        expressions of ``b``, ``h`` (query head), ``q_idx``, ``kv_idx`` (positions in the
        sequence) and the ``aux`` arrays, in the subset cupyflash._expr documents, e.g.
        ``"q_idx >= kv_idx && doc[q_idx] == doc[kv_idx]"`` (document masking) or
        ``"-0.5 * abs(q_idx - kv_idx)"``. A key is visible only where mask_mod is true;
        bias_mod is added to the logit (after softcap and ALiBi). No gradient reaches aux.
    aux : dict of str -> array, optional
        The arrays the expressions read by name (ints, floats or bools).
    bias : array, optional
        A float tensor broadcastable to (batch, heads, seqlen_q, seqlen_k) (size-1 or missing
        leading axes broadcast) added to the logit; its gradient comes from
        :func:`flash_attention_backward` with ``return_dbias=True``. O(S^2) memory by the
        caller's choice: mask_mod and bias_mod are the O(S) way.
    mask : array, optional
        A bool tensor of the same broadcast shape: True keeps the key.
    block_mask : cupyflash.BlockMask, optional
        Block-sparse attention (:func:`cupyflash.block_mask`): only the key blocks it lists
        are visited, its partial blocks masked element by element by the mask_mod it was
        made from.
    dropout_p, seed : float, int
        Dropout on the attention probabilities (kept ones scaled by 1 / (1 - dropout_p), lse
        that of the undropped softmax), regenerated from ``seed`` by a counter-based generator
        (Philox4x32-10, cupyflash._dropout) in the backward: pass the same seed there. The same
        seed gives the same result; :func:`cupyflash.dropout_mask` shows the mask.
        On the GPU, mask_mod, bias_mod, aux, bias, mask and block_mask are compiled into the
        kernels (each new expression at its first call), dropout regenerates the same Philox
        stream in the kernels, and the backward's dbias is summed there too (see
        :func:`flash_attention_backward`).
    return_lse : bool
        Also return the log-sum-exp of each row of the scaled scores, float32
        (batch, heads, seqlen_q) (float64 for float64 inputs), which the backward pass needs.
    out : array, optional
        Preallocated output shaped and typed like ``q``, on q's device, last dimension
        contiguous, no broadcast (stride-0) axes, not overlapping the inputs. It is written
        in place; a GPU buffer whose data pointer or strides are not multiples of 16 bytes
        is written through an aligned temporary (an allocation and a copy).
    lse : array, optional
        Preallocated C-contiguous (batch, heads, seqlen_q) float32 buffer for the
        log-sum-exp. With ``out`` and ``lse`` both given, the GPU path allocates nothing and
        never synchronises with the host, so it can be captured in a CUDA graph (after one
        eager call that compiles the kernels).

    Returns
    -------
    out : array
        Shaped and typed like ``q``: a cupy array for GPU inputs (``out`` itself, as a cupy
        view, when given), a numpy array for CPU inputs.
    lse : array
        Only when ``return_lse`` is true.

    Raises
    ------
    TypeError
        An argument of the wrong kind (not an array, a non-bool flag).
    ValueError
        Shapes, dtypes, devices or layouts that do not fit, naming the argument.
    """
    # a call with the layouts of an earlier one reuses its checked plan (_plans)
    key = None if _user_terms_given(mask_mod, bias_mod, aux, bias, mask, block_mask, dropout_p) else _plans.forward_key(
        q, k, v, out, lse, causal, softmax_scale, return_lse, window_size, softcap, alibi_slopes, sinks)
    plan = _plans.FORWARD.get(key)
    if plan is not None:
        result = plan(q, k, v, out, lse, alibi_slopes, sinks)
        if result is not None:
            return result if return_lse else result[0]
    q = _checks.as_array(q, "q")
    k = _checks.as_array(k, "k")
    v = _checks.as_array(v, "v")
    dev = _checks.check_same_backend({"q": q, "k": k, "v": v})
    on_gpu = dev != "cpu"
    dtype = _checks.check_dtype({"q": q, "k": k, "v": v}, on_gpu)
    shape = _checks.check_qkv(q, k, v)
    causal = _checks.check_bool("causal", causal)
    scale = _checks.check_scale(softmax_scale, shape.head_dim)
    variants = _checks.check_variants(shape, dtype, dev, causal, window_size, softcap, alibi_slopes, sinks)
    variants = _checks.check_user_terms(variants, shape, dtype, dev, mask_mod, bias_mod, aux, bias, mask, block_mask,
                                        dropout_p, seed)
    return_lse = _checks.check_bool("return_lse", return_lse)
    if out is not None:
        out = _checks.check_output_buffer("out", out, q.shape, dtype, dev)
    if lse is not None:
        lse = _checks.check_output_buffer(
            "lse", lse, (shape.batch, shape.heads, shape.seqlen_q), lse_dtype(dtype), dev,
            c_contiguous=True)
    if on_gpu:
        _checks.check_graph_capture(dev, needed={"out": out, "lse": lse},
                                    in_place={"q": q, "k": k, "v": v, "out": out}, dense=_variant_arrays(variants))
        o, l, plan = _gpu_backend().forward_with_plan(q, k, v, causal=variants.window == (-1, 0), scale=scale,
                                                      out=out, lse=lse, variants=variants)
        _plans.FORWARD.put(key, plan)
    else:
        o, l = _cpu_backend().forward(q, k, v, causal=causal, scale=scale, out=out, lse=lse, variants=variants)
    return (o, l) if return_lse else o


def flash_attention_backward(dout: ArrayInput, q: ArrayInput, k: ArrayInput, v: ArrayInput,
                             out: ArrayInput, lse: ArrayInput, *, causal: bool = False,
                             softmax_scale: float | None = None, window_size: tuple[int, int] = NO_WINDOW,
                             softcap: float = 0.0, alibi_slopes: ArrayInput | None = None,
                             sinks: ArrayInput | None = None, dq: ArrayInput | None = None,
                             dk: ArrayInput | None = None, dv: ArrayInput | None = None,
                             dsinks: ArrayInput | None = None,
                             workspace: tuple[Array, Array] | None = None,
                             deterministic: bool = False, mask_mod: str | None = None,
                             bias_mod: str | None = None, aux: dict | None = None,
                             bias: ArrayInput | None = None, mask: ArrayInput | None = None,
                             block_mask: BlockMask | None = None, dropout_p: float = 0.0,
                             seed: int | None = None, dbias: ArrayInput | None = None,
                             return_dbias: bool = False) -> tuple[Array, ...]:
    """Gradients of :func:`flash_attention` with respect to q, k and v.

    Recomputes the attention tile by tile from ``lse``; nothing of size
    seqlen_q x seqlen_k is stored.

    Parameters
    ----------
    dout : array, shape (batch, seqlen_q, heads, head_dim)
        The gradient of the loss with respect to ``out``; q's dtype.
    q, k, v : arrays
        The forward inputs (same kinds of objects as :func:`flash_attention` takes).
    out : array
        The forward output.
    lse : array, shape (batch, heads, seqlen_q)
        The forward log-sum-exp, ``flash_attention(..., return_lse=True)[1]``; float32
        (float64 for float64 inputs).
    causal : bool
        As in the forward call.
    softmax_scale : float, optional
        As in the forward call (default 1 / sqrt(head_dim)).
    window_size, softcap, alibi_slopes, sinks, mask_mod, bias_mod, aux, bias, mask, block_mask,
    dropout_p, seed
        As in the forward call (the same seed: the dropout mask is regenerated from it).
    dq, dk, dv : arrays, optional
        Preallocated gradients shaped and typed like q, k, v, with the same rules as
        ``out`` of :func:`flash_attention`.
    dsinks : array, optional
        With ``sinks`` only: a preallocated C-contiguous float32 (heads,) buffer for the
        sinks' gradient, written in place (needed during CUDA-graph capture).
    workspace : tuple of two cupy arrays, optional
        GPU only: the fp32 scratch from :func:`backward_workspace`. With it and ``dq``,
        ``dk``, ``dv`` given (and a C-contiguous ``lse``), the backward pass allocates
        nothing and never synchronises with the host (CUDA-graph capturable). With
        ``deterministic=True`` only its first array (D) is used.
    deterministic : bool
        GPU: bitwise-reproducible gradients. dQ is then computed by a separate pass over
        the query tiles that sums the key tiles in a fixed order, instead of being
        accumulated with atomic adds whose order varies from run to run; dK and dV are
        reproducible either way. It costs time (the pass recomputes S and dP) and needs no
        fp32 dQ accumulator. The NumPy path is always deterministic.
    return_dbias : bool
        With ``bias``: also return d loss / d bias, shaped like bias, float32 (float64 for
        float64 inputs), summed over the axes where bias broadcasts. ``dbias``: a preallocated
        buffer for it, written in place. On the GPU the kernels add each logit's gradient into
        a float32 accumulator with atomics, so a bias with broadcast axes is summed in no fixed
        order: with ``deterministic=True`` the bias must have the full (batch, heads, seqlen_q,
        seqlen_k) shape (a ValueError otherwise). The accumulator is allocated per call: not
        under CUDA-graph capture.

    Returns
    -------
    dq, dk, dv : arrays
        Each with the shape and dtype of q, k, v; cupy arrays for GPU inputs, numpy arrays
        for CPU inputs. With fewer kv heads than query heads, dk and dv of a kv head sum
        over its group of query heads.
    dsinks : array
        Only when ``sinks`` is given: float32 (heads,), the gradient with respect to sinks.
    dbias : array
        Last, only with ``return_dbias``.

    Raises
    ------
    TypeError, ValueError
        As for :func:`flash_attention`, naming the argument.
    """
    checked_only = _user_terms_given(mask_mod, bias_mod, aux, bias, mask, block_mask, dropout_p) or return_dbias
    key = None if checked_only else _plans.backward_key(dout, q, k, v, out, lse, dq, dk, dv, workspace, causal,
                                                        softmax_scale, deterministic, window_size, softcap,
                                                        alibi_slopes, sinks, dsinks)
    plan = _plans.BACKWARD.get(key)
    if plan is not None:
        result = plan(dout, q, k, v, out, lse, dq, dk, dv, workspace, alibi_slopes, sinks, dsinks)
        if result is not None:
            return result
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
    deterministic = _checks.check_bool("deterministic", deterministic)
    scale = _checks.check_scale(softmax_scale, shape.head_dim)
    variants = _checks.check_variants(shape, dtype, dev, causal, window_size, softcap, alibi_slopes, sinks)
    variants = _checks.check_user_terms(variants, shape, dtype, dev, mask_mod, bias_mod, aux, bias, mask, block_mask,
                                        dropout_p, seed)
    dbias = _checks.check_dbias(variants, bias, dbias, return_dbias, dtype, dev,
                                (shape.batch, shape.heads, shape.seqlen_q, shape.seqlen_k), deterministic)
    grads = {}
    for name, buf, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        grads[name] = None if buf is None else _checks.check_output_buffer(name, buf, like.shape, dtype, dev)
    if dsinks is not None:
        if variants.sinks is None:
            raise ValueError("dsinks receives the gradient of sinks: pass it only with sinks")
        dsinks = _checks.check_output_buffer("dsinks", dsinks, (shape.heads,), lse_dtype(dtype), dev, c_contiguous=True)
    extra = {"deterministic": deterministic} if on_gpu else {}
    if workspace is not None:
        if not on_gpu:
            raise ValueError("workspace is only used by the GPU path; omit it for numpy arrays")
        extra["workspace"] = _checks.check_workspace(workspace, shape, dev)
    if on_gpu:
        needed = {**grads, "workspace": workspace} | ({"dsinks": dsinks} if variants.sinks is not None else {})
        _checks.check_graph_capture(
            dev, needed=needed, in_place={n: arrays[n] for n in ("dout", "q", "k", "v", "out")} | grads,
            dense={"lse": arrays["lse"], **_variant_arrays(variants)})
        if dbias is not None:  # the kernels add into a zeroed float32 array of the bias's 4-D shape
            import cupy
            with cupy.cuda.Device(dev):
                dbias_4d = _bias_axes(dbias, variants.bias.shape, cupy)
                dbias_4d.fill(0)
            variants = dataclasses.replace(variants, dbias=dbias_4d)
        result, plan = _gpu_backend().backward_with_plan(arrays["dout"], q, k, v, arrays["out"], arrays["lse"],
                                                         causal=variants.window == (-1, 0), scale=scale, **grads,
                                                         **extra, variants=variants, dsinks=dsinks)
        _plans.BACKWARD.put(key, plan)
        return result if dbias is None else (*result, _copied_back(dbias, variants.dbias))
    dbias_4d = None if dbias is None else _bias_axes(dbias, variants.bias.shape, np)
    result = _cpu_backend().backward(arrays["dout"], q, k, v, arrays["out"], arrays["lse"],
                                     causal=causal, scale=scale, **grads, **extra, variants=variants, dbias=dbias_4d)
    if dsinks is not None:
        dsinks[...] = result[3]
        result = (*result[:3], dsinks)
    return result if dbias is None else (*result, _copied_back(dbias, dbias_4d))


def _bias_axes(dbias, shape4: tuple, xp):
    """dbias as the backends write it, with the bias's 4-D shape: a view where dbias is C-contiguous
    (written in place), else a new array (copied back by _copied_back)."""
    return dbias.reshape(shape4) if dbias.flags.c_contiguous else xp.empty(shape4, dbias.dtype)


def _copied_back(dbias, dbias_4d):
    """dbias, holding what the backend wrote into dbias_4d (nothing to copy where it is a view of it)."""
    if not dbias.flags.c_contiguous:
        dbias[...] = dbias_4d.reshape(dbias.shape)
    return dbias


def _user_terms_given(mask_mod, bias_mod, aux, bias, mask, block_mask, dropout_p) -> bool:
    """Any of mask_mod, bias_mod, aux, bias, mask, block_mask or dropout (such calls take the checked
    path every time)."""
    return any(t is not None for t in (mask_mod, bias_mod, aux, bias, mask, block_mask)) or dropout_p != 0


def dropout_mask(seed: int, dropout_p: float, batch: int, heads: int, seqlen_q: int, seqlen_k: int) -> "numpy.ndarray":
    """The dropout mask a call with ``dropout_p`` and ``seed`` applies: bool (batch, heads, seqlen_q,
    seqlen_k), True where a probability is kept (and scaled by 1 / (1 - dropout_p))."""
    from . import _dropout
    p, seed = _checks.check_dropout(dropout_p, seed)
    sizes = [_checks._check_int(n, x) for n, x in (("batch", batch), ("heads", heads), ("seqlen_q", seqlen_q),
                                                    ("seqlen_k", seqlen_k))]
    B, H, Sq, Sk = sizes
    return np.broadcast_to(_dropout.keep(seed, p, np.arange(B).reshape(-1, 1, 1, 1), np.arange(H).reshape(1, -1, 1, 1),
                                         np.arange(Sq).reshape(-1, 1), np.arange(Sk).reshape(1, -1)), (B, H, Sq, Sk))


def _variant_arrays(variants) -> dict:
    """The variant arrays the kernels read in place (C-contiguous float32, else copied first)."""
    return {n: x for n, x in (("alibi_slopes", variants.alibi_slopes), ("sinks", variants.sinks)) if x is not None}


def backward_workspace(q: ArrayInput) -> tuple[Array, Array]:
    """The fp32 scratch :func:`flash_attention_backward` needs, for queries shaped like ``q``.

    Allocate it once, outside any CUDA-graph capture, and pass it as ``workspace=``; it can
    be reused by every backward call with the same (batch, seqlen_q, heads, head_dim), one
    call at a time (two streams running backward passes at once need one workspace each).

    Parameters
    ----------
    q : cupy array (or a DLPack / CUDA-array-interface object), shape (batch, seqlen_q, heads, head_dim)
        Only its shape and device are used. Packed queries (total_q, heads, head_dim) give the
        workspace of :func:`cupyflash.flash_attention_varlen_backward`.

    Returns
    -------
    (D, dq_accum) : tuple of two cupy arrays on q's device
        D = rowsum(dout * out), float32 (batch, heads, seqlen_q), and the float32 dQ
        accumulator (batch, heads, seqlen_q, head_dim); packed: (heads, total_q) and
        (heads, total_q, head_dim).
    """
    q = _checks.as_array(q, "q")
    if not _checks.is_cupy_array(q) or q.ndim not in (3, 4):
        raise ValueError("backward_workspace takes the GPU (cupy) query array, shaped (batch, seqlen_q, heads, "
                         "head_dim), or (total_q, heads, head_dim) packed")
    from . import _cuda_backend
    B, Sq, H, D = q.shape if q.ndim == 4 else (1, *q.shape)
    with _cuda_backend.cupy.cuda.Device(q.device.id):
        ws = _cuda_backend.backward_workspace(B, H, Sq, D)
    return ws if q.ndim == 4 else (ws[0][0], ws[1][0])
