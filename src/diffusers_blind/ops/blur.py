"""Blur operators on image tensors.

Conventions (docs/conventions.md, "Kernels and blur"): images are float tensors ``(B, C, H, W)`` (an integer
image is a TypeError; float16 and bfloat16 work in every mode); kernels are
``(B or 1, 1, kh, kw)`` non-negative with sum 1 and their centre at index ``(kh // 2, kw // 2)``.

* :func:`fft_blur` is a **circular, true convolution** ``y = k ⊛ x`` computed in Fourier
  (Fast Diffusion EM's forward model).
* :func:`spatial_blur` is a **cross-correlation** with zero, reflect or circular padding
  (``F.conv2d(..., padding="same")``, the BlindDPS / DPS forward model). Away from the borders
  ``spatial_blur(x, k) == fft_blur(x, k.flip(-2, -1))``: a BlindDPS kernel is the 180° rotation
  of the same point-spread function in the FFT convention (:func:`flip_kernel`, the one place
  this flip is made).

:class:`~diffusers_blind.ops.operators.BlurOperator` wraps these as one true-convolution operator with a
``padding`` choice and its adjoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_kernel_fits(kernel: torch.Tensor, shape: tuple[int, int]) -> None:
    kh, kw = kernel.shape[-2:]
    if kh > shape[0] or kw > shape[1]:
        raise ValueError(
            f"Kernel of size {kh}x{kw} is larger than the image grid {shape[0]}x{shape[1]}; "
            "use a smaller kernel_size or a larger image."
        )


def pad_kernel(kernel: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Zero-pad a ``(..., kh, kw)`` kernel to ``shape`` and roll its centre ``(kh//2, kw//2)`` to ``(0, 0)``.

    This is the spatial half of ``p2o``: the padded array is the circular convolution kernel on the
    image grid.
    """
    _check_kernel_fits(kernel, shape)
    kh, kw = kernel.shape[-2:]
    padded = F.pad(kernel, (0, shape[1] - kw, 0, shape[0] - kh))
    return torch.roll(padded, shifts=(-(kh // 2), -(kw // 2)), dims=(-2, -1))


def crop_kernel(padded: torch.Tensor, kernel_size: int | tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`pad_kernel`: roll the origin back to ``(kh//2, kw//2)`` and keep the top-left ``kh x kw``."""
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    rolled = torch.roll(padded, shifts=(kh // 2, kw // 2), dims=(-2, -1))
    return rolled[..., :kh, :kw]


def p2o(kernel: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Point-spread function to optical transfer function: ``FFT2(pad_kernel(kernel, shape))`` (complex)."""
    return torch.fft.fft2(pad_kernel(kernel, shape))


def o2p(otf: torch.Tensor, kernel_size: int | tuple[int, int]) -> torch.Tensor:
    """Optical transfer function to point-spread function: ``crop_kernel(IFFT2(otf).real, kernel_size)``."""
    return crop_kernel(torch.fft.ifft2(otf).real, kernel_size)


def _check_image_kernel(image: torch.Tensor, kernel: torch.Tensor) -> None:
    if image.ndim != 4:
        raise ValueError(f"image must be (B, C, H, W), got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise TypeError(
            f"image must be a floating-point tensor, got {image.dtype}: convert it first, e.g. image.float() / 255 "
            "for 8-bit levels"
        )
    if kernel.ndim != 4 or kernel.shape[1] != 1:
        raise ValueError(f"kernel must be (B or 1, 1, kh, kw), got shape {tuple(kernel.shape)}")
    if kernel.shape[0] not in (1, image.shape[0]):
        raise ValueError(f"kernel batch {kernel.shape[0]} must be 1 or the image batch {image.shape[0]}")


def fft_blur(image: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Circular convolution ``y = k ⊛ x`` (Fast EM Eq. 1), ``y = IFFT(FFT(x) · p2o(k))``.

    Example:
        >>> x = torch.zeros(1, 1, 16, 16); x[..., 8, 8] = 1
        >>> k = torch.rand(1, 1, 5, 5); k = k / k.sum()
        >>> torch.allclose(fft_blur(x, k)[0, 0, 6:11, 6:11], k[0, 0], atol=1e-6)
        True
    """
    _check_image_kernel(image, kernel)
    work = _fft_dtype(image.dtype)
    otf = p2o(kernel.to(work), image.shape[-2:])
    return torch.fft.ifft2(torch.fft.fft2(image.to(work)) * otf).real.to(image.dtype)


def fft_blur_adjoint(image: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Adjoint of :func:`fft_blur` (circular correlation): ``IFFT(FFT(x) · conj(p2o(k)))``."""
    _check_image_kernel(image, kernel)
    work = _fft_dtype(image.dtype)
    otf = p2o(kernel.to(work), image.shape[-2:])
    return torch.fft.ifft2(torch.fft.fft2(image.to(work)) * otf.conj()).real.to(image.dtype)


def _fft_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16 and bfloat16 images are transformed in float32 (torch.fft has no half kernels); the result is cast back."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def spatial_blur(image: torch.Tensor, kernel: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    """Cross-correlation with ``"same"`` output size (BlindDPS / DPS convention).

    ``padding`` is ``"zeros"`` (BlindDPS: ``F.conv2d(padding="same")``), ``"reflect"`` (DPS) or
    ``"circular"``. For even sizes the pad is ``(k-1)//2`` before and ``k//2`` after, like
    ``padding="same"``; in the interior ``spatial_blur(x, k) == fft_blur(x, k.flip(-2, -1))``.
    """
    _check_image_kernel(image, kernel)
    if padding not in ("zeros", "reflect", "circular"):
        raise ValueError(f"padding must be 'zeros', 'reflect' or 'circular', got {padding!r}")
    b, c, h, w = image.shape
    _check_kernel_fits(kernel, (h, w))
    kh, kw = kernel.shape[-2:]
    pads = _same_pads(kh, kw)
    mode = "constant" if padding == "zeros" else padding
    padded = F.pad(image, pads, mode=mode)
    weight = kernel.to(image.dtype).expand(b, 1, kh, kw).repeat_interleave(c, dim=0)
    out = F.conv2d(padded.reshape(1, b * c, *padded.shape[-2:]), weight, groups=b * c)
    return out.reshape(b, c, h, w)


def flip_kernel(kernel: torch.Tensor) -> torch.Tensor:
    """The 180° rotation between a true-convolution kernel and a correlation kernel (both ways).

    A true convolution with ``k`` (centre ``k // 2``) is a correlation with ``flip_kernel(k)``
    (centre ``(k − 1) // 2``, where ``"same"`` padding puts it). BlindDPS and DPS blur by
    correlation (``F.conv2d``), so a kernel read from or written for them is flipped here.

    Example:
        >>> flip_kernel(torch.arange(4.0).reshape(1, 1, 2, 2))[0, 0]
        tensor([[3., 2.],
                [1., 0.]])
    """
    return kernel.flip(-2, -1)


def _same_pads(kh: int, kw: int) -> tuple[int, int, int, int]:
    """``F.pad`` order ``(left, right, top, bottom)``: ``(k − 1) // 2`` before and ``k // 2`` after."""
    return ((kw - 1) // 2, kw // 2, (kh - 1) // 2, kh // 2)


def _padding_index(n: int, before: int, after: int, mode: str, device) -> torch.Tensor:
    """Source index of every position of a 1-D axis of length ``n`` padded by ``before``/``after``."""
    index = torch.arange(-before, n + after, device=device)
    if mode == "circular":
        return index % n
    if n == 1:
        return torch.zeros_like(index)
    period = 2 * (n - 1)  # reflect without repeating the edge sample
    index = index % period
    return torch.where(index < n, index, period - index)


def pad_adjoint(padded: torch.Tensor, pads: tuple[int, int, int, int], mode: str) -> torch.Tensor:
    """Adjoint of ``F.pad(x, pads, mode)`` for ``mode`` in ``"zeros"``, ``"reflect"``, ``"circular"``.

    Zero padding's adjoint is the crop; reflect and circular padding's adjoint adds every padded
    sample back onto the pixel it was copied from.
    """
    left, right, top, bottom = pads
    height = padded.shape[-2] - top - bottom
    width = padded.shape[-1] - left - right
    if mode == "zeros":
        return padded[..., top : top + height, left : left + width]
    rows = _padding_index(height, top, bottom, mode, padded.device)
    cols = _padding_index(width, left, right, mode, padded.device)
    out = padded.new_zeros(*padded.shape[:-2], height, padded.shape[-1]).index_add(-2, rows, padded)
    return out.new_zeros(*padded.shape[:-2], height, width).index_add(-1, cols, out)


def spatial_blur_adjoint(image: torch.Tensor, kernel: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    """Adjoint of :func:`spatial_blur` in the image: ``⟨spatial_blur(x, k), y⟩ = ⟨x, spatial_blur_adjoint(y, k)⟩``.

    The transposed "valid" correlation (``F.conv_transpose2d``, a full convolution) followed by the
    adjoint of the padding (:func:`pad_adjoint`). Differentiable in both arguments.
    """
    _check_image_kernel(image, kernel)
    if padding not in ("zeros", "reflect", "circular"):
        raise ValueError(f"padding must be 'zeros', 'reflect' or 'circular', got {padding!r}")
    b, c, h, w = image.shape
    _check_kernel_fits(kernel, (h, w))
    kh, kw = kernel.shape[-2:]
    weight = kernel.to(image.dtype).expand(b, 1, kh, kw).repeat_interleave(c, dim=0)
    full = F.conv_transpose2d(image.reshape(1, b * c, h, w), weight, groups=b * c)
    return pad_adjoint(full.reshape(b, c, h + kh - 1, w + kw - 1), _same_pads(kh, kw), padding)


def edge_taper_window(
    shape: tuple[int, int],
    width: int,
    device=None,
    dtype=torch.float32,
    region: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """A ``(1, 1, H, W)`` window, 1 inside and falling to 0 along the borders with a raised cosine of ``width`` pixels.

    Multiplying both the measurement and the image estimate by it removes the jump that the
    circular FFT model sees at the image border of a non-periodic photograph, so a Fourier kernel
    estimate is not polluted by it (the windowed pair obeys ``w·(k ⊛ x) ≈ k ⊛ (w·x)`` when ``width``
    exceeds the kernel size). ``width = 0`` gives all ones.

    ``region = (top, left, height, width)`` restricts the window to that rectangle: zero outside
    it, rising over ``width`` pixels inside its edges. For a photograph padded by a reflected margin
    this keeps the invented margin (where ``y = k ⊛ x`` does not hold) out of the kernel estimate.

    >>> w = edge_taper_window((10, 10), 2, region=(2, 2, 6, 6))
    >>> [round(v, 2) for v in w[0, 0, :, 5].tolist()]
    [0.0, 0.0, 0.25, 0.75, 1.0, 1.0, 0.75, 0.25, 0.0, 0.0]
    """
    height, width_px = shape
    top, left, inner_h, inner_w = region if region is not None else (0, 0, height, width_px)
    if top < 0 or left < 0 or inner_h < 1 or inner_w < 1 or top + inner_h > height or left + inner_w > width_px:
        raise ValueError(f"region {region} does not fit an image of {height}x{width_px}")
    if width < 0 or 2 * width > min(inner_h, inner_w):
        raise ValueError(f"taper width {width} must be in [0, min(H, W) / 2] for a region of {inner_h}x{inner_w}")

    def ramp(n: int, start: int, length: int) -> torch.Tensor:
        values = torch.zeros(n, device=device, dtype=torch.float64)
        values[start : start + length] = 1
        if width > 0:
            rise = 0.5 - 0.5 * torch.cos(torch.linspace(0, torch.pi, width + 2, device=device, dtype=torch.float64)[1:-1])
            values[start : start + width] = rise
            values[start + length - width : start + length] = rise.flip(0)
        return values

    return (ramp(height, top, inner_h)[:, None] * ramp(width_px, left, inner_w)[None, :]).to(dtype)[None, None]


def photograph_window(shape: tuple[int, int], region: tuple[int, int, int, int], kernel_size: int, device=None) -> torch.Tensor:
    """Kernel-estimation weights for a photograph padded by an invented margin.

    Zero outside ``region = (top, left, height, width)`` (the margin, where ``y = k ⊛ x`` does not
    hold), rising with a raised cosine over ``kernel_size // 2`` pixels (at most a quarter of the
    photograph) inside it, so that a circular Fourier solve sees neither the margin nor a jump.
    """
    ramp = min(kernel_size // 2, min(region[2], region[3]) // 4)
    return edge_taper_window(shape, ramp, device=device, region=region)


def valid_mask(shape: tuple[int, int], region: tuple[int, int, int, int], kernel_size: int, device=None) -> torch.Tensor:
    """0/1 mask of the pixels of ``region`` whose whole ``kernel_size`` neighbourhood lies inside it.

    Where only the photograph ``region`` of an image is known (the rest is an invented margin),
    ``y = k ⊛ x`` holds exactly at these pixels and nowhere else: the region eroded by
    ``kernel_size // 2`` on every side. Raises when nothing is left.

    >>> valid_mask((8, 8), (1, 1, 6, 6), 3)[0, 0, :, 4].tolist()
    [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    """
    half = kernel_size // 2
    top, left, height, width = region
    if height <= 2 * half or width <= 2 * half:
        raise ValueError(f"a region of {height}x{width} has no pixel whose {kernel_size}x{kernel_size} neighbourhood lies inside it")
    return edge_taper_window(shape, 0, device=device, region=(top + half, left + half, height - 2 * half, width - 2 * half))
