"""Block-sparse attention in plain PyTorch with work proportional to the listed blocks: each chunk
of block rows gathers only the keys and values its block-mask rows list, forward and backward.

flash-torch-chunked's masked form (chunked_forward / chunked_backward with a `blocked` row mask)
computes every (query, key) score and masks most of them away: at density 0.1 (4096 tokens, 4
heads, hd64, blocks of 64, one CPU thread) it took 126 ms where torch SDPA's dense attention took
179 ms; at FLUX.1's shape 3.5 s against 1.3 s (bench/results/cpu/torch-cpu.md).

Here the block rows (b, query head, query block) are ordered by how many key blocks they list, and
a chunk of them gathers its query rows and its listed keys (each row's listed blocks first,
ascending, padded to the chunk's longest list: sorted rows keep that padding small) straight from
the caller's tensors, so a chunk's scores are one batched (bq x listed keys) product; padding
slots, keys past Sk and causal (bottom-right) positions are -inf. The same calls took 78 ms and
0.34 s (10x faster than the masked form, 3.7x faster than dense SDPA; forward + backward 5.9x
faster than the masked form). Backward recomputes P from the saved lse as FlashAttention-2 does;
dQ rows are written back and dK/dV added to their keys with index_put_ (its accumulation runs
serially on a CPU: deterministic). Semantics as the masked form's: rows with nothing allowed give
0 and lse -inf, their gradients 0; computed in float32; no padded copy of q, k, v or dout.

Used on CPU tensors when the mask lists at most GATHER_MAX_DENSITY of the visible block pairs
(denser masks run the masked form); on a GPU the torch backend keeps the masked form (CUDA's
accumulating index_put_ uses atomics: not deterministic). block_sparse-torch-chunked
and sla-torch-chunked (its critical blocks: sla at critical 0.05 on the call above went from 686 to
44 ms) both call sparse_forward / sparse_backward.
"""
from __future__ import annotations

import torch

from ..inputs import AttentionInputs
from ..reference._common import num_blocks
from . import flash_torch_chunked as flash_chunked
from .flash_torch_chunked import RowMask

# listed / visible block pairs at or below which the gathered form runs (CPU). At FLUX.1's shape
# (24 heads, 4608 tokens, hd128, fp32, blocks of 64, 2 threads; bench/results/cpu/torch-cpu.md and
# the same day's crossover check): density 0.5 gathered 1.7x faster forward, 1.33x forward +
# backward; 0.75 forward 1.47x faster but forward + backward 0.82x; 1.0 forward 0.68x
GATHER_MAX_DENSITY = 0.5


def blocked_rows_from(inp: AttentionInputs, block_mask: torch.Tensor, block_size) -> RowMask:
    """The masked form's mask: blocked(r0, r1, kend) -> bool (B or 1, Hq or 1, r1 - r0, kend),
    True where block_mask leaves the (query, key) pair out; built from the block mask alone (no
    (Sq, Sk) mask)."""
    bq, bk = block_size
    left_out = ~block_mask.to(device=inp.device, dtype=torch.bool)  # block-sized

    def blocked(r0: int, r1: int, kend: int) -> torch.Tensor:
        qb = torch.arange(r0, r1, device=inp.device) // bq
        kb = torch.arange(kend, device=inp.device) // bk
        return left_out[:, :, qb[:, None], kb[None, :]]

    return blocked


def visible_blocks(inp: AttentionInputs, bq: int, bk: int) -> torch.Tensor:
    """bool (Mq, Mk): the block pairs holding at least one (query, key) pair causal allows (all
    of them without causal)."""
    mq, mk = num_blocks(inp.seq_q, bq), num_blocks(inp.seq_k, bk)
    if not inp.causal:
        return torch.ones(mq, mk, dtype=torch.bool, device=inp.device)
    q_last = torch.clamp(torch.arange(1, mq + 1, device=inp.device) * bq, max=inp.seq_q) - 1
    k_first = torch.arange(mk, device=inp.device) * bk
    return k_first[None, :] <= q_last[:, None] + (inp.seq_k - inp.seq_q)


def gathered_blocks(inp: AttentionInputs, block_mask: torch.Tensor, block_size) -> torch.Tensor | None:
    """The block pairs the gathered form visits, (B or 1, Hq or 1, Mq, Mk) bool (the block mask less
    the pairs causal leaves empty), or None where the masked form runs: GPU tensors, no query or
    key, or a mask listing more than GATHER_MAX_DENSITY of the visible block pairs."""
    if inp.device.type != "cpu" or inp.q.numel() == 0 or inp.k.numel() == 0 or block_mask.numel() == 0:
        return None
    visible = visible_blocks(inp, *block_size)
    listed = block_mask.to(device=inp.device, dtype=torch.bool) & visible
    n_visible = visible.sum().item() * listed.shape[0] * listed.shape[1]
    if n_visible == 0 or listed.sum().item() > GATHER_MAX_DENSITY * n_visible:
        return None
    return listed


class _Blocks:
    """One call's block rows (b, query head, query block), ordered by how many key blocks they
    list so that a chunk of rows pads its lists to about their common length, and the gathers and
    scatters between those rows and the caller's tensors (no padded copy of q, k, v or dout)."""

    def __init__(self, inp: AttentionInputs, listed: torch.Tensor, block_size, budget: int | None):
        self.inp = inp
        self.bq, self.bk = block_size
        b, hq = inp.batch, inp.heads_q
        self.mq, self.mk = listed.shape[-2:]
        self.group = hq // inp.heads_kv
        self.rows_mask = listed.expand(b, hq, self.mq, self.mk).reshape(b * hq * self.mq, self.mk)
        self.counts, self.row_order = torch.sort(self.rows_mask.sum(-1), stable=True)
        self.first = int((self.counts == 0).sum().item())  # rows listing nothing come first: skipped
        longest = max(int(self.counts[-1].item()), 1)
        per_row = longest * self.bk * (self.bq + inp.head_dim + inp.head_dim_v) * 4  # scores + gathered K, V
        budget = flash_chunked.SCORE_BUDGET_BYTES if budget is None else budget
        self.step = max(1, budget // per_row)

    def chunks(self):
        """Per chunk: (the rows' gather indices, longest list among them), rows with a list only."""
        total = self.counts.numel()
        for c0 in range(self.first, total, self.step):
            c1 = min(total, c0 + self.step)
            yield _Rows(self, self.row_order[c0:c1]), int(self.counts[c1 - 1].item())


class _Rows:
    """A chunk of n block rows: where their query rows and listed keys lie in the caller's tensors."""

    def __init__(self, blocks: _Blocks, rid: torch.Tensor):
        inp, dev = blocks.inp, rid.device
        self.blocks, self.rid = blocks, rid
        mq, bq = blocks.mq, blocks.bq
        self.b = rid // (inp.heads_q * mq)
        self.h = (rid // mq) % inp.heads_q
        pos = (rid % mq)[:, None] * bq + torch.arange(bq, device=dev)  # (n, bq)
        self.qpos = pos
        self.q_keep = pos < inp.seq_q
        self.q_at = (self.b[:, None], self.h[:, None], pos.clamp(max=max(inp.seq_q - 1, 0)))
        self.q_kept = tuple(t.expand_as(pos)[self.q_keep] for t in self.q_at[:2]) + (pos[self.q_keep],)

    def index(self, longest: int):
        """Each row's listed key blocks first, ascending, padded to `longest`: key positions
        (n, L * bk) and which of them are real listed keys (n, L * bk) bool."""
        blocks, inp = self.blocks, self.blocks.inp
        rows = blocks.rows_mask.index_select(0, self.rid)
        order = torch.sort(rows.to(torch.uint8), dim=-1, descending=True, stable=True).indices[:, :longest]
        valid = torch.arange(longest, device=rows.device) < rows.sum(-1, keepdim=True)
        kpos = (order[..., None] * blocks.bk + torch.arange(blocks.bk, device=rows.device)).flatten(-2)
        k_keep = valid.repeat_interleave(blocks.bk, dim=-1) & (kpos < inp.seq_k)
        kvh = (self.h // blocks.group)[:, None]
        self.k_at = (self.b[:, None], kvh, kpos.clamp(max=inp.seq_k - 1))
        self.k_kept = (self.b[:, None].expand_as(kpos)[k_keep], kvh.expand_as(kpos)[k_keep], kpos[k_keep])
        self.kpos, self.k_keep = kpos, k_keep

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, Sq, d) -> float32 (n, bq, d): the rows' query rows, 0 past Sq."""
        return x[self.q_at].float().masked_fill_(~self.q_keep[..., None], 0.0)

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Hkv, Sk, d) -> float32 (n, L * bk, d): the rows' listed keys (padding: any key,
        masked in the scores)."""
        return x[self.k_at].float()

    def scores(self, qc: torch.Tensor, kc: torch.Tensor) -> torch.Tensor:
        """scale * q_rows @ keys^T, (n, bq, L * bk) float32, -inf where masked."""
        inp = self.blocks.inp
        s = torch.bmm(qc, kc.transpose(-1, -2)).mul_(inp.scale)
        s.masked_fill_(~self.k_keep[:, None, :], float("-inf"))
        if inp.causal:
            s.masked_fill_(self.kpos[:, None, :] > self.qpos[:, :, None] + (inp.seq_k - inp.seq_q), float("-inf"))
        return s

    def put_rows(self, dst: torch.Tensor, vals: torch.Tensor, accumulate: bool = False) -> None:
        """dst (B, H, Sq, ...)[the rows' query rows below Sq] = (or +=) vals (n, bq, ...)."""
        dst.index_put_(self.q_kept, vals[self.q_keep].to(dst.dtype), accumulate=accumulate)

    def add_keys(self, dst: torch.Tensor, vals: torch.Tensor) -> None:
        """dst (B, Hkv, Sk, d)[the real listed keys] += vals (n, L * bk, d); index_put_'s
        accumulation runs serially on a CPU (deterministic)."""
        dst.index_put_(self.k_kept, vals[self.k_keep], accumulate=True)


def gathered_forward(inp: AttentionInputs, listed: torch.Tensor, block_size, budget: int | None = None):
    """chunked_forward's contract (out in q's dtype via inp.new_output, lse float32 (B, Hq, Sq))
    over the block pairs `listed` (gathered_blocks(...)) names."""
    blocks = _Blocks(inp, listed, block_size, budget)
    out = inp.new_output().zero_()
    lse = torch.full((inp.batch, inp.heads_q, inp.seq_q), float("-inf"), dtype=torch.float32, device=inp.device)
    for rows, longest in blocks.chunks():
        rows.index(longest)
        kc, vc = rows.keys(inp.k), rows.keys(inp.v)
        s = rows.scores(rows.queries(inp.q), kc)
        m = s.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = s.sub_(m).exp_()
        l = p.sum(dim=-1, keepdim=True)
        has = l > 0
        rows.put_rows(out, torch.bmm(p, vc).div_(torch.where(has, l, torch.ones_like(l))))
        rows.put_rows(lse, torch.where(has, m + torch.log(l), torch.full_like(l, float("-inf"))).squeeze(-1))
        del s, p, kc, vc
    return out, lse


def gathered_backward(inp: AttentionInputs, out: torch.Tensor | None, lse: torch.Tensor, dout: torch.Tensor,
                      dlse: torch.Tensor | None, listed: torch.Tensor, block_size, budget: int | None = None,
                      into: tuple | None = None):
    """chunked_backward's contract (out None: delta from each chunk's P and dP; into: float32
    (dq, dk, dv) buffers added to and returned) over the block pairs `listed` names."""
    blocks = _Blocks(inp, listed, block_size, budget)
    if into is None:
        dq = flash_chunked._empty_like_layout(inp, inp.q, inp.dtype).zero_()
        dk = flash_chunked._empty_like_layout(inp, inp.k, torch.float32).zero_()
        dv = flash_chunked._empty_like_layout(inp, inp.v, torch.float32).zero_()
    else:
        dq, dk, dv = into
    # a row that sees nothing (lse -inf) has P = 0 with lse +inf: exp(s - inf); so do padding rows
    lse_safe = torch.where(lse == float("-inf"), float("inf"), lse).unsqueeze(-1)
    if dlse is not None:  # not where lse is -inf (P = 0 there): see chunked_backward
        dlse = torch.where(torch.isfinite(lse), dlse, 0.0).unsqueeze(-1)
    for rows, longest in blocks.chunks():
        rows.index(longest)
        kc, vc = rows.keys(inp.k), rows.keys(inp.v)
        qc, do = rows.queries(inp.q), rows.queries(dout)
        row_lse = rows.queries(lse_safe).masked_fill_(~rows.q_keep[..., None], float("inf"))
        p = rows.scores(qc, kc).sub_(row_lse).exp_()
        dv_g = torch.bmm(p.transpose(-1, -2), do)  # (n, L * bk, Dv)
        dp = torch.bmm(do, vc.transpose(-1, -2))
        if out is None:
            delta = torch.matmul(p.unsqueeze(-2), dp.unsqueeze(-1)).squeeze(-1)
        else:
            delta = (do * rows.queries(out)).sum(-1, keepdim=True)
        if dlse is not None:
            delta = delta - rows.queries(dlse)
        ds = dp.sub_(delta).mul_(p)
        del p, dp
        rows.put_rows(dq, torch.bmm(ds, kc).mul_(inp.scale), accumulate=into is not None)
        rows.add_keys(dk, torch.bmm(ds.transpose(-1, -2), qc).mul_(inp.scale))
        del ds
        rows.add_keys(dv, dv_g)
        del dv_g, kc, vc
    if into is not None:
        return into
    return dq, dk.to(inp.dtype), dv.to(inp.dtype)


def sparse_forward(inp: AttentionInputs, block_mask: torch.Tensor, block_size, budget: int | None = None):
    """Attention over block_mask's pairs (causal on top): the gathered form where gathered_blocks
    names its pairs, else the masked form (chunked_forward with blocked_rows_from)."""
    listed = gathered_blocks(inp, block_mask, block_size)
    if listed is not None:
        return gathered_forward(inp, listed, block_size, budget)
    return flash_chunked.chunked_forward(inp, budget, blocked=blocked_rows_from(inp, block_mask, block_size))


def sparse_backward(inp: AttentionInputs, out, lse, dout, dlse, block_mask: torch.Tensor, block_size,
                    budget: int | None = None, into: tuple | None = None):
    """The backward of sparse_forward (the same form for the same call)."""
    listed = gathered_blocks(inp, block_mask, block_size)
    if listed is not None:
        return gathered_backward(inp, out, lse, dout, dlse, listed, block_size, budget, into)
    return flash_chunked.chunked_backward(inp, out, lse, dout, dlse, budget,
                                          blocked=blocked_rows_from(inp, block_mask, block_size), into=into)
