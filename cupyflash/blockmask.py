"""Block-sparse attention masks (FlashAttention's block-sparse variant, FlexAttention's BlockMask).

A block mask divides the (seqlen_q, seqlen_k) score matrix of each (batch, head) into blocks of
``block = (rows, cols)`` and lists, per query block, the key blocks to visit: *full* blocks, where
every key is kept (no element mask is evaluated), and *partial* ones, where the element mask (the
``mask_mod`` the block mask was made from) decides key by key. Blocks in neither list are skipped,
so attention costs time in proportion to the blocks kept. The causal mask, windows and the other
variants still apply inside the visited blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _checks, _expr
from .reference import _host

DEFAULT_BLOCK = (128, 128)


@dataclass(frozen=True, eq=False)
class BlockMask:
    """Which key blocks each query block visits, for (batch, heads, seqlen_q, seqlen_k).

    ``kinds``: int8 (batch or 1, heads or 1, query blocks, key blocks), SKIP, PARTIAL or FULL per
    block (size-1 leading axes: the same for every batch row or head); ``mask_mod``, ``aux``: the
    element mask of the partial blocks (None when every kept block is full). ``indices(kind)``
    gives the per-query-block lists the kernels walk.
    """
    shape: tuple          # (batch, heads, seqlen_q, seqlen_k)
    block: tuple          # (rows, cols)
    kinds: np.ndarray
    mask_mod: object = None  # _expr.Expr or None
    aux: tuple = ()

    SKIP, PARTIAL, FULL = 0, 1, 2

    @property
    def density(self) -> float:
        """The fraction of blocks visited."""
        return float(np.count_nonzero(self.kinds) / max(self.kinds.size, 1))

    def indices(self, kind: int) -> tuple[np.ndarray, np.ndarray]:
        """(int32 (.., query blocks, key blocks) key-block lists, ascending then padded; int32 (..,
        query blocks) their lengths) of the blocks of ``kind`` (FULL or PARTIAL)."""
        listed = self.kinds == kind
        order = np.argsort(~listed, axis=-1, kind="stable")
        return order.astype(np.int32), listed.sum(axis=-1).astype(np.int32)

    def device_kinds(self):
        """``kinds`` on the current GPU (copied once per device and kept: a decode loop or a training
        step passes the same mask every call)."""
        return self._on_device("kinds", lambda: self.kinds)

    def device_aux(self) -> tuple:
        """``aux`` (the arrays the partial blocks' mask_mod reads) on the current GPU, kept likewise."""
        return tuple((n, self._on_device(f"aux:{n}", lambda a=a: a)) for n, a in self.aux)

    def _on_device(self, name: str, host):
        import cupy
        cache = self.__dict__.setdefault("_device", {})
        key = (name, cupy.cuda.runtime.getDevice())
        if key not in cache:
            cache[key] = cupy.ascontiguousarray(cupy.asarray(host()))
        return cache[key]

    def keep(self, b, h, i, j):
        """Bool: is key j kept for query i of (batch b, head h) (broadcast index arrays): its block is
        full, or partial and the element mask keeps it."""
        br, bc = self.block
        k = self.kinds[b % self.kinds.shape[0], h % self.kinds.shape[1], i // br, j // bc]
        if self.mask_mod is None:
            return k > self.SKIP
        env = {"b": b, "h": h, "q_idx": i, "kv_idx": j, **dict(self.aux)}
        return (k == self.FULL) | ((k == self.PARTIAL) & (self.mask_mod.evaluate(env)[0] != 0))

    def to_dense(self) -> np.ndarray:
        """The element mask this block mask means, bool (batch or 1, heads or 1, seqlen_q, seqlen_k)."""
        Bm, Hm = self.kinds.shape[:2]
        Sq, Sk = self.shape[2:]
        return np.broadcast_to(self.keep(np.arange(Bm).reshape(-1, 1, 1, 1), np.arange(Hm).reshape(1, -1, 1, 1),
                                         np.arange(Sq).reshape(-1, 1), np.arange(Sk).reshape(1, -1)),
                               (Bm, Hm, Sq, Sk))


def block_mask(mask, batch: int, heads: int, seqlen_q: int, seqlen_k: int, *, block: tuple = DEFAULT_BLOCK,
               aux: dict | None = None) -> BlockMask:
    """A BlockMask for attention of these sizes.

    Parameters
    ----------
    mask : str, callable or bool array
        A ``mask_mod`` expression (cupyflash._expr's C++ subset, reading ``aux``): each block is
        evaluated on the host and kept full (all true), partial (some) or skipped (none); the
        expression then masks the partial blocks' elements. Or a Python callable
        ``mask(b, h, q_idx, kv_idx)`` taking broadcast NumPy index arrays of one block and returning
        bools, classified the same way (its partial blocks need the same rule as a ``mask_mod`` of
        the call, or the element mask the call's ``mask``: a callable cannot run in the kernels).
        Or a bool array of blocks, (batch or 1, heads or 1, query blocks, key blocks): every
        True block kept whole.
        An expression or callable that reads neither ``b`` nor ``h`` is evaluated once for all.
    batch, heads, seqlen_q, seqlen_k : int
        The attention's sizes (heads: query heads).
    block : (int, int)
        Query rows and keys per block, each a positive multiple of 16.
    aux : dict, optional
        The arrays ``mask`` reads, as for flash_attention's ``mask_mod``.
    """
    sizes = tuple(_checks._check_int(n, x) for n, x in (("batch", batch), ("heads", heads), ("seqlen_q", seqlen_q),
                                                         ("seqlen_k", seqlen_k)))
    if any(s < 0 for s in sizes):
        raise ValueError(f"batch, heads, seqlen_q and seqlen_k must be >= 0, got {sizes}")
    if not (isinstance(block, (tuple, list)) and len(block) == 2):
        raise TypeError(f"block must be a pair (rows, cols) of ints, got {block!r}")
    block = tuple(_checks._check_int(f"block[{n}]", b) for n, b in enumerate(block))
    if any(b <= 0 or b % 16 for b in block):
        raise ValueError(f"block sizes must be positive multiples of 16, got {block}")
    B, H, Sq, Sk = sizes
    nq, nk = -(-Sq // block[0]), -(-Sk // block[1])
    if isinstance(mask, str):
        aux_arrays = _checks._check_aux(aux, "cpu")
        expr = _expr.parse("mask_mod", mask)
        unknown = sorted(expr.names - set(_expr.INDEX_NAMES) - {n for n, _ in aux_arrays})
        if unknown:
            raise ValueError(f"mask reads {', '.join(map(repr, unknown))}, which is neither an index nor an aux array")
        env = dict(aux_arrays)
        fn = lambda b, h, i, j: expr.evaluate({"b": b, "h": h, "q_idx": i, "kv_idx": j, **env})[0]  # noqa: E731
        kinds = _classify(fn, expr.names, B, H, Sq, Sk, block)
        return BlockMask(sizes, block, kinds, expr if (kinds == BlockMask.PARTIAL).any() else None, aux_arrays)
    if callable(mask):
        return BlockMask(sizes, block, _classify(mask, {"b", "h"}, B, H, Sq, Sk, block))
    blocks = _host(_checks.as_array(mask, "mask"))
    if blocks.dtype != np.bool_ or blocks.ndim != 4 or blocks.shape[2:] != (nq, nk) or blocks.shape[0] not in (1, B) \
            or blocks.shape[1] not in (1, H):
        raise ValueError(f"a block mask array must be bool (batch or 1, heads or 1, {nq}, {nk}) (query blocks, key "
                         f"blocks of {block}), got {blocks.dtype} {tuple(blocks.shape)}")
    return BlockMask(sizes, block, np.where(blocks, BlockMask.FULL, BlockMask.SKIP).astype(np.int8))


def _classify(fn, names, B, H, Sq, Sk, block) -> np.ndarray:
    """Each block's kind (SKIP: no key kept, PARTIAL: some, FULL: all), a block row at a time on the host."""
    br, bc = block
    Bm, Hm = (B if "b" in names else 1), (H if "h" in names else 1)
    nq, nk = -(-Sq // br), -(-Sk // bc)
    kinds = np.zeros((Bm, Hm, nq, nk), np.int8)
    b = np.arange(Bm).reshape(-1, 1, 1, 1)
    h = np.arange(Hm).reshape(1, -1, 1, 1)
    j = np.arange(Sk).reshape(1, -1)
    for qb in range(nq):
        i = np.arange(qb * br, min(Sq, (qb + 1) * br)).reshape(-1, 1)
        keep = np.broadcast_to(np.asarray(fn(b, h, i, j)) != 0, (Bm, Hm, i.shape[0], Sk))
        # keys past seqlen_k do not exist: neutral for "all kept" and for "some kept"
        kinds[:, :, qb] = np.where(_per_block(keep, nk, bc, True).all(axis=(2, 4)), BlockMask.FULL,
                                   np.where(_per_block(keep, nk, bc, False).any(axis=(2, 4)), BlockMask.PARTIAL,
                                            BlockMask.SKIP))
    return kinds


def _per_block(keep, nk: int, bc: int, fill: bool):
    """keep (.., rows, seqlen_k) as (.., rows, key blocks, bc), the keys past seqlen_k set to ``fill``."""
    pad = nk * bc - keep.shape[-1]
    if pad:
        keep = np.concatenate([keep, np.full(keep.shape[:-1] + (pad,), fill)], axis=-1)
    return keep.reshape(*keep.shape[:-1], nk, bc)
