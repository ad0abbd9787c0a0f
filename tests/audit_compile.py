"""Shared by the launch-faithful compile tests: compile the recorded launches of a problem.

Runs ``python -m benchmarks.kernel_audit --compile-worker`` (one subprocess per arch, without
``TRITON_INTERPRET``) and returns its rows grouped by case.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import triton

ROOT = Path(__file__).resolve().parents[1]


def ptxas_available() -> bool:
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


def compile_rows(cases, base: dict, candidates: bool = False) -> dict:
    """``{(arch, dtype, dilation): [row, ...]}`` for each case, the default config of every launch
    (``candidates``: every config its autotuner keeps after the prune hook).

    ptxas -v (spill bytes) runs on sm_90 only: it recompiles the PTX, seconds per kernel.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["TRITON_INTERPRET"] = "0"
    rows = {}
    for arch in sorted({c[0] for c in cases}, reverse=True):
        mine = [c for c in cases if c[0] == arch]
        problems = [dict(base, dtype=dtype, dilation=[d] * len(base["spatial"])) for _, dtype, d in mine]
        job = dict(arch=arch, problems=problems, all_configs=False, candidates=candidates, kernels=[], family=None,
                   ptxas=arch == 90)
        result = subprocess.run([sys.executable, "-m", "benchmarks.kernel_audit", "--compile-worker"], cwd=ROOT,
                                env=env, input=json.dumps(job), capture_output=True, text=True, timeout=1800)
        assert result.returncode == 0, result.stderr[-4000:]
        objs = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        errors = [o for o in objs if o["kind"] == "error"]
        assert not errors, errors
        for case, problem in zip(mine, problems):
            rows[case] = [o for o in objs if o["kind"] == "result" and o["problem"] == problem]
    return rows
