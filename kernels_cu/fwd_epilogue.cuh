// End of the forward pass: the normalised output tile and the log-sum-exp of each row, written
// from mma accumulator fragments (16-row m-tiles, rows q0 + 16 mt ...) for the rows and columns that exist.
#pragma once
#include "params.cuh"
#include "tile.cuh"

namespace cupyflash {

// O_i = diag(1 / l) O_i and lse_i, written for the rows and columns that exist.
template <typename T, int MT, int DT>
__device__ __forceinline__ void store_output(const FwdParams& p, int b, int h, int q0, float (&o)[MT][DT][4],
                                             const float (&inv_l)[MT][2], const float (&lse)[MT][2]) {
    const int lane = threadIdx.x % 32;
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt)
        #pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int i = q0 + acc_row(mt, 2 * hh, lane);
            if (i >= p.seqlen_q) continue;
            T* o_row = row_ptr<T>(p.o, b, h, i);
            #pragma unroll
            for (int dt = 0; dt < DT; ++dt) {
                const int d = acc_col(dt, 0, lane);
                if (d < p.head_dim)
                    *reinterpret_cast<u32*>(o_row + d) =
                        Elem<T>::pack(o[mt][dt][2 * hh] * inv_l[mt][hh], o[mt][dt][2 * hh + 1] * inv_l[mt][hh]);
            }
            if (lane % 4 == 0) p.lse[(i64(b) * p.heads + h) * p.seqlen_q + i] = lse[mt][hh];
        }
}

}  // namespace cupyflash
