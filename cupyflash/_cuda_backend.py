"""The GPU path: shapes the launches of the forward and backward passes (no kernel calls here
except through _launch). Inputs arrive validated by _checks."""
from __future__ import annotations

import math

import numpy as np
import cupy

from . import _config, _launch, _tma

_ALIGN = 16  # cp.async copies 16 bytes: pointers and (batch, seqlen, heads) strides must be 16-byte multiples


def _aligned(x: cupy.ndarray) -> bool:
    return x.data.ptr % _ALIGN == 0 and all(s % _ALIGN == 0 for s in x.strides[:3] if s)


def _kernel_ready(x: cupy.ndarray, tma: bool = False) -> cupy.ndarray:
    """x itself when the kernels can read it in place, else a contiguous copy (documented:
    only odd views whose rows do not start on 16-byte boundaries are copied; for TMA loads also
    views with a negative or zero stride)."""
    ready = _aligned(x) and (not tma or _tma.encodable(x.data.ptr, x.shape, x.strides))
    return x if ready else cupy.ascontiguousarray(x)


def _out_buffer(buf, like_shape, dtype):
    if buf is None:
        return cupy.empty(like_shape, dtype=dtype), None
    if _aligned(buf):
        return buf, None
    return cupy.empty(like_shape, dtype=dtype), buf  # write to a staging buffer, copy back after


def _cc(device_id=None) -> int:
    return int(cupy.cuda.Device(device_id).compute_capability)


def kernel_path(dtype, head_dim: int, device=None, causal: bool = False, seqlen_k: int | None = None) -> str:
    """Which kernels a (dtype, head_dim, causal) problem runs on this device, in words."""
    cc = _cc(device)
    return f"sm_{cc}: " + _config.kernel_set(dtype, head_dim, causal, cc, seqlen_k=seqlen_k).describe()


def _grid(n_rows: int, block: int, heads: int, batch: int) -> tuple:
    return (math.ceil(n_rows / block), heads, batch)


def forward(q, k, v, *, causal: bool, scale: float, out=None, lse=None, fwd_config=None):
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    with cupy.cuda.Device(q.device.id):
        o, o_user = _out_buffer(out, q.shape, q.dtype)
        l = lse if lse is not None else cupy.empty((B, H, Sq), dtype=np.float32)
        if o.size == 0 or l.size == 0:
            if l.size:
                l.fill(-np.inf)  # no keys: every row is empty
            return (out if out is not None else o), l
        if Sk == 0:
            o.fill(0)
            l.fill(-np.inf)
            return (out if out is not None else o), l
        ks = _config.kernel_set(q.dtype, D, causal, _cc(), fwd=fwd_config, seqlen_k=Sk)
        q, k, v = (_kernel_ready(x, tma=ks.hopper_fwd) for x in (q, k, v))
        fields = dict(q=_launch.tensor_ref(q), k=_launch.tensor_ref(k), v=_launch.tensor_ref(v),
                      o=_launch.tensor_ref(o), lse=np.uint64(l.data.ptr), batch=np.int32(B), heads=np.int32(H),
                      seqlen_q=np.int32(Sq), seqlen_k=np.int32(Sk), head_dim=np.int32(D),
                      scale_log2=_config.scale_log2(scale))
        if ks.hopper_fwd:  # FwdSm90Params: FwdParams and the TMA tensor maps
            f = ks.fwd
            params = _launch.pack_sm90(_launch.FWD_SM90_PARAMS, fields,
                                       dict(q=(q, f.block_m), k=(k, f.block_n), v=(v, f.block_n)))
        else:
            params = _launch.pack(_launch.FWD_PARAMS, **fields)
        _launch.launch(ks, ks.fwd_name(), _grid(Sq, ks.fwd.block_m, H, B), ks.fwd_threads(),
                       ks.fwd_smem(), params)
        if o_user is not None:
            o_user[...] = o
            o = o_user
        return o, l


def backward(dout, q, k, v, out, lse, *, causal: bool, scale: float, dq=None, dk=None, dv=None,
             bwd_config=None, workspace=None, deterministic: bool = False):
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    with cupy.cuda.Device(q.device.id):
        grads = [_out_buffer(buf, x.shape, q.dtype) for buf, x in ((dq, q), (dk, k), (dv, v))]
        (g_dq, u_dq), (g_dk, u_dk), (g_dv, u_dv) = grads
        if q.size == 0 or k.size == 0:
            for g in (g_dq, g_dk, g_dv):
                g.fill(0)
        else:
            ks = _config.kernel_set(q.dtype, D, causal, _cc(), bwd=bwd_config, deterministic=deterministic,
                                    seqlen_k=Sk)  # the forward's kernel set too: one module per problem
            dout, q, k, v = (_kernel_ready(x, tma=ks.hopper_bwd) for x in (dout, q, k, v))
            out = _kernel_ready(out)
            lse = cupy.ascontiguousarray(lse)
            if workspace is not None:
                dsum, dq_accum = workspace
            else:  # the deterministic dQ pass needs no fp32 accumulator
                dsum = cupy.empty((B, H, Sq), dtype=np.float32)
                dq_accum = None if deterministic else cupy.empty((B, H, Sq, D), dtype=np.float32)
            # a null dq_accum tells the kernels that the dQ pass computes dQ (no atomics)
            dq_accum_ptr = 0 if deterministic else dq_accum.data.ptr
            fields = dict(
                q=_launch.tensor_ref(q), k=_launch.tensor_ref(k), v=_launch.tensor_ref(v),
                o=_launch.tensor_ref(out), dout=_launch.tensor_ref(dout), dq=_launch.tensor_ref(g_dq),
                dk=_launch.tensor_ref(g_dk), dv=_launch.tensor_ref(g_dv), lse=np.uint64(lse.data.ptr),
                dsum=np.uint64(dsum.data.ptr), dq_accum=np.uint64(dq_accum_ptr), batch=np.int32(B),
                heads=np.int32(H), seqlen_q=np.int32(Sq), seqlen_k=np.int32(Sk), head_dim=np.int32(D),
                scale=np.float32(scale), scale_log2=_config.scale_log2(scale))
            params = _launch.pack(_launch.BWD_PARAMS, **fields)
            main_params = params
            if ks.hopper_bwd:  # BwdSm90Params: BwdParams and the TMA tensor maps
                g = ks.bwd
                main_params = _launch.pack_sm90(
                    _launch.BWD_SM90_PARAMS, fields,
                    dict(q=(q, g.block_m), k=(k, g.block_n), v=(v, g.block_n), dout=(dout, g.block_m)))
            rows_per_block = _config.ROWWISE_ROWS_PER_BLOCK
            # 1. D_i = rowsum(dO_i * O_i), dQ_accum = 0
            _launch.launch(ks, ks.preprocess_name(), _grid(Sq, rows_per_block, H, B), 32 * rows_per_block, 0, params)
            # 2. dK_j, dV_j per key tile; dQ_accum += dS K_j (not when deterministic)
            _launch.launch(ks, ks.bwd_name(), _grid(Sk, ks.bwd.block_n, H, B), ks.bwd_threads(),
                           ks.bwd_smem(), main_params)
            if deterministic:
                # 3. dQ_i per query tile, summed over key tiles in a fixed order, scaled and cast
                _launch.launch(ks, ks.dq_name(), _grid(Sq, ks.dq.block_m, H, B), ks.dq_threads(), ks.dq_smem(), params)
            else:
                # 3. dQ = scale * dQ_accum in the input dtype
                _launch.launch(ks, ks.convert_name(), _grid(Sq, rows_per_block, H, B), 32 * rows_per_block, 0, params)
        result = []
        for g, user in ((g_dq, u_dq), (g_dk, u_dk), (g_dv, u_dv)):
            if user is not None:
                user[...] = g
                g = user
            result.append(g)
        return tuple(result)


def backward_workspace(batch: int, heads: int, seqlen_q: int, head_dim: int):
    """The fp32 scratch the backward pass needs: D (B, H, Sq) and the dQ accumulator (B, H, Sq, D).
    Allocate once and pass as ``workspace=`` to keep the backward pass allocation-free."""
    return (cupy.empty((batch, heads, seqlen_q), dtype=np.float32),
            cupy.empty((batch, heads, seqlen_q, head_dim), dtype=np.float32))
