"""Recomputation: checkpoint() keeps only a segment's inputs and replays it in the backward."""
from __future__ import annotations

from typing import Callable

from .tensor import Tensor, _is_array, _needs, _run_backward, _state, enable_grad, no_grad, record


# ---- recomputation

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
