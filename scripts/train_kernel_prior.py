#!/usr/bin/env python
"""Train a kernel diffusion prior (BlindDPS's kernel model) on synthetic blur kernels.

The model is a small ``UNet2DModel`` with one input channel, trained with the epsilon-prediction MSE
on kernels drawn from the package's seeded generators (BlindDPS App. F trains on 50k motion kernels
of random intensity and 10k Gaussians; here every batch is freshly drawn): a fraction
``--gaussian_fraction`` of random anisotropic Gaussians, the rest camera-shake kernels with intensity
uniform in ``--intensity_range`` (high intensities give long, thin, curved shake). Kernels are
mapped to the model range with ``2·k/max(k) − 1`` (``diffusers_blind.ops.kernel_to_model_range``).

Schedule: linear betas 1e-4 → 0.02, 1000 steps. ``--variance fixed_small`` (default) trains ε only;
``--variance learned_range`` adds a second output channel and Improved DDPM's hybrid loss
``L_simple + λ·L_vlb`` (λ = 1e-3, stop-gradient on the mean; the t = 0 term is the KL like the others).

accelerate handles the device; ``--resume latest`` restarts from the newest ``checkpoint-N`` folder;
an EMA copy of the weights is exported as ``<output_dir>/export/{unet,scheduler}`` (and to
``--export_dir/kernel_unet``) every ``--export_every_minutes`` and at the end.

Example (CPU, background)::

    nohup nice -n 10 env OMP_NUM_THREADS=1 python scripts/train_kernel_prior.py \
        --output_dir runs/kernel_prior --kernel_size 32 --max_minutes 75 \
        > runs/kernel_prior/train.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_image_prior import latest_checkpoint, prune_checkpoints  # noqa: E402


# ----------------------------------------------------------------------------- args
CHOICES = {  # the closed-set options (also those of scripts/train_tilt_prior.py)
    "attention": ["none", "lowest"],
    "variance": ["fixed_small", "fixed_large", "learned_range"],
    "mixed_precision": ["no", "fp16", "bf16"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a BlindDPS-style kernel diffusion prior on synthetic kernels.")
    p.add_argument("--output_dir", type=Path, required=True, help="run folder: checkpoints, logs, samples, export")
    p.add_argument("--export_dir", type=Path, default=None,
                   help="also export the EMA model as <export_dir>/kernel_unet (a pipeline folder)")
    p.add_argument("--export_every_minutes", type=float, default=10.0)
    # data
    p.add_argument("--kernel_size", type=int, default=64, help="kernel (= model) size in pixels, a multiple of 2^(levels-1)")
    p.add_argument("--intensity_range", type=float, nargs=2, default=[0.05, 1.0], help="motion intensity, uniform")
    p.add_argument("--gaussian_fraction", type=float, default=1 / 6, help="share of Gaussian kernels (App. F: 10k of 60k)")
    p.add_argument("--gaussian_std_range", type=float, nargs=2, default=None,
                   help="Gaussian std range in pixels (default: 0.5 to kernel_size/10)")
    # model
    p.add_argument("--block_out_channels", type=int, nargs="+", default=[32, 64, 64, 128])
    p.add_argument("--layers_per_block", type=int, default=1)
    p.add_argument("--attention", choices=CHOICES["attention"], default="none")
    p.add_argument("--norm_num_groups", type=int, default=None, help="default: min(32, smallest channel count)")
    p.add_argument("--variance", choices=CHOICES["variance"], default="fixed_small")
    p.add_argument("--vlb_weight", type=float, default=1e-3, help="λ of the hybrid loss (learned_range only)")
    # optimisation
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=3e-4)
    p.add_argument("--lr_warmup_steps", type=int, default=200)
    p.add_argument("--adam_weight_decay", type=float, default=1e-6)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--max_train_steps", type=int, default=1_000_000)
    p.add_argument("--max_minutes", type=float, default=None, help="stop cleanly after this wall time (this process)")
    p.add_argument("--mixed_precision", choices=CHOICES["mixed_precision"], default="no")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--num_workers", type=int, default=0,
                   help="data-loader processes that draw the batches (0: in the training process); the batches "
                        "are the same for any value, since each is seeded by its step")
    # EMA
    p.add_argument("--ema_max_decay", type=float, default=0.9999)
    p.add_argument("--ema_power", type=float, default=0.75)
    # logging / checkpoints / samples
    p.add_argument("--log_every", type=int, default=25)
    p.add_argument("--checkpointing_steps", type=int, default=250)
    p.add_argument("--checkpoints_total_limit", type=int, default=2)
    p.add_argument("--resume", default=None, help='"latest" or a checkpoint folder')
    p.add_argument("--init_from", type=Path, default=None,
                   help="start from the weights of an exported UNet folder (e.g. the shipped prior; a fresh run only; "
                        "the architecture flags must match it)")
    p.add_argument("--sample_every", type=int, default=1000, help="write a sample grid every N steps (0: only at end)")
    p.add_argument("--num_sample_images", type=int, default=16)
    p.add_argument("--sample_steps", type=int, default=100, help="DDPM steps (respaced) for the sample grid")
    p.add_argument("--no_final_samples", action="store_true")
    args = p.parse_args(argv)
    levels = len(args.block_out_channels)
    if args.kernel_size % 2 ** (levels - 1):
        p.error(f"--kernel_size {args.kernel_size} must be a multiple of {2 ** (levels - 1)} for {levels} UNet levels")
    if not 0 <= args.gaussian_fraction <= 1:
        p.error("--gaussian_fraction must be in [0, 1]")
    lo, hi = args.intensity_range
    if not 0 <= lo <= hi <= 1:
        p.error("--intensity_range must satisfy 0 <= low <= high <= 1")
    if args.gaussian_std_range is None:
        args.gaussian_std_range = [0.5, max(1.0, args.kernel_size / 10)]
    return args


# ----------------------------------------------------------------------------- model / scheduler
def build_unet(args, channels: int = 1, sample_size: int | None = None):
    """The prior's ``UNet2DModel``: ``channels`` in, ``channels`` out (twice that for a learned variance)."""
    from diffusers import UNet2DModel

    n = len(args.block_out_channels)
    down, up = ["DownBlock2D"] * n, ["UpBlock2D"] * n
    if args.attention == "lowest":
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=args.kernel_size if sample_size is None else sample_size,
        in_channels=channels,
        out_channels=2 * channels if args.variance == "learned_range" else channels,
        layers_per_block=args.layers_per_block,
        block_out_channels=tuple(args.block_out_channels),
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=args.norm_num_groups or min(32, min(args.block_out_channels)),
    )


def build_scheduler(variance: str = "fixed_small", num_train_timesteps: int = 1000):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
        prediction_type="epsilon", variance_type=variance, clip_sample=True, timestep_spacing="linspace",
    )


# ----------------------------------------------------------------------------- data
class KernelSampler:
    """Fresh seeded batches of training kernels in the model range ``[-1, 1]``."""

    def __init__(self, kernel_size: int, intensity_range, gaussian_fraction: float, gaussian_std_range):
        from diffusers_blind.ops import GaussianKernelGenerator, MotionKernelGenerator

        self.motion = MotionKernelGenerator(kernel_size, tuple(intensity_range))
        self.gaussian = GaussianKernelGenerator(kernel_size, tuple(gaussian_std_range))
        self.gaussian_fraction = gaussian_fraction

    def kernels(self, n: int, rng: np.random.Generator) -> torch.Tensor:
        """``n`` sum-1 kernels ``(n, 1, k, k)``; each is Gaussian with probability ``gaussian_fraction``."""
        out = [self.gaussian(1, rng) if rng.uniform() < self.gaussian_fraction else self.motion(1, rng) for _ in range(n)]
        return torch.cat(out)

    def batch(self, n: int, rng: np.random.Generator) -> torch.Tensor:
        from diffusers_blind.ops import kernel_to_model_range

        return kernel_to_model_range(self.kernels(n, rng))


class StepBatches(torch.utils.data.Dataset):
    """Item ``step`` is the training batch of that step, drawn with the seed ``(seed, step)``.

    Indexing by step keeps the data reproducible and resumable for any number of loader workers.
    """

    def __init__(self, sampler, batch_size: int, seed: int, num_steps: int):
        self.sampler, self.batch_size, self.seed, self.num_steps = sampler, batch_size, seed, num_steps

    def __len__(self) -> int:
        return self.num_steps

    def __getitem__(self, step: int) -> torch.Tensor:
        return self.sampler.batch(self.batch_size, np.random.default_rng([self.seed, step]))


def step_batch_loader(sampler, args, start_step: int):
    """Batches for steps ``start_step, start_step + 1, ...`` (in order), from ``args.num_workers`` processes."""
    dataset = StepBatches(sampler, args.batch_size, args.seed, args.max_train_steps)
    workers = getattr(args, "num_workers", 0)
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=range(start_step, args.max_train_steps), num_workers=workers,
        persistent_workers=False, prefetch_factor=4 if workers else None, pin_memory=torch.cuda.is_available())


# ----------------------------------------------------------------------------- learned variance
def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def vlb_loss(scheduler, model_output, x_t, x0, t) -> torch.Tensor:
    """Improved-DDPM ``L_vlb`` (bits/dim) for a ``learned_range`` output ``[ε̂, v]``, ε̂ detached."""
    acp = scheduler.alphas_cumprod.to(x_t.device)
    betas = scheduler.betas.to(x_t.device)
    acp_prev = torch.cat([torch.ones(1, device=x_t.device), acp[:-1]])
    a, a_prev, b = acp[t].view(-1, 1, 1, 1), acp_prev[t].view(-1, 1, 1, 1), betas[t].view(-1, 1, 1, 1)
    post_var = b * (1 - a_prev) / (1 - a)
    c0, ct = a_prev.sqrt() * b / (1 - a), (1 - b).sqrt() * (1 - a_prev) / (1 - a)
    true_mean, true_logvar = c0 * x0 + ct * x_t, torch.log(post_var.clamp_min(1e-20))
    channels = x_t.shape[1]
    eps, v = model_output[:, :channels].detach(), model_output[:, channels:]
    x0_hat = ((x_t - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
    min_log, max_log = torch.log(post_var.clamp_min(1e-20)), torch.log(b)
    frac = (v + 1) / 2
    model_logvar = frac * max_log + (1 - frac) * min_log
    model_mean = c0 * x0_hat + ct * x_t
    kl = _normal_kl(true_mean, true_logvar, model_mean, model_logvar)
    return kl.flatten(1).mean(1).mean() / math.log(2.0)


# ----------------------------------------------------------------------------- samples
@torch.no_grad()
def sample_kernels(unet, scheduler, n: int, steps: int, seed: int) -> torch.Tensor:
    """``n`` unconditional samples (model range) with a respaced ancestral DDPM sampler."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(scheduler.config)
    sched.set_timesteps(steps)
    device = next(unet.parameters()).device
    g = torch.Generator().manual_seed(seed)
    size, channels = unet.config.sample_size, unet.config.in_channels
    x = torch.randn(n, channels, size, size, generator=g).to(device)
    was_training = unet.training
    unet.eval()
    for t in sched.timesteps:
        out = unet(x, t.to(device)).sample
        if sched.config.variance_type not in ("learned", "learned_range"):
            out = out[:, :channels]
        x = sched.step(out, t, x, generator=g).prev_sample
    unet.train(was_training)
    return x


def save_kernel_grid(images: torch.Tensor, path: Path, cols: int | None = None, scale: int = 2,
                     background: str = "none") -> None:
    """Write model-range kernel images as a PNG grid, each kernel stretched to its own peak (white = max)."""
    from diffusers_blind.ops import model_range_to_kernel

    kernels = model_range_to_kernel(images.float().cpu(), background)
    peaks = kernels.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    tiles = (kernels / peaks * 255).round().to(torch.uint8)[:, 0]
    n, h, w = tiles.shape
    cols = cols or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    pad = 2
    grid = torch.full((rows * (h + pad) + pad, cols * (w + pad) + pad), 96, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = tiles[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.numpy()).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def export_model(unet, scheduler, output_dir: Path, export_dir: Path | None, info: dict,
                 component: str = "kernel_unet") -> Path:
    """Write ``<output_dir>/export/{unet,scheduler}``; with ``export_dir`` also ``<export_dir>/<component>``."""
    exp = output_dir / "export"
    tmp = output_dir / "export_tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    scheduler.save_pretrained(tmp / "scheduler")
    (tmp / "unet" / "training_info.json").write_text(json.dumps(info, indent=1))
    targets = [(tmp / "unet", exp / "unet"), (tmp / "scheduler", exp / "scheduler")]
    if export_dir is not None:
        targets.append((tmp / "unet", Path(export_dir) / component))
    for src, dst in targets:
        dst.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            staged = dst / f".{f.name}.tmp"
            shutil.copy2(f, staged)
            os.chmod(staged, 0o644)
            os.replace(staged, dst / f.name)
    shutil.rmtree(tmp, ignore_errors=True)
    return exp


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from diffusers_blind.io import check_training_folder

    check_training_folder(args.output_dir, args.resume)
    sampler = KernelSampler(args.kernel_size, args.intensity_range, args.gaussian_fraction, args.gaussian_std_range)
    info = {"kernel_size": args.kernel_size, "intensity_range": args.intensity_range,
            "gaussian_fraction": args.gaussian_fraction, "gaussian_std_range": args.gaussian_std_range}
    return train(args, sampler, channels=1, sample_size=args.kernel_size, component="kernel_unet",
                 save_grid=save_kernel_grid, info_extra=info)


def train(args, sampler, channels: int, sample_size: int, component: str, save_grid, info_extra: dict) -> dict:
    """The training loop shared by the kernel and tilt priors: ``sampler.batch(n, rng)`` gives model-range data."""
    t_start = time.time()
    torch.set_num_threads(args.num_threads)

    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    args.output_dir.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(mixed_precision=args.mixed_precision,
                              project_config=ProjectConfiguration(project_dir=str(args.output_dir)))
    set_seed(args.seed)

    unet = build_unet(args, channels, sample_size)
    if getattr(args, "init_from", None) is not None:
        unet.load_state_dict(UNet2DModel.from_pretrained(args.init_from).state_dict())
    noise_scheduler = build_scheduler(args.variance)
    n_params = sum(p.numel() for p in unet.parameters())
    ema = EMAModel(unet.parameters(), decay=args.ema_max_decay, use_ema_warmup=True, inv_gamma=1.0,
                   power=args.ema_power, model_cls=UNet2DModel, model_config=unet.config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    lr_sched = get_scheduler("constant_with_warmup", optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps,
                             num_training_steps=args.max_train_steps)
    unet, optimizer, lr_sched = accelerator.prepare(unet, optimizer, lr_sched)
    ema.to(accelerator.device)
    accelerator.register_for_checkpointing(ema)

    global_step = 0
    if args.resume:
        ckpt = latest_checkpoint(args.output_dir) if args.resume == "latest" else Path(args.resume)
        if ckpt is None:
            accelerator.print("[train] --resume latest: no checkpoint found, starting from scratch")
        else:
            accelerator.load_state(str(ckpt))
            ema.to(accelerator.device)  # the EMA state is loaded on the CPU
            global_step = int(ckpt.name.split("-")[1])
            accelerator.print(f"[train] resumed from {ckpt} at step {global_step}")

    accelerator.print(f"[train] {component} {sample_size}x{sample_size}x{channels} | UNet {n_params / 1e6:.3f}M params | "
                      f"variance {args.variance} | batch {args.batch_size} | start step {global_step}")
    (args.output_dir / "args.json").write_text(
        json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, indent=1))
    log_path, sample_dir = args.output_dir / "loss_log.jsonl", args.output_dir / "samples"

    def ema_unet():
        model = UNet2DModel.from_config(accelerator.unwrap_model(unet).config)
        ema.copy_to(model.parameters())
        return model.to(accelerator.device)

    loss_acc, n_acc, loss_avg = 0.0, 0, None

    def do_export(reason: str):
        model = ema_unet()
        info = {"step": global_step, "reason": reason, "params": n_params, "minutes": (time.time() - t_start) / 60,
                "loss_ema": loss_avg, "variance": args.variance, "batch_size": args.batch_size, "seed": args.seed,
                **info_extra}
        exp = export_model(model, noise_scheduler, args.output_dir, args.export_dir, info, component)
        accelerator.print(f"[train] exported EMA model at step {global_step} -> {exp}", flush=True)
        return model

    def do_checkpoint():
        path = args.output_dir / f"checkpoint-{global_step}"
        accelerator.save_state(str(path))
        prune_checkpoints(args.output_dir, args.checkpoints_total_limit)
        accelerator.print(f"[train] saved {path}", flush=True)

    unet.train()
    t_log = t_last_export = time.time()
    steps_this_run, stop_reason = 0, "max_train_steps"
    for clean in step_batch_loader(sampler, args, global_step):  # batch of step global_step, seeded by it
        if args.max_minutes is not None and (time.time() - t_start) / 60 >= args.max_minutes:
            stop_reason = "max_minutes"
            break
        clean = clean.to(accelerator.device, non_blocking=True)
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + global_step)
        noise = torch.randn(clean.shape, generator=g).to(clean.device)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean.shape[0],), generator=g)
        timesteps = timesteps.to(clean.device)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        with accelerator.accumulate(unet):
            out = unet(noisy, timesteps).sample
            loss = F.mse_loss(out[:, :channels].float(), noise.float())
            if args.variance == "learned_range":
                loss = loss + args.vlb_weight * vlb_loss(noise_scheduler, out.float(), noisy, clean, timesteps)
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm:
                accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
            optimizer.step()
            lr_sched.step()
            optimizer.zero_grad(set_to_none=True)
        ema.step(unet.parameters())
        global_step += 1
        steps_this_run += 1
        loss_acc += float(loss.detach())
        n_acc += 1

        if global_step % args.log_every == 0:
            dt = time.time() - t_log
            loss_avg = loss_acc / n_acc
            rec = {"step": global_step, "loss": loss_avg, "lr": lr_sched.get_last_lr()[0], "ema_decay": ema.cur_decay_value,
                   "steps_per_s": n_acc / max(dt, 1e-9), "minutes": (time.time() - t_start) / 60}
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            accelerator.print(f"[train] step {global_step} loss {loss_avg:.5f} lr {rec['lr']:.2e} "
                              f"{rec['steps_per_s']:.2f} it/s {rec['minutes']:.1f} min", flush=True)
            loss_acc, n_acc, t_log = 0.0, 0, time.time()
        if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
            do_checkpoint()
        if args.sample_every and global_step % args.sample_every == 0:
            x = sample_kernels(ema_unet(), noise_scheduler, args.num_sample_images, args.sample_steps, args.seed)
            save_grid(x, sample_dir / f"step_{global_step:07d}.png")
        if args.export_every_minutes and (time.time() - t_last_export) / 60 >= args.export_every_minutes:
            do_export("periodic")
            t_last_export = time.time()

    if n_acc:
        loss_avg = loss_acc / n_acc
    if steps_this_run:
        do_checkpoint()
    final = do_export(f"final ({stop_reason})")
    if not args.no_final_samples:
        x = sample_kernels(final, noise_scheduler, args.num_sample_images, args.sample_steps, args.seed)
        save_grid(x, sample_dir / f"final_step_{global_step:07d}.png")
    accelerator.print(f"[train] done: step {global_step}, stop: {stop_reason}, {(time.time() - t_start) / 60:.1f} min")
    return {"global_step": global_step, "stop_reason": stop_reason, "params": n_params, "output_dir": str(args.output_dir)}


if __name__ == "__main__":
    main(sys.argv[1:])
