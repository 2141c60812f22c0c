// Backward preprocess: D_i = rowsum(dO_i * O_i) in fp32, and zero the fp32 dQ accumulator (absent,
// null, when deterministic=True: the dQ pass writes dQ itself).
// One warp per query row; lanes stride over head_dim.
#include "ptx.cuh"
#include "params.cuh"

namespace cupyflash {

constexpr int ROWS_PER_BLOCK = 8;  // one warp each

template <typename T, bool PACKED>  // PACKED: varlen (Seq, params.cuh)
__global__ void __launch_bounds__(ROWS_PER_BLOCK * 32) flash_bwd_preprocess_kernel(const BwdParams p) {
    const RowwiseIndex r = RowwiseIndex::of<ROWS_PER_BLOCK, PACKED>(p);
    if (!r.valid) return;
    const T* o = row_ptr<T>(p.o, r.b, r.h, r.i);
    const T* dout = row_ptr<T>(p.dout, r.b, r.h, r.i);
    float acc = 0.f;
    for (int d = r.lane; d < p.head_dim; d += 32) acc += Elem<T>::to_float(dout[d]) * Elem<T>::to_float(o[d]);
    if (p.dq_accum != nullptr)
        for (int d = r.lane; d < p.head_dim; d += 32) p.dq_accum[r.row * p.head_dim + d] = 0.f;
    #pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
    if (r.lane == 0) p.dsum[r.row] = acc;
}

}  // namespace cupyflash
