#!/usr/bin/env python
"""Write the held-out evaluation photographs to an image folder (never used for training).

    pip install scikit-image            # the photographs ship inside its wheel; nothing is downloaded
    python scripts/prepare_eval_photos.py --output /tmp/eval_photos --resolution 256

Sources: scikit-image's sample images (astronaut, camera, chelsea, coffee, rocket, coins, brick,
grass, gravel), and when installed scikit-learn's ``china.jpg`` / ``flower.jpg`` and matplotlib's
``grace_hopper.jpg``. Each photo is centre-cropped to a square, then downscaled (area filter) to
``--resolution`` if larger, and saved as an RGB PNG (grayscale photos are replicated to RGB).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image


SKIMAGE_NAMES = ("astronaut", "camera", "chelsea", "coffee", "rocket", "coins", "brick", "grass", "gravel")


def load_photos() -> dict[str, np.ndarray]:
    photos = {}
    try:
        import skimage.data
    except ImportError:
        print("scikit-image is not installed (pip install scikit-image): skipping its photographs")
    else:
        for name in SKIMAGE_NAMES:
            loader = getattr(skimage.data, name, None)
            if loader is None:
                print(f"skimage.data.{name} is missing in this scikit-image version: skipped")
                continue
            photos[name] = loader()
    try:
        from sklearn.datasets import load_sample_image

        for name in ("china.jpg", "flower.jpg"):
            photos[name.split(".")[0]] = load_sample_image(name)
    except ImportError:
        print("scikit-learn not installed: skipping china/flower")
    try:
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
            photos["grace_hopper"] = np.asarray(Image.open(f).convert("RGB"))
    except Exception as error:  # matplotlib absent or sample data not shipped
        print(f"matplotlib sample grace_hopper.jpg unavailable ({error.__class__.__name__}): skipped")
    return photos


def square_crop(image: Image.Image, resolution: int) -> Image.Image:
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side > resolution:
        image = image.resize((resolution, resolution), Image.Resampling.BOX)
    return image


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--resolution", type=int, default=256)
    args = parser.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    photos = load_photos()
    for name, array in photos.items():
        image = Image.fromarray(array).convert("RGB")
        square_crop(image, args.resolution).save(os.path.join(args.output, f"{name}.png"))
    print(f"wrote {len(photos)} photographs to {args.output}")


if __name__ == "__main__":
    main()
