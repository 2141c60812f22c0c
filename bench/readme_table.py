"""The README's performance table, generated from a published run (bench/run_peers.py output).

    python bench/readme_table.py bench/results/<gpu>-<date>-bfloat16.json [--seqlens 1024,4096,16384]

Prints a markdown table: cupyflash's TFLOP/s beside SDPA flash (FlashAttention-2), SDPA cuDNN
and JAX cuDNN, each peer with cupyflash's speed relative to it in brackets, and naive CuPy when
the run measured it.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cupyflash import bench  # noqa: E402

PEERS = (("torch-flash", "SDPA flash (FA2)"), ("torch-cudnn", "SDPA cuDNN"), ("jax-cudnn", "JAX cuDNN"))


def table(results, seqlens) -> str:
    by_key = {(r.impl, r.mode, r.dtype, r.head_dim, r.causal, r.seqlen_q): r for r in results if r.status == "ok"}
    with_naive = any(r.impl == "naive" and r.status == "ok" for r in results)  # a run may leave it out (--compare)
    head = ["pass", "dtype", "D", "causal", "seqlen", "cupyflash", *(name for _, name in PEERS)]
    head += ["naive (CuPy)"] if with_naive else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ours = sorted((r for r in results if r.impl == "cupyflash" and r.status == "ok" and r.seqlen_q in seqlens),
                  key=lambda r: (r.mode != "fwd", r.dtype, -r.head_dim, r.causal, r.seqlen_q))
    for r in ours:
        key = (r.mode, r.dtype, r.head_dim, r.causal, r.seqlen_q)
        cells = [r.mode, r.dtype, str(r.head_dim), "yes" if r.causal else "no", str(r.seqlen_q), f"{r.tflops:.0f}"]
        for impl, _ in PEERS:
            p = by_key.get((impl, *key))
            cells.append(f"{p.tflops:.0f} ({r.tflops / p.tflops:.2f}x)" if p else "-")
        if with_naive:
            naive = by_key.get(("naive", *key))
            cells.append(f"{naive.tflops:.1f}" if naive else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--seqlens", default="1024,4096,16384", show_default=True)
def main(paths, seqlens):
    wanted = {int(s) for s in seqlens.split(",")}
    results = [r for p in paths for r in bench.load_results(p)[1]]
    click.echo(table(results, wanted))


if __name__ == "__main__":
    main()
