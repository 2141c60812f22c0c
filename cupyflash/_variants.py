"""The attention variants, written once: which keys a query sees (causal, sliding window),
how a scaled score becomes a logit (softcap, ALiBi), and the sink logit in each row's
denominator; grouped-query attention is the head mapping h -> h // (H_q // H_kv).

For query i and key j, with o = seqlen_k - seqlen_q (bottom-right alignment, as flash-attn):

- visible: i + o - left <= j <= i + o + right (-1: unbounded on that side; causal: right = 0);
- logit: s = scale * q_i . k_j; s = softcap * tanh(s / softcap) when softcap > 0; then
  s -= slope_h * |i + o - j| when ALiBi slopes are given;
- softmax over the visible keys, whose denominator also counts exp(sinks[h]) when sinks are
  given: lse = log(sum_j exp(s_ij) + exp(sinks[h])), and the sink adds nothing to the output;
- the user's terms (issue 19): the logit gains bias_mod(b, h, i, j) (a C++ expression, _expr.py)
  and bias[b, h, i, j] (a dense tensor broadcast to (B, H_q, Sq, Sk)), after the softcap and
  ALiBi; a key is visible only where mask_mod(b, h, i, j) and mask[b, h, i, j] are true too.

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
    mask_mod: object = None      # _expr.Expr of b, h, q_idx, kv_idx and aux: keep the key where true
    bias_mod: object = None      # _expr.Expr: added to the logit
    aux: tuple = ()              # ((name, array), ...) that the expressions read
    bias: object = None          # float array broadcastable to (B, H_q, Sq, Sk), added to the logit
    mask: object = None          # bool array broadcastable to (B, H_q, Sq, Sk): keep where true
    block_mask: object = None    # cupyflash.blockmask.BlockMask: only its kept blocks are visited
    dropout_p: float = 0.0       # dropout on the probabilities (_dropout.py: regenerated from the seed)
    seed: int = 0
    batch_offset: int = 0        # the user terms' b of batch row 0 (a packed sequence's index)
    dbias: object = None         # the GPU backward's float32 d loss / d bias, bias's 4-D shape, zeroed: the kernels add into it

    @property
    def dense(self) -> bool:
        return (self.window == (UNBOUNDED, UNBOUNDED) and self.softcap == 0.0 and self.alibi_slopes is None
                and self.sinks is None and not self.user)

    @property
    def user(self) -> bool:
        """Does the call carry the user's terms (mask_mod, bias_mod, bias, mask)?"""
        return (any(t is not None for t in (self.mask_mod, self.bias_mod, self.bias, self.mask, self.block_mask))
                or self.dropout_p > 0)

    def user_terms(self, batch: int, heads_kv: int, group: int):
        """The user's terms on the NumPy backend's (batch, H_kv, G, rows, cols) grid, None without
        them; batch row 0 is b = batch_offset."""
        return UserTerms(self, batch, heads_kv, group, self.batch_offset) if self.user else None

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

    def logits(self, S, i, j, seqlen_q: int, seqlen_k: int, slopes, user=None):
        """Scaled scores S (natural-log units) -> logits: softcap, then ALiBi (``slopes``
        broadcast against S's leading axes, None without ALiBi), then the user's bias terms
        (``user``: user_terms); masked keys are -inf."""
        if self.softcap > 0:
            S = self.softcap * np.tanh(S / self.softcap)
        if slopes is not None:
            S = S - slopes * np.abs(i + (seqlen_k - seqlen_q) - j)
        visible = self.visible(i, j, seqlen_q, seqlen_k)
        if user is not None:
            S = S + user.bias_at(i, j)
            visible = visible & user.keep_at(i, j)
        return np.where(visible, S, -np.inf)

    def softcap_grad(self, S):
        """d logit / d scaled score at the scaled scores S (1 without softcap)."""
        if self.softcap <= 0:
            return 1.0
        t = np.tanh(S / self.softcap)
        return 1.0 - t * t


class UserTerms:
    """A call's mask_mod, bias_mod, bias and mask evaluated on the NumPy backend's grouped grid
    (batch, H_kv, G, rows, cols): query head h = kv head * G + g, batch b = b0 + its index."""

    def __init__(self, var: Variants, batch: int, heads_kv: int, group: int, b0: int = 0):
        self.var = var
        self.b = (b0 + np.arange(batch)).reshape(-1, 1, 1, 1, 1)
        self.h = np.arange(heads_kv * group).reshape(1, heads_kv, group, 1, 1)

    def _env(self, i, j) -> dict:
        return {"b": self.b, "h": self.h, "q_idx": i, "kv_idx": j, **dict(self.var.aux)}

    def _index(self, t, i, j) -> tuple:
        """Where the grid's (b, h, i, j) fall in tensor t (4-D, broadcastable to (B, H_q, Sq, Sk)): size-1 axes broadcast."""
        return self.b % t.shape[0], self.h % t.shape[1], i % t.shape[2], j % t.shape[3]

    def _dense(self, t, i, j):
        return t[self._index(t, i, j)]

    def bias_at(self, i, j):
        """The additive terms at queries i, keys j (0 without them)."""
        out = 0.0
        if self.var.bias_mod is not None:
            out = out + np.asarray(self.var.bias_mod.evaluate(self._env(i, j))[0], np.float64)
        if self.var.bias is not None:
            out = out + self._dense(self.var.bias, i, j)
        return out

    def keep_at(self, i, j):
        """Where the user's masks keep the key (True without them)."""
        keep = np.bool_(True)
        if self.var.mask_mod is not None:
            keep = keep & (self.var.mask_mod.evaluate(self._env(i, j))[0] != 0)
        if self.var.mask is not None:
            keep = keep & self._dense(self.var.mask, i, j)
        if self.var.block_mask is not None:
            keep = keep & self.var.block_mask.keep(self.b, self.h, i, j)
        return keep

    def dropout_at(self, i, j):
        """The dropout factor on the probabilities at queries i, keys j (1 / (1 - p) kept, 0 dropped),
        or None without dropout."""
        if self.var.dropout_p <= 0:
            return None
        from ._dropout import scale
        return scale(self.var.seed, self.var.dropout_p, self.b, self.h, i, j)

    def visits(self, i0: int, i1: int, j0: int, j1: int) -> bool:
        """Does the block mask keep any block of queries [i0, i1) x keys [j0, j1) (True without one)?"""
        bm = self.var.block_mask
        if bm is None:
            return True
        (br, bc), kinds = bm.block, bm.kinds
        return bool(kinds[..., i0 // br:(i1 - 1) // br + 1, j0 // bc:(j1 - 1) // bc + 1].any())

    def add_dbias(self, dbias, dL, i, j) -> None:
        """dbias (bias's shape) += dL (d loss / d logit on the grid), summed where bias broadcasts."""
        index = self._index(self.var.bias, i, j)
        np.add.at(dbias, tuple(np.broadcast_to(x, dL.shape) for x in index), dL)
