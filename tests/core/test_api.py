"""The public API: presets and modules equal ``margin_cross_entropy`` with tables built by hand (math only),
DRW's epoch switch, the cosine classifier, dtype/device moves of the modules' buffers.

Inputs are float64, which every backend computes with the reference, so the comparisons are exact up to
the float32 rounding of the modules' tables.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import fused_margin as fm

F64 = torch.float64
COUNTS = [300, 80, 20, 6, 2]
NC = len(COUNTS)
B, D = 6, 4
# the modules hold float32 tables: a log prior of -5 is off by up to 3e-7, which moves small gradient
# entries by a few 1e-8
RTOL, ATOL = 1e-6, 1e-7


# ---- the tables, by hand -------------------------------------------------------------------------------


def hand_dbm_margins(K=0.1, tau=1.0, ref=None):
    ref = min(COUNTS) if ref is None else ref
    return torch.tensor([K * (ref / n) ** tau for n in COUNTS], dtype=F64)


def hand_log_prior(tau=1.0):
    total = sum(COUNTS)
    return torch.tensor([tau * math.log(n / total) for n in COUNTS], dtype=F64)


def hand_cb(beta):
    raw = [(1 - beta) / (1 - beta**n) for n in COUNTS]
    return torch.tensor([r * NC / sum(raw) for r in raw], dtype=F64)


def hand_ldam(max_m=0.5):
    return torch.tensor([max_m * (min(COUNTS) / n) ** 0.25 for n in COUNTS], dtype=F64)


# ---- inputs ---------------------------------------------------------------------------------------------


def cos_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = (0.9 * torch.tanh(torch.randn(B, NC, generator=gen, dtype=F64))).requires_grad_()
    target = torch.tensor([0, 1, 4, 2, 3, 0])
    return z, target


def feature_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=gen, dtype=F64).requires_grad_()
    w = torch.randn(NC, D, generator=gen, dtype=F64).requires_grad_()
    target = torch.tensor([0, 1, 4, 2, 3, -100])
    return x, w, target


def loss_and_grads(loss, leaves):
    return loss.detach(), torch.autograd.grad(loss, leaves)


def assert_same(a, b, rtol=RTOL, atol=ATOL):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, rtol=rtol, atol=atol)
    assert len(ga) == len(gb)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def ref(*args, **kwargs):
    return fm.margin_cross_entropy(*args, backend="reference", **kwargs)


# ---- DBM -------------------------------------------------------------------------------------------------

DBM_EXTRA = {
    "ce": {},
    "bs": {"logit_offset": hand_log_prior()},
    "cb": {"class_weight": hand_cb(0.9999)},
    "drw": {"class_weight": torch.ones(NC, dtype=F64)},
}  # DRW at epoch 0: beta = 0


@pytest.mark.parametrize("variant", ["ce", "bs", "cb", "drw"])
def test_dbm_module_and_function_equal_the_loss_with_hand_tables(variant):
    K, tau, s = 0.2, 0.8, 16.0
    z, target = cos_inputs()
    expected = loss_and_grads(
        ref(
            z,
            target,
            input_is_cosine=True,
            scale=s,
            class_margins=hand_dbm_margins(K, tau),
            margin_type="additive_angular",
            lambda_inst=1.0,
            **DBM_EXTRA[variant],
        ),
        [z],
    )
    module = fm.DBMLoss(COUNTS, variant=variant, K=K, tau=tau, scale=s)
    assert_same(loss_and_grads(module(z, target), [z]), expected)
    functional = fm.dbm_loss(z, target, class_counts=COUNTS, variant=variant, K=K, tau=tau, scale=s)
    assert_same(loss_and_grads(functional, [z]), expected)


def test_dbm_margin_ref_last_uses_the_last_class():
    counts = [300, 2, 80, 20, 6]  # unsorted: min is class 1, last is class 4
    z, target = cos_inputs()
    margins = torch.tensor([0.1 * 6 / n for n in counts], dtype=F64)
    expected = ref(
        z,
        target,
        input_is_cosine=True,
        scale=30.0,
        class_margins=margins,
        margin_type="additive_angular",
        lambda_inst=1.0,
    )
    got = fm.DBMLoss(counts, margin_ref="last")(z, target)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    assert not torch.isclose(fm.DBMLoss(counts, margin_ref="min")(z, target), got)


def test_dbm_hard_mode_and_lambda_pass_through():
    z, target = cos_inputs()
    expected = ref(
        z,
        target,
        input_is_cosine=True,
        scale=30.0,
        class_margins=hand_dbm_margins(),
        margin_type="additive_angular",
        lambda_inst=2.0,
        hard_mode="all",
    )
    got = fm.DBMLoss(COUNTS, lambda_inst=2.0, hard_mode="all")(z, target)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)


def test_set_epoch_switches_the_drw_weights_at_160():
    z, target = cos_inputs()
    module = fm.DBMLoss(COUNTS, variant="drw")
    plain = ref(
        z,
        target,
        input_is_cosine=True,
        scale=30.0,
        class_margins=hand_dbm_margins(),
        margin_type="additive_angular",
        lambda_inst=1.0,
    )
    weighted = ref(
        z,
        target,
        input_is_cosine=True,
        scale=30.0,
        class_margins=hand_dbm_margins(),
        margin_type="additive_angular",
        lambda_inst=1.0,
        class_weight=hand_cb(0.9999),
    )
    for epoch in (0, 100, 159):
        module.set_epoch(epoch)
        torch.testing.assert_close(module(z, target), plain, rtol=RTOL, atol=ATOL)
        assert torch.equal(module.class_weight, torch.ones(NC))
    for epoch in (160, 161, 250):
        module.set_epoch(epoch)
        torch.testing.assert_close(module(z, target), weighted, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(module.class_weight.double(), hand_cb(0.9999), rtol=RTOL, atol=ATOL)
    # the functional form takes the epoch directly
    torch.testing.assert_close(
        fm.dbm_loss(z, target, class_counts=COUNTS, variant="drw", epoch=160), weighted, rtol=RTOL, atol=ATOL
    )
    torch.testing.assert_close(
        fm.dbm_loss(z, target, class_counts=COUNTS, variant="drw", epoch=159), plain, rtol=RTOL, atol=ATOL
    )


def test_set_epoch_custom_schedule_and_other_variants():
    module = fm.DBMLoss(COUNTS, variant="drw", drw_betas=(0.0, 0.9, 0.99), drw_step=5)
    module.set_epoch(7)
    torch.testing.assert_close(module.class_weight.double(), hand_cb(0.9), rtol=RTOL, atol=ATOL)
    module.set_epoch(10)
    torch.testing.assert_close(module.class_weight.double(), hand_cb(0.99), rtol=RTOL, atol=ATOL)
    cb = fm.DBMLoss(COUNTS, variant="cb", cb_beta=0.99)
    before = cb.class_weight.clone()
    cb.set_epoch(500)  # no effect outside DRW
    assert torch.equal(cb.class_weight, before)
    torch.testing.assert_close(before.double(), hand_cb(0.99), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("variant", ["ce", "bs", "drw"])
def test_dbm_on_features_equals_dbm_on_classifier_cosines(variant):
    """DBMLoss(features, weight=head.weight) (cosine head, fused normalisation) equals DBMLoss on
    head(features), loss and the gradients of the features and of the classifier weight."""
    gen = torch.Generator().manual_seed(1)
    head = fm.CosineClassifier(D, NC, dtype=F64)
    x = torch.randn(B, D, generator=gen, dtype=F64).requires_grad_()
    target = torch.tensor([0, 1, 4, 2, 3, 0])
    module = fm.DBMLoss(COUNTS, variant=variant, scale=10.0)
    module.set_epoch(200)
    fused_head = loss_and_grads(module(x, target, weight=head.weight), [x, head.weight])
    via_cosines = loss_and_grads(module(head(x), target), [x, head.weight])
    assert_same(fused_head, via_cosines, rtol=1e-10, atol=1e-12)


# ---- the other presets -------------------------------------------------------------------------------------


def test_ldam_module_and_function():
    z, target = cos_inputs()
    expected = loss_and_grads(ref(z, target, input_is_cosine=True, scale=30.0, class_margins=hand_ldam()), [z])
    assert_same(loss_and_grads(fm.LDAMLoss(COUNTS)(z, target), [z]), expected)
    assert_same(loss_and_grads(fm.ldam_loss(z, target, class_counts=COUNTS), [z]), expected)


def test_ldam_drw_module_with_class_weight():
    x, w, target = feature_inputs()
    cw = hand_cb(0.9999)
    expected = loss_and_grads(ref(x, target, w, scale=20.0, class_margins=hand_ldam(0.3), class_weight=cw), [x, w])
    got = fm.LDAMLoss(COUNTS, max_m=0.3, scale=20.0, class_weight=cw.float())(x, target, weight=w)
    assert_same(loss_and_grads(got, [x, w]), expected)


def test_elm_module_and_function():
    z, target = cos_inputs()
    expected = loss_and_grads(
        ref(z, target, input_is_cosine=True, scale=30.0, class_margins=hand_ldam(), lambda_elm=0.5), [z]
    )
    assert_same(loss_and_grads(fm.ELMLoss(COUNTS, lambda_elm=0.5)(z, target), [z]), expected)
    assert_same(loss_and_grads(fm.elm_loss(z, target, class_counts=COUNTS, lambda_elm=0.5), [z]), expected)


@pytest.mark.parametrize("fold", [None, "threshold", "easy"])
def test_arcface_module_and_function(fold):
    x, w, target = feature_inputs()
    expected = loss_and_grads(
        ref(
            x,
            target,
            w,
            scale=64.0,
            class_margins=torch.full((NC,), 0.5, dtype=F64),
            margin_type="additive_angular",
            angular_fold=fold,
        ),
        [x, w],
    )
    assert_same(loss_and_grads(fm.ArcFaceLoss(angular_fold=fold)(x, target, weight=w), [x, w]), expected)
    assert_same(loss_and_grads(fm.arcface_loss(x, target, w, angular_fold=fold), [x, w]), expected)


def test_cosface_module_and_function():
    z, target = cos_inputs()
    expected = loss_and_grads(
        ref(z, target, input_is_cosine=True, scale=30.0, class_margins=torch.full((NC,), 0.2, dtype=F64)), [z]
    )
    assert_same(loss_and_grads(fm.CosFaceLoss(margin=0.2, scale=30.0)(z, target), [z]), expected)
    assert_same(loss_and_grads(fm.cosface_loss(z, target, margin=0.2, scale=30.0), [z]), expected)


def test_balanced_softmax_module_and_function():
    z, target = cos_inputs()
    expected = loss_and_grads(F.cross_entropy(z + hand_log_prior(), target), [z])
    assert_same(loss_and_grads(fm.BalancedSoftmaxLoss(COUNTS)(z, target), [z]), expected)
    assert_same(loss_and_grads(fm.balanced_softmax_loss(z, target, class_counts=COUNTS), [z]), expected)


def test_balanced_softmax_on_a_linear_head():
    x, w, target = feature_inputs()
    b = torch.randn(NC, generator=torch.Generator().manual_seed(3), dtype=F64).requires_grad_()
    expected = loss_and_grads(F.cross_entropy(F.linear(x, w, b) + hand_log_prior(), target), [x, w, b])
    got = fm.BalancedSoftmaxLoss(COUNTS)(x, target, weight=w, bias=b)
    assert_same(loss_and_grads(got, [x, w, b]), expected)
    got = fm.balanced_softmax_loss(x, target, w, bias=b, class_counts=COUNTS)
    assert_same(loss_and_grads(got, [x, w, b]), expected)


def test_balanced_softmax_on_a_cosine_head():
    x, w, target = feature_inputs()
    logits = 8.0 * F.normalize(x, dim=1) @ F.normalize(w, dim=1).t()
    expected = loss_and_grads(F.cross_entropy(logits + hand_log_prior(), target), [x, w])
    got = fm.BalancedSoftmaxLoss(COUNTS, feature_head="cosine", scale=8.0)(x, target, weight=w)
    assert_same(loss_and_grads(got, [x, w]), expected)


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_logit_adjusted_module_and_function(tau):
    z, target = cos_inputs()
    expected = loss_and_grads(F.cross_entropy(z + hand_log_prior(tau), target), [z])
    assert_same(loss_and_grads(fm.LogitAdjustedLoss(COUNTS, tau=tau)(z, target), [z]), expected)
    assert_same(loss_and_grads(fm.logit_adjusted_loss(z, target, class_counts=COUNTS, tau=tau), [z]), expected)


def test_margin_loss_forward_passes_extra_options():
    z, target = cos_inputs()
    pert = torch.randn(B, NC, generator=torch.Generator().manual_seed(4), dtype=F64)
    module = fm.MarginLoss(class_margins=hand_ldam(), scale=5.0, reduction="none")
    expected = ref(
        z, target, input_is_cosine=True, scale=5.0, class_margins=hand_ldam(), pair_perturbation=pert, reduction="none"
    )
    torch.testing.assert_close(module(z, target, pair_perturbation=pert), expected, rtol=RTOL, atol=ATOL)
    loss, aux = module(z, target, return_aux=True)
    assert aux.pred.tolist() == z.argmax(1).tolist()


def test_module_repr_names_its_options():
    text = repr(fm.DBMLoss(COUNTS, scale=16.0))
    assert "scale=16.0" in text and "additive_angular" in text and "backend='auto'" in text


# ---- CosineClassifier ---------------------------------------------------------------------------------


def test_cosine_classifier_returns_cosines_and_has_linear_layout():
    head = fm.CosineClassifier(D, NC, dtype=F64)
    assert head.weight.shape == (NC, D)
    torch.testing.assert_close(head.weight.norm(dim=1), torch.ones(NC, dtype=F64))  # published init
    x = torch.randn(B, D, dtype=F64)
    expected = torch.tensor(
        [
            [sum(a * b for a, b in zip(xi, wj)) / (math.hypot(*xi) * math.hypot(*wj)) for wj in head.weight.tolist()]
            for xi in x.tolist()
        ],
        dtype=F64,
    )
    torch.testing.assert_close(head(x), expected)


def test_cosine_classifier_loads_a_published_in_out_weight():
    """The published NormedLinear: weight (in, out), out = normalize(x, dim=1) @ normalize(W, dim=0)."""
    gen = torch.Generator().manual_seed(2)
    published = torch.randn(D, NC, generator=gen, dtype=F64)
    x = torch.randn(B, D, generator=gen, dtype=F64)
    expected = F.normalize(x, dim=1) @ F.normalize(published, dim=0)
    head = fm.CosineClassifier.from_published(published)
    assert head.weight.shape == (NC, D) and head.weight.dtype == F64
    torch.testing.assert_close(head(x), expected)
    other = fm.CosineClassifier(D, NC, dtype=F64)
    other.load_published_weight(published)
    torch.testing.assert_close(other(x), expected)
    assert torch.equal(other.weight, published.t())


# ---- dtype and device moves ---------------------------------------------------------------------------


def _buffers(module):
    return {name: buf for name, buf in module.named_buffers()}


@pytest.mark.parametrize("variant", ["ce", "bs", "cb", "drw"])
def test_dbm_module_to_float64(variant):
    module = fm.DBMLoss(COUNTS, variant=variant)
    assert all(b.dtype == torch.float32 for b in _buffers(module).values())
    module = module.to(F64)
    assert _buffers(module) and all(b.dtype == F64 for b in _buffers(module).values())
    module.set_epoch(170)
    assert all(b.dtype == F64 for b in _buffers(module).values())
    z, target = cos_inputs()
    assert module(z, target).dtype == F64


@pytest.mark.parametrize(
    "make",
    [
        lambda: fm.DBMLoss(COUNTS, variant="drw"),
        lambda: fm.DBMLoss(COUNTS, variant="bs"),
        lambda: fm.LDAMLoss(COUNTS),
        lambda: fm.ELMLoss(COUNTS),
        lambda: fm.BalancedSoftmaxLoss(COUNTS),
        lambda: fm.LogitAdjustedLoss(COUNTS),
    ],
    ids=["DBM-drw", "DBM-bs", "LDAM", "ELM", "BS", "LA"],
)
def test_module_buffers_follow_device_moves(make):
    """The "meta" device stands in for a GPU: every table moves, and DRW's switch stays there."""
    module = make().to("meta")
    buffers = _buffers(module)
    assert buffers and all(b.device.type == "meta" for b in buffers.values())
    if isinstance(module, fm.DBMLoss):
        module.set_epoch(200)
        assert all(b.device.type == "meta" for b in _buffers(module).values())


def test_constant_margin_modules_build_their_table_on_the_input_device_and_dtype():
    z, target = cos_inputs()
    loss = fm.ArcFaceLoss(margin=0.3, scale=8.0)(z, target)
    assert loss.dtype == F64
    expected = ref(
        z,
        target,
        input_is_cosine=True,
        scale=8.0,
        class_margins=torch.full((NC,), 0.3, dtype=F64),
        margin_type="additive_angular",
    )
    torch.testing.assert_close(loss, expected, rtol=RTOL, atol=ATOL)


# ---- the public surface ----------------------------------------------------------------------------------


def test_public_names_exist():
    for name in fm.__all__:
        assert hasattr(fm, name), name
    assert isinstance(fm.__version__, str)


def test_return_aux_side_outputs():
    z, target = cos_inputs()
    loss, aux = fm.margin_cross_entropy(z, target, return_aux=True, backend="reference")
    assert isinstance(aux, fm.MarginAux)
    assert aux.lse.shape == (B,) and aux.pred.dtype == torch.int64 and aux.hard.dtype == torch.bool
    torch.testing.assert_close(aux.lse, torch.logsumexp(z.detach(), 1))
    assert torch.equal(aux.hard, z.argmax(1) != target)


def test_available_backends_reports_every_backend():
    status = fm.available_backends("cpu", torch.float32)
    assert {"reference", "triton", "cuda", "cpu"} <= set(status)
    assert status["reference"] == "ok"
    assert status["cuda"] != "ok"


def test_head_defaults():
    """No weight: logits; a weight: the cosine head."""
    x, w, target = feature_inputs()
    torch.testing.assert_close(ref(x, target, w), ref(x, target, w, head="cosine"), rtol=0, atol=0)
    z, t = cos_inputs()
    torch.testing.assert_close(ref(z, t), F.cross_entropy(z, t), rtol=1e-12, atol=0)
