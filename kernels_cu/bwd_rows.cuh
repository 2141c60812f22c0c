// What the backward kernels share: the row statistics they read (lse_i, D_i) and the store of
// dK_j, dV_j (the element formulas of P_ij and dS_ij are the variant policy's, variant.cuh).
#pragma once
#include "params.cuh"
#include "traits.cuh"

namespace cupyflash {

// Tensor row `row`'s lse_i * log2(e) (+inf where the row is not in the sequence, row >= row_end, or
// saw no key, so P = 0 there) and D_i; row_base: the head's first entry (Seq::stat_base).
__device__ __forceinline__ void row_stats(const BwdParams& p, i64 row_base, int row, int row_end, float& lse_log2,
                                          float& d) {
    const float lse = row < row_end ? p.lse[row_base + row] : -CUPYFLASH_INF;
    lse_log2 = (lse == -CUPYFLASH_INF) ? CUPYFLASH_INF : lse * LOG2E;
    d = row < row_end ? p.dsum[row_base + row] : 0.f;
}

// Tensor rows row0 .. row0 + BLOCK_M of lse * log2(e) and D into shared memory, all threads taking a share.
template <int BLOCK_M, int NUM_THREADS>
__device__ __forceinline__ void load_row_stats(float* sLse, float* sD, const BwdParams& p, i64 row_base, int row0,
                                               int row_end) {
    for (int r = threadIdx.x; r < BLOCK_M; r += NUM_THREADS) row_stats(p, row_base, row0 + r, row_end, sLse[r], sD[r]);
}

// dK_j (times softmax_scale) and dV_j from a warp's register accumulators (rows: tensor rows of keys
// from key0, columns: head_dim from col0) to global memory, for the keys (rows below key_end) and
// columns that exist. One loop for both tiles: two store_acc_tile calls made ptxas spill the
// mma.sync backward at 255 registers.
template <typename T, int MT, int DT>
__device__ __forceinline__ void store_dk_dv(const BwdParams& p, int b, int h, int key0, int key_end, int col0,
                                            const float (&dk)[MT][DT][4], const float (&dv)[MT][DT][4]) {
    const int lane = threadIdx.x % 32;
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt)
        #pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int j = key0 + acc_row(mt, 2 * hh, lane);
            if (j >= key_end) continue;
            T* dk_row = row_ptr<T>(p.dk, b, h, j);
            T* dv_row = row_ptr<T>(p.dv, b, h, j);
            #pragma unroll
            for (int dt = 0; dt < DT; ++dt) {
                const int d = col0 + acc_col(dt, 0, lane);
                if (d >= p.head_dim) continue;
                *reinterpret_cast<u32*>(dk_row + d) = Elem<T>::pack(dk[mt][dt][2 * hh] * p.scale, dk[mt][dt][2 * hh + 1] * p.scale);
                *reinterpret_cast<u32*>(dv_row + d) = Elem<T>::pack(dv[mt][dt][2 * hh], dv[mt][dt][2 * hh + 1]);
            }
        }
}

}  // namespace cupyflash
