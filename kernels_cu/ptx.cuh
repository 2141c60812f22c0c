// Inline-PTX wrappers for the tensor-core and async-copy instructions (sm_80+).
// <mma.h> is not usable on every image, so each instruction is written out once here.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace cupyflash {

using u32 = unsigned int;  // NVRTC has no <stdint.h>
using i64 = long long;
using u64 = unsigned long long;
#define CUPYFLASH_INF __int_as_float(0x7f800000)  // +inf (NVRTC has no <math.h> INFINITY)

// ---- 16-bit element traits: packing two fp32 values into one 32-bit register ----
template <typename T> struct Elem;
template <> struct Elem<__half> {
    __device__ static u32 pack(float lo, float hi) {
        __half2 h = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<u32*>(&h);
    }
    __device__ static float to_float(__half x) { return __half2float(x); }
    __device__ static __half from_float(float x) { return __float2half_rn(x); }
};
template <> struct Elem<__nv_bfloat16> {
    __device__ static u32 pack(float lo, float hi) {
        __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<u32*>(&h);
    }
    __device__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
    __device__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};
template <> struct Elem<float> {
    __device__ static float to_float(float x) { return x; }
    __device__ static float from_float(float x) { return x; }
};

// ---- mma.sync m16n8k16, fp32 accumulate: C[16x8] += A[16x16] * B[16x8] ----
// Fragment layout (g = lane / 4, t = lane % 4):
//   a[0]: (row g,   k 2t..2t+1)  a[1]: (row g+8, k 2t..)  a[2]: (row g, k 2t+8..)  a[3]: (row g+8, k 2t+8..)
//   b[0]: (k 2t..2t+1, col g)    b[1]: (k 2t+8.., col g)
//   c[0..1]: (row g, col 2t..2t+1)   c[2..3]: (row g+8, col 2t..2t+1)
template <typename T> __device__ __forceinline__ void mma_16816(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1);

template <> __device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---- ldmatrix: four 8x8 16-bit matrices from shared memory; lane l gives the address of row (l % 8) of matrix l / 8 ----
__device__ __forceinline__ u32 smem_u32(const void* p) {
    return static_cast<u32>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void st_shared_u32(u32 addr, u32 x) {
    asm volatile("st.shared.u32 [%0], %1;\n" :: "r"(addr), "r"(x) : "memory");
}
// (by shared-state-space address, or by generic pointer)
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], u32 row_addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(row_addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], u32 row_addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(row_addr));
}
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], const void* smem_row) { ldmatrix_x4(r, smem_u32(smem_row)); }
__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], const void* smem_row) {
    ldmatrix_x4_trans(r, smem_u32(smem_row));
}

// ---- cp.async: 16-byte global -> shared copy; src_bytes = 0 writes zeros (out-of-range rows and columns) ----
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
    const int src_bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(smem_u32(smem_dst)), "l"(gmem_src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" :: "n"(N));
}

// ---- fp32 reduction into global memory (dQ accumulator); the result is unused, so this is a RED ----
__device__ __forceinline__ void red_add_f32x2(float* dst, float x, float y) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" :: "l"(dst), "f"(x), "f"(y) : "memory");
#else
    atomicAdd(dst, x);
    atomicAdd(dst + 1, y);
#endif
}

// ---- reductions across the 4 threads (a quad) that share one accumulator row ----
__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace cupyflash
