"""triton_kernels/stage_fallback.py: a launch whose compiled kernel needs more shared memory than
the device has (Triton's OutOfResources at load, as a Triton other than the pinned 3.6 can
compile the fitted configs) runs again with fewer pipeline stages, with the same result.

No GPU raises that error here, so the kernels are wrapped to raise it above a stage count: a
fake kernel for the rules, and linear-triton's real launches under the interpreter for the
end-to-end result against the unwrapped run and the float64 reference.
"""
from __future__ import annotations

import logging

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.runtime.errors import OutOfResources  # noqa: E402

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
