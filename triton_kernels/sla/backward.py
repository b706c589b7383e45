"""The SLA backward's linear branch (the critical branch is block_sparse's backward, reused).

With den_r = phi(q_r) . Z_i + eps, O_l,r = phi(q_r) H_i / den_r and G = dO_l (= dO W):
  dn_r = G_r / den_r,   dd_r = -(G_r . O_l,r) / den_r,
  dphi(q_r) = dn_r H_i^T + dd_r Z_i,   dH_i = phi(Q_i)^T dN_i,   dZ_i = sum_r dd_r phi(q_r);
and per key block j, with dh_j = sum of dH_i and dz_j = sum of dZ_i over the query blocks i for
which j is marginal (pre-aggregated over the column form, as the forward does over rows):
  dV_j = phi(K_j) dh_j,   dphi(K_j) = V_j dh_j^T + dz_j.
The feature map's derivative is applied in-kernel. GQA: a key program sums its group's heads.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..linear.kernels import FEATURE_IDS, feature_map
from .classify import BlockIndex, padded
from .forward import LINEAR_EPS, marginal_sum


@triton.jit
def feature_map_vjp(x, phi, dphi, FEAT: tl.constexpr):
    """d/dx of sum(dphi * phi(x)) for the feature maps of linear.kernels.feature_map (padded
    entries have phi = 0 and come out 0)."""
    if FEAT == 1:  # elu + 1: 1 above 0, exp(x) = phi below
        dx = tl.where(x > 0, dphi, dphi * phi)
    elif FEAT == 2:
        dx = tl.where(x > 0, dphi, 0.0)
    elif FEAT == 3:  # softmax over head_dim
        dx = phi * (dphi - tl.sum(dphi * phi, 1)[:, None])
    else:
        dx = dphi
    return dx


@triton.jit(do_not_specialize=["seq_q"])
def sla_linear_dq_kernel(
    Q, DOL, OL, H, Z, H_TOT, Z_TOT, N_CRIT, N_MARG, IDX, DQL, DH, DZ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    seq_q, group, num_kb, eps,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, FEAT: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Grid (query blocks, query heads, batch). DOL, OL, DQL (B, Hq, Mq * BLOCK_M, D) fp32
    contiguous; DH (B, Hq, Mq, D, D), DZ (B, Hq, Mq, D) fp32; the rest as sla_fwd_kernel."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    heads = tl.num_programs(1)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_i = tl.arange(0, BLOCK_M)
    offs_m = pid_m * BLOCK_M + offs_i
    offs_d = tl.arange(0, D_PAD)
    m_ok = offs_m < seq_q
    d_ok = offs_d < HEAD_DIM
    tile_mask = m_ok[:, None] & d_ok[None, :]
    row_id = (b64 * heads + h64) * tl.num_programs(0) + pid_m
    kv_slab = b64 * (heads // group) + h // group
    n_marg = tl.load(N_MARG + row_id)
    b_h, b_z = marginal_sum(H + kv_slab * num_kb * HEAD_DIM * HEAD_DIM, Z + kv_slab * num_kb * HEAD_DIM,
                            H_TOT + kv_slab * HEAD_DIM * HEAD_DIM, Z_TOT + kv_slab * HEAD_DIM,
                            IDX + row_id * num_kb, tl.load(N_CRIT + row_id), n_marg, num_kb,
                            offs_d, offs_d, d_ok, d_ok, HEAD_DIM, HEAD_DIM)
    x = tl.load(Q + b64 * stride_qb + h64 * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=tile_mask, other=0.0).to(tl.float32)
    phi_q = feature_map(x, m_ok, d_ok, FEAT)
    den = tl.sum(phi_q * b_z[None, :], 1) + eps
    # a block with no marginal key feeds no key block: its dH (~ 1 / eps) must not enter the
    # column totals, where the pre-aggregation would subtract it again (catastrophic cancellation)
    zero = (den == 0.0) | (n_marg == 0)
    den_safe = tl.where(zero, 1.0, den)
    tile = row_id * BLOCK_M * HEAD_DIM + offs_i[:, None] * HEAD_DIM + offs_d[None, :]
    g = tl.load(DOL + tile, mask=tile_mask, other=0.0)
    o_l = tl.load(OL + tile, mask=tile_mask, other=0.0)
    dn = tl.where(zero[:, None], 0.0, g / den_safe[:, None])
    dd = tl.where(zero, 0.0, -tl.sum(g * o_l, 1) / den_safe)
    dphi = tl.dot(dn, tl.trans(b_h), input_precision="tf32x3") + dd[:, None] * b_z[None, :]
    tl.store(DQL + tile, feature_map_vjp(x, phi_q, dphi, FEAT), mask=tile_mask)
    dh = tl.dot(tl.trans(phi_q), dn, input_precision="tf32x3")
    hz = offs_d[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DH + row_id * HEAD_DIM * HEAD_DIM + hz, dh, mask=d_ok[:, None] & d_ok[None, :])
    tl.store(DZ + row_id * HEAD_DIM + offs_d, tl.sum(phi_q * dd[:, None], 0), mask=d_ok)


@triton.jit(do_not_specialize=["seq_k"])
def sla_linear_dkdv_kernel(
    K, V, DH, DZ, DH_TOT, DZ_TOT, NC_CRIT, NC_MARG, IDXC, DKL, DVL,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    seq_k, group, num_qb,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, FEAT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (key blocks, kv heads, batch). DH, DZ per (query head, query block) from the dq
    kernel, DH_TOT, DZ_TOT their sums over query blocks; NC_*, IDXC the column form (B, Hq, Mk[, Mq]);
    DKL, DVL (B, Hkv, Mk * BLOCK_N, D) fp32 contiguous."""
    pid_n = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.program_id(2)
    kv_heads = tl.num_programs(1)
    num_kb = tl.num_programs(0)
    b64 = b.to(tl.int64)
    kvh64 = kvh.to(tl.int64)
    offs_j = tl.arange(0, BLOCK_N)
    offs_n = pid_n * BLOCK_N + offs_j
    offs_d = tl.arange(0, D_PAD)
    n_ok = offs_n < seq_k
    d_ok = offs_d < HEAD_DIM
    tile_mask = n_ok[:, None] & d_ok[None, :]
    dh = tl.zeros([D_PAD, D_PAD], dtype=tl.float32)
    dz = tl.zeros([D_PAD], dtype=tl.float32)
    for g in range(0, group):
        slab = b64 * kv_heads * group + kvh64 * group + g  # (batch, query head)
        col_id = slab * num_kb + pid_n
        dh_g, dz_g = marginal_sum(DH + slab * num_qb * HEAD_DIM * HEAD_DIM, DZ + slab * num_qb * HEAD_DIM,
                                  DH_TOT + slab * HEAD_DIM * HEAD_DIM, DZ_TOT + slab * HEAD_DIM,
                                  IDXC + col_id * num_qb, tl.load(NC_CRIT + col_id), tl.load(NC_MARG + col_id),
                                  num_qb, offs_d, offs_d, d_ok, d_ok, HEAD_DIM, HEAD_DIM)
        dh += dh_g
        dz += dz_g
    x = tl.load(K + b64 * stride_kb + kvh64 * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=tile_mask, other=0.0).to(tl.float32)
    b_v = tl.load(V + b64 * stride_vb + kvh64 * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                  mask=tile_mask, other=0.0).to(tl.float32)
    phi_k = feature_map(x, n_ok, d_ok, FEAT)
    tile = ((b64 * kv_heads + kvh64) * num_kb + pid_n) * BLOCK_N * HEAD_DIM + offs_j[:, None] * HEAD_DIM \
        + offs_d[None, :]
    tl.store(DVL + tile, tl.dot(phi_k, dh, input_precision="tf32x3"), mask=tile_mask)
    dphi = tl.dot(b_v, tl.trans(dh), input_precision="tf32x3") + dz[None, :]
    dphi = tl.where(n_ok[:, None], dphi, 0.0)
    tl.store(DKL + tile, feature_map_vjp(x, phi_k, dphi, FEAT), mask=tile_mask)


def _warps(d_pad: int) -> int:
    import os

    return 1 if os.environ.get("TRITON_INTERPRET") == "1" else (8 if d_pad >= 128 else 4)


def sla_linear_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dol: torch.Tensor, o_l: torch.Tensor,
                   h: torch.Tensor, z: torch.Tensor, rows: BlockIndex, cols: BlockIndex, *,
                   block_size: tuple[int, int], feature: str):
    """(dq, dk, dv) of the linear branch, fp32 (bhsd, padded to whole blocks along seq), from
    dol = dO_l and o_l (B, Hq, Mq * bq, D) fp32 contiguous and the forward's key-block states."""
    batch, heads_q, seq_q, d = q.shape
    heads_kv, seq_k = k.shape[1], k.shape[2]
    bm, bn = block_size
    mq, mk = rows.idx.shape[2], rows.idx.shape[3]
    dql = torch.empty(batch, heads_q, mq * bm, d, dtype=torch.float32, device=q.device)
    dh = torch.empty(batch, heads_q, mq, d, d, dtype=torch.float32, device=q.device)
    dz = torch.empty(batch, heads_q, mq, d, dtype=torch.float32, device=q.device)
    common = dict(HEAD_DIM=d, D_PAD=padded(d), FEAT=FEATURE_IDS[feature], num_warps=_warps(padded(d)))
    sla_linear_dq_kernel[(mq, heads_q, batch)](
        q, dol, o_l, h, z, h.sum(2), z.sum(2), rows.n_crit, rows.n_marg, rows.idx, dql, dh, dz,
        *q.stride(), seq_q, heads_q // heads_kv, mk, LINEAR_EPS, BLOCK_M=bm, **common)
    dkl = torch.empty(batch, heads_kv, mk * bn, d, dtype=torch.float32, device=q.device)
    dvl = torch.empty_like(dkl)
    sla_linear_dkdv_kernel[(mk, heads_kv, batch)](
        k, v, dh, dz, dh.sum(2), dz.sum(2), cols.n_crit, cols.n_marg, cols.idx, dkl, dvl,
        *k.stride(), *v.stride(), seq_k, heads_q // heads_kv, mq, BLOCK_N=bn, **common)
    return dql, dkl, dvl
