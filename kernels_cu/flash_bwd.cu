// Backward pass, fp16/bf16 on tensor cores (FlashAttention-2, Algorithm 2).
// One thread block per (key tile K_j V_j, head, batch) walks the query tiles Q_i that see it,
// recomputing P_ij = exp(S_ij * scale - lse_i) instead of reading a stored attention matrix:
//   phase A: S^T = K_j Q_i^T, dP^T = V_j dO_i^T, then P^T and dS^T = P^T * (dP^T - D_i) to shared memory;
//   phase B: dV_j += P^T dO_i, dK_j += dS^T Q_i (registers, for the whole walk);
//   phase C: dQ_i += dS K_j, reduced in fp32 into a scratch buffer (a convert kernel scales and casts it);
//            not in the instantiation with ACCUMULATE_DQ = false (deterministic=True: flash_bwd_dq.cu computes dQ).
#include "traits.cuh"
#include "bwd_rows.cuh"

namespace cupyflash {

// Phase A for one warp: P^T and dS^T for its (keys x queries) part of the tile, written to shared memory.
template <typename Tr, bool IS_CAUSAL>
__device__ __forceinline__ void recompute_p_ds(const BwdParams& p, const typename Tr::T* sK, const typename Tr::T* sV,
                                               const typename Tr::T* sQ, const typename Tr::T* sdO,
                                               const float* sLse, const float* sD,
                                               typename Tr::T* sPt, typename Tr::T* sdSt, int n0, int m0) {
    using T = typename Tr::T;
    using G = typename Tr::GridA;
    constexpr int STRIDE = Tr::STRIDE, P_STRIDE = Tr::P_STRIDE;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int r0 = G::row0(warp), c0 = G::col0(warp);  // keys r0.., queries c0.. within the tile
    float s[G::MT][G::NT][4], dp[G::MT][G::NT][4];
    zero(s);
    zero(dp);
    // S^T = K_j Q_i^T and dP^T = V_j dO_i^T
    warp_gemm<G::MT, G::NT, Tr::HEAD_DIM, false, false>(s, sK + r0 * STRIDE, STRIDE, sQ + c0 * STRIDE, STRIDE);
    warp_gemm<G::MT, G::NT, Tr::HEAD_DIM, false, false>(dp, sV + r0 * STRIDE, STRIDE, sdO + c0 * STRIDE, STRIDE);
    #pragma unroll
    for (int mt = 0; mt < G::MT; ++mt)
        #pragma unroll
        for (int nt = 0; nt < G::NT; ++nt)
            #pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int kr = r0 + acc_row(mt, 2 * hh, lane);  // key row within the tile
                float pv[2], dsv[2];
                #pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const int qc = c0 + acc_col(nt, c, lane);  // query column within the tile
                    const bool visible = n0 + kr <= last_visible_key<IS_CAUSAL>(m0 + qc, p.seqlen_q, p.seqlen_k);
                    // P_ij = exp2(S_ij * scale_log2 - lse_i * log2(e)); dS_ij = P_ij (dP_ij - D_i): prob_and_ds
                    // (bwd_rows.cuh) written out, because the call makes ptxas spill this kernel at 255 registers
                    pv[c] = visible ? exp2f(s[mt][nt][2 * hh + c] * p.scale_log2 - sLse[qc]) : 0.f;
                    dsv[c] = pv[c] * (dp[mt][nt][2 * hh + c] - sD[qc]);
                }
                const int qc0 = c0 + acc_col(nt, 0, lane);
                *reinterpret_cast<u32*>(sPt + kr * P_STRIDE + qc0) = Elem<T>::pack(pv[0], pv[1]);
                *reinterpret_cast<u32*>(sdSt + kr * P_STRIDE + qc0) = Elem<T>::pack(dsv[0], dsv[1]);
            }
}

// Phase C for one warp: its part of dQ_i = dS K_j, added into the fp32 accumulator.
template <typename Tr>
__device__ __forceinline__ void accumulate_dq(const BwdParams& p, const typename Tr::T* sdSt, const typename Tr::T* sK,
                                              float* dq_accum_head, int m0) {
    using G = typename Tr::GridC;
    const int warp = threadIdx.x / 32;
    const int r0 = G::row0(warp), c0 = G::col0(warp);  // queries r0.., head dims c0..
    float dq[G::MT][G::NT][4];
    zero(dq);
    // dS is stored transposed ([key][query]), so it is read as a k-major A operand.
    warp_gemm<G::MT, G::NT, Tr::BLOCK_N, true, true>(dq, sdSt + r0, Tr::P_STRIDE, sK + c0, Tr::STRIDE);
    red_add_acc_tile(dq_accum_head, m0 + r0, c0, p.seqlen_q, p.head_dim, dq);
}

// dK_j (times softmax_scale) and dV_j from their register accumulators to global memory.
template <typename Tr, int MT, int NT>
__device__ __forceinline__ void store_dkdv(const BwdParams& p, int b, int h, int n0,
                                           const float (&dk)[MT][NT][4], const float (&dv)[MT][NT][4]) {
    using T = typename Tr::T;
    using G = typename Tr::GridB;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt)
        #pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int j = n0 + G::row0(warp) + acc_row(mt, 2 * hh, lane);
            if (j >= p.seqlen_k) continue;
            T* dk_row = row_ptr<T>(p.dk, b, h, j);
            T* dv_row = row_ptr<T>(p.dv, b, h, j);
            #pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const int d = G::col0(warp) + acc_col(nt, 0, lane);
                if (d >= p.head_dim) continue;
                *reinterpret_cast<u32*>(dk_row + d) =
                    Elem<T>::pack(dk[mt][nt][2 * hh] * p.scale, dk[mt][nt][2 * hh + 1] * p.scale);
                *reinterpret_cast<u32*>(dv_row + d) = Elem<T>::pack(dv[mt][nt][2 * hh], dv[mt][nt][2 * hh + 1]);
            }
        }
}

template <typename T, int HEAD_DIM, int BLOCK_M, int BLOCK_N, int NUM_WARPS, int Q_STAGES, bool BALANCED, bool IS_CAUSAL,
          bool ACCUMULATE_DQ>
__global__ void __launch_bounds__(NUM_WARPS * 32) flash_bwd_kernel(const BwdParams p) {
    using Tr = BwdTraits<T, HEAD_DIM, BLOCK_M, BLOCK_N, NUM_WARPS, Q_STAGES, BALANCED>;
    using GB = typename Tr::GridB;
    constexpr int STRIDE = Tr::STRIDE, NTH = Tr::NUM_THREADS;
    extern __shared__ __align__(16) unsigned char smem[];
    T* sK = reinterpret_cast<T*>(smem);
    T* sV = sK + BLOCK_N * STRIDE;
    T* sQ = sV + BLOCK_N * STRIDE;               // Q_STAGES buffers of BLOCK_M rows
    T* sdO = sQ + Q_STAGES * BLOCK_M * STRIDE;   // Q_STAGES buffers of BLOCK_M rows
    T* sPt = sdO + Q_STAGES * BLOCK_M * STRIDE;  // P^T, [key][query]
    T* sdSt = sPt + BLOCK_N * Tr::P_STRIDE;      // dS^T, [key][query]
    float* sLse = reinterpret_cast<float*>(sdSt + BLOCK_N * Tr::P_STRIDE);
    float* sD = sLse + Q_STAGES * BLOCK_M;

    const int n_block = gridDim.x - 1 - blockIdx.x;
    const int h = blockIdx.y, b = blockIdx.z;
    const int n0 = n_block * BLOCK_N;
    const i64 row_base = (i64(b) * p.heads + h) * p.seqlen_q;  // (b, h) row of lse, D and dQ_accum
    float* dq_accum_head = p.dq_accum + row_base * p.head_dim;

    // Query tiles that see some key of K_j: all of them, or from the causal diagonal down.
    const int first_q = IS_CAUSAL ? max(0, n0 - (p.seqlen_k - p.seqlen_q)) : 0;
    const int m_begin = first_q / BLOCK_M, m_end = (p.seqlen_q + BLOCK_M - 1) / BLOCK_M;
    const int warp = threadIdx.x / 32;

    float dk[GB::MT][GB::NT][4], dv[GB::MT][GB::NT][4];
    zero(dk);
    zero(dv);

    // Load K_j, V_j (and, double-buffered, the first Q_i, dO_i).
    load_tile_async<T, BLOCK_N, HEAD_DIM, NTH>(sK, p.k, b, h, n0, p.seqlen_k, p.head_dim);
    load_tile_async<T, BLOCK_N, HEAD_DIM, NTH>(sV, p.v, b, h, n0, p.seqlen_k, p.head_dim);
    if (Q_STAGES == 2 && m_begin < m_end) {
        load_tile_async<T, BLOCK_M, HEAD_DIM, NTH>(sQ, p.q, b, h, m_begin * BLOCK_M, p.seqlen_q, p.head_dim);
        load_tile_async<T, BLOCK_M, HEAD_DIM, NTH>(sdO, p.dout, b, h, m_begin * BLOCK_M, p.seqlen_q, p.head_dim);
        load_row_stats<BLOCK_M, NTH>(sLse, sD, p, row_base, m_begin * BLOCK_M);
    }
    cp_async_commit();

    for (int m_block = m_begin, it = 0; m_block < m_end; ++m_block, ++it) {
        const int m0 = m_block * BLOCK_M;
        const int buf = (Q_STAGES == 2) ? (it & 1) : 0;
        T* sQ_i = sQ + buf * BLOCK_M * STRIDE;
        T* sdO_i = sdO + buf * BLOCK_M * STRIDE;
        if (Q_STAGES == 1 || m_block + 1 < m_end) {
            // Load Q_i, dO_i (one stage) or prefetch Q_{i+1}, dO_{i+1} into the other buffer (two stages).
            const int nbuf = (Q_STAGES == 2) ? (buf ^ 1) : 0, m_load = (Q_STAGES == 2) ? m0 + BLOCK_M : m0;
            load_tile_async<T, BLOCK_M, HEAD_DIM, NTH>(sQ + nbuf * BLOCK_M * STRIDE, p.q, b, h, m_load, p.seqlen_q, p.head_dim);
            load_tile_async<T, BLOCK_M, HEAD_DIM, NTH>(sdO + nbuf * BLOCK_M * STRIDE, p.dout, b, h, m_load, p.seqlen_q, p.head_dim);
            load_row_stats<BLOCK_M, NTH>(sLse + nbuf * BLOCK_M, sD + nbuf * BLOCK_M, p, row_base, m_load);
            cp_async_commit();
        }
        if (Q_STAGES == 2 && m_block + 1 < m_end) cp_async_wait<1>(); else cp_async_wait<0>();
        __syncthreads();  // Q_i, dO_i, lse_i, D_i are visible to every warp

        recompute_p_ds<Tr, IS_CAUSAL>(p, sK, sV, sQ_i, sdO_i, sLse + buf * BLOCK_M, sD + buf * BLOCK_M, sPt, sdSt, n0, m0);
        __syncthreads();  // P^T and dS^T are complete before any warp reads another warp's rows

        // dV_j += P^T dO_i, dK_j += dS^T Q_i
        warp_gemm<GB::MT, GB::NT, BLOCK_M, false, true>(dv, sPt + GB::row0(warp) * Tr::P_STRIDE, Tr::P_STRIDE, sdO_i + GB::col0(warp), STRIDE);
        warp_gemm<GB::MT, GB::NT, BLOCK_M, false, true>(dk, sdSt + GB::row0(warp) * Tr::P_STRIDE, Tr::P_STRIDE, sQ_i + GB::col0(warp), STRIDE);
        // dQ_i += dS K_j
        if constexpr (ACCUMULATE_DQ) accumulate_dq<Tr>(p, sdSt, sK, dq_accum_head, m0);
        __syncthreads();  // every warp is done with this Q_i, dO_i, P^T, dS^T before they are overwritten
    }
    cp_async_wait<0>();
    store_dk_dv<T>(p, b, h, n0 + GB::row0(warp), GB::col0(warp), dk, dv);
}

}  // namespace cupyflash
