"""The GPU path of KV-cache calls (cupyflash.kvcache): the append, the decode kernel and split-KV's
combine, planned once per set of layouts. Inputs arrive validated by _checks.

A decode step attends a few new query rows per sequence to its cache: the cost is reading K and
V, so the decode kernel (kernels_cu/flash_decode.cu) gives each block a kv head's whole group of
query heads (each K, V byte read once per group), reads paged caches through their page table,
and splits each sequence's keys across blocks when batch x kv heads would leave SMs idle
(flash-decoding), the splits' partial softmaxes merged by a combine kernel. fp32 inputs and dense
caches with many new rows per kv head (chunked prefill) run the prefill kernels instead
(_cuda_backend, VARIANT_KVLEN), a paged cache there gathered into a dense copy first.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import cupy
from cupy.cuda import driver, runtime

from . import _checks, _config, _launch, _tma
from ._cuda_backend import (_F32, _cc, _kernel_ready, _may_allocate, _out_buffer, _pointers_aligned, _ptr,
                            _reads_in_place, _tuned, _variant_fields, forward_with_plan)

MAX_SPLITS = 128  # split-KV chunks per sequence at most (FlashAttention-2's bound)
ONE_WAVE = 0.9  # one wave of split blocks filling this share of the slots is enough
SPLIT_EFFICIENCY = 0.97  # else the fewest splits whose waves fill this share of the slots (else the best)


def decode_rows(q_shape: tuple, heads_kv: int) -> int:
    """Query rows per kv head: the group of query heads times the new tokens."""
    return q_shape[1] * (q_shape[2] // heads_kv)


def takes_decode_kernel(dtype, q_shape: tuple, heads_kv: int, paged: bool) -> bool:
    """Does a KV-cache call run the decode kernel (16-bit inputs; a paged cache, or few rows per kv head)?"""
    return np.dtype(dtype) != _config.FLOAT32 and (paged or decode_rows(q_shape, heads_kv) <= _config.DECODE_MAX_ROWS)


def choose_splits(blocks: int, key_tiles: int, slots: int, requested: int = 0) -> int:
    """Split-KV chunks per sequence: ``requested`` when > 0 (at most one per key tile), else 1 when the
    ``blocks`` of an unsplit grid nearly fill the GPU's ``slots`` (SMs x resident blocks), else the
    most splits that fit one wave when it fills ONE_WAVE of the slots, else the fewest whose waves
    fill SPLIT_EFFICIENCY of the slots they take, or failing that the fullest. (FlashAttention-2
    takes the fewest within 85% of the best: a bandwidth-bound kernel loses what an idle slot would
    have read, 12% at batch 1 x 8 kv heads with 29 splits where 33 fill the H100's 264 slots.)"""
    most = max(1, min(MAX_SPLITS, key_tiles))
    if requested > 0:
        return min(requested, most)
    if blocks >= 0.8 * slots:
        return 1
    one_wave = min(most, slots // blocks)
    if blocks * one_wave >= ONE_WAVE * slots:
        return one_wave
    waves = [blocks * s / slots for s in range(1, most + 1)]
    efficiency = [w / math.ceil(w) for w in waves]
    full = [s for s, e in enumerate(efficiency, 1) if e >= SPLIT_EFFICIENCY]
    return full[0] if full else 1 + efficiency.index(max(efficiency))


def workspace_floats(splits: int, batch: int, seqlen_q: int, heads: int, head_dim: int) -> int:
    """fp32 elements of split-KV's workspace: each split's lse, padded to 16 bytes, and its O (0 unsplit)."""
    if splits <= 1:
        return 0
    rows = splits * batch * seqlen_q * heads
    return -(-rows // 4) * 4 + rows * head_dim


class DecodePlan:
    """The launches of one KV-cache call's layouts: the append (when new tokens come), the decode
    kernel and, with splits, the combine. Calling it with arrays of those layouts fills in the
    pointers and launches: no checks, no planning, no allocation when out, lse and the workspace
    are given."""

    def __init__(self, q, k_cache, v_cache, o, lse, layout, cache_seqlens, k_new, v_new, *, scale: float, variants,
                 num_splits: int, allocates: tuple, decode_config: _config.DecodeConfig | None = None):
        B, Sq, H, D = q.shape
        H_kv, page_size = k_cache.shape[2], k_cache.shape[1]
        self.device = q.data.device_id
        self.out_shape, self.dtype, self.lse_shape = q.shape, q.dtype, (B, H, Sq)
        self.allocates = allocates  # (out, lse) were not given
        self.paged = layout.page_table is not None
        self.new_tokens = layout.new_tokens
        rows = decode_rows(q.shape, H_kv)
        cls = _config.head_dim_class(D)
        cfg = decode_config or _config.decode_config(cls, rows, q.dtype.itemsize, _cc(),  # the bench tries others
                                                     page_size=page_size if self.paged else None)
        if cfg.loads == "tma" and not all(_tma.encodable(c.data.ptr, c.shape, c.strides) for c in (k_cache, v_cache)):
            cfg = dataclasses.replace(cfg, loads="cp.async")  # a view TMA cannot describe
        variant = _config.variant_bits(variants, kv_lengths=cache_seqlens is not None)
        self.kernels = ks = _config.DecodeSet(q.dtype, cls, cfg, variant, self.paged)
        row_tiles, self.splits = _grid_and_splits(q.shape, q.dtype, H_kv, self.paged, layout.capacity, cfg, num_splits)
        decode = _launch.PreparedLaunch(ks, ks.decode_name(), (row_tiles, H_kv, B), ks.threads(), ks.smem())
        self.workspace_size = workspace_floats(self.splits, B, Sq, H, D)
        self.lse_floats = self.workspace_size - self.splits * B * Sq * H * D
        decode.grid = (row_tiles * self.splits, H_kv, B)
        self.decode = decode
        var, self.variant_arrays, _ = _variant_fields(variants, q, k_cache, scale, seqused=cache_seqlens,
                                                   new_k=layout.new_tokens, seqlen_k=layout.capacity)
        table = layout.page_table
        fwd = dict(q=_launch.tensor_ref(q), k=_launch.tensor_ref(k_cache), v=_launch.tensor_ref(v_cache),
                   o=_launch.tensor_ref(o), lse=np.uint64(lse.data.ptr), batch=np.int32(B), heads=np.int32(H),
                   seqlen_q=np.int32(Sq), seqlen_k=np.int32(layout.capacity), head_dim=np.int32(D),
                   scale_log2=_config.scale_log2(scale), var=var)
        fields = dict(fwd=tuple(fwd[n] for n in _launch.FWD_PARAMS.names), page_table=np.uint64(_ptr(table)),
                      o_partial=np.uint64(0), lse_partial=np.uint64(0),
                      page_table_stride=np.int64(0 if table is None else table.strides[0] // table.itemsize),
                      page_shift=np.int32(page_size.bit_length() - 1 if self.paged else 0),
                      num_pages=np.int32(k_cache.shape[0]), num_splits=np.int32(self.splits), pad_=np.int32(0))
        self.tma = cfg.loads == "tma"
        box_rows = min(page_size, cfg.block_n) if self.paged else cfg.block_n  # the tile's keys, or one page
        self.map_specs = tuple((q.dtype, c.shape, c.strides, box_rows) for c in (k_cache, v_cache))
        maps = self.maps(k_cache.data.ptr, v_cache.data.ptr)
        self.params = _launch.ParamTemplate(
            _launch.DECODE_MAPS, dict(dec=tuple(fields[n] for n in _launch.DECODE_PARAMS.names), k=maps[0], v=maps[1]),
            pointers=tuple("dec." + n for n in _DECODE_POINTERS), maps=("k", "v"))
        self.combine = None
        if self.splits > 1:
            self.combine = _launch.PreparedLaunch(ks, ks.combine_name(), (-(-B * Sq * H // _config.COMBINE_ROWS), 1, 1),
                                                  32 * _config.COMBINE_ROWS, 0)
        self.append = None
        if layout.new_tokens:
            self.append = _launch.PreparedLaunch(ks, _config.append_name(q.dtype), (layout.new_tokens, H_kv, B),
                                                 _config.APPEND_THREADS, 0)
            self.append_params = _append_template(k_new, v_new, k_cache, v_cache, cache_seqlens, layout, D)

    def maps(self, k_ptr: int, v_ptr: int) -> tuple[bytes, bytes]:
        """The TMA tensor maps of the caches at these pointers (zeros with cp.async loads)."""
        if not self.tma:
            return (bytes(_tma.DESC_BYTES),) * 2
        return tuple(_tma.tensor_map(ptr, *spec) for ptr, spec in zip((k_ptr, v_ptr), self.map_specs))

    def workspace_views(self, workspace) -> tuple[int, int]:
        """(lse_partial, o_partial) pointers in the workspace (0, 0 unsplit)."""
        if self.splits <= 1:
            return 0, 0
        return workspace.data.ptr, workspace.data.ptr + 4 * self.lse_floats

    def launch(self, q, k_cache, v_cache, o, lse, workspace, stream_ptr: int, cache_seqlens, page_table, k_new, v_new,
               alibi, sinks) -> None:
        if self.append is not None:
            self.append(stream_ptr, self.append_params.fill((k_new.data.ptr, v_new.data.ptr, k_cache.data.ptr,
                                                             v_cache.data.ptr, cache_seqlens.data.ptr, _ptr(page_table))))
        lse_partial, o_partial = self.workspace_views(workspace)
        params = self.params.fill((q.data.ptr, k_cache.data.ptr, v_cache.data.ptr, o.data.ptr, lse.data.ptr, _ptr(alibi),
                                   _ptr(sinks), _ptr(cache_seqlens), _ptr(page_table), o_partial, lse_partial),
                                  self.maps(k_cache.data.ptr, v_cache.data.ptr))
        self.decode(stream_ptr, params)
        if self.combine is not None:
            self.combine(stream_ptr, params)

    def __call__(self, q, k_cache, v_cache, k_new, v_new, cache_seqlens, page_table, out, lse, workspace, alibi, sinks):
        """(out, lse), or None when this call cannot take the plan (a pointer off 16 bytes, a workspace
        too small, an allocation while the stream captures a graph): the caller takes the checked path."""
        if not _pointers_aligned(q.data.ptr, k_cache.data.ptr, v_cache.data.ptr, _ptr(out), _ptr(k_new), _ptr(v_new)):
            return None
        if runtime.getDevice() != self.device:
            with cupy.cuda.Device(self.device):
                return self(q, k_cache, v_cache, k_new, v_new, cache_seqlens, page_table, out, lse, workspace, alibi,
                            sinks)
        stream = cupy.cuda.get_current_stream()
        needs_workspace = self.splits > 1 and workspace is None
        if (self.allocates[0] or self.allocates[1] or needs_workspace) and not _may_allocate(stream):
            return None
        if workspace is not None and self.splits > 1 and not usable_workspace(workspace, self):
            return None
        o = cupy.ndarray(self.out_shape, self.dtype) if self.allocates[0] else out
        l = cupy.ndarray(self.lse_shape, _F32) if self.allocates[1] else lse
        if needs_workspace:
            workspace = cupy.empty(self.workspace_size, _F32)
        self.launch(q, k_cache, v_cache, o, l, workspace, stream.ptr, cache_seqlens, page_table, k_new, v_new, alibi,
                    sinks)
        return o, l


# the pointers of DecodeParams a call fills in, in DecodePlan.launch's order
_DECODE_POINTERS = ("fwd.q.ptr", "fwd.k.ptr", "fwd.v.ptr", "fwd.o.ptr", "fwd.lse", "fwd.var.alibi", "fwd.var.sinks",
                    "fwd.var.seqused_k", "page_table", "o_partial", "lse_partial")
_APPEND_POINTERS = ("k_new.ptr", "v_new.ptr", "k_cache.ptr", "v_cache.ptr", "cache_seqlens", "page_table")


def usable_workspace(workspace, plan: DecodePlan) -> bool:
    """A workspace the plan's splits fit in: float32, C-contiguous, on the plan's device, large enough."""
    return (workspace.dtype == _F32 and workspace.flags.c_contiguous and workspace.data.device_id == plan.device
            and workspace.size >= plan.workspace_size and workspace.data.ptr % 16 == 0)


def _append_template(k_new, v_new, k_cache, v_cache, cache_seqlens, layout, head_dim: int) -> _launch.ParamTemplate:
    table = layout.page_table
    fields = dict(k_new=_launch.tensor_ref(k_new), v_new=_launch.tensor_ref(v_new),
                  k_cache=_launch.tensor_ref(k_cache), v_cache=_launch.tensor_ref(v_cache),
                  cache_seqlens=np.uint64(cache_seqlens.data.ptr), page_table=np.uint64(_ptr(table)),
                  page_table_stride=np.int64(0 if table is None else table.strides[0] // table.itemsize),
                  new_tokens=np.int32(layout.new_tokens), capacity=np.int32(layout.capacity),
                  page_size=np.int32(k_cache.shape[1]), num_pages=np.int32(k_cache.shape[0]),
                  head_dim=np.int32(head_dim), pad_=np.int32(0))
    return _launch.ParamTemplate(_launch.APPEND_PARAMS, fields, pointers=_APPEND_POINTERS)


def _append(k_cache, v_cache, cache_seqlens, layout, k_new, v_new, ks) -> None:
    """The append kernel alone (the prefill route): new tokens into the caches."""
    B, H_kv, D = cache_seqlens.shape[0], k_cache.shape[2], k_cache.shape[3]
    launch = _launch.PreparedLaunch(ks, ks.append_name(), (layout.new_tokens, H_kv, B), _config.APPEND_THREADS, 0)
    template = _append_template(k_new, v_new, k_cache, v_cache, cache_seqlens, layout, D)
    launch(cupy.cuda.get_current_stream().ptr, template.fill(tuple(template.values[i] for i in template.pointer_slots)))


def _gathered_pages(k_cache, v_cache, layout):
    """Dense (B, capacity, H_kv, D) copies of the pages each sequence's table row names (page
    indices outside the cache clamped into it: such rows are the caller's contract, never an
    out-of-bounds read)."""
    num_pages, page_size = k_cache.shape[:2]
    pos = cupy.arange(layout.capacity)
    pages = cupy.clip(layout.page_table[:, pos // page_size], 0, num_pages - 1)
    rows = pages.astype(np.int64) * page_size + pos % page_size  # (B, capacity)
    return tuple(c.reshape(num_pages * page_size, *c.shape[2:])[rows] for c in (k_cache, v_cache))


def plan_splits(q_shape: tuple, dtype, k_cache_shape: tuple, page_table_shape: tuple | None, num_splits: int) -> int:
    """The splits a call of these shapes takes on the current device (kvcache_workspace)."""
    H_kv = k_cache_shape[2]
    paged = page_table_shape is not None
    if not takes_decode_kernel(dtype, q_shape, H_kv, paged):
        return 1
    capacity = page_table_shape[1] * k_cache_shape[1] if paged else k_cache_shape[1]
    cfg = _config.decode_config(_config.head_dim_class(q_shape[3]), decode_rows(q_shape, H_kv), np.dtype(dtype).itemsize,
                                _cc(), page_size=k_cache_shape[1] if paged else None)
    return _grid_and_splits(q_shape, dtype, H_kv, paged, capacity, cfg, num_splits)[1]


def _grid_and_splits(q_shape: tuple, dtype, heads_kv: int, paged: bool, capacity: int, cfg: _config.DecodeConfig,
                     num_splits: int) -> tuple[int, int]:
    """(row tiles, split-KV chunks) of a decode call. The GPU's slots are counted with the tile's
    instantiation without variants: the splits, and so the workspace, must not depend on the
    variants, which kvcache_workspace does not know."""
    B, _, _, D = q_shape
    plain = _config.DecodeSet(np.dtype(dtype), _config.head_dim_class(D), cfg, _config.MASK_NONE, paged)
    decode = _launch.PreparedLaunch(plain, plain.decode_name(), (1, 1, 1), plain.threads(), plain.smem())
    sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
    slots = sms * max(1, driver.occupancyMaxActiveBlocksPerMultiprocessor(decode.function, plain.threads(),
                                                                          plain.smem()))
    row_tiles = -(-decode_rows(q_shape, heads_kv) // cfg.rows)
    return row_tiles, choose_splits(row_tiles * heads_kv * B, -(-capacity // cfg.block_n), slots, num_splits)


def forward_kvcache(q, k_cache, v_cache, cache_seqlens, layout, *, k_new=None, v_new=None, scale: float, variants,
                    num_splits: int = 0, out=None, lse=None, workspace=None):
    """(out, lse, plan) of a KV-cache call on validated inputs (``layout``: a _checks.CacheLayout):
    the decode kernel's plan when it ran and serves later calls of these layouts, else None."""
    B, Sq, H, D = q.shape
    H_kv = k_cache.shape[2]
    with cupy.cuda.Device(q.device.id):
        if not takes_decode_kernel(q.dtype, q.shape, H_kv, layout.page_table is not None):
            return (*_prefill_route(q, k_cache, v_cache, cache_seqlens, layout, k_new, v_new, scale, variants, out, lse),
                    None)
        o, o_user = _out_buffer(out, q.shape, q.dtype)
        l = lse if lse is not None else cupy.empty((B, H, Sq), dtype=np.float32)
        if o.size == 0:
            return o, l, None
        ready = tuple(_kernel_ready(x) for x in (q, k_cache, v_cache))
        new = tuple(_kernel_ready(x) for x in (k_new, v_new)) if layout.new_tokens else (None, None)
        plan = DecodePlan(*ready, o, l, layout, cache_seqlens, *new, scale=scale, variants=variants,
                          num_splits=num_splits, allocates=(out is None, lse is None))
        if plan.splits > 1 and (workspace is None or not usable_workspace(workspace, plan)):
            if workspace is not None:
                raise ValueError(f"workspace holds {workspace.size} float32 elements but this call's {plan.splits} "
                                 f"splits need {plan.workspace_size} (16-byte aligned): use "
                                 "cupyflash.kvcache_workspace with this call's shapes and num_splits")
            _checks.check_graph_capture(plan.device, needed={"workspace": None}, in_place={}, dense={})
            workspace = cupy.empty(plan.workspace_size, _F32)
        plan.launch(*ready, o, l, workspace, cupy.cuda.get_current_stream().ptr, cache_seqlens, layout.page_table, *new,
                    *plan.variant_arrays)
        if layout.new_tokens:  # appended to aligned copies of the caches: copy them back
            for copy, cache in zip(ready[1:], (k_cache, v_cache)):
                if copy is not cache:
                    cache[...] = copy
        reusable = (o_user is None and all(a is b for a, b in zip(ready + new, (q, k_cache, v_cache, k_new, v_new)))
                    and _reads_in_place(plan.variant_arrays, variants))
        if o_user is not None:
            o_user[...] = o
            o = o_user
        return o, l, (plan if reusable else None)


def _prefill_route(q, k_cache, v_cache, cache_seqlens, layout, k_new, v_new, scale, variants, out, lse):
    """fp32 and chunked prefill: the append, then the prefill kernels over each sequence's keys."""
    causal = variants.window == (-1, 0)
    if cache_seqlens is None and layout.page_table is None:  # full dense caches: the plain call
        return forward_with_plan(q, k_cache, v_cache, causal=causal, scale=scale, out=out, lse=lse,
                                 variants=variants)[:2]
    if layout.new_tokens:
        ks = _config.kernel_set(q.dtype, q.shape[3], causal, _cc(), seqlen_k=layout.capacity, tuned=_tuned(),
                                variant=_config.variant_bits(variants, kv_lengths=True))  # the forward's module
        _append(k_cache, v_cache, cache_seqlens, layout, k_new, v_new, ks)
    if layout.page_table is not None:
        k_cache, v_cache = _gathered_pages(k_cache, v_cache, layout)
    return forward_with_plan(q, k_cache, v_cache, causal=causal, scale=scale, out=out, lse=lse, variants=variants,
                             seqused=cache_seqlens, new_k=layout.new_tokens)[:2]
