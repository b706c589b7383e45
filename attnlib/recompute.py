"""torch.func.vjp for the backward ops' recompute paths (kernels built from differentiable torch
operations: the references, AsymRnR's torch kernel, the varlen reference, flash-cuda's fallback).

Those run inside attnlib's custom ops, where autograd is off, so they differentiate with
functorch. When the op is called from a TorchDispatchMode's handler (FlopCounterMode over a
training step, a memory tracker, a debugging mode) or from a tensor subclass's
``__torch_dispatch__``, the dispatcher excludes every key above Python there, functorch's own
among them, and vjp's wrapped tensors failed ("Cannot access storage of TensorWrapper").
:func:`vjp` runs it with those exclusions lifted: the thread's excluded keys cut down to the
ones a top-level call has (the autocast keys), so whether autocast is on stays as it was.
The handler's mode is off while it runs, so it does not see the recompute's own operations.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

_KEYS = torch._C.DispatchKey


def _top_level_exclusions():
    """What a call outside any handler may have excluded: the autocast keys (autocast off). None
    on a torch whose dispatcher bindings differ (then vjp runs as torch.func.vjp)."""
    try:
        keys = [getattr(_KEYS, n) for n in dir(_KEYS) if n.startswith("Autocast")]
        ks = torch._C.DispatchKeySet(keys[0])
        for k in keys[1:]:
            ks = ks.add(k)
        torch._C._dispatch_tls_local_exclude_set().has(_KEYS.FuncTorchDynamicLayerFrontMode)
        torch._C._ForceDispatchKeyGuard  # noqa: B018  (present)
        return ks
    except (AttributeError, IndexError, TypeError, RuntimeError):
        return None


_TOP_LEVEL = _top_level_exclusions()


def _functorch_usable():
    """A context in which functorch transforms work: a no-op context where nothing blocks them."""
    if _TOP_LEVEL is None:
        return contextlib.nullcontext()
    excluded = torch._C._dispatch_tls_local_exclude_set()
    if not excluded.has(_KEYS.FuncTorchDynamicLayerFrontMode):
        return contextlib.nullcontext()
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded & _TOP_LEVEL)


def vjp(f: Callable, *primals):
    """torch.func.vjp(f, *primals) -> (outputs, vjp_fn), both usable inside a dispatch handler."""
    with _functorch_usable():
        outs, pullback = torch.func.vjp(f, *primals)

    def vjp_fn(cotangents):
        with _functorch_usable():
            return pullback(cotangents)
    return outs, vjp_fn
