"""Which input tokens one output pixel can see, layer by layer: NA against DiNA (as in the DiNAT paper).

For one stage of each model, the stage's input tokens are a leaf tensor; after every block of the
stage, the gradient of one output token (a fixed random projection of its channels) with respect
to those inputs is taken with autograd. A token is visible exactly when its gradient is nonzero:
blocks mix tokens only inside their attention windows, so an invisible token gets an exact zero,
and float64 with a deterministic random init keeps the visible ones away from zero. This is the
model's own computation (its padding of small maps included), not a re-derivation of the window
rule. The picture is a grid: one row per model, one panel per block (layers 1..n of the stage).

Examples::

    PYTHONPATH=. python -m benchmarks.receptive_field                      # nat_tiny vs dinat_tiny, stage 0
    PYTHONPATH=. python -m benchmarks.receptive_field --stage 1 --pixel 3,20 --out rf_stage1.png
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import timm
import torch
import torch.nn as nn

from dinat import kernels
from dinat import models  # registers dinat_* / nat_* with timm

DEFAULT_MODELS = ("nat_tiny", "dinat_tiny")


def stage_blocks(model: nn.Module, stage: int) -> nn.Sequential:
    """The blocks of one stage: a level of a hierarchical model, or all blocks of an isotropic one."""
    if isinstance(model, models.HierarchicalNAT):
        levels = model.get_levels()
        if not 0 <= stage < len(levels):
            raise ValueError(f"stage must be in [0, {len(levels) - 1}] for this model; got {stage}")
        return levels[stage].blocks
    if stage != 0:
        raise ValueError(f"an isotropic model has one stage (0); got {stage}")
    return model.layers


def stage_input_shape(model: nn.Module, stage: int, image_size: int) -> tuple[int, int, int]:
    """(height, width, channels) of the tokens entering ``stage`` for a square image."""
    index = stage if isinstance(model, models.HierarchicalNAT) else 0  # isotropic: block 0 keeps the map's shape
    in_chans = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels  # the stem's
    with torch.no_grad():
        (feature,) = model.forward_intermediates(torch.zeros(1, in_chans, image_size, image_size), indices=[index],
                                                 stop_early=True, intermediates_only=True)
    _, channels, height, width = feature.shape  # NCHW; blocks keep the stage's resolution
    return height, width, channels


def block_dilations(blocks: Sequence[nn.Module]) -> list[Optional[int]]:
    return [getattr(getattr(b, "attn", None), "dilation", None) for b in blocks]


def receptive_fields(blocks: Sequence[nn.Module], spatial: tuple[int, int], channels: int,
                     pixel: tuple[int, int], seed: int = 0, dtype: torch.dtype = torch.float64,
                     stacked: bool = True) -> list[torch.Tensor]:
    """``[H, W]`` bool masks, one per block: the stage inputs that output token ``pixel`` of that block
    depends on (nonzero gradient), through all blocks before it (``stacked``) or through that block
    alone (``stacked=False``: its own inputs). The blocks must already be in eval mode and in ``dtype``."""
    height, width = spatial
    py, px = pixel
    if not (0 <= py < height and 0 <= px < width):
        raise ValueError(f"pixel {pixel} is outside the {height}x{width} map")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    tokens = torch.randn(1, height, width, channels, generator=gen, dtype=dtype).requires_grad_(True)
    # A random mix of the output channels: summing them plainly could cancel by symmetry.
    projection = torch.randn(channels, generator=gen, dtype=dtype)
    masks, x = [], tokens
    for block in blocks:
        leaf = tokens if stacked else tokens.detach().requires_grad_(True)
        x = block(x if stacked else leaf)
        # The graph of the stack up to here is kept for the next blocks' gradients.
        (grad,) = torch.autograd.grad((x[0, py, px] * projection).sum(), leaf, retain_graph=stacked)
        masks.append(grad[0].abs().sum(-1) != 0)
    return masks


def model_receptive_fields(name: str, stage: int, image_size: int, pixel: Optional[tuple[int, int]] = None,
                           num_layers: Optional[int] = None, seed: int = 0, na_backend: str = "reference",
                           model_kwargs: Optional[dict] = None, stacked: bool = True) -> dict:
    """Receptive fields of the blocks of one stage of timm model ``name`` (random init from ``seed``).

    Returns a dict with ``masks`` (one ``[H, W]`` bool tensor per block), ``dilations``, ``kernel_sizes``,
    ``spatial``, ``pixel`` (default: the map's centre), ``stage`` and ``stacked``.
    """
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, na_backend=na_backend, **(model_kwargs or {})).eval()
    height, width, channels = stage_input_shape(model, stage, image_size)
    blocks = stage_blocks(model, stage)
    if num_layers is not None:
        blocks = blocks[:num_layers]
    blocks = blocks.to(torch.float64)
    pixel = pixel if pixel is not None else (height // 2, width // 2)
    masks = receptive_fields(blocks, (height, width), channels, pixel, seed=seed, stacked=stacked)
    return dict(name=name, masks=masks, dilations=block_dilations(blocks),
                kernel_sizes=[getattr(getattr(b, "attn", None), "kernel_size", None) for b in blocks],
                spatial=(height, width), pixel=pixel, stage=stage, stacked=stacked)


def _span(mask: torch.Tensor) -> str:
    rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
    return f"{int(rows.max() - rows.min() + 1)}x{int(cols.max() - cols.min() + 1)}"


def describe(field: dict) -> list[str]:
    lines = []
    for layer, (mask, d, k) in enumerate(zip(field["masks"], field["dilations"], field["kernel_sizes"]), start=1):
        scope = f"layers 1-{layer}" if field["stacked"] else f"layer {layer} alone"
        lines.append(f"{field['name']} stage {field['stage']} {scope} (k={k}, d={d}): "
                     f"{int(mask.sum())} of {mask.numel()} tokens visible, span {_span(mask)}")
    return lines


def plot(fields: Sequence[dict], path: str, title: str) -> None:
    """Grid: one row per model, one column per layer; visible tokens dark, the output pixel red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    columns = max(len(f["masks"]) for f in fields)
    fig, axes = plt.subplots(len(fields), columns, figsize=(2.6 * columns + 0.6, 2.9 * len(fields)), squeeze=False)
    colors = ListedColormap(["#f4f4f4", "#2b6cb0"])
    for row, field in enumerate(fields):
        height, width = field["spatial"]
        for col in range(columns):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(field["masks"]):
                ax.axis("off")
                continue
            mask = field["masks"][col]
            ax.imshow(mask.numpy().astype(float), cmap=colors, vmin=0, vmax=1, interpolation="nearest")
            if max(height, width) <= 32:  # cell borders only where they stay readable
                ax.set_xticks([x - 0.5 for x in range(width + 1)], minor=True)
                ax.set_yticks([y - 0.5 for y in range(height + 1)], minor=True)
                ax.grid(which="minor", color="white", linewidth=0.4)
                ax.tick_params(which="minor", length=0)
            py, px = field["pixel"]
            ax.plot(px, py, marker="s", color="#e53e3e", markersize=max(2.0, 120 / max(height, width)))
            d, k = field["dilations"][col], field["kernel_sizes"][col]
            ax.set_title(f"layer {col + 1}: {k}x{k}, dilation {d}\n{int(mask.sum())} tokens, span {_span(mask)}",
                         fontsize=8)
            if col == 0:
                ax.set_ylabel(f"{field['name']}\n{height}x{width} tokens", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pixel(text: str) -> tuple[int, int]:
    try:
        y, x = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'row,col'; got {text!r}") from None
    return y, x


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.receptive_field", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help="comma list of our timm models, one row each (default: %(default)s)")
    parser.add_argument("--stage", type=int, default=0,
                        help="stage (level) index, 0 = the first, highest-resolution one (default 0)")
    parser.add_argument("--layers", type=int, default=None, help="only the first N blocks of the stage")
    parser.add_argument("--image-size", type=int, default=224, help="input image size in px (default 224)")
    parser.add_argument("--pixel", type=_pixel, default=None,
                        help="output token 'row,col' in the stage's map (default: the centre)")
    parser.add_argument("--seed", type=int, default=0, help="random init and random stage input")
    parser.add_argument("--single-layer", action="store_true",
                        help="each layer alone (its own input tokens) instead of layers 1..n stacked")
    parser.add_argument("--na-backend", default="reference",
                        help=f"na_backend of the models, one of {','.join(kernels.backends.BACKENDS)} "
                        "(default reference: exact float64 on CPU)")
    parser.add_argument("--out", default="docs/receptive_field.png", help="PNG path (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    fields = [model_receptive_fields(name, args.stage, args.image_size, args.pixel, args.layers, args.seed,
                                     args.na_backend, stacked=not args.single_layer) for name in names]
    for field in fields:
        print("\n".join(describe(field)))
    height, width = fields[0]["spatial"]
    py, px = fields[0]["pixel"]
    what = "each layer alone, over its own input tokens" if args.single_layer else \
        f"layers 1..n stacked, over the input tokens of stage {args.stage}"
    plot(fields, args.out, f"Receptive field of output token ({py}, {px}), stage {args.stage} ({height}x{width} "
         f"tokens at {args.image_size} px)\n{what}; exact, from autograd (nonzero gradient)")
    print(f"wrote {args.out}", file=sys.stderr)
    return fields


if __name__ == "__main__":
    main()
