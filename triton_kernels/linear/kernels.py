"""Triton kernels of linear attention and their launchers. Three primitives, all fp32-accumulating:

* ``state``: S = sum_j phi(K_j)^T V_j (DK x DV) and z = sum_j phi(K_j), split over rows; the
  splits are summed on the host (deterministic, no atomics).
* ``apply``: O_i = phi(Q_i) S, divided by phi(Q_i) . z + eps when NORMALIZE.
* ``causal``: O_i = sum_{j <= i + offset} (phi(Q_i) . phi(K_j)) V_j, over query chunks of CHUNK
  rows: a masked quadratic inside the chunk plus a running state (S, z) across chunks (the
  chunked form of the recurrence; fla's "chunk" algorithm), divided by the matching
  denominator + eps when NORMALIZE.

The forward uses them with the feature map fused into the loads; the backward composes them
with feature-mapped / gradient tensors (FEAT = identity). Rows whose denominator is exactly 0
(a relu row that is all zero with eps = 0, or a row that sees no key) give 0, not NaN.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

FEATURE_IDS = {"identity": 0, "elu": 1, "relu": 2, "softmax": 3}
CHUNK = 64  # causal chunk (issue 6): quadratic inside, state across


def interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def pad(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def precision(dtype: torch.dtype) -> str:
    # every dot multiplies fp32 values (feature-mapped tiles, fp32 states): tf32x3 keeps fp32-level
    # error on tensor cores (see flash/common.dot_precision)
    return "tf32x3"


@triton.jit
def feature_map(x, rows_ok, cols_ok, FEAT: tl.constexpr):
    """phi over the last (head) dim of an fp32 tile; padded rows / columns come out 0."""
    if FEAT == 1:  # elu + 1 (Katharopoulos et al. §3.2)
        x = tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
    elif FEAT == 2:
        x = tl.maximum(x, 0.0)
    elif FEAT == 3:  # softmax over head_dim
        x = tl.where(cols_ok[None, :], x, float("-inf"))
        x = tl.exp(x - tl.max(x, 1)[:, None])
        x = x / tl.sum(x, 1)[:, None]
    return tl.where(rows_ok[:, None] & cols_ok[None, :], x, 0.0)


@triton.jit(do_not_specialize=["seq", "rows_per_split"])
def linear_state_kernel(K, V, S, Z,
                        stride_kb, stride_kh, stride_kn, stride_kd,
                        stride_vb, stride_vh, stride_vn, stride_vd,
                        heads, seq, rows_per_split,
                        DK: tl.constexpr, DK_PAD: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr,
                        FEAT: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    """Grid (splits, batch * heads, value blocks). S: (splits, B*H, DK, DV), Z: (splits, B*H, DK) fp32."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    pid_v = tl.program_id(2)
    b64 = (bh // heads).to(tl.int64)
    h64 = (bh % heads).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, DK_PAD)
    offs_v = pid_v * BV + tl.arange(0, BV)
    k_ok = offs_k < DK
    v_ok = offs_v < DV
    k_base = K + b64 * stride_kb + h64 * stride_kh + offs_k[None, :] * stride_kd
    v_base = V + b64 * stride_vb + h64 * stride_vh + offs_v[None, :] * stride_vd
    s = tl.zeros([DK_PAD, BV], dtype=tl.float32)
    z = tl.zeros([DK_PAD], dtype=tl.float32)
    lo = split * rows_per_split
    hi = tl.minimum(lo + rows_per_split, seq)
    for start in range(lo, hi, BLOCK_N):
        rows = start + offs_n
        n_ok = rows < hi
        kt = tl.load(k_base + rows[:, None].to(tl.int64) * stride_kn, mask=n_ok[:, None] & k_ok[None, :],
                     other=0.0).to(tl.float32)
        kf = feature_map(kt, n_ok, k_ok, FEAT)
        vt = tl.load(v_base + rows[:, None].to(tl.int64) * stride_vn, mask=n_ok[:, None] & v_ok[None, :],
                     other=0.0).to(tl.float32)
        s = tl.dot(tl.trans(kf), vt, s, input_precision=PREC)
        z += tl.sum(kf, 0)
    base = split.to(tl.int64) * tl.num_programs(1) + bh
    tl.store(S + base * DK * DV + offs_k[:, None] * DV + offs_v[None, :], s, mask=k_ok[:, None] & v_ok[None, :])
    if pid_v == 0:
        tl.store(Z + base * DK + offs_k, z, mask=k_ok)


@triton.jit(do_not_specialize=["seq"])
def linear_apply_kernel(Q, S, Z, O,
                        stride_qb, stride_qh, stride_qm, stride_qd,
                        stride_ob, stride_oh, stride_om, stride_od,
                        heads, group, seq, eps,
                        DK: tl.constexpr, DK_PAD: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr,
                        FEAT: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, PREC: tl.constexpr):
    """Grid (query blocks, batch * heads, value blocks). S: (B, heads // group, DK, DV) fp32
    contiguous, Z: (B, heads // group, DK); query head h reads state head h // group."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    pid_v = tl.program_id(2)
    b = bh // heads
    h = bh % heads
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    sh64 = (b * (heads // group) + h // group).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, DK_PAD)
    offs_v = pid_v * BV + tl.arange(0, BV)
    m_ok = offs_m < seq
    k_ok = offs_k < DK
    v_ok = offs_v < DV
    qt = tl.load(Q + b64 * stride_qb + h64 * stride_qh + offs_m[:, None].to(tl.int64) * stride_qm
                 + offs_k[None, :] * stride_qd, mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
    qf = feature_map(qt, m_ok, k_ok, FEAT)
    s = tl.load(S + sh64 * DK * DV + offs_k[:, None] * DV + offs_v[None, :], mask=k_ok[:, None] & v_ok[None, :],
                other=0.0)
    num = tl.dot(qf, s, input_precision=PREC)
    if NORMALIZE:
        z = tl.load(Z + sh64 * DK + offs_k, mask=k_ok, other=0.0)
        den = tl.sum(qf * z[None, :], 1) + eps
        num = tl.where(den[:, None] == 0.0, 0.0, num / tl.where(den == 0.0, 1.0, den)[:, None])
    tl.store(O + b64 * stride_ob + h64 * stride_oh + offs_m[:, None].to(tl.int64) * stride_om
             + offs_v[None, :] * stride_od, num.to(O.dtype.element_ty), mask=m_ok[:, None] & v_ok[None, :])


@triton.jit(do_not_specialize=["seq_q", "seq_k", "offset"])
def linear_causal_kernel(Q, K, V, O,
                         stride_qb, stride_qh, stride_qm, stride_qd,
                         stride_kb, stride_kh, stride_kn, stride_kd,
                         stride_vb, stride_vh, stride_vn, stride_vd,
                         stride_ob, stride_oh, stride_om, stride_od,
                         heads, group, seq_q, seq_k, offset, eps,
                         DK: tl.constexpr, DK_PAD: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr,
                         FEAT: tl.constexpr, NORMALIZE: tl.constexpr, CHUNK: tl.constexpr, PREC: tl.constexpr):
    """Grid (batch * heads, value blocks). Query i sees keys j <= i + offset. The chunk of queries
    [m0, m0 + CHUNK) reads keys [m0 + offset, m0 + offset + CHUNK) through the masked quadratic
    (j - offset <= i) and every earlier key through the state, so each key enters the state once."""
    bh = tl.program_id(0)
    pid_v = tl.program_id(1)
    b64 = (bh // heads).to(tl.int64)
    h = bh % heads
    h64 = h.to(tl.int64)
    kvh64 = (h // group).to(tl.int64)
    offs_c = tl.arange(0, CHUNK)
    offs_k = tl.arange(0, DK_PAD)
    offs_v = pid_v * BV + tl.arange(0, BV)
    k_ok = offs_k < DK
    v_ok = offs_v < DV
    q_base = Q + b64 * stride_qb + h64 * stride_qh + offs_k[None, :] * stride_qd
    k_base = K + b64 * stride_kb + kvh64 * stride_kh + offs_k[None, :] * stride_kd
    v_base = V + b64 * stride_vb + kvh64 * stride_vh + offs_v[None, :] * stride_vd
    o_base = O + b64 * stride_ob + h64 * stride_oh + offs_v[None, :] * stride_od
    s = tl.zeros([DK_PAD, BV], dtype=tl.float32)
    z = tl.zeros([DK_PAD], dtype=tl.float32)
    # keys every query sees (before the first chunk's window) go straight into the state
    for start in range(0, tl.maximum(tl.minimum(offset, seq_k), 0), CHUNK):
        cols = start + offs_c
        n_ok = cols < tl.minimum(offset, seq_k)
        kt = tl.load(k_base + cols[:, None].to(tl.int64) * stride_kn, mask=n_ok[:, None] & k_ok[None, :],
                     other=0.0).to(tl.float32)
        kf = feature_map(kt, n_ok, k_ok, FEAT)
        vt = tl.load(v_base + cols[:, None].to(tl.int64) * stride_vn, mask=n_ok[:, None] & v_ok[None, :],
                     other=0.0).to(tl.float32)
        s = tl.dot(tl.trans(kf), vt, s, input_precision=PREC)
        z += tl.sum(kf, 0)
    for m0 in range(0, seq_q, CHUNK):
        rows = m0 + offs_c
        m_ok = rows < seq_q
        qt = tl.load(q_base + rows[:, None].to(tl.int64) * stride_qm, mask=m_ok[:, None] & k_ok[None, :],
                     other=0.0).to(tl.float32)
        qf = feature_map(qt, m_ok, k_ok, FEAT)
        cols = m0 + offset + offs_c
        n_ok = (cols >= 0) & (cols < seq_k)
        kt = tl.load(k_base + cols[:, None].to(tl.int64) * stride_kn, mask=n_ok[:, None] & k_ok[None, :],
                     other=0.0).to(tl.float32)
        kf = feature_map(kt, n_ok, k_ok, FEAT)
        vt = tl.load(v_base + cols[:, None].to(tl.int64) * stride_vn, mask=n_ok[:, None] & v_ok[None, :],
                     other=0.0).to(tl.float32)
        scores = tl.dot(qf, tl.trans(kf), input_precision=PREC)
        scores = tl.where(offs_c[None, :] <= offs_c[:, None], scores, 0.0)
        num = tl.dot(qf, s, input_precision=PREC)
        num = tl.dot(scores, vt, num, input_precision=PREC)
        if NORMALIZE:
            den = tl.sum(qf * z[None, :], 1) + tl.sum(scores, 1) + eps
            num = tl.where(den[:, None] == 0.0, 0.0, num / tl.where(den == 0.0, 1.0, den)[:, None])
        tl.store(o_base + rows[:, None].to(tl.int64) * stride_om, num.to(O.dtype.element_ty),
                 mask=m_ok[:, None] & v_ok[None, :])
        s = tl.dot(tl.trans(kf), vt, s, input_precision=PREC)
        z += tl.sum(kf, 0)


# ---- launchers ----------------------------------------------------------------------------
def _value_block(dv: int) -> int:
    return min(64, pad(dv))


def _warps(dk_pad: int, bv: int) -> int:
    return 1 if interpreting() else (8 if dk_pad * bv >= 128 * 64 else 4)


def state(k: torch.Tensor, v: torch.Tensor, feature: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(S (B, H, DK, DV), z (B, H, DK)) fp32 over all rows of bhsd k (B, H, N, DK), v (B, H, N, DV)."""
    batch, heads, seq, dk = k.shape
    dv = v.shape[3]
    block_n = 16 if interpreting() else 64
    # enough splits to fill the GPU; each split a multiple of block_n rows
    rows = max(block_n, triton.cdiv(triton.cdiv(seq, max(1, 264 // max(1, batch * heads))), block_n) * block_n)
    splits = max(1, triton.cdiv(seq, rows))
    bv = _value_block(dv)
    s = torch.empty(splits, batch * heads, dk, dv, dtype=torch.float32, device=k.device)
    z = torch.empty(splits, batch * heads, dk, dtype=torch.float32, device=k.device)
    if seq == 0:
        return s.new_zeros(batch, heads, dk, dv), z.new_zeros(batch, heads, dk)
    linear_state_kernel[(splits, batch * heads, triton.cdiv(dv, bv))](
        k, v, s, z, *k.stride(), *v.stride(), heads, seq, rows,
        DK=dk, DK_PAD=pad(dk), DV=dv, BV=bv, FEAT=FEATURE_IDS[feature], BLOCK_N=block_n,
        PREC=precision(k.dtype), num_warps=_warps(pad(dk), bv))
    return s.sum(0).view(batch, heads, dk, dv), z.sum(0).view(batch, heads, dk)


def apply(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, out: torch.Tensor, feature: str,
          eps: float = 0.0) -> torch.Tensor:
    """out (B, Hq, N, DV) = phi(q) s [/ (phi(q) . z + eps) when z is given]; s (B, Hs, DK, DV)."""
    batch, heads, seq, dk = q.shape
    dv = s.shape[3]
    if seq == 0 or batch * heads == 0:
        return out
    s = s.contiguous()
    z = s if z is None else z.contiguous()
    bv = _value_block(dv)
    block_m = 16 if interpreting() else 64
    linear_apply_kernel[(triton.cdiv(seq, block_m), batch * heads, triton.cdiv(dv, bv))](
        q, s, z, out, *q.stride(), *out.stride(), heads, heads // s.shape[1], seq, eps,
        DK=dk, DK_PAD=pad(dk), DV=dv, BV=bv, FEAT=FEATURE_IDS[feature], NORMALIZE=z is not s,
        BLOCK_M=block_m, PREC=precision(q.dtype), num_warps=_warps(pad(dk), bv))
    return out


def causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, feature: str, *, offset: int,
           normalize: bool, eps: float = 0.0) -> torch.Tensor:
    """out_i = sum_{j <= i + offset} (phi(q_i) . phi(k_j)) v_j [/ (sum_j phi(q_i) . phi(k_j) + eps)];
    q (B, Hq, Sq, DK), k (B, Hkv, Sk, DK), v (B, Hkv, Sk, DV), out (B, Hq, Sq, DV)."""
    batch, heads, seq_q, dk = q.shape
    seq_k, dv = k.shape[2], v.shape[3]
    if seq_q == 0 or batch * heads == 0:
        return out
    bv = _value_block(dv)
    linear_causal_kernel[(batch * heads, triton.cdiv(dv, bv))](
        q, k, v, out, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        heads, heads // k.shape[1], seq_q, seq_k, offset, eps,
        DK=dk, DK_PAD=pad(dk), DV=dv, BV=bv, FEAT=FEATURE_IDS[feature], NORMALIZE=normalize, CHUNK=CHUNK,
        # one stage: the default 3-stage pipeline needs 272 KB at hd128 bf16 (352 KB fp32), past
        # H100's 227 KB; one stage takes 192 KB (compiled for sm_90 here, tests/triton_sm90.py)
        PREC=precision(q.dtype), num_warps=_warps(pad(dk), bv), num_stages=1)
    return out
