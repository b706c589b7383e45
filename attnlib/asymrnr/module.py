"""AsymRnR attention: reduce Q and K/V separately, attend through attnlib's dispatcher, restore.

:class:`AsymRnR` is the stateful form a video DiT keeps (schedule per (block, step), matching
cache); :func:`asymrnr_attention` the stateless one the dispatcher's asymrnr kernels run.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ..inputs import check_layout, check_scale, from_bhsd, validate_qkv
from .config import (INNER_METHODS, METRICS, MODES, check_choice, check_count, check_seed, check_sequence,
                     check_triple, removed_count, resolve_text_tokens)
from .match import Matches, match
from .partition import Partition, partition
from .reduce import plan_reduction, reduce, restore
from .schedule import MatchCache, Schedule, derived_seed


def _inner_backend(backend: str) -> str:
    # the torch pieces run with the torch attention (CPU, fp64); otherwise the dispatcher picks
    return "torch" if backend == "torch" else "auto"


def _removes(side: Optional[tuple[Partition, Matches]], ratio: float) -> bool:
    return side is not None and removed_count(side[0].n_video, side[0].n_dst, ratio) > 0


def reduced_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      q_side: Optional[tuple[Partition, Matches]], kv_side: Optional[tuple[Partition, Matches]],
                      *, q_ratio: float, kv_ratio: float, mode: str = "replace", method: str = "flash",
                      scale: Optional[float] = None, backend: str = "auto", return_lse: bool = False,
                      out: Optional[torch.Tensor] = None, inner: Optional[Callable] = None):
    """Attention of bhsd q, k, v with Q reduced at q_ratio by q_side = (partition, matches on Q)
    and K/V at kv_ratio by kv_side (matches on V), restored to q's length. A side given as None
    or whose ratio removes nothing is passed through untouched. Returns out (bhsd; written into
    ``out`` when given), or (out, lse) when return_lse. ``inner(q, k, v, scale=, return_lse=)``
    replaces the dispatched inner attention (the torch kernel's backward uses the reference)."""
    from ..api import attention  # the inner call goes through the dispatcher like any other

    q_plan = None
    if _removes(q_side, q_ratio):
        q_plan = plan_reduction(*q_side, q_ratio)
        q = reduce(q, q_plan, mode=mode, backend=backend)
    if _removes(kv_side, kv_ratio):
        kv_plan = plan_reduction(*kv_side, kv_ratio)
        k = reduce(k, kv_plan, mode=mode, backend=backend)
        v = reduce(v, kv_plan, mode=mode, backend=backend)
    if inner is not None:
        res = inner(q, k, v, scale=scale, return_lse=return_lse)
    else:
        res = attention(q, k, v, method=method, backend=_inner_backend(backend), layout="bhsd", scale=scale,
                        return_lse=return_lse)
    o, lse = res if return_lse else (res, None)
    if q_plan is not None:
        o = restore(o, q_plan, out=out, backend=backend)
        if lse is not None:
            lse = lse.gather(-1, q_plan.restore_idx)
    elif out is not None:
        o = out.copy_(o)
    return (o, lse) if return_lse else o


def asymrnr_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid, stride=(2, 2, 2),
                      q_ratio: float = 0.5, kv_ratio: float = 0.3, metric: str = "euclidean",
                      mode: str = "replace", text_tokens: int = 0, text_side: str = "end", seed: int = 0,
                      method: str = "flash", scale: Optional[float] = None, backend: str = "auto",
                      return_lse: bool = False, out: Optional[torch.Tensor] = None,
                      inner: Optional[Callable] = None):
    """Stateless AsymRnR on bhsd q, k, v (already validated): partition with ``seed``, match Q on Q
    and K/V on V, reduce, attend, restore. What the dispatcher's asymrnr kernels run."""
    part = partition(grid, stride, seed=seed, text_tokens=text_tokens, text_side=text_side, device=q.device)
    q_side = kv_side = None
    if removed_count(part.n_video, part.n_dst, q_ratio):
        q_side = part, match(q, part, metric=metric, backend=backend)
    if removed_count(part.n_video, part.n_dst, kv_ratio):
        kv_side = part, match(v, part, metric=metric, backend=backend)
    return reduced_attention(q, k, v, q_side, kv_side, q_ratio=q_ratio, kv_ratio=kv_ratio,
                             mode=mode, method=method, scale=scale, backend=backend, return_lse=return_lse,
                             out=out, inner=inner)


def _new_output(q: torch.Tensor, head_dim_v: int, layout: str) -> torch.Tensor:
    """Empty output laid out in the caller's layout, as a bhsd view."""
    B, H, S, _ = q.shape
    if layout == "bhsd":
        return q.new_empty(B, H, S, head_dim_v)
    return q.new_empty(B, S, H, head_dim_v).transpose(1, 2)


class AsymRnR:
    """Asymmetric token reduction and restoration (arXiv 2412.11706) for one video DiT.

    grid (F, H, W): the latent token grid of a self-attention call; stride: the partition tile
    (one seeded destination per tile); q_ratio / kv_ratio: a number, a callable (block, step) ->
    ratio, or a table {(block, step): ratio} (missing = 0); metric "euclidean" | "cosine" | "dot";
    mode "replace" (drop sources) | "mean" (average them into their destination); cache_steps:
    partition and matches are reused for this many consecutive steps; text_tokens: None, a count
    at ``text_side`` ("start" | "end") or a slice touching one end, never reduced; seed: the
    partition's generator seed; method: the inner attention ("flash" | "sage"); backend: "auto",
    "triton" or "torch" for the matching / gathers (torch also runs the inner attention on torch);
    the Triton gathers have no backward, so with inputs that require grad auto runs the torch
    gathers and "triton" raises.

    Positional encoding (RoPE) must already be applied to q and k.
    """

    def __init__(self, grid, *, stride=(2, 2, 2), q_ratio: Any = 0.5, kv_ratio: Any = 0.3,
                 metric: str = "euclidean", mode: str = "replace", cache_steps: int = 1, text_tokens=None,
                 text_side: str = "end", seed: int = 0, method: str = "flash", backend: str = "auto") -> None:
        self.grid = check_triple("grid", grid)
        self.stride = check_triple("stride", stride)
        self.schedule = Schedule(q_ratio, kv_ratio)
        self.metric = check_choice("metric", metric, METRICS)
        self.mode = check_choice("mode", mode, MODES)
        self.text_tokens, self.text_side = resolve_text_tokens(text_tokens, text_side)
        self.seed = check_seed(seed)
        self.method = check_choice("method", method, INNER_METHODS)
        self.backend = check_choice("backend", backend, ("auto", "triton", "torch"))
        self.cache = MatchCache(cache_steps)

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2] + self.text_tokens

    def reset_cache(self) -> None:
        self.cache.clear()

    def cache_info(self) -> dict:
        return {"hits": self.cache.hits, "misses": self.cache.misses, "cache_steps": self.cache.cache_steps}

    def _matches(self, x: torch.Tensor, kind: str, block: int, step: int) -> tuple[Partition, Matches]:
        def compute(epoch: int):
            part = partition(self.grid, self.stride, seed=derived_seed(self.seed, block, epoch),
                             text_tokens=self.text_tokens, text_side=self.text_side, device=x.device)
            return part, match(x, part, metric=self.metric, backend=self.backend)

        # the settings the partition and matches depend on, not only the tensors: a grid, stride,
        # seed or metric changed on the object (a transposed resolution keeps the token count)
        # must not reuse the old ones for the rest of the epoch
        sig = (tuple(x.shape), x.dtype, x.device, self.grid, self.stride, self.text_tokens, self.text_side,
               self.seed, self.metric)
        return self.cache.get((block, kind), step, sig, compute)

    def attention(self, q, k, v, *, step: int = 0, block: int = 0, layout: str = "bhsd", scale=None):
        """AsymRnR attention of one block at one denoising step; output in q's layout and dtype."""
        from ..api import attention

        layout = check_layout(layout)
        qb, kb, vb = validate_qkv(q, k, v, layout)
        step = check_count("step", step)
        block = check_count("block", block)
        check_sequence(self.grid, self.text_tokens, qb.shape[2], "q")
        check_sequence(self.grid, self.text_tokens, kb.shape[2], "k")
        scale = check_scale(scale, qb.shape[3])
        q_ratio, kv_ratio = self.schedule.ratios(block, step)
        n_video = self.seq_len - self.text_tokens
        n_dst = 1  # lower bound; the exact count matters only when something is removed
        if not removed_count(n_video, n_dst, q_ratio) and not removed_count(n_video, n_dst, kv_ratio):
            return attention(q, k, v, method=self.method, backend=_inner_backend(self.backend), layout=layout,
                             scale=scale)
        # each side keeps the partition its cached matches were made on (they may be of
        # different epochs when one side's ratio was 0 at the epoch's first step)
        q_side = self._matches(qb, "q", block, step) if removed_count(n_video, n_dst, q_ratio) else None
        kv_side = self._matches(vb, "kv", block, step) if removed_count(n_video, n_dst, kv_ratio) else None
        out = _new_output(qb, vb.shape[3], layout)
        reduced_attention(qb, kb, vb, q_side, kv_side, q_ratio=q_ratio, kv_ratio=kv_ratio, mode=self.mode,
                          method=self.method, scale=scale, backend=self.backend, out=out)
        return from_bhsd(out, layout)

    def __call__(self, q, k, v, **kw):
        return self.attention(q, k, v, **kw)
