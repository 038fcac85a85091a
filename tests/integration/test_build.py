"""The build's decisions (fused_margin/backends/_build.py, shared by setup.py and the build on first use): where the
CUDA toolkit is, whether the CUDA kernels are built and why not, the architectures of a build machine
without a GPU, and the flags every build takes."""

import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch

from fused_margin.backends import _build


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("CUDA_HOME", "CUDA_PATH", "TORCH_CUDA_ARCH_LIST", "FUSED_MARGIN_CUDA", "FUSED_MARGIN_NO_EXT"):
        # setenv first: monkeypatch then restores the variable's absence too, so a CUDA_HOME that
        # locate_cuda_home sets does not outlive the test (delenv of an unset name records nothing)
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return monkeypatch


def _fake_nvcc(folder, toolkit):
    """A wrapper script named nvcc, as /usr/local/bin/nvcc often is, whose --dryrun names ``toolkit``."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "nvcc")
    with open(path, "w") as f:
        f.write(f'#!/bin/sh\necho "#$ _HERE_={toolkit}/bin"\necho "#$ TOP={toolkit}/bin/.."\n')
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
    return path


def test_the_toolkit_comes_from_nvcc_itself_not_the_folder_above_a_wrapper(clean_env, tmp_path):
    toolkit = tmp_path / "cuda-13.0"
    (toolkit / "bin").mkdir(parents=True)
    _fake_nvcc(str(tmp_path / "wrappers" / "bin"), str(toolkit))
    clean_env.setenv("PATH", f"{tmp_path / 'wrappers' / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert _build.find_cuda_home() == str(toolkit)
    assert "CUDA_HOME" not in os.environ  # finding sets nothing
    assert _build.locate_cuda_home() == str(toolkit)
    assert os.environ["CUDA_HOME"] == str(toolkit)  # torch.utils.cpp_extension reads it at import


def test_an_explicit_cuda_home_wins(clean_env, tmp_path):
    _fake_nvcc(str(tmp_path / "bin"), "/elsewhere")
    clean_env.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    clean_env.setenv("CUDA_PATH", "/opt/my-cuda")
    assert _build.locate_cuda_home() == "/opt/my-cuda"
    assert "CUDA_HOME" not in os.environ


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on the PATH")
def test_the_real_nvcc_names_a_toolkit_with_its_libraries(clean_env):
    home = _build.find_cuda_home()
    assert home is not None and os.path.exists(os.path.join(home, "bin", "nvcc")), home


def test_a_cpu_torch_builds_the_cpu_kernels_and_says_why_not_cuda(clean_env):
    clean_env.setattr(torch.version, "cuda", None)
    plan = _build.plan()
    assert not plan.with_cuda and not any(s.endswith(".cu") for s in plan.sources)
    assert plan.summary == f"CPU kernels only: torch {torch.__version__} is not a CUDA build"
    assert "-ffp-contract=off" in plan.cxx_flags and plan.nvcc_flags == []
    assert all(os.path.isabs(s) and os.path.exists(s) for s in plan.sources)
    with pytest.raises(
        RuntimeError, match="FUSED_MARGIN_CUDA=1 but the CUDA kernels cannot be built: torch .* is not a CUDA build"
    ):
        clean_env.setenv("FUSED_MARGIN_CUDA", "1")
        _build.plan()


def test_a_cuda_torch_without_a_gpu_or_an_arch_list_builds_for_the_default_architectures(clean_env, tmp_path):
    """PyPI's default Linux torch is a CUDA build; on a build machine without a GPU torch would take the
    architectures of the visible GPUs and fail (IndexError). The plan names the default ones instead."""
    toolkit = tmp_path / "cuda"
    (toolkit / "bin").mkdir(parents=True)
    _fake_nvcc(str(toolkit / "bin"), str(toolkit))
    clean_env.setenv("CUDA_HOME", str(toolkit))
    clean_env.setattr(torch.version, "cuda", "13.0")
    clean_env.setattr(torch.cuda, "is_available", lambda: False)
    plan = _build.plan(relative_to=os.path.dirname(_build.PACKAGE_DIR))
    assert plan.with_cuda and "fused_margin/backends/csrc/fused_margin_cuda.cu" in plan.sources
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == _build.DEFAULT_ARCHS
    assert plan.notes == [f"no GPU visible and TORCH_CUDA_ARCH_LIST unset: architectures {_build.DEFAULT_ARCHS}"]
    assert plan.summary == f"CPU and CUDA kernels (CUDA 13.0 at {toolkit}, architectures {_build.DEFAULT_ARCHS})"
    assert plan.nvcc_flags[:2] == ["-O3", "--fmad=false"] and "-DFUSED_MARGIN_WITH_CUDA" in plan.cxx_flags
    from torch.utils import cpp_extension

    flags = cpp_extension._get_cuda_arch_flags()  # what torch passes nvcc with that list
    assert "-gencode=arch=compute_90,code=compute_90" in flags and "-gencode=arch=compute_75,code=sm_75" in flags


def test_an_arch_list_the_user_set_is_kept(clean_env, tmp_path):
    (tmp_path / "bin").mkdir()
    _fake_nvcc(str(tmp_path / "bin"), str(tmp_path))
    clean_env.setenv("CUDA_HOME", str(tmp_path))
    clean_env.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    clean_env.setattr(torch.version, "cuda", "13.0")
    plan = _build.plan()
    assert plan.with_cuda and plan.notes == [] and os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0a"


def test_cuda_off_by_request_and_no_toolkit_are_named(clean_env, tmp_path):
    clean_env.setattr(torch.version, "cuda", "13.0")
    clean_env.setenv("PATH", str(tmp_path))  # no nvcc
    assert _build.plan().summary.startswith("CPU kernels only: no CUDA toolkit found (nvcc is not on the PATH")
    clean_env.setenv("FUSED_MARGIN_CUDA", "0")
    assert _build.plan().summary == "CPU kernels only: FUSED_MARGIN_CUDA=0"


def test_the_build_directory_is_per_python_torch_and_package_version(clean_env, tmp_path):
    clean_env.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    a = _build.build_directory(torch, False, "0.1.0")
    assert os.path.dirname(a) == str(tmp_path) and "0.1.0" in a and torch.__version__ in a
    assert a != _build.build_directory(torch, False, "0.2.0")


@pytest.mark.parametrize(
    "value, expected", [(None, None), ("", None), ("1", True), ("yes", True), ("0", False), ("off", False)]
)
def test_flag(clean_env, value, expected):
    if value is not None:
        clean_env.setenv("FUSED_MARGIN_CUDA", value)
    assert _build.flag("FUSED_MARGIN_CUDA") is expected


def test_setup_says_in_one_line_what_it_builds_and_why_not_cuda(tmp_path):
    """setup.py's own line (pip shows it with -v): the plan's summary, before any compile, after the plan's
    note where it has one."""
    root = os.path.dirname(_build.PACKAGE_DIR)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSED_MARGIN")}
    result = subprocess.run(
        [sys.executable, "setup.py", "--version"], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("fused_margin setup:")]
    expected = _build.plan().summary if torch.version.cuda is None else "CPU and CUDA kernels"
    building = [line for line in lines if line.startswith("fused_margin setup: building")]
    assert len(building) == 1 and building[0].startswith(f"fused_margin setup: building {expected}"), result.stderr
    # the one other line there may be: a CUDA build on a machine with no GPU names the architectures it takes
    notes = [line for line in lines if line not in building]
    assert notes in (
        [],
        [f"fused_margin setup: no GPU visible and TORCH_CUDA_ARCH_LIST unset: architectures {_build.DEFAULT_ARCHS}"],
    ), result.stderr
    from fused_margin import __version__

    assert result.stdout.strip().splitlines()[-1] == __version__
