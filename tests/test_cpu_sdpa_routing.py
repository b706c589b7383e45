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


def test_requires_grad_inputs_use_sdpa_only_without_a_graph():
    q, k, v = qkv(1, 2, 33, 64, requires_grad=True)
    assert chosen(q, k, v, causal=True) == "flash-torch-chunked"
    assert chosen(q, k, v, causal=True, deterministic=False) == "flash-torch-chunked"
    with torch.no_grad():
        assert chosen(q, k, v, causal=True) == "flash-torch-sdpa"
        out = attnlib.flash_attention(q, k, v, causal=True)
    assert out.grad_fn is None
    torch.testing.assert_close(out.double(), ref64(q, k, v, causal=True), atol=2e-5, rtol=0)


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
