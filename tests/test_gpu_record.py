"""The one-command GPU record in its CPU smoke mode: every step runs, the files appear, the summary
parses, a failing step is recorded and the run goes on, the budget guard skips what cannot fit."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import gpu_record
from dinat.kernels import tuning
from tests.test_sweep import no_tables  # noqa: F401  (fixture: no shipped or user tuning table)

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU smoke mode")


def _tables(markdown: str) -> list[list[list[str]]]:
    """Every markdown table as rows of cells; asserts each row has the header's column count."""
    tables, current = [], None
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if current is None:
                current = []
                tables.append(current)
            assert not current or len(cells) == len(current[0]), line
            current.append(cells)
        else:
            current = None
    return [[row for row in table if not set("".join(row)) <= set("-:")] for table in tables]


def _steps(out) -> dict:
    record = json.loads((out / gpu_record.RECORD_JSON).read_text())
    return {s["name"]: s for s in record["steps"]}


@cpu_only
def test_smoke_record_runs_every_step_and_writes_a_parsable_record(tmp_path, no_tables):
    out = tmp_path / "record"
    results = gpu_record.main(["--smoke", "--out", str(out)])
    assert [r.name for r in results] == list(gpu_record.STEP_NAMES)
    # Under a loaded CI machine a step may run out of its box ("partial"), never fail.
    assert all(r.status in ("ok", "partial") for r in results), [(r.name, r.status, r.reason) for r in results]

    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["record.md", "record.json", "record.png", "log.txt", "cpu.json", "sweep-cpu.json"])
    assert len(files) <= gpu_record.MAX_FILES and all((out / f).is_file() for f in files)  # flat
    assert (out / "record.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    markdown = (out / "record.md").read_text()
    tables = _tables(markdown)
    steps_table = tables[0]
    assert steps_table[0] == ["step", "status", "s", "note"]
    assert [row[0] for row in steps_table[1:]] == [p.title for p in gpu_record.SMOKE_PLAN]
    assert "SMOKE RUN" in markdown and f"torch {torch.__version__}" in markdown
    for plan in gpu_record.SMOKE_PLAN:
        assert f"#### {plan.title}" in markdown

    steps = _steps(out)
    machine = steps["machine"]["data"]
    assert machine["hbm_gbps"] > 0 and machine["matmul_tflops"] > 0
    rows = steps["correctness"]["data"]["rows"]
    assert {(r["backend"]) for r in rows} == {"fused", "unfused"} and all(r["ok"] and r["deterministic"] for r in rows)
    assert all(set(r["tensors"]) >= {"out", "lse", "dq", "dk", "dv"} for r in rows)
    assert any("drpb" in r["tensors"] for r in rows) and any("causal" in r["shape"] for r in rows)
    bench = steps["na_bench"]["data"]["rows"]
    timed = {(r["candidate"], r["mode"]) for r in bench if r["ms"]}
    assert {("fused", "fwd"), ("fused", "fwdbwd"), ("flex", "fwd"), ("sdpa", "fwdbwd")} <= timed
    assert all(r["roofline_pct"] > 0 for r in bench if r["ms"] and r["candidate"] != "sdpa")
    models = steps["models"]["data"]["rows"]
    assert {r["model"] for r in models} >= {"dinat_tiny", "swin_tiny"}
    assert all(r["img_per_s"] for r in models if r["model"] in ("dinat_tiny", "swin_tiny"))

    # The sweep's winners are a table the kernels load.
    table = tuning.load_table(out / "cpu.json")
    assert table.family == "cpu" and len(table.winners) == steps["sweep"]["data"]["winners"] >= 1
    assert steps["sweep"]["data"]["keys_swept"] == 3  # fwd, dQ, dK/dV of the smoke shape


@cpu_only
def test_a_failing_step_is_recorded_loudly_and_the_next_step_runs(tmp_path, monkeypatch):
    def broken(ctx):
        raise RuntimeError("simulated failure of the machine step")

    monkeypatch.setitem(gpu_record.STEP_FUNCTIONS, "machine", broken)
    out = tmp_path / "record"
    results = gpu_record.main(["--smoke", "--out", str(out), "--steps", "machine,sweep"])
    assert [(r.name, r.status) for r in results] == [("machine", "FAILED"), ("sweep", "ok")]
    assert "simulated failure" in results[0].reason
    markdown = (out / "record.md").read_text()
    assert "**Failed steps:** Machine: FAILED (RuntimeError: simulated failure of the machine step)" in markdown
    assert "simulated failure" in (out / "log.txt").read_text()  # the traceback is in the log
    assert _steps(out)["sweep"]["data"]["winners"] >= 1 and (out / "cpu.json").exists()


@cpu_only
def test_a_tiny_budget_makes_the_guard_skip_steps_and_list_them(tmp_path):
    out = tmp_path / "record"
    results = gpu_record.main(["--smoke", "--out", str(out), "--budget-s", "4"])
    statuses = {r.name: r.status for r in results}
    assert statuses["machine"] in ("ok", "skipped")  # it fits unless the machine is very slow
    later = [r for r in results if r.name != "machine"]
    assert all(r.status == "skipped" and r.reason.startswith("needs >= ") for r in later)
    markdown = (out / "record.md").read_text()
    assert "Skipped for lack of budget: " in markdown
    for r in later:
        assert r.title in markdown.split("Skipped for lack of budget: ")[1]
    assert json.loads((out / "record.json").read_text())["finished"] is True


@cpu_only
def test_an_isolated_step_past_its_box_is_killed_and_recorded(tmp_path, monkeypatch):
    # The step's process is killed while it still imports: nothing finished, the record says so.
    monkeypatch.setattr(gpu_record, "KILL_GRACE_S", 0.5)
    out = tmp_path / "record"
    out.mkdir()
    log = gpu_record.Logger(out / "log.txt", 0.0)
    plan = gpu_record.SMOKE_PLAN[0]
    ctx = gpu_record.Context(out, True, log, deadline=0.0)
    result = gpu_record.run_isolated(plan, ctx, log, 0.0, True, tmp_path)
    log.close()
    assert result.status == "timeout" and "nothing finished" in result.reason


def test_roofline_bytes_count_each_tensor_once():
    from benchmarks._common import NAShape

    shape = NAShape(2, (4, 4), 3, 8, (3, 3), (1, 1), (False, False), origin="t")
    rows = 2 * 16 * 3
    assert gpu_record._min_bytes(shape, "fwd", 2) == rows * 8 * 2 * 4 + rows * 4
    assert gpu_record._min_bytes(shape, "fwdbwd", 2) == rows * 8 * 2 * 12 + rows * 8


def test_record_sweep_candidates_are_a_subset_of_the_sweeps():
    from benchmarks import sweep

    for name in sweep.FAMILIES["fused"]:
        chosen = gpu_record._sweep_candidates(name)
        full = {(tuple(c.kwargs.items()), c.num_warps, c.num_stages) for c in sweep.candidate_configs(name, False)}
        assert len(chosen) == 12
        assert {(tuple(c.kwargs.items()), c.num_warps, c.num_stages) for c in chosen} <= full


def test_gpu_budget_plan_leaves_the_sweep_time_within_the_default_budget():
    boxes = sum(p.box_s for p in gpu_record.GPU_PLAN if p.box_s is not None)
    sweep = next(p for p in gpu_record.GPU_PLAN if p.box_s is None)
    assert boxes + sweep.min_s + gpu_record.SUMMARY_RESERVE_S[False] <= 480


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        gpu_record.parse_args(["--out", "x", "--steps", "machine,warp_drive"])
    with pytest.raises(SystemExit):
        gpu_record.parse_args(["--out", "x", "--budget-s", "0"])
    args, _ = gpu_record.parse_args(["--out", "x", "--steps", "sweep,machine"])
    assert args.steps == ["machine", "sweep"]  # always in the record's order


@cpu_only
def test_precompile_pool_runs_each_family_with_every_tunable_launch_pinned():
    # On a GPU the jobs fill Triton's on-disk cache; here (interpreter) they check the plumbing:
    # the spawned worker runs forward+backward and every tunable launch hits the pinned table.
    from benchmarks._common import NAShape

    shape = NAShape(1, (8,), 1, 16, (3,), (2,), (False,), origin="t").to_json()
    jobs = [dict(label="fused own config", family="fused", dtype="float32", rpb_dtype="float32", config=0,
                 device="cpu", shapes=[shape]),
            dict(label="unfused", family="unfused", dtype="float32", rpb_dtype=None, config=0, device="cpu",
                 shapes=[shape]),
            dict(label="fused given config", family="fused", dtype="float32", rpb_dtype=None, config=(32, 4, 1),
                 device="cpu", shapes=[shape])]
    stats = gpu_record.precompile(jobs, workers=1, seconds=600, log=lambda message: None)
    assert stats["done"] == 3 and stats["failed"] == 0 and stats["table_misses"] == 0, stats


def test_precompile_jobs_come_most_needed_first_and_unfinished_keys_get_a_pinned_config():
    cases = gpu_record._correctness_cases(smoke=False)
    jobs = gpu_record._precompile_jobs_for(cases, "float32")
    count = gpu_record.autotune_configs()
    groups = {(dtype, gpu_record._case_group(shape)) for dtype, shape in cases}
    assert len(jobs) == 2 * count * len(groups) + 7  # fused + unfused per config and group, 7 Flex shapes
    families = [j["family"] for j in jobs]
    # The bf16 DiNAT-tiny layers (benchmark and models too), then Flex, then the rest.
    assert all(j["dtype"] == "bfloat16" and "dinat-t" in j["label"] for j in jobs[:2 * count])
    assert families[2 * count:2 * count + 7] == ["flex"] * 7 and "flex" not in families[2 * count + 7:]
    first = jobs[0]
    assert len(first["shapes"]) == 14 and {s["batch"] for s in first["shapes"]} == {8, 64}

    shape = cases[0][1]
    labels = {gpu_record._job_label("fused", "bfloat16", "dinat-t", i) for i in range(count)}
    assert gpu_record._check_config(None, "fused", "bfloat16", shape) is None  # no pool: autotune
    assert gpu_record._check_config(labels, "fused", "bfloat16", shape) is None  # all compiled: autotune
    assert gpu_record._check_config(set(), "fused", "bfloat16", shape) == 0
    if count > 1:
        assert gpu_record._check_config(labels - {jobs[0]["label"]}, "fused", "bfloat16", shape) == 1
