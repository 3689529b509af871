"""Figures of an evaluation: ``grid.png`` (images and kernels) and the perception-distortion plot."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..io import atomic_write, save_image
from ..methods import METHODS
from .results import job_key


def _font(size: int):
    try:
        return ImageFont.load_default(size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _tile(array_or_image, size: int) -> Image.Image:
    image = array_or_image if isinstance(array_or_image, Image.Image) else Image.open(array_or_image)
    image = image.convert("RGB")
    scale = size / max(image.size)
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS  # show pixels, avoid aliasing
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), resample)


def _kernel_image(path: Path, size: int) -> Image.Image:
    from diffusers_blind.image_processor import kernel_to_image

    kernel = torch.from_numpy(np.load(path))
    return kernel_to_image(kernel, scale=1).convert("RGB").resize((size, size), Image.Resampling.NEAREST)


def make_grid(records, args, output_dir: Path, grid_ids: list[tuple[int, str]]) -> Path | None:
    """``grid.png``: per image (first σ), ground truth | input | each method with its kernel inset | true kernel."""
    sigma = args.sigma[0]
    by_key = {job_key(r): r for r in records}
    rows = []
    for index, name in grid_ids:
        folder = output_dir / "images" / f"{index:05d}_{name}"
        if not (folder / "gt.png").is_file():
            continue
        tiles = [("ground truth", folder / "gt.png", None), (f"input sigma={sigma:g}", folder / f"input_s{sigma:g}.png", None)]
        for method in args.methods:
            stem = f"{method}_s{sigma:g}"
            if (folder / f"{stem}.png").is_file():
                record = by_key.get((index, method, sigma), {})
                label = f"{method} {record.get('psnr', float('nan')):.2f} dB"
                known = method in METHODS and METHODS[method].needs_kernel
                kernel = None if known else folder / f"{stem}_kernel.npy"
                tiles.append((label, folder / f"{stem}.png", kernel))
        tiles.append(("true kernel", None, folder / "kernel_true.npy"))
        rows.append(tiles)
    if not rows:
        return None
    size, label_h, pad = 160, 16, 4
    columns = max(len(r) for r in rows)
    canvas = Image.new("RGB", (columns * (size + pad) + pad, len(rows) * (size + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font(11)
    for r, tiles in enumerate(rows):
        for c, (label, image_path, kernel_path) in enumerate(tiles):
            x0, y0 = pad + c * (size + pad), pad + r * (size + label_h + pad)
            if image_path is not None:
                tile = _tile(image_path, size)
                if kernel_path is not None and kernel_path.is_file():  # estimated kernel, bottom-right inset
                    inset = _kernel_image(kernel_path, size // 3)
                    tile.paste(inset, (tile.width - inset.width, tile.height - inset.height))
            else:
                tile = _kernel_image(kernel_path, size)
            canvas.paste(tile, (x0, y0 + label_h))
            draw.text((x0, y0 + 2), label, fill="black", font=font)
    path = output_dir / "grid.png"
    save_image(canvas, path)
    return path


def perception_distortion_plot(rows: list[dict], output_dir: Path) -> Path | None:
    """PSNR (distortion) against LPIPS if measured, else the Laplacian sharpness ratio, one point per (method, σ)."""
    if len(rows) < 2:
        return None
    if all(row.get("lpips_mean") is not None for row in rows):
        y_key, y_label = "lpips_mean", "LPIPS (lower is better)"
    elif all(row.get("sharpness_ratio_mean") is not None for row in rows):
        y_key = "sharpness_ratio_mean"
        y_label = "sharpness ratio output / ground truth\n(Laplacian variance, a no-reference proxy; 1 = as sharp)"
    else:
        return None
    points = [(row["psnr_mean"], row[y_key], f"{row['method']} sigma={row['sigma']:g}") for row in rows]
    points = [p for p in points if p[0] is not None and math.isfinite(p[0]) and math.isfinite(p[1])]
    if len(points) < 2:
        return None
    path = output_dir / "perception_distortion.png"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.8))
        for x, y, label in points:
            ax.scatter(x, y)
            ax.annotate(label, (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
        if y_key == "sharpness_ratio_mean":
            ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
            ax.set_yscale("log")
        ax.set_xlabel("PSNR (dB, higher is better)")
        ax.set_ylabel(y_label, fontsize=8)
        ax.set_title("Perception-distortion")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, dpi=120, format="png")
        with atomic_write(path) as handle:
            handle.write(buffer.getvalue())
        plt.close(fig)
        return path
    except ImportError:
        pass
    if y_key == "sharpness_ratio_mean":  # log scale, as with matplotlib
        points = [(x, math.log10(y), label) for x, y, label in points if y > 0]
        _pil_scatter(points, "PSNR (dB, higher is better)", "log10 " + y_label.replace("\n", " "), path, reference=0.0)
    else:
        _pil_scatter(points, "PSNR (dB, higher is better)", y_label, path)
    return path


def _pil_scatter(points, x_label, y_label, path, reference=None):
    width, height, left, right, top, bottom = 720, 520, 70, 30, 30, 60
    xs, ys = [p[0] for p in points], [p[1] for p in points] + ([reference] if reference is not None else [])
    x_lo, x_hi = min(xs), max(xs)
    y_lo, y_hi = min(ys), max(ys)
    x_pad, y_pad = (x_hi - x_lo) * 0.1 or 1.0, (y_hi - y_lo) * 0.1 or 0.1
    x_lo, x_hi, y_lo, y_hi = x_lo - x_pad, x_hi + x_pad, y_lo - y_pad, y_hi + y_pad

    def to_px(x, y):
        return (left + (x - x_lo) / (x_hi - x_lo) * (width - left - right),
                height - bottom - (y - y_lo) / (y_hi - y_lo) * (height - top - bottom))

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = _font(11)
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for i in range(5):
        xv, yv = x_lo + (x_hi - x_lo) * i / 4, y_lo + (y_hi - y_lo) * i / 4
        px, _ = to_px(xv, y_lo)
        _, py = to_px(x_lo, yv)
        draw.line([px, height - bottom, px, height - bottom + 4], fill="black")
        draw.text((px - 12, height - bottom + 6), f"{xv:.2f}", fill="black", font=font)
        draw.line([left - 4, py, left, py], fill="black")
        draw.text((4, py - 6), f"{yv:.3g}", fill="black", font=font)
    if reference is not None:
        _, py = to_px(x_lo, reference)
        draw.line([left, py, width - right, py], fill=(150, 150, 150))
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194)]
    for i, (x, y, label) in enumerate(points):
        px, py = to_px(x, y)
        color = palette[i % len(palette)]
        draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=color)
        draw.text((px + 6, py - 6), label, fill=color, font=font)
    draw.text((left, height - 22), x_label, fill="black", font=font)
    draw.text((left, 8), y_label, fill="black", font=font)
    save_image(image, path)


def perception_distortion_panels(summary: dict, path: Path, y_key: str = "niqe",
                                 y_label: str = "NIQE (lower is better)", reference_row: str | None = "blurry") -> Path:
    """One panel per noise level: mean PSNR (x) against a perceptual score (y, axis inverted so better is up).

    ``summary[row][sigma]`` holds the row's means (``"psnr"`` and ``y_key``); each row is a labelled
    point, except ``reference_row`` (the blurry input, far from the rest), whose values go in the
    panel's title. Drawn with matplotlib when installed (the ``eval`` extra), else with PIL.
    """
    sigmas = sorted({sigma for per_sigma in summary.values() for sigma in per_sigma}, key=lambda s: float(s))
    panels = {sigma: [(summary[row][sigma]["psnr"], summary[row][sigma][y_key], row)
                      for row in summary if sigma in summary[row] and row != reference_row] for sigma in sigmas}
    titles = {}
    for sigma in sigmas:
        reference = summary.get(reference_row, {}).get(sigma)
        titles[sigma] = f"σ = {sigma}" + (f" (input: {reference['psnr']:.2f} dB, {y_key.upper()} {reference[y_key]:.2f})"
                                          if reference else "")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    if plt is None:
        images = []
        for sigma, points in panels.items():
            panel = Path(path).with_name(f"{Path(path).stem}_sigma{sigma}.png")
            _pil_scatter([(x, -y, label) for x, y, label in points], "PSNR (dB), " + titles[sigma], "−" + y_label, panel)
            images.append(Image.open(panel).convert("RGB"))
            panel.unlink()
        canvas = Image.new("RGB", (sum(im.width for im in images), max(im.height for im in images)), "white")
        offset = 0
        for image in images:
            canvas.paste(image, (offset, 0))
            offset += image.width
        save_image(canvas, path)
        return Path(path)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    for ax, (sigma, points) in zip(axes[0], panels.items()):
        for x, y, label in points:
            ax.scatter(x, y)
            ax.annotate(label, (x, y), fontsize=8, xytext=(4, 3), textcoords="offset points")
        ax.invert_yaxis()
        ax.xaxis.set_major_locator(plt.MaxNLocator(5))
        ax.set_xlabel("PSNR (dB, higher is better)")
        ax.set_ylabel(y_label)
        ax.set_title(titles[sigma], fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=110, format="png")
    plt.close(fig)
    with atomic_write(path) as handle:
        handle.write(buffer.getvalue())
    return Path(path)
