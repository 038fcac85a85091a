"""``python -m fused_margin.bench``."""

from fused_margin.bench.cli import main

raise SystemExit(main())
