"""The package's run-time switches, in one place: read by the code paths they change, set by
:func:`configure` (for the rest of the process) or :func:`config` (for a ``with`` block).

==================  =======  ===========================================================================
switch              default  what it changes
==================  =======  ===========================================================================
``grad_in_forward``  True    a training step on a backend that can (the ``cpu`` and ``triton`` row kernels)
                             forms ``dL/draw`` in the forward, over the GEMM output, instead of in a separate
                             row backward (:func:`fused_margin.paths.fused.grad_in_forward` says when);
                             the same numbers either way. Off: the separate row backward (for profiling
                             and for the tests that compare the two).
``sync_checks``      False   labels and tables of CUDA tensors are checked with a host sync and a
                             ``ValueError`` naming the bad entry, as on CPU tensors (for debugging: a sync
                             every step). Off: an asynchronous device assertion for labels, no per-call
                             read of CUDA tables (the modules and builders check theirs when built).
==================  =======  ===========================================================================

Nothing else in the package changes behaviour behind the caller's back; the one cache it keeps (which CPU
tables were found finite, per tensor version, so a module's buffers are not read every step) changes no
result.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields


@dataclass
class Config:
    """The switches (see the module docstring)."""

    grad_in_forward: bool = True
    sync_checks: bool = False


#: the switches in force
CONFIG = Config()


def _checked(changes: dict) -> dict:
    names = {f.name for f in fields(Config)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise TypeError(f"unknown fused_margin switch(es) {unknown}; the switches are {sorted(names)}")
    for name, value in changes.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return changes


def configure(**changes) -> None:
    """Set switches for the rest of the process: ``fm.configure(sync_checks=True)``."""
    for name, value in _checked(changes).items():
        setattr(CONFIG, name, value)


@contextlib.contextmanager
def config(**changes):
    """Set switches inside a ``with`` block, restored after it: ``with fm.config(grad_in_forward=False): ...``."""
    _checked(changes)
    previous = {name: getattr(CONFIG, name) for name in changes}
    configure(**changes)
    try:
        yield CONFIG
    finally:
        configure(**previous)
