// Block-sparse attention forward for sm_80+ (fp16/bf16, head dim 64/128): the flash forward's
// main loop (csrc/flash) walking the key blocks a row index form lists instead of every block.
// Defines as csrc/flash/flash_fwd.cu (ATTNLIB_HEAD_DIM, ATTNLIB_BF16, ATTNLIB_CAUSAL,
// ATTNLIB_BLOCK_M, ATTNLIB_BLOCK_N); the mask's block size is (BLOCK_M, BLOCK_N).
// kv_num (B|1, H|1, Mq) and kv_idx (B|1, H|1, Mq, Mk) int32, by element strides (0 where
// broadcast); listed key blocks ascending. Grid (Mq, heads_q, batch), BLOCK_M / 16 warps,
// dynamic shared memory Traits::SMEM_BYTES. A row with nothing listed gets 0 and lse -inf.
#include "flash/flash_fwd_epilogue.cuh"
#include "flash/flash_fwd_mainloop_sm80.cuh"
#include "flash/flash_fwd_traits.cuh"

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

namespace {
#if ATTNLIB_BF16
typedef attnlib::DtypeBf16 FlashDtype;
#else
typedef attnlib::DtypeFp16 FlashDtype;
#endif
typedef attnlib::FlashFwdTraitsSm80<ATTNLIB_HEAD_DIM, ATTNLIB_BLOCK_M, ATTNLIB_BLOCK_N, FlashDtype,
                                    (ATTNLIB_CAUSAL != 0)>
    Traits;

// The listed key blocks of one query block, as the flash main loop's KeyBlocks.
struct ListedKeyBlocks {
  static constexpr bool kDense = false;
  const int* idx;
  int n;
  __device__ __forceinline__ int count(const attnlib::FlashFwdParams&, int, attnlib::i64) const { return n; }
  __device__ __forceinline__ int start(int nb) const { return idx[nb] * Traits::BLOCK_N; }
};
}  // namespace

extern "C" __global__ void __launch_bounds__(Traits::NUM_THREADS)
    attnlib_block_sparse_fwd(const void* q, const void* k, const void* v, void* o, float* lse,
                             const int* kv_num, const int* kv_idx,
                             long long q_stride_b, long long q_stride_h, long long q_stride_s,
                             long long k_stride_b, long long k_stride_h, long long k_stride_s,
                             long long v_stride_b, long long v_stride_h, long long v_stride_s,
                             long long o_stride_b, long long o_stride_h, long long o_stride_s,
                             long long num_stride_b, long long num_stride_h, long long num_stride_m,
                             long long idx_stride_b, long long idx_stride_h, long long idx_stride_m,
                             int seq_q, int seq_k, int heads_q, int group, float scale_log2) {
  using namespace attnlib;
  extern __shared__ u32x4 flash_smem[];

  require_dynamic_smem<Traits::SMEM_BYTES>();
  const FlashFwdParams p = make_flash_fwd_params(
      q, k, v, o, lse, q_stride_b, q_stride_h, q_stride_s, k_stride_b, k_stride_h, k_stride_s, v_stride_b,
      v_stride_h, v_stride_s, o_stride_b, o_stride_h, o_stride_s, seq_q, seq_k, heads_q, group, scale_log2);

  const int m_block = blockIdx.x;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int m0 = m_block * Traits::BLOCK_M;

  ListedKeyBlocks blocks;
  blocks.idx = kv_idx + b * idx_stride_b + h * idx_stride_h + m_block * idx_stride_m;
  int n = kv_num[b * num_stride_b + h * num_stride_h + m_block * num_stride_m];
  if (Traits::CAUSAL) {
    // listed blocks are ascending: drop the suffix past the last key the tile's bottom row sees
    const long long last = (long long)m0 + Traits::BLOCK_M - 1 + ((long long)seq_k - seq_q);
    while (n > 0 && (long long)blocks.idx[n - 1] * Traits::BLOCK_N > last) --n;
  }
  blocks.n = n;

  u16* smem = reinterpret_cast<u16*>(flash_smem);
  FlashFwdState<Traits> st;
  flash_fwd_mainloop_sm80_blocks<Traits>(p, smem, b, h, m0, st, blocks);
  flash_fwd_epilogue<Traits>(p, smem, b, h, m0, st);
}
