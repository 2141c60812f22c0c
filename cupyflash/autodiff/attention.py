"""Attention on the tape: cupyflash's FlashAttention (forward and backward kernels, or the NumPy
backend) and naive attention (composed of the tape's ops, as a reference)."""
from __future__ import annotations

import math

import numpy as np

from .tensor import Tensor, _as_tensor, _xp, record


# ---- attention

_DROPOUT_SEEDS = np.random.default_rng()


def dropout_seed(seed: int) -> None:
    """Seed the generator that draws the tape's dropout seeds (flash_attention with dropout_p and no
    seed): a training run then drops the same entries when run again."""
    global _DROPOUT_SEEDS
    _DROPOUT_SEEDS = np.random.default_rng(seed)


def flash_attention(q, k, v, *, causal: bool = False, softmax_scale: float | None = None,
                    window_size: tuple = (-1, -1), softcap: float = 0.0, alibi_slopes=None, sinks=None,
                    deterministic: bool = False, mask_mod: str | None = None, bias_mod: str | None = None,
                    aux: dict | None = None, bias=None, mask=None, block_mask=None, dropout_p: float = 0.0,
                    seed: int | None = None) -> Tensor:
    """:func:`cupyflash.flash_attention` on the tape.

    q (batch, seqlen_q, heads, head_dim), k and v (batch, seqlen_k, heads_kv, head_dim). The
    tape saves only q, k, v, out and the log-sum-exp; backward calls
    :func:`cupyflash.flash_attention_backward`, which recomputes the attention tile by
    tile. Nothing of size seqlen_q x seqlen_k is kept. ``deterministic=True`` makes that
    backward call bitwise reproducible (see :func:`cupyflash.flash_attention_backward`).
    window_size, softcap, alibi_slopes (an array: no gradient), sinks, mask_mod, bias_mod, aux,
    bias, mask and block_mask as in :func:`cupyflash.flash_attention`; sinks and bias may be
    Tensors, which then receive dsinks and dbias. With ``dropout_p`` > 0 and no ``seed`` each
    call draws a fresh seed (numpy's default generator, seeded by :func:`dropout_seed`), which
    its backward reuses.
    """
    from .. import api, _checks
    deterministic = _checks.check_bool("deterministic", deterministic)
    qt, kt, vt = _as_tensor(q), _as_tensor(k), _as_tensor(v)
    xp = qt.xp
    qd, kd, vd = (xp.ascontiguousarray(t.data) for t in (qt, kt, vt))
    sink_data = None if sinks is None else _as_tensor(sinks).data
    bias_data = None if bias is None else _as_tensor(bias).data
    # dbias only for a bias on the tape that wants a gradient (a plain array is a constant)
    want_dbias = isinstance(bias, Tensor) and bias.requires_grad
    if dropout_p and seed is None:
        seed = int(_DROPOUT_SEEDS.integers(2 ** 63))
    variants = dict(window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sink_data,
                    mask_mod=mask_mod, bias_mod=bias_mod, aux=aux, bias=bias_data, mask=mask, block_mask=block_mask,
                    dropout_p=dropout_p, seed=seed)
    out, lse = api.flash_attention(qd, kd, vd, causal=causal, softmax_scale=softmax_scale,
                                   return_lse=True, **variants)

    def backward(g, qd, kd, vd, out, lse):
        g = _xp(g).ascontiguousarray(g.astype(out.dtype, copy=False))
        grads = api.flash_attention_backward(g, qd, kd, vd, out, lse, causal=causal, softmax_scale=softmax_scale,
                                             deterministic=deterministic, return_dbias=want_dbias, **variants)
        if sinks is not None:
            grads = (*grads[:3], grads[3].astype(sink_data.dtype, copy=False), *grads[4:])
        return grads
    inputs = (q, k, v) + ((sinks,) if sinks is not None else ()) + ((bias,) if want_dbias else ())
    return record(out, inputs, backward, saved=(qd, kd, vd, out, lse), op="flash_attention")


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q: int | None = None,
                           max_seqlen_k: int | None = None, causal: bool = False, softmax_scale: float | None = None,
                           window_size: tuple = (-1, -1), softcap: float = 0.0, alibi_slopes=None, sinks=None,
                           deterministic: bool = False) -> Tensor:
    """:func:`cupyflash.flash_attention_varlen` on the tape: packed sequences, q (total_q, heads,
    head_dim), k and v (total_k, heads_kv, head_dim), the offsets and maxima as there (arrays and
    ints: no gradient). Saves what :func:`flash_attention` saves; sinks may be a Tensor."""
    from .. import _checks, varlen
    deterministic = _checks.check_bool("deterministic", deterministic)
    qt, kt, vt = _as_tensor(q), _as_tensor(k), _as_tensor(v)
    xp = qt.xp
    qd, kd, vd = (xp.ascontiguousarray(t.data) for t in (qt, kt, vt))
    sink_data = None if sinks is None else _as_tensor(sinks).data
    packing = dict(max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, causal=causal, softmax_scale=softmax_scale,
                   window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sink_data)
    out, lse = varlen.flash_attention_varlen(qd, kd, vd, cu_seqlens_q, cu_seqlens_k, return_lse=True, **packing)

    def backward(g, qd, kd, vd, out, lse):
        g = _xp(g).ascontiguousarray(g.astype(out.dtype, copy=False))
        grads = varlen.flash_attention_varlen_backward(g, qd, kd, vd, out, lse, cu_seqlens_q, cu_seqlens_k,
                                                       deterministic=deterministic, **packing)
        return grads if sinks is None else (*grads[:3], grads[3].astype(sink_data.dtype, copy=False))
    inputs = (q, k, v) if sinks is None else (q, k, v, sinks)
    return record(out, inputs, backward, saved=(qd, kd, vd, out, lse), op="flash_attention_varlen")


def naive_attention(q, k, v, *, causal: bool = False, softmax_scale: float | None = None) -> Tensor:
    """Standard attention that materialises P = softmax(Q K^T * scale) and saves it.

    Same layout, masking and result as :func:`flash_attention` (a query row that sees no
    key gives 0); the tape keeps q, k, v and P, which is batch x heads x seqlen_q x
    seqlen_k. For comparisons.
    """
    qt, kt, vt = _as_tensor(q), _as_tensor(k), _as_tensor(v)
    xp = qt.xp
    seqlen_q, seqlen_k, head_dim = qt.shape[1], kt.shape[1], qt.shape[3]
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    Q, K, V = (t.data.transpose(0, 2, 1, 3) for t in (qt, kt, vt))  # (batch, heads, seqlen, dim)
    S = (Q @ K.swapaxes(-1, -2)) * scale
    if causal:  # bottom-right aligned: query i sees keys j <= i + seqlen_k - seqlen_q
        i = xp.arange(seqlen_q)[:, None]
        j = xp.arange(seqlen_k)[None, :]
        S = xp.where(j <= i + (seqlen_k - seqlen_q), S, -xp.inf)
    m = S.max(axis=-1, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0)
    P = xp.exp(S - m)
    del S
    l = P.sum(axis=-1, keepdims=True)
    P /= xp.where(l == 0, 1, l)
    out = (P @ V).transpose(0, 2, 1, 3)

    def backward(g, Q, K, V, P):
        dO = g.transpose(0, 2, 1, 3)
        dV = P.swapaxes(-1, -2) @ dO
        dP = dO @ V.swapaxes(-1, -2)
        dS = P * (dP - (dP * P).sum(axis=-1, keepdims=True))
        dQ = (dS @ K) * scale
        dK = (dS.swapaxes(-1, -2) @ Q) * scale
        return tuple(d.transpose(0, 2, 1, 3).astype(g.dtype, copy=False) for d in (dQ, dK, dV))
    return record(_xp(out).ascontiguousarray(out), (q, k, v), backward, saved=(Q, K, V, P),
                  op="naive_attention")
