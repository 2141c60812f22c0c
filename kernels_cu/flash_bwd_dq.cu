// Backward, dQ pass for deterministic=True (fp16/bf16 on tensor cores).
// One thread block per (query tile Q_i, head, batch) walks the key tiles K_j, V_j that Q_i sees and
// keeps dQ_i in registers: no atomics and a fixed summation order, so dQ is bitwise reproducible.
// The main backward kernel then skips its dQ phase (dq_accum is null); this pass recomputes
//   S_ij = Q_i K_j^T, dP_ij = dO_i V_j^T, P_ij = exp2(S_ij * scale_log2 - lse_i log2(e)),
//   dS_ij = P_ij (dP_ij - D_i), dQ_i += dS_ij K_j (dS in registers as the A operand, like P~ in the forward),
// and writes dQ_i = softmax_scale * dQ_i in the input dtype.
#include "traits.cuh"
#include "variant.cuh"
#include "bwd_rows.cuh"

namespace cupyflash {

// dS_ij in place of S_ij for one warp's rows (queries q0 + acc_row), keys k0 + acc_col.
template <bool MASKED, typename Pol, int MT, int NT>
__device__ __forceinline__ void scores_to_ds(float (&s)[MT][NT][4], const float (&dp)[MT][NT][4], const BwdParams& p,
                                             const Pol& pol, const float (&lse_log2)[MT][2], const float (&d)[MT][2],
                                             int q0, int k0) {
    const int lane = threadIdx.x % 32;
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt)
        #pragma unroll
        for (int nt = 0; nt < NT; ++nt)
            #pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int i = q0 + acc_row(mt, r, lane), j = k0 + acc_col(nt, r, lane);
                float p_ij;
                pol.template prob_and_ds<MASKED, false>(s[mt][nt][r], dp[mt][nt][r], i, j, lse_log2[mt][r / 2], d[mt][r / 2],
                                                 p.scale_log2, p_ij, s[mt][nt][r]);
            }
}

template <typename T, int HEAD_DIM, int BLOCK_M, int BLOCK_N, int NUM_WARPS, int VARIANT>
__global__ void __launch_bounds__(NUM_WARPS * 32) flash_bwd_dq_kernel(const BwdParams p) {
    using Tr = DqTraits<T, HEAD_DIM, BLOCK_M, BLOCK_N, NUM_WARPS>;
    constexpr int MT = Tr::MT, NT = Tr::NT, DT = Tr::DT, STRIDE = Tr::STRIDE, NTH = Tr::NUM_THREADS;
    extern __shared__ __align__(16) unsigned char smem[];
    T* sQ = reinterpret_cast<T*>(smem);
    T* sdO = sQ + BLOCK_M * STRIDE;
    T* sK = sdO + BLOCK_M * STRIDE;                  // KV_STAGES buffers of BLOCK_N rows
    T* sV = sK + Tr::KV_STAGES * BLOCK_N * STRIDE;   // KV_STAGES buffers of BLOCK_N rows

    const int m_block = gridDim.x - 1 - blockIdx.x;  // heaviest causal query tiles are scheduled first
    const int h = blockIdx.y;
    const int m0 = m_block * BLOCK_M;
    const typename Policy<VARIANT>::Seq seq(p, blockIdx.z);
    if (seq.past_q(m0)) return;
    const int warp_m0 = (threadIdx.x / 32) * MT * 16;  // this warp's first row within Q_i
    const int lane = threadIdx.x % 32;
    const i64 row_base = seq.stat_base(p.heads, p.seqlen_q, h);

    const Policy<VARIANT> pol(p.var, seq, h);
    // Key tiles K_j that some row of Q_i sees (the causal diagonal, the window).
    int n_first, n_end;
    pol.template key_tiles<BLOCK_M, BLOCK_N>(m0, n_first, n_end);

    // lse_i log2(e) and D_i of this thread's rows
    float lse_log2[MT][2], d[MT][2];
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt)
        #pragma unroll
        for (int hh = 0; hh < 2; ++hh) row_stats(p, row_base, seq.q0 + m0 + warp_m0 + acc_row(mt, 2 * hh, lane), seq.q_end(),
                                                    lse_log2[mt][hh], d[mt][hh]);

    float dq[MT][DT][4];
    zero(dq);
    // Load Q_i, dO_i and K_0, V_0.
    load_tile_async<T, BLOCK_M, HEAD_DIM, NTH>(sQ, p.q, seq.tb, h, seq.q0 + m0, seq.q_end(), p.head_dim);
    load_tile_async<T, BLOCK_M, HEAD_DIM, NTH>(sdO, p.dout, seq.tb, h, seq.q0 + m0, seq.q_end(), p.head_dim);
    load_tile_async<T, BLOCK_N, HEAD_DIM, NTH>(sK, p.k, seq.tb, block_kv_head(p.var), seq.k0 + n_first * BLOCK_N, seq.k_end(), p.head_dim);
    load_tile_async<T, BLOCK_N, HEAD_DIM, NTH>(sV, p.v, seq.tb, block_kv_head(p.var), seq.k0 + n_first * BLOCK_N, seq.k_end(), p.head_dim);
    cp_async_commit();

    for (int n_block = n_first; n_block < n_end; ++n_block) {
        const int n0 = n_block * BLOCK_N, buf = (n_block - n_first) % Tr::KV_STAGES;
        const T* sK_j = sK + buf * BLOCK_N * STRIDE;
        const T* sV_j = sV + buf * BLOCK_N * STRIDE;
        cp_async_wait<0>();
        __syncthreads();  // K_j, V_j are visible, and every warp is done with tile j-1, whose buffer the next load reuses
        if (n_block + 1 < n_end) {
            // Prefetch K_{j+1}, V_{j+1} into the other stage.
            T* sK_next = sK + (buf ^ 1) * BLOCK_N * STRIDE;
            T* sV_next = sV + (buf ^ 1) * BLOCK_N * STRIDE;
            load_tile_async<T, BLOCK_N, HEAD_DIM, NTH>(sK_next, p.k, seq.tb, block_kv_head(p.var), seq.k0 + n0 + BLOCK_N, seq.k_end(), p.head_dim);
            load_tile_async<T, BLOCK_N, HEAD_DIM, NTH>(sV_next, p.v, seq.tb, block_kv_head(p.var), seq.k0 + n0 + BLOCK_N, seq.k_end(), p.head_dim);
        }
        cp_async_commit();

        // S_ij = Q_i K_j^T and dP_ij = dO_i V_j^T
        float s[MT][NT][4], dp[MT][NT][4];
        zero(s);
        zero(dp);
        warp_gemm<MT, NT, HEAD_DIM, false, false>(s, sQ + warp_m0 * STRIDE, STRIDE, sK_j, STRIDE);
        warp_gemm<MT, NT, HEAD_DIM, false, false>(dp, sdO + warp_m0 * STRIDE, STRIDE, sV_j, STRIDE);
        // dS_ij in place of S_ij; keys not visible (past seqlen_k, causal, window) get 0, tested only where a tile needs it
        if (pol.template tile_needs_mask<BLOCK_M, BLOCK_N>(m0, n0))
            scores_to_ds<true>(s, dp, p, pol, lse_log2, d, m0 + warp_m0, n0);
        else
            scores_to_ds<false>(s, dp, p, pol, lse_log2, d, m0 + warp_m0, n0);
        // dQ_i += dS_ij K_j
        warp_gemm_rs<T, MT, NT, DT, STRIDE>(dq, s, sK_j);
    }
    cp_async_wait<0>();  // no copy may outlive the block (only matters when no key tile is visible)

    // dQ_i = softmax_scale * dQ_i
    store_acc_tile<T>(p.dq, seq.tb, h, seq.q0 + m0 + warp_m0, 0, seq.q_end(), p.head_dim, dq, UniformScale<MT>(p.scale).v);
}

}  // namespace cupyflash
