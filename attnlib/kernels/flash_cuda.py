"""Method flash in CUDA C++ (csrc/flash): FlashAttention-2 forward for sm_80+, compiled with
NVRTC through CuPy at first use (or shipped as cubins); backward on attnlib's Triton FA2
backward from the saved out and lse.

Query tile (``ATTNLIB_CUDA_FLASH_TILE_M``, read at each call):

* ``128`` (default): 4 warps x 32 rows (two 16-row mma atoms per warp, FlashAttention-2's sm_80
  tiling: each K/V fragment read from shared memory feeds twice the mma, Q re-read per key
  block), 64 keys per step at hd64 and 32 at hd128 (the largest without register spills). On an
  H100 (2026-11-27) it passed the GPU tests and compute-sanitizer, and its hd128 forward ran
  1.27-1.41x faster than the 64-row tile (0.78-0.91x torch SDPA's flash backend, against
  0.62-0.68x).
* ``64``: 4 warps x 16 rows, 64 keys per step.

Keys per step of the 128-row tile (``ATTNLIB_CUDA_FLASH_BLOCK_N``, read at each call; unset: the
default above): at hd128 also 48 or 64 (specs.TILE128_BLOCK_N_CHOICES: they spill a few registers
on sm_90; FlashAttention-2 steps 64 keys there), for a GPU benchmark to compare. The 64-row tile
ignores it.

``flash_fwd_cuda(..., tile_m=128, block_n=48)`` picks both for one call regardless of the
variables.
Imports without CuPy; a missing CuPy, NVRTC, arch or alignment shows up as a reason.
"""
from __future__ import annotations

import math
import os

import torch

from ..dispatch import register
from ..inputs import AttentionInputs
from ..recompute import vjp as func_vjp
from .families import CudaKernel

LOG2E = 1.4426950408889634
TILE_M_ENV = "ATTNLIB_CUDA_FLASH_TILE_M"
TILE_M_CHOICES = (64, 128)
BLOCK_N_ENV = "ATTNLIB_CUDA_FLASH_BLOCK_N"


def tile_m_from_env() -> int:
    """The query tile ATTNLIB_CUDA_FLASH_TILE_M asks for (128 when unset or empty)."""
    raw = os.environ.get(TILE_M_ENV, "").strip()
    if not raw:
        return 128
    try:
        tile = int(raw)
    except ValueError:
        tile = None
    if tile not in TILE_M_CHOICES:
        raise ValueError(f"environment variable {TILE_M_ENV} must be one of {TILE_M_CHOICES}, got {raw!r}")
    return tile


def block_n_from_env() -> int | None:
    """The keys per step ATTNLIB_CUDA_FLASH_BLOCK_N asks of the 128-row tile (None when unset or
    empty); the spec checks it against the head dim's choices."""
    raw = os.environ.get(BLOCK_N_ENV, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {BLOCK_N_ENV} must be an int, got {raw!r}") from None


def _spec_for(head_dim: int, dtype: torch.dtype, causal: bool, tile_m: int | None = None,
              block_n: int | None = None):
    from ..cuda.specs import flash_fwd_spec, flash_fwd_tile128_spec

    tile_m = tile_m_from_env() if tile_m is None else tile_m
    dt = "bf16" if dtype == torch.bfloat16 else "fp16"
    if tile_m == 64:
        return flash_fwd_spec(head_dim, dt, causal)
    if tile_m == 128:
        if block_n is None:
            from ..cuda.specs import TILE128_BLOCK_N_CHOICES

            block_n = block_n_from_env()
            choices = TILE128_BLOCK_N_CHOICES.get(head_dim, ())
            if block_n is not None and choices and block_n not in choices:
                raise ValueError(f"environment variable {BLOCK_N_ENV}: the 128-row tile at head dim {head_dim} "
                                 f"takes {choices} keys per step, not {block_n}")
        return flash_fwd_tile128_spec(head_dim, dt, causal, block_n)
    raise ValueError(f"tile_m must be one of {TILE_M_CHOICES}, got {tile_m!r}")


def flash_fwd_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor | None, *, causal: bool, scale: float, tile_m: int | None = None,
                   block_n: int | None = None) -> None:
    """Launch the forward kernel on bhsd views (unit last stride); writes out and, when given,
    lse (dense float32 (B, Hq, Sq)). Runs on torch's current stream of q's device; no sync.
    tile_m: query rows per block, 64 or 128 (None: ATTNLIB_CUDA_FLASH_TILE_M, default 128);
    block_n: the 128-row tile's keys per step (None: ATTNLIB_CUDA_FLASH_BLOCK_N, default
    specs.TILE128_BLOCK_N)."""
    import numpy as np

    from ..cuda import loader

    batch, heads_q, seq_q, head_dim = q.shape
    heads_kv, seq_k = k.shape[1], k.shape[2]
    if batch == 0 or heads_q == 0 or seq_q == 0:
        return
    spec = _spec_for(head_dim, q.dtype, causal, tile_m, block_n)
    dev = q.device.index if q.device.index is not None else torch.cuda.current_device()
    fn = loader.get_function(spec, dev, torch.cuda.get_device_capability(dev))
    block_m = int(dict(spec.defines)["ATTNLIB_BLOCK_M"])
    grid = (math.ceil(seq_q / block_m), heads_q, batch)

    def ptr(t):
        return np.uint64(t.data_ptr())

    def strides(t):
        return [np.int64(s) for s in t.stride()[:3]]

    args = [ptr(q), ptr(k), ptr(v), ptr(out), np.uint64(0 if lse is None else lse.data_ptr()),
            *strides(q), *strides(k), *strides(v), *strides(out),
            np.int32(seq_q), np.int32(seq_k), np.int32(heads_q), np.int32(heads_q // heads_kv),
            np.float32(scale * LOG2E)]
    stream = torch.cuda.current_stream(q.device).cuda_stream
    loader.launch(fn, grid, (spec.threads,), args, shared_mem=spec.smem_bytes, device_index=dev,
                  stream_ptr=stream)


def _forward(inp: AttentionInputs, q, k, v, want_lse: bool):
    out = inp.new_output()
    lse = torch.empty(q.shape[0], q.shape[1], q.shape[2], dtype=torch.float32, device=q.device) if want_lse else None
    flash_fwd_cuda(q, k, v, out, lse, causal=inp.causal, scale=inp.scale)
    return out, lse


def _triton_backward():
    """attnlib.triton_kernels.flash.backward.flash_bwd, or None where Triton's backward is absent."""
    try:
        from ..triton_kernels.flash.backward import flash_bwd
    except ImportError:
        return None
    return flash_bwd


def _reference_backward(inp: AttentionInputs, dout: torch.Tensor, dlse: torch.Tensor | None):
    """Gradients by differentiating the float32 reference (slow, exact): the fallback where the
    Triton backward cannot run. torch.func, since this may run inside a custom op."""
    from ..reference import flash_reference

    def f(q, k, v):
        return flash_reference(q, k, v, causal=inp.causal, scale=inp.scale, return_lse=True)

    (o, lse), vjp = func_vjp(f, inp.q, inp.k, inp.v)
    dl = torch.zeros_like(lse) if dlse is None else torch.where(torch.isfinite(lse), dlse.to(lse.dtype), 0.0)
    return vjp((dout.to(o.dtype), dl))


class _FlashCudaFunction(torch.autograd.Function):
    """Autograd for direct kernel calls (dispatch.run with grad on); the public API goes through
    attnlib.ops, which calls FlashCUDA.backward itself."""

    @staticmethod
    def forward(ctx, q, k, v, inp):
        out, lse = _forward(inp, q, k, v, want_lse=True)
        ctx.save_for_backward(out, lse)
        ctx.inp = inp
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = FLASH_CUDA.backward(ctx.inp, out, lse, dout, dlse)[:3]
        return dq, dk, dv, None


class FlashCUDA(CudaKernel):
    name = "flash-cuda"
    method = "flash"

    def spec(self, inp: AttentionInputs):
        return _spec_for(inp.head_dim, inp.dtype, inp.causal)

    def kernel_reasons(self, inp: AttentionInputs) -> list[str]:
        if inp.options.get("key_mask") is not None:
            return ["key_mask not supported (flash-triton and torch SDPA take it)"]
        return []

    def forward(self, inp: AttentionInputs):
        if inp.requires_grad and torch.is_grad_enabled():
            out, lse = _FlashCudaFunction.apply(inp.q, inp.k, inp.v, inp)
        else:
            out, lse = _forward(inp, inp.q, inp.k, inp.v, want_lse=inp.return_lse)
        return (out, lse) if inp.return_lse else out

    def backward(self, inp: AttentionInputs, out: torch.Tensor, lse: torch.Tensor | None, dout: torch.Tensor,
                 dlse: torch.Tensor | None) -> tuple:
        """The Triton FA2 backward from the saved out and lse (attnlib.triton_kernels.flash);
        the float32 reference's gradients where Triton is not installed."""
        bwd = _triton_backward()
        if bwd is not None and lse is not None:
            dq, dk, dv = bwd(dout, inp.q, inp.k, inp.v, out, lse, causal=inp.causal, scale=inp.scale, dlse=dlse,
                             deterministic=inp.options.get("deterministic", True))
        else:
            dq, dk, dv = _reference_backward(inp, dout, dlse)
        return dq, dk, dv, None, None


FLASH_CUDA = register(FlashCUDA())
