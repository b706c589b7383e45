"""triton_kernels/stage_fallback.py: a launch whose compiled kernel needs more shared memory than
the device has (Triton's OutOfResources at load, as a Triton other than the pinned 3.6 can
compile the fitted configs) runs again with fewer pipeline stages, with the same result.

No GPU raises that error here, so the kernels are wrapped to raise it above a stage count: a
fake kernel for the rules, and linear-triton's real launches under the interpreter for the
end-to-end result against the unwrapped run and the float64 reference.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.runtime.errors import OutOfResources  # noqa: E402
from triton_sm90 import run_uninterpreted  # noqa: E402

import attnlib  # noqa: E402
from attnlib.reference import linear_reference  # noqa: E402
from attnlib.testing import make_qkv  # noqa: E402
from attnlib.triton_kernels import stage_fallback  # noqa: E402
from attnlib.triton_kernels.linear import kernels as linear_kernels  # noqa: E402


class FakeKernel:
    """kernel[grid](..., num_stages=s) that fails to load above max_stages, as Triton does."""

    def __init__(self, max_stages: int, resource: str = "shared memory"):
        self.max_stages, self.resource, self.calls = max_stages, resource, []
        self.__name__ = "fake_kernel"

    def __getitem__(self, grid):
        def run(*args, num_stages, **kwargs):
            self.calls.append(num_stages)
            if num_stages > self.max_stages:
                raise OutOfResources(1000 * num_stages, 1000 * self.max_stages, self.resource)
            return args, kwargs
        return run


def test_steps_down_to_the_first_stage_count_that_loads(caplog):
    kernel = FakeKernel(max_stages=2)
    with caplog.at_level(logging.WARNING, logger="attnlib"):
        stage_fallback.launch_fitting(kernel, (1,), 1, 2, num_stages=4, num_warps=8, BLOCK=64)
        stage_fallback.launch_fitting(kernel, (1,), 1, 2, num_stages=4, num_warps=8, BLOCK=64)
    assert kernel.calls == [4, 3, 2, 4, 3, 2]
    said = [r.getMessage() for r in caplog.records if "fake_kernel" in r.getMessage()]
    assert len(said) == 1 and "4 pipeline stages" in said[0] and "launched with 2" in said[0], said


def test_a_fitting_launch_runs_once_and_says_nothing(caplog):
    kernel = FakeKernel(max_stages=3)
    with caplog.at_level(logging.WARNING, logger="attnlib"):
        stage_fallback.launch_fitting(kernel, (1,), num_stages=3)
    assert kernel.calls == [3] and not caplog.records


@pytest.mark.parametrize("case", ["one stage", "fixed", "other resource"])
def test_what_fewer_stages_cannot_fix_raises_tritons_error(case):
    kernel = FakeKernel(max_stages=0 if case == "one stage" else 1,
                        resource="tensor memory" if case == "other resource" else "shared memory")
    with pytest.raises(OutOfResources):
        stage_fallback.launch_fitting(kernel, (1,), num_stages=1 if case == "one stage" else 3,
                                      stages_fixed=case == "fixed")
    assert kernel.calls == ([1] if case == "one stage" else [3])


class FailAboveStages:
    """A real kernel that fails to load (before running anything) above max_stages."""

    def __init__(self, kernel, max_stages: int):
        self.kernel, self.max_stages, self.stages = kernel, max_stages, []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, num_stages, **kwargs):
            self.stages.append(num_stages)
            if num_stages > self.max_stages:
                raise OutOfResources(232448 + 1024, 232448, "shared memory")
            return launch(*args, num_stages=num_stages, **kwargs)
        return run


@pytest.mark.parametrize("causal", [False, True])
def test_linear_triton_with_one_stage_gives_the_same_result(monkeypatch, causal):
    """linear-triton's state and apply kernels (2 stages under the interpreter) refused above one
    stage: the forward and its gradients equal the unrefused run's exactly, and the reference's."""
    q, k, v = make_qkv(1, 4, 77, 64, kv_heads=2, seq_k=90, head_dim_v=32, seed=11, requires_grad=True)
    call = dict(method="linear", backend="triton", causal=causal, feature_map="elu")

    def run():
        for t in (q, k, v):
            t.grad = None
        out = attnlib.attention(q, k, v, **call)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        return out.detach(), *(t.grad.clone() for t in (q, k, v))

    expected = run()
    wrapped = {name: FailAboveStages(getattr(linear_kernels, name), 1)
               for name in ("linear_state_kernel", "linear_apply_kernel")}
    for name, w in wrapped.items():
        monkeypatch.setattr(linear_kernels, name, w)
    got = run()
    stepped = [s for w in wrapped.values() for s in w.stages]
    assert 2 in stepped and 1 in stepped, stepped  # refused at 2, ran at 1
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    ref = linear_reference(q.detach().double(), k.detach().double(), v.detach().double(), feature_map="elu",
                           causal=causal)
    err = ((got[0].double() - ref).norm() / ref.norm()).item()
    assert err <= 1e-3, err


# Run in a subprocess (triton.compile must not see TRITON_INTERPRET; see tests/triton_sm90.py).
# Every launch compiles for sm_89 instead of running, and one whose compiled shared memory is over
# the card's 101376 bytes raises OutOfResources, as Triton's load does on the card. The launchers
# see no device limit, so they take the H100's configs, as they would with a Triton that allocates
# more than the bytes their sm_89 fits were taken from.
_SM89_LAUNCHES = r"""
import json, sys
from unittest import mock
sys.path[:0] = sys.argv[1:3]
import torch
import triton_sm90
from triton.runtime.errors import OutOfResources
from triton.runtime.jit import JITFunction
from attnlib.triton_kernels.flash import configs
from attnlib.triton_kernels.linear.attention import linear_fwd

target, limit = triton_sm90.SMALL_SMEM_TARGETS["sm_89"]
records = []
torch.manual_seed(0)
q, k = (torch.randn(1, 2, 2048, 256).half() for _ in range(2))
v, o = (torch.randn(1, 2, 2048, 16).half() for _ in range(2))
with mock.patch.object(configs, "device_smem_limit", lambda t: None), \
        triton_sm90.compile_launches(records, target=target, report=lambda c: {"shared": c.metadata.shared}):
    compile_only = JITFunction.run

    def load(self, *args, **kwargs):
        compile_only(self, *args, **kwargs)
        if records[-1].get("shared", 0) > limit:
            raise OutOfResources(records[-1]["shared"], limit, "shared memory")

    with mock.patch.object(JITFunction, "run", load):
        linear_fwd(q, k, v, o, feature="elu", causal=False, eps=1e-6)
print(json.dumps({"limit": limit, "records": records}))
"""


def test_compiled_for_sm89_with_the_h100_configs_the_launches_step_down_and_fit():
    """linear-triton's non-causal forward at key head dim 256, value head dim 16, fp16, with the
    H100's configs on an sm_89 card: with Triton 3.6 the state kernel's 3 stages compile to 102912
    bytes and the apply kernel's 4 stages to 139264 (kernels._SMEM), over the card's 101376;
    launch_fitting takes them down a stage at a time to the first that fits (2 stages, 67840 and
    73728 bytes, what kernels.fit picks for sm_89). With Triton 3.8 the 2 stages kernels.fit
    picks for the state kernel take 102400 bytes there and 1 stage 65536: the same step, one
    stage lower."""
    here = Path(__file__).resolve().parent
    r = run_uninterpreted(["-c", _SM89_LAUNCHES, here, here.parent], timeout=1200)
    result = json.loads(r.stdout.strip().splitlines()[-1])
    limit, recs = result["limit"], result["records"]
    assert not [x for x in recs if "error" in x], recs
    for kernel, asked in (("linear_state_kernel", 3), ("linear_apply_kernel", 4)):
        tries = [x for x in recs if x["kernel"] == kernel]
        stages = [x["config"][-1] for x in tries]
        assert stages == list(range(asked, asked - len(tries), -1)), (kernel, tries)  # one stage at a time
        assert len(tries) > 1 and all(x["shared"] > limit for x in tries[:-1]), (kernel, tries)
        assert tries[-1]["shared"] <= limit, (kernel, tries)  # the one launched fits
        said = [line for line in r.stderr.splitlines() if kernel in line and "launched with" in line]
        assert len(said) == 1 and f"with {stages[-1]}" in said[0], r.stderr[-2000:]
