"""Whole-model throughput: DiNAT against Swin and ConvNeXt, in one run, on the same settings.

For every model and batch size: images per second for inference (eval mode, no autograd) and for
training steps (forward + cross-entropy + backward + AdamW step), under bf16 autocast (float32
weights) and channels-last inputs on CUDA, plus the peak GPU memory of each
(``torch.cuda.max_memory_allocated``, weights and optimizer state included). Ratios are against a
baseline model measured in the same run (default ``swin_tiny``). Every model is built by timm with
``pretrained=False`` (random weights, nothing is downloaded); ``import dinat`` registers ours. Our
models run neighborhood attention through ``kernels`` (backend "auto": the Triton kernels on CUDA);
``--na-backend`` picks another. A model that runs out of memory (or fails) gets "OOM"/"error" in its
row and the run goes on.

Examples::

    PYTHONPATH=. python -m benchmarks.model_bench --out throughput.md --plot throughput.png
    PYTHONPATH=. python -m benchmarks.model_bench --batch 64,128,256 --models dinat_tiny,swin_tiny,convnext_tiny
    PYTHONPATH=. python -m benchmarks.model_bench --tiny      # CPU smoke test of the tool, not a benchmark
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import timm
import torch
import torch.nn.functional as F

from dinat import kernels
from dinat import models  # noqa: F401  (registers dinat_* / nat_* with timm)
from benchmarks import _common
from benchmarks._common import describe_error, free_memory, is_oom, sync

# Short names for timm's Swin variants (any other timm name is used as given).
MODEL_ALIASES = {
    "swin_tiny": "swin_tiny_patch4_window7_224",
    "swin_small": "swin_small_patch4_window7_224",
    "swin_base": "swin_base_patch4_window7_224",
}
DEFAULT_MODELS = (
    "dinat_mini", "dinat_tiny", "dinat_small", "dinat_base",
    "swin_tiny", "swin_small", "swin_base",
    "convnext_tiny", "convnext_small", "convnext_base",
)
# The --tiny smoke preset: two real architectures, shrunk (one block per level, two in the third,
# narrow) so that a CPU shared with other work builds and steps them in seconds.
TINY_MODELS = {
    "dinat_mini": dict(embed_dim=32, depths=(1, 1, 2, 1)),
    "swin_tiny": dict(embed_dim=48, depths=(1, 1, 2, 1)),
}
MODES = {"infer": "inference", "train": "training"}
PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}
# The target for the training throughput, checked in the report when both models ran.
TARGET = ("dinat_tiny", "swin_tiny", "train", 1.2)


@dataclass
class Measurement:
    model: str
    batch: int
    mode: str
    img_per_s: Optional[float] = None
    peak_mib: Optional[float] = None
    status: str = ""  # "" when measured, else OOM / error
    note: str = ""
    vs_baseline: Optional[float] = None


@dataclass
class ModelReport:
    name: str  # as asked for (alias or timm name)
    timm_name: str
    params_m: Optional[float] = None
    ours: bool = False
    overrides: dict = field(default_factory=dict)
    measurements: list[Measurement] = field(default_factory=list)


def timm_name(name: str) -> str:
    return MODEL_ALIASES.get(name, name)


def is_our_model(name: str) -> bool:
    """Registered by this repository's ``models`` package (so it takes ``na_backend``)."""
    return timm.models.model_entrypoint(timm_name(name)).__module__.startswith("dinat.models.")


def create_model(name: str, image_size: int, args, overrides: Optional[dict] = None) -> torch.nn.Module:
    """Random-init model from timm; ``overrides`` are extra constructor keywords (smoke preset)."""
    full_name = timm_name(name)
    kwargs = dict(pretrained=False, num_classes=args.num_classes, drop_path_rate=args.drop_path_rate,
                  **(overrides or {}))
    cfg = timm.get_pretrained_cfg(full_name)
    if cfg is not None and cfg.fixed_input_size and image_size != 224:
        kwargs["img_size"] = image_size  # Swin builds its attention masks for one input size
    if is_our_model(name) and args.na_backend is not None:
        kwargs["na_backend"] = args.na_backend
    return timm.create_model(full_name, **kwargs)


# ----------------------------------------------------------------------------------------------
# Measuring


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_step(model: torch.nn.Module, mode: str, batch: int, image_size: int, device: torch.device,
              dtype: torch.dtype, channels_last: bool, num_classes: int, seed: int) -> Callable[[], None]:
    """A zero-argument call running one inference batch or one training step on fixed random data."""
    gen = torch.Generator(device=device).manual_seed(seed)
    images = torch.randn(batch, 3, image_size, image_size, generator=gen, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    if mode == "infer":
        model.eval()

        def infer():
            # no_grad, not inference_mode, as a precaution: an inference tensor kept by some cache
            # into the training steps that follow on the same model could not be saved for backward.
            with torch.no_grad(), _autocast(device, dtype):
                model(images)
        return infer

    model.train()
    labels = torch.randint(0, num_classes, (batch,), generator=gen, device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, dtype):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
    return train_step


def measure(step: Callable[[], None], batch: int, device: torch.device, warmup: int, iters: int,
            repeats: int) -> tuple[float, Optional[float]]:
    """(images per second, peak MiB): ``warmup`` untimed steps, then ``repeats`` windows of ``iters``
    steps, each window between two device synchronisations; the median window counts."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):  # compiles/autotunes kernels, fills caches, allocates optimizer state
        step()
    windows = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            step()
        sync(device)
        windows.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return batch * iters / statistics.median(windows), peak


def run_benchmark(names: Sequence[str], batches: Sequence[int], modes: Sequence[str], device: torch.device,
                  dtype: torch.dtype, args, overrides: Optional[dict] = None, log=print,
                  on_model_done: Optional[Callable[[list[ModelReport]], None]] = None) -> list[ModelReport]:
    """Measure every (model, batch, mode); one failing model or batch does not stop the others."""
    reports: list[ModelReport] = []
    for name in names:
        report = ModelReport(name, timm_name(name), ours=is_our_model(name), overrides=(overrides or {}).get(name, {}))
        reports.append(report)
        model, failure = None, None
        try:
            torch.manual_seed(args.seed)
            model = create_model(name, args.image_size, args, report.overrides)
            report.params_m = sum(p.numel() for p in model.parameters()) / 1e6
            model = model.to(device)
            if args.channels_last:
                model = model.to(memory_format=torch.channels_last)
        except Exception as exc:  # noqa: BLE001 -- e.g. OOM moving a large model, a bad override
            failure = ("OOM" if is_oom(exc) else "error", describe_error(exc))
            log(f"  {name}: could not be built: {failure[1]}")
        for batch in batches:
            for mode in modes:
                result = Measurement(name, batch, mode)
                report.measurements.append(result)
                if failure is not None:
                    result.status, result.note = failure
                    continue
                step = None
                try:
                    step = make_step(model, mode, batch, args.image_size, device, dtype, args.channels_last,
                                     args.num_classes, args.seed)
                    result.img_per_s, result.peak_mib = measure(step, batch, device, args.warmup, args.iters,
                                                                args.repeats)
                except Exception as exc:  # noqa: BLE001 -- one failing case must not end the run
                    result.status = "OOM" if is_oom(exc) else "error"
                    result.note = describe_error(exc)
                del step  # drops the optimizer state and the batch before the next case
                if model is not None:
                    model.zero_grad(set_to_none=True)
                free_memory(device)
                shown = f"{result.img_per_s:.1f} img/s" if result.img_per_s is not None else \
                    f"{result.status}: {result.note}"
                peak = f", peak {result.peak_mib:.0f} MiB" if result.peak_mib is not None else ""
                log(f"  {name:<16} batch {batch:<4} {MODES[mode]:<9} {shown}{peak}")
        del model
        free_memory(device)
        add_ratios(reports, args.baseline)
        if on_model_done is not None:
            on_model_done(reports)
    return reports


def add_ratios(reports: Sequence[ModelReport], baseline: str) -> None:
    """``vs_baseline`` = img/s / the baseline model's img/s at the same batch and mode."""
    base = {(m.batch, m.mode): m.img_per_s for r in reports if r.name == baseline for m in r.measurements}
    for r in reports:
        for m in r.measurements:
            b = base.get((m.batch, m.mode))
            m.vs_baseline = m.img_per_s / b if b and m.img_per_s is not None else None


# ----------------------------------------------------------------------------------------------
# Reporting


def environment(device: torch.device) -> dict[str, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        threads = torch.get_num_threads()
        name = f"CPU {platform.processor() or platform.machine()} ({threads} thread{'s' if threads != 1 else ''})"
    return _common.environment(name, timm=timm.__version__)


def na_backend_used(requested: Optional[str], device: torch.device) -> str:
    """What our models' ``kernels.na2d`` calls run on this device, e.g. 'auto -> fused'."""
    name = requested or "auto"
    try:
        module = kernels.backends.resolve(name, device, "na").__name__.rsplit(".", 1)[-1]
    except Exception as exc:  # noqa: BLE001 -- reported, the models then fail with the same reason
        return f"{name} (unavailable: {describe_error(exc)})"
    return name if module == name else f"{name} -> {module}"


def _fmt(value: Optional[float], spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def target_line(reports: Sequence[ModelReport]) -> Optional[str]:
    model, reference, mode, wanted = TARGET
    rows = {(r.name, m.batch, m.mode): m for r in reports for m in r.measurements}
    parts = []
    for (name, batch, m_mode), m in rows.items():
        ref = rows.get((reference, batch, mode))
        if name == model and m_mode == mode and m.img_per_s and ref is not None and ref.img_per_s:
            ratio = m.img_per_s / ref.img_per_s
            parts.append(f"batch {batch}: {ratio:.2f}x ({'met' if ratio >= wanted else 'not met'})")
    if not parts:
        return None
    return f"- target {model} {MODES[mode]} img/s >= {wanted}x {reference}'s: " + "; ".join(parts)


def markdown_table(reports: Sequence[ModelReport], env: dict[str, str], args, modes: Sequence[str],
                   dtype: torch.dtype, device: torch.device) -> str:
    precision = "bf16 autocast (float32 weights)" if dtype == torch.bfloat16 else "float32"
    lines = [
        f"## Model throughput: {args.image_size} px, {precision}, {device.type}"
        + (" (CPU smoke test: shrunk models, not representative)" if args.tiny else ""),
        "",
        f"- date: {env['date']}",
        f"- device: {env['device']}; torch {env['torch']}; timm {env['timm']}; triton {env['triton']}; "
        f"python {env['python']}",
        f"- NA backend of our models: {na_backend_used(args.na_backend, device)}",
        f"- settings: {'channels-last' if args.channels_last else 'contiguous (NCHW)'} inputs and weights; "
        f"{args.num_classes} classes; drop_path_rate {args.drop_path_rate}; random weights (pretrained=False)",
        f"- inference: eval mode, `torch.no_grad`; training step: train mode, cross entropy, backward, "
        f"AdamW step (zero_grad(set_to_none) first)",
        f"- timing: warm-up steps {args.warmup}, then the median of timed windows ({args.repeats}) of "
        f"{args.iters} steps each, every window between two device synchronisations; "
        f"img/s = batch x steps / window seconds",
        f"- vs {args.baseline}: model img/s / {args.baseline} img/s at the same batch and mode, same run "
        f"(> 1 is faster)",
        "- peak MiB: `torch.cuda.max_memory_allocated` over warm-up and timing (weights, activations, "
        "optimizer state)" + ("" if device.type == "cuda" else "; n/a on CPU"),
    ]
    if device.type == "cuda":
        lines.append(f"- cudnn.benchmark {torch.backends.cudnn.benchmark}; TF32 matmul "
                     f"{torch.backends.cuda.matmul.allow_tf32}; eager models (no torch.compile)")
    overridden = [r for r in reports if r.overrides]
    if overridden:
        lines.append("- architecture overrides: " + "; ".join(
            f"{r.name}: " + ", ".join(f"{k}={v}" for k, v in r.overrides.items()) for r in overridden))
    target = target_line(reports)
    if target:
        lines.append(target)
    header = ["model", "params (M)", "batch"]
    for mode in modes:
        header += [f"{MODES[mode]} img/s", f"{mode} vs {args.baseline}", f"{mode} peak MiB"]
    lines += ["", "| " + " | ".join(header) + " |", "|---|---:|---:|" + "---:|" * (3 * len(modes))]
    notes: list[str] = []
    for r in reports:
        batches = list(dict.fromkeys(m.batch for m in r.measurements))
        for batch in batches:
            cells = [r.name, _fmt(r.params_m, ".1f"), str(batch)]
            for mode in modes:
                m = next(x for x in r.measurements if x.batch == batch and x.mode == mode)
                if m.img_per_s is None:
                    notes.append(f"{r.name}, batch {batch}, {MODES[mode]}: {m.status}: {m.note}")
                    cells += [f"{m.status} [{len(notes)}]", "-", "-"]
                else:
                    cells += [f"{m.img_per_s:.1f}", _fmt(m.vs_baseline, ".2f") + ("x" if m.vs_baseline else ""),
                              _fmt(m.peak_mib, ".0f", "n/a")]
            lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines += ["", *(f"[{i}] {note}" for i, note in enumerate(notes, start=1))]
    return "\n".join(lines) + "\n"


def plot(reports: Sequence[ModelReport], path: str, title: str, modes: Sequence[str], baseline: str) -> None:
    """One panel per mode: img/s per model, one bar per batch size, labelled with the ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.name for r in reports]
    batches = list(dict.fromkeys(m.batch for r in reports for m in r.measurements))
    fig, axes = plt.subplots(len(modes), 1, figsize=(max(6.0, 0.9 * len(names) * max(1, len(batches)) + 2),
                                                     3.6 * len(modes)), squeeze=False)
    width = 0.8 / max(1, len(batches))
    for ax, mode in zip(axes[:, 0], modes):
        for b_index, batch in enumerate(batches):
            xs, ys, labels = [], [], []
            for m_index, r in enumerate(reports):
                m = next((x for x in r.measurements if x.batch == batch and x.mode == mode), None)
                if m is not None and m.img_per_s is not None:
                    xs.append(m_index + (b_index - (len(batches) - 1) / 2) * width)
                    ys.append(m.img_per_s)
                    labels.append(f"{m.vs_baseline:.2f}x" if m.vs_baseline else "")
            bars = ax.bar(xs, ys, width=width, label=f"batch {batch}")
            ax.bar_label(bars, labels=labels, fontsize=7, padding=2)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(f"{MODES[mode]} img/s")
        ax.set_title(f"{MODES[mode]} (bar labels: vs {baseline}; no bar: OOM/error, see the table)", fontsize=9)
        ax.margins(y=0.15)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Command line


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers; got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers; got {text!r}")
    return values


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.model_bench", description=__doc__.split("\n\n")[0],
        epilog="aliases: " + ", ".join(f"{k} = {v}" for k, v in MODEL_ALIASES.items())
        + "; --tiny = --device cpu --precision fp32 --models dinat_mini,swin_tiny (shrunk) --batch 2 "
          "--image-size 64 --warmup 1 --iters 1 --repeats 1",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--tiny", action="store_true", help="CPU smoke preset (see below); other flags still override")
    parser.add_argument("--models", default=None,
                        help=f"comma list of timm names or aliases; default: {','.join(DEFAULT_MODELS)}")
    parser.add_argument("--baseline", default="swin_tiny", help="model the ratios are against")
    parser.add_argument("--batch", type=_int_list, default=None, help="comma list of batch sizes; default 128")
    parser.add_argument("--image-size", type=int, default=None, help="default 224")
    parser.add_argument("--mode", choices=["infer", "train", "both"], default="both")
    parser.add_argument("--device", default=None, help=f"default {'cuda' if cuda else 'cpu'}")
    parser.add_argument("--precision", choices=list(PRECISIONS), default=None,
                        help="bf16 = bfloat16 autocast with float32 weights (default on CUDA); fp32 (default on CPU)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="channels-last weights and inputs (default on)")
    parser.add_argument("--na-backend", default=None,
                        help=f"na_backend= for our models: auto or one of {','.join(kernels.backends.BACKENDS)}; "
                        "default: the models' own ('auto': Triton on CUDA, reference on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per case; default 10")
    parser.add_argument("--iters", type=int, default=None, help="steps per timed window; default 20")
    parser.add_argument("--repeats", type=int, default=None, help="timed windows per case (median); default 3")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--drop-path-rate", type=float, default=0.1,
                        help="the same stochastic depth for every model (default 0.1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu-threads", type=int, default=None, help="CPU: torch.set_num_threads")
    parser.add_argument("--out", default=None, help="write the markdown table here")
    parser.add_argument("--plot", default=None, help="write a bar chart (PNG) here")
    args = parser.parse_args(argv)

    defaults = dict(device="cuda" if cuda else "cpu", batch=[128], image_size=224, warmup=10, iters=20, repeats=3)
    if args.tiny:
        defaults.update(device="cpu", precision="fp32", models=",".join(TINY_MODELS), batch=[2], image_size=64,
                        warmup=1, iters=1, repeats=1)
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.precision is None:
        args.precision = "bf16" if torch.device(args.device).type == "cuda" else "fp32"
    if args.models is None:
        args.models = ",".join(DEFAULT_MODELS)
    for key in ("warmup", "iters", "repeats", "image_size"):
        if getattr(args, key) < (0 if key == "warmup" else 1):
            parser.error(f"--{key.replace('_', '-')} must be >= {0 if key == 'warmup' else 1}")
    return args, parser


def main(argv=None) -> list[ModelReport]:
    args, parser = parse_args(argv)
    device = torch.device(args.device)
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    if device.type == "cuda":
        # Let cuDNN pick its fastest convolution algorithms (stems, downsamplers, ConvNeXt), as
        # timm's own benchmark does; the warm-up steps absorb the search.
        torch.backends.cudnn.benchmark = True
    dtype = PRECISIONS[args.precision]
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if not timm.is_model(timm_name(n))]
    if unknown:
        parser.error(f"unknown models {unknown} (timm names, or aliases {list(MODEL_ALIASES)})")
    overrides = {n: TINY_MODELS[n] for n in names if args.tiny and n in TINY_MODELS}
    modes = ["infer", "train"] if args.mode == "both" else [args.mode]
    if args.baseline not in names:
        parser.error(f"--baseline {args.baseline!r} is not among the models {names}")

    env = environment(device)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    log(f"{env['device']} | torch {env['torch']} | timm {env['timm']} | triton {env['triton']} | "
        f"{len(names)} models x batch {args.batch} x {modes} | NA: {na_backend_used(args.na_backend, device)}")

    def write_partial(reports):
        # Rewrite --out after every model: a run cut short by a time limit keeps what it measured.
        if args.out and len(reports) < len(names):
            table = markdown_table(reports, env, args, modes, dtype, device)
            Path(args.out).write_text(table + f"\n(partial: {len(reports)} of {len(names)} models done)\n")

    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    reports = run_benchmark(names, args.batch, modes, device, dtype, args, overrides, log=log,
                            on_model_done=write_partial)
    table = markdown_table(reports, env, args, modes, dtype, device)
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot(reports, args.plot, f"Model throughput, {args.image_size} px, {args.precision}, {env['device']}, "
             f"{env['date']}", modes, args.baseline)
    return reports


if __name__ == "__main__":
    main()
