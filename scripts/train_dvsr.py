#!/usr/bin/env python
"""Train Deblurring via Stochastic Refinement (DvSR): predictor ``g`` and residual denoiser ``f`` jointly.

Data (one of):

* ``--train_data_dir`` a folder of sharp photographs (PNG/JPEG, e.g. from ``scripts/prepare_photos.py``):
  pairs are made on the fly: a random crop ``P + 32`` wide (flips, 90° rotations) is blurred with a
  random camera-shake or Gaussian kernel (sizes up to 33) keeping only the valid centre ``P × P``
  (realistic borders), Gaussian noise ``σ ~ U(0, 10)/255`` is added and the result quantised to 8 bits;
* ``--pairs_dir`` real pairs in the GoPro layout ``<root>/<sequence>/blur/*.png`` and
  ``<root>/<sequence>/sharp/*.png`` (GoPro, HIDE, RealBlur arranged that way): aligned random crops.

Loss (``--mode joint``, paper Eq. 6 corrected): ``‖ε − f([√ᾱ(x0 − g(y)) + √(1−ᾱ)ε, y], c(ᾱ))‖₁`` with
``√ᾱ`` drawn uniformly between two adjacent training levels (WaveGrad), optionally
``+ w‖g(y) − x0‖²`` (``--predictor_loss_weight``); ``--mode predictor`` trains ``g`` alone with L2.

Runs on CPU or GPU through ``accelerate`` (``--mixed_precision fp16|bf16`` on GPU), keeps an EMA of
the weights, writes ``accelerator.save_state`` checkpoints that ``--resume latest`` picks up, stops
cleanly after ``--max_minutes``, and exports the EMA weights as a pipeline folder
(``model_index.json``, ``predictor/``, ``denoiser/``, ``scheduler/``) to ``<output_dir>/export`` and
``--export_dir``.

Example (CPU, one thread)::

    OMP_NUM_THREADS=1 python scripts/train_dvsr.py --train_data_dir data/photos \\
        --output_dir runs/dvsr --num_threads 1 --max_minutes 70 --resume latest
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
# scikit-image sample names used for evaluation: refuse them as training data
EVAL_NAMES = ("astronaut", "camera", "chelsea", "coffee", "rocket", "coins", "brick", "grass", "gravel", "clock_motion")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--train_data_dir", type=Path, help="folder of sharp photographs (synthetic blur)")
    data.add_argument("--pairs_dir", type=Path, help="real pairs in the GoPro layout */blur/*.png, */sharp/*.png")
    p.add_argument("--output_dir", type=Path, required=True, help="run folder: checkpoints, logs, previews, export")
    p.add_argument("--export_dir", type=Path, default=None, help="also copy every export here")
    p.add_argument("--export_every_minutes", type=float, default=10.0)
    p.add_argument("--resolution", type=int, default=64, help="training crop size P")
    p.add_argument("--max_kernel_size", type=int, default=33, help="odd; synthetic kernels are embedded in this size")
    p.add_argument("--motion_probability", type=float, default=0.7)
    p.add_argument("--identity_probability", type=float, default=0.05)
    p.add_argument("--max_noise_level", type=float, default=10.0, help="noise σ ~ U(0, this) in 8-bit levels")
    p.add_argument("--min_crop_std", type=float, default=0.03, help="reject flatter sharp crops (tries up to 20×)")
    p.add_argument("--mode", choices=["joint", "predictor", "denoiser"], default="joint",
                   help="joint: g and f (paper); predictor: g alone with L2; denoiser: f alone on a frozen g")
    p.add_argument("--loss_norm", choices=["l1", "l2"], default="l1",
                   help="l1 (paper Eq. 6) or l2 (the conditional mean: what sample averaging estimates)")
    p.add_argument("--init_from", type=Path, default=None,
                   help="start g and f from a pipeline folder, e.g. the shipped default (a fresh run only)")
    p.add_argument("--predictor_loss_weight", type=float, default=0.0, help="weight of ‖g(y) − x0‖² in joint mode")
    p.add_argument("--predictor_channels", type=int, nargs="+", default=[32, 64, 96, 128])
    p.add_argument("--predictor_layers_per_block", type=int, default=1)
    p.add_argument("--denoiser_channels", type=int, nargs="+", default=[24, 48, 96])
    p.add_argument("--denoiser_layers_per_block", type=int, default=1)
    p.add_argument("--denoiser_norm_groups", type=int, default=8)
    p.add_argument("--num_train_timesteps", type=int, default=2000)
    p.add_argument("--beta_start", type=float, default=1e-6)
    p.add_argument("--beta_end", type=float, default=1e-2)
    p.add_argument("--residual_scale", type=float, default=1.0,
                   help="diffuse (x0 - g(y)) / s; the x0-clipping range of the scheduler becomes 2 / s")
    p.add_argument("--init_predictor_from", type=Path, default=None,
                   help="start g from the predictor/ of a pipeline folder (a fresh run only)")
    p.add_argument("--prediction_type", choices=["epsilon", "v_prediction", "sample"], default="v_prediction",
                   help="what f outputs; the loss is L1 on the ε it implies in every case")
    p.add_argument("--loss_target", choices=["epsilon", "v"], default="epsilon",
                   help="L1 on ε (paper Eq. 6) or on v = √ᾱ ε − √(1−ᾱ) r (weights the residual estimate at high noise)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--learning_rate", type=float, default=2e-4)
    p.add_argument("--lr_warmup_steps", type=int, default=200)
    p.add_argument("--adam_weight_decay", type=float, default=0.0)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--max_train_steps", type=int, default=1_000_000)
    p.add_argument("--max_minutes", type=float, default=None, help="stop cleanly after this wall time (this process)")
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--ema_max_decay", type=float, default=0.999)
    p.add_argument("--ema_power", type=float, default=0.75)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--log_every", type=int, default=25)
    p.add_argument("--checkpointing_steps", type=int, default=250)
    p.add_argument("--checkpoints_total_limit", type=int, default=2)
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    p.add_argument("--num_validation", type=int, default=8, help="fixed validation pairs (from the training data)")
    args = p.parse_args(argv)
    for name in ("train_data_dir", "pairs_dir"):
        folder = getattr(args, name)
        if folder is not None and not folder.is_dir():
            p.error(f"--{name} {folder} is not a folder")
    if args.max_kernel_size % 2 == 0 or args.max_kernel_size < 3:
        raise SystemExit("--max_kernel_size must be odd and >= 3")
    return args


# ----------------------------------------------------------------------------- data
def _load_rgb(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def _image_size(path: Path) -> tuple[int, int] | None:
    """``(height, width)`` from the file's header, or ``None`` (with a note) for a file that cannot be read."""
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except (OSError, ValueError, SyntaxError) as error:
        print(f"[train_dvsr] skipping unreadable image {path}: {error}", flush=True)
        return None


def _readable_images(files: list[Path]) -> list[torch.Tensor]:
    """The images of ``files`` that decode; each unreadable one is named and skipped."""
    images = []
    for f in files:
        try:
            images.append(_load_rgb(f))
        except (OSError, ValueError, SyntaxError) as error:
            print(f"[train_dvsr] skipping unreadable image {f}: {error}", flush=True)
    return images


def _augment(crops: list[torch.Tensor], g: torch.Generator) -> list[torch.Tensor]:
    """The same random h/v flip and 90° rotation applied to every tensor of ``crops``."""
    if bool(torch.rand((), generator=g) < 0.5):
        crops = [c.flip(-1) for c in crops]
    if bool(torch.rand((), generator=g) < 0.5):
        crops = [c.flip(-2) for c in crops]
    k = int(torch.randint(0, 4, (1,), generator=g))
    return [torch.rot90(c, k, dims=(-2, -1)) for c in crops] if k else crops


class SyntheticPairs:
    """Random crops of sharp photographs blurred on the fly (valid convolution of a larger crop)."""

    def __init__(self, folder: Path, args):
        from diffusers_blind.pipelines.dvsr.training_utils import make_blurry_sharp_pair, random_training_kernels

        self._make_pair, self._kernels = make_blurry_sharp_pair, random_training_kernels
        self.args = args
        self.size = args.resolution + args.max_kernel_size - 1
        files = sorted(f for f in Path(folder).iterdir() if f.suffix.lower() in IMAGE_EXTS)
        bad = [f.name for f in files if any(name in f.stem.lower() for name in EVAL_NAMES)]
        if bad:
            raise SystemExit(f"evaluation photographs found in the training folder: {bad}")
        self.images = [im for im in _readable_images(files) if min(im.shape[-2:]) >= self.size]
        if not self.images:
            raise SystemExit(f"no image of at least {self.size}px in {folder}")
        w = np.array([(im.shape[1] - self.size + 1) * (im.shape[2] - self.size + 1) for im in self.images], dtype=np.float64)
        self.weights = torch.from_numpy(w / w.sum())
        self.description = f"{len(self.images)} photographs from {folder}"

    def _crop(self, g: torch.Generator) -> torch.Tensor:
        s = self.size
        for _ in range(20):
            im = self.images[int(torch.multinomial(self.weights, 1, generator=g))]
            top = int(torch.randint(0, im.shape[1] - s + 1, (1,), generator=g))
            left = int(torch.randint(0, im.shape[2] - s + 1, (1,), generator=g))
            crop = im[:, top : top + s, left : left + s].float() / 255
            if crop.std() >= self.args.min_crop_std:
                break
        return _augment([crop], g)[0]

    def batch(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        large = torch.stack([self._crop(g) for _ in range(n)])
        seed = int(torch.randint(0, 2**62, (1,), generator=g))
        kernels = self._kernels(
            n, np.random.default_rng(seed), max_size=self.args.max_kernel_size,
            motion_probability=self.args.motion_probability, identity_probability=self.args.identity_probability,
        )
        sigma = torch.rand(n, generator=g) * self.args.max_noise_level / 255
        return self._make_pair(large, kernels, sigma, generator=g)


class RealPairs:
    """Aligned random crops of real blurry/sharp pairs in the GoPro layout (read from disk per sample)."""

    def __init__(self, root: Path, args):
        self.args = args
        self.pairs = []
        found = unusable = 0
        for blur in sorted(Path(root).glob("*/blur/*.png")):
            sharp = blur.parent.parent / "sharp" / blur.name
            if not sharp.is_file():
                continue
            found += 1
            sizes = _image_size(blur), _image_size(sharp)
            if None in sizes or sizes[0] != sizes[1] or min(sizes[0]) < args.resolution:
                unusable += 1  # unreadable, of different sizes, or smaller than a training crop
                continue
            self.pairs.append((blur, sharp))
        if not found:
            raise SystemExit(f"no */blur/*.png with a matching */sharp/*.png under {root}")
        if not self.pairs:
            raise SystemExit(f"none of the {found} pairs under {root} is usable: each needs readable blur and sharp "
                             f"images of the same size, at least --resolution {args.resolution} px per side")
        if unusable:
            print(f"[train_dvsr] skipped {unusable} of {found} pairs (unreadable, sizes differ, or smaller than "
                  f"{args.resolution} px)", flush=True)
        self.description = f"{len(self.pairs)} real pairs from {root}"

    def batch(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.args.resolution
        blurry, sharp = [], []
        while len(blurry) < n:
            b_path, s_path = self.pairs[int(torch.randint(0, len(self.pairs), (1,), generator=g))]
            b, s = _load_rgb(b_path), _load_rgb(s_path)
            if b.shape != s.shape or min(b.shape[-2:]) < p:
                continue
            top = int(torch.randint(0, b.shape[1] - p + 1, (1,), generator=g))
            left = int(torch.randint(0, b.shape[2] - p + 1, (1,), generator=g))
            crops = [c[:, top : top + p, left : left + p].float() / 255 for c in (b, s)]
            b_crop, s_crop = _augment(crops, g)
            blurry.append(b_crop)
            sharp.append(s_crop)
        return torch.stack(blurry), torch.stack(sharp)


# ----------------------------------------------------------------------------- helpers
def latest_checkpoint(output_dir: Path) -> Path | None:
    ckpts = [d for d in output_dir.glob("checkpoint-*") if d.is_dir() and re.fullmatch(r"checkpoint-\d+", d.name)]
    return max(ckpts, key=lambda d: int(d.name.split("-")[1])) if ckpts else None


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    ckpts = sorted((d for d in output_dir.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", d.name)),
                   key=lambda d: int(d.name.split("-")[1]))
    for d in ckpts[:-keep] if keep > 0 else []:
        shutil.rmtree(d, ignore_errors=True)


EXPORT_ENTRIES = {"predictor", "denoiser", "scheduler", "model_index.json", "training_info.json"}


def is_replaceable_export(folder: Path, partial: bool = False) -> bool:
    """``folder`` may be replaced by an export: absent, empty, or an earlier export of this script (a
    ``StochasticRefinementDeblurPipeline`` index and nothing but the entries an export writes). ``partial``:
    the script's own ``.tmp``/``.old`` scratch, which an interrupted export leaves without its index."""
    if not folder.exists():
        return True
    if not folder.is_dir():
        return False
    names = {entry.name for entry in folder.iterdir()}
    if not names or (partial and names <= EXPORT_ENTRIES):
        return True
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(index, dict) and index.get("_class_name") == "StochasticRefinementDeblurPipeline" \
        and names <= EXPORT_ENTRIES


def check_export_folder(folder: Path) -> None:
    """Refuse, before any training, an export folder (or its ``.tmp`` / ``.old`` siblings) that holds other files."""
    for path, partial in ((folder, False), (folder.with_name(folder.name + ".tmp"), True),
                          (folder.with_name(folder.name + ".old"), True)):
        if not is_replaceable_export(path, partial):
            raise SystemExit(f"[train_dvsr] {path} exists and is not an earlier export of this script (other files "
                             "would be lost when the export replaces it); choose an empty or new folder")


def write_pipeline_folder(predictor, denoiser, scheduler, folder: Path, info: dict, residual_scale: float = 1.0) -> None:
    """Save the components and a ``model_index.json`` for ``StochasticRefinementDeblurPipeline`` (atomically replaced).

    Only an absent or empty folder, or an earlier export of this script, is replaced (:func:`check_export_folder`).
    """
    import diffusers

    check_export_folder(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    predictor.save_pretrained(tmp / "predictor", safe_serialization=True)
    denoiser.save_pretrained(tmp / "denoiser", safe_serialization=True)
    scheduler.save_pretrained(tmp / "scheduler")
    index = {
        "_class_name": "StochasticRefinementDeblurPipeline",
        "_diffusers_version": diffusers.__version__,
        "denoiser": ["diffusers", "UNet2DModel"],
        "kernel_estimator": [None, None],
        "predictor": ["diffusers_blind.models.deblur_predictor", "DeblurPredictor"],
        "scheduler": ["diffusers_blind.schedulers.scheduling_continuous_noise_level", "ContinuousNoiseLevelScheduler"],
        "residual_scale": residual_scale,
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "training_info.json").write_text(json.dumps(info, indent=1) + "\n")
    for f in tmp.rglob("*"):
        os.chmod(f, 0o755 if f.is_dir() else 0o644)
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


@torch.no_grad()
def validate(predictor, denoiser, scheduler, blurry, sharp, steps: int, seed: int, residual_scale: float = 1.0) -> dict:
    """PSNR (dB, [0,1]) of the blurry input, ``x_init`` and one ``steps``-step sample on fixed pairs."""
    def psnr(a, b):
        mse = ((a.clamp(0, 1) - b) ** 2).flatten(1).mean(1)
        return float((10 * torch.log10(1 / mse.clamp_min(1e-12))).mean())

    y = blurry * 2 - 1
    x_init = predictor(y)
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(y.shape, generator=g)
    for t in scheduler.timesteps:
        eps = denoiser(torch.cat([z, y], 1), t.expand(y.shape[0])).sample
        z = scheduler.step(eps, t, z, generator=g).prev_sample
    out = (x_init + residual_scale * z + 1) / 2
    return {"psnr_blurry": psnr(blurry, sharp), "psnr_x_init": psnr((x_init + 1) / 2, sharp), f"psnr_sample_{steps}": psnr(out, sharp)}


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from diffusers_blind.io import check_training_folder

    check_training_folder(args.output_dir, args.resume)
    for folder in [args.output_dir / "export"] + ([Path(args.export_dir)] if args.export_dir is not None else []):
        check_export_folder(folder)
    t_start = time.time()
    torch.set_num_threads(args.num_threads)

    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from diffusers_blind.models import DeblurPredictor, build_dvsr_denoiser
    from diffusers_blind.pipelines.dvsr.training_utils import dvsr_loss
    from diffusers_blind.schedulers import ContinuousNoiseLevelScheduler

    args.output_dir.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(mixed_precision=args.mixed_precision,
                              project_config=ProjectConfiguration(project_dir=str(args.output_dir)))
    set_seed(args.seed)
    data = SyntheticPairs(args.train_data_dir, args) if args.train_data_dir else RealPairs(args.pairs_dir, args)

    predictor = DeblurPredictor(block_out_channels=tuple(args.predictor_channels),
                                layers_per_block=args.predictor_layers_per_block)
    denoiser = build_dvsr_denoiser(block_out_channels=tuple(args.denoiser_channels),
                                   layers_per_block=args.denoiser_layers_per_block,
                                   norm_num_groups=args.denoiser_norm_groups)
    scheduler = ContinuousNoiseLevelScheduler(num_train_timesteps=args.num_train_timesteps,
                                              beta_start=args.beta_start, beta_end=args.beta_end,
                                              prediction_type=args.prediction_type,
                                              clip_sample_range=2.0 / args.residual_scale)
    if args.init_predictor_from is not None:
        predictor.load_state_dict(DeblurPredictor.from_pretrained(args.init_predictor_from / "predictor").state_dict())
    if args.init_from is not None:
        predictor.load_state_dict(DeblurPredictor.from_pretrained(args.init_from / "predictor").state_dict())
        denoiser.load_state_dict(UNet2DModel.from_pretrained(args.init_from / "denoiser").state_dict())
    models = torch.nn.ModuleDict({"predictor": predictor, "denoiser": denoiser})
    n_params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    ema = EMAModel(models.parameters(), decay=args.ema_max_decay, use_ema_warmup=True, power=args.ema_power)
    trainable = {"predictor": predictor.parameters(), "denoiser": denoiser.parameters()}.get(args.mode, models.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    lr_sched = get_scheduler("constant_with_warmup", optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps,
                             num_training_steps=args.max_train_steps)
    models, optimizer, lr_sched = accelerator.prepare(models, optimizer, lr_sched)
    ema.to(accelerator.device)
    accelerator.register_for_checkpointing(ema)

    global_step = 0
    if args.resume:
        ckpt = latest_checkpoint(args.output_dir) if args.resume == "latest" else Path(args.resume)
        if ckpt is None:
            accelerator.print("[train_dvsr] --resume latest: no checkpoint, starting from scratch")
        else:
            accelerator.load_state(str(ckpt))
            ema.to(accelerator.device)  # the EMA state is loaded on the CPU
            global_step = int(ckpt.name.split("-")[1])
            accelerator.print(f"[train_dvsr] resumed from {ckpt} at step {global_step}")
    accelerator.print(f"[train_dvsr] {data.description} | params {n_params} | batch {args.batch_size} "
                      f"| crop {args.resolution} | mode {args.mode} | start step {global_step}")
    (args.output_dir / "args.json").write_text(json.dumps({k: str(v) if isinstance(v, Path) else v
                                                           for k, v in vars(args).items()}, indent=1))
    val_blurry, val_sharp = data.batch(args.num_validation, torch.Generator().manual_seed(12345))
    log_path = args.output_dir / "loss_log.jsonl"
    unwrapped = accelerator.unwrap_model(models)

    def ema_models():
        g = DeblurPredictor.from_config(unwrapped["predictor"].config)
        f = UNet2DModel.from_config(unwrapped["denoiser"].config)
        holder = torch.nn.ModuleDict({"predictor": g, "denoiser": f})
        ema.copy_to(holder.parameters())
        return g.eval(), f.eval()

    def do_export(reason: str) -> dict:
        g, f = ema_models()
        val = validate(g, f, scheduler, val_blurry, val_sharp, steps=20, seed=args.seed, residual_scale=args.residual_scale)
        info = {"step": global_step, "reason": reason, "params": n_params, "minutes_this_run": (time.time() - t_start) / 60,
                "loss_avg": loss_avg, "data": data.description, "validation_ema": val, "args": json.loads((args.output_dir / "args.json").read_text())}
        write_pipeline_folder(g, f, scheduler, args.output_dir / "export", info, args.residual_scale)
        if args.export_dir is not None:
            write_pipeline_folder(g, f, scheduler, Path(args.export_dir), info, args.residual_scale)
        accelerator.print(f"[train_dvsr] export at step {global_step} ({reason}): {val}", flush=True)
        return info

    def do_checkpoint():
        accelerator.save_state(str(args.output_dir / f"checkpoint-{global_step}"))
        prune_checkpoints(args.output_dir, args.checkpoints_total_limit)

    models.train()
    sums, n_acc, loss_avg = {}, 0, None
    t_log = t_export = time.time()
    steps_this_run, stop_reason = 0, "max_train_steps"
    while global_step < args.max_train_steps:
        if args.max_minutes is not None and (time.time() - t_start) / 60 >= args.max_minutes:
            stop_reason = "max_minutes"
            break
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + global_step)
        blurry, sharp = data.batch(args.batch_size, g)
        blurry = (blurry * 2 - 1).to(accelerator.device)
        sharp = (sharp * 2 - 1).to(accelerator.device)
        with accelerator.accumulate(models):
            losses = dvsr_loss(models["predictor"], models["denoiser"], scheduler, sharp, blurry, generator=g,
                               mode=args.mode, predictor_loss_weight=args.predictor_loss_weight,
                               residual_scale=args.residual_scale, loss_target=args.loss_target,
                               loss_norm=args.loss_norm)
            accelerator.backward(losses["loss"])
            if accelerator.sync_gradients and args.max_grad_norm:
                accelerator.clip_grad_norm_(models.parameters(), args.max_grad_norm)
            optimizer.step()
            lr_sched.step()
            optimizer.zero_grad(set_to_none=True)
        ema.step(models.parameters())
        global_step += 1
        steps_this_run += 1
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        n_acc += 1
        if global_step % args.log_every == 0:
            rec = {"step": global_step, **{k: v / n_acc for k, v in sums.items()}, "lr": lr_sched.get_last_lr()[0],
                   "steps_per_s": n_acc / max(time.time() - t_log, 1e-9), "minutes": (time.time() - t_start) / 60}
            loss_avg = rec["loss"]
            with open(log_path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            accelerator.print(f"[train_dvsr] step {global_step} loss {rec['loss']:.4f} eps_l1 {rec['eps_l1']:.4f} "
                              f"g_l2 {rec['predictor_l2']:.5f} {rec['steps_per_s']:.2f} it/s {rec['minutes']:.1f} min", flush=True)
            sums, n_acc, t_log = {}, 0, time.time()
        if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
            do_checkpoint()
        if args.export_every_minutes and (time.time() - t_export) / 60 >= args.export_every_minutes:
            do_export("periodic")
            t_export = time.time()

    if steps_this_run:
        do_checkpoint()
    info = do_export(f"final ({stop_reason})")
    accelerator.print(f"[train_dvsr] done: step {global_step}, stop: {stop_reason}, {(time.time() - t_start) / 60:.1f} min")
    return {"global_step": global_step, "stop_reason": stop_reason, "info": info}


if __name__ == "__main__":
    main(sys.argv[1:])
