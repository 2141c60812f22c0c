"""The user's mask_mod and bias_mod (issue 19) compiled into the CUDA kernels, held to the float64
reference with flash-attn's rule (2x naive attention's error in the same precision, plus a small
atol), outputs poisoned with NaN first. As specifications:

- FlexAttention's recipes (a document mask with random document lengths, prefix-LM, T5 relative
  buckets, ALiBi as a bias_mod) on every kernel family: the Hopper wgmma kernels (16-bit, head_dim
  64/128), the mma.sync kernels (head_dims 96 and 256, short keys) and the fp32 kernels, forward and
  backward, with grouped-query heads; deterministic=True too;
- they compose with causal, windows, softcap, ALiBi and sinks, and with packed sequences (b is the
  sequence's index, positions count from its start);
- the causal mask written as a mask_mod is causal=True;
- a row the mask empties gets out 0 and lse -inf, and dq 0;
- an aux index out of bounds (which the NumPy backend refuses) makes exactly that row NaN on the
  GPU, never a silent value;
- dense bias and mask tensors broadcast from any axis, and block masks (from an expression, a
  callable or an array of blocks) mean the masks they stand for; dbias is the bias's gradient,
  summed over its broadcast axes; dropout regenerates the NumPy spec's mask.
"""
import numpy as np
import pytest

import cupyflash
from cupyflash import reference
from cupyflash._dtypes import BFLOAT16, FLOAT16, FLOAT32

from test_gpu_kernels import assert_within, to_gpu, to_host64
from test_gpu_variants import _gpu_kw, check_variant
from test_user_terms import _block_cases, _documents
from test_user_terms import _cases as _user_cases

pytestmark = pytest.mark.gpu


def _recipes(rng, S, B, H):
    """name -> keywords: FlexAttention's recipes as mask_mod / bias_mod with their aux arrays (the
    NumPy spec's cases), a mask and a bias together, and both with every variant."""
    spec = _user_cases(rng, S, B, H)
    return {
        **{name: spec[name] for name in ("document-mask", "prefix-lm", "t5-buckets", "alibi-as-bias-mod")},
        "mask-and-bias": dict(mask_mod="doc[b][q_idx] == doc[b][kv_idx]", bias_mod="0.25 * (kv_idx % 3)",
                              aux={"doc": _documents(rng, B, S), "unused": np.zeros(3, np.float64)}),
        "with-variants": dict(mask_mod="(q_idx / 7) % 2 == 0 || kv_idx % 5 != 0", bias_mod="w[h] * (q_idx > kv_idx)",
                              window_size=(90, 20), softcap=8.0, alibi_slopes=(2.0 ** -np.arange(1, H + 1)).astype(
                                  np.float32), sinks=rng.uniform(-1, 2, H).astype(np.float32),
                              aux={"w": rng.uniform(-1, 1, H).astype(np.float32)}),
    }


RECIPES = ["document-mask", "prefix-lm", "t5-buckets", "alibi-as-bias-mod", "mask-and-bias", "with-variants"]
# each distinct expression is a module of its own, compiled at first use: every recipe on the Hopper
# kernels, and the two that exercise the most (a mask and a bias with every variant) on the others
FAMILIES = [pytest.param(r, dt, D, id=f"{i}-{r}") for r in RECIPES for dt, D, i in ((BFLOAT16, 128, "bf16-d128"),)] + [
    pytest.param(r, dt, D, id=f"{i}-{r}") for r in ("mask-and-bias", "with-variants")
    for dt, D, i in ((FLOAT16, 64, "fp16-d64"), (BFLOAT16, 96, "bf16-d96"), (FLOAT16, 256, "fp16-d256"),
                     (FLOAT32, 64, "fp32-d64"))]


@pytest.mark.parametrize("recipe,dtype,D", FAMILIES)
def test_the_recipes_on_each_kernel_family(rng, recipe, dtype, D):
    S, B, H = 300, 2, 4
    kw = _recipes(rng, S, B, H)[recipe]
    check_variant(rng, dtype, recipe, B, S, S, H, 2, D, kw=kw)


@pytest.mark.parametrize("recipe", ["mask-and-bias", "with-variants"])
def test_short_keys_and_the_deterministic_backward(rng, recipe):
    kw = _recipes(rng, 120, 1, 8)[recipe]  # 120 keys: the mma.sync forward on Hopper
    check_variant(rng, BFLOAT16, recipe, 1, 120, 120, 8, 2, 64, kw=kw)
    kw = _recipes(rng, 257, 1, 4)[recipe]
    check_variant(rng, BFLOAT16, recipe, 1, 257, 257, 4, 4, 128, kw=kw, deterministic=True)


def test_the_causal_mask_as_a_mask_mod_is_causal(rng):
    q, k, v = (to_gpu(rng.standard_normal((2, 333, 4, 128)).astype(BFLOAT16)) for _ in range(3))
    a = to_host64(cupyflash.flash_attention(q, k, v, causal=True))
    b = to_host64(cupyflash.flash_attention(q, k, v, mask_mod="q_idx >= kv_idx"))
    assert np.abs(a - b).max() <= 1e-2, np.abs(a - b).max()  # both bf16 roundings of the same attention


def test_a_row_the_mask_empties_gets_zero_and_minus_infinity(rng):
    q, k, v, dout = (to_gpu(rng.standard_normal((1, 200, 2, 64)).astype(BFLOAT16)) for _ in range(4))
    kw = dict(mask_mod="q_idx != 5 && q_idx != 199")
    o, lse = cupyflash.flash_attention(q, k, v, return_lse=True, **kw)
    o, lse = to_host64(o), to_host64(lse)
    assert np.all(o[:, [5, 199]] == 0) and np.all(np.isneginf(lse[:, :, [5, 199]])) and np.isfinite(o).all()
    dq, dk, dv = (to_host64(g) for g in cupyflash.flash_attention_backward(dout, q, k, v, to_gpu(o.astype(BFLOAT16)),
                                                                          to_gpu(lse.astype(np.float32)), **kw))
    assert np.all(dq[:, [5, 199]] == 0) and np.isfinite(dk).all() and np.isfinite(dv).all()


def test_an_aux_index_out_of_bounds_makes_its_row_nan(rng):
    """The NumPy backend raises; the GPU cannot, so the logit it could not compute is NaN: the rows
    that read past the array are NaN, every other row is exact."""
    S = 150
    q, k, v = (rng.standard_normal((1, S, 2, 64)).astype(BFLOAT16) for _ in range(3))
    nxt = np.arange(1, S + 1, dtype=np.int32)[:S - 1]  # next[q_idx] for q_idx < S - 1 only
    o = to_host64(cupyflash.flash_attention(*(to_gpu(x) for x in (q, k, v)), bias_mod="0.1 * nxt[q_idx]",
                                            aux={"nxt": to_gpu(nxt)}))
    assert np.isnan(o[:, S - 1]).all() and np.isfinite(o[:, :S - 1]).all()
    want = reference.attention(q[:, :S - 1], k, v, bias_mod="0.1 * nxt[q_idx]", aux={"nxt": nxt})[0]
    assert np.abs(o[:, :S - 1] - want).max() < 2e-2


@pytest.mark.parametrize("D", [64, 128])
def test_an_empty_aux_array_makes_every_row_nan_forward_and_backward(rng, D):
    """Every read of an empty array is out of bounds (the NumPy backend raises): the kernels read
    no memory for it (eagerly or not: kernels_cu/user_terms.cuh) and every logit, so every row and
    every gradient, is NaN."""
    q, k, v, dout = (to_gpu(rng.standard_normal((1, 70, 2, D)).astype(BFLOAT16)) for _ in range(4))
    kw = dict(mask_mod="q_idx >= kv_idx && none[kv_idx] == 0", aux={"none": to_gpu(np.zeros(0, np.int32))})
    o, lse = cupyflash.flash_attention(q, k, v, return_lse=True, **kw)
    assert np.isnan(to_host64(o)).all()
    grads = cupyflash.flash_attention_backward(dout, q, k, v, o, lse, **kw)
    for name, g in zip(("dq", "dk", "dv"), grads):
        assert np.isnan(to_host64(g)).all(), name


def test_packed_sequences_see_their_own_index_and_positions(rng):
    lens = [37, 0, 200, 5, 129]
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    H, D = 4, 128
    q, k, v, dout = (rng.standard_normal((cu[-1], H, D)).astype(BFLOAT16) for _ in range(4))
    kw = dict(mask_mod="q_idx >= kv_idx || kv_idx < 3", bias_mod="-w[b] * abs(q_idx - kv_idx)",
              aux={"w": rng.uniform(0.1, 1.0, len(lens)).astype(np.float32)})
    gq, gk, gv, gdo, gcu = (to_gpu(x) for x in (q, k, v, dout, cu))
    o, lse = cupyflash.flash_attention_varlen(gq, gk, gv, gcu, gcu, return_lse=True, **_gpu_kw(kw))
    grads = cupyflash.flash_attention_varlen_backward(gdo, gq, gk, gv, o, lse, gcu, gcu, **_gpu_kw(kw))
    for b, (s0, s1) in enumerate(zip(cu[:-1], cu[1:])):
        if s0 == s1:
            continue
        rows = lambda x: np.concatenate([np.zeros((b, s1 - s0) + x.shape[1:], x.dtype), x[None, s0:s1]])  # noqa: E731
        args = [rows(x) for x in (q, k, v)]
        ref, naive = (reference.attention(*args, upcast=u, **kw) for u in (True, False))
        tag = f"sequence {b} ({s1 - s0} tokens)"
        assert_within(f"out [{tag}]", to_host64(o)[s0:s1], ref[0][b], naive[0][b], BFLOAT16)
        ref_g, naive_g = (reference.attention_backward(rows(dout), *args, upcast=u, **kw) for u in (True, False))
        for name, g, w, n in zip(("dq", "dk", "dv"), grads, ref_g, naive_g):
            assert_within(f"{name} [{tag}]", to_host64(g)[s0:s1], w[b], n[b], BFLOAT16)


TENSORS = ["bias-per-head", "bias-2d-mask-2d", "bias-per-batch-key"]


@pytest.mark.parametrize("dtype,D", [(BFLOAT16, 128), (FLOAT16, 96), (FLOAT32, 64)], ids=["bf16-d128", "fp16-d96", "fp32-d64"])
@pytest.mark.parametrize("case", TENSORS)
def test_dense_bias_and_mask_tensors(rng, case, dtype, D):
    """bias and mask broadcast from any of their axes, with softcap, a window and sinks; dq, dk, dv
    (dbias: test_dbias_is_the_gradient_of_the_bias_on_every_kernel_family)."""
    S, B, H = 200, 2, 4
    kw = _user_cases(rng, S, B, H)[case]
    check_variant(rng, dtype, case, B, S, S, H, 2, D, kw=kw)


@pytest.mark.parametrize("case", ["document-expression", "prefix-callable", "blocks-10%", "blocks-50%", "blocks-100%"])
def test_block_masks_are_attention_under_the_mask_they_mean(rng, case):
    B, H, S = 2, 4, 200
    bm, kw = _block_cases(rng, B, H, S)[case]
    dense = bm.to_dense()
    if "mask_mod" in kw:  # the callable's partial blocks are kept whole by the block mask itself
        dense = dense & reference._user_terms(np, kw, (B, H, S, S), np.float64)[1]
    q, k, v, dout = (rng.standard_normal((B, S, H, 128)).astype(BFLOAT16) for _ in range(4))
    gq, gk, gv, gdo = (to_gpu(x) for x in (q, k, v, dout))
    gkw = dict(block_mask=bm, **_gpu_kw(kw))
    o, lse = cupyflash.flash_attention(gq, gk, gv, return_lse=True, **gkw)
    ref, naive = (reference.attention(q, k, v, upcast=u, mask=dense) for u in (True, False))
    assert_within(f"out [{case}]", o, ref[0], naive[0], BFLOAT16)
    assert_within(f"lse [{case}]", lse, ref[1], naive[1], BFLOAT16)
    grads = cupyflash.flash_attention_backward(gdo, gq, gk, gv, o, lse, **gkw)
    ref_g, naive_g = (reference.attention_backward(dout, q, k, v, upcast=u, mask=dense) for u in (True, False))
    for name, g, w, n in zip(("dq", "dk", "dv"), grads, ref_g, naive_g):
        assert_within(f"{name} [{case}]", g, w, n, BFLOAT16)


@pytest.mark.parametrize("dtype,D", [(BFLOAT16, 128), (FLOAT16, 64), (FLOAT16, 96), (FLOAT32, 64)],
                         ids=["bf16-d128", "fp16-d64", "fp16-d96", "fp32-d64"])
@pytest.mark.parametrize("case", TENSORS)
def test_dbias_is_the_gradient_of_the_bias_on_every_kernel_family(rng, case, dtype, D):
    """return_dbias=True: d loss / d bias, summed over the axes where the bias broadcasts (per head
    over the batch, 2-D over batch and heads, per batch and key over heads and queries), against
    float64, in the caller's NaN-poisoned float32 buffer; grouped-query heads, and the variants of
    each case (softcap, a window, sinks)."""
    from test_gpu_kernels import nan_like
    from test_gpu_variants import _gpu_kw, _inputs
    S, B, H = 200, 2, 4
    kw = _user_cases(rng, S, B, H)[case]
    q, k, v, dout = _inputs(rng, dtype, B, S, S, H, 2, D)
    gq, gk, gv, gdo = (to_gpu(x) for x in (q, k, v, dout))
    o, lse = cupyflash.flash_attention(gq, gk, gv, return_lse=True, **_gpu_kw(kw))
    buf = nan_like(kw["bias"].shape, np.float32)
    *grads, dbias = cupyflash.flash_attention_backward(gdo, gq, gk, gv, o, lse, return_dbias=True, dbias=buf,
                                                       **_gpu_kw(kw))
    assert dbias is buf
    ref, naive = (reference.attention_backward(dout, q, k, v, upcast=u, return_dbias=True, **kw) for u in (True, False))
    tag = f"{case} {np.dtype(dtype).name if dtype != BFLOAT16 else 'bf16'} D{D}"
    assert_within(f"dbias [{tag}]", dbias, ref[-1], naive[-1], FLOAT32)
    for name, g, w, n in zip(("dq", "dk", "dv"), grads, ref, naive):
        assert_within(f"{name} [{tag}]", g, w, n, dtype)


def test_dbias_with_deterministic_is_bitwise_repeatable_or_refused(rng):
    """deterministic=True: a full-shape bias (no two logits share a dbias element) gives the same
    bits twice; a broadcast one, which the GPU sums with atomics, is a ValueError naming the rule."""
    B, S, H, D = 2, 130, 2, 64
    q, k, v, dout = (to_gpu(rng.standard_normal((B, S, H, D)).astype(BFLOAT16)) for _ in range(4))
    full = to_gpu(rng.standard_normal((B, H, S, S)).astype(np.float32))
    o, lse = cupyflash.flash_attention(q, k, v, bias=full, return_lse=True)
    runs = [cupyflash.flash_attention_backward(dout, q, k, v, o, lse, bias=full, return_dbias=True,
                                               deterministic=True)[-1] for _ in range(2)]
    assert np.array_equal(to_host64(runs[0]), to_host64(runs[1]))
    host = [to_host64(x).astype(BFLOAT16) for x in (dout, q, k, v)]
    want, naive = (reference.attention_backward(*host, bias=to_host64(full).astype(np.float32), upcast=u,
                                                return_dbias=True)[-1] for u in (True, False))
    assert_within("dbias [deterministic, full shape]", runs[0], want, naive, FLOAT32)
    per_head = full[:1]
    o, lse = cupyflash.flash_attention(q, k, v, bias=per_head, return_lse=True)
    with pytest.raises(ValueError, match=r"deterministic=True needs a bias of the full .* broadcasts"):
        cupyflash.flash_attention_backward(dout, q, k, v, o, lse, bias=per_head, return_dbias=True, deterministic=True)


def test_a_module_that_does_not_compile_is_a_value_error_with_the_expression():
    """The expressions are translated from a checked tree, so NVRTC should never fail on them; if it
    does, the user sees the expression and NVRTC's message, not a CompileException from inside."""
    from dataclasses import replace
    from cupyflash import _config, _launch
    ks = replace(_config.kernel_set(FLOAT32, 64, False, 80, variant=_config.VARIANT_USER_MASK),
                 user="// mask_mod: nope\n#define CUPYFLASH_USER_KEEP (no_such_name > 0)\n")
    with pytest.raises(ValueError, match=r"(?s)mask_mod / bias_mod did not compile.*mask_mod: nope.*no_such_name"):
        _launch.PreparedLaunch(ks, ks.fwd_name(), (1, 1, 1), ks.fwd_threads(), ks.fwd_smem())


@pytest.mark.parametrize("dtype,D", [(BFLOAT16, 128), (FLOAT16, 64), (BFLOAT16, 96)], ids=["bf16-d128", "fp16-d64", "bf16-d96"])
@pytest.mark.parametrize("causal", [False, True])
def test_the_kernels_never_read_a_skipped_block(rng, dtype, D, causal):
    """With blocks the kernels' tiles divide (128 x 128 here), the forward and the backward walk only
    the kept tiles (VARIANT_BLOCKS): keys of a block column that no query block keeps are NaN, and
    out, lse, dq, dk, dv are still exact (dk, dv zero there). Partial blocks (a document mask
    inside) and the causal mask compose with it."""
    from cupyflash import _config
    B, H, S = 2, 4, 640
    blocks = rng.random((B, 1, 5, 5)) < 0.6
    blocks[:, :, :, 2] = False  # key block 2 (keys 256-383): skipped everywhere, poisoned below
    blocks[:, :, :, 0] = True   # every row keeps a block (a row with none is another test's case)
    docs = _documents(rng, B, S)
    bm = cupyflash.block_mask(lambda b, h, i, j: blocks[b, 0, i // 128, j // 128] & (docs[b, i] == docs[b, j])
                              | (j < 128), B, H, S, S, block=(128, 128))
    assert (bm.kinds == bm.PARTIAL).any() and (bm.kinds == bm.FULL).any()
    bits = (_config.MASK_CAUSAL if causal else _config.MASK_NONE) | _config.VARIANT_USER_MASK
    ks = _config.kernel_set(dtype, D, causal, 90, variant=bits).with_block_list(bm.block, S, S, 2, 90)
    assert ks.variant & _config.VARIANT_BLOCKS, "the forward walks the block list here"
    q, k, v, dout = (rng.standard_normal((B, S, H, D)).astype(dtype) for _ in range(4))
    kw = dict(mask_mod="(kv_idx < 128) || doc[b][q_idx] == doc[b][kv_idx]", aux={"doc": docs}, causal=causal)
    dense = bm.to_dense() & reference._user_terms(np, {k_: v_ for k_, v_ in kw.items() if k_ != "causal"},
                                                  (B, H, S, S), np.float64)[1]
    gk, gv = to_gpu(k), to_gpu(v)
    gk[:, 256:384] = np.nan
    gv[:, 256:384] = np.nan
    gq = to_gpu(q)
    o, lse = cupyflash.flash_attention(gq, gk, gv, return_lse=True, block_mask=bm, **_gpu_kw(kw))
    ref, naive = (reference.attention(q, k, v, upcast=u, mask=dense, causal=causal) for u in (True, False))
    assert_within(f"out [blocks causal={causal}]", o, ref[0], naive[0], dtype)
    assert_within(f"lse [blocks causal={causal}]", lse, ref[1], naive[1], dtype)
    grads = cupyflash.flash_attention_backward(to_gpu(dout), gq, gk, gv, o, lse, block_mask=bm, **_gpu_kw(kw))
    ref_g, naive_g = (reference.attention_backward(dout, q, k, v, upcast=u, mask=dense, causal=causal)
                      for u in (True, False))
    for name, g, w, n in zip(("dq", "dk", "dv"), grads, ref_g, naive_g):
        assert_within(f"{name} [blocks causal={causal}]", g, w, n, dtype)



# ---- dropout on the GPU (Philox regenerated in the kernels: kernels_cu/dropout.cuh) ----

@pytest.mark.parametrize("dtype,D", [(BFLOAT16, 128), (FLOAT16, 64), (BFLOAT16, 96), (FLOAT32, 64)],
                         ids=["bf16-d128", "fp16-d64", "bf16-d96", "fp32-d64"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dropout_is_the_numpy_specs_mask_forward_and_backward(rng, dtype, D, causal):
    """The kernels regenerate the spec's Philox stream (cupyflash._dropout): out, lse, dq, dk, dv
    against the float64 reference with the same mask, grouped-query heads, odd lengths."""
    kw = dict(dropout_p=0.17, seed=2 ** 40 + 12345, causal=causal)
    check_variant(rng, dtype, "dropout", 2, 257, 300, 4, 2, D, kw=kw)


def test_dropout_is_reproducible_per_seed_and_differs_across_seeds(rng):
    q, k, v = (to_gpu(rng.standard_normal((1, 300, 4, 128)).astype(BFLOAT16)) for _ in range(3))
    a, b, c = (to_host64(cupyflash.flash_attention(q, k, v, dropout_p=0.3, seed=s)) for s in (5, 5, 6))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
