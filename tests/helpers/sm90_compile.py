"""Compile every Triton kernel of fused_margin ahead of time for sm_90, without a GPU.

Run by tests/backends/test_triton.py::test_kernels_compile_for_sm90 in a fresh interpreter without
``TRITON_INTERPRET`` (``python tests/helpers/sm90_compile.py``). The interpreter runs kernels as Python and so
cannot see what only the GPU compiler rejects (types of loop-carried values, scalar masks, casts); this
script takes each kernel through Triton's frontend, LLVM and the bundled ptxas to an sm_90 cubin, with
scalar arguments typed as a launch passes them (Python ints as i32, floats as fp32), in fp32, bf16 and fp16
and with the optional tables on and off. It checks:

* coverage: every ``@triton.jit`` function of the package is a kernel compiled here or a helper that such
  a kernel calls (directly or through another helper);
* the launches' floating-point rule (``LAUNCH_OPTIONS``: no FMA contraction): no ``fma.rn.f32`` in any
  kernel's PTX (libdevice's own ``fma.rn.ftz.f32`` in ``log``/``cos``/``sin`` is not a contraction);
* vector access: on the fused path's tensors the row kernels move ``raw`` and ``dL/draw`` in 16-byte
  vectors;

and prints each compiled variant's registers and spills (``ptxas -v``).
"""

import importlib
import inspect
import pkgutil
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource, compile
from triton.runtime.jit import JITFunction

import fused_margin.backends.triton as package
from fused_margin.backends.triton._common import LAUNCH_OPTIONS
from fused_margin.backends.triton.class_block import _block_grad_kernel, _block_partials_kernel
from fused_margin.backends.triton.norms import _project_out_kernel, _row_norms_kernel
from fused_margin.backends.triton.row_backward import _backward_sums_kernel, _row_backward_kernel
from fused_margin.backends.triton.row_forward import _reduce_rows_kernel, _row_forward_kernel

TARGET = GPUTarget("cuda", 90, 32)

# scalar and integer-pointer arguments as a launch passes them; any other name is an fp32 pointer unless a
# build names its type
SCALARS = dict(
    num_classes="i32",
    scale="fp32",
    lambda_inst="fp32",
    lambda_elm="fp32",
    label_smoothing="fp32",
    ignore_index="i32",
    stride_raw_row="i32",
    stride_raw_col="i32",
    stride_pair_row="i32",
    stride_pair_col="i32",
    rows="i32",
    cols="i32",
    col_blocks="i32",
    row_blocks="i32",
    row_programs="i32",
    eps="fp32",
    stride_row="i32",
    stride_col="i32",
    stride_grad_row="i32",
    io_cols="i32",
    grad_stride="i32",
    v_stride="i32",
    stride_raw="i32",
    stride_out="i32",
    c0="i32",
    col0="i32",
    width="i32",
    target_ptr="*i64",
    pred_ptr="*i64",
    hard_ptr="*i1",
    first_bad_ptr="*i64",
    zarg_ptr="*i64",
    warg_ptr="*i64",
    hasy_ptr="*i8",
)

FLAGS = ("HAS_ROW_SCALE", "HAS_COL_SCALE", "HAS_COL_SHIFT", "HAS_MARGINS", "HAS_OFFSET", "HAS_PAIR", "HAS_WEIGHT")
BLOCK_FLAGS = tuple(f for f in FLAGS if f != "HAS_MARGINS")

compiled_kernels = set()
report = []


def signature_of(kernel, pointers, constants):
    return {n: "constexpr" if n in constants else pointers.get(n, SCALARS.get(n, "*fp32")) for n in kernel.arg_names}


def registers(cubin_ptx):
    """``(registers, spill store bytes, spill load bytes)`` from ptxas -v on the PTX."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(cubin_ptx)
        f.flush()
        log = subprocess.run(
            [get_ptxas(90).path, "-v", "--gpu-name=sm_90a", f.name, "-o", "/dev/null"],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    stores, loads = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups())
    return regs, stores, loads


def build(kernel, pointers, constants, num_warps, label, attrs=None, **options):
    """Compile one variant; returns its PTX. With the launches' options the PTX must hold no contracted
    ``fma.rn.f32``."""
    names = kernel.arg_names
    signature = signature_of(kernel, pointers, constants)
    source = ASTSource(kernel, signature, {(names.index(k),): v for k, v in constants.items()}, attrs)
    options = dict(LAUNCH_OPTIONS, **options)
    compiled = compile(source, target=TARGET, options=dict(num_warps=num_warps, **options))
    assert compiled.asm["cubin"]
    ptx = compiled.asm["ptx"]
    contracted = ptx.count("fma.rn.f32")
    if options.get("enable_fp_fusion", True):
        return ptx
    assert contracted == 0, f"{kernel.__name__} ({label}): {contracted} contracted fma.rn.f32 with {options}"
    compiled_kernels.add(kernel)
    regs, spill_stores, spill_loads = registers(ptx)
    report.append((kernel.__name__, label, num_warps, regs, spill_stores, spill_loads))
    return ptx


# --- the row path ---------------------------------------------------------------------------------------
for raw, on, margin_type, fold in (("*bf16", True, 1, 1), ("*fp32", False, 1, 0), ("*fp16", True, 0, 0)):
    constants = dict(
        {f: on for f in FLAGS},
        MARGIN_TYPE=margin_type,
        HARD_ALL=not on,
        ELM=on,
        FOLD=fold,
        STRAIGHT_THROUGH=not on,
        SMOOTHING=on,
        BLOCK=2048,
    )
    tables = "all tables" if on else "no tables"
    for grad in (False, True):  # the forward, and the forward that forms the gradient (of the mean with on)
        build(
            _row_forward_kernel,
            {"raw_ptr": raw},
            dict(constants, GRAD=grad, HAS_DENOM=grad and on),
            8,
            f"{raw[1:]} {tables}{', gradient' if grad else ''}",
        )
    build(_row_norms_kernel, {"x_ptr": raw}, dict(ROWS=16, BLOCK=256), 4, raw[1:])
    build(
        _project_out_kernel,
        {"grad_ptr": raw, "v_ptr": raw},
        dict(HAS_SCALE=on, ROWS=16, BLOCK=256),
        4,
        f"{raw[1:]}{' scaled' if on else ''}",
    )
for on in (True, False):
    build(
        _reduce_rows_kernel,
        {},
        dict(LOSS=on, MEAN=on, HAS_WEIGHT=on, BLOCK=1024),
        4,
        "mean weighted" if on else "labels only",
    )
    build(
        _backward_sums_kernel,
        {},
        dict(HAS_ROW_SCALE=on, HAS_COL_SCALE=on, ROW_COEF=True, COL_COEF=on, STATS=True, BLOCK=1024),
        4,
        "all sums" if on else "row sums and stats",
    )
for raw, out, on in (("*bf16", "*bf16", True), ("*fp32", "*fp32", False), ("*fp16", "*fp32", True)):
    for sums in (False, True):
        constants = dict(
            {f: on for f in BLOCK_FLAGS},
            SMOOTHING=on,
            SCALE_GRAD=out == raw,
            SHARED_GRAD=sums,
            HAS_DENOM=sums,
            ROW_DOT=sums,
            COL_SUMS=sums,
            ROWS=16 if sums else 1,
            BLOCK=1024,
        )
        ptx = build(
            _row_backward_kernel,
            {"raw_ptr": raw, "grad_ptr": out},
            constants,
            4,
            f"{raw[1:]} -> {out[1:]}{', sums' if sums else ''}",
        )
        assert "fma." not in ptx, "the backward has an FMA"

# --- the memory-lean path's class-block kernels -----------------------------------------------------------
for raw, out, on in (("*bf16", "*bf16", True), ("*fp32", "*fp32", False), ("*fp16", "*fp16", True)):
    tables = "all tables" if on else "no tables"
    for first in (True, False):
        build(
            _block_partials_kernel,
            {"raw_ptr": raw},
            dict({f: on for f in BLOCK_FLAGS}, FIRST=first, TRACK_WRONG=on, SMOOTHING=on, BLOCK=2048),
            8,
            f"{raw[1:]} {tables}, {'first' if first else 'merging'} chunk",
        )
    build(
        _block_grad_kernel,
        {"raw_ptr": raw, "out_ptr": out},
        dict({f: on for f in BLOCK_FLAGS}, SMOOTHING=on, BLOCK=1024),
        4,
        f"{raw[1:]} {tables}",
    )

# --- coverage: every @triton.jit function of the package is compiled here or called by what is ------------
jitted = {}
for info in pkgutil.iter_modules(package.__path__):
    module = importlib.import_module(f"{package.__name__}.{info.name}")
    for name, value in vars(module).items():
        if isinstance(value, JITFunction) and value.fn.__module__ == module.__name__:
            jitted[name] = value
reached, frontier = set(), [k.__name__ for k in compiled_kernels]
while frontier:
    name = frontier.pop()
    if name in reached:
        continue
    reached.add(name)
    source = inspect.getsource(jitted[name].fn)
    frontier += [n for n in jitted if n not in reached and re.search(rf"\b{n}\(", source)]
missing = sorted(set(jitted) - reached)
assert not missing, (
    f"@triton.jit functions not compiled for sm_90 (add them to tests/helpers/sm90_compile.py): {missing}"
)
kernels = sorted(k.__name__ for k in compiled_kernels)

# --- vector access -----------------------------------------------------------------------------------------
# As a launch on the fused path's tensors specialises them (16-byte aligned pointers, unit column strides and,
# with the class stride padded to 16 elements (fused.CLASS_ALIGN), row strides and the load bound io_cols
# divisible by 16), the row kernels move raw and dL/draw in 16-byte vectors (ld/st.global.v4) at any C, e.g.
# 8142; without the padding (8142 everywhere) the bf16 backward falls back to 2-byte accesses.


def global_io(kernel, pointers, constants, num_warps, padded):
    names = kernel.arg_names
    constants = dict(constants, stride_raw_col=1, stride_pair_col=1)
    signature = signature_of(kernel, pointers, constants)
    hinted = ("stride_raw_row", "stride_pair_row", "stride_grad_row", "io_cols") if padded else ()
    attrs = {
        (i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if signature[n].startswith("*") or n in hinted
    }
    source = ASTSource(kernel, signature, {(names.index(k),): v for k, v in constants.items()}, attrs)
    ptx = compile(source, target=TARGET, options=dict(num_warps=num_warps, **LAUNCH_OPTIONS)).asm["ptx"]
    return set(re.findall(r"(?:ld|st)\.global(?:\.nc)?\.(?:v\d\.)?b\d+", ptx))


fwd = dict(
    {f: False for f in FLAGS},
    MARGIN_TYPE=1,
    HARD_ALL=False,
    ELM=False,
    FOLD=0,
    STRAIGHT_THROUGH=False,
    SMOOTHING=False,
    GRAD=False,
    HAS_DENOM=False,
    BLOCK=2048,
)
bwd = dict(
    {f: True for f in BLOCK_FLAGS},
    HAS_PAIR=False,
    SMOOTHING=False,
    SCALE_GRAD=True,
    SHARED_GRAD=True,
    HAS_DENOM=True,
    ROW_DOT=True,
    COL_SUMS=True,
    ROWS=16,
    BLOCK=1024,
)
io = global_io(_row_forward_kernel, {"raw_ptr": "*bf16"}, fwd, 8, True)
assert "ld.global.v4.b32" in io, io  # raw, 8 bf16 a load (the one 2-byte load left is the target's score)
io = global_io(
    _row_forward_kernel,
    {"raw_ptr": "*bf16"},
    dict(fwd, GRAD=True, HAS_DENOM=True, HAS_ROW_SCALE=True, HAS_COL_SCALE=True),
    8,
    True,
)
assert {"ld.global.v4.b32", "st.global.v4.b32"} <= io and "st.global.b16" not in io, io  # dL/draw over raw
io = global_io(_row_backward_kernel, {"raw_ptr": "*bf16", "grad_ptr": "*bf16"}, bwd, 4, True)
assert {"ld.global.v4.b32", "st.global.v4.b32"} <= io and not {"ld.global.b16", "st.global.b16"} & io, io
io = global_io(_row_backward_kernel, {"raw_ptr": "*bf16", "grad_ptr": "*bf16"}, bwd, 4, False)
assert {"ld.global.b16", "st.global.b16"} <= io, io

# the no-contraction check can fail: with the default fusion the same kernel contracts
assert LAUNCH_OPTIONS == dict(enable_fp_fusion=False)
fused = build(
    _row_backward_kernel,
    {"raw_ptr": "*fp32", "grad_ptr": "*fp32"},
    dict(
        {f: True for f in BLOCK_FLAGS},
        SMOOTHING=True,
        SCALE_GRAD=True,
        SHARED_GRAD=False,
        HAS_DENOM=False,
        ROW_DOT=False,
        COL_SUMS=False,
        ROWS=1,
        BLOCK=1024,
    ),
    4,
    "default fusion",
    enable_fp_fusion=True,
)
assert fused.count("fma.rn.f32") > 0

width = max(len(r[0]) + len(r[1]) + 3 for r in report)
print(
    f"Triton {triton.__version__}, sm_90: {len(report)} variants of {len(kernels)} kernels "
    f"({', '.join(kernels)}), {len(jitted) - len(kernels)} helpers reached"
)
print(f"{'kernel (variant)':<{width}} warps registers spill-stores spill-loads")
for name, label, warps, regs, stores, loads in report:
    print(f"{f'{name} ({label})':<{width}} {warps:>5} {regs:>9} {stores:>12} {loads:>11}")
print("sm90 compile ok")
sys.exit(0)
