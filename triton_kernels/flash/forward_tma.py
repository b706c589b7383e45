"""Hopper flash forward on tensor descriptors (TMA): the opt-in variant of forward.py for dense
fp16/bf16 inputs (ATTNLIB_FLASH_TMA=1), same semantics, and the rule for which inputs it takes.

What differs from forward.flash_fwd_kernel, and why (none of it is a measured speed-up yet):

- Q, K, V tiles arrive by descriptor loads and O leaves by a descriptor store. On sm_90 these
  lower to TMA bulk copies (cp.async.bulk.tensor) into swizzled shared memory that wgmma reads
  directly: no per-element address arithmetic or load masks in the loop (138 registers instead
  of 212 at hd128, 128 x 64, 8 warps, compiled for sm_90), and the copy engine, not the warps,
  issues the loads (Triton's 06-fused-attention tutorial takes this path on Hopper; FA3
  feeds its wgmma the same way). Each program builds 2-D descriptors over its own (batch, head)
  slice, [seq, head_dim] with the tensor's row stride, so the hardware's bounds check does the
  sequence-tail and head-dim-tail masking: rows/columns past the slice load as 0 and are not
  stored. Head-dim padding (72 -> 128) needs no padded copy: the copy engine zero-fills the
  out-of-range columns.
- The score scale is folded into the exp2 argument as one FMA per score (qk * scale - m) and into
  the row max once per row, as the tutorial does, instead of a separate multiply per score. Q is
  not pre-scaled: rounding q * scale * log2(e) to fp16/bf16 would add an input-sized error for
  nothing, since the FMA form already costs one instruction per score.
- The unmasked key blocks skip the "row has no visible key yet" guard (every row of such a block
  sees every key, so the running max is finite after the first block).
- Causal grids visit the query blocks with the most key blocks first (longest processing time
  first, as flash-attention's LPT tile scheduler in flash_attn/cute/tile_scheduler.py): the last
  wave of programs then holds the short blocks instead of the long ones.
- Optional automatic warp specialization (WARP_SPEC: tl.range(..., warp_specialize=True)):
  Triton 3.6's Hopper pass splits the loop into a TMA producer warpgroup and two consumer
  warpgroups (12 warps from num_warps=4, the tutorial's Hopper set-up). The pass handles one
  warp-specialized loop only (two in a row crash it, triton-lang/triton#9728), so that variant
  walks all key blocks in one loop with the masks applied to every block. Withdrawn from the
  autotuner's candidates after wrong outputs on an H100 (configs.WS_WITHDRAWN); the interpreter
  tests still pin it.

Device-side descriptors (tl.make_tensor_descriptor) keep the kernel's signature plain pointers
and strides, so the launcher needs no autotuner pre-hook to give host descriptors each config's
block shape; on the GPU they need a scratch allocation per program (128 bytes per descriptor),
which the launcher provides through triton.set_allocator inside a copied context (the caller's
allocator setting is not touched).
"""
from __future__ import annotations

import contextvars
from typing import Optional

import torch
import triton
import triton.language as tl

from . import configs
from .common import LOG2E, query_key_range
from ..hostmath import cdiv

TMA_DTYPES = (torch.float16, torch.bfloat16)
_ALIGN = 16  # bytes: TMA's rule for the global base address and every non-unit stride


@triton.jit
def _tma_fwd_inner(acc, l_i, m_i, b_q, k_desc, v_desc, offs_m, offs_n, seq_k, diag, lo, hi, qk_scale,
                   BLOCK_N: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, WARP_SPEC: tl.constexpr):
    """Fold key blocks [lo, hi) into (acc, l_i, m_i); MASK applies the key-tail and causal masks
    (only the diagonal/tail blocks need them: rows past seq_k load as zeros, not -inf)."""
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPEC):
        b_k = k_desc.load([start_n, 0])
        qk = tl.dot(b_q, tl.trans(b_k))
        if MASK:
            cols = start_n + offs_n
            keep = cols[None, :] < seq_k
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + diag)
            qk = tl.where(keep, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            # rows that have seen no visible key yet keep m = -inf; shift them by 0 instead
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_use = m_new
        p = tl.math.exp2(qk * qk_scale - m_use[:, None])  # qk_scale > 0 (inputs.check_scale)
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        b_v = v_desc.load([start_n, 0])
        acc = tl.dot(p.to(b_v.dtype), b_v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@configs.fwd_tma_autotune()
@triton.jit(do_not_specialize=["seq_q", "seq_k"])
def flash_fwd_tma_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    seq_q, seq_k, group, qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr, WARP_SPEC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (query blocks, query heads, batch); dense bhsd views whose bases and row strides are
    16-byte aligned (tma_unsupported_reasons); the launcher passes 1 for the *_d strides."""
    if CAUSAL:  # heaviest query blocks (most visible keys) first
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    kvh64 = (h // group).to(tl.int64)
    start_m = pid_m * BLOCK_M

    # one 2-D descriptor per (batch, head) slice: its bounds are the sequence and head-dim tails
    q_desc = tl.make_tensor_descriptor(Q + b64 * stride_qb + h64 * stride_qh, shape=[seq_q, HEAD_DIM],
                                       strides=[stride_qm, 1], block_shape=[BLOCK_M, D_PAD])
    k_desc = tl.make_tensor_descriptor(K + b64 * stride_kb + kvh64 * stride_kh, shape=[seq_k, HEAD_DIM],
                                       strides=[stride_kn, 1], block_shape=[BLOCK_N, D_PAD])
    v_desc = tl.make_tensor_descriptor(V + b64 * stride_vb + kvh64 * stride_vh, shape=[seq_k, HEAD_DIM],
                                       strides=[stride_vn, 1], block_shape=[BLOCK_N, D_PAD])
    o_desc = tl.make_tensor_descriptor(O + b64 * stride_ob + h64 * stride_oh, shape=[seq_q, HEAD_DIM],
                                       strides=[stride_om, 1], block_shape=[BLOCK_M, D_PAD])

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    b_q = q_desc.load([start_m, 0])
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    diag = seq_k - seq_q
    full_end, hi = query_key_range(start_m, seq_q, seq_k, BLOCK_M, BLOCK_N, CAUSAL)
    if WARP_SPEC:
        acc, l_i, m_i = _tma_fwd_inner(acc, l_i, m_i, b_q, k_desc, v_desc, offs_m, offs_n, seq_k, diag,
                                       0, hi, qk_scale, BLOCK_N, True, CAUSAL, True)
    else:
        acc, l_i, m_i = _tma_fwd_inner(acc, l_i, m_i, b_q, k_desc, v_desc, offs_m, offs_n, seq_k, diag,
                                       0, full_end, qk_scale, BLOCK_N, False, CAUSAL, False)
        acc, l_i, m_i = _tma_fwd_inner(acc, l_i, m_i, b_q, k_desc, v_desc, offs_m, offs_n, seq_k, diag,
                                       full_end, hi, qk_scale, BLOCK_N, True, CAUSAL, False)

    # a row with no visible key: output 0, lse -inf
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)  # log2 -> ln
    o_desc.store([start_m, 0], (acc / l_safe[:, None]).to(O.dtype.element_ty))
    lse_ptrs = LSE + b64 * stride_lb + h64 * stride_lh + offs_m * stride_lm
    tl.store(lse_ptrs, lse, mask=offs_m < seq_q)


# ---- which inputs the descriptors can express ------------------------------------------------
def _view_reasons(name: str, t: torch.Tensor) -> list[str]:
    """TMA's alignment rule for one bhsd view: the base address and the stride of every dimension
    that is walked (size > 1) are multiples of 16 bytes, the last stride is 1. The batch and head
    strides enter only the per-program base address, so they may also be 0 (expanded views); the
    row stride is a descriptor stride and must be positive. A size-1 dimension is never walked:
    its stride is free (the launcher passes an aligned stand-in for a single row)."""
    elem = t.element_size()
    reasons = []
    if t.data_ptr() % _ALIGN:
        reasons.append(f"{name}'s data pointer is not {_ALIGN}-byte aligned (storage offset {t.storage_offset()})")
    if t.stride(3) != 1 and t.shape[3] > 1:
        reasons.append(f"{name}'s head-dim stride is {t.stride(3)}, not 1")
    for dim, what in ((0, "batch"), (1, "head"), (2, "sequence")):
        s = t.stride(dim)
        if t.shape[dim] > 1 and ((s * elem) % _ALIGN or s < 0 or (dim == 2 and s == 0)):
            reasons.append(f"{name}'s {what} stride {s} x {elem} bytes is not a positive multiple of {_ALIGN} bytes"
                           if dim == 2 else f"{name}'s {what} stride {s} x {elem} bytes is not a multiple of {_ALIGN}")
    return reasons


def tma_unsupported_reasons(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                            varlen=None) -> list[str]:
    """Why the descriptor forward cannot serve this call (empty: it can). Inputs it rejects run
    the pointer kernel of forward.py instead, with the same results."""
    reasons = []
    if varlen is not None:
        reasons.append("packed varlen sequences (the descriptor forward is dense only)")
    if q.dtype not in TMA_DTYPES:
        reasons.append(f"dtype {q.dtype} (fp16/bf16 only; fp32 inputs are served for accuracy, not speed)")
    if q.device.type == "cuda" and torch.cuda.get_device_capability(q.device)[0] < 9:
        reasons.append("TMA needs sm_90 or newer")
    elif not configs.tma_fitting(configs.padded_head_dim(q.shape[3]), configs.device_smem_limit(q)):
        reasons.append(f"no descriptor-forward tile for head_dim {q.shape[3]} fits the device's "
                       f"{configs.device_smem_limit(q)} bytes of shared memory per block")
    head_dim = q.shape[3]
    if (head_dim * q.element_size()) % _ALIGN:
        reasons.append(f"head_dim {head_dim}: a row of {head_dim * q.element_size()} bytes is not a multiple of "
                       f"{_ALIGN} bytes")
    if max(q.shape[2], k.shape[2]) >= 2**31:
        reasons.append("a sequence of 2**31 rows or more (descriptor shapes are int32)")
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        reasons += _view_reasons(name, t)
    return reasons


def _row_stride(t: torch.Tensor) -> int:
    # one row is never stepped over: any aligned stride describes it (the head dim itself is one)
    return t.stride(2) if t.shape[2] > 1 else t.shape[3]


def _strides4(t: torch.Tensor) -> tuple[int, int, int, int]:
    return t.stride(0), t.stride(1), _row_stride(t), 1


def _scratch(device: torch.device):
    """Global scratch for the device-side descriptors (Triton asks for it at launch)."""
    def alloc(size: int, alignment: int, stream: Optional[int]):
        return torch.empty(size, dtype=torch.int8, device=device)
    return alloc


def flash_fwd_tma(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, *,
                  causal: bool, scale: float, config: Optional[tuple] = None) -> None:
    """Launch the descriptor forward on dense bhsd views that tma_unsupported_reasons accepts, with
    at least one batch, head, query and key (forward.flash_fwd handles the empty cases).

    config: (BLOCK_M, BLOCK_N, num_warps, num_stages, warp_specialize) to launch instead of
    autotuning (tests pin candidates with it, and the warp-specialized variant under the
    interpreter; on a GPU that variant is refused: see configs.WS_WITHDRAWN).
    """
    batch, heads_q, seq_q, head_dim = q.shape
    heads_kv, seq_k = k.shape[1], k.shape[2]
    kernel, meta = flash_fwd_tma_kernel, {}
    if config is not None:
        bm, bn, warps, stages, ws = config
        if ws and q.device.type == "cuda":
            raise ValueError(f"config {config}: the warp-specialized descriptor forward gave wrong outputs on an "
                             "H100 (configs.WS_WITHDRAWN) and is not launched on a GPU")
        kernel = flash_fwd_tma_kernel.fn  # the jitted kernel under the autotuner
        meta = dict(BLOCK_M=bm, BLOCK_N=bn, WARP_SPEC=ws, num_warps=warps, num_stages=stages)

    def grid(meta):
        return (cdiv(seq_q, meta["BLOCK_M"]), heads_q, batch)

    def launch():
        if q.device.type == "cuda":
            triton.set_allocator(_scratch(q.device))  # in the copied context only
        kernel[grid](
            q, k, v, out, lse,
            *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(out),
            lse.stride(0), lse.stride(1), lse.stride(2),
            seq_q, seq_k, heads_q // heads_kv, scale * LOG2E,
            HEAD_DIM=head_dim, D_PAD=configs.padded_head_dim(head_dim), CAUSAL=causal, **meta,
        )

    contextvars.copy_context().run(launch)
