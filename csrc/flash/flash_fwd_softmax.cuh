// Online softmax on mma accumulators (FlashAttention-2, Dao 2023, Alg. 1 lines 8-10).
#pragma once

#include "flash_fwd_traits.cuh"

namespace attnlib {

// One key block: scale scores into the log2 domain, mask, update the running max, rescale
// O and the row sums, and turn s into p = exp2(s - max) in place.
//
// A row that has seen no visible key keeps max = -inf; it then subtracts 0 instead, so every
// exp2 gets -inf and yields 0 (never -inf - -inf = NaN), and the epilogue writes 0 and -inf.
template <class Traits>
__device__ __forceinline__ void online_softmax_step(float (&s)[Traits::N_TILES_S][4], FlashFwdState<Traits>& st,
                                                    bool need_mask, int n0, i64 row0, int seq_k, i64 diag,
                                                    float scale_log2) {
  const int tig = threadIdx.x % 4;
  if (need_mask) {
    i64 limit[2];  // keys [0, limit) are visible to rows row0 and row0 + 8
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      limit[r] = seq_k;
      if (Traits::CAUSAL) {
        const i64 last = row0 + 8 * r + diag + 1;
        limit[r] = last < limit[r] ? last : limit[r];
      }
    }
#pragma unroll
    for (int nt = 0; nt < Traits::N_TILES_S; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = n0 + nt * 8 + 2 * tig + (e & 1);
        s[nt][e] = key < limit[e >> 1] ? s[nt][e] * scale_log2 : neg_inf();
      }
    }
  } else {
#pragma unroll
    for (int nt = 0; nt < Traits::N_TILES_S; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] *= scale_log2;
    }
  }

  float mx[2] = {st.row_max[0], st.row_max[1]};
#pragma unroll
  for (int nt = 0; nt < Traits::N_TILES_S; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) mx[e >> 1] = fmaxf(mx[e >> 1], s[nt][e]);
  }
  float m_use[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    mx[r] = quad_max(mx[r]);  // the 4 threads of a quad share rows
    m_use[r] = mx[r] == neg_inf() ? 0.f : mx[r];
    const float alpha = exp2_approx(st.row_max[r] - m_use[r]);
    st.row_max[r] = mx[r];
    st.row_sum[r] *= alpha;
#pragma unroll
    for (int n = 0; n < Traits::N_TILES_O; ++n) {
      st.acc_o[n][2 * r] *= alpha;
      st.acc_o[n][2 * r + 1] *= alpha;
    }
  }
#pragma unroll
  for (int nt = 0; nt < Traits::N_TILES_S; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[nt][e] = exp2_approx(s[nt][e] - m_use[e >> 1]);
      st.row_sum[e >> 1] += s[nt][e];
    }
  }
}

}  // namespace attnlib
