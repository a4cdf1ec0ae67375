"""Benchmarks: `python -m benchmarks.<name>`; `python -m benchmarks.run` runs them all."""
