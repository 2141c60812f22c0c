// Forward pass on Hopper (sm_90a): the FlashAttention-2 loop on warpgroup MMAs (wgmma), with
// warp specialisation.
// One thread block per (query tile Q_i, head, batch): a producer warpgroup and NUM_WG consumer
// warpgroups. One producer thread loads Q_i, then K_j and V_j into STAGES swizzled shared-memory
// stages with TMA and announces each stage's bytes on its "full" mbarrier; consumer warpgroup w owns
// query rows [64 w, 64 w + 64) of Q_i (no warpgroup needs another's row statistics) and hands a
// stage back on its "empty" mbarrier. No block-wide barrier in the loop: the consumers drift
// apart, so one's softmax runs under another's MMAs.
// Consumer step j issues S_j = Q_i K_j^T and then O += P~_{j-1} V_{j-1}; the softmax of S_j runs
// while the second product is still on the tensor cores. P~ never leaves registers (the S
// accumulator packed to 16 bits is wgmma's register A operand). Only O and lse reach global memory.
#include "traits.cuh"
#include "softmax.cuh"
#include "variant.cuh"
#include "fwd_epilogue.cuh"

namespace cupyflash {

// The shared-memory plan: Q_i, STAGES (K, V) stages, the mbarriers, one scratch word per consumer thread.
template <typename Tr>
struct FwdSm90Smem {
    unsigned char *q, *kv;
    u64 *q_full, *full, *empty;
    float* scratch;
    __device__ FwdSm90Smem(unsigned char* raw) {
        q = raw + (Tr::ALIGN - smem_u32(raw) % Tr::ALIGN) % Tr::ALIGN;  // the swizzle needs 1024-byte-aligned panels
        kv = q + Tr::TileQ::BYTES;
        q_full = reinterpret_cast<u64*>(kv + Tr::STAGES * 2 * Tr::TileKV::BYTES);
        full = q_full + 1;
        empty = full + Tr::STAGES;
        scratch = reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(q_full) + Tr::BARRIER_BYTES);
    }
    // stage of the it-th key tile the block walks
    __device__ unsigned char* k(int it) const { return kv + (it % Tr::STAGES) * 2 * Tr::TileKV::BYTES; }
    __device__ unsigned char* v(int it) const { return k(it) + Tr::TileKV::BYTES; }
};

// Producer warpgroup: Q_i, then the it-th key tile K_j, V_j (j = tile_at(it), from kv head h_kv)
// of sequence `seq` into stage it % STAGES once the consumers have released its previous use; each fill completes
// the stage's "full" barrier when its bytes have landed.
// One thread issues every copy (TMA, v2.7: 16-byte cp.async copies from 128 threads held the
// tensor pipe at 38% busy); the others have nothing to do.
template <typename Tr, typename Seq, typename TileAt>
__device__ __forceinline__ void produce(const FwdSm90Params& p, const FwdSm90Smem<Tr>& sm, const Seq& seq, int h, int h_kv,
                                        int m0, const TileAt& tile_at, int n_tiles) {
    if (threadIdx.x != 0) return;
    tma_prefetch_desc(p.k);
    tma_prefetch_desc(p.v);
    mbarrier_arrive_expect_tx(sm.q_full, Tr::TileQ::BYTES);
    // rows past a packed sequence's end load the next sequence's (or the tensor map's zeros): the
    // policy masks those keys, and those query rows are never stored
    tma_load_tile<typename Tr::TileQ>(sm.q, p.q, sm.q_full, seq.q0 + m0, h, seq.tb);
    for (int it = 0; it < n_tiles; ++it) {
        const int stage = it % Tr::STAGES, use = it / Tr::STAGES, n0 = seq.k0 + tile_at(it) * Tr::BLOCK_N;
        if (use > 0) mbarrier_wait(&sm.empty[stage], (use - 1) & 1);  // every consumer is done with tile it - STAGES
        mbarrier_arrive_expect_tx(&sm.full[stage], 2 * Tr::TileKV::BYTES);
        tma_load_tile<typename Tr::TileKV>(sm.k(it), p.k, &sm.full[stage], n0, h_kv, seq.tb);
        tma_load_tile<typename Tr::TileKV>(sm.v(it), p.v, &sm.full[stage], n0, h_kv, seq.tb);
    }
}

// Issue S = Q_i K_j^T for this warpgroup's 64 rows as one commit group.
template <typename Tr>
__device__ __forceinline__ void issue_scores(float (&s)[Tr::NT][4], const unsigned char* sQ, const unsigned char* sK,
                                             int wg_row0) {
    issue_k_major_product<typename Tr::T, Tr::BLOCK_M, Tr::BLOCK_N, Tr::HEAD_DIM>(s, sQ, wg_row0, sK);
    wgmma_commit();
}

// Issue O_i += P~ V_j: BLOCK_N / 16 k-steps, A = P~ from registers, B = V_j (N-major: head_dim contiguous).
template <typename Tr>
__device__ __forceinline__ void issue_pv(float (&o)[Tr::DT][4], const u32 (&pa)[Tr::BLOCK_N / 16][4],
                                         const unsigned char* sV) {
    #pragma unroll
    for (int kk = 0; kk < Tr::BLOCK_N / 16; ++kk)
        Wgmma<typename Tr::T, Tr::HEAD_DIM>::template rs<1>(o, pa[kk], desc_n_major<Tr::BLOCK_N, Tr::HEAD_DIM>(sV, kk), true);
    wgmma_commit();
}

// Consumer warpgroup `wg`: the online-softmax loop over the key tiles, then O_i and lse_i.
template <typename Tr, int VARIANT, typename TileAt, typename TilePartial>
__device__ __forceinline__ void consume(const FwdParams& p, const FwdSm90Smem<Tr>& sm, const typename Policy<VARIANT>::Seq& seq,
                                        int h, int m0, int n_first, const TileAt& tile_at, const TilePartial& tile_partial,
                                        int n_tiles, int n_masked) {
    using T = typename Tr::T;
    constexpr int NT = Tr::NT, DT = Tr::DT, BLOCK_M = Tr::BLOCK_M, BLOCK_N = Tr::BLOCK_N;
    const int warp = threadIdx.x / 32 - Tr::PRODUCER_THREADS / 32;  // among the consumer warps
    const int wg = warp / 4, wg_row0 = wg * 64;                     // this warpgroup's first row within Q_i
    const Policy<VARIANT> pol(p.var, seq, h);
    auto wait_tile = [&](int it) {  // K_j, V_j have landed and are visible to wgmma
        mbarrier_wait(&sm.full[it % Tr::STAGES], (it / Tr::STAGES) & 1);
    };
    auto release_tile = [&](int it) { mbarrier_arrive(&sm.empty[it % Tr::STAGES]); };
    auto key0 = [&](int it) { return tile_at(it) * BLOCK_N; };

    float o[1][DT][4];
    zero(o);
    OnlineSoftmax<1> softmax;
    softmax.init(pol.row_max_start(p.var, h), pol.row_sum_start(threadIdx.x % 4));
    float s[1][NT][4], alpha[1][2];
    u32 pa[BLOCK_N / 16][4];  // P~_{j-1}, packed as the A operand of the pending O += P~ V_{j-1}
    mbarrier_wait(sm.q_full, 0);

    // Step 0: S_ij = Q_i K_j^T and P~_ij for the first tile, with no product to overlap yet.
    if (n_tiles > 0) {
        wait_tile(0);
        wgmma_fence();
        issue_scores<Tr>(s[0], sm.q, sm.k(0), wg_row0);
        wgmma_wait<0>();
        fence_operands(s[0]);
        pol.on_tile(tile_partial(0)).template to_logits_tested<BLOCK_M, BLOCK_N>(s, m0, m0 + warp * 16, key0(0));
        softmax.update_scores(s, alpha, p.scale_log2);
        pol.drop(s, m0 + warp * 16, key0(0));  // with dropout: P~ V's operand (l took P~ whole)
        #pragma unroll
        for (int kk = 0; kk < BLOCK_N / 16; ++kk) pack_a_frag<T>(pa[kk], s[0], kk);
    }
    // Steps j >= 1: the softmax of S_ij runs while O_i += P~_{i,j-1} V_{j-1} is on the tensor cores.
    // The body has no branch between the issue and the waits (ptxas waits for every wgmma at a
    // join), so the tiles that need a mask, a prefix (the window's left edge) and a suffix (the
    // diagonal, the end of the keys) of the key range, run in loops of their own.
    // The user's terms evaluated ahead (under the products) where their registers fit; otherwise
    // per element after the wait, with fewer values live across it. At 128 keys, reads per score
    // (a mask tensor: 604 bytes spilled at head_dim 128), and packed sequences at head_dim 128
    // (12 bytes) spilled ahead (offline, NVRTC 13.0; bench/NOTES.md, session 14).
    constexpr bool AHEAD = (UserTerms::ELEMENT_READS == 0 || BLOCK_N <= 64) &&
                           (Policy<VARIANT>::Seq::ROWS_LAYOUT == SEQ_DENSE || BLOCK_N * Tr::HEAD_DIM < 128 * 128);
    auto step = [&](int it, bool masked) {  // inlined at each loop with `masked` a constant
        wait_tile(it);
        wgmma_fence();
        issue_scores<Tr>(s[0], sm.q, sm.k(it), wg_row0);
        // A fence between the groups makes them separate pipeline stages for ptxas: once S_ij is
        // retired its registers may be rewritten while the P~ V group still runs.
        wgmma_fence();
        issue_pv<Tr>(o[0], pa, sm.v(it - 1));
        // The user's terms of this tile (their aux reads), AHEAD: while both products run; otherwise
        // per element after the wait. Unmasked: no bounds mask, and a listed tile there is a full
        // block (no block rule).
        const Policy<VARIANT> tile_pol = masked ? pol.on_tile(tile_partial(it)) : pol;
        typename Policy<VARIANT>::template UserTile<1, NT, true> masked_terms;
        typename Policy<VARIANT>::template UserTile<1, NT, false> full_terms;
        if constexpr (AHEAD) {
            if (masked) masked_terms = tile_pol.template user_tile<true, 1, NT>(m0 + warp * 16, key0(it));
            else full_terms = tile_pol.template user_tile<false, 1, NT>(m0 + warp * 16, key0(it));
        }
        wgmma_wait<1>();  // S_ij is ready
        fence_operands(s[0]);
        if constexpr (AHEAD) {
            if (masked) tile_pol.template to_logits<true>(s, m0 + warp * 16, key0(it), masked_terms);
            else tile_pol.template to_logits<false, false>(s, m0 + warp * 16, key0(it), full_terms);
        } else {
            if (masked) pol.on_tile(tile_partial(it)).template to_logits<true>(s, m0 + warp * 16, key0(it));
            else pol.template to_logits<false, false>(s, m0 + warp * 16, key0(it));
        }
        softmax.update_scores(s, alpha, p.scale_log2);
        pol.drop(s, m0 + warp * 16, key0(it));  // with dropout: P~ V's operand (l took P~ whole)
        // the row sums depend on every P~ value: the softmax stays above the wait
        pin_before_wait(&sm.scratch[threadIdx.x - Tr::PRODUCER_THREADS], softmax.l[0][0] + softmax.l[0][1], wg);
        wgmma_wait<0>();  // O_i holds P~_{i,j-1} V_{j-1}; pa is free
        release_tile(it - 1);
        fence_operands(o[0]);
        softmax.rescale(o, alpha);
        #pragma unroll
        for (int kk = 0; kk < BLOCK_N / 16; ++kk) pack_a_frag<T>(pa[kk], s[0], kk);
    };
    int u_first, u_end;  // the unmasked tiles, as iterations
    if constexpr (Policy<VARIANT>::BLOCKS) {  // a block mask's list: its masked tiles first
        u_first = n_masked;
        u_end = n_tiles;
    } else {
        pol.template unmasked_tiles<BLOCK_M, BLOCK_N>(m0, n_first, n_first + n_tiles, u_first, u_end);
        u_first -= n_first;
        u_end -= n_first;
    }
    int it = 1;
    for (; it < u_first; ++it) step(it, true);
    for (; it < u_end; ++it) step(it, false);
    for (; it < n_tiles; ++it) step(it, true);
    // O_i += P~_{i,last} V_last
    if (n_tiles > 0) {
        if constexpr (Policy<VARIANT>::Seq::ROWS_LAYOUT != SEQ_DENSE) {
            // Rows of V_last past the sequence's keys hold the next packed sequence's rows or a KV
            // cache's never-written memory, where TMA loaded them: zeroed, so that P~ = 0 there never
            // meets a NaN or an Inf (0 * Inf = NaN). Dense tensors end there, and TMA fills zeros.
            const int rows = seq.len_k - key0(n_tiles - 1);
            if (rows < BLOCK_N) zero_rows_from<typename Tr::TileKV>(sm.v(n_tiles - 1), max(rows, 0), wg);
        }
        wgmma_fence();
        issue_pv<Tr>(o[0], pa, sm.v(n_tiles - 1));
        wgmma_wait<0>();
        fence_operands(o[0]);
        release_tile(n_tiles - 1);
    }

    // O_i = O_i / l, lse_i = m * scale + log(l)
    float inv_l[1][2], lse[1][2];
    softmax.finalize(inv_l, lse, p.scale_log2);
    store_output<T>(p, seq, h, m0 + warp * 16, o, inv_l, lse);
}

template <typename T, int HEAD_DIM, int BLOCK_N, int NUM_WG, int VARIANT>
__global__ void __launch_bounds__(FwdTraitsSm90<T, HEAD_DIM, BLOCK_N, NUM_WG>::NUM_THREADS, 1)
flash_fwd_sm90_kernel(const __grid_constant__ FwdSm90Params params) {  // in parameter space: the tensor maps stay there
    using Tr = FwdTraitsSm90<T, HEAD_DIM, BLOCK_N, NUM_WG>;
    const FwdParams& p = params.fwd;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const FwdSm90Smem<Tr> sm(smem_raw);

    const int m_block = gridDim.x - 1 - blockIdx.x;  // heaviest causal query tiles are scheduled first
    const int h = blockIdx.y;
    const int m0 = m_block * Tr::BLOCK_M;
    const typename Policy<VARIANT>::Seq seq(p, blockIdx.z);
    if (seq.past_q(m0)) return;
    // Key tiles K_j that some row of Q_i sees (the causal diagonal, the window).
    int n_first, n_end;
    const Policy<VARIANT> pol(p.var, seq, h);
    pol.template key_tiles<Tr::BLOCK_M, Tr::BLOCK_N>(m0, n_first, n_end);
    // With a block mask, the tiles it keeps, listed after the shared memory's plan
    KeyTiles kept{};
    if constexpr (Policy<VARIANT>::BLOCKS)
        kept = pol.template list_key_tiles<Tr::BLOCK_M, Tr::BLOCK_N>(reinterpret_cast<short*>(smem_raw + Tr::SMEM_BYTES),
                                                                     (p.seqlen_k + Tr::BLOCK_N - 1) / Tr::BLOCK_N, m0,
                                                                     n_first, n_end);
    const int n_tiles = Policy<VARIANT>::BLOCKS ? kept.count() : n_end - n_first;
    auto tile_at = [&](int it) { return Policy<VARIANT>::BLOCKS ? kept.at(it) : n_first + it; };
    auto tile_partial = [&](int it) { return Policy<VARIANT>::BLOCKS ? kept.partial(it) : true; };

    if (threadIdx.x == 0) {
        mbarrier_init(sm.q_full, 1);  // the TMA thread's arrival (and the bytes it announces)
        for (int s = 0; s < Tr::STAGES; ++s) {
            mbarrier_init(&sm.full[s], 1);
            mbarrier_init(&sm.empty[s], Tr::CONSUMER_THREADS);
        }
        fence_mbarrier_init();
    }
    __syncthreads();  // the mbarriers are initialised (and a block mask's tiles listed) before any warpgroup uses them

    if (threadIdx.x < Tr::PRODUCER_THREADS) {
        setmaxnreg_dec<Tr::PRODUCER_REGS>();
        produce<Tr>(params, sm, seq, h, kv_head(p.var, h), m0, tile_at, n_tiles);
    } else {
        setmaxnreg_inc<Tr::CONSUMER_REGS>();
        consume<Tr, VARIANT>(p, sm, seq, h, m0, n_first, tile_at, tile_partial, n_tiles, kept.masked);
    }
}

}  // namespace cupyflash
