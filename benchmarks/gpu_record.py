"""One command that turns a lent GPU into the whole benchmark record, inside a time budget.

::

    PYTHONPATH=. python -m benchmarks.gpu_record --out DIR [--budget-s 480]
    PYTHONPATH=. python -m benchmarks.gpu_record --smoke --out /tmp/record   # CPU, tiny shapes, < 2 min

Steps, in this order, each time-boxed and written into DIR as soon as it finishes:

1. ``machine``: device, clocks, driver and versions; a >= 1 GiB device-to-device copy (HBM GB/s)
   and a bf16 8192^3 matmul (TFLOP/s), the ceilings the later ratios use.
2. ``correctness``: fused and unfused against the float64 reference at every DiNAT-tiny layer
   shape (bf16 and fp16; output, LSE, dQ, dK, dV, dRPB), head dims 64 and 128, a 3-D video case
   causal in time; every backward run twice and compared bit for bit. Before the checks, the
   Triton configs that the kernels' autotuners will try are compiled by a pool of processes
   (one per spare CPU core) into Triton's on-disk cache, so compile time is paid in parallel once.
3. ``na_bench``: the ``dinat-tiny`` preset at batch 64 through ``benchmarks.na_bench``: fused,
   unfused, compiled FlexAttention-NA with the RPB score_mod, SDPA over all tokens; forward and
   forward+backward; ms, ratios, % of the measured HBM roofline, peak memory.
4. ``models``: ``benchmarks.model_bench``: dinat_tiny vs swin_tiny and convnext_tiny (bf16
   autocast, channels-last, batch 128, inference and training step), and dinat_tiny with
   ``na_backend="unfused"``.
5. ``sweep``: ``benchmarks.sweep`` over the fused kernels on the four DiNAT-tiny stage shapes, as
   many keys as the remaining budget allows; the winners become ``<GPU family>.json``, a candidate
   for ``kernels/tuned/``.

After every step the summary (``record.md``, ready to paste into docs/benchmarks.md), the numbers
(``record.json``) and the plot (``record.png``) are rewritten, so a run killed at any point keeps
every finished step. A step that fails is recorded with its error and the next one runs; a step
whose minimum does not fit the remaining budget is skipped and listed. On a GPU each step runs in
its own process (``--isolate``), killed at the end of its time box, so a hang or a poisoned CUDA
context costs one step, not the record. DIR stays flat and holds at most 8 files.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

# Every file the record writes into DIR (the device tool brings back at most 8 files, flat).
SUMMARY_MD = "record.md"
RECORD_JSON = "record.json"
PLOT_PNG = "record.png"
LOG_TXT = "log.txt"
MAX_FILES = 8


@dataclass(frozen=True)
class StepPlan:
    """A step's time box (``box_s``, None: whatever is left) and the least time worth starting it with."""

    name: str
    title: str
    box_s: Optional[float]
    min_s: float


# On an H100/H200 (estimates, see docs/benchmarks.md "One-command GPU record"): the boxes add up
# to 380 s; the sweep takes what is left of the budget, less the summary's reserve.
GPU_PLAN = (
    StepPlan("machine", "Machine", 25, 10),
    StepPlan("correctness", "Correctness at real sizes", 120, 45),
    StepPlan("na_bench", "NA benchmark (dinat-tiny, batch 64)", 140, 50),
    StepPlan("models", "Model throughput (batch 128, bf16, channels-last)", 95, 40),
    StepPlan("sweep", "Sweep of the fused kernels' configs", None, 45),
)
SMOKE_PLAN = (
    StepPlan("machine", "Machine", 20, 1),
    StepPlan("correctness", "Correctness (smoke: interpreter, tiny shapes)", 60, 5),
    StepPlan("na_bench", "NA benchmark (smoke: tiny shape)", 40, 5),
    StepPlan("models", "Model throughput (smoke: shrunk models, CPU)", 60, 5),
    StepPlan("sweep", "Sweep (smoke: 2 candidates per kernel)", None, 5),
)
STEP_NAMES = tuple(p.name for p in GPU_PLAN)
# Kept back from the budget for the last summary and plot.
SUMMARY_RESERVE_S = {False: 10.0, True: 1.0}
# A step's own process is killed this long after its box ends (it stops cooperatively first).
KILL_GRACE_S = 20.0


# ----------------------------------------------------------------------------------------------
# Context and results


@dataclass
class StepResult:
    name: str
    title: str
    status: str = "ok"  # ok | partial | FAILED | WRONG | skipped | timeout
    seconds: float = 0.0
    reason: str = ""  # why skipped / failed / partial
    data: dict = field(default_factory=dict)
    markdown: str = ""

    def to_json(self) -> dict:
        return dict(name=self.name, title=self.title, status=self.status, seconds=round(self.seconds, 2),
                    reason=self.reason, data=self.data, markdown=self.markdown)

    @classmethod
    def from_json(cls, d: dict) -> "StepResult":
        return cls(d["name"], d["title"], d.get("status", "ok"), d.get("seconds", 0.0), d.get("reason", ""),
                   d.get("data", {}), d.get("markdown", ""))


class Context:
    """What a step needs: where to write, smoke or GPU, its deadline, the machine's ceilings, a log."""

    def __init__(self, out: Path, smoke: bool, log: Callable[[str], None], deadline: float,
                 machine: Optional[dict] = None, workers: Optional[int] = None,
                 save_partial: Optional[Callable[["StepResult"], None]] = None):
        self.out = out
        self.smoke = smoke
        self.log = log
        self.deadline = deadline  # time.time() by which the current step must be done
        self.machine = machine or {}
        self.workers = workers
        self._save_partial = save_partial

    @property
    def device(self):
        import torch

        return torch.device("cpu" if self.smoke else "cuda")

    def left(self) -> float:
        return self.deadline - time.time()

    def fits(self, estimate_s: float) -> bool:
        return self.left() >= estimate_s

    def save_partial(self, result: StepResult) -> None:
        """Hand the parent what this step has so far (kept if the step is killed later)."""
        if self._save_partial is not None:
            self._save_partial(result)


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _md_table(header: list[str], rows: list[list[str]], align: Optional[list[str]] = None) -> list[str]:
    align = align or ["---"] * len(header)
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|",
            *("| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows)]


# ----------------------------------------------------------------------------------------------
# Step 1: machine


def _nvidia_smi() -> dict:
    fields = ("name", "driver_version", "clocks.sm", "clocks.mem", "clocks.max.sm", "clocks.max.mem",
              "power.limit", "temperature.gpu")
    try:
        done = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"nvidia-smi": f"unavailable ({type(exc).__name__})"}
    if done.returncode != 0 or not done.stdout.strip():
        return {"nvidia-smi": f"failed (rc {done.returncode})"}
    values = [v.strip() for v in done.stdout.strip().splitlines()[0].split(",")]
    return {f"smi.{k}": v for k, v in zip(fields, values)}


def step_machine(ctx: Context) -> StepResult:
    import torch

    from benchmarks._common import environment, median_ms

    result = StepResult("machine", "Machine")
    device = ctx.device
    info: dict = {}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = props.name
        info.update(gpu=name, sm_count=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
        info["l2_mib"] = round(getattr(props, "L2_cache_size", 0) / 2**20, 1) or None
        info.update(_nvidia_smi())
    else:
        name = f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
        info.update(gpu=None, cpu_count=os.cpu_count())
    try:
        import timm

        timm_version = timm.__version__
    except ImportError:
        timm_version = "not installed"
    info.update(environment(name, timm=timm_version))
    info["cpu_cores"] = os.cpu_count()

    # Copy bandwidth: bytes read + bytes written per copy, random data (never time zeros).
    copy_bytes = (1 << 30) if device.type == "cuda" else (16 << 20)
    src = torch.randn(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src), device, 25, 200, 5)
    info["copy_gib"] = copy_bytes / 2**30
    info["hbm_gbps"] = 2 * copy_bytes / (copy_ms * 1e-3) / 1e9
    del src, dst
    # Matrix rate: bf16 8192^3 on a GPU (float32 256^3 in the smoke run).
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (256, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    mm_ms = median_ms(lambda: a @ b, device, 25, 200, 5)
    info["matmul"] = f"{str(dtype).replace('torch.', '')} {n}^3"
    info["matmul_tflops"] = 2 * n**3 / (mm_ms * 1e-3) / 1e12
    del a, b
    if device.type == "cuda":
        torch.cuda.empty_cache()
    result.data = info
    ctx.machine = info
    lines = [f"- device: {name}" + (f", {info['sm_count']} SMs, {info['memory_gib']} GiB, L2 {info['l2_mib']} MiB, "
                                    f"compute capability {info['capability']}, CUDA {info['cuda']}"
                                    if device.type == "cuda" else ""),
             f"- versions: torch {info['torch']}, triton {info['triton']}, timm {info['timm']}, "
             f"python {info['python']}; {info['cpu_cores']} CPU cores"]
    smi = {k[4:]: v for k, v in info.items() if k.startswith("smi.")}
    if smi:
        lines.append("- nvidia-smi: " + ", ".join(f"{k} {v}" for k, v in smi.items()))
    how = "`do_bench` median" if device.type == "cuda" else "median of 5"
    lines += [f"- measured {'HBM' if device.type == 'cuda' else 'memory'} bandwidth: **{info['hbm_gbps']:.4g} GB/s** "
              f"(device-to-device copy of {info['copy_gib']:.3g} GiB, read + write bytes, {how})",
              f"- measured matmul rate: **{info['matmul_tflops']:.3g} TFLOP/s** ({info['matmul']}, random data, {how})"]
    result.markdown = "\n".join(lines)
    return result


# ----------------------------------------------------------------------------------------------
# Correctness cases and the parallel pre-compilation of their Triton configs


def _correctness_cases(smoke: bool) -> list:
    """(dtype name, ``NAShape``) pairs: every DiNAT-tiny layer in bf16 and fp16, head dims 64
    and 128, a 3-D video case causal in time (smoke: float32, tiny 1-D and 3-D shapes)."""
    from benchmarks import na_bench
    from benchmarks._common import NAShape

    if smoke:
        return [("float32", NAShape(1, (16,), 1, 16, (3,), (2,), (False,), origin="smoke")),
                ("float32", NAShape(1, (2, 3, 3), 1, 16, (2, 3, 3), (1, 1, 1), (True, False, False), rpb=False,
                                    origin="smoke video"))]
    dinat = na_bench.preset_shapes("dinat-tiny", 8)
    cases = [("bfloat16", s) for s in dinat] + [("float16", s) for s in dinat]
    cases += [("bfloat16", NAShape(8, (28, 28), 4, 64, (7, 7), (4, 4), (False, False), origin="D64")),
              ("bfloat16", NAShape(8, (14, 14), 4, 128, (7, 7), (2, 2), (False, False), origin="D128")),
              ("bfloat16", NAShape(2, (16, 32, 32), 4, 32, (3, 7, 7), (1, 1, 1), (True, False, False), rpb=False,
                                   origin="video"))]
    return cases


def _tuned_kernels() -> dict:
    """Tuning name -> the ``TunedKernel`` (its ``configs`` are what its autotuner tries)."""
    from dinat.kernels import tuning
    from dinat.kernels.fused import backward, forward
    from dinat.kernels.unfused import av_kernels, qk_kernels

    found = {}
    for module in (forward, backward, qk_kernels, av_kernels):
        for obj in vars(module).values():
            if isinstance(obj, tuning.TunedKernel):
                found[obj.tuning_name] = obj
    return found


def pinned_table(shape, dtype_name: str, family: str, choice):
    """A ``kernels.tuning.Table`` that launches every tunable kernel of ``family`` on ``shape`` with
    one config: ``choice`` is an int (the i-th of each kernel's own autotune configs) or a
    (block, num_warps, num_stages) tuple. Under it nothing autotunes: one config compiles."""
    from benchmarks import sweep
    from dinat.kernels import tuning

    kernels_by_name = _tuned_kernels()
    names = sweep.FAMILIES[family]
    chosen = {}
    for name in names:
        if isinstance(choice, int):
            configs = kernels_by_name[name].configs
            chosen[name] = tuning.LaunchConfig.from_triton(configs[choice % len(configs)])
        else:
            block, warps, stages = choice
            chosen[name] = tuning.LaunchConfig(((tuning.TUNABLE[name][0], block),), warps, stages)
    keys = sweep.expected_keys(shape, dtype_name, names)
    return tuning.Table("<gpu_record pinned>", "any", (), {key: chosen[key.kernel] for key in keys})


def precompile_job(job: dict) -> tuple[str, float, str, int]:
    """Pool worker: compile what the real run will launch, into the on-disk caches (Triton's, and
    Inductor's for FlexAttention), for exactly the specialisations it will launch.

    ``job``: label, family ("fused" / "unfused": the NA forward+backward with every tunable kernel
    pinned by ``pinned_table`` to ``job['config']``; "flex": na_bench's compiled FlexAttention-NA
    forward and forward+backward), dtype, rpb_dtype (None: the q dtype), shapes (``NAShape.to_json``
    dicts), device (default cuda). Returns (label, seconds, error or "", launches that missed the
    pinned table: 0 when the pinning worked)."""
    started = time.perf_counter()
    # One process per core already: no Inductor compile pool of its own in each of them.
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    try:
        import torch

        from benchmarks import na_bench
        from benchmarks._common import NAShape
        from dinat.kernels import tuning

        dtype = getattr(torch, job["dtype"])
        rpb_dtype = getattr(torch, job["rpb_dtype"]) if job.get("rpb_dtype") else dtype
        device = torch.device(job.get("device", "cuda"))
        misses = []
        observe = lambda name, key, config: misses.append(key) if config is None else None  # noqa: E731
        for fields in job["shapes"]:
            shape = NAShape.from_json(fields)
            q, k, v, rpb, grad = na_bench.make_inputs(shape, device, dtype, rpb_dtype=rpb_dtype)
            if job["family"] == "flex":
                torch._dynamo.reset()  # as na_bench does per shape
                flex = na_bench.build_candidate("flex", shape, device, None)
                na_bench.step(flex, "fwd", q, k, v, rpb, grad)()
                leaves = na_bench._leaves((q, k, v, rpb))
                na_bench.step(flex, "fwdbwd", *leaves, grad)()
            else:
                leaves = [t.requires_grad_() for t in (q, k, v, rpb) if t is not None]
                table = pinned_table(shape, job["dtype"], job["family"], job["config"])
                with tuning.use_table(table), tuning.watching_choices(observe):
                    out = na_bench.NA_BY_RANK[len(shape.spatial)](q, k, v, shape.kernel_size, shape.dilation,
                                                                   shape.causal, rpb=rpb, backend=job["family"])
                    torch.autograd.grad(out, leaves, grad)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return job["label"], time.perf_counter() - started, "", len(misses)
    except Exception as exc:  # noqa: BLE001 -- a config that does not compile: the autotuner skips it too
        return job["label"], time.perf_counter() - started, f"{type(exc).__name__}: {str(exc)[:200]}", 0


def precompile(jobs: list[dict], workers: int, seconds: float, log) -> dict:
    """Run ``jobs`` on a pool of ``workers`` processes for at most ``seconds``; what is not done
    by then is dropped (the real run then compiles it itself). Returns counts for the record."""
    import multiprocessing

    if not jobs or workers < 1 or seconds <= 0:
        return dict(jobs=len(jobs), done=0, failed=0, workers=workers, seconds=0.0, finished=[], note="not run")
    started = time.perf_counter()
    done, failed, misses, finished = 0, [], 0, []
    pool = multiprocessing.get_context("spawn").Pool(min(workers, len(jobs)))
    try:
        pending = pool.imap_unordered(precompile_job, jobs)
        while True:
            remaining = seconds - (time.perf_counter() - started)
            if remaining <= 0:
                break
            try:
                label, took, error, missed = pending.next(timeout=remaining)
            except StopIteration:
                break
            except multiprocessing.TimeoutError:
                break
            done += 1
            misses += missed
            if error:
                failed.append(f"{label}: {error}")
            else:
                finished.append(label)
            if done % max(1, len(jobs) // 8) == 0 or done == len(jobs):
                log(f"    precompiled {done}/{len(jobs)} jobs [{time.perf_counter() - started:.0f}s]")
    finally:
        pool.terminate()  # unfinished jobs: their configs compile later, in the step that needs them
        pool.join()
    return dict(jobs=len(jobs), done=done, failed=len(failed), failures=failed[:5], table_misses=misses,
                finished=finished,
                workers=min(workers, len(jobs)), seconds=round(time.perf_counter() - started, 1))


def _default_workers() -> int:
    return max(1, min(14, (os.cpu_count() or 2) - 2))


# ----------------------------------------------------------------------------------------------
# Step 2: correctness


def _errors(got, want, tol: float) -> tuple[float, float, bool]:
    """(max abs error, ||got - want|| / ||want||, within ``tol * max(1, max|want|)``); NaN fails."""
    diff = got.double() - want.double()
    max_err = diff.abs().max().item() if diff.numel() else 0.0
    norm = want.double().norm().item()
    rel = diff.norm().item() / norm if norm > 0 else diff.norm().item()
    ok = math.isfinite(max_err) and max_err <= tol * max(1.0, want.abs().max().item() if want.numel() else 0.0)
    return max_err, rel, ok


def check_case(shape, dtype_name: str, backend: str, device) -> dict:
    """One backend on one shape against the float64 reference: output and LSE (forward), the
    gradients of q, k, v and the RPB (backward), and whether a second backward is bit-identical."""
    import torch

    from benchmarks import na_bench

    dtype = getattr(torch, dtype_name)
    na = na_bench.NA_BY_RANK[len(shape.spatial)]
    geometry = (shape.kernel_size, shape.dilation, shape.causal)
    # The RPB in float32, as a model's parameter under mixed precision.
    q, k, v, rpb, grad = na_bench.make_inputs(shape, device, dtype, seed=1, rpb_dtype=torch.float32)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v, rpb) if t is not None]
    out_ref, lse_ref = na(*leaves64[:3], *geometry, rpb=leaves64[3] if rpb is not None else None,
                          backend="reference", return_lse=True)
    refs = {"out": out_ref.detach(), "lse": lse_ref.detach()}
    names = ["dq", "dk", "dv"] + (["drpb"] if rpb is not None else [])
    refs.update(zip(names, torch.autograd.grad(out_ref, leaves64, grad.double())))
    del out_ref, lse_ref, leaves64

    with torch.no_grad():
        out, lse = na(q, k, v, *geometry, rpb=rpb, backend=backend, return_lse=True)
    got = {"out": out, "lse": lse}
    leaves = [t.detach().requires_grad_() for t in (q, k, v, rpb) if t is not None]
    runs = []
    for _ in range(2):  # the same backward twice: a deterministic kernel gives the same bits
        out2 = na(*leaves[:3], *geometry, rpb=leaves[3] if rpb is not None else None, backend=backend)
        runs.append(torch.autograd.grad(out2, leaves, grad))
    got.update(zip(names, runs[0]))
    tol = na_bench.TOLERANCE[dtype]
    tensors = {}
    for name, want in refs.items():
        max_err, rel, ok = _errors(got[name], want, tol)
        tensors[name] = dict(max_err=max_err, rel_err=rel, ok=ok)
    deterministic = all(torch.equal(a, b) for a, b in zip(*runs))
    return dict(tensors=tensors, ok=all(t["ok"] for t in tensors.values()), deterministic=deterministic,
                tolerance=tol)


# A batch element past int32 offsets (issue 17): 2048x2048 tokens x 5 heads x 128 = 2.7e9 elements
# per tensor (5.4 GB in bf16), k=7, no RPB. GPU memory it takes (fused forward+backward: q, k, v,
# out, dout, dq, dk, dv) and about what it costs with one pinned config compiled.
HUGE = dict(side=2048, heads=5, head_dim=128, kernel=7, crop=48)
HUGE_MEMORY_GB = {"fused": 48, "unfused": 34}
HUGE_ESTIMATE_S = {"fused": 60.0, "unfused": 40.0}


def check_past_int32(backend: str, device, side: int = HUGE["side"], heads: int = HUGE["heads"],
                     head_dim: int = HUGE["head_dim"], kernel: int = HUGE["kernel"], crop: int = HUGE["crop"],
                     dtype_name: str = "bfloat16") -> dict:
    """One batch element of more than 2^31 elements, through ``backend``'s 64-bit specialisation.

    NA is local: the bottom-right corner of the map (the highest offsets) must equal the same
    corner of a small crop of it, where windows are the same for queries at least ``kernel - 1``
    tokens inside the crop's edge. Forward, and for "fused" dQ (the unfused backward's dRPB-free
    kernels are the forward's)."""
    import torch

    from dinat.kernels import na2d, offsets

    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, side, side, heads, head_dim, device=device, dtype=getattr(torch, dtype_name),
                           generator=gen) for _ in range(3))
    assert offsets.int64_offsets(q), "the problem does not need 64-bit offsets"
    keep = crop - 2 * (kernel - 1)
    pieces = [x[:, -crop:, -crop:].contiguous() for x in (q, k, v)]
    errors = {}
    with_grad = backend == "fused"
    q.requires_grad_(with_grad)
    out = na2d(q, k, v, kernel, backend=backend)
    piece = pieces[0].requires_grad_(with_grad)
    want = na2d(piece, *pieces[1:], kernel, backend=backend)
    pairs = [("out", out[:, -keep:, -keep:], want[:, -keep:, -keep:])]
    if with_grad:
        (dq,) = torch.autograd.grad(out, q, torch.ones_like(out))
        (want_dq,) = torch.autograd.grad(want, piece, torch.ones_like(want))
        pairs.append(("dq", dq[:, -keep:, -keep:], want_dq[:, -keep:, -keep:]))
    for name, got, ref in pairs:
        errors[name] = (got.float() - ref.float()).abs().max().item()
    # The crop runs the same kernels with 32-bit offsets: the corner agrees to rounding.
    return dict(elements=q.numel(), max_abs_err=errors, ok=all(e <= 2e-2 for e in errors.values()))


def _check_past_int32_rows(ctx: "Context", skipped: list) -> list[dict]:
    """``check_past_int32`` per backend where GPU memory and the time box allow (one pinned config;
    on a GPU only). Optional: a backend that does not fit is listed in ``skipped`` with why, and
    does not make the step partial."""
    import torch

    from benchmarks._common import describe_error, free_memory
    from benchmarks._common import NAShape
    from dinat.kernels import tuning

    rows = []
    device = ctx.device
    if device.type != "cuda":  # the smoke record: nothing past int32 fits a CPU run
        return rows
    shape, crop = (NAShape(1, (side,) * 2, HUGE["heads"], HUGE["head_dim"], (HUGE["kernel"],) * 2, (1, 1),
                           (False, False), rpb=False, origin="past int32") for side in (HUGE["side"], HUGE["crop"]))
    for backend in ("fused", "unfused"):
        label = f"{shape.bench_label} bfloat16 {backend}"
        free_gb = torch.cuda.mem_get_info(device)[0] / 2**30
        if free_gb < HUGE_MEMORY_GB[backend] or not ctx.fits(HUGE_ESTIMATE_S[backend]):
            skipped.append(f"{label} (needs {HUGE_MEMORY_GB[backend]} GB and ~{HUGE_ESTIMATE_S[backend]:.0f} s; "
                           f"{free_gb:.0f} GB free, {max(ctx.left(), 0):.0f} s left)")
            continue
        started = time.perf_counter()
        row = dict(shape=shape.bench_label, dtype="bfloat16", backend=backend, config="pinned #0")
        try:
            tables = [pinned_table(x, "bfloat16", backend, 0) for x in (shape, crop)]
            pinned = tuning.Table("<gpu_record pinned>", "any", (), {**tables[0].winners, **tables[1].winners})
            with tuning.use_table(pinned):
                found = check_past_int32(backend, device)
            row.update(ok=found["ok"], deterministic=None, past_int32=found)
        except Exception as exc:  # noqa: BLE001 -- recorded loudly
            row.update(ok=False, deterministic=None, error=describe_error(exc))
        free_memory(device)
        row["seconds"] = round(time.perf_counter() - started, 2)
        ctx.log(f"  {label:<56} {'ok' if row['ok'] else 'WRONG'} {row.get('past_int32', row.get('error'))} "
                f"[{row['seconds']:.1f}s]")
        rows.append(row)
    return rows


def autotune_configs() -> int:
    """How many configs the kernels' autotuners try (6 on a GPU; 1 under the interpreter)."""
    return max(len(kernel.configs) for kernel in _tuned_kernels().values())


def _job_label(family: str, dtype_name: str, group: str, index: int) -> str:
    return f"{family} {dtype_name} {group} config#{index}"


def _case_group(shape) -> str:
    return shape.origin.split()[0]


def _precompile_jobs_for(cases: list, rpb_dtype: str) -> list[dict]:
    """Every (family, dtype, shape group, autotune config) of the cases, and the FlexAttention-NA
    compiles of the benchmark, most needed first: the bf16 DiNAT-tiny layers (which the benchmark
    and the models launch too), then Flex, then the rest of the checks."""
    groups: dict = {}
    for dtype_name, shape in cases:
        groups.setdefault((dtype_name, _case_group(shape)), []).append(shape)
    bench = _bench_shapes(False)
    # The benchmark's and the models' batch (64 / 128) launches the same specialisations; the
    # batch-64 layers are added so that even a batch-dependent one is compiled here.
    groups.setdefault(("bfloat16", "dinat-t"), []).extend(bench)
    first, later = [], []
    for index in range(autotune_configs()):
        for family in ("fused", "unfused"):
            for (dtype_name, group), shapes in groups.items():
                job = dict(label=_job_label(family, dtype_name, group, index), family=family, dtype=dtype_name,
                           rpb_dtype=rpb_dtype, config=index, shapes=[s.to_json() for s in shapes])
                (first if (dtype_name, group) == ("bfloat16", "dinat-t") else later).append(job)
    flex = [dict(label=f"flex {s.bench_label}", family="flex", dtype="bfloat16", rpb_dtype="float32",
                 shapes=[s.to_json()]) for s in bench]
    return first + flex + later


def _check_config(finished: Optional[set], family: str, dtype_name: str, shape):
    """None: let the autotuner run (its configs are compiled, or this is not a GPU run); else the
    index of one compiled config to pin, so that a check never waits for a serial autotune."""
    if finished is None:
        return None
    count = autotune_configs()
    done = [i for i in range(count) if _job_label(family, dtype_name, _case_group(shape), i) in finished]
    if len(done) == count:
        return None
    return done[0] if done else 0


def step_correctness(ctx: Context) -> StepResult:
    from benchmarks._common import describe_error, free_memory
    from dinat.kernels import tuning

    result = StepResult("correctness", "Correctness at real sizes")
    device = ctx.device
    cases = _correctness_cases(ctx.smoke)
    backends = ["fused", "unfused"]
    if device.type == "cuda":
        jobs = _precompile_jobs_for(cases, "float32")
        seconds = min(75.0, 0.6 * ctx.left())
        workers = ctx.workers or _default_workers()
        ctx.log(f"  precompiling {len(jobs)} (family, dtype, shapes, config) jobs on {workers} processes, "
                f"<= {seconds:.0f}s")
        result.data["precompile"] = precompile(jobs, workers, seconds, ctx.log)
        finished = set(result.data["precompile"].pop("finished"))
    else:
        finished = None
    rows, untested = [], []
    # The first check of a (backend, dtype, shape group) also autotunes; the next ones of the group
    # take about as long as the last one did.
    first_checks, last_check = [1.0], {}
    for dtype_name, shape in cases:
        for backend in backends:
            label = f"{shape.bench_label} {dtype_name} {backend}"
            group = (backend, dtype_name, _case_group(shape))
            if not ctx.fits(1.2 * last_check.get(group, max(first_checks))):
                untested.append(label)
                continue
            started = time.perf_counter()
            row = dict(shape=shape.bench_label, dtype=dtype_name, backend=backend)
            pin = _check_config(finished, backend, dtype_name, shape)
            row["config"] = "autotuned" if pin is None else f"pinned #{pin}"
            try:
                if pin is None:
                    row.update(check_case(shape, dtype_name, backend, device))
                else:
                    with tuning.use_table(pinned_table(shape, dtype_name, backend, pin)):
                        row.update(check_case(shape, dtype_name, backend, device))
            except Exception as exc:  # noqa: BLE001 -- recorded loudly, the other cases still run
                row.update(ok=False, deterministic=None, error=describe_error(exc))
            free_memory(device)
            row["seconds"] = round(time.perf_counter() - started, 2)
            if group not in last_check:
                first_checks.append(row["seconds"])
            last_check[group] = row["seconds"]
            rows.append(row)
            worst = max((t["rel_err"] for t in row.get("tensors", {}).values()), default=None)
            ctx.log(f"  {label:<56} {'ok' if row['ok'] else 'WRONG' if 'error' not in row else 'ERROR'}"
                    f"{'' if row.get('deterministic') in (True, None) else ' NOT DETERMINISTIC'}"
                    f" worst rel err {_fmt(worst, '.2e')} [{row['seconds']:.1f}s]")
            result.data.update(rows=rows, untested=untested)
            result.markdown = _correctness_markdown(result.data)
            ctx.save_partial(result)
    skipped = []
    rows += _check_past_int32_rows(ctx, skipped)
    result.data.update(rows=rows, untested=untested, past_int32_skipped=skipped)
    wrong = [r for r in rows if not r["ok"] or r.get("deterministic") is False]
    if wrong:
        result.status = "WRONG"
        result.reason = f"{len(wrong)} of {len(rows)} checks failed: " + "; ".join(
            f"{r['shape']} {r['dtype']} {r['backend']}" for r in wrong[:6])
    elif untested:
        result.status, result.reason = "partial", f"{len(untested)} checks not run (time box)"
    result.markdown = _correctness_markdown(result.data)
    return result


def _correctness_markdown(data: dict) -> str:
    rows = data.get("rows", [])
    names = ["out", "lse", "dq", "dk", "dv", "drpb"]
    table = []
    for r in rows:
        tensors = r.get("tensors", {})
        cells = [f"{tensors[n]['rel_err']:.1e}" + ("" if tensors[n]["ok"] else " FAIL") if n in tensors else "-"
                 for n in names]
        verdict = "ok" if r["ok"] else ("ERROR" if "error" in r else "**WRONG**")
        det = {True: "yes", False: "**NO**", None: "-"}[r.get("deterministic")]
        if "past_int32" in r:  # max abs error of the corner against a crop (check_past_int32)
            cells = [f"{r['past_int32']['max_abs_err'][n]:.1e} abs" if n in r["past_int32"]["max_abs_err"] else "-"
                     for n in names]
        table.append([r["shape"], r["dtype"], r["backend"], r.get("config", "-"), *cells, det, verdict])
    lines = ["Relative error ||x - ref|| / ||ref|| against the float64 reference (same inputs; RPB in float32); "
             "FAIL when the max abs error exceeds tol x max(1, max|ref|) (bf16 6e-2, fp16 2e-2, fp32 1e-2). "
             "Deterministic: a second backward gives the same bits. Config: the kernels' own autotuner, or one "
             "pinned config where the pre-compilation did not finish all of them in time. \"past int32\": one batch "
             "element of 2.7e9 elements (64-bit offsets), its corner against a crop of the map (max abs error).", ""]
    lines += _md_table(["shape", "dtype", "backend", "config", *names, "deterministic", "verdict"], table)
    errors = [f"- {r['shape']} {r['dtype']} {r['backend']}: {r['error']}" for r in rows if "error" in r]
    if errors:
        lines += ["", *errors]
    if data.get("untested"):
        lines += ["", f"Not checked (time box): {', '.join(data['untested'])}"]
    if data.get("past_int32_skipped"):
        lines += ["", f"Optional past-int32 checks not run: {'; '.join(data['past_int32_skipped'])}"]
    lines += _precompile_note(data)
    return "\n".join(lines)


def _precompile_note(data: dict) -> list[str]:
    pre = data.get("precompile")
    if not pre or not pre.get("jobs"):
        return []
    return ["", f"Pre-compilation of the Triton configs: {pre['done']} of {pre['jobs']} jobs on {pre['workers']} "
                f"processes in {pre['seconds']} s ({pre['failed']} failed, {pre.get('table_misses', 0)} launches "
                "missed the pinned table)"]


# ----------------------------------------------------------------------------------------------
# Step 3: NA benchmark


def _min_bytes(shape, mode: str, element_size: int) -> int:
    """The fewest HBM bytes an NA call can move: q, k, v read and out written (+ the float32
    LSE); the backward reads q, k, v, out, dout, LSE and writes dq, dk, dv. The RPB is negligible."""
    rows = shape.batch * shape.tokens * shape.heads
    fwd = rows * shape.head_dim * element_size * 4 + rows * 4
    return fwd if mode == "fwd" else fwd + rows * shape.head_dim * element_size * 8 + rows * 4


def _bench_shapes(smoke: bool) -> list:
    from benchmarks import na_bench
    from benchmarks._common import NAShape

    if smoke:
        return [NAShape(1, (16,), 1, 16, (3,), (2,), (False,), origin="smoke")]
    shapes = na_bench.preset_shapes("dinat-tiny", 64)
    # Each stage's dilated layer first: a time box that ends early still covers every stage.
    return sorted(shapes, key=lambda s: (s.dilation[0] == 1 and s.spatial[0] != 7, shapes.index(s)))


def step_na_bench(ctx: Context) -> StepResult:
    import torch

    from benchmarks import na_bench

    result = StepResult("na_bench", "NA benchmark")
    device = ctx.device
    dtype = torch.float32 if ctx.smoke else torch.bfloat16
    available = set(na_bench.available_na_backends(device)) | set(na_bench.ALTERNATIVES)
    # The smoke run leaves out the unfused kernels (the slowest under the interpreter; step 2 runs them).
    wanted = ["reference", "fused", "flex", "sdpa"] if ctx.smoke else ["fused", "unfused", "flex", "sdpa"]
    candidates = [c for c in wanted if c in available]
    baseline = "reference" if ctx.smoke else "flex"
    argv = ["--device", device.type, "--dtype", str(dtype).replace("torch.", ""), "--baseline", baseline,
            "--candidates", ",".join(candidates), "--check", "first"]
    argv += ["--repeats", "1"] if ctx.smoke else ["--warmup-ms", "10", "--rep-ms", "50"]
    args, _ = na_bench.parse_args(argv)
    shapes = _bench_shapes(ctx.smoke)
    rows, skipped = [], []
    last = 0.0
    timing = "`do_bench` median" if device.type == "cuda" else "`perf_counter`, 1 call after 1 warm-up"
    result.data.update(timing=timing,
                       dtype=str(dtype).replace("torch.", ""), candidates=candidates, baseline=baseline,
                       not_available=[c for c in wanted if c not in available], rows=rows, skipped=skipped)
    for shape in shapes:
        # Every shape compiles its own Flex graphs; the first one also pays one-time set-up, so the
        # estimate is the last shape's time.
        if rows and not ctx.fits(1.2 * last):
            skipped.append(shape.bench_label)
            continue
        started = time.perf_counter()
        # One shape per call: every shape is checked against the reference (--check first).
        for r in na_bench.run_benchmark([shape], candidates, ["fwd", "fwdbwd"], device, dtype, args, log=ctx.log):
            rows.append(_bench_row(r, ctx.machine, dtype))
        last = time.perf_counter() - started
        _add_vs_sdpa(rows)
        result.markdown = _na_bench_markdown(result.data, ctx.machine)
        ctx.save_partial(result)
    _add_vs_sdpa(rows)
    wrong = [r for r in rows if r["status"] == "wrong"]
    if wrong:
        result.status = "WRONG"
        result.reason = "; ".join(f"{r['candidate']} {r['shape']} {r['mode']}: {r['note']}" for r in wrong[:4])
    elif skipped:
        result.status, result.reason = "partial", f"{len(skipped)} shapes not run (time box)"
    result.markdown = _na_bench_markdown(result.data, ctx.machine)
    return result


def _bench_row(r, machine: dict, dtype) -> dict:
    import torch

    element_size = torch.empty((), dtype=dtype).element_size()
    row = dict(shape=r.shape.bench_label, mode=r.mode, candidate=r.candidate, ms=r.ms, status=r.status, note=r.note,
               vs_baseline=r.speedup, tflops=r.tflops, peak_mib=r.peak_mib, max_err=r.max_err, err_ok=r.err_ok,
               block_fraction=r.block_fraction, min_bytes=_min_bytes(r.shape, r.mode, element_size))
    gbps = machine.get("hbm_gbps")
    if r.ms and gbps and r.candidate != "sdpa":
        row["roofline_pct"] = 100.0 * (row["min_bytes"] / (gbps * 1e9)) / (r.ms * 1e-3)
    return row


def _add_vs_sdpa(rows: list[dict]) -> None:
    sdpa = {(r["shape"], r["mode"]): r["ms"] for r in rows if r["candidate"] == "sdpa" and r["ms"]}
    for r in rows:
        s = sdpa.get((r["shape"], r["mode"]))
        r["vs_sdpa"] = s / r["ms"] if s and r["ms"] else None


def _na_bench_markdown(data: dict, machine: dict) -> str:
    from benchmarks.na_bench import MODES

    baseline = data["baseline"]
    lines = [f"{data['dtype']} q/k/v, float32 RPB; candidates {', '.join(data['candidates'])}"
             + (f" (not available: {', '.join(data['not_available'])})" if data["not_available"] else "")
             + f"; {data.get('timing', '`do_bench` median')}; "
             f"vs {baseline} / vs sdpa = their ms / this ms (> 1 is faster); "
             f"% roofline = the fewest bytes (q, k, v, out, LSE; backward: + q, k, v, out, dout, LSE, dq, dk, dv) "
             f"at the measured {_fmt(machine.get('hbm_gbps'), '.0f', '?')} GB/s over the measured time; "
             "max err: against the float32 reference, output and every gradient.", ""]
    table = []
    for r in data["rows"]:
        ms = _fmt(r["ms"], ".3f") if r["ms"] is not None else f"{r['status']}"
        err = "n/a" if r["candidate"] == "sdpa" else (
            "-" if r["max_err"] is None else f"{r['max_err']:.1e}" + ("" if r["err_ok"] else " FAIL"))
        table.append([r["shape"], MODES[r["mode"]], r["candidate"], ms,
                      _fmt(r["vs_baseline"], ".2f") + ("x" if r["vs_baseline"] else ""),
                      _fmt(r.get("vs_sdpa"), ".2f") + ("x" if r.get("vs_sdpa") else ""),
                      _fmt(r.get("roofline_pct"), ".0f") + ("%" if r.get("roofline_pct") is not None else ""),
                      _fmt(r["tflops"], ".3g"), _fmt(r["peak_mib"], ".0f", "n/a"), err])
    lines += _md_table(["shape", "mode", "candidate", "ms", f"vs {baseline}", "vs sdpa", "% HBM roofline",
                        "TFLOP/s", "peak MiB", "max err"], table,
                       ["---", "---", "---", "---:", "---:", "---:", "---:", "---:", "---:", "---:"])
    notes = [f"- {r['candidate']}, {r['shape']}, {MODES[r['mode']]}: {r['status']}: {r['note']}"
             for r in data["rows"] if r["status"] and r["note"]]
    if notes:
        lines += ["", *notes]
    if data.get("skipped"):
        lines += ["", f"Not run (time box): {', '.join(data['skipped'])}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Step 4: model throughput


# Smoke: the three architectures shrunk to one narrow block per level, at 32 px.
SMOKE_MODEL_OVERRIDES = {
    "dinat_tiny": dict(embed_dim=32, depths=(1, 1, 1, 1)),
    "swin_tiny": dict(embed_dim=48, depths=(1, 1, 1, 1)),
    "convnext_tiny": dict(dims=(16, 32, 64, 128), depths=(1, 1, 1, 1)),
}
# The second dinat_tiny row: the unfused kernels on a GPU; the reference in the smoke run (the
# unfused kernels under the interpreter would take minutes in a whole model).
SECOND_NA_BACKEND = {False: "unfused", True: "reference"}


def step_models(ctx: Context) -> StepResult:
    import torch

    from benchmarks import model_bench

    result = StepResult("models", "Model throughput")
    device = ctx.device
    names = ["dinat_tiny", "swin_tiny", "convnext_tiny"]
    if ctx.smoke:
        common = ["--tiny", "--warmup", "0", "--image-size", "32"]
        overrides = SMOKE_MODEL_OVERRIDES
    else:
        common = ["--batch", "128", "--warmup", "5", "--iters", "10", "--repeats", "3", "--precision", "bf16"]
        overrides = None
        torch.backends.cudnn.benchmark = True  # as model_bench's main does
    args, _ = model_bench.parse_args([*common, "--models", ",".join(names), "--baseline", "swin_tiny"])
    dtype = model_bench.PRECISIONS[args.precision]
    reports: list = []
    result.data.update(batch=args.batch[0], image_size=args.image_size, precision=args.precision,
                       channels_last=args.channels_last, na_backend=model_bench.na_backend_used(None, device),
                       rows=[], skipped=[])

    def publish(done_reports):
        result.data["rows"] = _model_rows(done_reports)
        result.markdown = _models_markdown(result.data)
        ctx.save_partial(result)

    slowest = 0.0
    plan = [(name, None) for name in names] + [("dinat_tiny", SECOND_NA_BACKEND[ctx.smoke])]
    for name, backend in plan:
        label = name if backend is None else f"{name} ({backend})"
        if reports and not ctx.fits(1.2 * slowest):
            result.data["skipped"].append(label)
            continue
        started = time.perf_counter()
        run_args, _ = model_bench.parse_args([*common, "--models", name, "--baseline", name]
                                             + (["--na-backend", backend] if backend else []))
        done = model_bench.run_benchmark([name], run_args.batch, ["infer", "train"], device, dtype, run_args,
                                         overrides, log=ctx.log)
        done[0].name = label
        reports += done
        model_bench.add_ratios(reports, "swin_tiny")
        slowest = max(slowest, time.perf_counter() - started)
        publish(reports)
    model_bench.add_ratios(reports, "swin_tiny")
    publish(reports)
    failed = [r for r in result.data["rows"] if r["status"]]
    if failed:
        result.status = "partial"
        result.reason = "; ".join(f"{r['model']} {r['mode']}: {r['status']}" for r in failed[:4])
    elif result.data["skipped"]:
        result.status, result.reason = "partial", f"not run (time box): {', '.join(result.data['skipped'])}"
    return result


def _model_rows(reports) -> list[dict]:
    return [dict(model=r.name, params_m=r.params_m, mode=m.mode, batch=m.batch, img_per_s=m.img_per_s,
                 vs_swin=m.vs_baseline, peak_mib=m.peak_mib, status=m.status, note=m.note)
            for r in reports for m in r.measurements]


def _models_markdown(data: dict) -> str:
    from benchmarks.model_bench import MODES

    lines = [f"{data['image_size']} px, batch {data['batch']}, {data['precision']} "
             f"({'autocast, float32 weights' if data['precision'] == 'bf16' else 'float32'}), "
             f"{'channels-last' if data['channels_last'] else 'NCHW'}; NA backend of dinat_tiny: {data['na_backend']} "
             "(the row `dinat_tiny (backend)`: `na_backend=backend`); eager models; img/s = median window; "
             "vs swin_tiny: img/s ratio, same run.", ""]
    table = [[r["model"], _fmt(r["params_m"], ".1f"), MODES[r["mode"]],
              _fmt(r["img_per_s"], ".1f") if r["img_per_s"] is not None else r["status"],
              _fmt(r["vs_swin"], ".2f") + ("x" if r["vs_swin"] else ""), _fmt(r["peak_mib"], ".0f", "n/a")]
             for r in data["rows"]]
    lines += _md_table(["model", "params (M)", "mode", "img/s", "vs swin_tiny", "peak MiB"], table,
                       ["---", "---:", "---", "---:", "---:", "---:"])
    notes = [f"- {r['model']} {MODES[r['mode']]}: {r['status']}: {r['note']}" for r in data["rows"] if r["status"]]
    if notes:
        lines += ["", *notes]
    if data.get("skipped"):
        lines += ["", f"Not run (time box): {', '.join(data['skipped'])}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Step 5: sweep


# What the record's sweep tries per fused kernel (a subset of sweep.candidate_configs: 12 of 48,
# the six defaults among them), so that a 1-2 minute box can cover the four stages.
SWEEP_BLOCKS, SWEEP_WARPS, SWEEP_STAGES = (32, 64, 128), (4, 8), (2, 3)


def _sweep_candidates(kernel_name: str) -> list:
    from benchmarks import sweep

    return [c for c in sweep.candidate_configs(kernel_name, False)
            if c.kwargs[next(iter(c.kwargs))] in SWEEP_BLOCKS and c.num_warps in SWEEP_WARPS
            and c.num_stages in SWEEP_STAGES]


def _sweep_shapes(smoke: bool) -> list:
    """The four DiNAT-tiny stages at 224 px, each by its most dilated layer (from the models registry)."""
    from benchmarks import sweep

    if smoke:
        return sweep.smoke_shapes()
    by_size: dict = {}
    for shape in sweep.model_shapes(["dinat_tiny"], 224, 32):
        best = by_size.get(shape.spatial)
        if best is None or shape.dilation[0] > best.dilation[0]:
            by_size[shape.spatial] = shape
    return list(by_size.values())


def step_sweep(ctx: Context) -> StepResult:
    import torch

    from benchmarks import sweep
    from dinat.kernels import tuning

    result = StepResult("sweep", "Sweep of the fused kernels' configs")
    device = ctx.device
    shapes = _sweep_shapes(ctx.smoke)
    dtype_name = "float32" if ctx.smoke else "bfloat16"
    names = list(sweep.FAMILIES["fused"])
    options = sweep.SweepOptions(shapes=shapes, dtypes=[dtype_name], kernel_names=names, smoke=ctx.smoke,
                                 warmup_ms=10, rep_ms=40, device=device.type, log=ctx.log,
                                 candidates=None if ctx.smoke else _sweep_candidates)
    family = tuning.gpu_family(torch.cuda.get_device_name(device)) if device.type == "cuda" else "cpu"
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (triton interpreter)"
    if device.type == "cuda":
        configs = sorted({(c.kwargs[next(iter(c.kwargs))], c.num_warps, c.num_stages)
                          for c in _sweep_candidates("fused_fwd")})
        # The sweep's inputs: the RPB in the q dtype (sweep._inputs), so those specialisations.
        jobs = [dict(label=f"sweep {config}", family="fused", dtype=dtype_name, rpb_dtype=None, config=config,
                     shapes=[s.to_json() for s in shapes]) for config in configs]
        seconds = min(60.0, 0.45 * ctx.left())
        workers = ctx.workers or _default_workers()
        ctx.log(f"  precompiling {len(jobs)} candidate configs x {len(shapes)} shapes on {workers} processes, "
                f"<= {seconds:.0f}s")
        result.data["precompile"] = precompile(jobs, workers, seconds, ctx.log)
    units = sweep.work_units(shapes, [dtype_name], names)
    units.sort(key=lambda u: shapes.index(u.shape))  # one shape's launches recorded at a time
    timer = sweep.make_timer(device, options.warmup_ms, options.rep_ms, options.cpu_reps)
    entries, skipped = [], []
    recorded: dict = {}
    failed_groups: dict = {}
    # A key takes about as long as the last one; a new shape first records (and autotunes) its launches.
    last_key, slowest_record = 0.0, 0.0
    for n, unit in enumerate(units, start=1):
        group = (unit.shape, unit.dtype)
        estimate = 1.2 * (last_key + (slowest_record if group not in recorded else 0.0))
        if entries and not ctx.fits(estimate):
            skipped.append(f"{unit.key.label()} ({unit.shape.label})")
            continue
        started = key_started = time.perf_counter()
        try:
            if group in failed_groups:
                raise RuntimeError(f"the default launches of {unit.shape.label} failed: {failed_groups[group]}")
            if group not in recorded:
                recorded.clear()
                try:
                    recorded[group] = sweep.record_default_launches(unit.shape, sweep.DTYPES[unit.dtype], "fused",
                                                                    device)
                except Exception as exc:  # e.g. disagreeing with the reference: no key of this shape is swept
                    failed_groups[group] = f"{type(exc).__name__}: {exc}"[:300]
                    raise
                slowest_record = max(slowest_record, time.perf_counter() - started)
            key_started = time.perf_counter()
            launch = recorded[group].get(unit.key)
            if launch is None:
                raise RuntimeError(f"no launch with key {unit.key.label()} in fused fwd+bwd of {unit.shape.label}")
            entry = sweep.sweep_unit(unit, launch, options, timer)
        except Exception as exc:  # noqa: BLE001 -- as sweep.run_sweep: record it, go on
            entry = dict(unit.key.to_json(), shape=unit.shape.to_json(), default=None, winner=None, speedup=None,
                         candidates=[], error=f"{type(exc).__name__}: {exc}"[:500])
        entries.append(entry)
        took = time.perf_counter() - started
        last_key = time.perf_counter() - key_started
        win = entry.get("winner")
        ctx.log(f"  [{n}/{len(units)}] {unit.key.label()}: "
                + (f"winner {win['meta']} w{win['num_warps']} s{win['num_stages']} {win['ms']:.4g} ms, "
                   f"x{_fmt(entry.get('speedup'), '.3g')} vs default" if win else
                   f"no valid candidate ({entry.get('error') or 'all invalid'})") + f" [{took:.1f}s]")
        _write_sweep_files(ctx, result, entries, skipped, family, gpu_name, dtype_name, len(units))
        ctx.save_partial(result)
    _write_sweep_files(ctx, result, entries, skipped, family, gpu_name, dtype_name, len(units))
    if not entries:
        result.status, result.reason = "partial", "no key fitted the time box"
    elif skipped:
        result.status, result.reason = "partial", f"{len(skipped)} of {len(units)} keys not swept (time box)"
    return result


def _write_sweep_files(ctx: Context, result: StepResult, entries, skipped, family, gpu_name, dtype_name,
                       keys_total) -> None:
    import torch
    import triton

    from benchmarks import sweep
    from dinat.kernels import tuning

    doc = dict(tuning.empty_table_json(family, [gpu_name]),
               sweep=dict(shard="0/1", smoke=ctx.smoke, created=sweep._now(), torch=torch.__version__,
                          triton=triton.__version__, dtypes=[dtype_name], kernels=list(sweep.FAMILIES["fused"]),
                          keys_total=keys_total, tool="benchmarks.gpu_record"),
               entries=entries)
    full = ctx.out / f"sweep-{family}.json"
    table = ctx.out / f"{family}.json"
    sweep._write(doc, str(full))
    merged = sweep.merge_tables([(full.name, doc)], winners_only=True)
    sweep._write(merged, str(table))
    summary = sweep.fused_summary(doc)
    winners = sum(1 for e in entries if e.get("winner"))
    result.data.update(family=family, table=table.name, candidates_file=full.name, keys_swept=len(entries),
                       keys_total=keys_total, winners=winners, skipped=skipped, fused_summary=summary,
                       entries=[dict(key=tuning.parse_key("entry", e).label(), shape=e.get("shape"),
                                     default_ms=(e.get("default") or {}).get("ms"),
                                     winner=e.get("winner"), speedup=e.get("speedup"), error=e.get("error"))
                                for e in entries])
    lines = [f"{len(entries)} of {keys_total} keys swept ({winners} with a valid winner), {dtype_name}, "
             f"candidates per kernel: {'2 (smoke)' if ctx.smoke else len(_sweep_candidates('fused_fwd'))}; "
             f"`{table.name}` (winners only) is a candidate for `kernels/tuned/{family}.json`, "
             f"`{full.name}` holds every candidate's time.", ""]
    rows = [[e["key"], _fmt(e["default_ms"], ".4g"), _fmt((e["winner"] or {}).get("ms"), ".4g"),
             (f"{e['winner']['meta']} w{e['winner']['num_warps']} s{e['winner']['num_stages']}"
              if e["winner"] else (e["error"] or "no valid candidate")),
             _fmt(e["speedup"], ".3g") + ("x" if e["speedup"] else "")] for e in result.data["entries"]]
    lines += _md_table(["key", "default ms", "winner ms", "winner", "speed-up"], rows,
                       ["---", "---:", "---:", "---", "---:"])
    lines += ["", "Fused forward+backward (fwd + dQ + dK/dV kernels), default vs tuned:", "", *summary]
    if skipped:
        lines += ["", f"Not swept (time box): {', '.join(skipped)}"]
    lines += _precompile_note(result.data)
    result.markdown = "\n".join(lines)


STEP_FUNCTIONS: dict[str, Callable[[Context], StepResult]] = {
    "machine": step_machine,
    "correctness": step_correctness,
    "na_bench": step_na_bench,
    "models": step_models,
    "sweep": step_sweep,
}


# ----------------------------------------------------------------------------------------------
# Summary, numbers, plot


def summary_markdown(meta: dict, results: list[StepResult]) -> str:
    machine = next((r.data for r in results if r.name == "machine" and r.data), {})
    device = machine.get("device") or meta.get("device", "?")
    lines = [f"### GPU record: {device}, {meta['date']}" + (" (SMOKE RUN: CPU, tiny shapes, not a benchmark)"
                                                            if meta["smoke"] else ""),
             "",
             f"- command: `{meta['command']}`",
             f"- versions: torch {machine.get('torch', meta.get('torch'))}, triton {machine.get('triton', '?')}, "
             f"timm {machine.get('timm', '?')}, python {machine.get('python', platform.python_version())}",
             f"- budget {meta['budget_s']:.0f} s; elapsed {meta['elapsed_s']:.0f} s"
             + ("" if meta.get("finished") else " (**run in progress or killed: steps below are those finished**)"),
             ""]
    table = [[r.title, f"**{r.status}**" if r.status not in ("ok",) else r.status, f"{r.seconds:.0f}",
              r.reason or ""] for r in results]
    lines += _md_table(["step", "status", "s", "note"], table, ["---", "---", "---:", "---"])
    skipped = [r for r in results if r.status == "skipped"]
    failed = [r for r in results if r.status in ("FAILED", "WRONG", "timeout")]
    if failed:
        lines += ["", "**Failed steps:** " + "; ".join(f"{r.title}: {r.status} ({r.reason})" for r in failed)]
    if skipped:
        lines += ["", "Skipped for lack of budget: " + "; ".join(f"{r.title} ({r.reason})" for r in skipped)]
    for r in results:
        if r.markdown:
            lines += ["", f"#### {r.title}", "", r.markdown]
    return "\n".join(lines) + "\n"


def plot_record(results: list[StepResult], path: Path, title: str) -> None:
    """Left: NA forward+backward ms per stage shape and candidate; right: model img/s (training)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {r.name: r for r in results}
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    bench = by_name.get("na_bench")
    rows = [r for r in (bench.data.get("rows", []) if bench else []) if r["mode"] == "fwdbwd" and r["ms"]]
    if rows:
        shapes = list(dict.fromkeys(r["shape"] for r in rows))
        candidates = list(dict.fromkeys(r["candidate"] for r in rows))
        width = 0.8 / len(candidates)
        for i, cand in enumerate(candidates):
            xs = [shapes.index(r["shape"]) + (i - (len(candidates) - 1) / 2) * width for r in rows
                  if r["candidate"] == cand]
            left.bar(xs, [r["ms"] for r in rows if r["candidate"] == cand], width=width, label=cand)
        left.set_xticks(range(len(shapes)))
        left.set_xticklabels(shapes, rotation=45, ha="right", fontsize=7)
        left.set_yscale("log")
        left.set_ylabel("fwd+bwd ms (log)")
        left.legend(fontsize=8)
    else:
        left.text(0.5, 0.5, "NA benchmark: no timings", ha="center", va="center")
    left.set_title("NA forward+backward", fontsize=9)
    models = by_name.get("models")
    rows = [r for r in (models.data.get("rows", []) if models else []) if r["img_per_s"]]
    if rows:
        labels = list(dict.fromkeys(r["model"] for r in rows))
        for i, mode in enumerate(("infer", "train")):
            xs = [labels.index(r["model"]) + (i - 0.5) * 0.4 for r in rows if r["mode"] == mode]
            bars = right.bar(xs, [r["img_per_s"] for r in rows if r["mode"] == mode], width=0.4, label=mode)
            right.bar_label(bars, labels=[f"{r['vs_swin']:.2f}x" if r["vs_swin"] else "" for r in rows
                                          if r["mode"] == mode], fontsize=7)
        right.set_xticks(range(len(labels)))
        right.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
        right.set_ylabel("img/s (labels: vs swin_tiny)")
        right.legend(fontsize=8)
    else:
        right.text(0.5, 0.5, "Model throughput: no numbers", ha="center", va="center")
    right.set_title("Model throughput", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # a kill never leaves half a file


def write_record(out: Path, meta: dict, results: list[StepResult], with_plot: bool, log) -> None:
    meta = dict(meta, elapsed_s=time.time() - meta["started_epoch"])
    _write_text(out / RECORD_JSON, json.dumps(dict(meta, steps=[r.to_json() for r in results]), indent=1,
                                              default=str) + "\n")
    _write_text(out / SUMMARY_MD, summary_markdown(meta, results))
    if with_plot:
        try:
            device = next((r.data.get("device") for r in results if r.name == "machine" and r.data.get("device")),
                          meta.get("device", ""))
            plot_record(results, out / PLOT_PNG, f"{device} {meta['date']}"
                        + (" (smoke)" if meta["smoke"] else ""))
        except Exception as exc:  # noqa: BLE001 -- a plot must not cost the numbers
            log(f"  plot failed: {type(exc).__name__}: {exc}")


# ----------------------------------------------------------------------------------------------
# Running the steps


class Logger:
    """Prints progress with the elapsed time and keeps it in DIR/log.txt."""

    def __init__(self, path: Path, started: float):
        self.started = started
        self.file = open(path, "a", encoding="utf-8")
        self.lock = threading.Lock()

    def __call__(self, message: str) -> None:
        line = f"[{time.time() - self.started:6.1f}s] {message}"
        with self.lock:
            print(line, flush=True)
            self.file.write(line + "\n")
            self.file.flush()

    def raw(self, line: str) -> None:
        with self.lock:
            print(line, flush=True)
            self.file.write(line + "\n")
            self.file.flush()

    def close(self) -> None:
        self.file.close()


def run_in_process(plan: StepPlan, ctx: Context) -> StepResult:
    try:
        result = STEP_FUNCTIONS[plan.name](ctx)
    except Exception as exc:  # noqa: BLE001 -- recorded, the next step runs
        ctx.log(traceback.format_exc().rstrip())
        result = StepResult(plan.name, plan.title, status="FAILED", reason=f"{type(exc).__name__}: {exc}"[:300])
    result.title = plan.title
    return result


def run_isolated(plan: StepPlan, ctx: Context, log: Logger, box_s: float, smoke: bool, workdir: Path) -> StepResult:
    """The step in its own process (a new session, killed with its pool at the end of its box)."""
    result_path = workdir / f"{plan.name}.json"
    state_path = workdir / "state.json"
    state_path.write_text(json.dumps(dict(machine=ctx.machine, workers=ctx.workers)))
    command = [sys.executable, "-m", "benchmarks.gpu_record", "--out", str(ctx.out), "--child-step", plan.name,
               "--child-result", str(result_path), "--child-state", str(state_path),
               "--child-deadline", repr(ctx.deadline)] + (["--smoke"] if smoke else [])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    started = time.time()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                            env=env, start_new_session=True)
    reader = threading.Thread(target=lambda: [log.raw("    " + line.rstrip()) for line in proc.stdout], daemon=True)
    reader.start()
    killed = False
    try:
        proc.wait(timeout=box_s + KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        killed = True
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    reader.join(timeout=5)
    result = None
    if result_path.exists():
        try:
            result = StepResult.from_json(json.loads(result_path.read_text()))
        except (OSError, json.JSONDecodeError, KeyError):
            result = None
    if result is None:
        result = StepResult(plan.name, plan.title)
    result.title = plan.title
    if killed:
        result.status = "timeout"
        result.reason = (f"killed after {time.time() - started:.0f} s (box {box_s:.0f} s); "
                         f"{'partial results kept' if result.data else 'nothing finished'}")
    elif proc.returncode != 0 and result.status not in ("FAILED",):
        result.status = "FAILED"
        result.reason = (result.reason + "; " if result.reason else "") + f"its process exited with {proc.returncode}"
    return result


def _child_main(args) -> int:
    """One step inside its own process (``--isolate``): results go to ``--child-result``."""
    state = json.loads(Path(args.child_state).read_text())
    result_path = Path(args.child_result)

    def save(result: StepResult) -> None:
        _write_text(result_path, json.dumps(result.to_json(), default=str))

    plan = {p.name: p for p in (SMOKE_PLAN if args.smoke else GPU_PLAN)}[args.child_step]
    log = lambda message: print(message, flush=True)  # noqa: E731 -- the parent stamps and files it
    ctx = Context(Path(args.out), args.smoke, log, float(args.child_deadline), state.get("machine"),
                  state.get("workers"), save_partial=save)
    started = time.perf_counter()
    result = run_in_process(plan, ctx)
    result.seconds = time.perf_counter() - started
    save(result)
    return 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_record", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for the record (flat, at most 8 files)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="total wall time, compilation and autotuning included (default 480)")
    parser.add_argument("--smoke", action="store_true",
                        help="every step at tiny shapes on CPU (reference / Triton interpreter / eager Flex)")
    parser.add_argument("--steps", default=",".join(STEP_NAMES),
                        help=f"comma list, a subset of {','.join(STEP_NAMES)} (run in that order)")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="each step in its own process, killed at the end of its box (default: on a GPU)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes that pre-compile Triton configs (default: CPU cores - 2, at most 14)")
    for name in ("child-step", "child-result", "child-state", "child-deadline"):
        parser.add_argument(f"--{name}", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEP_NAMES]
    if unknown or not steps:
        parser.error(f"--steps: unknown {unknown}; choose from {list(STEP_NAMES)}")
    args.steps = [s for s in STEP_NAMES if s in steps]
    if args.budget_s <= 0:
        parser.error("--budget-s must be > 0")
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be >= 1")
    return args, parser


def main(argv=None) -> list[StepResult]:
    args, parser = parse_args(argv)
    if args.smoke:
        # Triton runs the kernels on CPU tensors through its interpreter, on before triton is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.child_step:
        sys.exit(_child_main(args))
    import torch

    if not args.smoke and not torch.cuda.is_available():
        parser.error("the record needs a CUDA GPU; on a machine without one run --smoke")
    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / LOG_TXT).write_text("")
    log = Logger(out / LOG_TXT, started)
    isolate = (not args.smoke) if args.isolate is None else args.isolate
    plans = [p for p in (SMOKE_PLAN if args.smoke else GPU_PLAN) if p.name in args.steps]
    reserve = SUMMARY_RESERVE_S[args.smoke]
    meta = dict(tool="benchmarks.gpu_record", command="python -m benchmarks.gpu_record " + " ".join(
        sys.argv[1:] if argv is None else argv), date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        smoke=args.smoke, budget_s=args.budget_s, started_epoch=started, isolate=isolate, steps=args.steps,
        plan={p.name: dict(box_s=p.box_s, min_s=p.min_s) for p in plans}, torch=torch.__version__,
        device="CPU (smoke)" if args.smoke else "GPU", finished=False)  # no CUDA context in this process
    log(f"GPU record -> {out} | budget {args.budget_s:.0f}s | steps {', '.join(args.steps)} | "
        f"{'isolated processes' if isolate else 'one process'}")
    results: list[StepResult] = []
    ctx = Context(out, args.smoke, log, started + args.budget_s, workers=args.workers)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gpu_record_") as workdir:
        for plan in plans:
            left = started + args.budget_s - time.time() - reserve
            box = left if plan.box_s is None else min(plan.box_s, left)
            if box < plan.min_s:
                reason = f"needs >= {plan.min_s:.0f} s, {max(left, 0):.0f} s of the budget left"
                log(f"== {plan.title}: SKIPPED ({reason})")
                results.append(StepResult(plan.name, plan.title, status="skipped", reason=reason))
                write_record(out, meta, results, False, log)
                continue
            log(f"== {plan.title} (box {box:.0f}s)")
            ctx.deadline = time.time() + box
            step_started = time.time()
            if isolate:
                result = run_isolated(plan, ctx, log, box, args.smoke, Path(workdir))
            else:
                result = run_in_process(plan, ctx)
            result.seconds = time.time() - step_started
            if plan.name == "machine" and result.data:
                ctx.machine = result.data
            results.append(result)
            log(f"== {plan.title}: {result.status} in {result.seconds:.0f}s" + (f" ({result.reason})" if result.reason
                                                                                 else ""))
            write_record(out, meta, results, plan.name in ("na_bench", "models"), log)
    meta["finished"] = True
    write_record(out, meta, results, True, log)
    files = sorted(p.name for p in out.iterdir())
    log(f"done in {time.time() - started:.0f}s; {out}: {', '.join(files)}")
    if len(files) > MAX_FILES:
        log(f"WARNING: {len(files)} files in {out} (the device tool brings back {MAX_FILES})")
    print()
    print(summary_markdown(dict(meta, elapsed_s=time.time() - started), results).split("\n#### ")[0])
    log.close()
    return results


if __name__ == "__main__":
    main()
