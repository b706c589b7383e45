// Epilogue of the sage kernel: normalise O and store it in the output dtype (fp16, bf16 or
// fp32, two neighbouring columns per store); lse in natural log plus the smoothing shift.
#pragma once

#include "sage_fwd_traits.cuh"

namespace attnlib {

template <class Traits>
__device__ __forceinline__ void sage_fwd_epilogue(const SageFwdParams& p, int b, int h, int m0,
                                                  FlashFwdState<Traits>& st) {
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const float LN2 = 0.69314718055994531f;

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(st.row_sum[r]);
    const float inv = l > 0.f ? 1.f / l : 0.f;  // no visible key: 0 and lse -inf
    const i64 grow = (i64)m0 + warp * Traits::WARP_ROWS + g + 8 * r;
    if (grow >= p.seq_q) continue;
    const i64 elem = b * p.o_stride_b + h * p.o_stride_h + grow * p.o_stride_s;
#pragma unroll
    for (int n = 0; n < Traits::N_TILES_O; ++n) {
      const int col = n * 8 + 2 * t;
      const float lo = st.acc_o[n][2 * r] * inv, hi = st.acc_o[n][2 * r + 1] * inv;
      if (p.out_kind == 2) {
        float* o = static_cast<float*>(p.o) + elem + col;
        o[0] = lo;
        o[1] = hi;
      } else {
        u32* o = reinterpret_cast<u32*>(static_cast<u16*>(p.o) + elem + col);
        *o = p.out_kind == 1 ? pack2(lo, hi, DtypeBf16()) : pack2(lo, hi, DtypeFp16());
      }
    }
    if (p.lse != nullptr && t == 0) {
      const i64 row = ((i64)b * p.heads_q + h) * p.seq_q + grow;
      float v = l > 0.f ? (st.row_max[r] + log2_approx(l)) * LN2 : neg_inf();
      if (p.lse_shift != nullptr && l > 0.f) v += p.lse_shift[row];
      p.lse[row] = v;
    }
  }
}

}  // namespace attnlib
