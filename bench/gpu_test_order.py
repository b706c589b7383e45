"""pytest plugin for gpu_check's test step (``-p bench.gpu_test_order``): which tests run, in what order.

gpu_check kills pytest at its time budget, so the order decides what a short GPU run learns.
With ``ATTNLIB_GPU_SELECT`` set (gpu_check sets it; unset, this plugin does nothing) the
collected tests are chosen and ordered in tiers, after tests/conftest.py's round robin over files
(its order is kept inside each tier):

0. ``PRIORITY``: GPU tests no GPU run has reached yet, in the order listed (node-id prefixes);
1. every other test marked ``gpu`` (any file: a new GPU test file, e.g. tests/test_cuda_review_gpu.py,
   is found by its marker, not by a list);
2. with ``ATTNLIB_GPU_SELECT=gpu+device``: the device-agnostic tests, i.e. the unmarked tests of
   modules that run on CUDA when there is one (``DEVICE = "cuda" if torch.cuda.is_available()``);
   ``gpu`` leaves them out, as ``-m gpu`` did.

``ATTNLIB_GPU_PRIORITY`` (comma list of node-id prefixes) replaces ``PRIORITY``.
``ATTNLIB_GPU_ORDER_FILE=<path>``: the plan (tier, node id; one line each) is written there by one
process (the xdist worker gw0, or pytest itself without xdist), so gpu_check can say which
tests the budget never reached.
"""
from __future__ import annotations

import os
from typing import Sequence

import pytest

# Never run on a GPU (H100 notes of stop 22: every test of the list ran there, 28 failed; what
# changed since), most telling first: sage's fp8 PV on the transposed e4m3 V (its tests and every
# pinned candidate), the linear launch configs taken from the stop 22 sweeps and the hd256
# shared-memory fix, SLA's state products on 16-bit tensor cores (bf16 pieces, stop 23), the
# linear tests that failed on CPU-made buffers or faulted, the compat and varlen fixes, then the
# lists of stop 19 that stop 22 passed (kept near the front: cheap). The 128-row CUDA tile at 48 /
# 64 keys per step (after stop 24: call 2 times it as attnlib-cuda-bn48 / -bn64) is checked against
# float64 first of all: a wrong variant's time would mean nothing.
PRIORITY: tuple[str, ...] = (
    "tests/test_flash_cuda.py::test_tile128_wider_key_steps_match_reference",
    "tests/test_sage_triton.py::test_fp8_pv",
    "tests/test_sage_triton.py::test_quantize_v_fp8_rounding_gpu",
    "tests/test_sage_triton.py::test_autotune_candidates_on_gpu",
    "tests/test_sage_triton.py::test_all_zero_query_head_under_causal_mask",
    "tests/test_sage_triton.py::test_contract_normal_inputs",
    "tests/test_sage_triton.py::test_contract_biased_keys_smoothing_is_real",
    "tests/test_sla_triton.py::test_masked_sum",
    "tests/test_sla_triton.py::test_key_block_states_equal_reference",
    "tests/test_sla_triton.py::test_row_states_are_marginal_sums",
    "tests/test_linear_triton.py::test_relu_eps_zero",
    "tests/test_linear_triton.py::test_gpu_head_dims_each_launch_config",
    "tests/test_linear_triton.py",
    "tests/test_compat_sageattention.py",
    "tests/test_flash_varlen.py",
    "tests/test_flash_triton.py::test_forward_backward",
    "tests/test_flash_triton.py::test_launchers_write_every_element",
    "tests/test_block_sparse_triton.py::test_launchers_write_every_element",
    "tests/test_flash_triton.py::test_gpu_tma_warp_specialized_refused",
    "tests/test_flash_triton.py::test_gpu_tma_each_candidate",
    "tests/test_cuda_review_gpu.py",
)
TIER_NAMES = ("priority (never run on a GPU)", "gpu-marked", "device-agnostic (DEVICE == 'cuda')")


def priority_list() -> tuple[str, ...]:
    env = os.environ.get("ATTNLIB_GPU_PRIORITY")
    if env is not None:
        return tuple(p.strip() for p in env.split(",") if p.strip())
    return PRIORITY


def _is_gpu(item) -> bool:
    return item.get_closest_marker("gpu") is not None


def _is_device_agnostic(item) -> bool:
    module = getattr(item, "module", None)
    return getattr(module, "DEVICE", None) == "cuda"


def plan(items: Sequence, select: str, priority: Sequence[str]) -> tuple[list, list, list[int]]:
    """(kept items in run order, deselected items, tier of each kept item)."""
    keyed, dropped = [], []
    for pos, item in enumerate(items):
        rank = next((i for i, p in enumerate(priority) if item.nodeid.startswith(p)), None)
        gpu = _is_gpu(item)
        device = not gpu and _is_device_agnostic(item)
        if rank is not None and (gpu or device):
            keyed.append(((0, rank, pos), 0, item))
        elif gpu:
            keyed.append(((1, 0, pos), 1, item))
        elif device and select == "gpu+device":
            keyed.append(((2, 0, pos), 2, item))
        else:
            dropped.append(item)
    keyed.sort(key=lambda x: x[0])
    return [x[2] for x in keyed], dropped, [x[1] for x in keyed]


@pytest.hookimpl(hookwrapper=True)
def pytest_collection_modifyitems(session, config, items):
    yield  # after every other implementation (-m / -k deselection, conftest's round robin)
    select = os.environ.get("ATTNLIB_GPU_SELECT")
    if not select:
        return
    kept, dropped, tiers = plan(items, select, priority_list())
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = kept
    path = os.environ.get("ATTNLIB_GPU_ORDER_FILE")
    if path and os.environ.get("PYTEST_XDIST_WORKER", "gw0") == "gw0":
        try:
            with open(path, "w") as f:
                f.writelines(f"{t}\t{it.nodeid}\n" for t, it in zip(tiers, kept))
        except OSError:
            pass
