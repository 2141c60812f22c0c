"""Optimizers for :mod:`cupyflash.autodiff` tensors: SGD with momentum and AdamW.

They update ``param.data`` in place from ``param.grad``, on whichever device the
parameter lives (numpy or cupy arrays, the same code).

>>> opt = AdamW(params, lr=3e-4, weight_decay=0.1)
>>> for step in range(steps):
...     loss = model(batch)
...     opt.zero_grad()
...     loss.backward()
...     opt.step()
"""
from __future__ import annotations

import math
from typing import Iterable

from .autodiff import Tensor

__all__ = ["Optimizer", "SGD", "AdamW", "clip_grad_norm"]


class Optimizer:
    """Holds the parameters (leaf tensors with requires_grad) and clears their gradients."""

    def __init__(self, params: Iterable[Tensor], lr: float):
        self.params = list(params)
        if not self.params:
            raise ValueError("params is empty: pass the tensors to optimise")
        for i, p in enumerate(self.params):
            if not isinstance(p, Tensor):
                raise TypeError(f"params[{i}] must be a Tensor, got {type(p).__name__}")
            if not (p.requires_grad and p.is_leaf):
                raise ValueError(f"params[{i}] must be a leaf tensor with requires_grad=True")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        self.lr = float(lr)
        self.state = [dict() for _ in self.params]

    def zero_grad(self):
        """Set every parameter's ``grad`` to None (the next backward starts from zero)."""
        for p in self.params:
            p.grad = None

    def step(self):
        raise NotImplementedError


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum (PyTorch's formulation).

    ``buf = momentum * buf + (grad + weight_decay * p)``; ``p -= lr * buf`` (or, with
    ``nesterov``, ``p -= lr * (grad + momentum * buf)``).
    """

    def __init__(self, params, lr: float = 1e-2, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False):
        super().__init__(params, lr)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if nesterov and momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")
        self.momentum, self.weight_decay, self.nesterov = momentum, weight_decay, nesterov

    def step(self):
        for p, state in zip(self.params, self.state):
            if p.grad is None:
                continue
            g = p.grad if self.weight_decay == 0 else p.grad + self.weight_decay * p.data
            if self.momentum:
                buf = state.get("momentum")
                if buf is None:
                    buf = state["momentum"] = g.copy()
                else:
                    buf *= self.momentum
                    buf += g
                g = g + self.momentum * buf if self.nesterov else buf
            p.data -= self.lr * g


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter).

    ``p *= 1 - lr * weight_decay``; ``m = b1 m + (1 - b1) g``; ``v = b2 v + (1 - b2) g^2``;
    ``p -= lr * m_hat / (sqrt(v_hat) + eps)`` with bias-corrected ``m_hat``, ``v_hat``.
    Moments are kept in float32 (float64 for float64 parameters).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        super().__init__(params, lr)
        b1, b2 = betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        self.betas, self.eps, self.weight_decay = (float(b1), float(b2)), float(eps), float(weight_decay)
        self.t = 0

    def step(self):
        self.t += 1
        b1, b2 = self.betas
        bias1, bias2 = 1.0 - b1 ** self.t, 1.0 - b2 ** self.t
        step_size = self.lr / bias1
        for p, state in zip(self.params, self.state):
            if p.grad is None:
                continue
            xp = p.xp
            moment_dtype = "float64" if p.dtype == "float64" else "float32"
            g = p.grad.astype(moment_dtype, copy=False)
            if "m" not in state:
                state["m"] = xp.zeros(p.shape, moment_dtype)
                state["v"] = xp.zeros(p.shape, moment_dtype)
            m, v = state["m"], state["v"]
            m *= b1
            m += (1.0 - b1) * g
            v *= b2
            v += (1.0 - b2) * (g * g)
            update = m / (xp.sqrt(v / bias2) + self.eps)
            if self.weight_decay:
                p.data *= 1.0 - self.lr * self.weight_decay
            p.data -= (step_size * update).astype(p.dtype, copy=False)


def clip_grad_norm(params: Iterable[Tensor], max_norm: float) -> float:
    """Scale all gradients so that their joint L2 norm is at most ``max_norm``.

    Returns the norm before clipping (a float; on the GPU this synchronises once).
    """
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    squares = [(g.astype("float64") ** 2).sum() for g in grads]
    total = math.sqrt(float(sum(squares[1:], squares[0])))
    if total > max_norm:
        scale = max_norm / (total + 1e-6)
        for p in params:
            if p.grad is not None:
                p.grad = p.grad * scale
    return total
