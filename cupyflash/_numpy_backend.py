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

from dataclasses import replace

import numpy as np

from ._dtypes import FLOAT32, FLOAT64, lse_dtype
from ._variants import Variants

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


# ---------------------------------------------------------------------------------------
# Heads: query head h reads kv head h // G (G = H_q // H_kv, grouped-query attention). The
# arrays are viewed as (batch, H_kv, G, seqlen, dim), k and v as (batch, H_kv, 1, seqlen, dim):
# the batched matmuls broadcast each kv head over its group, nothing is repeated in memory.

def _grouped(x, heads_kv: int):
    """(batch, H_q, ...) -> (batch, H_kv, G, ...)."""
    group = x.shape[1] // heads_kv if heads_kv else 1  # no heads at all: an empty problem
    return x.reshape(x.shape[0], heads_kv, group, *x.shape[2:])


def _per_head(values, batch: int, heads_kv: int, trailing: int):
    """A per-head float array ((H_q,) or (batch, H_q)) as (batch or 1, H_kv, G, 1 x trailing)."""
    if values is None:
        return None
    v = np.asarray(values, np.float64).reshape(-1 if np.ndim(values) == 2 else 1, np.shape(values)[-1])
    return v.reshape(v.shape[0], heads_kv, -1, *((1,) * trailing))


def _tiles(first: int, end: int, block: int):
    """Tile starts covering [first, end), aligned to multiples of block as the kernels' are."""
    return range(first // block * block, end, block)


# ---------------------------------------------------------------------------------------
# Forward

def _forward_query_block(Q_i, K, V, i0, *, scale, var, seqlen_q, slopes, sink_log2, keys=None, user=None):
    """O_i and lse_i for one block of queries Q_i (batch, H_kv, G, rows, dim) starting at i0,
    over the visible keys, or those of them in ``keys`` = [first, end) (whole key tiles);
    ``user``: the call's user terms (Variants.user_terms), None without them."""
    seqlen_k, rows = K.shape[-2], Q_i.shape[-2]
    i = np.arange(i0, i0 + rows)[:, None]
    if sink_log2 is None:
        m = np.full(Q_i.shape[:-1], -np.inf, Q_i.dtype)  # running max of the logits (log2 units)
        l = np.zeros(Q_i.shape[:-1], Q_i.dtype)          # running sum of exp2(logit - m)
    else:  # the sink is a logit every row sees first: m = sink, l = exp2(sink - m) = 1
        m = np.broadcast_to(sink_log2, Q_i.shape[:-1]).astype(Q_i.dtype)
        l = np.ones(Q_i.shape[:-1], Q_i.dtype)
    O = np.zeros(Q_i.shape, Q_i.dtype)                   # running sum of P V, not yet divided by l
    first, end = var.key_range(i0, i0 + rows, seqlen_q, seqlen_k)
    if keys is not None:
        first, end = max(first, keys[0]), min(end, keys[1])
    for j0 in _tiles(first, end, BLOCK_N):
        if user is not None and not user.visits(i0, i0 + rows, j0, min(j0 + BLOCK_N, seqlen_k)):
            continue  # a block-sparse mask skips the tile: no score of it is computed
        K_j, V_j = K[..., j0:j0 + BLOCK_N, :], V[..., j0:j0 + BLOCK_N, :]
        j = np.arange(j0, j0 + K_j.shape[-2])[None, :]
        X = var.logits((Q_i @ K_j.swapaxes(-1, -2)) * scale, i, j, seqlen_q, seqlen_k, slopes, user) * LOG2E
        m_new = np.maximum(m, X.max(axis=-1))
        # A row that has seen only masked keys keeps m = -inf; shift it by 0 instead so that
        # exp2(-inf - shift) = 0 rather than exp2(-inf + inf) = NaN.
        shift = np.where(m_new == -np.inf, 0, m_new)
        alpha = np.exp2(m - shift)  # rescales what was summed under the old max
        P = np.exp2(X - shift[..., None])
        l = alpha * l + P.sum(axis=-1)  # the undropped softmax's sum: lse is dropout's too
        Z = None if user is None else user.dropout_at(i, j)
        O = alpha[..., None] * O + (P if Z is None else P * Z) @ V_j
        m = m_new
    # Rows that saw no key and no sink (l = 0): out 0, lse -inf.
    l_safe = np.where(l == 0, 1, l)
    O /= l_safe[..., None]
    lse = np.where(l == 0, -np.inf, (m + np.log2(l_safe)) * LN2)
    return O, lse


def forward(q, k, v, *, causal: bool, scale: float, out=None, lse=None, variants: Variants | None = None):
    """Attention output and log-sum-exp by the blocked online-softmax algorithm.

    Parameters
    ----------
    q : numpy array (batch, seqlen_q, heads, head_dim)
    k, v : numpy arrays (batch, seqlen_k, heads_kv, head_dim), q's dtype; heads_kv divides heads
    causal : bool
    scale : float
        The softmax scale, > 0.
    out : numpy array shaped like q, q's dtype, optional
    lse : numpy array (batch, heads, seqlen_q), float32 (float64 for float64 inputs), optional
        Written in place and returned when given.
    variants : Variants, optional
        Window, softcap, ALiBi, sinks (causal folded in); default: ``Variants.of(causal)``.

    Returns
    -------
    (out, lse)
    """
    var = variants or Variants.of(causal)
    batch, seqlen_q, heads, _ = q.shape
    heads_kv = k.shape[2]
    acc = _accumulator_dtype(q.dtype)
    if out is None:
        out = np.empty(q.shape, q.dtype)
    if lse is None:
        lse = np.empty((batch, heads, seqlen_q), lse_dtype(q.dtype))
    K, V = (_bhsd(x, acc)[:, :, None] for x in (k, v))
    Q = _grouped(_bhsd(q, acc), heads_kv)
    slopes = _per_head(var.alibi_slopes, batch, heads_kv, 2)
    sink_log2 = None if var.sinks is None else _per_head(var.sinks, batch, heads_kv, 1) * LOG2E
    user = var.user_terms(batch, heads_kv, Q.shape[2])
    out_g, lse_g = _grouped(out.transpose(0, 2, 1, 3), heads_kv), _grouped(lse, heads_kv)
    for i0 in range(0, seqlen_q, BLOCK_M):
        i1 = min(i0 + BLOCK_M, seqlen_q)
        O_i, lse_i = _forward_query_block(Q[..., i0:i1, :], K, V, i0, scale=scale, var=var, seqlen_q=seqlen_q,
                                          slopes=slopes, sink_log2=sink_log2, user=user)
        out_g[..., i0:i1, :] = O_i
        lse_g[..., i0:i1] = lse_i
    return out, lse


# ---------------------------------------------------------------------------------------
# Backward

def backward(dout, q, k, v, out, lse, *, causal: bool, scale: float, dq=None, dk=None, dv=None,
             variants: Variants | None = None, dbias=None):
    """Gradients of attention with respect to q, k and v (and the sinks), recomputing P from lse.

    Parameters
    ----------
    dout, out : numpy arrays shaped like q, q's dtype
    q, k, v, causal, scale, variants
        As for :func:`forward`.
    lse : numpy array (batch, heads, seqlen_q)
        The forward pass's log-sum-exp (-inf for queries that see no key and no sink).
    dq, dk, dv : numpy arrays shaped like q, k, v, q's dtype, optional
        Written in place and returned when given.
    dbias : numpy array shaped like variants.bias, optional
        Receives d loss / d bias (summed where bias broadcasts); only with a bias tensor.

    Returns
    -------
    (dq, dk, dv) in q's dtype; with sinks, (dq, dk, dv, dsinks), dsinks float32 (H_q,)
    (float64 for float64 inputs). dk, dv of a kv head sum over the query heads of its group.
    """
    var = variants or Variants.of(causal)
    batch, seqlen_q, heads, _ = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    acc = _accumulator_dtype(q.dtype)
    dq = np.empty(q.shape, q.dtype) if dq is None else dq
    dk = np.empty(k.shape, q.dtype) if dk is None else dk
    dv = np.empty(v.shape, q.dtype) if dv is None else dv
    K, V = (_bhsd(x, acc)[:, :, None] for x in (k, v))
    Q, dO, O = (_grouped(_bhsd(x, acc), heads_kv) for x in (q, dout, out))
    D = np.sum(dO * O, axis=-1)  # rowsum(dO * O), (batch, H_kv, G, seqlen_q)
    slopes = _per_head(var.alibi_slopes, batch, heads_kv, 2)
    # P = exp2(logit - lse * LOG2E); a row with lse = -inf saw no key: subtracting +inf makes
    # its P exactly 0 (where -(-inf) would give exp2(+inf) or NaN).
    lse_log2 = _grouped(lse.astype(acc), heads_kv) * LOG2E
    lse_log2 = np.where(lse_log2 == -np.inf, np.inf, lse_log2)
    dQ = np.zeros(Q.shape, acc)
    dk_bhsd, dv_bhsd = dk.transpose(0, 2, 1, 3), dv.transpose(0, 2, 1, 3)
    user = var.user_terms(batch, heads_kv, Q.shape[2])
    dbias_acc = None if dbias is None else np.zeros(dbias.shape, acc)
    for j0 in range(0, seqlen_k, BLOCK_N):
        K_j, V_j = K[..., j0:j0 + BLOCK_N, :], V[..., j0:j0 + BLOCK_N, :]
        j1 = j0 + K_j.shape[-2]
        i0, i1 = var.query_range(j0, j1, seqlen_q, seqlen_k)
        if i0 >= i1:  # no query sees these keys
            dk_bhsd[:, :, j0:j1] = 0
            dv_bhsd[:, :, j0:j1] = 0
            continue
        Q_i, dO_i = Q[..., i0:i1, :], dO[..., i0:i1, :]
        i, j = np.arange(i0, i1)[:, None], np.arange(j0, j1)[None, :]
        S = (Q_i @ K_j.swapaxes(-1, -2)) * scale  # at most seqlen_q x BLOCK_N per head
        P = np.exp2(var.logits(S, i, j, seqlen_q, seqlen_k, slopes, user) * LOG2E - lse_log2[..., i0:i1, None])
        Z = None if user is None else user.dropout_at(i, j)  # the forward's dropout, regenerated
        dv_bhsd[:, :, j0:j1] = ((P if Z is None else P * Z).swapaxes(-1, -2) @ dO_i).sum(axis=2)  # over the group
        dP = dO_i @ V_j.swapaxes(-1, -2)
        if Z is not None:
            dP = dP * Z
        dL = P * (dP - D[..., i0:i1, None])  # d loss / d logit
        if dbias_acc is not None:
            user.add_dbias(dbias_acc, dL, i, j)
        dS = dL * var.softcap_grad(S)  # d loss / d scaled score
        dk_bhsd[:, :, j0:j1] = scale * (dS.swapaxes(-1, -2) @ Q_i).sum(axis=2)
        dQ[..., i0:i1, :] += scale * (dS @ K_j)
    dq.transpose(0, 2, 1, 3)[...] = dQ.reshape(batch, heads, seqlen_q, q.shape[3])
    if dbias is not None:
        dbias[...] = dbias_acc
    if var.sinks is None:
        return dq, dk, dv
    # d loss / d sink_h = -sum over rows of P_sink * D, P_sink = exp(sink_h - lse)
    sink = _per_head(var.sinks, batch, heads_kv, 1)
    p_sink = np.exp(sink - _grouped(lse.astype(acc), heads_kv))
    dsinks = -(p_sink * D).sum(axis=(0, 3)).reshape(heads).astype(lse_dtype(q.dtype))
    return dq, dk, dv, dsinks


# ---------------------------------------------------------------------------------------
# Packed sequences (varlen): each sequence is a batch of one for the dense code above, so a
# packed call is by construction the dense call of each sequence alone.

def _sequences(packing):
    """(b, its query rows, its key rows) of each packed sequence (a _checks.Packing, offsets checked)."""
    cu_q, cu_k = packing.cu_q, packing.cu_k
    for b in range(packing.batch):
        yield b, slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))


def _sequence_variants(var: Variants, b: int) -> Variants:
    """Sequence b's variants: its row of (batch, H) ALiBi slopes, and b for the user terms."""
    if var.alibi_slopes is not None and np.ndim(var.alibi_slopes) == 2:
        var = replace(var, alibi_slopes=var.alibi_slopes[b])
    return replace(var, batch_offset=b) if var.user else var


def forward_varlen(q, k, v, packing, *, scale: float, variants: Variants, out=None, lse=None):
    """:func:`forward` of each packed sequence on its own.

    q (total_q, heads, head_dim), k and v (total_k, heads_kv, head_dim); returns (out, lse) with
    out shaped like q and lse (heads, total_q), written into ``out`` and ``lse`` when given.
    """
    o_all = np.empty(q.shape, q.dtype)
    l_all = np.empty((q.shape[1], q.shape[0]), lse_dtype(q.dtype))
    for b, rq, rk in _sequences(packing):
        o, l = forward(q[None, rq], k[None, rk], v[None, rk], causal=False, scale=scale,
                       variants=_sequence_variants(variants, b))
        o_all[rq], l_all[:, rq] = o[0], l[0]
    # written once every sequence has read its inputs (out may alias them)
    return _write(out, o_all), _write(lse, l_all)


def backward_varlen(dout, q, k, v, out, lse, packing, *, scale: float, variants: Variants, dq=None, dk=None,
                    dv=None):
    """:func:`backward` of each packed sequence on its own; lse (heads, total_q). Returns
    (dq, dk, dv), and dsinks (summed over the sequences) with sinks."""
    grads = [np.zeros(x.shape, q.dtype) for x in (q, k, v)]
    dsinks = None if variants.sinks is None else np.zeros(q.shape[1], _accumulator_dtype(q.dtype))
    for b, rq, rk in _sequences(packing):
        g = backward(dout[None, rq], q[None, rq], k[None, rk], v[None, rk], out[None, rq], lse[None, :, rq],
                     causal=False, scale=scale, variants=_sequence_variants(variants, b))
        for full, part, rows in zip(grads, g, (rq, rk, rk)):
            full[rows] = part[0]
        if dsinks is not None:
            dsinks += g[3]
    result = tuple(_write(buf, g) for buf, g in zip((dq, dk, dv), grads))
    return result if dsinks is None else (*result, dsinks.astype(lse_dtype(q.dtype)))


def _write(buf, value):
    """value, or value written into the caller's buffer."""
    if buf is None:
        return value
    buf[...] = value
    return buf


# ---------------------------------------------------------------------------------------
# Attention against a KV cache: append the new tokens at each sequence's length, then each
# sequence's queries attend to the valid prefix of its cache, as a dense batch of one.

def _cache_rows(cache, page_table, b: int, end: int):
    """Sequence b's cache positions [0, end) as indices into the cache viewed as (rows, H_kv, D):
    batch b's rows of a dense cache, or the page table's rows of a paged one."""
    pos = np.arange(end)
    if page_table is None:
        return b * cache.shape[1] + pos
    page_size = cache.shape[1]
    return page_table[b, pos // page_size].astype(np.int64) * page_size + pos % page_size


def forward_split(q, k, v, *, scale: float, variants: Variants, num_splits: int):
    """:func:`forward` with the keys split into ``num_splits`` chunks of whole key tiles (split-KV,
    flash-decoding): each chunk's normalised output O_s and lse_s without the sink, then merged by
    their lse, lse = log(sum_s exp(lse_s) + exp(sink)), out = sum_s exp(lse_s - lse) O_s; the spec
    of the GPU's combine. Returns (out, lse) in the accumulator dtype."""
    batch, seqlen_q, heads, _ = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    acc = _accumulator_dtype(q.dtype)
    K, V = (_bhsd(x, acc)[:, :, None] for x in (k, v))
    Q = _grouped(_bhsd(q, acc), heads_kv)
    slopes = _per_head(variants.alibi_slopes, batch, heads_kv, 2)
    tiles = max(1, -(-seqlen_k // BLOCK_N))
    per = -(-tiles // num_splits) * BLOCK_N  # keys per chunk: whole tiles
    parts = [_forward_query_block(Q, K, V, 0, scale=scale, var=variants, seqlen_q=seqlen_q, slopes=slopes,
                                  sink_log2=None, keys=(c0, c0 + per)) for c0 in range(0, max(seqlen_k, 1), per)]
    lses = np.stack([p[1] for p in parts])  # (splits, batch, H_kv, G, rows); -inf: a chunk no key of which is seen
    if variants.sinks is not None:
        sink = np.broadcast_to(_per_head(variants.sinks, batch, heads_kv, 1), lses.shape[1:])
        lses = np.concatenate([lses, sink[None]])
    top = lses.max(axis=0)
    shift = np.where(top == -np.inf, 0, top)
    weights = np.exp(lses - shift)
    total = weights.sum(axis=0)
    lse = np.where(total == 0, -np.inf, shift + np.log(np.where(total == 0, 1, total)))
    O = sum(w[..., None] * p[0] for w, p in zip(weights, parts)) / np.where(total == 0, 1, total)[..., None]
    return (O.reshape(batch, heads, seqlen_q, -1).transpose(0, 2, 1, 3),
            lse.reshape(batch, heads, seqlen_q))


def forward_kvcache(q, k_cache, v_cache, kv_lengths, *, k_new=None, v_new=None, page_table=None, scale: float,
                    variants: Variants, out=None, lse=None, num_splits: int = 1):
    """Append ``k_new``, ``v_new`` (B, S_new, H_kv, D) to the caches at positions kv_lengths[b]...
    (in place), then :func:`forward` of each sequence's queries against its first
    kv_lengths[b] + S_new cached keys. The caches are dense (B, S_max, H_kv, D) or paged
    (num_pages, page_size, H_kv, D) with ``page_table`` (B, pages per sequence); ``kv_lengths``:
    host int array (B,), checked by the caller to fit. ``num_splits`` > 1: the keys split into that
    many chunks and merged (:func:`forward_split`). Returns (out, lse) shaped like q and (B, H, S_q)."""
    B, Sq, H, _ = q.shape
    s_new = 0 if k_new is None else k_new.shape[1]
    flat_k, flat_v = (c.reshape(-1, *c.shape[2:]) for c in (k_cache, v_cache))  # views: the caches are written
    o_all = np.empty(q.shape, q.dtype)
    l_all = np.empty((B, H, Sq), lse_dtype(q.dtype))
    for b in range(B):
        length = int(kv_lengths[b]) + s_new
        rows = _cache_rows(k_cache, page_table, b, length)
        if s_new:  # the new tokens land at positions kv_lengths[b] ... kv_lengths[b] + S_new - 1
            flat_k[rows[-s_new:]], flat_v[rows[-s_new:]] = k_new[b], v_new[b]
        args = (q[b:b + 1], flat_k[rows][None], flat_v[rows][None])
        if num_splits > 1:
            o, l = forward_split(*args, scale=scale, variants=_sequence_variants(variants, b), num_splits=num_splits)
        else:
            o, l = forward(*args, causal=False, scale=scale, variants=_sequence_variants(variants, b))
        o_all[b], l_all[b] = o[0], l[0]
    return _write(out, o_all), _write(lse, l_all)
