"""Launching a Triton kernel with fewer pipeline stages when its compiled shared memory is more
than the device has.

The launchers' tile and stage tables (and the shared-memory fits of flash/configs.py,
block_sparse/configs.py and linear/kernels.py) were fitted to what Triton 3.6, the pinned
version, allocates. Another Triton can allocate more for the same config: the kernel then
compiles but fails to load with Triton's OutOfResources ("shared memory") at its first launch.
That error comes before anything is enqueued (CompiledKernel._init_handles checks the compiled
size against the device's limit), so the launch can be repeated as it is with one software
pipelining stage fewer, which shrinks the buffers of the streamed tiles and leaves the products
and their order as they were: the same result, only less overlap of loads with products.

Autotuned launches that keep more than one candidate after pruning need none of this: Triton's
autotuner skips a config that fails so. Launches with stages_fixed (a config the caller named,
as bench/sweep_*.py pass them) are not retried, so a sweep times what it asked for.
"""
from __future__ import annotations

import logging
from typing import Any

from triton.runtime.errors import OutOfResources

log = logging.getLogger("attnlib")
_reported: set[tuple[str, int, int]] = set()


def _name(kernel: Any) -> str:
    fn = getattr(kernel, "fn", kernel)
    return getattr(fn, "__name__", type(kernel).__name__)


def launch_fitting(kernel: Any, grid: Any, *args: Any, num_stages: int, stages_fixed: bool = False,
                   **kwargs: Any) -> None:
    """kernel[grid](*args, num_stages=num_stages, **kwargs); on OutOfResources for shared memory,
    again with one stage fewer each time down to 1 (then Triton's error stands). stages_fixed: no
    retry (a config the caller named, as a sweep times it, runs as named or fails). Each stepped
    specialisation is retried on every call (Triton caches the failed load, so a retry costs only
    its argument binding) and logged once per (kernel, stages asked, stages taken)."""
    stages = num_stages
    while True:
        try:
            kernel[grid](*args, num_stages=stages, **kwargs)
            break
        except OutOfResources as e:
            if stages_fixed or e.name != "shared memory" or stages <= 1:
                raise
            stages -= 1
    if stages != num_stages:
        key = (_name(kernel), num_stages, stages)
        if key not in _reported:
            _reported.add(key)
            log.warning("attnlib: %s needed more shared memory than the device has with %d pipeline stages "
                        "(a Triton other than the 3.6 its configs were fitted to?); launched with %d",
                        key[0], num_stages, stages)
