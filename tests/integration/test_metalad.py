import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fused_margin as fm
from fused_margin.training import metalad as metalad_module
from fused_margin.training.metalad import ClassStatistics, MetaLAD, pair_perturbation_terms

COUNTS = [40, 16, 6, 2]


# ----- running statistics ---------------------------------------------------------------------------------
def _batches(seed=0, D=5):
    g = np.random.default_rng(seed)
    labels = [np.array([0, 0, 1, 0, 2, 1, -100]), np.array([1, 1, 0, 0, 0]), np.array([0, 2, 2, 0, 1, 1, 1])]
    return [(g.normal(size=(len(y), D)) * (1 + np.arange(D)) + 3 * y[:, None], y) for y in labels]


@pytest.mark.parametrize("mode", ["full", "diag"])
def test_statistics_match_numpy(mode):
    stats = ClassStatistics(4, 5, covariance=mode, dtype=torch.float64)
    batches = _batches()
    for x, y in batches:
        stats.update(torch.tensor(x), torch.tensor(y))
    x_all = np.concatenate([x for x, _ in batches])
    y_all = np.concatenate([y for _, y in batches])
    for c in range(3):
        xc = x_all[y_all == c]
        assert stats.count[c].item() == len(xc)
        np.testing.assert_allclose(stats.mean[c].numpy(), xc.mean(0), rtol=1e-12, atol=1e-12)
        cov = np.cov(xc, rowvar=False, bias=True)
        got = stats.cov[c].numpy()
        np.testing.assert_allclose(got, cov if mode == "full" else np.diag(cov), rtol=1e-10, atol=1e-12)
    # class 3 never seen, the ignored row counted nowhere
    assert stats.count[3].item() == 0 and torch.all(stats.mean[3] == 0) and torch.all(stats.cov[3] == 0)
    assert stats.count.sum().item() == len(y_all) - 1


def test_statistics_auto_mode(monkeypatch):
    assert ClassStatistics(10, 8).covariance == "full"
    monkeypatch.setattr(metalad_module, "FULL_COVARIANCE_BYTES", 10 * 8 * 8 * 4 - 1)
    assert ClassStatistics(10, 8).covariance == "diag"
    with pytest.raises(ValueError, match="covariance"):
        ClassStatistics(10, 8, covariance="low-rank")
    with pytest.raises(ValueError, match="features"):
        ClassStatistics(10, 8).update(torch.zeros(3, 7), torch.zeros(3, dtype=torch.long))


# ----- the perturbation terms -----------------------------------------------------------------------------
def _direct_terms(rows, counts, W, means, cov, seen):
    """docs/loss.md section 7, pair by pair, in numpy."""
    C = len(counts)
    pi = np.asarray(counts, dtype=np.float64) / np.sum(counts)
    pairs = [(a, b) for a in range(C) for b in range(C) if a != b and seen[a] and seen[b]]
    dbar = np.mean([np.linalg.norm(means[a] - means[b]) for a, b in pairs])
    out = np.zeros((len(rows), C, 3))
    for r, y in enumerate(rows):
        sigma = cov[y] if cov.ndim == 3 else np.diag(cov[y])
        for c in range(C):
            if c == y:
                continue
            out[r, c, 0] = np.log(pi[c] / pi[y])
            if seen[y] and seen[c]:
                d = W[y] - W[c]
                out[r, c, 1] = d @ sigma @ d / (d @ d)
                out[r, c, 2] = np.log(dbar / np.linalg.norm(means[y] - means[c]))
    return out


@pytest.mark.parametrize("mode", ["full", "diag"])
@pytest.mark.parametrize("all_seen", [True, False])
def test_terms_match_a_direct_computation(mode, all_seen):
    g = np.random.default_rng(1)
    C, D = 5, 4
    counts = [50, 20, 9, 4, 2]
    W = g.normal(size=(C, D))
    means = g.normal(size=(C, D))
    A = g.normal(size=(C, D, D))
    cov = A @ A.transpose(0, 2, 1) if mode == "full" else g.random(size=(C, D)) + 0.1
    seen = np.array([True, True, True, all_seen, True])
    rows = np.array([0, 3, 4, 1])
    got = pair_perturbation_terms(
        torch.tensor(rows),
        fm.log_prior(counts, dtype=torch.float64),
        torch.tensor(W),
        torch.tensor(means),
        torch.tensor(cov),
        torch.tensor(seen),
    )
    np.testing.assert_allclose(got.numpy(), _direct_terms(rows, counts, W, means, cov, seen), rtol=1e-9, atol=1e-12)


def test_terms_chunked_full_covariance():
    g = np.random.default_rng(2)
    C, D = 6, 3
    W, means = g.normal(size=(C, D)), g.normal(size=(C, D))
    A = g.normal(size=(C, D, D))
    cov = A @ A.transpose(0, 2, 1)
    rows = torch.arange(C)
    args = (
        rows,
        fm.log_prior([9, 8, 7, 6, 5, 4], dtype=torch.float64),
        torch.tensor(W),
        torch.tensor(means),
        torch.tensor(cov),
    )
    torch.testing.assert_close(pair_perturbation_terms(*args, chunk_elements=1), pair_perturbation_terms(*args))


# ----- the loss -------------------------------------------------------------------------------------------
class Net(torch.nn.Module):
    def __init__(self, D_in=6, D=5, C=4):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(D_in, 8), torch.nn.Tanh(), torch.nn.Linear(8, D))
        self.head = fm.CosineClassifier(D, C)

    def forward(self, x):
        return self.body(x)


def _setup(seed=0, rows=12):
    torch.manual_seed(seed)
    net = Net().double()
    lad = MetaLAD(COUNTS, 5, scale=8.0, meta_optimizer="sgd", meta_lr=0.5, virtual_lr=0.3).double()
    x = torch.randn(rows, 6, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 3, 0, 1, 2, 0, 3][:rows])
    meta_x = torch.randn(8, 6, dtype=torch.float64)
    meta_y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    with torch.no_grad():
        lad.update_statistics(net(x), y)
        lad.lam.copy_(1.0 + 0.3 * torch.randn(4, 3, dtype=torch.float64))
    return net, lad, x, y, meta_x, meta_y


def test_perturbation_and_loss_match_a_direct_computation():
    net, lad, x, y, _, _ = _setup()
    W = net.head.weight
    terms = lad.perturbation_terms(y, W)
    expected_terms = _direct_terms(
        y.numpy(),
        COUNTS,
        F.normalize(W, dim=1).detach().numpy(),
        lad.stats.mean.numpy(),
        lad.stats.cov.numpy(),
        [True] * 4,
    )
    np.testing.assert_allclose(terms.numpy(), expected_terms, rtol=1e-9, atol=1e-12)
    P = lad.perturbation(y, W)
    lam = lad.lam.detach().numpy()
    np.testing.assert_allclose(
        P.detach().numpy(), np.einsum("bck,bk->bc", expected_terms, lam[y.numpy()]), rtol=1e-9, atol=1e-12
    )
    assert torch.all(P[torch.arange(len(y)), y] == 0)
    features = net(x)
    logits = 8.0 * F.normalize(features, dim=1) @ F.normalize(W, dim=1).t() + P
    torch.testing.assert_close(lad.loss(features, y, W), F.cross_entropy(logits, y))
    torch.testing.assert_close(lad.loss(features, y, W, perturb=False), F.cross_entropy(logits - P, y))


def test_proportion_term_raises_the_tail_loss():
    """With lam = 1, log(pi_c / pi_y) raises a tail example's loss and lowers a head example's (docs/loss.md
    section 7)."""
    lad = MetaLAD(COUNTS, 3, scale=1.0).double()
    with torch.no_grad():
        lad.lam.copy_(torch.tensor([[1.0, 0.0, 0.0]] * 4))
    features = torch.eye(3, dtype=torch.float64)[[0, 1]]
    W = torch.eye(4, 3, dtype=torch.float64)
    y = torch.tensor([0, 3])  # head, tail
    plain = lad.loss(features, y, W, perturb=False, reduction="none")
    perturbed = lad.loss(features, y, W, reduction="none")
    assert perturbed[0] < plain[0] and perturbed[1] > plain[1]


# ----- the meta step --------------------------------------------------------------------------------------
def test_meta_step_moves_lambda_along_the_finite_difference_and_takes_the_real_step():
    net, lad, x, y, meta_x, meta_y = _setup()
    with torch.no_grad():  # meta_step folds this batch in; doing it here first keeps the
        lad.update_statistics(net(x), y)  # means and covariances unchanged by that second fold
    lam0 = lad.lam.detach().clone()

    def meta_loss(lam):
        return lad.virtual_meta_loss(net, x, y, meta_x, meta_y, 0.3, lam=lam, create_graph=False).item()

    h = 1e-5
    fd = torch.zeros_like(lam0)
    for k in range(lam0.numel()):
        step = torch.zeros_like(lam0).view(-1)
        step[k] = h
        fd.view(-1)[k] = (meta_loss(lam0 + step.view_as(lam0)) - meta_loss(lam0 - step.view_as(lam0))) / (2 * h)
    assert fd.abs().max() > 1e-4  # the meta loss does depend on lambda

    expected_meta_loss = meta_loss(lam0)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.3)
    reference_net = copy.deepcopy(net)
    stats_before = (lad.stats.mean.clone(), lad.stats.cov.clone())
    out = lad.meta_step(net, x, y, meta_x, meta_y, optimizer)
    torch.testing.assert_close(lad.stats.mean, stats_before[0])
    torch.testing.assert_close(lad.stats.cov, stats_before[1])

    # eq. (35) with SGD: lam1 = lam0 - eta * dL_meta/dlam
    torch.testing.assert_close(lad.lam.detach(), lam0 - 0.5 * fd, rtol=0, atol=1e-7)
    assert set(out) == {"loss", "meta_loss"}
    assert out["meta_loss"] == pytest.approx(expected_meta_loss, rel=1e-12)

    # eq. (36): the real step is an SGD step on the perturbed loss with the updated lambda
    loss = lad.loss(reference_net(x), y, reference_net.head.weight, lam=lad.lam.detach(), backend="reference")
    grads = torch.autograd.grad(loss, list(reference_net.parameters()))
    for p_new, p_old, g in zip(net.parameters(), reference_net.parameters(), grads):
        torch.testing.assert_close(p_new, p_old - 0.3 * g)


def test_warmup_is_plain_cross_entropy():
    net, lad, x, y, meta_x, meta_y = _setup(1)
    lad.warmup_epochs = 2
    lam0 = lad.lam.detach().clone()
    count0 = lad.stats.count.clone()
    reference_net = copy.deepcopy(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    lad.train_step(net, x, y, optimizer, epoch=1)
    assert torch.equal(lad.lam.detach(), lam0)
    assert torch.equal(lad.stats.count, count0 + torch.bincount(y, minlength=4).double())
    features = reference_net(x)
    logits = 8.0 * F.normalize(features, dim=1) @ F.normalize(reference_net.head.weight, dim=1).t()
    grads = torch.autograd.grad(F.cross_entropy(logits, y), list(reference_net.parameters()))
    for p_new, p_old, g in zip(net.parameters(), reference_net.parameters(), grads):
        torch.testing.assert_close(p_new, p_old - 0.1 * g)
    with pytest.raises(ValueError, match="meta batch"):
        lad.train_step(net, x, y, optimizer, epoch=2)
    lad.train_step(net, x, y, optimizer, epoch=2, meta_x=meta_x, meta_target=meta_y)
    assert not torch.equal(lad.lam.detach(), lam0)


def test_adam_meta_step_and_float32():
    torch.manual_seed(0)
    net = Net()
    lad = MetaLAD(COUNTS, 5, scale=8.0, meta_lr=0.01)
    x, y = torch.randn(12, 6), torch.tensor([0, 0, 0, 1, 1, 2, 3, 0, 1, 2, 0, 3])
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        out = lad.meta_step(net, x, y, x[:8], y[:8], optimizer)
    assert np.isfinite(out["loss"]) and np.isfinite(out["meta_loss"])
    changed = (lad.lam.detach() - 1.0).abs()
    assert changed.max() > 0.005 and changed.max() <= 0.03 + 1e-6  # Adam moves each entry by ~lr per step


def test_bad_arguments():
    with pytest.raises(ValueError, match="head"):
        MetaLAD(COUNTS, 4, head="logits")
    with pytest.raises(ValueError, match="meta_optimizer"):
        MetaLAD(COUNTS, 4, meta_optimizer="rmsprop")
    with pytest.raises(ValueError, match="warmup_epochs"):
        MetaLAD(COUNTS, 4, warmup_epochs=-1)
    net, lad, x, y, meta_x, meta_y = _setup()
    lad.weight_name = "classifier.weight"
    with pytest.raises(ValueError, match="weight_name"):
        lad.virtual_meta_loss(net, x, y, meta_x, meta_y, 0.1)
