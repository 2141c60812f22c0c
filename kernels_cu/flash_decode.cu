// Decode against a KV cache (flash-decoding), fp16/bf16 on tensor cores: a few new query tokens
// per sequence against its cached keys and values, at the memory-bandwidth limit.
// One block per (split of the keys, row tile, kv head, sequence): its rows are the kv head's group
// of query heads times the new tokens (Llama-3's 32:8 decode: 4 rows of a 16-row m-tile), so each
// K, V byte is read once per group. Key tiles stream through STAGES cp.async stages, read from the
// dense cache or through the page table; each warp owns a 16-key slice of every tile with its own
// online softmax, and the warps' partials are merged at the end (merge.cuh). With num_splits > 1
// the keys are split into chunks of whole tiles across blocks (filling the GPU at batch 1), each
// writing its normalised output and lse for flash_decode_combine.cu.
#include "traits.cuh"
#include "softmax.cuh"
#include "variant.cuh"
#include "merge.cuh"
#include "decode_loads.cuh"

namespace cupyflash {

// A block's place: split `split` of sequence seq's key tiles, and query rows [r0, r0 + ROWS) of kv
// head h_kv's group; row r is new token r / group of query head h_kv * group + r % group.
template <int VARIANT>
struct DecodeBlock {
    typename Policy<VARIANT>::Seq seq;
    int split, r0, h_kv, group, n_rows;
    template <int ROWS>
    __device__ __forceinline__ static DecodeBlock of(const DecodeParams& p) {
        const int row_tiles = gridDim.x / p.num_splits;
        const int group = p.fwd.var.group;
        return {typename Policy<VARIANT>::Seq(p.fwd, blockIdx.z), int(blockIdx.x) / row_tiles,
                int(blockIdx.x) % row_tiles * ROWS, int(blockIdx.y), group, group * p.fwd.seqlen_q};
    }
    __device__ __forceinline__ int head(int r) const { return h_kv * group + r % group; }
    __device__ __forceinline__ int token(int r) const { return r / group; }
};

// All threads copy the block's ROWS query rows into sQ (rows past n_rows and columns past head_dim: zeros).
template <typename Tr, typename Block>
__device__ __forceinline__ void load_decode_q(typename Tr::T* sQ, const DecodeParams& p, const Block& blk) {
    using T = typename Tr::T;
    constexpr int CHUNKS = Tr::HEAD_DIM / Tr::CHUNK;
    #pragma unroll 1  // once per block
    for (int c = threadIdx.x; c < Tr::ROWS * CHUNKS; c += Tr::NUM_THREADS) {
        const int r = c / CHUNKS, col = (c % CHUNKS) * Tr::CHUNK, row = blk.r0 + r;
        const bool valid = row < blk.n_rows && col < p.fwd.head_dim;
        const T* g = valid ? row_ptr<const T>(p.fwd.q, blk.seq.tb, blk.head(row), blk.token(row)) + col
                           : static_cast<const T*>(p.fwd.q.ptr);
        cp_async_16(sQ + r * Tr::STRIDE + col, g, valid);
    }
}

// The variant policy of each of a thread's accumulator rows (rows differ in query head: the ALiBi
// slope) and their new-token positions. Padding rows (past n_rows) take the last row's.
template <int VARIANT, int MT>
struct DecodeRows {
    Policy<VARIANT> pol[MT][2];
    int i[MT][2];
    template <typename Block>
    __device__ __forceinline__ DecodeRows(const DecodeParams& p, const Block& blk) {
        #pragma unroll
        for (int mt = 0; mt < MT; ++mt)
            #pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int r = min(blk.r0 + acc_row(mt, 2 * hh, threadIdx.x % 32), blk.n_rows - 1);
                pol[mt][hh] = Policy<VARIANT>(p.fwd.var, blk.seq, blk.head(r));
                i[mt][hh] = blk.token(r);
            }
    }
    // A warp's scores of keys from k0 (columns acc_col) become logits, -inf where not visible.
    template <int NT>
    __device__ __forceinline__ void to_logits(float (&s)[MT][NT][4], int k0) const {
        const int j0 = Policy<VARIANT>::frag_col0(k0);
        #pragma unroll
        for (int mt = 0; mt < MT; ++mt)
            #pragma unroll
            for (int nt = 0; nt < NT; ++nt)
                #pragma unroll
                for (int e = 0; e < 4; ++e)
                    s[mt][nt][e] = pol[mt][e / 2].masked_logit(s[mt][nt][e], i[mt][e / 2], j0 + nt * 8 + (e & 1));
    }
};

// The warps' partials (normalised O and lse of each row) merged through shared memory, and the block's
// rows written: out and lse (with the sink) when the keys are not split, else this split's O / l and
// lse for the combine kernel.
template <typename Tr, typename Block>
__device__ __forceinline__ void store_decode(float* sMerge, const DecodeParams& p, const Block& blk,
                                             const float (&o)[Tr::MT][Tr::DT][4], const float (&inv_l)[Tr::MT][2],
                                             const float (&lse)[Tr::MT][2], bool with_sink) {
    constexpr int ROWS = Tr::ROWS, OS = Tr::O_STRIDE;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float* sO = sMerge;                                    // [warp][row][O_STRIDE]
    float* sLse = sMerge + Tr::NUM_WARPS * ROWS * OS;      // [warp][row]
    #pragma unroll
    for (int mt = 0; mt < Tr::MT; ++mt)
        #pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int row = acc_row(mt, 2 * hh, lane);
            float* dst = sO + (warp * ROWS + row) * OS;
            #pragma unroll
            for (int dt = 0; dt < Tr::DT; ++dt)
                *reinterpret_cast<float2*>(dst + acc_col(dt, 0, lane)) =
                    make_float2(o[mt][dt][2 * hh] * inv_l[mt][hh], o[mt][dt][2 * hh + 1] * inv_l[mt][hh]);
            if (lane % 4 == 0) sLse[warp * ROWS + row] = lse[mt][hh];
        }
    __syncthreads();  // every warp's partial is in shared memory
    constexpr int QUADS = Tr::HEAD_DIM / 4;  // four columns per thread and step
    const FwdParams& f = p.fwd;
    for (int e = threadIdx.x; e < ROWS * QUADS; e += Tr::NUM_THREADS) {
        const int row = e / QUADS, col = (e % QUADS) * 4, r = blk.r0 + row;
        if (r >= blk.n_rows || col >= f.head_dim) continue;
        const int h = blk.head(r), i = blk.token(r);
        const float sink = with_sink ? f.var.sinks[h] : -CUPYFLASH_INF;
        const MergedRow m = merge_row(Tr::NUM_WARPS, [&](int w) { return sLse[w * ROWS + row]; }, sink);
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int w = 0; w < Tr::NUM_WARPS; ++w) {
            const float wt = m.weight(sLse[w * ROWS + row]);
            const float4 x = *reinterpret_cast<const float4*>(sO + (w * ROWS + row) * OS + col);
            acc.x += wt * x.x; acc.y += wt * x.y; acc.z += wt * x.z; acc.w += wt * x.w;
        }
        const i64 lse_at = (i64(blk.seq.tb) * f.heads + h) * f.seqlen_q + i;  // (B, H, Sq)
        if (p.num_splits == 1) {
            using T = typename Tr::T;
            T* dst = row_ptr<T>(f.o, blk.seq.tb, h, i) + col;
            *reinterpret_cast<uint2*>(dst) = make_uint2(Elem<T>::pack(acc.x, acc.y), Elem<T>::pack(acc.z, acc.w));
            if (col == 0) f.lse[lse_at] = m.lse;
        } else {
            const i64 split_rows = i64(f.batch) * f.seqlen_q * f.heads;
            const i64 o_row = blk.split * split_rows + (i64(blk.seq.tb) * f.seqlen_q + i) * f.heads + h;
            *reinterpret_cast<float4*>(p.o_partial + o_row * f.head_dim + col) = acc;
            if (col == 0) p.lse_partial[blk.split * split_rows + lse_at] = m.lse;
        }
    }
}

// The TMA tiles hold one block per SM (128-key stages): saying so lets ptxas use the registers
// (NVRTC 13.5 otherwise capped the 8-warp tile at 128 and spilled); the cp.async tiles keep ptxas's own choice.
template <typename T, int HEAD_DIM, int ROWS, int NUM_WARPS, int STAGES, int LOADS, int VARIANT, bool PAGED>
__global__ void __launch_bounds__(NUM_WARPS * 32, LOADS == LOAD_TMA ? 1 : 0)
flash_decode_kernel(const __grid_constant__ DecodeMaps maps) {  // in parameter space: the tensor maps stay there
    using Tr = DecodeTraits<T, HEAD_DIM, ROWS, NUM_WARPS, STAGES, LOADS>;
    constexpr int MT = Tr::MT, NT = Tr::NT, DT = Tr::DT, BLOCK_N = Tr::BLOCK_N;
    const DecodeParams& p = maps.dec;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    unsigned char* smem = smem_raw + (Tr::ALIGN - smem_u32(smem_raw) % Tr::ALIGN) % Tr::ALIGN;
    T* sQ = reinterpret_cast<T*>(smem + Tr::Q_OFFSET);
    const KvStages<Tr, PAGED> kv{smem + Tr::STAGES_OFFSET, reinterpret_cast<u64*>(smem + Tr::BARRIER_OFFSET)};
    const auto blk = DecodeBlock<VARIANT>::template of<ROWS>(p);
    const int warp_k0 = (threadIdx.x / 32) * Tr::KEYS_PER_WARP;  // this warp's keys within each tile

    // The key tiles some row of the block sees, and this split's chunk of them (whole tiles).
    const Policy<VARIANT> pol(p.fwd.var, blk.seq, blk.head(blk.r0));
    const int k_begin = pol.key_begin(blk.token(blk.r0));
    const int k_end = pol.key_end(blk.token(min(blk.r0 + ROWS, blk.n_rows) - 1));
    const int n_first = k_begin / BLOCK_N, n_all = k_end > k_begin ? (k_end + BLOCK_N - 1) / BLOCK_N : n_first;
    const int per_split = (n_all - n_first + p.num_splits - 1) / p.num_splits;
    const int n_lo = n_first + blk.split * per_split, n_hi = min(n_all, n_lo + per_split);

    const DecodeRows<VARIANT, MT> rows(p, blk);
    float o[MT][DT][4];
    zero(o);
    OnlineSoftmax<MT> softmax;
    softmax.init();  // the sink enters in the merge, once per row

    // Q (cp.async), then the first STAGES - 1 key tiles in flight.
    load_decode_q<Tr>(sQ, p, blk);
    cp_async_commit();
    if constexpr (Tr::TMA) {
        if (threadIdx.x == 0) {
            for (int s = 0; s < STAGES; ++s) mbarrier_init(kv.full + s, 1);
            fence_mbarrier_init();
        }
        __syncthreads();  // the barriers are initialised before any thread waits on them
    }
    #pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (n_lo + s < n_hi) kv.load(maps, blk.seq, blk.h_kv, n_lo + s, s);
        else kv.skip();
    }
    for (int n_block = n_lo; n_block < n_hi; ++n_block) {
        const int u = n_block - n_lo, n0 = n_block * BLOCK_N, stage = u % STAGES;
        if (Tr::TMA && u == 0) cp_async_wait<0>();  // Q (cp.async loads: waited with the first tile's group)
        kv.wait(u);
        __syncthreads();  // K_j, V_j (and Q) have landed, and every warp is done with the stage loaded next
        if (n_block + STAGES - 1 < n_hi) kv.load(maps, blk.seq, blk.h_kv, n_block + STAGES - 1, u + STAGES - 1);
        else kv.skip();
        kv.prepare(stage, warp_k0, n0, blk.seq.len_k);
        // S = Q K_j^T over this warp's keys
        float s[MT][NT][4];
        zero(s);
        warp_gemm<MT, NT, HEAD_DIM, false, false>(s, sQ, Tr::STRIDE, kv.k_operand(stage, warp_k0));
        // logits (softcap, ALiBi), -inf past the sequence's keys and outside each row's band
        rows.to_logits(s, n0 + warp_k0);
        // m, l, O rescaled; s becomes P~
        softmax.update(s, o, p.fwd.scale_log2);
        // O += P~ V_j over this warp's keys
        warp_gemm_rs<T, MT, NT, DT>(o, s, kv.v_operand(stage, warp_k0));
    }
    cp_async_wait<0>();
    __syncthreads();  // every copy has landed and every warp is done with the stages: they become the merge's scratch

    // this warp's O / l and lse, then the warps merged (the sink once, unless the splits' combine counts it)
    float inv_l[MT][2], lse[MT][2];
    softmax.finalize(inv_l, lse, p.fwd.scale_log2);
    store_decode<Tr>(reinterpret_cast<float*>(kv.base), p, blk, o, inv_l, lse, Policy<VARIANT>::SINKS && p.num_splits == 1);
}

}  // namespace cupyflash
