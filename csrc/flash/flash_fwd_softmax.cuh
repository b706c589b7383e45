// Online softmax on mma accumulators (FlashAttention-2, Dao 2023, Alg. 1 lines 8-10).
#pragma once

#include "flash_fwd_traits.cuh"

namespace attnlib {

// Causal limit of a thread's first accumulator row (row0; its row i is row0 + 8i) in 32 bits:
// row0 + diag + 1 clamped to [-8 * rows, seq_k]. Below that range every row of the thread sees
// no key, above it every row sees all seq_k keys, exactly as with the unclamped value.
template <class Traits>
__device__ __forceinline__ int causal_limit0(i64 row0, i64 diag, int seq_k) {
  const i64 l = row0 + diag + 1;
  const i64 lo = -8 * 2 * Traits::M_ATOMS;
  return (int)(l < lo ? lo : (l > seq_k ? (i64)seq_k : l));
}

// Several 16-row atoms per warp (Traits::M_ATOMS > 1); one atom: online_softmax_step below.
//
// s[a * N_TILES_S + nt] is n-tile nt of atom a: keys n0 + 8nt + 2(t%4) + {0,1}, elements 0..1 on
// tile row row0 + 16a and 2..3 on row0 + 16a + 8, where row0 = m0 + WARP_ROWS * warp + lane / 4;
// accumulator row index i = 2a + r is tile row row0 + 8i (the FlashFwdState layout).
// causal_lim0 = causal_limit0<Traits>(row0, diag, seq_k): with CAUSAL, row i sees keys
// [0, min(causal_lim0 + 8i, seq_k)) (one 32-bit register across the key loop instead of the
// 64-bit row0 and diag).
//
// Same arithmetic as the one-atom step, ordered for the register limit (FlashAttention-2 does
// the same): masked scores become -inf in place, the max is taken over the raw scores (the
// scale is positive, and rounding is monotonic, so max(s) * scale == max(s * scale) exactly),
// and the scale is folded into the exponent, p = exp2(s * scale - max). No branch rewrites all
// of s, which at 2 atoms made the register allocator copy the 64 scores and spill. P leaves
// already rounded and packed as the A fragments of O += P V (half the registers of s):
// pf[a * K_STEPS_PV + kk] = atom a, keys n0 + 16kk + [0, 16): {s[t][0..1], s[t][2..3],
// s[t+1][0..1], s[t+1][2..3]} with t = a * N_TILES_S + 2kk, which is the m16n8k16 A layout
// (the C fragments of two neighbouring n-tiles).
template <class Traits>
__device__ __forceinline__ void online_softmax_step_atoms(float (&s)[Traits::M_ATOMS * Traits::N_TILES_S][4],
                                                          u32 (&pf)[Traits::M_ATOMS * Traits::K_STEPS_PV][4],
                                                          FlashFwdState<Traits>& st, bool need_mask, int n0,
                                                          int causal_lim0, int seq_k, float scale_log2) {
  using Dtype = typename Traits::Dtype;
  constexpr int NS = Traits::N_TILES_S;
  constexpr int ROWS = 2 * Traits::M_ATOMS;
  if (need_mask) {
    // Keys [0, limit[i]) of this thread's columns are visible to row i: kept relative to its
    // first key n0 + 2(t%4) and clamped to [0, seq_k], so the limits are 32-bit and each key
    // test compares with a constant.
    const int tig = threadIdx.x % 4;
    int limit[ROWS];
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
      i64 last = seq_k;
      if (Traits::CAUSAL) {
        const i64 l = (i64)causal_lim0 + 8 * i;
        last = l < last ? l : last;
      }
      last -= n0 + 2 * tig;
      limit[i] = last < 0 ? 0 : (int)last;
    }
#pragma unroll
    for (int a = 0; a < Traits::M_ATOMS; ++a) {
#pragma unroll
      for (int nt = 0; nt < NS; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = nt * 8 + (e & 1);  // relative to n0 + 2(t%4)
          if (!(key < limit[2 * a + (e >> 1)])) s[a * NS + nt][e] = neg_inf();
        }
      }
    }
  }

  float mx[ROWS];  // raw block max per row
#pragma unroll
  for (int i = 0; i < ROWS; ++i) mx[i] = neg_inf();
#pragma unroll
  for (int a = 0; a < Traits::M_ATOMS; ++a) {
#pragma unroll
    for (int nt = 0; nt < NS; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) mx[2 * a + (e >> 1)] = fmaxf(mx[2 * a + (e >> 1)], s[a * NS + nt][e]);
    }
  }
  float m_use[ROWS];
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    const int a = i / 2, r = i % 2;
    // running max in the log2 domain (-inf * scale stays -inf); the 4 threads of a quad share rows
    const float m_new = fmaxf(st.row_max[i], quad_max(mx[i]) * scale_log2);
    m_use[i] = m_new == neg_inf() ? 0.f : m_new;
    const float alpha = exp2_approx(st.row_max[i] - m_use[i]);
    st.row_max[i] = m_new;
    st.row_sum[i] *= alpha;
#pragma unroll
    for (int n = 0; n < Traits::N_TILES_O; ++n) {
      st.acc_o[a * Traits::N_TILES_O + n][2 * r] *= alpha;
      st.acc_o[a * Traits::N_TILES_O + n][2 * r + 1] *= alpha;
    }
  }
#pragma unroll
  for (int a = 0; a < Traits::M_ATOMS; ++a) {
#pragma unroll
    for (int nt = 0; nt < NS; ++nt) {
      float pv[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        pv[e] = exp2_approx(fmaf(s[a * NS + nt][e], scale_log2, -m_use[2 * a + (e >> 1)]));
        st.row_sum[2 * a + (e >> 1)] += pv[e];
      }
      u32* dst = pf[a * Traits::K_STEPS_PV + nt / 2] + 2 * (nt % 2);
      dst[0] = pack2(pv[0], pv[1], Dtype());
      dst[1] = pack2(pv[2], pv[3], Dtype());
    }
  }
}

// One key block: scale scores into the log2 domain, mask, update the running max, rescale
// O and the row sums, and turn s into p = exp2(s - max) in place.
//
// A row that has seen no visible key keeps max = -inf; it then subtracts 0 instead, so every
// exp2 gets -inf and yields 0 (never -inf - -inf = NaN), and the epilogue writes 0 and -inf.
template <class Traits>
__device__ __forceinline__ void online_softmax_step(float (&s)[Traits::N_TILES_S][4], FlashFwdState<Traits>& st,
                                                    bool need_mask, int n0, i64 row0, int seq_k, i64 diag,
                                                    float scale_log2) {
  static_assert(Traits::M_ATOMS == 1, "several atoms per warp: online_softmax_step_atoms");
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
