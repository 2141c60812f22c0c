// Per-query-row statistics the backward kernels stage in shared memory for each query tile.
#pragma once
#include "params.cuh"
#include "traits.cuh"

namespace cupyflash {

// sLse = lse * log2(e) (+inf where the row does not exist or saw no key, so P = 0 there) and sD = D_i.
template <int BLOCK_M, int NUM_THREADS>
__device__ __forceinline__ void load_row_stats(float* sLse, float* sD, const BwdParams& p, i64 row_base, int m0) {
    for (int r = threadIdx.x; r < BLOCK_M; r += NUM_THREADS) {
        const int i = m0 + r;
        const float lse = i < p.seqlen_q ? p.lse[row_base + i] : -CUPYFLASH_INF;
        sLse[r] = (lse == -CUPYFLASH_INF) ? CUPYFLASH_INF : lse * LOG2E;
        sD[r] = i < p.seqlen_q ? p.dsum[row_base + i] : 0.f;
    }
}

}  // namespace cupyflash
