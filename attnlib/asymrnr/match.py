"""AsymRnR matching: each source token's most similar destination, and the sources ordered by it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ._backend import use_triton
from .config import METRICS, check_choice
from .partition import Partition


@dataclass(frozen=True)
class Matches:
    """Per (batch, head): node[b, h, i] = index into partition.dst of source i's best destination,
    score its similarity, order the source indices from the most to the least similar.
    partition_key: Partition.key of the partition they were made on (match() sets it;
    plan_reduction refuses another partition); None for matches built by hand (then their
    shapes, dtypes and index ranges are checked: node within the destinations, order a
    permutation of the sources)."""

    node: torch.Tensor   # (B, H, n_src) int64
    score: torch.Tensor  # (B, H, n_src) float32 (float64 for float64 inputs)
    order: torch.Tensor  # (B, H, n_src) int64
    partition_key: Optional[str] = None


def _check_x(x, part: Partition) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a 4-D floating (batch, heads, seq, dim) tensor, got shape "
                         f"{tuple(x.shape)} dtype {x.dtype}")
    if x.shape[2] != part.seq_len:
        raise ValueError(f"x has {x.shape[2]} tokens but the partition (grid {part.grid}, "
                         f"{part.text_tokens} text tokens) covers {part.seq_len}")


def match(x: torch.Tensor, part: Partition, *, metric: str = "euclidean", backend: str = "auto") -> Matches:
    """Match the sources of ``part`` to their most similar destination in x (bhsd), per head.

    Q is matched on Q; K/V on V (the same matches then reduce K). backend: "auto" (Triton on CUDA),
    "triton" (also CPU under TRITON_INTERPRET=1) or "torch" (the reference).
    """
    _check_x(x, part)
    check_choice("metric", metric, METRICS)
    part = part.to(x.device)
    # the matching is a constant of the inputs: no autograd graph (the torch reference's would
    # hold x's graph and its row copies for as long as the matches live, e.g. in AsymRnR's cache)
    x = x.detach()
    if use_triton(x, backend):
        from ..triton_kernels.asymrnr.match import match_fwd

        node, score = match_fwd(x, part.src, part.dst, metric)
    else:
        from ..reference.asymrnr import asymrnr_match_reference

        node, score = asymrnr_match_reference(x, part.src, part.dst, metric)
    # stable: equal scores keep source order, so the result is deterministic
    order = torch.argsort(score, dim=-1, descending=True, stable=True)
    return Matches(node, score, order, part.key)
