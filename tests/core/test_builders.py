"""Tables built from class counts (docs/loss.md section 6), each against an independent math/numpy computation."""

import math

import numpy as np
import pytest
import torch

import fused_margin as fm
from fused_margin.core import builders

COUNTS = [500, 120, 37, 9]


def close(tensor, expected, rtol=1e-12):
    np.testing.assert_allclose(tensor.numpy(), np.asarray(expected, dtype=np.float64), rtol=rtol, atol=0)


@pytest.mark.parametrize("max_m", [0.5, 0.3])
def test_ldam_margins(max_m):
    """m_j = C0 n_j^-1/4 with the rarest class at max_m."""
    margins = fm.ldam_margins(COUNTS, max_m=max_m, dtype=torch.float64)
    expected = [max_m * (9 / n) ** 0.25 for n in COUNTS]
    close(margins, expected)
    assert margins.max().item() == pytest.approx(max_m, rel=1e-15)
    assert int(margins.argmax()) == 3
    # the ratio between two classes is (n_i / n_j)^(-1/4), whatever max_m
    assert margins[0].item() / margins[1].item() == pytest.approx((500 / 120) ** -0.25, rel=1e-12)


def test_ldam_margins_default_dtype_and_max():
    margins = fm.ldam_margins([100, 10, 1])
    assert margins.dtype == torch.float32
    close(margins.double(), [0.5 * 100**-0.25, 0.5 * 10**-0.25, 0.5], rtol=1e-7)


@pytest.mark.parametrize("K,tau", [(0.1, 1.0), (0.3, 0.5)])
def test_dbm_class_margins_min_reference(K, tau):
    """The paper: m_y = K (min(n) / n_y)^tau, the rarest class gets exactly K."""
    margins = fm.dbm_class_margins(COUNTS, K=K, tau=tau, dtype=torch.float64)
    close(margins, [K * (9 / n) ** tau for n in COUNTS])
    assert margins[3].item() == pytest.approx(K)


def test_dbm_class_margins_last_vs_min():
    """Unsorted counts: "last" (published code) takes n_ref = n[C-1] = 20, "min" takes 5."""
    counts = [50, 5, 20]
    last = fm.dbm_class_margins(counts, K=0.2, tau=1.0, margin_ref="last", dtype=torch.float64)
    smallest = fm.dbm_class_margins(counts, K=0.2, tau=1.0, margin_ref="min", dtype=torch.float64)
    close(last, [0.2 * 20 / 50, 0.2 * 20 / 5, 0.2])
    close(smallest, [0.2 * 5 / 50, 0.2, 0.2 * 5 / 20])
    # on counts sorted head to tail the two agree
    sorted_counts = [50, 20, 5]
    torch.testing.assert_close(
        fm.dbm_class_margins(sorted_counts, margin_ref="last"),
        fm.dbm_class_margins(sorted_counts, margin_ref="min"),
        rtol=0,
        atol=0,
    )


def test_log_prior():
    prior = fm.log_prior(COUNTS, dtype=torch.float64)
    total = sum(COUNTS)
    close(prior, [math.log(n / total) for n in COUNTS])
    assert math.isclose(sum(math.exp(v) for v in prior.tolist()), 1.0, rel_tol=1e-12)


@pytest.mark.parametrize("beta", [0.9, 0.999, 0.9999])
def test_class_balanced_weights(beta):
    """Cui et al.: (1 - beta) / (1 - beta^n_y), normalised to sum to C."""
    weights = fm.class_balanced_weights(COUNTS, beta=beta, dtype=torch.float64)
    raw = [(1 - beta) / (1 - beta**n) for n in COUNTS]
    close(weights, [r * len(COUNTS) / sum(raw) for r in raw])
    assert weights.sum().item() == pytest.approx(len(COUNTS), rel=1e-12)
    assert all(a < b for a, b in zip(weights.tolist(), weights.tolist()[1:]))  # rarer classes weigh more


def test_class_balanced_weights_beta_zero_is_all_ones():
    torch.testing.assert_close(fm.class_balanced_weights(COUNTS, beta=0.0), torch.ones(4), rtol=0, atol=0)


def test_class_balanced_weights_float32_sum():
    weights = fm.class_balanced_weights(fm.long_tailed_counts(100, 500, 100.0))
    assert weights.dtype == torch.float32
    assert weights.double().sum().item() == pytest.approx(100, rel=1e-6)


def test_drw_switches_at_the_step():
    """LDAM-DRW: beta = betas[epoch // step], default (0, 0.9999), step 160."""
    ones = torch.ones(4, dtype=torch.float64)
    cb = [(1 - 0.9999) / (1 - 0.9999**n) for n in COUNTS]
    cb = [w * 4 / sum(cb) for w in cb]
    for epoch in (0, 1, 159):
        torch.testing.assert_close(fm.drw_weights(COUNTS, epoch, dtype=torch.float64), ones, rtol=0, atol=0)
    for epoch in (160, 161, 199, 1000):  # past the table: the last beta
        close(fm.drw_weights(COUNTS, epoch, dtype=torch.float64), cb)


def test_drw_custom_schedule():
    betas, step = (0.0, 0.9, 0.99), 10
    for epoch, beta in ((9, 0.0), (10, 0.9), (19, 0.9), (20, 0.99), (35, 0.99)):
        raw = [(1 - beta) / (1 - beta**n) for n in COUNTS] if beta else [1.0] * 4
        close(
            fm.drw_weights(COUNTS, epoch, betas=betas, step=step, dtype=torch.float64), [r * 4 / sum(raw) for r in raw]
        )


@pytest.mark.parametrize("gamma", [1.2, 0.5])
def test_marc_weights(gamma):
    """MARC's U_y = C n_y^-gamma / sum_j n_j^-gamma."""
    weights = fm.marc_weights(COUNTS, gamma=gamma, dtype=torch.float64)
    inv = [n**-gamma for n in COUNTS]
    close(weights, [len(COUNTS) * v / sum(inv) for v in inv])
    assert weights.sum().item() == pytest.approx(len(COUNTS), rel=1e-12)


def test_marc_weights_default_gamma():
    inv = [n**-1.2 for n in COUNTS]
    close(fm.marc_weights(COUNTS).double(), [4 * v / sum(inv) for v in inv], rtol=1e-6)


def test_long_tailed_counts_cifar10_lt():
    """LDAM's CIFAR-10-LT (imbalance 100): int(5000 * 0.01^(i / 9))."""
    counts = fm.long_tailed_counts(10, 5000, 100.0, "exp")
    assert counts.dtype == torch.int64
    assert counts.tolist() == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


@pytest.mark.parametrize("profile", ["exp", "step", "pareto"])
@pytest.mark.parametrize("num_classes,n_max,imbalance", [(10, 5000, 100.0), (100, 500, 10.0), (7, 1280, 256.0)])
def test_long_tailed_counts_profiles_hit_both_ends(profile, num_classes, n_max, imbalance):
    counts = fm.long_tailed_counts(num_classes, n_max, imbalance, profile)
    assert counts.shape == (num_classes,)
    assert counts[0].item() == n_max
    assert counts[-1].item() == math.floor(n_max / imbalance + 1e-9)
    assert all(a >= b for a, b in zip(counts.tolist(), counts.tolist()[1:]))


def test_long_tailed_counts_exp_values():
    C, n_max, f = 12, 1000, 1 / 50.0
    expected = [math.floor(n_max * f ** (i / (C - 1)) + 1e-9) for i in range(C)]
    assert fm.long_tailed_counts(C, n_max, 50.0, "exp").tolist() == expected


def test_long_tailed_counts_step_values():
    counts = fm.long_tailed_counts(10, 1000, 10.0, "step")
    assert counts.tolist() == [1000] * 5 + [100] * 5
    counts = fm.long_tailed_counts(10, 1000, 10.0, "step", step_fraction=0.3)
    assert counts.tolist() == [1000] * 3 + [100] * 7


def test_long_tailed_counts_pareto_values():
    """n_i = n_max (1 + k i / (C-1))^-alpha with k = f^(-1/alpha) - 1."""
    C, n_max, imb, alpha = 8, 1280, 256.0, 6.0
    k = (1 / imb) ** (-1 / alpha) - 1
    expected = [math.floor(n_max * (1 + k * i / (C - 1)) ** -alpha + 1e-9) for i in range(C)]
    assert fm.long_tailed_counts(C, n_max, imb, "pareto", pareto_alpha=alpha).tolist() == expected
    # pareto falls faster at the head than exp does for the same ends
    exp = fm.long_tailed_counts(C, n_max, imb, "exp")
    assert expected[1] < exp[1].item()


def test_long_tailed_counts_never_below_one():
    counts = fm.long_tailed_counts(5, 10, 1000.0)
    assert counts.min().item() == 1


@pytest.mark.parametrize(
    "counts",
    [
        [500, 120, 37, 9],
        np.array([500, 120, 37, 9]),
        torch.tensor([500, 120, 37, 9]),
        torch.tensor([500.0, 120.0, 37.0, 9.0], dtype=torch.float64),
        (500, 120, 37, 9),
    ],
    ids=["list", "numpy", "int_tensor", "float_tensor", "tuple"],
)
def test_counts_in_any_container(counts):
    assert builders.as_class_counts(counts).tolist() == [500.0, 120.0, 37.0, 9.0]
    close(fm.ldam_margins(counts, dtype=torch.float64), [0.5 * (9 / n) ** 0.25 for n in COUNTS])


def test_builders_cast_at_the_end():
    """Computed in float64 then cast: the float32 table equals the float64 one rounded."""
    for build in (
        fm.ldam_margins,
        fm.log_prior,
        fm.class_balanced_weights,
        fm.marc_weights,
        lambda c, dtype: fm.dbm_class_margins(c, dtype=dtype),
    ):
        wide = build(COUNTS, dtype=torch.float64)
        narrow = build(COUNTS, dtype=torch.float32)
        assert narrow.dtype == torch.float32
        assert torch.equal(narrow, wide.float())
