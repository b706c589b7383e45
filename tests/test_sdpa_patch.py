"""attnlib.scaled_dot_product_attention keeps torch's semantics; patch_sdpa restores what it replaced."""
import logging

import pytest
import torch
import torch.nn.functional as F

import attnlib
from attnlib.integrations.sdpa import TORCH_SDPA
from attnlib.testing import assert_verbose_allclose, make_qkv

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
    with pytest.raises(RuntimeError):
        p.uninstall()


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
    # torch's error for heads that differ without enable_gqa is kept
    with pytest.raises(RuntimeError):
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
