// FlashAttention-2 forward for sm_80+ (fp16/bf16, head dim 64/128): one extern "C" entry
// point per compilation, specialised by -D defines:
//   ATTNLIB_HEAD_DIM   64 or 128
//   ATTNLIB_BF16       0 (fp16) or 1 (bf16)
//   ATTNLIB_CAUSAL     0 or 1 (bottom-right aligned)
//   ATTNLIB_BLOCK_M    query rows per block (default 64 = 4 warps x 16 rows)
//   ATTNLIB_BLOCK_N    keys per main-loop step (default 64)
//   ATTNLIB_M_ATOMS    16-row mma atoms per warp (default 1, the GPU-verified kernel; 2 with
//                      BLOCK_M 128 = 4 warps x 32 rows, FlashAttention-2's sm_80 tiling, see
//                      flash_fwd_traits.cuh)
// Grid: (ceil(seq_q / BLOCK_M), heads_q, batch); block: BLOCK_M / (16 * M_ATOMS) warps; dynamic
// shared memory: Traits::SMEM_BYTES = 2 * ROW_ELEMS * (BLOCK_M + 4 * BLOCK_N) bytes, ROW_ELEMS =
// HEAD_DIM (+ 8 at 2 atoms), which the host computes the same way (attnlib/cuda/specs.py); a
// launch with less traps rather than corrupt.
#include "flash_fwd_epilogue.cuh"
#include "flash_fwd_mainloop_sm80.cuh"
#include "flash_fwd_traits.cuh"

#ifndef ATTNLIB_HEAD_DIM
#error "define ATTNLIB_HEAD_DIM (64 or 128)"
#endif
#ifndef ATTNLIB_BF16
#define ATTNLIB_BF16 0
#endif
#ifndef ATTNLIB_CAUSAL
#define ATTNLIB_CAUSAL 0
#endif
#ifndef ATTNLIB_BLOCK_M
#define ATTNLIB_BLOCK_M 64
#endif
#ifndef ATTNLIB_BLOCK_N
#define ATTNLIB_BLOCK_N 64
#endif
#ifndef ATTNLIB_M_ATOMS
#define ATTNLIB_M_ATOMS 1
#endif

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "the flash forward kernel needs sm_80 or newer (mma.sync bf16, cp.async)"
#endif

namespace {
#if ATTNLIB_BF16
typedef attnlib::DtypeBf16 FlashDtype;
#else
typedef attnlib::DtypeFp16 FlashDtype;
#endif
typedef attnlib::FlashFwdTraitsSm80<ATTNLIB_HEAD_DIM, ATTNLIB_BLOCK_M, ATTNLIB_BLOCK_N, FlashDtype,
                                    (ATTNLIB_CAUSAL != 0), ATTNLIB_M_ATOMS>
    Traits;
}  // namespace

extern "C" __global__ void __launch_bounds__(Traits::NUM_THREADS)
    attnlib_flash_fwd(const void* q, const void* k, const void* v, void* o, float* lse,
                      long long q_stride_b, long long q_stride_h, long long q_stride_s,
                      long long k_stride_b, long long k_stride_h, long long k_stride_s,
                      long long v_stride_b, long long v_stride_h, long long v_stride_s,
                      long long o_stride_b, long long o_stride_h, long long o_stride_s,
                      int seq_q, int seq_k, int heads_q, int group, float scale_log2) {
  using namespace attnlib;
  extern __shared__ u32x4 flash_smem[];

  require_dynamic_smem<Traits::SMEM_BYTES>();
  const FlashFwdParams p = make_flash_fwd_params(
      q, k, v, o, lse, q_stride_b, q_stride_h, q_stride_s, k_stride_b, k_stride_h, k_stride_s, v_stride_b,
      v_stride_h, v_stride_s, o_stride_b, o_stride_h, o_stride_s, seq_q, seq_k, heads_q, group, scale_log2);

  // Heaviest causal tiles (the last query rows) first, so they do not trail the grid.
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int m0 = m_block * Traits::BLOCK_M;

  u16* smem = reinterpret_cast<u16*>(flash_smem);
  FlashFwdState<Traits> st;
  flash_fwd_mainloop_sm80<Traits>(p, smem, b, h, m0, st);
  flash_fwd_epilogue<Traits>(p, smem, b, h, m0, st);
}
