// Shared-memory tiles and the warp-level tile product built on mma.sync.
//
// A tile of ROWS x COLS 16-bit elements is stored row-major with each row padded by
// 8 elements (16 bytes). With COLS a multiple of 32 the row stride is an odd number of
// 16-byte units, so the 8 row addresses of one ldmatrix fall in 8 different 16-byte
// bank groups: conflict-free without a swizzle.
#pragma once
#include "ptx.cuh"
#include "params.cuh"

namespace cupyflash {

template <int COLS> struct SmemRow {
    static_assert(COLS % 32 == 0, "padded rows are conflict-free only for widths that are multiples of 32");
    static constexpr int STRIDE = COLS + 8;  // elements between consecutive rows in shared memory
};

// All threads copy rows [row0, row0 + ROWS) of one head of `src` into sTile with cp.async.
// Rows at or past `seqlen` and columns at or past `head_dim` are filled with zeros.
// UNROLL (0 = fully) trades address registers for issue slots: kernels at the 255-register
// edge pick the value that keeps ptxas from spilling (see the tile table in _config.py).
template <typename T, int ROWS, int HEAD_DIM, int NUM_THREADS, int UNROLL = 0>
__device__ __forceinline__ void load_tile_async(T* sTile, const TensorRef& src, int b, int h, int row0,
                                                int seqlen, int head_dim) {
    constexpr int CHUNK = 16 / sizeof(T);  // elements per 16-byte copy
    constexpr int CHUNKS_PER_ROW = HEAD_DIM / CHUNK;
    constexpr int STRIDE = SmemRow<HEAD_DIM>::STRIDE;
    const T* base = row_ptr<T>(src, b, h, 0);
    constexpr int ITERS = (ROWS * CHUNKS_PER_ROW + NUM_THREADS - 1) / NUM_THREADS;
    #pragma unroll (UNROLL > 0 ? UNROLL : ITERS)
    for (int c = threadIdx.x; c < ROWS * CHUNKS_PER_ROW; c += NUM_THREADS) {
        const int r = c / CHUNKS_PER_ROW, col = (c % CHUNKS_PER_ROW) * CHUNK;
        const bool valid = (row0 + r < seqlen) && (col < head_dim);
        const T* g = valid ? base + i64(row0 + r) * src.stride_s + col : base;
        cp_async_16(sTile + r * STRIDE + col, g, valid);
    }
}

// ldmatrix row addresses. Lane l addresses row (l % 8) of matrix (l / 8). Two layouts occur:
//  * "row bit" (A stored [m][k], or B stored [k][n] read with .trans): matrix bit 0 selects +8 rows,
//    bit 1 selects +8 columns;
//  * "col bit" (A stored [k][m] read with .trans, or B stored [n][k]): matrix bit 0 selects +8 columns,
//    bit 1 selects +8 rows.
template <typename T>
__device__ __forceinline__ const T* ldsm_row_bit(const T* s, int stride, int r0, int c0, int lane) {
    return s + (r0 + (lane & 7) + ((lane >> 3) & 1) * 8) * stride + c0 + (lane >> 4) * 8;
}
template <typename T>
__device__ __forceinline__ const T* ldsm_col_bit(const T* s, int stride, int r0, int c0, int lane) {
    return s + (r0 + (lane & 7) + (lane >> 4) * 8) * stride + c0 + ((lane >> 3) & 1) * 8;
}

// A-operand fragment of a 16 x 16 block (rows m0.., k0..) of A.
// A_KMAJOR = false: A is stored [m][k]; true: A is stored transposed, [k][m].
template <bool A_KMAJOR, typename T>
__device__ __forceinline__ void load_a_frag(u32 (&a)[4], const T* sA, int lda, int m0, int k0, int lane) {
    if constexpr (A_KMAJOR) ldmatrix_x4_trans(a, ldsm_col_bit(sA, lda, k0, m0, lane));
    else                    ldmatrix_x4(a, ldsm_row_bit(sA, lda, m0, k0, lane));
}

// B-operand fragments of two adjacent 16 x 8 blocks (k0.., columns n0.. and n0+8..):
// b[0], b[1] for columns n0..n0+7 and b[2], b[3] for n0+8..n0+15.
// B_KMAJOR = false: B is stored [n][k] (like K in Q K^T); true: B is stored [k][n] (like V in P V).
template <bool B_KMAJOR, typename T>
__device__ __forceinline__ void load_b_frag_x2(u32 (&b)[4], const T* sB, int ldb, int k0, int n0, int lane) {
    if constexpr (B_KMAJOR) ldmatrix_x4_trans(b, ldsm_row_bit(sB, ldb, k0, n0, lane));
    else                    ldmatrix_x4(b, ldsm_col_bit(sB, ldb, n0, k0, lane));
}

// A B operand in a padded shared-memory tile (SmemRow): the pointer of its first row (or column
// when KMAJOR) and its row stride. Other layouts provide the same load_x2 (SwizzledB, hopper.cuh).
template <typename T>
struct PaddedB {
    const T* s;
    int ld;
    template <bool B_KMAJOR>
    __device__ __forceinline__ void load_x2(u32 (&b)[4], int k0, int n0, int lane) const {
        load_b_frag_x2<B_KMAJOR>(b, s, ld, k0, n0, lane);
    }
};

// acc[MT][NT] (16*MT x 8*NT, fp32) += A[16*MT x K] * B[K x 8*NT], both operands in shared memory.
// sA points at the warp's first row (or column when A_KMAJOR); B is an operand (PaddedB, SwizzledB)
// at the warp's first column (or row).
template <int MT, int NT, int K, bool A_KMAJOR, bool B_KMAJOR, typename T, typename BOperand>
__device__ __forceinline__ void warp_gemm(float (&acc)[MT][NT][4], const T* sA, int lda, const BOperand& B) {
    static_assert(K % 16 == 0 && NT % 2 == 0, "mma.sync m16n8k16 tiles: K multiple of 16, NT even");
    const int lane = threadIdx.x % 32;
    #pragma unroll
    for (int k0 = 0; k0 < K; k0 += 16) {
        u32 a[MT][4];
        #pragma unroll
        for (int mt = 0; mt < MT; ++mt) load_a_frag<A_KMAJOR>(a[mt], sA, lda, mt * 16, k0, lane);
        #pragma unroll
        for (int nt = 0; nt < NT; nt += 2) {
            u32 b[4];
            B.template load_x2<B_KMAJOR>(b, k0, nt * 8, lane);
            #pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma_16816<T>(acc[mt][nt], a[mt], b[0], b[1]);
                mma_16816<T>(acc[mt][nt + 1], a[mt], b[2], b[3]);
            }
        }
    }
}
// The same with B in a padded tile (sB, ldb).
template <int MT, int NT, int K, bool A_KMAJOR, bool B_KMAJOR, typename T>
__device__ __forceinline__ void warp_gemm(float (&acc)[MT][NT][4], const T* sA, int lda, const T* sB, int ldb) {
    warp_gemm<MT, NT, K, A_KMAJOR, B_KMAJOR>(acc, sA, lda, PaddedB<T>{sB, ldb});
}

template <int MT, int NT>
__device__ __forceinline__ void zero(float (&acc)[MT][NT][4]) {
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt)
        #pragma unroll
        for (int nt = 0; nt < NT; ++nt)
            #pragma unroll
            for (int r = 0; r < 4; ++r) acc[mt][nt][r] = 0.f;
}

// A-operand fragment (16 rows x k-step kk's 16 columns) from a 16-row strip of fp32 accumulators,
// packed to 16 bits: the accumulator layout of two adjacent n-tiles is exactly the A layout, so a
// probability tile P~ feeds the next product without leaving registers.
template <typename T, int NT>
__device__ __forceinline__ void pack_a_frag(u32 (&a)[4], const float (&acc)[NT][4], int kk) {
    a[0] = Elem<T>::pack(acc[2 * kk][0], acc[2 * kk][1]);
    a[1] = Elem<T>::pack(acc[2 * kk][2], acc[2 * kk][3]);
    a[2] = Elem<T>::pack(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
    a[3] = Elem<T>::pack(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
}

// Row and column (within the warp's tile) of accumulator element acc[mt][nt][r].
__device__ __forceinline__ int acc_row(int mt, int r, int lane) { return mt * 16 + lane / 4 + (r >= 2 ? 8 : 0); }
__device__ __forceinline__ int acc_col(int nt, int r, int lane) { return nt * 8 + (lane % 4) * 2 + (r & 1); }

// acc (16*MT x 8*DT) += A (16*MT x 8*NT, fp32 accumulator fragments in registers) * B (8*NT x 8*DT,
// an operand stored [k][n], like V in P V: PaddedB, SwizzledB). The accumulator layout of S is
// exactly the A-operand layout of the next mma, so P~ (forward) or dS (backward dQ pass) never
// leaves registers.
template <typename T, int MT, int NT, int DT, typename BOperand>
__device__ __forceinline__ void warp_gemm_rs(float (&acc)[MT][DT][4], const float (&a_acc)[MT][NT][4], const BOperand& B) {
    const int lane = threadIdx.x % 32;
    #pragma unroll
    for (int kk = 0; kk < NT / 2; ++kk) {
        u32 a[MT][4];
        #pragma unroll
        for (int mt = 0; mt < MT; ++mt) pack_a_frag<T>(a[mt], a_acc[mt], kk);
        #pragma unroll
        for (int dt = 0; dt < DT; dt += 2) {
            u32 b[4];
            B.template load_x2<true>(b, kk * 16, dt * 8, lane);
            #pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma_16816<T>(acc[mt][dt], a[mt], b[0], b[1]);
                mma_16816<T>(acc[mt][dt + 1], a[mt], b[2], b[3]);
            }
        }
    }
}
// The same with B in a padded tile of row stride STRIDE.
template <typename T, int MT, int NT, int DT, int STRIDE>
__device__ __forceinline__ void warp_gemm_rs(float (&acc)[MT][DT][4], const float (&a_acc)[MT][NT][4], const T* sB) {
    warp_gemm_rs<T, MT, NT, DT>(acc, a_acc, PaddedB<T>{sB, STRIDE});
}

// A 16*MT x 8*DT accumulator tile (this warp's rows row0 + acc_row, columns col0 + acc_col), each row
// times row_scale[mt][hh], written as T to one head of dst: only rows < n_rows, columns < head_dim.
// per_row(mt, hh, i) runs once per written row (the forward writes lse_i there).
template <typename T, int MT, int DT, typename PerRow>
__device__ __forceinline__ void store_acc_tile(const TensorRef& dst, int b, int h, int row0, int col0, int n_rows, int head_dim,
                                               const float (&acc)[MT][DT][4], const float (&row_scale)[MT][2], PerRow per_row) {
    const int lane = threadIdx.x % 32;
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt)
        #pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int i = row0 + acc_row(mt, 2 * hh, lane);
            if (i >= n_rows) continue;
            T* row = row_ptr<T>(dst, b, h, i);
            #pragma unroll
            for (int dt = 0; dt < DT; ++dt) {
                const int d = col0 + acc_col(dt, 0, lane);
                if (d < head_dim)
                    *reinterpret_cast<u32*>(row + d) =
                        Elem<T>::pack(acc[mt][dt][2 * hh] * row_scale[mt][hh], acc[mt][dt][2 * hh + 1] * row_scale[mt][hh]);
            }
            per_row(mt, hh, i);
        }
}
template <typename T, int MT, int DT>
__device__ __forceinline__ void store_acc_tile(const TensorRef& dst, int b, int h, int row0, int col0, int n_rows, int head_dim,
                                               const float (&acc)[MT][DT][4], const float (&row_scale)[MT][2]) {
    store_acc_tile<T>(dst, b, h, row0, col0, n_rows, head_dim, acc, row_scale, [](int, int, int) {});
}

// The same tile added into a dense fp32 [n_rows][head_dim] buffer with red.global.add (dQ's
// accumulator: several key tiles add to the same rows).
template <int MT, int DT>
__device__ __forceinline__ void red_add_acc_tile(float* dst, int row0, int col0, int n_rows, int head_dim,
                                                 const float (&acc)[MT][DT][4]) {
    const int lane = threadIdx.x % 32;
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt)
        #pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int i = row0 + acc_row(mt, 2 * hh, lane);
            if (i >= n_rows) continue;
            #pragma unroll
            for (int dt = 0; dt < DT; ++dt) {
                const int d = col0 + acc_col(dt, 0, lane);
                if (d < head_dim) red_add_f32x2(dst + i64(i) * head_dim + d, acc[mt][dt][2 * hh], acc[mt][dt][2 * hh + 1]);
            }
        }
}

// row_scale for store_acc_tile: the same factor on every row.
template <int MT>
struct UniformScale {
    float v[MT][2];
    __device__ __forceinline__ explicit UniformScale(float c) {
        #pragma unroll
        for (int mt = 0; mt < MT; ++mt) v[mt][0] = v[mt][1] = c;
    }
};

}  // namespace cupyflash
