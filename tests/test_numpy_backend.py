"""The NumPy implementation of the blocked algorithm, through the public API on numpy arrays.

Accuracy rule (flash-attn's): against the float64 reference, cupyflash's error is at most
twice the error of naive attention computed in the same precision as the inputs
(``reference.attention(..., upcast=False)``), plus one rounding to the dtype and a small
float32 accumulation slack (``rounding_atol``). float64 inputs must agree to ~1e-10.
"""
import warnings

import ml_dtypes
import numpy as np
import pytest

from conftest import error_report
from cupyflash import _numpy_backend, flash_attention, flash_attention_backward, reference
from cupyflash._dtypes import BFLOAT16, FLOAT16, FLOAT32, FLOAT64

DTYPES = [FLOAT64, FLOAT32, FLOAT16, BFLOAT16]
DTYPE_IDS = ["float64", "float32", "float16", "bfloat16"]
FLOAT64_RTOL = 1e-10


def random_inputs(rng, batch, seqlen_q, seqlen_k, heads, head_dim, dtype=FLOAT32):
    """q, k, v and dout drawn from N(0, 1), rounded to dtype."""
    def randn(seqlen):
        return rng.standard_normal((batch, seqlen, heads, head_dim)).astype(dtype)
    return randn(seqlen_q), randn(seqlen_k), randn(seqlen_k), randn(seqlen_q)


#: float32 accumulation slack, in units of float32 eps at the size of the result. Float32
#: rounding of exp2 arguments of size ~10 and of sums over head_dim and seqlen terms costs
#: cupyflash up to ~15 eps here (measured over 30 seeds), independent of the naive error.
FLOAT32_ACCUMULATION_EPS = 32


def rounding_atol(expected, dtype):
    """One rounding to dtype plus float32 accumulation slack, at the size of the largest value."""
    size = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    eps = float(ml_dtypes.finfo(dtype).eps)
    return (eps + FLOAT32_ACCUMULATION_EPS * float(np.finfo(np.float32).eps)) * size


def assert_within_naive_bound(name, actual, expected, naive, dtype):
    """|actual - expected| <= 2 |naive - expected| + rounding_atol, -inf entries matching exactly.

    dtype is the precision actual is stored in (float32 for the lse of 16-bit inputs).
    """
    actual, expected, naive = (np.asarray(x, np.float64) for x in (actual, expected, naive))
    masked = np.isneginf(expected)
    assert np.array_equal(np.isneginf(actual), masked), \
        f"{name}: -inf entries differ from the reference's"
    actual, expected, naive = actual[~masked], expected[~masked], naive[~masked]
    err = float(np.max(np.abs(actual - expected), initial=0.0))
    if dtype == FLOAT64:
        bound = FLOAT64_RTOL * max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    else:
        naive_err = float(np.max(np.abs(naive - expected), initial=0.0))
        bound = 2.0 * naive_err + rounding_atol(expected, dtype)
    assert np.all(np.isfinite(actual)), f"{name}: non-finite values; {error_report(actual, expected)}"
    assert err <= bound, (f"{name} ({np.dtype(dtype)}): error {err:.3e} > bound {bound:.3e}; "
                          f"{error_report(actual, expected)}")


# (batch, seqlen_q, seqlen_k, heads, head_dim): awkward lengths, both Sq < Sk and Sq > Sk,
# and every class of head_dim the GPU kernels specialise for.
FORWARD_CASES = [
    (2, 1, 1, 2, 8),
    (1, 7, 7, 2, 32),
    (2, 113, 113, 1, 40),
    (1, 113, 257, 2, 64),
    (1, 257, 113, 2, 96),
    (1, 1, 257, 1, 128),
    (1, 257, 1, 1, 160),
    (1, 7, 113, 2, 256),
    (2, 113, 7, 1, 256),
    (1, 1023, 1023, 1, 64),
    (1, 113, 1023, 1, 128),
    (1, 1023, 257, 1, 32),
]

BACKWARD_CASES = [
    (2, 1, 1, 2, 8),
    (1, 7, 7, 2, 32),
    (1, 113, 257, 1, 40),
    (2, 257, 113, 1, 64),
    (1, 113, 113, 2, 128),
    (1, 7, 257, 1, 160),
    (1, 257, 7, 1, 256),
    (1, 1023, 1023, 1, 64),
]


def case_id(case):
    b, sq, sk, h, d = case
    return f"b{b}-sq{sq}-sk{sk}-h{h}-d{d}"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", FORWARD_CASES, ids=case_id)
def test_forward_matches_float64_reference(rng, case, causal, dtype):
    q, k, v, _ = random_inputs(rng, *case, dtype=dtype)
    out, lse = flash_attention(q, k, v, causal=causal, return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == (FLOAT64 if dtype == FLOAT64 else FLOAT32)
    assert lse.shape == (case[0], case[3], case[1])
    out_ref, lse_ref = reference.attention(q, k, v, causal=causal)
    out_naive, lse_naive = reference.attention(q, k, v, causal=causal, upcast=False)
    assert_within_naive_bound("out", out, out_ref, out_naive, dtype)
    assert_within_naive_bound("lse", lse, lse_ref, lse_naive, lse.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", BACKWARD_CASES, ids=case_id)
def test_backward_matches_float64_reference(rng, case, causal, dtype):
    q, k, v, dout = random_inputs(rng, *case, dtype=dtype)
    out, lse = flash_attention(q, k, v, causal=causal, return_lse=True)
    grads = flash_attention_backward(dout, q, k, v, out, lse, causal=causal)
    grads_ref = reference.attention_backward(dout, q, k, v, causal=causal)
    grads_naive = reference.attention_backward(dout, q, k, v, causal=causal, upcast=False)
    for name, g, g_ref, g_naive, x in zip(("dq", "dk", "dv"), grads, grads_ref, grads_naive, (q, k, v)):
        assert g.dtype == dtype and g.shape == x.shape, name
        assert_within_naive_bound(name, g, g_ref, g_naive, dtype)


def test_deterministic_flag_is_accepted_and_the_cpu_path_is_always_reproducible(rng):
    q, k, v, dout = random_inputs(rng, 1, 37, 53, 2, 16, dtype=FLOAT32)
    out, lse = flash_attention(q, k, v, causal=True, return_lse=True)
    plain = flash_attention_backward(dout, q, k, v, out, lse, causal=True)
    det = flash_attention_backward(dout, q, k, v, out, lse, causal=True, deterministic=True)
    for name, a, b in zip(("dq", "dk", "dv"), plain, det):
        assert np.array_equal(a, b), f"{name}: {error_report(a, b)}"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlens", [(37, 53), (53, 37), (40, 40)], ids=lambda s: f"sq{s[0]}-sk{s[1]}")
def test_tiny_blocks_exercise_rescaling_and_block_skipping(rng, monkeypatch, seqlens, causal):
    """Many partial tiles: every query block rescales its accumulator several times."""
    monkeypatch.setattr(_numpy_backend, "BLOCK_M", 16)
    monkeypatch.setattr(_numpy_backend, "BLOCK_N", 8)
    q, k, v, dout = random_inputs(rng, 2, *seqlens, 2, 16, dtype=FLOAT64)
    out, lse = flash_attention(q, k, v, causal=causal, return_lse=True)
    out_ref, lse_ref = reference.attention(q, k, v, causal=causal)
    assert_within_naive_bound("out", out, out_ref, out_ref, FLOAT64)
    assert_within_naive_bound("lse", lse, lse_ref, lse_ref, FLOAT64)
    grads = flash_attention_backward(dout, q, k, v, out, lse, causal=causal)
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads,
                              reference.attention_backward(dout, q, k, v, causal=causal)):
        assert_within_naive_bound(name, g, g_ref, g_ref, FLOAT64)


def test_large_scores_do_not_overflow(rng):
    """Scores of several thousand: the running max keeps every exp2 argument <= 0."""
    q, k, v, dout = random_inputs(rng, 1, 113, 257, 1, 64, dtype=FLOAT32)
    q *= 30
    out, lse = flash_attention(q, k, v, softmax_scale=1.0, return_lse=True)
    out_ref, lse_ref = reference.attention(q, k, v, softmax_scale=1.0)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(lse))
    np.testing.assert_allclose(out, out_ref, rtol=0, atol=1e-4, err_msg=error_report(out, out_ref))
    np.testing.assert_allclose(lse, lse_ref, rtol=1e-6, err_msg=error_report(lse, lse_ref))


@pytest.mark.parametrize("scale", [0.01, 0.3, 2.0])
def test_softmax_scale_is_used(rng, scale):
    q, k, v, _ = random_inputs(rng, 1, 33, 65, 2, 32, dtype=FLOAT64)
    out, lse = flash_attention(q, k, v, softmax_scale=scale, return_lse=True)
    out_ref, lse_ref = reference.attention(q, k, v, softmax_scale=scale)
    assert_within_naive_bound("out", out, out_ref, out_ref, FLOAT64)
    assert_within_naive_bound("lse", lse, lse_ref, lse_ref, FLOAT64)


def test_default_scale_is_one_over_sqrt_head_dim(rng):
    q, k, v, _ = random_inputs(rng, 1, 17, 29, 1, 64, dtype=FLOAT64)
    out = flash_attention(q, k, v)
    out_ref, _ = reference.attention(q, k, v, softmax_scale=1 / 8)
    assert_within_naive_bound("out", out, out_ref, out_ref, FLOAT64)


def test_return_lse_false_returns_out_only(rng):
    q, k, v, _ = random_inputs(rng, 1, 5, 6, 1, 8)
    out = flash_attention(q, k, v)
    assert isinstance(out, np.ndarray) and out.shape == q.shape


# --- masking --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fully_masked_rows_give_zero_out_minus_inf_lse_and_zero_grads(rng, dtype):
    """causal with seqlen_q > seqlen_k: the first seqlen_q - seqlen_k queries see no key."""
    seqlen_q, seqlen_k = 100, 30
    q, k, v, dout = random_inputs(rng, 2, seqlen_q, seqlen_k, 2, 32, dtype=dtype)
    masked = seqlen_q - seqlen_k
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no divide-by-zero or invalid-value warnings
        out, lse = flash_attention(q, k, v, causal=True, return_lse=True)
        dq, dk, dv = flash_attention_backward(dout, q, k, v, out, lse, causal=True)
    assert np.all(out[:, :masked] == 0), error_report(out[:, :masked], 0 * out[:, :masked])
    assert np.all(np.isneginf(lse[:, :, :masked]))
    assert np.all(np.isfinite(lse[:, :, masked:]))
    assert np.all(dq[:, :masked] == 0)
    for g in (out, dq, dk, dv):
        assert np.all(np.isfinite(g.astype(np.float64)))


def test_causal_mask_is_bottom_right_aligned(rng):
    """Query i sees keys j <= i + seqlen_k - seqlen_q: the last query sees every key."""
    q, k, v, _ = random_inputs(rng, 1, 3, 5, 1, 8, dtype=FLOAT64)
    out = flash_attention(q, k, v, causal=True)
    full = flash_attention(q[:, -1:], k, v)  # last query, no mask at all
    np.testing.assert_allclose(out[:, -1:], full, rtol=1e-12)
    first = flash_attention(q[:, :1], k[:, :3], v[:, :3])  # first query sees keys 0..2
    np.testing.assert_allclose(out[:, :1], first, rtol=1e-12)


# --- layouts and buffers --------------------------------------------------------------

def bhsd_views(rng, batch, seqlen, heads, head_dim, dtype):
    """A (batch, seqlen, heads, head_dim) view of a (batch, heads, seqlen, head_dim) array."""
    x = rng.standard_normal((batch, heads, seqlen, head_dim)).astype(dtype)
    return x.transpose(0, 2, 1, 3)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_strided_inputs_give_the_same_result(rng, causal):
    q = bhsd_views(rng, 2, 70, 3, 32, FLOAT32)
    k = bhsd_views(rng, 2, 90, 3, 32, FLOAT32)
    v = bhsd_views(rng, 2, 90, 3, 32, FLOAT32)[:, ::-1]  # negative stride too
    dout = bhsd_views(rng, 2, 70, 3, 32, FLOAT32)
    assert not q.flags.c_contiguous
    out, lse = flash_attention(q, k, v, causal=causal, return_lse=True)
    qc, kc, vc, doutc = (np.ascontiguousarray(x) for x in (q, k, v, dout))
    out_c, lse_c = flash_attention(qc, kc, vc, causal=causal, return_lse=True)
    np.testing.assert_allclose(out, out_c, rtol=1e-6, atol=1e-6, err_msg=error_report(out, out_c))
    np.testing.assert_allclose(lse, lse_c, rtol=1e-6, err_msg=error_report(lse, lse_c))
    grads = flash_attention_backward(dout, q, k, v, out, lse, causal=causal)
    grads_c = flash_attention_backward(doutc, qc, kc, vc, out_c, lse_c, causal=causal)
    for g, g_c in zip(grads, grads_c):
        np.testing.assert_allclose(g, g_c, rtol=1e-5, atol=1e-5, err_msg=error_report(g, g_c))


@pytest.mark.parametrize("dtype", [FLOAT32, BFLOAT16], ids=["float32", "bfloat16"])
def test_out_and_lse_buffers_are_written_in_place(rng, dtype):
    q, k, v, _ = random_inputs(rng, 2, 50, 70, 2, 16, dtype=dtype)
    out_buf = np.full(q.shape, np.nan, dtype)
    lse_buf = np.full((2, 2, 50), np.nan, FLOAT32)
    out, lse = flash_attention(q, k, v, causal=True, return_lse=True, out=out_buf, lse=lse_buf)
    assert out is out_buf and lse is lse_buf
    out_new, lse_new = flash_attention(q, k, v, causal=True, return_lse=True)
    np.testing.assert_array_equal(out_buf, out_new)
    np.testing.assert_array_equal(lse_buf, lse_new)


def test_strided_output_buffers(rng):
    """Buffers that are (batch, heads, seqlen, head_dim) arrays seen through a transpose."""
    q, k, v, dout = random_inputs(rng, 2, 40, 30, 3, 16)
    out_buf = np.empty((2, 3, 40, 16), FLOAT32).transpose(0, 2, 1, 3)
    out, lse = flash_attention(q, k, v, return_lse=True, out=out_buf)
    assert out is out_buf
    np.testing.assert_array_equal(out_buf, flash_attention(q, k, v))
    dq_buf = np.empty((2, 3, 40, 16), FLOAT32).transpose(0, 2, 1, 3)
    dk_buf = np.empty((2, 3, 30, 16), FLOAT32).transpose(0, 2, 1, 3)
    dv_buf = np.empty((2, 3, 30, 16), FLOAT32).transpose(0, 2, 1, 3)
    grads = flash_attention_backward(dout, q, k, v, out, lse, dq=dq_buf, dk=dk_buf, dv=dv_buf)
    assert grads[0] is dq_buf and grads[1] is dk_buf and grads[2] is dv_buf
    for g, g_new in zip(grads, flash_attention_backward(dout, q, k, v, out, lse)):
        np.testing.assert_array_equal(g, g_new)


def test_gradient_buffers_are_written_in_place(rng):
    q, k, v, dout = random_inputs(rng, 1, 20, 33, 2, 8, dtype=FLOAT16)
    out, lse = flash_attention(q, k, v, causal=True, return_lse=True)
    bufs = [np.full(x.shape, np.nan, FLOAT16) for x in (q, k, v)]
    grads = flash_attention_backward(dout, q, k, v, out, lse, causal=True,
                                     dq=bufs[0], dk=bufs[1], dv=bufs[2])
    for g, buf, g_new in zip(grads, bufs, flash_attention_backward(dout, q, k, v, out, lse, causal=True)):
        assert g is buf
        np.testing.assert_array_equal(buf, g_new)


# --- empty and non-finite inputs ------------------------------------------------------

EMPTY_CASES = [(0, 5, 7, 2), (2, 0, 7, 2), (2, 5, 0, 2), (2, 5, 7, 0)]  # batch, seqlen_q, seqlen_k, heads


def check_empty_results(case, out, lse, grads, q, k, v):
    batch, seqlen_q, seqlen_k, heads = case
    assert out.shape == q.shape and lse.shape == (batch, heads, seqlen_q)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    if seqlen_k == 0:  # every query sees no key
        assert np.all(out == 0) and np.all(np.isneginf(lse)) and np.all(grads[0] == 0)
    if seqlen_q == 0:  # no query uses any key
        assert np.all(grads[1] == 0) and np.all(grads[2] == 0)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", EMPTY_CASES, ids=lambda c: "b{}-sq{}-sk{}-h{}".format(*c))
def test_backend_handles_zero_sizes(rng, case, causal):
    batch, seqlen_q, seqlen_k, heads = case
    q, k, v, dout = random_inputs(rng, batch, seqlen_q, seqlen_k, heads, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, lse = _numpy_backend.forward(q, k, v, causal=causal, scale=0.5)
        grads = _numpy_backend.backward(dout, q, k, v, out, lse, causal=causal, scale=0.5)
    check_empty_results(case, out, lse, grads, q, k, v)


@pytest.mark.parametrize("case", EMPTY_CASES, ids=lambda c: "b{}-sq{}-sk{}-h{}".format(*c))
def test_empty_inputs_give_empty_outputs(rng, case):
    batch, seqlen_q, seqlen_k, heads = case
    q, k, v, dout = random_inputs(rng, batch, seqlen_q, seqlen_k, heads, 8)
    out, lse = flash_attention(q, k, v, causal=True, return_lse=True)
    grads = flash_attention_backward(dout, q, k, v, out, lse, causal=True)
    check_empty_results(case, out, lse, grads, q, k, v)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_nan_in_a_query_row_gives_nan_in_that_row_only(rng, causal):
    q, k, v, _ = random_inputs(rng, 2, 70, 70, 2, 16)
    q[1, 45, 0, 3] = np.nan
    out, lse = flash_attention(q, k, v, causal=causal, return_lse=True)
    assert np.all(np.isnan(out[1, 45, 0])) and np.isnan(lse[1, 0, 45])
    out[1, 45, 0] = 0
    lse[1, 0, 45] = 0
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(lse))


# --- user errors: exception type and a message naming the argument --------------------

def make_inputs(dtype=FLOAT32, batch=1, seqlen_q=5, seqlen_k=6, heads=2, head_dim=16):
    rng = np.random.default_rng(0)
    return random_inputs(rng, batch, seqlen_q, seqlen_k, heads, head_dim, dtype)[:3]


def fwd(**kw):
    """flash_attention on valid float32 inputs, with some arguments replaced."""
    q, k, v = make_inputs()
    args = {"q": q, "k": k, "v": v}
    args.update({n: kw.pop(n) for n in ("q", "k", "v") if n in kw})
    return flash_attention(args["q"], args["k"], args["v"], **kw)


def bwd(dtype=FLOAT32, **kw):
    """flash_attention_backward on valid inputs, with some arguments replaced."""
    q, k, v = make_inputs(dtype)
    out, lse = flash_attention(q, k, v, return_lse=True)
    args = {"dout": out.copy(), "q": q, "k": k, "v": v, "out": out, "lse": lse}
    args.update({n: kw.pop(n) for n in tuple(args) if n in kw})
    return flash_attention_backward(*args.values(), **kw)


def non_contiguous_last_dim(x):
    """Same shape as x but every other element of a twice-as-long last axis."""
    wide = np.repeat(x, 2, axis=-1)
    return wide[..., ::2]


Q, K, V = make_inputs()
USER_ERRORS = {
    # name: (call, exception, message pattern)
    "q-list": (lambda: fwd(q=Q.tolist()), TypeError, r"^q must be a numpy or cupy array.*got list"),
    "v-int": (lambda: fwd(v=3), TypeError, r"^v must be a numpy or cupy array.*got int"),
    "int32": (lambda: fwd(q=Q.astype(np.int32), k=K.astype(np.int32), v=V.astype(np.int32)),
              ValueError, r"^q has dtype int32; supported on the CPU: float16, bfloat16, float32, float64"),
    "mixed-dtypes": (lambda: fwd(k=K.astype(FLOAT16)), ValueError,
                     r"^k has dtype float16 but q has float32.*same dtype"),
    "mixed-bfloat16": (lambda: fwd(v=V.astype(BFLOAT16)), ValueError, r"^v has dtype bfloat16 but q"),
    "q-rank-3": (lambda: fwd(q=Q[0]), ValueError, r"^q must have 4 dimensions"),
    "k-rank-5": (lambda: fwd(k=K[None]), ValueError, r"^k must have 4 dimensions"),
    "batch-mismatch": (lambda: fwd(k=np.concatenate([K, K])), ValueError,
                       r"^k has shape \(2, 6, 2, 16\) but q has \(1, 5, 2, 16\).*batch"),
    "heads-mismatch": (lambda: fwd(v=V[:, :, :1]), ValueError, r"^v has 1 heads but k has 2: k and v must have the same heads"),
    "head-dim-mismatch": (lambda: fwd(k=K[..., :8], v=V[..., :8]), ValueError,
                          r"^k has shape .* but q has.*head_dim"),
    "kv-seqlen-mismatch": (lambda: fwd(v=V[:, :5]), ValueError,
                           r"^k and v must have the same seqlen, got 6 and 5"),
    "head-dim-12": (lambda: fwd(**dict(zip("qkv", make_inputs(head_dim=12)))), ValueError,
                    r"^head_dim 12 is not supported; supported head_dim: multiples of 8 from 8 to 256"),
    "head-dim-264": (lambda: fwd(**dict(zip("qkv", make_inputs(head_dim=264)))), ValueError,
                     r"^head_dim 264 is not supported; supported head_dim: multiples of 8 from 8 to 256"),
    "scale-0": (lambda: fwd(softmax_scale=0), ValueError, r"^softmax_scale must be finite and > 0, got 0"),
    "scale-negative": (lambda: fwd(softmax_scale=-1.0), ValueError, r"^softmax_scale must be finite and > 0"),
    "scale-nan": (lambda: fwd(softmax_scale=float("nan")), ValueError, r"^softmax_scale must be finite"),
    "scale-inf": (lambda: fwd(softmax_scale=np.inf), ValueError, r"^softmax_scale must be finite"),
    "scale-str": (lambda: fwd(softmax_scale="0.1"), TypeError, r"^softmax_scale must be a real number"),
    "scale-bool": (lambda: fwd(softmax_scale=True), TypeError, r"^softmax_scale must be a real number"),
    "q-last-dim-strided": (lambda: fwd(q=non_contiguous_last_dim(Q)), ValueError,
                           r"^q must be contiguous in its last dimension"),
    "v-last-dim-strided": (lambda: fwd(v=non_contiguous_last_dim(V)), ValueError,
                           r"^v must be contiguous in its last dimension"),
    "causal-int": (lambda: fwd(causal=1), TypeError, r"^causal must be a bool, got int"),
    "causal-str": (lambda: fwd(causal="True"), TypeError, r"^causal must be a bool, got str"),
    "causal-none": (lambda: fwd(causal=None), TypeError, r"^causal must be a bool"),
    "out-shape": (lambda: fwd(out=np.empty((1, 6, 2, 16), FLOAT32)), ValueError,
                  r"^out must have shape \(1, 5, 2, 16\)"),
    "out-dtype": (lambda: fwd(out=np.empty((1, 5, 2, 16), FLOAT64)), ValueError,
                  r"^out must have dtype float32"),
    "out-list": (lambda: fwd(out=[0.0]), TypeError, r"^out must be a numpy or cupy array"),
    "out-read-only": (lambda: fwd(out=np.broadcast_to(np.zeros(16, FLOAT32), (1, 5, 2, 16))),
                      ValueError, r"^out is read-only"),
    "out-last-dim-strided": (lambda: fwd(out=non_contiguous_last_dim(Q)), ValueError,
                             r"^out must be contiguous in its last dimension"),
    "lse-shape": (lambda: fwd(return_lse=True, lse=np.empty((1, 5, 2), FLOAT32)), ValueError,
                  r"^lse must have shape \(1, 2, 5\)"),
    "lse-dtype": (lambda: fwd(return_lse=True, lse=np.empty((1, 2, 5), FLOAT16)), ValueError,
                  r"^lse must have dtype float32"),
    # backward
    "bwd-lse-shape": (lambda: bwd(lse=np.zeros((1, 5, 2), FLOAT32)), ValueError,
                      r"^lse must have shape \(1, 2, 5\) \(the forward log-sum-exp\)"),
    "bwd-lse-dtype": (lambda: bwd(lse=np.zeros((1, 2, 5), FLOAT64)), ValueError,
                      r"^lse must have dtype float32 \(the forward log-sum-exp\), got float64"),
    "bwd-lse-float64-for-float64": (lambda: bwd(FLOAT64, lse=np.zeros((1, 2, 5), FLOAT32)), ValueError,
                                    r"^lse must have dtype float64"),
    "bwd-lse-list": (lambda: bwd(lse=[0.0]), TypeError, r"^lse must be a numpy or cupy array"),
    "bwd-dout-shape": (lambda: bwd(dout=np.zeros((1, 6, 2, 16), FLOAT32)), ValueError,
                       r"^dout must have shape \(1, 5, 2, 16\)"),
    "bwd-dout-dtype": (lambda: bwd(dout=np.zeros((1, 5, 2, 16), FLOAT16)), ValueError,
                       r"^dout has dtype float16 but q has float32"),
    "bwd-out-dtype": (lambda: bwd(out=np.zeros((1, 5, 2, 16), FLOAT64)), ValueError,
                      r"^out has dtype float64 but q has float32"),
    "bwd-out-shape": (lambda: bwd(out=np.zeros((1, 5, 1, 16), FLOAT32)), ValueError,
                      r"^out must have shape \(1, 5, 2, 16\)"),
    "bwd-dq-shape": (lambda: bwd(dq=np.zeros((1, 6, 2, 16), FLOAT32)), ValueError,
                     r"^dq must have shape \(1, 5, 2, 16\)"),
    "bwd-dk-dtype": (lambda: bwd(dk=np.zeros((1, 6, 2, 16), FLOAT16)), ValueError,
                     r"^dk must have dtype float32"),
    "bwd-dv-list": (lambda: bwd(dv=[0.0]), TypeError, r"^dv must be a numpy or cupy array"),
    "bwd-causal-int": (lambda: bwd(causal=0), TypeError, r"^causal must be a bool"),
    "bwd-deterministic-str": (lambda: bwd(deterministic="yes"), TypeError, r"^deterministic must be a bool, got str"),
    "bwd-scale-negative": (lambda: bwd(softmax_scale=-0.5), ValueError, r"^softmax_scale must be finite and > 0"),
    "bwd-k-rank": (lambda: bwd(k=K[0]), ValueError, r"^k must have 4 dimensions"),
}


@pytest.mark.parametrize("name", list(USER_ERRORS))
def test_user_errors_name_the_argument(name):
    call, exc, pattern = USER_ERRORS[name]
    with pytest.raises(exc, match=pattern):
        call()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_every_cpu_dtype_is_accepted(dtype):
    q, k, v = make_inputs(dtype)
    out, lse = flash_attention(q, k, v, return_lse=True)
    assert out.dtype == dtype
    assert lse.dtype == (FLOAT64 if dtype == FLOAT64 else FLOAT32)

