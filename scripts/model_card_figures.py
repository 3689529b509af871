#!/usr/bin/env python
"""Before/after pictures for the model card, from files the command line wrote.

A row of images side by side (10 px white gaps) and, if kernels are given, a second row with each
kernel (``.npy``, as ``diffusers-blind deblur`` saves it) drawn on black, stretched to its own peak, at
the same scale for all kernels of the figure (``--kernel_pixels`` screen pixels per kernel pixel), under
the image it belongs to. ``-`` leaves a kernel cell empty (e.g. under the input).

Examples::

    python scripts/model_card_figures.py -o example_before_after.png \\
        examples/blurry.png outputs/blurry_deblurred.png examples/sharp.png
    python scripts/model_card_figures.py -o clock_motion_before_after.png --height 152 \\
        clock.png out33/clock_deblurred.png outauto/clock_deblurred.png \\
        --kernels - out33/clock_kernel.npy outauto/clock_kernel.npy
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

GAP = 10


def kernel_panel(kernel: np.ndarray, side: int, pixels_per_tap: int) -> Image.Image:
    """The kernel stretched to its peak, centred on a black ``side``×``side`` square."""
    kernel = np.asarray(kernel, dtype=np.float64)
    if kernel.ndim != 2 or not np.isfinite(kernel).all():
        raise ValueError(f"a kernel must be a finite 2-D array, got shape {kernel.shape}")
    peak = kernel.max()
    gray = np.zeros_like(kernel) if peak <= 0 else np.clip(kernel / peak, 0, 1)
    tile = Image.fromarray((gray * 255).round().astype(np.uint8)).convert("RGB")
    tile = tile.resize((kernel.shape[1] * pixels_per_tap, kernel.shape[0] * pixels_per_tap), Image.Resampling.NEAREST)
    panel = Image.new("RGB", (side, side), "black")
    panel.paste(tile, ((side - tile.width) // 2, (side - tile.height) // 2))
    return panel


def figure(images: list[Image.Image], kernels: list[np.ndarray | None] | None = None, height: int | None = None,
           pixels_per_tap: int = 4) -> Image.Image:
    """Images in a row at a common height; kernels (or ``None``) in a row below."""
    height = height or max(image.height for image in images)
    row = [image.convert("RGB").resize((max(1, round(image.width * height / image.height)), height),
                                       Image.Resampling.LANCZOS) for image in images]
    width = sum(image.width for image in row) + GAP * (len(row) - 1)
    side = min(image.width for image in row)
    has_kernels = kernels is not None and any(k is not None for k in kernels)
    canvas = Image.new("RGB", (width, height + (GAP + side if has_kernels else 0)), "white")
    x = 0
    for i, image in enumerate(row):
        canvas.paste(image, (x, 0))
        if has_kernels and kernels[i] is not None:
            canvas.paste(kernel_panel(kernels[i], image.width, pixels_per_tap), (x, height + GAP))
        x += image.width + GAP
    return canvas


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--kernels", nargs="+", default=None, help="one .npy per image, or - for none")
    p.add_argument("--height", type=int, default=None, help="row height in pixels (default: the tallest image)")
    p.add_argument("--kernel_pixels", type=int, default=4, help="screen pixels per kernel pixel")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    if args.kernels is not None and len(args.kernels) != len(args.images):
        p.error(f"--kernels needs one entry per image ({len(args.images)}), got {len(args.kernels)}")
    if args.output.exists() and not args.overwrite:
        p.error(f"{args.output} exists (pass --overwrite to replace it)")
    images = [Image.open(path) for path in args.images]
    kernels = None if args.kernels is None else [None if k == "-" else np.load(k) for k in args.kernels]
    from diffusers_blind.io import save_image

    save_image(figure(images, kernels, args.height, args.kernel_pixels), args.output)
    print(f"wrote {args.output}")
    return args.output


if __name__ == "__main__":
    main()
