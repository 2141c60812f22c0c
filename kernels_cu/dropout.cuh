// Dropout on the attention probabilities, regenerated in every pass from the seed (issue 19; the
// spec is cupyflash/_dropout.py): Philox4x32-10 with key (seed mod 2^32, seed div 2^32) and counter
// (q_idx, kv_idx div 4, h, b); output word kv_idx mod 4 keeps the entry when it is at least
// floor(p 2^32). Host-and-device code, so that a host compiler can check it against Random123's
// known-answer vectors (tests/test_compile.py).
#pragma once
#ifdef __CUDACC__
#define CUPYFLASH_HD __host__ __device__ __forceinline__
#else
#define CUPYFLASH_HD inline
#endif

namespace cupyflash {

struct Philox4 {
    unsigned int w[4];
};

CUPYFLASH_HD unsigned int mul_hi32(unsigned int a, unsigned int b) {
    return static_cast<unsigned int>((static_cast<unsigned long long>(a) * b) >> 32);
}

// Random123's philox4x32 with 10 rounds: counter c, key (k0, k1).
CUPYFLASH_HD Philox4 philox4x32_10(unsigned int c0, unsigned int c1, unsigned int c2, unsigned int c3,
                                   unsigned int k0, unsigned int k1) {
    constexpr unsigned int M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;  // multipliers
    constexpr unsigned int W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;  // key schedule (Weyl) increments
    #pragma unroll
    for (int round = 0; round < 10; ++round) {
        const unsigned int hi0 = mul_hi32(M0, c0), lo0 = M0 * c0;
        const unsigned int hi1 = mul_hi32(M1, c2), lo1 = M1 * c2;
        const unsigned int n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
        c0 = n0;
        c1 = lo1;
        c2 = n2;
        c3 = lo0;
        k0 += W0;
        k1 += W1;
    }
    return {{c0, c1, c2, c3}};
}

// The words of keys 4 (j / 4) .. 4 (j / 4) + 3 for query i of (b, h): one generator call serves
// four adjacent keys.
CUPYFLASH_HD Philox4 dropout_words(unsigned long long seed, int b, int h, int i, int j) {
    return philox4x32_10(static_cast<unsigned int>(i), static_cast<unsigned int>(j) >> 2, static_cast<unsigned int>(h),
                         static_cast<unsigned int>(b), static_cast<unsigned int>(seed),
                         static_cast<unsigned int>(seed >> 32));
}

}  // namespace cupyflash
