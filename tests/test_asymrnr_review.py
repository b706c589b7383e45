"""AsymRnR review mends, each test failing without its fix: the module's matching cache follows
settings changed on the object (grid, stride, seed, metric: a transposed resolution keeps the
token count, so the tensors' shapes alone reused the old partition for the rest of the epoch);
match() builds no autograd graph (the matching is a constant of the inputs, and cached matches
held the graph of the tensors they were made on); hand-built Matches with indices out of range
(negative ones wrapped around silently, large ones fault on the GPU) or a non-permutation order
are refused naming the field. Torch pieces on CPU, fresh seeded normals, small grids."""
from __future__ import annotations

import pytest
import torch

from attnlib.asymrnr import AsymRnR, Matches, match, partition, plan_reduction, reduce
from attnlib.testing import make_qkv

GRID = (2, 3, 5)
S = 30


@pytest.mark.parametrize("attr,value", [("grid", (2, 5, 3)), ("stride", (1, 2, 2)), ("seed", 7),
                                        ("metric", "dot")])
def test_module_cache_follows_changed_settings(attr, value):
    q, k, v = make_qkv(2, 2, S, 8, seed=31)
    rnr = AsymRnR(GRID, q_ratio=0.5, kv_ratio=0.5, backend="torch")
    rnr.attention(q, k, v, step=0)
    setattr(rnr, attr, value)
    got = rnr.attention(q, k, v, step=0)  # same step, same tensors: only the setting changed
    kw = {"grid": GRID, attr: value}
    fresh = AsymRnR(kw.pop("grid"), q_ratio=0.5, kv_ratio=0.5, backend="torch", **kw).attention(q, k, v, step=0)
    assert torch.equal(got, fresh), f"{attr} changed but the cached partition / matches were reused"
    # unchanged settings still hit the cache
    hits = rnr.cache_info()["hits"]
    rnr.attention(q, k, v, step=0)
    assert rnr.cache_info()["hits"] == hits + 2


def test_match_builds_no_autograd_graph():
    x = make_qkv(1, 2, S, 8, seed=32, requires_grad=True)[0]
    m = match(x, partition(GRID), backend="torch")
    assert not m.score.requires_grad and m.score.grad_fn is None
    q, k, v = make_qkv(1, 2, S, 8, seed=33, requires_grad=True)
    rnr = AsymRnR(GRID, backend="torch")
    out = rnr.attention(q, k, v)
    for _epoch, _sig, (_part, cached) in rnr.cache._entries.values():
        assert cached.score.grad_fn is None, "the cache keeps the inputs' autograd graph alive"
    out.sum().backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None


def test_hand_built_matches_are_checked():
    part = partition(GRID)
    x = make_qkv(1, 2, S, 8, seed=34)[0]
    m = match(x, part, backend="torch")
    # negative destinations wrapped around to the last ones without a word
    with pytest.raises(ValueError, match="matches.node"):
        plan_reduction(part, Matches(m.node - 1, m.score, m.order), 0.5)
    with pytest.raises(ValueError, match="matches.node"):
        plan_reduction(part, Matches(m.node + part.n_dst, m.score, m.order), 0.5)
    with pytest.raises(ValueError, match="matches.order"):
        plan_reduction(part, Matches(m.node, m.score, torch.zeros_like(m.order)), 0.5)
    with pytest.raises(TypeError, match="matches.order"):
        plan_reduction(part, Matches(m.node, m.score, m.order.float()), 0.5)
    # valid hand-built matches (int32 node too) plan as match()'s own do
    want = reduce(x, plan_reduction(part, m, 0.5))
    for node in (m.node, m.node.int()):
        assert torch.equal(reduce(x, plan_reduction(part, Matches(node, m.score, m.order), 0.5)), want)
