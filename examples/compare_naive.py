"""The transformer of train_transformer.py with flash_attention versus the materialised
naive_attention: the same loss curve, and the memory each needs at long sequence length.

1. Loss curves: train both from the same seed on the same batches for ``--steps`` steps;
   print the largest difference between the two curves.
2. Memory: for each ``--mem-seqlens`` length, one training step (forward + backward) of
   each variant; print the peak bytes allocated during the step (cupy MemoryHook on the
   GPU, tracemalloc on the CPU) and the step time, as a Markdown table.

    python examples/compare_naive.py --device cpu                      # small, for CI
    python examples/compare_naive.py --device gpu --task copy --vocab 64 --seqlen 1024 --layers 4 \\
        --d-model 512 --heads 8 --batch 8 --pos rope --lr 2e-3 --warmup 10 --steps 50 \\
        --mem-seqlens 1024,2048,4096,8192 --mem-batch 1 --json cmp.json
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_transformer as tt  # noqa: E402
from cupyflash import autodiff as ad  # noqa: E402


def loss_curves(cfg: tt.Config) -> dict:
    """Train flash and naive from the same seed and batches; both loss curves and their gap."""
    curves = {}
    for attention in ("flash", "naive"):
        run = dataclasses.replace(cfg, attention=attention, eval_batches=1)
        curves[attention] = tt.train(run, log=lambda *a: None)["losses"]
    gap = np.abs(np.array(curves["flash"]) - np.array(curves["naive"]))
    return {"flash": curves["flash"], "naive": curves["naive"], "max_abs_diff": float(gap.max()),
            "max_rel_diff": float((gap / np.abs(np.array(curves["naive"]))).max())}


def step_memory(cfg: tt.Config) -> dict:
    """Peak bytes allocated during one forward + backward (parameters already allocated),
    and the time of that step (after one untimed warm-up step)."""
    xp = tt.array_module(cfg.device)
    params = tt.init_params(cfg, xp, np.random.default_rng(cfg.seed))
    block = tt.make_block(cfg, xp)
    inputs, targets = (xp.asarray(a) for a in tt.make_batch(np.random.default_rng(cfg.seed + 1), cfg))

    def one_step():
        for p in params.values():
            p.grad = None
        loss = ad.cross_entropy(tt.forward(params, cfg, inputs, block), targets, ignore_index=tt.IGNORE)
        loss.backward()
        return float(loss.item())

    one_step()  # compile kernels, fill caches
    for p in params.values():
        p.grad = None
    tt.synchronize(xp)
    with tt.PeakMemory(cfg.device, trace_cpu=True) as memory:
        t0 = time.perf_counter()
        one_step()
        tt.synchronize(xp)
        seconds = time.perf_counter() - t0
    return {"peak_bytes": int(memory.peak), "step_seconds": seconds}


def memory_table(cfg: tt.Config, seqlens, batch: int) -> list[dict]:
    rows = []
    for seqlen in seqlens:
        row = {"seqlen": seqlen, "batch": batch}
        for attention in ("flash", "naive"):
            run = dataclasses.replace(cfg, seqlen=seqlen, batch=batch, attention=attention)
            try:
                row[attention] = step_memory(run)
            except Exception as e:  # out of memory for naive at long seqlen is a result too
                row[attention] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
            if cfg.device == "gpu":
                import cupy
                cupy.get_default_memory_pool().free_all_blocks()
        rows.append(row)
    return rows


def markdown(rows, cfg: tt.Config) -> str:
    head = cfg.d_model // cfg.heads
    lines = [f"Peak memory of one training step ({cfg.layers} layers, d_model {cfg.d_model}, "
             f"{cfg.heads} heads of {head}, {cfg.dtype}, {tt.device_name(cfg.device)}):", "",
             "| seqlen | batch | flash peak (MiB) | naive peak (MiB) | naive / flash | flash step (ms) | naive step (ms) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(r, key, scale):
        return f"{r[key] / scale:,.1f}" if key in r else r.get("error", "?")
    for row in rows:
        f, n = row["flash"], row["naive"]
        ratio = f"{n['peak_bytes'] / f['peak_bytes']:.1f}x" if "peak_bytes" in f and "peak_bytes" in n else "-"
        lines.append(f"| {row['seqlen']} | {row['batch']} | {cell(f, 'peak_bytes', 2**20)} | "
                     f"{cell(n, 'peak_bytes', 2**20)} | {ratio} | {cell(f, 'step_seconds', 1e-3)} | "
                     f"{cell(n, 'step_seconds', 1e-3)} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mem-seqlens", default="", help="comma-separated sequence lengths for the memory table")
    p.add_argument("--mem-batch", type=int, default=1)
    p.add_argument("--skip-curves", action="store_true")
    args, rest = p.parse_known_args(argv)
    cfg, targs = tt.parse_args(rest)
    result = {"config": dataclasses.asdict(cfg), "device": tt.device_name(cfg.device)}
    if not args.skip_curves:
        curves = loss_curves(cfg)
        result["curves"] = curves
        print(f"loss curves over {cfg.steps} steps, flash vs naive: max |diff| {curves['max_abs_diff']:.3e}, "
              f"max relative diff {curves['max_rel_diff']:.3e}; final loss flash {curves['flash'][-1]:.4f}, "
              f"naive {curves['naive'][-1]:.4f}")
    if args.mem_seqlens:
        seqlens = [int(s) for s in args.mem_seqlens.split(",")]
        rows = memory_table(cfg, seqlens, args.mem_batch)
        result["memory"] = rows
        print(markdown(rows, cfg))
    if targs.json:
        tt.write_json(targs.json, result)
    return result


if __name__ == "__main__":
    main()
