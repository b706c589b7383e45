"""The attnlib::attention custom op: autograd, opcheck, torch.compile(fullgraph=True)."""
import pytest
import torch

import attnlib
from attnlib import dispatch, ops
from attnlib.reference import flash_reference
from attnlib.testing import assert_verbose_allclose, make_qkv


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_gradients_through_the_op_match_reference_autograd(layout):
    q, k, v = make_qkv(1, 4, 19, 16, kv_heads=2, seq_k=23, layout=layout, dtype=torch.float64, requires_grad=True)
    out, lse = attnlib.flash_attention(q, k, v, causal=True, layout=layout, return_lse=True, backend="torch")
    w_out, w_lse = torch.randn_like(out), torch.randn_like(lse)
    g = torch.autograd.grad((out * w_out).sum() + (lse * w_lse).sum(), (q, k, v))
    tr = (lambda t: t.transpose(1, 2)) if layout == "bshd" else (lambda t: t)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    r_out, r_lse = flash_reference(tr(q2), tr(k2), tr(v2), causal=True, return_lse=True)
    g_ref = torch.autograd.grad((tr(r_out) * w_out).sum() + (r_lse * w_lse).sum(), (q2, k2, v2))
    for a, b, n in zip(g, g_ref, "qkv"):
        assert_verbose_allclose(a, b, atol=1e-10, name=f"d{n}")


def test_sla_projection_gets_gradients():
    """Every input's gradient through the op, the projection's included, equals float64 autograd
    through sla_reference; the projection's also a central difference of the op's own output (the
    output is affine in (w, b): the difference is exact up to rounding), which does not rely on
    any backward."""
    from attnlib.reference import sla_reference

    kw = dict(critical=0.3, negligible=0.2, block_size=(8, 8))
    q, k, v = make_qkv(1, 2, 40, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(16, dtype=torch.float64, requires_grad=True)
    out = attnlib.sla_attention(q, k, v, w, b, **kw)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, w, b), dout)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, w, b)]
    want = torch.autograd.grad(sla_reference(*leaves, **kw), leaves, dout)
    for name, g, r in zip(("dq", "dk", "dv", "dW", "db"), got, want):
        assert_verbose_allclose(g, r, atol=1e-10, name=name)
    assert got[3].abs().sum() > 0 and got[4].abs().sum() > 0
    dw, db = torch.randn_like(w), torch.randn_like(b)
    with torch.no_grad():
        f = lambda t: (attnlib.sla_attention(q, k, v, w + t * dw, b + t * db, **kw) * dout).sum()  # noqa: E731
        fd = (f(0.5) - f(-0.5)).item()
    ad = ((got[3] * dw).sum() + (got[4] * db).sum()).item()
    assert abs(fd - ad) <= 1e-9 * (1 + abs(ad)), (fd, ad)


def _opcheck_args(method, **opts):
    q, k, v = make_qkv(1, 2, 12, 8, dtype=torch.float64, requires_grad=True)
    return (q, k, v), dict(method=method, backend="torch", layout="bhsd", causal=False, scale=None,
                           return_lse=method in ("flash", "block_sparse"), needs_grad=True,
                           **ops.op_arguments(method, opts))


@pytest.mark.parametrize("method,opts", [
    ("flash", {}), ("linear", {}), ("sla", {"block_size": (4, 4)}),
    ("block_sparse", {"block_mask": torch.tensor([[[[True]]]]), "block_size": (16, 16)}),
])
def test_opcheck(method, opts):
    args, kwargs = _opcheck_args(method, **opts)
    torch.library.opcheck(ops.attention_op, args, kwargs)


def test_opcheck_sla_triton_keeps_lse_for_backward():
    """sla-triton returns the critical blocks' lse in the op's lse slot when a backward follows
    (options.AUX_LSE): a real (B, H, Sq) tensor that the fake implementation must describe."""
    pytest.importorskip("triton")
    q, k, v = make_qkv(1, 2, 40, 16, dtype=torch.float32, requires_grad=True, seed=2)
    kwargs = dict(method="sla", backend="triton", layout="bhsd", causal=True, scale=None, return_lse=False,
                  needs_grad=True, **ops.op_arguments("sla", {"block_size": (16, 16), "critical": 0.5}))
    out, lse = ops.attention_op(q, k, v, **kwargs)
    assert lse.shape == (1, 2, 40) and torch.isfinite(lse).all()
    torch.library.opcheck(ops.attention_op, (q, k, v), kwargs)


class TinyAttentionBlock(torch.nn.Module):
    def __init__(self, dim=32, heads=2, **attn_kw):
        super().__init__()
        self.heads, self.attn_kw = heads, attn_kw
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).unbind(2)
        o = attnlib.attention(q, k, v, layout="bshd", **self.attn_kw)
        return self.proj(o.reshape(b, s, d))


@pytest.mark.parametrize("attn_kw", [{"method": "flash", "causal": True}, {"method": "linear"}])
def test_torch_compile_fullgraph_matches_eager(attn_kw):
    torch._dynamo.reset()
    m = TinyAttentionBlock(**attn_kw)
    x = torch.randn(2, 24, 32)
    eager = m(x)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    assert_verbose_allclose(got, eager, atol=1e-6)
    got.sum().backward()
    assert m.qkv.weight.grad is not None and torch.isfinite(m.qkv.weight.grad).all()


def test_compiled_numpy_scalar_options_match_eager():
    """NumPy float scalars written into the code (np.float32 scales and eps) trace: dynamo turns
    them into 0-d arrays, which the op's float arguments refused before. Eagerly NumPy integers
    serve as block sizes too."""
    np = pytest.importorskip("numpy")
    torch._dynamo.reset()
    q, k, v = make_qkv(1, 2, 20, 16, kv_heads=1)
    mask = torch.rand(1, 2, 3, 3) > 0.3

    def f(q, k, v, block=(8, 8)):
        return (attnlib.flash_attention(q, k, v, scale=np.float32(0.3), causal=True)
                + attnlib.linear_attention(q, k, v, eps=np.float32(1e-3))
                + attnlib.block_sparse_attention(q, k, v, mask, block_size=block, scale=np.float64(0.2)))

    want = (attnlib.flash_attention(q, k, v, scale=float(np.float32(0.3)), causal=True)
            + attnlib.linear_attention(q, k, v, eps=float(np.float32(1e-3)))
            + attnlib.block_sparse_attention(q, k, v, mask, block_size=(8, 8), scale=0.2))
    assert_verbose_allclose(f(q, k, v, (np.int64(8), np.int32(8))), want, atol=0)
    assert_verbose_allclose(torch.compile(f, fullgraph=True, backend="eager")(q, k, v), want, atol=0)


@pytest.mark.parametrize("method,options", [("flash", {}), ("sla", dict(block_size=(16, 16), critical=0.5,
                                                                               negligible=0.0))])
def test_compiled_backward_runs_the_backend_forward_ran(method, options, monkeypatch):
    """A compiled forward inside use_backend("torch"), its backward outside: the graph's ops
    resolved "auto" when they ran, so the backward re-selected (the Triton kernel under the
    interpreter, as on a GPU) against the torch kernel's forward. Now the name is resolved while
    tracing, and dynamo's guard on the override retraces the graph outside the block."""
    torch._dynamo.reset()
    q, k, v = make_qkv(1, 2, 64, 16, requires_grad=True)
    dout = torch.randn(1, 2, 64, 16)
    f = torch.compile(lambda q, k, v: attnlib.attention(q, k, v, method=method, **options), fullgraph=True,
                      backend="aot_eager")
    seen = []
    real = dispatch.select
    monkeypatch.setattr(dispatch, "select", lambda inp, backend="auto": seen.append(real(inp, backend))
                        or real(inp, backend))
    with attnlib.use_backend("torch"):
        out = f(q, k, v)
    torch_kernels = {k.name for k in seen}
    assert all(k.backend == "torch" for k in seen), torch_kernels
    seen.clear()
    got = torch.autograd.grad(out, (q, k, v), dout)
    assert seen and all(k.backend == "torch" for k in seen), [k.name for k in seen]
    want = torch.autograd.grad(attnlib.attention(q, k, v, method=method, backend="torch", **options), (q, k, v),
                               dout)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5, msg=name)
    seen.clear()
    f(q, k, v)  # outside the block: retraced, "auto" again
    assert any(k.backend != "torch" for k in seen), [k.name for k in seen]


def test_compiled_bad_input_still_raises():
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v: attnlib.flash_attention(q, k, v), fullgraph=True, backend="eager")
    q, k, v = make_qkv(1, 4, 8, 16)
    with pytest.raises(Exception, match="multiple of key/value heads"):
        f(q, k[:, :3], v[:, :3])


def test_compiled_unknown_option_raises():
    """Option names are checked in Python before the op, compiled too: the op's schema has a slot
    for every method's options and would otherwise drop an unknown name without a word."""
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v: attnlib.attention(q, k, v, method="flash", bogus=1, backend="torch"),
                      backend="eager")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['bogus'\]"):
        f(*make_qkv(1, 2, 16, 16))


def test_compiled_patched_sdpa_fullgraph():
    torch._dynamo.reset()
    q, k, v = make_qkv(1, 2, 16, 16)
    with attnlib.patch_sdpa():
        f = torch.compile(lambda a, b, c: torch.nn.functional.scaled_dot_product_attention(a, b, c, is_causal=True),
                          fullgraph=True, backend="aot_eager")
        got = f(q, k, v)
    ref = flash_reference(q.double(), k.double(), v.double(), causal=True)
    assert_verbose_allclose(got, ref, atol=1e-5)


def _varlen_inputs(dtype=torch.float64):
    lens = [5, 0, 9]
    cu = torch.tensor([0, 5, 5, 14], dtype=torch.int32)
    q, k, v = (torch.randn(14, 4 if i == 0 else 2, 8, dtype=dtype, requires_grad=True) for i in range(3))
    return q, k, v, cu, max(lens)


@pytest.mark.parametrize("backend,deterministic", [("torch", True), ("triton", True), ("triton", False)])
def test_varlen_opcheck(backend, deterministic):
    q, k, v, cu, m = _varlen_inputs(torch.float64 if backend == "torch" else torch.float32)
    torch.library.opcheck(torch.ops.attnlib.flash_varlen.default,
                          (q, k, v, cu, cu, m, m, True, 0.3, backend, deterministic))


def test_varlen_compiles_fullgraph_and_matches_eager():
    torch._dynamo.reset()
    q, k, v, cu, m = _varlen_inputs()
    f = lambda a, b, c: attnlib.flash_attention_varlen(a, b, c, cu, cu, m, m, causal=True, backend="torch")  # noqa
    eager = f(q, k, v)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    assert_verbose_allclose(got, eager, atol=1e-12)
    g_eager = torch.autograd.grad(eager.sum(), (q, k, v))
    g_comp = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v).sum(), (q, k, v))
    for a, b in zip(g_comp, g_eager):
        assert_verbose_allclose(a, b, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_compile_fullgraph_with_fused_kernels(backend):
    torch._dynamo.reset()
    q, k, v = make_qkv(2, 4, 300, 64, dtype=torch.float16, device="cuda", layout="bshd", requires_grad=True)
    f = lambda a, b, c: attnlib.flash_attention(a, b, c, causal=True, layout="bshd", backend=backend)  # noqa
    eager = f(q, k, v)
    got = torch.compile(f, fullgraph=True)(q, k, v)
    assert_verbose_allclose(got, eager, atol=0)
    got.float().sum().backward()
    assert torch.isfinite(q.grad).all()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_cuda_graph_capture_and_replay(backend):
    q, k, v = make_qkv(1, 4, 257, 128, dtype=torch.bfloat16, device="cuda")
    attnlib.flash_attention(q, k, v, backend=backend)  # compile / autotune outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = attnlib.flash_attention(q, k, v, backend=backend)
    for _ in range(2):
        for t in (q, k, v):
            t.copy_(torch.randn_like(t))
        g.replay()
        torch.cuda.synchronize()
        ref = attnlib.flash_attention(q, k, v, backend="torch")
        assert_verbose_allclose(out, ref, atol=2e-2)


def test_flop_counter_counts_flash_like_torch_sdpa():
    """FlopCounterMode sees attnlib's op as one opaque call: flash gets torch's SDPA formulas
    (forward QK^T + PV, backward with the recompute: 2.5x), with GQA counted per query head;
    other methods are not dense attention and count 0 rather than a wrong number."""
    from torch.utils.flop_counter import FlopCounterMode

    b, hq, hkv, sq, sk, d = 2, 4, 2, 40, 56, 16
    q, k, v = make_qkv(b, hq, sq, d, kv_heads=hkv, seq_k=sk, layout="bshd", requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        attnlib.flash_attention(q, k, v, layout="bshd", causal=True).sum().backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    fwd = 4 * b * hq * sq * sk * d
    assert counts["attnlib.attention"] == fwd and counts["attnlib.attention_backward"] == fwd * 5 // 2, counts
    with FlopCounterMode(display=False) as counter:
        attnlib.linear_attention(q, k, v, layout="bshd").sum().backward()
    assert counter.get_total_flops() == 0


@pytest.mark.parametrize("method,options", [("linear", {}), ("linear", {"causal": True}), ("flash", {}),
                                            ("block_sparse", None)])
def test_backward_under_flop_counter_equals_plain(method, options):
    """Under a TorchDispatchMode the kernels' backward must not rely on torch.func.vjp (its
    wrappers have no storage there): linear's backward pulled gradients through phi with it and
    failed under FlopCounterMode (on a GPU too). Same gradients with the mode as without."""
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v = make_qkv(1, 4, 37, 16, kv_heads=2, seq_k=45, requires_grad=True)
    if method == "block_sparse":
        mask = torch.rand(1, 4, 3, 3, generator=torch.Generator().manual_seed(3)) > 0.4
        call = lambda: attnlib.block_sparse_attention(q, k, v, mask, block_size=(16, 16))  # noqa: E731
    else:
        call = lambda: attnlib.attention(q, k, v, method=method, **options)  # noqa: E731
    want = torch.autograd.grad(call().square().sum(), (q, k, v))
    with FlopCounterMode(display=False):
        got = torch.autograd.grad(call().square().sum(), (q, k, v))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=0, rtol=0)
