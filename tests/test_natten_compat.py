"""The NATTEN <= 0.17 compatibility layer: every op against the brute force and our API, NATTEN's
errors, the modules, ``install()`` and Hugging Face DiNAT through ``patch_transformers()``."""

from __future__ import annotations

import importlib
import importlib.util
import io
import math
import sys

import pytest
import torch

from dinat import kernels
from dinat.kernels import natten_compat as F
from dinat.models import natten_compat as M

from .brute_force import dense_na, mask_and_bias, window_logits

QK = {1: F.na1d_qk, 2: F.na2d_qk, 3: F.na3d_qk}
AV = {1: F.na1d_av, 2: F.na2d_av, 3: F.na3d_av}
FUSED = {1: F.na1d, 2: F.na2d, 3: F.na3d}
API_QK = {1: kernels.na1d_qk, 2: kernels.na2d_qk, 3: kernels.na3d_qk}
API_AV = {1: kernels.na1d_av, 2: kernels.na2d_av, 3: kernels.na3d_av}
API_NA = {1: kernels.na1d, 2: kernels.na2d, 3: kernels.na3d}

# (spatial, kernel_size, dilation, is_causal): odd kernels, dilation that does not divide the
# axis, per-axis values, causal on some axes (0.17 allowed it without rpb).
CASES = [
    ((11,), (3,), (2,), (False,)),
    ((9,), (5,), (1,), (True,)),
    ((7, 9), (3, 5), (2, 1), (False, False)),
    ((8, 7), (3, 3), (1, 2), (True, False)),
    ((4, 6, 7), (3, 3, 5), (1, 2, 1), (False, False, False)),
    ((5, 4, 6), (3, 3, 3), (1, 1, 2), (False, True, True)),
]
IDS = [f"{len(s)}d-k{k}-d{d}-c{''.join('1' if x else '0' for x in c)}" for s, k, d, c in CASES]
HEADS, DIM = 2, 4


@pytest.fixture(autouse=True)
def _defaults():
    """Each test starts and ends with NATTEN's default context and our default backend."""
    F.reset_context()
    F.use_backend("auto")
    yield
    F.reset_context()
    F.use_backend("auto")


def _first(x):  # heads-last -> heads-first
    return x.movedim(-2, 1)


def _tensors(spatial, kernel_size, causal, seed, batch=2, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, *spatial, HEADS, DIM, generator=g, dtype=dtype).requires_grad_() for _ in range(3))
    rpb = None
    if not any(causal):
        rpb = torch.randn(HEADS, *(2 * x - 1 for x in kernel_size), generator=g, dtype=dtype).requires_grad_()
    return q, k, v, rpb


@pytest.mark.parametrize("spatial,ks,dil,causal", CASES, ids=IDS)
def test_unfused_ops_match_brute_force_and_api(spatial, ks, dil, causal):
    """qk (heads-first, unscaled, + rpb) -> softmax -> av, forward and backward."""
    ndim = len(spatial)
    q, k, v, rpb = _tensors(spatial, ks, causal, seed=ndim)
    scale = DIM ** -0.5
    logits = QK[ndim](_first(q) * scale, _first(k), ks, dil, is_causal=causal, rpb=rpb)
    assert logits.shape == (2, HEADS, *spatial, math.prod(ks))
    want_logits = window_logits(q * scale, k, ks, dil, causal, rpb)
    torch.testing.assert_close(logits, _first(want_logits), rtol=1e-12, atol=1e-12)
    api_logits = API_QK[ndim](q * scale, k, ks, dil, causal, rpb=rpb)
    assert torch.equal(logits, _first(api_logits))  # the layout conversion is exact

    attn = logits.softmax(-1)
    out = AV[ndim](attn, _first(v), ks, dil, is_causal=causal)
    assert torch.equal(out, _first(API_AV[ndim](attn.movedim(1, -2), v, ks, dil, causal)))
    want = dense_na(q, k, v, ks, dil, causal, rpb)
    torch.testing.assert_close(out, _first(want), rtol=1e-10, atol=1e-10)

    inputs = [x for x in (q, k, v, rpb) if x is not None]
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad_out)
    expected = torch.autograd.grad(want, inputs, grad_out.movedim(1, -2))
    for name, a, b in zip("qkvr", got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("spatial,ks,dil,causal", CASES, ids=IDS)
def test_fused_ops_match_brute_force_and_api(spatial, ks, dil, causal):
    """The fused na{1,2,3}d is heads-last, as in 0.17.4; trains with rpb too."""
    ndim = len(spatial)
    q, k, v, rpb = _tensors(spatial, ks, causal, seed=10 + ndim)
    out = FUSED[ndim](q, k, v, ks, dil, is_causal=causal, rpb=rpb, scale=0.3)
    assert torch.equal(out, API_NA[ndim](q, k, v, ks, dil, causal, rpb=rpb, scale=0.3))
    want = dense_na(q, k, v, ks, dil, causal, rpb, scale=0.3)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    inputs = [x for x in (q, k, v, rpb) if x is not None]
    grad_out = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, inputs, grad_out), torch.autograd.grad(want, inputs, grad_out)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    # NATTEN's `scale or head_dim ** -0.5`: None and 0 both mean the default.
    default = dense_na(q, k, v, ks, dil, causal, rpb)
    for scale in (None, 0.0):
        torch.testing.assert_close(FUSED[ndim](q, k, v, ks, dil, causal, rpb, scale), default, rtol=1e-10, atol=1e-10)


def test_legacy_ops_match_017_ops_and_brute_force():
    """natten{1,2,3}d{qkrpb,qk,av}: positional (rpb, kernel_size, dilation); 3-D has its own depth pair."""
    g = torch.Generator().manual_seed(3)
    setups = [  # ndim, spatial, legacy kernel/dilation args, the per-axis tuples they mean
        (1, (10,), (3, 3), ((3,), (3,))),
        (2, (9, 7), (3, 2), ((3, 3), (2, 2))),
        (3, (5, 6, 6), (5, 3, 1, 2), ((5, 3, 3), (1, 2, 2))),
    ]
    for ndim, spatial, args, (ks, dil) in setups:
        q, k, v = (torch.randn(1, HEADS, *spatial, DIM, generator=g, dtype=torch.float64) for _ in range(3))
        rpb = torch.randn(HEADS, *(2 * x - 1 for x in ks), generator=g, dtype=torch.float64)
        qkrpb = getattr(F, f"natten{ndim}dqkrpb")(q, k, rpb, *args)
        assert qkrpb.is_contiguous()  # as NATTEN's were: callers may .view() them
        assert torch.equal(qkrpb, QK[ndim](q, k, ks, dil, rpb=rpb))
        assert torch.equal(qkrpb, getattr(F, f"na{ndim}d_qk_with_bias")(q, k, rpb, *args))
        last = (q.movedim(1, -2), k.movedim(1, -2), v.movedim(1, -2))
        torch.testing.assert_close(qkrpb, _first(window_logits(*last[:2], ks, dil, (False,) * ndim, rpb)))
        plain = getattr(F, f"natten{ndim}dqk")(q, k, *args)
        torch.testing.assert_close(plain, _first(window_logits(*last[:2], ks, dil, (False,) * ndim)))
        out = getattr(F, f"natten{ndim}dav")(qkrpb.softmax(-1), v, *args)
        assert out.is_contiguous()
        want = dense_na(*last, ks, dil, (False,) * ndim, rpb, scale=1.0)
        torch.testing.assert_close(out, _first(want), rtol=1e-10, atol=1e-10)


def test_k_diffusion_style_call():
    """HDiT's pattern: natten2dqk -> softmax -> natten2dav on heads-first tensors, no rpb."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 3, 8, 8, 6, generator=g, requires_grad=True) for _ in range(3))
    attn = torch.softmax(F.natten2dqk(q * 6 ** -0.5, k, 5, 1), dim=-1)
    out = F.natten2dav(attn, v, 5, 1)
    want = dense_na(*(x.movedim(1, -2) for x in (q, k, v)), (5, 5), (1, 1), (False, False))
    torch.testing.assert_close(out, want.movedim(-2, 1), rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in (q, k, v))


def test_additional_keys_and_values():
    """Extra (global) tokens: unfused ops concatenate their logits after the window's; the fused op
    shares one softmax over both."""
    g = torch.Generator().manual_seed(5)
    spatial, ks, dil, extra = (6, 7), (3, 3), (2, 1), 4
    q, k, v = (torch.randn(2, HEADS, *spatial, DIM, generator=g, dtype=torch.float64) for _ in range(3))
    ek, ev = (torch.randn(2, HEADS, extra, DIM, generator=g, dtype=torch.float64) for _ in range(2))
    logits = F.na2d_qk(q, k, ks, dil, additional_keys=ek)
    assert logits.shape[-1] == 9 + extra
    attn = logits.softmax(-1)
    out = F.na2d_av(attn, v, ks, dil, additional_values=ev)
    # Dense: the window mask, plus extra columns every query sees.
    mask, _ = mask_and_bias(spatial, ks, dil, (False, False))
    qf, kf, vf = (x.flatten(2, 3) for x in (q, k, v))
    scores = torch.cat([(qf @ kf.transpose(-1, -2)).masked_fill(~mask, float("-inf")), qf @ ek.transpose(-1, -2)], -1)
    want = (scores.softmax(-1) @ torch.cat([vf, ev], 2)).reshape(v.shape)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    fused = F.na2d(*(x.movedim(1, -2) for x in (q, k, v)), ks, dil, scale=1.0,
                   additional_keys=ek.transpose(1, 2), additional_values=ev.transpose(1, 2))
    torch.testing.assert_close(fused, want.movedim(1, -2), rtol=1e-10, atol=1e-10)


def test_invalid_arguments_raise_natten_errors():
    q = torch.randn(1, 2, 9, 9, 4)
    err = F.NattenArgumentError
    assert issubclass(err, ValueError) and issubclass(err, RuntimeError)
    with pytest.raises(err, match="odd"):
        F.na2d_qk(q, q, 4)  # NATTEN <= 0.17 had odd kernels only
    with pytest.raises(err, match="odd"):
        F.natten2dqk(q, q, 1, 1)
    with pytest.raises(err, match="dilation"):
        F.na2d_qk(q, q, 3, 0)
    with pytest.raises(err, match=r"at least kernel_size \* dilation.*9 < 5 \* 2"):
        F.natten2dqkrpb(q, q, None, 5, 2)
    with pytest.raises(err, match="kernel_size must be an int"):
        F.na2d_qk(q, q, (3, 3, 3))
    with pytest.raises(err, match="is_causal must be a bool"):
        F.na2d_qk(q, q, 3, is_causal=1)
    with pytest.raises(err, match=r"rank-5 tensor \[batch, heads, height, width, head_dim\]"):
        F.natten2dqk(q[0], q[0], 3, 1)
    with pytest.raises(err, match="one shape"):
        F.na2d_qk(q, q[:, :1], 3)
    with pytest.raises(err, match=r"attn must have shape \[1, 2, 9, 9, 9\]"):
        F.natten2dav(torch.randn(1, 2, 9, 9, 8), q, 3, 1)
    with pytest.raises(err, match="rank-4"):
        F.na2d_qk(q, q, 3, additional_keys=torch.randn(1, 2, 4))
    with pytest.raises(err, match="together"):
        F.na2d(*(q.movedim(1, -2),) * 3, 3, additional_keys=torch.randn(1, 4, 2, 4))
    with pytest.raises(NotImplementedError, match="causal"):
        F.na2d_qk(q, q, 3, is_causal=True, rpb=torch.zeros(2, 5, 5))
    with pytest.raises(NotImplementedError, match="causal"):
        M.NeighborhoodAttention1D(8, 2, 3, is_causal=True, rel_pos_bias=True)
    with pytest.raises(ValueError, match=r"rpb must have shape \[heads, 2\*k-1 per axis\] = \[2, 5, 5\]"):
        F.natten2dqkrpb(q, q, torch.zeros(2, 3, 3), 3, 1)
    with pytest.raises(NotImplementedError, match="nested"):
        F.na1d_qk(torch.nested.nested_tensor([torch.randn(2, 5, 4)], layout=torch.jagged), q, 3)
    with pytest.raises(ValueError, match="use_backend"):
        F.use_backend("cutlass")


def test_context_functions_answer_for_our_backends():
    cuda = torch.cuda.is_available()
    assert F.has_cuda() == (cuda and "unfused" in kernels.available_backends("cuda"))
    assert F.has_fused_na() == F.has_fna() == (cuda and "fused" in kernels.available_backends("cuda"))
    assert F.has_gemm() is False  # no CUTLASS GEMM kernels here
    assert not F.is_fused_na_enabled()
    F.use_fused_na()
    assert F.is_fused_na_enabled() and F.is_fna_enabled() and F.is_kv_parallelism_in_fused_na_enabled()
    F.use_fna(False)
    assert not F.is_fused_na_enabled()
    F.set_memory_usage_preference("strict")
    assert F.is_memory_usage_strict() and not F.is_memory_usage_default()
    with pytest.raises(ValueError, match="pref must be one of"):
        F.set_memory_usage_preference("lenient")
    F.use_autotuner(forward_pass=True)
    assert F.is_autotuner_enabled() and F.is_autotuner_enabled_for_forward()
    assert not F.is_gemm_na_enabled() and not F.enable_gemm_na()


def _module_reference(module, x):
    """qkv -> dense brute-force attention -> proj, from the module's own parameters."""
    B, *spatial, C = x.shape
    q, k, v = module.qkv(x).reshape(B, *spatial, 3, module.num_heads, module.head_dim).unbind(-3)
    out = dense_na(q, k, v, module.kernel_size, module.dilation, module.is_causal, module.rpb, scale=module.scale)
    return module.proj(out.reshape(x.shape))


@pytest.mark.parametrize("cls,shape,kwargs", [
    (M.NeighborhoodAttention1D, (2, 10, 8), dict(kernel_size=3, dilation=3, is_causal=True)),
    (M.NeighborhoodAttention2D, (2, 7, 8, 8), dict(kernel_size=3, dilation=(2, 1), rel_pos_bias=True)),
    (M.NeighborhoodAttention3D, (1, 4, 5, 5, 8), dict(kernel_size=(3, 3, 5), rel_pos_bias=True, qk_scale=0.2)),
])
def test_modules_match_brute_force_and_round_trip(cls, shape, kwargs):
    torch.manual_seed(6)
    module = cls(8, 2, **kwargs).double()
    ndim = cls.ndim
    expected_keys = {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"} | (
        {"rpb"} if kwargs.get("rel_pos_bias") else set())
    assert set(module.state_dict()) == expected_keys
    if module.rpb is not None:
        assert module.rpb.shape == (2, *(2 * k - 1 for k in module.kernel_size))
    x = torch.randn(*shape, dtype=torch.float64)
    out = module(x)
    torch.testing.assert_close(out, _module_reference(module, x), rtol=1e-10, atol=1e-10)
    F.use_fused_na()  # 0.17's fused path: the same attention
    torch.testing.assert_close(module(x), out, rtol=1e-10, atol=1e-10)
    F.use_fused_na(False)
    assert f"kernel_size={module.kernel_size}" in repr(module)

    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    fresh = cls(8, 2, **kwargs).double()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(fresh(x), out, rtol=0, atol=0)

    # Like 0.17.4 (which no longer zero-padded), a map smaller than kernel * dilation is an error.
    small = x.narrow(1, 0, module.kernel_size[0] * module.dilation[0] - 1)
    with pytest.raises(ValueError, match="at least kernel_size"):
        module(small)
    with pytest.raises(ValueError, match=f"rank-{ndim + 2}"):
        module(x[0])


def test_module_trains_with_attention_dropout_on_the_fused_path():
    """0.17 silently skipped attention dropout under use_fused_na(); it is applied here."""
    torch.manual_seed(7)
    module = M.NeighborhoodAttention2D(8, 2, 3, rel_pos_bias=True, attn_drop=0.5).train()
    F.use_fused_na()
    x = torch.randn(1, 6, 6, 8)
    first, second = module(x), module(x)
    assert not torch.allclose(first, second)  # dropout masks differ between calls
    first.sum().backward()
    assert module.rpb.grad is not None and torch.isfinite(module.rpb.grad).all()


def test_fused_backend_through_compat():
    """The compat ops run on our Triton kernels too (interpreted on CPU): same answer as the reference."""
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 8, 1, 16, generator=g) for _ in range(3))
    want = F.na1d(q, k, v, 3, 2)
    F.use_backend("fused")
    torch.testing.assert_close(F.na1d(q, k, v, 3, 2), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# install()
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def clean_natten(monkeypatch):
    """No `natten` in sys.modules before or after (the real one is skipped over if installed)."""
    saved = {n: m for n, m in sys.modules.items() if n == "natten" or n.startswith("natten.")}
    for name in saved:
        monkeypatch.delitem(sys.modules, name)
    yield
    for name in [n for n in sys.modules if n == "natten" or n.startswith("natten.")]:
        del sys.modules[name]
    sys.modules.update(saved)


def test_install_serves_natten_when_absent(clean_natten, monkeypatch):
    if importlib.util.find_spec("natten") is not None:
        pytest.skip("a real NATTEN is installed here; install() leaves it alone (tested below)")
    assert M.install() is True and M.is_installed()
    assert M.install() is True  # idempotent
    import natten
    import natten.functional
    from natten import NeighborhoodAttention2D
    from natten.functional import natten2dav, natten2dqkrpb  # what HF DiNAT imports

    assert natten.__version__ == "0.17.4+dinat.triton"
    assert "dinat-triton" in natten.__doc__
    assert NeighborhoodAttention2D is M.NeighborhoodAttention2D
    assert natten.functional.na2d is F.na2d and natten2dqkrpb is F.natten2dqkrpb and natten2dav is F.natten2dav
    assert natten.has_fused_na() == F.has_fused_na()
    assert importlib.util.find_spec("natten") is not None  # what transformers 5.x asks
    from natten.na1d import NeighborhoodAttention1D
    from natten.natten3d import NeighborhoodAttention3D

    assert (NeighborhoodAttention1D, NeighborhoodAttention3D) == (M.NeighborhoodAttention1D, M.NeighborhoodAttention3D)
    M.uninstall()
    assert "natten" not in sys.modules


def _fake_natten(tmp_path, monkeypatch, body: str):
    pkg = tmp_path / "natten"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()


def test_install_leaves_a_working_natten_alone(clean_natten, monkeypatch, tmp_path):
    _fake_natten(tmp_path, monkeypatch, "__version__ = '0.17.4'\n")
    assert M.install() is False and not M.is_installed()
    import natten

    assert natten.__version__ == "0.17.4"


def test_install_replaces_a_broken_natten(clean_natten, monkeypatch, tmp_path):
    """NATTEN 0.17 wheels built for an older torch fail at import (libnatten): that counts as absent."""
    _fake_natten(tmp_path, monkeypatch, "raise ImportError('Failed to import libnatten.')\n")
    assert M.install() is True
    import natten

    assert natten.__version__ == "0.17.4+dinat.triton"


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers' DiNAT, unmodified.
# ---------------------------------------------------------------------------------------------


def test_hf_dinat_runs_unmodified_and_matches_our_model(clean_natten, monkeypatch):
    transformers = pytest.importorskip("transformers")
    import timm
    from transformers.models.dinat import modeling_dinat
    from transformers.utils import import_utils

    # As transformers leaves things without NATTEN: stubs bound at import, the backend check false.
    def stub(*args, **kwargs):
        raise RuntimeError("NATTEN stub called")

    monkeypatch.setattr(modeling_dinat, "natten2dqkrpb", stub)
    monkeypatch.setattr(modeling_dinat, "natten2dav", stub)
    monkeypatch.setitem(import_utils.BACKENDS_MAPPING, "natten", (lambda: False, "{0} requires natten"))
    patched = M.patch_transformers()  # also works on modules imported before it
    assert "transformers.models.dinat.modeling_dinat" in patched
    assert modeling_dinat.natten2dqkrpb is F.natten2dqkrpb and modeling_dinat.natten2dav is F.natten2dav
    from transformers import DinatConfig, DinatForImageClassification

    # Two levels; level 1 (8x8 at 32 px) has dilation 3: 3 * 3 > 8, so both models pad there.
    depths, heads, dilations = [2, 2], [2, 4], [[1, 2], [1, 3]]
    config = DinatConfig(embed_dim=16, depths=depths, num_heads=heads, kernel_size=3, dilations=dilations,
                         mlp_ratio=2.0, drop_path_rate=0.0, num_labels=5, image_size=32)
    hf = DinatForImageClassification(config).double().eval()
    ours = timm.create_model("dinat_mini", num_classes=5, embed_dim=16, depths=depths, num_heads=heads,
                             kernel_size=3, dilations=dilations, mlp_ratio=2.0, drop_path_rate=0.0).double().eval()
    with torch.no_grad():  # non-trivial biases, so a mismatched rpb slot order would show
        for name, p in hf.named_parameters():
            if name.endswith("rpb"):
                p.normal_()
    ours.load_state_dict(hf.state_dict())  # the Hugging Face layout, converted by models/_checkpoint.py

    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    logits = hf(x).logits
    want = ours(x)
    torch.testing.assert_close(logits, want, rtol=1e-10, atol=1e-10)
    logits.square().sum().backward()
    want.square().sum().backward()
    hf_rpb = hf.dinat.encoder.levels[1].layers[1].attention.self.rpb.grad
    our_rpb = ours.levels[1].blocks[1].attn.rpb.grad
    assert hf_rpb is not None and hf_rpb.abs().sum() > 0
    torch.testing.assert_close(hf_rpb, our_rpb, rtol=1e-9, atol=1e-9)
    assert transformers.utils.import_utils.is_natten_available()


def test_hf_nat_runs_unmodified_and_matches_our_model(clean_natten):
    """NAT (no dilation; a deprecated model in transformers 4.x) goes through the same patch."""
    pytest.importorskip("transformers")
    import timm

    if "transformers.models.deprecated.nat.modeling_nat" not in M.patch_transformers():
        pytest.skip("this transformers release has no NAT")
    from transformers import NatConfig, NatForImageClassification

    config = NatConfig(embed_dim=8, depths=[1, 2], num_heads=[1, 2], kernel_size=5, mlp_ratio=2.0,
                       drop_path_rate=0.0, num_labels=3)
    hf = NatForImageClassification(config).double().eval()
    ours = timm.create_model("nat_mini", num_classes=3, embed_dim=8, depths=[1, 2], num_heads=[1, 2], kernel_size=5,
                             mlp_ratio=2.0, drop_path_rate=0.0).double().eval()
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(1, 3, 24, 24, dtype=torch.float64)
    logits = hf(x).logits
    torch.testing.assert_close(logits, ours(x), rtol=1e-10, atol=1e-10)
    logits.sum().backward()
    assert torch.isfinite(hf.nat.encoder.levels[0].layers[0].attention.self.rpb.grad).all()
