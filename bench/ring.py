"""The ring-attention benchmark (issue 20): causal attention of one long sequence (bf16, H 16,
d 128) on N GPUs with cupyflash.distributed (one process per GPU, NCCL), against one GPU running
the same total sequence where it fits.

Throughput is the causal FLOPs of the whole sequence (forward: 2 * 2 * S^2 / 2 * H * D; backward
2.5x that) over the slowest rank's time; the table also gives each rank's peak memory. The issue's
targets: >= 1.8x one GPU on 2 GPUs and >= 3.5x on 4, at S 128k and 512k. Needs a machine with
several GPUs; NCCL_NVLS_ENABLE=0 is set for the ranks (NVLink multicast stays off).

    python bench/ring.py [--world 2] [--seqlen 131072] [--out-dir DIR]
"""
from __future__ import annotations

import multiprocessing
import os
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

HEADS, HEAD_DIM = 16, 128


def _inputs(S: int, world: int, rank: int):
    """This rank's shards of q, k, v, dout (bf16, random on its GPU: the timing does not depend on
    the values), (1, S / world, H, D) each."""
    import cupy
    from cupyflash._dtypes import BFLOAT16
    rng = cupy.random.default_rng(rank)
    return [rng.standard_normal((1, S // world, HEADS, HEAD_DIM), dtype=cupy.float32).astype(BFLOAT16)
            for _ in range(4)]


def _rank(rank: int, world: int, S: int, repeats: int, uids, results):
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    import cupy
    from cupy.cuda import nccl
    from cupyflash import distributed as dist
    from run_peers import median_ms
    cupy.cuda.Device(rank).use()
    uid = nccl.get_unique_id() if rank == 0 else uids.get(timeout=120)
    if rank == 0:
        for _ in range(world - 1):
            uids.put(uid)
    ring = dist.RingAttention(nccl.NcclCommunicator(world, uid, rank), rank, world)
    q, k, v, dout = _inputs(S, world, rank)
    out, lse = dist.ring_flash_attention(q, k, v, comm=ring, causal=True, return_lse=True)
    fwd = median_ms(lambda: dist.ring_flash_attention(q, k, v, comm=ring, causal=True), repeats)
    bwd = median_ms(lambda: dist.ring_flash_attention_backward(dout, q, k, v, out, lse, comm=ring, causal=True), repeats)
    peak = cupy.get_default_memory_pool().total_bytes()
    results.put((rank, fwd, bwd, peak))


def run(world: int, S: int, repeats: int) -> list[tuple]:
    """(rank, forward ms, backward ms, pool bytes) of each rank, one process per GPU."""
    ctx = multiprocessing.get_context("spawn")
    uids, results = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, world, S, repeats, uids, results)) for r in range(world)]
    for p in procs:
        p.start()
    rows = sorted(results.get(timeout=3600) for _ in range(world))
    for p in procs:
        p.join()
    return rows


@click.command()
@click.option("--world", type=click.IntRange(min=1), default=None, help="GPUs [default: all, at most 4].")
@click.option("--seqlen", "seqlens", type=int, multiple=True, help="Total tokens [default: 131072, 524288].")
@click.option("--repeats", type=int, default=5, show_default=True)
@click.option("--out-dir", type=click.Path(file_okay=False), default=None, help="Also copy the JSON here.")
def main(world, seqlens, repeats, out_dir):
    import cupy
    from cupyflash import bench
    from run_peers import write_result
    world = world or min(cupy.cuda.runtime.getDeviceCount(), 4)
    rows = []
    for S in seqlens or (131072, 524288):
        flops = 2 * 2 * S * S / 2 * HEADS * HEAD_DIM
        for n in sorted({1, world}):
            try:
                ranks = run(n, S, repeats)
            except Exception as e:  # noqa: BLE001 - one GPU may not fit the whole sequence: reported
                click.echo(f"S {S} on {n} GPU(s): not measured ({bench.short_error(e)})")
                continue
            fwd, bwd = max(r[1] for r in ranks), max(r[2] for r in ranks)
            rows.append(dict(seqlen=S, gpus=n, fwd_ms=fwd, bwd_ms=bwd, fwd_tflops=flops / fwd / 1e9,
                             bwd_tflops=2.5 * flops / bwd / 1e9, peak_bytes=[r[3] for r in ranks]))
            click.echo(f"S {S:7d} GPUs {n}: fwd {fwd:9.2f} ms ({flops / fwd / 1e9:6.0f} TFLOP/s)  bwd {bwd:9.2f} ms  "
                       f"peak {max(r[3] for r in ranks) / 2**30:.1f} GiB per GPU")
    path = write_result({"bench": "ring", "heads": HEADS, "head_dim": HEAD_DIM, "rows": rows}, "ring",
                        bench.gpu_info(), out_dir)
    click.echo(f"wrote {path}")
    for S in {r["seqlen"] for r in rows}:
        one = next((r for r in rows if r["seqlen"] == S and r["gpus"] == 1), None)
        many = next((r for r in rows if r["seqlen"] == S and r["gpus"] > 1), None)
        if one and many:
            click.echo(f"S {S}: {many['gpus']} GPUs {one['fwd_ms'] / many['fwd_ms']:.2f}x / "
                       f"{one['bwd_ms'] / many['bwd_ms']:.2f}x one GPU (fwd / bwd; target >= 1.8x on 2, 3.5x on 4)")


if __name__ == "__main__":
    main()
