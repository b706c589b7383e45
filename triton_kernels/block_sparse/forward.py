"""Block-sparse attention forward in Triton: the flash forward with its key loop walking the row
index form (kv_num_blocks, kv_indices) instead of every key block. Per query block, the listed
key blocks (ascending) split into a prefix that needs no mask and a suffix at the causal
diagonal / key tail; blocks past the causal limit are never visited, so work is proportional
to the visible listed blocks.

The kernel's tile (BLOCK_M x BLOCK_N) may be a part of the mask's block (MASK_M x MASK_N), as
configs.launch_config chooses: a program covers BLOCK_M rows of one mask row and visits each
listed key block as MASK_N / BLOCK_N tiles."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..flash.common import (LOG2E, attend_key_block, dot_precision, load_tile, query_key_range, row_tile,
                            store_tile)
from ..flash import configs as flash_configs
from .configs import launch_config, padded_head_dim
from ..hostmath import cdiv, next_power_of_2
from ..stage_fallback import launch_fitting


@triton.jit
def count_listed_below(row_ptr, n_listed, limit, BLOCK: tl.constexpr, SLOTS: tl.constexpr):
    """How many of the first n_listed (ascending) block indices start below token `limit`."""
    slots = tl.arange(0, SLOTS)
    idx = tl.load(row_ptr + slots, mask=slots < n_listed, other=0)
    below = (slots < n_listed) & (idx * BLOCK < limit)
    return tl.sum(below.to(tl.int32), axis=0)


@triton.jit
def listed_block(row, it, end, SUB: tl.constexpr):
    """The block index of flat iteration `it` over (listed block, tile) pairs: row[it // SUB], or
    0 from `end` on.

    The loops over listed blocks load it one iteration ahead and carry it: loaded in the
    iteration that uses it, Triton 3.6 on sm_90 pipelines it as an async copy and then waits for
    every copy at the top of each iteration (TTGIR async_wait num = 0), so the tiles' loads were
    never overlapped with compute; carried, the tile loads pipeline as the dense loops' do
    (num = 2 with 3 stages; checked with tests/triton_sm90.py)."""
    return tl.load(row + it // SUB, mask=it < end, other=0)


@triton.jit
def listed_tile(row, blk, it, end, SUB: tl.constexpr, MASK: tl.constexpr, BLOCK: tl.constexpr):
    """(first row of iteration it's tile, the block index of iteration it + 1), given blk, the
    block index of iteration it: each tile is one of a listed MASK-row block's SUB BLOCK-row parts."""
    return blk * MASK + (it % SUB) * BLOCK, listed_block(row, it + 1, end, SUB)


@triton.jit
def attend_listed(acc, l_i, m_i, b_q, row, first, last, k_base, v_base, stride_kn, stride_vn, offs_m, offs_n,
                  d_ok, seq_k, diag, qk_scale, CHECK_D: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
                  PREC: tl.constexpr, BLOCK_N: tl.constexpr, MASK_N: tl.constexpr):
    """Fold the listed key blocks row[first:last] (mask blocks of MASK_N keys, each as
    MASK_N / BLOCK_N tiles) into the online softmax; MASK for blocks at the diagonal / key tail."""
    SUB: tl.constexpr = MASK_N // BLOCK_N
    # one flat loop over (block, tile) pairs, so the compiler pipelines it as the dense loop;
    # the block index is loaded one iteration ahead (listed_block says why)
    blk = listed_block(row, first * SUB, last * SUB, SUB)
    for it in range(first * SUB, last * SUB):
        start_n, blk = listed_tile(row, blk, it, last * SUB, SUB, MASK_N, BLOCK_N)
        off_k = start_n.to(tl.int64)
        acc, l_i, m_i = attend_key_block(acc, l_i, m_i, b_q, k_base + off_k * stride_kn, v_base + off_k * stride_vn,
                                         offs_m, start_n + offs_n, d_ok, seq_k, diag, qk_scale, CHECK_D, MASK, CAUSAL,
                                         PREC)
    return acc, l_i, m_i


@triton.jit
def query_tile(group, seq_q, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, MASK_M: tl.constexpr):
    """Ids and offsets of a program on grid (query tiles, query heads, batch): (b64, h64, kvh64,
    start_m, mask_row, offs_m, offs_n, offs_d, m_ok, d_ok)."""
    h = tl.program_id(1)
    start_m = tl.program_id(0) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    return (tl.program_id(2).to(tl.int64), h.to(tl.int64), (h // group).to(tl.int64), start_m, start_m // MASK_M,
            offs_m, tl.arange(0, BLOCK_N), offs_d, offs_m < seq_q, offs_d < HEAD_DIM)


@triton.jit
def key_tile(seq_k, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, MASK_N: tl.constexpr):
    """Ids and offsets of a program on grid (key tiles, kv heads, batch): (b64, kvh64, start_n,
    mask_col, offs_n, offs_d, n_ok, d_ok)."""
    start_n = tl.program_id(0) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    return (tl.program_id(2).to(tl.int64), tl.program_id(1).to(tl.int64), start_n, start_n // MASK_N, offs_n,
            offs_d, offs_n < seq_k, offs_d < HEAD_DIM)


@triton.jit
def kv_tile_bases(K, V, b64, kvh64, offs_n, offs_d, stride_kb, stride_kh, stride_kn, stride_kd,
                  stride_vb, stride_vh, stride_vn, stride_vd):
    """Pointers to the first key tile of K and V (add start_n * stride to move)."""
    k_base = K + b64 * stride_kb + kvh64 * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_base = V + b64 * stride_vb + kvh64 * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    return k_base, v_base


@triton.jit
def listed_key_range(KV_NUM, KV_IDX, b64, h64, mask_row, stride_cb, stride_ch, stride_cm, stride_ib, stride_ih,
                     stride_im, start_m, seq_q, seq_k, BLOCK_M: tl.constexpr, MASK_N: tl.constexpr,
                     CAUSAL: tl.constexpr, SLOTS: tl.constexpr):
    """The query tile's row of listed key blocks and how many of them need no mask (n_full) or
    are visible at all (n_vis): listed blocks starting below full_end / hi, in whole mask blocks."""
    full_end, hi = query_key_range(start_m, seq_q, seq_k, BLOCK_M, MASK_N, CAUSAL)
    row = KV_IDX + b64 * stride_ib + h64 * stride_ih + mask_row * stride_im
    n_listed = tl.load(KV_NUM + b64 * stride_cb + h64 * stride_ch + mask_row * stride_cm)
    return row, count_listed_below(row, n_listed, full_end, MASK_N, SLOTS), \
        count_listed_below(row, n_listed, hi, MASK_N, SLOTS)


@triton.jit(do_not_specialize=["seq_q", "seq_k"])
def block_sparse_fwd_kernel(
    Q, K, V, O, LSE, KV_NUM, KV_IDX,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    stride_cb, stride_ch, stride_cm,
    stride_ib, stride_ih, stride_im,
    seq_q, seq_k, group, qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_M: tl.constexpr, MASK_N: tl.constexpr,
    SLOTS: tl.constexpr,
):
    """Grid (query tiles, query heads, batch). KV_NUM/KV_IDX strides are 0 on broadcast dims."""
    b64, h64, kvh64, start_m, mask_row, offs_m, offs_n, offs_d, m_ok, d_ok = query_tile(
        group, seq_q, HEAD_DIM, D_PAD, BLOCK_M, BLOCK_N, MASK_M)
    CHECK_D: tl.constexpr = D_PAD != HEAD_DIM
    k_base, v_base = kv_tile_bases(K, V, b64, kvh64, offs_n, offs_d, stride_kb, stride_kh, stride_kn, stride_kd,
                                   stride_vb, stride_vh, stride_vn, stride_vd)
    offs_i = tl.arange(0, BLOCK_M)
    b_q = load_tile(row_tile(Q + b64 * stride_qb + h64 * stride_qh, start_m, offs_i, offs_d, stride_qm, stride_qd),
                    m_ok, d_ok, True, CHECK_D)

    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    diag = seq_k - seq_q
    row, n_full, n_vis = listed_key_range(KV_NUM, KV_IDX, b64, h64, mask_row, stride_cb, stride_ch, stride_cm,
                                          stride_ib, stride_ih, stride_im, start_m, seq_q, seq_k, BLOCK_M, MASK_N,
                                          CAUSAL, SLOTS)
    acc, l_i, m_i = attend_listed(acc, l_i, m_i, b_q, row, 0, n_full, k_base, v_base, stride_kn, stride_vn, offs_m,
                                  offs_n, d_ok, seq_k, diag, qk_scale, CHECK_D, False, CAUSAL, PREC, BLOCK_N, MASK_N)
    acc, l_i, m_i = attend_listed(acc, l_i, m_i, b_q, row, n_full, n_vis, k_base, v_base, stride_kn, stride_vn,
                                  offs_m, offs_n, d_ok, seq_k, diag, qk_scale, CHECK_D, True, CAUSAL, PREC, BLOCK_N,
                                  MASK_N)

    # a row with nothing allowed: output 0, lse -inf
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)  # log2 -> ln
    o_ptrs = row_tile(O + b64 * stride_ob + h64 * stride_oh, start_m, offs_i, offs_d, stride_om, stride_od)
    store_tile(o_ptrs, (acc / l_safe[:, None]).to(O.dtype.element_ty), m_ok, d_ok, CHECK_D)
    tl.store(LSE + b64 * stride_lb + h64 * stride_lh + offs_m * stride_lm, lse, mask=m_ok)


def strides_bhm(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, row) strides of a (B or 1, H or 1, M, ...) index tensor; 0 where broadcast."""
    return tuple(0 if t.shape[i] == 1 else t.stride(i) for i in range(3))


def block_sparse_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                     kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, *, block_size: tuple[int, int],
                     causal: bool, scale: float) -> None:
    """Launch the forward on bhsd views (unit last stride). kv_num_blocks (B|1, Hq|1, Mq) int32 and
    kv_indices (B|1, Hq|1, Mq, Mk) int32 (last stride 1) from attnlib.block_mask; writes out and
    lse (B, Hq, Sq) float32."""
    batch, heads_q, seq_q, head_dim = q.shape
    heads_kv, seq_k = k.shape[1], k.shape[2]
    if batch == 0 or heads_q == 0 or seq_q == 0:
        return
    if seq_k == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return
    bm, bn = block_size
    tile = launch_config(bm, bn, head_dim, "fwd", q.element_size(), flash_configs.device_smem_limit(q))
    grid = (cdiv(seq_q, tile.block_m), heads_q, batch)
    launch_fitting(
        block_sparse_fwd_kernel, grid,
        q, k, v, out, lse, kv_num_blocks, kv_indices,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
        *strides_bhm(kv_num_blocks), *strides_bhm(kv_indices),
        seq_q, seq_k, heads_q // heads_kv, scale * LOG2E,
        HEAD_DIM=head_dim, D_PAD=padded_head_dim(head_dim), CAUSAL=causal, PREC=dot_precision(q.dtype),
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, MASK_M=bm, MASK_N=bn,
        SLOTS=max(16, next_power_of_2(kv_indices.shape[-1])), num_warps=tile.num_warps,
        num_stages=tile.num_stages,
    )
