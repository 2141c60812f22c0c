"""The implementations: cupyflash and the peers (naive attention, PyTorch SDPA's flash and cuDNN
backends, JAX's cuDNN attention, FlashAttention-4), each imported only when asked for."""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .._dtypes import BFLOAT16
from .problem import Case, VARIANTS
from .errors import Unsupported, is_out_of_memory, short_error
from .timing import HostTimer
from .devices import Device, Inputs
from .gate import GRAD_NAMES, OUTPUT_NAMES


@dataclass
class Prepared:
    """An implementation ready to run one case.

    run: the call that is timed (bwd: the backward only; the forward ran in prepare).
    outputs: full-size results for the correctness gate (cupyflash only).
    peak_bytes: measures one call's peak extra device memory (None: not measurable).
    context: entered around every call (streams, backend selection).
    """
    run: Callable[[], Any]
    timer: Any
    peak_bytes: Callable[[], int | None]
    outputs: Callable[[], dict] | None = None
    context: Callable[[], Any] = contextlib.nullcontext
    note: str = ""


class Impl:
    """Base class: a named attention implementation."""
    name = ""
    gated = False  # checked against the reference before timing
    variants: tuple[str, ...] = ()  # the VARIANTS it can do

    def unavailable(self, device: Device) -> str | None:
        """Why this implementation cannot run on this device, or None."""
        return None

    def refuse_variants(self, case: Case) -> None:
        """Raise Unsupported naming the case's variants this implementation cannot do."""
        if missing := [f for f in case.features if f not in self.variants]:
            raise Unsupported(f"{self.name} cannot do {', '.join(missing)}")

    def prepare(self, case: Case, inputs: Inputs, device: Device) -> Prepared:
        raise NotImplementedError


class CupyflashImpl(Impl):
    """cupyflash itself, on the device's arrays (cupy, or numpy on the CPU); with
    ``deterministic``, its bitwise-reproducible backward pass."""
    gated = True
    variants = VARIANTS

    def __init__(self, deterministic: bool = False):
        self.deterministic = deterministic
        self.name = "cupyflash-deterministic" if deterministic else "cupyflash"

    def prepare(self, case, inputs, device):
        from .. import api  # looked up at call time, so tests can patch api's functions
        q, k, v, do = inputs.q, inputs.k, inputs.v, inputs.dout
        kw = dict(causal=case.causal, **inputs.variants)
        det = self.deterministic

        def forward():
            return api.flash_attention(q, k, v, return_lse=True, **kw)

        def backward(out, lse):
            return api.flash_attention_backward(do, q, k, v, out, lse, deterministic=det, **kw)

        if case.mode == "fwd":
            run = lambda: api.flash_attention(q, k, v, **kw)  # noqa: E731
            outputs = lambda: dict(zip(("out", "lse"), forward()))  # noqa: E731
        elif case.mode == "bwd":
            out, lse = forward()
            run = lambda: backward(out, lse)  # noqa: E731
            outputs = lambda: dict(zip(GRAD_NAMES, run()))  # noqa: E731
        else:
            def run():
                return backward(*forward())

            def outputs():
                out, lse = forward()
                return dict(zip(OUTPUT_NAMES, (out, lse, *backward(out, lse))))
        return Prepared(run, device.timer(), lambda: device.measure_peak(run), outputs)


def _matmul(xp, a, b, dtype):
    """a @ b rounded to ``dtype``, accumulating in float32 (cuBLAS does; elsewhere emulated)."""
    if xp is not np and dtype != BFLOAT16:
        return xp.matmul(a, b)
    if xp is not np and _cupy_bf16_matmul():
        try:
            return xp.matmul(a, b)
        except (TypeError, ValueError):  # e.g. a batched or strided bf16 layout cuBLAS is not asked for
            pass
    return xp.matmul(a.astype(np.float32), b.astype(np.float32)).astype(dtype)


@functools.lru_cache(maxsize=None)
def _cupy_bf16_matmul() -> bool:
    """Whether this CuPy multiplies bfloat16 matrices itself (else: float32 then round)."""
    import cupy
    try:
        a = cupy.ones((16, 16), dtype=BFLOAT16)
        return float((a @ a)[0, 0].astype(np.float32)) == 16.0
    except Exception:
        return False


def _kv_per_query_head(xp, X, heads: int):
    """(batch, heads_kv, seqlen, dim) -> (batch, heads, ...): grouped-query attention, materialised."""
    return X if X.shape[1] == heads else xp.repeat(X, heads // X.shape[1], axis=1)


def naive_forward(xp, q, k, v, causal: bool, scale: float, window_size=(-1, -1)):
    """Materialised attention in the input precision: S = QK^T (rounded to dtype), softmax
    in float32, P rounded to dtype, O = PV. Returns out (q's layout and dtype) and P
    (batch, heads, seqlen_q, seqlen_k) in dtype, which the backward pass reuses. k, v may
    have fewer heads (grouped-query attention: repeated); the mask is causal and/or a window."""
    from ..reference import _allowed

    dtype, heads = q.dtype, q.shape[2]
    Q, K, V = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    K, V = _kv_per_query_head(xp, K, heads), _kv_per_query_head(xp, V, heads)
    S = _matmul(xp, Q, K.transpose(0, 1, 3, 2), dtype).astype(np.float32)
    S *= scale
    if causal or tuple(window_size) != (-1, -1):
        visible, _ = _allowed(xp, q.shape[1], k.shape[1], causal, window_size)
        S += xp.where(visible, 0.0, -xp.inf).astype(np.float32)
    m = S.max(axis=-1, keepdims=True)
    S -= xp.where(m == -xp.inf, 0.0, m)  # fully masked row: exp(-inf) = 0, not NaN
    xp.exp(S, out=S)
    l = S.sum(axis=-1, keepdims=True)
    S /= xp.where(l == 0, 1.0, l)
    P = S.astype(dtype)
    del S
    O = _matmul(xp, P, V, dtype)
    return O.transpose(0, 2, 1, 3), P


def naive_backward(xp, dout, q, k, v, out, P, scale: float):
    """Gradients of :func:`naive_forward` from its saved P: dV = P^T dO, dP = dO V^T,
    dS = P (dP - rowsum(dO O)), dQ = scale dS K, dK = scale dS^T Q; with fewer kv heads,
    dK and dV sum over each kv head's query heads."""
    dtype, heads, heads_kv = q.dtype, q.shape[2], k.shape[2]
    Q, K, V, O, dO = (x.transpose(0, 2, 1, 3) for x in (q, k, v, out, dout))
    K, V = _kv_per_query_head(xp, K, heads), _kv_per_query_head(xp, V, heads)
    dV = _matmul(xp, P.transpose(0, 1, 3, 2), dO, dtype)
    dS = _matmul(xp, dO, V.transpose(0, 1, 3, 2), dtype).astype(np.float32)
    dS -= (dO.astype(np.float32) * O.astype(np.float32)).sum(axis=-1, keepdims=True)
    dS *= P.astype(np.float32)
    dS *= scale
    dS = dS.astype(dtype)
    dQ = _matmul(xp, dS, K, dtype)
    dK = _matmul(xp, dS.transpose(0, 1, 3, 2), Q, dtype)
    if heads_kv != heads:
        dK, dV = (g.reshape(g.shape[0], heads_kv, heads // heads_kv, *g.shape[2:]).astype(np.float32)
                  .sum(axis=2).astype(dtype) for g in (dK, dV))
    return tuple(g.transpose(0, 2, 1, 3) for g in (dQ, dK, dV))


class NaiveImpl(Impl):
    """Materialised attention with the array module's matmuls: what you write without a kernel."""
    name = "naive"
    variants = ("gqa", "window")

    def prepare(self, case, inputs, device):
        xp, s = device.xp, inputs.scale
        q, k, v, do = inputs.q, inputs.k, inputs.v, inputs.dout
        fwd = functools.partial(naive_forward, window_size=case.variant.window)
        note = ""
        if device.on_gpu and case.np_dtype == BFLOAT16 and not _cupy_bf16_matmul():
            note = "bf16 matmuls in float32 (CuPy has no bf16 matmul)"
        if case.mode == "fwd":
            run = lambda: fwd(xp, q, k, v, case.causal, s)[0]  # noqa: E731
        elif case.mode == "bwd":
            out, P = fwd(xp, q, k, v, case.causal, s)
            run = lambda: naive_backward(xp, do, q, k, v, out, P, s)  # noqa: E731
        else:
            def run():
                out, P = fwd(xp, q, k, v, case.causal, s)
                return naive_backward(xp, do, q, k, v, out, P, s)
        return Prepared(run, device.timer(), lambda: device.measure_peak(run), note=note)


def _needs_gpu(device: Device) -> str | None:
    return None if device.on_gpu else "needs a CUDA device"


def _same_alignment(case: Case, who: str) -> None:
    if (case.causal or "window" in case.features) and case.seqlen_q != case.seqlen_k:
        mask = "sliding window" if "window" in case.features else "causal mask"
        raise Unsupported(f"{who}'s {mask} is top-left aligned; cupyflash's is bottom-right "
                          "(they differ when seqlen_q != seqlen_k)")


class TorchImpl(Impl):
    """Base of the PyTorch peers: zero-copy DLPack tensors of the benchmark's cupy arrays,
    run on its cupy stream (``torch.cuda.ExternalStream``); backward by ``torch.autograd.grad``.
    A subclass says what else it needs (:meth:`missing`) and how it attends (:meth:`bind`)."""

    def unavailable(self, device):
        if (reason := _needs_gpu(device)):
            return reason
        try:
            torch = importlib.import_module("torch")
        except Exception as e:
            return f"PyTorch is not importable ({short_error(e)})"
        if not torch.cuda.is_available():
            return "PyTorch sees no CUDA device (a CPU-only build?)"
        return self.missing(torch)

    def missing(self, torch) -> str | None:
        """What else this peer lacks on top of a CUDA PyTorch (a module, a backend), or None."""
        return None

    def contexts(self, case: Case) -> list:
        """Context managers entered around every call, besides the device and stream."""
        return []

    def bind(self, case: Case, inputs: Inputs, qkv: list, dout):
        """(attn, leaves, dout, note): ``attn()`` runs this peer on the (B, S, H, D) tensors
        ``qkv`` and returns its output; gradients are taken of ``leaves`` with ``dout``
        (its layout matching the output's)."""
        raise NotImplementedError

    def prepare(self, case, inputs, device):
        import torch

        t_stream = torch.cuda.ExternalStream(device.stream.ptr, device=torch.device("cuda", device.id))

        def context():
            stack = contextlib.ExitStack()
            stack.enter_context(torch.cuda.device(device.id))
            stack.enter_context(torch.cuda.stream(t_stream))
            for c in self.contexts(case):
                stack.enter_context(c)
            if case.mode == "fwd":
                stack.enter_context(torch.no_grad())
            return stack

        with context():
            qkv = [torch.from_dlpack(x).requires_grad_(case.mode != "fwd") for x in (inputs.q, inputs.k, inputs.v)]
            attn, leaves, do, note = self.bind(case, inputs, qkv, torch.from_dlpack(inputs.dout))
            if case.mode == "fwd":
                run = attn
            elif case.mode == "bwd":
                out = attn()
                run = lambda: torch.autograd.grad(out, leaves, do, retain_graph=True)  # noqa: E731
            else:
                run = lambda: torch.autograd.grad(attn(), leaves, do)  # noqa: E731

        def peak_bytes():
            t_stream.synchronize()
            torch.cuda.reset_peak_memory_stats(device.id)
            before = torch.cuda.memory_allocated(device.id)
            out = run()
            t_stream.synchronize()
            peak = torch.cuda.max_memory_allocated(device.id) - before
            del out
            return peak

        return Prepared(run, device.timer(), peak_bytes, context=context, note=note)


class TorchSDPAImpl(TorchImpl):
    """``torch.nn.functional.scaled_dot_product_attention`` pinned to one SDPA backend, on
    (B, H, S, D) views of the inputs; grouped-query attention with ``enable_gqa=True``."""
    variants = ("gqa",)

    def __init__(self, name: str, backend: str):
        self.name, self.backend = name, backend

    def missing(self, torch):
        try:
            attention = importlib.import_module("torch.nn.attention")
        except Exception as e:
            return f"PyTorch is not importable ({short_error(e)})"
        if not hasattr(attention.SDPBackend, self.backend):
            return f"this PyTorch ({torch.__version__}) has no SDPBackend.{self.backend}"
        return None

    def contexts(self, case):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return [sdpa_kernel(getattr(SDPBackend, self.backend))]

    def bind(self, case, inputs, qkv, dout):
        _same_alignment(case, "PyTorch SDPA")
        import torch.nn.functional as F

        kw = dict(is_causal=case.causal, scale=inputs.scale)
        if "gqa" in case.features:
            kw["enable_gqa"] = True

        def attn():
            return F.scaled_dot_product_attention(*views, **kw)

        views, note = [t.transpose(1, 2) for t in qkv], "(B,H,S,D) views, zero-copy"
        try:
            attn()
        except RuntimeError as e:
            if is_out_of_memory(e):
                raise
            # some backends want (B,H,S,D)-contiguous tensors: copy once, outside the timing
            qkv = [t.detach().transpose(1, 2).contiguous().requires_grad_(case.mode != "fwd") for t in qkv]
            views, note = qkv, "inputs copied to (B,H,S,D)-contiguous"
            attn()  # raises the backend's reason if it still cannot run
        return attn, qkv, dout.transpose(1, 2), note


@contextlib.contextmanager
def _bare_argv():
    """sys.argv as the program name alone: CuTe DSL (FA4) parses the command line on every
    compile for its ``-diagnostic`` flag, and ``-d 128`` reads as ``-diagnostic 128`` (exit 2)."""
    argv = sys.argv
    sys.argv = argv[:1]
    try:
        yield
    finally:
        sys.argv = argv


class FA4Impl(TorchImpl):
    """FlashAttention-4: ``flash_attn.cute.flash_attn_func`` (the flash-attn-4 wheel, CuTe DSL
    kernels) on the inputs' own (B, S, H, D) layout. Masks are bottom-right aligned like
    cupyflash's; grouped-query attention, windows, softcap and sinks (``learnable_sink``) are
    native; no ALiBi. float16 and bfloat16 only."""
    name = "fa4"
    variants = ("gqa", "window", "softcap", "sinks")

    def missing(self, torch):
        try:
            importlib.import_module("flash_attn.cute")
        except Exception as e:
            return f"FlashAttention-4 is not importable ({short_error(e)}); install flash-attn-4"
        return None

    def contexts(self, case):
        return [_bare_argv()]

    def bind(self, case, inputs, qkv, dout):
        if case.dtype not in ("float16", "bfloat16"):
            raise Unsupported("FlashAttention-4 takes float16 and bfloat16 only")
        import torch
        from flash_attn.cute import flash_attn_func

        left, right = case.variant.window
        kw = dict(softmax_scale=inputs.scale, causal=case.causal, softcap=case.variant.softcap,
                  window_size=(None if left < 0 else left, None if right < 0 else right))
        leaves = list(qkv)
        if "sinks" in inputs.variants:
            kw["learnable_sink"] = torch.from_dlpack(inputs.variants["sinks"]).requires_grad_(case.mode != "fwd")
            leaves.append(kw["learnable_sink"])

        def attn():
            return flash_attn_func(*qkv, **kw)[0]  # (out, lse)

        attn()  # compiles this configuration outside the timing; raises if FA4 cannot run it
        return attn, leaves, dout, "(B,S,H,D) tensors, zero-copy"


class JaxCudnnImpl(Impl):
    """``jax.nn.dot_product_attention(..., implementation='cudnn')``, jitted.

    JAX takes the cupy arrays zero-copy through DLPack (same (B, S, H, D) layout) but runs on
    its own stream, so it is timed with the host clock around ``block_until_ready``.
    Grouped-query attention is native; of windows, cuDNN takes only causal ones (right = 0).
    """
    name = "jax-cudnn"
    variants = ("gqa", "window")

    def unavailable(self, device):
        if (reason := _needs_gpu(device)):
            return reason
        # before JAX starts: do not let it grab 75% of the device for itself
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        try:
            jax = importlib.import_module("jax")
            importlib.import_module("jax.numpy")
        except Exception as e:
            return f"JAX is not importable ({short_error(e)})"
        try:
            gpus = _jax_gpus(jax)
        except Exception as e:
            return f"JAX has no GPU backend ({short_error(e)}); install jax[cuda12] or jax[cuda13]"
        if device.id is not None and device.id >= len(gpus):
            return f"JAX sees {len(gpus)} GPU(s), not device {device.id}"
        if not hasattr(jax.nn, "dot_product_attention"):
            return f"this JAX ({jax.__version__}) has no jax.nn.dot_product_attention"
        return None

    def prepare(self, case, inputs, device):
        _same_alignment(case, "jax.nn.dot_product_attention")
        causal, window = case.causal, {}
        if "window" in case.features:
            left, right = case.variant.window
            if not (causal or right == 0):
                raise Unsupported("jax-cudnn: cuDNN takes a sliding window only with right = 0 (causal)")
            causal, window = True, {"local_window_size": (left, 0)} if left >= 0 else {}
        import jax
        import jax.numpy as jnp

        gpu = _jax_gpus(jax)[device.id or 0]
        device.synchronize()
        note = "host clock (JAX runs on its own stream)"
        try:
            q, k, v, do = (jnp.from_dlpack(x) for x in (inputs.q, inputs.k, inputs.v, inputs.dout))
        except Exception:
            import cupy
            q, k, v, do = (jax.device_put(cupy.asnumpy(x), gpu)
                           for x in (inputs.q, inputs.k, inputs.v, inputs.dout))
            note += "; inputs copied through the host"
        attn = functools.partial(jax.nn.dot_product_attention, scale=inputs.scale,
                                 is_causal=causal, implementation="cudnn", **window)
        if case.mode == "fwd":
            f = jax.jit(attn)
            run = lambda: f(q, k, v)  # noqa: E731
        elif case.mode == "bwd":
            fwd, bwd = _jax_fwd_and_bwd(jax, attn)
            _, residuals = fwd(q, k, v)  # the forward runs once, outside the timing
            run = lambda: bwd(residuals, do)  # noqa: E731
        else:
            g = jax.jit(lambda q, k, v, do: jax.vjp(attn, q, k, v)[1](do))
            run = lambda: g(q, k, v, do)  # noqa: E731
        jax.block_until_ready(run())  # compile now; raises here if cuDNN cannot run the case
        timer = HostTimer(sync=jax.block_until_ready, before=device.synchronize)
        return Prepared(run, timer, lambda: None, note=note)


def _jax_gpus(jax) -> list:
    try:
        return jax.devices("cuda")
    except RuntimeError:
        return jax.devices("gpu")


def _jax_fwd_and_bwd(jax, f):
    """jitted fwd(q, k, v) -> (out, residuals) and bwd(residuals, dout) -> (dq, dk, dv)."""
    if hasattr(jax, "fwd_and_bwd"):  # JAX >= 0.7
        return jax.fwd_and_bwd(f, argnums=(0, 1, 2))
    # what fwd_and_bwd does: the vjp closure is a pytree (tree_util.Partial) of residuals
    return jax.jit(lambda q, k, v: jax.vjp(f, q, k, v)), jax.jit(lambda vjp, do: vjp(do))


def implementations() -> dict[str, Impl]:
    """Every implementation by name; cupyflash first."""
    impls = [CupyflashImpl(), CupyflashImpl(deterministic=True), NaiveImpl(), TorchSDPAImpl("torch-flash", "FLASH_ATTENTION"),
             TorchSDPAImpl("torch-cudnn", "CUDNN_ATTENTION"), JaxCudnnImpl(), FA4Impl()]
    return {i.name: i for i in impls}


PEERS = ("naive", "torch-flash", "torch-cudnn", "jax-cudnn", "fa4")
