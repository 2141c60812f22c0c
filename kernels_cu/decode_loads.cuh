// The decode kernel's K and V tiles (flash_decode.cu): where a key lies in a dense or paged cache,
// and the stages that stream key tiles through shared memory, by DecodeTraits::LOADS:
//   LOAD_CP_ASYNC: every thread copies 16-byte chunks into padded rows (sm_80 and up), a paged
//                  cache's table entries read once per warp and shuffled to the copying threads;
//   LOAD_TMA:      one thread issues tensor-map boxes (64 keys, or one page, by 64 columns) into
//                  128-byte-swizzled tiles completing on one mbarrier per stage (sm_90), the
//                  loads FlashAttention-4 uses; warps read them with ldmatrix through the swizzle.
#pragma once
#include "traits.cuh"

namespace cupyflash {

// Where key j (< len_k) of kv head h_kv of sequence `seq` lies in the caches: batch slot seq.tb,
// row j of a dense cache; page `page` (the table's entry for j), row j % page_size of a paged one.
// False for a page outside the cache (the caller's contract): its row is never read.
template <bool PAGED, typename Seq>
__device__ __forceinline__ bool cache_row(const DecodeParams& p, const Seq& seq, int j, int page, int& slot, int& row) {
    if constexpr (PAGED) {
        slot = page;
        row = j & ((1 << p.page_shift) - 1);
        return page >= 0 && page < p.num_pages;
    } else {
        slot = seq.tb;
        row = j;
        return true;
    }
}
// The table entry of sequence `seq`'s key j (a paged cache).
template <typename Seq>
__device__ __forceinline__ int page_of(const DecodeParams& p, const Seq& seq, int j) {
    return p.page_table[seq.b * p.page_table_stride + (j >> p.page_shift)];
}

// LOAD_CP_ASYNC: all threads copy keys [n0, n0 + BLOCK_N) of kv head h_kv, K to sK and V to sV
// (keys past the sequence's len_k and columns past head_dim: zeros).
template <typename Tr, bool PAGED, typename Seq>
__device__ __forceinline__ void load_kv_tile(typename Tr::T* sK, typename Tr::T* sV, const DecodeParams& p,
                                             const Seq& seq, int h_kv, int n0) {
    using T = typename Tr::T;
    constexpr int CHUNKS = Tr::HEAD_DIM / Tr::CHUNK;
    const int len_k = seq.len_k;
    int page_of_lane = 0;  // PAGED: entry (lane) of the tile's pages
    if constexpr (PAGED) {
        const int lane = threadIdx.x % 32, j = ((n0 >> p.page_shift) + lane) << p.page_shift;  // the entry's first key
        page_of_lane = (j < len_k && j < n0 + Tr::BLOCK_N) ? page_of(p, seq, j) : -1;
    }
    #pragma unroll 1  // unrolled, ptxas spilled 4-28 bytes at 80-128 registers (NVRTC 13.0)
    for (int c = threadIdx.x; c < Tr::BLOCK_N * CHUNKS; c += Tr::NUM_THREADS) {
        const int r = c / CHUNKS, col = (c % CHUNKS) * Tr::CHUNK, j = n0 + r;
        const int page = PAGED ? __shfl_sync(0xffffffffu, page_of_lane, (j >> p.page_shift) - (n0 >> p.page_shift)) : 0;
        int slot, row;
        const bool valid = cache_row<PAGED>(p, seq, j, page, slot, row) && j < len_k && col < p.fwd.head_dim;
        const T* gk = valid ? row_ptr<const T>(p.fwd.k, slot, h_kv, row) + col : static_cast<const T*>(p.fwd.k.ptr);
        const T* gv = valid ? row_ptr<const T>(p.fwd.v, slot, h_kv, row) + col : static_cast<const T*>(p.fwd.v.ptr);
        cp_async_16(sK + r * Tr::STRIDE + col, gk, valid);
        cp_async_16(sV + r * Tr::STRIDE + col, gv, valid);
    }
}

// LOAD_TMA: one thread loads keys [n0, n0 + BLOCK_N) of kv head h_kv into the swizzled tiles sK, sV,
// completing on `full`. A dense cache: one box per panel (rows past the capacity arrive as zeros).
// A paged cache: one box per page and panel (the maps' boxes are min(page_size, BLOCK_N) rows);
// pages past len_k and entries outside the cache are not loaded. Rows past len_k hold whatever the
// stage held: K there is masked, V zeroed by the warps that read it (zero_v_rows_past).
template <typename Tr, bool PAGED, typename Seq>
__device__ __forceinline__ void load_kv_tile_tma(unsigned char* sK, unsigned char* sV, const DecodeMaps& maps,
                                                 const Seq& seq, int h_kv, int n0, u64* full) {
    using Tile = typename Tr::TileKV;
    const DecodeParams& p = maps.dec;
    if constexpr (!PAGED) {
        mbarrier_arrive_expect_tx(full, 2 * Tile::BYTES);  // before any copy can complete
        tma_load_tile<Tile>(sK, maps.k, full, n0, h_kv, seq.tb);
        tma_load_tile<Tile>(sV, maps.v, full, n0, h_kv, seq.tb);
    } else {
        constexpr int MOST = Tr::BLOCK_N / 16;  // boxes per panel with the smallest pages
        const int box_rows = min(1 << p.page_shift, Tr::BLOCK_N), boxes = Tr::BLOCK_N / box_rows;
        int page[MOST], loaded = 0;
        #pragma unroll
        for (int s = 0; s < MOST; ++s) {
            const int j = n0 + s * box_rows;
            page[s] = (s < boxes && j < seq.len_k) ? page_of(p, seq, j) : -1;
            loaded += (page[s] >= 0 && page[s] < p.num_pages);
        }
        mbarrier_arrive_expect_tx(full, 2 * loaded * box_rows * Tile::LINE_BYTES * Tile::PANELS);
        const int row_in_page = n0 & ((1 << p.page_shift) - 1);
        #pragma unroll
        for (int s = 0; s < MOST; ++s) {
            if (!(page[s] >= 0 && page[s] < p.num_pages)) continue;
            #pragma unroll
            for (int panel = 0; panel < Tile::PANELS; ++panel) {
                const int at = panel * Tile::PANEL_BYTES + s * box_rows * Tile::LINE_BYTES;  // 1024-byte aligned
                tma_load_box(sK + at, maps.k, full, panel * Tile::PANEL_COLS, h_kv, row_in_page, page[s]);
                tma_load_box(sV + at, maps.v, full, panel * Tile::PANEL_COLS, h_kv, row_in_page, page[s]);
            }
        }
    }
}

// LOAD_TMA loads whole boxes: rows past len_k hold stale (possibly non-finite) bytes or another
// sequence's keys. A warp zeroes the V rows of its own 16-key slice that lie past len_k before P V
// reads them (P is 0 there, but 0 * NaN is not), fenced for the async proxy that later copies into
// the stage again. Whole 128-byte lines: the swizzle moves chunks only within a line.
template <typename Tr>
__device__ __forceinline__ void zero_v_rows_past(unsigned char* sV, int warp_k0, int j0, int len_k) {
    using Tile = typename Tr::TileKV;
    constexpr int CHUNKS = Tile::LINE_BYTES / 16;
    if (j0 + Tr::KEYS_PER_WARP <= len_k) return;
    #pragma unroll 1  // the last tile only
    for (int c = threadIdx.x % 32; c < Tr::KEYS_PER_WARP * CHUNKS * Tile::PANELS; c += 32) {
        const int r = c / CHUNKS % Tr::KEYS_PER_WARP, panel = c / (CHUNKS * Tr::KEYS_PER_WARP);
        if (j0 + r >= len_k)
            *reinterpret_cast<uint4*>(sV + panel * Tile::PANEL_BYTES + (warp_k0 + r) * Tile::LINE_BYTES + (c % CHUNKS) * 16) =
                make_uint4(0, 0, 0, 0);
    }
    fence_proxy_async();
    __syncwarp();
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
constexpr bool HAS_TMA = false;
#else
constexpr bool HAS_TMA = true;  // cp.async.bulk.tensor: sm_90 and up
#endif

// The stages: where stage s's K and V tiles are, how a tile is started and waited for, and the warp's
// K and V operands for the tile products.
template <typename Tr, bool PAGED>
struct KvStages {
    static_assert(!Tr::TMA || HAS_TMA, "TMA loads need sm_90");
    using T = typename Tr::T;
    unsigned char* base;  // stage s at base + s STAGE_BYTES: K, then V
    u64* full;            // LOAD_TMA: stage s's tile has landed
    __device__ __forceinline__ unsigned char* k(int stage) const { return base + stage * Tr::STAGE_BYTES; }
    __device__ __forceinline__ unsigned char* v(int stage) const { return k(stage) + Tr::STAGE_BYTES / 2; }
    // Start loading key tile n_block (the u-th of the block) into stage u % STAGES; every thread calls it.
    template <typename Seq>
    __device__ __forceinline__ void load(const DecodeMaps& maps, const Seq& seq, int h_kv, int n_block, int u) const {
        const int stage = u % Tr::STAGES;
        if constexpr (Tr::TMA) {
            if (threadIdx.x == 0) load_kv_tile_tma<Tr, PAGED>(k(stage), v(stage), maps, seq, h_kv, n_block * Tr::BLOCK_N, full + stage);
        } else {
            load_kv_tile<Tr, PAGED>(reinterpret_cast<T*>(k(stage)), reinterpret_cast<T*>(v(stage)), maps.dec, seq, h_kv,
                                    n_block * Tr::BLOCK_N);
            cp_async_commit();
        }
    }
    // Stage nothing (cp.async: an empty commit group keeps one group per tile).
    __device__ __forceinline__ void skip() const {
        if constexpr (!Tr::TMA) cp_async_commit();
    }
    // Wait until the u-th tile has landed (for this thread; the caller's barrier makes it the block's).
    __device__ __forceinline__ void wait(int u) const {
        if constexpr (Tr::TMA) mbarrier_wait(full + u % Tr::STAGES, (u / Tr::STAGES) & 1);
        else cp_async_wait<Tr::STAGES - 2>();
    }
    // Before a warp reads its keys [warp_k0, warp_k0 + 16) (the tile's keys from n0): V past len_k zeroed.
    __device__ __forceinline__ void prepare(int stage, int warp_k0, int n0, int len_k) const {
        if constexpr (Tr::TMA) zero_v_rows_past<Tr>(v(stage), warp_k0, n0 + warp_k0, len_k);
    }
    // The warp's K (read [n][k]) and V (read [k][n]) operands of stage `stage` from key warp_k0.
    __device__ __forceinline__ auto k_operand(int stage, int warp_k0) const {
        if constexpr (Tr::TMA) return SwizzledB<typename Tr::TileKV>{smem_u32(k(stage)), warp_k0};
        else return PaddedB<T>{reinterpret_cast<const T*>(k(stage)) + warp_k0 * Tr::STRIDE, Tr::STRIDE};
    }
    __device__ __forceinline__ auto v_operand(int stage, int warp_k0) const {
        if constexpr (Tr::TMA) return SwizzledB<typename Tr::TileKV>{smem_u32(v(stage)), warp_k0};
        else return PaddedB<T>{reinterpret_cast<const T*>(v(stage)) + warp_k0 * Tr::STRIDE, Tr::STRIDE};
    }
};

}  // namespace cupyflash
