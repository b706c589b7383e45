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

  // Index i = 2a + r: this thread's accumulator row WARP_ROWS * warp + 16a + g + 8r of the tile
  // (the FlashFwdState layout).
  float inv[2 * Traits::M_ATOMS], lse[2 * Traits::M_ATOMS];
#pragma unroll
  for (int i = 0; i < 2 * Traits::M_ATOMS; ++i) {
    const float l = quad_sum(st.row_sum[i]);
    // no visible key: output 0 and lse -inf (the reference's convention)
    inv[i] = l > 0.f ? 1.f / l : 0.f;
    lse[i] = l > 0.f ? (st.row_max[i] + log2_approx(l)) * LN2 : neg_inf();
  }

  // Stage this warp's WARP_ROWS rows in its own rows of the Q tile, which only this warp has
  // read (and the main loop's last barrier ordered those reads before these writes). Thread
  // (g, t) writes columns 8n + 2t, 8n + 2t + 1 of its rows: 4 bytes into chunk n.
  u16* sO = smem;
#pragma unroll
  for (int n = 0; n < Traits::N_TILES_O; ++n) {
#pragma unroll
    for (int a = 0; a < Traits::M_ATOMS; ++a) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int i = 2 * a + r;
        const int row = warp * Traits::WARP_ROWS + a * Traits::ATOM_ROWS + g + 8 * r;
        const float* acc = st.acc_o[a * Traits::N_TILES_O + n];
        const u32 v = pack2(acc[2 * r] * inv[i], acc[2 * r + 1] * inv[i], Dtype());
        st_shared_b32(smem_addr(sO + Traits::smem_offset(row, n) + 2 * t), v);
      }
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
    for (int i = 0; i < 2 * Traits::M_ATOMS; ++i) {
      const i64 grow = (i64)m0 + warp * Traits::WARP_ROWS + g + 8 * i;  // 16a + 8r = 8i
      if (grow < p.seq_q) p.lse[((i64)b * p.heads_q + h) * p.seq_q + grow] = lse[i];
    }
  }
}

}  // namespace attnlib
