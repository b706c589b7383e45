"""The fused SLA forward: per query block, the linear branch over the marginal key blocks (by
pre-aggregation of the key-block states) and the block-sparse online softmax over the critical
ones, in one kernel.

Pre-aggregation (SLA appendix): H_i = sum of h_j over row i's marginal blocks, Z_i likewise, is
summed directly when the marginal list is the shorter one, else as the row total minus the
critical and negligible blocks, so a row never adds more than half its blocks. Then
O_l = phi(Q_i) H_i / (phi(Q_i) . Z_i + eps) (0 where the denominator is 0). The critical part
walks the class-ordered list's first n_crit entries with flash's shared per-block step, exactly
as block_sparse's forward does (blocks below the causal diagonal unmasked, the rest masked).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..block_sparse.configs import launch_config
from ..block_sparse.forward import count_listed_below
from ..flash.common import LOG2E, attend_key_block, dot_precision, load_tile, query_key_range, store_tile
from ..linear.kernels import FEATURE_IDS, feature_map
from .classify import BlockIndex, padded

LINEAR_EPS = 1e-6  # attnlib.reference.sla.LINEAR_EPS


@triton.jit
def marginal_sum(H, Z, H_TOT, Z_TOT, idx_row, n_crit, n_marg, n_all, offs_d, offs_e, d_ok, e_ok,
                 HEAD_DIM: tl.constexpr, DV: tl.constexpr):
    """(sum of the D x Dv states H[j] over a row's marginal blocks j, the same of Z[j]), fp32.

    H, Z point at the row's (batch, head) slab of per-block states (D * Dv and D floats per
    block), H_TOT, Z_TOT at their sums over all blocks; idx_row is the class-ordered list."""
    use_total = 2 * n_marg > n_all
    hz_mask = d_ok[:, None] & e_ok[None, :]
    hz_offs = offs_d[:, None] * DV + offs_e[None, :]
    # direct: + over [n_crit, n_crit + n_marg); by total: - over [0, n_crit) and [n_crit + n_marg, n_all)
    first_lo = tl.where(use_total, 0, n_crit)
    first_hi = tl.where(use_total, n_crit, n_crit + n_marg)
    second_lo = n_crit + n_marg
    second_hi = tl.where(use_total, n_all, n_crit + n_marg)
    sign = tl.where(use_total, -1.0, 1.0)
    b_h = tl.load(H_TOT + hz_offs, mask=hz_mask, other=0.0) * (1.0 - sign) * 0.5
    b_z = tl.load(Z_TOT + offs_d, mask=d_ok, other=0.0) * (1.0 - sign) * 0.5
    for t in range(first_lo, first_hi):
        j = tl.load(idx_row + t).to(tl.int64)
        b_h += sign * tl.load(H + j * (HEAD_DIM * DV) + hz_offs, mask=hz_mask, other=0.0)
        b_z += sign * tl.load(Z + j * HEAD_DIM + offs_d, mask=d_ok, other=0.0)
    for t in range(second_lo, second_hi):
        j = tl.load(idx_row + t).to(tl.int64)
        b_h -= tl.load(H + j * (HEAD_DIM * DV) + hz_offs, mask=hz_mask, other=0.0)
        b_z -= tl.load(Z + j * HEAD_DIM + offs_d, mask=d_ok, other=0.0)
    return b_h, b_z


@triton.jit
def linear_rows(phi_q, b_h, b_z, eps, PREC_F32: tl.constexpr):
    """(O_l, denominator with 1 where it is 0): phi(q) H / (phi(q) . z + eps), 0 on zero rows."""
    num = tl.dot(phi_q, b_h, input_precision=PREC_F32)
    den = tl.sum(phi_q * b_z[None, :], 1) + eps
    den_safe = tl.where(den == 0.0, 1.0, den)
    return tl.where(den[:, None] == 0.0, 0.0, num / den_safe[:, None]), den_safe


@triton.jit(do_not_specialize=["seq_q", "seq_k"])
def sla_fwd_kernel(
    Q, K, V, OS, OL, LSE, H, Z, H_TOT, Z_TOT, N_CRIT, N_MARG, IDX,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    seq_q, seq_k, group, num_kb, qk_scale, eps,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, FEAT: tl.constexpr, CAUSAL: tl.constexpr,
    LINEAR: tl.constexpr, STORE_LSE: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SLOTS: tl.constexpr,
):
    """Grid (query blocks, query heads, batch). OS: the sparse output (any float dtype, bhsd
    strides); OL (B, Hq, Sq, Dv) fp32 contiguous, written with LINEAR; LSE (B, Hq, Sq) fp32 with
    STORE_LSE. H, Z (B, Hkv, Mk, D[, Dv]) and H_TOT, Z_TOT (B, Hkv, D[, Dv]) fp32 contiguous;
    N_CRIT, N_MARG (B, Hq, Mq), IDX (B, Hq, Mq, Mk) int32 contiguous (classify.class_index)."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    heads = tl.num_programs(1)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    kvh64 = (h // group).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_i = tl.arange(0, BLOCK_M)
    offs_m = start_m + offs_i
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    m_ok = offs_m < seq_q
    d_ok = offs_d < HEAD_DIM
    CHECK_D: tl.constexpr = D_PAD != HEAD_DIM
    row_id = (b64 * heads + h64) * tl.num_programs(0) + pid_m
    idx_row = IDX + row_id * num_kb
    n_crit = tl.load(N_CRIT + row_id)

    q_ptrs = (Q + b64 * stride_qb + h64 * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd)
    b_q = load_tile(q_ptrs, m_ok, d_ok, True, CHECK_D)

    if LINEAR:
        n_marg = tl.load(N_MARG + row_id)
        kv_slab = b64 * (heads // group) + kvh64
        b_h, b_z = marginal_sum(H + kv_slab * num_kb * HEAD_DIM * HEAD_DIM, Z + kv_slab * num_kb * HEAD_DIM,
                                H_TOT + kv_slab * HEAD_DIM * HEAD_DIM, Z_TOT + kv_slab * HEAD_DIM,
                                idx_row, n_crit, n_marg, num_kb, offs_d, offs_d, d_ok, d_ok, HEAD_DIM, HEAD_DIM)
        phi_q = feature_map(b_q.to(tl.float32), m_ok, d_ok, FEAT)
        o_l, _ = linear_rows(phi_q, b_h, b_z, eps, "tf32x3")
        tl.store(OL + row_id * BLOCK_M * HEAD_DIM + offs_i[:, None] * HEAD_DIM + offs_d[None, :], o_l,
                 mask=m_ok[:, None] & d_ok[None, :])

    # critical blocks: block_sparse's main loop over the list's first n_crit entries
    k_base = K + b64 * stride_kb + kvh64 * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_base = V + b64 * stride_vb + kvh64 * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    diag = seq_k - seq_q
    full_end, hi = query_key_range(start_m, seq_q, seq_k, BLOCK_M, BLOCK_N, CAUSAL)
    n_full = count_listed_below(idx_row, n_crit, full_end, BLOCK_N, SLOTS)
    n_vis = count_listed_below(idx_row, n_crit, hi, BLOCK_N, SLOTS)
    for i in range(0, n_full):
        start_n = tl.load(idx_row + i) * BLOCK_N
        off_k = start_n.to(tl.int64)
        acc, l_i, m_i = attend_key_block(acc, l_i, m_i, b_q, k_base + off_k * stride_kn, v_base + off_k * stride_vn,
                                         offs_m, start_n + offs_n, d_ok, seq_k, diag, qk_scale,
                                         CHECK_D, False, CAUSAL, PREC)
    for i in range(n_full, n_vis):
        start_n = tl.load(idx_row + i) * BLOCK_N
        off_k = start_n.to(tl.int64)
        acc, l_i, m_i = attend_key_block(acc, l_i, m_i, b_q, k_base + off_k * stride_kn, v_base + off_k * stride_vn,
                                         offs_m, start_n + offs_n, d_ok, seq_k, diag, qk_scale,
                                         CHECK_D, True, CAUSAL, PREC)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o_ptrs = (OS + b64 * stride_ob + h64 * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od)
    store_tile(o_ptrs, (acc / l_safe[:, None]).to(OS.dtype.element_ty), m_ok, d_ok, CHECK_D)
    if STORE_LSE:
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
        tl.store(LSE + b64 * stride_lb + h64 * stride_lh + offs_m * stride_lm, lse, mask=m_ok)


def slots(num_kb: int) -> int:
    return max(16, triton.next_power_of_2(num_kb))


def sla_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out_sparse: torch.Tensor, index: BlockIndex, *,
            block_size: tuple[int, int], causal: bool, scale: float, feature: str,
            h: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
            lse: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Launch the fused forward on bhsd views (unit last stride). Writes out_sparse (and lse
    (B, Hq, Sq) fp32 when given); with the key-block states h, z (the linear branch) returns O_l
    (B, Hq, Mq * bq, Dv) fp32, whose first Sq rows are the linear output, else None."""
    batch, heads_q, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    bm, bn = block_size
    mq, mk = index.idx.shape[2], index.idx.shape[3]
    linear = h is not None
    o_l = torch.empty(batch, heads_q, mq * bm, head_dim, dtype=torch.float32, device=q.device) if linear else None
    if batch == 0 or heads_q == 0 or seq_q == 0:
        return o_l
    h_tot, z_tot = (h.sum(2), z.sum(2)) if linear else (None, None)
    dummy = out_sparse
    warps, stages = launch_config(bm, bn, head_dim, "fwd")
    sla_fwd_kernel[(mq, heads_q, batch)](
        q, k, v, out_sparse, o_l if linear else dummy, lse if lse is not None else dummy,
        h if linear else dummy, z if linear else dummy, h_tot if linear else dummy, z_tot if linear else dummy,
        index.n_crit, index.n_marg, index.idx,
        *q.stride(), *k.stride(), *v.stride(), *out_sparse.stride(),
        *(lse.stride() if lse is not None else (0, 0, 0)),
        seq_q, seq_k, heads_q // k.shape[1], mk, scale * LOG2E, LINEAR_EPS,
        HEAD_DIM=head_dim, D_PAD=padded(head_dim), FEAT=FEATURE_IDS[feature], CAUSAL=causal, LINEAR=linear,
        STORE_LSE=lse is not None, PREC=dot_precision(q.dtype), BLOCK_M=bm, BLOCK_N=bn, SLOTS=slots(mk),
        num_warps=warps, num_stages=stages)
    return o_l
