"""Benchmarks: ``python -m lcjax.bench.attention``."""
