// Forward pass on Hopper (sm_90a): the FlashAttention-2 loop on warpgroup MMAs (wgmma),
// software-pipelined so the softmax runs while the tensor cores work.
// One thread block of NUM_WG warpgroups per (query tile Q_i, head, batch); warpgroup w owns query
// rows [64 w, 64 w + 64) of Q_i, so no warpgroup needs another's row statistics. K_j and V_j stream
// through three stages of swizzled shared memory by cp.async, one tile ahead (the third stage holds
// V_{j-1}, still read by the pending P~ V product). Step j issues
// S_j = Q_i K_j^T and then O += P~_{j-1} V_{j-1}; the softmax of S_j runs while the second product
// is still on the tensor cores. P~ never leaves registers (the S accumulator packed to 16 bits is
// wgmma's register A operand). Only O and lse are written to global memory.
#include "traits.cuh"
#include "softmax.cuh"
#include "mask.cuh"
#include "fwd_epilogue.cuh"

namespace cupyflash {

// Issue S = Q_i K_j^T for this warpgroup's 64 rows: HEAD_DIM / 16 k-steps, both operands K-major.
template <typename Tr>
__device__ __forceinline__ void issue_scores(float (&s)[Tr::NT][4], const unsigned char* sQ, const unsigned char* sK,
                                             int wg_row0) {
    #pragma unroll
    for (int kk = 0; kk < Tr::HEAD_DIM / 16; ++kk)
        Wgmma<typename Tr::T, Tr::BLOCK_N>::template ss<0, 0>(
            s, desc_k_major<Tr::BLOCK_M, Tr::HEAD_DIM>(sQ, wg_row0, kk),
            desc_k_major<Tr::BLOCK_N, Tr::HEAD_DIM>(sK, 0, kk), kk > 0);
    wgmma_commit();
}

// Issue O_i += P~ V_j: BLOCK_N / 16 k-steps, A = P~ from registers, B = V_j (N-major: head_dim contiguous).
template <typename Tr>
__device__ __forceinline__ void issue_pv(float (&o)[Tr::DT][4], const u32 (&pa)[Tr::BLOCK_N / 16][4],
                                         const unsigned char* sV) {
    #pragma unroll
    for (int kk = 0; kk < Tr::BLOCK_N / 16; ++kk)
        Wgmma<typename Tr::T, Tr::HEAD_DIM>::template rs<1>(o, pa[kk], desc_n_major<Tr::BLOCK_N, Tr::HEAD_DIM>(sV, kk), true);
    wgmma_commit();
}

template <typename T, int HEAD_DIM, int BLOCK_N, int NUM_WG, bool IS_CAUSAL>
__global__ void __launch_bounds__(NUM_WG * 128, 1) flash_fwd_sm90_kernel(const FwdParams p) {
    using Tr = FwdTraitsSm90<T, HEAD_DIM, BLOCK_N, NUM_WG>;
    constexpr int BLOCK_M = Tr::BLOCK_M, NT = Tr::NT, DT = Tr::DT, NTH = Tr::NUM_THREADS, STAGES = Tr::STAGES;
    constexpr int KV_BYTES = Tr::TileKV::BYTES;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    unsigned char* sQ = smem_raw + (Tr::ALIGN - smem_u32(smem_raw) % Tr::ALIGN) % Tr::ALIGN;
    unsigned char* sKV = sQ + Tr::TileQ::BYTES;  // stage s: K at sKV + 2 s KV_BYTES, V right after
    auto stage_k = [&](int n_block) { return sKV + (n_block % STAGES) * 2 * KV_BYTES; };

    const int m_block = gridDim.x - 1 - blockIdx.x;  // heaviest causal query tiles are scheduled first
    const int h = blockIdx.y, b = blockIdx.z;
    const int m0 = m_block * BLOCK_M;
    const int warp = threadIdx.x / 32;
    const int wg_row0 = (warp / 4) * 64;  // this warpgroup's first row within Q_i

    // Key tiles K_j that any row of Q_i can see: all of them, or up to the causal diagonal.
    const int last_key = last_visible_key<IS_CAUSAL>(min(m0 + BLOCK_M, p.seqlen_q) - 1, p.seqlen_q, p.seqlen_k);
    const int n_blocks = last_key < 0 ? 0 : last_key / BLOCK_N + 1;
    auto load_kv = [&](int n_block) {  // one commit group per key tile, empty past the end
        if (n_block < n_blocks) {
            unsigned char* sK = stage_k(n_block);
            load_swizzled_async<T, BLOCK_N, HEAD_DIM, NTH>(sK, p.k, b, h, n_block * BLOCK_N, p.seqlen_k, p.head_dim);
            load_swizzled_async<T, BLOCK_N, HEAD_DIM, NTH>(sK + KV_BYTES, p.v, b, h, n_block * BLOCK_N, p.seqlen_k, p.head_dim);
        }
        cp_async_commit();
    };

    float o[1][DT][4];
    zero(o);
    OnlineSoftmax<1> softmax;
    softmax.init();
    u32 pa[BLOCK_N / 16][4];  // P~_{j-1}, packed as the A operand of the pending O += P~ V_{j-1}

    // Load Q_i with K_0, V_0.
    load_swizzled_async<T, BLOCK_M, HEAD_DIM, NTH>(sQ, p.q, b, h, m0, p.seqlen_q, p.head_dim);
    load_kv(0);

    // Step j waits for K_j, V_j, makes every warpgroup visible, and prefetches tile j+1 into the
    // stage of tile j-2, whose last reader (P~ V_{j-2}) completed in step j-1.
    auto begin_step = [&](int n_block) {
        cp_async_wait<0>();  // tile j (and Q_i) have landed
        fence_proxy_async();
        __syncthreads();  // K_j, V_j are visible to every warpgroup's wgmma, and every warpgroup is done with step j-1
        load_kv(n_block + 1);
    };
    float s[1][NT][4];
    float alpha[1][2];

    // Step 0: S_i0 = Q_i K_0^T and P~_i0, with no product to overlap yet.
    if (n_blocks > 0) {
        begin_step(0);
        wgmma_fence();
        issue_scores<Tr>(s[0], sQ, stage_k(0), wg_row0);
        wgmma_wait<0>();
        fence_operands(s[0]);
        if (tile_needs_mask<IS_CAUSAL, BLOCK_M, BLOCK_N>(m0, 0, p.seqlen_q, p.seqlen_k))
            mask_scores<IS_CAUSAL>(s, m0 + warp * 16, 0, p.seqlen_q, p.seqlen_k);
        softmax.update_scores(s, alpha, p.scale_log2);
        #pragma unroll
        for (int kk = 0; kk < BLOCK_N / 16; ++kk) pack_a_frag<T>(pa[kk], s[0], kk);
    }
    // Steps j >= 1: issue S_ij = Q_i K_j^T and O_i += P~_{i,j-1} V_{j-1}; the softmax of S_ij runs
    // while the second product is on the tensor cores. The body has no branch between the issue and
    // the waits (ptxas waits for every wgmma at a join), so the tiles that need a mask, a suffix of
    // the key range, run in a second loop.
    auto step = [&](int n_block, bool masked) {  // inlined at both loops with `masked` a constant
        begin_step(n_block);
        wgmma_fence();
        issue_scores<Tr>(s[0], sQ, stage_k(n_block), wg_row0);
        // A fence between the groups makes them separate pipeline stages for ptxas: once S_ij is
        // retired its registers may be rewritten while the P~ V group still runs (in one stage,
        // ptxas would wait for both before the softmax's first write).
        wgmma_fence();
        issue_pv<Tr>(o[0], pa, stage_k(n_block - 1) + KV_BYTES);
        wgmma_wait<1>();  // S_ij is ready
        fence_operands(s[0]);
        if (masked) mask_scores<IS_CAUSAL>(s, m0 + warp * 16, n_block * BLOCK_N, p.seqlen_q, p.seqlen_k);
        softmax.update_scores(s, alpha, p.scale_log2);
        fence_operands(s[0]);  // the softmax is done before the wait, not sunk below it
        fence_operands(alpha);
        warpgroup_barrier(warp / 4);
        wgmma_wait<0>();  // O_i holds P~_{i,j-1} V_{j-1}; pa is free
        fence_operands(o[0]);
        softmax.rescale(o, alpha);
        #pragma unroll
        for (int kk = 0; kk < BLOCK_N / 16; ++kk) pack_a_frag<T>(pa[kk], s[0], kk);
    };
    const int first_masked = first_masked_tile<IS_CAUSAL, BLOCK_M, BLOCK_N>(m0, n_blocks, p.seqlen_q, p.seqlen_k);
    int n_block = 1;
    for (; n_block < first_masked; ++n_block) step(n_block, false);
    for (; n_block < n_blocks; ++n_block) step(n_block, true);
    // O_i += P~_{i,last} V_last
    if (n_blocks > 0) {
        wgmma_fence();
        issue_pv<Tr>(o[0], pa, stage_k(n_blocks - 1) + KV_BYTES);
        wgmma_wait<0>();
        fence_operands(o[0]);
    }
    cp_async_wait<0>();  // no copy may outlive the block

    // O_i = O_i / l, lse_i = m * scale + log(l)
    float inv_l[1][2], lse[1][2];
    softmax.finalize(inv_l, lse, p.scale_log2);
    store_output<T>(p, b, h, m0 + warp * 16, o, inv_l, lse);
}

}  // namespace cupyflash
