r"""NIQE (Mittal, Soundararajan, Bovik 2013), offline, with a pristine model fitted on the package's training photographs.

Construction (the standard one):

1. Luminance ``Y = 0.299 R + 0.587 G + 0.114 B`` in ``[0, 255]``.
2. MSCN coefficients ``(Y − μ) / (σ + 1)`` with ``μ``, ``σ`` the local mean and standard deviation
   under a 7×7 Gaussian window (std 7/6).
3. The image is cut into non-overlapping ``P × P`` patches (``P = 96``). Per patch and per scale (the
   image and its half-size bicubic, antialiased version, patches of ``P/2``), 18 features: a
   generalised Gaussian fit ``(α, σ²)`` of the MSCN values, and an asymmetric generalised Gaussian
   fit ``(α, η, σ_l², σ_r²)`` of each of the four products of neighbouring MSCN values (horizontal,
   vertical, two diagonals). Both fits are by moment matching over a table of shape parameters.
   36 features per patch.
4. Pristine model: the mean ``μ_p`` and covariance ``Σ_p`` of the features of the sharpest patches
   (local-σ sharpness above 0.75 × the image's maximum) of a set of sharp photographs
   (:func:`fit_niqe_model`). Test image: mean ``μ`` and covariance ``Σ`` of the features of all its
   patches. ``NIQE = √((μ_p − μ)ᵀ ((Σ_p + Σ)/2)⁺ (μ_p − μ))``; lower is more natural.

The model shipped as ``niqe_pristine.npz`` was fitted on the training photographs (Debian wallpaper
photographs, several downscales; no evaluation image) with
``python -m diffusers_blind.metrics.niqe_offline fit data/photos niqe_pristine.npz``. Its values are
therefore not comparable with the numbers of the MATLAB model (fitted on 125 other photographs).
Images smaller than one patch are scored as a single patch of their (even-cropped) size.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .image import _unit_range


PATCH_SIZE = 96
SHARPNESS_THRESHOLD = 0.75
DEFAULT_MODEL_PATH = Path(__file__).with_name("niqe_pristine.npz")
_ALPHAS = torch.arange(0.2, 10.0, 0.001, dtype=torch.float64)


def _gaussian_window(size: int = 7, std: float = 7 / 6) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-0.5 * (coords / std) ** 2)
    window = g[:, None] * g[None, :]
    return (window / window.sum())[None, None]


def luminance(image: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` in ``[0, 1]`` → ``(B, 1, H, W)`` luminance in ``[0, 255]`` (float64)."""
    image = image.detach().to(torch.float64).cpu()
    if image.shape[1] == 3:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64).view(1, 3, 1, 1)
        image = (image * weights).sum(1, keepdim=True)
    elif image.shape[1] != 1:
        raise ValueError(f"NIQE needs 1 or 3 channels, got {image.shape[1]}")
    return image * 255


def mscn(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-subtracted contrast-normalised coefficients and the local std ``σ`` of ``(B, 1, H, W)`` luminance."""
    window = _gaussian_window()
    pad = window.shape[-1] // 2
    padded = F.pad(y, (pad, pad, pad, pad), mode="replicate")
    mu = F.conv2d(padded, window)
    var = F.conv2d(padded.square(), window) - mu.square()
    sigma = var.clamp_min(0).sqrt()
    return (y - mu) / (sigma + 1), sigma


def _ggd_fit(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Gaussian fit of each row of ``x`` ``(N, M)`` by moment matching: ``(α, σ²)``."""
    var = x.square().mean(1)
    mean_abs = x.abs().mean(1)
    rho = var / mean_abs.square().clamp_min(1e-12)
    a = _ALPHAS
    table = torch.exp(torch.lgamma(1 / a) + torch.lgamma(3 / a) - 2 * torch.lgamma(2 / a))
    alpha = a[(table[None, :] - rho[:, None]).abs().argmin(1)]
    return alpha, var


def _aggd_fit(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Asymmetric generalised Gaussian fit of each row: ``(α, η, σ_l², σ_r²)``."""
    neg, pos = (x < 0).double(), (x > 0).double()
    left = ((x.square() * neg).sum(1) / neg.sum(1).clamp_min(1)).sqrt()
    right = ((x.square() * pos).sum(1) / pos.sum(1).clamp_min(1)).sqrt()
    gamma = left / right.clamp_min(1e-12)
    r_hat = x.abs().mean(1).square() / x.square().mean(1).clamp_min(1e-12)
    big_r = r_hat * (gamma**3 + 1) * (gamma + 1) / (gamma.square() + 1).square()
    a = _ALPHAS
    table = torch.exp(2 * torch.lgamma(2 / a) - torch.lgamma(1 / a) - torch.lgamma(3 / a))
    alpha = a[(table[None, :] - big_r[:, None]).abs().argmin(1)]
    eta = (right - left) * torch.exp(torch.lgamma(2 / alpha) - torch.lgamma(1 / alpha)) * torch.exp(
        0.5 * (torch.lgamma(1 / alpha) - torch.lgamma(3 / alpha))
    )
    return alpha, eta, left.square(), right.square()


def _patches(x: torch.Tensor, size: int) -> torch.Tensor:
    """Non-overlapping ``size × size`` patches of ``(1, 1, H, W)`` as rows ``(N, size, size)`` (remainder dropped)."""
    h, w = x.shape[-2] // size * size, x.shape[-1] // size * size
    x = x[0, 0, :h, :w]
    return x.reshape(h // size, size, w // size, size).permute(0, 2, 1, 3).reshape(-1, size, size)


def _scale_features(coeffs: torch.Tensor) -> torch.Tensor:
    """18 features per patch from MSCN patches ``(N, p, p)``."""
    n = coeffs.shape[0]
    feats = list(_ggd_fit(coeffs.reshape(n, -1)))
    shifts = [(0, 1), (1, 0), (1, 1), (1, -1)]  # horizontal, vertical, main diagonal, anti-diagonal
    for dy, dx in shifts:
        shifted = torch.roll(coeffs, shifts=(-dy, -dx), dims=(1, 2))
        feats.extend(_aggd_fit((coeffs * shifted).reshape(n, -1)))
    return torch.stack(feats, dim=1)


def _patch_size(height: int, width: int, patch_size: int) -> int:
    return min(patch_size, height // 2 * 2, width // 2 * 2)


def niqe_features(image: torch.Tensor, patch_size: int = PATCH_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features (N, 36), sharpness (N,))`` of the patches of one ``(1, C, H, W)`` image in ``[0, 1]``."""
    y = luminance(image)
    size = _patch_size(*y.shape[-2:], patch_size)
    if size < 8:
        raise ValueError(f"NIQE needs images of at least 8x8 pixels, got {tuple(y.shape[-2:])}")
    y = y[..., : y.shape[-2] // size * size, : y.shape[-1] // size * size]
    coeffs, sigma = mscn(y)
    half = F.interpolate(y, scale_factor=0.5, mode="bicubic", antialias=True, align_corners=False)
    coeffs_half, _ = mscn(half)
    features = torch.cat([_scale_features(_patches(coeffs, size)), _scale_features(_patches(coeffs_half, size // 2))], 1)
    sharpness = _patches(sigma, size).mean((1, 2))
    return features, sharpness


@functools.lru_cache(maxsize=4)
def load_niqe_model(path: str | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(μ_p, Σ_p, patch_size)`` of a pristine model ``.npz`` (default: the shipped one)."""
    data = np.load(path or DEFAULT_MODEL_PATH)
    return torch.from_numpy(data["mean"]), torch.from_numpy(data["cov"]), int(data["patch_size"])


def niqe(image: torch.Tensor, model_path: str | None = None) -> torch.Tensor:
    """NIQE per image of a ``(B, C, H, W)`` batch in ``[0, 1]`` (``(B,)`` float64, lower is more natural);
    uint8/uint16 levels are rescaled and floats far outside ``[0, 1]`` refused, as for :func:`~diffusers_blind.metrics.psnr`.

    Example:
        >>> import torch
        >>> float(niqe(torch.rand(1, 3, 192, 192))) > 0
        True
    """
    image = _unit_range(image, "image", None).clamp(0, 1)  # uint8/uint16 rescaled; NaN, other ranges refused
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4:
        raise ValueError(f"image must be (B, C, H, W), got {tuple(image.shape)}")
    mean_p, cov_p, patch_size = load_niqe_model(model_path)
    scores = []
    for i in range(image.shape[0]):
        features, _ = niqe_features(image[i : i + 1], patch_size)
        mean = features.mean(0)
        cov = torch.cov(features.T) if features.shape[0] > 1 else torch.zeros_like(cov_p)
        diff = mean_p - mean
        pooled = torch.linalg.pinv((cov_p + cov) / 2)
        scores.append(torch.sqrt((diff @ pooled @ diff).clamp_min(0)))
    return torch.stack(scores)


def fit_niqe_model(
    images, patch_size: int = PATCH_SIZE, sharpness_threshold: float = SHARPNESS_THRESHOLD
) -> tuple[np.ndarray, np.ndarray, int]:
    """Fit ``(μ_p, Σ_p)`` on an iterable of ``(1, C, H, W)`` sharp images in ``[0, 1]``; returns them and the patch count."""
    selected = []
    for image in images:
        features, sharpness = niqe_features(image, patch_size)
        keep = sharpness > sharpness_threshold * sharpness.max()
        selected.append(features[keep])
    features = torch.cat(selected)
    if features.shape[0] < features.shape[1] + 1:
        raise ValueError(f"only {features.shape[0]} pristine patches; need more than {features.shape[1]}")
    return features.mean(0).numpy(), torch.cov(features.T).numpy(), features.shape[0]


def _load_folder(folder: Path, max_side: int | None):
    from PIL import Image

    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise SystemExit(f"no images in {folder}")
    for f in files:
        with Image.open(f) as im:
            im = im.convert("RGB")
            if max_side and max(im.size) > max_side:
                scale = max_side / max(im.size)
                im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS)
            yield torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)[None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fit a NIQE pristine model on a folder of sharp photographs.")
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="fit μ, Σ on the sharpest patches of the photographs of a folder")
    fit.add_argument("folder", type=Path)
    fit.add_argument("output", type=Path, help=".npz file to write (refuses to overwrite without --force)")
    fit.add_argument("--patch_size", type=int, default=PATCH_SIZE)
    fit.add_argument("--sharpness_threshold", type=float, default=SHARPNESS_THRESHOLD)
    fit.add_argument("--max_side", type=int, default=None, help="downscale larger photographs first (Lanczos)")
    fit.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    if args.output.exists() and not args.force:
        raise SystemExit(f"{args.output} exists; pass --force to overwrite")
    mean, cov, count = fit_niqe_model(_load_folder(args.folder, args.max_side), args.patch_size, args.sharpness_threshold)
    np.savez(args.output, mean=mean, cov=cov, patch_size=np.int64(args.patch_size), num_patches=np.int64(count),
             source=np.array(str(args.folder)))
    print(f"[niqe] fitted on {count} patches of {args.patch_size}px from {args.folder} -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
