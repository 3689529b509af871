"""Degradations of an evaluation: reproducible kernels and noise, ground-truth crops, the blur models."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


# ----------------------------------------------------------------------------------------- seeding
def stream_seed(seed: int, index: int, stream: int) -> int:
    """A 63-bit seed that depends only on ``(seed, image index, stream)`` (numpy SeedSequence hashing)."""
    state = np.random.SeedSequence([seed, index, stream]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31 ^ int(state[1])) % (2**63)


KERNEL_STREAM, NOISE_STREAM, SAMPLER_STREAM = 0, 1, 2


# ----------------------------------------------------------------------------------------- data
BLUR_MODES = {
    "circular": "periodic FFT blur (the papers' protocol); pipelines run with boundary_margin=0",
    "valid": "linear blur of a larger crop, centre kept (no wrap-around, like a photograph); pipelines use their "
             "reflect boundary margin",
    "reflect": "true convolution with reflect padding (kept for older result folders)",
}


def valid_margin(args, user_kernels=None) -> tuple[int, int]:
    """Extra rows and columns ``(kh − 1, kw − 1)`` of the largest kernel that ``--blur valid`` needs around a crop."""
    if args.blur_mode != "valid":
        return 0, 0
    if user_kernels:
        return (max(k.shape[-2] for _, k in user_kernels) - 1, max(k.shape[-1] for _, k in user_kernels) - 1)
    return args.kernel_size - 1, args.kernel_size - 1


def load_image_table(args, state, margin: tuple[int, int] = (0, 0)):
    """The dataset (images not decoded), its image column and the list of usable ``(index, name)`` pairs.

    With ``--small_images skip`` an image is usable when it holds the crop plus ``margin`` (``--blur valid``).
    """
    try:
        from datasets import Image as ImageFeature
        from datasets import load_dataset
    except ImportError as error:
        raise SystemExit(f"the evaluation reads images with 🤗 Datasets, which is not installed ({error}): "
                         'pip install -e ".[eval]"') from None

    with state.main_process_first():
        if args.data_dir:
            dataset = load_dataset("imagefolder", data_dir=args.data_dir, split=args.split)
        else:
            dataset = load_dataset(args.dataset_id, split=args.split)
    column = args.image_column
    if column is None:
        column = next((name for name, feature in dataset.features.items() if isinstance(feature, ImageFeature)), None)
        if column is None:
            raise SystemExit(f"no Image column in the dataset (columns: {list(dataset.features)}); pass --image_column")
    dataset = dataset.cast_column(column, ImageFeature(decode=False))
    count = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    usable, skipped, unreadable = [], [], []
    for index in range(count):
        entry = dataset[index][column]
        name = Path(entry["path"]).stem if entry.get("path") else f"{index:05d}"
        try:  # the header only: an unreadable file is named and skipped, as the command line does
            with _open(entry) as image:
                width, height = image.size
        except (OSError, ValueError, SyntaxError) as error:
            unreadable.append(f"{name} ({error})")
            continue
        if args.resolution is not None and args.small_images == "skip":
            if args.downscale:
                width, height = _downscaled_size((width, height), args.downscale)
            if height < args.resolution + margin[0] or width < args.resolution + margin[1]:
                skipped.append(f"{name} ({width}x{height})")
                continue
        usable.append((index, name))
    if unreadable and state.is_main_process:
        print(f"Skipping {len(unreadable)} unreadable image(s): {'; '.join(unreadable[:5])}"
              f"{' ...' if len(unreadable) > 5 else ''}")
    if skipped and state.is_main_process:
        need = f"{args.resolution + margin[1]}x{args.resolution + margin[0]}"
        print(f"Skipping {len(skipped)} image(s) smaller than {need} "
              f"(use --small_images pad to keep them): {', '.join(skipped[:10])}{' ...' if len(skipped) > 10 else ''}")
    return dataset, column, usable


def _open(entry) -> Image.Image:
    if entry.get("bytes"):
        return Image.open(io.BytesIO(entry["bytes"]))
    return Image.open(entry["path"])


def _downscaled_size(size, factor):
    return max(1, round(size[0] / factor)), max(1, round(size[1] / factor))


def load_scene(dataset, column, index, args, kernel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image ``index`` as ``(ground truth, source)``, ``(1, 3, ·, ·)`` tensors in ``[0, 1]``.

    Optional downscale, then the centre ``R × R`` crop (``--resolution``; reflect-padded when the image is
    smaller and ``--small_images pad``). The source is what gets blurred: the crop itself, or for
    ``--blur valid`` the crop with ``(kh − 1) // 2`` more rows above and ``kh // 2`` below (columns
    alike), so that the valid blur of the source covers exactly the ground truth.
    """
    image = _open(dataset[index][column]).convert("RGB")
    if args.downscale:
        image = image.resize(_downscaled_size(image.size, args.downscale), Image.Resampling.LANCZOS)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None].contiguous()
    kh, kw = kernel.shape[-2:] if args.blur_mode == "valid" else (1, 1)
    height, width = x.shape[-2:]
    r_h, r_w = (height - kh + 1, width - kw + 1) if args.resolution is None else (args.resolution, args.resolution)
    if r_h < 1 or r_w < 1:
        raise SystemExit(f"image {index} ({width}x{height}) is smaller than the {kh}x{kw} kernel")
    need_h, need_w = r_h + kh - 1, r_w + kw - 1
    if height < need_h or width < need_w:  # --small_images pad
        pad_h, pad_w = max(0, need_h - height), max(0, need_w - width)
        pads = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
        mode = "reflect" if max(pads) < min(height, width) else "replicate"
        x = F.pad(x, pads, mode=mode)
        height, width = x.shape[-2:]
    top, left = (height - r_h) // 2, (width - r_w) // 2
    truth = x[..., top : top + r_h, left : left + r_w].contiguous()
    source = x[..., top - (kh - 1) // 2 : top + r_h + kh // 2, left - (kw - 1) // 2 : left + r_w + kw // 2]
    return truth, source.contiguous()


def load_ground_truth(dataset, column, index, args) -> torch.Tensor:
    """The ground truth alone (any blur but ``valid``); see :func:`load_scene`."""
    return load_scene(dataset, column, index, args, torch.ones(1, 1, 1, 1))[0]


def load_user_kernels(folder: str) -> list[tuple[str, torch.Tensor]]:
    """Every ``.npy`` / ``.png`` kernel of ``folder`` (sorted by name) as ``(1, 1, kh, kw)``, clipped ≥ 0, sum 1."""
    kernels = []
    for path in sorted(Path(folder).iterdir()):
        suffix = path.suffix.lower()
        if suffix == ".npy":
            array = np.load(path).astype(np.float64)
        elif suffix == ".png":
            array = np.asarray(Image.open(path).convert("F"), dtype=np.float64)
        else:
            continue
        array = np.squeeze(array)
        if array.ndim != 2:
            raise SystemExit(f"kernel {path} must be 2-D, got shape {array.shape}")
        array = np.clip(array, 0, None)
        if array.sum() <= 0:
            raise SystemExit(f"kernel {path} is all zero")
        kernels.append((path.name, torch.from_numpy(array / array.sum()).float().view(1, 1, *array.shape)))
    if not kernels:
        raise SystemExit(f"no .npy or .png kernel in {folder}")
    return kernels


def make_kernel(args, index: int, user_kernels) -> tuple[torch.Tensor, str]:
    from diffusers_blind.ops import motion_kernel, random_gaussian_kernel

    rng = np.random.default_rng(stream_seed(args.seed, index, KERNEL_STREAM))
    if args.kernel == "motion":
        return motion_kernel(args.kernel_size, args.intensity, rng), "motion"
    if args.kernel == "gaussian":
        return random_gaussian_kernel(args.kernel_size, generator=rng), "gaussian"
    name, kernel = user_kernels[index % len(user_kernels)]
    return kernel, name


def blur(x: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """The one place where the evaluation blurs: true convolution ``k ⊛ x`` (kernel centre at ``k // 2``).

    ``"circular"``: periodic boundaries (FFT), same size; ``"reflect"``: mirrored boundaries, same size;
    ``"valid"``: only the outputs whose whole kernel footprint lies inside ``x``, so the result is
    ``(H − kh + 1, W − kw + 1)`` and nothing wraps around or is invented at the border.
    """
    from diffusers_blind.ops.operators import BlurOperator

    if mode in ("circular", "reflect"):
        return BlurOperator(padding=mode)(x, kernel)
    if mode == "valid":
        kh, kw = kernel.shape[-2:]
        same = BlurOperator(padding="zeros")(x, kernel)  # exact wherever the kernel footprint fits inside x
        return same[..., (kh - 1) // 2 : x.shape[-2] - kh // 2, (kw - 1) // 2 : x.shape[-1] - kw // 2]
    raise ValueError(f"blur mode must be one of {tuple(BLUR_MODES)}, got {mode!r}")


def reblur_scores(x_hat: torch.Tensor, k_hat: torch.Tensor, y: torch.Tensor, sigma: float, mode: str):
    """Fast EM's re-blur loss (Eq. 34) ``L = ‖k̂ ⊛ x̂ − y‖² − σ²M`` for data blurred with ``mode``.

    ``circular`` and ``reflect`` re-blur with that boundary (``metrics.reblur_loss``). For ``valid`` data
    no boundary is assumed: only the pixels whose kernel footprint lies inside ``x̂`` are compared,
    ``k̂ ⊛_valid x̂`` against the matching interior of ``y``, with ``M`` their count.
    """
    from diffusers_blind import metrics

    if mode != "valid":
        return metrics.reblur_loss(x_hat, k_hat, y, sigma, blur_mode=mode)
    kh, kw = k_hat.shape[-2:]
    reblurred = blur(x_hat.double(), k_hat.double(), "valid")
    inner = y.double()[..., (kh - 1) // 2 : y.shape[-2] - kh // 2, (kw - 1) // 2 : y.shape[-1] - kw // 2]
    m = reblurred[0].numel()
    total = (reblurred - inner).pow(2).flatten(1).sum(1) - float(sigma) ** 2 * m
    return metrics.ReblurLoss(total=total, per_element=total / m)


def degrade(x: torch.Tensor, kernel: torch.Tensor, sigma_255: float, args, index: int) -> torch.Tensor:
    """``y = k ⊛ x + σ·n`` with ``n`` a standard normal field that depends only on ``(seed, index)`` (not clipped).

    ``x`` is the source of :func:`load_scene` (larger than ``y`` for ``--blur valid``).
    """
    blurred = blur(x, kernel, args.blur_mode)
    generator = torch.Generator().manual_seed(stream_seed(args.seed, index, NOISE_STREAM))
    noise = torch.randn(blurred.shape, generator=generator, dtype=torch.float32)
    return blurred + sigma_255 / 255.0 * noise
