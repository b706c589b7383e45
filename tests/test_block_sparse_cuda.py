"""CUDA block-sparse forward (block_sparse-cuda): NVRTC compiles every specialisation for sm_80
and sm_90 on any machine; on a GPU, forward/lse against the float64 reference and gradients
through the Triton backward."""
from __future__ import annotations

import pytest
import torch

import attnlib
from attnlib.cuda import loader
from attnlib.kernels.block_sparse_cuda import all_specs
from attnlib.reference import block_sparse_reference
from attnlib.testing import make_qkv, poison_


@pytest.mark.parametrize("arch", ["80", "90"])
def test_nvrtc_compiles(arch):
    pytest.importorskip("cupy")
    # every block size and causal flag for hd128 fp16/bf16 (hd64 shares the code path)
    specs = [s for s in all_specs() if "hd128" in s.name]
    for spec in specs:
        try:
            res = loader.compile_nvrtc(spec, arch)
        except RuntimeError as e:
            if "nvrtc" in str(e).lower() and "not" in str(e).lower() and "found" in str(e).lower():
                pytest.skip(str(e))
            raise
        assert res.binary, spec.name


def test_rejects_other_block_sizes_with_reason():
    q, k, v = make_qkv(1, 2, 64, 64)
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    ex = attnlib.explain(q, k, v, method="block_sparse", block_mask=mask, block_size=(16, 16), backend="cuda")
    assert any("block_size (16, 16)" in r or "device cpu" in r for r in ex.reasons["block_sparse-cuda"])


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
    out = attnlib.block_sparse_attention(q, k, v, mask, causal=True, layout="bshd", backend="cuda")
    out.float().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    qb, kb, vb = (t.detach().transpose(1, 2) for t in (q, k, v))
    o = poison_(torch.empty_like(qb))
    lse = poison_(torch.empty(qb.shape[:3], device="cuda"))
    block_sparse_fwd_cuda(qb, kb, vb, o, lse, *block_mask_to_index(mask), block_size=(64, 64), causal=False,
                          scale=128 ** -0.5)
    assert torch.isfinite(o).all() and not torch.isnan(lse).any()
