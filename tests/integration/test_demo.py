import re

import numpy as np
import pytest

import fused_margin as fm
from fused_margin.training import demo


def test_split_is_balanced_long_tailed_and_disjoint():
    config = demo.DemoConfig(test_per_class=20, meta_per_class=4)
    split = demo.make_split(3, 20.0, config)
    np.testing.assert_array_equal(np.bincount(split.y_test.numpy(), minlength=10), [20] * 10)
    np.testing.assert_array_equal(np.bincount(split.y_train.numpy(), minlength=10), split.counts)
    assert split.counts[0] / split.counts[-1] == pytest.approx(20.0, rel=0.1)
    np.testing.assert_array_equal(split.counts, fm.long_tailed_counts(10, int(split.counts[0]), 20.0).numpy())
    train_rows = {tuple(r) for r in split.x_train.numpy().round(6)}
    test_rows = {tuple(r) for r in split.x_test.numpy().round(6)}
    assert len(train_rows & test_rows) <= 2  # digits holds a few duplicate images, no shared example
    meta = np.bincount(split.y_train[split.meta_index].numpy(), minlength=10)
    np.testing.assert_array_equal(meta, np.minimum(4, split.counts))


def test_demo_smoke(tmp_path, capsys):
    out = tmp_path / "table.md"
    table = demo.main(["--seeds", "0", "--imbalance", "10", "--epochs", "12", "--no-progress", "--out", str(out)])
    assert out.read_text() == table
    rows = [line for line in table.splitlines() if line.startswith("| 10 |")]
    assert [row.split("|")[2].strip() for row in rows] == list(demo.METHODS)
    accuracy = {}
    for row in rows:
        cells = [c.strip() for c in row.split("|")[3:7]]
        values = [float(c) for c in cells]
        assert all(0.0 <= v <= 100.0 for v in values)
        accuracy[row.split("|")[2].strip()] = values[0]
    # 12 epochs on 10-way digits: well above chance (10 %) for plain cross-entropy
    assert accuracy["CE"] > 40.0
    printed = capsys.readouterr().out
    assert re.search(r"CE\s+overall", printed) and "table written" in printed


def test_bad_method():
    with pytest.raises(ValueError, match="unknown methods"):
        demo.run_demo(demo.DemoConfig(methods=("CE", "focal"), seeds=(0,), epochs=1, progress=False))
