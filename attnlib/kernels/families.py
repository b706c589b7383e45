"""Capability defaults and checks shared by a backend's kernels: the Triton family and the
CUDA C++ family. A kernel class inherits its family and declares only what differs."""
from __future__ import annotations

import os

import torch

from ..dispatch import Kernel
from ..inputs import AttentionInputs

GRID_YZ_MAX = 65535  # CUDA grid limit on the y and z dimensions (heads, batch)
INTERPRET_BF16_REASON = ("bf16 under the Triton interpreter: tl.dot on bf16 operands is computed wrongly "
                         "there (GPU only)")


def interpreter_bf16_reasons(device: torch.device, dtype: torch.dtype) -> list[str]:
    """Triton 3.6's CPU interpreter returns garbage from tl.dot on bf16 operands (errors ~1e9)."""
    return [INTERPRET_BF16_REASON] if device.type == "cpu" and dtype == torch.bfloat16 else []


def heads_and_batch(inp: AttentionInputs) -> dict[str, int]:
    """The common (blocks, heads, batch) grid's y and z axes, by name (for grid_yz_reasons)."""
    return {"heads": inp.heads_q, "batch": inp.batch}


def grid_yz_reasons(sizes: dict[str, int]) -> list[str]:
    """sizes: what a launch puts on grid axes y and z, by name; each axis holds at most GRID_YZ_MAX."""
    return [f"{name} {n} exceeds {GRID_YZ_MAX}, the CUDA grid limit of the axis (y or z) it is launched on"
            for name, n in sizes.items() if n > GRID_YZ_MAX]


class TritonKernel(Kernel):
    """Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (tests). Modules
    import triton only when a kernel runs, so they import without it."""

    backend = "triton"
    priority = 20
    devices = ("cuda",)
    interpret_ok = True
    # True where no tl.dot of the kernel takes bf16 operands (they are cast to fp16/int8 first),
    # so bf16 CPU tensors run correctly under the interpreter
    interpret_bf16_ok = False
    requires = ("triton",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    head_dim_multiple = 8  # other head dims are masked up to the next power of two
    max_head_dim = 256
    needs_unit_last_stride = True
    same_head_dim_v = True

    def machine_reasons(self) -> list[str]:
        if "cpu" in self.devices or torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
            return []
        return ["no CUDA device is visible (torch.cuda.is_available() is False); Triton kernels run on CPU "
                "tensors only under TRITON_INTERPRET=1 (slow; for tests)"]

    def grid_yz(self, inp: AttentionInputs) -> dict[str, int]:
        """What this kernel's launches put on grid axes y and z; override where it differs from
        the common (blocks, heads, batch) grid (e.g. batch * heads on one axis)."""
        return heads_and_batch(inp)

    def not_supported_reasons(self, inp: AttentionInputs) -> list[str]:
        r = super().not_supported_reasons(inp)
        if self.interpret_ok and not self.interpret_bf16_ok:
            r.extend(interpreter_bf16_reasons(inp.device, inp.dtype))
        r.extend(grid_yz_reasons(self.grid_yz(inp)))
        return r


def alignment_reasons(inp: AttentionInputs) -> list[str]:
    """cp.async moves 16-byte row chunks: each tensor must start on a 16-byte boundary and its
    batch/head/seq strides must be multiples of 8 elements."""
    r = []
    for name, t in (("q", inp.q), ("k", inp.k), ("v", inp.v)):
        if t.numel() == 0:
            continue
        bad = [s for s, n in zip(t.stride()[:3], t.shape[:3]) if n > 1 and s % 8 != 0]
        if t.data_ptr() % 16 != 0 or bad:
            r.append(f"{name} rows are not 16-byte aligned (data_ptr % 16 = {t.data_ptr() % 16}, strides "
                     f"{tuple(t.stride())}; needs strides that are multiples of 8 elements; call .contiguous())")
    return r


class CudaKernel(Kernel):
    """CUDA C++ from csrc/, compiled with NVRTC through CuPy at first use (or shipped as cubins).
    Missing CuPy, NVRTC or headers, an unsupported arch and misaligned rows are reasons."""

    backend = "cuda"
    # Below the Triton kernels (20): on an H100 (2026-11-27, bench/results/nvidia-h100-80gb-hbm3/)
    # flash-cuda's forward took 2.0-2.2x flash-triton's time at hd128 (1.4-1.6x with the 128-row
    # tile) and block_sparse-cuda's 1.5x block_sparse-triton's at density 0.1. Chosen by auto only
    # where no Triton kernel can run (e.g. Triton not installed); backend="cuda" still asks for them.
    priority = 15
    devices = ("cuda",)
    requires = ("cupy",)
    dtypes = (torch.float16, torch.bfloat16)
    head_dims = (64, 128)
    head_dim_multiple = None
    min_compute_capability = (8, 0)
    needs_unit_last_stride = True
    same_head_dim_v = True
    needs_aligned_rows = True  # loads q/k/v rows with cp.async straight from the caller's tensors

    def unavailable_reasons(self) -> list[str]:
        r = super().unavailable_reasons()
        if r:
            return r
        from ..cuda import loader

        return loader.availability_reasons() + loader.device_reasons()

    def kernel_reasons(self, inp: AttentionInputs) -> list[str]:
        """This kernel's own limits (options it lacks); override."""
        return []

    def spec(self, inp: AttentionInputs):
        """The compiled specialisation these inputs would launch (a cuda.specs.KernelSpec)."""
        raise NotImplementedError

    def extra_reasons(self, inp: AttentionInputs) -> list[str]:
        r = self.kernel_reasons(inp)
        r.extend(grid_yz_reasons(heads_and_batch(inp)))
        if max(inp.seq_q, inp.seq_k) >= 2**31:
            r.append("sequence lengths must be < 2**31")
        if inp.device.type != "cuda" or r:
            return r
        if self.needs_aligned_rows:
            r.extend(alignment_reasons(inp))
        fits = inp.dtype in self.dtypes and self.head_dim_ok(inp.head_dim)
        cc = torch.cuda.get_device_capability(inp.device)
        if fits and cc >= self.min_compute_capability and not self.unavailable_reasons():
            from ..cuda import loader

            r.extend(loader.arch_reasons(self.spec(inp), cc))
        return r
