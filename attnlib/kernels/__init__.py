"""Kernel modules, one per (method, backend). Importing one registers its kernels.

The list is imported lazily on the first dispatch, so `import attnlib` stays cheap and a
missing optional dependency (triton, cupy) only shows up as a kernel's reason.
"""
from ..dispatch import register_module

KERNEL_MODULES = (
    "attnlib.kernels.torch_references",
    "attnlib.kernels.flash_sdpa",
    "attnlib.kernels.flash_triton",
    "attnlib.kernels.flash_cuda",
)

for _m in KERNEL_MODULES:
    register_module(_m)
