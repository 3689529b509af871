"""The resumable evaluation runner: parse the settings, run every (image, method, σ) job once, score it.

See docs/evaluation.md. ``scripts/evaluate.py`` and ``python -m diffusers_blind.evaluation`` call :func:`main`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..io import IMAGE_EXTENSIONS, read_json, save_json, save_npy
from ..methods import METHODS, MethodResult, all_options, get_method, with_default_steps
from .degradations import (
    BLUR_MODES,
    SAMPLER_STREAM,
    degrade,
    load_image_table,
    load_scene,
    load_user_kernels,
    make_kernel,
    reblur_scores,
    stream_seed,
    valid_margin,
)
from .figures import make_grid, perception_distortion_plot
from .results import job_key, merge_records, read_records
from .summary import summarise


# Settings that change the result of a job: a rerun into the same folder must use the same ones
# (and the options of the methods that run).
RESULT_SETTINGS = (
    "data_dir", "dataset_id", "split", "image_column", "resolution", "downscale", "small_images", "kernel",
    "kernel_size", "intensity", "blur_mode", "seed", "model",
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
    deg.add_argument("--blur", "--blur_mode", dest="blur_mode", choices=tuple(BLUR_MODES), default="circular",
                     help="; ".join(f"{name}: {text}" for name, text in BLUR_MODES.items()))
    deg.add_argument("--seed", type=int, default=0, help="kernel/noise/sampler of image i depend only on (seed, i)")

    meth = p.add_argument_group("methods")
    meth.add_argument("--methods", nargs="+", default=["fastem-pigdm", "wiener-known-kernel", "identity"],
                      choices=tuple(METHODS), metavar="METHOD", help=f"any of {', '.join(METHODS)}")
    meth.add_argument("--model", nargs="+", default=None, metavar="PATH|METHOD=PATH",
                      help="pipeline folder of every selected method that loads one, or METHOD=PATH per method "
                      "(default: each method's own, diffusers_blind.DEFAULT_MODEL for the Fast EM methods)")
    present = {flag for action in p._actions for flag in action.option_strings}
    for name, option in all_options().items():  # every registered method's options
        if option.evaluation_flag not in present:
            meth.add_argument(option.evaluation_flag, dest=name, type=option.type, default=option.evaluation_default,
                              help=option.help.replace("%", "%%"))

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
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        p.error(f"--data_dir {args.data_dir!r} is not a folder")
    if args.data_dir is not None and not any(f.suffix.lower() in IMAGE_EXTENSIONS for f in Path(args.data_dir).rglob("*")):
        p.error(f"--data_dir {args.data_dir!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        p.error(f"--output_dir {args.output_dir!r} is a file, not a folder")
    if args.resolution is not None and args.kernel in ("motion", "gaussian") and args.kernel_size > args.resolution:
        p.error(f"--kernel_size {args.kernel_size} is larger than --resolution {args.resolution}")
    if args.kernel not in ("motion", "gaussian") and not Path(args.kernel).is_dir():
        p.error(f"--kernel must be 'motion', 'gaussian' or an existing folder, got {args.kernel!r}")
    args.sigma = list(dict.fromkeys(float(s) for s in args.sigma))
    args.methods = list(dict.fromkeys(args.methods))
    for name in args.methods:  # option values that cannot go together fail here, not once per image
        method = METHODS[name]
        if method.check_options is not None:
            try:
                method.check_options({option.name: getattr(args, option.name) for option in method.options})
            except ValueError as error:
                p.error(f"{name}: {error}")
    try:
        args.models = resolve_models(args.methods, args.model or [])
    except ValueError as error:
        p.error(str(error))
    folders = set(args.models.values())
    # config.json and the summary: one folder as before (older result folders store a string), else a mapping
    args.model = None if not folders else folders.pop() if len(folders) == 1 else dict(sorted(args.models.items()))
    return args


def resolve_models(methods: list[str], entries: list[str]) -> dict[str, str]:
    """The pipeline folder of every selected method that loads one, from ``--model`` entries.

    ``PATH`` applies to every such method (they must load the same pipeline class); ``METHOD=PATH`` to
    that method alone; a method named by neither uses its default model (an error if it has none).
    """
    named, plain = {}, []
    for entry in entries:
        name, _, folder = entry.partition("=")
        if folder and name in METHODS:
            named[name] = folder
        else:
            plain.append(entry)
    if len(plain) > 1:
        raise ValueError(f"--model takes one PATH for all methods, or METHOD=PATH entries; got {plain}")
    loading = [METHODS[m] for m in methods if METHODS[m].pipeline_class is not None]
    unknown = sorted(set(named) - {m.name for m in loading})
    if unknown:
        raise ValueError(f"--model names {', '.join(unknown)}, which is not a selected method that loads a pipeline")
    shared = [m for m in loading if m.name not in named]
    if plain and len({m.pipeline_class for m in shared}) > 1:
        raise ValueError("--model PATH names one pipeline folder, but the methods "
                         f"{', '.join(m.name for m in shared)} load different pipelines; use METHOD=PATH entries")
    models = {}
    for method in loading:
        folder = named.get(method.name) or (plain[0] if plain else method.default_model)
        if folder is None:
            raise ValueError(f"{method.name} ships no default model: pass --model {method.name}=PATH")
        models[method.name] = str(folder)
    return models


def method_settings(args) -> dict:
    """The option values of the selected methods, by option name."""
    return {name: getattr(args, name) for name in all_options([METHODS[m] for m in args.methods])}



def method_options(method, args) -> dict:
    """The values of ``method``'s options from ``args``, an unset step count replaced by the one that runs."""
    return with_default_steps(method, {option.name: getattr(args, option.name) for option in method.options})


def run_method(name, y, kernel_true, sigma_255, args, pipelines, index, device) -> tuple[MethodResult, float]:
    """Restore ``y`` with the registered method ``name``; returns its result and the seconds it took."""
    method = get_method(name)
    generator = torch.Generator(device=device).manual_seed(stream_seed(args.seed, index, SAMPLER_STREAM))
    options = method_options(method, args)
    start = time.perf_counter()
    result = method.run(
        y.to(device), sigma=sigma_255, kernel=kernel_true.to(device) if method.needs_kernel else None,
        generator=generator, pipeline=pipelines.get(name), blur=args.blur_mode, **options,
    )
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


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
    """Metrics of one job; the kernel metrics and the re-blur loss are ``None`` when no kernel is returned."""
    from diffusers_blind import metrics

    known = METHODS[method].needs_kernel or k_hat is None
    reblur = None if k_hat is None else reblur_scores(x_hat, k_hat, y, sigma_255 / 255.0, args.blur_mode)
    sharp, sharp_gt = metrics.laplacian_sharpness(x_hat).item(), metrics.laplacian_sharpness(x).item()
    record = {
        "psnr": metrics.psnr(x_hat, x).item(),
        "ssim": metrics.ssim(x_hat, x).item(),
        "gmsd": metrics.gmsd(x_hat, x).item(),
        "sharpness": sharp,
        "sharpness_gt": sharp_gt,
        "sharpness_ratio": sharp / sharp_gt if sharp_gt > 0 else None,
        # the kernel of a known-kernel method is the truth: its kernel metrics would be trivially perfect;
        # a method that estimates no kernel has none
        "kernel_mse": None if known else metrics.kernel_mse(k_hat, kernel_true).item(),
        "mnc": None if known else metrics.mnc(k_hat, kernel_true).item(),
        "reblur_total": None if reblur is None else reblur.total.item(),
        "reblur_per_element": None if reblur is None else reblur.per_element.item(),
    }
    for name, function in extra.items():
        record[name] = function(x_hat, x).item()
    return record


# ----------------------------------------------------------------------------------------- results files
def check_settings(args, output_dir: Path, is_main: bool) -> None:
    """Store the result-changing settings in ``config.json`` (atomically); refuse to resume with different ones.

    A setting the stored file lacks (an option of a method added since) is accepted and added. An empty or
    corrupt ``config.json`` (a crash during its first write) is rewritten when no result exists yet, and
    is otherwise a clear error.
    """
    settings = {name: getattr(args, name) for name in RESULT_SETTINGS} | method_settings(args)
    if settings["model"] is None:  # no method of this command loads a model: a stored one still holds for its rows
        del settings["model"]
    path = output_dir / "config.json"
    previous = None
    has_results = any(f.stat().st_size > 0 for f in output_dir.glob("results*.jsonl"))
    written_here = [*output_dir.glob("results*.jsonl"), *output_dir.glob("summary.*"), output_dir / "grid.png",
                    output_dir / "perception_distortion.png"]
    foreign = [f.name for f in written_here if f.exists()]
    if foreign and not path.is_file() and not args.overwrite:  # not an evaluation folder: the user's own files
        raise SystemExit(f"{output_dir} has no config.json but holds files this evaluation would write "
                         f"({', '.join(sorted(foreign))}); use another --output_dir, or --overwrite to replace them")
    if path.is_file() and not args.overwrite:
        try:
            previous = read_json(path, "the evaluation settings file")
        except (OSError, ValueError) as error:
            if has_results:
                raise SystemExit(f"{error}. The results in {output_dir} cannot be checked against the current "
                                 "settings: delete config.json to resume with them anyway, or pass --overwrite "
                                 "to start again.") from None
            print(f"note: {error}; no result exists yet, so it is written again", file=sys.stderr)
    if previous is not None and not has_results:  # an earlier command stopped before its first result
        differences = [k for k, v in settings.items() if k in previous and previous[k] != v]
        if differences:
            print(f"note: {output_dir} holds no result yet; its settings file is written again with this command's "
                  f"({', '.join(differences)} changed)", file=sys.stderr)
            previous = None
    if previous is not None:
        differences = [f"{k}: {previous[k]!r} -> {v!r}" for k, v in settings.items() if k in previous and previous[k] != v]
        if differences:
            raise SystemExit(
                f"{output_dir} holds results made with other settings ({'; '.join(differences)}). "
                "Use another --output_dir, or --overwrite to start again."
            )
        if is_main and not settings.keys() <= previous.keys():
            save_json({**previous, **settings}, path)
    elif is_main:
        if args.overwrite:
            for file in written_here:
                file.unlink(missing_ok=True)
            images = output_dir / "images"
            if images.is_dir():
                for file in images.glob("*/*"):
                    file.unlink()
        save_json(settings, path)


def check_same_images(records: list[dict], names: dict[int, str], output_dir: Path) -> None:
    """Refuse to resume when an earlier result's image index now names another image (files added to or
    removed from the data folder shift the indices): its result would be counted for the wrong image."""
    moved = [(r["image_index"], r.get("image_id"), names[r["image_index"]]) for r in records
             if r.get("image_index") in names and r.get("image_id") is not None and r["image_id"] != names[r["image_index"]]]
    if moved:
        index, before, now = moved[0]
        raise SystemExit(f"{output_dir} holds results for other images: image {index} was {before!r} and is now "
                         f"{now!r} ({len(moved)} such result(s); the data changed since they were made). Use another "
                         "--output_dir, or --overwrite to start again.")


# ----------------------------------------------------------------------------------------- main
def save_png(tensor: torch.Tensor, path: Path) -> None:
    from ..io import save_image

    array = (tensor[0].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    save_image(Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array), path)


def load_pipelines(methods, models: dict[str, str], device) -> dict:
    """One loaded pipeline per method that needs one, shared between methods of the same class and folder."""
    from ..methods import load_pipeline

    loaded, pipelines = {}, {}
    for name in sorted(methods):
        method = METHODS[name]
        if method.pipeline_class is None:
            continue
        key = (method.pipeline_class, models[name])
        if key not in loaded:
            try:
                loaded[key] = load_pipeline(method, key[1], device)
            except Exception as error:  # a missing, partial or corrupt folder: one clear message
                raise SystemExit(f"cannot load the pipeline of {name} from {key[1]}: "
                                 f"{type(error).__name__}: {error}") from None
            loaded[key].set_progress_bar_config(disable=True)
        pipelines[name] = loaded[key]
    return pipelines


def use_cpu(args) -> bool:
    """CPU when asked (``--cpu`` / ``accelerate launch --cpu``), or when several processes were launched
    (``accelerate launch --multi_gpu`` / ``torchrun``) on a machine without GPU: accelerate then uses gloo."""
    if args.cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1
    has_gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    return launched and not has_gpu


def main(argv=None) -> int:
    from .._interrupt import restore

    restore()  # under `python -m`, Ctrl-C raises KeyboardInterrupt again once the imports are done
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

    user_kernels = load_user_kernels(args.kernel) if args.kernel not in ("motion", "gaussian") else None
    dataset, column, usable = load_image_table(args, state, valid_margin(args, user_kernels))
    if not usable:
        raise SystemExit("no usable image")
    names = dict(usable)
    grid_indices = {index for index, _ in usable[: args.num_grid]}
    extra, missing_metrics = optional_metrics(args.extra_metrics)

    jobs = [(index, sigma, method) for index, _ in usable for sigma in args.sigma for method in args.methods]
    records = read_records(output_dir)
    check_same_images(records, names, output_dir)
    done = {job_key(r) for r in records}
    pending = [job for job in jobs if job_key(job) not in done]
    state.wait_for_everyone()  # every process has read the same "done" set before anyone writes a new result
    if state.is_main_process:
        print(f"{len(jobs)} jobs ({len(usable)} images × {len(args.sigma)} σ × {len(args.methods)} methods), "
              f"{len(jobs) - len(pending)} already done, {len(pending)} to run on {state.num_processes} process(es).")

    pipelines = load_pipelines({method for _, _, method in pending}, args.models, state.device)

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
                    kernel, kernel_name = make_kernel(args, index, user_kernels)
                    x, source = load_scene(dataset, column, index, args, kernel)
                    cache = {"index": index, "x": x, "source": source, "kernel": kernel, "kernel_name": kernel_name,
                             "y": {}}
                x, kernel = cache["x"], cache["kernel"]
                if sigma not in cache["y"]:
                    cache["y"][sigma] = degrade(cache["source"], kernel, sigma, args, index)
                y = cache["y"][sigma]
                result, seconds = run_method(method, y, kernel, sigma, args, pipelines, index, state.device)
                x_hat = result.image.float().cpu()
                k_hat = None if result.kernel is None else result.kernel.float().cpu()
                record = {
                    "steps": None, "particles": None,  # the method's options (kept as keys for every method)
                    **method_options(METHODS[method], args),
                    "image_index": index, "image_id": names[index], "method": method, "sigma": sigma,
                    "seed": args.seed, "kernel": cache["kernel_name"], "kernel_size": int(kernel.shape[-1]),
                    "blur_mode": args.blur_mode, "resolution": list(x.shape[-2:]),
                    "time_s": seconds,
                    # the guard of a blind run returned the blurry input (its scores are the input's)
                    "fallback": result.fallback, "fit": result.fit,
                    "uncertainty_mean": None if result.uncertainty is None else float(result.uncertainty.float().mean()),
                    **score(x_hat, k_hat, x, y, kernel, sigma, method, args, extra),
                    "process": state.process_index,
                }
                if index in grid_indices or args.save_images:
                    folder = output_dir / "images" / f"{index:05d}_{names[index]}"
                    folder.mkdir(parents=True, exist_ok=True)
                    save_png(x, folder / "gt.png")
                    save_npy(kernel[0, 0].numpy(), folder / "kernel_true.npy")
                    save_png(y, folder / f"input_s{sigma:g}.png")
                    save_png(x_hat, folder / f"{method}_s{sigma:g}.png")
                    if k_hat is not None:
                        save_npy(k_hat[0, 0].numpy(), folder / f"{method}_s{sigma:g}_kernel.npy")
                    if result.uncertainty is not None:  # --particles > 1: the per-pixel std over particles
                        std = result.uncertainty.float().cpu().reshape(result.uncertainty.shape[-2:])
                        save_npy(std.numpy(), folder / f"{method}_s{sigma:g}_uncertainty.npy")
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

