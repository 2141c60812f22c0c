// Backward preprocess: D_i = rowsum(dO_i * O_i) in fp32, and zero the fp32 dQ accumulator.
// One warp per query row; lanes stride over head_dim.
#include "ptx.cuh"
#include "params.cuh"

namespace cupyflash {

constexpr int ROWS_PER_BLOCK = 8;  // one warp each

template <typename T>
__global__ void __launch_bounds__(ROWS_PER_BLOCK * 32) flash_bwd_preprocess_kernel(const BwdParams p) {
    const int i = blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / 32, lane = threadIdx.x % 32;
    const int h = blockIdx.y, b = blockIdx.z;
    if (i >= p.seqlen_q) return;
    const T* o = row_ptr<T>(p.o, b, h, i);
    const T* dout = row_ptr<T>(p.dout, b, h, i);
    const i64 row = (i64(b) * p.heads + h) * p.seqlen_q + i;
    float* dq_accum_row = p.dq_accum + row * p.head_dim;
    float acc = 0.f;
    for (int d = lane; d < p.head_dim; d += 32) {
        acc += Elem<T>::to_float(dout[d]) * Elem<T>::to_float(o[d]);
        dq_accum_row[d] = 0.f;
    }
    #pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
    if (lane == 0) p.dsum[row] = acc;
}

}  // namespace cupyflash
