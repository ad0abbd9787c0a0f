"""DiNAT / NAT / DiNAT_s / isotropic timm models on CPU.

Every registered name is built at full size on the meta device (parameter count, FLOPs) and,
with its width and depth shrunk but its kernel size, dilation pattern, heads and layer scale
kept, runs forward/backward, gradient checkpointing, features_only, reset_classifier and the
state-dict round trip through the original and the Hugging Face checkpoint layouts.
"""

from __future__ import annotations

import copy
import inspect
import re

import pytest
import safetensors.torch
import timm
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from dinat import kernels
from dinat import models
from dinat.models.layers import GlobalAttentionRPB, NeighborhoodAttention2d

from .brute_force import dense_na

# name -> (parameters in millions at 1000 classes, as counted from the original code; heads of level 0)
VARIANTS = {
    "nat_mini": (19.98, 2), "dinat_mini": (19.98, 2),
    "nat_tiny": (27.90, 2), "dinat_tiny": (27.90, 2),
    "nat_small": (50.74, 3), "dinat_small": (50.72, 3),
    "nat_base": (89.77, 4), "dinat_base": (89.77, 4),
    "dinat_large": (200.94, 6), "dinat_large_384": (200.94, 6), "dinat_large_384_11x11": (201.14, 6),
    "dinat_s_tiny": (28.29, 3), "dinat_s_small": (49.61, 3), "dinat_s_base": (87.77, 4),
    "dinat_s_large": (196.53, 6), "dinat_s_large_384": (196.53, 6),
    "nat_isotropic_small": (22.00, 12), "dinat_isotropic_small": (22.00, 12),
    "nat_isotropic_base": (86.47, 24), "dinat_isotropic_base": (86.47, 24),
    "vitrpb_small": (22.08, 12), "vitrpb_base": (86.63, 24),
}
HF_FORMAT = [n for n in VARIANTS if re.fullmatch(r"(di)?nat_(mini|tiny|small|base|large.*)", n)]
TINY_DEMO = dict(num_classes=10, embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), kernel_size=3,
                 dilations=((1,), (1,), (1, 2), (1,)))


@pytest.fixture(autouse=True)
def one_thread():
    # Small CPU ops are dominated by thread synchronisation on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def is_isotropic(name: str) -> bool:
    return "isotropic" in name or "vitrpb" in name


def shrunk(name: str, **extra) -> dict:
    """Kwargs keeping a variant's kernel size, dilation pattern, heads and layer scale, at width 2/head.

    Two blocks per level keep one dilated block in each. Inputs smaller than kernel * dilation
    are padded up to it (the original rule), so 32 px costs 88x88 tokens in an 11x11, dilation-8
    level: the width is what keeps these tests fast.
    """
    heads = VARIANTS[name][1]
    kwargs = dict(depth=2) if is_isotropic(name) else dict(depths=(2, 2, 2, 2))
    return dict(kwargs, embed_dim=2 * heads, drop_path_rate=0.0, **extra)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_variant_is_registered():
    registered = {n for module in ("dinat", "dinat_s", "isotropic") for n in timm.list_models(module=module)}
    assert registered == set(VARIANTS)
    for name in VARIANTS:
        assert timm.is_model(name), name
        cfg = timm.get_pretrained_cfg(name)
        assert cfg.url and cfg.first_conv and cfg.classifier == "head"


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_param_count_matches_original(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert count_params(model) / 1e6 == pytest.approx(VARIANTS[name][0], rel=1e-3)


@pytest.mark.parametrize("name,gmacs", [("dinat_mini", 2.7), ("dinat_tiny", 4.3), ("dinat_small", 7.8),
                                        ("dinat_base", 13.7), ("nat_mini", 2.7)])
def test_flops_match_paper(name, gmacs):
    with torch.device("meta"):
        model = timm.create_model(name).eval()
    # The forward runs outside the meta context: NA's cached index tables must be made on the CPU.
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.empty(1, 3, 224, 224, device="meta"))
    assert counter.get_total_flops() / 2e9 == pytest.approx(gmacs, rel=0.03)  # FLOPs = 2 x MACs


def _hf_layout(state_dict: dict, root: str) -> dict:
    """The Hugging Face Dinat/NatForImageClassification layout, written from its key description."""
    out, gammas = {}, {}
    for key, value in state_dict.items():
        value = value.clone()
        if key.startswith("patch_embed.proj."):
            out[f"{root}.embeddings.patch_embeddings.projection." + key[len("patch_embed.proj."):]] = value
        elif key.startswith("patch_embed.norm."):
            out[f"{root}.embeddings.norm." + key[len("patch_embed.norm."):]] = value
        elif key.startswith("norm."):
            out[f"{root}.layernorm." + key[len("norm."):]] = value
        elif key.startswith("head."):
            out["classifier." + key[len("head."):]] = value
        elif ".downsample." in key:
            out[f"{root}.encoder." + key] = value
        else:
            level, block, rest = re.fullmatch(r"levels\.(\d+)\.blocks\.(\d+)\.(.+)", key).groups()
            prefix = f"{root}.encoder.levels.{level}.layers.{block}."
            if rest.startswith("attn.qkv."):
                kind = rest.rsplit(".", 1)[1]
                for part, chunk in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                    out[prefix + f"attention.self.{part}.{kind}"] = chunk.contiguous()
            elif rest in ("gamma1", "gamma2"):
                gammas.setdefault(prefix, {})[rest] = value
            else:
                renames = {"norm1.": "layernorm_before.", "norm2.": "layernorm_after.", "attn.rpb": "attention.self.rpb",
                           "attn.proj.": "attention.output.dense.", "mlp.fc1.": "intermediate.dense.",
                           "mlp.fc2.": "output.dense."}
                old = next(o for o in renames if rest.startswith(o))
                out[prefix + renames[old] + rest[len(old):]] = value
    for prefix, g in gammas.items():
        out[prefix + "layer_scale_parameters"] = torch.stack([g["gamma1"], g["gamma2"]])
    return out


def _same_outputs(expected: torch.Tensor, model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_end_to_end(name, tmp_path):
    torch.manual_seed(0)
    kwargs = shrunk(name, num_classes=7)
    model = timm.create_model(name, **kwargs)
    x = torch.randn(1, 3, 32, 32)

    # forward / backward: finite, every parameter reached
    out = model(x)
    assert out.shape == (1, 7) and torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    # gradient checkpointing: same output and gradients
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out_ckpt = model(x)
    out_ckpt.square().mean().backward()
    torch.testing.assert_close(out_ckpt, out)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)
    model.set_grad_checkpointing(False)
    with torch.no_grad():
        expected = model.eval()(x)

    # the original layout round trip, through timm's pretrained path and checkpoint_path=
    path = tmp_path / "original.pth"
    torch.save({"model": model.state_dict()}, path)
    loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=7), **kwargs)
    _same_outputs(expected, loaded, x)
    _same_outputs(expected, timm.create_model(name, checkpoint_path=str(path), **kwargs), x)

    # the Hugging Face layout (where one exists), as safetensors
    if name in HF_FORMAT:
        hf_path = tmp_path / "model.safetensors"
        root = "nat" if name.startswith("nat_") else "dinat"
        safetensors.torch.save_file(_hf_layout(model.state_dict(), root), str(hf_path))
        loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(hf_path), num_classes=7),
                                   **kwargs)
        _same_outputs(expected, loaded, x)

    # features_only: shapes agree with feature_info
    features = timm.create_model(name, features_only=True, **shrunk(name))
    maps = features(x)
    assert [m.shape[1] for m in maps] == features.feature_info.channels()
    assert [32 // m.shape[-1] for m in maps] == features.feature_info.reduction()

    # reset_classifier(0): pooled features
    model.reset_classifier(0)
    assert model(x).shape == (1, model.num_features)


def test_tiny_demo_model_trains():
    model = timm.create_model("dinat_mini", **TINY_DEMO)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    attn = [m for m in model.modules() if isinstance(m, NeighborhoodAttention2d)]
    assert [(a.kernel_size, a.dilation) for a in attn] == [(3, 1), (3, 1), (3, 1), (3, 2), (3, 1)]


def test_constructor_keywords_reach_the_layers():
    model = timm.create_model(
        "dinat_mini", in_chans=1, num_classes=3, embed_dim=16, depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4),
        kernel_size=5, dilations=((2,), (1, 3), (1,), (1,)), mlp_ratio=2.0, qkv_bias=False, drop_rate=0.1,
        attn_drop_rate=0.1, drop_path_rate=0.3, layer_scale=0.5, global_pool="", na_backend="reference",
    )
    assert model.patch_embed.proj[0].in_channels == 1
    block = model.levels[1].blocks[1]
    assert (block.attn.kernel_size, block.attn.dilation, block.attn.backend) == (5, 3, "reference")
    assert block.attn.qkv.bias is None and block.mlp.fc1.out_features == 64
    assert block.attn.attn_drop.p == 0.1 and block.attn.proj_drop.p == 0.1
    torch.testing.assert_close(block.gamma1, torch.full((32,), 0.5))
    assert model.levels[3].blocks[0].drop_path1.drop_prob == pytest.approx(0.3)
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 2, 2, 3)  # no pooling


@pytest.mark.parametrize("kwargs,match", [
    (dict(dilations=((1,), (1,), (1,), (1,))), "dilations"),
    (dict(dilations=((0, 1, 1), (1,) * 4, (1,) * 6, (1,) * 5)), "dilations"),
    (dict(global_pool="max"), "global_pool"),
    (dict(num_heads=(3, 4, 8, 16)), "num_heads"),
    (dict(kernel_size=4), "kernel_size"),
])
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model("dinat_mini", **kwargs)


def test_full_size_dinat_mini_at_224():
    model = timm.create_model("dinat_mini").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


@pytest.mark.parametrize("size", [(32, 32), (45, 71)])
def test_any_input_size_and_channels_last(size):
    model = timm.create_model("dinat_mini", **TINY_DEMO).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last)), model(x))


def test_autocast_bfloat16():
    model = timm.create_model("dinat_mini", **TINY_DEMO).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)


@pytest.mark.slow
def test_torch_compile():
    model = timm.create_model("dinat_mini", num_classes=4, embed_dim=16, depths=(1, 1, 1, 1), num_heads=1,
                              kernel_size=3, dilations=((2,), (1,), (1,), (1,))).eval()
    x = torch.randn(1, 3, 32, 32)
    compiled = torch.compile(model, backend="eager")  # dynamo capture; inductor would add minutes of C++ builds
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


def test_forward_intermediates_and_head():
    model = timm.create_model("dinat_mini", **TINY_DEMO).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert [t.shape for t in inter] == [(1, 32, 16, 16), (1, 64, 8, 8), (1, 128, 4, 4), (1, 256, 2, 2)]
        torch.testing.assert_close(final, model.forward_features(x))
        nhwc = model.forward_intermediates(x, indices=[1], output_fmt="NHWC", intermediates_only=True)
        torch.testing.assert_close(nhwc[0], inter[1].permute(0, 2, 3, 1))
        pre = model.forward_head(final, pre_logits=True)
        torch.testing.assert_close(pre, final.mean((1, 2)))
        torch.testing.assert_close(model.get_classifier()(pre), model(x))


def test_weight_decay_and_layer_decay_groups():
    model = timm.create_model("dinat_mini", **TINY_DEMO)
    rpbs = {n for n, _ in model.named_parameters() if n.endswith("attn.rpb")}
    assert model.no_weight_decay() == rpbs and len(rpbs) == 5
    from timm.optim import param_groups_layer_decay

    groups = param_groups_layer_decay(model, weight_decay=0.05, no_weight_decay_list=model.no_weight_decay(),
                                      layer_decay=0.5)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # one layer id for the stem, one per block, one for the head: 1 + 5 + 1 scales
    assert len({g["lr_scale"] for g in groups}) == 7


def test_hf_bin_through_checkpoint_path(tmp_path):
    model = timm.create_model("nat_small", **shrunk("nat_small", num_classes=5))
    path = tmp_path / "pytorch_model.bin"
    torch.save(_hf_layout(model.state_dict(), "nat"), path)
    loaded = timm.create_model("nat_small", checkpoint_path=str(path), **shrunk("nat_small", num_classes=5))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        _same_outputs(model.eval()(x), loaded, x)
    loaded = models.load_checkpoint(timm.create_model("nat_small", **shrunk("nat_small", num_classes=5)), path)
    assert not loaded.missing_keys and not loaded.unexpected_keys
    # a bare NatModel backbone: no `nat.` prefix, no classifier
    backbone = {k[len("nat."):]: v for k, v in _hf_layout(model.state_dict(), "nat").items() if k.startswith("nat.")}
    headless = timm.create_model("nat_small", **shrunk("nat_small", num_classes=0))
    headless.load_state_dict(backbone)
    with torch.no_grad():
        torch.testing.assert_close(headless.eval()(x), model.forward_head(model.forward_features(x), pre_logits=True))


def test_checkpoint_of_neither_format_lists_keys(tmp_path):
    model = timm.create_model("dinat_mini", **TINY_DEMO)
    state = {k.replace("levels.", "stages."): v for k, v in model.state_dict().items()}
    path = tmp_path / "foreign.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"unexpected keys \['stages\.0.*missing keys \['levels\.0"):
        timm.create_model("dinat_mini", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **TINY_DEMO)
    with pytest.raises(ValueError, match="neither"):
        model.load_state_dict(state)


def test_pretrained_head_is_dropped_for_other_class_counts(tmp_path):
    source = timm.create_model("dinat_mini", **dict(TINY_DEMO, num_classes=1000))
    path = tmp_path / "in1k.pth"
    torch.save(source.state_dict(), path)
    model = timm.create_model("dinat_mini", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **TINY_DEMO)
    torch.testing.assert_close(model.levels[2].blocks[1].attn.rpb, source.levels[2].blocks[1].attn.rpb)
    assert model.head.out_features == 10


def test_rpb_of_another_kernel_size_needs_interpolate_rpb(tmp_path):
    small = dict(shrunk("dinat_large"), num_classes=5)
    source = timm.create_model("dinat_large", **small)  # 7x7
    path = tmp_path / "k7.pth"
    torch.save(source.state_dict(), path)
    with pytest.raises(ValueError, match="interpolate_rpb=True"):
        timm.create_model("dinat_large_384_11x11", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                          **small)
    model = timm.create_model("dinat_large_384_11x11", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              interpolate_rpb=True, **small)
    rpb7, rpb11 = source.levels[0].blocks[1].attn.rpb, model.levels[0].blocks[1].attn.rpb
    assert rpb11.shape == (6, 21, 21)
    torch.testing.assert_close(rpb11, models.interpolate_rpb(rpb7, 11))
    # bicubic resizing keeps a constant bias constant
    torch.testing.assert_close(models.interpolate_rpb(torch.full((2, 13, 13), 0.3), 11), torch.full((2, 21, 21), 0.3))
    torch.testing.assert_close(model.levels[0].blocks[1].mlp.fc1.weight, source.levels[0].blocks[1].mlp.fc1.weight)


def _bicubic_resize(table: torch.Tensor, side: int) -> torch.Tensor:
    """The resizing both RPB resizers stood for before they called timm's: F.interpolate, bicubic, corners not aligned."""
    return torch.nn.functional.interpolate(table.unsqueeze(0), size=(side, side), mode="bicubic",
                                           align_corners=False).squeeze(0)


@pytest.mark.parametrize("heads, src_kernel, dst_kernel", [(3, 7, 11), (2, 11, 7), (4, 5, 9), (1, 7, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rpb_resizers_are_bicubic_interpolation(heads, src_kernel, dst_kernel, dtype):
    torch.manual_seed(src_kernel * dst_kernel + heads)
    table = torch.randn(heads, 2 * src_kernel - 1, 2 * src_kernel - 1).to(dtype)
    # interpolate_rpb (checkpoints): computed in float32, returned in the table's dtype
    expected = _bicubic_resize(table.float(), 2 * dst_kernel - 1).to(dtype)
    torch.testing.assert_close(models.interpolate_rpb(table, dst_kernel), expected, rtol=0, atol=0)
    # GlobalAttentionRPB on a map larger than its table: resized in the table's own dtype
    layer = GlobalAttentionRPB(8 * heads, heads, input_size=src_kernel, dtype=dtype)
    with torch.no_grad():
        layer.rpb.copy_(table)
        side = max(src_kernel, dst_kernel)
        resized = _bicubic_resize(table, 2 * side - 1) if side > src_kernel else table
        bias = layer.relative_bias(side, side)  # [heads, query, key], offsets key - query shifted by side - 1
    # the first query sees offsets 0 .. side-1, the last one -(side-1) .. 0
    torch.testing.assert_close(bias[:, 0], resized[:, side - 1:, side - 1:].reshape(heads, -1), rtol=0, atol=0)
    torch.testing.assert_close(bias[:, -1], resized[:, :side, :side].reshape(heads, -1), rtol=0, atol=0)


def _dense_layer(layer: NeighborhoodAttention2d, x: torch.Tensor) -> torch.Tensor:
    """The original layer written densely: pad right/bottom to k*d, qkv, brute-force NA, crop, proj."""
    B, H, W, C = x.shape
    window = layer.kernel_size * layer.dilation
    xp = torch.nn.functional.pad(x, (0, 0, 0, max(0, window - W), 0, max(0, window - H)))
    q, k, v = layer.qkv(xp).reshape(*xp.shape[:3], 3, layer.num_heads, -1).unbind(3)
    ks, ds = (layer.kernel_size,) * 2, (layer.dilation,) * 2
    out = dense_na(q.double(), k.double(), v.double(), ks, ds, (False, False), rpb=layer.rpb.double())
    return layer.proj(out.float().reshape(*xp.shape[:3], C)[:, :H, :W])


@settings(max_examples=25, deadline=None)
@given(height=st.integers(1, 9), width=st.integers(1, 9), kernel_size=st.sampled_from([3, 5]),
       dilation=st.integers(1, 3), unfused=st.booleans())
def test_na_layer_matches_dense_brute_force(height, width, kernel_size, dilation, unfused):
    torch.manual_seed(height * 100 + width)
    layer = NeighborhoodAttention2d(8, 2, kernel_size, dilation)
    if unfused:  # the attention-dropout path (materialised logits); p tiny enough to drop nothing
        layer.attn_drop.p = 1e-12
    x = torch.randn(2, height, width, 8)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _dense_layer(layer, x), rtol=1e-4, atol=1e-5)


def test_global_rpb_attention_equals_na_covering_the_map():
    # NA whose 7x7 window covers a 7x7 map is global attention; both index the bias by key - query.
    torch.manual_seed(0)
    na = NeighborhoodAttention2d(16, 4, kernel_size=7).eval()
    full = GlobalAttentionRPB(16, 4, input_size=7).eval()
    full.load_state_dict(na.state_dict())
    x = torch.randn(2, 7, 7, 16)
    with torch.no_grad():
        torch.testing.assert_close(full(x), na(x), rtol=1e-4, atol=1e-5)
        # larger maps: the table resized to cover them, which leaves a constant bias constant
        nn.init.constant_(full.rpb, 0.25)
        wide = GlobalAttentionRPB(16, 4, input_size=9).eval()
        wide.load_state_dict({k: v for k, v in full.state_dict().items() if k != "rpb"}, strict=False)
        nn.init.constant_(wide.rpb, 0.25)
        x = torch.randn(1, 9, 8, 16)
        torch.testing.assert_close(full(x), wide(x), rtol=1e-4, atol=1e-5)


def test_vitrpb_runs_above_its_training_size():
    model = timm.create_model("vitrpb_small", **shrunk("vitrpb_small", num_classes=3)).eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 256, 288))).all()


def test_hydra_list_configs_are_sequences():
    OmegaConf = pytest.importorskip("omegaconf").OmegaConf  # a project dependency; absent on bare GPU images

    cfg = OmegaConf.create({k: [list(d) for d in v] if k == "dilations" else (list(v) if isinstance(v, tuple) else v)
                            for k, v in TINY_DEMO.items()})
    model = timm.create_model("dinat_mini", **cfg)
    assert [m.dilation for m in model.modules() if isinstance(m, NeighborhoodAttention2d)] == [1, 1, 1, 2, 1]


@pytest.mark.parametrize("backend", [b for b in ("unfused", "fused") if b in kernels.available_backends("cpu")])
def test_triton_backends_match_reference_in_a_model(backend):
    # On CPU the Triton kernels run in the interpreter (tests/conftest.py), so keep the model tiny.
    torch.manual_seed(0)
    kwargs = dict(num_classes=3, embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), kernel_size=3,
                  dilations=((2,), (1,), (1,), (1,)), drop_path_rate=0.0)
    reference = timm.create_model("dinat_mini", na_backend="reference", **kwargs)
    model = timm.create_model("dinat_mini", na_backend=backend, **kwargs)
    model.load_state_dict(reference.state_dict())
    x = torch.randn(1, 3, 32, 32)
    expected = reference(x)
    expected.sum().backward()
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-3, atol=1e-5, msg=name)


def test_features_only_prunes_unused_levels():
    kwargs = {k: v for k, v in TINY_DEMO.items() if k != "num_classes"}
    features = timm.create_model("dinat_mini", features_only=True, out_indices=(0, 1), **kwargs)
    assert len(features.model.levels) == 2 and features.model.levels[1].downsample is None
    maps = features(torch.randn(1, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(1, 32, 16, 16), (1, 64, 8, 8)]
    assert features.feature_info.channels() == [32, 64] and features.feature_info.reduction() == [4, 8]


@pytest.mark.parametrize("name, container", [("dinat_mini", "levels"), ("dinat_s_tiny", "layers")])
def test_get_levels_is_the_level_list_of_either_family(name, container):
    with torch.device("meta"):
        model = timm.create_model(name)
    levels = model.get_levels()
    assert levels is getattr(model, container) and len(levels) == 4
    assert [level.downsample is None for level in levels] == [False, False, False, True]
    dilations = [[block.attn.dilation for block in level.blocks] for level in levels]
    assert dilations[0][:2] == [1, 8] and dilations[1][:2] == [1, 4] and set(dilations[3]) == {1}


# --- timm's model conventions ---------------------------------------------------------------------
# What timm's own model suite (tests/test_models.py of timm) checks for its models, asserted here in
# our words on shrunk models so that CI guards it; docs/models.md records a run of timm's suite itself.

FAMILY_REPRESENTATIVES = ["dinat_mini", "dinat_s_tiny", "dinat_isotropic_small", "vitrpb_small"]
TAGGED = sorted(timm.list_models(module=["dinat", "dinat_s", "isotropic"], include_tags=True))


def _unpooled_shape(model: nn.Module, batch: int, size: int) -> tuple:
    """The NHWC map ``forward_features`` returns for ``size`` px inputs (the last tap's reduction)."""
    side = size // model.feature_info[-1]["reduction"]
    return (batch, side, side, model.num_features)


@pytest.mark.parametrize("tagged", TAGGED)
def test_pretrained_cfg_describes_the_model(tagged):
    name = tagged.split(".")[0]
    model = timm.create_model(tagged, **shrunk(name))
    cfg = model.pretrained_cfg
    assert model.in_chans == cfg["input_size"][0] == 3 and model.output_fmt == "NHWC"
    # pool_size: the unpooled feature map at the cfg's input size
    reduction = model.feature_info[-1]["reduction"]
    assert reduction == (16 if is_isotropic(name) else 32)
    assert cfg["pool_size"] == (cfg["input_size"][1] // reduction, cfg["input_size"][2] // reduction)
    params = dict(model.named_parameters())
    assert params[f"{cfg['first_conv']}.weight"].ndim == 4  # the stem convolution, as timm adapts in_chans
    assert params[f"{cfg['classifier']}.weight"].shape == (cfg["num_classes"], model.num_features)
    assert model.head_hidden_size == model.num_features


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_full_size_feature_taps(name):
    # features_only needs at least three taps, each a map at least as coarse as the one before.
    model = timm.create_model(name, device="meta")
    reductions = [f["reduction"] for f in model.feature_info]
    assert len(reductions) >= 3 and reductions == sorted(reductions)
    assert model.feature_info[-1]["num_chs"] == model.num_features


@pytest.mark.parametrize("tagged", ["dinat_mini.in1k", "dinat_large_384.in22k_ft_in1k", "dinat_s_large_384.in22k_ft_in1k",
                                    "nat_isotropic_small.in1k", "vitrpb_small.in1k"])
def test_features_at_the_cfg_input_size(tagged):
    # Shapes only: the meta device runs no arithmetic, so the full cfg input size costs nothing.
    name = tagged.split(".")[0]
    model = timm.create_model(tagged, device="meta", **shrunk(name)).eval()
    size = model.pretrained_cfg["input_size"][-1]
    features = model.forward_features(torch.empty(2, 3, size, size, device="meta"))
    assert features.shape == (2, *model.pretrained_cfg["pool_size"], model.num_features)
    assert model.forward_head(features, pre_logits=True).shape == (2, model.head_hidden_size)


@pytest.mark.parametrize("name", FAMILY_REPRESENTATIVES)
def test_classifier_removal_and_reset(name):
    torch.manual_seed(0)
    model = timm.create_model(name, **shrunk(name, num_classes=5)).eval()
    x = torch.randn(1, 3, 64, 64)
    assert inspect.signature(model.reset_classifier).parameters["global_pool"].default is None
    with torch.no_grad():
        pre_logits = model.forward_head(model.forward_features(x), pre_logits=True)
        model.reset_classifier(0)  # keeps the pooling: forward gives the pre-logits
        assert model.num_classes == 0
        torch.testing.assert_close(model(x), pre_logits)
        model.reset_classifier(0, "")  # no pooling either: the unpooled map
        torch.testing.assert_close(model(x), model.forward_features(x))
        assert model(x).shape == _unpooled_shape(model, 1, 64)
        assert timm.create_model(name, **shrunk(name, num_classes=0))(x).shape == pre_logits.shape
        unpooled = timm.create_model(name, **shrunk(name, num_classes=0, global_pool=""))
        assert unpooled(x).shape == _unpooled_shape(model, 1, 64)

        # a new head follows the model's dtype and train/eval mode, and pools again when asked
        model.to(dtype=torch.float64)
        model.reset_classifier(3, "avg")
        head = model.get_classifier()
        assert head.weight.dtype == torch.float64
        assert not any(m.training for m in model.modules())  # nothing switched back to train mode
        assert model(x.double()).shape == (1, 3)

    # a frozen model stays frozen through head removal
    frozen = timm.create_model(name, **shrunk(name)).requires_grad_(False)
    frozen.reset_classifier(0)
    frozen.reset_classifier(0, "")
    assert not any(p.requires_grad for p in frozen.parameters())


@pytest.mark.parametrize("name", FAMILY_REPRESENTATIVES)
def test_factory_device_dtype_and_unknown_arguments(name):
    model = timm.create_model(name, device="meta", dtype=torch.float64, **shrunk(name))
    assert {(t.device.type, t.dtype) for t in [*model.parameters(), *model.buffers()]} == {("meta", torch.float64)}
    model.reset_classifier(4)
    assert (model.head.weight.device.type, model.head.weight.dtype) == ("meta", torch.float64)
    with pytest.raises(TypeError):
        timm.create_model(name, not_a_model_argument=1)
    # a dtype change after a forward leaves nothing behind in the old dtype
    model = timm.create_model(name, **shrunk(name)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model(x)
        assert model.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16


def test_optimizer_hooks_match_parameters():
    # group_matcher must split the model (layer decay), no_weight_decay must name real parameters.
    from timm.models._manipulate import group_parameters

    for name in FAMILY_REPRESENTATIVES:
        model = timm.create_model(name, **shrunk(name))
        groups = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
        assert len(set(groups.values())) > 1, name
        names = {n for n, _ in model.named_parameters()}
        assert model.no_weight_decay() <= names and model.no_weight_decay(), name


class _TimmTracer(torch.fx.Tracer):
    """torch.fx with timm's leaf modules and wrapped functions, as timm's FX feature extraction traces."""

    def __init__(self):
        from timm.models import get_notrace_functions, get_notrace_modules

        super().__init__(autowrap_functions=tuple(get_notrace_functions()), param_shapes_constant=True)
        self.leaf_types = tuple(get_notrace_modules())

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, self.leaf_types) or super().is_leaf_module(module, qualified_name)


def _fx_trace(model: nn.Module) -> torch.fx.GraphModule:
    return torch.fx.GraphModule(model, _TimmTracer().trace(model))


@pytest.mark.parametrize("name", FAMILY_REPRESENTATIVES)
def test_torchscript_and_fx(name):
    torch.manual_seed(0)
    model = timm.create_model(name, **shrunk(name, num_classes=5, layer_scale=1e-2)).eval()
    x = torch.randn(2, 3, 40, 56)  # not a multiple of the patch size: the padding paths run too
    with torch.no_grad():
        expected = model(x)
        with timm.set_scriptable(True):
            scripted = torch.jit.script(model)
        torch.testing.assert_close(scripted(x), expected)
        traced = _fx_trace(model)
        torch.testing.assert_close(traced(x), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.jit.script(traced)(x), expected, rtol=1e-4, atol=1e-5)
    # backward through the traced graph reaches every parameter
    traced.train()
    traced(x).mean().backward()
    assert all(p.grad is not None for p in traced.parameters())


@pytest.mark.parametrize("name", ["dinat_mini", "dinat_s_tiny", "nat_isotropic_small"])
def test_forward_intermediates_stop_early_and_pruning(name):
    torch.manual_seed(0)
    model = timm.create_model(name, **shrunk(name, num_classes=5)).eval()
    x = torch.randn(1, 3, 64, 64)
    num_taps = len(model.feature_info)
    assert num_taps >= 2
    with torch.no_grad():
        expected = model(x)
        final, taps = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert [t.shape[1] for t in taps] == [f["num_chs"] for f in model.feature_info]
        assert [64 // t.shape[-1] for t in taps] == [f["reduction"] for f in model.feature_info]
        model.set_grad_checkpointing(True)
        torch.testing.assert_close(model.forward_intermediates(x)[0], final)
        model.set_grad_checkpointing(False)
        kept_head = copy.deepcopy(model)
        kept_head.prune_intermediate_layers([num_taps - 1], prune_head=False)
        torch.testing.assert_close(kept_head(x), expected)
        for i in range(num_taps):
            early = model.forward_intermediates(x, indices=[i], stop_early=True, intermediates_only=True)
            torch.testing.assert_close(early[0], taps[i])
            pruned = copy.deepcopy(model)
            indices = pruned.prune_intermediate_layers([i], prune_norm=True)
            torch.testing.assert_close(pruned.forward_intermediates(x, indices=indices, intermediates_only=True)[0],
                                       taps[i])
            if i < num_taps - 1:  # without the final norm the features end at the tap
                torch.testing.assert_close(pruned.forward_features(x).permute(0, 3, 1, 2), taps[i])
    # a pruned model trains: every parameter left is used
    pruned.train()
    sum(t.sum() for t in pruned.forward_intermediates(x, indices=indices, intermediates_only=True)).backward()
    assert all(p.grad is not None for p in pruned.parameters())
