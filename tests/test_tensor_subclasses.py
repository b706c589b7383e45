"""Tensor subclasses with their own __torch_dispatch__ and __torch_function__ disabled (DTensor,
quantized and logging wrappers) see attnlib's op itself, forward and backward, as they see
torch's SDPA: they decide how it runs on what they wrap. Before, the eager fast path
(ops.direct_call_ok asked has_torch_function, which is False for them) ran the kernels on the
wrappers: the subclass was dropped from outputs and gradients, or the kernel failed inside.

DTensor has no sharding rules for attnlib's op: attnlib.attention refuses it with a TypeError
naming the argument, and the SDPA drop-in leaves it to torch's SDPA, which has them.
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

import attnlib


class Wrapped(torch.Tensor):
    """A minimal wrapper subclass: unwraps every op's inputs, runs it, wraps its outputs, and
    records the op (an ordinary __torch_dispatch__ subclass, __torch_function__ disabled)."""

    seen: list = []

    @staticmethod
    def __new__(cls, elem):
        return torch.Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(), dtype=elem.dtype,
                                                   device=elem.device, requires_grad=elem.requires_grad)

    def __init__(self, elem):
        self.elem = elem

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(str(func))
        unwrap = lambda t: t.elem if isinstance(t, Wrapped) else t  # noqa: E731
        wrap = lambda t: Wrapped(t) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return tree_map(wrap, func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {})))


def _inputs(seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 4, 45, 16, generator=gen, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("method,dtype", [("flash", torch.float64), ("flash", torch.float16), ("sage", torch.float32),
                                          ("linear", torch.float32), ("sla", torch.float32),
                                          ("block_sparse", torch.float32)])
def test_dispatch_subclass_sees_the_op(method, dtype):
    opts = {"block_mask": torch.rand(1, 4, 3, 3, generator=torch.Generator().manual_seed(1)) < 0.7,
            "block_size": (16, 16)} if method == "block_sparse" else {}
    grad = method != "sage"
    plain = [t.requires_grad_(grad) for t in _inputs(0, dtype)]
    want = attnlib.attention(*plain, method=method, causal=True, **opts)
    wrapped = [Wrapped(t.detach().clone()).requires_grad_(grad) for t in plain]
    Wrapped.seen.clear()
    got = attnlib.attention(*wrapped, method=method, causal=True, **opts)
    assert isinstance(got, Wrapped) and "attnlib.attention.default" in Wrapped.seen
    torch.testing.assert_close(got.elem, want, rtol=0, atol=0)
    if grad:
        want.float().square().sum().backward()
        got.float().square().sum().backward()
        assert "attnlib.attention_backward.default" in Wrapped.seen
        for g, p in zip(wrapped, plain):
            assert isinstance(g.grad, Wrapped)
            torch.testing.assert_close(g.grad.elem, p.grad, rtol=0, atol=0)


def test_dispatch_subclass_through_the_sdpa_drop_in():
    q, k, v = _inputs(2)
    Wrapped.seen.clear()
    got = attnlib.scaled_dot_product_attention(*(Wrapped(t) for t in (q, k, v)))
    assert isinstance(got, Wrapped) and "attnlib.attention.default" in Wrapped.seen
    torch.testing.assert_close(got.elem, attnlib.scaled_dot_product_attention(q, k, v), rtol=0, atol=0)


@pytest.fixture
def one_rank_mesh():
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch without distributed")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this worker")
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("placement", ["replicate", "shard_heads"])
def test_dtensor(one_rank_mesh, placement):
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    place = Replicate() if placement == "replicate" else Shard(1)
    q, k, v = (distribute_tensor(t, one_rank_mesh, [place]) for t in _inputs(3))
    with pytest.raises(TypeError, match="q is a DTensor"):
        attnlib.attention(q, k, v)
    if placement != "replicate":
        return  # torch's head-sharded SDPA strategy takes ~10 s to set up on its first call here
    try:
        want = F.scaled_dot_product_attention(q, k, v)
    except NotImplementedError as e:  # torch 2.11: no sharding rule for its CPU flash kernel
        with pytest.raises(NotImplementedError, match=re.escape(str(e)[:60])):
            attnlib.scaled_dot_product_attention(q, k, v)  # torch's error, as torch raises it
        return
    got = attnlib.scaled_dot_product_attention(q, k, v)  # torch's SDPA, with its sharding rules
    assert isinstance(got, DTensor) and got.placements == (place,)
    torch.testing.assert_close(got.full_tensor(), want.full_tensor(), rtol=0, atol=0)
