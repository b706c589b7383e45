"""flash_attn_with_kvcache on attnlib: append new keys/values to a KV cache in place (contiguous
or paged), optionally rotary-embedded, then attend each batch row's valid keys.

Each call gathers every row's valid keys into one packed (total_k, Hk, D) copy and runs
attnlib.flash_attention_varlen over it: one kernel launch whatever the lengths, at the cost of a
copy of the keys attended. The lengths, cache_batch_idx and block_table are read on the host
(a synchronisation on the GPU, where flash_attn reads them on the device): the packed size
depends on them, and it lets every index be checked before anything is written. As with
flash_attn there is no backward: the call runs under torch.no_grad().
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional

import torch

from .. import varlen
from ..dispatch import effective_backend
from ..inputs import FLOAT_DTYPES, check_dense, check_scale, type_name
from .flash_attn import _check_unsupported, _scale


@dataclass(frozen=True)
class _CacheLayout:
    """Where position t of batch row b lives: k_cache[rows[b], t] in a contiguous cache,
    k_cache[table[b, t // page], t % page] in a paged one. rows/table are on the host."""
    rows: Optional[torch.Tensor]
    table: Optional[torch.Tensor]
    page: int
    capacity: int  # positions a batch row can hold (flash_attn's seqlen_k)
    blocks: int  # k_cache.shape[0]: cache rows, or pages

    def slots(self, b: torch.Tensor, t: torch.Tensor):
        if self.table is None:
            return self.rows[b], t
        return self.table[b, torch.div(t, self.page, rounding_mode="floor")], t % self.page


def _tensor(name, x, dims, dtype=None):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    check_dense(name, x)
    if x.dim() != len(dims):
        raise ValueError(f"{name} must have shape ({', '.join(dims)}), got {tuple(x.shape)}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {x.dtype}")
    return x


def _same_device(q, **tensors):
    for name, t in tensors.items():
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")


def _check_tensors(q, k_cache, v_cache, k, v) -> None:
    _tensor("q", q, ("batch", "seqlen_q", "heads", "head_dim"))
    cache_dims = ("batch_cache or num_blocks", "seqlen_cache or page_block_size", "heads_k", "head_dim")
    _tensor("k_cache", k_cache, cache_dims)
    _tensor("v_cache", v_cache, cache_dims)
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    if q.shape[0] == 0:
        raise ValueError("q must hold at least one batch row")
    if (k is None) != (v is None):
        raise ValueError("k and v: pass both new keys and new values to append, or neither")
    new = {} if k is None else {"k": _tensor("k", k, ("batch", "seqlen_new", "heads_k", "head_dim")),
                                "v": _tensor("v", v, ("batch", "seqlen_new", "heads_k", "head_dim"))}
    for name, t in {"k_cache": k_cache, "v_cache": v_cache, **new}.items():
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    _same_device(q, k_cache=k_cache, v_cache=v_cache, **new)
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    heads_k, dim = k_cache.shape[2], k_cache.shape[3]
    if q.shape[3] != dim or dim == 0:
        raise ValueError(f"q and k_cache must share a positive head_dim, got {q.shape[3]} and {dim}")
    if heads_k == 0 or q.shape[2] % heads_k:
        raise ValueError(f"q's heads ({q.shape[2]}) must be a multiple of k_cache's heads ({heads_k})")
    for name, t in new.items():
        if t.shape[0] != q.shape[0] or t.shape[2:] != k_cache.shape[2:] or t.shape != k.shape:
            raise ValueError(f"{name} must have shape (batch={q.shape[0]}, seqlen_new, heads_k={heads_k}, "
                             f"head_dim={dim}), the same for k and v; got k {tuple(k.shape)}, v {tuple(v.shape)}")


def _layout(q, k_cache, cache_batch_idx, block_table) -> _CacheLayout:
    batch = q.shape[0]
    if block_table is None:
        rows = torch.arange(batch, device="cpu")
        if cache_batch_idx is not None:
            rows = _tensor("cache_batch_idx", cache_batch_idx, ("batch",), torch.int32)
            _same_device(q, cache_batch_idx=rows)
            rows = rows.cpu().long()
        if rows.shape[0] != batch:
            raise ValueError(f"cache_batch_idx must have shape (batch={batch},), got {tuple(rows.shape)}")
        if rows.numel() and not (0 <= int(rows.min()) and int(rows.max()) < k_cache.shape[0]):
            raise ValueError(f"{'cache_batch_idx' if cache_batch_idx is not None else 'k_cache'}: batch rows "
                             f"{rows.tolist()} must index k_cache's {k_cache.shape[0]} rows")
        return _CacheLayout(rows, None, 1, k_cache.shape[1], k_cache.shape[0])
    if cache_batch_idx is not None:
        raise ValueError("cache_batch_idx: a paged KV cache (block_table given) takes no cache_batch_idx, "
                         "as in flash_attn; put the mapping in block_table")
    table = _tensor("block_table", block_table, ("batch", "max_blocks_per_seq"), torch.int32)
    _same_device(q, block_table=table)
    if table.shape[0] != batch:
        raise ValueError(f"block_table must have shape (batch={batch}, max_blocks_per_seq), got {tuple(table.shape)}")
    page = k_cache.shape[1]
    if page == 0:
        raise ValueError("k_cache: a paged cache's page_block_size (dim 1) must be positive")
    return _CacheLayout(None, table.cpu().long(), page, table.shape[1] * page, k_cache.shape[0])


def _cache_lengths(cache_seqlens, q, layout: _CacheLayout, new_tokens: int) -> torch.Tensor:
    """Each batch row's cache length before the append, on the host, checked against the capacity."""
    batch = q.shape[0]
    if cache_seqlens is None:
        if new_tokens:
            raise ValueError("cache_seqlens: appending k/v needs cache_seqlens (None means every row's cache "
                             f"is full, {layout.capacity} positions)")
        lengths = torch.full((batch,), layout.capacity, device="cpu")
    elif isinstance(cache_seqlens, numbers.Integral) and not isinstance(cache_seqlens, bool):
        lengths = torch.full((batch,), int(cache_seqlens), device="cpu")
    elif isinstance(cache_seqlens, torch.Tensor):
        _tensor("cache_seqlens", cache_seqlens, ("batch",), torch.int32)
        _same_device(q, cache_seqlens=cache_seqlens)
        if cache_seqlens.shape[0] != batch:
            raise ValueError(f"cache_seqlens must have shape (batch={batch},), got {tuple(cache_seqlens.shape)}")
        lengths = cache_seqlens.cpu().long()
    else:
        raise TypeError(f"cache_seqlens must be None, an int or an int32 tensor, got {type(cache_seqlens).__name__}")
    if bool((lengths < 0).any()) or bool((lengths + new_tokens > layout.capacity).any()):
        raise ValueError(f"cache_seqlens {lengths.tolist()} + {new_tokens} new tokens must lie in "
                         f"[0, {layout.capacity}], the positions a cache row holds")
    if layout.table is not None:  # the pages a row reads must exist; the rest of its table is not read
        pages = torch.div(lengths + new_tokens + layout.page - 1, layout.page, rounding_mode="floor")
        used = layout.table[torch.arange(layout.table.shape[1], device="cpu") < pages[:, None]]
        if used.numel() and not (0 <= int(used.min()) and int(used.max()) < layout.blocks):
            raise ValueError(f"block_table: the blocks rows read must index k_cache's {layout.blocks} "
                             f"blocks, got values {sorted(set(used.tolist()))}")
    return lengths


def _check_rotary(rotary_cos, rotary_sin, q, k, *positions: torch.Tensor) -> None:
    """positions: the (host) positions this call rotates, which rotary_cos must cover."""
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin: pass both or neither")
    if rotary_cos is None:
        return
    if k is None:
        raise ValueError("rotary_cos: rotary embedding applies to appended keys; pass k and v too (as flash_attn)")
    for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        _tensor(name, t, ("seqlen_ro", "rotary_dim / 2"))
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    _same_device(q, rotary_cos=rotary_cos, rotary_sin=rotary_sin)
    if rotary_sin.shape != rotary_cos.shape:
        raise ValueError(f"rotary_sin must have rotary_cos's shape {tuple(rotary_cos.shape)}, "
                         f"got {tuple(rotary_sin.shape)}")
    if not 0 < 2 * rotary_cos.shape[1] <= q.shape[3]:
        raise ValueError(f"rotary_cos: rotary_dim = 2 * {rotary_cos.shape[1]} must lie in [2, head_dim={q.shape[3]}]")
    last = max((int(p.max()) for p in positions if p.numel()), default=-1)
    if rotary_cos.shape[0] <= last:
        raise ValueError(f"rotary_cos: {rotary_cos.shape[0]} positions, but this call rotates positions up to {last}")


def _rotate(x, cos, sin, interleaved: bool):
    """Rotary embedding of x (..., D) on its first 2 * cos.shape[-1] channels; cos/sin broadcast
    against (..., rotary_dim / 2). interleaved pairs channels (0, 1), (2, 3), ... (GPT-J); otherwise
    (i, i + rotary_dim / 2) (GPT-NeoX). Computed in float32 (float64 for float64), as flash_attn."""
    rot = 2 * cos.shape[-1]
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    xr, cos, sin = x[..., :rot].to(ct), cos.to(ct), sin.to(ct)
    x1, x2 = (xr[..., 0::2], xr[..., 1::2]) if interleaved else xr.chunk(2, dim=-1)
    y1, y2 = x1 * cos - x2 * sin, x1 * sin + x2 * cos
    y = torch.stack((y1, y2), dim=-1).flatten(-2) if interleaved else torch.cat((y1, y2), dim=-1)
    return torch.cat((y.to(x.dtype), x[..., rot:]), dim=-1)


def _positions(lengths: torch.Tensor, count: int, same: bool = False) -> torch.Tensor:
    """(B, count) positions lengths[b] + j, or lengths[b] for every j when same."""
    steps = torch.zeros(count, dtype=torch.long, device="cpu") if same else torch.arange(count, device="cpu")
    return lengths[:, None] + steps


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """q (B, Sq, H, D) on a cache k_cache/v_cache (B_cache, S_cache, Hk, D), or paged
    (num_blocks, page_block_size, Hk, D) with block_table (B, max_blocks_per_seq) int32.

    k, v (B, S_new, Hk, D) are written into the cache in place at positions cache_seqlens[b] ..
    cache_seqlens[b] + S_new - 1 (cache_seqlens: int or (B,) int32; None: every row full), after
    rotary embedding of k when rotary_cos/rotary_sin (S_ro, rotary_dim / 2) are given; q is rotated
    at the same positions if causal or local (a window_size bound below the cache's capacity,
    as flash_attn decides it), else all at position cache_seqlens[b] (flash_attn's rule).
    Row b then attends to its first cache_seqlens[b] + S_new keys, causal bottom-right aligned.
    cache_batch_idx (B,) int32 picks each row's cache row. num_splits is a performance hint,
    ignored. Returns out (B, Sq, H, D) [, softmax_lse (B, H, Sq) float32 (float64 for
    float64 inputs); -inf where a query sees no key].

    Refused with a ValueError: cache_leftpad, softcap > 0, alibi_slopes, local windows, and
    cache_batch_idx with block_table (as flash_attn).
    """
    _check_tensors(q, k_cache, v_cache, k, v)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type_name(causal)}")
    layout = _layout(q, k_cache, cache_batch_idx, block_table)
    causal = _check_unsupported(0.0, window_size, softcap, alibi_slopes, softmax_scale, causal=causal,
                                seqlen_k=layout.capacity, seqlen_q=q.shape[1])
    if cache_leftpad is not None:
        raise ValueError("cache_leftpad: left-padded KV caches are not supported; shift each row's keys to "
                         "position 0 and pass its length in cache_seqlens")
    if isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral) or num_splits < 0:
        raise TypeError(f"num_splits must be a non-negative int, got {num_splits!r}")
    new_tokens = 0 if k is None else k.shape[1]
    lengths = _cache_lengths(cache_seqlens, q, layout, new_tokens)
    # flash_attn rotates q at consecutive positions when causal or local: a window bound below its
    # seqlen_k (the cache's capacity), even one that cuts no key and so runs as full attention here
    local = any(0 <= int(w) < layout.capacity for w in window_size)
    q_positions = _positions(lengths, q.shape[1], same=not (causal or local))
    _check_rotary(rotary_cos, rotary_sin, q, k, q_positions, _positions(lengths, new_tokens))
    _check_backend(q, k_cache, v_cache, causal, softmax_scale)  # before the cache is written
    with torch.no_grad():
        if k is not None:
            _append(k_cache, v_cache, k, v, layout, lengths, rotary_cos, rotary_sin, rotary_interleaved)
        if rotary_cos is not None:
            pos = q_positions.to(q.device)
            q = _rotate(q, rotary_cos[pos].unsqueeze(2), rotary_sin[pos].unsqueeze(2), rotary_interleaved)
        return _attend(q, k_cache, v_cache, layout, lengths + new_tokens, causal, softmax_scale,
                       bool(return_softmax_lse))


def _check_backend(q, k_cache, v_cache, causal: bool, softmax_scale) -> None:
    """The NoKernelError _attend would raise for a backend that cannot run the call (use_backend,
    ATTNLIB_BACKEND), raised before anything is written: the kernels' reasons depend on dtypes,
    devices, head counts and dims, which one-row stand-ins carry. "auto" never raises there (it
    falls back to torch), so the decode path then skips this."""
    if effective_backend("auto") == "auto":
        return
    if any(t.shape[0] == 0 or t.shape[1] == 0 for t in (q, k_cache, v_cache)):
        return  # nothing to attend with or to: _attend's own checks speak

    def row(t):  # one (1, heads, dim) row, copied (a reshape of a strided cache would copy it whole)
        return t[0, 0].unsqueeze(0).contiguous()

    batch_slots = torch.empty(q.shape[0] + 1, dtype=torch.int32, device="cpu")
    scale = check_scale(_scale(softmax_scale), q.shape[-1])
    varlen._pick_backend("auto", row(q), row(k_cache), row(v_cache), batch_slots, causal, scale)


def _append(k_cache, v_cache, k, v, layout: _CacheLayout, lengths, rotary_cos, rotary_sin, interleaved) -> None:
    batch, new_tokens = k.shape[:2]
    positions = _positions(lengths, new_tokens)
    rows = torch.arange(batch, device="cpu")[:, None].expand_as(positions)
    i0, i1 = (i.to(k_cache.device) for i in layout.slots(rows, positions))
    if rotary_cos is not None:
        pos = positions.to(k.device)
        k = _rotate(k, rotary_cos[pos].unsqueeze(2), rotary_sin[pos].unsqueeze(2), interleaved)
    k_cache[i0, i1] = k
    v_cache[i0, i1] = v


def _attend(q, k_cache, v_cache, layout: _CacheLayout, key_lengths, causal, softmax_scale, return_lse):
    batch, seq_q, heads, dim = q.shape
    total = int(key_lengths.sum())
    rows = torch.repeat_interleave(torch.arange(batch, device="cpu"), key_lengths, output_size=total)
    starts = torch.cumsum(key_lengths, 0) - key_lengths
    positions = torch.arange(total, device="cpu") - starts[rows]
    i0, i1 = (i.to(k_cache.device) for i in layout.slots(rows, positions))
    device = q.device
    cu_k = torch.cat([key_lengths.new_zeros(1), torch.cumsum(key_lengths, 0)]).to(device, torch.int32)
    cu_q = (torch.arange(batch + 1, device="cpu") * seq_q).to(device, torch.int32)
    # cu_q / cu_k come from host lengths checked in _cache_lengths: varlen need not read them back
    out, lse = varlen.packed_attention(q.reshape(batch * seq_q, heads, dim), k_cache[i0, i1], v_cache[i0, i1],
                                       cu_q, cu_k, seq_q, int(key_lengths.max()), causal=causal,
                                       scale=_scale(softmax_scale), return_lse=True, backend="auto",
                                       deterministic=True, host_checked=True)
    out = out.view(batch, seq_q, heads, dim)
    if not return_lse:
        return out
    return out, lse.view(heads, batch, seq_q).permute(1, 0, 2).contiguous()
