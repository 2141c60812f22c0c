"""The autodiff tape: every op's gradient against central finite differences, the tape's
rules (accumulation, no_grad, errors), checkpoint's memory saving, and the optimizers.

Each gradient check runs on float64 numpy arrays (CI) and on float64 cupy arrays under the
``gpu`` marker. flash_attention runs in float64 only on the CPU; on the GPU its float32
gradients are compared with the float64 CPU ones (themselves checked against finite
differences) and with the materialised-attention op.
"""
import gc
import tracemalloc

import numpy as np
import pytest

from conftest import error_report
from cupyflash import autodiff as ad
from cupyflash.optim import SGD, AdamW, clip_grad_norm


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request):
    if request.param == "numpy":
        return np
    import cupy
    return cupy


def to_host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def check_grads(xp, fn, *arrays, wrt=None, eps=1e-6, atol=1e-6, rtol=1e-5, seed=0):
    """Compare the tape's gradients of ``fn`` with central finite differences.

    ``arrays`` are host float64 (or integer) arrays, moved to ``xp``. The objective is
    ``sum(fn(*inputs) * R)`` with a fixed random R, seeded into backward as its gradient,
    so every output element's gradient is exercised.
    """
    wrt = [i for i, a in enumerate(arrays) if np.asarray(a).dtype.kind == "f"] if wrt is None else wrt
    dev = [xp.asarray(a) for a in arrays]
    inputs = [ad.Tensor(a, requires_grad=(i in wrt)) for i, a in enumerate(dev)]
    out = fn(*inputs)
    R = np.random.default_rng(seed).standard_normal(out.shape)
    out.backward(xp.asarray(R))

    def objective(values):
        with ad.no_grad():
            y = fn(*[ad.Tensor(v) for v in values])
        return float(np.sum(to_host(y.data) * R))

    for i in wrt:
        base = np.array(arrays[i], dtype=np.float64)
        numeric = np.zeros_like(base)
        for j in np.ndindex(base.shape):
            values = list(dev)
            for sign in (1, -1):
                moved = base.copy()
                moved[j] += sign * eps
                values[i] = xp.asarray(moved)
                numeric[j] += sign * objective(values) / (2 * eps)
        analytic = to_host(inputs[i].grad)
        assert analytic.shape == base.shape
        assert np.allclose(analytic, numeric, atol=atol, rtol=rtol), \
            f"d/d(input {i}) of {getattr(fn, '__name__', fn)}: " + error_report(analytic, numeric)


def randn(rng, *shape):
    return rng.standard_normal(shape)


def away_from_zero(rng, *shape):
    """Values with |x| >= 0.2, so kinks (relu) stay out of the finite-difference stencil."""
    x = rng.uniform(0.2, 1.5, shape)
    return x * rng.choice([-1.0, 1.0], shape)


# ----------------------------------------------------------------------------- arithmetic

BROADCAST_SHAPES = [((3, 4), (3, 4)), ((3, 1, 4), (2, 4)), ((4,), (2, 3, 4)), ((2, 1), (1, 3)), ((), (2, 3))]


@pytest.mark.parametrize("op", [ad.add, ad.subtract, ad.multiply, ad.divide])
@pytest.mark.parametrize("shapes", BROADCAST_SHAPES, ids=str)
def test_binary_op_gradients_with_broadcasting(xp, rng, op, shapes):
    a = randn(rng, *shapes[0])
    b = rng.uniform(0.5, 2.0, shapes[1]) * rng.choice([-1.0, 1.0], shapes[1])  # no division by ~0
    check_grads(xp, op, a, b)


def test_operators_with_scalars_and_arrays_on_either_side(xp, rng):
    a, c = randn(rng, 2, 3), rng.uniform(0.5, 2.0, (3,))
    check_grads(xp, lambda x: 2.0 - x * 3.0 + 1.5 / (x * x + 1.0) - (x / 4.0), a)
    check_grads(xp, lambda x: -(xp.asarray(c) * x) + xp.asarray(c) / (1.0 + x * x), a)
    check_grads(xp, lambda x: (x - xp.asarray(c)) * (xp.asarray(c) - x), a)


def test_negative(xp, rng):
    check_grads(xp, ad.negative, randn(rng, 3, 2))


def test_power_gradients(xp, rng):
    a = rng.uniform(0.5, 2.0, (3, 4))
    b = rng.uniform(-1.5, 2.5, (4,))
    check_grads(xp, lambda x: x ** 3.0, randn(rng, 3, 4))
    check_grads(xp, lambda x: x ** 0.5, a)
    check_grads(xp, ad.power, a, b)
    check_grads(xp, lambda y: 2.0 ** y, b)


MATMUL_SHAPES = [((3, 4), (4, 5)), ((2, 3, 4), (2, 4, 5)), ((2, 1, 3, 4), (5, 4, 2)), ((4,), (4, 5)),
                 ((3, 4), (4,)), ((4,), (4,)), ((2, 3, 4), (4,)), ((4,), (2, 4, 3))]


@pytest.mark.parametrize("shapes", MATMUL_SHAPES, ids=str)
def test_matmul_gradients_batched_and_broadcast(xp, rng, shapes):
    check_grads(xp, ad.matmul, randn(rng, *shapes[0]), randn(rng, *shapes[1]))


def test_matmul_operator_with_a_constant_operand(xp, rng):
    w = randn(rng, 4, 3)
    check_grads(xp, lambda x: x @ xp.asarray(w), randn(rng, 2, 4))
    check_grads(xp, lambda x: xp.asarray(w) @ x, randn(rng, 3, 2))


# ----------------------------------------------------------------------------- reductions, shapes

@pytest.mark.parametrize("axis", [None, 0, -1, (0, 2), (1,)])
@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("op", [ad.sum, ad.mean])
def test_reduction_gradients(xp, rng, op, axis, keepdims):
    check_grads(xp, lambda x: op(x, axis=axis, keepdims=keepdims), randn(rng, 2, 3, 4))


def test_reshape_and_transpose_gradients(xp, rng):
    x = randn(rng, 2, 3, 4)
    check_grads(xp, lambda t: ad.reshape(t, (4, -1)) * 1.0, x)
    check_grads(xp, lambda t: t.reshape(6, 4) @ xp.ones((4, 2)), x)
    check_grads(xp, lambda t: ad.transpose(t, (1, 2, 0)), x)
    check_grads(xp, lambda t: t.transpose(), x)
    check_grads(xp, lambda t: t.T, x)


@pytest.mark.parametrize("index", [
    (slice(1, None), slice(None, None, 2)),
    (1,),
    (Ellipsis, 0),
    (np.array([0, 2, 2, 1]),),           # repeats accumulate
    (slice(None), np.array([3, 0, 3])),
    (np.array([[0, 1], [1, 1]]), np.array([[2, 2], [0, 3]])),
    (None, slice(0, 2)),
], ids=lambda i: str(i).replace(" ", ""))
def test_indexing_gradients(xp, rng, index):
    x = randn(rng, 3, 4)
    index = tuple(xp.asarray(i) if isinstance(i, np.ndarray) else i for i in index)
    check_grads(xp, lambda t: t[index], x)


def test_boolean_mask_indexing_gradient(xp, rng):
    x = randn(rng, 3, 4)
    mask = xp.asarray(x > 0.1)
    check_grads(xp, lambda t: t[mask], x)


def test_take_and_embedding_gradients(xp, rng):
    x = randn(rng, 5, 3)
    ids = xp.asarray(np.array([[1, 4, 1], [0, 1, 2]]))
    check_grads(xp, lambda t: ad.take(t, ids), x)
    check_grads(xp, lambda t: ad.take(t, ids, axis=0), x)
    check_grads(xp, lambda t: ad.take(t, xp.asarray(np.array([2, 0, 2])), axis=1), x)
    check_grads(xp, lambda t: ad.embedding(t, ids), x)


def test_embedding_lookup_sums_gradients_of_repeated_ids(xp):
    w = ad.Tensor(xp.zeros((4, 2)), requires_grad=True)
    ids = xp.asarray(np.array([3, 1, 3, 3]))
    ad.embedding(w, ids).sum().backward()
    assert to_host(w.grad).tolist() == [[0, 0], [1, 1], [0, 0], [3, 3]]


def test_concatenate_gradients_with_a_constant_part(xp, rng):
    a, b, c = randn(rng, 2, 3), randn(rng, 2, 1), randn(rng, 2, 2)
    check_grads(xp, lambda p, q, r: ad.concatenate([p, q, r], axis=1), a, b, c)
    check_grads(xp, lambda p: ad.concatenate([p, xp.asarray(c), p], axis=-1), a)
    check_grads(xp, lambda p, q: ad.concatenate([p, q], axis=0), a, randn(rng, 1, 3))


def test_astype_casts_the_gradient_back(xp, rng):
    x = ad.Tensor(xp.asarray(randn(rng, 3).astype(np.float32)), requires_grad=True)
    y = ad.astype(x, np.float64) * 2.0
    assert y.dtype == np.float64
    y.sum().backward()
    assert x.grad.dtype == np.float32 and np.allclose(to_host(x.grad), 2.0)


# ----------------------------------------------------------------------------- elementwise

@pytest.mark.parametrize("op", [ad.exp, ad.tanh, ad.gelu, ad.relu], ids=lambda f: f.__name__)
def test_unary_gradients(xp, rng, op):
    check_grads(xp, op, away_from_zero(rng, 3, 4))


def test_log_gradient(xp, rng):
    check_grads(xp, ad.log, rng.uniform(0.3, 3.0, (3, 4)))


def test_gelu_matches_its_formula(xp):
    x = np.linspace(-4, 4, 17)
    want = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    got = to_host(ad.gelu(xp.asarray(x)).data)
    assert np.allclose(got, want, rtol=1e-12), error_report(got, want)


@pytest.mark.parametrize("axis", [-1, 0, 1])
@pytest.mark.parametrize("op", [ad.softmax, ad.log_softmax], ids=lambda f: f.__name__)
def test_softmax_gradients(xp, rng, op, axis):
    check_grads(xp, lambda x: op(x, axis=axis), randn(rng, 3, 4, 5) * 3)


def test_softmax_is_stable_for_large_logits(xp):
    x = xp.asarray(np.array([[1000.0, 1001.0, 999.0]]))
    y = to_host(ad.softmax(x).data)
    want = np.exp([-1.0, 0.0, -2.0]) / np.exp([-1.0, 0.0, -2.0]).sum()
    assert np.allclose(y, want), error_report(y, want)
    assert np.allclose(to_host(ad.log_softmax(x).data), np.log(want))


# ----------------------------------------------------------------------------- normalisation

def test_layer_norm_gradients(xp, rng):
    x, w, b = randn(rng, 2, 3, 6), randn(rng, 6), randn(rng, 6)
    check_grads(xp, ad.layer_norm, x, w, b)
    check_grads(xp, lambda t: ad.layer_norm(t), x)
    check_grads(xp, lambda t, w: ad.layer_norm(t, w, eps=1e-3), x, w)


def test_layer_norm_normalises_the_last_axis(xp, rng):
    y = to_host(ad.layer_norm(xp.asarray(randn(rng, 4, 16) * 5 + 3), eps=0.0).data)
    assert np.allclose(y.mean(-1), 0, atol=1e-12) and np.allclose(y.var(-1), 1)


def test_rms_norm_gradients(xp, rng):
    x, w = randn(rng, 2, 3, 6), randn(rng, 6)
    check_grads(xp, ad.rms_norm, x, w)
    check_grads(xp, lambda t: ad.rms_norm(t), x)


def test_rms_norm_formula(xp, rng):
    x, w = randn(rng, 4, 8), randn(rng, 8)
    want = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * w
    got = to_host(ad.rms_norm(xp.asarray(x), xp.asarray(w)).data)
    assert np.allclose(got, want), error_report(got, want)


# ----------------------------------------------------------------------------- losses, dropout

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [None, -1])
def test_cross_entropy_gradients(xp, rng, reduction, ignore_index):
    logits = randn(rng, 2, 3, 5)
    targets = rng.integers(0, 5, (2, 3))
    if ignore_index is not None:
        targets[0, 1] = targets[1, 2] = ignore_index
    t = xp.asarray(targets)
    check_grads(xp, lambda x: ad.cross_entropy(x, t, reduction=reduction, ignore_index=ignore_index), logits)


def test_cross_entropy_value(xp, rng):
    logits, targets = randn(rng, 6, 4), rng.integers(0, 4, 6)
    lsm = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -lsm[np.arange(6), targets].mean()
    got = float(ad.cross_entropy(xp.asarray(logits), xp.asarray(targets)).item())
    assert abs(got - want) < 1e-12
    targets[:2] = -100
    want = -lsm[np.arange(2, 6), targets[2:]].mean()
    got = float(ad.cross_entropy(xp.asarray(logits), xp.asarray(targets), ignore_index=-100).item())
    assert abs(got - want) < 1e-12


def test_dropout_fixed_seed_gives_a_fixed_mask_and_its_gradient(xp, rng):
    x = away_from_zero(rng, 8, 16)
    y1 = to_host(ad.dropout(xp.asarray(x), 0.25, rng=7).data)
    y2 = to_host(ad.dropout(xp.asarray(x), 0.25, rng=7).data)
    assert np.array_equal(y1, y2)
    kept = y1 != 0
    assert 0.5 < kept.mean() < 0.95
    assert np.allclose(y1[kept], x[kept] / 0.75)
    check_grads(xp, lambda t: ad.dropout(t, 0.25, rng=7), x)


def test_dropout_identity_when_not_training_or_p_zero(xp, rng):
    x = ad.Tensor(xp.asarray(randn(rng, 3)), requires_grad=True)
    assert ad.dropout(x, 0.5, rng=1, training=False) is x
    assert ad.dropout(x, 0.0, rng=1) is x
    with pytest.raises(ValueError, match="p must be"):
        ad.dropout(x, 1.0, rng=1)
    with pytest.raises(TypeError, match="rng"):
        ad.dropout(x, 0.5, rng="seed")


# ----------------------------------------------------------------------------- attention

ATTENTION_CASES = [  # (batch, seqlen_q, seqlen_k, heads, head_dim, causal)
    (1, 5, 5, 2, 8, False),
    (1, 5, 5, 2, 8, True),
    (2, 3, 6, 1, 8, True),    # bottom-right causal, seqlen_q < seqlen_k
    (1, 6, 4, 1, 8, True),    # seqlen_q > seqlen_k: the first two rows see no key
    (1, 4, 7, 2, 16, False),
]


def qkv(rng, B, Sq, Sk, H, D):
    return randn(rng, B, Sq, H, D), randn(rng, B, Sk, H, D), randn(rng, B, Sk, H, D)


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=str)
@pytest.mark.parametrize("op", [ad.flash_attention, ad.naive_attention], ids=lambda f: f.__name__)
def test_attention_gradients_float64_cpu(rng, op, case):
    B, Sq, Sk, H, D, causal = case
    check_grads(np, lambda q, k, v: op(q, k, v, causal=causal, softmax_scale=0.4), *qkv(rng, B, Sq, Sk, H, D))


@pytest.mark.gpu
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=str)
def test_naive_attention_gradients_float64_gpu(rng, case):
    import cupy
    B, Sq, Sk, H, D, causal = case
    check_grads(cupy, lambda q, k, v: ad.naive_attention(q, k, v, causal=causal), *qkv(rng, B, Sq, Sk, H, D))


def attention_grads(op, arrays, causal, dout):
    q, k, v = (ad.Tensor(a, requires_grad=True) for a in arrays)
    out = op(q, k, v, causal=causal)
    out.backward(dout)
    return [to_host(out.data)] + [to_host(getattr(g, "data", g) if isinstance(g, ad.Tensor) else g)
                                  for g in (q.grad, k.grad, v.grad)]


@pytest.mark.parametrize("causal", [False, True])
def test_flash_and_naive_attention_ops_agree(rng, causal):
    arrays = qkv(rng, 2, 33, 47, 2, 16)
    dout = randn(rng, 2, 33, 2, 16)
    flash = attention_grads(ad.flash_attention, arrays, causal, dout)
    naive = attention_grads(ad.naive_attention, arrays, causal, dout)
    for name, f, n in zip(("out", "dq", "dk", "dv"), flash, naive):
        assert np.allclose(f, n, atol=1e-10), f"{name}: " + error_report(f, n)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attention_op_on_gpu_matches_float64_cpu(rng, causal):
    import cupy
    arrays = qkv(rng, 2, 70, 130, 2, 64)
    dout = randn(rng, 2, 70, 2, 64)
    want = attention_grads(ad.flash_attention, arrays, causal, dout)  # float64, FD-checked above
    dev = [cupy.asarray(a.astype(np.float32)) for a in arrays]
    got_flash = attention_grads(ad.flash_attention, dev, causal, cupy.asarray(dout.astype(np.float32)))
    got_naive = attention_grads(ad.naive_attention, dev, causal, cupy.asarray(dout.astype(np.float32)))
    for name, f, n, w in zip(("out", "dq", "dk", "dv"), got_flash, got_naive, want):
        scale = np.abs(w).max()
        assert np.allclose(f, w, atol=2e-3 * scale), f"flash {name}: " + error_report(f, w)
        assert np.allclose(n, w, atol=2e-3 * scale), f"naive {name}: " + error_report(n, w)


@pytest.mark.gpu
def test_flash_attention_op_deterministic_backward_is_bitwise_reproducible(rng):
    import cupy
    from functools import partial
    dev = [cupy.asarray(a.astype(np.float32)).astype(np.float16) for a in qkv(rng, 2, 300, 300, 2, 64)]
    dout = cupy.asarray(randn(rng, 2, 300, 2, 64)).astype(np.float16)
    op = partial(ad.flash_attention, deterministic=True)
    first, second = (attention_grads(op, dev, True, dout) for _ in range(2))
    for name, a, b in zip(("out", "dq", "dk", "dv"), first, second):
        assert a.tobytes() == b.tobytes(), f"{name}: " + error_report(b, a)


def test_flash_attention_op_checks_deterministic_at_the_call(rng):
    q, k, v = (ad.Tensor(a, requires_grad=True) for a in qkv(rng, 1, 4, 4, 1, 8))
    with pytest.raises(TypeError, match="^deterministic must be a bool, got int"):
        ad.flash_attention(q, k, v, deterministic=1)


def test_flash_attention_tape_saves_only_q_k_v_out_lse(rng):
    B, S, H, D = 1, 64, 2, 8
    q, k, v = (ad.Tensor(a, requires_grad=True) for a in qkv(rng, B, S, S, H, D))
    out = ad.flash_attention(q, k, v, causal=True)
    saved = out._node.saved
    assert [tuple(a.shape) for a in saved] == [(B, S, H, D)] * 4 + [(B, H, S)]
    expected = 4 * q.data.nbytes + B * H * S * 8
    assert ad.graph_nbytes(out, include_leaves=True) == expected
    naive = ad.naive_attention(q, k, v, causal=True)
    assert ad.graph_nbytes(naive, include_leaves=True) >= 3 * q.data.nbytes + B * H * S * S * 8


# ----------------------------------------------------------------------------- the tape

def test_a_leaf_used_twice_gets_the_sum(xp):
    x = ad.Tensor(xp.asarray([1.0, -2.0, 3.0]), requires_grad=True)
    (x * x + x).sum().backward()
    assert np.allclose(to_host(x.grad), 2 * np.array([1.0, -2.0, 3.0]) + 1)


def test_diamond_graph_replays_in_reverse_topological_order(xp):
    x = ad.Tensor(xp.asarray(0.7), requires_grad=True)
    a = ad.tanh(x)
    b, c = a * 2.0, ad.exp(a)
    (b * c + a).backward()
    t = np.tanh(0.7)
    want = (2 * np.exp(t) + 2 * t * np.exp(t) + 1) * (1 - t * t)
    assert abs(float(to_host(x.grad)) - want) < 1e-12


def test_gradients_accumulate_across_backward_calls_until_zeroed(xp):
    x = ad.Tensor(xp.asarray([1.0, 2.0]), requires_grad=True)
    (x * 3.0).sum().backward()
    (x * 3.0).sum().backward()
    assert np.allclose(to_host(x.grad), 6.0)
    x.zero_grad()
    (x * 3.0).sum().backward()
    assert np.allclose(to_host(x.grad), 3.0)


def test_only_tensors_that_require_grad_get_gradients(xp, rng):
    w = ad.Tensor(xp.asarray(randn(rng, 3, 2)), requires_grad=True)
    c = ad.Tensor(xp.asarray(randn(rng, 2, 3)))
    out = ad.matmul(c, w)
    assert out.requires_grad and not c.requires_grad
    assert out._node.saved[1] is None  # no gradient for c, so w's value need not be kept
    out.sum().backward()
    assert c.grad is None and w.grad is not None


def test_no_grad_records_nothing(xp):
    x = ad.Tensor(xp.asarray([1.0, 2.0]), requires_grad=True)
    with ad.no_grad():
        assert not ad.is_grad_enabled()
        y = (x * 2.0).sum()
        with ad.enable_grad():
            z = (x * 2.0).sum()
    assert ad.is_grad_enabled()
    assert not y.requires_grad and y.is_leaf
    assert z.requires_grad
    with pytest.raises(RuntimeError, match="not on the tape"):
        y.backward()


def test_no_grad_works_as_a_decorator(xp):
    @ad.no_grad()
    def f(t):
        return t * 2.0
    assert not f(ad.Tensor(xp.ones(2), requires_grad=True)).requires_grad


def test_backward_of_a_non_scalar_needs_a_seed(xp):
    x = ad.Tensor(xp.ones((2, 3)), requires_grad=True)
    y = x * 2.0
    with pytest.raises(ValueError, match=r"non-scalar tensor \(shape \(2, 3\)\) needs a seed"):
        y.backward()
    with pytest.raises(ValueError, match=r"grad has shape \(3, 2\) but the tensor has shape \(2, 3\)"):
        y.backward(xp.ones((3, 2)))
    with pytest.raises(TypeError, match="floating-point"):
        y.backward(xp.ones((2, 3), dtype=xp.int32))
    y.backward(xp.full((2, 3), 0.5))
    assert np.allclose(to_host(x.grad), 1.0)


def test_backward_of_a_constant_is_an_error(xp):
    with pytest.raises(RuntimeError, match="not on the tape"):
        ad.Tensor(xp.ones(())).backward()
    with pytest.raises(TypeError, match="floating-point"):
        ad.Tensor(xp.ones(3, dtype=xp.int64), requires_grad=True)


def test_grad_of_something_not_on_the_tape_is_an_error(xp):
    x = ad.Tensor(xp.ones(3), requires_grad=True)
    unrelated = ad.Tensor(xp.ones(3), requires_grad=True)
    constant = ad.Tensor(xp.ones(3))
    y = (x * 2.0).sum()
    with pytest.raises(ValueError, match=r"inputs\[1\] .* is not on the tape"):
        ad.grad(y, [x, unrelated])
    with pytest.raises(ValueError, match="not on the tape"):
        ad.grad(y, constant)


def test_grad_returns_gradients_without_touching_dot_grad(xp, rng):
    x = ad.Tensor(xp.asarray(randn(rng, 3)), requires_grad=True)
    h = ad.tanh(x)
    y = (h * h).sum()
    gx, gh = ad.grad(y, [x, h])
    hv = np.tanh(to_host(x.data))
    assert np.allclose(to_host(gh), 2 * hv)
    assert np.allclose(to_host(gx), 2 * hv * (1 - hv ** 2))
    assert x.grad is None


def test_the_tape_is_freed_after_backward_unless_retained(xp):
    x = ad.Tensor(xp.ones(3), requires_grad=True)
    y = ad.exp(x).sum()
    y.backward(retain_graph=True)
    y.backward()
    assert np.allclose(to_host(x.grad), 2 * np.e)
    with pytest.raises(RuntimeError, match="freed by an earlier backward"):
        y.backward()


def test_a_long_chain_does_not_hit_the_recursion_limit(xp):
    x = ad.Tensor(xp.asarray(1.0), requires_grad=True)
    y = x
    for _ in range(5000):
        y = y * 1.0001
    y.backward()
    assert abs(float(to_host(x.grad)) - 1.0001 ** 5000) < 1e-9


@pytest.mark.gpu
def test_mixing_numpy_and_cupy_is_a_type_error():
    import cupy
    x = ad.Tensor(cupy.ones(3), requires_grad=True)
    with pytest.raises(TypeError, match="numpy and cupy"):
        x + np.ones(3)
    with pytest.raises(TypeError, match="cupy array but the tensor holds a numpy"):
        ad.Tensor(np.ones(3), requires_grad=True).sum().backward(cupy.ones(()))


# ----------------------------------------------------------------------------- checkpoint

def make_mlp(xp, rng, width=64, hidden=256, depth=6):
    return [(ad.Tensor(xp.asarray(randn(rng, width, hidden) / width ** 0.5), requires_grad=True),
             ad.Tensor(xp.asarray(randn(rng, hidden, width) / hidden ** 0.5), requires_grad=True))
            for _ in range(depth)]


def mlp_block(x, w1, w2):
    return x + ad.gelu(ad.rms_norm(x) @ w1) @ w2


def mlp_forward(params, x, use_checkpoint):
    for w1, w2 in params:
        x = ad.checkpoint(mlp_block, x, w1, w2) if use_checkpoint else mlp_block(x, w1, w2)
    return ad.mean(x * x)


def params_grads(params):
    return [to_host(w.grad) for pair in params for w in pair]


def test_checkpoint_gives_the_same_gradients(xp, rng):
    params = make_mlp(xp, rng, width=8, hidden=16, depth=3)
    x0 = ad.Tensor(xp.asarray(randn(rng, 5, 8)), requires_grad=True)
    mlp_forward(params, x0, False).backward()
    want, want_x = params_grads(params), to_host(x0.grad)
    for pair in params:
        for w in pair:
            w.zero_grad()
    x0.zero_grad()
    loss = mlp_forward(params, x0, True)
    assert [n.op for n in ad._topological_order([loss._node]) if n.op == "checkpoint"] == ["checkpoint"] * 3
    loss.backward()
    for g, w in zip(params_grads(params) + [to_host(x0.grad)], want + [want_x]):
        assert np.allclose(g, w, rtol=1e-12, atol=1e-14), error_report(g, w)


def test_checkpoint_gradients_against_finite_differences(xp, rng):
    w = randn(rng, 4, 4)
    check_grads(xp, lambda x, w: ad.checkpoint(lambda a, b: ad.tanh(a @ b) * a, x, w), randn(rng, 3, 4), w)


def test_checkpoint_reaches_parameters_the_function_closes_over(xp, rng):
    """The arguments need no gradient; the closed-over weight does."""
    w = ad.Tensor(xp.asarray(randn(rng, 4, 4)), requires_grad=True)
    x = xp.asarray(randn(rng, 3, 4))
    out = ad.checkpoint(lambda a: ad.tanh(a @ w), x)
    assert out.requires_grad
    out.sum().backward()
    want = to_host(x).T @ (1 - np.tanh(to_host(x) @ to_host(w.data)) ** 2)
    assert np.allclose(to_host(w.grad), want), error_report(to_host(w.grad), want)


def test_nested_checkpoint_and_dropout_inside(xp, rng):
    w = ad.Tensor(xp.asarray(randn(rng, 4, 4)), requires_grad=True)
    x = ad.Tensor(xp.asarray(randn(rng, 3, 4)), requires_grad=True)

    def inner(a):
        return ad.dropout(ad.tanh(a @ w), 0.3, rng=11)

    def outer(a):
        return ad.checkpoint(inner, a) * 2.0

    ad.checkpoint(outer, x).sum().backward()
    want_w, want_x = to_host(w.grad), to_host(x.grad)
    w.zero_grad(), x.zero_grad()
    (inner(x) * 2.0).sum().backward()
    assert np.allclose(to_host(w.grad), want_w, rtol=1e-12) and np.allclose(to_host(x.grad), want_x, rtol=1e-12)


def test_checkpoint_under_no_grad_just_runs_fn(xp):
    x = ad.Tensor(xp.ones(3), requires_grad=True)
    with ad.no_grad():
        y = ad.checkpoint(lambda a: a * 2.0, x)
    assert not y.requires_grad


def test_checkpoint_reduces_memory_kept_for_backward_cpu(rng):
    """Measured two ways: the bytes the tape saves, and the bytes numpy really holds."""
    params = make_mlp(np, rng, width=64, hidden=256, depth=6)
    x0 = ad.Tensor(randn(rng, 128, 64), requires_grad=True)
    held, saved = {}, {}
    for use_checkpoint in (False, True):
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        loss = mlp_forward(params, x0, use_checkpoint)
        gc.collect()
        held[use_checkpoint] = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        saved[use_checkpoint] = ad.graph_nbytes(loss)
        loss.backward()
    activation = 128 * 64 * 8  # one block input
    # Without checkpoint each block saves rms_norm's output (the first matmul's input), gelu's
    # input and the second matmul's input (both hidden = 4 x width): 9 activations, plus the
    # loss's input. With checkpoint, only each block's input.
    assert saved[True] == 6 * activation, saved
    assert saved[False] >= 6 * 9 * activation, saved
    assert held[True] < 0.25 * held[False], f"bytes held between forward and backward: {held}"
    assert held[True] < 8 * activation + 2 ** 16, held


@pytest.mark.gpu
def test_checkpoint_reduces_memory_kept_for_backward_gpu(rng):
    import cupy
    pool = cupy.get_default_memory_pool()
    params = make_mlp(cupy, rng, width=256, hidden=1024, depth=6)
    x0 = ad.Tensor(cupy.asarray(randn(rng, 1024, 256).astype(np.float32)), requires_grad=True)
    for pair in params:
        for w in pair:
            w.data = w.data.astype(np.float32)
    held = {}
    for use_checkpoint in (False, True):
        cupy.cuda.Device().synchronize()
        before = pool.used_bytes()
        loss = mlp_forward(params, x0, use_checkpoint)
        cupy.cuda.Device().synchronize()
        held[use_checkpoint] = pool.used_bytes() - before
        loss.backward()
        del loss
    activation = 1024 * 256 * 4
    assert held[True] < 0.25 * held[False], f"pool bytes held between forward and backward: {held}"
    assert held[True] < 8 * activation, held


# ----------------------------------------------------------------------------- optimizers

def test_sgd_momentum_matches_the_update_rule(xp):
    p = ad.Tensor(xp.asarray([1.0, -2.0]), requires_grad=True)
    opt = SGD([p], lr=0.1, momentum=0.9)
    want, buf = np.array([1.0, -2.0]), None
    for _ in range(3):
        opt.zero_grad()
        (p * p).sum().backward()  # grad 2p
        g = 2 * want
        buf = g if buf is None else 0.9 * buf + g
        want = want - 0.1 * buf
        opt.step()
    assert np.allclose(to_host(p.data), want, rtol=1e-14)


def test_adamw_matches_the_update_rule(xp):
    p = ad.Tensor(xp.asarray([0.5, -1.5, 2.0]), requires_grad=True)
    opt = AdamW([p], lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    want = np.array([0.5, -1.5, 2.0])
    m = v = np.zeros(3)
    for t in range(1, 4):
        opt.zero_grad()
        (p * p * p).sum().backward()  # grad 3 p^2
        g = 3 * want ** 2
        want = want * (1 - 0.01 * 0.1)
        m, v = 0.9 * m + 0.1 * g, 0.99 * v + 0.01 * g * g
        want = want - 0.01 * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.99 ** t)) + 1e-8)
        opt.step()
    assert np.allclose(to_host(p.data), want, rtol=1e-12), error_report(to_host(p.data), want)


@pytest.mark.parametrize("make", [lambda ps: SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
                                  lambda ps: AdamW(ps, lr=0.05, weight_decay=0.0)], ids=["sgd", "adamw"])
def test_optimizers_fit_a_least_squares_problem(xp, rng, make):
    A, w_true = randn(rng, 32, 4), randn(rng, 4)
    b = A @ w_true
    w = ad.Tensor(xp.zeros(4), requires_grad=True)
    opt = make([w])
    for _ in range(400):
        opt.zero_grad()
        ad.mean((xp.asarray(A) @ w - xp.asarray(b)) ** 2.0).backward()
        opt.step()
    assert np.allclose(to_host(w.data), w_true, atol=1e-3), error_report(to_host(w.data), w_true)


def test_optimizer_argument_errors(xp):
    p = ad.Tensor(xp.ones(2), requires_grad=True)
    with pytest.raises(ValueError, match="requires_grad"):
        SGD([ad.Tensor(xp.ones(2))], lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        AdamW([p], lr=-1.0)
    with pytest.raises(ValueError, match="empty"):
        AdamW([], lr=1e-3)


def test_clip_grad_norm(xp):
    p = ad.Tensor(xp.ones(4), requires_grad=True)
    (p * 3.0).sum().backward()  # grad 3 everywhere, norm 6
    assert abs(clip_grad_norm([p], 1.5) - 6.0) < 1e-12
    assert np.allclose(to_host(p.grad), 0.75, rtol=1e-6)
