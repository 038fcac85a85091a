"""The runnable examples run and check what they claim."""

import pytest
import torch.distributed as dist

from fused_margin.examples import sharded


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_sharded_example_matches_the_single_process_run(capfd):
    sharded.main(["--world", "2", "--steps", "6"])  # raises SystemExit when the runs differ
    out = capfd.readouterr().out
    assert "largest difference over 6 steps" in out
