#!/usr/bin/env python
"""Train the Plug-and-Play kernel denoiser of Fast Diffusion EM and export a ``KernelEstimator``.

The denoiser ``D_σ(k)`` (:class:`diffusers_blind.KernelDenoiser`, an FDnCNN with a noise-level
channel) is trained as a plain Gaussian denoiser on sum-1 blur kernels (docs/conventions.md, "Kernel denoiser (PnP prior)"):

* a fixed pool of kernels is generated once (80 % seeded camera-shake kernels with random
  intensity, 20 % random anisotropic Gaussians), recentred, and cached to a ``.pt`` file;
* each batch draws kernels from the pool with a random flip / 90° rotation (re-centred);
* noisy copies ``k + σ·N(0, 1)`` with ``σ`` log-uniform in ``[sigma_min, sigma_max]`` (sum-1 units,
  bracketing the HQS level ``√(λ/β) ≈ 3.2e-3``);
* loss ``MSE(D(k + noise, σ), k)`` (or L1), computed in the network's scaled units
  (``input_scale``) so that Adam's ``eps`` does not swamp the tiny sum-1 gradients;
* Adam with a cosine learning-rate decay ``lr → lr_min``.

A held-out kernel set (different seed) gives the validation curve "kernel-denoising MSE vs noise
level", written to ``<output_dir>/validation.csv`` and plotted to ``validation.png`` when
matplotlib is installed. Checkpoints are ``accelerator.save_state`` folders under
``<output_dir>/checkpoints``; ``--resume latest`` (or a folder) continues a run. The final
denoiser is exported as ``KernelEstimator.from_denoiser(...).save_pretrained(export_dir)``.

Example (CPU, ~30 min)::

    python scripts/train_kernel_denoiser.py --kernel_size 33 --output_dir runs/kd33 \\
        --export_dir src/diffusers_blind/default_model/kernel_estimator --max_steps 8000
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed

from diffusers_blind.models import KernelDenoiser, KernelEstimator
from diffusers_blind.ops.kernels import (
    GaussianKernelGenerator, MotionKernelGenerator, ShakeKernelGenerator, center_kernel, project_kernel)


VALIDATION_SIGMAS = (3e-4, 1e-3, 2e-3, 3.16e-3, 5e-3, 1e-2, 2e-2, 3e-2)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernel_size", type=int, default=33)
    p.add_argument("--output_dir", type=str, required=True, help="run folder: checkpoints, CSV, plot")
    p.add_argument("--channel_mode", choices=("mean", "joint"), default="joint",
                   help="how the exported estimator combines colour channels (see docs/kernel_estimation.md)")
    p.add_argument("--export_dir", type=str, default=None, help="where to save the KernelEstimator (default <output_dir>/kernel_estimator)")
    p.add_argument("--pool_cache", type=str, default=None, help=".pt cache of the kernel pool (default <output_dir>/pool_k<K>_n<N>_s<seed>.pt)")
    p.add_argument("--num_kernels", type=int, default=4000, help="size of the training kernel pool")
    p.add_argument("--num_val_kernels", type=int, default=200)
    p.add_argument("--motion_fraction", type=float, default=0.8, help="fraction of motion kernels (rest Gaussian)")
    p.add_argument("--shake_fraction", type=float, default=0.0,
                   help="fraction of ops.shake_kernel kernels (inertial trajectories of uneven brightness), taken from the Gaussian share")
    p.add_argument("--shake_extent_range", type=float, nargs=2, default=(0.2, 0.8),
                   help="path extent of the shake kernels, as a fraction of the kernel size")
    p.add_argument("--intensity_range", type=float, nargs=2, default=(0.1, 1.0))
    p.add_argument("--gaussian_std_range", type=float, nargs=2, default=None, help="default (0.5, k/8)")
    p.add_argument("--sigma_min", type=float, default=3e-4)
    p.add_argument("--sigma_max", type=float, default=3e-2)
    p.add_argument("--input_scale", type=float, default=None, help="default k*k/4")
    p.add_argument("--hidden_channels", type=int, default=32)
    p.add_argument("--num_layers", type=int, default=5)
    p.add_argument("--loss", choices=("mse", "l1"), default="mse")
    p.add_argument("--project_inputs", action="store_true", help="also train on projected (>=0, sum 1) noisy kernels (half the batch)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr_min", type=float, default=1e-4)
    p.add_argument("--max_steps", type=int, default=8000)
    p.add_argument("--val_every", type=int, default=500)
    p.add_argument("--checkpoint_every", type=int, default=1000)
    p.add_argument("--log_every", type=int, default=100)
    p.add_argument("--lambda_", type=float, default=1.0, help="lambda_ written into the exported estimator config")
    p.add_argument("--beta", type=float, default=1e5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val_seed", type=int, default=1_000_003)
    p.add_argument("--resume", type=str, default=None, help="'latest' or a checkpoint folder")
    p.add_argument("--init_from", type=str, default=None,
                   help="initialise the weights from a KernelDenoiser folder, a KernelEstimator folder or a checkpoint folder "
                   "(e.g. fine-tune a 64x64 denoiser from the 33x33 one; the fully convolutional weights fit any size)")
    p.add_argument("--max_minutes", type=float, default=None, help="stop (validate, checkpoint, export) after this wall time")
    p.add_argument("--num_threads", type=int, default=None, help="torch.set_num_threads on CPU")
    p.add_argument("--no_plot", action="store_true")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------- data
def make_kernels(kernel_size: int, count: int, seed: int, args: argparse.Namespace) -> torch.Tensor:
    """``count`` recentred sum-1 kernels ``(count, 1, k, k)``: motion, then shake, then Gaussian (deterministic in ``seed``)."""
    num_motion = int(round(args.motion_fraction * count))
    num_shake = min(int(round(args.shake_fraction * count)), count - num_motion)
    std_range = tuple(args.gaussian_std_range) if args.gaussian_std_range else (0.5, max(1.0, kernel_size / 8))
    parts = []
    if num_motion:
        parts.append(MotionKernelGenerator(kernel_size, tuple(args.intensity_range))(num_motion, seed))
    if num_shake:
        parts.append(ShakeKernelGenerator(kernel_size, tuple(args.shake_extent_range))(num_shake, seed + 2))
    if count - num_motion - num_shake:
        parts.append(GaussianKernelGenerator(kernel_size, std_range)(count - num_motion - num_shake, seed + 1))
    return center_kernel(torch.cat(parts)).float()


def pool_settings(args: argparse.Namespace) -> dict:
    """Everything that decides the kernel pool: a cached pool is reused only when all of it matches."""
    return {"kernel_size": args.kernel_size, "num_kernels": args.num_kernels, "seed": args.seed,
            "motion_fraction": float(args.motion_fraction), "shake_fraction": float(args.shake_fraction),
            "intensity_range": [float(v) for v in args.intensity_range],
            "shake_extent_range": [float(v) for v in args.shake_extent_range],
            "gaussian_std_range": [float(v) for v in args.gaussian_std_range] if args.gaussian_std_range else None}


def load_pool(args: argparse.Namespace, accelerator: Accelerator) -> torch.Tensor:
    """The training kernel pool: from the cache when it was made with the same settings, else generated (and cached)."""
    k = args.kernel_size
    path = Path(args.pool_cache or Path(args.output_dir) / f"pool_k{k}_n{args.num_kernels}_s{args.seed}.pt")
    settings = pool_settings(args)
    if path.exists():
        try:
            cached = torch.load(path)
        except Exception as error:  # a corrupt or foreign file: regenerated, like a cache of other settings
            cached = {"error": str(error)}
        if isinstance(cached, dict) and cached.get("settings") == settings and torch.is_tensor(cached.get("pool")):
            accelerator.print(f"loaded kernel pool {tuple(cached['pool'].shape)} from {path}")
            return cached["pool"]
        accelerator.print(f"cache {path} was made with other settings (or by an older version); regenerating")
    t0 = time.time()
    pool = make_kernels(k, args.num_kernels, args.seed, args)
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"pool": pool, "settings": settings}, path)
    accelerator.print(f"generated kernel pool {tuple(pool.shape)} in {time.time() - t0:.1f}s -> {path}")
    return pool


def augment(kernels: torch.Tensor) -> torch.Tensor:
    """Random element of the dihedral group D4 per kernel (flips + 90° rotations), then recentre."""
    b = kernels.shape[0]
    choice = torch.randint(0, 8, (b,))
    out = kernels.clone()
    for t in range(1, 8):
        mask = choice == t
        if mask.any():
            x = kernels[mask]
            if t & 1:
                x = x.flip(-1)
            x = torch.rot90(x, t >> 1, dims=(-2, -1))
            out[mask] = x
    # For odd sizes the centre k//2 is a fixed point of D4; for even sizes it moves by one pixel.
    return center_kernel(out) if kernels.shape[-1] % 2 == 0 else out


# ----------------------------------------------------------------------------------- validation
@torch.no_grad()
def validate(model: KernelDenoiser, val_kernels: torch.Tensor, seed: int, device) -> list[dict]:
    model.eval()
    rows = []
    gen = torch.Generator().manual_seed(seed)
    clean = val_kernels.to(device)
    for sigma in VALIDATION_SIGMAS:
        noise = torch.randn(val_kernels.shape, generator=gen).to(device)
        noisy = clean + sigma * noise
        out = model(noisy, sigma)
        rows.append(
            {
                "sigma": sigma,
                "mse_noisy": F.mse_loss(noisy, clean).item(),
                "mse_denoised": F.mse_loss(out, clean).item(),
                "mse_denoised_projected": F.mse_loss(project_kernel(out), clean).item(),
            }
        )
    model.train()
    return rows


def write_outputs(output_dir: Path, history: dict, args, final: bool) -> None:
    with open(output_dir / "validation.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "sigma", "mse_noisy", "mse_denoised", "mse_denoised_projected"])
        writer.writeheader()
        for row in history["val"]:
            writer.writerow(row)
    with open(output_dir / "train_loss.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "loss", "lr"])
        writer.writeheader()
        for row in history["train"]:
            writer.writerow(row)
    if args.no_plot or not history["val"]:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if final:
            print("matplotlib is not installed: skipping validation.png (pip install matplotlib)")
        return
    last = max(r["step"] for r in history["val"])
    rows = [r for r in history["val"] if r["step"] == last]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    ax.loglog([r["sigma"] for r in rows], [r["mse_noisy"] for r in rows], "k--", label="noisy input")
    ax.loglog([r["sigma"] for r in rows], [r["mse_denoised"] for r in rows], "o-", label="denoised")
    ax.loglog([r["sigma"] for r in rows], [r["mse_denoised_projected"] for r in rows], "s-", label="denoised + projection")
    ax.axvline(math.sqrt(args.lambda_ / args.beta), color="gray", lw=0.8, label="sqrt(lambda/beta)")
    ax.set_xlabel("noise sigma (sum-1 kernel units)")
    ax.set_ylabel("kernel MSE")
    ax.set_title(f"{args.kernel_size}x{args.kernel_size} validation, step {last}")
    ax.legend()
    ax = axes[1]
    steps = sorted({r["step"] for r in history["val"]})
    for sigma in (1e-3, 3.16e-3, 1e-2):
        ax.semilogy(steps, [r["mse_denoised"] for r in history["val"] if r["sigma"] == sigma], label=f"val sigma={sigma:g}")
    ax.set_xlabel("step")
    ax.set_ylabel("kernel MSE")
    ax.legend()
    fig.tight_layout()
    fig.savefig(output_dir / "validation.png", dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------- main
def load_body_weights(path: Path) -> dict:
    """The ``body.*`` weights of a denoiser saved as a KernelDenoiser / KernelEstimator folder or a checkpoint."""
    from safetensors.torch import load_file

    files = [path / "model.safetensors", path / "diffusion_pytorch_model.safetensors"]
    state = load_file(str(next(f for f in files if f.exists())))
    body = {}
    for name, value in state.items():
        if "body." in name:
            body[name[name.index("body.") + len("body.") :]] = value
    return body


def find_checkpoint(output_dir: Path, resume: str) -> Path | None:
    if resume != "latest":
        return Path(resume)
    ckpts = [p for p in (output_dir / "checkpoints").glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
    return max(ckpts, key=lambda p: int(p.name.split("-")[1])) if ckpts else None


def main(argv=None) -> dict:
    args = parse_args(argv)
    from diffusers_blind.io import check_training_folder

    check_training_folder(args.output_dir, args.resume, "checkpoints/checkpoint-*")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    accelerator = Accelerator()
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    k = args.kernel_size
    input_scale = args.input_scale if args.input_scale is not None else k * k / 4

    pool = load_pool(args, accelerator)
    val_kernels = make_kernels(k, args.num_val_kernels, args.val_seed, args)

    model = KernelDenoiser(hidden_channels=args.hidden_channels, num_layers=args.num_layers, input_scale=input_scale)
    if args.init_from:
        model.body.load_state_dict(load_body_weights(Path(args.init_from)))
        accelerator.print(f"initialised the denoiser weights from {args.init_from}")
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    # cosine decay lr -> lr_min over --max_steps, in closed form of the step count: a run resumed with a
    # larger --max_steps continues on the longer curve (a CosineAnnealingLR would keep the first run's period)
    total = max(args.max_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: (args.lr_min + (args.lr - args.lr_min) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))) / args.lr)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    device = accelerator.device

    step = 0
    history = {"val": [], "train": []}
    if args.resume:
        ckpt = find_checkpoint(output_dir, args.resume)
        if ckpt is None:
            accelerator.print("no checkpoint found, starting from scratch")
        else:
            accelerator.load_state(str(ckpt))
            meta = json.loads((ckpt / "train_state.json").read_text())
            step, history = meta["step"], meta["history"]
            accelerator.print(f"resumed from {ckpt} at step {step}")

    log_sigma = (math.log(args.sigma_min), math.log(args.sigma_max))
    running, t0 = 0.0, time.time()
    model.train()
    stop = False
    while step < args.max_steps and not stop:
        idx = torch.randint(0, pool.shape[0], (args.batch_size,))
        clean = augment(pool[idx]).to(device)
        sigma = torch.empty(args.batch_size).uniform_(*log_sigma).exp().to(device)
        noisy = clean + sigma.view(-1, 1, 1, 1) * torch.randn_like(clean)
        if args.project_inputs:
            half = args.batch_size // 2
            noisy = torch.cat([noisy[:half], project_kernel(noisy[half:])])
        out = model(noisy, sigma)
        # loss in the network's units (x input_scale): Adam is scale-invariant except for eps
        diff = (out - clean) * input_scale
        loss = diff.square().mean() if args.loss == "mse" else diff.abs().mean()
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        step += 1
        running += loss.item()
        stop = args.max_minutes is not None and time.time() - t0 > 60 * args.max_minutes
        if stop:
            accelerator.print(f"--max_minutes {args.max_minutes} reached at step {step}: stopping")

        if step % args.log_every == 0 or step == args.max_steps or stop:
            n = args.log_every if step % args.log_every == 0 else (step % args.log_every)
            lr = scheduler.get_last_lr()[0]
            history["train"].append({"step": step, "loss": running / n, "lr": lr})
            accelerator.print(f"step {step}: train {args.loss} (scaled units) {running / n:.4e}  lr {lr:.2e}  {time.time() - t0:.0f}s")
            running = 0.0
        if step % args.val_every == 0 or step == args.max_steps or stop:
            rows = validate(accelerator.unwrap_model(model), val_kernels, args.val_seed, device)
            history["val"].extend({"step": step, **r} for r in rows)
            accelerator.print(
                "  val mse: " + "  ".join(f"s={r['sigma']:.1e}: {r['mse_denoised']:.2e} (noisy {r['mse_noisy']:.1e})" for r in rows)
            )
            if accelerator.is_main_process:
                write_outputs(output_dir, history, args, final=False)
        if step % args.checkpoint_every == 0 or step == args.max_steps or stop:
            ckpt = output_dir / "checkpoints" / f"checkpoint-{step}"
            accelerator.save_state(str(ckpt))
            if accelerator.is_main_process:
                (ckpt / "train_state.json").write_text(json.dumps({"step": step, "history": history}))

    accelerator.wait_for_everyone()
    result = {"step": step, "history": history, "export_dir": None}
    if accelerator.is_main_process:
        write_outputs(output_dir, history, args, final=True)
        denoiser = accelerator.unwrap_model(model)
        denoiser.save_pretrained(output_dir / "denoiser")
        export_dir = Path(args.export_dir or output_dir / "kernel_estimator")
        estimator = KernelEstimator.from_denoiser(
            denoiser, kernel_size=k, lambda_=args.lambda_, beta=args.beta, channel_mode=args.channel_mode
        )
        estimator.save_pretrained(export_dir)
        accelerator.print(f"exported KernelEstimator(kernel_size={k}, lambda_={args.lambda_}) to {export_dir}")
        result["export_dir"] = str(export_dir)
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
