#!/usr/bin/env python
"""How far is the blind kernel from the true one, and what does it cost in PSNR?

For every evaluation photograph (a folder of sharp PNGs, e.g. from ``scripts/prepare_eval_photos.py``),
one seeded camera-shake kernel (size drawn in ``--kernel_sizes``, intensity in ``--intensity``) blurs a
centre crop of ``--size`` pixels, with

* ``--protocol valid``: a larger crop is blurred linearly and only the centre is kept (a real
  photograph: no wrap-around); the pipeline runs with its default reflected margin;
* ``--protocol circular``: the crop is blurred circularly (the papers' protocol), ``boundary_margin=0``;

then noise of ``--sigma`` 8-bit levels and 8-bit quantisation. Per image it prints the PSNR of the
blurry input, of blind Fast EM, of the same pipeline given the true kernel (oracle), the blind
kernel's MNC, the MNC of the kernel the blind run started from (``init``: the sparse-prior
initialiser's estimate, before any diffusion step), and the M-step's ceiling: the MNC the pipeline's ``KernelEstimator`` reaches when the
diffusion is replaced by the TRUE sharp image (``--ceiling_steps`` M-steps from a Dirac, recentred
after each, solved as the pipeline solves it: under the photograph's mask with the true scene in the
margin, or through the measurement window with ``--kernel_cg_iterations 0``). The ceiling separates
what the M-step can do from what the E-step's estimates let it do. The JSON rows also carry the blind
run's re-blur ``fit`` (``out.fit``) and the guard's collapse signs: ``contrast_gain`` (and the true sharp
image's, ``true_contrast_gain``) and ``midtone_saturation``.

Example::

    python scripts/prepare_eval_photos.py --output /tmp/eval_photos --resolution 256
    python scripts/benchmark_kernel_estimation.py --data_dir /tmp/eval_photos --size 128 --sigma 10 --protocol valid
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import diffusers_blind
from diffusers_blind import FastEMDeblurPipeline
from diffusers_blind.kernel_init import SparseKernelInitializer
from diffusers_blind.pipelines.fast_em.pipeline_fast_em_deblur import DEFAULT_STEPS, MASKED_KERNEL_ITERATIONS
from diffusers_blind.metrics import mnc, psnr
from diffusers_blind.ops import center_kernel, dirac_kernel, edge_taper_window, motion_kernel, shake_kernel
from diffusers_blind.ops.fit import contrast_gain, midtone_saturation, reblur_fit
from diffusers_blind.ops.operators import BlurOperator


def _kernel_size(value: str):
    return value if value == "auto" else int(value)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="folder of sharp evaluation photographs (PNG/JPEG)")
    p.add_argument("--model", default=diffusers_blind.DEFAULT_MODEL, help="Fast EM pipeline folder")
    p.add_argument("--size", type=int, default=128, help="crop size in pixels")
    p.add_argument("--protocol", choices=("valid", "circular"), default="valid")
    p.add_argument("--sigma", type=float, default=10.0, help="noise std in 8-bit levels")
    p.add_argument("--kernel_sizes", type=int, nargs=2, default=(15, 33), help="range of true kernel sizes (odd)")
    p.add_argument("--intensity", type=float, nargs=2, default=(0.3, 0.7), help="range of motion intensities")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"diffusion steps (default: the pipeline's, {DEFAULT_STEPS})")
    p.add_argument("--guidance", choices=("pigdm", "dps", "diffpir"), default="pigdm", help="the E-step's likelihood guidance")
    p.add_argument("--guidance_scale", type=float, default=None, help="default: the pipeline's configured value")
    p.add_argument("--kernel_cg_iterations", type=int, default=None,
                   help="M-step PCG iterations per HQS step under the photograph's mask (0: the windowed Fourier solve)")
    p.add_argument("--guidance_iterations", type=int, default=None,
                   help="CG iterations of Pi-GDM's valid-blur solve (default: the pipeline's; 0 = circulant inverse only)")
    p.add_argument("--ceiling_steps", type=int, default=20, help="M-steps of the true-image ceiling")
    p.add_argument("--skip", nargs="*", default=(), choices=("blind", "oracle", "ceiling"), help="parts not to run")
    p.add_argument("--limit", type=int, default=None, help="at most this many photographs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pipeline_seed", type=int, default=None,
                   help="seed of the diffusion alone (default: --seed); the kernels and noise stay those of --seed")
    p.add_argument("--only", type=lambda v: [int(i) for i in v.split(",")], default=None,
                   help="comma-separated photo indices to run (kernels stay seeded by the index), to split a run")
    p.add_argument("--num_scales", type=int, default=1, help="coarse-to-fine levels of the blind run")
    p.add_argument("--refine_strength", type=float, default=None, help="with --num_scales > 1 (default: the pipeline's)")
    p.add_argument("--kernel_init", choices=("sparse", "dirac"), default="sparse", help="how the blind run starts its kernel")
    p.add_argument("--kernel_size", type=_kernel_size, default=None,
                   help="support of the blind kernel: an odd int or 'auto' (default: the estimator's)")
    p.add_argument("--kernel_family", choices=("motion", "shake"), default="motion",
                   help="ops.motion_kernel, or ops.shake_kernel (inertial paths of uneven brightness; --intensity is then "
                   "the path's extent as a fraction of the kernel size)")
    p.add_argument("--precision", choices=("float32", "bfloat16"), default=None,
                   help="UNet precision of the diffusion runs (default: the pipeline's)")
    p.add_argument("--m_step_start", type=float, default=None, help="default: the pipeline's")
    p.add_argument("--kernel_anchor", type=float, default=None, help="M-step pull toward the start kernel (default: the pipeline's)")
    p.add_argument("--blind_sigma_floor", type=float, default=None, help="blind runs' noise floor in 8-bit levels (default: the pipeline's)")
    p.add_argument("--strength", type=float, default=1.0,
                   help="fraction of the schedule run from a noised Wiener start (img2img; 1 = from noise)")
    p.add_argument("--boundary_margin", type=int, default=None,
                   help="reflected margin of the valid protocol in pixels (default: the pipeline's, the kernel size)")
    p.add_argument("--num_threads", type=int, default=None)
    p.add_argument("--output", default=None, help="write the per-image rows as JSON here")
    return p.parse_args(argv)


def load_photo(path: Path, size: int, border: int) -> torch.Tensor:
    """Centre crop of ``size + 2·border`` pixels, ``(1, 3, s, s)`` in [0, 1]; small photos are upscaled to fit."""
    image = Image.open(path).convert("RGB")
    need = size + 2 * border
    if min(image.size) < need:
        scale = need / min(image.size)
        image = image.resize((round(image.width * scale + 0.5), round(image.height * scale + 0.5)), Image.BICUBIC)
    left, top = (image.width - need) // 2, (image.height - need) // 2
    array = np.asarray(image.crop((left, top, left + need, top + need)), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def make_case(path: Path, index: int, args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sharp, blurry, kernel, scene)`` for one photograph, seeded by ``(seed, index)``.

    ``scene`` is the sharp crop the blur was applied to: ``sharp`` plus a border of half the kernel
    size under the valid protocol (the true image the pipeline's margin estimates), ``sharp`` itself
    under the circular one.
    """
    rng = np.random.default_rng([args.seed, index])
    low, high = args.kernel_sizes
    kernel_size = int(rng.integers(low // 2, high // 2 + 1)) * 2 + 1
    if args.kernel_family == "shake":  # --intensity is read as the path's extent (fraction of the size)
        kernel = shake_kernel(kernel_size, float(rng.uniform(*args.intensity)), rng)
    else:
        kernel = motion_kernel(kernel_size, float(rng.uniform(*args.intensity)), rng)
    border = kernel_size // 2 if args.protocol == "valid" else 0
    source = load_photo(path, args.size, border)
    sharp = source[..., border : border + args.size, border : border + args.size]
    blurred = BlurOperator(padding="zeros" if args.protocol == "valid" else "circular")(source, kernel)
    blurred = blurred[..., border : border + args.size, border : border + args.size]
    noise = torch.from_numpy(rng.standard_normal(blurred.shape).astype(np.float32)) * args.sigma / 255.0
    blurry = torch.round((blurred + noise).clamp(0, 1) * 255.0) / 255.0
    return sharp, blurry, kernel, source


def mstep_ceiling(pipe: FastEMDeblurPipeline, scene, blurry, sigma_255: float, margin: int, steps: int,
                  cg_iterations: int) -> torch.Tensor:
    """The kernel the pipeline's M-step finds with the TRUE sharp image, on the pipeline's padded grid.

    With ``cg_iterations > 0`` (the pipeline's masked M-step) the true ``scene`` fills the margin as far
    as the blur reached (the E-step estimates that margin in a blind run), and the least squares
    counts the photograph's pixels only. With 0, both images go through the pipeline's
    measurement window and the circular Fourier solve (the windowed M-step).
    """
    estimator = pipe.kernel_estimator
    size = estimator.config.kernel_size
    multiple = 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    padded_y, window = pipe.image_processor.pad(blurry, margin, multiple)
    border = (scene.shape[-1] - blurry.shape[-1]) // 2
    top, left = window[0] - border, window[1] - border
    sharp = scene[..., border : scene.shape[-2] - border, border : scene.shape[-1] - border]
    padded_x, _ = pipe.image_processor.pad(sharp, margin, multiple)
    if border > 0:
        padded_x[..., top : top + scene.shape[-2], left : left + scene.shape[-1]] = scene
    kernel = dirac_kernel(size)
    with torch.no_grad():
        if margin > 0 and cg_iterations > 0:
            observed = edge_taper_window(padded_y.shape[-2:], 0, region=window)
            for _ in range(steps):
                kernel = center_kernel(estimator(padded_y, padded_x, sigma_255 / 255.0, kernel, mask=observed,
                                                 cg_iterations=cg_iterations))
            return kernel
        weights = pipe.measurement_window(padded_y.shape[-2:], window, margin, size, padded_y.device)
        for _ in range(steps):
            kernel = center_kernel(estimator(weights * padded_y, weights * padded_x, sigma_255 / 255.0, kernel))
    return kernel


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    photos = sorted(p for p in Path(args.data_dir).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if args.limit:
        photos = photos[: args.limit]
    if not photos:
        raise SystemExit(f"no photographs in {args.data_dir}")
    pipe = FastEMDeblurPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    margin = 0 if args.protocol == "circular" else args.boundary_margin
    if margin is None:
        margin = pipe.kernel_estimator.config.kernel_size
    call = dict(sigma=args.sigma, num_inference_steps=args.steps, output_type="pt", guidance=args.guidance,
                guidance_scale=args.guidance_scale,
                boundary_margin=0 if args.protocol == "circular" else args.boundary_margin, strength=args.strength)
    if args.precision is not None:
        call["precision"] = args.precision
    if args.guidance_iterations is not None:
        call["guidance_iterations"] = args.guidance_iterations
    if args.kernel_cg_iterations is not None:
        call["kernel_cg_iterations"] = args.kernel_cg_iterations

    pipeline_seed = args.seed if args.pipeline_seed is None else args.pipeline_seed
    rows = []
    header = (f"{'photo':14s} {'k/est':>6s} {'blurry':>7s} {'blind':>7s} {'oracle':>7s} {'MNC':>6s} {'init':>6s} {'ceiling':>7s}"
              f" {'s/run':>6s}")
    print(f"protocol {args.protocol}, {args.size}², σ = {args.sigma:g}, {args.steps} steps, precision {args.precision or 'default'}, "
          f"{args.guidance} guidance_scale {pipe.default_guidance_scale(args.guidance) if args.guidance_scale is None else args.guidance_scale}, "
          f"model {args.model}")
    print(header)
    for index, path in enumerate(photos):
        if args.only is not None and index not in args.only:
            continue
        sharp, blurry, kernel, scene = make_case(path, index, args)
        row = {"photo": path.stem, "kernel_size": kernel.shape[-1], "blurry_psnr": float(psnr(blurry, sharp))}
        if "blind" not in args.skip:
            start = time.perf_counter()
            blind_call = dict(kernel_init=args.kernel_init, num_scales=args.num_scales, kernel_size=args.kernel_size)
            if args.refine_strength is not None:
                blind_call["refine_strength"] = args.refine_strength
            if args.m_step_start is not None:
                blind_call["m_step_start"] = args.m_step_start
            if args.kernel_anchor is not None:
                blind_call["kernel_anchor"] = args.kernel_anchor
            if args.blind_sigma_floor is not None:
                blind_call["blind_sigma_floor"] = args.blind_sigma_floor
            out = pipe(blurry, generator=torch.manual_seed(pipeline_seed), **blind_call, **call)
            row["fallback"] = bool(out.fallback and out.fallback[0])
            row["fit"] = float(out.fit[0]) if out.fit else float("nan")
            row["seconds"] = time.perf_counter() - start
            row["blind_psnr"] = float(psnr(out.images.clamp(0, 1), sharp))
            row["blind_mnc"] = float(mnc(out.kernels, kernel))
            row["blind_size"] = int(out.kernels.shape[-1])
            row["contrast_gain"] = float(contrast_gain(blurry, out.images.clamp(0, 1))[0])
            row["true_contrast_gain"] = float(contrast_gain(blurry, sharp)[0])
            row["midtone_saturation"] = float(midtone_saturation(blurry, out.images.clamp(0, 1))[0])
            if args.kernel_init == "sparse":
                size = row["blind_size"]
                start = SparseKernelInitializer(pipe.kernel_estimator)(blurry, size, out.sigma[0] / 255.0)
                row["init_mnc"] = float(mnc(start, kernel))
        if "oracle" not in args.skip:
            out = pipe(blurry, kernel=kernel, generator=torch.manual_seed(pipeline_seed), **call)
            row["oracle_psnr"] = float(psnr(out.images.clamp(0, 1), sharp))
            row["oracle_fit"] = float(reblur_fit(blurry, out.images.clamp(0, 1), kernel, out.sigma[0] / 255.0)[0])
        if "ceiling" not in args.skip:
            cg = MASKED_KERNEL_ITERATIONS if args.kernel_cg_iterations is None else args.kernel_cg_iterations
            ceiling = mstep_ceiling(pipe, scene, blurry, args.sigma, margin, args.ceiling_steps, cg)
            row["ceiling_mnc"] = float(mnc(ceiling, kernel))
        rows.append(row)
        print(_format(row), flush=True)
    mean = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]
            if key not in ("photo", "kernel_size", "fallback", "blind_size")}
    fallbacks = [r["photo"] for r in rows if r.get("fallback")]
    if fallbacks:
        print(f"guard fell back to the input on: {', '.join(fallbacks)}")
    print(_format({"photo": "mean", "kernel_size": "", **mean}))
    gaps = [r["blind_psnr"] - r["blurry_psnr"] for r in rows if "blind_psnr" in r]
    if gaps:
        worse = sum(g < 0 for g in gaps)
        print(f"blind − blurry: mean {np.mean(gaps):+.2f} dB, worst {min(gaps):+.2f} dB, {worse} of {len(gaps)} images below the input")
    if all("oracle_psnr" in r and "blind_psnr" in r for r in rows):
        print(f"oracle − blind: {np.mean([r['oracle_psnr'] - r['blind_psnr'] for r in rows]):+.2f} dB")
    if args.output:
        Path(args.output).write_text(json.dumps({"args": vars(args), "rows": rows, "mean": mean}, indent=2, default=str))
    return 0


def _format(row: dict) -> str:
    def cell(key, fmt):
        return format(row[key], fmt) if key in row else "–".rjust(len(format(0.0, fmt)))

    size = f"{row['kernel_size']}" + (f"/{row['blind_size']}" if "blind_size" in row else "")
    return (f"{str(row['photo'])[:14]:14s} {size:>6s} {cell('blurry_psnr', '7.2f')} {cell('blind_psnr', '7.2f')} "
            f"{cell('oracle_psnr', '7.2f')} {cell('blind_mnc', '6.3f')} {cell('init_mnc', '6.3f')} {cell('ceiling_mnc', '7.3f')} "
            f"{cell('seconds', '6.1f')}")


if __name__ == "__main__":
    raise SystemExit(main())
