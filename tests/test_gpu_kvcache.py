"""Attention against a KV cache (issue 16) on the CUDA kernels, held to the cases of the NumPy spec
(tests/test_kvcache.py): each sequence's queries against the float64 reference of its cache's
valid prefix, with flash-attn's rule, outputs poisoned with NaN, cache positions past each valid
prefix NaN (never read: the Hopper forward zeroes the V rows TMA loads past a sequence's keys),
the new tokens landing exactly where they should. Dense caches run the forward kernels with
per-sequence key counts (VARIANT_KVLEN); paged caches are gathered first (the interim path).
"""
import numpy as np
import pytest

import cupyflash
from cupyflash._dtypes import BFLOAT16, FLOAT16, FLOAT32

from test_gpu_kernels import assert_within, nan_like, to_gpu
from test_gpu_variants import _lse_slack
from test_kvcache import CASES, LAYOUTS, cache_inputs, case_keywords, check_kvcache

pytestmark = pytest.mark.gpu


def _within(tag):
    """assert_within, with fp32 lse's slack for its own magnitude (test_gpu_variants._lse_slack)."""
    def within(name, got, want, naive, dtype):
        slack = _lse_slack(dtype, name, got, want) if name == "lse" else 0.0
        assert_within(f"{name} [{tag}]", got, want, naive, dtype, slack=slack)
    return within


def run_kvcache(inputs, kw, D):
    cp = pytest.importorskip("cupy")
    q, k_cache, v_cache, k_new, v_new, seqlens, table = inputs
    g = lambda x: None if x is None else to_gpu(x)  # noqa: E731
    gk, gv = g(k_cache), g(v_cache)
    out, lse = nan_like(q.shape, q.dtype), nan_like((q.shape[0], q.shape[2], q.shape[1]), np.float32)
    gkw = {n: (to_gpu(x) if isinstance(x, np.ndarray) else x) for n, x in kw.items()}
    o, l = cupyflash.flash_attention_with_kvcache(g(q), gk, gv, k=g(k_new), v=g(v_new), cache_seqlens=g(seqlens),
                                                  page_table=g(table), return_lse=True, out=out, lse=lse, **gkw)
    assert o is out and l is lse
    return cp.asnumpy(o), cp.asnumpy(l), cp.asnumpy(gk), cp.asnumpy(gv)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype,D", [(BFLOAT16, 128), (FLOAT16, 64), (BFLOAT16, 96), (FLOAT32, 32)],
                         ids=["bf16-d128", "f16-d64", "bf16-d96", "f32-d32"])
def test_each_sequence_attends_to_the_valid_prefix_of_its_cache(rng, dtype, D, case, layout):
    cached, new, Sq, page_size, H_kv = LAYOUTS[layout]
    inputs = cache_inputs(rng, dtype, cached, new, Sq, page_size, H_kv, D=D)
    kw = case_keywords(rng, case, len(cached), inputs[0].shape[2])
    o, l, k_after, v_after = run_kvcache(inputs, kw, D)
    tag = f"{case} {layout} {np.dtype(dtype).name if dtype != BFLOAT16 else 'bf16'} D{D}"
    check_kvcache(o, l, k_after, v_after, inputs[1], inputs[2], inputs, LAYOUTS[layout], kw,
                  _within(tag))


def test_a_long_cache_decode(rng):
    cached = [4000, 0, 1, 2049]
    inputs = cache_inputs(rng, BFLOAT16, cached, 1, 1, None, 2, D=128, capacity=4096)
    kw = dict(causal=True)
    o, l, k_after, v_after = run_kvcache(inputs, kw, 128)
    check_kvcache(o, l, k_after, v_after, inputs[1], inputs[2], inputs, (cached, 1, 1, None, 2), kw,
                  _within("long"))
