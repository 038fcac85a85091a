"""Write fused_margin/backends/csrc/options.h from the option registry (fused_margin/core/options.py): run it
after adding or changing an option the kernels read (tests/core/test_options.py fails while it is stale)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("FUSED_MARGIN_NO_EXT", "1")

from fused_margin.core import options  # noqa: E402

with open(options.header_path(), "w") as f:
    f.write(options.cpp_header())
print("wrote", options.header_path())
