// End of the forward pass: the normalised output tile and the log-sum-exp of each row, written
// from mma accumulator fragments (16-row m-tiles, rows q0 + 16 mt ...) for the rows and columns that exist.
#pragma once
#include "params.cuh"
#include "tile.cuh"

namespace cupyflash {

// O_i = diag(1 / l) O_i and lse_i of sequence `seq`'s head h, from its query i0 on, written for the
// rows and columns that exist.
template <typename T, int MT, int DT, typename Seq>
__device__ __forceinline__ void store_output(const FwdParams& p, const Seq& seq, int h, int i0, const float (&o)[MT][DT][4],
                                             const float (&inv_l)[MT][2], const float (&lse)[MT][2]) {
    const int lane = threadIdx.x % 32;
    const i64 lse_base = seq.stat_base(p.heads, p.seqlen_q, h);
    store_acc_tile<T>(p.o, seq.tb, h, seq.q0 + i0, 0, seq.q_end(), p.head_dim, o, inv_l, [&](int mt, int hh, int row) {
        if (lane % 4 == 0) p.lse[lse_base + row] = lse[mt][hh];
    });
}

}  // namespace cupyflash
