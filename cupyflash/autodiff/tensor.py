"""The tape: grad mode, the arrays a Tensor holds, Tensor and the recorded nodes, backward and
grad, and the helpers the ops share."""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Sequence

import numpy as np

from .._dtypes import BFLOAT16


# ---- grad mode

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


# ---- arrays

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
    from .._checks import as_array  # __dlpack__ / __cuda_array_interface__ objects
    return as_array(data, name)


def _is_float(dtype) -> bool:
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or dtype == BFLOAT16


def _owner(a):
    """The array that owns a view's memory (views of one buffer count once)."""
    while isinstance(getattr(a, "base", None), type(a)):
        a = a.base
    return a


# ---- the tape

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


# ---- helpers

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


# The ops that Tensor's operators and methods call, bound once Tensor exists: ops.py builds on
# this module, so importing them at the top would be circular.
from .ops import (  # noqa: E402
    add, astype, divide, exp, getitem, log, log_softmax, matmul, mean, multiply, negative, power,
    relu, reshape, softmax, subtract, sum, tanh, transpose)
