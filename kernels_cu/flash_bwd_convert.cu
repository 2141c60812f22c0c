// Backward epilogue: dQ = softmax_scale * dQ_accum, cast from fp32 to the input dtype and
// written with the caller's strides. One warp per query row.
#include "ptx.cuh"
#include "params.cuh"

namespace cupyflash {

constexpr int CONVERT_ROWS_PER_BLOCK = 8;  // one warp each

template <typename T, bool PACKED>  // PACKED: varlen (Seq, params.cuh)
__global__ void __launch_bounds__(CONVERT_ROWS_PER_BLOCK * 32) flash_bwd_convert_dq_kernel(const BwdParams p) {
    const RowwiseIndex r = RowwiseIndex::of<CONVERT_ROWS_PER_BLOCK, PACKED>(p);
    if (!r.valid) return;
    const float* dq_accum_row = p.dq_accum + r.row * p.head_dim;
    T* dq = row_ptr<T>(p.dq, r.b, r.h, r.i);
    for (int d = r.lane; d < p.head_dim; d += 32) dq[d] = Elem<T>::from_float(dq_accum_row[d] * p.scale);
}

}  // namespace cupyflash
