"""SLA block classification and the key-block preprocess, on the GPU.

Classification follows attnlib.reference.sla.sla_block_classes exactly: P_c = softmax over each
query-block row of pool(Q_i) . pool(K_j) * scale (mean pooling over a block's real tokens; under
causal only the fully visible "eligible" key blocks take part); a block's rank is the number of
eligible blocks with larger P_c, or equal P_c and a lower index (the reference's stable descending
sort: torch.argsort per row, O(Mk log Mk); the kernel counted it pairwise before, O(Mk^2) per row,
and classification took 1.2 ms of a 6.2 ms forward at Wan2.1-1.3B on an H100, 2026-11-27);
rank < n_crit is critical, rank >= n - n_neg negligible, the rest marginal; causal blocks crossing
the diagonal are forced critical and blocks no query of the block sees are negligible.

The per-row counts (n_crit, n_neg) come from sla_block_counts' float64 rule, evaluated with torch
on the device (the same IEEE operations as the reference's Python floats, and no host sync).

The key-block preprocess reads each key block once: pool(K_j) for the classifier and, when the
linear branch runs, h_j = phi(K_j)^T V_j (D x Dv) and z_j = sum_t phi(K_j)_t, fp32.

The index form the kernels walk (``class_index``) lists per row the critical blocks, then the
marginal, then the negligible ones, each group ascending: the first n_crit entries are the
block-sparse row form, and the marginal / non-marginal lists of the pre-aggregation are slices.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ..device_constants import device_constant
from ..flash.common import row_tile
from ..linear.kernels import FEATURE_IDS, feature_map
from ..masks import gated
from ..switches import autotune_enabled, interpreting
from ..hostmath import cdiv, next_power_of_2

CRITICAL, MARGINAL, NEGLIGIBLE = 1, 0, -1
_COUNT_SLACK = 1e-9  # as attnlib.reference.sla: fraction * n a hair off an integer


def padded(d: int) -> int:
    return max(16, next_power_of_2(d))


@dataclass(frozen=True)
class BlockIndex:
    """Per row (query block, or key block in the column form): counts and the class-ordered list.

    n_crit, n_marg (B, H, M) int32; idx (B, H, M, N) int32 contiguous: critical blocks ascending,
    then marginal ascending, then negligible ascending."""

    n_crit: torch.Tensor
    n_marg: torch.Tensor
    idx: torch.Tensor

    @property
    def row_form(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(kv_num_blocks, kv_indices) of the critical blocks, as block_sparse's kernels read them."""
        return self.n_crit, self.idx


def class_index(classes: torch.Tensor) -> BlockIndex:
    """The class-ordered index form of an int8 (B, H, M, N) map of 1/0/-1, any strides
    (index_form.py: one kernel, no sort)."""
    from .index_form import class_index_triton

    return BlockIndex(*class_index_triton(classes))


def class_index_reference(classes: torch.Tensor) -> BlockIndex:
    """What class_index computes, with torch: one stable sort per row by class."""
    order_key = (1 - classes.to(torch.int16)).to(torch.uint8)  # critical 0, marginal 1, negligible 2
    idx = torch.sort(order_key, dim=-1, stable=True).indices.to(torch.int32).contiguous()
    n_crit = (classes == CRITICAL).sum(-1, dtype=torch.int32).contiguous()
    n_marg = (classes == MARGINAL).sum(-1, dtype=torch.int32).contiguous()
    return BlockIndex(n_crit, n_marg, idx)


def row_counts(seq_q: int, seq_k: int, block_size: tuple[int, int], causal: bool, critical: float,
               negligible: float, device) -> torch.Tensor:
    """int32 (Mq, 3): eligible blocks n, n_crit, n_neg per query-block row (sla_block_counts)."""
    bq, bk = block_size
    mq, mk = cdiv(seq_q, bq), cdiv(seq_k, bk)
    if causal:
        q_first = torch.arange(mq, device=device, dtype=torch.int64) * bq
        # fully visible key blocks: last key <= first query + offset
        last_full_key = q_first + (seq_k - seq_q)
        n = torch.where(last_full_key >= 0, torch.clamp((last_full_key + 1) // bk, max=mk), 0)
        n = torch.where(last_full_key + 1 >= seq_k, mk, n)  # a ragged last block ends at seq_k - 1
    else:
        n = torch.full((mq,), mk, device=device, dtype=torch.int64)
    nf = n.to(torch.float64)
    n_crit = torch.minimum(n, torch.ceil(critical * nf - _COUNT_SLACK).to(torch.int64)).clamp_min(0)
    n_neg = torch.minimum(n - n_crit, torch.floor(negligible * nf + _COUNT_SLACK).to(torch.int64)).clamp_min(0)
    return torch.stack([n, n_crit, n_neg], dim=1).to(torch.int32).contiguous()


@device_constant
def device_row_counts(seq_q: int, seq_k: int, block_size: tuple[int, int], causal: bool, critical: float,
                      negligible: float, device: torch.device) -> torch.Tensor:
    """row_counts on the device, kept per (shapes, fractions, device) (device_constants.py):
    about 20 tiny kernels a call otherwise. The kernels only read it."""
    return row_counts(seq_q, seq_k, block_size, causal, critical, negligible, device)


@functools.lru_cache(maxsize=256)  # ~100 us of host work at Wan's 512 rows; a training loop repeats its shapes
def has_marginal_blocks(seq_q: int, seq_k: int, block_size: tuple[int, int], causal: bool, critical: float,
                        negligible: float) -> bool:
    """Whether any row of the block map can hold a marginal block: a row of n eligible blocks
    has n - n_crit - n_neg of them, and the blocks that are not eligible are forced critical or
    negligible. From row_counts on the host (Mq int64s, no device work or sync): with none (e.g.
    negligible = 1 - critical) the linear branch is skipped entirely."""
    counts = row_counts(seq_q, seq_k, block_size, causal, critical, negligible, "cpu")
    return bool((counts[:, 0] > counts[:, 1] + counts[:, 2]).any())


# ---- kernels -------------------------------------------------------------------------------------
@triton.jit
def split_product(a, b, EMULATE: tl.constexpr):
    """a @ b for fp32 a and bf16 b, fp32 result, on the 16-bit tensor cores: a = hi + lo in bf16
    (16 significant bits at fp32's range; tf32 keeps 11), each multiplied with b and accumulated
    in fp32. Hopper's tf32 wgmma takes only K-major operands, so a tf32 product with b (N-major
    here) transposes b's tile; 16-bit operands need no transposition. Not for fp16 b: fp16 pieces
    go subnormal below 6e-5 (elu's phi of keys under about -10 lost most bits, under -17 all:
    a review's probe, stop 23). EMULATE (the interpreter, whose bf16 tl.dot is wrong): the pieces
    multiplied in fp32, exact. row_states.split_dot is its twin for the masked state sum; one
    helper for both was tried (stop 23): each kernel compiles best with its own order (this one
    forms lo before the first product: 128 registers at the hd128 default on sm_90, 174 with
    split_dot's order; split_dot's order in turn keeps a masked-sum candidate from spilling)."""
    hi = a.to(b.dtype)
    lo = (a - hi.to(tl.float32)).to(b.dtype)
    if EMULATE:
        acc = tl.dot(hi.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(lo.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(lo, b, tl.dot(hi, b))


@triton.jit(do_not_specialize=["seq_k"])
def key_block_kernel(K, V, PK, H, Z,
                     stride_kb, stride_kh, stride_kn, stride_kd,
                     stride_vb, stride_vh, stride_vn, stride_vd,
                     seq_k,
                     HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
                     FEAT: tl.constexpr, LINEAR: tl.constexpr, SPLIT: tl.constexpr, EMULATE: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    """Grid (key blocks * column chunks, kv heads, batch), chunk-minor: program (j, c) forms
    columns [c * BLOCK_E, (c + 1) * BLOCK_E) of H[j]; chunk 0 also writes PK[j] and Z[j]. PK
    (B, Hkv, Mk, D) fp32: the block's token mean; with LINEAR, H (B, Hkv, Mk, D, Dv) =
    phi(K_j)^T V_j and Z (B, Hkv, Mk, D) = sum phi(K_j), fp32 contiguous. Without LINEAR,
    BLOCK_E = DV_PAD (one chunk).

    SPLIT (bf16 K and V): phi(K_j)^T V_j as split_product's two bf16 products, V as loaded;
    otherwise (fp16, fp32) one tf32x3 product."""
    N_CHUNKS: tl.constexpr = DV_PAD // BLOCK_E
    pid_n = tl.program_id(0) // N_CHUNKS
    chunk = tl.program_id(0) % N_CHUNKS
    h = tl.program_id(1)
    b = tl.program_id(2)
    n_blocks = tl.num_programs(0) // N_CHUNKS
    blk = (b.to(tl.int64) * tl.num_programs(1) + h) * n_blocks + pid_n  # flat (b, h, j)
    start_n = pid_n * BLOCK_N
    offs_j = tl.arange(0, BLOCK_N)
    offs_n = start_n + offs_j
    offs_d = tl.arange(0, D_PAD)
    n_ok = offs_n < seq_k
    d_ok = offs_d < HEAD_DIM
    b_k = tl.load(row_tile(K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh, start_n, offs_j, offs_d,
                           stride_kn, stride_kd), mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    first = chunk == 0
    count = tl.minimum(seq_k - pid_n * BLOCK_N, BLOCK_N).to(tl.float32)
    tl.store(PK + blk * HEAD_DIM + offs_d, tl.sum(b_k, 0) / count, mask=gated(d_ok, first))
    if LINEAR:
        offs_e = chunk * BLOCK_E + tl.arange(0, BLOCK_E)
        e_ok = offs_e < DV
        b_v = tl.load(row_tile(V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh, start_n, offs_j, offs_e,
                               stride_vn, stride_vd), mask=n_ok[:, None] & e_ok[None, :], other=0.0)
        phi_k = feature_map(b_k, n_ok, d_ok, FEAT)
        if SPLIT:
            b_h = split_product(tl.trans(phi_k), b_v, EMULATE)
        else:
            b_h = tl.dot(tl.trans(phi_k), b_v.to(tl.float32), input_precision="tf32x3")
        tl.store(H + blk * HEAD_DIM * DV + offs_d[:, None] * DV + offs_e[None, :], b_h,
                 mask=d_ok[:, None] & e_ok[None, :])
        tl.store(Z + blk * HEAD_DIM + offs_d, tl.sum(phi_k, 0), mask=gated(d_ok, first))


# (BLOCK_E, num_warps) for the linear preprocess at Dv 128 (wider pads take the first): the whole
# D x Dv state in one program needs 128 KB of shared memory for the tf32x3 operands on sm_90 (one
# program per SM); column halves or quarters let several programs share an SM. Each compiles for
# sm_90 without spills; the GPU autotuner picks.
KEY_BLOCK_CANDIDATES = [(128, 8), (64, 4), (64, 8), (32, 4)]


key_block_kernel_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_E": e}, num_warps=w) for e, w in KEY_BLOCK_CANDIDATES],
    key=["HEAD_DIM", "DV", "FEAT", "BLOCK_N"])(key_block_kernel)


@triton.jit
def _eligibility(cols, q_first, q_last, seq_k, diag, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """(fully visible, crossing the diagonal) for key blocks `cols` of a query block [q_first, q_last]."""
    k_first = cols * BLOCK_N
    k_last = tl.minimum(k_first + BLOCK_N, seq_k) - 1
    if CAUSAL:
        full = k_last <= q_first + diag
        some = k_first <= q_last + diag
        crossing = some & (~full)
    else:
        full = k_first >= 0
        crossing = k_first < 0
    return full, crossing


@triton.jit(do_not_specialize=["seq_q", "seq_k"])
def classify_kernel(Q, PK, SCORE,
                    stride_qb, stride_qh, stride_qm, stride_qd,
                    seq_q, seq_k, group, num_kb, scale,
                    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    """Grid (query blocks, query heads, batch). PK (B, Hkv, Mk, D) fp32 pooled keys; SCORE
    (B, Hq, Mq, Mk) fp32, left holding the ranking key: P_c, -1 where ineligible (classify sorts
    it and classify_assign_kernel turns the ranks into classes)."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    heads = tl.num_programs(1)
    b64 = b.to(tl.int64)
    offs_i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_i < seq_q
    b_q = tl.load(row_tile(Q + b64 * stride_qb + h.to(tl.int64) * stride_qh, pid_m * BLOCK_M, tl.arange(0, BLOCK_M),
                           offs_d, stride_qm, stride_qd), mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    count = tl.minimum(seq_q - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
    pooled_q = tl.sum(b_q, 0) / count
    pk_base = PK + (b64 * (heads // group) + h // group) * num_kb * HEAD_DIM
    row = (b64 * heads + h) * tl.num_programs(0) + pid_m
    s_row = SCORE + row * num_kb
    q_first = pid_m * BLOCK_M
    q_last = tl.minimum(q_first + BLOCK_M, seq_q) - 1
    diag = seq_k - seq_q
    offs_c = tl.arange(0, CHUNK)

    # pass 1: scores of the eligible blocks, running max
    m_run = tl.full([CHUNK], float("-inf"), dtype=tl.float32)
    for c0 in range(0, num_kb, CHUNK):
        cols = c0 + offs_c
        c_ok = cols < num_kb
        pk = tl.load(pk_base + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=c_ok[:, None] & d_ok[None, :],
                     other=0.0)
        s = tl.sum(pk * pooled_q[None, :], 1) * scale
        full, _ = _eligibility(cols, q_first, q_last, seq_k, diag, BLOCK_N, CAUSAL)
        s = tl.where(full & c_ok, s, float("-inf"))
        tl.store(s_row + cols, s, mask=c_ok)
        m_run = tl.maximum(m_run, s)
    m = tl.max(m_run, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    tl.debug_barrier()
    l_run = tl.zeros([CHUNK], dtype=tl.float32)
    for c0 in range(0, num_kb, CHUNK):
        cols = c0 + offs_c
        s = tl.load(s_row + cols, mask=cols < num_kb, other=float("-inf"))
        l_run += tl.exp(s - m_safe)
    l_sum = tl.sum(l_run, 0)
    l_sum = tl.where(l_sum == 0.0, 1.0, l_sum)
    tl.debug_barrier()
    # pass 2: the ranking key, P_c on eligible blocks and -1 elsewhere (as the reference's sort key)
    for c0 in range(0, num_kb, CHUNK):
        cols = c0 + offs_c
        c_ok = cols < num_kb
        s = tl.load(s_row + cols, mask=c_ok, other=float("-inf"))
        full, _ = _eligibility(cols, q_first, q_last, seq_k, diag, BLOCK_N, CAUSAL)
        key = tl.where(full, tl.exp(s - m_safe) / l_sum, -1.0)
        tl.store(s_row + cols, key, mask=c_ok)


@triton.jit(do_not_specialize=["seq_q", "seq_k"])
def classify_assign_kernel(RANK, CLS, COUNTS, seq_q, seq_k, num_kb,
                           CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           CHUNK: tl.constexpr):
    """Grid (query blocks, query heads, batch). RANK (B, Hq, Mq, Mk) int32: each block's place in
    its row's stable descending order of the ranking key (classify_kernel's SCORE); CLS int8 out."""
    pid_m = tl.program_id(0)
    row = (tl.program_id(2).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(0) + pid_m
    q_first = pid_m * BLOCK_M
    q_last = tl.minimum(q_first + BLOCK_M, seq_q) - 1
    diag = seq_k - seq_q
    n_elig = tl.load(COUNTS + pid_m * 3)
    n_crit = tl.load(COUNTS + pid_m * 3 + 1)
    n_neg = tl.load(COUNTS + pid_m * 3 + 2)
    offs_c = tl.arange(0, CHUNK)
    for c0 in range(0, num_kb, CHUNK):
        cols = c0 + offs_c
        c_ok = cols < num_kb
        rank = tl.load(RANK + row * num_kb + cols, mask=c_ok, other=0)
        full, crossing = _eligibility(cols, q_first, q_last, seq_k, diag, BLOCK_N, CAUSAL)
        cls = tl.where(rank < n_crit, 1, tl.where(rank >= n_elig - n_neg, -1, 0))
        cls = tl.where(full, cls, tl.where(crossing, 1, -1))
        tl.store(CLS + row * num_kb + cols, cls.to(tl.int8), mask=c_ok)


# ---- launchers -------------------------------------------------------------------------------------
def _warps(tile: int) -> int:
    return 1 if interpreting() else (8 if tile >= 128 * 128 else 4)


def key_blocks(k: torch.Tensor, v: torch.Tensor, *, block_n: int, feature: str, linear: bool,
               config: Optional[tuple[int, int]] = None
               ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(pooled K (B, Hkv, Mk, D), h (B, Hkv, Mk, D, Dv) or None, z (B, Hkv, Mk, D) or None), fp32.
    The linear preprocess at Dv 128 on a GPU is autotuned (KEY_BLOCK_CANDIDATES); config
    (BLOCK_E, num_warps) names one instead (tests)."""
    batch, heads, seq_k, d = k.shape
    dv = v.shape[3]
    mk = cdiv(seq_k, block_n)
    pk = torch.empty(batch, heads, mk, d, dtype=torch.float32, device=k.device)
    h = torch.empty(batch, heads, mk, d, dv, dtype=torch.float32, device=k.device) if linear else None
    z = torch.empty(batch, heads, mk, d, dtype=torch.float32, device=k.device) if linear else None
    if pk.numel() == 0:
        return pk, h, z
    args = (k, v, pk, h if linear else pk, z if linear else pk, *k.stride(), *v.stride(), seq_k)
    meta = dict(HEAD_DIM=d, D_PAD=padded(d), DV=dv, DV_PAD=padded(dv), FEAT=FEATURE_IDS[feature], LINEAR=linear,
                SPLIT=v.dtype == torch.bfloat16, EMULATE=interpreting(), BLOCK_N=block_n)
    if config is None and linear and padded(dv) == 128 and not interpreting() and autotune_enabled("sla"):
        key_block_kernel_tuned[lambda m: (mk * (128 // m["BLOCK_E"]), heads, batch)](*args, **meta)
        return pk, h, z
    block_e, warps = config or (padded(dv), _warps(padded(d) * padded(dv) if linear else 0))
    key_block_kernel[(mk * (padded(dv) // block_e), heads, batch)](*args, **meta, BLOCK_E=block_e, num_warps=warps)
    return pk, h, z


def classify(q: torch.Tensor, pooled_k: torch.Tensor, *, seq_k: int, block_size: tuple[int, int],
             critical: float, negligible: float, scale: float, causal: bool) -> torch.Tensor:
    """int8 (B, Hq, Mq, Mk) block map from q (bhsd view) and pooled keys (B, Hkv, Mk, D)."""
    batch, heads, seq_q, d = q.shape
    bq, bk = block_size
    mq, mk = cdiv(seq_q, bq), pooled_k.shape[2]
    cls = torch.empty(batch, heads, mq, mk, dtype=torch.int8, device=q.device)
    if cls.numel() == 0:
        return cls
    score = torch.empty(batch, heads, mq, mk, dtype=torch.float32, device=q.device)
    counts = device_row_counts(seq_q, seq_k, tuple(block_size), causal, critical, negligible, device=q.device)
    chunk = min(64, max(16, next_power_of_2(mk)))
    classify_kernel[(mq, heads, batch)](
        q, pooled_k, score, *q.stride(), seq_q, seq_k, heads // pooled_k.shape[1], mk, scale,
        HEAD_DIM=d, D_PAD=padded(d), CAUSAL=causal, BLOCK_M=bq, BLOCK_N=bk, CHUNK=chunk, num_warps=_warps(0))
    # rank = place in the row's stable descending order: larger key first, equal keys by index
    order = torch.argsort(score, dim=-1, descending=True, stable=True)
    rank = torch.empty(order.shape, dtype=torch.int32, device=q.device)
    rank.scatter_(-1, order, torch.arange(mk, dtype=torch.int32, device=q.device).expand(order.shape))
    del order, score
    classify_assign_kernel[(mq, heads, batch)](rank, cls, counts, seq_q, seq_k, mk, CAUSAL=causal, BLOCK_M=bq,
                                               BLOCK_N=bk, CHUNK=chunk, num_warps=_warps(0))
    return cls


def sla_block_classes(q: torch.Tensor, k: torch.Tensor, *, critical: float, negligible: float,
                      block_size: tuple[int, int], scale: float, causal: bool) -> torch.Tensor:
    """The int8 block map of attnlib.reference.sla.sla_block_classes, on the kernels (bhsd views)."""
    pooled_k, _, _ = key_blocks(k, k, block_n=block_size[1], feature="identity", linear=False)
    return classify(q, pooled_k, seq_k=k.shape[2], block_size=block_size, critical=critical,
                    negligible=negligible, scale=scale, causal=causal)
