"""The ``diffusers-blind`` command line: deblur photos, make blurry test inputs, show the install.

Subcommands::

    diffusers-blind deblur INPUT... -o OUT_DIR [--sigma 10|auto] [--steps 100] [--particles 1] ...
    diffusers-blind blur SHARP -o OUT.png [--kernel motion|gaussian|FILE] [--sigma 10] [--seed 0] ...
    diffusers-blind info

``main(argv)`` returns the exit code: 0 on success, 2 for a usage or input problem (missing
file, unreadable image, missing model folder, ...), reported as one line on stderr.
Also runnable as ``python -m diffusers_blind.cli``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
OUTPUT_SUFFIXES = ("_deblurred", "_kernel", "_uncertainty")  # files this tool writes; skipped in folder scans
METHODS = {
    # name: (guidance, Diffusion EM?)
    "fastem-pigdm": ("pigdm", False),
    "fastem-dps": ("dps", False),
    "diffusion-em": ("pigdm", True),
}
DEFAULT_EM_ITERATIONS = 3
PAPER_DPS_STEPS = 1000
KERNEL_PREVIEW_SCALE = 8
GRAYSCALE_MODES = ("L", "LA", "1", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")


class CLIError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


# ---------------------------------------------------------------------------- small helpers
def _sigma_arg(value: str):
    if value.strip().lower() == "auto":
        return "auto"
    try:
        sigma = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in 8-bit levels (e.g. 10) or 'auto', got {value!r}")
    if not math.isfinite(sigma) or not 0 <= sigma <= 255:
        raise argparse.ArgumentTypeError(f"sigma is in 8-bit levels and must be in [0, 255], got {value!r}")
    return sigma


def _noise_sigma_arg(value: str) -> float:
    sigma = _sigma_arg(value)
    if sigma == "auto":
        raise argparse.ArgumentTypeError("the blur command needs a number (8-bit levels), not 'auto'")
    return sigma


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def _non_negative_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}")
    if not math.isfinite(number) or number < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {value!r}")
    return number


def _versions() -> dict:
    import diffusers
    import torch

    from . import __version__

    return {"diffusers_blind": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _say(message: str) -> None:
    """Print a status line without breaking tqdm bars."""
    from tqdm.auto import tqdm

    tqdm.write(message)


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def load_image(path: Path) -> tuple[np.ndarray, str]:
    """Read an image file as float32 ``(H, W)`` or ``(H, W, 3)`` in ``[0, 1]`` and its PIL mode.

    The package's one decoder (``diffusers_blind.io.read_image``): EXIF rotation applied, alpha dropped,
    16-bit and float images read at full precision.
    """
    from .io import read_image

    try:
        return read_image(path)
    except ValueError as error:
        raise CLIError(str(error)) from None


def load_kernel_file(path: Path) -> np.ndarray:
    """A known blur kernel from ``.npy`` (2-D, any singleton leading axes) or an image (read pixel for pixel).

    The kernel is made non-negative-checked and normalised to sum 1.
    """
    if not path.is_file():
        raise CLIError(f"kernel file not found: {path}")
    if path.suffix.lower() == ".npy":
        try:
            kernel = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise CLIError(f"cannot read kernel file {path}: {error}") from None
        kernel = np.asarray(kernel, dtype=np.float64)
        while kernel.ndim > 2 and kernel.shape[0] == 1:
            kernel = kernel[0]
    else:
        array, _ = load_image(path)
        kernel = array.astype(np.float64)
        if kernel.ndim == 3:
            kernel = kernel.mean(-1)
    if kernel.ndim != 2 or min(kernel.shape) < 1:
        raise CLIError(f"kernel in {path} must be a 2-D array, got shape {kernel.shape}")
    if not np.isfinite(kernel).all() or (kernel < 0).any():
        raise CLIError(f"kernel in {path} must be finite and non-negative")
    total = kernel.sum()
    if total <= 0:
        raise CLIError(f"kernel in {path} is all zeros")
    return (kernel / total).astype(np.float32)


def _is_output_name(path: Path) -> bool:
    return any(path.stem.endswith(suffix) for suffix in OUTPUT_SUFFIXES)


def collect_inputs(inputs: list[str]) -> list[Path]:
    """Files as given, folders expanded to their images (sorted, not recursive; this tool's outputs skipped)."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            skipped = [p for p in found if _is_output_name(p)]
            found = [p for p in found if not _is_output_name(p)]
            if skipped:
                _note(f"skipped {len(skipped)} file(s) in {path} that look like outputs of this tool "
                      f"(*{', *'.join(OUTPUT_SUFFIXES)})")
            if not found:
                raise CLIError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {path}")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        elif path.exists():
            raise CLIError(f"input is neither a file nor a folder: {path}")
        else:
            raise CLIError(f"input not found: {path}")
    unique: list[Path] = []
    seen: set[Path] = set()
    for path in paths:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def _output_stems(paths: list[Path]) -> list[str]:
    """One output name per input: the file stem, with ``_2``, ``_3``... when two inputs share a stem."""
    stems, counts = [], {}
    for path in paths:
        stem = path.stem
        counts[stem] = counts.get(stem, 0) + 1
        stems.append(stem if counts[stem] == 1 else f"{stem}_{counts[stem]}")
    return stems


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError("--device cuda was asked for but CUDA is not available (torch "
                       f"{torch.__version__}); use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise CLIError("--device mps was asked for but MPS is not available; use --device cpu or auto")
    return name


def _model_help(path: str) -> str:
    from . import DEFAULT_MODEL

    if os.path.abspath(path) == os.path.abspath(DEFAULT_MODEL):
        return ("The default model is shipped inside the package (diffusers_blind/default_model); reinstall "
                "from a complete checkout (`pip install -e .`) or pass --model PATH to a pipeline folder "
                "written by FastEMDeblurPipeline.save_pretrained.")
    return ("Pass --model PATH to a folder written by FastEMDeblurPipeline.save_pretrained (it holds "
            "model_index.json, unet/, scheduler/ and kernel_estimator/), or leave --model out to use the "
            "default model shipped with the package.")


def load_pipeline(path: str, device: str, quiet: bool = False):
    from diffusers.utils import logging as diffusers_logging

    from . import FastEMDeblurPipeline

    folder = Path(path)
    if not folder.exists():
        raise CLIError(f"model folder not found: {path}. {_model_help(path)}")
    if not folder.is_dir() or not (folder / "model_index.json").is_file():
        raise CLIError(f"model folder {path} is incomplete (no model_index.json). {_model_help(path)}")
    bars_were_enabled = diffusers_logging.is_progress_bar_enabled()
    if quiet:
        diffusers_logging.disable_progress_bar()  # the "Loading pipeline components" bar
    try:
        pipe = FastEMDeblurPipeline.from_pretrained(str(folder))
    except Exception as error:  # corrupt or partial folders raise many kinds of errors
        raise CLIError(f"cannot load the pipeline from {path}: {type(error).__name__}: {error}. "
                       f"{_model_help(path)}") from None
    finally:
        if quiet and bars_were_enabled:
            diffusers_logging.enable_progress_bar()
    return pipe.to(device)


# ---------------------------------------------------------------------------- deblur
def _uncertainty_image(std: np.ndarray) -> PIL.Image.Image:
    """The per-pixel std map scaled by its maximum to 8-bit grayscale (white = most uncertain)."""
    peak = float(std.max()) if std.size else 0.0
    scaled = std / peak if peak > 0 else np.zeros_like(std)
    return PIL.Image.fromarray((np.clip(scaled, 0, 1) * 255).round().astype(np.uint8), mode="L")


def cmd_deblur(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from .image_processor import kernel_to_image

    guidance, diffusion_em = METHODS[args.method]
    if args.em_iterations is not None and not diffusion_em:
        raise CLIError("--em-iterations only applies to --method diffusion-em")
    em_iterations = (args.em_iterations or DEFAULT_EM_ITERATIONS) if diffusion_em else None
    known_kernel = None
    if args.kernel is not None:
        if diffusion_em:
            raise CLIError("--kernel (non-blind deblurring) cannot be combined with --method diffusion-em, "
                           "which estimates the kernel")
        known_kernel = load_kernel_file(Path(args.kernel))
        if args.kernel_size is not None and args.kernel_size != known_kernel.shape[-1]:
            raise CLIError(f"--kernel-size {args.kernel_size} does not match the kernel in {args.kernel} "
                           f"({known_kernel.shape[0]}x{known_kernel.shape[1]})")

    paths = collect_inputs(args.inputs)
    images = [load_image(path) for path in paths]  # fail on unreadable files before the slow model load

    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise CLIError(f"output must be a folder, but {out_dir} is a file")
    device = resolve_device(args.device)
    same_folder = [p for p in paths if out_dir.exists() and p.parent.resolve() == out_dir.resolve()]
    if any((p.with_name(f"{p.stem}_kernel.npy")).exists() or p.with_suffix(".json").exists() for p in same_folder):
        _note(f"{out_dir} holds the inputs and their *_kernel.npy / .json files (e.g. from `blur`); "
              "they will be replaced by this run's estimates")
    if guidance == "dps" and args.steps < PAPER_DPS_STEPS:
        _note(f"the paper runs DPS guidance with {PAPER_DPS_STEPS} steps; running {args.steps} as asked "
              f"(pass --steps {PAPER_DPS_STEPS} for the paper's setting)")

    start = time.perf_counter()
    pipe = load_pipeline(args.model, device, quiet=args.quiet)
    load_seconds = time.perf_counter() - start
    if known_kernel is None and pipe.kernel_estimator is None:
        raise CLIError(f"the model in {args.model} has no kernel_estimator, so it can only deblur with a "
                       "known kernel: pass --kernel FILE")
    out_dir.mkdir(parents=True, exist_ok=True)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    model_path = str(Path(args.model).resolve())
    several = len(paths) > 1
    if args.quiet:
        pipe.set_progress_bar_config(disable=True)
    outer = tqdm(total=len(paths), desc="images", unit="img", position=0, disable=args.quiet or not several)

    failures = 0
    for path, stem, (array, mode) in zip(paths, _output_stems(paths), images):
        if not args.quiet:
            pipe.set_progress_bar_config(desc=stem, position=1 if several else 0, leave=not several)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        height, width = array.shape[:2]
        start = time.perf_counter()
        try:
            out = pipe(
                array,
                sigma=args.sigma,
                kernel=known_kernel,
                num_inference_steps=args.steps,
                guidance=guidance,
                guidance_scale=args.guidance_scale,
                kernel_size=args.kernel_size,
                num_particles=args.particles,
                em_iterations=em_iterations,
                generator=generator,
                output_type="pil",
            )
        except (ValueError, RuntimeError) as error:  # bad sizes, divergence, out of memory
            failures += 1
            hint = ""
            if "out of memory" in str(error).lower():
                hint = " (try fewer --particles, a smaller image or --device cpu)"
            print(f"diffusers-blind: error: {path}: {error}{hint}", file=sys.stderr)
            outer.update()
            continue
        seconds = time.perf_counter() - start

        files = {
            "image": out_dir / f"{stem}_deblurred.png",
            "kernel_png": out_dir / f"{stem}_kernel.png",
            "kernel_npy": out_dir / f"{stem}_kernel.npy",
        }
        out.images[0].save(files["image"])
        kernel = np.asarray(out.kernels[0], dtype=np.float32)
        np.save(files["kernel_npy"], kernel)
        kernel_to_image(torch.from_numpy(kernel), scale=KERNEL_PREVIEW_SCALE).save(files["kernel_png"])
        uncertainty = None
        if out.uncertainty is not None:
            std = np.asarray(out.uncertainty[0], dtype=np.float32)
            files["uncertainty_png"] = out_dir / f"{stem}_uncertainty.png"
            files["uncertainty_npy"] = out_dir / f"{stem}_uncertainty.npy"
            _uncertainty_image(std).save(files["uncertainty_png"])
            np.save(files["uncertainty_npy"], std)
            uncertainty = {"max": float(std.max()), "mean": float(std.mean()),
                           "note": "per-pixel std over particles in [0, 1] units; the PNG is divided by max"}
        sigma_used = float(out.sigma[0])
        record = {
            "input": str(path),
            "outputs": {name: str(file) for name, file in files.items()},
            "image_size": {"width": width, "height": height},
            "input_mode": mode,
            "output_mode": out.images[0].mode,
            "sigma": sigma_used,
            "sigma_estimated": args.sigma == "auto",
            "kernel_size": int(kernel.shape[-1]),
            "settings": {
                "method": args.method,
                "guidance": guidance,
                "blind": known_kernel is None,
                "kernel_file": str(args.kernel) if args.kernel is not None else None,
                "sigma": args.sigma,
                "steps": args.steps,
                "particles": args.particles,
                "kernel_size": args.kernel_size,
                "em_iterations": em_iterations,
                "guidance_scale": args.guidance_scale,
                "seed": seed,
                "device": device,
            },
            "uncertainty": uncertainty,
            "model": model_path,
            "timings": {"load_seconds": round(load_seconds, 4), "image_seconds": round(seconds, 4)},
            "versions": _versions(),
        }
        files_json = out_dir / f"{stem}.json"
        _write_json(files_json, record)
        sigma_text = f"{sigma_used:.2f} (estimated)" if args.sigma == "auto" else f"{sigma_used:g}"
        if not args.quiet:
            _say(f"{path} -> {files['image']}  [sigma {sigma_text}, kernel {kernel.shape[-1]}x{kernel.shape[-1]}, "
                 f"{seconds:.1f} s]")
        outer.update()
    outer.close()
    if failures:
        print(f"diffusers-blind: error: {failures} of {len(paths)} image(s) failed", file=sys.stderr)
        return 2
    return 0


# ---------------------------------------------------------------------------- blur
def cmd_blur(args) -> int:
    import torch

    from .image_processor import kernel_to_image
    from .ops import fft_blur, gaussian_kernel, motion_kernel, spatial_blur

    sharp_path = Path(args.sharp)
    if not sharp_path.is_file():
        raise CLIError(f"input not found: {sharp_path}" if not sharp_path.exists() else f"not a file: {sharp_path}")
    out_path = Path(args.output)
    if out_path.suffix == "":
        out_path = out_path.with_suffix(".png")
    if out_path.suffix.lower() != ".png":
        raise CLIError(f"the blurry output is written as a lossless PNG: use a .png name, not {out_path.name}")
    if out_path.resolve() == sharp_path.resolve():
        raise CLIError("the output would overwrite the sharp input; choose another -o name")
    array, mode = load_image(sharp_path)
    height, width = array.shape[:2]

    generator = torch.Generator().manual_seed(args.seed)
    settings = {"kernel": args.kernel}
    if args.kernel == "motion":
        kernel = motion_kernel(args.kernel_size, args.intensity, generator)
        settings.update(kernel_size=args.kernel_size, intensity=args.intensity)
    elif args.kernel == "gaussian":
        if args.gaussian_std <= 0:
            raise CLIError(f"--gaussian-std must be positive, got {args.gaussian_std}")
        kernel = gaussian_kernel(args.kernel_size, args.gaussian_std)
        settings.update(kernel_size=args.kernel_size, gaussian_std=args.gaussian_std)
    else:
        kernel_file = Path(args.kernel)
        if not kernel_file.exists():
            raise CLIError(f"--kernel must be 'motion', 'gaussian' or a kernel file (.npy or image); "
                           f"{args.kernel!r} not found")
        kernel = torch.from_numpy(load_kernel_file(kernel_file))[None, None]
        settings.update(kernel="file", kernel_file=str(kernel_file), kernel_size=int(kernel.shape[-1]))
    kh, kw = kernel.shape[-2:]
    if kh > height or kw > width or (args.mode == "reflect" and max(kh, kw) // 2 >= min(height, width)):
        raise CLIError(f"the {kh}x{kw} kernel is too large for the {width}x{height} image; "
                       "use a smaller --kernel-size")

    x = torch.from_numpy(array)
    x = x[None, None] if x.ndim == 2 else x.permute(2, 0, 1)[None]
    if args.mode == "circular":  # the paper's model: y = k ⊛ x with periodic boundaries (FFT)
        blurred = fft_blur(x, kernel)
    else:  # true convolution = correlation with the flipped kernel, mirrored boundaries
        blurred = spatial_blur(x, kernel.flip(-2, -1), padding="reflect")
    noise = torch.randn(blurred.shape, generator=generator, dtype=blurred.dtype) * (args.sigma / 255.0)
    noisy = (blurred + noise).clamp(0, 1)
    quantised = (noisy[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if quantised.shape[-1] == 1:
        PIL.Image.fromarray(quantised[..., 0], mode="L").save(out_path)
    else:
        PIL.Image.fromarray(quantised, mode="RGB").save(out_path)

    kernel_npy = out_path.with_name(f"{out_path.stem}_kernel.npy")
    kernel_png = out_path.with_name(f"{out_path.stem}_kernel.png")
    kernel_2d = kernel[0, 0].float()
    np.save(kernel_npy, kernel_2d.numpy())
    kernel_to_image(kernel_2d, scale=KERNEL_PREVIEW_SCALE).save(kernel_png)
    settings.update(sigma=args.sigma, seed=args.seed, mode=args.mode)
    record = {
        "sharp": str(sharp_path),
        "output": str(out_path),
        "kernel_npy": str(kernel_npy),
        "kernel_png": str(kernel_png),
        "image_size": {"width": width, "height": height},
        "input_mode": mode,
        "settings": settings,
        "degradation": "y = k * x + n: true convolution with the kernel in kernel_npy "
                 f"({'periodic' if args.mode == 'circular' else 'mirrored'} boundaries), Gaussian noise of std "
                 "sigma/255, clipped to [0, 1], 8-bit",
        "versions": _versions(),
    }
    _write_json(out_path.with_suffix(".json"), record)
    print(f"{sharp_path} -> {out_path}  [kernel {kh}x{kw} ({settings['kernel']}), sigma {args.sigma:g}, "
          f"seed {args.seed}, {args.mode}]; true kernel in {kernel_npy}")
    return 0


# ---------------------------------------------------------------------------- info
def cmd_info(args) -> int:
    import torch

    from . import DEFAULT_MODEL

    versions = _versions()
    model = Path(DEFAULT_MODEL)
    complete = (model / "model_index.json").is_file()
    components = sorted(p.name for p in model.iterdir() if p.is_dir()) if model.is_dir() else []
    print(f"diffusers_blind {versions['diffusers_blind']}")
    print(f"default model:  {model}")
    print(f"  complete:     {'yes' if complete else 'no (no model_index.json)'}"
          + (f"; components: {', '.join(components)}" if components else ""))
    print(f"torch {versions['torch']}, diffusers {versions['diffusers']}, python {platform.python_version()}")
    if torch.cuda.is_available():
        print(f"device: cuda ({torch.cuda.get_device_name(0)}); `--device auto` uses it")
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        print("device: mps; `--device auto` uses it")
    else:
        print(f"device: cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads); no GPU found")
    return 0


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from . import DEFAULT_MODEL, __version__

    parser = argparse.ArgumentParser(
        prog="diffusers-blind",
        description="Blind image deblurring with Fast Diffusion EM (diffusers pipelines).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    deblur = commands.add_parser(
        "deblur",
        help="deblur images and estimate their blur kernels",
        description="Deblur each image and estimate its blur kernel. For every input writes into OUT_DIR: "
        "<stem>_deblurred.png, <stem>_kernel.png (enlarged preview), <stem>_kernel.npy, <stem>.json "
        "(settings, sigma, timings) and, with --particles > 1, <stem>_uncertainty.png/.npy.",
    )
    deblur.add_argument("inputs", nargs="+", metavar="INPUT",
                        help=f"image files or folders (all {'/'.join(IMAGE_EXTENSIONS)} inside, sorted)")
    deblur.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="output folder (created)")
    deblur.add_argument("--sigma", type=_sigma_arg, default=10.0,
                        help="noise std of the input in 8-bit levels, or 'auto' to estimate it (default 10)")
    deblur.add_argument("--steps", type=_positive_int, default=100, help="diffusion steps (default 100)")
    deblur.add_argument("--particles", type=_positive_int, default=1,
                        help="posterior samples averaged per image; > 1 also writes an uncertainty map (default 1)")
    deblur.add_argument("--kernel-size", type=_positive_int, default=None,
                        help="size of the estimated kernel (default: the model's, 33 for the shipped one)")
    deblur.add_argument("--method", choices=sorted(METHODS), default="fastem-pigdm",
                        help="fastem-pigdm (default), fastem-dps, or diffusion-em (slower: several full runs)")
    deblur.add_argument("--em-iterations", type=_positive_int, default=None,
                        help=f"full runs of --method diffusion-em (default {DEFAULT_EM_ITERATIONS})")
    deblur.add_argument("--guidance-scale", type=_non_negative_float, default=None,
                        help="multiplier of the paper's guidance step size (default 1)")
    deblur.add_argument("--model", default=DEFAULT_MODEL,
                        help="pipeline folder (default: the model shipped with the package)")
    deblur.add_argument("--seed", type=int, default=None,
                        help="random seed (default: random; the seed used is recorded in the JSON)")
    deblur.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")
    deblur.add_argument("--kernel", default=None, metavar="FILE",
                        help="non-blind: the known blur kernel as .npy or a grayscale image read pixel for pixel "
                        "(normalised to sum 1; use *_kernel.npy, not the enlarged *_kernel.png previews)")
    deblur.add_argument("-q", "--quiet", action="store_true", help="no progress bars or per-image lines")
    deblur.set_defaults(func=cmd_deblur)

    blur = commands.add_parser(
        "blur",
        help="make a blurry, noisy test input from a sharp image",
        description="Blur a sharp image with a known kernel (true convolution), add Gaussian noise, clip to "
        "[0, 1] and save an 8-bit PNG at OUT, with the kernel beside it as <OUT stem>_kernel.npy/.png and "
        "the settings as <OUT stem>.json.",
    )
    blur.add_argument("sharp", metavar="SHARP", help="the sharp image")
    blur.add_argument("-o", "--output", required=True, metavar="OUT", help="the blurry PNG to write")
    blur.add_argument("--kernel", default="motion", metavar="motion|gaussian|FILE",
                      help="random camera-shake kernel (default), isotropic Gaussian, or a kernel file (.npy/image)")
    blur.add_argument("--kernel-size", type=_positive_int, default=33, help="kernel size (default 33)")
    blur.add_argument("--intensity", type=float, default=0.5, help="motion kernel intensity in [0, 1] (default 0.5)")
    blur.add_argument("--gaussian-std", type=float, default=2.0, help="Gaussian kernel std in pixels (default 2.0)")
    blur.add_argument("--sigma", type=_noise_sigma_arg, default=10.0,
                      help="noise std in 8-bit levels (default 10)")
    blur.add_argument("--seed", type=int, default=0, help="seed of the kernel and the noise (default 0)")
    blur.add_argument("--mode", choices=("reflect", "circular"), default="reflect",
                      help="boundaries: reflect (realistic, default) or circular (the paper's FFT model)")
    blur.set_defaults(func=cmd_blur)

    info = commands.add_parser("info", help="show versions, the default model and the device")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 usage or input error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version and argparse errors
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    if args.command == "blur" and args.kernel == "motion" and not 0 <= args.intensity <= 1:
        print(f"diffusers-blind: error: --intensity must be in [0, 1], got {args.intensity}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except CLIError as error:
        print(f"diffusers-blind: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffusers-blind: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
