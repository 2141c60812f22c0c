"""The variants benchmark (issue 14): cupyflash's grouped-query, sliding-window, softcap, ALiBi
and sink kernels beside their peers, in one process, on the same inputs and stream (bf16).

- GQA at Llama-3-8B's heads (H_q 32, H_kv 8, d 128, S 4096, B 4), causal and not, forward and
  backward, TFLOP/s counting query heads: against the same call with H_kv = H_q, PyTorch SDPA
  (flash and cuDNN, enable_gqa=True) and FlashAttention-4.
- A causal sliding window of 4096 keys at S 16384 (B 1, H 16, d 128) against full causal at the
  same shape, FLOPs over the visible pairs only: FlashAttention-4 and FlexAttention (a block mask).
- The cost of each variant at S 4096, d 128 (B 4, H 16): softcap 30, ALiBi, sinks against plain.

Writes bench/results/variants-<gpu>-<date>.json and prints the ratios the issue asks for.

    python bench/variants.py            # everything (about 3 minutes on an H200, compilation included)
    python bench/variants.py --only gqa # one group: gqa, window, cost
"""
from __future__ import annotations

import datetime
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cupyflash import bench  # noqa: E402
from run_peers import slug  # noqa: E402

RESULTS_DIR = ROOT / "bench" / "results"
DTYPE = "bfloat16"
PEERS = ("torch-flash", "torch-cudnn", "fa4")
WINDOW = 4096  # keys a query sees, itself included: window_size (WINDOW - 1, 0)


class FlexAttentionImpl(bench.TorchImpl):
    """FlexAttention (``torch.compile``d ``flex_attention``) with a block mask for the causal or
    sliding-window mask, so fully masked blocks are skipped, on (B, H, S, D)-contiguous copies."""
    name = "flex"
    variants = ("gqa", "window")

    def missing(self, torch):
        try:
            from torch.nn.attention import flex_attention  # noqa: F401
        except Exception as e:
            return f"FlexAttention is not importable ({bench.short_error(e)})"
        return None

    def bind(self, case, inputs, qkv, dout):
        import torch
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        left, right = case.variant.window
        right = 0 if case.causal else right
        offset = case.seqlen_k - case.seqlen_q

        def mask_mod(b, h, q_idx, kv_idx):
            d = kv_idx - (q_idx + offset)
            ok = d <= right if right >= 0 else d == d
            return ok & (d >= -left) if left >= 0 else ok

        block_mask = None
        if case.causal or tuple(case.variant.window) != (-1, -1):
            block_mask = create_block_mask(mask_mod, None, None, case.seqlen_q, case.seqlen_k, device=qkv[0].device)
        compiled = torch.compile(flex_attention, dynamic=False)
        views = [t.detach().transpose(1, 2).contiguous().requires_grad_(case.mode != "fwd") for t in qkv]
        kw = dict(block_mask=block_mask, scale=inputs.scale, enable_gqa="gqa" in case.features)

        def attn():
            return compiled(*views, **kw)

        attn()  # compiles outside the timing
        return attn, views, dout.transpose(1, 2).contiguous(), "torch.compile(flex_attention), block mask"


def cases(only: str | None) -> list[bench.Case]:
    out = []
    mk = lambda B, H, S, causal, mode, **v: bench.Case(B, H, S, S, 128, DTYPE, causal, mode, bench.Variant(**v))  # noqa: E731
    for mode in ("fwd", "bwd"):
        if only in (None, "gqa"):
            for causal in (False, True):
                out += [mk(4, 32, 4096, causal, mode, kv_heads=8), mk(4, 32, 4096, causal, mode)]
        if only in (None, "window"):
            out += [mk(1, 16, 16384, True, mode, window=(WINDOW - 1, 0)), mk(1, 16, 16384, True, mode)]
        if only in (None, "cost"):
            out += [mk(4, 16, 4096, False, mode), mk(4, 16, 4096, False, mode, softcap=30.0),
                    mk(4, 16, 4096, False, mode, alibi=True), mk(4, 16, 4096, False, mode, sinks=True)]
    return out


def _ms(results, impl, case: bench.Case):
    key = bench.Result.of(case, impl, "ok").case_key
    for r in results:
        if r.impl == impl and r.case_key == key and r.status == "ok":
            return r
    return None


def summary(results, case_list) -> list[str]:
    """The issue's ratios, one line each."""
    lines = []
    by = {(c.mode, c.batch, c.heads, c.causal, c.variant): c for c in case_list}

    def get(impl, mode, B, H, causal, **v):
        c = by.get((mode, B, H, causal, bench.Variant(**v)))
        return _ms(results, impl, c) if c else None

    def ratio(a, b, what):
        return f"{what}: {a.tflops / b.tflops:.3f}x" if a and b else f"{what}: n/a"

    for mode in ("fwd", "bwd"):
        for causal in (False, True):
            g = get("cupyflash", mode, 4, 32, causal, kv_heads=8)
            if g is None:
                continue
            parts = [ratio(g, get("cupyflash", mode, 4, 32, causal), "vs H_kv=H_q (>=0.97)")]
            parts += [ratio(g, get(p, mode, 4, 32, causal, kv_heads=8), f"vs {p}") for p in PEERS]
            lines.append(f"GQA 32:8 {mode} causal={causal} {g.tflops:.0f} TFLOP/s; " + "; ".join(parts))
        w, full = get("cupyflash", mode, 1, 16, True, window=(WINDOW - 1, 0)), get("cupyflash", mode, 1, 16, True)
        if w and full:
            peers = "; ".join(ratio(w, get(p, mode, 1, 16, True, window=(WINDOW - 1, 0)), f"vs {p}")
                              for p in ("fa4", "flex"))
            lines.append(f"window {WINDOW} at S 16384 {mode}: {w.ms_median:.3f} ms = {w.ms_median / full.ms_median:.3f}x "
                         f"of full causal {full.ms_median:.3f} ms (<=0.48), {w.tflops:.0f} TFLOP/s over visible pairs; {peers}")
        plain = get("cupyflash", mode, 4, 16, False)
        for name, v, limit in (("softcap", dict(softcap=30.0), 1.10), ("alibi", dict(alibi=True), 1.10),
                               ("sinks", dict(sinks=True), 1.03)):
            r = get("cupyflash", mode, 4, 16, False, **v)
            if r and plain:
                fa4 = get("fa4", mode, 4, 16, False, **v)
                lines.append(f"cost of {name} {mode}: {r.ms_median / plain.ms_median:.3f}x of plain (<={limit}); "
                             f"{r.tflops:.0f} TFLOP/s" + (f", fa4 {fa4.tflops:.0f}" if fa4 else ""))
    return lines


@click.command()
@click.option("--only", type=click.Choice(["gqa", "window", "cost"]), default=None, help="One group of cases.")
@click.option("--repeats", type=int, default=10, show_default=True)
@click.option("--out-dir", type=click.Path(file_okay=False), default=None, help="Also copy the JSON here.")
def main(only, repeats, out_dir):
    case_list = cases(only)
    impls = [bench.CupyflashImpl(), *(bench.implementations()[p] for p in PEERS), FlexAttentionImpl()]
    device = bench.cuda_device()

    def progress(r):
        timing = f"{r.ms_median:.3f} ms {r.tflops:.0f} TFLOP/s" if r.status == "ok" else f"{r.status}: {r.note[:120]}"
        click.echo(f"{r.impl:12s} {r.mode} B{r.batch} H{r.heads} S{r.seqlen_q} causal={r.causal} {r.variant:24s} {timing}",
                   err=True)

    results = bench.run_benchmark(case_list, impls, device, warmup=3, repeats=repeats, max_seconds=2.0,
                                  on_result=progress)
    gpu = bench.gpu_info()
    doc = bench.results_document(results, command=sys.argv, gpu=gpu, versions=bench.versions(PEERS + ("flex",)),
                                 settings={"bench": "variants", "dtype": DTYPE})
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    date = datetime.date.today().isoformat()
    path = RESULTS_DIR / f"variants-{slug(gpu.get('name', 'gpu'))}-{date}{'-' + only if only else ''}.json"
    import json
    path.write_text(json.dumps(doc, indent=1) + "\n")
    click.echo(f"wrote {path}")
    if out_dir:
        (Path(out_dir) / path.name).write_text(path.read_text())
    for line in summary(results, case_list):
        click.echo(line)


if __name__ == "__main__":
    main()
