"""Attention over packed sequences of different lengths (flash-attn's ``flash_attn_varlen_func``).

A trainer packs a batch's sequences one after another instead of padding them to the longest,
and passes the offsets of each sequence's first row (``cu_seqlens``). Sequence b is rows
``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` of q and ``cu_seqlens_k[b]:cu_seqlens_k[b + 1]`` of k and
v, and attends to its own keys only, exactly as the dense call on that sequence alone would: one
kernel launch covers every sequence (the grid spans the longest), with no padded copy.
"""
from __future__ import annotations

from dataclasses import replace

from . import _checks
from ._dtypes import lse_dtype
from ._variants import NO_WINDOW
from .api import Array, ArrayInput, _cpu_backend, _gpu_backend, _variant_arrays


def _checked_inputs(arrays: dict, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
                    window_size, softcap, alibi_slopes, sinks, user: dict):
    """The checks both passes make: arrays (q, k, v first) -> (arrays, device, dtype, shape, packing,
    causal, scale, variants); ``user``: mask_mod, bias_mod, aux, dropout_p, seed."""
    arrays = {n: _checks.as_array(a, n) for n, a in arrays.items()}
    dev = _checks.check_same_backend(arrays)
    dtype = _checks.check_dtype(arrays, dev != "cpu")
    shape = _checks.check_varlen_qkv(arrays["q"], arrays["k"], arrays["v"])
    causal = _checks.check_bool("causal", causal)
    scale = _checks.check_scale(softmax_scale, shape.head_dim)
    packing = _checks.check_packing(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, shape, dev)
    per_sequence = replace(shape, batch=packing.batch)
    variants = _checks.check_variants(per_sequence, dtype, dev, causal, window_size, softcap, alibi_slopes, sinks)
    variants = _checks.check_user_terms(variants, per_sequence, dtype, dev, user["mask_mod"], user["bias_mod"],
                                        user["aux"], None, None, None, user["dropout_p"], user["seed"])
    return arrays, dev, dtype, shape, packing, causal, scale, variants


def flash_attention_varlen(q: ArrayInput, k: ArrayInput, v: ArrayInput, cu_seqlens_q: ArrayInput,
                           cu_seqlens_k: ArrayInput, *, max_seqlen_q: int | None = None,
                           max_seqlen_k: int | None = None, causal: bool = False, softmax_scale: float | None = None,
                           window_size: tuple[int, int] = NO_WINDOW, softcap: float = 0.0,
                           alibi_slopes: ArrayInput | None = None, sinks: ArrayInput | None = None,
                           return_lse: bool = False, out: ArrayInput | None = None,
                           lse: ArrayInput | None = None, mask_mod: str | None = None, bias_mod: str | None = None,
                           aux: dict | None = None, dropout_p: float = 0.0,
                           seed: int | None = None) -> Array | tuple[Array, Array]:
    """Attention of each packed sequence over its own keys.

    Parameters
    ----------
    q : array, shape (total_q, heads, head_dim)
    k, v : arrays, shape (total_k, heads_kv, head_dim)
        The sequences' rows one after another; dtypes, head dims, grouped-query heads, strides
        and devices as for :func:`cupyflash.flash_attention`.
    cu_seqlens_q, cu_seqlens_k : int32 arrays, shape (batch + 1,), on the inputs' device
        Sequence b is query rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] and key rows
        cu_seqlens_k[b] .. cu_seqlens_k[b + 1]: each starts at 0, never decreases and ends at
        total_q (total_k). Sequences of length 0 are allowed (empty output rows; a query
        sequence with no keys gets out = 0 and lse = -inf).
    max_seqlen_q, max_seqlen_k : int, optional
        The longest sequence of each. On the GPU, leaving either out reads the offsets to the
        host to compute it, and checks them (a synchronisation). **Given both, the GPU path
        trusts the offsets and the maxima**: offsets that break the rules above, or a maximum
        below the longest sequence, give wrong results there (never an out-of-bounds read of
        the offsets). The NumPy path always checks.
    causal, softmax_scale, window_size, softcap, alibi_slopes, sinks
        As for :func:`cupyflash.flash_attention`, per sequence: the causal and window masks are
        aligned bottom-right within each sequence (o = its key length - its query length).
        alibi_slopes may be (heads,) or (batch, heads), one row per sequence.
    mask_mod, bias_mod, aux, dropout_p, seed
        As for :func:`cupyflash.flash_attention`, per sequence: ``b`` is the sequence's index,
        ``q_idx`` and ``kv_idx`` positions within it (NumPy backend so far, issue 19).
    return_lse : bool
        Also return the log-sum-exp, float32 (heads, total_q) (flash-attn's varlen layout;
        float64 for float64 inputs).
    out, lse : arrays, optional
        Preallocated outputs (q's shape and dtype; a C-contiguous (heads, total_q) lse), with
        the rules of :func:`cupyflash.flash_attention`.

    Returns
    -------
    out, and lse when ``return_lse``.

    Raises
    ------
    TypeError, ValueError
        Naming the argument and the rule; a bad offset names its index.

    Examples
    --------
    >>> import numpy as np, cupyflash
    >>> lengths = [3, 5, 2]                          # three sequences, 10 tokens in all
    >>> cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    >>> q = k = v = np.random.default_rng(0).standard_normal((10, 2, 16)).astype(np.float32)
    >>> out = cupyflash.flash_attention_varlen(q, k, v, cu, cu, causal=True)
    >>> out.shape
    (10, 2, 16)
    """
    arrays, dev, dtype, shape, packing, causal, scale, variants = _checked_inputs(
        {"q": q, "k": k, "v": v}, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
        window_size, softcap, alibi_slopes, sinks, dict(mask_mod=mask_mod, bias_mod=bias_mod, aux=aux,
                                                        dropout_p=dropout_p, seed=seed))
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    return_lse = _checks.check_bool("return_lse", return_lse)
    if out is not None:
        out = _checks.check_output_buffer("out", out, q.shape, dtype, dev)
    if lse is not None:
        lse = _checks.check_output_buffer("lse", lse, (shape.heads, shape.seqlen_q), lse_dtype(dtype), dev,
                                          c_contiguous=True)
    if dev != "cpu":
        _checks.check_graph_capture(dev, needed={"out": out, "lse": lse}, in_place={"q": q, "k": k, "v": v, "out": out},
                                    dense=_variant_arrays(variants))
        o, l, _ = _gpu_backend().forward_with_plan(
            q[None], k[None], v[None], causal=variants.window == (-1, 0), scale=scale,
            out=None if out is None else out[None], lse=None if lse is None else lse[None], variants=variants,
            packing=packing)
        o, l = (o[0] if out is None else out), (l[0] if lse is None else lse)
    else:
        o, l = _cpu_backend().forward_varlen(q, k, v, packing, scale=scale, variants=variants, out=out, lse=lse)
    return (o, l) if return_lse else o


def flash_attention_varlen_backward(dout: ArrayInput, q: ArrayInput, k: ArrayInput, v: ArrayInput, out: ArrayInput,
                                    lse: ArrayInput, cu_seqlens_q: ArrayInput, cu_seqlens_k: ArrayInput, *,
                                    max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
                                    causal: bool = False, softmax_scale: float | None = None,
                                    window_size: tuple[int, int] = NO_WINDOW, softcap: float = 0.0,
                                    alibi_slopes: ArrayInput | None = None, sinks: ArrayInput | None = None,
                                    dq: ArrayInput | None = None, dk: ArrayInput | None = None,
                                    dv: ArrayInput | None = None, dsinks: ArrayInput | None = None,
                                    workspace: tuple[Array, Array] | None = None,
                                    deterministic: bool = False, mask_mod: str | None = None,
                                    bias_mod: str | None = None, aux: dict | None = None, dropout_p: float = 0.0,
                                    seed: int | None = None) -> tuple[Array, ...]:
    """Gradients of :func:`flash_attention_varlen` with respect to q, k and v (and sinks).

    Parameters
    ----------
    dout : array shaped like q
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k
        As in the forward call (the same trust rule for the offsets on the GPU).
    out : array
        The forward output.
    lse : array, shape (heads, total_q)
        The forward log-sum-exp, ``flash_attention_varlen(..., return_lse=True)[1]``.
    causal, softmax_scale, window_size, softcap, alibi_slopes, sinks, mask_mod, bias_mod, aux, dropout_p, seed
        As in the forward call.
    dq, dk, dv, dsinks, deterministic
        As for :func:`cupyflash.flash_attention_backward`.
    workspace : tuple of two cupy arrays, optional
        GPU only: ``cupyflash.backward_workspace(q)`` of the packed q ((heads, total_q) and
        (heads, total_q, head_dim) float32). With it, dq, dk, dv (and dsinks with sinks) and both
        maxima given, the packed backward allocates nothing and never synchronises with the
        host: it can be captured in a CUDA graph.

    Returns
    -------
    dq, dk, dv
        Shaped like q, k, v; a key row's gradient sums over the query heads of its group.
    dsinks
        Only with sinks: float32 (heads,), summed over every sequence.
    """
    arrays, dev, dtype, shape, packing, causal, scale, variants = _checked_inputs(
        {"q": q, "k": k, "v": v, "dout": dout, "out": out}, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        causal, softmax_scale, window_size, softcap, alibi_slopes, sinks,
        dict(mask_mod=mask_mod, bias_mod=bias_mod, aux=aux, dropout_p=dropout_p, seed=seed))
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    _checks.check_like("dout", arrays["dout"], q.shape, dtype, "the gradient of out, shaped like q")
    _checks.check_like("out", arrays["out"], q.shape, dtype, "the forward output, shaped like q")
    lse = _checks.as_array(lse, "lse")
    _checks.check_same_backend({"q": q, "lse": lse})
    _checks.check_like("lse", lse, (shape.heads, shape.seqlen_q), lse_dtype(dtype), "the forward log-sum-exp")
    deterministic = _checks.check_bool("deterministic", deterministic)
    grads = {name: None if buf is None else _checks.check_output_buffer(name, buf, like.shape, dtype, dev)
             for name, buf, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v))}
    if dsinks is not None:
        if variants.sinks is None:
            raise ValueError("dsinks receives the gradient of sinks: pass it only with sinks")
        dsinks = _checks.check_output_buffer("dsinks", dsinks, (shape.heads,), lse_dtype(dtype), dev, c_contiguous=True)
    extra = {}
    if workspace is not None:
        if dev == "cpu":
            raise ValueError("workspace is only used by the GPU path; omit it for numpy arrays")
        extra["workspace"] = tuple(w[None] for w in _checks.check_workspace(workspace, shape, dev, packed=True))
    if dev != "cpu":
        needed = {**grads, "workspace": workspace} | ({"dsinks": dsinks} if variants.sinks is not None else {})
        _checks.check_graph_capture(dev, needed=needed, in_place={n: arrays[n] for n in ("dout", "q", "k", "v", "out")}
                                    | grads, dense={"lse": lse, **_variant_arrays(variants)})
        result, _ = _gpu_backend().backward_with_plan(
            arrays["dout"][None], q[None], k[None], v[None], arrays["out"][None], lse[None],
            causal=variants.window == (-1, 0), scale=scale,
            **{n: None if g is None else g[None] for n, g in grads.items()},
            deterministic=deterministic, variants=variants, dsinks=dsinks, packing=packing, **extra)
        # the caller's buffers where given, else the packed views of the new arrays
        return tuple(g[0] if user is None else user for g, user in zip(result[:3], grads.values())) + result[3:]
    result = _cpu_backend().backward_varlen(arrays["dout"], q, k, v, arrays["out"], lse, packing, scale=scale,
                                            variants=variants, **grads)
    if dsinks is not None:
        dsinks[...] = result[3]
        result = (*result[:3], dsinks)
    return result
