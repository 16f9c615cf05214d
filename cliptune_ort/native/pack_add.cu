// ai.cliptune.PackAdd's CUDA kernel (fused_dense.cc holds the op; nvcc compiles this file beside
// short_attention.cu). One pass writes the packed first-layer input of a "packed_host" graph:
//
//   Y[t] = A[b, s] + P[p, s]   where i = index[t], s = i % seq, b = (i / seq) % batch, p = i / (seq * batch)
//
// A [batch, seq, hidden] (the few-shot rows' embeddings), P [pop, seq, hidden] (the prompts at their
// positions, zeros elsewhere), index int64 [tokens]: rows of the [pop * batch * seq] flattened
// broadcast sum that are real tokens (the runtime's packed_token_index). Before this op the graph made
// the whole padded sum (an Add over [pop, batch, seq, hidden]) and then gathered the real tokens from it:
// two passes of ORT's element-wise kernels over about 140 and 93 MB for 20 candidates x the SST-2 set on
// roberta-large (the Add 0.23 ms, the Gathers 0.29 ms in 6 launches, of a 53 ms call on an H100, run 9);
// here A and P are read from cache and the packed rows are written once, 16 bytes per thread. The sum is
// __hadd2's: the same bits as ORT's float16 Add.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

namespace {

constexpr int kThreads = 256;

// The sum of two elements: 8 halves (16 bytes) as four __hadd2, or one half.
__device__ __forceinline__ uint4 Add(uint4 u, uint4 v) {
  uint4 w;
  const __half2* hu = reinterpret_cast<const __half2*>(&u);
  const __half2* hv = reinterpret_cast<const __half2*>(&v);
  __half2* hw = reinterpret_cast<__half2*>(&w);
#pragma unroll
  for (int k = 0; k < 4; ++k) hw[k] = __hadd2(hu[k], hv[k]);
  return w;
}
__device__ __forceinline__ __half Add(__half u, __half v) { return __hadd(u, v); }

// T = uint4 (hidden % 8 == 0, 16-byte aligned: width = hidden / 8 vectors a row) or __half (width = hidden);
// blockDim.x threads cover one row's width, blockDim.y rows per block
template <typename T>
__global__ void PackAdd(const T* a, const T* p, const int64_t* index, T* y, int64_t tokens, int64_t batch,
                        int64_t seq, int64_t total, int64_t width) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (t >= tokens) return;
  const int64_t i = index[t];
  T* yr = y + t * width;
  if (i < 0 || i >= total) {  // not a row of the sum (the runtime never feeds one): zeros, no stray read
    T zero;
    memset(&zero, 0, sizeof(T));
    for (int64_t c = threadIdx.x; c < width; c += blockDim.x) yr[c] = zero;
    return;
  }
  const int64_t r = i / seq, s = i - r * seq;
  const int64_t pp = r / batch, b = r - pp * batch;
  const T* ar = a + (b * seq + s) * width;
  const T* pr = p + (pp * seq + s) * width;
  for (int64_t c = threadIdx.x; c < width; c += blockDim.x) yr[c] = Add(ar[c], pr[c]);
}

}  // namespace

// 0 launched, 1 more rows than one launch covers (2^31 blocks), 2 the launch failed (cudaGetLastError says why).
// pop * batch * seq rows in the sum; an index outside them gives a row of zeros (the CPU build refuses it).
extern "C" int cliptune_pack_add(const void* a, const void* p, const int64_t* index, void* y, int64_t tokens,
                                 int64_t pop, int64_t batch, int64_t seq, int64_t hidden, cudaStream_t stream) {
  if (tokens == 0) return 0;
  const int64_t total = pop * batch * seq;
  const bool vec = hidden % 8 == 0 && reinterpret_cast<uintptr_t>(a) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(p) % 16 == 0 && reinterpret_cast<uintptr_t>(y) % 16 == 0;
  const int64_t width = vec ? hidden / 8 : hidden;
  int tx = 32;
  while (tx < width && tx < kThreads) tx *= 2;  // threads along a row: a power of two up to 256
  const int ty = kThreads / tx;                 // rows per block
  const dim3 block(tx, ty);
  const int64_t blocks = (tokens + ty - 1) / ty;
  if (blocks > INT32_MAX) return 1;
  if (vec) {
    PackAdd<<<static_cast<unsigned>(blocks), block, 0, stream>>>(
        static_cast<const uint4*>(a), static_cast<const uint4*>(p), index, static_cast<uint4*>(y), tokens, batch,
        seq, total, width);
  } else {
    PackAdd<<<static_cast<unsigned>(blocks), block, 0, stream>>>(
        static_cast<const __half*>(a), static_cast<const __half*>(p), index, static_cast<__half*>(y), tokens, batch,
        seq, total, width);
  }
  return cudaPeekAtLastError() == cudaSuccess ? 0 : 2;
}
