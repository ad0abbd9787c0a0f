"""Shipped tables of autotune winners: the format, loading, lookup, and the launch-time choice.

A table maps a *tuning key* (kernel, dtype, head dim, kernel size, dilation, causality, RPB and a
shape bucket) to the launch configuration that won a sweep (``benchmarks.sweep``) on one GPU
family: the kernel's tunable meta-parameter (e.g. ``BLOCK_K``), ``num_warps`` and ``num_stages``.

Which table is used (first that applies):

1. a table installed in-process with :func:`use_table` / switched off with :func:`no_table`;
2. the file named by the ``DINAT_TUNING_TABLE`` environment variable (a missing or malformed
   file is an error, not a silent fallback: the user asked for it);
3. ``kernels/tuned/<family>.json`` for the current GPU's family (``gpu_family``), if shipped.

A hit launches the kernel's ``@triton.jit`` function with the table's config (a one-config
autotuner, which never benchmarks); a miss, or no table, leaves the kernel's own
``triton.autotune`` in charge, exactly as without this module. Without a GPU the family is
``"cpu"``, for which nothing is shipped: the interpreter keeps its single config unless a table is
given explicitly.

See ``kernels/tuned/README.md`` for the JSON format and ``docs/autotune.md`` for the workflow.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import triton
from torch.library import wrap_triton
from triton.runtime.autotuner import Autotuner

from .triton_utils import interpreted

TABLE_ENV = "DINAT_TUNING_TABLE"
TUNED_DIR = Path(__file__).resolve().parent / "tuned"
FORMAT = "dinat-tuning-table"
VERSION = 1

# Kernel name -> its tunable meta-parameter(s): what a table entry may set besides warps/stages.
# Everything else the kernel takes (tiles of the fused kernels, BLOCK_D, ...) is fixed by the
# launch site; the unfused dRPB kernel is absent on purpose (fixed tiles fix its summation order).
TUNABLE: dict[str, tuple[str, ...]] = {
    "fused_fwd": ("BLOCK_K",),
    "fused_bwd_dq": ("BLOCK_K",),
    "fused_bwd_dkdv": ("BLOCK_Q",),
    "unfused_window_dot": ("BLOCK_N",),
    "unfused_window_sum": ("BLOCK_N",),
    "unfused_inverse_sum": ("BLOCK_N",),
}

# The register ceiling per thread a table may set (``.maxnreg``; 255 is the architecture's cap).
MIN_MAXNREG, MAX_MAXNREG = 16, 255

_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
                torch.float64: "float64"}


# ---------------------------------------------------------------------------------------------
# GPU family


_RTX = re.compile(r"\bRTX\s*(?:A)?(\d{4})\b")
# A letter or two then digits, optionally a suffix letter: H100, H200, A100, L40S, L4, GH200, MI300X.
_MODEL = re.compile(r"\b([A-Z]{1,2}\d{1,4}[A-Z]?)\b")


def gpu_family(device_name: str) -> str:
    """The table family of a device name: ``"NVIDIA H100 80GB HBM3"`` -> ``"H100"``.

    Memory sizes and form factors (80GB, SXM4, PCIe) are dropped: they share one table. Names with
    no recognisable model number become the whole name with non-alphanumerics replaced by ``_``.
    """
    if not isinstance(device_name, str) or not device_name.strip():
        raise ValueError(f"gpu_family: device_name must be a non-empty string; got {device_name!r}")
    rtx = _RTX.search(device_name)
    if rtx:
        return "RTX" + rtx.group(1)
    model = _MODEL.search(device_name)
    if model:
        return model.group(1)
    return re.sub(r"[^0-9A-Za-z]+", "_", device_name.strip()).strip("_")


def current_gpu_name() -> Optional[str]:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


_FAMILY_OF_DEVICE: dict[int, str] = {}


def current_family() -> str:
    """Family of the current CUDA device, ``"cpu"`` without one (no table is shipped for it)."""
    if not torch.cuda.is_available():
        return "cpu"
    index = torch.cuda.current_device()
    if index not in _FAMILY_OF_DEVICE:  # asked on every launch: look the name up once per device
        _FAMILY_OF_DEVICE[index] = gpu_family(torch.cuda.get_device_name(index))
    return _FAMILY_OF_DEVICE[index]


# ---------------------------------------------------------------------------------------------
# Keys


def shape_bucket(spatial: tuple[int, ...]) -> tuple[int, ...]:
    """Each axis rounded up to a power of two: nearby map sizes (56 and 64) share a winner."""
    return tuple(triton.next_power_of_2(int(n)) for n in spatial)


@dataclass(frozen=True)
class TuningKey:
    kernel: str
    dtype: str
    head_dim: int
    kernel_size: tuple[int, ...]
    dilation: tuple[int, ...]
    causal: tuple[bool, ...]
    rpb: bool
    bucket: tuple[int, ...]

    @classmethod
    def make(cls, kernel: str, dtype, head_dim: int, spatial, kernel_size, dilation, causal, rpb: bool) -> "TuningKey":
        """A key from per-axis values; leading axes that do nothing (size 1, window 1) are dropped,
        so a 2-D problem padded to 3-D by a launch site keys like the 2-D problem it is."""
        axes = list(zip(spatial, kernel_size, dilation, causal))
        while len(axes) > 1 and tuple(axes[0][:3]) == (1, 1, 1) and not axes[0][3]:
            axes.pop(0)
        spatial, kernel_size, dilation, causal = zip(*axes)
        dtype_name = _DTYPE_NAMES.get(dtype, dtype) if isinstance(dtype, torch.dtype) else str(dtype)
        return cls(kernel, dtype_name, int(head_dim), tuple(int(k) for k in kernel_size),
                   tuple(int(d) for d in dilation), tuple(bool(c) for c in causal), bool(rpb),
                   shape_bucket(spatial))

    def to_json(self) -> dict:
        return dict(kernel=self.kernel, dtype=self.dtype, head_dim=self.head_dim,
                    kernel_size=list(self.kernel_size), dilation=list(self.dilation), causal=list(self.causal),
                    rpb=self.rpb, bucket=list(self.bucket))

    def label(self) -> str:
        axes = lambda v: "x".join(str(int(x)) for x in v)  # noqa: E731
        causal = f" causal{axes(self.causal)}" if any(self.causal) else ""
        return (f"{self.kernel} {self.dtype} D{self.head_dim} k{axes(self.kernel_size)} d{axes(self.dilation)} "
                f"<= {axes(self.bucket)}{causal}{' rpb' if self.rpb else ''}")


KEY_FIELDS = ("kernel", "dtype", "head_dim", "kernel_size", "dilation", "causal", "rpb", "bucket")


@dataclass(frozen=True)
class LaunchConfig:
    """What a table entry launches: the tunable meta-parameters, warps, pipeline stages and,
    optionally, a per-thread register ceiling (``maxnreg``: ptxas's ``.maxnreg``; None: ptxas picks)."""

    meta: tuple[tuple[str, int], ...]
    num_warps: int
    num_stages: int
    maxnreg: Optional[int] = None

    def to_triton(self) -> triton.Config:
        return triton.Config(dict(self.meta), num_warps=self.num_warps, num_stages=self.num_stages,
                             maxnreg=self.maxnreg)

    def to_json(self) -> dict:
        out = dict(meta=dict(self.meta), num_warps=self.num_warps, num_stages=self.num_stages)
        if self.maxnreg is not None:
            out["maxnreg"] = self.maxnreg
        return out

    @classmethod
    def from_triton(cls, config: triton.Config) -> "LaunchConfig":
        maxnreg = getattr(config, "maxnreg", None)
        return cls(tuple(sorted(config.kwargs.items())), int(config.num_warps), int(config.num_stages),
                   None if maxnreg is None else int(maxnreg))


# ---------------------------------------------------------------------------------------------
# Tables


@dataclass(frozen=True)
class Table:
    path: str
    family: str
    gpu_names: tuple[str, ...]
    winners: dict  # TuningKey -> LaunchConfig

    def lookup(self, key: TuningKey) -> Optional[LaunchConfig]:
        return self.winners.get(key)


class TableError(ValueError):
    """A tuning table that cannot be used; the message names the file and the rule broken."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_key(where: str, entry: dict) -> TuningKey:
    missing = [f for f in KEY_FIELDS if f not in entry]
    if missing:
        raise TableError(f"{where} lacks key field(s) {missing} (every entry needs {list(KEY_FIELDS)})")
    kernel = entry["kernel"]
    if kernel not in TUNABLE:
        raise TableError(f"{where}.kernel must be one of {sorted(TUNABLE)}; got {kernel!r}")
    if entry["dtype"] not in _DTYPE_NAMES.values():
        raise TableError(f"{where}.dtype must be one of {sorted(_DTYPE_NAMES.values())}; got {entry['dtype']!r}")
    if not _is_int(entry["head_dim"]) or entry["head_dim"] < 1:
        raise TableError(f"{where}.head_dim must be a positive int; got {entry['head_dim']!r}")
    axes = None
    for field, check, what in (("kernel_size", lambda v: _is_int(v) and v >= 1, "positive ints"),
                               ("dilation", lambda v: _is_int(v) and v >= 1, "positive ints"),
                               ("causal", lambda v: isinstance(v, bool), "bools"),
                               ("bucket", lambda v: _is_int(v) and v >= 1 and v & (v - 1) == 0, "powers of two")):
        value = entry[field]
        if not isinstance(value, list) or not value or not all(check(v) for v in value):
            raise TableError(f"{where}.{field} must be a non-empty list of {what}; got {value!r}")
        if axes is not None and len(value) != axes:
            raise TableError(f"{where}.{field} has {len(value)} axes but kernel_size has {axes}")
        axes = len(value)
    if not isinstance(entry["rpb"], bool):
        raise TableError(f"{where}.rpb must be true or false; got {entry['rpb']!r}")
    return TuningKey(kernel, entry["dtype"], entry["head_dim"], tuple(entry["kernel_size"]), tuple(entry["dilation"]),
                     tuple(entry["causal"]), entry["rpb"], tuple(entry["bucket"]))


def parse_config(where: str, kernel: str, winner) -> LaunchConfig:
    if not isinstance(winner, dict):
        raise TableError(f"{where} must be an object with meta, num_warps, num_stages; got {winner!r}")
    meta = winner.get("meta")
    expected = set(TUNABLE[kernel])
    if not isinstance(meta, dict) or set(meta) != expected:
        raise TableError(f"{where}.meta must set exactly {sorted(expected)} for kernel {kernel!r}; got {meta!r}")
    for name, value in meta.items():
        if not _is_int(value) or value < 1 or value & (value - 1):
            raise TableError(f"{where}.meta.{name} must be a power-of-two int; got {value!r}")
    warps, stages = winner.get("num_warps"), winner.get("num_stages")
    if not _is_int(warps) or warps < 1 or warps & (warps - 1) or warps > 32:
        raise TableError(f"{where}.num_warps must be a power-of-two int in [1, 32]; got {warps!r}")
    if not _is_int(stages) or stages < 1:
        raise TableError(f"{where}.num_stages must be an int >= 1; got {stages!r}")
    maxnreg = winner.get("maxnreg")
    if maxnreg is not None and (not _is_int(maxnreg) or not MIN_MAXNREG <= maxnreg <= MAX_MAXNREG):
        raise TableError(f"{where}.maxnreg must be null or an int in [{MIN_MAXNREG}, {MAX_MAXNREG}] "
                         f"(registers per thread); got {maxnreg!r}")
    return LaunchConfig(tuple(sorted(meta.items())), warps, stages, maxnreg)


def parse_table(data: Any, path: str) -> Table:
    """Validate a decoded table; every problem is a ``TableError`` naming ``path`` and the rule."""
    if not isinstance(data, dict):
        raise TableError(f"tuning table {path}: the top level must be a JSON object; got {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise TableError(f"tuning table {path}: 'format' must be {FORMAT!r}; got {data.get('format')!r}")
    if data.get("version") != VERSION:
        raise TableError(f"tuning table {path}: 'version' must be {VERSION}; got {data.get('version')!r}")
    family = data.get("family")
    if not isinstance(family, str) or not family:
        raise TableError(f"tuning table {path}: 'family' must be a non-empty string; got {family!r}")
    names = data.get("gpu_names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise TableError(f"tuning table {path}: 'gpu_names' must be a list of strings; got {names!r}")
    entries = data.get("entries")
    if not isinstance(entries, list):
        raise TableError(f"tuning table {path}: 'entries' must be a list; got {type(entries).__name__}")
    winners: dict = {}
    for i, entry in enumerate(entries):
        where = f"tuning table {path}: entries[{i}]"
        if not isinstance(entry, dict):
            raise TableError(f"{where} must be an object; got {type(entry).__name__}")
        key = parse_key(where, entry)
        if key in winners:
            raise TableError(f"{where} repeats the key of an earlier entry ({key.label()})")
        if entry.get("winner") is None:  # a sweep result without a valid candidate: a miss
            winners[key] = None
            continue
        winners[key] = parse_config(f"{where}.winner", key.kernel, entry["winner"])
    return Table(str(path), family, tuple(names), {k: v for k, v in winners.items() if v is not None})


_TABLE_CACHE: dict[tuple[str, int, int], Table] = {}


def load_table(path) -> Table:
    """Read and validate ``path`` (cached until the file changes)."""
    path = str(path)
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        raise TableError(f"tuning table {path}: no such file") from None
    cache_key = (path, stat.st_mtime_ns, stat.st_size)
    if cache_key not in _TABLE_CACHE:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as exc:
            raise TableError(f"tuning table {path}: not valid JSON ({exc})") from None
        _TABLE_CACHE[cache_key] = parse_table(data, path)
    return _TABLE_CACHE[cache_key]


_DISABLED = object()
_override: list = []  # stack of Table / _DISABLED installed by use_table / no_table


@contextlib.contextmanager
def use_table(table: Table) -> Iterator[Table]:
    """Use ``table`` (e.g. ``load_table(path)``) for launches inside the block."""
    if not isinstance(table, Table):
        raise TypeError(f"use_table: table must be a dinat.kernels.tuning.Table; got {type(table).__name__}")
    _override.append(table)
    try:
        yield table
    finally:
        _override.pop()


@contextlib.contextmanager
def no_table() -> Iterator[None]:
    """Launch with the kernels' own autotuners only (what a sweep measures as the default)."""
    _override.append(_DISABLED)
    try:
        yield
    finally:
        _override.pop()


def active_table() -> Optional[Table]:
    """The table launches consult now (see the module doc for the order), or None."""
    if _override:
        top = _override[-1]
        return None if top is _DISABLED else top
    env = os.environ.get(TABLE_ENV)
    if env:
        return load_table(env)
    shipped = _shipped_table(TUNED_DIR, current_family())
    return load_table(shipped) if shipped is not None else None


_SHIPPED: dict = {}


def _shipped_table(directory: Path, family: str) -> Optional[Path]:
    """The shipped file of ``family`` or None; whether it exists is asked once (launches are hot)."""
    if (directory, family) not in _SHIPPED:
        path = Path(directory) / f"{family}.json"
        _SHIPPED[directory, family] = path if path.exists() else None
    return _SHIPPED[directory, family]


# ---------------------------------------------------------------------------------------------
# Launch-time choice


# The argument vocabulary both kernel families share: where a launch holds the key's fields.
HEAD_DIM_ARG = "head_dim"
SPATIAL_ARGS = ("L0", "L1", "L2")
KERNEL_SIZE_ARGS = ("K0", "K1", "K2")
DILATION_ARGS = ("D0", "D1", "D2")
CAUSAL_ARGS = ("C0", "C1", "C2")
RPB_ARG = "HAS_RPB"  # a constexpr flag; kernels without one have no RPB


def tuning_key(kernel: str, dtype_of: str, bound: dict) -> TuningKey:
    """The table key of a launch whose arguments (by name) are ``bound``; ``dtype_of`` names the
    tensor argument whose dtype is the key's dtype."""
    return TuningKey.make(kernel, bound[dtype_of].dtype, bound[HEAD_DIM_ARG],
                          [bound[n] for n in SPATIAL_ARGS], [bound[n] for n in KERNEL_SIZE_ARGS],
                          [bound[n] for n in DILATION_ARGS], [bound[n] for n in CAUSAL_ARGS],
                          bool(bound.get(RPB_ARG, False)))


class TunedKernel(Autotuner):
    """``triton.autotune`` that first asks the active table for the config of this launch.

    It is an ``Autotuner`` (``wrap_triton`` accepts it; Inductor autotunes its ``configs`` when it
    compiles the call). The table is asked in one place, :func:`launch` (via :func:`resolve`), in
    Python before ``wrap_triton``, so eager runs and ``torch.compile`` make the same choice; a hit
    launches the table's one-config kernel, a miss this autotuner. ``run`` itself only tells the
    launch hooks (the sweep records launches through them) and autotunes.
    """

    def __init__(self, fn, configs: list, key: list, name: str, dtype_of: str, outputs: tuple[str, ...],
                 prune: Optional[Callable] = None):
        if name not in TUNABLE:
            raise ValueError(f"TunedKernel: name must be one of {sorted(TUNABLE)}; got {name!r}")
        super().__init__(fn, fn.arg_names, configs, key, None, None,
                         prune_configs_by={"early_config_prune": prune} if prune is not None else None)
        self.tuning_name = name
        self.dtype_of = dtype_of  # the tensor argument whose dtype keys the tables
        self.outputs = outputs  # arguments the kernel writes (what a sweep validates)

    def tuning_key(self, args: tuple, kwargs: dict) -> TuningKey:
        bound = dict(zip(self.arg_names, args))
        bound.update(kwargs)
        return tuning_key(self.tuning_name, self.dtype_of, bound)

    def candidates(self, args: tuple, kwargs: dict) -> list:
        """The configs this launch autotunes over: ``configs`` after the prune hook (if any)."""
        if self.early_config_prune is None:
            return list(self.configs)
        return list(self.early_config_prune(self.configs, dict(zip(self.arg_names, args)), **kwargs))

    def run(self, *args, **kwargs):
        if _launch_hooks:
            key = self.tuning_key(args, {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")})
            for hook in _launch_hooks:
                hook(self, key, args, kwargs)
        return super().run(*args, **kwargs)


def autotune(configs: list, key: list, name: str, dtype_of: str, outputs: tuple[str, ...],
             prune: Optional[Callable] = None):
    """Decorator: ``triton.autotune(configs, key, prune_configs_by={"early_config_prune": prune})``
    that consults the tuning tables (``TunedKernel``); a table's entry wins over the pruned list."""
    return lambda fn: TunedKernel(fn, configs, key, name, dtype_of, outputs, prune)


_SINGLE: dict = {}


def single_config(fn, config: LaunchConfig) -> Autotuner:
    """A one-config autotuner over ``fn``: launches ``config`` without benchmarking anything."""
    cache_key = (id(fn), config)
    if cache_key not in _SINGLE:
        _SINGLE[cache_key] = (fn, triton.autotune(configs=[config.to_triton()], key=[])(fn))
    return _SINGLE[cache_key][1]


def lookup(key: TuningKey) -> Optional[LaunchConfig]:
    table = active_table()
    return table.lookup(key) if table is not None else None


def _choose(kernel: TunedKernel, key: TuningKey):
    config = lookup(key)
    for observer in _choice_observers:
        observer(kernel.tuning_name, key, config)
    return kernel if config is None else single_config(kernel.fn, config)


def resolve(kernel: TunedKernel, args: tuple, kwargs: dict):
    """What a launch site hands ``wrap_triton``: the table's one-config kernel on a hit, else ``kernel``."""
    return _choose(kernel, kernel.tuning_key(args, kwargs))


def run_kernel(kernel, grid, args: tuple, kwargs: dict) -> None:
    """Launch a ``@triton.jit``/autotuned kernel through ``wrap_triton`` (traceable by torch.compile)."""
    if interpreted():
        # Interpreted kernels are never traced (the ops trace PyTorch code or stay opaque there), and
        # torch 2.11's wrap_triton rejects them: launch directly.
        kernel[grid](*args, **kwargs)
    else:
        wrap_triton(kernel)[grid](*args, **kwargs)


def launch(kernel: TunedKernel, grid, args: tuple, kwargs: dict) -> None:
    """Launch ``kernel`` with the config chosen here, in Python, before the launch (a table hit or
    the autotuner), so ``torch.compile`` traces the same choice."""
    run_kernel(resolve(kernel, args, kwargs), grid, args, kwargs)


# Observers of launches and choices (the sweep records launches; tests watch choices).
_launch_hooks: list[Callable] = []
_choice_observers: list[Callable] = []


@contextlib.contextmanager
def watching_launches(hook: Callable) -> Iterator[None]:
    """Call ``hook(kernel, key, args, kwargs)`` before each launch of a ``TunedKernel`` that reaches
    its ``run`` (eager launches on a table miss or without a table)."""
    _launch_hooks.append(hook)
    try:
        yield
    finally:
        _launch_hooks.remove(hook)


@contextlib.contextmanager
def watching_choices(observer: Callable) -> Iterator[None]:
    """Call ``observer(kernel_name, key, config_or_None)`` on every table lookup of a launch."""
    _choice_observers.append(observer)
    try:
        yield
    finally:
        _choice_observers.remove(observer)


def empty_table_json(family: str, gpu_names=()) -> dict:
    return dict(format=FORMAT, version=VERSION, family=family, gpu_names=list(gpu_names), entries=[])


def speedup(default_ms: Optional[float], tuned_ms: Optional[float]) -> Optional[float]:
    if not default_ms or not tuned_ms or not math.isfinite(default_ms) or not math.isfinite(tuned_ms):
        return None
    return default_ms / tuned_ms
