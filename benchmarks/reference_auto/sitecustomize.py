"""Benchmarking only: make ``backend="auto"`` on CPU (and every non-CUDA device) run the reference,
as before issue 13's ``tiled`` backend, in every Python process started with this folder on
``PYTHONPATH`` (subprocesses included), so "before/after" timings of the demo or the test suite
need no code change::

    PYTHONPATH=.:benchmarks/reference_auto python train.py       # before: auto -> reference
    PYTHONPATH=. python train.py                                  # after:  auto -> tiled

Python imports the first ``sitecustomize`` module on ``sys.path`` at start-up. This one imports
nothing of the project there: it swaps the registry's default order when ``kernels.backends`` is
first imported, so a process still sets its environment first (``tests/conftest.py`` sets
``TRITON_INTERPRET=1`` before Triton loads, and the Triton backends' CPU tests run under it too).
"""

import importlib.abc
import importlib.machinery
import sys


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "dinat.kernels.backends":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            module._AUTO_DEFAULT = ("reference",)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _PatchOnImport())
