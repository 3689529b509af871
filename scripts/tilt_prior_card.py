#!/usr/bin/env python
"""Unconditional samples of a tilt prior vs its training generator: PNG grids and field statistics.

    python scripts/tilt_prior_card.py --tilt_unet src/diffusers_blind/blind_dps_default_model/tilt_unet \
        --output_dir runs/tilt_prior/card --num_samples 16 --sizes 32 128 --steps 250

The prior is sampled (respaced ancestral DDPM, the scheduler of ``--scheduler``) at every ``--sizes``: the
training size and larger canvases (the UNet is fully convolutional, which is how the turbulence pipeline
runs it on an image's canvas). Fields are converted to pixels with the prior's ``tilt_scale``. The
generator's fields of the same size are drawn as in training (tiles of ``source_size`` fields when the
size is smaller than that, else ``ops.tilt_map`` at the size itself).

Statistics per field (pixels, both channels), mean ± std over the set: ``std`` (RMS spread), ``corr1``
(correlation of horizontally adjacent pixels: the field's smoothness), ``max`` (largest |d|), ``over1px``
(share of |d| > 1 px: what a ±1 px clip would cut). Grids: both channels of a field side by side,
mid-grey = 0, white / black = ±``--grid_range`` px.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tilt_prior import TiltSampler  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tilt_unet", type=Path, required=True, help="folder of the tilt UNet (with training_info.json)")
    p.add_argument("--scheduler", type=Path, default=None, help="scheduler folder (default: ../scheduler)")
    p.add_argument("--output_dir", type=Path, required=True)
    p.add_argument("--num_samples", type=int, default=16)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 128])
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--grid_range", type=float, default=1.5, help="pixels shown as white / black")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def field_statistics(fields: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-field statistics of ``(N, 2, H, W)`` fields in pixels (see the module docstring)."""
    f = fields.double()
    centred = f - f.mean(dim=(-2, -1), keepdim=True)
    a, b = centred[..., :, 1:], centred[..., :, :-1]
    corr = (a * b).mean(dim=(1, 2, 3)) / (a.pow(2).mean(dim=(1, 2, 3)) * b.pow(2).mean(dim=(1, 2, 3))).sqrt()
    return {
        "std": f.pow(2).mean(dim=(1, 2, 3)).sqrt().numpy(),
        "corr1": corr.numpy(),
        "max": f.abs().amax(dim=(1, 2, 3)).numpy(),
        "over1px": (f.abs() > 1).double().mean(dim=(1, 2, 3)).numpy(),
    }


def sample_fields(unet, scheduler, n: int, size: int, steps: int, seed: int) -> torch.Tensor:
    """``n`` unconditional ``size × size`` samples in the model range (respaced ancestral DDPM)."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(scheduler.config)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, size, size, generator=g)
    unet.eval()
    with torch.no_grad():
        for t in sched.timesteps:
            out = unet(x, t).sample[:, :2]
            x = sched.step(out, t, x, generator=g).prev_sample
    return x


def save_field_grid(fields: torch.Tensor, path: Path, value_range: float, scale: int = 2) -> None:
    """Both channels of each ``(2, H, W)`` field (pixels) side by side; mid-grey = 0."""
    tiles = ((fields.float() / value_range).clamp(-1, 1) * 127.5 + 127.5).round().to(torch.uint8)
    n, _, h, w = tiles.shape
    cols = max(1, min(n, int(math.ceil(math.sqrt(n * h / (2 * w))))))
    rows = int(math.ceil(n / cols))
    pad = 3
    grid = torch.zeros((rows * (h + pad) + pad, cols * (2 * w + 1 + pad) + pad), dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + c * (2 * w + 1 + pad)
        grid[top: top + h, left: left + w] = tiles[i, 0]
        grid[top: top + h, left + w + 1: left + 2 * w + 1] = tiles[i, 1]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.numpy()).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(args.tilt_unet).float()
    scheduler = DDPMScheduler.from_pretrained(args.scheduler or args.tilt_unet.parent / "scheduler")
    info = json.loads((args.tilt_unet / "training_info.json").read_text())
    scale, max_tilt = float(info["tilt_scale"]), float(info.get("max_tilt", 2.5))
    source = int(info.get("source_size") or info["resolution"])
    report = {"tilt_scale": scale, "training": info, "sizes": {}}
    for size in args.sizes:
        model = sample_fields(unet, scheduler, args.num_samples, size, args.steps, args.seed) * scale
        sampler = TiltSampler(size, scale, max_tilt, max(size, source))
        data = sampler.batch(args.num_samples, np.random.default_rng([args.seed, size])) * scale
        stats = {"model": field_statistics(model), "generator": field_statistics(data)}
        report["sizes"][size] = {who: {k: [float(v.mean()), float(v.std())] for k, v in s.items()}
                                 for who, s in stats.items()}
        shown = min(args.num_samples, 16 if size <= 64 else 4)
        save_field_grid(model[:shown], args.output_dir / f"tilt_samples_{size}.png", args.grid_range)
        save_field_grid(data[:shown], args.output_dir / f"tilt_generator_{size}.png", args.grid_range)
        print(f"size {size}:")
        for who, s in report["sizes"][size].items():
            print(f"  {who:9s} " + "  ".join(f"{k} {m:.3f}±{d:.3f}" for k, (m, d) in s.items()), flush=True)
    (args.output_dir / "tilt_stats.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
