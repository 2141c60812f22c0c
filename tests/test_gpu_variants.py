"""The attention variants on the CUDA kernels (issue 14), held to the same cases as the NumPy
backend (tests/test_variants.py) and to the float64 reference with flash-attn's rule: at most
twice naive attention's error in the same precision (reference.py with upcast=False), plus a
small atol. Outputs are poisoned with NaN first. As specifications:

- every variant, alone and mixed, forward and backward (dsinks included), on the Hopper wgmma
  kernels (16-bit, head_dim 64/128), the mma.sync kernels (other head dims, short keys) and the
  fp32 kernels; deterministic=True too (bitwise-equal on a second run);
- grouped-query ratios 1/2/4/8 and multi-query, odd lengths, seqlen_q != seqlen_k both ways;
- rows that see no key: out = 0, lse = -inf (the sink logit with sinks), gradients 0;
- a sliding window never reads the key or query tiles outside its band (NaN there changes nothing);
- out=/workspace=/dsinks= buffers and CUDA-graph capture.
"""
import numpy as np
import pytest

import cupyflash
from cupyflash import reference
from cupyflash._dtypes import BFLOAT16, FLOAT16, FLOAT32

from test_gpu_kernels import assert_within, nan_like, to_gpu, to_host64
from test_variants import BAND_CASES, CASES, _keywords, band_poisoned_inputs, check_band_poisoned

pytestmark = pytest.mark.gpu


def _inputs(rng, dtype, B, Sq, Sk, H, H_kv, D):
    q = rng.standard_normal((B, Sq, H, D)).astype(dtype)
    k, v = (rng.standard_normal((B, Sk, H_kv, D)).astype(dtype) for _ in range(2))
    dout = rng.standard_normal((B, Sq, H, D)).astype(dtype)
    return q, k, v, dout


def _gpu_kw(kw):
    """The keywords with their arrays (and aux's) on the GPU."""
    def gpu(x):
        return to_gpu(x) if isinstance(x, np.ndarray) else {n: gpu(a) for n, a in x.items()} if isinstance(x, dict) else x
    return {n: gpu(x) for n, x in kw.items()}


def _lse_slack(dtype, name, want, ref_lse) -> float:
    """What lse's own magnitude costs in fp32. Each rounding at |lse_i| (the forward's running max
    and its scaling, the final log-sum, the backward's log2 e) is eps/2 |lse_i|: in lse_i itself, and
    in every P_ij of the row, which the backward recomputes from lse_i, so the gradients move with
    it. Naive attention subtracts its row max and keeps no lse. With ALiBi a row far from every key
    has |lse| near 50-100 (its logits are -slope * distance), and there these roundings exceed 2x
    naive's error: lse off by 1.59e-5 against a bound of 1.39e-5 at |lse| 46, dq by 2.7e-5 and
    4.4e-5 against 1.1-1.3e-5 (1.1-1.7 eps |lse| |dq|; H200 and H100, sessions 8-9, bench/NOTES.md).
    The slack is 4 eps |lse| (times |grad| for a gradient). The half-precision bounds (flash-attn's
    2x rule) get none: their own rounding dwarfs this."""
    if np.dtype(dtype) != FLOAT32 or name == "dsinks":
        return 0.0
    eps = float(np.finfo(np.float32).eps)
    lse = np.abs(ref_lse[np.isfinite(ref_lse)])
    size = 1.0 if name == "lse" else float(np.abs(to_host64(want)).max())
    return 4 * eps * (float(lse.max()) if lse.size else 0.0) * size


def _scale(name, want) -> float:
    """dsinks sums one term per row (batch * seqlen_q of them): its atol is relative to its size."""
    return max(1.0, float(np.abs(to_host64(want)).max())) if name == "dsinks" else 1.0


def check_variant(rng, dtype, case, B, Sq, Sk, H, H_kv, D, backward=True, kw=None, **extra):
    """Forward (out, lse) and backward (dq, dk, dv, dsinks) of one variant case against float64
    (``kw``: the call's keywords, in place of the case's)."""
    q, k, v, dout = _inputs(rng, dtype, B, Sq, Sk, H, H_kv, D)
    kw = _keywords(rng, case, B, H) if kw is None else kw
    gkw = _gpu_kw(kw)
    tag = f"{case} {np.dtype(dtype).name if dtype != BFLOAT16 else 'bf16'} B{B} Sq{Sq} Sk{Sk} H{H}/{H_kv} D{D} {extra or ''}"
    out, lse = nan_like(q.shape, q.dtype), nan_like((B, H, Sq), np.float32)
    o, l = cupyflash.flash_attention(to_gpu(q), to_gpu(k), to_gpu(v), return_lse=True, out=out, lse=lse, **gkw)
    assert o is out and l is lse
    ref_o, ref_l = reference.attention(q, k, v, upcast=True, **kw)
    naive_o, naive_l = reference.attention(q, k, v, upcast=False, **kw)
    assert_within(f"out [{tag}]", o, ref_o, naive_o, dtype)
    assert_within(f"lse [{tag}]", l, ref_l, naive_l, FLOAT32 if dtype == FLOAT32 else dtype,
                  slack=_lse_slack(dtype, "lse", l, ref_l))
    if not backward:
        return
    grads = [nan_like(x.shape, q.dtype) for x in (q, k, v)]
    if "sinks" in kw:
        grads.append(nan_like((H,), np.float32))
    def backward(grads):
        return cupyflash.flash_attention_backward(to_gpu(dout), to_gpu(q), to_gpu(k), to_gpu(v), o, l, **gkw,
                                                  dq=grads[0], dk=grads[1], dv=grads[2],
                                                  dsinks=grads[3] if "sinks" in kw else None, **extra)
    got = backward(grads)
    assert all(g is b for g, b in zip(got, grads))
    if extra.get("deterministic"):  # bitwise the same on a second run
        again = backward([nan_like(g.shape, g.dtype) for g in grads])
        for name, g, a in zip(("dq", "dk", "dv", "dsinks"), got, again):
            assert np.array_equal(to_host64(g), to_host64(a)), f"{name} differs between two deterministic runs [{tag}]"
    ref = reference.attention_backward(dout, q, k, v, upcast=True, **kw)
    naive = reference.attention_backward(dout, q, k, v, upcast=False, **kw)
    for name, g, w, n in zip(("dq", "dk", "dv", "dsinks"), got, ref, naive):
        assert_within(f"{name} [{tag}]", g, w, n, dtype, scale=_scale(name, w), slack=_lse_slack(dtype, name, w, ref_l))
    return got


_FAMILIES = [pytest.param(c, dt, D, id=f"{i}-{c}")
             for c in CASES for dt, D, i in ((BFLOAT16, 128, "bf16-d128"), (FLOAT16, 64, "fp16-d64"),
                                             (BFLOAT16, 96, "bf16-d96"), (FLOAT16, 256, "fp16-d256"),
                                             (FLOAT32, 64, "fp32-d64"))]


@pytest.mark.parametrize("case,dtype,D", _FAMILIES)
def test_each_variant_on_each_kernel_family(rng, case, dtype, D):
    # Sq != Sk both ways and odd lengths; 4 query heads on 2 kv heads (GQA) in every case
    check_variant(rng, dtype, case, 2, 200, 333, 4, 2, D)
    check_variant(rng, dtype, case, 1, 333, 130, 4, 2, D)


@pytest.mark.parametrize("case", ["gqa", "window", "mixed", "mixed-causal"])
@pytest.mark.parametrize("dtype", [BFLOAT16, FLOAT32], ids=["bf16", "fp32"])
def test_deterministic_backward_is_reproducible(rng, case, dtype):
    check_variant(rng, dtype, case, 1, 257, 300, 8, 2, 64, deterministic=True)
    check_variant(rng, dtype, case, 1, 300, 129, 4, 4, 128, deterministic=True)


@pytest.mark.parametrize("ratio", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("causal", [False, True])
def test_grouped_query_ratios_and_multi_query(rng, ratio, causal):
    case = "window-causal" if causal else "gqa"
    check_variant(rng, BFLOAT16, case, 2, 300, 300, 16, 16 // ratio, 128)
    check_variant(rng, FLOAT16, case, 1, 129, 257, 16, 16 // ratio, 64)


@pytest.mark.parametrize("case", ["window", "sinks", "mixed"])
def test_short_keys_take_the_mma_sync_forward(rng, case):
    # seqlen_k <= 128 on Hopper runs the mma.sync forward (HOPPER_FWD_SHORT_SEQLEN_K)
    check_variant(rng, BFLOAT16, case, 2, 300, 100, 4, 2, 128)
    check_variant(rng, FLOAT16, case, 2, 1, 77, 4, 1, 64)


def test_rows_that_see_no_key(rng):
    # a window (0, 0) with Sq > Sk: the first Sq - Sk rows see no key; with sinks their lse is the sink
    q, k, v, dout = _inputs(rng, BFLOAT16, 1, 200, 50, 2, 1, 64)
    sinks = rng.uniform(-1, 2, (2,)).astype(np.float32)
    for kw in (dict(window_size=(3, 0)), dict(window_size=(3, 0), sinks=sinks)):
        o, l = cupyflash.flash_attention(to_gpu(q), to_gpu(k), to_gpu(v), return_lse=True, **_gpu_kw(kw))
        o, l = to_host64(o), to_host64(l)
        assert np.all(o[:, :150] == 0)
        want = np.broadcast_to(sinks[None, :, None], l[:, :, :150].shape) if "sinks" in kw else -np.inf
        assert np.array_equal(l[:, :, :150], np.broadcast_to(want, l[:, :, :150].shape))


@pytest.mark.parametrize("side", sorted(BAND_CASES))
@pytest.mark.parametrize("dtype,D,deterministic", [(BFLOAT16, 128, False), (FLOAT16, 64, True), (BFLOAT16, 96, False),
                                                   (FLOAT32, 64, False)], ids=["bf16-d128", "fp16-d64-det", "bf16-d96", "fp32-d64"])
def test_a_window_never_reads_what_lies_outside_its_band(rng, side, dtype, D, deterministic):
    """The key tiles (or query tiles) wholly outside a window's band are skipped, forward and
    backward: rows there are NaN, and out, lse, dq, dk, dv still match float64 on clean inputs
    (tests/test_variants.py holds the NumPy backend to the same)."""
    q, k, v, dout, kw, clean, poisoned = band_poisoned_inputs(rng, dtype, side, D=D)
    gkw = _gpu_kw(kw)
    gq, gk, gv, gdo = (to_gpu(x) for x in (q, k, v, dout))
    out, lse = nan_like(q.shape, q.dtype), nan_like((1, q.shape[2], q.shape[1]), np.float32)
    o, l = cupyflash.flash_attention(gq, gk, gv, return_lse=True, out=out, lse=lse, **gkw)
    grads = [nan_like(x.shape, x.dtype) for x in (q, k, v)]
    got = cupyflash.flash_attention_backward(gdo, gq, gk, gv, o, l, dq=grads[0], dk=grads[1], dv=grads[2],
                                             deterministic=deterministic, **gkw)
    check_band_poisoned(side, (o, l), [to_host64(g) for g in got], clean, dout, kw, poisoned, dtype, assert_within)


def test_buffers_and_graph_capture_with_every_variant(rng):
    import cupy
    B, S, H, H_kv, D = 1, 256, 4, 2, 128
    q, k, v, dout = (to_gpu(x) for x in _inputs(rng, BFLOAT16, B, S, S, H, H_kv, D))
    kw = _gpu_kw(_keywords(rng, "mixed-causal", B, H))
    out, lse = cupy.empty_like(q), cupy.empty((B, H, S), np.float32)
    dq, dk, dv, ds = cupy.empty_like(q), cupy.empty_like(k), cupy.empty_like(v), cupy.empty((H,), np.float32)
    ws = cupyflash.backward_workspace(q)
    call = lambda: (cupyflash.flash_attention(q, k, v, out=out, lse=lse, **kw),  # noqa: E731
                    cupyflash.flash_attention_backward(dout, q, k, v, out, lse, dq=dq, dk=dk, dv=dv, dsinks=ds,
                                                       workspace=ws, **kw))
    call()  # compile outside the capture
    want = [to_host64(x) for x in (out, dq, dk, dv, ds)]
    for x in (out, dq, dk, dv, ds):
        x.fill(np.nan)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        call()
        graph = stream.end_capture()
    graph.launch(stream)
    stream.synchronize()
    for name, x, w in zip(("out", "dq", "dk", "dv", "dsinks"), (out, dq, dk, dv, ds), want):
        assert np.array_equal(to_host64(x), w), name
