"""Shared pieces of the Triton row kernels: the target margin ``psi`` and its derivative, the
online-logsumexp merge, and the launch configuration (block size and warps chosen from ``C``).

The angular margin (ArcFace, Deng et al. CVPR 2019; DBM, AAAI'25) is ``psi(c, M) = cos(acos(c') + M)``
with ``c' = clamp(c, -1 + 1e-7, 1 - 1e-7)`` (docs/loss.md section 3). Triton has no ``acos`` the interpreter
can run (``libdevice.acos`` is an extern call, which ``TRITON_INTERPRET=1`` does not support), and none
is needed: with ``theta = acos(c')``, ``cos(theta) = c'`` and ``sin(theta) = sqrt((1 - c')(1 + c'))``
exactly, so the angle-addition formulas give

    cos(theta + M) = c' cos M - sin(theta) sin M,    sin(theta + M) = sin(theta) cos M + c' sin M,

the same function with one ``sqrt`` and one ``cos``/``sin`` of the (per-row) margin instead of
``acos``, ``cos`` and ``sin``; all in fp32, and no acos approximation error to carry.
``(1 - c')(1 + c')`` keeps ``sin(theta)`` accurate to a few ulps near ``c' = +-1``, where ``1 - c'^2``
would cancel.
"""

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl

from fused_margin.core.spec import ACOS_CLAMP

ACOS_LO = tl.constexpr(-1.0 + ACOS_CLAMP)
ACOS_HI = tl.constexpr(1.0 - ACOS_CLAMP)

# the integer codes of MarginLossSpec.margin_code / fold_code
MARGIN_ADDITIVE_COSINE = tl.constexpr(0)
FOLD_THRESHOLD = tl.constexpr(1)
FOLD_EASY = tl.constexpr(2)


@triton.jit
def target_margin(
    c, margin, dmargin_dc, scale, MARGIN_TYPE: tl.constexpr, FOLD: tl.constexpr, STRAIGHT_THROUGH: tl.constexpr
):
    """``(s psi(c, M), s dpsi/dc)`` for the target score ``c`` with margin ``M`` and ``dM/dc``
    (the DBM instance-margin path), all fp32 (docs/loss.md section 3, tests/helpers/row_torch.py).

    additive_cosine (CosFace, LDAM, ELM): ``psi = c - M``, ``dpsi/dc = 1 - dM/dc``.
    additive_angular: ``psi = cos(theta + M)``, ``dpsi/dc = sin(theta + M) / sin(theta)`` where ``c`` is
    inside the clamp (0 outside) ``- sin(theta + M) dM/dc``; fold threshold (``c <= cos(pi - M)``):
    ``psi = c - M sin M``, ``dpsi/dc = 1 - (sin M + M cos M) dM/dc``; fold easy (``c <= 0``): ``psi = c``,
    ``dpsi/dc = 1``. straight_through: ``dpsi/dc = 1``.
    """
    if MARGIN_TYPE == MARGIN_ADDITIVE_COSINE:
        value = c - margin
        grad = 1.0 - dmargin_dc
    else:
        clamped = tl.clamp(c, ACOS_LO, ACOS_HI, propagate_nan=tl.PropagateNan.ALL)
        inside = (c >= ACOS_LO) & (c <= ACOS_HI)
        sin_theta = tl.sqrt_rn((1.0 - clamped) * (1.0 + clamped))
        cos_m = tl.cos(margin)
        sin_m = tl.sin(margin)
        value = clamped * cos_m - sin_theta * sin_m
        sin_shift = sin_theta * cos_m + clamped * sin_m
        grad = tl.where(inside, sin_shift / sin_theta, 0.0) - sin_shift * dmargin_dc
        if FOLD == FOLD_THRESHOLD:
            folded = c <= -cos_m  # cos(pi - M)
            value = tl.where(folded, c - margin * sin_m, value)
            grad = tl.where(folded, 1.0 - (sin_m + margin * cos_m) * dmargin_dc, grad)
        elif FOLD == FOLD_EASY:
            folded = c <= 0.0
            value = tl.where(folded, c, value)
            grad = tl.where(folded, 1.0, grad)
    if STRAIGHT_THROUGH:
        grad = 1.0
    return scale * value, scale * grad


@triton.jit
def load_scaled_scores(
    raw_ptr,
    offsets,
    mask,
    raw_mask,
    row_scale,
    col_scale_ptr,
    col_shift_ptr,
    cols,
    HAS_COL_SCALE: tl.constexpr,
    HAS_COL_SHIFT: tl.constexpr,
):
    """``z' = raw * row_scale * col_scale + col_shift`` in fp32 (the row-kernel contract of
    ``fused_margin.paths.fused``); lanes outside ``mask`` hold garbage, for the caller to mask. ``raw`` is read
    under ``raw_mask`` (columns below :func:`io_columns`: with a padded class stride, the padding too, so
    that the mask is constant over 16 columns and the load vectorises), the C-sized tables under ``mask``.
    ``offsets`` are int64 (``cols * stride`` overflows int32 on a transposed ``raw`` once B C > 2^31)."""
    z = tl.load(raw_ptr + offsets, mask=raw_mask, other=0.0).to(tl.float32) * row_scale
    if HAS_COL_SCALE:
        z = z * tl.load(col_scale_ptr + cols, mask=mask, other=1.0).to(tl.float32)
    if HAS_COL_SHIFT:
        z = z + tl.load(col_shift_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return z


@triton.jit
def online_max(run_max, block_max):
    """The running maximum of an online logsumexp and the shift to subtract before ``exp``: the new
    maximum where it is finite, else 0 (torch.logsumexp's rule): while every logit so far is -inf
    (``exp(-inf - 0)`` is 0, not NaN) and once one is +inf (``exp(inf - 0)`` is inf, so ``lse`` is +inf as
    ``torch.logsumexp`` gives, not ``exp(inf - inf)`` = NaN)."""
    new_max = tl.maximum(run_max, block_max)
    return new_max, tl.where(tl.abs(new_max) < float("inf"), new_max, 0.0)


@triton.jit
def log1p(x):
    """``log(1 + x)`` for ``x >= 0`` in fp32 to a few ulp (``tl.log`` of ``1 + x`` would lose all of a
    small ``x``): below 0.5, ``2 atanh(r) = 2 (r + r^3/3 + ... + r^11/11)`` with ``r = x / (2 + x)``
    (``r <= 0.2``, the next term is below 1e-9 relative); from 0.5 on, ``log(1 + x)``. NaN and +inf
    pass through."""
    small = x < 0.5
    xs = tl.where(small, x, 0.0)
    r = tl.div_rn(xs, 2.0 + xs)
    r2 = r * r
    poly = 1.0 / 11.0
    poly = poly * r2 + 1.0 / 9.0
    poly = poly * r2 + 1.0 / 7.0
    poly = poly * r2 + 1.0 / 5.0
    poly = poly * r2 + 1.0 / 3.0
    series = 2.0 * (r + r * (r2 * poly))
    return tl.where(small, series, tl.log(1.0 + x))


@triton.jit
def expm1(x):
    """``exp(x) - 1`` in fp32 to a few ulp: for ``|x| < 0.5`` the Taylor series to ``x^9 / 9!`` (the next
    term is below 1e-9 relative), else ``exp(x) - 1`` (no cancellation there: ``|expm1(x)| > 0.39``).
    ``expm1(-inf) = -1``; NaN passes through."""
    small = tl.abs(x) < 0.5
    xs = tl.where(small, x, 0.0)
    poly = 1.0 / 362880.0
    poly = poly * xs + 1.0 / 40320.0
    poly = poly * xs + 1.0 / 5040.0
    poly = poly * xs + 1.0 / 720.0
    poly = poly * xs + 1.0 / 120.0
    poly = poly * xs + 1.0 / 24.0
    poly = poly * xs + 1.0 / 6.0
    poly = poly * xs + 0.5
    series = xs + xs * (xs * poly)
    return tl.where(small, series, tl.exp(x) - 1.0)


@triton.jit
def block_logits(
    raw,
    row_scale,
    col_scale,
    col_shift_ptr,
    offset_ptr,
    pair_ptrs,
    cols,
    mask,
    scale,
    HAS_COL_SCALE: tl.constexpr,
    HAS_COL_SHIFT: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    HAS_PAIR: tl.constexpr,
):
    """``l = s (raw row_scale col_scale + col_shift) + a + P`` in fp32 on one block of a row, from ``raw``
    already loaded in fp32 (0 outside ``mask``) and the block's ``col_scale``; ``pair_ptrs`` point at the
    block's pair perturbation. The gradient's logits, in the backward kernel and in the forward that forms
    the gradient (the forward's own loop takes ``z'`` from :func:`load_scaled_scores`, the same expression)."""
    z = raw * row_scale
    if HAS_COL_SCALE:
        z = z * col_scale
    if HAS_COL_SHIFT:
        z = z + tl.load(col_shift_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    logits = scale * z
    if HAS_OFFSET:
        logits += tl.load(offset_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_PAIR:
        logits += tl.load(pair_ptrs, mask=mask, other=0.0).to(tl.float32)
    return logits


@triton.jit
def logit_grad(
    logits,
    is_target,
    keep,
    lse,
    nll,
    target_grad,
    weight,
    weight_y,
    weight_sum,
    g,
    scale,
    label_smoothing,
    num_classes,
    SMOOTHING: tl.constexpr,
):
    """``G = dL/dz'`` on one block of a row from the row's statistics (the row-kernel contract of
    ``fused_margin.paths.fused``): with ``p_j = exp(l_j - lse)`` and the upstream gradient ``g`` of the loss row,
    ``dl_j = g ((1 - eps) w_y p_j + eps / C (W p_j - w_j))`` and ``G_j = s dl_j`` off the target;
    ``dl_y = g ((1 - eps) w_y expm1(-nll) + eps / C ((W - w_y) + W expm1(-nll)))`` (``p_y - 1`` from the
    precise ``nll``) and ``G_y = target_grad dl_y`` on it; 0 outside ``keep``. Returns ``(G, dl_y, G_y)``.
    The one expression of both the backward kernel and the forward that forms the gradient, so the two
    agree bit for bit."""
    prob = tl.exp(logits - lse)
    p_y_minus_1 = expm1(-nll)
    dlogit = (1.0 - label_smoothing) * weight_y * prob
    dlogit_y = (1.0 - label_smoothing) * weight_y * p_y_minus_1
    if SMOOTHING:
        dlogit += label_smoothing / num_classes * (weight_sum * prob - weight)
        dlogit_y += label_smoothing / num_classes * ((weight_sum - weight_y) + weight_sum * p_y_minus_1)
    dl_y = dlogit_y * g
    grad_y = dl_y * target_grad
    grad = tl.where(is_target, grad_y, dlogit * g * scale)
    return tl.where(keep, grad, 0.0), dl_y, grad_y


@triton.jit
def scalar_mask(condition):
    """A scalar condition as a mask to combine with block masks (``block_mask & scalar_mask(c)``), the same
    value and, once compiled, the same code (``select(c, true, false)`` folds to ``c``). Triton 3.9's
    interpreter keeps a scalar comparison with its operands' integer type, so ``block_mask & (i < n)``
    becomes an int32 block that it refuses as a load or store mask ("mask has unsupported dtype");
    through ``tl.where`` the scalar is a proper boolean."""
    return tl.where(condition, True, False)


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """fp32 ``x`` cast to ``DTYPE`` with round-to-nearest-even. For bfloat16 the rounding is done on the
    fp32 bits first (``bits + 0x7FFF + lsb``, then drop the low half), so the cast itself is exact:
    the GPU's ``cvt.rn.bf16.f32`` gives the same result, and Triton 3.6's interpreter, whose fp32 ->
    bf16 cast truncates, then agrees with it. NaN becomes the quiet NaN ``0x7FC00000`` first: the
    rounding add would carry a NaN such as ``0x7FFFFFFF`` or ``0xFFFFFFFF`` out of its exponent (to
    -0.0 / +0.0), and truncating ``0x7F800001`` would give inf."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        bits = tl.where(x != x, 0x7FC00000, bits).to(tl.uint32)
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


# ---------------------------------------------------------------------------------------------------
# launch configuration

_max_block = None


@contextlib.contextmanager
def max_block(limit: int):
    """Cap the column block of both row kernels (a power of two), e.g. to exercise the loop over
    column blocks on small ``C`` in tests: ``with max_block(8): ...``."""
    global _max_block
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1 or limit & (limit - 1):
        raise ValueError(f"limit must be a positive power of two, got {limit!r}")
    previous, _max_block = _max_block, limit
    try:
        yield
    finally:
        _max_block = previous


def block_config(num_classes: int, cap: int):
    """``(BLOCK, num_warps)``: the next power of two of ``C`` up to ``cap`` (or the :func:`max_block`
    limit), one warp per 256 elements (8 a thread), between 1 and 8 warps. Compiled for sm_90, the
    forward at 2048 x 8 warps takes 80 registers a thread, no spills (4096 x 16 warps: 106, one
    program per SM); the backward at 1024 x 4 warps, 46."""
    block = min(triton.next_power_of_2(num_classes), cap)
    if _max_block is not None:
        block = min(block, _max_block)
    return block, max(1, min(8, block // 256))


#: keyword arguments of every launch: no contraction of ``a * b + c`` into FMAs, so ``z'`` and the logits
#: round as eager torch's separate ops and as the C++ (``-ffp-contract=off``) and CUDA (``--fmad=false``)
#: kernels (the interpreter ignores it: NumPy does not contract)
LAUNCH_OPTIONS = dict(enable_fp_fusion=False)


def launch_device(tensor: torch.Tensor):
    """The context to launch on ``tensor``'s GPU (Triton launches on the current device)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def or_dummy(value: Optional[torch.Tensor], dummy: torch.Tensor) -> torch.Tensor:
    """``value`` made contiguous, or ``dummy`` for an absent table (its kernel flag is then off and the
    pointer is never read)."""
    return dummy if value is None else value.contiguous()


def check_labels(first_bad: torch.Tensor, target: torch.Tensor, rows: int, num_classes: int, ignore_index: int):
    """Report a label out of range found by a kernel (``first_bad``: the first such row, ``rows`` when
    none): a ``ValueError`` naming the row on CPU tensors (the interpreter: the host reads it for free),
    an asynchronous device assertion on CUDA (no host sync, as ``F.cross_entropy``)."""
    message = f"labels must be in [0, {num_classes}) or equal ignore_index ({ignore_index})"
    if first_bad.device.type == "cpu":
        i = int(first_bad)
        if i < rows:
            raise ValueError(f"target[{i}] = {int(target[i])} is out of range: {message}")
    else:
        torch._assert_async(first_bad == rows, f"fused_margin: target has a label out of range: {message}")


def io_columns(raw: torch.Tensor) -> int:
    """The columns a row kernel may read (and, for the gradient, write) in each row of ``raw``: C rounded up
    to ``fused.CLASS_ALIGN`` when raw's rows are padded that far (the fused path's GEMM output; the
    backward's gradient then has the same stride), else C. A bound divisible by 16 lets Triton prove the
    masks constant over 16 columns, so the loads and stores vectorise (tests/backends/test_triton.py, the sm_90
    compile)."""
    from fused_margin.paths.fused import padded_classes

    cols = raw.shape[1]
    padded = padded_classes(cols)
    return padded if raw.dim() == 2 and raw.stride(1) == 1 and raw.stride(0) >= padded else cols
