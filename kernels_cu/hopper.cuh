// Hopper (sm_90a) building blocks: wgmma synchronisation, shared-memory matrix descriptors and
// tiles stored in the 128-byte-swizzled layout that wgmma reads without bank conflicts.
#pragma once
#include "wgmma.cuh"
#include "params.cuh"

namespace cupyflash {

// ---- wgmma ordering ----
// Registers written by ordinary instructions (accumulators, A fragments) are ready for wgmma.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
// The wgmma instructions issued since the last commit form one group.
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Wait until at most N groups are still running.
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(N) : "memory");
}
// Pin accumulator registers (and A fragments) in program order against the wgmma waits: NVCC
// sees wgmma_wait as touching no registers, so it could move reads of an accumulator above the
// wait that completes it (ptxas would then wait earlier on its own, ending the overlap with the
// running MMA), or reuse an A fragment's registers while its product still reads them.
__device__ __forceinline__ void pin_register(float& r) { asm volatile("" : "+f"(r) :: "memory"); }
__device__ __forceinline__ void pin_register(u32& r) { asm volatile("" : "+r"(r) :: "memory"); }
template <typename E, int N, int M>
__device__ __forceinline__ void fence_operands(E (&r)[N][M]) {
    #pragma unroll
    for (int i = 0; i < N; ++i)
        #pragma unroll
        for (int j = 0; j < M; ++j) pin_register(r[i][j]);
}

// threadIdx.x, read so that the compiler cannot hoist what is computed from it out of a loop: a
// consumer at the register limit then recomputes its per-tile places instead of keeping them live.
__device__ __forceinline__ int opaque_thread_index() {
    int t;
    asm volatile("mov.u32 %0, %%tid.x;\n" : "=r"(t));
    return t;
}

// Barrier among `threads` threads (whole warps) at named barrier `id` (0 is __syncthreads).
__device__ __forceinline__ void named_barrier(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" :: "r"(id), "r"(threads) : "memory");
}
// Barrier among the 128 threads of warpgroup wg (named barrier 1 + wg).
__device__ __forceinline__ void warpgroup_barrier(int wg) { named_barrier(1 + wg, 128); }

// Order "everything that computed x" before a following wgmma wait. ptxas hoists a wait above
// independent register work (the softmax meant to overlap the running MMA), and moves register
// work across barriers, but it keeps a shared-memory store before a barrier and the wait after
// it: store x (which depends on that work) to this thread's scratch word, then barrier.
__device__ __forceinline__ void pin_before_wait(float* scratch, float x, int wg) {
    asm volatile("st.shared.f32 [%0], %1;\n" :: "r"(smem_u32(scratch)), "f"(x) : "memory");
    warpgroup_barrier(wg);
}

// Shared memory written through the generic proxy (st.shared) becomes visible to the async proxy
// (wgmma operand reads); each writing thread issues it before the barrier.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// ---- mbarriers: stage handoff between the producer warpgroup and the consumers ----
__device__ __forceinline__ void mbarrier_init(u64* bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(smem_u32(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbarrier_arrive(u64* bar) {
    asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" :: "r"(smem_u32(bar)) : "memory");
}
// Block until the phase with parity `parity` of `bar` has completed.
__device__ __forceinline__ void mbarrier_wait(u64* bar, u32 parity) {
    u32 done = 0;
    while (!done)
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done) : "r"(smem_u32(bar)), "r"(parity) : "memory");
}

// ---- register reallocation between warpgroup roles (needs a register cap at kernel entry) ----
template <int REGS> __device__ __forceinline__ void setmaxnreg_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" :: "n"(REGS));
}
template <int REGS> __device__ __forceinline__ void setmaxnreg_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" :: "n"(REGS));
}

// ---- 128-byte-swizzled tiles ----
// A ROWS x COLS tile of 16-bit elements is stored as COLS / 64 panels of ROWS x 64 elements
// (one 128-byte line per row), each panel 1024-byte aligned. 16-byte chunk c of row r sits at
// chunk position c ^ (r % 8) of its line: the 8 rows of one 1024-byte block hit 8 different
// bank groups, which is the layout wgmma's 128-byte swizzle mode decodes.
template <int ROWS, int COLS>
struct SwizzledTile {
    static constexpr int PANEL_COLS = 64, LINE_BYTES = 128, ATOM_BYTES = 8 * LINE_BYTES;
    static constexpr int TILE_ROWS = ROWS;
    static constexpr int PANELS = COLS / PANEL_COLS;
    static constexpr int PANEL_BYTES = ROWS * LINE_BYTES;
    static constexpr int BYTES = PANELS * PANEL_BYTES;
    static_assert(COLS % PANEL_COLS == 0, "swizzled tiles are whole 64-column panels");
    static_assert(ROWS % 8 == 0, "swizzle atoms are 8 rows");
    // Shared-memory address of 16-byte chunk `chunk` (8 elements, counted across all panels) of
    // row r, for a tile at a 1024-byte-aligned `tile_addr`: chunk position c ^ (r % 8) is bits 4-6
    // of the address, so row r's chunks are one per-row base (line_addr) XOR (chunk << 4)
    // (chunk_addr). One register per row instead of one per (row, chunk), which a loop would
    // otherwise hoist and keep live (the wgmma backward spilled 16 such addresses at head_dim 128).
    __device__ static u32 line_addr(u32 tile_addr, int r) { return tile_addr + r * LINE_BYTES + ((r % 8) << 4); }
    __device__ static u32 chunk_addr(u32 line, int chunk) { return (line ^ ((chunk % 8) << 4)) + (chunk / 8) * PANEL_BYTES; }
};

// A B operand of warp_gemm / warp_gemm_rs (tile.cuh) in a swizzled tile, for ldmatrix: the tile's
// shared-state address and the operand's first row (keys: K read [n][k], V read [k][n] transposed).
// Lane l addresses row (l % 8) of matrix (l / 8) as load_b_frag_x2 does; each 16-byte chunk is
// found through the swizzle (8 consecutive rows: 8 different bank groups, conflict-free).
template <typename Tile>
struct SwizzledB {
    u32 tile_addr;
    int row0;
    template <bool B_KMAJOR>
    __device__ __forceinline__ void load_x2(u32 (&b)[4], int k0, int n0, int lane) const {
        if constexpr (B_KMAJOR) {  // stored [k][n]: rows k, chunks of n ("row bit", transposed)
            const int r = row0 + k0 + (lane & 7) + ((lane >> 3) & 1) * 8;
            ldmatrix_x4_trans(b, Tile::chunk_addr(Tile::line_addr(tile_addr, r), n0 / 8 + (lane >> 4)));
        } else {                   // stored [n][k]: rows n, chunks of k ("col bit")
            const int r = row0 + n0 + (lane & 7) + (lane >> 4) * 8;
            ldmatrix_x4(b, Tile::chunk_addr(Tile::line_addr(tile_addr, r), k0 / 8 + ((lane >> 3) & 1)));
        }
    }
};

// Warpgroup `wg` zeroes rows [r0, ROWS) of a swizzled tile (each row's lines in every panel; the
// swizzle moves chunks only within a line) and makes the zeros visible to its own later wgmma reads:
// the generic-proxy stores are fenced for the async proxy, then the warpgroup meets at a barrier.
// Several warpgroups may zero the same rows before reading them: the stores are idempotent.
template <typename Tile>
__device__ __forceinline__ void zero_rows_from(unsigned char* tile, int r0, int wg) {
    constexpr int CHUNKS = Tile::LINE_BYTES / 16;  // 16-byte stores per line
    const int count = (Tile::TILE_ROWS - r0) * CHUNKS * Tile::PANELS;
    for (int c = threadIdx.x % 128; c < count; c += 128) {
        const int panel = c / ((Tile::TILE_ROWS - r0) * CHUNKS), rest = c % ((Tile::TILE_ROWS - r0) * CHUNKS);
        *reinterpret_cast<uint4*>(tile + panel * Tile::PANEL_BYTES + (r0 + rest / CHUNKS) * Tile::LINE_BYTES +
                                  (rest % CHUNKS) * 16) = make_uint4(0, 0, 0, 0);
    }
    fence_proxy_async();
    warpgroup_barrier(wg);  // every thread's zeros are written before any thread's wgmma reads the tile
}

// ---- TMA: whole tiles copied by the tensor memory accelerator (cp.async.bulk.tensor) ----
// The tensor map (TmaDesc) describes one (B, S, H, D) tensor as dimensions (D, H, S, B),
// innermost first, with boxes of 64 columns x ROWS rows of one head written in the 128-byte
// swizzle: the SwizzledTile layout that wgmma's descriptors decode. The copies run in the async
// proxy, which wgmma reads too: no proxy fence between them.

// Fetch the tensor map into the TMA unit's cache ahead of its first copy.
__device__ __forceinline__ void tma_prefetch_desc(const TmaDesc& desc) {
    asm volatile("prefetch.tensormap [%0];\n" :: "l"(&desc) : "memory");
}
// Make the mbarrier initialisations visible to the async proxy, whose copies complete on them.
__device__ __forceinline__ void fence_mbarrier_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
// Arrive on `bar` and add `bytes` to the bytes its current phase waits for.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(u64* bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" :: "r"(smem_u32(bar)), "r"(bytes) : "memory");
}
// One box of the tensor map (64 columns from `col`, the map's box rows from `row`, of head h of
// batch b) into shared memory at `dst` (1024-byte aligned, 128-byte swizzle), completing its bytes
// on `bar`. Rows and columns outside the tensor arrive as zeros.
__device__ __forceinline__ void tma_load_box(unsigned char* dst, const TmaDesc& desc, u64* bar, int col, int h, int row, int b) {
    asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%2, %3, %4, %5}], [%6];\n"
                 :: "r"(smem_u32(dst)), "l"(&desc), "r"(col), "r"(h), "r"(row), "r"(b), "r"(smem_u32(bar)) : "memory");
}
// One thread copies rows [row0, row0 + ROWS) of head (b, h) into a swizzled tile, one box per
// 64-column panel; the copies complete Tile::BYTES bytes on `bar`. Rows past the sequence and
// columns past head_dim are outside the tensor map and arrive as zeros.
template <typename Tile>
__device__ __forceinline__ void tma_load_tile(unsigned char* tile, const TmaDesc& desc, u64* bar, int row0, int h, int b) {
    #pragma unroll
    for (int panel = 0; panel < Tile::PANELS; ++panel)
        tma_load_box(tile + panel * Tile::PANEL_BYTES, desc, bar, panel * Tile::PANEL_COLS, h, row0, b);
}

// ---- shared-memory matrix descriptors (128-byte swizzle) ----
// bits 0-13: start address / 16; 16-29: leading-dimension byte offset / 16; 32-45: stride-dimension
// byte offset / 16; 62-63: swizzle mode (1 = 128-byte).
__device__ __forceinline__ u64 smem_desc_sw128(const void* start, u32 lbo_bytes, u32 sbo_bytes) {
    return u64((smem_u32(start) & 0x3FFFF) >> 4) | (u64(lbo_bytes >> 4) << 16) | (u64(sbo_bytes >> 4) << 32) | (1ull << 62);
}

// K-major operand (rows = M or N, columns = the reduction dimension K; Q and K in S = Q K^T):
// rows [row0, row0 + 64 or N) of the tile, reduction columns [16 kk, 16 kk + 16). Within a
// 128-byte line the 16-column step is +32 bytes before swizzling; 8-row groups are 1024 bytes apart.
template <int ROWS, int COLS>
__device__ __forceinline__ u64 desc_k_major(const unsigned char* tile, int row0, int kk) {
    using Tile = SwizzledTile<ROWS, COLS>;
    const unsigned char* start = tile + (kk / 4) * Tile::PANEL_BYTES + row0 * Tile::LINE_BYTES + (kk % 4) * 32;
    return smem_desc_sw128(start, 16, Tile::ATOM_BYTES);
}

// N-major B operand, or M-major A (rows = the reduction dimension K, columns = N or M; V in O = P V):
// reduction rows [16 kk, 16 kk + 16), columns from 64-column panel `panel0` on. 8-row groups are
// 1024 bytes apart (stride offset), 64-column panels PANEL_BYTES apart (leading offset).
template <int ROWS, int COLS>
__device__ __forceinline__ u64 desc_n_major(const unsigned char* tile, int kk, int panel0 = 0) {
    using Tile = SwizzledTile<ROWS, COLS>;
    return smem_desc_sw128(tile + panel0 * Tile::PANEL_BYTES + kk * 16 * Tile::LINE_BYTES, Tile::PANEL_BYTES,
                           Tile::ATOM_BYTES);
}

// acc = A B^T for 64 rows of A from a_row0 (a tile of A_ROWS rows) against all N rows of B, over
// HEAD_DIM / 16 k-steps, both K-major in shared memory (S = Q_i K_j^T in the forward, S^T =
// K_j Q_i^T and dP^T = V_j dO_i^T in the backward).
template <typename T, int A_ROWS, int N, int HEAD_DIM>
__device__ __forceinline__ void issue_k_major_product(float (&acc)[N / 8][4], const unsigned char* sA, int a_row0,
                                                      const unsigned char* sB) {
    #pragma unroll
    for (int kk = 0; kk < HEAD_DIM / 16; ++kk)
        Wgmma<T, N>::template ss<0, 0>(acc, desc_k_major<A_ROWS, HEAD_DIM>(sA, a_row0, kk),
                                       desc_k_major<N, HEAD_DIM>(sB, 0, kk), kk > 0);
}

}  // namespace cupyflash
