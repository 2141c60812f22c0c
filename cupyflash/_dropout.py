"""Dropout on the attention probabilities, regenerated rather than stored: which (b, h, q_idx,
kv_idx) entries are dropped is a pure function of the seed (Philox4x32-10, Random123's
counter-based generator), so the backward pass recomputes the forward's mask and nothing of
size S x S is kept.

The stream, the spec the kernels follow: key = (seed mod 2^32, seed div 2^32 mod 2^32), counter =
(q_idx, kv_idx div 4, h, b); the counter's output word kv_idx mod 4, w, keeps the entry when
w >= floor(p 2^32). Kept probabilities are scaled by 1 / (1 - p) (FlashAttention-2's convention);
lse is that of the undropped softmax.
"""
from __future__ import annotations

import numpy as np

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)  # Philox4x32 multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85                        # key schedule (Weyl) increments
_ROUNDS = 10
_MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32(counter: tuple, key: tuple) -> tuple:
    """Philox4x32-10 of four uint32 counter words (broadcast arrays) under a two-word key: four
    uint32 output arrays (Random123's philox4x32 with 10 rounds)."""
    c0, c1, c2, c3 = (np.asarray(c, np.uint64) & _MASK32 for c in counter)
    k0, k1 = (int(k) & 0xFFFFFFFF for k in key)
    for _ in range(_ROUNDS):
        p0, p1 = _M0 * c0, _M1 * c2  # 32 x 32 -> 64-bit products: hi and lo halves
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ np.uint64(k0), p1 & _MASK32,
                          (p0 >> np.uint64(32)) ^ c3 ^ np.uint64(k1), p0 & _MASK32)
        k0, k1 = (k0 + _W0) & 0xFFFFFFFF, (k1 + _W1) & 0xFFFFFFFF
    return tuple(c.astype(np.uint32) for c in (c0, c1, c2, c3))


def threshold(p: float) -> int:
    """The uint32 below which an entry is dropped."""
    return int(np.floor(p * 2.0 ** 32))


def keep(seed: int, p: float, b, h, i, j):
    """Bool (broadcast of the index arrays b, h, i, j): is entry (b, h, q_idx i, kv_idx j) kept?"""
    b, h, i, j = (np.asarray(x, np.int64) for x in (b, h, i, j))
    words = philox4x32((i, j >> 2, h, b), (seed, seed >> 32))
    lane = j & 3
    word = np.choose(np.broadcast_to(lane, np.broadcast_shapes(*(w.shape for w in words), lane.shape)), words)
    return word >= np.uint32(threshold(p)) if p > 0 else np.ones(word.shape, bool)


def scale(seed: int, p: float, b, h, i, j):
    """The factor on each probability: 1 / (1 - p) where kept, 0 where dropped."""
    return np.where(keep(seed, p, b, h, i, j), 1.0 / (1.0 - p), 0.0)
