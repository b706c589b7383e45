"""flash_attention_varlen: packed (total_tokens, heads, head_dim) sequences with cu_seqlens."""
from __future__ import annotations


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                           causal=False, scale=None, return_lse=False, backend="auto"):
    raise NotImplementedError("flash_attention_varlen lands with the Triton flash kernels")
