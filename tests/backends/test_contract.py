"""One definition of the row-kernel contract: the names and order of the row ops' arguments are tabled in
:mod:`fused_margin.core.spec` (``ROW_FORWARD_ARGS``, ``ROW_BACKWARD_ARGS``), the options' slots and the codes of
the choice options in :mod:`fused_margin.core.options`; these tests fail when another statement of them
disagrees: the C++ op schemas and enums (``fused_margin._C.contract()``, the generated options.h), the eager
contract (``row_torch``), the Triton ops and their constexpr codes, the fake kernels, and the way
:mod:`fused_margin.paths.fused` packs its arguments.
"""

import importlib
import inspect

import pytest
import row_torch
import torch
from kernel_cases import backward_args, forward_args

from fused_margin.backends import extension
from fused_margin.core import options, spec
from fused_margin.core.reference import margin_cross_entropy_reference
from fused_margin.core.spec import (
    COLUMN_STATS,
    FOLD_CODES,
    MARGIN_TYPE_CODES,
    REDUCTION_CODES,
    ROW_BACKWARD_ARGS,
    ROW_BACKWARD_OUTPUTS,
    ROW_FORWARD_ARGS,
    ROW_FORWARD_BACKWARD_ARGS,
    ROW_FORWARD_BACKWARD_OUTPUTS,
    ROW_FORWARD_OUTPUTS,
    LossTables,
    MarginLossSpec,
)
from fused_margin.paths import fused

needs_extension = pytest.mark.skipif(not extension.is_built(), reason="the C++ extension is not built")


def _triton():
    pytest.importorskip("triton")
    from fused_margin.backends import triton as fm_triton
    from fused_margin.backends.triton import _common

    return fm_triton, _common


# ---------------------------------------------------------------------------------------------------
# the codes


def _code(spec_, kernel_name):
    floats, ints = spec_.kernel_options()
    return options.unpack(floats, ints)[kernel_name]


def test_python_codes_are_one_table():
    assert options.BY_NAME["margin_type"].choices == tuple(MARGIN_TYPE_CODES)
    assert options.BY_NAME["angular_fold"].choices == tuple(FOLD_CODES)
    assert sorted(MARGIN_TYPE_CODES.values()) == list(range(len(MARGIN_TYPE_CODES)))
    assert sorted(FOLD_CODES.values()) == list(range(len(FOLD_CODES)))
    for margin_type, code in MARGIN_TYPE_CODES.items():
        head = "cosine" if margin_type == "additive_angular" else "linear"
        assert _code(MarginLossSpec(head=head, margin_type=margin_type), "margin_type") == code
    for fold, code in FOLD_CODES.items():
        assert _code(MarginLossSpec(head="cosine", margin_type="additive_angular", angular_fold=fold), "fold") == code


@needs_extension
def test_cpp_codes_match_the_python_table():
    assert extension.contract() == {"margin_type": MARGIN_TYPE_CODES, "fold": FOLD_CODES, "reduction": REDUCTION_CODES}


@needs_extension
def test_cpp_refuses_an_unknown_code_naming_the_codes():
    raw, target = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"reduction must be 0 \(none\), 1 \(mean\) or 2 \(sum\), got 5"):
        torch.ops.fused_margin.row_forward(*forward_args(raw, target, reduction=5))
    with pytest.raises(
        RuntimeError,
        match=r"margin_type must be 0 \(additive_cosine\) or 1 \(additive_angular\), "
        r"got 2",
    ):
        torch.ops.fused_margin.row_forward(*forward_args(raw, target, margin_type=2))
    with pytest.raises(RuntimeError, match=r"fold must be 0 \(None\), 1 \(threshold\) or 2 \(easy\), got 3"):
        torch.ops.fused_margin.row_forward(*forward_args(raw, target, fold=3))
    floats, ints = options.vectors()
    with pytest.raises(RuntimeError, match=f"the option vectors must hold {len(floats)} floats and {len(ints)} ints"):
        torch.ops.fused_margin.row_forward(raw, target, [None] * 7, floats + [1.0], ints)
    with pytest.raises(RuntimeError, match=r"tables must list 7 entries"):
        torch.ops.fused_margin.row_forward(raw, target, [None] * 6, floats, ints)


def test_triton_constexpr_codes_match_the_python_table():
    _, common = _triton()
    assert common.MARGIN_ADDITIVE_COSINE.value == MARGIN_TYPE_CODES["additive_cosine"]
    assert common.FOLD_THRESHOLD.value == FOLD_CODES["threshold"]
    assert common.FOLD_EASY.value == FOLD_CODES["easy"]


def _kernels():
    kernels = [row_torch.ROW_KERNEL]
    if extension.is_built():
        kernels.append(extension.row_kernel("cpu"))
    try:
        import triton  # noqa: F401
    except ImportError:
        return kernels
    from fused_margin.backends import triton as fm_triton

    if fm_triton.INTERPRETED:
        kernels.append(fm_triton.ROW_KERNEL)
    return kernels


@pytest.mark.parametrize(
    "margin_type,fold",
    [
        ("additive_cosine", None),
        ("additive_angular", None),
        ("additive_angular", "threshold"),
        ("additive_angular", "easy"),
    ],
)
def test_each_code_means_its_option_on_every_kernel(margin_type, fold):
    """The code a kernel receives for an option computes that option: every row kernel (eager contract,
    C++ CPU, Triton under the interpreter) against the float64 reference, on cosines spread over [-1, 1]
    with margins large enough that both folds change rows."""
    g = torch.Generator().manual_seed(5)
    B, C = 16, 7
    cosines = (2 * torch.rand(B, C, generator=g) - 1).clamp(-0.999, 0.999)
    target = torch.randint(0, C, (B,), generator=g)
    margins = 0.6 + 0.8 * torch.rand(C, generator=g)
    loss_spec = MarginLossSpec(
        head="logits", input_is_cosine=True, scale=4.0, margin_type=margin_type, angular_fold=fold, reduction="none"
    )
    tables = LossTables(class_margins=margins)
    want = margin_cross_entropy_reference(
        cosines.double(), target, None, None, loss_spec, LossTables(class_margins=margins.double())
    )[0]
    for kernel in _kernels():
        got = fused.fused_margin_cross_entropy(kernel, cosines, target, None, None, loss_spec, tables)[0]
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=kernel.name)


# ---------------------------------------------------------------------------------------------------
# the arguments


def _parameter_names(fn):
    return tuple(inspect.signature(fn).parameters)


@needs_extension
def test_cpp_op_schemas_match_the_python_table():
    forward = torch.ops.fused_margin.row_forward.default._schema
    backward = torch.ops.fused_margin.row_backward.default._schema
    assert tuple(a.name for a in forward.arguments) == ROW_FORWARD_ARGS
    assert len(forward.returns) == len(ROW_FORWARD_OUTPUTS)
    assert tuple(a.name for a in backward.arguments) == ROW_BACKWARD_ARGS
    assert len(backward.returns) == len(ROW_BACKWARD_OUTPUTS)
    norms = torch.ops.fused_margin.row_norms.default._schema
    assert tuple(a.name for a in norms.arguments) == ("x", "eps") and len(norms.returns) == 3
    both = torch.ops.fused_margin.row_forward_backward.default._schema
    assert tuple(a.name for a in both.arguments) == ROW_FORWARD_BACKWARD_ARGS
    assert len(both.returns) == len(ROW_FORWARD_BACKWARD_OUTPUTS)
    assert both.arguments[0].alias_info is not None and both.arguments[0].alias_info.is_write  # raw: in place


def test_column_stats_match_the_cpp_enum():
    """The rows of the backward's ``stats`` (spec.COLUMN_STATS) are csrc/row_kernel.h's ColumnStat order:
    checked on values, sum_i G_ij (the bias) against sum_i dL/dl_ij (the offset): with ``s = 2`` and no
    target in a column they differ by that factor."""
    raw, target = torch.randn(3, 5), torch.tensor([0, 0, 1])
    fwd = row_torch.row_forward(*forward_args(raw, target, scale=2.0, reduction=0))
    args = backward_args(raw, target, None, fwd[1], fwd[4], fwd[5], torch.ones(3), None, scale=2.0, col_stats=True)
    for kernel in filter(None, (row_torch.ROW_KERNEL, extension.row_kernel("cpu"))):
        stats = dict(zip(COLUMN_STATS, kernel.backward(*args)[3]))
        torch.testing.assert_close(stats["sum_grad"][2:], 2.0 * stats["sum_logit_grad"][2:])
        torch.testing.assert_close(stats["sum_grad_raw"], (kernel.backward(*args)[0] * raw).sum(0))


def test_eager_contract_signatures_match_the_python_table():
    assert _parameter_names(row_torch.row_forward) == ROW_FORWARD_ARGS
    assert _parameter_names(row_torch.row_backward) == ROW_BACKWARD_ARGS


def test_triton_signatures_and_schemas_match_the_python_table():
    _triton()
    row_forward = importlib.import_module("fused_margin.backends.triton.row_forward")
    row_backward = importlib.import_module("fused_margin.backends.triton.row_backward")
    assert _parameter_names(row_forward._row_forward_fake) == ROW_FORWARD_ARGS
    assert _parameter_names(row_backward._row_backward_fake) == ROW_BACKWARD_ARGS
    forward = torch.ops.fused_margin.triton_row_forward.default._schema
    backward = torch.ops.fused_margin.triton_row_backward.default._schema
    assert tuple(a.name for a in forward.arguments) == ROW_FORWARD_ARGS
    assert tuple(a.name for a in backward.arguments) == ROW_BACKWARD_ARGS
    assert _parameter_names(row_forward._row_forward_backward_fake) == ROW_FORWARD_BACKWARD_ARGS
    both = torch.ops.fused_margin.triton_row_forward_backward.default._schema
    assert tuple(a.name for a in both.arguments) == ROW_FORWARD_BACKWARD_ARGS
    assert len(both.returns) == len(ROW_FORWARD_BACKWARD_OUTPUTS)
    assert both.arguments[0].alias_info is not None and both.arguments[0].alias_info.is_write  # raw: in place


def test_packing_by_name():
    values = {name: object() for name in ROW_FORWARD_ARGS}
    packed = spec.row_forward_args(**values)
    assert packed == tuple(values[name] for name in ROW_FORWARD_ARGS)
    with pytest.raises(TypeError, match=r"missing arguments \['ints'\]"):
        spec.row_forward_args(**{k: v for k, v in values.items() if k != "ints"})
    with pytest.raises(TypeError, match=r"unknown arguments \['margin'\]"):
        spec.row_forward_args(**values, margin=1)
    backward = {name: object() for name in ROW_BACKWARD_ARGS}
    assert spec.row_backward_args(**backward) == tuple(backward[name] for name in ROW_BACKWARD_ARGS)
    with pytest.raises(TypeError, match="scale_grad"):
        spec.row_backward_args(**{k: v for k, v in backward.items() if k != "scale_grad"})


def test_kernel_options_name_the_kernels_scalars():
    floats, ints = MarginLossSpec(
        head="cosine",
        margin_type="additive_angular",
        scale=7.0,
        lambda_inst=0.25,
        hard_mode="all",
        lambda_elm=0.5,
        angular_fold="easy",
        margin_grad="straight_through",
        label_smoothing=0.125,
        ignore_index=-7,
    ).kernel_options()
    assert all(type(v) is float for v in floats) and all(type(v) is int for v in ints)
    assert options.unpack(floats, ints) == dict(
        options.unpack(*options.vectors()),  # every option not named here at its default
        scale=7.0,
        margin_type=MARGIN_TYPE_CODES["additive_angular"],
        lambda_inst=0.25,
        hard_all=1,
        lambda_elm=0.5,
        fold=FOLD_CODES["easy"],
        straight_through=1,
        label_smoothing=0.125,
        ignore_index=-7,
        reduction=REDUCTION_CODES["mean"],
    )


def _same(a, b):
    """Both None, or the same values in the same memory (a saved tensor comes back as a new object)."""
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.dtype == b.dtype and a.data_ptr() == b.data_ptr()


def test_fused_passes_each_argument_under_its_name():
    """A spy kernel binds what :mod:`fused_margin.paths.fused` passes to the table's names: every scalar option
    (all different, so a swap of two positions shows) and every table arrives where its name says."""
    g = torch.Generator().manual_seed(3)
    B, C, D = 5, 6, 4
    x = torch.randn(B, D, generator=g, requires_grad=True)
    w = torch.randn(C, D, generator=g, requires_grad=True)
    target = torch.tensor([0, 3, -7, 5, 1])
    tables = LossTables(
        class_margins=0.1 + 0.1 * torch.rand(C, generator=g),
        logit_offset=torch.randn(C, generator=g).requires_grad_(),
        pair_perturbation=0.1 * torch.randn(B, C, generator=g),
        class_weight=0.5 + torch.rand(C, generator=g),
    )
    loss_spec = MarginLossSpec(
        head="cosine",
        margin_type="additive_angular",
        scale=7.0,
        lambda_inst=0.25,
        hard_mode="all",
        lambda_elm=0.5,
        angular_fold="threshold",
        margin_grad="straight_through",
        label_smoothing=0.125,
        ignore_index=-7,
    )
    seen = {}

    def forward(*args):
        assert len(args) == len(ROW_FORWARD_ARGS)
        seen["forward"] = dict(zip(ROW_FORWARD_ARGS, args))
        return row_torch.row_forward(*args)

    def backward(*args):
        assert len(args) == len(ROW_BACKWARD_ARGS)
        seen.setdefault("backward", []).append(dict(zip(ROW_BACKWARD_ARGS, args)))
        return row_torch.row_backward(*args)

    kernel = fused.RowKernel("spy", forward, backward, row_torch.row_norms)
    loss = fused.fused_margin_cross_entropy(kernel, x, target, w, None, loss_spec, tables)[0]
    loss.backward()

    f = seen["forward"]
    assert (f["floats"], f["ints"]) == loss_spec.kernel_options()
    assert options.decode(f["floats"], f["ints"]) == {
        o.name: getattr(loss_spec, o.name) for o in options.OPTIONS if o.kernel is not None
    }
    ft = spec.named_tables(f["tables"])
    assert f["raw"].shape == (B, C) and _same(f["target"], target)
    assert ft["row_scale"].shape == (B,) and ft["col_scale"].shape == (C,) and ft["col_shift"] is None
    for name in ("class_margins", "logit_offset", "pair_perturbation", "class_weight"):
        assert _same(ft[name], getattr(tables, name)), name
    assert seen["backward"], "the backward was not called"
    for b in seen["backward"]:
        assert (b["floats"], b["ints"]) == (f["floats"], f["ints"])
        bt = spec.named_tables(b["tables"])
        assert _same(b["raw"], f["raw"]) and _same(b["target"], f["target"])
        for name in ("row_scale", "col_scale", "col_shift", "logit_offset", "pair_perturbation", "class_weight"):
            assert _same(bt[name], ft[name]), name
        assert b["lse"].shape == b["nll"].shape == b["target_grad"].shape == (B,)
        assert b["grad_rows"].shape == () and b["denom"].shape == ()  # the mean's upstream gradient, shared
        assert isinstance(b["scale_grad"], bool) and isinstance(b["col_stats"], bool)
        assert b["row_proj"].shape == (B,) and b["col_proj"].shape == (C,)  # the cosine head's projections
        # the learnable logit offset takes its gradient from the stats; the pair perturbation (not
        # learnable here) would need G in fp32 instead of dL/draw
        assert b["col_stats"] and b["scale_grad"]
