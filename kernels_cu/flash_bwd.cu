// Backward pass, fp16/bf16 on tensor cores (FlashAttention-2, Algorithm 2).
// One thread block per (key tile K_j V_j, kv head, batch) walks the query tiles Q_i that see it, of
// every query head that reads the kv head (grouped-query attention: dK_j, dV_j sum over the group),
// recomputing P_ij = exp(S_ij * scale - lse_i) instead of reading a stored attention matrix:
//   phase A: S^T = K_j Q_i^T, dP^T = V_j dO_i^T, then P^T and dS^T = P^T * (dP^T - D_i) to shared memory;
//   phase B: dV_j += P^T dO_i, dK_j += dS^T Q_i (registers, for the whole walk);
//   phase C: dQ_i += dS K_j, reduced in fp32 into a scratch buffer (a convert kernel scales and casts it);
//            not in the instantiation with ACCUMULATE_DQ = false (deterministic=True: flash_bwd_dq.cu computes dQ).
#include "traits.cuh"
#include "bwd_rows.cuh"
#include "variant.cuh"

namespace cupyflash {

// Phase A for one warp: P^T and dS^T for its (keys x queries) part of the tile, written to shared memory.
template <typename Tr, typename Pol>
__device__ __forceinline__ void recompute_p_ds(const BwdParams& p, const Pol& pol, const typename Tr::T* sK, const typename Tr::T* sV,
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
    // key j and its offset d = j - diag(i) from query i's diagonal, as this thread's base plus
    // compile-time fragment offsets, and each key row's band of visible query columns (fewer live
    // registers than i and j per element: the kernel runs at 255 registers)
    const int j0 = n0 + r0 + acc_row(0, 0, lane);
    const int d0 = j0 - pol.diag(m0 + c0 + acc_col(0, 0, lane));
    const float fd0 = float(d0);
    #pragma unroll
    for (int mt = 0; mt < G::MT; ++mt)
        #pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int kr = r0 + acc_row(mt, 2 * hh, lane);  // key row within the tile
            const int dj = mt * 16 + hh * 8;                 // kr - (its value at mt = hh = 0)
            const auto row = pol.key_row(j0 + dj, d0 + dj);
            #pragma unroll
            for (int nt = 0; nt < G::NT; ++nt) {
                float pv[2], dsv[2];
                #pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const int qc = c0 + acc_col(nt, c, lane);  // query column within the tile
                    const int col = nt * 8 + c;                // qc - (its value at nt = c = 0)
                    // P_ij = exp2(logit_ij * scale_log2 - lse_i * log2(e)); dS_ij = P_ij (dP_ij - D_i). The
                    // test before the exponential: computed everywhere and then selected, as the Hopper
                    // backward does, it made ptxas spill this kernel at 255 registers.
                    float grad;
                    float x = pol.capped(s[mt][nt][2 * hh + c], grad);
                    const bool keep = pol.user_at(x, j0 + dj, d0 + dj - col);  // mask_mod, bias_mod
                    pv[c] = (pol.visible_col(row, col) && keep)
                                ? pol.probability_of_capped(x, fd0 + float(dj - col), sLse[qc], p.scale_log2)
                                : 0.f;
                    float dpv = dp[mt][nt][2 * hh + c], pz = pv[c];
                    pol.drop_backward(pz, dpv, m0 + qc, j0 + dj);  // dropout: dV takes P Z, dS = P (Z dP - D)
                    dsv[c] = pol.score_grad(pv[c], dpv, sD[qc], grad, m0 + qc, j0 + dj);
                    pv[c] = pz;
                }
                const int qc0 = c0 + acc_col(nt, 0, lane);
                *reinterpret_cast<u32*>(sPt + kr * P_STRIDE + qc0) = Elem<T>::pack(pv[0], pv[1]);
                *reinterpret_cast<u32*>(sdSt + kr * P_STRIDE + qc0) = Elem<T>::pack(dsv[0], dsv[1]);
            }
        }
}

// Phase C for one warp: its part of dQ_i = dS K_j, added into the fp32 accumulator (rows: tensor rows
// from row0, those below row_end).
template <typename Tr>
__device__ __forceinline__ void accumulate_dq(const BwdParams& p, const typename Tr::T* sdSt, const typename Tr::T* sK,
                                              float* dq_accum_head, int row0, int row_end) {
    using G = typename Tr::GridC;
    const int warp = threadIdx.x / 32;
    const int r0 = G::row0(warp), c0 = G::col0(warp);  // queries r0.., head dims c0..
    float dq[G::MT][G::NT][4];
    zero(dq);
    // dS is stored transposed ([key][query]), so it is read as a k-major A operand.
    warp_gemm<G::MT, G::NT, Tr::BLOCK_N, true, true>(dq, sdSt + r0, Tr::P_STRIDE, sK + c0, Tr::STRIDE);
    red_add_acc_tile(dq_accum_head, row0 + r0, c0, row_end, p.head_dim, dq);
}

template <typename T, int HEAD_DIM, int BLOCK_M, int BLOCK_N, int NUM_WARPS, int Q_STAGES, bool BALANCED, int VARIANT,
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
    const int h_kv = blockIdx.y;
    const int n0 = n_block * BLOCK_N;
    const typename Policy<VARIANT>::Seq seq(p, blockIdx.z);
    if (seq.past_k(n0)) return;
    auto row_base = [&](int h) { return seq.stat_base(p.heads, p.seqlen_q, h); };  // head h's lse, D and dQ_accum

    // Query tiles that see some key of K_j (from the causal diagonal down, within the window), of
    // every query head of the group.
    int m_first, m_end;
    const Policy<VARIANT> first_head(p.var, seq, h_kv * p.var.group);
    first_head.template query_tiles<BLOCK_M, BLOCK_N>(n0, m_first, m_end);
    // With a block mask, the tiles it keeps, listed after the tiles' shared memory
    const auto walk = backward_walk<BLOCK_M, BLOCK_N>(first_head, QueryWalk(h_kv, p.var.group, m_first, m_end),
                                                      reinterpret_cast<int*>(smem + Tr::SMEM_BYTES), n0);
    if constexpr (Policy<VARIANT>::BLOCKS) __syncthreads();  // the list is written before any thread reads it
    const int warp = threadIdx.x / 32;

    float dk[GB::MT][GB::NT][4], dv[GB::MT][GB::NT][4];
    zero(dk);
    zero(dv);

    // Load K_j, V_j (and, double-buffered, the first Q_i, dO_i).
    // Q_i, dO_i, lse_i, D_i of the walk's tile `it` into buffer `buf` (a packed sequence's first row
    // read again at each use, as the kv head is: kept live it made ptxas spill at the register limit)
    auto load_query_tile = [&](int it, int buf) {
        const int h = walk.head(it), m0 = walk.m_block(it) * BLOCK_M, q0 = seq.q0_again(p);
        load_tile_async<T, BLOCK_M, HEAD_DIM, NTH>(sQ + buf * BLOCK_M * STRIDE, p.q, seq.tb, h, q0 + m0, q0 + seq.len_q, p.head_dim);
        load_tile_async<T, BLOCK_M, HEAD_DIM, NTH>(sdO + buf * BLOCK_M * STRIDE, p.dout, seq.tb, h, q0 + m0, q0 + seq.len_q, p.head_dim);
        load_row_stats<BLOCK_M, NTH>(sLse + buf * BLOCK_M, sD + buf * BLOCK_M, p, row_base(h), q0 + m0, q0 + seq.len_q);
    };
    load_tile_async<T, BLOCK_N, HEAD_DIM, NTH>(sK, p.k, seq.tb, h_kv, seq.k0 + n0, seq.k_end(), p.head_dim);
    load_tile_async<T, BLOCK_N, HEAD_DIM, NTH>(sV, p.v, seq.tb, h_kv, seq.k0 + n0, seq.k_end(), p.head_dim);
    if (Q_STAGES == 2 && walk.count > 0) load_query_tile(0, 0);
    cp_async_commit();

    for (int it = 0; it < walk.count; ++it) {
        const int m0 = walk.m_block(it) * BLOCK_M, h = walk.head(it);
        const int buf = (Q_STAGES == 2) ? (it & 1) : 0;
        T* sQ_i = sQ + buf * BLOCK_M * STRIDE;
        T* sdO_i = sdO + buf * BLOCK_M * STRIDE;
        if (Q_STAGES == 1 || it + 1 < walk.count) {
            // Load Q_i, dO_i (one stage) or prefetch the next tile's into the other buffer (two stages).
            load_query_tile(Q_STAGES == 2 ? it + 1 : it, Q_STAGES == 2 ? buf ^ 1 : 0);
            cp_async_commit();
        }
        if (Q_STAGES == 2 && it + 1 < walk.count) cp_async_wait<1>(); else cp_async_wait<0>();
        __syncthreads();  // Q_i, dO_i, lse_i, D_i are visible to every warp

        const Policy<VARIANT> pol = Policy<VARIANT>(p.var, seq, h).on_tile(walk.partial(it));
        recompute_p_ds<Tr>(p, pol, sK, sV, sQ_i, sdO_i, sLse + buf * BLOCK_M, sD + buf * BLOCK_M, sPt, sdSt, n0, m0);
        __syncthreads();  // P^T and dS^T are complete before any warp reads another warp's rows

        // dV_j += P^T dO_i, dK_j += dS^T Q_i
        warp_gemm<GB::MT, GB::NT, BLOCK_M, false, true>(dv, sPt + GB::row0(warp) * Tr::P_STRIDE, Tr::P_STRIDE, sdO_i + GB::col0(warp), STRIDE);
        warp_gemm<GB::MT, GB::NT, BLOCK_M, false, true>(dk, sdSt + GB::row0(warp) * Tr::P_STRIDE, Tr::P_STRIDE, sQ_i + GB::col0(warp), STRIDE);
        // dQ_i += dS K_j
        if constexpr (ACCUMULATE_DQ)
            accumulate_dq<Tr>(p, sdSt, sK, p.dq_accum + row_base(h) * p.head_dim, seq.q0_again(p) + m0,
                              seq.q0_again(p) + seq.len_q);
        __syncthreads();  // every warp is done with this Q_i, dO_i, P^T, dS^T before they are overwritten
    }
    cp_async_wait<0>();
    store_dk_dv<T>(p, seq.tb, h_kv, seq.k0 + n0 + GB::row0(warp), seq.k_end(), GB::col0(warp), dk, dv);
}

}  // namespace cupyflash
