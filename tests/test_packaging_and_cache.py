"""The package as built from a copy of the source tree (sdist, wheel, editable) with
ATTNLIB_CUDA_ARCHS, using a stand-in nvcc (writes each -o file), so no CUDA toolkit or GPU is
needed; and the kernel disk cache as several users and processes see it."""
import logging
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

from attnlib.cuda import cache as cache_mod
from attnlib.cuda import specs

REPO = Path(__file__).resolve().parent.parent
CACHE_PY = REPO / "attnlib" / "cuda" / "cache.py"
COPIED = ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "attnlib", "triton_kernels", "csrc", "scripts")

needs_posix = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes, fcntl and sh")


def _copy_source_tree(dst: Path) -> Path:
    dst.mkdir()
    for name in COPIED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", "_cubins", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, dst / name)
    return dst


def _fake_nvcc(tmp_path: Path) -> Path:
    nvcc = tmp_path / "fake-nvcc"
    nvcc.write_text('#!/bin/sh\nout=""\nwhile [ $# -gt 0 ]; do [ "$1" = "-o" ] && out="$2"; shift; done\n'
                    'printf "fake cubin" > "$out"\n')
    nvcc.chmod(0o755)
    return nvcc


def _env(**extra):
    env = {**os.environ, "PIP_NO_INDEX": "1", **extra}
    if "ATTNLIB_CUDA_ARCHS" not in extra:
        env.pop("ATTNLIB_CUDA_ARCHS", None)
    return env


def _pip_wheel(src: Path, out: Path, env) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(src)], check=True, env=env, cwd=src.parent,
                   stdout=subprocess.DEVNULL)
    return next(out.glob("attnlib-*.whl"))


def _cubins_in(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        return sorted(n for n in z.namelist() if n.startswith("attnlib/_cubins/"))


def _expected_cubins(csrc: Path, arch: str) -> list[str]:
    return sorted(f"attnlib/_cubins/{specs.cubin_filename(s, arch, specs.source_hash(str(csrc), s))}"
                  for s in specs.ALL_SPECS if specs.arch_number(arch) >= s.min_arch)


# -- ATTNLIB_CUDA_ARCHS builds ------------------------------------------------------------------
@needs_posix
def test_arch_wheel_ships_cubins_the_installed_loader_finds_and_plain_rebuild_drops_them(tmp_path):
    """pip builds in the source tree's build/ folder: a plain `pip install .` after an
    ATTNLIB_CUDA_ARCHS one shipped the old cubins (and "90" after "80;90" the sm_80 ones)."""
    src = _copy_source_tree(tmp_path / "src")
    nvcc = _fake_nvcc(tmp_path)
    w90 = _pip_wheel(src, tmp_path / "d1", _env(ATTNLIB_CUDA_ARCHS="90", NVCC=str(nvcc)))
    assert _cubins_in(w90) == _expected_cubins(src / "csrc", "90")

    # the installed loader looks the cubin up in its own package (not the source tree) and prefers it
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(w90)],
                   check=True, env=_env(), cwd=tmp_path, stdout=subprocess.DEVNULL)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = textwrap.dedent("""
        from attnlib.cuda import loader, specs
        s = specs.flash_fwd_spec(64, "fp16", False)
        print(loader.shipped_cubin(s, (9, 0)))
        print(loader.shipped_cubin(s, (8, 0)))
        binary, origin = loader.get_binary(s, (9, 0))
        print(origin.split()[0], binary == b"fake cubin")
    """)
    env = _env(PYTHONPATH=str(site))
    for var in ("ATTNLIB_CUBIN_DIR", "ATTNLIB_CSRC_DIR", "ATTNLIB_CUDA_NO_CUBINS"):
        env.pop(var, None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=elsewhere, env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")
    assert lines[0].startswith(str(site / "attnlib" / "_cubins" / "flash_fwd_hd64_fp16_causal0_bm64_bn64.sm_90."))
    assert lines[1] == "None" and lines[2] == "shipped True"

    plain = _pip_wheel(src, tmp_path / "d2", _env())
    assert _cubins_in(plain) == [], "a plain build shipped cubins left in build/ by an earlier one"
    w80 = _pip_wheel(src, tmp_path / "d3", _env(ATTNLIB_CUDA_ARCHS="80", NVCC=str(nvcc)))
    assert _cubins_in(w80) == _expected_cubins(src / "csrc", "80")


@needs_posix
def test_sdist_builds_a_wheel_with_cubins(tmp_path):
    """scripts/build_cubins.py was left out of the sdist: `ATTNLIB_CUDA_ARCHS=90 pip install
    attnlib-0.1.0.tar.gz` (or python -m build) failed with ModuleNotFoundError: scripts."""
    src = _copy_source_tree(tmp_path / "src")
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "sdist")], check=True,
                   cwd=src, env=_env(), capture_output=True)
    sdist = next((tmp_path / "sdist").glob("attnlib-*.tar.gz"))
    with tarfile.open(sdist) as t:
        names = t.getnames()
        t.extractall(tmp_path / "unpacked")
    assert any(n.endswith("/scripts/build_cubins.py") for n in names)
    assert not any("/_cubins/" in n for n in names)
    unpacked = next((tmp_path / "unpacked").glob("attnlib-*"))
    wheel = _pip_wheel(unpacked, tmp_path / "dist", _env(ATTNLIB_CUDA_ARCHS="90", NVCC=str(_fake_nvcc(tmp_path))))
    assert _cubins_in(wheel) == _expected_cubins(unpacked / "csrc", "90")
    with zipfile.ZipFile(wheel) as z:
        csrc = {n for n in z.namelist() if n.startswith("attnlib/_csrc/")}
    for s in specs.ALL_SPECS:  # every source and header each specialisation includes
        for rel in specs.source_files(str(REPO / "csrc"), s.source):
            assert f"attnlib/_csrc/{rel}" in csrc


@needs_posix
def test_editable_install_with_archs_puts_cubins_where_the_loader_looks(tmp_path):
    """`ATTNLIB_CUDA_ARCHS=90 pip install -e .` compiled every cubin into a temporary build-lib
    that pip deleted; the loader (attnlib/_cubins beside the source package) never saw one."""
    src = _copy_source_tree(tmp_path / "src")
    code = "import sys; from setuptools import build_meta; build_meta.build_editable(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "whl")], check=True, cwd=src,
                   env=_env(ATTNLIB_CUDA_ARCHS="90", NVCC=str(_fake_nvcc(tmp_path))), capture_output=True)
    shipped = sorted(p.name for p in (src / "attnlib" / "_cubins").glob("*.cubin"))
    assert shipped == [Path(n).name for n in _expected_cubins(src / "csrc", "90")]


# -- the disk cache ---------------------------------------------------------------------------
@needs_posix
def test_cache_entries_follow_the_umask(tmp_path):
    """Entries were written through tempfile.mkstemp, hence 0600: a cache warmed by one user
    (root building a Docker image, a shared ATTNLIB_CACHE_DIR) was unreadable to every other."""
    old = os.umask(0o022)
    try:
        c = cache_mod.BinaryCache(str(tmp_path))
        c.get_or_build("spec", "e" * 64, lambda: b"\x7fELF")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(c.path("spec", "e" * 64)).st_mode) == 0o644


def test_cache_dir_expands_user(tmp_path, monkeypatch):
    """ATTNLIB_CACHE_DIR="~/kcache" (Dockerfile ENV, .env file: no shell expands it) made a
    folder literally named "~" in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("ATTNLIB_CACHE_DIR", "~/kcache")
    assert cache_mod.default_cache_dir() == str(tmp_path / "kcache")
    monkeypatch.delenv("ATTNLIB_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "~/xdg")
    assert cache_mod.default_cache_dir() == str(tmp_path / "xdg" / "attnlib")


def test_cache_build_oserror_is_not_reported_as_unwritable_cache(tmp_path, caplog):
    """An OSError raised by the build itself was taken for an unwritable cache folder: logged as
    such, and the failing build ran a second time."""
    calls = []

    def build():
        calls.append(1)
        raise FileNotFoundError("source vanished")

    with caplog.at_level(logging.WARNING, logger="attnlib"), pytest.raises(FileNotFoundError):
        cache_mod.BinaryCache(str(tmp_path)).get_or_build("spec", "f" * 64, build)
    assert len(calls) == 1
    assert "not writable" not in caplog.text


@needs_posix
def test_cache_concurrent_processes_build_once(tmp_path):
    """Three processes asking for the same entry in a fresh folder: one builds, all get it whole."""
    worker = textwrap.dedent("""
        import importlib.util, sys, time
        spec = importlib.util.spec_from_file_location("attnlib_cache", sys.argv[1])
        cache = importlib.util.module_from_spec(spec); spec.loader.exec_module(cache)
        def build():
            with open(sys.argv[3], "a") as f:
                f.write("x")
            time.sleep(0.5)
            return bytes(range(256)) * 64
        payload, how = cache.BinaryCache(sys.argv[2]).get_or_build("spec", "9" * 64, build)
        assert payload == bytes(range(256)) * 64
        print(how)
    """)
    count = tmp_path / "builds"
    procs = [subprocess.Popen([sys.executable, "-c", worker, str(CACHE_PY), str(tmp_path / "c"), str(count)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    assert sorted(o.strip() for o, _ in outs) == ["built", "hit", "hit"]
    assert count.read_text() == "x"
    c = cache_mod.BinaryCache(str(tmp_path / "c"))
    assert cache_mod.unpack(open(c.path("spec", "9" * 64), "rb").read()) == bytes(range(256)) * 64
    assert [p for p in os.listdir(c.root) if p.endswith(".tmp")] == []
