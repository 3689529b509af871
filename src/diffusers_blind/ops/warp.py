"""Per-pixel warps (tilts) by bilinear interpolation, and their adjoints.

A tilt field ``d`` is a ``(B, 2, H, W)`` tensor of displacements **in pixels**: channel 0 is the
horizontal (column) shift, channel 1 the vertical (row) shift. The warp reads the image at the
displaced position, ``(T_d x)(i, j) = x(i + d_y(i, j), j + d_x(i, j))``, bilinearly. It is linear
in ``x`` and differentiable in ``x`` and ``d`` (almost everywhere: the bilinear weights have kinks
at integer positions). Outside the image ``padding`` decides: ``"border"`` repeats the edge pixel,
``"zeros"`` reads 0, ``"circular"`` wraps around.
"""

from __future__ import annotations

import torch


WARP_PADDINGS = ("border", "zeros", "circular")


def _check_warp(image: torch.Tensor, field: torch.Tensor, padding: str) -> None:
    if padding not in WARP_PADDINGS:
        raise ValueError(f"padding must be one of {WARP_PADDINGS}, got {padding!r}")
    if image.ndim != 4:
        raise ValueError(f"image must be (B, C, H, W), got shape {tuple(image.shape)}")
    if field.ndim != 4 or field.shape[1] != 2 or field.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"tilt field must be (B or 1, 2, H, W) = (., 2, {image.shape[-2]}, {image.shape[-1]}), "
                         f"got {tuple(field.shape)}")
    if field.shape[0] not in (1, image.shape[0]):
        raise ValueError(f"tilt field batch {field.shape[0]} must be 1 or the image batch {image.shape[0]}")


def _bilinear_taps(field: torch.Tensor, height: int, width: int, padding: str, dtype):
    """The four ``(flat index, weight)`` taps of every output pixel: each ``(B, H·W)``."""
    field = field.to(dtype)
    rows = torch.arange(height, device=field.device, dtype=dtype).view(1, height, 1)
    cols = torch.arange(width, device=field.device, dtype=dtype).view(1, 1, width)
    u = cols + field[:, 0]  # column read position
    v = rows + field[:, 1]  # row read position
    u0, v0 = u.detach().floor(), v.detach().floor()
    fu, fv = u - u0, v - v0  # differentiable in the field
    u0, v0 = u0.long(), v0.long()
    taps = []
    for dv, wv in ((0, 1 - fv), (1, fv)):
        for du, wu in ((0, 1 - fu), (1, fu)):
            r, c = v0 + dv, u0 + du
            weight = wv * wu
            if padding == "zeros":
                inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
                weight = weight * inside.to(dtype)
                r, c = r.clamp(0, height - 1), c.clamp(0, width - 1)
            elif padding == "border":
                r, c = r.clamp(0, height - 1), c.clamp(0, width - 1)
            else:
                r, c = r % height, c % width
            taps.append(((r * width + c).flatten(1), weight.flatten(1)))
    return taps


def warp(image: torch.Tensor, field: torch.Tensor, padding: str = "border") -> torch.Tensor:
    """Tilt ``image`` ``(B, C, H, W)`` by ``field`` ``(B or 1, 2, H, W)`` in pixels (see module docstring).

    Example:
        >>> x = torch.arange(12.0).reshape(1, 1, 3, 4)
        >>> shift = torch.zeros(1, 2, 3, 4); shift[:, 0] = 1.0  # read one pixel to the right
        >>> warp(x, shift)[0, 0, 0]
        tensor([1., 2., 3., 3.])
    """
    _check_warp(image, field, padding)
    b, c, h, w = image.shape
    flat = image.reshape(b, c, h * w)
    out = torch.zeros_like(flat)
    for index, weight in _bilinear_taps(field.expand(b, -1, -1, -1), h, w, padding, image.dtype):
        out = out + weight[:, None] * flat.gather(-1, index[:, None].expand(b, c, h * w))
    return out.reshape(b, c, h, w)


def warp_adjoint(image: torch.Tensor, field: torch.Tensor, padding: str = "border") -> torch.Tensor:
    """Adjoint of :func:`warp` in the image: every output pixel's value is spread back onto its four taps."""
    _check_warp(image, field, padding)
    b, c, h, w = image.shape
    flat = image.reshape(b, c, h * w)
    out = torch.zeros_like(flat)
    for index, weight in _bilinear_taps(field.expand(b, -1, -1, -1), h, w, padding, image.dtype):
        out = out.scatter_add(-1, index[:, None].expand(b, c, h * w), weight[:, None] * flat)
    return out.reshape(b, c, h, w)
