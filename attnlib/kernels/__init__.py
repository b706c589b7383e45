"""Kernel modules, one per (method, backend). Importing one registers its kernels.

The list is imported lazily on the first dispatch, so `import attnlib` stays cheap and a
missing optional dependency (triton, cupy) only shows up as a kernel's reason.
"""
from ..dispatch import register_module

KERNEL_MODULES = (
    "attnlib.kernels.torch_references",
    "attnlib.kernels.flash_torch_chunked",
    "attnlib.kernels.block_sparse_torch_chunked",
    "attnlib.kernels.flash_sdpa",
    "attnlib.kernels.flash_triton",
    "attnlib.kernels.flash_cuda",
    "attnlib.kernels.sage_triton",
    "attnlib.kernels.sage_cuda",
    "attnlib.kernels.sage_torch_chunked",
    "attnlib.kernels.block_sparse_triton",
    "attnlib.kernels.block_sparse_cuda",
    "attnlib.kernels.linear_triton",
    "attnlib.kernels.linear_torch_chunked",
    "attnlib.kernels.sla_triton",
    "attnlib.kernels.sla_torch_chunked",
    "attnlib.kernels.asymrnr_torch",
    "attnlib.kernels.asymrnr_triton",
)

for _m in KERNEL_MODULES:
    register_module(_m)
