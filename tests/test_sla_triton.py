"""Triton SLA kernels (sla-triton): block classification, the fused forward and the backward
(dq, dk, dv, dW, db) against the float64 reference, on small shapes under the interpreter.

Cases cover GQA, causal (bottom-right), seq_q != seq_k with ragged tails, both layouts and the
feature maps. The limits: critical=1 is exact attention; critical=0, negligible=0, W=I, b=0 is
linear attention over all keys. Accuracy follows flash_attn's rule: error against float64 at
most 2x (gradients 3x) that of the same formula in PyTorch at the kernel's dtype, plus
ATOL[dtype]. bf16, hd64/hd128 and the (64, 64) / (128, 64) blocks are GPU tests.
"""
from __future__ import annotations

import pytest
import torch

import attnlib
from attnlib.inputs import to_bhsd
from attnlib.reference import flash_reference, linear_reference, sla_block_classes, sla_reference
from attnlib.reference._common import block_mask_to_tokens, causal_mask, expand_kv
from attnlib.reference.linear import feature_map_fn
from attnlib.testing import (assert_flash_rule, assert_sla_rule, assert_verbose_allclose, input_grads, make_qkv, poison_,
                             sla_float64_reference)

triton = pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_proj(d, dtype=torch.float32, seed=0, requires_grad=True):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(d, d, generator=gen) * d ** -0.5).to(DEVICE, dtype).requires_grad_(requires_grad)
    b = (torch.randn(d, generator=gen) * 0.1).to(DEVICE, dtype).requires_grad_(requires_grad)
    return w, b


def sla_same_dtype(q, k, v, w, b, classes, *, block_size, causal, feature_map, scale):
    """The reference's formula evaluated in the inputs' dtype (the error users already accept),
    given the block map; rows with nothing critical give 0 and finite gradients."""
    hq, sq, sk = q.shape[1], q.shape[2], k.shape[2]
    k, v = expand_kv(k, hq), expand_kv(v, hq)
    visible = block_mask_to_tokens(classes == 1, block_size, sq, sk)
    if causal:
        visible = visible & causal_mask(sq, sk, q.device)
    scores = ((q @ k.transpose(-1, -2)) * scale).masked_fill(~visible, torch.finfo(q.dtype).min)
    out = torch.where(visible.any(-1, keepdim=True), scores.softmax(-1) @ v, torch.zeros((), dtype=q.dtype))
    if w is None and b is None:
        return out
    phi = feature_map_fn(feature_map)
    marginal = block_mask_to_tokens(classes == 0, block_size, sq, sk)
    a = (phi(q) @ phi(k).transpose(-1, -2)) * marginal.to(q.dtype)
    # rows without marginal keys: 0 / eps, whose gradient overflows fp16; they contribute 0
    has = marginal.any(-1, keepdim=True)
    o_l = torch.where(has, (a @ v) / torch.where(has, a.sum(-1, keepdim=True) + 1e-6, 1.0), 0.0)
    if w is not None:
        out = out + o_l @ w.to(q.dtype).transpose(0, 1)
    if b is not None:
        out = out + b.to(q.dtype)
    return out


def check(q, k, v, w, b, *, critical, negligible, block_size, causal, feature_map="softmax", layout="bhsd",
          backward=True):
    """Run sla-triton and compare out (and gradients) with the float64 reference."""
    scale = q.shape[-1] ** -0.5
    kw = dict(critical=critical, negligible=negligible, block_size=block_size, feature_map=feature_map)
    ex = attnlib.explain(q, k, v, method="sla", layout=layout, causal=causal, proj_weight=w, proj_bias=b, **kw)
    assert ex.chosen is not None and ex.chosen.name == "sla-triton", str(ex)
    out = attnlib.sla_attention(q, k, v, w, b, causal=causal, layout=layout, **kw)
    qb, kb, vb = (to_bhsd(t, layout) for t in (q, k, v))
    # the float64 ground truth classifies in float64: it must see the same map (fixed seeds)
    classes, leaves, proj64, ref = sla_float64_reference(qb, kb, vb, w, b, causal=causal, **kw)
    assert_sla_rule(out, q, k, v, w, b, layout=layout, ref=ref, leaves=leaves, proj64=proj64,
                    baseline=lambda *t: sla_same_dtype(*t, classes, block_size=block_size, causal=causal,
                                                       feature_map=feature_map, scale=scale),
                    dout=torch.randn_like(out) if backward else None, factor=3.0)
    return out


# (batch, heads_q, heads_kv, seq_q, seq_k, head_dim, causal, layout, block_size, critical, negligible, feature)
CASES = [
    (1, 2, 2, 64, 64, 32, False, "bhsd", (16, 16), 0.25, 0.25, "softmax"),
    (1, 4, 2, 50, 77, 32, True, "bshd", (16, 16), 0.3, 0.2, "softmax"),    # GQA, Sq < Sk, ragged, causal
    (2, 2, 1, 77, 45, 16, True, "bhsd", (16, 16), 0.2, 0.2, "elu"),        # MQA, Sq > Sk: rows see nothing
    (1, 2, 2, 45, 90, 24, False, "bshd", (16, 32), 0.2, 0.1, "relu"),      # hd tail (padded), bk 32
    (1, 4, 4, 70, 70, 32, True, "bhsd", (32, 16), 0.1, 0.3, "softmax"),    # mostly marginal: total minus
]


def case_id(c):
    return "b{}h{}kv{}q{}k{}d{}{}-{}-bs{}x{}-c{}-n{}-{}".format(*c[:6], "-causal" if c[6] else "", c[7], *c[8],
                                                                 *c[9:])


def check_case(case, dtype=torch.float32):
    """check() on a CASES entry; fp32 parameters also with fp16 activations (mixed precision)."""
    b, hq, hkv, sq, sk, d, causal, layout, bs, crit, neg, fm = case
    q, k, v = make_qkv(b, hq, sq, d, kv_heads=hkv, seq_k=sk, device=DEVICE, layout=layout, dtype=dtype,
                       requires_grad=True, seed=sq * 1000 + sk)
    w, bias = make_proj(d, seed=sq)
    check(q, k, v, w, bias, critical=crit, negligible=neg, block_size=bs, causal=causal, feature_map=fm,
          layout=layout)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_backward_fp32(case):
    check_case(case)


@pytest.mark.parametrize("case", CASES[1:3], ids=case_id)
def test_forward_backward_fp16(case):
    check_case(case, torch.float16)


@pytest.mark.parametrize("causal,with_bias", [(False, False), (True, True)])
def test_without_projection_is_sparse_attention(causal, with_bias):
    """W and b None: the linear branch is skipped (the output is O_sparse), also in backward;
    a bias alone is added and gets its gradient."""
    q, k, v = make_qkv(1, 4, 61, 32, kv_heads=2, seq_k=75, device=DEVICE, requires_grad=True, seed=3)
    bias = make_proj(32, seed=4)[1] if with_bias else None
    check(q, k, v, None, bias, critical=0.3, negligible=0.3, block_size=(16, 16), causal=causal)


@pytest.mark.parametrize("causal", [False, True])
def test_all_critical_is_exact_attention(causal):
    """critical=1: out, dq, dk, dv are exact attention's (float64 flash reference, flash rule);
    nothing is marginal, so dW = 0."""
    q, k, v = make_qkv(1, 4, 50, 32, kv_heads=2, seq_k=66, device=DEVICE, requires_grad=True, seed=5)
    w, bias = make_proj(32, seed=5)
    out = attnlib.sla_attention(q, k, v, w, None, critical=1.0, negligible=0.0, block_size=(16, 16), causal=causal)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    same = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = flash_reference(*leaves, causal=causal)
    base = flash_reference(*same, causal=causal)
    assert_flash_rule(out, ref, base)
    dout = torch.randn_like(out)
    got = input_grads(out, (q, k, v, w), dout)
    want, have = input_grads(ref, leaves, dout.double()), input_grads(base, same, dout)
    for name, g, wt, h in zip(("dq", "dk", "dv"), got, want, have):
        assert_flash_rule(g, wt, h, factor=3.0, name=name)
    assert torch.equal(got[3], torch.zeros_like(w)), "dW: no marginal block, O_l = 0"
    if causal:
        check(q, k, v, w, bias, critical=1.0, negligible=0.0, block_size=(16, 16), causal=causal)


def test_no_critical_no_negligible_identity_projection_is_linear_attention():
    """critical=0, negligible=0, W=I, b=0: linear attention over every key; dq, dk, dv are
    linear attention's, dW = sum over rows of dO^T O_l and db = sum of dO."""
    q, k, v = make_qkv(2, 4, 45, 32, kv_heads=2, seq_k=70, device=DEVICE, requires_grad=True, seed=6)
    eye = torch.eye(32, device=DEVICE).requires_grad_()
    zero = torch.zeros(32, device=DEVICE).requires_grad_()
    out = attnlib.sla_attention(q, k, v, eye, zero, critical=0.0, negligible=0.0, block_size=(16, 16))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = linear_reference(*leaves, feature_map="softmax")
    base = linear_reference(*(t.detach() for t in (q, k, v)), feature_map="softmax")
    assert_flash_rule(out, ref, base)
    dout = torch.randn_like(out)
    got = input_grads(out, (q, k, v, eye, zero), dout)
    d64 = dout.double()
    want = input_grads(ref, leaves, d64) + [torch.einsum("bhse,bhsc->ec", d64, ref.detach()), d64.sum((0, 1, 2))]
    for name, g, w in zip(("dq", "dk", "dv", "dW", "db"), got, want):
        torch.testing.assert_close(g.double(), w, atol=2e-5 if name in ("dq", "dk", "dv") else 2e-4, rtol=1e-4,
                                   msg=name)


@pytest.mark.parametrize("causal", [False, True])
def test_strided_projection_parameters(causal):
    """A bias of stride 2 and a transposed weight (views of leaves, as a module's slices or a
    tied weight would be): the kernels read the bias contiguous and the weight row-major, so the
    launchers make them so (at most D * D elements); out and every gradient as the reference."""
    q, k, v = make_qkv(1, 2, 50, 32, seq_k=64, device=DEVICE, requires_grad=True, seed=14)
    gen = torch.Generator().manual_seed(14)
    w_leaf = (torch.randn(32, 32, generator=gen) * 32 ** -0.5).to(DEVICE).requires_grad_()
    b_leaf = (torch.randn(64, generator=gen) * 0.1).to(DEVICE).requires_grad_()
    w, b = w_leaf.t(), b_leaf[::2]
    assert not w.is_contiguous() and b.stride() == (2,)
    check(q, k, v, w, b, critical=0.25, negligible=0.25, block_size=(16, 16), causal=causal)


@pytest.mark.parametrize("with_bias", [False, True])
def test_no_marginal_block_skips_the_linear_branch(with_bias, monkeypatch):
    """negligible = 1 - critical leaves no marginal block: the launchers skip the key-block
    states, the pre-aggregation, the projection epilogue and the linear backward kernels (the
    benchmark's sparse-only variant measures exactly that), and out, dq, dk, dv, db are those of
    the same call without a weight; dW is 0 (O_l is 0 on every row)."""
    from attnlib.triton_kernels.sla import attention as sla_mod

    q, k, v = make_qkv(1, 4, 53, 32, kv_heads=2, seq_k=70, device=DEVICE, requires_grad=True, seed=15)
    w, b = make_proj(32, seed=15)
    b = b if with_bias else None
    kw = dict(critical=0.3, negligible=0.7, block_size=(16, 16), causal=True)
    linear_flags = []
    real_key_blocks = sla_mod.cls_mod.key_blocks

    def spy(*a, **k_):
        linear_flags.append(k_["linear"])
        return real_key_blocks(*a, **k_)

    monkeypatch.setattr(sla_mod.cls_mod, "key_blocks", spy)
    out = attnlib.sla_attention(q, k, v, w, b, **kw)
    dout = torch.randn_like(out)
    proj = [t for t in (w, b) if t is not None]
    got = input_grads(out, (q, k, v, *proj), dout)
    assert linear_flags and not any(linear_flags), "the key-block states were formed with nothing marginal"
    plain = attnlib.sla_attention(q, k, v, None, b, **kw)
    assert torch.equal(out, plain)
    want = input_grads(plain, (q, k, v, *proj[1:]), dout)
    for name, g, wt in zip(("dq", "dk", "dv"), got[:3], want[:3]):
        assert torch.equal(g, wt), name
    assert torch.equal(got[3], torch.zeros_like(w)), "dW"
    if with_bias:
        assert torch.equal(got[4], want[3]), "db"
    if with_bias:  # and the reference agrees
        monkeypatch.undo()
        check(q, k, v, w, b, **kw)


# ---- classification ---------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(64, 64, (16, 16)), (50, 77, (16, 8)), (77, 50, (8, 16)), (33, 200, (16, 16))],
                         ids=lambda s: f"q{s[0]}k{s[1]}bs{s[2][0]}x{s[2][1]}")
def test_block_map_equals_reference(causal, shape):
    from attnlib.triton_kernels.sla.classify import sla_block_classes as kernel_classes

    sq, sk, bs = shape
    q, k, _ = make_qkv(1, 4, sq, 16, kv_heads=2, seq_k=sk, device=DEVICE, seed=sq + sk)
    for crit, neg in ((0.05, 0.10), (0.3, 0.3), (0.0, 1.0), (1.0, 0.0), (0.5, 0.5)):
        ref = sla_block_classes(q, k, critical=crit, negligible=neg, block_size=bs, causal=causal)
        got = kernel_classes(q, k, critical=crit, negligible=neg, block_size=bs, scale=16 ** -0.5, causal=causal)
        assert got.dtype == torch.int8 and torch.equal(got, ref), \
            f"critical={crit} negligible={neg}: {(got != ref).sum().item()} blocks differ"


def test_block_map_ties_broken_by_index():
    from attnlib.triton_kernels.sla.classify import sla_block_classes as kernel_classes

    q, k, _ = make_qkv(1, 1, 16, 16, seq_k=8, device=DEVICE, seed=7)
    k = k[:, :, :2].repeat(1, 1, 16, 1).contiguous()  # sixteen identical 2-token blocks: equal P_c
    got = kernel_classes(q, k, critical=0.25, negligible=0.5, block_size=(16, 2), scale=0.25, causal=False)
    assert got[0, 0, 0].tolist() == [1] * 4 + [0] * 4 + [-1] * 8
    ref = sla_block_classes(q, k, critical=0.25, negligible=0.5, block_size=(16, 2))
    assert torch.equal(got, ref)


def test_block_map_fp16_and_public_helper():
    q, k, _ = make_qkv(1, 2, 96, 32, seq_k=80, device=DEVICE, dtype=torch.float16, layout="bshd", seed=8)
    got = attnlib.sla_block_map(q, k, critical=0.2, negligible=0.3, block_size=(16, 16), causal=True,
                                layout="bshd")
    ref = sla_block_classes(q.transpose(1, 2), k.transpose(1, 2), critical=0.2, negligible=0.3,
                            block_size=(16, 16), causal=True)
    assert torch.equal(got, ref)


def test_device_constants_are_kept_per_arguments_and_device():
    """triton_kernels/device_constants.py: one tensor per (arguments, device), the device given by
    position or keyword; other arguments give another tensor; the SLA row counts built on it equal
    a fresh computation."""
    from attnlib.triton_kernels.device_constants import device_constant
    from attnlib.triton_kernels.sla.classify import device_row_counts, row_counts

    built = []

    @device_constant
    def ramp(n: int, device) -> torch.Tensor:
        built.append(n)
        return torch.arange(n, device=device)

    a, b = ramp(4, DEVICE), ramp(4, device=DEVICE)
    assert a is b and built == [4]
    assert ramp(5, DEVICE) is not a and built == [4, 5]
    ramp.cache_clear()
    assert ramp(4, DEVICE) is not a and built == [4, 5, 4]
    args = (300, 170, (64, 32), True, 0.2, 0.3)
    got = device_row_counts(*args, device=DEVICE)
    assert got is device_row_counts(*args, device=DEVICE)
    assert torch.equal(got.cpu(), row_counts(*args, "cpu"))


def _key_block_configs():
    from attnlib.triton_kernels.sla.classify import KEY_BLOCK_CANDIDATES

    # column halves and quarters on the CPU; on a GPU every candidate the autotuner may pick
    return [None] + (KEY_BLOCK_CANDIDATES if DEVICE == "cuda" else [(64, 1), (32, 1)])


# h's tolerance per input dtype: fp32 and fp16 run one tf32x3 product; bf16 inputs split phi(K)
# into two bf16 pieces (classify.split_product): 16 significant bits (2^-17 relative per product)
KEY_BLOCK_TOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 4e-5}


@pytest.mark.parametrize("config", _key_block_configs(), ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []),
                         ids=str)
def test_key_block_states_equal_reference(config, dtype):
    """h_j = phi(K_j)^T V_j, z_j = sum phi(K_j) and the pooled keys, per key block (ragged last
    block), whole or formed in column chunks of V (the GPU autotuner's candidates), against
    float64 on the same (rounded) inputs. Dv 72 pads to 128: chunks past Dv write nothing."""
    from attnlib.triton_kernels.sla.classify import key_blocks

    k = make_qkv(1, 2, 40, 24, seed=21, device=DEVICE, dtype=dtype)[1]
    v = make_qkv(1, 2, 40, 72, seed=22, device=DEVICE, dtype=dtype)[2]
    pk, h, z = key_blocks(k, v, block_n=16, feature="softmax", linear=True, config=config)
    phi = feature_map_fn("softmax")(k.double())
    tol = KEY_BLOCK_TOL[dtype]
    for j, (lo, hi) in enumerate(((0, 16), (16, 32), (32, 40))):
        want_h = phi[:, :, lo:hi].transpose(-1, -2) @ v[:, :, lo:hi].double()
        assert_verbose_allclose(h[:, :, j].double(), want_h, atol=tol, rtol=tol)
        assert_verbose_allclose(z[:, :, j].double(), phi[:, :, lo:hi].sum(2), atol=1e-5, rtol=1e-5)
        assert_verbose_allclose(pk[:, :, j].double(), k[:, :, lo:hi].double().mean(2), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shift", [-14.0, -18.0])
def test_key_block_states_keep_small_phi_in_fp16(shift):
    """elu's phi(k) = exp(k) for negative keys: at keys near -14 / -18 it lies below fp16's
    smallest normal (6e-5), where fp16 pieces of phi (stop 23's first split) kept a few bits or
    none (h off by 3x / 100x per element, while z stayed right). fp16 inputs run the tf32x3
    product: h to 1e-5 relative of its size."""
    from attnlib.triton_kernels.sla.classify import key_blocks

    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    k = (shift + 0.5 * torch.randn(1, 1, 32, 16, generator=gen)).half().to(DEVICE)
    v = torch.randn(1, 1, 32, 16, generator=gen).half().to(DEVICE)
    _, h, _ = key_blocks(k, v, block_n=16, feature="elu", linear=True)
    phi = feature_map_fn("elu")(k.double())
    for j in range(2):
        want = phi[:, :, 16 * j:16 * (j + 1)].transpose(-1, -2) @ v[:, :, 16 * j:16 * (j + 1)].double()
        err = (h[:, :, j].double().cpu() - want.cpu()).abs().max().item()
        assert err <= 1e-5 * want.abs().max().item(), err


@pytest.mark.parametrize("length", [7, 16, 1500])  # 1500: more than one 1024-wide chunk per row
@pytest.mark.parametrize("transposed", [False, True])
def test_index_form_lists_classes_in_order(length, transposed):
    from attnlib.triton_kernels.sla.classify import class_index, class_index_reference

    gen = torch.Generator().manual_seed(9 + length)
    rows = 2 if length > 100 else 5
    shape = (2, 3, length, rows) if transposed else (2, 3, rows, length)
    classes = torch.randint(-1, 2, shape, generator=gen).to(torch.int8)
    classes = classes.to(DEVICE)
    classes = classes.transpose(-1, -2) if transposed else classes  # the backward's column form: strided
    classes[0, 0, 0] = 1   # rows of one class
    classes[0, 0, 1] = -1
    ix, ref = class_index(classes), class_index_reference(classes)
    flat = classes.reshape(-1, length).cpu()
    for row, crit, marg, idx in zip(flat[:12], ix.n_crit.reshape(-1), ix.n_marg.reshape(-1),
                                    ix.idx.reshape(-1, length)):
        want = [j for c in (1, 0, -1) for j in range(length) if row[j] == c]
        assert idx.tolist() == want and crit == (row == 1).sum() and marg == (row == 0).sum()
    for got, want in ((ix.n_crit, ref.n_crit), (ix.n_marg, ref.n_marg), (ix.idx, ref.idx)):
        assert got.dtype == torch.int32 and got.is_contiguous() and torch.equal(got, want)


# ---- launchers and rejection --------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_forward_writes_every_element(causal):
    from attnlib.triton_kernels.sla.attention import sla_forward

    q, k, v = make_qkv(1, 4, 37, 40, kv_heads=2, seq_k=21, device=DEVICE, seed=10)
    w, b = make_proj(40, requires_grad=False)
    kw = dict(critical=0.3, negligible=0.3, block_size=(16, 16), scale=40 ** -0.5, causal=causal)
    for proj in ((None, None), (w, b)):
        out = poison_(torch.empty_like(q))
        sla_forward(q, k, v, out, *proj, feature="softmax", **kw)
        assert torch.isfinite(out).all()
        # written with the float64 reference's values (the same block map: fixed seed, checked)
        assert torch.equal(sla_block_classes(q, k, causal=causal, critical=0.3, negligible=0.3, block_size=(16, 16)),
                           sla_block_classes(q.double(), k.double(), causal=causal, critical=0.3, negligible=0.3,
                                             block_size=(16, 16)))
        ref = sla_reference(q.double(), k.double(), v.double(), *(t if t is None else t.double() for t in proj),
                            feature_map="softmax", **kw)
        assert_verbose_allclose(out, ref, atol=1e-5, name=f"out proj={proj[0] is not None}")


@pytest.mark.parametrize("proj", ["both", "weight", "bias", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_backward_from_saved_lse_equals_rewalk(proj, dtype):
    """The op keeps the critical blocks' lse with the output; the backward then recomputes only
    O_l and forms delta from the saved output. That lse is the reference's over the critical
    blocks, and the gradients equal the re-walking backward's (same map, same kernels): exactly
    up to fp32 rounding for fp32, within the output's rounding for fp16."""
    from attnlib.triton_kernels.sla.attention import sla_backward, sla_forward

    q, k, v = make_qkv(1, 4, 53, 32, kv_heads=2, seq_k=70, device=DEVICE, dtype=dtype, seed=12)
    w, b = make_proj(32, seed=12, requires_grad=False)
    w, b = {"both": (w, b), "weight": (w, None), "bias": (None, b), "none": (None, None)}[proj]
    kw = dict(critical=0.3, negligible=0.2, block_size=(16, 16), feature="softmax", scale=32 ** -0.5, causal=True)
    out = poison_(torch.empty_like(q))
    out, lse = sla_forward(q, k, v, out, w, b, with_lse=True, **kw)
    want_out = sla_reference(q.double(), k.double(), v.double(), w.double() if w is not None else None,
                             b.double() if b is not None else None, critical=0.3, negligible=0.2, block_size=(16, 16),
                             feature_map="softmax", causal=True)
    torch.testing.assert_close(out.double(), want_out, **({"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32
                                                          else {"atol": 5e-3, "rtol": 5e-3}))
    classes = sla_block_classes(q, k, critical=0.3, negligible=0.2, block_size=(16, 16), causal=True)
    visible = block_mask_to_tokens(classes == 1, (16, 16), 53, 70) & causal_mask(53, 70, q.device)
    scores = (q.double() @ expand_kv(k, 4).double().transpose(-1, -2)) * 32 ** -0.5
    want = scores.masked_fill(~visible, float("-inf")).logsumexp(-1)
    assert lse.dtype == torch.float32 and lse.shape == (1, 4, 53)
    assert torch.equal(torch.isinf(lse), torch.isinf(want)), "rows with no critical key must have lse -inf"
    fin = torch.isfinite(want)
    torch.testing.assert_close(lse[fin].double(), want[fin], atol=1e-5, rtol=1e-5)
    dout = torch.randn_like(out)
    saved = sla_backward(dout, q, k, v, w, b, out=out, lse=lse, **kw)
    rewalk = sla_backward(dout, q, k, v, w, b, **kw)
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=4e-3, rtol=4e-3)
    for name, got, want_g in zip(("dq", "dk", "dv", "dW", "db"), saved, rewalk):
        assert (got is None) == (want_g is None), name
        if got is not None:
            assert torch.isfinite(got).all(), name
            torch.testing.assert_close(got.float(), want_g.float(), msg=name, **tol)


def _masked_sum_configs():
    from attnlib.triton_kernels.sla.row_states import MASKED_SUM_CANDIDATES

    # on a GPU every candidate the autotuner may pick; on the CPU another tiling than the default
    return [None] + (MASKED_SUM_CANDIDATES if DEVICE == "cuda" else [(32, 16, 32, 1, 1)])


@pytest.mark.parametrize("config", _masked_sum_configs(), ids=str)
@pytest.mark.parametrize("transpose", [False, True])
def test_masked_sum_tilings_agree(config, transpose):
    """The masked product under each tiling equals float64, rows and widths not tile multiples."""
    from attnlib.triton_kernels.sla.row_states import _masked_sum

    gen = torch.Generator().manual_seed(14)
    classes = torch.randint(-1, 2, (1, 4, 70, 150), generator=gen).to(torch.int8)
    marg = (classes == 0).double()
    if transpose:  # states per (query head, query block) -> per (kv head, key block)
        states = torch.randn(1, 4, 70, 300, generator=gen)
        want = (marg.transpose(-1, -2) @ states.double()).reshape(1, 2, 2, 150, 300).sum(2)
    else:
        states = torch.randn(1, 2, 150, 300, generator=gen)
        want = marg @ expand_kv(states, 4).double()
    got = _masked_sum(classes.to(DEVICE), states.to(DEVICE), "tf32x3", 2, transpose=transpose, config=config)
    torch.testing.assert_close(got.double().cpu(), want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("prec,terms", [("tf32", 2), ("tf32x3", 3)])
def test_masked_sum_split_precision(prec, terms):
    """The product splits each fp32 state into bf16 pieces (row_states.split_dot): 2 pieces keep
    16 significant bits, 3 fp32's 24, so each sum is within 2^-(8 * terms) of the sum of |states|
    it adds (plus fp32 accumulation), and 2 pieces are finer than one (a plain bf16 product's
    2^-8 would fail the bound) and than tf32's 2^-11."""
    from attnlib.triton_kernels.sla.row_states import SPLIT_TERMS, _masked_sum

    assert SPLIT_TERMS[prec] == terms
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    classes = torch.randint(-1, 2, (1, 2, 33, 70), generator=gen).to(torch.int8)
    states = torch.randn(1, 2, 70, 96, generator=gen) * torch.logspace(-3, 3, 96)  # wide magnitudes
    marg = (classes == 0).double()
    want = marg @ states.double()
    bound = (marg @ states.double().abs()) * (2.0 ** -(8 * terms) + 70 * 2.0 ** -24) + 1e-30
    got = _masked_sum(classes.to(DEVICE), states.to(DEVICE), prec, 2, transpose=False)
    err = (got.double().cpu() - want).abs()
    assert bool((err <= bound).all()), float((err / bound).max())
    assert float((err / (marg @ states.double().abs() + 1e-30)).max()) < 2.0 ** -11


def test_row_states_are_marginal_sums():
    """row_states.py: each query block's sum of the key-block states over its marginal blocks,
    per query head (GQA: a query head reads its kv head's states), equals the masked product;
    and the backward's transpose, each key block's sum over the (query head of its group, query
    block) pairs for which it is marginal."""
    from attnlib.triton_kernels.sla.row_states import column_states, row_states

    gen = torch.Generator().manual_seed(13)
    classes = torch.randint(-1, 2, (2, 4, 5, 37), generator=gen).to(torch.int8)  # Mk not a tile multiple
    h = torch.randn(2, 2, 37, 24, 24, generator=gen)
    z = torch.randn(2, 2, 37, 24, generator=gen)
    got_h, got_z = row_states(classes.to(DEVICE), h.to(DEVICE), z.to(DEVICE), "tf32x3")
    marg = (classes == 0).double()
    want_h = marg @ expand_kv(h.reshape(2, 2, 37, -1), 4).double()
    want_z = marg @ expand_kv(z, 4).double()
    assert got_h.shape == (2, 4, 5, 24, 24) and got_z.shape == (2, 4, 5, 24)
    torch.testing.assert_close(got_h.reshape(2, 4, 5, -1).double().cpu(), want_h, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got_z.double().cpu(), want_z, atol=1e-4, rtol=1e-5)
    dh = torch.randn(2, 4, 5, 24, 24, generator=gen)
    dz = torch.randn(2, 4, 5, 24, generator=gen)
    got_dh, got_dz = column_states(classes.to(DEVICE), dh.to(DEVICE), dz.to(DEVICE), 2, "tf32x3")
    per_q_head = marg.transpose(-1, -2) @ dh.reshape(2, 4, 5, -1).double()  # (2, 4, 37, 576)
    want_dh = per_q_head.reshape(2, 2, 2, 37, -1).sum(2)
    want_dz = (marg.transpose(-1, -2) @ dz.double()).reshape(2, 2, 2, 37, -1).sum(2)
    assert got_dh.shape == (2, 2, 37, 24, 24) and got_dz.shape == (2, 2, 37, 24)
    torch.testing.assert_close(got_dh.reshape(2, 2, 37, -1).double().cpu(), want_dh, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got_dz.double().cpu(), want_dz, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids=case_id)
def test_per_tile_path_forward_backward(case, monkeypatch):
    """ATTNLIB_SLA_ROW_STATES=0: the forward, the O_l recompute and the linear dq pre-aggregate the
    marginal states per tile instead of reading the query blocks' sums from row_states.py (the
    default every other test here runs), and the linear dk/dv folds query blocks instead of reading
    each key block's summed dh_j, dz_j; same accuracy contract."""
    monkeypatch.setenv("ATTNLIB_SLA_ROW_STATES", "0")
    check_case(case)


def test_unsupported_inputs_have_reasons_and_fall_back():
    q, k, v = make_qkv(1, 2, 40, 32, device=DEVICE, seed=11)
    ex = attnlib.explain(q, k, v, method="sla", block_size=(24, 24))
    assert any("block_size (24, 24)" in r for r in ex.reasons["sla-triton"])
    assert ex.chosen.name == "sla-torch-chunked"  # the torch fallback (fp64 would run the reference)
    out = attnlib.sla_attention(q, k, v, block_size=(24, 24))
    torch.testing.assert_close(out, sla_reference(q, k, v, block_size=(24, 24)))
    with pytest.raises(attnlib.NoKernelError, match="block_size"):
        attnlib.sla_attention(q, k, v, block_size=(24, 24), backend="triton")
    q2, k2, v2 = make_qkv(1, 2, 20, 256, device=DEVICE, seed=12)
    assert any("head_dim 256" in r for r in attnlib.explain(q2, k2, v2, method="sla", block_size=(16, 16))
               .reasons["sla-triton"])


def test_bad_options_are_named():
    q, k, v = make_qkv(1, 2, 40, 32, device=DEVICE, seed=13)
    with pytest.raises(ValueError, match="critical"):
        attnlib.sla_attention(q, k, v, critical=1.5)
    with pytest.raises(ValueError, match="critical \\+ negligible"):
        attnlib.sla_attention(q, k, v, critical=0.6, negligible=0.6)
    with pytest.raises(ValueError, match="proj_weight"):
        attnlib.sla_attention(q, k, v, torch.zeros(16, 16))
    with pytest.raises(TypeError, match="causal"):
        attnlib.sla_attention(q, k, v, causal=1)


# ---- GPU only ----------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [(64, 64), (128, 64)], ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_block_sizes(block_size, dtype, head_dim):
    """Each size non-causal in bhsd and causal in bshd (the layouts' strides reach every kernel)."""
    w, b = make_proj(head_dim, seed=1)
    for causal, layout in ((False, "bhsd"), (True, "bshd")):
        q, k, v = make_qkv(1, 4, 1000, head_dim, kv_heads=2, seq_k=1100, dtype=dtype, device="cuda",
                           layout=layout, requires_grad=True, seed=head_dim)
        check(q, k, v, w, b, critical=0.2, negligible=0.2, block_size=block_size, causal=causal, layout=layout)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("row_states", ["1", "0"], ids=["row-states", "per-tile"])
def test_gpu_aggregation_paths(dtype, row_states, monkeypatch):
    """Both aggregations (ATTNLIB_SLA_ROW_STATES=1, the default, and 0, per tile) at a realistic
    size on the card: bf16 (the interpreter cannot check it) and fp32, hd128, GQA, causal, forward
    and backward."""
    monkeypatch.setenv("ATTNLIB_SLA_ROW_STATES", row_states)
    q, k, v = make_qkv(1, 4, 1000, 128, kv_heads=2, seq_k=1100, dtype=dtype, device="cuda", requires_grad=True,
                       seed=21)
    w, b = make_proj(128, seed=21)
    check(q, k, v, w, b, critical=0.1, negligible=0.2, block_size=(64, 64), causal=True)


@pytest.mark.gpu
def test_gpu_bshd_fp32_and_block_map():
    q, k, v = make_qkv(2, 4, 700, 64, seq_k=520, device="cuda", layout="bshd", requires_grad=True, seed=2)
    w, b = make_proj(64, seed=2)
    check(q, k, v, w, b, critical=0.1, negligible=0.3, block_size=(64, 64), causal=True, layout="bshd")
    got = attnlib.sla_block_map(q, k, critical=0.05, negligible=0.1, block_size=(128, 64), layout="bshd")
    ref = sla_block_classes(q.transpose(1, 2), k.transpose(1, 2), critical=0.05, negligible=0.1,
                            block_size=(128, 64))
    assert torch.equal(got, ref)


def test_fp32_tiles_smaller_than_blocks():
    """fp32 runs tiles smaller than the classification block (16 under the interpreter): a
    (64, 32) block is four query tiles and two key tiles, in every kernel including the
    linear-branch backward; GQA, causal, seq_q != seq_k, ragged tails."""
    q, k, v = make_qkv(1, 4, 2 * 64 + 9, 32, kv_heads=2, seq_k=3 * 32 + 23, device=DEVICE, requires_grad=True,
                       seed=11)
    w, bias = make_proj(32, seed=12)
    check(q, k, v, w, bias, critical=0.25, negligible=0.25, block_size=(64, 32), causal=True)
