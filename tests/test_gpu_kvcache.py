"""Attention against a KV cache (issue 16) on the CUDA kernels, held to the cases of the NumPy spec
(tests/test_kvcache.py): each sequence's queries against the float64 reference of its cache's
valid prefix, with flash-attn's rule, outputs poisoned with NaN, cache positions past each valid
prefix NaN (never read: the Hopper forward zeroes the V rows TMA loads past a sequence's keys),
the new tokens landing exactly where they should. float16 and bfloat16 run the decode kernel
(flash_decode.cu: the kv head's group of query heads in one block, pages read through the table,
split-KV merged by the combine kernel); float32 and long dense chunks run the prefill kernels with
per-sequence key counts (VARIANT_KVLEN), a paged cache gathered first.
"""
import numpy as np
import pytest

import cupyflash
from cupyflash._dtypes import BFLOAT16, FLOAT16, FLOAT32

from test_gpu_kernels import assert_within, nan_like, to_gpu
from test_gpu_variants import _lse_slack
from test_kvcache import CASES, LAYOUTS, cache_inputs, case_keywords, check_kvcache

pytestmark = pytest.mark.gpu


def _within(tag):
    """assert_within, with fp32 lse's slack for its own magnitude (test_gpu_variants._lse_slack)."""
    def within(name, got, want, naive, dtype):
        slack = _lse_slack(dtype, name, got, want) if name == "lse" else 0.0
        assert_within(f"{name} [{tag}]", got, want, naive, dtype, slack=slack)
    return within


def run_kvcache(inputs, kw, D, **call_kw):
    cp = pytest.importorskip("cupy")
    q, k_cache, v_cache, k_new, v_new, seqlens, table = inputs
    g = lambda x: None if x is None else to_gpu(x)  # noqa: E731
    gk, gv = g(k_cache), g(v_cache)
    out, lse = nan_like(q.shape, q.dtype), nan_like((q.shape[0], q.shape[2], q.shape[1]), np.float32)
    gkw = {n: (to_gpu(x) if isinstance(x, np.ndarray) else x) for n, x in kw.items()}
    o, l = cupyflash.flash_attention_with_kvcache(g(q), gk, gv, k=g(k_new), v=g(v_new), cache_seqlens=g(seqlens),
                                                  page_table=g(table), return_lse=True, out=out, lse=lse, **gkw,
                                                  **call_kw)
    assert o is out and l is lse
    return cp.asnumpy(o), cp.asnumpy(l), cp.asnumpy(gk), cp.asnumpy(gv)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype,D", [(BFLOAT16, 128), (FLOAT16, 64), (BFLOAT16, 96), (FLOAT16, 256), (FLOAT32, 32)],
                         ids=["bf16-d128", "f16-d64", "bf16-d96", "f16-d256", "f32-d32"])
def test_each_sequence_attends_to_the_valid_prefix_of_its_cache(rng, dtype, D, case, layout):
    cached, new, Sq, page_size, H_kv = LAYOUTS[layout]
    inputs = cache_inputs(rng, dtype, cached, new, Sq, page_size, H_kv, D=D)
    kw = case_keywords(rng, case, len(cached), inputs[0].shape[2])
    o, l, k_after, v_after = run_kvcache(inputs, kw, D)
    tag = f"{case} {layout} {np.dtype(dtype).name if dtype != BFLOAT16 else 'bf16'} D{D}"
    check_kvcache(o, l, k_after, v_after, inputs[1], inputs[2], inputs, LAYOUTS[layout], kw,
                  _within(tag))


def test_a_long_cache_decode(rng):
    cached = [4000, 0, 1, 2049]
    inputs = cache_inputs(rng, BFLOAT16, cached, 1, 1, None, 2, D=128, capacity=4096)
    kw = dict(causal=True)
    o, l, k_after, v_after = run_kvcache(inputs, kw, 128)
    check_kvcache(o, l, k_after, v_after, inputs[1], inputs[2], inputs, (cached, 1, 1, None, 2), kw,
                  _within("long"))


LONG = [4000, 0, 1, 2049, 3333]  # cached tokens: empty, one, odd and long sequences


@pytest.mark.parametrize("page_size", [None, 16, 256], ids=["dense", "paged16", "paged256"])
@pytest.mark.parametrize("num_splits", [1, 3, 16, 0])
@pytest.mark.parametrize("case", ["causal", "window", "softcap-alibi-sinks"])
def test_split_kv_merges_to_the_reference(rng, case, num_splits, page_size):
    """Each sequence's keys in num_splits chunks of whole tiles (0: cupyflash's choice), merged by the
    combine kernel (the sink counted once): the reference of the valid prefix, empty chunks included."""
    layout = (LONG, 1, 1, page_size, 2)
    inputs = cache_inputs(rng, BFLOAT16, LONG, 1, 1, page_size, 2, D=128, capacity=4096)
    kw = case_keywords(rng, case, len(LONG), inputs[0].shape[2])
    o, l, k_after, v_after = run_kvcache(inputs, kw, 128, num_splits=num_splits)
    check_kvcache(o, l, k_after, v_after, inputs[1], inputs[2], inputs, layout, kw,
                  _within(f"{case} splits={num_splits} page_size={page_size}"))


@pytest.mark.parametrize("H,H_kv,Sq,page_size", [(32, 1, 1, None), (32, 2, 2, None), (16, 1, 7, 16), (16, 1, 7, None),
                                                 (8, 8, 1, 32)],
                         ids=["mqa-32rows", "gqa16-2tokens", "paged-112rows", "dense-112rows-prefill", "mha"])
def test_query_rows_beyond_one_tile(rng, H, H_kv, Sq, page_size):
    """Group x new tokens above 16 rows: two m-tiles, row tiles across blocks (paged), or the prefill
    kernels (dense caches beyond 64 rows per kv head)."""
    cached = [30, 0, 257]
    layout = (cached, Sq, Sq, page_size, H_kv)
    inputs = cache_inputs(rng, FLOAT16, cached, Sq, Sq, page_size, H_kv, H=H, D=64)
    kw = case_keywords(rng, "softcap-alibi-sinks", len(cached), H)
    o, l, k_after, v_after = run_kvcache(inputs, kw, 64)
    check_kvcache(o, l, k_after, v_after, inputs[1], inputs[2], inputs, layout, kw, _within(f"H{H}/{H_kv} Sq{Sq}"))


def test_batch_one_against_a_long_cache_splits_by_itself(rng):
    from cupyflash import _decode
    cached = [30000]
    inputs = cache_inputs(rng, BFLOAT16, cached, 0, 1, 256, 8, H=32, D=128, capacity=32768)
    q, k_cache, table = inputs[0], inputs[1], inputs[6]
    cp = pytest.importorskip("cupy")
    assert _decode.plan_splits(q.shape, q.dtype, k_cache.shape, table.shape, 0) > 1
    kw = dict(causal=True)
    o, l, k_after, v_after = run_kvcache(inputs, kw, 128)
    check_kvcache(o, l, k_after, v_after, inputs[1], inputs[2], inputs, (cached, 0, 1, 256, 8), kw, _within("B1"))
    assert cp.asarray(cupyflash.kvcache_workspace(to_gpu(q), to_gpu(k_cache), page_table=to_gpu(table))).size > 0


def _decode_steps(rng, steps, B, H, H_kv, D, capacity, page_size):
    """Per-step queries and new tokens of a decode loop, the caches, the starting lengths and the table."""
    inputs = cache_inputs(rng, BFLOAT16, [10, 0, 301, 77][:B], 1, 1, page_size, H_kv, H=H, D=D, capacity=capacity)
    _, k_cache, v_cache, _, _, seqlens, table = inputs
    qs = [rng.standard_normal((B, 1, H, D)).astype(BFLOAT16) for _ in range(steps)]
    news = [[rng.standard_normal((B, 1, H_kv, D)).astype(BFLOAT16) for _ in range(2)] for _ in range(steps)]
    return qs, news, k_cache, v_cache, seqlens, table


@pytest.mark.parametrize("page_size", [None, 16])
def test_a_captured_decode_loop_replays_the_eager_steps(rng, page_size):
    """N decode steps (append, attend, cache_seqlens += 1 in device memory) captured in one CUDA graph
    with out=, lse= and workspace= (split-KV forced), replayed: bit for bit the eager calls' outputs
    and caches."""
    cp = pytest.importorskip("cupy")
    steps, B, H, H_kv, D = 5, 4, 8, 2, 128
    qs, news, k_cache, v_cache, seqlens, table = _decode_steps(rng, steps, B, H, H_kv, D, 512, page_size)
    gq = [to_gpu(x) for x in qs]
    gnew = [[to_gpu(x) for x in kv] for kv in news]
    gtable = None if table is None else to_gpu(table)

    def run(captured):
        kc, vc, lengths = to_gpu(k_cache), to_gpu(v_cache), to_gpu(seqlens)
        outs = [cp.full((B, 1, H, D), np.nan, dtype=BFLOAT16) for _ in range(steps)]
        lses = [cp.full((B, H, 1), np.nan, dtype=np.float32) for _ in range(steps)]
        ws = cupyflash.kvcache_workspace(gq[0], kc, page_table=gtable, num_splits=3)
        assert ws.size > 0

        def loop():
            for t in range(steps):
                cupyflash.flash_attention_with_kvcache(gq[t], kc, vc, k=gnew[t][0], v=gnew[t][1], cache_seqlens=lengths,
                                                       page_table=gtable, num_splits=3, out=outs[t], lse=lses[t],
                                                       workspace=ws, return_lse=True)
                cp.add(lengths, 1, out=lengths)  # the caller advances the lengths, in device memory
        if not captured:
            loop()
        else:
            stream = cp.cuda.Stream(non_blocking=True)
            with stream:
                stream.begin_capture()
                try:
                    loop()
                finally:
                    graph = stream.end_capture()
                graph.launch()
            stream.synchronize()
        return [cp.asnumpy(x) for x in (*outs, *lses, kc, vc, lengths)]

    eager = run(captured=False)
    replayed = run(captured=True)
    for i, (a, b) in enumerate(zip(eager, replayed)):
        assert np.array_equal(a, b, equal_nan=True), f"array {i} differs between the eager and the replayed loop"
    assert not any(np.isnan(x).any() for x in eager[:2 * steps]), "an output was never written"
    assert np.array_equal(eager[-1], seqlens + steps)


def test_a_workspace_too_small_for_the_splits_is_refused(rng):
    cp = pytest.importorskip("cupy")
    inputs = cache_inputs(rng, BFLOAT16, LONG, 0, 1, None, 2, D=128, capacity=4096)
    q, kc, vc = (to_gpu(x) for x in inputs[:3])
    with pytest.raises(ValueError, match=r"workspace holds 8 float32 elements but this call's 4 splits need"):
        cupyflash.flash_attention_with_kvcache(q, kc, vc, cache_seqlens=to_gpu(inputs[5]), num_splits=4,
                                               workspace=cp.empty(8, np.float32))
    with pytest.raises(ValueError, match=r"workspace must be the 1-D float32 cupy array"):
        cupyflash.flash_attention_with_kvcache(q, kc, vc, num_splits=4, workspace=cp.empty(8, np.float64))


def test_a_repeated_call_takes_its_plan_and_gives_the_same_result(rng):
    from cupyflash import _plans
    cp = pytest.importorskip("cupy")
    inputs = cache_inputs(rng, BFLOAT16, LONG, 1, 1, 16, 2, D=128, capacity=4096)
    q, kc, vc, kn, vn, lengths, table = (to_gpu(x) for x in inputs)
    _plans.clear()
    first = cupyflash.flash_attention_with_kvcache(q, kc, vc, k=kn, v=vn, cache_seqlens=lengths, page_table=table)
    assert len(_plans.KVCACHE) == 1
    again = cupyflash.flash_attention_with_kvcache(q, kc, vc, k=kn, v=vn, cache_seqlens=lengths, page_table=table)
    assert len(_plans.KVCACHE) == 1
    assert cp.array_equal(first, again)


@pytest.mark.parametrize("page_size", [None, 16, 64, 256], ids=["dense", "paged16", "paged64", "paged256"])
@pytest.mark.parametrize("case,num_splits,D", [("causal", 1, 128), ("softcap-alibi-sinks", 0, 128), ("window", 3, 64),
                                               ("causal", 0, 256)])
def test_cp_async_loads_give_the_reference(rng, monkeypatch, case, num_splits, D, page_size):
    """The decode kernel's cp.async loads (every GPU but sm_90, whose default is TMA boxes into
    swizzled tiles): the same cases as the TMA loads, stale rows past each sequence (NaN in the cache)
    zeroed."""
    pytest.importorskip("cupy")
    from cupyflash import _config, _plans
    monkeypatch.setattr(_config, "DECODE_TMA", False)
    _plans.clear()
    layout = (LONG, 1, 1, page_size, 2)
    inputs = cache_inputs(rng, BFLOAT16, LONG, 1, 1, page_size, 2, D=D, capacity=4096)
    kw = case_keywords(rng, case, len(LONG), inputs[0].shape[2])
    o, l, k_after, v_after = run_kvcache(inputs, kw, D, num_splits=num_splits)
    _plans.clear()
    check_kvcache(o, l, k_after, v_after, inputs[1], inputs[2], inputs, layout, kw,
                  _within(f"cp.async {case} splits={num_splits} D{D} page_size={page_size}"))


def test_the_workspace_for_these_shapes_serves_a_call_with_any_variant(rng):
    """kvcache_workspace knows no variants: the splits (and so the workspace) it sizes for must be the
    call's own with softcap, ALiBi and sinks too (the GPU's slots are counted without variants)."""
    cp = pytest.importorskip("cupy")
    inputs = cache_inputs(rng, BFLOAT16, [3000], 1, 1, None, 2, H=8, D=128, capacity=4096)
    q, kc, vc, kn, vn, lengths, _ = (None if x is None else to_gpu(x) for x in inputs)
    ws = cupyflash.kvcache_workspace(q, kc)
    assert ws.size > 0  # batch 1: split
    kw = case_keywords(rng, "softcap-alibi-sinks", 1, 8)
    kw = {n: (to_gpu(x) if isinstance(x, np.ndarray) else x) for n, x in kw.items()}
    out = cp.empty_like(q)
    lse = cp.empty((1, 8, 1), cp.float32)
    cupyflash.flash_attention_with_kvcache(q, kc, vc, k=kn, v=vn, cache_seqlens=lengths, out=out, lse=lse,
                                           workspace=ws, **kw)
    assert bool(cp.isfinite(out).all())
