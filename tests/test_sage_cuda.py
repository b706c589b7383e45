"""sage-cuda: every specialisation compiles under NVRTC for sm_80, sm_89 and sm_90 (no GPU
needed); a CPU emulation of the INT8 tile swizzle and of the ldmatrix -> mma.m16n8k32 fragment
addressing (mirrors csrc/sage line by line) and of the smoothed-K mean's launches (per-block
channel sums into the scratch, their fold in block order); GPU checks against the simulation
(relative L1 <= 1e-3, lse 1e-4) and exact attention (cos >= 0.999, rel L1 <= 0.02), quantization bit-exact."""
import functools

import numpy as np
import pytest
import torch

import attnlib
from attnlib.cuda import loader, specs
from attnlib.inputs import to_bhsd
from attnlib.reference import flash_reference, sage_reference
from attnlib.reference.sage import K_BLOCK, Q_BLOCK, Q_WARP_BLOCK, quantize_per_block
from attnlib.testing import assert_verbose_allclose, make_qkv, metrics

# lse vs the simulation: the kernel's K mean and torch's differ in the last bits, which can move a
# smoothed K element across an INT8 rounding tie (test_sage_triton.py's SIM_LSE_ATOL says how far
# that moves a row's lse); the H100 gave up to 1.6e-4 on test_forward_gpu's float32 case.
SIM_LSE_ATOL = 5e-4

_NVRTC = loader.availability_reasons()
needs_nvrtc = pytest.mark.skipif(bool(_NVRTC), reason="; ".join(_NVRTC) or "ok")


@needs_nvrtc
@pytest.mark.parametrize("arch", ["80", "89", "90"])
@pytest.mark.parametrize("spec", specs.SAGE_SPECS, ids=lambda s: s.name)
def test_nvrtc_compiles_every_sage_specialisation(spec, arch):
    res = loader.compile_nvrtc(spec, arch)
    assert res.log == "", f"NVRTC warnings:\n{res.log}"
    assert res.binary[:4] == b"\x7fELF"


def test_specs_are_named_and_validated():
    s = specs.sage_fwd_spec(128, True, "fp16_accum")
    assert s.name == "sage_fwd_hd128_causal1_pvacc1_bm64_bn64" and s.threads == 128
    assert s.smem_bytes == 128 * (64 + 128 + 256)
    assert s in specs.ALL_SPECS
    with pytest.raises(ValueError, match="head dims"):
        specs.sage_fwd_spec(96, False, "fp16")
    with pytest.raises(ValueError, match="pv"):
        specs.sage_fwd_spec(64, False, "fp8")


# == CPU emulation of csrc/sage's int8 tiles ==================================================
def i8_offset(row, chunk, hd):  # SageFwdTraitsSm80::i8_offset
    sw = (row & 7) if hd // 16 >= 8 else ((row >> 1) & 3)
    return row * hd + ((chunk ^ sw) << 4)


def store_i8_tile(x, threads=128):
    """load_i8_tile_async: thread tid, step i copies 16-byte chunk idx = tid + threads i."""
    rows, hd = x.shape
    cpr = hd // 16
    sm = np.full(rows * hd, -1000, dtype=np.int64)
    for i in range(rows * cpr // threads):
        for tid in range(threads):
            idx = tid + i * threads
            row, chunk = idx // cpr, idx % cpr
            off = i8_offset(row, chunk, hd)
            assert (sm[off:off + 16] == -1000).all(), "two chunks land on one place"
            sm[off:off + 16] = x[row, chunk * 16:chunk * 16 + 16]
    assert (sm != -1000).all()
    return sm


def ldmatrix_x4_bytes(sm, addrs):
    """ldmatrix .m8n8.x4 .b16 on bytes: lane t gets bytes 4(t%4)..+3 of row t/4 of matrix i;
    the 8 row addresses of each matrix must fall in 8 distinct 16-byte bank groups."""
    regs = np.zeros((32, 4, 4), dtype=np.int64)
    for i in range(4):
        rows = [addrs[8 * i + j] for j in range(8)]
        assert all(a % 16 == 0 for a in rows)
        assert len({(a // 16) % 8 for a in rows}) == 8, f"bank conflict in matrix {i}: {rows}"
        m = np.stack([sm[a:a + 16] for a in rows])
        for t in range(32):
            regs[t, i] = m[t // 4, 4 * (t % 4):4 * (t % 4) + 4]
    return regs


def mma_s8_16832(a, b0, b1):
    """PTX m16n8k32 s8 fragments -> the 16x8 int32 product in C-fragment order."""
    A, B = np.zeros((16, 32), dtype=np.int64), np.zeros((32, 8), dtype=np.int64)
    for t in range(32):
        g, q = t // 4, t % 4
        A[g, 4 * q:4 * q + 4] = a[t, 0]
        A[g + 8, 4 * q:4 * q + 4] = a[t, 1]
        A[g, 16 + 4 * q:16 + 4 * q + 4] = a[t, 2]
        A[g + 8, 16 + 4 * q:16 + 4 * q + 4] = a[t, 3]
        B[4 * q:4 * q + 4, g] = b0[t]
        B[16 + 4 * q:16 + 4 * q + 4, g] = b1[t]
    C = A @ B
    return np.array([[C[t // 4, 2 * (t % 4)], C[t // 4, 2 * (t % 4) + 1], C[t // 4 + 8, 2 * (t % 4)],
                      C[t // 4 + 8, 2 * (t % 4) + 1]] for t in range(32)])


@pytest.mark.parametrize("hd", [64, 128])
def test_int8_qk_fragments_reproduce_q_kt(hd):
    """Q (64 rows) and K (64 keys) int8 tiles through the kernel's swizzle, ldmatrix addressing
    and m16n8k32 fragments give exactly Q K^T for every warp's 16 rows."""
    rng = np.random.default_rng(hd)
    q = rng.integers(-127, 128, size=(64, hd))
    k = rng.integers(-127, 128, size=(64, hd))
    sq, sk = store_i8_tile(q), store_i8_tile(k)
    want = q @ k.T
    for warp in range(4):
        qf = []
        for kk in range(hd // 32):
            addrs = [i8_offset(warp * 16 + lane % 16, 2 * kk + lane // 16, hd) for lane in range(32)]
            qf.append(ldmatrix_x4_bytes(sq, addrs))
        s = np.zeros((8, 32, 4), dtype=np.int64)  # N_TILES_S = 64 / 8
        for kk in range(hd // 32):
            for np_ in range(4):
                addrs = [i8_offset(np_ * 16 + (lane // 16) * 8 + lane % 8, 2 * kk + (lane // 8) % 2, hd)
                         for lane in range(32)]
                kf = ldmatrix_x4_bytes(sk, addrs)
                s[2 * np_] += mma_s8_16832(qf[kk], kf[:, 0], kf[:, 1])
                s[2 * np_ + 1] += mma_s8_16832(qf[kk], kf[:, 2], kf[:, 3])
        got = np.zeros((16, 64), dtype=np.int64)
        for nt in range(8):
            for t in range(32):
                g, c = t // 4, nt * 8 + 2 * (t % 4)
                got[g, c:c + 2] = s[nt, t, :2]
                got[g + 8, c:c + 2] = s[nt, t, 2:]
        assert np.array_equal(got, want[warp * 16:warp * 16 + 16])


# == CPU emulation of sage_quant.cu's K mean: k_stats -> k_reduce ==============================
QUANT_THREADS, REDUCE_CHANNELS, REDUCE_UNROLL = 256, 32, 16  # SAGE_QUANT_THREADS, SAGE_REDUCE_*


def emulate_k_stats(x, block):
    """attnlib_sage_quant_k_stats over its grid for one (b, h) slice x (S, D) float32: the
    scratch (n_blocks, D), every entry written exactly once."""
    seq, dim = x.shape
    nb = -(-seq // block)
    part = np.full(nb * dim, np.nan, dtype=np.float32)
    lanes = min(dim, QUANT_THREADS)
    groups = QUANT_THREADS // lanes
    for blk in range(nb):
        row0 = blk * block
        rows = min(block, seq - row0)
        for c0 in range(0, dim, lanes):
            acc = np.zeros(QUANT_THREADS, dtype=np.float32)
            for tid in range(QUANT_THREADS):
                c, g = tid % lanes, tid // lanes
                if g < groups and c0 + c < dim:
                    for r in range(g, rows, groups):
                        acc[tid] = np.float32(acc[tid] + x[row0 + r, c0 + c])
            for tid in range(min(lanes, dim - c0)):
                s = np.float32(0)
                for gg in range(groups):
                    s = np.float32(s + acc[gg * lanes + tid])
                off = blk * dim + c0 + tid
                assert np.isnan(part[off]), "two threads write one partial"
                part[off] = s
    assert not np.isnan(part).any()
    return part


def emulate_k_reduce(part, seq, dim):
    """attnlib_sage_quant_k_reduce: grid ceil(dim / 32) x 32 threads, UNROLL partials per step."""
    nb = part.size // dim
    mean = np.full(dim, np.nan, dtype=np.float32)
    for bx in range(-(-dim // REDUCE_CHANNELS)):
        for tid in range(REDUCE_CHANNELS):
            c = bx * REDUCE_CHANNELS + tid
            if c >= dim:
                continue
            acc = np.float32(0)
            for blk0 in range(0, nb, REDUCE_UNROLL):
                v = [part[(blk0 + i) * dim + c] if blk0 + i < nb else np.float32(0) for i in range(REDUCE_UNROLL)]
                for i in range(REDUCE_UNROLL):
                    acc = np.float32(acc + v[i])
            assert np.isnan(mean[c])
            mean[c] = np.float32(acc) / np.float32(seq)
    assert not np.isnan(mean).any()
    return mean


@pytest.mark.parametrize("seq,dim", [(1, 64), (63, 128), (65, 128), (1000, 64), (130, 96), (70, 256)])
def test_k_mean_emulation_matches_reference(seq, dim):
    """Every scratch entry written once, every channel folded once; the fold in block order
    equals the float64 mean to fp32 rounding, and equals the plain sequential sum of the block
    partials bit for bit (the order does not depend on the grid)."""
    rng = np.random.default_rng(seq * dim)
    x = (rng.standard_normal((seq, dim)) + 10.0 * rng.standard_normal(dim)).astype(np.float32)
    part = emulate_k_stats(x, K_BLOCK)
    mean = emulate_k_reduce(part, seq, dim)
    want = x.astype(np.float64).mean(0)
    np.testing.assert_allclose(mean, want, rtol=0, atol=1e-5 * (1 + np.abs(want).max()))
    seq_sum = np.zeros(dim, dtype=np.float32)
    for blk in range(part.size // dim):
        seq_sum = (seq_sum + part[blk * dim:(blk + 1) * dim]).astype(np.float32)
    assert np.array_equal(mean, seq_sum / np.float32(seq))


def test_sage_quant_specs():
    assert [s.name for s in specs.SAGE_SPECS[-4:]] == ["sage_quant_q", "sage_quant_k", "sage_quant_k_stats",
                                                       "sage_quant_k_reduce"]
    assert specs.sage_quant_spec("k_reduce").threads == REDUCE_CHANNELS
    assert specs.sage_quant_spec("k_stats").threads == QUANT_THREADS
    with pytest.raises(ValueError, match="sage_quant tensor"):
        specs.sage_quant_spec("v")


def test_cpu_reasons():
    q, k, v = make_qkv(1, 2, 16, 64)
    reasons = attnlib.explain(q, k, v, method="sage", backend="cuda", pv="fp8").reasons["sage-cuda"]
    assert any("device cpu" in r for r in reasons) and any("fp8" in r for r in reasons)


# == GPU ====================================================================================
@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Kernel outputs made by AttentionInputs.new_output start as NaN, so the isfinite check
    below sees any element the kernel does not write (torch.empty may hold an earlier answer)."""
    from attnlib.inputs import AttentionInputs
    from attnlib.testing import poison_

    real = AttentionInputs.new_output
    made = []

    def new_output(self, *a, **kw):
        out = poison_(real(self, *a, **kw))
        made.append(out)
        return out

    monkeypatch.setattr(AttentionInputs, "new_output", new_output)
    return made


def _check(q, k, v, *, causal, pv="fp16", qk_granularity="per_block", layout="bhsd"):
    out, lse = attnlib.sage_attention(q, k, v, causal=causal, pv=pv, qk_granularity=qk_granularity, layout=layout,
                                      return_lse=True, backend="cuda")
    t = functools.partial(to_bhsd, layout=layout)
    sim, sim_lse = sage_reference(t(q), t(k), t(v), causal=causal, pv=pv, qk_granularity=qk_granularity,
                                  return_lse=True)
    exact, exact_lse = flash_reference(t(q).double(), t(k).double(), t(v).double(), causal=causal, return_lse=True)
    assert out.dtype == q.dtype and torch.isfinite(out).all()
    assert metrics(t(out), sim)["rel_l1"] <= 1e-3
    assert_verbose_allclose(lse, sim_lse, atol=SIM_LSE_ATOL, name="lse")
    vis = torch.isfinite(exact_lse)
    m = metrics(t(out)[vis], exact[vis])
    assert m["cos_sim"] >= 0.999 and m["rel_l1"] <= 0.02, m


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", [
    (1, 4, 2, 300, 300, 64, True, "bhsd", "fp16", "per_block"),
    (2, 4, 4, 129, 1000, 128, False, "bshd", "fp16_accum", "per_warp"),
    (1, 8, 1, 1000, 77, 128, True, "bhsd", "fp16", "per_warp"),  # rows without keys
])
def test_forward_gpu(case, dtype, poisoned_outputs):
    b, hq, hkv, sq, sk, d, causal, layout, pv, gran = case
    q, k, v = make_qkv(b, hq, sq, d, kv_heads=hkv, seq_k=sk, dtype=dtype, device="cuda", layout=layout,
                       k_bias=10.0, seed=sq + sk)
    _check(q, k, v, causal=causal, pv=pv, qk_granularity=gran, layout=layout)
    assert poisoned_outputs, "the kernel's output did not come from AttentionInputs.new_output"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_quantization_kernels_gpu(dtype):
    from attnlib.kernels.sage_cuda import quantize_k_cuda, quantize_q_cuda

    q, k, _ = make_qkv(2, 4, 300, 128, kv_heads=2, seq_k=333, dtype=dtype, device="cuda", layout="bshd",
                       k_bias=10.0, seed=9)
    qb, kb = q.transpose(1, 2), k.transpose(1, 2)
    for block in (Q_BLOCK, Q_WARP_BLOCK):
        qi, dq, _ = quantize_q_cuda(qb, block, 0.125)
        wi, wd = quantize_per_block(qb.float() * 0.125, block)
        assert torch.equal(qi, wi) and torch.equal(dq, wd.squeeze(-1))
    ki, dk, mean = quantize_k_cuda(kb, K_BLOCK, smooth=True)
    assert_verbose_allclose(mean, kb.float().mean(2), atol=1e-4, name="k mean")
    wi, wd = quantize_per_block(kb.float() - mean[:, :, None], K_BLOCK)
    assert torch.equal(ki, wi) and torch.equal(dk, wd.squeeze(-1))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("seq", [1, 63, 65, 1000])
@pytest.mark.parametrize("d", [64, 128])
def test_quantize_k_parallel_gpu(seq, layout, dtype, d):
    """The three smoothed-K launches (and the unsmoothed one) against attnlib.reference.sage on
    ragged lengths across several 64-token blocks, GQA heads (B=2, Hkv=2 of Hq=6), both layouts:
    k_mean to the float64 mean, K int8 and delta_k bit-exact given that mean, reproducible run to
    run, the caller's K untouched."""
    from attnlib.kernels.sage_cuda import quantize_k_cuda

    _, k, _ = make_qkv(2, 6, 16, d, kv_heads=2, seq_k=seq, dtype=dtype, device="cuda", layout=layout,
                       k_bias=10.0, seed=seq + d)
    kb = to_bhsd(k, layout)
    before = k.clone()
    ki, dk, mean = quantize_k_cuda(kb, K_BLOCK, smooth=True)
    torch.cuda.synchronize()
    assert torch.equal(k, before), "quantize_k_cuda wrote into the caller's K"
    nb = -(-seq // K_BLOCK)
    assert ki.shape == (2, 2, seq, d) and dk.shape == (2, 2, nb) and mean.shape == (2, 2, d)
    want_mean = kb.double().mean(2)
    assert_verbose_allclose(mean.double(), want_mean, atol=1e-4, name="k mean")
    wi, wd = quantize_per_block(kb.float() - mean[:, :, None], K_BLOCK)
    assert torch.equal(ki, wi) and torch.equal(dk, wd.squeeze(-1))
    # dequantized: within half a step of the smoothed K
    err = (ki.float() - (kb.float() - mean[:, :, None]) / _per_token_k(dk, seq)).abs()
    assert err.max().item() <= 0.5 + 1e-3
    ki2, dk2, mean2 = quantize_k_cuda(kb, K_BLOCK, smooth=True)
    assert torch.equal(mean2, mean) and torch.equal(ki2, ki) and torch.equal(dk2, dk)
    ki0, dk0, mean0 = quantize_k_cuda(kb, K_BLOCK, smooth=False)
    wi0, wd0 = quantize_per_block(kb.float(), K_BLOCK)
    assert mean0 is None and torch.equal(ki0, wi0) and torch.equal(dk0, wd0.squeeze(-1))
    assert torch.equal(k, before)


def _per_token_k(dk, seq):
    """delta_k (B, H, n_blocks) -> (B, H, seq, 1), zero scales as 1 (their int8 values are 0)."""
    d = torch.where(dk > 0, dk, torch.ones_like(dk))
    return d.repeat_interleave(K_BLOCK, dim=2)[:, :, :seq, None]


@pytest.mark.gpu
@pytest.mark.parametrize("seq_k", [1, 63, 65, 1000])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_forward_ragged_keys_gqa_gpu(seq_k, layout, poisoned_outputs):
    """End to end with the parallel K mean: GQA (6 query heads on 2 kv heads), ragged key counts."""
    q, k, v = make_qkv(2, 6, 77, 128, kv_heads=2, seq_k=seq_k, dtype=torch.float16, device="cuda", layout=layout,
                       k_bias=10.0, seed=seq_k)
    before = k.clone()
    _check(q, k, v, causal=False, layout=layout)
    assert poisoned_outputs, "the kernel's output did not come from AttentionInputs.new_output"
    assert torch.equal(k, before)
