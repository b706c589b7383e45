// SageAttention's fused quantization kernels (one launch per tensor, three for smoothed K), matching
// attnlib.reference.sage bit for bit: delta = max|x| / 127 (IEEE division), x / delta rounded
// to nearest with ties away from zero, clamped to [-127, 127]; a block holding a non-finite value
// gets delta NaN (the reference's amax propagates NaN). Head dim and input dtype
// (0 fp16, 1 bf16, 2 fp32) are runtime arguments; tensors are bhsd views with unit last
// stride, outputs contiguous: x_int8 (B, H, S, D), delta (B, H, n_blocks) float32.
//
//   attnlib_sage_quant_q: grid (n_blocks, heads, batch). x * x_scale (softmax scale * log2 e)
//     per block of `block` tokens (128, or 32 per warp); with k_mean non-null it also writes
//     shift[row] = lse_scale * (q_row . k_mean[h / group]), the lse correction for smoothing.
//   attnlib_sage_quant_k: grid (n_blocks, heads, batch), one block of `block` tokens each; with
//     smooth != 0 it quantizes K - k_mean, k_mean (B, H, D) float32 read from global memory and
//     written before by the two launches below (SageAttention §3.2: mean over tokens per channel).
//   attnlib_sage_quant_k_stats: grid (n_blocks, heads, batch): the per-channel fp32 sum of one
//     block of K into part (B, H, n_blocks, D) float32 (a scratch buffer).
//   attnlib_sage_quant_k_reduce: grid (ceil(D / 32), heads, batch), SAGE_REDUCE_CHANNELS threads,
//     one channel per thread: part folded in block order (one add after another, the order of a
//     single thread walking the blocks; no atomics, so the result does not depend on scheduling
//     and is bit-reproducible), k_mean = sum / seq. One block per (batch, head) doing all of this
//     serially left 120 of an H100's 132 SMs idle at Wan2.1's 12 heads x 32760 tokens.
// Block: SAGE_QUANT_THREADS threads (the reduce: SAGE_REDUCE_CHANNELS). Static shared memory:
// SAGE_QUANT_MAX_DIM floats + a few (stats: SAGE_QUANT_THREADS floats).
#include "sage_ptx.cuh"

#define SAGE_QUANT_THREADS 256
#define SAGE_QUANT_MAX_DIM 256
#define SAGE_REDUCE_CHANNELS 32  // channels per reduce block, one per thread (coalesced 128-byte rows)
#define SAGE_REDUCE_UNROLL 16    // block partials loaded per step of the fold (loads in flight, not adds)

namespace {
using namespace attnlib;

// Max over the thread block (every thread gets it). red holds SAGE_QUANT_THREADS / 32 floats.
__device__ __forceinline__ float block_max(float x, float* red) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  x = warp_max(x);
  if (lane == 0) red[warp] = x;
  __syncthreads();
  float m = 0.f;
  for (int w = 0; w < SAGE_QUANT_THREADS / 32; ++w) m = fmaxf(m, red[w]);
  __syncthreads();
  return m;
}

// Quantize rows [row0, row0 + rows) of one (b, h) slice: value = (x - mean) * scale.
__device__ void quantize_block(const void* x, int kind, i64 stride_s, i64 row0, int rows, int dim, float scale,
                               const float* mean, signed char* out, float* delta_out, float* red) {
  const int n = rows * dim;
  float amax = 0.f;
  for (int i = threadIdx.x; i < n; i += SAGE_QUANT_THREADS) {
    const int r = i / dim, c = i % dim;
    const float v = (load_as_float(x, (row0 + r) * stride_s + c, kind) - (mean ? mean[c] : 0.f)) * scale;
    const float a = fabsf(v);
    amax = fmaxf(amax, a <= 3.402823466e38f ? a : __int_as_float(0x7f800000));  // NaN -> inf: fmaxf drops NaN
  }
  // A non-finite value (NaN, inf, or an overflow of the scaling) makes the block's delta NaN, as
  // the reference's amax does: the scores it enters, and every row reading them, come out NaN as
  // in exact attention, never a finite guess from clamped INT8 values.
  const float m = block_max(amax, red);
  const float delta = m <= 3.402823466e38f ? __fdiv_rn(m, 127.f) : __int_as_float(0x7fc00000);
  const float safe = delta > 0.f ? delta : 1.f;
  for (int i = threadIdx.x; i < n; i += SAGE_QUANT_THREADS) {
    const int r = i / dim, c = i % dim;
    const float v = (load_as_float(x, (row0 + r) * stride_s + c, kind) - (mean ? mean[c] : 0.f)) * scale;
    out[(row0 + r) * dim + c] = (signed char)round_half_away_i8(__fdiv_rn(v, safe));
  }
  if (threadIdx.x == 0) *delta_out = delta;
}
}  // namespace

extern "C" __global__ void __launch_bounds__(SAGE_QUANT_THREADS)
    attnlib_sage_quant_q(const void* x, signed char* x_int8, float* delta, const float* k_mean, float* shift,
                         long long stride_b, long long stride_h, long long stride_s, int seq, int heads,
                         int heads_kv, int dim, int block, int n_blocks, int kind, float x_scale, float lse_scale) {
  __shared__ float red[SAGE_QUANT_THREADS / 32];
  const int blk = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const void* xs = static_cast<const char*>(x) + (b * stride_b + h * stride_h) * (kind == 2 ? 4 : 2);
  const i64 slice = ((i64)b * heads + h);
  const i64 row0 = (i64)blk * block;
  const int rows = (int)min((i64)block, (i64)seq - row0);
  quantize_block(xs, kind, stride_s, row0, rows, dim, x_scale, nullptr, x_int8 + slice * seq * dim,
                 delta + slice * n_blocks + blk, red);
  if (k_mean != nullptr) {  // one warp per row: shift = lse_scale * (q . mean_k)
    const float* km = k_mean + ((i64)b * heads_kv + h / (heads / heads_kv)) * dim;
    for (int r = threadIdx.x / 32; r < rows; r += SAGE_QUANT_THREADS / 32) {
      float acc = 0.f;
      for (int c = threadIdx.x % 32; c < dim; c += 32) acc += load_as_float(xs, (row0 + r) * stride_s + c, kind) * km[c];
      acc = warp_sum(acc);
      if (threadIdx.x % 32 == 0) shift[slice * seq + row0 + r] = acc * lse_scale;
    }
  }
}

extern "C" __global__ void __launch_bounds__(SAGE_QUANT_THREADS)
    attnlib_sage_quant_k_stats(const void* x, float* part, long long stride_b, long long stride_h,
                               long long stride_s, int seq, int heads, int dim, int block, int n_blocks, int kind) {
  // threads split rows x channels: lanes_per_row channels side by side (coalesced), row_groups
  // rows at a time; each thread sums its rows in order, then thread c folds the groups in order
  __shared__ float acc_s[SAGE_QUANT_THREADS];
  const int blk = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const void* xs = static_cast<const char*>(x) + (b * stride_b + h * stride_h) * (kind == 2 ? 4 : 2);
  const i64 slice = ((i64)b * heads + h);
  const i64 row0 = (i64)blk * block;
  const int rows = (int)min((i64)block, (i64)seq - row0);
  const int lanes_per_row = dim < SAGE_QUANT_THREADS ? dim : SAGE_QUANT_THREADS;
  const int row_groups = SAGE_QUANT_THREADS / lanes_per_row;
  const int c = threadIdx.x % lanes_per_row, g = threadIdx.x / lanes_per_row;
  float* out = part + (slice * n_blocks + blk) * dim;
  for (int c0 = 0; c0 < dim; c0 += lanes_per_row) {
    float acc = 0.f;
    if (g < row_groups && c0 + c < dim)
      for (int r = g; r < rows; r += row_groups) acc += load_as_float(xs, (row0 + r) * stride_s + c0 + c, kind);
    acc_s[threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.x < lanes_per_row && c0 + threadIdx.x < dim) {
      float s = 0.f;
      for (int gg = 0; gg < row_groups; ++gg) s += acc_s[gg * lanes_per_row + threadIdx.x];
      out[c0 + threadIdx.x] = s;
    }
    __syncthreads();
  }
}

extern "C" __global__ void __launch_bounds__(SAGE_REDUCE_CHANNELS)
    attnlib_sage_quant_k_reduce(const float* part, float* k_mean, int seq, int heads, int dim, int n_blocks) {
  const int c = blockIdx.x * SAGE_REDUCE_CHANNELS + threadIdx.x, h = blockIdx.y, b = blockIdx.z;
  if (c >= dim) return;  // no barrier below: early exit is safe
  const i64 slice = ((i64)b * heads + h);
  const float* p = part + slice * n_blocks * dim + c;
  float acc = 0.f;
  for (int blk0 = 0; blk0 < n_blocks; blk0 += SAGE_REDUCE_UNROLL) {
    float v[SAGE_REDUCE_UNROLL];
#pragma unroll
    for (int i = 0; i < SAGE_REDUCE_UNROLL; ++i) v[i] = blk0 + i < n_blocks ? p[(i64)(blk0 + i) * dim] : 0.f;
#pragma unroll
    for (int i = 0; i < SAGE_REDUCE_UNROLL; ++i) acc += v[i];  // + 0.f past the end leaves acc as is
  }
  k_mean[slice * dim + c] = __fdiv_rn(acc, (float)seq);  // mean over the real tokens only
}

extern "C" __global__ void __launch_bounds__(SAGE_QUANT_THREADS)
    attnlib_sage_quant_k(const void* x, signed char* x_int8, float* delta, const float* k_mean,
                         long long stride_b, long long stride_h, long long stride_s, int seq, int heads, int dim,
                         int block, int n_blocks, int kind, int smooth) {
  __shared__ float red[SAGE_QUANT_THREADS / 32];
  __shared__ float mean[SAGE_QUANT_MAX_DIM];
  const int blk = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const void* xs = static_cast<const char*>(x) + (b * stride_b + h * stride_h) * (kind == 2 ? 4 : 2);
  const i64 slice = ((i64)b * heads + h);
  if (smooth) {
    for (int c = threadIdx.x; c < dim; c += SAGE_QUANT_THREADS) mean[c] = k_mean[slice * dim + c];
    __syncthreads();
  }
  const i64 row0 = (i64)blk * block;
  const int rows = (int)min((i64)block, (i64)seq - row0);
  quantize_block(xs, kind, stride_s, row0, rows, dim, 1.f, smooth ? mean : nullptr, x_int8 + slice * seq * dim,
                 delta + slice * n_blocks + blk, red);
}
