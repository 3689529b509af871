#!/usr/bin/env python
"""How often would the guard's collapse test drop a TRUE sharp image? (its false-positive rate)

For every photograph of ``--data_dir`` (training photographs: never the evaluation set), ``--pairs``
random crops (side drawn from ``--crops``) are blurred linearly by a camera-shake kernel (odd size in
``--kernel_sizes``, intensity in 0.3–0.8), with noise of σ drawn from ``--sigmas`` 8-bit levels and
8-bit quantisation (the valid centre kept). For each pair it computes the two collapse signs of the
Fast EM guard on the true sharp image, ``midtone_saturation(y, x)`` and ``contrast_gain(y, x)``, and
prints their distribution, the pairs closest to the limits, and how many pairs the guard would drop
(``GUARD_SATURATION_LIMIT`` and ``GUARD_CONTRAST_LIMIT`` both exceeded).

Example::

    python scripts/prepare_photos.py photos --sets lomiri plasma
    python scripts/benchmark_guard.py --data_dir photos
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffusers_blind.ops import contrast_gain, midtone_saturation, motion_kernel
from diffusers_blind.pipelines.dvsr.training_utils import make_blurry_sharp_pair
from diffusers_blind.pipelines.fast_em.pipeline_fast_em_deblur import GUARD_CONTRAST_LIMIT, GUARD_SATURATION_LIMIT


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", type=Path, required=True, help="folder of sharp (training) photographs")
    p.add_argument("--pairs", type=int, default=6, help="blurred crops per photograph")
    p.add_argument("--crops", type=int, nargs="+", default=[128, 256], help="crop sides drawn from")
    p.add_argument("--kernel_sizes", type=int, nargs=2, default=[9, 63], help="range of kernel sizes (odd)")
    p.add_argument("--sigmas", type=float, nargs="+", default=[1.0, 5.0, 10.0], help="noise levels drawn from")
    p.add_argument("--seed", type=int, default=2)
    return p.parse_args(argv)


def pairs(args):
    """Yield ``(name, kernel size, σ, blurry, sharp)`` for every photograph large enough."""
    rng = np.random.default_rng(args.seed)
    files = sorted(f for f in args.data_dir.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise SystemExit(f"no PNG/JPEG photographs in {args.data_dir}")
    for index, path in enumerate(files):
        with Image.open(path) as im:
            photo = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]
        for repeat in range(args.pairs):
            size = int(rng.integers(args.kernel_sizes[0] // 2, args.kernel_sizes[1] // 2 + 1)) * 2 + 1
            kernel = motion_kernel(size, float(rng.uniform(0.3, 0.8)), rng)
            big = int(rng.choice(args.crops)) + size - 1
            height, width = photo.shape[-2:]
            if min(height, width) < big:
                continue
            top, left = int(rng.integers(0, height - big + 1)), int(rng.integers(0, width - big + 1))
            sigma = float(rng.choice(args.sigmas))
            seed = torch.Generator().manual_seed(index * 100 + repeat)
            blurry, sharp = make_blurry_sharp_pair(photo[..., top:top + big, left:left + big], kernel, sigma / 255,
                                                   generator=seed)
            yield path.stem, size, sigma, blurry, sharp


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    rows = [(name, size, sigma, float(midtone_saturation(y, x)[0]), float(contrast_gain(y, x)[0]))
            for name, size, sigma, y, x in pairs(args)]
    if not rows:
        raise SystemExit("no photograph is large enough for the crops and kernels asked for")
    values = np.array([row[3:] for row in rows])
    print(f"{len(rows)} true sharp/blurry pairs; guard limits: saturation {GUARD_SATURATION_LIMIT}, contrast {GUARD_CONTRAST_LIMIT}")
    for column, name in enumerate(("midtone_saturation", "contrast_gain")):
        v = values[:, column]
        print(f"{name:20s} median {np.median(v):.4f}  p90 {np.percentile(v, 90):.4f}  p99 {np.percentile(v, 99):.4f}  max {v.max():.4f}")
    closeness = np.minimum(values[:, 0] / GUARD_SATURATION_LIMIT, values[:, 1] / GUARD_CONTRAST_LIMIT)
    print(f"closest to the guard (1 = dropped): {closeness.max():.3f}")
    for i in np.argsort(-closeness)[:5]:
        name, size, sigma, saturation, gain = rows[i]
        print(f"  {name:40s} kernel {size:2d}  sigma {sigma:4.1f}  saturation {saturation:.4f}  contrast {gain:.2f}")
    print(f"pairs the guard would drop: {int((closeness > 1).sum())} of {len(rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
