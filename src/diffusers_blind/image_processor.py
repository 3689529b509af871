"""Images in and out of the deblurring pipelines: one decoder, one pre- and one post-processor.

[`DeblurImageProcessor`] (modelled on diffusers' ``MarigoldImageProcessor``) is what every pipeline and
the command line use:

* ``decode_pil``: a PIL image → float32 ``(H, W)`` or ``(H, W, 3)`` in ``[0, 1]``, whatever its mode
  (8/16/32-bit integer, float, palette, CMYK, alpha), with the EXIF orientation applied;
* ``preprocess``: PIL / numpy / torch (or a list of one kind) → ``(B, C, H, W)`` float32 in ``[0, 1]``;
* ``pad`` / ``unpad``: reflect margin around the image plus padding to the UNet multiple, and back;
* ``postprocess``: samples of every particle → mean image, per-pixel std, particles, in ``output_type``.

Layouts: numpy images are channels-last (``(H, W)``, ``(H, W, C)``, ``(B, H, W, C)``), torch images
channels-first (``(H, W)``, ``(C, H, W)``, ``(B, C, H, W)``), ``C`` in {1, 3, 4} (alpha is dropped).
An array whose conventional channel axis does not hold 1, 3 or 4 values (e.g. a channels-first numpy
``(3, H, W)``) is an error that says how to pass the image, never a guess.

The module-level functions (``to_tensor``, ``pad_to_multiple``, ``crop_window``, ``tensor_to_output``)
are thin wrappers kept for existing callers.
"""

from __future__ import annotations

import numbers

import warnings

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config


ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor | list

CHANNEL_COUNTS = (1, 3, 4)
OUTPUT_TYPES = ("pil", "np", "pt")
INTEGER_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
GRAYSCALE_MODES = ("L", "LA", "La", "1", "I", "F", *INTEGER_16BIT_MODES)
MIN_MARGIN_LIMIT = 128
"""A reflect margin may always reach this many pixels, and beyond it at most the larger image side."""


class DeblurImageProcessor(ConfigMixin):
    """Pre- and post-processing shared by the deblurring pipelines and the command line.

    Args:
        pad_multiple (`int`): height and width of padded images are multiples of this (the UNet's
            downsampling factor ``2 ** (len(block_out_channels) - 1)``).
        do_range_check (`bool`): reject tensors and arrays far outside ``[0, 1]`` (``[0, 255]`` floats,
            ``[-1, 1]`` images) instead of clipping them.
        fft_friendly (`bool`): [`pad`] also rounds each padded side up to a length with no prime factor
            above 7 ([`fft_friendly_size`]); Fast EM's processor does, so ``pipe.image_processor.pad`` builds
            the pipeline's own grid (for ``latents=`` or a callback's replacement).
    """

    config_name = "image_processor_config.json"

    @register_to_config
    def __init__(self, pad_multiple: int = 1, do_range_check: bool = True, fft_friendly: bool = False):
        super().__init__()

    # ------------------------------------------------------------------ decoding
    @staticmethod
    def decode_pil(image: PIL.Image.Image, name: str = "image", integer_levels: float | None = None) -> np.ndarray:
        """A PIL image as float32 ``(H, W)`` (grayscale modes) or ``(H, W, 3)`` in ``[0, 1]``.

        The EXIF orientation is applied; alpha is dropped; palette / CMYK / YCbCr become RGB. Scaling by
        mode: 8-bit ÷ 255; ``I;16*`` ÷ 65535; ``I`` (32-bit integers) ÷ 255 when every value is ≤ 255,
        else ÷ 65535 (negative or > 65535: error); ``F`` (float) is taken as ``[0, 1]``, and a float image
        whose values reach beyond 1.5 is rescaled from ``[0, 255]`` (or ``[0, 65535]``) **with a warning**,
        never clipped to white. ``integer_levels`` (e.g. 65535 for a file that declares 16-bit samples)
        replaces the ``I`` rule's guess. ``name`` is used in messages (e.g. the file path).
        """
        image = PIL.ImageOps.exif_transpose(image)
        mode = image.mode
        if image.width == 0 or image.height == 0:
            raise ValueError(f"{name} is empty ({image.width}x{image.height} pixels)")
        if mode == "P" or mode == "PA":
            image = image.convert("RGBA" if mode == "PA" or "transparency" in image.info else "RGB")
            mode = image.mode
        if mode in INTEGER_16BIT_MODES:
            array = np.asarray(image).astype(np.float32) / 65535.0
        elif mode == "I":
            array = np.asarray(image).astype(np.float64)
            low, high = array.min(), array.max()
            if low < 0 or high > 65535:
                raise ValueError(f"{name}: 32-bit integer image with values in [{low:g}, {high:g}]; "
                                 "expected 8-bit [0, 255] or 16-bit [0, 65535] levels")
            if integer_levels is None:
                integer_levels = 255.0 if high <= 255 else 65535.0
            elif high > integer_levels:
                raise ValueError(f"{name}: values up to {high:g} in a file of {integer_levels:g} levels")
            array = (array / integer_levels).astype(np.float32)
        elif mode == "F":
            array = _rescale_float_levels(np.asarray(image).astype(np.float32), name)
        elif mode in GRAYSCALE_MODES:
            array = np.asarray(image.convert("L")).astype(np.float32) / 255.0
        else:
            array = np.asarray(image.convert("RGB")).astype(np.float32) / 255.0
        if not np.isfinite(array).all():
            raise ValueError(f"{name} contains NaN or infinite values")
        return array

    # ------------------------------------------------------------------ preprocessing
    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """PIL / numpy / torch image(s), or a list of one kind, → ``(B, C, H, W)`` float32 in ``[0, 1]``.

        8- and 16-bit integers are rescaled; floats must already lie in ``[0, 1]`` (a noisy measurement
        may overshoot a little). RGBA drops alpha. Empty images, 2 or 5+ channels, NaN/inf and ambiguous
        layouts are errors.
        """
        if isinstance(image, list):
            if not image:
                raise ValueError("image list is empty")
            tensors = [self.preprocess(item) for item in image]
            if len({t.shape[1:] for t in tensors}) != 1:
                raise ValueError("all images of a batch must have the same size and channel count")
            return torch.cat(tensors)
        if isinstance(image, PIL.Image.Image):
            tensor = _numpy_to_tensor(self.decode_pil(image))
        elif isinstance(image, np.ndarray):
            tensor = _numpy_to_tensor(image)
        elif torch.is_tensor(image):
            tensor = _torch_to_tensor(image)
        else:
            raise TypeError(
                f"image must be a PIL image, numpy array, torch tensor or a list of them, got {type(image).__name__}"
            )
        if tensor.shape[1] == 4:
            tensor = tensor[:, :3]
        if tensor.shape[1] not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels (or RGBA), got {tensor.shape[1]}")
        if tensor.shape[0] == 0 or tensor.shape[-1] == 0 or tensor.shape[-2] == 0:
            raise ValueError(f"image is empty: shape {tuple(tensor.shape)} (B, C, H, W)")
        if self.config.do_range_check:
            check_value_range(tensor)
        return tensor

    # ------------------------------------------------------------------ padding
    def pad(self, image: torch.Tensor, margin: int = 0, multiple: int | None = None, mode: str = "reflect",
            fft_friendly: bool | None = None):
        """Pad ``(B, C, H, W)`` by ``margin`` on every side, then bottom/right to a multiple of ``multiple``.

        Returns the padded tensor and the ``(top, left, height, width)`` window of the original. Reflection
        lets the circular FFT model see a smooth wrap-around instead of a jump; where the margin is not
        smaller than the image, edge replication is used. ``margin`` must be an integer in
        ``[0, max(H, W, 128)]``: more would only allocate memory. With ``fft_friendly`` (default: the
        processor's config) each padded side is also a product of 2, 3, 5 and 7 ([`fft_friendly_size`]): an
        FFT of a side with a large prime factor (328 = 8 · 41) takes about twice as long.
        """
        multiple = self.config.pad_multiple if multiple is None else multiple
        fft_friendly = self.config.get("fft_friendly", False) if fft_friendly is None else fft_friendly
        height, width = image.shape[-2:]
        margin = _check_margin(margin, height, width)
        if not isinstance(multiple, int) or multiple < 1:
            raise ValueError(f"the padding multiple must be a positive int, got {multiple!r}")
        pad_h = _next_multiple(height + 2 * margin, multiple) - (height + 2 * margin)
        pad_w = _next_multiple(width + 2 * margin, multiple) - (width + 2 * margin)
        extra_h = extra_w = 0
        if fft_friendly:
            extra_h = fft_friendly_size(height + 2 * margin, multiple) - (height + 2 * margin) - pad_h
            extra_w = fft_friendly_size(width + 2 * margin, multiple) - (width + 2 * margin) - pad_w
        pads = (margin, margin + pad_w + extra_w, margin, margin + pad_h + extra_h)
        if not any(pads):
            return image, (margin, margin, height, width)
        if mode == "reflect" and max(pads) < min(height, width):
            return F.pad(image, pads, mode=mode), (margin, margin, height, width)
        # too wide a margin for one reflection: the plain padding as before (edge replication where the margin is
        # not smaller than the image), then the FFT rows and columns reflected off the padded image
        plain = (margin, margin + pad_w, margin, margin + pad_h)
        if any(plain):
            image = F.pad(image, plain, mode="replicate" if mode == "reflect" and max(plain) >= min(height, width) else mode)
        if extra_h or extra_w:
            extra_mode = mode if mode != "reflect" or max(extra_h, extra_w) < min(image.shape[-2:]) else "replicate"
            image = F.pad(image, (0, extra_w, 0, extra_h), mode=extra_mode)
        return image, (margin, margin, height, width)

    @staticmethod
    def unpad(image: torch.Tensor, window: tuple[int, int, int, int]) -> torch.Tensor:
        """The ``(top, left, height, width)`` window of ``(…, H', W')``, as returned by [`pad`]."""
        top, left, height, width = window
        return image[..., top : top + height, left : left + width]

    # ------------------------------------------------------------------ postprocessing
    def postprocess(
        self,
        samples: torch.Tensor,
        num_particles: int = 1,
        window: tuple[int, int, int, int] | None = None,
        output_type: str = "pil",
        grayscale: bool = False,
    ):
        """Samples ``(B·n, C, H', W')`` in ``[0, 1]`` (particles of an image adjacent) → ``(images, std, particles)``.

        ``images`` is the mean over the ``n`` particles ``x̄ = (1/n) Σ_j x_j``; ``std`` the per-pixel
        standard deviation ``√((1/n) Σ_j (x_j − x̄)²)`` averaged over channels (``None`` when ``n = 1``);
        ``particles`` every sample. ``window`` crops the padding away; ``grayscale`` averages the
        channels back to one. For ``"pt"``: ``(B, C, H, W)``, ``(B, 1, H, W)``, ``(B, n, C, H, W)``
        tensors; for ``"np"``: ``(B, H, W, C)``, ``(B, H, W)``, ``(B, n, H, W, C)`` arrays; ``"pil"`` as
        ``"np"`` but the images as a list of PIL images.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        samples = samples.detach().float()
        if window is not None:
            samples = self.unpad(samples, window)
        if not torch.isfinite(samples).all():
            raise RuntimeError("The sampler diverged (non-finite values): lower guidance_scale or check sigma.")
        samples = samples.clamp(0, 1)
        if grayscale:
            samples = samples.mean(1, keepdim=True)
        if samples.shape[0] % num_particles:
            raise ValueError(f"{samples.shape[0]} samples are not a whole number of {num_particles} particles")
        samples = samples.reshape(-1, num_particles, *samples.shape[1:])
        mean = samples.mean(1)
        std = samples.std(1, unbiased=False).mean(1, keepdim=True) if num_particles > 1 else None
        images = self.numpy_or_pil(mean, output_type)
        if output_type == "pt":
            return images, (std.cpu() if std is not None else None), samples.cpu()
        uncertainty = std[:, 0].cpu().numpy() if std is not None else None
        return images, uncertainty, samples.permute(0, 1, 3, 4, 2).cpu().numpy()

    @staticmethod
    def numpy_or_pil(images: torch.Tensor, output_type: str):
        """``(B, C, H, W)`` in ``[0, 1]`` → ``"pt"`` tensor, ``"np"`` ``(B, H, W, C)`` array or ``"pil"`` list."""
        images = images.detach().float().clamp(0, 1).cpu()
        if output_type == "pt":
            return images
        array = images.permute(0, 2, 3, 1).numpy()
        if output_type == "np":
            return array
        quantised = (array * 255).round().astype(np.uint8)
        if quantised.shape[-1] == 1:
            return [PIL.Image.fromarray(a[..., 0], mode="L") for a in quantised]
        return [PIL.Image.fromarray(a) for a in quantised]

    @staticmethod
    def kernels_to_output(kernels: torch.Tensor | None, output_type: str):
        """``(B, 1, k, k)`` kernels → the same tensor on CPU (``"pt"``), else a ``(B, k, k)`` array; ``None`` stays ``None``."""
        if kernels is None:
            return None
        kernels = kernels.detach().float().cpu()
        return kernels if output_type == "pt" else kernels[:, 0].numpy()


# ---------------------------------------------------------------------------- helpers
def _rescale_float_levels(array: np.ndarray, name: str) -> np.ndarray:
    """Float pixel values: ``[0, 1]`` as is; ``[0, 255]`` or ``[0, 65535]`` divided, with a warning."""
    finite = array[np.isfinite(array)]
    if finite.size == 0:
        return array
    low, high = float(finite.min()), float(finite.max())
    if high <= 1.5 and low >= -0.5:
        return array
    if low < -0.5:
        raise ValueError(f"{name}: float image with values in [{low:.4g}, {high:.4g}]; expected [0, 1] "
                         "(or [0, 255] / [0, 65535] levels)")
    for scale in (255.0, 65535.0):
        if high <= scale * 1.01:
            warnings.warn(f"{name}: float image with values up to {high:.4g} read as levels in [0, {scale:g}] "
                          f"and divided by {scale:g}", stacklevel=3)
            return array / scale
    raise ValueError(f"{name}: float image with values up to {high:.4g}; expected [0, 1] "
                     "(or [0, 255] / [0, 65535] levels)")


def _layout_help(kind: str) -> str:
    if kind == "numpy":
        return ("numpy images are channels-last: (H, W), (H, W, C) or (B, H, W, C) with C in 1, 3, 4; "
                "for a channels-first array pass np.moveaxis(array, 0, -1) (or -3 → -1 for a batch), "
                "or a torch tensor (C, H, W); for a batch of grayscale images add a channel axis: array[..., None]")
    return ("torch images are channels-first: (H, W), (C, H, W) or (B, C, H, W) with C in 1, 3, 4; "
            "for a channels-last tensor pass tensor.movedim(-1, -3)")


def _numpy_to_tensor(array: np.ndarray) -> torch.Tensor:
    """Channels-last numpy → ``(B, C, H, W)`` float32; integers rescaled by their bit depth."""
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16:
        array = array.astype(np.float32) / 65535.0
    elif array.dtype == np.bool_:
        array = array.astype(np.float32)
    elif array.dtype.kind == "f":
        array = array.astype(np.float32)
    else:
        raise TypeError(f"Unsupported numpy dtype {array.dtype}: use uint8, uint16 or float in [0, 1]")
    shape = array.shape
    if array.ndim == 2:
        array = array[None, :, :, None]
    elif array.ndim in (3, 4):
        channels_last = shape[-1] in CHANNEL_COUNTS  # the numpy convention, always read so
        channels_first = shape[-3] in CHANNEL_COUNTS
        if not channels_last:
            what = "looks channels-first" if channels_first else "has no channel axis"
            raise ValueError(f"numpy image of shape {shape} {what}; {_layout_help('numpy')}")
        if array.ndim == 3:
            array = array[None]
    else:
        raise ValueError(f"numpy image of shape {shape}; {_layout_help('numpy')}")
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)


def _torch_to_tensor(image: torch.Tensor) -> torch.Tensor:
    """Channels-first torch → ``(B, C, H, W)`` float32; uint8 and uint16 rescaled by their bit depth."""
    if image.dtype == torch.uint8:
        tensor = image.float() / 255.0
    elif image.dtype == getattr(torch, "uint16", None):
        tensor = image.float() / 65535.0
    elif image.dtype == torch.bool:
        tensor = image.float()
    elif image.is_floating_point():
        tensor = image.float()
    else:
        raise TypeError(f"Unsupported tensor dtype {image.dtype}: use a float tensor in [0, 1], uint8 or uint16")
    shape = tuple(image.shape)
    if tensor.ndim == 2:
        tensor = tensor[None, None]
    elif tensor.ndim in (3, 4):
        if shape[-3] not in CHANNEL_COUNTS:  # the torch convention is channels-first
            what = "looks channels-last" if shape[-1] in CHANNEL_COUNTS else "has no channel axis"
            raise ValueError(f"tensor image of shape {shape} {what}; {_layout_help('torch')}")
        if tensor.ndim == 3:
            tensor = tensor[None]
    else:
        raise ValueError(f"tensor image of shape {shape}; {_layout_help('torch')}")
    return tensor


def _check_margin(margin, height: int, width: int) -> int:
    if isinstance(margin, bool) or not isinstance(margin, (int, np.integer)) and not (
        isinstance(margin, float) and margin.is_integer()
    ):
        raise ValueError(f"boundary_margin must be a non-negative integer, got {margin!r}")
    margin = int(margin)
    limit = max(height, width, MIN_MARGIN_LIMIT)
    if margin < 0:
        raise ValueError(f"boundary_margin must be >= 0, got {margin}")
    if margin > limit:
        raise ValueError(f"boundary_margin {margin} is larger than the image ({height}x{width}) needs: "
                         f"use at most {limit} (the kernel size is enough; 0 for circularly blurred data)")
    return margin


def check_value_range(tensor: torch.Tensor) -> None:
    """Reject NaN/inf and values far outside ``[0, 1]`` (e.g. ``[0, 255]`` floats or ``[-1, 1]`` images)."""
    if not torch.isfinite(tensor).all():
        raise ValueError("image contains NaN or infinite values")
    low, high = tensor.min().item(), tensor.max().item()
    if low < -0.5 or high > 1.5:
        raise ValueError(
            f"image values must be in [0, 1] (got min {low:.3g}, max {high:.3g}); "
            "divide 8-bit floats by 255 or map [-1, 1] images with (x + 1) / 2"
        )


# ---------------------------------------------------------------------------- wrappers kept for callers
_DEFAULT = DeblurImageProcessor()


def to_tensor(image: ImageInput) -> torch.Tensor:
    """[`DeblurImageProcessor.preprocess`] with the default settings."""
    return _DEFAULT.preprocess(image)


def pad_to_multiple(image: torch.Tensor, multiple: int, margin: int = 0, mode: str = "reflect",
                    fft_friendly: bool | None = None):
    """[`DeblurImageProcessor.pad`]: returns the padded tensor and the window of the original."""
    return _DEFAULT.pad(image, margin=margin, multiple=multiple, mode=mode, fft_friendly=fft_friendly)


def _next_multiple(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def _is_7_smooth(n: int) -> bool:
    for prime in (2, 3, 5, 7):
        while n % prime == 0:
            n //= prime
    return n == 1


def fft_friendly_size(size: int, multiple: int = 1) -> int:
    """The smallest ``n >= size`` that is a multiple of ``multiple`` and has no prime factor above 7.

    PyTorch's CPU FFT (pocketfft) is fastest on such lengths (``scipy.fft.next_fast_len`` without the
    multiple). The result is at most about 9 % larger than the plain next multiple (176 → 192 with
    ``multiple=8``), usually a few percent. A ``multiple`` with a prime factor above 7 has no such multiple:
    the plain next multiple is returned.
    """
    for name, value in (("size", size), ("multiple", multiple)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    n = _next_multiple(int(size), int(multiple))
    if not _is_7_smooth(int(multiple)):
        return n
    while not _is_7_smooth(n):
        n += int(multiple)
    return n


def crop_window(image: torch.Tensor, window: tuple[int, int, int, int]) -> torch.Tensor:
    return DeblurImageProcessor.unpad(image, window)


def tensor_to_output(images: torch.Tensor, output_type: str):
    """[`DeblurImageProcessor.numpy_or_pil`]."""
    return DeblurImageProcessor.numpy_or_pil(images, output_type)


KERNEL_PREVIEW_KEY = "diffusers_blind"  # PNG text chunk that marks an enlarged kernel preview


def kernel_to_image(kernel: torch.Tensor, scale: int = 8) -> PIL.Image.Image:
    """A viewable PNG of one ``(k, k)`` kernel: max-normalised and enlarged ``scale``× with nearest neighbours."""
    kernel = kernel.detach().float().cpu().reshape(kernel.shape[-2:])
    kernel = kernel.clamp_min(0) / kernel.max().clamp_min(1e-12)
    image = PIL.Image.fromarray((kernel.numpy() * 255).round().astype(np.uint8), mode="L")
    preview = image.resize((image.width * scale, image.height * scale), PIL.Image.Resampling.NEAREST)
    # written into the PNG by io.save_image, so that the preview is never read back as a kernel
    preview.info[KERNEL_PREVIEW_KEY] = f"kernel preview: {scale}x enlarged, divided by its maximum; not the kernel"
    return preview
