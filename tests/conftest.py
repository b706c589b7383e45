"""Test set-up: Triton runs under its CPU interpreter when there is no GPU; marker gpu skips."""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
# torch 2.11's CPU SDPA (the GPU machines' torch) divides by zero on inputs with zero heads: SIGFPE,
# the process dies; torch 2.13's returns the empty result. Tests that hand torch such a call on the
# CPU skip on a torch before 2.13.
TORCH_CPU_SDPA_DIES_ON_ZERO_HEADS = torch.__version__ < (2, 13)
if not HAS_CUDA:
    # must be set before triton is imported anywhere
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def interleave_by_file(items):
    """Round robin over test files, each file's tests in their own order: a run cut off at a
    time budget (gpu_check) has then run the first tests of every file, not all of the first
    few files alphabetically. The order is deterministic, as pytest-xdist requires."""
    by_file: dict[str, list] = {}
    for item in items:
        by_file.setdefault(item.nodeid.split("::")[0], []).append(item)
    queues = list(by_file.values())
    out = []
    for i in range(max((len(q) for q in queues), default=0)):
        out.extend(q[i] for q in queues if i < len(q))
    return out


@pytest.hookimpl(trylast=True)  # after -m / -k deselection: interleave what will run
def pytest_collection_modifyitems(config, items):
    if os.environ.get("ATTNLIB_TEST_INTERLEAVE") == "1":
        items[:] = interleave_by_file(items)
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_logreport(report):
    """ATTNLIB_FAILURE_LOG=<file>: each failure's traceback is appended there as soon as it
    happens (gpu_check kills pytest at its time budget, before pytest prints any traceback)."""
    path = os.environ.get("ATTNLIB_FAILURE_LOG")
    # under xdist this hook runs in the worker and again in the controller for the same report:
    # the controller writes (it also sees a crashed worker's report), so each failure is logged once
    if path and report.failed and not os.environ.get("PYTEST_XDIST_WORKER"):
        with open(path, "a") as f:
            f.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that leaves a sticky CUDA error (illegal address, launch failure, ...) ends its
    xdist worker, which xdist replaces: later tests get a working CUDA context (see
    attnlib.testing.end_worker_after_cuda_fault)."""
    outcome = yield
    if outcome.get_result().failed and call.excinfo is not None:
        from attnlib.testing import end_worker_after_cuda_fault

        end_worker_after_cuda_fault(item.nodeid, call.excinfo, os.environ.get("ATTNLIB_FAILURE_LOG"))


@pytest.fixture
def flash_training_on_chunked(monkeypatch):
    """fp32 CPU calls that build a graph run flash-torch-chunked and attnlib's op (as 16-bit ones
    do) instead of torch SDPA with its own autograd (kernels/flash_sdpa.py: cpu_backward_ok):
    for tests of the chunked kernel's backward and of the op's autograd path."""
    from attnlib.kernels import flash_sdpa

    monkeypatch.setattr(flash_sdpa, "cpu_backward_ok", lambda inp: False)
