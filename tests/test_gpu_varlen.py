"""Packed sequences (issue 15) on the CUDA kernels, held to the cases of the NumPy spec
(tests/test_varlen.py): each sequence against the float64 reference of that sequence alone, with
flash-attn's rule (at most twice naive attention's error in the same precision, plus a small atol),
outputs poisoned with NaN and framed by NaN guard rows that must stay NaN. As specifications:

- every variant case on the Hopper wgmma kernels (16-bit, head_dim 64/128: TMA loads that run
  past a sequence's end into the next one's rows), the mma.sync kernels (head_dim 96, short keys)
  and the fp32 kernels, forward and backward; deterministic=True too;
- lengths 0, 1, odd and 4000+, seqlen_q != seqlen_k per sequence;
- given max_seqlen_* the offsets are not read (no host synchronisation) and the results agree.
"""
import numpy as np
import pytest

import cupyflash
from cupyflash._dtypes import BFLOAT16, FLOAT16, FLOAT32

from test_gpu_kernels import assert_within, to_gpu
from test_gpu_variants import _lse_slack, _scale
from test_varlen import CASES, LENGTHS, _check, case_keywords, guarded, guarded_lse, guards_intact, packed_inputs

pytestmark = pytest.mark.gpu

GPU_LENGTHS = {
    **LENGTHS,
    "short": ([50, 0, 128, 3], [128, 1, 77, 0]),  # every key sequence <= 128: the mma.sync forward on Hopper
    "long": ([4100, 0, 1, 513], [4100, 3, 1, 700]),
}


def _within(name, got, want, naive, dtype, ref_lse):
    short = name.split(" ")[0]
    assert_within(name, got, want, naive, dtype, scale=_scale(short, want), slack=_lse_slack(dtype, short, want, ref_lse))


def run_packed(q, k, v, dout, cu_q, cu_k, kw, deterministic=False, max_seqlen=False):
    """Forward and backward on the GPU into NaN buffers framed by NaN guard rows; returns host copies
    of out, lse and the gradients after checking that no guard row was written."""
    cp = pytest.importorskip("cupy")
    gq, gk, gv, gdout = (to_gpu(x) for x in (q, k, v, dout))
    gcu_q, gcu_k = to_gpu(cu_q), to_gpu(cu_k)
    gkw = {n: (to_gpu(x) if isinstance(x, np.ndarray) else x) for n, x in kw.items()}
    if max_seqlen:
        gkw.update(max_seqlen_q=int(np.diff(cu_q).max()), max_seqlen_k=int(np.diff(cu_k).max()))
    H = q.shape[1]
    out_full, out = guarded(q.shape, q.dtype, cp)
    lse_full, lse = guarded_lse(H, q.shape[0], cp)
    o, l = cupyflash.flash_attention_varlen(gq, gk, gv, gcu_q, gcu_k, return_lse=True, out=out, lse=lse, **gkw)
    assert o is out and l is lse
    grads = [guarded(x.shape, x.dtype, cp) for x in (q, k, v)]
    extra = {"dsinks": cp.full((H,), np.nan, np.float32)} if "sinks" in kw else {}
    g = cupyflash.flash_attention_varlen_backward(gdout, gq, gk, gv, o, l, gcu_q, gcu_k, dq=grads[0][1],
                                                  dk=grads[1][1], dv=grads[2][1], deterministic=deterministic,
                                                  **extra, **gkw)
    assert all(a is b for a, b in zip(g, [x[1] for x in grads] + list(extra.values())))
    for name, full in (("out", out_full), ("lse", lse_full), ("dq", grads[0][0]), ("dk", grads[1][0]),
                       ("dv", grads[2][0])):
        assert guards_intact(full, cp), f"{name}: a guard row around the packed rows was written"
    return cp.asnumpy(o), cp.asnumpy(l), tuple(cp.asnumpy(x) for x in g)


def check_packed(rng, dtype, case, lengths, D, deterministic=False, max_seqlen=False):
    lq, lk = GPU_LENGTHS[lengths]
    kw, H_kv = case_keywords(rng, case, len(lq), 4)
    q, k, v, dout, cu_q, cu_k = packed_inputs(rng, dtype, lq, lk, 4, H_kv, D)
    o, l, g = run_packed(q, k, v, dout, cu_q, cu_k, kw, deterministic, max_seqlen)
    tag = f"{case} {lengths} {np.dtype(dtype).name if dtype != BFLOAT16 else 'bf16'} D{D} det={deterministic}"
    _check(tag, o, l, g, q, k, v, dout, cu_q, cu_k, kw, _within)


@pytest.mark.parametrize("lengths", ["self", "cross", "short"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype,D", [(BFLOAT16, 128), (FLOAT16, 64), (BFLOAT16, 96), (FLOAT32, 64)],
                         ids=["bf16-d128", "f16-d64", "bf16-d96", "f32-d64"])
def test_each_packed_sequence_is_that_sequence_alone(rng, dtype, D, case, lengths):
    check_packed(rng, dtype, case, lengths, D)


@pytest.mark.parametrize("case", ["causal", "mixed"])
@pytest.mark.parametrize("dtype,D", [(BFLOAT16, 128), (FLOAT16, 256), (FLOAT32, 32)], ids=["bf16-d128", "f16-d256", "f32-d32"])
def test_deterministic_packed_backward(rng, dtype, D, case):
    check_packed(rng, dtype, case, "cross", D, deterministic=True)


@pytest.mark.parametrize("dtype", [BFLOAT16, FLOAT16], ids=["bf16", "f16"])
def test_long_sequences_beside_empty_and_single_token_ones(rng, dtype):
    check_packed(rng, dtype, "causal-window-sinks", "long", 128)


def test_given_maxima_the_offsets_are_trusted_and_not_read(rng, monkeypatch):
    def no_host_read(*a, **k):
        raise AssertionError("the offsets were read to the host although both maxima were given")
    monkeypatch.setattr(cupyflash._checks, "check_cu_values", no_host_read)
    check_packed(rng, BFLOAT16, "causal", "cross", 64, max_seqlen=True)


def test_packed_calls_are_capturable_in_a_cuda_graph_given_the_maxima_and_buffers(rng):
    cp = pytest.importorskip("cupy")
    lengths = [33, 0, 200]
    q, k, v, dout, cu, _ = packed_inputs(rng, BFLOAT16, lengths, lengths, 2, 2, 64)
    gq, gk, gv, gdout, gcu = (to_gpu(x) for x in (q, k, v, dout, cu))
    kw = dict(causal=True, max_seqlen_q=200, max_seqlen_k=200)
    want_o, want_l = cupyflash.flash_attention_varlen(gq, gk, gv, gcu, gcu, return_lse=True, **kw)  # compiles
    want_g = cupyflash.flash_attention_varlen_backward(gdout, gq, gk, gv, want_o, want_l, gcu, gcu,
                                                       deterministic=True, **kw)
    out, lse = cp.empty_like(gq), cp.empty((2, q.shape[0]), np.float32)
    grads = dict(dq=cp.empty_like(gq), dk=cp.empty_like(gk), dv=cp.empty_like(gv),
                 workspace=cupyflash.backward_workspace(gq))
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        cupyflash.flash_attention_varlen(gq, gk, gv, gcu, gcu, out=out, lse=lse, **kw)
        cupyflash.flash_attention_varlen_backward(gdout, gq, gk, gv, out, lse, gcu, gcu, deterministic=True,
                                                  **grads, **kw)
        graph = stream.end_capture()
        graph.launch()
    stream.synchronize()
    assert cp.array_equal(out, want_o) and cp.array_equal(lse, want_l)
    for name, want in zip(("dq", "dk", "dv"), want_g):
        assert cp.array_equal(grads[name], want), f"{name} differs when replayed from the graph"
    with stream:
        stream.begin_capture()
        try:
            with pytest.raises(ValueError, match="max_seqlen_q and max_seqlen_k must be given"):
                cupyflash.flash_attention_varlen(gq, gk, gv, gcu, gcu, out=out, lse=lse, causal=True)
            with pytest.raises(ValueError, match="workspace="):
                cupyflash.flash_attention_varlen_backward(gdout, gq, gk, gv, out, lse, gcu, gcu,
                                                          **{n: grads[n] for n in ("dq", "dk", "dv")}, **kw)
        finally:
            stream.end_capture()


def test_offsets_on_another_device_or_the_host_are_a_value_error(rng):
    q, k, v, _, cu_q, cu_k = packed_inputs(rng, BFLOAT16, [3, 5], [4, 2], 2, 1, 64)
    with pytest.raises(ValueError, match="cu_seqlens_q is on the CPU"):
        cupyflash.flash_attention_varlen(to_gpu(q), to_gpu(k), to_gpu(v), cu_q, to_gpu(cu_k))


def test_strided_packed_views_run_as_their_contiguous_copies(rng):
    """Head slices of a fused (total, 3 H, D) projection, read in place by the kernels."""
    cp = pytest.importorskip("cupy")
    lengths = [70, 0, 300, 1]
    q, k, v, _, cu, _ = packed_inputs(rng, BFLOAT16, lengths, lengths, 4, 4, 128)
    qkv = cp.asarray(np.concatenate([q, k, v], axis=1))
    gcu = to_gpu(cu)
    views = (qkv[:, 0:4], qkv[:, 4:8], qkv[:, 8:12])
    got = cupyflash.flash_attention_varlen(*views, gcu, gcu, causal=True)
    want = cupyflash.flash_attention_varlen(*(cp.ascontiguousarray(x) for x in views), gcu, gcu, causal=True)
    assert cp.array_equal(got, want)
