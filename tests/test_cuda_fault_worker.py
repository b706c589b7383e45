"""A sticky CUDA error ends its pytest-xdist worker (tests/conftest.py, attnlib.testing
end_worker_after_cuda_fault): xdist reports that test as crashed and the tests after it run in a
fresh worker instead of all failing on the poisoned context. Checked here with a fake error."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from attnlib.testing import end_worker_after_cuda_fault, is_sticky_cuda_error

pytest.importorskip("xdist")
HERE = Path(__file__).resolve().parent


def test_sticky_errors_recognised():
    assert is_sticky_cuda_error("Triton Error [CUDA]: an illegal memory access was encountered")
    assert is_sticky_cuda_error("CUDA error: unspecified launch failure")
    assert not is_sticky_cuda_error("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert not is_sticky_cuda_error("AssertionError: out: 12 elements differ")


def test_outside_xdist_nothing_ends(monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    with pytest.raises(RuntimeError) as info:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    end_worker_after_cuda_fault("x::y", info)  # returns: a plain run must go on


def test_worker_ends_and_later_tests_pass(tmp_path):
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_a.py").write_text(
        "def test_fault():\n"
        "    raise RuntimeError('CUDA error: an illegal memory access was encountered')\n\n"
        + "".join(f"def test_after_{i}():\n    pass\n\n" for i in range(6)))
    (tmp_path / "test_b.py").write_text("def test_other():\n    assert 1 + 1 == 2\n")
    log = tmp_path / "failures.log"
    env = dict(os.environ, ATTNLIB_FAILURE_LOG=str(log), PYTHONPATH=str(HERE.parent))
    env.pop("PYTEST_XDIST_WORKER", None)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "xdist", "-n", "2", "-p", "no:cacheprovider",
                        str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "crashed" in out and "test_fault" in out, out
    assert "1 failed, 7 passed" in out, out
    assert "[cuda fault] test_a.py::test_fault" in log.read_text()
