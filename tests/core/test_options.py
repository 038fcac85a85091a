"""The option registry (fused_margin/core/options.py): one entry per scalar option, from which the spec, the
keyword checks, the docstrings and the kernels' argument packing derive."""

import dataclasses
import inspect
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import fused_margin as fm
from fused_margin.core import options
from fused_margin.core.spec import ROW_BACKWARD_ARGS, ROW_FORWARD_ARGS, MarginLossSpec

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_generated_header_is_current():
    """backends/csrc/options.h is what the registry generates (regenerate: python
    scripts/generate_options_header.py)."""
    with open(options.header_path()) as f:
        assert f.read() == options.cpp_header()


def test_the_spec_has_one_field_per_option_with_its_default():
    fields = {f.name: f.default for f in dataclasses.fields(MarginLossSpec)}
    assert fields == {"head": "logits", **{o.name: o.default for o in options.OPTIONS}}
    for option in options.OPTIONS:
        assert f"{option.name}: {option.doc}"[:60] in " ".join(MarginLossSpec.__doc__.split())


@pytest.mark.parametrize("entry", [fm.margin_cross_entropy])
def test_the_entry_points_take_every_option_and_document_it(entry):
    parameters = inspect.signature(entry).parameters
    for option in options.OPTIONS:
        assert parameters[option.name].kind is inspect.Parameter.KEYWORD_ONLY
        assert parameters[option.name].default == option.default
        assert f"{option.name}: " in entry.__doc__
    assert "{options}" not in entry.__doc__
    assert set(o.name for o in options.OPTIONS) <= fm.functional.OPTION_NAMES


def test_an_unknown_option_is_named():
    x, y = torch.randn(2, 3), torch.tensor([0, 1])
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['lable_smoothing'\]; its options are"):
        fm.margin_cross_entropy(x, y, lable_smoothing=0.1)
    with pytest.raises(TypeError, match="unknown option"):
        fm.LDAMLoss([10, 5, 2], lable_smoothing=0.1)


@pytest.mark.parametrize(
    "name, value, error, message",
    [
        ("scale", -1.0, ValueError, "scale must be > 0, got -1.0"),
        ("scale", float("nan"), ValueError, "scale must be finite"),
        ("scale", "30", TypeError, "scale must be a real number"),
        ("scale", True, TypeError, "scale must be a real number"),
        ("lambda_inst", -0.5, ValueError, "lambda_inst must be >= 0"),
        ("label_smoothing", 1.5, ValueError, r"label_smoothing must be in \[0, 1\]"),
        ("ignore_index", 1.5, TypeError, "ignore_index must be an int"),
        ("ignore_index", 2**63, ValueError, "ignore_index must fit in int64"),
        ("margin_type", "arc", ValueError, "margin_type must be one of"),
        ("reduction", "avg", ValueError, "reduction must be one of"),
        ("input_is_cosine", 1, TypeError, "input_is_cosine must be a bool"),
    ],
)
def test_each_option_is_checked_by_its_entry(name, value, error, message):
    with pytest.raises(error, match=message):
        MarginLossSpec(**{name: value})


def test_options_take_numpy_and_0d_tensor_scalars():
    spec = MarginLossSpec(scale=np.float32(30.0), ignore_index=torch.tensor(-1), input_is_cosine=np.bool_(True))
    assert (spec.scale, spec.ignore_index, spec.input_is_cosine) == (30.0, -1, True)
    assert type(spec.scale) is float and type(spec.ignore_index) is int and type(spec.input_is_cosine) is bool


def test_pack_unpack_and_decode_round_trip():
    spec = MarginLossSpec(
        head="cosine",
        scale=16.0,
        margin_type="additive_angular",
        lambda_inst=0.5,
        hard_mode="all",
        lambda_elm=0.25,
        angular_fold="threshold",
        margin_grad="straight_through",
        label_smoothing=0.1,
        ignore_index=-3,
        reduction="sum",
    )
    floats, ints = spec.kernel_options()
    assert len(floats) == len(options.KERNEL_FLOATS) and len(ints) == len(options.KERNEL_INTS)
    assert options.decode(floats, ints) == {o.name: getattr(spec, o.name) for o in options.OPTIONS if o.kernel}
    assert options.vectors(**options.unpack(floats, ints)) == (floats, ints)
    sizes = f"{len(options.KERNEL_FLOATS)} float and {len(options.KERNEL_INTS)} int"
    with pytest.raises(ValueError, match=f"the row ops take {sizes} options"):
        options.unpack(floats[:-1], ints)
    with pytest.raises(TypeError, match=r"unknown kernel options \['margin'\]"):
        options.vectors(margin=1)
    read_back = options.unpack(floats, ints)
    assert read_back.scale == 16.0 and read_back["ignore_index"] == -3
    with pytest.raises(AttributeError, match="no kernel option 'margin'"):
        _ = read_back.margin


def test_the_encoders_are_python_functions_or_number_types():
    """The packing runs under torch.compile (the autograd function's forward): an encoder that is a builtin
    bound method, such as ``codes.__getitem__``, is a graph break TorchDynamo 2.11 refuses in fullgraph."""
    for option in options.OPTIONS:
        if option.kernel is not None:
            encode = option.kernel.encode
            assert encode in (float, int) or inspect.isfunction(encode), (option.name, encode)


def test_triton_arguments_per_kernel():
    values = options.unpack(*MarginLossSpec(scale=2.0, hard_mode="all", label_smoothing=0.2).kernel_options())
    forward = options.triton_arguments(values, "forward")
    backward = options.triton_arguments(values, "backward")
    defaults = options.triton_arguments(options.unpack(*options.vectors()), "forward")
    assert forward == dict(
        defaults,  # every option not named here at its default
        scale=2.0,
        MARGIN_TYPE=0,
        lambda_inst=0.0,
        HARD_ALL=True,
        lambda_elm=0.0,
        FOLD=0,
        STRAIGHT_THROUGH=False,
        label_smoothing=0.2,
        ignore_index=-100,
    )
    defaults = options.triton_arguments(options.unpack(*options.vectors()), "backward")
    assert backward == dict(defaults, scale=2.0, label_smoothing=0.2, ignore_index=-100)


def test_the_c_header_names_every_kernel_option_and_slot():
    header = options.cpp_header()
    for i, arg in enumerate(options.KERNEL_FLOATS):
        assert f"{arg.c_type} {arg.name};" in header and f"= {i}" in header
    for arg in options.KERNEL_INTS:
        assert f"{arg.c_type} {arg.name};" in header
    assert "kNumRowTables = 7" in header and 'kMarginTypeNames[] = {{"additive_cosine", 0}' in header


_DUMMY = """
    Option("margin_offset", "real", 0.0, "a constant added to every target margin.",
           kernel=KernelArg("margin_offset", "float", "float", float, triton="margin_offset")),
"""

_CHECK_DUMMY = r"""
import dataclasses, inspect
import fused_margin as fm
from fused_margin.core import options, spec
assert "margin_offset" in {f.name for f in dataclasses.fields(spec.MarginLossSpec)}
s = spec.MarginLossSpec(margin_offset=0.25)
floats, ints = s.kernel_options()
assert options.unpack(floats, ints)["margin_offset"] == 0.25
assert options.triton_arguments(options.unpack(floats, ints), "forward")["margin_offset"] == 0.25
assert "float margin_offset;" in options.cpp_header() and "kMarginOffset" in options.cpp_header()
assert inspect.signature(fm.margin_cross_entropy).parameters["margin_offset"].default == 0.0
assert "margin_offset: a constant added to every target margin." in fm.margin_cross_entropy.__doc__
assert "margin_offset" in fm.functional.OPTION_NAMES
try:
    spec.MarginLossSpec(margin_offset=float("nan"))
except ValueError as error:
    assert "margin_offset must be finite" in str(error)
else:
    raise AssertionError("a NaN option was taken")
print(spec.ROW_FORWARD_ARGS, spec.ROW_BACKWARD_ARGS)
"""


def test_a_new_option_changes_the_registry_and_no_schema(tmp_path):
    """Adding an option is one entry in the registry: a copy of the package with a dummy option added to
    OPTIONS (and nothing else) has it in the spec, the entry points' signatures, docstrings and keyword
    checks, the kernel vectors, the Triton arguments and the C++ header, while the row ops' schemas stay as
    they are. Its math then goes where the loss uses it (CONTRIBUTING.md)."""
    package = tmp_path / "fused_margin"
    shutil.copytree(
        os.path.join(ROOT, "fused_margin"), package, ignore=shutil.ignore_patterns("*.so", "__pycache__", "csrc")
    )
    registry = package / "core" / "options.py"
    text = registry.read_text()
    anchor = "OPTIONS: Tuple[Option, ...] = (\n"
    assert text.count(anchor) == 1
    registry.write_text(text.replace(anchor, anchor + _DUMMY.strip("\n") + "\n"))
    env = dict(os.environ, PYTHONPATH=str(tmp_path), FUSED_MARGIN_NO_EXT="1")
    result = subprocess.run(
        [sys.executable, "-c", _CHECK_DUMMY], capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f"{ROW_FORWARD_ARGS} {ROW_BACKWARD_ARGS}"


def test_the_switches_are_one_documented_config():
    from fused_margin.config import CONFIG

    assert (CONFIG.grad_in_forward, CONFIG.sync_checks) == (True, False)
    with fm.config(grad_in_forward=False) as current:
        assert current.grad_in_forward is False and CONFIG.grad_in_forward is False
    assert CONFIG.grad_in_forward is True
    with pytest.raises(TypeError, match=r"unknown fused_margin switch\(es\) \['grad_in_fwd'\]"):
        fm.configure(grad_in_fwd=False)
    with pytest.raises(TypeError, match="sync_checks must be a bool"):
        fm.configure(sync_checks=1)
    fm.set_sync_label_check(True)
    try:
        assert CONFIG.sync_checks is True
    finally:
        fm.configure(sync_checks=False)
