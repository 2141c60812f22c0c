"""Ring attention (issue 20): a sequence sharded across N ranks, key/value shards travelling around
a ring, partial results merged by their lse. As specifications, with N ranks simulated in one
process (a loop as the transport, each hop a copy):

- the shards are zig-zag when causal (rank r holds chunks r and 2N - 1 - r of 2N) and contiguous
  otherwise, and unsharding inverts sharding;
- the ring's output, lse and gradients equal dense attention's within flash-attn's bound (float64
  reference), causal and not, with grouped-query heads, for 1, 2 and 4 ranks;
- on one GPU, N virtual ranks (device-to-device copies as the transport) equal the dense call;
- one rank's driver (RingAttention: the next block's shift posted before the current block's
  attention, the gradients following their block) in N threads with queues as the transport equals
  the dense call on the CPU, and with NCCL, one process per GPU, on several GPUs (multigpu);
- a bad communicator, window, shard or rank is a TypeError or ValueError naming it.
"""
import collections
import multiprocessing
import queue
import threading

import numpy as np
import pytest

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


def _inputs(rng, dtype, S=96, H=4, H_kv=2, D=16):
    q, dout = (rng.standard_normal((2, S, H, D)).astype(dtype) for _ in range(2))
    k, v = (rng.standard_normal((2, S, H_kv, D)).astype(dtype) for _ in range(2))
    return q, k, v, dout


def _host(x):
    return x.get() if hasattr(x, "get") and not isinstance(x, np.ndarray) else x


def _unsharded(per_rank, causal):
    """(out, lse, dq, dk, dv) of the whole sequence from every rank's (out, lse, dq, dk, dv)."""
    return [_host(dist.unshard(list(parts), causal=causal, axis=2 if n == 1 else 1))
            for n, parts in enumerate(zip(*per_rank))]


def ring_vs_dense(rng, dtype, world, causal, xp=np, S=96, H=4, H_kv=2, D=16):
    q, k, v, dout = _inputs(rng, dtype, S, H, H_kv, D)
    shards = lambda x: [dist.shard(xp.asarray(x), world, r, causal=causal) for r in range(world)]  # noqa: E731
    outs, lses, dqs, dks, dvs = dist.simulate(shards(q), shards(k), shards(v), causal=causal, dout_shards=shards(dout))
    return (q, k, v, dout), _unsharded(zip(outs, lses, dqs, dks, dvs), causal)


def check_against_dense(inputs, got, causal, dtype, tag):
    """out, lse, dq, dk, dv of the whole sequence against float64 attention, within flash-attn's bound."""
    q, k, v, dout = inputs
    ref = reference.attention(q, k, v, causal=causal)
    naive = reference.attention(q, k, v, causal=causal, upcast=False)
    ref_g = reference.attention_backward(dout, q, k, v, causal=causal)
    naive_g = reference.attention_backward(dout, q, k, v, causal=causal, upcast=False)
    stat = FLOAT64 if dtype == FLOAT64 else FLOAT32
    for name, g, want, nv, stored in zip(("out", "lse", "dq", "dk", "dv"), got, (*ref, *ref_g), (*naive, *naive_g),
                                         (dtype, stat, dtype, dtype, dtype)):
        assert_within_naive_bound(f"{name} [{tag}]", g, want, nv, stored)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("dtype", [FLOAT64, BFLOAT16], ids=["float64", "bfloat16"])
def test_the_ring_is_dense_attention(rng, dtype, world, causal):
    inputs, got = ring_vs_dense(rng, dtype, world, causal)
    check_against_dense(inputs, got, causal, dtype, f"world {world}")


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_virtual_ranks_on_one_gpu_are_the_dense_call(rng, causal):
    cp = pytest.importorskip("cupy")
    inputs, got = ring_vs_dense(rng, BFLOAT16, 4, causal, xp=cp, S=1024, H=8, H_kv=2, D=64)
    check_against_dense(inputs, got, causal, BFLOAT16, "gpu ring")


class ThreadRing:
    """NcclRing's start / finish between threads: the i-th shift a rank starts lands in its right
    neighbour's i-th inbox, as copies (each rank shifts in the same order, as NCCL ranks must)."""

    def __init__(self, inboxes, rank: int, world: int):
        self.inboxes, self.rank, self.world, self.count = inboxes, rank, world, 0

    def start(self, arrays):
        tag, self.count = self.count, self.count + 1
        self.inboxes[(self.rank + 1) % self.world][tag].put(tuple(np.array(a, copy=True) for a in arrays))
        return tag

    def finish(self, tag):
        return self.inboxes[self.rank][tag].get(timeout=60)


def _rank_in_thread(r, world, shards, causal, results, inboxes):
    ring = dist.RingAttention(None, r, world, ring=ThreadRing(inboxes, r, world))
    q, k, v, dout = (s[r] for s in shards)
    out, lse = dist.ring_flash_attention(q, k, v, comm=ring, causal=causal, return_lse=True)
    results[r] = (out, lse, *dist.ring_flash_attention_backward(dout, q, k, v, out, lse, comm=ring, causal=causal))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_each_rank_alone_with_a_threaded_ring_is_dense_attention(rng, world, causal):
    """One thread per rank, each running only its own RingAttention (what one process per GPU runs),
    queues for NCCL."""
    inputs = _inputs(rng, FLOAT64)
    shards = [[dist.shard(x, world, r, causal=causal) for r in range(world)] for x in inputs]
    inboxes = [collections.defaultdict(queue.Queue) for _ in range(world)]
    results = [None] * world
    threads = [threading.Thread(target=_rank_in_thread, args=(r, world, shards, causal, results, inboxes))
               for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(r is not None for r in results), "a rank did not finish"
    check_against_dense(inputs, _unsharded(results, causal), causal, FLOAT64, f"{world} threads")


BAD_RING_CALLS = {
    "comm": (lambda ring, q: dist.ring_flash_attention(q, q, q, comm="nccl"), TypeError,
             r"comm must be a cupyflash.distributed.RingAttention, got str"),
    "window": (lambda ring, q: dist.ring_flash_attention(q, q, q, comm=ring, window_size=(8, 0)), ValueError,
               r"ring attention takes no window yet"),
    "odd-causal-shard": (lambda ring, q: dist.ring_flash_attention(q[:, :5], q[:, :5], q[:, :5], comm=ring, causal=True),
                         ValueError, r"a causal shard is two zig-zag chunks .* must be even, got 5"),
    "shapes": (lambda ring, q: dist.ring_flash_attention(q, q[:, :4], q[:, :4], comm=ring), ValueError,
               r"must be this rank's shards of one sequence"),
    "rank": (lambda ring, q: dist.RingAttention(None, 2, 2, ring=ring.ring), ValueError,
             r"rank must be in \[0, world_size\) = \[0, 2\), got 2"),
}


@pytest.mark.parametrize("bad", sorted(BAD_RING_CALLS))
def test_bad_ring_calls_name_the_argument_and_the_rule(rng, bad):
    call, error, pattern = BAD_RING_CALLS[bad]
    ring = dist.RingAttention(None, 0, 1, ring=ThreadRing([{}], 0, 1))
    with pytest.raises(error, match=pattern):
        call(ring, rng.standard_normal((1, 8, 2, 16)))


def _nccl_rank(rank, world, uid_queue, out_queue, causal, seed):
    """One process per GPU: its device, the communicator from rank 0's uid, its shards of the same
    inputs every rank makes from ``seed``, the ring's results to the parent (host arrays)."""
    import os
    os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast stays off on the lent machines
    import cupy
    from cupy.cuda import nccl
    cupy.cuda.Device(rank).use()
    uid = nccl.get_unique_id() if rank == 0 else None
    if rank == 0:
        for _ in range(world - 1):
            uid_queue.put(uid)
    else:
        uid = uid_queue.get(timeout=120)
    comm = nccl.NcclCommunicator(world, uid, rank)
    inputs = _inputs(np.random.default_rng(seed), BFLOAT16, S=512, H=8, H_kv=2, D=64)
    q, k, v, dout = (cupy.asarray(dist.shard(x, world, rank, causal=causal)) for x in inputs)
    ring = dist.RingAttention(comm, rank, world)
    out, lse = dist.ring_flash_attention(q, k, v, comm=ring, causal=causal, return_lse=True)
    grads = dist.ring_flash_attention_backward(dout, q, k, v, out, lse, comm=ring, causal=causal)
    out_queue.put((rank, [x.get() for x in (out, lse, *grads)]))


@pytest.mark.multigpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_one_process_per_gpu_over_nccl_is_dense_attention(causal):
    cp = pytest.importorskip("cupy")
    world = min(cp.cuda.runtime.getDeviceCount(), 4)
    ctx = multiprocessing.get_context("spawn")
    uid_queue, out_queue = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_nccl_rank, args=(r, world, uid_queue, out_queue, causal, 7)) for r in range(world)]
    for p in procs:
        p.start()
    results = [None] * world
    for _ in range(world):
        r, arrays = out_queue.get(timeout=300)
        results[r] = arrays
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0, f"rank process exited with {p.exitcode}"
    inputs = _inputs(np.random.default_rng(7), BFLOAT16, S=512, H=8, H_kv=2, D=64)
    check_against_dense(inputs, _unsharded(results, causal), causal, BFLOAT16, f"{world} GPUs over NCCL")
