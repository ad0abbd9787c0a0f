"""DiNAT in Triton as one import: ``import dinat`` registers the timm models and exposes the ops.

    import dinat, timm
    out = dinat.na2d(q, k, v, kernel_size=7, dilation=2)   # = dinat.kernels.na2d
    model = timm.create_model("dinat_mini")                 # registered by ``import dinat``

Subpackages: ``dinat.kernels`` (the NA ops; no torch.nn), ``dinat.models`` (the timm models),
``dinat.training`` (train.py / eval.py's logic; imported on first use, it needs Hydra).

The repository keeps ``kernels/``, ``models/``, ``training/`` at its root; an install maps them
under ``dinat`` (``[tool.setuptools] package-dir`` in pyproject.toml), so they never become top-level
names (PyPI's ``kernels`` is Hugging Face's kernel hub). A source checkout run without installing
(``PYTHONPATH=.``, as on the GPU image) finds them next to this folder instead: see below.
"""

import importlib
import os

# Source checkout: the subpackages are this folder's siblings, not its children. Searching the
# repository root too makes ``dinat.kernels`` load kernels/ under that one name (an installed wheel
# has dinat/kernels/ itself, and an editable install's finder points at the same files).
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not os.path.isdir(os.path.join(__path__[0], "kernels")) and os.path.isfile(
        os.path.join(_REPO_ROOT, "kernels", "__init__.py")):
    __path__.append(_REPO_ROOT)

from . import kernels, models  # noqa: E402  (models: registers every variant with timm)
from .kernels import (  # noqa: E402
    NAParams, available_backends, na1d, na1d_av, na1d_qk, na2d, na2d_av, na2d_qk, na3d, na3d_av, na3d_qk,
)

__all__ = [
    "kernels", "models", "training",
    "na1d", "na2d", "na3d",
    "na1d_qk", "na2d_qk", "na3d_qk",
    "na1d_av", "na2d_av", "na3d_av",
    "available_backends", "NAParams",
]


def __getattr__(name: str):
    # ``dinat.training`` on first use: it imports Hydra/OmegaConf, which the ops and models don't need.
    if name == "dinat.training":
        return importlib.import_module(".training", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
