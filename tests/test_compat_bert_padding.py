"""flash_attn.bert_padding's helpers on attnlib: unpad -> varlen attention -> pad equals padded
attention with a key-padding mask; gradients through both directions; flash_attn 2.6's returns."""
import pytest
import torch

import attnlib
from attnlib.compat import flash_attn as fa
from attnlib.compat.bert_padding import index_first_axis, index_put_first_axis, pad_input, unpad_input
from attnlib.testing import assert_verbose_allclose


def _mask(lengths, seqlen):
    return torch.arange(seqlen)[None, :] < torch.tensor(lengths)[:, None]


def test_unpad_returns_flash_attn_26s_five_values_and_pad_inverts_it():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 2, 5, generator=g)
    mask = _mask([7, 0, 3], 7)
    mask[0, 2] = False  # a hole, not only right padding
    packed, indices, cu, max_len, used = unpad_input(x, mask.int())
    assert packed.shape == (9, 2, 5) and indices.dtype == torch.int64
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 6, 6, 9]
    assert max_len == 6 and isinstance(max_len, int) and used.tolist() == [6, 0, 3] and used.dtype == torch.int32
    assert torch.equal(packed, x[mask])
    back = pad_input(packed, indices, 3, 7)
    assert torch.equal(back, torch.where(mask[:, :, None, None], x, torch.zeros_like(x)))


def test_unused_mask_is_packed_but_not_counted_as_used():
    x = torch.randn(2, 5, 3)
    mask, unused = _mask([3, 2], 5), torch.zeros(2, 5, dtype=torch.bool)
    unused[0, 3] = True
    packed, _, cu, max_len, used = unpad_input(x, mask, unused)
    assert cu.tolist() == [0, 4, 6] and max_len == 4 and used.tolist() == [3, 2] and packed.shape == (6, 3)


def test_padded_attention_through_unpad_varlen_pad_matches_masked_attention_and_grads():
    """The transformers pattern: real tokens only through flash_attn_varlen_func, padded back; the
    real rows equal attention restricted to each row's real keys (float64), gradients too."""
    g = torch.Generator().manual_seed(1)
    lengths, s, h, d = [9, 4, 1], 9, 2, 16
    x = [torch.randn(3, s, h, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    mask = _mask(lengths, s)
    (q, idx, cu, mx, _), (k, *_), (v, *_) = (unpad_input(t, mask) for t in x)
    out = pad_input(fa.flash_attn_varlen_func(q, k, v, cu, cu, mx, mx, causal=True), idx, 3, s)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, x, dout)
    ref = torch.zeros_like(out)
    leaves = [t.detach().clone().requires_grad_() for t in x]
    for b, n in enumerate(lengths):
        qb, kb, vb = (t[b:b + 1, :n] for t in leaves)
        ref[b:b + 1, :n] = attnlib.reference.flash_reference(qb.transpose(1, 2), kb.transpose(1, 2),
                                                             vb.transpose(1, 2), causal=True).transpose(1, 2)
    want = torch.autograd.grad(ref, leaves, dout)
    assert_verbose_allclose(out, ref, atol=1e-12)
    for a, w, n in zip(got, want, "qkv"):
        assert_verbose_allclose(a, w, atol=1e-12, name=f"d{n}")
        assert (a[~mask] == 0).all()  # padding gets no gradient


def test_index_helpers_and_their_errors():
    x = torch.randn(6, 3, requires_grad=True)
    idx = torch.tensor([4, 0, 2])
    y = index_first_axis(x, idx)
    assert torch.equal(y, x[idx])
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert gx[[0, 2, 4]].eq(1).all() and gx[[1, 3, 5]].eq(0).all()
    z = index_put_first_axis(y, idx, 6)
    assert torch.equal(z[idx], y) and z[[1, 3, 5]].eq(0).all()
    with pytest.raises(TypeError, match="indices must be a 1-D int"):
        index_first_axis(x, idx.float())
    with pytest.raises(ValueError, match="values has 2 rows for 3 indices"):
        index_put_first_axis(y[:2], idx, 6)
    with pytest.raises(ValueError, match="attention_mask must be"):
        unpad_input(torch.randn(2, 5, 3), torch.ones(2, 4))
