"""One cupyflash call, repeated, to run under Nsight Compute on the lent GPU, e.g.

    ncu --clock-control none -k regex:flash_fwd_sm90 --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section WarpStateStats python bench/profile_call.py -d 128 -s 4096

Convention of the benchmarks: batch * seqlen = 16384 tokens, heads * head_dim = 2048, bf16.
The call runs three times (two warm-ups for --launch-skip 2), then synchronises.
"""
from __future__ import annotations

import argparse

import numpy as np
import cupy

from cupyflash import _config, _cuda_backend
from cupyflash._dtypes import BFLOAT16


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-d", "--head-dim", type=int, default=128)
    ap.add_argument("-s", "--seqlen", type=int, default=4096)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--mode", choices=("fwd", "bwd"), default="fwd")
    ap.add_argument("--hopper-fwd", metavar="BLOCK_N,NUM_WG", help="an Sm90FwdConfig instead of the table's, e.g. 112,2")
    args = ap.parse_args()
    D, S = args.head_dim, args.seqlen
    B, H = 16384 // S, 2048 // D
    rng = np.random.default_rng(0)
    q, k, v, do = (cupy.asarray(rng.standard_normal((B, S, H, D), dtype=np.float32).astype(BFLOAT16)) for _ in range(4))
    cfg = None
    if args.hopper_fwd:
        block_n, num_wg = (int(x) for x in args.hopper_fwd.split(","))
        cfg = _config.Sm90FwdConfig(block_n, num_wg)
    for _ in range(3):
        o, lse = _cuda_backend.forward(q, k, v, causal=args.causal, scale=D ** -0.5, fwd_config=cfg)
        if args.mode == "bwd":
            _cuda_backend.backward(do, q, k, v, o, lse, causal=args.causal, scale=D ** -0.5)
    cupy.cuda.Device().synchronize()


if __name__ == "__main__":
    main()
