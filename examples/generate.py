"""Greedy decoding of a small Llama-style model (random weights) on cupyflash's KV cache, eager and
as a replayed CUDA graph: the serving loop of issue 16, end to end, in plain CuPy.

Each layer is RMSNorm, a fused q/k/v projection, rotary embeddings at each sequence's position,
attention with ``cupyflash.flash_attention_with_kvcache`` (the new token's k and v appended to the
layer's cache in place), the output projection and a SwiGLU MLP. The prompt is prefilled in one
call per layer; then every decode step appends one token per sequence. The step writes into
buffers allocated once (``out=`` everywhere, cupyflash's ``out``, ``lse`` and ``workspace``) and
advances ``cache_seqlens`` in device memory, so it can be captured once and replayed: the graph
run must produce the eager run's tokens exactly. Prints tokens per second for both.

    python examples/generate.py [--batch 8] [--prompt 128] [--steps 64] [--layers 4]
"""
from __future__ import annotations

import time

import click
import cupy as cp
import numpy as np

import cupyflash

DTYPE = np.float16

_ROPE = cp.RawKernel(r"""
#include <cuda_fp16.h>
// Rotary embedding in place: x (B, T, heads, D) with row strides in elements; token t of sequence b
// sits at position start[b] + t; pairs (i, i + D/2) rotate by pos * theta^(-2i/D).
extern "C" __global__ void rope(__half* x, long long stride_b, long long stride_t, long long stride_h,
                                const int* start, int T, int D, float log_theta) {
    const int b = blockIdx.z, t = blockIdx.y, h = blockIdx.x, half_d = D / 2;
    __half* row = x + b * stride_b + t * stride_t + h * stride_h;
    const float pos = float(start[b] + t);
    for (int i = threadIdx.x; i < half_d; i += blockDim.x) {
        float s, c;
        __sincosf(pos * __expf(-log_theta * (2.f * i) / D), &s, &c);
        const float a = __half2float(row[i]), z = __half2float(row[i + half_d]);
        row[i] = __float2half(a * c - z * s);
        row[i + half_d] = __float2half(a * s + z * c);
    }
}
""", "rope")

_SKINNY_MATMUL = cp.RawKernel(r"""
#include <cuda_fp16.h>
// y (M, N) = x (M, K) @ w (K, N) for M <= 16 rows (a decode step's tokens), fp32 accumulation: one
// thread per output column, x staged through shared memory. cuBLAS calls cannot be captured in a
// CUDA graph by CuPy (NotImplementedError), so the decode step's projections use this; like
// attention in decode, they are bound by reading the weights.
extern "C" __global__ void skinny_matmul(const __half* x, const __half* w, __half* y, int M, int K, int N) {
    __shared__ float xs[16][64];
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    float acc[16];
    #pragma unroll
    for (int m = 0; m < 16; ++m) acc[m] = 0.f;
    for (int k0 = 0; k0 < K; k0 += 64) {
        for (int e = threadIdx.x; e < 16 * 64; e += blockDim.x) {
            const int m = e / 64, k = k0 + e % 64;
            xs[m][e % 64] = (m < M && k < K) ? __half2float(x[m * K + k]) : 0.f;
        }
        __syncthreads();  // this chunk of x is staged
        if (n < N)
            for (int kk = 0; kk < 64 && k0 + kk < K; ++kk) {
                const float wv = __half2float(w[(long long)(k0 + kk) * N + n]);
                #pragma unroll
                for (int m = 0; m < 16; ++m) acc[m] += xs[m][kk] * wv;
            }
        __syncthreads();  // every thread is done with the chunk before the next overwrites it
    }
    if (n < N)
        for (int m = 0; m < M; ++m) y[m * N + n] = __float2half(acc[m]);
}
""", "skinny_matmul")
SKINNY_ROWS, SKINNY_THREADS = 16, 64


def matmul(x, w, out):
    """out = x @ w: the skinny kernel for a decode step's few rows (capturable), cuBLAS otherwise."""
    if x.shape[0] > SKINNY_ROWS:
        return cp.matmul(x, w, out=out)
    M, K = x.shape
    N = w.shape[1]
    _SKINNY_MATMUL((-(-N // SKINNY_THREADS),), (SKINNY_THREADS,), (x, w, out, np.int32(M), np.int32(K), np.int32(N)))
    return out


_ARGMAX = cp.RawKernel(r"""
#include <cuda_fp16.h>
// The greedy token: each row's first maximum, one block of 256 threads per row (no CUB workspace,
// which would be allocated inside the capture).
extern "C" __global__ void argmax_rows(const __half* logits, long long* out, int N) {
    __shared__ float best[256];
    __shared__ int where[256];
    const __half* row = logits + (long long)blockIdx.x * N;
    float b = -__int_as_float(0x7f800000);  // -inf
    int w = 0;
    for (int n = threadIdx.x; n < N; n += 256) {
        const float x = __half2float(row[n]);
        if (x > b) { b = x; w = n; }
    }
    best[threadIdx.x] = b;
    where[threadIdx.x] = w;
    __syncthreads();  // every thread's candidate is in shared memory
    for (int s = 128; s > 0; s /= 2) {
        if (threadIdx.x < s) {
            const float o = best[threadIdx.x + s];
            const int ow = where[threadIdx.x + s];
            if (o > best[threadIdx.x] || (o == best[threadIdx.x] && ow < where[threadIdx.x])) {
                best[threadIdx.x] = o;
                where[threadIdx.x] = ow;
            }
        }
        __syncthreads();  // this halving is done before the next reads it
    }
    if (threadIdx.x == 0) out[blockIdx.x] = where[0];
}
""", "argmax_rows")

_SUM_SQUARES = cp.ReductionKernel("T x", "float32 y", "float(x) * float(x)", "a + b", "y = a", "0", "sum_squares")
_RMS_SCALE = cp.ElementwiseKernel("T x, float32 ss, T w, int32 d", "T y",
                                  "y = T(float(x) * rsqrtf(ss / d + 1e-6f) * float(w))", "rms_scale")
_SWIGLU = cp.ElementwiseKernel("T g, T u", "T y", "y = T(float(g) / (1.f + __expf(-float(g))) * float(u))", "swiglu")
_RECORD = cp.ElementwiseKernel("int64 tok, int32 length, int32 prompt, int32 steps", "raw int64 history",
                               "history[i * steps + (length - prompt)] = tok", "record")


class Model:
    """Random weights of a Llama-style decoder: GQA attention (heads_kv < heads), RoPE, SwiGLU."""

    def __init__(self, vocab, d_model, layers, heads, heads_kv, ffn, seed=0):
        rng = cp.random.default_rng(seed)
        w = lambda *s: (rng.standard_normal(s, dtype=cp.float32) / np.sqrt(s[0])).astype(DTYPE)  # noqa: E731
        self.heads, self.heads_kv, self.head_dim = heads, heads_kv, d_model // heads
        qkv = (heads + 2 * heads_kv) * self.head_dim
        self.embed = (rng.standard_normal((vocab, d_model), dtype=cp.float32)).astype(DTYPE)
        self.layers = [dict(norm1=cp.ones(d_model, DTYPE), wqkv=w(d_model, qkv), wo=w(heads * self.head_dim, d_model),
                            norm2=cp.ones(d_model, DTYPE), w13=w(d_model, 2 * ffn), w2=w(ffn, d_model))
                       for _ in range(layers)]
        self.norm = cp.ones(d_model, DTYPE)
        self.lm_head = w(d_model, vocab)


class Step:
    """Every buffer of a forward over (batch, tokens) new tokens, allocated once; ``__call__`` runs the
    model on ``tokens`` and writes the greedy next token of each sequence to ``next_token``."""

    def __init__(self, model: Model, caches, lengths, batch, tokens, steps, prompt):
        m = model
        d_model, ffn = m.embed.shape[1], m.layers[0]["w2"].shape[0]
        n, hd = batch * tokens, m.head_dim
        self.m, self.caches, self.lengths, self.batch, self.tokens = m, caches, lengths, batch, tokens
        self.x, self.h, self.tmp = (cp.empty((n, d_model), DTYPE) for _ in range(3))
        self.ss = cp.empty((n, 1), cp.float32)
        self.qkv = cp.empty((n, (m.heads + 2 * m.heads_kv) * hd), DTYPE)
        self.attn = cp.empty((batch, tokens, m.heads, hd), DTYPE)
        self.lse = cp.empty((batch, m.heads, tokens), cp.float32)
        self.gu = cp.empty((n, 2 * ffn), DTYPE)
        self.act = cp.empty((n, ffn), DTYPE)
        self.logits = cp.empty((batch, m.embed.shape[0]), DTYPE)
        self.token_ids = cp.zeros((batch, tokens), cp.int64)
        self.next_token = cp.zeros(batch, cp.int64)
        self.history = cp.zeros((batch, steps), cp.int64)
        self.prompt, self.steps = prompt, steps
        self.workspace = cupyflash.kvcache_workspace(self.attn, caches[0][0])

    def _norm(self, x, weight, out):
        ss = self.ss[:x.shape[0]]
        _SUM_SQUARES(x, axis=1, keepdims=True, out=ss)
        _RMS_SCALE(x, ss, weight, np.int32(x.shape[1]), out)

    def __call__(self):
        m, B, T, hd = self.m, self.batch, self.tokens, self.m.head_dim
        cp.take(m.embed, self.token_ids.reshape(-1), axis=0, out=self.x)
        qkv = self.qkv.reshape(B, T, m.heads + 2 * m.heads_kv, hd)
        q, k, v = qkv[:, :, :m.heads], qkv[:, :, m.heads:m.heads + m.heads_kv], qkv[:, :, m.heads + m.heads_kv:]
        for layer, (k_cache, v_cache) in zip(m.layers, self.caches):
            self._norm(self.x, layer["norm1"], self.h)
            matmul(self.h, layer["wqkv"], self.qkv)
            for x, heads in ((q, m.heads), (k, m.heads_kv)):  # rotary embedding at positions lengths[b] + t
                strides = [s // x.itemsize for s in x.strides[:3]]
                _ROPE((heads, T, B), (32,), (x, *(np.int64(s) for s in strides), self.lengths, np.int32(T),
                                             np.int32(hd), np.float32(np.log(10000.0))))
            cupyflash.flash_attention_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=self.lengths,
                                                   causal=True, out=self.attn, lse=self.lse, workspace=self.workspace)
            matmul(self.attn.reshape(B * T, -1), layer["wo"], self.tmp)
            cp.add(self.x, self.tmp, out=self.x)
            self._norm(self.x, layer["norm2"], self.h)
            matmul(self.h, layer["w13"], self.gu)
            _SWIGLU(self.gu[:, :self.act.shape[1]], self.gu[:, self.act.shape[1]:], self.act)
            matmul(self.act, layer["w2"], self.tmp)
            cp.add(self.x, self.tmp, out=self.x)
        last = self.x.reshape(B, T, -1)[:, -1]
        self._norm(cp.ascontiguousarray(last) if T > 1 else self.x, m.norm, self.h[:B])
        matmul(self.h[:B], m.lm_head, self.logits)
        _ARGMAX((B,), (256,), (self.logits, self.next_token, np.int32(self.logits.shape[1])))
        cp.add(self.lengths, T, out=self.lengths)  # the caller advances the cache lengths (flash-attn's contract)

    def decode(self):
        """One decode step: the last token in, the next one out and recorded."""
        self.token_ids[:, 0] = self.next_token
        self()
        _RECORD(self.next_token, self.lengths, np.int32(self.prompt + 1), np.int32(self.steps), self.history)


def run(model, prompt_ids, steps, max_len, graph: bool):
    """(tokens (batch, steps), seconds of the decode loop): prefill, then ``steps`` decode steps."""
    B, P = prompt_ids.shape
    caches = [tuple(cp.zeros((B, max_len, model.heads_kv, model.head_dim), DTYPE) for _ in range(2))
              for _ in model.layers]
    lengths = cp.zeros(B, cp.int32)
    prefill = Step(model, caches, lengths, B, P, steps, P)
    prefill.token_ids[...] = prompt_ids
    prefill()
    step = Step(model, caches, lengths, B, 1, steps, P)
    step.next_token[...] = prefill.next_token
    step.decode()  # the first decode step eagerly: compiles and plans every kernel
    cp.cuda.Device().synchronize()  # before the capture stream, which does not wait for the default one
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        if graph:
            stream.begin_capture()
            step.decode()
            g = stream.end_capture()
        stream.synchronize()
        start = time.perf_counter()
        for _ in range(steps - 1):
            g.launch(stream) if graph else step.decode()
        stream.synchronize()
    return cp.asnumpy(step.history), time.perf_counter() - start


@click.command()
@click.option("--batch", default=8, show_default=True)
@click.option("--prompt", default=128, show_default=True)
@click.option("--steps", default=64, show_default=True)
@click.option("--layers", default=4, show_default=True)
@click.option("--d-model", default=1024, show_default=True)
@click.option("--heads", default=16, show_default=True)
@click.option("--heads-kv", default=4, show_default=True)
@click.option("--vocab", default=8192, show_default=True)
def main(batch, prompt, steps, layers, d_model, heads, heads_kv, vocab):
    model = Model(vocab, d_model, layers, heads, heads_kv, ffn=int(2.75 * d_model) // 64 * 64)
    prompt_ids = cp.random.default_rng(1).integers(0, vocab, (batch, prompt), dtype=cp.int64)
    max_len = prompt + steps + 1
    eager_tokens, eager_s = run(model, prompt_ids, steps, max_len, graph=False)
    graph_tokens, graph_s = run(model, prompt_ids, steps, max_len, graph=True)
    n = batch * (steps - 1)
    click.echo(f"{layers} layers, d_model {d_model}, heads {heads}/{heads_kv}, batch {batch}, prompt {prompt}: "
               f"eager {n / eager_s:.0f} tokens/s ({eager_s / (steps - 1) * 1e3:.2f} ms a step), "
               f"CUDA graph {n / graph_s:.0f} tokens/s ({graph_s / (steps - 1) * 1e3:.2f} ms a step)")
    same = np.array_equal(eager_tokens, graph_tokens)
    click.echo(f"graph tokens equal the eager tokens: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
