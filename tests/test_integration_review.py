"""Review of attnlib.integrations: torch's SDPA backend selection (sdpa_kernel, enable_*_sdp) is
honoured by the drop-in (diffusers' processor round trips are in test_diffusers.py). Small random
inputs; tolerances are stated per check."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import attnlib
from attnlib.integrations import sdpa as sdpa_module
from attnlib.integrations.sdpa import TORCH_SDPA
from attnlib.testing import assert_verbose_allclose, make_qkv, spy_attnlib_calls

# fp64 throughout the double-backward check: torch's math path and the check agree to 1e-12
FP64_TOL = 1e-12
# flash in fp32 against torch's SDPA: the same math, different summation order
FP32_ATOL, FP32_RTOL = 2e-6, 1e-5


@pytest.fixture
def attnlib_calls(monkeypatch):
    """The calls the drop-in hands to attnlib (by method)."""
    return spy_attnlib_calls(monkeypatch)


@pytest.fixture
def sdp_flags():
    """Restores torch's process-wide SDPA backend flags after a test that sets them directly."""
    names = ("flash", "mem_efficient", "cudnn", "math")
    before = {n: getattr(torch.backends.cuda, f"{n}_sdp_enabled")() for n in names}
    yield
    for n, on in before.items():
        getattr(torch.backends.cuda, f"enable_{n}_sdp")(on)


def call_sdpa(*a, **kw):
    return F.scaled_dot_product_attention(*a, **kw)  # looked up at call time, as user code does


def _gradient_penalty_grads(sdpa, q, k, v):
    """d/d(q,k,v) of sum(|d loss / d(q,k,v)|^2): a double backward through sdpa."""
    g = torch.autograd.grad(sdpa(q, k, v, is_causal=True).pow(2).sum(), (q, k, v), create_graph=True)
    return torch.autograd.grad(sum(x.pow(2).sum() for x in g), (q, k, v))


def test_double_backward_under_sdpa_kernel_math_is_torchs(attnlib_calls):
    """sdpa_kernel(MATH) asks for torch's math path, which has a double backward; patch_sdpa served
    the call anyway and attnlib's backward raised 'no double backward'."""
    q, k, v = make_qkv(1, 2, 12, 16, dtype=torch.float64, requires_grad=True)
    with sdpa_kernel(SDPBackend.MATH):
        want = _gradient_penalty_grads(TORCH_SDPA, q, k, v)
        with attnlib.patch_sdpa():
            got = _gradient_penalty_grads(call_sdpa, q, k, v)
        direct = _gradient_penalty_grads(attnlib.scaled_dot_product_attention, q, k, v)
    assert attnlib_calls == []
    for name, g, w, d in zip(("dq", "dk", "dv"), got, want, direct):
        torch.testing.assert_close(g, w, atol=FP64_TOL, rtol=FP64_TOL, msg=name)
        torch.testing.assert_close(d, w, atol=FP64_TOL, rtol=FP64_TOL, msg=name)


def test_backend_selection_wins_over_attnlibs_extras(attnlib_calls, caplog, monkeypatch):
    monkeypatch.setattr(sdpa_module, "_logged_reasons", set())
    q, k, v = make_qkv(1, 2, 16, 16)
    with sdpa_kernel(SDPBackend.MATH), caplog.at_level(logging.INFO, logger="attnlib"):
        want = TORCH_SDPA(q, k, v)
        out = attnlib.scaled_dot_product_attention(q, k, v, method="sage", backend="torch")
        with attnlib.patch_sdpa(method="sla", backend="torch"):
            patched = call_sdpa(q, k, v)
    assert attnlib_calls == []
    assert torch.equal(out, want) and torch.equal(patched, want)
    assert "backend selection" in caplog.text


def test_default_flags_route_to_attnlib(attnlib_calls):
    q, k, v = make_qkv(1, 2, 16, 16)
    want = TORCH_SDPA(q, k, v)
    assert_verbose_allclose(attnlib.scaled_dot_product_attention(q, k, v), want, atol=FP32_ATOL, rtol=FP32_RTOL)
    with attnlib.patch_sdpa():
        assert_verbose_allclose(call_sdpa(q, k, v), want, atol=FP32_ATOL, rtol=FP32_RTOL)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):  # a fused kernel still allowed
        attnlib.scaled_dot_product_attention(q, k, v)
    assert attnlib_calls == ["flash"] * 3


@pytest.mark.parametrize("flags,cpu,elsewhere", [
    (dict(), False, False),  # torch's defaults: all on
    (dict(flash=False), True, False),  # the CPU has no other fused kernel
    (dict(flash=False, mem_efficient=False), True, False),  # cuDNN still on
    (dict(flash=False, mem_efficient=False, cudnn=False), True, True),
    (dict(flash=False, mem_efficient=False, cudnn=False, math=False), True, True),  # torch raises its error
    (dict(mem_efficient=False, cudnn=False, math=False), False, False),  # flash only
])
def test_which_flag_combinations_send_calls_to_torch(flags, cpu, elsewhere, sdp_flags):
    for name, on in flags.items():
        getattr(torch.backends.cuda, f"enable_{name}_sdp")(on)
    assert sdpa_module._fused_sdpa_disabled(torch.empty(0)) is cpu
    assert sdpa_module._fused_sdpa_disabled(torch.empty(0, device="meta")) is elsewhere  # a GPU's rule
    q, k, v = make_qkv(1, 2, 8, 16)
    try:
        want = TORCH_SDPA(q, k, v)
    except RuntimeError as e:  # every CPU kernel off: the drop-in raises torch's error
        with pytest.raises(RuntimeError, match=str(e)[:30]):
            attnlib.scaled_dot_product_attention(q, k, v)
    else:
        got = attnlib.scaled_dot_product_attention(q, k, v)
        assert torch.equal(got, want) if cpu else torch.allclose(got, want, atol=FP32_ATOL, rtol=FP32_RTOL)


@pytest.mark.parametrize("where", ["inside", "around"])
def test_compiled_fullgraph_honours_the_selection(where, attnlib_calls, monkeypatch):
    """The flags trace (dynamo folds them to constants): an sdpa_kernel(MATH) block inside the
    compiled function, or around its first call, gives torch's path; the default gives attnlib's."""
    monkeypatch.setattr(sdpa_module, "_logged_reasons", set())  # the first time: its log is skipped
    q, k, v = make_qkv(1, 2, 16, 16)

    def math_inside(q, k, v):
        with sdpa_kernel(SDPBackend.MATH):
            return attnlib.scaled_dot_product_attention(q, k, v)

    torch._dynamo.reset()
    try:
        if where == "inside":
            got = torch.compile(math_inside, fullgraph=True, backend="eager")(q, k, v)
        else:
            with sdpa_kernel(SDPBackend.MATH):
                got = torch.compile(attnlib.scaled_dot_product_attention, fullgraph=True, backend="eager")(q, k, v)
        assert attnlib_calls == []
        with sdpa_kernel(SDPBackend.MATH):
            assert torch.equal(got, TORCH_SDPA(q, k, v))
        torch._dynamo.reset()
        default = torch.compile(lambda a, b, c: attnlib.scaled_dot_product_attention(a, b, c), fullgraph=True,
                                backend="eager")(q, k, v)
    finally:
        torch._dynamo.reset()
    assert attnlib_calls == ["flash"]  # traced once through attnlib
    assert_verbose_allclose(default, TORCH_SDPA(q, k, v), atol=FP32_ATOL, rtol=FP32_RTOL)
