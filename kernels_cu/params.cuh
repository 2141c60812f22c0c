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

// The user's aux arrays (mask_mod, bias_mod: UserTerms in variant.cuh): up to MAX_AUX C-contiguous
// arrays of up to AUX_AXES axes each (the extents of missing leading axes are 1), null where unused.
constexpr int MAX_AUX = 4, AUX_AXES = 4;
struct UserParams {
    const void* aux[MAX_AUX];
    int extent[MAX_AUX][AUX_AXES];
};

// The run-time values of the attention variants (variant.cuh; the compile-time switches are the
// kernels' VARIANT template parameter). Scores are in raw units s = q . k throughout the kernels,
// so the host expresses the softcap, the ALiBi slopes and the sinks in those units.
struct VariantParams {
    const float* alibi;            // slopes (B, H) or (H,), float32, contiguous; null without ALiBi
    const float* sinks;            // (H,) sink logits, float32; null without sinks
    float* dsinks;                 // (H,) their gradient (backward), float32; null without sinks
    i64 alibi_stride_b;            // elements between batches of slopes (0: one slope per head)
    u32 group_mul;                 // ceil(2^32 / group) mod 2^32 (0 for group 1): see kv_head (variant.cuh)
    int group;                     // heads / heads_kv: query head h reads kv head h / group
    int window_left, window_right; // query i sees keys i + o - left .. i + o + right (o = Sk - Sq);
                                   // an unbounded side arrives as seqlen_q + seqlen_k
    float softcap_in;              // softmax_scale / softcap: tanh's argument per raw score
    float softcap_out;             // softcap / softmax_scale: back to raw units
    float inv_scale;               // 1 / softmax_scale: slopes and sinks in raw units
    int new_k;                     // VARIANT_KVLEN: tokens appended by this call, counted after seqused_k
    const int* cu_seqlens_q;       // packed sequences (VARIANT_VARLEN): (B + 1,) row offsets of each
    const int* cu_seqlens_k;       // sequence's queries and keys; null for dense (B, S, H, D) tensors
    const int* seqused_k;          // (B,) VARIANT_KVLEN: a KV cache's tokens before this call's append;
                                   // sequence b uses min(max(seqused_k[b], 0) + new_k, seqlen_k) keys
    UserParams user;               // VARIANT_USER_MASK, VARIANT_USER_BIAS: the aux arrays the expressions read
    unsigned long long seed;       // VARIANT_DROPOUT: the Philox key (dropout.cuh)
    u32 drop_threshold;            // an entry is dropped when its word is below floor(p 2^32)
    float drop_scale;              // 1 / (1 - p): the kept entries' factor
};

struct FwdParams {
    TensorRef q, k, v, o;      // q, o: (B, Sq, H, D); k, v: (B, Sk, H_kv, D)
    float* lse;                 // (B, H, Sq), natural-log log-sum-exp of each scaled score row
                                // (packed: B = 1 in the tensors, Sq = total_q: flash-attn's (H, total_q))
    int batch, heads, seqlen_q, seqlen_k, head_dim;
    float scale_log2;           // softmax_scale * log2(e): scores are exponentiated with exp2
    VariantParams var;
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
    VariantParams var;
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

// The KV cache's append (kvcache_append.cu): the new tokens into the caches.
struct AppendParams {
    TensorRef k_new, v_new;       // (B, S_new, H_kv, D)
    TensorRef k_cache, v_cache;   // dense (B, S_max, H_kv, D), or paged (num_pages, page_size, H_kv, D)
    const int* cache_seqlens;     // (B,) tokens already in each sequence's cache
    const int* page_table;        // (B, pages per sequence), or null for a dense cache
    i64 page_table_stride;        // elements between sequences of the page table
    int new_tokens, capacity, page_size, num_pages, head_dim, pad_;
};

// Decode against a KV cache (flash_decode.cu, flash_decode_combine.cu): FwdParams over the cache
// (k, v: the caches; seqlen_k: the capacity; var.seqused_k, var.new_k: each sequence's keys), the
// page table of a paged cache, and the workspace of split-KV (num_splits > 1): each split's
// normalised output and lse, which the combine kernel merges (merge.cuh).
struct DecodeParams {
    FwdParams fwd;
    const int* page_table;   // (B, pages per sequence), or null for a dense cache
    float* o_partial;        // (num_splits, B, Sq, H, head_dim) fp32, each split's O / l
    float* lse_partial;      // (num_splits, B, H, Sq), each split's lse (natural log, without the sink)
    i64 page_table_stride;   // elements between sequences of the page table
    int page_shift;          // log2(page_size); k's and v's (batch) axis is the page, (seqlen) the row in it
    int num_pages;
    int num_splits;          // chunks of whole key tiles per sequence (1: the decode kernel writes out, lse)
    int pad_;
};

// The decode kernel's arguments: DecodeParams and, for its TMA loads (LOAD_TMA), the tensor maps of
// the K and V caches (boxes of the tile's keys, or of one page, by 64 head_dim columns); zeros with
// cp.async loads. The combine kernel reads the DecodeParams at its start from the same buffer.
struct DecodeMaps {
    DecodeParams dec;
    TmaDesc k, v;
};

// The launcher packs these structs in the layout of numpy structured dtypes (cupyflash/_launch.py);
// the sizes below are asserted on both sides so the layouts cannot drift apart.
static_assert(sizeof(TensorRef) == 32, "TensorRef layout is mirrored in _launch.py");
static_assert(sizeof(VariantParams) == 200, "VariantParams layout is mirrored in _launch.py");
static_assert(sizeof(FwdParams) == 360, "FwdParams layout is mirrored in _launch.py");
static_assert(sizeof(BwdParams) == 512, "BwdParams layout is mirrored in _launch.py");
static_assert(alignof(TmaDesc) == 64 && sizeof(FwdSm90Params) == 768,  // q, k, v at 384, 512, 640
              "FwdSm90Params layout is mirrored in _launch.py");
static_assert(sizeof(AppendParams) == 176, "AppendParams layout is mirrored in _launch.py");
static_assert(sizeof(BwdSm90Params) == 1024, "BwdSm90Params layout is mirrored in _launch.py");  // maps from 512
static_assert(sizeof(DecodeParams) == 408, "DecodeParams layout is mirrored in _launch.py");
static_assert(sizeof(DecodeMaps) == 704, "DecodeMaps layout is mirrored in _launch.py");  // maps at 448, 576

// Pointer to row s of head (b, h) of a tensor.
template <typename T>
__device__ __forceinline__ T* row_ptr(const TensorRef& t, int b, int h, int s) {
    return static_cast<T*>(t.ptr) + b * t.stride_b + h * t.stride_h + i64(s) * t.stride_s;
}

// How the sequences lie in the tensors (Seq's LAYOUT).
enum SeqLayout : int {
    SEQ_DENSE = 0,   // batch b of (B, S, H, D) tensors, rows from 0, lengths seqlen_q and seqlen_k
    SEQ_PACKED = 1,  // rows cu_seqlens[b] .. cu_seqlens[b + 1] of (1, total, H, D) tensors (flash-attn's
                     // varlen), whose seqlen_q and seqlen_k are the totals
    SEQ_KVLEN = 2,   // dense, but sequence b uses only its first seqused_k[b] keys (a KV cache)
};

// Where sequence b (the grid's z) lives in the tensors, by LAYOUT (SeqLayout).
// The variant policy takes a query's or key's position within its sequence (i, j); memory takes its
// row in the tensor (q0 + i, k0 + j). The row statistics (lse, D, dQ's accumulator) are indexed by
// (tensor batch, head, tensor row): packed, that is flash-attn's (H, total_q) layout.
template <int LAYOUT>
struct Seq {
    static constexpr bool PACKED = LAYOUT == SEQ_PACKED;
    static constexpr int ROWS_LAYOUT = LAYOUT;
    int b;             // the sequence: the grid's z, ALiBi's batch row
    int tb;            // its batch index in the tensors (0 when packed)
    int q0, k0;        // its first query and key rows in the tensors (0 unless packed)
    int len_q, len_k;  // its query and key counts
    template <typename Params>
    __device__ __forceinline__ Seq(const Params& p, int b_) : b(b_) {
        if constexpr (PACKED) {
            tb = 0;
            q0 = p.var.cu_seqlens_q[b];
            k0 = p.var.cu_seqlens_k[b];
            len_q = p.var.cu_seqlens_q[b + 1] - q0;
            len_k = p.var.cu_seqlens_k[b + 1] - k0;
        } else {
            tb = b;
            q0 = k0 = 0;
            len_q = p.seqlen_q;
            len_k = LAYOUT == SEQ_KVLEN ? min(max(p.var.seqused_k[b], 0) + p.var.new_k, p.seqlen_k) : p.seqlen_k;
        }
    }
    // Is a block's first query (key) past the sequence's end? Packed sequences are shorter than the
    // grid's longest, and a KV cache's prefix than the cache: such blocks exit at once. Dense grids
    // have no such block.
    __device__ __forceinline__ bool past_q(int i0) const { return PACKED && i0 >= len_q; }
    __device__ __forceinline__ bool past_k(int j0) const { return LAYOUT != SEQ_DENSE && j0 >= len_k; }
    // q0 read again from memory, an opaque load the compiler cannot hoist: for the kernels at the
    // register limit, where keeping it live beside the key loop's state made ptxas spill
    template <typename Params>
    __device__ __forceinline__ int q0_again(const Params& p) const {
        if constexpr (!PACKED) return 0;
        int v;
        asm volatile("ld.global.nc.s32 %0, [%1];\n" : "=r"(v) : "l"(p.var.cu_seqlens_q + b));
        return v;
    }
    __device__ __forceinline__ int q_end() const { return q0 + len_q; }  // one past its last query row
    __device__ __forceinline__ int k_end() const { return k0 + len_k; }  // one past its last key row
    // head h's first entry in a (tensor batch, heads, rows) statistics array; rows = the tensors' seqlen_q
    __device__ __forceinline__ i64 stat_base(int heads, int rows, int h) const { return (i64(tb) * heads + h) * rows; }
};

// The query row of the row-wise backward kernels (one warp per row, ROWS warps per block,
// grid (rows / ROWS, heads, sequences)): its row i in the tensors, its (tensor batch, h), and its
// flat index in the (tensor batch, H, seqlen_q) statistics.
struct RowwiseIndex {
    int i, b, h, lane;
    i64 row;
    bool valid;
    template <int ROWS, bool PACKED>
    __device__ static RowwiseIndex of(const BwdParams& p) {
        const Seq<PACKED ? SEQ_PACKED : SEQ_DENSE> seq(p, blockIdx.z);
        RowwiseIndex r;
        const int i = blockIdx.x * ROWS + threadIdx.x / 32;  // within the sequence
        r.lane = threadIdx.x % 32;
        r.h = blockIdx.y;
        r.b = seq.tb;
        r.i = seq.q0 + i;
        r.row = seq.stat_base(p.heads, p.seqlen_q, r.h) + r.i;
        r.valid = i < seq.len_q;
        return r;
    }
};

}  // namespace cupyflash
