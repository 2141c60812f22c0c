// Online softmax over key tiles (FlashAttention, Algorithm 1), on mma.sync accumulator fragments.
// Each thread holds two rows per 16-row m-tile (rows g and g+8, g = lane / 4); the four threads
// of a quad share a row, so row reductions are two shuffles.
#pragma once
#include "ptx.cuh"

namespace cupyflash {

template <int MT>
struct OnlineSoftmax {
    float m[MT][2];  // running row max of the raw scores (before scaling); -inf until a key is seen
    float l[MT][2];  // running row sum of exp2(s * scale_log2 - m * scale_log2), this thread's columns only

    // Every row starts from m = m0, l = l0: -inf and 0, or with a sink logit, the sink and
    // exp2(sink - sink) = 1 in one of the quad's four threads (Policy::row_max_start, row_sum_start).
    __device__ __forceinline__ void init(float m0 = -CUPYFLASH_INF, float l0 = 0.f) {
        #pragma unroll
        for (int mt = 0; mt < MT; ++mt)
            #pragma unroll
            for (int h = 0; h < 2; ++h) { m[mt][h] = m0; l[mt][h] = l0; }
    }

    // One key tile: s becomes P~ = exp2((s - m_new) * scale_log2) and l is rescaled and summed;
    // alpha = exp2((m_old - m_new) * scale_log2) is the factor the output accumulator still needs
    // (rescale), applied separately so a pipelined kernel can apply it once O is no longer in use.
    // P~ goes to `pt`, which may be s itself; a pipelined kernel passes a separate array so that
    // it never writes the registers of a just-finished wgmma while another one is in flight.
    template <int NT>
    __device__ __forceinline__ void update_scores(float (&s)[MT][NT][4], float (&alpha)[MT][2], float scale_log2) {
        update_scores(s, s, alpha, scale_log2);
    }
    template <int NT>
    __device__ __forceinline__ void update_scores(const float (&s)[MT][NT][4], float (&pt)[MT][NT][4], float (&alpha)[MT][2],
                                                  float scale_log2) {
        #pragma unroll
        for (int mt = 0; mt < MT; ++mt)
            #pragma unroll
            for (int h = 0; h < 2; ++h) {
                // m_new = max(m_old, rowmax(S_ij))
                float m_tile = -CUPYFLASH_INF;
                #pragma unroll
                for (int nt = 0; nt < NT; ++nt) m_tile = fmaxf(m_tile, fmaxf(s[mt][nt][2 * h], s[mt][nt][2 * h + 1]));
                const float m_new = fmaxf(m[mt][h], quad_max(m_tile));
                // A row that has seen only masked keys keeps m = -inf; subtract 0 instead so no inf - inf appears.
                const float m_scaled = (m_new == -CUPYFLASH_INF) ? 0.f : m_new * scale_log2;
                alpha[mt][h] = exp2f(m[mt][h] * scale_log2 - m_scaled);
                // P~_ij = exp2(S_ij * scale_log2 - m_new * scale_log2), l = alpha * l + rowsum(P~_ij)
                float row_sum = 0.f;
                #pragma unroll
                for (int nt = 0; nt < NT; ++nt)
                    #pragma unroll
                    for (int c = 0; c < 2; ++c) {
                        const float x = exp2f(s[mt][nt][2 * h + c] * scale_log2 - m_scaled);
                        pt[mt][nt][2 * h + c] = x;
                        row_sum += x;
                    }
                l[mt][h] = alpha[mt][h] * l[mt][h] + row_sum;
                m[mt][h] = m_new;
            }
    }

    // O_i = diag(alpha) O_i, before P~_ij V_j is added
    template <int DT>
    __device__ __forceinline__ static void rescale(float (&o)[MT][DT][4], const float (&alpha)[MT][2]) {
        #pragma unroll
        for (int mt = 0; mt < MT; ++mt)
            #pragma unroll
            for (int dt = 0; dt < DT; ++dt) {
                o[mt][dt][0] *= alpha[mt][0]; o[mt][dt][1] *= alpha[mt][0];
                o[mt][dt][2] *= alpha[mt][1]; o[mt][dt][3] *= alpha[mt][1];
            }
    }

    // Both steps at once (the unpipelined kernels).
    template <int NT, int DT>
    __device__ __forceinline__ void update(float (&s)[MT][NT][4], float (&o)[MT][DT][4], float scale_log2) {
        float alpha[MT][2];
        update_scores(s, alpha, scale_log2);
        rescale(o, alpha);
    }

    // End of the key loop: the full row sums, 1 / l for the output (0 for rows that saw no key),
    // and lse = m * scale + log(l) in natural log (-inf for rows that saw no key).
    __device__ __forceinline__ void finalize(float (&inv_l)[MT][2], float (&lse)[MT][2], float scale_log2) {
        constexpr float LN2 = 0.6931471805599453f;
        #pragma unroll
        for (int mt = 0; mt < MT; ++mt)
            #pragma unroll
            for (int h = 0; h < 2; ++h) {
                const float row_l = quad_sum(l[mt][h]);
                const bool empty = (row_l == 0.f);  // NaN sums stay NaN: NaN inputs propagate
                inv_l[mt][h] = empty ? 0.f : 1.f / row_l;
                lse[mt][h] = empty ? -CUPYFLASH_INF : (m[mt][h] * scale_log2 + log2f(row_l)) * LN2;
            }
    }
};

}  // namespace cupyflash
