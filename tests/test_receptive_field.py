"""The autograd receptive field equals what the window geometry says, for one layer and stacked layers."""

from __future__ import annotations

import pytest
import torch

from benchmarks import receptive_field
from dinat.kernels.geometry import axis_window
from dinat.models import NATLayer


def _axis_visible(length: int, layers: list[tuple[int, int]], index: int) -> torch.Tensor:
    """Tokens along one axis that output ``index`` of the last layer depends on: the last layer's
    window, then every earlier layer's window of each of those tokens (``layers`` first to last)."""
    visible = torch.zeros(length, dtype=torch.bool)
    visible[index] = True
    for kernel_size, dilation in reversed(layers):
        neighbors, _, _ = axis_window(length, kernel_size, dilation, False)
        grown = torch.zeros(length, dtype=torch.bool)
        grown[neighbors[visible].flatten()] = True
        visible = grown
    return visible


def _expected(spatial: tuple[int, int], layers: list[tuple[int, int]], pixel: tuple[int, int]) -> torch.Tensor:
    # A 2-D window is the product of the per-axis windows, so their composition is the product too.
    rows = _axis_visible(spatial[0], layers, pixel[0])
    cols = _axis_visible(spatial[1], layers, pixel[1])
    return rows[:, None] & cols[None, :]


def _layers(specs: list[tuple[int, int]], dim: int = 8, seed: int = 0) -> list[NATLayer]:
    torch.manual_seed(seed)
    return [NATLayer(dim, 2, k, d, mlp_ratio=2.0, na_backend="reference").eval().double() for k, d in specs]


# (map, pixel, kernel_size, dilation). Maps are at least k*d per axis (no padding); pixels are
# interior, on a border (window shifted inward) and in a corner.
SINGLE_LAYER_CASES = [
    ((9, 11), (4, 5), 3, 2),
    ((9, 11), (0, 10), 3, 2),
    ((16, 15), (8, 7), 5, 3),
    ((16, 15), (1, 14), 5, 3),
    ((10, 12), (5, 6), 7, 1),
]


@pytest.mark.parametrize("spatial,pixel,kernel_size,dilation", SINGLE_LAYER_CASES)
def test_one_layer_sees_exactly_its_dilated_window(spatial, pixel, kernel_size, dilation):
    layer = _layers([(kernel_size, dilation)])
    mask = receptive_field.receptive_fields(layer, spatial, 8, pixel)[0]
    expected = _expected(spatial, [(kernel_size, dilation)], pixel)
    assert int(expected.sum()) == kernel_size ** 2
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("spatial,pixel,specs", [
    ((12, 10), (6, 5), [(3, 1), (3, 3)]),
    ((12, 10), (11, 0), [(3, 1), (3, 3)]),
    ((14, 13), (7, 6), [(3, 4), (5, 1)]),
    ((15, 15), (2, 9), [(5, 3), (3, 2)]),
])
def test_stacked_layers_see_the_composition_of_their_windows(spatial, pixel, specs):
    layers = _layers(specs, seed=1)
    stacked = receptive_field.receptive_fields(layers, spatial, 8, pixel)
    alone = receptive_field.receptive_fields(layers, spatial, 8, pixel, stacked=False)
    assert torch.equal(stacked[0], _expected(spatial, specs[:1], pixel))
    assert torch.equal(stacked[1], _expected(spatial, specs, pixel))
    assert torch.equal(alone[1], _expected(spatial, specs[1:], pixel))  # the second layer on its own inputs
    assert stacked[1].sum() > alone[1].sum()


def test_pixel_outside_the_map_is_refused():
    with pytest.raises(ValueError, match="outside"):
        receptive_field.receptive_fields(_layers([(3, 1)]), (5, 5), 8, (5, 0))


def test_tool_on_real_models_matches_geometry_and_writes_png(tmp_path, capsys):
    """The command line on nat_mini vs dinat_mini, stage 0 at 224 px (56x56 tokens, dilations 1, 8, 1)."""
    png = tmp_path / "rf.png"
    nat, dinat = receptive_field.main(["--models", "nat_mini,dinat_mini", "--out", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert nat["dilations"] == [1, 1, 1] and dinat["dilations"] == [1, 8, 1]
    for field in (nat, dinat):
        assert field["spatial"] == (56, 56) and field["pixel"] == (28, 28)
        for depth, mask in enumerate(field["masks"], start=1):
            layers = list(zip(field["kernel_sizes"][:depth], field["dilations"][:depth]))
            assert torch.equal(mask, _expected(field["spatial"], layers, field["pixel"]))
    # NA grows by 6 tokens per layer and axis; after the dilated layer DiNA covers far more.
    assert [int(m.sum()) for m in nat["masks"]] == [7 ** 2, 13 ** 2, 19 ** 2]
    assert int(dinat["masks"][1].sum()) > 10 * int(nat["masks"][1].sum())
    printed = capsys.readouterr().out
    assert "dinat_mini stage 0 layers 1-2 (k=7, d=8)" in printed
