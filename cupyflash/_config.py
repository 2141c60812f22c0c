"""Kernel configurations: the Python mirror of kernels_cu/traits.cuh.

Tile sizes are compile-time template parameters of the kernels. This module holds the
table that picks them per (dtype, head_dim class) and the shared-memory arithmetic that the
launcher checks against the device before launching. Keep ``smem_bytes`` in step with the
``SMEM_BYTES`` constants of traits.cuh and flash_f32.cu.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np

from ._dtypes import BFLOAT16, FLOAT16, FLOAT32, dtype_name

#: head_dim is padded up to one of these compile-time widths (zeros fill the padding).
#: There is no 224 class: its backward spilled registers in every tile tried, so head_dim
#: 200..224 runs the 256 kernels (see bench/NOTES.md).
HEAD_DIM_CLASSES = (32, 64, 96, 128, 160, 192, 256)

#: C++ element type of each GPU dtype
CXX_TYPE = {FLOAT16: "__half", BFLOAT16: "__nv_bfloat16", FLOAT32: "float"}

LOG2E = 1.4426950408889634  # log2(e): the kernels exponentiate with exp2

#: query rows per block of the backward preprocess and dQ-convert kernels (one warp each);
#: ROWS_PER_BLOCK and CONVERT_ROWS_PER_BLOCK in kernels_cu/flash_bwd_{preprocess,convert}.cu
ROWWISE_ROWS_PER_BLOCK = 8
#: threads of the dsinks kernel (DSINKS_THREADS in kernels_cu/flash_bwd_dsinks.cu)
DSINKS_THREADS = 256
#: threads of the KV-cache append kernel (APPEND_THREADS in kernels_cu/kvcache_append.cu)
APPEND_THREADS = 32
#: query rows (one warp each) per block of split-KV's combine (COMBINE_ROWS in flash_decode_combine.cu)
COMBINE_ROWS = 4


# The VARIANT template parameter of every kernel: VariantBits in kernels_cu/variant.cuh.
MASK_NONE, MASK_CAUSAL, MASK_WINDOW = 0, 1, 2
VARIANT_SOFTCAP, VARIANT_ALIBI, VARIANT_SINKS, VARIANT_VARLEN, VARIANT_KVLEN = 4, 8, 16, 32, 64
VARIANT_USER_MASK, VARIANT_USER_BIAS = 128, 256  # the user's masks and biases (KernelSet.user)
VARIANT_BLOCKS = 512  # a block mask: the forward walks only the tiles it keeps (KernelSet.with_block_list)
VARIANT_DROPOUT = 1024  # dropout regenerated from the seed (kernels_cu/dropout.cuh)
#: the bits that add work to every score (the register-hungry tiles avoid them)
SCORE_WORK = VARIANT_SOFTCAP | VARIANT_ALIBI | VARIANT_USER_MASK | VARIANT_USER_BIAS | VARIANT_DROPOUT


def variant_bits(variants, packed: bool = False, kv_lengths: bool = False) -> int:
    """The compile-time switches of a call's variants (a cupyflash._variants.Variants): the mask
    kind (none, causal, window) and a bit each for softcap, ALiBi and sinks, packed sequences
    (varlen, ``packed``) and per-sequence key counts (a KV cache, ``kv_lengths``). The values stay
    run-time (VariantParams), so each combination is one instantiation, compiled at first use."""
    bits = (VARIANT_VARLEN if packed else 0) | (VARIANT_KVLEN if kv_lengths else 0)
    window = tuple(variants.window)
    bits |= MASK_NONE if window == (-1, -1) else MASK_CAUSAL if window == (-1, 0) else MASK_WINDOW
    if variants.softcap > 0:
        bits |= VARIANT_SOFTCAP
    if variants.alibi_slopes is not None:
        bits |= VARIANT_ALIBI
    if variants.sinks is not None:
        bits |= VARIANT_SINKS
    if any(t is not None for t in (variants.mask_mod, variants.mask, variants.block_mask)):
        bits |= VARIANT_USER_MASK
    if variants.bias_mod is not None or variants.bias is not None:
        bits |= VARIANT_USER_BIAS
    if variants.dropout_p > 0:
        bits |= VARIANT_DROPOUT
    return bits


def variant_text(bits: int) -> str:
    """The switches in words ('dense', 'causal', 'window+softcap', ...)."""
    parts = [("", "causal", "window")[bits & 3]]
    parts += [name for bit, name in ((VARIANT_SOFTCAP, "softcap"), (VARIANT_ALIBI, "alibi"), (VARIANT_SINKS, "sinks"),
                                     (VARIANT_VARLEN, "varlen"), (VARIANT_KVLEN, "kvlen"),
                                     (VARIANT_USER_MASK, "mask_mod"), (VARIANT_USER_BIAS, "bias_mod"),
                                     (VARIANT_BLOCKS, "blocks"), (VARIANT_DROPOUT, "dropout")) if bits & bit]
    return "+".join(p for p in parts if p) or "dense"


def scale_log2(softmax_scale: float) -> np.float32:
    """softmax_scale * log2(e), the factor the kernels apply to scores before exp2."""
    return np.float32(softmax_scale * LOG2E)


def head_dim_class(head_dim: int) -> int:
    """The smallest compile-time head dimension that holds ``head_dim``."""
    for c in HEAD_DIM_CLASSES:
        if head_dim <= c:
            return c
    raise ValueError(f"head_dim {head_dim} exceeds the largest supported {HEAD_DIM_CLASSES[-1]}")


def _padded(cols: int) -> int:
    return cols + 8  # SmemRow<COLS>::STRIDE: one 16-byte pad per row


@dataclass(frozen=True)
class FwdConfig:
    """Forward tile: BLOCK_M query rows per block, BLOCK_N keys per step, NUM_WARPS warps."""
    block_m: int
    block_n: int
    num_warps: int

    def smem_bytes(self, head_dim_cls: int, itemsize: int) -> int:
        return (self.block_m + 2 * self.block_n) * _padded(head_dim_cls) * itemsize


@dataclass(frozen=True)
class Sm90FwdConfig:
    """Hopper forward tile (flash_fwd_sm90.cu, sm_90a wgmma): one producer warpgroup and NUM_WG
    consumer warpgroups of 64 query rows each (BLOCK_M = 64 * NUM_WG), BLOCK_N keys per step,
    K/V in three swizzled stages loaded with TMA. head_dim runs at the next multiple of 64 (wgmma
    tiles are whole 64-column panels). Mirrors FwdTraitsSm90 in kernels_cu/traits.cuh."""
    block_n: int
    num_wg: int

    STAGES = 3
    ALIGN = 1024        # slack to start the panels on 1024-byte boundaries
    BARRIER_BYTES = 64  # the mbarriers
    SCRATCH_BYTES_PER_THREAD = 4  # one word per consumer thread

    @property
    def block_m(self) -> int:
        return 64 * self.num_wg

    @property
    def num_warps(self) -> int:
        return 4 * (self.num_wg + 1)  # the producer warpgroup too

    @staticmethod
    def head_dim(head_dim_cls: int) -> int:
        return -(-head_dim_cls // 64) * 64

    def smem_bytes(self, head_dim_cls: int, itemsize: int) -> int:
        rows = self.block_m + 2 * self.STAGES * self.block_n
        return (self.ALIGN + rows * self.head_dim(head_dim_cls) * itemsize + self.BARRIER_BYTES
                + self.SCRATCH_BYTES_PER_THREAD * 128 * self.num_wg)


DQ_SPLITS = ("keys", "panel", "none")  # DqSplit's values 0, 1, 2 in kernels_cu/traits.cuh


@dataclass(frozen=True)
class Sm90BwdConfig:
    """Hopper backward tile (flash_bwd_sm90.cu, sm_90a wgmma): one producer warpgroup and NUM_WG
    consumer warpgroups of 64 keys each (BLOCK_N = 64 * NUM_WG), query tiles of 64 rows in two
    stages. dq_split, how the warpgroups share dQ = dS K (DqSplit in kernels_cu/traits.cuh):
    "keys" (each warpgroup every column over its own keys, each adding its partial: NUM_WG atomic
    adds per element), "panel" (warpgroup w computes 64 x 64 panel w of the block_m x head_dim
    dQ tile over all keys: one add; needs block_m * head_dim = NUM_WG * 64 * 64), "none" (no dQ:
    deterministic=True, where the dQ pass computes it). block_m: 64, or 128 with "panel" or "none".
    K, V, Q, dO are loaded with TMA; each tile's products are pipelined (bench/NOTES.md v3.8).
    Mirrors BwdTraitsSm90 in kernels_cu/traits.cuh."""
    num_wg: int
    dq_split: str = "keys"
    block_m: int = 64

    STAGES = 2
    ALIGN = 1024
    BARRIER_BYTES = 64

    @property
    def block_n(self) -> int:
        return 64 * self.num_wg

    def __post_init__(self):
        if self.dq_split not in DQ_SPLITS:
            raise ValueError(f"dq_split must be one of {DQ_SPLITS}, got {self.dq_split!r}")
        if self.block_m not in (64, 128) or (self.block_m == 128 and self.dq_split == "keys"):
            raise ValueError(f"block_m must be 64, or 128 with dq_split 'panel' or 'none'; got block_m={self.block_m}, "
                             f"dq_split={self.dq_split!r}")

    @property
    def num_warps(self) -> int:
        return 4 * (self.num_wg + 1)

    def smem_bytes(self, head_dim_cls: int, itemsize: int) -> int:
        hd = Sm90FwdConfig.head_dim(head_dim_cls)
        kv = 2 * self.block_n * hd
        qdo = 2 * self.STAGES * self.block_m * hd
        ds = self.num_wg * 64 * self.block_m
        return self.ALIGN + (kv + qdo + ds) * itemsize + self.STAGES * 2 * self.block_m * 4 + self.BARRIER_BYTES


@dataclass(frozen=True)
class BwdConfig:
    """Backward tile: BLOCK_N keys per block, BLOCK_M queries per step, NUM_WARPS warps,
    Q_STAGES query-tile buffers (2: the next Q_i, dO_i load during the current one), and the
    warp layout of each phase: balanced (fewest ldmatrix per mma) or row-first (fewer registers)."""
    block_m: int
    block_n: int
    num_warps: int
    q_stages: int
    balanced: bool = True

    def smem_bytes(self, head_dim_cls: int, itemsize: int) -> int:
        kv = 2 * self.block_n * _padded(head_dim_cls)
        qdo = 2 * self.q_stages * self.block_m * _padded(head_dim_cls)
        p = 2 * self.block_n * _padded(self.block_m)
        return (kv + qdo + p) * itemsize + 2 * self.q_stages * self.block_m * 4


@dataclass(frozen=True)
class DqConfig:
    """The deterministic dQ pass (flash_bwd_dq.cu): BLOCK_M query rows per block walking key tiles of
    BLOCK_N in two stages, NUM_WARPS warps of 16 * MT whole rows. Mirrors DqTraits in traits.cuh."""
    block_m: int
    block_n: int
    num_warps: int

    KV_STAGES = 2

    def smem_bytes(self, head_dim_cls: int, itemsize: int) -> int:
        return (2 * self.block_m + 2 * self.KV_STAGES * self.block_n) * _padded(head_dim_cls) * itemsize


@dataclass(frozen=True)
class F32Config:
    """The fp32 CUDA-core path: fixed 32 x 32 tiles, 128 threads (see flash_f32.cu)."""
    block_m: int = 32
    block_n: int = 32
    num_warps: int = 4

    def fwd_smem_bytes(self, head_dim_cls: int) -> int:
        return (3 * 32 * (head_dim_cls + 1) + 32 * 33) * 4

    def bwd_smem_bytes(self, head_dim_cls: int) -> int:
        return (4 * 32 * (head_dim_cls + 1) + 2 * 32 * 33 + 2 * 32) * 4

    def dq_smem_bytes(self, head_dim_cls: int) -> int:
        return (4 * 32 * (head_dim_cls + 1) + 32 * 33) * 4



DECODE_LOADS = ("cp.async", "tma")  # DecodeLoads' values 0, 1 in kernels_cu/traits.cuh


@dataclass(frozen=True)
class DecodeConfig:
    """The KV-cache decode kernel (flash_decode.cu): ROWS query rows per block (the kv head's group
    times the new tokens, one or two 16-row m-tiles), NUM_WARPS warps of 16 keys each per key tile
    (BLOCK_N = 16 * NUM_WARPS), STAGES stages of K and V, loaded by ``loads``: "cp.async" (every
    thread, padded rows; sm_80 and up) or "tma" (tensor-map boxes into swizzled tiles; sm_90, head
    dims a multiple of 64). Mirrors DecodeTraits in kernels_cu/traits.cuh."""
    rows: int
    num_warps: int
    stages: int
    loads: str = "cp.async"

    KEYS_PER_WARP = 16
    ALIGN = 1024  # TMA: the swizzled tiles start on 1024-byte boundaries

    @property
    def block_n(self) -> int:
        return self.KEYS_PER_WARP * self.num_warps

    def smem_bytes(self, head_dim_cls: int, itemsize: int) -> int:
        # Q, the stages of K and V (padded rows, or swizzled tiles after the alignment slack), one
        # 8-byte mbarrier per stage
        q = self.rows * _padded(head_dim_cls) * itemsize
        slack = self.ALIGN if self.loads == "tma" else 0
        return slack + self.stages * self.stage_bytes(head_dim_cls, itemsize) + q + 8 * self.stages

    def stage_bytes(self, head_dim_cls: int, itemsize: int) -> int:
        """One stage: K_j and V_j, swizzled tiles (TMA) or padded rows (cp.async)."""
        return 2 * self.block_n * (head_dim_cls if self.loads == "tma" else _padded(head_dim_cls)) * itemsize

    def merge_bytes(self, head_dim_cls: int) -> int:
        """The warps' partials at the end (fp32 O rows of head_dim + 4 and an lse each), in the stages."""
        return self.num_warps * self.rows * (head_dim_cls + 5) * 4


F, G, H = FwdConfig, BwdConfig, Sm90FwdConfig

# Tile table for the tensor-core path (fp16 and bf16): (head_dim class, causal) -> (forward, backward).
# Measured on an H200 with bench/tune.py (bench/NOTES.md, bench/results/tune-*.json) among the
# configurations that compile without register spills for sm_90; entries not yet measured follow
# FlashAttention-2's tile choices. These are the mma.sync (sm_80+) kernels; sm_90 replaces some
# of them with the wgmma kernels (HOPPER_FWD and HOPPER_BWD below).
_TILES_SM90_MMA = {
    (32, False): (F(128, 64, 4), G(64, 64, 8, 2)),
    (32, True): (F(128, 64, 4), G(64, 64, 8, 2)),
    # head_dim 64's forward runs here only up to HOPPER_FWD_SHORT_SEQLEN_K keys: F(64, 64, 4) (112
    # registers, up to 4 blocks per SM) was 14-35% faster there than F(128, 64, 4) (NOTES v2.10)
    (64, False): (F(64, 64, 4), G(128, 128, 8, 2)),
    (64, True): (F(64, 64, 4), G(64, 64, 4, 2)),
    (96, False): (F(128, 64, 4), G(64, 64, 8, 2)),
    (96, True): (F(128, 64, 4), G(64, 64, 8, 2)),
    # head_dim 128's forward runs here only up to HOPPER_FWD_SHORT_SEQLEN_K keys. F(128, 64, 4) sat
    # at 255 registers and spilled 8-40 bytes with the variant code, with NVRTC 13.0 or 13.5 by turns;
    # F(64, 64, 4) (160 registers) was the fastest spill-free tile at 128 and 256 keys (NOTES, session 9)
    (128, False): (F(64, 64, 4), G(64, 128, 8, 1)),
    (128, True): (F(64, 64, 4), G(64, 128, 8, 2, balanced=False)),
    (160, False): (F(64, 64, 4), G(64, 64, 8, 2)),
    (160, True): (F(64, 64, 4), G(64, 64, 8, 2)),
    (192, False): (F(64, 64, 4), G(32, 64, 8, 2)),
    (192, True): (F(64, 64, 4), G(32, 64, 8, 2)),
    (256, False): (F(64, 64, 4), G(32, 64, 8, 2)),
    (256, True): (F(64, 64, 4), G(32, 64, 8, 2)),
}
# Other GPUs (sm_80 to sm_89 and anything unknown): the sm_90 entries, except where ptxas
# spills them for that architecture.
TILES_DEFAULT = {
    **_TILES_SM90_MMA,
    (64, False): (F(128, 64, 4), G(128, 128, 8, 2)),
    (64, True): (F(128, 64, 4), G(64, 128, 8, 2)),
    (128, False): (F(128, 32, 4), G(64, 64, 8, 2)),  # FlashAttention-2's sm_86 tile; F(128, 64, 4) spills (above)
    (128, True): (F(128, 64, 8), G(64, 64, 8, 2)),
    (160, False): (F(64, 64, 4), G(32, 32, 4, 2)),
    (160, True): (F(64, 64, 4), G(32, 32, 4, 2)),
    # the balanced layout spills 20 bytes here with NVRTC 13.5 (none with 13.0); row-first spills
    # with neither (bench/NOTES.md, NVRTC versions)
    (256, False): (F(64, 64, 4), G(32, 64, 8, 2, balanced=False)),
}
# Hopper (sm_90a) forward: (head_dim class, causal) -> wgmma tile; measured with bench/tune.py.
# measured with TMA loads (bench/NOTES.md, v2.8, v2.9). Head dims 96 and 160 run padded to 128 and
# 192 (+33%, +20% FLOPs) and still beat the mma.sync forward by 1.5-2x; head_dim 32 (padded to 64,
# +100%) does not, and keeps it.
HOPPER_FWD = {(cls, causal): cfg for causal in (False, True) for cls, cfg in (
    (64, H(128, 2)), (96, H(128, 2)), (128, H(128, 2)), (160, H(64, 2)), (192, H(64, 2)), (256, H(48, 2)))}
# Up to this many keys the mma.sync forward runs instead of HOPPER_FWD's: several of its blocks
# share an SM and hide each other's loads; with TMA loads the wgmma forward wins from 256 keys on
# and ties or loses at 128 (bench/NOTES.md, short sequences and v2.8).
HOPPER_FWD_SHORT_SEQLEN_K = 128
# Hopper (sm_90a) backward: measured with bench/tune.py (bench/NOTES.md, v3.0 to v3.3): at
# head_dim 128 dQ split by head_dim panel is 22-35% faster than by keys; at head_dim 64, 128-query
# tiles with dQ split by query-row panel are 12-24% faster than 64-query tiles with dQ by rows.
# Head dims 32 and 96 run it padded to 64 and 128 (+100% and +33% FLOPs; bench/NOTES.md v3.4).
HOPPER_BWD = {(cls, causal): cfg for causal in (False, True) for cls, cfg in (
    (32, Sm90BwdConfig(2, "panel", 128)), (64, Sm90BwdConfig(2, "panel", 128)),
    (96, Sm90BwdConfig(2, "panel")), (128, Sm90BwdConfig(2, "panel")))}
TILES_SM90 = {key: (HOPPER_FWD.get(key, fwd), HOPPER_BWD.get(key, bwd)) for key, (fwd, bwd) in _TILES_SM90_MMA.items()}
# deterministic=True on Hopper: HOPPER_BWD's tiles without their dQ phase (dq_split="none"), the
# dQ pass computing dQ; other head dims the mma.sync backward without its dQ phase.
DETERMINISTIC_BWD_SM90 = {**{key: bwd for key, (_, bwd) in _TILES_SM90_MMA.items()},
                          **{key: replace(cfg, dq_split="none") for key, cfg in HOPPER_BWD.items()}}
# The deterministic dQ pass (deterministic=True), by head_dim class, every GPU: one 16-row strip per
# warp as in the forward; chosen to fit without spills, not tuned (bench/NOTES.md).
DQ_TILES = {32: DqConfig(128, 64, 8), 64: DqConfig(128, 64, 8), 96: DqConfig(64, 64, 4), 128: DqConfig(64, 64, 4),
            160: DqConfig(64, 32, 4), 192: DqConfig(64, 32, 4), 256: DqConfig(64, 32, 4)}
# When a table entry needs more shared memory than the GPU lets one block have (sm_86 and sm_89
# allow 99 KB), it is shrunk until it fits (shrink_to_fit); these smallest tiles are the last resort.
SMALL_TILES = (F(64, 32, 4), G(32, 32, 4, 1, balanced=False))  # row-first: the balanced layout spills (variants)
SMALL_DQ = (DqConfig(64, 32, 4), DqConfig(32, 32, 2), DqConfig(16, 32, 1))  # the first that fits
F32 = F32Config()

# The decode kernel by head_dim class: (warps, stages). Four warps of 16 keys (64-key tiles); three
# stages keep two tiles (64 KB at head_dim 128) in flight per block with two blocks per SM on
# sm_90; head_dim 160-256 take two stages (one m-tile of rows: two do not fit in registers).
DECODE_TILES = {32: (4, 4), 64: (4, 4), 96: (4, 3), 128: (4, 3), 160: (4, 2), 192: (4, 2), 256: (4, 2)}
#: query rows per decode block beyond which a KV-cache call runs the prefill kernels instead
#: (dense caches; a paged cache always takes the decode kernel, in row tiles of decode_rows)
DECODE_MAX_ROWS = 64
#: the decode kernel's TMA loads on sm_90 (head dims a multiple of 64): 1.07x the cp.async loads at
#: head_dim 128, level with cuDNN and FA4 (bench/NOTES.md, session 12)
DECODE_TMA = True
#: (warps, stages) with TMA loads: 8 warps x 2 stages (128-key tiles, one block per SM) was the
#: fastest of 4x3, 4x4, 8x2 and 8x3 at head_dim 128 with 16-row blocks on an H100, by 0-1% (the others
#: ties); the other head dims take the same tile (not measured), 32-row blocks DECODE_TILES' (the
#: 8 warps' merge does not fit in two stages); shrunk to fit like the cp.async tiles
DECODE_TILE_TMA = (8, 2)
#: pages smaller than this take the cp.async loads: TMA's one box per page and 64 columns read a
#: 16-token paged cache at 0.85x of the dense one, the cp.async loads at 0.96x of TMA's dense
#: (H100, bench/NOTES.md, session 12)
DECODE_TMA_MIN_PAGE = 64


def decode_config(head_dim_cls: int, rows: int, itemsize: int, cc: int, tma: bool | None = None,
                  page_size: int | None = None) -> DecodeConfig:
    """The decode tile for ``rows`` query rows per kv head (group x new tokens): 32-row blocks where
    more than 16 rows and head_dim <= 128 (O's registers), else 16; TMA loads on sm_90 where ``tma``
    (default: DECODE_TMA) allows, for a dense cache or pages of DECODE_TMA_MIN_PAGE keys or more;
    until it fits the device's shared memory, stages dropped (to 2), then warps halved
    (64-key tiles to 32: head_dim 192 and 256 on sm_86 and sm_89)."""
    tma = (DECODE_TMA if tma is None else tma) and (page_size is None or page_size >= DECODE_TMA_MIN_PAGE)
    loads = "tma" if tma and cc == 90 and head_dim_cls % 64 == 0 else "cp.async"
    block_rows = 32 if rows > 16 and head_dim_cls <= 128 else 16
    cfg = DecodeConfig(block_rows, *DECODE_TILES[head_dim_cls], loads)
    if loads == "tma":  # DECODE_TILE_TMA where the warps' merge fits in its stages (16-row blocks)
        wide = DecodeConfig(block_rows, *DECODE_TILE_TMA, loads)
        cfg = wide if wide.merge_bytes(head_dim_cls) <= wide.stages * wide.stage_bytes(head_dim_cls, itemsize) else cfg
    while cfg.smem_bytes(head_dim_cls, itemsize) > smem_optin(cc) and (cfg.stages > 2 or cfg.num_warps > 1):
        cfg = replace(cfg, stages=cfg.stages - 1) if cfg.stages > 2 else replace(cfg, num_warps=cfg.num_warps // 2)
    return cfg


#: shared memory one block may opt in to, by compute capability (cudaDevAttrMaxSharedMemoryPerBlockOptin)
SMEM_OPTIN = {80: 163 * 1024, 87: 163 * 1024, 90: 227 * 1024}
SMEM_OPTIN_OTHER = 99 * 1024  # sm_86, sm_89, sm_120 and unknown GPUs


def smem_optin(cc: int) -> int:
    return SMEM_OPTIN.get(cc, SMEM_OPTIN_OTHER)


def _warp_grid_fits(rows: int, cols: int, warps: int, balanced: bool) -> bool:
    """WarpGrid<rows, cols, warps, balanced> in traits.cuh has a layout: warps_r warps down the rows,
    warps / warps_r across, each with whole 16-row m-tiles and an even number of 8-column n-tiles."""
    def fits(r):
        return r >= 1 and warps % r == 0 and rows % (16 * r) == 0 and cols % (16 * (warps // r)) == 0
    if not balanced:
        return fits(min(rows // 16, warps))
    return any(fits(r) for r in (1, 2, 4, 8, 16, 32) if r <= warps)


def valid_tile(cfg, head_dim_cls: int) -> bool:
    """Does the mma.sync kernel compile for this tile (the static_asserts of traits.cuh, mirrored)?"""
    if isinstance(cfg, FwdConfig):
        return (cfg.block_m % (16 * cfg.num_warps) == 0 and cfg.block_m >= 16 * cfg.num_warps
                and cfg.block_n % 16 == 0 and head_dim_cls % 32 == 0)
    if isinstance(cfg, BwdConfig):
        return (cfg.q_stages in (1, 2) and cfg.block_m % 32 == 0 and cfg.block_n % 16 == 0 and head_dim_cls % 32 == 0
                and all(_warp_grid_fits(r, c, cfg.num_warps, cfg.balanced)
                        for r, c in ((cfg.block_n, cfg.block_m), (cfg.block_n, head_dim_cls), (cfg.block_m, head_dim_cls))))
    return True  # the Hopper and fp32 configurations come from their own tables


def shrink_to_fit(cfg, head_dim_cls: int, itemsize: int, limit: int, smallest):
    """The rule for a tile that needs more shared memory than one block may have: keep its warps and
    layout, halve BLOCK_N, then BLOCK_M (never below 32), then, in the backward, drop the second
    query-tile stage (one stage at 255 registers spilled on sm_80), taking the first valid tile that
    fits; ``smallest`` if none does."""
    if cfg.smem_bytes(head_dim_cls, itemsize) <= limit:
        return cfg
    steps, cur = [], cfg
    while cur.block_n > 32 or cur.block_m > 32:
        cur = replace(cur, block_n=cur.block_n // 2) if cur.block_n > 32 else replace(cur, block_m=cur.block_m // 2)
        steps.append(cur)
    if isinstance(cfg, BwdConfig) and cfg.q_stages == 2:
        steps += [replace(c, q_stages=1) for c in [cfg, *steps]]
    for c in steps:
        if valid_tile(c, head_dim_cls) and c.smem_bytes(head_dim_cls, itemsize) <= limit:
            return c
    return smallest


def tile_table(cc: int) -> dict:
    """The tile table for compute capability ``cc`` (e.g. 90 for sm_90)."""
    return TILES_SM90 if cc == 90 else TILES_DEFAULT


@functools.lru_cache(maxsize=None)  # built for every launch (host time of short calls)
def _instance(kernel: str, *args) -> str:
    """The name expression of one instantiation, cupyflash::kernel<args...>, bools as C++ bools."""
    return f"cupyflash::{kernel}<{', '.join(('true' if a else 'false') if isinstance(a, bool) else str(a) for a in args)}>"


@dataclass(frozen=True)
class KernelSet:
    """The kernels one (dtype, head_dim class, variant) problem runs, with their template arguments.
    ``causal``: the tile table's masked entries (a causal or window mask); ``variant``: the
    kernels' VARIANT bits (variant_bits), by default causal's mask alone."""
    dtype: np.dtype
    head_dim_cls: int
    causal: bool
    fwd: FwdConfig | Sm90FwdConfig | F32Config
    bwd: BwdConfig | Sm90BwdConfig | F32Config
    #: the deterministic dQ pass, or None: dQ accumulated with atomics by the backward kernel
    dq: DqConfig | F32Config | None = None
    variant: int = -1
    #: the source before kernel_source() that defines the call's mask_mod and bias_mod
    #: (_sources.user_terms): its own module; "" for every other call
    user: str = ""

    def __post_init__(self):
        if self.variant == -1:
            object.__setattr__(self, "variant", MASK_CAUSAL if self.causal else MASK_NONE)

    @property
    def sinks(self) -> bool:
        return bool(self.variant & VARIANT_SINKS)

    @property
    def packed(self) -> bool:
        """Packed sequences (varlen): every kernel reads cu_seqlens."""
        return bool(self.variant & VARIANT_VARLEN)

    @property
    def deterministic(self) -> bool:
        return self.dq is not None

    @property
    def tensor_cores(self) -> bool:
        return self.dtype != FLOAT32

    @property
    def hopper_fwd(self) -> bool:
        return isinstance(self.fwd, Sm90FwdConfig)

    @property
    def hopper_bwd(self) -> bool:
        return isinstance(self.bwd, Sm90BwdConfig)

    def fwd_name(self) -> str:
        cls, c = self.head_dim_cls, self.variant
        if not self.tensor_cores:
            return _instance("flash_fwd_f32_kernel", cls, c)
        f, t = self.fwd, CXX_TYPE[self.dtype]
        if self.hopper_fwd:
            return _instance("flash_fwd_sm90_kernel", t, f.head_dim(cls), f.block_n, f.num_wg, c)
        return _instance("flash_fwd_kernel", t, cls, f.block_m, f.block_n, f.num_warps, c)

    def bwd_name(self) -> str:
        cls, c = self.head_dim_cls, self.variant
        if not self.tensor_cores:
            return _instance("flash_bwd_f32_kernel", cls, c)
        g, t = self.bwd, CXX_TYPE[self.dtype]
        if self.hopper_bwd:
            return _instance("flash_bwd_sm90_kernel", t, Sm90FwdConfig.head_dim(cls), g.block_m, g.num_wg,
                             DQ_SPLITS.index(g.dq_split), c)
        return _instance("flash_bwd_kernel", t, cls, g.block_m, g.block_n, g.num_warps, g.q_stages, g.balanced, c,
                         not self.deterministic)

    def dq_name(self) -> str:
        cls, c = self.head_dim_cls, self.variant
        if not self.tensor_cores:
            return _instance("flash_bwd_dq_f32_kernel", cls, c)
        d = self.dq
        return _instance("flash_bwd_dq_kernel", CXX_TYPE[self.dtype], cls, d.block_m, d.block_n, d.num_warps, c)

    def preprocess_name(self) -> str:
        return _instance("flash_bwd_preprocess_kernel", CXX_TYPE[self.dtype], self.packed)

    def convert_name(self) -> str:
        return _instance("flash_bwd_convert_dq_kernel", CXX_TYPE[self.dtype], self.packed)

    @staticmethod
    def dsinks_name() -> str:
        return "cupyflash::flash_bwd_dsinks_kernel"

    @property
    def kv_lengths(self) -> bool:
        """Per-sequence key counts (a KV cache): the append kernel comes with the set."""
        return bool(self.variant & VARIANT_KVLEN)

    def append_name(self) -> str:
        return append_name(self.dtype)

    def name_expressions(self) -> tuple[str, ...]:
        last = self.dq_name() if self.deterministic else self.convert_name()
        return ((self.fwd_name(), self.bwd_name(), self.preprocess_name(), last) + ((self.dsinks_name(),) if self.sinks else ())
                + ((self.append_name(),) if self.kv_lengths else ()))

    def fwd_threads(self) -> int:
        return 32 * self.fwd.num_warps

    def bwd_threads(self) -> int:
        return 32 * self.bwd.num_warps

    def with_block_list(self, block: tuple, seqlen_q: int, seqlen_k: int, group: int, cc: int,
                        element_mask: bool = True, reads_memory: bool = True) -> "KernelSet":
        """This set with VARIANT_BLOCKS when its forward and backward can walk only a block mask's kept
        tiles: tensor-core kernels whose tiles divide the mask's ``block`` (each tile in one block),
        with room after their shared memory for the lists (key_list_bytes, query_list_bytes); itself
        otherwise (every tile visited, the block mask applied element by element). ``element_mask``:
        is a mask left to evaluate per element once the tiles are listed (the call's own, or the
        block mask's rule on its partial blocks)? Without one VARIANT_USER_MASK goes; with one that
        ``reads_memory`` on every tile (the call's own aux mask_mod, the mask tensor:
        _sources.element_mask), the Hopper forward at head_dim 128 and up halves BLOCK_N (an aux
        mask_mod with a causal block mask spilled 188-220 bytes there at 128 keys, nothing at 64; a
        document rule on the partial blocks alone spills nothing at 128 since the forward evaluates
        a tile's terms ahead; offline, NVRTC 13.0, bench/NOTES.md sessions 12 and 14)."""
        if not self.tensor_cores or self.variant & (VARIANT_VARLEN | VARIANT_KVLEN):
            return self
        listed = replace(self, variant=self.variant | VARIANT_BLOCKS)
        limit = smem_optin(cc)
        if (block[0] % self.fwd.block_m or block[1] % self.fwd.block_n or block[0] % self.bwd.block_m
                or block[1] % self.bwd.block_n or self.fwd_smem() + listed.key_list_bytes(seqlen_k) > limit
                or self.bwd_smem() + listed.query_list_bytes(seqlen_q, group) > limit):
            return self
        if not element_mask:
            return replace(listed, variant=listed.variant & ~VARIANT_USER_MASK)
        if reads_memory and self.hopper_fwd and self.fwd.head_dim(self.head_dim_cls) >= 128 and self.fwd.block_n > 64:
            return replace(listed, fwd=replace(self.fwd, block_n=64))
        return listed

    def key_list_bytes(self, seqlen_k: int) -> int:
        """VARIANT_BLOCKS: the forward's list of kept key tiles (one short per key tile), after its shared memory."""
        return 2 * -(-seqlen_k // self.fwd.block_n) if self.variant & VARIANT_BLOCKS else 0

    def query_list_bytes(self, seqlen_q: int, group: int) -> int:
        """VARIANT_BLOCKS: the backward's list of kept (query head, query tile) pairs (one int each),
        after its shared memory."""
        return 4 * group * -(-seqlen_q // self.bwd.block_m) if self.variant & VARIANT_BLOCKS else 0

    def fwd_smem(self) -> int:
        if not self.tensor_cores:
            return self.fwd.fwd_smem_bytes(self.head_dim_cls)
        return self.fwd.smem_bytes(self.head_dim_cls, self.dtype.itemsize)

    def bwd_smem(self) -> int:
        if not self.tensor_cores:
            return self.bwd.bwd_smem_bytes(self.head_dim_cls)
        return self.bwd.smem_bytes(self.head_dim_cls, self.dtype.itemsize)

    def dq_threads(self) -> int:
        return 32 * self.dq.num_warps

    def dq_smem(self) -> int:
        if not self.tensor_cores:
            return self.dq.dq_smem_bytes(self.head_dim_cls)
        return self.dq.smem_bytes(self.head_dim_cls, self.dtype.itemsize)

    def describe(self) -> str:
        det = "" if self.variant in (MASK_NONE, MASK_CAUSAL) else f"; variant {variant_text(self.variant)}"
        if self.deterministic:
            det += ("; deterministic dQ pass" if not self.tensor_cores else
                   f"; deterministic dQ pass BLOCK_M={self.dq.block_m} BLOCK_N={self.dq.block_n} warps={self.dq.num_warps}")
        return self._describe() + det

    def _describe(self) -> str:
        if not self.tensor_cores:
            return f"fp32 CUDA-core kernels, 32x32 tiles, head_dim padded to {self.head_dim_cls}"
        f, g = self.fwd, self.bwd
        fwd = (f"fwd wgmma (sm_90a) head_dim {f.head_dim(self.head_dim_cls)} BLOCK_M={f.block_m} BLOCK_N={f.block_n} "
               f"warpgroups={f.num_wg} loads by TMA" if self.hopper_fwd else
               f"fwd BLOCK_M={f.block_m} BLOCK_N={f.block_n} warps={f.num_warps}")
        bwd = (f"bwd wgmma (sm_90a) BLOCK_M={g.block_m} BLOCK_N={g.block_n} warpgroups={g.num_wg} dQ by {g.dq_split} "
               f"loads by TMA"
               if self.hopper_bwd else
               f"bwd BLOCK_M={g.block_m} BLOCK_N={g.block_n} warps={g.num_warps} stages={g.q_stages}")
        return f"{dtype_name(self.dtype)} mma.sync m16n8k16, head_dim padded to {self.head_dim_cls}; {fwd}; {bwd}"


def kernel_set(dtype, head_dim: int, causal: bool, cc: int = 90,
               fwd: FwdConfig | Sm90FwdConfig | None = None,
               bwd: BwdConfig | Sm90BwdConfig | None = None,
               deterministic: bool = False, seqlen_k: int | None = None, variant: int | None = None,
               tuned: dict | None = None) -> KernelSet:
    """The kernels for ``dtype``, ``head_dim`` and ``causal`` on compute capability ``cc``,
    from the tile table unless ``fwd``/``bwd`` override it (tuning). ``deterministic``: the
    backward pass leaves dQ to the dQ pass (no atomics), and so runs the mma.sync backward
    kernel, whose dK, dV are reproducible and whose dQ phase can be skipped. ``seqlen_k`` at
    or below HOPPER_FWD_SHORT_SEQLEN_K picks the mma.sync forward on Hopper (None: long).
    ``variant``: the VARIANT bits (variant_bits); None: causal's mask alone. A causal or window
    mask takes the table's causal tiles, whatever ``causal`` says. ``tuned``: this device's tuned
    tiles by entry key (cupyflash.tune.active_table), which win over the built-in table."""
    dtype = np.dtype(dtype)
    if variant is None:
        variant = MASK_CAUSAL if causal else MASK_NONE
    causal = bool(variant & 3)
    cls = head_dim_class(head_dim)
    if dtype == FLOAT32:
        return KernelSet(dtype, cls, causal, F32, F32, F32 if deterministic else None, variant)
    if dtype not in (FLOAT16, BFLOAT16):
        raise ValueError(f"no GPU kernels for dtype {dtype_name(dtype)}")
    if isinstance(bwd, Sm90BwdConfig) and deterministic != (bwd.dq_split == "none"):
        raise ValueError("the wgmma backward leaves dQ to the dQ pass exactly when deterministic=True: "
                         f"dq_split='none' with deterministic=True, another split without; got "
                         f"dq_split={bwd.dq_split!r}, deterministic={deterministic}")
    if (isinstance(bwd, Sm90BwdConfig) and bwd.dq_split == "panel"
            and bwd.block_m * Sm90FwdConfig.head_dim(cls) != bwd.num_wg * 64 * 64):
        raise ValueError(f"Sm90BwdConfig(dq_split='panel') needs block_m * head_dim = num_wg 64 x 64 panels, got "
                         f"block_m={bwd.block_m}, head_dim class {cls}, num_wg={bwd.num_wg}")
    table_fwd, table_bwd = tile_table(cc)[(cls, causal)]
    if isinstance(table_fwd, Sm90FwdConfig) and seqlen_k is not None and seqlen_k <= HOPPER_FWD_SHORT_SEQLEN_K:
        table_fwd = _TILES_SM90_MMA[(cls, causal)][0]
    if tuned:
        from .tune import entry_key, length_class
        table_fwd = tuned.get(entry_key(dtype, cls, causal, "fwd", length_class(seqlen_k)), table_fwd)
        if not deterministic:
            table_bwd = tuned.get(entry_key(dtype, cls, causal, "bwd", "long"), table_bwd)
    if deterministic and cc == 90:
        table_bwd = DETERMINISTIC_BWD_SM90[(cls, causal)]
    if (isinstance(table_bwd, Sm90BwdConfig) and table_bwd.block_m == 128
            and variant & SCORE_WORK):
        # 128-query tiles leave no registers for the softcap or ALiBi element work (76-92 bytes
        # spilled with a mask); 64-query tiles with dQ by keys spill nothing (bench/NOTES.md, variants)
        table_bwd = Sm90BwdConfig(table_bwd.num_wg, "none" if deterministic else "keys", 64)
    if isinstance(table_fwd, Sm90FwdConfig) and variant & (VARIANT_USER_BIAS | VARIANT_DROPOUT):
        # a bias_mod's per-element work: a T5-style table lookup spilled 1-2 KB at BLOCK_N 128 (64 at
        # head_dim 192) and nothing at half of it; dropout's generator 20-216 bytes (offline, NVRTC
        # 13.0; bench/NOTES.md, session 12)
        table_fwd = replace(table_fwd, block_n=max(32, table_fwd.block_n // 32 * 16))
    if (isinstance(table_bwd, BwdConfig) and table_bwd.balanced and cls >= 192
            and variant & SCORE_WORK):
        # the mma.sync backward's balanced warp layout at 255 registers spilled 16-24 bytes with ALiBi
        # and a mask at head_dim 256 (NVRTC 13.5); row-first spills nothing (bench/NOTES.md, session 9)
        table_bwd = replace(table_bwd, balanced=False)
    limit = smem_optin(cc)
    table_fwd = shrink_to_fit(table_fwd, cls, dtype.itemsize, limit, SMALL_TILES[0])
    table_bwd = shrink_to_fit(table_bwd, cls, dtype.itemsize, limit, SMALL_TILES[1])
    dq = None
    if deterministic:
        dq = next(c for c in (DQ_TILES[cls], *SMALL_DQ) if c.smem_bytes(cls, dtype.itemsize) <= limit)
    return KernelSet(dtype, cls, causal, fwd or table_fwd, bwd or table_bwd, dq, variant)


def append_name(dtype) -> str:
    """The KV-cache append kernel's name expression."""
    return _instance("kvcache_append_kernel", CXX_TYPE[np.dtype(dtype)])


@dataclass(frozen=True)
class DecodeSet:
    """The kernels of one KV-cache decode problem: the decode kernel (dtype, head_dim class, tile,
    VARIANT bits, paged or dense cache), split-KV's combine and the append, compiled as one module."""
    dtype: np.dtype
    head_dim_cls: int
    cfg: DecodeConfig
    variant: int
    paged: bool

    def decode_name(self) -> str:
        c = self.cfg
        return _instance("flash_decode_kernel", CXX_TYPE[self.dtype], self.head_dim_cls, c.rows, c.num_warps, c.stages,
                         DECODE_LOADS.index(c.loads), self.variant, self.paged)

    def combine_name(self) -> str:
        return _instance("flash_decode_combine_kernel", CXX_TYPE[self.dtype], bool(self.variant & VARIANT_SINKS))

    def name_expressions(self) -> tuple[str, ...]:
        return (self.decode_name(), self.combine_name(), append_name(self.dtype))

    def threads(self) -> int:
        return 32 * self.cfg.num_warps

    def smem(self) -> int:
        return self.cfg.smem_bytes(self.head_dim_cls, self.dtype.itemsize)

    def describe(self) -> str:
        c = self.cfg
        return (f"{dtype_name(self.dtype)} decode ({'paged' if self.paged else 'dense'} cache) rows={c.rows} "
                f"BLOCK_N={c.block_n} warps={c.num_warps} stages={c.stages} loads by {c.loads}, head_dim padded to {self.head_dim_cls}; "
                f"variant {variant_text(self.variant)}")
