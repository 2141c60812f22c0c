// Forward pass, fp16/bf16 on tensor cores (FlashAttention-2 work partitioning).
// One thread block per (query tile Q_i, head, batch). Q_i stays in shared memory; K_j and V_j
// stream through one buffer each, the load of V_j overlapping S = Q_i K_j^T and the load of
// K_{j+1} overlapping O += P V_j. Only O and lse are written to global memory.
#include "traits.cuh"
#include "softmax.cuh"
#include "variant.cuh"
#include "fwd_epilogue.cuh"

namespace cupyflash {

template <typename T, int HEAD_DIM, int BLOCK_M, int BLOCK_N, int NUM_WARPS, int VARIANT>
__global__ void __launch_bounds__(NUM_WARPS * 32, 1) flash_fwd_kernel(const FwdParams p) {
    using Tr = FwdTraits<T, HEAD_DIM, BLOCK_M, BLOCK_N, NUM_WARPS>;
    constexpr int MT = Tr::MT, NT = Tr::NT, DT = Tr::DT, STRIDE = Tr::STRIDE;
    extern __shared__ __align__(16) unsigned char smem[];
    T* sQ = reinterpret_cast<T*>(smem);
    T* sK = sQ + Tr::SMEM_Q;
    T* sV = sK + Tr::SMEM_K;

    const int m_block = gridDim.x - 1 - blockIdx.x;  // heaviest causal query tiles are scheduled first
    const int h = blockIdx.y;
    const int m0 = m_block * BLOCK_M;
    const typename Policy<VARIANT>::Seq seq(p, blockIdx.z);
    if (seq.past_q(m0)) return;
    const int warp_m0 = (threadIdx.x / 32) * MT * 16;  // this warp's first row within Q_i
    const Policy<VARIANT> pol(p.var, seq, h);

    // Key tiles K_j that some row of Q_i sees (the causal diagonal, the window).
    int n_first, n_end;
    pol.template key_tiles<BLOCK_M, BLOCK_N>(m0, n_first, n_end);
    // With a block mask, the tiles it keeps, listed after the tiles' shared memory
    KeyTiles kept{};
    if constexpr (Policy<VARIANT>::BLOCKS) {
        kept = pol.template list_key_tiles<BLOCK_M, BLOCK_N>(reinterpret_cast<short*>(smem + Tr::SMEM_BYTES),
                                                             (p.seqlen_k + BLOCK_N - 1) / BLOCK_N, m0, n_first, n_end);
        __syncthreads();  // the list is written before any thread reads it
    }
    const int n_tiles = Policy<VARIANT>::BLOCKS ? kept.count() : n_end - n_first;
    auto tile_at = [&](int it) { return Policy<VARIANT>::BLOCKS ? kept.at(it) : n_first + it; };
    auto tile_partial = [&](int it) { return Policy<VARIANT>::BLOCKS ? kept.partial(it) : true; };

    float o[MT][DT][4];
    zero(o);
    OnlineSoftmax<MT> softmax;
    softmax.init(pol.row_max_start(p.var, h), pol.row_sum_start(threadIdx.x % 4));

    // Load Q_i and the first K_j.
    load_tile_async<T, BLOCK_M, HEAD_DIM, Tr::NUM_THREADS, Tr::LOAD_UNROLL>(sQ, p.q, seq.tb, h, seq.q0 + m0, seq.q_end(), p.head_dim);
    if (!Policy<VARIANT>::BLOCKS || n_tiles > 0)
        load_tile_async<T, BLOCK_N, HEAD_DIM, Tr::NUM_THREADS, Tr::LOAD_UNROLL>(sK, p.k, seq.tb, block_kv_head(p.var),
                                                                                seq.k0 + tile_at(0) * BLOCK_N, seq.k_end(), p.head_dim);
    cp_async_commit();

    for (int it = 0; it < n_tiles; ++it) {
        const int n0 = tile_at(it) * BLOCK_N;
        cp_async_wait<0>();
        __syncthreads();  // K_j (and Q_i) are in shared memory, and every warp has finished reading V_{j-1}
        load_tile_async<T, BLOCK_N, HEAD_DIM, Tr::NUM_THREADS, Tr::LOAD_UNROLL>(sV, p.v, seq.tb, block_kv_head(p.var), seq.k0 + n0, seq.k_end(), p.head_dim);
        cp_async_commit();

        // S_ij = Q_i K_j^T
        float s[MT][NT][4];
        zero(s);
        warp_gemm<MT, NT, HEAD_DIM, false, false>(s, sQ + warp_m0 * STRIDE, STRIDE, sK, STRIDE);
        // Logits (softcap, ALiBi); keys past seqlen_k or outside the causal/window band masked,
        // on the tiles that need it.
        pol.on_tile(tile_partial(it)).template to_logits_tested<BLOCK_M, BLOCK_N>(s, m0, m0 + warp_m0, n0);
        // m, l, O rescaled; s becomes P~_ij (then dropped and scaled, with dropout: l took it whole)
        softmax.update(s, o, p.scale_log2);
        pol.drop(s, m0 + warp_m0, n0);

        cp_async_wait<0>();
        __syncthreads();  // V_j is in shared memory, and every warp has finished reading K_j
        if (it + 1 < n_tiles)
            load_tile_async<T, BLOCK_N, HEAD_DIM, Tr::NUM_THREADS, Tr::LOAD_UNROLL>(sK, p.k, seq.tb, block_kv_head(p.var), seq.k0 + tile_at(it + 1) * BLOCK_N, seq.k_end(), p.head_dim);
        cp_async_commit();

        // O_i += P~_ij V_j
        warp_gemm_rs<T, MT, NT, DT, STRIDE>(o, s, sV);
    }
    cp_async_wait<0>();  // no copy may outlive the block (only matters when no key tile is visible)

    // O_i = O_i / l, lse_i = m * scale + log(l)
    float inv_l[MT][2], lse[MT][2];
    softmax.finalize(inv_l, lse, p.scale_log2);
    store_output<T>(p, seq, h, m0 + warp_m0, o, inv_l, lse);
}

}  // namespace cupyflash
