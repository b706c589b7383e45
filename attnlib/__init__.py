"""attnlib: one call that picks the fastest correct attention kernel. Public API only."""
from . import kernels as _kernels  # noqa: F401  (names the kernel modules; imported lazily)
from . import asymrnr  # noqa: F401  (attnlib.asymrnr.AsymRnR, partition, match, reduce, restore)
from .api import (attention, block_sparse_attention, explain, flash_attention, linear_attention,
                  sage_attention, sla_attention)
from .dispatch import NoKernelError, available_kernels, use_backend
from .block_mask import block_mask_from_flex, block_mask_from_token_mask, to_flex_block_mask
from .predict import predict_block_mask
from .distributed import merge_attention, ring_attention, ulysses_attention, usp_attention
from .integrations.sdpa import patch_sdpa, scaled_dot_product_attention
from .varlen import flash_attention_varlen
from .sla_module import SparseLinearAttention, sla_block_map

__version__ = "0.1.0"

__all__ = [
    "attention", "flash_attention", "flash_attention_varlen", "sage_attention", "block_sparse_attention",
    "linear_attention", "sla_attention", "SparseLinearAttention", "sla_block_map", "scaled_dot_product_attention", "patch_sdpa", "explain", "available_kernels", "use_backend", "NoKernelError",
    "merge_attention", "ulysses_attention", "ring_attention", "usp_attention",
    "block_mask_from_token_mask", "to_flex_block_mask", "block_mask_from_flex", "predict_block_mask",
]
