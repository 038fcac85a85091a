"""Backend discovery and selection.

``backend="auto"`` picks the fastest available fused backend for the tensors' device and dtype and
falls back to the reference (with a one-time warning) where no kernel exists; an explicitly named
backend that cannot run raises, naming the reason. Results never change silently: every backend
computes docs/loss.md.
"""
from __future__ import annotations

import warnings
from typing import Dict, Optional, Tuple

import torch

from fused_margin.paths.fused import RowKernel
from fused_margin.versions import UntestedTritonError

BACKENDS = ("auto", "reference", "triton", "cuda", "cpu")
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_warned = set()


def _triton_import() -> Tuple[Optional[RowKernel], Optional[ImportError]]:
    """``(the Triton RowKernel, None)``, or ``(None, the ImportError)``: Triton not installed, or an untested
    release (:class:`~fused_margin.versions.UntestedTritonError`, :mod:`fused_margin.versions`)."""
    try:
        from fused_margin.backends.triton import ROW_KERNEL
    except ImportError as error:
        return None, error
    return ROW_KERNEL, None


def _load_triton() -> Optional[RowKernel]:
    return _triton_import()[0]


def _load_extension(device_type: str) -> Optional[RowKernel]:
    try:
        from fused_margin.backends import extension
    except ImportError:
        return None
    return extension.row_kernel(device_type)


def _row_kernel(name: str, device: torch.device) -> Optional[RowKernel]:
    return _load_triton() if name == "triton" else _load_extension(device.type)


def triton_runs_on(device: torch.device) -> bool:
    """Triton kernels run on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before
    :mod:`fused_margin.backends.triton` was imported (Triton chooses the interpreter at that point)."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    from fused_margin.backends.triton import INTERPRETED
    return INTERPRETED


def available_backends(device: torch.device, dtype: torch.dtype = torch.float32) -> Dict[str, str]:
    """Map every backend name to ``"ok"`` or the reason it cannot run on ``device``/``dtype``."""
    device = torch.device(device)
    status = {"reference": "ok"}
    fused_dtype_ok = dtype in _FUSED_DTYPES
    bad_dtype = f"fused kernels take float16, bfloat16 and float32, not {dtype}"
    triton_error = _triton_import()[1]
    if triton_error is not None:
        status["triton"] = (str(triton_error) if isinstance(triton_error, UntestedTritonError)
                            else "triton is not installed")
    elif not triton_runs_on(device):
        status["triton"] = f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU), got {device.type}"
    else:
        status["triton"] = "ok" if fused_dtype_ok else bad_dtype
    for name, dev in (("cuda", "cuda"), ("cpu", "cpu")):
        if device.type != dev:
            status[name] = f"backend {name!r} runs on {dev} tensors, got {device.type}"
        elif _load_extension(dev) is None:
            from fused_margin.backends import extension
            status[name] = (f"the fused_margin C++ extension is not available: {extension.BUILD_ERROR}"
                            if extension.BUILD_ERROR else f"the fused_margin C++ extension was built without {dev} "
                            "kernels (torch was a CPU build, or no CUDA toolkit was found when it was built)")
        else:
            status[name] = "ok" if fused_dtype_ok else bad_dtype
    return status


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> Optional[RowKernel]:
    """The row kernel for ``backend`` (``None`` means the reference)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return None
    status = available_backends(device, dtype)
    if backend != "auto":
        if status[backend] != "ok":
            raise RuntimeError(f"backend={backend!r} is not available: {status[backend]}")
        return _row_kernel(backend, device)
    order = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
    if (device.type == "cuda" and isinstance(_triton_import()[1], UntestedTritonError)
            and "triton-version" not in _warned):
        _warned.add("triton-version")
        warnings.warn(f"fused_margin: backend='auto' does not take the Triton kernels: {status['triton']}",
                      RuntimeWarning, stacklevel=3)
    for name in order:
        if status.get(name) == "ok":
            return _row_kernel(name, device)
    if dtype in _FUSED_DTYPES:
        key = (device.type, dtype)
        if key not in _warned:
            _warned.add(key)
            reasons = "; ".join(f"{n}: {status[n]}" for n in order)
            warnings.warn(f"fused_margin: no fused kernel for {device.type} {dtype} ({reasons}); "
                          "using the reference implementation", RuntimeWarning, stacklevel=3)
    return None
