"""How many of the softcapped forward's exponentials should run on the FMA pipe (bench/NOTES.md,
"softcap forward: exp2 off the MUFU unit").

With a softcap, each score costs two MUFU ops on the Hopper forward (tanh and exp2), which is
as many as the MUFU unit issues while the tensor cores do that score's products at head_dim 128.
``exp2_fma`` (kernels_cu/softmax.cuh) computes 2^x with a polynomial on the FMA pipe; the macro
CUPYFLASH_SOFTCAP_EXP2_FMA_EVERY picks every how-many-th column pair takes it (0: none). This
script compiles the softcapped forward with each setting (the macro through an NVRTC -D option,
one module each), checks each against float64, and times it beside the plain forward, in one
process on the same inputs.

    PYTHONPATH=. python bench/softcap_exp2.py [--json PATH]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform

import numpy as np
import cupy
from cupy_backends.cuda.libs import nvrtc

import cupyflash
from cupyflash import _launch, _plans, reference
from cupyflash._dtypes import BFLOAT16, FLOAT16

from tune import flops, time_ms  # same directory (bench/)

SETTINGS = (0, 1, 2, 4)  # 0: every exp2 on MUFU (the kernels before this change)
B, S, H, D, SOFTCAP = 4, 4096, 16, 128, 30.0


def use_setting(every: int) -> None:
    """Compile the kernels from here on with CUPYFLASH_SOFTCAP_EXP2_FMA_EVERY = every."""
    _launch.NVRTC_OPTIONS = (*_launch.NVRTC_OPTIONS[:1], f"-DCUPYFLASH_SOFTCAP_EXP2_FMA_EVERY={every}")
    _launch._module.cache_clear()
    _launch._device_kernel.cache_clear()
    _plans.clear()


def check(every: int, rng) -> dict:
    """Max error of out and lse against float64 next to naive attention's, fp16 and bf16, causal and not."""
    worst = {}
    for dtype in (BFLOAT16, FLOAT16):
        for causal in (False, True):
            q, k, v = (rng.standard_normal((1, 700, 2, D)).astype(dtype) for _ in range(3))
            o, l = cupyflash.flash_attention(*(cupy.asarray(x) for x in (q, k, v)), causal=causal, softcap=SOFTCAP,
                                             return_lse=True)
            ref_o, ref_l = reference.attention(q, k, v, causal=causal, softcap=SOFTCAP, upcast=True)
            naive_o, naive_l = reference.attention(q, k, v, causal=causal, softcap=SOFTCAP, upcast=False)
            for name, got, want, naive in (("out", o, ref_o, naive_o), ("lse", l, ref_l, naive_l)):
                err = float(np.abs(cupy.asnumpy(got).astype(np.float64) - want).max())
                ratio = err / max(float(np.abs(naive.astype(np.float64) - want).max()), 1e-30)
                key = f"{name} {np.dtype(dtype).name if dtype != BFLOAT16 else 'bf16'}"
                worst[key] = max(worst.get(key, 0.0), ratio)
    return worst


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    q, k, v = (cupy.asarray(rng.standard_normal((B, S, H, D)).astype(BFLOAT16)) for _ in range(3))
    rows = []
    for every in SETTINGS:
        use_setting(every)
        errors = check(every, rng)
        for causal in (False, True):
            plain = time_ms(lambda: cupyflash.flash_attention(q, k, v, causal=causal), repeats=20)
            capped = time_ms(lambda: cupyflash.flash_attention(q, k, v, causal=causal, softcap=SOFTCAP), repeats=20)
            f = flops(B, H, S, D, causal, "fwd")
            rows.append(dict(every=every, causal=causal, plain_ms=plain, softcap_ms=capped, cost=capped / plain,
                             softcap_tflops=f / capped / 1e9, error_over_naive=errors))
            print(json.dumps(rows[-1]), flush=True)
    meta = dict(gpu=cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(), date=str(datetime.date.today()),
                cupy=cupy.__version__, nvrtc=".".join(map(str, nvrtc.getVersion())),
                python=platform.python_version(), shape=dict(B=B, S=S, H=H, D=D, softcap=SOFTCAP, dtype="bfloat16"))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(meta=meta, rows=rows), fh, indent=1)
    print(f"\n{meta['gpu']}, B {B} S {S} H {H} D {D} bf16, softcap {SOFTCAP}")
    print(f"{'every':>5} {'causal':>6} {'plain ms':>9} {'softcap ms':>10} {'cost':>6} {'TFLOP/s':>8}  worst error / naive's")
    for r in rows:
        worst = max(r["error_over_naive"].values())
        print(f"{r['every']:>5} {str(r['causal']):>6} {r['plain_ms']:9.3f} {r['softcap_ms']:10.3f} {r['cost']:6.3f} "
              f"{r['softcap_tflops']:8.1f}  {worst:.2f}")


if __name__ == "__main__":
    main()
