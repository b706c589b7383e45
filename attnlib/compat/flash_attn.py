"""flash_attn 2 call signatures on attnlib kernels: (batch, seq, heads, head_dim) tensors,
softmax_scale, bottom-right causal, return_attn_probs -> (out, softmax_lse, None).

Not implemented, and rejected with a ValueError rather than computed wrongly: dropout_p > 0,
sliding windows other than (-1, -1), softcap != 0 and ALiBi slopes. With return_attn_probs
the attention probabilities are not materialised (the third element is None), as flash_attn
returns them only for testing with dropout.
"""
from __future__ import annotations

from .. import api, varlen


def _check_unsupported(dropout_p, window_size, softcap, alibi_slopes) -> None:
    if dropout_p:
        raise ValueError(f"dropout_p={dropout_p}: attnlib's flash_attn compatibility does not implement "
                         "attention dropout; use dropout_p=0.0 (inference) or torch SDPA")
    if tuple(window_size) != (-1, -1):
        raise ValueError(f"window_size={tuple(window_size)}: only (-1, -1) (no sliding window) is supported")
    if softcap:
        raise ValueError(f"softcap={softcap}: logit soft-capping is not supported")
    if alibi_slopes is not None:
        raise ValueError("alibi_slopes: ALiBi is not supported")


def _result(res, return_attn_probs):
    if return_attn_probs:
        out, lse = res
        return out, lse, None
    return res


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (B, Sq, H, D), k/v (B, Sk, Hkv, D) -> out (B, Sq, H, D) [, lse (B, H, Sq), None]."""
    _check_unsupported(dropout_p, window_size, softcap, alibi_slopes)
    res = api.flash_attention(q, k, v, causal=causal, scale=softmax_scale, layout="bshd",
                              return_lse=bool(return_attn_probs))
    return _result(res, return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """qkv (B, S, 3, H, D)."""
    _check_packed("qkv", qkv, 5, 3)
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal,
                           window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (B, Sq, H, D), kv (B, Sk, 2, Hkv, D)."""
    _check_packed("kv", kv, 5, 2)
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size,
                           softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                           alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
    """Packed (total_tokens, heads, head_dim) sequences delimited by int32 cu_seqlens."""
    _check_unsupported(dropout_p, window_size, softcap, alibi_slopes)
    if block_table is not None:
        raise ValueError("block_table: paged KV caches are not supported")
    res = varlen.flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                        causal=causal, scale=softmax_scale,
                                        return_lse=bool(return_attn_probs))
    return _result(res, return_attn_probs)


def _check_packed(name, x, ndim, n):
    import torch

    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim or x.shape[2] != n:
        raise ValueError(f"{name} must have shape (batch, seq, {n}, heads, head_dim), got {tuple(x.shape)}")


__all__ = ["flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_varlen_func"]
