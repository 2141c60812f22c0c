"""Attention against a KV cache (flash-attn's ``flash_attn_with_kvcache``): the inference call.

Serving a model attends a few new query tokens per sequence (1 for decode, more for speculative
verification or chunked prefill) to the keys and values cached for that sequence. The new tokens'
keys and values, when given, are first written into the cache in place, at each sequence's current
length; the caller then advances ``cache_seqlens`` (as in flash-attn). The cache is dense,
(batch, seqlen_max, heads_kv, head_dim), or paged (vLLM's PagedAttention): pages of page_size
positions, (num_pages, page_size, heads_kv, head_dim), that each sequence lists in its row of
``page_table``.
"""
from __future__ import annotations

import numpy as np

from . import _checks, _plans
from ._dtypes import lse_dtype
from ._variants import NO_WINDOW
from .api import Array, ArrayInput, _cpu_backend, _gpu_backend, _variant_arrays


def flash_attention_with_kvcache(q: ArrayInput, k_cache: ArrayInput, v_cache: ArrayInput, *,
                                 k: ArrayInput | None = None, v: ArrayInput | None = None,
                                 cache_seqlens: ArrayInput | None = None, page_table: ArrayInput | None = None,
                                 causal: bool = True, softmax_scale: float | None = None,
                                 window_size: tuple[int, int] = NO_WINDOW, softcap: float = 0.0,
                                 alibi_slopes: ArrayInput | None = None, sinks: ArrayInput | None = None,
                                 num_splits: int = 0, return_lse: bool = False, out: ArrayInput | None = None,
                                 lse: ArrayInput | None = None,
                                 workspace: ArrayInput | None = None) -> Array | tuple[Array, Array]:
    """Attention of each sequence's new queries to its cached keys and values.

    Parameters
    ----------
    q : array, shape (batch, seqlen_q, heads, head_dim)
        The new queries (seqlen_q: 1 for decode).
    k_cache, v_cache : arrays
        Dense: (batch, seqlen_max, heads_kv, head_dim). Paged: (num_pages, page_size, heads_kv,
        head_dim) with ``page_table``; page_size a power of two >= 16. q's dtype and device;
        writable when ``k`` and ``v`` are given.
    k, v : arrays, optional, shape (batch, seqlen_new, heads_kv, head_dim)
        New tokens, written into the caches at positions cache_seqlens[b] .. cache_seqlens[b] +
        seqlen_new - 1 before attending (they are attended to). The caller advances
        ``cache_seqlens`` by seqlen_new afterwards: this call does not change it.
    cache_seqlens : int32 array, shape (batch,), optional
        The tokens already in each sequence's cache (device array on the GPU: reading it is never
        needed). None: every cache is full (seqlen_max, or pages_per_sequence * page_size) and no
        tokens can be appended.
    page_table : int32 array, shape (batch, pages_per_sequence), optional
        Sequence b's position p lives in page page_table[b, p // page_size], row p % page_size.
    causal, softmax_scale, window_size, softcap, alibi_slopes, sinks
        As for :func:`cupyflash.flash_attention`, per sequence: the masks are aligned to each
        sequence's own end (its cached tokens plus the new ones). causal defaults to True.
    num_splits : int
        Split-KV: each sequence's keys in this many chunks of whole key tiles, whose partial
        softmaxes are merged by their lse (flash-decoding); 0 lets cupyflash choose: on the GPU,
        enough chunks to fill the SMs when batch x heads_kv blocks would not (1 on the CPU).
    return_lse, out, lse
        As for :func:`cupyflash.flash_attention`; lse is (batch, heads, seqlen_q).
    workspace : cupy float32 array, optional
        Split-KV's scratch, from :func:`kvcache_workspace` for these shapes. Without it a split
        call allocates one. With ``out``, ``lse`` and ``workspace`` given, a GPU call allocates
        nothing and never synchronises with the host: a decode loop can be captured in a CUDA
        graph, ``cache_seqlens`` advanced in device memory between replays.

    The GPU path runs a decode kernel for float16 and bfloat16 (every paged call, and dense calls
    with at most 64 query rows per kv head: heads // heads_kv x seqlen_q): each block reads a kv
    head's keys once for its whole group of query heads, pages through the page table. float32
    and longer dense chunks run the prefill kernels (a paged cache gathered into a dense copy).

    The caller's contract: each sequence's tokens, cached and new, fit its cache, and its page
    table rows name pages of the cache. The NumPy path checks both (a ValueError names the
    index). The GPU path cannot without a host read, and so does not: there a length past the
    capacity is clamped to it (new tokens past it are dropped), a negative one counts as 0, and a
    new token whose page index lies outside the cache is not written; nothing is ever read or
    written outside the arrays.

    Returns
    -------
    out, and lse when ``return_lse``.
    """
    # a call with the layouts of an earlier one reuses its checked plan (_plans)
    key = _plans.kvcache_key(q, k_cache, v_cache, k, v, cache_seqlens, page_table, out, lse, workspace, causal,
                             softmax_scale, window_size, softcap, alibi_slopes, sinks, num_splits, return_lse)
    plan = _plans.KVCACHE.get(key)
    if plan is not None:
        result = plan(q, k_cache, v_cache, k, v, cache_seqlens, page_table, out, lse, workspace, alibi_slopes, sinks)
        if result is not None:
            return result if return_lse else result[0]
    given = (k, v, cache_seqlens, page_table)
    arrays = {n: _checks.as_array(a, n) for n, a in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache))}
    dev = _checks.check_same_backend(arrays)
    dtype = _checks.check_dtype(arrays, dev != "cpu")
    q, k_cache, v_cache = arrays.values()
    shape, layout, cache_seqlens, k, v = _checks.check_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, page_table,
                                                              dev)
    causal = _checks.check_bool("causal", causal)
    scale = _checks.check_scale(softmax_scale, shape.head_dim)
    variants = _checks.check_variants(shape, dtype, dev, causal, window_size, softcap, alibi_slopes, sinks)
    num_splits = _checks.check_num_splits(num_splits)
    return_lse = _checks.check_bool("return_lse", return_lse)
    if out is not None:
        out = _checks.check_output_buffer("out", out, q.shape, dtype, dev)
    if lse is not None:
        lse = _checks.check_output_buffer("lse", lse, (shape.batch, shape.heads, shape.seqlen_q), lse_dtype(dtype),
                                          dev, c_contiguous=True)
    if dev == "cpu":
        lengths = cache_seqlens if cache_seqlens is not None else np.full(shape.batch, layout.capacity)
        if cache_seqlens is not None or layout.page_table is not None:
            _checks.check_cache_values(lengths, layout, k_cache.shape[0])
        o, l = _cpu_backend().forward_kvcache(q, k_cache, v_cache, lengths, k_new=k, v_new=v,
                                              page_table=layout.page_table, scale=scale, variants=variants,
                                              out=out, lse=lse, num_splits=max(num_splits, 1))
    else:
        if workspace is not None:
            workspace = _checks.check_kvcache_workspace(workspace, dev)
        new_tokens = {"k": k, "v": v} if k is not None else {}
        _checks.check_graph_capture(dev, needed={"out": out, "lse": lse},
                                    in_place={"q": q, "k_cache": k_cache, "v_cache": v_cache, "out": out, **new_tokens},
                                    dense=_variant_arrays(variants))
        from . import _decode
        o, l, plan = _decode.forward_kvcache(q, k_cache, v_cache, cache_seqlens, layout, k_new=k, v_new=v, scale=scale,
                                             variants=variants, num_splits=num_splits, out=out, lse=lse,
                                             workspace=workspace)
        if all(a is b for a, b in zip((k, v, cache_seqlens, layout.page_table), given)):
            _plans.KVCACHE.put(key, plan)  # the plan reads the caller's own index arrays
    return (o, l) if return_lse else o


def kvcache_workspace(q: ArrayInput, k_cache: ArrayInput, *, page_table: ArrayInput | None = None,
                      num_splits: int = 0) -> Array:
    """Split-KV's scratch for :func:`flash_attention_with_kvcache` calls with these shapes.

    Allocate it once, outside any CUDA-graph capture, and pass it as ``workspace=``: it serves
    every call whose q, k_cache and page_table have these shapes and dtype and whose num_splits
    is the same, one call at a time. A float32 cupy array, empty when such calls do not split.

    Parameters
    ----------
    q, k_cache : cupy arrays (only their shapes, dtype and device are used)
    page_table : optional, the paged cache's table (its shape)
    num_splits : as for the call
    """
    q = _checks.as_array(q, "q")
    k_cache = _checks.as_array(k_cache, "k_cache")
    if not _checks.is_cupy_array(q) or q.ndim != 4 or k_cache.ndim != 4:
        raise ValueError("kvcache_workspace takes the GPU (cupy) arrays q (batch, seqlen_q, heads, head_dim) and "
                         "k_cache (4-D)")
    num_splits = _checks.check_num_splits(num_splits)
    table_shape = None if page_table is None else tuple(_checks.as_array(page_table, "page_table").shape)
    import cupy
    from . import _decode
    with cupy.cuda.Device(q.device.id):
        splits = _decode.plan_splits(tuple(q.shape), q.dtype, tuple(k_cache.shape), table_shape, num_splits)
        B, Sq, H, D = q.shape
        return cupy.empty(_decode.workspace_floats(splits, B, Sq, H, D), dtype=np.float32)
