"""Benchmarking only: make ``backend="auto"`` on CPU (and every non-CUDA device) run the reference,
as before issue 13's ``tiled`` backend, in every Python process started with this folder on
``PYTHONPATH`` (subprocesses included), so "before/after" timings of the demo or the test suite
need no code change::

    PYTHONPATH=.:benchmarks/reference_auto python train.py       # before: auto -> reference
    PYTHONPATH=. python train.py                                  # after:  auto -> tiled

Python imports the first ``sitecustomize`` module on ``sys.path`` at start-up; this one only
swaps the registry's default order. It imports ``kernels`` (and Triton) at start-up, before
``tests/conftest.py`` can set ``TRITON_INTERPRET=1``: the Triton backends' CPU tests do not run
under it (for timing only).
"""

import kernels.backends

kernels.backends._AUTO_DEFAULT = ("reference",)
