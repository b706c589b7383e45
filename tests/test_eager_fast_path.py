"""Eager calls on plain tensors skip the torch.library dispatcher (ops.direct_call_ok): those that
need no gradient call the op's implementation directly, those that build a graph run it inside
ops.attnlib_attention (the op's own setup_context and backward); same results, gradients and
errors as through the op, and the op itself whenever a mode, a tensor subclass or tracing needs
to see it."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attnlib
from attnlib import ops
from attnlib.testing import make_qkv


@pytest.fixture
def paths(monkeypatch):
    """Which path each call took: ["direct"] or ["op"]. The registered op holds the original
    _attention_impl, which looks up _build at call time: a _build with no direct call before it
    came through the dispatcher."""
    seen = []
    direct, build = ops.attention_direct, ops._build

    def count_direct(*a, **kw):
        seen.append("direct")
        return direct(*a, **kw)

    def count_build(*a, **kw):
        if not seen:
            seen.append("op")
        return build(*a, **kw)
    monkeypatch.setattr(ops, "attention_direct", count_direct)
    monkeypatch.setattr(ops, "_build", count_build)
    return seen


def _mask(q, k, density=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(q.shape[0], q.shape[1], -(-q.shape[2] // 16), -(-k.shape[2] // 16), generator=g) < density


@pytest.mark.parametrize("method", ["flash", "block_sparse", "linear"])
def test_no_grad_calls_go_direct(paths, method):
    q, k, v = make_qkv(2, 4, 37, 16, kv_heads=2, seed=1)
    opts = {"block_sparse": dict(block_mask=_mask(q, k), block_size=(16, 16))}.get(method, {})
    out = attnlib.attention(q, k, v, method=method, backend="torch", **opts)
    assert paths == ["direct"] and out.shape == q.shape and torch.isfinite(out).all()


def test_same_results_and_lse_as_the_op():
    q, k, v = make_qkv(1, 2, 29, 16, seed=2)
    out, lse = attnlib.flash_attention(q, k, v, causal=True, return_lse=True, backend="torch")
    args = ops.op_arguments("flash", {})
    want_out, want_lse = torch.ops.attnlib.attention(q, k, v, method="flash", backend="torch", layout="bhsd",
                                                     causal=True, scale=None, return_lse=True, needs_grad=False,
                                                     **args)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    assert out.is_contiguous() and lse.dtype == torch.float32


def test_grad_needed_runs_the_op_implementation_with_its_autograd(paths, flash_training_on_chunked):
    q, k, v = make_qkv(1, 2, 16, 16, seed=3, requires_grad=True)
    out = attnlib.flash_attention(q, k, v, backend="torch")
    assert paths == ["op"] and type(out.grad_fn).__name__ == "attnlib_attentionBackward"
    paths.clear()
    with torch.no_grad():
        out = attnlib.flash_attention(q, k, v, backend="torch")
    assert paths == ["direct"] and out.grad_fn is None


def test_dispatch_modes_and_subclasses_see_the_op(paths):
    q, k, v = make_qkv(1, 2, 16, 16, seed=4)
    seen_ops = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen_ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record():
        attnlib.flash_attention(q, k, v, backend="torch")
    assert paths[0] == "op" and any("attnlib.attention" in s for s in seen_ops)

    class Sub(torch.Tensor):
        pass

    paths.clear()
    attnlib.flash_attention(q.as_subclass(Sub), k, v, backend="torch")
    assert paths == ["op"]


def test_errors_are_the_same_on_the_direct_path():
    q, k, v = make_qkv(1, 2, 16, 16, seed=5)
    with pytest.raises(ValueError, match="backend"):
        attnlib.flash_attention(q, k, v, backend="nope")
    with pytest.raises(ValueError, match="method"):
        attnlib.attention(q, k, v, method="nope")
    with pytest.raises(TypeError, match="k"):
        attnlib.flash_attention(q, k.numpy(), v)
    with pytest.raises((TypeError, ValueError), match="no_such_option"):
        attnlib.attention(q, k, v, method="flash", no_such_option=1)
    with pytest.raises(ValueError, match="scale"):
        attnlib.flash_attention(q, k, v, scale=float("nan"))
    with pytest.raises(ValueError, match="block_mask"):
        attnlib.block_sparse_attention(q, k, v, torch.ones(1, 2, 3, 3, dtype=torch.bool), block_size=(16, 16))
    mask = torch.ones(1, 2, 1, 1, dtype=torch.bool)
    for bad in (5, (16,), "ab"):  # tuple options are converted for the op only when they are sequences
        with pytest.raises(ValueError, match="block_size must be a pair"):
            attnlib.block_sparse_attention(q, k, v, mask, block_size=bad)
    with pytest.raises(TypeError, match="needs the option 'grid'"):
        attnlib.attention(q, k, v, method="asymrnr")
    with pytest.raises(TypeError, match="grid must be three ints"):
        attnlib.attention(q, k, v, method="asymrnr", grid=5)


@pytest.mark.parametrize("method", ["flash", "sla"])
def test_graph_building_calls_skip_torch_library_autograd(monkeypatch, method, flash_training_on_chunked):
    """Eager calls that build a graph run the op inside ops.attnlib_attention (the op's own
    setup_context and backward) instead of torch.library's generated autograd, whose per-call
    fill_defaults walks the 32-argument schema once per argument. Same outputs and gradients,
    bitwise, as the op with its registered autograd; GQA, odd length, causal; sla's W and b too."""
    import torch._library.utils as lib_utils

    q, k, v = make_qkv(1, 4, 45, 16, kv_heads=2, seed=7, requires_grad=True)
    opts = {}
    if method == "sla":
        w = (torch.randn(16, 16, generator=torch.Generator().manual_seed(8)) * 0.1).requires_grad_()
        b = (torch.randn(16, generator=torch.Generator().manual_seed(9)) * 0.1).requires_grad_()
        opts = dict(proj_weight=w, proj_bias=b, block_size=(16, 16), critical=0.3, negligible=0.2)
    leaves = (q, k, v) + tuple(t for t in opts.values() if isinstance(t, torch.Tensor))
    filled = []
    real_fill = lib_utils.fill_defaults
    monkeypatch.setattr(lib_utils, "fill_defaults", lambda *a: filled.append(1) or real_fill(*a))
    out = attnlib.attention(q, k, v, method=method, causal=True, backend="torch", **opts)
    assert "attnlib_attention" in type(out.grad_fn).__name__ and not filled
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(10))
    got = torch.autograd.grad(out, leaves, dout)
    want_out, _ = torch.ops.attnlib.attention(q, k, v, method=method, backend="torch", layout="bhsd", causal=True,
                                              scale=None, return_lse=False, needs_grad=True,
                                              **ops.op_arguments(method, opts))
    assert filled and "GeneratedBackwardFor_attnlib" in type(want_out.grad_fn).__name__
    want = torch.autograd.grad(want_out, leaves, dout)
    assert torch.equal(out, want_out)
    for g, w_ in zip(got, want):
        assert torch.equal(g, w_)


@pytest.mark.parametrize("uses", ["out", "lse", "both"])
def test_graph_building_gradients_when_lse_is_or_is_not_used(uses):
    """ops.attnlib_attention leaves unused gradients None (no zeros tensor for an unused lse);
    the gradients equal the op's registered autograd (which materialises them) whichever outputs
    reach the loss: out only, lse only (dout None), both. GQA, causal, odd length."""
    q, k, v = make_qkv(1, 4, 29, 16, kv_heads=2, seed=11, requires_grad=True)
    g = torch.Generator().manual_seed(12)
    w_out, w_lse = torch.randn(1, 4, 29, 16, generator=g), torch.randn(1, 4, 29, generator=g)

    def loss(out, lse):
        return {"out": (out * w_out).sum(), "lse": (lse * w_lse).sum(),
                "both": (out * w_out).sum() + (lse * w_lse).sum()}[uses]

    out, lse = attnlib.flash_attention(q, k, v, causal=True, return_lse=True, backend="torch")
    assert "attnlib_attention" in type(out.grad_fn).__name__
    got = torch.autograd.grad(loss(out, lse), (q, k, v))
    want_out, want_lse = torch.ops.attnlib.attention(q, k, v, method="flash", backend="torch", layout="bhsd",
                                                     causal=True, scale=None, return_lse=True, needs_grad=True,
                                                     **ops.op_arguments("flash", {}))
    want = torch.autograd.grad(loss(want_out, want_lse), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("reentrant", [False, True])
def test_graph_building_calls_under_activation_checkpointing(reentrant):
    """torch.utils.checkpoint (both kinds, as DiT training uses it) around an attnlib call: the
    forward is re-run in backward through ops.attnlib_attention; gradients equal the plain call's."""
    from torch.utils.checkpoint import checkpoint

    q, k, v = make_qkv(1, 4, 33, 16, kv_heads=2, seed=13, requires_grad=True)

    def f(q, k, v):
        return attnlib.flash_attention(q, k, v, causal=True, backend="torch")
    dout = torch.randn(1, 4, 33, 16, generator=torch.Generator().manual_seed(14))
    want = torch.autograd.grad(f(q, k, v), (q, k, v), dout)
    (checkpoint(f, q, k, v, use_reentrant=reentrant) * dout).sum().backward()
    for t, w in zip((q, k, v), want):
        assert torch.equal(t.grad, w)


@pytest.mark.parametrize("method,opts", [
    ("flash", {}), ("linear", dict(feature_map="relu")),
    ("sla", dict(block_size=(16, 16), critical=0.3, negligible=0.2)),
])
def test_sdpa_drop_in_validates_and_selects_once(monkeypatch, method, opts):
    """The drop-in checks a call (to decide between attnlib and torch), then runs the kernel it
    selected: one make_inputs and one selection per eager no-grad call (there were two of each,
    half of a small call's host time), with api.attention's result to the bit; a call needing a
    gradient still goes through api.attention (its autograd)."""
    from attnlib import dispatch, inputs
    from attnlib.integrations import sdpa

    q, k, v = make_qkv(1, 4, 37, 16, seed=3)
    if method == "sla":
        opts = dict(opts, proj_weight=0.1 * torch.randn(16, 16), proj_bias=torch.randn(16))
    want = attnlib.attention(q, k, v, method=method, **opts)
    counts = {"validate": 0, "select": 0}
    real_validate, real_select = inputs.validate_qkv, dispatch.select

    def validate(*a, **kw):
        counts["validate"] += 1
        return real_validate(*a, **kw)

    def select(*a, **kw):
        counts["select"] += 1
        return real_select(*a, **kw)
    monkeypatch.setattr(inputs, "validate_qkv", validate)
    monkeypatch.setattr(dispatch, "select", select)
    got = sdpa.scaled_dot_product_attention(q, k, v, method=method, **opts)
    assert counts == {"validate": 1, "select": 1}
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert got.is_contiguous()
    qg = q.clone().requires_grad_()
    out = sdpa.scaled_dot_product_attention(qg, k, v, method=method, **opts)
    assert out.grad_fn is not None
    (dq,) = torch.autograd.grad(out.sum(), qg)
    assert torch.isfinite(dq).all() and dq.abs().sum() > 0
