"""GPU checks from a review of the CUDA C++ kernels (csrc/) and their launch code: one test per
defect fixed in the review, and tests for what only a GPU run can settle (offsets past 2**31
elements). Fresh random inputs, poisoned outputs, float64 references. Marker gpu: skipped
without one."""
from __future__ import annotations

import pytest
import torch

import attnlib
from attnlib import dispatch
from attnlib.reference import block_sparse_reference, flash_reference
from attnlib.reference.sage import sage_reference
from attnlib.testing import assert_verbose_allclose, make_qkv, metrics, poison_

from test_flash_cuda import check_against_reference
from test_sage_cuda import SIM_LSE_ATOL, poisoned_outputs  # noqa: F401 (fixture)


def _kernel(method, name):
    return [k for k in dispatch.kernels(method) if k.name == name][0]


@pytest.fixture(scope="module")
def flash_cuda():
    k = _kernel("flash", "flash-cuda")
    r = list(k.unavailable_reasons())
    if not r and torch.cuda.get_device_capability() < (8, 0):
        r.append("needs sm_80+")
    if r:
        pytest.skip("; ".join(r))
    return k


def _no_key_rows(seq_q, seq_k):
    """Rows of a bottom-right causal mask that see no key."""
    return max(seq_q - seq_k, 0)


# == defect: 128-row tile, tiles that visit no key block ==========================================
# flash_fwd_mainloop_sm80_atoms had no barrier between the Q tile's cp.async (each warp's rows
# are copied by threads of every warp) and the epilogue, which stages O in those rows, when a tile
# visits no key block: another warp's late copy could overwrite the staged zeros with Q.
@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_tile128_tiles_without_keys_write_zeros(flash_cuda, head_dim, dtype):
    from attnlib.kernels.flash_cuda import flash_fwd_cuda

    b, hq, hkv, sq, sk = 4, 16, 8, 2048, 70  # causal: rows < 1978 see no key, 15 of 16 tiles skip all
    dead = _no_key_rows(sq, sk)
    for rep in range(20):
        q, k, v = make_qkv(b, hq, sq, head_dim, kv_heads=hkv, seq_k=sk, dtype=dtype, device="cuda")
        q = q + 3.0  # a leaked Q value is far from 0
        out = poison_(torch.empty_like(q))
        lse = poison_(torch.empty(b, hq, sq, device="cuda", dtype=torch.float32))
        flash_fwd_cuda(q, k, v, out, lse, causal=True, scale=head_dim ** -0.5, tile_m=128)
        torch.cuda.synchronize()
        bad = (out[:, :, :dead] != 0).sum().item()
        assert bad == 0, f"rep {rep}: {bad} elements of rows without keys are not 0 (Q leaked into O?)"
        assert torch.all(lse[:, :, :dead] == float("-inf")), f"rep {rep}"
        if rep == 0:
            check_against_reference(q, k, v, out, lse, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("tile", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_no_keys_at_all_writes_zero_and_neg_inf(flash_cuda, tile, causal):
    from attnlib.kernels.flash_cuda import flash_fwd_cuda

    for head_dim in (64, 128):
        q = torch.randn(2, 8, 777, head_dim, device="cuda", dtype=torch.float16) + 3.0
        k = torch.empty(2, 4, 0, head_dim, device="cuda", dtype=torch.float16)
        v = torch.empty_like(k)
        for _ in range(5):
            out = poison_(torch.empty_like(q))
            lse = poison_(torch.empty(2, 8, 777, device="cuda", dtype=torch.float32))
            flash_fwd_cuda(q, k, v, out, lse, causal=causal, scale=head_dim ** -0.5, tile_m=tile)
            torch.cuda.synchronize()
            assert torch.all(out == 0), f"hd{head_dim}: {(out != 0).sum().item()} nonzero elements"
            assert torch.all(lse == float("-inf"))


# == offsets past 2**31 elements (int64 index arithmetic) ==========================================
# B * Hq * S * D = 130 * 128 * 1024 * 128 > 2**31: batch 129's rows start past element 2**31 of q
# and out. Inputs are checked on the last batch against the float64 reference; every output
# element must be written (poisoned first).
BIG = dict(b=130, hq=128, hkv=8, s=1024, d=128)


def _big_inputs(seed):
    torch.cuda.empty_cache()  # an earlier big test's blocks, still reserved by the caching allocator
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip(f"needs 24 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    g = torch.Generator(device="cuda").manual_seed(seed)
    b, hq, hkv, s, d = BIG["b"], BIG["hq"], BIG["hkv"], BIG["s"], BIG["d"]
    q = torch.randn(b, hq, s, d, device="cuda", dtype=torch.float16, generator=g)
    k = torch.randn(b, hkv, s, d, device="cuda", dtype=torch.float16, generator=g)
    v = torch.randn(b, hkv, s, d, device="cuda", dtype=torch.float16, generator=g)
    assert q.numel() > 2**31 and (b - 1) * q.stride(0) > 2**31
    return q, k, v


def _last_batch_heads(t, heads):
    return t[-1:, heads]


@pytest.mark.gpu
@pytest.mark.parametrize("tile", [64, 128])
def test_flash_offsets_past_int32(flash_cuda, tile):
    from attnlib.kernels.flash_cuda import flash_fwd_cuda

    q, k, v = _big_inputs(11 + tile)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], device="cuda", dtype=torch.float32)
    for causal in (False, True):
        poison_(out), poison_(lse)  # each pass must write every element itself
        flash_fwd_cuda(q, k, v, out, lse, causal=causal, scale=BIG["d"] ** -0.5, tile_m=tile)
        torch.cuda.synchronize()
        assert not torch.isnan(out).any() and not torch.isnan(lse).any()
        group = BIG["hq"] // BIG["hkv"]
        hq = list(range(BIG["hq"] - 2 * group, BIG["hq"]))  # the last two kv heads' query heads
        hk = sorted({h // group for h in hq})
        check_against_reference(_last_batch_heads(q, hq), _last_batch_heads(k, hk), _last_batch_heads(v, hk),
                                _last_batch_heads(out, hq), _last_batch_heads(lse, hq), causal)


@pytest.mark.gpu
def test_block_sparse_offsets_past_int32(flash_cuda):
    from attnlib.block_mask import block_mask_to_index
    from attnlib.kernels.block_sparse_cuda import block_sparse_fwd_cuda

    q, k, v = _big_inputs(21)
    bs = (128, 64)
    mq, mk = BIG["s"] // bs[0], BIG["s"] // bs[1]
    mask = (torch.rand(1, BIG["hq"], mq, mk, generator=torch.Generator().manual_seed(22)) < 0.4).cuda()
    out = poison_(torch.empty_like(q))
    lse = poison_(torch.empty(q.shape[:3], device="cuda", dtype=torch.float32))
    block_sparse_fwd_cuda(q, k, v, out, lse, *block_mask_to_index(mask), block_size=bs, causal=False,
                          scale=BIG["d"] ** -0.5)
    torch.cuda.synchronize()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    hq = list(range(BIG["hq"] - 16, BIG["hq"]))  # the query heads of the last kv head (group 16)

    def sel(t):
        return t[-1:, hq]

    ref, ref_lse = block_sparse_reference(sel(q).double(), k[-1:, -1:].double(), v[-1:, -1:].double(),
                                          mask[:, hq], block_size=bs, causal=False, return_lse=True)
    torch.testing.assert_close(sel(out).double(), ref, atol=4e-3, rtol=0)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(sel(lse)), fin)
    torch.testing.assert_close(sel(lse)[fin].double(), ref_lse[fin], atol=1e-3, rtol=0)


@pytest.mark.gpu
def test_sage_offsets_past_int32(poisoned_outputs):
    k_ = _kernel("sage", "sage-cuda")
    if k_.unavailable_reasons():
        pytest.skip("; ".join(k_.unavailable_reasons()))
    q, k, v = _big_inputs(31)
    out, lse = attnlib.sage_attention(q, k, v, causal=True, return_lse=True, backend="cuda")
    torch.cuda.synchronize()
    assert poisoned_outputs, "the kernel's output did not come from AttentionInputs.new_output"
    assert torch.isfinite(out).all()  # every element written (the output started as NaN)
    sim, sim_lse = sage_reference(q[-1:], k[-1:], v[-1:], causal=True, return_lse=True)
    assert metrics(out[-1:], sim)["rel_l1"] <= 1e-3
    assert_verbose_allclose(lse[-1:], sim_lse, atol=SIM_LSE_ATOL, name="lse")
    exact = flash_reference(q[-1:, -8:].double(), k[-1:, -1:].double(), v[-1:, -1:].double(), causal=True)
    m = metrics(out[-1:, -8:], exact)
    assert m["cos_sim"] >= 0.999 and m["rel_l1"] <= 0.02, m
