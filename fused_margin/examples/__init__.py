"""Runnable examples (``python -m fused_margin.examples.<name>``)."""
