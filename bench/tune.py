"""Time tile configurations of the tensor-core kernels side by side with PyTorch SDPA's flash
backend (FlashAttention-2), in one process on one GPU, after checking each variant's output.

    PYTHONPATH=. python bench/tune.py [--quick] [--json PATH] [--fwd-only | --bwd-only | --ab FIELD]

Convention: batch * seqlen = 16384 tokens, heads * head_dim = 2048; FLOPs 4*B*H*Sq*Sk*D
forward, 2.5x backward, half for causal. Prints one table row per (shape, variant).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform

import numpy as np
import cupy

import cupyflash
from cupyflash import _config, _cuda_backend, _launch, reference
from cupyflash._dtypes import BFLOAT16


def time_ms(fn, warmup=3, repeats=10, make_event=None, elapsed=None):
    """Median ms of fn() between events on the current stream (CuPy's by default; pass torch's
    event factory and elapsed for PyTorch, whose work runs on its own current stream). The calls
    are recorded back to back and synchronised once at the end, as `cupyflash bench` does, so a
    call's host-side cost stays hidden while the GPU is busy (timing each call to a sync would
    count it: tens of microseconds, a large share at seqlen <= 1024)."""
    for _ in range(warmup):
        fn()
    make_event = make_event or cupy.cuda.Event
    elapsed = elapsed or cupy.cuda.get_elapsed_time
    marks = [(make_event(), make_event()) for _ in range(repeats)]
    for start, end in marks:
        start.record()
        fn()
        end.record()
    marks[-1][1].synchronize()
    return float(np.median([elapsed(start, end) for start, end in marks]))


def flops(B, H, S, D, causal, mode):
    f = 4.0 * B * H * S * S * D * (0.5 if causal else 1.0)
    return f * (2.5 if mode == "bwd" else 1.0)


def rel_err(got, want):
    got = cupy.asnumpy(got).astype(np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def check(dtype, D, causal, rng, fwd_cfg=None, bwd_cfg=None):
    """Max relative error of out, dq, dk, dv on a small problem against float64."""
    q, k, v, do = (rng.standard_normal((1, 300, 2, D)).astype(dtype) for _ in range(4))
    ref_o, _ = reference.attention(q, k, v, causal=causal)
    ref_g = reference.attention_backward(do, q, k, v, causal=causal)
    gq, gk, gv, gdo = (cupy.asarray(x) for x in (q, k, v, do))
    o, l = _cuda_backend.forward(gq, gk, gv, causal=causal, scale=D ** -0.5, fwd_config=fwd_cfg)
    dq, dk, dv = _cuda_backend.backward(gdo, gq, gk, gv, o, l, causal=causal, scale=D ** -0.5, bwd_config=bwd_cfg)
    return max(rel_err(o, ref_o), rel_err(dq, ref_g[0]), rel_err(dk, ref_g[1]), rel_err(dv, ref_g[2]))


def spill_bytes(dtype, D, causal, fwd_cfg=None, bwd_cfg=None):
    """Local-memory bytes per thread of the main kernel (0 = no spills), from the compiled module."""
    cc = _cuda_backend._cc()
    ks = _config.kernel_set(dtype, D, causal, cc, fwd=fwd_cfg, bwd=bwd_cfg)
    return _launch.kernel_resources(ks, ks.fwd_name() if fwd_cfg else ks.bwd_name())


def time_torch_ms(fn):
    import torch
    return time_ms(fn, make_event=lambda: torch.cuda.Event(enable_timing=True), elapsed=lambda a, b: a.elapsed_time(b))


def torch_sdpa(q, k, v, do, causal, backend_name):
    """(fwd_ms, bwd_ms) of PyTorch SDPA with one backend on the same data, or None."""
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except Exception:  # not installed
        return None
    backend = getattr(SDPBackend, backend_name)
    cupy.cuda.Device().synchronize()
    tq, tk, tv, tdo = (torch.from_dlpack(x).transpose(1, 2) for x in (q, k, v, do))
    tq, tk, tv = (x.detach().requires_grad_(True) for x in (tq, tk, tv))

    def fwd():
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)

    out = fwd()
    t_f = time_torch_ms(fwd)
    t_b = time_torch_ms(lambda: torch.autograd.grad(out, (tq, tk, tv), tdo, retain_graph=True))
    torch.cuda.synchronize()
    return t_f, t_b


F, G, H, HB = _config.FwdConfig, _config.BwdConfig, _config.Sm90FwdConfig, _config.Sm90BwdConfig
CANDIDATES = {
    128: dict(fwd=[F(128, 64, 4), H(128, 2), H(112, 2), H(64, 2)],
              bwd=[G(64, 128, 8, 1), HB(2, "panel")]),
    64: dict(fwd=[F(128, 64, 4), H(128, 2), H(192, 2), H(64, 2)],
             bwd=[G(128, 128, 8, 2), HB(2), HB(2, "panel", 128)]),
    256: dict(fwd=[F(64, 64, 4), H(32, 2), H(48, 2), H(64, 1)], bwd=[]),
    # head_dim 32, 96, 160 on the wgmma kernels run padded to 64, 128, 192 (+100%, +33%, +20% FLOPs)
    96: dict(fwd=[F(128, 64, 4), H(128, 2), H(64, 2)], bwd=[G(64, 64, 8, 2), HB(2, "panel")]),
    32: dict(fwd=[F(128, 64, 4), H(128, 2), H(192, 2)], bwd=[G(64, 64, 8, 2), HB(2, "panel", 128)]),
    160: dict(fwd=[F(64, 64, 4), H(64, 2), H(32, 2)], bwd=[]),
    192: dict(fwd=[F(64, 64, 4), H(64, 2), H(32, 2)], bwd=[]),
}
# --short: the mma.sync forward tiles that Hopper runs up to HOPPER_FWD_SHORT_SEQLEN_K keys
SHORT_CANDIDATES = {
    64: dict(fwd=[F(128, 64, 4), F(64, 64, 4), F(128, 64, 8), F(64, 128, 4), F(128, 128, 8), F(64, 32, 2)], bwd=[]),
    128: dict(fwd=[F(128, 32, 4), F(128, 64, 8), F(64, 64, 4), F(64, 32, 4)], bwd=[]),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="seqlen 4096 only")
    ap.add_argument("--json")
    ap.add_argument("--bwd-only", action="store_true", help="time backward tiles only")
    ap.add_argument("--fwd-only", action="store_true", help="time forward tiles only")
    ap.add_argument("--seqlens", type=lambda t: [int(x) for x in t.split(",")], help="e.g. 1024,4096")
    ap.add_argument("--head-dims", type=lambda t: [int(x) for x in t.split(",")], help="of the CANDIDATES keys (64, 128, 256, 96, 32)")
    ap.add_argument("--short", action="store_true", help="the short-key forward candidates (SHORT_CANDIDATES)")
    ap.add_argument("--ab", metavar="FIELD",
                    help="each table tile of the Hopper kernels against the same tile with the boolean FIELD flipped, "
                         "for the passes whose config has FIELD (an A/B of one kernel change behind a temporary flag)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    gpu = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    seqlens = args.seqlens or ([4096] if args.quick else [1024, 4096, 16384])
    dtype = BFLOAT16
    rows = []
    for D, cands in (SHORT_CANDIDATES if args.short else CANDIDATES).items():
        if args.head_dims and D not in args.head_dims:
            continue
        for causal in (False, True):
            for S in seqlens:
                B, H = 16384 // S, 2048 // D
                q, k, v, do = (cupy.asarray(rng.standard_normal((B, S, H, D), dtype=np.float32).astype(dtype))
                               for _ in range(4))
                scale = D ** -0.5
                o, l = _cuda_backend.forward(q, k, v, causal=causal, scale=scale)
                fl_f, fl_b = flops(B, H, S, D, causal, "fwd"), flops(B, H, S, D, causal, "bwd")
                if args.ab:
                    cands = {pass_: [table, dataclasses.replace(table, **{args.ab: not getattr(table, args.ab)})]
                             if hasattr(table, args.ab) else []
                             for pass_, table in zip(("fwd", "bwd"), _config.TILES_SM90[(D, causal)])}
                skip = {"fwd": args.bwd_only, "bwd": args.fwd_only}
                passes = [(p, cands[p]) for p in ("fwd", "bwd") if not skip[p]]
                for pass_, cfgs in passes:
                    for cfg in cfgs:
                        kw = {"fwd_cfg": cfg} if pass_ == "fwd" else {"bwd_cfg": cfg}
                        local, regs = spill_bytes(dtype, D, causal, **kw)
                        err = check(dtype, D, causal, rng, **kw)
                        if pass_ == "fwd":
                            t = time_ms(lambda: _cuda_backend.forward(q, k, v, causal=causal, scale=scale, fwd_config=cfg))
                        else:
                            t = time_ms(lambda: _cuda_backend.backward(do, q, k, v, o, l, causal=causal, scale=scale,
                                                                       bwd_config=cfg))
                        row = dict(impl="cupyflash", pass_=pass_, D=D, S=S, causal=causal, config=str(cfg), regs=regs,
                                   local_bytes=local, max_rel_err=err, ms=t,
                                   tflops=(fl_f if pass_ == "fwd" else fl_b) / t / 1e9)
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                for peer in ("FLASH_ATTENTION", "CUDNN_ATTENTION"):
                    r = torch_sdpa(q, k, v, do, causal, peer)
                    if r:
                        for pass_, t, fl in (("fwd", r[0], fl_f), ("bwd", r[1], fl_b)):
                            rows.append(dict(impl=f"sdpa-{peer.split('_')[0].lower()}", pass_=pass_, D=D, S=S,
                                             causal=causal, ms=t, tflops=fl / t / 1e9))
                            print(json.dumps(rows[-1]), flush=True)
    meta = dict(gpu=gpu, cc=dev.compute_capability, cupy=cupy.__version__, cupyflash=cupyflash.__version__,
                nvrtc=".".join(map(str, cupy.cuda.nvrtc.getVersion())), driver=cupy.cuda.runtime.driverGetVersion(),
                python=platform.python_version(), date=datetime.datetime.now(datetime.timezone.utc).isoformat())
    try:
        import torch
        meta["torch"] = torch.__version__
    except Exception:
        pass
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"\n{gpu} cc {dev.compute_capability}, bf16, batch*seqlen=16384, heads*head_dim=2048, TFLOP/s")
    print(f"{'pass':>4} {'D':>4} {'S':>6} {'causal':>6} {'impl':>10} {'config':>30} {'regs':>4} {'spill':>5} {'err':>8} {'TFLOP/s':>7}")
    for r in rows:
        cfg = r.get("config", "").replace("Sm90FwdConfig", "wgmma").replace("Sm90BwdConfig", "wgmma-bwd").replace("FwdConfig", "").replace("BwdConfig", "").replace("block_", "") \
            .replace("num_warps", "w").replace("q_stages", "st")
        print(f"{r['pass_']:>4} {r['D']:>4} {r['S']:>6} {str(r['causal']):>6} {r['impl']:>10} {cfg:>30} "
              f"{r.get('regs', ''):>4} {r.get('local_bytes', ''):>5} {r.get('max_rel_err', float('nan')):>8.1e} {r['tflops']:>7.0f}")


if __name__ == "__main__":
    main()
