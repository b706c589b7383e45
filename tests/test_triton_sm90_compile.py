"""The Triton flash kernels compile for H100 (sm_90) with the config they launch when autotuning
is off, fit its shared memory (fp16, bf16 and fp32), and the fp16/bf16 configs do not spill
registers: checked without a GPU (see triton_sm90.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
H100_SMEM_BYTES = 227 * 1024


@pytest.fixture(scope="module")
def compiled():
    """One subprocess compiles every case: triton.jit must not be in interpreter mode there."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(HERE / "triton_sm90.py")], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    return {(x["kernel"], x["dtype"], x["head_dim"], x["causal"]): x for x in recs}


CASES = [(w, c, hd, dt) for w in ("fwd", "dkdv", "dq") for c in (False, True) for hd in (64, 128, 256)
         for dt in ("fp16", "bf16", "fp32")]
IDS = [f"{w}-{'causal' if c else 'full'}-hd{hd}-{dt}" for w, c, hd, dt in CASES]

# Measured here with this test's compiler: every dK/dV candidate in configs.BWD_DKDV_H100 spills
# (0.8 to 5 KB per thread at 255 registers), also before block_sparse shared its steps; the
# H100 backward numbers in bench/results were taken with these spills. Strict: fixing the
# kernel makes these cases pass and this marker must then go.
DKDV_SPILLS = pytest.mark.xfail(strict=True, reason="the dK/dV kernel spills registers at its H100 configs")


@pytest.mark.parametrize("which,causal,head_dim,dtype", CASES, ids=IDS)
def test_default_h100_config_compiles_and_fits(compiled, which, causal, head_dim, dtype):
    r = compiled[(which, dtype, head_dim, causal)]
    assert "error" not in r, r["error"]
    assert r["shared"] <= H100_SMEM_BYTES, f"{r['shared']} bytes of shared memory with config {r['config']}"


# fp32 runs one small config for accuracy, not speed; its spills are accepted
FAST = [(c, i) for c, i in zip(CASES, IDS) if c[3] != "fp32"]


@pytest.mark.parametrize("which,causal,head_dim,dtype",
                         [pytest.param(*c, marks=DKDV_SPILLS) if c[0] == "dkdv" else c for c, _ in FAST],
                         ids=[i for _, i in FAST])
def test_default_h100_config_does_not_spill(compiled, which, causal, head_dim, dtype):
    r = compiled[(which, dtype, head_dim, causal)]
    assert "error" not in r, r["error"]
    assert r["spill_bytes"] == 0, f"config {r['config']}: {r['report']}"
