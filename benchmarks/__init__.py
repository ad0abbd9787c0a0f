"""Benchmarks: NA kernels against the alternatives, measured in the same run (not tests).

``python -m benchmarks.na_bench --help``; see ``docs/benchmarks.md``.
"""
