#!/usr/bin/env python
"""Train a tilt-field diffusion prior for BlindDPSTurbulencePipeline on synthetic tilt maps.

A small ``UNet2DModel`` with two input channels (horizontal and vertical shift), epsilon
prediction, linear schedule of 1000 steps, on fields from ``diffusers_blind.ops.TiltMapGenerator``
(seeded, fresh each batch) divided by ``--tilt_scale`` so that the generator's whole ±2.5 px range
fits the model range ``[-1, 1]`` (the pipeline multiplies its estimate by the same ``tilt_scale``).
The UNet is fully convolutional: trained at ``--resolution``, it runs on canvases of other sizes
(multiples of its down-sampling factor). The generator's per-pixel statistics only hold on fields of at
least its patch side (64 px: a 32 × 32 map has half the std of a 256 × 256 one, because the patches are
capped at the map size), so training fields are drawn at ``--source_size`` (default 64, whose std and
neighbour correlation match a 256 × 256 map's) and cut into ``--resolution`` tiles.

Training loop, EMA, checkpoints, ``--resume latest`` and export are those of
``scripts/train_kernel_prior.py``; the export goes to ``<export_dir>/tilt_unet``.

Example::

    nohup nice -n 10 env OMP_NUM_THREADS=1 python scripts/train_tilt_prior.py \
        --output_dir runs/tilt_prior --resolution 64 --max_minutes 60 > runs/tilt_prior/train.log 2>&1 &
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_kernel_prior as base  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    # the kernel script's options (model, optimisation, EMA, checkpoints) plus the tilt data options
    kernel_args = base.parse_args(["--output_dir", "unused"])
    p = argparse.ArgumentParser(description="Train a tilt-field diffusion prior (2-channel UNet2DModel).")
    p.add_argument("--output_dir", type=Path, required=True)
    p.add_argument("--export_dir", type=Path, default=None, help="also export as <export_dir>/tilt_unet")
    p.add_argument("--resolution", type=int, default=64, help="training field size (square)")
    p.add_argument("--tilt_scale", type=float, default=2.5, help="pixels per model unit (fields are divided by it)")
    p.add_argument("--max_tilt", type=float, default=2.5, help="the generator's clip, pixels")
    p.add_argument("--source_size", type=int, default=None,
                   help="draw fields of this size and cut them into --resolution tiles (default: max(64, resolution))")
    for name, value in vars(kernel_args).items():
        if name in ("output_dir", "export_dir", "kernel_size", "intensity_range", "gaussian_fraction",
                    "gaussian_std_range"):
            continue
        flag = f"--{name}"
        if isinstance(value, bool):
            p.add_argument(flag, action="store_true")
        elif isinstance(value, list):
            p.add_argument(flag, type=type(value[0]), nargs="+", default=value)
        elif name in base.CHOICES:
            p.add_argument(flag, choices=base.CHOICES[name], default=value)
        elif name == "resume":
            p.add_argument(flag, default=value)
        else:
            p.add_argument(flag, type=type(value) if value is not None else float, default=value)
    args = p.parse_args(argv)
    multiple = 2 ** (len(args.block_out_channels) - 1)
    if args.resolution % multiple:
        p.error(f"--resolution must be a multiple of {multiple}")
    if args.source_size is None:
        args.source_size = max(64, args.resolution)
    if args.source_size < args.resolution:
        p.error("--source_size must be >= --resolution")
    if args.tilt_scale < args.max_tilt:
        p.error("--tilt_scale must be >= --max_tilt so that every simulated field fits [-1, 1]")
    return args


class TiltSampler:
    """Fresh seeded tilt fields divided by ``tilt_scale`` (model range): ``resolution``² tiles of fields drawn
    at ``source_size``² (non-overlapping tiles, ``(source_size // resolution)²`` per field)."""

    def __init__(self, resolution: int, tilt_scale: float, max_tilt: float, source_size: int | None = None):
        from diffusers_blind.ops import TiltMapGenerator

        self.resolution = resolution
        self.source_size = resolution if source_size is None else source_size
        self.generator = TiltMapGenerator(self.source_size, max_tilt=max_tilt)
        self.tilt_scale = tilt_scale

    def batch(self, n: int, rng: np.random.Generator) -> torch.Tensor:
        per_side = self.source_size // self.resolution
        fields = self.generator(math.ceil(n / per_side**2), rng)
        r = self.resolution
        tiles = [fields[:, :, i * r: (i + 1) * r, j * r: (j + 1) * r] for i in range(per_side) for j in range(per_side)]
        return torch.stack(tiles, 1).flatten(0, 1)[:n] / self.tilt_scale


def save_tilt_grid(fields: torch.Tensor, path: Path, scale: int = 2) -> None:
    """Both channels of each field side by side, mid-grey = 0, white/black = ±1 model unit."""
    tiles = ((fields.float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    n, _, h, w = tiles.shape
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    pad = 2
    grid = torch.full((rows * (h + pad) + pad, cols * (2 * w + pad) + pad), 0, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + c * (2 * w + pad)
        grid[top: top + h, left: left + 2 * w] = torch.cat([tiles[i, 0], tiles[i, 1]], dim=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.numpy()).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from diffusers_blind.io import check_training_folder

    check_training_folder(args.output_dir, args.resume)
    sampler = TiltSampler(args.resolution, args.tilt_scale, args.max_tilt, args.source_size)
    info = {"resolution": args.resolution, "source_size": args.source_size, "tilt_scale": args.tilt_scale,
            "max_tilt": args.max_tilt}
    return base.train(args, sampler, channels=2, sample_size=args.resolution, component="tilt_unet",
                      save_grid=save_tilt_grid, info_extra=info)


if __name__ == "__main__":
    main(sys.argv[1:])
