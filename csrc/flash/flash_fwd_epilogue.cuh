// Epilogue of the flash forward kernel: normalise O, write it once (16-byte stores through
// shared memory) and the log-sum-exp (float32, natural log).
#pragma once

#include "flash_fwd_traits.cuh"

namespace attnlib {

template <class Traits>
__device__ __forceinline__ void flash_fwd_epilogue(const FlashFwdParams& p, u16* smem, int b, int h, int m0,
                                                   FlashFwdState<Traits>& st) {
  using Dtype = typename Traits::Dtype;
  constexpr int CPR = Traits::CHUNKS_PER_ROW;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const float LN2 = 0.69314718055994531f;

  float inv[2], lse[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(st.row_sum[r]);
    // no visible key: output 0 and lse -inf (the reference's convention)
    inv[r] = l > 0.f ? 1.f / l : 0.f;
    lse[r] = l > 0.f ? (st.row_max[r] + log2_approx(l)) * LN2 : neg_inf();
  }

  // Stage this warp's 16 rows in its own rows of the Q tile, which only this warp has read.
  u16* sO = smem;
#pragma unroll
  for (int n = 0; n < Traits::N_TILES_O; ++n) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp * Traits::WARP_ROWS + g + 8 * r;
      const u32 v = pack2(st.acc_o[n][2 * r] * inv[r], st.acc_o[n][2 * r + 1] * inv[r], Dtype());
      st_shared_b32(smem_addr(sO + Traits::smem_offset(row, n) + 2 * t), v);
    }
  }
  __syncwarp();

  u16* go = p.o + b * p.o_stride_b + h * p.o_stride_h;
#pragma unroll
  for (int i = 0; i < Traits::WARP_ROWS * CPR / 32; ++i) {
    const int idx = lane + 32 * i;
    const int row = warp * Traits::WARP_ROWS + idx / CPR;
    const int chunk = idx % CPR;
    const i64 grow = (i64)m0 + row;
    if (grow < p.seq_q) {
      const u32x4 v = ld_shared_v4(smem_addr(sO + Traits::smem_offset(row, chunk)));
      st_global_v4(go + grow * p.o_stride_s + chunk * 8, v);
    }
  }

  if (p.lse != nullptr && t == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const i64 grow = (i64)m0 + warp * Traits::WARP_ROWS + g + 8 * r;
      if (grow < p.seq_q) p.lse[((i64)b * p.heads_q + h) * p.seq_q + grow] = lse[r];
    }
  }
}

}  // namespace attnlib
