"""The registry: selection, explanations, forced backends, overrides, logging."""
import functools
import logging

import pytest
import torch

import attnlib
from attnlib import dispatch
from attnlib.inputs import to_bhsd
from attnlib.testing import make_qkv


def test_every_method_has_a_torch_kernel_that_is_available():
    names = {(k["method"], k["backend"]) for k in attnlib.available_kernels() if k["available"]}
    for m in ("flash", "sage", "block_sparse", "linear", "sla"):
        assert (m, "torch") in names


def test_available_kernels_reports_reasons_for_unavailable(monkeypatch):
    class Needs(dispatch.Kernel):
        name, method, backend, requires = "flash-needs-missing", "flash", "cuda", ("no_such_module_xyz",)

    k = Needs()
    assert k.unavailable_reasons() == ["needs the 'no_such_module_xyz' package, which is not installed"]


def test_fp64_on_cpu_goes_to_reference_and_explain_lists_rejections():
    q, k, v = make_qkv(1, 2, 16, 16, dtype=torch.float64)
    ex = attnlib.explain(q, k, v)
    assert ex.chosen.name == "flash-torch-reference"
    rejected = ex.reasons
    assert "flash-torch-sdpa" in rejected
    assert any("dtype fp64 not supported" in r for r in rejected["flash-torch-sdpa"])


def test_forced_backend_with_no_fitting_kernel_raises_listing_inputs_and_reasons():
    q, k, v = make_qkv(1, 2, 16, 16, dtype=torch.float64)
    with pytest.raises(attnlib.NoKernelError) as e:
        attnlib.flash_attention(q, k, v, backend="cuda")
    msg = str(e.value)
    assert "stride=" in msg and "dtype=torch.float64" in msg and "cuda" in msg


def test_explain_does_not_run(monkeypatch):
    ran = []
    k = dispatch.kernels("flash")[-1]
    monkeypatch.setattr(type(k), "forward", lambda self, inp: ran.append(1))
    q, k_, v = make_qkv(1, 2, 16, 16)
    attnlib.explain(q, k_, v, backend="torch")
    assert not ran


def test_use_backend_context_manager_and_env_override(monkeypatch):
    q, k, v = make_qkv(1, 2, 16, 16, dtype=torch.float64)
    with attnlib.use_backend("cuda"):
        with pytest.raises(attnlib.NoKernelError):
            attnlib.flash_attention(q, k, v)
    attnlib.flash_attention(q, k, v)  # restored
    monkeypatch.setenv("ATTNLIB_BACKEND", "cuda")
    with pytest.raises(attnlib.NoKernelError):
        attnlib.flash_attention(q, k, v)
    # an explicit backend beats the environment
    attnlib.flash_attention(q, k, v, backend="torch")
    monkeypatch.setenv("ATTNLIB_BACKEND", "gpu")
    with pytest.raises(ValueError, match="ATTNLIB_BACKEND"):
        attnlib.flash_attention(q, k, v)


def test_use_backend_rejects_unknown():
    with pytest.raises(ValueError, match="backend"):
        with attnlib.use_backend("metal"):
            pass


def test_choice_logged_once_per_method_kernel(caplog, monkeypatch):
    monkeypatch.setattr(dispatch, "_logged", set())
    q, k, v = make_qkv(1, 2, 16, 16, dtype=torch.float64)
    with caplog.at_level(logging.INFO, logger="attnlib"):
        attnlib.flash_attention(q, k, v)
        attnlib.flash_attention(q, k, v)
    lines = [r.getMessage() for r in caplog.records if "flash ->" in r.getMessage()]
    assert lines == ["attnlib: flash -> flash-torch-reference (bhsd, fp64, hd16)"]


def test_priority_order_and_capability_data():
    ks = dispatch.kernels("flash")
    assert [k.priority for k in ks] == sorted((k.priority for k in ks), reverse=True)
    ref = next(k for k in ks if k.name == "flash-torch-reference")
    assert torch.float64 in ref.dtypes


def test_interpret_only_kernel_rejected_on_cpu_without_interpreter(monkeypatch):
    class Interp(dispatch.Kernel):
        name, method, backend, devices, interpret_ok = "x", "flash", "triton", ("cuda",), True

    inp = attnlib.api.build_inputs(*make_qkv(1, 2, 16, 16))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert any("TRITON_INTERPRET" in r for r in Interp().not_supported_reasons(inp))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert Interp().not_supported_reasons(inp) == []


def test_register_twice_is_an_error():
    k = dispatch.kernels("flash")[0]
    with pytest.raises(ValueError, match="twice"):
        dispatch.register(k)


def _triton_kernels(methods=None):
    return [k for k in dispatch.kernels() if k.backend == "triton" and (methods is None or k.method in methods)]


@pytest.mark.parametrize("kernel", _triton_kernels(), ids=lambda k: k.name)
def test_triton_kernels_reject_bf16_under_the_interpreter(kernel, monkeypatch):
    """Triton 3.6's interpreter computes tl.dot on bf16 operands wrongly: a kernel whose dots take
    bf16 says so for bf16 CPU tensors (fp16 stays fine); one that casts first (interpret_bf16_ok) not."""
    from attnlib.inputs import AttentionInputs
    from attnlib.kernels.families import INTERPRET_BF16_REASON

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = make_qkv(1, 2, 16, 16, dtype=torch.bfloat16)
    reasons = kernel.not_supported_reasons(AttentionInputs(q=q, k=k, v=v, method=kernel.method))
    assert (INTERPRET_BF16_REASON in reasons) == (not kernel.interpret_bf16_ok), reasons
    q, k, v = make_qkv(1, 2, 16, 16, dtype=torch.float16)
    assert INTERPRET_BF16_REASON not in kernel.not_supported_reasons(
        AttentionInputs(q=q, k=k, v=v, method=kernel.method))


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs CPU tensors under the Triton interpreter")
@pytest.mark.parametrize("kernel", _triton_kernels(("flash", "sage", "linear")), ids=lambda k: k.name)
def test_bf16_cpu_under_the_interpreter_is_accurate(kernel, monkeypatch):
    """backend="auto" on bf16 CPU tensors under the interpreter: a Triton kernel runs only where it
    computes bf16 correctly there (interpret_bf16_ok); otherwise another kernel serves the call.
    Either way the answer is the torch backend's (it was off by ~1e9 when flash-triton ran), and
    float64 attention's within bf16 rounding (sage: its contract, cos >= 0.999, rel L1 <= 0.02).
    Where auto falls back, backend="torch" runs the very same kernel: only the float64 check
    has content there."""
    from attnlib.reference import flash_reference, linear_reference
    from attnlib.testing import metrics

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = make_qkv(1, 2, 48, 32, seq_k=40, dtype=torch.bfloat16, seed=0)
    ex = attnlib.explain(q, k, v, method=kernel.method)
    assert (ex.chosen is kernel) == kernel.interpret_bf16_ok, str(ex)
    out = attnlib.attention(q, k, v, method=kernel.method)
    want = attnlib.attention(q, k, v, method=kernel.method, backend="torch")
    m = metrics(out, want)
    assert m["finite"] and m["cos_sim"] > 0.999 and m["rel_l1"] < 2e-2, m
    # the float64 ground truth (sage approximates exact attention; linear, elu features, has its own)
    ref = (linear_reference if kernel.method == "linear" else flash_reference)(q.double(), k.double(), v.double())
    m = metrics(out, ref)
    if kernel.method == "sage":
        assert m["finite"] and m["cos_sim"] >= 0.999 and m["rel_l1"] <= 0.02, m
    else:  # bf16 rounding of unit-scale outputs: measured max 2.4e-3, rel L1 2e-3
        assert m["finite"] and m["max_abs"] <= 1e-2 and m["rel_l1"] <= 5e-3, m


@pytest.mark.parametrize("where", ["batch", "heads"])
@pytest.mark.parametrize("name", ["flash-triton", "flash-cuda"])
def test_grid_axis_limit_is_a_reason(name, where):
    """Heads and batch go on grid axes y and z (at most 65535 each) in the flash kernels of both
    families: more is a reason (and dispatch falls back), not a failed launch. Expanded views:
    nothing big is allocated."""
    from attnlib.inputs import AttentionInputs

    kernel = next(k for k in dispatch.kernels("flash") if k.name == name)
    shape = (70000, 2, 16, 16) if where == "batch" else (1, 70000, 16, 16)
    q = torch.zeros(1, 1, 16, 16, dtype=torch.float16).expand(*shape)
    inp = AttentionInputs(q=q, k=q, v=q, method="flash")
    assert f"{where} 70000 exceeds 65535, the CUDA grid limit of the axis (y or z) it is launched on" \
        in kernel.not_supported_reasons(inp)
    ok = AttentionInputs(q=q[:65535] if where == "batch" else q[:, :65535], k=q, v=q, method="flash")
    assert not any("grid limit" in r for r in kernel.not_supported_reasons(ok))
    assert dispatch.explain(inp).chosen.name != name


@pytest.mark.parametrize("method,name", [("linear", "linear-triton"), ("asymrnr", "asymrnr-triton")])
def test_grid_axis_limit_of_batch_times_heads(method, name):
    """linear's apply kernel and asymrnr's matching and gathers put batch * heads on one grid
    axis: 300 x 300 = 90000 is a reason there, though each alone fits. Expanded views."""
    from attnlib.inputs import AttentionInputs

    kernel = next(k for k in dispatch.kernels(method) if k.name == name)
    q = torch.zeros(1, 1, 16, 16, dtype=torch.float16).expand(300, 300, 16, 16)
    reasons = kernel.not_supported_reasons(AttentionInputs(q=q, k=q, v=q, method=method))
    assert "batch * heads 90000 exceeds 65535, the CUDA grid limit of the axis (y or z) it is launched on" in reasons
    ok = q[:, :200]  # 60000
    assert not any("grid limit" in r for r in
                   kernel.not_supported_reasons(AttentionInputs(q=ok, k=ok, v=ok, method=method)))


def test_sla_row_states_grid_axis(monkeypatch):
    """The SLA row states (the default) launch batch * heads on grid z; the per-tile path
    (ATTNLIB_SLA_ROW_STATES=0) does not."""
    from attnlib.inputs import AttentionInputs

    kernel = next(k for k in dispatch.kernels("sla") if k.name == "sla-triton")
    q = torch.zeros(1, 1, 16, 16, dtype=torch.float16).expand(300, 300, 16, 16)
    inp = AttentionInputs(q=q, k=q, v=q, method="sla")
    monkeypatch.setenv("ATTNLIB_SLA_ROW_STATES", "0")
    assert not any("grid limit" in r for r in kernel.not_supported_reasons(inp))
    monkeypatch.delenv("ATTNLIB_SLA_ROW_STATES", raising=False)
    assert any(r.startswith("batch * heads 90000 exceeds") for r in kernel.not_supported_reasons(inp))


@pytest.fixture
def sdpa_ranks_as_on_gpu(monkeypatch):
    """flash-torch-sdpa ranks CPU tensors as it ranks CUDA ones (the GPU ranking, tested here),
    with torch's fused kernels taking the inputs (its CPU choice differs from its CUDA one)."""
    from attnlib.kernels import flash_sdpa

    monkeypatch.setattr(flash_sdpa, "on_gpu", lambda inp: True)
    monkeypatch.setattr(flash_sdpa, "fused_sdpa_possible", lambda inp: True)


def test_sdpa_ranks_first_for_half_precision_inference_only(sdpa_ranks_as_on_gpu):
    """On GPUs flash-torch-sdpa outranks flash-triton (20) for fp16/bf16 calls that build no graph,
    with head dims torch's fused kernels take; otherwise it keeps its priority 10 (below the Triton
    and CUDA kernels). explain() tries kernels in rank order."""
    from attnlib.kernels.flash_sdpa import FlashSDPA

    sdpa = FlashSDPA()
    triton_rank = next(k for k in dispatch.kernels("flash") if k.name == "flash-triton").rank

    def rank(dtype=torch.float16, d=64, grad=False, dv=None):
        q, k, v = make_qkv(1, 2, 16, d, dtype=dtype, head_dim_v=dv, requires_grad=grad)
        return sdpa.rank(attnlib.api.build_inputs(q, k, v))

    inp = attnlib.api.build_inputs(*make_qkv(1, 2, 16, 64, dtype=torch.float16))
    assert rank() == rank(torch.bfloat16) == rank(d=256) == sdpa.half_inference_priority > triton_rank(inp)
    assert rank(torch.float32) == rank(grad=True) == rank(d=36) == rank(d=264) == rank(dv=32) == sdpa.priority
    with torch.no_grad():
        assert rank(grad=True) == sdpa.half_inference_priority
    assert sdpa.priority < triton_rank(inp)


def test_sdpa_ranks_below_chunked_where_torch_would_run_its_math_path(monkeypatch, sdpa_ranks_as_on_gpu):
    """On CUDA, where torch SDPA has no fused kernel for the inputs (its own can_use_* checks,
    switches included), it would form the N x N scores: flash-torch-chunked (5) must win."""
    from attnlib.kernels import flash_sdpa
    from attnlib.kernels.flash_torch_chunked import FlashTorchChunked

    sdpa = flash_sdpa.FlashSDPA()
    inp = attnlib.api.build_inputs(*make_qkv(1, 2, 16, 64, dtype=torch.float16))
    assert flash_sdpa.torch_says_fused(inp)  # torch's own choice: its CPU flash kernel
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        assert not flash_sdpa.torch_says_fused(inp)
    monkeypatch.setattr(flash_sdpa, "fused_sdpa_possible", lambda inp: False)
    assert sdpa.rank(inp) == sdpa.math_path_priority < FlashTorchChunked.priority
    monkeypatch.setattr(flash_sdpa, "fused_sdpa_possible", lambda inp: True)
    assert sdpa.rank(inp) == sdpa.half_inference_priority


def test_fused_sdpa_possible_keeps_the_rank_on_another_torch(monkeypatch, sdpa_ranks_as_on_gpu):
    from attnlib.kernels import flash_sdpa

    def gone(*a):
        raise TypeError("SDPAParams() takes 6 arguments")

    monkeypatch.setattr(torch, "_fused_sdp_choice", gone)
    monkeypatch.setattr(torch.backends.cuda, "SDPAParams", gone)
    inp = attnlib.api.build_inputs(*make_qkv(1, 2, 16, 64))
    assert flash_sdpa.torch_says_fused(inp)
    monkeypatch.setattr(flash_sdpa, "on_gpu", lambda inp: False)  # CPU: no public check, chunked keeps it
    assert not flash_sdpa.torch_says_fused(inp)


def test_sdpa_serves_cpu_inference_where_torch_runs_its_cpu_flash_kernel():
    """CPU tensors: inference goes to torch SDPA where torch picks its CPU flash kernel (above
    flash-torch-chunked, below flash-triton, which runs CPU tensors only under the interpreter);
    fp32 graph-building calls too (its backward: flash_sdpa.cpu_backward_ok); fp16/bf16 graphs, lse,
    bottom-right causal with seq_q != seq_k and fp64 keep the others."""
    from attnlib.kernels.flash_sdpa import FlashSDPA
    from attnlib.kernels.flash_torch_chunked import FlashTorchChunked
    from attnlib.reference import flash_reference

    sdpa = FlashSDPA()
    assert FlashTorchChunked.priority < sdpa.cpu_priority < 20
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        q, k, v = make_qkv(1, 2, 45, 64, kv_heads=1, dtype=dtype, seed=3)
        inp = attnlib.api.build_inputs(q, k, v)
        assert sdpa.rank(inp) == sdpa.cpu_priority
        with dispatch.use_backend("torch"):
            assert attnlib.explain(q, k, v).chosen.name == "flash-torch-sdpa"
            out = attnlib.flash_attention(q, k, v, causal=True)
            assert attnlib.explain(q, k, v, return_lse=True).chosen.name == FlashTorchChunked.name
            assert attnlib.explain(q, k[:, :, :30], v[:, :, :30], causal=True).chosen.name == FlashTorchChunked.name
        ref = flash_reference(q.double(), k.double(), v.double(), causal=True)
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
        torch.testing.assert_close(out.double(), ref, atol=tol, rtol=0)
        qg, kg, vg = make_qkv(1, 2, 45, 64, dtype=dtype, requires_grad=True, seed=3)
        want = sdpa.cpu_priority if dtype == torch.float32 else sdpa.math_path_priority
        assert sdpa.rank(attnlib.api.build_inputs(qg, kg, vg)) == want


def test_sdpa_rank_reads_the_call_not_the_grad_mode(sdpa_ranks_as_on_gpu):
    """Inside attnlib's op autograd is off, so the rank must come from inp.grad (whether the caller
    builds a graph), not torch.is_grad_enabled(): a graph-building call keeps the deterministic
    kernels unless it passed deterministic=False, and torch.use_deterministic_algorithms(True)
    takes that permission back."""
    from dataclasses import replace

    from attnlib.kernels.flash_sdpa import FlashSDPA

    sdpa = FlashSDPA()
    q, k, v = make_qkv(1, 2, 16, 64, dtype=torch.bfloat16)
    for det, want in ((True, sdpa.priority), (False, sdpa.half_inference_priority)):
        inp = replace(attnlib.api.build_inputs(q, k, v, deterministic=det), grad=True)
        with torch.no_grad():  # as inside the op
            assert sdpa.rank(inp) == want, det
        assert sdpa.rank(replace(inp, grad=False)) == sdpa.half_inference_priority
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert sdpa.rank(replace(attnlib.api.build_inputs(q, k, v, deterministic=False), grad=True)) == sdpa.priority
    finally:
        torch.use_deterministic_algorithms(before)


def graph_names(out: torch.Tensor) -> str:
    """The autograd node names from out down to its leaves, joined."""
    names, todo = [], [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None:
            names.append(type(node).__name__)
            todo.extend(n for n, _ in node.next_functions)
    return " ".join(names)


@pytest.fixture
def sdpa_on_cpu(monkeypatch):
    """flash-torch-sdpa ranking CPU tensors as it ranks CUDA ones, with its forward calls counted."""
    from attnlib.kernels.flash_sdpa import FlashSDPA

    from attnlib.kernels import flash_sdpa

    kernel = next(k for k in dispatch.kernels("flash") if isinstance(k, FlashSDPA))
    monkeypatch.setattr(flash_sdpa, "on_gpu", lambda inp: True)  # ranked as on a GPU
    calls = []
    real = kernel.forward
    monkeypatch.setitem(vars(kernel), "forward", lambda inp: calls.append(inp.requires_grad) or real(inp))
    return calls


def test_inference_on_sdpa_fills_no_lse_placeholder(sdpa_on_cpu):
    """An eager call that needs no gradient and no lse, on a kernel that gives none (torch SDPA),
    launches nothing beside it: no NaN-filled lse tensor (on a GPU one more kernel per call)."""
    from torch.profiler import ProfilerActivity, profile

    q, k, v = make_qkv(1, 2, 33, 32, dtype=torch.bfloat16, seed=42)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = attnlib.flash_attention(q, k, v)
    names = {e.name for e in prof.events()}
    assert sdpa_on_cpu == [False] and torch.equal(out, want)
    assert not names & {"aten::full", "aten::fill_"}, sorted(n for n in names if n.startswith("aten::"))
    out, lse = attnlib.flash_attention(q.float(), k.float(), v.float(), return_lse=True)  # lse asked: a kernel gives it
    assert lse.shape == (1, 2, 33) and torch.isfinite(lse).all()


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_nondeterministic_training_runs_sdpa_with_its_own_autograd(sdpa_on_cpu, layout):
    """deterministic=False on a graph-building half-precision call: auto picks torch's SDPA and
    calls it outside attnlib's op, so the graph is SDPA's own (no forward recomputed in backward);
    the default keeps attnlib's op and a kernel with a deterministic backward. Gradients against
    the float64 reference (GQA, causal, odd length; bf16 tolerance)."""
    from attnlib.reference import flash_reference

    q, k, v = make_qkv(1, 4, 37, 32, kv_heads=2, dtype=torch.bfloat16, layout=layout, requires_grad=True, seed=41)
    t = functools.partial(to_bhsd, layout=layout)  # its own inverse: also bhsd -> layout
    leaves = [t(x).detach().double().requires_grad_() for x in (q, k, v)]
    ref = flash_reference(*leaves, causal=True)
    dout = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    want = torch.autograd.grad(ref, leaves, dout)
    out = attnlib.flash_attention(q, k, v, causal=True, layout=layout, deterministic=False)
    assert sdpa_on_cpu == [True]
    assert "ScaledDotProduct" in graph_names(out) and "attnlib" not in graph_names(out)
    got = torch.autograd.grad(out, (q, k, v), t(dout).to(out.dtype))
    torch.testing.assert_close(t(out).double(), ref, atol=2e-2, rtol=2e-2)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        torch.testing.assert_close(t(g).double(), w, atol=3e-2, rtol=3e-2, msg=lambda m: f"{name}: {m}")
    # the default: attnlib's op, whose kernel (on a GPU flash-triton; here, with no Triton, torch's
    # SDPA at its low rank) runs inside it
    out2 = attnlib.flash_attention(q, k, v, causal=True, layout=layout)
    assert "attnlib" in graph_names(out2) and "ScaledDotProduct" not in graph_names(out2)
    for name, g, w in zip(("dq", "dk", "dv"), torch.autograd.grad(out2, (q, k, v), t(dout).to(out2.dtype)), want):
        torch.testing.assert_close(t(g).double(), w, atol=3e-2, rtol=3e-2, msg=lambda m: f"op {name}: {m}")


def test_explain_follows_rank(monkeypatch):
    """Kernels are tried (and their rejections listed) in rank order, ties in priority order."""
    from attnlib.kernels.flash_sdpa import FlashSDPA

    q, k, v = make_qkv(1, 2, 16, 16, dtype=torch.float64)
    names = [kn.name for kn, _ in attnlib.explain(q, k, v).rejected]
    assert names.index("flash-triton") < names.index("flash-torch-sdpa")
    monkeypatch.setattr(FlashSDPA, "rank", lambda self, inp: 1000)
    ex = attnlib.explain(q, k, v)
    assert ex.rejected[0][0].name == "flash-torch-sdpa" and ex.chosen.name == "flash-torch-reference"


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_auto_runs_torch_sdpa_for_half_inference_and_triton_for_training(layout, dtype):
    """On a GPU, fp16/bf16 calls without a graph go to torch SDPA (measured fastest), against the
    float64 reference by flash_attn's rule, on GQA, causal and an odd length in both layouts;
    the same call with requires_grad goes to flash-triton, and so does a non-square causal call."""
    from test_flash_triton import torch_same_dtype

    from attnlib.reference import flash_reference
    from attnlib.testing import assert_flash_rule

    q, k, v = make_qkv(2, 8, 333, 64, kv_heads=2, dtype=dtype, device="cuda", layout=layout, seed=31)
    t = functools.partial(to_bhsd, layout=layout)
    for causal in (False, True):
        assert attnlib.explain(q, k, v, causal=causal, layout=layout).chosen.name == "flash-torch-sdpa"
        out = attnlib.flash_attention(q, k, v, causal=causal, layout=layout)
        ref = flash_reference(t(q).double(), t(k).double(), t(v).double(), causal=causal)
        same = torch_same_dtype(t(q), t(k), t(v), causal=causal, scale=64 ** -0.5)[0]
        assert out.shape == q.shape and out.dtype == dtype
        assert_flash_rule(t(out), ref, same, factor=2.0, name=f"auto causal={causal}")
    qg = q.detach().clone().requires_grad_()
    assert attnlib.explain(qg, k, v, layout=layout).chosen.name == "flash-triton"
    k2, v2 = make_qkv(2, 8, 333, 64, kv_heads=2, seq_k=400, dtype=dtype, device="cuda", layout=layout, seed=32)[1:]
    assert attnlib.explain(q, k2, v2, causal=True, layout=layout).chosen.name == "flash-triton"


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "nondeterministic"])
def test_training_on_gpu_runs_the_kernel_explain_names(deterministic, monkeypatch):
    """What really runs for a bf16 graph-building call (selection happens inside attnlib's op,
    where autograd is off): flash-triton by default, torch SDPA with its own autograd for
    deterministic=False; output and gradients by flash_attn's rule against float64 (GQA, causal,
    odd length, bshd)."""
    from test_flash_triton import grads, torch_same_dtype

    from attnlib.reference import flash_reference
    from attnlib.testing import assert_flash_rule

    ran = []
    for kern in dispatch.kernels("flash"):
        monkeypatch.setitem(vars(kern), "forward", (lambda real, name: lambda inp: ran.append(name) or real(inp))(
            kern.forward, kern.name))
    q, k, v = make_qkv(2, 8, 333, 64, kv_heads=2, dtype=torch.bfloat16, device="cuda", layout="bshd",
                       requires_grad=True, seed=33)
    chosen = attnlib.explain(q, k, v, causal=True, layout="bshd", deterministic=deterministic).chosen.name
    assert chosen == ("flash-triton" if deterministic else "flash-torch-sdpa")
    out = attnlib.flash_attention(q, k, v, causal=True, layout="bshd", deterministic=deterministic)
    assert ran == [chosen]
    assert ("ScaledDotProduct" in graph_names(out)) != deterministic
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    leaves = [t(x).detach().double().requires_grad_() for x in (q, k, v)]
    ref = flash_reference(*leaves, causal=True)
    same = [t(x).detach().clone().requires_grad_() for x in (q, k, v)]
    base = torch_same_dtype(*same, causal=True, scale=64 ** -0.5)[0]
    assert_flash_rule(t(out), ref, base, name="out")
    dout = torch.randn_like(out)
    for name, g, w, h in zip(("dq", "dk", "dv"), grads(out, (q, k, v), dout), grads(ref, leaves, t(dout).double()),
                             grads(base, same, t(dout))):
        assert_flash_rule(t(g), w, h, factor=3.0, name=name)
    assert ran == [chosen]  # no forward recomputed for the backward


@pytest.mark.gpu
def test_gpu_sdpa_with_its_fused_kernels_off_yields_to_chunked():
    """With torch SDPA's flash, memory-efficient and cuDNN kernels switched off it would run its
    math path (N x N scores): the torch backend must pick flash-torch-chunked instead; with them
    on, fp16 inference keeps SDPA."""
    q, k, v = make_qkv(1, 2, 300, 64, dtype=torch.float16, device="cuda")
    assert attnlib.explain(q, k, v, backend="torch").chosen.name == "flash-torch-sdpa"
    switches = ("flash", "mem_efficient", "cudnn")
    before = {s: getattr(torch.backends.cuda, f"{s}_sdp_enabled")() for s in switches}
    try:
        for s in switches:
            getattr(torch.backends.cuda, f"enable_{s}_sdp")(False)
        assert attnlib.explain(q, k, v, backend="torch").chosen.name == "flash-torch-chunked"
    finally:
        for s, on in before.items():
            getattr(torch.backends.cuda, f"enable_{s}_sdp")(on)


def test_available_kernels_agrees_with_what_a_cpu_call_may_run(monkeypatch):
    """Without a GPU, Triton kernels run only under TRITON_INTERPRET=1: available_kernels() says
    so (it listed them available while every call refused them), and lists them available under
    the interpreter; torch kernels are available either way."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rows = {k["name"]: k for k in attnlib.available_kernels()}
    q, k, v = make_qkv(1, 2, 16, 16, seed=1)
    for name, row in rows.items():
        if row["backend"] == "triton":
            assert not row["available"] and "TRITON_INTERPRET=1" in row["reasons"][0], row
        if row["backend"] == "torch":
            assert row["available"], row
    with pytest.raises(attnlib.NoKernelError, match="TRITON_INTERPRET"):
        attnlib.attention(q, k, v, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rows = {k["name"]: k for k in attnlib.available_kernels()}
    assert all(r["available"] for r in rows.values() if r["backend"] == "triton"), rows
