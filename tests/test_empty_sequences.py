"""Empty sequences (seq_q == 0 or seq_k == 0) through every kernel, from the dispatcher: a query
that sees no key gives output 0 and lse -inf, gradients are finite zeros; the block maps of an
empty sequence are empty; sla_block_map takes meta tensors."""
import pytest
import torch

import attnlib
from attnlib import dispatch
from attnlib.options import NO_LSE
from attnlib.reference import sla_block_classes
from attnlib.testing import make_qkv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
METHODS = ("flash", "sage", "block_sparse", "linear", "sla")
# fp16 only on a GPU, where the CUDA kernels (fp16/bf16, head_dim 64/128, block 64) take it
DTYPES = (torch.float32, torch.float64) + ((torch.float16,) if DEVICE == "cuda" else ())
BLOCK = (64, 64)
SHAPES = [(16, 0), (0, 16), (0, 0)]  # (seq_q, seq_k)
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 64


def _grid():
    for method in METHODS:
        for kernel in dispatch.kernels(method):
            for dtype in DTYPES:
                for sq, sk in SHAPES:
                    for causal in (False, True):
                        mode = "causal" if causal else "full"
                        yield pytest.param(kernel, dtype, sq, sk, causal,
                                           id=f"{kernel.name}-{str(dtype)[6:]}-q{sq}k{sk}-{mode}")


def _options(method, sq, sk, dtype, grad):
    if method == "block_sparse":
        mask = torch.ones(1, HEADS, -(-sq // BLOCK[0]), -(-sk // BLOCK[1]), dtype=torch.bool, device=DEVICE)
        return {"block_mask": mask, "block_size": BLOCK}
    if method == "sla":
        g = torch.Generator().manual_seed(3)
        w = torch.randn(HEAD_DIM, HEAD_DIM, generator=g).to(DEVICE, dtype).requires_grad_(grad)
        b = torch.randn(HEAD_DIM, generator=g).to(DEVICE, dtype).requires_grad_(grad)
        return {"proj_weight": w, "proj_bias": b, "block_size": BLOCK, "critical": 0.5, "negligible": 0.0}
    return {}


@pytest.mark.parametrize("kernel,dtype,sq,sk,causal", list(_grid()))
def test_kernel_on_empty_sequence(kernel, dtype, sq, sk, causal):
    grad = kernel.supports_backward
    q, k, v = make_qkv(1, HEADS, sq, HEAD_DIM, kv_heads=KV_HEADS, seq_k=sk, dtype=dtype, device=DEVICE,
                       requires_grad=grad, seed=sq + 7 * sk)
    opts = _options(kernel.method, sq, sk, dtype, grad)
    return_lse = kernel.supports_lse and kernel.method not in NO_LSE
    kw = dict(method=kernel.method, causal=causal, return_lse=return_lse, **opts)
    inp = attnlib.api.build_inputs(q, k, v, **kw)
    reasons = kernel.not_supported_reasons(inp)
    if reasons:
        pytest.skip("; ".join(reasons))
    chosen = attnlib.explain(q, k, v, backend=kernel.backend, **kw).chosen
    if chosen is not kernel:
        pytest.skip(f"backend {kernel.backend!r} runs {chosen.name if chosen else None} for this call")

    res = attnlib.attention(q, k, v, backend=kernel.backend, **kw)
    out, lse = res if return_lse else (res, None)
    assert out.shape == (1, HEADS, sq, HEAD_DIM) and out.dtype == dtype
    bias = opts.get("proj_bias")
    # no key: sparse and linear parts are 0, so SLA gives its projection bias
    expected = torch.zeros_like(out) if bias is None else bias.detach().expand_as(out)
    assert torch.equal(out.detach(), expected)
    if lse is not None:
        assert lse.shape == (1, HEADS, sq) and bool((lse == float("-inf")).all())
    if not grad:
        return

    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    loss = (out * dout).sum()
    if lse is not None:  # exercises the dlse path: finite lse entries only (there are none)
        loss = loss + lse.masked_fill(~torch.isfinite(lse), 0.0).sum()
    params = [q, k, v] + [opts[n] for n in ("proj_weight", "proj_bias") if n in opts]
    grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
    for name, p, g in zip(("q", "k", "v", "proj_weight", "proj_bias"), params, grads):
        assert g.shape == p.shape and bool(torch.isfinite(g).all()), name
        if name == "proj_bias":
            tol = 1e-2 if dtype == torch.float16 else 1e-5
            assert torch.allclose(g.double(), dout.double().sum(dim=(0, 1, 2)), rtol=tol, atol=tol), name
        else:
            assert bool((g == 0).all()), name


def _qk(sq, sk, dtype=torch.float32):
    return make_qkv(1, 2, sq, 16, seq_k=sk, dtype=dtype, seed=5)


@pytest.mark.parametrize("call", [
    pytest.param(lambda q, k: attnlib.flash_attention(q.double(), k.double(), k.double()), id="flash-fp64-auto"),
    pytest.param(lambda q, k: attnlib.flash_attention(q.bfloat16(), k.bfloat16(), k.bfloat16()),
                 id="flash-bf16-auto"),
    pytest.param(lambda q, k: attnlib.sage_attention(q, k, k, backend="torch"), id="sage-torch"),
    pytest.param(lambda q, k: attnlib.block_sparse_attention(
        q, k, k, torch.ones(1, 1, 1, 0, dtype=torch.bool), block_size=(24, 40)), id="block-sparse-odd-block"),
    pytest.param(lambda q, k: attnlib.scaled_dot_product_attention(q.double(), k.double(), k.double()),
                 id="sdpa-fp64"),
    pytest.param(lambda q, k: attnlib.sla_attention(q.double(), k.double(), k.double()), id="sla-fp64-auto"),
    pytest.param(lambda q, k: attnlib.sla_attention(q, k, k, block_size=(24, 40)), id="sla-odd-block"),
    pytest.param(lambda q, k: attnlib.linear_attention(q.double(), k.double(), k.double(), eps=0.0),
                 id="linear-fp64-eps0"),
])
def test_fuzz_repros_without_keys_give_zeros(call):
    q, k, _ = _qk(16, 0)
    out = call(q, k)
    assert out.shape == q.shape and bool((out == 0).all())


def test_sla_without_queries():
    q, k, v = _qk(0, 16, torch.float64)
    assert attnlib.sla_attention(q, k, v).shape == (1, 2, 0, 16)


@pytest.mark.parametrize("block_size", [(16, 16), (24, 40)], ids=["block16", "block24x40"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("sq,sk", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_sla_block_map_of_empty_sequence(block_size, dtype, sq, sk, causal):
    q, k, _ = _qk(sq, sk, dtype)
    shape = (1, 2, -(-sq // block_size[0]), -(-sk // block_size[1]))
    m = attnlib.sla_block_map(q, k, block_size=block_size, causal=causal)
    assert m.shape == shape and m.dtype == torch.int8
    ref = sla_block_classes(q, k, block_size=block_size, causal=causal)
    assert ref.shape == shape and ref.dtype == torch.int8


@pytest.mark.parametrize("sq,sk", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_predict_block_mask_of_empty_sequence(sq, sk, causal):
    q, k, _ = _qk(sq, sk)
    for sel in ({"topk": 0.5}, {"cdf_threshold": 0.9}):
        m = attnlib.predict_block_mask(q, k, block_size=BLOCK, causal=causal, keep_sink=True, keep_diagonal=True,
                                       **sel)
        assert m.shape == (1, 2, -(-sq // 16), -(-sk // 16)) and m.dtype == torch.bool and not m.any()


def test_varlen_reference_without_keys_keeps_the_graph():
    # every sequence without keys: out 0, lse -inf, and backward still runs (finite zeros)
    cu_q = torch.tensor([0, 3, 5], dtype=torch.int32)
    cu_k = torch.zeros(3, dtype=torch.int32)
    q = torch.randn(5, 2, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(0, 2, 16, dtype=torch.float64, requires_grad=True)
    out, lse = attnlib.flash_attention_varlen(q, k, k, cu_q, cu_k, 3, 0, return_lse=True, backend="torch")
    assert bool((out == 0).all()) and bool((lse == float("-inf")).all())
    (dq,) = torch.autograd.grad(out.sum(), (q,), materialize_grads=True)
    assert bool((dq == 0).all())


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_sla_block_map_on_meta(layout):
    q, k, _ = make_qkv(1, 4, 40, 16, kv_heads=2, seq_k=70, device="meta", layout=layout)
    m = attnlib.sla_block_map(q, k, block_size=(16, 32), layout=layout)
    assert m.device.type == "meta" and m.dtype == torch.int8 and m.shape == (1, 4, 3, 3)
