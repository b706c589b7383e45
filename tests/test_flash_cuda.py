"""flash-cuda: a CPU emulation of the kernel's fragment/ldmatrix/swizzle index math and of its
key-block masking plan (always run), and GPU checks against the float64 reference (H100)."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import attnlib
from attnlib import dispatch
from attnlib.reference import flash_reference
from attnlib.testing import assert_flash_rule, assert_verbose_allclose, make_qkv, poison_

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK_M = BLOCK_N = 64


# == CPU: emulation of the index math in csrc/flash (mirrors the C++ line by line) ============
def smem_offset(row, chunk, hd):  # FlashFwdTraitsSm80::smem_offset
    return row * hd + ((chunk ^ (row & 7)) << 3)


def store_tile(x):
    """load_tile_async: thread tid, step i copies chunk idx = tid + 128 i to its swizzled place."""
    rows, hd = x.shape
    cpr = hd // 8
    sm = np.full(rows * hd, np.nan)
    for i in range(rows * cpr // 128):
        for tid in range(128):
            idx = tid + i * 128
            row, chunk = idx // cpr, idx % cpr
            off = smem_offset(row, chunk, hd)
            assert np.isnan(sm[off:off + 8]).all(), "two chunks land on one place"
            sm[off:off + 8] = x[row, chunk * 8:chunk * 8 + 8]
    assert not np.isnan(sm).any()
    return sm


def ldmatrix_x4(sm, addrs, trans=False):
    """PTX ldmatrix .m8n8.x4 .b16: lanes 8i..8i+7 address the rows of matrix i; lane t gets
    M_i[t/4][2(t%4)+{0,1}] (trans: M_i[2(t%4)+{0,1}][t/4]). Also checks bank conflicts."""
    regs = np.zeros((32, 4, 2))
    for i in range(4):
        rows = [addrs[8 * i + j] for j in range(8)]
        assert all(a % 8 == 0 for a in rows), "ldmatrix rows must be 16-byte aligned"
        groups = {(a // 8) % 8 for a in rows}  # which 4-bank group each 16-byte row hits
        assert len(groups) == 8, f"bank conflict in matrix {i}: rows {rows}"
        m = np.stack([sm[a:a + 8] for a in rows])
        for t in range(32):
            regs[t, i] = m[2 * (t % 4):2 * (t % 4) + 2, t // 4] if trans else m[t // 4, 2 * (t % 4):2 * (t % 4) + 2]
    return regs


def mma_16816(a, b0, b1):
    """PTX mma.m16n8k16 fragments: a (32 lanes, 4 regs, 2 halves), b0/b1 (32, 2) -> c (32, 4)."""
    A, B = np.full((16, 16), np.nan), np.full((16, 8), np.nan)
    for t in range(32):
        g, q = t // 4, t % 4
        A[g, 2 * q:2 * q + 2] = a[t, 0]
        A[g + 8, 2 * q:2 * q + 2] = a[t, 1]
        A[g, 2 * q + 8:2 * q + 10] = a[t, 2]
        A[g + 8, 2 * q + 8:2 * q + 10] = a[t, 3]
        B[2 * q:2 * q + 2, g] = b0[t]
        B[2 * q + 8:2 * q + 10, g] = b1[t]
    assert not np.isnan(A).any() and not np.isnan(B).any()
    C = A @ B
    c = np.zeros((32, 4))
    for t in range(32):
        g, q = t // 4, t % 4
        c[t] = [C[g, 2 * q], C[g, 2 * q + 1], C[g + 8, 2 * q], C[g + 8, 2 * q + 1]]
    return c


def gather_acc(acc):
    """(32, n_tiles, 4) accumulators -> the warp's 16 x (8 n_tiles) matrix."""
    n_tiles = acc.shape[1]
    out = np.full((16, 8 * n_tiles), np.nan)
    for t in range(32):
        g, q = t // 4, t % 4
        for n in range(n_tiles):
            out[g, 8 * n + 2 * q:8 * n + 2 * q + 2] = acc[t, n, 0:2]
            out[g + 8, 8 * n + 2 * q:8 * n + 2 * q + 2] = acc[t, n, 2:4]
    assert not np.isnan(out).any()
    return out


@pytest.mark.parametrize("hd", [64, 128])
def test_fragment_index_math_emulated(hd):
    rng = np.random.default_rng(hd)
    Q, K, V = (rng.integers(-3, 4, size=(64, hd)).astype(np.float64) for _ in range(3))
    sQ, sK, sV = store_tile(Q), store_tile(K), store_tile(V)
    lanes = range(32)
    for warp in range(4):
        qf = [ldmatrix_x4(sQ, [smem_offset(warp * 16 + l % 16, 2 * kk + l // 16, hd) for l in lanes])
              for kk in range(hd // 16)]
        s = np.zeros((32, BLOCK_N // 8, 4))
        for kk in range(hd // 16):
            for npair in range(BLOCK_N // 16):
                kf = ldmatrix_x4(sK, [smem_offset(npair * 16 + (l // 16) * 8 + l % 8, 2 * kk + (l // 8) % 2, hd)
                                      for l in lanes])
                s[:, 2 * npair] += mma_16816(qf[kk], kf[:, 0], kf[:, 1])
                s[:, 2 * npair + 1] += mma_16816(qf[kk], kf[:, 2], kf[:, 3])
        S = gather_acc(s)
        np.testing.assert_array_equal(S, Q[warp * 16:warp * 16 + 16] @ K.T)

        o = np.zeros((32, hd // 8, 4))
        for kk in range(BLOCK_N // 16):  # P = S here: the accumulators reused as A fragments
            pf = np.stack([s[:, 2 * kk, 0:2], s[:, 2 * kk, 2:4], s[:, 2 * kk + 1, 0:2], s[:, 2 * kk + 1, 2:4]], axis=1)
            for dp in range(hd // 16):
                vf = ldmatrix_x4(sV, [smem_offset(kk * 16 + ((l // 8) % 2) * 8 + l % 8, 2 * dp + l // 16, hd)
                                      for l in lanes], trans=True)
                o[:, 2 * dp] += mma_16816(pf, vf[:, 0], vf[:, 1])
                o[:, 2 * dp + 1] += mma_16816(pf, vf[:, 2], vf[:, 3])
        O = gather_acc(o)
        np.testing.assert_array_equal(O, S @ V)

        # epilogue: stage in the warp's Q rows, read back as 16-byte chunks
        sO = np.full(64 * hd, np.nan)
        for t in lanes:
            g, q = t // 4, t % 4
            for n in range(hd // 8):
                for r in range(2):
                    off = smem_offset(warp * 16 + g + 8 * r, n, hd) + 2 * q
                    sO[off:off + 2] = o[t, n, 2 * r:2 * r + 2]
        cpr = hd // 8
        got = np.full((16, hd), np.nan)
        for i in range(16 * cpr // 32):
            for lane in lanes:
                idx = lane + 32 * i
                row, chunk = idx // cpr, idx % cpr
                off = smem_offset(warp * 16 + row, chunk, hd)
                got[row, chunk * 8:chunk * 8 + 8] = sO[off:off + 8]
        np.testing.assert_array_equal(got, O)


# -- the 128-row tile (two 16-row atoms per warp, csrc/flash flash_fwd_mainloop_sm80_atoms) ----
def padded_offset(row, chunk, hd):  # FlashFwdTraitsSm80::smem_offset with PADDED_ROWS
    return row * (hd + 8) + (chunk << 3)


def store_tile_lean(x, rows_valid=None):
    """load_tile_async_lean: thread tid copies chunk tid % CPR of rows tid / CPR + PASS_ROWS i to
    dst + 2 * smem_offset(PASS_ROWS i, 0) bytes; rows >= rows_valid are zero-filled."""
    rows, hd = x.shape
    cpr, pad_rows = hd // 8, 128 // (hd // 8)
    rows_valid = rows if rows_valid is None else rows_valid
    sm = np.full(rows * (hd + 8), np.nan)
    for tid in range(128):
        row, chunk = tid // cpr, tid % cpr
        dst = padded_offset(row, chunk, hd)
        for i in range(rows // pad_rows):
            off = dst + padded_offset(pad_rows * i, 0, hd)
            r = row + pad_rows * i
            assert off == padded_offset(r, chunk, hd)
            assert np.isnan(sm[off:off + 8]).all(), "two chunks land on one place"
            valid = pad_rows * i < rows_valid - row
            sm[off:off + 8] = x[r, chunk * 8:chunk * 8 + 8] if valid else 0.0
    return sm


def softmax_atoms_plan(m0, warp, lane, seq_q, seq_k, n0, block_n, causal, atoms=2):
    """online_softmax_step_atoms' mask for one thread: visible[(i, nt, e)] for row i = 2a + r."""
    diag = seq_k - seq_q
    row0 = m0 + warp * 16 * atoms + lane // 4
    lim0 = max(-16 * atoms, min(row0 + diag + 1, seq_k))  # causal_limit0 (int)
    tig = lane % 4
    out = {}
    for i in range(2 * atoms):
        last = seq_k
        if causal:
            last = min(lim0 + 8 * i, last)
        limit = max(last - (n0 + 2 * tig), 0)
        for nt in range(block_n // 8):
            for e in (0, 1):
                out[(i, nt, e)] = nt * 8 + e < limit
    return out


@pytest.mark.parametrize("hd,block_n", [(64, 64), (128, 32), (128, 48), (128, 64)])
def test_two_atom_fragment_index_math_emulated(hd, block_n):
    """The 128-row tile: lean loads into padded rows, the byte addresses of the atoms loop (one
    base per operand plus constants), mma over both atoms, P packed by the softmax, the
    epilogue's staging in padded rows; every ldmatrix phase free of bank conflicts."""
    rng = np.random.default_rng(hd + block_n)
    Q = rng.integers(-3, 4, size=(128, hd)).astype(np.float64)
    K, V = (rng.integers(-3, 4, size=(block_n, hd)).astype(np.float64) for _ in range(2))
    sQ, sK, sV = store_tile_lean(Q), store_tile_lean(K), store_tile_lean(V)
    row_bytes, ns, no, atoms = 2 * (hd + 8), block_n // 8, hd // 8, 2
    lanes = range(32)
    for warp in range(4):
        # byte addresses relative to each tile (flash_fwd_mainloop_sm80_atoms: q_addr, k_addr, v_addr)
        q_addr = [(warp * 32 + l % 16) * row_bytes + (l // 16) * 16 for l in lanes]
        k_addr = [((l // 16) * 8 + l % 8) * row_bytes + ((l // 8) % 2) * 16 for l in lanes]
        v_addr = [(((l // 8) % 2) * 8 + l % 8) * row_bytes + (l // 16) * 16 for l in lanes]
        s = np.zeros((32, atoms * ns, 4))
        for kk in range(hd // 16):
            qf = [ldmatrix_x4(sQ, [(q_addr[l] + a * 16 * row_bytes + kk * 32) // 2 for l in lanes])
                  for a in range(atoms)]
            for np_ in range(ns // 2):
                kf = ldmatrix_x4(sK, [(k_addr[l] + np_ * 16 * row_bytes + kk * 32) // 2 for l in lanes])
                for a in range(atoms):
                    s[:, a * ns + 2 * np_] += mma_16816(qf[a], kf[:, 0], kf[:, 1])
                    s[:, a * ns + 2 * np_ + 1] += mma_16816(qf[a], kf[:, 2], kf[:, 3])
        for a in range(atoms):
            rows = slice(warp * 32 + 16 * a, warp * 32 + 16 * a + 16)
            np.testing.assert_array_equal(gather_acc(s[:, a * ns:(a + 1) * ns]), Q[rows] @ K.T)

        # P = S here; online_softmax_step_atoms packs pf[a * K_STEPS_PV + nt // 2][2 (nt % 2) + {0, 1}]
        kpv = block_n // 16
        pf = np.zeros((32, atoms * kpv, 4, 2))
        for a in range(atoms):
            for nt in range(ns):
                pf[:, a * kpv + nt // 2, 2 * (nt % 2)] = s[:, a * ns + nt, 0:2]
                pf[:, a * kpv + nt // 2, 2 * (nt % 2) + 1] = s[:, a * ns + nt, 2:4]
        o = np.zeros((32, atoms * no, 4))
        for kk in range(kpv):
            for dp in range(hd // 16):
                vf = ldmatrix_x4(sV, [(v_addr[l] + kk * 16 * row_bytes + dp * 32) // 2 for l in lanes], trans=True)
                for a in range(atoms):
                    o[:, a * no + 2 * dp] += mma_16816(pf[:, a * kpv + kk], vf[:, 0], vf[:, 1])
                    o[:, a * no + 2 * dp + 1] += mma_16816(pf[:, a * kpv + kk], vf[:, 2], vf[:, 3])
        for a in range(atoms):
            rows = slice(warp * 32 + 16 * a, warp * 32 + 16 * a + 16)
            np.testing.assert_array_equal(gather_acc(o[:, a * no:(a + 1) * no]), (Q[rows] @ K.T) @ V)

        # epilogue: acc_o[a * N_TILES_O + n][2r..] -> row WARP_ROWS w + 16a + g + 8r, chunk n, + 2t
        sO = np.full(128 * (hd + 8), np.nan)
        for t in lanes:
            g, q = t // 4, t % 4
            for n in range(no):
                for a in range(atoms):
                    for r in range(2):
                        off = padded_offset(warp * 32 + 16 * a + g + 8 * r, n, hd) + 2 * q
                        sO[off:off + 2] = o[t, a * no + n, 2 * r:2 * r + 2]
        cpr = hd // 8
        got = np.full((32, hd), np.nan)
        for i in range(32 * cpr // 32):
            for lane in lanes:
                idx = lane + 32 * i
                row, chunk = idx // cpr, idx % cpr
                off = padded_offset(warp * 32 + row, chunk, hd)
                got[row, chunk * 8:chunk * 8 + 8] = sO[off:off + 8]
        want = np.concatenate([gather_acc(o[:, a * no:(a + 1) * no]) for a in range(atoms)])
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("hd", [64, 128])
def test_two_atom_lean_loads_zero_fill_past_the_end(hd):
    x = np.arange(64 * hd, dtype=np.float64).reshape(64, hd) + 1
    for rows_valid in (0, 1, 7, 8, 33, 63, 64, 1000, -5):
        sm = store_tile_lean(x, rows_valid)
        for r in range(64):
            got = np.array([sm[padded_offset(r, c, hd) + j] for c in range(hd // 8) for j in range(8)])
            np.testing.assert_array_equal(got, x[r] if r < rows_valid else 0.0)


@pytest.mark.parametrize("seq_q,seq_k", [(1, 1), (129, 129), (1000, 17), (17, 1000), (200, 0), (300, 64),
                                         (64, 300), (2**31 - 200, 2**31 - 100)])
@pytest.mark.parametrize("causal", [False, True])
def test_two_atom_mask_matches_visibility(seq_q, seq_k, causal):
    """online_softmax_step_atoms (32-bit limits relative to the thread's first key, the causal
    limit clamped by causal_limit0) keeps exactly the keys j < seq_k with j <= i + seq_k - seq_q."""
    diag = seq_k - seq_q
    for m0 in sorted({0, 128 * ((seq_q - 1) // 128)} if seq_q > 0 else {0}):
        for n0 in sorted({0, max(0, seq_k - 32), max(0, m0 + diag - 64), max(0, m0 + diag + 64)}):
            for warp in (0, 3):
                for lane in (0, 5, 31):
                    got = softmax_atoms_plan(m0, warp, lane, seq_q, seq_k, n0, 64, causal)
                    row0 = m0 + warp * 32 + lane // 4
                    for (i, nt, e), vis in got.items():
                        row, key = row0 + 8 * i, n0 + nt * 8 + 2 * (lane % 4) + e
                        want = key < seq_k and (not causal or key <= row + diag)
                        assert vis == want, (m0, n0, warp, lane, i, nt, e)


def kernel_plan(m0, seq_q, seq_k, causal, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N):
    """flash_fwd_mainloop_sm80: how many key blocks a query tile loads, which ones it masks."""
    diag = seq_k - seq_q
    n_end = min(seq_k, m0 + BLOCK_M + diag) if causal else seq_k
    n_blocks = (n_end + BLOCK_N - 1) // BLOCK_N if n_end > 0 else 0
    masked = [n0 + BLOCK_N > seq_k or (causal and n0 + BLOCK_N - 1 > m0 + diag)
              for n0 in range(0, n_blocks * BLOCK_N, BLOCK_N)]
    return n_blocks, masked


@pytest.mark.parametrize("seq_q,seq_k", [(1, 1), (17, 17), (129, 129), (1000, 17), (17, 1000), (64, 128),
                                         (128, 64), (200, 0), (65, 63)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("BLOCK_M,BLOCK_N", [(64, 64), (128, 64), (128, 32), (128, 48)],
                         ids=["64x64", "128x64", "128x32", "128x48"])
def test_key_block_plan_covers_exactly_the_visible_keys(seq_q, seq_k, causal, BLOCK_M, BLOCK_N):
    i = np.arange(seq_q)[:, None]
    j = np.arange(seq_k)[None, :]
    visible = (j <= i + seq_k - seq_q) if causal else np.ones((seq_q, seq_k), bool)
    for m0 in range(0, seq_q, BLOCK_M):
        rows = visible[m0:m0 + BLOCK_M]
        n_blocks, masked = kernel_plan(m0, seq_q, seq_k, causal, BLOCK_M, BLOCK_N)
        # every visible key lies in a loaded block
        assert not rows[:, n_blocks * BLOCK_N:].any()
        # skipped blocks are fully masked; the last loaded block holds a visible key
        if n_blocks:
            assert rows[:, (n_blocks - 1) * BLOCK_N:n_blocks * BLOCK_N].any() or m0 + BLOCK_M > seq_q
        for nb, needs in enumerate(masked):
            if not needs:  # unmasked blocks must be entirely visible and in range
                assert (nb + 1) * BLOCK_N <= seq_k and rows[:, nb * BLOCK_N:(nb + 1) * BLOCK_N].all()


# == GPU ===========================================================================================
def _cuda_reasons():
    k = [k for k in dispatch.kernels("flash") if k.name == "flash-cuda"][0]
    r = list(k.unavailable_reasons())
    if torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 0):
        r.append("needs sm_80+")
    return r


@pytest.fixture(scope="module")
def cuda_kernel():
    r = _cuda_reasons()
    if r:
        pytest.skip("; ".join(r))
    return [k for k in dispatch.kernels("flash") if k.name == "flash-cuda"][0]


def sdpa_baseline(q, k, v, causal, scale):
    """torch SDPA in the kernel's dtype, GQA expanded, explicit bottom-right mask; rows with no
    visible key -> 0 (SDPA gives NaN there)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    mask = None
    if causal:
        i = torch.arange(q.shape[2], device=q.device)[:, None]
        j = torch.arange(k.shape[2], device=q.device)[None, :]
        mask = j <= i + (k.shape[2] - q.shape[2])
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return torch.nan_to_num(out, nan=0.0)


def check_against_reference(q, k, v, out, lse, causal, scale=None):
    """q/k/v/out bhsd views."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    ref, ref_lse = flash_reference(q.double(), k.double(), v.double(), causal=causal, scale=scale,
                                   return_lse=True)
    base = sdpa_baseline(q, k, v, causal, scale)
    assert out.dtype == q.dtype and out.shape == ref.shape
    assert_flash_rule(out, ref, base)
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
        assert_verbose_allclose(lse, ref_lse, atol=1e-3, rtol=1e-4, name="lse")


SHAPES = [  # batch, heads_q, heads_kv, seq_q, seq_k
    (2, 4, 4, 129, 129),
    (1, 4, 2, 17, 1000),
    (1, 6, 2, 1000, 17),  # causal: most rows see no key
    (3, 2, 1, 1, 1),
]


TILES = [pytest.param(64, id="tile64"), pytest.param(None, id="tile128")]  # None: the default


@pytest.fixture
def tile_env(monkeypatch, request):
    """ATTNLIB_CUDA_FLASH_TILE_M for the public calls of a test parametrised by `tile`."""
    from attnlib.kernels.flash_cuda import TILE_M_ENV

    tile = request.getfixturevalue("tile")
    if tile is None:
        monkeypatch.delenv(TILE_M_ENV, raising=False)
    else:
        monkeypatch.setenv(TILE_M_ENV, str(tile))
    return tile


def assert_tile_spec(kernel, inp, tile):
    name = kernel.spec(inp).name
    big = tile != 64  # None: the default, the 128-row tile
    assert name.endswith("_ma2") == big and ("_bm128_" in name) == big, name


@pytest.mark.gpu
@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_forward_matches_reference(cuda_kernel, tile_env, tile, shape, causal, head_dim, dtype, layout):
    b, hq, hkv, sq, sk = shape
    q, k, v = make_qkv(b, hq, sq, head_dim, kv_heads=hkv, seq_k=sk, dtype=dtype, device="cuda", layout=layout,
                       seed=sq * 7 + sk)
    ex = attnlib.api.explain(q, k, v, layout=layout, causal=causal, return_lse=True, backend="cuda")
    assert ex.chosen is cuda_kernel, str(ex)  # auto prefers flash-triton (measured faster on H100)
    assert_tile_spec(cuda_kernel, attnlib.api.build_inputs(q, k, v, layout=layout, causal=causal), tile)
    out, lse = attnlib.flash_attention(q, k, v, causal=causal, layout=layout, return_lse=True, backend="cuda")
    tb = (lambda t: t) if layout == "bhsd" else (lambda t: t.transpose(1, 2))
    check_against_reference(tb(q), tb(k), tb(v), tb(out), lse, causal)


@pytest.mark.gpu
@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_strided_views_with_offsets_and_poisoned_output(cuda_kernel, tile_env, tile, head_dim):
    from attnlib.kernels.flash_cuda import flash_fwd_cuda

    torch.manual_seed(0)
    b, s, h, d = 2, 77, 4, head_dim
    # packed qkv (bshd views with a storage offset) and a head slice of a larger bhsd tensor
    qkv = torch.randn(b, s + 3, 3, h, d, device="cuda", dtype=torch.float16)
    q = qkv[:, 2:2 + s, 0].transpose(1, 2)
    k = qkv[:, 1:1 + s, 1].transpose(1, 2)
    v = torch.randn(b, 2 * h, s, d, device="cuda", dtype=torch.float16)[:, h:]
    assert q.storage_offset() and k.storage_offset() and v.storage_offset()
    for causal in (False, True):
        big_out = poison_(torch.empty(b, h, s + 5, d, device="cuda", dtype=torch.float16))
        out = big_out[:, :, 3:3 + s]
        lse = poison_(torch.empty(b, h, s, device="cuda", dtype=torch.float32))
        flash_fwd_cuda(q, k, v, out, lse, causal=causal, scale=d ** -0.5, tile_m=tile)
        check_against_reference(q, k, v, out, lse, causal)
        assert torch.isnan(big_out[:, :, :3]).all() and torch.isnan(big_out[:, :, 3 + s:]).all()
        # the public call on the same views
        got = attnlib.flash_attention(q, k, v, causal=causal, backend="cuda")
        torch.testing.assert_close(got, out, rtol=0, atol=0)


@pytest.mark.gpu
def test_misaligned_view_is_rejected_with_reason(cuda_kernel):
    base = torch.randn(1, 2, 16 * 64 + 1, device="cuda", dtype=torch.float16)
    q = base[..., 1:].view(1, 2, 16, 64)  # data_ptr 2 bytes past a 16-byte boundary
    ex = attnlib.api.explain(q, q, q)
    assert ex.chosen is not cuda_kernel
    assert any("16-byte" in r for r in ex.reasons["flash-cuda"])


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay(cuda_kernel):
    q, k, v = make_qkv(1, 4, 200, 64, dtype=torch.bfloat16, device="cuda", seed=1)
    attnlib.flash_attention(q, k, v, causal=True, backend="cuda")  # compile + load outside capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        attnlib.flash_attention(q, k, v, causal=True, backend="cuda")
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = attnlib.flash_attention(q, k, v, causal=True, backend="cuda")
    for seed in (2, 3):
        q2, k2, v2 = make_qkv(1, 4, 200, 64, dtype=torch.bfloat16, device="cuda", seed=seed)
        q.copy_(q2), k.copy_(k2), v.copy_(v2)
        g.replay()
        torch.cuda.synchronize()
        expect = attnlib.flash_attention(q2, k2, v2, causal=True, backend="cuda")
        torch.testing.assert_close(out, expect, rtol=0, atol=0)


@pytest.mark.gpu
def test_runs_on_the_current_stream(cuda_kernel):
    q, k, v = make_qkv(1, 2, 256, 128, dtype=torch.float16, device="cuda", seed=4)
    q_new = make_qkv(1, 2, 256, 128, dtype=torch.float16, device="cuda", seed=5)[0]
    expect = attnlib.flash_attention(q_new, k, v, backend="cuda")
    torch.cuda.synchronize()
    outs = []
    for _ in range(2):  # two streams, each delayed: a launch on any other stream reads stale q
        s = torch.cuda.Stream()
        qs = q.clone()
        torch.cuda.synchronize()
        with torch.cuda.stream(s):
            torch.cuda._sleep(20_000_000)
            qs.copy_(q_new)
            outs.append(attnlib.flash_attention(qs, k, v, backend="cuda"))
    torch.cuda.synchronize()
    for o in outs:
        torch.testing.assert_close(o, expect, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_gpu(cuda_kernel):
    q, k, v = make_qkv(1, 2, 100, 64, dtype=torch.float16, device="cuda:1", seed=6)
    out = attnlib.flash_attention(q, k, v, causal=True, backend="cuda")
    assert out.device == torch.device("cuda:1")
    check_against_reference(q, k, v, out, None, True)


@pytest.mark.gpu
def test_backward_through_autograd(cuda_kernel):
    q, k, v = make_qkv(1, 4, 70, 64, kv_heads=2, dtype=torch.float16, device="cuda", seed=7, requires_grad=True)
    out = attnlib.flash_attention(q, k, v, causal=True, backend="cuda")
    do = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = flash_reference(qr, kr, vr, causal=True)
    want = torch.autograd.grad(ref, (qr, kr, vr), do.double())
    # flash_attn's rule for gradients: 3x the error of plain PyTorch math's fp16 gradients, the
    # baseline test_flash_triton holds the same (Triton) backward to
    from test_flash_triton import torch_same_dtype

    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    have = torch.autograd.grad(torch_same_dtype(qs, ks, vs, causal=True, scale=64 ** -0.5)[0], (qs, ks, vs), do)
    for name, got, w, h in zip(("dq", "dk", "dv"), (dq, dk, dv), want, have):
        assert_flash_rule(got, w, h, factor=3.0, name=name)
    # a direct kernel call with grad enabled goes through the kernel's own autograd.Function
    inp = attnlib.api.build_inputs(q, k, v, causal=True)
    out2 = cuda_kernel.forward(inp)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    dq2, dk2, dv2 = torch.autograd.grad(out2, (q, k, v), do)
    for name, got, w, h in zip(("dq", "dk", "dv"), (dq2, dk2, dv2), want, have):
        assert_flash_rule(got, w, h, factor=3.0, name=name)


@pytest.mark.gpu
def test_disk_cache_reused_by_second_process(cuda_kernel, tmp_path):
    code = ("import torch, attnlib; from attnlib.testing import make_qkv; "
            "q,k,v = make_qkv(1, 2, 33, 64, dtype=torch.float16, device='cuda', seed=1); "
            "o = attnlib.flash_attention(q, k, v, backend='cuda'); torch.cuda.synchronize(); print('ran')")
    env = dict(os.environ, ATTNLIB_CACHE_DIR=str(tmp_path), ATTNLIB_CUDA_VERBOSE="1", ATTNLIB_CUDA_NO_CUBINS="1")
    env.pop("ATTNLIB_CUDA_FLASH_TILE_M", None)  # the default tile (128 rows)
    logs = []
    for _ in range(2):
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
        assert res.returncode == 0 and "ran" in res.stdout, res.stderr
        logs.append(res.stderr)
    assert "flash_fwd_hd64_fp16_causal0_bm128_bn64_ma2: built" in logs[0], logs[0]
    assert "flash_fwd_hd64_fp16_causal0_bm128_bn64_ma2: hit" in logs[1], logs[1]
    assert "nvrtc " not in logs[1]


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_tile128_long_sequence_and_graph_capture(cuda_kernel, head_dim, causal):
    """The 128-row tile over many key blocks (online-softmax rescaling across blocks, both
    buffers), in a CUDA graph, against the float64 reference and the verified 64-row kernel."""
    from attnlib.kernels.flash_cuda import flash_fwd_cuda

    q, k, v = make_qkv(2, 4, 1000, head_dim, kv_heads=2, seq_k=1537, dtype=torch.bfloat16, device="cuda",
                       seed=head_dim + causal)
    out = poison_(torch.empty_like(q))
    lse = poison_(torch.empty(2, 4, 1000, device="cuda", dtype=torch.float32))
    flash_fwd_cuda(q, k, v, out, lse, causal=causal, scale=head_dim ** -0.5, tile_m=128)  # compile + load
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        flash_fwd_cuda(q, k, v, out, lse, causal=causal, scale=head_dim ** -0.5, tile_m=128)
    out.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    check_against_reference(q, k, v, out, lse, causal)
    ref64 = torch.empty_like(q)
    flash_fwd_cuda(q, k, v, ref64, None, causal=causal, scale=head_dim ** -0.5, tile_m=64)
    torch.testing.assert_close(out, ref64, rtol=2e-2, atol=2e-2)


def test_tile_m_env_selects_spec_and_rejects_bad_values(monkeypatch):
    from attnlib.kernels import flash_cuda

    monkeypatch.delenv(flash_cuda.TILE_M_ENV, raising=False)
    assert flash_cuda._spec_for(128, torch.bfloat16, True).name == "flash_fwd_hd128_bf16_causal1_bm128_bn32_ma2"
    assert flash_cuda._spec_for(64, torch.float16, False).name == "flash_fwd_hd64_fp16_causal0_bm128_bn64_ma2"
    monkeypatch.setenv(flash_cuda.TILE_M_ENV, "64")
    assert flash_cuda._spec_for(128, torch.bfloat16, True).name == "flash_fwd_hd128_bf16_causal1_bm64_bn64"
    assert flash_cuda._spec_for(64, torch.float16, False, tile_m=128).name.endswith("_bm128_bn64_ma2")
    monkeypatch.setenv(flash_cuda.TILE_M_ENV, "96")
    with pytest.raises(ValueError, match="ATTNLIB_CUDA_FLASH_TILE_M"):
        flash_cuda._spec_for(64, torch.float16, False)
    with pytest.raises(ValueError, match="tile_m"):
        flash_cuda._spec_for(64, torch.float16, False, tile_m=32)


def test_block_n_env_selects_the_tile128_step_and_rejects_bad_values(monkeypatch):
    """ATTNLIB_CUDA_FLASH_BLOCK_N (read per call) picks the 128-row tile's keys per step among
    specs.TILE128_BLOCK_N_CHOICES; the 64-row tile ignores it; bad values name the variable."""
    from attnlib.cuda import specs
    from attnlib.kernels import flash_cuda

    monkeypatch.delenv(flash_cuda.TILE_M_ENV, raising=False)
    monkeypatch.setenv(flash_cuda.BLOCK_N_ENV, "48")
    assert flash_cuda._spec_for(128, torch.bfloat16, False).name == "flash_fwd_hd128_bf16_causal0_bm128_bn48_ma2"
    assert flash_cuda._spec_for(128, torch.float16, True, block_n=64).name.endswith("_bm128_bn64_ma2")
    assert flash_cuda._spec_for(128, torch.float16, True, tile_m=64).name == "flash_fwd_hd128_fp16_causal1_bm64_bn64"
    spec = flash_cuda._spec_for(128, torch.bfloat16, True)
    assert spec.smem_bytes == specs.flash_fwd_smem_bytes(128, 128, 48, 2) and spec.threads == 128
    with pytest.raises(ValueError, match="ATTNLIB_CUDA_FLASH_BLOCK_N: the 128-row tile at head dim 64 takes"):
        flash_cuda._spec_for(64, torch.float16, False)
    for bad in ("40", "16"):
        monkeypatch.setenv(flash_cuda.BLOCK_N_ENV, bad)
        with pytest.raises(ValueError, match="ATTNLIB_CUDA_FLASH_BLOCK_N"):
            flash_cuda._spec_for(128, torch.float16, False)
    monkeypatch.setenv(flash_cuda.BLOCK_N_ENV, "many")
    with pytest.raises(ValueError, match="ATTNLIB_CUDA_FLASH_BLOCK_N must be an int"):
        flash_cuda._spec_for(128, torch.float16, False)
    monkeypatch.delenv(flash_cuda.BLOCK_N_ENV)
    assert flash_cuda._spec_for(128, torch.float16, False).name.endswith("_bm128_bn32_ma2")
    with pytest.raises(ValueError, match=r"takes \(32, 48, 64\) keys per step, not 40"):
        specs.flash_fwd_tile128_spec(128, "fp16", False, block_n=40)


@pytest.mark.parametrize("block_n", [48, 64])
def test_tile128_wider_key_steps_compile_for_sm80_and_sm90(block_n):
    """The opt-in key steps of the 128-row tile at hd128 compile under NVRTC (what a GPU loads)
    for sm_80 and sm_90, both dtypes, causal or not, without compiler warnings."""
    from attnlib.cuda import loader, specs

    if loader.availability_reasons():
        pytest.skip("; ".join(loader.availability_reasons()))
    for dtype in ("fp16", "bf16"):
        for causal in (False, True):
            spec = specs.flash_fwd_tile128_spec(128, dtype, causal, block_n)
            for arch in ("80", "90"):
                res = loader.compile_nvrtc(spec, arch)
                assert res.binary and not res.log.strip(), res.log


@pytest.mark.gpu
@pytest.mark.parametrize("block_n", [48, 64])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_tile128_wider_key_steps_match_reference(cuda_kernel, block_n, causal, dtype):
    """The opt-in key steps of the 128-row tile at hd128 (ATTNLIB_CUDA_FLASH_BLOCK_N): odd
    lengths that end mid-step, more queries than keys and the reverse, GQA, poisoned outputs,
    against the float64 reference."""
    from attnlib.kernels.flash_cuda import flash_fwd_cuda

    for b, hq, hkv, sq, sk in ((2, 4, 2, 1000, 1537), (1, 6, 2, 77, 300), (1, 2, 1, 333, 50)):
        q, k, v = make_qkv(b, hq, sq, 128, kv_heads=hkv, seq_k=sk, dtype=dtype, device="cuda", seed=sq + block_n)
        out = poison_(torch.empty_like(q))
        lse = poison_(torch.empty(b, hq, sq, device="cuda", dtype=torch.float32))
        flash_fwd_cuda(q, k, v, out, lse, causal=causal, scale=128 ** -0.5, tile_m=128, block_n=block_n)
        torch.cuda.synchronize()
        check_against_reference(q, k, v, out, lse, causal)
