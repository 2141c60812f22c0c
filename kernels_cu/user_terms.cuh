// The user's mask and bias expressions in the kernels (issue 19): what the C++ that
// cupyflash/_expr.py writes reads (aux arrays, C++'s arithmetic with its undefined cases flagged),
// and the UserTerms the variant policy (variant.cuh, Policy::user_at) calls per score.
#pragma once
#include "params.cuh"

namespace cupyflash {

// cupyflash/_expr.py translates each expression into C++ over b, h, q_idx, kv_idx, in which aux
// array `a` reads as aux_read<C type>(u, slot, bad, indices...), and _sources.user_terms defines
// CUPYFLASH_USER_KEEP, CUPYFLASH_USER_BIAS and, for a block mask, CUPYFLASH_BLOCK_ROWS, _COLS,
// _SLOT (its kinds) and _KEEP (its partial blocks' rule) before this header; modules without them
// never set the VARIANT_USER bits or VARIANT_BLOCKS.
// `bad` records an aux index out of bounds or an integer division by zero: the caller makes that
// logit NaN (what the NumPy backend refuses with an error, the GPU shows in the output).
// Read eagerly (AuxReader<true>), an index out of bounds reads at the clamped index, never at a
// wild address, and yields 0; the address is a pure function of the index, so the compiler may
// issue a tile's reads together and merge equal ones (doc[q_idx] is one read per row, not one per
// score: a branch around each read serialised them, bench/NOTES.md session 13).
template <int AXES> struct OffsetOf { using type = i64; };
template <> struct OffsetOf<1> { using type = int; };  // one axis: its int extent bounds the offset
// How the expressions read: EAGER, branch-free at the clamped index (the reads of a tile issue
// together and equal ones merge); otherwise each read behind its bounds test (fewer live values:
// the Hopper backward at head_dim 128, whose accumulators leave no registers for a tile's reads,
// spilled 96 bytes eager).
__device__ const unsigned long long AUX_ZERO = 0;  // what an eager read of an empty array reads: 0 of every type
template <bool EAGER>
struct AuxReader {
    const UserParams& params;
};
template <typename C, bool EAGER, typename... I>
__device__ __forceinline__ C aux_read(const AuxReader<EAGER>& u, int slot, bool& bad, I... index) {
    constexpr int N = sizeof...(I);
    static_assert(N >= 1 && N <= AUX_AXES, "an aux array has 1 to AUX_AXES axes");
    using Offset = typename OffsetOf<N>::type;
    const i64 at[N] = {i64(index)...};
    Offset offset = 0;
    bool inside = true, empty = false;
    #pragma unroll
    for (int a = 0; a < N; ++a) {  // the offset of the clamped index: a pure function of it
        const int extent = u.params.extent[slot][AUX_AXES - N + a];
        inside = inside && static_cast<unsigned long long>(at[a]) < static_cast<unsigned long long>(extent);  // 0 <= at < extent
        empty = empty || extent == 0;
        offset = offset * extent + Offset(EAGER ? min(max(at[a], i64(0)), i64(extent) - 1) : at[a]);
    }
    bad = bad || !inside;
    if constexpr (EAGER) {  // an empty array reads AUX_ZERO
        const C* base = empty ? reinterpret_cast<const C*>(&AUX_ZERO) : static_cast<const C*>(u.params.aux[slot]);
        const C value = base[empty ? 0 : offset];
        return inside ? value : C(0);
    } else {
        return inside ? static_cast<const C*>(u.params.aux[slot])[offset] : C(0);
    }
}
// value added into the float aux array in `slot` at index..., nothing where the index is out of
// bounds: d loss / d bias (CUPYFLASH_DBIAS; atomic, since the bias's broadcast axes sum there).
template <typename... I>
__device__ __forceinline__ void aux_add(const UserParams& u, int slot, float value, I... index) {
    constexpr int N = sizeof...(I);
    static_assert(N == AUX_AXES, "dbias has the bias's four axes");
    const i64 at[N] = {i64(index)...};
    i64 offset = 0;
    bool inside = true;
    #pragma unroll
    for (int a = 0; a < N; ++a) {
        const int extent = u.extent[slot][a];
        inside = inside && static_cast<unsigned long long>(at[a]) < static_cast<unsigned long long>(extent);
        offset = offset * extent + at[a];
    }
    if (inside) atomicAdd(static_cast<float*>(const_cast<void*>(u.aux[slot])) + offset, value);
}
// C++'s int / and % with a zero divisor flagged (bad) instead of undefined
template <typename A, typename B>
__device__ __forceinline__ auto user_div(A a, B b, bool& bad) {
    bad = bad || b == B(0);
    return b == B(0) ? decltype(a / b)(0) : a / b;
}
template <typename A, typename B>
__device__ __forceinline__ auto user_mod(A a, B b, bool& bad) {
    bad = bad || b == B(0);
    return b == B(0) ? decltype(a % b)(0) : a % b;
}
// min, max, abs with C++'s usual arithmetic conversions (an int and a float make a float)
template <typename A, typename B>
__device__ __forceinline__ auto user_min(A a, B b) {
    using C = decltype(a + b);
    return C(a) < C(b) ? C(a) : C(b);
}
template <typename A, typename B>
__device__ __forceinline__ auto user_max(A a, B b) {
    using C = decltype(a + b);
    return C(a) < C(b) ? C(b) : C(a);
}
template <typename A>
__device__ __forceinline__ auto user_abs(A a) {
    using C = decltype(+a);
    return C(a) < C(0) ? -C(a) : C(a);
}

struct UserTerms {
    // which terms this module defines (the kernels skip the per-score work of those it does not)
#ifdef CUPYFLASH_USER_KEEP
    static constexpr bool HAS_KEEP = true;
#else
    static constexpr bool HAS_KEEP = false;
#endif
#ifdef CUPYFLASH_BLOCK_KEEP
    static constexpr bool HAS_BLOCK_KEEP = true;
#else
    static constexpr bool HAS_BLOCK_KEEP = false;
#endif
#ifdef CUPYFLASH_USER_BIAS
    static constexpr bool HAS_BIAS = true;
#else
    static constexpr bool HAS_BIAS = false;
#endif
#ifdef CUPYFLASH_DBIAS
    static constexpr bool HAS_DBIAS = true;
#else
    static constexpr bool HAS_DBIAS = false;
#endif
    // aux reads at an address of their own per score (a dense tensor, table[kv_idx - q_idx]):
    // a tile's terms evaluated at once hold one value per score
#ifdef CUPYFLASH_ELEMENT_READS
    static constexpr int ELEMENT_READS = CUPYFLASH_ELEMENT_READS;
#else
    static constexpr int ELEMENT_READS = 0;
#endif
    // Does mask_mod keep key kv_idx for query q_idx of (b, h)? (true without one)
    template <bool EAGER>
    __device__ __forceinline__ static bool keep(const UserParams& params, int b, int h, int q_idx, int kv_idx,
                                                 bool& bad) {
        const AuxReader<EAGER> u{params};
#ifdef CUPYFLASH_USER_KEEP
        return bool(CUPYFLASH_USER_KEEP);
#else
        return true;
#endif
    }
    // A block mask's own element rule, on the tiles of its partial blocks (CUPYFLASH_BLOCK_KEEP: the
    // kernels that list the kept tiles know a tile's kind; true where it is not defined)
    template <bool EAGER>
    __device__ __forceinline__ static bool block_keep(const UserParams& params, int b, int h, int q_idx, int kv_idx,
                                                 bool& bad) {
        const AuxReader<EAGER> u{params};
#ifdef CUPYFLASH_BLOCK_KEEP
        return bool(CUPYFLASH_BLOCK_KEEP);
#else
        return true;
#endif
    }
    // bias_mod's term, in the scaled score's units (0 without one)
    template <bool EAGER>
    __device__ __forceinline__ static float bias(const UserParams& params, int b, int h, int q_idx, int kv_idx,
                                                 bool& bad) {
        const AuxReader<EAGER> u{params};
#ifdef CUPYFLASH_USER_BIAS
        return float(CUPYFLASH_USER_BIAS);
#else
        return 0.f;
#endif
    }
    // d loss / d bias += value at (b, h, q_idx, kv_idx) (CUPYFLASH_DBIAS: the backward of a call
    // with return_dbias=True; nothing without it)
    __device__ __forceinline__ static void add_dbias(const UserParams& u, int b, int h, int q_idx, int kv_idx,
                                                     float value) {
#ifdef CUPYFLASH_DBIAS
        CUPYFLASH_DBIAS(value);
#endif
    }
};

}  // namespace cupyflash
