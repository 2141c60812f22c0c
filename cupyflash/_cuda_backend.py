"""The GPU path: plans the launches of the forward and backward passes (no kernel calls here
except through _launch). Inputs arrive validated by _checks.

A plan holds everything a call decides from its inputs' layouts (shapes, strides, dtype,
device, flags): the kernel set, the prepared launches and their parameter templates, and for
the Hopper kernels the TMA tensor maps. Calling a plan with arrays of those layouts fills in
the pointers and launches; the public API caches plans (_plans.py), so a repeated call costs
a few microseconds of host time instead of re-deriving all of this (bench/host_path.py).
"""
from __future__ import annotations

import math

import numpy as np
import cupy
from cupy.cuda import runtime

from . import _config, _launch, _tma

_ALIGN = 16  # cp.async copies 16 bytes: pointers and (batch, seqlen, heads) strides must be 16-byte multiples
_SCRATCH_ALIGN = 256  # the backward's two fp32 scratch arrays share one allocation, each on a 256-byte boundary
_F32 = np.dtype(np.float32)
_PARAM_CACHE_SIZE = 64  # filled parameter buffers a plan keeps, by data pointers (a loop cycles through a few)


def _aligned(x: cupy.ndarray) -> bool:
    return x.data.ptr % _ALIGN == 0 and all(s % _ALIGN == 0 for s in x.strides[:-1] if s)  # all but head_dim


def _kernel_ready(x: cupy.ndarray, tma: bool = False) -> cupy.ndarray:
    """x itself when the kernels can read it in place, else a contiguous copy (documented:
    only odd views whose rows do not start on 16-byte boundaries are copied; for TMA loads also
    views with a negative or zero stride)."""
    ready = _aligned(x) and (not tma or _tma.encodable(x.data.ptr, x.shape, x.strides))
    # a copy even when x is C-contiguous (ascontiguousarray would return x itself, pointer unchanged)
    return x if ready else x.copy(order="C")


def _out_buffer(buf, like_shape, dtype):
    if buf is None:
        return cupy.empty(like_shape, dtype=dtype), None
    if _aligned(buf):
        return buf, None
    return cupy.empty(like_shape, dtype=dtype), buf  # write to a staging buffer, copy back after


def _cc(device_id=None) -> int:
    return int(cupy.cuda.Device(device_id).compute_capability)


def _tuned():
    """The current device's tuned tiles (cupyflash.tune), or None."""
    from .tune import active_table
    return active_table(cupy.cuda.runtime.getDevice())


def kernel_path(dtype, head_dim: int, device=None, causal: bool = False, seqlen_k: int | None = None) -> str:
    """Which kernels a (dtype, head_dim, causal) problem runs on this device, in words."""
    cc = _cc(device)
    return f"sm_{cc}: " + _config.kernel_set(dtype, head_dim, causal, cc, seqlen_k=seqlen_k,
                                             tuned=_tuned()).describe()


def _grid(n_rows: int, block: int, heads: int, batch: int) -> tuple:
    return (math.ceil(n_rows / block), heads, batch)


def _pointers_aligned(*pointers: int) -> bool:
    acc = 0
    for p in pointers:
        acc |= p
    return acc % _ALIGN == 0


def _may_allocate(stream) -> bool:
    """False while the stream captures a CUDA graph (the legacy default stream never does)."""
    return stream.ptr == 0 or not stream.is_capturing()


class _TensorMaps:
    """The TMA tensor maps of a plan's tiled inputs: the layout and box of each is fixed by the
    plan, so a map depends on its data pointer alone."""
    __slots__ = ("specs",)

    def __init__(self, tiles: dict):
        # name -> (array, box rows): the layout of each comes from the array the plan was made for
        self.specs = tuple((x.dtype, x.shape, x.strides, rows) for x, rows in tiles.values())

    def __call__(self, pointers: tuple) -> tuple:
        return tuple(_tma.tensor_map(p, *spec[:3], spec[3]) for p, spec in zip(pointers, self.specs))


class _ParamsByPointers:
    """A plan's parameter buffers by data pointers: a call whose pointers an earlier call had
    (CuPy's pool hands a loop the same blocks again) reuses its filled buffer, read-only (the
    driver copies the bytes at each launch); others fill the template, with the TMA maps."""
    __slots__ = ("template", "maps", "tiled", "cache")

    def __init__(self, template: _launch.ParamTemplate, maps: _TensorMaps | None, tiled: tuple = ()):
        self.template, self.maps, self.tiled = template, maps, tiled  # tiled: which pointers have maps
        self.cache = {}

    def __call__(self, pointers: tuple):
        buf = self.cache.get(pointers)
        if buf is None:
            if len(self.cache) >= _PARAM_CACHE_SIZE:
                self.cache.clear()
            maps = self.maps(tuple(pointers[i] for i in self.tiled)) if self.maps is not None else ()
            buf = self.cache[pointers] = self.template.fill(pointers, maps)
        return buf


# the pointers a forward call fills in: q, k, v, out, lse, the variants' slopes and sinks, and the
# offsets of packed sequences (varlen)
_FWD_POINTERS = ("q.ptr", "k.ptr", "v.ptr", "o.ptr", "lse", "var.alibi", "var.sinks", "var.cu_seqlens_q",
                 "var.cu_seqlens_k", "var.seqused_k")


def _ptr(x) -> int:
    return 0 if x is None else x.data.ptr


def _variant_fields(variants, q, k, scale: float, dsinks=None, packing=None, seqused=None, new_k: int = 0,
                    seqlen_k: int | None = None) -> tuple:
    """VariantParams (kernels_cu/params.cuh) of a call: the run-time values of its variants in the
    kernels' raw score units, and the pointers of its slopes, sinks and dsinks (contiguous float32)
    and of packed sequences' offsets or a KV cache's key counts (``seqused``: its cache_seqlens,
    ``new_k``: the tokens this call appends). Returns (the struct's values in order, the arrays it
    points to, kept alive by the caller, the aux arrays of its mask_mod and bias_mod). ``seqlen_k``: the keys a sequence may have, when not k's
    seqlen (a paged cache's capacity)."""
    from ._variants import UNBOUNDED, Variants
    var = variants or Variants()
    B, Sq, H, _ = q.shape
    Sk, group = k.shape[1] if seqlen_k is None else seqlen_k, H // k.shape[2]
    unbounded = Sq + Sk  # wider than any band: the kernels need no "unbounded" test
    left, right = (unbounded if w == UNBOUNDED else min(w, unbounded) for w in var.window)
    user, user_arrays = _user_fields(var)
    alibi = None if var.alibi_slopes is None else cupy.ascontiguousarray(var.alibi_slopes, dtype=_F32)
    sinks = None if var.sinks is None else cupy.ascontiguousarray(var.sinks, dtype=_F32)
    softcap = float(var.softcap)
    values = (np.uint64(_ptr(alibi)), np.uint64(_ptr(sinks)), np.uint64(_ptr(dsinks)),
              np.int64(H if alibi is not None and alibi.ndim == 2 else 0), np.uint32(-(-(1 << 32) // group) % (1 << 32)),
              np.int32(group), np.int32(left), np.int32(right), np.float32(scale / softcap if softcap > 0 else 0.0),
              np.float32(softcap / scale if softcap > 0 else 0.0), np.float32(1.0 / scale), np.int32(new_k),
              *(np.uint64(p) for p in _packing_pointers(packing)), np.uint64(_ptr(seqused)), user,
              *_dropout_fields(var))
    return values, (alibi, sinks), user_arrays


def _dropout_fields(var) -> tuple:
    """The dropout fields of VariantParams: the seed (the Philox key), the uint32 threshold below which
    an entry is dropped and 1 / (1 - p) (zeros without dropout)."""
    from ._dropout import threshold
    p = float(var.dropout_p)
    if p <= 0:
        return np.uint64(0), np.uint32(0), np.float32(0.0)
    return np.uint64(var.seed), np.uint32(threshold(p)), np.float32(1.0 / (1.0 - p))


def _user_fields(var) -> tuple:
    """UserParams (kernels_cu/params.cuh) of a call: the pointers and extents (leading axes 1) of the
    aux arrays its mask_mod and bias_mod read (made C-contiguous where they are not: a copy, kept
    alive by the caller until the launch): (the struct's values, the arrays)."""
    from ._sources import user_terms
    arrays = [cupy.ascontiguousarray(a) for a in user_terms(var)[1]]
    pointers = [np.uint64(_ptr(a)) for a in arrays] + [np.uint64(0)] * (_launch.MAX_AUX - len(arrays))
    extents = []
    for a in arrays + [None] * (_launch.MAX_AUX - len(arrays)):
        shape = () if a is None else a.shape
        extents += [np.int32(n) for n in (1,) * (_launch.AUX_AXES - len(shape)) + tuple(shape)]
    return (*pointers, *extents), arrays


def _with_user_terms(ks: _config.KernelSet, variants, q, k) -> _config.KernelSet:
    """The kernel set in the module of the call's masks and biases, if it has them, walking only a
    block mask's kept tiles where it can (KernelSet.with_block_list; then the element mask is only
    what remains: the call's own, and the block mask's rule on its partial blocks). Such calls take
    the checked path each time (no plan: the aux pointers are not among a plan's slots)."""
    from dataclasses import replace
    from ._sources import element_mask, user_terms
    if variants is None or not variants.user:
        return ks
    if variants.block_mask is not None:
        needed, reads = element_mask(variants, listed=True)
        ks = ks.with_block_list(variants.block_mask.block, q.shape[1], k.shape[1], q.shape[2] // k.shape[2], _cc(),
                                element_mask=needed, reads_memory=reads)
    return replace(ks, user=user_terms(variants, listed=bool(ks.variant & _config.VARIANT_BLOCKS))[0])


def _reads_in_place(variant_arrays: tuple, variants) -> bool:
    """The kernels read the call's own slopes and sinks (no contiguous float32 copy was made)."""
    given = (None, None) if variants is None else (variants.alibi_slopes, variants.sinks)
    return all(a is b for a, b in zip(variant_arrays, given))


class ForwardPlan:
    """The forward launch for one set of layouts of q, k, v and the out and lse buffers."""

    def __init__(self, ks: _config.KernelSet, q, k, v, o, lse, scale: float, allocates: tuple, variants=None,
                 packing=None, seqused=None, new_k: int = 0):
        B, Sq, H, D = q.shape  # packed sequences (``packing``): one batch of total_q rows
        self.device = q.data.device_id
        self.out_shape, self.dtype, self.lse_shape = q.shape, q.dtype, (B, H, Sq)
        self.allocates_out, self.allocates_lse = allocates  # (out, lse) were not given: allocate them
        var, self.variant_arrays, self.user_arrays = _variant_fields(variants, q, k, scale, packing=packing,
                                                                     seqused=seqused, new_k=new_k)
        grid_b, grid_q = (packing.batch, packing.max_q) if packing is not None else (B, Sq)  # sequences, longest
        fields = dict(q=_launch.tensor_ref(q), k=_launch.tensor_ref(k), v=_launch.tensor_ref(v),
                      o=_launch.tensor_ref(o), lse=np.uint64(lse.data.ptr), batch=np.int32(grid_b), heads=np.int32(H),
                      seqlen_q=np.int32(Sq), seqlen_k=np.int32(k.shape[1]), head_dim=np.int32(D),
                      scale_log2=_config.scale_log2(scale), var=var)
        if ks.hopper_fwd:  # FwdSm90Params: FwdParams and the TMA tensor maps
            f = ks.fwd
            maps = _TensorMaps(dict(q=(q, f.block_m), k=(k, f.block_n), v=(v, f.block_n)))
            inner = tuple(fields[n] for n in _launch.FWD_PARAMS.names)
            template = _launch.ParamTemplate(
                _launch.FWD_SM90_PARAMS, dict(fwd=inner, **dict(zip("qkv", maps(self._qkv(q, k, v))))),
                pointers=tuple("fwd." + p for p in _FWD_POINTERS), maps=("q", "k", "v"))
            self.params = _ParamsByPointers(template, maps, tiled=(0, 1, 2))
        else:
            self.params = _ParamsByPointers(_launch.ParamTemplate(_launch.FWD_PARAMS, fields, pointers=_FWD_POINTERS), None)
        self.kernel = _launch.PreparedLaunch(ks, ks.fwd_name(), _grid(grid_q, ks.fwd.block_m, H, grid_b),
                                             ks.fwd_threads(), ks.fwd_smem() + ks.key_list_bytes(k.shape[1]))

    @staticmethod
    def _qkv(q, k, v) -> tuple:
        return (q.data.ptr, k.data.ptr, v.data.ptr)

    def launch(self, q, k, v, o, lse, stream_ptr: int, alibi=None, sinks=None, packing=None, seqused=None) -> None:
        self.kernel(stream_ptr, self.params((q.data.ptr, k.data.ptr, v.data.ptr, o.data.ptr, lse.data.ptr,
                                             _ptr(alibi), _ptr(sinks), *_packing_pointers(packing), _ptr(seqused))))

    def __call__(self, q, k, v, out, lse, alibi=None, sinks=None):
        """(out, lse) for arrays of the plan's layouts, or None when this call cannot take the
        plan as it is (a pointer off 16 bytes, an allocation while the stream captures a
        graph): the caller then takes the checked path."""
        if not _pointers_aligned(q.data.ptr, k.data.ptr, v.data.ptr, _ptr(out)):
            return None
        if runtime.getDevice() != self.device:
            with cupy.cuda.Device(self.device):  # the arrays' device; its current stream
                return self(q, k, v, out, lse, alibi, sinks)
        stream = cupy.cuda.get_current_stream()
        if (self.allocates_out or self.allocates_lse) and not _may_allocate(stream):
            return None
        o, l = self.outputs(out, lse)
        self.launch(q, k, v, o, l, stream.ptr, alibi, sinks)
        return o, l

    def outputs(self, out, lse) -> tuple:
        """out and lse, allocated where not given."""
        return (cupy.ndarray(self.out_shape, self.dtype) if self.allocates_out else out,
                cupy.ndarray(self.lse_shape, _F32) if self.allocates_lse else lse)


def _packing_pointers(packing) -> tuple:
    return (0, 0) if packing is None else (packing.cu_q.data.ptr, packing.cu_k.data.ptr)


def forward_with_plan(q, k, v, *, causal: bool, scale: float, out=None, lse=None, fwd_config=None, variants=None,
                      packing=None, seqused=None, new_k: int = 0):
    """(out, lse, plan): the forward on any validated inputs, and the plan it ran when that plan
    serves every later call with the same layouts (None when an input, the ALiBi slopes or the
    sinks were copied first, or the problem is empty). ``variants``: a _variants.Variants, causal
    folded in. ``packing``: packed sequences (a _checks.Packing; q, k, v, out one batch of
    total rows, lse (1, H, total_q)). ``seqused``: int32 (B,) device array, a KV cache's
    cache_seqlens: sequence b uses min(max(seqused[b], 0) + new_k, k's seqlen) keys."""
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    with cupy.cuda.Device(q.device.id):
        o, o_user = _out_buffer(out, q.shape, q.dtype)
        l = lse if lse is not None else cupy.empty((B, H, Sq), dtype=np.float32)
        if o.size == 0 or l.size == 0 or Sk == 0 or (packing is not None and packing.max_q == 0):
            o = out if out is not None else o
            if o.size:
                o.fill(0)
            if l.size:  # no keys: every row is empty (lse = its sink logit, when it has one)
                l[...] = -np.inf if variants is None or variants.sinks is None else variants.sinks[None, :, None]
            return o, l, None
        variant = (_config.variant_bits(variants, packing is not None, seqused is not None) if variants is not None
                   else None)
        ks = _with_user_terms(_config.kernel_set(q.dtype, D, causal, _cc(), fwd=fwd_config, variant=variant,
                                                 tuned=_tuned(), seqlen_k=Sk if packing is None else packing.max_k),
                              variants, q, k)
        ready = tuple(_kernel_ready(x, tma=ks.hopper_fwd) for x in (q, k, v))
        plan = ForwardPlan(ks, *ready, o, l, scale, allocates=(out is None, lse is None), variants=variants,
                           packing=packing, seqused=seqused, new_k=new_k)
        plan.launch(*ready, o, l, cupy.cuda.get_current_stream().ptr, *plan.variant_arrays, packing, seqused)
        reusable = (o_user is None and all(a is b for a, b in zip(ready, (q, k, v)))
                    and _reads_in_place(plan.variant_arrays, variants) and not ks.user)
        if o_user is not None:
            o_user[...] = o
            o = o_user
        return o, l, (plan if reusable else None)


def forward(q, k, v, *, causal: bool, scale: float, out=None, lse=None, fwd_config=None, variants=None):
    return forward_with_plan(q, k, v, causal=causal, scale=scale, out=out, lse=lse, fwd_config=fwd_config,
                             variants=variants)[:2]


assert _launch.BWD_SM90_PARAMS.fields["bwd"][1] == 0  # BackwardPlan.launch passes one buffer to all kernels
# (no var.seqused_k: KV-cache calls are forward only)
_BWD_POINTERS = ("q.ptr", "k.ptr", "v.ptr", "o.ptr", "dout.ptr", "dq.ptr", "dk.ptr", "dv.ptr", "lse", "dsum",
                 "dq_accum", "var.alibi", "var.sinks", "var.dsinks", "var.cu_seqlens_q", "var.cu_seqlens_k")


class BackwardPlan:
    """The backward launches for one set of layouts of the inputs, gradient buffers and workspace."""

    def __init__(self, ks: _config.KernelSet, dout, q, k, v, out, lse, grads: tuple, scale: float,
                 allocates: tuple, variants=None, dsinks=None, packing=None):
        B, Sq, H, D = q.shape  # packed sequences (``packing``): one batch of total_q rows
        Sk = k.shape[1]
        grid_b, grid_q, grid_k = (packing.batch, packing.max_q, packing.max_k) if packing is not None else (B, Sq, Sk)
        self.device = q.data.device_id
        self.shapes, self.dtype = (q.shape, k.shape, v.shape), q.dtype
        # (dq, dk, dv), the workspace, dsinks (with sinks) were not given: allocate them
        self.allocates_grads, self.allocates_scratch, self.allocates_dsinks = allocates
        self.sinks_shape = (H,) if variants is not None and variants.sinks is not None else None
        self.deterministic = ks.deterministic
        self.dsum_shape, self.dsum_bytes = (B, H, Sq), B * H * Sq * 4
        self.dsum_bytes_padded = -(-self.dsum_bytes // _SCRATCH_ALIGN) * _SCRATCH_ALIGN
        self.accum_bytes = 0 if ks.deterministic else B * H * Sq * D * 4  # the dQ pass needs no accumulator
        dq, dk, dv = grads
        var, self.variant_arrays, self.user_arrays = _variant_fields(variants, q, k, scale, dsinks, packing)
        fields = dict(
            q=_launch.tensor_ref(q), k=_launch.tensor_ref(k), v=_launch.tensor_ref(v),
            o=_launch.tensor_ref(out), dout=_launch.tensor_ref(dout), dq=_launch.tensor_ref(dq),
            dk=_launch.tensor_ref(dk), dv=_launch.tensor_ref(dv), lse=np.uint64(0), dsum=np.uint64(0),
            dq_accum=np.uint64(0), batch=np.int32(grid_b), heads=np.int32(H), seqlen_q=np.int32(Sq),
            seqlen_k=np.int32(Sk), head_dim=np.int32(D), scale=np.float32(scale), scale_log2=_config.scale_log2(scale),
            var=var)
        if ks.hopper_bwd:  # BwdSm90Params: BwdParams and the TMA tensor maps
            g = ks.bwd
            maps = _TensorMaps(dict(q=(q, g.block_m), k=(k, g.block_n), v=(v, g.block_n), dout=(dout, g.block_m)))
            inner = tuple(fields[n] for n in _launch.BWD_PARAMS.names)
            template = _launch.ParamTemplate(
                _launch.BWD_SM90_PARAMS, dict(bwd=inner, **dict(zip(("q", "k", "v", "dout"), maps(
                    (q.data.ptr, k.data.ptr, v.data.ptr, dout.data.ptr))))),
                pointers=tuple("bwd." + p for p in _BWD_POINTERS), maps=("q", "k", "v", "dout"))
            self.params = _ParamsByPointers(template, maps, tiled=(0, 1, 2, 4))  # q, k, v, dout in _BWD_POINTERS
        else:
            self.params = _ParamsByPointers(_launch.ParamTemplate(_launch.BWD_PARAMS, fields, pointers=_BWD_POINTERS), None)
        rows = _config.ROWWISE_ROWS_PER_BLOCK
        # 1. D_i = rowsum(dO_i * O_i), dQ_accum = 0
        self.preprocess = _launch.PreparedLaunch(ks, ks.preprocess_name(), _grid(grid_q, rows, H, grid_b), 32 * rows, 0)
        # 2. dK_j, dV_j per (key tile, kv head), over the query heads of its group; dQ_accum += dS K_j
        #    (not when deterministic)
        self.main = _launch.PreparedLaunch(ks, ks.bwd_name(), _grid(grid_k, ks.bwd.block_n, k.shape[2], grid_b),
                                           ks.bwd_threads(), ks.bwd_smem() + ks.query_list_bytes(Sq, H // k.shape[2]))
        if ks.deterministic:
            # 3. dQ_i per query tile, summed over key tiles in a fixed order, scaled and cast
            self.finish = _launch.PreparedLaunch(ks, ks.dq_name(), _grid(grid_q, ks.dq.block_m, H, grid_b),
                                                 ks.dq_threads(), ks.dq_smem())
        else:
            # 3. dQ = scale * dQ_accum in the input dtype
            self.finish = _launch.PreparedLaunch(ks, ks.convert_name(), _grid(grid_q, rows, H, grid_b), 32 * rows, 0)
        # 4. dsinks_h = -sum_i exp(sink_h - lse_i) D_i, one block per query head
        self.dsinks = (_launch.PreparedLaunch(ks, ks.dsinks_name(), (H, 1, 1), _config.DSINKS_THREADS, 0)
                       if ks.sinks else None)

    def scratch(self):
        """(dsum pointer, dq_accum pointer, the allocation that holds them): both fp32 scratch
        arrays in one allocation from CuPy's pool, freed when the caller drops it (the pool
        reuses it only for later work on the same stream)."""
        mem = cupy.cuda.alloc(self.dsum_bytes_padded + self.accum_bytes)
        return mem.ptr, (0 if self.deterministic else mem.ptr + self.dsum_bytes_padded), mem

    def launch(self, dout, q, k, v, out, lse, grads, dsum_ptr: int, accum_ptr: int, stream_ptr: int,
               alibi=None, sinks=None, dsinks=None, packing=None) -> None:
        dq, dk, dv = grads
        # a null dq_accum tells the kernels that the dQ pass computes dQ (no atomics)
        pointers = (q.data.ptr, k.data.ptr, v.data.ptr, out.data.ptr, dout.data.ptr, dq.data.ptr, dk.data.ptr,
                    dv.data.ptr, lse.data.ptr, dsum_ptr, accum_ptr, _ptr(alibi), _ptr(sinks), _ptr(dsinks),
                    *_packing_pointers(packing))
        # one buffer for the three kernels: BwdSm90Params starts with the BwdParams that the
        # preprocess and the dQ kernels read (the driver copies as many bytes as each kernel takes)
        params = self.params(pointers)
        self.preprocess(stream_ptr, params)
        self.main(stream_ptr, params)
        self.finish(stream_ptr, params)
        if self.dsinks is not None:
            self.dsinks(stream_ptr, params)

    def __call__(self, dout, q, k, v, out, lse, dq, dk, dv, workspace, alibi=None, sinks=None, dsinks=None):
        """(dq, dk, dv), and dsinks with sinks, for arrays of the plan's layouts, or None when this
        call cannot take the plan as it is (see ForwardPlan.__call__)."""
        pointers = [dout.data.ptr, q.data.ptr, k.data.ptr, v.data.ptr, out.data.ptr]
        if not self.allocates_grads:
            pointers += [dq.data.ptr, dk.data.ptr, dv.data.ptr]
        if not _pointers_aligned(*pointers):
            return None
        if runtime.getDevice() != self.device:
            with cupy.cuda.Device(self.device):  # the arrays' device; its current stream
                return self(dout, q, k, v, out, lse, dq, dk, dv, workspace, alibi, sinks, dsinks)
        stream = cupy.cuda.get_current_stream()
        if (self.allocates_grads or self.allocates_scratch or self.allocates_dsinks) and not _may_allocate(stream):
            return None
        if self.allocates_grads:
            dq, dk, dv = (cupy.ndarray(shape, self.dtype) for shape in self.shapes)
        if self.allocates_dsinks:
            dsinks = cupy.ndarray(self.sinks_shape, _F32)
        if self.allocates_scratch:
            dsum_ptr, accum_ptr, _mem = self.scratch()
        else:
            dsum_ptr, accum_ptr = workspace[0].data.ptr, (0 if self.deterministic else workspace[1].data.ptr)
        self.launch(dout, q, k, v, out, lse, (dq, dk, dv), dsum_ptr, accum_ptr, stream.ptr, alibi, sinks, dsinks)
        return (dq, dk, dv) if self.sinks_shape is None else (dq, dk, dv, dsinks)


def backward_with_plan(dout, q, k, v, out, lse, *, causal: bool, scale: float, dq=None, dk=None, dv=None,
                       bwd_config=None, workspace=None, deterministic: bool = False, variants=None, dsinks=None,
                       packing=None):
    """((dq, dk, dv), plan): the backward on any validated inputs, and the plan it ran when that
    plan serves every later call with the same layouts (see forward_with_plan). With sinks in
    ``variants``: ((dq, dk, dv, dsinks), plan), dsinks written into ``dsinks`` when given.
    ``packing``: packed sequences, as for forward_with_plan."""
    D = q.shape[3]
    Sk = k.shape[1]
    with_sinks = variants is not None and variants.sinks is not None
    user_dsinks = dsinks
    with cupy.cuda.Device(q.device.id):
        grads = [_out_buffer(buf, x.shape, q.dtype) for buf, x in ((dq, q), (dk, k), (dv, v))]
        staged = [g for g, _ in grads]
        if with_sinks and dsinks is None:
            dsinks = cupy.empty((q.shape[2],), dtype=_F32)
        plan = None
        if q.size == 0 or k.size == 0 or (packing is not None and 0 in (packing.max_q, packing.max_k)):
            for g in staged + ([dsinks] if with_sinks else []):
                g.fill(0)
        else:
            variant = _config.variant_bits(variants, packing is not None) if variants is not None else None
            ks = _with_user_terms(_config.kernel_set(q.dtype, D, causal, _cc(), bwd=bwd_config,
                                                     deterministic=deterministic, tuned=_tuned(),
                                                     seqlen_k=Sk if packing is None else packing.max_k,
                                                     variant=variant),  # the forward's set: one module
                                  variants, q, k)
            ready = tuple(_kernel_ready(x, tma=ks.hopper_bwd) for x in (dout, q, k, v)) + (_kernel_ready(out),)
            lse_ready = cupy.ascontiguousarray(lse)
            plan = BackwardPlan(ks, *ready, lse_ready, tuple(staged), scale, variants=variants, dsinks=dsinks,
                                allocates=(dq is None, workspace is None, with_sinks and user_dsinks is None),
                                packing=packing)
            if workspace is not None:
                dsum_ptr, accum_ptr = workspace[0].data.ptr, (0 if deterministic else workspace[1].data.ptr)
            else:
                dsum_ptr, accum_ptr, _mem = plan.scratch()
            plan.launch(*ready, lse_ready, staged, dsum_ptr, accum_ptr, cupy.cuda.get_current_stream().ptr,
                        *plan.variant_arrays, dsinks, packing)
            inputs = (dout, q, k, v, out, lse)
            if not (all(a is b for a, b in zip((*ready, lse_ready), inputs))
                    and all(user is None for _, user in grads) and (dq is None) == (dk is None) == (dv is None)
                    and _reads_in_place(plan.variant_arrays, variants) and not ks.user):
                plan = None
        result = []
        for g, user in grads:
            if user is not None:
                user[...] = g
                g = user
            result.append(g)
        if with_sinks:
            result.append(dsinks)
        return tuple(result), plan


def backward(dout, q, k, v, out, lse, *, causal: bool, scale: float, dq=None, dk=None, dv=None,
             bwd_config=None, workspace=None, deterministic: bool = False, variants=None, dsinks=None):
    return backward_with_plan(dout, q, k, v, out, lse, causal=causal, scale=scale, dq=dq, dk=dk, dv=dv,
                              bwd_config=bwd_config, workspace=workspace, deterministic=deterministic,
                              variants=variants, dsinks=dsinks)[0]


def backward_workspace(batch: int, heads: int, seqlen_q: int, head_dim: int):
    """The fp32 scratch the backward pass needs: D (B, H, Sq) and the dQ accumulator (B, H, Sq, D).
    Allocate once and pass as ``workspace=`` to keep the backward pass allocation-free."""
    return (cupy.empty((batch, heads, seqlen_q), dtype=np.float32),
            cupy.empty((batch, heads, seqlen_q, head_dim), dtype=np.float32))
