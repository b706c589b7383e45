"""SageAttention's INT8 algorithm, simulated exactly in PyTorch: the ground truth for method sage.

SageAttention (Zhang et al., arXiv 2410.02367):
  1. smooth K by subtracting its mean over tokens (per batch, kv head, channel) (§3.2);
  2. fold the softmax scale and log2(e) into Q, so QK^T gives base-2 logits;
  3. quantize Q and K to symmetric INT8 per block of tokens (§3.3): delta = max|x| / 127,
     x_int = round-half-away-from-zero(x / delta) clamped to [-127, 127];
  4. S = (Q_int K_int^T) * delta_q * delta_k, softmax in base 2;
  5. P (unnormalised) and V in fp16, PV accumulated in fp32 (§3.4), divided by the row sum.

Options of SageAttention2 (arXiv 2411.10958), simulated here too:
  qk_granularity="per_warp": Q is quantized per group of Q_WARP_BLOCK tokens (the rows one
    warp of a 128-row CTA owns, §3.2 of SageAttention2) instead of per Q_BLOCK tokens;
  pv="fp16_accum": each key block's P V product is rounded to fp16 (the fp16 accumulator of
    consumer-card mma), then added into an fp32 buffer (SageAttention §3.4);
  pv="fp8": P scaled into [0, 448] by adding log2(448) to the base-2 exponent and rounded to
    e4m3; V quantized per channel to e4m3 with delta_v = max|v| / 448 over the tokens; the
    product is accumulated in fp32 and delta_v is applied in the epilogue (SageAttention2 §3.3).

Smoothing shifts every score of a query row by the same constant scale * (q . mean_k), so
the output is unchanged and the log-sum-exp is corrected back by adding that constant.

Autograd: q and k go through rounding, so no gradient flows to them (they are detached);
v receives the gradient of the fp16 PV product (fp16 rounding treated as identity).
"""
from __future__ import annotations

import math

import torch

from ._common import causal_mask, compute_dtype, expand_kv, masked_row_exp, num_blocks

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
INT8_MAX = 127  # symmetric INT8: [-127, 127], -128 unused (SageAttention §3.3)
FP8_MAX = 448.0  # largest finite e4m3 value (SageAttention2 §3.3: P and V in [-448, 448])
LOG2_FP8_MAX = math.log2(FP8_MAX)
Q_BLOCK = 128       # Q tokens per INT8 scale, per_block (SageAttention §3.3)
Q_WARP_BLOCK = 32   # per_warp: a 128-row CTA's 4 warps own 32 rows each (SageAttention2 §3.2)
K_BLOCK = 64        # K tokens per INT8 scale; also the key block of pv="fp16_accum"
QK_GRANULARITIES = ("per_block", "per_warp")
PV_MODES = ("fp16", "fp16_accum", "fp8")


def round_half_away(y: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties away from zero (CUDA roundf), exactly: 0.5 -> 1, -2.5 -> -3."""
    t = torch.trunc(y)
    frac = (y - t).abs()  # exact for floats: y and trunc(y) share exponent range
    return torch.where(frac >= 0.5, t + torch.sign(y), t)


def divide_by_constant(x: torch.Tensor, c: float) -> torch.Tensor:
    """x / c rounded as IEEE division, on every device. PyTorch's CUDA division by a Python or
    0-dim CPU scalar multiplies by the reciprocal instead (one ulp off for some x), so the same
    reference gave other scales on the GPU than on the CPU, and than the kernels' div_rn; a
    tensor divisor takes the true-division path everywhere."""
    return x / torch.full_like(x, c)


def quantize_per_block(x: torch.Tensor, block: int, dim: int = -2):
    """Symmetric INT8 quantization per block of `block` tokens along `dim`.

    x (..., S, D) (token axis `dim`, -2 by default). Returns (x_int8, delta): x_int8 an int8
    tensor shaped like x, delta float32 (..., ceil(S/block), 1) with the token axis moved to
    -2, one scale per block over all its tokens and channels: delta = max|x| / 127 (computed in
    x's precision, float32 for half inputs, then stored as float32). The division uses that
    float32 delta. An all-zero block gets delta = 0 and x_int8 = 0 (dequantizes to 0 exactly).
    """
    xt = x.detach().movedim(dim, -2)
    xt = xt.to(compute_dtype(xt.dtype))
    s, d = xt.shape[-2], xt.shape[-1]
    nb = num_blocks(s, block)
    pad = nb * block - s
    if pad:  # zero rows never change a block's max|x|
        xt_p = torch.cat([xt, xt.new_zeros(*xt.shape[:-2], pad, d)], dim=-2)
    else:
        xt_p = xt
    blocks = xt_p.reshape(*xt.shape[:-2], nb, block * d)
    delta = divide_by_constant(blocks.abs().amax(dim=-1, keepdim=True), INT8_MAX).to(torch.float32)
    safe = torch.where(delta > 0, delta, torch.ones_like(delta)).to(xt.dtype)
    y = blocks / safe
    xi = round_half_away(y).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    xi = xi.reshape(*xt.shape[:-2], nb * block, d)[..., :s, :]
    return xi.movedim(-2, dim), delta


def _per_token(delta: torch.Tensor, block: int, seq: int) -> torch.Tensor:
    """(..., nblocks, 1) -> (..., seq, 1): each token's block scale."""
    return delta.repeat_interleave(block, dim=-2)[..., :seq, :]


def q_block_size(qk_granularity: str) -> int:
    """Q tokens per INT8 scale for a qk_granularity."""
    if qk_granularity not in QK_GRANULARITIES:
        raise ValueError(f"qk_granularity must be one of {QK_GRANULARITIES}, got {qk_granularity!r}")
    return Q_BLOCK if qk_granularity == "per_block" else Q_WARP_BLOCK


def quantize_v_fp8(v: torch.Tensor):
    """V (..., S, D) -> (v_fp8 as float values, delta_v (..., 1, D) float32): per channel over all
    tokens, delta_v = max|v| / 448 (1 where a channel is all zero), v / delta_v rounded to e4m3."""
    vc = v.detach().to(torch.float32)
    if vc.shape[-2] == 0:  # no tokens: amax refuses an empty reduction
        delta = vc.new_zeros(*vc.shape[:-2], 1, vc.shape[-1])
    else:
        delta = divide_by_constant(vc.abs().amax(dim=-2, keepdim=True), FP8_MAX)
    delta = torch.where(delta > 0, delta, torch.ones_like(delta))
    v8 = (vc / delta).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return v8.to(torch.float32), delta


def _pv_product(p: torch.Tensor, v: torch.Tensor, pv: str, k_block: int, ct: torch.dtype):
    """(unnormalised P) V as the chosen PV mode computes it; returns (PV, factor) so that the
    output is PV * factor / l with l the row sum of p (p is exp2(s - m) in fp32/fp64)."""
    if pv == "fp8":  # p * 448 <= 448; l is scaled alike, so the factor 1/448 cancels
        p8 = (p * FP8_MAX).to(torch.float32).to(torch.float8_e4m3fn).to(ct)
        v8, delta_v = quantize_v_fp8(v)
        return p8 @ v8.to(ct), delta_v.to(ct) / FP8_MAX
    p16 = p.to(torch.float16).to(ct)
    v16 = v.to(torch.float16).to(ct)
    if pv == "fp16":
        return p16 @ v16, 1.0
    # fp16_accum: every key block's partial product passes through an fp16 accumulator
    acc = torch.zeros(*p.shape[:-1], v.shape[-1], dtype=ct, device=p.device)
    for j0 in range(0, p.shape[-1], k_block):
        part = p16[..., j0:j0 + k_block] @ v16[..., j0:j0 + k_block, :]
        acc = acc + part.to(torch.float16).to(ct)
    return acc, 1.0


def sage_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                   scale: float | None = None, smooth_k: bool = True, return_lse: bool = False,
                   q_block: int | None = None, k_block: int = K_BLOCK, qk_granularity: str = "per_block",
                   pv: str = "fp16"):
    """q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D[v]) bhsd. Output in q's dtype; lse (natural log, for
    the unsmoothed scores) float32 (float64 for float64 inputs), shape (B, Hq, Sq). Rows with no
    visible key give 0 and lse -inf. Blocks are per (batch, head); K is quantized per kv head.
    q_block defaults to the qk_granularity's block (128 per_block, 32 per_warp); pv is one of
    PV_MODES (see the module docstring)."""
    if pv not in PV_MODES:
        raise ValueError(f"pv must be one of {PV_MODES}, got {pv!r}")
    q_block = q_block_size(qk_granularity) if q_block is None else q_block
    ct = compute_dtype(q.dtype)
    hq, sq, sk = q.shape[1], q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qc, kc = q.detach().to(ct), k.detach().to(ct)

    smooth_k = smooth_k and sk > 0  # no keys: nothing to smooth (the mean would be NaN)
    if smooth_k:  # SageAttention §3.2
        k_mean = kc.mean(dim=-2, keepdim=True)  # (B, Hkv, 1, D)
        kc = kc - k_mean
    q_i8, dq = quantize_per_block(qc * (scale * LOG2E), q_block)
    k_i8, dk = quantize_per_block(kc, k_block)

    # exact integer dot products: |sum| <= 127^2 * D, far inside float64's 2^53
    dots = q_i8.to(torch.float64) @ expand_kv(k_i8.to(torch.float64), hq).transpose(-1, -2)
    dq_tok = _per_token(dq, q_block, sq).to(ct)                                  # (B, Hq, Sq, 1)
    dk_tok = _per_token(expand_kv(dk, hq), k_block, sk).to(ct).transpose(-1, -2)  # (B, Hq, 1, Sk)
    # base-2 logits; delta_q * delta_k first, as the kernels multiply (dots * delta_q alone
    # overflowed float32 to inf, then NaN, from scale ~1e36 on, which the kernels run finitely)
    s2 = dots.to(ct) * (dq_tok * dk_tok)

    mask = causal_mask(sq, sk, q.device) if causal else None
    p, m_safe, l_safe, has = masked_row_exp(s2, mask, exp=torch.exp2)

    # SageAttention §3.4: P and V in fp16 (or fp8), accumulation in fp32 (float64 for float64 inputs)
    pv_out, factor = _pv_product(p, expand_kv(v.detach() if pv == "fp8" else v, hq), pv, k_block, ct)
    out = (pv_out * factor / l_safe).to(q.dtype)
    if not return_lse:
        return out

    lse = (m_safe + torch.log2(l_safe)) * LN2
    if smooth_k:  # undo the per-row shift scale * (q . mean_k) that smoothing introduced
        lse = lse + scale * (qc @ expand_kv(k_mean, hq).transpose(-1, -2))
    lse = torch.where(has, lse, torch.full_like(lse, float("-inf"))).squeeze(-1)
    return out, lse.to(torch.float64 if ct == torch.float64 else torch.float32)
