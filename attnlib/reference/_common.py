"""Shared pieces of the pure-PyTorch references: GQA expansion, causal masks, safe softmax."""
from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """References compute in float64 when given float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def expand_kv(x: torch.Tensor, heads_q: int) -> torch.Tensor:
    """(B, Hkv, S, D) -> (B, Hq, S, D): query head h reads kv head h // (Hq // Hkv)."""
    group = heads_q // x.shape[1]
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def causal_mask(seq_q: int, seq_k: int, device) -> torch.Tensor:
    """Bottom-right aligned: query i sees keys j <= i + seq_k - seq_q. True = visible."""
    i = torch.arange(seq_q, device=device)[:, None]
    j = torch.arange(seq_k, device=device)[None, :]
    return j <= i + (seq_k - seq_q)


def check_block_mask_shape(mask, batch: int, heads_q: int, seq_q: int, seq_k: int, block_size,
                           hint: str = "") -> None:
    """The canonical bool block mask's rule, shared by attention()'s option check and the float64
    reference: a bool tensor (B or 1, Hq or 1, ceil(Sq/bq), ceil(Sk/bk)). hint is appended to the
    type error (the dispatcher's pointer for a FlexAttention BlockMask)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"block_mask must be a bool torch.Tensor, got {type(mask).__name__}" + hint)
    if mask.dtype != torch.bool:
        raise TypeError(f"block_mask must have dtype torch.bool, got {mask.dtype}")
    bq, bk = block_size
    mq, mk = num_blocks(seq_q, bq), num_blocks(seq_k, bk)

    def one_or(n: int) -> str:  # a dim that may broadcast: "1" alone when the call's size is 1
        return "1" if n == 1 else f"1 or {n}"

    want = f"({one_or(batch)}, {one_or(heads_q)}, {mq}, {mk})"
    if mask.dim() != 4:
        raise ValueError(f"block_mask must be 4-D {want} for block_size={tuple(block_size)}, got {tuple(mask.shape)}")
    b, h, q, k = mask.shape
    if b not in (1, batch) or h not in (1, heads_q) or q != mq or k != mk:
        raise ValueError(f"block_mask must have shape {want} for block_size={tuple(block_size)}, "
                         f"got {tuple(mask.shape)}")


def masked_row_exp(scores: torch.Tensor, mask: torch.Tensor | None, exp=torch.exp, inplace: bool = False):
    """Unnormalised softmax rows, stable and NaN-free where a row sees nothing.

    Returns (p, m_safe, l_safe, has): p = exp(scores - m_safe) (0 where masked), the row max
    (0 for empty rows), the row sum (1 for empty rows) and whether the row saw any key. exp may
    be torch.exp2 for base-2 logits. inplace: p is computed in scores' own memory (no autograd
    through it), so a block of rows holds one score tensor instead of several.
    """
    if mask is not None:
        scores = scores.masked_fill_(~mask, float("-inf")) if inplace else scores.masked_fill(~mask, float("-inf"))
    if scores.shape[-1] == 0:  # no keys (Sk == 0): amax refuses an empty reduction
        m = scores.new_full((*scores.shape[:-1], 1), float("-inf"))
    else:
        m = scores.amax(dim=-1, keepdim=True)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = exp(scores.sub_(m_safe), out=scores) if inplace else exp(scores - m_safe)
    l = p.sum(dim=-1, keepdim=True)
    has = l > 0
    return p, m_safe, torch.where(has, l, torch.ones_like(l)), has


def masked_softmax_attention(scores: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None):
    """softmax(scores) @ v with a bool mask (True = visible); rows with nothing visible give
    0 and lse = -inf, never NaN, also in gradients. Returns (out, lse) in scores' dtype."""
    p, m_safe, l_safe, has = masked_row_exp(scores, mask)
    out = (p / l_safe) @ v
    lse = torch.where(has, m_safe + torch.log(l_safe), torch.full_like(l_safe, float("-inf")))
    return out, lse.squeeze(-1)


def safe_divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den (den broadcast, e.g. (..., Sq, 1)), and 0 with no gradient where den == 0: the
    linear-attention row whose phi(q) meets no phi(k) mass (relu with eps 0, or no key), as the
    Triton kernels' safe_recip gives."""
    zero = den == 0
    return (num / torch.where(zero, torch.ones_like(den), den)).masked_fill(zero, 0.0)


def num_blocks(seq: int, block: int) -> int:
    """ceil(seq / block): the last block may be ragged."""
    return -(-seq // block)


def block_mask_to_tokens(block_mask: torch.Tensor, block_size: tuple[int, int], seq_q: int,
                         seq_k: int) -> torch.Tensor:
    """(..., ceil(Sq/bq), ceil(Sk/bk)) block mask -> (..., Sq, Sk) token mask (ragged tails cut)."""
    bq, bk = block_size
    tok = block_mask.repeat_interleave(bq, dim=-2)[..., :seq_q, :]
    return tok.repeat_interleave(bk, dim=-1)[..., :seq_k]
