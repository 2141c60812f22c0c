"""The correctness gate: cupyflash against the float64 reference, bounded by naive attention in
the same precision; a result that fails it is never timed."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._dtypes import dtype_name
from .devices import Inputs


#: an absolute floor, times max(1, max|ref|), for dtypes where the 2x-naive bound is ~0
ATOL_FLOOR = {"float64": 1e-12, "float32": 1e-5, "float16": 0.0, "bfloat16": 0.0}


@dataclass
class Check:
    """One tensor's check: max |actual - reference| against its bound."""
    tensor: str
    max_err: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.max_err <= self.bound

    def text(self) -> str:
        return f"{self.tensor} max err {self.max_err:.2e} {'<=' if self.ok else '>'} bound {self.bound:.2e}"


def _max_err(xp, actual, ref) -> float:
    """max |actual - ref| in float64; equal infinities count 0, NaN counts inf."""
    a = actual.astype(np.float64)
    with np.errstate(invalid="ignore"):  # inf - inf where both are -inf (masked lse)
        diff = xp.abs(a - ref)
    diff = xp.where(a == ref, 0.0, diff)
    diff = xp.where(xp.isnan(diff), xp.inf, diff)
    return float(diff.max()) if diff.size else 0.0


def _rounding_atol(xp, ref, dtype) -> float:
    """flash-attn's atol: twice the rounding error of the dtype at the reference's values + 0.3."""
    finite = xp.isfinite(ref)
    r = xp.where(finite, ref, 0.0)
    shifted = r + 0.3
    if np.dtype(dtype).itemsize < 4:  # to 16 bits by way of float32, the conversion every backend has
        shifted = shifted.astype(np.float32)
    err = xp.abs(shifted.astype(dtype).astype(np.float64) - 0.3 - r)
    return 2.0 * float(err.max()) if err.size else 0.0


def _amax(xp, ref) -> float:
    r = xp.abs(xp.where(xp.isfinite(ref), ref, 0.0))
    return float(r.max()) if r.size else 0.0


#: largest score matrix (seqlen_q x seqlen_k, one head) the float64 reference materialises:
#: 2 GiB in float64; 16384 x 16384 fits, longer problems check their last query rows only
MAX_REFERENCE_SCORES = 2**28


def _slices(batch: int, heads: int, heads_kv: int, max_batch: int | None, max_heads: int | None):
    """(batch, query heads, their kv head) index triples to check one by one: the first
    ``max_batch`` batch elements (together when that is all of them), and the first kv heads,
    each with its group of query heads, up to ``max_heads`` query heads (at least one group).
    Everything at once when both are None."""
    if max_batch is None and max_heads is None:
        yield slice(None), slice(None), slice(None)
        return
    group = heads // heads_kv
    nb = batch if max_batch is None else min(max_batch, batch)
    nkv = heads_kv if max_heads is None else min(heads_kv, max(1, max_heads // group))
    for b in [slice(None)] if nb == batch else [slice(b, b + 1) for b in range(nb)]:
        for g in range(nkv):
            yield b, slice(g * group, (g + 1) * group), slice(g, g + 1)


def _query_rows(seqlen_q: int, seqlen_k: int, heads: int = 1) -> slice:
    """The query rows to check: all, or the last ones when the score matrix of ``heads``
    heads is too large.

    Taking the *last* rows keeps the bottom-right alignment of the causal mask, the window
    and ALiBi (row i of the slice is row seqlen_q - m + i of the problem, and
    seqlen_k - m + i == i + seqlen_k - seqlen_q). out, lse and dq of a row depend only on
    that row's q and dout, so they stay exact.
    """
    m = max(1, MAX_REFERENCE_SCORES // max(seqlen_k * heads, 1))
    return slice(None) if seqlen_q <= m else slice(seqlen_q - m, None)


OUTPUT_NAMES = ("out", "lse", "dq", "dk", "dv", "dsinks")
GRAD_NAMES = ("dq", "dk", "dv", "dsinks")  # dsinks only with sinks


def _sliced_variants(variants: dict, b: slice, heads: slice) -> dict:
    """The variants' arguments for the batch elements ``b`` and query heads ``heads``."""
    kw = dict(variants)
    if "sinks" in kw:
        kw["sinks"] = kw["sinks"][heads]
    if "alibi_slopes" in kw:
        slopes = kw["alibi_slopes"]
        kw["alibi_slopes"] = slopes[heads] if slopes.ndim == 1 else slopes[b, heads]
    return kw


def check_outputs(outputs: dict, inputs: Inputs, causal: bool, xp, *,
                  max_batch: int | None = 1, max_heads: int | None = 2) -> list[Check]:
    """Check ``outputs`` (any of out, lse, dq, dk, dv, dsinks, full size) against the reference.

    The reference is :mod:`cupyflash.reference` in float64, with the inputs' variants, on
    the first ``max_batch`` batch elements and ``max_heads`` query heads, one kv head and its
    group of query heads at a time (None: everything at once); beyond MAX_REFERENCE_SCORES
    scores per slice only the last query rows are checked, and dk, dv, dsinks (which need
    every row) are left out, as is dsinks when not every batch element is checked. Each
    tensor's bound is ``2 * (error of naive attention in the input precision) + flash-attn's
    rounding atol + ATOL_FLOOR[dtype] * max(1, max|ref|)``.
    """
    from .. import reference

    dtype = inputs.q.dtype
    batch, heads, heads_kv = inputs.q.shape[0], inputs.q.shape[2], inputs.k.shape[2]
    rows = _query_rows(inputs.q.shape[1], inputs.k.shape[1], heads // heads_kv)
    every_row = rows == slice(None)
    every_batch = max_batch is None or max_batch >= batch
    names = [n for n in OUTPUT_NAMES if n in outputs
             and (every_row or n not in ("dk", "dv", "dsinks")) and (every_batch or n != "dsinks")]
    err = dict.fromkeys(names, 0.0)
    naive_err = dict.fromkeys(names, 0.0)
    atol = dict.fromkeys(names, 0.0)
    amax = dict.fromkeys(names, 0.0)
    for b, hq, hkv in _slices(batch, heads, heads_kv, max_batch, max_heads):
        q, do = (x[b, rows, hq] for x in (inputs.q, inputs.dout))
        k, v = (x[b, :, hkv] for x in (inputs.k, inputs.v))
        kw = dict(causal=causal, softmax_scale=inputs.scale, **_sliced_variants(inputs.variants, b, hq))
        ref, naive = {}, {}
        if "out" in names or "lse" in names:
            ref["out"], ref["lse"] = reference.attention(q, k, v, upcast=True, **kw)
            naive["out"], naive["lse"] = reference.attention(q, k, v, upcast=False, **kw)
        if set(GRAD_NAMES) & set(names):
            ref.update(zip(GRAD_NAMES, reference.attention_backward(do, q, k, v, upcast=True, **kw)))
            naive.update(zip(GRAD_NAMES, reference.attention_backward(do, q, k, v, upcast=False, **kw)))
        for n in names:
            if n == "lse":  # (batch, heads, seqlen_q)
                actual = outputs[n][b, hq, rows]
            elif n == "dsinks":  # (heads,)
                actual = outputs[n][hq]
            else:
                actual = outputs[n][b, rows, hq] if n in ("out", "dq") else outputs[n][b, :, hkv]
            err[n] = max(err[n], _max_err(xp, actual, ref[n]))
            naive_err[n] = max(naive_err[n], _max_err(xp, naive[n], ref[n]))
            atol[n] = max(atol[n], _rounding_atol(xp, ref[n], actual.dtype))
            amax[n] = max(amax[n], _amax(xp, ref[n]))
        del ref, naive
    floor = ATOL_FLOOR[dtype_name(dtype)]
    return [Check(n, err[n], 2 * naive_err[n] + atol[n] + floor * max(1.0, amax[n])) for n in names]
