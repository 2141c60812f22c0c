"""Host time per call: how long a call takes from entry until its kernels are enqueued.

Method (issue 17): at a small shape, where each kernel runs for a few microseconds, N calls
(2000 by default) are enqueued back to back with no sync between them; wall clock / N is the
host time per call, as long as the GPU keeps up (the table shows the GPU time per call too:
host time above it is host-bound). The variant rows call with grouped-query attention, a
causal window, softcap, ALiBi and sinks at once. Measured for cupyflash's public API (fresh outputs, and
preallocated out/lse/grads/workspace as a CUDA-graph user would pass), for PyTorch SDPA
(flash, cuDNN) and for a CuPy matmul on the same inputs, in one process; then the same at the
short-sequence shapes of the published benchmark (batch * seqlen = 16384), and a cProfile of
cupyflash's calls.

    PYTHONPATH=. python bench/host_path.py [--calls 2000] [--json PATH]
"""
from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import platform
import pstats
import time

import numpy as np
import cupy

import cupyflash
from cupyflash import _cuda_backend
from cupyflash._dtypes import BFLOAT16

from tune import time_ms, time_torch_ms  # same directory (bench/)

# (batch, seqlen, heads, head_dim): the small shape of the host-time target, then the short
# rows of the published benchmark
TINY = [(1, 128, 2, 64), (1, 128, 2, 128)]
SHORT = [(128, 128, 32, 64), (128, 128, 16, 128), (64, 256, 16, 128)]


def host_us(fn, calls: int, sync, rounds: int = 1) -> float:
    """Wall-clock microseconds per call of `calls` calls enqueued back to back (one sync before
    and after, outside the timed span); the median of `rounds` such runs (the lent hosts' timings
    move by 1.5x from run to run)."""
    times = []
    for _ in range(rounds):
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        sync()
        times.append((t1 - t0) / calls * 1e6)
    return float(np.median(times))


def cupyflash_cases(q, k, v, do, causal):
    out, lse = cupyflash.flash_attention(q, k, v, causal=causal, return_lse=True)
    bufs = dict(out=cupy.empty_like(q), lse=cupy.empty_like(lse))
    grads = dict(dq=cupy.empty_like(q), dk=cupy.empty_like(k), dv=cupy.empty_like(v),
                 workspace=cupyflash.backward_workspace(q))
    # inputs at new pointers on every call: more sets than a plan keeps filled parameters for
    sets = [tuple(x.copy() for x in (q, k, v)) for _ in range(_cuda_backend._PARAM_CACHE_SIZE + 16)]
    turn = iter(range(10 ** 9))
    # grouped-query attention (one kv head) with a causal window, softcap, ALiBi and sinks
    H = q.shape[2]
    kv = (k[:, :, :1], v[:, :, :1])
    var = dict(causal=causal, window_size=(64, 0), softcap=30.0, alibi_slopes=cupy.full((H,), 0.25, cupy.float32),
               sinks=cupy.zeros((H,), cupy.float32))
    vout, vlse = cupyflash.flash_attention(q, *kv, return_lse=True, **var)
    return {
        "fwd": lambda: cupyflash.flash_attention(q, k, v, causal=causal),
        "fwd new ptrs": lambda: cupyflash.flash_attention(*sets[next(turn) % len(sets)], causal=causal),
        "fwd out=": lambda: cupyflash.flash_attention(q, k, v, causal=causal, **bufs),
        "bwd": lambda: cupyflash.flash_attention_backward(do, q, k, v, out, lse, causal=causal),
        "bwd dq=..ws=": lambda: cupyflash.flash_attention_backward(do, q, k, v, out, lse, causal=causal, **grads),
        "fwd variants": lambda: cupyflash.flash_attention(q, *kv, **var),
        "bwd variants": lambda: cupyflash.flash_attention_backward(do, q, *kv, vout, vlse, **var),
    }


def torch_cases(q, k, v, do, causal):
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except Exception:
        return {}
    cupy.cuda.Device().synchronize()
    tq, tk, tv, tdo = (torch.from_dlpack(x).transpose(1, 2) for x in (q, k, v, do))
    tq, tk, tv = (x.detach().requires_grad_(True) for x in (tq, tk, tv))
    cases = {}
    for name, backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
        def fwd(backend=backend):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
        try:
            tout = fwd()
        except Exception:
            continue
        cases[f"{name} fwd"] = fwd
        cases[f"{name} bwd"] = lambda tout=tout: torch.autograd.grad(tout, (tq, tk, tv), tdo, retain_graph=True)
    return cases


def components(calls: int) -> list:
    """Microseconds per call of each step a planned call takes, timed alone in a loop (the launch
    on a tiny kernel-free stream would still queue work, so the launch is left to the totals)."""
    from cupyflash import _plans
    B, S, H, D = TINY[0]
    q, k, v, do = (cupy.asarray(np.ones((B, S, H, D), np.float32).astype(BFLOAT16)) for _ in range(4))
    out, lse = cupyflash.flash_attention(q, k, v, return_lse=True)
    cupyflash.flash_attention_backward(do, q, k, v, out, lse)
    fkey = _plans.forward_key(q, k, v, None, None, False, None, False)
    bkey = _plans.backward_key(do, q, k, v, out, lse, None, None, None, None, False, None, False)
    fplan, bplan = _plans.FORWARD.get(fkey), _plans.BACKWARD.get(bkey)
    stream = cupy.cuda.get_current_stream()
    qkv = (q.data.ptr, k.data.ptr, v.data.ptr)
    steps = {
        "forward_key": lambda: _plans.forward_key(q, k, v, None, None, False, None, False),
        "backward_key": lambda: _plans.backward_key(do, q, k, v, out, lse, None, None, None, None, False, None, False),
        "plan lookup": lambda: _plans.FORWARD.get(fkey),
        "x.data.ptr x3": lambda: (q.data.ptr, k.data.ptr, v.data.ptr),
        "runtime.getDevice": cupy.cuda.runtime.getDevice,
        "get_current_stream": cupy.cuda.get_current_stream,
        "stream.is_capturing": stream.is_capturing,
        "cupy.empty (out)": lambda: cupy.empty(q.shape, q.dtype),
        "cupy.cuda.alloc (scratch)": lambda: cupy.cuda.alloc(B * H * S * (D + 1) * 4),
        "cupy.ndarray(memptr=)": lambda: cupy.ndarray(q.shape, q.dtype, memptr=q.data),
        "cupy.ndarray(shape, dtype)": lambda: cupy.ndarray(q.shape, q.dtype),
        "fwd params, cached": lambda: fplan.params((*qkv, 4, 5)),
        "fwd params, filled": lambda: fplan.params.template.fill((*qkv, 4, 5), fplan.params.maps(qkv)
                                                                 if fplan.params.maps else ()),
        "bwd params, filled": lambda: bplan.params.template.fill((*qkv, *range(3, 11)), bplan.params.maps(
            (*qkv, do.data.ptr)) if bplan.params.maps else ()),
    }
    rows = []
    for name, fn in steps.items():
        fn()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        rows.append(dict(step=name, us=(time.perf_counter() - t0) / calls * 1e6))
    cupy.cuda.Device().synchronize()
    return rows


def meta() -> dict:
    props = cupy.cuda.runtime.getDeviceProperties(0)
    info = dict(gpu=props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
                cupy=cupy.__version__, cupyflash=cupyflash.__version__,
                nvrtc=".".join(map(str, cupy.cuda.nvrtc.getVersion())), driver=cupy.cuda.runtime.driverGetVersion(),
                python=platform.python_version(), numpy=np.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat())
    try:
        import torch
        info["torch"] = torch.__version__
    except Exception:
        pass
    return info


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--json")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    sync = cupy.cuda.Device().synchronize
    rows, profiles = [], {}
    for shape in TINY + SHORT:
        B, S, H, D = shape
        for causal in (False, True):
            q, k, v, do = (cupy.asarray(rng.standard_normal(shape, dtype=np.float32).astype(BFLOAT16)) for _ in range(4))
            cases = cupyflash_cases(q, k, v, do, causal)
            if shape == TINY[0] and not causal:
                a = q.astype(np.float16).transpose(0, 2, 1, 3).reshape(B * H, S, D)  # CuPy has no bf16 matmul
                cases["cupy matmul"] = lambda a=a: cupy.matmul(a, a.transpose(0, 2, 1))
            peers = torch_cases(q, k, v, do, causal)
            for name, fn in {**cases, **peers}.items():
                gpu = (time_torch_ms(fn) if name.startswith("sdpa") else time_ms(fn, repeats=30)) * 1e3
                sync_fn = sync
                if name.startswith("sdpa"):
                    import torch
                    sync_fn = torch.cuda.synchronize
                row = dict(case=name, B=B, S=S, H=H, D=D, causal=causal, tiny=shape in TINY, gpu_us=gpu,
                           host_us=host_us(fn, args.calls, sync_fn, rounds=3 if shape in TINY else 1))
                rows.append(row)
                print(json.dumps(row), flush=True)
                if shape == TINY[0] and not causal and name in ("fwd", "bwd"):
                    prof = cProfile.Profile()
                    prof.enable()
                    for _ in range(args.calls):
                        fn()
                    prof.disable()
                    sync()
                    profiles[name] = prof
    for name, prof in profiles.items():
        print(f"\n--- cProfile, cupyflash {name}, {TINY[0]}, {args.calls} calls (tottime) ---")
        pstats.Stats(prof).sort_stats("tottime").print_stats(12)
    info = meta()
    steps = components(args.calls)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=info, calls=args.calls, rows=rows, components=steps), f, indent=1)
    print(f"\nsteps of a planned call, {TINY[0]}, microseconds each")
    for r in steps:
        print(f"{r['step']:>28} {r['us']:>7.2f}")
    print(f"\n{info['gpu']}, bf16, {args.calls} calls back to back, microseconds per call")
    print(f"{'case':>16} {'B':>4} {'S':>4} {'H':>3} {'D':>4} {'causal':>6} {'GPU us':>8} {'host us':>8}")
    for r in rows:
        print(f"{r['case']:>16} {r['B']:>4} {r['S']:>4} {r['H']:>3} {r['D']:>4} {str(r['causal']):>6} "
              f"{r['gpu_us']:>8.1f} {r['host_us']:>8.1f}")


if __name__ == "__main__":
    main()
