"""Turn user images into ``(B, C, H, W)`` tensors in ``[0, 1]`` and back, and pad for the UNet."""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F


ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor | list


def _numpy_to_tensor(array: np.ndarray) -> torch.Tensor:
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16:
        array = array.astype(np.float32) / 65535.0
    elif array.dtype.kind == "f":
        array = array.astype(np.float32)
    else:
        raise TypeError(f"Unsupported numpy dtype {array.dtype}: use uint8, uint16 or float in [0, 1]")
    if array.ndim == 2:
        array = array[None, :, :, None]
    elif array.ndim == 3:
        array = array[None] if array.shape[-1] in (1, 3, 4) else array[..., None]
    if array.ndim != 4:
        raise ValueError(f"numpy images must be (H, W), (H, W, C) or (B, H, W, C); got shape {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)


def to_tensor(image: ImageInput) -> torch.Tensor:
    """Convert PIL / numpy ``(…, H, W[, C])`` / torch ``(…, C, H, W)`` images (or a list of one kind) to ``(B, C, H, W)`` float32.

    Values must lie in ``[0, 1]`` (a measurement may overshoot slightly because of noise); 8- and
    16-bit integer arrays are rescaled. RGBA drops alpha; other channel counts than 1 and 3 are errors.
    """
    if isinstance(image, list):
        if not image:
            raise ValueError("image list is empty")
        tensors = [to_tensor(item) for item in image]
        if len({t.shape[1:] for t in tensors}) != 1:
            raise ValueError("all images of a batch must have the same size and channel count")
        tensor = torch.cat(tensors)
    elif isinstance(image, PIL.Image.Image):
        mode = "L" if image.mode in ("L", "I", "I;16", "F", "1") else "RGB"
        tensor = _numpy_to_tensor(np.asarray(image.convert(mode)))
    elif isinstance(image, np.ndarray):
        tensor = _numpy_to_tensor(image)
    elif torch.is_tensor(image):
        if not (image.is_floating_point()) and image.dtype != torch.uint8:
            raise TypeError(f"Unsupported tensor dtype {image.dtype}: use a float tensor in [0, 1] or uint8")
        tensor = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
        if tensor.ndim == 2:
            tensor = tensor[None, None]
        elif tensor.ndim == 3:
            tensor = tensor[None]
        if tensor.ndim != 4:
            raise ValueError(f"tensor images must be (H, W), (C, H, W) or (B, C, H, W); got {tuple(image.shape)}")
    else:
        raise TypeError(f"image must be a PIL image, numpy array, torch tensor or a list of them, got {type(image)}")
    if tensor.shape[1] == 4:
        tensor = tensor[:, :3]
    if tensor.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {tensor.shape[1]}")
    check_value_range(tensor)
    return tensor


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


def pad_to_multiple(image: torch.Tensor, multiple: int, margin: int = 0, mode: str = "reflect"):
    """Pad ``(B, C, H, W)`` by ``margin`` on every side, then on the bottom/right up to a multiple of ``multiple``.

    Returns the padded tensor and the ``(top, left, height, width)`` window of the original.
    Reflection is used so that the circular FFT model sees a smooth wrap-around instead of a jump.
    """
    height, width = image.shape[-2:]
    pad_h = (-(height + 2 * margin)) % multiple
    pad_w = (-(width + 2 * margin)) % multiple
    pads = (margin, margin + pad_w, margin, margin + pad_h)
    if any(pads):
        if mode == "reflect" and max(pads) >= min(height, width):
            mode = "replicate"  # reflection needs a margin smaller than the image
        image = F.pad(image, pads, mode=mode)
    return image, (margin, margin, height, width)


def crop_window(image: torch.Tensor, window: tuple[int, int, int, int]) -> torch.Tensor:
    top, left, height, width = window
    return image[..., top : top + height, left : left + width]


def tensor_to_output(images: torch.Tensor, output_type: str):
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


def kernel_to_image(kernel: torch.Tensor, scale: int = 8) -> PIL.Image.Image:
    """A viewable PNG of one ``(k, k)`` kernel: max-normalised and enlarged ``scale``× with nearest neighbours."""
    kernel = kernel.detach().float().cpu().reshape(kernel.shape[-2:])
    kernel = kernel.clamp_min(0) / kernel.max().clamp_min(1e-12)
    image = PIL.Image.fromarray((kernel.numpy() * 255).round().astype(np.uint8), mode="L")
    return image.resize((image.width * scale, image.height * scale), PIL.Image.Resampling.NEAREST)
