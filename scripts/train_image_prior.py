#!/usr/bin/env python
"""Train the small pixel-space image prior (an unconditional DDPM) of diffusers_blind.

The model is a small, fully convolutional ``UNet2DModel`` trained with the
epsilon-prediction MSE loss on random crops of downscaled photographs (see
``scripts/prepare_photos.py``).  Its shape follows diffusers'
``train_unconditional.py`` example: ``accelerate`` for device / mixed precision /
checkpointing, AdamW with warm-up, an EMA copy of the weights, periodic
``accelerator.save_state`` checkpoints that ``--resume latest`` picks up, a
JSONL loss log, occasional sample grids (DDIM, few steps) and an export of
the EMA UNet with ``save_pretrained`` plus the scheduler config.

Example (CPU, background)::

    nohup nice -n 10 python scripts/train_image_prior.py \
        --train_data_dir data/photos --output_dir runs/image_prior \
        --max_minutes 90 --export_dir src/diffusers_blind/default_model \
        > runs/image_prior/train.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


# ----------------------------------------------------------------------------- args
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train the diffusers_blind pixel-space image prior (DDPM).")
    p.add_argument("--train_data_dir", type=Path, required=True, help="folder of training images (PNG/JPEG)")
    p.add_argument("--output_dir", type=Path, required=True, help="run folder: checkpoints, logs, samples, export")
    p.add_argument("--export_dir", type=Path, default=None,
                   help="also export the EMA model here as <export_dir>/unet and <export_dir>/scheduler")
    p.add_argument("--export_every_minutes", type=float, default=15.0)
    # data
    p.add_argument("--resolution", type=int, default=64, help="square crop size")
    p.add_argument("--min_crop_std", type=float, default=0.02,
                   help="drop crops whose pixel std (in [0,1] units) is below this (near-flat)")
    p.add_argument("--no_rot90", action="store_true", help="disable random 90-degree rotations")
    # model
    p.add_argument("--block_out_channels", type=int, nargs="+", default=[32, 64, 128, 128])
    p.add_argument("--layers_per_block", type=int, default=1)
    p.add_argument("--attention", choices=["none", "lowest"], default="none",
                   help="self-attention nowhere (fully convolutional) or only at the lowest resolution")
    p.add_argument("--norm_num_groups", type=int, default=None, help="default: min(32, smallest channel count)")
    # optimisation
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=2e-4)
    p.add_argument("--lr_scheduler", choices=["constant_with_warmup", "cosine", "linear"], default="constant_with_warmup")
    p.add_argument("--lr_warmup_steps", type=int, default=500)
    p.add_argument("--adam_beta1", type=float, default=0.9)
    p.add_argument("--adam_beta2", type=float, default=0.999)
    p.add_argument("--adam_weight_decay", type=float, default=1e-6)
    p.add_argument("--adam_epsilon", type=float, default=1e-8)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--max_train_steps", type=int, default=1_000_000)
    p.add_argument("--max_minutes", type=float, default=None, help="stop cleanly after this wall time (this process)")
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--num_workers", type=int, default=0,
                   help="data-loader processes that cut the crops (0: in the training process); the batches are "
                        "the same for any value, since each is seeded by its step")
    # EMA
    p.add_argument("--ema_max_decay", type=float, default=0.9999)
    p.add_argument("--ema_inv_gamma", type=float, default=1.0)
    p.add_argument("--ema_power", type=float, default=0.75)
    # diffusion
    p.add_argument("--num_train_timesteps", type=int, default=1000)
    # logging / checkpoints / samples
    p.add_argument("--log_every", type=int, default=25)
    p.add_argument("--checkpointing_steps", type=int, default=500)
    p.add_argument("--checkpoints_total_limit", type=int, default=2)
    p.add_argument("--teacher", type=Path, default=None,
                   help="a trained UNet folder to distil from: the student regresses the teacher's noise prediction "
                        "on the same noisy crops (see --teacher_weight); the student's shape comes from the model flags, or from "
                        "--init_from's folder; the teacher must use this script's noise schedule")
    p.add_argument("--teacher_weight", type=float, default=1.0,
                   help="with --teacher: the target is w * teacher + (1 - w) * true noise (1: pure distillation)")
    p.add_argument("--init_from", type=Path, default=None,
                   help="start from the weights of this UNet2DModel folder (e.g. a pipeline's unet/; the "
                        "architecture flags are then taken from its config) with a fresh optimizer and EMA; "
                        "--resume of a run's own checkpoint takes precedence")
    p.add_argument("--prune_from", type=Path, default=None,
                   help="start from this trained UNet2DModel folder pruned to --block_out_channels (its most important "
                        "channels per level; the last width must stay its own): the usual start of a distilled "
                        "student, with --teacher the same folder; --norm_num_groups defaults to what divides every width")
    p.add_argument("--resume", "--resume_from_checkpoint", dest="resume", default=None,
                   help='"latest" or a checkpoint folder')
    p.add_argument("--sample_every", type=int, default=1000, help="write a sample grid every N steps (0: only at end)")
    p.add_argument("--num_sample_images", type=int, default=16)
    p.add_argument("--sample_steps", type=int, default=50, help="DDIM steps for the sample grid")
    p.add_argument("--no_final_samples", action="store_true")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- model / scheduler
def build_unet(args):
    from diffusers import UNet2DModel

    n = len(args.block_out_channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if args.attention == "lowest":
        down[-1] = "AttnDownBlock2D"
        up[0] = "AttnUpBlock2D"
    groups = args.norm_num_groups or min(32, min(args.block_out_channels))
    return UNet2DModel(
        sample_size=args.resolution,
        in_channels=3,
        out_channels=3,
        layers_per_block=args.layers_per_block,
        block_out_channels=tuple(args.block_out_channels),
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=groups,
    )


SCHEDULE_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type")


def check_teacher_arguments(args) -> None:
    """Stop early (before any image is read) on a teacher option that cannot work."""
    if not 0.0 <= args.teacher_weight <= 1.0:
        raise SystemExit(f"--teacher_weight must be in [0, 1], got {args.teacher_weight}")
    if args.prune_from is not None:
        if args.init_from is not None:
            raise SystemExit("--prune_from and --init_from both set the start weights: pass one")
        if not (args.prune_from / "config.json").is_file():
            raise SystemExit(f"--prune_from {args.prune_from}: no config.json (pass the folder of a UNet2DModel)")
    if args.teacher is None:
        if args.teacher_weight != 1.0:
            raise SystemExit("--teacher_weight needs --teacher")
        return
    if not (args.teacher / "config.json").is_file():
        raise SystemExit(f"--teacher {args.teacher}: no config.json (pass the folder of a UNet2DModel, e.g. <model>/unet)")
    args.teacher = args.teacher.resolve()


def initial_unet(args):
    """The UNet the run starts from: ``--init_from``'s weights, ``--prune_from``'s pruned, or new ones."""
    from diffusers import UNet2DModel

    from diffusers_blind.models.pruning import prune_unet

    if args.init_from is not None:
        return UNet2DModel.from_pretrained(args.init_from)
    if args.prune_from is not None:
        try:
            return prune_unet(UNet2DModel.from_pretrained(args.prune_from), args.block_out_channels, args.norm_num_groups)
        except ValueError as error:
            raise SystemExit(f"--prune_from {args.prune_from}: {error}") from None
    return build_unet(args)


def load_teacher(folder: Path, student, noise_scheduler):
    """The frozen UNet a student is distilled from; it must predict the same quantity on the same images.

    Its channels must be the student's and, where its pipeline folder has a ``scheduler/`` beside it, its
    noise schedule this script's: the prediction at step ``t`` only means the same thing under one schedule.
    """
    from diffusers import UNet2DModel

    teacher = UNet2DModel.from_pretrained(folder)
    schedule = folder.parent / "scheduler" / "scheduler_config.json"
    if schedule.is_file():
        theirs = json.loads(schedule.read_text())
        for key in SCHEDULE_KEYS:
            if key in theirs and theirs[key] != noise_scheduler.config[key]:
                raise SystemExit(f"--teacher {folder}: its scheduler has {key} = {theirs[key]!r}, this training "
                                 f"{noise_scheduler.config[key]!r}")
    for key in ("in_channels", "out_channels"):
        if teacher.config[key] != student.config[key]:
            raise SystemExit(f"--teacher {folder}: {key} {teacher.config[key]} != the student's {student.config[key]}")
    teacher.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def distillation_target(teacher, noisy, timesteps, noise, weight: float, accelerator) -> torch.Tensor:
    """``w * eps_teacher(x_t, t) + (1 - w) * eps``: knowledge distillation of the denoiser, one network
    evaluation per training step (the student learns the teacher's function, not a shorter sampler)."""
    with accelerator.autocast():
        eps_teacher = teacher(noisy, timesteps).sample.float()
    return weight * eps_teacher + (1.0 - weight) * noise


def check_same_teacher(args, run_dir: Path) -> None:
    """A resumed run keeps its objective: the teacher of the run in ``run_dir`` (its ``args.json``), or none.

    Paths are compared resolved (an earlier run may have recorded one relative to its working directory).
    """
    previous = run_dir / "args.json"
    if not previous.is_file():
        return
    before = json.loads(previous.read_text()).get("teacher")
    before = None if before is None else str(Path(before).resolve())
    now = None if args.teacher is None else str(args.teacher)
    if before != now:
        said = f"--teacher {before}" if before is not None else "no --teacher"
        hint = " (--teacher_weight 0 with that teacher trains on the true noise)" if before is not None else ""
        raise SystemExit(f"{run_dir} was trained with {said}: resume it with the same objective{hint}")


def build_scheduler(num_train_timesteps: int = 1000):
    from diffusers import DDPMScheduler

    # timestep_spacing="linspace" only matters at inference (set_timesteps); with
    # 100 steps it reproduces guided-diffusion's respacing.
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        prediction_type="epsilon",
        variance_type="fixed_small",
        clip_sample=True,
        timestep_spacing="linspace",
    )


# ----------------------------------------------------------------------------- data
class CropSampler:
    """Random square crops of a set of in-memory images, with flips / rot90 and a flatness filter."""

    def __init__(self, folder: Path, resolution: int, min_std: float, rot90: bool = True):
        files = sorted(f for f in Path(folder).iterdir() if f.suffix.lower() in IMAGE_EXTS)
        self.images: list[torch.Tensor] = []
        self.files: list[str] = []
        for f in files:
            try:
                with Image.open(f) as im:
                    arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
            except (OSError, ValueError, SyntaxError) as error:  # named and skipped, like the command line does
                print(f"[train] skipping unreadable image {f}: {error}", flush=True)
                continue
            if min(arr.shape[:2]) < resolution:
                continue
            self.images.append(torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous())  # uint8 3xHxW
            self.files.append(f.name)
        if not self.images:
            raise ValueError(f"no usable images (>= {resolution}px) in {folder}")
        self.resolution = resolution
        self.min_std = min_std
        self.rot90 = rot90
        # sample images proportionally to the number of distinct crop positions
        w = np.array([(im.shape[1] - resolution + 1) * (im.shape[2] - resolution + 1) for im in self.images], dtype=np.float64)
        self.weights = torch.from_numpy(w / w.sum())
        self.num_crop_positions = int(w.sum())
        self.total_pixels = int(sum(im.shape[1] * im.shape[2] for im in self.images))

    def _one(self, g: torch.Generator) -> torch.Tensor:
        r = self.resolution
        idx = int(torch.multinomial(self.weights, 1, generator=g))
        im = self.images[idx]
        y = int(torch.randint(0, im.shape[1] - r + 1, (1,), generator=g))
        x = int(torch.randint(0, im.shape[2] - r + 1, (1,), generator=g))
        crop = im[:, y:y + r, x:x + r].float().div_(255.0)
        if bool(torch.rand((), generator=g) < 0.5):
            crop = crop.flip(-1)
        if self.rot90:
            k = int(torch.randint(0, 4, (1,), generator=g))
            if k:
                crop = torch.rot90(crop, k, dims=(1, 2))
        return crop

    def batch(self, n: int, g: torch.Generator) -> torch.Tensor:
        out = []
        tries = 0
        while len(out) < n:
            c = self._one(g)
            tries += 1
            # keep near-flat crops only if we cannot find textured ones (pathological data)
            if c.std() >= self.min_std or tries > 50 * n:
                out.append(c)
        return torch.stack(out).mul_(2.0).sub_(1.0)  # [-1, 1]


class StepCropBatches(torch.utils.data.Dataset):
    """Item ``step`` is the crop batch of that training step, drawn with the seed ``seed·1000003 + step``."""

    def __init__(self, sampler: CropSampler, batch_size: int, seed: int, num_steps: int):
        self.sampler, self.batch_size, self.seed, self.num_steps = sampler, batch_size, seed, num_steps

    def __len__(self) -> int:
        return self.num_steps

    def __getitem__(self, step: int) -> torch.Tensor:
        return self.sampler.batch(self.batch_size, torch.Generator().manual_seed(self.seed * 1_000_003 + step))


def step_crop_loader(sampler: CropSampler, args, start_step: int):
    """Crop batches for steps ``start_step, start_step + 1, ...`` in order, from ``args.num_workers`` processes."""
    dataset = StepCropBatches(sampler, args.batch_size, args.seed, args.max_train_steps)
    workers = args.num_workers
    return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=range(start_step, args.max_train_steps),
                                       num_workers=workers, prefetch_factor=4 if workers else None,
                                       pin_memory=torch.cuda.is_available())


# ----------------------------------------------------------------------------- helpers
def latest_checkpoint(output_dir: Path) -> Path | None:
    ckpts = [d for d in output_dir.glob("checkpoint-*") if d.is_dir() and re.fullmatch(r"checkpoint-\d+", d.name)]
    if not ckpts:
        return None
    return max(ckpts, key=lambda d: int(d.name.split("-")[1]))


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    if keep is None or keep <= 0:
        return
    ckpts = sorted(
        (d for d in output_dir.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", d.name)),
        key=lambda d: int(d.name.split("-")[1]),
    )
    for d in ckpts[:-keep]:
        shutil.rmtree(d, ignore_errors=True)


def _atomic_copy_dir(src: Path, dst: Path) -> None:
    """Copy the files of src into dst, replacing each one atomically."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            tmp = dst / f".{f.name}.tmp"
            shutil.copy2(f, tmp)
            os.chmod(tmp, 0o644)  # readable by everyone (safetensors may be written 0600)
            os.replace(tmp, dst / f.name)


def export_model(unet, scheduler, output_dir: Path, export_dir: Path | None, info: dict) -> Path:
    """Write <output_dir>/export/{unet,scheduler} (and copy to export_dir if given)."""
    exp = output_dir / "export"
    tmp = output_dir / "export_tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    scheduler.save_pretrained(tmp / "scheduler")
    with open(tmp / "unet" / "training_info.json", "w") as f:
        json.dump(info, f, indent=1)
    for sub in ("unet", "scheduler"):
        _atomic_copy_dir(tmp / sub, exp / sub)
        if export_dir is not None:
            _atomic_copy_dir(tmp / sub, Path(export_dir) / sub)
    shutil.rmtree(tmp, ignore_errors=True)
    return exp


@torch.no_grad()
def sample_grid(unet, scheduler, n: int, resolution: int, steps: int, seed: int, path: Path) -> None:
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    device = next(unet.parameters()).device
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, resolution, resolution, generator=g).to(device)
    was_training = unet.training
    unet.eval()
    for t in ddim.timesteps:
        eps = unet(x, t.to(device)).sample
        x = ddim.step(eps, t, x, eta=0.0).prev_sample
    unet.train(was_training)
    imgs = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    pad = 2
    grid = torch.full((3, rows * (resolution + pad) + pad, cols * (resolution + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        y0, x0 = pad + r * (resolution + pad), pad + c * (resolution + pad)
        grid[:, y0:y0 + resolution, x0:x0 + resolution] = imgs[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from diffusers_blind.io import check_training_folder

    check_training_folder(args.output_dir, args.resume)
    check_teacher_arguments(args)
    if args.resume:
        ckpt = latest_checkpoint(args.output_dir) if args.resume == "latest" else Path(args.resume)
        if ckpt is not None:
            check_same_teacher(args, ckpt.parent)
    t_start = time.time()
    torch.set_num_threads(args.num_threads)

    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    args.output_dir.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        project_config=ProjectConfiguration(project_dir=str(args.output_dir)),
    )
    set_seed(args.seed)

    if not args.train_data_dir.is_dir():
        raise SystemExit(f"--train_data_dir {args.train_data_dir} is not a folder")
    try:
        sampler = CropSampler(args.train_data_dir, args.resolution, args.min_crop_std, rot90=not args.no_rot90)
    except ValueError as error:  # no usable image
        raise SystemExit(str(error)) from None
    unet = initial_unet(args)
    if unet.config.sample_size != args.resolution:
        unet.register_to_config(sample_size=args.resolution)
    noise_scheduler = build_scheduler(args.num_train_timesteps)
    use_teacher = args.teacher is not None and args.teacher_weight > 0  # weight 0: the teacher is never needed
    teacher = load_teacher(args.teacher, unet, noise_scheduler) if use_teacher else None
    n_params = sum(p.numel() for p in unet.parameters())
    ema = EMAModel(
        unet.parameters(),
        decay=args.ema_max_decay,
        use_ema_warmup=True,
        inv_gamma=args.ema_inv_gamma,
        power=args.ema_power,
        model_cls=UNet2DModel,
        model_config=unet.config,
    )
    optimizer = torch.optim.AdamW(
        unet.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    lr_sched = get_scheduler(
        args.lr_scheduler, optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps, num_training_steps=args.max_train_steps,
    )
    unet, optimizer, lr_sched = accelerator.prepare(unet, optimizer, lr_sched)
    ema.to(accelerator.device)
    accelerator.register_for_checkpointing(ema)
    if teacher is not None:
        teacher.to(accelerator.device)

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

    accelerator.print(
        f"[train] {len(sampler.images)} images ({sampler.total_pixels / 1e6:.1f} MPix, "
        f"{sampler.num_crop_positions} crop positions of {args.resolution}px) | UNet {n_params / 1e6:.3f}M params | "
        f"batch {args.batch_size} | start step {global_step}"
    )
    with open(args.output_dir / "args.json", "w") as f:
        json.dump({k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, f, indent=1)

    log_path = args.output_dir / "loss_log.jsonl"
    sample_dir = args.output_dir / "samples"
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(accelerator.device)

    def ema_unet():
        model = UNet2DModel.from_config(accelerator.unwrap_model(unet).config)
        ema.copy_to(model.parameters())
        return model.to(accelerator.device)

    def do_export(reason: str):
        model = ema_unet()
        info = {"step": global_step, "reason": reason, "params": n_params,
                "minutes": (time.time() - t_start) / 60, "loss_ema": loss_avg,
                "train_images": len(sampler.images), "resolution": args.resolution}
        if args.teacher is not None:
            info.update(teacher=str(args.teacher), teacher_weight=args.teacher_weight)
        exp = export_model(model, noise_scheduler, args.output_dir, args.export_dir, info)
        accelerator.print(f"[train] exported EMA model at step {global_step} -> {exp}"
                          + (f" and {args.export_dir}" if args.export_dir else ""))
        return model

    def do_checkpoint():
        path = args.output_dir / f"checkpoint-{global_step}"
        accelerator.save_state(str(path))
        prune_checkpoints(args.output_dir, args.checkpoints_total_limit)
        accelerator.print(f"[train] saved {path}")

    unet.train()
    loss_acc, n_acc = 0.0, 0
    loss_avg = None
    t_log = time.time()
    t_last_export = time.time()
    steps_this_run = 0
    stop_reason = "max_train_steps"
    for clean in step_crop_loader(sampler, args, global_step):  # the batch of step global_step, seeded by it
        if args.max_minutes is not None and (time.time() - t_start) / 60 >= args.max_minutes:
            stop_reason = "max_minutes"
            break
        clean = clean.to(accelerator.device, non_blocking=True)
        # noise and timesteps seeded by the step (and process), like the crops: a resumed run draws what an
        # uninterrupted one would have, whatever else consumed the global RNG meanwhile
        g = torch.Generator(device=clean.device).manual_seed(
            (args.seed * 1_000_003 + global_step) * 64 + accelerator.process_index + 2**40)
        noise = torch.randn(clean.shape, generator=g, device=clean.device, dtype=clean.dtype)
        timesteps = torch.randint(0, args.num_train_timesteps, (clean.shape[0],), device=clean.device, generator=g)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        target = noise.float()
        if teacher is not None:
            target = distillation_target(teacher, noisy, timesteps, target,
                                         args.teacher_weight, accelerator)
        with accelerator.accumulate(unet):
            pred = unet(noisy, timesteps).sample
            loss = F.mse_loss(pred.float(), target)
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
            rec = {"step": global_step, "loss": loss_avg, "lr": lr_sched.get_last_lr()[0],
                   "ema_decay": ema.cur_decay_value, "steps_per_s": n_acc / max(dt, 1e-9),
                   "minutes": (time.time() - t_start) / 60}
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            accelerator.print(
                f"[train] step {global_step} loss {loss_avg:.5f} lr {rec['lr']:.2e} "
                f"{rec['steps_per_s']:.2f} it/s {rec['minutes']:.1f} min", flush=True)
            loss_acc, n_acc, t_log = 0.0, 0, time.time()

        if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
            do_checkpoint()
        if args.sample_every and global_step % args.sample_every == 0:
            sample_grid(ema_unet(), noise_scheduler, args.num_sample_images, args.resolution,
                        args.sample_steps, args.seed, sample_dir / f"step_{global_step:07d}.png")
        if args.export_every_minutes and (time.time() - t_last_export) / 60 >= args.export_every_minutes:
            do_export("periodic")
            t_last_export = time.time()

    if n_acc:
        loss_avg = loss_acc / n_acc
        with open(log_path, "a") as f:
            f.write(json.dumps({"step": global_step, "loss": loss_avg, "lr": lr_sched.get_last_lr()[0],
                                "minutes": (time.time() - t_start) / 60, "partial": n_acc}) + "\n")
    if steps_this_run:
        do_checkpoint()
    final = do_export(f"final ({stop_reason})")
    if not args.no_final_samples:
        sample_grid(final, noise_scheduler, args.num_sample_images, args.resolution,
                    args.sample_steps, args.seed, sample_dir / f"final_step_{global_step:07d}.png")
    accelerator.print(f"[train] done: step {global_step}, stop: {stop_reason}, "
                      f"{(time.time() - t_start) / 60:.1f} min")
    return {"global_step": global_step, "stop_reason": stop_reason, "params": n_params,
            "output_dir": str(args.output_dir)}


if __name__ == "__main__":
    main(sys.argv[1:])
