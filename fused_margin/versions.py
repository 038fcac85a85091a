"""The torch and Triton versions fused_margin is tested with, and the check made when its Triton kernels
are imported.

The package metadata (``pyproject.toml``) declares the same bounds; tests/integration/test_versions.py holds the two
equal. An untested Triton is refused when a Triton kernel is asked for (``import fused_margin.backends.triton``,
``backend="triton"``, or ``backend="auto"`` on a GPU, which then takes the next fused backend and says
why): new Triton releases have changed what the kernels' code means before (a block mask combined with a
scalar condition, loop-carried types), and a wrong kernel is worse than a slower one.
``FUSED_MARGIN_ALLOW_UNTESTED_TRITON=1`` turns the refusal into a warning.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Optional, Tuple

#: the oldest and the newest ``major.minor`` releases tested, both included
TORCH_TESTED = ("2.11", "2.15")
TRITON_TESTED = ("3.6", "3.9")

ALLOW_UNTESTED_TRITON = "FUSED_MARGIN_ALLOW_UNTESTED_TRITON"


class UntestedTritonError(ImportError):
    """The installed Triton is outside :data:`TRITON_TESTED`."""


def major_minor(version: str) -> Tuple[int, int]:
    """``(major, minor)`` of a version string such as ``"3.9.0"``, ``"3.10.0+git1a2b"`` or ``"2.13.0+cpu"``."""
    match = re.match(r"\s*(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"not a version: {version!r}")
    return int(match.group(1)), int(match.group(2))


def _in_range(version: str, tested: Tuple[str, str]) -> bool:
    return major_minor(tested[0]) <= major_minor(version) <= major_minor(tested[1])


def triton_problem(version: str) -> Optional[str]:
    """Why Triton ``version`` is refused, or None when it is tested."""
    if _in_range(version, TRITON_TESTED):
        return None
    low, high = TRITON_TESTED
    return (
        f"Triton {version} is untested with fused_margin (tested: {low} to {high}); install a tested "
        f"release (pip install 'triton>={low},<{major_minor(high)[0]}.{major_minor(high)[1] + 1}') or set "
        f"{ALLOW_UNTESTED_TRITON}=1 to run the Triton kernels anyway"
    )


def check_triton() -> None:
    """Raise :class:`UntestedTritonError` for an untested Triton (a ``RuntimeWarning`` instead with
    ``FUSED_MARGIN_ALLOW_UNTESTED_TRITON=1``)."""
    import triton

    problem = triton_problem(triton.__version__)
    if problem is None:
        return
    if os.environ.get(ALLOW_UNTESTED_TRITON, "").strip().lower() in ("1", "true", "yes", "on"):
        warnings.warn(
            f"fused_margin: {problem.split(';')[0]}; running its kernels as {ALLOW_UNTESTED_TRITON} asks",
            RuntimeWarning,
            stacklevel=2,
        )
        return
    raise UntestedTritonError(problem)
