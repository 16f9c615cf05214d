// cliptune's attention kernels for short packed rows: RaggedAttention's impl = 1 (ShortAttentionKernel) and
// impl = 2 (PipeAttentionKernel: the same tiles, pipelined over several rows and heads per block; further down).
// fused_dense.cc calls them.
//
//   O = softmax(Q K^T * scale) V within each packed row      O fp16 [tokens, heads * 64]
//   Q, K, V fp16: [tokens, heads * 64] each, or one [tokens, 3 * heads * 64] tensor (RaggedAttention qkv = 1:
//   one QKV projection; the caller passes its column 0, hidden and 2 hidden as q, k, v and in_ld = 3 hidden)
//   seq_len int32 [rows]; ragged int32 [rows + 1]: where each row starts in O, in elements (token * hidden)
//   q_bias fp16 [heads * 64] or null: added to Q first (the QKV projection then runs without a bias epilogue)
//   token_rows int32 [tokens] or null: token t's Q, K and V are row token_rows[t] of q, k, v (else row t); every
//   value must be a row of q, k, v: the kernels do not check (the runtime makes the map, engine.packing_feeds; the
//   CPU build checks)
//
// Why: a stacked call of the tune holds 640 rows of 59 to 106 tokens. FlashAttention's varlen kernel in
// ONNX Runtime runs one 128 x 128 tile per (row, head), and cuDNN's ragged kernel two 64 x 128 tiles; both
// took about 6.8 ms of a 53 ms call on an H100, while reading Q, K, V and writing O once is about 2.6 ms
// at the card's memory bandwidth. Here one block of 4 warps owns one (row, head): it copies the row's Q, K
// and V (at most 128 x 64 each) into shared memory with cp.async (rows past the row's end zero-filled, so
// the tiles are rounded up to 16 tokens, not 128), and each warp takes 16-query tiles: S = Q K^T, the
// softmax and O = P V with mma.sync m16n8k16 (fp16 in, fp32 accumulation, P rounded to fp16 as
// FlashAttention does), all in registers; O goes out through shared memory in 16-byte stores.
//
// Run 9 timed the first version (fragments read with 32-bit and 16-bit shared loads, one copy group, a 2-D
// grid with rows fastest) at 5.38 ms a stacked call, about half the card's bandwidth. This one took 4.71 ms in
// run 10 (FlashAttention 6.88 in the same run): the fragments come through ldmatrix (one instruction where
// there were 4 to 12 loads and packs, V transposed on the way), V is a second copy group that arrives while
// the warps compute their first S and softmax, and blocks run heads fastest, so the blocks in flight read
// neighbouring pieces of the same tokens.
//
// Session 20 (not yet timed on a card): PipeAttentionKernel, below, for the part of those 4.71 ms that is loads and
// compute taking turns within a block.
//
// A call whose longest row is over 128 tokens runs LongAttentionKernel instead: one thread per query, an
// online softmax over the row's keys read from global memory (L2), fp32 throughout. It is there so that
// any row length works (other tasks' rows, a dev set's longest sentence), not to be fast.
//
// Limits (the caller falls back to cuDNN, or fails in one line, outside them): head size 64, sm80 or newer
// (mma.sync, cp.async).

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>

namespace {

constexpr int kHead = 64;          // the head size this kernel handles
constexpr int kMaxSeq = 128;       // the longest row
constexpr int kWarps = 4;          // per block; a warp takes 16-query tiles w, w + 4, ...
constexpr int kPipeWarps = kMaxSeq / 16;  // the pipelined kernel's block: one warp per 16-query tile
constexpr int kPitch = kHead + 8;  // shared row pitch in halves: 144 bytes, 16-byte aligned; the fragment
                                   // reads of 8 rows x 4 threads then hit 32 different banks

__device__ __forceinline__ uint32_t Pack(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// c += a (16 x 16, row major) * b (16 x 8, column major); fp16 in, fp32 accumulation
__device__ __forceinline__ void Mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// four 8 x 8 matrices of 16-bit elements from shared memory: lane l gives the address of row l % 8 of matrix
// l / 8 (16-byte aligned); register i of lane l gets row l / 4, columns 2 (l % 4) and + 1 of matrix i, or with
// .trans rows 2 (l % 4) and + 1 of column l / 4 (the lower index in the lower half)
__device__ __forceinline__ void LdMatrix(uint32_t (&r)[4], const __half* p) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

__device__ __forceinline__ void LdMatrixT(uint32_t (&r)[4], const __half* p) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

// The row of q, k and v that token t reads: token_rows[t], or t where there is no map
__device__ __forceinline__ int64_t InRow(const int32_t* __restrict__ token_rows, int64_t t) {
  return token_rows != nullptr ? static_cast<int64_t>(token_rows[t]) : t;
}

// 16 bytes global -> shared, asynchronously; bytes = 0 writes 16 zero bytes and reads nothing
__device__ __forceinline__ void CopyAsync16(__half* smem, const __half* gmem, int bytes) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}

// S = Q K^T for the 16 queries of tile qt, then the softmax's numerators (fp32, exp2 of the scaled score less
// the row's maximum; keys at n and past it give 0) in s and their row sums: l0 for row g, l1 for row g + 8.
// mma fragments: g = lane / 4 (a row of A and C, a column of B), t = lane % 4 (a pair of columns of A and C,
// a pair of rows of B); A regs {(g, 2t), (g + 8, 2t), (g, 2t + 8), (g + 8, 2t + 8)}, B regs {(2t, g),
// (2t + 8, g)}, C {(g, 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1)}; lower index in the lower half.
// Fragments through ldmatrix: lane l addresses row l % 8 (lr) of matrix l / 8 (lm).
__device__ __forceinline__ void TileScores(const __half* qs, const __half* ks, int qt, int n, int npad,
                                           float scale_log2, int lane, float (&s)[16][4], float& l0, float& l1) {
  const int t = lane & 3, lr = lane & 7, lm = lane >> 3;
  // A of Q rows 16qt.., columns 16kk..: matrices (rows +0, +8) x (columns +0, +8) -> registers a0 .. a3
  uint32_t qa[4][4];
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    LdMatrix(qa[kk], qs + (qt * 16 + lr + 8 * (lm & 1)) * kPitch + kk * 16 + 8 * (lm >> 1));
  }
#pragma unroll
  for (int nb = 0; nb < 16; ++nb) {
    s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.0f;
    if (nb * 8 < npad) {
      // B = K^T of keys 8nb..8nb+7: K's rows hold B's columns, so no transpose; matrices at columns 0, 8,
      // 16, 24 (then 32 ..) are b0, b1 of kk and b0, b1 of kk + 1
#pragma unroll
      for (int kp = 0; kp < 2; ++kp) {
        uint32_t kb[4];
        LdMatrix(kb, ks + (nb * 8 + lr) * kPitch + kp * 32 + 8 * lm);
        Mma(s[nb], qa[2 * kp], kb[0], kb[1]);
        Mma(s[nb], qa[2 * kp + 1], kb[2], kb[3]);
      }
    }
  }
  // softmax of rows g (s[.][0..1]) and g + 8 (s[.][2..3]); a row's columns are spread over a quad's 4 lanes
  float m0 = -INFINITY, m1 = -INFINITY;
#pragma unroll
  for (int nb = 0; nb < 16; ++nb) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const bool key = nb * 8 + 2 * t + e < n;
      s[nb][e] = key ? s[nb][e] * scale_log2 : -INFINITY;
      s[nb][2 + e] = key ? s[nb][2 + e] * scale_log2 : -INFINITY;
      m0 = fmaxf(m0, s[nb][e]);
      m1 = fmaxf(m1, s[nb][2 + e]);
    }
  }
#pragma unroll
  for (int x = 1; x <= 2; x <<= 1) {
    m0 = fmaxf(m0, __shfl_xor_sync(0xffffffffu, m0, x));
    m1 = fmaxf(m1, __shfl_xor_sync(0xffffffffu, m1, x));
  }
  l0 = 0.0f;
  l1 = 0.0f;
#pragma unroll
  for (int nb = 0; nb < 16; ++nb) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      s[nb][e] = exp2f(s[nb][e] - m0);
      s[nb][2 + e] = exp2f(s[nb][2 + e] - m1);
      l0 += s[nb][e];
      l1 += s[nb][2 + e];
    }
  }
#pragma unroll
  for (int x = 1; x <= 2; x <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, x);
    l1 += __shfl_xor_sync(0xffffffffu, l1, x);
  }
}

// O = P V / l for tile qt (P = s rounded to fp16), out through the tile's own rows of qs (only this warp reads
// them), then 16-byte stores of whole rows to o at base (row r of the tile at base + r * hidden)
__device__ __forceinline__ void TileOutput(const __half* vs, __half* qs, int qt, int n, int npad, int lane,
                                           const float (&s)[16][4], float l0, float l1, __half* __restrict__ o,
                                           int64_t base, int hidden) {
  const int g = lane >> 2, t = lane & 3, lr = lane & 7, lm = lane >> 3;
  // P's C fragments of key blocks 2j and 2j + 1 are the A fragment of keys 16j .. 16j + 15
  float acc[8][4];
#pragma unroll
  for (int db = 0; db < 8; ++db) acc[db][0] = acc[db][1] = acc[db][2] = acc[db][3] = 0.0f;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    if (j * 16 < npad) {
      const uint32_t pa[4] = {Pack(s[2 * j][0], s[2 * j][1]), Pack(s[2 * j][2], s[2 * j][3]),
                              Pack(s[2 * j + 1][0], s[2 * j + 1][1]), Pack(s[2 * j + 1][2], s[2 * j + 1][3])};
      // B = V of keys 16j..: transposed loads of (keys +0, +8) x (columns 16dp, 16dp + 8) are b0, b1 of
      // columns 16dp.. and b0, b1 of columns 16dp + 8..
#pragma unroll
      for (int dp = 0; dp < 4; ++dp) {
        uint32_t vb[4];
        LdMatrixT(vb, vs + (j * 16 + lr + 8 * (lm & 1)) * kPitch + dp * 16 + 8 * (lm >> 1));
        Mma(acc[2 * dp], pa, vb[0], vb[1]);
        Mma(acc[2 * dp + 1], pa, vb[2], vb[3]);
      }
    }
  }
  const float r0 = 1.0f / l0, r1 = 1.0f / l1;
  __half* orow = qs + (qt * 16 + g) * kPitch;
#pragma unroll
  for (int db = 0; db < 8; ++db) {
    *reinterpret_cast<uint32_t*>(orow + db * 8 + 2 * t) = Pack(acc[db][0] * r0, acc[db][1] * r0);
    *reinterpret_cast<uint32_t*>(orow + 8 * kPitch + db * 8 + 2 * t) = Pack(acc[db][2] * r1, acc[db][3] * r1);
  }
  __syncwarp();
#pragma unroll
  for (int i = lane; i < 16 * 8; i += 32) {
    const int r = qt * 16 + (i >> 3), c = (i & 7) * 8;
    if (r < n) {
      *reinterpret_cast<uint4*>(o + base + static_cast<int64_t>(r) * hidden + c) =
          *reinterpret_cast<const uint4*>(qs + r * kPitch + c);
    }
  }
}

// Q rows 0 .. npad - 1 of a stage += the head's query bias (fp32 sums, rounded once to fp16); every thread of the
// block takes 16-byte chunks in turn. The caller puts barriers around it.
__device__ __forceinline__ void AddQueryBias(__half* qs, const __half* __restrict__ q_bias, int64_t col, int npad,
                                             int tid, int step) {
  for (int i = tid; i < npad * 8; i += step) {
    const int r = i >> 3, c = (i & 7) * 8;
    uint4 x = *reinterpret_cast<const uint4*>(qs + r * kPitch + c);
    const uint4 b = *reinterpret_cast<const uint4*>(q_bias + col + c);
    __half2* xh = reinterpret_cast<__half2*>(&x);
    const __half2* bh = reinterpret_cast<const __half2*>(&b);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float2 xf = __half22float2(xh[e]), bf = __half22float2(bh[e]);
      xh[e] = __floats2half2_rn(xf.x + bf.x, xf.y + bf.y);
    }
    *reinterpret_cast<uint4*>(qs + r * kPitch + c) = x;
  }
}

// A row longer than the caller's longest (cap): NaN over the row's O, which the tuner refuses, not a silent
// wrong value
__device__ __forceinline__ void RowNan(__half* __restrict__ o, int64_t base, int n, int hidden, int tid, int step) {
  for (int i = tid; i < n * kHead; i += step) {
    o[base + static_cast<int64_t>(i / kHead) * hidden + i % kHead] = __float2half(NAN);
  }
}

__global__ void __launch_bounds__(kWarps * 32)
    ShortAttentionKernel(const __half* __restrict__ q, const __half* __restrict__ k, const __half* __restrict__ v,
                         int64_t in_ld, __half* __restrict__ o, const int32_t* __restrict__ seq_len,
                         const int32_t* __restrict__ ragged, int hidden, int cap, float scale_log2,
                         const int32_t* __restrict__ token_rows, const __half* __restrict__ q_bias) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __half* qs = reinterpret_cast<__half*>(smem_raw);  // [cap][kPitch] each; cap = longest row rounded up to 16
  __half* ks = qs + cap * kPitch;
  __half* vs = ks + cap * kPitch;
  // heads fastest: the blocks that run side by side read neighbouring 128-byte pieces of the same tokens
  const int heads = hidden / kHead;
  const int row = static_cast<int>(blockIdx.x / heads), head = static_cast<int>(blockIdx.x % heads);
  const int64_t base = static_cast<int64_t>(ragged[row]) + static_cast<int64_t>(head) * kHead;  // in O
  const int64_t t0 = ragged[row] / hidden, col = static_cast<int64_t>(head) * kHead;  // the row's first token
  const int n = seq_len[row];
  const int tid = threadIdx.x;
  if (n <= 0) return;
  if (n > cap) {  // the caller's longest row was wrong
    RowNan(o, base, n, hidden, tid, kWarps * 32);
    return;
  }
  const int npad = (n + 15) & ~15;
  // two copy groups: Q and K, then V, which is still arriving while the warps compute their first S and softmax
  for (int i = tid; i < npad * 8; i += kWarps * 32) {  // 8 chunks of 16 bytes per token and tensor
    const int r = i >> 3, c = (i & 7) * 8;
    const int64_t at = InRow(token_rows, t0 + (r < n ? r : 0)) * in_ld + col + c;
    const int bytes = r < n ? 16 : 0;
    CopyAsync16(qs + r * kPitch + c, q + at, bytes);
    CopyAsync16(ks + r * kPitch + c, k + at, bytes);
  }
  asm volatile("cp.async.commit_group;\n" ::);
  for (int i = tid; i < npad * 8; i += kWarps * 32) {
    const int r = i >> 3, c = (i & 7) * 8;
    CopyAsync16(vs + r * kPitch + c, v + InRow(token_rows, t0 + (r < n ? r : 0)) * in_ld + col + c, r < n ? 16 : 0);
  }
  asm volatile("cp.async.commit_group;\n" ::);
  asm volatile("cp.async.wait_group 1;\n" ::);
  __syncthreads();
  if (q_bias != nullptr) {  // the query bias (uniform over the block)
    AddQueryBias(qs, q_bias, col, npad, tid, kWarps * 32);
    __syncthreads();
  }

  const int warp = tid >> 5, lane = tid & 31;
  const int tiles = npad >> 4;
  // a fixed trip count (kMaxSeq / 16 / kWarps tiles per warp at most), so that every warp reaches the barrier
  // for V in the first pass, whether or not it has a tile there
#pragma unroll 1
  for (int pass = 0; pass < kMaxSeq / 16 / kWarps; ++pass) {
    const int qt = warp + pass * kWarps;
    const bool busy = qt < tiles;
    float s[16][4];  // S for this tile's 16 queries x up to 128 keys, 8 keys per block
    float l0 = 0.0f, l1 = 0.0f;
    if (busy) TileScores(qs, ks, qt, n, npad, scale_log2, lane, s, l0, l1);
    if (pass == 0) {  // V has arrived (every thread's copies, hence the barrier)
      asm volatile("cp.async.wait_group 0;\n" ::);
      __syncthreads();
    }
    if (busy) TileOutput(vs, qs, qt, n, npad, lane, s, l0, l1, o, base, hidden);
  }
}

// One (row, head) of the pipelined kernel: its tokens n, its first token t0, the head's first column and where
// its O rows start (base, in elements)
struct Item {
  int n;
  int64_t t0, col, base;
};

__device__ __forceinline__ Item ItemAt(int item, int heads, int hidden, const int32_t* __restrict__ seq_len,
                                       const int32_t* __restrict__ ragged) {
  const int row = item / heads, head = item % heads;
  const int32_t start = ragged[row];
  return {seq_len[row], static_cast<int64_t>(start / hidden), static_cast<int64_t>(head) * kHead,
          static_cast<int64_t>(start) + static_cast<int64_t>(head) * kHead};
}

// An item's Q, K and V rows 0 .. npad - 1 into a stage ([cap][kPitch] each), rows from n on zero-filled; nothing
// for an empty row or one over cap
__device__ __forceinline__ void LoadItem(__half* qs, int cap, const Item& it, const __half* __restrict__ q,
                                         const __half* __restrict__ k, const __half* __restrict__ v, int64_t in_ld,
                                         const int32_t* __restrict__ token_rows, int tid, int step) {
  if (it.n <= 0 || it.n > cap) return;
  __half* ks = qs + cap * kPitch;
  __half* vs = ks + cap * kPitch;
  const int npad = (it.n + 15) & ~15;
  for (int i = tid; i < npad * 8; i += step) {  // 8 chunks of 16 bytes per token and tensor
    const int r = i >> 3, c = (i & 7) * 8;
    const int64_t at = InRow(token_rows, it.t0 + (r < it.n ? r : 0)) * in_ld + it.col + c;
    const int bytes = r < it.n ? 16 : 0;
    CopyAsync16(qs + r * kPitch + c, q + at, bytes);
    CopyAsync16(ks + r * kPitch + c, k + at, bytes);
    CopyAsync16(vs + r * kPitch + c, v + at, bytes);
  }
}

// RaggedAttention's impl 2: the same tiles, softmax and fragments as ShortAttentionKernel, pipelined. A block of
// kPipeWarps warps (one per 16-query tile: a row of at most 128 tokens has at most 8) loops over the (row,
// head) items blockIdx.x, + gridDim.x, ... (heads fastest, as there), with two shared-memory stages: while the
// warps work on one item, the next item's Q, K and V are already on their way into the other stage. In
// ShortAttentionKernel a block loads its one item, waits, computes and stores, so an SM's loads stop whenever
// its blocks are all between loads (run 10: about 1.9 TB/s of Q, K, V and O, against about 3 TB/s for the
// layer norms of the same call). The grid is the number of blocks the card holds at once.
__global__ void __launch_bounds__(kPipeWarps * 32, 2)
    PipeAttentionKernel(const __half* __restrict__ q, const __half* __restrict__ k, const __half* __restrict__ v,
                        int64_t in_ld, __half* __restrict__ o, const int32_t* __restrict__ seq_len,
                        const int32_t* __restrict__ ragged, int hidden, int cap, float scale_log2, int items,
                        const int32_t* __restrict__ token_rows, const __half* __restrict__ q_bias) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __half* stages = reinterpret_cast<__half*>(smem_raw);  // 2 stages of Q, K, V [cap][kPitch]
  const int stage = 3 * cap * kPitch;
  const int heads = hidden / kHead;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  int item = static_cast<int>(blockIdx.x);
  if (item >= items) return;  // the whole block
  Item cur = ItemAt(item, heads, hidden, seq_len, ragged);
  LoadItem(stages, cap, cur, q, k, v, in_ld, token_rows, tid, kPipeWarps * 32);
  asm volatile("cp.async.commit_group;\n" ::);
  int at = 0;  // the stage holding cur
#pragma unroll 1
  for (; item < items; item += static_cast<int>(gridDim.x)) {
    const int next_item = item + static_cast<int>(gridDim.x);
    Item next{0, 0, 0, 0};
    if (next_item < items) {
      next = ItemAt(next_item, heads, hidden, seq_len, ragged);
      LoadItem(stages + (at ^ 1) * stage, cap, next, q, k, v, in_ld, token_rows, tid, kPipeWarps * 32);
    }
    asm volatile("cp.async.commit_group;\n" ::);  // possibly empty: the wait below is then the same
    asm volatile("cp.async.wait_group 1;\n" ::);   // every group but the newest: cur's copies of this thread
    __syncthreads();                               // ... and of every thread
    __half* qs = stages + at * stage;
    if (q_bias != nullptr) {  // the query bias (uniform over the block), before any warp reads Q
      if (cur.n > 0 && cur.n <= cap) AddQueryBias(qs, q_bias, cur.col, (cur.n + 15) & ~15, tid, kPipeWarps * 32);
      __syncthreads();
    }
    if (cur.n > cap) {
      RowNan(o, cur.base, cur.n, hidden, tid, kPipeWarps * 32);
    } else if (cur.n > 0) {
      const int npad = (cur.n + 15) & ~15;
      const int qt = warp;
      if (qt < (npad >> 4)) {
        float s[16][4];
        float l0, l1;
        TileScores(qs, qs + cap * kPitch, qt, cur.n, npad, scale_log2, lane, s, l0, l1);
        TileOutput(qs + 2 * cap * kPitch, qs, qt, cur.n, npad, lane, s, l0, l1, o, cur.base, hidden);
      }
    }
    __syncthreads();  // the stage is read (O's staging included) before the next pass loads into it
    cur = next;
    at ^= 1;
  }
}

// Rows over 128 tokens: one thread per query (blockIdx.z * 128 + threadIdx.x), keys in turn with an online
// softmax (running maximum m, sum l and output acc, rescaled when m grows), fp32.
__global__ void __launch_bounds__(128)
    LongAttentionKernel(const __half* __restrict__ q, const __half* __restrict__ k, const __half* __restrict__ v,
                        int64_t in_ld, __half* __restrict__ o, const int32_t* __restrict__ seq_len,
                        const int32_t* __restrict__ ragged, int hidden, float scale_log2,
                        const int32_t* __restrict__ token_rows, const __half* __restrict__ q_bias) {
  const int row = blockIdx.x, i = blockIdx.z * 128 + threadIdx.x;
  const int n = seq_len[row];
  if (i >= n) return;
  const int64_t t0 = ragged[row] / hidden, col = static_cast<int64_t>(blockIdx.y) * kHead;
  const int64_t base = static_cast<int64_t>(ragged[row]) + static_cast<int64_t>(blockIdx.y) * kHead;
  float qv[kHead], acc[kHead];
  const __half* qi = q + InRow(token_rows, t0 + i) * in_ld + col;
#pragma unroll
  for (int c = 0; c < kHead; ++c) {
    // the query bias as the projection's epilogue would add it: in fp32, rounded to fp16 once
    qv[c] = __half2float(q_bias != nullptr ? __float2half(__half2float(qi[c]) + __half2float(q_bias[col + c])) : qi[c]) *
            scale_log2;
    acc[c] = 0.0f;
  }
  float m = -INFINITY, l = 0.0f;
  for (int j = 0; j < n; ++j) {
    const int64_t at = InRow(token_rows, t0 + j) * in_ld + col;
    const __half* kj = k + at;
    const __half* vj = v + at;
    float sc = 0.0f;
#pragma unroll
    for (int c = 0; c < kHead; ++c) sc += qv[c] * __half2float(kj[c]);
    if (sc > m) {  // a new maximum: rescale what was summed
      const float r = exp2f(m - sc);
      l *= r;
#pragma unroll
      for (int c = 0; c < kHead; ++c) acc[c] *= r;
      m = sc;
    }
    const float p = exp2f(sc - m);
    l += p;
#pragma unroll
    for (int c = 0; c < kHead; ++c) acc[c] += p * __half2float(vj[c]);
  }
  __half* oi = o + base + static_cast<int64_t>(i) * hidden;
#pragma unroll
  for (int c = 0; c < kHead; ++c) oi[c] = __float2half(acc[c] / l);
}


constexpr int kDevices = 64;  // device ordinals the pipelined kernel's grid size is cached for

// Blocks of PipeAttentionKernel the current device holds at once with a cap of ``cap`` tokens (multiprocessors x
// blocks per multiprocessor; 0 where its two stages do not fit the device's shared memory: the caller runs
// ShortAttentionKernel). Asked once per device and cap, then cached. Queries only, no stream work: safe while a
// CUDA graph is being captured.
int PipeGrid(int cap) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kDevices) {
    cudaGetLastError();  // a failed query leaves no error for the caller's launch check
    return 0;
  }
  static std::mutex mu;
  static int limit[kDevices];                   // the shared-memory opt-in set for the kernel (0: not yet)
  static int grid[kDevices][kMaxSeq / 16 + 1];  // 0: not asked yet; -1: does not fit (kept: impl 1 runs then)
  std::lock_guard<std::mutex> lock(mu);
  if (limit[dev] == 0) {  // once per device, the most any cap needs (the attribute is the launch's ceiling)
    int optin = 0;
    const int want = std::min(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) ==
                                      cudaSuccess
                                  ? optin
                                  : 0,
                              2 * 3 * kMaxSeq * kPitch * static_cast<int>(sizeof(__half)));
    // the carveout: a hint that the SM's unified memory go to shared memory (two blocks of two stages each)
    // cudaGetLastError only after a call of ours failed: it also clears an error left by someone else's launch
    bool failed = false;
    if (want > 0) {
      failed = cudaFuncSetAttribute(PipeAttentionKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, want) !=
                   cudaSuccess ||
               cudaFuncSetAttribute(PipeAttentionKernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                    cudaSharedmemCarveoutMaxShared) != cudaSuccess;
      if (failed) cudaGetLastError();
    }
    limit[dev] = want > 0 && !failed ? want : -1;
  }
  int& g = grid[dev][cap / 16];
  if (g == 0) {
    const int bytes = 2 * 3 * cap * kPitch * static_cast<int>(sizeof(__half));
    int sms = 0, per_sm = 0;
    bool failed = false;
    if (bytes <= limit[dev]) {
      failed = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
               cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, PipeAttentionKernel, kPipeWarps * 32, bytes) !=
                   cudaSuccess;
      if (failed) cudaGetLastError();
    }
    g = !failed && per_sm > 0 && sms > 0 ? per_sm * sms : -1;
  }
  return g > 0 ? g : 0;
}

// ShortAttentionKernel's opt-in to over 48 KB of dynamic shared memory (rows over 112 tokens), once per device (the
// attribute belongs to the device's context)
void ShortOptIn() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kDevices) {
    cudaGetLastError();
    return;
  }
  static std::mutex mu;
  static bool done[kDevices];
  std::lock_guard<std::mutex> lock(mu);
  if (done[dev]) return;
  done[dev] = true;
  if (cudaFuncSetAttribute(ShortAttentionKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           3 * kMaxSeq * kPitch * static_cast<int>(sizeof(__half))) != cudaSuccess) {
    cudaGetLastError();  // a launch over 48 KB then fails and says so
  }
}

}  // namespace

// 0: launched; 1: a shape these kernels do not handle (head size other than 64: hidden not heads * 64);
// 2: the launch failed (its error left pending: the caller's cudaGetLastError says why). in_ld: the row stride
// of Q, K and V in elements (hidden, or 3 hidden for one QKV tensor); O's is hidden. token_rows: null, or int32
// [tokens] (token t reads row token_rows[t] of q, k and v). q_bias: null, or fp16 [hidden], added to Q first
// (16-byte aligned). pipelined = 1 (RaggedAttention impl 2):
// PipeAttentionKernel for rows of at most 128 tokens, where the card's shared memory holds its two stages (else
// ShortAttentionKernel).
extern "C" int cliptune_short_attention(const void* q, const void* k, const void* v, int64_t in_ld, void* o,
                                        const int32_t* seq_len, const int32_t* ragged, int rows, int heads,
                                        int hidden, int max_seq, float scale, int pipelined, const int32_t* token_rows,
                                        const void* q_bias, cudaStream_t stream) {
  const auto* qb = static_cast<const __half*>(q_bias);
  if (heads <= 0 || hidden != heads * kHead || heads > 65535 || in_ld < hidden) return 1;
  if (rows <= 0 || max_seq < 1) return 0;
  const float scale_log2 = scale * 1.4426950408889634f;
  if (max_seq > kMaxSeq) {
    const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(heads),
                    static_cast<unsigned>((max_seq + 127) / 128));
    LongAttentionKernel<<<grid, 128, 0, stream>>>(
        static_cast<const __half*>(q), static_cast<const __half*>(k), static_cast<const __half*>(v), in_ld,
        static_cast<__half*>(o), seq_len, ragged, hidden, scale_log2, token_rows, qb);
    return cudaPeekAtLastError() == cudaSuccess ? 0 : 2;
  }
  const int cap = (max_seq + 15) & ~15;
  if (static_cast<int64_t>(rows) * heads > 0x7fffffff) return 1;
  const int items = rows * heads;
  if (pipelined) {
    const int grid = PipeGrid(cap);
    if (grid > 0) {
      const size_t bytes = 2 * 3 * static_cast<size_t>(cap) * kPitch * sizeof(__half);
      PipeAttentionKernel<<<static_cast<unsigned>(std::min(grid, items)), kPipeWarps * 32, bytes, stream>>>(
          static_cast<const __half*>(q), static_cast<const __half*>(k), static_cast<const __half*>(v), in_ld,
          static_cast<__half*>(o), seq_len, ragged, hidden, cap, scale_log2, items, token_rows, qb);
      return cudaPeekAtLastError() == cudaSuccess ? 0 : 2;
    }
  }
  const size_t bytes = 3 * static_cast<size_t>(cap) * kPitch * sizeof(__half);
  ShortOptIn();
  ShortAttentionKernel<<<static_cast<unsigned>(items), kWarps * 32, bytes, stream>>>(
      static_cast<const __half*>(q), static_cast<const __half*>(k), static_cast<const __half*>(v), in_ld,
      static_cast<__half*>(o), seq_len, ragged, hidden, cap, scale_log2, token_rows, qb);
  return cudaPeekAtLastError() == cudaSuccess ? 0 : 2;
}
