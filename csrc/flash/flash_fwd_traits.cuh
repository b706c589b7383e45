// Tile shapes, shared-memory layout and launch parameters of the flash forward kernel.
//
// These are shared by every main loop (the sm_80 mma.sync one today; an sm_90a wgmma/TMA one
// can reuse the parameters and the epilogue and bring its own traits).
#pragma once

#include "ptx_sm80.cuh"

namespace attnlib {

// What the host passes: bhsd views by element strides (last-dim stride is 1), lse is a dense
// (batch, heads_q, seq_q) float32 buffer or null.
struct FlashFwdParams {
  const u16* q;
  const u16* k;
  const u16* v;
  u16* o;
  float* lse;
  i64 q_stride_b, q_stride_h, q_stride_s;
  i64 k_stride_b, k_stride_h, k_stride_s;
  i64 v_stride_b, v_stride_h, v_stride_s;
  i64 o_stride_b, o_stride_h, o_stride_s;
  int seq_q, seq_k, heads_q;
  int group;          // heads_q / heads_kv: query head h reads kv head h / group
  float scale_log2;   // softmax scale * log2(e), so the softmax runs on exp2
};

// The forward entry points' arguments, gathered into FlashFwdParams (flash, block_sparse).
__device__ __forceinline__ FlashFwdParams make_flash_fwd_params(
    const void* q, const void* k, const void* v, void* o, float* lse, i64 q_stride_b, i64 q_stride_h,
    i64 q_stride_s, i64 k_stride_b, i64 k_stride_h, i64 k_stride_s, i64 v_stride_b, i64 v_stride_h,
    i64 v_stride_s, i64 o_stride_b, i64 o_stride_h, i64 o_stride_s, int seq_q, int seq_k, int heads_q,
    int group, float scale_log2) {
  FlashFwdParams p;
  p.q = static_cast<const u16*>(q);
  p.k = static_cast<const u16*>(k);
  p.v = static_cast<const u16*>(v);
  p.o = static_cast<u16*>(o);
  p.lse = lse;
  p.q_stride_b = q_stride_b; p.q_stride_h = q_stride_h; p.q_stride_s = q_stride_s;
  p.k_stride_b = k_stride_b; p.k_stride_h = k_stride_h; p.k_stride_s = k_stride_s;
  p.v_stride_b = v_stride_b; p.v_stride_h = v_stride_h; p.v_stride_s = v_stride_s;
  p.o_stride_b = o_stride_b; p.o_stride_h = o_stride_h; p.o_stride_s = o_stride_s;
  p.seq_q = seq_q;
  p.seq_k = seq_k;
  p.heads_q = heads_q;
  p.group = group;
  p.scale_log2 = scale_log2;
  return p;
}

// Traps when the host launched with less dynamic shared memory than the kernel lays out,
// rather than letting it write past its allocation.
template <int SMEM_BYTES>
__device__ __forceinline__ void require_dynamic_smem() {
  u32 dyn_smem;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn_smem));
  if (dyn_smem < (u32)SMEM_BYTES) __trap();
}

// M_ATOMS_: 16-row mma atoms per warp.
//  1: the GPU-verified kernel. Warp w owns tile rows [16w, 16w + 16) and keeps Q's fragments in
//     registers; tiles use the XOR swizzle below. Main loop: flash_fwd_mainloop_sm80_blocks.
//  2: FlashAttention-2's sm_80 tiling (4 warps x 32 rows = a 128-row tile). Warp w owns rows
//     [32w, 32w + 32), its atom a the rows [32w + 16a, 32w + 16a + 16). Each K/V fragment read
//     with ldmatrix feeds the mma of both atoms (half the shared-memory traffic per FLOP); Q is
//     re-read from shared memory at every key block (FlashAttention-2's Is_Q_in_regs = false),
//     since its 64 registers at hd128 are needed by the accumulators. Tiles use padded rows
//     (below). Main loop: flash_fwd_mainloop_sm80_atoms. Not yet run on a GPU.
template <int HEAD_DIM_, int BLOCK_M_, int BLOCK_N_, typename Dtype_, bool CAUSAL_, int M_ATOMS_ = 1>
struct FlashFwdTraitsSm80 {
  static constexpr int HEAD_DIM = HEAD_DIM_;
  static constexpr int BLOCK_M = BLOCK_M_;  // query rows per thread block
  static constexpr int BLOCK_N = BLOCK_N_;  // keys per main-loop step
  static constexpr bool CAUSAL = CAUSAL_;
  using Dtype = Dtype_;

  static constexpr int M_ATOMS = M_ATOMS_;               // 16-row mma atoms per warp
  static constexpr int ATOM_ROWS = 16;                   // rows of one mma.m16n8k16 A/C fragment
  static constexpr int WARP_ROWS = ATOM_ROWS * M_ATOMS;  // query rows each warp owns
  static constexpr int NUM_WARPS = BLOCK_M / WARP_ROWS;
  static constexpr int NUM_THREADS = NUM_WARPS * 32;
  static constexpr int CHUNKS_PER_ROW = HEAD_DIM / 8;  // 16-byte chunks of one row
  static constexpr int N_TILES_S = BLOCK_N / 8;        // mma N tiles of S = Q K^T (per atom)
  static constexpr int K_STEPS_QK = HEAD_DIM / 16;     // mma K steps of Q K^T
  static constexpr int K_STEPS_PV = BLOCK_N / 16;      // mma K steps of P V
  static constexpr int N_TILES_O = HEAD_DIM / 8;       // mma N tiles of O (per atom)

  static_assert(M_ATOMS == 1 || M_ATOMS == 2, "one or two 16-row atoms per warp");
  static_assert(HEAD_DIM == 64 || HEAD_DIM == 128, "head dim 64 or 128");
  static_assert(BLOCK_M % WARP_ROWS == 0 && NUM_WARPS >= 1, "BLOCK_M is a multiple of 16 * M_ATOMS");
  static_assert(BLOCK_N % 16 == 0, "BLOCK_N is a multiple of 16");
  static_assert(CHUNKS_PER_ROW % 8 == 0, "the XOR swizzle needs rows of 8k 16-byte chunks");
  static_assert((BLOCK_M * CHUNKS_PER_ROW) % NUM_THREADS == 0, "Q tile splits evenly over threads");
  static_assert((BLOCK_N * CHUNKS_PER_ROW) % NUM_THREADS == 0, "K/V tile splits evenly over threads");

  // Shared-memory rows: HEAD_DIM elements, XOR-swizzled (one atom), or HEAD_DIM + 8 elements
  // in order (two atoms). Padding by one 16-byte chunk puts row r's chunk c in 4-bank group
  // (r * (CHUNKS_PER_ROW + 1) + c) % 8 = (r + c) % 8, so the 8 rows of an ldmatrix phase still
  // hit 8 different groups, and every address is row * ROW_ELEMS + 8 * chunk: a per-thread base
  // plus compile-time constants (ldmatrix/cp.async immediates), where the swizzle needs one
  // register per XOR pattern. The two-atom kernel sits at the 255-register limit; that is where
  // those registers went.
  static constexpr bool PADDED_ROWS = M_ATOMS > 1;
  static constexpr int ROW_ELEMS = HEAD_DIM + (PADDED_ROWS ? 8 : 0);

  // Shared memory, in 16-bit elements: Q, then K[2], then V[2] (double-buffered).
  static constexpr int Q_ELEMS = BLOCK_M * ROW_ELEMS;
  static constexpr int KV_ELEMS = BLOCK_N * ROW_ELEMS;
  static constexpr int SMEM_BYTES = 2 * (Q_ELEMS + 4 * KV_ELEMS);

  // Element offset of (row, 16-byte chunk) in a tile. Swizzled rows: the chunk index is XORed
  // with row % 8 so that the 8 row addresses of one ldmatrix phase (8 consecutive rows, one
  // logical chunk) land in 8 different 4-bank groups: rows are 128 or 256 bytes, which would
  // otherwise put them all in the same banks.
  static __device__ __forceinline__ int smem_offset(int row, int chunk) {
    if constexpr (PADDED_ROWS) {
      return row * ROW_ELEMS + (chunk << 3);
    } else {
      return row * HEAD_DIM + ((chunk ^ (row & 7)) << 3);
    }
  }
};

}  // namespace attnlib

namespace attnlib {

// Per-thread registers the main loop hands to the epilogue, for a warp of M_ATOMS 16-row atoms.
// Thread (warp w, lane t), g = t / 4, q = t % 4, holds for atom a (0 <= a < M_ATOMS) the mma
// accumulator rows r0(a) = WARP_ROWS * w + 16a + g and r0(a) + 8 of the tile:
//   acc_o[a * N_TILES_O + n][0..1] = row r0(a),     columns 8n + 2q + {0, 1}
//   acc_o[a * N_TILES_O + n][2..3] = row r0(a) + 8, the same columns
//   row_max[2a + r], row_sum[2a + r] = row r0(a) + 8r
// The four threads of a quad (same g) share rows and split the columns; a quad_sum/quad_max
// over them gives the whole row. At M_ATOMS = 1 this is the layout the sage kernel (csrc/sage)
// also uses: acc_o[n][..], row_max[0..1], row_sum[0..1].
template <class Traits>
struct FlashFwdState {
  float acc_o[Traits::M_ATOMS * Traits::N_TILES_O][4];
  float row_max[2 * Traits::M_ATOMS];  // running max of the scaled scores (log2 domain)
  float row_sum[2 * Traits::M_ATOMS];  // this thread's share of sum exp2(s - row_max); quad-reduced at the end
};

}  // namespace attnlib
