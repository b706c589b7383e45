"""Corners of the torch-backend kernels a fuzz against the float64 references checked and no other
test pins: inputs that are strided views (a last-two-dims transposed q, so its last-dim stride is
not 1; k and v broadcast over the batch by expand, stride 0), and gradients taken inside a CPU
bf16 autocast region (the kernels' matmuls must stay float32 there, forward and backward).

Each chunked kernel (flash, block_sparse, linear, sla: fp32 calls on the torch backend) is held to
the float64 reference: max|got - want| <= 2e-5 * max(1, max|want|), out and dq, dk, dv (and dW for
sla's projection).
"""
from __future__ import annotations

import pytest
import torch

import attnlib
from attnlib.reference import block_sparse_reference, flash_reference, linear_reference, sla_reference
from attnlib.testing import describe_mismatch

REL = 2e-5
BLOCK_MASK = torch.tensor([[[[True, False, True], [False, True, True], [True, True, False]]]])
CASES = {
    # method: (options, float64 reference(q, k, v, options, causal))
    "flash": ({}, lambda q, k, v, o, causal: flash_reference(q, k, v, causal=causal)),
    "block_sparse": ({"block_mask": BLOCK_MASK, "block_size": (8, 8)},
                     lambda q, k, v, o, causal: block_sparse_reference(q, k, v, o["block_mask"], block_size=(8, 8),
                                                                       causal=causal)),
    "linear": ({}, lambda q, k, v, o, causal: linear_reference(q, k, v, causal=causal)),
    "sla": ({"block_size": (8, 8), "critical": 0.3, "negligible": 0.2},
            lambda q, k, v, o, causal: sla_reference(q, k, v, o["proj_weight"], None, critical=0.3, negligible=0.2,
                                                     block_size=(8, 8), causal=causal)),
}
KERNELS = {"flash": "flash-torch-chunked", "block_sparse": "block_sparse-torch-chunked",
           "linear": "linear-torch-chunked", "sla": "sla-torch-chunked"}


def assert_close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    g, w = got.detach().double(), want.detach().double()
    assert g.shape == w.shape, f"{name}: shape {tuple(g.shape)} != {tuple(w.shape)}"
    bound = REL * max(1.0, w.abs().max().item())
    err = (g - w).abs().max().item()
    assert err <= bound, describe_mismatch(got, want, name) + f"\n  err {err:.3g} > {bound:.3g}"


def inputs(method: str, gen: torch.Generator):
    """q (2, 2, 20, 16) stored with its last two dims transposed; k, v (1, 1, 22, 16) leaves, used
    expanded to batch 2; sla's projection weight a leaf too. Returns (q, k, v as passed, leaves,
    options)."""
    q = torch.randn(2, 2, 16, 20, generator=gen).transpose(-1, -2).requires_grad_()
    k0 = torch.randn(1, 1, 22, 16, generator=gen).requires_grad_()
    v0 = torch.randn(1, 1, 22, 16, generator=gen).requires_grad_()
    options = dict(CASES[method][0])
    leaves = [q, k0, v0]
    if method == "sla":
        options["proj_weight"] = (0.3 * torch.randn(16, 16, generator=gen)).requires_grad_()
        leaves.append(options["proj_weight"])
    return q, k0.expand(2, -1, -1, -1), v0.expand(2, -1, -1, -1), leaves, options


def float64_grads(method: str, leaves, options, dout: torch.Tensor, causal: bool):
    """(out, grads of sum(out * dout) to the leaves) of the float64 reference."""
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    q, k0, v0 = leaves64[:3]
    opts = dict(options)
    if method == "sla":
        opts["proj_weight"] = leaves64[3]
    out = CASES[method][1](q, k0.expand(2, -1, -1, -1), v0.expand(2, -1, -1, -1), opts, causal)
    return out, torch.autograd.grad((out * dout).sum(), leaves64)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("method", list(CASES))
def test_strided_view_inputs_forward_and_backward(method, causal, flash_training_on_chunked):
    """A q whose last-dim stride is 20 and k, v with batch stride 0 run without a copy error and
    give the reference's out and gradients (the expanded k, v sum their batches' gradients).
    (attnlib.inputs copies the strided q to a contiguous one before any kernel sees it, which
    makes torch's SDPA a fused candidate for flash: the fixture keeps flash on the chunked kernel.)"""
    gen = torch.Generator().manual_seed(1)
    q, k, v, leaves, options = inputs(method, gen)
    assert q.stride(-1) != 1 and k.stride(0) == 0
    assert attnlib.explain(q, k, v, method=method, causal=causal, backend="torch", **options).chosen.name == \
        KERNELS[method]
    out = attnlib.attention(q, k, v, method=method, causal=causal, backend="torch", **options)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((out.double() * dout).sum(), leaves)
    want_out, want = float64_grads(method, leaves, options, dout, causal)
    assert_close(out, want_out, "out")
    for name, g, w in zip(("dq", "dk", "dv", "dW"), got, want):
        assert_close(g, w, name)


@pytest.mark.parametrize("method", list(CASES))
def test_gradients_inside_cpu_bf16_autocast_stay_float32(method):
    """Forward and backward both inside torch.autocast("cpu", bfloat16): the output keeps fp32 and
    the gradients fp32 accuracy (a kernel matmul autocast to bf16 would miss by ~1e-2)."""
    gen = torch.Generator().manual_seed(2)
    q, k, v, leaves, options = inputs(method, gen)
    dout = torch.randn(2, 2, 20, 16, generator=gen, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attnlib.attention(q, k, v, method=method, causal=True, backend="torch", **options)
        got = torch.autograd.grad((out.double() * dout).sum(), leaves)
    assert out.dtype == torch.float32
    want_out, want = float64_grads(method, leaves, options, dout, True)
    assert_close(out, want_out, "out")
    for name, g, w in zip(("dq", "dk", "dv", "dW"), got, want):
        assert g.dtype == torch.float32, name
        assert_close(g, w, name)
