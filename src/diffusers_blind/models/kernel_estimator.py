"""The M-step of Fast Diffusion EM: half-quadratic splitting over the kernel (Fast EM Eqs. 24-25; docs/conventions.md, "M-step (kernel update)")."""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from ..ops.blur import crop_kernel, pad_kernel
from ..ops.cg import conjugate_gradient
from ..ops.kernels import dirac_kernel, project_kernel
from .kernel_denoiser import KernelDenoiser


REGULARIZATIONS = ("pnp", "l1", "l2", "none")
UNCERTAINTY_MODES = ("none", "pigdm")
CHANNEL_MODES = ("mean", "joint")
MASKED_CG_ITERATIONS = 5  # PCG iterations per HQS data step under a mask (warm-started from the last step)
MAX_ITERATIONS = 1000  # HQS iterations per M-step; more never pays and only burns time and memory


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# from_pretrained arguments that steer loading, not the estimator's config
_LOADING_ARGUMENTS = {"subfolder", "dtype", "torch_dtype", "cache_dir", "force_download", "local_files_only", "token",
                      "revision", "variant", "use_safetensors", "low_cpu_mem_usage", "device_map", "output_loading_info",
                      "proxies"}


def _per_image(name: str, value, batch: int, dtype, device) -> torch.Tensor:
    """A noise level (a number or one per image, finite, >= 0) as a ``(1 or B, 1, 1, 1)`` tensor."""
    value = torch.as_tensor(value, dtype=dtype, device=device).reshape(-1, 1, 1, 1)
    if value.shape[0] not in (1, batch):
        raise ValueError(f"{name} must be one number or one per image ({batch}), got {value.shape[0]} values")
    if not torch.isfinite(value).all() or (value < 0).any():
        raise ValueError(f"{name} must be finite and >= 0")
    return value


class KernelEstimator(ModelMixin, ConfigMixin):
    r"""Estimate a blur kernel from a measurement and image estimates by HQS (Fast EM Algorithm 2, "M-step").

    For ``num_iterations`` steps, with ``α = σ²β`` (``× n`` when ``scale_alpha_by_particles``):

    * data step (Eq. 24), per colour channel ``c`` on the full image grid,
      ``Z_c = F⁻¹[(Σ_i conj(X_i,c)·Y_c + α·F(z)) / (Σ_i |X_i,c|² + α [+ n·N·r²])]``,
      then the mean over channels, crop to the ``k×k`` support, project (``≥ 0``, sum 1);
    * prior step (Eq. 25), ``z = D_{√(λ/β)}(Z)`` (``"pnp"``), ``max(Z − λ/β, 0)`` (``"l1"``),
      ``βZ/(2λ + β)`` (``"l2"``; a pure rescaling that the projection undoes, so it equals
      ``"none"`` — kept for parity with the reference code) or nothing (``"none"``), then project again.

    ``channel_mode="joint"`` solves one kernel for all colour channels at once (the sums over
    ``c`` move into the fraction: ``Z = F⁻¹[(Σ_c Σ_i conj(X_i,c)·Y_c + α·F(z)) / (Σ_c Σ_i |X_i,c|² + α)]``),
    the least-squares kernel of the joint data term ``Σ_c ‖k ⊛ x_c − y_c‖²``; the mean of per-channel
    solutions (``"mean"``) over-weights the prior and mixes three differently conditioned estimates
    (see ``docs/kernel_estimation.md`` for the measurements).

    The defaults reproduce the public code: α not scaled by the number of particles ``n``,
    per-channel solve then mean, no uncertainty term. ``scale_alpha_by_particles=True`` gives the
    paper's Eq. 24, and ``uncertainty="pigdm"`` adds the Pi-GDM term ``n·N·r_t²`` of App. D
    (``N = H·W``; E‖Hx − y‖² = ‖Hx̂0 − y‖² + r²·N·‖k‖² for ``x ~ N(x̂0, r²I)``).

    ``anchor`` / ``anchor_weight = γ`` add ``γσ²‖k − k_a‖²`` to the data term (a Gaussian prior centred on
    a reference kernel ``k_a``, weighed like the HQS penalty ``α = σ²β``): ``Σ conj(X)·Y`` gains
    ``γσ²·F(k_a)`` and ``Σ|X|²`` gains ``γσ²``, so frequencies the estimates hardly carry keep ``k_a``'s
    value while well-measured ones follow the data.

    Call: ``estimator(measurement, estimates, sigma, kernel=None, r=None, anchor=None, anchor_weight=0)``; ``measurement`` is
    ``(B, C, H, W)``, ``estimates`` ``(B·n, C, H, W)`` (the ``n`` particles of image ``b`` are rows
    ``b·n … b·n+n−1``), all in ``[0, 1]``; ``sigma`` in ``[0, 1]`` units (float or ``(B,)``);
    ``kernel`` the ``(B, 1, k, k)`` warm start (a Dirac of ``kernel_size`` if ``None``; its size
    overrides ``kernel_size``). Returns ``(B, 1, k, k)``, computed without autograd (no graph is kept).
    """

    @register_to_config
    def __init__(
        self,
        kernel_size: int = 33,
        lambda_: float = 1.0,
        beta: float = 1e5,
        num_iterations: int = 10,
        regularization: str = "pnp",
        scale_alpha_by_particles: bool = False,
        uncertainty: str = "none",
        denoiser_hidden_channels: int = 32,
        denoiser_num_layers: int = 5,
        denoiser_input_scale: float = 1.0,
        channel_mode: str = "mean",
    ):
        super().__init__()
        if channel_mode not in CHANNEL_MODES:
            raise ValueError(f"channel_mode must be one of {CHANNEL_MODES}, got {channel_mode!r}")
        if regularization not in REGULARIZATIONS:
            raise ValueError(f"regularization must be one of {REGULARIZATIONS}, got {regularization!r}")
        if uncertainty not in UNCERTAINTY_MODES:
            raise ValueError(f"uncertainty must be one of {UNCERTAINTY_MODES}, got {uncertainty!r}")
        if kernel_size < 1 or num_iterations < 1 or beta <= 0 or lambda_ < 0:
            raise ValueError("kernel_size and num_iterations must be >= 1, beta > 0 and lambda_ >= 0")
        if not _is_int(num_iterations) or num_iterations > MAX_ITERATIONS:
            raise ValueError(f"num_iterations must be an integer in [1, {MAX_ITERATIONS}], got {num_iterations!r}")
        if not _is_int(kernel_size) or not (math.isfinite(beta) and math.isfinite(lambda_)):
            raise ValueError(f"kernel_size must be an integer and beta, lambda_ finite; got {kernel_size!r}, {beta!r}, {lambda_!r}")
        if not isinstance(scale_alpha_by_particles, bool):
            raise ValueError(f"scale_alpha_by_particles must be True or False, got {scale_alpha_by_particles!r}")
        self.denoiser = None
        if regularization != "pnp":  # no parameters: a one-element buffer gives the module a device, a
            self.register_buffer("anchor", torch.zeros(1))  # dtype and a weights file for save/load
        if regularization == "pnp":
            self.denoiser = KernelDenoiser(
                hidden_channels=denoiser_hidden_channels,
                num_layers=denoiser_num_layers,
                input_scale=denoiser_input_scale,
            )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As ``ModelMixin.from_pretrained``; a local ``l1``/``l2``/``none`` folder may hold only ``config.json``."""
        folder = Path(str(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
        if folder.is_dir() and (folder / "config.json").is_file() and not any(folder.glob("diffusion_pytorch_model*")):
            config = json.loads((folder / "config.json").read_text())
            if config.get("regularization", "pnp") != "pnp":  # nothing to load: the estimator has no weights
                overrides = {key: value for key, value in kwargs.items() if key not in _LOADING_ARGUMENTS}
                model = cls.from_config(config, **overrides)  # config values given here win, as with weights
                dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
                return model if dtype is None else model.to(dtype)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def from_denoiser(cls, denoiser: KernelDenoiser, **config) -> "KernelEstimator":
        """An estimator around an existing (trained) :class:`KernelDenoiser`, copying its weights."""
        if config.pop("regularization", "pnp") != "pnp":
            raise ValueError("from_denoiser builds a 'pnp' estimator; other regularizations have no denoiser")
        estimator = cls(
            regularization="pnp",
            denoiser_hidden_channels=denoiser.config.hidden_channels,
            denoiser_num_layers=denoiser.config.num_layers,
            denoiser_input_scale=denoiser.config.input_scale,
            **config,
        )
        estimator.denoiser.load_state_dict(denoiser.state_dict())
        return estimator

    @property
    def denoiser_sigma(self) -> float:
        """Noise level fed to the PnP denoiser, ``√(λ/β)`` in sum-1 kernel units (Eq. 25)."""
        return math.sqrt(self.config.lambda_ / self.config.beta)

    def prior_step(self, kernel: torch.Tensor) -> torch.Tensor:
        """Proximal step of the kernel prior (Eq. 25), followed by the projection."""
        lam, beta = self.config.lambda_, self.config.beta
        reg = self.config.regularization
        if reg == "none" or lam == 0:
            return kernel
        if reg == "pnp":
            denoiser_dtype = next(self.denoiser.parameters()).dtype
            kernel = self.denoiser(kernel.to(denoiser_dtype), self.denoiser_sigma).to(kernel.dtype)
        elif reg == "l1":
            kernel = (kernel - lam / beta).clamp_min(0)
        else:
            kernel = beta * kernel / (2 * lam + beta)
        return project_kernel(kernel)

    @torch.no_grad()  # HQS with projections: the kernel is data for its callers, and no graph is kept
    def forward(
        self,
        measurement: torch.Tensor,
        estimates: torch.Tensor,
        sigma: float | torch.Tensor,
        kernel: torch.Tensor | None = None,
        r: float | torch.Tensor | None = None,
        anchor: torch.Tensor | None = None,
        anchor_weight: float = 0.0,
        mask: torch.Tensor | None = None,
        cg_iterations: int = MASKED_CG_ITERATIONS,
    ) -> torch.Tensor:
        if measurement.ndim != 4:
            raise ValueError(f"measurement must be (B, C, H, W), got shape {tuple(measurement.shape)}")
        for name, tensor in (("measurement", measurement), ("estimates", estimates)):
            if not torch.is_floating_point(tensor):
                raise TypeError(f"{name} must be a floating-point image in [0, 1], got {tensor.dtype} (divide 8-bit "
                                "levels by 255)")
        batch, channels, height, width = measurement.shape
        if kernel is not None and (
            kernel.ndim != 4 or kernel.shape[1] != 1 or kernel.shape[-1] != kernel.shape[-2] or kernel.shape[0] not in (1, batch)
        ):
            raise ValueError(f"kernel must be a square (1 or B={batch}, 1, k, k) warm start, got {tuple(kernel.shape)}")
        if estimates.ndim != 4 or estimates.shape[1:] != measurement.shape[1:] or estimates.shape[0] % batch:
            raise ValueError(
                f"estimates {tuple(estimates.shape)} must be (B*n, C, H, W) for a measurement {tuple(measurement.shape)}"
            )
        size = kernel.shape[-1] if kernel is not None else self.config.kernel_size
        if size < 1:
            raise ValueError(f"the warm start kernel is empty: {tuple(kernel.shape)}")
        if size > height or size > width:
            raise ValueError(f"kernel_size {size} is larger than the image {height}x{width}")
        n = estimates.shape[0] // batch
        dtype = torch.float32 if measurement.dtype in (torch.float16, torch.bfloat16) else measurement.dtype
        if kernel is None:
            kernel = dirac_kernel(size, batch, measurement.device, dtype)
        kernel = kernel.to(device=measurement.device, dtype=dtype).expand(batch, 1, size, size)

        sigma = _per_image("sigma", sigma, batch, dtype, measurement.device)
        alpha = sigma.square() * self.config.beta * (n if self.config.scale_alpha_by_particles else 1)
        if mask is not None:
            if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[-2:] != measurement.shape[-2:] or mask.shape[0] not in (1, batch):
                raise ValueError(f"mask must be (1 or B, 1, H, W) on the measurement's grid, got {tuple(mask.shape)}")
            if not _is_int(cg_iterations) or cg_iterations < 1:
                raise ValueError(f"cg_iterations must be an integer >= 1 with a mask, got {cg_iterations!r}")
            mask = mask.to(device=measurement.device, dtype=dtype)
            if ((mask != 0) & (mask != 1)).any():
                raise ValueError("mask must hold 0 (not observed) and 1 (observed) only")
            if (mask.flatten(1).sum(1) == 0).any():
                raise ValueError("mask has no observed pixel for some image: there is no data to estimate a kernel from")
        ridge = alpha  # the HQS penalty, plus the terms below: all multiples of ‖k‖² in the data step
        if r is not None:
            r = _per_image("r", r, batch, dtype, measurement.device)  # checked even where this mode ignores it
        if self.config.uncertainty == "pigdm" and r is not None:
            summed_channels = channels if self.config.channel_mode == "joint" else 1  # the term is per channel
            pixels = height * width if mask is None else mask.flatten(1).sum(1).reshape(-1, 1, 1, 1)
            ridge = ridge + summed_channels * n * pixels * r.square()
        if isinstance(anchor_weight, bool) or not isinstance(anchor_weight, numbers.Real) or not 0 <= anchor_weight < math.inf:
            raise ValueError(f"anchor_weight must be a finite number >= 0, got {anchor_weight!r}")
        anchored = anchor is not None and anchor_weight > 0
        if anchored:
            self._check_anchor(anchor, size, batch)
            ridge = ridge + anchor_weight * sigma.square()

        if mask is not None:
            data_step = self._masked_data_step(
                measurement.to(dtype), estimates.to(dtype).reshape(batch, n, channels, height, width), mask, alpha,
                ridge, anchor_weight * sigma.square() * anchor.to(dtype) if anchored else None, size, cg_iterations,
            )
        else:
            data_step = self._fourier_data_step(measurement.to(dtype), estimates.to(dtype), n, alpha, ridge,
                                                anchor.to(dtype) if anchored else None, anchor_weight * sigma.square(), size)
        z = kernel
        for _ in range(self.config.num_iterations):
            z = self.prior_step(project_kernel(data_step(z)))
        return z

    def _fourier_data_step(self, measurement, estimates, n, alpha, ridge, anchor, anchor_weight, size):
        """Eq. 24 on the full (circular) grid: ``crop(F⁻¹[(Σ conj(X)·Y + α·F(pad z) + μ·F(pad k_a)) / (Σ|X|² + ρ)])``."""
        batch, channels, height, width = measurement.shape
        y_hat = torch.fft.fft2(measurement)  # (B, C, H, W)
        x_hat = torch.fft.fft2(estimates).reshape(batch, n, channels, height, width)
        numerator = (x_hat.conj() * y_hat.unsqueeze(1)).sum(1)  # Σ_i conj(X_i)·Y
        energy = x_hat.abs().square().sum(1)  # Σ_i |X_i|²
        if self.config.channel_mode == "joint":  # one least-squares system for all channels
            numerator, energy = numerator.sum(1, keepdim=True), energy.sum(1, keepdim=True)
        denominator = energy + ridge
        if anchor is not None:
            numerator = numerator + anchor_weight * torch.fft.fft2(pad_kernel(anchor, (height, width)))
        denominator = denominator.clamp_min(1e-8)
        if 2 * size - 1 <= min(height, width):
            return self._support_data_step(numerator, alpha, denominator, size)
        return self._full_grid_data_step(numerator, alpha, denominator, size)

    @staticmethod
    def _check_anchor(anchor, size, batch):
        """The anchor ``k_a`` of the ``μ‖k − k_a‖²`` term (``μ = γσ²``) must be a ``(1 or B, 1, k, k)`` kernel."""
        if (anchor.ndim != 4 or anchor.shape[1] != 1 or anchor.shape[-1] != size or anchor.shape[-2] != size
                or anchor.shape[0] not in (1, batch)):
            raise ValueError(f"anchor must be a (1 or B={batch}, 1, {size}, {size}) kernel, got {tuple(anchor.shape)}")

    def _masked_data_step(self, measurement, estimates, mask, alpha, ridge, anchor_term, size, iterations):
        r"""Eq. 24 under a 0/1 mask ``M`` of the observed pixels, on the ``k×k`` support, by warm-started PCG.

        ``k = argmin Σ_{i,c} ‖M(y_c − k ⊛ x_{i,c})‖² + α‖k − z‖² (+ μ‖k − k_a‖² + ...)``, i.e.
        ``(XᵀMX + ρI)k = XᵀMy + αz (+ μk_a)`` with ``ρ`` the sum of the ridge terms. A photograph padded by
        an invented margin is a *valid* blur: only ``M``'s pixels are data, and the full-grid Fourier solve
        (which needs a window on both images, so ``k ⊛ (w·x) ≠ w·(k ⊛ x)`` near its edges) is only the
        preconditioner here: ``P = crop∘F⁻¹[1 / (m̄·Σ|X|² + ρ)]∘F∘pad`` with ``m̄`` the observed fraction.
        ``estimates``: ``(B, n, C, H, W)``; one system per image (``"joint"``) or per channel (``"mean"``,
        whose solutions are then averaged). Real FFTs; ``2C + 2`` of them per iteration.
        """
        shape = measurement.shape[-2:]
        joint = self.config.channel_mode == "joint"
        x_hat = torch.fft.rfft2(estimates)  # (B, n, C, H, W//2+1)

        def systems(spectrum):  # Σ over particles (and channels when joint) of conj(X)·spectrum
            product = (x_hat.conj() * spectrum).sum(1)
            return product.sum(1, keepdim=True) if joint else product

        def to_support(spectrum):
            return crop_kernel(torch.fft.irfft2(spectrum, s=shape), size)

        def from_support(kernel):
            return torch.fft.rfft2(pad_kernel(kernel, shape))

        def apply(kernel):  # (XᵀMX + ρI)k, kernel (B, S, k, k)
            blurred = torch.fft.irfft2(x_hat * from_support(kernel).unsqueeze(1), s=shape)
            return to_support(systems(torch.fft.rfft2(mask.unsqueeze(1) * blurred))) + ridge * kernel

        fraction = mask.flatten(1).mean(1).reshape(-1, 1, 1, 1)
        diagonal = fraction * x_hat.abs().square().sum(1)
        diagonal = (diagonal.sum(1, keepdim=True) if joint else diagonal) + ridge

        def precondition(kernel):
            return to_support(from_support(kernel) / diagonal)

        data = to_support(systems(torch.fft.rfft2(mask * measurement).unsqueeze(1)))
        if anchor_term is not None:
            data = data + anchor_term
        state = {}

        def step(z):
            warm = state.get("kernel", z.expand_as(data))
            state["kernel"] = conjugate_gradient(apply, data + alpha * z, iterations, precondition, initial=warm)
            return state["kernel"].mean(1, keepdim=True)

        return step

    @staticmethod
    def _full_grid_data_step(numerator, alpha, denominator, size):
        """Eq. 24 literally: ``crop(mean_c F⁻¹[(N_c + α·F(pad z)) / D_c])``, two full-grid FFTs per iteration."""
        height, width = numerator.shape[-2:]

        def step(z):
            z_hat = torch.fft.fft2(pad_kernel(z, (height, width)))
            return crop_kernel(torch.fft.ifft2((numerator + alpha * z_hat) / denominator).real.mean(1, keepdim=True), size)

        return step

    @staticmethod
    def _support_data_step(numerator, alpha, denominator, size):
        """Eq. 24 restricted to the kernel support, exact and FFT-free inside the loop.

        The solve is linear in ``z``: ``crop(F⁻¹[(N + α·F(pad z))/D]) = b + crop(pad(z) ⊛ g)`` with
        ``b = crop(mean_c F⁻¹[N_c/D_c])`` and ``g = mean_c F⁻¹[α/D_c]``. Only the ``(2k−1)²`` window of ``g``
        around the origin reaches the ``k×k`` support, so each HQS iteration is a small convolution.
        """
        base = crop_kernel(torch.fft.ifft2(numerator / denominator).real.mean(1, keepdim=True), size)
        response = torch.fft.ifft2(alpha / denominator).real.mean(1, keepdim=True)
        window = crop_kernel(response, 2 * size - 1)  # offsets −(k−1)…(k−1)
        batch = window.shape[0]
        window = window.reshape(1, batch, 2 * size - 1, 2 * size - 1)

        def step(z):
            spread = F.conv2d(window, z.flip(-2, -1), groups=batch)  # (1, B, k, k): Σ_m z(m)·g(p − m)
            return base + spread.reshape(batch, 1, size, size)

        return step
