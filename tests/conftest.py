import os

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter. It must be switched on before
# triton is first imported, so it is set here, for the whole test process, when no GPU exists.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
