"""Run code written for NATTEN <= 0.17 unchanged: its modules, ``install()`` and ``patch_transformers()``.

The functional API and the context functions are ``kernels.natten_compat`` (no ``torch.nn`` in
``kernels``); this module adds what needs ``torch.nn`` or the whole package:

* ``NeighborhoodAttention1D/2D/3D``: NATTEN 0.17.4's modules -- same constructor arguments,
  same parameters and state-dict keys (``qkv``, ``rpb`` when ``rel_pos_bias=True``, ``proj``),
  channels-last input ``[B, *spatial, C]``. Like 0.17.4 (and unlike 0.15, which zero-padded)
  they reject a feature map smaller than ``kernel_size * dilation`` with a clear error.
* ``install()``: when the real NATTEN cannot be imported, ``import natten``,
  ``import natten.functional`` and ``from natten import NeighborhoodAttention2D`` resolve to this
  layer; ``natten.__version__`` is ``"0.17.4+dinat.triton"`` (the API it implements, and whose).
* ``patch_transformers()``: Hugging Face's DiNAT/NAT decide at import time, from package
  metadata a module alias cannot provide, that NATTEN is missing; this routes them to our ops.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import sys
import types
from typing import Optional

import torch
import torch.nn as nn
from torch.nn.init import trunc_normal_

from dinat.kernels import natten_compat as F

__all__ = ["NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D",
           "install", "uninstall", "is_installed", "patch_transformers", "NATTEN_VERSION"]

NATTEN_VERSION = "0.17.4+dinat.triton"  # NATTEN's API version, local label naming who implements it


class _NeighborhoodAttention(nn.Module):
    """qkv Linear -> neighborhood attention (scaled q . k + rpb, softmax, weighted values) -> proj Linear."""

    ndim = 0

    def __init__(self, dim: int, num_heads: int, kernel_size, dilation=1, is_causal=False,
                 rel_pos_bias: bool = False, qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, use_experimental_ops: bool = False):
        super().__init__()
        name = type(self).__name__
        self.kernel_size, self.dilation, self.is_causal = F._params(name, self.ndim, kernel_size, dilation, is_causal)
        if any(self.is_causal) and rel_pos_bias:
            raise NotImplementedError(f"{name}: causal neighborhood attention is undefined with relative positional "
                                      f"biases; pass rel_pos_bias=False or is_causal=False")
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"{name}: num_heads must divide dim; got dim={dim}, num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5  # NATTEN's `or`: qk_scale=0 meant the default too
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.zeros(num_heads, *(2 * k - 1 for k in self.kernel_size)))
            trunc_normal_(self.rpb, std=0.02, mean=0.0, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)
        self.attn_drop_rate = attn_drop
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.use_experimental_ops = use_experimental_ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        if x.dim() != self.ndim + 2:
            raise ValueError(f"{name} expected a rank-{self.ndim + 2} input [batch, *spatial, channels]; got shape "
                             f"{tuple(x.shape)}")
        spatial = x.shape[1:-1]
        F._check_fits(name, spatial, self.kernel_size, self.dilation)
        fused = F.is_fused_na_enabled()
        if self.use_experimental_ops and not fused:
            raise NotImplementedError(f"{name}: use_experimental_ops needs fused NA (natten.use_fused_na()), as in "
                                      f"NATTEN 0.17")
        # Heads-last q, k, v are a free view of the projection (NATTEN's unfused path permuted to
        # heads-first; the arithmetic is the same).
        q, k, v = self.qkv(x).reshape(*x.shape[:-1], 3, self.num_heads, self.head_dim).unbind(-3)
        params = (self.kernel_size, self.dilation, self.is_causal)
        # NATTEN 0.17 silently skipped attention dropout on its fused path; weights are materialised
        # instead whenever dropout is active, so it is always applied.
        if fused and not (self.training and self.attn_drop_rate > 0):
            out = F.API_NA[self.ndim](q, k, v, *params, self.rpb, self.scale, backend=F.get_backend())
        else:
            attn = F.API_QK[self.ndim](q * self.scale, k, *params, self.rpb, backend=F.get_backend())
            attn = self.attn_drop(attn.softmax(dim=-1))
            out = F.API_AV[self.ndim](attn, v, *params, backend=F.get_backend())
        return self.proj_drop(self.proj(out.reshape(x.shape)))

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
                f"dilation={self.dilation}, is_causal={self.is_causal}, has_bias={self.rpb is not None}")


class NeighborhoodAttention1D(_NeighborhoodAttention):
    """NATTEN 0.17.4's ``NeighborhoodAttention1D``: input ``[B, L, C]``."""

    ndim = 1


class NeighborhoodAttention2D(_NeighborhoodAttention):
    """NATTEN 0.17.4's ``NeighborhoodAttention2D``: input ``[B, H, W, C]``."""

    ndim = 2


class NeighborhoodAttention3D(_NeighborhoodAttention):
    """NATTEN 0.17.4's ``NeighborhoodAttention3D``: input ``[B, D, H, W, C]``."""

    ndim = 3


# ---------------------------------------------------------------------------------------------
# `import natten` -> this layer.
# ---------------------------------------------------------------------------------------------

_MODULE_NAMES = {1: "NeighborhoodAttention1D", 2: "NeighborhoodAttention2D", 3: "NeighborhoodAttention3D"}


def _module(name: str, doc: str, names: dict, package: bool = False) -> types.ModuleType:
    module = types.ModuleType(name, doc)
    # A spec lets importlib.util.find_spec("natten") answer (it reads sys.modules' __spec__).
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
    if package:
        module.__path__ = []
    module.__dict__.update(names)
    module.__all__ = [n for n in names if not n.startswith("_")]
    return module


def _build_alias() -> dict[str, types.ModuleType]:
    """Fresh ``natten`` modules holding NATTEN 0.17.4's public names, bound to this layer."""
    context = {n: getattr(F, n) for n in F.CONTEXT_NAMES}
    functional = _module("natten.functional", "NATTEN 0.17.4's functional API on dinat-triton's kernels.",
                         {n: getattr(F, n) for n in F.FUNCTIONAL_NAMES})
    modules = {"natten.functional": functional,
               "natten.context": _module("natten.context", "NATTEN 0.17.4's context functions (dinat-triton).",
                                         context)}
    classes = {}
    for ndim, cls_name in _MODULE_NAMES.items():
        cls = globals()[cls_name]
        classes[cls_name] = cls
        # 0.17 moved the modules to natten.naXd and kept natten.nattenXd as deprecated aliases.
        for sub in (f"na{ndim}d", f"natten{ndim}d"):
            modules[f"natten.{sub}"] = _module(f"natten.{sub}", f"NATTEN's {cls_name} (dinat-triton).",
                                               {cls_name: cls})
    root = _module("natten", f"NATTEN {NATTEN_VERSION}: NATTEN 0.17.4's API served by dinat-triton's kernels "
                   "(dinat.models.natten_compat.install()); not the NATTEN package.",
                   {**classes, **context, "__version__": NATTEN_VERSION}, package=True)
    for full_name, module in modules.items():
        setattr(root, full_name.split(".", 1)[1], module)
    return {"natten": root, **modules}


def _natten_entries() -> dict[str, types.ModuleType]:
    return {k: v for k, v in sys.modules.items() if k == "natten" or k.startswith("natten.")}


def is_installed() -> bool:
    """Whether ``import natten`` currently gives this layer."""
    root = sys.modules.get("natten")
    return root is not None and getattr(root, "__version__", None) == NATTEN_VERSION


def _real_natten_importable() -> bool:
    """Import the real NATTEN, if any. A broken install (e.g. a libnatten built for another torch)
    counts as absent; what it left half-imported in sys.modules is removed."""
    if importlib.util.find_spec("natten") is None:
        return False
    try:
        importlib.import_module("natten")
        return True
    except Exception:  # ImportError, OSError from a stale binary, ...: not usable
        for name in _natten_entries():
            del sys.modules[name]
        return False


def install() -> bool:
    """Make ``import natten`` resolve to this layer unless the real NATTEN imports.

    Returns True when ``natten`` is (now) this layer, False when the real NATTEN was found and
    left in place. Idempotent; ``uninstall()`` undoes it.
    """
    if is_installed():
        return True
    if "natten" in sys.modules or _real_natten_importable():
        return False
    sys.modules.update(_build_alias())
    return True


def uninstall() -> None:
    """Remove the ``natten`` alias installed by ``install()`` (the real NATTEN is never touched)."""
    if is_installed():
        for name in _natten_entries():
            del sys.modules[name]


@contextlib.contextmanager
def _alias_during_import():
    """``natten`` is this layer while a block runs (so a module's ``from natten.functional import
    ...`` binds our ops even where another NATTEN is installed); sys.modules is restored after."""
    saved = _natten_entries()
    for name in saved:
        del sys.modules[name]
    sys.modules.update(_build_alias())
    try:
        yield
    finally:
        for name in _natten_entries():
            del sys.modules[name]
        sys.modules.update(saved)


# Modules of Hugging Face transformers that call NATTEN: DiNAT and NAT (deprecated/ since 4.40,
# gone in 5.x). Each binds `natten2dqkrpb` / `natten2dav` at import.
_HF_MODULES = ("transformers.models.dinat.modeling_dinat", "transformers.models.nat.modeling_nat",
               "transformers.models.deprecated.nat.modeling_nat")


def _natten_available() -> bool:
    return True


def patch_transformers() -> list[str]:
    """Make Hugging Face transformers' DiNAT and NAT run on our kernels, unmodified.

    transformers decides at import whether NATTEN is there from package metadata (which an alias
    cannot supply) and otherwise binds stubs that raise; ``requires_backends`` checks again when a
    model is built. This marks NATTEN available to transformers, imports the modeling modules
    with ``natten`` aliased to this layer, and rebinds their ``natten2dqkrpb``/``natten2dav`` to
    ours. Returns the names of the modules patched. Call it before building the models.
    """
    try:
        import transformers  # noqa: F401
        from transformers.utils import import_utils
    except ImportError as exc:
        raise ImportError("patch_transformers() needs Hugging Face transformers installed "
                          "(pip install 'dinat-triton[test]' pins a release with DiNAT)") from exc
    import_utils._natten_available = True  # transformers 4.x caches the answer in this flag
    for owner in (import_utils, sys.modules.get("transformers.utils")):
        if owner is not None and hasattr(owner, "is_natten_available"):
            owner.is_natten_available = _natten_available
    mapping = getattr(import_utils, "BACKENDS_MAPPING", {})
    if "natten" in mapping:
        mapping["natten"] = (_natten_available, mapping["natten"][1])
    patched = []
    for name in _HF_MODULES:
        with _alias_during_import():
            try:
                module = importlib.import_module(name)
            except ModuleNotFoundError as exc:
                if exc.name is not None and name.startswith(exc.name):
                    continue  # not part of this transformers release
                raise
        module.is_natten_available = _natten_available
        module.natten2dqkrpb = F.natten2dqkrpb
        module.natten2dav = F.natten2dav
        patched.append(name)
    if not patched:
        raise ImportError(f"patch_transformers(): transformers {transformers.__version__} has none of {_HF_MODULES}")
    return patched
