"""Edge cases around the kernels and the API: labels out of range under torch.compile, per-call tables over
stored ones, NumPy scalars and 0-d tensors as options, validation before any work, float64 runs with float64
tables, the 1-D weight message, the head rule, DBMLoss's state, keyword-only options checked at
construction."""

import io
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fused_margin as fm
from fused_margin.functional import DEFAULT_FEATURE_HEADS, HEAD_RULE

F64 = torch.float64
COUNTS = [300, 80, 20, 6, 2]
C = len(COUNTS)


def _triton_on_cpu():
    return fm.available_backends("cpu", torch.float32)["triton"] == "ok"


CPU_BACKENDS = [
    "reference",
    "cpu",
    pytest.param(
        "triton",
        marks=pytest.mark.skipif(not _triton_on_cpu(), reason="Triton runs on CPU only under TRITON_INTERPRET=1"),
    ),
]


def cosines(B=6, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return (0.9 * torch.tanh(torch.randn(B, C, generator=g, dtype=F64))).to(dtype)


def features(B=6, D=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g).to(dtype), torch.randn(C, D, generator=g).to(dtype)


TARGET = torch.tensor([0, 1, 4, 2, 3, 0])


# ---- labels under torch.compile ----------------------------------------------------------------------------


def _reproducer(backend):
    def f(x, y, w):
        return fm.margin_cross_entropy(
            x, y, w, scale=30.0, class_margins=torch.full((5,), 0.3), reduction="none", backend=backend
        )

    return f


def _refused(backend, row, label):
    """What a compiled call with a label out of range raises: the fused row kernels check the labels
    themselves (the eager ValueError naming the row, in the graph too); the reference's check is the
    assertion traced into the graph."""
    if backend == "reference":
        return pytest.raises(RuntimeError, match="out of range")
    return pytest.raises(ValueError, match=rf"target\[{row}\] = {label} is out of range")


@pytest.mark.parametrize("compile_backend", ["aot_eager", "eager"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiled_loss_refuses_labels_out_of_range(backend, compile_backend):
    """The issue's reproducer: compiled (fullgraph) it returned four finite losses on Triton."""
    torch._dynamo.reset()
    f = _reproducer(backend)
    compiled = torch.compile(f, fullgraph=True, backend=compile_backend)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 3, generator=g), torch.randn(5, 3, generator=g)
    good = torch.tensor([0, 4, 2, -100])
    torch.testing.assert_close(compiled(x, good, w), f(x, good, w))  # valid input: fullgraph still traces
    for bad, row in (([0, 7, 2, 3], 1), ([0, -1, 2, 3], 1), ([5, 1, 2, 3], 0)):
        with _refused(backend, row, bad[row]):
            compiled(x, torch.tensor(bad), w)
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiled_module_refuses_labels_out_of_range(backend):
    torch._dynamo.reset()
    loss_fn = fm.DBMLoss(COUNTS, variant="bs", backend=backend)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    x, w = features()
    assert torch.isfinite(compiled(x, TARGET, w))
    with _refused(backend, 2, 9):
        compiled(x, torch.tensor([0, 1, 9, 2, 3, 0]), w)
    torch._dynamo.reset()


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_compiled_cuda_labels_out_of_range_assert_on_the_device(backend):
    """A device assertion poisons the CUDA context, so the bad call runs in a child process: valid labels
    give a loss, a label of 7 with C = 5 must stop the process (it printed finite losses before)."""
    if fm.available_backends("cuda")[backend] != "ok":
        pytest.skip(fm.available_backends("cuda")[backend])
    code = textwrap.dedent(f"""
        import torch, fused_margin as fm
        f = lambda x, y, w: fm.margin_cross_entropy(x, y, w, scale=30., class_margins=torch.full((5,), .3,
                                                    device="cuda"), reduction="none", backend={backend!r})
        g = torch.compile(f, fullgraph=True, backend="aot_eager")
        x, w = torch.randn(4, 3, device="cuda"), torch.randn(5, 3, device="cuda")
        print("valid", g(x, torch.tensor([0, 4, 2, 3], device="cuda"), w).sum().item(), flush=True)
        out = g(x, torch.tensor([0, 7, 2, 3], device="cuda"), w)
        torch.cuda.synchronize()
        print("UNCHECKED", out.tolist(), flush=True)
    """)
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TRITON_INTERPRET": "0"},
    )
    assert "valid" in run.stdout, run.stderr[-3000:]
    assert "UNCHECKED" not in run.stdout and run.returncode != 0
    assert "assert" in run.stderr.lower(), run.stderr[-3000:]


# ---- per-call tables override stored ones ------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ldam_module_takes_per_call_class_weight(backend):
    drw = fm.DRWSchedule(COUNTS, step=1)
    x, w = features()
    got = fm.LDAMLoss(COUNTS, backend=backend)(x, TARGET, w, class_weight=drw.weights(1))
    expected = fm.margin_cross_entropy(
        x.double(),
        TARGET,
        w.double(),
        scale=30.0,
        class_margins=fm.ldam_margins(COUNTS, dtype=F64),
        class_weight=drw.weights(1, dtype=F64),
        backend="reference",
    )
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    plain = fm.LDAMLoss(COUNTS, backend=backend)(x, TARGET, w)
    assert not torch.allclose(got, plain)


def test_stored_class_weight_is_overridden_per_call():
    z = cosines()
    stored = fm.LDAMLoss(COUNTS, class_weight=[1.0, 2.0, 3.0, 4.0, 5.0])
    per_call = torch.tensor([5.0, 1.0, 1.0, 1.0, 0.5], dtype=F64)
    expected = fm.ldam_loss(z, TARGET, class_counts=COUNTS, class_weight=per_call, backend="reference")
    torch.testing.assert_close(stored(z, TARGET, class_weight=per_call), expected, rtol=1e-7, atol=0)


def test_dbm_cb_takes_per_call_class_weight():
    z = cosines()
    weights = torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0], dtype=F64)
    got = fm.DBMLoss(COUNTS, variant="cb").double()(z, TARGET, class_weight=weights)
    expected = fm.dbm_loss(z, TARGET, class_counts=COUNTS, variant="ce", class_weight=weights)
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("cls,margin_type", [(fm.ArcFaceLoss, "additive_angular"), (fm.CosFaceLoss, "additive_cosine")])
def test_constant_margin_module_takes_per_call_class_margins(cls, margin_type):
    z = cosines()
    margins = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5], dtype=F64)
    got = cls(scale=16.0)(z, TARGET, class_margins=margins)
    expected = fm.margin_cross_entropy(
        z, TARGET, input_is_cosine=True, scale=16.0, class_margins=margins, margin_type=margin_type, backend="reference"
    )
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=0)


def test_per_call_head_and_scalar_options_override():
    x, w = features(dtype=F64)
    module = fm.LDAMLoss(COUNTS).double()
    expected = fm.ldam_loss(x, TARGET, w, class_counts=COUNTS, head="linear", scale=2.0)
    torch.testing.assert_close(module(x, TARGET, w, head="linear", scale=2.0), expected, rtol=1e-14, atol=0)


# ---- NumPy scalars and 0-d tensors -------------------------------------------------------------------------


def test_numpy_and_tensor_scale():
    z = cosines()
    expected = fm.margin_cross_entropy(z, TARGET, scale=30.0)
    for scale in (np.float32(30), np.float64(30), np.int64(30), torch.tensor(30.0), torch.tensor(30)):
        torch.testing.assert_close(fm.margin_cross_entropy(z, TARGET, scale=scale), expected, rtol=0, atol=0)


def test_numpy_hyperparameters_of_the_modules():
    z = cosines()
    k = np.float32(0.1)
    torch.testing.assert_close(fm.DBMLoss(COUNTS, K=k)(z, TARGET), fm.DBMLoss(COUNTS, K=float(k))(z, TARGET))
    torch.testing.assert_close(
        fm.ArcFaceLoss(margin=torch.tensor(0.5))(z, TARGET), fm.ArcFaceLoss(margin=0.5)(z, TARGET)
    )
    torch.testing.assert_close(
        fm.LDAMLoss(COUNTS, max_m=np.float64(0.4), scale=np.int32(20))(z, TARGET),
        fm.LDAMLoss(COUNTS, max_m=0.4, scale=20.0)(z, TARGET),
    )


def test_set_epoch_takes_numpy_and_tensor_integers():
    module = fm.DBMLoss(COUNTS, variant="drw", drw_step=2)
    for epoch in np.arange(4):
        module.set_epoch(epoch)
    assert module.epoch == 3 and type(module.epoch) is int
    expected = fm.drw_weights(COUNTS, 3, step=2)
    torch.testing.assert_close(module.class_weight, expected, rtol=0, atol=0)
    module.set_epoch(torch.tensor(0))
    assert torch.equal(module.class_weight, torch.ones(C))
    drw = fm.DRWSchedule(COUNTS, step=np.int64(2))
    torch.testing.assert_close(drw.weights(np.int64(3)), expected, rtol=0, atol=0)


def test_numpy_ignore_index():
    z = cosines()
    target = torch.tensor([0, 1, 4, -1, 3, 0])
    expected = fm.margin_cross_entropy(z, target, ignore_index=-1)
    torch.testing.assert_close(fm.margin_cross_entropy(z, target, ignore_index=np.int64(-1)), expected)
    torch.testing.assert_close(fm.margin_cross_entropy(z, target, ignore_index=torch.tensor(-1)), expected)


def test_ignore_index_beyond_int64_is_a_clear_error():
    with pytest.raises(ValueError, match="ignore_index must fit in int64"):
        fm.margin_cross_entropy(cosines(), TARGET, ignore_index=2**70)
    with pytest.raises(ValueError, match="ignore_index must fit in int64"):
        fm.LDAMLoss(COUNTS, ignore_index=-(2**64))


@pytest.mark.parametrize(
    "name,value,error,message",
    [
        ("scale", "30", TypeError, "scale must be a real number"),
        ("scale", torch.ones(2), TypeError, "scale must be a number or a 0-d tensor"),
        ("scale", torch.tensor(2.0, requires_grad=True), TypeError, "scale is a constant option"),
        ("lambda_inst", True, TypeError, "lambda_inst must be a real number"),
        ("ignore_index", np.float64(-1), TypeError, "ignore_index must be an int"),
        ("ignore_index", torch.tensor(-1.0), TypeError, "ignore_index must be an int"),
    ],
)
def test_bad_scalar_options_are_named(name, value, error, message):
    with pytest.raises(error, match=message):
        fm.margin_cross_entropy(cosines(), TARGET, **{name: value})


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: fm.DBMLoss(COUNTS, K="0.1"), "K must be a finite number"),
        (lambda: fm.ArcFaceLoss(margin=np.array([0.5, 0.1])), "margin must be a finite number"),
        (lambda: fm.DBMLoss(COUNTS, variant="drw").set_epoch(np.float64(3)), "epoch must be an int"),
        (lambda: fm.DBMLoss(COUNTS, variant="drw").set_epoch(-1), "epoch must be an int >= 0"),
    ],
)
def test_bad_module_scalars_are_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ---- early validation --------------------------------------------------------------------------------------


@pytest.mark.parametrize("betas", [(0.0, 1.5), (0.0, float("nan")), (), (-0.1, 0.5)])
def test_dbm_drw_betas_fail_at_construction(betas):
    with pytest.raises(ValueError, match="drw_betas"):
        fm.DBMLoss(COUNTS, variant="drw", drw_betas=betas)


def test_drw_weights_check_every_beta():
    with pytest.raises(ValueError, match="betas"):
        fm.drw_weights(COUNTS, 0, betas=(0.0, 1.5))
    with pytest.raises(ValueError, match="drw_step must be an int > 0"):
        fm.DBMLoss(COUNTS, variant="drw", drw_step=0)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "make,name",
    [
        (lambda: fm.MarginLoss(class_margins=[NAN, 0.1]), "class_margins"),
        (lambda: fm.LDAMLoss(COUNTS, class_weight=[INF, 1, 1, 1, 1]), "class_weight"),
        (lambda: fm.MarginLoss(logit_offset=torch.tensor([0.0, -INF])), "logit_offset"),
        (lambda: fm.MarginLoss(class_weight=np.array([1.0, NAN])), "class_weight"),
    ],
    ids=["margins-nan", "ldam-weight-inf", "offset-inf", "weight-nan-numpy"],
)
def test_non_finite_module_tables_fail_at_construction(make, name):
    with pytest.raises(ValueError, match=rf"{name} must be finite, got {name}\[\d\]"):
        make()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "name", ["class_margins", "logit_offset", "class_weight", "omega", "beta", "pair_perturbation"]
)
def test_non_finite_tables_on_cpu_are_refused_per_call(name, backend):
    x, w = features()
    table = torch.ones(len(TARGET), C) if name == "pair_perturbation" else torch.ones(C)
    table[1, 2] if table.dim() == 2 else None
    if table.dim() == 2:
        table[1, 2] = NAN
    else:
        table[2] = INF
    with pytest.raises(ValueError, match=rf"{name} must be finite, got {name}\[[\d, ]+\]"):
        fm.margin_cross_entropy(x, TARGET, w, backend=backend, **{name: table})


def test_non_finite_per_call_table_of_a_module_is_refused():
    with pytest.raises(ValueError, match="class_weight must be finite"):
        fm.LDAMLoss(COUNTS)(cosines(), TARGET, class_weight=torch.tensor([1.0, NAN, 1.0, 1.0, 1.0], dtype=F64))


def test_non_finite_table_under_compile_asserts_on_cpu():
    torch._dynamo.reset()
    f = torch.compile(
        lambda z, y, a: fm.margin_cross_entropy(z, y, logit_offset=a), fullgraph=True, backend="aot_eager"
    )
    z = cosines()
    assert torch.isfinite(f(z, TARGET, torch.zeros(C, dtype=F64)))
    with pytest.raises(RuntimeError, match="logit_offset has a NaN or inf entry"):
        f(z, TARGET, torch.tensor([0.0, NAN, 0.0, 0.0, 0.0], dtype=F64))
    torch._dynamo.reset()


def test_class_weight_string_is_a_clear_type_error():
    with pytest.raises(TypeError, match="class_weight must be a 1-D sequence or tensor of numbers"):
        fm.LDAMLoss(COUNTS, class_weight="balanced")
    with pytest.raises(TypeError, match="class_weight must be a torch.Tensor"):
        fm.margin_cross_entropy(cosines(), TARGET, class_weight="balanced")


def test_module_table_of_wrong_length_fails_at_construction():
    with pytest.raises(ValueError, match="class_weight must have C = 5 entries, got 3"):
        fm.LDAMLoss(COUNTS, class_weight=[1.0, 2.0, 3.0])


# ---- float64 runs use float64 tables -----------------------------------------------------------------------


def _hand_loss(z, target, margins, scale, offset=None, weights=None):
    """CE of ``s z`` with ``s (z_y - m_y)`` at the target, plus an offset, class weights, mean; float64."""
    logits = scale * z.clone()
    rows = torch.arange(len(target))
    logits[rows, target] = scale * (z[rows, target] - margins[target])
    if offset is not None:
        logits = logits + offset
    nll = torch.logsumexp(logits, 1) - logits[rows, target]
    wy = torch.ones(len(target), dtype=F64) if weights is None else weights[target]
    return (wy * nll).sum() / wy.sum()


def test_cosface_fp64_matches_a_float64_hand_computation():
    """Before: the constant margin was a float32 table (0.35 rounded), 6.4e-9 relative off."""
    z = cosines()
    expected = _hand_loss(z, TARGET, torch.full((C,), 0.35, dtype=F64), 64.0)
    got = fm.cosface_loss(z, TARGET, margin=0.35, scale=64.0)
    torch.testing.assert_close(got, expected, rtol=4e-15, atol=0)
    torch.testing.assert_close(fm.CosFaceLoss(margin=0.35, scale=64.0)(z, TARGET), expected, rtol=4e-15, atol=0)


def _ldam64():
    m = torch.tensor([n**-0.25 for n in COUNTS], dtype=F64)
    return m * (0.5 / m.max())


def _prior64():
    return torch.tensor([math.log(n / sum(COUNTS)) for n in COUNTS], dtype=F64)


def test_ldam_fp64_matches_a_float64_hand_computation():
    z = cosines()
    expected = _hand_loss(z, TARGET, _ldam64(), 30.0)
    torch.testing.assert_close(fm.ldam_loss(z, TARGET, class_counts=COUNTS), expected, rtol=4e-15, atol=0)
    module = fm.LDAMLoss(COUNTS).double()
    assert torch.equal(module.class_margins, fm.ldam_margins(COUNTS, dtype=F64))
    torch.testing.assert_close(module(z, TARGET), expected, rtol=4e-15, atol=0)


def test_logit_adjustment_fp64_matches_a_float64_hand_computation():
    z = cosines()
    expected = _hand_loss(z, TARGET, torch.zeros(C, dtype=F64), 1.0, offset=0.7 * _prior64())
    torch.testing.assert_close(
        fm.logit_adjusted_loss(z, TARGET, class_counts=COUNTS, tau=0.7), expected, rtol=4e-15, atol=0
    )
    torch.testing.assert_close(fm.LogitAdjustedLoss(COUNTS, tau=0.7).double()(z, TARGET), expected, rtol=4e-15, atol=0)


def test_dbm_module_double_holds_the_float64_tables():
    """Before: ``DBMLoss(...).double()`` held the float32-rounded log prior (1.2e-7 off)."""
    module = fm.DBMLoss(COUNTS, variant="bs").double()
    assert module.logit_offset.dtype == F64
    torch.testing.assert_close(module.logit_offset, _prior64(), rtol=1e-15, atol=0)
    margins = torch.tensor([0.1 * 2 / n for n in COUNTS], dtype=F64)
    torch.testing.assert_close(module.class_margins, margins, rtol=1e-15, atol=0)
    assert module.float().logit_offset.dtype == torch.float32  # and back


def test_drw_weights_after_double_are_float64_values():
    module = fm.DBMLoss(COUNTS, variant="drw", drw_step=1).double()
    module.set_epoch(1)
    exact = fm.class_balanced_weights(COUNTS, 0.9999, dtype=F64)
    assert torch.equal(module.class_weight, exact)
    ldam = fm.LDAMLoss(COUNTS).double()
    fm.DRWSchedule(COUNTS, step=1).apply(ldam, 1)
    assert torch.equal(ldam.class_weight, exact)
    fp32 = fm.LDAMLoss(COUNTS)
    fm.DRWSchedule(COUNTS, step=1).apply(fp32, 1)
    assert fp32.class_weight.dtype == torch.float32
    assert torch.equal(fp32.double().class_weight, exact)  # the float64 values were kept


def test_a_table_assigned_by_hand_is_what_double_casts():
    module = fm.LDAMLoss(COUNTS)
    module.class_weight = torch.full((C,), 0.1)
    assert torch.equal(module.double().class_weight, torch.full((C,), 0.1).double())


def test_fp32_presets_get_fp32_tables_from_float64_values():
    z = cosines(dtype=torch.float32)
    got = fm.ldam_loss(z, TARGET, class_counts=COUNTS, reduction="none", backend="reference")
    expected = fm.margin_cross_entropy(
        z,
        TARGET,
        input_is_cosine=True,
        scale=30.0,
        reduction="none",
        class_margins=fm.ldam_margins(COUNTS),
        backend="reference",
    )
    assert torch.equal(got, expected)


# ---- the 1-D weight message --------------------------------------------------------------------------------


def test_one_d_weight_names_class_weight():
    logits = cosines(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"weight is the C x D classifier.*class_weight="):
        fm.margin_cross_entropy(logits, TARGET, torch.ones(C))


# ---- one head rule -----------------------------------------------------------------------------------------

FUNCTIONS = {
    "margin_cross_entropy": lambda *a, **k: fm.margin_cross_entropy(*a, **k),
    "dbm_loss": lambda *a, **k: fm.dbm_loss(*a, class_counts=COUNTS, **k),
    "ldam_loss": lambda *a, **k: fm.ldam_loss(*a, class_counts=COUNTS, **k),
    "elm_loss": lambda *a, **k: fm.elm_loss(*a, class_counts=COUNTS, **k),
    "arcface_loss": lambda *a, **k: fm.arcface_loss(*a, **k),
    "cosface_loss": lambda *a, **k: fm.cosface_loss(*a, **k),
    "balanced_softmax_loss": lambda *a, **k: fm.balanced_softmax_loss(*a, class_counts=COUNTS, **k),
    "logit_adjusted_loss": lambda *a, **k: fm.logit_adjusted_loss(*a, class_counts=COUNTS, **k),
}
MODULES = {
    "dbm_loss": lambda **k: fm.DBMLoss(COUNTS, **k),
    "ldam_loss": lambda **k: fm.LDAMLoss(COUNTS, **k),
    "elm_loss": lambda **k: fm.ELMLoss(COUNTS, **k),
    "arcface_loss": lambda **k: fm.ArcFaceLoss(**k),
    "cosface_loss": lambda **k: fm.CosFaceLoss(**k),
    "balanced_softmax_loss": lambda **k: fm.BalancedSoftmaxLoss(COUNTS, **k),
    "logit_adjusted_loss": lambda **k: fm.LogitAdjustedLoss(COUNTS, **k),
}


def test_the_head_rule_is_stated_once_and_covers_every_entry_point():
    assert set(DEFAULT_FEATURE_HEADS) == set(FUNCTIONS)
    assert set(DEFAULT_FEATURE_HEADS.values()) == {"cosine", "linear"}
    for name in FUNCTIONS:
        doc = getattr(fm, name).__doc__
        assert "HEAD_RULE" in doc and DEFAULT_FEATURE_HEADS[name] in doc, name


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_functions_follow_the_head_rule(name):
    x, w = features(dtype=F64)
    default = DEFAULT_FEATURE_HEADS[name]
    f = FUNCTIONS[name]
    angular = name in ("dbm_loss", "arcface_loss")
    torch.testing.assert_close(f(x, TARGET, w), f(x, TARGET, w, head=default), rtol=0, atol=0)
    other = "linear" if default == "cosine" else "cosine"
    if not angular:  # an explicit head overrides (angular margins need cosines)
        assert not torch.allclose(f(x, TARGET, w, head=other), f(x, TARGET, w))
    if default == "cosine":  # a bias needs the linear head: said, not guessed
        with pytest.raises(ValueError, match="pass head='linear'"):
            f(x, TARGET, w, bias=torch.zeros(C, dtype=F64))


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_follow_the_head_rule(name):
    x, w = features(dtype=F64)
    module = MODULES[name]().double()  # float64 tables, as the functions build for float64 input
    assert module.feature_head == type(module).default_feature_head == DEFAULT_FEATURE_HEADS[name]
    torch.testing.assert_close(module(x, TARGET, w), FUNCTIONS[name](x, TARGET, w), rtol=1e-14, atol=0)
    if name not in ("dbm_loss", "arcface_loss"):
        other = "linear" if module.feature_head == "cosine" else "cosine"
        torch.testing.assert_close(
            MODULES[name](feature_head=other).double()(x, TARGET, w),
            FUNCTIONS[name](x, TARGET, w, head=other),
            rtol=1e-14,
            atol=0,
        )


def test_head_rule_text_names_both_defaults():
    assert '"cosine"' in HEAD_RULE and '"linear"' in HEAD_RULE


def test_presets_take_an_explicit_head():
    """``ldam_loss(..., head="linear")`` raised "got multiple values for keyword argument 'head'"."""
    x, w = features(dtype=F64)
    expected = F.cross_entropy(30.0 * (x @ w.t()) - 30.0 * F.one_hot(TARGET, C) * _ldam64(), TARGET)
    torch.testing.assert_close(
        fm.ldam_loss(x, TARGET, w, class_counts=COUNTS, head="linear"), expected, rtol=1e-13, atol=0
    )


# ---- DBMLoss state -----------------------------------------------------------------------------------------


def test_dbm_state_dict_round_trip_mid_drw():
    trained = fm.DBMLoss(COUNTS, variant="drw", drw_step=3)
    for epoch in range(5):
        trained.set_epoch(epoch)
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    resumed = fm.DBMLoss(COUNTS, variant="drw", drw_step=3)
    assert torch.equal(resumed.class_weight, torch.ones(C))
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.epoch == 4
    assert torch.equal(resumed.class_weight, trained.class_weight)
    assert not torch.equal(resumed.class_weight, torch.ones(C))
    z = cosines(dtype=torch.float32)
    torch.testing.assert_close(resumed(z, TARGET), trained(z, TARGET), rtol=0, atol=0)


def test_dbm_state_of_another_schedule_is_refused():
    state = fm.DBMLoss(COUNTS, variant="drw", drw_step=3).state_dict()
    with pytest.raises(ValueError, match="drw_step=3"):
        fm.DBMLoss(COUNTS, variant="drw", drw_step=4).load_state_dict(state)
    with pytest.raises(ValueError, match="class_counts"):
        fm.DBMLoss([1, 2, 3, 4, 5], variant="drw", drw_step=3).load_state_dict(state)


# ---- keyword-only options, checked at construction ---------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: fm.DBMLoss(COUNTS, "bs"),
        lambda: fm.LDAMLoss(COUNTS, 0.5),
        lambda: fm.ELMLoss(COUNTS, 0.5),
        lambda: fm.ArcFaceLoss(0.5),
        lambda: fm.CosFaceLoss(0.35),
        lambda: fm.BalancedSoftmaxLoss(COUNTS, "cpu"),
        lambda: fm.LogitAdjustedLoss(COUNTS, 1.0),
        lambda: fm.DBMLoss(COUNTS, "ce", 0.1, 1.0, 30.0, 1.0, "min", "cpu"),
    ],
    ids=["DBM", "LDAM", "ELM", "ArcFace", "CosFace", "BS", "LA", "DBM-backend"],
)
def test_module_options_are_keyword_only(make):
    with pytest.raises(TypeError, match="positional argument"):
        make()


@pytest.mark.parametrize(
    "make",
    [
        lambda: fm.DBMLoss(COUNTS, lable_smoothing=0.1),
        lambda: fm.LDAMLoss(COUNTS, reducton="sum"),
        lambda: fm.ArcFaceLoss(angular_flod="easy"),
        lambda: fm.MarginLoss(sacle=2.0),
        lambda: fm.BalancedSoftmaxLoss(COUNTS, feature_haed="cosine"),
    ],
    ids=["DBM", "LDAM", "ArcFace", "MarginLoss", "BS"],
)
def test_option_typos_fail_at_construction(make):
    with pytest.raises(
        TypeError, match=r"unknown option\(s\) \['(lable_smoothing|reducton|angular_flod|sacle|feature_haed)'\]"
    ):
        make()


@pytest.mark.parametrize(
    "make,error,message",
    [
        (lambda: fm.LDAMLoss(COUNTS, reduction="avg"), ValueError, "reduction must be one of"),
        (lambda: fm.DBMLoss(COUNTS, backend="gpu"), ValueError, "backend must be one of"),
        (lambda: fm.CosFaceLoss(label_smoothing=2.0), ValueError, "label_smoothing must be in"),
        (lambda: fm.LDAMLoss(COUNTS, margin_type="additive_angular"), TypeError, r"LDAMLoss sets \['margin_type'\]"),
        (lambda: fm.DBMLoss(COUNTS, variant="cb", class_weight=torch.ones(C)), TypeError, "class_weight"),
        (lambda: fm.LDAMLoss(COUNTS, head="linear"), TypeError, "feature_head"),
        (lambda: fm.LDAMLoss(COUNTS, feature_head="logits"), ValueError, "feature_head must be 'cosine' or 'linear'"),
    ],
)
def test_option_values_fail_at_construction(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_scalar_options_are_stored_as_python_numbers():
    module = fm.DBMLoss(COUNTS, scale=np.float32(16), ignore_index=np.int64(-1))
    assert type(module.options["scale"]) is float and type(module.options["ignore_index"]) is int
