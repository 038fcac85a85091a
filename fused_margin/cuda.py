"""The former name of :mod:`fused_margin.extension` (the C++ extension's wrapper serves the CPU kernels
as much as the CUDA ones, hence the new name). ``import fused_margin.cuda`` still works and gives that
same module object, so nothing is registered twice."""
import sys

from . import extension as _extension

sys.modules[__name__] = _extension
