"""The plan cache (cupyflash/_plans.py), as specifications:

- a repeated GPU call with the layouts of an earlier one takes the cached plan: no checks, no
  planning, the same result bits as the checked path;
- a plan never outlives a changed input: other pointers, strides, dtypes, devices or flags
  give their own result (other pointers reuse the plan; an unaligned pointer takes the checked
  path, which copies);
- the error catalogue holds after a plan exists: a bad flag or scale that hashes like a good
  one (1 for True) still raises;
- CPU inputs and objects that are not cupy arrays never get a key.
"""
import numpy as np
import pytest

import cupyflash
from cupyflash import _plans, reference
from cupyflash._dtypes import BFLOAT16, FLOAT16

from conftest import error_report
from test_gpu_kernels import assert_within, backward_inputs, nan_like, to_gpu, to_host64


def _cp():
    import cupy
    return cupy


def test_numpy_inputs_have_no_plan_key(rng):
    q = rng.standard_normal((1, 8, 2, 16)).astype(np.float32)
    assert _plans.forward_key(q, q, q, None, None, False, None, False) is None
    assert _plans.backward_key(q, q, q, q, q, q, None, None, None, None, False, None, False) is None


def test_an_unhashable_flag_still_gets_the_checks_error(rng):
    q = rng.standard_normal((1, 8, 2, 16)).astype(np.float32)
    with pytest.raises(TypeError, match=r"^causal must be a bool, got list"):
        cupyflash.flash_attention(q, q, q, causal=[True])
    assert _plans.PlanCache().get(((1,), [True])) is None


def test_plan_cache_is_bounded_and_drops_the_oldest():
    cache = _plans.PlanCache(maxsize=3)
    for i in range(5):
        cache.put(("k", i), i)
    assert len(cache) == 3 and cache.get(("k", 0)) is None and cache.get(("k", 4)) == 4
    cache.put(None, 9)  # a call without a key stores nothing
    assert len(cache) == 3


def _bitwise_equal(name, a, b):
    a, b = _cp().asnumpy(a), _cp().asnumpy(b)
    assert a.tobytes() == b.tobytes(), f"{name}: {error_report(a.astype(np.float64), b.astype(np.float64))}"


@pytest.mark.gpu
def test_a_repeated_call_takes_the_plan_and_gives_the_checked_paths_bits(rng, monkeypatch):
    from cupyflash import _cuda_backend
    _plans.clear()
    q, k, v, dout = (to_gpu(x) for x in backward_inputs(rng, BFLOAT16, 2, 200, 333, 4, 64))
    o1, l1 = cupyflash.flash_attention(q, k, v, causal=True, return_lse=True)
    g1 = cupyflash.flash_attention_backward(dout, q, k, v, o1, l1, causal=True)
    assert len(_plans.FORWARD) == 1 and len(_plans.BACKWARD) == 1

    def no_planning(*args, **kwargs):
        raise AssertionError("the checked path ran for a call with a cached plan")
    monkeypatch.setattr(_cuda_backend, "forward_with_plan", no_planning)
    monkeypatch.setattr(_cuda_backend, "backward_with_plan", no_planning)
    q2, k2, v2, dout2 = (x.copy() for x in (q, k, v, dout))  # same layouts, other pointers
    o2, l2 = cupyflash.flash_attention(q2, k2, v2, causal=True, return_lse=True)
    g2 = cupyflash.flash_attention_backward(dout2, q2, k2, v2, o2, l2, causal=True)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), (o1, l1, *g1), (o2, l2, *g2)):
        if name != "dq":  # dQ is summed with atomics, in an order that varies
            _bitwise_equal(name, b, a)


@pytest.mark.gpu
def test_a_tensor_map_for_new_pointers_is_the_drivers_own_encoding():
    """A plan called with new pointers writes each into its layout's map (_tma.tensor_map) instead
    of asking the driver, where the driver's maps were seen to hold the address alone in their
    first 8 bytes: the bytes are exactly cuTensorMapEncodeTiled's, for real allocations, several
    layouts and both box heights."""
    from cupyflash import _tma
    cp = _cp()
    B, S, H, D = 2, 100, 4, 128  # and (B, H, S, D) storage viewed as (B, S, H, D): byte strides of 2-byte elements
    layouts = [((2, 257, 4, 128), None), ((1, 64, 3, 64), None), ((B, S, H, D), (2 * H * S * D, 2 * D, 2 * S * D, 2))]
    for shape, strides in layouts:
        for dtype in (FLOAT16, BFLOAT16):
            x = cp.empty(shape, dtype) if strides is None else cp.ndarray(
                shape, dtype, memptr=cp.cuda.alloc(strides[0] * shape[0]), strides=strides)
            for rows in (64, 128):
                for ptr in (x.data.ptr, x.data.ptr + 4096, x.data.ptr + 16):
                    got = _tma.tensor_map(ptr, np.dtype(dtype), x.shape, x.strides, rows)
                    assert got == _tma._encode(ptr, np.dtype(dtype), x.shape, x.strides, rows), (shape, strides, rows)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [FLOAT16, BFLOAT16], ids=["fp16", "bf16"])
def test_a_plan_never_outlives_a_changed_input(rng, dtype):
    """Calls that alternate layouts, pointers and flags at one shape each match float64; the
    reference is recomputed for every call from that call's inputs, outputs poisoned first."""
    cp = _cp()
    _plans.clear()
    B, S, H, D = 2, 257, 4, 128
    base = [backward_inputs(rng, dtype, B, S, S, H, D) for _ in range(2)]
    for step in range(8):
        q, k, v, dout = base[step % 2]
        causal = step % 3 == 0
        gq, gk, gv, gdo = (to_gpu(x) for x in (q, k, v, dout))
        if step in (2, 3):  # (B, H, S, D) storage viewed as (B, S, H, D): other strides
            gq, gk, gv, gdo = (cp.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
                               for x in (gq, gk, gv, gdo))
        if step == 5:  # the data pointer 2 bytes off 16: same strides, the checked path copies
            raw = cp.empty(gq.size + 1, dtype)[1:].reshape(gq.shape)
            raw[...] = gq
            gq = raw
        out, lse = nan_like(q.shape, dtype), nan_like((B, H, S), np.float32)
        o, l = cupyflash.flash_attention(gq, gk, gv, causal=causal, return_lse=True, out=out, lse=lse)
        grads = [nan_like(x.shape, dtype) for x in (q, k, v)]
        dq, dk, dv = cupyflash.flash_attention_backward(gdo, gq, gk, gv, o, l, causal=causal,
                                                        dq=grads[0], dk=grads[1], dv=grads[2])
        ref_o, ref_l = reference.attention(q, k, v, causal=causal, upcast=True)
        naive_o, naive_l = reference.attention(q, k, v, causal=causal, upcast=False)
        ref_g = reference.attention_backward(dout, q, k, v, causal=causal, upcast=True)
        naive_g = reference.attention_backward(dout, q, k, v, causal=causal, upcast=False)
        tag = f"step {step} causal={causal}"
        assert_within(f"out [{tag}]", o, ref_o, naive_o, dtype)
        assert_within(f"lse [{tag}]", l, ref_l, naive_l, dtype)
        for name, got, want, nv in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_g, naive_g):
            assert_within(f"{name} [{tag}]", got, want, nv, dtype)


@pytest.mark.gpu
def test_variant_calls_take_their_plan_and_read_each_calls_slopes_and_sinks(rng, monkeypatch):
    """A repeated call with a window, softcap, ALiBi and sinks takes the plan, which reads the new
    call's slopes and sinks (other pointers, other values) and writes its dsinks; each call matches
    float64. A window of other sides or a softcap of another value is another plan."""
    from cupyflash import _cuda_backend
    from test_gpu_variants import _scale
    from test_variants import _keywords
    cp = _cp()
    _plans.clear()
    B, S, H, H_kv, D = 1, 200, 4, 2, 64
    calls = []
    for step in range(4):
        q, k, v, dout = backward_inputs(rng, BFLOAT16, B, S, S, H, D)
        k, v = k[:, :, :H_kv].copy(), v[:, :, :H_kv].copy()
        kw = _keywords(rng, "mixed-causal", B, H)
        if step == 3:
            kw["window_size"], kw["softcap"] = (17, 0), 7.0
        calls.append((q, k, v, dout, kw))
    checked = _cuda_backend.forward_with_plan, _cuda_backend.backward_with_plan
    for step, (q, k, v, dout, kw) in enumerate(calls):
        if step in (1, 2):  # the plan of step 0's layouts serves these calls
            monkeypatch.setattr(_cuda_backend, "forward_with_plan", None)
            monkeypatch.setattr(_cuda_backend, "backward_with_plan", None)
        else:
            monkeypatch.setattr(_cuda_backend, "forward_with_plan", checked[0])
            monkeypatch.setattr(_cuda_backend, "backward_with_plan", checked[1])
        gkw = {n: (cp.asarray(x) if isinstance(x, np.ndarray) else x) for n, x in kw.items()}
        gq, gk, gv, gdo = (to_gpu(x) for x in (q, k, v, dout))
        o, l = cupyflash.flash_attention(gq, gk, gv, return_lse=True, **gkw)
        got = cupyflash.flash_attention_backward(gdo, gq, gk, gv, o, l, **gkw)
        assert len(got) == 4
        ref_o, ref_l = reference.attention(q, k, v, upcast=True, **kw)
        naive_o, naive_l = reference.attention(q, k, v, upcast=False, **kw)
        ref_g = reference.attention_backward(dout, q, k, v, upcast=True, **kw)
        naive_g = reference.attention_backward(dout, q, k, v, upcast=False, **kw)
        tag = f"step {step}"
        assert_within(f"out [{tag}]", o, ref_o, naive_o, BFLOAT16)
        assert_within(f"lse [{tag}]", l, ref_l, naive_l, BFLOAT16)
        for name, g, want, nv in zip(("dq", "dk", "dv", "dsinks"), got, ref_g, naive_g):
            assert_within(f"{name} [{tag}]", g, want, nv, BFLOAT16, scale=_scale(name, want))
    assert len(_plans.FORWARD) == 2 and len(_plans.BACKWARD) == 2


@pytest.mark.gpu
def test_errors_hold_after_a_plan_exists(rng):
    cp = _cp()
    q, k, v, dout = (to_gpu(x) for x in backward_inputs(rng, FLOAT16, 1, 64, 64, 2, 64))
    o, l = cupyflash.flash_attention(q, k, v, causal=True, softmax_scale=0.5, return_lse=True)
    cupyflash.flash_attention_backward(dout, q, k, v, o, l, causal=True)
    with pytest.raises(TypeError, match=r"^causal must be a bool, got int"):
        cupyflash.flash_attention(q, k, v, causal=1, softmax_scale=0.5)
    with pytest.raises(TypeError, match=r"^softmax_scale must be a real number or None, got bool"):
        cupyflash.flash_attention(q, k, v, causal=True, softmax_scale=True)
    with pytest.raises(ValueError, match=r"^softmax_scale must be finite and > 0, got nan"):
        cupyflash.flash_attention(q, k, v, causal=True, softmax_scale=float("nan"))
    with pytest.raises(TypeError, match=r"^deterministic must be a bool, got int"):
        cupyflash.flash_attention_backward(dout, q, k, v, o, l, causal=True, deterministic=0)
    with pytest.raises(ValueError, match=r"^lse must have dtype float32"):
        cupyflash.flash_attention_backward(dout, q, k, v, o, l.astype(cp.float64), causal=True)


@pytest.mark.gpu
def test_inside_a_capture_a_planned_call_that_would_allocate_still_raises(rng):
    cp = _cp()
    q, k, v = (to_gpu(x) for x in backward_inputs(rng, FLOAT16, 1, 128, 128, 2, 64)[:3])
    cupyflash.flash_attention(q, k, v)  # the plan exists
    dummy = cp.empty(8, np.float32)
    dummy.fill(0)
    cp.cuda.Device().synchronize()
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        s.begin_capture()
        try:
            dummy.fill(0)
            with pytest.raises(ValueError, match=r"capturing a CUDA graph, so nothing may be allocated"):
                cupyflash.flash_attention(q, k, v)
        finally:
            s.end_capture()


@pytest.mark.multigpu
def test_the_same_layouts_on_another_device_get_their_own_plan(rng):
    cp = _cp()
    q, k, v = backward_inputs(rng, BFLOAT16, 1, 300, 300, 2, 64)[:3]
    want = None
    for dev in (0, 1, 0):
        with cp.cuda.Device(dev):
            gq, gk, gv = (cp.asarray(x) for x in (q, k, v))
        o = cupyflash.flash_attention(gq, gk, gv)  # the current device stays 0
        assert o.device.id == dev
        got = to_host64(o)
        if want is None:
            want = got
        assert np.array_equal(got, want), f"GPU {dev}: {error_report(got, want)}"
