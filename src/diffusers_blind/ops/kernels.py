"""Blur kernels: projection onto the simplex-like set, recentring, and seeded generators.

Kernels are ``(B, 1, k, k)`` tensors, non-negative with sum 1, centre at index ``k // 2``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter


def _check_count(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum`` (integral floats and numpy ints accepted), else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not (
        math.isfinite(value) and float(value).is_integer() and value >= minimum
    ):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def dirac_kernel(kernel_size: int, batch_size: int = 1, device=None, dtype=torch.float32) -> torch.Tensor:
    """A Dirac at index ``(k//2, k//2)``: the identity blur (Fast EM's initial kernel)."""
    kernel_size, batch_size = _check_count("kernel_size", kernel_size), _check_count("batch_size", batch_size)
    kernel = torch.zeros(batch_size, 1, kernel_size, kernel_size, device=device, dtype=dtype)
    kernel[..., kernel_size // 2, kernel_size // 2] = 1.0
    return kernel


def project_kernel(kernel: torch.Tensor) -> torch.Tensor:
    """Clip to ``k >= 0`` and divide by the sum (per kernel). An all-zero kernel becomes a Dirac.

    This is the projection of the M-step (docs/conventions.md, "M-step (kernel update)", step 2).
    A NaN or infinite entry is a ValueError (one host sync), not a Dirac.
    """
    if not torch.isfinite(kernel).all():
        raise ValueError("kernel contains NaN or infinite values; cannot project it to a sum-1 kernel")
    return _project(kernel)


def _project(kernel: torch.Tensor) -> torch.Tensor:
    """:func:`project_kernel` without the finiteness check (no host sync); a non-finite kernel gives NaN, not a Dirac."""
    finite = torch.isfinite(kernel).all(dim=-1, keepdim=True).all(dim=-2, keepdim=True)
    kernel = torch.where(finite, kernel, torch.full_like(kernel, float("nan")))
    kernel = kernel.clamp_min(0)
    total = kernel.sum(dim=(-2, -1), keepdim=True)
    # a (kh, kw) Dirac broadcasts against kernels of any leading shape and keeps the input's shape
    dirac = torch.zeros(kernel.shape[-2:], device=kernel.device, dtype=kernel.dtype)
    dirac[kernel.shape[-2] // 2, kernel.shape[-1] // 2] = 1.0
    return torch.where((total > 0) | total.isnan(), kernel / total.clamp_min(torch.finfo(kernel.dtype).tiny), dirac)


def kernel_center_of_mass(kernel: torch.Tensor) -> torch.Tensor:
    """Centre of mass ``(row, col)`` of each non-negative kernel, as a ``(B, 2)`` tensor."""
    weights = kernel.clamp_min(0)[:, 0]
    total = weights.sum(dim=(-2, -1)).clamp_min(torch.finfo(kernel.dtype).tiny)
    rows = torch.arange(kernel.shape[-2], device=kernel.device, dtype=kernel.dtype)
    cols = torch.arange(kernel.shape[-1], device=kernel.device, dtype=kernel.dtype)
    row = (weights.sum(-1) * rows).sum(-1) / total
    col = (weights.sum(-2) * cols).sum(-1) / total
    return torch.stack([row, col], dim=-1)


def kernel_extent(kernel: torch.Tensor, level: float = 0.1) -> torch.Tensor:
    """Side of the smallest centred odd square that holds every pixel ``≥ level · max`` of each kernel.

    A support measure that ignores the faint haze an estimated kernel spreads over its whole support.
    ``kernel``: ``(B, 1, k, k)``; returns a ``(B,)`` long tensor of odd sizes in ``[1, k]``. For an even
    ``k`` the largest is ``k − 1``: the first row and column lie outside every centred odd square
    that fits the support, and a kernel reaching them is reported at that cap.
    """
    if not 0 < level <= 1:
        raise ValueError(f"level must be in (0, 1], got {level}")
    largest = max(kernel.shape[-2:]) - 1 + max(kernel.shape[-2:]) % 2  # the largest odd size <= k
    weights = kernel[:, 0]
    peak = weights.amax(dim=(-2, -1), keepdim=True)
    inside = weights >= level * peak
    rows = torch.arange(kernel.shape[-2], device=kernel.device) - kernel.shape[-2] // 2
    cols = torch.arange(kernel.shape[-1], device=kernel.device) - kernel.shape[-1] // 2
    radius = torch.maximum(rows.abs()[:, None], cols.abs()[None, :]).expand_as(inside)
    return (2 * torch.where(inside, radius, torch.zeros_like(radius)).amax(dim=(-2, -1)) + 1).clamp_max(largest)


def shift_kernel(kernel: torch.Tensor, shift: torch.Tensor, mode: str = "bicubic") -> torch.Tensor:
    """Translate each kernel by ``shift = (d_row, d_col)`` pixels (``(B, 2)``), zero outside the support."""
    b, _, h, w = kernel.shape
    rows = torch.arange(h, device=kernel.device, dtype=kernel.dtype)
    cols = torch.arange(w, device=kernel.device, dtype=kernel.dtype)
    grid_r = rows.view(1, h, 1) - shift[:, 0].view(b, 1, 1)
    grid_c = cols.view(1, 1, w) - shift[:, 1].view(b, 1, 1)
    # grid_sample wants (x, y) normalised to [-1, 1] with align_corners=True.
    grid = torch.stack(
        [(2 * grid_c / max(w - 1, 1) - 1).expand(b, h, w), (2 * grid_r / max(h - 1, 1) - 1).expand(b, h, w)], dim=-1
    )
    return F.grid_sample(kernel, grid, mode=mode, padding_mode="zeros", align_corners=True)


def center_kernel(kernel: torch.Tensor, mode: str = "bicubic") -> torch.Tensor:
    """Move each kernel's centre of mass to index ``(k//2, k//2)`` and re-project (Fast EM §4.2 "recentre").

    Runs in torch on the kernel's device (no host sync; a non-finite kernel comes out NaN, never as a
    Dirac). Differences from the reference
    ``kernel_shift`` (a scipy cubic spline): the target is the FFT centre
    ``k//2`` for every size, whereas the reference aims at ``k//2 + 0.5`` for even sizes (32.5 for
    64×64, half a pixel off the ``p2o`` centre); interpolation is bicubic ``grid_sample`` instead of
    a cubic spline; and the result is projected back to ``k >= 0, sum 1`` (the reference keeps the
    spline's small negative lobes).

    PyTorch's bicubic kernel (``a = -0.75``) does not reproduce linear ramps, so one bicubic shift by
    ``n + t`` pixels moves the centre of mass by ``n + t ± t(1−t)(1−2t)/2`` (up to ~0.05 px off,
    more after clipping its negative lobes). A second, bilinear pass (exact first moment,
    non-negative weights) removes that small residual; it is skipped when ``mode="bilinear"``.
    """
    target = torch.tensor([kernel.shape[-2] // 2, kernel.shape[-1] // 2], device=kernel.device, dtype=kernel.dtype)
    centred = _project(shift_kernel(kernel, target - kernel_center_of_mass(kernel), mode=mode))
    if mode != "bilinear":
        centred = _project(shift_kernel(centred, target - kernel_center_of_mass(centred), mode="bilinear"))
    return centred


def rescale_kernel(kernel: torch.Tensor, factor: float, kernel_size: int) -> torch.Tensor:
    """The same blur seen at ``factor``× the resolution, on a ``kernel_size`` grid, centred.

    ``k_f(v) ∝ k(v / factor)``: bilinear resampling of the ``(B, 1, k, k)`` kernel to ``round(k·factor)``
    pixels (antialiased when shrinking), zero-padded or cropped about its centre to ``kernel_size``,
    projected (``≥ 0``, sum 1) and recentred. Coarse-to-fine estimation uses it to carry a kernel
    found on a downscaled image to the next finer scale.
    """
    if factor <= 0 or kernel_size < 1:
        raise ValueError(f"factor must be > 0 and kernel_size >= 1, got {factor!r}, {kernel_size!r}")
    size = max(1, round(kernel.shape[-1] * factor))
    resized = F.interpolate(kernel, size=(size, size), mode="bilinear", align_corners=False, antialias=factor < 1)
    if size < kernel_size:
        before = (kernel_size - size) // 2
        resized = F.pad(resized, (before, kernel_size - size - before) * 2)
    elif size > kernel_size:
        start = (size - kernel_size) // 2
        resized = resized[..., start:start + kernel_size, start:start + kernel_size]
    return center_kernel(project_kernel(resized))


def gaussian_kernel(kernel_size: int, std: float | tuple[float, float], angle: float = 0.0) -> torch.Tensor:
    """A (possibly anisotropic, rotated by ``angle`` radians) Gaussian kernel ``(1, 1, k, k)``, sum 1.

    ``kernel_size`` is an integer ``>= 1``; ``std`` (one value or ``(std_row, std_col)``) and ``angle``
    are finite, the stds positive.
    """
    kernel_size = _check_count("kernel_size", kernel_size)
    try:
        values = np.asarray(std, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        values = np.empty(0)
    if values.size not in (1, 2):
        raise ValueError(f"Gaussian std must be a number or a pair of numbers, got {std!r}")
    std_r, std_c = float(values[0]), float(values[-1])
    if not (math.isfinite(std_r) and math.isfinite(std_c) and std_r > 0 and std_c > 0):
        raise ValueError(f"Gaussian std must be positive and finite, got {std}")
    if not isinstance(angle, (int, float, np.number)) or not math.isfinite(angle):
        raise ValueError(f"angle must be a finite number of radians, got {angle!r}")
    coords = torch.arange(kernel_size, dtype=torch.float64) - kernel_size // 2
    r, c = torch.meshgrid(coords, coords, indexing="ij")
    cos, sin = math.cos(angle), math.sin(angle)
    u, v = cos * r + sin * c, -sin * r + cos * c
    kernel = torch.exp(-0.5 * ((u / std_r) ** 2 + (v / std_c) ** 2))
    return (kernel / kernel.sum()).float().view(1, 1, kernel_size, kernel_size)


def as_numpy_generator(generator: torch.Generator | np.random.Generator | int | None) -> np.random.Generator:
    """Turn a ``torch.Generator``, a numpy ``Generator`` or an int seed into a numpy ``Generator``.

    A ``torch.Generator`` is advanced by one draw, so successive calls give different kernels.
    ``None`` gives fresh OS entropy (not reproducible): pass a generator for reproducibility.
    """
    if isinstance(generator, np.random.Generator):
        return generator
    if isinstance(generator, torch.Generator):
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
        return np.random.default_rng(seed)
    return np.random.default_rng(generator)


def motion_kernel(
    kernel_size: int = 33,
    intensity: float = 0.5,
    generator: torch.Generator | np.random.Generator | int | None = None,
) -> torch.Tensor:
    """A random camera-shake kernel ``(1, 1, k, k)``, sum 1 (docs/conventions.md, "Motion kernels").

    A random walk with angular jitter is drawn on a 2× canvas, rasterised as a line, smoothed,
    downsampled and normalised. ``intensity`` in ``[0, 1]`` controls length and curvature.
    """
    if not 0 <= intensity <= 1:
        raise ValueError(f"intensity must be in [0, 1], got {intensity}")
    kernel_size = _check_count("kernel_size", kernel_size, 3)
    rng = as_numpy_generator(generator)
    canvas = 2 * kernel_size
    diagonal = math.sqrt(2) * canvas
    max_length = 0.75 * diagonal * (rng.uniform() + rng.uniform(0, intensity**2))

    steps = []
    while sum(steps) < max_length:
        step = rng.beta(1, 30) * (1 - intensity + 0.1) * diagonal
        if step < max_length:
            steps.append(step)
    max_angle = rng.uniform(0, intensity * math.pi)
    jitter = rng.beta(2, 20)
    angles = [rng.uniform(-max_angle, max_angle)]
    for _ in range(len(steps) - 1):
        angle = rng.triangular(0, intensity * max_angle, max_angle + 0.1)
        if rng.uniform() < jitter:
            angle *= -np.sign(angles[-1])
        else:
            angle *= np.sign(angles[-1]) if angles[-1] != 0 else 1.0
        angles.append(angle)

    path = np.concatenate([[0j], np.cumsum(np.asarray(steps) * np.exp(1j * np.asarray(angles)))])
    path = (path - path.mean()) * np.exp(1j * rng.uniform(0, math.pi))
    # keep the path inside the canvas (the kernel support) by scaling down if needed
    extent = max(np.abs(path.real).max(), np.abs(path.imag).max(), 1e-9)
    path = path * min(1.0, 0.45 * canvas / extent) + canvas / 2 * (1 + 1j)

    image = Image.new("L", (canvas, canvas), 0)
    ImageDraw.Draw(image).line([(p.real, p.imag) for p in path], fill=255, width=max(1, int(diagonal / 150)))
    trace = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).view(1, 1, canvas, canvas)
    radius = max(1.0, 0.01 * diagonal)
    smoothing = gaussian_kernel(2 * math.ceil(2 * radius) + 1, radius / 2)
    trace = F.conv2d(trace, smoothing, padding=smoothing.shape[-1] // 2)
    image = Image.fromarray(trace[0, 0].numpy(), mode="F").resize((kernel_size, kernel_size), Image.Resampling.LANCZOS)
    kernel = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).view(1, 1, kernel_size, kernel_size)
    return center_kernel(project_kernel(kernel), mode="bilinear")


# pixels: a shake kernel whose centre of mass is farther from k // 2 is re-placed (see shake_kernel)
SHAKE_CENTRING_TOLERANCE = 0.05


def shake_kernel(
    kernel_size: int = 33,
    extent: float = 0.7,
    generator: torch.Generator | np.random.Generator | int | None = None,
) -> torch.Tensor:
    """A camera-shake kernel ``(1, 1, k, k)`` from a time-sampled trajectory with inertia, sum 1.

    The camera position ``p`` follows ``v ← v + (−c·p + n)·dt``, ``p ← p + v·dt`` over a uniform
    exposure of 1 000 instants (``n``: Gaussian impulses, now and then a stronger jerk; ``−c·p``
    keeps the path compact). Every instant deposits the same light, so where the camera slows down
    (turning points, the end of a stroke) the kernel is brighter: thin curved paths of uneven
    brightness, as measured camera shake looks. In a third of the kernels the light also ramps up or
    down along the exposure (a shutter that opens or closes over the stroke). The path is scaled so
    its larger side spans ``extent · k`` pixels (``extent`` in ``(0, 1]``), splatted bilinearly on a
    2× canvas, smoothed by half a pixel, area-downsampled, normalised and centred. Where centring
    cuts light at the border and leaves the centre of mass more than 0.05 px off ``k // 2`` (long
    paths whose light sits off the middle of their bounding box, mostly at ``extent ≥ 0.8``), the path
    is placed again with its light's centroid at the centre and scaled down as far as needed to fit:
    every kernel is centred, and such a kernel's larger side spans less than ``extent · k``.
    """
    if not 0 < extent <= 1:
        raise ValueError(f"extent must be in (0, 1], got {extent}")
    kernel_size = _check_count("kernel_size", kernel_size, 3)
    rng = as_numpy_generator(generator)
    steps, dt = 1000, 1e-3
    pull, jerk_rate = rng.uniform(0, 40), rng.uniform(0, 0.01)
    impulses = rng.normal(size=(steps, 2)) * rng.uniform(50, 400)
    jerks = rng.uniform(size=steps) < jerk_rate
    impulses[jerks] *= rng.uniform(5, 20)
    position, velocity = np.zeros(2), rng.normal(size=2) * rng.uniform(0, 2)
    path = np.empty((steps, 2))
    for t in range(steps):
        velocity = velocity + (-pull * position + impulses[t]) * dt
        position = position + velocity * dt
        path[t] = position
    weights = np.ones(steps)
    if rng.uniform() < 1 / 3:
        ramp = np.linspace(0, 1, steps) ** rng.uniform(1, 4) * rng.uniform(1, 4)
        weights = weights + (ramp if rng.uniform() < 0.5 else ramp[::-1])
    canvas = 2 * kernel_size
    span = (path.max(0) - path.min(0)).max()
    scale = extent * (canvas - 4) / span if span > 1e-9 else 0.0
    kernel = center_kernel(
        _splat_path((path - (path.max(0) + path.min(0)) / 2) * scale + (canvas - 1) / 2, weights, canvas), mode="bilinear"
    )
    middle = torch.tensor([kernel_size // 2, kernel_size // 2], dtype=kernel.dtype)
    if (kernel_center_of_mass(kernel)[0] - middle).abs().max() <= SHAKE_CENTRING_TOLERANCE:
        return kernel
    # Centring cut light at the border (a long path whose light sits off the middle of its bounding
    # box): place the light's centroid at the centre instead, scaled down as far as needed to fit.
    centroid = (weights[:, None] * path).sum(0) / weights.sum()
    centre = 2 * (kernel_size // 2) + 0.5  # the canvas point that 2x2 pooling maps to index k // 2
    room = min(centre - 1.5, canvas - 2.5 - centre)  # the margin the placement above keeps
    reach = np.abs(path - centroid).max()
    scale = min(scale, room / reach) if reach > 1e-9 else 0.0
    return center_kernel(_splat_path((path - centroid) * scale + centre, weights, canvas), mode="bilinear")


def _splat_path(path: np.ndarray, weights: np.ndarray, canvas: int) -> torch.Tensor:
    """Bilinear splat of ``path`` (canvas pixels) on a ``canvas²`` grid, smoothed, 2x2-pooled and projected."""
    grid = np.zeros((canvas, canvas))
    base = np.floor(path).astype(int)
    frac = path - base
    for dr, dc in ((0, 0), (0, 1), (1, 0), (1, 1)):
        share = (frac[:, 0] if dr else 1 - frac[:, 0]) * (frac[:, 1] if dc else 1 - frac[:, 1])
        rows, cols = np.clip(base[:, 0] + dr, 0, canvas - 1), np.clip(base[:, 1] + dc, 0, canvas - 1)
        np.add.at(grid, (rows, cols), weights * share)
    trace = torch.from_numpy(grid.astype(np.float32)).view(1, 1, canvas, canvas)
    smoothing = gaussian_kernel(5, 1.0)  # half a pixel at the kernel's scale
    return project_kernel(F.avg_pool2d(F.conv2d(trace, smoothing, padding=2), 2))



def _draw_kernels(draw, kernel_size: int, setting, batch_size: int, generator) -> torch.Tensor:
    """``batch_size`` kernels ``draw(kernel_size, value, rng)``; ``setting`` is a float or a ``(low, high)`` range
    drawn uniformly per kernel from the same seeded stream."""
    batch_size = _check_count("batch_size", batch_size)
    rng = as_numpy_generator(generator)
    kernels = []
    for _ in range(batch_size):
        value = setting if isinstance(setting, (int, float, np.integer, np.floating)) else rng.uniform(*setting)
        kernels.append(draw(kernel_size, float(value), rng))
    return torch.cat(kernels)


class ShakeKernelGenerator:
    """Seeded batches of :func:`shake_kernel` kernels; ``extent`` is a float or a ``(low, high)`` range."""

    def __init__(self, kernel_size: int = 33, extent: float | tuple[float, float] = (0.2, 0.8)):
        self.kernel_size = kernel_size
        self.extent = extent

    def __call__(self, batch_size: int = 1, generator=None) -> torch.Tensor:
        return _draw_kernels(shake_kernel, self.kernel_size, self.extent, batch_size, generator)


def random_gaussian_kernel(
    kernel_size: int = 33,
    std_range: tuple[float, float] = (0.5, 4.0),
    generator: torch.Generator | np.random.Generator | int | None = None,
) -> torch.Tensor:
    """An anisotropic Gaussian kernel with stds drawn uniformly in ``std_range`` and a random angle."""
    rng = as_numpy_generator(generator)
    std = (float(rng.uniform(*std_range)), float(rng.uniform(*std_range)))
    return gaussian_kernel(kernel_size, std, angle=float(rng.uniform(0, math.pi)))


class MotionKernelGenerator:
    """Seeded batches of camera-shake kernels; ``intensity`` is a float or a ``(low, high)`` range."""

    def __init__(self, kernel_size: int = 33, intensity: float | tuple[float, float] = 0.5):
        self.kernel_size = kernel_size
        self.intensity = intensity

    def __call__(self, batch_size: int = 1, generator=None) -> torch.Tensor:
        return _draw_kernels(motion_kernel, self.kernel_size, self.intensity, batch_size, generator)


class GaussianKernelGenerator:
    """Seeded batches of random anisotropic Gaussian kernels."""

    def __init__(self, kernel_size: int = 33, std_range: tuple[float, float] = (0.5, 4.0)):
        self.kernel_size = kernel_size
        self.std_range = std_range

    def __call__(self, batch_size: int = 1, generator=None) -> torch.Tensor:
        batch_size = _check_count("batch_size", batch_size)
        rng = as_numpy_generator(generator)
        return torch.cat([random_gaussian_kernel(self.kernel_size, self.std_range, rng) for _ in range(batch_size)])
