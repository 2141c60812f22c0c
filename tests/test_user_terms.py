"""The user's masks and biases (issue 19) on the NumPy backend, the spec the kernels will be held to.
As specifications:

- mask_mod and bias_mod are C++ expressions of b, h, q_idx, kv_idx and aux arrays, evaluated with
  C++'s rules (precedence, int division truncating toward zero, % with the dividend's sign, ?:);
  what they mean is fixed here case by case against hand-computed values;
- a key is visible only where mask_mod and mask are true; bias_mod and bias add to the logit after
  the softcap and ALiBi; every variant and GQA compose with them;
- forward and backward match the float64 reference within flash-attn's 2x-naive bound, dbias
  included (summed over the axes where bias broadcasts);
- a bad expression or tensor is a ValueError or TypeError that names it, an expression's error
  shown with a caret under the place.
"""
import numpy as np
import pytest

import cupyflash
from cupyflash import _expr, reference
from cupyflash._dtypes import BFLOAT16, FLOAT32, FLOAT64

from conftest import error_report
from test_numpy_backend import assert_within_naive_bound

ENV = dict(b=np.int64(1), h=np.int64(3), q_idx=np.arange(-3, 4)[:, None], kv_idx=np.arange(5)[None, :],
           doc=np.array([0, 0, 1, 1, 2], np.int32), table=np.arange(12, dtype=np.float32).reshape(3, 4),
           flags=np.array([True, False, True, False, True]))

# expression -> the value it must have on ENV's grid, written out with Python's own arithmetic
VALUES = {
    "7 / 2": lambda e: 3,
    "-7 / 2": lambda e: -3,           # C++: toward zero (Python's // gives -4)
    "7 / -2": lambda e: -3,
    "-7 % 3": lambda e: -1,           # C++: the dividend's sign (Python's % gives 2)
    "7 % -3": lambda e: 1,
    "7.0 / 2": lambda e: 3.5,
    "1 + 2 * 3 - 4": lambda e: 3,
    "2 - 1 - 1": lambda e: 0,         # left-associative
    "1 < 2 == 1": lambda e: True,     # relational binds tighter than equality
    "1 || 0 && 0": lambda e: True,    # && binds tighter than ||
    "!0 + 1": lambda e: 2,            # unary before binary, a bool promoted to int
    "-q_idx": lambda e: -e["q_idx"],
    "q_idx > 0 ? 1.5 : -1": lambda e: np.where(e["q_idx"] > 0, 1.5, -1.0),
    "q_idx < 0 ? -1 : q_idx > 0 ? 1 : 0": lambda e: np.sign(e["q_idx"]),  # right-associative ?:
    "min(q_idx, kv_idx) + max(b, h)": lambda e: np.minimum(e["q_idx"], e["kv_idx"]) + 3,
    "abs(q_idx - kv_idx)": lambda e: np.abs(e["q_idx"] - e["kv_idx"]),
    "exp(0.0) + sqrt(4) + floor(2.5f) + tanh(0)": lambda e: 1.0 + 2.0 + 2.0 + 0.0,
    "doc[kv_idx] == doc[abs(q_idx)]": lambda e: e["doc"][e["kv_idx"]] == e["doc"][np.abs(e["q_idx"])],
    "table[h - 1][kv_idx % 4] * 0.5": lambda e: e["table"][2, e["kv_idx"] % 4] * 0.5,
    "flags[kv_idx] && q_idx >= kv_idx": lambda e: e["flags"][e["kv_idx"]] & (e["q_idx"] >= e["kv_idx"]),
    "true && !false": lambda e: True,
    "1e-3 * 2e3": lambda e: 2.0,
}


@pytest.mark.parametrize("text", sorted(VALUES))
def test_an_expression_means_what_it_means_in_cpp(text):
    got, _ = _expr.parse("bias_mod", text).evaluate(ENV)
    want = VALUES[text](ENV)
    assert np.array_equal(np.broadcast_to(got, np.broadcast_shapes(np.shape(got), np.shape(want))),
                          np.broadcast_to(want, np.broadcast_shapes(np.shape(got), np.shape(want)))), (text, got, want)


BAD_EXPRESSIONS = {
    "q_idx & kv_idx": (r"unexpected character '&' \(bitwise operators are not in the subset: && is\)", 6),
    "q_idx = kv_idx": (r"assignments are not in the subset", 6),
    "q_idx >": (r"unexpected 'end of the expression'", 7),
    "(q_idx": (r"expected '\)'", 6),
    "foo(q_idx)": (r"unknown function 'foo'", 0),
    "min(q_idx)": (r"min takes 2 argument\(s\), got 1", 0),
    "doc[q_idx + 10] > 0": (r"index 13 out of bounds for axis 0 of aux array 'doc' \(size 5\)", 4),
    "table[b] > 0": (r"aux array 'table' has 2 axes: index every one", 0),
    "1.5 % 2": (r"% takes ints", 4),
    "q_idx / 0": (r"integer / by zero", 6),
    "doc[0.5]": (r"an index of 'doc' must be an int, got a float", 4),
}


@pytest.mark.parametrize("text,reads", [("doc[q_idx] == doc[kv_idx]", 0), ("q_idx >= kv_idx", 0),
                                        ("table[h][min(max(kv_idx - q_idx + 64, 0), 128)]", 1),
                                        ("a[q_idx + kv_idx] + m[q_idx][kv_idx]", 2), ("t[m[q_idx][kv_idx]]", 2)])
def test_reads_at_an_address_per_score_are_counted(text, reads):
    """An aux read whose indices use both q_idx and kv_idx has an address of its own for nearly every
    score (the Hopper forward evaluates a tile's terms ahead only where such reads are few)."""
    from cupyflash import _sources, _variants
    assert _expr.element_reads(_expr.parse("mask_mod", text)) == reads
    arrays = {"doc": np.zeros(8, np.int32), "table": np.zeros((2, 129), np.float32), "a": np.zeros(8, np.int32),
              "m": np.zeros((8, 8), np.int32), "t": np.zeros(8, np.float32)}
    e = _expr.parse("mask_mod", text)
    user = _sources.user_terms(_variants.Variants(mask_mod=e, aux=tuple((n, arrays[n]) for n in e.names if n in arrays)))[0]
    assert (f"#define CUPYFLASH_ELEMENT_READS {reads}" in user) == (reads > 0)
    dense = _sources.user_terms(_variants.Variants(bias=np.zeros((1, 2, 8, 8), np.float16)))[0]
    by_key = _sources.user_terms(_variants.Variants(bias=np.zeros((1, 2, 1, 8), np.float16)))[0]
    assert "#define CUPYFLASH_ELEMENT_READS 1" in dense and "ELEMENT_READS" not in by_key


@pytest.mark.parametrize("text", sorted(BAD_EXPRESSIONS))
def test_a_bad_expression_is_a_value_error_with_a_caret_at_the_place(text):
    pattern, column = BAD_EXPRESSIONS[text]
    with pytest.raises(ValueError, match=pattern) as info:
        _expr.parse("mask_mod", text).evaluate(ENV)
    caret_line = str(info.value).splitlines()[-1]
    assert caret_line.index("^") - 4 == column, str(info.value)


def _inputs(rng, dtype, B=2, S=150, H=4, H_kv=2, D=32):
    q = rng.standard_normal((B, S, H, D)).astype(dtype)
    k, v = (rng.standard_normal((B, S, H_kv, D)).astype(dtype) for _ in range(2))
    dout = rng.standard_normal((B, S, H, D)).astype(dtype)
    return q, k, v, dout


def _documents(rng, B, S, n=5):
    """Document ids of packed sequences: random document lengths, per batch row."""
    ids = np.zeros((B, S), np.int32)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(1, S), n - 1, replace=False))
        ids[b] = np.searchsorted(cuts, np.arange(S), side="right")
    return ids


def _cases(rng, S, B, H):
    """name -> keywords of flash_attention: the FlexAttention recipes and the dense tensors."""
    docs = _documents(rng, B, S)
    return {
        "document-mask": dict(mask_mod="q_idx >= kv_idx && doc[b][q_idx] == doc[b][kv_idx]", aux={"doc": docs}),
        "prefix-lm": dict(mask_mod="kv_idx < prefix[b] || q_idx >= kv_idx",
                          aux={"prefix": rng.integers(1, S, B).astype(np.int32)}),
        "t5-buckets": dict(bias_mod="rel[h][min(abs(q_idx - kv_idx), 31)]", causal=True,
                           aux={"rel": rng.standard_normal((H, 32)).astype(np.float32)}),
        "alibi-as-bias-mod": dict(bias_mod="-slope[h] * abs(q_idx - kv_idx)",
                                  aux={"slope": (2.0 ** -np.arange(1, H + 1)).astype(np.float32)}),
        "bias-per-head": dict(bias=rng.standard_normal((1, H, S, S)).astype(np.float32), softcap=5.0),
        "bias-2d-mask-2d": dict(bias=rng.standard_normal((S, S)).astype(np.float32),
                                mask=rng.random((S, S)) > 0.2, window_size=(60, 10)),
        "bias-per-batch-key": dict(bias=rng.standard_normal((B, 1, 1, S)).astype(np.float32),
                                   sinks=rng.uniform(-1, 2, H).astype(np.float32)),
    }


CASE_NAMES = ["document-mask", "prefix-lm", "t5-buckets", "alibi-as-bias-mod", "bias-per-head", "bias-2d-mask-2d",
              "bias-per-batch-key"]


@pytest.mark.parametrize("dtype", [FLOAT64, FLOAT32, BFLOAT16], ids=["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("case", CASE_NAMES)
def test_forward_and_backward_match_the_reference(rng, case, dtype):
    q, k, v, dout = _inputs(rng, dtype)
    kw = _cases(rng, q.shape[1], q.shape[0], q.shape[2])[case]
    o, lse = cupyflash.flash_attention(q, k, v, return_lse=True, **kw)
    ref = reference.attention(q, k, v, **kw)
    naive = reference.attention(q, k, v, upcast=False, **kw)
    assert_within_naive_bound(f"out [{case}]", o, ref[0], naive[0], dtype)
    assert_within_naive_bound(f"lse [{case}]", lse, ref[1], naive[1], FLOAT64 if dtype == FLOAT64 else FLOAT32)
    with_dbias = "bias" in kw
    grads = cupyflash.flash_attention_backward(dout, q, k, v, o, lse, return_dbias=with_dbias, **kw)
    ref_g = reference.attention_backward(dout, q, k, v, return_dbias=with_dbias, **kw)
    naive_g = reference.attention_backward(dout, q, k, v, upcast=False, return_dbias=with_dbias, **kw)
    names = ["dq", "dk", "dv"] + (["dsinks"] if "sinks" in kw else []) + (["dbias"] if with_dbias else [])
    for name, got, want, nv in zip(names, grads, ref_g, naive_g):
        stored = dtype if name in ("dq", "dk", "dv") else (FLOAT64 if dtype == FLOAT64 else FLOAT32)
        assert_within_naive_bound(f"{name} [{case}]", got, want, nv, stored)
    if with_dbias:
        assert grads[-1].shape == np.shape(kw["bias"])


def test_the_causal_mask_as_a_mask_mod_is_causal(rng):
    q, k, v, _ = _inputs(rng, FLOAT64, S=130)
    a = cupyflash.flash_attention(q, k, v, causal=True)
    b = cupyflash.flash_attention(q, k, v, mask_mod="q_idx >= kv_idx")
    assert np.allclose(a, b, atol=1e-13, rtol=0)


def test_a_row_the_mask_empties_gets_zero_and_minus_infinity(rng):
    q, k, v, dout = _inputs(rng, FLOAT64, S=70)
    o, lse = cupyflash.flash_attention(q, k, v, return_lse=True, mask_mod="q_idx != 5 && q_idx != 69")
    assert np.all(o[:, [5, 69]] == 0) and np.all(np.isneginf(lse[:, :, [5, 69]]))
    dq, dk, dv = cupyflash.flash_attention_backward(dout, q, k, v, o, lse, mask_mod="q_idx != 5 && q_idx != 69")
    assert np.all(dq[:, [5, 69]] == 0) and np.all(np.isfinite(dk)) and np.all(np.isfinite(dv))


def test_dbias_lands_in_the_callers_buffer(rng):
    q, k, v, dout = _inputs(rng, FLOAT64, S=40)
    bias = rng.standard_normal((1, 1, 40, 40))
    o, lse = cupyflash.flash_attention(q, k, v, return_lse=True, bias=bias)
    buf = np.full(bias.shape, np.nan)
    *_, dbias = cupyflash.flash_attention_backward(dout, q, k, v, o, lse, bias=bias, return_dbias=True, dbias=buf)
    assert dbias is buf and np.all(np.isfinite(buf))
    want = reference.attention_backward(dout, q, k, v, bias=bias, return_dbias=True)[-1]
    assert np.allclose(buf, want, atol=1e-12, rtol=0)


def test_dbias_lands_in_a_strided_callers_buffer(rng):
    """A caller's buffer the backend cannot write in place (not C-contiguous) still receives dbias."""
    q, k, v, dout = _inputs(rng, FLOAT64, S=40)
    bias = rng.standard_normal((40, 40))
    o, lse = cupyflash.flash_attention(q, k, v, return_lse=True, bias=bias)
    buf = np.full((80, 40), np.nan)[::2]  # every other row: not C-contiguous
    *_, dbias = cupyflash.flash_attention_backward(dout, q, k, v, o, lse, bias=bias, return_dbias=True, dbias=buf)
    assert dbias is buf
    want = reference.attention_backward(dout, q, k, v, bias=bias, return_dbias=True)[-1]
    assert np.allclose(buf, want, atol=1e-12, rtol=0), error_report(buf, want)


def _good(rng):
    q, k, v, _ = _inputs(rng, FLOAT32, S=20)
    return dict(q=q, k=k, v=v)


BAD_CALLS = {
    "mask-mod-type": (dict(mask_mod=3), TypeError, r"mask_mod must be a string"),
    "mask-mod-float": (dict(mask_mod="q_idx * 0.5"), ValueError, r"mask_mod must be a bool \(or int\) expression"),
    "unknown-name": (dict(mask_mod="doc[q_idx] > 0"), ValueError,
                     r"mask_mod reads 'doc', which is neither an index \(b, h, q_idx, kv_idx\) nor an aux array"),
    "aux-type": (dict(mask_mod="q_idx > 0", aux=[1]), TypeError, r"aux must be a dict of name -> array"),
    "aux-name": (dict(mask_mod="q_idx > 0", aux={"q_idx": np.zeros(3, np.int32)}), ValueError,
                 r"aux name 'q_idx' must be an identifier other than b, h, q_idx, kv_idx"),
    "aux-dtype": (dict(bias_mod="x[q_idx]", aux={"x": np.zeros(20, np.complex64)}), ValueError,
                  r"aux\['x'\] must be an array of at least one axis of ints, floats or bools"),
    "bias-shape": (dict(bias=np.zeros((20, 21), np.float32)), ValueError,
                   r"bias must broadcast to \(batch, heads, seqlen_q, seqlen_k\) = \(2, 4, 20, 20\)"),
    "bias-dtype": (dict(bias=np.zeros((20, 20), np.int32)), ValueError, r"bias must be a float array"),
    "mask-dtype": (dict(mask=np.zeros((20, 20), np.float32)), ValueError, r"mask must have dtype bool"),
}


@pytest.mark.parametrize("bad", sorted(BAD_CALLS))
def test_bad_user_terms_name_the_argument_and_the_rule(rng, bad):
    kw, error, pattern = BAD_CALLS[bad]
    with pytest.raises(error, match=pattern):
        cupyflash.flash_attention(**_good(rng), **kw)


def test_dbias_needs_a_bias(rng):
    q, k, v, dout = _inputs(rng, FLOAT32, S=20)
    o, lse = cupyflash.flash_attention(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match=r"return_dbias=True needs the bias tensor"):
        cupyflash.flash_attention_backward(dout, q, k, v, o, lse, return_dbias=True)
    with pytest.raises(ValueError, match=r"dbias receives the gradient of bias: pass it with return_dbias=True"):
        cupyflash.flash_attention_backward(dout, q, k, v, o, lse, dbias=np.zeros((20, 20), np.float32))


def test_the_kernels_take_at_most_four_aux_arrays_of_at_most_four_axes(monkeypatch, rng):
    """The GPU's limits (UserParams), checked at the boundary whatever the device: here on the host
    by asking the check as if the arrays were on a GPU."""
    from cupyflash import _checks
    many = {f"a{i}": np.zeros(3, np.int32) for i in range(5)}
    with pytest.raises(ValueError, match=r"read 5 aux arrays \(a0, a1, a2, a3, a4\); the GPU kernels take at most 4"):
        _checks._check_aux_for_kernels([_expr.parse("mask_mod", " + ".join(f"a{i}[0]" for i in range(5)))], many)
    deep = {"t": np.zeros((1, 1, 1, 1, 2), np.int32)}
    with pytest.raises(ValueError, match=r"aux\['t'\] on the GPU must have at most 4 axes"):
        _checks._check_aux_for_kernels([_expr.parse("mask_mod", "t[0][0][0][0][1] > 0")], deep)
    _checks._check_aux_for_kernels([_expr.parse("mask_mod", "q_idx > 0")], many)  # arrays not read: no limit
    # bias, mask and two aux arrays fill the four slots; return_dbias's accumulator needs a fifth
    from cupyflash._variants import Variants
    S = 8
    two = {f"a{i}": np.zeros(S, np.int32) for i in range(2)}
    variants = _checks.check_user_terms(Variants(), _checks.AttentionShape(1, S, S, 2, 16), FLOAT32, "cpu",
                                        "a0[q_idx] + a1[kv_idx] > 0", None, two,
                                        np.zeros((S, S), np.float32), np.ones((S, S), bool))
    _checks.check_kernel_arrays(variants)
    with pytest.raises(ValueError, match=r"read 4 arrays on the GPU .*, and return_dbias=True writes one more; the "
                                         r"kernels take at most 4"):
        _checks.check_kernel_arrays(variants, dbias=True)


# ---- block-sparse masks (cupyflash.block_mask) ----

def test_a_block_mask_sorts_blocks_into_full_partial_and_skipped():
    bm = cupyflash.block_mask("q_idx >= kv_idx", 3, 2, 100, 100, block=(32, 32))
    assert bm.kinds.shape == (1, 1, 4, 4)  # reads neither b nor h: one pattern for all
    qb, kb = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    want = np.where(kb < qb, bm.FULL, np.where(kb == qb, bm.PARTIAL, bm.SKIP))
    assert np.array_equal(bm.kinds[0, 0], want)
    assert bm.mask_mod is not None and bm.density == pytest.approx(10 / 16)
    full, n_full = bm.indices(bm.FULL)
    assert n_full[0, 0].tolist() == [0, 1, 2, 3] and full[0, 0, 3, :3].tolist() == [0, 1, 2]


def _block_cases(rng, B, H, S):
    docs = _documents(rng, B, S)
    prefix = rng.integers(1, S, B).astype(np.int32)
    blocks = rng.random((B, 1, -(-S // 32), -(-S // 64)))
    return {
        "document-expression": (cupyflash.block_mask("q_idx >= kv_idx && doc[b][q_idx] == doc[b][kv_idx]", B, H, S, S,
                                                     block=(32, 64), aux={"doc": docs}), {}),
        # a callable classifies the blocks; the call's own mask_mod masks inside the partial ones
        "prefix-callable": (cupyflash.block_mask(lambda b, h, i, j: (j < prefix[b]) | (i >= j), B, H, S, S,
                                                 block=(32, 32)),
                            dict(mask_mod="kv_idx < prefix[b] || q_idx >= kv_idx", aux={"prefix": prefix})),
        **{f"blocks-{int(100 * d)}%": (cupyflash.block_mask(blocks < d, B, H, S, S, block=(32, 64)), {})
           for d in (0.1, 0.5, 1.0)},
    }


@pytest.mark.parametrize("case", ["document-expression", "prefix-callable", "blocks-10%", "blocks-50%", "blocks-100%"])
def test_block_sparse_attention_is_attention_under_the_mask_it_means(rng, case):
    q, k, v, dout = _inputs(rng, FLOAT32, S=200)
    B, S, H = q.shape[:3]
    bm, kw = _block_cases(rng, B, H, S)[case]
    dense = bm.to_dense()
    if "mask_mod" in kw:  # the callable's partial blocks are kept whole by the block mask itself
        dense = dense & reference._user_terms(np, kw, (B, H, S, S), np.float64)[1]
    o, lse = cupyflash.flash_attention(q, k, v, return_lse=True, block_mask=bm, **kw)
    ref = reference.attention(q, k, v, mask=dense)
    naive = reference.attention(q, k, v, upcast=False, mask=dense)
    assert_within_naive_bound(f"out [{case}]", o, ref[0], naive[0], FLOAT32)
    assert_within_naive_bound(f"lse [{case}]", lse, ref[1], naive[1], FLOAT32)
    grads = cupyflash.flash_attention_backward(dout, q, k, v, o, lse, block_mask=bm, **kw)
    ref_g = reference.attention_backward(dout, q, k, v, mask=dense)
    naive_g = reference.attention_backward(dout, q, k, v, upcast=False, mask=dense)
    for name, got, want, nv in zip(("dq", "dk", "dv"), grads, ref_g, naive_g):
        assert_within_naive_bound(f"{name} [{case}]", got, want, nv, FLOAT32)


def test_block_mask_density_follows_the_blocks_kept(rng):
    blocks = rng.random((1, 1, 8, 8)) < 0.25
    bm = cupyflash.block_mask(blocks, 1, 1, 256, 512, block=(32, 64))
    assert bm.density == pytest.approx(blocks.mean()) and bm.mask_mod is None


BAD_BLOCK_MASKS = {
    "block-size": (lambda: cupyflash.block_mask("q_idx >= kv_idx", 1, 1, 64, 64, block=(24, 32)), ValueError,
                   r"block sizes must be positive multiples of 16"),
    "array-shape": (lambda: cupyflash.block_mask(np.ones((1, 1, 3, 3), bool), 1, 1, 64, 64, block=(32, 32)), ValueError,
                    r"a block mask array must be bool \(batch or 1, heads or 1, 2, 2\)"),
    "unknown-name": (lambda: cupyflash.block_mask("doc[q_idx] > 0", 1, 1, 64, 64), ValueError,
                     r"mask reads 'doc', which is neither an index nor an aux array"),
    "negative": (lambda: cupyflash.block_mask("q_idx >= kv_idx", 1, -1, 64, 64), ValueError, r"must be >= 0"),
}


@pytest.mark.parametrize("bad", sorted(BAD_BLOCK_MASKS))
def test_bad_block_masks_name_the_rule(bad):
    make, error, pattern = BAD_BLOCK_MASKS[bad]
    with pytest.raises(error, match=pattern):
        make()


def test_a_block_mask_for_other_sizes_is_refused(rng):
    bm = cupyflash.block_mask("q_idx >= kv_idx", 2, 4, 64, 64)
    with pytest.raises(ValueError, match=r"block_mask was made for .* = \(2, 4, 64, 64\) but the call is \(2, 4, 20, 20\)"):
        cupyflash.flash_attention(**_good(rng), block_mask=bm)
    with pytest.raises(TypeError, match=r"block_mask must be a cupyflash.BlockMask"):
        cupyflash.flash_attention(**_good(rng), block_mask=np.ones((1, 1, 1, 1), bool))


# ---- dropout (regenerated from the seed: cupyflash._dropout) ----

@pytest.mark.parametrize("counter,key,want", [
    ((0, 0, 0, 0), (0, 0), "6627e8d5 e169c58d bc57ac4c 9b00dbd8"),
    ((0xffffffff,) * 4, (0xffffffff,) * 2, "408f276d 41c83b0e a20bc7c6 6d5451fd"),
    ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0), "d16cfe09 94fdcceb 5001e420 24126ea1"),
], ids=["zeros", "ones", "pi"])
def test_the_generator_is_philox4x32_10(counter, key, want):
    """Random123's known-answer vectors (tests/kat_vectors of its distribution)."""
    from cupyflash._dropout import philox4x32
    assert " ".join(f"{int(w):08x}" for w in philox4x32(counter, key)) == want


def test_the_kernels_generator_is_the_same_philox(tmp_path):
    """kernels_cu/dropout.cuh (host-and-device code) compiled by the host's C++ compiler gives
    Random123's known answers and cupyflash._dropout's words for random counters, keys and the
    (seed, b, h, i, j) -> counter mapping the kernels use."""
    import shutil
    import subprocess
    from cupyflash import _dropout
    from cupyflash._sources import kernel_dir
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler to check kernels_cu/dropout.cuh with")
    program = tmp_path / "philox.cpp"
    program.write_text('#include "dropout.cuh"\n#include <cstdio>\nint main() {\n'
                       '  unsigned long long seed; int b, h, i, j;\n'
                       '  while (std::scanf("%llu %d %d %d %d", &seed, &b, &h, &i, &j) == 5) {\n'
                       '    cupyflash::Philox4 r = cupyflash::dropout_words(seed, b, h, i, j);\n'
                       '    std::printf("%u %u %u %u\\n", r.w[0], r.w[1], r.w[2], r.w[3]);\n  }\n}\n')
    exe = tmp_path / "philox"
    subprocess.run([cxx, "-O2", "-std=c++17", f"-I{kernel_dir()}", str(program), "-o", str(exe)], check=True)
    rng = np.random.default_rng(3)
    rows = [(0, 0, 0, 0, 0), (2 ** 64 - 1, 7, 31, 2 ** 31 - 1, 2 ** 31 - 1)] + [
        (int(rng.integers(2 ** 63)) * 2 + 1, *(int(x) for x in rng.integers(0, 1 << 20, 4))) for _ in range(50)]
    out = subprocess.run([str(exe)], input="\n".join(" ".join(map(str, r)) for r in rows), capture_output=True,
                         text=True, check=True).stdout.split("\n")
    for row, line in zip(rows, out):
        seed, b, h, i, j = row
        want = _dropout.philox4x32((i, j >> 2, h, b), (seed, seed >> 32))
        assert [int(x) for x in line.split()] == [int(w) for w in want], (row, line)


def test_dropout_keeps_each_probability_with_probability_one_minus_p():
    keep = cupyflash.dropout_mask(7, 0.3, 2, 4, 256, 256)
    assert abs(keep.mean() - 0.7) < 0.005
    assert abs(keep[..., 0::4].mean() - keep[..., 3::4].mean()) < 0.01  # every word of a counter alike
    assert not np.array_equal(keep, cupyflash.dropout_mask(8, 0.3, 2, 4, 256, 256))


@pytest.mark.parametrize("dtype", [FLOAT64, BFLOAT16], ids=["float64", "bfloat16"])
def test_dropout_forward_and_backward_match_the_reference_with_the_same_mask(rng, dtype):
    q, k, v, dout = _inputs(rng, dtype, S=140)
    kw = dict(dropout_p=0.25, seed=1234, causal=True, sinks=rng.uniform(-1, 1, q.shape[2]).astype(np.float32))
    o, lse = cupyflash.flash_attention(q, k, v, return_lse=True, **kw)
    ref, naive = reference.attention(q, k, v, **kw), reference.attention(q, k, v, upcast=False, **kw)
    assert_within_naive_bound("out [dropout]", o, ref[0], naive[0], dtype)
    assert_within_naive_bound("lse [dropout]", lse, ref[1], naive[1], FLOAT64 if dtype == FLOAT64 else FLOAT32)
    grads = cupyflash.flash_attention_backward(dout, q, k, v, o, lse, **kw)
    ref_g = reference.attention_backward(dout, q, k, v, **kw)
    naive_g = reference.attention_backward(dout, q, k, v, upcast=False, **kw)
    for name, got, want, nv in zip(("dq", "dk", "dv", "dsinks"), grads, ref_g, naive_g):
        stored = dtype if name != "dsinks" else (FLOAT64 if dtype == FLOAT64 else FLOAT32)
        assert_within_naive_bound(f"{name} [dropout]", got, want, nv, stored)


def test_dropout_is_reproducible_per_seed_and_unbiased_over_seeds(rng):
    q, k, v, _ = _inputs(rng, FLOAT64, B=1, S=64, H=2, H_kv=2, D=16)
    plain = cupyflash.flash_attention(q, k, v)
    one = cupyflash.flash_attention(q, k, v, dropout_p=0.2, seed=3)
    assert np.array_equal(one, cupyflash.flash_attention(q, k, v, dropout_p=0.2, seed=3))
    assert np.array_equal(plain, cupyflash.flash_attention(q, k, v, dropout_p=0.0, seed=3))
    mean = np.mean([cupyflash.flash_attention(q, k, v, dropout_p=0.2, seed=s) for s in range(64)], axis=0)
    # E[out] is the undropped output: 64 seeds shrink the deviation about 8x
    assert np.abs(mean - plain).mean() < np.abs(one - plain).mean() / 4


@pytest.mark.parametrize("kw,error,pattern", [
    (dict(dropout_p=1.0, seed=1), ValueError, r"dropout_p must be in \[0, 1\)"),
    (dict(dropout_p=-0.1, seed=1), ValueError, r"dropout_p must be in \[0, 1\)"),
    (dict(dropout_p=True, seed=1), TypeError, r"dropout_p must be a real number"),
    (dict(dropout_p=0.1), ValueError, r"dropout_p > 0 needs seed="),
    (dict(dropout_p=0.1, seed=-1), ValueError, r"seed must be in \[0, 2\^64\)"),
    (dict(dropout_p=0.1, seed=1.5), TypeError, r"seed must be an int"),
], ids=["p-one", "p-negative", "p-bool", "no-seed", "seed-negative", "seed-float"])
def test_bad_dropout_arguments_name_the_rule(rng, kw, error, pattern):
    with pytest.raises(error, match=pattern):
        cupyflash.flash_attention(**_good(rng), **kw)


# ---- on the tape ----

def test_the_tape_differentiates_through_the_user_terms_bias_and_dropout(rng):
    """ad.flash_attention with a mask_mod, a bias Tensor and dropout: the gradients of q, k, v and
    bias are the API backward's with the same seed, and match finite differences of the loss."""
    from cupyflash import autodiff as ad
    q, k, v, dout = _inputs(rng, FLOAT64, B=1, S=24, H=2, H_kv=1, D=8)
    bias0 = rng.standard_normal((2, 24, 24))
    kw = dict(mask_mod="kv_idx < 4 || q_idx >= kv_idx", dropout_p=0.2, seed=99)
    tq, tk, tv, tb = (ad.Tensor(a, requires_grad=True) for a in (q, k, v, bias0))
    out = ad.flash_attention(tq, tk, tv, bias=tb, **kw)
    out.backward(dout)
    o, lse = cupyflash.flash_attention(q, k, v, bias=bias0, return_lse=True, **kw)
    want = cupyflash.flash_attention_backward(dout, q, k, v, o, lse, bias=bias0, return_dbias=True, **kw)
    for name, got, w in zip(("dq", "dk", "dv", "dbias"), (tq.grad, tk.grad, tv.grad, tb.grad), want):
        assert np.allclose(got.data if isinstance(got, ad.Tensor) else got, w, atol=1e-12), name
    # finite differences of sum(out * dout) in one entry of bias: the analytic dbias (dropout fixed by the seed)
    loss = lambda b: float((cupyflash.flash_attention(q, k, v, bias=b, **kw) * dout).sum())  # noqa: E731
    e = np.zeros_like(bias0)
    e[1, 10, 3] = 1e-6
    assert abs((loss(bias0 + e) - loss(bias0 - e)) / 2e-6 - want[3][1, 10, 3]) < 1e-6


def test_the_tape_draws_a_dropout_seed_per_call_and_reuses_it_in_backward(rng):
    from cupyflash import autodiff as ad
    q, k, v, dout = _inputs(rng, FLOAT64, B=1, S=16, H=1, H_kv=1, D=8)
    ad.dropout_seed(5)
    a = ad.flash_attention(q, k, v, dropout_p=0.5).data
    b = ad.flash_attention(q, k, v, dropout_p=0.5).data
    ad.dropout_seed(5)
    assert np.array_equal(a, ad.flash_attention(q, k, v, dropout_p=0.5).data) and not np.array_equal(a, b)


def test_packed_sequences_see_their_own_index_and_positions(rng):
    """flash_attention_varlen with a mask_mod, bias_mod and dropout: each sequence as the dense call on
    it alone, with b = its index (the expressions' positions and the dropout stream count from the
    sequence's start)."""
    lens = [37, 0, 64, 5]
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    H, D = 2, 16
    q, k, v, dout = (rng.standard_normal((cu[-1], H, D)) for _ in range(4))
    kw = dict(mask_mod="q_idx >= kv_idx || kv_idx < 3", bias_mod="-w[b] * abs(q_idx - kv_idx)",
              aux={"w": rng.uniform(0.1, 1.0, len(lens)).astype(np.float32)}, dropout_p=0.1, seed=17)
    o, lse = cupyflash.flash_attention_varlen(q, k, v, cu, cu, return_lse=True, **kw)
    grads = cupyflash.flash_attention_varlen_backward(dout, q, k, v, o, lse, cu, cu, **kw)
    for b, (s0, s1) in enumerate(zip(cu[:-1], cu[1:])):
        if s0 == s1:
            continue
        # sequence b as batch row b of a dense call (the rows before it zeros, their results unused)
        as_row_b = lambda x: np.concatenate([np.zeros((b, s1 - s0) + x.shape[1:]), x[None, s0:s1]])  # noqa: E731
        ref_o, ref_l = reference.attention(as_row_b(q), as_row_b(k), as_row_b(v), **kw)
        assert np.allclose(o[s0:s1], ref_o[b], atol=1e-12) and np.allclose(lse[:, s0:s1], ref_l[b], atol=1e-12)
        ref_g = reference.attention_backward(as_row_b(dout), as_row_b(q), as_row_b(k), as_row_b(v), **kw)
        for name, got, want in zip(("dq", "dk", "dv"), grads, ref_g):
            assert np.allclose(got[s0:s1], want[b], atol=1e-12), f"{name} of sequence {b}"


def test_what_the_listed_kernels_still_evaluate_per_element(rng):
    """With a block mask's tiles listed (the GPU's VARIANT_BLOCKS), full blocks need no element mask:
    what is left is the call's own mask and the block mask's rule on its partial blocks; and whether
    the call's own mask reads memory decides the Hopper forward's key tile (an aux mask_mod spilled at
    128 keys; the rule on partial blocks alone does not)."""
    from cupyflash import _config, _sources, _variants
    S, doc = 256, np.repeat(np.arange(4), 64).astype(np.int32)
    whole = cupyflash.block_mask(np.ones((1, 1, 2, 2), bool), 1, 2, S, S)
    causal_rule = cupyflash.block_mask("q_idx >= kv_idx", 1, 2, S, S)
    doc_rule = cupyflash.block_mask("doc[q_idx] == doc[kv_idx]", 1, 2, S, S, aux={"doc": doc})
    causal_mod = _expr.parse("mask_mod", "q_idx >= kv_idx")
    doc_mod = _expr.parse("mask_mod", "doc[q_idx] == doc[kv_idx]")
    cases = [(dict(block_mask=whole), (False, False)), (dict(block_mask=causal_rule), (True, False)),
             (dict(block_mask=doc_rule), (True, False)), (dict(block_mask=whole, mask_mod=causal_mod), (True, False)),
             (dict(block_mask=whole, mask_mod=doc_mod, aux=(("doc", doc),)), (True, True))]
    for kw, want in cases:
        assert _sources.element_mask(_variants.Variants(**kw), listed=True) == want, (kw, want)
        assert _sources.element_mask(_variants.Variants(**kw), listed=False)[0]  # unlisted: the kinds per element
    hopper = _config.kernel_set(np.float16, 128, False, 90, variant=_config.VARIANT_USER_MASK)
    assert hopper.with_block_list((128, 128), S, S, 1, 90, reads_memory=False).fwd.block_n == 128
    assert hopper.with_block_list((128, 128), S, S, 1, 90, reads_memory=True).fwd.block_n == 64
