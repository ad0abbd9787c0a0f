"""Helpers the benchmark tools share: the problem type, device sync and clean-up, failure reporting, timing,
report facts.

Nothing here imports triton at module level: ``benchmarks.sweep`` must turn on Triton's CPU
interpreter before triton is first imported.
"""

from __future__ import annotations

import datetime as _dt
import gc
import platform
import statistics
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class NAShape:
    """One NA problem: tensors ``[batch, *spatial, heads, head_dim]`` and its window.

    The shapes of every benchmark tool: ``na_bench``'s presets, ``gpu_record``'s cases, the tuning
    sweep's, and (with the launch's dtype, backend and layout added) the kernel audit's
    ``_audit_launch.Problem``. ``origin`` says where a shape came from (a model name, a preset's
    group such as ``dinat-t s1``, ``smoke``).

    Two labels, each the one its reports have recorded: ``label`` (sweep, audit: every axis
    written, no origin) and ``bench_label`` (``na_bench`` and ``gpu_record`` tables: origin first).
    """

    batch: int
    spatial: tuple[int, ...]
    heads: int
    head_dim: int
    kernel_size: tuple[int, ...]
    dilation: tuple[int, ...]
    causal: tuple[bool, ...]
    rpb: bool = True
    origin: str = ""

    @property
    def label(self) -> str:
        axes = lambda v: "x".join(str(int(x)) for x in v)  # noqa: E731
        causal = f" causal{axes(self.causal)}" if any(self.causal) else ""
        return (f"{axes(self.spatial)} B{self.batch} H{self.heads} D{self.head_dim} k{axes(self.kernel_size)} "
                f"d{axes(self.dilation)}{causal}{' rpb' if self.rpb else ''}")

    @property
    def bench_label(self) -> str:
        """``origin`` first, an axis value written once when every axis has it, causal as ``causal``
        (every axis) or ``causal(TF)`` (per axis): e.g. ``dinat-t s1 56x56 B64 H2 D32 k7 d8 rpb``."""
        def axes(values):
            values = tuple(values)
            return str(values[0]) if len(set(values)) == 1 else "x".join(map(str, values))

        causal = ""
        if any(self.causal):
            causal = " causal" + ("" if all(self.causal) else "(" + "".join("TF"[not c] for c in self.causal) + ")")
        return (f"{self.origin} {'x'.join(map(str, self.spatial))} B{self.batch} H{self.heads} D{self.head_dim} "
                f"k{axes(self.kernel_size)} d{axes(self.dilation)}{causal}{' rpb' if self.rpb else ''}")

    @property
    def tokens(self) -> int:
        return math.prod(self.spatial)

    def forward_flops(self) -> int:
        """Useful NA work: q.k and attn.v, 2 FLOPs per multiply-add each, ``4*B*H*N*K*D``."""
        return 4 * self.batch * self.heads * self.tokens * math.prod(self.kernel_size) * self.head_dim

    def to_json(self) -> dict:
        out = asdict(self)
        for name in ("spatial", "kernel_size", "dilation", "causal"):
            out[name] = list(out[name])
        return out

    @classmethod
    def from_json(cls, d: dict):
        """The inverse of ``to_json`` (lists back to tuples); keys this class lacks are an error."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Collect garbage and return cached GPU memory, so one case's buffers do not weigh on the next."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def describe_error(exc: BaseException) -> str:
    """``Type: message`` on one line, the message cut at 200 characters (for a report's row or note)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


def median_ms(call: Callable[[], None], device: torch.device, warmup_ms: int, rep_ms: int,
              cpu_repeats: int) -> float:
    """Median milliseconds per call: ``triton.testing.do_bench`` on CUDA, else a ``time.perf_counter``
    loop of ``cpu_repeats`` calls (no warm-up: a caller that wants one makes it)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(call, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    times = []
    for _ in range(cpu_repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def environment(device_name: str, **versions: str) -> dict[str, str]:
    """What a report's header states: UTC date, ``device_name``, and the torch, ``versions`` (e.g.
    ``timm=...``), triton and python versions."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name,
        "torch": torch.__version__,
        **versions,
        "triton": triton_version,
        "python": platform.python_version(),
    }
