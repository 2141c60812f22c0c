// Masking of score tiles: keys past seqlen_k, and the bottom-right causal mask
// (query i sees keys j <= i + seqlen_k - seqlen_q).
#pragma once
#include "params.cuh"
#include "tile.cuh"

namespace cupyflash {

// Does the key tile [n0, n0 + BLOCK_N) need any masking for query rows [m0, m0 + BLOCK_M)?
// Tiles strictly inside the visible region skip the per-element test.
template <bool IS_CAUSAL, int BLOCK_M, int BLOCK_N>
__device__ __forceinline__ bool tile_needs_mask(int m0, int n0, int seqlen_q, int seqlen_k) {
    const bool past_end = n0 + BLOCK_N > seqlen_k;
    const bool crosses_diagonal = IS_CAUSAL && (n0 + BLOCK_N - 1 > last_visible_key<true>(m0, seqlen_q, seqlen_k));
    return past_end || crosses_diagonal;
}

// The first key tile that needs a mask (n_blocks if none): the tiles that do form a suffix of
// [0, n_blocks), the diagonal and the tile past seqlen_k coming last.
template <bool IS_CAUSAL, int BLOCK_M, int BLOCK_N>
__device__ __forceinline__ int first_masked_tile(int m0, int n_blocks, int seqlen_q, int seqlen_k) {
    int j = n_blocks;
    while (j > 0 && tile_needs_mask<IS_CAUSAL, BLOCK_M, BLOCK_N>(m0, (j - 1) * BLOCK_N, seqlen_q, seqlen_k)) --j;
    return j;
}

// Sets masked entries of a warp's score accumulator (rows = queries from q0, columns = keys from k0)
// to -inf, so exp2 turns them into exactly 0.
template <bool IS_CAUSAL, int MT, int NT>
__device__ __forceinline__ void mask_scores(float (&s)[MT][NT][4], int q0, int k0, int seqlen_q, int seqlen_k) {
    const int lane = threadIdx.x % 32;
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt)
        #pragma unroll
        for (int nt = 0; nt < NT; ++nt)
            #pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int i = q0 + acc_row(mt, r, lane), j = k0 + acc_col(nt, r, lane);
                if (j > last_visible_key<IS_CAUSAL>(i, seqlen_q, seqlen_k)) s[mt][nt][r] = -CUPYFLASH_INF;
            }
}

}  // namespace cupyflash
