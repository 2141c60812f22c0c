"""cupyflash inside JAX: a ``jax.custom_vjp`` whose forward and backward are cupyflash's CUDA
kernels, the arrays crossing between JAX and CuPy through DLPack without a copy.

    python examples/jax_custom_vjp.py --check    # jax.grad vs jax.nn.dot_product_attention; exit 1 on mismatch
    python examples/jax_custom_vjp.py --bench    # time per call vs JAX's cuDNN path, B=4 S=4096 H=16 D=128 bf16
    python examples/jax_custom_vjp.py --bench --json jax_vjp.json

The pattern (``flash_attention_jax`` below):

- JAX -> CuPy: ``cupy.from_dlpack(x)``. CuPy hands JAX its current stream and JAX makes that
  stream wait until x is written: no copy, no host synchronisation.
- cupyflash runs its kernels on CuPy's current stream.
- CuPy -> JAX: ``jnp.from_dlpack(y)``, the one line back. JAX hands CuPy its stream and CuPy
  makes it wait for its own current stream: no copy either.
- The forward saves (q, k, v, out, lse) as residuals; the backward hands them back to
  ``cupyflash.flash_attention_backward``.
- Before returning, each side waits for CuPy's stream (``_fence``): once the cupy views of
  JAX's buffers are dropped JAX may reuse that memory, and it cannot see kernels still
  queued on CuPy's stream. That is one host synchronisation per forward and per backward.

What it costs against ``jax.nn.dot_product_attention(..., implementation="cudnn")`` under
``jax.jit`` (``--bench`` measures it; the README quotes the numbers):

- It runs eagerly: cupyflash launches from Python, so ``flash_attention_jax`` cannot sit
  inside ``jax.jit`` (a traced value has no memory to hand over; it raises a TypeError
  saying so). ``cupyflash.jax.flash_attention`` is the jittable version (buffer_callback).
- Per call: a few microseconds per DLPack handoff (3 in + 2 out forward, 6 in + 3 out
  backward), the Python checks and launches, and the host waiting at each fence, so JAX
  cannot queue work ahead while attention runs.
- The kernels themselves: cupyflash's mma.sync kernels against cuDNN's (bench/NOTES.md).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave memory for CuPy

import numpy as np  # noqa: E402
import cupy  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

try:
    import cupyflash  # noqa: E402
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import cupyflash  # noqa: E402
from cupyflash import reference  # noqa: E402
from cupyflash._dtypes import BFLOAT16, FLOAT16, FLOAT32  # noqa: E402


# ---- the handoff -------------------------------------------------------------------------

def _to_cupy(x: jax.Array) -> cupy.ndarray:
    """JAX -> CuPy, zero-copy; CuPy's current stream waits for x (DLPack stream handshake)."""
    if isinstance(x, jax.core.Tracer):
        raise TypeError("flash_attention_jax runs eagerly (cupyflash launches its kernels from "
                        "Python): call it outside jax.jit / jax.vmap, or use cupyflash.jax.flash_attention, "
                        "which works under jit, grad and vmap")
    return cupy.from_dlpack(x)


def _to_jax(x: cupy.ndarray) -> jax.Array:
    """CuPy -> JAX, zero-copy; JAX's stream waits for CuPy's current stream."""
    return jnp.from_dlpack(x)


def _fence(x: cupy.ndarray) -> None:
    """Wait for the work queued on CuPy's current stream of x's device: after this the cupy
    views of JAX buffers may be dropped (JAX may then reuse their memory)."""
    cupy.cuda.get_current_stream(x.device.id).synchronize()


# ---- the custom_vjp ----------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def flash_attention_jax(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool = False) -> jax.Array:
    """cupyflash attention on JAX arrays (batch, seqlen, heads, head_dim), differentiable
    with ``jax.grad``. Eager only (see the module docstring)."""
    return _forward(q, k, v, causal)[0]


def _forward(q, k, v, causal):
    o, lse = cupyflash.flash_attention(_to_cupy(q), _to_cupy(k), _to_cupy(v), causal=causal,
                                       return_lse=True)
    _fence(o)
    return _to_jax(o), _to_jax(lse)


def _fwd(q, k, v, causal):
    out, lse = _forward(q, k, v, causal)
    return out, (q, k, v, out, lse)


def _bwd(causal, residuals, g):
    q, k, v, out, lse = (_to_cupy(x) for x in residuals)
    dq, dk, dv = cupyflash.flash_attention_backward(_to_cupy(g), q, k, v, out, lse, causal=causal)
    _fence(dq)
    return _to_jax(dq), _to_jax(dk), _to_jax(dv)


flash_attention_jax.defvjp(_fwd, _bwd)


# ---- check: the gradients of jax.nn.dot_product_attention --------------------------------

DTYPES = {"float32": FLOAT32, "bfloat16": BFLOAT16, "float16": FLOAT16}
#: absolute slack on top of 2x the peers' error, in units of the largest reference value
ATOL = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 2e-3}


def _jax_attention(dtype_name: str, causal: bool):
    """jax.nn.dot_product_attention on cuDNN for half types, XLA for float32."""
    impl = None if dtype_name == "float32" else "cudnn"
    return functools.partial(jax.nn.dot_product_attention, is_causal=causal, implementation=impl)


def _loss(attention, w):
    """sum(attention(q, k, v) * w): its gradient with respect to out is exactly w."""
    w32 = w.astype(jnp.float32)
    return lambda q, k, v: jnp.sum(attention(q, k, v).astype(jnp.float32) * w32)


def _max_err(got, want) -> float:
    return float(np.max(np.abs(np.asarray(got, dtype=np.float64) - want), initial=0.0))


def check_case(rng, dtype_name: str, shape: tuple, causal: bool) -> dict:
    """One problem: cupyflash's jax.grad against JAX's, both against a float64 reference.

    Passes when cupyflash's error is at most 2x the larger of JAX's error and naive
    attention's error in the same precision, plus ATOL x the largest reference value."""
    B, S, H, D = shape
    q, k, v, w = (rng.standard_normal((B, S, H, D)).astype(DTYPES[dtype_name]) for _ in range(4))
    jq, jk, jv, jw = (jnp.asarray(x) for x in (q, k, v, w))

    flash = jax.grad(_loss(lambda q, k, v: flash_attention_jax(q, k, v, causal), jw), argnums=(0, 1, 2))
    peer = jax.jit(jax.grad(_loss(_jax_attention(dtype_name, causal), jw), argnums=(0, 1, 2)))
    with jax.default_matmul_precision("highest"):  # no TF32 in the float32 peer
        got_peer = jax.block_until_ready(peer(jq, jk, jv))
    got_flash = jax.block_until_ready(flash(jq, jk, jv))
    out_flash = np.asarray(flash_attention_jax(jq, jk, jv, causal), dtype=np.float64)

    ref_out = reference.attention(q, k, v, causal=causal, upcast=True)[0]
    naive_out = reference.attention(q, k, v, causal=causal, upcast=False)[0]
    ref = reference.attention_backward(w, q, k, v, causal=causal, upcast=True)
    naive = reference.attention_backward(w, q, k, v, causal=causal, upcast=False)

    row = {"dtype": dtype_name, "shape": list(shape), "causal": causal,
           "peer": "cudnn" if dtype_name != "float32" else "xla (highest precision)", "ok": True}
    for name, f, p, r, n in [("out", out_flash, None, ref_out, naive_out),
                             *zip(("dq", "dk", "dv"), got_flash, got_peer, ref, naive)]:
        err = _max_err(f, r)
        err_naive = _max_err(n, r)
        err_peer = _max_err(p, r) if p is not None else None
        bound = 2 * max(err_peer or 0.0, err_naive) + ATOL[dtype_name] * max(1.0, float(np.abs(r).max()))
        row[name] = {"err": err, "err_jax": err_peer, "err_naive": err_naive, "bound": bound,
                     "vs_jax": _max_err(f, np.asarray(p, np.float64)) if p is not None else None}
        row["ok"] &= bool(np.isfinite(err) and err <= bound)
    return row


def check(quick: bool = False, seed: int = 0) -> tuple[bool, list[dict]]:
    """Every (dtype, shape, causal) case; ``quick`` runs a subset (for the test suite)."""
    dtypes = ("bfloat16", "float32") if quick else ("bfloat16", "float16", "float32")
    shapes = ((2, 512, 4, 64),) if quick else ((2, 512, 4, 64), (1, 1024, 2, 128))
    rng = np.random.default_rng(seed)
    rows = [check_case(rng, d, s, c) for d in dtypes for s in shapes for c in (False, True)]
    return all(r["ok"] for r in rows), rows


def format_check(rows: list[dict]) -> list[str]:
    lines = ["| dtype | B,S,H,D | causal | JAX peer | grad | cupyflash err | JAX err | naive err | bound | |cupyflash - JAX| | ok |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for name in ("out", "dq", "dk", "dv"):
            e = r[name]
            vs = "-" if e["vs_jax"] is None else f"{e['vs_jax']:.2e}"
            err_jax = "-" if e["err_jax"] is None else f"{e['err_jax']:.2e}"
            lines.append(f"| {r['dtype']} | {','.join(map(str, r['shape']))} | {r['causal']} | {r['peer']} | "
                         f"{name} | {e['err']:.2e} | {err_jax} | {e['err_naive']:.2e} | "
                         f"{e['bound']:.2e} | {vs} | {'yes' if e['err'] <= e['bound'] else 'NO'} |")
    return lines


# ---- bench: time per call ----------------------------------------------------------------

def _time_per_call(fn, warmup: int = 3, iters: int = 20) -> float:
    """Median seconds of one call including the wait for its result (host clock: JAX and
    CuPy run on different streams, so one clock for both)."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _cupy_call(fn):
    """A cupy call made blockable like a JAX one."""
    def run():
        r = fn()
        cupy.cuda.get_current_stream().synchronize()
        return r
    return run


def bench(B: int = 4, S: int = 4096, H: int = 16, D: int = 128, causal_cases=(False, True),
          seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    q, k, v, w = (rng.standard_normal((B, S, H, D)).astype(BFLOAT16) for _ in range(4))
    jq, jk, jv, jw = (jnp.asarray(x) for x in (q, k, v, w))
    cq, ck, cv, cw = (cupy.asarray(x) for x in (q, k, v, w))
    rows = []
    for causal in causal_cases:
        flops_fwd = 4 * B * S * S * H * D / (2 if causal else 1)
        flash_loss = _loss(lambda q, k, v: flash_attention_jax(q, k, v, causal), jw)
        cudnn = _jax_attention("bfloat16", causal)
        calls = {
            ("jax cudnn, jit", "fwd"): functools.partial(jax.jit(cudnn), jq, jk, jv),
            ("jax cudnn, jit", "fwd+bwd"): functools.partial(
                jax.jit(jax.grad(_loss(cudnn, jw), argnums=(0, 1, 2))), jq, jk, jv),
            ("cupyflash custom_vjp, eager", "fwd"): functools.partial(flash_attention_jax, jq, jk, jv, causal),
            ("cupyflash custom_vjp, eager", "fwd+bwd"): functools.partial(
                jax.grad(flash_loss, argnums=(0, 1, 2)), jq, jk, jv),
            ("cupyflash on cupy arrays", "fwd"): _cupy_call(
                lambda: cupyflash.flash_attention(cq, ck, cv, causal=causal)),
            ("cupyflash on cupy arrays", "fwd+bwd"): _cupy_call(lambda: cupyflash.flash_attention_backward(
                cw, cq, ck, cv, *cupyflash.flash_attention(cq, ck, cv, causal=causal, return_lse=True),
                causal=causal)),
        }
        for (path, mode), fn in calls.items():
            t = _time_per_call(fn)
            flops = flops_fwd * (3.5 if mode == "fwd+bwd" else 1.0)
            rows.append({"path": path, "mode": mode, "causal": causal, "ms": t * 1e3,
                         "tflops": flops / t / 1e12, "shape": [B, S, H, D], "dtype": "bfloat16"})
    # the handoff alone, on a tiny array: what the interop adds per array and per fence
    tiny = jnp.ones((1, 8, 1, 8), jnp.bfloat16)
    small = cupy.ones((1, 8, 1, 8), cupy.float32)
    for path, fn in [("DLPack JAX -> CuPy (one array)", lambda: _to_cupy(tiny)),
                     ("DLPack CuPy -> JAX (one array)", lambda: _to_jax(small)),
                     ("fence (idle stream)", lambda: _fence(small))]:
        n = 1000
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        rows.append({"path": path, "mode": "overhead", "causal": None,
                     "ms": (time.perf_counter() - t0) / n * 1e3, "tflops": None})
    return rows


def format_bench(rows: list[dict]) -> list[str]:
    lines = ["| path | mode | causal | ms per call | TFLOP/s |", "|---|---|---|---|---|"]
    for r in rows:
        tf = "-" if r["tflops"] is None else f"{r['tflops']:.3g}"
        ms = f"{r['ms'] * 1e3:.1f} us" if r["mode"] == "overhead" else f"{r['ms']:.3f}"
        causal = "-" if r["causal"] is None else str(r["causal"])
        lines.append(f"| {r['path']} | {r['mode']} | {causal} | {ms} | {tf} |")
    return lines


def _environment() -> dict:
    dev = cupy.cuda.Device()
    return {"gpu": cupy.cuda.runtime.getDeviceProperties(dev.id)["name"].decode(),
            "jax": jax.__version__, "cupy": cupy.__version__, "cupyflash": cupyflash.__version__,
            "jax_devices": [str(d) for d in jax.devices()]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare gradients with jax.nn.dot_product_attention")
    parser.add_argument("--bench", action="store_true", help="time per call against JAX's cuDNN path")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if not (args.check or args.bench):
        parser.error("give --check and/or --bench")
    result = {"environment": _environment()}
    print(result["environment"])
    ok = True
    if args.check:
        ok, rows = check()
        result["check"] = rows
        print("\n".join(format_check(rows)))
        print("check:", "PASSED" if ok else "FAILED")
    if args.bench:
        rows = bench()
        result["bench"] = rows
        print("\n".join(format_bench(rows)))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
