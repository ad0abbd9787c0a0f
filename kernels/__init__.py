"""(Dilated) neighborhood attention: a PyTorch reference and Triton kernels.

Tensors are heads-last, ``[batch, *spatial, heads, head_dim]``. See ``kernels.api``.
"""

if __name__ == "kernels":  # this folder imported by its bare name: see dinat/_bare_names.py
    from dinat._bare_names import hand_over
    hand_over(globals())

from .api import na1d, na1d_av, na1d_qk, na2d, na2d_av, na2d_qk, na3d, na3d_av, na3d_qk
from .backends import available_backends
from .geometry import NAParams

__all__ = [
    "na1d", "na2d", "na3d",
    "na1d_qk", "na2d_qk", "na3d_qk",
    "na1d_av", "na2d_av", "na3d_av",
    "available_backends", "NAParams",
]
