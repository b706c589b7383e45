"""attnlib.scaled_dot_product_attention keeps torch's semantics; patch_sdpa restores what it replaced."""
import logging
import re

import pytest
import torch
import torch.nn.functional as F

import attnlib
from attnlib.integrations import sdpa as sdpa_module
from attnlib.integrations.sdpa import TORCH_SDPA
from attnlib.testing import assert_verbose_allclose, make_qkv
from conftest import TORCH_CPU_SDPA_DIES_ON_ZERO_HEADS

ORIGINAL = F.scaled_dot_product_attention


def call_sdpa(*a, **kw):
    return F.scaled_dot_product_attention(*a, **kw)  # looked up at call time, as user code does


def test_context_manager_restores_on_exit_and_on_exception():
    with attnlib.patch_sdpa():
        assert F.scaled_dot_product_attention is not ORIGINAL
    assert F.scaled_dot_product_attention is ORIGINAL
    with pytest.raises(KeyError):
        with attnlib.patch_sdpa():
            raise KeyError("boom")
    assert F.scaled_dot_product_attention is ORIGINAL


def test_nesting_and_install_uninstall():
    outer = attnlib.patch_sdpa(method="flash")
    inner = attnlib.patch_sdpa(method="sage")
    with outer:
        f_outer = F.scaled_dot_product_attention
        with inner:
            assert F.scaled_dot_product_attention.__attnlib_patch__ is inner
        assert F.scaled_dot_product_attention is f_outer
    assert F.scaled_dot_product_attention is ORIGINAL
    p = attnlib.patch_sdpa().install()
    try:
        assert F.scaled_dot_product_attention.__attnlib_patch__ is p
    finally:
        p.uninstall()
    assert F.scaled_dot_product_attention is ORIGINAL
    with pytest.raises(RuntimeError, match=r"^patch_sdpa.uninstall\(\) called without install\(\)"):
        p.uninstall()
    assert F.scaled_dot_product_attention is ORIGINAL


def test_patch_rejects_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        attnlib.patch_sdpa(method="nope")
    with pytest.raises(ValueError, match="backend"):
        attnlib.patch_sdpa(backend="nope")


def test_patched_calls_go_through_attnlib(monkeypatch):
    seen = []
    from attnlib import dispatch
    real = dispatch.select
    monkeypatch.setattr(dispatch, "select", lambda inp, backend="auto": seen.append(inp.method) or real(inp, backend))
    q, k, v = make_qkv(1, 2, 16, 16)
    with attnlib.patch_sdpa(backend="torch"):
        call_sdpa(q, k, v)
    assert seen == ["flash"]


def _mask_cases(sq, sk):
    g = torch.Generator().manual_seed(3)
    return {
        "none": None,
        "bool-full": torch.rand(2, 4, sq, sk, generator=g) > 0.3,
        "bool-broadcast": torch.rand(sq, sk, generator=g) > 0.5,
        "float-additive": torch.randn(1, 4, sq, sk, generator=g),
        "float-broadcast-heads": torch.randn(2, 1, 1, sk, generator=g),
    }


@pytest.mark.parametrize("mask_name", list(_mask_cases(3, 3)))
@pytest.mark.parametrize("sq,sk,causal", [(17, 17, False), (17, 17, True), (9, 23, True), (23, 9, True),
                                          (5, 12, False)])
def test_patched_sdpa_equals_torch(mask_name, sq, sk, causal):
    q, k, v = make_qkv(2, 4, sq, 16, seq_k=sk)
    mask = _mask_cases(sq, sk)[mask_name]
    if mask is not None and causal:
        causal = False  # torch rejects a mask together with is_causal
    ref = TORCH_SDPA(q, k, v, attn_mask=mask, is_causal=causal)
    with attnlib.patch_sdpa():
        out = call_sdpa(q, k, v, attn_mask=mask, is_causal=causal)
    assert_verbose_allclose(out, ref, atol=2e-6, rtol=1e-5)


def test_gqa_and_scale_and_dtype():
    q, k, v = make_qkv(2, 8, 19, 32, kv_heads=2, dtype=torch.float64)
    ref = TORCH_SDPA(q, k, v, scale=0.2, enable_gqa=True)
    out = attnlib.scaled_dot_product_attention(q, k, v, scale=0.2, enable_gqa=True)
    assert_verbose_allclose(out, ref, atol=1e-12)
    # torch's error for heads that differ without enable_gqa is kept: the same message
    with pytest.raises(RuntimeError) as torchs:
        TORCH_SDPA(q, k, v)
    with pytest.raises(RuntimeError, match=f"^{re.escape(str(torchs.value))}$"):
        attnlib.scaled_dot_product_attention(q, k, v)


def test_dropout_and_masks_fall_back_to_torch_with_logged_reason(caplog):
    q, k, v = make_qkv(1, 2, 8, 16)
    with caplog.at_level(logging.INFO, logger="attnlib"):
        torch.manual_seed(0)
        out = attnlib.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
        torch.manual_seed(0)
        ref = TORCH_SDPA(q, k, v, dropout_p=0.5)
    assert torch.equal(out, ref)
    assert any("dropout_p > 0" in r.getMessage() for r in caplog.records)


def test_three_d_inputs_fall_back():
    q, k, v = (torch.randn(5, 8, 16) for _ in range(3))
    assert_verbose_allclose(attnlib.scaled_dot_product_attention(q, k, v), TORCH_SDPA(q, k, v), atol=0)


@pytest.mark.parametrize("case", ["scale=0", "scale<0", "scale=inf", "scale=nan", "scale=1e300", "heads=0",
                                  "head_dim=0", "dropout<0"])
def test_what_attnlib_refuses_and_torch_computes_goes_to_torch(case, caplog, monkeypatch):
    """A drop-in computes whatever torch computes: attnlib's own refusals (scale must be finite and
    positive, at least one head, ...) send the call to torch's builtin, never raise."""
    q, k, v = make_qkv(1, 2, 8, 16)
    kw = {"scale=0": dict(scale=0.0), "scale<0": dict(scale=-0.5), "scale=inf": dict(scale=float("inf")),
          "scale=nan": dict(scale=float("nan")), "scale=1e300": dict(scale=1e300),
          "dropout<0": dict(dropout_p=-0.1)}.get(case, {})
    if case == "scale=1e300":
        q, k, v = (t.double() for t in (q, k, v))  # beyond attnlib's float32 scores, fine for torch in fp64
    if case == "heads=0":
        if TORCH_CPU_SDPA_DIES_ON_ZERO_HEADS:
            pytest.skip(f"torch {torch.__version__}'s CPU SDPA dies (SIGFPE) on zero heads")
        q, k, v = q[:, :0], k[:, :0], v[:, :0]
    if case == "head_dim=0":
        q, k, v = q[..., :0], k[..., :0], v[..., :0]
    try:
        ref = TORCH_SDPA(q, k, v, **kw)
    except RuntimeError as e:  # torch refuses it: so must the drop-in, with torch's error
        with pytest.raises(RuntimeError, match=str(e)[:30]):
            attnlib.scaled_dot_product_attention(q, k, v, **kw)
        return
    monkeypatch.setattr(sdpa_module, "_logged_reasons", set())  # each reason is logged once per process
    with caplog.at_level(logging.INFO, logger="attnlib"):
        out = attnlib.scaled_dot_product_attention(q, k, v, **kw)
        with attnlib.patch_sdpa(method="sage"):  # any method: the call never reaches it
            patched = call_sdpa(q, k, v, **kw)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, equal_nan=True, atol=0, rtol=0)
    assert torch.allclose(patched, ref, equal_nan=True, atol=0, rtol=0)
    assert "-> torch" in caplog.text


def test_numpy_scale_runs_on_attnlib(monkeypatch):
    np = pytest.importorskip("numpy")
    ran = []
    monkeypatch.setattr(sdpa_module, "TORCH_SDPA", lambda *a, **kw: ran.append("torch"))
    q, k, v = make_qkv(1, 2, 8, 16)
    out = attnlib.scaled_dot_product_attention(q, k, v, scale=np.float32(0.25))
    assert ran == []
    assert_verbose_allclose(out, TORCH_SDPA(q, k, v, scale=0.25), atol=2e-6, rtol=1e-5)


def test_non_bool_is_causal_raises_torchs_error():
    q, k, v = make_qkv(1, 2, 8, 16)
    for kw in (dict(is_causal=1), dict(enable_gqa="yes")):
        with pytest.raises(TypeError, match="must be bool"):
            TORCH_SDPA(q, k, v, **kw)
        with pytest.raises(TypeError, match="must be bool"):
            attnlib.scaled_dot_product_attention(q, k, v, **kw)


@pytest.mark.parametrize("shape", ["4d", "3d"])
def test_key_value_length_mismatch_raises_naming_both(shape):
    """Keys and values of different lengths: torch's CPU flash kernel answers anyway (over the
    shorter one); the drop-in refuses it, patched or not, before any kernel runs."""
    q, k, v = make_qkv(1, 2, 8, 16)
    v = torch.randn(1, 2, 7, 16)
    if shape == "3d":
        q, k, v = q[0], k[0], v[0]
    with pytest.raises(ValueError, match=r"key and value must have the same sequence length.*key has 8 "
                                         r"tokens.*value 7"):
        attnlib.scaled_dot_product_attention(q, k, v)
    with attnlib.patch_sdpa():
        with pytest.raises(ValueError, match="key and value must have the same sequence length"):
            call_sdpa(q, k, v)


def test_linear_patch_with_an_explicit_scale_falls_back_to_torch(caplog, monkeypatch):
    monkeypatch.setattr(sdpa_module, "_logged_reasons", set())
    q, k, v = make_qkv(1, 2, 16, 16)
    with caplog.at_level(logging.INFO, logger="attnlib"), attnlib.patch_sdpa(method="linear"):
        out = call_sdpa(q, k, v, scale=0.3)
        approx = call_sdpa(q, k, v)
    assert torch.equal(out, TORCH_SDPA(q, k, v, scale=0.3))
    assert "has no softmax scale" in caplog.text
    assert_verbose_allclose(approx, attnlib.linear_attention(q, k, v), atol=0)  # no scale: linear runs


@pytest.mark.parametrize("method,options,exc,text", [
    ("sage", dict(foo=1), TypeError, "unknown option"),
    ("sage", dict(pv="bad"), ValueError, "pv"),
    ("sage", dict(smooth_k="yes"), TypeError, "smooth_k"),
    ("sla", dict(critical=5.0), ValueError, "critical"),
    ("sla", dict(critical=0.6, negligible=0.6), ValueError, "critical \\+ negligible"),
    ("sla", dict(proj_weight="x"), TypeError, "proj_weight"),
    ("sla", dict(block_size=(0, 16)), ValueError, "block_size"),
    ("linear", dict(eps=-1.0), ValueError, "eps"),
    ("linear", dict(feature_map="tanh"), ValueError, "feature_map"),
    ("flash", dict(smooth_k=True), TypeError, "unknown option"),
])
def test_options_are_checked_when_patching_not_at_the_first_call(method, options, exc, text):
    with pytest.raises(exc, match=text):
        attnlib.patch_sdpa(method=method, **options)
    # the direct function checks them too, even for a call that torch serves (a mask)
    q, k, v = make_qkv(1, 2, 16, 16)
    with pytest.raises(exc, match=text):
        attnlib.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(16, 16, dtype=torch.bool),
                                             method=method, **options)
    assert F.scaled_dot_product_attention is ORIGINAL


def test_tensor_options_are_checked_against_each_call():
    q, k, v = make_qkv(1, 2, 32, 16)
    p = attnlib.patch_sdpa(method="sla", proj_weight=torch.zeros(8, 8), block_size=(16, 16))  # shape unknown yet
    with p, pytest.raises(ValueError, match="proj_weight"):
        call_sdpa(q, k, v)  # head_dim 16
    good = attnlib.patch_sdpa(method="sla", proj_weight=torch.zeros(16, 16), block_size=(16, 16))
    with good:
        out = call_sdpa(q, k, v)
    assert_verbose_allclose(out, attnlib.sla_attention(q, k, v, proj_weight=torch.zeros(16, 16),
                                                       block_size=(16, 16)), atol=0)
    # a required tensor option (block_sparse's mask) is checked per call, and the call runs
    mask = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    out = attnlib.scaled_dot_product_attention(q, k, v, method="block_sparse", block_mask=mask,
                                               block_size=(16, 16))
    assert_verbose_allclose(out, TORCH_SDPA(q, k, v), atol=2e-6, rtol=1e-5)
    with pytest.raises(TypeError, match="unknown option"):
        attnlib.scaled_dot_product_attention(q, k, v, method="block_sparse", block_mask=mask, foo=1)


def test_patches_may_end_in_any_order():
    """Two threads' contexts end in the order they began: the function in place is the latest
    patch still active, and torch's own once none is (before: the first exit raised and the
    second put the first patch back for good)."""
    a, b = attnlib.patch_sdpa(method="flash"), attnlib.patch_sdpa(method="sage")
    a.install()
    b.install()
    a.uninstall()
    assert F.scaled_dot_product_attention.__attnlib_patch__ is b
    b.uninstall()
    assert F.scaled_dot_product_attention is ORIGINAL
    a.install()
    try:  # something else replacing the patch while it is active is refused, not undone
        F.scaled_dot_product_attention = TORCH_SDPA
        with pytest.raises(RuntimeError, match="something other than"):
            a.uninstall()
    finally:
        F.scaled_dot_product_attention = a._fn
        a.uninstall()
    assert F.scaled_dot_product_attention is ORIGINAL


class _Overriding(torch.Tensor):
    """A subclass with its own SDPA (as a quantised or wrapper tensor may have)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (F.scaled_dot_product_attention, TORCH_SDPA):
            return torch.full((1,), 42.0)
        return super().__torch_function__(func, types, args, kwargs or {})


def test_subclasses_and_function_modes_overriding_sdpa_see_the_call():
    q, k, v = make_qkv(1, 2, 16, 16)
    assert attnlib.scaled_dot_product_attention(q.as_subclass(_Overriding), k, v).item() == 42.0

    class Mode(torch.overrides.TorchFunctionMode):
        seen = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is TORCH_SDPA:
                Mode.seen.append(func)
            return func(*args, **(kwargs or {}))

    with Mode():
        out = attnlib.scaled_dot_product_attention(q, k, v)
    assert Mode.seen == [TORCH_SDPA]
    assert_verbose_allclose(out, TORCH_SDPA(q, k, v), atol=1e-5, rtol=1e-5)


def test_device_context_does_not_send_calls_to_torch(monkeypatch):
    """`with torch.device(...)` is a function mode too, but changes only factory defaults."""
    seen = []
    from attnlib import dispatch
    real = dispatch.select
    monkeypatch.setattr(dispatch, "select", lambda inp, backend="auto": seen.append(inp.method) or real(inp, backend))
    q, k, v = make_qkv(1, 2, 16, 16)
    with torch.device("cpu"):
        attnlib.scaled_dot_product_attention(q, k, v, backend="torch")
    assert seen == ["flash"]


def test_forward_only_methods_match_the_registry():
    from attnlib.dispatch import kernels
    for method in sdpa_module.PATCHABLE_METHODS:
        backward = [k.supports_backward for k in kernels() if k.method == method]
        assert backward, method
        assert (method in sdpa_module.FORWARD_ONLY) == (not any(backward)), method


@pytest.mark.parametrize("case", ["mask", "sage needs grad"])
def test_compiled_fullgraph_fallbacks(case, monkeypatch):
    """Calls handed to torch compile with fullgraph=True also the first time their reason comes
    up (the INFO log is skipped while tracing: dynamo cannot trace logging), and the compiled
    call takes the eager call's route (sage with an input that requires grad: torch's kernel)."""
    monkeypatch.setattr(sdpa_module, "_logged_reasons", set())
    q, k, v = make_qkv(1, 2, 16, 16)
    mask = torch.rand(16, 16, generator=torch.Generator().manual_seed(1)) > 0.3
    if case == "mask":
        def fn(q, k, v):
            return attnlib.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        want = TORCH_SDPA(q, k, v, attn_mask=mask)
    else:
        q = q.requires_grad_()

        def fn(q, k, v):
            return attnlib.scaled_dot_product_attention(q, k, v, method="sage")
        want = TORCH_SDPA(q, k, v)
    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True, backend="eager")(q, k, v)
    assert_verbose_allclose(got, want, atol=1e-6, rtol=1e-6)
