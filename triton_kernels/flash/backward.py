"""FlashAttention-2 backward in Triton: D = rowsum(dO * O), a dK/dV kernel (one program per key
block and kv head, looping over the group's query heads and query blocks, so GQA gradients are
summed without atomics), and then dQ one of two ways:

- deterministic (the default): a dQ kernel, one program per query block and query head, looping
  over key blocks. It recomputes S = QK^T and dP = dO V^T, so the backward runs 7 block matmuls
  per (query block, key block) pair;
- atomic (deterministic=False and ATTNLIB_FLASH_ATOMIC_DQ=1): the dK/dV kernel also forms dQ's
  share of each pair, dS K, and adds it to an fp32 buffer with atomics (as FlashAttention-2's CUDA
  backward and FlashAttention-3 do). That is 5 matmuls a pair and one launch fewer, but the order
  of the float additions into dQ varies from run to run, so dQ may differ in its last bits
  between runs. It is opt-in because it measured slower: on an H200 (2026-11-27,
  bench/results/nvidia-h200/) forward + backward took 1.17-1.42x the deterministic path's time
  at hd64/128, 4k-32k tokens, causal or not.

An optional key bias (key_bias, the forward's: float32 (B or 1, Sk) shared by the heads, or
(B or 1, Hq or 1, Sk) per query head) enters every recomputed score; rows that saw no finite key
(lse -inf) get no gradient. Nothing N x N is stored."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..switches import atomic_dq_enabled
from . import configs
from .common import (LOG2E, Varlen, cu_pointers, dkdv_stream_block, dot_precision, dq_key_block, geometry,
                     key_bias_args, key_bias_log2, key_query_range, load_tile, padded_lse2, query_key_range,
                     seq_bounds, store_tile, strides3, strides4)
from ..hostmath import cdiv

PREPROCESS_BLOCK_M = 64


@triton.jit(do_not_specialize=["seq_q"])
def _bwd_preprocess_kernel(O, DO, DELTA, CU_Q,
                           stride_ob, stride_oh, stride_om, stride_od,
                           stride_db, stride_dh, stride_dm, stride_dd,
                           stride_lb, stride_lh, stride_lm, seq_q,
                           HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, VARLEN: tl.constexpr,
                           BLOCK_M: tl.constexpr):
    """delta[row] = sum_d dO[row, d] * O[row, d] in float32."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2)
    q_start, seq_q = seq_bounds(CU_Q, b, seq_q, VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= seq_q:
        return
    b64 = b.to(tl.int64)
    row0 = q_start + start_m
    offs_i = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    m_ok = start_m + offs_i < seq_q
    d_ok = offs_d < HEAD_DIM
    o = load_tile(O + b64 * stride_ob + h * stride_oh + row0 * stride_om
                  + offs_i[:, None] * stride_om + offs_d[None, :] * stride_od, m_ok, d_ok, True, D_PAD != HEAD_DIM)
    do = load_tile(DO + b64 * stride_db + h * stride_dh + row0 * stride_dm
                   + offs_i[:, None] * stride_dm + offs_d[None, :] * stride_dd, m_ok, d_ok, True, D_PAD != HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + b64 * stride_lb + h * stride_lh + row0 * stride_lm + offs_i * stride_lm, delta, mask=m_ok)


@triton.jit
def _dkdv_block(dk, dv, b_k, b_v, q_base, do_base, lse_base, delta_base, dq_base, tile_q, tile_do, tile_dq,
                offs_m0, offs_n, n_ok, d_ok, t, n_blocks, lo, mid, seq_q, diag, scale, qk_scale,
                stride_qh, stride_qm, stride_doh, stride_dom, stride_lh, stride_lm, stride_dqh, stride_dqm,
                key_bias2, key_bias, stride_biash, CHECK_D: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, ATOMIC_DQ: tl.constexpr, HAS_KEY_BIAS: tl.constexpr,
                BIAS_PER_HEAD: tl.constexpr):
    """Step t of the flattened (query head of the group, query block) loop of one key block; with
    ATOMIC_DQ also adds scale * dS K to the fp32 dQ buffer. key_bias2: the key block's bias in
    log2 units (read with HAS_KEY_BIAS only); with BIAS_PER_HEAD it is loaded here instead, the
    step's query head's, from key_bias (the group's first head's bias row, head stride
    stride_biash)."""
    g = t // n_blocks
    start_m = lo + (t - g * n_blocks) * BLOCK_M
    offs_m = start_m + offs_m0
    m_ok = offs_m < seq_q
    g64 = g.to(tl.int64)
    m64 = start_m.to(tl.int64)
    if BIAS_PER_HEAD:
        # loaded every step, BLOCK_N floats the pipeliner prefetches with the Q tile (at group 1
        # the same row each time). Compiled for sm_90, a copy carried across the loop and reloaded
        # only where the head changes took as many registers or more and spilled more (hd256
        # with ATOMIC_DQ: 24 bytes against 8).
        key_bias2 = key_bias_log2(key_bias + g64 * stride_biash, offs_n, n_ok, True)
    lse_off = g64 * stride_lh + offs_m * stride_lm
    dk, dv, ds_t = dkdv_stream_block(dk, dv, b_k, b_v,
                                     q_base + (g64 * stride_qh + m64 * stride_qm) + tile_q,
                                     do_base + (g64 * stride_doh + m64 * stride_dom) + tile_do,
                                     lse_base + lse_off, delta_base + lse_off, offs_m, offs_n, m_ok, d_ok,
                                     start_m < mid, diag, qk_scale, CHECK_D, CAUSAL, PREC, key_bias2, HAS_KEY_BIAS)
    if ATOMIC_DQ:
        # key rows past seq_k: K is 0 there but p need not be finite (exp2(-lse2) of a padded
        # score), so their dS is zeroed before it meets K
        ds_t = tl.where(n_ok[:, None], ds_t, 0.0)
        dq = tl.dot(tl.trans(ds_t), b_k, input_precision=PREC) * scale
        tl.atomic_add(dq_base + (g64 * stride_dqh + m64 * stride_dqm) + tile_dq, dq,
                      mask=m_ok[:, None] & d_ok[None, :], sem="relaxed")
    return dk, dv


# sequence lengths vary per call: one compiled kernel for all (no "== 1" specialisation)
@triton.jit(do_not_specialize=["seq_q", "seq_k"])
def _dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, CU_Q, CU_K, KEY_BIAS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_lb, stride_lh, stride_lm, stride_biasb, stride_biash,
    seq_q, seq_k, group, scale, qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
    PREC: tl.constexpr, ATOMIC_DQ: tl.constexpr, HAS_KEY_BIAS: tl.constexpr, BIAS_PER_HEAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (key blocks, kv heads, batch); sums over the group query heads of each kv head. With
    ATOMIC_DQ, DQ_ACC is a zeroed fp32 buffer shaped like Q that receives every dQ share. With
    HAS_KEY_BIAS, KEY_BIAS (float32, batch stride stride_biasb) is added to every score; with
    BIAS_PER_HEAD each query head has its own (head stride stride_biash, read only then: a
    head-shared bias compiles as before there was one per head)."""
    pid_n = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.program_id(2)
    q_start, seq_q = seq_bounds(CU_Q, b, seq_q, VARLEN)
    k_start, seq_k = seq_bounds(CU_K, b, seq_k, VARLEN)
    start_n = pid_n * BLOCK_N
    if start_n >= seq_k:
        return
    b64 = b.to(tl.int64)
    kvh64 = kvh.to(tl.int64)
    row0 = k_start + start_n
    offs_j = tl.arange(0, BLOCK_N)
    offs_n = start_n + offs_j
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    n_ok = offs_n < seq_k
    d_ok = offs_d < HEAD_DIM
    tile_k = offs_j[:, None] * stride_kn + offs_d[None, :] * stride_kd
    b_k = load_tile(K + b64 * stride_kb + kvh64 * stride_kh + row0 * stride_kn + tile_k,
                    n_ok, d_ok, True, D_PAD != HEAD_DIM)
    b_v = load_tile(V + b64 * stride_vb + kvh64 * stride_vh + row0 * stride_vn
                    + offs_j[:, None] * stride_vn + offs_d[None, :] * stride_vd, n_ok, d_ok, True, D_PAD != HEAD_DIM)
    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    # a head-shared bias of the resident keys is the same for every query block: loaded once; one
    # per query head is loaded in the loop (_dkdv_block), each step its query head's
    key_bias = KEY_BIAS + b64 * stride_biasb
    key_bias2 = 0.0
    if HAS_KEY_BIAS and not BIAS_PER_HEAD:
        key_bias2 = key_bias_log2(key_bias, offs_n, n_ok, True)
    diag = seq_k - seq_q
    lo, mid, _, hi = key_query_range(start_n, seq_q, seq_k, BLOCK_M, BLOCK_N, CAUSAL)
    # One flat loop over (query head of the group, query block): a loop over heads around the
    # block loop made ptxas keep the wgmma accumulators twice and spill (measured for sm_90:
    # 255 registers + 0.4-2.5 KB spills per thread, against 138-166 registers flat at hd64).
    h0 = kvh64 * group
    if BIAS_PER_HEAD:
        key_bias += h0 * stride_biash
    q_base = Q + b64 * stride_qb + h0 * stride_qh + q_start * stride_qm
    do_base = DO + b64 * stride_dob + h0 * stride_doh + q_start * stride_dom
    l_base = b64 * stride_lb + h0 * stride_lh + q_start * stride_lm
    tile_q = offs_m0[:, None] * stride_qm + offs_d[None, :] * stride_qd
    tile_do = offs_m0[:, None] * stride_dom + offs_d[None, :] * stride_dod
    dq_base = DQ_ACC + b64 * stride_dqb + h0 * stride_dqh + q_start * stride_dqm
    tile_dq = offs_m0[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    n_blocks = (hi - lo) // BLOCK_M
    for t in range(0, group * n_blocks):
        dk, dv = _dkdv_block(dk, dv, b_k, b_v, q_base, do_base, LSE + l_base, DELTA + l_base, dq_base,
                             tile_q, tile_do, tile_dq, offs_m0, offs_n, n_ok, d_ok, t, n_blocks, lo, mid, seq_q,
                             diag, scale, qk_scale, stride_qh, stride_qm, stride_doh, stride_dom,
                             stride_lh, stride_lm, stride_dqh, stride_dqm, key_bias2, key_bias, stride_biash,
                             D_PAD != HEAD_DIM, CAUSAL, PREC, BLOCK_M, ATOMIC_DQ, HAS_KEY_BIAS, BIAS_PER_HEAD)
    dk_ptrs = (DK + b64 * stride_dkb + kvh64 * stride_dkh + row0 * stride_dkn
               + offs_j[:, None] * stride_dkn + offs_d[None, :] * stride_dkd)
    dv_ptrs = (DV + b64 * stride_dvb + kvh64 * stride_dvh + row0 * stride_dvn
               + offs_j[:, None] * stride_dvn + offs_d[None, :] * stride_dvd)
    store_tile(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), n_ok, d_ok, D_PAD != HEAD_DIM)
    store_tile(dv_ptrs, dv.to(DV.dtype.element_ty), n_ok, d_ok, D_PAD != HEAD_DIM)


# The deterministic dK/dV kernel, and the one that also adds dQ's shares with atomics: one JIT
# function under two autotuners, with their own candidates (the dQ share takes registers) and the
# atomic one zeroing its buffer before each timed trial.
flash_bwd_dkdv_kernel = configs.dkdv_autotune()(_dkdv_kernel)
flash_bwd_dkdv_dq_kernel = configs.dkdv_dq_autotune()(_dkdv_kernel)


@triton.jit
def _dq_inner(dq, b_q, b_do, lse2, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
              seq_k, diag, lo, hi, qk_scale, key_bias,
              HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
              MASK: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr, HAS_KEY_BIAS: tl.constexpr):
    """Accumulate dQ of one query block over key blocks [lo, hi); key_bias points at the
    sequence's key 0 of the bias (read with HAS_KEY_BIAS only)."""
    d_ok = offs_d < HEAD_DIM
    # int64: lo * stride passes 2**31 at long sequences (bshd, 128 kv heads x hd128: from 128k keys);
    # tl.cast also takes the literal 0 of the unmasked call
    lo64 = tl.cast(lo, tl.int64)
    k_ptrs += lo64 * stride_kn
    v_ptrs += lo64 * stride_vn
    for start_n in range(lo, hi, BLOCK_N):
        dq = dq_key_block(dq, b_q, b_do, lse2, delta, k_ptrs, v_ptrs, offs_m, start_n + offs_n, d_ok, seq_k, diag,
                          qk_scale, D_PAD != HEAD_DIM, MASK, CAUSAL, PREC, key_bias, HAS_KEY_BIAS)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return dq


@configs.dq_autotune()
# sequence lengths vary per call: one compiled kernel for all (no "== 1" specialisation)
@triton.jit(do_not_specialize=["seq_q", "seq_k"])
def flash_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, KEY_BIAS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_lb, stride_lh, stride_lm, stride_biasb, stride_biash,
    seq_q, seq_k, group, scale, qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
    PREC: tl.constexpr, HAS_KEY_BIAS: tl.constexpr, BIAS_PER_HEAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid (query blocks, query heads, batch). With HAS_KEY_BIAS, KEY_BIAS (float32, batch
    stride stride_biasb) is added to every score; with BIAS_PER_HEAD each query head has its own
    (head stride stride_biash, read only then)."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, seq_q = seq_bounds(CU_Q, b, seq_q, VARLEN)
    k_start, seq_k = seq_bounds(CU_K, b, seq_k, VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= seq_q:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    kvh64 = (h // group).to(tl.int64)
    row0 = q_start + start_m
    offs_i = tl.arange(0, BLOCK_M)
    offs_m = start_m + offs_i
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    m_ok = offs_m < seq_q
    d_ok = offs_d < HEAD_DIM
    b_q = load_tile(Q + b64 * stride_qb + h64 * stride_qh + row0 * stride_qm
                    + offs_i[:, None] * stride_qm + offs_d[None, :] * stride_qd, m_ok, d_ok, True, D_PAD != HEAD_DIM)
    b_do = load_tile(DO + b64 * stride_dob + h64 * stride_doh + row0 * stride_dom
                     + offs_i[:, None] * stride_dom + offs_d[None, :] * stride_dod, m_ok, d_ok, True,
                     D_PAD != HEAD_DIM)
    lse_off = b64 * stride_lb + h64 * stride_lh + row0 * stride_lm + offs_i * stride_lm
    lse2 = padded_lse2(LSE + lse_off, m_ok, HAS_KEY_BIAS)
    delta = tl.load(DELTA + lse_off, mask=m_ok, other=0.0)
    k_ptrs = (K + b64 * stride_kb + kvh64 * stride_kh + k_start * stride_kn
              + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd)
    v_ptrs = (V + b64 * stride_vb + kvh64 * stride_vh + k_start * stride_vn
              + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd)
    key_bias = KEY_BIAS + b64 * stride_biasb
    if BIAS_PER_HEAD:
        key_bias += h64 * stride_biash
    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    diag = seq_k - seq_q
    full_end, hi = query_key_range(start_m, seq_q, seq_k, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _dq_inner(dq, b_q, b_do, lse2, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                   seq_k, diag, 0, full_end, qk_scale, key_bias, HEAD_DIM, D_PAD, BLOCK_N, False, CAUSAL, PREC,
                   HAS_KEY_BIAS)
    dq = _dq_inner(dq, b_q, b_do, lse2, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                   seq_k, diag, full_end, hi, qk_scale, key_bias, HEAD_DIM, D_PAD, BLOCK_N, True, CAUSAL, PREC,
                   HAS_KEY_BIAS)
    dq_ptrs = (DQ + b64 * stride_dqb + h64 * stride_dqh + row0 * stride_dqm
               + offs_i[:, None] * stride_dqm + offs_d[None, :] * stride_dqd)
    store_tile(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), m_ok, d_ok, D_PAD != HEAD_DIM)


# ---------------------------------------------------------------------------------------
def bwd_preprocess(out: torch.Tensor, dout: torch.Tensor, delta: torch.Tensor, varlen: Optional[Varlen]) -> None:
    batch, max_q, _ = geometry(out, out, varlen)
    head_dim = out.shape[3]
    cu_q, _ = cu_pointers(out, varlen)
    grid = (cdiv(max_q, PREPROCESS_BLOCK_M), out.shape[1], batch)
    _bwd_preprocess_kernel[grid](
        out, dout, delta, cu_q, *strides4(out, varlen), *strides4(dout, varlen), *strides3(delta, varlen),
        max_q, HEAD_DIM=head_dim, D_PAD=configs.padded_head_dim(head_dim), VARLEN=varlen is not None,
        BLOCK_M=PREPROCESS_BLOCK_M)


def bwd_dkdv(q, k, v, dout, lse, delta, dk, dv, *, causal: bool, scale: float, varlen: Optional[Varlen],
             dq_acc: Optional[torch.Tensor] = None, key_bias: Optional[torch.Tensor] = None) -> None:
    """dK, dV; with dq_acc (a zeroed fp32 tensor shaped like q) also dQ, added into it atomically.
    key_bias: the forward's (float32 (B or 1, Sk) or (B or 1, Hq or 1, Sk), dense only)."""
    batch, max_q, max_k = geometry(q, k, varlen)
    heads_q, heads_kv, head_dim = q.shape[1], k.shape[1], q.shape[3]
    cu_q, cu_k = cu_pointers(q, varlen)
    bias, stride_biasb, stride_biash, has_bias = key_bias_args(key_bias, q, k, lse, varlen)

    def grid(meta):
        return (cdiv(max_k, meta["BLOCK_N"]), heads_kv, batch)

    kernel = flash_bwd_dkdv_kernel if dq_acc is None else flash_bwd_dkdv_dq_kernel
    dq_arg = dk if dq_acc is None else dq_acc  # never touched by the deterministic kernel
    kernel[grid](
        q, k, v, dout, lse, delta, dk, dv, dq_arg, cu_q, cu_k, bias,
        *strides4(q, varlen), *strides4(k, varlen), *strides4(v, varlen), *strides4(dout, varlen),
        *strides4(dk, varlen), *strides4(dv, varlen), *strides4(dq_arg, varlen),
        *strides3(lse, varlen), stride_biasb, stride_biash, max_q, max_k, heads_q // heads_kv, scale,
        scale * LOG2E, HEAD_DIM=head_dim, D_PAD=configs.padded_head_dim(head_dim), CAUSAL=causal,
        VARLEN=varlen is not None, PREC=dot_precision(q.dtype), ATOMIC_DQ=dq_acc is not None,
        HAS_KEY_BIAS=has_bias, BIAS_PER_HEAD=stride_biash != 0)


def bwd_dq(q, k, v, dout, lse, delta, dq, *, causal: bool, scale: float, varlen: Optional[Varlen],
           key_bias: Optional[torch.Tensor] = None) -> None:
    batch, max_q, max_k = geometry(q, k, varlen)
    heads_q, heads_kv, head_dim = q.shape[1], k.shape[1], q.shape[3]
    cu_q, cu_k = cu_pointers(q, varlen)
    bias, stride_biasb, stride_biash, has_bias = key_bias_args(key_bias, q, k, lse, varlen)

    def grid(meta):
        return (cdiv(max_q, meta["BLOCK_M"]), heads_q, batch)

    flash_bwd_dq_kernel[grid](
        q, k, v, dout, lse, delta, dq, cu_q, cu_k, bias,
        *strides4(q, varlen), *strides4(k, varlen), *strides4(v, varlen), *strides4(dout, varlen),
        *strides4(dq, varlen), *strides3(lse, varlen), stride_biasb, stride_biash,
        max_q, max_k, heads_q // heads_kv, scale, scale * LOG2E,
        HEAD_DIM=head_dim, D_PAD=configs.padded_head_dim(head_dim), CAUSAL=causal,
        VARLEN=varlen is not None, PREC=dot_precision(q.dtype), HAS_KEY_BIAS=has_bias,
        BIAS_PER_HEAD=stride_biash != 0)


def _atomic_fits(q: torch.Tensor) -> bool:
    """Whether the atomic dK/dV kernel's tile fits the device: not for fp32 on a card with less
    shared memory per block than an H100 (compiled for sm_89, its FALLBACK / FP32_WIDE tiles take
    128 KB at head dims 128 and 256, over the 99 KB there); the deterministic kernels run instead."""
    limit = configs.device_smem_limit(q)
    return q.element_size() != 4 or limit is None or limit >= configs.H100_SMEM


def flash_bwd(dout, q, k, v, out, lse, *, causal: bool, scale: float, varlen: Optional[Varlen] = None,
              dlse: Optional[torch.Tensor] = None, deterministic: bool = True,
              key_bias: Optional[torch.Tensor] = None):
    """dq, dk, dv (in q/k/v's dtype and strides where dense) from dout and the saved forward.
    key_bias: the forward's (float32 (B or 1, Sk) or (B or 1, Hq or 1, Sk), dense only); no
    gradient flows into it.

    dlse, the gradient flowing into lse, folds into delta: d lse / d s = P, so
    dS = P * (dP - (rowsum(dO * O) - dlse)). deterministic=False permits dQ formed inside the
    dK/dV kernel with fp32 atomics, which runs only under ATTNLIB_FLASH_ATOMIC_DQ=1 (slower where
    measured; see the module docstring); it needs an fp32 buffer shaped like q, and
    torch.use_deterministic_algorithms(True) overrides it.
    """
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    batch, max_q, max_k = geometry(q, k, varlen)
    if batch == 0 or q.shape[1] == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if max_q == 0 or max_k == 0:  # nothing attends: all gradients vanish
        return dq.zero_(), dk.zero_(), dv.zero_()
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    delta = torch.empty_like(lse)
    bwd_preprocess(out, dout, delta, varlen)
    if dlse is not None:
        delta -= torch.where(torch.isfinite(lse), dlse.to(delta.dtype), 0.0)
    if deterministic or torch.are_deterministic_algorithms_enabled() or not atomic_dq_enabled() or not _atomic_fits(q):
        bwd_dkdv(q, k, v, dout, lse, delta, dk, dv, causal=causal, scale=scale, varlen=varlen, key_bias=key_bias)
        bwd_dq(q, k, v, dout, lse, delta, dq, causal=causal, scale=scale, varlen=varlen, key_bias=key_bias)
    else:
        dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        bwd_dkdv(q, k, v, dout, lse, delta, dk, dv, causal=causal, scale=scale, varlen=varlen, dq_acc=dq_acc,
                 key_bias=key_bias)
        dq.copy_(dq_acc)
    return dq, dk, dv
