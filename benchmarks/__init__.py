"""Benchmarks and analysis tools, measured in the same run against the alternatives (not tests).

- ``python -m benchmarks.na_bench``: NA kernels vs FlexAttention-NA and SDPA (``docs/benchmarks.md``).
- ``python -m benchmarks.model_bench``: DiNAT vs Swin/ConvNeXt img/s (``docs/model_throughput.md``).
- ``python -m benchmarks.receptive_field``: what one output token sees, NAT vs DiNAT.
"""
