"""Input checks that gave a crash, a kernel-selection error or a misleading message: an array
given as feature_map, a value head_dim of 0, the block_mask shape message, a FlexAttention
BlockMask given as block_mask (and its converter), predict_block_mask naming v for a bad k, and
NumPy integer block sizes accepted everywhere (bool and float elements refused)."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import attnlib
from attnlib.block_mask import block_mask_to_index, to_flex_block_mask
from attnlib.options import check_method_options


def qkv(b=1, h=2, s=16, d=8, dv=None, layout="bhsd"):
    gen = torch.Generator().manual_seed(0)
    shape = (b, h, s, d) if layout == "bhsd" else (b, s, h, d)
    vshape = shape[:3] + (d if dv is None else dv,)
    return (torch.randn(shape, generator=gen), torch.randn(shape, generator=gen), torch.randn(vshape, generator=gen))


# ---- feature_map of the wrong type ------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.array(["elu", "relu"]), ["elu"], torch.zeros(2), 3])
@pytest.mark.parametrize("method", ["linear", "sla"])
def test_feature_map_not_a_str_is_a_type_error_naming_it(method, bad):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"feature_map must be a str, one of \('elu', 'relu', 'softmax', 'identity'\)"):
        attnlib.attention(q, k, v, method=method, feature_map=bad)
    with pytest.raises(TypeError, match="feature_map"):  # the setup check of patch_sdpa / diffusers
        check_method_options(method, {"feature_map": bad})


# ---- head_dim 0 -------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("method,options", [
    ("flash", {}), ("sage", {}), ("linear", {}), ("sla", {}),
    ("block_sparse", {"block_mask": torch.ones(1, 1, 1, 1, dtype=torch.bool)}),
])
def test_value_head_dim_zero_is_a_value_error_naming_v(method, options, layout):
    q, k, v = qkv(dv=0, layout=layout)
    with pytest.raises(ValueError, match="v must have a positive head_dim, got 0"):
        attnlib.attention(q, k, v, method=method, layout=layout, **options)
    with pytest.raises(ValueError, match="v must have a positive head_dim"):
        attnlib.explain(q, k, v, method=method, layout=layout, **options)


def test_query_key_head_dim_zero_names_q_and_k():
    q, k, v = qkv(d=0, dv=8)
    with pytest.raises(ValueError, match="q and k must have a positive head_dim, got 0"):
        attnlib.flash_attention(q, k, v)


# ---- block_mask shape message -----------------------------------------------------------------

def test_block_mask_shape_message_has_no_one_or_one():
    q, k, v = qkv(b=1, h=2)
    with pytest.raises(ValueError) as e:
        attnlib.block_sparse_attention(q, k, v, torch.ones(1, 1, 2, 2, dtype=torch.bool), block_size=(16, 16))
    msg = str(e.value)
    assert "must have shape (1, 1 or 2, 1, 1) for block_size=(16, 16)" in msg and "1 or 1" not in msg
    q, k, v = qkv(b=2, h=1)
    with pytest.raises(ValueError, match=re.escape("(1 or 2, 1, 1, 1)")):
        attnlib.block_sparse_attention(q, k, v, torch.ones(1, 1, 1, 2, dtype=torch.bool), block_size=(16, 16))
    with pytest.raises(ValueError, match=re.escape("must be 4-D (1 or 2, 1, 1, 1)")):
        attnlib.block_sparse_attention(q, k, v, torch.ones(1, 1, 1, dtype=torch.bool), block_size=(16, 16))


# ---- FlexAttention BlockMask ------------------------------------------------------------------

def test_flex_block_mask_as_block_mask_points_to_the_converter():
    pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v = qkv()
    fb = to_flex_block_mask(torch.ones(1, 1, 1, 1, dtype=torch.bool), (16, 16), seq_q=16, seq_k=16)
    with pytest.raises(TypeError, match=r"block_mask must be a bool torch.Tensor, got BlockMask: .*"
                                        r"attnlib.block_mask_from_flex\(block_mask\).*BLOCK_SIZE"):
        attnlib.block_sparse_attention(q, k, v, fb, block_size=(16, 16))
    with pytest.raises(TypeError, match=r"block_mask_from_flex"):
        block_mask_to_index(fb)
    with pytest.raises(TypeError, match="must be a bool torch.Tensor, got list$"):  # no hint for others
        attnlib.block_sparse_attention(q, k, v, [[True]], block_size=(16, 16))


@pytest.mark.parametrize("causal", [False, True])
def test_block_mask_from_flex_inverts_to_flex_block_mask(causal):
    pytest.importorskip("torch.nn.attention.flex_attention")
    m = torch.rand(2, 3, 3, 4, generator=torch.Generator().manual_seed(1)) < 0.5
    bm = to_flex_block_mask(m, (16, 16), seq_q=40, seq_k=64, causal=causal)
    back = attnlib.block_mask_from_flex(bm)
    assert back.dtype == torch.bool and back.shape == m.shape
    if causal:  # blocks wholly above the diagonal are dropped: no query of theirs sees a key
        qi, kj = torch.arange(3)[:, None], torch.arange(4)[None, :]
        m = m & (kj * 16 <= torch.clamp((qi + 1) * 16, max=40) - 1 + 64 - 40)
    assert torch.equal(back, m)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_block_mask_from_flex_of_create_block_mask_runs_as_flex_does():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    sq, sk, bs = 100, 70, (32, 16)  # ragged: flex pads both to whole blocks
    band = flex.create_block_mask(lambda b, h, i, j: (j <= i + sk - sq) & (j >= i + sk - sq - 40), 1, None, sq, sk,
                                  device="cpu", BLOCK_SIZE=bs)
    m = attnlib.block_mask_from_flex(band)
    assert m.shape == (1, 1, 4, 5) and torch.equal(m, band.to_dense() > 0)
    # causal: the per-element part of flex's partial blocks is causal=True's
    fb = flex.create_block_mask(lambda b, h, i, j: j <= i + sk - sq, 1, None, sq, sk, device="cpu", BLOCK_SIZE=bs)
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, s, 16, generator=gen, dtype=torch.float64) for s in (sq, sk, sk))
    out = attnlib.block_sparse_attention(q, k, v, attnlib.block_mask_from_flex(fb), block_size=fb.BLOCK_SIZE,
                                         causal=True, backend="torch")
    ref = flex.flex_attention(q, k, v, block_mask=fb)
    rows = torch.arange(sq) + sk - sq >= 0  # the queries that see a key
    torch.testing.assert_close(out[:, :, rows], ref[:, :, rows])


def test_block_mask_from_flex_refuses_a_block_both_partial_and_full():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    one = torch.ones(1, 1, 1, dtype=torch.int32)
    idx = torch.zeros(1, 1, 1, 2, dtype=torch.int32)
    fb = flex.BlockMask.from_kv_blocks(one, idx, one, idx, BLOCK_SIZE=16, seq_lengths=(16, 32))
    with pytest.raises(ValueError, match="both as a partial and as a full block"):
        attnlib.block_mask_from_flex(fb)
    with pytest.raises(TypeError, match="BlockMask"):
        attnlib.block_mask_from_flex(torch.ones(1, 1, 1, 1, dtype=torch.bool))


# ---- predict_block_mask names k, not v --------------------------------------------------------

@pytest.mark.parametrize("k_shape,kw,exc,text", [
    ((2, 2, 16, 8), {}, ValueError, "q and k must have one batch size, got q=1, k=2"),
    ((1, 0, 16, 8), {}, ValueError, "k must have at least one head"),
    ((1, 3, 16, 8), {}, ValueError, r"query heads \(2\) must be a multiple of key heads \(3\)"),
    ((1, 2, 16, 8), {"device": "meta"}, ValueError, "q and k must be on one device, got q=cpu, k=meta"),
])
def test_predict_block_mask_names_k(k_shape, kw, exc, text):
    q = torch.randn(1, 2, 16, 8)
    with pytest.raises(exc, match=text) as e:
        attnlib.predict_block_mask(q, torch.randn(k_shape, **kw), topk=0.5, block_size=(8, 8))
    assert not re.search(r"\bv\b", str(e.value))


def test_predict_block_mask_names_k_in_bshd():
    q = torch.randn(1, 16, 2, 8)  # (B, S, H, D)
    with pytest.raises(ValueError, match=r"query heads \(2\) must be a multiple of key heads \(3\)"):
        attnlib.predict_block_mask(q, torch.randn(1, 16, 3, 8), topk=0.5, block_size=(8, 8), layout="bshd")
    out = attnlib.predict_block_mask(q, torch.randn(1, 24, 1, 8), topk=0.5, block_size=(8, 8), layout="bshd")
    assert out.shape == (1, 2, 2, 3)


# ---- block_size: integral numbers everywhere, bool and float refused ----------------------------

NP_SIZE = (np.int64(16), np.int32(8))


def test_numpy_int_block_size_accepted_everywhere():
    q, k, v = qkv(s=32)
    want = attnlib.predict_block_mask(q, k, topk=0.5, block_size=(16, 8))
    assert torch.equal(attnlib.predict_block_mask(q, k, topk=0.5, block_size=NP_SIZE), want)
    tok = torch.rand(32, 32, generator=torch.Generator().manual_seed(5)) < 0.1
    assert torch.equal(attnlib.block_mask_from_token_mask(tok, NP_SIZE),
                       attnlib.block_mask_from_token_mask(tok, (16, 8)))
    m = torch.ones(1, 1, 2, 4, dtype=torch.bool)
    assert to_flex_block_mask(m, NP_SIZE, seq_q=32, seq_k=32).BLOCK_SIZE == (16, 8)
    assert attnlib.explain(q, k, v, method="block_sparse", block_mask=m, block_size=NP_SIZE).chosen is not None
    assert attnlib.explain(q, k, v, method="sla", block_size=list(NP_SIZE)).chosen is not None
    check_method_options("sla", {"block_size": NP_SIZE})  # patch_sdpa / diffusers setup
    out = attnlib.block_sparse_attention(q, k, v, m, block_size=NP_SIZE, backend="torch")
    torch.testing.assert_close(out, attnlib.block_sparse_attention(q, k, v, m, block_size=(16, 8), backend="torch"))
    with pytest.raises(ValueError, match="block_size must be a pair of positive ints"):  # still positive
        attnlib.predict_block_mask(q, k, topk=0.5, block_size=(np.int64(0), 16))


@pytest.mark.parametrize("bad", [(True, 16), (16, 16.0), (np.float32(16), 16), (np.bool_(True), 16)])
def test_bool_or_float_block_size_is_a_type_error_naming_it(bad):
    q, k, v = qkv(s=32)
    m = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    calls = [
        lambda: attnlib.block_sparse_attention(q, k, v, m, block_size=bad),
        lambda: attnlib.sla_attention(q, k, v, block_size=bad),
        lambda: attnlib.predict_block_mask(q, k, topk=0.5, block_size=bad),
        lambda: attnlib.block_mask_from_token_mask(torch.ones(32, 32, dtype=torch.bool), bad),
        lambda: check_method_options("block_sparse", {"block_size": bad}),
    ]
    for call in calls:
        with pytest.raises(TypeError, match=r"block_size must be a pair of positive ints"):
            call()


def test_sla_module_takes_numpy_block_size_and_refuses_array_feature_map():
    # SparseLinearAttention checks its arguments as attention() does
    from attnlib import SparseLinearAttention

    mod = SparseLinearAttention(16, block_size=(np.int64(16), np.int32(16)))
    assert mod.block_size == (16, 16) and all(type(b) is int for b in mod.block_size)
    with pytest.raises(TypeError, match="block_size"):
        SparseLinearAttention(16, block_size=(16.0, 16))
    with pytest.raises(TypeError, match="feature_map"):
        SparseLinearAttention(16, feature_map=np.array(["elu"]))
