"""Compile a recorded launch for a GPU that is not there, exactly as ``JITFunction.run`` would.

``JITFunction.run`` binds the launch's arguments with a binder made by Triton's
``create_function_from_signature`` (which calls Triton's own ``specialize_impl`` on every argument:
pointer dtypes, "divisible by 16" on pointers and ints, ints equal to 1 turned into constexprs),
packs signature, constexprs and attributes with ``JITFunction._pack_args``, parses the options
(``num_warps``, ``num_stages``, ...) with the backend, and calls ``triton.compile(ASTSource(...))``.
The only thing it takes from the driver is the target; here the target is given
(``GPUTarget("cuda", arch, 32)``) and everything else is Triton's own code, so a launch compiled here
is the kernel a launch on that GPU would compile.

Register and spill figures come from Triton's bundled ``ptxas -v`` on the kernel's PTX (the same
flags as Triton's own cubin step), the SASS from ``cuobjdump -sass`` of the compiled cubin.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton


def triton_bin(name: str) -> str:
    """A tool of the NVIDIA backend bundled with this Triton (ptxas, cuobjdump, nvdisasm)."""
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"this Triton build ships no {name} ({path})")
    return str(path)


def ptxas_version() -> str:
    out = subprocess.run([triton_bin("ptxas"), "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release (\S+?),? V(\S+)", out)
    return match.group(2) if match else out.strip().splitlines()[-1]


def target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", int(arch), 32)


def bind(fn, arch: int, args: tuple, kwargs: dict):
    """``(backend, options, signature, constexprs, attrs)`` exactly as ``JITFunction.run`` derives them."""
    from triton import knobs
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    if hasattr(knobs.compilation, "instrumentation_mode"):
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    backend = make_backend(target(arch))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return backend, options, signature, constexprs, attrs


def compile_launch(fn, arch: int, args: tuple, kwargs: dict):
    """The compiled kernel (``triton.compile``'s result) and the bound signature/attrs."""
    from triton.compiler import ASTSource

    backend, options, signature, constexprs, attrs = bind(fn, arch, args, kwargs)
    src = ASTSource(fn, signature, constexprs, attrs)
    compiled = triton.compile(src, target=target(arch), options=options.__dict__)
    return compiled, dict(signature=signature, constexprs=constexprs, attrs=attrs, options=options)


def specialisation_summary(fn, bound: dict) -> dict:
    """Which arguments a launch turned into constexprs ("== 1") or marked divisible by 16."""
    names = fn.arg_names
    equal_one = sorted(names[path[0]] for path, value in bound["constexprs"].items()
                       if len(path) == 1 and not fn.params[path[0]].is_constexpr and value == 1)
    divisible = sorted(names[path[0]] for path, attr in bound["attrs"].items()
                       if len(path) == 1 and any("divisibility" in str(a) for a in attr))
    return dict(equal_one=equal_one, divisible_by_16=divisible)


_PTXAS_LINE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def ptxas_usage(ptx: str, arch: str) -> dict:
    """Registers, stack frame and spill bytes from ``ptxas -v`` on ``ptx`` (Triton's flags)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [triton_bin("ptxas"), "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.cubin")]
        result = subprocess.run(cmd, capture_output=True, text=True)
    log = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"ptxas failed: {log[-2000:]}")
    regs, frame = _REGS.search(log), _PTXAS_LINE.search(log)
    smem = _SMEM.search(log)
    return dict(registers=int(regs.group(1)) if regs else None,
                stack_bytes=int(frame.group(1)) if frame else 0,
                spill_store_bytes=int(frame.group(2)) if frame else 0,
                spill_load_bytes=int(frame.group(3)) if frame else 0,
                ptxas_static_smem=int(smem.group(1)) if smem else 0)


def resource_usage(cubin: bytes) -> dict:
    """``cuobjdump -res-usage`` of the cubin: REG, STACK, SHARED, LOCAL of the kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([triton_bin("cuobjdump"), "-res-usage", path], capture_output=True, text=True,
                             check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {k.lower(): int(v) for k, v in fields.items()}


def sass_text(cubin: bytes) -> str:
    """``cuobjdump -sass`` of the cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([triton_bin("cuobjdump"), "-sass", path], capture_output=True, text=True,
                              check=True).stdout
