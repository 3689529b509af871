#!/usr/bin/env python
"""Speed levers of a Fast EM step, quality and time side by side, on the shipped model and the 256² example.

    python scripts/benchmark_levers.py --levers base bf16 ddim50 --oracle       # whole runs: PSNR and time
    python scripts/benchmark_levers.py --unet-only --levers base bf16 channels_last compile noattn

Each lever is a named change of the main job (`diffusers-blind deblur examples/blurry.png --sigma 10`:
DDPM, 100 steps, float32):

* ``bf16``: the UNet's forward and backward under bfloat16 autocast (``precision="bfloat16"``);
* ``channels_last``: the UNet's weights and input in channels-last memory format;
* ``compile``: ``torch.compile`` on the UNet (the first call's compile time is reported apart);
* ``ddimN`` / ``ddpmN``: N steps of DDIM (η = 0) or DDPM instead of 100 DDPM steps;
* ``noattn``: the UNet's mid-block self-attention replaced by the identity (its residual path).

Levers combine with ``+`` (``bf16+ddim50``). Whole runs print the PSNR against examples/sharp.png (blind,
and with ``--oracle`` also given the true kernel) and the time (the process's CPU time, then the wall time); ``--unet-only``
times one UNet forward+backward on the example's padded shape (CPU time, ``--repeats`` times: first,
median, min). On a shared, loaded machine the wall time mostly measures the other processes: with
``OMP_NUM_THREADS=1`` the CPU time is what one free core would take.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from PIL import Image

import diffusers_blind
from diffusers_blind import FastEMDeblurPipeline
from diffusers_blind.metrics import psnr


ROOT = Path(__file__).resolve().parents[1]


class _Identity(torch.nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def apply_levers(pipe: FastEMDeblurPipeline, names: list[str]) -> dict:
    """Change ``pipe`` in place for ``names``; return the call arguments they set."""
    call = {"num_inference_steps": 100, "precision": "float32"}
    for name in names:
        if name == "base":
            continue
        if name == "bf16":
            call["precision"] = "bfloat16"
        elif name == "channels_last":
            pipe.unet.to(memory_format=torch.channels_last)
        elif name == "compile":
            pipe.unet = torch.compile(pipe.unet)
        elif name == "noattn":
            pipe.unet.mid_block.attentions = torch.nn.ModuleList([_Identity() for _ in pipe.unet.mid_block.attentions])
        elif name.startswith(("ddim", "ddpm")):
            cls = DDIMScheduler if name.startswith("ddim") else DDPMScheduler
            pipe.scheduler = cls.from_config(pipe.scheduler.config)
            call["num_inference_steps"] = int(name[4:])
        else:
            raise SystemExit(f"unknown lever {name!r}")
    return call


def load(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]


def whole_run(lever: str, oracle: bool, seed: int) -> dict:
    pipe = FastEMDeblurPipeline.from_pretrained(diffusers_blind.DEFAULT_MODEL)
    pipe.set_progress_bar_config(disable=True)
    call = apply_levers(pipe, lever.split("+"))
    blurry, sharp = load(ROOT / "examples" / "blurry.png"), load(ROOT / "examples" / "sharp.png")
    kernel = torch.from_numpy(np.load(ROOT / "examples" / "blurry_true_kernel.npy")).float()
    result = {"lever": lever}
    for name, known in [("blind", None)] + ([("oracle", kernel)] if oracle else []):
        start, cpu = time.perf_counter(), time.process_time()
        out = pipe(blurry, sigma=10, kernel=known, generator=torch.Generator().manual_seed(seed), output_type="pt",
                   **call)
        result[f"{name}_s"] = time.perf_counter() - start
        result[f"{name}_cpu"] = time.process_time() - cpu
        result[f"{name}_psnr"] = float(psnr(out.images.float().clamp(0, 1), sharp))
    return result


def unet_only(lever: str, repeats: int) -> dict:
    pipe = FastEMDeblurPipeline.from_pretrained(diffusers_blind.DEFAULT_MODEL)
    call = apply_levers(pipe, lever.split("+"))
    x = torch.randn(1, 3, 328, 328)  # the example padded by the kernel size and to the UNet's multiple
    if "channels_last" in lever:
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = {"float32": None, "bfloat16": torch.bfloat16}[call["precision"]]

    def once():
        xt = x.detach().requires_grad_(True)
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = pipe.unet(xt, torch.tensor(500)).sample
        torch.autograd.grad(out.float().square().sum(), xt)

    start = time.process_time()
    once()
    first = time.process_time() - start
    times = []
    for _ in range(repeats):
        start = time.process_time()
        once()
        times.append(time.process_time() - start)
    return {"lever": lever, "first_s": first, "median_s": statistics.median(times), "min_s": min(times)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levers", nargs="+", default=["base", "bf16", "ddim50"])
    parser.add_argument("--oracle", action="store_true", help="also run with the true kernel")
    parser.add_argument("--unet-only", action="store_true", help="time one UNet forward+backward per lever")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"threads={torch.get_num_threads()} torch={torch.__version__}", flush=True)
    for lever in args.levers:
        if args.unet_only:
            r = unet_only(lever, args.repeats)
            print(f"| {lever} | {r['first_s']:.2f} | {r['median_s']:.3f} | {r['min_s']:.3f} |", flush=True)
        else:
            r = whole_run(lever, args.oracle, args.seed)
            oracle = f" {r['oracle_psnr']:.2f} | {r['oracle_cpu']:.1f} | {r['oracle_s']:.1f} |" if args.oracle else ""
            print(f"| {lever} | {r['blind_psnr']:.2f} | {r['blind_cpu']:.1f} | {r['blind_s']:.1f} |{oracle}", flush=True)


if __name__ == "__main__":
    main()
