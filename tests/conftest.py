"""Test set-up: Triton runs under its CPU interpreter when there is no GPU; marker gpu skips."""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # must be set before triton is imported anywhere
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
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
    if path and report.failed:
        with open(path, "a") as f:
            f.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")
