// fp32 inputs: the same tiled algorithm on CUDA cores, every product and sum in fp32.
// Simpler and slower than the tensor-core path; 4 threads share one row of a tile
// (a quad of consecutive lanes), each taking every 4th column.
#include "params.cuh"
#include "traits.cuh"
#include "bwd_rows.cuh"
#include "variant.cuh"

namespace cupyflash {

template <int HEAD_DIM>
struct F32Traits {
    static constexpr int BLOCK_M = 32, BLOCK_N = 32, NUM_THREADS = 128;
    static constexpr int STRIDE = HEAD_DIM + 1;          // +1 float: rows start in different banks
    static constexpr int P_STRIDE = 33;
    static constexpr int COLS = BLOCK_N / 4;             // score columns per thread
    static constexpr int DCOLS = HEAD_DIM / 4;           // head_dim columns per thread
    static constexpr int SMEM_TILE = 32 * STRIDE;
    static_assert(BLOCK_M == NUM_THREADS / 4 && BLOCK_N == NUM_THREADS / 4, "one quad per tile row");
};

// Rows [row0, row0 + 32) of one head into shared memory, zeros past seqlen and head_dim.
template <int HEAD_DIM>
__device__ __forceinline__ void load_tile_f32(float* s, const TensorRef& src, int b, int h, int row0, int seqlen, int head_dim) {
    constexpr int STRIDE = F32Traits<HEAD_DIM>::STRIDE;
    const float* base = row_ptr<float>(src, b, h, 0);
    for (int idx = threadIdx.x; idx < 32 * HEAD_DIM; idx += F32Traits<HEAD_DIM>::NUM_THREADS) {
        const int r = idx / HEAD_DIM, d = idx % HEAD_DIM;
        s[r * STRIDE + d] = (row0 + r < seqlen && d < head_dim) ? base[i64(row0 + r) * src.stride_s + d] : 0.f;
    }
}

template <int HEAD_DIM>
__device__ __forceinline__ float dot_rows(const float* a, const float* b) {
    float acc = 0.f;
    #pragma unroll 8
    for (int d = 0; d < HEAD_DIM; ++d) acc = fmaf(a[d], b[d], acc);
    return acc;
}

template <int HEAD_DIM, int VARIANT>
__global__ void __launch_bounds__(128, 1) flash_fwd_f32_kernel(const FwdParams p) {
    using Tr = F32Traits<HEAD_DIM>;
    extern __shared__ __align__(16) unsigned char smem[];
    float* sQ = reinterpret_cast<float*>(smem);
    float* sK = sQ + Tr::SMEM_TILE;
    float* sV = sK + Tr::SMEM_TILE;
    float* sP = sV + Tr::SMEM_TILE;  // [query][key]

    const int h = blockIdx.y, h_kv = kv_head(p.var, h), m0 = (gridDim.x - 1 - blockIdx.x) * Tr::BLOCK_M;
    const int r = threadIdx.x / 4, c4 = threadIdx.x % 4, i = m0 + r;
    const typename Policy<VARIANT, false>::Seq seq(p, blockIdx.z);
    if (seq.past_q(m0)) return;
    const Policy<VARIANT, false> pol(p.var, seq, h);
    int n_first, n_end;  // the key tiles some row of Q_i sees
    pol.template key_tiles<Tr::BLOCK_M, Tr::BLOCK_N>(m0, n_first, n_end);

    float m = pol.row_max_start(p.var, h), l = pol.row_sum_start(c4), o[Tr::DCOLS];
    #pragma unroll
    for (int dd = 0; dd < Tr::DCOLS; ++dd) o[dd] = 0.f;
    load_tile_f32<HEAD_DIM>(sQ, p.q, seq.tb, h, seq.q0 + m0, seq.q_end(), p.head_dim);

    for (int n_block = n_first; n_block < n_end; ++n_block) {
        const int n0 = n_block * Tr::BLOCK_N;
        __syncthreads();  // every thread is done reading K_{j-1}, V_{j-1}
        load_tile_f32<HEAD_DIM>(sK, p.k, seq.tb, h_kv, seq.k0 + n0, seq.k_end(), p.head_dim);
        load_tile_f32<HEAD_DIM>(sV, p.v, seq.tb, h_kv, seq.k0 + n0, seq.k_end(), p.head_dim);
        __syncthreads();  // Q_i, K_j, V_j are visible to every thread
        // S_ij = Q_i K_j^T as logits, masked; m_new = max(m, rowmax(S_ij))
        float s[Tr::COLS], m_tile = -CUPYFLASH_INF;
        #pragma unroll
        for (int jj = 0; jj < Tr::COLS; ++jj) {
            const int col = c4 + 4 * jj;
            s[jj] = pol.logit(dot_rows<HEAD_DIM>(sQ + r * Tr::STRIDE, sK + col * Tr::STRIDE), i, n0 + col);
            if (!pol.visible(i, n0 + col)) s[jj] = -CUPYFLASH_INF;
            m_tile = fmaxf(m_tile, s[jj]);
        }
        const float m_new = fmaxf(m, quad_max(m_tile));
        const float m_scaled = (m_new == -CUPYFLASH_INF) ? 0.f : m_new * p.scale_log2;
        const float alpha = exp2f(m * p.scale_log2 - m_scaled);
        // P~_ij = exp2(S_ij * scale_log2 - m_new * scale_log2); l = alpha l + rowsum(P~_ij)
        float row_sum = 0.f;
        #pragma unroll
        for (int jj = 0; jj < Tr::COLS; ++jj) {
            const float pj = exp2f(s[jj] * p.scale_log2 - m_scaled);
            // P~ V's operand, dropped and scaled with dropout (the row sum takes P~ whole)
            sP[r * Tr::P_STRIDE + c4 + 4 * jj] = Policy<VARIANT, false>::DROPOUT ? pj * pol.dropout_at(i, n0 + c4 + 4 * jj) : pj;
            row_sum += pj;
        }
        l = alpha * l + row_sum;
        m = m_new;
        __syncwarp();  // the quad that owns row r has written all of P~_r before reading it
        // O_i = diag(alpha) O_i + P~_ij V_j
        #pragma unroll
        for (int dd = 0; dd < Tr::DCOLS; ++dd) o[dd] *= alpha;
        for (int j = 0; j < Tr::BLOCK_N; ++j) {
            const float pj = sP[r * Tr::P_STRIDE + j];
            #pragma unroll
            for (int dd = 0; dd < Tr::DCOLS; ++dd) o[dd] = fmaf(pj, sV[j * Tr::STRIDE + c4 + 4 * dd], o[dd]);
        }
    }
    // O_i = O_i / l; lse_i = m * scale + log(l)
    const float row_l = quad_sum(l);
    if (i >= seq.len_q) return;
    const bool empty = (row_l == 0.f);
    float* o_row = row_ptr<float>(p.o, seq.tb, h, seq.q0 + i);
    #pragma unroll
    for (int dd = 0; dd < Tr::DCOLS; ++dd) {
        const int d = c4 + 4 * dd;
        if (d < p.head_dim) o_row[d] = empty ? 0.f : o[dd] / row_l;
    }
    if (c4 == 0)
        p.lse[seq.stat_base(p.heads, p.seqlen_q, h) + seq.q0 + i] =
            empty ? -CUPYFLASH_INF : (m * p.scale_log2 + log2f(row_l)) / LOG2E;
}

template <int HEAD_DIM, int VARIANT>
__global__ void __launch_bounds__(128, 1) flash_bwd_f32_kernel(const BwdParams p) {
    using Tr = F32Traits<HEAD_DIM>;
    extern __shared__ __align__(16) unsigned char smem[];
    float* sK = reinterpret_cast<float*>(smem);
    float* sV = sK + Tr::SMEM_TILE;
    float* sQ = sV + Tr::SMEM_TILE;
    float* sdO = sQ + Tr::SMEM_TILE;
    float* sPt = sdO + Tr::SMEM_TILE;           // P^T, [key][query]
    float* sdSt = sPt + 32 * Tr::P_STRIDE;      // dS^T, [key][query]
    float* sLse = sdSt + 32 * Tr::P_STRIDE;
    float* sD = sLse + Tr::BLOCK_M;

    const int h_kv = blockIdx.y, n0 = (gridDim.x - 1 - blockIdx.x) * Tr::BLOCK_N;
    const int r = threadIdx.x / 4, c4 = threadIdx.x % 4;  // r: key row (phases A, B) or query row (phase C)
    const typename Policy<VARIANT, false>::Seq seq(p, blockIdx.z);
    if (seq.past_k(n0)) return;
    // the query tiles that see K_j, of every query head that reads kv head h_kv
    int m_first, m_end;
    Policy<VARIANT, false>(p.var, seq, h_kv * p.var.group).template query_tiles<Tr::BLOCK_M, Tr::BLOCK_N>(n0, m_first, m_end);
    const QueryWalk walk(h_kv, p.var.group, m_first, m_end);

    float dk[Tr::DCOLS], dv[Tr::DCOLS];
    #pragma unroll
    for (int dd = 0; dd < Tr::DCOLS; ++dd) dk[dd] = dv[dd] = 0.f;
    load_tile_f32<HEAD_DIM>(sK, p.k, seq.tb, h_kv, seq.k0 + n0, seq.k_end(), p.head_dim);
    load_tile_f32<HEAD_DIM>(sV, p.v, seq.tb, h_kv, seq.k0 + n0, seq.k_end(), p.head_dim);

    for (int it = 0; it < walk.count; ++it) {
        const int h = walk.head(it), m0 = walk.m_block(it) * Tr::BLOCK_M;
        const i64 row_base = seq.stat_base(p.heads, p.seqlen_q, h);
        const Policy<VARIANT, false> pol(p.var, seq, h);
        __syncthreads();  // every thread is done with the previous Q_i, dO_i, P^T, dS^T
        load_tile_f32<HEAD_DIM>(sQ, p.q, seq.tb, h, seq.q0 + m0, seq.q_end(), p.head_dim);
        load_tile_f32<HEAD_DIM>(sdO, p.dout, seq.tb, h, seq.q0 + m0, seq.q_end(), p.head_dim);
        load_row_stats<Tr::BLOCK_M, Tr::NUM_THREADS>(sLse, sD, p, row_base, seq.q0 + m0, seq.q_end());
        __syncthreads();  // Q_i, dO_i, lse_i, D_i are visible to every thread
        // P_ij and dS_ij, stored transposed
        #pragma unroll
        for (int jj = 0; jj < Tr::COLS; ++jj) {
            const int qc = c4 + 4 * jj;
            const float s = dot_rows<HEAD_DIM>(sK + r * Tr::STRIDE, sQ + qc * Tr::STRIDE);
            const float dp = dot_rows<HEAD_DIM>(sV + r * Tr::STRIDE, sdO + qc * Tr::STRIDE);
            pol.prob_and_ds(s, dp, m0 + qc, n0 + r, sLse[qc], sD[qc], p.scale_log2, sPt[r * Tr::P_STRIDE + qc],
                            sdSt[r * Tr::P_STRIDE + qc]);
        }
        __syncthreads();  // P^T and dS^T are complete before rows written by other quads are read
        // dV_j += P^T dO_i, dK_j += dS^T Q_i
        for (int q = 0; q < Tr::BLOCK_M; ++q) {
            const float pt = sPt[r * Tr::P_STRIDE + q], dst = sdSt[r * Tr::P_STRIDE + q];
            #pragma unroll
            for (int dd = 0; dd < Tr::DCOLS; ++dd) {
                dv[dd] = fmaf(pt, sdO[q * Tr::STRIDE + c4 + 4 * dd], dv[dd]);
                dk[dd] = fmaf(dst, sQ[q * Tr::STRIDE + c4 + 4 * dd], dk[dd]);
            }
        }
        // dQ_i += dS K_j (row r of this tile is query m0 + r here), unless the deterministic dQ pass computes dQ
        if (p.dq_accum != nullptr && m0 + r < seq.len_q) {
            float* dq_row = p.dq_accum + (row_base + seq.q0 + m0 + r) * p.head_dim;
            for (int d = c4; d < p.head_dim; d += 4) {
                float acc = 0.f;
                #pragma unroll 8
                for (int j = 0; j < Tr::BLOCK_N; ++j) acc = fmaf(sdSt[j * Tr::P_STRIDE + r], sK[j * Tr::STRIDE + d], acc);
                atomicAdd(dq_row + d, acc);
            }
        }
    }
    if (n0 + r >= seq.len_k) return;
    float* dk_row = row_ptr<float>(p.dk, seq.tb, h_kv, seq.k0 + n0 + r);
    float* dv_row = row_ptr<float>(p.dv, seq.tb, h_kv, seq.k0 + n0 + r);
    #pragma unroll
    for (int dd = 0; dd < Tr::DCOLS; ++dd) {
        const int d = c4 + 4 * dd;
        if (d < p.head_dim) { dk_row[d] = dk[dd] * p.scale; dv_row[d] = dv[dd]; }
    }
}

// Deterministic dQ pass (deterministic=True): one block per query tile Q_i walking the key tiles,
// dQ_i in registers (no atomics, a fixed order), written as softmax_scale * dQ_i.
template <int HEAD_DIM, int VARIANT>
__global__ void __launch_bounds__(128, 1) flash_bwd_dq_f32_kernel(const BwdParams p) {
    using Tr = F32Traits<HEAD_DIM>;
    extern __shared__ __align__(16) unsigned char smem[];
    float* sQ = reinterpret_cast<float*>(smem);
    float* sdO = sQ + Tr::SMEM_TILE;
    float* sK = sdO + Tr::SMEM_TILE;
    float* sV = sK + Tr::SMEM_TILE;
    float* sdS = sV + Tr::SMEM_TILE;  // [query][key]

    const int h = blockIdx.y, h_kv = kv_head(p.var, h), m0 = (gridDim.x - 1 - blockIdx.x) * Tr::BLOCK_M;
    const int r = threadIdx.x / 4, c4 = threadIdx.x % 4, i = m0 + r;
    const typename Policy<VARIANT, false>::Seq seq(p, blockIdx.z);
    if (seq.past_q(m0)) return;
    const i64 row_base = seq.stat_base(p.heads, p.seqlen_q, h);
    const Policy<VARIANT, false> pol(p.var, seq, h);
    int n_first, n_end;  // the key tiles some row of Q_i sees
    pol.template key_tiles<Tr::BLOCK_M, Tr::BLOCK_N>(m0, n_first, n_end);

    float lse_log2, d_i, dq[Tr::DCOLS];
    row_stats(p, row_base, seq.q0 + i, seq.q_end(), lse_log2, d_i);
    #pragma unroll
    for (int dd = 0; dd < Tr::DCOLS; ++dd) dq[dd] = 0.f;
    load_tile_f32<HEAD_DIM>(sQ, p.q, seq.tb, h, seq.q0 + m0, seq.q_end(), p.head_dim);
    load_tile_f32<HEAD_DIM>(sdO, p.dout, seq.tb, h, seq.q0 + m0, seq.q_end(), p.head_dim);

    for (int n_block = n_first; n_block < n_end; ++n_block) {
        const int n0 = n_block * Tr::BLOCK_N;
        __syncthreads();  // every thread is done reading K_{j-1}
        load_tile_f32<HEAD_DIM>(sK, p.k, seq.tb, h_kv, seq.k0 + n0, seq.k_end(), p.head_dim);
        load_tile_f32<HEAD_DIM>(sV, p.v, seq.tb, h_kv, seq.k0 + n0, seq.k_end(), p.head_dim);
        __syncthreads();  // Q_i, dO_i, K_j, V_j are visible to every thread
        // dS_ij = P_ij (dP_ij - D_i) with S_ij = Q_i K_j^T, dP_ij = dO_i V_j^T
        #pragma unroll
        for (int jj = 0; jj < Tr::COLS; ++jj) {
            const int col = c4 + 4 * jj;
            const float s = dot_rows<HEAD_DIM>(sQ + r * Tr::STRIDE, sK + col * Tr::STRIDE);
            const float dp = dot_rows<HEAD_DIM>(sdO + r * Tr::STRIDE, sV + col * Tr::STRIDE);
            float p_ij;
            pol.template prob_and_ds<true, false>(s, dp, i, n0 + col, lse_log2, d_i, p.scale_log2, p_ij,  // dbias: the main kernel's
                                                  sdS[r * Tr::P_STRIDE + col]);
        }
        __syncwarp();  // the quad that owns row r has written all of dS_r before reading it
        // dQ_i += dS_ij K_j
        for (int j = 0; j < Tr::BLOCK_N; ++j) {
            const float ds = sdS[r * Tr::P_STRIDE + j];
            #pragma unroll
            for (int dd = 0; dd < Tr::DCOLS; ++dd) dq[dd] = fmaf(ds, sK[j * Tr::STRIDE + c4 + 4 * dd], dq[dd]);
        }
    }
    if (i >= seq.len_q) return;
    float* dq_row = row_ptr<float>(p.dq, seq.tb, h, seq.q0 + i);
    #pragma unroll
    for (int dd = 0; dd < Tr::DCOLS; ++dd) {
        const int d = c4 + 4 * dd;
        if (d < p.head_dim) dq_row[d] = dq[dd] * p.scale;
    }
}

}  // namespace cupyflash
