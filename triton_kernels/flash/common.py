"""Pieces shared by the flash forward and backward kernels: sequence bounds (dense or varlen),
masked tile loads/stores, the optional key bias (per key, shared by the heads or per query head),
and the host-side geometry (strides, grid sizes) of a call."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

LOG2E = math.log2(math.e)


@dataclass(frozen=True)
class Varlen:
    """Packed sequences: sequence b holds rows cu_seqlens[b]:cu_seqlens[b+1] of the packed tensor."""

    cu_seqlens_q: torch.Tensor  # int32 (batch + 1,)
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int

    @property
    def batch(self) -> int:
        return self.cu_seqlens_q.shape[0] - 1


def strides4(t: torch.Tensor, varlen: Optional[Varlen]) -> tuple[int, int, int, int]:
    """(batch, head, seq, dim) strides of a bhsd view; packed varlen tensors have no batch stride."""
    sb, sh, ss, sd = t.stride()
    return (0 if varlen is not None else sb), sh, ss, sd


def strides3(t: torch.Tensor, varlen: Optional[Varlen]) -> tuple[int, int, int]:
    """(batch, head, seq) strides of lse-like tensors: (B, H, S) dense or (H, total) varlen."""
    if varlen is not None:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def geometry(q: torch.Tensor, k: torch.Tensor, varlen: Optional[Varlen]) -> tuple[int, int, int]:
    """(batch, max seq_q, max seq_k) of a call; q, k are bhsd views (packed: batch dim 1)."""
    if varlen is None:
        return q.shape[0], q.shape[2], k.shape[2]
    return varlen.batch, varlen.max_seqlen_q, varlen.max_seqlen_k


def cu_pointers(q: torch.Tensor, varlen: Optional[Varlen]) -> tuple[torch.Tensor, torch.Tensor]:
    """cu_seqlens for the kernel; dense calls pass q as a never-read placeholder. The kernels read
    entry b at CU + b, so a strided view (cu[::2]) is made contiguous here (batch + 1 ints)."""
    if varlen is None:
        return q, q
    return varlen.cu_seqlens_q.contiguous(), varlen.cu_seqlens_k.contiguous()


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to tf32 (the accuracy contract is fp32 PyTorch's), but
    # "ieee" lowers to unrolled FMA loops that take ptxas minutes at these tile sizes; tf32x3
    # (three tensor-core passes, hi/lo split) keeps fp32-level error on tensor cores.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def key_bias_args(key_bias: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                  placeholder: torch.Tensor, varlen: Optional[Varlen]) -> tuple[torch.Tensor, int, int, bool]:
    """(pointer, batch stride, head stride, HAS_KEY_BIAS) of a call's key bias for the kernels:
    float32 (B or 1, Sk) or (B or 1, Hq or 1, Sk) with unit key stride, added to scale * q . k
    (the bias of query head h to that head's every query row, as torch SDPA's attn_mask of shape
    (B, Hq, 1, Sk); the 2-D form is (B or 1, 1, Sk)). A dimension of 1 is broadcast (stride 0);
    a head stride of 0 means one bias for every head, which the kernels compile as the 2-D form
    (BIAS_PER_HEAD = head stride != 0). Without a bias the float32 placeholder stands in as a
    never-read pointer."""
    if key_bias is None:
        return placeholder, 0, 0, False
    if varlen is not None:
        raise ValueError("the flash kernels take no key bias with packed (varlen) sequences")
    batch, heads, seq_k = q.shape[0], q.shape[1], k.shape[2]
    rank = key_bias.dim()
    if (key_bias.dtype != torch.float32 or rank not in (2, 3) or key_bias.shape[-1] != seq_k
            or key_bias.shape[0] not in (1, batch) or (rank == 3 and key_bias.shape[1] not in (1, heads))
            or key_bias.stride(-1) != 1 or key_bias.device != q.device):
        raise ValueError(f"key_bias must be a float32 ({batch} or 1, {seq_k}) or ({batch} or 1, {heads} or 1, "
                         f"{seq_k}) tensor with unit key stride on {q.device}, got {key_bias.dtype} "
                         f"{tuple(key_bias.shape)} strides {key_bias.stride()} on {key_bias.device}")
    stride_b = key_bias.stride(0) if key_bias.shape[0] > 1 else 0
    stride_h = key_bias.stride(1) if rank == 3 and key_bias.shape[1] > 1 else 0
    return key_bias, stride_b, stride_h, True


@triton.jit
def seq_bounds(CU, b, seq_len, VARLEN: tl.constexpr):
    """(first packed row as int64, length) of sequence b."""
    if VARLEN:
        start = tl.load(CU + b).to(tl.int64)
        length = (tl.load(CU + b + 1) - tl.load(CU + b)).to(tl.int32)
    else:
        start = tl.zeros((), dtype=tl.int64)
        length = seq_len
    return start, length


@triton.jit
def row_tile(base, start, offs_r, offs_c, stride_r, stride_c):
    """Pointers to rows start + offs_r, columns offs_c of the slab at base, the row offsets in
    int64: row * stride_r passes 2**31 at long sequences (bshd with H * D = 4096 from 512k rows).
    For these load-once tiles ptxas on sm_90 did better with the int64 row column than with an
    int64 scalar start plus int32 offsets inside the tile (fewer registers, fewer fp32 spills)."""
    return base + (start + offs_r[:, None]).to(tl.int64) * stride_r + offs_c[None, :] * stride_c


@triton.jit
def load_tile(ptrs, rows_ok, cols_ok, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Load a 2-D tile, masking only the edges that can run past the tensor."""
    if CHECK_ROWS:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    else:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=cols_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def store_tile(ptrs, x, rows_ok, cols_ok, CHECK_COLS: tl.constexpr):
    if CHECK_COLS:
        tl.store(ptrs, x, mask=rows_ok[:, None] & cols_ok[None, :])
    else:
        tl.store(ptrs, x, mask=rows_ok[:, None])


@triton.jit
def query_key_range(start_m, seq_q, seq_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL: tl.constexpr):
    """Key range a query block visits: [0, full_end) needs no mask, [full_end, hi) does.

    Causal is bottom-right aligned: query i sees key j iff j <= i + seq_k - seq_q. Key blocks
    past the last visible key are never visited.
    """
    if CAUSAL:
        diag = seq_k - seq_q
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + diag, 0), seq_k)
        # keys every row of the block sees: j <= start_m + diag
        full = tl.minimum(tl.maximum(start_m + diag + 1, 0), seq_k)
    else:
        hi = seq_k
        full = seq_k
    full_end = (full // BLOCK_N) * BLOCK_N
    return full_end, hi


@triton.jit
def key_query_range(start_n, seq_q, seq_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL: tl.constexpr):
    """Query range a key block is seen by, split as [lo, mid) masked, [mid, end) unmasked,
    [end, hi) masked (sequence tail); all bounds are multiples of BLOCK_M."""
    hi = tl.cdiv(seq_q, BLOCK_M) * BLOCK_M
    if CAUSAL:
        diag = seq_k - seq_q
        # first query that sees key start_n, and first that sees the block's last key
        lo = (tl.maximum(start_n - diag, 0) // BLOCK_M) * BLOCK_M
        mid = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M
        lo = tl.minimum(lo, hi)
        mid = tl.minimum(mid, hi)
    else:
        lo = 0
        mid = 0
    end = tl.maximum((seq_q // BLOCK_M) * BLOCK_M, mid)
    return lo, mid, end, hi


# ---- one step of each main loop, shared by the dense flash kernels and block_sparse ----------
# The dense kernels walk key (or query) blocks in order; block_sparse visits only the blocks a
# mask lists. Both call these per block, so the softmax / gradient math exists once.
@triton.jit
def log2_lse(lse):
    # lse = -inf marks a row with no visible key: +inf makes its probabilities exp2(-inf) = 0
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.jit
def padded_lse2(lse_ptrs, m_ok, HAS_KEY_BIAS: tl.constexpr):
    """log2_lse of rows m_ok; rows past the sequence read lse 0, or +inf with a key bias: their
    q is 0, so a score there is its key's bias, and exp2 of a large one is inf (inf * 0 = NaN in
    a product over rows), while lse2 = +inf makes their p exactly 0."""
    if HAS_KEY_BIAS:
        lse2 = log2_lse(tl.load(lse_ptrs, mask=m_ok, other=float("inf")))
    else:
        lse2 = log2_lse(tl.load(lse_ptrs, mask=m_ok, other=0.0))
    return lse2


@triton.jit
def key_bias_log2(KEY_BIAS, cols, keys_ok, MASK: tl.constexpr):
    """The key bias of keys `cols` (KEY_BIAS points at key 0 of the sequence's, and the query
    head's, bias row) in log2 units, as the exp2-domain scores take it; 0 for keys past the
    sequence, which MASK-ed callers drop anyway."""
    if MASK:
        bias = tl.load(KEY_BIAS + cols, mask=keys_ok, other=0.0)
    else:
        bias = tl.load(KEY_BIAS + cols)
    return bias * 1.4426950408889634


@triton.jit
def attend_key_block(acc, l_i, m_i, b_q, k_ptrs, v_ptrs, offs_m, cols, d_ok, seq_k, diag, qk_scale,
                     CHECK_D: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
                     KEY_BIAS=None, HAS_KEY_BIAS: tl.constexpr = False):
    """Fold one key block (keys `cols`, tiles at k_ptrs/v_ptrs) into the running base-2 online
    softmax (acc, l_i, m_i); MASK applies the key-tail and causal masks. HAS_KEY_BIAS adds the
    bias at KEY_BIAS (key 0 of the sequence's, and the query head's, bias row) to the scaled
    scores; a row whose keys so far are all -inf keeps m = -inf and l = 0, as a row that has seen
    no key."""
    n_ok = cols < seq_k
    b_k = load_tile(k_ptrs, n_ok, d_ok, MASK, CHECK_D)
    qk = tl.dot(b_q, tl.trans(b_k), input_precision=PREC)
    # Up to 2**20 tile elements x head dim (128 x 64 at hd128, 128 x 128 at hd64): the row max is
    # taken on unscaled scores. qk_scale is a positive normal float32 (inputs.check_scale), so
    # scaling commutes with the max exactly: one multiply per row, and the scale folds into one
    # FMA per score (sm_90 SASS, 128 x 64 x 8 warps at hd128: 32 fewer FMUL per thread per tile,
    # same results bit for bit). Larger tiles scale first: folded, 128 x 128 at hd96-128 spilled
    # 24-40 bytes on sm_90, scaled first it does not. A key bias is added to scaled scores, so
    # with one the scale cannot wait for the max.
    FOLD: tl.constexpr = b_q.shape[0] * b_k.shape[0] * b_q.shape[1] <= 1048576 and not HAS_KEY_BIAS
    if not FOLD:
        qk = qk * qk_scale
    late_scale = qk_scale if FOLD else 1.0  # what the scores still need (x * 1.0 folds away)
    if HAS_KEY_BIAS:
        qk += key_bias_log2(KEY_BIAS, cols, n_ok, MASK)[None, :]
    if MASK:
        keep = n_ok[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None] + diag)
        qk = tl.where(keep, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * late_scale)
    # rows that have seen no visible key yet keep m = -inf; shift them by 0 instead
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk * late_scale - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    b_v = load_tile(v_ptrs, n_ok, d_ok, MASK, CHECK_D)
    acc = tl.dot(p.to(b_v.dtype), b_v, acc * alpha[:, None], input_precision=PREC)
    return acc, l_i, m_new


@triton.jit
def dq_key_block(dq, b_q, b_do, lse2, delta, k_ptrs, v_ptrs, offs_m, cols, d_ok, seq_k, diag, qk_scale,
                 CHECK_D: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
                 KEY_BIAS=None, HAS_KEY_BIAS: tl.constexpr = False):
    """Accumulate one key block's contribution to dQ (unscaled) of a resident query block;
    HAS_KEY_BIAS adds the bias at KEY_BIAS (key 0 of the sequence's, and the query head's, bias
    row) to the scaled scores. A row with no visible key has lse2 = +inf, so its p is 0 whatever
    the bias (never inf - inf)."""
    n_ok = cols < seq_k
    b_k = load_tile(k_ptrs, n_ok, d_ok, MASK, CHECK_D)
    b_v = load_tile(v_ptrs, n_ok, d_ok, MASK, CHECK_D)
    qk = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * qk_scale
    if HAS_KEY_BIAS:
        qk += key_bias_log2(KEY_BIAS, cols, n_ok, MASK)[None, :]
    p = tl.math.exp2(qk - lse2[:, None])
    if MASK:
        keep = n_ok[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None] + diag)
        p = tl.where(keep, p, 0.0)
    dp = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(b_k.dtype), b_k, dq, input_precision=PREC)


@triton.jit
def dkdv_query_block(dk, dv, b_k, b_v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, offs_m, offs_n, d_ok,
                     seq_q, seq_k, diag, qk_scale,
                     CHECK_D: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr):
    """Accumulate one query block's contribution to dK (unscaled), dV of a resident key block
    (the transposed form: rows of every tile are keys)."""
    m_ok = offs_m < seq_q
    b_q = load_tile(q_ptrs, m_ok, d_ok, MASK, CHECK_D)
    b_do = load_tile(do_ptrs, m_ok, d_ok, MASK, CHECK_D)
    if MASK:
        lse2 = log2_lse(tl.load(lse_ptrs, mask=m_ok, other=0.0))
        delta = tl.load(delta_ptrs, mask=m_ok, other=0.0)
    else:
        lse2 = log2_lse(tl.load(lse_ptrs))
        delta = tl.load(delta_ptrs)
    qk_t = tl.dot(b_k, tl.trans(b_q), input_precision=PREC) * qk_scale
    p_t = tl.math.exp2(qk_t - lse2[None, :])
    if MASK:
        keep = m_ok[None, :] & (offs_n[:, None] < seq_k)
        if CAUSAL:
            keep = keep & (offs_n[:, None] <= offs_m[None, :] + diag)
        p_t = tl.where(keep, p_t, 0.0)
    dv = tl.dot(p_t.to(b_do.dtype), b_do, dv, input_precision=PREC)
    dp_t = tl.dot(b_v, tl.trans(b_do), input_precision=PREC)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(b_q.dtype), b_q, dk, input_precision=PREC)
    return dk, dv


@triton.jit
def dkdv_stream_block(dk, dv, b_k, b_v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, offs_m, offs_n, m_ok, d_ok,
                      on_diagonal, diag, qk_scale,
                      CHECK_D: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
                      key_bias2=None, HAS_KEY_BIAS: tl.constexpr = False):
    """dkdv_query_block with fewer live registers, for loops that stream many query blocks past a
    resident key block: rows are always masked at load time (no separate tail loop), the causal
    mask is applied only where the runtime flag on_diagonal says the block crosses the diagonal,
    and key rows past seq_k are not masked at all. Also returns dS^T (keys x queries, in the input
    dtype) for a caller that accumulates dQ = dS K itself.

    Why that is exact: a query row past seq_q loads q = dO = 0, lse = delta = 0, so p = 1 and
    both its dV (p * dO) and dK (p * (dO.V - delta) * q) contributions are exactly 0. A key row
    past seq_k only ever reaches the same row of dK/dV (every product here keeps key rows apart),
    and the caller never stores those rows (a caller forming dS K must zero them: their p need not
    be finite). Pointers are built by the caller per block from a scalar base and loop-invariant
    tile offsets, so no pointer tensor is carried across iterations.

    HAS_KEY_BIAS adds key_bias2, the resident keys' bias in log2 units (q_ptrs' query head's), to
    the scaled scores. A query row past seq_q then scores its key's bias, whose exp2 may be inf
    (and inf * 0 = NaN in dV): padded_lse2 gives such rows p = 0 instead. So are rows with no
    visible key (lse -inf, log2_lse +inf), whatever the bias.
    """
    b_q = load_tile(q_ptrs, m_ok, d_ok, True, CHECK_D)
    lse2 = padded_lse2(lse_ptrs, m_ok, HAS_KEY_BIAS)
    qk_t = tl.dot(b_k, tl.trans(b_q), input_precision=PREC) * qk_scale
    if HAS_KEY_BIAS:
        qk_t += key_bias2[:, None]
    p_t = tl.math.exp2(qk_t - lse2[None, :])
    if CAUSAL:
        if on_diagonal:
            p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + diag, p_t, 0.0)
    b_do = load_tile(do_ptrs, m_ok, d_ok, True, CHECK_D)
    dv = tl.dot(p_t.to(b_do.dtype), b_do, dv, input_precision=PREC)
    delta = tl.load(delta_ptrs, mask=m_ok, other=0.0)
    dp_t = tl.dot(b_v, tl.trans(b_do), input_precision=PREC)
    ds_t = p_t * (dp_t - delta[None, :])
    ds_t = ds_t.to(b_q.dtype)
    dk = tl.dot(ds_t, b_q, dk, input_precision=PREC)
    return dk, dv, ds_t
