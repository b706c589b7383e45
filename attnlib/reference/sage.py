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
from dataclasses import dataclass, replace

import torch

from ._common import causal_mask, compute_dtype, masked_row_exp, num_blocks

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


def exact_dot_dtype(head_dim: int, ct: torch.dtype) -> torch.dtype:
    """A dtype whose matmul of INT8 values is exact: every partial sum, at most 127^2 * head_dim
    in magnitude, is an integer float32 holds exactly while below 2^24 (head_dim <= 1040), float64
    below 2^53. Exact sums are the same in any order, so a block of rows gets the whole call's."""
    return torch.float32 if ct == torch.float32 and INT8_MAX ** 2 * head_dim < 2 ** 24 else torch.float64


@dataclass(frozen=True)
class SageKeys:
    """What every block of query rows shares, prepared once over all keys: K smoothed and INT8
    quantized, V as the PV mode reads it, and the call's options. Tensors are (B, heads, ...) with
    one kv head per head until select() gives each query head its own."""

    k_i8: torch.Tensor               # (B, H, Sk, D) int8 (in the dot dtype after in_dot_dtype())
    dk_tok: torch.Tensor             # (B, H, 1, Sk) each key's INT8 scale, compute dtype
    k_mean: torch.Tensor | None      # (B, H, 1, D) K's token mean, compute dtype; None unsmoothed
    v_pv: torch.Tensor               # (B, H, Sk, Dv) V as given (pv="fp8": e4m3 of V / delta_v)
    v_factor: torch.Tensor | float   # pv="fp8": delta_v / 448, (B, H, 1, Dv); else 1.0
    scale: float
    causal: bool
    q_block: int
    k_block: int
    pv: str
    v_ready: bool = False            # v_pv already as the PV product reads it (in_dot_dtype())

    def select(self, batches: slice, heads_q: slice, group: int) -> "SageKeys":
        """The keys of query heads heads_q (group query heads per kv head) in batches: views
        without GQA, copies of the kv heads they read with it. Whole groups are copied as expand_kv
        copies them, by repeat_interleave, whose backward sums a kv head's query-head gradients of
        v in float32 and rounds once, as the reference always has (a gather's backward adds them
        one fp16 rounding at a time); part of a group (a chunk of heads, no backward) by a gather."""
        h0, h1 = heads_q.start, heads_q.stop
        if group == 1:
            heads = heads_q
        elif h0 % group == 0 and (h1 - h0) % group == 0:
            heads = None  # whole groups
        else:
            heads = torch.arange(h0, h1, device=self.k_i8.device) // group

        def pick(t):
            if not isinstance(t, torch.Tensor):
                return t
            if heads is None:
                return t[batches][:, h0 // group:h1 // group].repeat_interleave(group, dim=1)
            return t[batches][:, heads]

        return replace(self, k_i8=pick(self.k_i8), dk_tok=pick(self.dk_tok), k_mean=pick(self.k_mean),
                       v_pv=pick(self.v_pv), v_factor=pick(self.v_factor))

    def in_dot_dtype(self) -> "SageKeys":
        """These keys with the conversions attend_rows would make of them on every call made once:
        K's INT8 values in the dtype of their exact dots, V rounded to fp16 (pv="fp16",
        "fp16_accum") in the compute dtype; the same values, so the same results. For the blocks of
        rows of one chunk of heads in sage-torch-chunked, which has no backward: detached."""
        ct = self.dk_tok.dtype
        v = self.v_pv.detach()
        if self.pv != "fp8" and not self.v_ready:
            v = v.to(torch.float16).to(ct)
        k = self.k_i8.to(exact_dot_dtype(self.k_i8.shape[-1], ct))
        return replace(self, k_i8=k, v_pv=v, v_ready=True)


def _by_head(quantize, heads: int):
    """quantize(slice(h, h + 1)) for every head h, its results concatenated along heads: the same
    values as one call over all heads (no scale spans two heads), while the quantization's float
    temporaries (five or six copies of its input) stay one head's size."""
    parts = [quantize(slice(h, h + 1)) for h in range(heads)]
    return tuple(torch.cat(p, dim=1) for p in zip(*parts))


def prepare_keys(k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool = False, smooth_k: bool = True,
                 q_block: int = Q_BLOCK, k_block: int = K_BLOCK, pv: str = "fp16",
                 ct: torch.dtype = torch.float32) -> SageKeys:
    """k/v (B, Hkv, Sk, D[v]) bhsd -> SageKeys, computing in ct (float32, or float64)."""
    if pv not in PV_MODES:
        raise ValueError(f"pv must be one of {PV_MODES}, got {pv!r}")
    kc = k.detach().to(ct)
    k_mean = None
    if smooth_k and kc.shape[-2] > 0:  # SageAttention §3.2 (no keys: the mean would be NaN)
        k_mean = kc.mean(dim=-2, keepdim=True)
    k_i8, dk = _by_head(lambda h: quantize_per_block(kc[:, h] if k_mean is None else kc[:, h] - k_mean[:, h],
                                                     k_block), kc.shape[1])
    dk_tok = _per_token(dk, k_block, kc.shape[-2]).to(ct).transpose(-1, -2)
    if pv == "fp8":  # P is scaled by 448 into e4m3's range: 1/448 here cancels it
        v8, delta_v = _by_head(lambda h: quantize_v_fp8(v[:, h]), v.shape[1])
        v_pv, v_factor = v8.to(ct), delta_v.to(ct) / FP8_MAX
    else:  # rounded to fp16 per query head, after select(), as ever: the cast's backward then
        # rounds each query head's gradient to fp16 before GQA sums them
        v_pv, v_factor = v, 1.0
    return SageKeys(k_i8, dk_tok, k_mean, v_pv, v_factor, scale, causal, q_block, k_block, pv)


def _pv_product_(p: torch.Tensor, v: torch.Tensor, pv: str, k_block: int,
                 v_ready: bool = False) -> torch.Tensor:
    """(unnormalised P) V as the PV mode computes it, p (exp2(s - m) in fp32/fp64) rounded in
    place, v SageKeys.v_pv (rounded to fp16 here, unless v_ready). The output is this times
    v_factor over the row sum of p."""
    if pv == "fp8":  # p * 448 <= 448: e4m3's range (SageAttention2 §3.3)
        p.copy_(p.mul_(FP8_MAX).to(torch.float32).to(torch.float8_e4m3fn))
        return p @ v
    p.copy_(p.to(torch.float16))
    if not v_ready:
        v = v.to(torch.float16).to(p.dtype)
    if pv == "fp16":
        return p @ v
    # fp16_accum: every key block's partial product passes through an fp16 accumulator
    acc = torch.zeros(*p.shape[:-1], v.shape[-1], dtype=p.dtype, device=p.device)
    for j0 in range(0, p.shape[-1], k_block):
        part = p[..., j0:j0 + k_block] @ v[..., j0:j0 + k_block, :]
        acc = acc + part.to(torch.float16).to(p.dtype)
    return acc


def attend_rows(keys: SageKeys, q: torch.Tensor, row0: int, seq_q: int, return_lse: bool = False):
    """Rows row0:row0 + rows of a seq_q-row call: q (B, H, rows, D) and keys select()-ed to its
    heads. row0 must be a multiple of keys.q_block, so Q's INT8 blocks are the whole call's.
    Returns (out (B, H, rows, Dv) in q's dtype, lse (B, H, rows) or None)."""
    if row0 % keys.q_block:
        raise ValueError(f"row0 {row0} is not a multiple of the Q block {keys.q_block}")
    ct = compute_dtype(q.dtype)
    rows, seq_k = q.shape[2], keys.k_i8.shape[2]
    # bottom-right causal: the last row sees keys j <= row0 + rows - 1 + seq_k - seq_q
    kend = max(0, row0 + rows + seq_k - seq_q) if keys.causal else seq_k
    qc = q.detach().to(ct)
    q_i8, dq = quantize_per_block(qc * (keys.scale * LOG2E), keys.q_block)

    dt = exact_dot_dtype(q.shape[-1], ct)  # exact integer dots, whatever rows a call holds
    s = (q_i8.to(dt) @ keys.k_i8[..., :kend, :].to(dt).transpose(-1, -2)).to(ct)
    # base-2 logits; delta_q * delta_k first, as the kernels multiply (dots * delta_q alone
    # overflowed float32 to inf, then NaN, from scale ~1e36 on, which the kernels run finitely)
    dk_tok = keys.dk_tok[..., :kend]
    for i, r in enumerate(range(0, rows, keys.q_block)):
        s[..., r:r + keys.q_block, :].mul_(dq[..., i:i + 1, :].to(ct) * dk_tok)

    # these rows of the call's mask: causal_mask's diagonal offset kend - rows is row0 + seq_k - seq_q
    # (where kend is clipped to 0, no row sees a key either way)
    mask = causal_mask(rows, kend, q.device) if keys.causal else None
    p, m_safe, l_safe, has = masked_row_exp(s, mask, exp=torch.exp2, inplace=True)
    # SageAttention §3.4: P and V in fp16 (or fp8), accumulation in fp32 (float64 for float64 inputs)
    pv_out = _pv_product_(p, keys.v_pv[..., :kend, :], keys.pv, keys.k_block, keys.v_ready)
    out = (pv_out * keys.v_factor / l_safe).to(q.dtype)
    if not return_lse:
        return out, None

    lse = (m_safe + torch.log2(l_safe)) * LN2
    if keys.k_mean is not None:  # undo the per-row shift scale * (q . mean_k) that smoothing introduced
        lse = lse + keys.scale * (qc @ keys.k_mean.transpose(-1, -2))
    lse = torch.where(has, lse, torch.full_like(lse, float("-inf"))).squeeze(-1)
    return out, lse.to(torch.float64 if ct == torch.float64 else torch.float32)


def sage_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                   scale: float | None = None, smooth_k: bool = True, return_lse: bool = False,
                   q_block: int | None = None, k_block: int = K_BLOCK, qk_granularity: str = "per_block",
                   pv: str = "fp16"):
    """q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D[v]) bhsd. Output in q's dtype; lse (natural log, for
    the unsmoothed scores) float32 (float64 for float64 inputs), shape (B, Hq, Sq). Rows with no
    visible key give 0 and lse -inf. Blocks are per (batch, head); K is quantized per kv head.
    q_block defaults to the qk_granularity's block (128 per_block, 32 per_warp); pv is one of
    PV_MODES (see the module docstring). All rows at once: sage-torch-chunked runs attend_rows
    per block of rows instead."""
    q_block = q_block_size(qk_granularity) if q_block is None else q_block
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    keys = prepare_keys(k, v, scale=scale, causal=causal, smooth_k=smooth_k, q_block=q_block, k_block=k_block,
                        pv=pv, ct=compute_dtype(q.dtype))
    keys = keys.select(slice(None), slice(0, q.shape[1]), q.shape[1] // k.shape[1])
    out, lse = attend_rows(keys, q, 0, q.shape[2], return_lse)
    return (out, lse) if return_lse else out
