"""cupyflash inside non-torch numeric code (issue 6), as specifications:

- any object with ``__dlpack__`` or ``__cuda_array_interface__`` is taken zero-copy (the data
  pointer is the producer's), and the result is the one cupy (or numpy) inputs give;
- launches go on CuPy's current stream, and two streams can run attention at once;
- ``out=``, ``lse=``, ``dq=``/``dk=``/``dv=`` and ``workspace=`` are validated, and with them
  forward + backward allocate nothing and can be captured in a CUDA graph;
- arrays on GPU 1 are computed on GPU 1; mixing devices is a ValueError;
- the JAX ``custom_vjp`` example gives JAX's gradients.

The CPU tests run in CI; the others are marked ``gpu`` (``multigpu``) and skip with a reason.
"""
import importlib.util
import inspect
import os
import pathlib
import re

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before JAX starts: leave memory to CuPy

import numpy as np
import pytest

import cupyflash
from cupyflash import _checks, flash_attention, flash_attention_backward, reference
from cupyflash._dtypes import BFLOAT16, FLOAT16, FLOAT32, FLOAT64

from conftest import error_report
from test_gpu_kernels import assert_within, backward_inputs, nan_like, to_gpu, to_host64

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _cp():
    import cupy
    return cupy


class DLPackOnly:
    """Exposes an array through the DLPack protocol alone (as a JAX or PyTorch array would)."""

    def __init__(self, array, device=None):
        self._array = array
        self._device = device

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._device or self._array.__dlpack_device__()


class CudaArrayInterfaceOnly:
    """Exposes a cupy array through ``__cuda_array_interface__`` alone (as Numba arrays do)."""

    def __init__(self, array):
        self._array = array
        self.__cuda_array_interface__ = array.__cuda_array_interface__


class RefusingInterface:
    """An object whose ``__cuda_array_interface__`` property raises (JAX does for some arrays)."""

    @property
    def __cuda_array_interface__(self):
        raise ValueError("not for this array")


def cpu_inputs(rng, dtype=FLOAT32, B=1, Sq=5, Sk=7, H=2, D=16):
    q, k, v = (rng.standard_normal((B, S, H, D)).astype(dtype) for S in (Sq, Sk, Sk))
    dout = rng.standard_normal((B, Sq, H, D)).astype(dtype)
    return q, k, v, dout


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"cupyflash_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- CPU: DLPack producers, rejected objects, output buffers (CI) ------------------------

def test_dlpack_cpu_object_is_taken_zero_copy(rng):
    q = rng.standard_normal((1, 5, 2, 16)).astype(FLOAT32)
    x = _checks.as_array(DLPackOnly(q), "q")
    assert isinstance(x, np.ndarray) and np.shares_memory(x, q)


@pytest.mark.parametrize("dtype", [FLOAT32, FLOAT64], ids=["float32", "float64"])
@pytest.mark.parametrize("causal", [False, True])
def test_dlpack_cpu_objects_compute_like_numpy_arrays(rng, dtype, causal):
    q, k, v, dout = cpu_inputs(rng, dtype)
    o, l = flash_attention(q, k, v, causal=causal, return_lse=True)
    o2, l2 = flash_attention(*(DLPackOnly(x) for x in (q, k, v)), causal=causal, return_lse=True)
    assert isinstance(o2, np.ndarray) and isinstance(l2, np.ndarray)
    assert np.array_equal(o, o2) and np.array_equal(l, l2), error_report(o2, o)
    g = flash_attention_backward(dout, q, k, v, o, l, causal=causal)
    g2 = flash_attention_backward(*(DLPackOnly(x) for x in (dout, q, k, v, o, l)), causal=causal)
    for name, a, b in zip(("dq", "dk", "dv"), g2, g):
        assert isinstance(a, np.ndarray) and np.array_equal(a, b), f"{name}: {error_report(a, b)}"


def test_outputs_are_written_into_dlpack_cpu_buffers(rng):
    q, k, v, dout = cpu_inputs(rng)
    want_o, want_l = flash_attention(q, k, v, return_lse=True)
    want_g = flash_attention_backward(dout, q, k, v, want_o, want_l)
    out, lse = np.full_like(q, np.nan), np.full((1, 2, 5), np.nan, FLOAT32)
    o, l = flash_attention(q, k, v, return_lse=True, out=DLPackOnly(out), lse=DLPackOnly(lse))
    assert np.shares_memory(o, out) and np.shares_memory(l, lse)
    assert np.array_equal(out, want_o) and np.array_equal(lse, want_l)
    bufs = [np.full_like(x, np.nan) for x in (q, k, v)]
    g = flash_attention_backward(dout, q, k, v, out, lse, dq=DLPackOnly(bufs[0]), dk=DLPackOnly(bufs[1]),
                                 dv=DLPackOnly(bufs[2]))
    for name, got, buf, want in zip(("dq", "dk", "dv"), g, bufs, want_g):
        assert np.shares_memory(got, buf) and np.array_equal(buf, want), f"{name}: {error_report(buf, want)}"


NOT_ARRAYS = {"list": [[1.0]], "dict": {"q": 1.0}, "str": "q", "none": None, "float": 1.0,
              "object": object(), "refusing-interface": RefusingInterface()}


@pytest.mark.parametrize("what", list(NOT_ARRAYS))
@pytest.mark.parametrize("arg", ["q", "k", "v"])
def test_forward_rejects_non_arrays_naming_the_argument(rng, what, arg):
    q, k, v, _ = cpu_inputs(rng)
    args = {"q": q, "k": k, "v": v, arg: NOT_ARRAYS[what]}
    with pytest.raises(TypeError, match=rf"^{arg} must be a numpy or cupy array \(or expose __dlpack__"):
        flash_attention(args["q"], args["k"], args["v"])


@pytest.mark.parametrize("arg", ["dout", "q", "k", "v", "out", "lse", "dq", "dk", "dv"])
def test_backward_rejects_non_arrays_naming_the_argument(rng, arg):
    q, k, v, dout = cpu_inputs(rng)
    o, l = flash_attention(q, k, v, return_lse=True)
    args = {"dout": dout, "q": q, "k": k, "v": v, "out": o, "lse": l, "dq": None, "dk": None, "dv": None}
    args[arg] = "not an array"
    positional = [args.pop(n) for n in ("dout", "q", "k", "v", "out", "lse")]
    with pytest.raises(TypeError, match=rf"^{arg} must be a numpy or cupy array"):
        flash_attention_backward(*positional, **args)


def test_dlpack_object_on_an_unsupported_device_is_a_type_error(rng):
    q, k, v, _ = cpu_inputs(rng)
    with pytest.raises(TypeError, match=r"^k lives on DLPack device type 10; cupyflash takes CPU"):
        flash_attention(q, DLPackOnly(k, device=(10, 0)), v)


def test_dlpack_export_failure_is_a_type_error_naming_the_argument(rng):
    q, k, v, _ = cpu_inputs(rng, BFLOAT16)  # NumPy cannot export bfloat16 through DLPack
    with pytest.raises(TypeError, match=r"^v could not be taken zero-copy through DLPack \(BufferError"):
        flash_attention(q, k, DLPackOnly(v))


def _strided_view(base, shape, strides):
    return np.lib.stride_tricks.as_strided(base, shape=shape, strides=strides, writeable=True)


def _forward_with(rng, **buffers):
    q, k, v, _ = cpu_inputs(rng)  # q (1, 5, 2, 16) float32; lse (1, 2, 5)
    return flash_attention(q, k, v, return_lse=True, **buffers)


def _read_only(shape, dtype=FLOAT32):
    a = np.zeros(shape, dtype)
    a.flags.writeable = False
    return a


#: forward output buffers that must be refused: (buffers, message pattern)
OUTPUT_ERRORS = {
    "out-shape": (lambda: dict(out=np.empty((1, 5, 2, 8), FLOAT32)), r"^out must have shape \(1, 5, 2, 16\)"),
    "out-dtype": (lambda: dict(out=np.empty((1, 5, 2, 16), FLOAT16)), r"^out must have dtype float32"),
    "out-read-only": (lambda: dict(out=_read_only((1, 5, 2, 16))), r"^out is read-only"),
    "out-dlpack-read-only": (lambda: dict(out=DLPackOnly(_read_only((1, 5, 2, 16)))), r"^out is read-only"),
    "out-stride-0": (lambda: dict(out=_strided_view(np.zeros(32, FLOAT32), (1, 5, 2, 16), (0, 0, 64, 4))),
                     r"^out has stride 0 on axis 1 \(a broadcast view\)"),
    "lse-shape": (lambda: dict(lse=np.empty((1, 5, 2), FLOAT32)), r"^lse must have shape \(1, 2, 5\)"),
    "lse-dtype": (lambda: dict(lse=np.empty((1, 2, 5), FLOAT64)), r"^lse must have dtype float32"),
    "lse-not-contiguous": (lambda: dict(lse=np.empty((1, 2, 10), FLOAT32)[:, :, :5]), r"^lse must be C-contiguous"),
    "lse-read-only": (lambda: dict(lse=np.broadcast_to(np.zeros(5, FLOAT32), (1, 2, 5))), r"^lse is read-only"),
}


@pytest.mark.parametrize("case", list(OUTPUT_ERRORS))
def test_forward_output_buffers_are_checked(rng, case):
    make_buffers, pattern = OUTPUT_ERRORS[case]
    with pytest.raises(ValueError, match=pattern):
        _forward_with(rng, **make_buffers())


@pytest.mark.parametrize("name", ["dq", "dk", "dv"])
def test_backward_output_buffers_are_checked(rng, name):
    q, k, v, dout = cpu_inputs(rng)
    o, l = flash_attention(q, k, v, return_lse=True)
    like = {"dq": q, "dk": k, "dv": v}[name]
    shape = like.shape
    bad = {
        "^" + re.escape(f"{name} must have shape {tuple(shape)}"): np.empty(shape[:-1] + (8,), FLOAT32),
        rf"^{name} must have dtype float32": np.empty(shape, FLOAT64),
        rf"^{name} is read-only": np.broadcast_to(np.zeros(shape[-1], FLOAT32), shape),
        rf"^{name} has stride 0 on axis 1": _strided_view(np.zeros(64, FLOAT32), shape, (0, 0, 64, 4)),
    }
    for pattern, buf in bad.items():
        with pytest.raises(ValueError, match=pattern):
            flash_attention_backward(dout, q, k, v, o, l, **{name: buf})


def test_workspace_is_refused_for_numpy_arrays(rng):
    q, k, v, dout = cpu_inputs(rng)
    o, l = flash_attention(q, k, v, return_lse=True)
    ws = (np.empty((1, 2, 5), FLOAT32), np.empty((1, 2, 5, 16), FLOAT32))
    with pytest.raises(ValueError, match=r"^workspace is only used by the GPU path"):
        flash_attention_backward(dout, q, k, v, o, l, workspace=ws)


def test_backward_workspace_needs_a_gpu_array(rng):
    q, _, _, _ = cpu_inputs(rng)
    with pytest.raises(ValueError, match=r"^backward_workspace takes the GPU \(cupy\) query array"):
        cupyflash.backward_workspace(q)


@pytest.mark.parametrize("fn", [flash_attention, flash_attention_backward, cupyflash.backward_workspace],
                         ids=lambda f: f.__name__)
def test_public_functions_carry_type_hints_and_numpy_docstrings(fn):
    sig = inspect.signature(fn)
    unannotated = [n for n, p in sig.parameters.items() if p.annotation is inspect.Parameter.empty]
    assert not unannotated, f"{fn.__name__}: parameters without type hints: {unannotated}"
    assert sig.return_annotation is not inspect.Signature.empty
    doc = inspect.getdoc(fn)
    for section in ("Parameters\n----------", "Returns\n-------"):
        assert section in doc, f"{fn.__name__}'s docstring lacks a NumPy-style {section.splitlines()[0]} section"


# ---- GPU: zero-copy producers --------------------------------------------------------------

def _same_results(inputs_a, inputs_b, causal=True):
    """Forward and backward from two sets of (dout, q, k, v) holding the same values: out, lse,
    dk, dv bitwise equal (deterministic kernels); dq within the accuracy bound (its fp32
    accumulation order varies between runs)."""
    (da, qa, ka, va), (db, qb, kb, vb) = inputs_a, inputs_b
    oa, la = flash_attention(qa, ka, va, causal=causal, return_lse=True)
    ob, lb = flash_attention(qb, kb, vb, causal=causal, return_lse=True)
    cp = _cp()
    assert isinstance(oa, cp.ndarray) and isinstance(la, cp.ndarray)
    assert np.array_equal(to_host64(oa), to_host64(ob)), error_report(to_host64(oa), to_host64(ob))
    assert np.array_equal(to_host64(la), to_host64(lb))
    ga = flash_attention_backward(da, qa, ka, va, oa, la, causal=causal)
    gb = flash_attention_backward(db, qb, kb, vb, ob, lb, causal=causal)
    for name, a, b in zip(("dk", "dv"), ga[1:], gb[1:]):
        assert isinstance(a, cp.ndarray) and np.array_equal(to_host64(a), to_host64(b)), \
            f"{name}: {error_report(to_host64(a), to_host64(b))}"
    return oa, la, ga, gb


def _check_dq(dq, host_inputs, causal=True):
    dout, q, k, v = host_inputs
    want = reference.attention_backward(dout, q, k, v, causal=causal, upcast=True)[0]
    naive = reference.attention_backward(dout, q, k, v, causal=causal, upcast=False)[0]
    assert_within("dq", dq, want, naive, q.dtype)


@pytest.mark.gpu
def test_cupy_arrays_pass_through_unchanged():
    x = _cp().ones((1, 8, 1, 8), dtype=FLOAT16)
    assert _checks.as_array(x, "q") is x


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [BFLOAT16, FLOAT16, FLOAT32], ids=["bf16", "fp16", "fp32"])
def test_dlpack_cuda_object_is_taken_zero_copy(rng, dtype):
    q, k, v, dout = backward_inputs(rng, dtype, 2, 200, 200, 3, 64)
    dev = [to_gpu(x) for x in (dout, q, k, v)]
    wrapped = [DLPackOnly(x) for x in dev]
    for x, w in zip(dev, wrapped):
        y = _checks.as_array(w, "q")
        assert isinstance(y, _cp().ndarray) and y.data.ptr == x.data.ptr and y.dtype == dtype
    _, _, ga, _ = _same_results(wrapped, dev)
    _check_dq(ga[0], (dout, q, k, v))


@pytest.mark.gpu
def test_cuda_array_interface_object_is_taken_zero_copy(rng):
    q, k, v, dout = backward_inputs(rng, FLOAT16, 1, 300, 300, 2, 128)
    dev = [to_gpu(x) for x in (dout, q, k, v)]
    wrapped = [CudaArrayInterfaceOnly(x) for x in dev]
    for x, w in zip(dev, wrapped):
        assert _checks.as_array(w, "k").data.ptr == x.data.ptr
    _same_results(wrapped, dev)


def _jax():
    jax = pytest.importorskip("jax")
    for platform in ("cuda", "gpu"):
        try:
            return jax, jax.devices(platform)[0]
        except RuntimeError as e:
            reason = f"JAX has no CUDA backend: {e}"
    pytest.skip(reason)


@pytest.mark.gpu
def test_jax_arrays_are_taken_zero_copy_and_go_back_with_from_dlpack(rng):
    jax, gpu = _jax()
    import jax.numpy as jnp
    host = backward_inputs(rng, BFLOAT16, 2, 300, 300, 4, 64)
    q, k, v, dout = host
    jq, jk, jv, jdo = (jax.device_put(x, gpu) for x in (q, k, v, dout))
    for name, jx in zip(("q", "k", "v", "dout"), (jq, jk, jv, jdo)):
        cx = _checks.as_array(jx, name)
        assert isinstance(cx, _cp().ndarray) and cx.dtype == BFLOAT16
        assert cx.data.ptr == jx.unsafe_buffer_pointer(), f"{name} was copied"
    o, l, ga, _ = _same_results((jdo, jq, jk, jv), tuple(to_gpu(x) for x in (dout, q, k, v)))
    _check_dq(ga[0], (dout, q, k, v))
    back = jnp.from_dlpack(o)  # the one line back to JAX
    assert back.dtype == jnp.bfloat16 and back.shape == o.shape
    assert back.unsafe_buffer_pointer() == o.data.ptr, "jnp.from_dlpack copied the output"
    assert np.array_equal(np.asarray(back).astype(np.float64), to_host64(o))


@pytest.mark.gpu
def test_jax_outputs_feed_the_backward_pass(rng):
    """JAX arrays everywhere in the backward call, out and lse included (as a custom_vjp's
    residuals would be)."""
    jax, gpu = _jax()
    import jax.numpy as jnp
    q, k, v, dout = backward_inputs(rng, FLOAT16, 1, 256, 256, 2, 64)
    jq, jk, jv, jdo = (jax.device_put(x, gpu) for x in (q, k, v, dout))
    o, l = flash_attention(jq, jk, jv, causal=False, return_lse=True)
    jo, jl = jnp.from_dlpack(o), jnp.from_dlpack(l)
    dq, dk, dv = flash_attention_backward(jdo, jq, jk, jv, jo, jl, causal=False)
    want = reference.attention_backward(dout, q, k, v, causal=False, upcast=True)
    naive = reference.attention_backward(dout, q, k, v, causal=False, upcast=False)
    for name, got, w, n in zip(("dq", "dk", "dv"), (dq, dk, dv), want, naive):
        assert_within(name, got, w, n, FLOAT16)


def _numba_cuda():
    numba_cuda = pytest.importorskip("numba.cuda")
    if not numba_cuda.is_available():
        pytest.skip("numba.cuda sees no usable CUDA device")
    return numba_cuda


@pytest.mark.gpu
def test_numba_device_arrays_are_taken_zero_copy_and_receive_outputs(rng):
    numba_cuda = _numba_cuda()
    host = backward_inputs(rng, FLOAT16, 2, 257, 257, 2, 64)
    dout, q, k, v = host[3], host[0], host[1], host[2]
    nb = [numba_cuda.to_device(x) for x in (dout, q, k, v)]
    for x in nb:
        assert _checks.as_array(x, "v").data.ptr == x.__cuda_array_interface__["data"][0]
    _, _, ga, _ = _same_results(nb, [to_gpu(x) for x in (dout, q, k, v)])
    _check_dq(ga[0], (dout, q, k, v))
    out_nb = numba_cuda.device_array(q.shape, dtype=np.float16)
    o = flash_attention(nb[1], nb[2], nb[3], causal=True, out=out_nb)
    assert o.data.ptr == out_nb.__cuda_array_interface__["data"][0]
    assert np.array_equal(out_nb.copy_to_host().astype(np.float64), to_host64(o))


@pytest.mark.gpu
def test_torch_tensors_are_taken_zero_copy(rng):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch sees no CUDA device")
    shape = (2, 200, 4, 64)
    ts = [torch.randn(shape, device="cuda").to(torch.bfloat16) for _ in range(4)]
    torch.cuda.synchronize()
    for t in ts:
        assert _checks.as_array(t, "q").data.ptr == t.data_ptr()
    same = [to_gpu(t.float().cpu().numpy().astype(BFLOAT16)) for t in ts]  # bf16 -> fp32 -> bf16 is exact
    _same_results(ts, same)


# ---- GPU: streams ----------------------------------------------------------------------------

_SPIN = r'''
extern "C" __global__ void spin(long long cycles) {
    long long t0 = clock64();
    while (clock64() - t0 < cycles) { }
}
'''


def _spin(cycles=200_000_000):
    """One thread busy for ~0.1 s on the current stream (at ~2 GHz)."""
    cp = _cp()
    cp.RawKernel(_SPIN, "spin")((1,), (1,), (np.int64(cycles),))


@pytest.mark.gpu
def test_launches_go_on_the_current_stream(rng):
    """On a non-blocking stream, behind a 0.1 s kernel and a copy that writes q: a launch on the
    legacy default stream (which does not wait for non-blocking streams) would read q before
    the copy and give a different result."""
    cp = _cp()
    host = backward_inputs(rng, BFLOAT16, 1, 1024, 1024, 4, 64)
    q, k, v, dout = (to_gpu(x) for x in host)
    want_o, want_l = flash_attention(q, k, v, causal=True, return_lse=True)
    want_g = flash_attention_backward(dout, q, k, v, want_o, want_l, causal=True)
    cp.cuda.Device().synchronize()
    s = cp.cuda.Stream(non_blocking=True)
    q_late = cp.empty_like(q)
    with s:
        q_late.data.memset_async(0, q_late.nbytes)
        _spin()
        q_late.data.copy_from_device_async(q.data, q.nbytes)  # on s, after the spin
        o, l = flash_attention(q_late, k, v, causal=True, return_lse=True)
        g = flash_attention_backward(dout, q_late, k, v, o, l, causal=True)
    s.synchronize()
    assert np.array_equal(to_host64(o), to_host64(want_o)), error_report(to_host64(o), to_host64(want_o))
    assert np.array_equal(to_host64(l), to_host64(want_l))
    for name, a, b in zip(("dk", "dv"), g[1:], want_g[1:]):
        assert np.array_equal(to_host64(a), to_host64(b)), f"{name}: {error_report(to_host64(a), to_host64(b))}"
    _check_dq(g[0], (host[3], host[0], host[1], host[2]))


@pytest.mark.gpu
def test_two_streams_run_different_attention_calls_at_once(rng):
    cp = _cp()
    problems = {"A": (BFLOAT16, (2, 1024, 1024, 4, 64), True), "B": (FLOAT16, (1, 777, 500, 8, 128), False)}
    host, eager = {}, {}
    for name, (dtype, (B, Sq, Sk, H, D), causal) in problems.items():
        host[name] = backward_inputs(rng, dtype, B, Sq, Sk, H, D)
        q, k, v, dout = (to_gpu(x) for x in host[name])
        o, l = flash_attention(q, k, v, causal=causal, return_lse=True)
        eager[name] = (q, k, v, dout, o, l, flash_attention_backward(dout, q, k, v, o, l, causal=causal))
    cp.cuda.Device().synchronize()
    streams = {name: cp.cuda.Stream(non_blocking=True) for name in problems}
    results = {}
    for _ in range(3):  # enqueue alternately so that the two streams' kernels overlap
        for name, (dtype, _, causal) in problems.items():
            q, k, v, dout = eager[name][:4]
            with streams[name]:
                o, l = flash_attention(q, k, v, causal=causal, return_lse=True)
                results[name] = (o, l, flash_attention_backward(dout, q, k, v, o, l, causal=causal))
    for s in streams.values():
        s.synchronize()
    for name, (dtype, _, causal) in problems.items():
        o, l, (dq, dk, dv) = results[name]
        _, _, _, _, want_o, want_l, (_, want_dk, want_dv) = eager[name]
        for what, a, b in (("out", o, want_o), ("lse", l, want_l), ("dk", dk, want_dk), ("dv", dv, want_dv)):
            assert np.array_equal(to_host64(a), to_host64(b)), f"{name} {what}: {error_report(to_host64(a), to_host64(b))}"
        q, k, v, dout = host[name]
        want = reference.attention_backward(dout, q, k, v, causal=causal, upcast=True)[0]
        naive = reference.attention_backward(dout, q, k, v, causal=causal, upcast=False)[0]
        assert_within(f"{name} dq", dq, want, naive, dtype)


# ---- GPU: preallocated outputs, no allocation, CUDA graphs ----------------------------------

def malloc_counter():
    """A MemoryHook recording every request to CuPy's allocator while active."""
    cp = _cp()

    class _Counter(cp.cuda.MemoryHook):
        name = "cupyflash-test-malloc-counter"

        def __init__(self):
            self.requests = []

        def malloc_preprocess(self, **kwargs):
            self.requests.append(kwargs.get("size"))

        def alloc_preprocess(self, **kwargs):
            self.requests.append(kwargs.get("mem_size"))

    return _Counter()


class Buffers:
    """Every array of one forward + backward problem, allocated once."""

    def __init__(self, dtype, B, S, H, D):
        cp = _cp()
        shape = (B, S, H, D)
        self.q, self.k, self.v, self.dout = (cp.empty(shape, dtype) for _ in range(4))
        self.out, self.dq, self.dk, self.dv = (cp.empty(shape, dtype) for _ in range(4))
        self.lse = cp.empty((B, H, S), np.float32)
        self.workspace = cupyflash.backward_workspace(self.q)

    def step(self, causal):
        flash_attention(self.q, self.k, self.v, causal=causal, out=self.out, lse=self.lse)
        flash_attention_backward(self.dout, self.q, self.k, self.v, self.out, self.lse, causal=causal,
                                 dq=self.dq, dk=self.dk, dv=self.dv, workspace=self.workspace)

    def load(self, q, k, v, dout):
        for buf, x in ((self.q, q), (self.k, k), (self.v, v), (self.dout, dout)):
            buf.set(np.ascontiguousarray(x))

    def poison_outputs(self):
        for buf in (self.out, self.lse, self.dq, self.dk, self.dv):
            buf.set(np.full(buf.shape, np.nan, buf.dtype))


@pytest.mark.gpu
def test_preallocated_forward_and_backward_allocate_nothing(rng):
    cp = _cp()
    bufs = Buffers(BFLOAT16, 2, 300, 3, 128)
    bufs.load(*backward_inputs(rng, BFLOAT16, 2, 300, 300, 3, 128))
    bufs.step(causal=True)  # compile and warm up
    cp.cuda.Device().synchronize()
    counter = malloc_counter()
    with counter:
        bufs.step(causal=True)
    cp.cuda.Device().synchronize()
    assert counter.requests == [], f"allocations: {counter.requests}"


@pytest.mark.gpu
def test_cuda_graph_captures_forward_and_backward(rng):
    """Warm up eagerly (compiles the kernels), capture forward + backward on a non-blocking
    stream with every buffer preallocated (no allocation during the capture), then replay the
    graph on new inputs copied into the same buffers: the eager results on those inputs."""
    cp = _cp()
    dtype, causal, (B, S, H, D) = BFLOAT16, True, (2, 512, 4, 64)
    bufs = Buffers(dtype, B, S, H, D)
    bufs.load(*backward_inputs(rng, dtype, B, S, S, H, D))
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        bufs.step(causal)  # the warm-up: NVRTC compile, module load, shared-memory limits
    s.synchronize()
    counter = malloc_counter()
    with s, counter:
        s.begin_capture()
        try:
            bufs.step(causal)
        except BaseException:
            try:
                s.end_capture()
            except Exception:
                pass  # the capture may be invalid already; the first error is the one to see
            raise
        graph = s.end_capture()
    assert counter.requests == [], f"allocations during capture: {counter.requests}"

    for _ in range(2):  # two replays, each on fresh inputs
        q, k, v, dout = backward_inputs(rng, dtype, B, S, S, H, D)
        bufs.load(q, k, v, dout)
        bufs.poison_outputs()
        cp.cuda.Device().synchronize()
        graph.launch(s)
        s.synchronize()
        eq, ek, ev, edo = (to_gpu(x) for x in (q, k, v, dout))
        eo, el = flash_attention(eq, ek, ev, causal=causal, return_lse=True)
        _, edk, edv = flash_attention_backward(edo, eq, ek, ev, eo, el, causal=causal)
        for name, got, want in (("out", bufs.out, eo), ("lse", bufs.lse, el), ("dk", bufs.dk, edk), ("dv", bufs.dv, edv)):
            assert np.array_equal(to_host64(got), to_host64(want)), f"graph {name}: {error_report(to_host64(got), to_host64(want))}"
        _check_dq(bufs.dq, (dout, q, k, v), causal)


@pytest.mark.gpu
def test_capture_without_preallocated_buffers_is_a_clear_error(rng):
    """Inside a capture, a call that would allocate (missing outputs or workspace, an unaligned
    array that would be copied) raises before launching anything."""
    cp = _cp()
    dtype, (B, S, H, D) = FLOAT16, (1, 128, 2, 64)
    q, k, v, dout = (to_gpu(x) for x in backward_inputs(rng, dtype, B, S, S, H, D))
    o, l = flash_attention(q, k, v, return_lse=True)
    out, lse = cp.empty_like(q), cp.empty((B, H, S), np.float32)
    q_unaligned = cp.empty(q.size + 1, dtype)[1:].reshape(q.shape)  # data pointer 2 bytes off
    lse_strided = cp.empty((B, H, 2 * S), np.float32)[:, :, :S]
    grads = dict(dq=cp.empty_like(q), dk=cp.empty_like(k), dv=cp.empty_like(v),
                 workspace=cupyflash.backward_workspace(q))
    dummy = cp.empty(8, np.float32)
    dummy.fill(0)  # compiles CuPy's fill kernel before the capture
    cp.cuda.Device().synchronize()
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        s.begin_capture()
        try:
            dummy.fill(0)  # the graph is not empty
            with pytest.raises(ValueError, match=r"capturing a CUDA graph, so nothing may be allocated: pass out=, lse="):
                flash_attention(q, k, v)
            with pytest.raises(ValueError, match=r"pass lse= "):
                flash_attention(q, k, v, out=out)
            with pytest.raises(ValueError, match=r"pass dq=, dk=, dv=, workspace= "):
                flash_attention_backward(dout, q, k, v, o, l)
            with pytest.raises(ValueError, match=r"^q would be copied to an aligned buffer"):
                flash_attention(q_unaligned, k, v, out=out, lse=lse)
            with pytest.raises(ValueError, match=r"^lse would be copied to a C-contiguous buffer"):
                flash_attention_backward(dout, q, k, v, o, lse_strided, **grads)
        finally:
            s.end_capture()


@pytest.mark.gpu
def test_gpu_output_buffers_and_workspace_are_checked(rng):
    cp = _cp()
    q, k, v, dout = (to_gpu(x) for x in backward_inputs(rng, FLOAT16, 1, 64, 64, 2, 64))
    o, l = flash_attention(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match=r"^out is on the CPU \(numpy\) but the inputs are on GPU 0 \(cupy\)"):
        flash_attention(q, k, v, out=np.empty(q.shape, FLOAT16))
    with pytest.raises(ValueError, match=r"^lse must be C-contiguous"):
        flash_attention(q, k, v, lse=cp.empty((1, 2, 128), np.float32)[:, :, :64])
    with pytest.raises(ValueError, match=r"^dv must have dtype float16"):
        flash_attention_backward(dout, q, k, v, o, l, dv=cp.empty(v.shape, np.float32))
    ws = cupyflash.backward_workspace(q)
    with pytest.raises(TypeError, match=r"^workspace must be the pair returned by cupyflash.backward_workspace"):
        flash_attention_backward(dout, q, k, v, o, l, workspace=list(ws))
    with pytest.raises(ValueError, match=r"^workspace\[1\] must be a C-contiguous float32 cupy array of shape \(1, 2, 64, 64\)"):
        flash_attention_backward(dout, q, k, v, o, l, workspace=(ws[0], cp.empty((1, 2, 64, 32), np.float32)))


# ---- GPU: the examples --------------------------------------------------------------------

@pytest.mark.gpu
def test_jax_custom_vjp_example_gives_jax_gradients():
    jax, _ = _jax()
    example = load_example("jax_custom_vjp")
    ok, rows = example.check(quick=True)
    assert ok, "\n".join(example.format_check(rows))


@pytest.mark.gpu
def test_jax_custom_vjp_example_refuses_jit_with_a_clear_error():
    jax, gpu = _jax()
    example = load_example("jax_custom_vjp")
    x = jax.device_put(np.ones((1, 64, 1, 64), FLOAT16), gpu)
    with pytest.raises(TypeError, match="runs eagerly"):
        jax.jit(lambda q: example.flash_attention_jax(q, q, q, False))(x)


@pytest.mark.gpu
def test_numba_example_runs_between_numba_kernels():
    numba_cuda = _numba_cuda()
    try:  # the example compiles Numba kernels: that needs NVVM, which not every install has
        @numba_cuda.jit
        def _probe(x):
            x[0] = 1.0
        a = numba_cuda.device_array(1, dtype=np.float32)
        _probe[1, 1](a)
        numba_cuda.synchronize()
    except Exception as e:
        pytest.skip(f"Numba cannot compile CUDA kernels here ({type(e).__name__}: {e})")
    result = load_example("numba_interop").run(B=1, S=512, H=2, D=64)
    assert result["ok"], result


@pytest.mark.gpu
def test_the_generate_example_replays_its_decode_loop_as_a_cuda_graph():
    """examples/generate.py, small: the CUDA-graph decode loop gives the eager loop's tokens."""
    import subprocess
    import sys
    args = ["--batch", "2", "--prompt", "16", "--steps", "6", "--layers", "2", "--d-model", "256", "--heads", "4",
            "--heads-kv", "2", "--vocab", "512"]
    run = subprocess.run([sys.executable, str(EXAMPLES / "generate.py"), *args], capture_output=True, text=True,
                         timeout=600, cwd=EXAMPLES.parent)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "graph tokens equal the eager tokens: True" in run.stdout, run.stdout


# ---- several GPUs ---------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.multigpu
def test_arrays_on_gpu_1_are_computed_on_gpu_1(rng):
    """While GPU 0 is current, GPU 1's arrays run on GPU 1 (its kernels are compiled and
    loaded for GPU 1: a kernel loaded for another device could not launch there) and the
    results live on GPU 1; the current device is left as it was."""
    cp = _cp()
    host = backward_inputs(rng, BFLOAT16, 2, 333, 333, 4, 128)
    q, k, v, dout = host
    with cp.cuda.Device(1):
        q1, k1, v1, do1 = (cp.asarray(x) for x in host)
    assert cp.cuda.Device().id == 0
    o, l = flash_attention(q1, k1, v1, causal=True, return_lse=True)
    grads = flash_attention_backward(do1, q1, k1, v1, o, l, causal=True)
    assert cp.cuda.Device().id == 0
    for x in (o, l, *grads):
        assert x.device.id == 1
    ref_o, ref_l = reference.attention(q, k, v, causal=True, upcast=True)
    naive_o, naive_l = reference.attention(q, k, v, causal=True, upcast=False)
    assert_within("out on GPU 1", o, ref_o, naive_o, BFLOAT16)
    assert_within("lse on GPU 1", l, ref_l, naive_l, BFLOAT16)
    ref = reference.attention_backward(dout, q, k, v, causal=True, upcast=True)
    naive = reference.attention_backward(dout, q, k, v, causal=True, upcast=False)
    for name, got, w, n in zip(("dq", "dk", "dv"), grads, ref, naive):
        assert_within(f"{name} on GPU 1", got, w, n, BFLOAT16)
    cc1 = cp.cuda.Device(1).compute_capability
    assert cupyflash._cuda_backend.kernel_path(BFLOAT16, 128, device=1).startswith(f"sm_{cc1}")

    # preallocated outputs and workspace on GPU 1, on one of GPU 1's streams
    with cp.cuda.Device(1):
        s1 = cp.cuda.Stream(non_blocking=True)
        out1, lse1 = nan_like(q.shape, BFLOAT16), cp.empty(l.shape, np.float32)
        dq1, dk1, dv1 = (nan_like(x.shape, BFLOAT16) for x in (q, k, v))
        ws1 = cupyflash.backward_workspace(q1)
        with s1:
            flash_attention(q1, k1, v1, causal=True, out=out1, lse=lse1)
            flash_attention_backward(do1, q1, k1, v1, out1, lse1, causal=True, dq=dq1, dk=dk1, dv=dv1,
                                     workspace=ws1)
        s1.synchronize()
    for name, a, b in (("out", out1, o), ("lse", lse1, l), ("dk", dk1, grads[1]), ("dv", dv1, grads[2])):
        assert a.device.id == 1
        assert np.array_equal(to_host64(a), to_host64(b)), f"{name}: {error_report(to_host64(a), to_host64(b))}"
    assert_within("dq on GPU 1 (preallocated)", dq1, ref[0], naive[0], BFLOAT16)


@pytest.mark.gpu
@pytest.mark.multigpu
def test_mixing_gpus_is_a_clear_error(rng):
    cp = _cp()
    host = backward_inputs(rng, FLOAT16, 1, 64, 64, 2, 64)
    q0, k0, v0, do0 = (to_gpu(x) for x in host)
    with cp.cuda.Device(1):
        q1, k1, v1, do1 = (cp.asarray(x) for x in host)
    o1, l1 = flash_attention(q1, k1, v1, return_lse=True)
    with pytest.raises(ValueError, match=r"^k is on GPU 1 \(cupy\) but q is on GPU 0 \(cupy\): all arrays must be on the same device"):
        flash_attention(q0, k1, v0)
    with pytest.raises(ValueError, match=r"^out is on GPU 0 \(cupy\) but the inputs are on GPU 1 \(cupy\)"):
        flash_attention(q1, k1, v1, out=cp.empty_like(q0))
    with pytest.raises(ValueError, match=r"^lse is on GPU 0 \(cupy\) but dout is on GPU 1 \(cupy\)"):
        flash_attention_backward(do1, q1, k1, v1, o1, to_gpu(cp.asnumpy(l1)))
    with pytest.raises(ValueError, match=r"^workspace\[0\] is on GPU 0 but the inputs are on GPU 1"):
        flash_attention_backward(do1, q1, k1, v1, o1, l1, workspace=cupyflash.backward_workspace(q0))
