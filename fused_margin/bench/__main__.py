"""``python -m fused_margin.bench``."""
from .cli import main

raise SystemExit(main())
