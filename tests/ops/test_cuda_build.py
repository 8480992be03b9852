"""Compile checks of the CUDA code that run without a GPU: nvcc on every .cu, the launcher's C++."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch.utils.cpp_extension

CSRC = Path(__file__).resolve().parents[2] / "csrc"
NVCC_FLAGS = [
    "-c",
    "-std=c++17",
    "-gencode", "arch=compute_80,code=sm_80",
    "-gencode", "arch=compute_90,code=sm_90",
    "-Xptxas", "-v",
]  # fmt: skip

skip_without_nvcc = pytest.mark.skipif(
    os.environ.get("AMI_DIST_SKIP_NVCC") == "1", reason="AMI_DIST_SKIP_NVCC=1 set explicitly"
)


def _nvcc() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.fail("nvcc is not on PATH; install the CUDA toolkit or set AMI_DIST_SKIP_NVCC=1 explicitly")
    return nvcc


def _cuda_include() -> str:
    """The CUDA runtime headers next to nvcc (a CPU torch build does not look for them)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    candidates.append(str(Path(_nvcc()).resolve().parents[1]))
    for home in filter(None, candidates):
        if (Path(home) / "include" / "cuda_runtime.h").exists():
            return str(Path(home) / "include")
    pytest.fail(f"no include/cuda_runtime.h under any of {candidates}; set CUDA_HOME")


def _ptxas_summary(stderr: str) -> list[str]:
    """One line per kernel and architecture: registers and spills, from ptxas -v."""
    lines, current, arch, spills = [], None, None, None
    for line in stderr.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line):
            current, arch = m.group(1), m.group(2)
        elif m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line):
            spills = f"spill stores {m.group(1)} B, loads {m.group(2)} B"
        elif (m := re.search(r"Used (\d+) registers", line)) and current:
            name = subprocess.run(["c++filt", current], capture_output=True, text=True).stdout.strip() or current
            lines.append(f"{arch} {m.group(1):>3} regs, {spills}: {name}")
            current = None
    return lines


@skip_without_nvcc
@pytest.mark.parametrize("source", sorted(CSRC.glob("*.cu")), ids=lambda p: p.name)
def test_cuda_kernels_compile_with_nvcc(source, tmp_path, capsys):
    nvcc = _nvcc()
    cmd = [nvcc, *NVCC_FLAGS, f"-I{CSRC}", str(source), "-o", str(tmp_path / (source.stem + ".o"))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"nvcc failed on {source.name}:\n{proc.stderr[-6000:]}"
    summary = _ptxas_summary(proc.stderr)
    assert summary, f"no ptxas register report for {source.name}:\n{proc.stderr[-2000:]}"
    with capsys.disabled():
        print(f"\nptxas report for {source.name}:")
        for line in summary:
            print("  " + line)


def test_there_are_cuda_sources():
    assert sorted(p.name for p in CSRC.glob("*.cu")), "csrc/ has no .cu files to compile"


@skip_without_nvcc
def test_cuda_launcher_compiles_against_torch_headers(tmp_path):
    # The CPU torch wheel lacks c10/cuda/impl/cuda_cmake_macros.h (DESIGN.md §5b); c10 lets a
    # build skip it, which is enough for a syntax check of lns_cuda.cpp against the real API.
    include = [*torch.utils.cpp_extension.include_paths(), sysconfig.get_paths()["include"], _cuda_include()]
    cxx = os.environ.get("CXX", "c++")
    cmd = [
        cxx, "-fsyntax-only", "-std=c++20", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
        *(f"-I{p}" for p in include), f"-I{CSRC}", str(CSRC / "lns_cuda.cpp"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-6000:]}"


def test_setup_adds_cuda_sources_only_when_requested(monkeypatch):
    # setup.py decides from CUDA_HOME / torch.version.cuda / AMI_DIST_FORCE_CUDA, never from
    # torch.cuda.is_available(); loading it must not run setup() itself.
    import importlib.util

    import setuptools

    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: pytest.fail("setup.py asked is_available()"))
    spec = importlib.util.spec_from_file_location("ami_setup", CSRC.parent / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def sources(force: str, cuda_home: str | None, torch_cuda: str | None) -> list[str]:
        monkeypatch.setenv("AMI_DIST_FORCE_CUDA", force)
        monkeypatch.setattr(module, "CUDA_HOME", cuda_home)
        # CUDAExtension itself needs a toolkit path to build its library list.
        monkeypatch.setattr(torch.utils.cpp_extension, "CUDA_HOME", cuda_home or "/opt/toolkit")
        monkeypatch.setattr(torch.version, "cuda", torch_cuda)
        (ext,) = module._extensions()
        assert ext.name == "ami_dist._C"
        return ext.sources

    assert not any(s.endswith(".cu") for s in sources("0", None, None))
    assert not any(s.endswith(".cu") for s in sources("0", "/opt/toolkit", None))
    assert any(s.endswith(".cu") for s in sources("0", "/opt/toolkit", "12.8"))
    assert any(s.endswith(".cu") for s in sources("1", None, None))
