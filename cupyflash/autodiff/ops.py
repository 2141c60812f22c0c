"""Differentiable array ops: arithmetic, reductions and shapes, elementwise functions."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .tensor import (
    Tensor, _as_tensor, _check_same_backend, _is_array, _needs, _normalize_axes, _unbroadcast, _val,
    _xp, record)


# ---- arithmetic

def add(a, b) -> Tensor:
    """``a + b`` with NumPy broadcasting."""
    av, bv = _val(a), _val(b)
    _check_same_backend(av, bv)
    na, nb = _needs(a), _needs(b)
    sa, sb = getattr(av, "shape", ()), getattr(bv, "shape", ())

    def backward(g):
        return (_unbroadcast(g, sa) if na else None, _unbroadcast(g, sb) if nb else None)
    return record(av + bv, (a, b), backward, op="add")


def subtract(a, b) -> Tensor:
    """``a - b`` with NumPy broadcasting."""
    av, bv = _val(a), _val(b)
    _check_same_backend(av, bv)
    na, nb = _needs(a), _needs(b)
    sa, sb = getattr(av, "shape", ()), getattr(bv, "shape", ())

    def backward(g):
        return (_unbroadcast(g, sa) if na else None, _unbroadcast(-g, sb) if nb else None)
    return record(av - bv, (a, b), backward, op="subtract")


def multiply(a, b) -> Tensor:
    """``a * b`` with NumPy broadcasting."""
    av, bv = _val(a), _val(b)
    _check_same_backend(av, bv)
    na, nb = _needs(a), _needs(b)
    sa, sb = getattr(av, "shape", ()), getattr(bv, "shape", ())

    def backward(g, av, bv):
        return (_unbroadcast(g * bv, sa) if na else None, _unbroadcast(g * av, sb) if nb else None)
    return record(av * bv, (a, b), backward, saved=(av if nb else None, bv if na else None),
                  op="multiply")


def divide(a, b) -> Tensor:
    """``a / b`` with NumPy broadcasting."""
    av, bv = _val(a), _val(b)
    _check_same_backend(av, bv)
    na, nb = _needs(a), _needs(b)
    sa, sb = getattr(av, "shape", ()), getattr(bv, "shape", ())
    out = av / bv

    def backward(g, bv, out):
        ga = _unbroadcast(g / bv, sa) if na else None
        gb = _unbroadcast(-g * out / bv, sb) if nb else None
        return ga, gb
    return record(out, (a, b), backward, saved=(bv, out if nb else None), op="divide")


def negative(a) -> Tensor:
    """``-a``."""
    return record(-_val(a), (a,), lambda g: (-g,), op="negative")


def power(a, b) -> Tensor:
    """``a ** b`` with NumPy broadcasting (a > 0 where b needs a gradient)."""
    av, bv = _val(a), _val(b)
    _check_same_backend(av, bv)
    na, nb = _needs(a), _needs(b)
    sa, sb = getattr(av, "shape", ()), getattr(bv, "shape", ())
    out = av ** bv

    def backward(g, av, bv, out):
        ga = _unbroadcast(g * bv * av ** (bv - 1), sa) if na else None
        gb = None
        if nb:
            log_a = _xp(out).log(av) if _is_array(av) else math.log(av)
            gb = _unbroadcast(g * out * log_a, sb)
        return ga, gb
    return record(out, (a, b), backward, saved=(av, bv, out if nb else None), op="power")


def matmul(a, b) -> Tensor:
    """``a @ b``: batched over leading axes with broadcasting; 1-D operands as in NumPy."""
    av, bv = _val(a), _val(b)
    _check_same_backend(av, bv)
    for name, value in (("a", av), ("b", bv)):
        if not _is_array(value) or value.ndim == 0:
            raise ValueError(f"matmul: {name} must be an array with at least one dimension")
    na, nb = _needs(a), _needs(b)
    a_shape, b_shape = av.shape, bv.shape
    a_vector, b_vector = len(a_shape) == 1, len(b_shape) == 1

    def backward(g, av, bv):
        # Treat vectors as (1, n) and (n, 1) matrices, as numpy does, then undo it.
        if a_vector and b_vector:
            g2 = g.reshape(1, 1)
        elif a_vector:
            g2 = g[..., None, :]
        elif b_vector:
            g2 = g[..., None]
        else:
            g2 = g
        ga = gb = None
        if na:
            b2 = bv[:, None] if b_vector else bv
            ga = _unbroadcast(g2 @ b2.swapaxes(-1, -2), ((1,) if a_vector else ()) + a_shape)
            ga = ga.reshape(a_shape)
        if nb:
            a2 = av[None, :] if a_vector else av
            gb = _unbroadcast(a2.swapaxes(-1, -2) @ g2, b_shape + ((1,) if b_vector else ()))
            gb = gb.reshape(b_shape)
        return ga, gb
    return record(av @ bv, (a, b), backward, saved=(av if nb else None, bv if na else None),
                  op="matmul")


# ---- reductions, shapes

def sum(a, axis=None, keepdims: bool = False) -> Tensor:
    """Sum over ``axis`` (an int, a tuple, or None for all)."""
    x = _as_tensor(a)
    axes = _normalize_axes(axis, x.ndim)
    shape = x.shape
    kept = tuple(1 if i in axes else n for i, n in enumerate(shape))

    def backward(g):
        return (_xp(g).broadcast_to(g.reshape(kept), shape),)
    return record(x.data.sum(axis=axes, keepdims=keepdims), (a,), backward, op="sum")


def mean(a, axis=None, keepdims: bool = False) -> Tensor:
    """Mean over ``axis`` (an int, a tuple, or None for all)."""
    x = _as_tensor(a)
    axes = _normalize_axes(axis, x.ndim)
    shape = x.shape
    kept = tuple(1 if i in axes else n for i, n in enumerate(shape))
    count = math.prod(shape[i] for i in axes)

    def backward(g):
        return (_xp(g).broadcast_to(g.reshape(kept) / count, shape),)
    return record(x.data.mean(axis=axes, keepdims=keepdims), (a,), backward, op="mean")


def reshape(a, shape) -> Tensor:
    """``a.reshape(shape)`` (a view when NumPy can make one)."""
    x = _as_tensor(a)
    in_shape = x.shape
    return record(x.data.reshape(shape), (a,), lambda g: (g.reshape(in_shape),), op="reshape")


def transpose(a, axes=None) -> Tensor:
    """Permute axes (reverse them when ``axes`` is None)."""
    x = _as_tensor(a)
    axes = tuple(range(x.ndim))[::-1] if axes is None else tuple(int(i) % x.ndim for i in axes)
    if sorted(axes) != list(range(x.ndim)):
        raise ValueError(f"axes {axes} is not a permutation of the {x.ndim} axes")
    inverse = tuple(int(i) for i in np.argsort(axes))
    return record(x.data.transpose(axes), (a,), lambda g: (g.transpose(inverse),), op="transpose")


def _index_items(index) -> tuple:
    return index if isinstance(index, tuple) else (index,)


def _picks_each_element_once(index) -> bool:
    """True without integer-array indices: then a[index] never repeats an element, and the
    gradient can be written by assignment instead of accumulated with add.at."""
    return not any(_is_array(i) and i.dtype.kind in "iu" for i in _index_items(index))


def _masks_to_integers(index) -> tuple:
    """Replace boolean masks by their nonzero() integer arrays (same selection)."""
    out = []
    for i in _index_items(index):
        if _is_array(i) and i.dtype.kind == "b":
            out.extend(i.nonzero())
        else:
            out.append(i)
    return tuple(out)


def getitem(a, index) -> Tensor:
    """``a[index]``: slices, integers, integer arrays (repeats accumulate) and masks."""
    x = _as_tensor(a)
    xp = x.xp
    items = tuple(i.data if isinstance(i, Tensor) else xp.asarray(i) if isinstance(i, list) else i
                  for i in _index_items(index))
    index = items if isinstance(index, tuple) else items[0]
    shape = x.shape
    once = _picks_each_element_once(index)
    scatter_index = None if once else _masks_to_integers(index)

    def backward(g, *index_arrays):
        gx = _xp(g).zeros(shape, dtype=g.dtype)
        if once:
            gx[index] = g
        else:
            _xp(g).add.at(gx, scatter_index, g)
        return (gx,)
    index_arrays = tuple(i for i in items if _is_array(i))
    return record(x.data[index], (a,), backward, saved=index_arrays, op="getitem")


def take(a, indices, axis=None) -> Tensor:
    """``numpy.take``: pick entries along ``axis`` (of the flattened array when None)."""
    x = _as_tensor(a)
    if isinstance(indices, Tensor):
        indices = indices.data
    if axis is None:
        return getitem(reshape(x, (-1,)), indices)
    axis = _normalize_axes(axis, x.ndim)[0]
    return getitem(x, (slice(None),) * axis + (indices,))


def embedding(weight, ids) -> Tensor:
    """Rows of ``weight`` (vocab, dim) picked by the integer array ``ids``: shape ids.shape + (dim,)."""
    ids = ids.data if isinstance(ids, Tensor) else ids
    if not _is_array(ids) or ids.dtype.kind not in "iu":
        raise TypeError(f"ids must be an integer array, got {getattr(ids, 'dtype', type(ids).__name__)}")
    return getitem(weight, ids)


def concatenate(tensors: Sequence, axis: int = 0) -> Tensor:
    """Join tensors along an existing axis."""
    tensors = list(tensors)
    values = [_val(t) for t in tensors]
    _check_same_backend(*values)
    xp = _xp(values[0])
    out = xp.concatenate(values, axis=axis)
    axis = axis % out.ndim
    bounds = np.cumsum([0] + [v.shape[axis] for v in values])
    needs = [_needs(t) for t in tensors]

    def backward(g):
        return tuple(g[(slice(None),) * axis + (slice(int(lo), int(hi)),)] if n else None
                     for lo, hi, n in zip(bounds[:-1], bounds[1:], needs))
    return record(out, tensors, backward, op="concatenate")


def astype(a, dtype) -> Tensor:
    """Cast to ``dtype``; the gradient is cast back."""
    x = _as_tensor(a)
    in_dtype = x.dtype
    return record(x.data.astype(dtype), (a,), lambda g: (g.astype(in_dtype),), op="astype")


# ---- elementwise

def exp(a) -> Tensor:
    """Elementwise ``e**a``."""
    x = _as_tensor(a)
    y = x.xp.exp(x.data)
    return record(y, (a,), lambda g, y: (g * y,), saved=(y,), op="exp")


def log(a) -> Tensor:
    """Elementwise natural logarithm."""
    x = _as_tensor(a)
    return record(x.xp.log(x.data), (a,), lambda g, x: (g / x,), saved=(x.data,), op="log")


def tanh(a) -> Tensor:
    """Elementwise hyperbolic tangent."""
    x = _as_tensor(a)
    y = x.xp.tanh(x.data)
    return record(y, (a,), lambda g, y: (g * (1 - y * y),), saved=(y,), op="tanh")


def relu(a) -> Tensor:
    """Elementwise ``max(a, 0)`` (gradient 0 at 0)."""
    x = _as_tensor(a)
    positive = x.data > 0
    return record(x.data * positive, (a,), lambda g, p: (g * p,), saved=(positive,), op="relu")


_GELU_C = math.sqrt(2.0 / math.pi)


def gelu(a) -> Tensor:
    """GELU, tanh approximation (GPT-2): ``0.5 a (1 + tanh(sqrt(2/pi) (a + 0.044715 a^3)))``."""
    x = _as_tensor(a)
    xp, xv = x.xp, x.data
    t = xp.tanh(_GELU_C * (xv + 0.044715 * xv ** 3))

    def backward(g, xv):
        t = _xp(xv).tanh(_GELU_C * (xv + 0.044715 * xv ** 3))
        dt = (1 - t * t) * _GELU_C * (1 + 3 * 0.044715 * xv * xv)
        return (g * (0.5 * (1 + t) + 0.5 * xv * dt),)
    return record(0.5 * xv * (1 + t), (a,), backward, saved=(xv,), op="gelu")


def softmax(a, axis: int = -1) -> Tensor:
    """``exp(a) / sum(exp(a))`` along ``axis``, computed stably."""
    x = _as_tensor(a)
    xp = x.xp
    z = xp.exp(x.data - x.data.max(axis=axis, keepdims=True))
    y = z / z.sum(axis=axis, keepdims=True)

    def backward(g, y):
        return (y * (g - (g * y).sum(axis=axis, keepdims=True)),)
    return record(y, (a,), backward, saved=(y,), op="softmax")


def _log_softmax_data(xv, axis):
    xp = _xp(xv)
    shifted = xv - xv.max(axis=axis, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))


def log_softmax(a, axis: int = -1) -> Tensor:
    """``a - logsumexp(a)`` along ``axis``."""
    x = _as_tensor(a)
    y = _log_softmax_data(x.data, axis)

    def backward(g, y):
        return (g - _xp(y).exp(y) * g.sum(axis=axis, keepdims=True),)
    return record(y, (a,), backward, saved=(y,), op="log_softmax")
