"""The attention variants (issue 14) on the NumPy backend, the executable spec of the kernels:
grouped-query and multi-query attention, sliding windows, softcapping, ALiBi and sinks, alone
and mixed. As specifications:

- a brute-force loop over every (batch, head, query) that spells the formulas out agrees with
  the float64 reference (reference.py);
- the blocked NumPy backend agrees with the reference within the 2x-naive bound (1e-10 in
  float64), on odd lengths, seqlen_q != seqlen_k both ways, GQA ratios 1/2/4/8 and MQA;
- a row that sees no key gets out = 0 and lse = -inf (the sink's logit with sinks);
- every gradient, dsinks included, matches central finite differences in float64;
- a window never reads the keys or queries outside its band (they are NaN, and nothing changes);
- every wrong argument is a TypeError or ValueError naming it (tests/test_gpu_variants.py holds
  the kernels to the same cases).
"""
import math

import numpy as np
import pytest

from cupyflash import _numpy_backend, flash_attention, flash_attention_backward, reference
from cupyflash._dtypes import BFLOAT16, FLOAT32, FLOAT64
from cupyflash._variants import Variants

from conftest import error_report
from test_numpy_backend import assert_within_naive_bound

# name -> the variant keywords (slopes and sinks drawn per test: "alibi" and "sinks" are flags)
CASES = {
    "gqa": {},
    "window": dict(window_size=(37, 11)),
    "window-causal": dict(window_size=(50, -1), causal=True),
    "left-only": dict(window_size=(20, -1)),
    "softcap": dict(softcap=2.5),
    "alibi": dict(alibi=True),
    "alibi-per-batch": dict(alibi="batch"),
    "sinks": dict(sinks=True),
    "mixed": dict(window_size=(40, 5), softcap=4.0, alibi=True, sinks=True),
    "mixed-causal": dict(window_size=(64, 0), causal=True, softcap=3.0, alibi="batch", sinks=True),
}


def _inputs(rng, dtype, B, Sq, Sk, H, H_kv, D):
    q = rng.standard_normal((B, Sq, H, D)).astype(dtype)
    k, v = (rng.standard_normal((B, Sk, H_kv, D)).astype(dtype) for _ in range(2))
    dout = rng.standard_normal((B, Sq, H, D)).astype(dtype)
    return q, k, v, dout


def _keywords(rng, case, B, H, dtype=FLOAT32):
    kw = dict(CASES[case])
    alibi, sinks = kw.pop("alibi", None), kw.pop("sinks", None)
    if alibi:
        shape = (B, H) if alibi == "batch" else (H,)
        kw["alibi_slopes"] = (2.0 ** -rng.uniform(1, 8, shape)).astype(dtype)  # ALiBi's geometric slopes
    if sinks:
        kw["sinks"] = rng.uniform(-1, 3, (H,)).astype(dtype)
    return kw


def _brute_force(q, k, v, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, sinks=None):
    """The formulas of cupyflash._variants, one (batch, head, query) at a time, in float64."""
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    B, Sq, H, D = q.shape
    Sk, H_kv = k.shape[1], k.shape[2]
    left, right = window_size
    right = 0 if causal else right
    out, lse = np.zeros(q.shape), np.full((B, H, Sq), -np.inf)
    for b in range(B):
        for h in range(H):
            hk = h // (H // H_kv)
            for i in range(Sq):
                logits, values = [], []
                for j in range(Sk):
                    d = j - (i + Sk - Sq)
                    if (left >= 0 and d < -left) or (right >= 0 and d > right):
                        continue
                    s = q[b, i, h] @ k[b, j, hk] / math.sqrt(D)
                    if softcap > 0:
                        s = softcap * math.tanh(s / softcap)
                    if alibi_slopes is not None:
                        s -= float(np.asarray(alibi_slopes).reshape(-1, H)[b % np.asarray(alibi_slopes).reshape(-1, H).shape[0], h]) * abs(d)
                    logits.append(s)
                    values.append(v[b, j, hk])
                all_logits = logits + ([float(sinks[h])] if sinks is not None else [])
                if not all_logits:
                    continue
                m = max(all_logits)
                denom = sum(math.exp(x - m) for x in all_logits)
                lse[b, h, i] = m + math.log(denom)
                for x, val in zip(logits, values):
                    out[b, i, h] += math.exp(x - lse[b, h, i]) * val
    return out, lse


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_reference_spells_out_the_formulas(rng, case):
    B, Sq, Sk, H, H_kv, D = 2, 6, 9, 4, 2, 8
    q, k, v, _ = _inputs(rng, FLOAT64, B, Sq, Sk, H, H_kv, D)
    kw = _keywords(rng, case, B, H, FLOAT64)
    want_o, want_l = _brute_force(q, k, v, **kw)
    got_o, got_l = reference.attention(q, k, v, **kw)
    assert np.allclose(got_o, want_o, atol=1e-12), f"out: {error_report(got_o, want_o)}"
    assert np.array_equal(np.isneginf(got_l), np.isneginf(want_l))
    assert np.allclose(got_l[np.isfinite(want_l)], want_l[np.isfinite(want_l)], atol=1e-12)


SHAPES = [(2, 113, 203, 8, 2, 32), (1, 203, 113, 8, 8, 16), (2, 1, 70, 8, 1, 16), (1, 130, 130, 8, 4, 32),
          (1, 70, 1, 4, 4, 16), (1, 64, 150, 8, 8, 16)]
SHAPE_IDS = ["Sq113-Sk203-gqa4", "Sq203-Sk113-mha", "Sq1-Sk70-mqa", "Sq130-Sk130-gqa2", "Sq70-Sk1", "Sq64-Sk150-mha"]


@pytest.mark.parametrize("dtype", [FLOAT64, FLOAT32, BFLOAT16], ids=["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_numpy_backend_matches_the_reference(rng, case, shape, dtype):
    B, Sq, Sk, H, H_kv, D = shape
    q, k, v, dout = _inputs(rng, dtype, B, Sq, Sk, H, H_kv, D)
    kw = _keywords(rng, case, B, H, FLOAT64 if dtype == FLOAT64 else FLOAT32)
    o, l = flash_attention(q, k, v, return_lse=True, **kw)
    ref_o, ref_l = reference.attention(q, k, v, upcast=True, **kw)
    naive_o, naive_l = reference.attention(q, k, v, upcast=False, **kw)
    tag = f"{case} {shape}"
    assert_within_naive_bound(f"out [{tag}]", o, ref_o, naive_o, dtype)
    assert_within_naive_bound(f"lse [{tag}]", l, ref_l, naive_l, FLOAT64 if dtype == FLOAT64 else FLOAT32)
    grads = flash_attention_backward(dout, q, k, v, o, l, **kw)
    ref_g = reference.attention_backward(dout, q, k, v, upcast=True, **kw)
    naive_g = reference.attention_backward(dout, q, k, v, upcast=False, **kw)
    assert len(grads) == (4 if "sinks" in kw else 3)
    for name, got, want, nv in zip(("dq", "dk", "dv", "dsinks"), grads, ref_g, naive_g):
        assert got.shape == want.shape, (name, got.shape, want.shape)
        # dsinks = -sum_i P_sink * rowsum(dO * O) reads the forward output as stored, rounded to
        # the input dtype: its slack is that dtype's rounding, though dsinks itself is float32
        assert_within_naive_bound(f"{name} [{tag}]", got, want, nv, dtype)


@pytest.mark.parametrize("ratio", [1, 2, 4, 8, 16])
def test_gqa_is_attention_with_each_kv_head_repeated_over_its_group(rng, ratio):
    q, k, v, dout = _inputs(rng, FLOAT64, 2, 33, 47, 16, 16 // ratio, 16)
    o, l = flash_attention(q, k, v, causal=True, return_lse=True)
    k_rep, v_rep = (np.repeat(x, ratio, axis=2) for x in (k, v))
    o_rep, l_rep = flash_attention(q, k_rep, v_rep, causal=True, return_lse=True)
    assert np.allclose(o, o_rep, atol=1e-12) and np.allclose(l, l_rep, atol=1e-12)
    dq, dk, dv = flash_attention_backward(dout, q, k, v, o, l, causal=True)
    dq_r, dk_r, dv_r = flash_attention_backward(dout, q, k_rep, v_rep, o_rep, l_rep, causal=True)
    group_sum = lambda g: g.reshape(*g.shape[:2], 16 // ratio, ratio, g.shape[3]).sum(axis=3)  # noqa: E731
    assert np.allclose(dq, dq_r, atol=1e-12)
    assert np.allclose(dk, group_sum(dk_r), atol=1e-12) and np.allclose(dv, group_sum(dv_r), atol=1e-12)


def test_rows_that_see_nothing_get_zero_and_minus_inf_or_the_sink(rng):
    q, k, v, dout = _inputs(rng, FLOAT64, 1, 12, 4, 2, 1, 8)  # causal, Sq > Sk: the first 8 rows see nothing
    o, l = flash_attention(q, k, v, causal=True, return_lse=True)
    assert np.all(o[:, :8] == 0) and np.all(np.isneginf(l[:, :, :8]))
    sinks = np.array([0.5, -1.0])
    o, l = flash_attention(q, k, v, causal=True, sinks=sinks, return_lse=True)
    assert np.all(o[:, :8] == 0) and np.allclose(l[0, :, :8], sinks[:, None])
    dq, dk, dv, ds = flash_attention_backward(dout, q, k, v, o, l, causal=True, sinks=sinks)
    assert np.all(dq[:, :8] == 0) and np.all(np.isfinite(ds))
    # a window that no key falls in: (0, 0) with Sk < Sq shifts every diagonal below row 8
    o, l = flash_attention(q, k, v, window_size=(0, 0), return_lse=True)
    assert np.all(o[:, :8] == 0) and np.allclose(o[:, 8:], np.repeat(v[:, :, :1], 2, axis=2)[:, :4].transpose(0, 1, 2, 3))


# ---- a window never reads what lies outside its band ----

#: no kernel tile (and no NumPy block) spans more keys or queries than this
TILE_MARGIN = 256
#: (Sq, Sk, window): "keys" puts every query's band at the end of a long key sequence (the key
#: tiles before it are skipped, forward and backward); "queries" leaves the first queries with
#: no key in their band (their query tiles are skipped)
BAND_CASES = {"keys": (64, 2048, (100, 0)), "queries": (2048, 64, (30, 10))}


def band_poisoned_inputs(rng, dtype, side, H=4, H_kv=2, D=64):
    """Inputs whose rows that no tile in the band's reach may read are NaN: the keys (k, v) more
    than TILE_MARGIN before the first visible key, or the queries (q) more than TILE_MARGIN before
    the first one that sees a key. A kernel that loaded them would spread NaN through its
    products (0 * NaN). Returns (q, k, v, dout, keywords, clean inputs for the reference, the
    poisoned rows as ("q" or "k", slice))."""
    Sq, Sk, window = BAND_CASES[side]
    q, k, v, dout = _inputs(rng, dtype, 1, Sq, Sk, H, H_kv, D)
    kw = dict(window_size=window, softcap=5.0, alibi_slopes=(2.0 ** -rng.uniform(1, 8, (H,))).astype(np.float32))
    band = Variants.of(False, window)
    if side == "keys":
        rows = slice(0, band.key_range(0, Sq, Sq, Sk)[0] - TILE_MARGIN)
        poisoned = (k, v)
    else:
        rows = slice(0, band.query_range(0, Sk, Sq, Sk)[0] - TILE_MARGIN)
        poisoned = (q,)
    assert rows.stop > TILE_MARGIN, "the case must leave whole tiles outside the band"
    clean = tuple(x.copy() for x in (q, k, v))
    for x in poisoned:
        x[:, rows] = np.nan
    return q, k, v, dout, kw, clean, ("k" if side == "keys" else "q", rows)


def check_band_poisoned(side, got_fwd, got_bwd, clean, dout, kw, poisoned, dtype, within):
    """out, lse, dq, dk, dv computed on the poisoned inputs equal the reference on the clean ones
    (``within``: the bound check of the caller's backend), and the poisoned rows' gradients are 0."""
    q, k, v = clean
    ref_o, ref_l = reference.attention(q, k, v, upcast=True, **kw)
    naive_o, naive_l = reference.attention(q, k, v, upcast=False, **kw)
    within(f"out [{side}]", got_fwd[0], ref_o, naive_o, dtype)
    within(f"lse [{side}]", got_fwd[1], ref_l, naive_l, FLOAT64 if dtype == FLOAT64 else FLOAT32)
    ref = reference.attention_backward(dout, q, k, v, upcast=True, **kw)
    naive = reference.attention_backward(dout, q, k, v, upcast=False, **kw)
    for name, g, w, n in zip(("dq", "dk", "dv"), got_bwd, ref, naive):
        within(f"{name} [{side}]", g, w, n, dtype)
    which, rows = poisoned
    for name, g in zip(("dq", "dk", "dv"), got_bwd):
        if name in {"q": ("dq",), "k": ("dk", "dv")}[which]:
            assert np.all(np.asarray(g, np.float64)[:, rows] == 0), f"{name} of the rows outside the band is not 0"


@pytest.mark.parametrize("side", sorted(BAND_CASES))
def test_a_window_never_reads_what_lies_outside_its_band(rng, side):
    q, k, v, dout, kw, clean, poisoned = band_poisoned_inputs(rng, FLOAT32, side)
    o, l = flash_attention(q, k, v, return_lse=True, **kw)
    grads = flash_attention_backward(dout, q, k, v, o, l, **kw)
    check_band_poisoned(side, (o, l), grads, clean, dout, kw, poisoned, FLOAT32, assert_within_naive_bound)


def _finite_difference(f, x, eps=1e-6):
    g = np.zeros_like(x)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for n in range(flat.size):
        keep = flat[n]
        flat[n] = keep + eps
        up = f()
        flat[n] = keep - eps
        down = f()
        flat[n] = keep
        gflat[n] = (up - down) / (2 * eps)
    return g


@pytest.mark.parametrize("case", ["mixed", "mixed-causal", "softcap", "sinks"])
def test_every_gradient_matches_finite_differences(rng, case):
    B, Sq, Sk, H, H_kv, D = 1, 5, 7, 4, 2, 8
    q, k, v, dout = _inputs(rng, FLOAT64, B, Sq, Sk, H, H_kv, D)
    kw = _keywords(rng, case, B, H, FLOAT64)
    loss = lambda: float(np.sum(flash_attention(q, k, v, **kw) * dout))  # noqa: E731
    o, l = flash_attention(q, k, v, return_lse=True, **kw)
    grads = flash_attention_backward(dout, q, k, v, o, l, **kw)
    wrt = {"dq": q, "dk": k, "dv": v}
    if "sinks" in kw:
        wrt["dsinks"] = kw["sinks"]
    for (name, x), got in zip(wrt.items(), grads):
        want = _finite_difference(loss, x)
        assert np.allclose(got, want, atol=1e-6, rtol=1e-5), f"{name} [{case}]: {error_report(got, want)}"


def test_softcap_and_alibi_reduce_to_plain_attention_at_their_limits(rng):
    q, k, v, _ = _inputs(rng, FLOAT64, 1, 20, 30, 2, 2, 16)
    plain = flash_attention(q, k, v)
    assert np.allclose(flash_attention(q, k, v, softcap=1e6), plain, atol=1e-9)
    assert np.allclose(flash_attention(q, k, v, alibi_slopes=np.zeros(2)), plain, atol=1e-12)
    assert np.allclose(flash_attention(q, k, v, window_size=(-1, -1)), plain, atol=0)


@pytest.mark.parametrize("kw,error,pattern", [
    (dict(window_size=(3,)), TypeError, r"^window_size must be a pair \(left, right\) of ints"),
    (dict(window_size=(2.0, 1)), TypeError, r"^window_size\[0\] must be an int, got float"),
    (dict(window_size=(True, 1)), TypeError, r"^window_size\[0\] must be an int, got bool"),
    (dict(window_size=(4, -2)), ValueError, r"^window_size\[1\] must be >= -1 \(-1: unbounded\), got -2"),
    (dict(softcap=-1.0), ValueError, r"^softcap must be finite and >= 0"),
    (dict(softcap=float("inf")), ValueError, r"^softcap must be finite and >= 0"),
    (dict(softcap="1"), TypeError, r"^softcap must be a real number, got str"),
    (dict(alibi_slopes=np.ones(3, np.float32)), ValueError, r"^alibi_slopes must have shape \(4,\) or \(2, 4\)"),
    (dict(alibi_slopes=np.ones(4, np.float16)), ValueError, r"^alibi_slopes must have dtype float32, got float16"),
    (dict(alibi_slopes=[1.0] * 4), TypeError, r"^alibi_slopes must be a numpy or cupy array"),
    (dict(sinks=np.ones((2, 4), np.float32)), ValueError, r"^sinks must have shape \(4,\) \(one sink logit per query head\)"),
    (dict(sinks=np.ones(4, np.int32)), ValueError, r"^sinks must have dtype float32"),
])
def test_bad_variant_arguments_name_the_argument_and_the_rule(rng, kw, error, pattern):
    q, k, v, dout = _inputs(rng, FLOAT32, 2, 8, 8, 4, 2, 16)
    with pytest.raises(error, match=pattern):
        flash_attention(q, k, v, **kw)
    o, l = flash_attention(q, k, v, return_lse=True)
    with pytest.raises(error, match=pattern):
        flash_attention_backward(dout, q, k, v, o, l, **kw)


def test_heads_that_do_not_group_are_a_value_error(rng):
    q, k, v, _ = _inputs(rng, FLOAT32, 1, 8, 8, 6, 4, 16)
    with pytest.raises(ValueError, match=r"^q has 6 heads but k and v have 4: the query heads must be a multiple"):
        flash_attention(q, k, v)


def test_the_backend_is_the_one_variant_policy():
    """Variants.of folds causal into the window's right side, as flash-attn does."""
    assert Variants.of(True, (30, 7)).window == (30, 0)
    assert Variants.of(False).dense and not Variants.of(True).dense
    assert _numpy_backend.BLOCK_N > 0


def test_the_tape_carries_dsinks_to_a_sinks_tensor(rng):
    from cupyflash import autodiff as ad
    q, k, v, dout = _inputs(rng, FLOAT64, 1, 9, 11, 4, 2, 8)
    kw = dict(window_size=(6, 2), softcap=3.0, alibi_slopes=(2.0 ** -rng.uniform(1, 8, (4,))))
    qt, kt, vt = (ad.Tensor(x, requires_grad=True) for x in (q, k, v))
    st = ad.Tensor(rng.uniform(-1, 2, (4,)), requires_grad=True)
    out = ad.flash_attention(qt, kt, vt, sinks=st, **kw)
    ad.sum(out * ad.Tensor(dout)).backward()
    want = reference.attention_backward(dout, q, k, v, sinks=st.data, **kw)
    for name, t, w in zip(("dq", "dk", "dv", "dsinks"), (qt, kt, vt, st), want):
        assert np.allclose(t.grad, w, atol=1e-10), f"{name}: {error_report(t.grad, w)}"


def test_each_variant_is_one_compile_time_switch_of_the_kernels():
    """The kernels' VARIANT bits (variant.cuh): the mask kind and one bit per score variant, so each
    combination is one instantiation; the causal flag and a (-1, 0) window are the same kernel."""
    from cupyflash import _config
    bits = _config.variant_bits
    assert bits(Variants.of(False)) == _config.MASK_NONE
    assert bits(Variants.of(True)) == bits(Variants.of(False, (-1, 0))) == _config.MASK_CAUSAL
    assert bits(Variants.of(True, (64, -1))) == bits(Variants.of(False, (3, 5))) == _config.MASK_WINDOW
    assert bits(Variants.of(False, softcap=2.0)) == _config.VARIANT_SOFTCAP
    assert bits(Variants.of(False, alibi_slopes=np.ones(4))) == _config.VARIANT_ALIBI
    assert bits(Variants.of(False, sinks=np.ones(4))) == _config.VARIANT_SINKS
    every = Variants.of(False, (8, 0), 30.0, np.ones(4), np.ones(4))
    assert bits(every) == 30 and _config.variant_text(30) == "window+softcap+alibi+sinks"
    ks = _config.kernel_set("bfloat16", 128, False, 90, variant=bits(every))
    assert ks.causal and ks.fwd_name().endswith(", 30>") and ks.dsinks_name() in ks.name_expressions()
    assert _config.kernel_set("bfloat16", 128, True, 90).variant == _config.MASK_CAUSAL

