// Kernel arguments: one plain struct per pass, passed by value. Strides are in elements
// (the launcher converts CuPy's byte strides), so any (batch, seqlen, heads) strides work;
// the head_dim axis is contiguous (checked at the boundary).
#pragma once
#include "ptx.cuh"

namespace cupyflash {

// Where one (batch, seqlen, heads, head_dim) tensor lives.
struct TensorRef {
    void* ptr;
    i64 stride_b;  // elements between batches
    i64 stride_s;  // elements between sequence positions
    i64 stride_h;  // elements between heads
};

struct FwdParams {
    TensorRef q, k, v, o;      // q, o: (B, Sq, H, D); k, v: (B, Sk, H, D)
    float* lse;                 // (B, H, Sq), natural-log log-sum-exp of each scaled score row
    int batch, heads, seqlen_q, seqlen_k, head_dim;
    float scale_log2;           // softmax_scale * log2(e): scores are exponentiated with exp2
};

struct BwdParams {
    TensorRef q, k, v, o, dout;  // inputs, like FwdParams
    TensorRef dq, dk, dv;        // outputs, shaped like q, k, v
    const float* lse;            // (B, H, Sq) from the forward pass
    float* dsum;                 // (B, H, Sq) scratch: D_i = rowsum(dO_i * O_i)
    float* dq_accum;             // (B, H, Sq, head_dim) fp32 scratch for dQ, summed over key tiles
    int batch, heads, seqlen_q, seqlen_k, head_dim;
    float scale;                 // softmax_scale (applied to dK and dQ)
    float scale_log2;            // softmax_scale * log2(e)
};

// A TMA tensor map (the driver's CUtensorMap, 128 opaque bytes) of one (B, S, H, D) tensor,
// encoded on the host per call (cupyflash/_tma.py); the kernel reads it where it was passed, in
// the parameter space of a __grid_constant__ argument.
struct alignas(64) TmaDesc {
    unsigned char bytes[128];
};

// The Hopper forward's arguments: FwdParams and the tensor maps of Q (boxes of BLOCK_M rows),
// K and V (boxes of BLOCK_N rows), 64 head_dim columns per box.
struct FwdSm90Params {
    FwdParams fwd;
    TmaDesc q, k, v;
};

// The Hopper backward's arguments: BwdParams and the tensor maps of Q and dO (boxes of BLOCK_M
// rows), K and V (boxes of BLOCK_N rows).
struct BwdSm90Params {
    BwdParams bwd;
    TmaDesc q, k, v, dout;
};

// The launcher packs these structs in the layout of numpy structured dtypes (cupyflash/_launch.py);
// the sizes below are asserted on both sides so the layouts cannot drift apart.
static_assert(sizeof(TensorRef) == 32, "TensorRef layout is mirrored in _launch.py");
static_assert(sizeof(FwdParams) == 160, "FwdParams layout is mirrored in _launch.py");
static_assert(sizeof(BwdParams) == 312, "BwdParams layout is mirrored in _launch.py");
static_assert(alignof(TmaDesc) == 64 && sizeof(FwdSm90Params) == 576,  // q, k, v at 192, 320, 448
              "FwdSm90Params layout is mirrored in _launch.py");
static_assert(sizeof(BwdSm90Params) == 832, "BwdSm90Params layout is mirrored in _launch.py");  // maps from 320

// Pointer to row s of head (b, h) of a tensor.
template <typename T>
__device__ __forceinline__ T* row_ptr(const TensorRef& t, int b, int h, int s) {
    return static_cast<T*>(t.ptr) + b * t.stride_b + h * t.stride_h + i64(s) * t.stride_s;
}

// The key that query row i may see last (inclusive) under the bottom-right causal mask,
// or seqlen_k - 1 without a mask. Negative: the row sees no key.
template <bool IS_CAUSAL>
__device__ __forceinline__ int last_visible_key(int i, int seqlen_q, int seqlen_k) {
    return IS_CAUSAL ? min(seqlen_k - 1, i + seqlen_k - seqlen_q) : seqlen_k - 1;
}

// The query row of the row-wise backward kernels (one warp per row, ROWS warps per block,
// grid (rows / ROWS, heads, batch)): i, its (b, h), and its flat index in (B, H, Sq).
struct RowwiseIndex {
    int i, b, h, lane;
    i64 row;
    bool valid;
    template <int ROWS>
    __device__ static RowwiseIndex of(const BwdParams& p) {
        RowwiseIndex r;
        r.i = blockIdx.x * ROWS + threadIdx.x / 32;
        r.lane = threadIdx.x % 32;
        r.h = blockIdx.y;
        r.b = blockIdx.z;
        r.row = (i64(r.b) * p.heads + r.h) * p.seqlen_q + r.i;
        r.valid = r.i < p.seqlen_q;
        return r;
    }
};

}  // namespace cupyflash
