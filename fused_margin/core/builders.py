"""Tables built from class counts (docs/loss.md section 6).

All arithmetic is float64 on the host; the result is cast to ``dtype`` at the end (float32 by default,
the dtype the fused kernels read; pass ``dtype=torch.float64`` for a float64 run, as the presets and the
modules do, so fp64 losses see the exact tables and not fp32-rounded ones).

Scalar arguments accept Python, NumPy and 0-d tensor numbers; bad ones raise an error naming them.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from fused_margin.core.spec import as_int, as_real

__all__ = [
    "as_class_counts",
    "as_table",
    "ldam_margins",
    "dbm_class_margins",
    "log_prior",
    "class_balanced_weights",
    "drw_weights",
    "marc_weights",
    "long_tailed_counts",
]


def as_class_counts(class_counts, name: str = "class_counts") -> np.ndarray:
    """Validate per-class counts (list, array or tensor) and return them as a float64 numpy vector."""
    if isinstance(class_counts, torch.Tensor):
        if class_counts.is_floating_point() or class_counts.is_complex():
            arr = class_counts.detach().cpu().double().numpy()
        else:
            arr = class_counts.detach().cpu().numpy().astype(np.float64)
    else:
        try:
            arr = np.asarray(class_counts, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name} must be a sequence of numbers, got {type(class_counts).__name__}") from err
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one count per class), got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if arr.size < 2:
        raise ValueError(f"{name} must have at least 2 classes, got {arr.size}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite")
    if np.any(arr <= 0):
        bad = int(np.flatnonzero(arr <= 0)[0])
        raise ValueError(f"{name} must be > 0 for every class; class {bad} has {arr[bad]}")
    return arr


def _out(values: np.ndarray, dtype) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float64).to(dtype)


def _finite(name, value) -> float:
    """``value`` as a finite Python float (Python, NumPy or 0-d tensor number), else an error naming it."""
    try:
        value = as_real(name, value)
    except TypeError as err:
        raise ValueError(f"{name} must be a finite number, got {type(value).__name__} {value!r}") from err
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return value


def _positive_int(name, value, minimum, bound=None) -> int:
    """``value`` as a Python int >= ``minimum`` (Python, NumPy or 0-d tensor integer), else a ``ValueError``
    naming it (``bound``: how the message states the minimum)."""
    bound = bound or f">= {minimum}"
    try:
        value = as_int(name, value)
    except TypeError as err:
        raise ValueError(f"{name} must be an int {bound}, got {type(value).__name__} {value!r}") from err
    if value < minimum:
        raise ValueError(f"{name} must be an int {bound}, got {value!r}")
    return value


def check_betas(betas, name: str = "betas") -> tuple:
    """A DRW ``betas`` table as a tuple of floats, each finite and in ``[0, 1)`` (all checked now, not
    when the schedule reaches them)."""
    if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__"):
        raise TypeError(f"{name} must be a sequence of numbers in [0, 1), got {type(betas).__name__} {betas!r}")
    betas = tuple(betas)
    if len(betas) == 0:
        raise ValueError(f"{name} is empty")
    out = []
    for i, beta in enumerate(betas):
        try:
            beta = _finite(f"{name}[{i}]", beta)
        except ValueError as err:
            raise ValueError(f"{name} must hold finite numbers, got {betas!r}") from err
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{name} must lie in [0, 1), got {name}[{i}] = {beta}")
        out.append(beta)
    return tuple(out)


def as_table(name: str, values, num_classes=None) -> torch.Tensor:
    """A user's per-class table (sequence, NumPy array or tensor of real numbers) as a float64 CPU tensor
    of C finite values; errors name ``name``.

    This reads the values on the host (one device sync for a CUDA tensor): the modules call it once, at
    construction, so the training step never pays for it."""
    if isinstance(values, torch.Tensor):
        if not (
            values.is_floating_point()
            or values.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
        ):
            raise TypeError(f"{name} must hold real numbers, got a tensor of {values.dtype}")
        if values.requires_grad:
            raise TypeError(
                f"{name} is stored as a constant table: pass values.detach() (a learnable table "
                "goes per call to forward)"
            )
        table = values.detach().to("cpu", torch.float64)
    else:
        if isinstance(values, (str, bytes)):
            raise TypeError(
                f"{name} must be a 1-D sequence or tensor of numbers (one per class), got "
                f"{type(values).__name__} {values!r}"
            )
        try:
            array = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"{name} must be a 1-D sequence or tensor of numbers (one per class), got {type(values).__name__}"
            ) from err
        table = torch.from_numpy(array.copy())
    if table.dim() != 1:
        raise ValueError(f"{name} must be 1-D (one value per class), got shape {tuple(table.shape)}")
    if num_classes is not None and table.shape[0] != num_classes:
        raise ValueError(f"{name} must have C = {num_classes} entries, got {table.shape[0]}")
    bad = ~torch.isfinite(table)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} must be finite, got {name}[{i}] = {float(table[i])}")
    return table


def ldam_margins(class_counts, max_m: float = 0.5, dtype=torch.float32) -> torch.Tensor:
    """LDAM class margins ``m_j = C_0 n_j^(-1/4)`` with ``C_0`` chosen so ``max_j m_j = max_m``
    (Cao et al., "Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss", NeurIPS 2019)."""
    n = as_class_counts(class_counts)
    max_m = _finite("max_m", max_m)
    m = n**-0.25
    return _out(m * (max_m / m.max()), dtype)


def dbm_class_margins(
    class_counts, K: float = 0.1, tau: float = 1.0, margin_ref: str = "min", dtype=torch.float32
) -> torch.Tensor:
    """DBM class-wise margins ``m_y = K (n_ref / n_y)^tau`` (difficulty-aware balancing margin, AAAI'25).

    ``margin_ref="min"`` uses ``n_ref = min(n)`` (the paper: the rarest class gets ``K``);
    ``"last"`` uses ``n_ref = n[C-1]`` (the published code, which assumes counts sorted head to tail)."""
    n = as_class_counts(class_counts)
    K = _finite("K", K)
    tau = _finite("tau", tau)
    if margin_ref == "min":
        n_ref = n.min()
    elif margin_ref == "last":
        n_ref = n[-1]
    else:
        raise ValueError(f"margin_ref must be 'min' or 'last', got {margin_ref!r}")
    return _out(K * (n_ref / n) ** tau, dtype)


def log_prior(class_counts, dtype=torch.float32) -> torch.Tensor:
    """``log(n_j / sum n)``: the offset of balanced softmax (Ren et al. 2020) and, times ``tau``, of logit
    adjustment (Menon et al. 2021)."""
    n = as_class_counts(class_counts)
    return _out(np.log(n / n.sum()), dtype)


def class_balanced_weights(class_counts, beta: float = 0.9999, dtype=torch.float32) -> torch.Tensor:
    """Class-balanced weights ``(1 - beta) / (1 - beta^n_y)`` normalised to sum to C (Cui et al. 2019).
    ``beta = 0`` gives all ones."""
    n = as_class_counts(class_counts)
    beta = _finite("beta", beta)
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    w = (1.0 - beta) / (1.0 - np.power(beta, n))
    return _out(w * (n.size / w.sum()), dtype)


def drw_weights(
    class_counts, epoch: int, betas: Sequence[float] = (0.0, 0.9999), step: int = 160, dtype=torch.float32
) -> torch.Tensor:
    """Deferred re-weighting (LDAM-DRW): class-balanced weights with ``beta = betas[epoch // step]``
    (the last beta once past the table). Every beta is checked, not only the one in force."""
    epoch = _positive_int("epoch", epoch, 0)
    step = _positive_int("step", step, 1, "> 0")
    betas = check_betas(betas)
    beta = betas[min(epoch // step, len(betas) - 1)]
    return class_balanced_weights(class_counts, beta, dtype=dtype)


def marc_weights(class_counts, gamma: float = 1.2, dtype=torch.float32) -> torch.Tensor:
    """MARC's re-weighting ``U_y = C n_y^-gamma / sum_j n_j^-gamma`` (Wang et al., ACML'23)."""
    n = as_class_counts(class_counts)
    gamma = _finite("gamma", gamma)
    u = n**-gamma
    return _out(n.size * u / u.sum(), dtype)


def long_tailed_counts(
    num_classes: int,
    n_max: int,
    imbalance: float,
    profile: str = "exp",
    step_fraction: float = 0.5,
    pareto_alpha: float = 6.0,
) -> torch.Tensor:
    """Per-class counts of a long-tailed data set, head first, with ``n[0] = n_max`` and
    ``n[C-1] = n_max / imbalance`` (rounded down, at least 1).

    * ``"exp"``: ``n_max f^(i / (C-1))``, ``f = 1 / imbalance`` (CIFAR-LT of LDAM);
    * ``"step"``: the first ``step_fraction`` of the classes have ``n_max``, the rest ``n_max f`` (LDAM);
    * ``"pareto"``: ``n_max (1 + k i / (C-1))^-alpha`` with ``k`` set so the tail hits ``n_max f``
      (ImageNet-LT draws its sizes from a Pareto law with alpha 6).
    Returns an int64 tensor."""
    num_classes = _positive_int("num_classes", num_classes, 2)
    n_max = _positive_int("n_max", n_max, 1)
    imbalance = _finite("imbalance", imbalance)
    if imbalance < 1:
        raise ValueError(f"imbalance must be >= 1, got {imbalance}")
    f = 1.0 / imbalance
    i = np.arange(num_classes, dtype=np.float64)
    if profile == "exp":
        n = n_max * f ** (i / (num_classes - 1))
    elif profile == "step":
        step_fraction = _finite("step_fraction", step_fraction)
        if not 0.0 < step_fraction < 1.0:
            raise ValueError(f"step_fraction must be in (0, 1), got {step_fraction}")
        n = np.where(i < round(step_fraction * num_classes), float(n_max), n_max * f)
    elif profile == "pareto":
        pareto_alpha = _finite("pareto_alpha", pareto_alpha)
        if pareto_alpha <= 0:
            raise ValueError(f"pareto_alpha must be > 0, got {pareto_alpha}")
        k = f ** (-1.0 / pareto_alpha) - 1.0
        n = n_max * (1.0 + k * i / (num_classes - 1)) ** -pareto_alpha
    else:
        raise ValueError(f"profile must be 'exp', 'step' or 'pareto', got {profile!r}")
    return torch.as_tensor(np.maximum(np.floor(n + 1e-9), 1.0), dtype=torch.int64)
