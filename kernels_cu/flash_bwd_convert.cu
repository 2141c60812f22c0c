// Backward epilogue: dQ = softmax_scale * dQ_accum, cast from fp32 to the input dtype and
// written with the caller's strides. One warp per query row.
#include "ptx.cuh"
#include "params.cuh"

namespace cupyflash {

constexpr int CONVERT_ROWS_PER_BLOCK = 8;  // one warp each

template <typename T>
__global__ void __launch_bounds__(CONVERT_ROWS_PER_BLOCK * 32) flash_bwd_convert_dq_kernel(const BwdParams p) {
    const int i = blockIdx.x * CONVERT_ROWS_PER_BLOCK + threadIdx.x / 32, lane = threadIdx.x % 32;
    const int h = blockIdx.y, b = blockIdx.z;
    if (i >= p.seqlen_q) return;
    const i64 row = (i64(b) * p.heads + h) * p.seqlen_q + i;
    const float* dq_accum_row = p.dq_accum + row * p.head_dim;
    T* dq = row_ptr<T>(p.dq, b, h, i);
    for (int d = lane; d < p.head_dim; d += 32) dq[d] = Elem<T>::from_float(dq_accum_row[d] * p.scale);
}

}  // namespace cupyflash
