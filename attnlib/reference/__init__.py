"""Pure-PyTorch references, one file per method: ground truth in tests and the CPU fallback.

Each takes bhsd tensors (GQA not expanded), computes in float32 (float64 when given float64)
and supports autograd.
"""
from .flash import flash_reference

__all__ = ["flash_reference"]

try:  # the other methods' references land file by file
    from .sage import sage_reference  # noqa: F401
    from .block_sparse import block_sparse_reference  # noqa: F401
    from .linear import linear_reference  # noqa: F401
    from .sla import sla_block_classes, sla_reference  # noqa: F401
    __all__ += ["sage_reference", "block_sparse_reference", "linear_reference", "sla_reference",
                "sla_block_classes"]
except ImportError:  # pragma: no cover - only while a file is missing
    pass
