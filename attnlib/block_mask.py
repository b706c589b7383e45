"""Block-mask formats for method block_sparse: the canonical bool block mask, the row index form
the kernels walk (FlexAttention's ``kv_num_blocks`` / ``kv_indices``), its transpose for the
dK/dV pass, token-mask reduction, and conversion to torch's FlexAttention ``BlockMask``.

The canonical mask is bool (B or 1, H or 1, ceil(Sq/bq), ceil(Sk/bk)); True = the (query block,
key block) pair is computed. The row index form lists, per query block, the allowed key blocks
in ascending order: ``kv_num_blocks`` (B, H, Mq) int32 and ``kv_indices`` (B, H, Mq, Mk) int32,
of which the first ``kv_num_blocks`` entries of each row are meaningful (the rest hold the
row's unlisted blocks, also ascending, and are never read). Broadcast dims (size 1) stay size 1.
"""
from __future__ import annotations

import operator
import os
import threading
import weakref
from collections import OrderedDict
from typing import Any, Optional

import torch

from .inputs import check_block_size, type_name
from .reference._common import num_blocks


def flex_block_mask_hint(obj: Any) -> str:
    """The tail of a "must be a bool torch.Tensor" error when obj is torch's FlexAttention
    BlockMask: how to convert it (nothing else: empty)."""
    cls = type(obj)
    if cls.__name__ != "BlockMask" or "flex_attention" not in cls.__module__:
        return ""
    return (": torch's FlexAttention BlockMask is not taken directly, convert it with "
            "attnlib.block_mask_from_flex(block_mask) and pass block_size=block_mask.BLOCK_SIZE")


def _check_bool_mask(block_mask: Any, name: str = "block_mask") -> torch.Tensor:
    if not isinstance(block_mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor, got {type(block_mask).__name__}"
                        + flex_block_mask_hint(block_mask))
    if block_mask.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool, got {block_mask.dtype}")
    if block_mask.dim() != 4:
        raise ValueError(f"{name} must be 4-D (B or 1, H or 1, query blocks, key blocks), "
                         f"got shape {tuple(block_mask.shape)}")
    return block_mask


def block_mask_to_index(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool (B, H, Mq, Mk) -> (kv_num_blocks (B, H, Mq) int32, kv_indices (B, H, Mq, Mk) int32),
    the allowed key blocks of each query block first, ascending. One sort over the mask: work is
    O(mask size), independent of the sequence length beyond it."""
    m = _check_bool_mask(block_mask)
    kv_num_blocks = m.sum(dim=-1, dtype=torch.int32)
    # stable sort of "not allowed" (0 before 1) lists allowed blocks first, each group ascending
    kv_indices = torch.sort((~m).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32)
    return kv_num_blocks.contiguous(), kv_indices.contiguous()


def block_mask_to_col_index(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The transposed (column) form for dK/dV: (q_num_blocks (B, H, Mk) int32, q_indices
    (B, H, Mk, Mq) int32), the query blocks that read each key block, ascending."""
    return block_mask_to_index(_check_bool_mask(block_mask).transpose(-1, -2))


class IndexCache:
    """The index forms of recently used masks, so a mask reused across layers, diffusion steps and
    the backward is sorted once. An entry belongs to one mask tensor object (held by a weak
    reference, so a freed mask's memory reused by another never hits) and to its version counter
    (``mask._version``). An in-place write by a torch op on the mask, on a view of it or on
    ``mask.detach()`` (``mask[i] = x``, ``mask.copy_(other)``, ``mask.fill_(x)``, ``out=mask``)
    bumps that counter, so the next call misses and sorts again. Masks made under
    torch.inference_mode have no version counter, so a write could not be seen: they are never
    cached. Nor is anything during a CUDA graph capture: the sort must be captured, or a replay
    with a new mask copied into the graph's input would walk the old index forms. Bounded (least
    recently used out); thread-safe.

    Not seen: a write that bypasses the version counter -- through ``mask.data`` (a tensor with a
    counter of its own), a NumPy array sharing the memory (``mask.numpy()``, or the array behind
    a mask made by ``torch.from_numpy``), another library's view of it through DLPack, or a custom
    CUDA / Triton kernel writing into the mask's memory. The next call then silently uses the
    index forms of the mask's old content. Comparing contents on every call would cost a device
    sync per call, so the cache does not. After such a write, pass a new mask tensor, call
    ``attnlib.block_mask.INDEX_CACHE.clear()``, or run with ``ATTNLIB_BLOCK_INDEX_CACHE=0``
    (every call sorts its mask)."""

    def __init__(self, capacity: int = 16) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[int, tuple] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @staticmethod
    def enabled() -> bool:
        return os.environ.get("ATTNLIB_BLOCK_INDEX_CACHE", "1") != "0"

    def get(self, mask: torch.Tensor, which: str, build) -> tuple[torch.Tensor, torch.Tensor]:
        """build(mask) once per (mask object, version, which)."""
        if not self.enabled() or mask.is_inference() or _tracing(mask) or _capturing(mask):
            return build(mask)
        key = (id(mask), which)
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and hit[0]() is mask and hit[1] == mask._version:
                self._entries.move_to_end(key)
                self.hits += 1
                return hit[2]
        value = build(mask)
        with self._lock:
            self.misses += 1
            self._entries[key] = (weakref.ref(mask), mask._version, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.hits = self.misses = 0


def _tracing(t: torch.Tensor) -> bool:
    """Fake or functional tensors (tracing under torch.compile) have no data to cache."""
    try:
        from torch._subclasses.fake_tensor import is_fake

        return is_fake(t) or torch._C._functorch.is_functorch_wrapped_tensor(t) or t.device.type == "meta"
    except Exception:  # noqa: BLE001 - private APIs: never cache when unsure
        return True


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


INDEX_CACHE = IndexCache()


def cached_row_index(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`block_mask_to_index` through :data:`INDEX_CACHE` (the kernels' entry point)."""
    return INDEX_CACHE.get(_check_bool_mask(block_mask), "row", block_mask_to_index)


def cached_col_index(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`block_mask_to_col_index` through :data:`INDEX_CACHE`."""
    return INDEX_CACHE.get(_check_bool_mask(block_mask), "col", block_mask_to_col_index)


def index_to_block_mask(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
                        num_key_blocks: Optional[int] = None) -> torch.Tensor:
    """Inverse of :func:`block_mask_to_index`: bool (B, H, Mq, Mk), Mk = num_key_blocks or
    kv_indices.shape[-1]. The first kv_num_blocks entries of each row must be distinct key
    blocks in [0, Mk), in any order (ValueError otherwise: FlexAttention would attend a key
    block listed twice twice, which no bool mask expresses); the other slots are never read."""
    for name, t, dim in (("kv_num_blocks", kv_num_blocks, 3), ("kv_indices", kv_indices, 4)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be int32 (or int64), got {t.dtype}")
        if t.dim() != dim:
            raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if tuple(kv_indices.shape[:3]) != tuple(kv_num_blocks.shape):
        raise ValueError(f"kv_indices {tuple(kv_indices.shape)} and kv_num_blocks {tuple(kv_num_blocks.shape)} "
                         "must agree on (B, H, Mq)")
    if num_key_blocks is not None:
        if isinstance(num_key_blocks, bool) or not hasattr(num_key_blocks, "__index__"):
            raise TypeError(f"num_key_blocks must be an int or None, got {type(num_key_blocks).__name__}")
        num_key_blocks = operator.index(num_key_blocks)
        if num_key_blocks < 0:
            raise ValueError(f"num_key_blocks must be >= 0, got {num_key_blocks}")
    if kv_indices.device != kv_num_blocks.device:
        raise ValueError(f"kv_num_blocks ({kv_num_blocks.device}) and kv_indices ({kv_indices.device}) "
                         "must be on one device")
    mk = kv_indices.shape[-1] if num_key_blocks is None else num_key_blocks
    slots = kv_indices.shape[-1]
    # a user-facing converter (no kernel calls it), so the host syncs of these checks are fine
    if kv_num_blocks.numel() and bool(((kv_num_blocks < 0) | (kv_num_blocks > slots)).any()):
        raise ValueError(f"kv_num_blocks must lie in [0, {slots}] (the kv_indices slots), got values in "
                         f"[{int(kv_num_blocks.min())}, {int(kv_num_blocks.max())}]")
    listed = torch.arange(slots, device=kv_indices.device) < kv_num_blocks[..., None]
    bad = listed & ((kv_indices < 0) | (kv_indices >= mk))
    if bool(bad.any()):
        where = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(f"kv_indices must list key blocks in [0, {mk}) (num_key_blocks), got "
                         f"{int(kv_indices[where])} at {where}")
    if kv_num_blocks.numel() and bool((kv_num_blocks > mk).any()):
        # in range yet more than mk of them: some key block is listed twice
        where = tuple(int(i) for i in torch.nonzero(kv_num_blocks > mk)[0])
        raise ValueError(f"kv_num_blocks must be at most {mk} (num_key_blocks), got {int(kv_num_blocks[where])} "
                         f"at {where}")
    # unlisted slots go to a spare column that is cut off
    idx = torch.where(listed, kv_indices.long(), torch.full_like(kv_indices, mk, dtype=torch.long))
    count = torch.zeros(*kv_indices.shape[:3], mk + 1, dtype=torch.int32, device=kv_indices.device)
    count.scatter_add_(-1, idx, listed.to(torch.int32))
    twice = count[..., :mk] > 1
    if bool(twice.any()):
        # FlexAttention would visit such a block twice (its keys counted twice in the softmax);
        # a bool mask cannot say that, so the form is refused rather than silently deduplicated
        where = tuple(int(i) for i in torch.nonzero(twice)[0])
        raise ValueError(f"kv_indices must list each key block at most once per row, got key block {where[3]} "
                         f"{int(count[where])} times in row {where[:3]}")
    return count[..., :mk] > 0


def block_mask_from_token_mask(mask: torch.Tensor, block_size=(64, 64)) -> torch.Tensor:
    """Token mask (Sq, Sk) or (B or 1, H or 1, Sq, Sk), True = visible -> the canonical bool
    block mask (B or 1, H or 1, ceil(Sq/bq), ceil(Sk/bk)): a block is on if any pair in it is on."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a bool torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must have dtype torch.bool, got {mask.dtype}")
    if mask.dim() == 2:
        mask = mask[None, None]
    if mask.dim() != 4:
        raise ValueError(f"mask must be 2-D (Sq, Sk) or 4-D (B, H, Sq, Sk), got shape {tuple(mask.shape)}")
    bq, bk = check_block_size(block_size)
    b, h, sq, sk = mask.shape
    mq, mk = num_blocks(sq, bq), num_blocks(sk, bk)
    padded = mask.new_zeros(b, h, mq * bq, mk * bk)
    padded[..., :sq, :sk] = mask
    return padded.view(b, h, mq, bq, mk, bk).any(dim=5).any(dim=3)


def to_flex_block_mask(block_mask: torch.Tensor, block_size=(64, 64), *, seq_q: int, seq_k: int,
                       causal: bool = False):
    """The same sparsity as torch's FlexAttention ``BlockMask`` (for flex_attention, or to
    compare with it). Listed blocks wholly visible are flex's "full" blocks; with causal, blocks
    cut by the bottom-right diagonal (key j visible to query i iff j <= i + seq_k - seq_q) are
    partial, masked per element by the mask_mod, which also carries the block mask for
    flex's unfused (eager) path."""
    try:
        from torch.nn.attention.flex_attention import BlockMask
    except ImportError as e:  # pragma: no cover - old torch
        raise RuntimeError("to_flex_block_mask needs torch.nn.attention.flex_attention (torch >= 2.5)") from e
    m = _check_bool_mask(block_mask)
    bq, bk = check_block_size(block_size)
    for name, n in (("seq_q", seq_q), ("seq_k", seq_k)):
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"{name} must be an int, got {type(n).__name__}")
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type_name(causal)}")
    if m.shape[-2:] != (num_blocks(seq_q, bq), num_blocks(seq_k, bk)):
        raise ValueError(f"block_mask's last dims {tuple(m.shape[-2:])} do not match seq_q={seq_q}, seq_k={seq_k} "
                         f"with block_size={(bq, bk)}")
    bb, bh = int(m.shape[0] > 1), int(m.shape[1] > 1)
    diag = seq_k - seq_q

    empty = m.numel() == 0  # seq_q or seq_k is 0

    def mask_mod(b, h, q_idx, kv_idx):
        if empty:  # no (query, key) pair exists; vmap would still index the empty mask once
            return q_idx < 0
        keep = m[b * bb, h * bh, q_idx // bq, kv_idx // bk]
        return (keep & (kv_idx <= q_idx + diag)) if causal else keep

    # listed blocks that need no per-element mask are "full" (compiled flex skips mask_mod there)
    full = m
    if causal:
        qi = torch.arange(m.shape[-2], device=m.device)[:, None]
        kj = torch.arange(m.shape[-1], device=m.device)[None, :]
        full = m & ((kj + 1) * bk - 1 <= qi * bq + diag)
        partial = m & ~full & (kj * bk <= torch.clamp((qi + 1) * bq - 1, max=seq_q - 1) + diag)
    else:
        partial = torch.zeros_like(m)
    num, idx = block_mask_to_index(partial)
    full_num, full_idx = block_mask_to_index(full)
    return BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=(bq, bk), mask_mod=mask_mod,
                                    seq_lengths=(seq_q, seq_k))


def block_mask_from_flex(block_mask) -> torch.Tensor:
    """torch's FlexAttention ``BlockMask`` -> the canonical bool block mask (B or 1, H or 1,
    ceil(Sq/bq), ceil(Sk/bk)) with (bq, bk) = ``block_mask.BLOCK_SIZE``: a pair is on where flex
    lists it, as a partial block (``kv_num_blocks`` / ``kv_indices``) or a full one
    (``full_kv_num_blocks`` / ``full_kv_indices``). Pass ``block_size=block_mask.BLOCK_SIZE``
    with it to block_sparse_attention.

    Block level only: the ``mask_mod`` that flex applies per element inside partial blocks is not
    carried (a bool block mask computes every pair of a listed block). For a causal flex mask pass
    ``causal=True`` as well; other element-level masks have no block_sparse equivalent. A key
    block listed twice in a row (also once partial and once full) is a ValueError, as in
    :func:`index_to_block_mask`."""
    try:
        from torch.nn.attention.flex_attention import BlockMask
    except ImportError as e:  # pragma: no cover - old torch
        raise RuntimeError("block_mask_from_flex needs torch.nn.attention.flex_attention (torch >= 2.5)") from e
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be a torch.nn.attention.flex_attention.BlockMask, got "
                        f"{type(block_mask).__name__}")
    size = block_mask.BLOCK_SIZE
    bq, bk = (size, size) if isinstance(size, int) else size
    num, idx = block_mask.kv_num_blocks, block_mask.kv_indices
    rows, slots = num.shape[-1], idx.shape[-1]
    seq = getattr(block_mask, "seq_lengths", None)
    mq, mk = (rows, slots) if seq is None else (num_blocks(seq[0], bq), num_blocks(seq[1], bk))
    width = max(slots, mk)  # key blocks past the keys (a padded flex mask) are cut below
    partial = index_to_block_mask(num, idx, width)
    out = partial
    if block_mask.full_kv_num_blocks is not None:
        full = index_to_block_mask(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, width)
        both = partial & full
        if bool(both.any()):
            where = tuple(int(i) for i in torch.nonzero(both)[0])
            raise ValueError(f"block_mask lists key block {where[3]} both as a partial and as a full block in "
                             f"row {where[:3]}: flex would attend it twice, which no bool block mask expresses")
        out = partial | full
    if out.shape[-2:] != (mq, mk):  # rows or key blocks past the sequences' ends see no token
        fitted = out.new_zeros(*out.shape[:2], mq, mk)
        r = min(rows, mq)
        fitted[..., :r, :] = out[..., :r, :mk]
        out = fitted
    return out


__all__ = ["block_mask_to_index", "block_mask_to_col_index", "index_to_block_mask", "block_mask_from_token_mask",
           "to_flex_block_mask", "block_mask_from_flex"]
