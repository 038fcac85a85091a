"""`pip install` as users type it, from a fresh virtual environment with torch installed:

* ``pip install <project>`` (pip's isolated build, which has no torch): a pure-Python wheel holding the C++
  sources; the first loss builds the C++ kernels (one line on stderr), later processes load the cached
  build, and ``backend="cpu"`` is available;
* ``pip install --no-build-isolation <project>``: the wheel holds the compiled extension and nothing is
  built at import;
* the sdist and the wheel hold the package and its C++ sources, not the tests or benchmark results.

The fresh environment sees this interpreter's torch through a ``.pth`` file (so no torch wheel is fetched);
pip needs the package index for the isolated build's setuptools. Slow (two builds of the extension).

And where the build on first use cannot run (no C++ compiler), the package still imports and every place
that names the C++ kernels says why and what to install.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHECK = (
    "import fused_margin as fm, torch; s = fm.available_backends(torch.device('cpu'), torch.float32); "
    "print('cpu:', s['cpu']); from fused_margin.backends import extension; print('from:', extension._C.__file__)"
)


def _run(command, env, cwd, timeout=900):
    """``command`` in ``cwd`` (not the project: ``python -c`` would import the package from there)."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _index_reachable(python, tmp_path):
    result = subprocess.run(
        [python, "-m", "pip", "download", "-q", "--no-deps", "-d", str(tmp_path / "probe"), "setuptools>=64"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result.returncode == 0


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of the project's tracked and unignored files (the working tree as a clone would have it)."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    dest = tmp_path_factory.mktemp("src") / "fused_margin_project"
    for name in files:
        if os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(dest / os.path.dirname(name), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), dest / name)
    return str(dest)


def _fresh_venv(path):
    """A new virtual environment whose interpreter also sees this one's packages (torch) after its own."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = os.path.join(str(path), "bin", "python")
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # this interpreter's site folders, in its order: its venv's own and, where that venv reaches another
    # environment's torch through a .pth (scripts/setup_env.sh on a machine with a CUDA torch), that one too
    outer = [sysconfig.get_paths()["purelib"]] + [
        p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages") and os.path.isdir(p)
    ]
    with open(os.path.join(site, "_outer_site.pth"), "w") as f:
        f.write("".join(p + "\n" for p in dict.fromkeys(outer)))
    return python


def _env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FUSED_MARGIN", "PYTHONPATH"))}
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "torch_extensions")
    env["MAX_JOBS"] = "2"
    return env


@pytest.mark.slow
def test_pip_install_builds_the_cpp_kernels_on_first_use(project, tmp_path):
    python = _fresh_venv(tmp_path / "venv")
    if not _index_reachable(python, tmp_path):
        pytest.skip("the package index is not reachable: pip's isolated build cannot fetch setuptools")
    env = _env(tmp_path)
    _run([python, "-m", "pip", "install", "-q", project], env, tmp_path)
    first = _run([python, "-c", CHECK], env, tmp_path)
    assert "cpu: ok" in first.stdout, first.stdout + first.stderr
    assert "building the C++ kernels, once" in first.stderr and "C++ kernels built in" in first.stderr
    assert str(tmp_path / "torch_extensions") in first.stdout  # loaded from the build, not the project tree
    again = _run([python, "-c", CHECK], env, tmp_path)
    assert "cpu: ok" in again.stdout and "building" not in again.stderr, again.stderr


@pytest.mark.slow
def test_pip_install_without_build_isolation_ships_the_compiled_kernels(project, tmp_path):
    python = _fresh_venv(tmp_path / "venv")
    env = _env(tmp_path)
    _run([python, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", project], env, tmp_path)
    result = _run([python, "-c", CHECK], env, tmp_path)
    assert "cpu: ok" in result.stdout and "building" not in result.stderr, result.stdout + result.stderr
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert f"from: {site}" in result.stdout, result.stdout


@pytest.mark.slow
def test_sdist_and_wheel_hold_the_package_and_its_sources(project, tmp_path):
    dist = tmp_path / "dist"
    env = dict(_env(tmp_path), FUSED_MARGIN_NO_EXT="1")  # a pure wheel: its file list is what matters
    code = f"from setuptools import build_meta as b; b.build_sdist({str(dist)!r}); b.build_wheel({str(dist)!r})"
    _run([sys.executable, "-c", code], env, project, timeout=600)
    sdist = next(dist.glob("*.tar.gz"))
    wheel = next(dist.glob("*.whl"))
    with tarfile.open(sdist) as tar:
        in_sdist = [name.split("/", 1)[1] for name in tar.getnames() if "/" in name]
    with zipfile.ZipFile(wheel) as whl:
        in_wheel = whl.namelist()
    for names in (in_sdist, in_wheel):
        assert "fused_margin/__init__.py" in names and "fused_margin/backends/csrc/fused_margin.cpp" in names
        assert (
            "fused_margin/backends/csrc/row_kernel.h" in names
            and "fused_margin/backends/csrc/fused_margin_cuda.cu" in names
        )
        assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "scripts/"))], names
    assert "setup.py" in in_sdist and "pyproject.toml" in in_sdist


_NO_COMPILER = r"""
import sys, warnings
sys.modules["fused_margin._C"] = None  # as if the install had built no extension
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    import fused_margin as fm
    from fused_margin.backends import extension
assert extension._C is None
assert "no C++ compiler ('no-such-c++' is not on the PATH)" in extension.BUILD_ERROR, extension.BUILD_ERROR
assert "apt-get install g++" in extension.BUILD_ERROR and "FUSED_MARGIN_NO_EXT=1" in extension.BUILD_ERROR
assert any("no C++ kernels" in str(w.message) for w in caught), [str(w.message) for w in caught]
status = fm.available_backends(torch.device("cpu"), torch.float32)
assert "no C++ compiler" in status["cpu"], status
x, w, y = torch.randn(4, 8), torch.randn(5, 8), torch.tensor([0, 1, 2, 3])
try:
    fm.margin_cross_entropy(x, y, w, scale=4.0, backend="cpu")
except RuntimeError as error:
    assert "backend='cpu' is not available" in str(error) and "apt-get install g++" in str(error), error
else:
    raise AssertionError("backend='cpu' ran without the extension")
fm.margin_cross_entropy(x, y, w, scale=4.0)  # auto: the reference
print("named")
"""


def test_without_a_compiler_the_package_runs_and_names_the_fix(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSED_MARGIN")}
    env["CXX"] = "no-such-c++"
    result = subprocess.run(
        [sys.executable, "-c", _NO_COMPILER], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT
    )
    assert result.returncode == 0 and "named" in result.stdout, result.stdout + result.stderr[-3000:]
