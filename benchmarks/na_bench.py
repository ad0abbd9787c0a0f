"""Neighborhood attention against the alternatives, on the same inputs, in one run.

Candidates: the NA backends this machine has (``kernels.available_backends``: reference, unfused,
fused), FlexAttention with an NA mask (``flex``; compiled on GPU) and full-attention SDPA (``sdpa``;
a different, quadratic function: timed only). Forward and forward+backward, per shape of a preset.

Reported per (shape, mode, candidate): median time in ms; speed-up against a baseline candidate
measured in the same run (baseline ms / candidate ms, > 1 is faster); effective TFLOP/s; peak GPU
memory; and, on the checked shapes (default: the first), the max abs error against the reference
computed in float32. A candidate whose error exceeds the tolerance is marked wrong and not timed
again, so a broken kernel cannot post a fast time. A candidate that runs out of memory or fails on
one shape gets "OOM"/"error"/"unsupported" in its row; the run goes on.

Examples::

    PYTHONPATH=. python -m benchmarks.na_bench --preset dinat-tiny --out bench.md --plot bench.png
    PYTHONPATH=. python -m benchmarks.na_bench --tiny            # CPU smoke test, seconds
    PYTHONPATH=. python -m benchmarks.na_bench --preset dinat-mini --cpu-threads 2 --cpu-memory  # CPU
"""

from __future__ import annotations

import argparse
import functools
import math
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from dinat import kernels
from benchmarks import _common
from benchmarks._common import NAShape, describe_error, free_memory, is_oom, median_ms, sync
from benchmarks.alternatives import FlexNA, sdpa_full

NA_BY_RANK = {1: kernels.na1d, 2: kernels.na2d, 3: kernels.na3d}
# Every backend the registry knows (reference, unfused, fused, ...); which ones run here is
# asked of kernels.available_backends at run time.
NA_BACKENDS = tuple(kernels.backends.BACKENDS)
ALTERNATIVES = ("flex", "sdpa")
ALL_CANDIDATES = NA_BACKENDS + ALTERNATIVES
MODES = {"fwd": "fwd", "fwdbwd": "fwd+bwd"}
# Backward costs ~2.5x the forward's matmul FLOPs (recomputed q.k, then dV, dP, dQ, dK), so a
# forward+backward step is counted as 3.5 forwards.
FWD_BWD_FLOP_FACTOR = 3.5
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
# Max abs error allowed against the float32 reference, per tensor, times max(1, max|reference|).
# float32 leaves room for TF32 tensor-core matmuls on GPUs.
TOLERANCE = {torch.float16: 2e-2, torch.bfloat16: 6e-2, torch.float32: 1e-2, torch.float64: 1e-6}


def _square(origin, batch, size, heads, head_dim, k, d, ndim=2, rpb=True) -> NAShape:
    return NAShape(batch, (size,) * ndim, heads, head_dim, (k,) * ndim, (d,) * ndim, (False,) * ndim, rpb, origin)


def _dinat_tiny(batch: int, origin: str = "dinat-t") -> list[NAShape]:
    # DiNAT-tiny at 224x224: stages of 56^2 .. 7^2 tokens, 2..16 heads of 32, 7x7 windows; its
    # dilated layers use 8, 4, 2, 1 and every stage also has undilated layers.
    shapes = []
    for stage, (size, heads, dilation) in enumerate(((56, 2, 8), (28, 4, 4), (14, 8, 2), (7, 16, 1)), start=1):
        for d in sorted({dilation, 1}, reverse=True):
            shapes.append(_square(f"{origin} s{stage}", batch, size, heads, 32, 7, d))
    return shapes


def _dinat_mini(batch: int) -> list[NAShape]:
    # DiNAT-mini's layers have DiNAT-tiny's shapes (it is shallower, not narrower); batch 8 for a CPU.
    return _dinat_tiny(batch, "dinat-mini")


def _large_image(batch: int) -> list[NAShape]:
    return [_square("large", batch, 128, 4, 32, 13, d) for d in (1, 2, 3, 4)]


def _video(batch: int) -> list[NAShape]:
    spatial, ks = (16, 32, 32), (3, 7, 7)
    return [
        NAShape(batch, spatial, 4, 32, ks, (1, 1, 1), (False,) * 3, origin="video"),
        NAShape(batch, spatial, 4, 32, ks, (1, 2, 2), (False,) * 3, origin="video"),
        NAShape(batch, spatial, 4, 32, ks, (1, 1, 1), (True, False, False), rpb=False, origin="video"),
    ]


def _tiny(batch: int) -> list[NAShape]:
    # Seconds on a CPU, every rank, dilation, causal and RPB: a smoke test of the tool, not a benchmark.
    return [
        _square("tiny", batch, 9, 2, 16, 3, 2),
        NAShape(batch, (24,), 2, 16, (5,), (3,), (False,), origin="tiny"),
        NAShape(batch, (8, 8), 2, 16, (3, 3), (1, 2), (True, False), rpb=False, origin="tiny"),
        NAShape(batch, (3, 6, 6), 2, 16, (3, 3, 3), (1, 2, 1), (False,) * 3, origin="tiny"),
    ]


# preset -> (shape list for a batch size, default batch)
PRESETS: dict[str, tuple[Callable[[int], list[NAShape]], int]] = {
    "dinat-tiny": (_dinat_tiny, 64),
    "large-image": (_large_image, 8),
    "video": (_video, 4),
    "tiny": (_tiny, 2),
    "dinat-mini": (_dinat_mini, 8),
}
# Presets that "all" leaves out: the smoke test, and dinat-mini (dinat-tiny's shapes at a CPU batch).
_NOT_IN_ALL = ("tiny", "dinat-mini")
PRESET_CHOICES = [*PRESETS, "all"]


def preset_shapes(name: str, batch: Optional[int] = None) -> list[NAShape]:
    names = [n for n in PRESETS if n not in _NOT_IN_ALL] if name == "all" else [name]
    shapes = []
    for n in names:
        make, default_batch = PRESETS[n]
        shapes += make(batch or default_batch)
    return shapes


# ----------------------------------------------------------------------------------------------
# Candidates


class Unsupported(Exception):
    """The candidate cannot run this case at all (reported as "unsupported", not as a failure)."""


def available_na_backends(device: torch.device) -> list[str]:
    """``kernels.available_backends(device)``; if the registry itself fails (a backend module that
    raises on import or probing), ask for each backend separately so the others still run."""
    try:
        return kernels.available_backends(device)
    except Exception:  # noqa: BLE001 -- a half-written backend must not stop the benchmark
        names = []
        for name in NA_BACKENDS:
            try:
                kernels.backends.resolve(name, device, "na")
                names.append(name)
            except Exception:  # noqa: BLE001
                pass
        return names


def build_candidate(name: str, shape: NAShape, device: torch.device, flex_compile: Optional[bool]) -> Callable:
    """``fn(q, k, v, rpb) -> out`` for one candidate on one shape (set-up such as block masks done here)."""
    na_args = dict(kernel_size=shape.kernel_size, dilation=shape.dilation, is_causal=shape.causal)
    if name in NA_BACKENDS:
        na = NA_BY_RANK[len(shape.spatial)]
        return lambda q, k, v, rpb: na(q, k, v, rpb=rpb, backend=name, **na_args)
    if name == "flex":
        flex = FlexNA(shape.spatial, device=device, compile=flex_compile, **na_args)

        def run_flex(q, k, v, rpb):
            if device.type == "cpu" and q.requires_grad:
                raise Unsupported(f"FlexAttention has no CPU backward (eager or compiled, torch {torch.__version__})")
            return flex(q, k, v, rpb)

        run_flex.computed_block_fraction = flex.computed_block_fraction()
        return run_flex
    if name == "sdpa":
        return lambda q, k, v, rpb: sdpa_full(q, k, v)
    raise ValueError(f"unknown candidate {name!r}; choose from {list(ALL_CANDIDATES)}")


def make_inputs(shape: NAShape, device: torch.device, dtype: torch.dtype, seed: int = 0,
                rpb_dtype: Optional[torch.dtype] = None):
    """Seeded standard-normal q, k, v, rpb (``rpb_dtype``, default ``dtype``) and output gradient."""
    gen = torch.Generator(device=device).manual_seed(seed)
    size = (shape.batch, *shape.spatial, shape.heads, shape.head_dim)
    q, k, v = (torch.randn(size, generator=gen, device=device, dtype=dtype) for _ in range(3))
    rpb = None
    if shape.rpb:
        rpb = torch.randn((shape.heads, *(2 * k_ - 1 for k_ in shape.kernel_size)), generator=gen, device=device,
                          dtype=rpb_dtype or dtype)
    grad_out = torch.randn(size, generator=gen, device=device, dtype=dtype)
    return q, k, v, rpb, grad_out


def _leaves(tensors: Sequence[Optional[torch.Tensor]], dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(True) for t in tensors]


def step(fn: Callable, mode: str, q, k, v, rpb, grad_out) -> Callable[[], None]:
    """A zero-argument call that runs one forward (no autograd) or one forward+backward."""
    if mode == "fwd":
        def forward():
            with torch.no_grad():
                fn(q, k, v, rpb)
        return forward

    leaves = [t for t in (q, k, v, rpb) if t is not None]

    def forward_backward():
        for t in leaves:
            t.grad = None
        fn(q, k, v, rpb).backward(grad_out)
    return forward_backward


def check_against_reference(fn: Callable, mode: str, inputs, reference, tolerance: float) -> tuple[float, bool]:
    """Max abs error of the output (and, for fwd+bwd, of every input gradient) against ``reference``,
    and whether each tensor is within ``tolerance * max(1, max|reference tensor|)``."""
    q, k, v, rpb, grad_out = inputs
    if mode == "fwd":
        with torch.no_grad():
            results = [fn(q, k, v, rpb)]
    else:
        leaves = _leaves((q, k, v, rpb))
        out = fn(*leaves)
        results = [out, *torch.autograd.grad(out, [t for t in leaves if t is not None], grad_out)]
    errors = [(got.float() - want).abs().max().item() for got, want in zip(results, reference)]
    # Python's max() can skip a NaN; a NaN anywhere must fail the check.
    if any(math.isnan(e) for e in errors):
        return math.inf, False
    ok = all(e <= tolerance * max(1.0, want.abs().max().item()) for e, want in zip(errors, reference))
    return max(errors), ok


def reference_results(shape: NAShape, mode: str, inputs) -> list[torch.Tensor]:
    """Ground truth in float32: the output, then (fwd+bwd) the gradients of q, k, v, rpb."""
    q, k, v, rpb, grad_out = inputs
    na = NA_BY_RANK[len(shape.spatial)]
    leaves = _leaves((q, k, v, rpb), torch.float32)
    out = na(*leaves[:3], shape.kernel_size, shape.dilation, shape.causal, rpb=leaves[3], backend="reference")
    if mode == "fwd":
        return [out.detach()]
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], grad_out.float())
    return [out.detach(), *grads]


# ----------------------------------------------------------------------------------------------
# Measuring


def time_ms(call: Callable[[], None], device: torch.device, args) -> float:
    """Median milliseconds per call: ``triton.testing.do_bench`` on CUDA, a perf_counter loop on CPU."""
    if device.type != "cuda":
        call()  # warm-up: first-call caches (geometry tables, compiled kernels)
    return median_ms(call, device, args.warmup_ms, args.rep_ms, args.repeats)


def peak_memory_mib(call: Callable[[], None], device: torch.device) -> Optional[float]:
    """Peak allocated GPU memory during one call, inputs included (None off CUDA)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    call()
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def cpu_peak_memory_mib(call: Callable[[], None]) -> float:
    """Peak of the memory allocated during one call on the CPU, above what was allocated before it
    (inputs not included): the running sum of the profiler's allocation/free records."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    records = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                     key=lambda e: e.start_ns())
    allocated = peak = 0
    for record in records:
        allocated += record.nbytes()
        peak = max(peak, allocated)
    return peak / 2**20


@dataclass
class Result:
    shape: NAShape
    mode: str
    candidate: str
    ms: Optional[float] = None
    status: str = ""  # "" when timed, else OOM / error / unsupported / wrong
    peak_mib: Optional[float] = None
    max_err: Optional[float] = None
    err_ok: Optional[bool] = None
    note: str = ""
    speedup: Optional[float] = None
    unchecked_because: str = ""  # set when this shape was to be checked but the reference failed
    block_fraction: Optional[float] = None  # flex only: share of block-mask tiles computed
    compile_s: Optional[float] = None  # compiled flex: building it plus its first call (not in ms)

    @property
    def tflops(self) -> Optional[float]:
        if self.ms is None:
            return None
        flops = self.shape.forward_flops() * (FWD_BWD_FLOP_FACTOR if self.mode == "fwdbwd" else 1.0)
        return flops / (self.ms * 1e-3) / 1e12


def run_benchmark(shapes: Sequence[NAShape], candidates: Sequence[str], modes: Sequence[str], device: torch.device,
                  dtype: torch.dtype, args, log=print,
                  on_shape_done: Optional[Callable[[list[Result], int], None]] = None) -> list[Result]:
    """Check, time and measure every (shape, mode, candidate); ``on_shape_done(results, shapes_done)``
    after each shape (speed-ups filled in), so a run cut short still leaves its finished rows."""
    results: list[Result] = []
    wrong: dict[str, str] = {}  # candidate -> why it is no longer timed
    compile_seconds: dict[str, float] = {}  # shape label -> compiled flex's build + first call
    flex_compile = {"auto": None, "on": True, "off": False}[args.flex_compile]
    flex_compiled = device.type == "cuda" if flex_compile is None else flex_compile
    rpb_dtype = DTYPES[args.rpb_dtype] if args.rpb_dtype != "same" else dtype
    for index, shape in enumerate(shapes):
        check_this = args.check == "all" or (args.check == "first" and index == 0)
        if "flex" in candidates and flex_compiled:
            # Every shape compiles its own masks (and every new rpb leaf its own score_mod): start
            # each shape with an empty cache, so dynamo never hits its recompile limit and silently
            # falls back to eager (dense) flex_attention.
            torch._dynamo.reset()
        inputs = make_inputs(shape, device, dtype, seed=index, rpb_dtype=rpb_dtype)
        built: dict[str, Callable] = {}
        for mode in modes:
            reference, reference_failure = None, ""
            if check_this:
                try:
                    reference = reference_results(shape, mode, inputs)
                except Exception as exc:  # noqa: BLE001 -- e.g. OOM of the gathering reference
                    reference_failure = "no ref (OOM)" if is_oom(exc) else "no ref (error)"
                    log(f"  [{shape.bench_label} {MODES[mode]}] reference for the check failed: {describe_error(exc)}")
                free_memory(device)
            for name in candidates:
                result = Result(shape, mode, name, unchecked_because=reference_failure)
                results.append(result)
                if name in wrong:
                    result.status, result.note = "wrong", wrong[name]
                    continue
                try:
                    if name not in built:
                        started = time.perf_counter()
                        built[name] = build_candidate(name, shape, device, flex_compile)
                        if name == "flex" and flex_compiled:
                            # Compile (block mask, then the attention on its first call) outside the
                            # timed calls; reported on its own.
                            q, k, v, rpb, _ = inputs
                            with torch.no_grad():
                                built[name](q, k, v, rpb)
                            sync(device)
                            compile_seconds[shape.bench_label] = time.perf_counter() - started
                    fn = built[name]
                    result.compile_s = compile_seconds.get(shape.bench_label) if name == "flex" else None
                    result.block_fraction = getattr(fn, "computed_block_fraction", None)
                    if reference is not None and name != "sdpa":
                        result.max_err, result.err_ok = check_against_reference(fn, mode, inputs, reference,
                                                                                TOLERANCE[dtype])
                        if not result.err_ok:
                            wrong[name] = f"max abs err {result.max_err:.3g} on {shape.bench_label} {MODES[mode]}"
                            result.status, result.note = "wrong", wrong[name]
                            continue
                    q, k, v, rpb, grad_out = inputs
                    if mode == "fwdbwd":
                        q, k, v, rpb = _leaves((q, k, v, rpb))
                    call = step(fn, mode, q, k, v, rpb, grad_out)
                    result.ms = time_ms(call, device, args)
                    result.peak_mib = peak_memory_mib(call, device)
                    if result.peak_mib is None and getattr(args, "cpu_memory", False) and device.type == "cpu":
                        result.peak_mib = cpu_peak_memory_mib(call)
                except Unsupported as exc:
                    result.status, result.note = "unsupported", str(exc)
                except Exception as exc:  # noqa: BLE001 -- one failing candidate must not end the run
                    result.ms = None
                    result.status = "OOM" if is_oom(exc) else "error"
                    result.note = describe_error(exc)
                free_memory(device)
                shown = f"{result.ms:.3f} ms" if result.ms is not None else f"{result.status}: {result.note}"
                log(f"  {shape.bench_label:<48} {MODES[mode]:<8} {name:<10} {shown}")
        del inputs, built
        free_memory(device)
        _add_speedups(results, args.baseline)
        if on_shape_done is not None:
            on_shape_done(results, index + 1)
    return results


def _add_speedups(results: Sequence[Result], baseline: str) -> None:
    base = {(id(r.shape), r.mode): r.ms for r in results if r.candidate == baseline}
    for r in results:
        b = base.get((id(r.shape), r.mode))
        if b is not None and r.ms is not None:
            r.speedup = b / r.ms


# ----------------------------------------------------------------------------------------------
# Reporting


def environment(device: torch.device) -> dict[str, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    return _common.environment(name)


def _fmt(value: Optional[float], spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def markdown_table(results: Sequence[Result], env: dict[str, str], args, candidates: Sequence[str],
                   unavailable: Sequence[str], dtype: torch.dtype, device: torch.device) -> str:
    timing = (f"`triton.testing.do_bench` median (warmup {args.warmup_ms} ms, rep {args.rep_ms} ms)"
              if device.type == "cuda" else f"`time.perf_counter` median of {args.repeats} calls after 1 warm-up")
    flex_mode = {"auto": "compiled" if device.type == "cuda" else "eager", "on": "compiled", "off": "eager"}
    lines = [
        f"## NA benchmark: preset `{args.preset}`, {str(dtype).replace('torch.', '')}, {device.type}",
        "",
        f"- date: {env['date']}",
        f"- device: {env['device']}; torch {env['torch']}; triton {env['triton']}; python {env['python']}",
        f"- candidates: {', '.join(candidates)}"
        + (f" (flex: {flex_mode[args.flex_compile]})" if "flex" in candidates else "")
        + (f"; not available here: {', '.join(unavailable)}" if unavailable else ""),
        f"- inputs: seeded standard normal q, k, v, output gradient in {str(dtype).replace('torch.', '')}; rpb in "
        f"{str(dtype).replace('torch.', '') if args.rpb_dtype == 'same' else args.rpb_dtype}",
        f"- time: {timing}",
        f"- vs {args.baseline}: {args.baseline} ms / candidate ms in the same run (> 1 means faster)",
        f"- TFLOP/s: effective, NA's useful work 4·B·H·N·K·D per forward (x{FWD_BWD_FLOP_FACTOR} for fwd+bwd),"
        " the same count for every candidate (sdpa really does N/K times more work)",
        ("- peak MiB: `torch.cuda.max_memory_allocated` during one call, inputs included"
         + ("" if device.type == "cuda" else " (n/a on CPU)")
         if device.type == "cuda" or not getattr(args, "cpu_memory", False) else
         "- peak MiB: CPU, `--cpu-memory`: peak of the memory allocated during one call (profiler "
         "allocation records), inputs not included"),
        "- max abs err: against the float32 reference on the checked shapes "
        f"(`--check {args.check}`); tolerance {TOLERANCE[dtype]:g} x max(1, max|ref|) per tensor; sdpa is a different function",
        "",
        f"| shape | mode | candidate | ms | vs {args.baseline} | TFLOP/s | peak MiB | max abs err |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    notes: list[str] = []
    for r in results:
        ms = _fmt(r.ms, ".3f") if r.ms is not None else r.status
        if r.note and r.status:
            notes.append(f"{r.candidate}, {r.shape.bench_label}, {MODES[r.mode]}: {r.status}: {r.note}")
            ms = f"{ms} [{len(notes)}]"
        if r.candidate == "sdpa":
            err = "n/a (not NA)"
        elif r.max_err is None:
            err = r.unchecked_because or "-"
        else:
            err = f"{r.max_err:.2e}" + ("" if r.err_ok else " FAIL")
        lines.append(
            f"| {r.shape.bench_label} | {MODES[r.mode]} | {r.candidate} | {ms} | {_fmt(r.speedup, '.2f', '-')}"
            f"{'x' if r.speedup is not None else ''} | {_fmt(r.tflops, '.3g', '-')} | "
            f"{_fmt(r.peak_mib, '.0f')} | {err} |"
        )
    if notes:
        lines += ["", *(f"[{i}] {note}" for i, note in enumerate(notes, start=1))]
    fractions = {r.shape.bench_label: r.block_fraction for r in results if r.block_fraction is not None}
    if fractions:
        lines += ["", "flex block mask, share of 128x128 (query, key) tiles computed (the rest are skipped): "
                  + "; ".join(f"{label}: {fraction:.1%}" for label, fraction in fractions.items())]
    compiles = {r.shape.bench_label: r.compile_s for r in results if r.compile_s is not None}
    if compiles:
        lines += ["", "compiled flex, building it (block mask) plus its first call (compilation), not in the "
                  "times above: " + "; ".join(f"{label}: {s:.1f} s" for label, s in compiles.items())]
    return "\n".join(lines) + "\n"


def plot(results: Sequence[Result], path: str, title: str, candidates: Sequence[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = []
    for r in results:
        key = (r.shape.bench_label, MODES[r.mode])
        if key not in groups:
            groups.append(key)
    times = {(r.shape.bench_label, MODES[r.mode], r.candidate): r.ms for r in results}
    width = 0.8 / max(1, len(candidates))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(groups) * len(candidates) + 2), 5))
    for c_index, name in enumerate(candidates):
        xs, ys = [], []
        for g_index, (label, mode) in enumerate(groups):
            ms = times.get((label, mode, name))
            if ms is not None:
                xs.append(g_index + (c_index - (len(candidates) - 1) / 2) * width)
                ys.append(ms)
        ax.bar(xs, ys, width=width, label=name)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{label}\n{mode}" for label, mode in groups], rotation=60, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("ms per call (log scale)")
    ax.set_xlabel("no bar: OOM / error / unsupported / wrong (see the table)", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Command line


def _shape_list_help() -> str:
    lines = []
    for name in PRESETS:
        make, batch = PRESETS[name]
        lines.append(f"  {name} (batch {batch}):")
        lines += [f"    {s.bench_label}" for s in make(batch)]
    return "presets:\n" + "\n".join(lines) + "\n  all: dinat-tiny + large-image + video"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.na_bench", description=__doc__.split("\n\n")[0],
        epilog=_shape_list_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--preset", choices=PRESET_CHOICES, default="dinat-tiny")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke preset: same as --preset tiny")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="default: float16 on CUDA, float32 on CPU")
    parser.add_argument("--batch", type=int, default=None, help="override every shape's batch size")
    parser.add_argument("--filter", default=None, help="keep shapes whose label contains this text")
    parser.add_argument("--mode", choices=["fwd", "fwdbwd", "both"], default="both")
    parser.add_argument("--candidates", default=None,
                        help=f"comma list from {','.join(ALL_CANDIDATES)}; default: every one available here")
    parser.add_argument("--baseline", default=None, help="candidate the ratios are against; default flex on "
                        "CUDA, reference on CPU")
    parser.add_argument("--no-rpb", action="store_true", help="run every shape without relative position bias")
    parser.add_argument("--rpb-dtype", choices=["float32", "same"], default="float32",
                        help="rpb dtype: float32 (a parameter under mixed precision, the default) or the "
                        "same as q, k, v")
    parser.add_argument("--check", choices=["first", "all", "none"], default="first",
                        help="shapes whose outputs (and gradients) are checked against the reference")
    parser.add_argument("--flex-compile", choices=["auto", "on", "off"], default="auto",
                        help="torch.compile flex_attention: auto = on CUDA only")
    parser.add_argument("--warmup-ms", type=int, default=25, help="CUDA: do_bench warm-up")
    parser.add_argument("--rep-ms", type=int, default=100, help="CUDA: do_bench measuring time")
    parser.add_argument("--repeats", type=int, default=5, help="CPU: timed calls per case")
    parser.add_argument("--cpu-threads", type=int, default=None,
                        help="CPU: torch.set_num_threads (1 gives steadier times on a shared machine)")
    parser.add_argument("--cpu-memory", action="store_true",
                        help="CPU: measure each call's peak allocated memory with the profiler (one extra call)")
    parser.add_argument("--out", default=None, help="write the markdown table here")
    parser.add_argument("--plot", default=None, help="write a bar chart (PNG) here")
    args = parser.parse_args(argv)
    if args.tiny:
        args.preset = "tiny"
    return args, parser


def main(argv=None) -> list[Result]:
    args, parser = parse_args(argv)
    device = torch.device(args.device)
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)

    shapes = preset_shapes(args.preset, args.batch)
    if args.no_rpb:
        shapes = [replace(s, rpb=False) for s in shapes]
    if args.filter:
        shapes = [s for s in shapes if args.filter in s.bench_label]
        if not shapes:
            parser.error(f"--filter {args.filter!r} matches no shape of preset {args.preset!r}")

    available = set(available_na_backends(device)) | set(ALTERNATIVES)
    wanted = args.candidates.split(",") if args.candidates else list(ALL_CANDIDATES)
    unknown = [c for c in wanted if c not in ALL_CANDIDATES]
    if unknown:
        parser.error(f"unknown candidates {unknown}; choose from {list(ALL_CANDIDATES)}")
    candidates = [c for c in wanted if c in available]
    unavailable = [c for c in wanted if c not in available]
    if not candidates:
        parser.error(f"none of the candidates {wanted} can run on {device} (available: {sorted(available)})")
    if args.baseline is None:
        args.baseline = "flex" if device.type == "cuda" and "flex" in candidates else candidates[0]
    if args.baseline not in candidates:
        parser.error(f"--baseline {args.baseline!r} is not among the candidates {candidates}")
    modes = ["fwd", "fwdbwd"] if args.mode == "both" else [args.mode]

    env = environment(device)
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | {len(shapes)} shapes x "
          f"{len(modes)} modes x {candidates}" + (f" (unavailable: {unavailable})" if unavailable else ""),
          file=sys.stderr)
    log = functools.partial(print, file=sys.stderr, flush=True)

    def write_partial(results, shapes_done):
        # Rewrite --out after every shape: a run killed by a time limit keeps what it measured.
        if args.out and shapes_done < len(shapes):
            table = markdown_table(results, env, args, candidates, unavailable, dtype, device)
            Path(args.out).write_text(table + f"\n(partial: {shapes_done} of {len(shapes)} shapes done)\n")

    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    results = run_benchmark(shapes, candidates, modes, device, dtype, args, log=log, on_shape_done=write_partial)

    table = markdown_table(results, env, args, candidates, unavailable, dtype, device)
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    if args.plot:
        plot(results, args.plot, f"NA benchmark, {args.preset}, {env['device']}, {env['date']}", candidates)
    return results


if __name__ == "__main__":
    main()
