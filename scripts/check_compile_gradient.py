#!/usr/bin/env python
"""Does ``torch.compile`` keep the UNet's input gradient? (Pi-GDM's guidance is that gradient.)

Compares the eager and the compiled ``UNet2DModel`` of a pipeline folder on one random input: the forward
output and the gradient of ``⟨u(x, t), v⟩`` with respect to ``x``, at three timesteps, in float32 and
under bfloat16 autocast. Prints the largest differences; docs/scale.md has the torch 2.13 CPU result.

    python scripts/check_compile_gradient.py [--model FOLDER] [--size 64]
"""

from __future__ import annotations

import argparse

import torch
from diffusers import UNet2DModel

import diffusers_blind


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=diffusers_blind.DEFAULT_MODEL, help="pipeline folder with a unet/")
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    unet = UNet2DModel.from_pretrained(args.model, subfolder="unet").eval()
    compiled = torch.compile(unet)
    channels = unet.config.in_channels
    x, v = torch.randn(1, channels, args.size, args.size), torch.randn(1, channels, args.size, args.size)
    worst = 0.0
    for dtype in (None, torch.bfloat16):
        for t in (900, 500, 100):
            results = []
            for model in (unet, compiled):
                xi = x.clone().requires_grad_(True)
                with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                    out = model(xi, t).sample
                (grad,) = torch.autograd.grad((out.float() * v).sum(), xi)
                results.append((out.float().detach(), grad))
            out_diff = float((results[0][0] - results[1][0]).abs().max())
            grad_diff = float((results[0][1] - results[1][1]).abs().max())
            scale = float(results[0][1].abs().max())
            worst = max(worst, grad_diff / scale)
            print(f"{'bfloat16' if dtype else 'float32':8s} t={t:3d}  output max diff {out_diff:.2e}  "
                  f"gradient max diff {grad_diff:.2e} (gradient max {scale:.2f})")
    print(f"worst relative gradient difference: {worst:.3f} ({'OK' if worst < 0.05 else 'WRONG: do not compile the UNet for guidance'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
