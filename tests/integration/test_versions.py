"""The tested torch and Triton ranges: declared once in the package metadata and in
fused_margin.versions, refused (with a reason naming the version) when a Triton kernel is asked for."""

import os
import subprocess
import sys

import pytest
import tomllib

from fused_margin import versions

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bounds(requirement):
    """``(lower, exclusive upper)`` of ``name>=a,<b``."""
    spec = requirement.split(">=", 1)[1]
    low, high = spec.split(",<")
    return low.strip(), high.strip()


def _next_minor(version):
    major, minor = versions.major_minor(version)
    return f"{major}.{minor + 1}"


def test_metadata_declares_the_tested_ranges():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    torch_req = next(r for r in project["dependencies"] if r.startswith("torch"))
    triton_req = next(r for r in project["optional-dependencies"]["triton"] if r.startswith("triton"))
    assert _bounds(torch_req) == (versions.TORCH_TESTED[0], _next_minor(versions.TORCH_TESTED[1]))
    assert _bounds(triton_req) == (versions.TRITON_TESTED[0], _next_minor(versions.TRITON_TESTED[1]))


def test_readme_names_the_tested_ranges():
    readme = " ".join(open(os.path.join(ROOT, "README.md")).read().split())
    assert "torch {} to {}".format(*versions.TORCH_TESTED) in readme
    assert "Triton {} to {}".format(*versions.TRITON_TESTED) in readme


def test_the_newest_triton_run_installs_the_newest_tested_release():
    pins = [
        line.strip()
        for line in open(os.path.join(ROOT, "requirements-triton-newest.txt"))
        if line.startswith("triton==")
    ]
    assert len(pins) == 1 and versions.major_minor(pins[0].split("==")[1]) == versions.major_minor(
        versions.TRITON_TESTED[1]
    )


@pytest.mark.parametrize(
    "version, major_minor",
    [("3.9.0", (3, 9)), ("3.10.0+git1a2b3c", (3, 10)), ("2.13.0+cpu", (2, 13)), (" 3.6", (3, 6))],
)
def test_major_minor(version, major_minor):
    assert versions.major_minor(version) == major_minor


def test_major_minor_rejects_a_non_version():
    with pytest.raises(ValueError, match="not a version"):
        versions.major_minor("nightly")


@pytest.mark.parametrize("version", ["3.6.0", "3.7.1", "3.8.0", "3.9.0", "3.9.5"])
def test_tested_triton_is_accepted(version):
    assert versions.triton_problem(version) is None


@pytest.mark.parametrize("version", ["3.5.1", "3.10.0", "4.0.0", "2.3.1"])
def test_untested_triton_is_refused_with_the_version_and_the_range(version):
    problem = versions.triton_problem(version)
    assert f"Triton {version} is untested" in problem
    assert "tested: 3.6 to 3.9" in problem and "triton>=3.6,<3.10" in problem
    assert versions.ALLOW_UNTESTED_TRITON in problem


_UNTESTED = r"""
import warnings
import torch
import triton
triton.__version__ = "3.10.0"
import fused_margin as fm
status = fm.available_backends(torch.device("cpu"), torch.float32)
assert "Triton 3.10.0 is untested" in status["triton"], status
assert status["cpu"] == "ok" or "extension" in status["cpu"], status
x, w, y = torch.randn(4, 8), torch.randn(5, 8), torch.tensor([0, 1, 2, 3])
try:
    fm.margin_cross_entropy(x, y, w, scale=4.0, backend="triton")
except RuntimeError as error:
    assert "backend='triton' is not available: Triton 3.10.0 is untested" in str(error), error
else:
    raise AssertionError("backend='triton' ran on an untested Triton")
try:
    import fused_margin.backends.triton
except fm.versions.UntestedTritonError as error:
    assert "tested: 3.6 to 3.9" in str(error)
else:
    raise AssertionError("fused_margin.backends.triton imported on an untested Triton")
print("refused")
"""

_ALLOWED = r"""
import warnings
import torch
import triton
triton.__version__ = "3.10.0"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import fused_margin.backends.triton
assert any("Triton 3.10.0 is untested" in str(w.message) for w in caught), [str(w.message) for w in caught]
import fused_margin as fm
x, w, y = torch.randn(4, 8), torch.randn(5, 8), torch.tensor([0, 1, 2, 3])
loss = fm.margin_cross_entropy(x, y, w, scale=4.0, backend="triton")
ref = fm.margin_cross_entropy(x, y, w, scale=4.0, backend="reference")
assert torch.allclose(loss, ref, rtol=1e-5), (loss, ref)
print("allowed")
"""


def _run(code, allow):
    env = {k: v for k, v in os.environ.items() if k != versions.ALLOW_UNTESTED_TRITON}
    env["TRITON_INTERPRET"] = "1"
    if allow:
        env[versions.ALLOW_UNTESTED_TRITON] = "1"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def test_an_untested_triton_is_refused_when_a_triton_kernel_is_asked_for():
    result = _run(_UNTESTED, allow=False)
    assert result.returncode == 0 and "refused" in result.stdout, result.stderr[-3000:]


def test_an_untested_triton_runs_with_a_warning_when_allowed():
    result = _run(_ALLOWED, allow=True)
    assert result.returncode == 0 and "allowed" in result.stdout, result.stderr[-3000:]
