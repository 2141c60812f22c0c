// Merging partial softmaxes of one query row (split-KV, flash-decoding; the NumPy spec's
// forward_split): partial s has its normalised output O_s and its log-sum-exp lse_s (natural log,
// -inf when it saw no key); the row's sink logit, when it has one, counts once, here:
//   lse = log(sum_s exp(lse_s) + exp(sink)),   O = sum_s exp(lse_s - lse) O_s.
// The decode kernel merges its warps' partials with it, the combine kernel the splits'.
#pragma once
#include "traits.cuh"

namespace cupyflash {

struct MergedRow {
    float lse;  // -inf when no partial saw a key and the row has no sink: then O = 0
    // exp(lse_s - lse): partial s's share of the output
    __device__ __forceinline__ float weight(float lse_s) const {
        return lse == -CUPYFLASH_INF ? 0.f : exp2f((lse_s - lse) * LOG2E);
    }
};

// The merged lse of n partials whose lse lse_at(s) returns; sink: the row's sink logit, or -inf.
template <typename LseAt>
__device__ __forceinline__ MergedRow merge_row(int n, LseAt lse_at, float sink) {
    float top = sink;
    for (int s = 0; s < n; ++s) top = fmaxf(top, lse_at(s));
    const float shift = top == -CUPYFLASH_INF ? 0.f : top;  // no inf - inf when every partial is empty
    float total = exp2f((sink - shift) * LOG2E);
    for (int s = 0; s < n; ++s) total += exp2f((lse_at(s) - shift) * LOG2E);
    return {total == 0.f ? -CUPYFLASH_INF : shift + logf(total)};  // NaN partials stay NaN
}

}  // namespace cupyflash
