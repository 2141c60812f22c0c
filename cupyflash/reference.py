"""Naive attention that materialises the whole score matrix: what the tests compare against.

``attention`` computes ``softmax(Q K^T * scale) V`` in one go and ``attention_backward``
its analytic gradients. Both take numpy or cupy arrays (the array's own module does the
work; cupy is imported only if it is installed) in cupyflash's layout:

- q, dout: (batch, seqlen_q, heads, head_dim); k, v: (batch, seqlen_k, heads, head_dim)
- lse: (batch, heads, seqlen_q), the natural-log log-sum-exp of each row of scaled scores.

Masking is the API's: with ``causal`` query i sees keys j <= i + seqlen_k - seqlen_q
(bottom-right aligned); a query that sees no key gets out = 0, lse = -inf and zero
gradients, never NaN.

Two precisions, as in flash-attn's ``attention_ref``:

- ``upcast=True``: everything in float64; returns float64. The "true" answer.
- ``upcast=False``: naive attention in the input's own precision. For float16/bfloat16
  every matmul accumulates in float32 and its result is rounded to the input dtype
  (scores S, probabilities P, out; and dV, dP, dS, dQ, dK going backward); the softmax
  itself runs in float32 and lse is float32. float32 and float64 inputs compute in their
  own dtype. Its error against ``upcast=True`` is the yardstick for the bound "flash
  attention's error is at most twice that of naive attention in the same precision".
"""
from __future__ import annotations

import math

import numpy as np

from ._dtypes import BFLOAT16, FLOAT16, FLOAT32, FLOAT64

__all__ = ["attention", "attention_backward"]


def _array_module(x):
    try:
        import cupy
    except Exception:  # not installed, or CUDA libraries missing: numpy only
        return np
    return cupy.get_array_module(x)


class _Precision:
    """Where arithmetic happens (``compute``) and what intermediates are rounded to (``storage``)."""

    def __init__(self, dtype, upcast: bool):
        dtype = np.dtype(dtype)
        self.input = dtype
        if upcast:
            self.compute = self.storage = FLOAT64
        elif dtype in (FLOAT16, BFLOAT16):
            self.compute, self.storage = FLOAT32, dtype
        else:
            self.compute = self.storage = dtype
        self.output = FLOAT64 if upcast else dtype

    def round(self, x):
        """Round a computed intermediate to the storage precision (kept in the compute dtype)."""
        if self.storage == self.compute:
            return x
        return x.astype(self.storage).astype(self.compute)


def _bhsd(x, dtype):
    """(batch, seqlen, heads, dim) -> (batch, heads, seqlen, dim) in the compute dtype."""
    return x.transpose(0, 2, 1, 3).astype(dtype)


def _bshd(xp, x, dtype):
    return xp.ascontiguousarray(x.transpose(0, 2, 1, 3).astype(dtype))


def _causal_allowed(xp, seqlen_q: int, seqlen_k: int):
    """(seqlen_q, seqlen_k) bool: key j visible to query i, bottom-right aligned."""
    i = xp.arange(seqlen_q)[:, None]
    j = xp.arange(seqlen_k)[None, :]
    return j <= i + (seqlen_k - seqlen_q)


def _probabilities(xp, Q, K, scale, causal, prec):
    """P = softmax(S) row by row, and lse, from scaled scores S = Q K^T * scale.

    Fully masked rows (and rows with no key at all) give P = 0 and lse = -inf.
    """
    seqlen_q, seqlen_k = Q.shape[2], K.shape[2]
    S = prec.round(Q @ K.swapaxes(-1, -2) * scale)
    if causal:
        S = xp.where(_causal_allowed(xp, seqlen_q, seqlen_k), S, -xp.inf)
    if seqlen_k == 0:
        P = xp.zeros(S.shape, prec.compute)
        lse = xp.full(S.shape[:3], -xp.inf, prec.compute)
        return P, lse
    m = S.max(axis=-1, keepdims=True)
    m_safe = xp.where(m == -xp.inf, 0, m)  # fully masked row: exp(-inf - 0) = 0, not NaN
    E = xp.exp(S - m_safe)
    l = E.sum(axis=-1, keepdims=True)
    l_safe = xp.where(l == 0, 1, l)
    P = E / l_safe
    lse = xp.where(l == 0, -xp.inf, m_safe + xp.log(l_safe))[..., 0]
    return prec.round(P), lse


def _default_scale(scale, head_dim):
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def attention(q, k, v, *, causal: bool = False, softmax_scale: float | None = None,
              upcast: bool = True):
    """Naive attention ``softmax(q @ k^T * softmax_scale) @ v`` with the score matrix in memory.

    Parameters
    ----------
    q : array, shape (batch, seqlen_q, heads, head_dim)
    k, v : arrays, shape (batch, seqlen_k, heads, head_dim)
        numpy or cupy arrays of one dtype (float16, bfloat16, float32 or float64).
    causal : bool
        Bottom-right aligned causal mask (query i sees keys j <= i + seqlen_k - seqlen_q).
    softmax_scale : float, optional
        Defaults to 1 / sqrt(head_dim).
    upcast : bool
        True: compute in float64 and return float64. False: compute as naive attention
        would in the input precision (see the module docstring).

    Returns
    -------
    out : array, shape of q; float64 if ``upcast`` else q's dtype.
    lse : array, shape (batch, heads, seqlen_q); float64 if ``upcast``, else float32
        (float64 for float64 inputs).
    """
    xp = _array_module(q)
    prec = _Precision(q.dtype, upcast)
    scale = _default_scale(softmax_scale, q.shape[-1])
    Q, K, V = (_bhsd(x, prec.compute) for x in (q, k, v))
    P, lse = _probabilities(xp, Q, K, scale, causal, prec)
    O = prec.round(P @ V)
    return _bshd(xp, O, prec.output), lse.astype(FLOAT64 if upcast else prec.compute)


def attention_backward(dout, q, k, v, *, causal: bool = False,
                       softmax_scale: float | None = None, upcast: bool = True):
    """Analytic gradients of :func:`attention` with respect to q, k and v.

    With P = softmax(S), S = Q K^T * scale and O = P V:
    dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dP * P)), dQ = scale * dS K,
    dK = scale * dS^T Q.

    Parameters
    ----------
    dout : array, shape of q
        Gradient of the loss with respect to the attention output.
    q, k, v, causal, softmax_scale, upcast
        As for :func:`attention`.

    Returns
    -------
    (dq, dk, dv) : arrays shaped like q, k, v; float64 if ``upcast`` else q's dtype.
    """
    xp = _array_module(q)
    prec = _Precision(q.dtype, upcast)
    scale = _default_scale(softmax_scale, q.shape[-1])
    Q, K, V, dO = (_bhsd(x, prec.compute) for x in (q, k, v, dout))
    P, _ = _probabilities(xp, Q, K, scale, causal, prec)
    dV = prec.round(P.swapaxes(-1, -2) @ dO)
    dP = prec.round(dO @ V.swapaxes(-1, -2))
    D = (dP * P).sum(axis=-1, keepdims=True)  # softmax backward: rowsum(dP * P) = rowsum(dO * O)
    dS = prec.round(P * (dP - D))
    dQ = prec.round(dS @ K * scale)
    dK = prec.round(dS.swapaxes(-1, -2) @ Q * scale)
    return tuple(_bshd(xp, g, prec.output) for g in (dQ, dK, dV))
