"""The Triton flash kernels compile for H100 (sm_90) with the config they launch when autotuning
is off, fit its shared memory (fp16, bf16 and fp32), and the fp16/bf16 configs do not spill
registers: checked without a GPU (see triton_sm90.py)."""
from pathlib import Path

import pytest
from triton_sm90 import json_lines, run_uninterpreted

HERE = Path(__file__).resolve().parent
H100_SMEM_BYTES = 227 * 1024


@pytest.fixture(scope="module")
def compiled():
    """One subprocess compiles every case: triton.jit must not be in interpreter mode there."""
    r = run_uninterpreted([HERE / "triton_sm90.py", "--suite", "flash"], timeout=600)
    recs = json_lines(r.stdout)
    return {(x["kernel"], x["dtype"], x["head_dim"], x["causal"]): x for x in recs}


CASES = [(w, c, hd, dt) for w in ("fwd", "dkdv", "dkdv_dq", "dq") for c in (False, True) for hd in (64, 128, 256)
         for dt in ("fp16", "bf16", "fp32")]
IDS = [f"{w}-{'causal' if c else 'full'}-hd{hd}-{dt}" for w, c, hd, dt in CASES]



@pytest.mark.parametrize("which,causal,head_dim,dtype", CASES, ids=IDS)
def test_default_h100_config_compiles_and_fits(compiled, which, causal, head_dim, dtype):
    r = compiled[(which, dtype, head_dim, causal)]
    assert "error" not in r, r["error"]
    assert r["shared"] <= H100_SMEM_BYTES, f"{r['shared']} bytes of shared memory with config {r['config']}"


# fp32 runs one small config for accuracy, not speed; its spills are accepted
FAST = [(c, i) for c, i in zip(CASES, IDS) if c[3] != "fp32"]


@pytest.mark.parametrize("which,causal,head_dim,dtype",
                         [c for c, _ in FAST],
                         ids=[i for _, i in FAST])
def test_default_h100_config_does_not_spill(compiled, which, causal, head_dim, dtype):
    r = compiled[(which, dtype, head_dim, causal)]
    assert "error" not in r, r["error"]
    assert r["spill_bytes"] == 0, f"config {r['config']}: {r['report']}"


# The other Triton kernels, through their real launchers (tests/triton_sm90.py intercepts the
# launches), on a subset of cases that keeps this under two minutes on a cold cache: each launch
# must compile and fit H100 shared memory, and the fp16/bf16 launches (the fast paths) must not
# spill registers. (Earlier overflows, fixed: linear causal backward 393 KB, block_sparse fp32
# hd128 256 KB, sla linear dQ hd128 256 KB; spills fixed in block_sparse dK/dV and the sla forward.)
EXTRA_CASES = [
    "sage-fp16-causal-hd128-bf16", "sage-fp8-causal-hd128-bf16", "sage-fp16_accum-causal-hd64-fp16",
    "block_sparse-fwd-causal-hd128-bf16", "block_sparse-bwd-causal-hd128-bf16",
    "block_sparse-fwd-causal-hd128-fp32",
    "block_sparse-predict-causal-hd128-bf16",
    "linear-fwd-full-hd128-bf16",
    "linear-fwdzdot-full-hd128-bf16",
    "linear-fwd-causal-hd128-bf16",
    "linear-bwd-causal-hd128-bf16",
    "linear-bwd-causal-hd128-fp16",
    "sla-bwd-causal-hd64-bf16",
    "sla-bwd-causal-hd128-bf16",
    "asymrnr-all-full-hd128-bf16",
]


def _case_id(c):
    return c.values[0] if hasattr(c, "values") else c


@pytest.fixture(scope="module")
def compiled_extra():
    only = ",".join(_case_id(c) for c in EXTRA_CASES)
    r = run_uninterpreted([HERE / "triton_sm90.py", "--suite", "extra", "--only", only], timeout=900)
    recs = {}
    for x in json_lines(r.stdout):
        recs.setdefault(x["case"], []).append(x)
    return recs


# kernels whose main loop streams tiles with async copies: with 3 stages at least one wait in
# the loop must leave copies in flight (see triton_sm90.async_waits)
PIPELINED = {"block_sparse_fwd_kernel", "block_sparse_dq_kernel", "block_sparse_dkdv_kernel", "sla_fwd_kernel",
             "sage_fwd_kernel", "match_kernel"}


# kernels whose tiles must copy in 16-byte vectors with wgmma not serialized (ptxas C7515): the
# SLA state product took 1.8 ms on an H100 while its tf32 operands were copied 4 bytes at a time
# (row_states.masked_sum_kernel); at hd128 the sla cases compile every candidate of its table
VECTOR_COPIES = {"masked_sum_kernel"}


# (kernel, head dim): spill bytes accepted, where a spilling config measured faster than the
# spill-free one (triton_kernels/linear/kernels.py fwd_config: 3x on an H200); a bound, so that
# more spilling still fails
SPILLS_MEASURED_FASTER = {("linear_chunk_fwd_kernel", 128): 512,
                          # the causal backward's bf16 hd128 configs from the H100 sweep of stop 22
                          # (dq (128, 4, 16) 1.55x, dk/dv (128, 128, 8, 64) 1.12x the spill-free
                          # defaults' time, spills included)
                          ("linear_chunk_dq_kernel", 128): 200, ("linear_chunk_dk_kernel", 128): 128,
                          ("linear_chunk_dv_kernel", 128): 128}
# (kernel, head dim, dtype): spills known and not yet timed against a spill-free config. The causal
# backward's weighted state kernel in fp16 (its power-of-two operand scaling): 208 bytes until
# stop 20 moved 1/den out of the scaled operand, 68 since; bf16 does not spill. A bound, so that
# more spilling fails; bench/sweep_linear.py on a GPU should decide between it and 2 stages.
SPILLS_KNOWN_UNTIMED = {("linear_state_kernel", 128, "fp16"): 68}


@pytest.mark.parametrize("case", EXTRA_CASES, ids=[_case_id(c) for c in EXTRA_CASES])
def test_other_kernels_compile_for_sm90_and_fit(compiled_extra, case):
    recs = compiled_extra.get(case)
    assert recs, f"no kernel launch was compiled for {case}"
    for r in recs:
        assert "error" not in r, f"{r['kernel']}: {r['error'][-2000:]}"
        assert r["shared"] <= H100_SMEM_BYTES, f"{r['kernel']} config {r['config']}: {r['shared']} bytes"
        if r["dtype"] != "fp32":
            allowed = max(SPILLS_MEASURED_FASTER.get((r["kernel"], r["head_dim"]), 0),
                          SPILLS_KNOWN_UNTIMED.get((r["kernel"], r["head_dim"], r["dtype"]), 0))
            assert r["spill_bytes"] <= allowed, f"{r['kernel']} config {r['config']}: {r['report']}"
            if r["kernel"] in VECTOR_COPIES:
                assert r["copy_bytes"] == [16] and not r["wgmma_serialized"], \
                    f"{r['kernel']} config {r['config']}: copies {r['copy_bytes']} bytes, serialized wgmma " \
                    f"{r['wgmma_serialized']}"
            if r["kernel"] in PIPELINED:
                assert max(r["async_waits"], default=0) > 0, \
                    f"{r['kernel']} config {r['config']}: no load stays in flight (async_wait {r['async_waits']})"


# The opt-in tensor-descriptor forward (ATTNLIB_FLASH_TMA=1): its default configs compile for
# sm_90 with TMA loads and stores and wgmma (no plain global loads of Q/K/V), fit, and do not spill.
@pytest.fixture(scope="module")
def compiled_tma():
    r = run_uninterpreted([HERE / "triton_sm90.py", "--suite", "flash", "--tma"], timeout=600)
    return json_lines(r.stdout)


def test_tma_forward_compiles_with_tma_and_wgmma(compiled_tma):
    assert compiled_tma, "no TMA forward case compiled"
    for r in compiled_tma:
        where = f"{r.get('dtype')} hd{r.get('head_dim')} causal={r.get('causal')} config {r.get('config')}"
        assert "error" not in r, f"{where}: {r['error'][-2000:]}"
        assert r["shared"] <= H100_SMEM_BYTES, f"{where}: {r['shared']} bytes"
        assert r["spill_bytes"] == 0, f"{where}: {r['report']}"
        assert r["tma_loads"] > 0 and r["tma_stores"] > 0 and r["wgmma"] > 0, f"{where}: {r}"


@pytest.mark.parametrize("which,causal,head_dim,dtype",
                         [c for c, _ in FAST],
                         ids=[i for _, i in FAST])
def test_default_h100_config_keeps_loads_in_flight(compiled, which, causal, head_dim, dtype):
    """The dense loops' K/V (or Q/dO) copies overlap compute: some async_wait in the TTGIR
    leaves copies in flight (triton_sm90.async_waits)."""
    r = compiled[(which, dtype, head_dim, causal)]
    assert "error" not in r, r["error"]
    if r["config"][3] >= 3:  # with 2 stages or fewer Triton's pipeliner has nothing to keep in flight
        assert max(r["async_waits"], default=0) > 0, f"config {r['config']}: waits {r['async_waits']}"


# Cards with less shared memory per block than an H100 (A100: 163 KB; sm_86 / sm_89: 99 KB): the
# flash kernels' first candidate there (what a launch takes with autotuning off) and the
# block-sparse launchers' tiles, compiled for that card, fit it. Until stop 22 the candidates' budget never went below the H100's, so on a 99 KB card
# the hd128 forward's default needed 128 KB and failed at launch.
def test_flash_defaults_fit_cards_with_less_shared_memory():
    r = run_uninterpreted([HERE / "triton_sm90.py", "--suite", "small-smem"], timeout=600)
    recs = json_lines(r.stdout)
    flash = [x for x in recs if "block" not in x]
    # 2 cards x 4 kernels x 3 head dims x 2 dtypes, less the fp32 atomic dK/dV kernel (not run there)
    assert len(flash) == 2 * (4 * 3 * 2 - 3), r.stdout[-2000:]
    # and the block-sparse launchers (fwd, preprocess, dK/dV, dQ) at two mask blocks per card
    sparse = {(x["arch"], x["kernel"], tuple(x["block"])): x["config"] for x in recs if "block" in x}
    assert len(sparse) == 2 * 2 * 4, sparse
    for x in recs:
        assert "error" not in x, x
        assert x["shared"] <= x["limit"], x
    assert sparse[("sm_89", "block_sparse_dq_kernel", (64, 64))] == [8, 2]  # 3 stages took 104 KB there
    assert sparse[("sm_80", "block_sparse_dq_kernel", (64, 64))] == [8, 3]  # as on an H100
    by = {(x["arch"], x["kernel"], x["dtype"], x["head_dim"]): x["config"] for x in flash}
    # the 99 KB cards get the entries added for them, not FALLBACK's 32 x 32 tile
    assert by[("sm_89", "fwd", "fp16", 128)] == [128, 64, 8, 2] and by[("sm_89", "fwd", "fp16", 256)] == [64, 32, 8, 2]
    assert by[("sm_80", "fwd", "fp16", 128)] == [128, 64, 8, 3]  # the H100 default fits an A100


def test_atomic_dq_kernel_not_used_for_fp32_on_cards_with_less_shared_memory(monkeypatch):
    """Its fp32 tiles take 128 KB compiled for sm_89 (over 99 KB): the deterministic kernels run."""
    import torch

    from attnlib.triton_kernels.flash import backward, configs

    q16, q32 = torch.empty(1, dtype=torch.float16), torch.empty(1)
    for limit, fits32 in ((101376, False), (166912, False), (H100_SMEM_BYTES, True), (None, True)):
        monkeypatch.setattr(configs, "device_smem_limit", lambda t, limit=limit: limit)
        assert backward._atomic_fits(q16) and backward._atomic_fits(q32) == fits32
