"""Bad input (docs/loss.md section 6) raises a clear ValueError/TypeError naming the bad argument: one test per case."""

import math

import pytest
import torch

import fused_margin as fm

B, D, C = 4, 3, 5


def feats():
    return torch.randn(B, D)


def class_weights():
    return torch.randn(C, D)


def cosines():
    return torch.rand(B, C) * 2 - 1


def good_target():
    return torch.tensor([0, 1, 4, -100])


def call(**overrides):
    """margin_cross_entropy on a valid cosine-head call, with some arguments replaced."""
    kwargs = dict(input=feats(), target=good_target(), weight=class_weights(), backend="reference")
    kwargs.update(overrides)
    return fm.margin_cross_entropy(**kwargs)


def test_valid_call_passes():
    assert torch.isfinite(call())


# ---- labels -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [5, 100, -1, -101], ids=["C", "far_above", "minus_one", "below_ignore"])
def test_label_out_of_range(bad):
    target = good_target()
    target[1] = bad
    with pytest.raises(ValueError, match=rf"target\[1\] = {bad} is out of range"):
        call(target=target)


def test_label_equal_to_a_custom_ignore_index_is_accepted():
    target = torch.tensor([0, 1, 4, -1])
    assert torch.isfinite(call(target=target, ignore_index=-1))
    with pytest.raises(ValueError, match="target"):
        call(target=torch.tensor([0, 1, 4, -100]), ignore_index=-1)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8, torch.float32, torch.bool])
def test_label_dtype(dtype):
    with pytest.raises(TypeError, match="target must have dtype torch.int64"):
        call(target=torch.tensor([0, 1, 1, 0]).to(dtype))


def test_label_not_a_tensor():
    with pytest.raises(TypeError, match="target"):
        call(target=[0, 1, 2, 3])


def test_label_two_dimensional():
    with pytest.raises(ValueError, match="target must be 1-D"):
        call(target=torch.zeros(B, 1, dtype=torch.int64))


# ---- shapes -----------------------------------------------------------------------------------------


def test_target_length_mismatch():
    with pytest.raises(ValueError, match="target has 3 labels but input has 4 rows"):
        call(target=torch.tensor([0, 1, 2]))


def test_input_not_two_dimensional():
    with pytest.raises(ValueError, match="input must be 2-D"):
        call(input=torch.randn(D))


def test_input_not_a_tensor():
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        call(input=[[0.0] * D] * B)


def test_input_not_floating():
    with pytest.raises(TypeError, match="input must be a floating-point tensor"):
        call(input=torch.ones(B, D, dtype=torch.int64))


def test_weight_feature_size_mismatch():
    with pytest.raises(ValueError, match=r"weight must be C x D with D = input.shape\[1\] = 3"):
        call(weight=torch.randn(C, D + 1))


def test_weight_dtype_mismatch():
    with pytest.raises(TypeError, match="weight has dtype torch.float64"):
        call(weight=class_weights().double())


def test_weight_missing_for_a_feature_head():
    with pytest.raises(ValueError, match="needs weight"):
        call(weight=None, head="cosine")


def test_weight_given_to_the_logits_head():
    with pytest.raises(ValueError, match="weight"):
        call(input=cosines(), head="logits")


@pytest.mark.parametrize("name", ["class_margins", "logit_offset", "class_weight", "omega"])
def test_table_of_wrong_length(name):
    with pytest.raises(ValueError, match=rf"{name} must have C = 5 entries, got 4"):
        call(**{name: torch.ones(C - 1)})


def test_beta_of_wrong_length():
    with pytest.raises(ValueError, match="beta must have C = 5 entries, got 6"):
        call(beta=torch.zeros(C + 1))


def test_class_norms_of_wrong_length():
    with pytest.raises(ValueError, match="class_norms must have C = 5 entries, got 3"):
        call(input=cosines(), weight=None, beta=torch.zeros(C), class_norms=torch.ones(3))


def test_table_two_dimensional():
    with pytest.raises(ValueError, match="class_margins must be 1-D"):
        call(class_margins=torch.ones(1, C))


def test_table_not_floating():
    with pytest.raises(TypeError, match="class_weight must be a floating-point tensor"):
        call(class_weight=torch.ones(C, dtype=torch.int64))


@pytest.mark.parametrize("shape", [(B, C - 1), (B + 1, C), (C,)], ids=["short_row", "extra_row", "one_d"])
def test_pair_perturbation_shape(shape):
    with pytest.raises(ValueError, match="pair_perturbation must be"):
        call(pair_perturbation=torch.zeros(shape))


def test_bias_of_wrong_length():
    with pytest.raises(ValueError, match="bias must have C = 5 entries, got 4"):
        call(head="linear", bias=torch.zeros(C - 1))


def test_bias_on_the_cosine_head():
    with pytest.raises(ValueError, match="bias applies only to head='linear'"):
        call(bias=torch.zeros(C))


def test_beta_on_logits_head_without_class_norms():
    with pytest.raises(ValueError, match="class_norms"):
        call(input=cosines(), weight=None, beta=torch.zeros(C))


def test_class_norms_without_beta():
    with pytest.raises(ValueError, match="class_norms"):
        call(input=cosines(), weight=None, class_norms=torch.ones(C))


# ---- devices (the "meta" device stands in for a second device) ---------------------------------------


@pytest.mark.parametrize(
    "name", ["weight", "bias", "class_margins", "logit_offset", "class_weight", "omega", "beta", "pair_perturbation"]
)
def test_device_mismatch(name):
    values = {
        "weight": class_weights(),
        "bias": torch.zeros(C),
        "class_margins": torch.zeros(C),
        "logit_offset": torch.zeros(C),
        "class_weight": torch.ones(C),
        "omega": torch.ones(C),
        "beta": torch.zeros(C),
        "pair_perturbation": torch.zeros(B, C),
    }
    extra = {name: values[name].to("meta")}
    if name == "bias":
        extra["head"] = "linear"
    with pytest.raises(ValueError, match=rf"{name} is on meta but input is on cpu"):
        call(**extra)


def test_target_device_mismatch():
    with pytest.raises(ValueError, match="target is on meta but input is on cpu"):
        call(target=good_target().to("meta"))


def test_input_on_another_device_than_weight():
    with pytest.raises(ValueError, match="weight is on cpu but input is on meta"):
        call(input=feats().to("meta"))


# ---- classes and counts -----------------------------------------------------------------------------


def test_fewer_than_two_classes_logits_head():
    with pytest.raises(ValueError, match="number of classes C must be at least 2, got 1"):
        fm.margin_cross_entropy(torch.randn(B, 1), torch.zeros(B, dtype=torch.int64), backend="reference")


def test_fewer_than_two_classes_feature_head():
    with pytest.raises(ValueError, match="number of classes C must be at least 2, got 1"):
        call(weight=torch.randn(1, D), target=torch.zeros(B, dtype=torch.int64))


@pytest.mark.parametrize(
    "build",
    [
        fm.ldam_margins,
        fm.dbm_class_margins,
        fm.log_prior,
        fm.class_balanced_weights,
        fm.marc_weights,
        lambda c: fm.drw_weights(c, 0),
    ],
    ids=["ldam", "dbm", "log_prior", "cb", "marc", "drw"],
)
@pytest.mark.parametrize(
    "counts,message",
    [
        ([], "class_counts is empty"),
        ([10], "class_counts must have at least 2 classes, got 1"),
        ([10, 0, 3], r"class_counts must be > 0 for every class; class 1 has 0"),
        ([10, 5, -3], r"class_counts must be > 0 for every class; class 2 has -3"),
        ([10, math.nan], "class_counts must be finite"),
        ([10, math.inf], "class_counts must be finite"),
        ([[10, 5], [3, 2]], "class_counts must be 1-D"),
        ("abc", "class_counts must be a sequence of numbers"),
    ],
    ids=["empty", "one_class", "zero", "negative", "nan", "inf", "two_d", "string"],
)
def test_bad_counts(build, counts, message):
    with pytest.raises((ValueError, TypeError), match=message):
        build(counts)


@pytest.mark.parametrize(
    "make",
    [
        lambda c: fm.DBMLoss(c),
        lambda c: fm.LDAMLoss(c),
        lambda c: fm.ELMLoss(c),
        lambda c: fm.BalancedSoftmaxLoss(c),
        lambda c: fm.LogitAdjustedLoss(c),
        lambda c: fm.dbm_loss(cosines(), good_target(), class_counts=c),
        lambda c: fm.ldam_loss(cosines(), good_target(), class_counts=c),
    ],
    ids=["DBMLoss", "LDAMLoss", "ELMLoss", "BalancedSoftmaxLoss", "LogitAdjustedLoss", "dbm_loss", "ldam_loss"],
)
def test_bad_counts_through_the_api(make):
    with pytest.raises(ValueError, match="class_counts must be > 0"):
        make([10, 0, 3, 4, 5])


def test_counts_shorter_than_the_classes():
    with pytest.raises(ValueError, match="class_margins must have C = 5 entries, got 3"):
        fm.ldam_loss(cosines(), good_target(), class_counts=[10, 5, 3], backend="reference")


def test_cosine_classifier_too_few_classes():
    with pytest.raises(ValueError, match="out_features >= 2"):
        fm.CosineClassifier(4, 1)


def test_cosine_classifier_published_weight_shape():
    head = fm.CosineClassifier(4, 3)
    with pytest.raises(ValueError, match=r"published weight must have shape \(in_features, out_features\)"):
        head.load_published_weight(torch.randn(3, 4))


# ---- non-finite and out-of-range hyperparameters ------------------------------------------------------

NON_FINITE = [math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", ["scale", "lambda_inst", "lambda_elm", "label_smoothing"])
def test_non_finite_loss_hyperparameter(name, value):
    with pytest.raises(ValueError, match=rf"{name} must be finite"):
        call(**{name: value})


@pytest.mark.parametrize(
    "name,value,message",
    [
        ("scale", 0.0, "scale must be > 0"),
        ("scale", -2.0, "scale must be > 0"),
        ("lambda_inst", -1.0, "lambda_inst must be >= 0"),
        ("label_smoothing", 1.5, r"label_smoothing must be in \[0, 1\]"),
        ("label_smoothing", -0.1, r"label_smoothing must be in \[0, 1\]"),
    ],
)
def test_out_of_range_loss_hyperparameter(name, value, message):
    with pytest.raises(ValueError, match=message):
        call(**{name: value})


@pytest.mark.parametrize("name", ["scale", "lambda_inst", "lambda_elm", "label_smoothing"])
def test_hyperparameter_not_a_number(name):
    with pytest.raises(TypeError, match=rf"{name} must be a real number"):
        call(**{name: "1.0"})


def test_ignore_index_not_an_int():
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        call(ignore_index=-100.0)


@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", ["K", "tau"])
def test_non_finite_dbm_hyperparameter(name, value):
    with pytest.raises(ValueError, match=rf"{name} must be a finite number"):
        fm.dbm_class_margins([10, 5, 2], **{name: value})
    with pytest.raises(ValueError, match=rf"{name} must be a finite number"):
        fm.DBMLoss([10, 5, 2], **{name: value})


@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
def test_non_finite_max_m(value):
    with pytest.raises(ValueError, match="max_m must be a finite number"):
        fm.ldam_margins([10, 5, 2], max_m=value)
    with pytest.raises(ValueError, match="max_m must be a finite number"):
        fm.LDAMLoss([10, 5, 2], max_m=value)


@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
def test_non_finite_logit_adjustment_tau(value):
    with pytest.raises(ValueError, match="tau must be a finite number"):
        fm.LogitAdjustedLoss([10, 5, 2], tau=value)


@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
def test_non_finite_class_balanced_beta(value):
    with pytest.raises(ValueError, match="beta must be a finite number"):
        fm.class_balanced_weights([10, 5, 2], beta=value)


@pytest.mark.parametrize("value", [1.0, -0.1])
def test_class_balanced_beta_out_of_range(value):
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\)"):
        fm.class_balanced_weights([10, 5, 2], beta=value)


@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
def test_non_finite_marc_gamma(value):
    with pytest.raises(ValueError, match="gamma must be a finite number"):
        fm.marc_weights([10, 5, 2], gamma=value)


@pytest.mark.parametrize("cls", [fm.ArcFaceLoss, fm.CosFaceLoss])
@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
def test_non_finite_constant_margin(cls, value):
    with pytest.raises(ValueError, match="margin must be a finite number"):
        cls(margin=value)


@pytest.mark.parametrize("preset", [fm.arcface_loss, fm.cosface_loss])
@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
def test_non_finite_constant_margin_functional(preset, value):
    with pytest.raises(ValueError, match="margin must be a finite number"):
        preset(cosines(), good_target(), margin=value, backend="reference")


@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
def test_non_finite_logit_adjustment_tau_functional(value):
    with pytest.raises(ValueError, match="tau must be a finite number"):
        fm.logit_adjusted_loss(cosines(), good_target(), class_counts=[10, 5, 2, 2, 1], tau=value, backend="reference")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(epoch=-1), "epoch must be an int >= 0"),
        (dict(epoch=1.5), "epoch must be an int >= 0"),
        (dict(epoch=0, step=0), "step must be an int > 0"),
        (dict(epoch=0, betas=()), "betas is empty"),
    ],
)
def test_bad_drw_schedule(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fm.drw_weights([10, 5, 2], **kwargs)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_classes=1, n_max=10, imbalance=10.0), "num_classes must be an int >= 2"),
        (dict(num_classes=5, n_max=0, imbalance=10.0), "n_max must be an int >= 1"),
        (dict(num_classes=5, n_max=10, imbalance=0.5), "imbalance must be >= 1"),
        (dict(num_classes=5, n_max=10, imbalance=math.inf), "imbalance must be a finite number"),
        (dict(num_classes=5, n_max=10, imbalance=10.0, profile="zipf"), "profile must be 'exp', 'step' or 'pareto'"),
        (dict(num_classes=5, n_max=10, imbalance=10.0, profile="step", step_fraction=1.0), "step_fraction"),
        (dict(num_classes=5, n_max=10, imbalance=10.0, profile="pareto", pareto_alpha=0.0), "pareto_alpha"),
    ],
)
def test_bad_long_tailed_counts(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fm.long_tailed_counts(**kwargs)


# ---- unknown options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,value",
    [
        ("reduction", "avg"),
        ("margin_type", "multiplicative_angular"),
        ("head", "softmax"),
        ("hard_mode", "soft"),
        ("angular_fold", "clip"),
        ("margin_grad", "detach"),
    ],
)
def test_unknown_option(name, value):
    with pytest.raises(ValueError, match=rf"{name} must be one of .*got '{value}'"):
        call(**{name: value})


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of .*got 'gpu'"):
        call(backend="gpu")


def test_unavailable_backend_names_the_reason():
    with pytest.raises(RuntimeError, match="backend='cuda' is not available: backend 'cuda' runs on cuda tensors"):
        call(backend="cuda")


def test_unknown_dbm_variant():
    with pytest.raises(ValueError, match="variant must be 'ce', 'bs', 'cb' or 'drw', got 'focal'"):
        fm.DBMLoss([10, 5, 2], variant="focal")


def test_unknown_margin_ref():
    with pytest.raises(ValueError, match="margin_ref must be 'min' or 'last', got 'first'"):
        fm.dbm_class_margins([10, 5, 2], margin_ref="first")


# ---- options that do not fit together ----------------------------------------------------------------


def test_angular_margin_on_the_linear_head():
    with pytest.raises(ValueError, match="margin_type='additive_angular' needs cosine scores.*head='linear'"):
        call(head="linear", margin_type="additive_angular", class_margins=torch.full((C,), 0.2))


def test_angular_margin_on_logits_not_declared_cosines():
    with pytest.raises(ValueError, match="input_is_cosine=True"):
        fm.margin_cross_entropy(cosines(), good_target(), margin_type="additive_angular", backend="reference")


def test_angular_fold_with_the_cosine_margin():
    with pytest.raises(ValueError, match="angular_fold='threshold' applies only to margin_type='additive_angular'"):
        call(angular_fold="threshold")


@pytest.mark.cuda
def test_cuda_labels_checked_with_a_named_error_when_sync_check_is_on():
    x = torch.randn(4, 5, device="cuda")
    y = torch.tensor([0, 1, 7, 2], device="cuda")
    fm.set_sync_label_check(True)
    try:
        with pytest.raises(ValueError, match=r"target\[2\] = 7"):
            fm.margin_cross_entropy(x, y)
    finally:
        fm.set_sync_label_check(False)
