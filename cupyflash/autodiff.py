"""A small reverse-mode autodiff tape on numpy and cupy arrays, with FlashAttention as an op.

The design is micrograd's, with two changes that matter for memory:

- A :class:`Tensor` holds an array (``data``), its gradient (``grad``) and, when it was
  computed from tensors that need gradients, a reference to the tape node that made it.
- A tape node keeps only what its backward needs (``saved``: the arrays named by the op)
  and edges to its inputs' nodes, never the input tensors themselves. Intermediate results
  that no backward needs are freed as soon as the caller drops them, as in PyTorch. So the
  memory the graph holds between forward and backward is exactly the sum of the saved
  arrays (:func:`graph_nbytes`), and ``flash_attention`` holds only q, k, v, out and lse.

``Tensor.backward()`` sorts the nodes reachable from the output topologically and replays
them in reverse; gradients of leaves (tensors created with ``requires_grad=True``)
accumulate into ``leaf.grad`` (a leaf used twice gets the sum). Each node is released as
soon as its backward has run, unless ``retain_graph=True``.

Every op runs on numpy arrays (CPU) or cupy arrays (GPU) by the same code: the array type
picks the module. Broadcasting follows NumPy; the gradient of a broadcast input is summed
back over the broadcast axes.

Example
-------
>>> import numpy as np
>>> from cupyflash import autodiff as ad
>>> w = ad.Tensor(np.ones((3, 2)), requires_grad=True)
>>> x = np.arange(6.0).reshape(2, 3)
>>> loss = ad.mean(ad.tanh(x @ w))
>>> loss.backward()
>>> w.grad.shape
(3, 2)
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Callable, Sequence

import numpy as np

from ._dtypes import BFLOAT16

__all__ = [
    "Tensor", "tensor", "record", "no_grad", "enable_grad", "is_grad_enabled", "grad",
    "checkpoint", "graph_nbytes",
    "add", "subtract", "multiply", "divide", "negative", "power", "matmul",
    "sum", "mean", "reshape", "transpose", "getitem", "take", "embedding", "concatenate",
    "astype", "exp", "log", "tanh", "relu", "gelu", "softmax", "log_softmax",
    "layer_norm", "rms_norm", "cross_entropy", "dropout",
    "flash_attention", "flash_attention_varlen", "naive_attention",
]


# --------------------------------------------------------------------------- grad mode

class _State(threading.local):
    def __init__(self):
        self.grad_enabled = True
        # Set by checkpoint() while it runs fn without recording: becomes [True] when an op
        # inside saw an input that requires grad, so the checkpoint output must be on the tape.
        self.probe = None


_state = _State()


@contextlib.contextmanager
def _grad_mode(enabled: bool):
    previous = _state.grad_enabled
    _state.grad_enabled = enabled
    try:
        yield
    finally:
        _state.grad_enabled = previous


def no_grad():
    """Context manager (or decorator) in which ops record nothing: results are constants.

    Use it for evaluation and for parameter updates.
    """
    return _grad_mode(False)


def enable_grad():
    """Context manager (or decorator) that turns recording back on inside :func:`no_grad`."""
    return _grad_mode(True)


def is_grad_enabled() -> bool:
    """Whether ops called now are recorded on the tape."""
    return _state.grad_enabled


# --------------------------------------------------------------------------- arrays

def _is_cupy(a) -> bool:
    return type(a).__module__.startswith("cupy")


def _xp(a):
    """numpy for numpy arrays and scalars, cupy for cupy arrays."""
    if isinstance(a, (np.ndarray, np.generic)):
        return np
    if _is_cupy(a):
        import cupy
        return cupy
    return np


def _is_array(a) -> bool:
    return isinstance(a, np.ndarray) or (_is_cupy(a) and hasattr(a, "shape"))


def _to_array(data, name="data"):
    """numpy / cupy arrays pass through; Python scalars, lists and numpy scalars become numpy."""
    if isinstance(data, np.ndarray) or _is_cupy(data):
        return data
    if isinstance(data, (np.generic, int, float, bool, list, tuple)):
        return np.asarray(data)
    from ._checks import as_array  # __dlpack__ / __cuda_array_interface__ objects
    return as_array(data, name)


def _is_float(dtype) -> bool:
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or dtype == BFLOAT16


def _owner(a):
    """The array that owns a view's memory (views of one buffer count once)."""
    while isinstance(getattr(a, "base", None), type(a)):
        a = a.base
    return a


# --------------------------------------------------------------------------- the tape

class _Node:
    """One recorded op: edges to its inputs, the arrays its backward needs, the backward.

    ``edges[i]`` is the node that produced input i, the leaf Tensor itself when input i is
    a leaf that requires grad, or None when input i needs no gradient (a constant).
    ``backward(g, *saved)`` returns one gradient (or None) per input.
    """
    __slots__ = ("edges", "shapes", "saved", "backward", "op")

    def __init__(self, edges, shapes, saved, backward, op):
        self.edges = edges
        self.shapes = shapes
        self.saved = saved
        self.backward = backward
        self.op = op

    def release(self):
        self.edges, self.saved, self.backward = (), (), None

    def __repr__(self):
        return f"<tape node {self.op}>"


class Tensor:
    """An array on the tape: ``data`` (numpy or cupy), ``grad`` and ``requires_grad``.

    Parameters
    ----------
    data : array-like
        A numpy or cupy array (kept, not copied), or anything ``numpy.asarray`` accepts.
    requires_grad : bool
        Make this a leaf whose gradient ``backward()`` accumulates into ``.grad``.
        Only floating-point tensors can require gradients.
    """
    __slots__ = ("data", "grad", "requires_grad", "_node", "__weakref__")
    __array_ufunc__ = None       # numpy_array + tensor -> Tensor.__radd__
    __array_priority__ = 1000.0  # the same for cupy arrays

    def __init__(self, data, requires_grad: bool = False):
        if isinstance(data, Tensor):
            data = data.data
        data = _to_array(data)
        if requires_grad and not _is_float(data.dtype):
            raise TypeError(f"only floating-point tensors can require gradients, got dtype {data.dtype}")
        self.data = data
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._node = None

    @classmethod
    def _wrap(cls, data) -> "Tensor":
        t = cls.__new__(cls)
        t.data = np.asarray(data) if isinstance(data, np.generic) else data
        t.grad = None
        t.requires_grad = False
        t._node = None
        return t

    # ---- array facts
    shape = property(lambda self: tuple(self.data.shape))
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)
    is_leaf = property(lambda self: self._node is None, doc="True for tensors made by the user, not by an op")
    xp = property(lambda self: _xp(self.data), doc="numpy or cupy, whichever holds data")
    T = property(lambda self: transpose(self))

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        where = "cupy" if _is_cupy(self.data) else "numpy"
        tape = f", op={self._node.op}" if self._node is not None else (
            ", requires_grad=True" if self.requires_grad else "")
        return f"Tensor({where} {self.data.dtype} {self.shape}{tape})"

    def numpy(self) -> np.ndarray:
        """The data as a numpy array (copied from the GPU for cupy tensors)."""
        return self.data.get() if _is_cupy(self.data) else self.data

    def item(self) -> float:
        return self.data.item()

    def detach(self) -> "Tensor":
        """The same data as a constant, off the tape."""
        return Tensor._wrap(self.data)

    def zero_grad(self):
        self.grad = None

    def backward(self, grad=None, *, retain_graph: bool = False):
        """Accumulate d(self)/d(leaf) into ``leaf.grad`` for every leaf on the tape.

        Parameters
        ----------
        grad : array or Tensor, optional
            The seed gradient, with self's shape. Needed unless self has one element.
        retain_graph : bool
            Keep the tape so that backward can run through it again.
        """
        seed = _seed_for(self, grad, "grad")
        _run_backward([self], [seed], retain_graph=retain_graph)

    # ---- operators
    __add__ = lambda self, other: add(self, other)
    __radd__ = lambda self, other: add(other, self)
    __sub__ = lambda self, other: subtract(self, other)
    __rsub__ = lambda self, other: subtract(other, self)
    __mul__ = lambda self, other: multiply(self, other)
    __rmul__ = lambda self, other: multiply(other, self)
    __truediv__ = lambda self, other: divide(self, other)
    __rtruediv__ = lambda self, other: divide(other, self)
    __pow__ = lambda self, other: power(self, other)
    __rpow__ = lambda self, other: power(other, self)
    __matmul__ = lambda self, other: matmul(self, other)
    __rmatmul__ = lambda self, other: matmul(other, self)
    __neg__ = lambda self: negative(self)
    __getitem__ = lambda self, index: getitem(self, index)

    # ---- methods
    def sum(self, axis=None, keepdims=False):
        return sum(self, axis=axis, keepdims=keepdims)

    def mean(self, axis=None, keepdims=False):
        return mean(self, axis=axis, keepdims=keepdims)

    def reshape(self, *shape):
        return reshape(self, shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape)

    def transpose(self, *axes):
        return transpose(self, axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else (axes or None))

    def astype(self, dtype):
        return astype(self, dtype)

    exp = lambda self: exp(self)
    log = lambda self: log(self)
    tanh = lambda self: tanh(self)
    relu = lambda self: relu(self)
    softmax = lambda self, axis=-1: softmax(self, axis)
    log_softmax = lambda self, axis=-1: log_softmax(self, axis)


def tensor(data, requires_grad: bool = False) -> Tensor:
    """``Tensor(data, requires_grad)``."""
    return Tensor(data, requires_grad=requires_grad)


def _needs(x) -> bool:
    return isinstance(x, Tensor) and x.requires_grad


def _val(x):
    """The raw value of an op input: a tensor's array, an array, or a Python scalar."""
    if isinstance(x, Tensor):
        return x.data
    if isinstance(x, np.generic):  # numpy scalars would upcast float32 data (NEP 50)
        return x.item()
    if isinstance(x, (int, float)) or _is_array(x):
        return x
    return _to_array(x)


def _as_tensor(x) -> Tensor:
    return x if isinstance(x, Tensor) else Tensor._wrap(_to_array(x))


def record(data, inputs: Sequence, backward: Callable, saved: Sequence = (), op: str = "op",
           force: bool = False) -> Tensor:
    """Wrap ``data`` as the output of an op, recording the op on the tape when needed.

    This is how every op here is written, and how to add one.

    Parameters
    ----------
    data : array
        The op's result.
    inputs : sequence
        The op's inputs (tensors, arrays or scalars; only tensors can need gradients).
    backward : callable
        ``backward(g, *saved) -> tuple`` of one gradient per input (None where not
        needed), each with that input's shape. It must use only ``g``, ``saved`` and
        small non-array values: the tape keeps exactly ``saved`` alive.
    saved : sequence of arrays
        What backward needs.
    op : str
        A name for error messages and ``repr``.
    force : bool
        Record even when no input needs a gradient (used by :func:`checkpoint`, whose
        function may close over parameters that do).
    """
    out = Tensor._wrap(data)
    needs = [_needs(x) for x in inputs]
    if not (force or any(needs)):
        return out
    if not _state.grad_enabled:
        if _state.probe is not None:
            _state.probe[0] = True
        return out
    edges = tuple((x._node if x._node is not None else x) if n else None for x, n in zip(inputs, needs))
    shapes = tuple(x.shape if n else None for x, n in zip(inputs, needs))
    out.requires_grad = True
    out._node = _Node(edges, shapes, tuple(saved), backward, op)
    return out


def _seed_for(t: Tensor, grad, name: str):
    """The seed gradient for backward from t: checked, on t's backend, in t's dtype."""
    if not isinstance(t, Tensor):
        raise TypeError(f"expected a Tensor to differentiate, got {type(t).__name__}")
    if not t.requires_grad:
        raise RuntimeError(
            f"{t!r} is not on the tape: it does not depend on any tensor with requires_grad=True, "
            "or it was computed under no_grad(), so it has no gradient to propagate")
    xp = t.xp
    if grad is None:
        if t.size != 1:
            raise ValueError(
                f"backward of a non-scalar tensor (shape {t.shape}) needs a seed gradient: pass "
                f"{name}= an array of shape {t.shape} (d(objective)/d(tensor))")
        return xp.ones(t.shape, dtype=t.dtype)
    g = grad.data if isinstance(grad, Tensor) else grad
    if _is_cupy(g) and xp is np:
        raise TypeError(f"{name} is a cupy array but the tensor holds a numpy array")
    g = xp.asarray(g)
    if tuple(g.shape) != t.shape:
        raise ValueError(f"{name} has shape {tuple(g.shape)} but the tensor has shape {t.shape}: "
                         "the seed gradient must have the shape of the tensor it seeds")
    if not _is_float(g.dtype):
        raise TypeError(f"{name} must be a floating-point array, got dtype {g.dtype}")
    return g.astype(t.dtype, copy=False)


def _topological_order(roots) -> list:
    """Nodes reachable from roots, each after all nodes it consumes (iterative DFS)."""
    order, visited = [], set()
    for root in roots:
        stack = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                order.append(node)
                continue
            if id(node) in visited:
                continue
            if node.backward is None:
                raise RuntimeError(
                    f"the tape behind this tensor was freed by an earlier backward() (at op "
                    f"{node.op}); pass retain_graph=True to the first backward() to run it twice")
            visited.add(id(node))
            stack.append((node, True))
            stack.extend((e, False) for e in node.edges if isinstance(e, _Node) and id(e) not in visited)
    return order


def _accumulate_leaf(leaf: Tensor, g):
    xp = leaf.xp
    g = xp.array(g, dtype=leaf.dtype, copy=True)  # own buffer: grads may be views or shared
    leaf.grad = g if leaf.grad is None else leaf.grad + g


def _run_backward(roots, seeds, retain_graph=False, capture=None):
    """Replay the tape from roots in reverse topological order.

    With ``capture`` (a dict keyed by id of a node or leaf), gradients reaching those keys
    are stored there and no ``.grad`` is touched; otherwise leaves accumulate into .grad.
    """
    grads = {}
    for root, seed in zip(roots, seeds):
        key = root._node if root._node is not None else root
        if isinstance(key, Tensor):  # a leaf differentiated with respect to itself
            _deliver(key, seed, grads, capture)
        else:
            grads[id(key)] = seed if id(key) not in grads else grads[id(key)] + seed
    order = _topological_order([r._node for r in roots if r._node is not None])
    for node in reversed(order):
        g = grads.pop(id(node), None)
        if capture is not None and id(node) in capture:
            capture[id(node)] = g
        if g is not None:
            input_grads = node.backward(g, *node.saved)
            if len(input_grads) != len(node.edges):
                raise RuntimeError(f"backward of {node.op} returned {len(input_grads)} gradients "
                                   f"for {len(node.edges)} inputs")
            for edge, shape, gi in zip(node.edges, node.shapes, input_grads):
                if edge is None or gi is None:
                    continue
                if tuple(gi.shape) != shape:
                    raise RuntimeError(f"backward of {node.op} returned a gradient of shape "
                                       f"{tuple(gi.shape)} for an input of shape {shape}")
                _deliver(edge, gi, grads, capture)
        if not retain_graph:
            node.release()


def _deliver(edge, g, grads, capture):
    if isinstance(edge, Tensor):
        if capture is None:
            _accumulate_leaf(edge, g)
        elif id(edge) in capture:
            prev = capture[id(edge)]
            capture[id(edge)] = g if prev is None else prev + g
    else:
        key = id(edge)
        grads[key] = g if key not in grads else grads[key] + g


def grad(output: Tensor, inputs, seed=None, *, retain_graph: bool = False):
    """Gradients of ``output`` with respect to ``inputs``, returned, not accumulated.

    Parameters
    ----------
    output : Tensor
        What to differentiate (one element, or pass ``seed``).
    inputs : Tensor or sequence of Tensors
        Leaves or intermediate tensors on output's tape.
    seed : array, optional
        d(objective)/d(output), with output's shape.

    Returns
    -------
    One array per input (a single array when ``inputs`` is one Tensor). No ``.grad`` is
    modified, except by :func:`checkpoint` recomputations inside the graph, which
    accumulate into the parameters their function closes over.
    """
    single = isinstance(inputs, Tensor)
    inputs = [inputs] if single else list(inputs)
    g0 = _seed_for(output, seed, "seed")
    keys = [x._node if isinstance(x, Tensor) and x._node is not None else x for x in inputs]
    on_tape = set()
    if output._node is not None:
        for node in _topological_order([output._node]):
            on_tape.add(id(node))
            on_tape.update(id(e) for e in node.edges if isinstance(e, Tensor))
    else:
        on_tape.add(id(output))
    for i, (x, key) in enumerate(zip(inputs, keys)):
        if not isinstance(x, Tensor):
            raise TypeError(f"inputs[{i}] must be a Tensor, got {type(x).__name__}")
        if id(key) not in on_tape:
            raise ValueError(f"inputs[{i}] ({x!r}) is not on the tape of the output: the output "
                             "was not computed from it (or it does not require grad)")
    capture = {id(k): None for k in keys}
    _run_backward([output], [g0], retain_graph=retain_graph, capture=capture)
    result = []
    for x, key in zip(inputs, keys):
        g = capture[id(key)]
        result.append(x.xp.zeros(x.shape, x.dtype) if g is None else x.xp.asarray(g))
    return result[0] if single else result


def graph_nbytes(t: Tensor, include_leaves: bool = False) -> int:
    """Bytes of the arrays the tape behind ``t`` keeps for backward.

    Walks the graph and sums the ``nbytes`` of every saved array, counting each buffer
    once (views count as the buffer they view). Leaf data (parameters, inputs) is left
    out unless ``include_leaves``: the caller holds it anyway.
    """
    if t._node is None:
        return 0
    nodes = _topological_order([t._node])
    leaves = {id(_owner(e.data)) for n in nodes for e in n.edges if isinstance(e, Tensor)}
    seen, total = set(), 0
    for node in nodes:
        for a in node.saved:
            if not _is_array(a):
                continue
            owner = _owner(a)
            if id(owner) in seen or (id(owner) in leaves and not include_leaves):
                continue
            seen.add(id(owner))
            total += int(owner.nbytes)
    return total


# --------------------------------------------------------------------------- helpers

def _unbroadcast(g, shape):
    """Sum g over the axes along which an input of ``shape`` was broadcast."""
    shape = tuple(shape)
    if tuple(g.shape) == shape:
        return g
    lead = g.ndim - len(shape)
    if lead:
        g = g.sum(axis=tuple(range(lead)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g.reshape(shape)


def _normalize_axes(axis, ndim) -> tuple:
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    out = []
    for a in axes:
        a = int(a)
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of range for a tensor with {ndim} dimensions")
        out.append(a % ndim)
    return tuple(sorted(out))


def _check_same_backend(*values):
    kinds = {_is_cupy(v) for v in values if _is_array(v) and v.ndim > 0}
    if len(kinds) > 1:
        raise TypeError("cannot mix numpy and cupy arrays in one op: move them to one device first")


# --------------------------------------------------------------------------- arithmetic

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


# --------------------------------------------------------------------------- reductions, shapes

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


# --------------------------------------------------------------------------- elementwise

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


# --------------------------------------------------------------------------- normalisation

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


# --------------------------------------------------------------------------- losses, dropout

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


# --------------------------------------------------------------------------- attention

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
    from . import api, _checks
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
    from . import _checks, varlen
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


# --------------------------------------------------------------------------- recomputation

def checkpoint(fn: Callable, *args) -> Tensor:
    """Run ``fn(*args)`` without recording its insides; rerun it during backward.

    Activation recomputation: the tape keeps only the arguments of ``fn`` (not the
    activations inside it), and backward runs ``fn`` again with recording on to rebuild
    them, then backpropagates through the rebuilt piece. Parameters that ``fn`` closes
    over receive their gradients as usual.

    Parameters
    ----------
    fn : callable
        Returns one Tensor. Must be deterministic (give :func:`dropout` an integer seed).
    *args
        Tensors (gradients flow to them), arrays and other values, passed to ``fn``.
    """
    if not _state.grad_enabled:
        return fn(*args)
    outer_probe = _state.probe
    probe = [False]
    _state.probe = probe
    try:
        with no_grad():
            out = fn(*args)
    finally:
        _state.probe = outer_probe
    if not isinstance(out, Tensor):
        raise TypeError(f"checkpoint: fn must return one Tensor, got {type(out).__name__}")
    if not (probe[0] or any(_needs(a) for a in args)):
        return out  # nothing inside needed a gradient
    if outer_probe is not None:
        outer_probe[0] = True
    plan, saved, inputs = [], [], []
    for a in args:  # what to keep: arrays of tensor arguments; other values as they are
        if isinstance(a, Tensor):
            plan.append(("tensor", len(saved), a.requires_grad))
            saved.append(a.data)
            inputs.append(a)
        elif _is_array(a):
            plan.append(("array", len(saved), False))
            saved.append(a)
        else:
            plan.append(("value", a, False))

    def backward(g, *saved):
        rebuilt, leaves = [], []
        for kind, ref, requires_grad in plan:
            if kind == "tensor":
                leaf = Tensor._wrap(saved[ref])
                leaf.requires_grad = requires_grad
                leaves.append(leaf)
                rebuilt.append(leaf)
            else:
                rebuilt.append(saved[ref] if kind == "array" else ref)
        with enable_grad():
            again = fn(*rebuilt)
        if isinstance(again, Tensor) and again.requires_grad:
            _run_backward([again], [g])
        return tuple(leaf.grad for leaf in leaves)
    return record(out.data, inputs, backward, saved=saved, op="checkpoint", force=True)
