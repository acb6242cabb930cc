"""Benchmarks and their shared helpers (run from the repository root: python -m bench.NAME)."""
