"""The suite's shared set-up: the helpers (tests/helpers: the cases and comparisons every backend is held
to, the row-kernel contract in eager torch, the sm_90 compile script) are importable by name, their asserts
rewritten by pytest; tests marked ``cuda`` are skipped, with the reason, where no GPU is present."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers"))
pytest.register_assert_rewrite("kernel_cases")


#: single parametrizations of otherwise quick tests that are marked ``slow`` (whole slow tests carry the
#: decorator): the largest case through Triton's interpreter
SLOW_CASES = (
    "paths/test_lean.py::test_float32_within_tolerance[triton-longer_than_a_chunk]",
    "paths/test_lean.py::test_no_batch_by_class_tensor_is_allocated[triton]",
    "backends/test_triton.py::test_matches_reference_fp32[longer_than_a_chunk]",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(item.nodeid.endswith(case) for case in SLOW_CASES):
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run on the GPU machine (see README)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
