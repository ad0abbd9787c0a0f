"""Tuning tables: the kernels launch a table's config on a hit, the autotuner on a miss.

Everything runs under the interpreter on CPU, where the kernels' autotuners hold one config
(fused BLOCK_K/BLOCK_Q 128, unfused BLOCK_N 256); the tables here pick other values, so which
config really launched is visible in the keyword arguments the @triton.jit function receives.
"""

import json

import pytest
import torch
import triton

from dinat import kernels
from dinat.kernels import tuning
from dinat.kernels.fused import backward as fused_bwd
from dinat.kernels.fused import forward as fused_fwd
from dinat.kernels.unfused import av_kernels, qk_kernels

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the interpreter's configs (CPU only)")

# A 1-D problem with a dilated window and an RPB: two fused tiles, one head, fast under the interpreter.
B, L, H, D, K, DIL = 1, 16, 1, 16, 3, 2


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, grad = (torch.randn(B, L, H, D, generator=g) for _ in range(4))
    rpb = 0.5 * torch.randn(H, 2 * K - 1, generator=g)
    return q, k, v, rpb, grad


def _key(kernel, rpb=True, dilation=DIL):
    return tuning.TuningKey.make(kernel, torch.float32, D, (L,), (K,), (dilation,), (False,), rpb)


def _table(entries, family="cpu"):
    doc = tuning.empty_table_json(family, ["cpu (triton interpreter)"])
    for key, meta, warps, stages in entries:
        doc["entries"].append(dict(key.to_json(), winner=dict(meta=meta, num_warps=warps, num_stages=stages)))
    return doc


def _write(path, doc):
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return path


class LaunchSpy:
    """Records the meta-parameters each @triton.jit function is launched with (then launches it)."""

    RECORDED = ("BLOCK_K", "BLOCK_Q", "BLOCK_N", "num_warps", "num_stages")

    def __init__(self, monkeypatch, **kernels_by_label):
        self.launched = {label: [] for label in kernels_by_label}
        for label, kernel in kernels_by_label.items():
            fn = kernel.fn
            original = fn.run

            def run(*args, _label=label, _original=original, **kwargs):
                self.launched[_label].append({k: kwargs[k] for k in kwargs if k in LaunchSpy.RECORDED})
                return _original(*args, **kwargs)

            monkeypatch.setattr(fn, "run", run)


def _fused_kernels():
    return dict(fwd=fused_fwd.na_fwd_kernel, dq=fused_bwd.na_bwd_dq_kernel, dkdv=fused_bwd.na_bwd_dkdv_kernel)


def _run_na(backend):
    q, k, v, rpb, grad = _inputs()
    leaves = [t.requires_grad_() for t in (q, k, v, rpb)]
    out = kernels.na1d(q, k, v, K, DIL, rpb=rpb, backend=backend)
    grads = torch.autograd.grad(out, leaves, grad)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v, rpb)]
    ref = kernels.na1d(*ref_leaves[:3], K, DIL, rpb=ref_leaves[3], backend="reference")
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad.double())
    for actual, expected in zip((out, *grads), (ref, *ref_grads)):
        torch.testing.assert_close(actual.double(), expected, atol=1e-4, rtol=1e-4)


@pytest.fixture
def shipped_dir(tmp_path, monkeypatch):
    """An empty stand-in for kernels/tuned/ and no user table."""
    directory = tmp_path / "tuned"
    directory.mkdir()
    monkeypatch.setattr(tuning, "TUNED_DIR", directory)
    monkeypatch.delenv(tuning.TABLE_ENV, raising=False)
    return directory


def test_gpu_family_from_device_names():
    assert tuning.gpu_family("NVIDIA H100 80GB HBM3") == "H100"
    assert tuning.gpu_family("NVIDIA H100 PCIe") == "H100"
    assert tuning.gpu_family("NVIDIA H200") == "H200"
    assert tuning.gpu_family("NVIDIA A100-SXM4-80GB") == "A100"
    assert tuning.gpu_family("NVIDIA L40S") == "L40S"
    assert tuning.gpu_family("NVIDIA GeForce RTX 4090") == "RTX4090"
    assert tuning.gpu_family("Tesla V100-SXM2-16GB") == "V100"
    assert tuning.gpu_family("Some Accelerator") == "Some_Accelerator"
    with pytest.raises(ValueError, match="device_name"):
        tuning.gpu_family("")


def test_key_drops_padding_axes_and_buckets_sizes():
    padded = tuning.TuningKey.make("fused_fwd", torch.float16, 32, (1, 56, 56), (1, 7, 7), (1, 8, 8),
                                   (False, False, False), True)
    plain = tuning.TuningKey.make("fused_fwd", torch.float16, 32, (60, 64), (7, 7), (8, 8), (False, False), True)
    assert padded == plain and padded.bucket == (64, 64) and padded.dtype == "float16"


def test_no_table_keeps_the_interpreter_config(shipped_dir, monkeypatch):
    assert tuning.current_family() == "cpu" and tuning.active_table() is None
    spy = LaunchSpy(monkeypatch, **_fused_kernels())
    choices = []
    with tuning.watching_choices(lambda name, key, config: choices.append((name, config))):
        _run_na("fused")
    assert spy.launched["fwd"] == [{"BLOCK_K": 128, "num_warps": 4, "num_stages": 1}]
    assert spy.launched["dkdv"][0]["BLOCK_Q"] == 128
    assert [name for name, _ in choices] == ["fused_fwd", "fused_bwd_dq", "fused_bwd_dkdv"]
    assert all(config is None for _, config in choices)


def test_shipped_table_of_the_family_drives_fused_launches(shipped_dir, monkeypatch):
    _write(shipped_dir / "cpu.json", _table([
        (_key("fused_fwd"), {"BLOCK_K": 32}, 2, 1),
        (_key("fused_bwd_dq"), {"BLOCK_K": 16}, 8, 2),
        (_key("fused_bwd_dkdv"), {"BLOCK_Q": 64}, 4, 3),
    ]))
    spy = LaunchSpy(monkeypatch, **_fused_kernels())
    _run_na("fused")  # results still equal the reference
    assert spy.launched["fwd"] == [{"BLOCK_K": 32, "num_warps": 2, "num_stages": 1}]
    assert spy.launched["dq"] == [{"BLOCK_K": 16, "num_warps": 8, "num_stages": 2}]
    assert spy.launched["dkdv"] == [{"BLOCK_Q": 64, "num_warps": 4, "num_stages": 3}]


def test_table_drives_unfused_launches_and_resolve_decides_before_wrap_triton(shipped_dir, monkeypatch):
    _write(shipped_dir / "cpu.json", _table([
        (_key("unfused_window_dot", rpb=True), {"BLOCK_N": 16}, 2, 1),  # QK forward
        (_key("unfused_window_sum", rpb=False), {"BLOCK_N": 32}, 1, 1),  # AV forward, dQ
    ]))
    spy = LaunchSpy(monkeypatch, dot=qk_kernels._window_dot_kernel, sum=av_kernels._window_sum_kernel,
                    inverse=av_kernels._inverse_sum_kernel)
    _run_na("unfused")
    # QK fwd hits; the AV backward's window-dot (no RPB) is another key: a miss, the autotuner's 256.
    assert [c["BLOCK_N"] for c in spy.launched["dot"]] == [16, 256]
    assert [c["BLOCK_N"] for c in spy.launched["sum"]] == [32, 32]
    assert [c["BLOCK_N"] for c in spy.launched["inverse"]] == [256, 256]
    # The launch site hands wrap_triton a one-config kernel on a hit, the tuned autotuner on a miss.
    kernel = qk_kernels._window_dot_kernel
    hit = tuning.resolve(kernel, (), dict(x_ptr=torch.empty(0), head_dim=D, L0=1, L1=1, L2=L, K0=1, K1=1, K2=K,
                                          D0=1, D1=1, D2=DIL, C0=False, C1=False, C2=False,
                                          HAS_RPB=True))
    assert hit is not kernel and [c.kwargs for c in hit.configs] == [{"BLOCK_N": 16}]
    assert hit.fn is kernel.fn


def test_env_var_table_overrides_the_shipped_one(shipped_dir, tmp_path, monkeypatch):
    _write(shipped_dir / "cpu.json", _table([(_key("fused_fwd"), {"BLOCK_K": 64}, 4, 2)]))
    user = _write(tmp_path / "mine.json", _table([(_key("fused_fwd"), {"BLOCK_K": 16}, 1, 1)], family="H100"))
    monkeypatch.setenv(tuning.TABLE_ENV, str(user))
    assert tuning.active_table().path == str(user)
    spy = LaunchSpy(monkeypatch, **_fused_kernels())
    _run_na("fused")
    assert spy.launched["fwd"] == [{"BLOCK_K": 16, "num_warps": 1, "num_stages": 1}]
    assert spy.launched["dq"][0]["BLOCK_K"] == 128  # no entry for the backward: the autotuner


def test_a_miss_falls_back_to_the_autotuner(shipped_dir, monkeypatch):
    # Same kernel and window, another dilation: a different key.
    _write(shipped_dir / "cpu.json", _table([(_key("fused_fwd", dilation=1), {"BLOCK_K": 16}, 1, 1)]))
    spy = LaunchSpy(monkeypatch, **_fused_kernels())
    choices = []
    with tuning.watching_choices(lambda name, key, config: choices.append((key, config))):
        _run_na("fused")
    assert spy.launched["fwd"] == [{"BLOCK_K": 128, "num_warps": 4, "num_stages": 1}]
    assert choices[0] == (_key("fused_fwd"), None)


def test_use_table_and_no_table_override_files(shipped_dir, tmp_path):
    _write(shipped_dir / "cpu.json", _table([(_key("fused_fwd"), {"BLOCK_K": 64}, 4, 2)]))
    other = tuning.load_table(_write(tmp_path / "other.json", _table([(_key("fused_fwd"), {"BLOCK_K": 32}, 4, 2)])))
    with tuning.use_table(other):
        assert tuning.lookup(_key("fused_fwd")).meta == (("BLOCK_K", 32),)
        with tuning.no_table():
            assert tuning.lookup(_key("fused_fwd")) is None
    assert tuning.lookup(_key("fused_fwd")).meta == (("BLOCK_K", 64),)
    with pytest.raises(TypeError, match="use_table"):
        with tuning.use_table({"entries": []}):
            pass


def _good_entry(**changes):
    entry = dict(_key("fused_fwd").to_json(), winner=dict(meta={"BLOCK_K": 32}, num_warps=4, num_stages=2))
    entry.update(changes)
    return entry


MALFORMED = {
    "not JSON": ("{oops", "not valid JSON"),
    "wrong format": (dict(tuning.empty_table_json("cpu"), format="something"), "'format' must be"),
    "entries not a list": (dict(tuning.empty_table_json("cpu"), entries={}), "'entries' must be a list"),
    "unknown kernel": (dict(tuning.empty_table_json("cpu"), entries=[_good_entry(kernel="flash")]),
                       r"entries\[0\]\.kernel must be one of"),
    "missing key field": (dict(tuning.empty_table_json("cpu"),
                               entries=[{k: v for k, v in _good_entry().items() if k != "dilation"}]),
                          r"lacks key field\(s\) \['dilation'\]"),
    "axes disagree": (dict(tuning.empty_table_json("cpu"), entries=[_good_entry(dilation=[1, 1])]),
                      "dilation has 2 axes but kernel_size has 1"),
    "bad warps": (dict(tuning.empty_table_json("cpu"), entries=[_good_entry(
        winner=dict(meta={"BLOCK_K": 32}, num_warps=3, num_stages=2))]), r"winner\.num_warps must be a power-of-two"),
    "wrong meta name": (dict(tuning.empty_table_json("cpu"), entries=[_good_entry(
        winner=dict(meta={"BLOCK_N": 32}, num_warps=4, num_stages=2))]), r"meta must set exactly \['BLOCK_K'\]"),
    "duplicate key": (dict(tuning.empty_table_json("cpu"), entries=[_good_entry(), _good_entry()]),
                      r"entries\[1\] repeats the key"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_table_names_the_file_and_the_problem(case, tmp_path):
    doc, message = MALFORMED[case]
    path = _write(tmp_path / "bad.json", doc)
    with pytest.raises(ValueError, match=message) as info:
        tuning.load_table(path)
    assert str(path) in str(info.value)


def test_malformed_user_table_fails_the_launch_loudly(shipped_dir, tmp_path, monkeypatch):
    path = _write(tmp_path / "bad.json", MALFORMED["bad warps"][0])
    monkeypatch.setenv(tuning.TABLE_ENV, str(path))
    q, k, v, rpb, _ = _inputs()
    with pytest.raises(ValueError, match="bad.json.*num_warps"):
        kernels.na1d(q, k, v, K, DIL, rpb=rpb, backend="fused")
    monkeypatch.setenv(tuning.TABLE_ENV, str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="missing.json: no such file"):
        tuning.active_table()


# ---------------------------------------------------------------------------------------------
# Autotune candidates pruned per head-dim class (kernels.fused.config.SPILL_FREE)

FUSED_BLOCK_NAMES = {"fused_fwd": "BLOCK_K", "fused_bwd_dq": "BLOCK_K", "fused_bwd_dkdv": "BLOCK_Q"}


def _gpu_candidates(name):
    """The configs a GPU launch of ``name`` starts from (the interpreter's list holds one)."""
    from dinat.kernels.fused import config

    return [triton.Config({FUSED_BLOCK_NAMES[name]: block}, num_warps=warps, num_stages=stages)
            for block, warps, stages in config.CANDIDATES[name]]


def test_spill_free_table_covers_every_fused_kernel_and_head_dim_class():
    from dinat.kernels.fused import config

    for name in FUSED_BLOCK_NAMES:
        for block_d in (32, 64, 128, 256):
            survivors = config.spill_free(name, block_d, ieee=False)
            assert survivors, (name, block_d)  # never pruned to nothing
            assert set(survivors) <= set(config.CANDIDATES[name]), (name, block_d, survivors)


@pytest.mark.parametrize("name", sorted(FUSED_BLOCK_NAMES))
def test_prune_keeps_the_measured_survivors_of_each_head_dim_class(name):
    from dinat.kernels.fused import config

    prune = config.pruner(name, FUSED_BLOCK_NAMES[name])
    configs = _gpu_candidates(name)
    for block_d in (32, 64, 128, 256):
        kept = prune(configs, {}, BLOCK_D=block_d, IEEE=False, HAS_RPB=True)
        assert [config.candidate_of(c, FUSED_BLOCK_NAMES[name]) for c in kept] == \
            [c for c in config.CANDIDATES[name] if c in config.spill_free(name, block_d, False)]
        assert all(any(c is k for k in configs) for c in kept)  # the autotuner's own objects
    # A class nothing was measured for (fp32 inputs; 16-wide heads): every candidate stays.
    assert prune(configs, {}, BLOCK_D=32, IEEE=True) == configs
    assert prune(configs, {}, BLOCK_D=16, IEEE=False) == configs


def test_prune_never_leaves_zero_candidates(monkeypatch):
    from dinat.kernels.fused import config

    prune = config.pruner("fused_fwd", "BLOCK_K")
    # Configs the table does not list (the interpreter's single one): the safest stays.
    interp = [triton.Config({"BLOCK_K": 128}, num_warps=4, num_stages=1)]
    assert prune(interp, {}, BLOCK_D=32, IEEE=False) == interp
    odd = [triton.Config({"BLOCK_K": b}, num_warps=w, num_stages=1) for b, w in ((128, 4), (16, 2), (16, 8))]
    assert prune(odd, {}, BLOCK_D=32, IEEE=False) == [odd[2]]


def test_fused_kernels_carry_the_prune_hook():
    from dinat.kernels.fused import config

    for label, kernel in _fused_kernels().items():
        name = kernel.tuning_name
        assert kernel.early_config_prune is not None, label
        configs = _gpu_candidates(name)
        kept = kernel.early_config_prune(configs, {}, BLOCK_D=128, IEEE=False)
        assert [config.candidate_of(c, FUSED_BLOCK_NAMES[name]) for c in kept] == \
            list(config.spill_free(name, 128, False))
    # TunedKernel.candidates: what a launch benchmarks (the audit's "default" is picked from it).
    kernel = fused_fwd.na_fwd_kernel
    assert kernel.candidates((), dict(BLOCK_D=64, IEEE=False)) == kernel.configs  # interpreter: one config


def test_a_table_entry_wins_over_the_pruned_candidates(shipped_dir, monkeypatch):
    from dinat.kernels.fused import config

    # Prune every head-dim class of this problem (D=16: BLOCK_D 16) down to (32, 4, 2): a table
    # entry still launches its own config (a one-config kernel that is never pruned).
    for name in FUSED_BLOCK_NAMES:
        monkeypatch.setitem(config.SPILL_FREE, (name, "fp32", 16), ((32, 4, 2),))
    _write(shipped_dir / "cpu.json", _table([(_key("fused_fwd"), {"BLOCK_K": 64}, 8, 3)]))
    spy = LaunchSpy(monkeypatch, **_fused_kernels())
    _run_na("fused")
    assert spy.launched["fwd"] == [{"BLOCK_K": 64, "num_warps": 8, "num_stages": 3}]
    # A miss: the autotuner, whose single interpreter config is not in the table, keeps it.
    assert spy.launched["dq"] == [{"BLOCK_K": 128, "num_warps": 4, "num_stages": 1}]


def test_launch_config_carries_a_register_ceiling(tmp_path):
    entry = _good_entry(winner=dict(meta={"BLOCK_K": 64}, num_warps=4, num_stages=2, maxnreg=128))
    table = tuning.load_table(_write(tmp_path / "t.json", dict(tuning.empty_table_json("cpu"), entries=[entry])))
    config = table.lookup(_key("fused_fwd"))
    assert config == tuning.LaunchConfig((("BLOCK_K", 64),), 4, 2, 128)
    assert config.to_triton().maxnreg == 128 and tuning.LaunchConfig.from_triton(config.to_triton()) == config
    assert config.to_json()["maxnreg"] == 128
    plain = tuning.LaunchConfig((("BLOCK_K", 64),), 4, 2)
    assert "maxnreg" not in plain.to_json() and plain.to_triton().maxnreg is None
    bad = dict(tuning.empty_table_json("cpu"), entries=[_good_entry(
        winner=dict(meta={"BLOCK_K": 64}, num_warps=4, num_stages=2, maxnreg=1000))])
    with pytest.raises(ValueError, match=r"winner\.maxnreg must be null or an int in \[16, 255\]"):
        tuning.load_table(_write(tmp_path / "bad.json", bad))
