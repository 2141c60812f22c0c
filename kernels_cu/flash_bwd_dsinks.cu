// Backward of the attention sinks (VARIANT_SINKS): dsinks_h = -sum over (b, i) of P_sink D_i,
// where P_sink = exp(sink_h - lse_i) is the share of row i's softmax that the sink took. The sink
// carries no value, so dP_sink = 0 and dS_sink = P_sink (0 - D_i). One block per query head sums
// its batch * seqlen_q rows in a fixed order: no atomics, reproducible, no zeroed output needed.
// Packed sequences (varlen) are one batch of total_q rows, every one of them in some sequence.
// Runs after the preprocess kernel has written D_i.
#include "ptx.cuh"
#include "params.cuh"

namespace cupyflash {

constexpr int DSINKS_THREADS = 256;

__global__ void __launch_bounds__(DSINKS_THREADS) flash_bwd_dsinks_kernel(const BwdParams p) {
    const int h = blockIdx.x;
    const float sink = p.var.sinks[h];
    const int batches = p.var.cu_seqlens_q != nullptr ? 1 : p.batch;  // of the tensors and the statistics
    const i64 rows = i64(batches) * p.seqlen_q;
    // this thread's share of the rows, in a fixed order
    float acc = 0.f;
    for (i64 r = threadIdx.x; r < rows; r += DSINKS_THREADS) {
        const i64 b = r / p.seqlen_q, i = r % p.seqlen_q;
        const i64 row = (b * p.heads + h) * p.seqlen_q + i;
        const float lse = p.lse[row];
        if (lse != -CUPYFLASH_INF) acc -= expf(sink - lse) * p.dsum[row];  // -inf: a row with no sink mass
    }
    // the block's sum: within each warp, then over the warps
    #pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
    __shared__ float warp_sums[DSINKS_THREADS / 32];
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = acc;
    __syncthreads();  // every warp's sum is in shared memory before warp 0 adds them
    if (threadIdx.x >= 32) return;
    acc = threadIdx.x < DSINKS_THREADS / 32 ? warp_sums[threadIdx.x] : 0.f;
    #pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
    if (threadIdx.x == 0) p.var.dsinks[h] = acc;
}

}  // namespace cupyflash
