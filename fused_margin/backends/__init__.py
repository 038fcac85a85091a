"""The backends, in one registry: what each runs on, whether it can run here and why not, and its kernels.

Every path asks this registry for its kernels: the row path (:mod:`fused_margin.paths.fused`) for a
:class:`~fused_margin.paths.fused.RowKernel`, the memory-lean path and the class shards
(:mod:`fused_margin.paths.lean`, :mod:`fused_margin.paths.sharded`) for :class:`BlockOps`. A backend is a
:class:`Backend` entry of :data:`REGISTRY`:

* ``reference``: eager PyTorch, anything, any dtype (:mod:`fused_margin.core.reference`; the lean path's eager
  chunk math);
* ``triton``: CUDA tensors, and CPU tensors under ``TRITON_INTERPRET=1`` (:mod:`fused_margin.backends.triton`);
* ``cpu`` / ``cuda``: the C++ extension's kernels (:mod:`fused_margin.backends.extension`).

``backend="auto"`` picks the first available entry of :data:`AUTO_ORDER` for the device and dtype and falls
back to the reference (with a one-time warning) where no kernel exists; an explicitly named backend that
cannot run raises, naming the reason. Results never change silently: every backend computes docs/loss.md.

Adding a backend: an entry here (its devices, dtypes and loader) and its kernels behind the two interfaces
(CONTRIBUTING.md).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from fused_margin.versions import UntestedTritonError

_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_warned = set()


class BlockOps:
    """The memory-lean path's chunk kernels (the interface of :mod:`fused_margin.backends.triton.class_block`
    and :class:`fused_margin.backends.extension.CppBlockOps`):

    * ``block_partials(buffers, raw, c0, target, *, first, scale, ignore_index, col0, row_scale, col_scale,
      col_shift, offset, pair, class_weight, track_wrong, smoothing)``: merge a chunk's partial statistics
      into the running per-row buffers (:class:`fused_margin.core.class_split.Partials`), in place;
    * ``block_grad(raw, c0, target, lse, coef, smooth, target_value, out, *, scale, ignore_index, col0,
      row_scale, col_scale, col_shift, offset, pair, class_weight)``: a chunk's ``dL/draw`` into ``out``;
    * ``FLAG_DTYPE``: the dtype of the ``has_y`` buffer they write; ``PAIR_IN_COMPUTE_DTYPE``: whether the
      pair perturbation must come in the compute dtype (else any float dtype is read)."""


@dataclass(frozen=True)
class Backend:
    """One backend: its ``name``, the device types it runs on, the input dtypes of its row kernels and of its
    chunk kernels, and ``load(device_type) -> (row_kernel, block_ops, why_not)`` (``why_not`` None when it
    loads; the kernels None where it has none, as the reference)."""

    name: str
    devices: Tuple[str, ...]
    row_dtypes: Tuple[torch.dtype, ...]
    block_dtypes: Tuple[torch.dtype, ...]
    load: Callable[[str], Tuple[Optional[object], Optional[object], Optional[str]]]
    #: whether it runs on CPU tensors only where this says so (Triton: under its interpreter)
    runs_on: Optional[Callable[[str], Optional[str]]] = None

    def status(self, device, dtype: torch.dtype = torch.float32, *, block: bool = False) -> str:
        """``"ok"``, or why it cannot run on ``device`` in ``dtype`` (its chunk kernels with ``block``)."""
        device = torch.device(device)
        if device.type not in self.devices:
            return f"backend {self.name!r} runs on {' or '.join(self.devices)} tensors, got {device.type}"
        if self.runs_on is not None:
            reason = self.runs_on(device.type)
            if reason is not None:
                return reason
        _, _, why_not = self.load(device.type)
        if why_not is not None:
            return why_not
        dtypes = self.block_dtypes if block else self.row_dtypes
        if dtype not in dtypes:
            names = [str(d).replace("torch.", "") for d in dtypes]
            what = f"the chunk kernels of {self.name!r}" if block else "fused kernels"
            return f"{what} take {', '.join(names[:-1])} and {names[-1]}, not {dtype}"
        return "ok"

    def row_kernel(self, device_type: str):
        """The :class:`~fused_margin.paths.fused.RowKernel` for ``device_type`` (None for the reference)."""
        return self.load(device_type)[0]

    def block_ops(self, device_type: str):
        """The :class:`BlockOps` for ``device_type`` (None: the lean path's eager chunk math)."""
        return self.load(device_type)[1]

    @property
    def fused(self) -> bool:
        """Whether this backend has kernels (every one but the reference)."""
        return self.name != "reference"


def _load_reference(device_type):
    return None, None, None


def _triton_import():
    """``(the package fused_margin.backends.triton, None)`` or ``(None, the ImportError)``: Triton not
    installed, or an untested release (:mod:`fused_margin.versions`)."""
    try:
        from fused_margin.backends import triton as package
    except ImportError as error:
        return None, error
    return package, None


def _load_triton(device_type):
    package, error = _triton_import()
    if error is not None:
        return None, None, str(error) if isinstance(error, UntestedTritonError) else "triton is not installed"
    from fused_margin.backends.triton import class_block

    return package.ROW_KERNEL, class_block, None


def _triton_runs_on(device_type):
    """Triton kernels run on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before
    :mod:`fused_margin.backends.triton` was imported (Triton chooses the interpreter at that point)."""
    if device_type == "cpu":
        package, error = _triton_import()
        if error is None and not package.INTERPRETED:
            return "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU), got cpu"
    return None


def _load_extension(device_type):
    try:
        from fused_margin.backends import extension
    except ImportError as error:  # a broken install: the package still runs, without the C++ kernels
        return None, None, f"the fused_margin C++ extension cannot be imported: {error}"
    kernel = extension.row_kernel(device_type)
    if kernel is None:
        why = (
            f"the fused_margin C++ extension is not available: {extension.BUILD_ERROR}"
            if extension.BUILD_ERROR
            else f"the fused_margin C++ extension was built without {device_type} kernels (torch was a CPU "
            "build, or no CUDA toolkit was found when it was built)"
        )
        return None, None, why
    return kernel, extension.CppBlockOps, None


_ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: every backend, by name
REGISTRY: Dict[str, Backend] = {
    "reference": Backend("reference", ("cpu", "cuda", "mps", "xpu", "meta"), _ALL_DTYPES, _ALL_DTYPES, _load_reference),
    "triton": Backend("triton", ("cuda", "cpu"), _FUSED_DTYPES, _FUSED_DTYPES, _load_triton, _triton_runs_on),
    "cuda": Backend("cuda", ("cuda",), _FUSED_DTYPES, _ALL_DTYPES, _load_extension),
    "cpu": Backend("cpu", ("cpu",), _FUSED_DTYPES, _ALL_DTYPES, _load_extension),
}
#: what ``backend=`` takes
BACKENDS = ("auto",) + tuple(REGISTRY)
#: ``backend="auto"``: the fused backends in order of preference, per device type (the reference when none runs)
AUTO_ORDER = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}
#: the chunk kernels the class shards use (no backend is named there), per device type
BLOCK_ORDER = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}


def get(name: str) -> Backend:
    """The registry's entry ``name`` (a ``ValueError`` naming the backends otherwise)."""
    if name not in REGISTRY:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return REGISTRY[name]


def available_backends(device: torch.device, dtype: torch.dtype = torch.float32) -> Dict[str, str]:
    """Map every backend name to ``"ok"`` or the reason it cannot run on ``device``/``dtype``."""
    return {name: backend.status(device, dtype) for name, backend in REGISTRY.items()}


def triton_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels run on ``device``'s tensors here (see :func:`_triton_runs_on`)."""
    device = torch.device(device)
    return device.type == "cuda" or (
        device.type == "cpu" and _triton_runs_on("cpu") is None and _triton_import()[1] is None
    )


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """The registry entry ``backend`` names for tensors on ``device`` in ``dtype``: a named one must be
    available (a ``RuntimeError`` says why not); ``"auto"`` takes the first available of :data:`AUTO_ORDER`,
    else the reference (a one-time ``RuntimeWarning`` lists the reasons)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend != "auto":
        entry = REGISTRY[backend]
        status = entry.status(device, dtype)
        if status != "ok":
            raise RuntimeError(f"backend={backend!r} is not available: {status}")
        return entry
    order = AUTO_ORDER.get(device.type, ())
    status = {name: REGISTRY[name].status(device, dtype) for name in order}
    if (
        device.type == "cuda"
        and isinstance(_triton_import()[1], UntestedTritonError)
        and "triton-version" not in _warned
    ):
        _warned.add("triton-version")
        warnings.warn(
            f"fused_margin: backend='auto' does not take the Triton kernels: {status['triton']}",
            RuntimeWarning,
            stacklevel=3,
        )
    for name in order:
        if status[name] == "ok":
            return REGISTRY[name]
    if dtype in _FUSED_DTYPES and order:
        key = (device.type, dtype)
        if key not in _warned:
            _warned.add(key)
            reasons = "; ".join(f"{n}: {status[n]}" for n in order)
            warnings.warn(
                f"fused_margin: no fused kernel for {device.type} {dtype} ({reasons}); "
                "using the reference implementation",
                RuntimeWarning,
                stacklevel=3,
            )
    return REGISTRY["reference"]


def block_backend(device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend whose chunk kernels serve tensors on ``device`` in ``dtype`` where no backend is named
    (the class shards): the first of :data:`BLOCK_ORDER` whose chunk kernels run, else the reference."""
    device = torch.device(device)
    for name in BLOCK_ORDER.get(device.type, ()):
        if REGISTRY[name].status(device, dtype, block=True) == "ok":
            return REGISTRY[name]
    return REGISTRY["reference"]
