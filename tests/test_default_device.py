"""A process default device (``torch.set_default_device("cuda")`` or a ``with torch.device(...)``
block around a model's forward) does not move attnlib's own host-side index tensors: calls on CPU
tensors give the same results as without it. The meta device stands in for another device here
(no data: any tensor attnlib made there without naming a device would fail when read).
Before, AsymRnR's partition and flash_attn_with_kvcache's host planning made theirs on the
default device."""
from __future__ import annotations

import importlib

import pytest
import torch

import attnlib
from attnlib.asymrnr import partition
from attnlib.compat import flash_attn as fa


@pytest.fixture
def elsewhere():
    """Run the body with the default device set to meta; restored after."""
    def run(fn):
        # the package exports the function under the module's name
        importlib.import_module("attnlib.asymrnr.partition")._cached_partition.cache_clear()
        torch.set_default_device("meta")
        try:
            return fn()
        finally:
            torch.set_default_device(None)
    return run


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype, device="cpu")


def _same(a, b):
    a, b = (a if isinstance(a, (tuple, list)) else (a,)), (b if isinstance(b, (tuple, list)) else (b,))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.device.type == "cpu" and y.device.type == "cpu"
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_asymrnr_partition_and_attention(elsewhere):
    want = partition((3, 5, 6), seed=7)
    got = elsewhere(lambda: partition((3, 5, 6), seed=7))
    _same((got.dst, got.src), (want.dst, want.src))
    q, k, v = (_rand(1, 2, 90, 16, seed=s) for s in range(3))

    def call():
        return attnlib.attention(q, k, v, method="asymrnr", grid=(3, 5, 6), q_ratio=0.5, kv_ratio=0.5)
    _same(elsewhere(call), call())


@pytest.mark.parametrize("paged", [False, True])
def test_flash_attn_with_kvcache(elsewhere, paged):
    batch, heads, dim = 2, 4, 16
    q = _rand(batch, 3, heads, dim, seed=1)
    k_new, v_new = _rand(batch, 3, 2, dim, seed=2), _rand(batch, 3, 2, dim, seed=3)
    lengths = torch.tensor([5, 11], dtype=torch.int32, device="cpu")
    if paged:  # 4 pages of 8 positions; each row reads two of them
        cache_shape, table = (4, 8, 2, dim), torch.tensor([[2, 0], [1, 3]], dtype=torch.int32, device="cpu")
    else:
        cache_shape, table = (batch, 16, 2, dim), None
    k_cache, v_cache = _rand(*cache_shape, seed=4), _rand(*cache_shape, seed=5)

    def call():
        kc, vc = k_cache.clone(), v_cache.clone()
        out, lse = fa.flash_attn_with_kvcache(q, kc, vc, k=k_new, v=v_new, cache_seqlens=lengths,
                                              block_table=table, causal=True, return_softmax_lse=True)
        return out, lse, kc, vc
    _same(elsewhere(call), call())


def test_dense_methods_and_varlen(elsewhere):
    q, k, v = _rand(2, 4, 45, 16, seed=1), _rand(2, 2, 45, 16, seed=2), _rand(2, 2, 45, 16, seed=3)
    packed = _rand(50, 4, 16, seed=4)
    cu = torch.tensor([0, 20, 50], dtype=torch.int32, device="cpu")

    def calls():
        return ([attnlib.attention(q, k, v, method=m, causal=True) for m in ("flash", "sage", "linear")]
                + list(attnlib.flash_attention_varlen(packed, packed, packed, cu, cu, 30, 30, return_lse=True)))
    _same(elsewhere(calls), calls())
