"""Ring attention (context parallelism): a sequence sharded across ranks, each keeping its queries
while the key/value shards travel around a ring; the partial results merge exactly through their
log-sum-exp (issue 20).

Each rank's shard of a causal sequence is zig-zag: with the sequence cut into 2N chunks, rank r
holds chunks r and 2N - 1 - r, so every rank has as much causal work as every other. A rank's
queries meet a key/value shard chunk by chunk: a key chunk after the query chunk is skipped, the
same chunk is causal, an earlier one is attended in full. Non-causal shards are contiguous.

The algorithm is written once, per step (``forward_step``, ``backward_step``), over whatever the
arrays are (numpy: the NumPy backend; cupy: the kernels); a transport moves the blocks between
steps. ``simulate`` runs N ranks in one process with a loop as the transport (the CPU spec, and
N virtual ranks on one GPU with device-to-device copies); an NCCL transport over
``cupy.cuda.nccl`` is the part that needs a machine with several GPUs.

On several GPUs (one process per GPU) ``ring_flash_attention`` and its backward run the same steps
with an NCCL ring (``RingAttention``): each step posts the next key/value block's send to the
right neighbour and receive from the left one on a communication stream, computes with the block
in hand on the compute stream meanwhile, and waits for the receive only when it needs the block.

Backward: with the merged forward's out and lse, the gradients of each (query shard, key/value
block) pair are flash attention's backward of that pair alone (its D = rowsum(dO * out) and P =
exp(S - lse) are the global ones), so dQ accumulates locally and each block's dK, dV accumulate
in buffers that travel with the block and arrive home after N steps.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import api
from .reference import _array_module as _xp  # numpy or cupy, by the array


def chunk_ids(rank: int, world_size: int, causal: bool) -> tuple[int, ...]:
    """The global chunks a rank holds, in order: (r, 2N - 1 - r) of 2N chunks when causal (zig-zag),
    else (r,) of N."""
    return (rank, 2 * world_size - 1 - rank) if causal else (rank,)


def shard(x, world_size: int, rank: int, *, causal: bool, axis: int = 1):
    """Rank ``rank``'s shard of a whole sequence ``x`` along ``axis`` (the seqlen axis of (B, S, H, D)):
    zig-zag chunks when causal, a contiguous slice otherwise. The length must divide evenly."""
    xp = _xp(x)
    n = 2 * world_size if causal else world_size
    if x.shape[axis] % n:
        raise ValueError(f"the sequence length {x.shape[axis]} must divide into {n} chunks "
                         f"({'2 x ' if causal else ''}world_size {world_size})")
    chunks = xp.split(x, n, axis=axis)
    return xp.concatenate([chunks[c] for c in chunk_ids(rank, world_size, causal)], axis=axis)


def unshard(shards, *, causal: bool, axis: int = 1):
    """The whole sequence from every rank's shard (the inverse of :func:`shard`)."""
    xp = _xp(shards[0])
    world = len(shards)
    chunks = [None] * (2 * world if causal else world)
    for rank, s in enumerate(shards):
        for c, part in zip(chunk_ids(rank, world, causal), xp.split(s, len(chunk_ids(rank, world, causal)), axis=axis)):
            chunks[c] = part
    return xp.concatenate(chunks, axis=axis)


def merge(o_a, lse_a, o_b, lse_b):
    """Two partial softmaxes over disjoint keys, merged exactly: lse = log(e^lse_a + e^lse_b), out =
    e^(lse_a - lse) o_a + e^(lse_b - lse) o_b. o: (B, S, H, D), lse: (B, H, S); -inf: a partial that
    saw no key (its weight 0; both -inf: out 0, lse -inf). Computed and returned in lse's precision
    (fp32 for 16-bit inputs: a ring merges N times, and rounds once, at the end)."""
    xp = _xp(o_a)
    top = xp.maximum(lse_a, lse_b)
    shift = xp.where(top == -xp.inf, 0, top)
    wa, wb = xp.exp(lse_a - shift), xp.exp(lse_b - shift)
    total = wa + wb
    lse = xp.where(total == 0, -xp.inf, shift + xp.log(xp.where(total == 0, 1, total)))
    safe = xp.where(total == 0, 1, total)
    wa, wb = ((w / safe).transpose(0, 2, 1)[..., None] for w in (wa, wb))  # (B, S, H, 1)
    return wa * o_a.astype(lse.dtype) + wb * o_b.astype(lse.dtype), lse


@dataclass
class Block:
    """A key/value shard on its way around the ring: whose it is, its arrays, and (backward) the dK,
    dV accumulated for it so far."""
    owner: int
    k: object
    v: object
    dk: object = None
    dv: object = None


def _pairs(q_len: int, rank: int, owner: int, world: int, causal: bool):
    """(query slice, key slice, causal) of each chunk pair of this rank's queries and the owner's keys
    that some query sees, in the shards' local coordinates."""
    q_ids, k_ids = chunk_ids(rank, world, causal), chunk_ids(owner, world, causal)
    c = q_len // len(q_ids)
    for a, qc in enumerate(q_ids):
        for b, kc in enumerate(k_ids):
            if causal and kc > qc:
                continue  # every key of the chunk comes after every query of this one
            yield slice(a * c, (a + 1) * c), slice(b * c, (b + 1) * c), causal and kc == qc


def forward_step(q, block: Block, rank: int, world: int, out, lse, *, causal: bool, softmax_scale=None):
    """Rank ``rank``'s queries against one key/value block, merged into the running (out, lse) (None
    before the first step: then allocated, out in lse's precision); returns the new (out, lse)."""
    xp = _xp(q)
    if out is None:
        acc = np.float64 if q.dtype == np.float64 else np.float32
        out = xp.zeros(q.shape, acc)
        lse = xp.full((q.shape[0], q.shape[2], q.shape[1]), -xp.inf, acc)
    for qs, ks, diag in _pairs(q.shape[1], rank, block.owner, world, causal):
        o_p, l_p = api.flash_attention(xp.ascontiguousarray(q[:, qs]), block.k[:, ks], block.v[:, ks], causal=diag,
                                       softmax_scale=softmax_scale, return_lse=True)
        out[:, qs], lse[..., qs] = merge(out[:, qs], lse[..., qs], o_p, l_p)
    return out, lse


def backward_step(dout, q, out, lse, block: Block, rank: int, world: int, dq, *, causal: bool, softmax_scale=None):
    """The gradients of rank ``rank``'s queries against one block: dq accumulated in place (fp32), the
    block's dk, dv accumulated into its travelling buffers (fp32, allocated at its first step)."""
    xp = _xp(q)
    acc = dq.dtype
    if block.dk is None:
        block.dk, block.dv = xp.zeros(block.k.shape, acc), xp.zeros(block.v.shape, acc)
    for qs, ks, diag in _pairs(q.shape[1], rank, block.owner, world, causal):
        c = xp.ascontiguousarray
        dq_p, dk_p, dv_p = api.flash_attention_backward(
            c(dout[:, qs]), c(q[:, qs]), block.k[:, ks], block.v[:, ks], c(out[:, qs]), c(lse[..., qs]),
            causal=diag, softmax_scale=softmax_scale)
        dq[:, qs] += dq_p
        block.dk[:, ks] += dk_p
        block.dv[:, ks] += dv_p


def _send(block: Block) -> Block:
    """The simulated transport: the block as its receiver gets it, a copy of every array."""
    xp = _xp(block.k)
    copy = lambda x: None if x is None else xp.array(x, copy=True)  # noqa: E731
    return Block(block.owner, copy(block.k), copy(block.v), copy(block.dk), copy(block.dv))


def simulate(q_shards, k_shards, v_shards, *, causal: bool = False, softmax_scale=None, dout_shards=None):
    """N ranks in one process with a loop as the transport: each step, every rank attends with the
    block it holds, then receives its left neighbour's (a copy: device-to-device on a GPU), so at
    step t rank r holds rank (r - t) mod N's block. Returns (outs, lses) per rank; with
    ``dout_shards`` also (dqs, dks, dvs), each block's dk, dv arriving home after N steps."""
    world = len(q_shards)
    dtype = q_shards[0].dtype
    held = [Block(r, k, v) for r, (k, v) in enumerate(zip(k_shards, v_shards))]
    outs, lses = [None] * world, [None] * world
    for _ in range(world):
        for r in range(world):
            outs[r], lses[r] = forward_step(q_shards[r], held[r], r, world, outs[r], lses[r], causal=causal,
                                            softmax_scale=softmax_scale)
        held = [_send(held[(r - 1) % world]) for r in range(world)]
    outs = [o.astype(dtype) for o in outs]
    if dout_shards is None:
        return outs, lses
    dqs = [_xp(q).zeros(q.shape, lses[0].dtype) for q in q_shards]
    for _ in range(world):
        for r in range(world):
            backward_step(dout_shards[r], q_shards[r], outs[r], lses[r], held[r], r, world, dqs[r], causal=causal,
                          softmax_scale=softmax_scale)
        held = [_send(held[(r - 1) % world]) for r in range(world)]
    assert all(b.owner == r for r, b in enumerate(held))  # every block is home again
    return (outs, lses, [dq.astype(dtype) for dq in dqs], [b.dk.astype(dtype) for b in held],
            [b.dv.astype(dtype) for b in held])


# ---- one rank of a ring on several GPUs ----

class NcclRing:
    """The ring's transport over a ``cupy.cuda.nccl.NcclCommunicator`` (one process per GPU): a shift
    sends arrays to rank + 1 and receives their like from rank - 1 on its own stream, as raw bytes
    (any dtype; send and receive need no reduction), while the caller's stream goes on computing.

    How each process gets the communicator (the uid handshake): rank 0 calls
    ``cupy.cuda.nccl.get_unique_id()`` and hands the id to every other process (a pipe, a file, the
    launcher's store); each process then selects its GPU and calls
    ``cupy.cuda.nccl.NcclCommunicator(world_size, uid, rank)``.
    """

    def __init__(self, comm, rank: int, world_size: int, stream=None):
        import cupy
        self.comm, self.rank, self.world = comm, rank, world_size
        self.stream = stream if stream is not None else cupy.cuda.Stream(non_blocking=True)

    def start(self, arrays: tuple):
        """Post the shift of ``arrays`` (contiguous, written by work on the current stream); returns a
        handle for :meth:`finish`. Holds the sent arrays until then."""
        import cupy
        from cupy.cuda import nccl
        # the receive buffers come from the current stream's pool, so their memory's earlier users
        # there are done before the communication stream writes it (waiting on `ready`)
        received = tuple(cupy.empty_like(a) for a in arrays)
        ready = cupy.cuda.get_current_stream().record()  # what the current stream wrote is complete
        self.stream.wait_event(ready)
        right, left = (self.rank + 1) % self.world, (self.rank - 1) % self.world
        with self.stream:
            nccl.groupStart()  # every send and receive of the shift as one group: no ordering deadlock
            for a, r in zip(arrays, received):
                self.comm.send(a.data.ptr, a.nbytes, nccl.NCCL_UINT8, right, self.stream.ptr)
                self.comm.recv(r.data.ptr, r.nbytes, nccl.NCCL_UINT8, left, self.stream.ptr)
            nccl.groupEnd()
        return received, self.stream.record(), arrays

    def finish(self, handle) -> tuple:
        """The arrays the left neighbour sent, once the current stream has waited for them."""
        import cupy
        received, done, _sent = handle
        cupy.cuda.get_current_stream().wait_event(done)  # the receive (and our sends) are complete
        return received


class RingAttention:
    """One rank of ring attention over NCCL: ``comm`` (a ``cupy.cuda.nccl.NcclCommunicator`` the
    caller created; see :class:`NcclRing` for the uid handshake), this process's ``rank`` and the
    ``world_size``. ``forward`` and ``backward`` take this rank's shards (:func:`shard`: zig-zag
    when causal), ``(B, S / world_size, H, D)`` and ``(B, S / world_size, H_kv, D)``: only the H_kv
    heads travel. ``ring``: another transport with NcclRing's ``start`` / ``finish`` (tests)."""

    def __init__(self, comm, rank: int, world_size: int, *, stream=None, ring=None):
        from . import _checks
        self.rank, self.world = _checks._check_int("rank", rank), _checks._check_int("world_size", world_size)
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank must be in [0, world_size) = [0, {self.world}), got {self.rank}")
        self.ring = ring if ring is not None else NcclRing(comm, self.rank, self.world, stream)

    def forward(self, q, k, v, *, causal: bool = False, softmax_scale=None):
        """(out, lse) of this rank's queries over the whole sequence: the blocks go once around the
        ring, each merged by its lse; the next block's shift overlaps the current block's attention."""
        _check_shards(q, k, v, self.world, causal)
        block, out, lse = Block(self.rank, _contiguous(k), _contiguous(v)), None, None
        for step in range(self.world):
            pending = self.ring.start((block.k, block.v)) if step < self.world - 1 else None
            out, lse = forward_step(q, block, self.rank, self.world, out, lse, causal=causal,
                                    softmax_scale=softmax_scale)
            if pending is not None:
                block = Block((block.owner - 1) % self.world, *self.ring.finish(pending))
        return out.astype(q.dtype), lse

    def backward(self, dout, q, k, v, out, lse, *, causal: bool = False, softmax_scale=None):
        """(dq, dk, dv) of this rank's shards: dq accumulates here; each block's dk, dv accumulate in
        fp32 buffers that travel with it and are home after world_size shifts."""
        _check_shards(q, k, v, self.world, causal)
        xp = _xp(q)
        dq = xp.zeros(q.shape, lse.dtype)
        block = Block(self.rank, _contiguous(k), _contiguous(v))
        for step in range(self.world):
            pending = self.ring.start((block.k, block.v)) if step < self.world - 1 else None
            backward_step(dout, q, out, lse, block, self.rank, self.world, dq, causal=causal,
                          softmax_scale=softmax_scale)
            dk, dv = block.dk, block.dv
            if self.world > 1:  # the gradients follow their block (after the last step: home)
                dk, dv = self.ring.finish(self.ring.start((dk, dv)))
            if pending is not None:
                block = Block((block.owner - 1) % self.world, *self.ring.finish(pending), dk, dv)
        return dq.astype(q.dtype), dk.astype(q.dtype), dv.astype(q.dtype)


def ring_flash_attention(q, k, v, *, comm, causal: bool = False, softmax_scale=None, window_size=(-1, -1),
                         return_lse: bool = False):
    """Flash attention of a sequence sharded across the ranks of ``comm`` (a :class:`RingAttention`):
    this rank's out (and lse with ``return_lse``) for its query shard. ``window_size`` other than
    (-1, -1) is a ValueError for now (the ring skips no block for a window yet)."""
    _check_ring(comm, window_size)
    out, lse = comm.forward(q, k, v, causal=causal, softmax_scale=softmax_scale)
    return (out, lse) if return_lse else out


def ring_flash_attention_backward(dout, q, k, v, out, lse, *, comm, causal: bool = False, softmax_scale=None,
                                  window_size=(-1, -1)):
    """(dq, dk, dv) of this rank's shards for :func:`ring_flash_attention`'s out and lse."""
    _check_ring(comm, window_size)
    return comm.backward(dout, q, k, v, out, lse, causal=causal, softmax_scale=softmax_scale)


def _check_ring(comm, window_size) -> None:
    if not isinstance(comm, RingAttention):
        raise TypeError(f"comm must be a cupyflash.distributed.RingAttention, got {type(comm).__name__}")
    if tuple(window_size) != (-1, -1):
        raise ValueError(f"window_size={tuple(window_size)}: ring attention takes no window yet, only (-1, -1)")


def _check_shards(q, k, v, world: int, causal: bool) -> None:
    """This rank's shards: (B, S_local, H, D) and (B, S_local, H_kv, D), one S_local, in 2 chunks when causal."""
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or q.shape[1] != k.shape[1] or q.shape[0] != k.shape[0]:
        raise ValueError(f"q (B, S_local, H, D) and k, v (B, S_local, H_kv, D) must be this rank's shards of one "
                         f"sequence, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if causal and q.shape[1] % 2:
        raise ValueError(f"a causal shard is two zig-zag chunks (shard(..., causal=True)): its length must be even, "
                         f"got {q.shape[1]}")


def _contiguous(x):
    return _xp(x).ascontiguousarray(x)
