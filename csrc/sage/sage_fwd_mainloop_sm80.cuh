// The sm_80 main loop of the sage kernel: cp.async double-buffered int8 K and fp16 V tiles,
// S = Q_int8 K_int8^T by mma.m16n8k32 (int32, exact), dequantised by one multiply with
// delta_q * delta_k inside flash's online softmax step, O += P V by mma.m16n8k16 fp16 (fp32
// accumulators, or an fp16 accumulator per key block flushed into them).
//
// ldmatrix on int8 tiles: a "b16 8x8" matrix is 8 rows x 16 bytes, and lane t receives bytes
// 4(t%4)..4(t%4)+3 of row t/4: exactly the s8 A/B fragments of m16n8k32 with the same
// matrix-to-lane addressing as the fp16 flash loop (chunks of 16 bytes instead of 8 halves).
#pragma once

#include "../flash/flash_fwd_mainloop_sm80.cuh"
#include "sage_fwd_traits.cuh"

namespace attnlib {

template <class Traits, int ROWS>
__device__ __forceinline__ void load_i8_tile_async(signed char* stile, const signed char* gtile, i64 rows_valid) {
  constexpr int CPR = Traits::I8_CHUNKS;
#pragma unroll
  for (int i = 0; i < ROWS * CPR / Traits::NUM_THREADS; ++i) {
    const int idx = threadIdx.x + i * Traits::NUM_THREADS;
    const int row = idx / CPR;
    const int chunk = idx % CPR;
    const bool valid = row < rows_valid;
    const signed char* src = valid ? gtile + row * Traits::HEAD_DIM + chunk * 16 : gtile;
    cp_async_16(smem_addr(stile + Traits::i8_offset(row, chunk)), src, valid);
  }
}

template <class Traits>
__device__ __forceinline__ void sage_pv_block(const float (&s)[Traits::N_TILES_S][4], const u16* cV,
                                              FlashFwdState<Traits>& st) {
  const int lane = threadIdx.x % 32;
  u32 acc16[Traits::N_TILES_O][2];
  if (Traits::PV_F16_ACCUM) {
#pragma unroll
    for (int n = 0; n < Traits::N_TILES_O; ++n) acc16[n][0] = acc16[n][1] = 0u;
  }
#pragma unroll
  for (int kk = 0; kk < Traits::K_STEPS_PV; ++kk) {
    u32 pf[4];
    pf[0] = pack2(s[2 * kk][0], s[2 * kk][1], DtypeFp16());
    pf[1] = pack2(s[2 * kk][2], s[2 * kk][3], DtypeFp16());
    pf[2] = pack2(s[2 * kk + 1][0], s[2 * kk + 1][1], DtypeFp16());
    pf[3] = pack2(s[2 * kk + 1][2], s[2 * kk + 1][3], DtypeFp16());
#pragma unroll
    for (int dp = 0; dp < Traits::N_TILES_O / 2; ++dp) {
      u32 vf[4];
      const int key = kk * 16 + ((lane / 8) % 2) * 8 + (lane % 8);
      const int chunk = 2 * dp + lane / 16;
      ldmatrix_x4_trans(vf, smem_addr(cV + Traits::smem_offset(key, chunk)));
      if (Traits::PV_F16_ACCUM) {
        mma_16816_f16acc(acc16[2 * dp], pf, vf[0], vf[1]);
        mma_16816_f16acc(acc16[2 * dp + 1], pf, vf[2], vf[3]);
      } else {
        mma_16816(st.acc_o[2 * dp], pf, vf[0], vf[1], DtypeFp16());
        mma_16816(st.acc_o[2 * dp + 1], pf, vf[2], vf[3], DtypeFp16());
      }
    }
  }
  if (Traits::PV_F16_ACCUM) {  // SageAttention §3.4: flush the fp16 accumulator every key block
#pragma unroll
    for (int n = 0; n < Traits::N_TILES_O; ++n) {
      float a, b, c, d;
      unpack_half2(acc16[n][0], a, b);
      unpack_half2(acc16[n][1], c, d);
      st.acc_o[n][0] += a;
      st.acc_o[n][1] += b;
      st.acc_o[n][2] += c;
      st.acc_o[n][3] += d;
    }
  }
}

template <class Traits>
__device__ __forceinline__ void sage_fwd_mainloop_sm80(const SageFwdParams& p, char* smem, int b, int h, int m0,
                                                       FlashFwdState<Traits>& st) {
  constexpr int BLOCK_M = Traits::BLOCK_M;
  constexpr int BLOCK_N = Traits::BLOCK_N;
  signed char* sQ = reinterpret_cast<signed char*>(smem);
  signed char* sK = sQ + Traits::Q8_BYTES;  // two buffers
  u16* sV = reinterpret_cast<u16*>(sK + 2 * Traits::K8_BYTES);  // two buffers
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int hk = h / p.group;

  const signed char* gq = p.q + (((i64)b * p.heads_q + h) * p.seq_q + m0) * Traits::HEAD_DIM;
  const signed char* gk = p.k + ((i64)b * (p.heads_q / p.group) + hk) * p.seq_k * Traits::HEAD_DIM;
  const u16* gv = p.v + b * p.v_stride_b + hk * p.v_stride_h;
  const float* dk = p.delta_k + ((i64)b * (p.heads_q / p.group) + hk) * p.nk_blocks;
  // this warp's rows share one delta_q (per block: 128 rows, per warp: 32 rows; warps own 16)
  const i64 warp_row = (i64)m0 + warp * Traits::WARP_ROWS;
  const int q_blk = (int)(warp_row / p.q_block);
  const float dq = warp_row < p.seq_q ? p.delta_q[((i64)b * p.heads_q + h) * p.nq_blocks + q_blk] : 0.f;

  const i64 diag = (i64)p.seq_k - p.seq_q;
  i64 n_end = p.seq_k;
  if (Traits::CAUSAL) {
    const i64 last = (i64)m0 + BLOCK_M + diag;
    n_end = last < n_end ? last : n_end;
  }
  const int n_blocks = n_end > 0 ? (int)((n_end + BLOCK_N - 1) / BLOCK_N) : 0;

#pragma unroll
  for (int n = 0; n < Traits::N_TILES_O; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) st.acc_o[n][e] = 0.f;
  }
  st.row_max[0] = st.row_max[1] = neg_inf();
  st.row_sum[0] = st.row_sum[1] = 0.f;

  load_i8_tile_async<Traits, BLOCK_M>(sQ, gq, (i64)p.seq_q - m0);
  cp_async_commit();
  if (n_blocks > 0) {
    load_i8_tile_async<Traits, BLOCK_N>(sK, gk, p.seq_k);
    load_tile_async<Traits, BLOCK_N>(sV, gv, p.v_stride_s, p.seq_k);
  }
  cp_async_commit();
  cp_async_wait<1>();
  __syncthreads();

  u32 qf[Traits::K_STEPS_QK8][4];
#pragma unroll
  for (int kk = 0; kk < Traits::K_STEPS_QK8; ++kk) {
    const int row = warp * Traits::WARP_ROWS + (lane % 16);
    const int chunk = 2 * kk + lane / 16;
    ldmatrix_x4(qf[kk], smem_addr(sQ + Traits::i8_offset(row, chunk)));
  }

  const i64 row0 = (i64)m0 + warp * Traits::WARP_ROWS + lane / 4;
  for (int nb = 0; nb < n_blocks; ++nb) {
    const int buf = nb & 1;
    if (nb + 1 < n_blocks) {
      const int n1 = (nb + 1) * BLOCK_N;
      load_i8_tile_async<Traits, BLOCK_N>(sK + (buf ^ 1) * Traits::K8_BYTES, gk + (i64)n1 * Traits::HEAD_DIM,
                                          (i64)p.seq_k - n1);
      load_tile_async<Traits, BLOCK_N>(sV + (buf ^ 1) * Traits::KV_ELEMS, gv + n1 * p.v_stride_s, p.v_stride_s,
                                       (i64)p.seq_k - n1);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const signed char* cK = sK + buf * Traits::K8_BYTES;
    const u16* cV = sV + buf * Traits::KV_ELEMS;

    int si[Traits::N_TILES_S][4];
#pragma unroll
    for (int nt = 0; nt < Traits::N_TILES_S; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) si[nt][e] = 0;
    }
#pragma unroll
    for (int kk = 0; kk < Traits::K_STEPS_QK8; ++kk) {
#pragma unroll
      for (int np = 0; np < Traits::N_TILES_S / 2; ++np) {
        u32 kf[4];
        const int key = np * 16 + (lane / 16) * 8 + (lane % 8);
        const int chunk = 2 * kk + (lane / 8) % 2;
        ldmatrix_x4(kf, smem_addr(cK + Traits::i8_offset(key, chunk)));
        mma_s8_16832(si[2 * np], qf[kk], kf[0], kf[1]);
        mma_s8_16832(si[2 * np + 1], qf[kk], kf[2], kf[3]);
      }
    }
    float s[Traits::N_TILES_S][4];
#pragma unroll
    for (int nt = 0; nt < Traits::N_TILES_S; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = (float)si[nt][e];
    }

    const int n0 = nb * BLOCK_N;
    const bool need_mask = n0 + BLOCK_N > p.seq_k || (Traits::CAUSAL && n0 + BLOCK_N - 1 > (i64)m0 + diag);
    // one multiply by delta_q * delta_k dequantises (the key tile is one 64-token K block)
    online_softmax_step<Traits>(s, st, need_mask, n0, row0, p.seq_k, diag, dq * dk[nb]);
    sage_pv_block<Traits>(s, cV, st);
    __syncthreads();
  }
  cp_async_wait<0>();
}

}  // namespace attnlib
