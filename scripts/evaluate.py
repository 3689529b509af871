#!/usr/bin/env python
"""Evaluate blind-deblurring methods on a dataset: synthetic blur + noise, restore, score, summarise.

Single process::

    python scripts/evaluate.py --data_dir my_images/ --resolution 256 --limit 100 \\
        --methods fastem-pigdm pigdm-known-kernel wiener-known-kernel identity \\
        --sigma 5 10 --output_dir eval_out

Several processes (GPUs, or CPU cores with ``--cpu``), same results whatever the process count::

    accelerate launch --num_processes 4 scripts/evaluate.py --data_dir my_images/ ... --output_dir eval_out

Every (image, method, σ) job is appended to ``OUT/results.jsonl`` (one file per process while
running, ``OUT/results.rank{r}.jsonl``, merged at the end) as soon as it finishes; running the same
command again skips the jobs already done. The kernel and the noise of image ``i`` (and the seed of
the diffusion sampler) are pure functions of ``(--seed, i)``. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont


METHODS = {
    # name: (kind, guidance, uses the true kernel, Diffusion EM)
    "fastem-pigdm": ("pipeline", "pigdm", False, False),
    "fastem-dps": ("pipeline", "dps", False, False),
    "diffusion-em": ("pipeline", "pigdm", False, True),
    "pigdm-known-kernel": ("pipeline", "pigdm", True, False),
    "dps-known-kernel": ("pipeline", "dps", True, False),
    "wiener-known-kernel": ("wiener", None, True, False),
    "identity": ("identity", None, False, False),
}

# Settings that change the result of a job: a rerun into the same folder must use the same ones.
RESULT_SETTINGS = (
    "data_dir", "dataset_id", "split", "image_column", "resolution", "downscale", "small_images", "kernel",
    "kernel_size", "intensity", "blur_mode", "seed", "model", "steps", "particles", "guidance_scale",
    "em_iterations",
)

SUMMARY_METRICS = (
    ("psnr", "PSNR (dB) ↑", "{:.2f}"),
    ("ssim", "SSIM ↑", "{:.4f}"),
    ("gmsd", "GMSD ↓", "{:.4f}"),
    ("lpips", "LPIPS ↓", "{:.4f}"),
    ("niqe", "NIQE ↓", "{:.3f}"),
    ("brisque", "BRISQUE ↓", "{:.2f}"),
    ("sharpness_ratio", "sharpness ratio (→1)", "{:.3f}"),
    ("kernel_mse", "kernel MSE ↓", "{:.3e}"),
    ("mnc", "MNC ↑", "{:.4f}"),
    ("reblur_per_element", "L_reblur / M", "{:.3e}"),
    ("reblur_total", "L_reblur", "{:.4g}"),
    ("time_s", "time / image (s)", "{:.2f}"),
)


# ----------------------------------------------------------------------------------------- arguments
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = p.add_argument_group("data")
    source = data.add_mutually_exclusive_group(required=True)
    source.add_argument("--data_dir", help="local folder of images (loaded with datasets' 'imagefolder')")
    source.add_argument("--dataset_id", help="a dataset on the Hugging Face Hub (needs the network the first time)")
    data.add_argument("--split", default="train", help="dataset split ('imagefolder' puts a plain folder in 'train')")
    data.add_argument("--image_column", default=None, help="image column (default: the first Image feature)")
    data.add_argument("--limit", type=int, default=None, help="use the first N images only")
    data.add_argument("--resolution", type=int, default=None, help="centre crop to R×R (no resizing)")
    data.add_argument("--downscale", type=float, default=None,
                      help="optional: shrink every image by this factor (Lanczos) BEFORE the crop")
    data.add_argument("--small_images", choices=("skip", "pad"), default="skip",
                      help="images smaller than --resolution: skip them (with a message) or reflect-pad them")

    deg = p.add_argument_group("degradation")
    deg.add_argument("--kernel", default="motion", help="'motion', 'gaussian' or a folder of kernels (.npy / .png)")
    deg.add_argument("--kernel_size", type=int, default=33, help="size of generated kernels and of blind estimates")
    deg.add_argument("--intensity", type=float, default=0.5, help="motion-blur intensity in [0, 1]")
    deg.add_argument("--sigma", type=float, nargs="+", default=[10.0], help="noise std in 8-bit levels; several allowed")
    deg.add_argument("--blur_mode", choices=("circular", "reflect"), default="circular",
                     help="circular: FFT convolution (the paper's protocol); reflect: true convolution, reflect padding")
    deg.add_argument("--seed", type=int, default=0, help="kernel/noise/sampler of image i depend only on (seed, i)")

    meth = p.add_argument_group("methods")
    meth.add_argument("--methods", nargs="+", default=["fastem-pigdm", "wiener-known-kernel", "identity"],
                      choices=tuple(METHODS), metavar="METHOD", help=f"any of {', '.join(METHODS)}")
    meth.add_argument("--model", default=None, help="FastEMDeblurPipeline folder (default: diffusers_blind.DEFAULT_MODEL)")
    meth.add_argument("--steps", type=int, default=100, help="diffusion steps")
    meth.add_argument("--particles", type=int, default=1, help="Fast EM particles per image")
    meth.add_argument("--guidance_scale", type=float, default=None, help="multiplier of the guidance step (default: the pipeline config, 3 for the shipped model)")
    meth.add_argument("--em_iterations", type=int, default=10, help="full runs of 'diffusion-em'")

    out = p.add_argument_group("output")
    out.add_argument("--output_dir", required=True)
    out.add_argument("--num_grid", type=int, default=4, help="images shown in grid.png (their outputs are saved as PNG)")
    out.add_argument("--save_images", action="store_true", help="save every output as PNG, not only the grid's")
    out.add_argument("--extra_metrics", default="auto",
                     help="optional metrics: 'auto' (every available one of lpips, niqe, brisque), 'none', or a comma list")
    out.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is present")
    out.add_argument("--overwrite", action="store_true", help="delete previous results in --output_dir instead of resuming")
    out.add_argument("--stop_after", type=int, default=None, help=argparse.SUPPRESS)  # test hook: exit after k jobs
    args = p.parse_args(argv)

    if args.resolution is not None and args.resolution < 1:
        p.error("--resolution must be positive")
    if args.downscale is not None and args.downscale <= 0:
        p.error("--downscale must be positive")
    if any(s < 0 or s > 255 for s in args.sigma):
        p.error("--sigma values are 8-bit levels in [0, 255]")
    if not 0 <= args.intensity <= 1:
        p.error("--intensity must be in [0, 1]")
    if args.kernel not in ("motion", "gaussian") and not Path(args.kernel).is_dir():
        p.error(f"--kernel must be 'motion', 'gaussian' or an existing folder, got {args.kernel!r}")
    args.sigma = list(dict.fromkeys(float(s) for s in args.sigma))
    args.methods = list(dict.fromkeys(args.methods))
    if args.model is None and any(METHODS[m][0] == "pipeline" for m in args.methods):
        import diffusers_blind

        args.model = diffusers_blind.DEFAULT_MODEL
    return args


# ----------------------------------------------------------------------------------------- seeding
def stream_seed(seed: int, index: int, stream: int) -> int:
    """A 63-bit seed that depends only on ``(seed, image index, stream)`` (numpy SeedSequence hashing)."""
    state = np.random.SeedSequence([seed, index, stream]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31 ^ int(state[1])) % (2**63)


KERNEL_STREAM, NOISE_STREAM, SAMPLER_STREAM = 0, 1, 2


# ----------------------------------------------------------------------------------------- data
def load_image_table(args, state):
    """The dataset (images not decoded), its image column and the list of usable ``(index, name)`` pairs."""
    from datasets import Image as ImageFeature
    from datasets import load_dataset

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
    usable, skipped = [], []
    for index in range(count):
        entry = dataset[index][column]
        name = Path(entry["path"]).stem if entry.get("path") else f"{index:05d}"
        if args.resolution is not None and args.small_images == "skip":
            width, height = _open(entry).size
            if args.downscale:
                width, height = _downscaled_size((width, height), args.downscale)
            if min(width, height) < args.resolution:
                skipped.append(f"{name} ({width}x{height})")
                continue
        usable.append((index, name))
    if skipped and state.is_main_process:
        print(f"Skipping {len(skipped)} image(s) smaller than {args.resolution}x{args.resolution} "
              f"(use --small_images pad to keep them): {', '.join(skipped[:10])}{' ...' if len(skipped) > 10 else ''}")
    return dataset, column, usable


def _open(entry) -> Image.Image:
    if entry.get("bytes"):
        return Image.open(io.BytesIO(entry["bytes"]))
    return Image.open(entry["path"])


def _downscaled_size(size, factor):
    return max(1, round(size[0] / factor)), max(1, round(size[1] / factor))


def load_ground_truth(dataset, column, index, args) -> torch.Tensor:
    """Image ``index`` as a ``(1, 3, H, W)`` tensor in ``[0, 1]``: optional downscale, then centre crop (or pad)."""
    image = _open(dataset[index][column]).convert("RGB")
    if args.downscale:
        image = image.resize(_downscaled_size(image.size, args.downscale), Image.Resampling.LANCZOS)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None].contiguous()
    if args.resolution is None:
        return x
    r = args.resolution
    height, width = x.shape[-2:]
    if height < r or width < r:  # --small_images pad
        pad_h, pad_w = max(0, r - height), max(0, r - width)
        pads = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
        mode = "reflect" if max(pads) < min(height, width) else "replicate"
        x = F.pad(x, pads, mode=mode)
        height, width = x.shape[-2:]
    top, left = (height - r) // 2, (width - r) // 2
    return x[..., top : top + r, left : left + r].contiguous()


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
    from diffusers_blind.ops import fft_blur, spatial_blur

    if mode == "circular":
        return fft_blur(x, kernel)
    return spatial_blur(x, kernel.flip(-2, -1), padding="reflect")  # true convolution, reflect padding


def degrade(x: torch.Tensor, kernel: torch.Tensor, sigma_255: float, args, index: int) -> torch.Tensor:
    """``y = k ⊛ x + σ·n`` with ``n`` a standard normal field that depends only on ``(seed, index)`` (not clipped)."""
    generator = torch.Generator().manual_seed(stream_seed(args.seed, index, NOISE_STREAM))
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float32)
    return blur(x, kernel, args.blur_mode) + sigma_255 / 255.0 * noise


# ----------------------------------------------------------------------------------------- methods
def wiener_deconvolution(
    y: torch.Tensor, kernel: torch.Tensor, sigma: float, blur_mode: str, max_iterations: int = 100
) -> torch.Tensor:
    """Non-blind Wiener deconvolution with a ``1/|ω|²`` image spectrum (``sigma`` in ``[0, 1]`` units).

    The Wiener filter of a Gaussian image whose gradients are white with variance ``g²`` is the
    minimiser of ``‖k ⊛ x − y‖² + λ‖∇x‖²`` with ``λ = σ² / (2 g²)``; ``g²`` is fitted to the
    measurement, ``E[(∂y)²] = g²·mean|K|² + 2σ²`` (the blur attenuates white gradients by
    ``mean|K|²``), and ``σ`` is floored at 0.5/255 (8-bit quantisation) so that σ = 0 stays stable.

    * ``"circular"``: the closed form in Fourier, ``x̂ = F⁻¹[conj(K)·Y / (|K|² + λ·|D|²)]``;
    * ``"reflect"``: the same objective with the reflect-padded blur operator (no circular model,
      hence no wrap-around artefacts), solved by conjugate gradients from ``y``.
    """
    from diffusers_blind.ops import p2o

    sigma = max(float(sigma), 0.5 / 255)
    y = y.double()
    kernel = kernel.double()
    height, width = y.shape[-2:]
    otf = p2o(kernel, (height, width))
    grad_var = 0.5 * ((y.diff(dim=-1) ** 2).mean() + (y.diff(dim=-2) ** 2).mean())
    g2 = (grad_var - 2 * sigma**2).clamp_min(1e-6) / (otf.abs() ** 2).mean()
    lam = float(sigma**2 / (2 * g2))

    if blur_mode == "circular":
        wy = 2 * math.pi * torch.fft.fftfreq(height, dtype=torch.float64).view(-1, 1)
        wx = 2 * math.pi * torch.fft.fftfreq(width, dtype=torch.float64).view(1, -1)
        d2 = 4 * torch.sin(wy / 2) ** 2 + 4 * torch.sin(wx / 2) ** 2
        estimate = torch.fft.ifft2(otf.conj() * torch.fft.fft2(y) / (otf.abs() ** 2 + lam * d2)).real
        return estimate.float().clamp(0, 1)

    kh, kw = kernel.shape[-2:]
    pads = ((kw - 1) // 2, kw // 2, (kh - 1) // 2, kh // 2)
    padded_otf = p2o(kernel, (height + kh - 1, width + kw - 1))

    def blur_op(x):  # = spatial_blur(x, kernel.flip(-2, -1), "reflect"), the measurement model, computed by FFT
        padded = F.pad(x, pads, mode="reflect")
        out = torch.fft.ifft2(torch.fft.fft2(padded) * padded_otf).real
        return out[..., pads[2] : pads[2] + height, pads[0] : pads[0] + width]

    def energy(x, target=None):
        residual = blur_op(x) if target is None else blur_op(x) - target
        return 0.5 * residual.pow(2).sum() + 0.5 * lam * (x.diff(dim=-1).pow(2).sum() + x.diff(dim=-2).pow(2).sum())

    def gradient(x, target=None):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            return torch.autograd.grad(energy(x, target), x)[0]

    # Normal equations N x = Aᵀy with N = AᵀA + λ DᵀD: N x = ∇E₀(x), and Aᵀy = N x − ∇E_y(x) at any x.
    x = y.clone()
    residual = -gradient(x, y)
    direction = residual.clone()
    rs = residual.pow(2).sum()
    tolerance = 1e-6 * float(rs)  # stop when the residual norm has dropped by 1e3
    for _ in range(max_iterations):
        if rs <= tolerance:
            break
        applied = gradient(direction)
        step = rs / (direction * applied).sum()
        x = x + step * direction
        residual = residual - step * applied
        rs_new = residual.pow(2).sum()
        direction = residual + (rs_new / rs) * direction
        rs = rs_new
    return x.float().clamp(0, 1)


def run_method(method, y, kernel_true, sigma_255, args, pipe, index, device):
    """Restore ``y``; returns ``(x̂ (1, C, H, W), k̂ (1, 1, k, k), seconds)``."""
    from diffusers_blind.ops import dirac_kernel

    kind, guidance, known, em = METHODS[method]
    start = time.perf_counter()
    if kind == "identity":
        x_hat, k_hat = y.clamp(0, 1), dirac_kernel(kernel_true.shape[-1])
    elif kind == "wiener":
        x_hat, k_hat = wiener_deconvolution(y, kernel_true, sigma_255 / 255.0, args.blur_mode), kernel_true
    else:
        generator = torch.Generator(device=device).manual_seed(stream_seed(args.seed, index, SAMPLER_STREAM))
        out = pipe(
            y.to(device),
            sigma=sigma_255,
            kernel=kernel_true if known else None,
            num_inference_steps=args.steps,
            guidance=guidance,
            guidance_scale=args.guidance_scale,
            kernel_size=None if known else args.kernel_size,
            num_particles=args.particles,
            em_iterations=args.em_iterations if em else None,
            boundary_margin=0 if args.blur_mode == "circular" else None,
            generator=generator,
            output_type="pt",
        )
        x_hat, k_hat = out.images.float().cpu(), out.kernels.float().cpu()
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return x_hat, k_hat, time.perf_counter() - start


# ----------------------------------------------------------------------------------------- metrics
def optional_metrics(spec: str) -> tuple[dict, dict]:
    """``(name → function, name → reason unavailable)`` for the requested optional metrics."""
    from diffusers_blind import metrics

    names = ("lpips", "niqe", "brisque") if spec == "auto" else () if spec == "none" else tuple(
        n.strip() for n in spec.split(",") if n.strip()
    )
    functions = {"lpips": lambda x, gt: metrics.lpips(x, gt), "niqe": lambda x, gt: metrics.niqe(x),
                 "brisque": lambda x, gt: metrics.brisque(x)}
    usable, missing = {}, {}
    for name in names:
        if name not in functions:
            raise SystemExit(f"unknown optional metric {name!r}; choose among {tuple(functions)}")
        reason = metrics.metric_status(name)
        if reason is None:
            usable[name] = functions[name]
        else:
            missing[name] = reason
            if spec != "auto":
                raise SystemExit(f"{name} is unavailable: {reason}")
    return usable, missing


def score(x_hat, k_hat, x, y, kernel_true, sigma_255, method, args, extra) -> dict:
    from diffusers_blind import metrics

    known = METHODS[method][2]
    reblur = metrics.reblur_loss(x_hat, k_hat, y, sigma_255 / 255.0, blur_mode=args.blur_mode)
    sharp, sharp_gt = metrics.laplacian_sharpness(x_hat).item(), metrics.laplacian_sharpness(x).item()
    record = {
        "psnr": metrics.psnr(x_hat, x).item(),
        "ssim": metrics.ssim(x_hat, x).item(),
        "gmsd": metrics.gmsd(x_hat, x).item(),
        "sharpness": sharp,
        "sharpness_gt": sharp_gt,
        "sharpness_ratio": sharp / sharp_gt if sharp_gt > 0 else None,
        # the kernel of a known-kernel method is the truth: its kernel metrics would be trivially perfect
        "kernel_mse": None if known else metrics.kernel_mse(k_hat, kernel_true).item(),
        "mnc": None if known else metrics.mnc(k_hat, kernel_true).item(),
        "reblur_total": reblur.total.item(),
        "reblur_per_element": reblur.per_element.item(),
    }
    for name, function in extra.items():
        record[name] = function(x_hat, x).item()
    return record


# ----------------------------------------------------------------------------------------- results files
def job_key(record_or_job) -> tuple:
    if isinstance(record_or_job, dict):
        return int(record_or_job["image_index"]), record_or_job["method"], float(record_or_job["sigma"])
    index, sigma, method = record_or_job
    return int(index), method, float(sigma)


def read_records(output_dir: Path) -> list[dict]:
    """Every complete record of ``results.jsonl`` and ``results.rank*.jsonl`` (a truncated last line is ignored)."""
    records = []
    for path in [output_dir / "results.jsonl", *sorted(output_dir.glob("results.rank*.jsonl"))]:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut by a kill: that job is redone
    return records


def merge_records(output_dir: Path, extra_records: list[dict]) -> list[dict]:
    """Deduplicate (first record of a job wins), sort, rewrite ``results.jsonl`` atomically, drop the rank files."""
    merged = {}
    for record in [*read_records(output_dir), *extra_records]:
        merged.setdefault(job_key(record), record)
    records = [merged[key] for key in sorted(merged, key=lambda k: (k[0], k[2], k[1]))]
    tmp = output_dir / "results.jsonl.tmp"
    with open(tmp, "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, output_dir / "results.jsonl")
    for path in output_dir.glob("results.rank*.jsonl"):
        path.unlink()
    return records


def check_settings(args, output_dir: Path, is_main: bool) -> None:
    """Store the result-changing settings in ``config.json``; refuse to resume with different ones."""
    settings = {name: getattr(args, name) for name in RESULT_SETTINGS}
    path = output_dir / "config.json"
    if path.is_file() and not args.overwrite:
        previous = json.loads(path.read_text())
        differences = [f"{k}: {previous.get(k)!r} -> {v!r}" for k, v in settings.items() if previous.get(k) != v]
        if differences:
            raise SystemExit(
                f"{output_dir} holds results made with other settings ({'; '.join(differences)}). "
                "Use another --output_dir, or --overwrite to start again."
            )
    elif is_main:
        if args.overwrite:
            for stale in [*output_dir.glob("results*.jsonl"), output_dir / "summary.md", output_dir / "summary.csv"]:
                stale.unlink(missing_ok=True)
        path.write_text(json.dumps(settings, indent=2) + "\n")


# ----------------------------------------------------------------------------------------- summary
def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None, 0
    array = np.asarray(values, dtype=np.float64)
    if not np.isfinite(array).all():
        return float(np.mean(array)), float("nan"), len(values)
    return float(array.mean()), float(array.std()), len(values)


def summarise(records: list[dict], args, output_dir: Path, missing_metrics: dict) -> list[dict]:
    groups = defaultdict(list)
    for record in records:
        groups[(record["method"], float(record["sigma"]))].append(record)
    order = {m: i for i, m in enumerate(args.methods)}
    keys = sorted(groups, key=lambda k: (k[1], order.get(k[0], len(order)), k[0]))
    present = [m for m, _, _ in SUMMARY_METRICS if any(r.get(m) is not None for r in records)]
    rows = []
    for method, sigma in keys:
        row = {"method": method, "sigma": sigma, "n": len(groups[(method, sigma)])}
        for metric in present:
            mean, std, _ = _mean_std([r.get(metric) for r in groups[(method, sigma)]])
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean, std
        rows.append(row)

    with open(output_dir / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["method", "sigma", "n", *[f"{m}_{s}" for m in present for s in ("mean", "std")]])
        writer.writeheader()
        writer.writerows(rows)

    formats = {m: (label, fmt) for m, label, fmt in SUMMARY_METRICS}
    lines = ["# Evaluation summary", ""]
    source = args.data_dir or args.dataset_id
    lines.append(
        f"Data `{source}` (split `{args.split}`), {len({r['image_index'] for r in records})} images, "
        f"resolution {args.resolution or 'native'}, kernel `{args.kernel}` (size {args.kernel_size}"
        f"{', intensity ' + str(args.intensity) if args.kernel == 'motion' else ''}), blur `{args.blur_mode}`, "
        f"seed {args.seed}."
    )
    if any(METHODS[m][0] == "pipeline" for m in args.methods):
        lines.append(f"Model `{args.model}`, {args.steps} steps, {args.particles} particle(s), "
                     f"guidance scale {args.guidance_scale or 'pipeline default'}"
                     + (f", Diffusion EM iterations {args.em_iterations}" if "diffusion-em" in args.methods else "") + ".")
    lines += ["", "Mean ± standard deviation over images; σ in 8-bit levels. Kernel metrics are not reported for "
              "known-kernel methods; `identity` is scored with a Dirac kernel.", ""]
    header = ["method", "σ", "n", *[formats[m][0] for m in present]]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in rows:
        cells = [row["method"], f"{row['sigma']:g}", str(row["n"])]
        for metric in present:
            mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
            fmt = formats[metric][1]
            cells.append("–" if mean is None else f"{fmt.format(mean)} ± {fmt.format(std)}")
        lines.append("| " + " | ".join(cells) + " |")
    if missing_metrics:
        lines += ["", "Optional metrics not computed on this machine:", ""]
        lines += [f"- **{name}**: {reason}" for name, reason in missing_metrics.items()]
    lines += ["", "Per-image results: `results.jsonl`. Conventions: docs/evaluation.md.", ""]
    (output_dir / "summary.md").write_text("\n".join(lines))
    return rows


def _font(size: int):
    try:
        return ImageFont.load_default(size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _tile(array_or_image, size: int) -> Image.Image:
    image = array_or_image if isinstance(array_or_image, Image.Image) else Image.open(array_or_image)
    image = image.convert("RGB")
    scale = size / max(image.size)
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS  # show pixels, avoid aliasing
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), resample)


def _kernel_image(path: Path, size: int) -> Image.Image:
    from diffusers_blind.image_processor import kernel_to_image

    kernel = torch.from_numpy(np.load(path))
    return kernel_to_image(kernel, scale=1).convert("RGB").resize((size, size), Image.Resampling.NEAREST)


def make_grid(records, args, output_dir: Path, grid_ids: list[tuple[int, str]]) -> Path | None:
    """``grid.png``: per image (first σ), ground truth | input | each method with its kernel inset | true kernel."""
    sigma = args.sigma[0]
    by_key = {job_key(r): r for r in records}
    rows = []
    for index, name in grid_ids:
        folder = output_dir / "images" / f"{index:05d}_{name}"
        if not (folder / "gt.png").is_file():
            continue
        tiles = [("ground truth", folder / "gt.png", None), (f"input sigma={sigma:g}", folder / f"input_s{sigma:g}.png", None)]
        for method in args.methods:
            stem = f"{method}_s{sigma:g}"
            if (folder / f"{stem}.png").is_file():
                record = by_key.get((index, method, sigma), {})
                label = f"{method} {record.get('psnr', float('nan')):.2f} dB"
                kernel = None if METHODS[method][2] else folder / f"{stem}_kernel.npy"
                tiles.append((label, folder / f"{stem}.png", kernel))
        tiles.append(("true kernel", None, folder / "kernel_true.npy"))
        rows.append(tiles)
    if not rows:
        return None
    size, label_h, pad = 160, 16, 4
    columns = max(len(r) for r in rows)
    canvas = Image.new("RGB", (columns * (size + pad) + pad, len(rows) * (size + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font(11)
    for r, tiles in enumerate(rows):
        for c, (label, image_path, kernel_path) in enumerate(tiles):
            x0, y0 = pad + c * (size + pad), pad + r * (size + label_h + pad)
            if image_path is not None:
                tile = _tile(image_path, size)
                if kernel_path is not None and kernel_path.is_file():  # estimated kernel, bottom-right inset
                    inset = _kernel_image(kernel_path, size // 3)
                    tile.paste(inset, (tile.width - inset.width, tile.height - inset.height))
            else:
                tile = _kernel_image(kernel_path, size)
            canvas.paste(tile, (x0, y0 + label_h))
            draw.text((x0, y0 + 2), label, fill="black", font=font)
    path = output_dir / "grid.png"
    canvas.save(path)
    return path


def perception_distortion_plot(rows: list[dict], output_dir: Path) -> Path | None:
    """PSNR (distortion) against LPIPS if measured, else the Laplacian sharpness ratio, one point per (method, σ)."""
    if len(rows) < 2:
        return None
    if all(row.get("lpips_mean") is not None for row in rows):
        y_key, y_label = "lpips_mean", "LPIPS (lower is better)"
    elif all(row.get("sharpness_ratio_mean") is not None for row in rows):
        y_key = "sharpness_ratio_mean"
        y_label = "sharpness ratio output / ground truth\n(Laplacian variance, a no-reference proxy; 1 = as sharp)"
    else:
        return None
    points = [(row["psnr_mean"], row[y_key], f"{row['method']} sigma={row['sigma']:g}") for row in rows]
    points = [p for p in points if p[0] is not None and math.isfinite(p[0]) and math.isfinite(p[1])]
    if len(points) < 2:
        return None
    path = output_dir / "perception_distortion.png"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.8))
        for x, y, label in points:
            ax.scatter(x, y)
            ax.annotate(label, (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
        if y_key == "sharpness_ratio_mean":
            ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
            ax.set_yscale("log")
        ax.set_xlabel("PSNR (dB, higher is better)")
        ax.set_ylabel(y_label, fontsize=8)
        ax.set_title("Perception-distortion")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path
    except ImportError:
        pass
    if y_key == "sharpness_ratio_mean":  # log scale, as with matplotlib
        points = [(x, math.log10(y), label) for x, y, label in points if y > 0]
        _pil_scatter(points, "PSNR (dB, higher is better)", "log10 " + y_label.replace("\n", " "), path, reference=0.0)
    else:
        _pil_scatter(points, "PSNR (dB, higher is better)", y_label, path)
    return path


def _pil_scatter(points, x_label, y_label, path, reference=None):
    width, height, left, right, top, bottom = 720, 520, 70, 30, 30, 60
    xs, ys = [p[0] for p in points], [p[1] for p in points] + ([reference] if reference is not None else [])
    x_lo, x_hi = min(xs), max(xs)
    y_lo, y_hi = min(ys), max(ys)
    x_pad, y_pad = (x_hi - x_lo) * 0.1 or 1.0, (y_hi - y_lo) * 0.1 or 0.1
    x_lo, x_hi, y_lo, y_hi = x_lo - x_pad, x_hi + x_pad, y_lo - y_pad, y_hi + y_pad

    def to_px(x, y):
        return (left + (x - x_lo) / (x_hi - x_lo) * (width - left - right),
                height - bottom - (y - y_lo) / (y_hi - y_lo) * (height - top - bottom))

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = _font(11)
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for i in range(5):
        xv, yv = x_lo + (x_hi - x_lo) * i / 4, y_lo + (y_hi - y_lo) * i / 4
        px, _ = to_px(xv, y_lo)
        _, py = to_px(x_lo, yv)
        draw.line([px, height - bottom, px, height - bottom + 4], fill="black")
        draw.text((px - 12, height - bottom + 6), f"{xv:.2f}", fill="black", font=font)
        draw.line([left - 4, py, left, py], fill="black")
        draw.text((4, py - 6), f"{yv:.3g}", fill="black", font=font)
    if reference is not None:
        _, py = to_px(x_lo, reference)
        draw.line([left, py, width - right, py], fill=(150, 150, 150))
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194)]
    for i, (x, y, label) in enumerate(points):
        px, py = to_px(x, y)
        color = palette[i % len(palette)]
        draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=color)
        draw.text((px + 6, py - 6), label, fill=color, font=font)
    draw.text((left, height - 22), x_label, fill="black", font=font)
    draw.text((left, 8), y_label, fill="black", font=font)
    image.save(path)


# ----------------------------------------------------------------------------------------- main
def save_png(tensor: torch.Tensor, path: Path) -> None:
    array = (tensor[0].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).save(path)


def use_cpu(args) -> bool:
    """CPU when asked (``--cpu`` / ``accelerate launch --cpu``), or when several processes were launched
    (``accelerate launch --multi_gpu`` / ``torchrun``) on a machine without GPU: accelerate then uses gloo."""
    if args.cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1
    has_gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    return launched and not has_gpu


def main(argv=None) -> int:
    args = parse_args(argv)
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    state = PartialState(cpu=use_cpu(args))
    if state.num_processes > 1 and state.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // state.num_processes))
    output_dir = Path(args.output_dir)
    with state.main_process_first():
        if state.is_main_process:
            output_dir.mkdir(parents=True, exist_ok=True)
        check_settings(args, output_dir, state.is_main_process)
    state.wait_for_everyone()

    dataset, column, usable = load_image_table(args, state)
    if not usable:
        raise SystemExit("no usable image")
    names = dict(usable)
    grid_indices = {index for index, _ in usable[: args.num_grid]}
    user_kernels = load_user_kernels(args.kernel) if args.kernel not in ("motion", "gaussian") else None
    extra, missing_metrics = optional_metrics(args.extra_metrics)

    jobs = [(index, sigma, method) for index, _ in usable for sigma in args.sigma for method in args.methods]
    done = {job_key(r) for r in read_records(output_dir)}
    pending = [job for job in jobs if job_key(job) not in done]
    state.wait_for_everyone()  # every process has read the same "done" set before anyone writes a new result
    if state.is_main_process:
        print(f"{len(jobs)} jobs ({len(usable)} images × {len(args.sigma)} σ × {len(args.methods)} methods), "
              f"{len(jobs) - len(pending)} already done, {len(pending)} to run on {state.num_processes} process(es).")

    pipe = None
    if any(METHODS[method][0] == "pipeline" for _, _, method in pending):
        from diffusers_blind import FastEMDeblurPipeline

        pipe = FastEMDeblurPipeline.from_pretrained(args.model).to(state.device)
        pipe.set_progress_bar_config(disable=True)

    results_path = output_dir / ("results.jsonl" if state.num_processes == 1 else f"results.rank{state.process_index}.jsonl")
    if results_path.is_file() and results_path.stat().st_size > 0:
        with open(results_path, "rb+") as handle:  # a kill may have left half a line: start on a fresh one
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                handle.write(b"\n")
    new_records = []
    with state.split_between_processes(pending) as my_jobs:
        cache = {}
        progress = tqdm(my_jobs, desc=f"evaluate (process 0 of {state.num_processes})", unit="job",
                        disable=not state.is_main_process, dynamic_ncols=True)
        with open(results_path, "a") as handle:
            for count, (index, sigma, method) in enumerate(progress, start=1):
                if cache.get("index") != index:
                    x = load_ground_truth(dataset, column, index, args)
                    kernel, kernel_name = make_kernel(args, index, user_kernels)
                    cache = {"index": index, "x": x, "kernel": kernel, "kernel_name": kernel_name, "y": {}}
                x, kernel = cache["x"], cache["kernel"]
                if sigma not in cache["y"]:
                    cache["y"][sigma] = degrade(x, kernel, sigma, args, index)
                y = cache["y"][sigma]
                x_hat, k_hat, seconds = run_method(method, y, kernel, sigma, args, pipe, index, state.device)
                record = {
                    "image_index": index, "image_id": names[index], "method": method, "sigma": sigma,
                    "seed": args.seed, "kernel": cache["kernel_name"], "kernel_size": int(kernel.shape[-1]),
                    "blur_mode": args.blur_mode, "resolution": list(x.shape[-2:]),
                    "steps": args.steps if METHODS[method][0] == "pipeline" else None,
                    "particles": args.particles if METHODS[method][0] == "pipeline" else None,
                    "time_s": seconds,
                    **score(x_hat, k_hat, x, y, kernel, sigma, method, args, extra),
                    "process": state.process_index,
                }
                if index in grid_indices or args.save_images:
                    folder = output_dir / "images" / f"{index:05d}_{names[index]}"
                    folder.mkdir(parents=True, exist_ok=True)
                    save_png(x, folder / "gt.png")
                    np.save(folder / "kernel_true.npy", kernel[0, 0].numpy())
                    save_png(y, folder / f"input_s{sigma:g}.png")
                    save_png(x_hat, folder / f"{method}_s{sigma:g}.png")
                    np.save(folder / f"{method}_s{sigma:g}_kernel.npy", k_hat[0, 0].numpy())
                handle.write(json.dumps(record) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
                new_records.append(record)
                progress.set_postfix(psnr=f"{record['psnr']:.2f}", method=method)
                if args.stop_after is not None and count >= args.stop_after:
                    print(f"--stop_after {args.stop_after}: process {state.process_index} stops early", flush=True)
                    raise SystemExit(3)  # like a kill: no merge, no summary

    gathered = gather_object(new_records)  # records of every process (also without a shared file system)
    state.wait_for_everyone()
    if state.is_main_process:
        records = merge_records(output_dir, gathered)
        wanted = {job_key(job) for job in jobs}
        current = [r for r in records if job_key(r) in wanted]
        rows = summarise(current, args, output_dir, missing_metrics)
        grid = make_grid(current, args, output_dir, usable[: args.num_grid])
        plot = perception_distortion_plot(rows, output_dir)
        print((output_dir / "summary.md").read_text())
        print(f"Results: {output_dir / 'results.jsonl'} ({len(records)} records); summary.md, summary.csv"
              + (", grid.png" if grid else "") + (", perception_distortion.png" if plot else ""))
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
