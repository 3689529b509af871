#!/usr/bin/env python
"""Unconditional samples of a kernel prior vs its training generator: a PNG grid and kernel statistics.

    python scripts/kernel_prior_card.py --kernel_unet src/diffusers_blind/blind_dps_default_model/kernel_unet \
        --output_dir runs/kernel_prior/card --num_samples 64 --steps 250

Statistics per kernel (sum-1, true convolution), mean ± std over the set:

* ``support``: pixels above 5 % of the kernel's peak;
* ``radius``: radius of gyration ``√(Σ k·|p − p̄|²)`` in pixels (length of the blur);
* ``anisotropy``: ``√(λ_min/λ_max)`` of the second-moment matrix (0 = a straight line, 1 = round);
* ``peak``: the largest entry (concentration);
* ``noise``: share of the mass below 5 % of the peak (speckle outside the trajectory).

The generator set is drawn with the mix recorded in the prior's ``training_info.json``. Samples are
mapped to kernels both with the plain ``u/Σu`` (``samples.png``, "model (none)") and with the median
background removed (``samples_median.png``, "model (median)", what the BlindDPS pipelines use).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_kernel_prior as trainer  # noqa: E402


def kernel_statistics(kernels: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-kernel statistics of ``(N, 1, k, k)`` sum-1 kernels (see the module docstring)."""
    k = kernels[:, 0].double()
    n, h, w = k.shape
    peak = k.amax(dim=(-2, -1))
    above = k > 0.05 * peak.view(n, 1, 1)
    rows = torch.arange(h, dtype=torch.float64).view(1, h, 1)
    cols = torch.arange(w, dtype=torch.float64).view(1, 1, w)
    mass = k.sum(dim=(-2, -1))
    mr, mc = (k * rows).sum(dim=(-2, -1)) / mass, (k * cols).sum(dim=(-2, -1)) / mass
    dr, dc = rows - mr.view(n, 1, 1), cols - mc.view(n, 1, 1)
    crr, ccc, crc = ((k * dr * dr).sum(dim=(-2, -1)), (k * dc * dc).sum(dim=(-2, -1)), (k * dr * dc).sum(dim=(-2, -1)))
    cov = torch.stack([torch.stack([crr, crc], -1), torch.stack([crc, ccc], -1)], -2) / mass.view(n, 1, 1)
    eig = torch.linalg.eigvalsh(cov).clamp_min(0)
    return {
        "support": above.sum(dim=(-2, -1)).numpy().astype(float),
        "radius": (eig.sum(-1)).sqrt().numpy(),
        "anisotropy": (eig[:, 0] / eig[:, 1].clamp_min(1e-12)).sqrt().numpy(),
        "peak": peak.numpy(),
        "noise": ((k * ~above).sum(dim=(-2, -1)) / mass).numpy(),
    }


def summary(stats: dict[str, np.ndarray]) -> dict[str, list[float]]:
    return {name: [float(v.mean()), float(v.std())] for name, v in stats.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kernel_unet", type=Path, required=True, help="folder of the kernel UNet2DModel")
    p.add_argument("--scheduler", type=Path, default=None, help="scheduler folder (default: linear 1000, fixed_small)")
    p.add_argument("--output_dir", type=Path, required=True)
    p.add_argument("--num_samples", type=int, default=64)
    p.add_argument("--steps", type=int, default=250, help="respaced ancestral DDPM steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.num_threads)

    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers_blind.ops import model_range_to_kernel

    unet = UNet2DModel.from_pretrained(args.kernel_unet).eval()
    scheduler = (DDPMScheduler.from_pretrained(args.scheduler) if args.scheduler
                 else trainer.build_scheduler("learned_range" if unet.config.out_channels == 2 else "fixed_small"))
    info_path = args.kernel_unet / "training_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    size = unet.config.sample_size
    images = torch.cat([trainer.sample_kernels(unet, scheduler, min(32, args.num_samples - i), args.steps, args.seed + i)
                        for i in range(0, args.num_samples, 32)])
    samples = model_range_to_kernel(images)
    samples_median = model_range_to_kernel(images, background="median")
    sampler = trainer.KernelSampler(size, info.get("intensity_range", [0.05, 1.0]), info.get("gaussian_fraction", 1 / 6),
                                    info.get("gaussian_std_range", [0.5, max(1.0, size / 10)]))
    reference = sampler.kernels(args.num_samples, np.random.default_rng(12345))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    trainer.save_kernel_grid(images, args.output_dir / "samples.png", cols=8, scale=3)
    trainer.save_kernel_grid(images, args.output_dir / "samples_median.png", cols=8, scale=3, background="median")
    torch.save(images, args.output_dir / "samples_model_range.pt")
    trainer.save_kernel_grid(2 * reference / reference.amax(dim=(-2, -1), keepdim=True) - 1,
                             args.output_dir / "generator.png", cols=8, scale=3)
    result = {"model (none)": summary(kernel_statistics(samples)),
              "model (median)": summary(kernel_statistics(samples_median)),
              "generator": summary(kernel_statistics(reference)),
              "num_samples": args.num_samples, "steps": args.steps, "kernel_size": size,
              "training_step": info.get("step")}
    (args.output_dir / "stats.json").write_text(json.dumps(result, indent=1))
    columns = ("model (none)", "model (median)", "generator")
    print(f"{'statistic':<11} " + " ".join(f"{c:>20}" for c in columns))
    for name in result["generator"]:
        print(f"{name:<11} " + " ".join(f"{result[c][name][0]:>11.3f} ± {result[c][name][1]:<6.3f}" for c in columns))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
