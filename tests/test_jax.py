"""cupyflash.jax (issue 17, part 2), as specifications:

- ``jax.jit(jax.grad(loss))`` through cupyflash.jax gives the gradients of float64 attention
  within flash-attn's bound (2x naive attention's error in the same precision), as
  ``jax.nn.dot_product_attention`` with cuDNN does on the same inputs;
- it works under ``jax.vmap`` over a leading axis, and the kernels read XLA's buffers in place;
- a jitted train step of a small transformer with cupyflash attention lowers its loss;
- wrong arguments raise at trace time, naming the argument; without JAX, importing
  cupyflash.jax says JAX is missing and how to install it.
"""
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before JAX starts: leave memory to CuPy

import numpy as np
import pytest

from cupyflash import reference
from cupyflash._dtypes import BFLOAT16, FLOAT16, FLOAT32

from test_gpu_kernels import assert_within, backward_inputs

ROOT = Path(__file__).resolve().parents[1]


def test_without_jax_the_import_says_what_to_install():
    code = "import sys; sys.modules['jax'] = None\ntry:\n import cupyflash.jax\nexcept ImportError as e:\n print(e)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert "cupyflash.jax needs JAX" in r.stdout and "pip install 'cupyflash[jax]'" in r.stdout, r.stdout


def _jax():
    jax = pytest.importorskip("jax", reason="JAX is an optional extra: pip install 'cupyflash[jax]'")
    import cupyflash.jax as cfj
    return jax, cfj


def _gpu(jax):
    for platform in ("cuda", "gpu"):
        try:
            return jax.devices(platform)[0]
        except RuntimeError as e:
            reason = f"JAX has no CUDA backend: {e}"
    pytest.skip(reason)


@pytest.mark.parametrize("args,kwargs,error,pattern", [
    (((1, 8, 2, 64), (1, 8, 2, 64), (1, 8, 2, 64, 1)), {}, ValueError, r"^v must have 4 dimensions"),
    (((1, 8, 2, 64), (1, 8, 3, 64), (1, 8, 3, 64)), {}, ValueError, r"^q has 2 heads but k and v have 3"),
    (((1, 8, 2, 60), (1, 8, 2, 60), (1, 8, 2, 60)), {}, ValueError, r"^head_dim 60 is not supported"),
    (((1, 8, 4, 64), (1, 8, 3, 64), (1, 8, 3, 64)), {}, ValueError, r"^q has 4 heads but k and v have 3"),
    (((1, 8, 2, 64),) * 3, {"window_size": (-2, 0)}, ValueError, r"^window_size\[0\] must be >= -1"),
    (((1, 8, 2, 64),) * 3, {"softcap": -1.0}, ValueError, r"^softcap must be finite and >= 0"),
    (((1, 8, 2, 64),) * 3, {"causal": 1}, TypeError, r"^causal must be a bool, got int"),
    (((1, 8, 2, 64),) * 3, {"softmax_scale": -1.0}, ValueError, r"^softmax_scale must be finite and > 0"),
    (((1, 8, 2, 64),) * 3, {"return_lse": "yes"}, TypeError, r"^return_lse must be a bool"),
    (((1, 8, 2, 64),) * 3, {"alibi_slopes": (3,)}, ValueError, r"^alibi_slopes must have shape \(2,\) or \(1, 2\)"),
    (((1, 8, 2, 64),) * 3, {"sinks": (1, 2)}, ValueError, r"^sinks must have shape \(2,\)"),
    (((1, 8, 2, 64),) * 3, {"sinks": [0.0, 1.0]}, TypeError, r"^sinks must be a JAX array, got list"),
])
def test_bad_arguments_raise_at_trace_time_naming_the_argument(args, kwargs, error, pattern):
    jax, cfj = _jax()
    import jax.numpy as jnp
    specs = [jax.ShapeDtypeStruct(s, jnp.float16) for s in args]
    for name in ("alibi_slopes", "sinks"):  # a shape stands for a float32 array of that shape
        if isinstance(kwargs.get(name), tuple):
            kwargs = {**kwargs, name: jnp.zeros(kwargs[name], jnp.float32)}
    with pytest.raises(error, match=pattern):
        jax.eval_shape(lambda q, k, v: cfj.flash_attention(q, k, v, **kwargs), *specs)


def test_a_dtype_the_kernels_lack_is_a_value_error_at_trace_time():
    jax, cfj = _jax()
    import jax.numpy as jnp
    spec = jax.ShapeDtypeStruct((1, 8, 2, 64), jnp.int32)
    with pytest.raises(ValueError, match=r"^q has dtype int32; supported on the GPU: float16, bfloat16, float32"):
        jax.eval_shape(lambda q: cfj.flash_attention(q, q, q), spec)


def test_the_function_has_the_arrays_output_shapes():
    jax, cfj = _jax()
    import jax.numpy as jnp
    q = jax.ShapeDtypeStruct((2, 5, 3, 64), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 7, 3, 64), jnp.bfloat16)
    out, lse = jax.eval_shape(lambda q, k: cfj.flash_attention(q, k, k, return_lse=True), q, k)
    assert (out.shape, out.dtype, lse.shape, lse.dtype) == ((2, 5, 3, 64), jnp.bfloat16, (2, 3, 5), jnp.float32)


# ---- on the GPU ----------------------------------------------------------------------------

def _loss_grads(jax, attention, causal):
    import jax.numpy as jnp

    def loss(q, k, v, dout):
        return jnp.sum(attention(q, k, v, causal).astype(jnp.float32) * dout.astype(jnp.float32))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [FLOAT16, BFLOAT16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True])
def test_jit_grad_matches_float64_as_cudnn_does(rng, dtype, causal):
    jax, cfj = _jax()
    gpu = _gpu(jax)
    q, k, v, dout = backward_inputs(rng, dtype, 2, 512, 512, 4, 128)
    jq, jk, jv, jdo = (jax.device_put(x, gpu) for x in (q, k, v, dout))
    ours = _loss_grads(jax, lambda q, k, v, c: cfj.flash_attention(q, k, v, causal=c), causal)
    cudnn = _loss_grads(jax, lambda q, k, v, c: jax.nn.dot_product_attention(q, k, v, is_causal=c,
                                                                              implementation="cudnn"), causal)
    ref_o, _ = reference.attention(q, k, v, causal=causal, upcast=True)
    naive_o, _ = reference.attention(q, k, v, causal=causal, upcast=False)
    ref_g = reference.attention_backward(dout, q, k, v, causal=causal, upcast=True)
    naive_g = reference.attention_backward(dout, q, k, v, causal=causal, upcast=False)
    out = np.asarray(jax.jit(lambda q, k, v: cfj.flash_attention(q, k, v, causal=causal))(jq, jk, jv))
    assert_within(f"out [jit, causal={causal}]", out, ref_o, naive_o, dtype)
    for impl, fn in (("cupyflash.jax", ours), ("cuDNN", cudnn)):
        _, grads = fn(jq, jk, jv, jdo)
        for name, got, want, nv in zip(("dq", "dk", "dv"), grads, ref_g, naive_g):
            assert_within(f"{name} [{impl}, jit(grad), causal={causal}]", np.asarray(got), want, nv, dtype)


@pytest.mark.gpu
def test_vmap_over_a_leading_axis_is_the_same_as_a_loop(rng):
    jax, cfj = _jax()
    import jax.numpy as jnp
    gpu = _gpu(jax)
    q, k, v, dout = (np.stack(t) for t in zip(*(backward_inputs(rng, BFLOAT16, 2, 130, 200, 2, 64) for _ in range(3))))
    jq, jk, jv, jdo = (jax.device_put(x, gpu) for x in (q, k, v, dout))
    f = lambda q, k, v: cfj.flash_attention(q, k, v, causal=True)  # noqa: E731
    mapped = jax.jit(jax.vmap(f))(jq, jk, jv)
    looped = jnp.stack([f(jq[i], jk[i], jv[i]) for i in range(3)])
    assert mapped.shape == (3, 2, 130, 2, 64)
    assert np.array_equal(np.asarray(mapped), np.asarray(looped))
    # and its gradient, with k, v shared across the mapped axis
    g = jax.jit(jax.grad(lambda q, k, v: jnp.sum(jax.vmap(f, in_axes=(0, None, None))(q, k, v).astype(jnp.float32)
                                                 * jdo.astype(jnp.float32)), argnums=(0, 1, 2)))(jq, jk[0], jv[0])
    for i in range(3):
        want = reference.attention_backward(dout[i], q[i], k[0], v[0], causal=True, upcast=True)
        naive = reference.attention_backward(dout[i], q[i], k[0], v[0], causal=True, upcast=False)
        assert_within(f"dq [vmap {i}]", np.asarray(g[0][i]), want[0], naive[0], BFLOAT16)
    dk_want = sum(reference.attention_backward(dout[i], q[i], k[0], v[0], causal=True, upcast=True)[1] for i in range(3))
    dk_naive = sum(reference.attention_backward(dout[i], q[i], k[0], v[0], causal=True, upcast=False)[1].astype(np.float64)
                   for i in range(3))
    assert_within("dk [vmap, summed over the mapped axis]", np.asarray(g[1]), dk_want, dk_naive, BFLOAT16, factor=3.0)


@pytest.mark.gpu
@pytest.mark.parametrize("vmapped", [False, True], ids=["jit", "vmap"])
def test_every_variant_under_jit_grad_and_vmap_matches_float64(rng, vmapped):
    """GQA, a causal window, softcap, per-batch ALiBi slopes and sinks through jit(grad), sinks
    differentiated too; under vmap (sinks: one call per mapped element) each element as alone."""
    jax, cfj = _jax()
    import jax.numpy as jnp
    from test_variants import _keywords
    gpu = _gpu(jax)
    V = 2 if vmapped else 1
    B, S, H, H_kv, D = 2, 300, 4, 2, 128
    cases = []
    for _ in range(V):
        q, k, v, dout = backward_inputs(rng, BFLOAT16, B, S, S, H, D)
        cases.append((q, k[:, :, :H_kv].copy(), v[:, :, :H_kv].copy(), dout))
    kw = _keywords(rng, "mixed-causal", B, H)
    window, softcap, slopes, sinks = kw["window_size"], kw["softcap"], kw["alibi_slopes"], kw["sinks"]

    def loss(q, k, v, dout, sinks):
        f = lambda q, k, v: cfj.flash_attention(q, k, v, causal=True, window_size=window, softcap=softcap,  # noqa: E731
                                                alibi_slopes=jnp.asarray(slopes), sinks=sinks)
        out = jax.vmap(f)(q, k, v) if vmapped else f(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32))
    stacked = [np.stack(x) if vmapped else x[0] for x in zip(*cases)]
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 4)))(*(jax.device_put(x, gpu) for x in stacked),
                                                           jax.device_put(sinks, gpu))
    dsinks_want = dsinks_naive = 0.0
    for i, (q, k, v, dout) in enumerate(cases):
        want = reference.attention_backward(dout, q, k, v, upcast=True, **kw)
        naive = reference.attention_backward(dout, q, k, v, upcast=False, **kw)
        for name, g, w, n in zip(("dq", "dk", "dv"), grads[:3], want, naive):
            assert_within(f"{name} [{i}]", np.asarray(g[i] if vmapped else g), w, n, BFLOAT16)
        dsinks_want, dsinks_naive = dsinks_want + want[3], dsinks_naive + naive[3]
    assert_within("dsinks", np.asarray(grads[3]), dsinks_want, dsinks_naive, BFLOAT16,
                  scale=max(1.0, float(np.abs(dsinks_want).max())))


@pytest.mark.gpu
def test_the_kernels_read_xla_buffers_in_place():
    """_as_cupy views the buffer's own memory: the pointer the CUDA array interface names."""
    jax, cfj = _jax()
    import cupy

    class FakeBuffer:  # what buffer_callback hands over: shape, dtype, __cuda_array_interface__
        def __init__(self, array):
            self.shape, self.dtype = array.shape, array.dtype
            self.__cuda_array_interface__ = array.__cuda_array_interface__

    x = cupy.arange(2 * 3 * 4 * 8, dtype=cupy.float16).reshape(2, 3, 4, 8)
    view = cfj._as_cupy(FakeBuffer(x), (2, 3, 4, 8))
    assert view.data.ptr == x.data.ptr and view.dtype == x.dtype
    folded = cfj._as_cupy(FakeBuffer(x.reshape(1, 2, 3, 4, 8)), cfj._fold((1, 2, 3, 4, 8), 3))
    assert folded.shape == (2, 3, 4, 8) and folded.data.ptr == x.data.ptr


@pytest.mark.gpu
def test_a_jitted_train_step_of_a_small_transformer_lowers_its_loss(rng):
    jax, cfj = _jax()
    import jax.numpy as jnp
    gpu = _gpu(jax)
    V, B, S, H, D = 16, 8, 64, 2, 64
    E = H * D
    tokens = jax.device_put(rng.integers(0, V, (B, S)).astype(np.int32), gpu)  # predict the previous token

    def init(key):
        ks = jax.random.split(key, 5)
        return {"emb": jax.random.normal(ks[0], (V, E)) * 0.1, "pos": jax.random.normal(ks[1], (S, E)) * 0.1,
                "qkv": jax.random.normal(ks[2], (E, 3 * E)) / np.sqrt(E),
                "proj": jax.random.normal(ks[3], (E, E)) / np.sqrt(E), "out": jax.random.normal(ks[4], (E, V)) / np.sqrt(E)}

    def loss(p, tokens):
        x = p["emb"][tokens] + p["pos"]
        q, k, v = jnp.split(x @ p["qkv"], 3, axis=-1)
        q, k, v = (t.reshape(B, S, H, D).astype(jnp.bfloat16) for t in (q, k, v))
        a = cfj.flash_attention(q, k, v, causal=True).reshape(B, S, E).astype(jnp.float32)
        logits = (x + a @ p["proj"]) @ p["out"]
        target = jnp.roll(tokens, 1, axis=1)[:, 1:]
        logp = jax.nn.log_softmax(logits[:, 1:])
        return -jnp.mean(jnp.take_along_axis(logp, target[..., None], axis=-1))

    @jax.jit
    def step(p, m, v, t, tokens):  # Adam, lr 3e-3
        value, g = jax.value_and_grad(loss)(p, tokens)
        m = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, m, g)
        v = jax.tree.map(lambda v, g: 0.999 * v + 0.001 * g * g, v, g)
        p = jax.tree.map(lambda w, m, v: w - 3e-3 * (m / (1 - 0.9 ** t)) / (jnp.sqrt(v / (1 - 0.999 ** t)) + 1e-8),
                         p, m, v)
        return p, m, v, value

    params = jax.device_put(init(jax.random.PRNGKey(0)), gpu)
    m, v = (jax.tree.map(jnp.zeros_like, params) for _ in range(2))
    losses = []
    for t in range(1, 61):  # the same model with XLA's attention on the CPU: 2.78 -> 0.01
        params, m, v, value = step(params, m, v, t, tokens)
        losses.append(float(value))
    assert all(np.isfinite(losses)), losses
    assert losses[-1] < 0.25 * losses[0], f"loss went from {losses[0]:.3f} to {losses[-1]:.3f}: {losses[::10]}"


# ---- packed sequences (varlen) under jax ----------------------------------------------------

def test_varlen_needs_static_maxima_and_checks_at_trace_time():
    jax, cfj = _jax()
    import jax.numpy as jnp
    q = jax.ShapeDtypeStruct((10, 2, 64), jnp.bfloat16)
    cu = jax.ShapeDtypeStruct((3,), jnp.int32)
    with pytest.raises(ValueError, match=r"^max_seqlen_q must be given under JAX"):
        jax.eval_shape(lambda q, cu: cfj.flash_attention_varlen(q, q, q, cu, cu, max_seqlen_q=None, max_seqlen_k=5),
                       q, cu)
    with pytest.raises(ValueError, match=r"^cu_seqlens_q must have dtype int32, got float32"):
        jax.eval_shape(lambda q, cu: cfj.flash_attention_varlen(q, q, q, cu.astype(jnp.float32), cu, max_seqlen_q=5,
                                                                max_seqlen_k=5), q, cu)
    out, lse = jax.eval_shape(lambda q, cu: cfj.flash_attention_varlen(q, q, q, cu, cu, max_seqlen_q=5,
                                                                       max_seqlen_k=5, return_lse=True), q, cu)
    assert (out.shape, lse.shape) == ((10, 2, 64), (2, 10))


@pytest.mark.gpu
def test_varlen_under_jit_grad_matches_each_sequence_alone(rng):
    """Packed sequences with GQA, a causal window and sinks through jit(grad): each sequence's
    gradients (dsinks summed) against the float64 reference of that sequence alone."""
    jax, cfj = _jax()
    import jax.numpy as jnp
    from test_varlen import offsets, packed_inputs, reference_by_sequence
    gpu = _gpu(jax)
    lengths = [70, 0, 1, 300]
    q, k, v, dout, cu, _ = packed_inputs(rng, BFLOAT16, lengths, lengths, H=4, H_kv=2, D=64)
    sinks = rng.uniform(-1, 2, 4).astype(np.float32)
    kw = dict(causal=True, window_size=(50, -1))

    def loss(q, k, v, dout, sinks, cu):
        out = cfj.flash_attention_varlen(q, k, v, cu, cu, max_seqlen_q=300, max_seqlen_k=300, sinks=sinks, **kw)
        return jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32))
    put = lambda x: jax.device_put(x, gpu)  # noqa: E731
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 4)))(*(put(x) for x in (q, k, v, dout, sinks, offsets(lengths))))
    full_kw = {**kw, "sinks": sinks}
    _, _, want = reference_by_sequence(q, k, v, dout, cu, cu, full_kw, upcast=True)
    _, _, naive = reference_by_sequence(q, k, v, dout, cu, cu, full_kw, upcast=False)
    for name, g, w, n in zip(("dq", "dk", "dv", "dsinks"), grads, want, naive):
        assert_within(f"{name} [varlen jit(grad)]", np.asarray(g), w, n, BFLOAT16,
                      scale=max(1.0, float(np.abs(w).max())) if name == "dsinks" else 1.0)
