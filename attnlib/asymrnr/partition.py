"""AsymRnR partition: one seeded destination per stride tile of the (F, H, W) grid, the rest sources.

Tokens are numbered as the model flattens them: video token (f, h, w) is (f * H + h) * W + w,
shifted by the text tokens when those come first. Edge tiles of a grid not divisible by the
stride are clipped (the grid is padded and the destination drawn only among real tokens). Text
tokens are in neither set: they are never reduced.
"""
from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from typing import Optional

import torch

from .config import check_seed, check_triple, resolve_text_tokens


@dataclass(frozen=True)
class Partition:
    """Destination and source token positions (int64, ascending, on one device).

    fingerprint identifies the token split (grid, stride, text tokens and every destination),
    the same on every device: matches carry it, so a plan is never built from matches made on
    another partition with the same counts. partition() computes it on the CPU at the draw; a
    Partition built by hand gets it from its tensors on first use."""

    grid: tuple[int, int, int]
    stride: tuple[int, int, int]
    text_tokens: int
    text_side: str
    dst: torch.Tensor
    src: torch.Tensor
    fingerprint: str = ""

    @property
    def key(self) -> str:
        return self.fingerprint or partition_fingerprint(self.grid, self.stride, self.text_tokens, self.text_side,
                                                         self.dst)

    @property
    def n_video(self) -> int:
        return math.prod(self.grid)

    @property
    def seq_len(self) -> int:
        return self.n_video + self.text_tokens

    @property
    def n_dst(self) -> int:
        return self.dst.numel()

    @property
    def n_src(self) -> int:
        return self.src.numel()

    @property
    def text(self) -> torch.Tensor:
        """Positions of the text tokens (never reduced)."""
        start = 0 if self.text_side == "start" else self.n_video
        return torch.arange(start, start + self.text_tokens, device=self.dst.device)

    def to(self, device) -> "Partition":
        device = torch.device(device)
        if self.dst.device == device:
            return self
        return Partition(self.grid, self.stride, self.text_tokens, self.text_side,
                         self.dst.to(device), self.src.to(device), self.key)


def partition_fingerprint(grid, stride, text_tokens: int, text_side: str, dst: torch.Tensor) -> str:
    """A digest of the split: its geometry and destination positions (src is the rest)."""
    h = hashlib.blake2b(repr((tuple(grid), tuple(stride), text_tokens, text_side)).encode(), digest_size=16)
    h.update(dst.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def _axis_positions(size: int, stride: int, u: torch.Tensor, axis: int) -> torch.Tensor:
    """Coordinate along one axis of each tile's destination: tile start + a uniform draw among the
    tile's real cells (edge tiles are clipped). u holds one draw per tile, shaped like the tiles."""
    shape = [1, 1, 1]
    shape[axis] = u.shape[axis]
    start = torch.arange(u.shape[axis], dtype=torch.int64, device="cpu").reshape(shape) * stride
    extent = torch.clamp(size - start, max=stride)
    return start + torch.minimum((u * extent).floor().to(torch.int64), extent - 1)


def partition(grid, stride=(2, 2, 2), *, seed: int = 0, text_tokens=None, text_side: str = "end",
              device: Optional[torch.device | str] = None) -> Partition:
    """Draw one destination per stride tile with ``torch.Generator().manual_seed(seed)``.

    grid (F, H, W) latent frames x height x width; stride (sf, sh, sw); text_tokens None, a count
    placed at ``text_side`` ("start" or "end"), or a slice touching one end of the sequence.
    Returns a :class:`Partition` on ``device`` (CPU by default); the draw is made on the CPU, so
    the same seed gives the same partition on every device.
    """
    grid = check_triple("grid", grid)
    stride = check_triple("stride", stride)
    n_text, side = resolve_text_tokens(text_tokens, text_side)
    seed = check_seed(seed)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return _cached_partition(grid, stride, seed, n_text, side, dev)


# the dispatcher path partitions on every call: keep recent ones (index tensors are never written)
@functools.lru_cache(maxsize=64)
def _cached_partition(grid, stride, seed: int, n_text: int, side: str, dev: torch.device) -> Partition:
    F, H, W = grid
    tiles = [math.ceil(g / s) for g, s in zip(grid, stride)]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    u = torch.rand(*tiles, 3, generator=gen, dtype=torch.float64, device="cpu")
    f, h, w = (_axis_positions(size, st, u[..., a], a) for a, (size, st) in enumerate(zip(grid, stride)))
    dst = ((f * H + h) * W + w).flatten().sort().values
    is_dst = torch.zeros(F * H * W, dtype=torch.bool, device="cpu")
    is_dst[dst] = True
    src = (~is_dst).nonzero().flatten()
    offset = n_text if side == "start" else 0
    dst, src = dst + offset, src + offset
    key = partition_fingerprint(grid, stride, n_text, side, dst)  # on the CPU, before the copy
    return Partition(grid, stride, n_text, side, dst.to(dev), src.to(dev), key)
