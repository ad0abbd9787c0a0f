"""Backend registry: which implementation runs an NA call.

A backend is a module exposing ``unavailable_reason(device) -> str | None`` and
``na(q, k, v, params, rpb, scale, return_lse)``; those that materialise the logits also expose
``qk(q, k, params, rpb)`` and ``av(attn, v, params)``; those with limits (dtype, head dim) expose
``unsupported_reason(tensor) -> str | None`` so that "auto" can pass them over. A backend that fails to import (no Triton
on this machine) is reported as unavailable; the reference always runs.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

# name -> module path. "reference" and "tiled" are pure PyTorch; the others are Triton.
BACKENDS: dict[str, str] = {
    "reference": "dinat.kernels.reference",
    "tiled": "dinat.kernels.tiled",
    "unfused": "dinat.kernels.unfused",
    "fused": "dinat.kernels.fused",
}

# What "auto" tries, fastest first, per device type. On CPU the Triton backends only run under
# the (slow) interpreter, so "auto" never picks them there; "tiled" (plain PyTorch) is the fast
# path on every device without Triton (CPU, MPS, ...). It has no separate qk/av ops, so those
# fall through to the reference.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("fused", "unfused", "tiled", "reference"),
    # Meta tensors are for shape and FLOP analysis: the reference's einsums count exactly NA's
    # useful work, where "tiled"'s [tile, halo] matmuls would also count the halo keys it masks.
    "meta": ("reference",),
}
_AUTO_DEFAULT = ("tiled", "reference")


_LOADED: dict[str, tuple[ModuleType | None, str | None]] = {}


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    """(module, None) or (None, why it cannot be imported); imported once, then looked up."""
    if name not in _LOADED:
        try:
            _LOADED[name] = importlib.import_module(BACKENDS[name]), None
        except Exception as exc:  # triton missing or broken here: that backend is unavailable, not fatal
            _LOADED[name] = None, f"it cannot be imported ({type(exc).__name__}: {exc})"
    return _LOADED[name]


def _unsupported(module: ModuleType, tensor: torch.Tensor | None) -> str | None:
    """Why ``module`` cannot take this problem (dtype, head dim, ...), if it says; None otherwise."""
    check = getattr(module, "unsupported_reason", None)
    return check(tensor) if check is not None and tensor is not None else None


def resolve(backend: str, device: torch.device, op: str = "na", tensor: torch.Tensor | None = None) -> ModuleType:
    """The backend module that runs ``op`` ("na", "qk" or "av") on ``device``, or a ValueError.

    ``tensor`` (the query, or the value for "av") lets "auto" pass over a backend that cannot take
    this problem (e.g. float64 or a head dim beyond a kernel's limit) for the next one; an explicit
    backend is used as asked and raises its own clear error.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, one of {['auto', *BACKENDS]}; got {type(backend).__name__}")
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, _AUTO_DEFAULT):
            module, _ = _load(name)
            if (module is not None and hasattr(module, op) and module.unavailable_reason(device) is None
                    and _unsupported(module, tensor) is None):
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


# Import every backend now rather than on first call: torch.compile cannot trace importlib, so a
# lazy import inside a compiled region would break the graph (fullgraph=True would fail).
for _name in BACKENDS:
    _load(_name)
