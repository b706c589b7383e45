"""SparseLinearAttention: SLA (arXiv 2509.24006) as a trainable nn.Module, and sla_block_map.

The module holds the linear branch's projection (weight head_dim x head_dim and bias), both
zero-initialised as in the paper, so at initialisation it computes exactly the sparse attention
over the critical blocks; fine-tuning then learns how much of the marginal blocks' linear
attention to add back: out = O_sparse + O_linear W^T + b.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .inputs import check_block_size, check_fraction, check_layout, check_scale, type_name, validate_qkv
from .options import check_feature_map
from .reference._common import num_blocks


def sla_block_map(q, k, *, critical: float = 0.05, negligible: float = 0.10, block_size=(64, 64), scale=None,
                  causal: bool = False, layout: str = "bhsd") -> torch.Tensor:
    """The int8 SLA block map (B, Hq, ceil(Sq/bq), ceil(Sk/bk)): 1 critical, 0 marginal, -1 negligible.

    Computed by the Triton classifier on CUDA (and on CPU under TRITON_INTERPRET=1) for fp16 / bf16
    / fp32 and the block sizes sla-triton takes (powers of two from 16 to 128), else by the
    reference (attnlib.reference.sla.sla_block_classes), as the dispatcher chooses for the
    attention itself; both give the same map."""
    qb, kb, _ = validate_qkv(q, k, k, layout)
    critical, negligible = check_fraction("critical", critical), check_fraction("negligible", negligible)
    if critical + negligible > 1.0:
        raise ValueError(f"critical + negligible must not exceed 1, got {critical} + {negligible}")
    block_size = check_block_size(block_size)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type_name(causal)}")
    scale = check_scale(scale, qb.shape[-1])
    if qb.device.type == "meta":  # shapes only, as the attention ops give for meta tensors
        return qb.new_empty(qb.shape[0], qb.shape[1], num_blocks(qb.shape[2], block_size[0]),
                            num_blocks(kb.shape[2], block_size[1]), dtype=torch.int8)
    kw = dict(critical=critical, negligible=negligible, block_size=block_size, scale=scale, causal=causal)
    from .kernels.sla_triton import block_size_supported  # the dispatcher's gate (kernels load lazily)

    on_triton = qb.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    if (on_triton and qb.dtype in (torch.float16, torch.bfloat16, torch.float32) and _has_triton()
            and block_size_supported(block_size)):
        from .triton_kernels.sla.classify import sla_block_classes

        with torch.no_grad():
            return sla_block_classes(qb.detach(), kb.detach(), **kw)
    from .reference.sla import sla_block_classes

    return sla_block_classes(qb, kb, **kw)


def _has_triton() -> bool:
    from .dispatch import installed

    return installed("triton")


class SparseLinearAttention(nn.Module):
    """SLA with its trainable projection; ``forward(q, k, v)`` runs ``attnlib.attention(method="sla")``.

    head_dim: the heads' dimension (q, k and v share it). critical / negligible: fractions of each
    row's key blocks computed exactly / skipped (the rest go through linear attention).
    block_size: (query block, key block). feature_map: "softmax" (the paper's), "elu", "relu" or
    "identity"."""

    def __init__(self, head_dim: int, *, critical: float = 0.05, negligible: float = 0.10,
                 block_size=(64, 64), feature_map: str = "softmax") -> None:
        super().__init__()
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0:
            raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
        self.critical = check_fraction("critical", critical)
        self.negligible = check_fraction("negligible", negligible)
        if self.critical + self.negligible > 1.0:
            raise ValueError(f"critical + negligible must not exceed 1, got {critical} + {negligible}")
        self.block_size = check_block_size(block_size)
        self.feature_map = check_feature_map(feature_map)
        self.head_dim = head_dim
        self.proj = nn.Linear(head_dim, head_dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, q, k, v, *, causal: bool = False, return_block_map: bool = False, layout: str = "bhsd",
                backend: str = "auto"):
        """q (B, Hq, Sq, D) for layout "bhsd" or (B, Sq, Hq, D) for "bshd"; k, v with Hkv heads
        (Hq a multiple). Returns the output in q's layout and dtype, and with return_block_map
        also the int8 block map (B, Hq, Mq, Mk)."""
        check_layout(layout)
        for name, t in (("q", q), ("v", v)):  # k: validate_qkv names it against q
            if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[-1] != self.head_dim:
                raise ValueError(f"{name} must have head_dim {self.head_dim} (the module's), got {t.shape[-1]}")
        if not isinstance(return_block_map, bool):
            raise TypeError(f"return_block_map must be a bool, got {type_name(return_block_map)}")
        from .api import attention

        w, b = self.proj.weight, self.proj.bias
        if isinstance(q, torch.Tensor) and w.device != q.device:
            raise ValueError(f"the module's parameters are on {w.device} but q is on {q.device}; call .to()")
        out = attention(q, k, v, method="sla", backend=backend, layout=layout, causal=causal, proj_weight=w,
                        proj_bias=b, critical=self.critical, negligible=self.negligible,
                        block_size=self.block_size, feature_map=self.feature_map)
        if not return_block_map:
            return out
        block_map = sla_block_map(q, k, critical=self.critical, negligible=self.negligible,
                                  block_size=self.block_size, causal=causal, layout=layout)
        return out, block_map

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, critical={self.critical}, negligible={self.negligible}, "
                f"block_size={self.block_size}, feature_map={self.feature_map!r}")
