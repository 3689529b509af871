#!/usr/bin/env python
"""Assemble the shipped default pipeline folder from its trained parts.

    python scripts/build_default_model.py --unet RUN/unet --scheduler RUN/scheduler \
        --kernel_estimator RUN/kernel_estimator --output src/diffusers_blind/default_model

Parts default to the sub-folders of ``--output`` itself, so re-running it after a new export of
one part only rewrites ``model_index.json`` and that part. Weights are stored as safetensors.
``model_index.json`` carries the guidance scales tuned for the shipped model (``--guidance_scale`` 4.5 for
Pi-GDM at the default 50 steps, ``--dps_guidance_scale`` 1.25 for DPS, ``--diffpir_guidance_scale`` 0.5 for
the weight of DiffPIR's data step; docs/scale.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

from diffusers import DDPMScheduler, UNet2DModel

from diffusers_blind import FastEMDeblurPipeline, KernelEstimator


GUIDANCE_SCALE = 4.5  # Pi-GDM, tuned on training crops for the default 50 steps
DPS_GUIDANCE_SCALE = 1.25  # DPS (its step is also scaled by T/N), tuned the same way
DIFFPIR_GUIDANCE_SCALE = 0.5  # the weight of DiffPIR's data step, tuned the same way


def build(unet_dir: str, scheduler_dir: str, estimator_dir: str, output: str, guidance_scale: float = GUIDANCE_SCALE,
          dps_guidance_scale: float = DPS_GUIDANCE_SCALE,
          diffpir_guidance_scale: float = DIFFPIR_GUIDANCE_SCALE) -> FastEMDeblurPipeline:
    pipe = FastEMDeblurPipeline(
        unet=UNet2DModel.from_pretrained(unet_dir),
        scheduler=DDPMScheduler.from_pretrained(scheduler_dir),
        kernel_estimator=KernelEstimator.from_pretrained(estimator_dir),
        guidance_scale=guidance_scale,
        dps_guidance_scale=dps_guidance_scale,
        diffpir_guidance_scale=diffpir_guidance_scale,
    )
    with tempfile.TemporaryDirectory() as tmp:
        pipe.save_pretrained(tmp)
        os.makedirs(output, exist_ok=True)
        for name in ("model_index.json", "unet", "scheduler", "kernel_estimator"):
            source, target = os.path.join(tmp, name), os.path.join(output, name)
            if os.path.isdir(source):
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(source, target)
            else:
                shutil.copy(source, target)
    return pipe


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=os.path.join("src", "diffusers_blind", "default_model"))
    parser.add_argument("--unet", default=None)
    parser.add_argument("--scheduler", default=None)
    parser.add_argument("--kernel_estimator", default=None)
    parser.add_argument("--guidance_scale", type=float, default=GUIDANCE_SCALE, help="Pi-GDM default scale")
    parser.add_argument("--dps_guidance_scale", type=float, default=DPS_GUIDANCE_SCALE, help="DPS default scale")
    parser.add_argument("--diffpir_guidance_scale", type=float, default=DIFFPIR_GUIDANCE_SCALE,
                        help="DiffPIR default data-step weight")
    args = parser.parse_args(argv)
    parts = {name: getattr(args, name) or os.path.join(args.output, name) for name in ("unet", "scheduler", "kernel_estimator")}
    pipe = build(parts["unet"], parts["scheduler"], parts["kernel_estimator"], args.output, args.guidance_scale,
                 args.dps_guidance_scale, args.diffpir_guidance_scale)
    size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(args.output) for f in files)
    params = sum(p.numel() for p in pipe.unet.parameters())
    print(f"wrote {args.output}: {size / 2**20:.1f} MiB, UNet {params / 1e6:.2f} M parameters")


if __name__ == "__main__":
    main()
