#!/usr/bin/env python
"""Benchmark the kernel prior of the Fast EM M-step with a known sharp image (Fast EM Fig. 4 setting).

For a sharp photograph ``x`` (a file, e.g. a training photograph from ``scripts/prepare_photos.py``,
or a scikit-image sample: those are the package's evaluation photographs, so use them for the test
set only) and seeded random motion kernels ``k``, the measurement is ``y = k ⊛ x + σ·n`` (circular
``fft_blur``, σ ∈ {5, 10, 20}/255). The HQS M-step (:class:`KernelEstimator`) is run with the TRUE
sharp image as ``estimates`` from a Dirac initial kernel, for ``num_iterations`` ∈ {10, 50} (the
pipeline warm-starts the estimator over ~100 diffusion steps, so many more than 10 HQS
iterations act on the kernel in practice), with the priors ``pnp`` (trained denoiser), ``l1``,
``l2`` and ``none``. ``lambda_`` is tuned per method and per iteration count on a *tuning* set
(one image, one set of kernel seeds), by the geometric mean of the kernel MSE over the three noise levels; the
chosen values are then evaluated on a held-out *test* set (another image, other kernel seeds).

Kernel MSE is the mean squared error between sum-1 kernels, averaged over pixels and kernels
(the units of the paper's kernel MSE, ~1e-5 for 33×33).

Example::

    python scripts/benchmark_kernel_prior.py --estimator src/diffusers_blind/default_model/kernel_estimator \
        --tune_image data/photos/plasma_Kite_d4.png --test_image data/photos/free_by_Peter_Nerlich_d4.png
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from diffusers_blind.models import KernelEstimator
from diffusers_blind.ops import MotionKernelGenerator, dirac_kernel, fft_blur, gaussian_kernel


DEFAULT_ESTIMATOR = Path(__file__).resolve().parents[1] / "src" / "diffusers_blind" / "default_model" / "kernel_estimator"
DEFAULT_GRIDS = {
    "pnp": [0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0],
    "l1": [1.0, 3.0, 10.0, 30.0, 100.0, 300.0],
    "l2": [1.0, 1000.0],
    "none": [0.0],
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--estimator", type=str, default=str(DEFAULT_ESTIMATOR), help="saved KernelEstimator folder (pnp)")
    p.add_argument("--kernel_size", type=int, default=None, help="default: the estimator's kernel_size")
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--tune_image", type=str, required=True,
                   help="a photograph file or a scikit-image sample name; tune on a training photograph, never on the evaluation set")
    p.add_argument("--test_image", type=str, required=True, help="a held-out photograph file or a scikit-image sample name")
    p.add_argument("--num_kernels", type=int, default=8)
    p.add_argument("--tune_seed", type=int, default=100)
    p.add_argument("--test_seed", type=int, default=200)
    p.add_argument("--intensity", type=float, default=0.5, help="motion-kernel intensity")
    p.add_argument("--sigmas", type=float, nargs="+", default=[5.0, 10.0, 20.0], help="noise levels, 8-bit units")
    p.add_argument("--iterations", type=int, nargs="+", default=[10, 50])
    p.add_argument("--methods", type=str, nargs="+", default=["pnp", "l1", "l2", "none"])
    p.add_argument("--pnp_lambdas", type=float, nargs="+", default=None)
    p.add_argument("--l1_lambdas", type=float, nargs="+", default=None)
    p.add_argument("--estimate_blur_std", type=float, default=0.0,
                   help="if > 0, give the M-step a degraded estimate (the sharp image blurred by a Gaussian of this std, "
                   "mimicking the smooth x0 predictions of the diffusion E-step) instead of the true sharp image")
    p.add_argument("--noise_seed", type=int, default=0)
    p.add_argument("--output", type=str, default=None, help="write all results to this JSON file")
    p.add_argument("--num_threads", type=int, default=None)
    return p.parse_args(argv)


def load_image(name: str, size: int) -> torch.Tensor:
    """A photograph (a file path, or the name of a scikit-image sample), centre-cropped to a square,
    resized to ``size``, ``(1, 3, s, s)`` in [0, 1]."""
    from PIL import Image
    from skimage import data

    if Path(name).is_file():
        array = np.asarray(Image.open(name).convert("RGB"))
    else:
        array = getattr(data, name)()
    if array.ndim == 2:
        array = np.stack([array] * 3, -1)
    array = array[..., :3]
    h, w = array.shape[:2]
    s = min(h, w)
    array = array[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    image = Image.fromarray(array).resize((size, size), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def make_problem(image_name: str, args, kernel_size: int, seed: int):
    image = load_image(image_name, args.image_size)
    kernels = MotionKernelGenerator(kernel_size, args.intensity)(args.num_kernels, seed)
    sharp = image.expand(args.num_kernels, -1, -1, -1).contiguous().double()
    gen = torch.Generator().manual_seed(args.noise_seed + seed)
    clean = fft_blur(sharp, kernels.double())
    noise = torch.randn(clean.shape, generator=gen, dtype=torch.float64)
    if args.estimate_blur_std > 0:
        blur = gaussian_kernel(2 * int(3 * args.estimate_blur_std) + 1, args.estimate_blur_std).double()
        sharp = fft_blur(sharp, blur)  # the estimate handed to the M-step; y was made from the true image
    return sharp, kernels.double(), clean, noise


def geomean(values) -> float:
    return float(np.exp(np.mean(np.log(list(values)))))


def kernel_mse(estimate: torch.Tensor, truth: torch.Tensor) -> float:
    return (estimate.double() - truth.double()).square().mean().item()


def build_estimator(method: str, lam: float, iterations: int, kernel_size: int, trained: KernelEstimator | None):
    if method == "pnp":
        return KernelEstimator.from_denoiser(
            trained.denoiser, kernel_size=kernel_size, lambda_=lam, beta=trained.config.beta, num_iterations=iterations
        ).double()
    return KernelEstimator(kernel_size=kernel_size, lambda_=lam, num_iterations=iterations, regularization=method).double()


@torch.no_grad()
def evaluate(problem, args, method, lam, iterations, kernel_size, trained) -> dict[float, float]:
    sharp, kernels, clean, noise = problem
    estimator = build_estimator(method, lam, iterations, kernel_size, trained)
    out = {}
    for sigma8 in args.sigmas:
        sigma = sigma8 / 255.0
        y = clean + sigma * noise
        est = estimator(y, sharp, sigma)
        out[sigma8] = kernel_mse(est, kernels)
    return out


def format_table(title: str, rows: dict, sigmas) -> str:
    lines = [title, "| method | lambda_ | " + " | ".join(f"σ={s:g}" for s in sigmas) + " | geo-mean |", "|---" * (len(sigmas) + 3) + "|"]
    for name, (lam, res) in rows.items():
        vals = [res[s] for s in sigmas]
        lines.append(f"| {name} | {lam:g} | " + " | ".join(f"{v:.3e}" for v in vals) + f" | {geomean(vals):.3e} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    trained = None
    if "pnp" in args.methods:
        if not Path(args.estimator).exists():
            sys.exit(f"no estimator at {args.estimator}; train one with scripts/train_kernel_denoiser.py")
        trained = KernelEstimator.from_pretrained(args.estimator)
    kernel_size = args.kernel_size or (trained.config.kernel_size if trained is not None else 33)
    grids = dict(DEFAULT_GRIDS)
    if args.pnp_lambdas:
        grids["pnp"] = args.pnp_lambdas
    if args.l1_lambdas:
        grids["l1"] = args.l1_lambdas
    t0 = time.time()
    tune = make_problem(args.tune_image, args, kernel_size, args.tune_seed)
    test = make_problem(args.test_image, args, kernel_size, args.test_seed)
    results = {"args": vars(args), "dirac": {}, "tuning": [], "test": {}}
    for name, problem in (("tune", tune), ("test", test)):
        dirac = dirac_kernel(kernel_size, args.num_kernels, dtype=torch.float64)
        results["dirac"][name] = kernel_mse(dirac, problem[1])
    print(f"kernel {kernel_size}x{kernel_size}, {args.num_kernels} motion kernels (intensity {args.intensity}); "
          f"Dirac-init MSE tune {results['dirac']['tune']:.3e}, test {results['dirac']['test']:.3e}")

    report = []
    for iterations in args.iterations:
        best, oracle = {}, {}
        for method in args.methods:
            for lam in grids[method]:
                res = evaluate(tune, args, method, lam, iterations, kernel_size, trained)
                results["tuning"].append({"iterations": iterations, "method": method, "lambda_": lam, **{str(k): v for k, v in res.items()}})
                print(f"  [tune] iters {iterations} {method:4s} lambda {lam:<8g} " + "  ".join(f"σ{s:g}: {v:.3e}" for s, v in res.items()), flush=True)
                if method not in best or geomean(res.values()) < geomean(best[method][1].values()):
                    best[method] = (lam, res)
                for s, v in res.items():
                    if (method, s) not in oracle or v < oracle[(method, s)][1]:
                        oracle[(method, s)] = (lam, v)
        test_rows = {m: (lam, evaluate(test, args, m, lam, iterations, kernel_size, trained)) for m, (lam, _) in best.items()}
        results["test"][iterations] = {m: {"lambda_": lam, **{str(k): v for k, v in r.items()}} for m, (lam, r) in test_rows.items()}
        report.append(format_table(f"\n### {iterations} HQS iterations from a Dirac — tuning set ({args.tune_image}, seeds {args.tune_seed}+), best lambda_ per method", best, args.sigmas))
        report.append(format_table(f"\n### {iterations} HQS iterations from a Dirac — held-out test set ({args.test_image}, seeds {args.test_seed}+), same lambda_", test_rows, args.sigmas))
        report.append("per-σ best lambda_ on the tuning set: " + "; ".join(f"{m} σ={s:g}: {lam:g} ({v:.2e})" for (m, s), (lam, v) in oracle.items()))
    text = "\n".join(report)
    print(text)
    print(f"\n(Dirac init kernel MSE: tune {results['dirac']['tune']:.3e}, test {results['dirac']['test']:.3e}; {time.time() - t0:.0f}s)")
    results["report"] = text
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
