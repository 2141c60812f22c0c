// The KV cache's append (VARIANT_KVLEN calls with new tokens): each new token's key and value row
// into its sequence's cache at position cache_seqlens[b] + t (the attention kernels then count
// min(max(cache_seqlens[b], 0) + S_new, capacity) keys: Seq in params.cuh). A position
// past the cache's capacity or a page index outside the cache is the caller's contract: such rows
// are dropped, never written out of bounds. One block per (new token, kv head, sequence).
#include "ptx.cuh"
#include "params.cuh"

namespace cupyflash {

constexpr int APPEND_THREADS = 32;  // one warp copies a head_dim row

template <typename T>
__global__ void __launch_bounds__(APPEND_THREADS) kvcache_append_kernel(const AppendParams p) {
    const int t = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int pos = max(0, p.cache_seqlens[b]) + t;
    if (t >= p.new_tokens || pos >= p.capacity) return;
    int slot = b, row = pos;  // the cache's (batch or page, row) of position pos
    if (p.page_table != nullptr) {
        slot = p.page_table[b * p.page_table_stride + pos / p.page_size];
        row = pos % p.page_size;
        if (slot < 0 || slot >= p.num_pages) return;
    }
    const T* k = row_ptr<const T>(p.k_new, b, h, t);
    const T* v = row_ptr<const T>(p.v_new, b, h, t);
    T* k_dst = row_ptr<T>(p.k_cache, slot, h, row);
    T* v_dst = row_ptr<T>(p.v_cache, slot, h, row);
    for (int d = threadIdx.x; d < p.head_dim; d += APPEND_THREADS) {
        k_dst[d] = k[d];
        v_dst[d] = v[d];
    }
}

}  // namespace cupyflash
