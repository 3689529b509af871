"""Full-reference image metrics and the re-blur loss, per image, on ``[0, 1]`` tensors.

Conventions (docs/conventions.md, "Metrics"): images are ``(B, C, H, W)`` float tensors in ``[0, 1]``
(RGB or grayscale, no conversion to Y); uint8 and uint16 images are rescaled by 255 and 65535, floats
far outside ``[0, 1]`` are refused, and both arguments are clamped to ``[0, 1]`` before a
full-reference metric. Every metric is returned **per image** as a ``(B,)`` float64 tensor and
averaged by the caller. Noise levels are in ``[0, 1]`` units here (``10 / 255`` for "σ = 10").
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ..ops.operators import BLUR_PADDINGS, BlurOperator


# integer dtypes read as levels and their full scale (docs/conventions.md, "Value ranges")
INTEGER_SCALES = {torch.uint8: 255.0, torch.uint16: 65535.0} if hasattr(torch, "uint16") else {torch.uint8: 255.0}
# floats (in units of data_range) beyond these bounds are another range, not overshoot
RANGE_TOLERANCE = (-0.5, 1.5)
CHANNEL_COUNTS = (1, 3, 4)


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes ``(B, C, H, W)``, ``(C, H, W)`` or ``(H, W)``; a batch of 1 on either side broadcasts."""
    x, y = (t[None, None] if t.ndim == 2 else t[None] if t.ndim == 3 else t for t in (x, y))
    if x.ndim != 4 or y.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), (C, H, W) or (H, W); got {tuple(x.shape)} and {tuple(y.shape)}")
    for t in (x, y):
        if t.shape[1] not in CHANNEL_COUNTS:
            raise ValueError(
                f"images must have {CHANNEL_COUNTS} channels, got shape {tuple(t.shape)}: a batch of grayscale "
                "images (B, H, W) is passed as (B, 1, H, W), e.g. images[:, None]"
            )
        if t.shape[-1] == 0 or t.shape[-2] == 0 or t.shape[0] == 0:
            raise ValueError(f"images must not be empty, got shape {tuple(t.shape)}")
    batch = max(x.shape[0], y.shape[0])
    if x.shape[1:] != y.shape[1:] or x.shape[0] not in (1, batch) or y.shape[0] not in (1, batch):
        raise ValueError(f"image shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    return x.expand(batch, -1, -1, -1), y.expand(batch, -1, -1, -1)


def _numpy_image(array: np.ndarray, name: str) -> torch.Tensor:
    """A channels-last numpy image ``(H, W)``, ``(H, W, C)`` or ``(B, H, W, C)`` as a channels-first tensor."""
    if array.ndim in (3, 4) and array.shape[-1] not in CHANNEL_COUNTS:
        raise ValueError(
            f"{name}: numpy images are channels-last, (H, W, C) or (B, H, W, C) with C in {CHANNEL_COUNTS}; "
            f"got shape {array.shape} (for a channels-first array pass np.moveaxis(array, -3, -1), "
            "or pass a torch tensor)"
        )
    array = np.ascontiguousarray(array)
    tensor = torch.from_numpy(array if array.flags.writeable else array.copy())  # e.g. np.asarray of a PIL image
    return tensor.movedim(-1, -3) if tensor.ndim in (3, 4) else tensor


def _unit_range(image, name: str, data_range: float | None, check_range: bool = True) -> torch.Tensor:
    """One image argument as float64 in units of its full scale, checked (see :func:`psnr`); ``check_range=False``
    for a noisy measurement, whose values may go far outside ``[0, 1]`` at a high noise level."""
    if isinstance(image, np.ndarray):
        image = _numpy_image(image, name)
    if not torch.is_tensor(image):
        raise TypeError(f"{name} must be a torch tensor or a numpy array, got {type(image).__name__}")
    if not image.is_floating_point():
        if image.dtype not in INTEGER_SCALES:
            raise TypeError(
                f"{name} has dtype {image.dtype}: use uint8 or uint16 levels, or a float image in [0, data_range]"
            )
        scale = INTEGER_SCALES[image.dtype] if data_range is None else data_range
    else:
        scale = 1.0 if data_range is None else data_range
    image = image.double()
    if not torch.isfinite(image).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if image.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(image.shape)})")
    image = image / scale
    if not check_range:
        return image
    low, high = image.min().item(), image.max().item()
    if low < RANGE_TOLERANCE[0] or high > RANGE_TOLERANCE[1]:
        raise ValueError(
            f"{name} has values in [{low * scale:.4g}, {high * scale:.4g}], far outside [0, {scale:g}]: "
            "for 8-bit levels divide by 255 (or pass data_range=255 where the metric takes it), or map a [-1, 1] image "
            "with (x + 1) / 2"
        )
    return image


def _image_pair(x, y, data_range: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Both images as float64 in ``[0, 1]`` (full scale 1), clamped, shapes checked and broadcast."""
    if data_range is not None and not data_range > 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    x, y = _unit_range(x, "x", data_range), _unit_range(y, "y", data_range)
    x, y = _check_pair(x, y.to(x.device))
    return x.clamp(0, 1), y.clamp(0, 1)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float | None = None) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, ``10·log10(data_range² / MSE)`` in dB.

    Both images are clamped to ``[0, data_range]``; the MSE is the mean over all channels and
    pixels (RGB PSNR, not Y). Identical images give ``+inf`` (no cap).

    Inputs: torch ``(B, C, H, W)``, ``(C, H, W)`` or ``(H, W)``, or channels-last numpy arrays; a
    batch of 1 broadcasts against the other. ``data_range`` (default: 1 for floats, 255 for uint8,
    65535 for uint16, so integer images are rescaled) is the full scale of both images: floats
    beyond ``[−0.5, 1.5] · data_range`` (a ``[0, 255]`` image read as ``[0, 1]``) and NaN are errors.

    Example:
        >>> x = torch.full((1, 3, 8, 8), 0.5, dtype=torch.float64)
        >>> round(float(psnr(x + 0.1, x)), 6)  # MSE = 0.01 -> 20 dB
        20.0
    """
    x, y = _image_pair(x, y, data_range)
    mse = (x - y).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse)


def _gaussian_window(size: int = 11, std: float = 1.5, dtype=torch.float64, device=None) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * std**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float | None = None) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004), in-house, float64.

    Convention (KAIR ``calculate_ssim`` / scikit-image ``gaussian_weights=True`` style): images
    clamped to ``[0, data_range]``; local statistics with an 11×11 Gaussian window of σ = 1.5;
    ``C1 = (0.01·data_range)²``, ``C2 = (0.03·data_range)²``; the SSIM map is computed per channel
    on the **valid** part only (no padding: a 5-pixel border is dropped) and averaged over channels
    and pixels (RGB, not Y). Identical images give exactly 1. torchmetrics'
    ``structural_similarity_index_measure`` differs only at the border (it reflect-pads and keeps it).
    Inputs, integer images and ``data_range`` as in :func:`psnr` (computed on images divided by it).
    """
    x, y = _image_pair(x, y, data_range)
    if min(x.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 (window 11), got {tuple(x.shape[-2:])}")
    channels = x.shape[1]
    window = _gaussian_window(device=x.device).expand(channels, 1, 11, 11)

    def local_mean(t):
        return F.conv2d(t, window, groups=channels)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x**2
    var_y = local_mean(y * y) - mu_y**2
    cov = local_mean(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2  # (0.01·data_range)² on the images divided by data_range
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)


class ReblurLoss(NamedTuple):
    """Fast EM Eq. 34 per image: ``total = ‖k̂ ⊛ x̂ − y‖² − σ²M`` and ``per_element = total / M`` (``M = C·H·W``)."""

    total: torch.Tensor
    per_element: torch.Tensor


def reblur_loss(
    x_est: torch.Tensor,
    k_est: torch.Tensor,
    y: torch.Tensor,
    sigma: float | torch.Tensor,
    blur_mode: str = "circular",
) -> ReblurLoss:
    """Re-blur loss of Fast Diffusion EM (Eq. 34): how well the estimates explain the measurement.

    ``L = ‖k̂ ⊛ x̂ − y‖² − σ²·M`` with ``M = C·H·W``; its expectation is 0 for the true image and
    kernel (the residual is then the noise, ``E‖n‖² = σ²M``), it is negative when the estimates
    over-fit the noise and positive when they do not explain ``y``. ``per_element = L / M`` is
    ``mean((k̂ ⊛ x̂ − y)²) − σ²``, the scale of the paper's tables (~5e-3).

    Args:
        x_est: estimated sharp images ``(B, C, H, W)`` in ``[0, 1]`` (not clamped: the residual is
            taken as given).
        k_est: estimated kernels ``(B or 1, 1, k, k)``; used as given (normalise them first if needed).
        y: the measurement ``(B, C, H, W)`` (noisy: values beyond ``[−0.5 − 6σ, 1.5 + 6σ]`` are refused as another
            scale; uint8/uint16 levels are rescaled).
        sigma: noise std in ``[0, 1]`` units (``10 / 255`` for 8-bit σ = 10), scalar or ``(B,)``.
        blur_mode: the padding of the true convolution ``k̂ ⊛ x̂`` (:class:`~diffusers_blind.ops.BlurOperator`):
            ``"circular"`` (the Fast EM model), ``"reflect"`` or ``"zeros"``, to match how ``y`` was made.
    """
    if blur_mode not in BLUR_PADDINGS:
        raise ValueError(f"blur_mode must be one of {BLUR_PADDINGS}, got {blur_mode!r}")
    x_est, y = _unit_range(x_est, "x_est", None), _unit_range(y, "y", None, check_range=False)
    x_est, y = _check_pair(x_est, y.to(x_est.device))
    noise = float(torch.as_tensor(sigma, dtype=torch.float64).max()) if torch.as_tensor(sigma).numel() else 0.0
    low, high = RANGE_TOLERANCE[0] - 6 * noise, RANGE_TOLERANCE[1] + 6 * noise  # a noisy measurement overshoots
    if y.min().item() < low or y.max().item() > high:
        raise ValueError(f"y has values in [{y.min().item():.4g}, {y.max().item():.4g}], beyond what noise of std "
                         f"{noise:.4g} explains around [0, 1]: divide 8-bit levels by 255, map [-1, 1] with (y + 1) / 2")
    reblurred = BlurOperator(padding=blur_mode)(x_est, k_est.double())
    m = x_est[0].numel()
    sigma = torch.as_tensor(sigma, dtype=torch.float64).flatten()
    if sigma.numel() not in (1, x_est.shape[0]):
        raise ValueError(f"sigma must be a scalar or one value per image, got {sigma.numel()} values")
    residual = (reblurred - y).pow(2).flatten(1).sum(1)
    total = residual - sigma.to(residual.device) ** 2 * m
    return ReblurLoss(total=total, per_element=total / m)


def _luminance(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 3:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * weights).sum(1, keepdim=True)
    return x.mean(1, keepdim=True)


def laplacian_sharpness(x: torch.Tensor) -> torch.Tensor:
    """No-reference sharpness proxy per image: variance of the discrete Laplacian of the luminance.

    The classic "variance of Laplacian" focus measure (Pech-Pacheco et al. 2000) on images
    clamped to ``[0, 1]``, luminance ``0.299 R + 0.587 G + 0.114 B``, 4-neighbour Laplacian on
    the interior pixels (no padding). Higher means more high-frequency energy: blur lowers it,
    but **noise and ringing raise it too**, so it is a sharpness proxy, not a quality score.
    Compare it with the ground truth's value (ratio 1 = as sharp as the original).
    """
    x = _unit_range(x, "x", None)
    x = x[None] if x.ndim == 3 else x[None, None] if x.ndim == 2 else x
    if x.ndim != 4 or x.shape[1] not in CHANNEL_COUNTS:
        raise ValueError(f"x must be (B, C, H, W), (C, H, W) or (H, W) with C in {CHANNEL_COUNTS}, got {tuple(x.shape)}")
    lum = _luminance(x.clamp(0, 1))
    laplacian = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=lum.dtype, device=lum.device)
    response = F.conv2d(lum, laplacian.view(1, 1, 3, 3))
    return response.flatten(1).var(1, unbiased=False)


def gmsd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gradient magnitude similarity deviation per image (Xue et al. 2014); 0 = identical, lower is better.

    An analytic full-reference measure that tracks perceived quality better than PSNR and needs
    no weights: luminance of both images (clamped to ``[0, 1]``), 2×2 average-pool downsampling,
    Prewitt gradient magnitudes ``m_x, m_y`` (3×3, divided by 3, valid part), similarity map
    ``(2 m_x m_y + c) / (m_x² + m_y² + c)`` with ``c = 170 / 255²``, and its standard deviation.
    Inputs as in :func:`psnr` (with its default ``data_range``).
    """
    x, y = _image_pair(x, y, None)
    lum_x = F.avg_pool2d(_luminance(x), 2)
    lum_y = F.avg_pool2d(_luminance(y), 2)
    prewitt = torch.tensor([[1.0, 0.0, -1.0]] * 3, dtype=lum_x.dtype, device=lum_x.device) / 3
    filters = torch.stack([prewitt, prewitt.T]).unsqueeze(1)

    def magnitude(lum):
        grads = F.conv2d(lum, filters)
        return grads.pow(2).sum(1).sqrt()

    mx, my = magnitude(lum_x), magnitude(lum_y)
    c = 170.0 / 255.0**2
    similarity = (2 * mx * my + c) / (mx.pow(2) + my.pow(2) + c)
    return similarity.flatten(1).std(1, unbiased=False)

