"""The benchmark suite: `python -m benchmarks.run` from the repository root (see docs/benchmarks.md)."""
