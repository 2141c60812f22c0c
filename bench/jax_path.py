"""cupyflash inside JAX, timed beside JAX's cuDNN attention in one process (issue 17, part 2).

- Forward+backward (jit(grad(sum(attention * w)))) and forward at B 4, S 4096, H 16, d 128,
  bf16: cupyflash.jax under jit, jax.nn.dot_product_attention(implementation="cudnn") under
  jit, and the eager DLPack custom_vjp of examples/jax_custom_vjp.py. Median wall time per
  call including the wait for the result.
- Per-call overhead: a jitted forward at a tiny shape, 2000 calls dispatched back to back
  (host wall clock / calls), cupyflash.jax beside cuDNN.

    PYTHONPATH=. python bench/jax_path.py [--json PATH]
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import cupyflash.jax as cfj  # noqa: E402
from cupyflash._dtypes import BFLOAT16  # noqa: E402

from host_path import meta  # noqa: E402  (same directory)

_spec = importlib.util.spec_from_file_location(
    "jax_custom_vjp", Path(__file__).resolve().parents[1] / "examples" / "jax_custom_vjp.py")
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)


def dispatch_us(fn, calls: int) -> float:
    jax.block_until_ready(fn())
    t0 = time.perf_counter()
    for _ in range(calls):
        r = fn()
    t1 = time.perf_counter()
    jax.block_until_ready(r)
    return (t1 - t0) / calls * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    B, S, H, D = 4, 4096, 16, 128
    q, k, v, w = (jnp.asarray(rng.standard_normal((B, S, H, D)).astype(BFLOAT16)) for _ in range(4))
    rows = []
    for causal in (False, True):
        flops_fwd = 4 * B * S * S * H * D / (2 if causal else 1)
        ours = functools.partial(cfj.flash_attention, causal=causal)
        cudnn = example._jax_attention("bfloat16", causal)
        eager = lambda q, k, v: example.flash_attention_jax(q, k, v, causal)  # noqa: E731
        calls = {
            ("cupyflash.jax, jit", "fwd"): functools.partial(jax.jit(ours), q, k, v),
            ("cupyflash.jax, jit", "fwd+bwd"): functools.partial(
                jax.jit(jax.grad(example._loss(ours, w), argnums=(0, 1, 2))), q, k, v),
            ("jax cudnn, jit", "fwd"): functools.partial(jax.jit(cudnn), q, k, v),
            ("jax cudnn, jit", "fwd+bwd"): functools.partial(
                jax.jit(jax.grad(example._loss(cudnn, w), argnums=(0, 1, 2))), q, k, v),
            ("cupyflash custom_vjp, eager", "fwd+bwd"): functools.partial(
                jax.grad(example._loss(eager, w), argnums=(0, 1, 2)), q, k, v),
        }
        for (path, mode), fn in calls.items():
            t = example._time_per_call(fn)
            flops = flops_fwd * (3.5 if mode == "fwd+bwd" else 1.0)
            rows.append(dict(path=path, mode=mode, causal=causal, shape=[B, S, H, D], ms=t * 1e3,
                             tflops=flops / t / 1e12))
            print(json.dumps(rows[-1]), flush=True)
    tq = jnp.asarray(rng.standard_normal((1, 128, 2, 64)).astype(BFLOAT16))
    for path, f in (("cupyflash.jax, jit", jax.jit(cfj.flash_attention)),
                    ("jax cudnn, jit", jax.jit(example._jax_attention("bfloat16", False)))):
        rows.append(dict(path=path, mode="dispatch", causal=False, shape=[1, 128, 2, 64],
                         us_per_call=dispatch_us(lambda f=f: f(tq, tq, tq), args.calls)))
        print(json.dumps(rows[-1]), flush=True)
    info = dict(meta(), jax=jax.__version__)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(meta=info, rows=rows), fh, indent=1)
    print(f"\n{info['gpu']}, JAX {jax.__version__}, bf16")
    for r in rows:
        if r["mode"] == "dispatch":
            print(f"{r['path']:>30} {'dispatch':>8} {str(r['shape']):>18} {r['us_per_call']:8.1f} us/call")
        else:
            print(f"{r['path']:>30} {r['mode']:>8} causal={str(r['causal']):5} {r['ms']:8.2f} ms {r['tflops']:6.0f} TFLOP/s")


if __name__ == "__main__":
    main()
