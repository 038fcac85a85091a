"""The benchmark harness: ``python -m fused_margin.bench`` (``--help`` documents every option).

Fused backends (discovered at run time with :func:`fused_margin.available_backends`) against the eager
reference, ``torch.compile`` of it, plain-CE anchors and the three-GEMM floor, each case gated by a
correctness check against a float64 reference before it is timed. Programmatic use::

    from fused_margin.bench import BenchConfig, run_benchmark, format_table, write_outputs
    run = run_benchmark(BenchConfig(B=64, D=128, C=1000, losses=("dbm-bs",)))
    print(format_table(run)); write_outputs(run, pathlib.Path("out"))
"""

from fused_margin.bench.cli import main
from fused_margin.bench.config import LOSSES, PRESETS, BenchConfig
from fused_margin.bench.report import format_table, write_outputs
from fused_margin.bench.runner import BenchRun, run_benchmark

__all__ = ["main", "run_benchmark", "BenchConfig", "BenchRun", "format_table", "write_outputs", "LOSSES", "PRESETS"]
