"""The SLA backward's linear branch (the critical branch is block_sparse's backward, reused).

With den_r = phi(q_r) . Z_i + eps, O_l,r = phi(q_r) H_i / den_r and G = dO_l (= dO W):
  dn_r = G_r / den_r,   t_r = dn_r H_i^T,   dd_r = -(G_r . O_l,r) / den_r = -(phi(q_r) . t_r) / den_r,
  dphi(q_r) = t_r + dd_r Z_i,   dH_i = phi(Q_i)^T dN_i,   dZ_i = phi(Q_i)^T dd_i;
and per key block j, with dh_j = sum of dH_i and dz_j = sum of dZ_i over the query blocks i for
which j is marginal:
  dV_j = phi(K_j) dh_j,   dphi(K_j) = V_j dh_j^T + dz_j.

No D x D state is stored per query block. The dq kernel forms H_i from the key-block states
(pre-aggregated as in the forward, a column chunk at a time) and leaves only dN (written over
G) and dd, one row each per query row. The key kernel forms dh_j, dz_j from them: over the
query blocks of column j's marginal list, or as the head's totals (a third kernel sums
phi(Q)^T dN and phi(Q)^T dd over all rows, in partial sums, no atomics) minus the critical and
negligible ones, whichever list is shorter. Every product phi(Q_i)^T dN_i is formed in-kernel
with the same precision on both sides of that subtraction.

The kernels add their fp32 contributions to the critical branch's dq, dk, dv in place. The
feature map's derivative is applied in-kernel. GQA: a key program sums its group's heads.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..block_sparse.configs import launch_config
from ..block_sparse.forward import key_tile, listed_block, listed_tile
from ..linear.kernels import FEATURE_IDS, feature_map
from .classify import BlockIndex, padded
from .forward import LINEAR_EPS, query_block_state, state_chunk, state_precision
from .row_states import column_states
from ..hostmath import cdiv
from ..stage_fallback import launch_fitting

TOTAL_SPLITS = 16  # partial sums per (batch, head) of the dH, dZ totals


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
    Q, DN, DD, H, Z, H_TOT, Z_TOT, N_CRIT, N_MARG, IDX, DQ, OL, GOL,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    seq_q, group, num_qb, num_kb, eps,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HC: tl.constexpr, FEAT: tl.constexpr, LIN_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, MASK_M: tl.constexpr, ROW_STATES: tl.constexpr, WITH_OL: tl.constexpr,
):
    """Grid (query tiles, query heads, batch). WITH_OL: also writes O_l into OL (B, Hq, Sq, D)
    and G . O_l per row into GOL (B, Hq, Sq), fp32 contiguous, for dW and delta (so the backward
    needs no separate O_l pass; the state sums are formed once). With ROW_STATES, H and Z are the query blocks'
    marginal sums (row_states.py) and H_TOT, Z_TOT unused. DN (B, Hq, Sq, D) fp32 contiguous
    holds G = dO W
    on entry and dN on exit (each program rewrites only its own rows); DD (B, Hq, Sq) fp32;
    DQ (q's dtype and strides, the critical branch's dq) gets
    dphi(q)'s vjp added. H..IDX as sla_fwd_kernel. Rows whose block has no marginal key, or
    whose denominator is 0, give dN = dd = 0 (their O_l is 0, whatever the states)."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    heads = tl.num_programs(1)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_i = tl.arange(0, BLOCK_M)
    offs_m = pid_m * BLOCK_M + offs_i
    offs_d = tl.arange(0, D_PAD)
    offs_c = tl.arange(0, HC)
    m_ok = offs_m < seq_q
    d_ok = offs_d < HEAD_DIM
    tile_mask = m_ok[:, None] & d_ok[None, :]
    row_id = (b64 * heads + h64) * num_qb + (pid_m * BLOCK_M) // MASK_M
    kv_slab = b64 * (heads // group) + h // group
    n_crit = tl.load(N_CRIT + row_id)
    n_marg = tl.load(N_MARG + row_id)
    idx_row = IDX + row_id * num_kb
    # the tile's first row in int64 (its product with a row stride passes 2**31 at long sequences),
    # int32 offsets inside the tile (row_tile's int64 tile spilled 28 B here at hd128 on sm_90)
    m64 = (pid_m * BLOCK_M).to(tl.int64)
    in_tile = offs_i[:, None] * stride_qm + offs_d[None, :] * stride_qd
    x = tl.load(Q + b64 * stride_qb + h64 * stride_qh + m64 * stride_qm + in_tile, mask=tile_mask,
                other=0.0).to(tl.float32)
    phi_q = feature_map(x, m_ok, d_ok, FEAT)
    rows = (b64 * heads + h64) * seq_q + offs_m
    dn_rows = DN + rows[:, None] * HEAD_DIM
    # t = G H^T, summed over H's column chunks (dn = G / den is a per-row scaling of G)
    t = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    b_z = tl.zeros([D_PAD], dtype=tl.float32)
    den = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in tl.static_range(0, D_PAD, HC):
        b_h, b_z = query_block_state(H, Z, H_TOT, Z_TOT, idx_row, row_id, n_crit, n_marg, kv_slab, num_kb, c0,
                                     offs_d, offs_c, d_ok, HEAD_DIM, ROW_STATES)
        cols = c0 + offs_c
        c_mask = m_ok[:, None] & (cols < HEAD_DIM)[None, :]
        g_c = tl.load(dn_rows + cols[None, :], mask=c_mask, other=0.0)
        t = tl.dot(g_c, tl.trans(b_h), t, input_precision=LIN_PREC)
        if WITH_OL:  # O_l's columns as the forward forms them (0 where the denominator is 0)
            if c0 == 0:
                den = tl.sum(phi_q * b_z[None, :], 1) + eps
            num = tl.dot(phi_q, b_h, input_precision=LIN_PREC)
            o_l = tl.where(den[:, None] == 0.0, 0.0, num / tl.where(den == 0.0, 1.0, den)[:, None])
            tl.store(OL + rows[:, None] * HEAD_DIM + cols[None, :], o_l, mask=c_mask)
    # formed again rather than kept live through the loop: that spilled 16 B at hd128 on sm_90
    den = tl.sum(phi_q * b_z[None, :], 1) + eps
    # a block with no marginal key feeds no key block: its dN (~ 1 / eps) must not enter the
    # column totals, where the pre-aggregation would subtract it again (catastrophic cancellation)
    zero = (den == 0.0) | (n_marg == 0)
    inv = tl.where(zero, 0.0, 1.0 / tl.where(zero, 1.0, den))
    t = t * inv[:, None]
    gol = tl.sum(phi_q * t, 1)  # = G . O_l (phi(q) . G H^T / den)
    dd = -gol * inv
    if WITH_OL:
        tl.store(GOL + rows, gol, mask=m_ok)
    dphi = t + dd[:, None] * b_z[None, :]
    dq_ptrs = (DQ + b64 * stride_dqb + h64 * stride_dqh + m64 * stride_dqm
               + (offs_i[:, None] * stride_dqm + offs_d[None, :] * stride_dqd))
    dq = tl.load(dq_ptrs, mask=tile_mask, other=0.0).to(tl.float32) + feature_map_vjp(x, phi_q, dphi, FEAT)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=tile_mask)
    tl.store(DD + rows, dd, mask=m_ok)
    for c0 in tl.static_range(0, D_PAD, HC):
        cols = c0 + offs_c
        c_mask = m_ok[:, None] & (cols < HEAD_DIM)[None, :]
        g_c = tl.load(dn_rows + cols[None, :], mask=c_mask, other=0.0)
        tl.store(dn_rows + cols[None, :], g_c * inv[:, None], mask=c_mask)


@triton.jit
def phi_rows(Q, q_rows, offs_d, rows_ok, d_ok, FEAT: tl.constexpr):
    x = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
    return feature_map(x.to(tl.float32), rows_ok, d_ok, FEAT)


@triton.jit(do_not_specialize=["seq_q"])
def sla_linear_total_kernel(
    Q, DN, DD, DH_PART, DZ_PART,
    stride_qb, stride_qh, stride_qm, stride_qd,
    seq_q, num_qb,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HC: tl.constexpr, FEAT: tl.constexpr, LIN_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, MASK_M: tl.constexpr, PER_BLOCK: tl.constexpr,
):
    """Grid (splits, query heads, batch): split s sums phi(Q)^T dN (columns in chunks of HC) and
    phi(Q)^T dd over the query tiles s, s + splits, ... into DH_PART (B, Hq, splits, D, D) and
    DZ_PART (B, Hq, splits, D). PER_BLOCK: split s is mask row block s (its MASK_M rows), so the
    parts are the per-block dH_i, dZ_i (the row-states path, row_states.py)."""
    s = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    splits = tl.num_programs(0)
    heads = tl.num_programs(1)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_i = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_c = tl.arange(0, HC)
    d_ok = offs_d < HEAD_DIM
    q_head = Q + b64 * stride_qb + h64 * stride_qh
    row0 = (b64 * heads + h64) * seq_q
    part = (b64 * heads + h64) * splits + s
    n_tiles = tl.cdiv(seq_q, BLOCK_M)
    SUB: tl.constexpr = MASK_M // BLOCK_M
    if PER_BLOCK:
        t_lo = s * SUB
        t_hi = tl.minimum(t_lo + SUB, n_tiles)
        t_step = 1
    else:
        t_lo = s
        t_hi = n_tiles
        t_step = splits
    dz = tl.zeros([D_PAD], dtype=tl.float32)
    for c0 in tl.static_range(0, D_PAD, HC):
        cols = c0 + offs_c
        c_ok = cols < HEAD_DIM
        dh = tl.zeros([D_PAD, HC], dtype=tl.float32)
        for tile in range(t_lo, t_hi, t_step):
            offs_m = tile * BLOCK_M + offs_i
            m_ok = offs_m < seq_q
            # int64 rows (offs_m * stride_qm passes 2**31 at long sequences). A scalar int64 tile
            # base instead left the in-tile offsets loop-invariant: hoisted, +9 registers at hd128
            phi_q = phi_rows(q_head, offs_m.to(tl.int64) * stride_qm, offs_d * stride_qd, m_ok, d_ok, FEAT)
            b_dn = tl.load(DN + (row0 + offs_m)[:, None] * HEAD_DIM + cols[None, :],
                           mask=m_ok[:, None] & c_ok[None, :], other=0.0)
            dh = tl.dot(tl.trans(phi_q), b_dn, dh, input_precision=LIN_PREC)
            if c0 == 0:
                dz += tl.sum(phi_q * tl.load(DD + row0 + offs_m, mask=m_ok, other=0.0)[:, None], 0)
        tl.store(DH_PART + part * HEAD_DIM * HEAD_DIM + offs_d[:, None] * HEAD_DIM + cols[None, :], dh,
                 mask=d_ok[:, None] & c_ok[None, :])
    tl.store(DZ_PART + part * HEAD_DIM + offs_d, dz, mask=d_ok)


@triton.jit
def _fold_query_blocks(dh, dz, DN, DD, col, first, last, sign, q_head, row0, stride_qm, stride_qd, offs_i,
                       offs_d, cols, d_ok, c_ok, seq_q, HEAD_DIM: tl.constexpr, FEAT: tl.constexpr,
                       LIN_PREC: tl.constexpr, BLOCK_M: tl.constexpr, MASK_M: tl.constexpr, WITH_Z: tl.constexpr):
    """dh += sign * sum of phi(Q_i)^T dN_i[:, cols] (with WITH_Z, dz += sign * phi(Q_i)^T dd_i)
    over the listed query blocks col[first:last], each as MASK_M / BLOCK_M tiles."""
    SUB: tl.constexpr = MASK_M // BLOCK_M
    blk = listed_block(col, first * SUB, last * SUB, SUB)  # one iteration ahead: listed_block says why
    for it in range(first * SUB, last * SUB):
        start_m, blk = listed_tile(col, blk, it, last * SUB, SUB, MASK_M, BLOCK_M)
        offs_m = start_m + offs_i
        m_ok = offs_m < seq_q
        # int64 rows, as in sla_linear_total_kernel (the scalar-base form took 255 registers here)
        phi_q = phi_rows(q_head, offs_m.to(tl.int64) * stride_qm, offs_d * stride_qd, m_ok, d_ok, FEAT)
        b_dn = tl.load(DN + (row0 + offs_m)[:, None] * HEAD_DIM + cols[None, :],
                       mask=m_ok[:, None] & c_ok[None, :], other=0.0)
        dh = tl.dot(tl.trans(phi_q), b_dn * sign, dh, input_precision=LIN_PREC)
        if WITH_Z:
            dz += sign * tl.sum(phi_q * tl.load(DD + row0 + offs_m, mask=m_ok, other=0.0)[:, None], 0)
    return dh, dz


@triton.jit(do_not_specialize=["seq_q", "seq_k"])
def sla_linear_dkdv_kernel(
    Q, K, V, DN, DD, DH_TOT, DZ_TOT, NC_CRIT, NC_MARG, IDXC, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    seq_q, seq_k, group, num_qb, num_kb,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HC: tl.constexpr, FEAT: tl.constexpr, LIN_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_M: tl.constexpr, MASK_N: tl.constexpr,
    ROW_STATES: tl.constexpr,
):
    """Grid (key tiles, kv heads, batch); a tile is BLOCK_N keys of mask column start_n // MASK_N.
    DN, DD from sla_linear_dq_kernel; DH_TOT (B, Hq, D, D), DZ_TOT (B, Hq, D) their per-head
    totals, or with ROW_STATES each key block's finished dh_j, dz_j (B, Hkv, Mk, D[, D]) from
    row_states.column_states (then DN, DD and the column form are not read); NC_*, IDXC the
    column form (B, Hq, Mk[, Mq]); DK, DV (k's / v's dtype and strides, the critical branch's
    dk, dv) get the linear branch's gradients added."""
    b64, kvh64, start_n, mask_col, offs_n, offs_d, n_ok, d_ok = key_tile(seq_k, HEAD_DIM, D_PAD, BLOCK_N, MASK_N)
    kv_heads = tl.num_programs(1)
    offs_i = tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, HC)
    tile_mask = n_ok[:, None] & d_ok[None, :]
    # the key tile's first row in int64 (start_n * stride passes 2**31 at long sequences); the
    # original sum order (row_tile's int64 tile took 254 registers at hd128 here, not 244)
    n64 = tl.cast(start_n, tl.int64)
    offs_j = tl.arange(0, BLOCK_N)
    k_ptrs = (K + b64 * stride_kb + kvh64 * stride_kh + n64 * stride_kn
              + offs_j[:, None] * stride_kn + offs_d[None, :] * stride_kd)
    v_rows = V + b64 * stride_vb + kvh64 * stride_vh + n64 * stride_vn + offs_j[:, None] * stride_vn
    dv_rows = DV + b64 * stride_dvb + kvh64 * stride_dvh + n64 * stride_dvn + offs_j[:, None] * stride_dvn
    dphi = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dz = tl.zeros([D_PAD], dtype=tl.float32)
    for c0 in tl.static_range(0, D_PAD, HC):
        cols = c0 + offs_c
        c_ok = cols < HEAD_DIM
        if ROW_STATES:
            cid = (b64 * kv_heads + kvh64) * num_kb + mask_col
            dh = tl.load(DH_TOT + cid * HEAD_DIM * HEAD_DIM + offs_d[:, None] * HEAD_DIM + cols[None, :],
                         mask=d_ok[:, None] & c_ok[None, :], other=0.0)
            if c0 == 0:
                dz = tl.load(DZ_TOT + cid * HEAD_DIM + offs_d, mask=d_ok, other=0.0)
        else:
            dh = tl.zeros([D_PAD, HC], dtype=tl.float32)
            for g in range(0, group):
                slab = (b64 * kv_heads + kvh64) * group + g  # (batch, query head)
                col_id = slab * num_kb + mask_col
                n_crit = tl.load(NC_CRIT + col_id)
                n_marg = tl.load(NC_MARG + col_id)
                col = IDXC + col_id * num_qb
                q_head = Q + b64 * stride_qb + (slab - b64 * kv_heads * group) * stride_qh
                row0 = slab * seq_q
                # direct: + over [n_crit, n_crit + n_marg); by total: - over [0, n_crit) and the rest
                use_total = 2 * n_marg > num_qb
                first_lo = tl.where(use_total, 0, n_crit)
                first_hi = tl.where(use_total, n_crit, n_crit + n_marg)
                second_hi = tl.where(use_total, num_qb, n_crit + n_marg)
                sign = tl.where(use_total, -1.0, 1.0)
                with_tot = (1.0 - sign) * 0.5
                dh += with_tot * tl.load(DH_TOT + slab * HEAD_DIM * HEAD_DIM + offs_d[:, None] * HEAD_DIM
                                         + cols[None, :], mask=d_ok[:, None] & c_ok[None, :], other=0.0)
                if c0 == 0:
                    dz += with_tot * tl.load(DZ_TOT + slab * HEAD_DIM + offs_d, mask=d_ok, other=0.0)
                dh, dz = _fold_query_blocks(dh, dz, DN, DD, col, first_lo, first_hi, sign, q_head, row0,
                                            stride_qm, stride_qd, offs_i, offs_d, cols, d_ok, c_ok, seq_q, HEAD_DIM,
                                            FEAT, LIN_PREC, BLOCK_M, MASK_M, c0 == 0)
                dh, dz = _fold_query_blocks(dh, dz, DN, DD, col, n_crit + n_marg, second_hi, -1.0, q_head, row0,
                                            stride_qm, stride_qd, offs_i, offs_d, cols, d_ok, c_ok, seq_q, HEAD_DIM,
                                            FEAT, LIN_PREC, BLOCK_M, MASK_M, c0 == 0)
        # dV[:, cols] = phi(K_j) dh[:, cols];  dphi(K_j) += V_j[:, cols] dh[:, cols]^T
        c_mask = n_ok[:, None] & c_ok[None, :]
        dv_ptrs = dv_rows + cols[None, :] * stride_dvd
        dv = tl.load(dv_ptrs, mask=c_mask, other=0.0).to(tl.float32)
        # phi(K_j) is re-formed where it is used, not held through the loops above
        phi_k = feature_map(tl.load(k_ptrs, mask=tile_mask, other=0.0).to(tl.float32), n_ok, d_ok, FEAT)
        dv = tl.dot(phi_k, dh, dv, input_precision=LIN_PREC)
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=c_mask)
        b_v = tl.load(v_rows + cols[None, :] * stride_vd, mask=c_mask, other=0.0).to(tl.float32)
        dphi = tl.dot(b_v, tl.trans(dh), dphi, input_precision=LIN_PREC)
    dphi = tl.where(n_ok[:, None], dphi + dz[None, :], 0.0)
    x = tl.load(k_ptrs, mask=tile_mask, other=0.0).to(tl.float32)
    phi_k = feature_map(x, n_ok, d_ok, FEAT)
    dk_ptrs = (DK + b64 * stride_dkb + kvh64 * stride_dkh + n64 * stride_dkn
               + offs_j[:, None] * stride_dkn + offs_d[None, :] * stride_dkd)
    dk = tl.load(dk_ptrs, mask=tile_mask, other=0.0).to(tl.float32) + feature_map_vjp(x, phi_k, dphi, FEAT)
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=tile_mask)


def _dq_block_m(block_m: int, d_pad: int, elem: int, with_ol: bool, by_rows: bool) -> int:
    """Query rows per program of the linear dq kernel. Writing O_l as well holds phi(Q), t and a
    second product: on sm_90 at hd128 (16-bit, 8 warps) 64 rows spilled 152 B; 32 rows fit, except
    on the row-states path (352 B), where 16 rows fit."""
    if with_ol and elem == 2 and d_pad >= 128:
        return min(block_m, 16 if by_rows else 32)
    return block_m


def sla_linear_dq(q: torch.Tensor, k: torch.Tensor, g: torch.Tensor, h: torch.Tensor, z: torch.Tensor,
                  rows: BlockIndex, dq: torch.Tensor, *, block_size: tuple[int, int], feature: str,
                  rows_hz: Optional[list] = None, o_l: Optional[torch.Tensor] = None,
                  gol: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The linear branch's query side: adds dphi(q)'s vjp to dq (a bhsd view of q's dtype),
    turns g = dO W (B, Hq, Sq, D fp32 contiguous) into dN in place and returns dd (B, Hq, Sq)
    fp32. With o_l and gol (fp32, (B, Hq, Sq, D) and (B, Hq, Sq)) also writes O_l and G . O_l.
    rows_hz: as in sla_linear_bwd (emptied here after the kernel)."""
    batch, heads_q, seq_q, d = q.shape
    heads_kv = k.shape[1]
    bm, bn = block_size
    mq, mk = rows.idx.shape[2], rows.idx.shape[3]
    d_pad = padded(d)
    by_rows = rows_hz is not None
    dd = torch.empty(batch, heads_q, seq_q, dtype=torch.float32, device=q.device)
    tile = launch_config(bm, bn, d, "linear", q.element_size())
    hq, zq, ht, zt = (*rows_hz, q, q) if by_rows else (h, z, h.sum(2), z.sum(2))
    with_ol = o_l is not None
    block_m = _dq_block_m(tile.block_m, d_pad, q.element_size(), with_ol, by_rows)
    launch_fitting(
        sla_linear_dq_kernel, (cdiv(seq_q, block_m), heads_q, batch),
        q, g, dd, hq, zq, ht, zt, rows.n_crit, rows.n_marg, rows.idx, dq, o_l if with_ol else g,
        gol if with_ol else dd, *q.stride(), *dq.stride(),
        seq_q, heads_q // heads_kv, mq, mk, LINEAR_EPS, BLOCK_M=block_m, ROW_STATES=by_rows,
        WITH_OL=with_ol, num_warps=tile.num_warps, num_stages=tile.num_stages, HEAD_DIM=d, D_PAD=d_pad,
        HC=state_chunk(d_pad), FEAT=FEATURE_IDS[feature], LIN_PREC=state_precision(q.dtype), MASK_M=bm)
    del hq, zq, ht, zt
    if by_rows:
        rows_hz.clear()
    return dd


def sla_linear_dkdv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dn: torch.Tensor, dd: torch.Tensor,
                    rows: BlockIndex, cols: BlockIndex, dk: torch.Tensor, dv: torch.Tensor, *,
                    block_size: tuple[int, int], feature: str, classes: Optional[torch.Tensor] = None) -> None:
    """The linear branch's key side, from sla_linear_dq's dN and dd: adds to dk, dv. classes
    (the int8 block map) selects the row-states path (row_states.column_states)."""
    batch, heads_q, seq_q, d = q.shape
    heads_kv, seq_k = k.shape[1], k.shape[2]
    bm, bn = block_size
    mq, mk = rows.idx.shape[2], rows.idx.shape[3]
    d_pad = padded(d)
    prec = state_precision(q.dtype)
    common = dict(HEAD_DIM=d, D_PAD=d_pad, HC=state_chunk(d_pad), FEAT=FEATURE_IDS[feature], LIN_PREC=prec,
                  MASK_M=bm)
    by_rows = classes is not None
    tile = launch_config(bm, bn, d, "linear", q.element_size())
    # per-head totals split in parts (or, on the row-states path, one part per query block)
    splits = mq if by_rows else min(TOTAL_SPLITS, cdiv(seq_q, tile.block_m))
    dh_part = torch.empty(batch, heads_q, splits, d, d, dtype=torch.float32, device=q.device)
    dz_part = torch.empty(batch, heads_q, splits, d, dtype=torch.float32, device=q.device)
    launch_fitting(
        sla_linear_total_kernel, (splits, heads_q, batch),
        q, dn, dd, dh_part, dz_part, *q.stride(), seq_q, mq, BLOCK_M=tile.block_m, PER_BLOCK=by_rows,
        num_warps=tile.num_warps, num_stages=tile.num_stages, **common)
    if by_rows:
        dh_in, dz_in = column_states(classes, dh_part, dz_part, heads_kv, prec)
    else:
        dh_in, dz_in = dh_part.sum(2), dz_part.sum(2)
    del dh_part, dz_part
    tile_k = launch_config(bm, bn, d, "linear_k", q.element_size())
    launch_fitting(
        sla_linear_dkdv_kernel, (cdiv(seq_k, tile_k.block_n), heads_kv, batch),
        q, k, v, dn, dd, dh_in, dz_in, cols.n_crit, cols.n_marg, cols.idx, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *dk.stride(), *dv.stride(),
        seq_q, seq_k, heads_q // heads_kv, mq, mk, BLOCK_M=tile_k.block_m, BLOCK_N=tile_k.block_n, MASK_N=bn,
        ROW_STATES=by_rows, num_warps=tile_k.num_warps, num_stages=tile_k.num_stages, **common)


def sla_linear_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, h: torch.Tensor,
                   z: torch.Tensor, rows: BlockIndex, cols: BlockIndex, dq: torch.Tensor, dk: torch.Tensor,
                   dv: torch.Tensor, *, block_size: tuple[int, int], feature: str,
                   rows_hz: Optional[list] = None, classes: Optional[torch.Tensor] = None) -> None:
    """Add the linear branch's gradients to dq, dk, dv (bhsd views of q/k/v's dtype, holding the
    critical branch's): sla_linear_dq, then sla_linear_dkdv. g = dO W (B, Hq, Sq, D) fp32
    contiguous is overwritten with dN. h, z: the forward's key-block states. Allocates (bytes,
    fp32) 4 * B * Hq * Sq for dd, 4 * B * Hq * (TOTAL_SPLITS + 1) * (D * D + D) for the totals,
    and h, z's sums over blocks.

    Row-states path (row_states.py): rows_hz = [H_i, Z_i], the query blocks' marginal sums, a
    list emptied after the dq kernel (so that memory can go), and classes, the int8 block map.
    The dq kernel reads H_i, Z_i; then dH_i = phi(Q_i)^T dN_i, dZ_i per query block
    (B*Hq*Mq*(D*D + D)*4 bytes), their transposed masked sums per key block
    (B*Hkv*Mk*(D*D + D)*4 bytes), which the dk/dv kernel reads instead of folding query blocks."""
    if rows_hz is not None and classes is None:
        raise ValueError("sla_linear_bwd: the row-states path needs classes (the int8 block map)")
    dd = sla_linear_dq(q, k, g, h, z, rows, dq, block_size=block_size, feature=feature, rows_hz=rows_hz)
    sla_linear_dkdv(q, k, v, g, dd, rows, cols, dk, dv, block_size=block_size, feature=feature,
                    classes=classes if rows_hz is not None else None)
