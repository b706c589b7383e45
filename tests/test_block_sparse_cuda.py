"""CUDA block-sparse forward (block_sparse-cuda): NVRTC compiles every specialisation for sm_80,
sm_89 and sm_90 on any machine (sm_80/90 through ALL_SPECS in test_cuda_loader.py); on a GPU,
forward/lse against the float64 reference, gradients through the Triton backward, and NaN in
unlisted key blocks never read."""
from __future__ import annotations

import pytest
import torch

import attnlib
from attnlib.cuda import loader
from attnlib.cuda.specs import BLOCK_SPARSE_FWD_SPECS
from attnlib.kernels.block_sparse_cuda import BlockSparseCUDA
from attnlib.reference import block_sparse_reference
from attnlib.testing import make_qkv, poison_
from test_block_sparse_triton import check, clean_and_poisoned_runs


def test_every_specialisation_is_in_all_specs():
    # ALL_SPECS feeds tests/test_cuda_loader.py (NVRTC sm_80 and sm_90, nvcc sm_90 without
    # spills), scripts/build_cubins.py (shipped cubins) and scripts/compile_report.py
    from attnlib.cuda import specs

    assert len(BLOCK_SPARSE_FWD_SPECS) == 16 and set(BLOCK_SPARSE_FWD_SPECS) <= set(specs.ALL_SPECS)
    assert {(s.name, s.source) for s in BLOCK_SPARSE_FWD_SPECS} == {
        (f"block_sparse_fwd_hd{hd}_{dt}_causal{c}_bm{bm}_bn{bn}", "block_sparse/block_sparse_fwd.cu")
        for hd in (64, 128) for dt in ("fp16", "bf16") for c in (0, 1) for bm, bn in ((64, 64), (128, 64))}


@pytest.mark.skipif(bool(loader.availability_reasons()), reason="; ".join(loader.availability_reasons()))
@pytest.mark.parametrize("spec", BLOCK_SPARSE_FWD_SPECS, ids=lambda s: s.name)
def test_nvrtc_compiles_for_sm89(spec):
    # sm_80 and sm_90 run in test_cuda_loader.py (every spec of ALL_SPECS); sm_89 (L4, RTX 40xx)
    # here, warnings failing as there
    res = loader.compile_nvrtc(spec, "89")
    assert res.log == "", f"NVRTC warnings:\n{res.log}"
    assert res.binary[:4] == b"\x7fELF" and "-arch=sm_89" in res.options


@pytest.mark.parametrize("block_size", [(16, 16), (64, 32), (64, 64), (128, 64)], ids=str)
def test_rejects_other_block_sizes_with_reason(block_size):
    # the block-size reason is reported on its own merits, whatever the device's reasons say
    q, k, v = make_qkv(1, 2, 64, 64, dtype=torch.float16, device="cuda" if torch.cuda.is_available() else "cpu")
    mask = torch.ones(1, 1, -(-64 // block_size[0]), -(-64 // block_size[1]), dtype=torch.bool, device=q.device)
    ex = attnlib.explain(q, k, v, method="block_sparse", block_mask=mask, block_size=block_size, backend="cuda")
    reasons = ex.reasons.get("block_sparse-cuda", [])
    unsupported = [r for r in reasons if r.startswith(f"block_size {block_size} not supported")]
    assert len(unsupported) == (block_size not in ((64, 64), (128, 64))), reasons
    assert BlockSparseCUDA().kernel_reasons(ex.inputs) == unsupported  # device-independent


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [(64, 64), (128, 64)], ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_forward(block_size, dtype, causal, head_dim):
    q, k, v = make_qkv(2, 4, 1000, head_dim, kv_heads=2, seq_k=1100, dtype=dtype, device="cuda", seed=1)
    gen = torch.Generator().manual_seed(2)
    mq, mk = -(-1000 // block_size[0]), -(-1100 // block_size[1])
    mask = (torch.rand(2, 4, mq, mk, generator=gen) < 0.3).cuda()
    mask[0, 0, 0] = False
    out, lse = attnlib.block_sparse_attention(q, k, v, mask, block_size=block_size, causal=causal, return_lse=True,
                                              backend="cuda")
    ref, ref_lse = block_sparse_reference(q.double(), k.double(), v.double(), mask, block_size=block_size,
                                          causal=causal, return_lse=True)
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=0)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    torch.testing.assert_close(lse[fin].double(), ref_lse[fin], atol=1e-3, rtol=0)
    assert torch.all(out[0, 0, :block_size[0]] == 0)


@pytest.mark.gpu
def test_gpu_backward_and_poisoned_output():
    from attnlib.block_mask import block_mask_to_index
    from attnlib.kernels.block_sparse_cuda import block_sparse_fwd_cuda

    q, k, v = make_qkv(1, 4, 333, 128, kv_heads=2, dtype=torch.float16, device="cuda", layout="bshd",
                       requires_grad=True, seed=3)
    mask = (torch.rand(1, 4, 6, 6, generator=torch.Generator().manual_seed(4)) < 0.5).cuda()
    # out, lse, dq, dk, dv against the float64 reference (flash rule), as the Triton kernel's tests
    check(q, k, v, mask, block_size=(64, 64), causal=True, layout="bshd", backend="cuda")
    qb, kb, vb = (t.detach().transpose(1, 2) for t in (q, k, v))
    o = poison_(torch.empty_like(qb))
    lse = poison_(torch.empty(qb.shape[:3], device="cuda"))
    block_sparse_fwd_cuda(qb, kb, vb, o, lse, *block_mask_to_index(mask), block_size=(64, 64), causal=False,
                          scale=128 ** -0.5)
    assert torch.isfinite(o).all() and not torch.isnan(lse).any()
    ref, ref_lse = block_sparse_reference(qb.double(), kb.double(), vb.double(), mask, block_size=(64, 64),
                                          causal=False, return_lse=True)
    torch.testing.assert_close(o.double(), ref, atol=4e-3, rtol=0)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    torch.testing.assert_close(lse[fin].double(), ref_lse[fin], atol=1e-3, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_unlisted_key_blocks_are_never_read(causal):
    # NaN K/V in unlisted key blocks cannot reach out, lse or the (Triton) gradients
    bs = (64, 64)
    q, k, v = make_qkv(1, 4, 300, 128, kv_heads=2, seq_k=520, dtype=torch.float16, device="cuda", seed=5)
    mask = (torch.rand(1, 4, 5, 9, generator=torch.Generator().manual_seed(6)) < 0.35).cuda()
    mask[:, :2, :, 2] = False  # every query head of KV head 0 skips key block 2
    mask[:, 2:, :, 5] = False
    clean, poisoned = clean_and_poisoned_runs(q, k, v, mask, bs, causal, "cuda")
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), poisoned, clean):
        assert not torch.isnan(got).any(), f"{name} read an unlisted (NaN) key block"
        assert torch.equal(got, want), name  # no atomics: the same blocks in the same order
    ref = block_sparse_reference(q.double(), k.double(), v.double(), mask, block_size=bs, causal=causal)
    torch.testing.assert_close(poisoned[0].double(), ref, atol=4e-3, rtol=0)
