"""Triton kernels of linear attention and their launchers, all fp32-accumulating.

Non-causal (two passes): ``state`` sums S = phi(K)^T V (DK x DV) and z = sum phi(K) over row
splits (summed on the host: deterministic, no atomics); ``apply`` writes phi(Q) S, divided by
phi(Q) . z + eps when z is given.

Causal, chunk-parallel (the organisation of flash-linear-attention's ``chunk`` ops): the queries
are cut into super-chunks of ``span`` rows (a multiple of every chunk size; see super_chunk),
each walked by one program per (batch * head, head-dim tile), so the grid fills the GPU at any
batch * heads (a one-axis grid, tile fastest, so the tiles of one chunk share its loads in L2):

1. ``linear_state_kernel`` sums each key unit's (h_u, z_u) = (phi(K_u)^T V_u, sum phi(K_u)), in
   parallel over units, batch * heads and value tiles;
2. ``linear_prefix_kernel`` turns them into exclusive prefixes S_s = sum_{u < s} h_u, parallel
   over (batch * head, blocks of the flattened state);
3. ``linear_chunk_fwd_kernel`` walks its super-chunk in chunks: phi(Q_c) S plus the masked
   quadratic inside the chunk, divided by phi(Q_c) . z + its row sums + eps, then
   S += phi(K_c)^T V_c.

The backward mirrors it: the forward prefixes again; ``linear_chunk_dq_kernel`` (dq with phi's
derivative fused, and per row 1/den and dd); ``linear_state_kernel`` weighted for each query
super-chunk's reverse state dh_s = (phi(Q_s)^T dn_s, phi(Q_s)^T dd_s); a reverse prefix of dh
(summed over the GQA group) and ``linear_chunk_dk_kernel`` / ``linear_chunk_dv_kernel``, which
walk each key unit backwards. Query i sees keys j <= i + offset (offset = Sk - Sq,
bottom-right): super-chunk s reads keys [s * span + offset, (s + 1) * span + offset) itself and
every earlier key through its state; keys before offset form extra leading units (for the key
side: units every query sees).

State memory: one fp32 (DK * DV + DK) state per unit and per (batch, kv head), twice (chunk sums
and prefixes), i.e. 2 * 4 * (DK * DV + DK) / span bytes per key and kv head: at hd128 with the
smallest span (MIN_SPAN = 256) 516 B per token and head (one bf16 q tensor is 256 B), at seq 32k
on H100 with batch * heads = 16 (span 4096) 32 B. The backward holds two such buffers at a time
too (the forward's sums and prefixes, then the query side's dh and their reverse prefix; span
2048 there: 64 B per token and head) and 8 B per query row (1/den and dd). Traffic: the states are written once, prefixed
(read + write) and read once by the head-dim tiles of their super-chunk.

Dots: fp32 inputs multiply in tf32x3 (fp32-level error). 16-bit inputs multiply feature-mapped
inputs in their own dtype; products with an fp32 accumulation (a state, scores, dn) take bf16
for bf16 inputs and, for fp16, the fp32 tile scaled by a power of two into fp16 (plain fp16
would overflow long sums); see dot_acc.
Rows whose denominator is exactly 0 (an all-zero relu row with eps = 0, or a row that sees no key)
give 0, not NaN, and pass no gradient.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..flash import configs as flash_configs
from ..masks import gated
from ..switches import interpreting
from ..hostmath import cdiv, next_power_of_2
from ..stage_fallback import launch_fitting

FEATURE_IDS = {"identity": 0, "elu": 1, "relu": 2, "softmax": 3}
CHUNK = 64  # causal chunk (issue 6): quadratic inside, state across
MIN_SPAN = 256  # smallest causal super-chunk on a GPU: bounds the state memory (see above)


def pad(d: int) -> int:
    return max(16, next_power_of_2(d))


def dot_mode(dtype: torch.dtype) -> int:
    """How the kernels multiply (see dot_in / dot_acc): 0 fp32 inputs, tf32x3 throughout; 1 fp16,
    fp32 accumulations scaled by a power of two into fp16; 2 bf16 throughout."""
    return {torch.float16: 1, torch.bfloat16: 2}.get(dtype, 0)


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


@triton.jit
def feature_map_grad(x, fx, dfx, FEAT: tl.constexpr):
    """d/dx of sum(dfx * phi(x)) given fx = phi(x) (fp32 tiles; softmax needs whole rows)."""
    if FEAT == 1:  # elu + 1: 1 above 0, exp(x) = phi(x) below (torch's elu backward at 0 agrees)
        g = tl.where(x > 0, dfx, dfx * fx)
    elif FEAT == 2:
        g = tl.where(x > 0, dfx, 0.0)
    elif FEAT == 3:
        g = fx * (dfx - tl.sum(dfx * fx, 1)[:, None])
    else:
        g = dfx
    return g


@triton.jit
def dot_in(a, b, acc, MODE: tl.constexpr):
    """acc + a b for operands that are (feature-mapped) inputs: the input dtype's tensor cores."""
    if MODE == 1:
        acc = tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
    elif MODE == 2:
        acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    else:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32x3")
    return acc


@triton.jit
def fp16_scaled(x):
    """(x / 2^e as fp16, 2^e) with max |x| / 2^e in [256, 512): fp16's precision at fp32's range.
    fp16 tiles pass unchanged."""
    if x.dtype == tl.float16:
        return x, 1.0
    amax = tl.max(tl.abs(x.to(tl.float32)))
    scale = tl.exp2(tl.floor(tl.log2(tl.maximum(amax, 1e-30))) - 8.0)
    return (x / scale).to(tl.float16), scale


@triton.jit
def acc_operand(x, MODE: tl.constexpr):
    """(operand, scale) of an fp32 accumulation (state, scores, dp, phi(q) / den) for dot_ops, which
    needs fp32's range: bf16 for bf16 inputs (as fla multiplies its states in the input dtype); for
    fp16 the tile scaled by a power of two into fp16 (its 11-bit precision: bf16 there cost 2e-3
    relative error in a simulation at seq 3000, tf32 spilled registers on sm_90)."""
    if MODE == 1:
        op, scale = fp16_scaled(x)
    elif MODE == 2:
        op, scale = x.to(tl.bfloat16), 1.0
    else:
        op, scale = x.to(tl.float32), 1.0
    return op, scale


@triton.jit
def dot_ops(a, sa, b, sb, acc, MODE: tl.constexpr):
    """acc + (sa a) (sb b) for operands from acc_operand."""
    if MODE == 1:
        acc += tl.dot(a, b) * (sa * sb)
    elif MODE == 2:
        acc = tl.dot(a, b, acc)
    else:
        acc = tl.dot(a, b, acc, input_precision="tf32x3")
    return acc


@triton.jit
def dot_acc(a, b, acc, MODE: tl.constexpr):
    """acc + a b where an operand is an fp32 accumulation (see acc_operand)."""
    a_op, sa = acc_operand(a, MODE)
    b_op, sb = acc_operand(b, MODE)
    return dot_ops(a_op, sa, b_op, sb, acc, MODE)


@triton.jit
def to_in(x, MODE: tl.constexpr):
    """A feature-mapped tile in the dtype its dots take (fewer registers than fp32 for 16-bit inputs)."""
    if MODE == 1:
        x = x.to(tl.float16)
    elif MODE == 2:
        x = x.to(tl.bfloat16)
    return x


@triton.jit
def tile(row, start, offs_r, offs_c, stride_r, stride_c):
    """Pointers to rows start + offs_r, columns offs_c: a scalar 64-bit row pointer plus int32
    offsets inside the tile (a hoisted 64-bit pointer tile would hold 64 registers per thread
    through a whole loop at hd128)."""
    return row + start * stride_r + (offs_r[:, None] * stride_r + offs_c[None, :] * stride_c)


@triton.jit
def load_phi(ptrs, rows_ok, cols_ok, FEAT: tl.constexpr, MODE: tl.constexpr):
    """phi of a loaded tile, in the dtype its dots take."""
    x = tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0).to(tl.float32)
    return to_in(feature_map(x, rows_ok, cols_ok, FEAT), MODE)


@triton.jit
def grid_ids(N_TILES: tl.constexpr, n_units):
    """(tile, unit, batch * head, number of batch * heads) of a one-axis grid ordered tile-fastest:
    the head-dim tiles of one unit run together and share its input tiles in L2, and no count
    meets the 65535 limit of the second and third grid axes."""
    pid = tl.program_id(0)
    rest = pid // N_TILES
    return pid % N_TILES, rest % n_units, rest // n_units, tl.num_programs(0) // (N_TILES * n_units)


@triton.jit
def safe_recip(den):
    """1 / den, and 0 where den == 0 (such rows output 0 and pass no gradient)."""
    return tl.where(den == 0.0, 0.0, 1.0 / tl.where(den == 0.0, 1.0, den))


# ---- non-causal and chunk states --------------------------------------------------------
@triton.jit(do_not_specialize=["seq", "first", "rows_per_split", "n_units"])
def linear_state_kernel(K, V, S, RSCALE, ZW,
                        stride_kb, stride_kh, stride_kn, stride_kd,
                        stride_vb, stride_vh, stride_vn, stride_vd,
                        heads, seq, first, rows_per_split, n_units,
                        DK: tl.constexpr, DK_PAD: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr,
                        FEAT: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr,
                        VT_FIRST: tl.constexpr = False, Z_DOT: tl.constexpr = False):
    """Grid (value blocks * n_units splits * batch * heads,), see grid_ids. Split i sums the rows
    [first + i * rows_per_split, first + (i + 1) * rows_per_split) within [0, seq) into
    S[i, bh] = (phi(K)^T V flattened DK x DV, then sum phi(K)), fp32 (splits, B*H, DK*DV + DK).
    WEIGHTED (the causal backward's reverse states): row n of V is scaled by RSCALE[bh, n] and the
    second part is sum_n ZW[bh, n] phi(K_n).
    VT_FIRST (unweighted only) forms S^T = V^T phi(K) instead: on sm_90 both wgmma operands then
    come from shared memory (V's tile as loaded, read transposed; phi(K) stored once, untransposed),
    where phi(K)^T from registers made ptxas serialize the wgmmas (its warning C7515). Not the
    default until a GPU times it (bench/sweep_linear.py).
    Z_DOT (unweighted, not VT_FIRST): z as phi(K)^T times a block of ones beside the main product,
    where the sum over each tile's rows crossed warps (see STATE_Z_DOT)."""
    pid_v, split, bh, n_bh = grid_ids(tl.cdiv(DV, BV), n_units)
    b64 = (bh // heads).to(tl.int64)
    h64 = (bh % heads).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, DK_PAD)
    offs_v = pid_v * BV + tl.arange(0, BV)
    k_ok = offs_k < DK
    v_ok = offs_v < DV
    k_row = K + b64 * stride_kb + h64 * stride_kh
    v_row = V + b64 * stride_vb + h64 * stride_vh
    if VT_FIRST:
        s = tl.zeros([BV, DK_PAD], dtype=tl.float32)
    else:
        s = tl.zeros([DK_PAD, BV], dtype=tl.float32)
    z = tl.zeros([DK_PAD], dtype=tl.float32)
    if Z_DOT:
        zs = tl.zeros([DK_PAD, 16], dtype=tl.float32)
        ones = tl.full([BLOCK_N, 16], 1.0, dtype=tl.float32)
    lo = tl.maximum(first + split * rows_per_split, 0)
    hi = tl.minimum(first + (split + 1) * rows_per_split, seq)
    for start in range(lo, hi, BLOCK_N):
        rows = start + offs_n
        n_ok = rows < hi
        n64 = tl.cast(start, tl.int64)
        kf = load_phi(tile(k_row, n64, offs_n, offs_k, stride_kn, stride_kd), n_ok, k_ok, FEAT, MODE)
        vt = tl.load(tile(v_row, n64, offs_n, offs_v, stride_vn, stride_vd),
                     mask=n_ok[:, None] & v_ok[None, :], other=0.0)
        if WEIGHTED:
            scale = tl.load(RSCALE + bh.to(tl.int64) * seq + rows, mask=n_ok, other=0.0)
            # the row scale (1 / den) on phi(K)'s side, V (dO) multiplied as loaded: phi(q_n) / den_n
            # stays within fp16's range where dO / den_n spans the rows' 1 / den (see scaled_rows)
            s = dot_acc(tl.trans(kf.to(tl.float32) * scale[:, None]), vt, s, MODE)
            zw = tl.load(ZW + bh.to(tl.int64) * seq + rows, mask=n_ok, other=0.0)
            z += tl.sum(kf.to(tl.float32) * zw[:, None], 0)
        elif VT_FIRST:
            s = dot_in(tl.trans(vt), kf, s, MODE)
            z += tl.sum(kf.to(tl.float32), 0)
        elif Z_DOT:
            kt = tl.trans(kf)
            s = dot_in(kt, vt, s, MODE)
            zs = dot_in(kt, ones, zs, MODE)
        else:
            s = dot_in(tl.trans(kf), vt, s, MODE)
            z += tl.sum(kf.to(tl.float32), 0)
    if Z_DOT:  # every column of zs is the sum: take the first (adding zeros is exact)
        z = tl.sum(tl.where(tl.arange(0, 16)[None, :] == 0, zs, 0.0), 1)
    base = S + (split.to(tl.int64) * n_bh + bh) * (DK * DV + DK)
    if VT_FIRST:
        tl.store(base + offs_v[:, None] + offs_k[None, :] * DV, s, mask=v_ok[:, None] & k_ok[None, :])
    else:
        tl.store(base + offs_k[:, None] * DV + offs_v[None, :], s, mask=k_ok[:, None] & v_ok[None, :])
    if pid_v == 0:
        tl.store(base + DK * DV + offs_k, z, mask=k_ok)


@triton.jit(do_not_specialize=["seq", "rows_per_prog"])
def linear_apply_kernel(Q, S, Z, O,
                        stride_qb, stride_qh, stride_qm, stride_qd,
                        stride_ob, stride_oh, stride_om, stride_od,
                        heads, group, seq, rows_per_prog, stride_sh, stride_zh, eps,
                        DK: tl.constexpr, DK_PAD: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr,
                        FEAT: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, MODE: tl.constexpr):
    """Grid (row chunks, batch * heads, value blocks). S: (B, heads // group, DK, DV) fp32, each
    head's DK x DV dense and heads stride_sh apart; Z: (B, heads // group, DK), heads stride_zh
    apart (state() returns both as views of one buffer); query head h reads state head
    h // group. A program loads its state block once and streams rows
    [pid_m * rows_per_prog, +rows_per_prog) of Q in BLOCK_M tiles (rows_per_prog a multiple of
    BLOCK_M): one program per BLOCK_M rows re-read the DK x BV fp32 state (32 KB at hd128) for
    every 16 KB tile of Q."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    pid_v = tl.program_id(2)
    b = bh // heads
    h = bh % heads
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    sh64 = (b * (heads // group) + h // group).to(tl.int64)
    offs_i = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, DK_PAD)
    offs_v = pid_v * BV + tl.arange(0, BV)
    k_ok = offs_k < DK
    v_ok = offs_v < DV
    s = tl.load(S + sh64 * stride_sh + offs_k[:, None] * DV + offs_v[None, :], mask=k_ok[:, None] & v_ok[None, :],
                other=0.0)
    s_op, s_scale = acc_operand(s, MODE)  # once per program, as dot_acc would per tile
    if NORMALIZE:
        z = tl.load(Z + sh64 * stride_zh + offs_k, mask=k_ok, other=0.0)
    q_row = Q + b64 * stride_qb + h64 * stride_qh
    o_row = O + b64 * stride_ob + h64 * stride_oh
    lo = pid_m * rows_per_prog
    hi = tl.minimum(lo + rows_per_prog, seq)
    for start in range(lo, hi, BLOCK_M):
        offs_m = start + offs_i
        m_ok = offs_m < hi
        qt = tl.load(q_row + offs_m[:, None].to(tl.int64) * stride_qm + offs_k[None, :] * stride_qd,
                     mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        qf = feature_map(qt, m_ok, k_ok, FEAT)
        q_op, q_scale = acc_operand(qf, MODE)
        num = dot_ops(q_op, q_scale, s_op, s_scale, tl.zeros([BLOCK_M, BV], dtype=tl.float32), MODE)
        if NORMALIZE:
            num = num * safe_recip(tl.sum(qf * z[None, :], 1) + eps)[:, None]
        tl.store(o_row + offs_m[:, None].to(tl.int64) * stride_om + offs_v[None, :] * stride_od,
                 num.to(O.dtype.element_ty), mask=m_ok[:, None] & v_ok[None, :])


@triton.jit(do_not_specialize=["n_units", "skip", "group"])
def linear_prefix_kernel(IN, OUT, n_units, skip, group, E,
                         REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (batch * out heads, cdiv(E, BLOCK)) over flattened states of E floats; IN
    (n_units, out heads * group, E), the group's heads summed. Forward: OUT[u - skip] =
    sum_{u' < u} IN[u'] for u >= skip (IN[n_units - 1] is never needed, not read). Reverse:
    OUT[u + 1] = sum_{u' > u} IN[u'] and OUT[0] = the sum of all."""
    bh = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < E
    n_out = tl.num_programs(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    if REVERSE:
        for i in range(0, n_units):
            u = n_units - 1 - i
            x = tl.zeros([BLOCK], dtype=tl.float32)
            for g in range(0, group):
                x += tl.load(IN + (tl.cast(u, tl.int64) * n_out * group + bh * group + g) * E + offs, mask=ok,
                             other=0.0)
            tl.store(OUT + (tl.cast(u + 1, tl.int64) * n_out + bh) * E + offs, acc, mask=ok)
            acc += x
        tl.store(OUT + bh.to(tl.int64) * E + offs, acc, mask=ok)
    else:
        for u in range(0, n_units):
            x = tl.zeros([BLOCK], dtype=tl.float32)
            for g in range(0, group):
                x += tl.load(IN + (tl.cast(u, tl.int64) * n_out * group + bh * group + g) * E + offs,
                             mask=gated(ok, u < n_units - 1), other=0.0)
            tl.store(OUT + (tl.cast(u - skip, tl.int64) * n_out + bh) * E + offs, acc, mask=gated(ok, u >= skip))
            acc += x


# ---- causal forward -------------------------------------------------------------------------
@triton.jit(do_not_specialize=["seq_q", "seq_k", "offset", "span", "n_units"])
def linear_chunk_fwd_kernel(Q, K, V, O, S,
                            stride_qb, stride_qh, stride_qm, stride_qd,
                            stride_kb, stride_kh, stride_kn, stride_kd,
                            stride_vb, stride_vh, stride_vn, stride_vd,
                            stride_ob, stride_oh, stride_om, stride_od,
                            heads, group, seq_q, seq_k, offset, span, n_units, eps,
                            DK: tl.constexpr, DK_PAD: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr,
                            FEAT: tl.constexpr, CHUNK: tl.constexpr, MODE: tl.constexpr):
    """Grid (value blocks * n_units super-chunks * batch * heads,). Super-chunk sc: queries
    [sc * span, (sc + 1) * span), from state S[sc] (every key before sc * span + offset). The
    chunk of queries [m0, m0 + CHUNK) reads keys [m0 + offset, m0 + offset + CHUNK) through the
    masked quadratic (j - offset <= i) and every earlier key through the state."""
    pid_v, sc, bh, n_bh = grid_ids(tl.cdiv(DV, BV), n_units)
    b = bh // heads
    h = bh % heads
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    kvh64 = (h // group).to(tl.int64)
    offs_c = tl.arange(0, CHUNK)
    offs_k = tl.arange(0, DK_PAD)
    offs_v = pid_v * BV + tl.arange(0, BV)
    k_ok = offs_k < DK
    v_ok = offs_v < DV
    q_row = Q + b64 * stride_qb + h64 * stride_qh  # scalar row pointers (see tile)
    k_row = K + b64 * stride_kb + kvh64 * stride_kh
    v_row = V + b64 * stride_vb + kvh64 * stride_vh
    o_row = O + b64 * stride_ob + h64 * stride_oh
    st = S + (sc.to(tl.int64) * (n_bh // group) + b64 * (heads // group) + kvh64) * (DK * DV + DK)
    s = tl.load(st + offs_k[:, None] * DV + offs_v[None, :], mask=k_ok[:, None] & v_ok[None, :], other=0.0)
    z = tl.load(st + DK * DV + offs_k, mask=k_ok, other=0.0)
    for m0 in range(sc * span, tl.minimum((sc + 1) * span, seq_q), CHUNK):
        rows = m0 + offs_c
        m_ok = rows < seq_q
        m64 = tl.cast(m0, tl.int64)
        n64 = tl.cast(m0 + offset, tl.int64)
        n_ok = (rows + offset >= 0) & (rows + offset < seq_k)
        qf = load_phi(tile(q_row, m64, offs_c, offs_k, stride_qm, stride_qd), m_ok, k_ok, FEAT, MODE)
        kf = load_phi(tile(k_row, n64, offs_c, offs_k, stride_kn, stride_kd), n_ok, k_ok, FEAT, MODE)
        vt = tl.load(tile(v_row, n64, offs_c, offs_v, stride_vn, stride_vd), mask=n_ok[:, None] & v_ok[None, :],
                     other=0.0)
        scores = dot_in(qf, tl.trans(kf), tl.zeros([CHUNK, CHUNK], dtype=tl.float32), MODE)
        scores = tl.where(offs_c[None, :] <= offs_c[:, None], scores, 0.0)
        num = dot_acc(qf, s, tl.zeros([CHUNK, BV], dtype=tl.float32), MODE)
        num = dot_acc(scores, vt, num, MODE)
        num = num * safe_recip(tl.sum(qf.to(tl.float32) * z[None, :], 1) + tl.sum(scores, 1) + eps)[:, None]
        tl.store(tile(o_row, m64, offs_c, offs_v, stride_om, stride_od), num.to(O.dtype.element_ty),
                 mask=m_ok[:, None] & v_ok[None, :])
        s = dot_in(tl.trans(kf), vt, s, MODE)
        z += tl.sum(kf.to(tl.float32), 0)


# ---- causal backward ------------------------------------------------------------------------
@triton.jit(do_not_specialize=["seq_q", "seq_k", "offset", "span", "n_units"])
def linear_chunk_dq_kernel(Q, K, V, O, DO, DQ, S, RDEN, DD,
                           stride_qb, stride_qh, stride_qm, stride_qd,
                           stride_kb, stride_kh, stride_kn, stride_kd,
                           stride_vb, stride_vh, stride_vn, stride_vd,
                           stride_ob, stride_oh, stride_om, stride_od,
                           stride_dob, stride_doh, stride_dom, stride_dod,
                           stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                           heads, group, seq_q, seq_k, offset, span, n_units, eps,
                           DK: tl.constexpr, DK_PAD: tl.constexpr, BK: tl.constexpr, DV: tl.constexpr,
                           DV_PAD: tl.constexpr, FEAT: tl.constexpr, CHUNK: tl.constexpr, MODE: tl.constexpr):
    """Grid (key-dim blocks of BK * n_units super-chunks * batch * heads,). With n = phi(q) S, d = phi(q) . z
    + eps, dn = dO / d and dd = -(dO . O) / d per query row:
      dphi(q_i) = sum_{j vis} (dn_i . v_j + dd_i) phi(k_j) = dn_i S_i^T + dd_i z_i + intra-chunk terms.
    Also writes per row RDEN = 1 / d and DD = dd (from the first key-dim block) for the key side."""
    pid_k, sc, bh, n_bh = grid_ids(tl.cdiv(DK_PAD, BK), n_units)
    b = bh // heads
    h = bh % heads
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    kvh64 = (h // group).to(tl.int64)
    offs_c = tl.arange(0, CHUNK)
    offs_k = tl.arange(0, DK_PAD)
    offs_t = pid_k * BK + tl.arange(0, BK)  # this program's key-dim block
    offs_v = tl.arange(0, DV_PAD)
    k_ok = offs_k < DK
    t_ok = offs_t < DK
    v_ok = offs_v < DV
    # scalar row pointers plus int32 offsets inside the chunk (see tile)
    q_row = Q + b64 * stride_qb + h64 * stride_qh
    k_row = K + b64 * stride_kb + kvh64 * stride_kh
    v_row = V + b64 * stride_vb + kvh64 * stride_vh
    o_row = O + b64 * stride_ob + h64 * stride_oh
    do_row = DO + b64 * stride_dob + h64 * stride_doh
    dq_row = DQ + b64 * stride_dqb + h64 * stride_dqh
    E = DK * DV + DK
    st = S + (sc.to(tl.int64) * (n_bh // group) + b64 * (heads // group) + kvh64) * E
    s = tl.load(st + offs_t[:, None] * DV + offs_v[None, :], mask=t_ok[:, None] & v_ok[None, :], other=0.0)
    z = tl.load(st + DK * DV + offs_k, mask=k_ok, other=0.0)
    if BK == DK_PAD:
        z_t = z
    else:
        z_t = tl.load(st + DK * DV + offs_t, mask=t_ok, other=0.0)
    for m0 in range(sc * span, tl.minimum((sc + 1) * span, seq_q), CHUNK):
        rows = m0 + offs_c
        m_ok = rows < seq_q
        n_ok = (rows + offset >= 0) & (rows + offset < seq_k)
        m64 = tl.cast(m0, tl.int64)
        n64 = tl.cast(m0 + offset, tl.int64)
        qf = load_phi(tile(q_row, m64, offs_c, offs_k, stride_qm, stride_qd), m_ok, k_ok, FEAT, MODE)
        kf = load_phi(tile(k_row, n64, offs_c, offs_k, stride_kn, stride_kd), n_ok, k_ok, FEAT, MODE)
        vt = tl.load(tile(v_row, n64, offs_c, offs_v, stride_vn, stride_vd),
                     mask=n_ok[:, None] & v_ok[None, :], other=0.0)
        g_in = tl.load(tile(do_row, m64, offs_c, offs_v, stride_dom, stride_dod),
                       mask=m_ok[:, None] & v_ok[None, :], other=0.0)
        g = g_in.to(tl.float32)
        go = tl.sum(g * tl.load(tile(o_row, m64, offs_c, offs_v, stride_om, stride_od),
                                mask=m_ok[:, None] & v_ok[None, :], other=0.0).to(tl.float32), 1)
        scores = dot_in(qf, tl.trans(kf), tl.zeros([CHUNK, CHUNK], dtype=tl.float32), MODE)
        scores = tl.where(offs_c[None, :] <= offs_c[:, None], scores, 0.0)
        mass = tl.sum(qf.to(tl.float32) * z[None, :], 1) + tl.sum(scores, 1)
        rden = safe_recip(mass + eps)
        # Rows with no key mass output 0 and pass no gradient: a row that sees no key (Sq > Sk),
        # and with relu one whose products phi(q_i) . phi(k_j) are all 0 (every term of its
        # gradient is multiplied by a zero phi entry or by relu' = 0). Their den is eps alone:
        # give them rden 0 (no 1 / den enters an fp16 scale any more, see below and scaled_rows).
        no_mass = rows + offset < 0
        if FEAT == 2:
            no_mass = no_mass | (mass == 0.0)
        rden = tl.where(no_mass, 0.0, rden)
        dd = -go * rden
        # Every term of row i's dq carries its 1 / den_i: formed from dO as loaded and multiplied
        # in after the products (fp32), so no row's 1 / den enters a chunk-wide fp16 scale: rows
        # whose den is tiny but not 0 (phi(q) underflowing in fp16, den ~ eps) flushed the other
        # rows' dn to fp16 subnormals. dp / rden = dO_i . v_j - dO_i . O_i.
        dp = dot_in(g_in, tl.trans(vt), tl.zeros([CHUNK, CHUNK], dtype=tl.float32), MODE)
        dp = tl.where(offs_c[None, :] <= offs_c[:, None], dp - go[:, None], 0.0)
        if BK == DK_PAD:  # one block: the whole row (always so for softmax, whose derivative needs it)
            kf_t = kf
        else:
            kf_t = load_phi(tile(k_row, n64, offs_c, offs_t, stride_kn, stride_kd), n_ok, t_ok, FEAT, MODE)
        dqf = dot_acc(g_in, tl.trans(s), -go[:, None] * z_t[None, :], MODE)
        dqf = dot_acc(dp, kf_t, dqf, MODE) * rden[:, None]
        # phi's derivative from the fp32 pre-activation (re-read: cheaper than keeping it live)
        qt = tl.load(tile(q_row, m64, offs_c, offs_t, stride_qm, stride_qd),
                     mask=m_ok[:, None] & t_ok[None, :], other=0.0).to(tl.float32)
        dq = feature_map_grad(qt, feature_map(qt, m_ok, t_ok, FEAT), dqf, FEAT)
        tl.store(tile(dq_row, m64, offs_c, offs_t, stride_dqm, stride_dqd),
                 dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & t_ok[None, :])
        if pid_k == 0:
            tl.store(RDEN + bh.to(tl.int64) * seq_q + rows, rden, mask=m_ok)
            tl.store(DD + bh.to(tl.int64) * seq_q + rows, dd, mask=m_ok)
        s = dot_in(tl.trans(kf_t), vt, s, MODE)
        z += tl.sum(kf.to(tl.float32), 0)
        if BK == DK_PAD:
            z_t = z
        else:
            z_t += tl.sum(kf_t.to(tl.float32), 0)


@triton.jit
def key_unit(DS, u, n_pre, bkv, n_bkv, offset, span, seq_k, DK: tl.constexpr, DV: tl.constexpr,
             CHUNK: tl.constexpr):
    """A key unit of the dk/dv kernels: its reverse-prefix state slot (pointer to dS, then dz),
    its first key row lo, and the range [j_lo, j_hi) of its chunks that hold keys."""
    slot = tl.where(u >= n_pre, u - n_pre + 1, 0)
    st = DS + (slot.to(tl.int64) * n_bkv + bkv) * (DK * DV + DK)
    lo = offset + (u - n_pre) * span
    j_hi = tl.cdiv(tl.minimum(span, seq_k - lo), CHUNK)
    j_lo = tl.maximum(-lo, 0) // CHUNK
    return st, lo, j_lo, j_hi


@triton.jit
def scaled_rows(DO, RDEN, qf, b64, h64, bh64, r64, rows, m_ok, offs_c, offs_v, v_ok, seq_q,
                stride_dob, stride_doh, stride_dom, stride_dod):
    """(dO as loaded, phi(q) / den (fp32), 1 / den) for a chunk of query rows, den from the dq pass.
    dn = dO / den enters the key side's products as dO times phi(q) / den (or the scores over
    den, the attention weights): per row, 1 / den spans as widely as the rows' denominators (1e6
    where phi(q) underflows in fp16 and den ~ eps), which a chunk-wide fp16 scale (acc_operand)
    cannot hold beside the other rows; phi(q_r)_d / den_r <= 1 / z_d stays in range."""
    do = tl.load(tile(DO + b64 * stride_dob + h64 * stride_doh, r64, offs_c, offs_v, stride_dom, stride_dod),
                 mask=m_ok[:, None] & v_ok[None, :], other=0.0)
    rden = tl.load(RDEN + bh64 * seq_q + rows, mask=m_ok, other=0.0)
    return do, qf.to(tl.float32) * rden[:, None], rden


@triton.jit(do_not_specialize=["seq_q", "seq_k", "offset", "span", "n_pre", "n_units"])
def linear_chunk_dk_kernel(Q, K, V, DO, DK_, DS, RDEN, DD,
                           stride_qb, stride_qh, stride_qm, stride_qd,
                           stride_kb, stride_kh, stride_kn, stride_kd,
                           stride_vb, stride_vh, stride_vn, stride_vd,
                           stride_dob, stride_doh, stride_dom, stride_dod,
                           stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                           heads_kv, group, seq_q, seq_k, offset, span, n_pre, n_units,
                           DK: tl.constexpr, DK_PAD: tl.constexpr, BK: tl.constexpr, DV: tl.constexpr,
                           DV_PAD: tl.constexpr, FEAT: tl.constexpr, CHUNK: tl.constexpr, MODE: tl.constexpr):
    """Grid (key-dim blocks of BK * n_units key units * batch * kv heads,). Unit u holds keys
    [offset + (u - n_pre) * span, + span): for u >= n_pre the keys of query super-chunk u - n_pre,
    whose later queries arrive through DS[u - n_pre + 1] (the reverse prefix), for u < n_pre keys
    that every query sees (DS[0]). With dS_j = sum_{i sees j} phi(q_i)^T dn_i and
    dz_j = sum_{i sees j} dd_i phi(q_i): dphi(k_j) = dS_j v_j + dz_j, the unit walked backwards in
    chunks (the intra-chunk terms masked), the GQA group's query heads summed."""
    pid_k, u, bkv, n_bkv = grid_ids(tl.cdiv(DK_PAD, BK), n_units)
    b64 = (bkv // heads_kv).to(tl.int64)
    kvh = bkv % heads_kv
    kvh64 = kvh.to(tl.int64)
    offs_c = tl.arange(0, CHUNK)
    offs_t = pid_k * BK + tl.arange(0, BK)
    offs_v = tl.arange(0, DV_PAD)
    t_ok = offs_t < DK
    v_ok = offs_v < DV
    # the unit's chunks that hold keys, from the last: [lo + j * CHUNK, + CHUNK) for j_lo <= j < j_hi
    st, lo, j_lo, j_hi = key_unit(DS, u, n_pre, bkv, n_bkv, offset, span, seq_k, DK, DV, CHUNK)
    ds = tl.load(st + offs_t[:, None] * DV + offs_v[None, :], mask=t_ok[:, None] & v_ok[None, :], other=0.0)
    dz = tl.load(st + DK * DV + offs_t, mask=t_ok, other=0.0)
    k_row = K + b64 * stride_kb + kvh64 * stride_kh
    v_row = V + b64 * stride_vb + kvh64 * stride_vh
    dk_row = DK_ + b64 * stride_dkb + kvh64 * stride_dkh
    for i in range(0, j_hi - j_lo):
        c0 = lo + (j_hi - 1 - i) * CHUNK
        cols = c0 + offs_c
        n_ok = (cols >= 0) & (cols < seq_k)
        c64 = tl.cast(c0, tl.int64)
        vt = tl.load(tile(v_row, c64, offs_c, offs_v, stride_vn, stride_vd),
                     mask=n_ok[:, None] & v_ok[None, :], other=0.0)
        dkf = dot_acc(vt, tl.trans(ds), tl.zeros([CHUNK, BK], dtype=tl.float32) + dz[None, :], MODE)
        if u >= n_pre:  # queries of this chunk (none for the leading units)
            rows = c0 - offset + offs_c
            m_ok = (rows >= 0) & (rows < seq_q)
            r64 = tl.cast(c0 - offset, tl.int64)
            for g in range(0, group):
                h64 = (kvh * group + g).to(tl.int64)
                bh64 = bkv.to(tl.int64) * group + g
                q_head = Q + b64 * stride_qb + h64 * stride_qh
                qf = load_phi(tile(q_head, r64, offs_c, offs_t, stride_qm, stride_qd), m_ok, t_ok, FEAT, MODE)
                dd = tl.load(DD + bh64 * seq_q + rows, mask=m_ok, other=0.0)
                do, qn, rden = scaled_rows(DO, RDEN, qf, b64, h64, bh64, r64, rows, m_ok, offs_c, offs_v, v_ok,
                                           seq_q, stride_dob, stride_doh, stride_dom, stride_dod)
                go = -dd / tl.where(rden == 0.0, 1.0, rden)  # dO_r . O_r (dd_r = -dO_r . O_r / den_r)
                dp_t = dot_in(vt, tl.trans(do), tl.zeros([CHUNK, CHUNK], dtype=tl.float32), MODE)
                # [key t, query r]: query r sees key t when r >= t; dp_t * rden_r is dn_r . v_t + dd_r
                dp_t = tl.where(offs_c[None, :] >= offs_c[:, None], dp_t - go[None, :], 0.0)
                dkf = dot_acc(dp_t, qn, dkf, MODE)
                ds = dot_acc(tl.trans(qn), do, ds, MODE)
                dz += tl.sum(qf.to(tl.float32) * dd[:, None], 0)
        kt = tl.load(tile(k_row, c64, offs_c, offs_t, stride_kn, stride_kd),
                     mask=n_ok[:, None] & t_ok[None, :], other=0.0).to(tl.float32)
        dk = feature_map_grad(kt, feature_map(kt, n_ok, t_ok, FEAT), dkf, FEAT)
        tl.store(tile(dk_row, c64, offs_c, offs_t, stride_dkn, stride_dkd),
                 dk.to(DK_.dtype.element_ty), mask=n_ok[:, None] & t_ok[None, :])


@triton.jit(do_not_specialize=["seq_q", "seq_k", "offset", "span", "n_pre", "n_units"])
def linear_chunk_dv_kernel(Q, K, DO, DV_, DS, RDEN,
                           stride_qb, stride_qh, stride_qm, stride_qd,
                           stride_kb, stride_kh, stride_kn, stride_kd,
                           stride_dob, stride_doh, stride_dom, stride_dod,
                           stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                           heads_kv, group, seq_q, seq_k, offset, span, n_pre, n_units,
                           DK: tl.constexpr, DK_PAD: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr,
                           FEAT: tl.constexpr, CHUNK: tl.constexpr, MODE: tl.constexpr):
    """Grid (value blocks of BV * n_units key units * batch * kv heads,): dv_j = dS_j^T phi(k_j) over the
    units of linear_chunk_dk_kernel, with the intra-chunk term (phi(k_j) . phi(q_i)) dn_i."""
    pid_v, u, bkv, n_bkv = grid_ids(tl.cdiv(DV, BV), n_units)
    b64 = (bkv // heads_kv).to(tl.int64)
    kvh = bkv % heads_kv
    kvh64 = kvh.to(tl.int64)
    offs_c = tl.arange(0, CHUNK)
    offs_k = tl.arange(0, DK_PAD)
    offs_v = pid_v * BV + tl.arange(0, BV)
    k_ok = offs_k < DK
    v_ok = offs_v < DV
    st, lo, j_lo, j_hi = key_unit(DS, u, n_pre, bkv, n_bkv, offset, span, seq_k, DK, DV, CHUNK)
    ds = tl.load(st + offs_k[:, None] * DV + offs_v[None, :], mask=k_ok[:, None] & v_ok[None, :], other=0.0)
    k_row = K + b64 * stride_kb + kvh64 * stride_kh
    dv_row = DV_ + b64 * stride_dvb + kvh64 * stride_dvh
    for i in range(0, j_hi - j_lo):
        c0 = lo + (j_hi - 1 - i) * CHUNK
        cols = c0 + offs_c
        n_ok = (cols >= 0) & (cols < seq_k)
        c64 = tl.cast(c0, tl.int64)
        kf = load_phi(tile(k_row, c64, offs_c, offs_k, stride_kn, stride_kd), n_ok, k_ok, FEAT, MODE)
        dv = dot_acc(kf, ds, tl.zeros([CHUNK, BV], dtype=tl.float32), MODE)
        if u >= n_pre:
            rows = c0 - offset + offs_c
            m_ok = (rows >= 0) & (rows < seq_q)
            r64 = tl.cast(c0 - offset, tl.int64)
            for g in range(0, group):
                h64 = (kvh * group + g).to(tl.int64)
                bh64 = bkv.to(tl.int64) * group + g
                q_head = Q + b64 * stride_qb + h64 * stride_qh
                qf = load_phi(tile(q_head, r64, offs_c, offs_k, stride_qm, stride_qd), m_ok, k_ok, FEAT, MODE)
                do, qn, rden = scaled_rows(DO, RDEN, qf, b64, h64, bh64, r64, rows, m_ok, offs_c, offs_v, v_ok,
                                           seq_q, stride_dob, stride_doh, stride_dom, stride_dod)
                scores_t = dot_in(kf, tl.trans(qf), tl.zeros([CHUNK, CHUNK], dtype=tl.float32), MODE)
                # the attention weights phi(k_t) . phi(q_r) / den_r (at most 1 for positive feature maps)
                scores_t = tl.where(offs_c[None, :] >= offs_c[:, None], scores_t * rden[None, :], 0.0)
                dv = dot_acc(scores_t, do, dv, MODE)
                ds = dot_acc(tl.trans(qn), do, ds, MODE)
        tl.store(tile(dv_row, c64, offs_c, offs_v, stride_dvn, stride_dvd),
                 dv.to(DV_.dtype.element_ty), mask=n_ok[:, None] & v_ok[None, :])


# ---- launchers ----------------------------------------------------------------------------
def _value_block(dv: int) -> int:
    return min(64, pad(dv))


def _streaming_value_block(dv: int, element_size: int) -> int:
    """The value block of the state and apply kernels: for 16-bit inputs the whole padded width
    up to 128 in one program, so K (Q) is read and phi(K) (phi(Q)) formed once, not once per 64
    columns; otherwise _value_block."""
    return pad(dv) if element_size == 2 and pad(dv) <= 128 else _value_block(dv)


def _warps(dk_pad: int, bv: int) -> int:
    return 1 if interpreting() else (8 if dk_pad * bv >= 128 * 64 else 4)


def _stages(dtype: torch.dtype) -> int:
    # fp32 tiles are twice the bytes: two stages keep the state kernel under ~200 KB at hd128
    return 2 if dtype == torch.float32 else 3


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    if interpreting():
        return 2  # few, large programs: the interpreter pays per program and per op
    return 132  # H100 SXM: the compile-only path sizes grids as for it


def chunk_size() -> int:
    return CHUNK


def super_chunk(seq: int, programs_per_span: int, device: torch.device) -> int:
    """Rows per causal super-chunk: about four programs per SM over the whole grid, a multiple of
    the chunk, at least MIN_SPAN (bounded state memory, see the module docstring). Under the
    interpreter two chunks, so that small tests cross several super-chunks, and at most four
    super-chunks on long sequences (the interpreter pays for every program it starts)."""
    chunk = chunk_size()
    if interpreting():
        return max(2 * chunk, cdiv(seq, 4 * chunk) * chunk)
    wanted = max(1, 4 * _sm_count(device) // max(1, programs_per_span))
    return max(MIN_SPAN, cdiv(cdiv(max(seq, 1), wanted), chunk) * chunk)


def _chunk_sums(k: torch.Tensor, v: torch.Tensor, feature: str, *, first: int, rows: int, splits: int,
                weights: tuple[torch.Tensor, torch.Tensor] | None = None, vt_first: bool = False,
                config: tuple[int, int, int, int] | None = None, z_dot: bool = False,
                stages_fixed: bool = False) -> torch.Tensor:
    """(splits, B*H, DK*DV + DK) fp32: split i sums the rows [first + i*rows, first + (i+1)*rows);
    weights (row scale of v, weights of z), each (B*H, N) fp32, for the backward's reverse states;
    vt_first: the kernel's V^T phi(K) form (see linear_state_kernel; unweighted only); config:
    (value block, warps, rows per step, stages) in place of launch_config's (bench/sweep_linear.py);
    stages_fixed: no fewer stages where the device refuses the config's (stage_fallback; state()
    sets it for a config its caller named)."""
    if vt_first and weights is not None:
        raise ValueError("vt_first takes no weights")
    batch, heads, seq, dk = k.shape
    dv = v.shape[3]
    out = torch.empty(splits, batch * heads, dk * dv + dk, dtype=torch.float32, device=k.device)
    if splits == 0 or batch * heads == 0:
        return out
    bv, warps, block_n, stages = config or launch_config("state", pad(dk), dv, k.dtype,
                                                         flash_configs.device_smem_limit(k))[0]
    rscale, zw = weights if weights is not None else (out, out)
    launch_fitting(
        linear_state_kernel, (cdiv(dv, bv) * splits * batch * heads,),
        k, v, out, rscale, zw, *k.stride(), *v.stride(), heads, seq, first, rows, splits,
        DK=dk, DK_PAD=pad(dk), DV=dv, BV=bv, FEAT=FEATURE_IDS[feature], WEIGHTED=weights is not None,
        BLOCK_N=block_n, MODE=dot_mode(k.dtype), num_warps=warps, num_stages=stages, VT_FIRST=vt_first,
        Z_DOT=z_dot, stages_fixed=stages_fixed)
    return out


def _swept(dk_pad: int, bv: int, dtype: torch.dtype) -> bool:
    """16-bit inputs with a 128 x 128 state block (key and value head dims both 65-128): the class
    that bench/sweep_linear.py timed on an H200 (2026-11-27, B1 H16 hd128 bf16 at 32k and 128k
    tokens; bench/results/nvidia-h200/run2-2026-11-27/). Its fastest configs, taken below: the
    state kernel with 128 rows per step (1.29-1.30x the 64-row step: 0.654 vs 0.845 ms at 128k),
    the apply kernel with 2 stages instead of 4 (1.61-1.64x: 0.424 vs 0.684 ms; 116 instead of 163
    registers, so two programs fit an SM). Other head dims and fp32 keep the earlier configs (not
    timed).

    Until stop 22 this read dk_pad * bv >= 128 * 128, which took in head dim 256 (64-wide value
    blocks) as well: its 128-row state steps need 188416 bytes of shared memory on sm_90 and, in
    the causal backward's weighted fp16 form, 246784, over the H100's 232448 (stop 22,
    tests/test_linear_triton.py::test_gpu_head_dims_each_launch_config[256-256-*-float16]). With
    64-row steps they take 98304 and 123392."""
    return dtype.itemsize == 2 and dk_pad == 128 and bv == 128


def _h100_stop22(dk_pad: int, bv: int, dtype: torch.dtype) -> bool:
    """bf16 in the _swept class: the inputs bench/sweep_linear.py timed on an H100 at stop 22
    (2026-11-27, B1 H16 hd128 bf16; bench/results/nvidia-h100-80gb-hbm3/stop22-run2-bench/). Not
    fp16: its apply kernel scales each tile of phi(Q) into fp16 (acc_operand), and with the third
    stage taken below it compiles to 172 registers on sm_90 instead of 118 (bf16: 122), so two
    8-warp programs no longer fit an SM, which is what made 2 stages 1.6x faster on the H200."""
    return dtype == torch.bfloat16 and _swept(dk_pad, bv, dtype)


# fp32 at head dims 129-256 (dk_pad 256): the state and apply kernels' rows per step. With the
# 64 rows per step taken until stop 22 they need 245760 (state, 2 stages) and 327680 (apply, 2
# stages) bytes of shared memory on sm_90, over the H100's 232448 (OutOfResources at launch, stop
# 22); 32 state rows take 122880, 16 apply rows 180224 (neither spills). fp32 runs here for fp16
# inputs too: the non-causal backward's state and apply products take fp32 operands
# (attention.linear_bwd). Not timed.
_FP32_WIDE_STATE_ROWS = 32
_FP32_WIDE_APPLY_ROWS = 16


def state_config(dk_pad: int, dv: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(value block, warps, rows per step) of the state kernel."""
    bv = _streaming_value_block(dv, dtype.itemsize)
    if interpreting():
        return bv, 1, 64
    if _swept(dk_pad, bv, dtype):
        rows = 128
    elif dtype.itemsize == 4 and dk_pad >= 256:
        rows = _FP32_WIDE_STATE_ROWS
    else:
        rows = 64
    return bv, _warps(dk_pad, bv), rows


def state_splits_per_sm(dk_pad: int, dv: int, dtype: torch.dtype) -> int:
    """Row splits per SM (over all batch * heads) of state(): 1 in the _swept class (H100, stop
    22 sweep, B1 H16 hd128 bf16, config (128 rows, value block 128, 8 warps, 3 stages) as before:
    1.06x the 2 splits per SM taken until then at 32k tokens, 1.03x at 128k; the H200 sweep of
    run 2 agrees, 0.175 against 0.183 ms at 32k), otherwise 2."""
    if not interpreting() and _swept(dk_pad, _streaming_value_block(dv, dtype.itemsize), dtype):
        return 1
    return 2


def apply_stages(dk_pad: int, bv: int, dtype: torch.dtype) -> int:
    """Pipeline stages of the apply kernel's streaming loop (see _swept): 3 for bf16 in the swept
    class (H100, stop 22 sweep, with 2 programs per SM, see apply_config), 2 for fp16 there (and
    under the interpreter, as before)."""
    if _h100_stop22(dk_pad, bv, dtype) and not interpreting():
        return 3
    if _swept(dk_pad, bv, dtype):
        return 2
    return 4 if dtype.itemsize == 2 else _stages(dtype)


def apply_config(dk_pad: int, dv: int, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(rows per step, value block, warps, stages, programs per SM) of the apply kernel.

    bf16 with DK and DV padded to 128 (H100, stop 22 sweep, B1 H16 hd128 bf16): (64, 128, 8, 3)
    with 2 programs per SM, 1.06x the (64, 128, 8, 2) with 4 per SM taken until then at 32k
    tokens (0.116 against 0.123 ms), 1.08x at 128k (0.423 against 0.456 ms). On the H200 of
    run 2 the same config ran 0.99x and 0.97x that one (0.117 / 0.431 against 0.116 / 0.418 ms):
    the H100's numbers decide."""
    bv = _streaming_value_block(dv, dtype.itemsize)
    if interpreting():
        return 16, bv, 1, apply_stages(dk_pad, bv, dtype), 4
    rows = _FP32_WIDE_APPLY_ROWS if dtype.itemsize == 4 and dk_pad >= 256 else 64
    per_sm = 2 if _h100_stop22(dk_pad, bv, dtype) else 4
    return rows, bv, _warps(dk_pad, bv), apply_stages(dk_pad, bv, dtype), per_sm


# ---- cards with less shared memory per block than an H100 ---------------------------------------
H100_SMEM = 232448  # opt-in shared memory per block on sm_90, which the configs above were fitted to

# Each launch's way down on a card with less (fit): its config's entries (index, floor) lowered in
# this order, each to its floor before the next: stages (floor 1) by one, tiles and warps halved.
# Fewer pipeline stages first, then smaller tiles; the causal backward's chunks first (its kernels
# run one stage), then its key blocks, which softmax's whole-row derivative keeps at DK.
_KNOBS = {"state": ((3, 1), (2, 16), (0, 16)),  # (value block, warps, rows per step, stages)
          "apply": ((3, 1), (0, 16), (1, 16)),  # (rows per step, value block, warps, stages)
          "fwd": ((2, 16), (0, 16)),  # (value block, warps, chunk)
          "dq": ((2, 16), (0, 16)), "dq softmax": ((2, 16),),  # (key block, warps, chunk)
          "dkv": ((3, 16), (2, 4)), "dkv softmax": ((3, 16), (2, 4))}  # (key block, value block, warps, chunk)

# Shared memory per block of each launch that an sm_86 / sm_89 card's 101376 bytes do not hold with
# the H100's config: (launch, padded DK, value width (the value block; dq / dkv: the causal
# backward's value pad), element size) -> bytes of that config and of each step down (_KNOBS) up to
# the first that fits 101376 (or as far as the knobs go). The largest over fp16 / bf16, the weighted
# / unweighted state kernel, the apply kernel with / without z, and for dkv over the dk and dv
# kernels. Compiled on the CPU with Triton 3.6 for sm_80 and sm_89 (the same bytes for both),
# 2026-11-27, through tests/triton_sm90.py (tests/test_linear_triton.py::
# test_launches_fit_cards_with_less_shared_memory compiles what fit chooses). An A100 (sm_80,
# 166912) takes the first step that fits it, often none. Every other launch at padded head dims
# up to 256 (fp16, bf16, fp32; elu and softmax, the same bytes at the same config; relu and
# identity take elu's configs) took at most 101376. The three causal softmax dq entries with no
# step below 232448 need that on sm_90 too (278528, 294912, 557056 bytes): with whole rows and
# 16-row chunks no knob is left, so linear-triton refuses those calls (unfit_causal_backward).
_SMEM = {
    # state kernel: one stage fewer (16-bit 3 -> 2, fp32 2 -> 1)
    ("state", 128, 128, 2): (164864, 98816), ("state", 256, 16, 2): (102912, 67840),
    ("state", 256, 32, 2): (107008, 69888), ("state", 256, 64, 2): (115200, 73984),
    ("state", 256, 128, 2): (131584, 82176), ("state", 128, 16, 4): (102656, 65536),
    ("state", 128, 32, 4): (106752, 65536), ("state", 128, 64, 4): (114944, 65536),
    ("state", 256, 32, 4): (102528, 65536), ("state", 256, 64, 4): (106624, 65536),
    # apply kernel: stages 4 -> 2 (16-bit; 4 -> 1 at value block 128), fp32 one stage, then at
    # DK 128 x 64 32-row steps and at DK 256 x 64 (16-row steps already) 32-wide value blocks
    ("apply", 256, 16, 2): (139264, 106496, 73728), ("apply", 256, 32, 2): (147456, 114688, 81920),
    ("apply", 256, 64, 2): (163840, 131072, 98304), ("apply", 256, 128, 2): (196608, 163840, 131072, 98304),
    ("apply", 128, 16, 4): (114688, 81920), ("apply", 128, 32, 4): (131072, 98304),
    ("apply", 128, 64, 4): (163840, 131072, 98304), ("apply", 256, 32, 4): (114688, 98304),
    ("apply", 256, 64, 4): (180224, 163840, 98304),
    # causal output kernel, fp32 at DK 256: 16-row chunks (an A100 too)
    ("fwd", 256, 16, 4): (196608, 98304), ("fwd", 256, 32, 4): (196608, 98304),
    # causal backward, fp32: dq with 32-wide key blocks beside 256-wide value tiles, dk / dv in
    # 16-row chunks; softmax's dk / dv (whole rows, 16-row chunks already) with 4 warps
    ("dq", 64, 256, 4): (139264, 65536), ("dq", 128, 256, 4): (131072, 65536), ("dq", 256, 256, 4): (131072, 65536),
    ("dkv", 256, 64, 4): (131072, 65536), ("dkv", 256, 128, 4): (131072, 65536), ("dkv", 256, 256, 4): (131072, 65536),
    ("dkv softmax", 128, 256, 2): (131072, 65536), ("dkv softmax", 256, 256, 2): (131072, 65536),
    ("dkv softmax", 256, 256, 4): (131072, 65536),
    # softmax's dq: whole rows in 16-row chunks (at DK 64, 32 -> 16 first): no step fits sm_89
    ("dq softmax", 256, 256, 2): (151552,), ("dq softmax", 64, 256, 4): (147456, 139264),
    ("dq softmax", 128, 128, 4): (147456,), ("dq softmax", 256, 64, 4): (163840,),
    ("dq softmax", 128, 256, 4): (278528,), ("dq softmax", 256, 128, 4): (294912,),
    ("dq softmax", 256, 256, 4): (557056,),
}


def _rungs(config: tuple, knobs: tuple):
    """config, then each step down _KNOBS' way."""
    config = list(config)
    yield tuple(config)
    for i, floor in knobs:
        while config[i] > floor:
            config[i] = config[i] - 1 if floor == 1 else config[i] // 2
            yield tuple(config)


def fit(launch: str, dk_pad: int, v: int, dtype: torch.dtype, config: tuple, limit: int | None) -> tuple[tuple, bool]:
    """(config of the launch for a device with limit bytes of shared memory per block, whether it
    fits) from the H100's config, by _SMEM's compiled bytes: the config itself where limit is None
    (no device: CPU, interpreter) or at least an H100's, or where _SMEM does not list the launch;
    else its first step down that fits (the last listed one, and False, where none does)."""
    smem = _SMEM.get((launch, dk_pad, v, dtype.itemsize))
    if limit is None or smem is None:
        return config, True
    first = next((i for i, b in enumerate(smem) if b <= limit), None)
    if limit >= H100_SMEM:
        return config, first == 0
    rungs = list(_rungs(config, _KNOBS[launch]))
    return rungs[len(smem) - 1 if first is None else first], first is not None


def launch_config(launch: str, dk_pad: int, dv: int, dtype: torch.dtype, limit: int | None,
                  feature: str = "elu") -> tuple[tuple, bool]:
    """(config, whether it fits) of a launch on a device with limit bytes of shared memory per block
    (None: no device), fit from the H100's: "state" (value block, warps, rows per step, stages),
    "apply" (rows per step, value block, warps, stages), "fwd" (fwd_config's), "dq" (dq_config's)
    and "dkv" (dkv_config's; for these two dv is the causal backward's value pad)."""
    if launch == "state":
        config = (*state_config(dk_pad, dv, dtype), _stages(dtype))
    elif launch == "apply":
        config = tuple(apply_config(dk_pad, dv, dtype)[:4])
    elif launch == "fwd":
        config = fwd_config(dk_pad, dv, dtype)
    else:
        config = (dq_config if launch == "dq" else dkv_config)(dk_pad, dv, dtype, feature)
        return fit(launch + (" softmax" if feature == "softmax" else ""), dk_pad, dv, dtype, config, limit)
    return fit(launch, dk_pad, config[1 if launch == "apply" else 0], dtype, config, limit)


def unfit_causal_backward(dk: int, dv: int, dtype: torch.dtype, feature: str, limit: int | None) -> list[str]:
    """The causal backward's kernels that no config fits in limit bytes per block (see _SMEM): every
    other launch of linear-triton fits down to 101376 bytes."""
    dk_pad = pad(dk)
    v_pad = causal_value_pad(dk_pad, dv)
    return [name for launch, name in (("dq", "dq kernel"), ("dkv", "dk / dv kernels"))
            if not launch_config(launch, dk_pad, v_pad, dtype, limit, feature)[1]]


# The non-causal state kernel's z = sum phi(K) as a product with ones (Z_DOT in linear_state_kernel)
# instead of a sum over each tile's rows: no cross-warp reduction per tile (sm_90, bf16 hd128 at
# the default config: 14 barriers, 4 shuffles, 25 / 25 shared stores / loads in the PTX against 16,
# 20, 38 / 36; 242 registers, no spill), for a 16-column product beside the main one (1/8 of its
# MMA work at DV 128). Off until a GPU times it (bench/bench_linear.py's "attnlib-triton-zdot"
# rows); the same sums up to their order (z's in fp32 either way).
STATE_Z_DOT = False


def state(k: torch.Tensor, v: torch.Tensor, feature: str, *, vt_first: bool = False,
          config: tuple[int, int, int, int] | None = None,
          splits_per_sm: int | None = None, z_dot: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(S (B, H, DK, DV), z (B, H, DK)) fp32 over all rows of bhsd k (B, H, N, DK), v (B, H, N, DV).
    vt_first: see linear_state_kernel (same result; which is faster is for a GPU to say); config
    (see _chunk_sums) and splits_per_sm (row splits per SM over all batch * heads; default
    state_splits_per_sm): what bench/sweep_linear.py varies. z_dot (default STATE_Z_DOT; takes
    precedence over vt_first): see STATE_Z_DOT."""
    batch, heads, seq, dk = k.shape
    dv = v.shape[3]
    if seq == 0 or batch * heads == 0:
        return (k.new_zeros(batch, heads, dk, dv, dtype=torch.float32),
                k.new_zeros(batch, heads, dk, dtype=torch.float32))
    named = config is not None
    config = config or launch_config("state", pad(dk), dv, k.dtype, flash_configs.device_smem_limit(k))[0]
    block_n = config[2]
    splits_per_sm = splits_per_sm or state_splits_per_sm(pad(dk), dv, k.dtype)
    # enough splits to fill the GPU; each split a multiple of block_n rows
    wanted = max(1, splits_per_sm * _sm_count(k.device) // max(1, batch * heads))
    rows = max(block_n, cdiv(cdiv(seq, wanted), block_n) * block_n)
    z_dot = STATE_Z_DOT if z_dot is None else z_dot
    sums = _chunk_sums(k, v, feature, first=0, rows=rows, splits=cdiv(seq, rows), vt_first=vt_first and not z_dot,
                       config=config, z_dot=z_dot, stages_fixed=named).sum(0)
    return sums[:, :dk * dv].view(batch, heads, dk, dv), sums[:, dk * dv:].view(batch, heads, dk)


def _dense_heads(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(t, stride between its flattened (batch, head) entries) for t (B, H, ...) whose per-head
    part is dense and whose heads are evenly spaced, as state()'s views of its one buffer are;
    otherwise a contiguous copy. Saves two copy kernels per non-causal forward."""
    inner = t.shape[2:]
    dense = all(t.stride(i) == math.prod(inner[i - 1:]) for i in range(2, t.dim()))
    if dense and t.stride(0) == t.shape[1] * t.stride(1):
        return t, t.stride(1)
    t = t.contiguous()
    return t, math.prod(inner)


def apply(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, out: torch.Tensor, feature: str,
          eps: float = 0.0, *, config: tuple[int, int, int, int] | None = None,
          programs_per_sm: int | None = None) -> torch.Tensor:
    """out (B, Hq, N, DV) = phi(q) s [/ (phi(q) . z + eps) when z is given]; s (B, Hs, DK, DV).
    config: (rows per step, value block, warps, stages) in place of apply_config's, and
    programs_per_sm (default apply_config's): what bench/sweep_linear.py varies."""
    batch, heads, seq, dk = q.shape
    dv = s.shape[3]
    if seq == 0 or batch * heads == 0:
        return out
    s, stride_sh = _dense_heads(s)
    z, stride_zh = (s, 0) if z is None else _dense_heads(z)
    base = apply_config(pad(dk), dv, q.dtype)  # once: launch_config("apply") would recompute it
    block_m, bv, warps, stages = config or fit("apply", pad(dk), base[1], q.dtype, base[:4],
                                               flash_configs.device_smem_limit(q))[0]
    programs_per_sm = programs_per_sm or base[4]
    n_vb = cdiv(dv, bv)
    # a few programs per SM in all, each streaming whole tiles (interpreter: two tiles each)
    want = 2 if interpreting() else max(1, programs_per_sm * _sm_count(q.device) // max(1, batch * heads * n_vb))
    rows = max(block_m, cdiv(cdiv(seq, want), block_m) * block_m)
    launch_fitting(
        linear_apply_kernel, (cdiv(seq, rows), batch * heads, n_vb),
        q, s, z, out, *q.stride(), *out.stride(), heads, heads // s.shape[1], seq, rows, stride_sh, stride_zh, eps,
        DK=dk, DK_PAD=pad(dk), DV=dv, BV=bv, FEAT=FEATURE_IDS[feature], NORMALIZE=z is not s,
        BLOCK_M=block_m, MODE=dot_mode(q.dtype), num_warps=warps, num_stages=stages, stages_fixed=config is not None)
    return out


def _prefix(h: torch.Tensor, out: torch.Tensor, *, n_units: int, group: int, skip: int = 0,
            reverse: bool = False) -> torch.Tensor:
    e = h.shape[2]
    block = min(16384, next_power_of_2(e)) if interpreting() else 1024
    linear_prefix_kernel[(out.shape[1], cdiv(e, block))](
        h, out, n_units, skip, group, e, REVERSE=reverse, BLOCK=block, num_warps=1 if interpreting() else 4)
    return out


def _check_span(span: int, *chunks: int) -> None:
    # a super-chunk must hold whole chunks: the key side walks a unit in chunks and must not
    # cross into the next unit
    if span <= 0 or any(span % c for c in chunks):
        raise ValueError(f"span must be a positive multiple of the chunk sizes {chunks}, got {span}")


def causal_states(k: torch.Tensor, v: torch.Tensor, feature: str, *, offset: int, seq_q: int,
                  span: int) -> torch.Tensor:
    """(super-chunks, B*Hkv, DK*DV + DK) fp32: entry s holds (S, z) over every key before
    s * span + offset, the start state of query super-chunk s."""
    batch, heads_kv, _, dk = k.shape
    dv = v.shape[3]
    n_sc = cdiv(seq_q, span)
    n_pre = cdiv(max(offset, 0), span)
    units = n_pre + n_sc
    # unit u sums keys [offset + (u - n_pre) * span, + span); the last unit's sum is never read
    sums = _chunk_sums(k, v, feature, first=offset - n_pre * span, rows=span, splits=units - 1)
    out = torch.empty(n_sc, batch * heads_kv, dk * dv + dk, dtype=torch.float32, device=k.device)
    return _prefix(sums, out, n_units=units, group=1, skip=n_pre)


def fwd_config(dk_pad: int, dv: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(value block, warps, chunk) of the causal output kernel: its state (DK x BV fp32) lives in
    registers beside the chunk's tiles.

    16-bit, DK and DV padded to 128: (128, 8, 64), the fastest of 9 configs timed on an H200
    (2026-11-27, B1 H16 hd128 bf16; bench/results/nvidia-h200/run3-2026-11-27/): 0.886 ms at 32k
    tokens against 2.639 ms for (32, 8, 32), the spill-free config chosen before from sm_90
    compiles alone (3.3 ms against 10.5 ms at 128k). It spills 344 bytes on sm_90 and is faster
    all the same (tests/test_triton_sm90_compile.py accepts those spills and no more).

    Elsewhere (not timed): 32 rows and 32 value columns at DK 128 and more, else 64-row chunks
    with value blocks of at least 64. The one config that gave wrong outputs in that run,
    (32, 4, 64), had 32 value columns with 64-row chunks (right under the interpreter, so the
    compiled code, not the algorithm), and no default takes that shape."""
    if interpreting():
        return _value_block(dv), 1, chunk_size()
    if dtype.itemsize == 2 and dk_pad == 128 and pad(dv) == 128:
        return 128, 8, CHUNK
    if dk_pad >= 128:
        return min(_value_block(dv), 32), 8, 32
    return max(_value_block(dv), 64), 8, CHUNK


def causal_stages(which: str) -> int:
    """Software-pipelining stages of the causal chunk kernels ("fwd": the output kernel, "dq", "dkv":
    the dk and dv kernels): 1, so every tile load of the chunk loop waits for its data (sm_90
    TTGIR, stop 22: synchronous tt.load of every tile in the loop, no async copy). Whether 2
    stages overlap the next chunk's loads with this chunk's products and run faster is for
    bench/sweep_linear.py --causal on a GPU to say (it patches this function)."""
    return 1


def causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, feature: str, *, offset: int,
           eps: float = 0.0, span: int | None = None) -> torch.Tensor:
    """out_i = sum_{j <= i + offset} (phi(q_i) . phi(k_j)) v_j / (sum_j phi(q_i) . phi(k_j) + eps);
    q (B, Hq, Sq, DK), k (B, Hkv, Sk, DK), v (B, Hkv, Sk, DV), out (B, Hq, Sq, DV). span: rows per
    super-chunk (a multiple of the chunk; default from super_chunk)."""
    batch, heads, seq_q, dk = q.shape
    seq_k, dv = k.shape[2], v.shape[3]
    if seq_q == 0 or batch * heads == 0:
        return out
    bv, warps, chunk = launch_config("fwd", pad(dk), dv, q.dtype, flash_configs.device_smem_limit(q))[0]
    span = span or super_chunk(seq_q, batch * heads * cdiv(dv, bv), q.device)
    _check_span(span, chunk)
    states = causal_states(k, v, feature, offset=offset, seq_q=seq_q, span=span)
    n_sc = cdiv(seq_q, span)
    linear_chunk_fwd_kernel[(cdiv(dv, bv) * n_sc * batch * heads,)](
        q, k, v, out, states, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        heads, heads // k.shape[1], seq_q, seq_k, offset, span, n_sc, eps,
        DK=dk, DK_PAD=pad(dk), DV=dv, BV=bv, FEAT=FEATURE_IDS[feature], CHUNK=chunk,
        MODE=dot_mode(q.dtype), num_warps=warps, num_stages=causal_stages("fwd"))
    return out


def _causal_bwd_stop22(dk_pad: int, dv_pad: int, dtype: torch.dtype) -> bool:
    """bf16 with DK and DV padded to 128: the causal backward's inputs that bench/sweep_linear.py
    --causal timed on an H100 at stop 22 (2026-11-27, B1 H16 hd128 bf16, elu, 32k tokens;
    bench/results/nvidia-h100-80gb-hbm3/stop22-run2-bench/sweep_linear_causal.json). Not fp16
    (its products scale operands into fp16: with these configs the dq kernel spills 716 bytes on
    sm_90 and the dk kernel 620, against 200 and 128 for bf16; fp16's earlier configs do not
    spill) and not fp32 (the dv kernel would need 262144 bytes of shared memory)."""
    return dtype == torch.bfloat16 and dk_pad == 128 and dv_pad == 128


def dq_config(dk_pad: int, dv_pad: int, dtype: torch.dtype, feature: str) -> tuple[int, int, int]:
    """(key-dim block, warps, chunk) of the causal dq kernel; softmax's derivative needs whole rows.
    Chosen by compiling for sm_90: bf16/fp16 do not spill with these (elu and softmax).

    bf16 with DK and DV padded to 128, feature maps other than softmax (see _causal_bwd_stop22):
    (128, 4, 16), the whole key dim in one 4-warp program, timed on an H100 (stop 22 sweep, B1 H16
    hd128 bf16 elu, 32k tokens, the whole causal backward): 3.51 ms against 5.45 ms for the
    (64, 8, 16) taken until then (1.55x; results within 9e-5 relative of it). It spills 200 bytes
    on sm_90 and is faster all the same; (128, 8, 32) ran 3.47 ms, but in 32-row chunks (1.5e-3
    from the default's results), so the default's chunk is kept. Its grid has half the programs
    per super-chunk, so super_chunk gives the backward half the span (as in the sweep)."""
    if interpreting():
        return dk_pad, 1, chunk_size()
    if feature == "softmax":
        return dk_pad, 8, 16 if dk_pad >= 128 else 32
    if _causal_bwd_stop22(dk_pad, dv_pad, dtype):
        return 128, 4, 16
    # 64-row chunks at hd64 and 32 at hd128 sit at 255 registers (4 bytes spilled at hd128 bf16);
    # 32 rows take 189 at hd64, 16 rows 216 at hd128
    return min(64, dk_pad), 8, 16 if max(dk_pad, dv_pad) >= 128 else 32


def dkv_config(dk_pad: int, dv_pad: int, dtype: torch.dtype, feature: str) -> tuple[int, int, int, int]:
    """(key-dim block, value block, warps, chunk) of the causal dk and dv kernels; softmax's
    derivative needs whole rows. Compiled for sm_90: no spills for bf16/fp16; at hd128 fp32 takes
    32-row chunks (64 KB of shared memory instead of 160 KB), fp16 too (its scaled products hold
    more registers), whole-row softmax 16.

    bf16 with DK and DV padded to 128, feature maps other than softmax (see _causal_bwd_stop22):
    (128, 128, 8, 64), timed on an H100 (stop 22 sweep, B1 H16 hd128 bf16 elu, 32k tokens, the
    whole causal backward): 4.87 ms against 5.44 ms for the (64, 64, 8, 64) taken until then
    (1.12x; results within 5.8e-5 relative of it). The dk and dv kernels spill 128 bytes each on
    sm_90 with it. Timed beside the dq kernel's earlier config, so at twice the super-chunk span
    the backward takes now (see dq_config); the two new configs were not timed together."""
    if interpreting():
        return dk_pad, dv_pad, 1, chunk_size()
    if feature != "softmax" and _causal_bwd_stop22(dk_pad, dv_pad, dtype):
        return 128, 128, 8, CHUNK
    wide = max(dk_pad, dv_pad) >= 128
    bk = dk_pad if feature == "softmax" else min(64, dk_pad)
    if feature == "softmax" and dk_pad >= 128:
        chunk = 16
    else:
        chunk = 32 if wide and dtype != torch.bfloat16 else CHUNK
    return bk, min(64, dv_pad), 8, chunk


def causal_value_pad(dk_pad: int, dv: int) -> int:
    """DV_PAD of the causal backward's kernels (the dq and dk kernels' value tiles; the dv kernel's
    value block follows from it): pad(dv), but on a GPU at least min(64, dk_pad), the value width
    the dk kernel's key-dim block (min(64, dk_pad)) was verified with.

    Found on an H100 (2026-11-27, bench/results/nvidia-h100-80gb-hbm3/stop19-run2/): at dk 64,
    dv 32 (value tiles 32 wide beside 64-wide key tiles) the dk kernel faulted with an illegal
    address at its fp16 products (compute-sanitizer: linear_chunk_dk_kernel, dot_ops, warps 4-7)
    at 64- and 32-row chunks alike, and in bf16 the dv kernel's output was wrong (rel RMSE 7e2).
    The algorithm is right at those shapes under the interpreter, so it is the compiled code (as
    with the forward's (32, 4, 64) config on an H200); padding to 64 runs the value columns past
    dv masked, as at dv 40-64, which passed there in fp16 and bf16."""
    if interpreting():
        return pad(dv)
    return max(pad(dv), min(64, dk_pad))


def _subtract_eps_share(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, mu: torch.Tensor, feature: str, *,
                        offset: int, eps: float) -> None:
    """out (B, Hq, Sq, DV) fp32, the causal output of V - mu, less mu eps / den per row (den = phi(q_i)
    . sum_{j <= i + offset} phi(k_j) + eps; rows without a key or with den 0 unchanged): O - mu for
    the O of V, as causal_bwd's centred backward needs it. On the host, in fp32: in the dq kernel
    (mu or dO . mu per row) it spilled 32 to 80 more bytes at hd128 bf16 on sm_90, over the bound
    of tests/test_triton_sm90_compile.py."""
    from ...reference.linear import feature_map_fn

    batch, heads, seq_q, d = q.shape
    heads_kv, seq_k = k.shape[1], k.shape[2]
    first = max(0, -offset)  # queries before it see no key
    if first >= seq_q or seq_k == 0:
        return
    phi = feature_map_fn(feature)
    zc = torch.cumsum(phi(k.float()), dim=2)[:, :, first + offset:seq_q + offset]  # each row's key sum
    group = heads // heads_kv
    pq = phi(q[:, :, first:].float()).view(batch, heads_kv, group, seq_q - first, d)
    den = torch.einsum("bhgnd,bhnd->bhgn", pq, zc).reshape(batch, heads, seq_q - first, 1) + eps
    share = torch.where(den == 0, 0.0, eps / torch.where(den == 0, 1.0, den))
    out[:, :, first:] -= share * mu.repeat_interleave(group, dim=1)


def causal_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
               dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, feature: str, *, offset: int, eps: float,
               span: int | None = None) -> None:
    """Write the gradients of causal() into dq (B, Hq, Sq, DK), dk (B, Hkv, Sk, DK), dv (B, Hkv, Sk, DV):
    the forward's states, dq (+ 1/den and dd per row), the reverse states of each query
    super-chunk, their reverse prefix summed over the GQA group, then dk and dv per key unit.

    16-bit inputs run on V centred by its mean mu over the keys (per batch and kv head), with O - mu
    recomputed from it (out is not read). The gradients depend on V only through
    dO_i . (v_j - o_i), which shifting both by mu leaves unchanged; uncentred, both terms of
    dphi(q_i) = (dO_i S_i^T - (dO_i . o_i) z_i) / d_i carry V's mean and cancel: with o_i rounded to
    16 bits (the output as saved) and S in the products' 16-bit operands, dq's relative RMSE was
    1.1e-2 (fp16, 500 tokens, V ~ N(3, 1); 7e-3 at N(1, 1), 2000 tokens) against the 5e-3
    contract, linear-torch-chunked's 3e-4. Costs one more causal forward (fp32 out), a copy of V and,
    with eps > 0, each row's denominator on the host (_subtract_eps_share)."""
    batch, heads, seq_q, d = q.shape
    heads_kv, seq_k, d_v = k.shape[1], k.shape[2], v.shape[3]
    group = heads // heads_kv
    if batch * heads == 0:
        return
    if seq_q == 0:
        dk.zero_()
        dv.zero_()
        return
    mode = dot_mode(q.dtype)
    if mode != 0:
        mu = v.float().sum(dim=2, keepdim=True) / max(seq_k, 1)  # (B, Hkv, 1, DV); 0 without keys
        v = (v.float() - mu).to(v.dtype)
        out = causal(q, k, v, torch.empty(batch, heads, seq_q, d_v, dtype=torch.float32, device=q.device),
                     feature, offset=offset, eps=eps)
        if eps > 0:  # O - mu = O(V - mu) - mu eps / den
            _subtract_eps_share(out, q, k, mu, feature, offset=offset, eps=eps)
        # rounded relative to |O - mu| now; in q's dtype the dq kernel compiles as before (an fp32 O
        # spilled 16 more bytes at hd128 bf16 on sm_90)
        out = out.to(q.dtype)
    v_pad = causal_value_pad(pad(d), d_v)
    limit = flash_configs.device_smem_limit(q)
    bk, dq_warps, dq_chunk = launch_config("dq", pad(d), v_pad, q.dtype, limit, feature)[0]
    kv_bk, kv_bv, kv_warps, kv_chunk = launch_config("dkv", pad(d), v_pad, q.dtype, limit, feature)[0]
    span = span or super_chunk(seq_q, batch * heads * cdiv(pad(d), bk), q.device)
    _check_span(span, dq_chunk, kv_chunk)
    n_sc = cdiv(seq_q, span)
    n_pre = cdiv(max(offset, 0), span)
    states = causal_states(k, v, feature, offset=offset, seq_q=seq_q, span=span)
    rden = torch.empty(batch * heads, seq_q, dtype=torch.float32, device=q.device)
    dd = torch.empty_like(rden)
    linear_chunk_dq_kernel[(cdiv(pad(d), bk) * n_sc * batch * heads,)](
        q, k, v, out, dout, dq, states, rden, dd,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *dout.stride(), *dq.stride(),
        heads, group, seq_q, seq_k, offset, span, n_sc, eps,
        DK=d, DK_PAD=pad(d), BK=bk, DV=d_v, DV_PAD=v_pad, FEAT=FEATURE_IDS[feature], CHUNK=dq_chunk, MODE=mode,
        num_warps=dq_warps, num_stages=causal_stages("dq"))
    del states
    # dh_s = (phi(Q_s)^T (dO_s / d), phi(Q_s)^T dd_s) per query super-chunk, then dS by a reverse prefix
    dh = _chunk_sums(q, dout, feature, first=0, rows=span, splits=n_sc, weights=(rden, dd))
    ds = torch.empty(n_sc + 1, batch * heads_kv, d * d_v + d, dtype=torch.float32, device=q.device)
    _prefix(dh, ds, n_units=n_sc, group=group, reverse=True)
    del dh
    units = n_pre + n_sc
    common = (heads_kv, group, seq_q, seq_k, offset, span, n_pre, units)
    linear_chunk_dk_kernel[(cdiv(pad(d), kv_bk) * units * batch * heads_kv,)](
        q, k, v, dout, dk, ds, rden, dd, *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(),
        *common, DK=d, DK_PAD=pad(d), BK=kv_bk, DV=d_v, DV_PAD=v_pad, FEAT=FEATURE_IDS[feature], CHUNK=kv_chunk,
        MODE=mode, num_warps=kv_warps, num_stages=causal_stages("dkv"))
    linear_chunk_dv_kernel[(cdiv(d_v, kv_bv) * units * batch * heads_kv,)](
        q, k, dout, dv, ds, rden, *q.stride(), *k.stride(), *dout.stride(), *dv.stride(),
        *common, DK=d, DK_PAD=pad(d), DV=d_v, BV=kv_bv, FEAT=FEATURE_IDS[feature], CHUNK=kv_chunk,
        MODE=mode, num_warps=kv_warps, num_stages=causal_stages("dkv"))
