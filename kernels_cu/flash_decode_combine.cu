// Split-KV's combine (flash-decoding): each query row's num_splits partial outputs and lses, written
// by flash_decode_kernel, merged into out and lse (merge.cuh; the sink counted here, once). One warp
// per row (batch, new token, head), its lanes over head_dim four columns at a time.
#include "merge.cuh"

namespace cupyflash {

constexpr int COMBINE_ROWS = 4;  // rows (warps) per block

template <typename T, bool SINKS>
__global__ void __launch_bounds__(COMBINE_ROWS * 32) flash_decode_combine_kernel(const DecodeParams p) {
    const FwdParams& f = p.fwd;
    const i64 split_rows = i64(f.batch) * f.seqlen_q * f.heads;
    const i64 row = i64(blockIdx.x) * COMBINE_ROWS + threadIdx.x / 32;  // (b, i, h), o_partial's order
    if (row >= split_rows) return;
    const int h = int(row % f.heads), i = int(row / f.heads % f.seqlen_q), b = int(row / f.heads / f.seqlen_q);
    const i64 lse_at = (i64(b) * f.heads + h) * f.seqlen_q + i;  // (B, H, Sq)
    const float* lse_s = p.lse_partial + lse_at;
    const MergedRow m = merge_row(p.num_splits, [&](int s) { return lse_s[s * split_rows]; },
                                  SINKS ? f.var.sinks[h] : -CUPYFLASH_INF);
    T* dst = row_ptr<T>(f.o, b, h, i);
    for (int col = (threadIdx.x % 32) * 4; col < f.head_dim; col += 128) {
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int s = 0; s < p.num_splits; ++s) {
            const float wt = m.weight(lse_s[s * split_rows]);
            const float4 x = *reinterpret_cast<const float4*>(p.o_partial + (s * split_rows + row) * f.head_dim + col);
            acc.x += wt * x.x; acc.y += wt * x.y; acc.z += wt * x.z; acc.w += wt * x.w;
        }
        *reinterpret_cast<uint2*>(dst + col) = make_uint2(Elem<T>::pack(acc.x, acc.y), Elem<T>::pack(acc.z, acc.w));
    }
    if (threadIdx.x % 32 == 0) f.lse[lse_at] = m.lse;
}

}  // namespace cupyflash
