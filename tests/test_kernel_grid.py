"""Every registered kernel x a grid of cases, from the dispatcher (xformers' _TEST_K habit):
a case a kernel does not support is skipped with the kernel's own reasons, which are what a
user forcing that kernel would read."""
import pytest
import torch

from attnlib import dispatch
from attnlib.api import build_inputs
from attnlib.cuda.specs import BLOCK_SPARSE_BLOCK_SIZES
from attnlib.reference import block_sparse_reference, flash_reference, linear_reference
from attnlib.testing import assert_flash_rule, make_qkv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (id, batch, heads, kv_heads, seq_q, seq_k, head_dim, dtype, layout, causal)
CASES = [
    ("b2h4-s33-d64-fp32", 2, 4, 4, 33, 33, 64, torch.float32, "bhsd", False),
    ("gqa-s17x40-d32-fp16-causal", 1, 4, 2, 17, 40, 32, torch.float16, "bshd", True),
    ("mqa-s40x17-d64-fp32-causal", 1, 4, 1, 40, 17, 64, torch.float32, "bhsd", True),
    ("s65-d128-fp16", 1, 2, 2, 65, 65, 128, torch.float16, "bshd", False),
    ("s19-d40-fp64", 1, 2, 2, 19, 19, 40, torch.float64, "bhsd", True),
]
BLOCK = (16, 16)
# block_sparse-cuda takes only BLOCK_SPARSE_BLOCK_SIZES: with BLOCK alone it would skip every case,
# on a GPU too
KERNEL_BLOCK = {"block_sparse-cuda": BLOCK_SPARSE_BLOCK_SIZES[0]}


def _method_options(kernel, case):
    _, b, h, hkv, sq, sk, d, dtype, layout, causal = case
    if kernel.method == "block_sparse":
        block = KERNEL_BLOCK.get(kernel.name, BLOCK)
        g = torch.Generator().manual_seed(sq * 31 + sk)
        mq, mk = -(-sq // block[0]), -(-sk // block[1])
        mask = torch.rand(1, h, mq, mk, generator=g) < 0.6
        return {"block_mask": mask.to(DEVICE), "block_size": block}
    return {}


def _reference(method, q, k, v, causal, opts):
    if method == "flash":
        return flash_reference(q, k, v, causal=causal)
    if method == "block_sparse":
        return block_sparse_reference(q, k, v, opts["block_mask"], block_size=opts["block_size"], causal=causal)
    return linear_reference(q, k, v, causal=causal)


def _grid(methods):
    for m in methods:
        for kernel in dispatch.kernels(m):
            for case in CASES:
                yield pytest.param(kernel, case, id=f"{kernel.name}-{case[0]}")


@pytest.mark.parametrize("kernel,case", list(_grid(("flash", "block_sparse", "linear"))))
def test_kernel_against_float64_reference(kernel, case):
    _, b, h, hkv, sq, sk, d, dtype, layout, causal = case
    opts = _method_options(kernel, case)
    q, k, v = make_qkv(b, h, sq, d, kv_heads=hkv, seq_k=sk, dtype=dtype, device=DEVICE, layout=layout)
    inp = build_inputs(q, k, v, method=kernel.method, layout=layout, causal=causal, **opts)
    reasons = kernel.not_supported_reasons(inp)
    if reasons:
        pytest.skip("; ".join(reasons))
    out = kernel.forward(inp)
    assert out.shape == inp.q.shape[:3] + (inp.head_dim_v,) and out.dtype == dtype
    ref = _reference(kernel.method, inp.q.double(), inp.k.double(), inp.v.double(), causal, opts)
    # PyTorch's own answer in the kernel's dtype sets the error a user already accepts
    same = _reference(kernel.method, inp.q, inp.k, inp.v, causal, opts)
    assert_flash_rule(out, ref, same, factor=2.0)
