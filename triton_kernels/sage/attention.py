"""SageAttention forward in Triton: INT8 QK^T with int32 accumulation, one multiply by
delta_q * delta_k, base-2 online softmax (the flash kernel's structure and helpers), and PV in
fp16 (fp32 accumulator), fp16 with a per-key-block fp16 accumulator, or fp8 e4m3.

Inputs come from quant.py: q_int8/k_int8 contiguous (B, H, S, D) with per-block scales; V is
the caller's bhsd view (converted to fp16 in the kernel) or, for fp8, the e4m3 copy with its
per-channel scales applied in the epilogue.

Environment: ATTNLIB_SAGE_AUTOTUNE=0 skips autotuning (first candidate per head dim).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..flash.common import load_tile, query_key_range, store_tile
from ..switches import autotune_enabled, interpreting
from .quant import V_FP8_SEQ_ALIGN, padded_head_dim
from ..hostmath import cdiv

PV_FP16, PV_FP16_ACCUM, PV_FP8 = 0, 1, 2
PV_CODES = {"fp16": PV_FP16, "fp16_accum": PV_FP16_ACCUM, "fp8": PV_FP8}
# constexpr: read inside the compiled kernel (see quant.py)
LOG2_FP8_MAX = tl.constexpr(8.807354922057604)  # log2(448): P lands in [0, 448] (SageAttention2 §3.3)
LN2 = tl.constexpr(0.6931471805599453)

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per padded head dim. BLOCK_N must divide the K
# quantization block (64) so a key tile has a single delta_k. A 128-row INT8 Q tile is half
# the bytes of the fp16 flash tile, so hd128 still fits three stages of K (int8) and V (fp16).
# Every candidate compiles for sm_90 without register spills for each pv mode (bf16 inputs,
# causal; tests/triton_sm90.py): 4 warps spill at hd128 (40-1124 B) and hd256 (up to 5.5 KB), and
# at hd64 fp16_accum reaches 255 registers, so 128-row tiles take 8 warps there.
FWD_CONFIGS = {
    32: [(128, 64, 4, 3), (64, 64, 4, 3)],
    64: [(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3)],
    128: [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3)],
    256: [(64, 64, 8, 2), (64, 32, 8, 2)],
}
# CPU interpreter: small tiles, BLOCK_M != BLOCK_N so the causal block arithmetic is exercised.
INTERPRET_CONFIG = (32, 16, 1, 1)


def _configs() -> list[triton.Config]:
    def cfg(c):
        return triton.Config({"BLOCK_M": c[0], "BLOCK_N": c[1]}, num_warps=c[2], num_stages=c[3])

    if interpreting():
        return [cfg(INTERPRET_CONFIG)]
    seen = []
    for cands in FWD_CONFIGS.values():
        seen += [c for c in cands if c not in seen]
    return [cfg(c) for c in seen]


def _prune(configs, named_args, **kwargs):
    if len(configs) == 1:
        return configs
    d_pad = kwargs.get("D_PAD", named_args.get("D_PAD"))
    wanted = FWD_CONFIGS[max(32, d_pad)]
    if not autotune_enabled("sage"):
        wanted = wanted[:1]
    by_key = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages): c for c in configs}
    return [by_key[w] for w in wanted if w in by_key]  # in the table's order: the first is the default


@triton.jit
def _sage_inner(acc, l_i, m_i, b_q, b_dq, k_ptrs, v_ptrs, DK, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                seq_k, diag, lo, hi,
                HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, K_BLOCK: tl.constexpr,
                MASK: tl.constexpr, CAUSAL: tl.constexpr, PV: tl.constexpr):
    """Fold key blocks [lo, hi) into (acc, l_i, m_i); MASK applies the key tail and causal masks."""
    d_ok = offs_d < HEAD_DIM
    # int64 (as flash's _fwd_inner): lo * stride_vn passes 2**31 at long sequences (V is the
    # caller's view: bshd with Hkv * D = 4096 from 512k keys); tl.cast also takes the literal 0
    lo64 = tl.cast(lo, tl.int64)
    k_ptrs += lo64 * stride_kn
    v_ptrs += lo64 * stride_vn
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < seq_k
        b_k = load_tile(k_ptrs, n_ok, d_ok, MASK, D_PAD != HEAD_DIM)
        # one multiply dequantises: the tile lies inside one K block, so delta_k is a scalar
        qk_scale = b_dq * tl.load(DK + start_n // K_BLOCK)
        s = tl.dot(b_q, tl.trans(b_k), out_dtype=tl.int32).to(tl.float32)
        if MASK:
            # scaled before masking: qk_scale is 0 for an all-zero (delta 0) block, and -inf * 0 is NaN
            s = s * qk_scale[:, None]
            keep = n_ok[None, :]
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + diag)
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
        else:
            # every score finite and qk_scale >= 0: the scale commutes with the row max exactly, so
            # it is applied once per row here and folds into one FMA per score below (sm_90 SASS:
            # one FMUL and one FADD per score fewer than scaling the tile first)
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        # fp8 PV: P * 448 in e4m3 against the per-channel e4m3 V; the factor rides in the row shift
        shift = m_safe - LOG2_FP8_MAX if PV == 2 else m_safe
        if MASK:
            p = tl.math.exp2(s - shift[:, None])
        else:
            p = tl.math.exp2(s * qk_scale[:, None] - shift[:, None])
        if PV == 2:  # a (D_PAD, BLOCK_N) tile of the e4m3 V^T, transposed in registers' view only.
            # No key mask, even in masked tiles: quantize_v_fp8 pads the tokens to a multiple of 64
            # (of BLOCK_N) with zeros, and p is 0 for masked keys (a mask per token along the
            # contiguous axis made this a byte-wise synchronous load on sm_90)
            b_vt = load_tile(v_ptrs, d_ok, n_ok, D_PAD != HEAD_DIM, False)
            acc = tl.dot(p.to(b_vt.dtype), tl.trans(b_vt), acc * alpha[:, None])
        else:
            b_v = load_tile(v_ptrs, n_ok, d_ok, MASK, D_PAD != HEAD_DIM)
            if PV == 1:  # fp16 accumulator for this key block, flushed into the fp32 buffer
                part = tl.dot(p.to(tl.float16), b_v.to(tl.float16), out_dtype=tl.float16)
                acc = acc * alpha[:, None] + part.to(tl.float32)
            else:
                acc = tl.dot(p.to(tl.float16), b_v.to(tl.float16), acc * alpha[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return acc, l_i, m_i


@triton.autotune(configs=_configs(), key=["D_PAD", "CAUSAL", "PV"], prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=["seq_q", "seq_k"])
def sage_fwd_kernel(
    Q, K, V, DQ, DK, DV, O, LSE, SHIFT,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    seq_q, seq_k, heads_q, heads_kv, nq_blocks, nk_blocks,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, Q_BLOCK: tl.constexpr, K_BLOCK: tl.constexpr,
    CAUSAL: tl.constexpr, PV: tl.constexpr, WRITE_LSE: tl.constexpr, LSE_SHIFT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (query blocks, query heads, batch). Q/K int8 contiguous (B, H, S, D); DQ (B, Hq,
    nq_blocks), DK (B, Hkv, nk_blocks), DV (B, Hkv, D, fp8 only) fp32; GQA by index mapping."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    b64, h64 = b.to(tl.int64), h.to(tl.int64)
    kvh64 = (h // (heads_q // heads_kv)).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_i = tl.arange(0, BLOCK_M)
    offs_m = start_m + offs_i
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    m_ok = offs_m < seq_q
    d_ok = offs_d < HEAD_DIM

    q_ptrs = (Q + (b64 * heads_q + h64) * seq_q * HEAD_DIM + offs_m[:, None].to(tl.int64) * HEAD_DIM
              + offs_d[None, :])
    k_ptrs = (K + (b64 * heads_kv + kvh64) * seq_k * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :])
    v_base = V + b64 * stride_vb + kvh64 * stride_vh
    if PV == 2:  # quantize_v_fp8's transposed storage: tokens innermost, K-major for the fp8 dot;
        # channel offsets in int64 (HEAD_DIM * padded tokens passes 2**31 at 8M tokens of hd256)
        tl.static_assert(64 % BLOCK_N == 0)  # V_FP8_SEQ_ALIGN: padded tiles end inside the storage
        v_ptrs = v_base + offs_d[:, None].to(tl.int64) * stride_vd + offs_n[None, :] * stride_vn
    else:
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    b_q = load_tile(q_ptrs, m_ok, d_ok, True, D_PAD != HEAD_DIM)
    # each row's delta_q (per block or per warp group of rows)
    b_dq = tl.load(DQ + (b64 * heads_q + h64) * nq_blocks + offs_m // Q_BLOCK, mask=m_ok, other=0.0)
    dk_base = DK + (b64 * heads_kv + kvh64) * nk_blocks

    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    diag = seq_k - seq_q
    full_end, hi = query_key_range(start_m, seq_q, seq_k, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _sage_inner(acc, l_i, m_i, b_q, b_dq, k_ptrs, v_ptrs, dk_base, HEAD_DIM, stride_vn,
                                offs_m, offs_n, offs_d, seq_k, diag, 0, full_end,
                                HEAD_DIM, D_PAD, BLOCK_N, K_BLOCK, False, CAUSAL, PV)
    acc, l_i, m_i = _sage_inner(acc, l_i, m_i, b_q, b_dq, k_ptrs, v_ptrs, dk_base, HEAD_DIM, stride_vn,
                                offs_m, offs_n, offs_d, seq_k, diag, full_end, hi,
                                HEAD_DIM, D_PAD, BLOCK_N, K_BLOCK, True, CAUSAL, PV)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    if PV == 2:  # V's per-channel e4m3 scale, fused into the epilogue
        o = o * tl.load(DV + (b64 * heads_kv + kvh64) * HEAD_DIM + offs_d, mask=d_ok, other=0.0)[None, :]
    o_ptrs = (O + b64 * stride_ob + h64 * stride_oh + offs_m[:, None].to(tl.int64) * stride_om
              + offs_d[None, :] * stride_od)
    store_tile(o_ptrs, o.to(O.dtype.element_ty), m_ok, d_ok, D_PAD != HEAD_DIM)
    if WRITE_LSE:
        lse2 = m_i + tl.math.log2(l_safe)
        if PV == 2:
            lse2 = lse2 - LOG2_FP8_MAX
        lse = lse2 * LN2
        row = (b64 * heads_q + h64) * seq_q + offs_m
        if LSE_SHIFT:  # smoothing shifted each score row by scale * (q . mean_k): undo it
            lse += tl.load(SHIFT + row, mask=m_ok, other=0.0)
        tl.store(LSE + row, tl.where(empty, float("-inf"), lse), mask=m_ok)


def sage_fwd(q_int8: torch.Tensor, k_int8: torch.Tensor, v: torch.Tensor, delta_q: torch.Tensor,
             delta_k: torch.Tensor, out: torch.Tensor, *, causal: bool, q_block: int, k_block: int, pv: str,
             delta_v: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None,
             lse_shift: Optional[torch.Tensor] = None) -> None:
    """Launch the attention kernel. out is a bhsd view (any strides); lse, when given, dense
    float32 (B, Hq, Sq); v is the caller's view (fp16 modes) or the e4m3 copy (fp8)."""
    batch, heads_q, seq_q, head_dim = q_int8.shape
    heads_kv, seq_k = k_int8.shape[1], k_int8.shape[2]
    if k_block % 64:  # every key tile (BLOCK_N <= 64) must lie inside one K quantization block
        raise ValueError(f"k_block must be a multiple of 64, got {k_block}")
    if pv == "fp8" and not (v.stride(2) == 1 and v.stride(3) % V_FP8_SEQ_ALIGN == 0 and v.stride(3) >= seq_k):
        # the kernel loads V^T tiles past seq_k unmasked: only quantize_v_fp8's padded storage has them
        raise ValueError(f"pv='fp8' takes V from quantize_v_fp8 (tokens innermost, padded to "
                         f"{V_FP8_SEQ_ALIGN}), got strides {tuple(v.stride())}")
    placeholder = delta_q
    sage_fwd_kernel[lambda meta: (cdiv(seq_q, meta["BLOCK_M"]), heads_q, batch)](
        q_int8, k_int8, v, delta_q, delta_k, placeholder if delta_v is None else delta_v, out,
        placeholder if lse is None else lse, placeholder if lse_shift is None else lse_shift,
        *v.stride(), *out.stride(),
        seq_q, seq_k, heads_q, heads_kv, delta_q.shape[-1], delta_k.shape[-1],
        HEAD_DIM=head_dim, D_PAD=padded_head_dim(head_dim), Q_BLOCK=q_block, K_BLOCK=k_block,
        CAUSAL=causal, PV=PV_CODES[pv], WRITE_LSE=lse is not None, LSE_SHIFT=lse_shift is not None,
    )
