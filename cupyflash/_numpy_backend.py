"""FlashAttention's blocked algorithm in NumPy: the executable specification of the CUDA kernels.

Forward (FlashAttention-2, Algorithm 1): for each block Q_i of BLOCK_M queries, walk the
key/value blocks K_j, V_j of BLOCK_N keys with an online softmax: a running row maximum m,
a running row sum l and an unnormalised output accumulator O that is rescaled whenever m
grows; divide by l once at the end and save lse = m * scale + ln(l) for the backward pass.
Scores are exponentiated with exp2 after one multiply by ``scale * log2(e)``, as the GPU does.

Backward (Algorithm 2): D = rowsum(dO * O); for each key block K_j, V_j recompute
P = exp(S * scale - lse) for the queries that see it (at most seqlen_q x BLOCK_N scores
per head at a time), then dV_j = P^T dO, dP = dO V_j^T, dS = P * (dP - D),
dK_j = scale * dS^T Q, dQ += scale * dS K_j.

Every (batch, head) pair and every query of a block is processed at once (NumPy batched
matmul). 16-bit and float32 inputs compute in float32, float64 inputs in float64; results
are rounded to the input dtype once, when written out. Inputs arrive validated by
``cupyflash._checks`` (same dtype, (batch, seqlen, heads, head_dim), last dim contiguous,
any other strides); outputs may alias inputs, which are copied before anything is written.
"""
from __future__ import annotations

import numpy as np

from ._dtypes import FLOAT32, FLOAT64, lse_dtype

#: queries per tile (rows of S)
BLOCK_M = 128
#: keys per tile (columns of S)
BLOCK_N = 64

LOG2E = 1.4426950408889634  # 1 / ln(2): exp(x) == exp2(x * LOG2E)
LN2 = 0.6931471805599453  # ln(2): ln(x) == log2(x) * LN2


def _accumulator_dtype(dtype) -> np.dtype:
    return FLOAT64 if np.dtype(dtype) == FLOAT64 else FLOAT32


def _bhsd(x, dtype):
    """(batch, seqlen, heads, dim), any strides -> contiguous (batch, heads, seqlen, dim) copy."""
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3), dtype=dtype)


def _scale_log2(scale: float) -> float:
    """The one factor applied to raw scores: exp(S * scale) == exp2(S * scale_log2)."""
    return scale * LOG2E


# ---------------------------------------------------------------------------------------
# Causal mask (bottom-right aligned): query i sees keys j <= i + seqlen_k - seqlen_q.

def _keys_end(i1: int, causal: bool, seqlen_q: int, seqlen_k: int) -> int:
    """One past the last key any query before i1 sees; later key blocks are skipped."""
    if not causal:
        return seqlen_k
    return max(0, min(seqlen_k, i1 + seqlen_k - seqlen_q))


def _first_query(j0: int, causal: bool, seqlen_q: int, seqlen_k: int) -> int:
    """The first query that sees key j0; earlier queries are skipped for that key block."""
    if not causal:
        return 0
    return min(seqlen_q, max(0, j0 - (seqlen_k - seqlen_q)))


def _apply_causal_mask(S, i0: int, j0: int, seqlen_q: int, seqlen_k: int):
    """S for queries i0.. and keys j0.., with -inf where a key lies after the query's last key."""
    rows, cols = S.shape[-2:]
    if j0 + cols - 1 <= i0 + seqlen_k - seqlen_q:  # the tile's top row already sees every key
        return S
    i = np.arange(i0, i0 + rows)[:, None]
    j = np.arange(j0, j0 + cols)[None, :]
    return np.where(j <= i + (seqlen_k - seqlen_q), S, -np.inf)


# ---------------------------------------------------------------------------------------
# Forward

def _forward_query_block(Q_i, K, V, i0, *, causal, scale_log2, seqlen_q):
    """O_i and lse_i for one block of queries Q_i (batch, heads, rows, dim) starting at i0."""
    seqlen_k = K.shape[2]
    m = np.full(Q_i.shape[:3], -np.inf, Q_i.dtype)  # running max of the raw scores S
    l = np.zeros(Q_i.shape[:3], Q_i.dtype)          # running sum of exp2(S * scale_log2 - m')
    O = np.zeros(Q_i.shape, Q_i.dtype)              # running sum of P V, not yet divided by l
    for j0 in range(0, _keys_end(i0 + Q_i.shape[2], causal, seqlen_q, seqlen_k), BLOCK_N):
        K_j, V_j = K[:, :, j0:j0 + BLOCK_N], V[:, :, j0:j0 + BLOCK_N]
        S = Q_i @ K_j.swapaxes(-1, -2)
        if causal:
            S = _apply_causal_mask(S, i0, j0, seqlen_q, seqlen_k)
        m_new = np.maximum(m, S.max(axis=-1))
        # A row that has seen only masked keys keeps m = -inf; shift it by 0 instead so that
        # exp2(-inf - shift) = 0 rather than exp2(-inf + inf) = NaN.
        shift = np.where(m_new == -np.inf, 0, m_new * scale_log2)
        alpha = np.exp2(m * scale_log2 - shift)  # rescales what was summed under the old max
        P = np.exp2(S * scale_log2 - shift[..., None])
        l = alpha * l + P.sum(axis=-1)
        O = alpha[..., None] * O + P @ V_j
        m = m_new
    # Rows that saw no key (l = 0): out 0, lse -inf.
    l_safe = np.where(l == 0, 1, l)
    O /= l_safe[..., None]
    lse = np.where(l == 0, -np.inf, (m * scale_log2 + np.log2(l_safe)) * LN2)
    return O, lse


def forward(q, k, v, *, causal: bool, scale: float, out=None, lse=None):
    """Attention output and log-sum-exp by the blocked online-softmax algorithm.

    Parameters
    ----------
    q : numpy array (batch, seqlen_q, heads, head_dim)
    k, v : numpy arrays (batch, seqlen_k, heads, head_dim), q's dtype
    causal : bool
    scale : float
        The softmax scale, > 0.
    out : numpy array shaped like q, q's dtype, optional
    lse : numpy array (batch, heads, seqlen_q), float32 (float64 for float64 inputs), optional
        Written in place and returned when given.

    Returns
    -------
    (out, lse)
    """
    batch, seqlen_q, heads, _ = q.shape
    acc = _accumulator_dtype(q.dtype)
    if out is None:
        out = np.empty(q.shape, q.dtype)
    if lse is None:
        lse = np.empty((batch, heads, seqlen_q), lse_dtype(q.dtype))
    K, V = _bhsd(k, acc), _bhsd(v, acc)
    q_bhsd, out_bhsd = q.transpose(0, 2, 1, 3), out.transpose(0, 2, 1, 3)
    for i0 in range(0, seqlen_q, BLOCK_M):
        i1 = min(i0 + BLOCK_M, seqlen_q)
        Q_i = np.ascontiguousarray(q_bhsd[:, :, i0:i1], dtype=acc)
        O_i, lse_i = _forward_query_block(Q_i, K, V, i0, causal=causal,
                                          scale_log2=_scale_log2(scale), seqlen_q=seqlen_q)
        out_bhsd[:, :, i0:i1] = O_i
        lse[:, :, i0:i1] = lse_i
    return out, lse


# ---------------------------------------------------------------------------------------
# Backward

def backward(dout, q, k, v, out, lse, *, causal: bool, scale: float, dq=None, dk=None, dv=None):
    """Gradients of attention with respect to q, k and v, recomputing P from lse.

    Parameters
    ----------
    dout, out : numpy arrays shaped like q, q's dtype
    q, k, v, causal, scale
        As for :func:`forward`.
    lse : numpy array (batch, heads, seqlen_q)
        The forward pass's log-sum-exp (-inf for queries that see no key).
    dq, dk, dv : numpy arrays shaped like q, k, v, q's dtype, optional
        Written in place and returned when given.

    Returns
    -------
    (dq, dk, dv) in q's dtype.
    """
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    acc = _accumulator_dtype(q.dtype)
    dq = np.empty(q.shape, q.dtype) if dq is None else dq
    dk = np.empty(k.shape, q.dtype) if dk is None else dk
    dv = np.empty(v.shape, q.dtype) if dv is None else dv
    Q, K, V, dO = (_bhsd(x, acc) for x in (q, k, v, dout))
    D = np.sum(dO * _bhsd(out, acc), axis=-1)  # rowsum(dO * O), (batch, heads, seqlen_q)
    scale_log2 = _scale_log2(scale)
    # P = exp2(S * scale_log2 - lse * LOG2E); a row with lse = -inf saw no key: subtracting
    # +inf makes its P exactly 0 (where -(-inf) would give exp2(+inf) or NaN).
    lse_log2 = lse.astype(acc) * LOG2E
    lse_log2 = np.where(lse_log2 == -np.inf, np.inf, lse_log2)
    dQ = np.zeros(Q.shape, acc)
    dk_bhsd, dv_bhsd = dk.transpose(0, 2, 1, 3), dv.transpose(0, 2, 1, 3)
    for j0 in range(0, seqlen_k, BLOCK_N):
        K_j, V_j = K[:, :, j0:j0 + BLOCK_N], V[:, :, j0:j0 + BLOCK_N]
        i0 = _first_query(j0, causal, seqlen_q, seqlen_k)
        Q_i, dO_i = Q[:, :, i0:], dO[:, :, i0:]
        S = Q_i @ K_j.swapaxes(-1, -2)  # at most seqlen_q x BLOCK_N per head
        if causal:
            S = _apply_causal_mask(S, i0, j0, seqlen_q, seqlen_k)
        P = np.exp2(S * scale_log2 - lse_log2[:, :, i0:, None])
        dv_bhsd[:, :, j0:j0 + BLOCK_N] = P.swapaxes(-1, -2) @ dO_i
        dP = dO_i @ V_j.swapaxes(-1, -2)
        dS = P * (dP - D[:, :, i0:, None])
        dk_bhsd[:, :, j0:j0 + BLOCK_N] = scale * (dS.swapaxes(-1, -2) @ Q_i)
        dQ[:, :, i0:] += scale * (dS @ K_j)
    dq.transpose(0, 2, 1, 3)[...] = dQ
    return dq, dk, dv
