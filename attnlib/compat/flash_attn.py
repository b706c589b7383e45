"""flash_attn 2 call signatures on attnlib kernels: (batch, seq, heads, head_dim) tensors,
softmax_scale, bottom-right causal, return_attn_probs -> (out, softmax_lse, None). The dense,
packed and varlen functions are here; flash_attn_with_kvcache (decoding on a KV cache) is in
flash_attn_kvcache.py and re-exported.

Not implemented, and rejected with a ValueError rather than computed wrongly: dropout_p > 0,
sliding (local) windows, softcap > 0 and ALiBi slopes (flash_attn soft-caps only for softcap > 0,
so 0 or a negative softcap is plain attention there and here). A window_size that flash_attn itself
treats as full or causal attention is accepted: (-1, -1), or any bound >= the key length, is no
window, and (-1, 0) is bottom-right causal (see _window_causal). Arguments of the wrong
type (dropout_p / softcap / softmax_scale not a float, window_size not a pair of ints) raise a
TypeError naming the argument; a softmax_scale that is not finite and positive, a ValueError. With return_attn_probs
the attention probabilities are not materialised (the third element is None), as flash_attn
returns them only for testing with dropout. softmax_lse is float32 (B, H, Sq), or (H, total_q) from
the varlen functions, as flash_attn 2.x's; one deliberate difference: a query row that sees no key
(bottom-right causal with Sq > Sk, an empty key sequence) has output 0 and lse -inf, the log of an
empty sum, where flash_attn's kernels write +inf. Code merging partial results by their lse (ring
attention, split KV) gives those rows weight 0 with -inf; code written for flash_attn maps its +inf
to -inf first, which leaves attnlib's value unchanged.

deterministic passes through as attnlib.flash_attention's option, with flash_attn's default
False: a graph-building fp16/bf16 call on a GPU then runs torch's SDPA (cuDNN) forward and
backward, measured the fastest (see attnlib/kernels/flash_sdpa.py), whose backward, like
flash_attn's by default, is not bit-reproducible; deterministic=True keeps attnlib's
deterministic kernels.
"""
from __future__ import annotations

import numbers

import torch

from .. import api, varlen
from ..inputs import FLOAT32_TINY, SCALE_MAX, check_dense, is_real_number, scale_in_range


def _check_float(name: str, value) -> float:
    """flash_attn takes these as Python floats (its op schema says float): no bool, no tensor."""
    if not is_real_number(value):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    return float(value)


def _check_unsupported(dropout_p, window_size, softcap, alibi_slopes, softmax_scale=None, *, causal=False,
                       seqlen_k=None, seqlen_q=None):
    """Refuse what attnlib does not compute; return the causal flag, window_size folded in.
    seqlen_k, seqlen_q: the (longest) key and query lengths, None when unknown."""
    p = _check_float("dropout_p", dropout_p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1], got {dropout_p}")
    if p:
        raise ValueError(f"dropout_p={dropout_p}: attnlib's flash_attn compatibility does not implement "
                         "attention dropout; use dropout_p=0.0 (inference) or torch SDPA")
    causal = _window_causal(window_size, causal, seqlen_k, seqlen_q)
    if _check_float("softcap", softcap) > 0:  # flash_attn: softcap <= 0 switches capping off
        raise ValueError(f"softcap={softcap}: logit soft-capping is not supported")
    if alibi_slopes is not None:
        raise ValueError("alibi_slopes: ALiBi is not supported")
    if softmax_scale is not None:
        scale = _check_float("softmax_scale", softmax_scale)
        if not scale_in_range(scale):  # inputs.check_scale's rule, under this argument's name
            raise ValueError(f"softmax_scale must be finite and positive, between float32's smallest normal "
                             f"({FLOAT32_TINY:.4g}) and {SCALE_MAX:.4g} (attnlib's kernels scale scores in "
                             f"float32), got {softmax_scale}")
    return causal


def _window_causal(window_size, causal, seqlen_k, seqlen_q=None):
    """The causal flag equivalent to flash_attn's window (left, right), or a ValueError for a
    genuinely local window. flash_attn lets query i see keys i + Sk - Sq - left .. i + Sk - Sq + right;
    a negative bound is unbounded, and causal means right = 0. A bound that cuts no key is
    unbounded too: left >= Sk - 1 (even the last query's lower edge is at or below key 0) and
    right >= Sq - 1 (even the first query's upper edge is at or past the last key); flash_attn's
    C++ entry points drop bounds >= Sk, and transformers passes a model's sliding window also for
    sequences shorter than it. So an unbounded pair is full attention, (unbounded, 0) bottom-right
    causal."""
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or any(isinstance(w, bool) or not isinstance(w, numbers.Integral) for w in window_size)):
        raise TypeError(f"window_size must be a pair of ints (left, right), -1 meaning unbounded, "
                        f"got {window_size!r}")
    left, right = (int(w) for w in window_size)

    def unbounded(w, length):
        # cuts no key within length, or (flash_attn's rule) a bound of at least seqlen_k, which its
        # kernels treat as -1
        return (w < 0 or (length is not None and w >= max(length - 1, 0))
                or (seqlen_k is not None and w >= seqlen_k))

    if causal is True:
        right = 0
    if unbounded(left, seqlen_k) and unbounded(right, seqlen_q):
        return causal
    if unbounded(left, seqlen_k) and right == 0:
        return True
    keys = "" if seqlen_k is None else f" over {seqlen_k} keys"
    raise ValueError(f"window_size={tuple(window_size)} (causal={causal}){keys} is a sliding-window (local) attention, "
                     "and attnlib has no sliding-window kernels; only windows equivalent to full attention "
                     "((-1, -1)) or bottom-right causal ((-1, 0)) are supported")


def _seqlen(x, axis: int):
    """x.shape[axis] where x is a tensor that has that axis (flash_attn's seqlen_k), else None: the
    shape checks further on then name the argument."""
    return x.shape[axis] if isinstance(x, torch.Tensor) and x.dim() > axis else None


def _max_seqlen(name: str, value):
    """flash_attn's max_seqlen_q/k as attnlib's int. flash_attn converts the argument with
    __index__, so callers pass numpy ints and one-element integer tensors too (transformers'
    prepare_fa2_from_position_ids passes cu_seqlens.diff().max(), a 0-d tensor); those become
    Python ints here. Anything else (Python ints, SymInts under torch.compile, wrong types)
    goes to attnlib unchanged, which checks it."""
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_floating_point() or value.is_complex() or value.numel() != 1:
            raise TypeError(f"{name} must be an int (or a one-element integer tensor), got a tensor of "
                            f"dtype {value.dtype} and shape {tuple(value.shape)}")
        return int(value.item())
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, int)):
        return int(value)  # numpy integers
    return value


def _scale(softmax_scale):
    return None if softmax_scale is None else float(softmax_scale)  # numpy floats as flash_attn takes them


def _result(res, return_attn_probs):
    if return_attn_probs:
        out, lse = res
        return out, lse, None
    return res


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (B, Sq, H, D), k/v (B, Sk, Hkv, D) -> out (B, Sq, H, D) [, lse (B, H, Sq), None]."""
    causal = _check_unsupported(dropout_p, window_size, softcap, alibi_slopes, softmax_scale, causal=causal,
                                seqlen_k=_seqlen(k, 1), seqlen_q=_seqlen(q, 1))
    res = api.flash_attention(q, k, v, causal=causal, scale=_scale(softmax_scale), layout="bshd",
                              return_lse=bool(return_attn_probs), deterministic=deterministic)
    return _result(res, return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """qkv (B, S, 3, H, D)."""
    _check_packed("qkv", qkv, 3)
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal,
                           window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (B, Sq, H, D), kv (B, Sk, 2, Hkv, D)."""
    _check_packed("kv", kv, 2)
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size,
                           softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                           alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
    """Packed (total_tokens, heads, head_dim) sequences delimited by int32 cu_seqlens."""
    max_seqlen_q, max_seqlen_k = _max_seqlen("max_seqlen_q", max_seqlen_q), _max_seqlen("max_seqlen_k", max_seqlen_k)
    causal = _check_unsupported(dropout_p, window_size, softcap, alibi_slopes, softmax_scale, causal=causal,
                                seqlen_k=max_seqlen_k if isinstance(max_seqlen_k, int) else None,
                                seqlen_q=max_seqlen_q if isinstance(max_seqlen_q, int) else None)
    if block_table is not None:
        raise ValueError("block_table: flash_attn_varlen_func's paged KV cache is not supported "
                         "(flash_attn_with_kvcache takes one)")
    res = varlen.flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                        causal=causal, scale=_scale(softmax_scale),
                                        return_lse=bool(return_attn_probs), deterministic=deterministic)
    return _result(res, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """qkv (total, 3, H, D); one cu_seqlens and max_seqlen for queries and keys."""
    _check_packed("qkv", qkv, 3, varlen=True)
    return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                  deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (total_q, H, D), kv (total_k, 2, Hkv, D)."""
    _check_packed("kv", kv, 2, varlen=True)
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                  deterministic, return_attn_probs)


def _check_packed(name, x, n, varlen=False):
    """x stacks n tensors on the axis after the token axes: (B, S, n, H, D), or (total, n, H, D) for varlen."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    check_dense(name, x)
    axis, tokens = (1, "total_tokens") if varlen else (2, "batch, seq")
    if x.dim() != axis + 3 or x.shape[axis] != n:
        raise ValueError(f"{name} must have shape ({tokens}, {n}, heads, head_dim), got {tuple(x.shape)}")


# below the checks it builds on: flash_attn_kvcache imports them from this module
from .flash_attn_kvcache import flash_attn_with_kvcache  # noqa: E402

__all__ = ["flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func", "flash_attn_with_kvcache"]
