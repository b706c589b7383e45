// PTX pieces the sage kernels add to ../flash/ptx_sm80.cuh: the INT8 mma (m16n8k32, s8 x s8
// -> s32), the fp16-accumulator mma (m16n8k16, f16 x f16 -> f16), and scalar conversions done
// without toolkit headers (NVRTC compiles these with only its own library).
#pragma once

#include "../flash/ptx_sm80.cuh"

namespace attnlib {

// D = A (16x32 s8, row) * B (32x8 s8, col) + D, exact int32 accumulation. Fragments (PTX ISA,
// "mma.m16n8k32"), g = lane / 4, t = lane % 4: a0 = (g, 4t..4t+3), a1 = (g+8, 4t..),
// a2 = (g, 16+4t..), a3 = (g+8, 16+4t..); b0 = (k 4t..4t+3, n g), b1 = (k 16+4t.., n g);
// c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..2t+1): the layout of the f32 m16n8k16 accumulator.
__device__ __forceinline__ void mma_s8_16832(int (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// D = A * B + D with two packed f16x2 accumulators (row g: d[0], row g+8: d[1]).
__device__ __forceinline__ void mma_16816_f16acc(u32 (&d)[2], const u32 (&a)[4], u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f16.f16.f16.f16 {%0, %1}, {%2, %3, %4, %5}, {%6, %7}, {%0, %1};\n"
      : "+r"(d[0]), "+r"(d[1])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float half_to_float(u16 h) {
  float f;
  asm("{ .reg .b16 t; mov.b16 t, %1; cvt.f32.f16 %0, t; }" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ float bf16_to_float(u16 h) { return __uint_as_float(((u32)h) << 16); }

// (lo, hi) floats of a packed f16x2 word.
__device__ __forceinline__ void unpack_half2(u32 v, float& lo, float& hi) {
  lo = half_to_float((u16)(v & 0xffffu));
  hi = half_to_float((u16)(v >> 16));
}

// Round to nearest, ties away from zero (attnlib.reference.sage.round_half_away), to int8.
__device__ __forceinline__ int round_half_away_i8(float y) {
  const float t = truncf(y);
  const float r = fabsf(y - t) >= 0.5f ? t + copysignf(1.f, y) : t;
  return (int)fminf(fmaxf(r, -127.f), 127.f);
}

// Input element i of a tensor of kind 0 = fp16, 1 = bf16, 2 = fp32, as float.
__device__ __forceinline__ float load_as_float(const void* base, i64 i, int kind) {
  if (kind == 2) return static_cast<const float*>(base)[i];
  const u16 h = static_cast<const u16*>(base)[i];
  return kind == 1 ? bf16_to_float(h) : half_to_float(h);
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

}  // namespace attnlib
