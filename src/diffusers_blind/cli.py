"""The ``diffusers-blind`` command line: deblur photos, make blurry test inputs, show the install.

Subcommands::

    diffusers-blind deblur INPUT... -o OUT_DIR [--sigma 10|auto] [--steps 50] [--particles 1] ...
    diffusers-blind blur SHARP -o OUT.png [--kernel motion|gaussian|FILE] [--sigma 10] [--seed 0] ...
    diffusers-blind blur SHARP -o OUT.png --turbulence [--max-tilt 2.5] ...   (tilt, then blur)
    diffusers-blind info

``main(argv)`` returns the exit code: 0 on success, 2 for a usage or input problem (missing
file, unreadable image, missing model folder, ...), reported as one line on stderr.
Also runnable as ``python -m diffusers_blind.cli``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import numbers
import os
import platform
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import PIL.Image


from .io import IMAGE_EXTENSIONS, is_16bit_mode
from .outputs import (  # noqa: F401  (output_stems: part of the command line's helpers)
    BLUR_FILES,
    OUTPUT_SUFFIXES,
    claimed_stems,
    finished_record,
    incomplete_record,
    input_digest,
    is_deblur_record,
    output_stems,
    plan_outputs,
    record_is_for,
    remove_stale,
    settings_differences,
    write_outputs,
)
KERNEL_PREVIEW_SCALE = 8
DEFAULT_SIGMA = 10.0  # deblur's noise level in 8-bit levels when --sigma is not given


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
    from .methods import positive_int

    return positive_int(value)


def _versions() -> dict:
    import diffusers
    import torch

    from . import __version__

    return {"diffusers_blind": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__}


def _write_json(path: Path, data: dict) -> None:
    from .io import save_json

    save_json(data, path)


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
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = read_image(path)
    except ValueError as error:
        raise CLIError(str(error)) from None
    for warning in caught:  # e.g. a float image rescaled from [0, 255]
        _note(str(warning.message))
    return result


def load_kernel_file(path: Path) -> np.ndarray:
    """A known blur kernel from ``.npy`` (2-D, any singleton leading axes) or an image (read pixel for pixel).

    The kernel is made non-negative-checked and normalised to sum 1.
    """
    if not path.is_file():
        raise CLIError(f"kernel file not found: {path}")
    if path.suffix.lower() == ".npy":
        with open(path, "rb") as handle:
            if handle.read(6) != b"\x93NUMPY":
                raise CLIError(f"kernel file {path} is not a NumPy .npy array (save one with numpy.save)")
        try:
            kernel = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise CLIError(f"cannot read kernel file {path} as a NumPy .npy array: {error}") from None
        if not isinstance(kernel, np.ndarray) or kernel.dtype.kind not in "biuf":
            dtype = kernel.dtype if isinstance(kernel, np.ndarray) else type(kernel).__name__
            raise CLIError(f"kernel in {path} must hold real numbers, got {dtype}")
        kernel = kernel.astype(np.float64)
        while kernel.ndim > 2 and kernel.shape[0] == 1:
            kernel = kernel[0]
    else:
        _refuse_kernel_preview(path)
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


def _refuse_kernel_preview(path: Path) -> None:
    """The ``*_kernel.png`` files this tool writes are enlarged, max-normalised views: never read them as kernels."""
    from .image_processor import KERNEL_PREVIEW_KEY

    hint = f"pass the kernel itself, the .npy beside it ({path.with_suffix('.npy').name})"
    try:
        with PIL.Image.open(path) as image:
            if KERNEL_PREVIEW_KEY in getattr(image, "text", image.info):
                raise CLIError(f"{path} is an enlarged preview of a kernel, not the kernel; {hint}")
            small = image.width % KERNEL_PREVIEW_SCALE or image.height % KERNEL_PREVIEW_SCALE
            if small or min(image.size) < 2 * KERNEL_PREVIEW_SCALE:
                return
            pixels = np.asarray(image.convert("F"))
    except (OSError, ValueError, PIL.UnidentifiedImageError):
        return  # the image reader reports unreadable files
    blocks = pixels.reshape(pixels.shape[0] // KERNEL_PREVIEW_SCALE, KERNEL_PREVIEW_SCALE,
                            pixels.shape[1] // KERNEL_PREVIEW_SCALE, KERNEL_PREVIEW_SCALE)
    # every 8×8 block constant, not one flat image, peak 255 (max-normalised): a preview of an older version
    if pixels.max() == 255 and pixels.min() < pixels.max() and (blocks == blocks[:, :1, :, :1]).all():
        raise CLIError(f"{path} looks like a {KERNEL_PREVIEW_SCALE}x enlarged kernel preview (every "
                       f"{KERNEL_PREVIEW_SCALE}x{KERNEL_PREVIEW_SCALE} block is constant), not a kernel; {hint}")


def _is_output_name(path: Path) -> bool:
    return any(path.stem.endswith(suffix) for suffix in OUTPUT_SUFFIXES)


def _recorded_outputs(folder: Path) -> set[str]:
    """Names of the files this tool's records in ``folder`` list as written: every output of a ``deblur``
    record (``<stem>.json``) and the kernel preview of a ``blur`` record (``<stem>_blur.json``)."""
    names: set[str] = set()
    for path in folder.glob("*.json"):
        try:
            record = json.loads(path.read_text()) if path.stat().st_size < 1 << 20 else None
            if is_deblur_record(path):
                names.update(Path(file).name for file in record["outputs"].values())
            elif isinstance(record, dict) and isinstance(record.get("kernel_png"), str) and "sharp" in record:
                names.add(Path(record["kernel_png"]).name)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return names


def _is_tool_output(path: Path, recorded: set[str]) -> bool:
    """An image in a scanned folder that this tool wrote: listed in a record, or marked as a kernel preview."""
    if not _is_output_name(path):
        return False
    if path.name in recorded:
        return True
    from .image_processor import KERNEL_PREVIEW_KEY

    try:
        with PIL.Image.open(path) as image:
            return KERNEL_PREVIEW_KEY in getattr(image, "text", image.info)
    except (OSError, ValueError, PIL.UnidentifiedImageError):
        return False


def collect_inputs(inputs: list[str]) -> list[Path]:
    """Files as given, folders expanded to their images (sorted, not recursive; this tool's outputs skipped)."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            # skipped only when a record of this tool lists it (or it is a marked kernel preview): a photo of the
            # user's named like an output stays an input, and so is never replaced by an output
            recorded = _recorded_outputs(path) if any(_is_output_name(p) for p in found) else set()
            skipped = [p for p in found if _is_tool_output(p, recorded)]
            found = [p for p in found if p not in skipped]
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


def resolve_device(name: str) -> str:
    """``auto`` → cuda, mps or cpu; anything else must name a device torch knows and this machine has."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {name!r} is not a device: use cpu, cuda, cuda:N, mps or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError("--device cuda was asked for but CUDA is not available (torch "
                           f"{torch.__version__}); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise CLIError("--device mps was asked for but MPS is not available; use --device cpu or auto")
    elif device.type != "cpu":
        raise CLIError(f"--device {name!r} is not supported here: use cpu, cuda, cuda:N, mps or auto")
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


def load_pipeline(path: str, device: str, quiet: bool = False, pipeline_class=None):
    """``pipeline_class.from_pretrained(path).to(device)`` (default: Fast EM); any failure is one clear ``CLIError``."""
    from diffusers.utils import logging as diffusers_logging

    from . import FastEMDeblurPipeline

    pipeline_class = pipeline_class or FastEMDeblurPipeline

    folder = Path(path)
    if not folder.exists():
        raise CLIError(f"model folder not found: {path}. {_model_help(path)}")
    if not folder.is_dir() or not (folder / "model_index.json").is_file():
        raise CLIError(f"model folder {path} is incomplete (no model_index.json). {_model_help(path)}")
    bars_were_enabled = diffusers_logging.is_progress_bar_enabled()
    if quiet:
        diffusers_logging.disable_progress_bar()  # the "Loading pipeline components" bar
    try:
        pipe = pipeline_class.from_pretrained(str(folder))
        pipe = pipe.to(device)
    except Exception as error:  # corrupt or partial folders, bad configs, out of memory: many kinds of errors
        hint = " Not enough memory: try --device cpu or a smaller model." if is_out_of_memory(error) else ""
        raise CLIError(f"cannot load the pipeline from {path}: {type(error).__name__}: {error}.{hint} "
                       f"{_model_help(path)}") from None
    finally:
        if quiet and bars_were_enabled:
            diffusers_logging.enable_progress_bar()
    return pipe


# ---------------------------------------------------------------------------- deblur
def method_options(method, args) -> dict:
    """The values of ``method``'s options from ``args``; an error for a flag given to a method without it."""
    from .methods import all_options

    for name, option in all_options().items():
        if name not in method.option_names and getattr(args, name, None) is not None:
            owners = [m.name for m in _methods().values() if name in m.option_names]
            raise CLIError(f"{option.cli_flag} does not apply to --method {method.name} "
                           f"(an option of: {', '.join(owners)})")
    from .methods import with_default_steps

    values = {o.name: (o.default if getattr(args, o.name) is None else getattr(args, o.name)) for o in method.options}
    if method.check_options is not None:  # combinations that cannot run: refused before any file is touched
        try:
            method.check_options(values)
        except ValueError as error:
            raise CLIError(f"--method {method.name}: {error}") from None
    return with_default_steps(method, values)


def _methods() -> dict:
    from .methods import METHODS

    return METHODS


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's, MPS's and the CPU allocator's out-of-memory errors."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    text = str(error).lower()
    return any(p in text for p in ("out of memory", "can't allocate memory", "not enough memory",
                                   "cannot allocate memory", "failed to allocate"))


BLUR_KERNEL_SIZE, BLUR_INTENSITY, BLUR_GAUSSIAN_STD = 33, 0.5, 2.0  # `blur`'s kernel defaults


def _check_blur_kernel_flags(args) -> None:
    """Refuse a kernel flag that the chosen ``--kernel`` would ignore (instead of silently dropping it)."""
    kind = args.kernel if args.kernel in ("motion", "gaussian") else "a kernel file"
    ignored = {"motion": ("gaussian_std",), "gaussian": ("intensity",),
               "a kernel file": ("intensity", "gaussian_std", "kernel_size")}[kind]
    given = ["--" + name.replace("_", "-") for name in ignored if getattr(args, name, None) is not None]
    if given:
        raise CLIError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to --kernel "
                       f"{args.kernel if kind != 'a kernel file' else 'FILE (the file sets the kernel)'}")


def _error(message: str) -> None:
    print(f"diffusers-blind: error: {message}", file=sys.stderr)


# options that only steer the kernel estimate of a blind run: refused beside ``--kernel``
# (`--guard` is accepted and recorded as not applied: no guard runs when the kernel is given)
BLIND_ONLY_OPTIONS = ("kernel_init", "m_step_start", "kernel_anchor", "num_scales")


def _known_kernel(method, options: dict, args) -> np.ndarray | None:
    """The ``--kernel`` file, checked against the method and ``--kernel-size``; ``None`` for a blind run."""
    if args.kernel is None:
        if method.needs_kernel:
            raise CLIError(f"--method {method.name} deblurs with the true kernel: pass --kernel FILE")
        return None
    if not (method.needs_kernel or method.accepts_kernel):
        raise CLIError(f"--kernel (non-blind deblurring) cannot be combined with --method {method.name}, "
                       "which estimates the kernel")
    from .methods import all_options

    options_of = all_options()
    given = [options_of[name].cli_flag for name in BLIND_ONLY_OPTIONS
             if name in method.option_names and getattr(args, name, None) is not None]
    if given:
        raise CLIError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply with --kernel: "
                       "they steer the kernel estimate of a blind run, and a given kernel is not estimated")
    kernel = load_kernel_file(Path(args.kernel))
    if args.kernel_size is not None and options.get("kernel_size") != kernel.shape[-1]:
        raise CLIError(f"--kernel-size {args.kernel_size} does not match the kernel in {args.kernel} "
                       f"({kernel.shape[0]}x{kernel.shape[1]})")
    return kernel


def _plan_jobs(args, paths: list[Path], out_dir: Path, settings: dict) -> tuple[list, dict[Path, str]]:
    """``(input, output files)`` pairs to run and the unreadable inputs, applying the rerun rule.

    With ``--skip-existing`` a finished image is kept only if it was made with the same ``settings``.
    """
    from .io import ImageReadError, probe_image

    try:
        plans = plan_outputs(paths, out_dir, [Path(args.kernel)] if args.kernel else [],
                             claimed_stems(out_dir, paths) if args.skip_existing else None)
    except ValueError as error:
        raise CLIError(str(error)) from None
    unreadable: dict[Path, str] = {}
    for path in paths:  # headers only (size, format): pixels are decoded one image at a time later
        try:
            probe_image(path)
        except ImageReadError as error:
            unreadable[path] = str(error)
    if len(unreadable) == len(paths):
        messages = list(unreadable.values())
        for message in messages[:-1]:
            _error(message)
        raise CLIError(messages[-1] if len(paths) == 1 else f"{messages[-1]}; none of the {len(paths)} inputs can be read")
    jobs = [(path, plan) for path, plan in zip(paths, plans) if path not in unreadable]
    if args.skip_existing:
        finished = {path: finished_record(plan) for path, plan in jobs}
        done = [path for path, record in finished.items() if record is not None]
        for path in done:
            if not record_is_for(finished[path], path):  # names kept by claimed_stems: a guard
                raise CLIError(f"{out_dir} holds a result of another input ({finished[path].get('input')}) under the "
                               f"name {path.name} gets; use --overwrite or another -o")
            differences = settings_differences(finished[path], settings)
            if differences:
                raise CLIError(f"{out_dir} holds a result of {path.name} made with other settings "
                               f"({'; '.join(differences)}); use the same settings, --overwrite, or another -o")
        jobs = [(path, plan) for path, plan in jobs if path not in done]
        foreign = [plan["record"] for _, plan in jobs if plan["record"].exists() and not is_deblur_record(plan["record"])]
        if foreign:  # e.g. a file of the user's, or another tool's record, that happens to carry the name
            raise CLIError(f"{foreign[0]} is not a record of diffusers-blind deblur, and running would replace it "
                           f"({len(foreign)} such file(s)); pass --overwrite to replace, or choose another -o")
        unrecorded = [file for _, plan in jobs if not plan["record"].exists()
                      for name, file in plan.items() if name != "record" and file.exists()]
        if unrecorded:  # no deblur record claims them: files of the user's that carry an output's name
            raise CLIError(f"{unrecorded[0]} exists but no deblur record in {out_dir} lists it, and running would "
                           f"replace it ({len(unrecorded)} such file(s)); move it away, pass --overwrite to replace, "
                           "or choose another -o")
        if done:
            _note(f"skipping {len(done)} image(s) already deblurred in {out_dir} (--skip-existing)")
    elif not args.overwrite:
        existing = [file for _, plan in jobs for file in plan.values() if file.exists()]
        if existing:
            shown = ", ".join(file.name for file in existing[:4]) + (" ..." if len(existing) > 4 else "")
            raise CLIError(f"{out_dir} already holds {len(existing)} file(s) with the names this run writes ({shown}); "
                           "pass --overwrite to replace them, or --skip-existing to keep finished images")
    return jobs, unreadable


def shipped_model_alias(model: str | None, method) -> str | None:
    """``--model fast`` names the shipped fast Fast EM folder (unless a folder ``fast`` exists here)."""
    if model != "fast" or Path(model).exists():
        return model
    from . import FAST_MODEL
    from .pipelines.fast_em import FastEMDeblurPipeline

    if method.pipeline_class is not FastEMDeblurPipeline:
        raise CLIError(f"--model fast is the fast Fast EM model; --method {method.name} does not load a Fast EM pipeline")
    return FAST_MODEL


def _used_settings(pipe, options: dict) -> dict:
    """The values ``settings`` left to the model: the guidance multiplier of the pipeline's last call, and the
    diffusion step count asked for, with the pipeline's default filled in (``--strength``, ``--num-scales`` and
    ``--em-iterations``, recorded in ``settings``, say how many of those steps ran and at which scale)."""
    used = {}
    scale = getattr(pipe, "guidance_scale", None) if pipe is not None else None
    if isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        used["guidance_scale"] = float(scale)
    if "steps" in options and pipe is not None:
        steps = options["steps"]
        if steps is None:
            default = inspect.signature(pipe.__call__).parameters.get("num_inference_steps")
            steps = None if default is None else default.default
        if isinstance(steps, int) and not isinstance(steps, bool):
            used["steps"] = steps
    return used


def _record(path, mode, array, image, result, written, seconds, run: dict, args) -> dict:
    """The ``<stem>.json`` of one image: inputs, outputs, σ, settings, timings, versions."""
    height, width = array.shape[:2]
    uncertainty = None
    if result.uncertainty is not None:
        std = result.uncertainty.float()
        uncertainty = {"max": float(std.max()), "mean": float(std.mean()),
                       "note": "per-pixel std over particles in [0, 1] units; the PNG is divided by max"}
    method = run["method"]
    return {
        "input": str(path),
        "input_sha256": input_digest(path),
        "outputs": {name: str(file) for name, file in written.items()},
        "image_size": {"width": width, "height": height},
        "input_mode": mode,
        "output_mode": image.mode if not is_16bit_mode(mode) else ("I;16" if image.mode == "L" else f"{image.mode};16"),
        "sigma": result.sigma,
        "sigma_estimated": args.sigma == "auto",
        "kernel_size": int(result.kernel.shape[-1]) if result.kernel is not None else None,
        "fallback": result.fallback,  # the guard returned the input: the blind estimate did not explain the photo or collapsed
        "fit": result.fit,
        "settings": {
            "method": method.name,
            **method.info,
            "blind": run["known_kernel"] is None,
            "kernel_file": str(args.kernel) if args.kernel is not None else None,
            "sigma": args.sigma,
            **{name: args.kernel_size if name == "kernel_size" else value for name, value in run["options"].items()},
            "seed": run["seed"],
            "device": run["device"],
        },
        "used": _used_settings(run["pipe"], run["options"]),
        "uncertainty": uncertainty,
        "model": str(Path(run["model"]).resolve()) if run["pipe"] is not None else None,
        "timings": {"load_seconds": round(run["load_seconds"], 4), "image_seconds": round(seconds, 4)},
        "process": run["state"].process_index if run["state"] is not None else 0,
        "versions": _versions(),
    }


def _deblur_one(path: Path, plan: dict, run: dict, args) -> None:
    """Decode, restore and write one image; its record is written last."""
    import torch

    from .io import save_json

    processor = run["processor"]
    array, mode = load_image(path)  # decoded now, one at a time
    y = processor.preprocess(array).to(run["device"])
    if run["pipe"] is not None and not args.quiet:
        run["pipe"].set_progress_bar_config(desc=plan["record"].stem, position=1 if run["several"] else 0,
                                            leave=not run["several"])
    generator = torch.Generator(device="cpu").manual_seed(run["seed"])
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:  # the pipeline's warnings as one-line notes
        warnings.simplefilter("always", UserWarning)
        result = run["method"].run(y, sigma=args.sigma, kernel=run["kernel"], generator=generator,
                                   pipeline=run["pipe"], blur=None, **run["options"])
    seconds = time.perf_counter() - start
    for warning in caught:
        if issubclass(warning.category, UserWarning):
            _note(f"{path.name}: {warning.message}")
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    image = processor.numpy_or_pil(result.image.reshape(1, *result.image.shape[-3:]), "pil")[0]
    plan["record"].parent.mkdir(parents=True, exist_ok=True)
    # first a record that claims the files about to be written, so that a crash before the final record leaves
    # files that a --skip-existing resume knows as this tool's (and redoes), not as a user's
    save_json(incomplete_record(path, plan, run["method"].name), plan["record"])
    bit_depth = 16 if is_16bit_mode(mode) else 8  # a 16-bit photo keeps its depth
    written = write_outputs(plan, result, image, KERNEL_PREVIEW_SCALE, bit_depth=bit_depth)
    remove_stale(plan, keep={*written, "record"})  # an earlier run's files this run does not write (--overwrite)
    save_json(_record(path, mode, array, image, result, written, seconds, run, args), plan["record"])
    if not args.quiet:
        sigma = result.sigma
        sigma_text = "-" if sigma is None else f"{sigma:.2f} (estimated)" if args.sigma == "auto" else f"{sigma:g}"
        size = result.kernel.shape[-1] if result.kernel is not None else None
        fallback = ", the guard returned the input" if result.fallback else ""
        _say(f"{path} -> {plan['image']}  [sigma {sigma_text}, {f'kernel {size}x{size}' if size else 'no kernel'}, "
             f"{seconds:.1f} s{fallback}]")


def cmd_deblur(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from .image_processor import DeblurImageProcessor
    from .io import check_writable_folder

    method = _methods()[args.method]
    if args.sigma is None:
        args.sigma = DEFAULT_SIGMA
    elif not method.uses_sigma:
        _note(f"--method {method.name} does not use a noise level: --sigma {args.sigma} is ignored")
    options = method_options(method, args)
    device = resolve_device(args.device)
    if options.get("precision") == "auto":  # record what runs: bfloat16 where the device has it natively
        from .pipelines.tiling import auto_precision

        options["precision"] = auto_precision(device)
    known_kernel = _known_kernel(method, options, args)
    if known_kernel is not None and "guard" in options:
        options["guard"] = None  # recorded as not applied: the guard checks a blind estimate, a given kernel is not one
    paths = collect_inputs(args.inputs)
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise CLIError(f"output must be a folder, but {out_dir} is a file")
    settings = {"method": method.name, "kernel_file": str(args.kernel) if args.kernel is not None else None,
                "sigma": args.sigma, **{k: args.kernel_size if k == "kernel_size" else v for k, v in options.items()},
                **({"seed": args.seed} if args.seed is not None else {})}
    jobs, unreadable = _plan_jobs(args, paths, out_dir, settings)
    try:
        check_writable_folder(out_dir)
    except OSError as error:
        raise CLIError(str(error)) from None
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    state = _launched_state(device)
    if state is not None:  # accelerate launch / torchrun: each process deblurs its share of the images
        from accelerate.utils import broadcast_object_list

        state.wait_for_everyone()  # every process has checked the outputs before anyone writes one
        seed = broadcast_object_list([seed])[0]
        device = str(state.device) if args.device == "auto" else device
        with state.split_between_processes(jobs) as mine:
            jobs = list(mine)
        if not state.is_main_process:
            unreadable = {}  # reported once, by the main process
    for message in unreadable.values():
        _error(message)

    start = time.perf_counter()
    model = shipped_model_alias(args.model, method) or method.default_model
    pipe = None
    if method.pipeline_class is not None:
        if model is None:
            raise CLIError(f"--method {method.name} ships no default model: pass --model PATH (a folder written "
                           f"by {method.pipeline_class.__name__}.save_pretrained)")
        pipe = load_pipeline(model, device, quiet=args.quiet, pipeline_class=method.pipeline_class)
        if args.quiet:
            pipe.set_progress_bar_config(disable=True)
    load_seconds = time.perf_counter() - start
    if method.check is not None:
        try:
            notes = method.check(pipe, options, known_kernel is not None)
        except ValueError as error:
            raise CLIError(f"--method {method.name}: {error}") from None
        for note in notes:
            _note(note)
    run = dict(method=method, options=options, known_kernel=known_kernel, seed=seed, device=device, state=state,
               pipe=pipe, model=model, load_seconds=load_seconds, several=len(jobs) > 1,
               processor=DeblurImageProcessor(),
               kernel=torch.from_numpy(known_kernel)[None, None].to(device) if known_kernel is not None else None)

    failed = dict(unreadable)
    outer = tqdm(total=len(jobs), desc="images", unit="img", position=0, disable=args.quiet or len(jobs) < 2)
    for path, plan in jobs:
        try:
            _deblur_one(path, plan, run, args)
        except KeyboardInterrupt:
            raise
        except Exception as error:  # unreadable pixels, bad sizes, divergence, out of memory, a broken model
            hint = " (try fewer --particles, a smaller image or --device cpu)" if is_out_of_memory(error) else ""
            failed[path] = str(error) if isinstance(error, CLIError) else f"{path}: {type(error).__name__}: {error}{hint}"
            _error(failed[path])
            if args.overwrite:
                remove_stale(plan, keep=())  # no output of an earlier run may look like this run's
        outer.update()
    outer.close()
    if failed:
        where = f" (process {state.process_index})" if state is not None else ""
        _error(f"{len(failed)} of {len(paths)} image(s) failed{where}: {', '.join(str(p) for p in failed)}")
        return 2
    return 0


def _launched_state(device: str):
    """accelerate's ``PartialState`` when several processes were launched (``accelerate launch``,
    ``torchrun``), else ``None``. Without a GPU (or with ``--device cpu``) the processes use gloo on CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    return PartialState(cpu=device == "cpu" or not torch.cuda.is_available())


# ---------------------------------------------------------------------------- blur
def cmd_blur(args) -> int:
    import torch

    from .image_processor import kernel_to_image
    from .io import check_writable_folder, save_image, save_npy
    from .ops import fft_blur, gaussian_kernel, motion_kernel, spatial_blur, tilt_map, warp

    sharp_path = Path(args.sharp)
    if not sharp_path.is_file():
        raise CLIError(f"input not found: {sharp_path}" if not sharp_path.exists() else f"not a file: {sharp_path}")
    out_path = Path(args.output)
    if out_path.is_dir() or str(args.output).endswith(("/", os.sep)):
        raise CLIError(f"-o {args.output} is a folder: blur writes one image, so give its file name, "
                       f"e.g. -o {out_path / (sharp_path.stem + '_blurry.png')}")
    if out_path.suffix == "":
        out_path = out_path.with_suffix(".png")
    if out_path.suffix.lower() != ".png":
        raise CLIError(f"the blurry output is written as a lossless PNG: use a .png name, not {out_path.name}")
    kernel_npy, kernel_png, tilt_npy, record_json = (
        out_path.with_name(out_path.stem + BLUR_FILES[name]) for name in ("kernel_npy", "kernel_png", "tilt_npy", "record"))
    outputs = (out_path, kernel_npy, kernel_png, record_json) + ((tilt_npy,) if args.turbulence else ())
    protected = [sharp_path] + ([Path(args.kernel)] if args.kernel not in ("motion", "gaussian") else [])
    for file in outputs:
        if any(file.resolve() == p.resolve() for p in protected):
            raise CLIError(f"the output {file} would overwrite the input {file}; choose another -o name")
    existing = [file.name for file in outputs if file.exists()]
    if existing and not args.overwrite:
        raise CLIError(f"{', '.join(existing)} already exist(s) in {out_path.parent}; pass --overwrite to replace")
    if args.max_tilt is not None and not args.turbulence:
        raise CLIError("--max-tilt applies to --turbulence only")
    _check_blur_kernel_flags(args)
    max_tilt = 2.5 if args.max_tilt is None else args.max_tilt
    if not (math.isfinite(max_tilt) and max_tilt > 0):
        raise CLIError(f"--max-tilt must be a positive number of pixels, got {max_tilt}")
    array, mode = load_image(sharp_path)
    height, width = array.shape[:2]

    generator = torch.Generator().manual_seed(args.seed)
    settings = {"kernel": args.kernel}
    kernel_size = BLUR_KERNEL_SIZE if args.kernel_size is None else args.kernel_size
    if args.kernel == "motion":
        intensity = BLUR_INTENSITY if args.intensity is None else args.intensity
        kernel = motion_kernel(kernel_size, intensity, generator)
        settings.update(kernel_size=kernel_size, intensity=intensity)
    elif args.kernel == "gaussian":
        std = BLUR_GAUSSIAN_STD if args.gaussian_std is None else args.gaussian_std
        if not (math.isfinite(std) and std > 0):
            raise CLIError(f"--gaussian-std must be positive, got {std}")
        kernel = gaussian_kernel(kernel_size, std)
        settings.update(kernel_size=kernel_size, gaussian_std=std)
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
                       + ("use a smaller --kernel-size" if args.kernel in ("motion", "gaussian") else
                          "use a smaller kernel file or a larger image"))

    try:
        check_writable_folder(out_path.parent, create=True)
    except OSError as error:
        raise CLIError(str(error)) from None
    x = torch.from_numpy(array)
    x = x[None, None] if x.ndim == 2 else x.permute(2, 0, 1)[None]
    field = None
    if args.turbulence:  # tilt first: y = k * T_d(x) + n (bilinear warp, edge pixels repeated past the border)
        field = tilt_map(height, width, max_tilt=max_tilt, generator=np.random.default_rng([args.seed % 2**64, 1]))
        x = warp(x, field.to(x.dtype), padding="border")
    if args.mode == "circular":  # the paper's model: y = k ⊛ x with periodic boundaries (FFT)
        blurred = fft_blur(x, kernel)
    else:  # true convolution = correlation with the flipped kernel, mirrored boundaries
        blurred = spatial_blur(x, kernel.flip(-2, -1), padding="reflect")
    noise = torch.randn(blurred.shape, generator=generator, dtype=blurred.dtype) * (args.sigma / 255.0)
    noisy = (blurred + noise).clamp(0, 1)
    quantised = (noisy[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    if quantised.shape[-1] == 1:
        save_image(PIL.Image.fromarray(quantised[..., 0], mode="L"), out_path)
    else:
        save_image(PIL.Image.fromarray(quantised, mode="RGB"), out_path)
    kernel_2d = kernel[0, 0].float()
    save_npy(kernel_2d.numpy(), kernel_npy)
    save_image(kernel_to_image(kernel_2d, scale=KERNEL_PREVIEW_SCALE), kernel_png)
    settings.update(sigma=args.sigma, seed=args.seed, mode=args.mode)
    degradation = ("y = k * x + n: true convolution with the kernel in kernel_npy "
                   f"({'periodic' if args.mode == 'circular' else 'mirrored'} boundaries), Gaussian noise of std "
                   "sigma/255, clipped to [0, 1], 8-bit")
    if field is not None:
        save_npy(field[0].float().numpy(), tilt_npy)
        settings.update(turbulence=True, max_tilt=max_tilt)
        degradation = ("y = k * T_d(x) + n: x first tilted by the field d in tilt_npy ((2, H, W) float32, pixels; "
                       "channel 0 horizontal, 1 vertical; T_d(x)(i, j) = x(i + d[1, i, j], j + d[0, i, j]), bilinear, "
                       "edge pixels repeated), then " + degradation[len("y = k * x + n: "):])
    record = {
        "sharp": str(sharp_path),
        "output": str(out_path),
        "kernel_npy": str(kernel_npy),
        "kernel_png": str(kernel_png),
        "image_size": {"width": width, "height": height},
        "input_mode": mode,
        "settings": settings,
        **({"tilt_npy": str(tilt_npy)} if field is not None else {}),
        "degradation": degradation,
        "versions": _versions(),
    }
    _write_json(record_json, record)
    tilt_text = f", tilt up to {max_tilt:g} px" if field is not None else ""
    print(f"{sharp_path} -> {out_path}  [kernel {kh}x{kw} ({settings['kernel']}), sigma {args.sigma:g}, "
          f"seed {args.seed}, {args.mode}{tilt_text}]; true kernel in {kernel_npy}"
          + (f", tilt field in {tilt_npy}" if field is not None else ""))
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
    print(f"methods:        {', '.join(_methods())} (diffusers-blind deblur --method NAME)")
    if torch.cuda.is_available():
        print(f"device: cuda ({torch.cuda.get_device_name(0)}); `--device auto` uses it")
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        print("device: mps; `--device auto` uses it")
    else:
        print(f"device: cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads); no GPU found")
    return 0


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .methods import all_options

    parser = argparse.ArgumentParser(
        prog="diffusers-blind",
        description="Blind image deblurring with Fast Diffusion EM (diffusers pipelines).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    methods = _methods()
    method_lines = "; ".join(f"{name}: {m.description}" for name, m in methods.items())
    deblur = commands.add_parser(
        "deblur",
        help="deblur images (and estimate their blur kernels)",
        description="Deblur each image with --method and write into OUT_DIR, per input: <stem>_deblurred.png, "
        "<stem>_kernel.png (enlarged preview) and <stem>_kernel.npy for methods that estimate a kernel, "
        "<stem>.json (settings, sigma, timings; written last) and, with --particles > 1 (or dvsr averaging more than one "
        "sample), <stem>_uncertainty.png/.npy, and <stem>_tilt.npy for --method blind-dps-turbulence (the estimated tilt "
        "field, (2, H, W) in pixels). Inputs with the same stem get <stem>_2, <stem>_3... Output files that "
        "already exist are never replaced silently: pass --overwrite (an earlier run's files of an image are "
        "removed) or --skip-existing (images with a complete record are kept, the others run). Every file is "
        "written to a temporary name and renamed, so a crash never leaves a truncated file.",
    )
    deblur.add_argument("inputs", nargs="+", metavar="INPUT",
                        help=f"image files or folders (all {'/'.join(IMAGE_EXTENSIONS)} inside, sorted)")
    deblur.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="output folder (created)")
    deblur.add_argument("--method", choices=list(methods), default="fastem-pigdm", metavar="METHOD",
                        help=f"one of: {method_lines} (default fastem-pigdm)")
    deblur.add_argument("--sigma", type=_sigma_arg, default=None,
                        help="noise std of the input in 8-bit levels, or 'auto' to estimate it (default 10)")
    flags = {"-o", "--output", "--method", "--sigma"}
    for name, option in all_options(methods.values()).items():
        if option.cli_flag in flags:
            continue
        flags.add(option.cli_flag)
        owners = [m for m, record in methods.items() if name in record.option_names]
        scope = "" if len(owners) == len(methods) else f" [{', '.join(owners)}]"
        deblur.add_argument(option.cli_flag, dest=name, type=option.type, default=None,
                            help=option.help.replace("%", "%%") + scope)
    deblur.add_argument("--model", default=None,
                        help="pipeline folder (default: the method's own; the model shipped with the package "
                        "for the Fast EM methods), or 'fast': the shipped distilled Fast EM model (about 0.65x the "
                        "time, a little lower quality; its model card)")
    deblur.add_argument("--seed", type=int, default=None,
                        help="random seed (default: random; the seed used is recorded in the JSON)")
    deblur.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")
    deblur.add_argument("--kernel", default=None, metavar="FILE",
                        help="non-blind: the known blur kernel as .npy or a grayscale image read pixel for pixel "
                        "(normalised to sum 1; use *_kernel.npy, not the enlarged *_kernel.png previews)")
    existing = deblur.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true",
                          help="replace the outputs of an earlier run (its stale files of each image are removed)")
    existing.add_argument("--skip-existing", action="store_true",
                          help="keep images an earlier run finished with the same settings (complete <stem>.json) "
                          "and run the others")
    deblur.add_argument("-q", "--quiet", action="store_true", help="no progress bars or per-image lines")
    deblur.set_defaults(func=cmd_deblur)

    blur = commands.add_parser(
        "blur",
        help="make a blurry, noisy test input from a sharp image",
        description="Blur a sharp image with a known kernel (true convolution), add Gaussian noise, clip to "
        "[0, 1] and save an 8-bit PNG at OUT, with the true kernel beside it as <OUT stem>_true_kernel.npy/.png and "
        "the settings as <OUT stem>_blur.json (names that a later deblur of OUT into the same folder never "
        "replaces). With --turbulence the image is first tilted by a random per-pixel "
        "displacement field (atmospheric turbulence, BlindDPS's simulation; saved as <OUT stem>_true_tilt.npy, "
        "(2, H, W) float32 in pixels), then blurred: a test input for --method blind-dps-turbulence.",
    )
    blur.add_argument("sharp", metavar="SHARP", help="the sharp image")
    blur.add_argument("-o", "--output", required=True, metavar="OUT", help="the blurry PNG to write")
    blur.add_argument("--kernel", default="motion", metavar="motion|gaussian|FILE",
                      help="random camera-shake kernel (default), isotropic Gaussian, or a kernel file (.npy/image)")
    blur.add_argument("--kernel-size", type=_positive_int, default=None,
                      help="size of the motion or Gaussian kernel (default 33; a kernel file has its own)")
    blur.add_argument("--intensity", type=float, default=None,
                      help="motion kernel intensity in [0, 1] (default 0.5; --kernel motion only)")
    blur.add_argument("--gaussian-std", type=float, default=None,
                      help="Gaussian kernel std in pixels (default 2.0; --kernel gaussian only)")
    blur.add_argument("--sigma", type=_noise_sigma_arg, default=10.0,
                      help="noise std in 8-bit levels (default 10)")
    blur.add_argument("--seed", type=int, default=0, help="seed of the kernel and the noise (default 0)")
    blur.add_argument("--mode", choices=("reflect", "circular"), default="reflect",
                      help="boundaries: reflect (realistic, default) or circular (the paper's FFT model)")
    blur.add_argument("--turbulence", action="store_true",
                      help="tilt the image by a seeded random tilt field before blurring (saved as <OUT stem>_true_tilt.npy)")
    blur.add_argument("--max-tilt", type=float, default=None,
                      help="cap on the displacement of the tilt field in pixels (default 2.5; with --turbulence). "
                           "A cap, not a strength: the paper's generator makes fields of about 1.5-2 px at 64 px and "
                           "2-3 px at 256-512 px, so values above 3 change nothing")
    blur.add_argument("--overwrite", action="store_true",
                      help="replace OUT and its kernel/JSON (and tilt) files if they exist")
    blur.set_defaults(func=cmd_blur)

    info = commands.add_parser("info", help="show versions, the default model and the device")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 usage or input error, 130 interrupted)."""
    from ._interrupt import restore

    restore()  # Ctrl-C raises KeyboardInterrupt again (handled below) now that the imports are done
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version and argparse errors
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    if args.command == "blur" and args.intensity is not None and not 0 <= args.intensity <= 1:
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
