// End of the forward pass: the normalised output tile and the log-sum-exp of each row, written
// from mma accumulator fragments (16-row m-tiles, rows q0 + 16 mt ...) for the rows and columns that exist.
#pragma once
#include "params.cuh"
#include "tile.cuh"

namespace cupyflash {

// O_i = diag(1 / l) O_i and lse_i, written for the rows and columns that exist.
template <typename T, int MT, int DT>
__device__ __forceinline__ void store_output(const FwdParams& p, int b, int h, int q0, const float (&o)[MT][DT][4],
                                             const float (&inv_l)[MT][2], const float (&lse)[MT][2]) {
    const int lane = threadIdx.x % 32;
    store_acc_tile<T>(p.o, b, h, q0, 0, p.seqlen_q, p.head_dim, o, inv_l, [&](int mt, int hh, int i) {
        if (lane % 4 == 0) p.lse[(i64(b) * p.heads + h) * p.seqlen_q + i] = lse[mt][hh];
    });
}

}  // namespace cupyflash
