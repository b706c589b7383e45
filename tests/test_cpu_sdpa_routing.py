"""Method flash on CPU tensors routed to torch SDPA (flash-torch-sdpa, cpu_priority) and the
paths around it: results against the float64 reference, what stays on the other kernels, torch's
probe warnings, and the backward re-selecting the kernel its forward ran."""
from __future__ import annotations

import warnings

import pytest
import torch

import attnlib
from attnlib import dispatch
from attnlib.reference import flash_reference

@pytest.fixture(autouse=True)
def no_triton_interpreter(monkeypatch):
    """What auto picks for CPU tensors outside the Triton tests (conftest sets TRITON_INTERPRET=1)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}


def qkv(b, hq, sq, d, *, hkv=None, sk=None, dv=None, dtype=torch.float32, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    hkv, sk, dv = hkv or hq, sk if sk is not None else sq, dv or d
    ts = [torch.randn(*s, generator=g).to(dtype) for s in ((b, hq, sq, d), (b, hkv, sk, d), (b, hkv, sk, dv))]
    return [t.requires_grad_(requires_grad) for t in ts]


def chosen(q, k, v, **kw) -> str:
    return attnlib.explain(q, k, v, **kw).chosen.name


def ref64(q, k, v, **kw):
    return flash_reference(q.detach().double(), k.detach().double(), v.detach().double(), **kw)


CASES = {  # name: (qkv kwargs, call kwargs, kernel torch 2.x picks on the CPU)
    "causal": (dict(b=2, hq=4, sq=33, d=64), dict(causal=True), "flash-torch-sdpa"),
    "gqa causal": (dict(b=2, hq=8, hkv=2, sq=33, d=64), dict(causal=True), "flash-torch-sdpa"),
    "seq_q != seq_k": (dict(b=1, hq=2, sq=7, sk=50, d=64), {}, "flash-torch-sdpa"),
    "head_dim 20": (dict(b=1, hq=2, sq=33, d=20), dict(causal=True), "flash-torch-sdpa"),
    "explicit scale": (dict(b=1, hq=2, sq=33, d=64), dict(scale=1e-30), "flash-torch-sdpa"),
    "head_dim_v != head_dim": (dict(b=1, hq=2, sq=33, d=64, dv=32), {}, "flash-torch-chunked"),
    "bottom-right causal": (dict(b=1, hq=2, sq=7, sk=50, d=64), dict(causal=True), "flash-torch-chunked"),
    "no keys": (dict(b=1, hq=2, sq=5, sk=0, d=64), {}, "flash-torch-chunked"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_cpu_inference_matches_the_float64_reference(case, dtype):
    shape, call, want = CASES[case]
    q, k, v = qkv(**shape, dtype=dtype)
    assert chosen(q, k, v, **call) == want
    out = attnlib.flash_attention(q, k, v, **call)
    ref = ref64(q, k, v, **call)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype], rtol=0)
    # bshd views of the same tensors: strided, not copied
    outb = attnlib.flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout="bshd", **call)
    torch.testing.assert_close(outb.transpose(1, 2).double(), ref, atol=TOL[dtype], rtol=0)


def grads_against_reference(q, k, v, dout, layout="bhsd", **call):
    """(out, dq, dk, dv) of attnlib.flash_attention and the float64 reference's (in bhsd), for dout."""
    for t in (q, k, v):
        t.grad = None
    out = attnlib.flash_attention(q, k, v, layout=layout, **call)
    out.backward(dout)
    bhsd = (lambda t: t.transpose(1, 2)) if layout == "bshd" else (lambda t: t)
    q64, k64, v64 = (bhsd(t.detach()).double().requires_grad_() for t in (q, k, v))
    o64 = flash_reference(q64, k64, v64, **call)
    o64.backward(bhsd(dout).double())
    return (bhsd(out), bhsd(q.grad), bhsd(k.grad), bhsd(v.grad)), (o64, q64.grad, k64.grad, v64.grad)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("case", ["causal", "gqa causal", "seq_q != seq_k", "head_dim 20"])
def test_fp32_training_runs_torch_sdpa_and_its_own_backward(case, layout):
    """A graph-building fp32 CPU call runs torch's SDPA outside attnlib's op: its autograd node is
    SDPA's (no forward recompute), gradients match the float64 reference within fp32's bound."""
    shape, call, _ = CASES[case]
    q, k, v = qkv(**shape, seed=3)
    if layout == "bshd":  # bshd-contiguous leaves
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    assert chosen(q, k, v, layout=layout, **call) == "flash-torch-sdpa"
    got, want = grads_against_reference(q, k, v, torch.randn_like(q), layout, **call)
    assert "attnlib" not in type(got[0].grad_fn).__name__
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=2e-5, rtol=1e-5)


def test_fp32_training_gradients_do_not_depend_on_the_thread_count():
    """attnlib's backward promise (deterministic=True, the default) holds on torch's CPU kernel:
    one thread walks all of a (batch, head)'s blocks, whatever the number of threads."""
    q, k, v = qkv(2, 6, 301, 64, hkv=3, requires_grad=True, seed=4)
    dout = torch.randn(2, 6, 301, 64)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs.append(grads_against_reference(q, k, v, dout, causal=True)[0])
    finally:
        torch.set_num_threads(before)
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_training_keeps_the_chunked_kernel(dtype):
    """torch's CPU backward adds dQ/dK/dV up in the input dtype (dV 2.7x the chunked kernel's
    error, fp16 causal): 16-bit graph-building calls stay on flash-torch-chunked, which matches
    the float64 reference within flash_attn's rule; without a graph they run SDPA."""
    q, k, v = qkv(1, 4, 200, 64, dtype=dtype, requires_grad=True, seed=5)
    assert chosen(q, k, v, causal=True) == "flash-torch-chunked"
    assert chosen(q, k, v, causal=True, deterministic=False) == "flash-torch-chunked"
    with torch.no_grad():
        assert chosen(q, k, v, causal=True) == "flash-torch-sdpa"
        out = attnlib.flash_attention(q, k, v, causal=True)
    assert out.grad_fn is None
    torch.testing.assert_close(out.double(), ref64(q, k, v, causal=True), atol=TOL[dtype], rtol=0)
    got, want = grads_against_reference(q, k, v, torch.randn(1, 4, 200, 64).to(dtype), causal=True)
    assert "attnlib" in type(got[0].grad_fn).__name__
    for g, w in zip(got[1:], want[1:]):
        assert (g.double() - w).abs().max() <= 3 * TOL[dtype] * max(1.0, w.abs().max().item())


def test_fp32_training_torch_sdpa_cannot_serve_keeps_the_chunked_kernel():
    """lse, bottom-right causal and a value head dim other than the query's (torch's CPU flash
    backward refuses it) stay on flash-torch-chunked and attnlib's op."""
    q, k, v = qkv(1, 2, 7, 64, sk=50, requires_grad=True)
    assert chosen(q, k, v, causal=True) == "flash-torch-chunked"  # bottom-right
    q, k, v = qkv(1, 2, 33, 64, dv=32, requires_grad=True)
    assert chosen(q, k, v) == "flash-torch-chunked"
    got, want = grads_against_reference(q, k, v, torch.randn(1, 2, 33, 32))
    assert "attnlib" in type(got[0].grad_fn).__name__
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=2e-5, rtol=1e-5)
    q, k, v = qkv(1, 2, 33, 64, requires_grad=True)
    assert chosen(q, k, v, return_lse=True) == "flash-torch-chunked"
    out, lse = attnlib.flash_attention(q, k, v, return_lse=True)
    assert "attnlib" in type(out.grad_fn).__name__


def test_patched_sdpa_training_runs_torch_sdpa_once():
    """Through the SDPA drop-in an fp32 CPU training call gets torch's kernel and backward too."""
    from attnlib.integrations.sdpa import patch_sdpa

    q, k, v = qkv(1, 4, 65, 64, hkv=2, requires_grad=True, seed=6)
    with patch_sdpa():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert "attnlib" not in type(out.grad_fn).__name__
    dout = torch.randn_like(out)
    out.backward(dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    flash_reference(q64, k64, v64, causal=True).backward(dout.double())
    for t, t64 in ((q, q64), (k, k64), (v, v64)):
        torch.testing.assert_close(t.grad.double(), t64.grad, atol=2e-5, rtol=1e-5)


def test_no_torch_warnings_from_the_rank_probe_with_math_off():
    """With torch's math backend switched off (sdpa_kernel), torch._fused_sdp_choice warns why its
    fused kernels cannot take inputs attnlib then runs elsewhere: the rank's probe keeps them quiet."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = qkv(1, 2, 16, 64, dv=32)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert chosen(q, k, v) == "flash-torch-chunked"
        out = attnlib.flash_attention(q, k, v)
    assert [str(w.message) for w in caught] == []
    torch.testing.assert_close(out.double(), ref64(q, k, v), atol=2e-5, rtol=0)


@pytest.fixture
def sdpa_ranks_as_on_gpu(monkeypatch):
    """flash-torch-sdpa ranked as on a GPU (where it outranks flash-torch-chunked for graph-building
    calls, and flash-triton for deterministic=False fp16/bf16 ones), with the kernels each
    dispatch selects recorded."""
    from attnlib.kernels import flash_sdpa

    monkeypatch.setattr(flash_sdpa, "on_gpu", lambda inp: True)
    monkeypatch.setattr(flash_sdpa, "fused_sdpa_possible", lambda inp: True)
    selected = []
    real = dispatch.select

    def spy(inp, backend="auto"):
        kernel = real(inp, backend)
        selected.append(kernel.name)
        return kernel

    monkeypatch.setattr(dispatch, "select", spy)
    return selected


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_backward_reselects_the_forward_kernel_with_return_lse(sdpa_ranks_as_on_gpu, compiled):
    """A graph-building call with return_lse=True cannot run on torch SDPA (no lse); its backward
    must re-select the kernel its forward ran, not torch SDPA (return_lse is part of the choice):
    SDPA's backward drops dlse, giving wrong gradients wherever the loss reads the lse."""
    q, k, v = qkv(1, 2, 16, 64, dtype=torch.float16, requires_grad=True, seed=1)

    def f(q, k, v):
        return attnlib.flash_attention(q, k, v, causal=True, return_lse=True)

    if compiled:
        f = torch.compile(f, backend="aot_eager", fullgraph=True)
    out, lse = f(q, k, v)
    (out.float().sum() + lse.sum()).backward()
    assert set(sdpa_ranks_as_on_gpu) == {"flash-torch-chunked"}, sdpa_ranks_as_on_gpu
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o64, l64 = flash_reference(q64, k64, v64, causal=True, return_lse=True)
    (o64.sum() + l64.sum()).backward()
    for t, t64 in ((q, q64), (k, k64), (v, v64)):
        torch.testing.assert_close(t.grad.double(), t64.grad, atol=1e-2, rtol=1e-2)
