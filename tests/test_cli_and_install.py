"""The command line, and the package as a user installs it (wheel into a fresh folder)."""
import os
import subprocess
import sys
from pathlib import Path


from attnlib.__main__ import main

REPO = Path(__file__).resolve().parent.parent


def test_info_lists_kernels_and_sources(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "flash-torch-reference" in out
    assert "attnlib._csrc" in out and "(missing)" not in out


def test_demo_runs_every_method_on_torch(capsys):
    assert main(["demo", "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    for m in ("flash", "sage", "block_sparse", "linear", "sla", "asymrnr"):
        assert f"\n{m} " in out
    assert "all methods ran" in out


def test_wheel_installs_and_runs_from_another_folder(tmp_path):
    env = {**os.environ, "PIP_NO_INDEX": "1"}
    env.pop("ATTNLIB_CUDA_ARCHS", None)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(REPO)], check=True, env=env, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("attnlib-*.whl"))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, env=env, cwd=tmp_path)
    assert list((site / "attnlib" / "_csrc").rglob("*.cu*")), "CUDA sources missing from the wheel"
    assert (site / "attnlib" / "triton_kernels" / "__init__.py").exists()
    assert not (site / "triton_kernels").exists(), "triton_kernels must not be a top-level package"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = subprocess.run([sys.executable, "-m", "attnlib", "info"], capture_output=True, text=True, cwd=elsewhere,
                       env={**env, "PYTHONPATH": str(site)})
    assert r.returncode == 0, r.stderr
    assert f"attnlib._csrc: {site / 'attnlib' / '_csrc'}" in r.stdout
    assert f"attnlib.triton_kernels: {site / 'attnlib' / 'triton_kernels'}" in r.stdout
