// Tiles of the sage attention kernel: the flash traits (warps, V tile, mma tiling of S and
// O, swizzled fp16 tiles) plus the INT8 Q and K tiles of the m16n8k32 QK^T.
#pragma once

#include "../flash/flash_fwd_softmax.cuh"
#include "../flash/flash_fwd_traits.cuh"
#include "sage_ptx.cuh"

namespace attnlib {

struct SageFwdParams {
  const signed char* q;   // int8 (B, Hq, Sq, D) contiguous
  const signed char* k;   // int8 (B, Hkv, Sk, D) contiguous
  const u16* v;           // fp16 bhsd view, unit last stride
  void* o;                // bhsd view in the output dtype
  float* lse;             // (B, Hq, Sq) or null
  const float* delta_q;   // (B, Hq, nq_blocks)
  const float* delta_k;   // (B, Hkv, nk_blocks)
  const float* lse_shift; // (B, Hq, Sq) or null: scale * (q . mean_k), undoes K smoothing in lse
  i64 v_stride_b, v_stride_h, v_stride_s;
  i64 o_stride_b, o_stride_h, o_stride_s;
  int seq_q, seq_k, heads_q, group;
  int q_block, nq_blocks, nk_blocks;  // K blocks are BLOCK_N (64) tokens
  int out_kind;                       // 0 fp16, 1 bf16, 2 fp32
};

template <int HEAD_DIM_, int BLOCK_M_, int BLOCK_N_, bool CAUSAL_, bool PV_F16_ACCUM_>
struct SageFwdTraitsSm80 : FlashFwdTraitsSm80<HEAD_DIM_, BLOCK_M_, BLOCK_N_, DtypeFp16, CAUSAL_> {
  using Base = FlashFwdTraitsSm80<HEAD_DIM_, BLOCK_M_, BLOCK_N_, DtypeFp16, CAUSAL_>;
  static constexpr bool PV_F16_ACCUM = PV_F16_ACCUM_;
  static constexpr int I8_CHUNKS = HEAD_DIM_ / 16;     // 16-byte chunks of an int8 row
  static constexpr int K_STEPS_QK8 = HEAD_DIM_ / 32;   // m16n8k32 steps of Q K^T
  static constexpr int Q8_BYTES = BLOCK_M_ * HEAD_DIM_;
  static constexpr int K8_BYTES = BLOCK_N_ * HEAD_DIM_;
  // Q int8, K int8 x 2, V fp16 x 2
  static constexpr int SMEM_BYTES = Q8_BYTES + 2 * K8_BYTES + 2 * 2 * Base::KV_ELEMS;
  static_assert((BLOCK_M_ * I8_CHUNKS) % Base::NUM_THREADS == 0, "Q tile splits evenly over threads");
  static_assert((BLOCK_N_ * I8_CHUNKS) % Base::NUM_THREADS == 0, "K tile splits evenly over threads");

  // Byte offset of (row, chunk) in an int8 tile. The 8 rows one ldmatrix phase reads (same
  // logical chunk) must hit 8 different 16-byte bank groups: 128-byte rows XOR the chunk with
  // row % 8, 64-byte rows (two rows per 128 bytes) with (row / 2) % 4.
  static __device__ __forceinline__ int i8_offset(int row, int chunk) {
    const int sw = I8_CHUNKS >= 8 ? (row & 7) : ((row >> 1) & 3);
    return row * HEAD_DIM_ + ((chunk ^ sw) << 4);
  }
};

}  // namespace attnlib
