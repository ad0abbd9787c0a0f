"""Static audit of the Triton kernels for a GPU that is not here: registers, spills, inner-loop SASS.

Every kernel is compiled exactly as a launch on the GPU would compile it: the launch is *recorded*
from the project's own host code (``kernels.naNd`` forward and backward on fake CUDA tensors; see
``benchmarks/_audit_launch.py``), its arguments bound by Triton's own binder (pointer alignment,
"== 1" and "divisible by 16" specialisation, constexprs) and compiled with the config's
``num_warps``/``num_stages`` for ``--arch`` (sm_90 by default) -- no GPU, no hand-written argument
list. From the cubin: registers and spill bytes (``ptxas -v``), shared memory, blocks and warps
per SM; from the SASS of the innermost loop: instructions per iteration by class; from a replay
in Triton's interpreter: loop iterations per program. Per layer, an **issue-time lower bound**
(warp instructions / (SMs x 4 schedulers x clock)) beside the HBM roofline (bytes of the tensors
the launch is given / bandwidth), the tensor-core and MUFU times, and issue / roofline.

It runs under two Tritons side by side: the installed one and the GPU image's 3.6.0 (a side
install, ``make kernel-audit`` makes it; or ``AUDIT_TRITON36_PYTHON=/path/to/python``).

    PYTHONPATH=. python -m benchmarks.kernel_audit --quick          # one line per (kernel, dilation, Triton)
    PYTHONPATH=. python -m benchmarks.kernel_audit --out-md audit.md --out-json audit.json
    PYTHONPATH=. python -m benchmarks.kernel_audit --shape spatial=56x56,heads=2,head_dim=32,kernel=7,dilation=1

Quick mode prints, flushed as each is ready::

    fused_fwd_d1 sm_90 3.6.0 <regs> <spill_bytes> <sass_per_iter> <issue_over_roofline>

Results are cached under ``.audit/cache`` keyed by the sources of ``kernels/`` and of this tool,
the Triton version and the problem, so a second run with unchanged kernels is fast.
See ``docs/kernel_audit.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
AUDIT_DIR = ROOT / ".audit"
CACHE_DIR = Path(os.environ.get("KERNEL_AUDIT_CACHE", AUDIT_DIR / "cache"))
SIDE_TRITON = "3.6.0"
SIDE_DIR = AUDIT_DIR / f"triton-{SIDE_TRITON}"
SIDE_ENV = "AUDIT_TRITON36_PYTHON"
# kernels.offsets.FORCE_ENV (not imported: this process stays free of torch): "1" audits the
# kernels' 64-bit-offset specialisation at any shape.
FORCE_INT64_ENV = "DINAT_INT64_OFFSETS"
DEFAULT_PREFERENCE = dict(block=64, num_warps=4)
QUICK_KERNELS = ("fused_fwd", "fused_dq", "fused_dkdv")

# Stage 1 of DiNAT-tiny at 224x224: 56x56 map, 2 heads of 32, 7x7 window, RPB, bf16, batch 64.
STAGE1 = dict(spatial=[56, 56], heads=2, head_dim=32, kernel_size=[7, 7], causal=[False, False], rpb=True,
              batch=64, dtype="bfloat16", backend="fused")


# ---------------------------------------------------------------------------------------------
# Workers (run in a subprocess per Triton: the compile one with TRITON_INTERPRET=0, the trip
# counter with TRITON_INTERPRET=1; either must be set before triton is imported)


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _config_of(launch, config) -> dict:
    """A config as plain JSON: tunable meta-parameters, warps, stages."""
    if config is None:
        return dict(meta={}, num_warps=launch.kwargs.get("num_warps", 4), num_stages=launch.kwargs.get("num_stages"))
    out = dict(meta=dict(config.kwargs), num_warps=config.num_warps, num_stages=config.num_stages)
    if getattr(config, "maxnreg", None) is not None:
        out["maxnreg"] = config.maxnreg
    return out


def _default_config(launch, family: Optional[str]):
    """The config the audit calls "default": the tuning table's entry for this launch on ``family``
    (a shipped ``kernels/tuned/<family>.json``), else, among the candidates the launch's autotuner
    keeps after its prune hook (``Launch.candidates``: what a GPU launch benchmarks), the one with
    every tunable block 64, 4 warps and the fewest stages, else the first kept candidate ("only
    candidate" when one is kept: then a launch runs exactly it)."""
    from dinat.kernels import tuning

    configs = launch.candidates
    if not configs:
        return None, "fixed"
    if family and hasattr(launch.kernel, "tuning_key"):
        shipped = tuning._shipped_table(tuning.TUNED_DIR, family)
        if shipped is not None:
            config = tuning.load_table(shipped).lookup(launch.kernel.tuning_key(launch.args, launch.kwargs))
            if config is not None:
                return config.to_triton(), f"table {family}"
    preferred = [c for c in configs if c.kwargs and all(v == DEFAULT_PREFERENCE["block"] for v in c.kwargs.values())
                 and c.num_warps == DEFAULT_PREFERENCE["num_warps"]]
    if preferred:
        return min(preferred, key=lambda c: c.num_stages), "default"
    return configs[0], "only candidate" if len(configs) == 1 else "first candidate"


def _mma_flops_per_warp(instructions) -> int:
    """Tensor-core FLOPs one warp's share of an iteration performs (HGMMA: a warpgroup of 4 warps
    does one m x n x k product per instruction; HMMA: one warp does it)."""
    total = 0
    for ins in instructions:
        shape = re.search(r"\.(\d+)x(\d+)x(\d+)", ins.opcode)
        if ins.base.endswith("GMMA") and shape:
            m, n, k = map(int, shape.groups())
            total += 2 * m * n * k // 4
        elif ins.base == "HMMA":
            digits = re.search(r"\.(\d{4,5})\b", ins.opcode)
            if digits:
                m, n, k = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4)}.get(digits.group(1), (0, 0, 0))
                total += 2 * m * n * k
    return total


def _tensor_bytes(launch) -> int:
    """Bytes of the distinct tensors a launch is given (each counted once, by allocation)."""
    from benchmarks._audit_launch import DevicePointer

    seen = {}
    for value in list(launch.args) + list(launch.kwargs.values()):
        if isinstance(value, DevicePointer):
            span = 1 + sum((s - 1) * abs(st) for s, st in zip(value.shape, value.stride())) if value.shape else 1
            size = span * (value.dtype.itemsize if hasattr(value.dtype, "itemsize") else 4)
            seen[value.address] = max(seen.get(value.address, 0), size)
    # Views of one allocation (q, k, v of a qkv projection) overlap: merge the address intervals.
    total, end = 0, -1
    for start in sorted(seen):
        stop = start + seen[start]
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def worker_compile(job: dict) -> None:
    """Capture the launches of each problem, compile the selected configs, emit one JSON line each."""
    import triton

    from benchmarks import _audit_compile as compiler
    from benchmarks import _audit_sass as sass
    from benchmarks._audit_launch import Problem, capture, launch_name

    arch = int(job["arch"])
    _emit(dict(kind="header", triton=triton.__version__, ptxas=compiler.ptxas_version(), python=sys.executable))
    for problem_json in job["problems"]:
        problem = Problem.from_json(problem_json)
        try:
            launches = capture(problem, backward=job.get("backward", True))
        except Exception as exc:  # a problem the backend refuses: one error row, go on
            _emit(dict(kind="error", problem=problem_json, error=f"{type(exc).__name__}: {exc}"))
            continue
        names_seen: dict[str, int] = {}
        for launch in launches:
            name = launch_name(launch)
            names_seen[name] = names_seen.get(name, 0) + 1
            if names_seen[name] > 1:
                name = f"{name}#{names_seen[name]}"
            if job.get("kernels") and name not in job["kernels"]:
                continue
            default, why = _default_config(launch, job.get("family"))
            if job.get("candidates") and launch.configs:  # what the autotuner keeps after pruning
                selected = [(c, why if c is default else "candidate") for c in launch.candidates]
            elif job.get("all_configs") and launch.configs:
                kept = launch.candidates
                selected = [(c, why if c is default else "candidate" if any(c is k for k in kept) else "pruned")
                            for c in launch.configs]
                if default is not None and not any(c is default for c in launch.configs):
                    selected.insert(0, (default, why))
            else:
                selected = [(default, why)]
            for config, which in selected:
                meta = dict(config.all_kwargs()) if config is not None else {}
                row = dict(kind="result", problem=problem_json, launch=name, order=launch.order, which=which,
                           config=_config_of(launch, config), arch=arch)
                try:
                    start = time.perf_counter()
                    fn = launch.jit_function
                    compiled, bound = compiler.compile_launch(fn, arch, launch.args, {**launch.kwargs, **meta})
                    row["compile_s"] = round(time.perf_counter() - start, 2)
                    row["specialisation"] = compiler.specialisation_summary(fn, bound)
                    row["num_warps"] = bound["options"].num_warps
                    row["num_stages"] = bound["options"].num_stages
                    row["shared"] = int(compiled.metadata.shared)
                    arch_name = f"sm_{arch}a" if arch in (90, 100) else f"sm_{arch}"
                    row["res_usage"] = compiler.resource_usage(compiled.asm["cubin"])
                    if job.get("ptxas", True):
                        row.update(compiler.ptxas_usage(compiled.asm["ptx"], arch_name))
                    else:  # the cubin's own figures; spill bytes need ptxas -v
                        row.update(registers=row["res_usage"].get("reg"), stack_bytes=row["res_usage"].get("stack"),
                                   spill_store_bytes=None, spill_load_bytes=None)
                    listing = compiler.sass_text(compiled.asm["cubin"])
                    analysis = sass.analyse(listing)
                    kernel = sass.parse(listing)[0]
                    main = analysis["main_loop"]
                    if main:
                        first, last = int(main["first"], 16), int(main["last"], 16)
                        body = [i for i in kernel.instructions if first <= i.address <= last]
                        main["mma_flops_per_warp"] = _mma_flops_per_warp(body)
                    for loop in analysis["loops"]:
                        loop.pop("opcodes", None) if loop is not main else None
                    row["sass"] = analysis
                    row["grid"] = list(launch.grid_for(meta))
                    row["tensor_bytes"] = _tensor_bytes(launch)
                    row["jit_name"] = fn.__name__
                    row["compiled"] = True
                except Exception as exc:
                    row["compiled"] = False
                    row["error"] = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
                _emit(row)


def worker_trips(job: dict) -> None:
    from benchmarks._audit_trips import count_trips

    for result in count_trips(job["problem"], job["selections"]):
        _emit(dict(kind="trips", **result))


# ---------------------------------------------------------------------------------------------
# Running the workers (with a result cache)


def _source_hash() -> str:
    """Hash of everything a result depends on in this tree: ``kernels/`` and the audit tool."""
    h = hashlib.sha256()
    files = sorted((ROOT / "kernels").rglob("*.py")) + sorted((ROOT / "benchmarks").glob("_audit*.py"))
    files.append(Path(__file__))
    for path in files:
        h.update(str(path.relative_to(ROOT)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _cache_path(kind: str, payload: dict) -> Path:
    if os.environ.get(FORCE_INT64_ENV) == "1":  # every launch forced onto the 64-bit offsets (kernels/offsets.py)
        payload = {**payload, FORCE_INT64_ENV: "1"}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]
    return CACHE_DIR / f"{kind}-{key}.jsonl"


def _run_worker(python: list[str], mode: str, job: dict, env_extra: dict, use_cache: bool,
                cache_payload: dict) -> Iterable[dict]:
    """Yield the worker's JSON lines as they come (or all of them from the cache)."""
    path = _cache_path(mode, cache_payload)
    if use_cache and path.exists():
        for line in path.read_text().splitlines():
            yield json.loads(line)
        return
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env_extra.get("PYTHONPATH"), str(ROOT)]))
    env.setdefault("TRITON_INTERPRET", "0")
    proc = subprocess.Popen([*python, "-m", "benchmarks.kernel_audit", f"--{mode}-worker"], cwd=ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdin.write(json.dumps(job))
    proc.stdin.close()
    lines = []
    for line in proc.stdout:
        if line.startswith("{"):
            obj = json.loads(line)
            lines.append(line.rstrip("\n"))
            yield obj
    stderr = proc.stderr.read()
    if proc.wait() != 0:
        raise RuntimeError(f"{mode} worker ({' '.join(python)}) failed:\n{stderr[-3000:]}")
    if use_cache:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(path)


class Triton:
    """One Triton to compile with: how to start its worker, and its version."""

    def __init__(self, label: str, python: list[str], env: dict):
        self.label, self.python, self.env = label, python, env
        self.version: Optional[str] = None
        self.ptxas: Optional[str] = None

    def query_version(self) -> str:
        """The Triton version this worker would import (package metadata: no triton import)."""
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.update(self.env)
        code = ("import importlib.metadata as m, sys\n"
                "d = next(iter(m.distributions(name='triton', path=sys.path)), None)\n"
                "print(d.version if d else '')")
        out = subprocess.run([*self.python, "-c", code], env=env, capture_output=True, text=True)
        version = out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else ""
        if not version:
            raise RuntimeError(f"{' '.join(self.python)} has no triton: {out.stderr.strip()[-500:]}")
        self.version = version
        return self.version


def installed_triton() -> Triton:
    return Triton("installed", [sys.executable], {})


def side_triton() -> Optional[Triton]:
    """Triton 3.6.0: ``$AUDIT_TRITON36_PYTHON``, else the side install ``.audit/triton-3.6.0`` (a pip
    ``--target`` directory put before this Python's site-packages), else None."""
    python = os.environ.get(SIDE_ENV)
    if python:
        return Triton(SIDE_TRITON, [python], {})
    if (SIDE_DIR / "triton" / "__init__.py").exists():
        return Triton(SIDE_TRITON, [sys.executable], {"PYTHONPATH": str(SIDE_DIR)})
    return None


def install_side_triton() -> None:
    """``pip install --target .audit/triton-3.6.0 --no-deps triton==3.6.0`` (about 650 MB, a minute)."""
    SIDE_DIR.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(SIDE_DIR),
                    f"triton=={SIDE_TRITON}"], check=True)


# ---------------------------------------------------------------------------------------------
# The model: issue-time lower bound against the roofline


def main_source_loop(loops: list[dict]) -> Optional[dict]:
    """The source loop the SASS main loop is taken to be: the kernel's one innermost runtime loop,
    or its enclosing loop when it never runs more than once per entry or never runs at all (the
    compiler then drops it: a head-dim chunk loop with one chunk, or one in a branch a constexpr
    removes). None when there are several innermost loops."""
    innermost = [loop for loop in loops if loop["innermost"]]
    if len(innermost) != 1 or innermost[0].get("trips") is None:
        return None
    loop = innermost[0]
    by_line = {l["line"]: l for l in loops}
    while loop["parent"] is not None and max(loop["trips"] or [0]) <= 1:
        loop = by_line[loop["parent"]]
    return loop if loop.get("trips") is not None else None


def model(row: dict, trips: Optional[dict], gpu) -> dict:
    """Per-row derived figures on ``gpu`` (see the module doc); None where an input is missing."""
    from benchmarks._audit_gpus import occupancy

    out = {}
    if not row.get("compiled"):
        return out
    warps = row["num_warps"]
    out.update(occupancy(gpu, row["registers"] or row["res_usage"].get("reg", 0), warps, row["shared"]))
    main = row["sass"]["main_loop"]
    programs = math.prod(row["grid"])
    out["programs"] = programs
    if trips is None or main is None or "loops" not in trips:
        return out
    loop = main_source_loop(trips["loops"])
    if loop is None:
        out["trips_note"] = f"{sum(l['innermost'] for l in trips['loops'])} innermost source loops: not mapped"
        return out
    # Trips were counted at batch 1, one head: valid for the full grid only if nothing but the
    # batch*heads axis shrank (not so for a kernel whose loop runs over the batch or whose tiling depends on it).
    shrunk = [a for a, (full, reduced) in enumerate(zip(row["grid"], trips["reduced_grid"])) if full != reduced]
    if len(shrunk) > 1:
        out["trips_note"] = (f"grid {row['grid']} vs {trips['reduced_grid']} at batch 1, one head: "
                             f"trip counts depend on the batch or heads, not scaled")
        return out
    reduced_programs = math.prod(trips["reduced_grid"])
    scale = programs / reduced_programs
    total_trips = sum(loop["trips"]) * scale
    out["source_loop_line"] = loop["line"]
    out["iterations_per_program"] = total_trips / programs
    warp_instructions = (main["total"] * total_trips + row["sass"]["outside_main_loop"] * programs) * warps
    clock = gpu.clock_ghz * 1e9
    out["issue_ms"] = warp_instructions / (gpu.sms * gpu.issue_per_sm_clk * clock) * 1e3
    out["roofline_ms"] = row["tensor_bytes"] / (gpu.hbm_tbs_used * 1e12) * 1e3
    mma_flops = main.get("mma_flops_per_warp", 0) * warps * total_trips
    out["mma_ms"] = mma_flops / (gpu.bf16_dense_tflops * 1e12) * 1e3
    mufu = main["classes"].get("mufu", 0) * 32 * warps * total_trips
    out["mufu_ms"] = mufu / (gpu.sms * gpu.mufu_per_sm_clk * clock) * 1e3
    out["issue_over_roofline"] = out["issue_ms"] / out["roofline_ms"] if out["roofline_ms"] else None
    return out


# ---------------------------------------------------------------------------------------------
# Driving it


def quick_problems(dilations=(1, 2)) -> list[dict]:
    return [dict(STAGE1, dilation=[d, d]) for d in dilations]


def _problem_tag(problem: dict) -> str:
    from benchmarks._audit_launch import Problem

    return Problem.from_json(problem).tag


def quick_line(row: dict, derived: dict, triton_version: str) -> str:
    main = row["sass"]["main_loop"] if row.get("compiled") else None
    name = f"{row['launch']}_{_problem_tag(row['problem'])}"
    if not row.get("compiled"):
        return f"{name} sm_{row['arch']} {triton_version} error error error error"
    ratio = derived.get("issue_over_roofline")
    return (f"{name} sm_{row['arch']} {triton_version} {row['registers']} {row['spill_store_bytes']} "
            f"{main['total'] if main else 'noloop'} {f'{ratio:.2f}' if ratio is not None else 'na'}")


def audit(problems: list[dict], tritons: list[Triton], arch: int, gpu, all_configs: bool, kernels: Sequence[str],
          use_cache: bool, on_row=None, family: Optional[str] = None) -> dict:
    """Compile + trip-count + model every (problem, Triton); ``on_row(row, derived, triton)`` per result."""
    source = _source_hash()
    results, headers = [], {}
    trips_cache: dict = {}
    for problem in problems:
        for tri in tritons:
            job = dict(arch=arch, problems=[problem], all_configs=all_configs, kernels=list(kernels), family=family)
            payload = dict(job, source=source, triton=tri.version, python=tri.python, env=tri.env)
            rows = []
            for obj in _run_worker(tri.python, "compile", job, tri.env, use_cache, payload):
                obj["triton"] = tri.version
                if obj["kind"] == "header":
                    headers[tri.label] = obj
                elif obj["kind"] == "error":
                    results.append(obj)
                else:
                    rows.append(obj)
            # Trip counts: one interpreter run (installed Triton) per problem for every missing (launch, meta).
            def trips_key(row):
                return json.dumps([problem, row["launch"], row["config"]["meta"]], sort_keys=True)

            missing = {trips_key(r): dict(launch=r["launch"].split("#")[0], meta=r["config"]["meta"])
                       for r in rows if r.get("compiled") and trips_key(r) not in trips_cache}
            if missing:
                tjob = dict(problem=problem, selections=list(missing.values()))
                found = list(_run_worker([sys.executable], "trips", tjob, {"TRITON_INTERPRET": "1"}, use_cache,
                                         dict(tjob, source=source)))
                for key, result in zip(missing, found):
                    trips_cache[key] = result
            for row in rows:
                row["trips"] = trips_cache.get(trips_key(row))
                row["model"] = model(row, row["trips"], gpu)
                results.append(row)
                if on_row:
                    on_row(row, row["model"], tri)
    return dict(headers=headers, results=results)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernel_audit", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="fused fwd/dQ/dKdV default configs, stage 1, dilation 1 and 2, one line each")
    parser.add_argument("--dilations", default="1,2", help="quick mode: the stage-1 dilations (default 1,2)")
    parser.add_argument("--arch", type=int, choices=(80, 90, 100), default=90)
    parser.add_argument("--gpu", choices=("H100", "H200"), default=None, help="figures of the bounds (default H200)")
    parser.add_argument("--shape", action="append", default=None,
                        help="spatial=56x56,heads=2,head_dim=32,kernel=7,dilation=1[,causal=..][,rpb=0] (repeatable)")
    parser.add_argument("--models", default="dinat_tiny", help="comma list of registry models for the layer shapes")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--backends", default="fused,unfused", help="comma list: fused, unfused")
    parser.add_argument("--kernels", default="", help="comma list of launch names to keep (default: all)")
    parser.add_argument("--all-configs", action="store_true", help="every autotune candidate, not only the default")
    parser.add_argument("--triton", default="both", choices=("both", "installed", "3.6.0"))
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument("--setup-side", action="store_true", help=f"install triton=={SIDE_TRITON} into {SIDE_DIR}")
    parser.add_argument("--check-setup", action="store_true", help="print the Tritons found and exit")
    parser.add_argument("--out-json", default=None)
    parser.add_argument("--out-md", default=None)
    parser.add_argument("--compile-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--trips-worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _tritons(which: str, setup: bool) -> list[Triton]:
    tritons = []
    if which in ("both", "3.6.0"):
        side = side_triton()
        if side is None and setup:
            install_side_triton()
            side = side_triton()
        if side is None:
            sys.stderr.write(f"kernel_audit: no Triton {SIDE_TRITON} (run `make kernel-audit-setup`, or set "
                             f"{SIDE_ENV}=/path/to/python with triton=={SIDE_TRITON}); auditing the installed "
                             f"Triton only\n")
        else:
            side.query_version()
            tritons.append(side)
    if which in ("both", "installed"):
        installed = installed_triton()
        installed.query_version()
        if not any(t.version == installed.version for t in tritons):
            tritons.append(installed)
    return tritons


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.compile_worker or args.trips_worker:
        job = json.loads(sys.stdin.read())
        (worker_compile if args.compile_worker else worker_trips)(job)
        return 0
    from benchmarks._audit_gpus import DEFAULT_GPU, GPUS

    gpu = GPUS[args.gpu or DEFAULT_GPU]
    tritons = _tritons(args.triton, args.setup_side)
    if args.check_setup:
        for tri in tritons:
            print(f"{tri.label}: triton {tri.version} ({' '.join(tri.python)}"
                  f"{', PYTHONPATH=' + tri.env['PYTHONPATH'] if tri.env.get('PYTHONPATH') else ''})")
        return 0 if tritons else 1
    if args.quick:
        def print_row(row, derived, tri):
            print(quick_line(row, derived, tri.version), flush=True)

        kernels = [k for k in args.kernels.split(",") if k] or QUICK_KERNELS
        dilations = [int(d) for d in args.dilations.split(",") if d]
        audit(quick_problems(dilations), tritons, args.arch, gpu, False, kernels, not args.no_cache, print_row)
        return 0
    problems = full_problems(args)
    kernels = [k for k in args.kernels.split(",") if k]

    def progress(row, derived, tri):
        sys.stderr.write(f"  {tri.version} {_problem_tag(row['problem'])} {row['launch']} {_config_label(row)}: "
                         f"{'ok' if row.get('compiled') else row.get('error', '')[:80]}\n")

    start = time.perf_counter()
    report = audit(problems, tritons, args.arch, gpu, args.all_configs, kernels, not args.no_cache, progress)
    report.update(arch=args.arch, gpu=gpu.to_json(), gpus={k: g.to_json() for k, g in GPUS.items()},
                  wall_s=round(time.perf_counter() - start, 1), tritons=[t.version for t in tritons])
    text = markdown(report)
    if args.out_md:
        Path(args.out_md).write_text(text)
    else:
        print(text)
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(report, indent=1))
    return 0


def full_problems(args) -> list[dict]:
    """The layer shapes of ``--models`` (or each ``--shape``) x each backend, in ``--dtype``."""
    from benchmarks.sweep import model_shapes, parse_shape

    shapes = [parse_shape(spec, args.batch) for spec in args.shape] if args.shape else \
        model_shapes([m for m in args.models.split(",") if m], args.img_size, args.batch)
    problems = []
    for backend in [b for b in args.backends.split(",") if b]:
        for shape in shapes:
            problems.append(dict(spatial=list(shape.spatial), heads=shape.heads, head_dim=shape.head_dim,
                                 kernel_size=list(shape.kernel_size), dilation=list(shape.dilation),
                                 causal=list(shape.causal), rpb=shape.rpb, batch=shape.batch, dtype=args.dtype,
                                 backend=backend))
    return problems


# ---------------------------------------------------------------------------------------------
# Report


def _config_label(row: dict) -> str:
    c = row["config"]
    meta = " ".join(f"{k}={v}" for k, v in c["meta"].items())
    stages = f" s{c['num_stages']}" if c.get("num_stages") is not None else ""
    regs = f" maxnreg={c['maxnreg']}" if c.get("maxnreg") is not None else ""
    return f"{meta} w{c['num_warps']}{stages}{regs}".strip()


def _fmt(value, spec="{:.0f}", missing="–") -> str:
    return missing if value is None else spec.format(value)


def _widths(d: dict) -> str:
    return " ".join(f"{v}x{k}" for k, v in d.items()) if d else "–"


def _problem_label(problem: dict) -> str:
    from benchmarks._audit_launch import Problem

    return Problem.from_json(problem).label + f" ({problem.get('backend', 'fused')})"


GPU_TABLE_HEADER = ("| GPU | SMs | clock GHz | HBM TB/s (datasheet) | HBM TB/s (measured) | dense bf16 TFLOP/s | "
                    "MUFU /SM/clk | issue /SM/clk | regs/SM | warps/SM | smem/SM KB |\n"
                    "|---|---|---|---|---|---|---|---|---|---|---|")


def gpu_table(gpus: dict) -> str:
    rows = [GPU_TABLE_HEADER]
    for g in gpus.values():
        rows.append(f"| {g['name']} | {g['sms']} | {g['clock_ghz']} | {g['hbm_tbs']} | "
                    f"{g['hbm_tbs_measured'] or '–'} | {g['bf16_dense_tflops']} | {g['mufu_per_sm_clk']} | "
                    f"{g['issue_per_sm_clk']} | {g['regs_per_sm']} | {g['max_warps_per_sm']} | {g['smem_per_sm_kb']} |")
    sources = sorted({src for g in gpus.values() for src in g["sources"]})
    return "\n".join(rows) + "\n\nSources:\n" + "\n".join(f"- {src}" for src in sources)


ROW_HEADER = ("| Triton | kernel | config | pick | regs | spill B | smem KB | blocks/SM | warps/SM | SASS/iter | int | "
              "fp32 | MMA | MUFU | LDG (bits) | LDGSTS (bits) | outside loop | iters/prog | issue µs | "
              "roofline µs | MMA µs | MUFU µs | issue/roofline |\n" + "|---" * 23 + "|")


def markdown(report: dict) -> str:
    out = [f"# Kernel audit: sm_{report['arch']}, bounds on {report['gpu']['name']}", ""]
    out.append("| Triton | ptxas | python |\n|---|---|---|")
    for header in report["headers"].values():
        out.append(f"| {header['triton']} | {header['ptxas']} | `{header['python']}` |")
    out += ["", gpu_table(report["gpus"]), ""]
    by_problem: dict = {}
    for row in report["results"]:
        by_problem.setdefault(json.dumps(row["problem"], sort_keys=True), []).append(row)
    for key, rows in by_problem.items():
        out += [f"## {_problem_label(json.loads(key))}", "", ROW_HEADER]
        for row in sorted(rows, key=lambda r: (r.get("order", 0), r["triton"], _config_label(r) if "config" in r else "")):
            if row["kind"] == "error":
                out.append(f"| {row['triton']} | – | – | – | {row['error'][:200]} |" + " |" * 18)
                continue
            if not row.get("compiled"):
                out.append(f"| {row['triton']} | {row['launch']} | {_config_label(row)} | {row['which']} | "
                           f"does not compile: {row.get('error', '')[:160]} |" + " |" * 18)
                continue
            m, main, d = row["sass"]["main_loop"] or {}, row["model"], row["model"]
            cls = m.get("classes", {})
            us = lambda v: _fmt(v * 1e3 if v is not None else None, "{:.1f}")  # noqa: E731
            out.append(
                f"| {row['triton']} | {row['launch']} | {_config_label(row)} | {row['which']} | {row['registers']} | "
                f"{row['spill_store_bytes']} | {row['shared'] / 1024:.1f} | {d.get('blocks_per_sm')} | "
                f"{d.get('warps_per_sm')} | {m.get('total', '–')} | {cls.get('integer', 0)} | {cls.get('fp32', 0)} | "
                f"{cls.get('mma', 0)} | {cls.get('mufu', 0)} | {_widths(m.get('ldg_by_bits', {}))} | "
                f"{_widths(m.get('ldgsts_by_bits', {}))} | {row['sass']['outside_main_loop']} | "
                f"{_fmt(d.get('iterations_per_program'), '{:.1f}')} | {us(d.get('issue_ms'))} | "
                f"{us(d.get('roofline_ms'))} | {us(d.get('mma_ms'))} | {us(d.get('mufu_ms'))} | "
                f"{_fmt(d.get('issue_over_roofline'), '{:.2f}')} |")
        out.append("")
    out.append(f"Audit wall time {report.get('wall_s')} s.")
    return "\n".join(out) + "\n"




if __name__ == "__main__":
    raise SystemExit(main())
