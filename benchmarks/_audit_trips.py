"""Inner-loop trip counts of real launches, measured in Triton's CPU interpreter.

A loop's trip count is set at run time (e.g. by the halo a tile's windows span), so it is measured,
not modelled: the problem's launches are recorded in the interpreter (``TRITON_INTERPRET=1``, so
this runs in its own process; recorded, not run) and each audited launch is replayed with its
config while the builtin ``range`` of the kernel's module is a shim. At the header of each runtime
``for`` loop of the kernel function the shim records the trip count; for an innermost loop it then
returns an empty range: the loop body -- all the cost of interpreting -- is skipped, the rest of
the program (which computes the bounds, and runs outer loops) runs as written.

To keep it fast the problem runs with batch 1 and one head: the grid's batch*heads axis then has
one program, and the trip counts of a (batch, head) slice are taken to be those of every slice
(true when loop bounds depend on the tile and the window only, as in today's kernels).
Loops over ``tl.range`` are counted the same way (the module's ``tl`` is a proxy meanwhile).
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import dataclasses
import inspect
import operator
import sys
import textwrap
import types

STATIC_RANGES = {"static_range"}
_REAL_TL = "_kernel_audit_triton_language"
_MISSING = object()


def _range_name(node) -> str | None:
    """``range`` (the builtin), ``tl_range`` (``<module>.range``, i.e. ``tl.range``), the attribute
    name of another call (``static_range``), or None."""
    call = node.iter
    if not isinstance(call, ast.Call):
        return None
    if isinstance(call.func, ast.Attribute):
        return "tl_range" if call.func.attr == "range" else call.func.attr
    return getattr(call.func, "id", None)


class _LanguageProxy(types.ModuleType):
    """``triton.language`` as the kernel module sees it while counting: ``range`` is the counter,
    everything else (as patched by the interpreter) is the real module's."""

    def __init__(self, real, counter):
        super().__init__(real.__name__)
        object.__setattr__(self, "_real", real)
        object.__setattr__(self, "range", counter)

    def __getattr__(self, name):
        return getattr(object.__getattribute__(self, "_real"), name)


@contextlib.contextmanager
def _ranges_replaced(module_globals: dict, counter):
    """The builtin ``range`` and ``tl.range`` of a kernel's module replaced by ``counter``."""
    import triton.language as tl

    saved = {name: value for name, value in module_globals.items() if value is tl}
    saved_range = module_globals.get("range", _MISSING)
    module_globals["range"] = counter
    for name in saved:
        module_globals[name] = _LanguageProxy(tl, counter)
    # The interpreter patches the triton.language module it finds among the kernel's globals.
    module_globals[_REAL_TL] = tl
    try:
        yield
    finally:
        module_globals.update(saved)
        del module_globals[_REAL_TL]
        if saved_range is _MISSING:
            del module_globals["range"]
        else:
            module_globals["range"] = saved_range


def runtime_loops(fn) -> list[dict]:
    """Runtime ``for`` loops of the ``@triton.jit`` function ``fn`` (a ``tl.static_range`` loop is
    unrolled, not a loop): absolute line of the header, the header's lines, the range function
    called, whether it is innermost, and the line of the enclosing runtime loop (None at top)."""
    py_fn = getattr(fn, "fn", fn)
    lines, start = inspect.getsourcelines(py_fn)
    tree = ast.parse(textwrap.dedent("".join(lines)))

    def is_runtime_loop(node) -> bool:
        return isinstance(node, ast.For) and _range_name(node) not in STATIC_RANGES

    loops = [n for n in ast.walk(tree) if is_runtime_loop(n)]
    parent = {}
    for outer in loops:
        for inner in ast.walk(outer):
            if inner is not outer and is_runtime_loop(inner):
                if inner not in parent or parent[inner].lineno < outer.lineno:
                    parent[inner] = outer
    return [dict(line=start + n.lineno - 1, header=list(range(start + n.lineno - 1, start + n.iter.end_lineno)),
                 range=_range_name(n), innermost=not any(parent.get(m) is n for m in loops),
                 parent=start + parent[n].lineno - 1 if n in parent else None)
            for n in sorted(loops, key=lambda n: n.lineno)]


def innermost_loops(fn) -> list[dict]:
    """The innermost runtime loops of ``fn`` (see :func:`runtime_loops`)."""
    return [loop for loop in runtime_loops(fn) if loop["innermost"]]


class _CountingRange:
    """Stands in for ``range`` in a kernel module: counts innermost loops' trips, skips their bodies."""

    def __init__(self, loops: list[dict]):
        self.header_of = {line: loop["line"] for loop in loops for line in loop["header"]}
        self.skip = {loop["line"] for loop in loops if loop["innermost"]}
        self.trips: dict[int, list[int]] = {loop["line"]: [] for loop in loops}

    def __call__(self, arg1, arg2=None, step=None, **options):  # tl.range's options (num_stages, ...) ignored
        args = (arg1,) if arg2 is None else (arg1, arg2)
        if step is not None:
            args = (arg1 if arg2 is not None else 0, arg2 if arg2 is not None else arg1, step)
        r = builtins.range(*(operator.index(a) for a in args))
        loop = self.header_of.get(sys._getframe(1).f_lineno)
        if loop is None:
            return r
        self.trips[loop].append(len(r))
        return builtins.range(0) if loop in self.skip else r


@contextlib.contextmanager
def _no_overflow_checks():
    """The interpreter checks every int32 add/mul for overflow (half its time); a GPU build does not
    unless in debug mode, so trip counts do not depend on it."""
    from triton.runtime import interpreter

    builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if options is None or not hasattr(options, "sanitize_overflow"):
        yield
        return
    builder.options = dataclasses.replace(options, sanitize_overflow=False)
    try:
        yield
    finally:
        builder.options = options


def count_trips(problem_json: dict, selections: list[dict]) -> list[dict]:
    """For each selection ``{"launch": name, "meta": {...}}``: trip counts of the kernel's innermost loops.

    Returns, per selection, ``{"launch", "meta", "programs", "iterations": {line: total}, "scale"}``
    where ``scale`` multiplies the reduced problem's totals up to the full problem's grid.
    """
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("count_trips needs TRITON_INTERPRET=1 set before triton is imported")
    from benchmarks._audit_launch import Problem, launch_name, recording, run_problem

    problem = Problem.from_json(problem_json)
    reduced = problem.replace(batch=1, heads=1)
    launches: list = []
    with recording(launches, keep_tensors=True):
        run_problem(reduced, backward=True, fake=False)
    by_name = {}
    for launch in launches:
        by_name.setdefault(launch_name(launch), launch)
    results = []
    for sel in selections:
        launch = by_name.get(sel["launch"])
        if launch is None:
            results.append(dict(sel, error=f"no launch named {sel['launch']} in the interpreted run"))
            continue
        interpreted = launch.kernel
        while hasattr(interpreted, "fn") and type(interpreted).__name__ != "InterpretedFunction":
            interpreted = interpreted.fn
        py_fn = interpreted.fn
        loops = runtime_loops(py_fn)
        meta = dict(launch.kwargs)
        meta.update(sel.get("meta", {}))
        grid = launch.grid(dict(zip(interpreted.arg_names, launch.args), **meta)) if callable(launch.grid) \
            else launch.grid
        counter = _CountingRange([loop for loop in loops if loop["range"] in ("range", "tl_range")])
        with _no_overflow_checks(), _ranges_replaced(py_fn.__globals__, counter):
            interpreted[grid](*launch.args, **meta)
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        results.append(dict(sel, loops=[dict(loop, trips=counter.trips.get(loop["line"])) for loop in loops],
                            reduced_grid=list(grid)))
    return results
