"""Forward operators as objects: ``y = A(x, θ)`` with the operator's parameters ``θ`` passed per call.

Every operator is linear in the image ``x``, has its adjoint ``A_adjoint(y, θ)`` (``⟨A x, y⟩ =
⟨x, A* y⟩``) and is differentiable in every argument, so a guidance term can take gradients with
respect to the image, the kernel and the tilt field alike (docs/conventions.md, "Forward operators").

* :class:`BlurOperator` — ``y = k ⊛ x``, a true convolution with the kernel centre at ``k // 2``
  (odd and even sizes), with ``padding`` ``"circular"`` (FFT, the Fast EM model), ``"reflect"``
  or ``"zeros"``. ``kernel_convention="correlation"`` reads kernels stored as BlindDPS stores
  them (180° rotated, :func:`~diffusers_blind.ops.blur.flip_kernel`).
* :class:`TiltOperator` — ``y = T_d x``, a bilinear per-pixel warp by a field ``d`` in pixels.
* :class:`TiltBlurOperator` — ``y = k ⊛ (T_d x)``: tilt, then blur (the turbulence model of BlindDPS).
"""

from __future__ import annotations

import torch

from .blur import fft_blur, fft_blur_adjoint, flip_kernel, spatial_blur, spatial_blur_adjoint
from .warp import WARP_PADDINGS, warp, warp_adjoint


BLUR_PADDINGS = ("circular", "reflect", "zeros")
KERNEL_CONVENTIONS = ("convolution", "correlation")


class LinearOperator:
    """Base class: ``A(x, *params)``, ``A_adjoint(y, *params)``; calling the operator applies ``A``.

    ``param_names`` names the per-call parameters in order (e.g. ``("kernel",)``).
    """

    param_names: tuple[str, ...] = ()

    def A(self, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def A_adjoint(self, y: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        return self.A(x, *params)

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({settings})"


class BlurOperator(LinearOperator):
    """Blur by a kernel given per call: ``A(x, k) = k ⊛ x`` (true convolution, centre at ``k // 2``).

    Args:
        padding: how the image continues past its border: ``"circular"`` (periodic; computed by FFT,
            the model of Fast Diffusion EM), ``"reflect"`` (mirror without repeating the edge pixel) or
            ``"zeros"``.
        kernel_convention: ``"convolution"`` (this package's kernels) or ``"correlation"`` (kernels stored
            180° rotated, as BlindDPS / DPS do; they are flipped here, once).

    Images must be floating point (an integer image is a ``TypeError``, not rounded to zeros); float16
    and bfloat16 work in every padding (the circular blur's FFT runs in float32).

    Example:
        >>> x = torch.zeros(1, 1, 7, 7); x[..., 3, 3] = 1
        >>> k = torch.arange(9.0).reshape(1, 1, 3, 3) / 36
        >>> torch.equal(BlurOperator("zeros")(x, k)[0, 0, 2:5, 2:5], k[0, 0])  # impulse response = kernel
        True
    """

    param_names = ("kernel",)

    def __init__(self, padding: str = "circular", kernel_convention: str = "convolution"):
        if padding not in BLUR_PADDINGS:
            raise ValueError(f"padding must be one of {BLUR_PADDINGS}, got {padding!r}")
        if kernel_convention not in KERNEL_CONVENTIONS:
            raise ValueError(f"kernel_convention must be one of {KERNEL_CONVENTIONS}, got {kernel_convention!r}")
        self.padding = padding
        self.kernel_convention = kernel_convention

    def convolution_kernel(self, kernel: torch.Tensor) -> torch.Tensor:
        """The kernel in the true-convolution convention."""
        return flip_kernel(kernel) if self.kernel_convention == "correlation" else kernel

    def A(self, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        kernel = self.convolution_kernel(kernel)
        if self.padding == "circular":
            return fft_blur(x, kernel)
        return spatial_blur(x, flip_kernel(kernel), padding=self.padding)

    def A_adjoint(self, y: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        kernel = self.convolution_kernel(kernel)
        if self.padding == "circular":
            return fft_blur_adjoint(y, kernel)
        return spatial_blur_adjoint(y, flip_kernel(kernel), padding=self.padding)


class TiltOperator(LinearOperator):
    """Per-pixel tilt: ``A(x, d)(i, j) = x(i + d_y(i, j), j + d_x(i, j))``, bilinear, ``d`` in pixels.

    ``d`` is ``(B or 1, 2, H, W)`` (channel 0 horizontal, 1 vertical). ``padding``: ``"border"``,
    ``"zeros"`` or ``"circular"`` (see :mod:`~diffusers_blind.ops.warp`).
    """

    param_names = ("field",)

    def __init__(self, padding: str = "border"):
        if padding not in WARP_PADDINGS:
            raise ValueError(f"padding must be one of {WARP_PADDINGS}, got {padding!r}")
        self.padding = padding

    def A(self, x: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
        return warp(x, field, self.padding)

    def A_adjoint(self, y: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
        return warp_adjoint(y, field, self.padding)


class TiltBlurOperator(LinearOperator):
    """Tilt then blur: ``A(x, k, d) = k ⊛ (T_d x)``; adjoint ``T_d* (k ⊛* y)``."""

    param_names = ("kernel", "field")

    def __init__(self, blur: BlurOperator | None = None, tilt: TiltOperator | None = None):
        self.blur = blur if blur is not None else BlurOperator()
        self.tilt = tilt if tilt is not None else TiltOperator()

    def A(self, x: torch.Tensor, kernel: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
        return self.blur.A(self.tilt.A(x, field), kernel)

    def A_adjoint(self, y: torch.Tensor, kernel: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
        return self.tilt.A_adjoint(self.blur.A_adjoint(y, kernel), field)
