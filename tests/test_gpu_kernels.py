"""The CUDA kernels, specified against a float64 reference on fresh random inputs.

Every output buffer is poisoned with NaN before the launch (so an element the kernel
forgets to write fails the test), and every error bound follows flash-attn's rule: at
most twice the error of naive attention computed in the same input precision, plus a
small absolute tolerance.
"""
import numpy as np
import pytest

import cupyflash
from cupyflash import reference
from cupyflash._dtypes import BFLOAT16, FLOAT16, FLOAT32

from conftest import error_report

pytestmark = pytest.mark.gpu

ATOL = {FLOAT16: 2e-3, BFLOAT16: 1e-2, FLOAT32: 1e-5}
DTYPES = [FLOAT16, BFLOAT16, FLOAT32]


def _cp():
    import cupy
    return cupy


def randn(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def to_gpu(x):
    return _cp().asarray(x)


def to_host64(x):
    x = _cp().asnumpy(x) if not isinstance(x, np.ndarray) else x
    return x.astype(np.float64)


def nan_like(shape, dtype):
    """A device buffer full of NaN, to catch elements a kernel never writes."""
    return to_gpu(np.full(shape, np.nan, dtype=dtype))


def assert_within(name, got, want, naive, dtype, factor=2.0, scale=1.0, slack=0.0):
    """|got - want| <= factor * max|naive - want| + scale * atol + slack, elementwise max; NaN never passes."""
    got, want, naive = to_host64(got), to_host64(want), to_host64(naive)
    finite = np.isfinite(want)
    assert np.array_equal(np.isfinite(got), finite), f"{name}: non-finite pattern differs: {error_report(got, want)}"
    assert not np.isnan(got).any(), f"{name}: NaN in output (unwritten or bad arithmetic): {error_report(got, want)}"
    g, w, n = got[finite], want[finite], naive[finite]
    if g.size == 0:
        assert np.array_equal(got, want), f"{name}: {error_report(got, want)}"
        return
    err = np.abs(g - w).max()
    bound = factor * np.abs(n - w).max() + scale * ATOL[np.dtype(dtype)] + slack
    assert err <= bound, f"{name}: max err {err:.3e} > bound {bound:.3e}; {error_report(got, want)}"


def run_forward(q, k, v, causal, scale=None):
    B, Sq, H, D = q.shape
    out = nan_like(q.shape, q.dtype)
    lse = nan_like((B, H, Sq), np.float32)
    o, l = cupyflash.flash_attention(to_gpu(q), to_gpu(k), to_gpu(v), causal=causal, softmax_scale=scale,
                                     return_lse=True, out=out, lse=lse)
    assert o is out and l is lse
    return o, l


def check_forward(rng, dtype, B, Sq, Sk, H, D, causal, scale=None):
    q, k, v = (randn(rng, (B, S, H, D), dtype) for S in (Sq, Sk, Sk))
    o, l = run_forward(q, k, v, causal, scale)
    ref_o, ref_l = reference.attention(q, k, v, causal=causal, softmax_scale=scale, upcast=True)
    naive_o, naive_l = reference.attention(q, k, v, causal=causal, softmax_scale=scale, upcast=False)
    tag = f"{np.dtype(dtype).name if dtype != BFLOAT16 else 'bf16'} B{B} Sq{Sq} Sk{Sk} H{H} D{D} causal={causal}"
    assert_within(f"out [{tag}]", o, ref_o, naive_o, dtype)
    assert_within(f"lse [{tag}]", l, ref_l, naive_l, FLOAT32 if dtype == FLOAT32 else dtype)
    return q, k, v, o, l


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("D", [8, 40, 64, 96, 128, 160, 192, 200, 256])
def test_forward_every_head_dim(rng, dtype, D):
    check_forward(rng, dtype, 2, 113, 257, 3, D, causal=False)
    check_forward(rng, dtype, 1, 257, 113, 2, D, causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("Sq,Sk", [(1, 1), (7, 7), (1, 1023), (1023, 1), (113, 113), (257, 1023), (1023, 257), (1023, 1023)])
@pytest.mark.parametrize("causal", [False, True])
def test_forward_odd_lengths(rng, dtype, Sq, Sk, causal):
    check_forward(rng, dtype, 1, Sq, Sk, 2, 64, causal)


def test_forward_custom_scale_and_large_scores(rng):
    check_forward(rng, FLOAT16, 1, 300, 300, 2, 64, causal=False, scale=0.9)
    check_forward(rng, BFLOAT16, 1, 300, 300, 2, 128, causal=True, scale=0.02)


def test_fully_masked_rows_give_zero_and_minus_inf(rng):
    # causal with Sq > Sk: query i sees keys j <= i - (Sq - Sk); the first Sq - Sk rows see nothing
    q, k, v = (randn(rng, (1, S, 2, 64), BFLOAT16) for S in (200, 50, 50))
    o, l = run_forward(q, k, v, causal=True)
    o, l = to_host64(o), to_host64(l)
    assert np.all(o[:, :150] == 0), error_report(o[:, :150], np.zeros_like(o[:, :150]))
    assert np.all(np.isneginf(l[:, :, :150]))
    assert np.isfinite(o[:, 150:]).all() and np.isfinite(l[:, :, 150:]).all()


def backward_inputs(rng, dtype, B, Sq, Sk, H, D):
    q, k, v = (randn(rng, (B, S, H, D), dtype) for S in (Sq, Sk, Sk))
    dout = randn(rng, (B, Sq, H, D), dtype)
    return q, k, v, dout


def run_backward(dout, q, k, v, o, l, causal, **kw):
    """flash_attention_backward into NaN-poisoned gradient buffers."""
    grads = [nan_like(x.shape, q.dtype) for x in (q, k, v)]
    return cupyflash.flash_attention_backward(to_gpu(dout), to_gpu(q), to_gpu(k), to_gpu(v), o, l, causal=causal,
                                              dq=grads[0], dk=grads[1], dv=grads[2], **kw)


def check_backward(rng, dtype, B, Sq, Sk, H, D, causal, **kw):
    q, k, v, dout = backward_inputs(rng, dtype, B, Sq, Sk, H, D)
    o, l = run_forward(q, k, v, causal)
    dq, dk, dv = run_backward(dout, q, k, v, o, l, causal, **kw)
    ref = reference.attention_backward(dout, q, k, v, causal=causal, upcast=True)
    naive = reference.attention_backward(dout, q, k, v, causal=causal, upcast=False)
    tag = f"B{B} Sq{Sq} Sk{Sk} H{H} D{D} causal={causal} {kw or ''}"
    for name, got, want, nv in zip(("dq", "dk", "dv"), (dq, dk, dv), ref, naive):
        assert_within(f"{name} [{tag}]", got, want, nv, dtype)
    return (dout, q, k, v, o, l), (dq, dk, dv)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("D", [8, 64, 96, 128, 160, 192, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_backward_every_head_dim(rng, dtype, D, causal):
    check_backward(rng, dtype, 2, 113, 257, 2, D, causal)


@pytest.mark.parametrize("dtype", [FLOAT16, BFLOAT16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("Sq,Sk", [(1, 1), (7, 7), (1, 300), (300, 1), (257, 1023), (1023, 257), (1023, 1023)])
@pytest.mark.parametrize("causal", [False, True])
def test_backward_odd_lengths(rng, dtype, Sq, Sk, causal):
    check_backward(rng, dtype, 1, Sq, Sk, 2, 64, causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("D", [40, 64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_deterministic_backward_is_accurate_and_bitwise_reproducible(rng, dtype, D, causal):
    """deterministic=True: the same bounds as the default, and every byte the same on every run
    (dQ sums 16 key tiles here, the case where atomic adds would reorder)."""
    inputs, first = check_backward(rng, dtype, 2, 257, 1023, 2, D, causal, deterministic=True)
    for run in range(3):
        again = run_backward(*inputs, causal, deterministic=True)
        for name, a, b in zip(("dq", "dk", "dv"), first, again):
            a, b = _cp().asnumpy(a), _cp().asnumpy(b)
            assert a.tobytes() == b.tobytes(), f"{name}, run {run + 2}: not bitwise equal: {error_report(b, a)}"


@pytest.mark.parametrize("dtype", [FLOAT16, BFLOAT16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("Sq,Sk", [(1, 1), (1, 300), (300, 1), (1023, 257), (1023, 1023)])
@pytest.mark.parametrize("causal", [False, True])
def test_deterministic_backward_odd_lengths(rng, dtype, Sq, Sk, causal):
    check_backward(rng, dtype, 1, Sq, Sk, 2, 64, causal, deterministic=True)


def test_deterministic_backward_with_a_workspace_and_strided_inputs(rng):
    cp = _cp()
    B, H, S, D = 2, 3, 200, 64
    q, k, v, dout = (to_gpu(randn(rng, (B, H, S, D), BFLOAT16)).transpose(0, 2, 1, 3) for _ in range(4))
    o, l = cupyflash.flash_attention(q, k, v, causal=True, return_lse=True)
    ws = cupyflash.backward_workspace(q)
    g = cupyflash.flash_attention_backward(dout, q, k, v, o, l, causal=True, deterministic=True, workspace=ws)
    g2 = cupyflash.flash_attention_backward(*(cp.ascontiguousarray(x) for x in (dout, q, k, v)), o, l, causal=True,
                                            deterministic=True)
    for name, a, b in zip(("dq", "dk", "dv"), g, g2):
        assert cp.asnumpy(a).tobytes() == cp.asnumpy(b).tobytes(), f"{name}: {error_report(to_host64(a), to_host64(b))}"


def test_strided_inputs_run_without_copy(rng):
    """(B, H, S, D) arrays viewed as (B, S, H, D) run in place, outputs match the contiguous run."""
    cp = _cp()
    B, H, S, D = 2, 3, 200, 64
    qh, kh, vh = (randn(rng, (B, H, S, D), BFLOAT16) for _ in range(3))
    q, k, v = (to_gpu(x).transpose(0, 2, 1, 3) for x in (qh, kh, vh))
    assert not q.flags.c_contiguous
    o, l = cupyflash.flash_attention(q, k, v, causal=True, return_lse=True)
    o2, l2 = cupyflash.flash_attention(*(cp.ascontiguousarray(x) for x in (q, k, v)), causal=True, return_lse=True)
    assert np.array_equal(to_host64(o), to_host64(o2)) and np.array_equal(to_host64(l), to_host64(l2))
    ref_o, _ = reference.attention(*(x.transpose(0, 2, 1, 3) for x in (qh, kh, vh)), causal=True)
    naive_o, _ = reference.attention(*(x.transpose(0, 2, 1, 3) for x in (qh, kh, vh)), causal=True, upcast=False)
    assert_within("strided out", o, ref_o, naive_o, BFLOAT16)
    dout = to_gpu(randn(rng, (B, H, S, D), BFLOAT16)).transpose(0, 2, 1, 3)
    g = cupyflash.flash_attention_backward(dout, q, k, v, o, l, causal=True)
    g2 = cupyflash.flash_attention_backward(cp.ascontiguousarray(dout), *(cp.ascontiguousarray(x) for x in (q, k, v)),
                                            o2, l2, causal=True)
    for a, b in zip(g, g2):
        assert np.array_equal(to_host64(a), to_host64(b))


def test_strided_output_buffer(rng):
    cp = _cp()
    q, k, v = (to_gpu(randn(rng, (1, 100, 2, 64), FLOAT16)) for _ in range(3))
    big = cp.full((1, 2, 100, 64), np.nan, dtype=FLOAT16)
    out = big.transpose(0, 2, 1, 3)
    o = cupyflash.flash_attention(q, k, v, out=out)
    assert o is out
    assert np.array_equal(to_host64(o), to_host64(cupyflash.flash_attention(q, k, v)))


def test_forward_is_deterministic(rng):
    q, k, v = (to_gpu(randn(rng, (2, 777, 4, 128), BFLOAT16)) for _ in range(3))
    a = to_host64(cupyflash.flash_attention(q, k, v, causal=True))
    b = to_host64(cupyflash.flash_attention(q, k, v, causal=True))
    assert np.array_equal(a, b)


def test_nan_input_propagates(rng):
    q, k, v = (randn(rng, (1, 64, 1, 64), FLOAT16) for _ in range(3))
    q[0, 5, 0, 3] = np.nan
    o = to_host64(cupyflash.flash_attention(to_gpu(q), to_gpu(k), to_gpu(v)))
    assert np.isnan(o[0, 5]).all() and np.isfinite(np.delete(o, 5, axis=1)).all()


def test_empty_batch_and_lengths():
    cp = _cp()
    for shape_q, shape_k in [((0, 5, 2, 64), (0, 5, 2, 64)), ((1, 0, 2, 64), (1, 5, 2, 64))]:
        q = cp.ones(shape_q, dtype=FLOAT16)
        k = v = cp.ones(shape_k, dtype=FLOAT16)
        o, l = cupyflash.flash_attention(q, k, v, return_lse=True)
        assert o.shape == shape_q and l.shape == (shape_q[0], 2, shape_q[1])


class PeakHook:
    """Tracks the peak of device memory allocated through CuPy while active."""

    def __new__(cls):
        cp = _cp()

        class _Hook(cp.cuda.MemoryHook):
            name = "cupyflash-test-peak"

            def __init__(self):
                self.current = self.peak = 0

            def malloc_postprocess(self, device_id, size, mem_size, mem_ptr, pmem_id):
                self.current += mem_size
                self.peak = max(self.peak, self.current)

            def free_postprocess(self, device_id, mem_size, mem_ptr, pmem_id):
                self.current -= mem_size

        return _Hook()


def test_memory_is_linear_in_seqlen(rng):
    """At Sq = Sk = 32768 forward + backward allocate O(S) extra memory: no S x S buffer."""
    cp = _cp()
    B, S, H, D = 1, 32768, 2, 64
    q, k, v, dout = (to_gpu(randn(rng, (B, S, H, D), BFLOAT16)) for _ in range(4))
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    hook = PeakHook()
    with hook:
        o, l = cupyflash.flash_attention(q, k, v, causal=True, return_lse=True)
        dq, dk, dv = cupyflash.flash_attention_backward(dout, q, k, v, o, l, causal=True)
        cp.cuda.get_current_stream().synchronize()
    one_input = q.nbytes
    s_by_s = B * H * S * S * 2
    # out, lse, dq, dk, dv, D and the fp32 dQ accumulator: about 8 inputs' worth
    assert hook.peak <= 10 * one_input, f"peak extra {hook.peak / 2**20:.1f} MiB > 10 x input ({one_input / 2**20:.1f} MiB)"
    assert hook.peak * 50 < s_by_s, "one S x S score matrix alone would be 50x this peak"
    assert np.isfinite(to_host64(dq)).all()


def _hopper_gpu():
    import cupy
    return int(cupy.cuda.Device().compute_capability) == 90


@pytest.mark.parametrize("dtype", [FLOAT16, BFLOAT16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("D,block_n", [(40, 192), (64, 192), (64, 128), (96, 128), (128, 112), (128, 128), (160, 64),
                                       (192, 64), (256, 32), (256, 48)])
@pytest.mark.parametrize("Sq,Sk", [(113, 1023), (1023, 257), (1, 70), (700, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_hopper_forward_every_tile(rng, dtype, D, block_n, Sq, Sk, causal):
    """The wgmma forward meets the same bounds with every tile; rows past the sequence and
    head_dim columns past D (40, 96, 160 run as 64, 128, 192) arrive from TMA as zeros."""
    if not _hopper_gpu():
        pytest.skip("the wgmma forward needs compute capability 9.0")
    from cupyflash import _config, _cuda_backend
    q, k, v = (randn(rng, (2, S, 2, D), dtype) for S in (Sq, Sk, Sk))
    out, lse = nan_like(q.shape, dtype), nan_like((2, 2, Sq), np.float32)
    o, l = _cuda_backend.forward(to_gpu(q), to_gpu(k), to_gpu(v), causal=causal, scale=D ** -0.5, out=out, lse=lse,
                                 fwd_config=_config.Sm90FwdConfig(block_n, 2))
    ref_o, ref_l = reference.attention(q, k, v, causal=causal, upcast=True)
    naive_o, naive_l = reference.attention(q, k, v, causal=causal, upcast=False)
    tag = f"wgmma fwd D={D} BLOCK_N={block_n} Sq{Sq} Sk{Sk} causal={causal}"
    assert_within(f"out [{tag}]", o, ref_o, naive_o, dtype)
    assert_within(f"lse [{tag}]", l, ref_l, naive_l, dtype)


@pytest.mark.parametrize("dtype", [FLOAT16, BFLOAT16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("block_m,block_n,num_warps", [(128, 64, 4), (64, 64, 4), (128, 64, 8), (64, 128, 4),
                                                       (128, 128, 8), (64, 32, 2)])
@pytest.mark.parametrize("Sq,Sk", [(128, 128), (256, 256), (113, 70), (1, 128)])
@pytest.mark.parametrize("causal", [False, True])
def test_mma_forward_short_key_tiles(rng, dtype, block_m, block_n, num_warps, Sq, Sk, causal):
    """The mma.sync forward tiles that short keys may run (bench/tune.py --short) meet the bounds."""
    from cupyflash import _config, _cuda_backend
    q, k, v = (randn(rng, (3, S, 2, 64), dtype) for S in (Sq, Sk, Sk))
    out, lse = nan_like(q.shape, dtype), nan_like((3, 2, Sq), np.float32)
    o, l = _cuda_backend.forward(to_gpu(q), to_gpu(k), to_gpu(v), causal=causal, scale=0.125, out=out, lse=lse,
                                 fwd_config=_config.FwdConfig(block_m, block_n, num_warps))
    ref_o, ref_l = reference.attention(q, k, v, causal=causal, upcast=True)
    naive_o, naive_l = reference.attention(q, k, v, causal=causal, upcast=False)
    tag = f"mma fwd {block_m}x{block_n} warps={num_warps} Sq{Sq} Sk{Sk} causal={causal}"
    assert_within(f"out [{tag}]", o, ref_o, naive_o, dtype)
    assert_within(f"lse [{tag}]", l, ref_l, naive_l, dtype)


def test_hopper_kernels_read_strided_views_in_place_and_copy_reversed_ones(rng):
    """TMA reads (B, H, S, D) arrays viewed as (B, S, H, D) where they are; a view with a
    negative stride (which a tensor map cannot describe) is copied first. Same bits either way,
    forward and backward."""
    if not _hopper_gpu():
        pytest.skip("the wgmma kernels need compute capability 9.0")
    cp = _cp()
    B, H, S, D = 2, 3, 700, 128
    q, k, v, dout = (to_gpu(randn(rng, (B, H, S, D), BFLOAT16)).transpose(0, 2, 1, 3) for _ in range(4))
    for name, views in (("transposed", (q, k, v, dout)), ("reversed", tuple(x[:, ::-1] for x in (q, k, v, dout)))):
        copies = tuple(cp.ascontiguousarray(x) for x in views)
        o, l = cupyflash.flash_attention(*views[:3], causal=True, return_lse=True)
        o2, l2 = cupyflash.flash_attention(*copies[:3], causal=True, return_lse=True)
        grads = cupyflash.flash_attention_backward(views[3], *views[:3], o, l, causal=True)
        grads2 = cupyflash.flash_attention_backward(copies[3], *copies[:3], o2, l2, causal=True)
        for what, a, b in zip(("out", "dq", "dk", "dv"), (o, *grads), (o2, *grads2)):
            assert cp.asnumpy(a).tobytes() == cp.asnumpy(b).tobytes(), f"{name} {what}: {error_report(to_host64(a), to_host64(b))}"


@pytest.mark.parametrize("dtype", [FLOAT16, BFLOAT16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("D,num_wg,dq_split,block_m", [(64, 1, "keys", 64), (64, 2, "keys", 64), (64, 2, "panel", 128),
                                                        (40, 2, "panel", 128), (128, 2, "keys", 64), (128, 2, "panel", 64),
                                                        (96, 2, "panel", 64)])
@pytest.mark.parametrize("Sq,Sk", [(113, 257), (257, 113), (1023, 1023), (1, 70)])
@pytest.mark.parametrize("causal", [False, True])
def test_hopper_backward_every_tile(rng, dtype, D, num_wg, dq_split, block_m, Sq, Sk, causal):
    """The wgmma backward with one and two consumer warpgroups and every way of splitting dQ
    among them meets the same bounds (D=40 and 96 run as 64 and 128: the padded columns arrive
    from TMA as zeros)."""
    if not _hopper_gpu():
        pytest.skip("the wgmma backward needs compute capability 9.0")
    from cupyflash import _config, _cuda_backend
    q, k, v, dout = backward_inputs(rng, dtype, 2, Sq, Sk, 2, D)
    o, l = run_forward(q, k, v, causal)
    grads = [nan_like(x.shape, dtype) for x in (q, k, v)]
    dq, dk, dv = _cuda_backend.backward(to_gpu(dout), to_gpu(q), to_gpu(k), to_gpu(v), o, l, causal=causal,
                                        scale=D ** -0.5, dq=grads[0], dk=grads[1], dv=grads[2],
                                        bwd_config=_config.Sm90BwdConfig(num_wg, dq_split, block_m))
    ref = reference.attention_backward(dout, q, k, v, causal=causal, upcast=True)
    naive = reference.attention_backward(dout, q, k, v, causal=causal, upcast=False)
    tag = f"wgmma bwd D={D} num_wg={num_wg} dQ by {dq_split} BLOCK_M={block_m} Sq{Sq} Sk{Sk} causal={causal}"
    for name, got, want, nv in zip(("dq", "dk", "dv"), (dq, dk, dv), ref, naive):
        assert_within(f"{name} [{tag}]", got, want, nv, dtype)
