"""Capture the kernel launches the project's own host code makes, without a GPU.

The public API (``kernels.na1d/2d/3d``, forward and backward) runs on *fake* CUDA tensors
(``FakeTensorMode``: shapes, strides, dtypes, no memory). Every kernel launch goes through
``kernels.tuning.run_kernel``, which hands the kernel to ``wrap_triton``; while capturing, that name
is replaced by a recorder, so what is recorded is exactly the kernel, grid, positional arguments
and keyword arguments a GPU launch would get. Nothing here knows any kernel's argument list.

Tensors become :class:`DevicePointer` stand-ins: a dtype and an address. Addresses are those of
fresh CUDA-caching-allocator blocks (512-byte aligned) plus the tensor's storage offset, so
Triton's "divisible by 16" pointer specialisation sees what a real launch sees.

The backward runs through a small autograd walk (``node.apply`` in topological order) because
the autograd engine refuses fake CUDA tensors on a machine without a CUDA context.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field, fields
from typing import Any, Iterator, Optional

import torch

from benchmarks._common import NAShape

# The CUDA caching allocator hands out blocks aligned to 512 bytes.
ALLOCATION_ALIGN = 512


@dataclass(frozen=True)
class Problem(NAShape):
    """One NA call: the shape (``NAShape``: tensors ``[batch, *spatial, heads, head_dim]`` and the
    window) and how it is launched: dtype and backend."""

    dtype: str = "bfloat16"
    backend: str = "fused"
    # What a DiNAT layer passes: q, k, v as views of one qkv projection [B, *spatial, 3, H, D]
    # ("qkv"; "contiguous" for three separate tensors) and its float32 RPB parameter (under bf16
    # autocast the activations are bf16, the parameter stays float32).
    layout: str = "qkv"
    rpb_dtype: str = "float32"

    @property
    def label(self) -> str:
        """The sweep's shape label and the dtype."""
        return f"{super().label} {self.dtype}"

    @property
    def tag(self) -> str:
        """Short name for report rows: ``d1`` (dilation), with the dtype when not bf16."""
        d = "x".join(str(x) for x in sorted(set(self.dilation)))
        return f"d{d}" + ("" if self.dtype == "bfloat16" else f"_{self.dtype}")

    def to_json(self) -> dict:
        out = super().to_json()
        del out["origin"]  # the audit's problems (and its cache keys) never carried one
        return out

    @classmethod
    def from_json(cls, d: dict) -> "Problem":
        """``to_json``'s dict (other keys ignored); absent launch fields take their defaults."""
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d.update(batch=int(d["batch"]), heads=int(d["heads"]), head_dim=int(d["head_dim"]), rpb=bool(d["rpb"]),
                 causal=[bool(c) for c in d["causal"]])
        return super().from_json(d)

    def replace(self, **changes) -> "Problem":
        return Problem.from_json({**self.to_json(), **changes})

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=getattr(torch, self.dtype)).element_size()


class DevicePointer:
    """What Triton's binder needs of a tensor argument: ``dtype`` and ``data_ptr()``."""

    def __init__(self, dtype: torch.dtype, address: int, shape=(), stride=()):
        self.dtype = dtype
        self.address = address
        self.shape = tuple(shape)
        self._stride = tuple(stride)

    def data_ptr(self) -> int:
        return self.address

    def stride(self):
        return self._stride

    def __repr__(self) -> str:
        return f"DevicePointer({self.dtype}, {tuple(self.shape)}, align={self.address & -self.address})"


@dataclass
class Launch:
    """One recorded launch: the kernel object handed to the launch path, grid and arguments."""

    kernel: Any  # a kernels.tuning.TunedKernel, a one-config Autotuner or a JITFunction
    grid: Any  # a tuple or a callable of the launch's meta-parameters
    args: tuple
    kwargs: dict
    order: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def jit_function(self):
        from triton.runtime.jit import JITFunction

        fn = self.kernel
        while not isinstance(fn, JITFunction):
            inner = getattr(fn, "fn", None)
            if inner is None or inner is fn:
                raise TypeError(f"launch of {self.kernel!r}: no @triton.jit function under it")
            fn = inner
        return fn

    @property
    def tuning_name(self) -> Optional[str]:
        return getattr(self.kernel, "tuning_name", None)

    @property
    def configs(self) -> list:
        """The autotune candidates (one for a fixed kernel: its own launch keywords)."""
        return list(getattr(self.kernel, "configs", None) or [])

    @property
    def candidates(self) -> list:
        """The candidates this launch's autotuner keeps after its prune hook (all without one)."""
        if hasattr(self.kernel, "candidates"):
            return self.kernel.candidates(self.args, self.kwargs)
        return self.configs

    def grid_for(self, meta: dict) -> tuple[int, int, int]:
        grid = self.grid(dict(zip(self.jit_function.arg_names, self.args), **meta)) if callable(self.grid) \
            else self.grid
        grid = tuple(int(g) for g in grid)
        return grid + (1,) * (3 - len(grid))


# Launch names used in reports (stable across kernel edits: from the tuning name or the function).
SHORT_NAMES = {"fused_fwd": "fused_fwd", "fused_bwd_dq": "fused_dq", "fused_bwd_dkdv": "fused_dkdv"}


def launch_name(launch: Launch) -> str:
    name = launch.tuning_name
    if name:
        return SHORT_NAMES.get(name, name)
    fn = launch.kernel  # an autotuner, a JITFunction or (interpreted) an InterpretedFunction
    while hasattr(fn, "fn"):
        fn = fn.fn
    fn_name = fn.__name__.strip("_")
    return fn_name[:-len("_kernel")] if fn_name.endswith("_kernel") else fn_name


def _pointer(t: torch.Tensor, base: int) -> DevicePointer:
    return DevicePointer(t.dtype, base + t.storage_offset() * t.element_size(), t.shape, t.stride())


class _Addresses:
    """Fake allocations: each distinct storage gets a fresh 512-byte-aligned base address."""

    def __init__(self):
        self.next = 1 << 32
        self.bases: dict[int, int] = {}

    def base(self, t: torch.Tensor) -> int:
        key = id(t.untyped_storage()) if hasattr(t, "untyped_storage") else id(t)
        if key not in self.bases:
            self.bases[key] = self.next
            size = max(1, t.untyped_storage().nbytes()) if hasattr(t, "untyped_storage") else 1
            self.next += (size + ALLOCATION_ALIGN - 1) // ALLOCATION_ALIGN * ALLOCATION_ALIGN + ALLOCATION_ALIGN
        return self.bases[key]


@contextlib.contextmanager
def recording(launches: list, keep_tensors: bool = False) -> Iterator[None]:
    """Record every launch that reaches ``kernels.tuning.run_kernel`` instead of running it.

    ``keep_tensors``: keep real tensors as they are (interpreter replays); else tensors become
    :class:`DevicePointer` stand-ins.
    """
    from dinat.kernels import tuning

    addresses = _Addresses()

    def convert(value):
        if isinstance(value, torch.Tensor) and not keep_tensors:
            try:
                base = addresses.base(value)
            except Exception:  # fake tensors without a storage: a fresh allocation
                base = addresses.next
                addresses.next += 1 << 20
            return _pointer(value, base)
        return value

    class _Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def call(*args, **kwargs):
                launches.append(Launch(self.kernel, grid, tuple(convert(a) for a in args),
                                       {k: convert(v) for k, v in kwargs.items()}, order=len(launches)))
            return call

    def run_kernel(kernel, grid, args, kwargs):  # the interpreted path launches without wrap_triton
        _Recorder(kernel)[grid](*args, **kwargs)

    # ``run_kernel`` is also imported by name into kernel modules: replace every binding of it.
    original_run = tuning.run_kernel
    holders = [m for name, m in list(sys.modules.items())
               if (name == "dinat.kernels" or name.startswith("dinat.kernels.")) and getattr(m, "run_kernel", None) is original_run]
    saved_wrap = tuning.wrap_triton
    tuning.wrap_triton = _Recorder
    if keep_tensors:
        for module in holders:
            module.run_kernel = run_kernel
    try:
        yield
    finally:
        tuning.wrap_triton = saved_wrap
        for module in holders:
            module.run_kernel = original_run


def _backward(root: torch.Tensor) -> None:
    """``root.sum().backward()`` without the autograd engine: nodes applied in topological order."""
    order, seen = [], set()

    def visit(node):
        stack = [(node, False)]
        while stack:
            n, done = stack.pop()
            if n is None:
                continue
            if done:
                order.append(n)
                continue
            if id(n) in seen:
                continue
            seen.add(id(n))
            stack.append((n, True))
            for child, _ in n.next_functions:
                if child is not None and id(child) not in seen:
                    stack.append((child, False))

    visit(root.grad_fn)
    grads: dict[int, dict[int, torch.Tensor]] = {id(root.grad_fn): {0: torch.ones_like(root)}}
    for node in reversed(order):
        if type(node).__name__ == "AccumulateGrad":
            continue
        received = grads.pop(id(node), {})
        arity = len(getattr(node, "_input_metadata", ())) or (max(received) + 1 if received else 1)
        inputs = [received.get(i) for i in range(arity)]
        apply = node.apply if hasattr(node, "apply") and not callable(node) else node
        outputs = apply(*inputs)
        if not isinstance(outputs, tuple):
            outputs = (outputs,)
        for (child, index), grad in zip(node.next_functions, outputs):
            if child is None or grad is None:
                continue
            slot = grads.setdefault(id(child), {})
            slot[index] = grad if index not in slot else slot[index] + grad


class _NoDeviceSwitch(contextlib.nullcontext):
    """``torch.cuda.device(x)`` without a CUDA driver: there is one (fake) device, nothing to switch."""

    def __init__(self, device=None):
        super().__init__()


@contextlib.contextmanager
def _no_cuda_device_switch() -> Iterator[None]:
    saved = torch.cuda.device
    torch.cuda.device = _NoDeviceSwitch
    try:
        yield
    finally:
        torch.cuda.device = saved


def run_problem(problem: Problem, backward: bool = True, fake: bool = True) -> None:
    """Run ``problem`` through the public API (``kernels.naNd``), forward and (optionally) backward.

    ``fake``: on fake CUDA tensors (capture for compiling); else on real CPU tensors (interpreter).
    """
    from dinat import kernels

    na = {1: kernels.na1d, 2: kernels.na2d, 3: kernels.na3d}[len(problem.spatial)]
    dtype = getattr(torch, problem.dtype)
    shape = (problem.batch, *problem.spatial, problem.heads, problem.head_dim)
    rpb_shape = (problem.heads, *(2 * k - 1 for k in problem.kernel_size))

    def body(device):
        gen = dict(device=device, dtype=dtype)
        if problem.layout == "qkv":
            qkv = torch.randn(shape[:-2] + (3,) + shape[-2:], **gen, requires_grad=backward)
            q, k, v = qkv.unbind(-3)
        else:
            q, k, v = (torch.randn(shape, **gen, requires_grad=backward) for _ in range(3))
        rpb = torch.randn(rpb_shape, device=device, dtype=getattr(torch, problem.rpb_dtype),
                          requires_grad=backward) if problem.rpb else None
        out = na(q, k, v, list(problem.kernel_size), dilation=list(problem.dilation),
                 is_causal=list(problem.causal), rpb=rpb, backend=problem.backend)
        if backward:
            _backward(out)

    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(allow_non_fake_inputs=True), _no_cuda_device_switch():
            body("cuda")
    else:
        body("cpu")


def capture(problem: Problem, backward: bool = True) -> list[Launch]:
    """The launches a GPU run of ``problem`` makes, in order, with pointer stand-ins for tensors."""
    launches: list[Launch] = []
    with recording(launches):
        run_problem(problem, backward=backward, fake=True)
    if not launches:
        raise RuntimeError(f"{problem.label}: no kernel launch reached dinat.kernels.tuning.run_kernel "
                           f"(backend {problem.backend!r} may not launch Triton kernels here)")
    return launches
