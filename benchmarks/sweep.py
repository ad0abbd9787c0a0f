"""Autotune sweep of the Triton NA kernels: time every candidate launch config, keep the winners.

For each problem shape (default: every distinct attention layer of the DiNAT variants at 224x224,
taken from the ``models`` registry) and dtype, the NA op of each kernel family runs once with the
kernels' own autotuners (no table); every launch of a tunable kernel (fused fwd, fused bwd dQ and
dK/dV, unfused window-dot / window-sum / inverse-sum) is recorded with its arguments. The op's
results are first checked against ``kernels.reference``. Then, per recorded launch, each candidate
config is replayed on the same buffers and its outputs compared with the default launch's; a
candidate that fails to compile, crashes or disagrees is recorded as invalid (never a winner);
the valid ones are timed with ``triton.testing.do_bench`` (median). The output JSON is a tuning
table (``kernels/tuned/README.md``): one entry per key (kernel, dtype, head dim, kernel size,
dilation, causality, RPB, shape bucket) with its winner, the default's time, the speed-up and
every candidate's result.

Work is split over jobs with ``--shard I/N`` (0-based; a deterministic round-robin over the sorted
keys), each shard writing its own file; ``merge`` combines shard files into one table.

Examples::

    PYTHONPATH=. python -m benchmarks.sweep --dtype float16 --out sweep-h100.json      # one GPU
    PYTHONPATH=. python -m benchmarks.sweep --shard 3/8 --out parts/sweep-3of8.json     # job 3 of 8
    PYTHONPATH=. python -m benchmarks.sweep merge kernels/tuned/H100.json parts/*.json --winners-only
    PYTHONPATH=. python -m benchmarks.sweep --smoke --out /tmp/smoke.json               # CPU, interpreter
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

# Triton runs on CPU tensors only through its interpreter, which must be on before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402

from dinat import kernels  # noqa: E402
from benchmarks._common import NAShape, median_ms, sync  # noqa: E402
from dinat.kernels import tuning  # noqa: E402
from dinat.kernels.api import check_params  # noqa: E402
from dinat.kernels.geometry import NAParams  # noqa: E402

FAMILIES = {
    "fused": ("fused_fwd", "fused_bwd_dq", "fused_bwd_dkdv"),
    "unfused": ("unfused_window_dot", "unfused_window_sum", "unfused_inverse_sum"),
}
KERNEL_FAMILY = {name: family for family, names in FAMILIES.items() for name in names}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Max abs difference from the reference / default launch, times max(1, max|expected|). float32
# leaves room for TF32 tensor-core dots; a different block size reorders the fused softmax sums.
TOLERANCE = {torch.float16: 2e-2, torch.bfloat16: 6e-2, torch.float32: 1e-2}
DEFAULT_MODELS = ("dinat_mini", "dinat_tiny", "dinat_small", "dinat_base", "dinat_large")
NA_BY_RANK = {1: kernels.na1d, 2: kernels.na2d, 3: kernels.na3d}


# ---------------------------------------------------------------------------------------------
# Shapes


def model_shapes(model_names: Sequence[str], img_size: int, batch: int) -> list[NAShape]:
    """The distinct attention-layer shapes of ``model_names`` (timm names of the ``models`` registry).

    Models are built on the meta device (no weights allocated); a level's map is the input size
    over the stem's reduction, halved per level (rounded up, as the stride-2 downsamplers do).
    """
    import timm

    from dinat import models  # registers the DiNAT family with timm
    from dinat.models.layers import NeighborhoodAttention2d

    shapes: list[NAShape] = []
    for name in model_names:
        try:
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False)
        except RuntimeError as exc:
            raise ValueError(f"--models: {name!r} is not a model of the registry ({exc})") from None
        if not isinstance(model, models.HierarchicalNAT):
            raise ValueError(f"--models: {name!r} is not a hierarchical DiNAT/NAT model (no levels)")
        size = math.ceil(img_size / model.stem_reduction)
        for level in model.get_levels():
            for attn in level.modules():
                if isinstance(attn, NeighborhoodAttention2d):
                    shape = NAShape(batch, (size, size), attn.num_heads, attn.head_dim, (attn.kernel_size,) * 2,
                                       (attn.dilation,) * 2, (False, False), True, origin=name)
                    if all(shape.label != s.label for s in shapes):
                        shapes.append(shape)
            size = math.ceil(size / 2)
    return shapes


def _axes(value: str, kind, name: str, spec: str) -> tuple:
    try:
        if kind is bool:
            return tuple({"1": True, "0": False, "t": True, "f": False}[c.lower()] for c in value.split("x"))
        return tuple(int(v) for v in value.split("x"))
    except (KeyError, ValueError):
        raise ValueError(f"--shape {spec!r}: {name}={value!r} must be values joined by 'x' "
                         f"({'0/1' if kind is bool else 'ints'}, one per axis)") from None


def parse_shape(spec: str, batch: int) -> NAShape:
    """``spatial=56x56,heads=2,head_dim=32,kernel=7,dilation=8[,causal=0x1][,rpb=0]``."""
    fields = {}
    for part in spec.split(","):
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"--shape {spec!r}: {part!r} is not name=value")
        fields[name.strip()] = value.strip()
    required = ("spatial", "heads", "head_dim", "kernel", "dilation")
    allowed = required + ("causal", "rpb")
    unknown = sorted(set(fields) - set(allowed))
    missing = [n for n in required if n not in fields]
    if unknown or missing:
        raise ValueError(f"--shape {spec!r}: needs {list(required)} (optional causal, rpb); "
                         f"unknown {unknown}, missing {missing}")
    spatial = _axes(fields["spatial"], int, "spatial", spec)
    ndim = len(spatial)
    if ndim not in NA_BY_RANK:
        raise ValueError(f"--shape {spec!r}: spatial must have 1 to 3 axes; got {ndim}")

    def per_axis(name, kind, default):
        values = _axes(fields[name], kind, name, spec) if name in fields else (default,)
        if len(values) == 1:
            values = values * ndim
        if len(values) != ndim:
            raise ValueError(f"--shape {spec!r}: {name} needs 1 or {ndim} values; got {len(values)}")
        return values

    try:
        heads, head_dim = int(fields["heads"]), int(fields["head_dim"])
    except ValueError:
        raise ValueError(f"--shape {spec!r}: heads and head_dim must be ints") from None
    rpb = fields.get("rpb", "1") not in ("0", "false", "False")
    shape = NAShape(batch, spatial, heads, head_dim, per_axis("kernel", int, None), per_axis("dilation", int, 1),
                       per_axis("causal", bool, False), rpb, origin="--shape")
    if rpb and any(shape.causal):
        raise ValueError(f"--shape {spec!r}: an RPB needs a non-causal window; add rpb=0")
    if heads < 1 or head_dim < 1:
        raise ValueError(f"--shape {spec!r}: heads and head_dim must be >= 1")
    check_params(shape.spatial, shape.kernel_size, shape.dilation, shape.causal, fn=f"--shape {spec!r}")
    return shape


def smoke_shapes() -> list[NAShape]:
    # Seconds under the interpreter: one head, a 1-D dilated window with an RPB (two tiles).
    return [NAShape(1, (16,), 1, 16, (3,), (2,), (False,), True, origin="smoke")]


# ---------------------------------------------------------------------------------------------
# Work units: one tuning key each, with the shape that stands for it


@dataclass(frozen=True)
class Unit:
    key: tuning.TuningKey
    shape: NAShape
    dtype: str

    @property
    def sort_id(self) -> str:
        return json.dumps(self.key.to_json(), sort_keys=True)


def expected_keys(shape: NAShape, dtype: str, kernel_names: Sequence[str]) -> list[tuning.TuningKey]:
    """The keys the launches of one forward+backward of ``shape`` will have, per tunable kernel."""
    keys = []
    for name in kernel_names:
        # The unfused window-dot runs for the QK forward (with the RPB) and the AV backward (without).
        rpb_flags = [shape.rpb, False] if name == "unfused_window_dot" else [
            shape.rpb if name.startswith("fused") else False]
        for rpb in dict.fromkeys(rpb_flags):
            keys.append(tuning.TuningKey.make(name, dtype, shape.head_dim, shape.spatial, shape.kernel_size,
                                              shape.dilation, shape.causal, rpb))
    return keys


def work_units(shapes: Sequence[NAShape], dtypes: Sequence[str], kernel_names: Sequence[str]) -> list[Unit]:
    """Every key once (the first shape that produces it stands for it), sorted: the same list in every shard."""
    units: dict[tuning.TuningKey, Unit] = {}
    for dtype in dtypes:
        for shape in shapes:
            for key in expected_keys(shape, dtype, kernel_names):
                units.setdefault(key, Unit(key, shape, dtype))
    return sorted(units.values(), key=lambda u: u.sort_id)


def parse_shard(spec: str, environ=os.environ) -> tuple[int, int]:
    """``I/N`` (0-based), or ``slurm``: this task of a ``sbatch --array`` job (any first index)."""
    if spec == "slurm":
        names = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")
        if not all(n in environ for n in names):
            raise ValueError(f"--shard slurm needs {' and '.join(names)} (run it as a task of sbatch --array)")
        first = int(environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        spec = f"{int(environ[names[0]]) - first}/{environ[names[1]]}"
    index, sep, count = spec.partition("/")
    try:
        index, count = int(index), int(count)
    except ValueError:
        raise ValueError(f"--shard must be I/N with ints (0 <= I < N); got {spec!r}") from None
    if not sep or count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard must be I/N with 0 <= I < N; got {spec!r}")
    return index, count


def shard_units(units: Sequence[Unit], index: int, count: int) -> list[Unit]:
    """Round-robin over the sorted units: shards are disjoint, cover everything, and are balanced."""
    return list(units[index::count])


# ---------------------------------------------------------------------------------------------
# Candidates


def candidate_configs(kernel_name: str, smoke: bool) -> list[triton.Config]:
    """Every config a sweep tries for ``kernel_name`` (1-2 under ``smoke``: the interpreter is slow).

    Fused blocks start at 16 (the smallest tl.dot operand a GPU compiles); the unfused row
    kernels have no dots, so any power of two works and only register pressure limits the top.
    """
    block_name = tuning.TUNABLE[kernel_name][0]
    if kernel_name.startswith("fused"):
        if smoke:
            return [triton.Config({block_name: b}, num_warps=4, num_stages=1) for b in (128, 32)]
        return [triton.Config({block_name: b}, num_warps=w, num_stages=s)
                for b in (16, 32, 64, 128) for w in (2, 4, 8) for s in (1, 2, 3, 4)]
    if smoke:
        return [triton.Config({block_name: b}, num_warps=4, num_stages=1) for b in (256, 64)]
    return [triton.Config({block_name: b}, num_warps=w, num_stages=s)
            for b in (16, 32, 64, 128, 256) for w in (1, 2, 4, 8) for s in (1, 2, 3)]


# ---------------------------------------------------------------------------------------------
# Recording the default launches


@dataclass
class Launch:
    """One launch of a tunable kernel during the default run, replayable on the same buffers."""

    kernel: tuning.TunedKernel
    key: tuning.TuningKey
    args: tuple
    kwargs: dict  # without grid / warmup
    grid: object
    initial: dict  # output name -> its content before the launch (restored before each replay)
    expected: dict = field(default_factory=dict)  # output name -> the default launch's result

    def bound(self) -> dict:
        out = dict(zip(self.kernel.arg_names, self.args))
        out.update(self.kwargs)
        return out

    def outputs(self) -> dict:
        bound = self.bound()
        return {name: bound[name] for name in self.kernel.outputs}

    def restore(self) -> None:
        for name, tensor in self.outputs().items():
            tensor.copy_(self.initial[name])

    def run_default(self) -> None:
        self.kernel.run(*self.args, grid=self.grid, warmup=False, **self.kwargs)

    def run_config(self, config: tuning.LaunchConfig) -> None:
        tuning.single_config(self.kernel.fn, config).run(*self.args, grid=self.grid, warmup=False, **self.kwargs)


def _inputs(shape: NAShape, dtype: torch.dtype, device: torch.device, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    size = (shape.batch, *shape.spatial, shape.heads, shape.head_dim)
    q, k, v, grad = (torch.randn(size, generator=gen).to(device=device, dtype=dtype) for _ in range(4))
    rpb = None
    if shape.rpb:
        rpb = (0.5 * torch.randn((shape.heads, *(2 * k_ - 1 for k_ in shape.kernel_size)), generator=gen)).to(
            device=device, dtype=dtype)
    return q, k, v, rpb, grad


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> tuple[bool, float]:
    """(within ``tol * max(1, max|expected|)``, max abs difference); equal infinities/NaNs agree."""
    a, e = actual.detach().float(), expected.detach().float()
    finite = e[torch.isfinite(e)]
    atol = tol * max(1.0, finite.abs().max().item() if finite.numel() else 0.0)
    ok = torch.isclose(a, e, rtol=0.0, atol=atol, equal_nan=True)
    if bool(ok.all()):
        return True, float((a - e).abs().nan_to_num(0.0, 0.0, 0.0).max().item()) if a.numel() else 0.0
    return False, float((a - e).abs()[~ok].nan_to_num(float("inf")).max().item())


def record_default_launches(shape: NAShape, dtype: torch.dtype, family: str, device: torch.device) -> dict:
    """Run the NA op of ``family`` forward+backward with the kernels' own autotuners, check it
    against ``kernels.reference``, and return the first launch per tuning key (key -> Launch)."""
    q, k, v, rpb, grad = _inputs(shape, dtype, device)
    params = NAParams(shape.kernel_size, shape.dilation, shape.causal)
    na = NA_BY_RANK[len(shape.spatial)]
    scale = shape.head_dim ** -0.5
    launches: dict = {}

    def record(kernel, key, args, kwargs):
        if key in launches:
            return
        launch_kwargs = {n: val for n, val in kwargs.items() if n not in ("grid", "warmup")}
        bound = dict(zip(kernel.arg_names, args))
        bound.update(launch_kwargs)
        initial = {name: bound[name].clone() for name in kernel.outputs}
        launches[key] = Launch(kernel, key, args, launch_kwargs, kwargs["grid"], initial)

    leaves = [t.requires_grad_() for t in (q, k, v) + ((rpb,) if rpb is not None else ())]
    with tuning.no_table(), tuning.watching_launches(record):
        out = na(q, k, v, params.kernel_size, params.dilation, params.is_causal, rpb=rpb, scale=scale,
                 backend=family)
        grads = torch.autograd.grad(out, leaves, grad)
    _check_against_reference(shape, (q, k, v, rpb, grad), params, scale, out, grads, dtype)
    for launch in launches.values():
        launch.expected = {name: t.clone() for name, t in launch.outputs().items()}
    return launches


def _check_against_reference(shape, inputs, params, scale, out, grads, dtype) -> None:
    q, k, v, rpb, grad = (t.detach().double() if t is not None else None for t in inputs)
    leaves = [t.requires_grad_() for t in (q, k, v) + ((rpb,) if rpb is not None else ())]
    na = NA_BY_RANK[len(shape.spatial)]
    ref = na(q, k, v, params.kernel_size, params.dilation, params.is_causal, rpb=rpb, scale=scale,
             backend="reference")
    ref_grads = torch.autograd.grad(ref, leaves, grad)
    for name, actual, expected in zip(("out", "dq", "dk", "dv", "drpb"), (out, *grads), (ref, *ref_grads)):
        ok, err = _close(actual.cpu(), expected.cpu(), TOLERANCE[dtype])
        if not ok:
            raise AssertionError(f"default launch disagrees with dinat.kernels.reference on {shape.label}: "
                                 f"{name} max error {err:.3g}")


# ---------------------------------------------------------------------------------------------
# Timing and the sweep


def make_timer(device: torch.device, warmup_ms: int, rep_ms: int, cpu_reps: int) -> Callable[[Callable], float]:
    """Median ms of ``fn``: ``triton.testing.do_bench`` on a GPU, wall clock under the interpreter."""
    return lambda fn: median_ms(fn, device, warmup_ms, rep_ms, cpu_reps)


@dataclass
class SweepOptions:
    shapes: list
    dtypes: list
    kernel_names: list
    shard: tuple[int, int] = (0, 1)
    smoke: bool = False
    warmup_ms: int = 25
    rep_ms: int = 100
    cpu_reps: int = 1
    device: str = "cuda"
    log: Callable[[str], None] = print
    # kernel name -> the configs to try; None: candidate_configs (a caller with a time limit narrows them)
    candidates: Optional[Callable[[str], list]] = None


def sweep_unit(unit: Unit, launch: Launch, options: SweepOptions, timer, after_candidate=None) -> dict:
    """Validate then time every candidate of one key; the entry for the table."""
    device = torch.device(options.device)
    dtype = DTYPES[unit.dtype]
    entry = dict(unit.key.to_json(), shape=unit.shape.to_json())
    # The default is what the kernel's own autotuner picks for this launch (never a table's
    # choice); it is timed through the same one-config launch path as every candidate, so both
    # pay the same host overhead.
    launch.restore()
    with tuning.no_table():
        launch.run_default()
    default = tuning.LaunchConfig.from_triton(launch.kernel.best_config)
    default_ms = timer(lambda: launch.run_config(default))
    entry["default"] = dict(default.to_json(), ms=default_ms)
    candidates = []
    configs = (options.candidates(unit.key.kernel) if options.candidates is not None
               else candidate_configs(unit.key.kernel, options.smoke))
    for config in configs:
        chosen = tuning.LaunchConfig.from_triton(config)
        record = dict(chosen.to_json(), valid=False, ms=None, max_error=None, error=None)
        try:
            launch.restore()
            launch.run_config(chosen)
            sync(device)
            if after_candidate is not None:  # test hook: lets a test break a candidate's output
                after_candidate(unit.key.kernel, chosen, launch.outputs())
            worst = 0.0
            for name, actual in launch.outputs().items():
                ok, err = _close(actual, launch.expected[name], TOLERANCE[dtype])
                worst = max(worst, err)
                if not ok:
                    record["error"] = f"{name} differs from the default launch by {err:.3g}"
                    break
            record["max_error"] = worst
            if record["error"] is None:
                record["ms"] = timer(lambda: launch.run_config(chosen))
                record["valid"] = True
        except Exception as exc:  # a config that does not compile / fit / run: invalid, not fatal
            record["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        candidates.append(record)
    _set_winner(entry, candidates)
    launch.restore()
    return entry


def _config_id(record: dict) -> str:
    return json.dumps([record.get("meta"), record.get("num_warps"), record.get("num_stages")], sort_keys=True)


def _set_winner(entry: dict, candidates: list) -> None:
    entry["candidates"] = candidates
    valid = [c for c in candidates if c.get("valid") and c.get("ms") is not None]
    best = min(valid, key=lambda c: c["ms"]) if valid else None
    entry["winner"] = None if best is None else dict(meta=best["meta"], num_warps=best["num_warps"],
                                                     num_stages=best["num_stages"], ms=best["ms"])
    entry["speedup"] = tuning.speedup(entry.get("default", {}).get("ms"), best["ms"] if best else None)


def run_sweep(options: SweepOptions, after_candidate=None) -> dict:
    """Sweep this shard's units; returns the JSON document (a tuning table with candidates)."""
    device = torch.device(options.device)
    units = work_units(options.shapes, options.dtypes, options.kernel_names)
    index, count = options.shard
    mine = shard_units(units, index, count)
    options.log(f"sweep shard {index}/{count}: {len(mine)} of {len(units)} keys on {_device_name(device)}")
    timer = make_timer(device, options.warmup_ms, options.rep_ms, options.cpu_reps)
    recorded: dict = {}
    entries = []
    for n, unit in enumerate(mine, start=1):
        family = KERNEL_FAMILY[unit.key.kernel]
        group = (unit.shape, unit.dtype, family)
        started = time.perf_counter()
        try:
            if group not in recorded:
                recorded.clear()  # one shape's buffers at a time
                recorded[group] = record_default_launches(unit.shape, DTYPES[unit.dtype], family, device)
            launch = recorded[group].get(unit.key)
            if launch is None:
                raise RuntimeError(f"no launch with key {unit.key.label()} in {family} fwd+bwd of {unit.shape.label}")
            entry = sweep_unit(unit, launch, options, timer, after_candidate)
        except Exception as exc:  # the default itself fails: record it, go on with the next key
            entry = dict(unit.key.to_json(), shape=unit.shape.to_json(), default=None, winner=None, speedup=None,
                         candidates=[], error=f"{type(exc).__name__}: {exc}"[:500])
        entries.append(entry)
        win = entry.get("winner")
        options.log(f"[{n}/{len(mine)}] {unit.key.label()} ({unit.shape.label}): "
                    + (f"winner {win['meta']} w{win['num_warps']} s{win['num_stages']} {win['ms']:.4g} ms, "
                       f"x{entry['speedup']:.3g} vs default" if win and entry.get("speedup") else
                       f"no valid candidate ({entry.get('error') or 'all invalid'})")
                    + f" [{time.perf_counter() - started:.1f}s]")
    name = _device_name(device)
    return dict(tuning.empty_table_json(tuning.gpu_family(name) if device.type == "cuda" else "cpu", [name]),
                sweep=dict(shard=f"{index}/{count}", smoke=options.smoke, created=_now(), torch=torch.__version__,
                           triton=triton.__version__, dtypes=list(options.dtypes),
                           kernels=list(options.kernel_names), keys_total=len(units)),
                entries=entries)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (triton interpreter)"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# Merge


def _key_of_entry(entry: dict, where: str) -> tuning.TuningKey:
    return tuning.parse_key(where, entry)


def merge_tables(documents: Sequence[tuple[str, dict]], allow_mixed_gpus: bool = False,
                 family: Optional[str] = None, winners_only: bool = False) -> dict:
    """Merge sweep files: per key, the fastest valid candidate over all files wins.

    Files from different GPU names are refused unless ``allow_mixed_gpus`` (a family table should
    hold one GPU's timings); files of different families then need ``family``.
    """
    if not documents:
        raise ValueError("merge: give at least one input file")
    names_by_file = {}
    families = set()
    for path, doc in documents:
        tuning.parse_table(doc, path)  # format / field checks, with the file's name in errors
        names_by_file[path] = list(doc["gpu_names"])
        families.add(doc["family"])
    all_names = sorted({n for names in names_by_file.values() for n in names})
    if len(all_names) > 1 and not allow_mixed_gpus:
        detail = "; ".join(f"{p}: {n}" for p, n in names_by_file.items())
        raise ValueError(f"merge: the files come from different GPUs ({detail}); a family table should hold "
                         f"one GPU's timings -- pass --allow-mixed-gpus to merge them anyway")
    if family is None:
        if len(families) > 1:
            raise ValueError(f"merge: the files are of different families {sorted(families)}; pass --family")
        family = families.pop()
    merged: dict = {}
    order = []
    for path, doc in documents:
        for i, entry in enumerate(doc["entries"]):
            key = _key_of_entry(entry, f"{path}: entries[{i}]")
            if key not in merged:
                merged[key] = []
                order.append(key)
            merged[key].append(entry)
    entries = []
    for key in sorted(order, key=lambda k: json.dumps(k.to_json(), sort_keys=True)):
        versions = merged[key]

        def best_ms(entry):
            win = entry.get("winner")
            return win["ms"] if win and win.get("ms") is not None else math.inf

        base = min(versions, key=best_ms)  # the run whose winner is fastest (its default, its shape)
        candidates: dict = {}
        for entry in versions:
            for c in entry.get("candidates", []):
                cid = _config_id(c)
                old = candidates.get(cid)
                if old is None or (c.get("valid") and (not old.get("valid") or c["ms"] < old["ms"])):
                    candidates[cid] = c
        out = {k: v for k, v in base.items() if k not in ("candidates", "winner", "speedup")}
        if candidates:
            _set_winner(out, list(candidates.values()))
        else:  # files without candidate lists (already winners-only tables)
            out["candidates"], out["winner"], out["speedup"] = [], base.get("winner"), base.get("speedup")
        if winners_only:
            out.pop("candidates", None)
        entries.append(out)
    return dict(tuning.empty_table_json(family, all_names),
                sweep=dict(merged_from=[p for p, _ in documents], created=_now()), entries=entries)


def fused_summary(doc: dict) -> list[str]:
    """Markdown rows: per shape, fused fwd+bwd (fwd + dQ + dK/dV kernels) default vs winners."""
    by_shape: dict = {}
    for entry in doc["entries"]:
        if not entry["kernel"].startswith("fused") or not entry.get("shape"):
            continue
        label = NAShape.from_json(entry["shape"]).label
        by_shape.setdefault((label, entry["dtype"]), {})[entry["kernel"]] = entry
    rows = ["| shape | dtype | default fwd+bwd ms | tuned fwd+bwd ms | speed-up |", "|---|---|---:|---:|---:|"]
    for (label, dtype), parts in by_shape.items():
        if set(parts) != set(FAMILIES["fused"]) or any(not p.get("winner") or not p.get("default") for p in parts.values()):
            rows.append(f"| {label} | {dtype} | incomplete | | |")
            continue
        default = sum(p["default"]["ms"] for p in parts.values())
        tuned = sum(p["winner"]["ms"] for p in parts.values())
        rows.append(f"| {label} | {dtype} | {default:.4g} | {tuned:.4g} | {default / tuned:.3g}x |")
    return rows


# ---------------------------------------------------------------------------------------------
# Command line


def _write(doc: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)  # a job killed mid-write never leaves a truncated shard file


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sweep [run]", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                   help="timm names whose attention layers give the shapes (default: the DiNAT variants)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--shape", action="append", default=[], metavar="SPEC",
                   help="a shape instead of the models': spatial=56x56,heads=2,head_dim=32,kernel=7,dilation=8"
                        "[,causal=0x1][,rpb=0] (repeatable)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dtype", nargs="+", default=["float16"], choices=list(DTYPES))
    p.add_argument("--kernels", nargs="+", default=list(tuning.TUNABLE), choices=list(tuning.TUNABLE))
    p.add_argument("--shard", default="0/1",
                   help="I/N: sweep the I-th (0-based) of N disjoint parts; 'slurm': from SLURM_ARRAY_TASK_*")
    p.add_argument("--out", default=None, help="output JSON (default: sweep-<family>-<I>of<N>.json)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench measuring time, ms")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shape, 2 candidates per kernel, float32; runs on CPU under the interpreter")
    return p


def _merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sweep merge",
                                description="Merge sweep files: the fastest valid config per key wins.")
    p.add_argument("out", help="the merged table, e.g. kernels/tuned/H100.json")
    p.add_argument("inputs", nargs="+", help="sweep / table files to merge")
    p.add_argument("--allow-mixed-gpus", action="store_true",
                   help="merge files timed on different GPU names into one table")
    p.add_argument("--family", default=None, help="family of the merged table (needed if the inputs differ)")
    p.add_argument("--winners-only", action="store_true",
                   help="drop the per-candidate records (what a shipped table needs)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["merge"]:
        args = _merge_parser().parse_args(argv[1:])
        documents = []
        for path in args.inputs:
            try:
                with open(path, encoding="utf-8") as f:
                    documents.append((path, json.load(f)))
            except (OSError, json.JSONDecodeError) as exc:
                raise SystemExit(f"merge: cannot read {path}: {exc}")
        try:
            doc = merge_tables(documents, args.allow_mixed_gpus, args.family, args.winners_only)
        except ValueError as exc:
            raise SystemExit(str(exc))
        _write(doc, args.out)
        print(f"merged {len(documents)} file(s), {len(doc['entries'])} keys -> {args.out}")
        print("\n".join(fused_summary(doc)))
        return 0
    if argv[:1] == ["run"]:
        argv = argv[1:]
    args = _run_parser().parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        raise SystemExit("a full sweep needs a CUDA GPU (timings under the interpreter mean nothing); "
                         "on CPU use --smoke")
    try:
        shard = parse_shard(args.shard)
        if args.smoke:
            shapes, dtypes = smoke_shapes(), ["float32"]
        elif args.shape:
            shapes, dtypes = [parse_shape(s, args.batch) for s in args.shape], args.dtype
        else:
            shapes, dtypes = model_shapes(args.models, args.img_size, args.batch), args.dtype
    except ValueError as exc:
        raise SystemExit(str(exc))
    options = SweepOptions(shapes=shapes, dtypes=dtypes, kernel_names=args.kernels, shard=shard, smoke=args.smoke,
                           warmup_ms=args.warmup, rep_ms=args.rep, device="cuda" if cuda else "cpu")
    doc = run_sweep(options)
    out = args.out or f"sweep-{doc['family']}-{shard[0]}of{shard[1]}.json"
    _write(doc, out)
    valid = sum(1 for e in doc["entries"] if e.get("winner"))
    print(f"wrote {out}: {len(doc['entries'])} keys, {valid} with a valid winner")
    print("\n".join(fused_summary(doc)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
