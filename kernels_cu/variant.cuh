// The attention variants, written once for every kernel family (cupyflash/_variants.py is their
// Python spec): which keys a query sees (causal, sliding window: the tile bounds and the element
// mask), how a score becomes a logit (softcap, ALiBi) and the softcap's derivative, the sink logit
// that opens each row's softmax, and which kv head a query head reads (grouped-query attention).
//
// VARIANT, a template parameter of every kernel, is a bit set (VariantBits): the switches are
// compile-time, so a call compiles only the combination it uses and the dense kernels carry none
// of it. The values (window sides, softcap, slopes, sinks, the GQA group) are run-time, in
// VariantParams. Scores stay in raw units s = q . k (exponentiated as exp2(s * scale_log2)), so
// every transform is written in those units: the host divides softcap, slopes and sinks by
// softmax_scale (inv_scale, softcap_in/out).
//
// For query i and key j, with o = seqlen_k - seqlen_q (bottom-right alignment, as flash-attn):
//   visible:  j < seqlen_k, j <= i + o + right (causal: right = 0), j >= i + o - left (window);
//   logit:    s -> softcap * tanh(s / softcap), then s -> s - slope_h |i + o - j|;
//   softmax:  the denominator of row i also counts exp(sinks[h]);
//   user:     mask_mod(b, h, i, j) drops keys, bias_mod(b, h, i, j) adds to the scaled score (UserTerms).
#pragma once
#include "params.cuh"
#include "tile.cuh"
#include "user_terms.cuh"
#include "dropout.cuh"

namespace cupyflash {

enum VariantBits : int {
    MASK_NONE = 0, MASK_CAUSAL = 1, MASK_WINDOW = 2,  // which keys a query sees (bits 0-1)
    MASK_BITS = 3,
    VARIANT_SOFTCAP = 4,                             // softcap * tanh(s / softcap)
    VARIANT_ALIBI = 8,                               // - slope_h |i + o - j|
    VARIANT_SINKS = 16,                              // exp(sink_h) in each row's denominator
    VARIANT_VARLEN = 32,                             // packed sequences: cu_seqlens (Seq, params.cuh)
    VARIANT_KVLEN = 64,                              // each sequence's key count: seqused_k (a KV cache)
    VARIANT_USER_MASK = 128,                         // the user's mask_mod (UserTerms::keep)
    VARIANT_USER_BIAS = 256,                         // the user's bias_mod (UserTerms::bias)
    VARIANT_BLOCKS = 512,                            // a block mask: the forward walks only its kept tiles (KeyTiles)
    VARIANT_DROPOUT = 1024,                          // dropout on P, regenerated from the seed (dropout.cuh)
    VARIANT_ALL = 2047,
};

// tanh on the MUFU unit (relative error about 2^-11, below 16-bit rounding), or tanhf for the
// fp32 kernels, whose results are compared at fp32 precision.
template <bool FAST>
__device__ __forceinline__ float tanh_of(float x) {
    if constexpr (FAST) {
        float y;
        asm("tanh.approx.f32 %0, %1;\n" : "=f"(y) : "f"(x));
        return y;
    } else {
        return tanhf(x);
    }
}

// The kv head of query head h: h / group as a multiply-high by ceil(2^32 / group) (exact for h and
// group below 2^16, which the grid's limit on heads guarantees), not an integer division at each
// K, V tile load; group 1, whose multiplier is 2^32, arrives as 0.
__device__ __forceinline__ int kv_head(const VariantParams& v, int h) {
    return v.group_mul == 0 ? h : int(__umulhi(u32(h), v.group_mul));
}
// The kv head of the block's query head (blockIdx.y), read anew at each use (the ctaid read is
// opaque to the compiler): the mma.sync kernels at the register limit spilled when it stayed live
// beside h for the whole key loop.
__device__ __forceinline__ int block_kv_head(const VariantParams& v) {
    int h;
    asm volatile("mov.u32 %0, %%ctaid.y;\n" : "=r"(h));
    return kv_head(v, h);
}

// The query tiles a backward block walks: tiles [m_first, m_end) of each of the `group` query
// heads that read its kv head (grouped-query attention: their dK, dV sum in registers, no
// atomics), as one flat index it in [0, count).
struct QueryWalk {
    int h0, m_first, tiles, count;
    bool one_head;  // group 1 (no GQA): no division by tiles
    __device__ __forceinline__ QueryWalk(int h_kv, int group, int m_first_, int m_end)
        : h0(h_kv * group), m_first(m_first_), tiles(max(0, m_end - m_first_)), count(tiles * group),
          one_head(group == 1) {}
    __device__ __forceinline__ int head(int it) const { return one_head ? h0 : h0 + it / tiles; }
    __device__ __forceinline__ int m_block(int it) const { return m_first + (one_head ? it : it % tiles); }
    __device__ __forceinline__ static bool partial(int) { return true; }  // no block mask: every rule applies
};

// QueryWalk without the tiles a block mask skips (VARIANT_BLOCKS; Policy::list_query_tiles): the
// same interface, read from a list in shared memory.
struct ListedQueryWalk {
    static constexpr int PARTIAL_BIT = 1 << 30;  // the tile's block is partial: its element rule applies
    const int* list;
    int h0, count;
    __device__ __forceinline__ int head(int it) const { return h0 + ((list[it] & ~PARTIAL_BIT) >> 16); }
    __device__ __forceinline__ int m_block(int it) const { return list[it] & 0xffff; }
    __device__ __forceinline__ bool partial(int it) const { return (list[it] & PARTIAL_BIT) != 0; }
};

// The key tiles a forward block walks with a block mask (Policy::list_key_tiles): `masked` tiles
// from list[0] up, then `unmasked` tiles from list[cap - 1] down.
struct KeyTiles {
    static constexpr int PARTIAL_BIT = 1 << 14;  // the tile's block is partial: its element rule applies
    const short* list;
    int cap, masked, unmasked;
    __device__ __forceinline__ int count() const { return masked + unmasked; }
    __device__ __forceinline__ int entry(int it) const { return it < masked ? list[it] : list[cap - 1 - (it - masked)]; }
    __device__ __forceinline__ int at(int it) const { return entry(it) & (PARTIAL_BIT - 1); }
    __device__ __forceinline__ bool partial(int it) const { return (entry(it) & PARTIAL_BIT) != 0; }
};

// One (batch, query head)'s view of the variants. FAST_TANH: false in the fp32 kernels.
template <int VARIANT, bool FAST_TANH = true>
struct Policy {
    static_assert((VARIANT & ~VARIANT_ALL) == 0 && (VARIANT & MASK_BITS) != MASK_BITS, "unknown variant bits");
    static constexpr int MASK = VARIANT & MASK_BITS;
    static constexpr bool LEFT = MASK == MASK_WINDOW;   // a left (oldest-key) bound exists
    static constexpr bool RIGHT = MASK != MASK_NONE;    // a right bound exists (causal: 0)
    static constexpr bool SOFTCAP = (VARIANT & VARIANT_SOFTCAP) != 0;
    static constexpr bool ALIBI = (VARIANT & VARIANT_ALIBI) != 0;
    static constexpr bool SINKS = (VARIANT & VARIANT_SINKS) != 0;
    static constexpr bool USER_MASK = (VARIANT & VARIANT_USER_MASK) != 0;
    static constexpr bool USER_BIAS = (VARIANT & VARIANT_USER_BIAS) != 0;
    static constexpr bool USER = USER_MASK || USER_BIAS;
    static constexpr bool TRANSFORMS = SOFTCAP || ALIBI || USER;  // logits differ from scores on every tile
    static constexpr bool BLOCKS = (VARIANT & VARIANT_BLOCKS) != 0;
    static constexpr bool DROPOUT = (VARIANT & VARIANT_DROPOUT) != 0;
    static_assert(!BLOCKS || (VARIANT & (VARIANT_VARLEN | VARIANT_KVLEN)) == 0,
                  "a block mask of dense (B, S, H, D) tensors");
    static constexpr bool PACKED = (VARIANT & VARIANT_VARLEN) != 0;
    static_assert(!(PACKED && (VARIANT & VARIANT_KVLEN)), "packed sequences carry their key counts in cu_seqlens_k");
    // where a sequence's rows live
    using Seq = cupyflash::Seq<PACKED ? SEQ_PACKED : (VARIANT & VARIANT_KVLEN) ? SEQ_KVLEN : SEQ_DENSE>;

    // Copies of the values this variant reads (the compiler drops those it never reads; a
    // reference to the kernel's parameter struct would make it copy the struct to local memory).
    int seqlen_q, seqlen_k;
    int window_left, window_right;
    float softcap_in, softcap_out;
    float slope;       // this (batch, head)'s ALiBi slope in raw units (0 without ALiBi)
    float slope_log2;  // the same in log2 units, slope * log2(e) (the backward's exponent)
    int b, h;          // the sequence and query head (the user's expressions read them)
    float inv_scale;   // 1 / softmax_scale: bias_mod's term in raw units
    UserParams user;   // the user's aux arrays
    unsigned long long seed;  // dropout's Philox key
    u32 drop_threshold;       // dropped below this word
    float drop_scale;         // 1 / (1 - p)
    bool block_rule = true;  // a listed tile's block is partial: its block mask's element rule applies

    Policy() = default;  // an array of per-row policies (the decode kernel's rows differ in head)
    // sequence `seq`'s query head h (positions i, j within the sequence)
    __device__ __forceinline__ Policy(const VariantParams& v, const Seq& seq, int h_)
        : seqlen_q(seq.len_q), seqlen_k(seq.len_k), window_left(v.window_left), window_right(v.window_right),
          softcap_in(v.softcap_in), softcap_out(v.softcap_out),
          slope(ALIBI ? v.alibi[i64(seq.b) * v.alibi_stride_b + h_] * v.inv_scale : 0.f),
          slope_log2(ALIBI ? v.alibi[i64(seq.b) * v.alibi_stride_b + h_] * LOG2E : 0.f), b(seq.b), h(h_),
          inv_scale(v.inv_scale), user(v.user), seed(v.seed), drop_threshold(v.drop_threshold),
          drop_scale(v.drop_scale) {}

    // ---- which keys: tile bounds ----
    __device__ __forceinline__ int diag(int i) const { return i + seqlen_k - seqlen_q; }  // query i's diagonal key
    __device__ __forceinline__ int right() const { return MASK == MASK_CAUSAL ? 0 : window_right; }
    // [key_begin(i0), key_end(i_last)): the keys some query in [i0, i_last] sees (empty when end <= begin)
    __device__ __forceinline__ int key_begin(int i0) const { return LEFT ? max(0, diag(i0) - window_left) : 0; }
    __device__ __forceinline__ int key_end(int i_last) const {
        return RIGHT ? min(seqlen_k, diag(i_last) + right() + 1) : seqlen_k;
    }
    // [query_begin(j0), query_end(j_last)): the queries that see some key in [j0, j_last]
    __device__ __forceinline__ int query_begin(int j0) const {
        return RIGHT ? max(0, j0 - (seqlen_k - seqlen_q) - right()) : 0;
    }
    __device__ __forceinline__ int query_end(int j_last) const {
        return LEFT ? min(seqlen_q, j_last - (seqlen_k - seqlen_q) + window_left + 1) : seqlen_q;
    }
    // Key tiles [first, end) of BLOCK_N keys that query tile [m0, m0 + BLOCK_M) walks.
    template <int BLOCK_M, int BLOCK_N>
    __device__ __forceinline__ void key_tiles(int m0, int& first, int& end) const {
        const int k0 = key_begin(m0), k1 = key_end(min(m0 + BLOCK_M, seqlen_q) - 1);
        first = k0 / BLOCK_N;
        end = k1 > k0 ? (k1 + BLOCK_N - 1) / BLOCK_N : first;
    }
    // Query tiles [first, end) of BLOCK_M rows that see key tile [n0, n0 + BLOCK_N).
    template <int BLOCK_M, int BLOCK_N>
    __device__ __forceinline__ void query_tiles(int n0, int& first, int& end) const {
        const int q0 = query_begin(n0), q1 = query_end(min(n0 + BLOCK_N, seqlen_k) - 1);
        first = q0 / BLOCK_M;
        end = q1 > q0 ? (q1 + BLOCK_M - 1) / BLOCK_M : first;
    }
    // Does the tile of queries [m0, m0 + BLOCK_M) x keys [n0, n0 + BLOCK_N) need the element mask?
    template <int BLOCK_M, int BLOCK_N>
    __device__ __forceinline__ bool tile_needs_mask(int m0, int n0) const {
        return n0 + BLOCK_N > seqlen_k || (RIGHT && n0 + BLOCK_N - 1 - diag(m0) > right()) ||
               (LEFT && n0 - diag(m0 + BLOCK_M - 1) < -window_left);
    }
    // The tiles of [first, end) that need no mask, [u_first, u_end): those that do are a prefix
    // (the window's left edge) and a suffix (the diagonal, the right edge, the end of the keys).
    template <int BLOCK_M, int BLOCK_N>
    __device__ __forceinline__ void unmasked_tiles(int m0, int first, int end, int& u_first, int& u_end) const {
        u_end = end;
        while (u_end > first && tile_needs_mask<BLOCK_M, BLOCK_N>(m0, (u_end - 1) * BLOCK_N)) --u_end;
        u_first = first;
        while (u_first < u_end && tile_needs_mask<BLOCK_M, BLOCK_N>(m0, u_first * BLOCK_N)) ++u_first;
    }

    // ---- which keys: a block mask's tiles (VARIANT_BLOCKS) ----
    // This policy on a listed tile: the block mask's element rule only where its block is partial
    // (full blocks keep every key; without a block mask, a no-op).
    __device__ __forceinline__ Policy on_tile(bool partial) const {
        Policy t = *this;
        if constexpr (BLOCKS) t.block_rule = partial;
        return t;
    }
    // The key tiles of [first, end) whose block (CUPYFLASH_BLOCK_ROWS x _COLS, which BLOCK_M x
    // BLOCK_N divide) the block mask keeps, listed in `list` (room for `cap` tiles): those that need
    // the bounds' mask (tile_needs_mask) or the block mask's element rule (partial blocks) from the
    // front, the others (full blocks, no mask at all: to_logits<false, false>) from the back, each
    // run in ascending order (the same order every run: the same sums). Every warp computes the list
    // and writes the same entries, so every thread holds the counts; the caller syncs before reading.
    template <int BLOCK_M, int BLOCK_N>
    __device__ __forceinline__ KeyTiles list_key_tiles(short* list, int cap, int m0, int first, int end) const {
        KeyTiles t{list, cap, 0, 0};
#ifdef CUPYFLASH_BLOCK_SLOT
        static_assert(CUPYFLASH_BLOCK_ROWS % BLOCK_M == 0 && CUPYFLASH_BLOCK_COLS % BLOCK_N == 0,
                      "each tile lies in one block");
        const int lane = threadIdx.x % 32;
        const int* e = user.extent[CUPYFLASH_BLOCK_SLOT];  // (batch or 1, heads or 1, query blocks, key blocks)
        const signed char* row = static_cast<const signed char*>(user.aux[CUPYFLASH_BLOCK_SLOT]) +
            ((i64(e[0] > 1 ? b : 0) * e[1] + (e[1] > 1 ? h : 0)) * e[2] + m0 / CUPYFLASH_BLOCK_ROWS) * e[3];
        constexpr int READS = 4;  // kinds read per lane before the ballots: one memory latency per 128 tiles
        for (int n00 = first; n00 < end; n00 += 32 * READS) {
            int kinds[READS];
            #pragma unroll
            for (int r = 0; r < READS; ++r) {
                const int n = n00 + 32 * r + lane;
                kinds[r] = n < end ? row[n * BLOCK_N / CUPYFLASH_BLOCK_COLS] : 0;  // SKIP 0, PARTIAL 1, FULL 2
            }
            #pragma unroll
            for (int r = 0; r < READS; ++r) {
                const int n = n00 + 32 * r + lane, kind = kinds[r];
                const bool kept = kind != 0;
                const bool masked = kept && ((UserTerms::HAS_BLOCK_KEEP && kind == 1) ||
                                             tile_needs_mask<BLOCK_M, BLOCK_N>(m0, n * BLOCK_N));
                const unsigned m = __ballot_sync(~0u, masked), u = __ballot_sync(~0u, kept && !masked);
                const unsigned below = (1u << lane) - 1;
                const short entry = short(n | (kind == 1 ? KeyTiles::PARTIAL_BIT : 0));
                if (masked) list[t.masked + __popc(m & below)] = entry;
                if (kept && !masked) list[cap - 1 - t.unmasked - __popc(u & below)] = entry;
                t.masked += __popc(m);
                t.unmasked += __popc(u);
            }
        }
#endif
        return t;
    }

    // The backward's walk of key tile [n0, n0 + BLOCK_N) (a kv head's QueryWalk over its group's
    // query heads) without the query tiles whose block the block mask skips, listed in `list` as
    // (head - walk.h0) << 16 | query tile, in the walk's order; every warp writes the same entries.
    // The caller syncs before reading. This Policy is of the group's first query head.
    template <int BLOCK_M, int BLOCK_N>
    __device__ __forceinline__ ListedQueryWalk list_query_tiles(int* list, const QueryWalk& walk, int n0) const {
        ListedQueryWalk w{list, walk.h0, 0};
#ifdef CUPYFLASH_BLOCK_SLOT
        static_assert(CUPYFLASH_BLOCK_ROWS % BLOCK_M == 0 && CUPYFLASH_BLOCK_COLS % BLOCK_N == 0,
                      "each tile lies in one block");
        const int lane = threadIdx.x % 32;
        const int* e = user.extent[CUPYFLASH_BLOCK_SLOT];  // (batch or 1, heads or 1, query blocks, key blocks)
        const signed char* kinds = static_cast<const signed char*>(user.aux[CUPYFLASH_BLOCK_SLOT]) +
                                   i64(e[0] > 1 ? b : 0) * e[1] * e[2] * e[3] + n0 / CUPYFLASH_BLOCK_COLS;
        for (int it0 = 0; it0 < walk.count; it0 += 32) {
            const int it = it0 + lane;
            int entry = 0;
            bool kept = false;
            if (it < walk.count) {
                const int hq = walk.head(it), m = walk.m_block(it);
                const int kind = kinds[(i64(e[1] > 1 ? hq : 0) * e[2] + m * BLOCK_M / CUPYFLASH_BLOCK_ROWS) * e[3]];
                entry = (hq - walk.h0) << 16 | m | (kind == 1 ? ListedQueryWalk::PARTIAL_BIT : 0);
                kept = kind != 0;
            }
            const unsigned k = __ballot_sync(~0u, kept);
            if (kept) list[w.count + __popc(k & ((1u << lane) - 1))] = entry;
            w.count += __popc(k);
        }
#endif
        return w;
    }

    // ---- which keys: the element mask ----
    // By key j and its offset d = j - diag(i) from query i's diagonal: the kernels compute d as one
    // per-thread base plus compile-time fragment offsets (fewer live registers than i and j).
    __device__ __forceinline__ bool visible_at(int j, int d) const {
        return j < seqlen_k && (!RIGHT || d <= right()) && (!LEFT || d >= -window_left);
    }
    __device__ __forceinline__ bool visible(int i, int j) const { return visible_at(j, j - diag(i)); }
    // A backward tile's row of key j, its columns queries i: with d0 = j - diag(i) at column 0 (d falls
    // by one per column), the visible columns are [d0 - right, d0 + left], and none if j >= seqlen_k.
    struct KeyRow {
        bool key_ok;
        int lo, hi;
    };
    __device__ __forceinline__ KeyRow key_row(int j, int d0) const {
        return {j < seqlen_k, d0 - right(), d0 + window_left};
    }
    __device__ __forceinline__ bool visible_col(const KeyRow& row, int col) const {
        return row.key_ok && (!RIGHT || col >= row.lo) && (!LEFT || col <= row.hi);
    }

    // ---- the score transform ----
    // The softcap alone, in raw units, and d logit / d s in `grad` (1 without softcap).
    __device__ __forceinline__ float capped(float s, float& grad) const {
        if constexpr (SOFTCAP) {
            const float t = tanh_of<FAST_TANH>(s * softcap_in);
            grad = 1.f - t * t;
            return softcap_out * t;
        } else {
            grad = 1.f;
            return s;
        }
    }
    // The logit of raw score s at offset d = j - diag(i), in raw units. ALiBi takes the offset as a
    // float, fd (the fragment kernels pass a per-thread float base plus a constant: one FADD and
    // one FFMA with |fd| per element, no integer work).
    __device__ __forceinline__ float logit_at(float s, float fd) const {
        float grad;  // not needed here: the compiler drops it
        s = capped(s, grad);
        if constexpr (ALIBI) s = fmaf(-slope, fabsf(fd), s);
        return s;
    }
    // Does user_at do any work? RULE: the tile may be a partial block, so the block mask's own
    // element rule may apply (false on the tiles a list shows full: only mask_mod and bias_mod).
    template <bool RULE = true>
    __device__ __forceinline__ static constexpr bool user_work() {
        return (USER_MASK && (UserTerms::HAS_KEEP || (RULE && UserTerms::HAS_BLOCK_KEEP))) ||
               (USER_BIAS && UserTerms::HAS_BIAS);
    }
    // The user's terms at key j and offset d = j - diag(i): logit x (raw units) gains bias_mod's term;
    // false where mask_mod drops the key. Only inside the sequence (rows and keys past its end are
    // the kernels' padding, which the other masks and the stores already discard); an aux index out
    // of bounds or a division by zero makes the logit NaN and keeps it, so the row shows it.
    // EAGER: branch-free, the terms evaluated everywhere (aux_read is safe at any index) and the
    // results selected, so a tile's aux reads issue together (no branch per score); otherwise each
    // behind its tests (fewer live values: AuxReader, user_terms.cuh).
    template <bool RULE = true, bool EAGER = true>
    __device__ __forceinline__ bool user_at(float& x, int j, int d) const {
        return user_ij<RULE, EAGER>(x, j - d - (seqlen_k - seqlen_q), j);
    }
    // The same by query i and key j.
    template <bool RULE = true, bool EAGER = true>
    __device__ __forceinline__ bool user_ij(float& x, int i, int j) const {
        if constexpr (!user_work<RULE>()) {
            return true;
        } else if constexpr (!EAGER) {  // each term behind its tests: nothing evaluated on padding
            if (i < 0 || i >= seqlen_q || j >= seqlen_k) return true;
            bool bad = false;
            const bool keep = !USER_MASK || ((!UserTerms::HAS_KEEP || UserTerms::keep<false>(user, b, h, i, j, bad)) &&
                                             (!RULE || !block_rule || UserTerms::block_keep<false>(user, b, h, i, j, bad)));
            if constexpr (USER_BIAS) x = fmaf(UserTerms::bias<false>(user, b, h, i, j, bad), inv_scale, x);
            if (bad) x = __int_as_float(0x7fc00000);  // NaN
            return keep || bad;
        } else {
            return with_term(x, user_term<RULE>(i, j));
        }
    }
    // The user's terms of query i and key j evaluated eagerly, before the score exists: bias_mod's
    // term (bias_mod's units), whether the score is kept (mask_mod keeps the key, an index was bad,
    // or padding), whether an index was bad, and whether (i, j) is padding (rows and keys past the
    // sequence), whose score stays as it is.
    struct UserTerm {
        float bias;
        bool keep, bad, padding;
    };
    template <bool RULE = true>
    __device__ __forceinline__ UserTerm user_term(int i, int j) const {
        const bool padding = i < 0 || i >= seqlen_q || j >= seqlen_k;
        bool bad = false, keep = true;
        if constexpr (USER_MASK && UserTerms::HAS_KEEP) keep = UserTerms::keep<true>(user, b, h, i, j, bad);
        if constexpr (USER_MASK && RULE && UserTerms::HAS_BLOCK_KEEP) {  // counted on partial blocks only
            bool bad_rule = false;
            keep = keep & (UserTerms::block_keep<true>(user, b, h, i, j, bad_rule) | !block_rule);
            bad = bad | (bad_rule & block_rule);
        }
        float bias = 0.f;
        if constexpr (USER_BIAS && UserTerms::HAS_BIAS) bias = UserTerms::bias<true>(user, b, h, i, j, bad);
        bad = bad & !padding;
        return {bias, padding | keep | bad, bad, padding};
    }
    // Logit x (raw units) with a term: plus the bias, NaN where an index was bad; false where the key is dropped.
    __device__ __forceinline__ bool with_term(float& x, const UserTerm& t) const {
        float y = x;
        if constexpr (USER_BIAS && UserTerms::HAS_BIAS) y = fmaf(t.bias, inv_scale, x);
        x = t.padding ? x : t.bad ? __int_as_float(0x7fc00000) : y;  // NaN
        return t.keep;
    }
    // A warp's accumulator tile of user terms, in to_logits's element order (rows q0 + acc_row, keys
    // k0 + acc_col; element (mt, nt, r) is bit nt * 4 + r of word [mt][.]): the keep and bad bits packed,
    // bias_mod's terms as floats. The Hopper forward evaluates it while S = Q K^T is still on the
    // tensor cores, so the aux reads' latency hides under the product, not after its wait.
    template <int MT, int NT, bool RULE>
    struct UserTile {
        static constexpr bool WORK = user_work<RULE>();
        static constexpr bool BIAS = WORK && USER_BIAS && UserTerms::HAS_BIAS;
        static constexpr int WORDS = WORK ? (NT * 4 + 31) / 32 : 1;
        u32 keep[MT][WORDS], bad[MT][WORDS];
        float bias[BIAS ? MT : 1][BIAS ? NT : 1][4];
        __device__ __forceinline__ void set(int mt, int nt, int r, const UserTerm& t) {  // padding: a zero term
            const int e = nt * 4 + r;
            if (e % 32 == 0) keep[mt][e / 32] = bad[mt][e / 32] = 0u;
            keep[mt][e / 32] |= u32(t.keep) << (e % 32);
            bad[mt][e / 32] |= u32(t.bad) << (e % 32);
            if constexpr (BIAS) bias[mt][nt][r] = t.padding ? 0.f : t.bias;
        }
        __device__ __forceinline__ UserTerm at(int mt, int nt, int r) const {
            if constexpr (!WORK) return {0.f, true, false, true};  // nothing evaluated: the score as it is
            const int e = nt * 4 + r;
            return {BIAS ? bias[BIAS ? mt : 0][BIAS ? nt : 0][r] : 0.f, ((keep[mt][e / 32] >> (e % 32)) & 1u) != 0,
                    ((bad[mt][e / 32] >> (e % 32)) & 1u) != 0, false};
        }
    };
    // The tile's rows start at row0, its columns at col0: queries and keys, or KEYS_ROWS (the
    // backward's S^T) keys and queries.
    template <bool RULE = true, int MT, int NT, bool KEYS_ROWS = false>
    __device__ __forceinline__ UserTile<MT, NT, RULE> user_tile(int row0, int col0) const {
        UserTile<MT, NT, RULE> t;
        if constexpr (UserTile<MT, NT, RULE>::WORK) {
            const int r0 = frag_row0(row0), c0 = frag_col0(col0);
            #pragma unroll
            for (int mt = 0; mt < MT; ++mt)
                #pragma unroll
                for (int nt = 0; nt < NT; ++nt)
                    #pragma unroll
                    for (int r = 0; r < 4; ++r) {
                        const int row = r0 + acc_row(mt, r, 0), col = c0 + acc_col(nt, r, 0);
                        t.set(mt, nt, r, KEYS_ROWS ? user_term<RULE>(col, row) : user_term<RULE>(row, col));
                    }
        }
        return t;
    }
    // The logit of query i and key j with the user's terms, -inf where mask_mod drops the key (the
    // caller applies the other masks).
    __device__ __forceinline__ float logit(float s, int i, int j) const {
        const int d = j - diag(i);
        float x = logit_at(s, float(d));
        return user_at(x, j, d) ? x : -CUPYFLASH_INF;
    }
    // The logit of query i and key j, or -inf where the key is not visible (element by element: the
    // decode kernel, whose rows are not consecutive queries of one head).
    __device__ __forceinline__ float masked_logit(float s, int i, int j) const {
        const int d = j - diag(i);
        float x = logit_at(s, float(d));
        return visible_at(j, d) && user_at(x, j, d) ? x : -CUPYFLASH_INF;
    }

    // Offsets of mma accumulator fragments: element (mt, nt, r) of a tile whose rows start at
    // row0 and columns at col0 has row row0 + acc_row(mt, r) and column col0 + acc_col(nt, r);
    // frag_row0 / frag_col0 are the per-thread part, the rest are compile-time constants.
    __device__ __forceinline__ static int frag_row0(int row0) { return row0 + acc_row(0, 0, threadIdx.x % 32); }
    __device__ __forceinline__ static int frag_col0(int col0) { return col0 + acc_col(0, 0, threadIdx.x % 32); }

    // Forward: a warp's accumulator tile of scores (rows: queries q0 + acc_row, columns: keys
    // k0 + acc_col) becomes logits, -inf where MASKED says this tile needs the mask and a key is
    // not visible (exp2 turns those into exactly 0).
    // RULE false: the tile is a full block of a block mask's list (its element rule is not evaluated).
    // The user's terms taken from `terms` (user_tile<RULE>(q0, k0)), where the caller evaluated them
    // AHEAD, or evaluated here per element (the first overload: AHEAD false, `terms` unused; the
    // mma.sync kernels at 255 registers spilled with a whole tile's bias terms live at once).
    template <bool MASKED, bool RULE = true, int MT, int NT>
    __device__ __forceinline__ void to_logits(float (&s)[MT][NT][4], int q0, int k0) const {
        to_logits<MASKED, RULE, false>(s, q0, k0, UserTile<MT, NT, RULE>{});
    }
    template <bool MASKED, bool RULE = true, bool AHEAD = true, int MT, int NT>
    __device__ __forceinline__ void to_logits(float (&s)[MT][NT][4], int q0, int k0,
                                              const UserTile<MT, NT, RULE>& terms) const {
        if constexpr (!MASKED && !SOFTCAP && !ALIBI && !user_work<RULE>()) return;
        const int j0 = frag_col0(k0), d0 = j0 - diag(frag_row0(q0));  // element (0, 0, 0)
        const float fd0 = float(d0);
        #pragma unroll
        for (int mt = 0; mt < MT; ++mt)
            #pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                // This row's visible keys as column offsets c = nt * 8 + (r & 1) from j0: c <= hi
                // (the end of the keys, the causal/right edge) and c >= lo (the window's left edge),
                // one compare each per element (at 255 registers the mma.sync forward spilled with
                // the key and offset tested apart).
                const int dr = d0 - mt * 16 - hh * 8;  // the offset of this row's column 0
                const int hi = RIGHT ? min(seqlen_k - 1 - j0, right() - dr) : seqlen_k - 1 - j0;
                const int lo = -window_left - dr;
                const int i = j0 - dr - (seqlen_k - seqlen_q);  // this row's query
                #pragma unroll
                for (int nt = 0; nt < NT; ++nt)
                    #pragma unroll
                    for (int c = 0; c < 2; ++c) {
                        const int col = nt * 8 + c;
                        float& x = s[mt][nt][2 * hh + c];
                        float logit = logit_at(x, ALIBI ? fd0 + float(col - mt * 16 - hh * 8) : 0.f);
                        const bool keep = !user_work<RULE>() || (AHEAD ? with_term(logit, terms.at(mt, nt, 2 * hh + c))
                                                                        : user_ij<RULE>(logit, i, j0 + col));
                        x = ((MASKED && (col > hi || (LEFT && col < lo))) || !keep) ? -CUPYFLASH_INF : logit;
                    }
            }
    }
    // to_logits<true> on the tiles that need the mask, to_logits<false> on the rest (a run-time test).
    template <int BLOCK_M, int BLOCK_N, int MT, int NT>
    __device__ __forceinline__ void to_logits_tested(float (&s)[MT][NT][4], int m0, int q0, int k0) const {
        if (tile_needs_mask<BLOCK_M, BLOCK_N>(m0, k0)) to_logits<true>(s, q0, k0);
        else to_logits<false>(s, q0, k0);
    }

    // ---- dropout (the forward's P V operand; the backward's dV operand and dP) ----
    // The factor on P_ij, query i, key j (positions): 1 / (1 - p) where kept, 0 where dropped.
    __device__ __forceinline__ float dropout_at(int i, int j) const {
        const Philox4 r = dropout_words(seed, b, h, i, j);
        const int k = j & 3;  // selected, not indexed: an indexed word would put r on the stack
        const u32 w = k == 0 ? r.w[0] : k == 1 ? r.w[1] : k == 2 ? r.w[2] : r.w[3];
        return w >= drop_threshold ? drop_scale : 0.f;
    }
    // The forward's P~ fragments (rows q0 + acc_row, keys k0 + acc_col) dropped and scaled, after the
    // row sums took them whole (lse is the undropped softmax's). A thread's two adjacent keys j, j + 1
    // (j even) share one generator call.
    template <int MT, int NT>
    __device__ __forceinline__ void drop(float (&pt)[MT][NT][4], int q0, int k0) const {
        if constexpr (DROPOUT) {
            const int i0 = frag_row0(q0), j0 = frag_col0(k0);
            #pragma unroll
            for (int mt = 0; mt < MT; ++mt)
                #pragma unroll
                for (int hh = 0; hh < 2; ++hh)
                    #pragma unroll
                    for (int nt = 0; nt < NT; ++nt) {
                        const int j = j0 + nt * 8;
                        const Philox4 r = dropout_words(seed, b, h, i0 + mt * 16 + hh * 8, j);
                        const bool upper = (j & 3) != 0;  // keys 4k + 2, 4k + 3: words 2, 3
                        pt[mt][nt][2 * hh] *= (upper ? r.w[2] : r.w[0]) >= drop_threshold ? drop_scale : 0.f;
                        pt[mt][nt][2 * hh + 1] *= (upper ? r.w[3] : r.w[1]) >= drop_threshold ? drop_scale : 0.f;
                    }
        }
    }
    // The backward at query i, key j: P (already computed) becomes dV's operand P Z, and dP becomes
    // Z dP, so that dS = P (Z dP - D). A no-op without dropout.
    __device__ __forceinline__ void drop_backward(float& p, float& dp, int i, int j) const {
        if constexpr (DROPOUT) {
            const float z = dropout_at(i, j);
            p *= z;
            dp *= z;
        }
    }

    // ---- the sink ----
    // The running maximum a row starts from (raw units): its sink logit, or -inf without one.
    __device__ __forceinline__ static float row_max_start(const VariantParams& v, int h) {
        return SINKS ? v.sinks[h] * v.inv_scale : -CUPYFLASH_INF;
    }
    // The running row sum a row starts from, for the `part`-th of the threads that share the row:
    // exp2(sink - max) = 1 once, in part 0.
    __device__ __forceinline__ float row_sum_start(int part) const { return (SINKS && part == 0) ? 1.f : 0.f; }

    // ---- backward ----
    // P_ij = exp2(logit * scale_log2 - lse_i log2(e)) (0 where not visible; with MASKED false the
    // caller knows every key of the tile is visible), and d logit / d s in `grad`. In log2 units:
    // where a row's nearest key is far from its diagonal, ALiBi's bias and lse_i are both large
    // (-100 and below) and nearly cancel, so they meet in one FMA (one rounding) before the score,
    // of ordinary size, is added. The stored lse_i's own rounding remains, and dominates in fp32
    // (bench/NOTES.md, session 9).
    template <bool MASKED = true, bool EAGER = true>
    __device__ __forceinline__ float probability_at(float s, int j, int d, float fd, float lse_log2, float scale_log2,
                                                    float& grad) const {
        float x = capped(s, grad);
        const bool keep = user_at<true, EAGER>(x, j, d);
        return probability_kept<MASKED>(x, keep, j, d, fd, lse_log2, scale_log2);
    }
    // The same with the user's terms of the element evaluated ahead (user_tile)
    template <bool MASKED = true>
    __device__ __forceinline__ float probability_with(float s, const UserTerm& t, int j, int d, float fd, float lse_log2,
                                                      float scale_log2, float& grad) const {
        float x = capped(s, grad);
        const bool keep = !user_work<true>() || with_term(x, t);
        return probability_kept<MASKED>(x, keep, j, d, fd, lse_log2, scale_log2);
    }
    template <bool MASKED>
    __device__ __forceinline__ float probability_kept(float x, bool keep, int j, int d, float fd, float lse_log2,
                                                      float scale_log2) const {
        const float p = probability_of_capped(x, fd, lse_log2, scale_log2);
        return ((!MASKED || visible_at(j, d)) && keep) ? p : 0.f;
    }
    // The same from the softcapped score x = capped(s, grad), for a visible key.
    __device__ __forceinline__ float probability_of_capped(float x, float fd, float lse_log2, float scale_log2) const {
        const float bias = ALIBI ? fmaf(-slope_log2, fabsf(fd), -lse_log2) : -lse_log2;
        return exp2f(fmaf(x, scale_log2, bias));
    }
    template <bool MASKED = true>
    __device__ __forceinline__ float probability(float s, int i, int j, float lse_log2, float scale_log2, float& grad) const {
        const int d = j - diag(i);
        return probability_at<MASKED>(s, j, d, float(d), lse_log2, scale_log2, grad);
    }
    // dS_ij = P_ij (dP_ij - D_i) d logit / d s: the gradient with respect to the raw score, for
    // query i and key j (positions). d loss / d logit, P_ij (dP_ij - D_i), is also d loss / d bias_ij
    // (the bias is added to the logit): a backward with return_dbias adds it there.
    // DBIAS false: the dQ passes, which recompute dS after the main kernel added it.
    template <bool DBIAS = true>
    __device__ __forceinline__ float score_grad(float p, float dp, float d, float grad, int i, int j) const {
        const float dlogit = p * (dp - d);
        if constexpr (DBIAS) add_dbias(i, j, dlogit);
        return SOFTCAP ? dlogit * grad : dlogit;
    }
    // d loss / d bias_ij += dlogit (UserTerms::add_dbias), inside the sequence only (the kernels'
    // padding rows and keys never reach the bias's broadcast axes)
    __device__ __forceinline__ void add_dbias(int i, int j, float dlogit) const {
        if constexpr (UserTerms::HAS_DBIAS) {
            if (i >= 0 && i < seqlen_q && j < seqlen_k && dlogit != 0.f) UserTerms::add_dbias(user, b, h, i, j, dlogit);
        }
    }
    // Both, for kernels that have S_ij and dP_ij at the same time.
    // With dropout, p is dV's operand P Z and ds = P (Z dP - D) d logit / d s.
    template <bool MASKED = true, bool DBIAS = true>
    __device__ __forceinline__ void prob_and_ds(float s, float dp, int i, int j, float lse_log2, float d, float scale_log2,
                                                float& p, float& ds) const {
        float grad;
        p = probability<MASKED>(s, i, j, lse_log2, scale_log2, grad);
        float pz = p;
        drop_backward(pz, dp, i, j);
        ds = score_grad<DBIAS>(p, dp, d, grad, i, j);
        p = pz;
    }
};


// The backward's walk of key tile n0: `all` (a QueryWalk), or with a block mask (VARIANT_BLOCKS)
// the tiles of it that the mask keeps, listed in `list` (the caller syncs before reading).
template <int BLOCK_M, int BLOCK_N, int VARIANT, bool FAST_TANH>
__device__ __forceinline__ auto backward_walk(const Policy<VARIANT, FAST_TANH>& first_head, const QueryWalk& all,
                                              int* list, int n0) {
    if constexpr (Policy<VARIANT, FAST_TANH>::BLOCKS)
        return first_head.template list_query_tiles<BLOCK_M, BLOCK_N>(list, all, n0);
    else
        return all;
}

}  // namespace cupyflash
