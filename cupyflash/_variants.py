"""The attention variants, written once: which keys a query sees (causal, sliding window),
how a scaled score becomes a logit (softcap, ALiBi), and the sink logit in each row's
denominator; grouped-query attention is the head mapping h -> h // (H_q // H_kv).

For query i and key j, with o = seqlen_k - seqlen_q (bottom-right alignment, as flash-attn):

- visible: i + o - left <= j <= i + o + right (-1: unbounded on that side; causal: right = 0);
- logit: s = scale * q_i . k_j; s = softcap * tanh(s / softcap) when softcap > 0; then
  s -= slope_h * |i + o - j| when ALiBi slopes are given;
- softmax over the visible keys, whose denominator also counts exp(sinks[h]) when sinks are
  given: lse = log(sum_j exp(s_ij) + exp(sinks[h])), and the sink adds nothing to the output.

The NumPy backend (the executable spec of the kernels) uses this module; the float64
reference (reference.py) spells the same formulas out on the whole score matrix.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

UNBOUNDED = -1  # a window side without a limit
NO_WINDOW = (UNBOUNDED, UNBOUNDED)  # the API's default window_size (one object: the plan key tests it by identity)


@dataclass(frozen=True)
class Variants:
    """What a call asks for beyond dense attention; validated by _checks."""
    window: tuple = (UNBOUNDED, UNBOUNDED)  # (left, right); causal is folded in as right = 0
    softcap: float = 0.0
    alibi_slopes: object = None  # float array (H_q,) or (B, H_q)
    sinks: object = None         # float array (H_q,)

    @property
    def dense(self) -> bool:
        return (self.window == (UNBOUNDED, UNBOUNDED) and self.softcap == 0.0 and self.alibi_slopes is None
                and self.sinks is None)

    @staticmethod
    def of(causal: bool, window_size=(UNBOUNDED, UNBOUNDED), softcap: float = 0.0, alibi_slopes=None, sinks=None):
        left, right = window_size
        if causal:
            right = 0
        return Variants((left, right), float(softcap), alibi_slopes, sinks)

    # ---- which keys (tile bounds and the element mask) ----

    def key_range(self, i0: int, i1: int, seqlen_q: int, seqlen_k: int) -> tuple:
        """[first, end) of the keys that any query in [i0, i1) sees; the rest are skipped."""
        left, right = self.window
        o = seqlen_k - seqlen_q
        first = 0 if left == UNBOUNDED else max(0, i0 + o - left)
        end = seqlen_k if right == UNBOUNDED else min(seqlen_k, i1 - 1 + o + right + 1)
        return first, max(first, end)

    def query_range(self, j0: int, j1: int, seqlen_q: int, seqlen_k: int) -> tuple:
        """[first, end) of the queries that see any key in [j0, j1)."""
        left, right = self.window
        o = seqlen_k - seqlen_q
        first = 0 if right == UNBOUNDED else max(0, j0 - o - right)
        end = seqlen_q if left == UNBOUNDED else min(seqlen_q, j1 - 1 - o + left + 1)
        return min(first, seqlen_q), max(min(first, seqlen_q), end)

    def visible(self, i, j, seqlen_q: int, seqlen_k: int):
        """Boolean grid: key j visible to query i (i, j broadcastable index arrays)."""
        left, right = self.window
        d = j - (i + seqlen_k - seqlen_q)  # key offset from the query's diagonal
        ok = np.ones(np.broadcast_shapes(np.shape(i), np.shape(j)), bool)
        if left != UNBOUNDED:
            ok &= d >= -left
        if right != UNBOUNDED:
            ok &= d <= right
        return ok

    # ---- the score transform and its derivative ----

    def logits(self, S, i, j, seqlen_q: int, seqlen_k: int, slopes):
        """Scaled scores S (natural-log units) -> logits: softcap, then ALiBi (``slopes``
        broadcast against S's leading axes, None without ALiBi); masked keys are -inf."""
        if self.softcap > 0:
            S = self.softcap * np.tanh(S / self.softcap)
        if slopes is not None:
            S = S - slopes * np.abs(i + (seqlen_k - seqlen_q) - j)
        return np.where(self.visible(i, j, seqlen_q, seqlen_k), S, -np.inf)

    def softcap_grad(self, S):
        """d logit / d scaled score at the scaled scores S (1 without softcap)."""
        if self.softcap <= 0:
            return 1.0
        t = np.tanh(S / self.softcap)
        return 1.0 - t * t
