#!/usr/bin/env python
"""Do tiles leave seams? Blind Fast EM on the 256² example, tiled and untiled with the same seed.

    python scripts/benchmark_seams.py --tile-size 192 --steps 100

Prints the PSNR of both against examples/sharp.png and, for the tiled run and the untiled control,
the mean absolute difference between neighbouring pixels across each pixel boundary, averaged over
the boundaries inside the tiles' blending bands ("band") and over all others ("elsewhere"). A seam
raises the tiled run's band / elsewhere ratio above the untiled control's. Also the mean |tiled −
untiled| in the bands and elsewhere.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import diffusers_blind
from diffusers_blind import FastEMDeblurPipeline
from diffusers_blind.metrics import psnr
from diffusers_blind.pipelines.tiling import TileLayout


ROOT = Path(__file__).resolve().parents[1]


def load(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]


def band_mask(length: int, starts: list[int], tile: int, offset: int) -> np.ndarray:
    """``True`` at the boundaries ``c|c+1`` (``c`` in image coordinates) inside an overlap of two tiles."""
    mask = np.zeros(length - 1, dtype=bool)
    for previous, start in zip(starts, starts[1:]):
        lo, hi = start - offset, previous + tile - offset  # the overlap, in image coordinates
        mask[max(lo, 0):max(min(hi, length) - 1, 0)] = True
    return mask


def boundary_energy(image: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> tuple[float, float]:
    """Mean |neighbour difference| across boundaries in the bands and elsewhere, ``image (C, H, W)``."""
    dx = np.abs(np.diff(image, axis=2)).mean(axis=(0, 1))  # per column boundary
    dy = np.abs(np.diff(image, axis=1)).mean(axis=(0, 2))  # per row boundary
    band = np.concatenate([dx[cols], dy[rows]])
    other = np.concatenate([dx[~cols], dy[~rows]])
    return float(band.mean()), float(other.mean())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tile-size", type=int, default=192)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--scheduler", choices=("ddpm", "ddim"), default=None, help="default: the model's")
    parser.add_argument("--precision", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pipe = FastEMDeblurPipeline.from_pretrained(diffusers_blind.DEFAULT_MODEL)
    if args.scheduler == "ddim":
        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    blurry, sharp = load(ROOT / "examples" / "blurry.png"), load(ROOT / "examples" / "sharp.png")
    outputs, plans = {}, {}
    for name, tile in (("tiled", args.tile_size), ("untiled", None)):
        start = time.perf_counter()
        out = pipe(blurry, sigma=10, num_inference_steps=args.steps, tile_size=tile, precision=args.precision,
                   generator=torch.Generator().manual_seed(args.seed), output_type="pt")
        outputs[name], plans[name] = out.images.float().clamp(0, 1), pipe.tiling_plan
        print(f"{name}: PSNR {float(psnr(outputs[name], sharp)):.2f} dB, {time.perf_counter() - start:.1f} s, "
              f"{pipe.tiling_plan}", flush=True)

    plan = plans["tiled"]
    margin = pipe.kernel_estimator.config.kernel_size  # the default boundary margin
    _, _, height, width = blurry.shape
    multiple = pipe.image_processor.config.pad_multiple
    padded_h, padded_w = pipe.image_processor.pad(blurry[..., :1, :, :], margin)[0].shape[-2:]  # the pipeline's grid
    layout = TileLayout.create(padded_h, padded_w, plan.tile_size, plan.overlap, multiple)
    rows = band_mask(height, layout.row_starts, layout.tile_height, margin)
    cols = band_mask(width, layout.col_starts, layout.tile_width, margin)
    print(f"tiles {layout.num_tiles}, rows {layout.row_starts}, cols {layout.col_starts}, "
          f"band boundaries {int(rows.sum() + cols.sum())} of {len(rows) + len(cols)}")
    for name, image in outputs.items():
        band, other = boundary_energy(image[0].numpy(), rows, cols)
        print(f"{name}: neighbour difference band {band:.4f}, elsewhere {other:.4f}, ratio {band / other:.3f}")
    difference = (outputs["tiled"] - outputs["untiled"]).abs()[0].numpy().mean(0)
    in_band = rows[:, None] | cols[None, :]
    in_band = np.pad(in_band, ((0, 1), (0, 1)))
    print(f"|tiled - untiled|: band {difference[in_band].mean():.4f}, elsewhere {difference[~in_band].mean():.4f}")


if __name__ == "__main__":
    main()
