import numpy as np
import pytest
import torch

import fused_margin as fm
from fused_margin.training.data import (
    balanced_indices,
    class_counts_of,
    dataset_labels,
    long_tailed_indices,
    long_tailed_subset,
    shot_accuracy,
    shot_groups,
)


def _labels(per_class=(60, 50, 80, 40, 70), seed=0):
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(per_class)])
    return np.random.default_rng(seed).permutation(labels)


@pytest.mark.parametrize("profile", ["exp", "step", "pareto"])
def test_long_tailed_indices_follow_the_profile(profile):
    labels = _labels()
    idx, counts = long_tailed_indices(labels, imbalance=10, profile=profile, seed=3)
    expected = fm.long_tailed_counts(5, 40, 10, profile).numpy()  # n_max defaults to the smallest class
    np.testing.assert_array_equal(counts, expected)
    np.testing.assert_array_equal(np.bincount(labels[idx], minlength=5), expected)
    assert len(np.unique(idx)) == len(idx) and np.all(np.diff(idx) > 0)


def test_long_tailed_indices_are_seeded():
    labels = _labels()
    a, _ = long_tailed_indices(labels, 5, seed=1)
    b, _ = long_tailed_indices(labels, 5, seed=1)
    c, _ = long_tailed_indices(labels, 5, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_class_order():
    labels = _labels()
    _, counts = long_tailed_indices(labels, 10, class_order=[4, 3, 2, 1, 0], n_max=40)
    np.testing.assert_array_equal(counts, fm.long_tailed_counts(5, 40, 10).numpy()[::-1])
    _, counts = long_tailed_indices(labels, 10, class_order="random", seed=5)
    np.testing.assert_array_equal(np.sort(counts), np.sort(fm.long_tailed_counts(5, 40, 10).numpy()))
    with pytest.raises(ValueError, match="class_order"):
        long_tailed_indices(labels, 10, class_order=[0, 1, 2, 3, 3])
    with pytest.raises(ValueError, match="class_order"):
        long_tailed_indices(labels, 10, class_order="sorted")


def test_not_enough_examples_and_bad_labels():
    labels = _labels()
    with pytest.raises(ValueError, match="n_max"):
        long_tailed_indices(labels, 10, n_max=61)
    with pytest.raises(ValueError, match="class 5"):
        long_tailed_indices(labels, 10, num_classes=6)
    with pytest.raises(TypeError, match="labels"):
        long_tailed_indices(labels.astype(np.float32), 10)
    with pytest.raises(ValueError, match="imbalance"):
        long_tailed_indices(labels, 0.5)


def test_subset_of_a_dataset():
    labels = torch.from_numpy(_labels())
    x = torch.arange(len(labels), dtype=torch.float32)[:, None]
    dataset = torch.utils.data.TensorDataset(x, labels)
    np.testing.assert_array_equal(dataset_labels(dataset), labels.numpy())
    subset, counts = long_tailed_subset(dataset, 4, seed=0)
    got = np.array([int(subset[i][1]) for i in range(len(subset))])
    np.testing.assert_array_equal(np.bincount(got, minlength=5), counts)

    class Plain(torch.utils.data.Dataset):  # no targets attribute: labels read item by item
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return x[i], int(labels[i])

    np.testing.assert_array_equal(dataset_labels(Plain()), labels.numpy())


def test_balanced_indices():
    labels = _labels(per_class=(30, 3, 12))
    chosen, rest = balanced_indices(labels, per_class=10, seed=0)
    np.testing.assert_array_equal(np.bincount(labels[chosen], minlength=3), [10, 3, 10])
    assert len(np.intersect1d(chosen, rest)) == 0 and len(chosen) + len(rest) == len(labels)
    np.testing.assert_array_equal(class_counts_of(labels[rest], 3), [20, 0, 2])
    with pytest.raises(ValueError, match="per_class"):
        balanced_indices(labels, 0)


def test_shot_groups_standard_thresholds():
    groups = shot_groups([500, 101, 100, 20, 19, 1])
    assert list(groups) == ["many", "many", "medium", "medium", "few", "few"]
    assert list(shot_groups([50, 10, 4], thresholds=(40, 5))) == ["many", "medium", "few"]
    with pytest.raises(ValueError, match="thresholds"):
        shot_groups([50, 10], thresholds=(5, 40))


def test_shot_groups_terciles():
    counts = [124, 74, 44, 26, 16, 9, 5, 3, 2, 1]
    groups = shot_groups(counts, "terciles")
    assert list(groups) == ["many"] * 4 + ["medium"] * 3 + ["few"] * 3
    shuffled = [3, 124, 9, 1, 44]  # not sorted: ranks decide
    assert list(shot_groups(shuffled, "terciles")) == ["medium", "many", "medium", "few", "many"]
    with pytest.raises(ValueError, match="thresholds"):
        shot_groups(counts, "quartiles")


def test_shot_accuracy_by_hand():
    counts = [200, 50, 5]  # many, medium, few
    target = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 0, 2, 0, 0, 0])
    acc = shot_accuracy(pred, target, counts)
    assert acc["overall"] == pytest.approx(50.0)
    assert acc["many"] == pytest.approx(75.0)
    assert acc["medium"] == pytest.approx(50.0)
    assert acc["few"] == pytest.approx(25.0)
    # per-class mean inside a group, not pooled over examples
    acc = shot_accuracy(np.array([0, 1, 1, 1]), np.array([0, 1, 1, 1]), [200, 150, 5], thresholds=(100, 20))
    assert acc["many"] == pytest.approx(100.0) and np.isnan(acc["few"])
    acc = shot_accuracy(np.array([0, 0, 0, 1]), np.array([0, 1, 1, 1]), [200, 150, 5])
    assert acc["many"] == pytest.approx((100.0 + 100.0 / 3) / 2)
    with pytest.raises(ValueError, match="same length"):
        shot_accuracy(pred[:3], target, counts)
