#!/usr/bin/env python
"""Assemble the shipped BlindDPS pipeline folder from a trained kernel prior.

    python scripts/build_blind_dps_default_model.py --kernel_unet runs/kernel_prior/export/unet \
        --tilt_unet runs/tilt_prior/export/unet

Writes ``src/diffusers_blind/blind_dps_default_model/`` with ``model_index.json``, ``kernel_unet/``
(config, weights stored in float16, training_info.json), ``scheduler/`` (the image prior's DDPM schedule, which the
kernel prior was trained on too), and ``unet`` and ``kernel_estimator`` as **relative symbolic links** to the
Fast EM default model's folders (the same image prior, and the kernel M-step whose plug-and-play prior the
sparse start kernel uses; the links keep 17 MB of weights out of the repository twice). Pipeline defaults
(``guidance_scale``, ``sparsity_weight``, ``kernel_init``, ``kernel_strength``) go to ``model_index.json``. With ``--tilt_unet`` the
tilt prior is stored as ``tilt_unet/`` (float16 on disk, with its training_info.json); it is not listed in
``model_index.json``, so the folder loads as a ``BlindDPSPipeline``, and
``BlindDPSTurbulencePipeline.from_pretrained`` picks ``tilt_unet/`` up. Without ``--tilt_unet`` an existing
``tilt_unet/`` is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "diffusers_blind"


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kernel_unet", type=Path, required=True, help="exported kernel UNet folder")
    p.add_argument("--tilt_unet", type=Path, default=None, help="exported tilt UNet folder (turbulence prior)")
    p.add_argument("--output", type=Path, default=PACKAGE / "blind_dps_default_model")
    p.add_argument("--image_model", type=Path, default=PACKAGE / "default_model", help="folder with unet/ and scheduler/")
    p.add_argument("--guidance_scale", type=float, default=5.0,
                   help="shipped default step multiplier (for the default 250 respaced steps, see the model card)")
    p.add_argument("--sparsity_weight", type=float, default=0.0)
    p.add_argument("--kernel_init", choices=("noise", "sparse"), default="sparse",
                   help="shipped default start of the kernel chain (noise: the paper)")
    p.add_argument("--kernel_strength", type=float, default=0.5,
                   help="shipped default fraction of the steps the kernel chain runs after a sparse start")
    p.add_argument("--copy_unet", action="store_true",
                   help="copy the image UNet and the kernel estimator instead of linking them")
    p.add_argument("--float32", action="store_true",
                   help="store the kernel and tilt UNets in float32 (default: float16 on disk, 2x smaller; loads as float32)")
    args = p.parse_args(argv)

    import diffusers_blind  # noqa: F401  (registers the pipeline classes)
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers_blind import BlindDPSPipeline
    from diffusers_blind.models import KernelEstimator

    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    kernel_unet = UNet2DModel.from_pretrained(args.kernel_unet)
    if not args.float32:
        kernel_unet = kernel_unet.half()
    scheduler = DDPMScheduler.from_pretrained(args.image_model / "scheduler")
    # model_index.json written by diffusers itself (with a throw-away copy of the image UNet)
    staging = out.parent / f".{out.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    estimator = KernelEstimator.from_pretrained(args.image_model / "kernel_estimator") if args.kernel_init == "sparse" else None
    pipe = BlindDPSPipeline(UNet2DModel.from_pretrained(args.image_model / "unet"), kernel_unet, scheduler,
                            kernel_estimator=estimator, guidance_scale=args.guidance_scale,
                            sparsity_weight=args.sparsity_weight, kernel_init=args.kernel_init,
                            kernel_strength=args.kernel_strength)
    pipe.save_pretrained(staging)
    for name in ("model_index.json",):
        shutil.copy2(staging / name, out / name)
    for sub in ("kernel_unet", "scheduler"):
        shutil.rmtree(out / sub, ignore_errors=True)
        shutil.copytree(staging / sub, out / sub)
    info = args.kernel_unet / "training_info.json"
    if info.is_file():
        shutil.copy2(info, out / "kernel_unet" / "training_info.json")
    if args.tilt_unet is not None:
        tilt_unet = UNet2DModel.from_pretrained(args.tilt_unet)
        if tilt_unet.config.in_channels != 2:
            raise SystemExit(f"{args.tilt_unet} is not a tilt prior (it takes {tilt_unet.config.in_channels} channels)")
        shutil.rmtree(out / "tilt_unet", ignore_errors=True)
        (tilt_unet if args.float32 else tilt_unet.half()).save_pretrained(out / "tilt_unet", safe_serialization=True)
        if (args.tilt_unet / "training_info.json").is_file():
            shutil.copy2(args.tilt_unet / "training_info.json", out / "tilt_unet" / "training_info.json")
    shutil.rmtree(staging, ignore_errors=True)
    for f in out.rglob("*"):
        if f.is_file() and not f.is_symlink():
            os.chmod(f, 0o644)
    for name in ("unet", "kernel_estimator"):
        link = out / name
        if link.is_symlink() or link.is_file():
            link.unlink()
        elif link.is_dir():
            shutil.rmtree(link)
        if name == "kernel_estimator" and estimator is None:
            continue
        if args.copy_unet:
            shutil.copytree(args.image_model / name, link)
        else:
            os.symlink(os.path.relpath(args.image_model / name, out), link)
    print(json.dumps(json.loads((out / "model_index.json").read_text()), indent=1))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
