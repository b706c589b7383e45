"""attnlib.cuda without a GPU: every specialisation compiles (NVRTC sm_80/sm_90, nvcc sm_90),
warnings fail; cache keys, atomic writes, locking, corrupt-entry recovery; shipped cubins;
reasons when CuPy/NVRTC/headers are missing."""
import os
import shutil
import subprocess
import sys
import threading

import pytest

from attnlib.cuda import cache as cache_mod
from attnlib.cuda import loader, specs, toolchain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _nvrtc_reason():
    r = loader.availability_reasons()
    return "; ".join(r) if r else None


needs_nvrtc = pytest.mark.skipif(_nvrtc_reason() is not None, reason=str(_nvrtc_reason()))
needs_nvcc = pytest.mark.skipif(toolchain.find_nvcc() is None, reason="nvcc not found")


# -- compilation ------------------------------------------------------------------------------
@needs_nvrtc
@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("spec", specs.ALL_SPECS, ids=lambda s: s.name)
def test_nvrtc_compiles_every_specialisation(spec, arch):
    res = loader.compile_nvrtc(spec, arch)
    assert res.log == "", f"NVRTC warnings:\n{res.log}"
    assert res.binary[:4] == b"\x7fELF"
    assert f"-arch=sm_{arch}" in res.options


@needs_nvcc
@pytest.mark.parametrize("spec", specs.ALL_SPECS, ids=lambda s: s.name)
def test_nvcc_compiles_every_specialisation(spec, tmp_path):
    out = str(tmp_path / "k.cubin")
    cmd = toolchain.nvcc_command(spec, "90", toolchain.csrc_dir(), out, extra=["--resource-usage"])
    res = subprocess.run(cmd, capture_output=True, text=True)
    text = res.stdout + res.stderr
    assert res.returncode == 0, text
    assert "warning" not in text.lower(), text
    assert "0 bytes spill stores" in text, f"register spills:\n{text}"
    assert os.path.getsize(out) > 0


@needs_nvcc
@pytest.mark.parametrize("spec", specs.FLASH_FWD_TILE128_SPECS, ids=lambda s: s.name)
def test_nvcc_tile128_specialisations_do_not_spill_on_sm80(spec, tmp_path):
    """The 128-row flash tile sits near the 255-register limit: sm_80 as well as sm_90 (above)."""
    out = str(tmp_path / "k.cubin")
    cmd = toolchain.nvcc_command(spec, "80", toolchain.csrc_dir(), out, extra=["--resource-usage"])
    res = subprocess.run(cmd, capture_output=True, text=True)
    text = res.stdout + res.stderr
    assert res.returncode == 0, text
    assert "warning" not in text.lower(), text
    assert "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in text, f"register spills:\n{text}"


@needs_nvcc
def test_build_cubins_and_shipped_lookup(tmp_path, monkeypatch):
    sys.path.insert(0, REPO)
    try:
        from scripts.build_cubins import build_cubins
    finally:
        sys.path.remove(REPO)
    spec = specs.flash_fwd_spec(64, "fp16", False)
    paths = build_cubins("90", str(tmp_path), specs=[spec], verbose=False)
    h = specs.source_hash(toolchain.csrc_dir(), spec)
    assert [os.path.basename(p) for p in paths] == [specs.cubin_filename(spec, "90", h)]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    monkeypatch.setenv("ATTNLIB_CUBIN_DIR", str(tmp_path))
    assert loader.shipped_cubin(spec, (9, 0)) == paths[0]
    assert loader.shipped_cubin(spec, (8, 0)) is None
    assert loader.shipped_cubin(specs.flash_fwd_spec(64, "fp16", True), (9, 0)) is None
    binary, origin = loader.get_binary(spec, (9, 0))
    assert origin.startswith("shipped") and binary == open(paths[0], "rb").read()
    monkeypatch.setenv("ATTNLIB_CUDA_NO_CUBINS", "1")
    assert loader.shipped_cubin(spec, (9, 0)) is None


def test_parse_archs():
    assert specs.parse_archs("80;90") == ["80", "90"]
    assert specs.parse_archs("8.0 9.0,sm_90a") == ["80", "90", "90a"]
    with pytest.raises(ValueError):
        specs.parse_archs("hopper")


def test_spec_names_encode_parameters():
    names = {s.name for s in specs.ALL_SPECS}
    assert len(names) == len(specs.ALL_SPECS) and len(specs.FLASH_FWD_SPECS) == 8  # unique names
    s = specs.flash_fwd_spec(128, "bf16", True)
    assert s.name == "flash_fwd_hd128_bf16_causal1_bm64_bn64"
    assert s.smem_bytes == 2 * 128 * (64 + 4 * 64)
    with pytest.raises(ValueError):
        specs.flash_fwd_spec(96, "fp16", False)
    # the 128-row tile: two atoms per warp, 4 warps, padded rows (HEAD_DIM + 8 elements)
    t = specs.flash_fwd_tile128_spec(128, "bf16", True)
    assert t.name == "flash_fwd_hd128_bf16_causal1_bm128_bn32_ma2" and t in specs.ALL_SPECS
    assert ("ATTNLIB_M_ATOMS", "2") in t.defines and t.threads == 128
    assert t.smem_bytes == 2 * (128 + 8) * (128 + 4 * 32)
    t64 = specs.flash_fwd_tile128_spec(64, "fp16", False)
    assert t64.name == "flash_fwd_hd64_fp16_causal0_bm128_bn64_ma2" and t64.smem_bytes == 2 * 72 * (128 + 4 * 64)
    assert len(specs.FLASH_FWD_TILE128_SPECS) == 8
    # the one-atom specs keep their defines (no ATTNLIB_M_ATOMS), hence their cache keys
    assert all(k != "ATTNLIB_M_ATOMS" for spec in specs.FLASH_FWD_SPECS for k, _ in spec.defines)
    for bad in (dict(block_m=64, m_atoms=2), dict(m_atoms=3), dict(block_m=128, block_n=24, m_atoms=2)):
        with pytest.raises(ValueError):
            specs.flash_fwd_spec(64, "fp16", False, **bad)


def test_source_files_follow_includes():
    files = specs.source_files(toolchain.csrc_dir(), "flash/flash_fwd.cu")
    for f in ("flash/flash_fwd.cu", "flash/flash_fwd_traits.cuh", "flash/flash_fwd_mainloop_sm80.cuh",
              "flash/flash_fwd_epilogue.cuh", "flash/flash_fwd_softmax.cuh", "flash/ptx_sm80.cuh"):
        assert f in files


# -- cache keys -----------------------------------------------------------------------------------
def _key(csrc, spec, arch="90", nvrtc=(13, 0), extra=()):
    opts = loader.nvrtc_options(spec, arch, csrc) + list(extra)
    return loader.cache_key_for(spec, arch, False, opts, specs.source_hash(csrc, spec), nvrtc)


def test_cache_key_changes_with_source_header_options_arch_nvrtc(tmp_path):
    csrc = str(tmp_path / "csrc")
    shutil.copytree(toolchain.csrc_dir(), csrc)
    spec = specs.flash_fwd_spec(64, "fp16", False)
    base = _key(csrc, spec)
    assert _key(csrc, spec) == base
    # the same sources elsewhere give the same key (include paths are not keyed)
    csrc2 = str(tmp_path / "elsewhere")
    shutil.copytree(csrc, csrc2)
    assert _key(csrc2, spec) == base
    assert _key(csrc, spec, arch="80") != base
    assert _key(csrc, spec, nvrtc=(13, 1)) != base
    assert _key(csrc, spec, extra=["-lineinfo"]) != base
    assert _key(csrc, specs.flash_fwd_spec(64, "fp16", True)) != base
    with open(os.path.join(csrc, "flash", "flash_fwd.cu"), "a") as f:
        f.write("\n// edit\n")
    k_src = _key(csrc, spec)
    assert k_src != base
    with open(os.path.join(csrc, "flash", "ptx_sm80.cuh"), "a") as f:
        f.write("\n// edit\n")
    assert _key(csrc, spec) not in (base, k_src)


# -- the disk cache -----------------------------------------------------------------------------
class CountingBuild:
    def __init__(self, payload=b"\x7fELF fake cubin", delay=0.0):
        self.payload, self.delay, self.calls = payload, delay, 0
        self.lock = threading.Lock()

    def __call__(self):
        import time

        with self.lock:
            self.calls += 1
        time.sleep(self.delay)
        return self.payload


def test_cache_builds_once_then_hits(tmp_path):
    c = cache_mod.BinaryCache(str(tmp_path))
    build = CountingBuild()
    assert c.get_or_build("spec", "k" * 64, build) == (build.payload, "built")
    assert c.get_or_build("spec", "k" * 64, build) == (build.payload, "hit")
    assert cache_mod.BinaryCache(str(tmp_path)).get_or_build("spec", "k" * 64, build)[1] == "hit"
    assert build.calls == 1
    leftovers = [p for p in os.listdir(c.root) if not p.endswith((".cubin", ".lock"))]
    assert leftovers == []  # temporary files were replaced into place


def test_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNLIB_CACHE_DIR", str(tmp_path))
    assert cache_mod.BinaryCache().root == os.path.join(str(tmp_path), "cubins")


@pytest.mark.parametrize("damage", ["truncate", "flip", "magic", "empty", "extra"])
def test_cache_rebuilds_corrupt_entries(tmp_path, damage):
    c = cache_mod.BinaryCache(str(tmp_path))
    build = CountingBuild()
    c.get_or_build("spec", "a" * 64, build)
    path = c.path("spec", "a" * 64)
    blob = bytearray(open(path, "rb").read())
    if damage == "truncate":
        blob = blob[:-3]
    elif damage == "flip":
        blob[-1] ^= 0xFF
    elif damage == "magic":
        blob[0:8] = b"NOTMAGIC"
    elif damage == "empty":
        blob = bytearray()
    else:
        blob += b"junk"
    open(path, "wb").write(bytes(blob))
    assert c.get_or_build("spec", "a" * 64, build) == (build.payload, "built")
    assert build.calls == 2
    assert cache_mod.unpack(open(path, "rb").read()) == build.payload


def test_cache_failed_build_leaves_no_entry(tmp_path):
    c = cache_mod.BinaryCache(str(tmp_path))

    def boom():
        raise RuntimeError("compiler exploded")

    with pytest.raises(RuntimeError):
        c.get_or_build("spec", "b" * 64, boom)
    assert not os.path.exists(c.path("spec", "b" * 64))
    assert [p for p in os.listdir(c.root) if p.endswith(".tmp")] == []


@pytest.mark.skipif(cache_mod.fcntl is None, reason="no fcntl on this platform")
def test_cache_lock_serialises_builders(tmp_path):
    c = cache_mod.BinaryCache(str(tmp_path))
    path = c.path("spec", "c" * 64)
    held = []

    def build():
        # while building, the lock file is held: a non-blocking flock from elsewhere fails
        with open(path + ".lock", "a+b") as f:
            try:
                cache_mod.fcntl.flock(f.fileno(), cache_mod.fcntl.LOCK_EX | cache_mod.fcntl.LOCK_NB)
                held.append(False)
                cache_mod.fcntl.flock(f.fileno(), cache_mod.fcntl.LOCK_UN)
            except BlockingIOError:
                held.append(True)
        return counting()

    counting = CountingBuild(delay=0.3)
    results = []
    threads = [threading.Thread(target=lambda: results.append(c.get_or_build("spec", "c" * 64, build)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counting.calls == 1 and held == [True]
    assert sorted(how for _, how in results) == ["built", "hit", "hit", "hit"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a non-root POSIX user")
def test_cache_unwritable_dir_still_compiles(tmp_path):
    root = tmp_path / "ro"
    (root / "cubins").mkdir(parents=True)
    os.chmod(root / "cubins", 0o500)
    try:
        payload, how = cache_mod.BinaryCache(str(root)).get_or_build("spec", "d" * 64, CountingBuild())
        assert how == "uncached" and payload
    finally:
        os.chmod(root / "cubins", 0o700)


def test_get_binary_uses_injected_cache(tmp_path, monkeypatch):
    """The NVRTC path end to end through the disk cache, with a fake compiler."""
    monkeypatch.setenv("ATTNLIB_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("ATTNLIB_CUDA_NO_CUBINS", "1")
    monkeypatch.setattr(loader, "nvrtc_version", lambda: (13, 0))
    monkeypatch.setattr(loader, "nvrtc_archs", lambda: (80, 90))
    calls = []

    def fake_compile(spec, arch, *, csrc=None, ptx=False):
        calls.append((spec.name, arch, ptx))
        return loader.CompileResult(binary=b"\x7fELF" + spec.name.encode(), log="", options=[], ptx=ptx)

    monkeypatch.setattr(loader, "compile_nvrtc", fake_compile)
    spec = specs.flash_fwd_spec(128, "bf16", True)
    b1, o1 = loader.get_binary(spec, (9, 0))
    b2, o2 = loader.get_binary(spec, (9, 0))
    assert b1 == b2 and o1.startswith("built") and o2.startswith("hit")
    loader.get_binary(spec, (8, 0))
    # a device newer than NVRTC gets PTX for the newest arch NVRTC knows
    loader.get_binary(spec, (12, 0))
    assert calls == [(spec.name, "90", False), (spec.name, "80", False), (spec.name, "90", True)]


# -- reasons ----------------------------------------------------------------------------------
def test_missing_headers_reason_lists_folders(monkeypatch, tmp_path):
    monkeypatch.setattr(toolchain, "cuda_include_candidates", lambda: [str(tmp_path / "a"), str(tmp_path / "b")])
    why = toolchain.cuda_headers_reason()
    assert str(tmp_path / "a") in why and str(tmp_path / "b") in why and "CUDA_PATH" in why


def test_arch_reasons(monkeypatch):
    spec = specs.flash_fwd_spec(64, "fp16", False)
    assert "sm_80" in loader.arch_reasons(spec, (7, 5))[0]
    monkeypatch.setattr(loader, "nvrtc_archs", lambda: (90,))
    monkeypatch.setattr(loader, "nvrtc_version", lambda: (13, 0))
    monkeypatch.setenv("ATTNLIB_CUDA_NO_CUBINS", "1")
    assert "cannot compile for sm_80" in loader.arch_reasons(spec, (8, 0))[0]
    assert loader.arch_reasons(spec, (9, 0)) == []


def test_without_cupy_kernel_reports_reason_and_auto_falls_through():
    code = r"""
import sys
sys.modules['cupy'] = None
import torch, attnlib
from attnlib import dispatch
from attnlib.api import build_inputs
from attnlib.kernels.flash_cuda import FlashCUDA
k = [k for k in dispatch.kernels('flash') if k.name == 'flash-cuda'][0]
r = k.unavailable_reasons()
assert r and 'cupy' in r[0].lower(), r
q = torch.randn(1, 2, 16, 64, dtype=torch.float16)
inp = build_inputs(q, q, q)
assert dispatch.select(inp).name != 'flash-cuda'
try:
    dispatch.select(inp, 'cuda')
except dispatch.NoKernelError as e:
    assert 'cupy' in str(e).lower(), str(e)
else:
    raise AssertionError('forced cuda backend did not raise')
print('ok')
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr


def test_availability_reports_broken_nvrtc(monkeypatch):
    monkeypatch.setattr(loader, "_availability", None)

    def broken():
        raise OSError("libnvrtc.so.13: cannot open shared object file")

    monkeypatch.setattr(loader, "nvrtc_version", broken)
    r = loader.availability_reasons()
    monkeypatch.setattr(loader, "_availability", None)
    assert r and "NVRTC" in r[0] and "libnvrtc" in r[0]


def test_no_visible_device_is_a_reason_but_compiling_still_works(monkeypatch):
    """A host without a GPU: every CUDA kernel is listed unavailable with the reason, while
    availability_reasons (what compilation needs, used to gate the compile tests) stays as is."""
    import attnlib
    import torch

    before = loader.availability_reasons()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loader.availability_reasons() == before  # compilation needs no device
    assert loader.device_reasons() and "no CUDA device is visible" in loader.device_reasons()[0]
    rows = [k for k in attnlib.available_kernels() if k["backend"] == "cuda"]
    assert {k["name"] for k in rows} >= {"flash-cuda", "sage-cuda", "block_sparse-cuda"}
    for k in rows:
        assert not k["available"], k
        assert before or any("no CUDA device is visible" in r for r in k["reasons"]), k
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert loader.device_reasons() == []


@needs_nvcc
def test_compile_report():
    rows = toolchain.compile_report([specs.flash_fwd_spec(64, "fp16", False)])
    assert rows[0]["registers"] and rows[0]["registers"] <= 255
    assert rows[0]["spill_bytes"] == 0
    assert rows[0]["dynamic_smem_bytes"] == 2 * 64 * (64 + 4 * 64)


def test_entry_report_picks_the_entry_function_block():
    """compile_report reads one entry's ptxas lines, not the first function of the source."""
    text = ("ptxas info    : Compiling entry function 'a' for 'sm_90'\nptxas info    : Used 80 registers, 2080 bytes smem\n"
            "ptxas info    : Compiling entry function 'b' for 'sm_90'\nptxas info    : Used 32 registers\n")
    assert "Used 32 registers" in toolchain.entry_report(text, "b")
    assert "Used 80 registers" not in toolchain.entry_report(text, "b")
    assert "Used 80 registers" in toolchain.entry_report(text, "a")
