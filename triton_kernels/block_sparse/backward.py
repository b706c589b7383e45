"""Block-sparse attention backward in Triton: delta = rowsum(dO * O) (flash's preprocess), a dQ
kernel walking the row index form, and a dK/dV kernel walking the column (transposed) form built
once per call from the same mask. GQA: each dK/dV program sums the group's query heads, each
with its own column list, so no atomics are needed. Rows with nothing allowed (lse -inf)
contribute exactly 0."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..flash.backward import bwd_preprocess
from ..flash.common import (LOG2E, dkdv_query_block, dot_precision, dq_key_block, key_query_range, load_tile,
                            log2_lse, row_tile, store_tile)
from ..flash import configs as flash_configs
from .configs import launch_config, padded_head_dim
from .forward import (count_listed_below, key_tile, kv_tile_bases, listed_block, listed_key_range, listed_tile,
                      query_tile, strides_bhm)
from ..hostmath import cdiv, next_power_of_2
from ..stage_fallback import launch_fitting


@triton.jit
def _dq_listed(dq, b_q, b_do, lse2, delta, row, first, last, k_base, v_base, stride_kn, stride_vn, offs_m, offs_n,
               d_ok, seq_k, diag, qk_scale, CHECK_D: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
               PREC: tl.constexpr, BLOCK_N: tl.constexpr, MASK_N: tl.constexpr):
    """Fold the listed key blocks row[first:last] (each as MASK_N / BLOCK_N tiles) into dQ."""
    SUB: tl.constexpr = MASK_N // BLOCK_N
    blk = listed_block(row, first * SUB, last * SUB, SUB)  # one iteration ahead: listed_block says why
    for it in range(first * SUB, last * SUB):
        start_n, blk = listed_tile(row, blk, it, last * SUB, SUB, MASK_N, BLOCK_N)
        off_k = start_n.to(tl.int64)
        dq = dq_key_block(dq, b_q, b_do, lse2, delta, k_base + off_k * stride_kn, v_base + off_k * stride_vn,
                          offs_m, start_n + offs_n, d_ok, seq_k, diag, qk_scale, CHECK_D, MASK, CAUSAL, PREC)
    return dq


@triton.jit(do_not_specialize=["seq_q", "seq_k"])
def block_sparse_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KV_NUM, KV_IDX,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_lb, stride_lh, stride_lm,
    stride_cb, stride_ch, stride_cm,
    stride_ib, stride_ih, stride_im,
    seq_q, seq_k, group, scale, qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_M: tl.constexpr, MASK_N: tl.constexpr,
    SLOTS: tl.constexpr, ACCUM: tl.constexpr,
):
    """Grid (query tiles, query heads, batch); tiles as in block_sparse_fwd_kernel. ACCUM: dQ is
    added to what DQ holds (SLA's linear branch wrote its part first)."""
    b64, h64, kvh64, start_m, mask_row, offs_m, offs_n, offs_d, m_ok, d_ok = query_tile(
        group, seq_q, HEAD_DIM, D_PAD, BLOCK_M, BLOCK_N, MASK_M)
    CHECK_D: tl.constexpr = D_PAD != HEAD_DIM
    offs_i = tl.arange(0, BLOCK_M)
    b_q = load_tile(row_tile(Q + b64 * stride_qb + h64 * stride_qh, start_m, offs_i, offs_d, stride_qm, stride_qd),
                    m_ok, d_ok, True, CHECK_D)
    b_do = load_tile(row_tile(DO + b64 * stride_dob + h64 * stride_doh, start_m, offs_i, offs_d, stride_dom,
                              stride_dod), m_ok, d_ok, True, CHECK_D)
    lse_off = b64 * stride_lb + h64 * stride_lh + offs_m * stride_lm
    lse2 = log2_lse(tl.load(LSE + lse_off, mask=m_ok, other=0.0))
    delta = tl.load(DELTA + lse_off, mask=m_ok, other=0.0)
    k_base, v_base = kv_tile_bases(K, V, b64, kvh64, offs_n, offs_d, stride_kb, stride_kh, stride_kn, stride_kd,
                                   stride_vb, stride_vh, stride_vn, stride_vd)
    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    diag = seq_k - seq_q
    row, n_full, n_vis = listed_key_range(KV_NUM, KV_IDX, b64, h64, mask_row, stride_cb, stride_ch, stride_cm,
                                          stride_ib, stride_ih, stride_im, start_m, seq_q, seq_k, BLOCK_M, MASK_N,
                                          CAUSAL, SLOTS)
    dq = _dq_listed(dq, b_q, b_do, lse2, delta, row, 0, n_full, k_base, v_base, stride_kn, stride_vn, offs_m, offs_n,
                    d_ok, seq_k, diag, qk_scale, CHECK_D, False, CAUSAL, PREC, BLOCK_N, MASK_N)
    dq = _dq_listed(dq, b_q, b_do, lse2, delta, row, n_full, n_vis, k_base, v_base, stride_kn, stride_vn, offs_m,
                    offs_n, d_ok, seq_k, diag, qk_scale, CHECK_D, True, CAUSAL, PREC, BLOCK_N, MASK_N)
    dq_ptrs = row_tile(DQ + b64 * stride_dqb + h64 * stride_dqh, start_m, offs_i, offs_d, stride_dqm, stride_dqd)
    dq = dq * scale
    if ACCUM:
        dq += load_tile(dq_ptrs, m_ok, d_ok, True, CHECK_D).to(tl.float32)
    store_tile(dq_ptrs, dq.to(DQ.dtype.element_ty), m_ok, d_ok, CHECK_D)


@triton.jit
def _dkdv_listed(dk, dv, b_k, b_v, q_base, do_base, lse_base, delta_base, col, first, last,
                 stride_qm, stride_dom, stride_lm, offs_m0, offs_n, d_ok, seq_q, seq_k, diag, qk_scale,
                 BLOCK_M: tl.constexpr, MASK_M: tl.constexpr, CHECK_D: tl.constexpr, MASK: tl.constexpr,
                 CAUSAL: tl.constexpr, PREC: tl.constexpr):
    """Fold the listed query blocks col[first:last] (each as MASK_M / BLOCK_M tiles) into a
    resident key tile's dK, dV."""
    SUB: tl.constexpr = MASK_M // BLOCK_M
    blk = listed_block(col, first * SUB, last * SUB, SUB)  # one iteration ahead: listed_block says why
    for it in range(first * SUB, last * SUB):
        start_m, blk = listed_tile(col, blk, it, last * SUB, SUB, MASK_M, BLOCK_M)
        off_m = start_m.to(tl.int64)
        dk, dv = dkdv_query_block(dk, dv, b_k, b_v, q_base + off_m * stride_qm, do_base + off_m * stride_dom,
                                  lse_base + off_m * stride_lm, delta_base + off_m * stride_lm,
                                  start_m + offs_m0, offs_n, d_ok, seq_q, seq_k, diag, qk_scale,
                                  CHECK_D, MASK, CAUSAL, PREC)
    return dk, dv


@triton.jit(do_not_specialize=["seq_q", "seq_k"])
def block_sparse_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, Q_NUM, Q_IDX,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_lb, stride_lh, stride_lm,
    stride_cb, stride_ch, stride_cn,
    stride_ib, stride_ih, stride_in,
    seq_q, seq_k, group, scale, qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_M: tl.constexpr, MASK_N: tl.constexpr,
    SLOTS: tl.constexpr,
):
    """Grid (key tiles, kv heads, batch); sums over the group's query heads. Q_NUM (B|1, Hq|1, Mk)
    and Q_IDX (B|1, Hq|1, Mk, Mq): the column form, query blocks ascending. A key tile of
    BLOCK_N keys lies in mask column start_n // MASK_N; listed query blocks are walked as
    MASK_M / BLOCK_M tiles."""
    b64, kvh64, start_n, mask_col, offs_n, offs_d, n_ok, d_ok = key_tile(seq_k, HEAD_DIM, D_PAD, BLOCK_N, MASK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, BLOCK_N)
    CHECK_D: tl.constexpr = D_PAD != HEAD_DIM
    b_k = load_tile(row_tile(K + b64 * stride_kb + kvh64 * stride_kh, start_n, offs_j, offs_d, stride_kn, stride_kd),
                    n_ok, d_ok, True, CHECK_D)
    b_v = load_tile(row_tile(V + b64 * stride_vb + kvh64 * stride_vh, start_n, offs_j, offs_d, stride_vn, stride_vd),
                    n_ok, d_ok, True, CHECK_D)
    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    diag = seq_k - seq_q
    # [lo, mid) masked (causal diagonal), [mid, end) unmasked, [end, hi) masked (query tail)
    lo, mid, end, hi = key_query_range(start_n, seq_q, seq_k, MASK_M, BLOCK_N, CAUSAL)
    for g in range(0, group):
        h64 = kvh64 * group + g
        q_base = Q + b64 * stride_qb + h64 * stride_qh + offs_m0[:, None] * stride_qm + offs_d[None, :] * stride_qd
        do_base = (DO + b64 * stride_dob + h64 * stride_doh + offs_m0[:, None] * stride_dom
                   + offs_d[None, :] * stride_dod)
        lse_base = LSE + b64 * stride_lb + h64 * stride_lh + offs_m0 * stride_lm
        delta_base = DELTA + b64 * stride_lb + h64 * stride_lh + offs_m0 * stride_lm
        col = Q_IDX + b64 * stride_ib + h64 * stride_ih + mask_col * stride_in
        n_listed = tl.load(Q_NUM + b64 * stride_cb + h64 * stride_ch + mask_col * stride_cn)
        n_lo = count_listed_below(col, n_listed, lo, MASK_M, SLOTS)
        n_mid = count_listed_below(col, n_listed, mid, MASK_M, SLOTS)
        n_end = count_listed_below(col, n_listed, end, MASK_M, SLOTS)
        dk, dv = _dkdv_listed(dk, dv, b_k, b_v, q_base, do_base, lse_base, delta_base, col, n_lo, n_mid,
                              stride_qm, stride_dom, stride_lm, offs_m0, offs_n, d_ok, seq_q, seq_k, diag, qk_scale,
                              BLOCK_M, MASK_M, CHECK_D, True, CAUSAL, PREC)
        dk, dv = _dkdv_listed(dk, dv, b_k, b_v, q_base, do_base, lse_base, delta_base, col, n_mid, n_end,
                              stride_qm, stride_dom, stride_lm, offs_m0, offs_n, d_ok, seq_q, seq_k, diag, qk_scale,
                              BLOCK_M, MASK_M, CHECK_D, False, CAUSAL, PREC)
        dk, dv = _dkdv_listed(dk, dv, b_k, b_v, q_base, do_base, lse_base, delta_base, col, n_end, n_listed,
                              stride_qm, stride_dom, stride_lm, offs_m0, offs_n, d_ok, seq_q, seq_k, diag, qk_scale,
                              BLOCK_M, MASK_M, CHECK_D, True, CAUSAL, PREC)
    store_tile(row_tile(DK + b64 * stride_dkb + kvh64 * stride_dkh, start_n, offs_j, offs_d, stride_dkn, stride_dkd),
               (dk * scale).to(DK.dtype.element_ty), n_ok, d_ok, CHECK_D)
    store_tile(row_tile(DV + b64 * stride_dvb + kvh64 * stride_dvh, start_n, offs_j, offs_d, stride_dvn, stride_dvd),
               dv.to(DV.dtype.element_ty), n_ok, d_ok, CHECK_D)


def _slots(idx: torch.Tensor) -> int:
    return max(16, next_power_of_2(idx.shape[-1]))


def block_sparse_bwd(dout, q, k, v, out, lse, row_form, col_form, *, block_size: tuple[int, int], causal: bool,
                     scale: float, dlse: Optional[torch.Tensor] = None, delta: Optional[torch.Tensor] = None,
                     dq_acc: Optional[torch.Tensor] = None):
    """dq, dk, dv (q/k/v's dtype and strides) from dout and the saved forward. row_form =
    (kv_num_blocks, kv_indices), col_form = (q_num_blocks, q_indices) of the same mask.
    dlse folds into delta as in flash: dS = P * (dP - (rowsum(dO * O) - dlse)). A caller that
    has delta = rowsum(dO * O) already (SLA computes it in its recompute) passes it and out=None.
    dq_acc: a dq buffer (q's shape and dtype) already holding a contribution; dQ is added to it
    and it is returned as dq."""
    dq = dq_acc if dq_acc is not None else torch.empty_like(q)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    batch, heads_q, seq_q, head_dim = q.shape
    heads_kv, seq_k = k.shape[1], k.shape[2]
    if batch == 0 or heads_q == 0 or seq_q == 0 or seq_k == 0:
        return (dq if dq_acc is not None else dq.zero_()), dk.zero_(), dv.zero_()
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    if delta is None:
        delta = torch.empty_like(lse)
        bwd_preprocess(out, dout, delta, None)
    if dlse is not None:
        delta -= torch.where(torch.isfinite(lse), dlse.to(delta.dtype), 0.0)
    bm, bn = block_size
    common = dict(HEAD_DIM=head_dim, D_PAD=padded_head_dim(head_dim), CAUSAL=causal, PREC=dot_precision(q.dtype),
                  MASK_M=bm, MASK_N=bn)
    kv_num, kv_idx = row_form
    q_num, q_idx = col_form
    tile = launch_config(bm, bn, head_dim, "dkdv", q.element_size(), flash_configs.device_smem_limit(q))
    launch_fitting(
        block_sparse_dkdv_kernel, (cdiv(seq_k, tile.block_n), heads_kv, batch),
        q, k, v, dout, lse, delta, dk, dv, q_num, q_idx,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(), *lse.stride(),
        *strides_bhm(q_num), *strides_bhm(q_idx),
        seq_q, seq_k, heads_q // heads_kv, scale, scale * LOG2E, SLOTS=_slots(q_idx), BLOCK_M=tile.block_m,
        BLOCK_N=tile.block_n, num_warps=tile.num_warps, num_stages=tile.num_stages, **common)
    tile = launch_config(bm, bn, head_dim, "dq", q.element_size(), flash_configs.device_smem_limit(q))
    launch_fitting(
        block_sparse_dq_kernel, (cdiv(seq_q, tile.block_m), heads_q, batch),
        q, k, v, dout, lse, delta, dq, kv_num, kv_idx,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(), *lse.stride(),
        *strides_bhm(kv_num), *strides_bhm(kv_idx),
        seq_q, seq_k, heads_q // heads_kv, scale, scale * LOG2E, SLOTS=_slots(kv_idx), BLOCK_M=tile.block_m,
        BLOCK_N=tile.block_n, ACCUM=dq_acc is not None, num_warps=tile.num_warps, num_stages=tile.num_stages,
        **common)
    return dq, dk, dv
