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
template <typename C, typename... I>
__device__ __forceinline__ C aux_read(const UserParams& u, int slot, bool& bad, I... index) {
    constexpr int N = sizeof...(I);
    static_assert(N >= 1 && N <= AUX_AXES, "an aux array has 1 to AUX_AXES axes");
    const i64 at[N] = {i64(index)...};
    i64 offset = 0;
    bool inside = true;
    #pragma unroll
    for (int a = 0; a < N; ++a) {
        const int extent = u.extent[slot][AUX_AXES - N + a];
        inside = inside && at[a] >= 0 && at[a] < extent;
        offset = offset * extent + at[a];
    }
    bad = bad || !inside;
    return inside ? static_cast<const C*>(u.aux[slot])[offset] : C(0);
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
    // Does mask_mod keep key kv_idx for query q_idx of (b, h)? (true without one)
    __device__ __forceinline__ static bool keep(const UserParams& u, int b, int h, int q_idx, int kv_idx, bool& bad) {
#ifdef CUPYFLASH_USER_KEEP
        return bool(CUPYFLASH_USER_KEEP);
#else
        return true;
#endif
    }
    // A block mask's own element rule, on the tiles of its partial blocks (CUPYFLASH_BLOCK_KEEP: the
    // kernels that list the kept tiles know a tile's kind; true where it is not defined)
    __device__ __forceinline__ static bool block_keep(const UserParams& u, int b, int h, int q_idx, int kv_idx, bool& bad) {
#ifdef CUPYFLASH_BLOCK_KEEP
        return bool(CUPYFLASH_BLOCK_KEEP);
#else
        return true;
#endif
    }
    // bias_mod's term, in the scaled score's units (0 without one)
    __device__ __forceinline__ static float bias(const UserParams& u, int b, int h, int q_idx, int kv_idx, bool& bad) {
#ifdef CUPYFLASH_USER_BIAS
        return float(CUPYFLASH_USER_BIAS);
#else
        return 0.f;
#endif
    }
};

}  // namespace cupyflash
