"""Quantization kernels of SageAttention, every launch parallel over blocks of tokens.

- Q: scaled by softmax scale * log2(e), quantized to symmetric INT8 per block of tokens (128,
  or 32 for per-warp granularity); optionally writes each row's lse correction scale * q . mean_k.
- K: INT8 per 64-token block; with smoothing (SageAttention §3.2) of x - mean, the mean over all
  real tokens per (batch, kv head, channel), which every block's scale depends on.
- V (pv="fp8"): per-channel e4m3, delta_v = max|v| / 448 over all tokens.

A whole-sequence statistic (K's mean, V's channel max) takes two small launches before the
quantization: per-block partials over (blocks, heads, batch), then a fold of those partials in
block order over (channel slices, heads, batch). No atomics: the result does not depend on
scheduling, and the sum is added in the order one program walking the blocks would use (one
program per (batch, head) left 120 of an H100's 132 SMs idle at Wan2.1's 12 heads x 32760 tokens).

Launches and global bytes per token (E bytes per input element, D the head dim; hd128 fp16/bf16
in brackets):
  Q              quant_q_kernel     (S/128 | S/32, Hq, B)   read D*E [256], write D + 4/block
                                                            (+ 4 lse shift) [128]
  K, smooth_k    block_stats_kernel (S/64, Hkv, B)   read D*E [256], write 4D/64 [8]
                 reduce_stats_kernel(D/32, Hkv, B)   read 4D/64 [8], write 4D per head
                 quant_k_kernel     (S/64, Hkv, B)   read D*E + 4D/64 (mean, from L2) [264],
                                                     write D + 4/64 [128]
                 together: read 2*D*E + D/8 [528], write D + D/16 + 1/16 [136]
                 (the former single pass read 2*D*E [512], wrote D + 1/16 [128])
  K, no smoothing quant_k_kernel    (S/64, Hkv, B)   read D*E, write D + 4/64
  V, pv="fp8"    the same three launches (block channel max|v|, max fold -> delta_v, e4m3
                 quantization quant_v_fp8_kernel): read 2*D*E + D/8 [528], write D + D/16 [136]
                 (formerly one launch of D/16 channel-slice programs per (batch, head) reading
                 2*D*E [512] and writing D [128])

INT8 follows attnlib.reference.sage exactly: delta = max|x| / 127 in fp32, x / delta rounded
to nearest with ties away from zero (divisions are IEEE-rounded: div_rn).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..flash.common import load_tile
from ..hostmath import cdiv, next_power_of_2
from ..masks import gated

# tl.constexpr: compiled Triton reads module globals only when they are constexpr (the CPU
# interpreter does not check this; compiling for sm_90 here does, tests/triton_sm90.py)
INT8_MAX = tl.constexpr(127.0)
FP8_MAX = tl.constexpr(448.0)
REDUCE_CHANNELS = 32  # channels per one-warp program folding the block partials: one per lane
REDUCE_UNROLL = 32    # block partials loaded per step of that fold (loads in flight, not adds)
# quantize_v_fp8's token rows are rounded up to this (a multiple of every key tile, BLOCK_N <= 64)
# and the padding is written as 0: the attention kernel then loads V^T tiles without a key mask
V_FP8_SEQ_ALIGN = 64


@triton.jit
def round_half_away(y):
    """Nearest integer, ties away from zero, exactly: y - trunc(y) is exact in fp32."""
    t = y.to(tl.int32).to(tl.float32)  # float -> int truncates toward zero
    frac = tl.abs(y - t)
    step = tl.where(y >= 0, 1.0, -1.0)
    return tl.where(frac >= 0.5, t + step, t)


@triton.jit
def int8_block(x):
    """Symmetric INT8 of a whole fp32 tile (padding already 0): (x_int8, delta). A non-finite value
    (NaN, inf, an overflow of the scaling) makes delta NaN, as the reference's amax does (a GPU max
    drops NaN): the scores it enters come out NaN, as in exact attention, not a finite guess."""
    a = tl.abs(x)
    amax = tl.max(tl.max(tl.where(a <= 3.4028234663852886e38, a, float("inf")), 1), 0)
    delta = tl.where(amax <= 3.4028234663852886e38, tl.math.div_rn(amax, INT8_MAX), float("nan"))
    safe = tl.where(delta > 0, delta, 1.0)
    y = round_half_away(tl.math.div_rn(x, safe))
    return tl.minimum(tl.maximum(y, -INT8_MAX), INT8_MAX).to(tl.int8), delta


@triton.jit
def _tile_ptrs(base, b64, h64, row0, offs_s, offs_d, stride_b, stride_h, stride_s, stride_d):
    return (base + b64 * stride_b + h64 * stride_h + (row0 + offs_s[:, None]).to(tl.int64) * stride_s
            + offs_d[None, :] * stride_d)


@triton.jit
def load_block(X, stride_xb, stride_xh, stride_xs, stride_xd, seq,
               HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """The program's token block of x (grid (blocks, heads, batch)) as fp32, rows past seq and the
    head-dim padding 0: (x, blk, b64, h64, row0, offs_s, offs_d, s_ok, d_ok)."""
    blk = tl.program_id(0)
    b64, h64 = tl.program_id(2).to(tl.int64), tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D_PAD)
    row0 = blk * BLOCK
    s_ok = row0 + offs_s < seq
    d_ok = offs_d < HEAD_DIM
    ptrs = _tile_ptrs(X, b64, h64, row0, offs_s, offs_d, stride_xb, stride_xh, stride_xs, stride_xd)
    x = load_tile(ptrs, s_ok, d_ok, True, D_PAD != HEAD_DIM).to(tl.float32)
    return x, blk, b64, h64, row0, offs_s, offs_d, s_ok, d_ok


@triton.jit
def store_block(OUT, y, b64, h64, row0, offs_s, offs_d, s_ok, d_ok, heads, seq, HEAD_DIM: tl.constexpr):
    """y into the contiguous (B, H, S, HEAD_DIM) OUT at the program's token block. The batch
    stride in int64: heads * seq * HEAD_DIM in int32 wrapped from 2**31 elements per batch entry
    (e.g. 32 heads x 512k tokens x hd128)."""
    ptrs = _tile_ptrs(OUT, b64, h64, row0, offs_s, offs_d, tl.cast(heads, tl.int64) * seq * HEAD_DIM, seq * HEAD_DIM,
                      HEAD_DIM, 1)
    tl.store(ptrs, y, mask=s_ok[:, None] & d_ok[None, :])


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
    x, blk, b64, h64, row0, offs_s, offs_d, s_ok, d_ok = load_block(
        X, stride_xb, stride_xh, stride_xs, stride_xd, seq, HEAD_DIM, D_PAD, BLOCK)
    xi, delta = int8_block(x * x_scale)
    store_block(XI, xi, b64, h64, row0, offs_s, offs_d, s_ok, d_ok, heads, seq, HEAD_DIM)
    tl.store(DELTA + (b64 * heads + h64) * n_blocks + blk, delta)
    if LSE_SHIFT:
        kvh64 = h64 // group
        km = tl.load(KMEAN + b64 * stride_mb + kvh64 * stride_mh + offs_d, mask=d_ok, other=0.0)
        shift = tl.sum(x * km[None, :], 1) * lse_scale
        tl.store(SHIFT + (b64 * heads + h64) * seq + row0 + offs_s, shift, mask=s_ok)


@triton.jit(do_not_specialize=["seq", "n_blocks"])
def block_stats_kernel(
    X, PART,
    stride_xb, stride_xh, stride_xs, stride_xd,
    seq, heads, n_blocks,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr, ABSMAX: tl.constexpr,
):
    """Grid (blocks, heads, batch): one BLOCK-token block's per-channel sum (ABSMAX: max|x|) into
    PART fp32 (B, H, n_blocks, HEAD_DIM). Rows past seq load as 0, so they add nothing."""
    x, blk, b64, h64, _, _, offs_d, _, d_ok = load_block(X, stride_xb, stride_xh, stride_xs, stride_xd, seq,
                                                         HEAD_DIM, D_PAD, BLOCK)
    if ABSMAX:
        part = tl.max(tl.abs(x), 0)
    else:
        part = tl.sum(x, 0)
    tl.store(PART + ((b64 * heads + h64) * n_blocks + blk) * HEAD_DIM + offs_d, part, mask=d_ok)


@triton.jit(do_not_specialize=["seq", "n_blocks"])
def reduce_stats_kernel(
    PART, OUT,
    seq, heads, n_blocks,
    HEAD_DIM: tl.constexpr, CHANNELS: tl.constexpr, UNROLL: tl.constexpr, ABSMAX: tl.constexpr,
):
    """Grid (channel slices, heads, batch): PART's block partials folded in block order, one add
    (or max) after another, exactly the order of a single program walking the blocks (the sum is
    bit-reproducible and does not depend on the grid). UNROLL loads in flight per step hide the
    latency. OUT fp32 (B, H, HEAD_DIM): the mean over seq tokens, or (ABSMAX) the e4m3 scale
    delta_v = max|x| / 448 (1 for an all-zero channel)."""
    offs_c = tl.program_id(0) * CHANNELS + tl.arange(0, CHANNELS)
    h = tl.program_id(1)
    b = tl.program_id(2)
    c_ok = offs_c < HEAD_DIM
    bh = b.to(tl.int64) * heads + h
    base = PART + bh * n_blocks * HEAD_DIM + offs_c
    acc = tl.zeros([CHANNELS], dtype=tl.float32)  # + 0.0 and max(., 0) leave every value as is
    for blk0 in range(0, n_blocks, UNROLL):
        for i in tl.static_range(UNROLL):
            part = tl.load(base + (blk0 + i) * HEAD_DIM, mask=gated(c_ok, blk0 + i < n_blocks), other=0.0)
            if ABSMAX:
                acc = tl.maximum(acc, part)
            else:
                acc += part
    if ABSMAX:
        out = tl.math.div_rn(acc, FP8_MAX)
        out = tl.where(out > 0, out, 1.0)
    else:
        out = tl.math.div_rn(acc, seq.to(tl.float32))  # SageAttention §3.2: mean over real tokens only
    tl.store(OUT + bh * HEAD_DIM + offs_c, out, mask=c_ok)


@triton.jit(do_not_specialize=["seq", "n_blocks"])
def quant_k_kernel(
    X, XI, DELTA, KMEAN,
    stride_xb, stride_xh, stride_xs, stride_xd,
    seq, heads, n_blocks,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr, SMOOTH: tl.constexpr,
):
    """Grid (blocks, heads, batch): one block of x (SMOOTH: x - mean, KMEAN fp32 (B, H, D)) to INT8.
    XI int8 (B, H, S, D) contiguous; DELTA fp32 (B, H, n_blocks)."""
    x, blk, b64, h64, row0, offs_s, offs_d, s_ok, d_ok = load_block(
        X, stride_xb, stride_xh, stride_xs, stride_xd, seq, HEAD_DIM, D_PAD, BLOCK)
    if SMOOTH:
        mean = tl.load(KMEAN + (b64 * heads + h64) * HEAD_DIM + offs_d, mask=d_ok, other=0.0)
        x = tl.where(s_ok[:, None] & d_ok[None, :], x - mean[None, :], 0.0)  # padding stays 0
    xi, delta = int8_block(x)
    store_block(XI, xi, b64, h64, row0, offs_s, offs_d, s_ok, d_ok, heads, seq, HEAD_DIM)
    tl.store(DELTA + (b64 * heads + h64) * n_blocks + blk, delta)


@triton.jit(do_not_specialize=["seq"])
def quant_v_fp8_kernel(
    X, XF8, DELTA,
    stride_xb, stride_xh, stride_xs, stride_xd,
    seq, seq_pad, heads,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    """Grid (ceil(seq_pad / BLOCK), heads, batch): one block of x / delta_v (DELTA fp32 (B, H, D),
    from reduce_stats_kernel) rounded to e4m3. XF8 is stored transposed, (B, H, D, seq_pad)
    contiguous (tokens innermost): see quantize_v_fp8. Tokens seq..seq_pad-1 are written as 0
    (x loads as 0 there). seq_pad (a multiple of 64) is specialised: its divisibility and the
    mask's constancy along the tokens let the stores be vectorised."""
    x, _, b64, h64, row0, offs_s, offs_d, _, d_ok = load_block(
        X, stride_xb, stride_xh, stride_xs, stride_xd, seq, HEAD_DIM, D_PAD, BLOCK)
    delta = tl.load(DELTA + (b64 * heads + h64) * HEAD_DIM + offs_d, mask=d_ok, other=1.0)
    y = tl.minimum(tl.maximum(tl.math.div_rn(x, delta[None, :]), -FP8_MAX), FP8_MAX)
    # token s, channel d at XF8[b, h, d, s]: the pointer tile is (BLOCK, D_PAD) like x, strided;
    # offsets in int64 (HEAD_DIM * seq_pad passes 2**31 at 8M tokens of hd256)
    pad64 = tl.cast(seq_pad, tl.int64)
    ptrs = _tile_ptrs(XF8, b64, h64, row0, offs_s, offs_d, heads * HEAD_DIM * pad64, HEAD_DIM * pad64, 1, pad64)
    p_ok = row0 + offs_s < seq_pad
    tl.store(ptrs, y.to(XF8.dtype.element_ty), mask=p_ok[:, None] & d_ok[None, :])


# -- launchers ----------------------------------------------------------------------------------
def padded_head_dim(head_dim: int) -> int:
    """Power of two >= 32: INT8 dots need a reduction dimension of at least 32."""
    return max(32, next_power_of_2(head_dim))


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


def channel_stats(x: torch.Tensor, block: int, absmax: bool) -> torch.Tensor:
    """x bhsd view (S >= 1) -> fp32 (B, H, D): the per-channel mean over tokens, or (absmax) the
    e4m3 scale max|x| / 448. Two launches over (blocks, heads, batch) then (slices, heads, batch);
    deterministic (no atomics), the fold over blocks in block order."""
    bsz, heads, seq, d = x.shape
    nb = n_blocks(seq, block)
    part = torch.empty(bsz, heads, nb, d, dtype=torch.float32, device=x.device)
    out = torch.empty(bsz, heads, d, dtype=torch.float32, device=x.device)
    d_pad = padded_head_dim(d)
    block_stats_kernel[(nb, heads, bsz)](
        x, part, *x.stride(), seq, heads, nb, HEAD_DIM=d, D_PAD=d_pad, BLOCK=block, ABSMAX=absmax,
        num_warps=quant_warps(block, d_pad),
    )
    reduce_stats_kernel[(cdiv(d, REDUCE_CHANNELS), heads, bsz)](
        part, out, seq, heads, nb, HEAD_DIM=d, CHANNELS=REDUCE_CHANNELS, UNROLL=REDUCE_UNROLL, ABSMAX=absmax,
        num_warps=1,
    )
    return out


def quantize_k(k: torch.Tensor, block: int, smooth: bool):
    """k bhsd view -> (k_int8 (B, H, S, D), delta (B, H, nblocks) fp32, mean (B, H, D) fp32 or None)."""
    bsz, heads, seq, d = k.shape
    nb = n_blocks(seq, block)
    ki = torch.empty(bsz, heads, seq, d, dtype=torch.int8, device=k.device)
    delta = torch.empty(bsz, heads, nb, dtype=torch.float32, device=k.device)
    if ki.numel() == 0:
        return ki, delta, torch.zeros(bsz, heads, d, dtype=torch.float32, device=k.device) if smooth else None
    mean = channel_stats(k, block, absmax=False) if smooth else None
    quant_k_kernel[(nb, heads, bsz)](
        k, ki, delta, delta if mean is None else mean, *k.stride(), seq, heads, nb,
        HEAD_DIM=d, D_PAD=padded_head_dim(d), BLOCK=block, SMOOTH=smooth,
        num_warps=quant_warps(block, padded_head_dim(d)),
    )
    return ki, delta, mean


def quantize_v_fp8(v: torch.Tensor, block: int = 64):
    """v bhsd view -> (v_fp8 e4m3 (B, H, S, D), delta_v (B, H, D) fp32).

    v_fp8 is a transposed view: its storage is (B, H, D, S rounded up to V_FP8_SEQ_ALIGN = 64)
    with the tokens innermost (strides (H*D*S64, D*S64, 1, S64)), the padding tokens 0. The PV
    product's B operand is then K-major (K = tokens), the only fp8 operand order Hopper's wgmma
    takes: with V row-major, Triton 3.6 loaded each V tile synchronously to transpose it into
    shared memory (sm_90 TTGIR: a plain tt.load in the loop, no async copy), and pv="fp8" ran at
    half the speed of pv="fp16" on an H100 (stop 22). Padding to a multiple of every key tile,
    written as 0, lets the attention kernel load V^T tiles with no key mask (a per-token mask
    along the contiguous axis would make that load byte-wise and synchronous); it also keeps
    each channel's row 16-byte aligned."""
    bsz, heads, seq, d = v.shape
    seq_pad = -(-seq // V_FP8_SEQ_ALIGN) * V_FP8_SEQ_ALIGN
    v8 = torch.empty(bsz, heads, d, seq_pad, dtype=torch.float8_e4m3fn, device=v.device)
    v8 = v8[..., :seq].transpose(2, 3)
    if v8.numel() == 0:
        return v8, torch.ones(bsz, heads, d, dtype=torch.float32, device=v.device)
    delta = channel_stats(v, block, absmax=True)
    quant_v_fp8_kernel[(n_blocks(seq_pad, block), heads, bsz)](
        v, v8, delta, *v.stride(), seq, seq_pad, heads, HEAD_DIM=d, D_PAD=padded_head_dim(d), BLOCK=block,
        num_warps=quant_warps(block, padded_head_dim(d)),
    )
    return v8, delta
