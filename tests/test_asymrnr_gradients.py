"""AsymRnR pieces and gradients: the Triton gathers never cut a graph (small shapes, CPU interpreter).

AsymRnR's Triton reduce/restore gathers have no backward pass. The module (AsymRnR.attention)
and the functional reduce/restore used to run them on tensors that require grad and return
results cut off from the graph: with q_ratio 0 and kv_ratio > 0, k.grad and v.grad silently
stayed None. Now auto takes the torch gathers when a gradient is needed and an explicit
backend="triton" raises, naming the reason. Gradients are compared with the torch pieces'
(exact: same float64 ops).
"""
from __future__ import annotations

import types

import pytest
import torch

from attnlib.asymrnr import AsymRnR, match, partition, plan_reduction, reduce, restore
from attnlib.asymrnr._backend import use_triton
from attnlib.testing import make_qkv

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GRID = (3, 4, 5)
S = 60


def _cuda_like(requires_grad: bool):
    """What use_triton reads of a CUDA fp32 tensor (the auto rule picks Triton only on CUDA)."""
    return types.SimpleNamespace(is_cuda=True, dtype=torch.float32, requires_grad=requires_grad,
                                 device=torch.device("cuda"))


def test_auto_gathers_take_torch_when_a_gradient_is_needed():
    assert use_triton(_cuda_like(False), "auto", differentiable=True)
    assert not use_triton(_cuda_like(True), "auto", differentiable=True), "Triton gathers have no backward"
    with torch.no_grad():
        assert use_triton(_cuda_like(True), "auto", differentiable=True)
    assert use_triton(_cuda_like(True), "auto"), "the matching (a constant of the inputs) may stay on Triton"


@pytest.mark.parametrize("q_ratio,kv_ratio", [(0.5, 0.3), (0.0, 0.3), (0.5, 0.0)])
def test_module_triton_pieces_refuse_grad_instead_of_dropping_it(q_ratio, kv_ratio):
    q, k, v = make_qkv(1, 2, S, 16, seed=31, device=DEVICE, requires_grad=True)
    rnr = AsymRnR(GRID, q_ratio=q_ratio, kv_ratio=kv_ratio, backend="triton")
    with pytest.raises(ValueError, match="no backward"):
        rnr.attention(q, k, v)
    with torch.no_grad():  # inference: Triton pieces, same output as the torch pieces
        got = rnr.attention(q, k, v)
    want = AsymRnR(GRID, q_ratio=q_ratio, kv_ratio=kv_ratio, backend="torch").attention(q, k, v)
    torch.testing.assert_close(got, want.detach(), atol=2e-5, rtol=1e-5)
    # the torch pieces give every gradient, equal to the float64 run's (fp32 vs fp64: 1e-4)
    dout = torch.randn_like(want)
    grads = torch.autograd.grad(want, (q, k, v), dout)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = AsymRnR(GRID, q_ratio=q_ratio, kv_ratio=kv_ratio, backend="torch").attention(*leaves)
    for name, g, r in zip("qkv", grads, torch.autograd.grad(ref, leaves, dout.double())):
        assert g.abs().sum() > 0, f"d{name}"
        torch.testing.assert_close(g.double(), r, atol=1e-4, rtol=1e-4, msg=f"d{name}")


def test_functional_triton_reduce_restore_refuse_grad():
    x = make_qkv(1, 2, S, 16, seed=32, device=DEVICE, requires_grad=True)[0]
    p = partition(GRID, seed=0, device=DEVICE)
    plan = plan_reduction(p, match(x, p, backend="triton"), 0.5)  # matching a grad tensor is fine
    for mode in ("replace", "mean"):
        with pytest.raises(ValueError, match="no backward"):
            reduce(x, plan, mode=mode, backend="triton")
    y = reduce(x, plan, backend="torch")
    with pytest.raises(ValueError, match="no backward"):
        restore(y, plan, backend="triton")
    back = restore(y, plan, backend="auto")
    assert back.requires_grad and back.grad_fn is not None
    with torch.no_grad():
        assert torch.equal(restore(reduce(x, plan, backend="triton"), plan, backend="triton"), back)
