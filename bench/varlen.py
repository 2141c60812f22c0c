"""The packed-sequences benchmark (issue 15): cupyflash.flash_attention_varlen beside the dense
kernel and FlashAttention-4's flash_attn_varlen_func, in one process, on the same inputs (bf16).

16 sequences of lengths drawn uniformly from 128 to 4096 (seed 0), H 16, d 128, causal. FLOPs
count each sequence's own causal work (bench.attention_flops per sequence). Reported:

- varlen forward and backward TFLOP/s, against the dense kernel at batch 16 and a sequence length
  equal to the mean length (target >= 0.95x);
- the time against the dense call padded to the longest length (target >= 1.5x faster);
- FlashAttention-4's varlen and dense calls on the same shapes, when its wheel is installed: our
  varlen/dense ratio should match FA4's within 5%.

Writes bench/results/varlen-<gpu>-<date>.json and prints a table.

    python bench/varlen.py [--out-dir DIR]
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

SEQUENCES, LOW, HIGH, HEADS, HEAD_DIM, SEED = 16, 128, 4096, 16, 128, 0


def lengths() -> list[int]:
    return [int(x) for x in np.random.default_rng(SEED).integers(LOW, HIGH + 1, SEQUENCES)]


def causal_flops(lens, mode: str) -> float:
    return sum(bench.attention_flops(1, HEADS, n, n, HEAD_DIM, causal=True, mode=mode) for n in lens)



def cupyflash_calls(lens):
    """name -> (forward, backward) closures: varlen, dense at the mean length, dense padded to the longest."""
    import cupy
    rng = cupy.random.default_rng(SEED)
    bf16 = cupyflash._dtypes.BFLOAT16
    total, mean, longest = sum(lens), round(sum(lens) / len(lens)), max(lens)
    cu = cupy.asarray(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))
    calls = {}

    def packed():
        q, k, v, dout = (rng.standard_normal((total, HEADS, HEAD_DIM), dtype=np.float32).astype(bf16) for _ in range(4))
        kw = dict(causal=True, max_seqlen_q=longest, max_seqlen_k=longest)
        o, l = cupyflash.flash_attention_varlen(q, k, v, cu, cu, return_lse=True, **kw)
        return (lambda: cupyflash.flash_attention_varlen(q, k, v, cu, cu, **kw),
                lambda: cupyflash.flash_attention_varlen_backward(dout, q, k, v, o, l, cu, cu, **kw))

    def dense(S):
        q, k, v, dout = (rng.standard_normal((SEQUENCES, S, HEADS, HEAD_DIM), dtype=np.float32).astype(bf16)
                         for _ in range(4))
        o, l = cupyflash.flash_attention(q, k, v, causal=True, return_lse=True)
        return (lambda: cupyflash.flash_attention(q, k, v, causal=True),
                lambda: cupyflash.flash_attention_backward(dout, q, k, v, o, l, causal=True))

    calls["varlen"], calls["dense-mean"], calls["dense-padded"] = packed(), dense(mean), dense(longest)
    return calls


def fa4_calls(lens):
    """The same three calls through FlashAttention-4, or a reason it cannot run."""
    try:
        import torch
        from flash_attn.cute import flash_attn_func, flash_attn_varlen_func
    except Exception as e:
        return bench.short_error(e)
    total, mean, longest = sum(lens), round(sum(lens) / len(lens)), max(lens)
    dev = torch.device("cuda")
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32, device=dev)

    def grad_call(fwd, leaves, dout):
        def backward():
            out = fwd()
            torch.autograd.grad(out, leaves, dout)
        return fwd, backward

    def packed():
        q, k, v = (torch.randn(total, HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        dout = torch.randn_like(q)
        fwd = lambda: flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest,  # noqa: E731
                                             max_seqlen_k=longest, causal=True)[0]
        return grad_call(fwd, (q, k, v), dout)

    def dense(S):
        q, k, v = (torch.randn(SEQUENCES, S, HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        dout = torch.randn_like(q)
        return grad_call(lambda: flash_attn_func(q, k, v, causal=True)[0], (q, k, v), dout)

    try:
        return {"varlen": packed(), "dense-mean": dense(mean), "dense-padded": dense(longest)}
    except Exception as e:
        return bench.short_error(e)


@click.command()
@click.option("--repeats", type=int, default=20, show_default=True)
@click.option("--out-dir", type=click.Path(file_okay=False), default=None, help="Also copy the JSON here.")
def main(repeats, out_dir):
    lens = lengths()
    mean = round(sum(lens) / len(lens))
    flops = {"varlen": causal_flops(lens, "fwd"), "dense-mean": causal_flops([mean] * SEQUENCES, "fwd"),
             "dense-padded": causal_flops([max(lens)] * SEQUENCES, "fwd")}
    rows, notes = [], {}
    for impl, calls in (("cupyflash", cupyflash_calls(lens)), ("fa4", fa4_calls(lens))):
        if isinstance(calls, str):
            notes[impl] = calls
            click.echo(f"{impl}: not run ({calls})", err=True)
            continue
        for name, (fwd, bwd) in calls.items():
            for mode, fn in (("fwd", fwd), ("bwd", bwd)):
                try:
                    ms = median_ms(fn, repeats)
                except Exception as e:
                    notes[f"{impl} {name} {mode}"] = bench.short_error(e)
                    continue
                if mode == "bwd" and impl == "fa4":  # its backward call re-runs the forward
                    ms -= next(r["ms"] for r in rows if (r["impl"], r["case"], r["mode"]) == (impl, name, "fwd"))
                tflops = flops[name] * (2.5 if mode == "bwd" else 1.0) / ms / 1e9
                rows.append(dict(impl=impl, case=name, mode=mode, ms=ms, tflops=tflops))
                click.echo(f"{impl:10s} {name:13s} {mode} {ms:8.3f} ms {tflops:6.0f} TFLOP/s", err=True)

    def get(impl, case, mode):
        return next((r for r in rows if (r["impl"], r["case"], r["mode"]) == (impl, case, mode)), None)

    summary = []
    for mode in ("fwd", "bwd"):
        v, d, p = (get("cupyflash", c, mode) for c in ("varlen", "dense-mean", "dense-padded"))
        if not (v and d and p):
            continue
        line = (f"{mode}: varlen {v['tflops']:.0f} TFLOP/s = {v['tflops'] / d['tflops']:.3f}x of dense at the mean "
                f"length (>=0.95); {p['ms'] / v['ms']:.2f}x faster than padded to {max(lens)} (>=1.5)")
        fv, fd = get("fa4", "varlen", mode), get("fa4", "dense-mean", mode)
        if fv and fd:
            ours, theirs = v["tflops"] / d["tflops"], fv["tflops"] / fd["tflops"]
            line += (f"; FA4 varlen {fv['tflops']:.0f} TFLOP/s, varlen/dense {theirs:.3f}x (ours {ours:.3f}x: "
                     f"{ours / theirs:.3f} of FA4's, within 5%: {abs(ours / theirs - 1) <= 0.05}); "
                     f"cupyflash/FA4 varlen {v['tflops'] / fv['tflops']:.3f}x, dense {d['tflops'] / fd['tflops']:.3f}x")
        summary.append(line)
    gpu = bench.gpu_info()
    doc = dict(bench="varlen", versions=bench.versions(("fa4",)), lengths=lens, heads=HEADS, head_dim=HEAD_DIM,
               dtype="bfloat16", causal=True, rows=rows, notes=notes, summary=summary)
    path = write_result(doc, "varlen", gpu, out_dir)
    click.echo(f"wrote {path}")
    click.echo(f"lengths {lens} (total {sum(lens)}, mean {mean})")
    for line in summary:
        click.echo(line)


if __name__ == "__main__":
    main()
