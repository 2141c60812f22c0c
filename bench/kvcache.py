"""The KV-cache decode benchmark (issue 16): cupyflash.flash_attention_with_kvcache beside PyTorch
SDPA (cuDNN and flash, enable_gqa=True) and FlashAttention-4, in one process, on the same inputs
(bf16, one new query token per sequence, every cache position valid).

Bandwidth is the K+V bytes read, 2 * sum_b len_b * H_kv * D * 2, over the time; the card's read
bandwidth is measured in the same run (a float32 sum over 2 GiB) and every row reports its ratio
to it. Shapes (H_q 32, H_kv 8, d 128): B 32 with cache 8192, B 128 with cache 2048, B 1 with cache
131072; cupyflash's paged cache at page_size 16 and 256 beside its dense one. ``--tiles``
also times other decode tiles (warps x stages of the head_dim 128 decode kernel) on the dense
cache, each row named cupyflash-dense-<warps>x<stages>.

Writes bench/results/kvcache-<gpu>-<date>.json and prints a table.

    python bench/kvcache.py [--out-dir DIR]
"""
from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import cupyflash  # noqa: E402
from cupyflash import bench  # noqa: E402
from run_peers import median_ms, write_result  # noqa: E402

HEADS, HEADS_KV, HEAD_DIM = 32, 8, 128
SHAPES = ((32, 8192), (128, 2048), (1, 131072))  # (batch, cached tokens per sequence)
PAGE_SIZES = (16, 256)



def read_bandwidth_gbs(repeats: int) -> float:
    """A float32 sum over 2 GiB: the bytes one reduction reads, over its time."""
    import cupy
    x = cupy.ones((1 << 29,), cupy.float32)
    out = cupy.empty((), cupy.float32)
    ms = median_ms(lambda: cupy.sum(x, out=out), repeats)
    return x.nbytes / ms / 1e6


def cache_arrays(B: int, L: int):
    """q (B, 1, H, D), the dense caches (B, L, H_kv, D), bf16, and cache_seqlens (all L)."""
    import cupy
    bf16 = cupyflash._dtypes.BFLOAT16
    rng = cupy.random.default_rng(0)
    randn = lambda *s: rng.standard_normal(s, dtype=cupy.float32).astype(bf16)  # noqa: E731
    return (randn(B, 1, HEADS, HEAD_DIM), randn(B, L, HEADS_KV, HEAD_DIM), randn(B, L, HEADS_KV, HEAD_DIM),
            cupy.full((B,), L, cupy.int32))


def cupyflash_calls(B: int, L: int):
    """name -> forward closure: the dense cache and each paged layout."""
    import cupy
    q, k_cache, v_cache, lengths = cache_arrays(B, L)
    calls = {"dense": lambda: cupyflash.flash_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths)}
    # the same cache head-major in memory, (B, H_kv, L, D) passed as a (B, L, H_kv, D) view: each
    # head's keys contiguous, as SDPA's (B, H, L, D) inputs are
    kh, vh = (c.transpose(0, 2, 1, 3).copy().transpose(0, 2, 1, 3) for c in (k_cache, v_cache))
    calls["dense-head-major"] = lambda: cupyflash.flash_attention_with_kvcache(q, kh, vh, cache_seqlens=lengths)
    for page_size in PAGE_SIZES:
        pages = B * L // page_size
        table = cupy.asarray(np.random.default_rng(0).permutation(pages).reshape(B, L // page_size).astype(np.int32))
        kp, vp = (c.reshape(pages, page_size, HEADS_KV, HEAD_DIM) for c in (k_cache, v_cache))
        calls[f"paged-{page_size}"] = (lambda kp=kp, vp=vp, table=table: cupyflash.flash_attention_with_kvcache(
            q, kp, vp, cache_seqlens=lengths, page_table=table))
    return calls


def torch_calls(B: int, L: int):
    """SDPA cuDNN and flash (enable_gqa) and FlashAttention-4 on the same shapes, or reasons."""
    calls, notes = {}, {}
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except Exception as e:
        return calls, {"torch": bench.short_error(e)}
    dev = torch.device("cuda")
    q = torch.randn(B, HEADS, 1, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(B, HEADS_KV, L, HEAD_DIM, device=dev, dtype=torch.bfloat16) for _ in range(2))
    for name, backend in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION)):
        def call(backend=backend):
            with sdpa_kernel([backend]):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        try:
            call()
            calls[name] = call
        except Exception as e:
            notes[name] = bench.short_error(e)
    try:
        from flash_attn.cute import flash_attn_func
        qf, kf, vf = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        fa4 = lambda: flash_attn_func(qf, kf, vf)[0]  # noqa: E731
        fa4()
        calls["fa4"] = fa4
    except Exception as e:
        notes["fa4"] = bench.short_error(e)
    return calls, notes


def tile_calls(B: int, L: int, tiles: str):
    """name -> dense-cache closure under each decode tile of ``tiles`` ("4x3,8x2,4x3t": warps x stages
    of the decode kernel, cp.async loads, "t": TMA loads), each a DecodePlan built with that tile and
    called as the plan cache would call it."""
    import cupy
    from cupyflash import _checks, _config, _decode
    from cupyflash._variants import Variants
    calls = {}
    q, k_cache, v_cache, lengths = cache_arrays(B, L)
    layout = _checks.CacheLayout(page_table=None, capacity=L, new_tokens=0)
    for spec in filter(None, tiles.split(",")):
        warps, stages = (int(x) for x in spec.rstrip("t").split("x"))
        cfg = _config.DecodeConfig(16, warps, stages, "tma" if spec.endswith("t") else "cp.async")
        o, lse = cupy.empty_like(q), cupy.empty((B, HEADS, 1), cupy.float32)
        plan = _decode.DecodePlan(q, k_cache, v_cache, o, lse, layout, lengths, None, None, scale=HEAD_DIM ** -0.5,
                                  variants=Variants.of(True), num_splits=0, allocates=(True, True), decode_config=cfg)
        calls[f"cupyflash-dense-{spec}"] = (lambda plan=plan: plan(q, k_cache, v_cache, None, None, lengths, None,
                                                                    None, None, None, None, None))
    return calls


@click.command()
@click.option("--repeats", type=int, default=30, show_default=True)
@click.option("--out-dir", type=click.Path(file_okay=False), default=None, help="Also copy the JSON here.")
@click.option("--tiles", default="", help="Also time these decode tiles, warps x stages (t: TMA loads): '4x2,8x2,4x3t'.")
def main(repeats, out_dir, tiles):
    peak = read_bandwidth_gbs(repeats)
    click.echo(f"read bandwidth (float32 sum over 2 GiB): {peak:.0f} GB/s", err=True)
    rows, notes = [], {}
    for B, L in SHAPES:
        kv_bytes = 2 * B * L * HEADS_KV * HEAD_DIM * 2
        peers, peer_notes = torch_calls(B, L)
        notes.update({f"{n} B{B} L{L}": t for n, t in peer_notes.items()})
        mine = {f"cupyflash-{n}": f for n, f in cupyflash_calls(B, L).items()}
        for impl, fn in {**mine, **tile_calls(B, L, tiles), **peers}.items():
            try:
                ms = median_ms(fn, repeats)
            except Exception as e:
                notes[f"{impl} B{B} L{L}"] = bench.short_error(e)
                continue
            gbs = kv_bytes / ms / 1e6
            rows.append(dict(impl=impl, batch=B, cache=L, ms=ms, gbs=gbs, of_peak=gbs / peak))
            click.echo(f"B {B:4d} cache {L:6d} {impl:20s} {ms * 1e3:9.1f} us {gbs:6.0f} GB/s ({gbs / peak:.2f} of read)",
                       err=True)
    summary = []
    for B, L in SHAPES:
        mine = {r["impl"]: r for r in rows if (r["batch"], r["cache"]) == (B, L)}
        d = mine.get("cupyflash-dense")
        if not d:
            continue
        parts = [f"B {B} cache {L}: cupyflash {d['gbs']:.0f} GB/s ({d['of_peak']:.2f} of read)"]
        parts += [f"{d['gbs'] / mine[p]['gbs']:.2f}x {p}" for p in ("sdpa-cudnn", "fa4", "sdpa-flash") if p in mine]
        parts += [f"paged {ps}: {mine[f'cupyflash-paged-{ps}']['gbs'] / d['gbs']:.2f}x of dense" for ps in PAGE_SIZES
                  if f"cupyflash-paged-{ps}" in mine]
        summary.append("; ".join(parts))
    gpu = bench.gpu_info()
    doc = dict(bench="kvcache", versions=bench.versions(("torch-cudnn", "fa4")), read_gbs=peak, heads=HEADS,
               heads_kv=HEADS_KV, head_dim=HEAD_DIM, dtype="bfloat16", rows=rows, notes=notes, summary=summary)
    path = write_result(doc, "kvcache", gpu, out_dir)
    click.echo(f"wrote {path}")
    for line in summary:
        click.echo(line)


if __name__ == "__main__":
    main()
