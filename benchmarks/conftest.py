"""The benchmarks time the eager row-kernel double of the test suite (tests/helpers/row_torch.py) too."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests", "helpers"))
