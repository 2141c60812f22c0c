"""Layers' math on the tape: normalisation, losses and dropout."""
from __future__ import annotations


import numpy as np

from .tensor import (
    Tensor, _as_tensor, _check_same_backend, _is_array, _is_cupy, _needs, _unbroadcast, _val, _xp,
    record)
from .ops import _log_softmax_data


# ---- normalisation

def layer_norm(a, weight=None, bias=None, eps: float = 1e-5) -> Tensor:
    """Normalise over the last axis to zero mean and unit variance, then ``* weight + bias``."""
    x = _as_tensor(a)
    xp, xv = x.xp, x.data
    mu = xv.mean(axis=-1, keepdims=True)
    rstd = 1.0 / xp.sqrt(((xv - mu) ** 2).mean(axis=-1, keepdims=True) + eps)
    xhat = (xv - mu) * rstd
    wv = _val(weight) if weight is not None else None
    bv = _val(bias) if bias is not None else None
    y = xhat if wv is None else xhat * wv
    y = y if bv is None else y + bv
    nx, nw, nb = _needs(a), _needs(weight), _needs(bias)
    wshape, bshape = getattr(wv, "shape", ()), getattr(bv, "shape", ())

    def backward(g, xhat, rstd, wv):
        dxhat = g if wv is None else g * wv
        gx = None
        if nx:
            gx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                         - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
        gw = _unbroadcast(g * xhat, wshape) if nw else None
        gb = _unbroadcast(g, bshape) if nb else None
        return gx, gw, gb
    return record(y, (a, weight, bias), backward, saved=(xhat, rstd, wv), op="layer_norm")


def rms_norm(a, weight=None, eps: float = 1e-6) -> Tensor:
    """``a / sqrt(mean(a^2) + eps) * weight`` over the last axis."""
    x = _as_tensor(a)
    xp, xv = x.xp, x.data
    rstd = 1.0 / xp.sqrt((xv * xv).mean(axis=-1, keepdims=True) + eps)
    xhat = xv * rstd
    wv = _val(weight) if weight is not None else None
    y = xhat if wv is None else xhat * wv
    nx, nw = _needs(a), _needs(weight)
    wshape = getattr(wv, "shape", ())

    def backward(g, xhat, rstd, wv):
        dxhat = g if wv is None else g * wv
        gx = rstd * (dxhat - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)) if nx else None
        gw = _unbroadcast(g * xhat, wshape) if nw else None
        return gx, gw
    return record(y, (a, weight), backward, saved=(xhat, rstd, wv), op="rms_norm")


# ---- losses, dropout

def cross_entropy(logits, targets, *, reduction: str = "mean", ignore_index: int | None = None) -> Tensor:
    """Softmax cross-entropy of ``logits`` (..., classes) against integer ``targets`` (...).

    Parameters
    ----------
    reduction : {"mean", "sum", "none"}
        "mean" averages over the targets that are not ``ignore_index``.
    ignore_index : int, optional
        Targets equal to it contribute no loss and no gradient.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    x = _as_tensor(logits)
    t = targets.data if isinstance(targets, Tensor) else targets
    if not _is_array(t) or t.dtype.kind not in "iu":
        raise TypeError(f"targets must be an integer array, got {getattr(t, 'dtype', type(t).__name__)}")
    if tuple(t.shape) != x.shape[:-1]:
        raise ValueError(f"targets has shape {tuple(t.shape)} but logits has shape {x.shape}: targets "
                         "must have the shape of logits without its last (class) axis")
    _check_same_backend(x.data, t)
    xp = x.xp
    keep = None if ignore_index is None else (t != ignore_index)
    safe_t = t if keep is None else xp.where(keep, t, 0)
    lsm = _log_softmax_data(x.data, -1)
    nll = -xp.take_along_axis(lsm, safe_t[..., None], axis=-1)[..., 0]
    if keep is not None:
        nll = nll * keep
    count = None
    if reduction == "mean":
        count = nll.dtype.type(nll.size) if keep is None else keep.sum().astype(nll.dtype)
        out = nll.sum() / count
    elif reduction == "sum":
        out = nll.sum()
    else:
        out = nll
    classes = x.shape[-1]

    def backward(g, lsm, safe_t, keep):
        xp = _xp(lsm)
        d = xp.exp(lsm) - (xp.arange(classes) == safe_t[..., None])
        scale = g[..., None] if reduction == "none" else g
        if reduction == "mean":
            scale = scale / count
        if keep is not None:
            d = d * keep[..., None]
        return (d * scale,)
    return record(out, (logits,), backward, saved=(lsm, safe_t, keep), op="cross_entropy")


def dropout(a, p: float, *, rng, training: bool = True) -> Tensor:
    """Zero each element with probability ``p`` and scale the rest by ``1 / (1 - p)``.

    Parameters
    ----------
    p : float
        Drop probability, 0 <= p < 1.
    rng : int or Generator
        An integer seed (the same seed gives the same mask: use this inside
        :func:`checkpoint`, whose recomputation must see the same mask) or a
        ``numpy.random.Generator`` / ``cupy.random.Generator`` on the array's device.
    training : bool
        When false, dropout is the identity.
    """
    if not isinstance(p, (int, float, np.floating)) or not 0.0 <= float(p) < 1.0:
        raise ValueError(f"p must be a probability with 0 <= p < 1, got {p!r}")
    x = _as_tensor(a)
    if not training or p == 0:
        return x
    xp = x.xp
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        gen = xp.random.default_rng(int(rng))
    elif hasattr(rng, "random"):
        gen = rng
    else:
        raise TypeError(f"rng must be an integer seed or a random Generator, got {type(rng).__name__}")
    u = gen.random(x.shape, dtype=np.float32)
    if _is_cupy(u) != _is_cupy(x.data):
        raise TypeError("rng makes arrays on a different device than the tensor: pass a "
                        f"{'cupy' if _is_cupy(x.data) else 'numpy'} Generator or an integer seed")
    keep = u >= p
    scale = 1.0 / (1.0 - float(p))
    return record(x.data * keep * scale, (a,), lambda g, keep: (g * keep * scale,),
                  saved=(keep,), op="dropout")
