"""Packed sequences (issue 15, flash-attn's varlen) on the NumPy backend, the executable spec of
the kernels. As specifications:

- each packed sequence gets exactly what the float64 reference gives that sequence alone,
  forward and backward, within the 2x-naive bound: lengths 0, 1, odd and 4000+, seqlen_q !=
  seqlen_k per sequence both ways, GQA, causal and sliding windows (aligned bottom-right per
  sequence), softcap, per-sequence ALiBi slopes and sinks (dsinks summed over the sequences);
- sequences of equal length packed are the dense batched call;
- nothing is written outside the packed rows (NaN guard rows around every output stay NaN);
- every wrong argument is a TypeError or ValueError naming it, a bad offset naming its index
  (tests/test_gpu_varlen.py holds the kernels to the same cases).
"""
import numpy as np
import pytest

from cupyflash import (flash_attention, flash_attention_backward, flash_attention_varlen,
                       flash_attention_varlen_backward, reference)
from cupyflash._dtypes import BFLOAT16, FLOAT32, FLOAT64

from conftest import error_report
from test_numpy_backend import assert_within_naive_bound

#: (lengths of the query sequences, of the key sequences): empty sequences, one token, odd
#: lengths, seqlen_q < seqlen_k and > within one pack
LENGTHS = {
    "self": ([5, 0, 1, 67, 130], [5, 0, 1, 67, 130]),
    "cross": ([3, 40, 0, 129, 1], [17, 9, 6, 200, 0]),
}
#: name -> variant keywords ("alibi", "sinks": flags; slopes and sinks drawn per test)
CASES = {
    "plain": {},
    "causal": dict(causal=True),
    "gqa-window": dict(window_size=(20, 3), gqa=True),
    "causal-window-sinks": dict(causal=True, window_size=(33, -1), sinks=True),
    "softcap-alibi": dict(softcap=3.0, alibi="sequence"),
    "mixed": dict(causal=True, softcap=5.0, alibi=True, sinks=True, gqa=True),
}


def offsets(lengths) -> np.ndarray:
    """cu_seqlens: 0, then the running total of the lengths, as int32."""
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def packed_inputs(rng, dtype, lengths_q, lengths_k, H=4, H_kv=4, D=32):
    """q, dout (total_q, H, D); k, v (total_k, H_kv, D); the offsets of both."""
    cu_q, cu_k = offsets(lengths_q), offsets(lengths_k)
    q, dout = (rng.standard_normal((int(cu_q[-1]), H, D)).astype(dtype) for _ in range(2))
    k, v = (rng.standard_normal((int(cu_k[-1]), H_kv, D)).astype(dtype) for _ in range(2))
    return q, k, v, dout, cu_q, cu_k


def case_keywords(rng, case, batch, H):
    """(variant keywords, kv heads for H query heads) of a case."""
    kw = dict(CASES[case])
    H_kv = H // 2 if kw.pop("gqa", False) else H
    alibi, sinks = kw.pop("alibi", None), kw.pop("sinks", None)
    if alibi:
        shape = (batch, H) if alibi == "sequence" else (H,)
        kw["alibi_slopes"] = (2.0 ** -rng.uniform(1, 8, shape)).astype(FLOAT32)
    if sinks:
        kw["sinks"] = rng.uniform(-1, 3, (H,)).astype(FLOAT32)
    return kw, H_kv


def _sequence_keywords(kw, b):
    slopes = kw.get("alibi_slopes")
    return kw if slopes is None or slopes.ndim == 1 else {**kw, "alibi_slopes": slopes[b]}


def reference_by_sequence(q, k, v, dout, cu_q, cu_k, kw, upcast):
    """The reference (reference.py) of each sequence alone, packed: out, lse (H, total_q), dq, dk,
    dv and, with sinks, dsinks summed over the sequences. A sequence with no keys: out 0, lse
    -inf (its sink logit with sinks), zero gradients; no queries: zero dk, dv."""
    H = q.shape[1]
    like = (lambda x: np.zeros(x.shape, np.float64)) if upcast else (lambda x: np.zeros(x.shape, x.dtype))
    out, dq, dk, dv = like(q), like(q), like(k), like(v)
    lse = np.zeros((H, q.shape[0]), np.float64 if upcast else np.float32)
    dsinks = np.zeros(H)
    for b in range(len(cu_q) - 1):
        rq, rk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        kw_b = _sequence_keywords(kw, b)
        if rq.stop == rq.start:
            continue
        if rk.stop == rk.start:
            lse[:, rq] = -np.inf if "sinks" not in kw else np.asarray(kw["sinks"], np.float64)[:, None]
            continue
        o, l = reference.attention(q[None, rq], k[None, rk], v[None, rk], upcast=upcast, **kw_b)
        g = reference.attention_backward(dout[None, rq], q[None, rq], k[None, rk], v[None, rk], upcast=upcast, **kw_b)
        out[rq], lse[:, rq], dq[rq], dk[rk], dv[rk] = o[0], l[0], g[0][0], g[1][0], g[2][0]
        if "sinks" in kw:
            dsinks += g[3]
    grads = (dq, dk, dv) + ((dsinks,) if "sinks" in kw else ())
    return out, lse, grads


def _check(tag, got_out, got_lse, got_grads, q, k, v, dout, cu_q, cu_k, kw, within):
    """Everything a packed call returned against the per-sequence reference, with ``within(name,
    got, want, naive, dtype, reference lse)`` (the NumPy bound here, the GPU bound in test_gpu_varlen)."""
    dtype = q.dtype
    ref_o, ref_l, ref_g = reference_by_sequence(q, k, v, dout, cu_q, cu_k, kw, upcast=True)
    naive_o, naive_l, naive_g = reference_by_sequence(q, k, v, dout, cu_q, cu_k, kw, upcast=False)
    stat_dtype = FLOAT64 if dtype == FLOAT64 else FLOAT32
    within(f"out [{tag}]", got_out, ref_o, naive_o, dtype, ref_l)
    within(f"lse [{tag}]", got_lse, ref_l, naive_l, stat_dtype, ref_l)
    assert len(got_grads) == len(ref_g)
    for name, got, want, nv in zip(("dq", "dk", "dv", "dsinks"), got_grads, ref_g, naive_g):
        within(f"{name} [{tag}]", got, want, nv, dtype, ref_l)


def _numpy_within(name, got, want, naive, dtype, ref_lse):
    assert_within_naive_bound(name, got, want, naive, dtype)


@pytest.mark.parametrize("dtype", [FLOAT64, FLOAT32, BFLOAT16], ids=["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("lengths", sorted(LENGTHS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_each_packed_sequence_is_that_sequence_alone(rng, case, lengths, dtype):
    lq, lk = LENGTHS[lengths]
    kw, H_kv = case_keywords(rng, case, len(lq), 4)
    q, k, v, dout, cu_q, cu_k = packed_inputs(rng, dtype, lq, lk, 4, H_kv)
    o, l = flash_attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **kw)
    grads = flash_attention_varlen_backward(dout, q, k, v, o, l, cu_q, cu_k, **kw)
    _check(f"{case} {lengths}", o, l, grads, q, k, v, dout, cu_q, cu_k, kw, _numpy_within)


def test_a_long_sequence_beside_empty_and_single_token_ones(rng):
    lengths = [4100, 0, 1, 37]
    kw = dict(causal=True, window_size=(1500, -1))
    q, k, v, dout, cu_q, cu_k = packed_inputs(rng, FLOAT32, lengths, lengths, H=2, H_kv=1, D=16)
    o, l = flash_attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **kw)
    grads = flash_attention_varlen_backward(dout, q, k, v, o, l, cu_q, cu_k, **kw)
    _check("4100-0-1-37", o, l, grads, q, k, v, dout, cu_q, cu_k, kw, _numpy_within)


def test_sequences_of_equal_length_packed_are_the_dense_batch(rng):
    B, S, H, D = 3, 45, 4, 16
    q, k, v, dout, cu, _ = packed_inputs(rng, FLOAT64, [S] * B, [S] * B, H, 2, D)
    kw = dict(causal=True, softcap=4.0, sinks=rng.uniform(-1, 1, H))
    o, l = flash_attention_varlen(q, k, v, cu, cu, return_lse=True, **kw)
    dense = [x.reshape(B, S, *x.shape[1:]) for x in (q, k, v, dout)]
    o_d, l_d = flash_attention(*dense[:3], return_lse=True, **kw)
    assert np.allclose(o, o_d.reshape(o.shape), atol=1e-13)
    assert np.allclose(l, l_d.transpose(1, 0, 2).reshape(H, B * S), atol=1e-13)
    g = flash_attention_varlen_backward(dout, q, k, v, o, l, cu, cu, **kw)
    g_d = flash_attention_backward(dense[3], *dense[:3], o_d, l_d, **kw)
    for a, b in zip(g, g_d):
        assert np.allclose(a, b.reshape(a.shape), atol=1e-12)


GUARD = 3  # NaN rows on each side of every output


def guarded(shape, dtype, xp=np):
    """(a NaN buffer with GUARD rows before and after, the view of ``shape`` between them)."""
    full = xp.full((shape[0] + 2 * GUARD, *shape[1:]), np.nan, dtype)
    return full, full[GUARD:GUARD + shape[0]]


def guarded_lse(H, total, xp=np):
    """lse must be C-contiguous: the guards are flat NaN runs around its H * total entries."""
    full = xp.full((H * total + 2 * GUARD,), np.nan, np.float32)
    return full, full[GUARD:GUARD + H * total].reshape(H, total)


def guards_intact(full, xp=np):
    return bool(xp.isnan(full[:GUARD]).all()) and bool(xp.isnan(full[-GUARD:]).all())


def test_nothing_is_written_outside_the_packed_rows(rng):
    lengths = [7, 0, 30]
    q, k, v, dout, cu_q, cu_k = packed_inputs(rng, FLOAT32, lengths, [9, 4, 0], H=2, H_kv=1, D=8)
    kw = dict(causal=True, sinks=np.array([0.3, -0.2], np.float32))
    out_full, out = guarded(q.shape, q.dtype)
    lse_full, lse = guarded_lse(2, q.shape[0])
    flash_attention_varlen(q, k, v, cu_q, cu_k, out=out, lse=lse, **kw)
    grads = [guarded(x.shape, x.dtype) for x in (q, k, v)]
    flash_attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, dq=grads[0][1], dk=grads[1][1],
                                    dv=grads[2][1], **kw)
    for name, full in (("out", out_full), ("lse", lse_full), ("dq", grads[0][0]), ("dk", grads[1][0]),
                       ("dv", grads[2][0])):
        assert guards_intact(full), f"{name}: a guard row was written"
        assert not np.isnan(full[GUARD:-GUARD]).any(), f"{name}: a packed row was not written"


# ---- errors ----

def _good(rng):
    q, k, v, dout, cu_q, cu_k = packed_inputs(rng, FLOAT32, [3, 5], [4, 2], H=2, H_kv=1, D=8)
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


BAD_CALLS = {
    "q-4d": (lambda a: {**a, "q": a["q"][None]}, ValueError, r"q must have 3 dimensions \(total_q, heads, head_dim\)"),
    "k-v-rows": (lambda a: {**a, "v": a["v"][:-1]}, ValueError, r"k and v must have the same number of rows"),
    "cu-dtype": (lambda a: {**a, "cu_seqlens_q": a["cu_seqlens_q"].astype(np.int64)}, ValueError,
                 r"cu_seqlens_q must have dtype int32"),
    "cu-2d": (lambda a: {**a, "cu_seqlens_k": a["cu_seqlens_k"][None]}, ValueError, r"cu_seqlens_k must be 1-D"),
    "cu-length": (lambda a: {**a, "cu_seqlens_k": np.array([0, 6], np.int32)}, ValueError,
                  r"cu_seqlens_q and cu_seqlens_k must both have batch \+ 1 entries"),
    "cu-start": (lambda a: {**a, "cu_seqlens_q": np.array([1, 3, 8], np.int32)}, ValueError, r"cu_seqlens_q\[0\] must be 0"),
    "cu-decreasing": (lambda a: {**a, "cu_seqlens_k": np.array([0, 5, 4, 6], np.int32),
                                 "cu_seqlens_q": np.array([0, 3, 3, 8], np.int32)}, ValueError,
                      r"cu_seqlens_k\[2\] = 4 is less than cu_seqlens_k\[1\] = 5"),
    "cu-end": (lambda a: {**a, "cu_seqlens_q": np.array([0, 3, 7], np.int32)}, ValueError,
               r"cu_seqlens_q\[2\] = 7 must equal total_q = 8"),
    "cu-not-array": (lambda a: {**a, "cu_seqlens_q": [0, 3, 8]}, TypeError, r"cu_seqlens_q must be a numpy or cupy array"),
    "max-too-small": (lambda a: {**a, "max_seqlen_q": 4}, ValueError, r"max_seqlen_q = 4 is less than the longest"),
    "max-negative": (lambda a: {**a, "max_seqlen_k": -1}, ValueError, r"max_seqlen_k must be >= 0"),
    "max-float": (lambda a: {**a, "max_seqlen_k": 4.0}, TypeError, r"max_seqlen_k must be an int"),
    "alibi-batch": (lambda a: {**a, "alibi_slopes": np.ones((3, 2), np.float32)}, ValueError,
                    r"alibi_slopes must have shape \(2,\) or \(2, 2\)"),
}


@pytest.mark.parametrize("bad", sorted(BAD_CALLS))
def test_bad_packed_arguments_name_the_argument_and_the_rule(rng, bad):
    edit, error, pattern = BAD_CALLS[bad]
    with pytest.raises(error, match=pattern):
        flash_attention_varlen(**edit(_good(rng)))


def test_the_backward_checks_the_packed_lse_layout(rng):
    a = _good(rng)
    o, l = flash_attention_varlen(**a, return_lse=True)
    args = (o, a["q"], a["k"], a["v"], o)
    with pytest.raises(ValueError, match=r"lse must have shape \(2, 8\)"):
        flash_attention_varlen_backward(*args, l[None], a["cu_seqlens_q"], a["cu_seqlens_k"])
    with pytest.raises(ValueError, match=r"dsinks receives the gradient of sinks"):
        flash_attention_varlen_backward(*args, l, a["cu_seqlens_q"], a["cu_seqlens_k"], dsinks=np.zeros(2, np.float32))


def test_the_tape_carries_packed_gradients_and_dsinks(rng):
    from cupyflash import autodiff as ad
    q, k, v, dout, cu_q, cu_k = packed_inputs(rng, FLOAT64, [4, 0, 9], [6, 3, 9], H=2, H_kv=1, D=8)
    sinks = rng.uniform(-1, 1, 2)
    kw = dict(causal=True, window_size=(5, -1))
    tq, tk, tv, ts = (ad.tensor(x, requires_grad=True) for x in (q, k, v, sinks))
    out = ad.flash_attention_varlen(tq, tk, tv, cu_q, cu_k, sinks=ts, **kw)
    ad.sum(ad.multiply(out, dout)).backward()
    o, l = flash_attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, sinks=sinks, **kw)
    want = flash_attention_varlen_backward(dout, q, k, v, o, l, cu_q, cu_k, sinks=sinks, **kw)
    assert np.array_equal(out.data, o)
    for t, w in zip((tq, tk, tv, ts), want):
        assert np.allclose(t.grad, w, atol=1e-12), error_report(t.grad, w)


def test_strided_packed_views_are_the_contiguous_call(rng):
    """Packed arrays viewed out of larger ones (a fused qkv projection's heads, every other head)
    give what their contiguous copies give."""
    lengths = [5, 0, 40]
    q, k, v, dout, cu, _ = packed_inputs(rng, FLOAT64, lengths, lengths, H=2, H_kv=2, D=16)
    qkv = np.concatenate([q, k, v], axis=1)          # (total, 3 H, D): q, k, v as head slices
    wide = np.repeat(dout, 2, axis=1)                 # (total, 2 H, D): dout as every other head
    views = (qkv[:, 0:2], qkv[:, 2:4], qkv[:, 4:6], wide[:, ::2])
    o, l = flash_attention_varlen(*views[:3], cu, cu, causal=True, return_lse=True)
    o_c, l_c = flash_attention_varlen(q, k, v, cu, cu, causal=True, return_lse=True)
    assert np.array_equal(o, o_c) and np.array_equal(l, l_c)
    g = flash_attention_varlen_backward(views[3], *views[:3], o, l, cu, cu, causal=True)
    g_c = flash_attention_varlen_backward(dout, q, k, v, o_c, l_c, cu, cu, causal=True)
    assert all(np.array_equal(a, b) for a, b in zip(g, g_c))
