"""FlashAttention-2 forward in Triton: the kernel (Q tile resident, K/V streamed, base-2 online
softmax) and its launcher. Writes O in the input dtype and lse (natural log, float32). An
optional key bias (key_bias, float32 (B or 1, Sk) shared by the heads, or (B or 1, Hq or 1, Sk)
per query head) is added to scale * q . k; a row whose keys are all -inf gets output 0 and lse
-inf, as a row with no visible key.

With ATTNLIB_FLASH_TMA=1 the launcher hands dense fp16/bf16 calls that tensor descriptors can
express to forward_tma.py (the Hopper TMA variant, same results, no key bias); fwd_variant says
which runs."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import configs
from .common import (LOG2E, Varlen, attend_key_block, cu_pointers, dot_precision, geometry, key_bias_args,
                     load_tile, query_key_range, seq_bounds, store_tile, strides3, strides4)
from ..hostmath import cdiv


@triton.jit
def _fwd_inner(acc, l_i, m_i, b_q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
               seq_k, diag, lo, hi, qk_scale, key_bias,
               HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
               MASK: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr, HAS_KEY_BIAS: tl.constexpr):
    """Fold key blocks [lo, hi) into the running (acc, l_i, m_i); MASK applies the key tail
    and causal masks (only the diagonal/tail blocks need it); key_bias points at the sequence's
    key 0 of the bias (read with HAS_KEY_BIAS only)."""
    d_ok = offs_d < HEAD_DIM
    # int64: lo * stride passes 2**31 at long sequences (bshd, 128 kv heads x hd128: from 128k keys);
    # tl.cast also takes the literal 0 of the unmasked call
    lo64 = tl.cast(lo, tl.int64)
    k_ptrs += lo64 * stride_kn
    v_ptrs += lo64 * stride_vn
    for start_n in range(lo, hi, BLOCK_N):
        acc, l_i, m_i = attend_key_block(acc, l_i, m_i, b_q, k_ptrs, v_ptrs, offs_m, start_n + offs_n, d_ok,
                                         seq_k, diag, qk_scale, D_PAD != HEAD_DIM, MASK, CAUSAL, PREC,
                                         key_bias, HAS_KEY_BIAS)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return acc, l_i, m_i


@configs.fwd_autotune()
# sequence lengths vary per call: one compiled kernel for all (no "== 1" specialisation)
@triton.jit(do_not_specialize=["seq_q", "seq_k"])
def flash_fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K, KEY_BIAS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm, stride_biasb, stride_biash,
    seq_q, seq_k, group, qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
    PREC: tl.constexpr, HAS_KEY_BIAS: tl.constexpr, BIAS_PER_HEAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid (query blocks, query heads, batch). group = Hq // Hkv (GQA by index mapping).
    HAS_KEY_BIAS: KEY_BIAS (float32, batch stride stride_biasb) is added to the scores of every
    query row (dense calls only); with BIAS_PER_HEAD each query head has its own (head stride
    stride_biash, read only then: a head-shared bias compiles as before there was one per head)."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, seq_q = seq_bounds(CU_Q, b, seq_q, VARLEN)
    k_start, seq_k = seq_bounds(CU_K, b, seq_k, VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= seq_q:  # varlen: this sequence is shorter than the longest one
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

    q_ptrs = (Q + b64 * stride_qb + h64 * stride_qh + row0 * stride_qm
              + offs_i[:, None] * stride_qm + offs_d[None, :] * stride_qd)
    k_ptrs = (K + b64 * stride_kb + kvh64 * stride_kh + k_start * stride_kn
              + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd)
    v_ptrs = (V + b64 * stride_vb + kvh64 * stride_vh + k_start * stride_vn
              + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd)
    b_q = load_tile(q_ptrs, m_ok, d_ok, True, D_PAD != HEAD_DIM)
    key_bias = KEY_BIAS + b64 * stride_biasb
    if BIAS_PER_HEAD:
        key_bias += h64 * stride_biash

    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    diag = seq_k - seq_q
    full_end, hi = query_key_range(start_m, seq_q, seq_k, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, b_q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n,
                               offs_d, seq_k, diag, 0, full_end, qk_scale, key_bias,
                               HEAD_DIM, D_PAD, BLOCK_N, False, CAUSAL, PREC, HAS_KEY_BIAS)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, b_q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n,
                               offs_d, seq_k, diag, full_end, hi, qk_scale, key_bias,
                               HEAD_DIM, D_PAD, BLOCK_N, True, CAUSAL, PREC, HAS_KEY_BIAS)

    # a row with no visible key (or only keys biased to -inf): output 0, lse -inf
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)  # log2 -> ln
    o_ptrs = (O + b64 * stride_ob + h64 * stride_oh + row0 * stride_om
              + offs_i[:, None] * stride_om + offs_d[None, :] * stride_od)
    store_tile(o_ptrs, (acc / l_safe[:, None]).to(O.dtype.element_ty), m_ok, d_ok, D_PAD != HEAD_DIM)
    lse_ptrs = LSE + b64 * stride_lb + h64 * stride_lh + row0 * stride_lm + offs_i * stride_lm
    tl.store(lse_ptrs, lse, mask=m_ok)


def fwd_variant(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                varlen: Optional[Varlen] = None, key_bias: Optional[torch.Tensor] = None) -> tuple[str, list[str]]:
    """("tma", []) when flash_fwd would launch the descriptor kernel, else ("default", reasons):
    reasons is empty when ATTNLIB_FLASH_TMA is off, and says why the descriptors cannot serve
    the call when it is on."""
    if not configs.tma_requested():
        return "default", []
    from .forward_tma import tma_unsupported_reasons
    reasons = tma_unsupported_reasons(q, k, v, out, varlen)
    if key_bias is not None:
        reasons.append("a key mask (the descriptor forward adds no key bias)")
    return ("tma", []) if not reasons else ("default", reasons)


def flash_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, *,
              causal: bool, scale: float, varlen: Optional[Varlen] = None,
              key_bias: Optional[torch.Tensor] = None) -> None:
    """Launch the forward kernel. q/k/v/out are bhsd views (last stride 1; packed varlen tensors
    as (1, H, total, D) views); lse is (B, Hq, Sq) float32, or (Hq, total_q) for varlen.
    key_bias (dense only): float32 (B or 1, Sk), added to scale * q . k for every head and row, or
    (B or 1, Hq or 1, Sk), query head h's bias added to that head's rows (common.key_bias_args)."""
    batch, max_q, max_k = geometry(q, k, varlen)
    heads_q, heads_kv, head_dim = q.shape[1], k.shape[1], q.shape[3]
    if batch == 0 or max_q == 0 or heads_q == 0:
        return
    if k.shape[2] == 0:  # no keys at all: every row is empty
        out.zero_()
        lse.fill_(float("-inf"))
        return
    bias, stride_biasb, stride_biash, has_bias = key_bias_args(key_bias, q, k, lse, varlen)
    if fwd_variant(q, k, v, out, varlen, key_bias)[0] == "tma":
        from .forward_tma import flash_fwd_tma
        flash_fwd_tma(q, k, v, out, lse, causal=causal, scale=scale)
        return
    cu_q, cu_k = cu_pointers(q, varlen)

    def grid(meta):
        return (cdiv(max_q, meta["BLOCK_M"]), heads_q, batch)

    flash_fwd_kernel[grid](
        q, k, v, out, lse, cu_q, cu_k, bias,
        *strides4(q, varlen), *strides4(k, varlen), *strides4(v, varlen), *strides4(out, varlen),
        *strides3(lse, varlen), stride_biasb, stride_biash,
        max_q, max_k, heads_q // heads_kv, scale * LOG2E,
        HEAD_DIM=head_dim, D_PAD=configs.padded_head_dim(head_dim), CAUSAL=causal,
        VARLEN=varlen is not None, PREC=dot_precision(q.dtype), HAS_KEY_BIAS=has_bias,
        BIAS_PER_HEAD=stride_biash != 0,
    )
