"""Ring attention (issue 20): a sequence sharded across N ranks, key/value shards travelling around
a ring, partial results merged by their lse. As specifications, with N ranks simulated in one
process (a loop as the transport, each hop a copy):

- the shards are zig-zag when causal (rank r holds chunks r and 2N - 1 - r of 2N) and contiguous
  otherwise, and unsharding inverts sharding;
- the ring's output, lse and gradients equal dense attention's within flash-attn's bound (float64
  reference), causal and not, with grouped-query heads, for 1, 2 and 4 ranks;
- on one GPU, N virtual ranks (device-to-device copies as the transport) equal the dense call.
"""
import numpy as np
import pytest

import cupyflash
from cupyflash import distributed as dist, reference
from cupyflash._dtypes import BFLOAT16, FLOAT32, FLOAT64

from test_numpy_backend import assert_within_naive_bound


def test_causal_shards_are_zig_zag_and_unsharding_inverts_sharding():
    x = np.arange(16).reshape(1, 16, 1, 1)
    shards = [dist.shard(x, 4, r, causal=True) for r in range(4)]
    assert [s.ravel().tolist() for s in shards] == [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]]
    assert np.array_equal(dist.unshard(shards, causal=True), x)
    flat = [dist.shard(x, 4, r, causal=False) for r in range(4)]
    assert flat[1].ravel().tolist() == [4, 5, 6, 7] and np.array_equal(dist.unshard(flat, causal=False), x)


def test_a_sequence_that_does_not_divide_is_refused():
    with pytest.raises(ValueError, match=r"the sequence length 10 must divide into 8 chunks \(2 x world_size 4\)"):
        dist.shard(np.zeros((1, 10, 1, 1)), 4, 0, causal=True)


def test_merging_partials_is_softmax_over_their_union(rng):
    q, k, v = (rng.standard_normal((1, 8, 2, 4)) for _ in range(3))
    o_a, l_a = reference.attention(q, k[:, :3], v[:, :3])
    o_b, l_b = reference.attention(q, k[:, 3:], v[:, 3:])
    o, l = dist.merge(o_a, l_a, o_b, l_b)
    want = reference.attention(q, k, v)
    assert np.allclose(o, want[0], atol=1e-14) and np.allclose(l, want[1], atol=1e-14)
    empty = np.full_like(l_a, -np.inf)  # a partial that saw no key changes nothing; two give 0, -inf
    assert np.allclose(dist.merge(o_a, l_a, np.zeros_like(o_a), empty)[0], o_a, atol=0)
    o0, l0 = dist.merge(np.zeros_like(o_a), empty, np.zeros_like(o_a), empty)
    assert np.all(o0 == 0) and np.all(np.isneginf(l0))


def ring_vs_dense(rng, dtype, world, causal, xp=np, S=96, H=4, H_kv=2, D=16):
    q, dout = (rng.standard_normal((2, S, H, D)).astype(dtype) for _ in range(2))
    k, v = (rng.standard_normal((2, S, H_kv, D)).astype(dtype) for _ in range(2))
    shards = lambda x: [dist.shard(xp.asarray(x), world, r, causal=causal) for r in range(world)]  # noqa: E731
    outs, lses, dqs, dks, dvs = dist.simulate(shards(q), shards(k), shards(v), causal=causal, dout_shards=shards(dout))
    host = lambda x: x.get() if hasattr(x, "get") and not isinstance(x, np.ndarray) else x  # noqa: E731
    got = [host(dist.unshard(outs, causal=causal)), host(dist.unshard(lses, causal=causal, axis=2))]
    got += [host(dist.unshard(g, causal=causal)) for g in (dqs, dks, dvs)]
    return (q, k, v, dout), got


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("dtype", [FLOAT64, BFLOAT16], ids=["float64", "bfloat16"])
def test_the_ring_is_dense_attention(rng, dtype, world, causal):
    (q, k, v, dout), got = ring_vs_dense(rng, dtype, world, causal)
    ref = reference.attention(q, k, v, causal=causal)
    naive = reference.attention(q, k, v, causal=causal, upcast=False)
    ref_g = reference.attention_backward(dout, q, k, v, causal=causal)
    naive_g = reference.attention_backward(dout, q, k, v, causal=causal, upcast=False)
    stat = FLOAT64 if dtype == FLOAT64 else FLOAT32
    for name, g, want, nv, stored in zip(("out", "lse", "dq", "dk", "dv"), got, (*ref, *ref_g), (*naive, *naive_g),
                                         (dtype, stat, dtype, dtype, dtype)):
        assert_within_naive_bound(f"{name} [world {world}]", g, want, nv, stored)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_virtual_ranks_on_one_gpu_are_the_dense_call(rng, causal):
    cp = pytest.importorskip("cupy")
    (q, k, v, dout), got = ring_vs_dense(rng, BFLOAT16, 4, causal, xp=cp, S=1024, H=8, H_kv=2, D=64)
    ref = reference.attention(q, k, v, causal=causal)
    naive = reference.attention(q, k, v, causal=causal, upcast=False)
    ref_g = reference.attention_backward(dout, q, k, v, causal=causal)
    naive_g = reference.attention_backward(dout, q, k, v, causal=causal, upcast=False)
    for name, g, want, nv, stored in zip(("out", "lse", "dq", "dk", "dv"), got, (*ref, *ref_g), (*naive, *naive_g),
                                         (BFLOAT16, FLOAT32, BFLOAT16, BFLOAT16, BFLOAT16)):
        assert_within_naive_bound(f"{name} [gpu ring]", g, want, nv, stored)
