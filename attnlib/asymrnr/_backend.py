"""Which implementation the functional pieces run: the Triton kernels or the torch reference."""
from __future__ import annotations

import os

import torch

from ..dispatch import installed

PIECE_BACKENDS = ("auto", "triton", "torch")


def use_triton(x: torch.Tensor, backend: str, *, differentiable: bool = False) -> bool:
    """auto: Triton on CUDA tensors (not fp64) when triton is installed, torch otherwise. triton: on CUDA,
    or on CPU under TRITON_INTERPRET=1; anything else raises with the reason.

    differentiable (reduce, restore): the Triton gathers have no backward, so when x requires grad
    (grad mode on) auto takes the torch gathers and triton raises, rather than returning a result
    cut off from x's graph (the matching is a constant of the inputs: it leaves this False)."""
    if backend not in PIECE_BACKENDS:
        raise ValueError(f"backend must be one of {PIECE_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    needs_grad = differentiable and torch.is_grad_enabled() and x.requires_grad
    have = installed("triton")
    runnable = x.is_cuda or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
    if backend == "auto":
        return have and x.is_cuda and x.dtype != torch.float64 and not needs_grad
    if needs_grad:
        raise ValueError("backend='triton' reduce/restore have no backward pass, but the tensor requires grad; "
                         "use backend='auto' or 'torch', or run under torch.no_grad()")
    if not have:
        raise ValueError("backend='triton' needs the 'triton' package, which is not installed")
    if not runnable:
        raise ValueError(f"backend='triton' runs on CUDA tensors (or CPU under TRITON_INTERPRET=1), "
                         f"got a {x.device.type} tensor")
    if x.dtype == torch.float64:
        raise ValueError("backend='triton' takes fp16, bf16 or fp32 tensors; use backend='torch' for fp64")
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:
        from ..kernels.families import INTERPRET_BF16_REASON

        raise ValueError(f"backend='triton' cannot take these bf16 CPU tensors: {INTERPRET_BF16_REASON}; "
                         "use backend='torch'")
    return True
