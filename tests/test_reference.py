"""The naive reference is itself checked: against the textbook definition row by row, and its
analytic gradients against central finite differences. Everything else is compared to it."""
import math
import warnings

import ml_dtypes
import numpy as np
import pytest

from conftest import error_report
from cupyflash import reference
from cupyflash._dtypes import BFLOAT16, FLOAT16, FLOAT32, FLOAT64


def randn(rng, *shape, dtype=FLOAT64):
    return rng.standard_normal(shape).astype(dtype)


def qkv(rng, batch, seqlen_q, seqlen_k, heads, head_dim, dtype=FLOAT64):
    return (randn(rng, batch, seqlen_q, heads, head_dim, dtype=dtype),
            randn(rng, batch, seqlen_k, heads, head_dim, dtype=dtype),
            randn(rng, batch, seqlen_k, heads, head_dim, dtype=dtype))


def textbook_attention(q, k, v, causal, scale):
    """One query row at a time with Python's math module: out and lse by definition."""
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k = k.shape[1]
    out = np.zeros(q.shape)
    lse = np.full((batch, heads, seqlen_q), -np.inf)
    for b in range(batch):
        for h in range(heads):
            for i in range(seqlen_q):
                keys = [j for j in range(seqlen_k) if not causal or j <= i + seqlen_k - seqlen_q]
                if not keys:
                    continue
                s = [scale * float(np.dot(q[b, i, h], k[b, j, h])) for j in keys]
                lse[b, h, i] = math.log(math.fsum(math.exp(x) for x in s))
                for j, x in zip(keys, s):
                    out[b, i, h] += math.exp(x - lse[b, h, i]) * v[b, j, h]
    return out, lse


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlens", [(1, 1), (5, 5), (3, 7), (7, 3)], ids=lambda s: f"sq{s[0]}-sk{s[1]}")
def test_matches_textbook_definition(rng, seqlens, causal):
    q, k, v = qkv(rng, 2, *seqlens, 2, 8)
    out, lse = reference.attention(q, k, v, causal=causal, softmax_scale=0.7)
    out_tb, lse_tb = textbook_attention(q, k, v, causal, 0.7)
    assert out.dtype == FLOAT64 and lse.dtype == FLOAT64
    assert out.shape == q.shape and lse.shape == (2, 2, seqlens[0])
    np.testing.assert_allclose(out, out_tb, rtol=1e-12, atol=1e-14, err_msg=error_report(out, out_tb))
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(lse_tb))
    seen = np.isfinite(lse_tb)
    np.testing.assert_allclose(lse[seen], lse_tb[seen], rtol=1e-12,
                               err_msg=error_report(lse[seen], lse_tb[seen]))


def test_default_scale_is_one_over_sqrt_head_dim(rng):
    q, k, v = qkv(rng, 1, 4, 6, 1, 32)
    out, lse = reference.attention(q, k, v)
    out_tb, lse_tb = textbook_attention(q, k, v, False, 1 / math.sqrt(32))
    np.testing.assert_allclose(out, out_tb, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(lse, lse_tb, rtol=1e-12)


def finite_difference_grads(q, k, v, dout, causal, h=1e-6):
    """d/dx of sum(attention(q, k, v) * dout) by central differences, for x in q, k, v."""
    def loss(q_, k_, v_):
        out, _ = reference.attention(q_, k_, v_, causal=causal)
        return float(np.sum(out * dout))

    grads = []
    for which in range(3):
        args = [q.copy(), k.copy(), v.copy()]
        x = args[which]
        g = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            orig = x[idx]
            x[idx] = orig + h
            plus = loss(*args)
            x[idx] = orig - h
            minus = loss(*args)
            x[idx] = orig
            g[idx] = (plus - minus) / (2 * h)
        grads.append(g)
    return grads


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlens", [(3, 3), (2, 4), (4, 2)], ids=lambda s: f"sq{s[0]}-sk{s[1]}")
def test_backward_matches_finite_differences(rng, seqlens, causal):
    """(4, 2) causal has two fully masked query rows: their gradients are exactly 0."""
    q, k, v = qkv(rng, 1, *seqlens, 2, 8)
    dout = randn(rng, *q.shape)
    grads = reference.attention_backward(dout, q, k, v, causal=causal)
    numeric = finite_difference_grads(q, k, v, dout, causal)
    for name, g, g_fd in zip(("dq", "dk", "dv"), grads, numeric):
        assert g.dtype == FLOAT64
        np.testing.assert_allclose(g, g_fd, rtol=1e-6, atol=1e-8, err_msg=f"{name}: {error_report(g, g_fd)}")


@pytest.mark.parametrize("upcast", [True, False], ids=["upcast", "input-precision"])
@pytest.mark.parametrize("dtype", [FLOAT64, FLOAT32, FLOAT16, BFLOAT16],
                         ids=["float64", "float32", "float16", "bfloat16"])
def test_fully_masked_rows(rng, dtype, upcast):
    """causal, seqlen_q > seqlen_k: the first rows see no key -> out 0, lse -inf, zero grads."""
    q, k, v = qkv(rng, 1, 6, 2, 2, 8, dtype=dtype)
    dout = randn(rng, *q.shape, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, lse = reference.attention(q, k, v, causal=True, upcast=upcast)
        dq, dk, dv = reference.attention_backward(dout, q, k, v, causal=True, upcast=upcast)
    assert np.all(out[:, :4] == 0) and np.all(np.isneginf(lse[:, :, :4]))
    assert np.all(np.isfinite(lse[:, :, 4:]))
    assert np.all(dq[:, :4] == 0)
    for x in (out, dq, dk, dv):
        assert np.all(np.isfinite(x.astype(np.float64)))


def test_no_keys_at_all(rng):
    q, _, _ = qkv(rng, 2, 3, 1, 2, 8)
    k = v = np.zeros((2, 0, 2, 8))
    out, lse = reference.attention(q, k, v)
    assert np.all(out == 0) and out.shape == q.shape
    assert np.all(np.isneginf(lse)) and lse.shape == (2, 2, 3)
    dq, dk, dv = reference.attention_backward(randn(rng, *q.shape), q, k, v)
    assert np.all(dq == 0) and dk.shape == k.shape and dv.shape == v.shape


@pytest.mark.parametrize("dtype, lse_dtype", [(FLOAT64, FLOAT64), (FLOAT32, FLOAT32),
                                              (FLOAT16, FLOAT32), (BFLOAT16, FLOAT32)],
                         ids=["float64", "float32", "float16", "bfloat16"])
def test_input_precision_keeps_the_input_dtype(rng, dtype, lse_dtype):
    q, k, v = qkv(rng, 1, 9, 11, 2, 16, dtype=dtype)
    out, lse = reference.attention(q, k, v, upcast=False)
    assert out.dtype == dtype and lse.dtype == lse_dtype
    grads = reference.attention_backward(q, q, k, v, upcast=False)
    assert [g.dtype for g in grads] == [dtype] * 3
    out64, _ = reference.attention(q, k, v)
    assert out64.dtype == FLOAT64


@pytest.mark.parametrize("dtype", [FLOAT32, FLOAT16, BFLOAT16], ids=["float32", "float16", "bfloat16"])
def test_input_precision_error_is_that_of_the_dtype(rng, dtype):
    """upcast=False really rounds to the input dtype: its error is a few units of that dtype's
    eps, no less (it is not secretly float64) and no more (it is still right)."""
    q, k, v = qkv(rng, 2, 65, 129, 2, 64, dtype=dtype)
    dout = randn(rng, *q.shape, dtype=dtype)
    eps = float(ml_dtypes.finfo(dtype).eps)
    results = [(reference.attention(q, k, v, causal=True, upcast=up)[0],) +
               reference.attention_backward(dout, q, k, v, causal=True, upcast=up)
               for up in (False, True)]
    for name, low, exact in zip(("out", "dq", "dk", "dv"), *results):
        exact_size = float(np.max(np.abs(exact)))
        rel_err = float(np.max(np.abs(low.astype(np.float64) - exact))) / exact_size
        assert eps / 16 < rel_err < 16 * eps, f"{name}: relative error {rel_err:.2e}, eps {eps:.2e}"


def test_float64_input_precision_equals_upcast(rng):
    q, k, v = qkv(rng, 1, 17, 9, 2, 8)
    for a, b in zip(reference.attention(q, k, v, causal=True, upcast=False),
                    reference.attention(q, k, v, causal=True)):
        np.testing.assert_array_equal(a, b)


def test_nan_propagates_to_its_row(rng):
    q, k, v = qkv(rng, 1, 4, 5, 1, 8)
    q[0, 2, 0, 1] = np.nan
    out, lse = reference.attention(q, k, v)
    assert np.all(np.isnan(out[0, 2])) and np.isnan(lse[0, 0, 2])
    assert np.all(np.isfinite(np.delete(out, 2, axis=1)))


@pytest.mark.gpu
@pytest.mark.parametrize("upcast", [True, False], ids=["upcast", "input-precision"])
@pytest.mark.parametrize("dtype", [FLOAT32, FLOAT16, BFLOAT16], ids=["float32", "float16", "bfloat16"])
def test_cupy_arrays_give_the_numpy_result(rng, dtype, upcast):
    """The reference runs on cupy arrays with cupy and agrees with itself on numpy arrays."""
    cp = pytest.importorskip("cupy")
    q, k, v = qkv(rng, 2, 37, 70, 2, 32, dtype=dtype)
    dout = randn(rng, *q.shape, dtype=dtype)
    on_cpu = reference.attention(q, k, v, causal=True, upcast=upcast) + \
        reference.attention_backward(dout, q, k, v, causal=True, upcast=upcast)
    gq, gk, gv, gdout = (cp.asarray(x) for x in (q, k, v, dout))
    on_gpu = reference.attention(gq, gk, gv, causal=True, upcast=upcast) + \
        reference.attention_backward(gdout, gq, gk, gv, causal=True, upcast=upcast)
    eps = float(ml_dtypes.finfo(FLOAT64 if upcast else dtype).eps)
    for name, c, g in zip(("out", "lse", "dq", "dk", "dv"), on_cpu, on_gpu):
        assert isinstance(g, cp.ndarray), name
        assert g.dtype == c.dtype and g.shape == c.shape, name
        g = cp.asnumpy(g).astype(np.float64)
        c = c.astype(np.float64)
        np.testing.assert_array_equal(np.isneginf(g), np.isneginf(c))
        finite = np.isfinite(c)
        # The two libraries may round differently (summation order, exp; a 16-bit score that
        # lands one unit apart): some units of the precision rounded to, at the values' size.
        tol = (64 if upcast else 32) * eps * max(1.0, float(np.max(np.abs(c[finite]))))
        np.testing.assert_allclose(g[finite], c[finite], rtol=0, atol=tol,
                                   err_msg=f"{name}: {error_report(g[finite], c[finite])}")


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_input_precision_error_matches_pytorch_naive_attention(rng, dtype_name, causal):
    """upcast=False is the yardstick of the 2x rule: its error against float64 is that of
    flash-attn's PyTorch ``attention_ref(upcast=False)`` on the GPU, within a factor of 3
    (measured on an H200: factors 0.72 to 1.33)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA device")
    dtype = FLOAT16 if dtype_name == "float16" else BFLOAT16
    seqlen_q, seqlen_k, head_dim = 257, 513, 64
    q, k, v = qkv(rng, 2, seqlen_q, seqlen_k, 4, head_dim, dtype=dtype)
    dout = randn(rng, *q.shape, dtype=dtype)
    exact = (reference.attention(q, k, v, causal=causal)[0],) + \
        reference.attention_backward(dout, q, k, v, causal=causal)
    ours = (reference.attention(q, k, v, causal=causal, upcast=False)[0],) + \
        reference.attention_backward(dout, q, k, v, causal=causal, upcast=False)

    tq, tk, tv, tdout = (torch.tensor(x.astype(np.float32), device="cuda")
                         .to(getattr(torch, dtype_name)).requires_grad_() for x in (q, k, v, dout))
    scores = torch.einsum("bthd,bshd->bhts", tq / math.sqrt(head_dim), tk)
    if causal:
        visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device="cuda").tril(seqlen_k - seqlen_q)
        scores = scores.masked_fill(~visible, float("-inf"))
    out = torch.einsum("bhts,bshd->bthd", torch.softmax(scores, dim=-1).to(tv.dtype), tv)
    out.backward(tdout)
    theirs = [x.detach().float().cpu().numpy() for x in (out, tq.grad, tk.grad, tv.grad)]

    for name, a, b, e in zip(("out", "dq", "dk", "dv"), ours, theirs, exact):
        err_ours = float(np.max(np.abs(a.astype(np.float64) - e)))
        err_torch = float(np.max(np.abs(b.astype(np.float64) - e)))
        assert err_torch / 3 <= err_ours <= 3 * err_torch, \
            f"{name}: reference(upcast=False) error {err_ours:.2e}, PyTorch naive {err_torch:.2e}"
