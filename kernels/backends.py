"""Backend registry: which implementation runs an NA call.

A backend is a module exposing ``unavailable_reason(device) -> str | None`` and
``na(q, k, v, params, rpb, scale, return_lse)``; those that materialise the logits also expose
``qk(q, k, params, rpb)`` and ``av(attn, v, params)``. Modules are imported lazily, so a machine
without Triton still runs the reference.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

# name -> module path. "reference" is pure PyTorch; the others are Triton.
BACKENDS: dict[str, str] = {
    "reference": "kernels.reference",
    "unfused": "kernels.unfused",
    "fused": "kernels.fused",
}

# What "auto" tries, fastest first, per device type. On CPU the Triton backends only run under
# the (slow) interpreter, so "auto" never picks them there.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("fused", "unfused", "reference"),
}
_AUTO_DEFAULT = ("reference",)


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module(BACKENDS[name]), None
    except ImportError as exc:  # triton missing, or a backend this build lacks
        return None, f"it cannot be imported ({exc})"


def resolve(backend: str, device: torch.device, op: str = "na") -> ModuleType:
    """The backend module that runs ``op`` ("na", "qk" or "av") on ``device``, or a ValueError."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, one of {['auto', *BACKENDS]}; got {type(backend).__name__}")
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, _AUTO_DEFAULT):
            module, _ = _load(name)
            if module is not None and hasattr(module, op) and module.unavailable_reason(device) is None:
                return module
        raise ValueError(f"backend='auto': no backend can run NA {op} on device {device}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {list(BACKENDS)}; got {backend!r}")
    module, reason = _load(backend)
    if module is not None:
        reason = module.unavailable_reason(device)
        if reason is None and not hasattr(module, op):
            reason = f"it has no separate {op} op"
    if reason is not None:
        raise ValueError(f"backend={backend!r} is unavailable for tensors on {device}: {reason}")
    return module


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run ``naXd`` on ``device``."""
    device = torch.device(device)
    names = []
    for name in BACKENDS:
        module, _ = _load(name)
        if module is not None and module.unavailable_reason(device) is None:
            names.append(name)
    return names
