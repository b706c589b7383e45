"""Small tensors that depend only on shapes (block counts, visibility maps), kept per device.

Launchers rebuild such tensors on every call with a handful of tiny torch kernels each (on a GPU
about 5-10 us of host time per kernel, and each a launch on the stream). ``device_constant``
keeps the result per (arguments, device) instead. Pure torch: no Triton import, so the CPU
paths may use it too.

The cached tensors are shared between calls: callers only read them (no in-place ops, never
returned to users without a copy). While a CUDA graph is being captured nothing is cached or
reused from the cache (a tensor made then lives in the graph's private memory pool).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch


def device_constant(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Decorator for ``fn(*hashable_args, device) -> Tensor``: the result kept per
    (args, device), device last and positional or by keyword."""
    cached = functools.lru_cache(maxsize=256)(fn)

    @functools.wraps(fn)
    def wrapper(*args, device=None):
        if device is None:
            *args, device = args
        device = torch.device(device)
        if device.type == "cuda":
            if torch.cuda.is_current_stream_capturing():
                return fn(*args, device=device)
            if device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
        return cached(*args, device=device)

    wrapper.cache_clear = cached.cache_clear
    return wrapper
