// SageAttention forward for sm_80+ (INT8 QK^T, fp16 PV): one extern "C" entry point per
// compilation, specialised by -D defines:
//   ATTNLIB_HEAD_DIM       64 or 128
//   ATTNLIB_CAUSAL         0 or 1 (bottom-right aligned)
//   ATTNLIB_PV_F16_ACCUM   0 (fp32 accumulators) or 1 (fp16 accumulator per key block)
//   ATTNLIB_BLOCK_M        query rows per block (default 64 = 4 warps x 16 rows)
//   ATTNLIB_BLOCK_N        keys per step, = the 64-token K quantization block
// Inputs come from sage_quant.cu (int8 Q/K, per-block scales) and V in fp16; the output dtype
// is a runtime argument (0 fp16, 1 bf16, 2 fp32). Grid: (ceil(seq_q / BLOCK_M), heads_q,
// batch); dynamic shared memory Traits::SMEM_BYTES (attnlib/cuda/specs.py sage_fwd_spec).
#include "sage_fwd_epilogue.cuh"
#include "sage_fwd_mainloop_sm80.cuh"

#ifndef ATTNLIB_HEAD_DIM
#error "define ATTNLIB_HEAD_DIM (64 or 128)"
#endif
#ifndef ATTNLIB_CAUSAL
#define ATTNLIB_CAUSAL 0
#endif
#ifndef ATTNLIB_PV_F16_ACCUM
#define ATTNLIB_PV_F16_ACCUM 0
#endif
#ifndef ATTNLIB_BLOCK_M
#define ATTNLIB_BLOCK_M 64
#endif
#ifndef ATTNLIB_BLOCK_N
#define ATTNLIB_BLOCK_N 64
#endif

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "the sage kernel needs sm_80 or newer (mma.sync s8 m16n8k32, cp.async)"
#endif

namespace {
typedef attnlib::SageFwdTraitsSm80<ATTNLIB_HEAD_DIM, ATTNLIB_BLOCK_M, ATTNLIB_BLOCK_N, (ATTNLIB_CAUSAL != 0),
                                   (ATTNLIB_PV_F16_ACCUM != 0)>
    Traits;
}  // namespace

extern "C" __global__ void __launch_bounds__(Traits::NUM_THREADS)
    attnlib_sage_fwd(const signed char* q, const signed char* k, const void* v, void* o, float* lse,
                     const float* delta_q, const float* delta_k, const float* lse_shift,
                     long long v_stride_b, long long v_stride_h, long long v_stride_s,
                     long long o_stride_b, long long o_stride_h, long long o_stride_s,
                     int seq_q, int seq_k, int heads_q, int group, int q_block, int nq_blocks, int nk_blocks,
                     int out_kind) {
  using namespace attnlib;
  extern __shared__ u32x4 sage_smem[];

  require_dynamic_smem<Traits::SMEM_BYTES>();

  SageFwdParams p;
  p.q = q;
  p.k = k;
  p.v = static_cast<const u16*>(v);
  p.o = o;
  p.lse = lse;
  p.delta_q = delta_q;
  p.delta_k = delta_k;
  p.lse_shift = lse_shift;
  p.v_stride_b = v_stride_b; p.v_stride_h = v_stride_h; p.v_stride_s = v_stride_s;
  p.o_stride_b = o_stride_b; p.o_stride_h = o_stride_h; p.o_stride_s = o_stride_s;
  p.seq_q = seq_q;
  p.seq_k = seq_k;
  p.heads_q = heads_q;
  p.group = group;
  p.q_block = q_block;
  p.nq_blocks = nq_blocks;
  p.nk_blocks = nk_blocks;
  p.out_kind = out_kind;

  const int m_block = gridDim.x - 1 - blockIdx.x;  // heaviest causal tiles first
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int m0 = m_block * Traits::BLOCK_M;

  FlashFwdState<Traits> st;
  sage_fwd_mainloop_sm80<Traits>(p, reinterpret_cast<char*>(sage_smem), b, h, m0, st);
  sage_fwd_epilogue<Traits>(p, b, h, m0, st);
}
