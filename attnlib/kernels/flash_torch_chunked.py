"""Method flash in plain PyTorch, memory-bounded: FlashAttention-2's forward and backward over
chunks of query rows, so no (Sq, Sk) score matrix is ever held whole.

The torch-backend kernel for fp16/bf16/fp32 wherever no fused kernel applies (CPU, or a GPU
without attnlib's Triton/CUDA kernels and outside torch SDPA's reach): the reference it ranks
above (flash-torch-reference, still the ground truth and the fp64 kernel) forms the full fp32
score matrix, forward and backward: 25 GB at 16k tokens x 24 heads. Here one chunk's fp32 scores
stay under SCORE_BUDGET_BYTES (the backward holds two such tensors at once: P and dS).
Scores and softmax are computed in float32 as the reference does; the loop runs in one order,
so results are deterministic. GQA/MQA folds a kv head's query heads into the rows of one matmul
against that head's K and V (no repeat_interleave copy), which also sums their dK/dV. A key mask
(attnlib/key_mask.py) is added to each chunk's scores.

The same functions serve block_sparse-torch-chunked (a `blocked` row mask per chunk, beside
causal) and flash_attention_varlen's torch backend (varlen_forward/varlen_backward: one call per
packed sequence).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..dispatch import Kernel, register
from ..inputs import AttentionInputs
from ..key_mask import key_bias

# Bytes of float32 scores one chunk may hold, across batch x heads (at least one query row runs)
SCORE_BUDGET_BYTES = 64 << 20


def rows_per_chunk(batch: int, heads_q: int, seq_q: int, seq_k: int, budget: int | None = None) -> int:
    """Query rows per chunk: as many as keep batch x heads x rows x seq_k float32 scores within
    the budget, at least 1, at most seq_q."""
    budget = SCORE_BUDGET_BYTES if budget is None else budget
    per_row = batch * heads_q * seq_k * 4
    if per_row == 0:
        return max(seq_q, 1)
    return max(1, min(seq_q, budget // per_row))


def _visible_keys(inp: AttentionInputs, r1: int) -> int:
    """Keys any of the rows before r1 can see: with bottom-right causal alignment, query i sees
    keys j <= i + Sk - Sq, so a chunk never reads keys past its last row's diagonal."""
    if not inp.causal:
        return inp.seq_k
    return max(0, min(inp.seq_k, r1 + inp.seq_k - inp.seq_q))


def _rows(x: torch.Tensor, heads_kv: int, r0: int, r1: int) -> torch.Tensor:
    """(B, Hq, S, d) -> rows r0:r1 in float32 as (B, Hkv, group * rows, d): a kv head's query
    heads stacked along the rows."""
    b, hq, _, d = x.shape
    return x[:, :, r0:r1].float().reshape(b, heads_kv, (hq // heads_kv) * (r1 - r0), d)


def _to_heads(x: torch.Tensor, heads_q: int, rows: int) -> torch.Tensor:
    """(B, Hkv, group * rows, ...) -> (B, Hq, rows, ...), a view."""
    return x.reshape(x.shape[0], heads_q, rows, *x.shape[3:])


# blocked(r0, r1, kend) -> bool (B or 1, Hq or 1, r1 - r0, kend), True = the pair is masked out:
# a mask beyond causal (method block_sparse's), built one chunk of rows at a time
RowMask = Callable[[int, int, int], torch.Tensor]


def _scores(inp: AttentionInputs, qc: torch.Tensor, kc: torch.Tensor, r0: int, r1: int,
            blocked: RowMask | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """scale * q_chunk @ k^T (+ the key bias, key_mask.key_bias's (B or 1, Hq or 1, Sk)) in float32,
    (B, Hkv, group * rows, kend), causal positions and those blocked(r0, r1, kend) names -inf."""
    s = torch.matmul(qc, kc.transpose(-1, -2)).mul_(inp.scale)
    kend, offset = kc.shape[2], inp.seq_k - inp.seq_q
    b, hkv, rows = s.shape[0], s.shape[1], r1 - r0
    s5 = s.view(b, hkv, -1, rows, kend)  # (B, Hkv, group, rows, kend)
    if bias is not None:
        heads = (hkv, s5.shape[2]) if bias.shape[1] > 1 else (1, 1)  # per query head, or broadcast
        s5.add_(bias.view(bias.shape[0], *heads, 1, -1)[..., :kend])
    if inp.causal and kend - 1 > r0 + offset:  # the chunk's first row misses some of its keys
        i = torch.arange(r0, r1, device=s.device)[:, None]
        j = torch.arange(kend, device=s.device)[None, :]
        s5.masked_fill_(j > i + offset, float("-inf"))
    if blocked is not None:
        m = blocked(r0, r1, kend)
        heads = (hkv, s5.shape[2]) if m.shape[1] > 1 else (1, 1)  # per query head, or broadcast
        s5.masked_fill_(m.view(m.shape[0], *heads, rows, kend), float("-inf"))
    return s


def _empty_like_layout(inp: AttentionInputs, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of bhsd shape like's, laid out in the caller's layout, returned as a bhsd view."""
    b, h, s, d = like.shape
    if inp.layout == "bhsd":
        return torch.empty(b, h, s, d, dtype=dtype, device=like.device)
    return torch.empty(b, s, h, d, dtype=dtype, device=like.device).transpose(1, 2)


def chunked_forward(inp: AttentionInputs, budget: int | None = None, blocked: RowMask | None = None):
    """(out in q's dtype via inp.new_output, lse float32 (B, Hq, Sq)); rows that see no key give
    0 and -inf. blocked masks out more (query, key) pairs than causal does, chunk by chunk."""
    b, hq, hkv, sq = inp.batch, inp.heads_q, inp.heads_kv, inp.seq_q
    out = inp.new_output()
    lse = torch.empty(b, hq, sq, dtype=torch.float32, device=inp.device)
    if lse.numel() == 0:  # no batch, head or query row
        return out, lse
    kf, vf = inp.k.float(), inp.v.float()
    bias = key_bias(inp)
    step = rows_per_chunk(b, hq, sq, inp.seq_k, budget)
    for r0 in range(0, sq, step):
        r1 = min(sq, r0 + step)
        kend = _visible_keys(inp, r1)
        if kend == 0:  # no row of the chunk sees a key
            out[:, :, r0:r1] = 0
            lse[:, :, r0:r1] = float("-inf")
            continue
        s = _scores(inp, _rows(inp.q, hkv, r0, r1), kf[:, :, :kend], r0, r1, blocked, bias)
        m = s.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = s.sub_(m).exp_()
        l = p.sum(dim=-1, keepdim=True)
        has = l > 0
        o = torch.matmul(p, vf[:, :, :kend]).div_(torch.where(has, l, torch.ones_like(l)))
        row_lse = torch.where(has, m + torch.log(l), torch.full_like(l, float("-inf")))
        out[:, :, r0:r1] = _to_heads(o, hq, r1 - r0)
        lse[:, :, r0:r1] = _to_heads(row_lse.squeeze(-1), hq, r1 - r0)
        del s, p  # before the next chunk's scores, or two chunks' live at once
    return out, lse


def chunked_backward(inp: AttentionInputs, out: torch.Tensor | None, lse: torch.Tensor, dout: torch.Tensor,
                     dlse: torch.Tensor | None, budget: int | None = None, blocked: RowMask | None = None,
                     into: tuple | None = None):
    """FlashAttention-2's backward from the saved out and lse, over the same query chunks:
    (dq, dk, dv) in the inputs' dtype and the caller's layout (bhsd views).

    out None: each row's D = dO . O comes from the chunk's own P and dP = dO V^T as rowsum(P * dP)
    (the same sum), for a caller whose saved output is not this softmax's O (sla saves
    O_s + O_l W^T + b rounded, from which O_s cannot be taken back where the rest dominates).
    into: float32 (dq, dk, dv) buffers, in the caller's layout, that the gradients are added to
    and returned (float32) instead of fresh ones."""
    b, hq, hkv, sq, sk = inp.batch, inp.heads_q, inp.heads_kv, inp.seq_q, inp.seq_k
    if into is None:
        dq = _empty_like_layout(inp, inp.q, inp.dtype)
        dk = _empty_like_layout(inp, inp.k, torch.float32).zero_()
        dv = _empty_like_layout(inp, inp.v, torch.float32).zero_()
    else:
        dq, dk, dv = into
    kf, vf = inp.k.float(), inp.v.float()
    bias = key_bias(inp)
    step = rows_per_chunk(b, hq, sq, sk, budget)
    for r0 in range(0, sq if dq.numel() else 0, step):
        r1 = min(sq, r0 + step)
        kend = _visible_keys(inp, r1)
        if kend == 0:  # no row of the chunk sees a key
            if into is None:
                dq[:, :, r0:r1] = 0
            continue
        qc, do = _rows(inp.q, hkv, r0, r1), _rows(dout, hkv, r0, r1)
        row_lse = _rows(lse.unsqueeze(-1), hkv, r0, r1)
        # a row that sees nothing (lse -inf) has P = 0: exp(s - inf)
        row_lse = torch.where(row_lse == float("-inf"), torch.full_like(row_lse, float("inf")), row_lse)
        kc, vc = kf[:, :, :kend], vf[:, :, :kend]
        p = _scores(inp, qc, kc, r0, r1, blocked, bias).sub_(row_lse).exp_()
        dv[:, :, :kend] += torch.matmul(p.transpose(-1, -2), do)
        dp = torch.matmul(do, vc.transpose(-1, -2))
        if out is None:  # rowsum(P * dP) as a batch of dot products: no third (rows, keys) tensor
            delta = torch.matmul(p.unsqueeze(-2), dp.unsqueeze(-1)).squeeze(-1)
        else:
            delta = (do * _rows(out, hkv, r0, r1)).sum(-1, keepdim=True)
        if dlse is not None:  # a gradient into lse adds P * dlse to dS: fold it into D
            # not where lse is -inf (P = 0 there): a loss like lse ** 2 sends NaN / inf into those
            # rows, which P * (dP - D) would turn into NaN (the Triton backward drops them too)
            row_dlse = _rows(dlse.unsqueeze(-1), hkv, r0, r1)
            delta = delta - torch.where(torch.isfinite(row_lse), row_dlse, torch.zeros_like(row_dlse))
        ds = dp.sub_(delta).mul_(p)
        del p, dp
        dq_rows = _to_heads(torch.matmul(ds, kc).mul_(inp.scale), hq, r1 - r0)
        if into is None:
            dq[:, :, r0:r1] = dq_rows
        else:
            dq[:, :, r0:r1] += dq_rows
        dk[:, :, :kend] += torch.matmul(ds.transpose(-1, -2), qc).mul_(inp.scale)
        del ds
    if into is not None:
        return dq, dk, dv
    return dq, dk.to(inp.dtype), dv.to(inp.dtype)


# -- flash_attention_varlen's torch backend: each packed sequence through the functions above ---

def _bhsd(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0).transpose(1, 2)  # packed (s, h, d) -> (1, h, s, d), a view of a bshd tensor


def _packed(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)[0]  # (1, h, s, d) bhsd view -> (s, h, d)


def _sequence(q, k, v, causal: bool, scale: float) -> AttentionInputs:
    """One packed sequence, q (s_q, Hq, D) and k/v (s_k, Hkv, D[v]), as bshd inputs of batch 1."""
    return AttentionInputs(q=_bhsd(q), k=_bhsd(k), v=_bhsd(v), method="flash", layout="bshd", causal=causal,
                           scale=scale)


def varlen_forward(q, k, v, cu_q: torch.Tensor, cu_k: torch.Tensor, *, causal: bool, scale: float):
    """flash_attention_varlen in fp16/bf16/fp32 off the Triton path: out (total_q, Hq, Dv) in q's
    dtype, lse float32 (Hq, total_q); causal is bottom-right per sequence, and a sequence with
    no keys gives 0 and -inf. Each sequence runs chunked (through the reference's per-sequence
    loop), so no (s_q, s_k) scores are held whole."""
    from ..reference.flash_varlen import per_sequence

    return per_sequence(lambda qs, ks, vs: chunked_forward(AttentionInputs(q=qs, k=ks, v=vs, method="flash",
                                                                           causal=causal, scale=scale)),
                        q, k, v, cu_q, cu_k)


def varlen_backward(dout, dlse, q, k, v, out, lse, cu_q: torch.Tensor, cu_k: torch.Tensor, *, causal: bool,
                    scale: float):
    """[dq, dk, dv] of varlen_forward, packed like q, k, v (a key outside every sequence gets 0)."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cq) - 1):
        (q0, q1), (k0, k1) = cq[b:b + 2], ck[b:b + 2]
        inp = _sequence(q[q0:q1], k[k0:k1], v[k0:k1], causal, scale)
        seq_dlse = None if dlse is None else dlse[None, :, q0:q1]
        grads = chunked_backward(inp, _bhsd(out[q0:q1]), lse[None, :, q0:q1], _bhsd(dout[q0:q1]), seq_dlse)
        for full, g, (a, z) in zip((dq, dk, dv), grads, ((q0, q1), (k0, k1), (k0, k1))):
            full[a:z] = _packed(g)
    return [dq, dk, dv]


class FlashTorchChunked(Kernel):
    name = "flash-torch-chunked"
    method = "flash"
    backend = "torch"
    # above flash-torch-reference (0), which it replaces as the fallback; below flash-torch-sdpa
    # where torch runs a fused kernel (10 and up on GPUs, 8 for CPU inference), which is faster
    priority = 5
    dtypes = (torch.float16, torch.bfloat16, torch.float32)  # fp64 stays on the reference

    def forward(self, inp: AttentionInputs):
        out, lse = chunked_forward(inp)
        return (out, lse) if inp.return_lse else out

    def backward(self, inp: AttentionInputs, out: torch.Tensor, lse: torch.Tensor | None, dout: torch.Tensor,
                 dlse: torch.Tensor | None) -> tuple:
        if lse is None:
            raise RuntimeError(f"{self.name}'s backward needs the forward's lse")
        dq, dk, dv = chunked_backward(inp, out, lse, dout, dlse)
        return dq, dk, dv, None, None


register(FlashTorchChunked())
