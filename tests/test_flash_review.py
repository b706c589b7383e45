"""Defects found reviewing method flash, one test each (each fails without its fix).

- flash-torch-chunked's backward turned a non-finite gradient into lse on a row that sees no key
  (a loss like lse ** 2 sends NaN there) into NaN dq and dk for every key; the Triton backward
  and the reference drop it (such a row's P is 0).
- The descriptor (TMA) forward offered a card with less shared memory than an H100 (sm_120: TMA,
  99 KB per block) tiles of 130-160 KB at hd128/256, which fail at launch.
"""
from __future__ import annotations

import pytest
import torch

import attnlib
from attnlib.inputs import AttentionInputs
from attnlib.kernels.flash_torch_chunked import chunked_backward, chunked_forward
from attnlib.reference import flash_reference

SM120_SMEM = 101376  # opt-in shared memory per block of sm_86 / sm_89 / sm_120 cards


def _empty_row_dlse(lse: torch.Tensor) -> torch.Tensor:
    """A gradient into lse that is NaN on rows without keys (lse -inf), as d(lse ** 2) is."""
    g = torch.randn_like(lse)
    return torch.where(torch.isfinite(lse), g, torch.full_like(g, float("nan")))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_chunked_backward_ignores_nonfinite_dlse_on_rows_without_keys(dtype):
    torch.manual_seed(0)
    # causal, seq_q > seq_k: the first 6 query rows see no key; GQA 2:1; chunks of 4 rows, so
    # rows 4-5 (no key) share a chunk with rows 6-7 (keys 0-1)
    q = torch.randn(1, 4, 13, 16, dtype=dtype)
    k, v = (torch.randn(1, 2, 7, 16, dtype=dtype) for _ in range(2))
    inp = AttentionInputs(q=q, k=k, v=v, method="flash", causal=True, scale=0.25)
    budget = 4 * (1 * 4 * 7 * 4)  # 4 rows of (batch x heads_q x seq_k) float32 scores
    out, lse = chunked_forward(inp, budget=budget)
    assert torch.isinf(lse[:, :, :6]).all() and torch.isfinite(lse[:, :, 6:]).all()
    dout, dlse = torch.randn_like(out), _empty_row_dlse(lse)
    grads = chunked_backward(inp, out, lse, dout, dlse, budget=budget)
    for name, g in zip(("dq", "dk", "dv"), grads):
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
    # against float64 autograd, the empty rows' dlse dropped (their lse does not depend on q, k, v)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = flash_reference(*leaves, causal=True, scale=0.25, return_lse=True)
    finite_dlse = torch.where(torch.isfinite(lse), dlse, 0.0).double()
    torch.autograd.backward([ref, torch.where(torch.isfinite(ref_lse), ref_lse, 0.0)], [dout.double(), finite_dlse])
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, g, leaf in zip(("dq", "dk", "dv"), grads, leaves):
        torch.testing.assert_close(g.double(), leaf.grad, atol=tol, rtol=tol, msg=name)


def test_torch_backend_lse_gradient_nan_free_on_rows_without_keys():
    """Through the public API (backend="torch" runs flash-torch-chunked for a graph-building call)
    and flash_attention_varlen's torch backend (the same backward per sequence)."""
    torch.manual_seed(1)
    q = torch.randn(1, 9, 2, 16, requires_grad=True)
    k, v = (torch.randn(1, 5, 2, 16, requires_grad=True) for _ in range(2))
    out, lse = attnlib.flash_attention(q, k, v, causal=True, layout="bshd", return_lse=True, backend="torch")
    (out.sum() + (lse ** 2 * 0).nansum()).backward()  # d(lse ** 2) = 2 lse * 0 = NaN on rows at -inf
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))

    qp = torch.randn(12, 2, 16, requires_grad=True)
    kp, vp = (torch.randn(7, 2, 16, requires_grad=True) for _ in range(2))
    cu_q, cu_k = torch.tensor([0, 8, 12], dtype=torch.int32), torch.tensor([0, 3, 7], dtype=torch.int32)
    out, lse = attnlib.flash_attention_varlen(qp, kp, vp, cu_q, cu_k, 8, 4, causal=True, return_lse=True,
                                              backend="torch")
    assert torch.isinf(lse).any()
    torch.autograd.backward([out, lse], [torch.randn_like(out), _empty_row_dlse(lse)])
    assert all(torch.isfinite(t.grad).all() for t in (qp, kp, vp))


@pytest.mark.parametrize("head_dim", [32, 64, 128, 256])
def test_tma_tiles_fit_a_card_with_less_shared_memory(head_dim, monkeypatch):
    from attnlib.triton_kernels.flash import configs
    from attnlib.triton_kernels.flash.forward_tma import tma_unsupported_reasons

    d_pad = configs.padded_head_dim(head_dim)
    fitting = configs.tma_fitting(d_pad, SM120_SMEM)
    assert all(configs.tma_smem_bytes(c, d_pad) <= SM120_SMEM for c in fitting), fitting
    assert configs.tma_candidates(d_pad, SM120_SMEM) == fitting[:1]
    # an H100 keeps its table (the 224 KB tile at hd128 included)
    assert len(configs.tma_fitting(d_pad, configs.H100_SMEM)) >= len(fitting)

    monkeypatch.setattr(configs, "device_smem_limit", lambda t: SM120_SMEM)
    q = torch.randn(1, 2, 8, head_dim, dtype=torch.float16)
    reasons = tma_unsupported_reasons(q, q, q, torch.empty_like(q))
    if fitting:
        assert reasons == []
    else:  # no tile fits: the call keeps the pointer forward instead of failing at launch
        assert any("shared memory" in r for r in reasons), reasons
        monkeypatch.setenv("ATTNLIB_FLASH_TMA", "1")
        from attnlib.triton_kernels.flash.forward import fwd_variant

        assert fwd_variant(q, q, q, torch.empty_like(q))[0] == "default"
    assert (head_dim >= 128) == (not fitting)
