"""The masks-and-sparsity benchmark (issue 19): cupyflash's mask_mod, block masks and bias beside
FlexAttention and dense attention, in one process, on the same inputs (bf16, d 128).

- Block-sparse attention at 25% density (random 128 x 128 blocks, S 16384, B 1, H 16) against
  the dense call: the issue's target is <= 0.30x of dense, forward and backward.
- Document masking: 16 documents of random lengths packed in S 16384, as a mask_mod with a block
  mask made from the same expression, against FlexAttention (torch.compile'd flex_attention with
  create_block_mask of the same mask): target >= 1.2x, forward and backward.
- The causal mask written as a mask_mod (alone, with its block mask, and as FlexAttention writes it:
  a block mask made from the expression, which masks its partial blocks) against causal=True:
  target within 1.1x.
- Dropout (p 0.1) against the dense call: its cost.
- A dense bias tensor, (1, H, S, S) float16 at B 2, S 4096 (fp16 inputs), against PyTorch SDPA's
  memory-efficient and cuDNN backends with the same tensor as attn_mask: target >= 1.0x the faster
  (the backward without dbias on both sides); and cupyflash's backward with return_dbias=True
  (its forward row times nothing).

Forward rows time the forward call; backward rows the backward call alone (its forward runs once
before). Writes bench/results/user-terms-<gpu>-<date>.json and prints a table and the ratios.

    python bench/user_terms.py [--seqlen 16384] [--out-dir DIR]
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

HEADS, HEAD_DIM, DOCUMENTS, DENSITY, BLOCK = 16, 128, 16, 0.25, 128


def documents(S: int, n: int, rng) -> np.ndarray:
    """int32 (S,): the document of each position, n documents of random lengths."""
    cuts = np.sort(rng.choice(np.arange(1, S), n - 1, replace=False))
    return np.searchsorted(cuts, np.arange(S), side="right").astype(np.int32)


def cupyflash_rows(S: int, rng, only: str | None = None):
    """name -> (forward closure, backward closure) of each cupyflash call (``only``: those of these
    comma-separated names)."""
    import cupy
    bf16 = cupyflash._dtypes.BFLOAT16
    q, k, v, dout = (cupy.asarray(rng.standard_normal((1, S, HEADS, HEAD_DIM), np.float32)).astype(bf16)
                     for _ in range(4))
    doc = documents(S, DOCUMENTS, rng)
    nb = -(-S // BLOCK)
    sparse = rng.random((1, 1, nb, nb)) < DENSITY
    calls = {
        "dense": {},
        "causal": dict(causal=True),
        "causal-as-mask_mod": dict(mask_mod="q_idx >= kv_idx"),
        "causal-as-mask_mod+block_mask": dict(mask_mod="q_idx >= kv_idx",
                                              block_mask=cupyflash.block_mask("q_idx >= kv_idx", 1, HEADS, S, S)),
        # FlexAttention's form: the mask_mod only inside the block mask (it masks the partial blocks)
        "causal-as-block_mask": dict(block_mask=cupyflash.block_mask("q_idx >= kv_idx", 1, HEADS, S, S)),
        f"block-sparse-{int(DENSITY * 100)}%": dict(block_mask=cupyflash.block_mask(sparse, 1, HEADS, S, S)),
        "document-mask+block_mask": dict(block_mask=cupyflash.block_mask("doc[q_idx] == doc[kv_idx]", 1, HEADS, S, S,
                                                                         aux={"doc": doc})),
        "dropout-0.1": dict(dropout_p=0.1, seed=1234),  # its cost against dense (FA2's: about 5-15%)
    }
    rows = {}
    for name, kw in calls.items():
        if only and name not in only.split(","):
            continue
        def fwd(kw=kw):
            return cupyflash.flash_attention(q, k, v, return_lse=True, **kw)
        o, lse = fwd()
        rows[name] = (fwd, lambda kw=kw, o=o, lse=lse: cupyflash.flash_attention_backward(dout, q, k, v, o, lse, **kw))
    density = {"dense": 1.0, "causal": None, f"block-sparse-{int(DENSITY * 100)}%": float(sparse.mean()),
               "document-mask+block_mask": calls["document-mask+block_mask"]["block_mask"].density}
    return rows, (q, k, v, dout, doc), density


def flex_rows(inputs):
    """FlexAttention with the document mask (create_block_mask, torch.compile), on (B, H, S, D) copies."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    q, k, v, dout, doc = inputs
    S = q.shape[1]
    doc_t = torch.as_tensor(doc, device="cuda")
    views = [torch.from_dlpack(x).transpose(1, 2).contiguous().requires_grad_(True) for x in (q, k, v)]
    g = torch.from_dlpack(dout).transpose(1, 2).contiguous()

    def mask_mod(b, h, q_idx, kv_idx):
        return doc_t[q_idx] == doc_t[kv_idx]

    bm = create_block_mask(mask_mod, None, None, S, S, device="cuda")
    compiled = torch.compile(flex_attention, dynamic=False)

    def fwd():
        return compiled(*views, block_mask=bm, scale=HEAD_DIM ** -0.5)
    out = fwd()

    def bwd():
        for t in views:
            t.grad = None
        out.backward(g, retain_graph=True)
    bwd()
    return {"flex-document-mask": (fwd, bwd)}


BIAS_SHAPE = (2, 16, 4096)  # batch, heads, seqlen of the bias rows


def bias_rows(rng, only: str | None):
    """cupyflash with a dense (1, H, S, S) float16 bias, and SDPA (efficient, cuDNN) with it as attn_mask
    (``only``: these rows, as in main)."""
    import cupy
    B, H, S = BIAS_SHAPE
    rows = {}
    q, k, v, dout = (cupy.asarray(rng.standard_normal((B, S, H, HEAD_DIM), np.float32)).astype(np.float16)
                     for _ in range(4))
    bias = cupy.asarray(rng.standard_normal((1, H, S, S), np.float32)).astype(np.float16)
    if not only or "bias" in only.split(","):
        def fwd():
            return cupyflash.flash_attention(q, k, v, bias=bias, return_lse=True)
        o, lse = fwd()
        rows["bias"] = (fwd, lambda: cupyflash.flash_attention_backward(dout, q, k, v, o, lse, bias=bias))
    if not only or "bias-dbias" in only.split(","):  # the backward with the bias's gradient too
        o, lse = cupyflash.flash_attention(q, k, v, bias=bias, return_lse=True)
        rows["bias-dbias"] = (lambda: None, lambda: cupyflash.flash_attention_backward(
            dout, q, k, v, o, lse, bias=bias, return_dbias=True))
    if only and "sdpa-bias" not in only.split(","):
        return rows
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    tq, tk, tv = (torch.from_dlpack(x).transpose(1, 2).contiguous().requires_grad_(True) for x in (q, k, v))
    tb, tg = torch.from_dlpack(bias), torch.from_dlpack(dout).transpose(1, 2).contiguous()
    for name, backend in (("sdpa-efficient-bias", SDPBackend.EFFICIENT_ATTENTION),
                          ("sdpa-cudnn-bias", SDPBackend.CUDNN_ATTENTION)):
        try:
            def fwd(backend=backend):
                with sdpa_kernel(backend):
                    return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tb)
            out = fwd()

            def bwd(out=out):
                for t in (tq, tk, tv):
                    t.grad = None
                out.backward(tg, retain_graph=True)
            bwd()
            rows[name] = (fwd, bwd)
        except Exception as e:  # noqa: BLE001 - a backend that refuses the bias is reported, not fatal
            click.echo(f"{name} not measured: {bench.short_error(e)}")
    return rows


@click.command()
@click.option("--seqlen", type=int, default=16384, show_default=True)
@click.option("--repeats", type=int, default=10, show_default=True)
@click.option("--out-dir", type=click.Path(file_okay=False), default=None, help="Also copy the JSON here.")
@click.option("--only", default=None, help="Only these rows, comma-separated names ('flex' for FlexAttention's).")
def main(seqlen, repeats, out_dir, only):
    rng = np.random.default_rng(0)
    rows, inputs, density = cupyflash_rows(seqlen, rng, only)
    try:
        if not only or "flex" in only:
            rows.update(flex_rows(inputs))
    except Exception as e:  # noqa: BLE001 - a missing peer is reported, not fatal
        click.echo(f"FlexAttention not measured: {bench.short_error(e)}")
    rows.update(bias_rows(rng, only))
    ms = {}
    for name, (fwd, bwd) in rows.items():
        ms[name] = (median_ms(fwd, repeats), median_ms(bwd, repeats))
        click.echo(f"{name:34s} fwd {ms[name][0]:8.3f} ms  bwd {ms[name][1]:8.3f} ms", err=True)
    gpu = bench.gpu_info()
    doc = {"bench": "user-terms", "settings": {"batch": 1, "heads": HEADS, "seqlen": seqlen, "head_dim": HEAD_DIM,
                                               "dtype": "bfloat16", "documents": DOCUMENTS, "block": BLOCK},
           "versions": bench.versions(("flex",)), "density": density,
           "rows": [{"impl": n, "fwd_ms": f, "bwd_ms": b} for n, (f, b) in ms.items()]}
    path = write_result(doc, "user-terms", gpu, out_dir)
    click.echo(f"wrote {path}")

    def ratio(a, b, i):
        return ms[a][i] / ms[b][i] if a in ms and b in ms else float("nan")
    sparse = f"block-sparse-{int(DENSITY * 100)}%"
    for i, mode in enumerate(("fwd", "bwd")):
        click.echo(f"{mode}: block-sparse at {density[sparse]:.2f} density {ratio(sparse, 'dense', i):.3f}x of dense "
                   f"(<= 0.30); document mask (density {density['document-mask+block_mask']:.3f}) "
                   f"{ratio('flex-document-mask', 'document-mask+block_mask', i):.2f}x FlexAttention's speed (>= 1.2); "
                   f"causal as mask_mod {ratio('causal-as-mask_mod', 'causal', i):.2f}x, with its block mask "
                   f"{ratio('causal-as-mask_mod+block_mask', 'causal', i):.2f}x, as a block mask alone (FlexAttention's "
                   f"form) {ratio('causal-as-block_mask', 'causal', i):.2f}x of causal=True's time (<= 1.1); "
                   f"bias (B, H, S = {BIAS_SHAPE}) {ratio('sdpa-efficient-bias', 'bias', i):.2f}x SDPA efficient's "
                   f"speed, {ratio('sdpa-cudnn-bias', 'bias', i):.2f}x SDPA cuDNN's (>= 1.0 the faster); "
                   f"dropout 0.1 {ratio('dropout-0.1', 'dense', i):.2f}x of dense's time")
    click.echo(f"bwd with dbias: {ratio('bias-dbias', 'bias', 1):.2f}x of the bias's backward without it")


if __name__ == "__main__":
    main()
