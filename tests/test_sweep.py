"""The autotune sweep tool: CPU smoke run, invalid candidates, sharding, merging."""

import json

import pytest
import torch
import triton

from dinat import kernels
from benchmarks import sweep
from dinat.kernels import tuning

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU/interpreter mode")


@pytest.fixture
def no_tables(tmp_path, monkeypatch):
    directory = tmp_path / "tuned"
    directory.mkdir()
    monkeypatch.setattr(tuning, "TUNED_DIR", directory)
    monkeypatch.delenv(tuning.TABLE_ENV, raising=False)


@cpu_only
def test_smoke_sweep_end_to_end_writes_a_usable_table(tmp_path, no_tables, monkeypatch, capsys):
    out = tmp_path / "parts" / "smoke.json"
    assert sweep.main(["--smoke", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["family"] == "cpu" and doc["sweep"]["smoke"] and doc["sweep"]["shard"] == "0/1"
    kernels_swept = sorted(e["kernel"] for e in doc["entries"])
    # window-dot twice: the QK forward (with the RPB) and the AV backward (without).
    assert kernels_swept == sorted([*tuning.TUNABLE, "unfused_window_dot"])
    for entry in doc["entries"]:
        assert len(entry["candidates"]) == 2 and all(c["valid"] and c["ms"] > 0 for c in entry["candidates"])
        fastest = min(entry["candidates"], key=lambda c: c["ms"])
        assert entry["winner"]["meta"] == fastest["meta"] and entry["winner"]["ms"] == fastest["ms"]
        assert entry["default"]["ms"] > 0
        assert entry["speedup"] == pytest.approx(entry["default"]["ms"] / entry["winner"]["ms"])
    assert "| 16 B1 H1 D16 k3 d2 rpb | float32 |" in capsys.readouterr().out  # fused fwd+bwd speed-up row

    # The file is a table: pointed at by the env var, the fused kernels launch its winners.
    monkeypatch.setenv(tuning.TABLE_ENV, str(out))
    shape = sweep.smoke_shapes()[0]
    choices = []
    q = torch.randn(shape.batch, *shape.spatial, shape.heads, shape.head_dim)
    rpb = torch.zeros(shape.heads, 2 * shape.kernel_size[0] - 1)
    with tuning.watching_choices(lambda name, key, config: choices.append((name, config))):
        kernels.na1d(q, q, q, shape.kernel_size, shape.dilation, rpb=rpb, backend="fused")
    winner = next(e["winner"] for e in doc["entries"] if e["kernel"] == "fused_fwd")
    assert choices == [("fused_fwd", tuning.parse_config("winner", "fused_fwd", winner))]


@cpu_only
def test_broken_candidates_are_invalid_never_winners(no_tables, monkeypatch):
    # BLOCK_N 48 cannot compile (tl.arange needs a power of two); BLOCK_N 64 gets its output
    # corrupted by the test hook after its launch, as a kernel bug would; 256 is correct.
    configs = [triton.Config({"BLOCK_N": b}, num_warps=4, num_stages=1) for b in (64, 48, 256)]
    monkeypatch.setattr(sweep, "candidate_configs", lambda name, smoke: configs)

    def corrupt(kernel_name, config, outputs):
        if dict(config.meta)["BLOCK_N"] == 64:
            outputs["out_ptr"].add_(1.0)

    options = sweep.SweepOptions(shapes=sweep.smoke_shapes(), dtypes=["float32"],
                                 kernel_names=["unfused_window_sum"], smoke=True, device="cpu", log=lambda s: None)
    doc = sweep.run_sweep(options, after_candidate=corrupt)
    (entry,) = doc["entries"]
    by_block = {c["meta"]["BLOCK_N"]: c for c in entry["candidates"]}
    assert not by_block[64]["valid"] and "out_ptr differs from the default launch" in by_block[64]["error"]
    assert by_block[64]["ms"] is None and by_block[64]["max_error"] == pytest.approx(1.0, rel=1e-3)
    assert not by_block[48]["valid"] and by_block[48]["error"]
    assert by_block[256]["valid"] and by_block[256]["ms"] > 0
    assert entry["winner"]["meta"] == {"BLOCK_N": 256}


def test_model_shapes_come_from_the_dinat_registry():
    shapes = sweep.model_shapes(["dinat_tiny"], 224, batch=8)
    got = [(s.spatial, s.heads, s.head_dim, s.kernel_size, s.dilation) for s in shapes]
    assert got == [((56, 56), 2, 32, (7, 7), (1, 1)), ((56, 56), 2, 32, (7, 7), (8, 8)),
                   ((28, 28), 4, 32, (7, 7), (1, 1)), ((28, 28), 4, 32, (7, 7), (4, 4)),
                   ((14, 14), 8, 32, (7, 7), (1, 1)), ((14, 14), 8, 32, (7, 7), (2, 2)),
                   ((7, 7), 16, 32, (7, 7), (1, 1))]
    assert all(s.batch == 8 and s.rpb and s.origin == "dinat_tiny" for s in shapes)
    with pytest.raises(ValueError, match="--models: 'resnet_nope'"):
        sweep.model_shapes(["resnet_nope"], 224, 8)


def test_shards_are_deterministic_disjoint_and_complete():
    shapes = [sweep.parse_shape(f"spatial={n}x{n},heads=2,head_dim=32,kernel=7,dilation={d}", 4)
              for n, d in ((56, 8), (56, 1), (28, 4), (14, 2), (7, 1))]
    units = sweep.work_units(shapes, ["float16", "bfloat16"], list(tuning.TUNABLE))
    # 5 shapes x 2 dtypes x (6 kernels + the window-dot's second key) distinct keys.
    assert len(units) == len({u.key for u in units}) == 5 * 2 * 7
    assert [u.key for u in sweep.work_units(list(reversed(shapes)), ["bfloat16", "float16"],
                                            list(tuning.TUNABLE))] == [u.key for u in units]
    for count in (1, 3, 8, 200):
        parts = [sweep.shard_units(units, i, count) for i in range(count)]
        keys = [u.key for part in parts for u in part]
        assert sorted(map(str, keys)) == sorted(str(u.key) for u in units) and len(keys) == len(set(keys))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert sweep.parse_shard("2/5") == (2, 5)
    slurm = dict(SLURM_ARRAY_TASK_ID="4", SLURM_ARRAY_TASK_COUNT="4", SLURM_ARRAY_TASK_MIN="1")  # --array=1-4
    assert sweep.parse_shard("slurm", slurm) == (3, 4)
    with pytest.raises(ValueError, match="SLURM_ARRAY_TASK_ID"):
        sweep.parse_shard("slurm", {})
    for bad in ("5/5", "-1/3", "1", "a/b", "0/0"):
        with pytest.raises(ValueError, match="--shard"):
            sweep.parse_shard(bad)


def test_parse_shape_checks_its_fields():
    s = sweep.parse_shape("spatial=8x16x16,heads=4,head_dim=64,kernel=3x7x7,dilation=1x2x2,causal=1x0x0,rpb=0", 2)
    assert (s.spatial, s.kernel_size, s.dilation, s.causal, s.rpb) == (
        (8, 16, 16), (3, 7, 7), (1, 2, 2), (True, False, False), False)
    for spec, message in (("spatial=8x8,heads=2,head_dim=32", "missing \\['kernel', 'dilation'\\]"),
                          ("spatial=8x8,heads=2,head_dim=32,kernel=3,dilation=1,colour=3", "unknown \\['colour'\\]"),
                          ("spatial=8x8,heads=2,head_dim=32,kernel=3x3x3,dilation=1", "kernel needs 1 or 2 values"),
                          ("spatial=8x8,heads=2,head_dim=32,kernel=3,dilation=1,causal=1", "RPB needs a non-causal"),
                          ("spatial=8x8,heads=2,head_dim=32,kernel=9,dilation=1", "kernel_size")):
        with pytest.raises(ValueError, match=message):
            sweep.parse_shape(spec, 1)


def _shard_doc(gpu, entries):
    return dict(tuning.empty_table_json(tuning.gpu_family(gpu), [gpu]), entries=entries)


def _entry(key, candidates, default_ms=3.0):
    entry = dict(key.to_json(), shape=None, default=dict(meta={"BLOCK_K": 128}, num_warps=4, num_stages=2,
                                                         ms=default_ms))
    sweep._set_winner(entry, [dict(meta={"BLOCK_K": b}, num_warps=w, num_stages=2, valid=ms is not None, ms=ms,
                                   max_error=0.0, error=None if ms is not None else "differs")
                              for b, w, ms in candidates])
    return entry


def test_merge_keeps_the_fastest_valid_config_per_key(tmp_path, capsys):
    k1 = tuning.TuningKey.make("fused_fwd", "float16", 32, (56, 56), (7, 7), (8, 8), (False, False), True)
    k2 = tuning.TuningKey.make("fused_fwd", "float16", 32, (28, 28), (7, 7), (4, 4), (False, False), True)
    gpu = "NVIDIA H100 80GB HBM3"
    # Shard A: for k1, BLOCK_K 16 is fastest but wrong; shard B re-ran k1 and found a faster valid one.
    a = tmp_path / "a.json"
    a.write_text(json.dumps(_shard_doc(gpu, [_entry(k1, [(16, 4, None), (64, 4, 2.0), (32, 4, 2.5)])])))
    b = tmp_path / "b.json"
    b.write_text(json.dumps(_shard_doc(gpu, [_entry(k1, [(16, 4, None), (32, 8, 1.5)]),
                                             _entry(k2, [(64, 2, 0.7), (128, 4, 0.9)])])))
    out = tmp_path / "H100.json"
    assert sweep.main(["merge", str(out), str(a), str(b), "--winners-only"]) == 0
    table = tuning.load_table(out)
    assert table.family == "H100" and table.gpu_names == (gpu,)
    assert table.lookup(k1) == tuning.LaunchConfig((("BLOCK_K", 32),), 8, 2)
    assert table.lookup(k2) == tuning.LaunchConfig((("BLOCK_K", 64),), 2, 2)
    merged = json.loads(out.read_text())
    assert all("candidates" not in e for e in merged["entries"])
    assert [e["speedup"] for e in merged["entries"]] == [pytest.approx(3.0 / 0.7), pytest.approx(2.0)]

    # Keeping the candidates, merging is idempotent: a merged file merges with a shard again.
    full = tmp_path / "full.json"
    doc = sweep.merge_tables([(str(a), json.loads(a.read_text())), (str(b), json.loads(b.read_text()))])
    full.write_text(json.dumps(doc))
    again = sweep.merge_tables([(str(full), doc), (str(a), json.loads(a.read_text()))])
    assert [e["winner"] for e in again["entries"]] == [e["winner"] for e in doc["entries"]]
    k1_entry = next(e for e in doc["entries"] if e["dilation"] == [8, 8])
    assert len(k1_entry["candidates"]) == 4 and not next(c for c in k1_entry["candidates"]
                                                          if c["meta"] == {"BLOCK_K": 16})["valid"]


def test_merge_refuses_files_from_different_gpus_unless_asked(tmp_path):
    key = tuning.TuningKey.make("fused_fwd", "float16", 32, (7, 7), (7, 7), (1, 1), (False, False), True)
    docs = [("h100-sxm.json", _shard_doc("NVIDIA H100 80GB HBM3", [_entry(key, [(64, 4, 1.0)])])),
            ("h100-pcie.json", _shard_doc("NVIDIA H100 PCIe", [_entry(key, [(32, 4, 0.8)])]))]
    with pytest.raises(ValueError, match="different GPUs.*h100-sxm.json.*h100-pcie.json.*--allow-mixed-gpus"):
        sweep.merge_tables(docs)
    merged = sweep.merge_tables(docs, allow_mixed_gpus=True)
    assert merged["family"] == "H100" and len(merged["gpu_names"]) == 2
    docs.append(("a100.json", _shard_doc("NVIDIA A100-SXM4-80GB", [])))
    with pytest.raises(ValueError, match="different families.*--family"):
        sweep.merge_tables(docs, allow_mixed_gpus=True)
    with pytest.raises(ValueError, match="bad.json"):
        sweep.merge_tables([("bad.json", dict(docs[0][1], version=99))])


@cpu_only
def test_full_sweep_needs_a_gpu():
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        sweep.main(["--shard", "0/2"])


@pytest.mark.gpu
def test_gpu_sweep_of_a_dinat_stage_gives_a_table_the_fused_kernels_use(tmp_path, no_tables, monkeypatch):
    full = sweep.candidate_configs
    monkeypatch.setattr(sweep, "candidate_configs", lambda name, smoke: [c for c in full(name, False)
                                                                          if c.num_stages == 2][::4])
    shape = sweep.parse_shape("spatial=28x28,heads=4,head_dim=32,kernel=7,dilation=4", 8)
    options = sweep.SweepOptions(shapes=[shape], dtypes=["float16"], kernel_names=list(sweep.FAMILIES["fused"]),
                                 device="cuda", warmup_ms=5, rep_ms=20, log=lambda s: None)
    doc = sweep.run_sweep(options)
    assert len(doc["entries"]) == 3 and all(e["winner"] and e["speedup"] for e in doc["entries"]), doc["entries"]
    table = tmp_path / "table.json"
    table.write_text(json.dumps(doc))
    monkeypatch.setenv(tuning.TABLE_ENV, str(table))
    q, k, v = (torch.randn(8, 28, 28, 4, 32, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
    rpb = torch.randn(4, 13, 13, device="cuda", dtype=torch.float16, requires_grad=True)
    choices = []
    with tuning.watching_choices(lambda name, key, config: choices.append(config)):
        out = kernels.na2d(q, k, v, 7, 4, rpb=rpb, backend="fused")
        out.float().square().sum().backward()
    assert len(choices) == 3 and all(c is not None for c in choices)
    ref = kernels.na2d(q.float(), k.float(), v.float(), 7, 4, rpb=rpb.float(), backend="reference")
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
