// Compile-time kernel traits: tile sizes, warp layouts and shared-memory footprints.
// Mirrored on the Python side by cupyflash/_config.py (FwdConfig, BwdConfig and their smem_bytes).
#pragma once
#include "tile.cuh"
#include "hopper.cuh"

namespace cupyflash {

constexpr float LOG2E = 1.4426950408889634f;  // log2(e): lse (natural log) -> base-2 exponent

// A warp grid over a ROWS x COLS output tile, WARPS_R warps down the rows and WARPS_C across the
// columns; each warp owns MT 16-row m-tiles by NT 8-column n-tiles. BALANCED: of the layouts that
// divide the tile, the one that loads the fewest ldmatrix.x4 per mma, (MT + NT/2) / (MT * NT)
// (shared-memory bandwidth, not the tensor cores, bounds a warp that owns a thin strip);
// otherwise as many warps down the rows as 16-row m-tiles allow (fewer registers).
template <int ROWS, int COLS, int NUM_WARPS, bool BALANCED>
struct WarpGrid {
    __host__ __device__ static constexpr bool fits(int warps_r) {
        return warps_r >= 1 && NUM_WARPS % warps_r == 0 && ROWS % (16 * warps_r) == 0 &&
               COLS % (16 * (NUM_WARPS / warps_r)) == 0;  // NT even: ldmatrix.x4 loads two n-tiles
    }
    // ldmatrix.x4 per mma, times MT * NT * 2 to stay in integers: 2 * MT + NT
    __host__ __device__ static constexpr int cost(int warps_r) {
        return 2 * (ROWS / 16 / warps_r) + COLS / 8 / (NUM_WARPS / warps_r);
    }
    __host__ __device__ static constexpr int work(int warps_r) { return (ROWS / 16 / warps_r) * (COLS / 8 / (NUM_WARPS / warps_r)); }
    __host__ __device__ static constexpr bool better(int a, int b) {  // is layout a cheaper than b (cost per mma)?
        return !fits(b) || (fits(a) && cost(a) * work(b) < cost(b) * work(a));
    }
    __host__ __device__ static constexpr int pick() {
        if (!BALANCED) return (ROWS / 16 < NUM_WARPS) ? ROWS / 16 : NUM_WARPS;
        int best = 0;  // on a tie, fewer m-tiles per warp: fewer A-fragment registers
        for (int r = NUM_WARPS; r >= 1; r /= 2)
            if (fits(r) && (best == 0 || better(r, best))) best = r;
        return best;
    }
    static constexpr int WARPS_R = pick();
    static constexpr int WARPS_C = NUM_WARPS / (WARPS_R > 0 ? WARPS_R : 1);
    static constexpr int MT = ROWS / 16 / (WARPS_R > 0 ? WARPS_R : 1);
    static constexpr int NT = COLS / 8 / WARPS_C;
    static_assert(WARPS_R > 0, "no warp layout tiles this output evenly with an even number of n-tiles per warp");
    static_assert(WARPS_R * WARPS_C == NUM_WARPS, "warps must tile the output evenly");
    static_assert(MT * 16 * WARPS_R == ROWS && NT * 8 * WARPS_C == COLS, "tile must split evenly across warps");
    static_assert(NT % 2 == 0, "each warp needs an even number of 8-column n-tiles (ldmatrix.x4 loads two)");
    __device__ static int row0(int warp) { return (warp % WARPS_R) * MT * 16; }
    __device__ static int col0(int warp) { return (warp / WARPS_R) * NT * 8; }
};

// Forward: each warp owns BLOCK_M / NUM_WARPS whole query rows (no cross-warp row statistics).
template <typename T_, int HEAD_DIM_, int BLOCK_M_, int BLOCK_N_, int NUM_WARPS_>
struct FwdTraits {
    using T = T_;
    static constexpr int HEAD_DIM = HEAD_DIM_, BLOCK_M = BLOCK_M_, BLOCK_N = BLOCK_N_, NUM_WARPS = NUM_WARPS_;
    static constexpr int NUM_THREADS = NUM_WARPS * 32;
    static constexpr int MT = BLOCK_M / (16 * NUM_WARPS);  // 16-row m-tiles per warp
    static constexpr int NT = BLOCK_N / 8;                 // 8-key n-tiles of S per warp
    static constexpr int DT = HEAD_DIM / 8;                // 8-wide d-tiles of O per warp
    static constexpr int STRIDE = SmemRow<HEAD_DIM>::STRIDE;
    static constexpr int LOAD_UNROLL = 2;  // partial unroll of the K/V loader: no spills at 255 registers
    static constexpr int SMEM_Q = BLOCK_M * STRIDE, SMEM_K = BLOCK_N * STRIDE, SMEM_V = BLOCK_N * STRIDE;
    static constexpr int SMEM_BYTES = (SMEM_Q + SMEM_K + SMEM_V) * int(sizeof(T));
    static_assert(sizeof(T) == 2, "the tensor-core path takes fp16 or bf16");
    static_assert(MT >= 1 && MT * 16 * NUM_WARPS == BLOCK_M, "BLOCK_M must be a multiple of 16 * NUM_WARPS");
    static_assert(BLOCK_N % 16 == 0 && HEAD_DIM % 32 == 0, "BLOCK_N multiple of 16, HEAD_DIM multiple of 32");
};

// The registers per thread of a warp-specialised Hopper block (one producer warpgroup, consumer
// warpgroups), for setmaxnreg. setmaxnreg only moves the registers the block was launched with
// (NUM_THREADS x the per-thread launch allocation): what the producer (one thread issuing TMA
// copies) gives up is what the consumers may take, in setmaxnreg's steps of 8, at most 240.
template <int PRODUCER_THREADS, int CONSUMER_THREADS>
struct SetmaxnregSplit {
    static constexpr int NUM_THREADS = PRODUCER_THREADS + CONSUMER_THREADS;
    static constexpr int PRODUCER_REGS = 40;
    static constexpr int LAUNCH_REGS = 65536 / NUM_THREADS / 8 * 8 < 248 ? 65536 / NUM_THREADS / 8 * 8 : 248;
    static constexpr int CONSUMER_REGS_FIT =
        (NUM_THREADS * LAUNCH_REGS - PRODUCER_THREADS * PRODUCER_REGS) / CONSUMER_THREADS / 8 * 8;
    static constexpr int CONSUMER_REGS = CONSUMER_REGS_FIT < 240 ? CONSUMER_REGS_FIT : 240;
    static_assert(PRODUCER_THREADS * PRODUCER_REGS + CONSUMER_THREADS * CONSUMER_REGS <= NUM_THREADS * LAUNCH_REGS,
                  "setmaxnreg.inc would wait forever for registers the block does not have");
};

// Forward on Hopper (sm_90a): a producer warpgroup loading K_j, V_j into STAGES swizzled
// shared-memory stages (tile j+1 loading while K_j and V_{j-1} are read; one thread issues each
// tile's TMA boxes), and NUM_WG consumer warpgroups each owning 64 whole query rows. The accumulators are one 64-row wgmma tile per
// consumer warpgroup: per warp one 16-row strip of NT (S) and DT (O) 8-column tiles. Registers
// move from the producer (one thread issuing TMA copies) to the consumers with setmaxnreg.
template <typename T_, int HEAD_DIM_, int BLOCK_N_, int NUM_WG_>
struct FwdTraitsSm90 {
    using T = T_;
    static constexpr int HEAD_DIM = HEAD_DIM_, BLOCK_N = BLOCK_N_, NUM_WG = NUM_WG_;
    static constexpr int BLOCK_M = 64 * NUM_WG, STAGES = 3;
    static constexpr int PRODUCER_THREADS = 128, CONSUMER_THREADS = 128 * NUM_WG;
    static constexpr int NUM_THREADS = PRODUCER_THREADS + CONSUMER_THREADS;
    static constexpr int PRODUCER_REGS = SetmaxnregSplit<PRODUCER_THREADS, CONSUMER_THREADS>::PRODUCER_REGS;
    static constexpr int CONSUMER_REGS = SetmaxnregSplit<PRODUCER_THREADS, CONSUMER_THREADS>::CONSUMER_REGS;
    static constexpr int NT = BLOCK_N / 8, DT = HEAD_DIM / 8;
    using TileQ = SwizzledTile<BLOCK_M, HEAD_DIM>;
    using TileKV = SwizzledTile<BLOCK_N, HEAD_DIM>;
    static constexpr int ALIGN = 1024;     // the swizzle is a function of the address: panels start on 1024-byte boundaries
    static constexpr int BARRIER_BYTES = 64;  // q_full, full[STAGES], empty[STAGES]: 8 bytes each
    static constexpr int SCRATCH_BYTES = 4 * CONSUMER_THREADS;  // one word per consumer thread (pin_before_wait)
    static constexpr int SMEM_BYTES = ALIGN + TileQ::BYTES + 2 * STAGES * TileKV::BYTES + BARRIER_BYTES + SCRATCH_BYTES;
    static_assert(sizeof(T) == 2, "the tensor-core path takes fp16 or bf16");
    static_assert(HEAD_DIM % 64 == 0 && HEAD_DIM <= 256, "wgmma tiles: HEAD_DIM a multiple of 64, at most 256 (N of O += P V)");
    static_assert(BLOCK_N % 16 == 0 && BLOCK_N <= 256, "BLOCK_N a multiple of 16, at most 256 (N of S = Q K^T)");
    static_assert(NUM_WG >= 1 && NUM_WG <= 2, "one or two consumer warpgroups (three leave too few registers each)");
    static_assert(8 * (1 + 2 * STAGES) <= BARRIER_BYTES, "mbarrier space");
};

// How the Hopper backward splits dQ_i = dS K_j among its consumer warpgroups (each dQ element
// then reaches the fp32 accumulator NUM_WG times, or once):
//   DQ_KEYS:  warpgroup w computes every head_dim column over its own 64 keys and adds it (NUM_WG);
//   DQ_PANEL: the BLOCK_M x HEAD_DIM tile is NUM_WG panels of 64 x 64; warpgroup w computes panel
//             w (query rows [64 qp, 64 qp + 64), head_dim columns [64 dp, 64 dp + 64)) over all
//             BLOCK_N keys, reading both warpgroups' dS^T tiles (once);
//   DQ_NONE:  no dQ here (deterministic=True: the dQ pass computes it without atomics).
// (A third split, the DQ_KEYS partials summed through shared memory before one add, measured
// 12-24% slower than DQ_PANEL with 128-query tiles at head_dim 64 and was removed: NOTES v3.2.)
enum DqSplit { DQ_KEYS = 0, DQ_PANEL = 1, DQ_NONE = 2 };

// Backward on Hopper (sm_90a) (bench/NOTES.md v3.0, v3.1, v3.5): one block per key tile of
// BLOCK_N = 64 * NUM_WG keys; consumer warpgroup w owns keys [64 w, 64 w + 64) and walks the
// query tiles of BLOCK_M rows that a producer warpgroup stages (Q_i, dO_i, lse_i, D_i, two stages;
// K_j, V_j, Q_i and dO_i by TMA). Each tile's products are pipelined (v3.8): S^T and dP^T in
// separate commit groups, dS^T exchanged while dV, dK run, dQ issued behind them unwaited.
template <typename T_, int HEAD_DIM_, int BLOCK_M_, int NUM_WG_, int DQ_SPLIT_>
struct BwdTraitsSm90 {
    using T = T_;
    static constexpr int HEAD_DIM = HEAD_DIM_, NUM_WG = NUM_WG_, DQ_SPLIT = DQ_SPLIT_;
    static constexpr int BLOCK_M = BLOCK_M_, BLOCK_N = 64 * NUM_WG, STAGES = 2;
    // DQ_PANEL: warpgroup w's 64 x 64 panel of the dQ tile
    static constexpr int DQ_COL_PANELS = HEAD_DIM / 64;
    static constexpr int PRODUCER_THREADS = 128, CONSUMER_THREADS = 128 * NUM_WG;
    static constexpr int NUM_THREADS = PRODUCER_THREADS + CONSUMER_THREADS;
    static constexpr int PRODUCER_REGS = SetmaxnregSplit<PRODUCER_THREADS, CONSUMER_THREADS>::PRODUCER_REGS;
    static constexpr int CONSUMER_REGS = SetmaxnregSplit<PRODUCER_THREADS, CONSUMER_THREADS>::CONSUMER_REGS;
    static constexpr int MT = BLOCK_M / 8, DT = HEAD_DIM / 8;  // 8-column tiles of S^T (queries) and of dK, dV, dQ
    using TileKV = SwizzledTile<BLOCK_N, HEAD_DIM>;  // K_j, V_j
    using TileQ = SwizzledTile<BLOCK_M, HEAD_DIM>;   // Q_i, dO_i
    using TileDS = SwizzledTile<64, BLOCK_M>;        // one warpgroup's dS^T, [key][query]
    static constexpr int ALIGN = 1024;
    static constexpr int ROW_STATS_BYTES = STAGES * 2 * BLOCK_M * 4;  // lse_i * log2(e) and D_i per stage
    static constexpr int BARRIER_BYTES = 64;                           // kv_full, full[STAGES], empty[STAGES]
    static constexpr int SMEM_BYTES = ALIGN + 2 * TileKV::BYTES + 2 * STAGES * TileQ::BYTES + NUM_WG * TileDS::BYTES +
                                      ROW_STATS_BYTES + BARRIER_BYTES;
    // named barriers (0: __syncthreads, 1 + w: warpgroup w)
    static constexpr int BAR_DS = 1 + NUM_WG;
    static_assert(sizeof(T) == 2, "the tensor-core path takes fp16 or bf16");
    static_assert(HEAD_DIM == 64 || HEAD_DIM == 128, "dK and dV accumulators for more than 128 columns do not fit in registers");
    static_assert(NUM_WG >= 1 && NUM_WG <= 2, "one or two consumer warpgroups");
    static_assert(BLOCK_M == 64 || BLOCK_M == 128, "query tiles of 64 or 128 rows (the N of S^T's wgmma)");
    static_assert(DQ_SPLIT != DQ_PANEL || BLOCK_M * HEAD_DIM == NUM_WG * 64 * 64, "DQ_PANEL: one 64 x 64 panel per warpgroup");
    static_assert(DQ_SPLIT != DQ_KEYS || BLOCK_M == 64, "dQ by keys: 64-row query tiles");
    static_assert(8 * (1 + 2 * STAGES) <= BARRIER_BYTES, "mbarrier space");
};

// Backward: one thread block per key tile K_j, V_j walking the query tiles Q_i.
// Phase A computes S^T and dP^T (BLOCK_N x BLOCK_M), phase B dK, dV (BLOCK_N x HEAD_DIM),
// phase C dQ_i (BLOCK_M x HEAD_DIM); each phase has its own warp grid.
template <typename T_, int HEAD_DIM_, int BLOCK_M_, int BLOCK_N_, int NUM_WARPS_, int Q_STAGES_, bool BALANCED_>
struct BwdTraits {
    using T = T_;
    static constexpr int HEAD_DIM = HEAD_DIM_, BLOCK_M = BLOCK_M_, BLOCK_N = BLOCK_N_, NUM_WARPS = NUM_WARPS_;
    static constexpr int Q_STAGES = Q_STAGES_;  // 2: Q_{i+1}, dO_{i+1} load while tile i computes
    static constexpr int NUM_THREADS = NUM_WARPS * 32;
    using GridA = WarpGrid<BLOCK_N, BLOCK_M, NUM_WARPS, BALANCED_>;
    using GridB = WarpGrid<BLOCK_N, HEAD_DIM, NUM_WARPS, BALANCED_>;
    using GridC = WarpGrid<BLOCK_M, HEAD_DIM, NUM_WARPS, BALANCED_>;
    static constexpr int STRIDE = SmemRow<HEAD_DIM>::STRIDE;   // rows of K, V, Q, dO
    static constexpr int P_STRIDE = SmemRow<BLOCK_M>::STRIDE;  // rows of P^T and dS^T
    static constexpr int SMEM_KV = 2 * BLOCK_N * STRIDE;
    static constexpr int SMEM_QDO = 2 * Q_STAGES * BLOCK_M * STRIDE;
    static constexpr int SMEM_P = 2 * BLOCK_N * P_STRIDE;
    static constexpr int SMEM_BYTES = (SMEM_KV + SMEM_QDO + SMEM_P) * int(sizeof(T)) + 2 * Q_STAGES * BLOCK_M * 4;
    static_assert(sizeof(T) == 2, "the tensor-core path takes fp16 or bf16");
    static_assert(Q_STAGES == 1 || Q_STAGES == 2, "one or two query-tile buffers");
    static_assert(HEAD_DIM % 32 == 0 && BLOCK_M % 32 == 0 && BLOCK_N % 16 == 0, "tile sizes");
};

// Deterministic dQ pass: one thread block per query tile Q_i (with dO_i) walking the key tiles
// K_j, V_j in two stages; each warp owns 16 * MT whole query rows, as in the forward.
template <typename T_, int HEAD_DIM_, int BLOCK_M_, int BLOCK_N_, int NUM_WARPS_>
struct DqTraits {
    using T = T_;
    static constexpr int HEAD_DIM = HEAD_DIM_, BLOCK_M = BLOCK_M_, BLOCK_N = BLOCK_N_, NUM_WARPS = NUM_WARPS_;
    static constexpr int NUM_THREADS = NUM_WARPS * 32, KV_STAGES = 2;
    static constexpr int MT = BLOCK_M / (16 * NUM_WARPS);  // 16-row m-tiles per warp
    static constexpr int NT = BLOCK_N / 8;                 // 8-key n-tiles of S and dP per warp
    static constexpr int DT = HEAD_DIM / 8;                // 8-wide d-tiles of dQ per warp
    static constexpr int STRIDE = SmemRow<HEAD_DIM>::STRIDE;
    static constexpr int SMEM_BYTES = (2 * BLOCK_M + 2 * KV_STAGES * BLOCK_N) * STRIDE * int(sizeof(T));
    static_assert(sizeof(T) == 2, "the tensor-core path takes fp16 or bf16");
    static_assert(MT >= 1 && MT * 16 * NUM_WARPS == BLOCK_M, "BLOCK_M must be a multiple of 16 * NUM_WARPS");
    static_assert(BLOCK_N % 16 == 0 && HEAD_DIM % 32 == 0, "BLOCK_N multiple of 16, HEAD_DIM multiple of 32");
};

// How the decode kernel loads K and V tiles (DecodeConfig.loads in cupyflash/_config.py).
enum DecodeLoads { LOAD_CP_ASYNC = 0, LOAD_TMA = 1 };

// Decode against a KV cache (flash_decode.cu): one block per (split of the keys, row tile, kv head,
// sequence). Its ROWS query rows (one or two 16-row m-tiles) are the kv head's group of query heads
// times the new tokens, so each K, V byte is read once per group. Key tiles of BLOCK_N keys stream
// through STAGES stages (decode_loads.cuh); warp w takes keys [KEYS_PER_WARP w, KEYS_PER_WARP (w + 1))
// of each tile with its own m, l and O, and the warps' partials are merged at the end (merge.cuh)
// in shared memory the stages leave free. Mirrored by DecodeConfig in cupyflash/_config.py.
// Shared memory: LOAD_CP_ASYNC: Q, then the stages of padded K and V rows, then the mbarriers;
// LOAD_TMA: (1024-byte aligned) the stages of swizzled K and V tiles, Q, the mbarriers (one per stage).
template <typename T_, int HEAD_DIM_, int ROWS_, int NUM_WARPS_, int STAGES_, int LOADS_>
struct DecodeTraits {
    using T = T_;
    static constexpr int HEAD_DIM = HEAD_DIM_, ROWS = ROWS_, NUM_WARPS = NUM_WARPS_, STAGES = STAGES_, LOADS = LOADS_;
    static constexpr bool TMA = LOADS == LOAD_TMA;
    static constexpr int NUM_THREADS = NUM_WARPS * 32;
    static constexpr int KEYS_PER_WARP = 16;               // one k-step of P V: the smallest warp slice
    static constexpr int BLOCK_N = KEYS_PER_WARP * NUM_WARPS;
    static constexpr int MT = ROWS / 16, NT = KEYS_PER_WARP / 8, DT = HEAD_DIM / 8;
    static constexpr int STRIDE = SmemRow<HEAD_DIM>::STRIDE;
    using TileKV = SwizzledTile<BLOCK_N, TMA ? HEAD_DIM : 64>;  // LOAD_TMA's K and V tiles
    static constexpr int Q_BYTES = ROWS * STRIDE * int(sizeof(T));
    static constexpr int STAGE_BYTES = TMA ? 2 * TileKV::BYTES : 2 * BLOCK_N * STRIDE * int(sizeof(T));  // K_j, then V_j
    static constexpr int ALIGN = TMA ? 1024 : 16;         // the swizzle is a function of the address
    static constexpr int Q_OFFSET = TMA ? STAGES * STAGE_BYTES : 0;
    static constexpr int STAGES_OFFSET = TMA ? 0 : Q_BYTES;
    static constexpr int BARRIER_OFFSET = Q_BYTES + STAGES * STAGE_BYTES;
    static constexpr int SMEM_BYTES = (TMA ? ALIGN : 0) + BARRIER_OFFSET + 8 * STAGES;
    static constexpr int O_STRIDE = HEAD_DIM + 4;            // fp32 rows of the merge: 16-byte aligned, fewer conflicts
    static constexpr int MERGE_BYTES = NUM_WARPS * ROWS * (O_STRIDE + 1) * 4;  // each warp's O / l and lse
    static constexpr int CHUNK = 16 / int(sizeof(T));        // elements per 16-byte copy
    static_assert(sizeof(T) == 2, "the tensor-core path takes fp16 or bf16");
    static_assert(ROWS == 16 || ROWS == 32, "one or two 16-row m-tiles");
    static_assert(HEAD_DIM % 32 == 0 && MT * HEAD_DIM <= 256, "O's accumulators: at most 256 fp32 columns of rows per thread pair");
    static_assert(!TMA || HEAD_DIM % 64 == 0, "TMA tiles are whole 64-column panels");
    static_assert(STAGES >= 2, "a stage loads while another is read");
    static_assert(BARRIER_OFFSET % 8 == 0 && Q_OFFSET % 16 == 0, "mbarriers 8-byte, Q 16-byte aligned");
    static_assert(MERGE_BYTES <= STAGES * STAGE_BYTES, "the merge reuses the stages");
    static_assert((BLOCK_N * (HEAD_DIM / CHUNK)) % NUM_THREADS == 0, "every thread copies as many chunks (the page shuffle needs whole warps)");
};

}  // namespace cupyflash
