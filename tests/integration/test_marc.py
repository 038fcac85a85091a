import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fused_margin import marc_weights
from fused_margin.training.marc import MARC

COUNTS = [300, 80, 20, 5]


def _u_numpy(counts, gamma=1.2):
    n = np.asarray(counts, dtype=np.float64)
    u = n**-gamma
    return len(n) * u / u.sum()


def _direct_loss(logits, y, norms, omega, beta, scale, counts, gamma=1.2):
    """(1/B) sum_i U_y CE(s (omega z + beta ||W||), y), Algorithm 2 of MARC, written out."""
    calibrated = scale * (omega * logits + beta * norms)
    ce = -F.log_softmax(calibrated, dim=1).gather(1, y[:, None]).squeeze(1)
    u = torch.tensor(_u_numpy(counts, gamma), dtype=logits.dtype)
    return (u[y] * ce).mean()


def _random_case(seed=0, rows=24):
    g = torch.Generator().manual_seed(seed)
    logits = torch.rand(rows, 4, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.randint(0, 4, (rows,), generator=g)
    norms = torch.rand(4, generator=g, dtype=torch.float64) + 0.5
    return logits, y, norms


def test_initial_parameters_and_u_weights():
    marc = MARC(COUNTS, gamma=1.2, scale=16.0)
    assert torch.equal(marc.omega.data, torch.ones(4)) and torch.equal(marc.beta.data, torch.zeros(4))
    np.testing.assert_allclose(marc.class_weight.numpy(), _u_numpy(COUNTS), rtol=1e-6)


def test_u_weights_are_float32_until_moved_and_float64_after_double():
    exact = marc_weights(COUNTS, 1.2, dtype=torch.float64)
    rounded = marc_weights(COUNTS, 1.2)
    assert not torch.equal(rounded.double(), exact)  # float32 rounding shows at float64
    marc = MARC(COUNTS, gamma=1.2)
    assert marc.class_weight.dtype == torch.float32 and torch.equal(marc.class_weight, rounded)
    assert torch.equal(marc.double().class_weight, exact)  # the float64 values, not float32-rounded ones
    assert torch.equal(MARC(COUNTS).to(torch.float64).class_weight, exact)
    assert torch.equal(marc.float().class_weight, rounded)  # back to float32: the float32 path unchanged
    assert torch.equal(marc.half().double().class_weight, exact)
    assert torch.equal(MARC(COUNTS, gamma=0.5).double().class_weight, marc_weights(COUNTS, 0.5, dtype=torch.float64))


def test_u_weights_assigned_by_hand_replace_the_float64_values():
    marc = MARC(COUNTS)
    marc.class_weight = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert torch.equal(marc.double().class_weight, torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))


def test_loss_runs_in_the_compute_dtype_of_the_logits():
    logits, y, norms = _random_case(3)
    marc32, marc64 = MARC(COUNTS, scale=10.0), MARC(COUNTS, scale=10.0).double()
    with torch.no_grad():
        loss32 = marc32.loss(logits.float(), y, norms.float())
        assert loss32.dtype == torch.float32
        # the float32 path: U rounded to float32, whether the module holds it in float32 or float64
        expected32 = _direct_loss(logits.float(), y, norms.float(), torch.ones(4), torch.zeros(4), 10.0, COUNTS)
        torch.testing.assert_close(loss32, expected32)
        assert torch.equal(marc64.loss(logits.float(), y, norms.float()), loss32)
        for dtype in (torch.float16, torch.bfloat16):
            assert marc32.loss(logits.to(dtype), y, norms).dtype == torch.float32
        loss64 = marc64.loss(logits, y, norms)
        assert loss64.dtype == torch.float64
        expected64 = _direct_loss(
            logits, y, norms, torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64), 10.0, COUNTS
        )
        torch.testing.assert_close(loss64, expected64, rtol=1e-13, atol=0)


def test_state_dict_round_trip():
    saved = MARC(COUNTS, scale=10.0)
    with torch.no_grad():
        saved.omega.copy_(torch.tensor([1.5, 0.5, 1.0, 2.0]))
        saved.beta.copy_(torch.tensor([-0.1, 0.0, 0.2, 0.3]))
    state = saved.state_dict()
    assert set(state) == {"omega", "beta", "class_weight"} and state["class_weight"].dtype == torch.float32

    loaded = MARC(COUNTS, scale=10.0)
    loaded.load_state_dict(state)
    for name in ("omega", "beta", "class_weight"):
        assert torch.equal(getattr(loaded, name), getattr(saved, name))
    # the same U saved in float32: a float64 module keeps (and later .double() gives) the float64 values
    exact = marc_weights(COUNTS, 1.2, dtype=torch.float64)
    loaded64 = MARC(COUNTS, scale=10.0).double()
    loaded64.load_state_dict(state)
    assert torch.equal(loaded64.class_weight, exact)
    assert torch.equal(loaded64.omega, saved.omega.double()) and torch.equal(loaded64.beta, saved.beta.double())
    loaded.load_state_dict(state)
    assert torch.equal(loaded.double().class_weight, exact)
    # a float64 state dict holds the float64 values and loads into either dtype
    state64 = MARC(COUNTS).double().state_dict()
    assert torch.equal(state64["class_weight"], exact)
    into32 = MARC(COUNTS)
    into32.load_state_dict(state64)
    assert torch.equal(into32.class_weight, exact.float()) and torch.equal(into32.double().class_weight, exact)

    # load_state_dict(assign=True) takes the saved tensors themselves
    assigned = MARC(COUNTS).double()
    assigned.load_state_dict(state, assign=True)
    assert torch.equal(assigned.class_weight, state["class_weight"])
    assert torch.equal(assigned.double().class_weight, exact)

    # other values (U of another gamma) replace this module's U, in .double() too
    other = MARC(COUNTS, gamma=0.5).state_dict()
    for replaced in (MARC(COUNTS), MARC(COUNTS).double()):
        replaced.load_state_dict(other)
        assert torch.equal(replaced.float().class_weight, other["class_weight"])
        assert torch.equal(replaced.double().class_weight, other["class_weight"].double())


def test_calibrated_logits():
    marc = MARC(COUNTS, scale=16.0).double()
    logits, _, norms = _random_case()
    with torch.no_grad():
        marc.omega.copy_(torch.tensor([1.5, 0.5, 1.0, 2.0]))
        marc.beta.copy_(torch.tensor([-0.1, 0.0, 0.2, 0.3]))
    expected = 16.0 * (marc.omega * logits + marc.beta * norms)
    torch.testing.assert_close(marc.calibrated_logits(logits, norms), expected)
    torch.testing.assert_close(marc(logits, norms), expected)


def test_loss_and_gradients_match_a_direct_computation():
    marc = MARC(COUNTS, scale=10.0).double()
    logits, y, norms = _random_case(1)
    with torch.no_grad():
        marc.omega.copy_(torch.tensor([1.2, 0.9, 1.1, 1.3]))
        marc.beta.copy_(torch.tensor([-0.05, 0.02, 0.1, 0.2]))
    loss = marc.loss(logits, y, norms)
    omega = marc.omega.detach().clone().requires_grad_(True)
    beta = marc.beta.detach().clone().requires_grad_(True)
    expected = _direct_loss(logits, y, norms, omega, beta, 10.0, COUNTS)
    # after .double() U holds its float64 values, so the two agree to float64 round-off
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(marc.omega.grad, omega.grad, rtol=1e-11, atol=1e-14)
    torch.testing.assert_close(marc.beta.grad, beta.grad, rtol=1e-11, atol=1e-14)
    # a plain mean over the batch: the weighted mean of F.cross_entropy(weight=U) is a different number
    weighted = F.cross_entropy(10.0 * (omega * logits + beta * norms), y, weight=torch.tensor(_u_numpy(COUNTS)))
    assert abs(weighted.item() - loss.item()) > 1e-3


def test_class_norms_of_a_cosine_classifier_are_its_raw_row_norms():
    """Over the cosines of a cosine classifier, MARC with the raw row norms of its weight is the cosine head
    of margin_cross_entropy with omega and beta; ones (the norms of the normalised rows) are not."""
    import fused_margin as fm

    g = torch.Generator().manual_seed(4)
    x = torch.randn(12, 6, generator=g, dtype=torch.float64)
    w = 3 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (12,), generator=g)
    marc = MARC(COUNTS, scale=10.0).double()
    with torch.no_grad():
        marc.omega.copy_(torch.tensor([1.2, 0.9, 1.1, 1.3]))
        marc.beta.copy_(torch.tensor([-0.05, 0.02, 0.1, 0.2]))
    cosines = F.normalize(x, dim=1) @ F.normalize(w, dim=1).t()
    head = (
        fm.margin_cross_entropy(
            x,
            y,
            w,
            head="cosine",
            scale=10.0,
            omega=marc.omega.detach(),
            beta=marc.beta.detach(),
            class_weight=marc.class_weight,
            reduction="sum",
        )
        / 12
    )
    with torch.no_grad():
        torch.testing.assert_close(marc.loss(cosines, y, w.norm(dim=1)), head, rtol=1e-12, atol=0)
        assert abs(marc.loss(cosines, y, torch.ones(4, dtype=torch.float64)).item() - head.item()) > 1e-2


def test_ignored_rows_count_nowhere():
    marc = MARC(COUNTS, scale=10.0).double()
    logits, y, norms = _random_case(2, rows=10)
    y_ignored = y.clone()
    y_ignored[[1, 4]] = -100
    keep = y_ignored != -100
    torch.testing.assert_close(marc.loss(logits, y_ignored, norms), marc.loss(logits[keep], y[keep], norms))


def test_bad_arguments():
    with pytest.raises(ValueError, match="class_counts"):
        MARC([10, -1])
    with pytest.raises(ValueError, match="scale"):
        MARC(COUNTS, scale=0.0)
    marc = MARC(COUNTS)
    with pytest.raises(ValueError, match="logits"):
        marc.calibrated_logits(torch.zeros(3, 5), torch.ones(4))
    with pytest.raises(ValueError, match="class_norms"):
        marc.loss(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), torch.ones(3))
    with pytest.raises(ValueError, match="epochs"):
        marc.fit([], torch.ones(4), epochs=0)


def _biased_scores(counts, per_class=None, seed=0):
    """Cosine-like scores of a frozen model that over-predicts the head: 0.4 on the true class, noise, and a
    bias that favours frequent classes."""
    g = torch.Generator().manual_seed(seed)
    sizes = counts if per_class is None else [per_class] * len(counts)
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    bias = torch.tensor(np.log(np.asarray(counts) / max(counts)) * 0.08, dtype=torch.float32)
    z = 0.4 * F.one_hot(y, len(counts)).float() + 0.15 * torch.randn(len(y), len(counts), generator=g) + bias
    return z.clamp(-1, 1), y


def test_fit_lowers_the_balanced_loss_and_its_own_loss():
    torch.manual_seed(0)
    train_z, train_y = _biased_scores(COUNTS, seed=1)
    test_z, test_y = _biased_scores(COUNTS, per_class=200, seed=2)
    norms = torch.tensor([1.3, 1.1, 0.9, 0.7])
    marc = MARC(COUNTS, scale=10.0)
    with torch.no_grad():
        before_train = marc.loss(train_z, train_y, norms).item()
        before = F.cross_entropy(marc(test_z, norms), test_y).item()
        before_acc = (marc(test_z, norms).argmax(1) == test_y).float().mean().item()
    history = marc.fit_on_logits(train_z, train_y, norms, batch_size=64, epochs=15, lr=0.05, progress=False)
    with torch.no_grad():
        after_train = marc.loss(train_z, train_y, norms).item()
        after = F.cross_entropy(marc(test_z, norms), test_y).item()
        after_acc = (marc(test_z, norms).argmax(1) == test_y).float().mean().item()
    assert len(history) == 15 and history[-1] < history[0]
    assert after_train < 0.9 * before_train
    assert after < before - 0.05, (before, after)
    assert after_acc > before_acc
    # the tail class's bias went up relative to the head's
    assert (marc.beta[3] * norms[3] - marc.beta[0] * norms[0]).item() > 0


def test_fit_with_a_frozen_model_leaves_it_unchanged():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(40, 6)
    y = torch.randint(0, 4, (40,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    marc = MARC(COUNTS)
    history = marc.fit(loader, model.weight.detach().norm(dim=1), logits_fn=model, epochs=3, lr=0.05, progress=False)
    assert len(history) == 3
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not torch.equal(marc.omega.data, torch.ones(4))


def test_fit_shows_progress_without_tqdm(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    z, y = _biased_scores(COUNTS, seed=3)
    MARC(COUNTS, scale=10.0).fit_on_logits(z, y, torch.ones(4), epochs=2, lr=0.01, progress=True, desc="calib")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("calib")]
    assert len(lines) == 2 and lines[1].startswith("calib 2: loss=")
