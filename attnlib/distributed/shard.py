"""Sequence sharding orders for sequence parallelism: contiguous, zigzag, and the USP 2-D order."""
from __future__ import annotations

from typing import Sequence

import torch


def _check_split(x: torch.Tensor, dim: int, parts: int, what: str) -> None:
    if x.shape[dim] % parts:
        raise ValueError(f"{what}: sequence length {x.shape[dim]} (dim {dim}) must be a multiple of "
                         f"{parts}; pad it first")


def _check_rank(what: str, rank_name: str, rank, size_name: str, size) -> None:
    """A rank and its group size as ints with 0 <= rank < size: a negative rank would index the
    chunks from the end and hand this rank another rank's tokens without an error."""
    for name, n in ((size_name, size), (rank_name, rank)):
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"{what}: {name} must be an int, got {type(n).__name__}")
    if size < 1:
        raise ValueError(f"{what}: {size_name} must be positive, got {size}")
    if not 0 <= rank < size:
        raise ValueError(f"{what}: {rank_name} {rank} outside [0, {size})")


def zigzag_shard(x: torch.Tensor, rank: int, world: int, dim: int) -> torch.Tensor:
    """Rank ``rank``'s zigzag shard: split the sequence into 2*world chunks, take chunks
    ``rank`` and ``2*world - 1 - rank`` (in that order). Under causal attention every rank then
    has the same amount of visible work (ring-flash-attention's balancing)."""
    _check_rank("zigzag_shard", "rank", rank, "world", world)
    _check_split(x, dim, 2 * world, "zigzag_shard")
    chunks = x.chunk(2 * world, dim=dim)
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim=dim)


def zigzag_unshard(shards: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    """Inverse of :func:`zigzag_shard`: the full sequence from the shards of ranks 0..world-1."""
    world = len(shards)
    chunks: list = [None] * (2 * world)
    for r, s in enumerate(shards):
        _check_split(s, dim, 2, "zigzag_unshard")
        chunks[r], chunks[2 * world - 1 - r] = s.chunk(2, dim=dim)
    return torch.cat(chunks, dim=dim)


def usp_shard(x: torch.Tensor, *, ulysses_rank: int, ulysses_size: int, ring_rank: int, ring_size: int,
              dim: int, zigzag: bool = False) -> torch.Tensor:
    """This rank's shard for :func:`usp_attention`: the ring shard of ``ring_rank`` (zigzag when
    the attention is causal), cut into ``ulysses_size`` contiguous pieces, piece ``ulysses_rank``.
    The Ulysses all-to-all then reassembles exactly the ring shard on each rank."""
    _check_rank("usp_shard", "ulysses_rank", ulysses_rank, "ulysses_size", ulysses_size)
    _check_rank("usp_shard", "ring_rank", ring_rank, "ring_size", ring_size)
    if zigzag:
        ring_shard = zigzag_shard(x, ring_rank, ring_size, dim)
    else:
        _check_split(x, dim, ring_size, "usp_shard")
        ring_shard = x.chunk(ring_size, dim=dim)[ring_rank]
    _check_split(ring_shard, dim, ulysses_size, "usp_shard")
    return ring_shard.chunk(ulysses_size, dim=dim)[ulysses_rank]


def usp_unshard(shards: Sequence[torch.Tensor], *, ulysses_size: int, ring_size: int, dim: int,
                zigzag: bool = False) -> torch.Tensor:
    """Inverse of :func:`usp_shard` from the shards of one SP block in rank order
    (rank in the block = ring_rank * ulysses_size + ulysses_rank, as :func:`make_groups` lays out)."""
    if len(shards) != ulysses_size * ring_size:
        raise ValueError(f"usp_unshard: expected {ulysses_size * ring_size} shards, got {len(shards)}")
    ring_shards = [torch.cat(list(shards[r * ulysses_size:(r + 1) * ulysses_size]), dim=dim)
                   for r in range(ring_size)]
    return zigzag_unshard(ring_shards, dim) if zigzag else torch.cat(ring_shards, dim=dim)
