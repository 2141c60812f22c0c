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

The package: :mod:`.tensor` (grad mode, Tensor, the tape, backward and grad), :mod:`.ops`
(arithmetic, reductions and shapes, elementwise), :mod:`.nn` (normalisation, losses, dropout),
:mod:`.attention` and :mod:`.checkpoint`; the names below are re-exported here.
"""
from .tensor import (  # noqa: F401
    Tensor, tensor, record, no_grad, enable_grad, is_grad_enabled, grad, graph_nbytes,
    _topological_order)
from .ops import (  # noqa: F401
    add, subtract, multiply, divide, negative, power, matmul, sum, mean, reshape, transpose,
    getitem, take, embedding, concatenate, astype, exp, log, tanh, relu, gelu, softmax, log_softmax)
from .nn import (  # noqa: F401
    layer_norm, rms_norm, cross_entropy, dropout)
from .attention import (  # noqa: F401
    flash_attention, flash_attention_varlen, naive_attention, dropout_seed)
from .checkpoint import (  # noqa: F401
    checkpoint)

__all__ = [
    "Tensor", "tensor", "record", "no_grad", "enable_grad", "is_grad_enabled", "grad", "checkpoint",
    "graph_nbytes", "add", "subtract", "multiply", "divide", "negative", "power", "matmul", "sum",
    "mean", "reshape", "transpose", "getitem", "take", "embedding", "concatenate", "astype", "exp",
    "log", "tanh", "relu", "gelu", "softmax", "log_softmax", "layer_norm", "rms_norm",
    "cross_entropy", "dropout", "flash_attention", "flash_attention_varlen", "naive_attention",
]
