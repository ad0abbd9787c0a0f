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
Loops over ``tl.range`` are not counted (reported as unknown).
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

STATIC_RANGES = {"static_range"}
_MISSING = object()


def _range_name(node) -> str | None:
    call = node.iter
    if not isinstance(call, ast.Call):
        return None
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return getattr(call.func, "id", None)


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

    def __call__(self, *args):
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
        counter = _CountingRange([loop for loop in loops if loop["range"] == "range"])
        module_globals = py_fn.__globals__
        saved = module_globals.get("range", _MISSING)
        module_globals["range"] = counter
        try:
            with _no_overflow_checks():
                interpreted[grid](*launch.args, **meta)
        finally:
            if saved is _MISSING:
                del module_globals["range"]
            else:
                module_globals["range"] = saved
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        results.append(dict(sel, loops=[dict(loop, trips=counter.trips.get(loop["line"])) for loop in loops],
                            reduced_grid=list(grid)))
    return results
