"""DiNAT / NAT timm models: constructor contract, forward/backward, parameter counts."""

import pytest
import timm
import torch

import models  # noqa: F401  (registers the models)

TINY = dict(num_classes=10, embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), kernel_size=3,
            dilations=((1,), (1,), (1, 2), (1,)))


def test_tiny_demo_model_trains():
    model = timm.create_model("dinat_mini", **TINY)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_features_only():
    model = timm.create_model("dinat_mini", features_only=True, out_indices=(1, 3), **{k: v for k, v in TINY.items() if k != "num_classes"})
    feats = model(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == model.feature_info.channels() == [64, 256]
    assert [64 // f.shape[-1] for f in feats] == model.feature_info.reduction() == [8, 32]
