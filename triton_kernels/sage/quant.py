"""Fused quantization kernels of SageAttention: one launch per tensor.

- Q: scaled by softmax scale * log2(e), quantized to symmetric INT8 per block of tokens (128,
  or 32 for per-warp granularity); optionally writes each row's lse correction scale * q . mean_k.
- K: its token mean, the subtraction and the INT8 quantization per 64-token block in one
  kernel: with smoothing, one program per (batch, kv head) first sums its tokens and then
  quantizes every block from the same program (the mean must be known before any block's
  scale); without smoothing one program per block.
- V (pv="fp8"): per-channel e4m3, delta_v = max|v| / 448 over all tokens, one program per
  (channel slice, kv head, batch), since channels are independent.

INT8 follows attnlib.reference.sage exactly: delta = max|x| / 127 in fp32, x / delta rounded
to nearest with ties away from zero (divisions are IEEE-rounded: div_rn).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..flash.common import load_tile

# tl.constexpr: compiled Triton reads module globals only when they are constexpr (the CPU
# interpreter does not check this; compiling for sm_90 here does, tests/triton_sm90.py)
INT8_MAX = tl.constexpr(127.0)
FP8_MAX = tl.constexpr(448.0)
V_CHANNELS = 16  # channels per program of the fp8 V kernel


@triton.jit
def round_half_away(y):
    """Nearest integer, ties away from zero, exactly: y - trunc(y) is exact in fp32."""
    t = y.to(tl.int32).to(tl.float32)  # float -> int truncates toward zero
    frac = tl.abs(y - t)
    step = tl.where(y >= 0, 1.0, -1.0)
    return tl.where(frac >= 0.5, t + step, t)


@triton.jit
def int8_block(x):
    """Symmetric INT8 of a whole fp32 tile (padding already 0): (x_int8, delta)."""
    delta = tl.math.div_rn(tl.max(tl.max(tl.abs(x), 1), 0), INT8_MAX)
    safe = tl.where(delta > 0, delta, 1.0)
    y = round_half_away(tl.math.div_rn(x, safe))
    return tl.minimum(tl.maximum(y, -INT8_MAX), INT8_MAX).to(tl.int8), delta


@triton.jit
def _tile_ptrs(base, b64, h64, row0, offs_s, offs_d, stride_b, stride_h, stride_s, stride_d):
    return (base + b64 * stride_b + h64 * stride_h + (row0 + offs_s[:, None]).to(tl.int64) * stride_s
            + offs_d[None, :] * stride_d)


@triton.jit(do_not_specialize=["seq"])
def quant_q_kernel(
    X, XI, DELTA, KMEAN, SHIFT,
    stride_xb, stride_xh, stride_xs, stride_xd,
    stride_mb, stride_mh,
    seq, heads, group, n_blocks, x_scale, lse_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr, LSE_SHIFT: tl.constexpr,
):
    """Grid (blocks, heads, batch). XI int8 (B, H, S, D) contiguous; DELTA fp32 (B, H, n_blocks).
    With LSE_SHIFT, SHIFT fp32 (B, H, S) gets lse_scale * (x . mean_k of kv head h // group)."""
    blk = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    b64, h64 = b.to(tl.int64), h.to(tl.int64)
    offs_s = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D_PAD)
    row0 = blk * BLOCK
    s_ok = row0 + offs_s < seq
    d_ok = offs_d < HEAD_DIM
    x = load_tile(_tile_ptrs(X, b64, h64, row0, offs_s, offs_d, stride_xb, stride_xh, stride_xs, stride_xd),
                  s_ok, d_ok, True, D_PAD != HEAD_DIM).to(tl.float32)
    xi, delta = int8_block(x * x_scale)
    xi_ptrs = _tile_ptrs(XI, b64, h64, row0, offs_s, offs_d, heads * seq * HEAD_DIM, seq * HEAD_DIM,
                         HEAD_DIM, 1)
    tl.store(xi_ptrs, xi, mask=s_ok[:, None] & d_ok[None, :])
    tl.store(DELTA + (b64 * heads + h64) * n_blocks + blk, delta)
    if LSE_SHIFT:
        kvh64 = (h // group).to(tl.int64)
        km = tl.load(KMEAN + b64 * stride_mb + kvh64 * stride_mh + offs_d, mask=d_ok, other=0.0)
        shift = tl.sum(x * km[None, :], 1) * lse_scale
        tl.store(SHIFT + (b64 * heads + h64) * seq + row0 + offs_s, shift, mask=s_ok)


@triton.jit(do_not_specialize=["seq"])
def quant_k_kernel(
    X, XI, DELTA, KMEAN,
    stride_xb, stride_xh, stride_xs, stride_xd,
    seq, heads, n_blocks,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr, SMOOTH: tl.constexpr,
):
    """SMOOTH: grid (1, heads, batch), mean over all tokens (stored in KMEAN fp32 (B, H, D)),
    then every block of x - mean quantized. Otherwise grid (blocks, heads, batch), one block each."""
    h = tl.program_id(1)
    b = tl.program_id(2)
    b64, h64 = b.to(tl.int64), h.to(tl.int64)
    offs_s = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    mean = tl.zeros([D_PAD], dtype=tl.float32)
    if SMOOTH:
        first = 0
        last = n_blocks
        total = tl.zeros([D_PAD], dtype=tl.float32)
        for blk in range(0, n_blocks):  # SageAttention §3.2: mean over tokens, per channel
            row0 = blk * BLOCK
            ptrs = _tile_ptrs(X, b64, h64, row0, offs_s, offs_d, stride_xb, stride_xh, stride_xs, stride_xd)
            x = load_tile(ptrs, row0 + offs_s < seq, d_ok, True, D_PAD != HEAD_DIM).to(tl.float32)
            total += tl.sum(x, 0)
        mean = total / seq
        tl.store(KMEAN + (b64 * heads + h64) * HEAD_DIM + offs_d, mean, mask=d_ok)
    else:
        first = tl.program_id(0)
        last = first + 1
    for blk in range(first, last):
        row0 = blk * BLOCK
        s_ok = row0 + offs_s < seq
        ptrs = _tile_ptrs(X, b64, h64, row0, offs_s, offs_d, stride_xb, stride_xh, stride_xs, stride_xd)
        x = load_tile(ptrs, s_ok, d_ok, True, D_PAD != HEAD_DIM).to(tl.float32)
        x = tl.where(s_ok[:, None] & d_ok[None, :], x - mean[None, :], 0.0)
        xi, delta = int8_block(x)
        xi_ptrs = _tile_ptrs(XI, b64, h64, row0, offs_s, offs_d, heads * seq * HEAD_DIM, seq * HEAD_DIM,
                             HEAD_DIM, 1)
        tl.store(xi_ptrs, xi, mask=s_ok[:, None] & d_ok[None, :])
        tl.store(DELTA + (b64 * heads + h64) * n_blocks + blk, delta)


@triton.jit(do_not_specialize=["seq"])
def quant_v_fp8_kernel(
    X, XF8, DELTA,
    stride_xb, stride_xh, stride_xs, stride_xd,
    seq, heads,
    HEAD_DIM: tl.constexpr, CHANNELS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Grid (channel slices, heads, batch): per-channel max over all tokens, then e4m3 of
    x / delta_v. XF8 (B, H, S, D) contiguous; DELTA fp32 (B, H, D)."""
    c0 = tl.program_id(0) * CHANNELS
    h = tl.program_id(1)
    b = tl.program_id(2)
    b64, h64 = b.to(tl.int64), h.to(tl.int64)
    offs_s = tl.arange(0, BLOCK)
    offs_c = c0 + tl.arange(0, CHANNELS)
    c_ok = offs_c < HEAD_DIM
    amax = tl.zeros([CHANNELS], dtype=tl.float32)
    for row0 in range(0, seq, BLOCK):
        ptrs = _tile_ptrs(X, b64, h64, row0, offs_s, offs_c, stride_xb, stride_xh, stride_xs, stride_xd)
        x = load_tile(ptrs, row0 + offs_s < seq, c_ok, True, True).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x), 0))
    delta = tl.math.div_rn(amax, FP8_MAX)
    delta = tl.where(delta > 0, delta, 1.0)
    tl.store(DELTA + (b64 * heads + h64) * HEAD_DIM + offs_c, delta, mask=c_ok)
    for row0 in range(0, seq, BLOCK):
        s_ok = row0 + offs_s < seq
        ptrs = _tile_ptrs(X, b64, h64, row0, offs_s, offs_c, stride_xb, stride_xh, stride_xs, stride_xd)
        x = load_tile(ptrs, s_ok, c_ok, True, True).to(tl.float32)
        y = tl.minimum(tl.maximum(tl.math.div_rn(x, delta[None, :]), -FP8_MAX), FP8_MAX)
        out_ptrs = _tile_ptrs(XF8, b64, h64, row0, offs_s, offs_c, heads * seq * HEAD_DIM, seq * HEAD_DIM,
                              HEAD_DIM, 1)
        tl.store(out_ptrs, y.to(XF8.dtype.element_ty), mask=s_ok[:, None] & c_ok[None, :])


# -- launchers ----------------------------------------------------------------------------------
def padded_head_dim(head_dim: int) -> int:
    """Power of two >= 32: INT8 dots need a reduction dimension of at least 32."""
    return max(32, triton.next_power_of_2(head_dim))


def quant_warps(block: int, d_pad: int) -> int:
    """Warps for a kernel holding one fp32 (block, d_pad) tile: at most 64 values per thread
    (4 warps at 128 x 128 spilled 160 B per thread compiled for sm_90)."""
    return max(4, min(16, block * d_pad // (64 * 32)))


def n_blocks(seq: int, block: int) -> int:
    return -(-seq // block)


def quantize_q(q: torch.Tensor, block: int, x_scale: float, k_mean: Optional[torch.Tensor] = None,
               lse_scale: float = 0.0):
    """q bhsd view -> (q_int8 (B, H, S, D), delta (B, H, nblocks) fp32, shift (B, H, S) fp32 or None).
    shift (the lse correction for smoothed K) is computed when k_mean (B, Hkv, D) is given."""
    bsz, heads, seq, d = q.shape
    nb = n_blocks(seq, block)
    qi = torch.empty(bsz, heads, seq, d, dtype=torch.int8, device=q.device)
    delta = torch.empty(bsz, heads, nb, dtype=torch.float32, device=q.device)
    shift = None if k_mean is None else torch.empty(bsz, heads, seq, dtype=torch.float32, device=q.device)
    if qi.numel() == 0:
        return qi, delta, shift
    km = delta if k_mean is None else k_mean  # placeholder pointer when unused
    quant_q_kernel[(nb, heads, bsz)](
        q, qi, delta, km, delta if shift is None else shift,
        *q.stride(), km.stride(0) if k_mean is not None else 0, km.stride(1) if k_mean is not None else 0,
        seq, heads, heads // (k_mean.shape[1] if k_mean is not None else heads), nb, x_scale, lse_scale,
        HEAD_DIM=d, D_PAD=padded_head_dim(d), BLOCK=block, LSE_SHIFT=k_mean is not None,
        num_warps=quant_warps(block, padded_head_dim(d)),
    )
    return qi, delta, shift


def quantize_k(k: torch.Tensor, block: int, smooth: bool):
    """k bhsd view -> (k_int8 (B, H, S, D), delta (B, H, nblocks) fp32, mean (B, H, D) fp32 or None)."""
    bsz, heads, seq, d = k.shape
    nb = n_blocks(seq, block)
    ki = torch.empty(bsz, heads, seq, d, dtype=torch.int8, device=k.device)
    delta = torch.empty(bsz, heads, nb, dtype=torch.float32, device=k.device)
    mean = torch.zeros(bsz, heads, d, dtype=torch.float32, device=k.device) if smooth else None
    if ki.numel() == 0:
        return ki, delta, mean
    quant_k_kernel[(1 if smooth else nb, heads, bsz)](
        k, ki, delta, delta if mean is None else mean, *k.stride(), seq, heads, nb,
        HEAD_DIM=d, D_PAD=padded_head_dim(d), BLOCK=block, SMOOTH=smooth,
        num_warps=quant_warps(block, padded_head_dim(d)),
    )
    return ki, delta, mean


def quantize_v_fp8(v: torch.Tensor, block: int = 64):
    """v bhsd view -> (v_fp8 e4m3 (B, H, S, D), delta_v (B, H, D) fp32)."""
    bsz, heads, seq, d = v.shape
    v8 = torch.empty(bsz, heads, seq, d, dtype=torch.float8_e4m3fn, device=v.device)
    delta = torch.ones(bsz, heads, d, dtype=torch.float32, device=v.device)
    if v8.numel() == 0:
        return v8, delta
    quant_v_fp8_kernel[(triton.cdiv(d, V_CHANNELS), heads, bsz)](
        v, v8, delta, *v.stride(), seq, heads, HEAD_DIM=d, CHANNELS=V_CHANNELS, BLOCK=block, num_warps=4,
    )
    return v8, delta
