#!/usr/bin/env python
"""Peak memory and time of blind Fast EM against image size, with the automatic tiling.

    python scripts/benchmark_scale.py photo.png --steps 2            # the shipped model, automatic tiles
    python scripts/benchmark_scale.py photo.png --steps 1 --tile-size 256 --max-memory 8GiB

Prints the tiling plan, then one line per UNet call (elapsed seconds, input shape, resident memory so
far), one line per diffusion step, and at the end the whole time and the peak resident memory of the
process (``resource.getrusage``, the same figure ``/usr/bin/time -v`` reports as "Maximum resident set
size"). Per-call lines let a run that is stopped early still give its tile throughput.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch
from PIL import Image

import diffusers_blind
from diffusers_blind import FastEMDeblurPipeline


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--sigma", type=float, default=5.0)
    parser.add_argument("--tile-size", type=int, default=None)
    parser.add_argument("--max-memory", default=None)
    parser.add_argument("--precision", default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    image = np.asarray(Image.open(args.image).convert("RGB"))
    pipe = FastEMDeblurPipeline.from_pretrained(diffusers_blind.DEFAULT_MODEL).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    print(f"image {image.shape[1]}x{image.shape[0]} ({image.shape[0] * image.shape[1] / 1e6:.2f} MP), "
          f"threads {torch.get_num_threads()}, start rss {peak_gib():.2f} GiB", flush=True)
    start = time.perf_counter()
    calls = {"n": 0}
    forward = pipe.unet.forward

    def traced(sample, *a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            print(f"plan: {pipe.tiling_plan}", flush=True)
        out = forward(sample, *a, **k)
        print(f"  [{time.perf_counter() - start:8.1f} s] unet call {calls['n']}: {tuple(sample.shape)} "
              f"grad={torch.is_grad_enabled()} peak rss {peak_gib():.2f} GiB", flush=True)
        return out

    pipe.unet.forward = traced
    last = {"t": start}

    def on_step(pipeline, step, timestep, tensors):
        now = time.perf_counter()
        print(f"step {step} (t={int(timestep)}): {now - last['t']:.1f} s, peak rss {peak_gib():.2f} GiB", flush=True)
        last["t"] = now
        return {}

    out = pipe(image, sigma=args.sigma, num_inference_steps=args.steps, tile_size=args.tile_size,
               max_memory=args.max_memory, precision=args.precision, generator=torch.Generator().manual_seed(0),
               output_type="np", callback_on_step_end=on_step, callback_on_step_end_tensor_inputs=[])
    total = time.perf_counter() - start
    print(f"plan: {pipe.tiling_plan}")
    print(f"total {total:.1f} s for {args.steps} steps; peak rss {peak_gib():.2f} GiB; output {out.images.shape}")


if __name__ == "__main__":
    main()
