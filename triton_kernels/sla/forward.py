"""The fused SLA forward: per query block, the linear branch over the marginal key blocks (from
the query block's state sums of row_states.py, the default, or by pre-aggregation of the key-block
states with ATTNLIB_SLA_ROW_STATES=0) and the block-sparse online softmax over the critical ones,
in one kernel.

Pre-aggregation (SLA appendix): H_i = sum of h_j over row i's marginal blocks, Z_i likewise, is
summed directly when the marginal list is the shorter one, else as the row total minus the
critical and negligible blocks, so a row never adds more than half its blocks. Then
O_l = phi(Q_i) H_i / (phi(Q_i) . Z_i + eps) (0 where the denominator is 0). The critical part
walks the class-ordered list's first n_crit entries with flash's shared per-block step, exactly
as block_sparse's forward does (blocks below the causal diagonal unmasked, the rest masked),
with its tiles (block_sparse.configs: fp32 runs tiles smaller than the block).

H_i is formed and applied in column chunks of at most 64 (D x 64 fp32 at a time), which keeps
the kernel inside H100 shared memory at hd128 without spills; fp16/bf16 inputs meet the fp32
states with tf32 dots, fp32 inputs with tf32x3. When the forward's lse was not kept, the
backward runs the same kernel to re-walk the critical blocks, writing lse and
delta = rowsum(dO * O_s) instead of O_s.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..block_sparse.configs import launch_config
from ..block_sparse.forward import attend_listed, count_listed_below, kv_tile_bases, query_tile
from ..flash.common import LOG2E, dot_precision, load_tile, query_key_range, row_tile, store_tile
from ..linear.kernels import FEATURE_IDS, feature_map
from ..masks import gated
from .classify import BlockIndex, padded
from ..hostmath import cdiv, next_power_of_2
from ..stage_fallback import launch_fitting

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
def marginal_columns(H, Z, H_TOT, Z_TOT, idx_row, n_crit, n_marg, n_all, c0, offs_d, offs_c, d_ok,
                     HEAD_DIM: tl.constexpr):
    """Columns c0 + offs_c of a row's marginal state H_i (D x HC) and its Z_i (D), fp32: the
    D x D state is formed one column chunk at a time, which bounds its registers and the shared
    memory of the dots that read it."""
    cols = c0 + offs_c
    return marginal_sum(H, Z, H_TOT, Z_TOT, idx_row, n_crit, n_marg, n_all, offs_d, cols, d_ok, cols < HEAD_DIM,
                        HEAD_DIM, HEAD_DIM)


@triton.jit
def row_state_columns(HR, ZR, row_id, c0, offs_d, offs_c, d_ok, HEAD_DIM: tl.constexpr):
    """Columns c0 + offs_c of row row_id's marginal state from row_states.row_states (H_i
    (D x D) and Z_i (D) per query block, fp32 contiguous): the ROW_STATES path."""
    cols = c0 + offs_c
    b_h = tl.load(HR + row_id * (HEAD_DIM * HEAD_DIM) + offs_d[:, None] * HEAD_DIM + cols[None, :],
                  mask=d_ok[:, None] & (cols < HEAD_DIM)[None, :], other=0.0)
    b_z = tl.load(ZR + row_id * HEAD_DIM + offs_d, mask=d_ok, other=0.0)
    return b_h, b_z


@triton.jit
def query_block_state(H, Z, H_TOT, Z_TOT, idx_row, row_id, n_crit, n_marg, kv_slab, num_kb, c0, offs_d, offs_c,
                      d_ok, HEAD_DIM: tl.constexpr, ROW_STATES: tl.constexpr):
    """Columns c0 + offs_c of query block row_id's H_i and its Z_i: read from the row states
    (ROW_STATES) or pre-aggregated from the (batch, kv head) slab kv_slab of h, z and their totals."""
    if ROW_STATES:
        b_h, b_z = row_state_columns(H, Z, row_id, c0, offs_d, offs_c, d_ok, HEAD_DIM)
    else:
        b_h, b_z = marginal_columns(H + kv_slab * num_kb * HEAD_DIM * HEAD_DIM, Z + kv_slab * num_kb * HEAD_DIM,
                                    H_TOT + kv_slab * HEAD_DIM * HEAD_DIM, Z_TOT + kv_slab * HEAD_DIM, idx_row,
                                    n_crit, n_marg, num_kb, c0, offs_d, offs_c, d_ok, HEAD_DIM)
    return b_h, b_z


@triton.jit
def linear_branch(acc, b_q, H, Z, H_TOT, Z_TOT, W, OL, N_MARG, idx_row, row_id, n_crit, b64, h64, kvh64, heads, group,
                  seq_q, num_kb, eps, offs_m, offs_d, m_ok, d_ok, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                  HC: tl.constexpr, FEAT: tl.constexpr, LIN_PREC: tl.constexpr, ROW_STATES: tl.constexpr,
                  PROJ: tl.constexpr):
    """O_l = phi(Q) H_i / (phi(Q) . Z_i + eps) for one query tile, one column chunk of H_i at a
    time. PROJ: returns acc + O_l W^T (W (D, D) contiguous); else stores O_l into OL's rows
    (B, Hq, Sq, D fp32 contiguous) and returns acc unchanged."""
    n_marg = tl.load(N_MARG + row_id)
    kv_slab = b64 * (heads // group) + kvh64
    phi_q = feature_map(b_q.to(tl.float32), m_ok, d_ok, FEAT)
    offs_c = tl.arange(0, HC)
    ol_rows = OL + ((b64 * heads + h64) * seq_q + offs_m[:, None]) * HEAD_DIM
    for c0 in tl.static_range(0, D_PAD, HC):
        b_h, b_z = query_block_state(H, Z, H_TOT, Z_TOT, idx_row, row_id, n_crit, n_marg, kv_slab, num_kb, c0,
                                     offs_d, offs_c, d_ok, HEAD_DIM, ROW_STATES)
        num = tl.dot(phi_q, b_h, input_precision=LIN_PREC)
        den = tl.sum(phi_q * b_z[None, :], 1) + eps
        den_safe = tl.where(den == 0.0, 1.0, den)
        o_l = tl.where(den[:, None] == 0.0, 0.0, num / den_safe[:, None])
        cols = c0 + offs_c
        if PROJ:
            # rows cols of W^T: (W^T)[c, e] = W[e, c]
            w_t = tl.load(W + offs_d[None, :] * HEAD_DIM + cols[:, None],
                          mask=(cols < HEAD_DIM)[:, None] & d_ok[None, :], other=0.0)
            acc = tl.dot(o_l, w_t.to(tl.float32), acc, input_precision=LIN_PREC)
        else:
            tl.store(ol_rows + cols[None, :], o_l, mask=m_ok[:, None] & (cols < HEAD_DIM)[None, :])
    return acc


@triton.jit(do_not_specialize=["seq_q", "seq_k"])
def sla_fwd_kernel(
    Q, K, V, OS, OL, LSE, DO, DELTA, H, Z, H_TOT, Z_TOT, N_CRIT, N_MARG, IDX, W, BIAS, REDO,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, stride_lm,
    seq_q, seq_k, group, num_qb, num_kb, qk_scale, eps,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HC: tl.constexpr, FEAT: tl.constexpr, CAUSAL: tl.constexpr,
    LINEAR: tl.constexpr, STORE_LSE: tl.constexpr, WITH_DELTA: tl.constexpr,
    ROW_STATES: tl.constexpr, PROJ: tl.constexpr, HAS_BIAS: tl.constexpr, WITH_REDO: tl.constexpr,
    PREC: tl.constexpr, LIN_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_M: tl.constexpr,
    MASK_N: tl.constexpr, SLOTS: tl.constexpr,
):
    """Grid (query tiles, query heads, batch); a tile is BLOCK_M rows of mask row
    start_m // MASK_M. OS: the sparse output (any float dtype, bhsd strides), written unless
    WITH_DELTA, which instead writes DELTA = rowsum(DO * O_s) (B, Hq, Sq) fp32 (LSE's strides)
    from the fp32 O_s (the backward's recompute: O_s is never stored). OL (B, Hq, Sq, D) fp32
    contiguous, written with LINEAR; LSE (B, Hq, Sq) fp32 with STORE_LSE. With ROW_STATES, H and
    Z hold each query block's marginal sums (row_states.py; B, Hq, Mq, D[, D]) and H_TOT, Z_TOT
    are unused; otherwise H, Z (B, Hkv, Mk, D[, D]) and H_TOT, Z_TOT (B, Hkv, D[, D]) fp32
    contiguous; N_CRIT, N_MARG
    (B, Hq, Mq), IDX (B, Hq, Mq, Mk) int32 contiguous (classify.class_index).
    PROJ (with LINEAR): the epilogue writes OS = O_s + O_l W^T (+ BIAS with HAS_BIAS)
    and OL is not written; W (D, D) contiguous, BIAS (D,) contiguous, any float dtype.
    WITH_REDO (with WITH_DELTA): REDO (B, Hq, Sq) int8 (LSE's strides) flags rows; a tile with no
    flagged row walks no block and writes nothing, the others write DELTA for every row."""
    b64, h64, kvh64, start_m, mask_row, offs_m, offs_n, offs_d, m_ok, d_ok = query_tile(
        group, seq_q, HEAD_DIM, D_PAD, BLOCK_M, BLOCK_N, MASK_M)
    heads = tl.num_programs(1)
    CHECK_D: tl.constexpr = D_PAD != HEAD_DIM
    row_id = (b64 * heads + h64) * num_qb + mask_row
    idx_row = IDX + row_id * num_kb
    n_crit = tl.load(N_CRIT + row_id)
    if WITH_REDO:  # the backward's exact delta, only for tiles holding a row sla_delta flagged
        redo_ptrs = REDO + b64 * stride_lb + h64 * stride_lh + offs_m * stride_lm
        redo = tl.max(tl.load(redo_ptrs, mask=m_ok, other=0).to(tl.int32), 0) > 0
        n_crit = tl.where(redo, n_crit, 0)

    offs_i = tl.arange(0, BLOCK_M)
    q_ptrs = row_tile(Q + b64 * stride_qb + h64 * stride_qh, start_m, offs_i, offs_d, stride_qm, stride_qd)
    b_q = load_tile(q_ptrs, m_ok, d_ok, True, CHECK_D)

    # critical blocks: block_sparse's main loop over the list's first n_crit entries
    k_base, v_base = kv_tile_bases(K, V, b64, kvh64, offs_n, offs_d, stride_kb, stride_kh, stride_kn,
                                   stride_kd, stride_vb, stride_vh, stride_vn, stride_vd)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    diag = seq_k - seq_q
    full_end, hi = query_key_range(start_m, seq_q, seq_k, BLOCK_M, MASK_N, CAUSAL)
    n_full = count_listed_below(idx_row, n_crit, full_end, MASK_N, SLOTS)
    n_vis = count_listed_below(idx_row, n_crit, hi, MASK_N, SLOTS)
    acc, l_i, m_i = attend_listed(acc, l_i, m_i, b_q, idx_row, 0, n_full, k_base, v_base, stride_kn,
                                  stride_vn, offs_m, offs_n, d_ok, seq_k, diag, qk_scale, CHECK_D, False, CAUSAL,
                                  PREC, BLOCK_N, MASK_N)
    acc, l_i, m_i = attend_listed(acc, l_i, m_i, b_q, idx_row, n_full, n_vis, k_base, v_base, stride_kn,
                                  stride_vn, offs_m, offs_n, d_ok, seq_k, diag, qk_scale, CHECK_D, True, CAUSAL,
                                  PREC, BLOCK_N, MASK_N)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o_s = acc / l_safe[:, None]
    # the linear branch after the critical loop, so its D-wide result is not held in registers
    # through it: before, at hd128 with the projection, ptxas spilled with 3 stages and the loop
    # ran on 2, which on sm_90 leaves the K/V tiles' loads unoverlapped (TTGIR async_wait num = 0)
    if LINEAR:  # with PROJ, o_s += O_l W^T; else O_l to OL (the backward's re-walk)
        o_s = linear_branch(o_s, b_q, H, Z, H_TOT, Z_TOT, W, OL, N_MARG, idx_row, row_id, n_crit, b64, h64, kvh64,
                            heads, group, seq_q, num_kb, eps, offs_m, offs_d, m_ok, d_ok, HEAD_DIM, D_PAD, HC, FEAT,
                            LIN_PREC, ROW_STATES, PROJ)
    lse_off = b64 * stride_lb + h64 * stride_lh + offs_m * stride_lm
    if WITH_DELTA:
        b_do = load_tile(row_tile(DO + b64 * stride_dob + h64 * stride_doh, start_m, offs_i, offs_d, stride_dom,
                                  stride_dod), m_ok, d_ok, True, CHECK_D)
        if WITH_REDO:
            tl.store(DELTA + lse_off, tl.sum(b_do.to(tl.float32) * o_s, 1), mask=gated(m_ok, redo))
        else:
            tl.store(DELTA + lse_off, tl.sum(b_do.to(tl.float32) * o_s, 1), mask=m_ok)
    else:
        if HAS_BIAS:
            o_s += tl.load(BIAS + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        o_ptrs = row_tile(OS + b64 * stride_ob + h64 * stride_oh, start_m, offs_i, offs_d, stride_om, stride_od)
        store_tile(o_ptrs, o_s.to(OS.dtype.element_ty), m_ok, d_ok, CHECK_D)
    if STORE_LSE:
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
        tl.store(LSE + lse_off, lse, mask=m_ok)


def slots(num_kb: int) -> int:
    return max(16, next_power_of_2(num_kb))


def state_chunk(d_pad: int) -> int:
    """Columns of the D x D state a kernel holds at once."""
    return min(d_pad, 64)


def state_precision(dtype: torch.dtype) -> str:
    # the fp32 states meet phi(Q) in fp32: tf32 (10-bit mantissa) is finer than fp16/bf16 inputs,
    # fp32 inputs keep fp32 accuracy with tf32x3
    return "tf32x3" if dtype == torch.float32 else "tf32"


def sla_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out_sparse: Optional[torch.Tensor], index: BlockIndex,
            *, block_size: tuple[int, int], causal: bool, scale: float, feature: str,
            h: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
            lse: Optional[torch.Tensor] = None, dout: Optional[torch.Tensor] = None,
            delta: Optional[torch.Tensor] = None,
            rows_hz: Optional[tuple[torch.Tensor, torch.Tensor]] = None, weight: Optional[torch.Tensor] = None,
            bias: Optional[torch.Tensor] = None, redo: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Launch the fused forward on bhsd views (unit last stride). Writes out_sparse, or with dout
    and delta (the backward's recompute) delta = rowsum(dout * O_s) instead; lse (B, Hq, Sq) fp32
    when given. rows_hz: each query block's marginal sums (row_states.row_states), used instead
    of pre-aggregating h, z per tile.
    weight (D, D), bias (D,), any strides (made contiguous here: D * D elements at most):
    out_sparse receives O_s + O_l W^T + b instead of O_s (weight needs the linear branch; then
    O_l is not returned).
    redo (B, Hq, Sq) int8 contiguous, with dout and delta (delta.sla_delta's flags): only the query
    tiles holding a flagged row walk their critical blocks and write delta (for all their rows);
    the other rows' delta is left as it was.
    With the key-block states h, z (the linear branch) returns O_l (B, Hq, Sq, D)
    fp32, else None."""
    batch, heads_q, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    bm, bn = block_size
    mq, mk = index.idx.shape[2], index.idx.shape[3]
    linear = h is not None
    proj = weight is not None
    if (proj or bias is not None) and (delta is not None or (proj and not linear)):
        raise ValueError("sla_fwd: the projection epilogue writes out_sparse (not delta) and needs h, z for weight")
    if redo is not None and delta is None:
        raise ValueError("sla_fwd: redo flags rows for delta, which needs dout and delta")
    o_l = (torch.empty(batch, heads_q, seq_q, head_dim, dtype=torch.float32, device=q.device)
           if linear and not proj else None)
    if batch == 0 or heads_q == 0 or seq_q == 0:
        return o_l
    use_rows = linear and rows_hz is not None
    if use_rows:
        h, z = rows_hz
        h_tot = z_tot = None
    else:
        h_tot, z_tot = (h.sum(2), z.sum(2)) if linear else (None, None)
    with_delta = delta is not None
    dummy = q
    os_arg = dummy if with_delta else out_sparse
    stats = lse if lse is not None else delta
    tile = launch_config(bm, bn, head_dim, "sla_fwd", q.element_size())
    d_pad = padded(head_dim)
    launch_fitting(
        sla_fwd_kernel, (cdiv(seq_q, tile.block_m), heads_q, batch),
        q, k, v, os_arg, o_l if o_l is not None else dummy, lse if lse is not None else dummy,
        dout if with_delta else dummy, delta if with_delta else dummy,
        h if linear else dummy, z if linear else dummy,
        h_tot if h_tot is not None else dummy, z_tot if z_tot is not None else dummy,
        index.n_crit, index.n_marg, index.idx, weight.contiguous() if proj else dummy,
        bias.contiguous() if bias is not None else dummy,  # the kernel reads BIAS + offs_d
        redo if redo is not None else dummy,
        *q.stride(), *k.stride(), *v.stride(), *os_arg.stride(),
        *(dout.stride() if with_delta else q.stride()),
        *(stats.stride() if stats is not None else (0, 0, 0)),
        seq_q, seq_k, heads_q // k.shape[1], mq, mk, scale * LOG2E, LINEAR_EPS,
        HEAD_DIM=head_dim, D_PAD=d_pad, HC=state_chunk(d_pad), FEAT=FEATURE_IDS[feature], CAUSAL=causal,
        LINEAR=linear, STORE_LSE=lse is not None, WITH_DELTA=with_delta, ROW_STATES=use_rows,
        PROJ=proj, HAS_BIAS=bias is not None, WITH_REDO=redo is not None,
        PREC=dot_precision(q.dtype),
        LIN_PREC=state_precision(q.dtype), BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, MASK_M=bm, MASK_N=bn,
        SLOTS=slots(mk), num_warps=tile.num_warps, num_stages=tile.num_stages)
    return o_l
