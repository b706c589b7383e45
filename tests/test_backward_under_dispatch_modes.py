"""A backward under a TorchDispatchMode (FlopCounterMode over a training step, memory trackers,
debugging modes) gives the gradients it gives without one, for the kernels whose backward
recomputes their forward under torch.func.vjp (attnlib.recompute): the float64 references,
AsymRnR's torch kernel, the varlen reference. Before, functorch could not wrap tensors inside
the mode's handler and those backwards raised "Cannot access storage of TensorWrapper"."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import attnlib
from attnlib.testing import make_qkv


class OpLog(TorchDispatchMode):
    """Records every op it sees and runs it unchanged."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def _grads(call, leaves, mode):
    for t in leaves:
        t.grad = None
    with mode:
        call().float().square().sum().backward()
    return [t.grad.clone() for t in leaves]


def _cases():
    q, k, v = make_qkv(1, 4, 45, 16, kv_heads=2, dtype=torch.float64, requires_grad=True, seed=0)
    w = torch.randn(16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    mask = torch.rand(1, 4, 3, 3, generator=torch.Generator().manual_seed(2)) < 0.6
    mask[..., 0] = True
    yield "flash fp64", (lambda: attnlib.attention(q, k, v, causal=True)), [q, k, v]
    yield "linear fp64", (lambda: attnlib.attention(q, k, v, method="linear", causal=True)), [q, k, v]
    yield "sla fp64", (lambda: attnlib.attention(q, k, v, method="sla", proj_weight=w, block_size=(16, 16))), [q, k, v, w]
    yield "block_sparse fp64", (lambda: attnlib.attention(q, k, v, method="block_sparse", block_mask=mask,
                                                          block_size=(16, 16), causal=True)), [q, k, v]
    for dtype in (torch.float32, torch.float64):
        a, b, c = make_qkv(1, 4, 64, 16, dtype=dtype, requires_grad=True, seed=3)
        yield f"asymrnr {dtype}", (lambda a=a, b=b, c=c: attnlib.attention(
            a, b, c, method="asymrnr", grid=(4, 4, 4), q_ratio=0.5, kv_ratio=0.5, backend="torch")), [a, b, c]
    packed = torch.randn(50, 4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4),
                         requires_grad=True)
    cu = torch.tensor([0, 20, 50], dtype=torch.int32)
    yield "varlen fp64", (lambda: attnlib.flash_attention_varlen(packed, packed, packed, cu, cu, 30, 30,
                                                                 causal=True)), [packed]


CASES = {name: (call, leaves) for name, call, leaves in _cases()}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("mode", ["oplog", "flops"])
def test_backward_under_mode_matches(name, mode):
    call, leaves = CASES[name]
    want = _grads(call, leaves, contextlib.nullcontext())
    active = OpLog() if mode == "oplog" else FlopCounterMode(display=False)
    got = _grads(call, leaves, active)
    for g, w in zip(got, want):
        assert torch.isfinite(w).all() and w.abs().sum() > 0
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    if mode == "oplog":  # the mode saw attnlib's backward op, not the recompute inside it
        assert any("backward" in op and "attnlib" in op for op in active.seen)


def test_autocast_state_kept_inside_recompute():
    """The lifted exclusions leave autocast as the op set it (off inside attnlib's kernels): the
    same gradients with and without a mode under torch.autocast."""
    q, k, v = make_qkv(1, 4, 64, 16, requires_grad=True, seed=5)

    def call():
        return attnlib.attention(q, k, v, method="asymrnr", grid=(4, 4, 4), q_ratio=0.5, kv_ratio=0.5,
                                 backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _grads(call, [q, k, v], contextlib.nullcontext())
        got = _grads(call, [q, k, v], OpLog())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["flash fp64", "asymrnr torch.float32", "sla fp64"])
def test_selective_activation_checkpointing(name):
    """torch.utils.checkpoint with a selective policy (SAC: its forward and recompute run under
    TorchDispatchModes) that saves attnlib's outputs and recomputes the rest: the same gradients."""
    from functools import partial

    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    call, leaves = CASES[name]

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if "attnlib" in str(op) else CheckpointPolicy.PREFER_RECOMPUTE

    def step(*ignored):
        return call().float().square().sum()
    want = torch.autograd.grad(step(), leaves)
    loss = checkpoint(step, *leaves, use_reentrant=False, context_fn=partial(create_selective_checkpoint_contexts, policy))
    for g, w in zip(torch.autograd.grad(loss, leaves), want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
