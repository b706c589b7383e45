"""Review of the public API's validation and the flash_attn compatibility layer: inputs that are not
dense tensors, and softmax_scale values outside the kernels' float32 range, are refused with an
error naming the argument (they failed inside a kernel or named attnlib's own argument)."""
from __future__ import annotations

import pytest
import torch

import attnlib
from attnlib.compat import flash_attn as fa


def dense_qkv(layout="bshd"):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    shape = (1, 5, 2, 16) if layout == "bshd" else (1, 2, 5, 16)
    return [torch.randn(*shape, generator=gen) for _ in range(3)]


def nested(x):
    """A jagged nested tensor of x's first row split in two sequences (as torch SDPA takes them)."""
    return torch.nested.nested_tensor([x[0, :, :2], x[0, :, 2:]], layout=torch.jagged)


NOT_DENSE = {
    "sparse_coo": lambda x: x.to_sparse(),
    "mkldnn": lambda x: x.to_mkldnn(),
}


@pytest.mark.parametrize("kind", sorted(NOT_DENSE))
@pytest.mark.parametrize("which", [0, 1, 2], ids=["q", "k", "v"])
def test_non_dense_inputs_are_a_type_error_naming_the_argument(kind, which):
    """Sparse and MKL-DNN tensors passed validation and raised torch's NotImplementedError ("Cannot
    access storage of SparseTensorImpl") from inside the kernel."""
    name = "qkv"[which]
    args = dense_qkv("bhsd")
    args[which] = NOT_DENSE[kind](args[which])
    with pytest.raises(TypeError, match=f"{name} must be a dense"):
        attnlib.flash_attention(*args)
    with pytest.raises(TypeError, match=f"{name} must be a dense"):
        attnlib.explain(*args)
    bshd = [t.transpose(1, 2) if i != which else NOT_DENSE[kind](dense_qkv()[0]) for i, t in enumerate(dense_qkv())]
    with pytest.raises(TypeError, match=f"{name} must be a dense"):
        fa.flash_attn_func(*bshd)


def test_nested_inputs_are_a_type_error():
    """A jagged nested tensor (torch SDPA takes them) reached attnlib's op and raised
    NotImplementedError naming only the op."""
    q, k, v = dense_qkv("bhsd")
    with pytest.raises(TypeError, match="q must be a dense.*nested"):
        attnlib.flash_attention(nested(q), nested(k), nested(v))


def test_compat_packed_varlen_and_kvcache_refuse_non_dense_tensors():
    q, k, v = dense_qkv()
    with pytest.raises(TypeError, match="qkv must be a dense"):
        fa.flash_attn_qkvpacked_func(torch.stack((q, k, v), dim=2).to_sparse())
    with pytest.raises(TypeError, match="kv must be a dense"):
        fa.flash_attn_kvpacked_func(q, torch.stack((k, v), dim=2).to_sparse())
    cu = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(TypeError, match="k must be a dense"):
        fa.flash_attn_varlen_func(q[0], k[0].to_sparse(), v[0], cu, cu, 5, 5)
    k_cache, v_cache = k.clone(), v.clone()
    with pytest.raises(TypeError, match="q must be a dense"):
        fa.flash_attn_with_kvcache(q.to_sparse(), k_cache, v_cache, cache_seqlens=3)
    with pytest.raises(TypeError, match="k_cache must be a dense"):
        fa.flash_attn_with_kvcache(q, k_cache.to_sparse(), v_cache, cache_seqlens=3)
    new = torch.randn(1, 1, 2, 16)
    with pytest.raises(TypeError, match="v must be a dense"):
        fa.flash_attn_with_kvcache(q, k_cache, v_cache, new, new.to_sparse(), cache_seqlens=3)
    assert torch.equal(k_cache, k) and torch.equal(v_cache, v)


@pytest.mark.parametrize("which", [0, 1, 2], ids=["q", "k", "v"])
def test_varlen_refuses_non_dense_tensors(which):
    """attnlib.flash_attention_varlen (and sageattn_varlen, through the same check_packed) took a
    sparse packed tensor into its kernels."""
    args = [t[0] for t in dense_qkv()]
    args[which] = args[which].to_sparse()
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    with pytest.raises(TypeError, match=f"{'qkv'[which]} must be a dense"):
        attnlib.flash_attention_varlen(*args, cu, cu, 3, 3)


def test_sdpa_drop_in_leaves_sparse_inputs_to_torch(monkeypatch):
    """The SDPA drop-in sends what attnlib's input checks refuse to torch: a sparse key now is one
    of those, where attnlib's kernel raised before."""
    from attnlib.integrations import sdpa

    sent = []
    monkeypatch.setattr(sdpa, "TORCH_SDPA", lambda *a, **kw: sent.append(a) or "torch's")
    q, k, v = dense_qkv("bhsd")
    assert attnlib.scaled_dot_product_attention(q, k.to_sparse(), v) == "torch's" and len(sent) == 1


@pytest.mark.parametrize("func", ["dense", "kvcache", "varlen"])
@pytest.mark.parametrize("scale", [1e-40, 1e39], ids=["below-float32-normal", "past-float32"])
def test_softmax_scale_out_of_the_kernels_range_names_softmax_scale(func, scale):
    """A positive, finite softmax_scale outside float32's range (the kernels scale scores in
    float32: below its smallest normal a masked score gives -inf * 0 = NaN, above ~2.4e38 inf) was
    refused by the error for attnlib's own argument, "scale must ...", an argument flash_attn's
    callers never passed."""
    q, k, v = dense_qkv()
    cu = torch.tensor([0, 5], dtype=torch.int32)
    calls = {
        "dense": lambda: fa.flash_attn_func(q, k, v, softmax_scale=scale),
        "kvcache": lambda: fa.flash_attn_with_kvcache(q, k, v, cache_seqlens=3, softmax_scale=scale),
        "varlen": lambda: fa.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 5, 5, softmax_scale=scale),
    }
    with pytest.raises(ValueError, match="^softmax_scale must be finite and positive, between"):
        calls[func]()


@pytest.mark.parametrize("func", ["dense", "kvcache", "varlen"])
@pytest.mark.parametrize("end", ["smallest-normal", "usual", "largest"])
def test_softmax_scale_at_the_range_ends_is_accepted(func, end):
    """softmax_scale at either end of the accepted range computes attention at that scale: against
    the float64 reference (bottom-right causal, so masked scores meet the scale too). At the
    smallest normal float32 every visible key weighs the same; at SCALE_MAX (the scale times
    log2(e) is float32's largest finite value) the softmax is the row's argmax, so q is shrunk to
    keep |q . k| * scale finite in float32 (larger scores overflow in any float32 softmax)."""
    from attnlib.inputs import FLOAT32_TINY, SCALE_MAX
    from attnlib.reference import flash_reference
    from attnlib.testing import ATOL, assert_flash_rule

    scale = {"smallest-normal": FLOAT32_TINY, "usual": 0.3, "largest": SCALE_MAX}[end]
    q, k, v = dense_qkv()
    if end == "largest":
        q = q * (0.5 / (q.transpose(1, 2) @ k.permute(0, 2, 3, 1)).abs().max())  # |scores| <= 0.5
    cu = torch.tensor([0, 5], dtype=torch.int32)
    seen = 3 if func == "kvcache" else 5  # keys in the cache / the sequence
    calls = {
        "dense": lambda: fa.flash_attn_func(q, k, v, softmax_scale=scale, causal=True),
        "kvcache": lambda: fa.flash_attn_with_kvcache(q, k, v, cache_seqlens=3, softmax_scale=scale, causal=True),
        "varlen": lambda: fa.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 5, 5, softmax_scale=scale,
                                                    causal=True)[None],
    }
    out = calls[func]()
    bhsd = [t.transpose(1, 2) for t in (q, k[:, :seen], v[:, :seen])]
    ref = flash_reference(*(t.double() for t in bhsd), causal=True, scale=scale).transpose(1, 2)
    same = flash_reference(*bhsd, causal=True, scale=scale).transpose(1, 2)  # computed in float32
    assert_flash_rule(out, ref, same, atol=ATOL[torch.float32])
