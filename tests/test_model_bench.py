"""The model throughput tool runs end to end on CPU and reports what it measured (no speed is asserted)."""

from __future__ import annotations

import datetime

import timm
import torch

from benchmarks import model_bench


def _table_rows(markdown: str) -> list[list[str]]:
    rows = [line.strip("|").split("|") for line in markdown.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row] for row in rows[1:]]  # without the header row


def test_tiny_preset_measures_both_models_reports_oom_and_writes_table_and_plot(tmp_path, capsys, monkeypatch):
    """One --tiny run (building the models is the expensive part): the baseline's (swin_tiny's)
    training step is made to run out of memory, which must land in its row while everything else,
    dinat_mini's training included, is measured."""
    real_make_step = model_bench.make_step

    def make_step(model, mode, *args, **kwargs):
        step = real_make_step(model, mode, *args, **kwargs)
        if mode == "train" and type(model).__name__ == "SwinTransformer":
            def out_of_memory():
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
            return out_of_memory
        return step

    monkeypatch.setattr(model_bench, "make_step", make_step)
    out, png = tmp_path / "table.md", tmp_path / "chart.png"
    day_before = datetime.datetime.now(datetime.timezone.utc)
    reports = model_bench.main(["--tiny", "--out", str(out), "--plot", str(png)])
    days = {f"- date: {day:%Y-%m-%d}" for day in (day_before, datetime.datetime.now(datetime.timezone.utc))}

    markdown = out.read_text()
    assert markdown in capsys.readouterr().out  # printed and written alike
    assert f"torch {torch.__version__}" in markdown and f"timm {timm.__version__}" in markdown
    assert "triton " in markdown and any(day in markdown for day in days)
    assert "NA backend of our models: auto -> tiled" in markdown  # CPU: "auto" is tiled (issue 13; was reference)

    rows = {row[0]: row for row in _table_rows(markdown)}
    assert set(rows) == set(model_bench.TINY_MODELS) == {r.name for r in reports}
    swin, dinat = rows["swin_tiny"], rows["dinat_mini"]
    # columns: model, params, batch, infer img/s, infer ratio, infer peak, train img/s, train ratio, train peak
    assert swin[2] == dinat[2] == "2"
    assert float(swin[3]) > 0 and swin[4] == "1.00x"  # the baseline
    assert swin[6].startswith("OOM [1]") and swin[7] == "-"
    assert "[1] swin_tiny, batch 2, training: OOM: OutOfMemoryError" in markdown
    assert float(dinat[3]) > 0 and float(dinat[6]) > 0 and dinat[5] == dinat[8] == "n/a"  # no peak memory on CPU
    measured = {(r.name, m.mode): m for r in reports for m in r.measurements}
    ratio = measured["dinat_mini", "infer"].img_per_s / measured["swin_tiny", "infer"].img_per_s
    assert dinat[4] == f"{ratio:.2f}x"
    assert dinat[7] == "-"  # no baseline to compare the training step with
    # Parameter counts are those of the shrunk smoke models, and the overrides are stated.
    params = {r.name: r.params_m for r in reports}
    assert float(dinat[1]) == round(params["dinat_mini"], 1) and 0 < params["dinat_mini"] < 5
    assert "architecture overrides: dinat_mini: embed_dim=32" in markdown
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def _report(name, **img_per_s):
    return model_bench.ModelReport(name, model_bench.timm_name(name), measurements=[
        model_bench.Measurement(name, 64, mode, img_per_s=value) for mode, value in img_per_s.items()])


def test_ratios_and_target_line_come_from_the_same_run():
    reports = [_report("dinat_tiny", infer=900.0, train=330.0), _report("swin_tiny", infer=1000.0, train=300.0),
               _report("convnext_tiny", infer=1500.0, train=None)]
    model_bench.add_ratios(reports, "swin_tiny")
    ratios = {(r.name, m.mode): m.vs_baseline for r in reports for m in r.measurements}
    assert ratios["dinat_tiny", "infer"] == 900.0 / 1000.0 and ratios["swin_tiny", "train"] == 1.0
    assert ratios["convnext_tiny", "train"] is None  # not measured: no ratio
    line = model_bench.target_line(reports)
    assert f"batch 64: {330 / 300:.2f}x (not met)" in line
    reports[0].measurements[1].img_per_s = 360.0
    assert f"batch 64: {360 / 300:.2f}x (met)" in model_bench.target_line(reports)
    assert model_bench.target_line(reports[1:]) is None


def test_aliases_and_model_origin():
    assert model_bench.timm_name("swin_tiny") == "swin_tiny_patch4_window7_224"
    assert all(timm.is_model(model_bench.timm_name(n)) for n in model_bench.DEFAULT_MODELS)
    assert model_bench.is_our_model("dinat_tiny") and not model_bench.is_our_model("swin_tiny")
    assert not model_bench.is_our_model("convnext_tiny")
