"""How much of a short call is host time: for seqlen 128 and 256 (batch * seqlen = 16384,
heads * head_dim = 2048), the GPU time of one call (CUDA events recorded back to back, as
`cupyflash bench` does) beside the host time of one call (wall clock of N calls enqueued
without a sync, divided by N), for cupyflash's public API and for PyTorch SDPA's flash backend
when present. Host >= GPU means the benchmark measures the host path, not the kernels.
Then the top entries of a cProfile of cupyflash's calls.

    PYTHONPATH=. python bench/host_path.py [--calls 300] [--json PATH]
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time

import numpy as np
import cupy

import cupyflash
from cupyflash._dtypes import BFLOAT16

from tune import time_ms, time_torch_ms  # same directory (bench/)


def host_us(fn, calls: int, sync) -> float:
    """Wall-clock microseconds per call of `calls` calls enqueued back to back (one sync before
    and after, outside the timed span)."""
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    sync()
    return (t1 - t0) / calls * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--json")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows, profiles = [], {}
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except Exception:
        torch = None
    for S in (128, 256):
        for D in (64, 128):
            for causal in (False, True):
                B, H = 16384 // S, 2048 // D
                q, k, v, do = (cupy.asarray(rng.standard_normal((B, S, H, D), dtype=np.float32).astype(BFLOAT16))
                               for _ in range(4))
                out, lse = cupyflash.flash_attention(q, k, v, causal=causal, return_lse=True)
                fwd = lambda: cupyflash.flash_attention(q, k, v, causal=causal)  # noqa: E731
                bwd = lambda: cupyflash.flash_attention_backward(do, q, k, v, out, lse, causal=causal)  # noqa: E731
                sync = cupy.cuda.Device().synchronize
                for mode, fn in (("fwd", fwd), ("bwd", bwd)):
                    row = dict(impl="cupyflash", mode=mode, S=S, D=D, causal=causal,
                               gpu_us=time_ms(fn, repeats=30) * 1e3, host_us=host_us(fn, args.calls, sync))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if (S, D, causal) == (128, 64, False):
                        prof = cProfile.Profile()
                        prof.enable()
                        for _ in range(args.calls):
                            fn()
                        prof.disable()
                        sync()
                        profiles[mode] = prof
                if torch is None:
                    continue
                tq, tk, tv, tdo = (torch.from_dlpack(x).transpose(1, 2) for x in (q, k, v, do))
                tq, tk, tv = (x.detach().requires_grad_(True) for x in (tq, tk, tv))

                def tfwd():
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)

                tout = tfwd()
                tbwd = lambda: torch.autograd.grad(tout, (tq, tk, tv), tdo, retain_graph=True)  # noqa: E731
                for mode, fn in (("fwd", tfwd), ("bwd", tbwd)):
                    row = dict(impl="sdpa-flash", mode=mode, S=S, D=D, causal=causal,
                               gpu_us=time_torch_ms(fn) * 1e3, host_us=host_us(fn, args.calls, torch.cuda.synchronize))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    for mode, prof in profiles.items():
        print(f"\n--- cProfile, cupyflash {mode}, S=128 D=64, {args.calls} calls (tottime) ---")
        pstats.Stats(prof).sort_stats("tottime").print_stats(14)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(gpu=cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(), rows=rows), f, indent=1)
    print(f"\n{'impl':>10} {'mode':>4} {'S':>4} {'D':>4} {'causal':>6} {'GPU us':>8} {'host us':>8}")
    for r in rows:
        print(f"{r['impl']:>10} {r['mode']:>4} {r['S']:>4} {r['D']:>4} {str(r['causal']):>6} "
              f"{r['gpu_us']:>8.1f} {r['host_us']:>8.1f}")


if __name__ == "__main__":
    main()
