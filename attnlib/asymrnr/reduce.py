"""AsymRnR reduce and restore: a plan per (matches, ratio), the row gathers/merges it drives.

A plan keeps the text tokens, every destination and the sources not removed, in their original
order. ``restore_idx`` sends each original token to the reduced row whose output it takes on
restore: its own row when kept, its destination's row when removed. The same map drives reduce
"mean" (a removed source is averaged into its destination's row).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._backend import use_triton
from .config import MODES, check_choice, check_ratio, removed_count
from .match import Matches
from .partition import Partition


@dataclass(frozen=True)
class ReductionPlan:
    keep_idx: torch.Tensor     # (B, H, reduced_len) int64: original positions kept, ascending
    restore_idx: torch.Tensor  # (B, H, seq_len) int64: reduced row each original token reads
    seq_len: int
    reduced_len: int

    @property
    def n_removed(self) -> int:
        return self.seq_len - self.reduced_len


def plan_reduction(part: Partition, matches: Matches, ratio: float) -> ReductionPlan:
    """Remove the N - max(n_dst, floor(N (1 - r))) closest sources (N video tokens; ceil(r N)
    up to a 1e-7 slack against binary rounding, at most the n_src sources): the reduced video
    length is max(n_dst, floor(N (1 - r))); text tokens are added unchanged. The matches must
    have been made on ``part`` (ValueError otherwise)."""
    ratio = check_ratio("ratio", ratio)
    node, order = matches.node, matches.order
    if matches.partition_key is None:
        _check_hand_built(node, order, part)
    B, H, n_src = node.shape
    if n_src != part.n_src:
        raise ValueError(f"matches have {n_src} sources but the partition has {part.n_src}")
    if matches.partition_key is not None and matches.partition_key != part.key:
        raise ValueError(f"matches were made on another partition than the one given (grid {part.grid}, "
                         f"stride {part.stride}, {part.text_tokens} text tokens): same source count, "
                         "different destinations; match again on this partition")
    dev = node.device
    part = part.to(dev)
    S = part.seq_len
    n_rm = removed_count(part.n_video, part.n_dst, ratio)
    removed = order[..., :n_rm]                                # index into the source list
    removed_tok = part.src[removed]                            # (B, H, n_rm) positions
    removed_dst_tok = part.dst[node.gather(-1, removed)]       # their destinations' positions
    keep = torch.ones(B, H, S, dtype=torch.bool, device=dev)
    keep.scatter_(-1, removed_tok, False)
    pos = keep.cumsum(-1) - 1                                  # reduced row of each kept token
    restore_idx = pos.scatter(-1, removed_tok, pos.gather(-1, removed_dst_tok))
    R = S - n_rm
    slot = torch.where(keep, pos, torch.full_like(pos, R))     # removed tokens land in a spare row
    keep_idx = torch.empty(B, H, R + 1, dtype=torch.int64, device=dev)
    keep_idx.scatter_(-1, slot, torch.arange(S, device=dev).expand(B, H, S))
    return ReductionPlan(keep_idx[..., :R].contiguous(), restore_idx.contiguous(), S, R)


def _check_hand_built(node, order, part: Partition) -> None:
    """Matches built by hand (match() makes valid ones): integer (B, H, n_src) node and order with
    node indexing part.dst and order a permutation of the sources; out-of-range indices would
    wrap around (negative) or fault on the GPU, a repeated source would mis-size the plan."""
    int_kinds = {"matches.node": (torch.int64, torch.int32), "matches.order": (torch.int64,)}
    for (name, dtypes), t in zip(int_kinds.items(), (node, order)):
        if not isinstance(t, torch.Tensor) or t.dtype not in dtypes or t.dim() != 3:
            kinds = " or ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} must be an {kinds} (batch, heads, n_src) tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if node.shape != order.shape or node.device != order.device:
        raise ValueError(f"matches.node {tuple(node.shape)} on {node.device} and matches.order "
                         f"{tuple(order.shape)} on {order.device} must share shape and device")
    if node.numel() and not bool(((node >= 0) & (node < part.n_dst)).all()):
        raise ValueError(f"matches.node must index the partition's {part.n_dst} destinations (0 .. {part.n_dst - 1})")
    if order.numel() and not torch.equal(order.sort(-1).values,
                                         torch.arange(order.shape[-1], device=order.device).expand_as(order)):
        raise ValueError(f"matches.order must order the {order.shape[-1]} sources: each index 0 .. "
                         f"{order.shape[-1] - 1} once per (batch, head)")


def _check_rows(name: str, x, plan: ReductionPlan, rows: int, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[2] != rows or tuple(x.shape[:2]) != tuple(plan.keep_idx.shape[:2]):
        raise ValueError(f"{name} must be (batch, heads, seq, dim) = ({plan.keep_idx.shape[0]}, "
                         f"{plan.keep_idx.shape[1]}, {rows}, D) ({what}), got {tuple(x.shape)}")
    if x.device != plan.keep_idx.device:
        raise ValueError(f"{name} is on {x.device} but the plan is on {plan.keep_idx.device}; "
                         "plan on the tensors' device (the matches' device sets it)")


def reduce(x: torch.Tensor, plan: ReductionPlan, *, mode: str = "replace", backend: str = "auto") -> torch.Tensor:
    """(B, H, seq_len, D) -> (B, H, reduced_len, D), contiguous. mode "replace" drops the removed
    sources; "mean" averages each removed source into its destination."""
    check_choice("mode", mode, MODES)
    _check_rows("x", x, plan, plan.seq_len, "the plan's full length")
    triton = use_triton(x, backend, differentiable=True)
    if mode == "replace":
        if triton:
            from ..triton_kernels.asymrnr.gather import gather_rows

            return gather_rows(x, plan.keep_idx)
        from ..reference.asymrnr import asymrnr_gather_reference

        return asymrnr_gather_reference(x, plan.keep_idx)
    if triton:
        from ..triton_kernels.asymrnr.gather import merge_rows

        return merge_rows(x, plan.restore_idx, plan.reduced_len)
    from ..reference.asymrnr import asymrnr_merge_reference

    return asymrnr_merge_reference(x, plan.restore_idx, plan.reduced_len)


def restore(y: torch.Tensor, plan: ReductionPlan, *, out: torch.Tensor | None = None,
            backend: str = "auto") -> torch.Tensor:
    """(B, H, reduced_len, D) -> (B, H, seq_len, D) in the original order: kept tokens take their
    own row, removed ones their destination's. ``out`` (any strides) receives the result."""
    _check_rows("y", y, plan, plan.reduced_len, "the plan's reduced length")
    if out is not None:
        _check_rows("out", out, plan, plan.seq_len, "the plan's full length")
    if use_triton(y, backend, differentiable=True):
        from ..triton_kernels.asymrnr.gather import gather_rows

        return gather_rows(y, plan.restore_idx, out=out)
    from ..reference.asymrnr import asymrnr_gather_reference

    return asymrnr_gather_reference(y, plan.restore_idx, out=out)
