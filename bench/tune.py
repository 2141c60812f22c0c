"""Time tile configurations of the tensor-core kernels side by side with PyTorch SDPA's flash
backend (FlashAttention-2), in one process on one GPU, after checking each variant's output.

    PYTHONPATH=. python bench/tune.py [--quick] [--json PATH]

Convention: batch * seqlen = 16384 tokens, heads * head_dim = 2048; FLOPs 4*B*H*Sq*Sk*D
forward, 2.5x backward, half for causal. Prints one table row per (shape, variant).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform

import numpy as np
import cupy

import cupyflash
from cupyflash import _config, _cuda_backend, reference
from cupyflash._dtypes import BFLOAT16, FLOAT16, dtype_name


def time_ms(fn, warmup=3, repeats=10):
    for _ in range(warmup):
        fn()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end))
    return float(np.median(times))


def flops(B, H, S, D, causal, mode):
    f = 4.0 * B * H * S * S * D * (0.5 if causal else 1.0)
    return f * (2.5 if mode == "bwd" else 1.0)


def rel_err(got, want):
    got = cupy.asnumpy(got).astype(np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def check_variant(dtype, D, causal, fwd_cfg, bwd_cfg, rng):
    """Relative error of out and dq on a small problem against float64; raises if NaN."""
    q, k, v, do = (rng.standard_normal((1, 300, 2, D)).astype(dtype) for _ in range(4))
    ref_o, _ = reference.attention(q, k, v, causal=causal)
    ref_g = reference.attention_backward(do, q, k, v, causal=causal)
    gq, gk, gv, gdo = (cupy.asarray(x) for x in (q, k, v, do))
    o, l = _cuda_backend.forward(gq, gk, gv, causal=causal, scale=D ** -0.5, fwd_config=fwd_cfg)
    dq, dk, dv = _cuda_backend.backward(gdo, gq, gk, gv, o, l, causal=causal, scale=D ** -0.5, bwd_config=bwd_cfg)
    return max(rel_err(o, ref_o), rel_err(dq, ref_g[0]), rel_err(dk, ref_g[1]), rel_err(dv, ref_g[2]))


def torch_peer(q, k, v, do, causal):
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except Exception as e:  # not installed
        return None, f"torch unavailable: {e}"
    tq, tk, tv, tdo = (torch.from_dlpack(x).transpose(1, 2) for x in (q, k, v, do))
    tq, tk, tv = (x.detach().requires_grad_(True) for x in (tq, tk, tv))
    stream = torch.cuda.ExternalStream(cupy.cuda.get_current_stream().ptr)

    def fwd():
        with torch.cuda.stream(stream), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)

    out = fwd()

    def bwd():
        with torch.cuda.stream(stream):
            torch.autograd.grad(out, (tq, tk, tv), tdo, retain_graph=True)

    return (fwd, bwd), None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    gpu = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]

    F, G = _config.FwdConfig, _config.BwdConfig
    variants = {
        128: [(F(128, 64, 8), G(64, 64, 8, 2)), (F(128, 64, 4), G(64, 128, 8, 2)), (F(64, 64, 4), G(64, 64, 4, 2)),
              (F(128, 128, 8), G(128, 64, 8, 2))],
        64: [(F(128, 64, 4), G(64, 128, 8, 2)), (F(128, 128, 8), G(64, 64, 8, 2)), (F(128, 64, 8), G(128, 128, 8, 2)),
             (F(64, 64, 4), G(64, 64, 4, 2))],
    }
    seqlens = [4096] if args.quick else [1024, 4096, 16384]
    rows = []
    for D in (128, 64):
        for causal in (False, True):
            for fwd_cfg, bwd_cfg in variants[D]:
                err = check_variant(BFLOAT16, D, causal, fwd_cfg, bwd_cfg, rng)
                for S in seqlens:
                    B, H = 16384 // S, 2048 // D
                    q, k, v, do = (cupy.asarray(rng.standard_normal((B, S, H, D), dtype=np.float32).astype(BFLOAT16))
                                   for _ in range(4))
                    scale = D ** -0.5
                    o, l = _cuda_backend.forward(q, k, v, causal=causal, scale=scale, fwd_config=fwd_cfg)
                    t_f = time_ms(lambda: _cuda_backend.forward(q, k, v, causal=causal, scale=scale, fwd_config=fwd_cfg))
                    t_b = time_ms(lambda: _cuda_backend.backward(do, q, k, v, o, l, causal=causal, scale=scale,
                                                                 bwd_config=bwd_cfg))
                    row = dict(D=D, S=S, causal=causal, fwd=str(fwd_cfg), bwd=str(bwd_cfg), max_rel_err=err,
                               fwd_tflops=flops(B, H, S, D, causal, "fwd") / t_f / 1e9,
                               bwd_tflops=flops(B, H, S, D, causal, "bwd") / t_b / 1e9)
                    peer, why = torch_peer(q, k, v, do, causal)
                    if peer:
                        row["sdpa_flash_fwd_tflops"] = flops(B, H, S, D, causal, "fwd") / time_ms(peer[0]) / 1e9
                        row["sdpa_flash_bwd_tflops"] = flops(B, H, S, D, causal, "bwd") / time_ms(peer[1]) / 1e9
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    meta = dict(gpu=gpu, cc=dev.compute_capability, cupy=cupy.__version__, cupyflash=cupyflash.__version__,
                nvrtc=".".join(map(str, cupy.cuda.nvrtc.getVersion())), driver=cupy.cuda.runtime.driverGetVersion(),
                python=platform.python_version(), date=datetime.datetime.now(datetime.timezone.utc).isoformat())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"\n{gpu} cc {dev.compute_capability}, bf16, TFLOP/s (cupyflash fwd/bwd vs SDPA flash fwd/bwd)")
    print(f"{'D':>4} {'S':>6} {'causal':>6} {'fwd cfg':>28} {'bwd cfg':>36} {'err':>8} {'fwd':>6} {'sdpa':>6} {'bwd':>6} {'sdpa':>6}")
    for r in rows:
        f = r["fwd"].replace("FwdConfig", "").replace("block_", "").replace("num_", "")
        b = r["bwd"].replace("BwdConfig", "").replace("block_", "").replace("num_", "")
        print(f"{r['D']:>4} {r['S']:>6} {str(r['causal']):>6} {f:>28} {b:>36} {r['max_rel_err']:>8.1e} "
              f"{r['fwd_tflops']:>6.0f} {r.get('sdpa_flash_fwd_tflops', float('nan')):>6.0f} "
              f"{r['bwd_tflops']:>6.0f} {r.get('sdpa_flash_bwd_tflops', float('nan')):>6.0f}")


if __name__ == "__main__":
    main()
