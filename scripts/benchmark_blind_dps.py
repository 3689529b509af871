#!/usr/bin/env python
"""Small BlindDPS benchmark on the evaluation photographs: PSNR, SSIM, kernel MNC and wall time.

    PYTHONPATH=src OMP_NUM_THREADS=1 python scripts/benchmark_blind_dps.py --output_dir /work/runs/bench_blind_dps \
        --photos astronaut camera coffee --resolution 128 --steps 100 250 --methods blind-dps fastem-pigdm

Each photo (scikit-image sample, centre-cropped and downscaled to ``--resolution``) is blurred by its own
seeded motion kernel (``--kernel_size``, ``--intensity``) with the ``--blur_mode`` border, gets Gaussian
noise of ``--sigma`` 8-bit levels and is clipped to ``[0, 1]``. Methods: ``blind-dps`` (the BlindDPS
pipeline with the same border model, at every ``--steps``), ``fastem-pigdm`` (the package's Fast EM, 100
steps) and ``blurry`` (the input itself). Writes ``results.jsonl``, ``table.md`` and one PNG per photo
(sharp | blurry | restorations, with the true and estimated kernels).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare_eval_photos import load_photos, square_crop  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", type=Path, required=True)
    p.add_argument("--model", default=None, help="BlindDPS pipeline folder (default: the shipped one)")
    p.add_argument("--photos", nargs="+", default=["astronaut", "camera", "coffee"])
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--kernel_size", type=int, default=33)
    p.add_argument("--intensity", type=float, default=0.5)
    p.add_argument("--sigma", type=float, default=10.0, help="noise std in 8-bit levels")
    p.add_argument("--blur_mode", choices=("reflect", "circular"), default="reflect")
    p.add_argument("--steps", type=int, nargs="+", default=[100])
    p.add_argument("--methods", nargs="+", default=["blind-dps"], choices=("blind-dps", "fastem-pigdm"))
    p.add_argument("--guidance_scale", type=float, default=None)
    p.add_argument("--step_size", default="sqrt_alpha_bar", choices=("sqrt_alpha_bar", "constant"))
    p.add_argument("--sparsity_weight", type=float, default=None)
    p.add_argument("--boundary_margin", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_threads", type=int, default=1)
    return p.parse_args(argv)


def kernel_tile(kernel: torch.Tensor, size: int) -> np.ndarray:
    k = kernel.detach().double().reshape(kernel.shape[-2:])
    k = (k / k.max().clamp_min(1e-12) * 255).round().byte().numpy()
    image = Image.fromarray(k).resize((size, size), Image.NEAREST).convert("RGB")
    return np.asarray(image)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    import diffusers_blind
    from diffusers_blind import BlindDPSPipeline, FastEMDeblurPipeline
    from diffusers_blind.metrics import mnc, psnr, ssim
    from diffusers_blind.ops import BlurOperator, motion_kernel

    args.output_dir.mkdir(parents=True, exist_ok=True)
    photos = load_photos()
    results = []
    pipes = {}
    if "blind-dps" in args.methods:
        pipes["blind-dps"] = BlindDPSPipeline.from_pretrained(args.model or diffusers_blind.BLIND_DPS_DEFAULT_MODEL)
    if "fastem-pigdm" in args.methods:
        pipes["fastem-pigdm"] = FastEMDeblurPipeline.from_pretrained(diffusers_blind.DEFAULT_MODEL)
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)

    for index, name in enumerate(args.photos):
        sharp = square_crop(Image.fromarray(photos[name]).convert("RGB"), args.resolution)
        x = torch.from_numpy(np.asarray(sharp, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        kernel = motion_kernel(args.kernel_size, args.intensity, generator=args.seed * 1000 + index)
        g = torch.Generator().manual_seed(args.seed * 1000 + index)
        y = (BlurOperator(args.blur_mode)(x, kernel) + args.sigma / 255 * torch.randn(x.shape, generator=g)).clamp(0, 1)
        row = [to_uint8(x), to_uint8(y)]
        tiles = [kernel_tile(kernel, args.resolution // 2)]
        record = {"photo": name, "method": "blurry", "psnr": float(psnr(y, x)), "ssim": float(ssim(y, x))}
        results.append(record)
        print(json.dumps(record), flush=True)
        runs = [("blind-dps", s) for s in args.steps if "blind-dps" in pipes]
        runs += [("fastem-pigdm", 100)] if "fastem-pigdm" in pipes else []
        for method, steps in runs:
            start = time.time()
            generator = torch.Generator().manual_seed(args.seed * 1000 + index)
            if method == "blind-dps":
                out = pipes[method](y, num_inference_steps=steps, blur_model=args.blur_mode, step_size=args.step_size,
                                    guidance_scale=args.guidance_scale, sparsity_weight=args.sparsity_weight,
                                    boundary_margin=args.boundary_margin, generator=generator, output_type="pt")
            else:
                out = pipes[method](y, sigma=args.sigma, num_inference_steps=steps, generator=generator,
                                    kernel_size=args.kernel_size, output_type="pt")
            seconds = time.time() - start
            record = {"photo": name, "method": method, "steps": steps, "psnr": float(psnr(out.images, x)),
                      "ssim": float(ssim(out.images, x)), "mnc": float(mnc(out.kernels, kernel)), "seconds": seconds}
            results.append(record)
            print(json.dumps(record), flush=True)
            row.append(to_uint8(out.images))
            tiles.append(kernel_tile(out.kernels, args.resolution // 2))
        kernels = np.concatenate(tiles, axis=1)
        strip = np.concatenate(row, axis=1)
        canvas = np.zeros((strip.shape[0] + kernels.shape[0], max(strip.shape[1], kernels.shape[1]), 3), np.uint8)
        canvas[: strip.shape[0], : strip.shape[1]] = strip
        canvas[strip.shape[0]:, : kernels.shape[1]] = kernels
        Image.fromarray(canvas).save(args.output_dir / f"{name}.png")

    with open(args.output_dir / "results.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in results)
    lines = ["| method | steps | PSNR (dB) | SSIM | kernel MNC | s / image |", "|---|---|---|---|---|---|"]
    keys = sorted({(r["method"], r.get("steps")) for r in results}, key=lambda k: (k[0] != "blurry", k[0], k[1] or 0))
    for method, steps in keys:
        rs = [r for r in results if r["method"] == method and r.get("steps") == steps]
        mean = lambda key: np.mean([r[key] for r in rs]) if key in rs[0] else float("nan")  # noqa: E731
        lines.append(f"| {method} | {steps or '-'} | {mean('psnr'):.2f} | {mean('ssim'):.3f} | {mean('mnc'):.3f} | "
                     f"{mean('seconds'):.0f} |")
    (args.output_dir / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
