"""Attention against a KV cache (issue 16) on the NumPy backend, the executable spec of the kernels.
As specifications:

- each sequence's queries get what the float64 reference gives them against the valid prefix of
  that sequence's cache (its cached tokens, then the new ones), within the 2x-naive bound: dense
  and paged caches, lengths 0, 1, odd and long, seqlen_q 1 and 7, GQA ratios and MQA, every variant;
- cache positions past each sequence's valid prefix are NaN and change nothing (never read);
- the new tokens land exactly at positions cache_seqlens[b] ..., and nothing else in the cache
  changes;
- every wrong argument is a TypeError or ValueError naming it, a bad length or page naming its
  index (tests/test_gpu_kvcache.py holds the kernels to the same cases).
"""
import numpy as np
import pytest

from cupyflash import flash_attention_with_kvcache, reference
from cupyflash._dtypes import BFLOAT16, FLOAT32, FLOAT64

from test_numpy_backend import assert_within_naive_bound

#: name -> variant keywords ("alibi", "sinks": flags)
CASES = {
    "causal": {},
    "non-causal": dict(causal=False),
    "window": dict(window_size=(40, -1)),
    "softcap-alibi-sinks": dict(softcap=4.0, alibi=True, sinks=True),
}
#: (tokens already cached per sequence, new tokens, query rows, page_size or None, kv heads of 8 query heads)
LAYOUTS = {
    "decode-dense": ([0, 1, 37, 300], 1, 1, None, 2),
    "verify-dense": ([5, 0, 130, 64], 7, 7, None, 8),
    "decode-paged": ([0, 1, 37, 300], 1, 1, 16, 1),
    "prefill-paged": ([17, 0, 255, 90], 0, 7, 32, 4),
}
CAPACITY = 320  # positions per sequence


def cache_inputs(rng, dtype, cached, new, Sq, page_size, H_kv, H=8, D=32, capacity=CAPACITY):
    """q, the caches (NaN past each sequence's cached tokens), the new tokens (None when new = 0),
    cache_seqlens, and the page table (None for a dense cache: pages listed in shuffled order, and
    a few pages no sequence uses)."""
    B = len(cached)
    q = rng.standard_normal((B, Sq, H, D)).astype(dtype)
    k_new, v_new = ((rng.standard_normal((B, new, H_kv, D)).astype(dtype) for _ in range(2)) if new else (None, None))
    seqlens = np.array(cached, np.int32)
    if page_size is None:
        shape, table = (B, capacity, H_kv, D), None
    else:
        per_seq = capacity // page_size
        table = rng.permutation(B * per_seq + 3)[:B * per_seq].reshape(B, per_seq).astype(np.int32)
        shape = (B * per_seq + 3, page_size, H_kv, D)
    k_cache, v_cache = (np.full(shape, np.nan, dtype) for _ in range(2))
    for b, n in enumerate(cached):
        rows = positions(k_cache, table, b, np.arange(n))
        for c in (k_cache, v_cache):
            c.reshape(-1, H_kv, D)[rows] = rng.standard_normal((n, H_kv, D)).astype(dtype)
    return q, k_cache, v_cache, k_new, v_new, seqlens, table


def positions(cache, table, b, pos):
    """Sequence b's positions as rows of the cache viewed as (rows, H_kv, D): batch b's rows of a
    dense cache, the table's pages of a paged one (page_size = cache.shape[1] either way)."""
    per = cache.shape[1]
    if table is None:
        return b * per + pos
    return table[b, pos // per].astype(np.int64) * per + pos % per


def appended(k_cache, k_new, seqlens, table):
    """The cache as it must be after the call: the new tokens at positions seqlens[b] ..."""
    want = k_cache.copy()
    if k_new is not None:
        for b, n in enumerate(seqlens):
            want.reshape(-1, *k_cache.shape[2:])[positions(k_cache, table, b, n + np.arange(k_new.shape[1]))] = k_new[b]
    return want


def reference_by_sequence(q, k_after, v_after, seqlens, new, table, kw, upcast):
    """The reference of each sequence's queries against its valid prefix, read from the caches as
    they are after the append."""
    B, Sq, H, _ = q.shape
    out = np.zeros(q.shape, np.float64 if upcast else q.dtype)
    lse = np.zeros((B, H, Sq), np.float64 if upcast else np.float32)
    for b in range(B):
        rows = positions(k_after, table, b, np.arange(seqlens[b] + new))
        K, V = (c.reshape(-1, *c.shape[2:])[rows][None] for c in (k_after, v_after))
        slopes = kw.get("alibi_slopes")
        kw_b = kw if slopes is None or slopes.ndim == 1 else {**kw, "alibi_slopes": slopes[b]}
        if K.shape[1] == 0:
            out[b] = 0
            lse[b] = -np.inf if "sinks" not in kw else kw["sinks"][:, None]
            continue
        o, l = reference.attention(q[b:b + 1], K, V, upcast=upcast, **kw_b)
        out[b], lse[b] = o[0], l[0]
    return out, lse


def case_keywords(rng, case, B, H):
    kw = dict(CASES[case])
    causal = kw.pop("causal", True)
    alibi, sinks = kw.pop("alibi", None), kw.pop("sinks", None)
    if alibi:
        kw["alibi_slopes"] = (2.0 ** -rng.uniform(1, 8, (B, H))).astype(FLOAT32)
    if sinks:
        kw["sinks"] = rng.uniform(-1, 3, (H,)).astype(FLOAT32)
    return dict(causal=causal, **kw)


def check_kvcache(got_out, got_lse, k_after, v_after, k_before, v_before, inputs, layout, kw, within):
    """A call's output and caches against the spec; ``within(name, got, want, naive, dtype)``."""
    q, _, _, k_new, v_new, seqlens, table = inputs
    new = layout[1]
    for name, got, before, tokens in (("k_cache", k_after, k_before, k_new), ("v_cache", v_after, v_before, v_new)):
        want = appended(before, tokens, seqlens, table)
        assert np.array_equal(np.asarray(got), want, equal_nan=True), f"{name}: the append wrote the wrong positions"
    ref_kw = {n: x for n, x in kw.items()}
    ref = reference_by_sequence(q, k_after, v_after, seqlens, new, table, ref_kw, upcast=True)
    naive = reference_by_sequence(q, k_after, v_after, seqlens, new, table, ref_kw, upcast=False)
    within("out", got_out, ref[0], naive[0], q.dtype)
    within("lse", got_lse, ref[1], naive[1], FLOAT64 if q.dtype == FLOAT64 else FLOAT32)


@pytest.mark.parametrize("dtype", [FLOAT64, FLOAT32, BFLOAT16], ids=["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_each_sequence_attends_to_the_valid_prefix_of_its_cache(rng, case, layout, dtype):
    cached, new, Sq, page_size, H_kv = LAYOUTS[layout]
    inputs = cache_inputs(rng, dtype, cached, new, Sq, page_size, H_kv)
    q, k_cache, v_cache, k_new, v_new, seqlens, table = inputs
    kw = case_keywords(rng, case, len(cached), q.shape[2])
    before = (k_cache.copy(), v_cache.copy())
    o, l = flash_attention_with_kvcache(q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=seqlens,
                                        page_table=table, return_lse=True, **kw)
    check_kvcache(o, l, k_cache, v_cache, *before, inputs, LAYOUTS[layout], kw,
                  lambda *a: assert_within_naive_bound(f"{a[0]} [{case} {layout}]", *a[1:]))


def test_a_full_cache_without_lengths_is_plain_attention(rng):
    q, k_cache, v_cache, *_ = cache_inputs(rng, FLOAT64, [CAPACITY] * 2, 0, 3, None, 2)
    o, l = flash_attention_with_kvcache(q, k_cache, v_cache, return_lse=True)
    want_o, want_l = reference.attention(q, k_cache, v_cache, causal=True)
    assert np.allclose(o, want_o, atol=1e-12) and np.allclose(l, want_l, atol=1e-12)


# ---- errors ----

def _good(rng, page_size=None):
    q, k_cache, v_cache, k_new, v_new, seqlens, table = cache_inputs(rng, FLOAT32, [3, 9], 2, 2, page_size, 2)
    kw = dict(q=q, k_cache=k_cache, v_cache=v_cache, k=k_new, v=v_new, cache_seqlens=seqlens)
    return kw if table is None else {**kw, "page_table": table}


BAD_CALLS = {
    "q-3d": (None, lambda a: {**a, "q": a["q"][0]}, ValueError, r"q must have 4 dimensions"),
    "cache-shapes": (None, lambda a: {**a, "v_cache": a["v_cache"][:, :-1]}, ValueError,
                     r"k_cache and v_cache must have the same shape"),
    "cache-batch": (None, lambda a: {**a, "k_cache": a["k_cache"][:1], "v_cache": a["v_cache"][:1]}, ValueError,
                    r"k_cache has 1 sequences but q has batch 2"),
    "k-without-v": (None, lambda a: {**a, "v": None}, ValueError, r"pass both or neither"),
    "k-shape": (None, lambda a: {**a, "k": a["k"][:, :, :1], "v": a["v"][:, :, :1]}, ValueError,
                r"k must have shape \(batch, seqlen_new, heads_kv, head_dim\)"),
    "append-without-lengths": (None, lambda a: {**a, "cache_seqlens": None}, ValueError,
                               r"appending k and v needs cache_seqlens"),
    "lengths-dtype": (None, lambda a: {**a, "cache_seqlens": a["cache_seqlens"].astype(np.int64)}, ValueError,
                      r"cache_seqlens must have dtype int32"),
    "lengths-shape": (None, lambda a: {**a, "cache_seqlens": np.zeros(3, np.int32)}, ValueError,
                      r"cache_seqlens must have shape \(2,\)"),
    "too-long": (None, lambda a: {**a, "cache_seqlens": np.array([3, CAPACITY - 1], np.int32)}, ValueError,
                 r"cache_seqlens\[1\] = 319 plus 2 new tokens exceeds the cache's 320 positions"),
    "negative": (None, lambda a: {**a, "cache_seqlens": np.array([-1, 0], np.int32)}, ValueError,
                 r"cache_seqlens\[0\] = -1 is negative"),
    "page-size": (16, lambda a: {**a, "k_cache": a["k_cache"][:, :12], "v_cache": a["v_cache"][:, :12]}, ValueError,
                  r"page_size \(k_cache.shape\[1\]\) must be a power of two >= 16"),
    "page-index": (16, lambda a: {**a, "page_table": np.where(a["page_table"] == a["page_table"][1, 0], 999,
                                                              a["page_table"]).astype(np.int32)}, ValueError,
                   r"page_table\[1, 0\] = 999 is not a page of the cache"),
    "page-table-shape": (16, lambda a: {**a, "page_table": a["page_table"][:1]}, ValueError,
                         r"page_table must have shape \(batch, pages_per_sequence\)"),
    "read-only": (None, lambda a: {**a, "k_cache": np.broadcast_to(a["k_cache"][:, :1], a["k_cache"].shape)},
                  ValueError, r"k_cache is read-only"),
    "num-splits": (None, lambda a: {**a, "num_splits": -1}, ValueError, r"num_splits must be >= 0"),
}


@pytest.mark.parametrize("bad", sorted(BAD_CALLS))
def test_bad_kvcache_arguments_name_the_argument_and_the_rule(rng, bad):
    page_size, edit, error, pattern = BAD_CALLS[bad]
    with pytest.raises(error, match=pattern):
        flash_attention_with_kvcache(**edit(_good(rng, page_size)))


@pytest.mark.parametrize("num_splits", [2, 3, 7])
@pytest.mark.parametrize("case", sorted(CASES))
def test_split_keys_merged_by_their_lse_are_the_unsplit_call(rng, case, num_splits):
    """Split-KV's merge (flash-decoding): each chunk's partial softmax, merged by lse (the sink
    counted once), equals the call on all keys; a chunk that no query sees changes nothing."""
    cached, new, Sq, page_size, H_kv = LAYOUTS["verify-dense"]
    inputs = cache_inputs(rng, FLOAT64, cached, new, Sq, page_size, H_kv)
    q, k_cache, v_cache, k_new, v_new, seqlens, table = inputs
    kw = case_keywords(rng, case, len(cached), q.shape[2])
    whole = flash_attention_with_kvcache(q, k_cache.copy(), v_cache.copy(), k=k_new, v=v_new, cache_seqlens=seqlens,
                                         return_lse=True, **kw)
    split = flash_attention_with_kvcache(q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=seqlens,
                                         num_splits=num_splits, return_lse=True, **kw)
    for name, a, b in zip(("out", "lse"), whole, split):
        assert np.array_equal(np.isneginf(a), np.isneginf(b)), name
        fin = np.isfinite(a)
        assert np.allclose(a[fin], b[fin], atol=1e-12), f"{name}: {np.abs(a[fin] - b[fin]).max()}"


# ---- the GPU path's split-KV rule (pure host arithmetic: tested without a GPU) ----

@pytest.mark.parametrize("blocks,key_tiles,requested,want", [
    (256, 128, 0, 1),     # B 32 x 8 kv heads on 264 slots (132 SMs x 2): a full wave unsplit
    (8, 2048, 0, 33),     # B 1 x 8 kv heads: 33 splits fill all 264 slots in one wave
    (32, 2048, 0, 8),     # 256 of 264 slots in one wave
    (100, 2048, 0, 13),   # no one-wave split fills 90%: the fewest whose waves fill 97%
    (8, 5, 0, 5),         # never more splits than key tiles
    (1, 4096, 0, 128),    # at most MAX_SPLITS
    (8, 2048, 3, 3),      # num_splits as asked
    (8, 2, 3, 2),         # ...but at most one per key tile
])
def test_split_kv_fills_the_gpus_slots(blocks, key_tiles, requested, want):
    _decode = pytest.importorskip("cupyflash._decode")
    assert _decode.choose_splits(blocks, key_tiles, 264, requested) == want


def test_the_workspace_holds_each_splits_lse_then_its_output():
    _decode = pytest.importorskip("cupyflash._decode")
    assert _decode.workspace_floats(1, 32, 1, 32, 128) == 0
    rows = 3 * 2 * 1 * 5
    assert _decode.workspace_floats(3, 2, 1, 5, 128) == 32 + rows * 128  # lse padded to 16 bytes (30 -> 32)
    assert _decode.takes_decode_kernel(BFLOAT16, (4, 1, 32, 128), 8, paged=False)          # 4 rows per kv head
    assert not _decode.takes_decode_kernel(BFLOAT16, (4, 128, 32, 128), 8, paged=False)    # 512: prefill kernels
    assert _decode.takes_decode_kernel(BFLOAT16, (4, 128, 32, 128), 8, paged=True)         # paged: always
    assert not _decode.takes_decode_kernel(FLOAT32, (4, 1, 32, 128), 8, paged=False)       # fp32: prefill kernels


def test_small_pages_take_the_cp_async_loads_on_hopper():
    """On sm_90 the decode kernel reads a dense cache and pages of 64 keys or more by TMA boxes; pages
    of fewer keys by cp.async copies (one box per page and 64 columns read 16-token pages at 0.85x
    of the dense cache, bench/NOTES.md session 12). Other GPUs have no TMA."""
    from cupyflash import _config
    assert _config.decode_config(128, 4, 2, 90).loads == "tma"
    assert _config.decode_config(128, 4, 2, 90, page_size=256).loads == "tma"
    assert _config.decode_config(128, 4, 2, 90, page_size=16).loads == "cp.async"
    assert _config.decode_config(128, 4, 2, 80).loads == "cp.async"
