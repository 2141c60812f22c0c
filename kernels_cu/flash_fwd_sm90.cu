// Forward pass on Hopper (sm_90a): the FlashAttention-2 loop on warpgroup MMAs (wgmma).
// One thread block of NUM_WG warpgroups per (query tile Q_i, head, batch); warpgroup w owns query
// rows [64 w, 64 w + 64) of Q_i, so no warpgroup needs another's row statistics. K_j and V_j stream
// through two stages of swizzled shared memory: the cp.async load of K_{j+1}, V_{j+1} overlaps the
// work on K_j, V_j. S = Q_i K_j^T reads both operands from shared memory; O += P~ V_j takes P~ from
// registers (the S accumulator packed to 16 bits). Only O and lse are written to global memory.
#include "traits.cuh"
#include "softmax.cuh"
#include "mask.cuh"
#include "fwd_epilogue.cuh"

namespace cupyflash {

// S = Q_i K_j^T for this warpgroup's 64 rows: HEAD_DIM / 16 k-steps, both operands K-major.
template <typename Tr>
__device__ __forceinline__ void wg_scores(float (&s)[Tr::NT][4], const unsigned char* sQ, const unsigned char* sK,
                                          int wg_row0) {
    wgmma_fence();
    #pragma unroll
    for (int kk = 0; kk < Tr::HEAD_DIM / 16; ++kk)
        Wgmma<typename Tr::T, Tr::BLOCK_N>::template ss<0, 0>(
            s, desc_k_major<Tr::BLOCK_M, Tr::HEAD_DIM>(sQ, wg_row0, kk),
            desc_k_major<Tr::BLOCK_N, Tr::HEAD_DIM>(sK, 0, kk), kk > 0);
    wgmma_commit();
    wgmma_wait<0>();
}

// O_i += P~_ij V_j: BLOCK_N / 16 k-steps, A = P~ from registers, B = V_j (N-major: head_dim contiguous).
template <typename Tr>
__device__ __forceinline__ void wg_accumulate_pv(float (&o)[Tr::DT][4], const float (&p)[Tr::NT][4],
                                                 const unsigned char* sV) {
    u32 a[Tr::BLOCK_N / 16][4];
    #pragma unroll
    for (int kk = 0; kk < Tr::BLOCK_N / 16; ++kk) pack_a_frag<typename Tr::T>(a[kk], p, kk);
    wgmma_fence();
    #pragma unroll
    for (int kk = 0; kk < Tr::BLOCK_N / 16; ++kk)
        Wgmma<typename Tr::T, Tr::HEAD_DIM>::template rs<1>(o, a[kk], desc_n_major<Tr::BLOCK_N, Tr::HEAD_DIM>(sV, kk), true);
    wgmma_commit();
    wgmma_wait<0>();
}

template <typename T, int HEAD_DIM, int BLOCK_N, int NUM_WG, bool IS_CAUSAL>
__global__ void __launch_bounds__(NUM_WG * 128, 1) flash_fwd_sm90_kernel(const FwdParams p) {
    using Tr = FwdTraitsSm90<T, HEAD_DIM, BLOCK_N, NUM_WG>;
    constexpr int BLOCK_M = Tr::BLOCK_M, NT = Tr::NT, DT = Tr::DT, NTH = Tr::NUM_THREADS;
    constexpr int KV_BYTES = Tr::TileKV::BYTES;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    unsigned char* sQ = smem_raw + (Tr::ALIGN - smem_u32(smem_raw) % Tr::ALIGN) % Tr::ALIGN;
    unsigned char* sKV = sQ + Tr::TileQ::BYTES;  // stage s: K at sKV + 2 s KV_BYTES, V right after

    const int m_block = gridDim.x - 1 - blockIdx.x;  // heaviest causal query tiles are scheduled first
    const int h = blockIdx.y, b = blockIdx.z;
    const int m0 = m_block * BLOCK_M;
    const int warp = threadIdx.x / 32;
    const int wg_row0 = (warp / 4) * 64;  // this warpgroup's first row within Q_i

    // Key tiles K_j that any row of Q_i can see: all of them, or up to the causal diagonal.
    const int last_key = last_visible_key<IS_CAUSAL>(min(m0 + BLOCK_M, p.seqlen_q) - 1, p.seqlen_q, p.seqlen_k);
    const int n_blocks = last_key < 0 ? 0 : last_key / BLOCK_N + 1;

    float o[1][DT][4];
    zero(o);
    OnlineSoftmax<1> softmax;
    softmax.init();

    // Load Q_i, K_0 and V_0 (stage 0).
    load_swizzled_async<T, BLOCK_M, HEAD_DIM, NTH>(sQ, p.q, b, h, m0, p.seqlen_q, p.head_dim);
    if (n_blocks > 0) {
        load_swizzled_async<T, BLOCK_N, HEAD_DIM, NTH>(sKV, p.k, b, h, 0, p.seqlen_k, p.head_dim);
        load_swizzled_async<T, BLOCK_N, HEAD_DIM, NTH>(sKV + KV_BYTES, p.v, b, h, 0, p.seqlen_k, p.head_dim);
    }
    cp_async_commit();

    for (int n_block = 0; n_block < n_blocks; ++n_block) {
        const int n0 = n_block * BLOCK_N;
        const unsigned char* sK = sKV + (n_block % 2) * 2 * KV_BYTES;
        const unsigned char* sV = sK + KV_BYTES;
        // Prefetch K_{j+1}, V_{j+1} into the other stage (freed by the barrier that ended step j-1).
        if (n_block + 1 < n_blocks) {
            unsigned char* next = sKV + ((n_block + 1) % 2) * 2 * KV_BYTES;
            load_swizzled_async<T, BLOCK_N, HEAD_DIM, NTH>(next, p.k, b, h, n0 + BLOCK_N, p.seqlen_k, p.head_dim);
            load_swizzled_async<T, BLOCK_N, HEAD_DIM, NTH>(next + KV_BYTES, p.v, b, h, n0 + BLOCK_N, p.seqlen_k, p.head_dim);
        }
        cp_async_commit();
        cp_async_wait<1>();  // all but the prefetch have landed
        fence_proxy_async();
        __syncthreads();  // K_j, V_j (and Q_i) are in shared memory and visible to every warpgroup's wgmma

        // S_ij = Q_i K_j^T
        float s[1][NT][4];
        wg_scores<Tr>(s[0], sQ, sK, wg_row0);
        // Mask keys past seqlen_k and above the causal diagonal, only on tiles that need it.
        if (tile_needs_mask<IS_CAUSAL, BLOCK_M, BLOCK_N>(m0, n0, p.seqlen_q, p.seqlen_k))
            mask_scores<IS_CAUSAL>(s, m0 + warp * 16, n0, p.seqlen_q, p.seqlen_k);
        // m, l, O rescaled; s becomes P~_ij
        softmax.update(s, o, p.scale_log2);
        // O_i += P~_ij V_j
        wg_accumulate_pv<Tr>(o[0], s[0], sV);
        __syncthreads();  // every warpgroup has finished reading K_j, V_j before step j+1 refills this stage
    }
    cp_async_wait<0>();  // no copy may outlive the block (only matters when n_blocks == 0)

    // O_i = O_i / l, lse_i = m * scale + log(l)
    float inv_l[1][2], lse[1][2];
    softmax.finalize(inv_l, lse, p.scale_log2);
    store_output<T>(p, b, h, m0 + warp * 16, o, inv_l, lse);
}

}  // namespace cupyflash
