"""The plan cache: the public calls' fast lane for repeated calls with the same layouts.

A GPU call is fully decided by its inputs' layouts and flags, not by their data: the checks of
_checks pass or fail alike, and the same kernels run with the same grid and parameters but for
the pointers. So api.py keys each call on those layouts (``forward_key``, ``backward_key``) and
keeps the plan the checked path built (_cuda_backend.ForwardPlan, BackwardPlan). A later call
with the same key skips the checks and the planning: one key and one dictionary lookup, then
the plan fills in the pointers and launches. What the key cannot hold is checked by the plan
on every call (pointer alignment, graph capture; it switches to the arrays' device); a call that fails
those takes the checked path. Only exact cupy.ndarray inputs get keys: other objects are
converted first, so they take the checked path every time.
"""
from __future__ import annotations

from ._variants import NO_WINDOW

MAX_PLANS = 256  # per pass; the oldest plan goes first

_ndarray = None  # cupy.ndarray once CuPy imported; False when it cannot be


def _cupy_ndarray():
    global _ndarray
    if _ndarray is None:
        try:
            import cupy
            _ndarray = cupy.ndarray
        except Exception:  # not installed, or CUDA libraries missing: every call takes the checked path
            _ndarray = False
    return _ndarray


def _layouts(arrays: tuple):
    """(shape, strides, dtype, device) of each array (None for an omitted one), or None when one
    is not a cupy.ndarray (then the call has no key)."""
    nd = _cupy_ndarray()
    out = []
    for x in arrays:
        if x is None:
            out.append(None)
        elif type(x) is nd:
            out.append((x.shape, x.strides, x.dtype, x.data.device_id))
        else:
            return None
    return tuple(out)


def _flag(value) -> tuple:
    # the type too: 1 == True and 1.0 == 1 hash alike, but _checks accepts only some of them
    return (value.__class__, value)


_NO_WINDOW_FLAGS = tuple(_flag(w) for w in NO_WINDOW)


def _variant_flags(window_size, softcap):
    """The window (each side with its type: (True, 0) == (1, 0), but only one is valid) and the
    softcap; None (no key) for a window that is not a tuple. The API's default window object
    costs an identity test."""
    if window_size is NO_WINDOW:
        return (_NO_WINDOW_FLAGS, _flag(softcap))
    if window_size.__class__ is not tuple:
        return None
    return (tuple(_flag(w) for w in window_size), _flag(softcap))


def forward_key(q, k, v, out, lse, causal, softmax_scale, return_lse, window_size=NO_WINDOW, softcap=0.0,
                alibi_slopes=None, sinks=None):
    layouts = _layouts((q, k, v, out, lse, alibi_slopes, sinks))
    variants = _variant_flags(window_size, softcap)
    if layouts is None or variants is None:
        return None
    return (layouts, _flag(causal), _flag(softmax_scale), _flag(return_lse), variants)


def backward_key(dout, q, k, v, out, lse, dq, dk, dv, workspace, causal, softmax_scale, deterministic,
                 window_size=NO_WINDOW, softcap=0.0, alibi_slopes=None, sinks=None, dsinks=None):
    if workspace is not None:
        if workspace.__class__ is not tuple or len(workspace) != 2:
            return None
        arrays = (dout, q, k, v, out, lse, dq, dk, dv, *workspace, alibi_slopes, sinks, dsinks)
    else:
        arrays = (dout, q, k, v, out, lse, dq, dk, dv, None, None, alibi_slopes, sinks, dsinks)
    layouts = _layouts(arrays)
    variants = _variant_flags(window_size, softcap)
    if layouts is None or variants is None:
        return None
    return (layouts, _flag(causal), _flag(softmax_scale), _flag(deterministic), variants)


def kvcache_key(q, k_cache, v_cache, k, v, cache_seqlens, page_table, out, lse, workspace, causal, softmax_scale,
                window_size, softcap, alibi_slopes, sinks, num_splits, return_lse):
    layouts = _layouts((q, k_cache, v_cache, k, v, cache_seqlens, page_table, out, lse, workspace, alibi_slopes, sinks))
    variants = _variant_flags(window_size, softcap)
    if layouts is None or variants is None:
        return None
    return (layouts, _flag(causal), _flag(softmax_scale), _flag(num_splits), _flag(return_lse), variants)


class PlanCache:
    """Plans by key, at most MAX_PLANS (insertion order: the oldest is dropped first)."""

    def __init__(self, maxsize: int = MAX_PLANS):
        self.maxsize = maxsize
        self._plans: dict = {}

    def get(self, key):
        if key is None:
            return None
        try:
            return self._plans.get(key)
        except TypeError:  # an unhashable flag (a list for causal, say): the checks will name it
            return None

    def put(self, key, plan) -> None:
        if key is None or plan is None:
            return  # put only follows a successful checked call, whose flags are hashable scalars
        if len(self._plans) >= self.maxsize:
            try:
                self._plans.pop(next(iter(self._plans)), None)
            except (RuntimeError, StopIteration):  # another thread changed the cache meanwhile
                pass
        self._plans[key] = plan

    def clear(self) -> None:
        self._plans.clear()

    def __len__(self) -> int:
        return len(self._plans)


FORWARD = PlanCache()
BACKWARD = PlanCache()
KVCACHE = PlanCache()


def clear() -> None:
    """Forget every plan (tests; a plan holds compiled kernels of one device, nothing else)."""
    FORWARD.clear()
    BACKWARD.clear()
    KVCACHE.clear()
