import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fused_margin as fm
from fused_margin.training.drw import DRWSchedule

COUNTS = [500, 120, 30, 7]


def _cb_numpy(counts, beta):
    n = np.asarray(counts, dtype=np.float64)
    w = (1.0 - beta) / (1.0 - beta**n)
    return w * len(n) / w.sum()


def test_weights_switch_at_the_milestone():
    drw = DRWSchedule(COUNTS, betas=(0.0, 0.999), step=10)
    for epoch in (0, 5, 9):
        assert torch.equal(drw.weights(epoch), torch.ones(4))
        assert not drw.is_reweighting(epoch)
    for epoch in (10, 11, 500):
        np.testing.assert_allclose(drw.weights(epoch).numpy(), _cb_numpy(COUNTS, 0.999), rtol=1e-6)
        assert drw.is_reweighting(epoch)
    late = drw.weights(10)
    assert late[3] > late[2] > late[1] > late[0]  # rarer classes weigh more
    assert late.sum().item() == pytest.approx(4.0, rel=1e-6)


def test_more_stages_and_last_beta_holds():
    drw = DRWSchedule(COUNTS, betas=(0.0, 0.9, 0.999), step=3)
    assert [drw.beta(e) for e in (0, 2, 3, 5, 6, 100)] == [0.0, 0.0, 0.9, 0.9, 0.999, 0.999]
    np.testing.assert_allclose(drw(4).numpy(), _cb_numpy(COUNTS, 0.9), rtol=1e-6)
    # agrees with the builder it wraps
    for epoch in (0, 4, 7):
        torch.testing.assert_close(drw.weights(epoch), fm.drw_weights(COUNTS, epoch, (0.0, 0.9, 0.999), 3))


def test_device_and_dtype():
    drw = DRWSchedule(COUNTS, step=1)
    w = drw.weights(1, dtype=torch.float64)
    assert w.dtype == torch.float64 and w.device.type == "cpu"


def test_apply_feeds_ldam_and_matches_a_direct_weighted_ldam():
    torch.manual_seed(0)
    counts = COUNTS
    drw = DRWSchedule(counts, betas=(0.0, 0.9999), step=2)
    criterion = fm.LDAMLoss(counts, max_m=0.5, scale=30.0)
    cos = torch.rand(16, 4, dtype=torch.float64) * 2 - 1
    y = torch.randint(0, 4, (16,))
    margins = 0.5 * np.asarray(counts, dtype=np.float64) ** -0.25
    margins = margins / margins.max() * 0.5
    direct_logits = 30.0 * (cos - F.one_hot(y, 4) * torch.tensor(margins)[y][:, None])
    for epoch in (0, 3):
        weights = drw.apply(criterion, epoch)
        assert criterion.class_weight is not None and torch.equal(criterion.class_weight, weights)
        expected = F.cross_entropy(direct_logits, y, weight=torch.tensor(_cb_numpy(counts, drw.beta(epoch))))
        torch.testing.assert_close(criterion(cos, y).double(), expected, rtol=1e-5, atol=1e-6)
    # and the functional path
    loss = fm.ldam_loss(cos, y, class_counts=counts, class_weight=drw.weights(3, dtype=torch.float64))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_apply_on_dbm_ce():
    drw = DRWSchedule(COUNTS, step=1)
    criterion = fm.DBMLoss(COUNTS, variant="ce")
    assert criterion.class_weight is None
    drw.apply(criterion, 1)
    np.testing.assert_allclose(criterion.class_weight.numpy(), _cb_numpy(COUNTS, 0.9999), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(betas=()), "betas"),
        (dict(betas=(0.0, 1.0)), "betas"),
        (dict(betas=(0.0, float("nan"))), "betas"),
        (dict(step=0), "step"),
        (dict(step=1.5), "step"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DRWSchedule(COUNTS, **kwargs)


def test_bad_counts_epoch_and_module():
    with pytest.raises(ValueError, match="class_counts"):
        DRWSchedule([10, 0, 3])
    drw = DRWSchedule(COUNTS)
    with pytest.raises(ValueError, match="epoch"):
        drw.weights(-1)
    with pytest.raises(TypeError, match="loss_module"):
        drw.apply(torch.nn.Linear(2, 2), 0)
