// Backward pass on Hopper (sm_90a), the tile table's choice for head_dim up to 128 (bench/NOTES.md
// v3.0 to v3.4, v4.1).
// FlashAttention-2's Algorithm 2 on warpgroup MMAs, laid out as FA3 does: one block per key tile
// (K_j, V_j stay in shared memory), a producer warpgroup staging each query tile (Q_i, dO_i by
// TMA; lse_i, D_i), and consumer warpgroups that each own 64 keys:
//   S^T = K_j Q_i^T and dP^T = V_j dO_i^T (both operands from shared memory);
//   P^T = exp2(S^T * scale_log2 - lse_i * log2 e), dS^T = P^T (dP^T - D_i) in registers;
//   dV_j += P^T dO_i and dK_j += dS^T Q_i with P^T, dS^T as the register A operand;
//   dQ_i += dS K_j, this warpgroup's share (Tr::DQ_SPLIT: its keys, or a 64 x 64 panel of the
//   dQ tile over all keys; dS^T through shared memory, read M-major), reduced in fp32 into the
//   scratch buffer that the convert kernel scales and casts (none with deterministic=True, where
//   the dQ pass computes dQ).
#include "traits.cuh"
#include "bwd_rows.cuh"
#include "variant.cuh"

namespace cupyflash {

template <typename Tr>
struct BwdSm90Smem {
    unsigned char *k, *v, *qdo, *ds;
    float* stats;
    u64 *kv_full, *full, *empty;
    __device__ BwdSm90Smem(unsigned char* raw) {
        k = raw + (Tr::ALIGN - smem_u32(raw) % Tr::ALIGN) % Tr::ALIGN;  // the swizzle needs 1024-byte-aligned panels
        v = k + Tr::TileKV::BYTES;
        qdo = v + Tr::TileKV::BYTES;                        // stage s: Q at qdo + 2 s TileQ::BYTES, dO right after
        ds = qdo + 2 * Tr::STAGES * Tr::TileQ::BYTES;       // warpgroup w: ds + w TileDS::BYTES
        stats = reinterpret_cast<float*>(ds + Tr::NUM_WG * Tr::TileDS::BYTES);  // stage s: lse, then D
        kv_full = reinterpret_cast<u64*>(reinterpret_cast<unsigned char*>(stats) + Tr::ROW_STATS_BYTES);
        full = kv_full + 1;
        empty = full + Tr::STAGES;
    }
    __device__ unsigned char* q(int it) const { return qdo + (it % Tr::STAGES) * 2 * Tr::TileQ::BYTES; }
    __device__ unsigned char* dout(int it) const { return q(it) + Tr::TileQ::BYTES; }
    __device__ float* lse(int it) const { return stats + (it % Tr::STAGES) * 2 * Tr::BLOCK_M; }
    __device__ float* dsum(int it) const { return lse(it) + Tr::BLOCK_M; }
};

// Producer warpgroup: K_j, V_j once, then each query tile of the walk (every query head of the
// group, grouped-query attention) into stage it % STAGES once the consumers have released its previous use. A stage's "full" barrier completes when every
// producer thread has stored its share of lse_i, D_i and arrived, and Q_i, dO_i have landed:
// thread 0's arrival announces their bytes, and it issues the copies (TMA).
template <typename Tr, typename Seq, typename Walk>
__device__ __forceinline__ void produce_bwd(const BwdSm90Params& params, const BwdSm90Smem<Tr>& sm, const Seq& seq, int h_kv,
                                            int n0, const Walk& walk) {
    using TileQ = typename Tr::TileQ;
    const BwdParams& p = params.bwd;
    const bool tma_thread = threadIdx.x == 0;
    if (tma_thread) {
        mbarrier_arrive_expect_tx(sm.kv_full, 2 * Tr::TileKV::BYTES);
        // rows past a packed sequence's end load the next sequence's (or the tensor map's zeros): the
        // policy gives those keys P = 0 and their dK, dV are not stored; such query rows have lse = -inf
        tma_load_tile<typename Tr::TileKV>(sm.k, params.k, sm.kv_full, seq.k0 + n0, h_kv, seq.tb);
        tma_load_tile<typename Tr::TileKV>(sm.v, params.v, sm.kv_full, seq.k0 + n0, h_kv, seq.tb);
    }
    for (int it = 0; it < walk.count; ++it) {
        const int stage = it % Tr::STAGES, use = it / Tr::STAGES, m0 = walk.m_block(it) * Tr::BLOCK_M, h = walk.head(it);
        if (use > 0) mbarrier_wait(&sm.empty[stage], (use - 1) & 1);  // every consumer is done with tile it - STAGES
        load_row_stats<Tr::BLOCK_M, Tr::PRODUCER_THREADS>(sm.lse(it), sm.dsum(it), p, seq.stat_base(p.heads, p.seqlen_q, h),
                                                          seq.q0 + m0, seq.q_end());
        if (tma_thread) {
            mbarrier_arrive_expect_tx(&sm.full[stage], 2 * TileQ::BYTES);
            tma_load_tile<TileQ>(sm.q(it), params.q, &sm.full[stage], seq.q0 + m0, h, seq.tb);
            tma_load_tile<TileQ>(sm.dout(it), params.dout, &sm.full[stage], seq.q0 + m0, h, seq.tb);
        } else {
            mbarrier_arrive(&sm.full[stage]);
        }
    }
}

// P^T of this warpgroup's 64 keys (rows) x BLOCK_M queries (columns), in place of S^T; keys a
// query does not see (causal, window, past seqlen_k) get P = 0. WITH_DS (the softcap, dropout and
// dbias kernels, which call it once dP^T is ready too): dS^T = P^T (dP^T - D_i) (1 - tanh^2) in place of
// dP^T in the same pass, so the softcap's derivative is never stored (no registers to spare for
// it); with dropout, dS^T = P^T (Z dP^T - D_i) and P^T becomes dV's operand P^T Z.
// `terms`: the user's terms of the tile, evaluated AHEAD (user_tile) while the products ran; otherwise
// evaluated here per element.
template <typename Tr, bool WITH_DS, bool AHEAD, typename Pol, typename Terms>
__device__ __forceinline__ void probabilities(float (&st)[Tr::MT][4], float (&dpt)[Tr::MT][4], const Pol& pol,
                                              const BwdParams& p, const float* sLse, const float* sD, int key0, int m0,
                                              const Terms& terms) {
    // per element, the user's aux arrays are read lazily (AuxReader): at head_dim 128 the dK, dV
    // accumulators leave no registers for a tile's reads (eager, a document rule spilled 96 bytes)
    const int lane = threadIdx.x % 32;
    // element (nt, r): key j0 + 8 (r >= 2), offset from the query's diagonal d0 + 8 (r >= 2) - 8 nt - (r & 1)
    const int j0 = Pol::frag_row0(key0), d0 = j0 - pol.diag(Pol::frag_col0(m0));
    const float fd0 = float(d0);
    #pragma unroll
    for (int nt = 0; nt < Tr::MT; ++nt)
        #pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int up = r >= 2 ? 8 : 0, c = acc_col(nt, r, lane), dc = up - nt * 8 - (r & 1);
            float g;
            if constexpr (AHEAD)
                st[nt][r] = pol.probability_with(st[nt][r], terms.at(0, nt, r), j0 + up, d0 + dc, fd0 + float(dc), sLse[c],
                                                 p.scale_log2, g);
            else
                st[nt][r] = pol.template probability_at<true, false>(st[nt][r], j0 + up, d0 + dc, fd0 + float(dc), sLse[c],
                                                                    p.scale_log2, g);
            if constexpr (WITH_DS) {
                // dropout: dV takes P Z, dS = P (Z dP - D) (query m0 + c, key j0 + up)
                float pz = st[nt][r];
                pol.drop_backward(pz, dpt[nt][r], m0 + c, j0 + up);
                dpt[nt][r] = pol.score_grad(st[nt][r], dpt[nt][r], sD[c], g, m0 + c, j0 + up);
                st[nt][r] = pz;
            }
        }
}

// dS^T = P^T (dP^T - D_i), in place of dP^T (no softcap: d logit / d s = 1).
template <typename Tr>
__device__ __forceinline__ void score_grads(const float (&pt)[Tr::MT][4], float (&dpt)[Tr::MT][4], const float* sD) {
    const int lane = threadIdx.x % 32;
    #pragma unroll
    for (int nt = 0; nt < Tr::MT; ++nt)
        #pragma unroll
        for (int r = 0; r < 4; ++r) dpt[nt][r] = pt[nt][r] * (dpt[nt][r] - sD[acc_col(nt, r, lane)]);
}

// This warp's 16 rows of dS^T into the warpgroup's swizzled [key][query] tile.
template <typename Tr>
__device__ __forceinline__ void store_ds(unsigned char* sDS, const float (&ds)[Tr::MT][4], int warp_in_wg) {
    using Tile = typename Tr::TileDS;
    using T = typename Tr::T;
    const int lane = threadIdx.x % 32;
    #pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const int row = warp_in_wg * 16 + acc_row(0, 2 * hh, lane);
        const u32 line = Tile::line_addr(smem_u32(sDS), row) + (acc_col(0, 0, lane) % 8) * 2;
        #pragma unroll
        for (int nt = 0; nt < Tr::MT; ++nt)  // columns 8 nt + acc_col(0, 0, lane): chunk nt of the row
            st_shared_u32(Tile::chunk_addr(line, nt), Elem<T>::pack(ds[nt][2 * hh], ds[nt][2 * hh + 1]));
    }
}

// Barrier among the consumers that read warpgroup wg's dS^T tile: its own 128 threads, or all
// consumers when dQ is split by panel.
template <typename Tr>
__device__ __forceinline__ void ds_barrier(int wg) {
    if constexpr (Tr::DQ_SPLIT == DQ_PANEL)
        named_barrier(Tr::BAR_DS, Tr::CONSUMER_THREADS);
    else
        warpgroup_barrier(wg);
}

// dS^T to shared memory, where dQ's product reads it transposed (every reader done with the
// previous tile's before, complete and visible to the async proxy after).
template <typename Tr>
__device__ __forceinline__ void exchange_ds(unsigned char* sDS, const float (&dst)[Tr::MT][4], int wg, int warp_in_wg) {
    ds_barrier<Tr>(wg);  // every warp that reads this dS^T tile is done with the previous tile's
    store_ds<Tr>(sDS, dst, warp_in_wg);
    fence_proxy_async();
    ds_barrier<Tr>(wg);  // dS^T is complete and visible to the wgmma of every warpgroup that reads it
}

// dV_j += P^T dO_i, dK_j += dS^T Q_i: A from registers, B N-major.
template <typename Tr>
__device__ __forceinline__ void issue_dv_dk(float (&dv)[Tr::DT][4], float (&dk)[Tr::DT][4], const u32 (&pa)[Tr::BLOCK_M / 16][4],
                                            const u32 (&dsa)[Tr::BLOCK_M / 16][4], const unsigned char* sQ,
                                            const unsigned char* sdO) {
    #pragma unroll
    for (int kk = 0; kk < Tr::BLOCK_M / 16; ++kk) {
        Wgmma<typename Tr::T, Tr::HEAD_DIM>::template rs<1>(dv, pa[kk], desc_n_major<Tr::BLOCK_M, Tr::HEAD_DIM>(sdO, kk), true);
        Wgmma<typename Tr::T, Tr::HEAD_DIM>::template rs<1>(dk, dsa[kk], desc_n_major<Tr::BLOCK_M, Tr::HEAD_DIM>(sQ, kk), true);
    }
}

// Product pi of this warpgroup's share of dQ_i = dS K_j (Tr::DQ_SPLIT), one 64 x 64 panel: A =
// dS^T read M-major, B = K_j N-major. By panel: query-row panel qp, head_dim panel dp over every
// warpgroup's dS^T tile (all keys); by keys: head_dim panel pi over this warpgroup's 64 keys.
template <typename Tr>
struct DqPanel {
    static constexpr bool BY_PANEL = Tr::DQ_SPLIT == DQ_PANEL;
    static constexpr int COUNT = BY_PANEL ? 1 : Tr::HEAD_DIM / 64, KEYS = BY_PANEL ? Tr::BLOCK_N : 64;
    int qp, dp, key_step0;
    __device__ __forceinline__ DqPanel(int wg, int pi)
        : qp(BY_PANEL ? wg / Tr::DQ_COL_PANELS : 0), dp(BY_PANEL ? wg % Tr::DQ_COL_PANELS : pi),
          key_step0(BY_PANEL ? 0 : wg * 4) {}

    __device__ __forceinline__ void issue(float (&dq)[8][4], const BwdSm90Smem<Tr>& sm, const unsigned char* sDS) const {
        #pragma unroll
        for (int kk = 0; kk < KEYS / 16; ++kk)  // by panel: every warpgroup's dS^T tile (and keys) in turn
            Wgmma<typename Tr::T, 64>::template ss<1, 1>(
                dq, desc_n_major<64, Tr::BLOCK_M>(BY_PANEL ? sm.ds + (kk / 4) * Tr::TileDS::BYTES : sDS, kk % 4, qp),
                desc_n_major<Tr::BLOCK_N, Tr::HEAD_DIM>(sm.k, key_step0 + kk, dp), kk > 0);
    }
    // into the fp32 scratch (tensor rows from row0 + 64 qp, this warp's 16 of them, those below row_end)
    __device__ __forceinline__ void add(const BwdParams& p, float* dq_accum_head, int row0, int row_end, int warp_in_wg,
                                        const float (&dq)[1][8][4]) const {
        red_add_acc_tile(dq_accum_head, row0 + qp * 64 + warp_in_wg * 16, dp * 64, row_end, p.head_dim, dq);
    }
};

// Consumer warpgroup `wg`: keys [n0 + 64 wg, n0 + 64 wg + 64), every query tile of the walk.
template <typename Tr, int VARIANT, typename Walk>
__device__ __forceinline__ void consume_bwd(const BwdParams& p, const BwdSm90Smem<Tr>& sm,
                                            const typename Policy<VARIANT>::Seq& seq, int h_kv, int n0, const Walk& walk) {
    using T = typename Tr::T;
    using Dq = DqPanel<Tr>;
    using Pol = Policy<VARIANT>;
    constexpr bool HAS_DQ = Tr::DQ_SPLIT != DQ_NONE;
    constexpr int MT = Tr::MT, DT = Tr::DT, BLOCK_M = Tr::BLOCK_M;

    // The user's terms evaluated ahead, under the products, below head_dim 128; at 128 the dK, dV
    // accumulators leave no registers for them (a document rule spilled 4-20 bytes, a mask_mod
    // reading it 40-132, a dense bias 68-156; offline, NVRTC 13.0, bench/NOTES.md session 14)
    constexpr bool AHEAD = Tr::HEAD_DIM < 128;
    float dk[1][DT][4], dv[1][DT][4];  // one 16-key strip per warp
    zero(dk);
    zero(dv);
    mbarrier_wait(sm.kv_full, 0);

    for (int it = 0; it < walk.count; ++it) {
        const int m0 = walk.m_block(it) * BLOCK_M, h = walk.head(it);
        const Pol pol = Pol(p.var, seq, h).on_tile(walk.partial(it));
        float* dq_accum_head = p.dq_accum + seq.stat_base(p.heads, p.seqlen_q, h) * p.head_dim;
        // this warp's place, recomputed per tile (cheaper than keeping it live at the register limit)
        const int warp = opaque_thread_index() / 32 - Tr::PRODUCER_THREADS / 32;  // among the consumer warps
        const int wg = warp / 4, warp_in_wg = warp % 4;
        const int key0 = n0 + wg * 64 + warp_in_wg * 16;  // this warp's first key
        unsigned char* sDS = sm.ds + wg * Tr::TileDS::BYTES;
        mbarrier_wait(&sm.full[it % Tr::STAGES], (it / Tr::STAGES) & 1);
        const unsigned char *sQ = sm.q(it), *sdO = sm.dout(it);

        // S^T = K_j Q_i^T and dP^T = V_j dO_i^T for this warpgroup's keys, in two groups: P^T =
        // exp2(...) runs while dP^T's product does
        float st[MT][4], dpt[MT][4];
        wgmma_fence();
        issue_k_major_product<T, Tr::BLOCK_N, BLOCK_M, Tr::HEAD_DIM>(st, sm.k, wg * 64, sQ);
        wgmma_commit();
        issue_k_major_product<T, Tr::BLOCK_N, BLOCK_M, Tr::HEAD_DIM>(dpt, sm.v, wg * 64, sdO);
        wgmma_commit();
        // the user's terms of the tile (their aux reads) while the products run, AHEAD
        typename Pol::template UserTile<1, MT, true> terms;
        if constexpr (AHEAD) terms = pol.template user_tile<true, 1, MT, true>(key0, m0);
        // P^T and dS^T in one pass, once both products are done (with return_dbias: dS^T is added there)
        if constexpr (Pol::SOFTCAP || Pol::DROPOUT || UserTerms::HAS_DBIAS) {
            wgmma_wait<0>();
            fence_operands(st);
            fence_operands(dpt);
            probabilities<Tr, true, AHEAD>(st, dpt, pol, p, sm.lse(it), sm.dsum(it), key0, m0, terms);
        } else {
            wgmma_wait<1>();
            fence_operands(st);
            probabilities<Tr, false, AHEAD>(st, dpt, pol, p, sm.lse(it), sm.dsum(it), key0, m0, terms);
            wgmma_wait<0>();
            fence_operands(dpt);
            score_grads<Tr>(st, dpt, sm.dsum(it));
        }
        u32 pa[BLOCK_M / 16][4], dsa[BLOCK_M / 16][4];
        #pragma unroll
        for (int kk = 0; kk < BLOCK_M / 16; ++kk) {
            pack_a_frag<T>(pa[kk], st, kk);
            pack_a_frag<T>(dsa[kk], dpt, kk);
        }

        // dV_j += P^T dO_i, dK_j += dS^T Q_i; dS^T exchanged meanwhile, then dQ's first product
        // queued behind them
        float dq[1][8][4];
        wgmma_fence();
        issue_dv_dk<Tr>(dv[0], dk[0], pa, dsa, sQ, sdO);
        wgmma_commit();
        if constexpr (HAS_DQ) {
            exchange_ds<Tr>(sDS, dpt, wg, warp_in_wg);
            wgmma_fence();
            Dq(wg, 0).issue(dq[0], sm, sDS);
            wgmma_commit();
            wgmma_wait<1>();  // dV, dK done; dQ may still run
        } else {
            wgmma_wait<0>();
        }
        fence_operands(pa);  // the A fragments stay unchanged until their products are done
        fence_operands(dsa);
        fence_operands(dk[0]);
        fence_operands(dv[0]);
        mbarrier_arrive(&sm.empty[it % Tr::STAGES]);  // Q_i, dO_i, lse_i, D_i are no longer read
        if constexpr (HAS_DQ) {
            // dQ_i = dS K_j, this warpgroup's share, one 64-column panel at a time (fewer registers)
            #pragma unroll
            for (int pi = 0; pi < Dq::COUNT; ++pi) {
                const Dq part(wg, pi);
                if (pi > 0) {  // (by keys at head_dim 128: the second panel)
                    wgmma_fence();
                    part.issue(dq[0], sm, sDS);
                    wgmma_commit();
                }
                wgmma_wait<0>();
                fence_operands(dq[0]);
                part.add(p, dq_accum_head, seq.q0 + m0, seq.q_end(), warp_in_wg, dq);
            }
        }
    }
    const int warp = threadIdx.x / 32 - Tr::PRODUCER_THREADS / 32;
    store_dk_dv<T>(p, seq.tb, h_kv, seq.k0 + n0 + warp * 16, seq.k_end(), 0, dk, dv);  // first key: n0 + 64 wg + 16 warp_in_wg
}

template <typename T, int HEAD_DIM, int BLOCK_M, int NUM_WG, int DQ_SPLIT, int VARIANT>
__global__ void __launch_bounds__(BwdTraitsSm90<T, HEAD_DIM, BLOCK_M, NUM_WG, DQ_SPLIT>::NUM_THREADS, 1)
flash_bwd_sm90_kernel(const __grid_constant__ BwdSm90Params params) {  // in parameter space: the tensor maps stay there
    using Tr = BwdTraitsSm90<T, HEAD_DIM, BLOCK_M, NUM_WG, DQ_SPLIT>;
    const BwdParams& p = params.bwd;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const BwdSm90Smem<Tr> sm(smem_raw);

    const int n_block = gridDim.x - 1 - blockIdx.x;
    const int h_kv = blockIdx.y;  // one block per kv head: the query heads of its group in turn
    const int n0 = n_block * Tr::BLOCK_N;
    const typename Policy<VARIANT>::Seq seq(p, blockIdx.z);
    if (seq.past_k(n0)) return;
    // Query tiles that see some key of K_j (from the causal diagonal down, within the window), of
    // every query head that reads this kv head.
    int m_first, m_end;
    const Policy<VARIANT> pol(p.var, seq, h_kv * p.var.group);
    pol.template query_tiles<Tr::BLOCK_M, Tr::BLOCK_N>(n0, m_first, m_end);
    // With a block mask, the tiles it keeps, listed after the shared memory's plan
    const auto walk = backward_walk<Tr::BLOCK_M, Tr::BLOCK_N>(pol, QueryWalk(h_kv, p.var.group, m_first, m_end),
                                                              reinterpret_cast<int*>(smem_raw + Tr::SMEM_BYTES), n0);

    if (threadIdx.x == 0) {
        mbarrier_init(sm.kv_full, 1);  // the TMA thread's arrival (and the bytes it announces)
        for (int s = 0; s < Tr::STAGES; ++s) {
            mbarrier_init(&sm.full[s], Tr::PRODUCER_THREADS);  // one arrival per producer thread
            mbarrier_init(&sm.empty[s], Tr::CONSUMER_THREADS);
        }
        fence_mbarrier_init();
    }
    __syncthreads();  // the mbarriers are initialised (and a block mask's tiles listed) before any warpgroup uses them

    if (threadIdx.x < Tr::PRODUCER_THREADS) {
        setmaxnreg_dec<Tr::PRODUCER_REGS>();
        produce_bwd<Tr>(params, sm, seq, h_kv, n0, walk);
    } else {
        setmaxnreg_inc<Tr::CONSUMER_REGS>();
        consume_bwd<Tr, VARIANT>(p, sm, seq, h_kv, n0, walk);
    }
}

}  // namespace cupyflash
