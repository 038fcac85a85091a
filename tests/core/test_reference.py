"""The pure-PyTorch reference loss against docs/loss.md sections 1-5.

* margins, offsets and weights off: ``F.cross_entropy`` exactly (every reduction, ignore_index, label
  smoothing, class weights and their combinations), logits, linear and cosine heads;
* hand-derived values for every method, computed here with ``math`` from the papers' formulas;
* float64 ``gradcheck`` for every option (the straight-through estimator is checked by its definition);
* the published-code semantics docs/loss.md pins down (hard-positive argmax, ties, ELM's ``c*``, the prior
  after the scale, DRW's weighted-mean divisor);
* no NaN/inf at cosines of exactly +-1 or on an all-zero feature row.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import fused_margin as fm
from fused_margin.core import reference, rowmath
from fused_margin.core.spec import ACOS_CLAMP, LossTables, MarginLossSpec

F64 = torch.float64


def mce(*args, **kwargs):
    """The public entry point, pinned to the reference backend."""
    kwargs.setdefault("backend", "reference")
    return fm.margin_cross_entropy(*args, **kwargs)


def lse(values):
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def t64(values, grad=False):
    return torch.tensor(values, dtype=F64, requires_grad=grad)


def labels(values):
    return torch.tensor(values, dtype=torch.int64)


def assert_close(actual, expected, rtol=1e-12, atol=1e-12):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual.detach(), expected, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------------
# 1. With margins, offsets and perturbations off the loss is F.cross_entropy
# ---------------------------------------------------------------------------------------------------

B, D, C = 6, 4, 5
CE_TARGET = [0, 3, 1, 4, 2, 1]


def _ce_inputs(head, ignore_index, dtype=F64):
    gen = torch.Generator().manual_seed(0)
    target = labels(CE_TARGET)
    if ignore_index == -100:
        target[2] = -100
    x = torch.randn(B, C if head == "logits" else D, generator=gen, dtype=dtype).requires_grad_()
    w = b = None
    if head != "logits":
        w = torch.randn(C, D, generator=gen, dtype=dtype).requires_grad_()
    if head == "linear":
        b = torch.randn(C, generator=gen, dtype=dtype).requires_grad_()
    return x, w, b, target


@pytest.mark.parametrize("head", ["logits", "linear", "linear_nobias", "cosine"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "class_weight"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
@pytest.mark.parametrize("ignore_index", [None, -100, 2], ids=["no_ignored", "ignore-100", "ignore_class2"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_margins_off_equals_cross_entropy(head, weighted, label_smoothing, ignore_index, reduction):
    """ignore_index=2 is a valid class: rows labelled 2 are dropped, as in F.cross_entropy."""
    ref_head = "linear" if head == "linear_nobias" else head
    x, w, b, target = _ce_inputs(head, ignore_index)
    if head == "linear_nobias":
        b = None
    ii = -100 if ignore_index is None else ignore_index
    cw = torch.tensor([0.5, 2.0, 1.0, 3.0, 0.25], dtype=F64) if weighted else None
    scale = 3.0 if head == "cosine" else 1.0

    loss = mce(
        x,
        target,
        w,
        bias=b,
        head=ref_head,
        scale=scale,
        class_weight=cw,
        reduction=reduction,
        ignore_index=ii,
        label_smoothing=label_smoothing,
    )
    if head == "logits":
        logits = x
    elif head == "cosine":
        logits = scale * F.normalize(x, dim=1) @ F.normalize(w, dim=1).t()
    else:
        logits = F.linear(x, w, b)
    expected = F.cross_entropy(
        logits, target, weight=cw, reduction=reduction, ignore_index=ii, label_smoothing=label_smoothing
    )
    assert loss.dtype == F64 and loss.shape == expected.shape
    assert_close(loss, expected)

    leaves = [t for t in (x, w, b) if t is not None]
    grad_out = torch.linspace(0.5, 1.5, B, dtype=F64) if reduction == "none" else torch.tensor(1.0, dtype=F64)
    got = torch.autograd.grad(loss, leaves, grad_out)
    want = torch.autograd.grad(expected, leaves, grad_out)
    for g, e in zip(got, want):
        assert_close(g, e)


@pytest.mark.parametrize("head", ["logits", "linear"])
def test_margins_off_equals_cross_entropy_float32(head):
    x, w, b, target = _ce_inputs(head, -100, dtype=torch.float32)
    cw = torch.tensor([0.5, 2.0, 1.0, 3.0, 0.25])
    loss = mce(x, target, w, bias=b, head=head, class_weight=cw, label_smoothing=0.1)
    logits = x if head == "logits" else F.linear(x, w, b)
    expected = F.cross_entropy(logits, target, weight=cw, label_smoothing=0.1)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    leaves = [t for t in (x, w, b) if t is not None]
    for g, e in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(expected, leaves)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_mean_with_every_row_ignored_is_nan_like_pytorch():
    z = t64([[0.1, 0.2], [0.3, -0.4]])
    target = labels([-100, -100])
    assert torch.isnan(mce(z, target))
    assert torch.isnan(F.cross_entropy(z, target))
    assert mce(z, target, reduction="sum").item() == 0.0


# ---------------------------------------------------------------------------------------------------
# 2. Hand-derived values (math only, from the papers' formulas)
# ---------------------------------------------------------------------------------------------------


def test_dbm_two_class_worked_by_hand():
    """DBM: M = m_y (1 + lambda h (1 - cos_y) / 2), target s cos(theta_y + M); row 0 is a hard positive
    (argmax 1 != label 0), row 1 an easy one."""
    s, m, lam = 4.0, [0.1, 0.3], 1.0
    cos = [[0.2, 0.6], [0.1, 0.7]]
    # row 0, hard: M = 0.1 (1 + (1 - 0.2) / 2) = 0.14
    M0 = 0.1 * (1.0 + lam * (1.0 - 0.2) / 2.0)
    assert math.isclose(M0, 0.14)
    t0 = s * math.cos(math.acos(0.2) + M0)
    lse0 = lse([t0, s * 0.6])
    loss0 = lse0 - t0
    # row 1, easy: M = m_1 = 0.3
    t1 = s * math.cos(math.acos(0.7) + 0.3)
    loss1 = lse([s * 0.1, t1]) - t1

    z = t64(cos, grad=True)
    loss, aux = mce(
        z,
        labels([0, 1]),
        input_is_cosine=True,
        scale=s,
        class_margins=t64(m),
        margin_type="additive_angular",
        lambda_inst=lam,
        return_aux=True,
    )
    assert_close(loss, (loss0 + loss1) / 2)
    assert aux.pred.tolist() == [1, 1]
    assert aux.hard.tolist() == [True, False]
    assert_close(aux.lse, [lse0, lse([s * 0.1, t1])])

    # d loss / d cos_00 goes through theta and through the (undetached) difficulty term:
    # d psi / dc = sin(theta + M) / sin(theta) + sin(theta + M) m_y lambda / 2
    (grad,) = torch.autograd.grad(loss, z)
    theta = math.acos(0.2)
    dpsi = math.sin(theta + M0) / math.sin(theta) + math.sin(theta + M0) * 0.1 * lam / 2.0
    p_target = math.exp(t0 - lse0)
    assert_close(grad[0, 0], 0.5 * (p_target - 1.0) * s * dpsi)
    assert_close(grad[0, 1], 0.5 * (1.0 - p_target) * s)


def test_dbm_all_mode_applies_the_instance_margin_to_easy_rows():
    s, m, lam = 4.0, [0.1, 0.3], 2.0
    cos = [[0.1, 0.7]]
    M = 0.3 * (1.0 + lam * (1.0 - 0.7) / 2.0)
    t = s * math.cos(math.acos(0.7) + M)
    loss, aux = mce(
        t64(cos),
        labels([1]),
        input_is_cosine=True,
        scale=s,
        class_margins=t64(m),
        margin_type="additive_angular",
        lambda_inst=lam,
        hard_mode="all",
        return_aux=True,
    )
    assert_close(loss, lse([s * 0.1, t]) - t)
    assert aux.hard.tolist() == [True]


LT_COUNTS = [400, 100, 25]
# LDAM: m_j proportional to n_j^-1/4, the rarest (25) gets max_m: m_j = max_m (25 / n_j)^(1/4)
LDAM_M = [0.5 * (25 / 400) ** 0.25, 0.5 * (25 / 100) ** 0.25, 0.5]


def test_ldam_by_hand():
    assert math.isclose(LDAM_M[0], 0.25) and math.isclose(LDAM_M[1], 0.5 / math.sqrt(2.0))
    s = 10.0
    cos = [[0.6, 0.2, 0.3], [0.5, 0.4, 0.1], [0.0, 0.3, 0.8]]
    y = [0, 2, 1]
    expected = 0.0
    for row, label in zip(cos, y):
        logits = [s * c for c in row]
        logits[label] = s * (row[label] - LDAM_M[label])
        expected += lse(logits) - logits[label]
    loss = fm.ldam_loss(t64(cos), labels(y), class_counts=LT_COUNTS, scale=s, backend="reference")
    assert_close(loss, expected / 3, rtol=1e-6)  # the margin table is built in float32


def test_elm_by_hand():
    """ELM eq. (7): target s (cos_y - m_y + lambda m_{c*}), c* the strongest wrong class."""
    s, lam = 10.0, 0.5
    cos = [[0.6, 0.2, 0.3], [0.5, 0.4, 0.1], [0.0, 0.3, 0.8]]
    y = [0, 2, 1]
    c_star = [2, 0, 2]  # by inspection of each row without its label
    expected = 0.0
    for row, label, wrong in zip(cos, y, c_star):
        logits = [s * c for c in row]
        logits[label] = s * (row[label] - LDAM_M[label] + lam * LDAM_M[wrong])
        expected += lse(logits) - logits[label]
    loss = fm.elm_loss(t64(cos), labels(y), class_counts=LT_COUNTS, lambda_elm=lam, scale=s, backend="reference")
    assert_close(loss, expected / 3, rtol=1e-6)


ARC_M = 0.5
ARC_COS = [[0.3, 0.1, -0.2], [0.2, -0.95, 0.1], [0.4, 0.5, -0.2]]
ARC_Y = [0, 1, 2]  # target cosines 0.3 (regular), -0.95 (past cos(pi - m)), -0.2 (negative)


def _arc_psi(c, fold):
    if fold == "threshold" and c <= math.cos(math.pi - ARC_M):
        return c - ARC_M * math.sin(ARC_M)
    if fold == "easy" and c <= 0:
        return c
    return math.cos(math.acos(c) + ARC_M)


@pytest.mark.parametrize("fold", [None, "threshold", "easy"])
def test_arcface_by_hand(fold):
    assert -0.95 <= math.cos(math.pi - ARC_M) < -0.2  # row 1 is folded by "threshold", row 2 is not
    s = 8.0
    expected = 0.0
    for row, label in zip(ARC_COS, ARC_Y):
        logits = [s * c for c in row]
        logits[label] = s * _arc_psi(row[label], fold)
        expected += lse(logits) - logits[label]
    loss = fm.arcface_loss(t64(ARC_COS), labels(ARC_Y), margin=ARC_M, scale=s, angular_fold=fold, backend="reference")
    assert_close(loss, expected / 3, rtol=1e-6)


def test_arcface_folds_differ_where_they_should():
    s = 8.0
    per_row = {
        fold: fm.arcface_loss(
            t64(ARC_COS), labels(ARC_Y), margin=ARC_M, scale=s, angular_fold=fold, reduction="none", backend="reference"
        )
        for fold in (None, "threshold", "easy")
    }
    assert torch.equal(per_row[None][0], per_row["threshold"][0])
    assert torch.equal(per_row[None][0], per_row["easy"][0])
    assert not torch.isclose(per_row[None][1], per_row["threshold"][1])  # -0.95 is folded
    assert torch.equal(per_row[None][2], per_row["threshold"][2])  # -0.2 is not
    assert not torch.isclose(per_row[None][2], per_row["easy"][2])  # but has no margin under "easy"


def test_cosface_by_hand():
    s, m = 16.0, 0.35
    expected = 0.0
    for row, label in zip(ARC_COS, ARC_Y):
        logits = [s * c for c in row]
        logits[label] = s * (row[label] - m)
        expected += lse(logits) - logits[label]
    loss = fm.cosface_loss(t64(ARC_COS), labels(ARC_Y), margin=m, scale=s, reduction="sum", backend="reference")
    assert_close(loss, expected, rtol=1e-6)


def test_balanced_softmax_prior_is_added_after_the_scale():
    """l_j = s z_j + log(n_j / sum n): with s = 2 a prior inside the scale would give a different loss."""
    s = 2.0
    z = [[1.0, -0.5, 0.25], [0.2, 0.3, -1.0]]
    y = [1, 2]
    logp = [math.log(n / sum(LT_COUNTS)) for n in LT_COUNTS]
    expected = 0.0
    for row, label in zip(z, y):
        logits = [s * v + a for v, a in zip(row, logp)]
        expected += lse(logits) - logits[label]
    loss = fm.balanced_softmax_loss(t64(z), labels(y), class_counts=LT_COUNTS, scale=s, backend="reference")
    assert_close(loss, expected / 2, rtol=1e-6)
    inside = 0.0
    for row, label in zip(z, y):
        logits = [s * (v + a) for v, a in zip(row, logp)]
        inside += lse(logits) - logits[label]
    assert abs(loss.item() - inside / 2) > 1e-2


def test_dbm_balanced_softmax_by_hand():
    """DBM-BS: target s cos(theta_y + M) + log p_y, others s cos_j + log p_j."""
    s, K, tau = 5.0, 0.2, 1.0
    counts = [400, 100, 25]
    m = [K * (25 / n) ** tau for n in counts]
    logp = [math.log(n / sum(counts)) for n in counts]
    cos = [[0.1, 0.6, 0.2], [0.7, 0.2, 0.1]]
    y = [0, 0]  # row 0 hard (argmax 1), row 1 easy
    expected = 0.0
    for row, label in zip(cos, y):
        hard = max(range(3), key=lambda j: row[j]) != label
        M = m[label] * (1.0 + 1.0 * hard * (1.0 - row[label]) / 2.0)
        logits = [s * c + a for c, a in zip(row, logp)]
        logits[label] = s * math.cos(math.acos(row[label]) + M) + logp[label]
        expected += lse(logits) - logits[label]
    loss = fm.dbm_loss(
        t64(cos), labels(y), class_counts=counts, variant="bs", K=K, tau=tau, scale=s, backend="reference"
    )
    assert_close(loss, expected / 2, rtol=1e-6)


def test_logit_adjustment_by_hand():
    tau = 1.5
    z = [[1.0, -0.5, 0.25], [0.2, 0.3, -1.0]]
    y = [0, 2]
    offs = [tau * math.log(n / sum(LT_COUNTS)) for n in LT_COUNTS]
    losses = []
    for row, label in zip(z, y):
        logits = [v + a for v, a in zip(row, offs)]
        losses.append(lse(logits) - logits[label])
    loss = fm.logit_adjusted_loss(
        t64(z), labels(y), class_counts=LT_COUNTS, tau=tau, reduction="none", backend="reference"
    )
    assert_close(loss, losses, rtol=1e-6)


def test_marc_affine_linear_head_by_hand():
    """MARC: z'_j = omega_j z_j + beta_j ||W_j||, z_j = x . W_j + b_j."""
    x = [[1.0, 2.0], [-0.5, 0.5]]
    W = [[3.0, 4.0], [1.0, -1.0], [0.0, 2.0]]
    b = [0.1, -0.2, 0.3]
    omega = [0.5, 1.5, 2.0]
    beta = [0.1, -0.3, 0.2]
    y = [2, 0]
    expected = []
    for row, label in zip(x, y):
        logits = []
        for wj, bj, oj, betaj in zip(W, b, omega, beta):
            z = row[0] * wj[0] + row[1] * wj[1] + bj
            logits.append(oj * z + betaj * math.hypot(*wj))
        expected.append(lse(logits) - logits[label])
    loss = mce(
        t64(x), labels(y), t64(W), bias=t64(b), head="linear", omega=t64(omega), beta=t64(beta), reduction="none"
    )
    assert_close(loss, expected)


def test_marc_affine_cosine_head_with_margin_by_hand():
    """The margin applies to the calibrated cosine: target s (z'_y - m_y)."""
    x = [[1.0, 2.0], [-0.5, 0.5]]
    W = [[3.0, 4.0], [1.0, -1.0], [0.0, 2.0]]
    omega = [0.5, 1.5, 2.0]
    beta = [0.1, -0.3, 0.2]
    m = [0.1, 0.2, 0.3]
    s = 3.0
    y = [2, 0]
    expected = []
    for row, label in zip(x, y):
        zp = []
        for wj, oj, betaj in zip(W, omega, beta):
            cos = (row[0] * wj[0] + row[1] * wj[1]) / (math.hypot(*row) * math.hypot(*wj))
            zp.append(oj * cos + betaj * math.hypot(*wj))
        logits = [s * v for v in zp]
        logits[label] = s * (zp[label] - m[label])
        expected.append(lse(logits) - logits[label])
    loss = mce(
        t64(x), labels(y), t64(W), scale=s, class_margins=t64(m), omega=t64(omega), beta=t64(beta), reduction="none"
    )
    assert_close(loss, expected)


def test_marc_affine_logits_head_uses_class_norms():
    z = [[0.3, -0.2, 0.8]]
    omega, beta, norms = [2.0, 0.5, 1.0], [0.1, 0.2, -0.4], [1.5, 3.0, 0.5]
    logits = [o * v + b_ * n for v, o, b_, n in zip(z[0], omega, beta, norms)]
    loss = mce(t64(z), labels([1]), omega=t64(omega), beta=t64(beta), class_norms=t64(norms))
    assert_close(loss, lse(logits) - logits[1])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_label_smoothing_with_class_weights_by_hand(reduction):
    """loss_i = (1 - eps) w_y (lse - l_y) + eps / C sum_j w_j (lse - l_j); mean divides by sum w_y."""
    eps = 0.2
    w = [0.5, 2.0, 1.5]
    z = [[1.0, -0.5, 0.25], [0.2, 0.3, -1.0], [3.0, 0.0, 0.0]]
    y = [1, 2, -100]
    rows = []
    for row, label in zip(z, y):
        if label == -100:
            rows.append(0.0)
            continue
        L = lse(row)
        smooth = sum(wj * (L - lj) for wj, lj in zip(w, row))
        rows.append((1 - eps) * w[label] * (L - row[label]) + eps / 3 * smooth)
    loss = mce(t64(z), labels(y), class_weight=t64(w), label_smoothing=eps, reduction=reduction)
    expected = {"none": rows, "sum": sum(rows), "mean": sum(rows) / (w[1] + w[2])}[reduction]
    assert_close(loss, expected)


def test_drw_weighted_mean_divides_by_the_kept_rows_weights():
    """LDAM-DRW: mean = sum_i w_{y_i} nll_i / sum_i w_{y_i} over kept rows (not / B)."""
    s = 10.0
    w = [0.2, 0.8, 2.0]
    cos = [[0.6, 0.2, 0.3], [0.5, 0.4, 0.1], [0.0, 0.3, 0.8], [0.1, 0.1, 0.1]]
    y = [0, 2, 2, -100]
    num = den = 0.0
    for row, label in zip(cos, y):
        if label < 0:
            continue
        logits = [s * c for c in row]
        logits[label] = s * (row[label] - LDAM_M[label])
        num += w[label] * (lse(logits) - logits[label])
        den += w[label]
    assert not math.isclose(den, 3.0)
    loss = fm.ldam_loss(t64(cos), labels(y), class_counts=LT_COUNTS, scale=s, class_weight=t64(w), backend="reference")
    assert_close(loss, num / den, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------
# 3. Published-code semantics
# ---------------------------------------------------------------------------------------------------


def _dbm_row_loss(cos_row, label, m_y, s, hard, lam=1.0, offsets=None):
    M = m_y * (1.0 + lam * hard * (1.0 - cos_row[label]) / 2.0)
    offsets = offsets or [0.0] * len(cos_row)
    logits = [s * c + a for c, a in zip(cos_row, offsets)]
    logits[label] = s * math.cos(math.acos(cos_row[label]) + M) + offsets[label]
    return lse(logits) - logits[label]


def test_hard_positive_argmax_is_taken_before_the_offset():
    """Offset [-5, 0] would move the argmax to the label; the hard flag must come from the cosines."""
    s, m = 4.0, [0.2, 0.2]
    cos, offs = [[0.5, 0.4]], [-5.0, 0.0]
    loss, aux = mce(
        t64(cos),
        labels([1]),
        input_is_cosine=True,
        scale=s,
        class_margins=t64(m),
        margin_type="additive_angular",
        lambda_inst=1.0,
        logit_offset=t64(offs),
        return_aux=True,
    )
    assert aux.pred.tolist() == [0] and aux.hard.tolist() == [True]
    assert_close(loss, _dbm_row_loss(cos[0], 1, 0.2, s, hard=True, offsets=offs))


def test_hard_positive_argmax_is_taken_before_the_pair_perturbation():
    cos = [[0.5, 0.4, 0.1]]
    pert = t64([[-5.0, 0.0, 0.0]])
    _, aux = mce(
        t64(cos),
        labels([1]),
        input_is_cosine=True,
        scale=4.0,
        class_margins=t64([0.2] * 3),
        margin_type="additive_angular",
        lambda_inst=1.0,
        pair_perturbation=pert,
        return_aux=True,
    )
    assert aux.pred.tolist() == [0] and aux.hard.tolist() == [True]


def test_hard_positive_argmax_is_taken_after_the_marc_affine():
    """omega = [0.5, 1] turns cosines [0.5, 0.4] into [0.25, 0.4]: label 1 is then the argmax (easy)."""
    s, m = 4.0, [0.2, 0.2]
    loss, aux = mce(
        t64([[0.5, 0.4]]),
        labels([1]),
        input_is_cosine=True,
        scale=s,
        class_margins=t64(m),
        margin_type="additive_angular",
        lambda_inst=1.0,
        omega=t64([0.5, 1.0]),
        return_aux=True,
    )
    assert aux.pred.tolist() == [1] and aux.hard.tolist() == [False]
    assert_close(loss, _dbm_row_loss([0.25, 0.4], 1, 0.2, s, hard=False))


def test_hard_positive_exact_tie_goes_to_the_first_index():
    """Cosines [0.5, 0.5, 0.1]: argmax is class 0, so label 1 is hard and label 0 is easy."""
    s, m = 4.0, [0.3, 0.2, 0.1]
    cos = [[0.5, 0.5, 0.1], [0.5, 0.5, 0.1]]
    loss, aux = mce(
        t64(cos),
        labels([1, 0]),
        input_is_cosine=True,
        scale=s,
        class_margins=t64(m),
        margin_type="additive_angular",
        lambda_inst=1.0,
        reduction="none",
        return_aux=True,
    )
    assert aux.pred.tolist() == [0, 0]
    assert aux.hard.tolist() == [True, False]
    assert_close(loss, [_dbm_row_loss(cos[0], 1, 0.2, s, hard=True), _dbm_row_loss(cos[1], 0, 0.3, s, hard=False)])


def test_elm_strongest_wrong_class_tie_goes_to_the_first_index():
    s, lam, m = 2.0, 1.0, [0.1, 0.2, 0.4]
    cos = [0.1, 0.6, 0.6]
    logits = [s * c for c in cos]
    logits[0] = s * (0.1 - (0.1 - lam * 0.2))  # c* = 1, not 2
    loss = mce(t64([cos]), labels([0]), input_is_cosine=True, scale=s, class_margins=t64(m), lambda_elm=lam)
    assert_close(loss, lse(logits) - logits[0])


def test_pair_perturbation_target_entry_is_ignored():
    z = t64([[0.3, 0.1, -0.2]])
    base = mce(z, labels([0]), pair_perturbation=t64([[0.0, 0.5, -0.3]]))
    moved = mce(z, labels([0]), pair_perturbation=t64([[100.0, 0.5, -0.3]]))
    assert torch.equal(base, moved)
    logits = [0.3, 0.1 + 0.5, -0.2 - 0.3]
    assert_close(base, lse(logits) - logits[0])


def test_ignored_rows_report_unmargined_side_outputs():
    z = t64([[0.3, 0.8, -0.2], [0.2, 0.1, 0.0]])
    loss, aux = mce(
        z,
        labels([-100, 0]),
        input_is_cosine=True,
        scale=2.0,
        class_margins=t64([0.2] * 3),
        reduction="none",
        return_aux=True,
    )
    assert loss[0].item() == 0.0
    assert aux.hard.tolist() == [False, False]
    assert aux.pred.tolist() == [1, 0]
    assert_close(aux.lse[0], lse([0.6, 1.6, -0.4]))


# ---------------------------------------------------------------------------------------------------
# 4. float64 gradcheck of every option
# ---------------------------------------------------------------------------------------------------

GB, GD, GC = 5, 3, 4
G_TARGET = [1, 2, 0, 3, 1]

OPTIONS = {
    "plain": dict(scale=3.0),
    "cosine_margin": dict(scale=3.0, class_margins=True),
    "angular_margin": dict(scale=3.0, class_margins=True, margin_type="additive_angular"),
    "instance_hard_cosine": dict(scale=3.0, class_margins=True, lambda_inst=1.5),
    "instance_hard_angular": dict(scale=3.0, class_margins=True, margin_type="additive_angular", lambda_inst=1.5),
    "instance_all_angular": dict(
        scale=3.0, class_margins=True, margin_type="additive_angular", lambda_inst=1.5, hard_mode="all"
    ),
    "elm": dict(scale=3.0, class_margins=True, lambda_elm=0.7),
    "elm_angular_instance": dict(
        scale=3.0, class_margins=True, margin_type="additive_angular", lambda_inst=1.0, lambda_elm=0.5
    ),
    "fold_threshold": dict(
        scale=3.0, class_margins=True, margin_type="additive_angular", angular_fold="threshold", lambda_inst=1.0
    ),
    "fold_easy": dict(
        scale=3.0, class_margins=True, margin_type="additive_angular", angular_fold="easy", lambda_inst=1.0
    ),
    "logit_offset": dict(scale=3.0, class_margins=True, logit_offset=True),
    "pair_perturbation": dict(scale=3.0, class_margins=True, pair_perturbation=True),
    "marc": dict(scale=3.0, class_margins=True, omega=True, beta=True),
    "marc_angular": dict(scale=3.0, class_margins=True, margin_type="additive_angular", omega=True, beta=True),
    "class_weight": dict(scale=3.0, class_margins=True, class_weight=True),
    "label_smoothing": dict(scale=3.0, class_margins=True, label_smoothing=0.2),
    "ignore_index": dict(scale=3.0, class_margins=True, ignore=True),
    "everything": dict(
        scale=3.0,
        class_margins=True,
        margin_type="additive_angular",
        lambda_inst=1.0,
        lambda_elm=0.5,
        angular_fold="threshold",
        logit_offset=True,
        pair_perturbation=True,
        omega=True,
        beta=True,
        class_weight=True,
        label_smoothing=0.1,
        ignore=True,
    ),
}
TABLE_FLAGS = ("class_margins", "logit_offset", "pair_perturbation", "omega", "beta", "class_weight", "ignore")


def make_case(head, option, seed=0):
    """Inputs for one gradcheck: float64 leaves, with row 0's target cosine near -1 (folded by
    "threshold", easy-folded, a hard positive) and row 1's near +1 (an easy positive)."""
    gen = torch.Generator().manual_seed(seed)
    flags = {k: option.get(k, False) for k in TABLE_FLAGS}
    kwargs = {k: v for k, v in option.items() if k not in TABLE_FLAGS}
    target = labels(G_TARGET)
    if flags["ignore"]:
        target[3] = -100
    weight = bias = None
    if head == "logits":
        x = 0.8 * torch.tanh(torch.randn(GB, GC, generator=gen, dtype=F64))
        x[0, G_TARGET[0]] = -0.97
        x[1, G_TARGET[1]] = 0.9
        kwargs["input_is_cosine"] = True
    else:
        weight = torch.randn(GC, GD, generator=gen, dtype=F64)
        if head == "linear":  # rows of similar norm, so that row 1 (along its class) is an easy positive
            weight = F.normalize(weight, dim=1) * (1.0 + 0.2 * torch.rand(GC, 1, generator=gen, dtype=F64))
        x = torch.randn(GB, GD, generator=gen, dtype=F64)
        x[0] = -weight[G_TARGET[0]] + 0.25 * torch.randn(GD, generator=gen, dtype=F64)
        x[1] = 1.5 * weight[G_TARGET[1]] + 0.3 * torch.randn(GD, generator=gen, dtype=F64)
        if head == "linear":
            bias = 0.3 * torch.randn(GC, generator=gen, dtype=F64)
    tables = {}
    if flags["class_margins"]:
        tables["class_margins"] = torch.tensor([0.5, 0.3, 0.2, 0.4], dtype=F64)
    if flags["logit_offset"]:
        tables["logit_offset"] = torch.randn(GC, generator=gen, dtype=F64)
    if flags["pair_perturbation"]:
        tables["pair_perturbation"] = 0.3 * torch.randn(GB, GC, generator=gen, dtype=F64)
    if flags["omega"]:
        tables["omega"] = 1.0 + 0.1 * torch.rand(GC, generator=gen, dtype=F64)
    if flags["beta"]:
        tables["beta"] = 0.05 * torch.randn(GC, generator=gen, dtype=F64)
        if head == "logits":
            tables["class_norms"] = 0.5 + torch.rand(GC, generator=gen, dtype=F64)
    if flags["class_weight"]:
        tables["class_weight"] = torch.tensor([0.5, 2.0, 1.0, 1.5], dtype=F64)
    return x, target, weight, bias, kwargs, tables


def base_scores_of(x, target, weight, bias, kwargs, tables):
    spec = MarginLossSpec(head=kwargs.get("head", "logits"), input_is_cosine=kwargs.get("input_is_cosine", False))
    return reference.base_scores(x, weight, bias, spec, LossTables(**tables)).detach()


def assert_away_from_switches(z, target, kwargs, tables, gap=1e-3):
    """Finite differences must not cross an argmax, a c* choice, a fold or the acos clamp."""
    sorted_z = z.sort(dim=1).values
    assert (sorted_z[:, 1:] - sorted_z[:, :-1]).min() > gap, "near-tie in the base scores"
    kept = target != -100
    y = torch.where(kept, target, 0)
    c = z.gather(1, y[:, None]).squeeze(1)
    if kwargs.get("margin_type") == "additive_angular":
        assert ((c.abs() - 1).abs() > gap).all()
        m = tables.get("class_margins")
        hard = z.argmax(1) != y if kwargs.get("hard_mode", "hard") == "hard" else torch.ones_like(kept)
        M = m[y] * (1 + kwargs.get("lambda_inst", 0.0) * hard * (1 - c) / 2)
        wrong = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), -math.inf).argmax(1)
        M = M - kwargs.get("lambda_elm", 0.0) * m[wrong]
        fold = kwargs.get("angular_fold")
        if fold == "threshold":
            edge = torch.cos(math.pi - M)
            assert ((c - edge).abs()[kept] > gap).all()
            folded = (c <= edge) & kept
            assert folded.any() and (~folded & kept).any(), "both sides of the fold must be exercised"
        if fold == "easy":
            assert (c.abs()[kept] > gap).all()
            folded = (c <= 0) & kept
            assert folded.any() and (~folded & kept).any()
    if kwargs.get("lambda_inst", 0.0) and kwargs.get("hard_mode", "hard") == "hard":
        hard = (z.argmax(1) != y) & kept
        assert hard.any() and (~hard & kept).any(), "both hard and easy rows must be exercised"


def gradcheck_case(head, option, loss_fn, reduction="mean"):
    x, target, weight, bias, kwargs, tables = make_case(head, option)
    kwargs = dict(kwargs, head=head, reduction=reduction)
    assert_away_from_switches(base_scores_of(x, target, weight, bias, kwargs, tables), target, kwargs, tables)

    trainable = {"logit_offset", "pair_perturbation", "omega", "beta"}
    names = (
        ["input"]
        + (["weight"] if weight is not None else [])
        + (["bias"] if bias is not None else [])
        + [k for k in tables if k in trainable]
    )
    leaves = [x] + [t for t in (weight, bias) if t is not None] + [tables[k] for k in names if k in trainable]
    leaves = [t.clone().requires_grad_() for t in leaves]
    fixed = {k: v for k, v in tables.items() if k not in trainable}

    def fn(*args):
        bound = dict(zip(names, args))
        tabs = dict(fixed, **{k: bound[k] for k in trainable if k in bound})
        return loss_fn(bound["input"], target, bound.get("weight"), bound.get("bias"), kwargs, tabs)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-4)
    return fn, leaves, names, target


def reference_loss(x, target, weight, bias, kwargs, tables):
    return mce(x, target, weight, bias=bias, **kwargs, **tables)


HEADS = ["cosine", "linear", "logits"]


GRADCHECK_CASES = [
    (head, option)
    for head in HEADS
    for option in OPTIONS
    if not (head == "linear" and OPTIONS[option].get("margin_type") == "additive_angular")
]


@pytest.mark.parametrize("head,option", GRADCHECK_CASES, ids=[f"{h}-{o}" for h, o in GRADCHECK_CASES])
def test_gradcheck_every_option(head, option):
    """Angular margins on the linear head are rejected (tests/core/test_validation.py), so not listed."""
    gradcheck_case(head, OPTIONS[option], reference_loss)


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("head", HEADS)
def test_gradcheck_reductions(head, reduction):
    option = dict(OPTIONS["everything"])
    if head == "linear":
        option.update(margin_type="additive_cosine", angular_fold=None)
    gradcheck_case(head, option, reference_loss, reduction=reduction)


@pytest.mark.parametrize("head", HEADS)
def test_pair_perturbation_target_entries_get_no_gradient(head):
    x, target, weight, bias, kwargs, tables = make_case(
        head, OPTIONS["everything"] | {"margin_type": "additive_cosine", "angular_fold": None}
    )
    pert = tables["pair_perturbation"].requires_grad_()
    loss = reference_loss(x, target, weight, bias, dict(kwargs, head=head), tables)
    (grad,) = torch.autograd.grad(loss, pert)
    kept = target != -100
    on_target = grad[torch.arange(GB)[kept], target[kept]]
    assert torch.all(on_target == 0)
    assert torch.all(grad[~kept] == 0)
    off_target = ~F.one_hot(torch.where(kept, target, 0), GC).bool() & kept[:, None]
    assert (grad[off_target] != 0).all()


@pytest.mark.parametrize("margin_type", ["additive_angular", "additive_cosine"])
def test_straight_through_gradient_is_s_times_the_softmax_gradient(margin_type):
    """margin_grad="straight_through": d target / d cos = s, so dL/dcos = s dL/dlogit everywhere, with the
    logits s psi(c, M) evaluated exactly (by hand, here with torch in float64)."""
    s, m, lam = 5.0, [0.3, 0.2, 0.4], 1.0
    cos = [[0.2, 0.6, -0.1], [0.1, 0.2, 0.7], [-0.3, 0.4, 0.1]]
    y = [0, 2, 1]
    z = t64(cos, grad=True)
    loss = mce(
        z,
        labels(y),
        input_is_cosine=True,
        scale=s,
        class_margins=t64(m),
        margin_type=margin_type,
        lambda_inst=lam,
        margin_grad="straight_through",
    )
    (grad,) = torch.autograd.grad(loss, z)

    logits = []
    for row, label in zip(cos, y):
        hard = max(range(3), key=lambda j: row[j]) != label
        M = m[label] * (1 + lam * hard * (1 - row[label]) / 2)
        psi = math.cos(math.acos(row[label]) + M) if margin_type == "additive_angular" else row[label] - M
        logits.append([s * (psi if j == label else c) for j, c in enumerate(row)])
    logits = t64(logits, grad=True)
    expected = F.cross_entropy(logits, labels(y))
    assert_close(loss, expected)
    (dlogits,) = torch.autograd.grad(expected, logits)
    assert_close(grad, s * dlogits)


def test_straight_through_psi_has_unit_derivative():
    c = t64([-0.9, -0.2, 0.3, 0.95], grad=True)
    M = t64([0.5, 0.5, 0.5, 0.5])
    for fold in (None, "threshold", "easy"):
        spec = MarginLossSpec(
            head="logits",
            input_is_cosine=True,
            margin_type="additive_angular",
            angular_fold=fold,
            margin_grad="straight_through",
        )
        value, grad = rowmath.target_logit(c, M, torch.zeros_like(M), spec)
        (d,) = torch.autograd.grad(value.sum(), c)
        assert torch.equal(d, torch.ones_like(d)) and torch.equal(grad, torch.ones_like(grad))
        exact, _ = rowmath.target_logit(
            c,
            M,
            torch.zeros_like(M),
            MarginLossSpec(head="logits", input_is_cosine=True, margin_type="additive_angular", angular_fold=fold),
        )
        assert_close(value, exact, rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------------------------------
# 5. No NaN/inf at cosines of exactly +-1 and on all-zero rows
# ---------------------------------------------------------------------------------------------------

MARGIN_CONFIGS = [
    ("additive_cosine", None),
    ("additive_angular", None),
    ("additive_angular", "threshold"),
    ("additive_angular", "easy"),
]


@pytest.mark.parametrize("margin_grad", ["exact", "straight_through"])
@pytest.mark.parametrize("margin_type,fold", MARGIN_CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_no_nan_cosine_head_parallel_antiparallel_zero(margin_type, fold, margin_grad, dtype):
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(4, 3, generator=gen, dtype=dtype)
    weight[3] = 0.0  # an all-zero class row too
    x = torch.stack(
        [
            2.0 * weight[0],  # cos(x, W_0) = +1, target 0
            -3.0 * weight[1],  # cos(x, W_1) = -1, target 1
            torch.zeros(3, dtype=dtype),  # all-zero feature row
            weight[2],  # parallel to a non-target class
            -weight[0],
        ]
    )
    target = labels([0, 1, 2, 0, 0])
    x.requires_grad_()
    weight.requires_grad_()
    loss = mce(
        x,
        target,
        weight,
        scale=16.0,
        class_margins=torch.tensor([0.5, 0.3, 0.2, 0.1], dtype=dtype),
        margin_type=margin_type,
        angular_fold=fold,
        margin_grad=margin_grad,
        lambda_inst=1.0,
        lambda_elm=0.5,
        label_smoothing=0.1,
    )
    gx, gw = torch.autograd.grad(loss, (x, weight))
    assert torch.isfinite(loss) and torch.isfinite(gx).all() and torch.isfinite(gw).all()
    cos = F.normalize(x.detach(), dim=1) @ F.normalize(weight.detach(), dim=1).t()
    assert abs(cos[0, 0].item() - 1) < 1e-6 and abs(cos[1, 1].item() + 1) < 1e-6


@pytest.mark.parametrize("margin_grad", ["exact", "straight_through"])
@pytest.mark.parametrize("margin_type,fold", MARGIN_CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_no_nan_logits_head_at_plus_minus_one(margin_type, fold, margin_grad, dtype):
    z = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.5], [0.0, 0.0, 0.0], [1.0, 1.0, -1.0]], dtype=dtype)
    z.requires_grad_()
    loss = mce(
        z,
        labels([0, 0, 2, 2]),
        input_is_cosine=True,
        scale=32.0,
        class_margins=torch.tensor([0.5, 0.4, 0.3], dtype=dtype),
        margin_type=margin_type,
        angular_fold=fold,
        margin_grad=margin_grad,
        lambda_inst=1.0,
        lambda_elm=0.5,
    )
    (grad,) = torch.autograd.grad(loss, z)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_angular_target_at_plus_one_keeps_its_margin():
    """cos_y = 1 sits outside the acos clamp: psi = cos(acos(1 - 1e-7) + m), finite and ~cos(m)."""
    s, m = 2.0, 0.5
    theta = math.acos(1.0 - ACOS_CLAMP)
    logits = [s * math.cos(theta + m), s * 0.0]
    loss = mce(
        t64([[1.0, 0.0]]),
        labels([0]),
        input_is_cosine=True,
        scale=s,
        class_margins=t64([m, m]),
        margin_type="additive_angular",
    )
    assert_close(loss, lse(logits) - logits[0])


def test_reference_loss_dtypes():
    z32 = torch.tensor([[0.1, 0.2], [0.3, -0.4]])
    loss, aux = mce(z32, labels([0, 1]), return_aux=True)
    assert loss.dtype == torch.float32 and aux.lse.dtype == torch.float32
    zh = z32.to(torch.bfloat16)
    loss_h, aux_h = mce(zh, labels([0, 1]), return_aux=True)
    assert loss_h.dtype == torch.float32 and aux_h.pred.dtype == torch.int64 and aux_h.hard.dtype == torch.bool
    torch.testing.assert_close(loss_h, F.cross_entropy(zh.float(), labels([0, 1])))
