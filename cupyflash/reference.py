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


def _allowed(xp, seqlen_q: int, seqlen_k: int, causal: bool, window_size):
    """(seqlen_q, seqlen_k) bool: key j visible to query i, bottom-right aligned: with
    d = j - (i + seqlen_k - seqlen_q), -left <= d <= right (-1: unbounded; causal: right = 0)."""
    left, right = window_size
    right = 0 if causal else right
    i = xp.arange(seqlen_q)[:, None]
    j = xp.arange(seqlen_k)[None, :]
    d = j - (i + (seqlen_k - seqlen_q))
    ok = xp.ones((seqlen_q, seqlen_k), bool)
    if left >= 0:
        ok &= d >= -left
    if right >= 0:
        ok &= d <= right
    return ok, xp.abs(d)


def _repeat_kv(X, heads: int):
    """(batch, H_kv, seqlen, dim) -> (batch, heads, seqlen, dim): kv head h // (heads // H_kv)."""
    return X.repeat(heads // X.shape[1], axis=1) if X.shape[1] != heads else X


def _per_head(xp, values, dtype):
    """(H,) or (B, H) -> broadcastable against (B, H, Sq, Sk)."""
    v = xp.asarray(values).astype(dtype)
    return v.reshape(*((1,) if v.ndim == 1 else ()), *v.shape, 1, 1)


def _user_terms(xp, v: dict, shape: tuple, dtype):
    """(additive term, keep mask) of the user's terms on the full (B, H, Sq, Sk) grid: bias_mod and
    mask_mod evaluated on index arrays (cupyflash._expr, C++'s rules), the dense bias and mask
    broadcast; (0, None) without them."""
    from . import _expr
    B, H, Sq, Sk = shape
    env = {"b": np.arange(B).reshape(-1, 1, 1, 1), "h": np.arange(H).reshape(1, -1, 1, 1),
           "q_idx": np.arange(Sq).reshape(-1, 1), "kv_idx": np.arange(Sk).reshape(1, -1),
           **{n: _host(a) for n, a in (v.get("aux") or {}).items()}}
    add, keep = 0.0, None
    if v.get("bias_mod") is not None:
        add = xp.asarray(np.asarray(_expr.parse("bias_mod", v["bias_mod"]).evaluate(env)[0], np.float64)).astype(dtype)
    if v.get("bias") is not None:
        add = add + xp.asarray(v["bias"]).astype(dtype)
    if v.get("mask_mod") is not None:
        keep = xp.asarray(_expr.parse("mask_mod", v["mask_mod"]).evaluate(env)[0] != 0)
    if v.get("mask") is not None:
        m = xp.asarray(v["mask"]).astype(bool)
        keep = m if keep is None else keep & m
    return add, keep


def _host(a):
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


def _probabilities(xp, Q, K, scale, causal, prec, variants=None):
    """P = softmax row by row, and lse, with the variants applied (module docstring of
    cupyflash._variants): scaled scores S = Q K^T * scale, softcap, ALiBi, the mask, and the
    sink's logit in the denominator. Also returns the scaled scores (for the softcap's
    derivative) and the sinks' probabilities (None without sinks).

    Fully masked rows (and rows with no key at all) give P = 0 and lse = -inf (the sink's
    logit with sinks).
    """
    v = variants or {}
    window, softcap = v.get("window_size", (-1, -1)), v.get("softcap", 0.0)
    seqlen_q, seqlen_k = Q.shape[2], K.shape[2]
    S0 = prec.round(Q @ K.swapaxes(-1, -2) * scale)
    S = softcap * xp.tanh(S0 / softcap) if softcap > 0 else S0
    allowed, distance = _allowed(xp, seqlen_q, seqlen_k, causal, window)
    if v.get("alibi_slopes") is not None:
        S = S - _per_head(xp, v["alibi_slopes"], prec.compute) * distance
    add, keep = _user_terms(xp, v, S.shape, prec.compute)
    S = S + add
    if keep is not None:
        allowed = allowed & keep
    S = xp.where(allowed, S, -xp.inf)
    sinks = v.get("sinks")
    if sinks is not None:  # one more column, the sink's logit, that no value goes with
        sink_col = xp.broadcast_to(_per_head(xp, sinks, prec.compute), S.shape[:3] + (1,))
        S = xp.concatenate([S, sink_col], axis=-1)
    if S.shape[-1] == 0:
        P = xp.zeros(S.shape, prec.compute)
        lse = xp.full(S.shape[:3], -xp.inf, prec.compute)
        return P, lse, S0, None
    m = S.max(axis=-1, keepdims=True)
    m_safe = xp.where(m == -xp.inf, 0, m)  # fully masked row: exp(-inf - 0) = 0, not NaN
    E = xp.exp(S - m_safe)
    l = E.sum(axis=-1, keepdims=True)
    l_safe = xp.where(l == 0, 1, l)
    P = E / l_safe
    lse = xp.where(l == 0, -xp.inf, m_safe + xp.log(l_safe))[..., 0]
    p_sink = None
    if sinks is not None:
        P, p_sink = P[..., :-1], P[..., -1]
    return prec.round(P), lse, S0, p_sink


def _dropped(xp, X, p: float, seed: int):
    """X (B, H, Sq, Sk) times the dropout factor of each entry (cupyflash._dropout: 1 / (1 - p) kept,
    0 dropped); X itself without dropout."""
    if p <= 0:
        return X
    from ._dropout import scale
    B, H, Sq, Sk = X.shape
    Z = scale(seed, p, np.arange(B).reshape(-1, 1, 1, 1), np.arange(H).reshape(1, -1, 1, 1),
              np.arange(Sq).reshape(-1, 1), np.arange(Sk).reshape(1, -1))
    return X * xp.asarray(Z).astype(X.dtype)


def _default_scale(scale, head_dim):
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def attention(q, k, v, *, causal: bool = False, softmax_scale: float | None = None,
              upcast: bool = True, window_size=(-1, -1), softcap: float = 0.0, alibi_slopes=None,
              sinks=None, mask_mod=None, bias_mod=None, aux=None, bias=None, mask=None, dropout_p: float = 0.0,
              seed: int = 0):
    """Naive attention ``softmax(q @ k^T * softmax_scale) @ v`` with the score matrix in memory.

    Parameters
    ----------
    q : array, shape (batch, seqlen_q, heads, head_dim)
    k, v : arrays, shape (batch, seqlen_k, heads_kv, head_dim), heads_kv dividing heads
        numpy or cupy arrays of one dtype (float16, bfloat16, float32 or float64).
    causal : bool
        Bottom-right aligned causal mask (query i sees keys j <= i + seqlen_k - seqlen_q).
    softmax_scale : float, optional
        Defaults to 1 / sqrt(head_dim).
    upcast : bool
        True: compute in float64 and return float64. False: compute as naive attention
        would in the input precision (see the module docstring).
    window_size, softcap, alibi_slopes, sinks, mask_mod, bias_mod, aux, bias, mask, dropout_p, seed
        The variants, the user's terms and dropout, as cupyflash.flash_attention takes them
        (cupyflash._variants; the expressions evaluated on the whole grid; the dropout mask
        regenerated from the seed, cupyflash._dropout).

    Returns
    -------
    out : array, shape of q; float64 if ``upcast`` else q's dtype.
    lse : array, shape (batch, heads, seqlen_q); float64 if ``upcast``, else float32
        (float64 for float64 inputs).
    """
    xp = _array_module(q)
    prec = _Precision(q.dtype, upcast)
    scale = _default_scale(softmax_scale, q.shape[-1])
    heads = q.shape[2]
    Q, K, V = (_bhsd(x, prec.compute) for x in (q, k, v))
    K, V = _repeat_kv(K, heads), _repeat_kv(V, heads)
    variants = dict(window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
                    mask_mod=mask_mod, bias_mod=bias_mod, aux=aux, bias=bias, mask=mask)
    P, lse, _, _ = _probabilities(xp, Q, K, scale, causal, prec, variants)
    O = prec.round(_dropped(xp, P, dropout_p, seed) @ V)
    return _bshd(xp, O, prec.output), lse.astype(FLOAT64 if upcast else prec.compute)


def attention_backward(dout, q, k, v, *, causal: bool = False,
                       softmax_scale: float | None = None, upcast: bool = True, window_size=(-1, -1),
                       softcap: float = 0.0, alibi_slopes=None, sinks=None, mask_mod=None, bias_mod=None,
                       aux=None, bias=None, mask=None, dropout_p: float = 0.0, seed: int = 0,
                       return_dbias: bool = False):
    """Analytic gradients of :func:`attention` with respect to q, k and v (and the sinks).

    With P = softmax(L), L the logits of S = Q K^T * scale, and O = P V:
    dV = P^T dO, dP = dO V^T, dL = P * (dP - rowsum(dO * O)), dS = dL * dL/dS (the softcap's
    1 - tanh^2; 1 without it), dQ = scale * dS K, dK = scale * dS^T Q; a kv head's dK, dV sum
    over its query heads; d sink_h = -sum over rows of P_sink * rowsum(dO * O).

    Parameters
    ----------
    dout : array, shape of q
        Gradient of the loss with respect to the attention output.
    q, k, v, causal, softmax_scale, upcast, window_size, softcap, alibi_slopes, sinks, mask_mod,
    bias_mod, aux, bias, mask, dropout_p, seed
        As for :func:`attention`.
    return_dbias : bool
        Also return d loss / d bias (bias's shape: summed where it broadcasts) = dL.

    Returns
    -------
    (dq, dk, dv) : arrays shaped like q, k, v; float64 if ``upcast`` else q's dtype; with
    sinks also dsinks, shaped like sinks (float64 if ``upcast`` else float32); with
    ``return_dbias`` dbias last.
    """
    xp = _array_module(q)
    prec = _Precision(q.dtype, upcast)
    scale = _default_scale(softmax_scale, q.shape[-1])
    heads, heads_kv = q.shape[2], k.shape[2]
    Q, K, V, dO = (_bhsd(x, prec.compute) for x in (q, k, v, dout))
    K, V = _repeat_kv(K, heads), _repeat_kv(V, heads)
    variants = dict(window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
                    mask_mod=mask_mod, bias_mod=bias_mod, aux=aux, bias=bias, mask=mask)
    P, _, S0, p_sink = _probabilities(xp, Q, K, scale, causal, prec, variants)
    dV = prec.round(_dropped(xp, P, dropout_p, seed).swapaxes(-1, -2) @ dO)
    dP = _dropped(xp, prec.round(dO @ V.swapaxes(-1, -2)), dropout_p, seed)  # through the same dropout
    D = (dP * P).sum(axis=-1, keepdims=True)  # softmax backward: rowsum(dP * P) = rowsum(dO * O)
    dS = P * (dP - D)  # d loss / d logit
    extra = ()
    if return_dbias:  # dS summed over the axes where bias broadcasts (missing leading axes too)
        shape = tuple(np.shape(bias))
        dbias = dS
        for axis, n in enumerate((1,) * (4 - len(shape)) + shape):
            if n == 1 and dbias.shape[axis] != 1:
                dbias = dbias.sum(axis=axis, keepdims=True)
        extra = (dbias.reshape(shape).astype(FLOAT64 if upcast else FLOAT32),)
    if softcap > 0:
        dS = dS * (1 - xp.tanh(S0 / softcap) ** 2)
    dS = prec.round(dS)
    dQ = prec.round(dS @ K * scale)
    dK = prec.round(dS.swapaxes(-1, -2) @ Q * scale)
    if heads_kv != heads:  # each kv head's gradient sums over its group of query heads
        dK, dV = (g.reshape(g.shape[0], heads_kv, heads // heads_kv, *g.shape[2:]).sum(axis=2) for g in (dK, dV))
    grads = tuple(_bshd(xp, g, prec.output) for g in (dQ, dK, dV))
    if sinks is None:
        return (*grads, *extra)
    dsinks = -(p_sink * D[..., 0]).sum(axis=(0, 2))
    return (*grads, dsinks.astype(FLOAT64 if upcast else FLOAT32), *extra)
