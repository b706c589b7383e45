// The sm_80 main loop of the flash forward kernel: cp.async double-buffered K/V tiles,
// ldmatrix fragments and mma.sync.m16n8k16 for S = Q K^T and O += P V.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"), g = lane / 4, t = lane % 4:
//   A 16x16: a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B 16x8:  b0 = (k 2t..2t+1, n g), b1 = (k 2t+8..2t+9, n g)
//   C 16x8:  c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..2t+1)
// so the S accumulators of two neighbouring n-tiles are exactly the A fragment of P.
//
// Two main loops share the key-block walk, the cp.async double buffering and the barriers:
// flash_fwd_mainloop_sm80_one_atom (Traits::M_ATOMS == 1, the GPU-verified loop, unchanged)
// and flash_fwd_mainloop_sm80_atoms (M_ATOMS > 1, each K/V fragment feeding the mma of all
// the warp's atoms). flash_fwd_mainloop_sm80_blocks picks one by the traits.
#pragma once

#include "flash_fwd_softmax.cuh"
#include "flash_fwd_traits.cuh"

namespace attnlib {

// Copy rows [0, ROWS) of a (row_stride-strided, unit last stride) tile into swizzled shared
// memory; rows >= rows_valid are zero-filled.
template <class Traits, int ROWS>
__device__ __forceinline__ void load_tile_async(u16* stile, const u16* gtile, i64 row_stride, i64 rows_valid) {
  constexpr int CPR = Traits::CHUNKS_PER_ROW;
#pragma unroll
  for (int i = 0; i < ROWS * CPR / Traits::NUM_THREADS; ++i) {
    const int idx = threadIdx.x + i * Traits::NUM_THREADS;
    const int row = idx / CPR;
    const int chunk = idx % CPR;
    const bool valid = row < rows_valid;
    const u16* src = valid ? gtile + row * row_stride + chunk * 8 : gtile;
    cp_async_16(smem_addr(stile + Traits::smem_offset(row, chunk)), src, valid);
  }
}

// The same copy with lean addressing, for the kernels at the register limit (M_ATOMS > 1).
// Thread x copies chunk x % CPR of rows x / CPR + PASS_ROWS * i (PASS_ROWS = NUM_THREADS / CPR,
// a multiple of 8, so the swizzle term row & 7 is the same for all i and the shared-memory
// addresses are one register plus constants). The global source walks down the tile one
// PASS_ROWS * row_stride step at a time through ptr_add_bytes_opaque, so the compiler keeps
// one pointer per tile instead of hoisting one 64-bit row offset per i (16 registers per tile
// at hd128, which spilled). Same bytes land in the same places as load_tile_async.
template <class Traits, int ROWS>
__device__ __forceinline__ void load_tile_async_lean(u16* stile, const u16* gtile, i64 row_stride, i64 rows_valid) {
  constexpr int CPR = Traits::CHUNKS_PER_ROW;
  constexpr int PASS_ROWS = Traits::NUM_THREADS / CPR;
  static_assert(Traits::NUM_THREADS % CPR == 0 && PASS_ROWS % 8 == 0, "a pass covers whole 8-row swizzle groups");
  // Recomputed at each call rather than held across the main loop (registers again).
  const int tid = thread_index_volatile();
  const int row = tid / CPR;
  const int chunk = tid % CPR;
  const i64 rows_left = rows_valid - row;  // pass i is valid when PASS_ROWS * i < rows_left
  const u32 dst = smem_addr(stile + Traits::smem_offset(row, chunk));
  const void* src = gtile + row * row_stride + chunk * 8;
  const i64 step_bytes = (i64)PASS_ROWS * row_stride * 2;
#pragma unroll
  for (int i = 0; i < ROWS / PASS_ROWS; ++i) {
    const bool valid = PASS_ROWS * i < rows_left;
    // row + PASS_ROWS * i: the same swizzle/padding position, PASS_ROWS rows further down
    cp_async_16(dst + 2 * Traits::smem_offset(PASS_ROWS * i, 0), valid ? src : gtile, valid);
    if (i + 1 < ROWS / PASS_ROWS) src = ptr_add_bytes_opaque(src, step_bytes);
  }
}

// The key blocks a main loop visits, in order: count(p, m0, diag) steps, step nb starting at
// key start(nb). Dense flash visits every block the tile can see; block_sparse
// (csrc/block_sparse) passes a list.
template <class Traits>
struct DenseKeyBlocks {
  // The main loop spells out dense offsets (nb * BLOCK_N) where kDense is set: so the dense
  // flash kernels compile to the same cubins as the GPU-verified loop before block_sparse shared
  // it (checked byte for byte, nvcc 13.0 sm_90). Going through start() changed register
  // allocation at the 255 limit: 32 bytes of spills in the hd128 causal kernel.
  static constexpr bool kDense = true;
  // Bottom-right causal: query i sees keys j <= i + diag; key blocks past the last one the
  // tile's bottom row can see are never loaded.
  __device__ __forceinline__ int count(const FlashFwdParams& p, int m0, i64 diag) const {
    i64 n_end = p.seq_k;
    if (Traits::CAUSAL) {
      const i64 last = (i64)m0 + Traits::BLOCK_M + diag;
      n_end = last < n_end ? last : n_end;
    }
    return n_end > 0 ? (int)((n_end + Traits::BLOCK_N - 1) / Traits::BLOCK_N) : 0;
  }
  __device__ __forceinline__ int start(int nb) const { return nb * Traits::BLOCK_N; }
};

// Runs the key blocks `blocks` lists (all visible to this query tile, ascending) and leaves O
// (unnormalised), the row max and the row sums in st. smem holds Traits::SMEM_BYTES; on return
// the Q tile's rows of warp w are free for warp w (the epilogue stages O there).
template <class Traits, class KeyBlocks>
__device__ __forceinline__ void flash_fwd_mainloop_sm80_one_atom(const FlashFwdParams& p, u16* smem, int b, int h,
                                                                 int m0, FlashFwdState<Traits>& st,
                                                                 const KeyBlocks& blocks) {
  static_assert(Traits::M_ATOMS == 1, "one 16-row atom per warp");
  using Dtype = typename Traits::Dtype;
  constexpr int BLOCK_M = Traits::BLOCK_M;
  constexpr int BLOCK_N = Traits::BLOCK_N;
  u16* sQ = smem;
  u16* sK = sQ + Traits::Q_ELEMS;             // two buffers
  u16* sV = sK + 2 * Traits::KV_ELEMS;        // two buffers
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int hk = h / p.group;

  const u16* gq = p.q + b * p.q_stride_b + h * p.q_stride_h + m0 * p.q_stride_s;
  const u16* gk = p.k + b * p.k_stride_b + hk * p.k_stride_h;
  const u16* gv = p.v + b * p.v_stride_b + hk * p.v_stride_h;

  const i64 diag = (i64)p.seq_k - p.seq_q;
  const int n_blocks = blocks.count(p, m0, diag);

#pragma unroll
  for (int n = 0; n < Traits::N_TILES_O; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) st.acc_o[n][e] = 0.f;
  }
  st.row_max[0] = st.row_max[1] = neg_inf();
  st.row_sum[0] = st.row_sum[1] = 0.f;

  // Prologue: group 0 = Q, group 1 = K/V block 0 (empty when nothing is visible).
  load_tile_async<Traits, BLOCK_M>(sQ, gq, p.q_stride_s, (i64)p.seq_q - m0);
  cp_async_commit();
  if (n_blocks > 0) {
    if (KeyBlocks::kDense) {
      load_tile_async<Traits, BLOCK_N>(sK, gk, p.k_stride_s, p.seq_k);
      load_tile_async<Traits, BLOCK_N>(sV, gv, p.v_stride_s, p.seq_k);
    } else {
      const int n_first = blocks.start(0);
      load_tile_async<Traits, BLOCK_N>(sK, gk + n_first * p.k_stride_s, p.k_stride_s, (i64)p.seq_k - n_first);
      load_tile_async<Traits, BLOCK_N>(sV, gv + n_first * p.v_stride_s, p.v_stride_s, (i64)p.seq_k - n_first);
    }
  }
  cp_async_commit();
  cp_async_wait<1>();
  __syncthreads();

  // Q stays in registers for the whole loop: ldmatrix matrices 0..3 = rows +0/+8 x k +0/+8.
  u32 qf[Traits::K_STEPS_QK][4];
#pragma unroll
  for (int kk = 0; kk < Traits::K_STEPS_QK; ++kk) {
    const int row = warp * Traits::WARP_ROWS + (lane % 16);
    const int chunk = 2 * kk + lane / 16;
    ldmatrix_x4(qf[kk], smem_addr(sQ + Traits::smem_offset(row, chunk)));
  }

  const i64 row0 = (i64)m0 + warp * Traits::WARP_ROWS + lane / 4;
  for (int nb = 0; nb < n_blocks; ++nb) {
    const int buf = nb & 1;
    // Prefetch block nb + 1 into the other buffer (its readers passed the barrier that ended
    // step nb - 1), then wait for block nb only.
    if (nb + 1 < n_blocks) {
      const int n1 = KeyBlocks::kDense ? (nb + 1) * BLOCK_N : blocks.start(nb + 1);
      load_tile_async<Traits, BLOCK_N>(sK + (buf ^ 1) * Traits::KV_ELEMS, gk + n1 * p.k_stride_s, p.k_stride_s,
                                       (i64)p.seq_k - n1);
      load_tile_async<Traits, BLOCK_N>(sV + (buf ^ 1) * Traits::KV_ELEMS, gv + n1 * p.v_stride_s, p.v_stride_s,
                                       (i64)p.seq_k - n1);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const u16* cK = sK + buf * Traits::KV_ELEMS;
    const u16* cV = sV + buf * Traits::KV_ELEMS;

    // S = Q K^T. K is stored [key][d], i.e. B^T row-major: plain ldmatrix gives B fragments.
    // Matrices: 0 = keys +0..7 / d +0..7 (b0 of n-tile 2np), 1 = keys +0..7 / d +8..15 (b1),
    // 2 = keys +8..15 / d +0..7 (b0 of n-tile 2np+1), 3 = keys +8..15 / d +8..15 (b1).
    float s[Traits::N_TILES_S][4];
#pragma unroll
    for (int nt = 0; nt < Traits::N_TILES_S; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < Traits::K_STEPS_QK; ++kk) {
#pragma unroll
      for (int np = 0; np < Traits::N_TILES_S / 2; ++np) {
        u32 kf[4];
        const int key = np * 16 + (lane / 16) * 8 + (lane % 8);
        const int chunk = 2 * kk + (lane / 8) % 2;
        ldmatrix_x4(kf, smem_addr(cK + Traits::smem_offset(key, chunk)));
        mma_16816(s[2 * np], qf[kk], kf[0], kf[1], Dtype());
        mma_16816(s[2 * np + 1], qf[kk], kf[2], kf[3], Dtype());
      }
    }

    const int n0 = KeyBlocks::kDense ? nb * BLOCK_N : blocks.start(nb);
    const bool need_mask = n0 + BLOCK_N > p.seq_k || (Traits::CAUSAL && n0 + BLOCK_N - 1 > (i64)m0 + diag);
    online_softmax_step<Traits>(s, st, need_mask, n0, row0, p.seq_k, diag, p.scale_log2);

    // O += P V. V is stored [key][d] = B row-major: ldmatrix.trans gives B fragments.
    // Matrices: 0 = keys +0..7 / d +0..7 (b0 of d-tile 2dp), 1 = keys +8..15 / d +0..7 (b1),
    // 2 = keys +0..7 / d +8..15 (b0 of d-tile 2dp+1), 3 = keys +8..15 / d +8..15 (b1).
#pragma unroll
    for (int kk = 0; kk < Traits::K_STEPS_PV; ++kk) {
      u32 pf[4];
      pf[0] = pack2(s[2 * kk][0], s[2 * kk][1], Dtype());
      pf[1] = pack2(s[2 * kk][2], s[2 * kk][3], Dtype());
      pf[2] = pack2(s[2 * kk + 1][0], s[2 * kk + 1][1], Dtype());
      pf[3] = pack2(s[2 * kk + 1][2], s[2 * kk + 1][3], Dtype());
#pragma unroll
      for (int dp = 0; dp < Traits::N_TILES_O / 2; ++dp) {
        u32 vf[4];
        const int key = kk * 16 + ((lane / 8) % 2) * 8 + (lane % 8);
        const int chunk = 2 * dp + lane / 16;
        ldmatrix_x4_trans(vf, smem_addr(cV + Traits::smem_offset(key, chunk)));
        mma_16816(st.acc_o[2 * dp], pf, vf[0], vf[1], Dtype());
        mma_16816(st.acc_o[2 * dp + 1], pf, vf[2], vf[3], Dtype());
      }
    }
    __syncthreads();  // everyone is done with buffer buf before step nb + 1 refills it
  }
  cp_async_wait<0>();
}

// The main loop for Traits::M_ATOMS > 1 (FlashAttention-2's sm_80 warp tiling; see
// flash_fwd_traits.cuh). Same contract, key-block walk, double buffering and barriers as
// flash_fwd_mainloop_sm80_one_atom. Per warp and key block, with g = lane / 4, t = lane % 4 and
// rows relative to the warp's first row WARP_ROWS * warp (atom a: rows 16a + [0, 16)):
//   Q  A fragment of atom a at k step kk (d 16kk + [0, 16)): ldmatrix_x4 with lane l giving
//      row 16a + l % 16, chunk 2kk + l / 16, so matrices 0..3 = (rows +0..7, d +0..7),
//      (rows +8..15, d +0..7), (rows +0..7, d +8..15), (rows +8..15, d +8..15) = a0..a3.
//      Re-read from shared memory at every key block (not held across the loop).
//   K  B fragments of n-tiles 2np and 2np + 1 at k step kk: lane l gives key 16np + 8(l / 16)
//      + l % 8, chunk 2kk + (l / 8) % 2 -> b0, b1 of n-tile 2np, then b0, b1 of 2np + 1;
//      one load feeds 2 * M_ATOMS mma.
//   S  s[a * N_TILES_S + nt]: [0..1] = row 16a + g, keys n0 + 8nt + 2t + {0, 1}; [2..3] = row
//      16a + g + 8.
//   P  pf[a * K_STEPS_PV + kk]: the A fragment of keys n0 + 16kk + [0, 16), rounded and packed
//      by online_softmax_step_atoms.
//   V  B fragments of d-tiles 2dp and 2dp + 1 at k step kk, ldmatrix_x4_trans with lane l
//      giving key 16kk + 8((l / 8) % 2) + l % 8, chunk 2dp + l / 16 -> b0, b1 of d-tile 2dp,
//      then b0, b1 of 2dp + 1; one load feeds 2 * M_ATOMS mma.
//   O  st.acc_o[a * N_TILES_O + n] (FlashFwdState).
// Shared-memory addresses are 32-bit shared-window byte offsets; with padded rows
// (Traits::PADDED_ROWS) each operand's address is one per-thread base plus compile-time
// constants, which the compiler folds into the ldmatrix immediates.
template <class Traits, class KeyBlocks>
__device__ __forceinline__ void flash_fwd_mainloop_sm80_atoms(const FlashFwdParams& p, u16* smem, int b, int h,
                                                              int m0, FlashFwdState<Traits>& st,
                                                              const KeyBlocks& blocks) {
  using Dtype = typename Traits::Dtype;
  constexpr int BLOCK_M = Traits::BLOCK_M;
  constexpr int BLOCK_N = Traits::BLOCK_N;
  constexpr int MA = Traits::M_ATOMS;
  constexpr int NS = Traits::N_TILES_S;
  constexpr int NO = Traits::N_TILES_O;
  constexpr int ROW_BYTES = 2 * Traits::ROW_ELEMS;
  constexpr int KV_BYTES = 2 * Traits::KV_ELEMS;
  static_assert(MA > 1 && Traits::PADDED_ROWS, "the atoms loop addresses padded rows");
  u16* sQ = smem;
  u16* sK = sQ + Traits::Q_ELEMS;       // two buffers
  u16* sV = sK + 2 * Traits::KV_ELEMS;  // two buffers
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int hk = h / p.group;

  const u16* gq = p.q + b * p.q_stride_b + h * p.q_stride_h + m0 * p.q_stride_s;
  const u16* gk = p.k + b * p.k_stride_b + hk * p.k_stride_h;
  const u16* gv = p.v + b * p.v_stride_b + hk * p.v_stride_h;

  const i64 diag = (i64)p.seq_k - p.seq_q;
  const int n_blocks = blocks.count(p, m0, diag);

#pragma unroll
  for (int n = 0; n < MA * NO; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) st.acc_o[n][e] = 0.f;
  }
#pragma unroll
  for (int i = 0; i < 2 * MA; ++i) {
    st.row_max[i] = neg_inf();
    st.row_sum[i] = 0.f;
  }

  // Prologue: group 0 = Q, group 1 = K/V block 0 (empty when nothing is visible).
  load_tile_async<Traits, BLOCK_M>(sQ, gq, p.q_stride_s, (i64)p.seq_q - m0);
  cp_async_commit();
  if (n_blocks > 0) {
    const int n_first = KeyBlocks::kDense ? 0 : blocks.start(0);
    load_tile_async_lean<Traits, BLOCK_N>(sK, gk + n_first * p.k_stride_s, p.k_stride_s, (i64)p.seq_k - n_first);
    load_tile_async_lean<Traits, BLOCK_N>(sV, gv + n_first * p.v_stride_s, p.v_stride_s, (i64)p.seq_k - n_first);
  }
  cp_async_commit();

  // This thread's ldmatrix row addresses at atom 0 / n-pair 0 / k step 0 / buffer 0 (see above);
  // the rest are constant offsets: + 16 * ROW_BYTES per atom (Q), per n-pair (K) and per PV k
  // step (V), + 32 bytes (two chunks) per QK k step (Q, K) and per d-pair (V), + KV_BYTES for
  // buffer 1.
  const u32 q_addr = smem_addr(sQ) + (warp * Traits::WARP_ROWS + lane % 16) * ROW_BYTES + (lane / 16) * 16;
  const u32 k_addr = smem_addr(sK) + ((lane / 16) * 8 + lane % 8) * ROW_BYTES + ((lane / 8) % 2) * 16;
  const u32 v_addr = smem_addr(sV) + (((lane / 8) % 2) * 8 + lane % 8) * ROW_BYTES + (lane / 16) * 16;

  const i64 row0 = (i64)m0 + warp * Traits::WARP_ROWS + lane / 4;
  const int causal_lim0 = causal_limit0<Traits>(row0, diag, p.seq_k);
  for (int nb = 0; nb < n_blocks; ++nb) {
    const int buf = nb & 1;
    // Prefetch block nb + 1 into the other buffer (its readers passed the barrier that ended
    // step nb - 1), then wait for block nb (and, at nb = 0, Q) only.
    if (nb + 1 < n_blocks) {
      const int n1 = KeyBlocks::kDense ? (nb + 1) * BLOCK_N : blocks.start(nb + 1);
      load_tile_async_lean<Traits, BLOCK_N>(sK + (buf ^ 1) * Traits::KV_ELEMS, gk + n1 * p.k_stride_s,
                                            p.k_stride_s, (i64)p.seq_k - n1);
      load_tile_async_lean<Traits, BLOCK_N>(sV + (buf ^ 1) * Traits::KV_ELEMS, gv + n1 * p.v_stride_s,
                                            p.v_stride_s, (i64)p.seq_k - n1);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const u32 kb = k_addr + buf * KV_BYTES;
    const u32 vb = v_addr + buf * KV_BYTES;

    // S = Q K^T
    float s[MA * NS][4];
#pragma unroll
    for (int i = 0; i < MA * NS; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[i][e] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < Traits::K_STEPS_QK; ++kk) {
      u32 qf[MA][4];
#pragma unroll
      for (int a = 0; a < MA; ++a) ldmatrix_x4(qf[a], q_addr + a * 16 * ROW_BYTES + kk * 32);
#pragma unroll
      for (int np = 0; np < NS / 2; ++np) {
        u32 kf[4];
        ldmatrix_x4(kf, kb + np * 16 * ROW_BYTES + kk * 32);
#pragma unroll
        for (int a = 0; a < MA; ++a) {
          mma_16816(s[a * NS + 2 * np], qf[a], kf[0], kf[1], Dtype());
          mma_16816(s[a * NS + 2 * np + 1], qf[a], kf[2], kf[3], Dtype());
        }
      }
    }

    const int n0 = KeyBlocks::kDense ? nb * BLOCK_N : blocks.start(nb);
    const bool need_mask = n0 + BLOCK_N > p.seq_k || (Traits::CAUSAL && n0 + BLOCK_N - 1 > (i64)m0 + diag);
    u32 pf[MA * Traits::K_STEPS_PV][4];
    online_softmax_step_atoms<Traits>(s, pf, st, need_mask, n0, causal_lim0, p.seq_k, p.scale_log2);

    // O += P V
#pragma unroll
    for (int kk = 0; kk < Traits::K_STEPS_PV; ++kk) {
#pragma unroll
      for (int dp = 0; dp < NO / 2; ++dp) {
        u32 vf[4];
        ldmatrix_x4_trans(vf, vb + kk * 16 * ROW_BYTES + dp * 32);
#pragma unroll
        for (int a = 0; a < MA; ++a) {
          mma_16816(st.acc_o[a * NO + 2 * dp], pf[a * Traits::K_STEPS_PV + kk], vf[0], vf[1], Dtype());
          mma_16816(st.acc_o[a * NO + 2 * dp + 1], pf[a * Traits::K_STEPS_PV + kk], vf[2], vf[3], Dtype());
        }
      }
    }
    __syncthreads();  // everyone is done with buffer buf before step nb + 1 refills it
  }
  cp_async_wait<0>();
  // With no key block (causal tiles above the diagonal, seq_k == 0, an empty block list) no
  // barrier follows the Q load: the Q tile's rows of warp w are copied by threads of every warp
  // (load_tile_async), and wait_group only covers this thread's own copies, so another warp's
  // late cp.async could land on the O rows the epilogue stages there. n_blocks is uniform over
  // the block. (The one-atom loop's prologue barrier covers it there.)
  if (n_blocks == 0) __syncthreads();
}

// Runs the key blocks `blocks` lists on the main loop the traits select (see above).
template <class Traits, class KeyBlocks>
__device__ __forceinline__ void flash_fwd_mainloop_sm80_blocks(const FlashFwdParams& p, u16* smem, int b, int h,
                                                               int m0, FlashFwdState<Traits>& st,
                                                               const KeyBlocks& blocks) {
  if constexpr (Traits::M_ATOMS == 1) {
    flash_fwd_mainloop_sm80_one_atom<Traits>(p, smem, b, h, m0, st, blocks);
  } else {
    flash_fwd_mainloop_sm80_atoms<Traits>(p, smem, b, h, m0, st, blocks);
  }
}

// Dense flash: every key block the tile can see.
template <class Traits>
__device__ __forceinline__ void flash_fwd_mainloop_sm80(const FlashFwdParams& p, u16* smem, int b, int h, int m0,
                                                        FlashFwdState<Traits>& st) {
  flash_fwd_mainloop_sm80_blocks<Traits>(p, smem, b, h, m0, st, DenseKeyBlocks<Traits>{});
}

}  // namespace attnlib
