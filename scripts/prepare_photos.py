#!/usr/bin/env python
"""Prepare the training photographs for the pixel-space image prior.

Finds a fixed list of photographs shipped by Debian wallpaper packages,
downscales each one at several factors with a high-quality antialiasing
filter (Lanczos), which also removes JPEG block artefacts and sensor noise,
and writes the results as PNG files into an output folder.  The folder is
read by ``scripts/train_image_prior.py``.

Photographs (real camera pictures, not renders):

* ``lomiri-wallpapers-16.04`` / ``-20.04``: ``/usr/share/backgrounds/*.jpg``
  (CC-BY / CC-BY-SA / CC0, see ``/usr/share/doc/lomiri-wallpapers-*/copyright``).
  The renders ``umang_by_Abhishek_Mudgal``, ``Fossa*``, ``Infinite-Sea*`` and
  ``Painting-Colors*`` are left out on purpose.
* ``plasma-workspace-wallpapers`` (optional, ``--sets lomiri plasma``):
  ``/usr/share/wallpapers/<Name>/contents/images/<W>x<H>.jpg``; the largest
  resolution of each is used.

Evaluation images (scikit-image / scikit-learn / matplotlib samples) are never
used here.

Example::

    python scripts/prepare_photos.py data/photos --sets lomiri plasma
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from PIL import Image

Image.MAX_IMAGE_PIXELS = None

LOMIRI_DIR = Path("/usr/share/backgrounds")
LOMIRI_PHOTOS = [
    "Bridge_by_Sander_Klootwijk.jpg",
    "Dragonfly_by_Bolly.jpg",
    "Kleiber_by_Lukas_Baubkus.jpg",
    "Picture_0B_by_freespace.jpg",
    "Picture_1A_by_freespace.jpg",
    "Wine_by_Jakkub_Mede.jpg",
    "aitzgorri_by_Aitzol_Berasategi.jpg",
    "analogpattern_by_Peter_Nerlich.jpg",
    "free_by_Peter_Nerlich.jpg",
    "friends_by_Aitzol_Berasategi.jpg",
    "greentock_by_Peter_Nerlich.jpg",
    "life_by_Aitzol_Berasategi.jpg",
    "picosdeeuropa_by_Aitzol_Berasategi.jpg",
    "seeding_by_Clements_Engelhardt.jpg",
    "sunset_by_Aitzol_Berasategi.jpg",
]
# Never used (renders / paintings, not photographs).
EXCLUDED_PREFIXES = ("umang_by_Abhishek_Mudgal", "Fossa", "Infinite-Sea", "Painting-Colors")

PLASMA_DIR = Path("/usr/share/wallpapers")
PLASMA_PHOTOS = [
    "BytheWater",
    "ColdRipple",
    "ColorfulCups",
    "DarkestHour",
    "EveningGlow",
    "FallenLeaf",
    "Grey",
    "Kite",
    "OneStandsOut",
    "Path",
    "summer_1am",
]

DEFAULT_FACTORS = (8, 6, 4, 3, 2)


def _largest_plasma_image(name: str) -> Path | None:
    folder = PLASMA_DIR / name / "contents" / "images"
    if not folder.is_dir():
        return None
    best, best_px = None, -1
    for f in folder.iterdir():
        m = re.fullmatch(r"(\d+)x(\d+)\.(jpe?g|png)", f.name, flags=re.IGNORECASE)
        if m is None:
            continue
        px = int(m.group(1)) * int(m.group(2))
        if px > best_px:
            best, best_px = f, px
    return best


def find_photos(sets: list[str]) -> list[tuple[str, Path]]:
    """Return ``(stem, path)`` for every training photograph found on disk."""
    found: list[tuple[str, Path]] = []
    if "lomiri" in sets:
        for name in LOMIRI_PHOTOS:
            assert not name.startswith(EXCLUDED_PREFIXES)
            path = LOMIRI_DIR / name
            if path.is_file():
                found.append((Path(name).stem, path))
            else:
                print(f"[prepare_photos] missing, skipped: {path}", file=sys.stderr)
    if "plasma" in sets:
        for name in PLASMA_PHOTOS:
            path = _largest_plasma_image(name)
            if path is None:
                print(
                    f"[prepare_photos] missing, skipped: {PLASMA_DIR / name} "
                    "(apt-get install plasma-workspace-wallpapers)",
                    file=sys.stderr,
                )
            else:
                found.append((f"plasma_{name}", path))
    return found


def downscale(img: Image.Image, factor: float) -> Image.Image:
    w, h = img.size
    size = (max(1, round(w / factor)), max(1, round(h / factor)))
    # PIL's Lanczos resize is antialiased (the kernel support grows with the factor).
    return img.resize(size, resample=Image.Resampling.LANCZOS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", type=Path, help="folder that receives the PNGs")
    parser.add_argument("--sets", nargs="+", default=["lomiri", "plasma"], choices=["lomiri", "plasma"])
    parser.add_argument(
        "--factors", nargs="+", type=float, default=list(DEFAULT_FACTORS),
        help="downscaling factors (8 means 1/8 of the original size)",
    )
    parser.add_argument("--min_side", type=int, default=64, help="skip versions whose short side is smaller")
    args = parser.parse_args(argv)

    photos = find_photos(args.sets)
    if not photos:
        print("[prepare_photos] no photographs found", file=sys.stderr)
        return 1
    args.output_dir.mkdir(parents=True, exist_ok=True)
    manifest = []
    for stem, path in photos:
        with Image.open(path) as im:
            img = im.convert("RGB")
        for factor in args.factors:
            small = downscale(img, factor)
            if min(small.size) < args.min_side:
                continue
            out = args.output_dir / f"{stem}_d{factor:g}.png"
            small.save(out, optimize=False, compress_level=1)
            manifest.append({"file": out.name, "source": str(path), "factor": factor, "size": list(small.size)})
            print(f"[prepare_photos] {path.name} 1/{factor:g} -> {out.name} {small.size}")
    with open(args.output_dir / "manifest.json", "w") as f:
        json.dump({"photos": [str(p) for _, p in photos], "images": manifest}, f, indent=1)
    print(f"[prepare_photos] {len(photos)} photographs, {len(manifest)} PNGs in {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
